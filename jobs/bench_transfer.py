"""Benchmark: does self-supervised pretraining help? Fine-tuning from a self-supervised bundle vs training
from scratch, at the same fine-tune budget, with a share of the labelled users.

On the data you name (the bundled MovieLens data, or any interaction table, as ``jobs.bench_quality``):

1. ``recflm prepare`` (leave-one-out split) once;
2. a self-supervised pretrain (``objective: self-supervised``, of the families ``--objective-families``: ``span``,
   masked-item spans of every window of each user's *training* sequence (default), and / or ``next``, the dense
   causal next-item targets over every window of it, the fine-tune recipe's decoder-side objective without its
   labelled family; best epoch by the loss of the valid items) for ``--pretrain-steps`` optimizer steps;
3. for each share p of ``--shares`` (default 0.1, 0.3, 1): the quality recipe (``--recipe``, default
   ``jobs/configs/pretrain_quality.yaml``) trained on a seeded share p of the users (``users_share``; its
   validation users from that share too), once from scratch and once fine-tuned from the step-2 bundle,
   each for ``--finetune-steps`` optimizer steps (no early stopping unless ``--patience N``: both spend the whole
   budget and export their best epoch). The budget is steps, not minutes: on a shared machine two runs' minutes are not the same work;
4. ``recflm evaluate`` of every bundle on the test split of *all* users (full ranking, seen items excluded).

The test items are never trained on, in either stage (the pretrain reads training sequences only). It prints
one table (a row per share: NDCG@10 and HR@10 from scratch and pretrained, the change, the epochs each
trained; its title names the self-supervised families the source bundle was pretrained on) and the last line
``SUMMARY bench_transfer ndcg10 p=0.1:scratch/pretrained ... objective=span+next minutes=M``.

    python -m jobs.bench_transfer --bundled
    python -m jobs.bench_transfer --bundled --objective-families span,next --out runs/transfer_next
    python -m jobs.bench_transfer --table ../shared/data/amazon-toys-s3rec/Toys_and_Games_interactions.csv.gz \\
        --columns user=user,item=item,ts=ts --out runs/transfer_toys --pretrain-steps 3000 --finetune-steps 1500

Cross-domain: ``--source-bundle DIR`` fine-tunes from a self-supervised bundle of another source (e.g. the
MovieLens run's ``ss_bundle``) instead of step 2; the data's catalog replaces the bundle's (``catalog=replace``:
every item token starts from a fresh vector, the layers and the prompt tokens transfer). ``--scratch-from FILE``
reuses the scratch arm of the in-domain run's ``bench_transfer.json`` (same data, shares and steps: the same run).

Under ``--out DIR`` (default runs/transfer): ``data/``, ``train/``, ``ss_bundle/``, ``scratch_<p>/``,
``pretrained_<p>/``, ``matched_<p>/`` (each bundle with its ``metrics_test.json``) and ``bench_transfer.json``.

``--matched-scratch`` adds the compute-matched control: scratch for ``--pretrain-steps + --finetune-steps`` steps,
as many optimizer steps as the pretrained arm had in its two stages, so that the table tells the pretrain's
unlabelled data and objective apart from its extra steps.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

from jobs.bench_quality import build_parser as quality_parser, check_args


def build_parser() -> argparse.ArgumentParser:
    ap = quality_parser()
    ap.prog = "python -m jobs.bench_transfer"
    ap.description = __doc__.split("\n")[0]
    ap.set_defaults(out="runs/transfer")
    ap.add_argument("--shares", default="0.1,0.3,1", metavar="P,P,...",
                    help="shares of the labelled users the recipe trains on (default 0.1,0.3,1)")
    ap.add_argument("--pretrain-steps", type=int, default=1500, metavar="N",
                    help="the self-supervised pretrain's optimizer steps (default 1500)")
    ap.add_argument("--finetune-steps", type=int, default=600, metavar="N",
                    help="each fine-tune's and each scratch run's optimizer steps: the same budget (default 600)")
    ap.add_argument("--objective-families", metavar="F,F", default=None,
                    help="the self-supervised families the pretrain trains: span (masked-item spans, the default), "
                         "next (dense causal next-item targets; needs the recipe's item_token_mode=token) or span,next. "
                         "With --source-bundle the bundle's own are used (given here, they must be the same)")
    ap.add_argument("--source-bundle", metavar="DIR",
                    help="cross-domain: fine-tune from this self-supervised bundle (pretrained on another source, e.g. "
                         "runs/transfer_ml/ss_bundle) instead of pretraining on the data: its catalog is replaced "
                         "(every item of the data starts from a fresh vector; the layers transfer)")
    ap.add_argument("--scratch-from", metavar="FILE",
                    help="reuse the scratch arm of an earlier bench_transfer.json on the same data, shares and "
                         "--finetune-steps (e.g. the in-domain run's, for the cross-domain rows: the scratch run is the "
                         "same run) instead of training it again")
    ap.add_argument("--patience", type=int, default=0, metavar="N",
                    help="early stopping of the fine-tunes and scratch runs (default 0: off, every run spends the whole "
                         "step budget and exports its best epoch; with a small share the validation users are few and "
                         "noisy, and the recipe's patience stopped one arm after a third of its steps)")
    ap.add_argument("--matched-scratch", action="store_true",
                    help="a third arm, the compute-matched control: scratch for --pretrain-steps + --finetune-steps "
                         "steps, the pretrained arm's optimizer steps in all (the same budget of steps as the two "
                         "stages; it tells the pretrain's data and objective apart from its extra steps)")
    ap.add_argument("--max-minutes", type=float, default=0.0, metavar="N",
                    help="a time limit of every run on top of its steps (default 0: none; a time budget is not "
                         "the same budget for two runs on a shared machine, steps are)")
    return ap


def parse_args(argv=None):
    ap = build_parser()
    args = check_args(ap, ap.parse_args(argv))
    try:
        args.share_list = [float(x) for x in args.shares.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--shares {args.shares!r}: expected numbers in (0, 1], e.g. 0.1,0.3,1")
    if not args.share_list or not all(0 < p <= 1 for p in args.share_list):
        ap.error(f"--shares {args.shares!r}: expected numbers in (0, 1], e.g. 0.1,0.3,1")
    if args.pretrain_steps <= 0 or args.finetune_steps <= 0:
        ap.error("--pretrain-steps and --finetune-steps must be > 0 (a fair comparison needs one budget)")
    from recflm.augment import SELF_SUPERVISED
    from recflm.train import SELF_SUPERVISED_FAMILIES

    given = args.objective_families
    args.family_list = list(dict.fromkeys(f.strip() for f in (given or "").split(",") if f.strip())) if given \
        else list(SELF_SUPERVISED_FAMILIES)
    bad = [f for f in args.family_list if f not in SELF_SUPERVISED]
    if bad or not args.family_list:
        ap.error(f"--objective-families {given!r}: {bad[0] + ' is not a self-supervised family' if bad else 'empty'} "
                 f"(expected some of {', '.join(SELF_SUPERVISED)}, e.g. span,next)")
    return args


def source_objective(args) -> list[str]:
    """The self-supervised families the pretrained arm's source bundle was trained on: ``--objective-families``,
    or (``--source-bundle``) the bundle manifest's, which ``--objective-families``, where given, must match."""
    from recflm.config import ConfigError

    if not args.source_bundle:
        return list(args.family_list)
    try:
        m = json.loads((Path(args.source_bundle) / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"--source-bundle {args.source_bundle}: no readable manifest.json ({e})") from None
    if m.get("objective") != "self-supervised":
        raise ConfigError(f"--source-bundle {args.source_bundle}: a bundle of objective {m.get('objective')!r}, "
                          f"not a self-supervised one")
    fams = list(m.get("families") or [])
    if args.objective_families and fams != args.family_list:
        raise ConfigError(f"--objective-families {args.objective_families}: the source bundle was pretrained on "
                          f"{','.join(fams)}")
    return fams


def same_data(a: str, b: str) -> bool:
    """Whether two prepared dataset dirs hold the same data: one dir, or the same source files (by size and
    content hash) prepared with the same settings (the output dir aside)."""
    if Path(a).resolve() == Path(b).resolve():
        return True

    def identity(d: str):
        try:
            m = json.loads((Path(d) / "manifest.json").read_text())
        except (OSError, ValueError):
            return None
        files = sorted((f.get("source"), f.get("type"), f.get("bytes"), f.get("sha256_first_mib"))
                       for f in m.get("sources", []))
        return files, {k: v for k, v in m.get("config", {}).items() if k != "out"}

    ia = identity(a)
    return ia is not None and ia == identity(b)


def reused_scratch(path: str, data: str, shares: list[float], steps: int) -> dict:
    """share -> the scratch row of an earlier bench_transfer.json (``--scratch-from``), after checking it was the
    same run this one would train: the same prepared data, the same fine-tune steps, every share present
    (``ConfigError`` naming what differs)."""
    from recflm.config import ConfigError

    try:
        earlier = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"--scratch-from {path}: cannot read it as a bench_transfer.json ({e})") from None
    if earlier.get("finetune_steps") != steps:
        raise ConfigError(f"--scratch-from {path}: its runs had {earlier.get('finetune_steps')} fine-tune steps, "
                         f"this run has {steps}: not the same budget")
    rows = {}
    for r in earlier.get("rows", []):
        cfg = r.get("scratch", {}).get("config", {})
        if cfg.get("data") and not same_data(cfg["data"], data):
            raise ConfigError(f"--scratch-from {path}: its scratch runs trained on {cfg['data']}, not the same "
                             f"prepared data as {data} (other sources, files or prepare settings)")
        rows[float(r["share"])] = r["scratch"]
    missing = [p for p in shares if p not in rows]
    if missing:
        raise ConfigError(f"--scratch-from {path}: no scratch run for share(s) {missing} (it has {sorted(rows)})")
    return rows


def configs(args, stamp: int):
    """(prepare config, the self-supervised pretrain's config, run(kind, share) -> (train, evaluate) configs)."""
    from jobs.bench_quality import configs as quality_configs

    args.budget_minutes = 0  # each run here has its own limit
    pcfg, tcfg, _ = quality_configs(args, stamp)
    out = Path(args.out)
    ss = dataclasses.replace(tcfg, objective="self-supervised", families=list(args.family_list),
                             max_steps=args.pretrain_steps, max_minutes=args.max_minutes,
                             name=f"ss_{stamp}", out=str(out / "ss_bundle"))

    source = args.source_bundle or ss.out

    def run(kind: str, share: float):
        from recflm.bundle import catalog_relation
        from recflm.evaluate import EvalConfig

        init = source if kind == "pretrained" else ""
        steps = args.finetune_steps + (args.pretrain_steps if kind == "matched" else 0)
        catalog = "keep"
        if init and args.source_bundle:  # another source's bundle: the data's catalog replaces its own
            import pandas as pd

            same = catalog_relation(pd.read_parquet(Path(init) / "items.parquet"), tcfg.data) == "same"
            catalog = "keep" if same else "replace"
        t = dataclasses.replace(tcfg, users_share=share, max_steps=steps, max_minutes=args.max_minutes,
                                patience=args.patience,
                                name=f"{kind}_{share:g}_{stamp}", out=str(out / f"{kind}_{share:g}"),
                                init_bundle=init, catalog=catalog)
        e = EvalConfig(bundle=t.out, data=t.data, split="test", max_users=0, cold_ks=[], families=["sequential"],
                       out=str(Path(t.out) / "metrics_test.json"))
        return t, e

    return pcfg, ss, run


def _metric(res: dict, name: str):
    return res.get("recflm", {}).get("sequential/seen", {}).get(name)


def _change(new: float, old: float) -> str:
    return f"{(new / old - 1) * 100:+.0f}%" if old else "—"


def format_table(rows: list[dict], objective: list[str] | None = None) -> str:
    """The table; ``objective``: the self-supervised families of the pretrained arm's source bundle. Rows with a
    ``matched`` arm (``--matched-scratch``) get its columns and the pretrained arm's change against it."""
    matched = any("matched" in r for r in rows)
    head = (f"{'users':>6} {'share':>6} {'scratch NDCG@10':>16} {'HR@10':>7} {'pretrained NDCG@10':>19} "
            f"{'HR@10':>7} {'change':>8}")
    if matched:
        head += f" {'matched NDCG@10':>16} {'HR@10':>7} {'vs matched':>11}"
    head += f" {'epochs s/p' + ('/m' if matched else ''):>13}"
    lines = ["sequential full ranking on the test split of every user (seen items excluded); the same "
             "fine-tune budget" + (f"; pretrained: from a self-supervised bundle of objective {'+'.join(objective)}"
                                   if objective else "")
             + ("; matched: scratch for the pretrained arm's steps in all (pretrain + fine-tune)" if matched else ""),
             head, "-" * len(head)]
    for r in rows:
        s, p, m = r["scratch"], r["pretrained"], r.get("matched")
        line = (f"{r['users']:>6} {r['share']:>6g} {s['ndcg10']:>16.4f} {s['hr10']:>7.4f} {p['ndcg10']:>19.4f} "
                f"{p['hr10']:>7.4f} {_change(p['ndcg10'], s['ndcg10']):>8}")
        epochs = f"{s['epochs']}/{p['epochs']}"
        if matched:
            line += (f" {m['ndcg10']:>16.4f} {m['hr10']:>7.4f} {_change(p['ndcg10'], m['ndcg10']):>11}" if m
                     else f" {'—':>16} {'—':>7} {'—':>11}")
            epochs += f"/{m['epochs'] if m else '—'}"
        lines.append(f"{line} {epochs:>13}")
    return "\n".join(lines)


def summary_line(rows: list[dict], minutes: float, objective: list[str] | None = None) -> str:
    matched = any("matched" in r for r in rows)

    def arms(r):
        out = f"{r['scratch']['ndcg10']:.4f}/{r['pretrained']['ndcg10']:.4f}"
        return out + (f"/{r['matched']['ndcg10']:.4f}" if "matched" in r else "/-" if matched else "")

    parts = " ".join(f"p={r['share']:g}:{arms(r)}" for r in rows)
    obj = f" objective={'+'.join(objective)}" if objective else ""
    kinds = "scratch/pretrained" + ("/matched" if matched else "")
    return f"SUMMARY bench_transfer ndcg10 {kinds} {parts}{obj} minutes={minutes:.1f}"


def main(argv=None) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    args = parse_args(argv)
    from recflm.config import ConfigError, to_dict
    from recflm.evaluate import run as run_evaluate
    from recflm.prepare import PrepareError, run as run_prepare
    from recflm.readers import SourceError
    from recflm.train import run as run_train

    t_all, stamp = time.perf_counter(), int(time.time())
    try:
        pcfg, ss, run = configs(args, stamp)
        objective = source_objective(args)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        stats = run_prepare(pcfg)
        print(f"bench_transfer: {stats.get('users')} users, {stats.get('items')} items; self-supervised pretrain "
              f"({'+'.join(objective)}) {args.pretrain_steps} steps, then {args.finetune_steps} steps per run")
        t = time.perf_counter()
        if args.source_bundle:
            print(f"bench_transfer: fine-tuning from the self-supervised bundle {args.source_bundle}")
        else:
            run_train(ss)
        ss_minutes = (time.perf_counter() - t) / 60
        reused = reused_scratch(args.scratch_from, pcfg.out, args.share_list, args.finetune_steps) \
            if args.scratch_from else {}
        rows = []
        for share in args.share_list:
            row = {"share": share}
            for kind in ("scratch", "pretrained") + (("matched",) if args.matched_scratch else ()):
                if kind == "scratch" and share in reused:
                    row[kind] = dict(reused[share], reused_from=args.scratch_from)
                    print(f"bench_transfer: share {share:g} scratch: NDCG@10 {row[kind]['ndcg10']:.4f} "
                          f"(reused from {args.scratch_from})")
                    continue
                tcfg, ecfg = run(kind, share)
                t = time.perf_counter()
                run_train(tcfg)
                train_s = time.perf_counter() - t
                res = run_evaluate(ecfg, log=lambda *a: None)["results"]
                hist = json.loads((Path(tcfg.storage_path) / tcfg.name / "metrics.json").read_text())
                epochs = [m for m in hist if "val_ndcg10" in m]
                row["users"] = res["recflm"]["sequential/seen"]["n"]
                row[kind] = {"ndcg10": _metric(res, "NDCG@10"), "hr10": _metric(res, "HR@10"),
                             "epochs": len(epochs), "best_epoch": epochs[-1].get("best_epoch") if epochs else None,
                             "train_seconds": round(train_s, 1), "bundle": tcfg.out, "config": to_dict(tcfg)}
                print(f"bench_transfer: share {share:g} {kind}: NDCG@10 {row[kind]['ndcg10']:.4f} "
                      f"({len(epochs)} epochs, {train_s / 60:.1f} min)")
            rows.append(row)
    except (ConfigError, SourceError, PrepareError, FileNotFoundError) as e:
        print(f"bench_transfer: error: {e}")
        return 2
    minutes = (time.perf_counter() - t_all) / 60
    print(format_table(rows, objective))
    line = summary_line(rows, minutes, objective)
    Path(args.out, "bench_transfer.json").write_text(json.dumps(
        {"source": args.table or "bundled", "source_bundle": args.source_bundle, "objective_families": objective,
         "rows": rows, "pretrain_steps": args.pretrain_steps, "matched_scratch_steps":
             args.pretrain_steps + args.finetune_steps if args.matched_scratch else None,
         "ss_train_minutes": round(ss_minutes, 2), "finetune_steps": args.finetune_steps,
         "self_supervised_config": to_dict(ss), "minutes": round(minutes, 2), "summary": line},
        indent=2, default=float))
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
