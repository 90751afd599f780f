"""Benchmark: the review family of recflm against the review baselines, on the Amazon Fine Food sample.

Runs the three stages in-process — ``recflm.prepare.run`` with ``jobs/configs/prepare_finefood.yaml`` (no
k-core; a share of the one-off reviewers held out whole into valid / test: ``holdout_short_users``),
``recflm.train.run`` with ``jobs/configs/review_finefood.yaml`` (the text families; ``key=value`` overrides on
top) and ``recflm.evaluate.run`` on the review and rating families with the baselines — then prints one table and a
summary line. The table has a row per method: the review summary task's BLEU-4, ROUGE-1/2/L (recflm, lead,
nearest) and the review star rating's RMSE and MAE (recflm, nearest, means, bow-ridge), on the test split's
held-out users, every method on the same rows.

    python -m jobs.bench_review                                        # ../shared's Fine Food sample
    python -m jobs.bench_review --budget-minutes 30 --examples 1000 lr=0.001
    python -m jobs.bench_review --data path/to/Reviews.csv.gz --out runs/finefood_full

Time budget (``--budget-minutes N``, default 20): recflm training gets ``max_minutes`` = 60% of N; the rest is
for preparing, the model's evaluation inference and the baselines (seconds). Under ``--out DIR`` (default
runs/bench_review): ``data/``, ``train/``, ``bundle/``, ``metrics_test.json`` and ``bench_review.json``. The last
line printed is ``SUMMARY bench_review rougeL recflm=X lead=Y nearest=Z rmse recflm=A means=B bow_ridge=C
minutes=M``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

TRAIN_SHARE = 0.6  # of --budget-minutes: recflm training's max_minutes
PREPARE_CONFIG = "jobs/configs/prepare_finefood.yaml"
RECIPE = "jobs/configs/review_finefood.yaml"
METHODS = ["recflm", "lead", "nearest", "means", "bow-ridge"]
COLUMNS = [("BLEU-4", "review", "BLEU-4"), ("ROUGE-1", "review", "ROUGE-1"), ("ROUGE-2", "review", "ROUGE-2"),
           ("ROUGE-L", "review", "ROUGE-L"), ("rating RMSE", "review-rating", "RMSE"),
           ("rating MAE", "review-rating", "MAE")]


def _value(results: dict, method: str, task: str, metric: str):
    v = results.get(method, {}).get(task, {}).get(metric)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def format_review_table(results: dict) -> str:
    """One row per method (those present), one column per metric of ``COLUMNS`` (— where a method has none)."""
    methods = [m for m in METHODS if m in results]
    n = {t: next((results[m][t]["n"] for m in methods if t in results[m]), 0) for t in ("review", "review-rating")}
    w = max(len("method"), *(len(m) for m in methods)) if methods else len("method")
    head = f"{'method':<{w}}" + "".join(f"{h:>13}" for h, _, _ in COLUMNS)
    lines = [f"review family on the test split: summaries n={n['review']}, star ratings n={n['review-rating']}",
             head, "-" * len(head)]
    for m in methods:
        cells = [_value(results, m, t, k) for _, t, k in COLUMNS]
        lines.append(f"{m:<{w}}" + "".join(f"{'—' if v is None else f'{v:.4f}':>13}" for v in cells))
    return "\n".join(lines)


def summary_line(results: dict, minutes: float) -> str:
    fmt = lambda v: "nan" if v is None else f"{v:.4f}"  # noqa: E731
    rl = {m: _value(results, m, "review", "ROUGE-L") for m in ("recflm", "lead", "nearest")}
    rm = {m: _value(results, m, "review-rating", "RMSE") for m in ("recflm", "means", "bow-ridge")}
    return (f"SUMMARY bench_review rougeL recflm={fmt(rl['recflm'])} lead={fmt(rl['lead'])} "
            f"nearest={fmt(rl['nearest'])} rmse recflm={fmt(rm['recflm'])} means={fmt(rm['means'])} "
            f"bow_ridge={fmt(rm['bow-ridge'])} minutes={minutes:.1f}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m jobs.bench_review", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="key=value overrides apply to the pretrain (TrainConfig) recipe.")
    ap.add_argument("--data", metavar="FILE", help="the Fine Food CSV (default: the prepare config's source)")
    ap.add_argument("--out", default="runs/bench_review", metavar="DIR", help="output directory")
    ap.add_argument("--budget-minutes", type=float, default=20.0, metavar="N",
                    help="time budget: 60%% to recflm training (0: the recipe's own limits)")
    ap.add_argument("--examples", type=int, default=500, metavar="N",
                    help="evaluation examples per text task (0: all)")
    ap.add_argument("--prepare-config", default=PREPARE_CONFIG, metavar="FILE")
    ap.add_argument("--recipe", default=RECIPE, metavar="FILE", help="pretrain config (TrainConfig keys)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="pretrain config overrides, e.g. lr=0.001")
    return ap


def parse_args(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.budget_minutes < 0:
        ap.error("--budget-minutes must be >= 0")
    if args.examples < 0:
        ap.error("--examples must be >= 0")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        ap.error(f"override {bad[0]!r} is not of the form key=value")
    return args


def configs(args, stamp: int | None = None):
    """(prepare, train, evaluate) configs of ``args``; no work done."""
    from recflm.config import PrepareConfig, load_config
    from recflm.evaluate import EvalConfig
    from recflm.train import TrainConfig

    out = Path(args.out)
    pcfg = load_config(PrepareConfig, args.prepare_config, [f"out={out / 'data'}"])
    if args.data:
        pcfg.sources = [{**pcfg.sources[0], "path": args.data}]
    given = {o.split("=", 1)[0].strip() for o in args.overrides}
    tcfg = load_config(TrainConfig, args.recipe, args.overrides)
    defaults = {"data": pcfg.out, "out": str(out / "bundle"), "storage_path": str((out / "train").resolve()),
                "name": f"bench_review_{stamp if stamp is not None else int(time.time())}"}
    for key, value in defaults.items():
        if key not in given:
            setattr(tcfg, key, value)
    if args.budget_minutes and "max_minutes" not in given:
        tcfg.max_minutes = round(TRAIN_SHARE * args.budget_minutes, 2)
    ecfg = EvalConfig(bundle=tcfg.out, data=tcfg.data, split="test", baselines=True,
                      families=[f for f in ("review", "rating") if f in tcfg.families] or ["review"],
                      text_examples=args.examples, out=str(out / "metrics_test.json"))
    return pcfg, tcfg, ecfg


def main(argv=None) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    args = parse_args(argv)
    from recflm.config import ConfigError
    from recflm.prepare import PrepareError
    from recflm.readers import SourceError

    try:
        return _run(args)
    except (ConfigError, SourceError, PrepareError, FileNotFoundError) as e:
        print(f"bench_review: error: {e}")
        return 2


def _run(args) -> int:
    from recflm.config import to_dict
    from recflm.evaluate import run as run_evaluate
    from recflm.prepare import format_stats, run as run_prepare
    from recflm.train import run as run_train

    t_all = time.perf_counter()
    pcfg, tcfg, ecfg = configs(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    seconds = {}
    t = time.perf_counter()
    stats = run_prepare(pcfg)
    seconds["prepare"] = time.perf_counter() - t
    print(format_stats(stats))
    if "review" not in stats["families"]:
        print("bench_review: error: the prepared data has no review family (a source with text and summary or "
              "rating is needed)")
        return 2
    t = time.perf_counter()
    ecfg.bundle = str(run_train(tcfg))
    seconds["pretrain"] = time.perf_counter() - t
    t = time.perf_counter()
    results = run_evaluate(ecfg)["results"]
    seconds["evaluate"] = time.perf_counter() - t
    minutes = (time.perf_counter() - t_all) / 60
    print("\n" + format_review_table(results))
    print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    (Path(args.out) / "bench_review.json").write_text(json.dumps(
        {"results": results, "seconds": seconds, "stats": stats, "prepare": to_dict(pcfg), "train": to_dict(tcfg),
         "evaluate": to_dict(ecfg)}, indent=2, default=float))
    print(summary_line(results, minutes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
