"""``recflm prepare --update DIR``: new interaction logs appended to a prepared dataset, every existing item
keeping its index and ID.

The new rows are read and cleaned with the settings the dataset's manifest recorded (its sources' namespaces,
rating scale, timestamp bounds, k-core, ID scheme), then go through prepare's own pipeline together with the
dataset's kept interactions::

    new sources -> RowCleaner -> mark_known (already_in_dataset / already_rejected)
      + the dataset's interactions.parquet (as cleaned rows)
      -> repartition(keys=["user"]) -> dedup_block -> k-core on the union -> finalize_block (split)
      -> catalog: old items keep index and id_text, new items after them -> outputs in a temp dir -> swap

- **IDs**: the old catalog is kept row for row (item, index, id_text, title); items new to the dataset get
  the indices after the old ones and ID texts the way the dataset's scheme assigns them, counted on from
  the old ones (sequential and random: N+1, N+2, ..., training items first; collaborative: a new top-level
  branch), so ``bundle.catalog_relation`` of a bundle of the old dataset is ``extends`` and ``recflm finetune
  catalog=extend`` continues it. An old item whose interactions all leave (k-core, or a new interaction that
  replaces an old one) stays in the catalog with ``n_total`` 0.
- **Dedup**: a new interaction identical to a kept one (user, item, rating, time) is rejected
  ``already_in_dataset``; a new row identical to one the dataset rejected before is ``already_rejected``;
  a new interaction with an old (user, item) pair follows prepare's rule (the latest wins: the other is
  ``repeat_earlier``, an old row so replaced goes to rejects.parquet with the file ``(dataset)``).
- **Split**: the leave-one-out split is redone on the union, so each user's newest interactions become
  valid / test: quality on the newest interactions is what evaluation measures after an update.
- **Stats** count the dataset's rows and the new ones: input rows = kept + rejected still holds;
  ``manifest.updates`` records each update (sources, rows read, kept, new items and users, time).
- **Atomic**: everything is written to ``DIR.update-tmp`` and swapped in by renames at the end; a failure
  before that leaves the dataset as it was.

The dataset's kept interactions are re-read through Ray Data, not into the driver; the driver holds the
hashes of the kept interactions and of the rejected rows (8 bytes each) to mark the known ones.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from .clean import RowCleaner, account_block, dedup_block, key_hash
from .config import PrepareConfig, SourceConfig, from_dict, parse_sources
from .dataset import INTERACTIONS, ITEMS, MANIFEST, REJECTS, SEQUENCES, STATS, USERS, DatasetError, PreparedData
from .indexing import assign_ids
from .prepare import (PrepareError, _num_partitions, _stats, fingerprint, interactions_view, item_stats_block,
                      kcore_and_split, rejects_view, sequences_block, source_names, users_block)
from .readers import DEFAULT_SCALES, SourcePlan, bundled_source, plan_source, read_item_meta, read_source

DATASET_FILE = "(dataset)"  # the "file" of rows that were in the dataset before the update
TMP_SUFFIX = ".update-tmp"
OLD_SUFFIX = ".update-old"

CLEANED_SCHEMA = pa.schema([
    ("source", pa.string()), ("file_id", pa.int16()), ("kind", pa.string()), ("user", pa.string()),
    ("item", pa.string()), ("rating", pa.float64()), ("ts", pa.int64()), ("text", pa.string()),
    ("summary", pa.string()), ("reason", pa.string()), ("rating_raw", pa.string()), ("ts_raw", pa.string()),
])


# ----------------------------------------------------------------------------- checking the update's sources
def match_sources(sources: list[SourceConfig], manifest: dict) -> list[SourcePlan]:
    """Plans for the update's sources, each in the namespace of one of the dataset's sources (by name; an
    unnamed source takes the name of the dataset's only source of its type) and read the way it was read."""
    cfg = from_dict(PrepareConfig, manifest["config"])
    old_list = parse_sources(cfg) or [bundled_source()]
    old = dict(zip(source_names(old_list), old_list))
    plans = []
    for s in sources:
        name = s.name
        if not name:
            same_type = [n for n, o in old.items() if o.type == s.type]
            if len(same_type) != 1:
                raise PrepareError(f"update source of type {s.type!r}: the dataset has "
                                   f"{len(same_type) or 'no'} source(s) of that type "
                                   f"({', '.join(f'{n} ({o.type})' for n, o in old.items())}); name the one "
                                   f"it adds to with name=")
            name = same_type[0]
        if name not in old:
            raise PrepareError(f"update source {name!r}: the dataset has no source of that name (it has "
                               f"{', '.join(old)}): new rows must join one of its sources' namespaces")
        o = old[name]
        if o.type != s.type:
            raise PrepareError(f"update source {name!r} is of type {s.type!r}, the dataset's is {o.type!r}")
        if o.type == "table" and set(o.columns) != set(s.columns):
            raise PrepareError(f"update source {name!r}: its columns ({', '.join(sorted(s.columns))}) do not match "
                               f"the dataset's ({', '.join(sorted(o.columns))})")
        scale_new, scale_old = (list(x.rating_scale or DEFAULT_SCALES[x.type]) for x in (s, o))
        if scale_new != scale_old or s.ts_unit != o.ts_unit:
            raise PrepareError(f"update source {name!r}: rating_scale {scale_new} / ts_unit {s.ts_unit!r} differ "
                               f"from the dataset's ({scale_old} / {o.ts_unit!r})")
        plans.append(plan_source(s, name))
    return plans


# ----------------------------------------------------------------------------- per-block helpers
def _strings(t: pa.Table, cols: list[str]) -> np.ndarray:
    """One string per row joining ``cols`` (nulls as a marker), hashed to 64 bits."""
    parts = [pc.fill_null(pc.cast(t[c], pa.string()), "\x00") for c in cols]
    joined = pc.binary_join_element_wise(*parts, "\x1f")
    return key_hash(joined.to_numpy(zero_copy_only=False).astype(object))


def interaction_keys(t: pa.Table) -> np.ndarray:
    """Hashes of (user, item, rating, ts) of kept interactions (``interactions.parquet`` rows or cleaned rows)."""
    return _strings(t, ["user", "item", "rating", "ts"])


def _reject_frame(t: pa.Table) -> pa.Table:
    """The columns a rejected row is recorded with (as ``rejects_view`` writes them), of cleaned rows."""
    rating = pc.coalesce(pc.cast(t["rating_raw"], pa.string()), pc.cast(t["rating"], pa.string()))
    ts = pc.coalesce(pc.cast(t["ts_raw"], pa.string()), pc.cast(t["ts"], pa.string()))
    return pa.table({"source": t["source"], "kind": t["kind"], "user": t["user"], "item": t["item"],
                     "rating": rating, "ts": ts, "text": t["text"], "summary": t["summary"]})


REJECT_KEY = ["source", "kind", "user", "item", "rating", "ts", "text", "summary"]


def reject_keys(t: pa.Table) -> np.ndarray:
    """Hashes of the recorded columns of rejected rows (``rejects.parquet`` rows)."""
    return _strings(t, REJECT_KEY)


def conform(t: pa.Table) -> pa.Table:
    """Cleaned rows with one fixed schema (an all-null column of a pandas batch stays a string)."""
    return pa.table({f.name: pc.cast(t[f.name], f.type) for f in CLEANED_SCHEMA}, schema=CLEANED_SCHEMA)


def mark_known(t: pa.Table, kept: np.ndarray, rejected: np.ndarray) -> pa.Table:
    """New cleaned rows: ``already_in_dataset`` where an identical interaction is kept in the dataset,
    ``already_rejected`` where the dataset rejected an identical row before (``kept``, ``rejected``: sorted
    hashes of ``interaction_keys`` / ``reject_keys``)."""
    t = conform(t)
    reason = t["reason"]
    ok = pc.and_(pc.is_null(reason), pc.equal(t["kind"], "interaction")).to_numpy(zero_copy_only=False)
    in_ds = ok & np.isin(interaction_keys(t), kept)
    seen_bad = ~in_ds & np.isin(reject_keys(_reject_frame(t)), rejected)
    reason = pc.if_else(pa.array(in_ds), "already_in_dataset", reason)
    reason = pc.if_else(pa.array(seen_bad), "already_rejected", reason)
    return t.set_column(t.schema.get_field_index("reason"), "reason", reason)


def old_rows(t: pa.Table, file_id: int) -> pa.Table:
    """The dataset's kept interactions as cleaned rows (no reason), from the pseudo-file ``file_id``."""
    n = len(t)
    return pa.table({
        "source": t["source"], "file_id": pa.array(np.full(n, file_id, np.int16)),
        "kind": pa.array(["interaction"] * n, pa.string()), "user": t["user"], "item": t["item"],
        "rating": pc.cast(t["rating"], pa.float64()), "ts": pc.cast(t["ts"], pa.int64()),
        "text": pc.cast(t["text"], pa.string()), "summary": pc.cast(t["summary"], pa.string()),
        "reason": pa.nulls(n, pa.string()), "rating_raw": pa.nulls(n, pa.string()),
        "ts_raw": pa.nulls(n, pa.string())}, schema=CLEANED_SCHEMA)


def _hashes(ds, fn) -> np.ndarray:
    h = ds.map_batches(lambda t: pa.table({"h": pa.array(fn(t), pa.uint64())}), batch_format="pyarrow",
                       batch_size=None).to_pandas()
    return np.unique(h["h"].to_numpy(np.uint64)) if len(h) else np.array([], dtype=np.uint64)


# ----------------------------------------------------------------------------- the catalog
def extend_catalog(old: pd.DataFrame, istats: pd.DataFrame, scheme: str, seed: int, meta: pd.DataFrame,
                   leaf_size: int = 64) -> pd.DataFrame:
    """The old catalog row for row (counts refreshed), then the items of ``istats`` it lacks, numbered on."""
    counts = istats.set_index("item")[["n_train", "n_total"]]
    cat = old.drop(columns=["n_train", "n_total"], errors="ignore").sort_values("index").reset_index(drop=True)
    cat["n_train"] = counts["n_train"].reindex(cat["item"]).fillna(0).astype("int64").to_numpy()
    cat["n_total"] = counts["n_total"].reindex(cat["item"]).fillna(0).astype("int64").to_numpy()
    fresh = istats[~istats["item"].isin(set(cat["item"]))]
    if fresh.empty:
        return cat
    if scheme == "collaborative":  # one new top-level branch, leaves of leaf_size items under it
        ranked = assign_ids(fresh, "sequential", seed)  # training items first, in first-appearance order
        top = 1 + max(int(t.strip("<>").split("><")[0][1:]) for t in cat["id_text"].astype(str))
        j = np.arange(len(ranked))
        ranked["id_text"] = [f"<a{top}><b{a}><c{b}>" for a, b in zip(j // leaf_size, j % leaf_size)]
    else:
        ranked = assign_ids(fresh, scheme, seed)
        base = max(int(t) for t in cat["id_text"].astype(str))
        ranked["id_text"] = [str(int(t) + base) for t in ranked["id_text"]]
    ranked["index"] = np.arange(len(cat), len(cat) + len(ranked), dtype="int64")
    if not meta.empty:
        ranked = ranked.merge(meta.drop_duplicates("item"), on="item", how="left")
    for c in ("title", "genres"):
        if c not in ranked:
            ranked[c] = None
    cols = ["item", "index", "id_text", "source", "title", "genres", "n_train", "n_total"]
    return pd.concat([cat[cols], ranked[cols]], ignore_index=True)


# ----------------------------------------------------------------------------- swapping the directory in
def replace_dir(tmp: Path, out: Path) -> None:
    """``tmp`` becomes ``out``: two renames, the old one deleted after (a crash between them leaves it as
    ``out.update-old``, which the next update puts back)."""
    old = out.with_name(out.name + OLD_SUFFIX)
    if old.exists():
        shutil.rmtree(old)
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old)


def _recover(out: Path) -> None:
    old = out.with_name(out.name + OLD_SUFFIX)
    if old.exists() and not out.exists():  # an earlier update stopped between its two renames
        os.rename(old, out)


# ----------------------------------------------------------------------------- main
def update(data_dir: str | Path, sources: list[SourceConfig], log=print) -> dict:
    """Append ``sources``' rows to the dataset at ``data_dir`` (see the module doc); returns the new stats."""
    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy

    from .runtime import ensure_ray

    t0 = time.perf_counter()
    out = Path(data_dir)
    _recover(out)
    try:
        data = PreparedData.open(out)
        manifest = data.manifest
    except (DatasetError, json.JSONDecodeError) as e:
        raise PrepareError(f"prepare --update {out}: {e}") from None
    if manifest.get("kind") != "recflm-dataset" or "config" not in manifest:
        raise PrepareError(f"prepare --update {out}: its manifest.json is not a recflm dataset's")
    if not sources:
        raise PrepareError("prepare --update needs the new rows: give a source (--movielens / --amazon / --table, "
                           "or sources=[...])")
    cfg = from_dict(PrepareConfig, manifest["config"])
    plans = match_sources(sources, manifest)
    ensure_ray()
    DataContext.get_current().shuffle_strategy = ShuffleStrategy.HASH_SHUFFLE
    k = cfg.k_core if cfg.k_core > 1 else 1
    tmp = out.with_name(out.name + TMP_SUFFIX)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        stats = _build(out, tmp, data, cfg, plans, k, t0, log)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)
    return stats


def _build(out: Path, tmp: Path, data: PreparedData, cfg: PrepareConfig, plans: list[SourcePlan], k: int,
           t0: float, log) -> dict:
    from ray.data import read_parquet

    spec = {p.name: {"scale": p.scale, "ts_unit": p.cfg.ts_unit, "has_rating": p.has_rating} for p in plans}
    files = [str(f) for p in plans for f in p.files] + [DATASET_FILE]
    old_id = len(files) - 1
    cleaner = RowCleaner(spec, cfg.rating_min, cfg.rating_max, cfg.min_ts, cfg.max_ts,
                         [str(f.resolve()) for p in plans for f in p.files])
    kept_old = read_parquet(str(out / INTERACTIONS))
    kept_hashes = _hashes(kept_old, interaction_keys)
    rejected_hashes = _hashes(read_parquet(str(out / REJECTS)), reject_keys) \
        if (out / REJECTS).exists() else np.array([], dtype=np.uint64)
    log(f"update: {len(kept_hashes)} kept and {len(rejected_hashes)} rejected rows in {out}")
    parts = [read_source(p, post=cleaner) for p in plans]
    new = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    new = new.map_batches(mark_known, fn_kwargs={"kept": kept_hashes, "rejected": rejected_hashes},
                          batch_format="pyarrow", batch_size=None)
    old = kept_old.map_batches(old_rows, fn_kwargs={"file_id": old_id}, batch_format="pyarrow", batch_size=None)
    nparts = _num_partitions(cfg, plans) + max(1, len(kept_hashes) // 500_000)
    deduped = (new.union(old).repartition(nparts, keys=["user"])
               .map_batches(dedup_block, batch_format="pandas", batch_size=None).materialize())
    # k-core on the union, and the dataset's own split settings (short users held out whole, new-user
    # holdout), as its prepare did
    final, removed, passes = kcore_and_split(deduped, k, cfg)
    log(f"update: union de-duplicated, k-core (k={k}) after {passes} pass(es), split again")

    per_block = final.map_batches(item_stats_block, batch_format="pyarrow", fn_kwargs={"seed": cfg.seed},
                                  batch_size=None).to_pandas()
    istats = per_block.groupby("item", sort=False).agg(
        source=("source", "first"), n_total=("n_total", "sum"), n_train=("n_train", "sum"),
        train_key=("train_key", "min"), other_key=("other_key", "min")).reset_index()
    meta = pd.concat([read_item_meta(p) for p in plans], ignore_index=True)
    old_catalog = data.catalog
    catalog = extend_catalog(old_catalog, istats, cfg.indexing, cfg.seed, meta, cfg.collab_leaf_size)
    catalog.to_parquet(tmp / ITEMS, index=False)
    new_items = len(catalog) - len(old_catalog)

    final.map_batches(interactions_view, batch_format="pyarrow", batch_size=None).write_parquet(str(tmp / INTERACTIONS))
    final.map_batches(rejects_view, batch_format="pyarrow", fn_kwargs={"files": files},
                      batch_size=None).write_parquet(str(tmp / REJECTS))
    if (out / REJECTS).exists():  # the rows rejected before stay rejected, beside this update's
        for f in sorted((out / REJECTS).iterdir()):
            dest = tmp / REJECTS / f.name
            shutil.copy2(f, dest if not dest.exists() else dest.with_name(f"old-{f.name}"))
    seqs = final.map_batches(sequences_block, batch_format="pyarrow", fn_kwargs={
        "catalog_index": pd.Index(catalog["item"]), "id_texts": catalog["id_text"].to_numpy(dtype=object)},
        batch_size=None).materialize()
    seqs.write_parquet(str(tmp / SEQUENCES))
    seqs.map_batches(users_block, batch_format="pandas").write_parquet(str(tmp / USERS))

    acct = final.map_batches(account_block, batch_format="pyarrow", batch_size=None).to_pandas()
    acct["file"] = [files[i] for i in acct["file_id"]]
    stats = _merge_stats(data, acct, seqs, catalog, plans, k, passes, time.perf_counter() - t0)
    old_users = set(data.sequences_pandas(columns=["user"])["user"])
    users_now = seqs.select_columns(["user"]).to_pandas()["user"]
    new_in = acct[acct["file"] != DATASET_FILE]
    record = {"unix": int(time.time()), "sources": fingerprint(plans), "input_rows": int(new_in["n"].sum()),
              "kept": int(new_in.loc[new_in["outcome"] == "kept", "n"].sum()),
              "rejected_by_reason": {r: int(n) for r, n in new_in[new_in["outcome"] != "kept"]
                                     .groupby("outcome")["n"].sum().items()},
              "replaced_old_rows": stats["update_replaced_old_rows"], "new_items": int(new_items),
              "new_users": int((~users_now.isin(old_users)).sum()), "seconds": stats["seconds"]}
    (tmp / STATS).write_text(json.dumps(stats, indent=2))
    manifest = dict(data.manifest)
    manifest["updates"] = list(manifest.get("updates", [])) + [record]
    # an updated dataset is other data than its first sources: its fingerprint says so
    manifest["sources"] = list(manifest.get("sources", [])) + [{**f, "update": len(manifest["updates"])}
                                                               for f in record["sources"]]
    manifest["updated_unix"] = record["unix"]
    manifest["layout"] = [INTERACTIONS, REJECTS, SEQUENCES, USERS, ITEMS, STATS]
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    log(f"update: {record['input_rows']} rows read, {record['kept']} kept, {new_items} new items, "
        f"{record['new_users']} new users")
    return stats


def _merge_stats(data: PreparedData, acct: pd.DataFrame, seqs, catalog, plans, k, passes, seconds) -> dict:
    """stats.json after the update: the dataset's counts plus the new rows' (input rows = kept + rejected)."""
    old = data.stats
    stats = _stats(acct, seqs, catalog, plans, k, passes, seconds)
    new_in = acct[acct["file"] != DATASET_FILE]
    replaced = acct[(acct["file"] == DATASET_FILE) & (acct["outcome"] != "kept")]
    rej = dict(old.get("rejected_by_reason", {}))
    for part in (new_in[new_in["outcome"] != "kept"], replaced):
        for r, n in part.groupby("outcome")["n"].sum().items():
            rej[r] = rej.get(r, 0) + int(n)
    per_file = {f: dict(v) for f, v in old.get("per_file", {}).items()}
    for f, v in stats["per_file"].items():
        if f == DATASET_FILE:
            continue
        d = per_file.setdefault(f, {"input_rows": 0, "kept": 0, "rejected": 0})
        for key in d:
            d[key] += v[key]
    stats["input_rows"] = int(old["input_rows"] + new_in["n"].sum())
    stats["rejected"] = int(sum(rej.values()))
    stats["kept"] = stats["input_rows"] - stats["rejected"]
    stats["rejected_by_reason"] = {r: n for r, n in rej.items() if n}
    stats["kept_tags_as_text"] = stats["kept"] - stats["kept_interactions"]
    stats["per_file"] = per_file
    stats["families"] = list(data.manifest.get("families", stats["families"]))
    stats["update_replaced_old_rows"] = int(replaced["n"].sum())
    return stats


__all__ = ["update", "match_sources", "extend_catalog", "replace_dir", "mark_known", "DATASET_FILE"]
