"""Test fixtures: one local Ray per test session, small data, short paths.

Environment knobs are set before Ray starts so that its workers inherit them."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT))
from recflm.runtime import FOOTER_ACTORS, PARQUET_V2  # noqa: E402  (recflm.runtime starts nothing on import)

for k, v in {
    "RAY_AUTH_MODE": "disabled",
    "RAY_metrics_report_interval_ms": "1000",
    "RAY_DATA_DEFAULT_SHUFFLE_STRATEGY": "hash_shuffle",
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": str(FOOTER_ACTORS),  # as ensure_ray (Ray's 32 per read hung a read)
    "RAY_DATA_USE_DATASOURCE_V2": PARQUET_V2,  # as ensure_ray: the V1 Parquet reader (V2's actor pools hung reads)
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(k, v)

SHARED = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (tests that need Ray take this fixture)."""
    import ray

    from recflm.runtime import free_port

    port = free_port()
    temp = Path("/tmp") / f"rft{os.getpid()}"  # short: Ray puts unix sockets under it
    from recflm.serve import set_throughput_env

    set_throughput_env()  # Serve's HAProxy ingress and throughput data plane, as `recflm serve` starts its own Ray
    ray.init(address="local", num_cpus=4, object_store_memory=768 * 1024**2, _metrics_export_port=port,
             _temp_dir=str(temp), log_to_driver=False, include_dashboard=True,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    from recflm.runtime import ensure_ray

    ensure_ray()  # quiets Ray Data logging the way the CLI does
    yield {"metrics_port": port}
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def bundled_dataset(ray_session, tmp_path_factory):
    """The bundled MovieLens data prepared with the default config (built once per session)."""
    from recflm.config import PrepareConfig
    from recflm.prepare import run

    out = tmp_path_factory.mktemp("ml") / "data"
    cfg = PrepareConfig(out=str(out))
    stats = run(cfg, log=lambda *a: None)
    return out, cfg, stats


@pytest.fixture(scope="session")
def tiny_bundle(bundled_dataset, tmp_path_factory):
    """A tiny model pretrained for a few steps in Ray Train local mode (built once per session)."""
    from recflm.train import TrainConfig, run

    data, _, _ = bundled_dataset
    tmp = tmp_path_factory.mktemp("tiny_bundle")
    cfg = TrainConfig(data=str(data), out=str(tmp / "bundle"), storage_path=str(tmp / "runs"), name="tiny",
                      preset="tiny", workers=0, epochs=1, batch_size=16, vocab_size=600, max_steps=40,
                      log_every=10, checkpoint_every=40, val_examples=32, val_users=10, shuffle_buffer=200,
                      families=["rating", "sequential", "direct", "explanation", "span"])
    return run(cfg, log=lambda *a: None), cfg


UPDATE_COLUMNS = {"user": "user", "item": "item", "rating": "rating", "ts": "ts"}


def _write_rows(path: Path, rows) -> Path:
    path.write_text("user,item,rating,ts\n" + "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in rows))
    return path


@pytest.fixture(scope="session")
def updated_data(ray_session, tmp_path_factory):
    """A small synthetic shop log prepared (k_core=2), then ``prepare --update`` with newer rows: new
    interactions of old users, new users, new items, one interaction the dataset has and one bad row it
    rejected before. Returns the base dataset (an untouched copy), the updated one and the rows of each."""
    import random
    import shutil

    from recflm.config import PrepareConfig, SourceConfig
    from recflm.prepare import run
    from recflm.prepare_update import update

    tmp = tmp_path_factory.mktemp("update")
    rng = random.Random(7)
    base_rows = [(f"u{u}", f"i{i}", rng.randint(1, 5), 1000 + 100 * u + j)
                 for u in range(40) for j, i in enumerate(rng.sample(range(25), 6))]
    bad = ("u1", "i1", "abc", 1500)
    new_rows = [(f"u{u}", f"i{i}", rng.randint(1, 5), 100_000 + 10 * u + j)
                for u in range(20) for j, i in enumerate(rng.sample(range(25, 30), 2))]
    new_rows += [(f"n{u}", f"i{i}", rng.randint(1, 5), 200_000 + 10 * u + j)
                 for u in range(5) for j, i in enumerate(rng.sample(range(30), 4))]
    new_rows += [base_rows[0], bad]
    base_csv = _write_rows(tmp / "base.csv", base_rows + [bad])
    new_csv = _write_rows(tmp / "new.csv", new_rows)
    cfg = PrepareConfig(out=str(tmp / "data"), k_core=2, sources=[
        {"type": "table", "path": str(base_csv), "name": "shop", "columns": UPDATE_COLUMNS}])
    run(cfg, log=lambda *a: None)
    shutil.copytree(tmp / "data", tmp / "base")
    stats = update(tmp / "data", [SourceConfig(type="table", path=str(new_csv), columns=UPDATE_COLUMNS)],
                   log=lambda *a: None)
    return {"base": tmp / "base", "data": tmp / "data", "stats": stats, "base_rows": base_rows + [bad],
            "new_rows": new_rows, "new_csv": new_csv, "tmp": tmp}


@pytest.fixture(scope="session")
def updated_bundle(updated_data):
    """A tiny one-token-per-item bundle pretrained a few steps on the base of ``updated_data``, then fine-tuned
    on the updated dataset with catalog=extend (Ray Train local mode). Returns (base bundle, updated bundle)."""
    from recflm.train import TrainConfig, run

    tmp = updated_data["tmp"]
    common = dict(preset="tiny", workers=0, epochs=1, batch_size=16, vocab_size=400, log_every=5, val_examples=16,
                  val_users=8, shuffle_buffer=100, item_token_mode="token", families=["sequential", "direct"],
                  storage_path=str(tmp / "runs"))
    base = run(TrainConfig(data=str(updated_data["base"]), out=str(tmp / "bundle_base"), name="upd_base",
                           max_steps=8, checkpoint_every=8, **common), log=lambda *a: None)
    updated = run(TrainConfig(data=str(updated_data["data"]), out=str(tmp / "bundle_updated"), name="upd_ft",
                              max_steps=6, checkpoint_every=6, init_bundle=str(base), catalog="extend", **common),
                  log=lambda *a: None)
    return base, updated
