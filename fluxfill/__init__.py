"""fluxfill: in-context diptych fine-tuning of FLUX.1-Fill-dev with a learnable semantic fusion weight."""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Editor":  # imported on first use: `import fluxfill` stays light (no torch, no diffusers)
        from .edit import Editor

        return Editor
    raise AttributeError(f"module 'fluxfill' has no attribute {name!r}")
