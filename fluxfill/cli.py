"""``fluxfill`` command line: thin wrappers over the library, one sub-command per DVC stage.

Every stage reads ``params.yaml`` (``--params FILE``) with ``--set section.key=value`` overrides,
validated before anything runs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import textwrap
from pathlib import Path

import yaml

from .config import ConfigError, FluxfillError, load_params

# commands that hold the workspace's training lock (fluxfill.safety) for their whole run
LOCKED = {"train"}
# name -> (module, help); each module exposes add_arguments(parser) and run(params, args)
COMMANDS: dict[str, tuple[str, str]] = {
    "shapes": ("fluxfill.shapes", "print the tensor shapes of the diptych contract, computed by running it"),
    "prepare": ("fluxfill.data", "build the triptych dataset in data/prepared (demo, folder or manifest)"),
    "encode": ("fluxfill.encode", "encode data/prepared into the latent cache data/latents"),
    "train": ("fluxfill.train", "train LoRA + fusion weight from the latent cache into models/"),
    "evaluate": ("fluxfill.evaluate", "generate validation panels, score them against targets and baselines"),
    "edit": ("fluxfill.edit", "apply the trained LoRA + fusion to your own images"),
    "export": ("fluxfill.export", "write the LoRA for other FLUX tools (diffusers, kohya, comfyui) + a fusion sidecar"),
    "promote": ("fluxfill.registry", "point an alias (e.g. champion) at a registered model version"),
    "compare": ("fluxfill.compare", "compare MLflow runs side by side, with their model versions (--parent: a sweep's points)"),
    "sweep": ("fluxfill.sweep", "run a grid of settings as DVC experiments, compared under one MLflow parent run"),
    "summary": ("fluxfill.summary", "print where to look after a run: MLflow run, metrics, sample grids"),
    "pretrain-tiny": ("fluxfill.pretrain", "train the tiny preset's shipped weights on the CPU (make tiny-weights)"),
}


def _verbose_flag(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(add_help=False)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (so ``--help`` and light commands start fast)."""
    parser = argparse.ArgumentParser(
        prog="fluxfill",
        description="Fine-tune FLUX.1-Fill-dev with in-context diptych training and a learnable fusion weight.",
        epilog="Each stage is also a DVC stage (`dvc repro`) and a Prefect flow (flows/).",
    )
    _verbose_flag(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        if name != command:
            sub.add_parser(name, help=help_text, add_help=False)
            continue
        module = importlib.import_module(module_name)
        doc = textwrap.dedent(module.__doc__ or help_text).strip()
        p = sub.add_parser(name, help=help_text, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--params", default=None, help="params file (default: ./params.yaml)")
        p.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
            help="override one setting, e.g. --set train.max_steps=5 (repeatable; the value is YAML)",
        )
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def _held(command: str | None, argv: list[str]):
    """The workspace's training lock for ``train``, taken before its module's heavy imports: a second training
    is refused at once. ``--help`` needs none."""
    if command not in LOCKED or {"-h", "--help"} & set(argv):
        return contextlib.nullcontext()
    from .safety import training_lock

    return training_lock()


# what libraries log that is not the user's concern unless -v: optional torchao kernels that do not load on this
# machine (and diffusers' note about them), torch's deprecation notes on torchao's enums, accelerate's lines for
# every file a checkpoint saves
QUIET = {"torchao": logging.ERROR, "torch.utils._pytree": logging.ERROR,
         "diffusers.quantizers.torchao.torchao_quantizer": logging.ERROR, "accelerate": logging.WARNING}
# request and database chatter: warnings only, -v or not
CHATTY = ("httpx", "urllib3", "alembic", "mlflow.store", "filelock")


def _run(command: str | None, argv: list[str]) -> int:
    verbose = _verbose_flag().parse_known_args(argv)[0].verbose  # as argparse reads it (--verb too)
    for name, level in QUIET.items():  # before the command's module imports them
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else level)
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
    args = build_parser(command).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = load_params(args.params, args.overrides)
    return int(args._module.run(params, args) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), None)
    try:
        with _held(command, argv):
            return _run(command, argv)
    except ConfigError as e:
        print(f"fluxfill {command}: {e}", file=sys.stderr)
        _dvc_checkout_hint(command)
        return 2
    except KeyboardInterrupt:
        print(f"fluxfill {command}: interrupted", file=sys.stderr)
        return 130
    except FluxfillError as e:
        print(f"fluxfill {command}: error: {e}", file=sys.stderr)
        _dvc_checkout_hint(command)
        return 1


def _dvc_checkout_hint(command: str | None) -> None:
    """Under `dvc repro` in the workspace itself (DVC sets DVC_STAGE and DVC_ROOT for a stage's command), DVC
    removed the stage's outputs before running it: say how to put back those dvc.lock records, if any."""
    stage, root = os.environ.get("DVC_STAGE"), os.environ.get("DVC_ROOT")
    if not stage or not root or os.path.realpath(root) != os.path.realpath(os.getcwd()):
        return
    try:
        lock = yaml.safe_load(Path(root, "dvc.lock").read_text()) or {}
        recorded = bool(lock.get("stages", {}).get(stage, {}).get("outs"))
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        recorded = False
    if recorded:
        print(f"fluxfill {command}: DVC removed the outputs of stage {stage} before running it; "
              f"`dvc checkout {stage}` puts back the ones dvc.lock records", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
