"""The prepared dataset directory: what ``recflm prepare`` writes and every later stage reads.

Layout (all Parquet is readable by pyarrow, pandas and Ray Data)::

    interactions.parquet/   kept rows: user, item, rating, ts, text, summary, source, split, pos
    rejects.parquet/        rejected input rows: source, file, user, item, rating, ts, reason, detail
    sequences.parquet/      one row per user: user, source, items, ids, ratings, ts, texts?, n_train, holdout
                            (items[:n_train] train, then at most one validation and one test item;
                            a held-out user's (``holdout``) first n_train items are its history, split
                            ``history`` in interactions.parquet, never trained on)
    users.parquet/          user, source, n_total, n_train, holdout
    items.parquet           the catalog: item, index, id_text, source, title, genres, attributes (a list of
                            attribute values: MovieLens genres, an item table's attrs), n_train
    stats.json              counts: input rows per file, kept, rejected by reason, users, items, ...
    manifest.json           source fingerprints, the config, versions, the ID scheme

User and item keys are namespaced per source (``ml:123``); ``id_text`` is the item's ID as the
model reads and writes it (``1234`` for sequential / random IDs, ``<c3><c12><7>`` for collaborative).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pandas as pd

INTERACTIONS = "interactions.parquet"
REJECTS = "rejects.parquet"
SEQUENCES = "sequences.parquet"
USERS = "users.parquet"
ITEMS = "items.parquet"
STATS = "stats.json"
MANIFEST = "manifest.json"

class DatasetError(ValueError):
    pass


@dataclass
class PreparedData:
    path: Path

    @classmethod
    def open(cls, path: str | Path) -> "PreparedData":
        p = Path(path)
        missing = [n for n in (MANIFEST, STATS, ITEMS, SEQUENCES, INTERACTIONS) if not (p / n).exists()]
        if missing:
            raise DatasetError(
                f"{p} is not a prepared dataset (missing {', '.join(missing)}); run `recflm prepare --out {p}`"
            )
        return cls(p)

    @cached_property
    def manifest(self) -> dict:
        return json.loads((self.path / MANIFEST).read_text())

    @cached_property
    def stats(self) -> dict:
        return json.loads((self.path / STATS).read_text())

    @cached_property
    def catalog(self) -> pd.DataFrame:
        """Item catalog, ordered by ``index`` (0..n_items-1)."""
        return pd.read_parquet(self.path / ITEMS).sort_values("index").reset_index(drop=True)

    @cached_property
    def id_texts(self) -> list[str]:
        return self.catalog["id_text"].tolist()

    @property
    def families(self) -> list[str]:
        """Task families the data supports (decided by prepare from the columns present)."""
        return list(self.manifest.get("families", []))

    def sequences_pandas(self, columns: list[str] | None = None) -> pd.DataFrame:
        """All user sequences in pandas: for evaluation and tests on small data only."""
        return pd.read_parquet(self.path / SEQUENCES, columns=columns)

    @cached_property
    def holdout_users(self) -> frozenset:
        """Users held out of training (``prepare --holdout-users``): new users at evaluation time."""
        import pyarrow.dataset as pads

        ds = pads.dataset(self.path / SEQUENCES, format="parquet")
        if "holdout" not in ds.schema.names:  # a dataset prepared before holdout_users existed
            return frozenset()
        t = ds.to_table(columns=["user"], filter=pads.field("holdout"))
        return frozenset(t["user"].to_pylist())

    def interactions_pandas(self, columns: list[str] | None = None) -> pd.DataFrame:
        return pd.read_parquet(self.path / INTERACTIONS, columns=columns)

    def rejects_pandas(self) -> pd.DataFrame:
        return pd.read_parquet(self.path / REJECTS)
