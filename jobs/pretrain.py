"""Thin job entrypoint: ``python -m jobs.pretrain [--config FILE] [key=value ...]``.

The same config and overrides as ``recflm pretrain``; for ``ray job submit -- python -m jobs.pretrain``."""
import sys

from recflm.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
