"""The example pipeline: a prepared dataset -> (source, target) prompt pairs, as a lazy Ray Dataset.

Nothing here is materialized: the training stage streams ``example_dataset(...)`` and every epoch
re-draws targets, templates, negatives and augmentation. Draws are seeded by (seed, epoch, split,
user or interaction), so the same seed and epoch reproduce the same examples whatever the batching,
and a new epoch draws new ones.

Augmentation operators (probabilities in ``AugmentConfig``), applied to training examples only:

- ``crop``: keep a random contiguous window (at least half) of the history
- ``mask``: replace a share of history items by ``<mask>``
- ``reorder``: shuffle a short random window of the history
- ``substitute``: replace one history item by a random item the user never interacted with (noise)
- ``rating_noise``: add Gaussian noise to rating targets (rounded to 0.1, clipped to the scale)
- ``merge_sources``: users of secondary sources join an epoch with this probability (expansion by
  merging sources; the first source is the primary one and is always in)

The sequential family has two styles (``prompts.sequential_style``): ``prompt`` (P5: the history in
the source, one next-item target) and ``dense`` (the target is a window of the user's training items,
one token per item, every position a next-item target; see ``prompts.sequential_input`` for how
inference renders it); ``both`` emits the two. The rating family has two styles too
(``prompts.rating_style``): ``prompt`` (one (user, item) prompt per training interaction) and ``dense``
(the target is a window of the user's (item, rating) pairs, one token each, every rating a target; see
``prompts.rating_input``); dense rating examples come from the user sequences, not the interaction rows.

The ``span`` and ``next`` families (asked for by name) are the self-supervised objectives on raw sequences
(``SELF_SUPERVISED``): in ``span`` a contiguous span of 1-3 training items is replaced by ``<mask>`` and is the
target (encoder-side: the items are in the source); in ``next`` (causal next-item, the dense rows' shape) the
source is one fixed sentence naming no user and the target is a window of ``dense_max_len`` training items, one
token per item, every position a next-item target of the decoder, every window of the training sequence one
example (on the valid and test splits: the window ending at the split's item, whose position is what validation
scores). ``next`` is the dense sequential style's objective under a family of its own, so that a label-free
pretrain of the decoder is not the labelled ``sequential`` family.

Cold start: ``direct`` examples also carry the item described by its attributes (``item_attr``; for a 1-of-N
choice, ``prompts.ATTR_CANDIDATES`` candidates so described) where the catalog has attributes (MovieLens titles
and genres), so P5's cold-start templates (``direct-attr-*``) are trained where the data allows. Users held out
by ``prepare --holdout-users`` (sequences' ``holdout``) are in no example of the train and valid splits: their
interactions reach no training family or stage, pretraining or fine-tuning.

Leak-freedom: training examples use only training interactions (histories, targets, rating /
explanation / review rows of split ``train``); negatives for direct prompts are drawn from items
the user never interacted with in any split.
"""
from __future__ import annotations

import hashlib
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from .config import AugmentConfig, PrepareConfig, PromptConfig
from .dataset import INTERACTIONS, SEQUENCES, PreparedData
from .prompts import (ATTR_CANDIDATES, ATTR_CANDIDATES_FIELD, ATTR_FIELD, ATTR_SEPARATOR, DENSE_FIELD, FAMILIES,
                      RATED_FIELD, format_rating, is_rated, item_attributes, load_templates, rated_positions,
                      rated_sequence, usable)

SPLIT_CODE = {"train": 0, "valid": 1, "test": 2}
# the splits training reads (its examples, and validation for selection): held-out users are in neither
HOLDOUT_SPLITS = ("train", "valid")
SEQUENTIAL_STYLES = ("prompt", "dense", "both")
RATING_STYLES = ("prompt", "dense")
EVAL_CANDIDATES = 100
EXAMPLE_COLUMNS = ["family", "template", "source", "target", "user", "item", "split", "epoch"]
MASK = "<mask>"
# the self-supervised objective on raw sequences: a masked span of items is the target
SPAN = "span"
SPAN_SOURCE = "Fill in the masked items in the sequence of user_{user}: {history}"
# the self-supervised objective of the dense style: the decoder predicts every next item of a window of the sequence
NEXT = "next"
NEXT_SOURCE = "Continue this sequence of items, one item after another."
SELF_SUPERVISED = (SPAN, NEXT)  # label-free families: raw training sequences only, no prompt template


def dense_rating(prompts: PromptConfig) -> bool:
    """Whether rating examples are of the dense style (built from user sequences, not interaction rows)."""
    if prompts.rating_style not in RATING_STYLES:
        raise ValueError(f"prompts.rating_style={prompts.rating_style!r}: expected one of {', '.join(RATING_STYLES)}")
    return prompts.rating_style == "dense"


@lru_cache(maxsize=4)
def _context(data_dir: str, templates_dir: str):
    """Per worker process: catalog arrays and templates, loaded once."""
    data = PreparedData.open(data_dir)
    cat = data.catalog
    ids = cat["id_text"].to_numpy(dtype=object)
    titles = cat["title"].to_numpy(dtype=object) if "title" in cat else np.full(len(cat), None, dtype=object)
    desc = np.array([f"{i} ({t})" if isinstance(t, str) else str(i) for i, t in zip(ids, titles)], dtype=object)
    index = pd.Index(cat["item"])
    return {"ids": ids, "desc": desc, "index": index, "templates": load_templates(templates_dir or None),
            "attrs": item_attributes(cat), "holdout": data.holdout_users,
            "manifest": data.manifest, "scale": (data.manifest["config"]["rating_min"],
                                                 data.manifest["config"]["rating_max"])}


CLOCK_NAMESPACE = "recflm"


def make_epoch_clock(name: str):
    """A named 0-CPU Ray actor holding the training epoch. The training stream is one lazy dataset that
    every epoch iterates again (Ray Data re-executes it); its map tasks read the epoch from the clock, so
    each pass re-draws its examples exactly as ``example_dataset(epoch=e)`` would, and epoch boundaries
    are the passes' ends. The caller keeps the returned handle alive for the run."""
    import ray

    @ray.remote(num_cpus=0)
    class EpochClock:
        def __init__(self):
            self.epoch = 0

        def set(self, epoch: int) -> int:
            self.epoch = int(epoch)
            return self.epoch

        def get(self) -> int:
            return self.epoch

    return EpochClock.options(name=name, namespace=CLOCK_NAMESPACE, get_if_exists=True).remote()


def _epoch_of(epoch) -> int:
    """An epoch number, or the current epoch of the named clock (see ``make_epoch_clock``)."""
    if isinstance(epoch, str):
        import ray

        return int(ray.get(ray.get_actor(epoch, namespace=CLOCK_NAMESPACE).get.remote()))
    return int(epoch)


def example_rng(seed: int, epoch: int, split: str, key: str) -> np.random.Generator:
    """One generator per user: draws do not depend on how Ray Data cut the batches."""
    return np.random.default_rng([seed, epoch, SPLIT_CODE[split], zlib.crc32(key.encode())])


def row_uniforms(keys: np.ndarray, seed: int, epoch: int, split: str, n: int) -> np.ndarray:
    """``n`` uniform draws per row, a pure function of (seed, epoch, split, row key): vectorised,
    and independent of batch boundaries (splitmix64 over a seeded hash of the key)."""
    hk = hashlib.sha256(f"{seed}/{epoch}/{split}".encode()).hexdigest()[:16]
    h = pd.util.hash_array(keys, hash_key=hk).astype(np.uint64)
    out = np.empty((len(h), n))
    with np.errstate(over="ignore"):
        for j in range(n):
            z = h + np.uint64(0x9E3779B97F4A7C15) * np.uint64(j + 1)
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            z = z ^ (z >> np.uint64(31))
            out[:, j] = (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return out


def labelled_users(users, seed: int, share: float) -> np.ndarray:
    """Which users are in a seeded ``share`` of all users (a fine-tune on a fraction of the labelled users):
    a pure function of (seed, user), the same in every task, split and epoch."""
    keys = np.asarray(users, dtype=object)
    if share >= 1.0:
        return np.ones(len(keys), dtype=bool)
    return row_uniforms(keys, seed, 0, "train", 1)[:, 0] < share if len(keys) else np.zeros(0, dtype=bool)


def _augment_history(hist: list, rng: np.random.Generator, aug: AugmentConfig, ids: np.ndarray,
                     seen: set) -> list:
    hist = list(hist)
    n = len(hist)
    if n >= 2 and rng.random() < aug.crop:
        size = int(rng.integers(max(1, n // 2), n + 1))
        start = int(rng.integers(0, n - size + 1))
        hist = hist[start:start + size]
    if len(hist) >= 2 and rng.random() < aug.reorder:
        w = min(aug.reorder_window, len(hist))
        s = int(rng.integers(0, len(hist) - w + 1))
        window = hist[s:s + w]
        rng.shuffle(window)
        hist[s:s + w] = window
    if hist and rng.random() < aug.substitute:
        # the noise item is one the user never interacted with, so it cannot be a held-out item
        for j in sample_negatives(rng, len(ids), seen, 1):
            hist[int(rng.integers(0, len(hist)))] = ids[j]
    if len(hist) >= 2 and rng.random() < aug.mask:
        for j in np.flatnonzero(rng.random(len(hist)) < aug.mask_rate):
            hist[j] = MASK
    return hist


def _join_history(hist: list, rng: np.random.Generator) -> str:
    return (" -> " if rng.random() < 0.5 else ", ").join(hist)


def sample_negatives(rng: np.random.Generator, n_items: int, seen: set, k: int) -> list[int]:
    out: list[int] = []
    if n_items - len(seen) < k:
        k = max(0, n_items - len(seen))
    while len(out) < k:
        draw = rng.integers(0, n_items, size=2 * (k - len(out)) + 4)
        for d in draw:
            d = int(d)
            if d not in seen and d not in out:
                out.append(d)
                if len(out) == k:
                    break
    return out


def _emit(rows: list, fam: str, temps: list, ex: dict, u: float, held_out: bool | None, meta: dict) -> None:
    """Render ``ex`` with the usable template picked by the uniform draw ``u``."""
    cands = usable(temps, ex, held_out)
    if not cands:
        return
    t = cands[min(int(u * len(cands)), len(cands) - 1)]
    src, tgt = t.render(ex)
    rows.append({"family": fam, "template": t.id, "source": src, "target": tgt, **meta})


def sequence_examples(batch: pd.DataFrame, data_dir: str, templates_dir: str, split: str, epoch: int,
                      seed: int, prompts: PromptConfig, aug: AugmentConfig, families: list,
                      held_out: bool | None, keep: dict | None = None, users_share: float = 1.0) -> pd.DataFrame:
    """Sequential and direct examples from per-user sequences (one batch of users); ``users_share``: only
    the users of that seeded share (``labelled_users``)."""
    epoch = _epoch_of(epoch)
    ctx = _context(data_dir, templates_dir)
    ids, n_items, temps = ctx["ids"], len(ctx["ids"]), ctx["templates"]
    attrs = ctx.get("attrs") or [None] * n_items
    primary = ctx["manifest"].get("primary_source")
    rows: list = []
    if split in HOLDOUT_SPLITS and ctx.get("holdout"):  # held-out users (prepare's holdout_users) never train
        batch = batch[~batch["user"].isin(ctx["holdout"])]
    if users_share < 1.0:
        batch = batch[labelled_users(batch["user"], seed, users_share)]
    if len(batch) == 0:
        return pd.DataFrame(columns=EXAMPLE_COLUMNS)
    H = prompts.max_history
    style = prompts.sequential_style
    if style not in SEQUENTIAL_STYLES:
        raise ValueError(f"prompts.sequential_style={style!r}: expected one of {', '.join(SEQUENTIAL_STYLES)}")
    rated = "rating" in families and dense_rating(prompts)
    lo, hi = ctx["scale"] if rated else (None, None)
    W = max(1, int(prompts.rating_window))
    all_ratings = batch["ratings"] if rated else [None] * len(batch)
    for user, source, items, index, n_train, ratings in zip(batch["user"], batch["source"], batch["items"],
                                                            batch["index"], batch["n_train"], all_ratings):
        n_train, total = int(n_train), len(items)
        seen = set(int(i) for i in index)
        meta = {"user": user, "split": split, "epoch": epoch}
        rng = example_rng(seed, epoch, split, user)
        seq = [ids[int(i)] for i in index]
        if split == "train":
            if source != primary and rng.random() >= aug.merge_sources:
                continue
            if n_train < 2:
                continue
            if "sequential" in families and style != "prompt":
                # dense: every window of dense_max_len training items (the latest first) is one
                # example whose every position is a next-item target
                L = prompts.dense_max_len
                for end in range(n_train, 1, -L):
                    ex = {"user": user, DENSE_FIELD: " ".join(seq[max(0, end - L):end])}
                    _emit(rows, "sequential", temps["sequential"], ex, rng.random(), held_out,
                          {**meta, "item": items[end - 1]})
            if rated:
                # dense rating: every window of rating_window rated training items (the latest first) is
                # one example whose every rating is a target (items without a rating are left out)
                pairs = rated_positions(ratings, n_train)
                for end in range(len(pairs), 0, -W):
                    win = pairs[max(0, end - W):end]
                    ex = {"user": user, RATED_FIELD: rated_sequence([seq[k] for k in win], [ratings[k] for k in win],
                                                                    lo, hi)}
                    _emit(rows, "rating", temps["rating"], ex, rng.random(), held_out, {**meta, "item": items[win[-1]]})
            if "sequential" in families and style != "dense":
                for _ in range(prompts.sequential_per_user):
                    t = int(rng.integers(1, n_train))
                    hist = _augment_history(seq[max(0, t - H):t], rng, aug, ids, seen)
                    ex = {"user": user, "history": _join_history(hist, rng), "item": seq[t]}
                    _emit(rows, "sequential", temps["sequential"], ex, rng.random(), held_out, {**meta, "item": items[t]})
            if SPAN in families:  # the latest max_history items, or (span_windows) every window of them
                for end in range(n_train, 1, -H) if prompts.span_windows else [n_train]:
                    hist = seq[max(0, end - H):end]
                    width = int(rng.integers(1, min(3, len(hist) - 1) + 1))
                    s0 = int(rng.integers(0, len(hist) - width + 1))
                    masked = hist[:s0] + [MASK] + hist[s0 + width:]
                    rows.append({"family": SPAN, "template": SPAN, "target": ", ".join(hist[s0:s0 + width]),
                                 "source": SPAN_SOURCE.format(user=user, history=", ".join(masked)),
                                 **meta, "item": None})
            if NEXT in families:  # every window of dense_max_len training items (the latest first), as dense rows
                L = prompts.dense_max_len
                for end in range(n_train, 1, -L):
                    rows.append({"family": NEXT, "template": NEXT, "source": NEXT_SOURCE,
                                 "target": " ".join(seq[max(0, end - L):end]), **meta, "item": items[end - 1]})
            if "direct" in families:
                for d in range(prompts.direct_per_user):
                    t = int(rng.integers(1, n_train))
                    hist = seq[max(0, t - 5):t]
                    if d % 2 == 0:  # yes / no about one item
                        neg = sample_negatives(rng, n_items, seen, 1)
                        pos = rng.random() < 0.5 or not neg
                        it = seq[t] if pos else ids[neg[0]]
                        ex = {"user": user, "history": _join_history(hist, rng), "item": it,
                              "answer": "yes" if pos else "no",
                              ATTR_FIELD: attrs[int(index[t]) if pos else neg[0]]}  # None: no attributes
                        fam_temps = [x for x in temps["direct"] if "answer" in x.fields]
                    else:  # 1-of-N candidates
                        negs = sample_negatives(rng, n_items, seen, prompts.direct_candidates - 1)
                        cand = [seq[t]] + [ids[j] for j in negs]
                        rng.shuffle(cand)
                        ex = {"user": user, "history": _join_history(hist, rng), "item": seq[t],
                              "candidates": ", ".join(cand)}
                        # the cold-start choice: a few of the candidates, each described by its attributes
                        # (a separate draw, so the ID prompts' draws do not depend on whether items have any)
                        shown = [int(index[t])] + negs[:ATTR_CANDIDATES - 1]
                        if len(shown) > 1 and all(attrs[j] for j in shown):
                            example_rng(seed, epoch, split, user + f"|attr{d}").shuffle(shown)
                            ex[ATTR_FIELD] = attrs[int(index[t])]
                            ex[ATTR_CANDIDATES_FIELD] = ATTR_SEPARATOR.join(attrs[j] for j in shown)
                        fam_temps = [x for x in temps["direct"] if "candidates" in x.fields
                                     or ATTR_CANDIDATES_FIELD in x.fields]
                    _emit(rows, "direct", fam_temps, ex, rng.random(), held_out, {**meta, "item": items[t]})
            continue
        # evaluation splits: the held-out item of this split as target, everything before as history
        t = n_train + SPLIT_CODE[split] - 1
        if t >= total or t < 1 or n_train < 1:  # n_train 0: a user held out whole (text families only)
            continue
        hist = seq[max(0, t - H):t]
        if "sequential" in families and style != "prompt":
            L = prompts.dense_max_len
            ex = {"user": user, DENSE_FIELD: " ".join(seq[max(0, t + 1 - L):t + 1])}
            _emit(rows, "sequential", temps["sequential"], ex, rng.random(), held_out, {**meta, "item": items[t]})
        if "sequential" in families and style != "dense":
            ex = {"user": user, "history": _join_history(hist, rng), "item": seq[t]}
            _emit(rows, "sequential", temps["sequential"], ex, rng.random(), held_out, {**meta, "item": items[t]})
        if SPAN in families:  # the label-free objective on held-out data: the split's item is the masked span
            masked = hist + [MASK]
            rows.append({"family": SPAN, "template": SPAN, "target": seq[t],
                         "source": SPAN_SOURCE.format(user=user, history=", ".join(masked)), **meta, "item": items[t]})
        if NEXT in families:  # the window ending at the split's item: its last position is the held-out next item
            L = prompts.dense_max_len
            rows.append({"family": NEXT, "template": NEXT, "source": NEXT_SOURCE,
                         "target": " ".join(seq[max(0, t + 1 - L):t + 1]), **meta, "item": items[t]})
        if rated and is_rated(ratings[t]):  # the split's rating, after the rated items before it
            win = rated_positions(ratings, t + 1)[-W:]
            ex = {"user": user, RATED_FIELD: rated_sequence([seq[k] for k in win], [ratings[k] for k in win], lo, hi)}
            _emit(rows, "rating", temps["rating"], ex, rng.random(), held_out, {**meta, "item": items[t]})
        if "direct" in families:
            urng = example_rng(seed, 0, split, user)  # fixed negatives per user: the 1-of-100 protocol
            cand = [seq[t]] + [ids[j] for j in sample_negatives(urng, n_items, seen, EVAL_CANDIDATES - 1)]
            urng.shuffle(cand)
            ex = {"user": user, "history": _join_history(hist[-5:], rng), "item": seq[t],
                  "candidates": ", ".join(cand)}
            fam_temps = [x for x in temps["direct"] if "candidates" in x.fields]
            _emit(rows, "direct", fam_temps, ex, rng.random(), held_out, {**meta, "item": items[t]})
    return thin_families(pd.DataFrame(rows, columns=EXAMPLE_COLUMNS), keep, seed)


def thin_families(batch: pd.DataFrame, keep: dict | None, seed: int) -> pd.DataFrame:
    """Keep each example with its family's probability in ``keep`` (the training mix): a pure function
    of the example and its epoch."""
    if not keep or len(batch) == 0:
        return batch
    p = batch["family"].map(lambda f: float(keep.get(f, 1.0))).to_numpy(dtype=float)
    if (p >= 1).all():  # e.g. a block of per-user families when only rating is thinned: nothing to draw
        return batch
    keys = (batch["source"] + "|" + batch["target"] + "|" + batch["epoch"].astype(str)).to_numpy(dtype=object)
    u = row_uniforms(keys, seed, 0, "train", 1)[:, 0]
    return batch[u < p]


def interaction_examples(batch: pd.DataFrame, data_dir: str, templates_dir: str, split: str, epoch: int,
                         seed: int, prompts: PromptConfig, aug: AugmentConfig, families: list,
                         held_out: bool | None, keep: dict | None = None, users_share: float = 1.0) -> pd.DataFrame:
    """Rating, explanation and review examples from interaction rows of one split. ``keep``: family ->
    probability of keeping a row's example (the training mix), drawn before any text is built."""
    epoch = _epoch_of(epoch)
    ctx = _context(data_dir, templates_dir)
    temps, lo, hi = ctx["templates"], *ctx["scale"]
    primary = ctx["manifest"].get("primary_source")
    review_sources = set(ctx["manifest"].get("review_sources", []))
    batch = batch[batch["split"] == split]
    if split in HOLDOUT_SPLITS and ctx.get("holdout"):
        batch = batch[~batch["user"].isin(ctx["holdout"])]
    if users_share < 1.0:
        batch = batch[labelled_users(batch["user"], seed, users_share)]
    if len(batch) == 0:
        return pd.DataFrame(columns=EXAMPLE_COLUMNS)
    pos = ctx["index"].get_indexer(batch["item"])
    # draws per row: 0 source merge, 1 rating-noise gate, 2-3 noise (Box-Muller), 4 rating gate,
    # 5-7 template choices of rating / explanation / review, 8-10 their keep gates (the mix)
    u = row_uniforms((batch["user"] + "|" + batch["item"]).to_numpy(dtype=object), seed, epoch, split, 11)
    keep = keep or {}
    kept = {f: u[:, 8 + j] < float(keep.get(f, 1.0)) for j, f in enumerate(("rating", "explanation", "review"))}
    if keep:  # rows none of whose examples would be kept cost nothing
        live = np.zeros(len(batch), dtype=bool)
        for f in families:
            if f in kept:
                live |= kept[f]
        batch, pos, u, kept = batch[live], pos[live], u[live], {f: m[live] for f, m in kept.items()}
    noise = np.sqrt(-2 * np.log(np.maximum(u[:, 2], 1e-300))) * np.cos(2 * np.pi * u[:, 3])
    prompt_rating = "rating" in families and not dense_rating(prompts)  # dense ones come from the sequences
    rows: list = []
    cut = prompts.max_text_chars
    for k, ((user, item, rating, text, summary, source), p) in enumerate(zip(
            batch[["user", "item", "rating", "text", "summary", "source"]].itertuples(index=False, name=None), pos)):
        if p < 0:
            continue
        if split == "train" and source != primary and u[k, 0] >= aug.merge_sources:
            continue
        meta = {"user": user, "item": item, "split": split, "epoch": epoch}
        has_rating = rating is not None and not pd.isna(rating)
        r = float(rating) if has_rating else None
        if has_rating and split == "train" and u[k, 1] < aug.rating_noise:
            r = float(np.clip(round(r + noise[k] * aug.rating_noise_sd, 1), lo, hi))
        base = {"user": user, "item": ctx["ids"][p], "item_desc": ctx["desc"][p],
                "rating": format_rating(r) if has_rating else None}
        if prompt_rating and has_rating and (split != "train" or u[k, 4] < prompts.rating_per_row) \
                and kept["rating"][k]:
            _emit(rows, "rating", temps["rating"], base, u[k, 5], held_out, meta)
        has_text = isinstance(text, str) and text
        if "explanation" in families and has_text and kept["explanation"][k]:
            _emit(rows, "explanation", temps["explanation"], {**base, "text": text[:cut]}, u[k, 6], held_out, meta)
        if "review" in families and has_text and source in review_sources and kept["review"][k]:
            ex = {**base, "text": text[:cut], "summary": summary if isinstance(summary, str) else None}
            _emit(rows, "review", temps["review"], ex, u[k, 7], held_out, meta)
    return pd.DataFrame(rows, columns=EXAMPLE_COLUMNS)


def example_dataset(data_dir: str | Path, cfg: PrepareConfig | None = None, split: str = "train",
                    epoch: int = 0, families: list | None = None, held_out: bool | None = False,
                    log=print, keep: dict | None = None, users_share: float = 1.0):
    """Lazy Ray Dataset of prompt examples for one split and epoch (``epoch``: a number, or the name of
    an epoch clock whose value each execution reads, see ``make_epoch_clock``).

    ``held_out=False`` (training): only seen templates; ``True``: only held-out ones (zero-shot
    evaluation); ``None``: both. Families the data cannot feed are skipped with a message. ``keep``:
    family -> keep probability (the training mix, see ``train.mixing_weights``), applied in the tasks.
    ``users_share``: examples of that seeded share of the users only (``labelled_users``)."""
    import ray.data

    if split not in SPLIT_CODE:
        raise ValueError(f"unknown split {split!r} (train, valid, test)")
    data = PreparedData.open(data_dir)
    cfg = cfg or PrepareConfig(**{})
    wanted = list(families or cfg.prompts.families)
    unknown = [f for f in wanted if f not in FAMILIES and f not in SELF_SUPERVISED]
    if unknown:
        raise ValueError(f"unknown task family {unknown[0]!r} (known: {', '.join(FAMILIES + SELF_SUPERVISED)})")
    fams = [f for f in wanted if f in data.families or f in SELF_SUPERVISED]
    for f in wanted:
        if f not in fams:
            log(f"examples: skipping the {f} family: the dataset has no input for it")
    kw = dict(data_dir=str(Path(data_dir).resolve()), templates_dir=cfg.prompts.templates_dir, split=split,
              epoch=epoch, seed=cfg.seed, prompts=cfg.prompts, aug=cfg.augment, families=fams, held_out=held_out,
              keep=dict(keep or {}), users_share=float(users_share))
    def read(table: str, rows_per_block: int, max_blocks: int = 256):
        # many small blocks, so that shuffling block order (training) mixes the task families well;
        # each block is one task (batch_size=None: Ray would otherwise bundle blocks up to a batch size)
        import pyarrow.parquet as pq

        files = sorted((data.path / table).glob("*.parquet"))
        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        ds = ray.data.read_parquet(str(data.path / table))
        blocks = min(max_blocks, max(1, -(-rows // rows_per_block)))
        return ds.repartition(blocks) if blocks > len(files) else ds

    parts = []
    # block sizes: a block of 16 users (a few examples each) and one of 1024 interactions (one example
    # each, down-sampled by the balanced mix) hold tens of examples, far fewer than the training loop's
    # local shuffle buffer, so batches mix the families from the first steps on
    rated = "rating" in fams and dense_rating(cfg.prompts)
    if {"sequential", "direct", *SELF_SUPERVISED} & set(fams) or rated:
        parts.append(read(SEQUENCES, 16)
                     .map_batches(sequence_examples, fn_kwargs=kw, batch_format="pandas", batch_size=None))
    if {"explanation", "review"} & set(fams) or ("rating" in fams and not rated):
        parts.append(read(INTERACTIONS, 1024)
                     .map_batches(interaction_examples, fn_kwargs=kw, batch_format="pandas", batch_size=None))
    if not parts:
        raise ValueError(f"none of the families {wanted} can be built from {data_dir}")
    out = parts[0]
    for p in parts[1:]:
        out = out.union(p)
    return out


def preview(data_dir: str, n: int, cfg=None) -> str:
    """N rendered (source -> target) training examples per family, as text."""
    fams = {}
    ds = example_dataset(data_dir, cfg, split="train", epoch=0)
    for row in ds.iter_rows():
        lst = fams.setdefault(row["family"], [])
        if len(lst) < n:
            lst.append(row)
        if len(fams) == len(FAMILIES) and all(len(v) >= n for v in fams.values()):
            break
    lines = []
    for fam in FAMILIES:
        if fam not in fams:
            lines.append(f"[{fam}] skipped: the dataset has no input for it")
            continue
        for row in fams[fam]:
            lines.append(f"[{fam} / {row['template']}] {row['source']}\n    -> {row['target']}")
    return "\n".join(lines)
