"""Benchmark: recommendation quality of recflm against popularity, two-tower and SASRec, on any data.

Runs the three stages in-process on the data you name — ``recflm.prepare.run`` (clean, k-core,
leave-one-out split: last item = test, second-to-last = validation), ``recflm.train.run`` with the
quality recipe (``jobs/configs/pretrain_quality.yaml`` by default, ``key=value`` overrides on top) and
``recflm.evaluate.run`` with the baselines — then prints the wall time of each stage, one table and a
summary line. The table has a row per method and, for sequential full ranking on the test split (every
user, the catalog ranked, the user's earlier items excluded), HR@5, HR@10, NDCG@5 and NDCG@10, then
NDCG@10 of the direct 1-of-100 protocol and the rating RMSE where the data has them (— otherwise).

    python -m jobs.bench_quality --bundled                                 # the bundled MovieLens data
    python -m jobs.bench_quality --table Toys_and_Games_interactions.csv.gz --columns user=user,item=item,ts=ts \\
        --items Toys_and_Games_items.csv.gz --item-columns item=item,attrs=attributes --out runs/toys --budget-minutes 90 lr=0.001
    make bench-quality

Time budget (``--budget-minutes N``, default 60; 0 = no limits): recflm training gets ``max_minutes`` =
50% of N (it stops then and exports its best epoch), SASRec's training gets ``sasrec_minutes`` = 20% of
N (it also stops early on validation NDCG@10), and the remaining 30% is the reserve for preparing the
data, the model's evaluation inference and the other two baselines. Both trainings may stop earlier,
by their own early stopping. Nothing here depends on the data set: any table with user, item and ts
columns (rating, text, summary optional) runs unchanged.

Under ``--out DIR`` (default runs/quality): ``data/`` (the prepared dataset), ``train/`` (Ray Train
storage; the run is named ``bench_quality_<time>``, so a rerun starts afresh), ``bundle/`` (the
model), ``metrics_test.json`` (the evaluate stage's output) and ``bench_quality.json`` (every result,
the stage times and the settings). The last line printed is
``SUMMARY bench_quality ndcg10 recflm=X sasrec=Y popularity=Z ratio=X/Y minutes=M``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from pathlib import Path

TRAIN_SHARE = 0.5  # of --budget-minutes: recflm training's max_minutes
SASREC_SHARE = 0.2  # of --budget-minutes: SASRec's sasrec_minutes (the rest: prepare, inference, baselines)
METHODS = ["recflm", "popularity", "two-tower", "SASRec"]
# (header, task, metric) of the table's columns
COLUMNS = [("HR@5", "sequential/seen", "HR@5"), ("HR@10", "sequential/seen", "HR@10"),
           ("NDCG@5", "sequential/seen", "NDCG@5"), ("NDCG@10", "sequential/seen", "NDCG@10"),
           ("direct NDCG@10", "direct", "NDCG@10"), ("rating RMSE", "rating", "RMSE")]
RESERVED_TRAIN_KEYS = ("data", "out", "storage_path", "name")  # set by the bench unless overridden


def _value(results: dict, method: str, task: str, metric: str):
    v = results.get(method, {}).get(task, {}).get(metric)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def format_quality_table(results: dict, methods: list[str] | None = None) -> str:
    """One row per method (``recflm`` and the baselines, those present), one column per metric of
    ``COLUMNS``; a metric the method or the data does not have is shown as —."""
    order = methods or METHODS
    methods = [m for m in order if m in results] + [m for m in results if m not in order]
    n = next((results[m]["sequential/seen"]["n"] for m in methods if "n" in results[m].get("sequential/seen", {})),
             None)
    w = max([len("method")] + [len(m) for m in methods])
    head = f"{'method':<{w}}" + "".join(f"{h:>16}" for h, _, _ in COLUMNS)
    lines = [f"sequential full ranking on the test split ({n if n is not None else '?'} users, seen items "
             f"excluded); direct: 1 of 100 candidates", head, "-" * len(head)]
    for m in methods:
        cells = [_value(results, m, t, k) for _, t, k in COLUMNS]
        lines.append(f"{m:<{w}}" + "".join(f"{'—' if v is None else f'{v:.4f}':>16}" for v in cells))
    return "\n".join(lines)


def summary_line(results: dict, minutes: float) -> str:
    """``SUMMARY bench_quality ndcg10 recflm=X sasrec=Y popularity=Z ratio=X/Y minutes=M``: sequential
    full-ranking NDCG@10 on the test split; ratio = recflm / SASRec (nan without a SASRec figure)."""
    x, y, z = (_value(results, m, "sequential/seen", "NDCG@10") for m in ("recflm", "SASRec", "popularity"))
    fmt = lambda v: "nan" if v is None else f"{v:.4f}"  # noqa: E731
    ratio = f"{x / y:.2f}" if x is not None and y else "nan"
    return (f"SUMMARY bench_quality ndcg10 recflm={fmt(x)} sasrec={fmt(y)} popularity={fmt(z)} "
            f"ratio={ratio} minutes={minutes:.1f}")


def budget_split(budget_minutes: float) -> tuple[float, float]:
    """(recflm training max_minutes, SASRec sasrec_minutes) of a budget; 0 = no limit for both."""
    if budget_minutes <= 0:
        return 0.0, 0.0
    return round(TRAIN_SHARE * budget_minutes, 2), round(SASREC_SHARE * budget_minutes, 2)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m jobs.bench_quality", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="key=value overrides apply to the pretrain (TrainConfig) recipe.")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--table", metavar="FILE", help="a CSV, TSV or Parquet interaction table (needs --columns)")
    src.add_argument("--bundled", action="store_true", help="the bundled MovieLens data")
    ap.add_argument("--columns", metavar="MAP", help="column map of --table, e.g. user=user,item=item,ts=ts "
                    "(user, item, ts required; rating, text, summary optional)")
    ap.add_argument("--items", metavar="FILE", help="an item table of the source (CSV, TSV or Parquet), e.g. "
                    "Toys_and_Games_items.csv.gz: attributes for the two-tower baseline (needs --item-columns)")
    ap.add_argument("--item-columns", metavar="MAP", help="column map of --items, e.g. item=item,attrs=attributes "
                    "(item required; attrs: |-separated values; title optional)")
    ap.add_argument("--out", default="runs/quality", metavar="DIR", help="output directory (default runs/quality)")
    ap.add_argument("--budget-minutes", type=float, default=60.0, metavar="N",
                    help="time budget of the whole run: 50%% to recflm training, 20%% to SASRec (0: no limits)")
    ap.add_argument("--recipe", default="jobs/configs/pretrain_quality.yaml", metavar="FILE",
                    help="pretrain config (TrainConfig keys)")
    ap.add_argument("--k-core", type=int, default=None, metavar="K", help="k-core filter (default: prepare's 5)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="pretrain config overrides, e.g. lr=0.001")
    return ap


def parse_args(argv=None):
    ap = build_parser()
    return check_args(ap, ap.parse_args(argv))


def check_args(ap: argparse.ArgumentParser, args):
    """The source, budget and override checks of this parser's arguments (``ap.error`` on the first bad one);
    ``jobs.bench_transfer`` extends the parser and runs them too."""
    if args.table and not args.columns:
        ap.error("--table needs --columns (e.g. --columns user=user,item=item,ts=ts)")
    if args.bundled and args.columns:
        ap.error("--columns goes with --table, not --bundled")
    if bool(args.items) != bool(args.item_columns):
        ap.error("--items and --item-columns go together (e.g. --item-columns item=item,attrs=attributes)")
    if args.budget_minutes < 0:
        ap.error("--budget-minutes must be >= 0")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        ap.error(f"override {bad[0]!r} is not of the form key=value")
    return args


def configs(args, stamp: int | None = None):
    """The typed configs of the three stages for ``args`` (no work done): (prepare, train, evaluate)."""
    from recflm.config import column_map
    from recflm.config import PrepareConfig, SourceConfig, load_config, to_dict
    from recflm.evaluate import EvalConfig
    from recflm.train import TrainConfig

    out = Path(args.out)
    pcfg = PrepareConfig(out=str(out / "data"))
    if args.k_core is not None:
        pcfg.k_core = args.k_core
    if args.table:
        pcfg.sources = [to_dict(SourceConfig(type="table", path=args.table, columns=column_map(args.columns)))]
    if args.items:  # the item table of the one source (the bundled MovieLens data has its genres already)
        from recflm.readers import bundled_source

        src = pcfg.sources[0] if pcfg.sources else to_dict(bundled_source())
        src.update(items=args.items, item_columns=column_map(args.item_columns, "--item-columns"))
        pcfg.sources = [src]
    given = {o.split("=", 1)[0].strip() for o in args.overrides}
    tcfg = load_config(TrainConfig, args.recipe, args.overrides)
    train_minutes, sasrec_minutes = budget_split(args.budget_minutes)
    defaults = {"data": pcfg.out, "out": str(out / "bundle"), "storage_path": str((out / "train").resolve()),
                "name": f"bench_quality_{stamp if stamp is not None else int(time.time())}"}
    for key in RESERVED_TRAIN_KEYS:
        if key not in given:
            setattr(tcfg, key, defaults[key])
    if "max_minutes" in {f.name for f in dataclasses.fields(TrainConfig)}:
        if "max_minutes" not in given:
            tcfg.max_minutes = train_minutes
    elif train_minutes:
        print("bench_quality: this TrainConfig has no max_minutes: recflm training is not time-limited")
    ecfg = EvalConfig(bundle=tcfg.out, data=tcfg.data, split="test", baselines=True, max_users=0,
                      sasrec_minutes=sasrec_minutes, out=str(out / "metrics_test.json"))
    return pcfg, tcfg, ecfg


def main(argv=None) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    args = parse_args(argv)
    from recflm.config import ConfigError
    from recflm.prepare import PrepareError
    from recflm.readers import SourceError

    try:
        return _run(args)
    except (ConfigError, SourceError, PrepareError, FileNotFoundError) as e:  # bad recipe, override or data
        print(f"bench_quality: error: {e}")
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
    source = args.table or "the bundled MovieLens data"
    print(f"bench_quality: {source} -> {args.out}; budget {args.budget_minutes:g} min: recflm training "
          f"{getattr(tcfg, 'max_minutes', 0) or 'no limit'} min, SASRec {ecfg.sasrec_minutes or 'no limit'} min")

    t = time.perf_counter()
    stats = run_prepare(pcfg)
    seconds["prepare"] = time.perf_counter() - t
    print(format_stats(stats))

    t = time.perf_counter()
    bundle = run_train(tcfg)
    seconds["pretrain"] = time.perf_counter() - t
    ecfg.bundle = str(bundle)

    t = time.perf_counter()
    out = run_evaluate(ecfg)
    seconds["evaluate"] = time.perf_counter() - t
    results = out["results"]
    minutes = (time.perf_counter() - t_all) / 60

    print(f"\nbench_quality: {source}, {stats.get('users')} users, {stats.get('items')} items")
    for stage, s in seconds.items():
        print(f"  {stage:<9} {s / 60:7.1f} min ({s:.0f} s)")
    sas = results.get("SASRec", {})
    if "best_epoch" in sas:
        print(f"  SASRec best epoch {sas['best_epoch']} of {sas['epochs_run']} (valid NDCG@10 "
              f"{sas.get('best_val_ndcg10', float('nan')):.4f}), trained and scored in "
              f"{sas.get('train_seconds', 0) / 60:.1f} min")
    print(format_quality_table(results))
    line = summary_line(results, minutes)
    report = {"source": source, "out": str(args.out), "budget_minutes": args.budget_minutes,
              "train_max_minutes": getattr(tcfg, "max_minutes", None), "sasrec_minutes": ecfg.sasrec_minutes,
              "stage_seconds": {k: round(v, 1) for k, v in seconds.items()}, "minutes": round(minutes, 2),
              "users": stats.get("users"), "items": stats.get("items"), "bundle": str(bundle),
              "prepare_config": to_dict(pcfg), "train_config": to_dict(tcfg), "eval_config": to_dict(ecfg),
              "results": results, "summary": line}
    Path(args.out, "bench_quality.json").write_text(json.dumps(report, indent=2, default=float))
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
