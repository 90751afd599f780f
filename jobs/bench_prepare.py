"""Benchmark: `recflm prepare` on Ray Data against a single-process pandas implementation.

Synthetic interactions (Parquet, ~3% duplicate rows, ~2% bad rows) at each size; both sides run the
same steps (clean, de-duplicate, repeated-pair rule, iterative k-core, leave-one-out split, sequential
item IDs, write kept and rejected rows) and must keep exactly the same rows. Prints rows/s and peak
memory of each side and the ratios, one table, then a summary line.

    python -m jobs.bench_prepare --rows 1000000,10000000
    ray job submit --working-dir . -- python -m jobs.bench_prepare --rows 1000000

Peak memory is the peak rise of the machine's used memory (MemTotal - MemAvailable, sampled every
50 ms) during each run, so it counts every process and Ray's shared-memory object store alike; the
Ray cluster is started before the baseline is taken (its idle footprint is reported separately).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

K = 5


# ----------------------------------------------------------------------------- synthetic data
def make_data(n: int, out: Path, seed: int = 0, files: int = 8) -> Path:
    """n rows: users with log-normal activity (mean ~40), items with Zipf popularity, 3% exact
    duplicates, 2% bad rows (missing user or item, rating out of range, bad timestamp)."""
    rng = np.random.default_rng(seed)
    n_users, n_items = max(100, n // 40), max(50, n // 100)
    base = int(n * 0.95)
    activity = rng.lognormal(0.0, 1.0, n_users)
    user = rng.choice(n_users, size=base, p=activity / activity.sum())
    item = np.minimum(rng.zipf(1.2, base), n_items) - 1
    item = (item * 40503) % n_items
    ts = 1_500_000_000 + rng.integers(0, 200_000_000, base)
    rating = rng.integers(1, 6, base).astype(np.float64)
    df = pd.DataFrame({"uid": user.astype("int64"), "iid": item.astype("int64"), "stars": rating, "time": ts})
    dups = df.sample(n=int(n * 0.03), random_state=seed)  # exact duplicates
    bad = df.sample(n=n - base - len(dups), random_state=seed + 1).copy()
    kinds = rng.integers(0, 4, len(bad))
    bad["uid"] = bad["uid"].astype("Int64")
    bad["iid"] = bad["iid"].astype("Int64")
    bad.loc[kinds == 0, "uid"] = pd.NA
    bad.loc[kinds == 1, "iid"] = pd.NA
    bad.loc[kinds == 2, "stars"] = 9.0
    bad.loc[kinds == 3, "time"] = -5
    full = pd.concat([df.astype({"uid": "Int64", "iid": "Int64"}), dups.astype({"uid": "Int64", "iid": "Int64"}),
                      bad], ignore_index=True)
    full = full.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    out.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(np.array_split(np.arange(len(full)), files)):
        pq.write_table(pa.Table.from_pandas(full.iloc[part], preserve_index=False), out / f"part-{i:03d}.parquet")
    return out


COLUMNS = {"user": "uid", "item": "iid", "rating": "stars", "ts": "time"}


# ----------------------------------------------------------------------------- pandas baseline
def pandas_prepare(src: Path, out: Path, k: int = K, seed: int = 2022) -> dict:
    """The same steps as recflm prepare, in one pandas process."""
    df = pd.read_parquet(src)
    df = df.rename(columns={v: k_ for k_, v in COLUMNS.items()})
    reason = pd.Series(pd.NA, index=df.index, dtype="str")

    def mark(cond, code):
        nonlocal reason
        reason = reason.mask(cond & reason.isna(), code)

    mark(df["user"].isna(), "missing_user")
    mark(df["item"].isna(), "missing_item")
    r = pd.to_numeric(df["rating"], errors="coerce")
    mark(r.isna(), "missing_rating")
    mark((r < 1) | (r > 5), "rating_out_of_range")
    ts = pd.to_numeric(df["ts"], errors="coerce")
    mark(ts.isna() | (ts < 0) | (ts > 4102444800), "bad_timestamp")
    ok = reason.isna()
    df["user"] = "t:" + df["user"].astype("str")
    df["item"] = "t:" + df["item"].astype("str")
    df["rating"] = r
    df["ts"] = ts.fillna(0).astype("int64")
    dup = df[ok].duplicated(["user", "item", "rating", "ts"], keep="first")
    reason[dup[dup].index] = "duplicate"
    live = df[reason.isna()].sort_values(["user", "item", "ts", "rating"], kind="stable")
    earlier = live.duplicated(["user", "item"], keep="last")
    reason[earlier[earlier].index] = "repeat_earlier"
    # iterative k-core
    alive = reason.isna()
    while True:
        sub = df.loc[alive, ["user", "item"]]
        uc = sub["user"].map(sub["user"].value_counts())
        ic = sub["item"].map(sub["item"].value_counts())
        drop = (uc < k) | (ic < k)
        if not drop.any():
            break
        alive[drop[drop].index] = False
    mark(~alive, "kcore")
    kept = df[reason.isna()].sort_values(["user", "ts", "item"], kind="stable")
    pos = kept.groupby("user", sort=False).cumcount()
    n = kept.groupby("user", sort=False)["item"].transform("size")
    kept["split"] = np.where(pos == n - 1, "test", np.where(pos == n - 2, "valid", "train"))
    kept["pos"] = pos
    # sequential IDs from training data only (hash user order, then position)
    hk = hashlib.sha256(str(seed).encode()).hexdigest()[:16]
    uh = pd.util.hash_array(kept["user"].to_numpy(dtype=object), hash_key=hk)
    kept["key"] = (uh >> np.uint64(24)).astype(np.int64) * (1 << 20) + np.minimum(pos.to_numpy(), (1 << 20) - 1)
    tr = kept[kept["split"] == "train"].groupby("item")["key"].min().sort_values()
    rest = kept.loc[~kept["item"].isin(tr.index)].groupby("item")["key"].min().sort_values()
    ids = pd.Series(np.arange(1, len(tr) + len(rest) + 1), index=tr.index.append(rest.index))
    kept["id"] = kept["item"].map(ids)
    out.mkdir(parents=True, exist_ok=True)
    kept.drop(columns=["key"]).to_parquet(out / "interactions.parquet", index=False)
    rej = df[reason.notna()].assign(reason=reason[reason.notna()])
    rej.astype("str").to_parquet(out / "rejects.parquet", index=False)
    return {"kept": len(kept), "rejected": int(reason.notna().sum()), "fingerprint": _fingerprint(kept),
            "reasons": reason.value_counts().to_dict()}


def _fingerprint(kept: pd.DataFrame) -> str:
    """Order-free fingerprint of the kept (user, item, ts, split) rows."""
    h = pd.util.hash_pandas_object(kept[["user", "item", "ts", "split"]].astype("str"), index=False)
    return f"{len(kept)}:{int(h.to_numpy().astype(np.uint64).sum(dtype=np.uint64))}"


# ----------------------------------------------------------------------------- measurement
class MemSampler:
    """Peak rise of system used memory (MemTotal - MemAvailable) while running."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def used() -> int:
        info = {}
        with open("/proc/meminfo") as f:
            for line in f:
                k, v = line.split(":")
                info[k] = int(v.split()[0]) * 1024
        return info["MemTotal"] - info["MemAvailable"]

    def __enter__(self):
        self.base = self.used()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.used() - self.base)
            time.sleep(0.05)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def run_pandas_subprocess(src: Path, out: Path) -> tuple[dict, float, int]:
    code = ("import json,sys; sys.path.insert(0, %r); from jobs.bench_prepare import pandas_prepare; "
            "from pathlib import Path; print(json.dumps(pandas_prepare(Path(%r), Path(%r)), default=str))"
            % (str(Path(__file__).resolve().parents[1]), str(src), str(out)))
    with MemSampler() as mem:
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        secs = time.perf_counter() - t0
    return json.loads(res.stdout.strip().splitlines()[-1]), secs, mem.peak


def run_ours(src: Path, out: Path) -> tuple[dict, float, int]:
    from recflm.config import PrepareConfig, SourceConfig
    from recflm.prepare import run

    cfg = PrepareConfig(sources=[SourceConfig(type="table", path=str(src), name="t", columns=COLUMNS)],
                        out=str(out), k_core=K, min_ts=0)
    with MemSampler() as mem:
        t0 = time.perf_counter()
        stats = run(cfg, log=lambda *a: None)
        secs = time.perf_counter() - t0
    kept = pd.read_parquet(out / "interactions.parquet", columns=["user", "item", "ts", "split"])
    res = {"kept": stats["kept"], "rejected": stats["rejected"], "fingerprint": _fingerprint(kept),
           "reasons": stats["rejected_by_reason"]}
    return res, secs, mem.peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1000000,10000000", help="comma-separated sizes")
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir)")
    args = ap.parse_args(argv)
    sizes = [int(float(x)) for x in args.rows.split(",")]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_prepare_"))

    from recflm.runtime import ensure_ray

    before = MemSampler.used()
    ensure_ray()
    time.sleep(2)
    ray_idle = MemSampler.used() - before
    rows = []
    for n in sizes:
        src = make_data(n, work / f"src_{n}")
        ours, t_ours, m_ours = run_ours(src, work / f"ours_{n}")
        base, t_pd, m_pd = run_pandas_subprocess(src, work / f"pandas_{n}")
        same = ours["fingerprint"] == base["fingerprint"] and ours["rejected"] == base["rejected"]
        rows.append({"rows": n, "ours_rows_s": n / t_ours, "pandas_rows_s": n / t_pd,
                     "speed_ratio": t_pd / t_ours, "ours_peak_mib": m_ours / 2**20,
                     "pandas_peak_mib": m_pd / 2**20, "mem_ratio": m_ours / max(m_pd, 1), "same_rows": same,
                     "kept": ours["kept"], "rejected": ours["rejected"]})
        shutil.rmtree(work / f"ours_{n}", ignore_errors=True)
        shutil.rmtree(work / f"pandas_{n}", ignore_errors=True)
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.float_format", "{:,.2f}".format):
        print(table.to_string(index=False))
    last = rows[-1]
    print(f"ray idle footprint: {ray_idle / 2**20:,.0f} MiB (not counted in peaks); cpus: {os.cpu_count()}")
    print(f"SUMMARY bench_prepare rows={last['rows']:,} speed_ratio={last['speed_ratio']:.2f} "
          f"mem_ratio={last['mem_ratio']:.2f} same_rows={all(r['same_rows'] for r in rows)}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["same_rows"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
