"""``recflm evaluate``: honest numbers for a bundle, with baselines on the same split and protocol.

Protocols (split ``test`` by default; leave-one-out, so each user has one held-out item):

- sequential, full ranking: the prompt holds the user's items before the held-out one (the last
  ``max_history``); constrained beam search (beam 20) returns the top 20 catalog items, the user's
  earlier items excluded (for every method alike); HR@1/5/10/20, NDCG@5/10/20, with a seen
  template and with a held-out (never trained) template;
- direct, 1-of-100: the held-out item and 99 fixed seeded negatives (the user never interacted
  with them; the same draw as the data stage's direct prompts), ranked by sequence log-probability;
  HR@1/5/10, NDCG@5/10;
- rating: RMSE and MAE of the greedy-decoded number, unparseable outputs counted;
- explanation / review: BLEU-4 and ROUGE-1/2/L of the decoded text, where the data has text.

Model inference runs as Ray Data batch inference: ``map_batches`` over the evaluation rows with an
actor pool of model replicas (``replicas``), so it scales out like the rest of the platform.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from .config import PrepareConfig, flags_into, from_dict, load_config, to_dict


@dataclass
class EvalConfig:
    bundle: str = "runs/model"
    data: str = ""  # prepared dataset (default: the one the bundle was trained on)
    split: str = "test"  # test | valid
    beams: int = 20
    top_k: int = 20
    exclude_seen: bool = True
    batch_size: int = 16
    replicas: int = 1  # model replicas in the Ray Data actor pool
    cpus_per_replica: float = 1.0
    max_users: int = 0  # 0: every user with a held-out item
    text_examples: int = 300  # rating / explanation / review examples evaluated (0: all)
    baselines: bool = False
    two_tower_epochs: int = 20  # training budget of the baselines (passes over the training interactions)
    sasrec_epochs: int = 200  # SASRec's most epochs; it stops early on validation NDCG@10 (the valid split)
    sasrec_patience: int = 10  # ... after this many epochs without improvement, keeping the best epoch,
    sasrec_patience_steps: int = 1000  # ... and at least this many optimizer steps (small data: short epochs)
    sasrec_minutes: float = 0  # ... or after this many minutes of training (0: no limit)
    out: str = ""  # metrics.json path (default: <bundle>/metrics_<split>.json)
    seed: int = 2022


# ----------------------------------------------------------------------------- evaluation rows
def build_rows(data_dir: str, templates_dir: str, cfg: EvalConfig, log=print,
               inference: dict | None = None) -> tuple[pd.DataFrame, dict]:
    """One row per (task, user or example): the prompt (and, dense style, the decoder prefix) and what
    the answer is checked against. ``inference``: the bundle manifest's settings (``train.inference_settings``)."""
    from .augment import EVAL_CANDIDATES, SPLIT_CODE, sample_negatives, example_rng, example_dataset
    from .dataset import PreparedData
    from .prompts import (format_rating, is_rated, load_templates, rated_positions, rating_input, rating_template,
                          sequential_input, sequential_template)

    data = PreparedData.open(data_dir)
    pcfg = from_dict(PrepareConfig, data.manifest["config"])
    temps = load_templates(templates_dir)
    ids = data.id_texts
    inference = inference or {}
    rated = inference.get("rating") == "dense" and "rating" in data.families and "rating" in temps
    seqs = data.sequences_pandas(columns=["user", "index", "n_train", "items", "ratings"])
    off = SPLIT_CODE[cfg.split] - 1
    seqs = seqs[seqs["index"].map(len) > seqs["n_train"] + off].reset_index(drop=True)
    seqs = seqs[seqs["n_train"] + off >= 1]
    if cfg.max_users:
        seqs = seqs.head(cfg.max_users)
    dense = inference.get("sequential") == "dense"
    H = int(inference.get("history", pcfg.prompts.max_history))
    seq_t = {"seen": sequential_template(temps, dense), "held-out": sequential_template(temps, dense, held_out=True)}
    direct_t = next(t for t in temps.get("direct", []) if not t.held_out and "candidates" in t.fields)
    direct_by_seq = inference.get("direct") == "sequential"
    rating_t = rating_template(temps, dense=True) if rated else None
    lo, hi = pcfg.rating_min, pcfg.rating_max
    rows, rating_rows = [], []
    for user, index, n_train, keys, ratings in seqs.itertuples(index=False):
        index = [int(i) for i in index]
        t = int(n_train) + off
        if rating_t is not None and is_rated(ratings[t]):  # dense rating: the pairs before, then the item
            known = rated_positions(ratings, t)
            src, prefix = rating_input(rating_t, [ids[index[k]] for k in known], [ratings[k] for k in known],
                                       ids[index[t]], int(inference.get("rating_history", 24)) + 1, lo, hi)
            rating_rows.append({"task": "rating", "user": user, "source": src, "prefix": prefix, "truth": -1,
                                "history": [], "exclude": [], "candidates": [], "item": keys[t],
                                "target": format_rating(min(max(float(ratings[t]), lo), hi))})
        hist = index[:t]
        excl = hist if cfg.exclude_seen else []
        for kind, temp in seq_t.items():
            if temp is None:
                continue
            src, prefix = sequential_input(temp, user, [ids[i] for i in hist], H)
            rows.append({"task": f"sequential/{kind}", "user": user, "source": src, "prefix": prefix or [],
                         "truth": index[t], "history": hist, "exclude": excl, "candidates": [],
                         "target": ids[index[t]]})
        # the same fixed draw as the data stage: rng of (seed, epoch 0, split, user)
        urng = example_rng(pcfg.seed, 0, cfg.split, user)
        cands = [index[t]] + sample_negatives(urng, len(ids), set(index), EVAL_CANDIDATES - 1)
        shown = list(cands)
        urng.shuffle(shown)
        if direct_by_seq:  # the candidates ranked by the model's next-item scores after the history
            src, prefix = sequential_input(seq_t["seen"], user, [ids[i] for i in hist], H)
        else:
            src, _ = direct_t.render({"user": user, "history": ", ".join(ids[i] for i in hist[-5:]),
                                      "item": ids[index[t]], "candidates": ", ".join(ids[i] for i in shown)})
            prefix = None
        rows.append({"task": "direct", "user": user, "source": src, "prefix": prefix or [], "truth": index[t],
                     "history": hist, "exclude": [], "candidates": cands, "target": ids[index[t]]})
    if rating_rows:
        part = pd.DataFrame(rating_rows)
        if cfg.text_examples and len(part) > cfg.text_examples:
            part = part.sample(n=cfg.text_examples, random_state=cfg.seed)
        rows += part.to_dict("records")
    fams = [f for f in ("rating", "explanation", "review") if f in data.families and f in temps
            and not (f == "rating" and rated)]
    if fams:
        ex = example_dataset(data_dir, pcfg, split=cfg.split, families=fams, held_out=False,
                             log=lambda *a: None).to_pandas()
        for fam in fams:
            part = ex[ex["family"] == fam]
            if cfg.text_examples and len(part) > cfg.text_examples:
                part = part.sample(n=cfg.text_examples, random_state=cfg.seed)
            for r in part.itertuples(index=False):
                rows.append({"task": fam, "user": r.user, "source": r.source, "prefix": [], "truth": -1, "history": [],
                             "exclude": [], "candidates": [], "target": r.target, "item": r.item})
    info = {"users": int(len(seqs)), "n_items": len(ids), "scale": (pcfg.rating_min, pcfg.rating_max)}
    return pd.DataFrame(rows), info


# ----------------------------------------------------------------------------- model replicas
class BundlePredictor:
    """A model replica for ``map_batches``: loads the bundle once, answers every task of a batch."""

    def __init__(self, bundle: str, beams: int, top_k: int, threads: int = 1, scale: tuple = (1.0, 5.0)):
        import torch

        from .bundle import load_bundle
        from .generate import CatalogTrie, ConstrainedBeamSearch

        torch.set_num_threads(max(1, threads))
        self.b = load_bundle(bundle)
        self.trie = CatalogTrie.from_catalog(self.b.tokenizer, list(self.b.catalog["id_text"]))
        self.search = ConstrainedBeamSearch(self.b.model, self.trie)
        self.beams, self.top_k, self.scale = beams, top_k, tuple(scale)
        self.dense = (self.b.manifest.get("inference") or {}).get("sequential") == "dense"
        self.ids = list(self.b.catalog["id_text"])

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from .generate import generate_text, predict_ratings, predict_ratings_dense, score_candidates

        tok, model = self.b.tokenizer, self.b.model
        out = pd.DataFrame({"task": batch["task"], "user": batch["user"], "truth": batch["truth"],
                            "target": batch["target"]})
        out["items"] = [[] for _ in range(len(batch))]
        out["text"] = None
        out["rank"] = -1
        prefix = [list(p) for p in batch["prefix"]]
        # dense bundles answer sequential rows, and direct rows built from the same input, by the next-item scores
        dense = np.array([self.dense and (t.startswith("sequential") or len(p) > 0) for t, p in
                          zip(batch["task"], prefix)])
        tokens = lambda rows: [tok.item_token_ids(prefix[r]) for r in rows]  # noqa: E731
        seq = batch["task"].str.startswith("sequential").to_numpy()
        if seq.any():
            sub = batch[seq]
            rows = np.flatnonzero(seq)
            items, _ = self.search.search(tok.encode_batch(list(sub["source"])), beams=self.beams, k=self.top_k,
                                          exclude=list(sub["exclude"]),
                                          prefix=tokens(rows) if dense[rows].all() else None)
            out.loc[seq, "items"] = pd.Series([[int(i) for i in row if i >= 0] for row in items.tolist()],
                                              index=sub.index)
        direct = (batch["task"] == "direct").to_numpy()
        if direct.any():
            from .metrics import rank_among_candidates

            sub = batch[direct]
            rows = np.flatnonzero(direct)
            if dense[rows].all():  # the next-item scores of the candidates
                s = self.search.item_scores(tok.encode_batch(list(sub["source"])), tokens(rows)).numpy()
                scores = [s[r, np.asarray(c, dtype=np.int64)] for r, c in enumerate(sub["candidates"])]
            else:
                scores = score_candidates(model, tok, list(sub["source"]),
                                          [[self.ids[i] for i in c] for c in sub["candidates"]])
            out.loc[direct, "rank"] = [rank_among_candidates(s, 0) for s in scores]
        m = (batch["task"] == "rating").to_numpy()
        if m.any():  # the expected rating over the scale's rating texts or tokens (as serving answers)
            rated = m & np.array([len(p) > 0 for p in prefix])
            if rated.any():
                out.loc[rated, "text"] = predict_ratings_dense(model, tok, list(batch.loc[rated, "source"]),
                                                               [prefix[r] for r in np.flatnonzero(rated)], *self.scale)
            if (m & ~rated).any():
                out.loc[m & ~rated, "text"] = predict_ratings(model, tok, list(batch.loc[m & ~rated, "source"]),
                                                              *self.scale)
        for fam, new_tokens, beams in (("explanation", 32, 4), ("review", 32, 4)):
            m = (batch["task"] == fam).to_numpy()
            if m.any():
                out.loc[m, "text"] = generate_text(model, tok, list(batch.loc[m, "source"]), new_tokens, beams)
        return out


# ----------------------------------------------------------------------------- scoring
def _score(pred: pd.DataFrame, info: dict, k: int) -> dict:
    from .generate import parse_rating
    from .metrics import ranking_metrics, ranks_of_truth, rating_metrics, text_metrics

    res = {}
    for task in sorted(pred["task"].unique()):
        p = pred[pred["task"] == task]
        if task.startswith("sequential"):
            lists = list(p["items"])
            m = ranking_metrics(ranks_of_truth(lists, list(p["truth"])))
            m["invalid"] = int(sum(1 for lst in lists for i in lst if not 0 <= i < info["n_items"]))
            m["short_lists"] = int(sum(1 for lst in lists if len(lst) < k))
        elif task == "direct":
            m = ranking_metrics(list(p["rank"]), ks_hr=(1, 5, 10), ks_ndcg=(5, 10))
            m["invalid"] = 0
        elif task == "rating":
            lo, hi = info["scale"]
            m = rating_metrics([parse_rating(t, lo, hi) for t in p["text"]], [float(t) for t in p["target"]])
        else:
            m = text_metrics([t or "" for t in p["text"]], list(p["target"]))
            m["empty"] = int(sum(1 for t in p["text"] if not t))
        m["n"] = int(len(p))
        res[task] = m
    return res


def _baseline_results(data_dir: str, rows: pd.DataFrame, info: dict, cfg: EvalConfig, log=print) -> dict:
    """Train every baseline on the training split and score it on the evaluation rows of ``build_rows``.

    SASRec stops early on full-ranking NDCG@10 of the validation split (each user's training items, then
    the validation item), keeping its best epoch; the test split is never seen in training or selection
    (with ``split=valid`` its figures are selected on the split they report, so they flatter it).
    Scores are computed ``SCORE_BATCH`` users at a time, so a large catalog times many users fits in memory."""
    from .baselines import BASELINES
    from .dataset import PreparedData
    from .metrics import rank_among_candidates, ranking_metrics, ranks_of_truth, rating_metrics

    data = PreparedData.open(data_dir)
    seqs = data.sequences_pandas(columns=["user", "index", "n_train"])
    users = list(seqs["user"])
    train = [[int(i) for i in ix[:int(n)]] for ix, n in zip(seqs["index"], seqs["n_train"])]
    # validation: the user's training items, then the validation item (index[n_train]) where there is one
    has_valid = [len(ix) > int(n) for ix, n in zip(seqs["index"], seqs["n_train"])]
    valid = ([t for t, v in zip(train, has_valid) if v],
             [int(ix[int(n)]) for ix, n, v in zip(seqs["index"], seqs["n_train"], has_valid) if v])
    inter = data.interactions_pandas(columns=["user", "item", "rating", "split"])
    inter = inter[(inter["split"] == "train") & inter["rating"].notna()]
    pos = pd.Index(data.catalog["item"]).get_indexer(inter["item"]).astype(np.int64)
    # a data set without ratings gives empty arrays: popularity then has no rating prediction
    ratings = {"items": pos[pos >= 0], "values": inter["rating"].to_numpy(dtype=float)[pos >= 0]}
    seq_rows = rows[rows["task"] == "sequential/seen"]
    direct_rows = rows[rows["task"] == "direct"]
    fit_args = {"two-tower": {"epochs": cfg.two_tower_epochs},
                "SASRec": {"epochs": cfg.sasrec_epochs, "valid": valid, "patience": cfg.sasrec_patience,
                           "patience_steps": cfg.sasrec_patience_steps,
                           "max_minutes": cfg.sasrec_minutes or None, "log": log}}
    out = {}
    for name, cls in BASELINES.items():
        t0 = time.perf_counter()
        model = cls(info["n_items"]).fit(train, users, ratings=ratings, seed=cfg.seed, **fit_args.get(name, {}))
        res = {}
        hist, truth, excl = list(seq_rows["history"]), list(seq_rows["truth"]), list(seq_rows["exclude"])
        seq_users, top = list(seq_rows["user"]), []
        for b in range(0, len(hist), SCORE_BATCH):
            s = np.array(model.scores(hist[b:b + SCORE_BATCH], seq_users[b:b + SCORE_BATCH]), dtype=np.float64)
            for r, ex in enumerate(excl[b:b + SCORE_BATCH]):
                if len(ex):
                    s[r, np.asarray(ex, dtype=np.int64)] = -np.inf
            top.extend(np.argsort(-s, axis=1, kind="stable")[:, :cfg.top_k].tolist())
        res["sequential/seen"] = {**ranking_metrics(ranks_of_truth(top, truth)), "invalid": 0, "n": int(len(seq_rows))}
        hist, cands, ranks = list(direct_rows["history"]), list(direct_rows["candidates"]), []
        d_users = list(direct_rows["user"])
        for b in range(0, len(hist), SCORE_BATCH):
            s = model.scores(hist[b:b + SCORE_BATCH], d_users[b:b + SCORE_BATCH])
            ranks += [rank_among_candidates(s[r, np.asarray(c)], 0) for r, c in enumerate(cands[b:b + SCORE_BATCH])]
        res["direct"] = {**ranking_metrics(ranks, ks_hr=(1, 5, 10), ks_ndcg=(5, 10)), "invalid": 0,
                         "n": int(len(direct_rows))}
        rr = rows[rows["task"] == "rating"]
        if hasattr(model, "predict_rating") and getattr(model, "rates", True) and len(rr):
            items = pd.Index(data.catalog["item"]).get_indexer(rr["item"])
            res["rating"] = {**rating_metrics(model.predict_rating(list(rr["user"]), items),
                                              [float(t) for t in rr["target"]]), "n": int(len(rr))}
        for key in ("best_epoch", "epochs_run", "best_val_ndcg10"):
            if getattr(model, key, None) is not None:
                res[key] = getattr(model, key)
        res["train_seconds"] = round(time.perf_counter() - t0, 1)
        stop = (f" (best epoch {res['best_epoch']} of {res['epochs_run']}, valid NDCG@10 "
                f"{res['best_val_ndcg10']:.4f})" if "best_val_ndcg10" in res else "")
        log(f"evaluate: baseline {name} trained and scored in {res['train_seconds']} s{stop}")
        out[name] = res
    return out


SCORE_BATCH = 1024  # users scored at a time by a baseline (a (batch, n_items) array)


TABLE_ROWS = [("sequential/seen", ["HR@1", "HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20", "invalid"]),
              ("sequential/held-out", ["HR@5", "HR@10", "NDCG@10", "invalid"]),
              ("direct", ["HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10", "invalid"]),
              ("rating", ["RMSE", "MAE", "unparseable"]),
              ("explanation", ["BLEU-4", "ROUGE-1", "ROUGE-2", "ROUGE-L"]),
              ("review", ["BLEU-4", "ROUGE-1", "ROUGE-2", "ROUGE-L"])]


def format_table(results: dict) -> str:
    """One table: a row per (task, metric), a column per method."""
    methods = list(results)
    lines = [f"{'task':<20} {'metric':<12}" + "".join(f"{m:>13}" for m in methods)]
    lines.append("-" * len(lines[0]))
    for task, metrics in TABLE_ROWS:
        if not any(task in results[m] for m in methods):
            continue
        n = next(results[m][task].get("n") for m in methods if task in results[m])
        for metric in metrics:
            cells = []
            for m in methods:
                v = results[m].get(task, {}).get(metric)
                cells.append("—" if v is None else (f"{v}" if isinstance(v, int) else
                                                    "nan" if isinstance(v, float) and math.isnan(v) else f"{v:.4f}"))
            label = f"{task} (n={n})" if metric == metrics[0] else ""
            lines.append(f"{label:<20} {metric:<12}" + "".join(f"{c:>13}" for c in cells))
    return "\n".join(lines)


def run(cfg: EvalConfig, log=print) -> dict:
    import ray

    from .bundle import check_catalog, load_bundle
    from .runtime import ensure_ray

    if cfg.split not in ("valid", "test"):
        raise ValueError(f"split must be valid or test, not {cfg.split!r}")
    if cfg.top_k > cfg.beams:
        raise ValueError(f"top_k={cfg.top_k} is larger than beams={cfg.beams}")
    t0 = time.perf_counter()
    bundle = load_bundle(cfg.bundle)  # fail early on a bad bundle, before any Ray work
    data_dir = cfg.data or bundle.manifest.get("data", {}).get("path")
    check_catalog(bundle.catalog, data_dir)
    ensure_ray()
    rows, info = build_rows(data_dir, str(bundle.templates_dir), cfg, log, inference=bundle.manifest.get("inference"))
    log(f"evaluate: {info['users']} users, {len(rows)} prompts on split {cfg.split}, "
        f"{cfg.replicas} model replica(s)")
    cols = rows[["task", "user", "source", "prefix", "truth", "exclude", "candidates", "target"]]
    step = max(1, math.ceil(len(cols) / max(4, 4 * cfg.replicas)))
    ds = ray.data.from_pandas([cols.iloc[i:i + step] for i in range(0, len(cols), step)])
    threads = max(1, int(cfg.cpus_per_replica))
    pred = ds.map_batches(BundlePredictor, fn_constructor_kwargs={"bundle": str(Path(cfg.bundle).resolve()),
                                                                  "beams": cfg.beams, "top_k": cfg.top_k,
                                                                  "threads": threads, "scale": info["scale"]},
                          batch_size=cfg.batch_size, batch_format="pandas",
                          compute=ray.data.ActorPoolStrategy(size=cfg.replicas),
                          num_cpus=cfg.cpus_per_replica).to_pandas()
    infer_s = time.perf_counter() - t0
    results = {"recflm": _score(pred, info, cfg.top_k)}
    path = Path(cfg.out) if cfg.out else Path(cfg.bundle) / f"metrics_{cfg.split}.json"

    def write(**extra) -> dict:
        out = {"split": cfg.split, "bundle": str(cfg.bundle), "data": str(data_dir), "users": info["users"],
               "config": to_dict(cfg), "seconds": round(time.perf_counter() - t0, 1),
               "inference_seconds": round(infer_s, 1), "results": results, **extra}
        path.write_text(json.dumps(out, indent=2, default=float))
        return out

    if cfg.baselines:
        # the model's results are on disk before the baselines run: a baseline that fails loses nothing
        write(baselines="pending")
        try:
            results.update(_baseline_results(data_dir, rows, info, cfg, log))
        except Exception as e:
            write(baselines=f"failed: {type(e).__name__}: {e}")
            log(f"evaluate: the baselines failed; recflm's metrics are in {path}")
            raise
    # the held-out template row is recflm's own: baselines have no prompts
    out = write()
    print(format_table(results))
    log(f"evaluate: metrics written to {path} ({out['seconds']} s)")
    return out


# ----------------------------------------------------------------------------- the CLI stage (recflm evaluate)
HELP = "evaluate a bundle on the held-out split (valid-only generation), optionally against baselines"


def add_arguments(p, name: str) -> None:
    p.description = HELP + ". Writes metrics.json and prints one table."
    p.add_argument("--bundle", help="the model bundle (config key: bundle)")
    p.add_argument("--data", help="prepared dataset directory (default: the one the bundle was trained on)")
    p.add_argument("--split", choices=["valid", "test"], help="evaluation split (default test)")
    p.add_argument("--baselines", action="store_true", help="also train and score popularity, two-tower and SASRec")
    p.add_argument("--replicas", type=int, help="model replicas in the Ray Data actor pool")
    p.add_argument("--max-users", type=int, help="evaluate the first N users only (0: all)")


def command(args) -> int:
    cfg = flags_into(load_config(EvalConfig, args.config, args.overrides), args,
                     ("bundle", "data", "split", "replicas", "max_users"))
    run(replace(cfg, baselines=True) if args.baselines else cfg)
    return 0
