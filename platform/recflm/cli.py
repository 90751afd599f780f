"""The ``recflm`` command: one sub-command per stage.

Every stage takes ``--config FILE.yaml`` and ``key=value`` overrides (dotted for nested keys), so
the same config drives the local command, ``python -m jobs.<stage>`` and a Kubernetes job.

A stage is a module named in ``STAGES`` that exposes ``HELP`` (a line; a dict by command name where the
module runs more than one command), ``add_arguments(parser, name)`` for its own flags and
``command(args) -> int``; ``COMMON_ARGS = False`` where it defines its own positionals instead of
``--config`` and the overrides. The modules import Ray, torch etc. inside their functions, so building
the parser stays fast. To add a stage: write those three in its module and name it here.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .config import ConfigError

# command -> the module that runs it
STAGES = {"prepare": "prepare", "pretrain": "train", "finetune": "train", "evaluate": "evaluate", "candidates": "candidates",
          "tune": "tune",
          "serve": "serve", "submit": "submit"}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file for this stage")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. k_core=10 augment.crop=0.3")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recflm",
        description="Pretrain, tune and serve one text-to-text recommendation model on Ray (P5 paradigm).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in STAGES.items():
        mod = importlib.import_module(f"{__package__}.{module}")
        helptext = mod.HELP[name] if isinstance(mod.HELP, dict) else mod.HELP
        p = sub.add_parser(name, help=helptext, description=helptext + ".")
        if getattr(mod, "COMMON_ARGS", True):
            _add_common(p)
        mod.add_arguments(p, name)
        p.set_defaults(func=mod.command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        # ValueError covers SourceError / PrepareError / DatasetError: user errors, one clear line
        print(f"recflm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
