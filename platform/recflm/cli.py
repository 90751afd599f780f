"""The ``recflm`` command: one sub-command per stage.

Every stage takes ``--config FILE.yaml`` and ``key=value`` overrides (dotted for nested keys), so
the same config drives the local command, ``python -m jobs.<stage>`` and a Kubernetes job.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .config import ConfigError, PrepareConfig, SourceConfig, load_config, to_dict


PLUGGED_STAGES = ("tune", "serve", "submit")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file for this stage")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. k_core=10 augment.crop=0.3")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recflm",
        description="Pretrain, tune and serve one text-to-text recommendation model on Ray (P5 paradigm).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "prepare", help="clean, index and split interaction logs with Ray Data",
        description="Read raw interaction logs (MovieLens, Amazon review JSON lines, generic CSV/Parquet), "
                    "clean them, apply k-core filtering, assign item IDs, split leave-one-out per user "
                    "and write a dataset directory. With no source it uses the bundled MovieLens data.")
    _add_common(p)
    p.add_argument("--out", "-o", help="output dataset directory (config key: out)")
    p.add_argument("--movielens", action="append", default=[], metavar="DIR",
                   help="a MovieLens directory (ratings.csv [+ movies.csv, tags.csv]); repeatable")
    p.add_argument("--amazon", action="append", default=[], metavar="PATH",
                   help="Amazon review JSON lines (.json/.jsonl, gzipped or not), file or directory; repeatable")
    p.add_argument("--table", action="append", default=[], metavar="PATH",
                   help="generic CSV/Parquet table; needs --columns; repeatable")
    p.add_argument("--columns", action="append", default=[], metavar="MAP",
                   help="column map for the matching --table, e.g. user=customer,item=sku,rating=stars,ts=time")
    p.add_argument("--k-core", type=int, help="k for iterative k-core filtering (config key: k_core)")
    p.add_argument("--indexing", choices=["sequential", "random", "collaborative"], help="item ID scheme")
    p.add_argument("--preview", type=int, default=0, metavar="N",
                   help="print N rendered (source -> target) examples per task family after preparing")
    p.add_argument("--skip-existing", action="store_true",
                   help="do not rebuild the dataset if OUT already holds one (only preview / print stats)")
    p.set_defaults(func=cmd_prepare)

    for cmd, helptext in (("pretrain", "pretrain the model on all task families with Ray Train (DDP)"),
                          ("finetune", "fine-tune a bundle on chosen task families with Ray Train")):
        p = sub.add_parser(cmd, help=helptext, description=helptext + ". The result is a model bundle; "
                           "rerunning with the same --name resumes the run from its last checkpoint.")
        _add_common(p)
        p.add_argument("--data", help="prepared dataset directory (config key: data)")
        p.add_argument("--out", "-o", help="bundle directory to write (config key: out)")
        p.add_argument("--name", help="run name; the same name resumes (config key: name)")
        p.add_argument("--preset", choices=["tiny", "seq", "mini", "small", "base"], help="model size (config key: preset)")
        p.add_argument("--workers", type=int, help="Ray Train workers (config key: workers)")
        p.add_argument("--gpu", action="store_true", help="train on GPUs (NCCL, bf16 autocast)")
        p.add_argument("--storage-path", help="checkpoint storage: a path or URI such as s3://bucket/runs")
        if cmd == "finetune":
            p.add_argument("--bundle", required=True, help="the bundle to start from")
            p.add_argument("--tasks", help="comma-separated task families to train, e.g. sequential,direct")
        p.set_defaults(func=cmd_train)

    helptext = "evaluate a bundle on the held-out split (valid-only generation), optionally against baselines"
    p = sub.add_parser("evaluate", help=helptext, description=helptext + ". Writes metrics.json and prints one table.")
    _add_common(p)
    p.add_argument("--bundle", help="the model bundle (config key: bundle)")
    p.add_argument("--data", help="prepared dataset directory (default: the one the bundle was trained on)")
    p.add_argument("--split", choices=["valid", "test"], help="evaluation split (default test)")
    p.add_argument("--baselines", action="store_true", help="also train and score popularity, two-tower and SASRec")
    p.add_argument("--replicas", type=int, help="model replicas in the Ray Data actor pool")
    p.add_argument("--max-users", type=int, help="evaluate the first N users only (0: all)")
    p.set_defaults(func=cmd_evaluate)

    # stages whose module defines HELP, add_arguments(parser) and command(args) -> int (and
    # COMMON_ARGS = False where it defines its own positionals); the modules import Ray, torch etc.
    # inside their functions, so building the parser stays fast
    for name in PLUGGED_STAGES:
        mod = importlib.import_module(f"{__package__}.{name}")
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP + ".")
        if getattr(mod, "COMMON_ARGS", True):
            _add_common(p)
        mod.add_arguments(p)
        p.set_defaults(func=mod.command)
    return parser


def column_map(text: str) -> dict:
    out = {}
    for part in text.split(","):
        if "=" not in part:
            raise ConfigError(f"--columns: {part!r} is not of the form canonical=column")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def cmd_prepare(args) -> int:
    from pathlib import Path

    cfg = load_config(PrepareConfig, args.config, args.overrides)
    if args.out:
        cfg.out = args.out
    if args.k_core is not None:
        cfg.k_core = args.k_core
    if args.indexing:
        cfg.indexing = args.indexing
    if len(args.columns) != len(args.table):
        raise ConfigError("give one --columns map per --table")
    extra = [SourceConfig(type="movielens", path=d) for d in args.movielens]
    extra += [SourceConfig(type="amazon", path=p) for p in args.amazon]
    extra += [SourceConfig(type="table", path=p, columns=column_map(c)) for p, c in zip(args.table, args.columns)]
    if extra:
        cfg.sources = [to_dict(s) for s in extra]

    from .dataset import PreparedData
    from .prepare import format_stats, run

    if args.skip_existing and (Path(cfg.out) / "manifest.json").exists():
        stats = PreparedData.open(cfg.out).stats
    else:
        stats = run(cfg)
    print(format_stats(stats))
    print(f"dataset written to {cfg.out}")
    if args.preview:
        from .prompts import preview

        print(preview(cfg.out, args.preview, cfg))
    return 0


def cmd_train(args) -> int:
    from .train import TrainConfig, run

    cfg = load_config(TrainConfig, args.config, args.overrides)
    for flag, key in (("data", "data"), ("out", "out"), ("name", "name"), ("preset", "preset"),
                      ("workers", "workers"), ("storage_path", "storage_path")):
        if getattr(args, flag, None) is not None:
            setattr(cfg, key, getattr(args, flag))
    if args.gpu:
        cfg.gpu = True
    if args.command == "finetune":
        cfg.init_bundle = args.bundle
        if args.tasks:
            cfg.families = [t.strip() for t in args.tasks.split(",") if t.strip()]
    run(cfg)
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import EvalConfig, run

    cfg = load_config(EvalConfig, args.config, args.overrides)
    for flag in ("bundle", "data", "split", "replicas", "max_users"):
        if getattr(args, flag, None) is not None:
            setattr(cfg, flag, getattr(args, flag))
    if args.baselines:
        cfg.baselines = True
    run(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        # ValueError covers SourceError / PrepareError / DatasetError: user errors, one clear line
        print(f"recflm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
