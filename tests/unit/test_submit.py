"""``recflm submit`` without a cluster: what it submits (entrypoint, runtime env, what gets uploaded),
how its arguments split between it and the job, and its errors. Submitting to a real two-node
cluster is tests/integration/test_multinode.py."""
import shlex
import zipfile
from pathlib import Path

import pytest

from recflm.cli import main
from recflm.runtime import free_port
from recflm.submit import EXCLUDES, SubmitError, build_job, split_args

ROOT = Path(__file__).resolve().parents[2]


def test_options_after_stage_are_submits_the_rest_goes_to_the_job():
    ours, job = split_args(["--config", "jobs/configs/pretrain_cluster.yaml", "workers=2", "--address",
                            "http://head:8265", "--gpu", "--env", "A=1", "--no-wait", "--", "--address", "x"])
    assert ours.address == "http://head:8265" and ours.env == ["A=1"] and ours.no_wait
    assert job == ["--config", "jobs/configs/pretrain_cluster.yaml", "workers=2", "--gpu", "--address", "x"]


def test_job_entrypoint_and_runtime_env():
    entrypoint, env = build_job("pretrain", ["--config", "jobs/configs/pretrain_laptop.yaml", "name=my run"],
                                str(ROOT), ["HF_HUB_OFFLINE=1", "PYTHONPATH=/opt/extra"])
    assert shlex.split(entrypoint) == ["python", "-m", "jobs.pretrain", "--config",
                                       "jobs/configs/pretrain_laptop.yaml", "name=my run"]
    assert env["working_dir"] == str(ROOT)
    assert env["env_vars"]["PYTHONPATH"] == "platform:/opt/extra"  # the uploaded recflm first
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert env["env_vars"]["RAY_DATA_DEFAULT_SHUFFLE_STRATEGY"] == "hash_shuffle"


def test_every_cli_stage_that_runs_on_a_cluster_has_a_job_module():
    """`recflm submit STAGE` runs jobs/STAGE.py; finetune included (it runs `recflm finetune`)."""
    import os
    import subprocess
    import sys

    for stage in ("prepare", "pretrain", "finetune", "evaluate", "tune"):
        entrypoint, _ = build_job(stage, ["--help"], str(ROOT), [])
        assert shlex.split(entrypoint)[2] == f"jobs.{stage}"
    out = subprocess.run([sys.executable, "-m", "jobs.finetune", "--help"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "platform")}, timeout=120)
    assert out.returncode == 0 and "--bundle" in out.stdout and "finetune" in out.stdout, out.stderr


def test_unknown_stage_names_the_ones_there_are():
    with pytest.raises(SubmitError, match=r"jobs/nosuch\.py.*have: .*pretrain"):
        build_job("nosuch", [], str(ROOT), [])


def test_upload_leaves_out_environments_data_and_caches(tmp_path):
    """Ray's own packer with our excludes (and without .gitignore): code and configs only, and small."""
    from ray._private.runtime_env.packaging import create_package

    target = tmp_path / "pkg.zip"
    create_package(str(ROOT), target, include_gitignore=False, excludes=EXCLUDES)
    names = zipfile.ZipFile(target).namelist()
    assert "jobs/pretrain.py" in names and "platform/recflm/train.py" in names and "cluster.yaml" in names
    for bad in (".venv/", ".git/", "runs/", "__pycache__/", ".pytest_cache/"):
        assert not any(n.startswith(bad) or f"/{bad}" in n for n in names), bad
    assert target.stat().st_size < 20 * 2**20


def test_cli_errors_are_one_line_and_exit_2(capsys):
    assert main(["submit", "nosuch", "--address", "http://127.0.0.1:1"]) == 2
    assert "jobs/nosuch.py" in capsys.readouterr().err
    port = free_port()  # nothing listens there now
    assert main(["submit", "pretrain", "--address", f"http://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach a Ray cluster at http://127.0.0.1:{port}" in err and len(err.strip().splitlines()) == 1
