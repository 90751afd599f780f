"""Task families and their prompt templates (YAML data files in ``templates/``).

A template is ``{id, source, target, held_out}``; ``source`` and ``target`` are ``str.format``
strings over the fields of one example (``user``, ``item``, ``item_desc``, ``history``,
``candidates``, ``rating``, ``text``, ``summary``, ``answer``, and for P5's cold-start prompts ``item_attr`` and
``candidate_attrs``: an item described by its attributes instead of its ID, see ``item_attributes``). A template
is used for an example only when every field it names is present. Templates marked ``held_out`` are never used in training: they
are kept for zero-shot evaluation (P5 holds out the last prompt of each family the same way).
"""
from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

import yaml

FAMILIES = ("rating", "sequential", "explanation", "review", "direct")
TEMPLATES_DIR = Path(__file__).parent / "templates"
MIN_TEMPLATES = 5


class TemplateError(ValueError):
    pass


@dataclass(frozen=True)
class Template:
    id: str
    family: str
    source: str
    target: str
    held_out: bool = False

    @property
    def fields(self) -> frozenset:
        names = set()
        for text in (self.source, self.target):
            names |= {f for _, f, _, _ in string.Formatter().parse(text) if f}
        return frozenset(names)

    def render(self, ex: dict) -> tuple[str, str]:
        return self.source.format(**ex), self.target.format(**ex)


def load_templates(directory: str | Path | None = None) -> dict[str, list[Template]]:
    """All families' templates; checks each family has >= 5 and at least one held out."""
    d = Path(directory) if directory else TEMPLATES_DIR
    out: dict[str, list[Template]] = {}
    for fam in FAMILIES:
        path = d / f"{fam}.yaml"
        if not path.exists():
            raise TemplateError(f"{path}: template file for family {fam!r} is missing")
        try:
            doc = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise TemplateError(f"{path}: not valid YAML: {e}") from None
        items = (doc or {}).get("templates") or []
        temps = []
        for i, t in enumerate(items):
            if not isinstance(t, dict) or not {"id", "source", "target"} <= set(t):
                raise TemplateError(f"{path}: template #{i + 1} needs id, source and target")
            temps.append(Template(str(t["id"]), fam, str(t["source"]), str(t["target"]), bool(t.get("held_out"))))
        if len(temps) < MIN_TEMPLATES:
            raise TemplateError(f"{path}: family {fam!r} has {len(temps)} templates, needs at least {MIN_TEMPLATES}")
        if not any(t.held_out for t in temps) or all(t.held_out for t in temps):
            raise TemplateError(f"{path}: family {fam!r} needs both seen and held-out templates")
        ids = [t.id for t in temps]
        if len(set(ids)) != len(ids):
            raise TemplateError(f"{path}: duplicate template ids")
        out[fam] = temps
    return out


def template_words(directory: str | Path | None = None) -> list[str]:
    """The words of every template (fields left out): tokenizer training text for prompts a run may not render."""
    out = []
    for temps in load_templates(directory).values():
        for t in temps:
            out += [string.Formatter().vformat(x, (), _Blank()) for x in (t.source, t.target)]
    return [x for x in out if x.strip()]


class _Blank(dict):
    def __missing__(self, key):
        return ""


def usable(templates: list[Template], ex: dict, held_out: bool | None) -> list[Template]:
    """Templates of a family whose fields the example has (``held_out`` None: both kinds)."""
    have = {k for k, v in ex.items() if v is not None}
    return [t for t in templates if t.fields <= have and (held_out is None or t.held_out == held_out)]


# P5's cold-start prompts: the item is described by its attributes (MovieLens: title and genres; a catalog
# ``attributes`` column, e.g. Amazon attribute ids, where prepare wrote one) instead of its ID, so a model can
# answer about an item it never saw in training. ``direct`` templates with these fields are used only where the
# item (and, for a choice, every candidate) has attributes
ATTR_FIELD = "item_attr"
ATTR_CANDIDATES_FIELD = "candidate_attrs"
ATTR_CANDIDATES = 5  # candidates in a 1-of-N choice by attributes (training and evaluation)
ATTR_SEPARATOR = "; "


def _text(v) -> str | None:
    if v is None or (isinstance(v, float) and v != v):
        return None
    if isinstance(v, str):
        return v.strip() or None
    try:
        parts = [str(x).strip() for x in v if x is not None and str(x).strip()]
    except TypeError:
        return str(v)
    return ", ".join(parts) or None


def item_attributes(catalog) -> list:
    """Per catalog row, the item described by its attributes (``titled "Toy Story (1995)", genres Adventure,
    Animation``), or None for an item without any. Reads the catalog's ``title``, ``genres`` (MovieLens'
    ``A|B`` lists; ``(no genres listed)`` is no genre) and ``attributes`` (a list or a string) columns, where
    present."""
    n = len(catalog)
    col = lambda name: list(catalog[name]) if name in catalog else [None] * n  # noqa: E731
    out = []
    for title, genres, attrs in zip(col("title"), col("genres"), col("attributes")):
        parts = []
        title = _text(title)
        if title:
            parts.append(f'titled "{title}"')
        g = _text(genres)
        if g and g != "(no genres listed)":
            parts.append("genres " + ", ".join(x.strip() for x in g.split("|") if x.strip()))
        a = _text(attrs)
        if a:
            parts.append("attributes " + a)
        out.append(", ".join(parts) or None)
    return out


def is_attr(t: Template) -> bool:
    """A cold-start template: it describes the item by its attributes."""
    return ATTR_FIELD in t.fields or ATTR_CANDIDATES_FIELD in t.fields


def attr_template(templates: dict, choice: bool, held_out: bool = False) -> Template | None:
    """The first direct template describing items by attributes: a yes/no question (``choice`` False) or a
    1-of-N choice among ``candidate_attrs``, seen (training's) or held out (zero-shot)."""
    need = ATTR_CANDIDATES_FIELD if choice else "answer"
    allowed = {"user", "history", ATTR_FIELD, need}
    return next((t for t in templates.get("direct", []) if t.held_out == held_out and need in t.fields
                 and ATTR_FIELD in t.fields and t.fields <= allowed), None)


DENSE_FIELD = "sequence"  # a sequential template whose target is {sequence} is of the dense style


def is_dense(t: Template) -> bool:
    return DENSE_FIELD in t.fields


def sequential_template(templates: dict, dense: bool, held_out: bool = False) -> Template | None:
    """The first sequential template of the given style, seen (training's) or held out (zero-shot)."""
    return next((t for t in templates["sequential"] if t.held_out == held_out and is_dense(t) == dense), None)


def sequential_input(template: Template, user: str, history: list[str], max_history: int) -> tuple[str, list | None]:
    """The one way evaluation, validation and serving render a next-item request: (encoder source,
    decoder prefix). Prompt style: the last ``max_history`` item IDs in the source, no prefix. Dense
    style: the source names the user, and the last ``max_history`` item IDs are the decoder prefix."""
    shown = list(history)[-max_history:] if max_history > 0 else []
    if is_dense(template):
        return template.source.format(user=user) if "user" in template.fields else template.source, shown
    return template.source.format(user=user, history=", ".join(shown)), None


def format_rating(r: float) -> str:
    return f"{r:.1f}"


# the dense rating style (prompts.rating_style: dense): the target is a window of the user's (item, rating)
# pairs, one token each ("i1 <rating_4.0> i2 <rating_3.1> ..."), every rating a target predicted from the
# items and ratings before it and the item it rates; at inference the pairs before the asked item, then the
# item, are the decoder prefix and the expected value over the rating tokens is the answer
RATED_FIELD = "rated_sequence"
RATING_TOKEN_PREFIX = "<rating_"


def is_dense_rating(t: Template) -> bool:
    return RATED_FIELD in t.fields


def rating_grid(lo: float, hi: float) -> list[float]:
    """The rating values a model writes on the scale [lo, hi]: steps of 0.1 (``format_rating``)."""
    return [round(lo + i / 10, 1) for i in range(int(round((hi - lo) * 10)) + 1)]


def rating_token(value: float, lo: float, hi: float) -> str:
    """The one token of a rating in the dense style: the value clipped to the scale, to one decimal."""
    return f"{RATING_TOKEN_PREFIX}{min(max(round(float(value), 1), lo), hi):.1f}>"


def rating_tokens(lo: float, hi: float) -> list[str]:
    return [rating_token(v, lo, hi) for v in rating_grid(lo, hi)]


def is_rated(r) -> bool:
    """A rating that is a number (not missing: None or NaN)."""
    return r is not None and r == r


def rated_positions(ratings, end: int) -> list[int]:
    """Positions before ``end`` whose rating is a number: an unrated item has no (item, rating) pair."""
    return [k for k in range(end) if is_rated(ratings[k])]


def rated_sequence(items: list[str], ratings: list[float], lo: float, hi: float) -> str:
    """(item, rating) pairs as the dense rating style's target text."""
    return " ".join(f"{i} {rating_token(r, lo, hi)}" for i, r in zip(items, ratings))


def rating_template(templates: dict, dense: bool, held_out: bool = False) -> Template | None:
    """The first rating template of the given style with the fields serving and evaluation fill."""
    fields = {RATED_FIELD} if dense else {"user", "item", "item_desc", "rating"}
    return next((t for t in templates["rating"] if t.held_out == held_out and t.fields <= fields
                 and is_dense_rating(t) == dense), None)


def rating_input(template: Template, items: list[str], ratings: list[float], item: str, max_pairs: int,
                 lo: float, hi: float) -> tuple[str, list[str]]:
    """The one way evaluation and serving render a dense rating request: (encoder source, decoder prefix:
    the last ``max_pairs - 1`` (item, rating token) pairs of the history, then the item asked about)."""
    keep = max(0, max_pairs - 1)
    items, ratings = (list(items)[-keep:], list(ratings)[-keep:]) if keep else ([], [])
    prefix = [t for i, r in zip(items, ratings) for t in (i, rating_token(r, lo, hi))]
    return template.source, prefix + [item]
