"""``recflm submit STAGE``: run a stage as a Ray job on a cluster, through Ray's JobSubmissionClient.

The job runs ``python -m jobs.<STAGE> [args]``: the same thin entrypoints, YAML configs and
``key=value`` overrides as on a laptop. The project directory is uploaded as the job's
``working_dir`` (without .venv, runs/, data/, .git and caches) and ``platform`` goes first on the
job's PYTHONPATH, so the uploaded ``recflm`` is the one that runs, installed on the cluster or not.
The command prints the submission id, follows the job's logs and exits with its status (0 when the
job SUCCEEDED, 1 otherwise); ``--no-wait`` returns right after submitting.

    recflm submit pretrain --address http://HEAD:8265 --config jobs/configs/pretrain_cluster.yaml workers=8

Everything after STAGE that is not one of submit's own options goes to the job, so stage flags
(``--gpu``, ``--baselines``) work too; after ``--`` everything goes to the job. Plain Ray does the
same with:

    ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env-json '{"env_vars": {"PYTHONPATH": "platform"}}' -- python -m jobs.pretrain ...
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from .config import ConfigError
from .runtime import FOOTER_ACTORS, PARQUET_V2

HELP = "submit a stage (python -m jobs.STAGE) as a Ray job to a cluster and follow its logs"
COMMON_ARGS = False  # STAGE and the job's own arguments are positionals of their own

# never uploaded: environments, data and run directories, VCS and caches (Ray also honours .gitignore)
EXCLUDES = [".venv/", "venv/", "runs/", "data/", "out/", "build/", ".git/", "**/__pycache__/", "*.pyc",
            "*.egg-info/", ".pytest_cache/", ".mypy_cache/", ".ruff_cache/", ".ipynb_checkpoints/"]

# what every recflm job needs in its environment; --env adds to it
JOB_ENV = {
    "PYTHONPATH": "platform",  # relative to the working_dir; the uploaded recflm comes before an installed one
    "RAY_DATA_DEFAULT_SHUFFLE_STRATEGY": "hash_shuffle",
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": str(FOOTER_ACTORS),  # as runtime.ensure_ray
    "RAY_DATA_USE_DATASOURCE_V2": PARQUET_V2,  # as runtime.ensure_ray: the Parquet reader without actor pools
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


class SubmitError(ValueError):
    """The job cannot be submitted (no such stage, cluster unreachable); the message says why."""


def _submit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", "-a",
                   help="the cluster's dashboard, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, "
                        "$RAY_ADDRESS, else a Ray started on this machine)")
    p.add_argument("--working-dir", default=".", help="the project directory to upload (default: .)")
    p.add_argument("--submission-id", help="a unique id for the job (default: Ray's raysubmit_...)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra environment variable for the job; repeatable")
    p.add_argument("--entrypoint-num-gpus", type=float, default=None,
                   help="GPUs reserved for the job's driver (default 0: it runs on the head node)")
    p.add_argument("--no-wait", action="store_true", help="return after submitting, do not follow the logs")


def add_arguments(p: argparse.ArgumentParser, name: str = "") -> None:
    _submit_options(p)
    p.add_argument("stage", help="the job module to run: jobs/STAGE.py (prepare, pretrain, evaluate, tune, ...)")
    p.add_argument("job_args", nargs=argparse.REMAINDER, metavar="...",
                   help="the job's arguments: --config FILE, key=value overrides, stage flags")


def split_args(job_args: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Take submit's own options out of the arguments after STAGE; the rest belongs to the job."""
    passthrough: list[str] = []
    if "--" in job_args:
        i = job_args.index("--")
        job_args, passthrough = job_args[:i], job_args[i + 1:]
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    _submit_options(p)
    ours, rest = p.parse_known_args(job_args)
    return ours, rest + passthrough


def build_job(stage: str, job_args: list[str], working_dir: str, env: list[str]) -> tuple[str, dict]:
    """The entrypoint and runtime_env of a recflm job."""
    root = Path(working_dir).resolve()
    if not (root / "jobs" / f"{stage}.py").is_file():
        have = sorted(f.stem for f in (root / "jobs").glob("*.py") if not f.stem.startswith("_"))
        raise SubmitError(f"no job module jobs/{stage}.py under {root}"
                          + (f" (have: {', '.join(have)})" if have else "; run from the project directory "
                             "or pass --working-dir"))
    env_vars = dict(JOB_ENV)
    for kv in env:
        if "=" not in kv:
            raise ConfigError(f"--env {kv!r} is not of the form KEY=VALUE")
        k, v = kv.split("=", 1)
        env_vars[k] = f"platform{os.pathsep}{v}" if k == "PYTHONPATH" else v
    entrypoint = shlex.join(["python", "-m", f"jobs.{stage}", *job_args])
    return entrypoint, {"working_dir": str(root), "excludes": EXCLUDES, "env_vars": env_vars}


def follow(client, submission_id: str) -> str:
    """Print the job's logs as they come; return its final status."""
    import asyncio

    async def tail():
        async for chunk in client.tail_job_logs(submission_id):
            print(chunk, end="", flush=True)

    asyncio.run(tail())
    status = client.get_job_status(submission_id)
    while not status.is_terminal():  # the log stream can close a moment before the status is final
        time.sleep(1)
        status = client.get_job_status(submission_id)
    return str(status.value)


def command(args) -> int:
    ours, job_args = split_args(args.job_args)
    defaults = vars(split_args([])[0])
    for k, v in vars(ours).items():  # submit's options given after STAGE, on top of those before it
        if v != defaults[k]:
            setattr(args, k, args.env + v if k == "env" else v)
    entrypoint, runtime_env = build_job(args.stage, job_args, args.working_dir, args.env)

    from ray.job_submission import JobSubmissionClient

    if args.address:  # an explicit --address wins; Ray's client would otherwise prefer the variables
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        os.environ.pop("RAY_ADDRESS", None)
    try:
        client = JobSubmissionClient(args.address)
    except ConnectionError as e:
        where = args.address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or "this machine"
        raise SubmitError(f"cannot reach a Ray cluster at {where}: {e} Is the cluster up (`ray start --head`, "
                          f"`ray up cluster.yaml`) and is the dashboard address right (http://HEAD:8265)?") from None
    for attempt in range(10):
        try:
            submission_id = client.submit_job(
                entrypoint=entrypoint, runtime_env=runtime_env, submission_id=args.submission_id,
                entrypoint_num_gpus=args.entrypoint_num_gpus, metadata={"recflm_stage": args.stage})
            break
        except RuntimeError as e:  # the job server's answer: a used submission id, a bad runtime env, ...
            # a head that has just started answers before its job agent is up: wait for it a little
            if "No available agent" in str(e) and attempt < 9:
                time.sleep(3)
                continue
            raise SubmitError(f"the cluster at {client.get_address()} refused the job: {e}") from None
    address = client.get_address()
    print(f"submitted {submission_id} to {address}: {entrypoint}", flush=True)
    if args.no_wait:
        print(f"follow it with: ray job logs --follow --address {address} {submission_id}")
        return 0
    try:
        status = follow(client, submission_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running. Stop it with: "
              f"ray job stop --address {address} {submission_id}", file=sys.stderr)
        return 130
    message = (client.get_job_info(submission_id).message or "").split("\n")[0]  # the rest repeats the logs
    print(f"job {submission_id} {status}" + (f": {message}" if status != "SUCCEEDED" and message else ""))
    return 0 if status == "SUCCEEDED" else 1
