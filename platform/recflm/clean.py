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
- ``repeat_text``: an interaction whose text is degenerate: one segment said again and again (``repeated_text``:
  the words, case and punctuation aside, are a block of words repeated at least twice, at least 3 words in
  all, e.g. "great great great" or "Yum! Love it. Yum! Love it."); a review like that teaches the text
  families nothing and its summary or rating is noise
- ``tag_without_interaction``: a MovieLens tag for a (user, item) pair that has no rating
- ``kcore``: removed by iterative k-core filtering (users and items with fewer than k interactions)
- ``already_in_dataset`` / ``already_rejected`` (``prepare --update`` only, see prepare_update.py): a new
  interaction identical (user, item, rating, time) to one the dataset holds, or a new row identical to one
  it rejected before

Split (``finalize_block``): leave-one-out per user (see there); with ``holdout_short_users`` a seeded share of
the users too short for it (fewer than 3 interactions) is held out whole into valid / test, so that data of
one-off reviewers (Amazon Fine Food: 96% of the users) still has text-family examples to evaluate.

Text is normalised (HTML entities decoded, tags such as ``<br />`` removed, whitespace collapsed);
empty text is null. Ratings are mapped linearly from the source's scale onto one scale.
"""
from __future__ import annotations

import html
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

REASONS = (
    "malformed_row", "missing_user", "missing_item", "missing_rating", "bad_rating", "rating_out_of_range",
    "bad_timestamp", "repeat_text", "duplicate", "repeat_earlier", "tag_without_interaction", "kcore",
    "already_in_dataset", "already_rejected",
)
TS_UNITS = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
_TAG_RE = re.compile(r"<[^>]{0,200}>")
_WS_RE = re.compile(r"\s+")
_WORD_RE = re.compile(r"\w+")
REPEAT_MIN_WORDS = 3  # a repeated text has at least this many words (so "so so" or "bye bye" stay)


def _period(words: list) -> int:
    """The smallest p such that ``words`` is its first p words repeated (prefix function; len(words) if none)."""
    n = len(words)
    pi = [0] * n
    for i in range(1, n):
        j = pi[i - 1]
        while j and words[i] != words[j]:
            j = pi[j - 1]
        if words[i] == words[j]:
            j += 1
        pi[i] = j
    p = n - pi[-1] if n else 0
    return p if n and n % p == 0 else n


def repeated_text(s: pd.Series) -> np.ndarray:
    """True where the text is one block of words said at least twice (case and punctuation aside), with at
    least ``REPEAT_MIN_WORDS`` words in all; null text is not repeated."""
    out = np.zeros(len(s), dtype=bool)
    for i, t in enumerate(s):
        if not isinstance(t, str):
            continue
        words = _WORD_RE.findall(t.lower())
        if len(words) >= REPEAT_MIN_WORDS and _period(words) < len(words):
            out[i] = True
    return out


def normalise_text(s: pd.Series) -> pd.Series:
    """HTML entities decoded, tags removed, whitespace collapsed; empty -> null."""
    s = s.astype("str")
    mask = s.notna()
    if not mask.any():
        return s
    t = s[mask].str.replace(_TAG_RE, " ", regex=True)  # tags first, so an escaped "&lt;b&gt;" survives
    if t.str.contains("&", regex=False).any():
        t = t.map(html.unescape)
    t = t.str.replace(_WS_RE, " ", regex=True).str.strip()
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


def _str_where(col: pd.Series, mask: pd.Series) -> pd.Series:
    """The raw value as text where ``mask`` (rejected rows keep what the file said), else null."""
    out = pd.Series(None, index=col.index, dtype="str")
    if mask.any():
        out[mask] = col[mask].astype("str")
    return out


class RowCleaner:
    """map_batches UDF: checks and normalises raw rows (see module doc for the reasons)."""

    def __init__(self, sources: dict, rating_min: float, rating_max: float, min_ts: int, max_ts: int,
                 files: list | None = None):
        # sources: name -> {"scale": (lo, hi), "ts_unit": "s", "has_rating": bool}; files: input paths,
        # replaced by their position (``file_id``) so that the shuffle does not carry path strings
        self.sources, self.rmin, self.rmax, self.min_ts, self.max_ts = sources, rating_min, rating_max, min_ts, max_ts
        self.files = list(files or [])

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
            missing = raw.isna()
            if not pd.api.types.is_numeric_dtype(raw.dtype):
                missing |= raw.astype("str").str.strip().str.len() == 0
            mark(inter & missing, "missing_rating")
            mark(inter & r.isna() & ~missing, "bad_rating")
            mark(inter & ((r < lo) | (r > hi)), "rating_out_of_range")
            rating = rating.where(~sel, self.rmin + (r - lo) * (self.rmax - self.rmin) / (hi - lo))
        mark(ts.isna() | (ts < self.min_ts) | (ts > self.max_ts), "bad_timestamp")
        text = normalise_text(df["text"])
        if (kind == "interaction").any():
            mark(pd.Series(repeated_text(text), index=df.index) & (kind == "interaction"), "repeat_text")

        bad_rows = reason.notna()
        ok = ~bad_rows
        source = df["source"].astype("str")
        out = pd.DataFrame({
            "source": source,
            "file_id": pd.Categorical(df["file"], categories=self.files).codes.astype("int16")
            if self.files else np.full(n, -1, dtype="int16"),
            "kind": kind.astype("str"),
            "user": (source + ":" + user).where(ok, user),
            "item": (source + ":" + item).where(ok, item),
            "rating": rating.where(kind == "interaction").round(4),
            "ts": ts.where(ok, 0).fillna(0).astype("int64"),
            "text": text.where(ok, df["text"]),
            "summary": normalise_text(df["summary"]).where(ok, df["summary"]),
            "reason": reason,
            "rating_raw": _str_where(df["rating"], bad_rows),
            "ts_raw": _str_where(df["ts"], bad_rows),
        })
        return out.reset_index(drop=True)


def dedup_block(df: pd.DataFrame) -> pd.DataFrame:
    """Per user-partition: exact duplicates, repeated (user, item) pairs, tags merged into text.

    Needs every row of a user in one block (``repartition(keys=["user"])`` gives that)."""
    df = df.reset_index(drop=True)
    reason = df["reason"].copy()
    ok = reason.isna().to_numpy()
    item_hash = key_hash(df["item"].to_numpy(dtype=object))
    # only rows whose (user, item) pair occurs more than once can be duplicates or repeats:
    # find them by a pair hash, then apply the exact rules to that (small) subset
    pair = key_hash(df["user"].to_numpy(dtype=object)) * np.uint64(1_000_003) + item_hash
    cand = np.zeros(len(df), dtype=bool)
    cand[ok] = pd.Series(pair[ok]).duplicated(keep=False).to_numpy()
    if cand.any():
        sub = df.loc[cand, ["user", "item", "kind", "rating", "ts", "text", "summary"]]
        dup = sub.duplicated(keep="first")
        reason.loc[dup[dup].index] = "duplicate"
        inter = sub[~dup & (sub["kind"] == "interaction")]
        order = inter.sort_values(["user", "item", "ts", "rating", "text"], na_position="first", kind="stable")
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
    df["item_hash"] = item_hash
    return df


def key_hash(values: np.ndarray) -> np.ndarray:
    """64-bit hashes of string keys (items are tracked by hash in the k-core passes; a collision
    between two of even 10^8 items has a chance of about 3e-4)."""
    return pd.util.hash_array(values, categorize=False).astype(np.uint64)


def _kept_mask(t: pa.Table) -> np.ndarray:
    ok = pc.and_(pc.is_null(t["reason"]), pc.equal(t["kind"], "interaction"))
    return ok.to_numpy(zero_copy_only=False)


def _user_codes(t: pa.Table) -> np.ndarray:
    users = pc.fill_null(t["user"], "")  # rejected rows may have no user
    return pc.dictionary_encode(users).combine_chunks().indices.to_numpy(zero_copy_only=False)


def _alive(t: pa.Table, removed: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Interactions still in play given the removed item hashes (sorted) and k; and all of them."""
    inter = _kept_mask(t)
    alive = inter.copy()
    if len(removed):
        alive &= ~np.isin(t["item_hash"].to_numpy(), removed, assume_unique=False)
    codes = _user_codes(t)
    deg = np.bincount(codes[alive], minlength=int(codes.max()) + 1 if len(codes) else 0)
    alive &= deg[codes] >= k
    return alive, inter


def kcore_item_counts(t: pa.Table, removed: np.ndarray, k: int) -> pa.Table:
    """Per block: degree of each item (by hash) after removing ``removed`` and users left below k."""
    alive, _ = _alive(t, removed, k)
    h, n = np.unique(t["item_hash"].to_numpy()[alive], return_counts=True)
    return pa.table({"item_hash": pa.array(h, pa.uint64()), "n": pa.array(n, pa.int64())})


def held_out_users(users: np.ndarray, share: float, seed: int) -> np.ndarray:
    """Per user: "valid", "test" or "" (not held out): a seeded hash draw, ``share / 2`` of the users each."""
    if share <= 0 or len(users) == 0:
        return np.full(len(users), "", dtype=object)
    key = f"holdout{seed}".encode().hex()[:16].ljust(16, "0")
    h = pd.util.hash_array(np.asarray(users, dtype=object), hash_key=key, categorize=False).astype(np.uint64)
    u = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return np.where(u < share / 2, "valid", np.where(u < share, "test", "")).astype(object)


def finalize_block(t: pa.Table, removed: np.ndarray, k: int, holdout: float = 0.0, seed: int = 0) -> pa.Table:
    """Per user-partition: k-core reasons, time order, positions and the leave-one-out split.

    Users with 3 or more interactions: last = test, second-to-last = valid, the rest train.
    Users with fewer (only possible with k < 3) keep all of theirs in train, except, with ``holdout`` > 0
    (``PrepareConfig.holdout_short_users``), that share of them (``held_out_users``: half valid, half test),
    whose interactions all go to that split: a held-out user has no training data, so no (user, item)
    pair of it is in any training prompt."""
    reason = t["reason"].combine_chunks()
    if k > 1:
        alive, inter = _alive(t, removed, k)
        reason = pc.if_else(pa.array(inter & ~alive), "kcore", reason)
        tags = (pc.and_(pc.is_null(reason), pc.equal(t["kind"], "tag"))).to_numpy(zero_copy_only=False)
        if tags.any():
            users = pc.fill_null(t["user"], "").to_numpy(zero_copy_only=False)
            pair = key_hash(users) * np.uint64(31) + t["item_hash"].to_numpy()
            lost = tags & ~np.isin(pair, pair[alive])
            reason = pc.if_else(pa.array(lost), "kcore", reason)
    t = t.set_column(t.schema.get_field_index("reason"), "reason", reason)
    keep = _kept_mask(t)
    kept = t.filter(pa.array(keep))
    kept = kept.take(pc.sort_indices(kept, [("user", "ascending"), ("ts", "ascending"), ("item", "ascending")]))
    codes = _user_codes(kept)
    n_rows = len(codes)
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]]) if n_rows else np.array([], dtype=np.int64)
    sizes = np.diff(np.r_[starts, n_rows])
    pos = np.arange(n_rows) - np.repeat(starts, sizes)
    n = np.repeat(sizes, sizes)
    split = np.where((n >= 3) & (pos == n - 1), "test", np.where((n >= 3) & (pos == n - 2), "valid", "train"))
    if holdout > 0 and n_rows:
        first = kept["user"].take(pa.array(starts)).to_numpy(zero_copy_only=False)
        held = np.repeat(held_out_users(first, holdout, seed), sizes)
        split = np.where((n < 3) & (held != ""), held, split)
    kept = kept.append_column("pos", pa.array(pos, pa.int32())).append_column("split", pa.array(split, pa.string()))
    rest = t.filter(pa.array(~keep))
    rest = rest.append_column("pos", pa.array(np.full(len(rest), -1), pa.int32())) \
        .append_column("split", pa.nulls(len(rest), pa.string()))
    return pa.concat_tables([kept, rest])


def account_block(t: pa.Table) -> pa.Table:
    """Per block: row counts by input file, kind and outcome, for stats.json."""
    g = pa.table({"file_id": t["file_id"], "kind": t["kind"], "outcome": pc.fill_null(t["reason"], "kept")})
    return g.group_by(["file_id", "kind", "outcome"]).aggregate([([], "count_all")]) \
        .rename_columns(["file_id", "kind", "outcome", "n"])
