"""Benchmark: recflm serve under a long mixed load, with one replica killed and one rollout in the middle.

Clients (``--clients``, closed loop) send a mix of requests for ``--minutes`` minutes: recommendations for
known users and for raw histories, ratings, explanations, item lookups, and bad requests (an unknown item,
k out of range, malformed JSON, a wrong content type, an unknown field), each with the status it must get.
At 40% of the run one model replica is killed (SIGKILL, as a crashed process); at 60% a second bundle is
rolled out (a copy of the first with another manifest, so another model version). Every answer is checked:
an *unexpected* answer is a status other than the expected one, a body that is not JSON, or a lost
connection. Each minute the table shows requests, unexpected answers by status, p50 and p99 latency of the
good requests, and the resident memory (RSS) of each live model replica.

    python -m jobs.bench_soak --bundle runs/demo/bundle              # 10 minutes, 2 replicas
    python -m jobs.bench_soak --bundle runs/demo/bundle --minutes 3 --replicas 1

Targets: 0 unexpected answers, and flat memory: the replicas' mean RSS in the last minute at most 5%
above the first minute's (a replaced replica is compared with itself from its second minute on). The last
line is ``SUMMARY bench_soak requests=N unexpected=U rss_growth=G% minutes=M``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path

APP = "soak"
KILL_AT, ROLLOUT_AT = 0.4, 0.6


def request_mix(users: list[str], items: list[str], k: int) -> list[tuple[float, str, str, object, dict, int]]:
    """(weight, method, path, json body or raw bytes, headers, expected status) of each request kind."""
    u, i = users, items
    return [
        (0.35, "POST", "/v1/recommend", lambda r: {"user": r.choice(u), "k": k}, {}, 200),
        (0.15, "POST", "/v1/recommend", lambda r: {"user": "new", "history": r.sample(i, 5), "k": k}, {}, 200),
        (0.15, "POST", "/v1/rating", lambda r: {"user": r.choice(u), "item": r.choice(i)}, {}, 200),
        (0.05, "POST", "/v1/explain", lambda r: {"user": r.choice(u), "item": r.choice(i)}, {}, 200),
        (0.10, "GET", "/v1/items/{item}", None, {}, 200),
        (0.05, "POST", "/v1/recommend", lambda r: {"history": ["no-such-item"]}, {}, 404),
        (0.05, "POST", "/v1/recommend", lambda r: {"user": r.choice(u), "k": 10_000}, {}, 422),
        (0.03, "POST", "/v1/recommend", lambda r: b'{"user": ', {"content-type": "application/json"}, 400),
        (0.03, "POST", "/v1/rating", lambda r: b'{"user": "x", "item": "y"}', {"content-type": "text/plain"}, 415),
        (0.04, "POST", "/v1/rating", lambda r: {"user": r.choice(u), "item": r.choice(i), "extra": 1}, {}, 422),
    ]


def client(url: str, mix: list, items: list[str], stop: threading.Event, out: list, seed: int) -> None:
    import httpx

    rng = random.Random(seed)
    weights = [m[0] for m in mix]
    with httpx.Client(base_url=url, timeout=60) as c:
        while not stop.is_set():
            _, method, path, body, headers, want = rng.choices(mix, weights)[0]
            kw = {"headers": headers}
            if path == "/v1/items/{item}":
                path = f"/v1/items/{rng.choice(items)}"
            elif body is not None:
                b = body(rng)
                kw["content" if isinstance(b, bytes) else "json"] = b
            t0, why = time.time(), ""
            try:
                r = c.request(method, path, **kw)
                status = r.status_code
                try:
                    r.json()
                    json_body = True
                except ValueError:
                    json_body = False
            except httpx.HTTPError as e:
                status, json_body, why = -1, False, f"{type(e).__name__}: {e}"[:120]
            out.append((t0, time.time() - t0, status, want, json_body, f"{method} {path}", why))


def replica_rss() -> dict[str, float]:
    """RSS (MB) of each live Recommender replica of the app, by replica actor name (this node's processes)."""
    import psutil
    from ray.util.state import list_actors

    out = {}
    for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=1000):
        name = a.get("name") or ""
        if name.startswith(f"SERVE_REPLICA::{APP}#Recommender#") and a.get("pid"):
            try:
                out[name.split("#")[-1]] = psutil.Process(a["pid"]).memory_info().rss / 2**20
            except psutil.Error:
                pass
    return out


def minute_table(results: list, rss: list[dict], t0: float, minutes: int) -> tuple[str, dict]:
    import numpy as np

    lines = [f"{'minute':>6} {'requests':>9} {'unexpected':>11} {'by status':<22} {'p50 ms':>8} {'p99 ms':>8}  "
             "replica RSS MB"]
    totals = {"requests": 0, "unexpected": 0, "by_status": {}}
    for m in range(minutes):
        rows = [r for r in results if t0 + 60 * m <= r[0] < t0 + 60 * (m + 1)]
        bad = [r for r in rows if r[2] != r[3] or not r[4]]
        by: dict = {}
        for r in bad:
            key = f"{r[2]}" + ("" if r[4] or r[2] == -1 else " not JSON")
            by[key] = by.get(key, 0) + 1
        lat = np.array([r[1] * 1000 for r in rows if r[3] == 200 and r[2] == 200])
        p50, p99 = (np.percentile(lat, 50), np.percentile(lat, 99)) if len(lat) else (float("nan"),) * 2
        mem = " ".join(f"{k}:{v:.0f}" for k, v in sorted(rss[m].items())) if m < len(rss) else ""
        lines.append(f"{m + 1:>6} {len(rows):>9} {len(bad):>11} {json.dumps(by) if by else '-':<22} {p50:>8.0f} "
                     f"{p99:>8.0f}  {mem}")
        totals["requests"] += len(rows)
        totals["unexpected"] += len(bad)
        for k, v in by.items():
            totals["by_status"][k] = totals["by_status"].get(k, 0) + v
    return "\n".join(lines), totals


def rss_growth(rss: list[dict]) -> float:
    """Growth (%) of each replica's RSS from its second sampled minute (the first minute is warm-up) to its
    last, the largest over the replicas that lived at least three samples; nan when none did."""
    series: dict = {}
    for sample in rss:
        for k, v in sample.items():
            series.setdefault(k, []).append(v)
    growth = [100 * (s[-1] - s[1]) / s[1] for s in series.values() if len(s) >= 3]
    return max(growth) if growth else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.bench_soak", description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", default="runs/demo/bundle", help="the bundle to serve (default runs/demo/bundle)")
    ap.add_argument("--minutes", type=int, default=10)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--replicas", type=int, default=2, help="model replicas (min = max)")
    ap.add_argument("--layout", default="auto", choices=("auto", "fused", "split"))
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from recflm.serve import set_throughput_env

    set_throughput_env()
    import httpx
    import pandas as pd
    import ray
    from ray import serve

    from recflm.runtime import free_port
    from recflm.serve import ServeConfig, run

    if not (Path(args.bundle) / "manifest.json").is_file():
        print(f"bench_soak: error: {args.bundle} is not a bundle (make demo writes runs/demo/bundle)")
        return 2
    ray.init(address="local", num_cpus=max(4, args.replicas + 2), log_to_driver=False, include_dashboard=True)
    cfg = ServeConfig(bundle=args.bundle, name=APP, port=free_port(), min_replicas=args.replicas,
                      max_replicas=args.replicas, num_cpus=0.5, threads=1, layout=args.layout, auth_token_env="")
    url = run(cfg, log=print)
    info = httpx.get(url + "/v1/model", timeout=60).json()
    users = pd.read_parquet(info["histories"], columns=["user"])["user"].astype(str).tolist()[:500]
    items = pd.read_parquet(Path(args.bundle) / "items.parquet", columns=["item"])["item"].astype(str).tolist()
    mix = request_mix(users, items, args.k)
    second = Path(tempfile.mkdtemp(prefix="recflm_soak_")) / "bundle"
    shutil.copytree(args.bundle, second)
    manifest = json.loads((second / "manifest.json").read_text())
    (second / "manifest.json").write_text(json.dumps({**manifest, "soak_rollout": time.time()}))

    results: list = []
    stop = threading.Event()
    threads = [threading.Thread(target=client, args=(url, mix, items, stop, results, s), daemon=True)
               for s in range(args.clients)]
    t0 = time.time()
    for t in threads:
        t.start()
    rss: list[dict] = []
    events = []
    end = t0 + 60 * args.minutes
    killed = rolled = False
    next_sample = t0 + 30
    while time.time() < end:
        now = time.time()
        if not killed and now >= t0 + KILL_AT * (end - t0):
            victims = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                             if a["name"].startswith(f"SERVE_REPLICA::{APP}#Recommender#"))
            ray.kill(ray.get_actor(victims[0], namespace="serve"), no_restart=True)
            events.append(f"minute {(now - t0) / 60:.1f}: killed replica {victims[0].split('#')[-1]}")
            killed = True
        if not rolled and now >= t0 + ROLLOUT_AT * (end - t0):
            run(dataclasses.replace(cfg, bundle=str(second)), log=lambda *a: None)
            events.append(f"minute {(now - t0) / 60:.1f}: rolled out {second}")
            rolled = True
        if now >= next_sample:  # the middle of each minute
            rss.append(replica_rss())
            next_sample += 60
        time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(timeout=90)
    final = httpx.get(url + "/v1/model", timeout=60).json()
    serve.shutdown()

    table, totals = minute_table(results, rss, t0, args.minutes)
    growth = rss_growth(rss)
    print(f"\nbench_soak: {args.minutes} min, {args.clients} clients, {args.replicas} replica(s), layout "
          f"{final['limits']['layout']}, bundle {args.bundle}; {os.cpu_count()} cores")
    for e in events:
        print("  " + e)
    print(f"  model version before {info['model_version']}, after {final['model_version']}")
    print(table)
    for r in [r for r in results if r[2] != r[3] or not r[4]][:10]:
        print(f"  unexpected at minute {(r[0] - t0) / 60:.2f}: {r[5]} answered {r[2]} (expected {r[3]}), "
              f"{'JSON' if r[4] else 'not JSON'}{' ' + r[6] if len(r) > 6 and r[6] else ''}")
    print(f"unexpected answers by status: {json.dumps(totals['by_status']) if totals['by_status'] else 'none'}; "
          f"largest replica RSS growth after the first minute {growth:.1f}% (target <= 5%)")
    print(f"SUMMARY bench_soak requests={totals['requests']} unexpected={totals['unexpected']} "
          f"rss_growth={growth:.1f}% minutes={(time.time() - t0) / 60:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
