"""Benchmark: recflm serve (Ray Serve, batched constrained beam search, autoscaling) against a naive
server (plain FastAPI + uvicorn calling Hugging Face ``generate`` once per request, no batching, no
catalog constraint) on the same bundle, side by side in one run.

Both answer ``POST /v1/recommend {"user": U, "k": K}`` for the dataset's known users (top-K at beam
``--beams``). A closed-loop load generator (C clients, each sending its next request when the last
one is answered) runs at each concurrency against each server, the two taking turns in short
windows after an unmeasured spell of load on recflm (``--settle``) in which its autoscaler settles on
the replica count that load asks for; the table shows req/s, p50, p99, errors and replicas for each,
and the throughput ratio. First, a load step against recflm alone: from 1 model replica, heavy load
until the deployment reaches its maximum, then idle until it is back at its minimum, printing the
replica count over time.

recflm runs as ``recflm serve`` does by default: Serve's HAProxy ingress and throughput-optimized
data plane, the split layout (an ingress deployment in front of the model replicas; ``--layout fused``
makes each replica the HTTP ingress and the model), one torch thread per replica (replicas, not threads,
take the cores).

    python -m jobs.bench_serve --bundle runs/demo/bundle      # a trained bundle
    python -m jobs.bench_serve                                # an untrained mini model (built here)
"""

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

APP = "bench"


# ----------------------------------------------------------------------------- the naive server
def naive_server(bundle: str, port: int, beams: int, threads: int) -> None:
    """FastAPI + uvicorn, one ``model.generate`` per request, unconstrained (may invent IDs)."""
    import torch
    import uvicorn
    from fastapi import FastAPI
    from pydantic import BaseModel

    from recflm.serve_model import ModelState

    torch.set_num_threads(threads)
    st = ModelState(bundle)
    app = FastAPI()

    class Req(BaseModel):
        user: str
        k: int = 10

    @app.post("/v1/recommend")
    def recommend(req: Req):  # a plain def: uvicorn runs it in its thread pool
        hist = st.histories[req.user]
        shown = hist[-st.max_prompt_history:]
        prompt = st.t_seq.source.format(user=req.user, history=", ".join(st.ids[i] for i in shown))
        enc = st.bundle.tokenizer.encode_batch([prompt], st.max_source_len)
        with torch.no_grad():
            out = st.bundle.model.generate(**enc, num_beams=beams, num_return_sequences=req.k,
                                           max_new_tokens=st.trie.depth, do_sample=False, early_stopping=False)
        texts = [st.bundle.tokenizer.decode(row) for row in out]
        valid = set(st.ids)
        return {"items": [{"id": t, "valid": t in valid} for t in texts]}

    @app.get("/v1/health")
    def health():
        return {"status": "ok"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ----------------------------------------------------------------------------- load generation
async def closed_loop(url: str, bodies: list[dict], concurrency: int, seconds: float,
                      path: str = "/v1/recommend") -> dict:
    import httpx

    lat, errors, invalid = [], 0, 0
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def worker(w: int):
            nonlocal errors, invalid
            n = w
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                try:
                    r = await client.post(path, json=bodies[n % len(bodies)])
                    ok = r.status_code == 200
                    if ok:
                        invalid += sum(1 for it in r.json()["items"] if it.get("valid") is False)
                except httpx.HTTPError:
                    ok = False
                lat.append(time.perf_counter() - t0) if ok else None
                errors += 0 if ok else 1
                n += concurrency

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        wall = time.perf_counter() - t0
    return summarize(lat, wall, errors, invalid)


def summarize(lat: list, wall: float, errors: int, invalid: int) -> dict:
    lat = sorted(lat)
    pick = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000) if lat else (lambda q: float("nan"))
    return {"rps": len(lat) / wall, "p50": pick(0.50), "p99": pick(0.99), "errors": errors, "n": len(lat),
            "invalid": invalid, "lat": lat, "wall": wall}


def merge(parts: list[dict]) -> dict:
    return summarize([x for p in parts for x in p["lat"]], sum(p["wall"] for p in parts),
                     sum(p["errors"] for p in parts), sum(p["invalid"] for p in parts))


def running_replicas(name: str = APP) -> int:
    from ray import serve

    app = serve.status().applications.get(name)
    dep = app.deployments.get("Recommender") if app else None
    return int(dep.replica_states.get("RUNNING", 0)) if dep else 0


async def load_step(url: str, bodies: list[dict], concurrency: int, max_replicas: int, min_replicas: int,
                    limit_s: float) -> tuple[list, float | None, float | None]:
    """Heavy load until the deployment reaches max_replicas (or limit_s), then idle until it is back at
    min_replicas (or limit_s): the replica count every second, and the two times."""
    timeline, t0 = [], time.perf_counter()
    up = down = None
    load = asyncio.create_task(closed_loop(url, bodies, concurrency, limit_s))
    while not load.done():
        n = await asyncio.to_thread(running_replicas)
        now = time.perf_counter() - t0
        timeline.append((now, n, "load"))
        if n >= max_replicas and up is None:
            up = now
        if up is not None and now - up > 5:  # held at the maximum for a few seconds: end the load
            break
        await asyncio.sleep(1)
    load.cancel()
    try:
        await load
    except (asyncio.CancelledError, Exception):
        pass
    t1 = time.perf_counter()
    while time.perf_counter() - t1 < limit_s:
        n = await asyncio.to_thread(running_replicas)
        timeline.append((time.perf_counter() - t0, n, "idle"))
        if n <= min_replicas:
            down = time.perf_counter() - t1
            break
        await asyncio.sleep(1)
    return timeline, up, down


# ----------------------------------------------------------------------------- setup
def untrained_bundle(preset: str, data_dir: str | None, out: Path, log=print) -> str:
    """A bundle with an untrained model of ``preset`` (timing only: the answers are noise)."""
    import torch

    from recflm.bundle import save_bundle
    from recflm.config import PrepareConfig
    from recflm.dataset import PreparedData
    from recflm.evaluate import EvalConfig, build_rows
    from recflm.model import build_model
    from recflm.prepare import run as run_prepare
    from recflm.prompts import TEMPLATES_DIR
    from recflm.tokenizer import train_tokenizer

    if not data_dir:
        data_dir = str(out / "data")
        log(f"bench_serve: preparing the bundled MovieLens data in {data_dir}")
        run_prepare(PrepareConfig(out=data_dir), log=lambda *a: None)
    data = PreparedData.open(data_dir)
    rows, _ = build_rows(data_dir, str(TEMPLATES_DIR), EvalConfig(max_users=200, text_examples=1),
                         log=lambda *a: None)
    tok = train_tokenizer(list(rows["source"]) + data.id_texts, 4000)
    torch.manual_seed(0)
    model = build_model(preset, tok.vocab_size, tok.pad_id, tok.eos_id).eval()
    manifest = {"data": {"path": str(Path(data_dir).resolve())}, "note": f"untrained {preset}, for timing"}
    return str(save_bundle(out / "bundle", model, tok, data.catalog, manifest))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", help="bundle to serve (default: an untrained model of --preset)")
    ap.add_argument("--data", help="prepared dataset for the untrained bundle (default: prepare the bundled data)")
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts")
    ap.add_argument("--seconds", type=float, default=15.0, help="load per concurrency and server")
    ap.add_argument("--rounds", type=int, default=3, help="alternating windows per concurrency (load drift)")
    ap.add_argument("--settle", type=float, default=20.0, help="unmeasured load on recflm before each concurrency's "
                    "windows, so that the autoscaler reaches the replica count that load asks for")
    ap.add_argument("--target-ongoing", type=float, default=4.0, help="recflm's autoscaling target of ongoing "
                    "requests per replica")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--beams", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per recflm model replica (replicas, "
                    "not threads, use the cores: see --max-replicas)")
    ap.add_argument("--naive-threads", type=int, default=os.cpu_count() or 2,
                    help="torch threads of the naive server (default: one per core)")
    ap.add_argument("--max-replicas", type=int, default=2)
    ap.add_argument("--layout", default="auto", choices=("auto", "fused", "split"), help="recflm's deployments: "
                    "the ingress and the model in one (fused: the fastest on a small CPU box) or two (split; auto, "
                    "the default, is split)")
    ap.add_argument("--no-throughput-mode", action="store_true", help="Serve's default Python HTTP proxy and "
                    "data plane instead of its HAProxy ingress and throughput-optimized data plane")
    ap.add_argument("--dtype", default="float32", help="recflm's served weights: float32, bfloat16 or int8 "
                    "(the naive server always runs the bundle's float32 model)")
    ap.add_argument("--step-concurrency", type=int, default=48)
    ap.add_argument("--step-limit", type=float, default=90.0, help="longest the load step may wait each way")
    ap.add_argument("--naive-server", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.naive_server:
        naive_server(args.bundle, args.port, args.beams, args.naive_threads)
        return 0

    # faster autoscaling signals (must be set before Ray starts, so that Serve's processes inherit them)
    for side in ("HANDLE", "REPLICA"):
        os.environ.setdefault(f"RAY_SERVE_{side}_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from recflm.serve import set_throughput_env

    if not args.no_throughput_mode:
        set_throughput_env()
    import httpx
    import pandas as pd
    import ray
    from ray import serve

    from recflm.runtime import ensure_ray, free_port
    from recflm.serve import ServeConfig, run

    t_start = time.perf_counter()
    # a local Ray of its own, with logical CPUs for every replica at the maximum
    ray.init(address="local", num_cpus=8, log_to_driver=False, include_dashboard=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": str(args.threads)}})
    ensure_ray()  # quiet Ray Data logging, as the CLI does
    work = Path(tempfile.mkdtemp(prefix="recflm_bench_serve_"))
    bundle = args.bundle or untrained_bundle(args.preset, args.data, work)
    which = args.bundle or f"untrained {args.preset} (built in {work})"
    cfg = ServeConfig(bundle=bundle, name=APP, port=free_port(), beams=args.beams, default_k=args.k,
                      threads=args.threads, num_cpus=1.0, dtype=args.dtype, layout=args.layout,
                      throughput_mode=not args.no_throughput_mode, min_replicas=1,
                      max_replicas=args.max_replicas,
                      max_batch_size=16, max_ongoing_requests=32, target_ongoing_requests=args.target_ongoing,
                      upscale_delay_s=3, downscale_delay_s=10, look_back_period_s=12, auth_token_env="")
    url = run(cfg, log=lambda *a: None)
    info = httpx.get(url + "/v1/model", timeout=60).json()
    users = pd.read_parquet(Path(info["histories"]), columns=["user"])["user"].astype(str).tolist()[:200]
    bodies = [{"user": u, "k": args.k} for u in users]

    naive_port = free_port()
    naive = subprocess.Popen([sys.executable, "-m", "jobs.bench_serve", "--naive-server", "--bundle", bundle,
                              "--port", str(naive_port), "--beams", str(args.beams), "--naive-threads",
                              str(args.naive_threads)], env={**os.environ, "OMP_NUM_THREADS": str(args.naive_threads)})
    naive_url = f"http://127.0.0.1:{naive_port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(naive_url + "/v1/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or naive.poll() is not None:
                raise RuntimeError("the naive server did not start")
            time.sleep(1)

        # the load step first, from a fresh deployment at 1 replica
        asyncio.run(closed_loop(url, bodies, 4, 3))  # warm-up
        timeline, up, down = asyncio.run(load_step(url, bodies, args.step_concurrency, args.max_replicas,
                                                   cfg.min_replicas, args.step_limit))
        rows = []
        asyncio.run(closed_loop(naive_url, bodies, 2, 2))  # warm-up
        for c in [int(x) for x in args.concurrency.split(",")]:
            # the two servers take turns in short windows, so that drifting machine load hits both alike
            parts = {"ours": [], "naive": []}
            if args.settle > 0:
                asyncio.run(closed_loop(url, bodies, c, args.settle))
            for _ in range(args.rounds):
                parts["naive"].append(asyncio.run(closed_loop(naive_url, bodies, c, args.seconds / args.rounds)))
                parts["ours"].append(asyncio.run(closed_loop(url, bodies, c, args.seconds / args.rounds)))
            rows.append((c, merge(parts["ours"]), merge(parts["naive"]), running_replicas()))
    finally:
        naive.terminate()
        naive.wait(timeout=30)
        serve.delete(APP)
        ray.shutdown()

    def ratio(o, n):
        return o["rps"] / max(n["rps"], 1e-9)

    def secs(x):
        return f"{x:.0f} s" if x is not None else f"not within {args.step_limit:.0f} s"

    print(f"\nbench_serve: bundle {which}; top-{args.k} at beam {args.beams}; {args.seconds:.0f} s closed loop "
          f"per level; {os.cpu_count()} cores; recflm: layout {cfg.layout}, "
          f"{'HAProxy ingress + throughput-optimized data plane' if not args.no_throughput_mode else 'Python proxy'}, "
          f"{args.threads} torch thread(s) per model replica, weights {args.dtype}, autoscaling 1-{args.max_replicas} "
          f"replicas at {args.target_ongoing:g} ongoing requests each ({args.settle:.0f} s of load before each level); "
          f"naive: {args.naive_threads} threads")
    head = (f"{'clients':>7} | {'recflm req/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'err':>4} {'repl':>4} | "
            f"{'naive req/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'err':>4} | {'ratio':>6}")
    print(head)
    print("-" * len(head))
    for c, o, n, reps in rows:
        print(f"{c:>7} | {o['rps']:>12.1f} {o['p50']:>8.0f} {o['p99']:>8.0f} {o['errors']:>4} {reps:>4} | "
              f"{n['rps']:>11.1f} {n['p50']:>8.0f} {n['p99']:>8.0f} {n['errors']:>4} | {ratio(o, n):>5.1f}x")
    naive_items = sum(n["n"] * args.k for _, _, n, _ in rows)
    naive_invalid = sum(n["invalid"] for _, _, n, _ in rows)
    print(f"naive answers: {naive_invalid} of {naive_items} items not in the catalog (recflm: none, by construction)")
    changes = [f"{t:.0f}s:{n}({phase})" for i, (t, n, phase) in enumerate(timeline)
               if i == 0 or n != timeline[i - 1][1] or phase != timeline[i - 1][2]]
    print(f"load step ({args.step_concurrency} clients, then idle), RUNNING model replicas over time: "
          + " ".join(changes))
    print(f"scale-up 1 -> {args.max_replicas}: {secs(up)}; back to {cfg.min_replicas} after the load: {secs(down)}")
    best = max(rows, key=lambda r: ratio(r[1], r[2]))
    c, o, n, _ = rows[-1]
    errors = sum(r[1]["errors"] for r in rows)
    print(f"SUMMARY bench_serve {ratio(o, n):.1f}x naive throughput at {c} clients ({o['rps']:.1f} vs {n['rps']:.1f} "
          f"req/s, p99 {o['p99']:.0f} vs {n['p99']:.0f} ms), best {ratio(best[1], best[2]):.1f}x at {best[0]}; "
          f"recflm errors {errors}; scale-up {secs(up)}, scale-down {secs(down)}; "
          f"total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
