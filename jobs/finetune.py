"""Thin job entrypoint: ``python -m jobs.finetune --bundle B [--tasks sequential,direct] [--config FILE] [key=value ...]``.

The same flags, config and overrides as ``recflm finetune``; for ``ray job submit -- python -m jobs.finetune``
and ``recflm submit finetune``."""
import sys

from recflm.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
