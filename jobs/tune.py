"""Thin job entrypoint: ``python -m jobs.tune [--config FILE] [--bundle B --data DIR ...] [key=value ...]``.

The same config, flags and overrides as ``recflm tune``; for ``ray job submit -- python -m jobs.tune``."""
import sys

from recflm.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
