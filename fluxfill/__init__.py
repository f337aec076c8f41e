"""fluxfill: in-context diptych fine-tuning of FLUX.1-Fill-dev with a learnable semantic fusion weight."""

__version__ = "0.1.0"
