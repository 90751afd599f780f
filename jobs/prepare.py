"""Thin job entrypoint: ``python -m jobs.prepare [--config FILE] [key=value ...]``.

The same config and overrides as ``recflm prepare``; for ``ray job submit -- python -m jobs.prepare``."""
import sys

from recflm.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
