"""``recflm prepare``: raw interaction logs -> a clean, leak-free, prompt-ready dataset directory.

The pipeline runs on Ray Data and streams; the driver only ever holds small per-item and per-block
summaries (item counts, item first appearances, outcome counts), never the rows::

    read (one reader per source) -> RowCleaner (checks, normalisation, namespacing)
      -> repartition(keys=["user"])  (one hash shuffle: every user's rows in one block)
      -> dedup_block                 (exact duplicates, repeated pairs, tags -> text)   [materialized]
      -> k-core passes               (per-block item degrees; the driver keeps the removed-item set)
      -> finalize_block              (k-core reasons, time order, leave-one-out split)  [materialized]
      -> item first appearances -> IDs (indexing.py) -> write interactions / rejects / sequences / users

See dataset.py for the layout written.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from . import __version__
from .clean import REASONS, RowCleaner, account_block, dedup_block, finalize_block, kcore_item_counts
from .config import (ConfigError, PrepareConfig, SourceConfig, column_map, flags_into, load_config, parse_sources,
                     to_dict)
from .dataset import INTERACTIONS, ITEMS, MANIFEST, REJECTS, SEQUENCES, STATS, USERS
from .indexing import assign_ids
from .readers import SourceError, SourcePlan, bundled_source, plan_source, read_item_meta, read_source

REJECT_COLUMNS = ["source", "file", "kind", "user", "item", "rating", "ts", "text", "summary", "reason"]
COOC_WINDOW = 3


class PrepareError(ValueError):
    pass


# ----------------------------------------------------------------------------- planning
def plan(cfg: PrepareConfig) -> list[SourcePlan]:
    """Check every source and the output directory before any work is done."""
    sources = parse_sources(cfg) or [bundled_source()]
    plans = [plan_source(s, name) for s, name in zip(sources, source_names(sources))]
    if cfg.k_core < 0:
        raise PrepareError(f"k_core must be >= 0, got {cfg.k_core}")
    if not 0.0 <= cfg.holdout_users < 1.0:
        raise PrepareError(f"holdout_users is the share of users held out of training, in [0, 1): got "
                           f"{cfg.holdout_users}")
    if not 0 <= cfg.holdout_short_users < 1:
        raise PrepareError(f"holdout_short_users must be in [0, 1), got {cfg.holdout_short_users}")
    if not cfg.rating_min < cfg.rating_max:
        raise PrepareError("rating_min must be below rating_max")
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).exists():
        raise PrepareError(f"{out} exists, is not empty and is not a recflm dataset: refusing to overwrite it")
    return plans


def source_names(sources: list[SourceConfig]) -> list[str]:
    """Each source's namespace (the prefix of its user and item keys): its name, else its type, made unique."""
    names, seen = [], set()
    for i, s in enumerate(sources):
        name = s.name or s.type
        while name in seen:
            name = f"{s.name or s.type}{i}"
        if ":" in name:
            raise SourceError(f"source name {name!r} must not contain ':'")
        seen.add(name)
        names.append(name)
    return names


def fingerprint(plans: list[SourcePlan]) -> list[dict]:
    """Size, mtime and a hash of the first MiB of each input file."""
    out = []
    for p in plans:
        for f in p.files + [m for m in (p.items_meta, p.items_table) if m]:
            st = f.stat()
            with open(f, "rb") as fh:
                head = hashlib.sha256(fh.read(1 << 20)).hexdigest()[:16]
            out.append({"source": p.name, "type": p.cfg.type, "file": str(f), "bytes": st.st_size,
                        "mtime": int(st.st_mtime), "sha256_first_mib": head})
    return out


def _num_partitions(cfg: PrepareConfig, plans: list[SourcePlan]) -> int:
    if cfg.num_partitions > 0:
        return cfg.num_partitions
    total = sum(f.stat().st_size for p in plans for f in p.files)
    # ~6 MiB of input per partition keeps each user block far below Ray Data's 128 MiB block cap
    return int(np.clip(total // (6 << 20), 2, 1024))


# ----------------------------------------------------------------------------- per-block helpers
def _user_hash(users: np.ndarray, seed: int) -> np.ndarray:
    key = hashlib.sha256(str(seed).encode()).hexdigest()[:16]
    return pd.util.hash_array(np.asarray(users, dtype=object), hash_key=key, categorize=False).astype(np.uint64)


def holdout_mask(users, seed: int, share: float) -> np.ndarray:
    """Which users are held out of training (``holdout_users``): a seeded hash of the user key below ``share``,
    so the same users whatever the partitioning, and a larger share holds out a superset."""
    users = np.asarray(users, dtype=object)
    if share <= 0 or len(users) == 0:
        return np.zeros(len(users), dtype=bool)
    key = hashlib.sha256(f"holdout/{seed}".encode()).hexdigest()[:16]
    h = pd.util.hash_array(users, hash_key=key, categorize=False).astype(np.uint64)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53) < share


def holdout_block(t: pa.Table, seed: int, share: float) -> pa.Table:
    """Per block: a held-out user's training part becomes split ``history`` (its validation and test items
    stay the targets), so nothing that reads split ``train`` (IDs, counts, examples, baselines) sees it."""
    if share <= 0 or t.num_rows == 0:
        return t
    held = pa.array(holdout_mask(pc.fill_null(t["user"], "").to_numpy(zero_copy_only=False), seed, share))
    relabel = pc.and_(held, pc.fill_null(pc.equal(t["split"], "train"), False))
    split = pc.if_else(relabel, pa.scalar("history", pa.string()), t["split"])
    return t.set_column(t.schema.get_field_index("split"), "split", split)


def _kept(t: pa.Table) -> pa.Table:
    return t.filter(pc.and_(pc.is_null(t["reason"]), pc.equal(t["kind"], "interaction")))


def item_stats_block(t: pa.Table, seed: int) -> pd.DataFrame:
    """Per block: per item, training count, total count and first appearance keys.

    A key orders (user in seeded hash order, position in the user's sequence)."""
    kept = _kept(t)
    users = kept["user"].to_numpy(zero_copy_only=False)
    key = (_user_hash(users, seed) >> np.uint64(24)).astype(np.int64) * (1 << 20) + \
        np.minimum(kept["pos"].to_numpy().astype(np.int64), (1 << 20) - 1)
    train = pc.equal(kept["split"], "train")
    tb = pa.table({"item": kept["item"], "source": kept["source"], "key": pa.array(key), "train": train})
    g_all = tb.group_by("item").aggregate([("source", "min"), ([], "count_all")]).to_pandas() \
        .rename(columns={"source_min": "source", "count_all": "n_total"}).set_index("item")
    tr = tb.filter(train).group_by("item").aggregate([("key", "min"), ([], "count_all")]).to_pandas().set_index("item")
    ot = tb.filter(pc.invert(train)).group_by("item").aggregate([("key", "min")]).to_pandas().set_index("item")
    g_all["n_train"] = tr["count_all"].reindex(g_all.index).fillna(0).astype("int64")
    g_all["train_key"] = tr["key_min"].reindex(g_all.index).astype("float64")
    g_all["other_key"] = ot["key_min"].reindex(g_all.index).astype("float64")
    return g_all.reset_index()


def cooc_block(t: pa.Table, item_index: dict) -> pd.DataFrame:
    """Per block: co-occurrence counts of training items within COOC_WINDOW of each other."""
    kept = _kept(t)
    kept = kept.filter(pc.equal(kept["split"], "train")).to_pandas().sort_values(["user", "pos"])
    idx = kept["item"].map(item_index).to_numpy(np.int64)
    users = kept["user"].to_numpy()
    rows, cols = [], []
    for w in range(1, COOC_WINDOW + 1):
        same = users[w:] == users[:-w]
        rows.append(idx[:-w][same])
        cols.append(idx[w:][same])
    r, c = np.concatenate(rows), np.concatenate(cols)
    pairs = pd.DataFrame({"i": np.concatenate([r, c]), "j": np.concatenate([c, r])})
    return pairs.value_counts().reset_index(name="n")


SEQUENCE_SCHEMA = pa.schema([
    ("user", pa.string()), ("source", pa.string()), ("items", pa.list_(pa.string())),
    ("index", pa.list_(pa.int32())), ("ids", pa.list_(pa.string())), ("ratings", pa.list_(pa.float64())),
    ("ts", pa.list_(pa.int64())), ("n_train", pa.int32()), ("holdout", pa.bool_()),
])


def sequences_block(t: pa.Table, catalog_index: pd.Index, id_texts: np.ndarray) -> pa.Table:
    """Per block: one row per user with the time-ordered items, their IDs, ratings and times."""
    kept = _kept(t)
    kept = kept.take(pc.sort_indices(kept, [("user", "ascending"), ("pos", "ascending")]))
    kept = kept.select(["user", "source", "item", "rating", "ts", "split"]).to_pandas()
    if kept.empty:
        return SEQUENCE_SCHEMA.empty_table()
    pos = catalog_index.get_indexer(kept["item"])
    users = kept["user"].to_numpy(dtype=object)
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    offsets = pa.array(np.r_[starts, len(users)].astype(np.int32))

    def lst(values, typ):
        return pa.ListArray.from_arrays(offsets, pa.array(values, type=typ))

    before = kept["split"].isin(["train", "history"])  # a held-out user's history stands where training items do
    n_train = before.groupby(kept["user"], sort=False).sum()
    holdout = (kept["split"] == "history").groupby(kept["user"], sort=False).any()
    return pa.Table.from_arrays([
        pa.array(users[starts], pa.string()),
        pa.array(kept["source"].to_numpy(dtype=object)[starts], pa.string()),
        lst(kept["item"].to_numpy(dtype=object), pa.string()),
        lst(pos.astype(np.int32), pa.int32()),
        lst(id_texts[pos], pa.string()),
        lst(kept["rating"].to_numpy(np.float64), pa.float64()),
        lst(kept["ts"].to_numpy(np.int64), pa.int64()),
        pa.array(n_train.reindex(users[starts]).to_numpy(np.int32), pa.int32()),
        pa.array(holdout.reindex(users[starts]).to_numpy(bool), pa.bool_()),
    ], schema=SEQUENCE_SCHEMA)


def users_block(df: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"user": df["user"], "source": df["source"],
                         "n_total": df["items"].map(len).astype("int32"), "n_train": df["n_train"],
                         "holdout": df["holdout"]})


INTERACTION_SCHEMA = pa.schema([
    ("user", pa.string()), ("item", pa.string()), ("rating", pa.float64()), ("ts", pa.int64()),
    ("text", pa.string()), ("summary", pa.string()), ("source", pa.string()), ("split", pa.string()),
    ("pos", pa.int32()),
])


def interactions_view(t: pa.Table) -> pa.Table:
    """Kept interactions with one fixed schema (an all-null column in a block stays a string)."""
    kept = _kept(t)
    return pa.table({f.name: pc.cast(kept[f.name], f.type) for f in INTERACTION_SCHEMA}, schema=INTERACTION_SCHEMA)


def rejects_view(t: pa.Table, files: list) -> pa.Table:
    bad = t.filter(pc.is_valid(t["reason"]))
    bad = bad.append_column("file", pc.take(pa.array(files, pa.string()), bad["file_id"]))
    rating = pc.coalesce(pc.cast(bad["rating_raw"], pa.string()), pc.cast(bad["rating"], pa.string()))
    ts = pc.coalesce(pc.cast(bad["ts_raw"], pa.string()), pc.cast(bad["ts"], pa.string()))
    cols = {c: (rating if c == "rating" else ts if c == "ts" else pc.cast(bad[c], pa.string())) for c in REJECT_COLUMNS}
    return pa.table(cols)


# ----------------------------------------------------------------------------- main
def kcore_and_split(deduped, k: int, cfg: PrepareConfig):
    """Iterative k-core on the de-duplicated rows (item hashes removed by degree until none is weak), then the
    split (``finalize_block``: leave-one-out, short users held out whole) and the new-user holdout, as ``cfg``
    says. Returns (the materialized rows, the removed item hashes sorted, the passes)."""
    removed = np.array([], dtype=np.uint64)  # item hashes, sorted
    passes = 0
    if k > 1:
        while True:
            passes += 1
            counts = deduped.map_batches(kcore_item_counts, fn_kwargs={"removed": removed, "k": k},
                                         batch_format="pyarrow", batch_size=None).to_pandas()
            totals = counts.groupby("item_hash")["n"].sum()
            weak = totals.index[totals < k].to_numpy(dtype=np.uint64)
            if len(weak) == 0:
                break
            removed = np.sort(np.concatenate([removed, weak]))
    final = deduped.map_batches(finalize_block, fn_kwargs={"removed": removed, "k": k,
                                                           "holdout": cfg.holdout_short_users, "seed": cfg.seed},
                                batch_format="pyarrow", batch_size=None)
    if cfg.holdout_users > 0:
        final = final.map_batches(holdout_block, fn_kwargs={"seed": cfg.seed, "share": cfg.holdout_users},
                                  batch_format="pyarrow", batch_size=None)
    return final.materialize(), removed, passes


def run(cfg: PrepareConfig, log=print) -> dict:
    """Run the whole stage; returns the stats dict that is also written to stats.json."""
    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy

    from .runtime import ensure_ray

    t0 = time.perf_counter()
    plans = plan(cfg)
    ensure_ray()
    ctx = DataContext.get_current()
    ctx.shuffle_strategy = ShuffleStrategy.HASH_SHUFFLE
    k = cfg.k_core if cfg.k_core > 1 else 1
    out = Path(cfg.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    spec = {p.name: {"scale": p.scale, "ts_unit": p.cfg.ts_unit, "has_rating": p.has_rating} for p in plans}
    nparts = _num_partitions(cfg, plans)
    log(f"prepare: {len(plans)} source(s), {nparts} user partitions")
    files = [str(f) for p in plans for f in p.files]  # as the user named them: stats and rejects use these
    cleaner = RowCleaner(spec, cfg.rating_min, cfg.rating_max, cfg.min_ts, cfg.max_ts,
                         [str(f.resolve()) for p in plans for f in p.files])  # as the readers report them
    # each source is cleaned on its own (its raw column types may differ), then they are merged
    parts = [read_source(p, post=cleaner) for p in plans]
    cleaned = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    deduped = (cleaned.repartition(nparts, keys=["user"])
               .map_batches(dedup_block, batch_format="pandas", batch_size=None)
               .materialize())

    log("prepare: read, cleaned, de-duplicated")
    final, removed, passes = kcore_and_split(deduped, k, cfg)
    log(f"prepare: k-core (k={k}) converged after {passes} pass(es), {len(removed)} items removed by degree")

    log("prepare: finalized")
    # catalog: first appearances -> IDs, plus metadata
    per_block = final.map_batches(item_stats_block, batch_format="pyarrow", fn_kwargs={"seed": cfg.seed},
                                  batch_size=None).to_pandas()
    if per_block.empty:
        raise PrepareError("no interaction survived cleaning and k-core filtering; see rejects.parquet reasons "
                           "(lower k_core for sparse data)")
    istats = per_block.groupby("item", sort=False).agg(
        source=("source", "first"), n_total=("n_total", "sum"), n_train=("n_train", "sum"),
        train_key=("train_key", "min"), other_key=("other_key", "min")).reset_index()
    cooc = None
    if cfg.indexing == "collaborative":
        import scipy.sparse as sp

        order = istats.sort_values("item", kind="stable")["item"].tolist()
        item_index = {it: i for i, it in enumerate(order)}
        pairs = final.map_batches(cooc_block, batch_format="pyarrow", fn_kwargs={"item_index": item_index},
                                  batch_size=None).to_pandas()
        cooc = sp.coo_matrix((pairs["n"].to_numpy(np.float64), (pairs["i"], pairs["j"])),
                             shape=(len(order), len(order))).tocsr()
    catalog = assign_ids(istats, cfg.indexing, cfg.seed, cooc, cfg.collab_clusters, cfg.collab_leaf_size)
    meta = pd.concat([read_item_meta(p) for p in plans], ignore_index=True)
    catalog = catalog.merge(meta, on="item", how="left") if not meta.empty else catalog.assign(title=None, genres=None)
    # attributes: the item's attribute values (MovieLens genres, an item table's attrs column), [] where none
    catalog["attributes"] = [list(a) if isinstance(a, (list, np.ndarray)) else []
                             for a in catalog.get("attributes", pd.Series([None] * len(catalog)))]
    catalog = catalog[["item", "index", "id_text", "source", "title", "genres", "attributes", "n_train", "n_total"]]
    catalog.to_parquet(out / ITEMS, index=False)

    log("prepare: catalog built")
    # the row outputs
    final.map_batches(interactions_view, batch_format="pyarrow", batch_size=None) \
        .write_parquet(str(out / INTERACTIONS))
    rejects = final.map_batches(rejects_view, batch_format="pyarrow", fn_kwargs={"files": files}, batch_size=None)
    rejects.write_parquet(str(out / REJECTS))
    seqs = final.map_batches(sequences_block, batch_format="pyarrow", fn_kwargs={
        "catalog_index": pd.Index(catalog["item"]), "id_texts": catalog["id_text"].to_numpy(dtype=object)},
        batch_size=None).materialize()
    seqs.write_parquet(str(out / SEQUENCES))
    seqs.map_batches(users_block, batch_format="pandas").write_parquet(str(out / USERS))

    log("prepare: outputs written")
    acct = final.map_batches(account_block, batch_format="pyarrow", batch_size=None).to_pandas()
    acct["file"] = [files[i] for i in acct["file_id"]]
    splits = final.map_batches(split_counts_block, batch_format="pyarrow", batch_size=None).to_pandas()
    stats = _stats(acct, seqs, catalog, plans, k, passes, time.perf_counter() - t0,
                   splits.groupby("split")["n"].sum().to_dict())
    (out / STATS).write_text(json.dumps(stats, indent=2))
    manifest = {
        "kind": "recflm-dataset", "format_version": 1, "recflm_version": __version__,
        "created_unix": int(time.time()), "sources": fingerprint(plans), "config": to_dict(cfg),
        "indexing": cfg.indexing, "families": stats["families"], "holdout_users": stats["holdout_users"],
        "held_out_users": stats["held_out_users"],
        "primary_source": plans[0].name, "review_sources": [p.name for p in plans if p.review_text],
        "versions": _versions(), "layout": [INTERACTIONS, REJECTS, SEQUENCES, USERS, ITEMS, STATS],
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return stats


def split_counts_block(t: pa.Table) -> pa.Table:
    """Per block: kept interactions per split."""
    kept = _kept(t)
    return pa.table({"split": kept["split"]}).group_by("split").aggregate([([], "count_all")]) \
        .rename_columns(["split", "n"])


def _stats(acct: pd.DataFrame, seqs, catalog: pd.DataFrame, plans, k: int, passes: int, seconds: float,
           splits: dict | None = None) -> dict:
    total = int(acct["n"].sum())
    kept = int(acct.loc[acct["outcome"] == "kept", "n"].sum())
    rej = acct[acct["outcome"] != "kept"].groupby("outcome")["n"].sum()
    per_file = {}
    for (f, outcome), n in acct.groupby(["file", "outcome"])["n"].sum().items():
        d = per_file.setdefault(f, {"input_rows": 0, "kept": 0, "rejected": 0})
        d["input_rows"] += int(n)
        d["kept" if outcome == "kept" else "rejected"] += int(n)
    lens = seqs.map_batches(lambda b: pd.DataFrame({"n": b["items"].map(len), "t": b["n_train"],
                                                   "h": b["holdout"]}), batch_format="pandas").to_pandas()
    held = lens["h"].to_numpy(bool) if len(lens) else np.zeros(0, dtype=bool)
    n_inter = int(lens["n"].sum())
    families = ["sequential", "direct"]
    if any(p.has_rating for p in plans):
        families.insert(0, "rating")
    has_text = bool(seqs.count()) and any(p.has_text for p in plans)
    if has_text:
        families.append("explanation")
    if any(p.review_text and (p.has_summary or p.has_rating) for p in plans):
        families.append("review")
    return {
        "input_rows": total, "kept": kept, "rejected": total - kept,
        "rejected_by_reason": {r: int(rej.get(r, 0)) for r in REASONS if int(rej.get(r, 0))},
        "kept_interactions": n_inter, "kept_tags_as_text": kept - n_inter,
        "per_file": per_file,
        "users": int(len(lens)), "items": int(len(catalog)),
        "items_in_train": int((catalog["n_train"] > 0).sum()),
        "density": n_inter / max(1, len(lens) * len(catalog)),
        "seq_len_mean": float(lens["n"].mean()) if len(lens) else 0.0,
        "seq_len_median": float(lens["n"].median()) if len(lens) else 0.0,
        # rows per split: counted from the interactions' split column where given, else from the sequences
        "split_rows": ({s: int(splits.get(s, 0)) for s in ("train", "valid", "test", "history")} if splits is not None
                       else {"train": int(lens["t"][~held].sum()), "valid": int(((lens["n"] - lens["t"]) >= 1).sum()),
                             "test": int(((lens["n"] - lens["t"]) >= 2).sum()), "history": int(lens["t"][held].sum())}),
        "holdout_users": int(held.sum()),
        # users held out whole into valid / test (holdout_short_users): no training interaction
        "held_out_users": int(((lens["t"] == 0) & (lens["n"] > 0) & ~held).sum()),
        "k_core": k, "k_core_passes": passes, "families": families,
        "seconds": round(seconds, 2),
    }


def _versions() -> dict:
    import pandas
    import pyarrow
    import ray

    return {"python": sys.version.split()[0], "ray": ray.__version__, "pandas": pandas.__version__,
            "pyarrow": pyarrow.__version__, "numpy": np.__version__}


def format_stats(stats: dict) -> str:
    """The stats table printed at the end of ``recflm prepare``."""
    rows = [("input rows", stats["input_rows"]), ("kept", stats["kept"]),
            ("  interactions", stats["kept_interactions"]), ("  tags merged as text", stats["kept_tags_as_text"]),
            ("rejected", stats["rejected"])]
    rows += [(f"  {r}", n) for r, n in stats["rejected_by_reason"].items()]
    rows += [("users", stats["users"]), ("items", stats["items"]),
             ("items in train", stats["items_in_train"]), ("density", f"{stats['density']:.5f}"),
             ("sequence length mean / median", f"{stats['seq_len_mean']:.1f} / {stats['seq_len_median']:.0f}"),
             ("train / valid / test rows", "{train} / {valid} / {test}".format(**stats["split_rows"])),
             ("held-out users (history rows)",
              f"{stats.get('holdout_users', 0)} ({stats['split_rows'].get('history', 0)})"),
             ("short users held out whole (valid / test)", stats.get("held_out_users", 0)),
             ("k-core (k, passes)", f"{stats['k_core']}, {stats['k_core_passes']}"),
             ("task families", ", ".join(stats["families"])), ("seconds", stats["seconds"])]
    w = max(len(r[0]) for r in rows)
    lines = [f"{'statistic':<{w}}  value", f"{'-' * w}  {'-' * 12}"]
    lines += [f"{name:<{w}}  {value:>12}" if isinstance(value, int) else f"{name:<{w}}  {value}"
              for name, value in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the CLI stage (recflm prepare)
HELP = "clean, index and split interaction logs with Ray Data"


def add_arguments(p, name: str) -> None:
    p.description = ("Read raw interaction logs (MovieLens, Amazon review JSON lines, generic CSV/TSV/Parquet), "
                     "clean them, apply k-core filtering, assign item IDs, split leave-one-out per user "
                     "and write a dataset directory. With no source it uses the bundled MovieLens data.")
    p.add_argument("--out", "-o", help="output dataset directory (config key: out)")
    p.add_argument("--movielens", action="append", default=[], metavar="DIR",
                   help="a MovieLens directory (ratings.csv [+ movies.csv, tags.csv]); repeatable")
    p.add_argument("--amazon", action="append", default=[], metavar="PATH",
                   help="Amazon review JSON lines (.json/.jsonl, gzipped or not), file or directory; repeatable")
    p.add_argument("--table", action="append", default=[], metavar="PATH",
                   help="generic CSV/TSV/Parquet table (.tsv: tab-separated); needs --columns; repeatable")
    p.add_argument("--columns", action="append", default=[], metavar="MAP",
                   help="column map for the matching --table, e.g. user=customer,item=sku,rating=stars,ts=time")
    p.add_argument("--delimiter", help="field separator of every --table CSV (default: ',' or, for .tsv, a tab)")
    p.add_argument("--items", metavar="FILE", help="an item table (CSV, TSV or Parquet) of the (one) source: the items' "
                   "attributes for the two-tower baseline and candidate model, e.g. Toys_and_Games_items.csv.gz")
    p.add_argument("--item-columns", metavar="MAP", help="column map of --items: item=COL (required), "
                   "attrs=COL (|-separated values) and / or title=COL, e.g. item=item,attrs=attributes")
    p.add_argument("--k-core", type=int, help="k for iterative k-core filtering (config key: k_core)")
    p.add_argument("--indexing", choices=["sequential", "random", "collaborative"], help="item ID scheme")
    p.add_argument("--holdout-users", type=float, metavar="P",
                   help="hold this share of users (seeded hash) out of every training family and stage: their "
                        "history is split 'history', their last items the valid/test targets; evaluate reports "
                        "them as new users (config key: holdout_users)")
    p.add_argument("--preview", type=int, default=0, metavar="N",
                   help="print N rendered (source -> target) examples per task family after preparing")
    p.add_argument("--skip-existing", action="store_true",
                   help="do not rebuild the dataset if OUT already holds one (only preview / print stats)")
    p.add_argument("--update", metavar="DIR",
                   help="append the given sources' rows to the prepared dataset DIR, cleaned with its recorded "
                        "settings: every existing item keeps its index and ID, new items come after them, the "
                        "split moves forward (see prepare_update.py); then `recflm finetune catalog=extend`")


def command(args) -> int:
    from .dataset import PreparedData

    cfg = flags_into(load_config(PrepareConfig, args.config, args.overrides), args, ("out", "k_core", "indexing", "holdout_users"))
    if len(args.columns) != len(args.table):
        raise ConfigError("give one --columns map per --table")
    extra = [SourceConfig(type="movielens", path=d) for d in args.movielens]
    extra += [SourceConfig(type="amazon", path=p) for p in args.amazon]
    extra += [SourceConfig(type="table", path=p, columns=column_map(c), delimiter=args.delimiter or "")
              for p, c in zip(args.table, args.columns)]
    if extra:
        cfg.sources = [to_dict(s) for s in extra]
    if args.items or args.item_columns:
        if not (args.items and args.item_columns):
            raise ConfigError("--items and --item-columns go together (e.g. --items items.csv --item-columns "
                              "item=item,attrs=attributes)")
        sources = [to_dict(s) for s in parse_sources(cfg)] or [to_dict(bundled_source())]
        if len(sources) != 1:
            raise ConfigError(f"--items names the item table of one source; this config has {len(sources)} "
                              "(set items / item_columns on each source in the config file instead)")
        sources[0].update(items=args.items, item_columns=column_map(args.item_columns, "--item-columns"))
        cfg.sources = sources
    if args.update:
        from .prepare_update import update

        if args.out or args.k_core is not None or args.indexing:
            raise ConfigError("--update DIR updates DIR in place with the settings it was prepared with: "
                              "--out, --k-core and --indexing do not apply")

        stats = update(args.update, parse_sources(cfg))
        print(format_stats(stats))
        print(f"dataset {args.update} updated")
        return 0
    if args.skip_existing and (Path(cfg.out) / "manifest.json").exists():
        stats = PreparedData.open(cfg.out).stats
    else:
        stats = run(cfg)
    print(format_stats(stats))
    print(f"dataset written to {cfg.out}")
    if args.preview:
        from .augment import preview

        print(preview(cfg.out, args.preview, cfg))
    return 0


__all__ = ["run", "plan", "format_stats", "PrepareError", "SourceConfig"]
