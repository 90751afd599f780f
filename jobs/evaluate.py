"""Thin job entrypoint: ``python -m jobs.evaluate [--config FILE] [--baselines] [key=value ...]``.

The same config and overrides as ``recflm evaluate``; for ``ray job submit -- python -m jobs.evaluate``."""
import sys

from recflm.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
