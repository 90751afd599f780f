"""Benchmark: ``POST /v1/candidates`` (the two-tower: one matrix product over the catalog) against
``POST /v1/recommend`` (constrained beam search of the generative model) on the same service and bundle.

A closed-loop load generator (C clients, each sending its next request when the last one is answered) runs
at each concurrency (``--concurrency``, default 1 and 8) against each route, the two taking turns in short
windows (``--rounds``) so that drifting machine load hits both alike; the known users of the bundle's
dataset ask for their top ``--k``. One table: req/s, p50 and p99 latency and errors per route, and the
speed-up; the last line is ``SUMMARY bench_candidates ...``.

The bundle needs a candidate model: without one (no ``candidates.json``) the bench copies the bundle into
its work directory and trains one there (``recflm candidates``, ``--train-minutes``), leaving yours as it was.

    python -m jobs.bench_candidates --bundle runs/demo/bundle
    python -m jobs.bench_candidates                            # an untrained mini bundle (timing only), built here
"""
import argparse
import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path

from jobs.bench_serve import closed_loop, merge, untrained_bundle

APP = "bench-candidates"
ROUTES = ("/v1/candidates", "/v1/recommend")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.bench_candidates", description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", help="bundle to serve (default: an untrained model of --preset)")
    ap.add_argument("--data", help="prepared dataset for the untrained bundle (default: prepare the bundled data)")
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--concurrency", default="1,8", help="comma-separated client counts")
    ap.add_argument("--seconds", type=float, default=10.0, help="load per concurrency and route")
    ap.add_argument("--rounds", type=int, default=2, help="alternating windows per concurrency")
    ap.add_argument("--k", type=int, default=10, help="items asked for on both routes")
    ap.add_argument("--beams", type=int, default=20)
    ap.add_argument("--layout", default="fused", choices=("auto", "fused", "split"))
    ap.add_argument("--replicas", type=int, default=1, help="model replicas (fixed: no autoscaling)")
    ap.add_argument("--train-minutes", type=float, default=1.0, help="training budget of a candidate model the "
                    "bench trains itself (the bundle has none)")
    args = ap.parse_args(argv)
    if args.seconds <= 0 or args.rounds < 1 or args.k < 1:
        ap.error("--seconds must be > 0, --rounds and --k >= 1")
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    if not levels or min(levels) < 1:
        ap.error("--concurrency: comma-separated client counts >= 1")

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from recflm.serve import set_throughput_env

    set_throughput_env()
    import httpx
    import pandas as pd
    import ray
    from ray import serve

    from recflm.candidates import CandidatesConfig, run as train_candidates
    from recflm.runtime import ensure_ray, free_port
    from recflm.serve import ServeConfig, run

    t_start = time.perf_counter()
    ray.init(address="local", num_cpus=8, log_to_driver=False, include_dashboard=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    ensure_ray()
    work = Path(tempfile.mkdtemp(prefix="recflm_bench_candidates_"))
    bundle = args.bundle or untrained_bundle(args.preset, args.data, work)
    which = args.bundle or f"untrained {args.preset} (built in {work})"
    if not (Path(bundle) / "candidates.json").is_file():
        copy = work / "with_candidates"
        shutil.copytree(bundle, copy)
        print(f"bench_candidates: {bundle} has no candidate model: training one into {copy} "
              f"({args.train_minutes:g} min at most)")
        train_candidates(CandidatesConfig(bundle=str(copy), minutes=args.train_minutes), log=lambda *a: None)
        bundle = str(copy)
    cfg = ServeConfig(bundle=bundle, name=APP, port=free_port(), beams=args.beams, default_k=min(args.k, args.beams),
                      threads=1, num_cpus=1.0, layout=args.layout, min_replicas=args.replicas,
                      max_replicas=args.replicas, max_batch_size=16, max_ongoing_requests=32,
                      target_ongoing_requests=4, auth_token_env="")
    url = run(cfg, log=lambda *a: None)
    info = httpx.get(url + "/v1/model", timeout=60).json()
    users = pd.read_parquet(Path(info["histories"]), columns=["user"])["user"].astype(str).tolist()[:200]
    bodies = {"/v1/candidates": [{"user": u, "k": args.k} for u in users],
              "/v1/recommend": [{"user": u, "k": min(args.k, args.beams)} for u in users]}
    rows = []
    try:
        for route in ROUTES:  # warm-up, unmeasured
            asyncio.run(closed_loop(url, bodies[route], 2, 2, path=route))
        for c in levels:
            parts = {r: [] for r in ROUTES}
            for _ in range(args.rounds):
                for route in ROUTES:
                    parts[route].append(asyncio.run(closed_loop(url, bodies[route], c, args.seconds / args.rounds,
                                                                path=route)))
            rows.append((c, merge(parts["/v1/candidates"]), merge(parts["/v1/recommend"])))
    finally:
        serve.delete(APP)
        ray.shutdown()

    print(f"\nbench_candidates: bundle {which}; top-{args.k} (recommend at beam {args.beams}); {args.seconds:g} s "
          f"closed loop per level and route in {args.rounds} alternating windows; layout {args.layout}, "
          f"{args.replicas} model replica(s), {os.cpu_count()} cores")
    head = (f"{'clients':>7} | {'candidates req/s':>16} {'p50 ms':>8} {'p99 ms':>8} {'err':>4} | "
            f"{'recommend req/s':>15} {'p50 ms':>8} {'p99 ms':>8} {'err':>4} | {'p50 speed-up':>12}")
    print(head)
    print("-" * len(head))
    for c, a, b in rows:
        print(f"{c:>7} | {a['rps']:>16.1f} {a['p50']:>8.1f} {a['p99']:>8.1f} {a['errors']:>4} | "
              f"{b['rps']:>15.1f} {b['p50']:>8.1f} {b['p99']:>8.1f} {b['errors']:>4} | "
              f"{b['p50'] / max(a['p50'], 1e-9):>11.1f}x")
    parts = " ".join(f"c{c}=p50 {a['p50']:.1f}/{b['p50']:.1f}ms,{a['rps']:.0f}/{b['rps']:.0f}rps" for c, a, b in rows)
    errors = sum(a["errors"] + b["errors"] for _, a, b in rows)
    print(f"SUMMARY bench_candidates candidates/recommend {parts} errors={errors} "
          f"total={time.perf_counter() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
