"""Thin job entrypoint: ``python -m jobs.deploy [--bundle B] [key=value ...]`` deploys the recflm Serve
application described by ``jobs/serve.yaml`` onto the running cluster and returns.

The same as ``recflm serve --config jobs/serve.yaml --detach``; for ``ray job submit -- python -m jobs.deploy``.
Run it again with another ``--bundle`` to roll out a new bundle without failed requests."""
import sys
from pathlib import Path

from recflm.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", "--detach", "--config", str(Path(__file__).with_name("serve.yaml")), *sys.argv[1:]]))
