"""Connecting to Ray: one place that decides how a recflm command finds its cluster."""
from __future__ import annotations

import os


def ensure_ray(num_cpus: int | None = None, quiet: bool = True) -> None:
    """Use the running Ray if there is one (a job, `ray start`, or RAY_ADDRESS), else start a local one."""
    import logging

    import ray

    # Ray Data's progress bars would interleave with recflm's own progress lines (training workers'
    # lines reach the console when quiet=False); the data stages report their own counts
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DATA_DEFAULT_SHUFFLE_STRATEGY", "hash_shuffle")
    kwargs = {"log_to_driver": not quiet, "configure_logging": True, "logging_level": "WARNING"}
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)
        return
    try:  # a cluster started with `ray start` on this machine
        ray.init(address="auto", **kwargs)
    except ConnectionError:
        ray.init(address="local", num_cpus=num_cpus, **kwargs)
