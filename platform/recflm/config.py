"""Typed configs: dataclasses loadable from YAML, overridable as ``key=value`` on the command line.

Every stage has one config class. ``load_config(Cls, path, overrides)`` reads an optional YAML file,
applies dotted overrides such as ``augment.crop=0.3`` or ``k_core=10`` (values are parsed as YAML,
so ``sources=[{type: movielens, path: data/ml}]`` works too) and checks names and types, so a typo
stops with a message that names the key instead of being ignored.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key and the problem."""


# ----------------------------------------------------------------------------- prepare stage
@dataclass
class SourceConfig:
    """One input source.

    type: ``movielens`` (a directory with ratings.csv [+ movies.csv, tags.csv]), ``amazon`` (review
    JSON lines, ``.json``/``.jsonl`` gzipped or not) or ``table`` (CSV, TSV or Parquet with a column map).
    """

    type: str = "movielens"
    path: str = ""
    name: str = ""  # namespace for its user and item IDs; defaults to the type (made unique)
    # table sources: canonical name -> column name in the file (user, item, rating, ts, text, summary, title)
    columns: dict = field(default_factory=dict)
    format: str = ""  # table sources: csv | tsv | parquet (default: from the file extension: .csv, .tsv, .parquet)
    delimiter: str = ""  # table sources: CSV field separator (default "," or, for tsv, a tab)
    rating_scale: list = field(default_factory=lambda: [])  # [min, max] of the source; default per type
    ts_unit: str = "s"  # table sources: unit of numeric timestamps (s, ms, us, ns); strings are parsed as dates
    # an item table (CSV, TSV or Parquet) of any source type: one row per item with its attributes, e.g. Amazon
    # Toys' category and brand ids; it replaces a MovieLens movies.csv's title and genres for the items it lists
    items: str = ""
    # ... its column map: item (required), attrs (|-separated attribute values) and / or title
    item_columns: dict = field(default_factory=dict)


@dataclass
class AugmentConfig:
    """Augmentation operators, each applied with its own probability; a fixed seed reproduces a run."""

    crop: float = 0.2  # keep a random contiguous window of the history
    mask: float = 0.1  # probability that a history example masks items
    mask_rate: float = 0.2  # share of history items masked when masking
    reorder: float = 0.1  # shuffle a short random window of the history
    reorder_window: int = 3
    substitute: float = 0.1  # replace one history item by a random catalog item (noise)
    rating_noise: float = 0.5  # add N(0, rating_noise_sd) to rating targets, rounded to 0.1
    rating_noise_sd: float = 0.3
    merge_sources: float = 1.0  # probability that a user of a secondary source joins an epoch


@dataclass
class PromptConfig:
    """Which task families to render and how many examples per user and epoch."""

    families: list = field(default_factory=lambda: ["rating", "sequential", "explanation", "review", "direct"])
    max_history: int = 20
    # sequential family: prompt (P5: the history in the source, one next-item target per example), dense
    # (the source names the user, the target is the item sequence: a next-item target at every position,
    # one token per item), or both
    sequential_style: str = "prompt"
    dense_max_len: int = 50  # dense: items per target sequence (longer histories give several windows)
    sequential_per_user: int = 3
    direct_per_user: int = 2
    direct_candidates: int = 20  # candidates in 1-of-N training prompts (evaluation uses 1-of-100)
    rating_per_row: float = 1.0  # expected rating examples per training interaction
    # rating family: prompt (P5: one (user, item) prompt per rating) or dense (the target is a window of the
    # user's (item, rating) pairs, one token each: every rating of the window a target in one decoder pass,
    # predicted from the user's earlier items and ratings; needs one token per item)
    rating_style: str = "prompt"
    rating_window: int = 25  # dense rating: (item, rating) pairs per target sequence
    # span (masked items): one example per user and epoch (its latest max_history items), or, span_windows, one
    # per window of max_history training items (the self-supervised objective: every item of the history in a window)
    span_windows: bool = False
    max_text_chars: int = 400
    templates_dir: str = ""  # default: the templates shipped with the package


@dataclass
class PrepareConfig:
    sources: list = field(default_factory=list)  # list of SourceConfig (empty: the bundled MovieLens data)
    out: str = "runs/data"
    k_core: int = 5  # iterative k-core on users and items (0 or 1 turns it off)
    indexing: str = "sequential"  # sequential | random | collaborative
    collab_clusters: int = 16  # collaborative IDs: children per node of the cluster tree
    collab_leaf_size: int = 64  # ... and the largest cluster that is not split further
    rating_min: float = 1.0  # every source's ratings are mapped linearly onto this scale
    rating_max: float = 5.0
    min_ts: int = 0  # timestamps before this (seconds) are rejected as bad
    max_ts: int = 4102444800  # 2100-01-01
    num_partitions: int = 0  # hash partitions by user (0: from the input size)
    # share of users (a seeded hash of the user key) held out of every training family and stage: new users for
    # evaluation, their history given at request time as serving gets it (split "history" in the data)
    holdout_users: float = 0.0
    # users too short for leave-one-out (fewer than 3 interactions) normally train only; this seeded share of them
    # is held out whole instead (half to valid, half to test; stats: held_out_users): the text families (rating,
    # explanation, review) are evaluated on them. For data of one-off reviewers (Amazon Fine Food), e.g. 0.2
    holdout_short_users: float = 0.0
    seed: int = 2022
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)


# ----------------------------------------------------------------------------- loading
def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the annotated type ``tp`` and build nested dataclasses."""
    if isinstance(tp, str):
        raise ConfigError(f"internal: unresolved type for {key}")
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(arg, value, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} does not fit {tp}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return list(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s} (known: {', '.join(sorted(names))})"
        )
    kwargs = {k: _coerce(hints[k], v, prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def column_map(text: str, flag: str = "--columns") -> dict:
    """``user=customer,item=sku`` -> {"user": "customer", "item": "sku"} (a table source's ``columns``)."""
    out = {}
    for part in text.split(","):
        if "=" not in part:
            raise ConfigError(f"{flag}: {part!r} is not of the form canonical=column")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def set_dotted(data: dict, key: str, value, what: str = "override") -> None:
    """``data[a][b] = value`` for the dotted ``key`` "a.b" (sections made as needed)."""
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{what} {key}: {p} is not a section")
    node[parts[-1]] = value


def apply_override(data: dict, assignment: str) -> None:
    """Apply one ``key=value`` override (the value parsed as YAML, the key dotted for nested keys)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not of the form key=value")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {e}") from None
    set_dotted(data, key, value)


def flags_into(cfg, args, flags):
    """``cfg`` with the command-line flags that were given (not None) on top, as a new config
    (``dataclasses.replace``). ``flags``: names, or (flag, config key) pairs where they differ."""
    pairs = [(f, f) if isinstance(f, str) else f for f in flags]
    given = {key: getattr(args, flag) for flag, key in pairs if getattr(args, flag, None) is not None}
    return dataclasses.replace(cfg, **given)


def read_yaml_mapping(path: str | Path, what: str = "config file", mapping: str = "hold a mapping at the top level",
                      missing: type[Exception] = ConfigError) -> dict:
    """The mapping a YAML file holds; ``missing`` (the file is not there) or ConfigError (not YAML, not a
    mapping), each naming ``what`` the file is."""
    p = Path(path)
    if not p.is_file():
        raise missing(f"{what} {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {p} must {mapping}")
    return data


def load_config(cls, path: str | Path | None = None, overrides: list[str] | None = None):
    """Defaults <- YAML file <- ``key=value`` overrides, checked against ``cls``."""
    data: dict = {}
    if path:
        data.update(read_yaml_mapping(path))
    for o in overrides or []:
        apply_override(data, o)
    defaults = to_dict(cls())
    merged = _deep_merge(defaults, data)
    return from_dict(cls, merged)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_sources(cfg: PrepareConfig) -> list[SourceConfig]:
    return [s if isinstance(s, SourceConfig) else from_dict(SourceConfig, s, "sources[].") for s in cfg.sources]
