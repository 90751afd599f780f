"""``recflm evaluate``: honest numbers for a bundle, with baselines on the same split and protocol.

Protocols (split ``test`` by default; leave-one-out, so each user has one held-out item). Every family is
asked with its first seen template and again, as ``<task>/held-out``, with a held-out (never trained)
template: the zero-shot table puts the two side by side.

- sequential, full ranking: the prompt holds the user's items before the held-out one (the last
  ``max_history``); constrained beam search (beam 20) returns the top 20 catalog items, the user's
  earlier items excluded (for every method alike); HR@1/5/10/20 (= recall@k: one relevant item),
  NDCG@5/10/20;
- direct, 1-of-100: the held-out item and 99 fixed seeded negatives (the user never interacted
  with them; the same draw as the data stage's direct prompts), ranked by sequence log-probability
  (dense bundles: by next-item score); HR@1/5/10, NDCG@5/10;
- direct yes/no (``direct-yesno``): the yes/no prompts about the held-out item (yes) and one sampled
  negative (no), for ``text_examples`` users; accuracy, precision, recall and F1 of the yes answers (a
  model that answers yes or no: yes when its log-odds are above 0; a scorer, baselines and dense bundles:
  yes above its median score);
- rating: RMSE, MSE and MAE of the expected rating over the scale, unparseable outputs counted;
- explanation / review: BLEU-4 and ROUGE-1/2/L of the decoded text, where the data has text; review
  prompts whose answer is a rating (``review-rating``) are scored as ratings; the review family's baselines
  (``review_baselines``: lead, nearest, means, bow-ridge) answer the same rows from the review text;
- cold start: the sequential and direct rows sliced by the user's history length (< k) and by the held-out
  item's training interactions (<= k), and ``sequential/last-k`` rows that give ``cold_users`` users' last k
  items only (a user known by k items), for recflm and every baseline that answers from a history; where the
  data holds users out of training (``prepare --holdout-users``), the ``|new-user`` and ``|seen-user`` slices:
  a new user is asked from the history the row supplies, as serving asks about a user it does not know (a
  per-user-ID baseline has no answer for one: shown n/a, not 0);
- P5's cold-start prompts, where the catalog has attributes (MovieLens titles and genres): ``direct-attr``, the
  yes/no question about the held-out item (yes) and one sampled negative (no) described by their attributes
  instead of their IDs, for ``text_examples`` users (accuracy, precision, recall, F1 and AUC), and
  ``direct-attr-choice``, the held-out item among ``ATTR_CANDIDATES`` - 1 of the fixed negatives, all described
  by their attributes (HR@1/3, NDCG@3/5), each seen and held out; baselines score the same (history, item) pairs.

Model inference runs as Ray Data batch inference: ``map_batches`` over the evaluation rows with an
actor pool of model replicas (``replicas``), so it scales out like the rest of the platform.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
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
    text_examples: int = 300  # rating / explanation / review examples, and yes/no users, evaluated (0: all)
    cold_users: int = 500  # users asked again with only their last k items (sequential/last-k; 0: all)
    cold_ks: list = field(default_factory=lambda: [3, 5])  # the k of the cold-start slices and rows
    families: list = field(default_factory=list)  # evaluate these families only, e.g. [sequential] (empty: all)
    baselines: bool = False
    two_tower_epochs: int = 50  # two-tower's most epochs; it stops early on validation NDCG@10 (the valid split)
    two_tower_patience: int = 5  # ... after this many epochs without improvement, keeping the best epoch,
    two_tower_minutes: float = 5  # ... or after this many minutes of training (0: no limit)
    sasrec_epochs: int = 200  # SASRec's most epochs; it stops early on validation NDCG@10 (the valid split)
    sasrec_patience: int = 10  # ... after this many epochs without improvement, keeping the best epoch,
    sasrec_patience_steps: int = 1000  # ... and at least this many optimizer steps (small data: short epochs)
    sasrec_minutes: float = 0  # ... or after this many minutes of training (0: no limit)
    out: str = ""  # metrics.json path (default: <bundle>/metrics_<split>.json)
    seed: int = 2022


# ----------------------------------------------------------------------------- evaluation rows
ROW_COLUMNS = ["task", "user", "source", "prefix", "truth", "history", "exclude", "candidates", "target", "item"]
SLICE_COLUMNS = ("history_len", "item_count", "new_user")  # what the cold-start slices of the scores read
HELD_OUT = "/held-out"  # the suffix of a task scored with a template never used in training (zero-shot)


def _item_counts(data) -> np.ndarray:
    """Training interactions per catalog item (the item side of the cold-start slices)."""
    inter = data.interactions_pandas(columns=["item", "split"])
    pos = pd.Index(data.catalog["item"]).get_indexer(inter.loc[inter["split"] == "train", "item"])
    return np.bincount(pos[pos >= 0], minlength=len(data.catalog))


def _sample(part: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """The same ``n`` examples whatever order they came in (seen and held-out variants share the draw)."""
    part = part.sort_values(["user", "item"], kind="stable").reset_index(drop=True)
    return part.sample(n=n, random_state=seed) if n and len(part) > n else part


def build_rows(data_dir: str, templates_dir: str, cfg: EvalConfig, log=print,
               inference: dict | None = None) -> tuple[pd.DataFrame, dict]:
    """One row per (task, user or example): the prompt (and, dense style, the decoder prefix) and what
    the answer is checked against. ``inference``: the bundle manifest's settings (``train.inference_settings``).

    Every family is asked with its first seen template and, as ``<task>/held-out``, with a held-out one
    (zero-shot). ``sequential/last-K`` rows give only the user's last K items (a user with a short
    history); ``direct-yesno`` rows ask the yes/no prompts about the held-out item (yes) and one sampled
    negative (no); review prompts whose answer is a rating are the ``review-rating`` task."""
    from .augment import EVAL_CANDIDATES, SPLIT_CODE, sample_negatives, example_rng, example_dataset
    from .config import PromptConfig
    from .dataset import PreparedData
    from .prompts import (ATTR_CANDIDATES, ATTR_CANDIDATES_FIELD, ATTR_FIELD, ATTR_SEPARATOR, FAMILIES, attr_template,
                          format_rating, is_rated, item_attributes, load_templates, rated_positions, rating_input,
                          rating_template, sequential_input, sequential_template)

    data = PreparedData.open(data_dir)
    pcfg = from_dict(PrepareConfig, data.manifest["config"])
    temps = load_templates(templates_dir)
    ids = data.id_texts
    inference = inference or {}
    wanted = lambda fam: not cfg.families or fam in cfg.families  # noqa: E731
    unknown = [f for f in cfg.families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"families: unknown family {unknown[0]!r} (known: {', '.join(FAMILIES)})")
    rated = wanted("rating") and inference.get("rating") == "dense" and "rating" in data.families and "rating" in temps
    seqs = data.sequences_pandas(columns=["user", "index", "n_train", "items", "ratings"])
    off = SPLIT_CODE[cfg.split] - 1
    seqs = seqs[seqs["index"].map(len) > seqs["n_train"] + off].reset_index(drop=True)
    seqs = seqs[(seqs["n_train"] + off >= 1) & (seqs["n_train"] >= 1)]  # n_train 0: held out whole (text only)
    if cfg.max_users:
        seqs = seqs.head(cfg.max_users)
    dense = inference.get("sequential") == "dense"
    H = int(inference.get("history", pcfg.prompts.max_history))
    R = int(inference.get("rating_history", PromptConfig().rating_window - 1)) + 1
    seq_t = {"seen": sequential_template(temps, dense), "held-out": sequential_template(temps, dense, held_out=True)}
    direct_by_seq = inference.get("direct") == "sequential"
    pick = lambda held, need: next((t for t in temps.get("direct", []) if t.held_out == held  # noqa: E731
                                    and need in t.fields and t.fields <= {"user", "history", "item", need}), None)
    direct_t = {"": pick(False, "candidates"), HELD_OUT: pick(True, "candidates")}
    yesno_t = {"": pick(False, "answer"), HELD_OUT: pick(True, "answer")}
    attrs = item_attributes(data.catalog)  # the cold-start prompts: items described by attributes, where known
    attr_t = {(choice, suffix): attr_template(temps, choice, held_out=bool(suffix))
              for choice in (False, True) for suffix in ("", HELD_OUT)} if any(attrs) else {}
    rating_t = {"": rating_template(temps, dense=True), HELD_OUT: rating_template(temps, dense=True, held_out=True)} \
        if rated else {}
    lo, hi = pcfg.rating_min, pcfg.rating_max
    short_users = set(seqs["user"].sample(n=min(cfg.cold_users, len(seqs)), random_state=cfg.seed)
                      if cfg.cold_users else seqs["user"])
    yesno_users = set(seqs["user"].sample(n=min(cfg.text_examples, len(seqs)), random_state=cfg.seed)
                      if cfg.text_examples else seqs["user"]) if wanted("direct") else set()
    rows, rating_rows = [], []
    for user, index, n_train, keys, ratings in seqs.itertuples(index=False):
        index = [int(i) for i in index]
        t = int(n_train) + off
        hist = index[:t]
        excl = hist if cfg.exclude_seen else []
        common = {"user": user, "history": hist, "item": keys[t]}
        if rated and is_rated(ratings[t]):  # dense rating: the pairs before, then the item
            known = rated_positions(ratings, t)
            for suffix, temp in rating_t.items():
                if temp is None:
                    continue
                src, prefix = rating_input(temp, [ids[index[k]] for k in known], [ratings[k] for k in known],
                                           ids[index[t]], R, lo, hi)
                rating_rows.append({**common, "task": "rating" + suffix, "source": src, "prefix": prefix,
                                    "truth": -1, "history": [], "exclude": [], "candidates": [],
                                    "target": format_rating(min(max(float(ratings[t]), lo), hi))})
        for kind, temp in seq_t.items():
            if temp is None or not wanted("sequential"):
                continue
            src, prefix = sequential_input(temp, user, [ids[i] for i in hist], H)
            rows.append({**common, "task": f"sequential/{kind}", "source": src, "prefix": prefix or [],
                         "truth": index[t], "exclude": excl, "candidates": [], "target": ids[index[t]]})
        if user in short_users and seq_t["seen"] is not None and wanted("sequential"):
            for k in cfg.cold_ks:  # a user who has only the last k items (the earlier ones are unknown)
                if len(hist) > k:
                    src, prefix = sequential_input(seq_t["seen"], user, [ids[i] for i in hist[-k:]], H)
                    rows.append({**common, "task": f"sequential/last-{k}", "source": src, "prefix": prefix or [],
                                 "history": hist[-k:], "truth": index[t],
                                 "exclude": hist[-k:] if cfg.exclude_seen else [], "candidates": [],
                                 "target": ids[index[t]]})
        # the same fixed draw as the data stage: rng of (seed, epoch 0, split, user)
        urng = example_rng(pcfg.seed, 0, cfg.split, user)
        cands = [index[t]] + sample_negatives(urng, len(ids), set(index), EVAL_CANDIDATES - 1)
        shown = list(cands)
        urng.shuffle(shown)
        fields = {"user": user, "history": ", ".join(ids[i] for i in hist[-5:]), "item": ids[index[t]],
                  "candidates": ", ".join(ids[i] for i in shown)}
        for suffix in ("", HELD_OUT) if wanted("direct") else ():
            if direct_by_seq:  # the candidates ranked by the model's next-item scores after the history
                temp = seq_t["seen" if not suffix else "held-out"]
                src, prefix = sequential_input(temp, user, [ids[i] for i in hist], H) if temp else (None, None)
            else:
                temp = direct_t[suffix]
                src, prefix = (temp.render(fields)[0], None) if temp else (None, None)
            if src is not None:
                rows.append({**common, "task": "direct" + suffix, "source": src, "prefix": prefix or [],
                             "truth": index[t], "exclude": [], "candidates": cands, "target": ids[index[t]]})
        attr_fields = {"user": user, "history": fields["history"]}
        if user in yesno_users and attrs[index[t]]:  # the held-out item and 1-of-N - 1 fixed negatives, by attributes
            choice = [j for j in cands if attrs[j]][:ATTR_CANDIDATES]
            shown = list(choice)
            example_rng(pcfg.seed, 0, cfg.split, user + "|attr").shuffle(shown)
            for suffix in ("", HELD_OUT) if len(choice) > 1 else ():
                temp = attr_t.get((True, suffix))
                if temp is not None:
                    src = temp.render({**attr_fields, ATTR_FIELD: attrs[index[t]],
                                       ATTR_CANDIDATES_FIELD: ATTR_SEPARATOR.join(attrs[j] for j in shown)})[0]
                    rows.append({**common, "task": "direct-attr-choice" + suffix, "source": src, "prefix": [],
                                 "truth": index[t], "exclude": [], "candidates": choice, "target": attrs[index[t]]})
        if user in yesno_users:  # yes about the held-out item, no about one item the user never chose
            neg = sample_negatives(example_rng(pcfg.seed, 0, cfg.split, user + "|yes-no"), len(ids), set(index), 1)
            for item, answer in [(index[t], "yes")] + [(j, "no") for j in neg]:
                for suffix in ("", HELD_OUT):
                    if direct_by_seq:  # scored by the next-item score of the asked item
                        temp = seq_t["seen" if not suffix else "held-out"]
                        src, prefix = sequential_input(temp, user, [ids[i] for i in hist], H) if temp else (None, None)
                    else:
                        temp = yesno_t[suffix]
                        src, prefix = (temp.render({**fields, "item": ids[item], "answer": answer})[0], None) \
                            if temp else (None, None)
                    if src is not None:
                        rows.append({**common, "task": "direct-yesno" + suffix, "source": src, "prefix": prefix or [],
                                     "truth": int(answer == "yes"), "exclude": [], "candidates": [item],
                                     "target": answer})
                    temp = attr_t.get((False, suffix))
                    if temp is not None and attrs[item] and attrs[index[t]]:  # the same question, by attributes
                        src = temp.render({**attr_fields, ATTR_FIELD: attrs[item], "answer": answer})[0]
                        rows.append({**common, "task": "direct-attr" + suffix, "source": src, "prefix": [],
                                     "truth": int(answer == "yes"), "exclude": [], "candidates": [item],
                                     "target": answer})
    if rating_rows:
        part = pd.DataFrame(rating_rows)
        users = _sample(part[part["task"] == "rating"], cfg.text_examples, cfg.seed)["user"]
        rows += part[part["user"].isin(set(users))].to_dict("records")
    fams = [f for f in ("rating", "explanation", "review") if f in data.families and f in temps and wanted(f)
            and not (f == "rating" and inference.get("rating") == "dense")]
    if fams:
        targets = {t.id: t.target for ts in temps.values() for t in ts}
        for suffix, held in (("", False), (HELD_OUT, True)):
            ex = example_dataset(data_dir, pcfg, split=cfg.split, families=fams, held_out=held,
                                 log=lambda *a: None).to_pandas()
            # a review prompt whose answer is a rating is scored as a rating
            ex["task"] = [f"{fam}-rating" if fam == "review" and targets.get(t) == "{rating}" else fam
                          for fam, t in zip(ex["family"], ex["template"])]
            for task in sorted(ex["task"].unique()):
                for r in _sample(ex[ex["task"] == task], cfg.text_examples, cfg.seed).itertuples(index=False):
                    rows.append({"task": task + suffix, "user": r.user, "source": r.source, "prefix": [],
                                 "truth": -1, "history": [], "exclude": [], "candidates": [], "target": r.target,
                                 "item": r.item})
    out = pd.DataFrame(rows, columns=ROW_COLUMNS)
    out["history_len"] = out["history"].map(len)
    new_users = data.holdout_users
    out["new_user"] = out["user"].isin(new_users).astype(bool)
    counts = _item_counts(data)
    out["item_count"] = [int(counts[i]) if i >= 0 else -1 for i in
                         pd.Index(data.catalog["item"]).get_indexer(out["item"].fillna(""))]
    info = {"users": int(len(seqs)), "n_items": len(ids), "scale": (pcfg.rating_min, pcfg.rating_max),
            "cold_ks": list(cfg.cold_ks), "new_users": int(seqs["user"].isin(new_users).sum()),
            "holdout": bool(new_users)}
    return out, info


# ----------------------------------------------------------------------------- model replicas
def family_of(task: str) -> str:
    """``sequential/seen`` -> sequential, ``rating/held-out`` -> rating, ``review-rating`` -> review-rating."""
    return task.split("/")[0]


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
        from .prompts import item_attributes

        self.attrs = item_attributes(self.b.catalog)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from .generate import generate_text, predict_ratings, predict_ratings_dense, score_candidates
        from .metrics import rank_among_candidates

        tok, model = self.b.tokenizer, self.b.model
        batch = batch.reset_index(drop=True)
        out = pd.DataFrame({"task": batch["task"], "user": batch["user"], "truth": batch["truth"],
                            "target": batch["target"]})
        for col in SLICE_COLUMNS:
            if col in batch:
                out[col] = batch[col]
        out["items"] = [[] for _ in range(len(batch))]
        out["text"] = None
        out["rank"] = -1
        out["score"] = np.nan
        fam = batch["task"].map(family_of).to_numpy()
        prefix = [list(p) for p in batch["prefix"]]
        # dense bundles answer sequential rows, and direct rows built from the same input, by the next-item scores
        dense = np.array([self.dense and (f == "sequential" or len(p) > 0) for f, p in zip(fam, prefix)])
        tokens = lambda rows: [tok.item_token_ids(prefix[r]) for r in rows]  # noqa: E731
        for task in batch["task"].unique():  # a task at a time: one style of input per call
            m = (batch["task"] == task).to_numpy()
            rows, sub, f = np.flatnonzero(m), batch[m], family_of(task)
            if f == "sequential":
                items, _ = self.search.search(tok.encode_batch(list(sub["source"])), beams=self.beams, k=self.top_k,
                                              exclude=list(sub["exclude"]),
                                              prefix=tokens(rows) if dense[rows].all() else None)
                out.loc[m, "items"] = pd.Series([[int(i) for i in row if i >= 0] for row in items.tolist()],
                                                index=sub.index)
            elif f == "direct-attr-choice":  # the candidates' attribute texts, by sequence log-probability
                scores = score_candidates(model, tok, list(sub["source"]),
                                          [[self.attrs[i] for i in c] for c in sub["candidates"]])
                out.loc[m, "rank"] = [rank_among_candidates(s, 0) for s in scores]
            elif f == "direct-attr":  # the log-odds of yes against no
                scores = score_candidates(model, tok, list(sub["source"]), [["yes", "no"]] * len(sub))
                out.loc[m, "score"] = [float(y - n) for y, n in scores]
            elif f in ("direct", "direct-yesno"):
                if dense[rows].all():  # the next-item scores of the candidates
                    s = self.search.item_scores(tok.encode_batch(list(sub["source"])), tokens(rows)).numpy()
                    scores = [s[r, np.asarray(c, dtype=np.int64)] for r, c in enumerate(sub["candidates"])]
                elif f == "direct":
                    scores = score_candidates(model, tok, list(sub["source"]),
                                              [[self.ids[i] for i in c] for c in sub["candidates"]])
                else:  # the log-odds of yes against no
                    scores = [np.array([y - n]) for y, n in score_candidates(model, tok, list(sub["source"]),
                                                                             [["yes", "no"]] * len(sub))]
                if f == "direct":
                    out.loc[m, "rank"] = [rank_among_candidates(s, 0) for s in scores]
                else:
                    out.loc[m, "score"] = [float(s[0]) for s in scores]
            elif f in ("rating", "review-rating"):  # the expected rating over the scale (as serving answers)
                if dense[rows].all() and f == "rating":
                    out.loc[m, "text"] = predict_ratings_dense(model, tok, list(sub["source"]),
                                                               [prefix[r] for r in rows], *self.scale)
                else:
                    out.loc[m, "text"] = predict_ratings(model, tok, list(sub["source"]), *self.scale)
            elif f in ("explanation", "review"):
                out.loc[m, "text"] = generate_text(model, tok, list(sub["source"]), 32, 4)
        # the yes/no threshold: log-odds 0 for a yes/no answer, the task's median score for next-item scores
        out["odds"] = ~dense | (fam == "direct-attr")
        return out


# ----------------------------------------------------------------------------- scoring
# the tasks whose rows are sliced by user history, item count and (with held-out users) new / seen user
COLD_TASKS = ("sequential/seen", "direct", "direct-attr-choice")
USER_SLICES = ("new-user", "seen-user")
ATTR_CHOICE_KS = {"ks_hr": (1, 3), "ks_ndcg": (3, 5)}  # 1-of-ATTR_CANDIDATES: HR@5 would always be 1


def cold_slices(rows: pd.DataFrame, ks, users: bool = False) -> dict:
    """Masks over ``rows`` of the cold-start slices: users whose history before the held-out item is shorter
    than k, held-out items with at most k training interactions and, ``users`` (the data holds users out of
    training), users never seen in training (``new-user``) and the others (``seen-user``)."""
    hist = rows["history_len"].to_numpy()
    count = rows["item_count"].to_numpy()
    out = {f"history<{k}": hist < k for k in ks}
    out.update({f"item<={k}": (count >= 0) & (count <= k) for k in ks})
    if users:
        new = rows["new_user"].to_numpy(dtype=bool) if "new_user" in rows else np.zeros(len(rows), dtype=bool)
        out.update({"new-user": new, "seen-user": ~new})
    return out


def ranking_result(ranks, rows: pd.DataFrame, task: str, ks, users: bool = False, **metrics_kw) -> dict:
    """``task``'s ranking metrics and, for the cold-start tasks, those of every slice (``task|slice``)."""
    from .metrics import ranking_metrics

    ranks = np.asarray(ranks, dtype=np.int64)
    out = {task: {**ranking_metrics(ranks, **metrics_kw), "invalid": 0, "n": int(len(ranks))}}
    if task in COLD_TASKS:
        for name, mask in cold_slices(rows, ks, users).items():
            out[f"{task}|{name}"] = {**ranking_metrics(ranks[mask], **metrics_kw), "n": int(mask.sum())}
    return out


def yesno_result(scores, truth, odds: bool) -> dict:
    """Accuracy, precision, recall and F1 of the yes answers (a score above the threshold: log-odds 0 for a
    model that answers yes or no, the median for a scorer, which then answers yes for half the rows), and
    the AUC of the scores (no threshold)."""
    from .metrics import auc, binary_metrics

    s = np.asarray(scores, dtype=float)
    t = np.asarray(truth, dtype=bool)
    threshold = 0.0 if odds else float(np.median(s)) if len(s) else 0.0
    return {**binary_metrics(s > threshold, t), "AUC": auc(s, t) if len(s) else float("nan"), "n": int(len(s))}


def yesno_results(scores, rows: pd.DataFrame, task: str, odds: bool, users: bool = False) -> dict:
    """``yesno_result`` of ``task`` and, with held-out users, of its new-user and seen-user slices."""
    s, truth = np.asarray(scores, dtype=float), np.asarray(rows["truth"], dtype=bool)
    out = {task: yesno_result(s, truth, odds)}
    if users:
        new = rows["new_user"].to_numpy(dtype=bool)
        for name, mask in (("new-user", new), ("seen-user", ~new)):
            out[f"{task}|{name}"] = yesno_result(s[mask], truth[mask], odds)
    return out


def _score(pred: pd.DataFrame, info: dict, k: int) -> dict:
    """Metrics per task of the model's predictions (``BundlePredictor``'s rows)."""
    from .generate import parse_rating
    from .metrics import ranks_of_truth, rating_metrics, text_metrics

    res = {}
    for task in sorted(pred["task"].unique()):
        sel = (pred["task"] == task).to_numpy()
        p, f = pred[sel], family_of(task)
        if f == "sequential":
            lists = list(p["items"])
            res.update(ranking_result(ranks_of_truth(lists, list(p["truth"])), p, task, info["cold_ks"],
                                      info.get("holdout", False)))
            res[task]["invalid"] = int(sum(1 for lst in lists for i in lst if not 0 <= i < info["n_items"]))
            res[task]["short_lists"] = int(sum(1 for lst in lists if len(lst) < k))
            continue
        if f in ("direct", "direct-attr-choice"):
            res.update(ranking_result(list(p["rank"]), p, task, info["cold_ks"], info.get("holdout", False),
                                      **(ATTR_CHOICE_KS if f == "direct-attr-choice" else
                                         {"ks_hr": (1, 5, 10), "ks_ndcg": (5, 10)})))
            continue
        if f in ("direct-yesno", "direct-attr"):
            res.update(yesno_results(p["score"], p, task, bool(p["odds"].all()), info.get("holdout", False)))
            continue
        if f in ("rating", "review-rating"):
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
    Scores are computed ``SCORE_BATCH`` users at a time, so a large catalog times many users fits in memory.
    Baselines have no prompts: they answer the seen rows of each task (the held-out ones are the same
    question in other words), the short-history rows from the history those rows give."""
    from .baselines import BASELINES
    from .dataset import PreparedData
    from .metrics import rank_among_candidates, ranks_of_truth, rating_metrics

    data = PreparedData.open(data_dir)
    seqs = data.sequences_pandas(columns=["user", "index", "n_train"])
    # users held out of training (prepare's holdout_users) are new users here too: no baseline trains on them
    seqs = seqs[~seqs["user"].isin(data.holdout_users)].reset_index(drop=True)
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
    seq_tasks = [t for t in rows["task"].unique() if family_of(t) == "sequential" and not t.endswith(HELD_OUT)]
    holdout = info.get("holdout", False)
    from .baselines import attribute_ids

    attrs, _ = attribute_ids(data.catalog)  # the item tower's features (genres, category / brand ids)
    init_args = {"two-tower": {"attrs": attrs}}
    fit_args = {"two-tower": {"epochs": cfg.two_tower_epochs, "valid": valid, "patience": cfg.two_tower_patience,
                              "max_minutes": cfg.two_tower_minutes or None, "log": log},
                "SASRec": {"epochs": cfg.sasrec_epochs, "valid": valid, "patience": cfg.sasrec_patience,
                           "patience_steps": cfg.sasrec_patience_steps,
                           "max_minutes": cfg.sasrec_minutes or None, "log": log}}

    def scored(model, part: pd.DataFrame, pick):
        """``pick(scores row, row)`` over ``part``'s rows, ``SCORE_BATCH`` users at a time."""
        hist, who, out = list(part["history"]), list(part["user"]), []
        recs = part.to_dict("records")
        for b in range(0, len(hist), SCORE_BATCH):
            s = np.array(model.scores(hist[b:b + SCORE_BATCH], who[b:b + SCORE_BATCH]), dtype=np.float64)
            out += [pick(s[r], rec) for r, rec in enumerate(recs[b:b + SCORE_BATCH])]
        return out

    def top(s, rec):
        if cfg.exclude_seen and len(rec["exclude"]):
            s = s.copy()
            s[np.asarray(rec["exclude"], dtype=np.int64)] = -np.inf
        return np.argsort(-s, kind="stable")[:cfg.top_k].tolist()

    def candidate_rank(s, rec):
        return rank_among_candidates(s[np.asarray(rec["candidates"])], 0)

    def item_score(s, rec):
        return float(s[rec["candidates"][0]])

    out = {}
    # a data set of text tasks only (the review family): the ranking baselines that answer nothing are not trained
    ranked = any(family_of(t) in ("sequential", "direct", "direct-yesno") for t in rows["task"].unique())
    rated = bool((rows["task"] == "rating").any())
    for name, cls in BASELINES.items():
        if not ranked and not (rated and hasattr(cls, "predict_rating")):
            continue
        t0 = time.perf_counter()
        model = cls(info["n_items"], **init_args.get(name, {})).fit(train, users, ratings=ratings, seed=cfg.seed,
                                                                     **fit_args.get(name, {}))
        by_history = getattr(model, "by_history", True)
        res = {}

        def answerable(task: str) -> pd.DataFrame:
            """The task's rows this baseline can answer: a per-user ID model has none for a new user."""
            part = rows[rows["task"] == task]
            if by_history or not holdout:
                return part
            return part[~part["new_user"].to_numpy(dtype=bool)]

        def not_answered(task: str) -> None:
            """The new-user slice of a model that cannot answer it: n/a with its n, not a score of 0."""
            part = rows[rows["task"] == task]
            if by_history or not holdout or task not in res:
                return
            n_new = int(part["new_user"].sum())
            res[f"{task}|new-user"] = {"n": n_new, "n/a": "a per-user ID model has no answer for a new user"}
            res[task]["unanswered"] = n_new

        for task in seq_tasks:
            if task != "sequential/seen" and not by_history:
                continue  # a per-user ID embedding trained on the whole history: no answer for a user of k items
            part = answerable(task)
            res.update(ranking_result(ranks_of_truth(scored(model, part, top), list(part["truth"])), part, task,
                                      info["cold_ks"], holdout))
            not_answered(task)
        for task, kw in (("direct", {"ks_hr": (1, 5, 10), "ks_ndcg": (5, 10)}), ("direct-attr-choice", ATTR_CHOICE_KS)):
            part = answerable(task)
            if len(part):
                res.update(ranking_result(scored(model, part, candidate_rank), part, task, info["cold_ks"], holdout,
                                          **kw))
                not_answered(task)
        for task in ("direct-yesno", "direct-attr"):  # a scorer answers yes above its median score
            part = answerable(task)
            if len(part):
                res.update(yesno_results(scored(model, part, item_score), part, task, False, holdout))
                not_answered(task)
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
    out.update(_review_baseline_results(data, rows, info, cfg, log))
    return out


def _review_baseline_results(data, rows: pd.DataFrame, info: dict, cfg: EvalConfig, log=print) -> dict:
    """The review family's baselines (``review_baselines``: lead, nearest, means, bow-ridge), fit on the training
    interactions and scored on the seen ``review`` / ``review-rating`` rows, each answered from the row's
    review text (its interaction of the evaluation split)."""
    from .review_baselines import RATING_TASK, SUMMARY_TASK, score_review_baselines

    part = rows[rows["task"].isin([SUMMARY_TASK, RATING_TASK])]
    if part.empty:
        return {}
    inter = data.interactions_pandas(columns=["user", "item", "rating", "text", "summary", "split"])
    train = inter[inter["split"] == "train"]
    review = inter[inter["split"] == cfg.split].drop_duplicates(["user", "item"]).set_index(["user", "item"])["text"]
    part = part.assign(text=review.reindex(pd.MultiIndex.from_frame(part[["user", "item"]])).to_numpy())
    return score_review_baselines(train, part, info["scale"], log)


SCORE_BATCH = 1024  # users scored at a time by a baseline (a (batch, n_items) array)


TABLE_ROWS = [("sequential/seen", ["HR@1", "HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20", "invalid"]),
              ("sequential/held-out", ["HR@5", "HR@10", "NDCG@10", "invalid"]),
              ("direct", ["HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10", "invalid"]),
              ("direct/held-out", ["HR@10", "NDCG@10"]),
              ("direct-yesno", ["accuracy", "precision", "recall", "F1", "AUC"]),
              ("direct-yesno/held-out", ["accuracy", "F1", "AUC"]),
              ("direct-attr", ["accuracy", "precision", "recall", "F1", "AUC"]),
              ("direct-attr/held-out", ["accuracy", "F1", "AUC"]),
              ("direct-attr-choice", ["HR@1", "HR@3", "NDCG@3", "NDCG@5"]),
              ("direct-attr-choice/held-out", ["HR@1", "NDCG@5"]),
              ("rating", ["RMSE", "MSE", "MAE", "unparseable"]),
              ("rating/held-out", ["RMSE", "MAE"]),
              ("explanation", ["BLEU-4", "ROUGE-1", "ROUGE-2", "ROUGE-L"]),
              ("explanation/held-out", ["BLEU-4", "ROUGE-L"]),
              ("review", ["BLEU-4", "ROUGE-1", "ROUGE-2", "ROUGE-L"]),
              ("review/held-out", ["BLEU-4", "ROUGE-L"]),
              ("review-rating", ["RMSE", "MAE"]),
              ("review-rating/held-out", ["RMSE", "MAE"])]
ZERO_SHOT = ["sequential", "direct", "direct-yesno", "direct-attr", "direct-attr-choice", "rating", "explanation",
             "review", "review-rating"]
ZERO_SHOT_METRIC = {"sequential": "NDCG@10", "direct": "NDCG@10", "direct-yesno": "F1", "direct-attr": "AUC",
                    "direct-attr-choice": "HR@1", "rating": "RMSE", "explanation": "ROUGE-L", "review": "ROUGE-L",
                    "review-rating": "RMSE"}


def _cell(v) -> str:
    return "—" if v is None else (f"{v}" if isinstance(v, int) else
                                  "nan" if isinstance(v, float) and math.isnan(v) else f"{v:.4f}")


def format_table(results: dict) -> str:
    """One table: a row per (task, metric), a column per method."""
    methods = list(results)
    lines = [f"{'task':<24} {'metric':<12}" + "".join(f"{m:>13}" for m in methods)]
    lines.append("-" * len(lines[0]))
    for task, metrics in TABLE_ROWS:
        if not any(task in results[m] for m in methods):
            continue
        n = next(results[m][task].get("n") for m in methods if task in results[m])
        for metric in metrics:
            label = f"{task} (n={n})" if metric == metrics[0] else ""
            lines.append(f"{label:<24} {metric:<12}" + "".join(f"{_cell(results[m].get(task, {}).get(metric)):>13}"
                                                               for m in methods))
    return "\n".join(lines)


def format_zero_shot(results: dict) -> str:
    """recflm's answers to the seen templates beside the held-out (never trained) ones, per family."""
    ours = results.get("recflm", {})
    lines = [f"{'family':<16} {'metric':<9} {'seen':>9} {'held-out':>9} {'n':>6}"]
    for fam in ZERO_SHOT:
        seen = ours.get("sequential/seen" if fam == "sequential" else fam)
        held = ours.get(f"{fam}{HELD_OUT}")
        if seen is None and held is None:
            continue
        metric = ZERO_SHOT_METRIC[fam]
        lines.append(f"{fam:<16} {metric:<9} {_cell((seen or {}).get(metric)):>9} "
                     f"{_cell((held or {}).get(metric)):>9} {(seen or held).get('n', 0):>6}")
    return "\n".join(lines)


def _slice_cell(entry: dict | None, metric: str) -> str:
    """A slice's metric; ``n/a`` where the method cannot answer the slice (a per-user ID model, new users)."""
    if entry and "n/a" in entry:
        return "n/a"
    return _cell((entry or {}).get(metric))


def format_cold_start(results: dict, ks=(3, 5)) -> str:
    """Per cold-start slice and method: short natural histories, the last-k rows, rare items, new and seen users
    (NDCG@10 and HR@10), and the prompts that describe items by attributes (AUC, HR@1)."""
    methods = list(results)
    rank = ("NDCG@10", "HR@10")
    keys = ([(f"sequential/seen|history<{k}", rank) for k in ks] + [(f"sequential/last-{k}", rank) for k in ks]
            + [(f"sequential/seen|item<={k}", rank) for k in ks] + [(f"direct|item<={k}", rank) for k in ks]
            + [(f"{t}|{u}", rank) for t in ("sequential/seen", "direct") for u in USER_SLICES]
            + [(f"direct-yesno|{u}", ("AUC", "F1")) for u in USER_SLICES]
            + [("direct-attr", ("AUC", "F1"))] + [(f"direct-attr|{u}", ("AUC", "F1")) for u in USER_SLICES]
            + [("direct-attr-choice", ("HR@1", "NDCG@5"))]
            + [(f"direct-attr-choice|item<={k}", ("HR@1", "NDCG@5")) for k in ks]
            + [(f"direct-attr-choice|{u}", ("HR@1", "NDCG@5")) for u in USER_SLICES])
    lines = [f"{'slice':<34} {'n':>6} {'metric':<8}" + "".join(f"{m:>13}" for m in methods)]
    for key, metrics in keys:
        if not any(key in results[m] for m in methods):
            continue
        n = next(results[m][key].get("n", 0) for m in methods if key in results[m])
        for j, metric in enumerate(metrics):
            lines.append(f"{key if j == 0 else '':<34} {n if j == 0 else '':>6} "
                         f"{metric:<8}" + "".join(f"{_slice_cell(results[m].get(key), metric):>13}"
                                                  for m in methods))
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
    cols = rows[["task", "user", "source", "prefix", "truth", "exclude", "candidates", "target", *SLICE_COLUMNS]]
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
    print("\nzero-shot: seen vs held-out (never trained) templates, recflm\n" + format_zero_shot(results))
    print("\ncold start: short histories, rare items, new users, items described by attributes\n"
          + format_cold_start(results, info["cold_ks"]))
    log(f"evaluate: metrics written to {path} ({out['seconds']} s)")
    return out


# ----------------------------------------------------------------------------- the CLI stage (recflm evaluate)
HELP = "evaluate a bundle on the held-out split (valid-only generation), optionally against baselines"


def add_arguments(p, name: str) -> None:
    p.description = HELP + ". Writes metrics.json and prints one table."
    p.add_argument("--bundle", help="the model bundle (config key: bundle)")
    p.add_argument("--data", help="prepared dataset directory (default: the one the bundle was trained on)")
    p.add_argument("--split", choices=["valid", "test"], help="evaluation split (default test)")
    p.add_argument("--baselines", action="store_true", help="also train and score popularity, two-tower and SASRec "
                   "(and, for the review family, lead, nearest, means and bow-ridge)")
    p.add_argument("--replicas", type=int, help="model replicas in the Ray Data actor pool")
    p.add_argument("--max-users", type=int, help="evaluate the first N users only (0: all)")


def command(args) -> int:
    cfg = flags_into(load_config(EvalConfig, args.config, args.overrides), args,
                     ("bundle", "data", "split", "replicas", "max_users"))
    run(replace(cfg, baselines=True) if args.baselines else cfg)
    return 0
