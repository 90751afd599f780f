"""Benchmark: an incremental update (``prepare --update`` + ``finetune catalog=extend``) against a full retrain,
in quality on the newest interactions and in wall time.

On the bundled MovieLens data:

1. split its logs by time: the first ``--base-share`` (default 90%) of the ratings (and the tags of that
   time) are the base, the rest the update (``src/base``, ``src/update``; the same movies.csv in both);
2. ``recflm prepare`` of the base, and a pretrain of it with the quality recipe (``--recipe``, default
   ``jobs/configs/pretrain_quality.yaml``) for ``--base-steps`` optimizer steps: the model being served;
3. (a) incremental: ``prepare --update`` of a copy of the base dataset with the update's rows (every base item
   keeps its ID, new items after them, the split moved forward), then ``finetune`` of the base bundle on it with
   ``catalog=extend`` for ``--update-steps`` steps;
4. (b) full retrain: ``recflm prepare`` of all the rows and a pretrain from scratch for ``--full-steps`` steps
   (default ``--base-steps`` + ``--update-steps``: the same optimizer steps as the incremental model had in all);
5. ``recflm evaluate`` (sequential full ranking, seen items excluded) of both bundles on the test split of the
   users whose test interaction is newer than the split time (``newest``: what the update brought; the same
   users and the same held-out interactions in both datasets), and on every user's test split (``all``).

The incremental arm's time is its prepare --update and its fine-tune (the base pretrain is paid before, once);
the full arm's is its prepare and its pretrain. The budget is steps, not minutes (no early stopping unless
``--patience N``; ``--max-minutes`` caps every run). Every stage is resumable: a stage whose output exists is
skipped (its time read from ``stages.json``), and a training run of the same name resumes from its checkpoint.

    python -m jobs.bench_update --base-steps 1500 --update-steps 300
    python -m jobs.bench_update --out runs/upd_smoke --base-steps 4 --update-steps 2 val_users=20   # a smoke

Under ``--out DIR`` (default runs/bench_update): ``src/``, ``data_base/``, ``data_updated/``, ``data_full/``,
``eval_*`` (the test views), ``train/``, ``bundle_base/``, ``bundle_updated/``, ``bundle_full/``,
``stages.json`` and ``bench_update.json``. It prints one table and the last line
``SUMMARY bench_update ndcg10_newest incremental=X full=Y hr10_newest incremental=X full=Y seconds
incremental=S full=S users_newest=N``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m jobs.bench_update", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/bench_update", help="working directory (default runs/bench_update)")
    ap.add_argument("--recipe", default="jobs/configs/pretrain_quality.yaml", help="the training recipe (YAML)")
    ap.add_argument("--base-share", type=float, default=0.9, help="share of the ratings, oldest first, in the base")
    ap.add_argument("--base-steps", type=int, default=1500, help="optimizer steps of the base pretrain")
    ap.add_argument("--update-steps", type=int, default=300, help="optimizer steps of the incremental fine-tune")
    ap.add_argument("--full-steps", type=int, default=0,
                    help="optimizer steps of the full retrain (default: --base-steps + --update-steps)")
    ap.add_argument("--patience", type=int, default=0, help="early stopping of every run (default 0: off)")
    ap.add_argument("--max-minutes", type=float, default=0.0, help="a time limit of every run (default 0: none)")
    ap.add_argument("--k-core", type=int, help="k-core of the prepares (default: prepare's)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the recipe, e.g. lr=0.002")
    return ap


def parse_args(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    if not 0 < args.base_share < 1:
        ap.error(f"--base-share {args.base_share}: expected a share in (0, 1)")
    if args.base_steps <= 0 or args.update_steps <= 0 or args.full_steps < 0:
        ap.error("--base-steps and --update-steps must be > 0, --full-steps >= 0")
    args.full_steps = args.full_steps or args.base_steps + args.update_steps
    return args


# ----------------------------------------------------------------------------- stages
def split_by_time(src: Path, out: Path, share: float) -> dict:
    """MovieLens ``src`` -> ``out/base`` (the oldest ``share`` of the ratings, the tags up to that time) and
    ``out/update`` (the rest); returns the split time and the row counts."""
    import pandas as pd

    ratings = pd.read_csv(src / "ratings.csv", dtype=str)
    ts = pd.to_numeric(ratings["timestamp"])
    order = ts.sort_values(kind="stable")
    cut = int(order.iloc[int(len(order) * share) - 1])  # base: ts <= cut
    info = {"cutoff_ts": cut, "ratings": len(ratings)}
    for part, sel in (("base", ts <= cut), ("update", ts > cut)):
        d = out / part
        d.mkdir(parents=True, exist_ok=True)
        ratings[sel].to_csv(d / "ratings.csv", index=False)
        info[f"{part}_ratings"] = int(sel.sum())
        if (src / "movies.csv").exists():
            shutil.copy2(src / "movies.csv", d / "movies.csv")
        if (src / "tags.csv").exists():
            tags = pd.read_csv(src / "tags.csv", dtype=str)
            tts = pd.to_numeric(tags["timestamp"])
            tags[(tts <= cut) if part == "base" else (tts > cut)].to_csv(d / "tags.csv", index=False)
    return info


def newest_view(data_dir: Path, out: Path, cutoff: int) -> int:
    """A dataset view of ``data_dir`` holding only the users whose test interaction is newer than ``cutoff``
    (the evaluation of the newest interactions); returns their number."""
    import pandas as pd

    from recflm.dataset import INTERACTIONS, ITEMS, MANIFEST, SEQUENCES, STATS, USERS

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    seqs = pd.read_parquet(data_dir / SEQUENCES)
    has_test = seqs["items"].map(len) >= seqs["n_train"] + 2
    newest = has_test & seqs["ts"].map(lambda t: len(t) > 0 and int(t[-1]) > cutoff)
    keep = seqs[newest]
    keep.to_parquet(out / SEQUENCES, index=False)
    users = set(keep["user"])
    inter = pd.read_parquet(data_dir / INTERACTIONS)
    inter[inter["user"].isin(users)].to_parquet(out / INTERACTIONS, index=False)
    u = pd.read_parquet(data_dir / USERS)
    u[u["user"].isin(users)].to_parquet(out / USERS, index=False)
    for name in (ITEMS, STATS, MANIFEST):
        shutil.copy2(data_dir / name, out / name)
    return len(keep)


class Stages:
    """``stages.json``: each finished stage's seconds (and result); a finished stage is skipped on a rerun."""

    def __init__(self, path: Path):
        self.path = path
        self.done = json.loads(path.read_text()) if path.exists() else {}

    def run(self, name: str, output: Path, fn, finished=None):
        finished = finished or (lambda: (output / "manifest.json").exists())
        if name in self.done and finished():
            print(f"bench_update: {name}: done before ({self.done[name]['seconds']:.0f} s), skipped")
            return self.done[name].get("result")
        t = time.perf_counter()
        result = fn()
        self.done[name] = {"seconds": round(time.perf_counter() - t, 1), "result": result}
        self.path.write_text(json.dumps(self.done, indent=2, default=str))
        print(f"bench_update: {name}: {self.done[name]['seconds']:.0f} s")
        return result

    def seconds(self, *names) -> float:
        return sum(self.done[n]["seconds"] for n in names)


def _evaluate(ecfg) -> dict:
    """NDCG@10 / HR@10 of sequential full ranking (evaluate's own tables go to its metrics file, not stdout)."""
    import contextlib
    import io

    from recflm.evaluate import run as run_evaluate

    with contextlib.redirect_stdout(io.StringIO()):
        res = run_evaluate(ecfg, log=lambda *a: None)["results"]
    return _metrics(res)


def _brief(stats: dict) -> dict:
    return {k: stats.get(k) for k in ("input_rows", "kept_interactions", "users", "items")}


def _metrics(res: dict) -> dict:
    seq = res.get("recflm", {}).get("sequential/seen", {})
    return {"ndcg10": seq.get("NDCG@10"), "hr10": seq.get("HR@10"), "n": seq.get("n")}


def format_table(rows: list[dict]) -> str:
    head = (f"{'arm':<22} {'prepare s':>9} {'train s':>8} {'total s':>8} {'steps':>6} {'NDCG@10 new':>11} "
            f"{'HR@10 new':>9} {'NDCG@10 all':>11} {'HR@10 all':>9}")
    lines = ["sequential full ranking (seen items excluded); new: users whose test interaction is in the update",
             head, "-" * len(head)]

    def f(v):
        return f"{v:.4f}" if isinstance(v, (int, float)) else "—"

    for r in rows:
        lines.append(f"{r['arm']:<22} {r['prepare_s']:>9.0f} {r['train_s']:>8.0f} {r['prepare_s'] + r['train_s']:>8.0f} "
                     f"{r['steps']:>6} {f(r['newest'].get('ndcg10')):>11} {f(r['newest'].get('hr10')):>9} "
                     f"{f(r['all'].get('ndcg10')):>11} {f(r['all'].get('hr10')):>9}")
    return "\n".join(lines)


def summary_line(inc: dict, full: dict, users: int) -> str:
    def f(v):
        return f"{v:.4f}" if isinstance(v, (int, float)) else "nan"

    return (f"SUMMARY bench_update ndcg10_newest incremental={f(inc['newest']['ndcg10'])} "
            f"full={f(full['newest']['ndcg10'])} hr10_newest incremental={f(inc['newest']['hr10'])} "
            f"full={f(full['newest']['hr10'])} seconds incremental={inc['prepare_s'] + inc['train_s']:.0f} "
            f"full={full['prepare_s'] + full['train_s']:.0f} users_newest={users}")


def main(argv=None) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    args = parse_args(argv)
    from recflm.config import ConfigError, PrepareConfig, SourceConfig, load_config, to_dict
    from recflm.evaluate import EvalConfig
    from recflm.prepare import PrepareError, run as run_prepare
    from recflm.prepare_update import update
    from recflm.readers import BUNDLED, SourceError
    from recflm.train import TrainConfig, run as run_train

    t_all = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    st = Stages(out / "stages.json")
    try:
        tcfg = load_config(TrainConfig, args.recipe, args.overrides)
        split = st.run("split", out / "src", lambda: split_by_time(BUNDLED, out / "src", args.base_share),
                       finished=lambda: (out / "src" / "update" / "ratings.csv").exists())
        print(f"bench_update: base {split['base_ratings']} ratings, update {split['update_ratings']} "
              f"(after ts {split['cutoff_ts']})")

        def pcfg(name: str, path) -> PrepareConfig:
            c = PrepareConfig(out=str(out / name), sources=[to_dict(SourceConfig(type="movielens", path=str(path),
                                                                                 name="ml"))])
            if args.k_core is not None:
                c.k_core = args.k_core
            return c

        def train(name: str, data: str, steps: int, **kw) -> TrainConfig:
            return dataclasses.replace(tcfg, data=data, out=str(out / f"bundle_{name}"), name=name,
                                       storage_path=str((out / "train").resolve()), max_steps=steps,
                                       patience=args.patience, max_minutes=args.max_minutes, **kw)

        quiet = lambda *a: None  # noqa: E731
        st.run("prepare_base", out / "data_base", lambda: _brief(run_prepare(pcfg("data_base", out / "src" / "base"),
                                                                             quiet)))
        base = train("base", str(out / "data_base"), args.base_steps)
        st.run("pretrain_base", Path(base.out), lambda: str(run_train(base)))

        def prepare_update():
            d = out / "data_updated"
            if d.exists():  # a copy of the base (an interrupted update leaves it so): start again from the base
                shutil.rmtree(d)
            shutil.copytree(out / "data_base", d)
            s = update(d, [SourceConfig(type="movielens", path=str(out / "src" / "update"))], log=quiet)
            return json.loads((d / "manifest.json").read_text())["updates"][-1] | {"items": s["items"]}

        upd = st.run("prepare_update", out / "data_updated", prepare_update,
                     finished=lambda: "updates" in json.loads((out / "data_updated" / "manifest.json").read_text())
                     if (out / "data_updated" / "manifest.json").exists() else False)
        print(f"bench_update: update added {upd['kept']} interactions, {upd['new_items']} new items, "
              f"{upd['new_users']} new users")
        inc = train("updated", str(out / "data_updated"), args.update_steps, init_bundle=base.out, catalog="extend")
        st.run("finetune_update", Path(inc.out), lambda: str(run_train(inc)))

        st.run("prepare_full", out / "data_full", lambda: _brief(run_prepare(pcfg("data_full", BUNDLED), quiet)))
        full = train("full", str(out / "data_full"), args.full_steps)
        st.run("pretrain_full", Path(full.out), lambda: str(run_train(full)))

        results, users = {}, {}
        for arm, cfg in (("incremental", inc), ("full", full)):
            for view in ("newest", "all"):
                data = Path(cfg.data)
                if view == "newest":
                    data = out / f"eval_{arm}_newest"
                    users[arm] = newest_view(Path(cfg.data), data, split["cutoff_ts"])
                mpath = Path(cfg.out) / f"metrics_test_{view}.json"
                ecfg = EvalConfig(bundle=cfg.out, data=str(data), split="test", max_users=0, cold_ks=[],
                                  families=["sequential"], out=str(mpath))
                results[(arm, view)] = st.run(f"evaluate_{arm}_{view}", mpath, lambda e=ecfg: _evaluate(e),
                                              finished=mpath.exists)
    except (ConfigError, SourceError, PrepareError, FileNotFoundError) as e:
        print(f"bench_update: error: {e}")
        return 2
    if users["incremental"] != users["full"]:
        print(f"bench_update: note: {users['incremental']} newest users in the updated dataset, {users['full']} in "
              f"the full one (k-core of the union vs of all rows)")
    rows = [
        {"arm": "base (before update)", "prepare_s": st.seconds("prepare_base"), "train_s": st.seconds("pretrain_base"),
         "steps": args.base_steps, "newest": {}, "all": {}},
        {"arm": "incremental (a)", "prepare_s": st.seconds("prepare_update"), "train_s": st.seconds("finetune_update"),
         "steps": args.update_steps, "newest": results[("incremental", "newest")],
         "all": results[("incremental", "all")]},
        {"arm": "full retrain (b)", "prepare_s": st.seconds("prepare_full"), "train_s": st.seconds("pretrain_full"),
         "steps": args.full_steps, "newest": results[("full", "newest")], "all": results[("full", "all")]},
    ]
    print(format_table(rows))
    line = summary_line(rows[1], rows[2], users["incremental"])
    (out / "bench_update.json").write_text(json.dumps(
        {"split": split, "update": upd, "rows": rows, "users_newest": users, "recipe": args.recipe,
         "overrides": args.overrides, "minutes": round((time.perf_counter() - t_all) / 60, 2), "summary": line},
        indent=2, default=float))
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
