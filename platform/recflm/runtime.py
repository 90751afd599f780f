"""Connecting to Ray: one place that decides how a recflm command finds its cluster."""
from __future__ import annotations

import os
import socket


FOOTER_ACTORS = 4  # Ray Data Parquet footer readers per read (Ray's default: 32), see ensure_ray
# Ray Data's Parquet reader: "0" is the V1 reader (no footer-reading actor pool per read), see ensure_ray
PARQUET_V2 = "0"


def ensure_ray(num_cpus: int | None = None, quiet: bool = True) -> None:
    """Use the running Ray if there is one (RAY_ADDRESS, a job, or `ray start` here), else start a local one."""
    import logging

    import ray

    # Ray Data's progress bars would interleave with recflm's own progress lines (training workers'
    # lines reach the console when quiet=False); the data stages report their own counts
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    # Ray Data's Parquet reader starts a pool of 32 footer-reading actors (one worker process each) per
    # read_parquet: on a small machine, dozens of reads per run spawn hundreds of processes and a read
    # could wait forever for its pool; a few are plenty for a prepared dataset's handful of files
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", str(FOOTER_ACTORS))
    # ... and even 4 of them per read hung a read on 2 cores once more (a test's read_parquet waited forever
    # beside its idle pool, 2026-12-04), and starting them cost a test-sized training run 15 of its 55 s: the
    # V1 reader lists files in the driver, with no actors. RAY_DATA_USE_DATASOURCE_V2=1 (an operator's choice)
    # keeps V2.
    os.environ.setdefault("RAY_DATA_USE_DATASOURCE_V2", PARQUET_V2)
    # read as Ray reads it where ray.data is imported after this (its env_bool: "1" or "true", any case)
    DataContext.get_current().use_datasource_v2 = os.environ["RAY_DATA_USE_DATASOURCE_V2"].lower() in ("1", "true")
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DATA_DEFAULT_SHUFFLE_STRATEGY", "hash_shuffle")
    kwargs = {"log_to_driver": not quiet, "configure_logging": True, "logging_level": "WARNING"}
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    # Train V2 tees a worker's print() into its logger as well, so each progress line showed twice
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if os.environ.get("RAY_ADDRESS"):  # a job on a cluster, or an explicit address
        ray.init(**kwargs)
        return
    # with no address Ray follows the last `ray start` on this machine, else starts a local Ray; it
    # never attaches to another process's private local Ray (as address="auto" would)
    try:
        ray.init(**kwargs, **({"num_cpus": num_cpus} if num_cpus else {}))
    except ValueError as e:  # it found a `ray start` cluster, which has its own resources
        if "must not be provided" not in str(e):
            raise
        ray.init(**kwargs)
    except ConnectionError:  # the last `ray start` cluster is gone
        ray.init(address="local", num_cpus=num_cpus, **kwargs)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now on ``host`` (for test and benchmark servers on loopback)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
