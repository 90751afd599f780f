"""Cleaning: row checks and normalisation, de-duplication, k-core, leave-one-out split.

Each function works on one pandas batch and is run by ``prepare`` inside Ray Data. Rows are never
dropped here: a bad row gets a ``reason`` (and stays in the stream until it is written to
``rejects.parquet``), so input rows = kept + rejected holds by construction.

Reason codes (``REASONS``):

- ``malformed_row``: the line could not be parsed (wrong field count, not JSON)
- ``missing_user`` / ``missing_item``: empty or absent ID
- ``missing_rating`` / ``bad_rating`` / ``rating_out_of_range``: for sources that have ratings
- ``bad_timestamp``: unparseable, or outside ``[min_ts, max_ts]``
- ``duplicate``: an exact copy of an earlier row (same user, item, rating, time and text)
- ``repeat_earlier``: the same (user, item) pair again with other values. **Rule: the latest
  interaction wins** (ties broken by rating, then text); the earlier ones are rejected with this
  reason. Keeping the latest means a held-out (last) interaction never has an earlier copy left in
  the training part.
- ``tag_without_interaction``: a MovieLens tag for a (user, item) pair that has no rating
- ``kcore``: removed by iterative k-core filtering (users and items with fewer than k interactions)

Text is normalised (HTML entities decoded, tags such as ``<br />`` removed, whitespace collapsed);
empty text is null. Ratings are mapped linearly from the source's scale onto one scale.
"""
from __future__ import annotations

import html
import re

import numpy as np
import pandas as pd

REASONS = (
    "malformed_row", "missing_user", "missing_item", "missing_rating", "bad_rating", "rating_out_of_range",
    "bad_timestamp", "duplicate", "repeat_earlier", "tag_without_interaction", "kcore",
)
TS_UNITS = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
_TAG_RE = re.compile(r"<[^>]{0,200}>")
_WS_RE = re.compile(r"\s+")

CLEAN_COLUMNS = ["source", "file", "kind", "user", "item", "rating", "ts", "text", "summary",
                 "reason", "rating_raw", "ts_raw"]


def normalise_text(s: pd.Series) -> pd.Series:
    """HTML entities decoded, tags removed, whitespace collapsed; empty -> null."""
    s = s.astype("str")
    mask = s.notna()
    if not mask.any():
        return s
    t = s[mask]
    if t.str.contains("&", regex=False).any():
        t = t.map(html.unescape)
    t = t.str.replace(_TAG_RE, " ", regex=True).str.replace(_WS_RE, " ", regex=True).str.strip()
    out = s.copy()
    out[mask] = t
    return out.where(out.str.len() > 0, None)


def _parse_ts(raw: pd.Series, unit: str) -> pd.Series:
    """Seconds since the epoch as float (NaN when unparseable): numbers in ``unit``, or date strings."""
    secs = pd.to_numeric(raw, errors="coerce") / TS_UNITS[unit]
    todo = secs.isna() & raw.notna()
    if todo.any():
        dt = pd.to_datetime(raw[todo].astype("str"), errors="coerce", utc=True, format="mixed")
        secs[todo] = (dt - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
    return secs


class RowCleaner:
    """map_batches UDF: checks and normalises raw rows (see module doc for the reasons)."""

    def __init__(self, sources: dict, rating_min: float, rating_max: float, min_ts: int, max_ts: int):
        # sources: name -> {"scale": (lo, hi), "ts_unit": "s", "has_rating": bool}
        self.sources, self.rmin, self.rmax, self.min_ts, self.max_ts = sources, rating_min, rating_max, min_ts, max_ts

    def __call__(self, df: pd.DataFrame) -> pd.DataFrame:
        n = len(df)
        reason = pd.Series([None] * n, dtype="str", index=df.index)

        def mark(cond, code):
            nonlocal reason
            reason = reason.where(~(cond & reason.isna()), code)

        kind = df["kind"]
        mark(kind == "malformed", "malformed_row")
        user = df["user"].astype("str").str.strip()
        item = df["item"].astype("str").str.strip()
        mark(user.isna() | (user.str.len() == 0), "missing_user")
        mark(item.isna() | (item.str.len() == 0), "missing_item")

        rating = pd.Series(np.nan, index=df.index)
        ts = pd.Series(np.nan, index=df.index)
        for name, spec in self.sources.items():
            sel = df["source"] == name
            if not sel.any():
                continue
            ts = ts.where(~sel, _parse_ts(df["ts"].where(sel), spec.get("ts_unit", "s")))
            if not spec.get("has_rating", True):
                continue
            lo, hi = spec["scale"]
            raw = df["rating"].where(sel)
            r = pd.to_numeric(raw, errors="coerce")
            inter = sel & (kind == "interaction")
            missing = raw.isna() | (raw.astype("str").str.strip().str.len() == 0)
            mark(inter & missing, "missing_rating")
            mark(inter & r.isna() & ~missing, "bad_rating")
            mark(inter & ((r < lo) | (r > hi)), "rating_out_of_range")
            rating = rating.where(~sel, self.rmin + (r - lo) * (self.rmax - self.rmin) / (hi - lo))
        mark(ts.isna() | (ts < self.min_ts) | (ts > self.max_ts), "bad_timestamp")

        bad_rows = reason.notna()
        ok = ~bad_rows
        source = df["source"].astype("str")
        out = pd.DataFrame({
            "source": source,
            "file": df["file"].astype("str"),
            "kind": kind.astype("str"),
            "user": (source + ":" + user).where(ok, user),
            "item": (source + ":" + item).where(ok, item),
            "rating": rating.where(kind == "interaction").round(4),
            "ts": ts.where(ok, 0).fillna(0).astype("int64"),
            "text": normalise_text(df["text"]).where(ok, df["text"]),
            "summary": normalise_text(df["summary"]).where(ok, df["summary"]),
            "reason": reason,
            "rating_raw": df["rating"].astype("str").where(bad_rows, None),
            "ts_raw": df["ts"].astype("str").where(bad_rows, None),
        })
        return out.reset_index(drop=True)


def dedup_block(df: pd.DataFrame) -> pd.DataFrame:
    """Per user-partition: exact duplicates, repeated (user, item) pairs, tags merged into text.

    Needs every row of a user in one block (``repartition(keys=["user"])`` gives that)."""
    df = df.reset_index(drop=True)
    reason = df["reason"].copy()
    ok = reason.isna()
    key = ["user", "item", "kind", "rating", "ts", "text", "summary"]
    dup = pd.Series(False, index=df.index)
    dup[ok] = df.loc[ok, key].duplicated(keep="first")
    reason = reason.where(~dup, "duplicate")

    inter = reason.isna() & (df["kind"] == "interaction")
    if inter.any():
        sub = df.loc[inter, ["user", "item", "ts", "rating", "text"]]
        order = sub.sort_values(["user", "item", "ts", "rating", "text"], na_position="first", kind="stable")
        earlier = order.duplicated(["user", "item"], keep="last")
        reason.loc[earlier[earlier].index] = "repeat_earlier"

    tags = reason.isna() & (df["kind"] == "tag")
    if tags.any():
        inter = reason.isna() & (df["kind"] == "interaction")
        pairs = pd.MultiIndex.from_frame(df.loc[inter, ["user", "item"]])
        tag_pairs = pd.MultiIndex.from_frame(df.loc[tags, ["user", "item"]])
        orphan = ~tag_pairs.isin(pairs)
        reason.loc[df.index[tags][orphan]] = "tag_without_interaction"
        has = tags.copy()
        has.loc[df.index[tags][orphan]] = False
        if has.any():
            joined = (df.loc[has].sort_values("ts", kind="stable").groupby(["user", "item"], sort=False)["text"]
                      .agg(lambda t: "; ".join(dict.fromkeys(x for x in t if isinstance(x, str)))))
            target = df.loc[inter, ["user", "item", "text"]]
            idx = pd.MultiIndex.from_frame(target[["user", "item"]])
            add = pd.Series(joined.reindex(idx).to_numpy(), index=target.index)
            fill = target["text"].isna() & add.notna() & (add.astype("str").str.len() > 0)
            df.loc[fill[fill].index, "text"] = add[fill]
    df["reason"] = reason
    return df


def _active(df: pd.DataFrame, removed_items, k: int) -> tuple[pd.Series, pd.Series]:
    """Interactions still in play given the removed items, and the rows of users below k."""
    inter = df["reason"].isna() & (df["kind"] == "interaction")
    if removed_items is not None and len(removed_items):
        inter &= ~df["item"].isin(removed_items)
    deg = df.loc[inter].groupby("user", sort=False).size()
    weak_users = deg.index[deg < k]
    weak = inter & df["user"].isin(weak_users)
    return inter & ~weak, weak


def kcore_item_counts(df: pd.DataFrame, removed_items, k: int) -> pd.DataFrame:
    """Per block: degree of each item after removing ``removed_items`` and users left below k."""
    alive, _ = _active(df, removed_items, k)
    counts = df.loc[alive, "item"].value_counts(sort=False)
    return pd.DataFrame({"item": counts.index.astype("str"), "n": counts.to_numpy(dtype="int64")})


def finalize_block(df: pd.DataFrame, removed_items, k: int) -> pd.DataFrame:
    """Per user-partition: k-core reasons, time order, positions and the leave-one-out split.

    Users with 3 or more interactions: last = test, second-to-last = valid, the rest train.
    Users with fewer (only possible with k < 3) keep all of theirs in train."""
    df = df.reset_index(drop=True)
    if k > 1:
        alive, _ = _active(df, removed_items, k)
        inter = df["reason"].isna() & (df["kind"] == "interaction")
        df.loc[inter & ~alive, "reason"] = "kcore"
        tags = df["reason"].isna() & (df["kind"] == "tag")
        if tags.any():
            kept = pd.MultiIndex.from_frame(df.loc[alive, ["user", "item"]])
            lost = ~pd.MultiIndex.from_frame(df.loc[tags, ["user", "item"]]).isin(kept)
            df.loc[df.index[tags][lost], "reason"] = "kcore"
    keep = df["reason"].isna() & (df["kind"] == "interaction")
    kept = df[keep].sort_values(["user", "ts", "item"], kind="stable")
    pos = kept.groupby("user", sort=False).cumcount()
    n = kept.groupby("user", sort=False)["item"].transform("size")
    split = np.where((n >= 3) & (pos == n - 1), "test", np.where((n >= 3) & (pos == n - 2), "valid", "train"))
    kept = kept.assign(pos=pos.astype("int32"), split=split)
    rest = df[~keep].assign(pos=np.int32(-1), split=None)
    return pd.concat([kept, rest], ignore_index=True)


def account_block(df: pd.DataFrame) -> pd.DataFrame:
    """Per block: row counts by input file, kind and outcome, for stats.json."""
    outcome = df["reason"].fillna("kept")
    g = pd.DataFrame({"file": df["file"], "kind": df["kind"], "outcome": outcome})
    c = g.value_counts().reset_index(name="n")
    return c.astype({"file": "str", "kind": "str", "outcome": "str", "n": "int64"})
