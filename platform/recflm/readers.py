"""Input readers: each turns one source into a Ray Dataset of raw rows in one shape.

Raw row columns (values as found in the file; cleaning parses and checks them):
``source, file, kind, user, item, rating, ts, text, summary`` where ``kind`` is ``interaction`` or
``tag`` (MovieLens tags, which become the short text of the (user, item) interaction they describe).

Every reader checks its files up front (exist, readable, required columns present) and raises
``SourceError`` naming the file and the problem before any work starts. Rows that cannot even be
parsed (a CSV line with the wrong number of fields, a JSON line that is not JSON) are not dropped:
they come through as rows with ``kind = "malformed"`` and the raw text in ``text``, and cleaning
rejects them with the reason ``malformed_row``.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .config import SourceConfig

RAW_COLUMNS = ["source", "file", "kind", "user", "item", "rating", "ts", "text", "summary"]
SOURCE_TYPES = ("movielens", "amazon", "table")
CANONICAL = ("user", "item", "rating", "ts", "text", "summary", "title")
DEFAULT_SCALES = {"movielens": [0.5, 5.0], "amazon": [1.0, 5.0], "table": [1.0, 5.0]}

BUNDLED = Path(__file__).parent / "demo_data" / "ml-latest-small"


class SourceError(ValueError):
    """A source cannot be read: the message names the file and the problem."""


@dataclass
class SourcePlan:
    """What ``read_source`` will read, decided and checked before any work is done."""

    cfg: SourceConfig
    name: str
    files: list[Path]  # interaction files
    kind_of: dict = field(default_factory=dict)  # file -> "interaction" | "tag"
    items_meta: Path | None = None  # MovieLens movies.csv
    items_table: Path | None = None  # the source's item table (SourceConfig.items)
    scale: tuple = (1.0, 5.0)
    has_rating: bool = True
    has_text: bool = False
    has_summary: bool = False
    review_text: bool = False  # text is review text (MovieLens tags are not: they feed explanations only)
    delimiter: str = ","  # the field separator of CSV files (a tab for TSV)


def bundled_source() -> SourceConfig:
    return SourceConfig(type="movielens", path=str(BUNDLED), name="ml")


# ----------------------------------------------------------------------------- checking
def _csv_header(path: Path, delimiter: str = ",") -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as f:
            return next(csv.reader(f, delimiter=delimiter))
    except StopIteration:
        raise SourceError(f"{path}: file is empty (no header row)") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SourceError(f"{path}: cannot read as CSV: {e}") from None


def _require_columns(path: Path, have: list[str], need: list[str]) -> None:
    missing = [c for c in need if c not in have]
    if missing:
        raise SourceError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(have)})")


def _require_file(path: Path) -> Path:
    if not path.exists():
        raise SourceError(f"{path}: no such file")
    if not path.is_file():
        raise SourceError(f"{path}: not a file")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise SourceError(f"{path}: cannot be read: {e}") from None
    return path


def plan_source(cfg: SourceConfig, name: str) -> SourcePlan:
    """Check a source and decide what to read; raises SourceError naming the file and problem."""
    if cfg.type not in SOURCE_TYPES:
        raise SourceError(f"source {name!r}: unknown source type {cfg.type!r} (known: {', '.join(SOURCE_TYPES)})")
    if not cfg.path:
        raise SourceError(f"source {name!r}: no path given")
    path = Path(cfg.path).expanduser()
    scale = tuple(cfg.rating_scale or DEFAULT_SCALES[cfg.type])
    if len(scale) != 2 or not scale[0] < scale[1]:
        raise SourceError(f"source {name!r}: rating_scale must be [min, max] with min < max, got {list(scale)}")

    plan = _plan_interactions(cfg, name, path, scale)
    if cfg.items:
        plan.items_table = _plan_items(cfg, name)
    return plan


ITEM_COLUMNS = ("item", "attrs", "title")  # the keys of an item table's column map
ATTR_SEP = "|"  # attribute values in one field of an item table (MovieLens genres alike)


def _plan_items(cfg: SourceConfig, name: str) -> Path:
    """Check a source's item table (exists, readable, the mapped columns present) and return its path."""
    cols = dict(cfg.item_columns)
    unknown = sorted(set(cols) - set(ITEM_COLUMNS))
    if unknown:
        raise SourceError(f"source {name!r}: unknown item-column key(s) {unknown} (known: {', '.join(ITEM_COLUMNS)})")
    if "item" not in cols:
        raise SourceError(f"source {name!r}: the item-column map must name the 'item' column (e.g. item=item,"
                          "attrs=attributes)")
    if not set(cols) & {"attrs", "title"}:
        raise SourceError(f"source {name!r}: the item-column map names no 'attrs' or 'title' column: the item "
                          "table would add nothing")
    f = _require_file(Path(cfg.items).expanduser())
    fmt = _table_format(f)
    if fmt == "parquet":
        try:
            have = pq.read_schema(f).names
        except Exception as e:  # pyarrow raises several types for a bad file
            raise SourceError(f"{f}: cannot read as Parquet: {e}") from None
    else:
        have = _csv_header(f, "\t" if fmt == "tsv" else ",")
    _require_columns(f, have, list(cols.values()))
    return f


def _plan_interactions(cfg: SourceConfig, name: str, path: Path, scale: tuple) -> SourcePlan:
    if cfg.type == "movielens":
        if not path.is_dir():
            raise SourceError(f"{path}: a MovieLens source must be a directory holding ratings.csv")
        ratings = _require_file(path / "ratings.csv")
        _require_columns(ratings, _csv_header(ratings), ["userId", "movieId", "rating", "timestamp"])
        plan = SourcePlan(cfg, name, [ratings], {ratings: "interaction"}, scale=scale)
        tags = path / "tags.csv"
        if tags.exists():
            _require_columns(tags, _csv_header(_require_file(tags)), ["userId", "movieId", "tag", "timestamp"])
            plan.files.append(tags)
            plan.kind_of[tags] = "tag"
            plan.has_text = True
        movies = path / "movies.csv"
        if movies.exists():
            _require_columns(movies, _csv_header(_require_file(movies)), ["movieId", "title"])
            plan.items_meta = movies
        return plan

    if cfg.type == "amazon":
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        files = [p for p in files if p.name.endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz"))]
        if not files:
            raise SourceError(f"{path}: no .json / .jsonl (optionally .gz) review files found")
        for f in files:
            _require_file(f)
            first = _first_json_line(f)
            _require_columns(f, list(first), ["reviewerID", "asin", "overall", "unixReviewTime"])
        return SourcePlan(cfg, name, files, {f: "interaction" for f in files}, scale=scale,
                          has_text=True, has_summary=True, review_text=True)

    # generic table
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    fmt = cfg.format or _table_format(files[0] if files else path)
    if fmt not in TABLE_FORMATS:
        raise SourceError(f"source {name!r}: format {fmt!r} is not one of {', '.join(TABLE_FORMATS)}")
    files = [f for f in files if f.name.endswith(TABLE_FORMATS[fmt])] if path.is_dir() else files
    if not files:
        raise SourceError(f"{path}: no {fmt} files found (names ending {', '.join(TABLE_FORMATS[fmt])})")
    delimiter = cfg.delimiter or ("\t" if fmt == "tsv" else ",")
    if len(delimiter) != 1:
        raise SourceError(f"source {name!r}: delimiter {cfg.delimiter!r} must be one character")
    cols = dict(cfg.columns)
    unknown = sorted(set(cols) - set(CANONICAL))
    if unknown:
        raise SourceError(f"source {name!r}: unknown column-map key(s) {unknown} (known: {', '.join(CANONICAL)})")
    for need in ("user", "item", "ts"):
        if need not in cols:
            raise SourceError(f"source {name!r}: the column map must name the {need!r} column")
    for f in files:
        _require_file(f)
        if fmt == "parquet":
            try:
                have = pq.read_schema(f).names
            except Exception as e:  # pyarrow raises several types for a bad file
                raise SourceError(f"{f}: cannot read as Parquet: {e}") from None
        else:
            have = _csv_header(f, delimiter)
        _require_columns(f, have, list(cols.values()))
    return SourcePlan(cfg, name, files, {f: "interaction" for f in files}, scale=scale,
                      has_rating="rating" in cols, has_text="text" in cols, has_summary="summary" in cols,
                      review_text="text" in cols, delimiter=delimiter)


# table format -> the file names it reads
TABLE_FORMATS = {"csv": (".csv", ".csv.gz"), "tsv": (".tsv", ".tsv.gz", ".tab"), "parquet": (".parquet",)}


def _table_format(path: Path) -> str:
    for fmt, ends in TABLE_FORMATS.items():
        if path.name.endswith(ends):
            return fmt
    raise SourceError(f"{path}: cannot tell the table format from the name; set format: csv|tsv|parquet")


def _first_json_line(path: Path) -> dict:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise SourceError(f"{path}: first line is not JSON: {e}") from None
                    if not isinstance(obj, dict):
                        raise SourceError(f"{path}: first line is not a JSON object")
                    return obj
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise SourceError(f"{path}: cannot be read: {e}") from None
    raise SourceError(f"{path}: file is empty")


# ----------------------------------------------------------------------------- reading
def _frame(source: str, file, kind, user, item, rating, ts, text=None, summary=None) -> pd.DataFrame:
    """Raw rows: IDs and text as strings; rating and ts as found (strings from CSV / JSON,
    numbers from Parquet), to be parsed and checked by cleaning."""
    n = len(user)
    return pd.DataFrame({
        "source": pd.Series([source] * n, dtype="str"),
        "file": file.reset_index(drop=True).astype("str") if isinstance(file, pd.Series)
        else pd.Series([file] * n, dtype="str"),
        "kind": kind if isinstance(kind, pd.Series) else pd.Series([kind] * n, dtype="str"),
        "user": _as_str(user, n), "item": _as_str(item, n), "rating": _as_is(rating, n),
        "ts": _as_is(ts, n), "text": _as_str(text, n), "summary": _as_str(summary, n),
    })


def _as_is(col, n: int) -> pd.Series:
    if col is None:
        return pd.Series([None] * n, dtype="str")
    s = pd.Series(col).reset_index(drop=True)
    return s.astype("str") if s.dtype == object else s


def _as_str(col, n: int) -> pd.Series:
    """Strings, nulls kept; integral floats (an ID column with nulls read as float) lose the '.0'."""
    if col is None:
        return pd.Series([None] * n, dtype="str")
    s = pd.Series(col).reset_index(drop=True)
    if pd.api.types.is_float_dtype(s.dtype):
        v = s.dropna()
        if (v == np.floor(v)).all():
            s = s.astype("Int64")
    return s.astype("str")


def _parse_csv_text(lines: list[str], header: list[str], delimiter: str = ",") -> tuple[pd.DataFrame, list[str]]:
    """Parse CSV records with pyarrow, all columns as strings; a record with the wrong number of
    fields is collected (not dropped) and returned as malformed."""
    import pyarrow.csv as pacsv

    bad: list[str] = []

    def on_invalid(row) -> str:
        bad.append(row.text)
        return "skip"

    data = ("\n".join(lines) + "\n").encode("utf-8")
    table = pacsv.read_csv(
        io.BytesIO(data),
        read_options=pacsv.ReadOptions(column_names=header, use_threads=False),
        parse_options=pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=on_invalid, newlines_in_values=False),
        convert_options=pacsv.ConvertOptions(column_types={h: pa.string() for h in header},
                                             strings_can_be_null=False, quoted_strings_can_be_null=False),
    )
    return table.to_pandas(types_mapper={pa.string(): pd.StringDtype("pyarrow")}.get).astype("str"), bad


class _CsvParser:
    """map_batches UDF: raw CSV lines (read_text with paths) -> raw rows.

    ``files`` maps each path to (kind, header, column map, delimiter)."""

    def __init__(self, source: str, files: dict):
        self.source, self.files = source, files

    def __call__(self, batch: pa.Table) -> pd.DataFrame:
        out = []
        lines_all = batch.column("text").to_pylist()
        paths = batch.column("path").to_pylist()
        by_path: dict = {}
        for line, path in zip(lines_all, paths):
            by_path.setdefault(path, []).append(line)
        for path, lines in by_path.items():
            kind, header, c, delimiter = self.files[_norm(path)]
            head = delimiter.join(header)
            lines = [ln for ln in lines if ln and ln != head]
            df, bad = _parse_csv_text(lines, header, delimiter)
            file = _norm(path)
            out.append(_frame(self.source, file, kind, df[c["user"]], df[c["item"]],
                              df[c["rating"]] if "rating" in c else None, df[c["ts"]],
                              df[c["text"]] if "text" in c else None,
                              df[c["summary"]] if "summary" in c else None))
            if bad:
                n = len(bad)
                out.append(_frame(self.source, file, "malformed", [None] * n, [None] * n, None, None, bad))
        return pd.concat(out, ignore_index=True) if out else _frame(self.source, "", "interaction", [], [], None, None)


class _JsonParser:
    """map_batches UDF: raw JSON lines -> raw rows; a line that is not a JSON object is malformed."""

    def __init__(self, source: str):
        self.source = source

    def __call__(self, batch: pa.Table) -> pd.DataFrame:
        recs, files, bad, bad_files = [], [], [], []
        for line, path in zip(batch.column("text").to_pylist(), batch.column("path").to_pylist()):
            if not line or not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("not an object")
                recs.append(obj)
                files.append(_norm(path))
            except ValueError:
                bad.append(line)
                bad_files.append(_norm(path))
        df = pd.DataFrame.from_records(recs) if recs else pd.DataFrame()
        col = lambda k: df[k] if k in df else pd.Series([None] * len(df), dtype=object)  # noqa: E731
        good = _frame(self.source, pd.Series(files, dtype="str"), "interaction", col("reviewerID"), col("asin"),
                      col("overall"), col("unixReviewTime"), col("reviewText"), col("summary"))
        if bad:
            n = len(bad)
            good = pd.concat([good, _frame(self.source, pd.Series(bad_files, dtype="str"), "malformed",
                                           [None] * n, [None] * n, None, None, bad)], ignore_index=True)
        return good


class _ParquetParser:
    def __init__(self, source: str, colmap: dict):
        self.source, self.colmap = source, colmap

    def __call__(self, df: pd.DataFrame) -> pd.DataFrame:
        c = self.colmap
        get = lambda k: df[c[k]] if k in c else None  # noqa: E731
        return _frame(self.source, df["path"].map(_norm), "interaction", get("user"), get("item"),
                      get("rating"), get("ts"), get("text"), get("summary"))


def _norm(path: str) -> str:
    """Ray reports local paths without the leading '/' of the given absolute path on some filesystems."""
    return path if path.startswith("/") or "://" in path else "/" + path


ML_COLUMNS = {
    "interaction": {"user": "userId", "item": "movieId", "rating": "rating", "ts": "timestamp"},
    "tag": {"user": "userId", "item": "movieId", "text": "tag", "ts": "timestamp"},
}


class _Then:
    """Two UDFs as one (a parser, then ``post``), so the rows are converted between Arrow and
    pandas once, not once per step."""

    def __init__(self, first, post):
        self.first, self.post = first, post

    def __call__(self, batch):
        return self.post(self.first(batch))


def read_source(plan: SourcePlan, post=None):
    """A lazy Ray Dataset of raw rows for one checked source (one read over all its files);
    ``post`` (e.g. the row cleaner) runs on each parsed batch inside the same task."""
    import ray.data

    def udf(parser):
        return _Then(parser, post) if post is not None else parser

    files = [str(f.resolve()) for f in plan.files]
    if plan.cfg.type == "amazon":
        return ray.data.read_text(files, include_paths=True).map_batches(
            udf(_JsonParser(plan.name)), batch_format="pyarrow", batch_size=20_000)
    if plan.cfg.type == "table" and files[0].endswith(".parquet"):
        cols = list(dict.fromkeys(v for k, v in plan.cfg.columns.items() if k != "title"))
        return ray.data.read_parquet(files, columns=cols, include_paths=True).map_batches(
            udf(_ParquetParser(plan.name, plan.cfg.columns)), batch_format="pandas", batch_size=200_000)
    spec = {}
    for f, name in zip(plan.files, files):
        kind = plan.kind_of[f]
        colmap = ML_COLUMNS[kind] if plan.cfg.type == "movielens" else plan.cfg.columns
        spec[name] = (kind, _csv_header(f, plan.delimiter), colmap, plan.delimiter)
    # read_text keeps every line, so a malformed record cannot silently vanish; quoted fields
    # with embedded newlines are not supported by this line-based path.
    return ray.data.read_text(files, include_paths=True).map_batches(
        udf(_CsvParser(plan.name, spec)), batch_format="pyarrow", batch_size=100_000)


def split_attrs(value) -> list[str]:
    """``"Action|Comedy"`` -> ["Action", "Comedy"]; empty and MovieLens's "(no genres listed)" give none."""
    if not isinstance(value, str):
        return []
    return [a.strip() for a in value.split(ATTR_SEP) if a.strip() and a.strip() != "(no genres listed)"]


def read_item_meta(plan: SourcePlan) -> pd.DataFrame:
    """Item metadata (item key, title, genres, attributes) for the catalog; small, read on the driver.

    ``attributes``: the item's attribute values (a list of strings): a MovieLens movie's genres, or the
    ``attrs`` column of the source's item table, which also replaces a movies.csv's title where it maps one."""
    out = pd.DataFrame(columns=["item", "title", "genres", "attributes"])
    if plan.items_meta is not None:
        df = pd.read_csv(plan.items_meta, dtype=str)
        out = pd.DataFrame({"item": plan.name + ":" + df["movieId"].str.strip(), "title": df["title"]})
        out["genres"] = df["genres"] if "genres" in df else None
        out["attributes"] = [split_attrs(g) for g in out["genres"]]
    if plan.items_table is not None:
        c = plan.cfg.item_columns
        f = plan.items_table
        fmt = _table_format(f)
        try:
            df = pd.read_parquet(f, columns=list(dict.fromkeys(c.values()))) if fmt == "parquet" else \
                pd.read_csv(f, dtype=str, sep="\t" if fmt == "tsv" else ",", usecols=list(dict.fromkeys(c.values())),
                            keep_default_na=False)
        except Exception as e:  # pandas / pyarrow raise several types for a bad file
            raise SourceError(f"{f}: cannot read the item table: {e}") from None
        keys = plan.name + ":" + _as_str(df[c["item"]], len(df)).str.strip()
        table = pd.DataFrame({"item": keys}).drop_duplicates("item", keep="last")
        rows = table.index
        table["attributes"] = [split_attrs(v) for v in df[c["attrs"]].astype(str).iloc[rows]] if "attrs" in c \
            else [[] for _ in rows]
        table["title"] = df[c["title"]].iloc[rows].where(lambda t: t.astype(str) != "", None).to_numpy() \
            if "title" in c else None
        old = out.set_index("item")
        if "title" not in c and len(old):  # movies.csv titles stay where the table names none
            table["title"] = table["item"].map(old["title"])
        table["genres"] = table["item"].map(old["genres"]) if len(old) else None
        out = pd.concat([out[~out["item"].isin(set(table["item"]))], table], ignore_index=True)
    return out


__all__ = ["SourceError", "SourcePlan", "plan_source", "read_source", "read_item_meta", "bundled_source",
           "RAW_COLUMNS"]
