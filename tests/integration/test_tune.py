"""recflm tune: a sweep that is killed, resumed without rerunning its finished trial, and ends with a
sorted table, a plot and the best trial's bundle (the search-space checks: tests/unit/test_tune_space.py)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from recflm.bundle import load_bundle
from recflm.tune import TuneConfig, run

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

SPACE = {"lr": {"loguniform": [3.0e-4, 3.0e-3]}, "label_smoothing": {"choice": [0.0, 0.1]},
         "dropout": {"uniform": [0.0, 0.2]}, "augment.crop": {"uniform": [0.0, 0.4]},
         "family_weights.direct": {"uniform": [0.5, 1.0]}, "families": ["sequential", "direct"]}
TRAIN = {"epochs": 2, "epoch_steps": 3, "max_steps": 6, "batch_size": 16, "val_examples": 16, "val_users": 24, "val_beams": 10,
         "shuffle_buffer": 100, "log_every": 3}


def _state(sweep: Path) -> dict:
    """Trial id -> status in the newest saved experiment state (what a resume starts from)."""
    files = sorted(sweep.glob("experiment_state-*.json"))  # named by start time
    if not files:
        return {}
    try:
        data = json.loads(files[-1].read_text())
    except json.JSONDecodeError:  # being written
        return {}
    return {t["trial_id"]: t["status"] for t in (json.loads(s) for s, _ in data["trial_data"])}


def _snapshot(sweep: Path, trial: str) -> dict:
    """A finished trial's files: its Tune results (contents; Tune re-syncs them to storage) and its
    Train run's checkpoints (contents and modification times)."""
    tune_files = [p for p in (sweep / f"trial_{trial}").rglob("*") if p.is_file()]
    train_files = [p for p in (sweep / "train" / f"train-{trial}").rglob("*") if p.is_file()]
    return {str(p.relative_to(sweep)): (p.read_bytes(), p.stat().st_mtime_ns if p in train_files else 0)
            for p in tune_files + train_files}


def test_killed_sweep_resumes_without_rerunning_finished_trials(ray_session, bundled_dataset, tiny_bundle, tmp_path):
    import ray

    data, _, _ = bundled_dataset
    bundle, _ = tiny_bundle
    config = tmp_path / "tune.yaml"
    config.write_text(yaml.safe_dump({"space": SPACE, "train": TRAIN, "max_concurrent_trials": 1,
                                      "storage_path": str(tmp_path / "sweeps")}))
    sweep = tmp_path / "sweeps" / "sw"
    # the sweep runs as a separate driver on this session's Ray, and is killed (SIGKILL, no clean-up)
    # as soon as the saved experiment state shows a finished trial
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT)])}
    log = (tmp_path / "sweep.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "jobs.tune", "--config", str(config), "--bundle", str(bundle),
                             "--data", str(data), "--trials", "2", "--name", "sw"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 900
        while time.time() < deadline and proc.poll() is None:
            state = _state(sweep)
            if "TERMINATED" in state.values():
                break
            time.sleep(0.5)
        finished = {t for t, s in state.items() if s == "TERMINATED"}
        assert finished, f"no trial finished before the deadline:\n{(tmp_path / 'sweep.log').read_text()[-3000:]}"
        snapshots = {t: _snapshot(sweep, t) for t in finished}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL and len(finished) < 2  # killed mid-sweep
    assert all(snapshots.values())

    out = run(TuneConfig(resume="sw", storage_path=str(tmp_path / "sweeps")), log=lambda *a: None)

    table = out["table"]
    assert not out["interrupted"] and len(table) == 2 and set(table["status"]) <= {"done", "stopped"}
    for t in finished:  # kept as it was: no file of the finished trial rewritten, no new checkpoint
        after = _snapshot(sweep, t)
        assert {k: after.get(k) for k in snapshots[t]} == snapshots[t]
        assert not [k for k in set(after) - set(snapshots[t]) if "checkpoint_" in k]
        assert table.set_index("trial").loc[t, "status"] in ("done", "stopped")
    # the table (printed and CSV) is sorted by the metric, best first
    saved = pd.read_csv(sweep / "results.csv")
    assert list(saved["trial"]) == list(table["trial"])
    assert list(saved["val_ndcg10"]) == sorted(saved["val_ndcg10"], reverse=True)
    assert (table["epochs"] >= 1).all() and ((table["status"] == "done") == (table["epochs"] == 2)).all()
    png = Path(out["plot"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # the best trial's bundle loads; its own validation metric is the best of the table
    b = load_bundle(out["bundle"])
    best = table.iloc[0]
    assert b.manifest["tune"]["trial"] == best["trial"] and b.manifest["tune"]["sweep"] == "sw"
    assert b.manifest["metrics"]["val_ndcg10"] == b.manifest["tune"]["value"] == table["val_ndcg10"].max()
    settings = b.manifest["tune"]["settings"]
    assert set(settings) == set(SPACE)
    assert b.manifest["train_config"]["lr"] == settings["lr"] == best["lr"]
    assert b.manifest["train_config"]["augment"] == {"crop": settings["augment.crop"]}
    assert b.model.config.dropout_rate == pytest.approx(settings["dropout"])
    assert len(b.catalog) > 0 and b.manifest["init_bundle"] == str(Path(bundle).resolve())
