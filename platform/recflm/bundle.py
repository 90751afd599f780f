"""Model bundles: everything evaluation and serving need, and nothing they must guess.

    config.json, model.safetensors   the model (Hugging Face layout, safetensors only: no pickle)
    tokenizer.json                   the tokenizer
    items.parquet                    the item catalog (item, index, id_text, title, ...)
    templates/                       the prompt templates the model was trained with
    manifest.json                    data fingerprint, training config, metrics, versions

Loading never unpickles anything: weights come from safetensors only, the rest is JSON, YAML and
Parquet.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .model import RecT5, count_parameters
from .prompts import TEMPLATES_DIR
from .tokenizer import RecTokenizer

REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "items.parquet", "manifest.json")


class BundleError(ValueError):
    pass


@dataclass
class Bundle:
    path: Path
    model: RecT5
    tokenizer: RecTokenizer
    catalog: pd.DataFrame
    manifest: dict = field(default_factory=dict)

    @property
    def templates_dir(self) -> Path:
        return self.path / "templates"


def save_bundle(out: str | Path, model: RecT5, tokenizer: RecTokenizer, catalog: pd.DataFrame,
                manifest: dict, templates_dir: str | Path | None = None) -> Path:
    import torch
    import transformers

    from . import __version__

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save(tmp / "tokenizer.json")
    catalog.to_parquet(tmp / "items.parquet", index=False)
    shutil.copytree(Path(templates_dir) if templates_dir else TEMPLATES_DIR, tmp / "templates")
    info = {**manifest, "kind": "recflm-bundle", "format_version": 1, "parameters": count_parameters(model),
            "versions": {"recflm": __version__, "torch": torch.__version__,
                         "transformers": transformers.__version__}}
    (tmp / "manifest.json").write_text(json.dumps(info, indent=2, default=str))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)  # a reader never sees a half-written bundle
    return out


def check_catalog(catalog: pd.DataFrame, data_dir: str | Path) -> None:
    """Raise ``BundleError`` unless the prepared dataset at ``data_dir`` indexes its items as the
    bundle's catalog does: its histories are item indices, which mean nothing against another catalog."""
    items = Path(data_dir) / "items.parquet"
    if not items.is_file():
        raise BundleError(f"{data_dir}: not a prepared dataset (no items.parquet)")
    theirs = pd.read_parquet(items, columns=["item", "index"]).sort_values("index")
    ours = catalog[["item", "index"]].sort_values("index")
    if len(theirs) != len(ours) or not (theirs["item"].astype(str).to_numpy() == ours["item"].astype(str).to_numpy()).all():
        diff = len(set(theirs["item"].astype(str)) ^ set(ours["item"].astype(str)))
        raise BundleError(f"{data_dir}: its catalog ({len(theirs)} items) is not the bundle's ({len(ours)} items, "
                          f"{diff} differ or are indexed differently): use the dataset the bundle was trained on")


CATALOG_MODES = ("keep", "extend", "replace")


def catalog_relation(catalog: pd.DataFrame, data_dir: str | Path) -> str:
    """How a prepared dataset's catalog relates to a bundle's: ``same`` (the same items, indexed alike),
    ``extends`` (the bundle's items with their indices and ID texts, then new ones after them, as ``prepare
    --update`` writes) or ``other``."""
    items = Path(data_dir) / "items.parquet"
    if not items.is_file():
        raise BundleError(f"{data_dir}: not a prepared dataset (no items.parquet)")
    theirs = pd.read_parquet(items, columns=["item", "index", "id_text"]).sort_values("index").reset_index(drop=True)
    ours = catalog[["item", "index", "id_text"]].sort_values("index").reset_index(drop=True)
    head = theirs.iloc[:len(ours)]
    if len(theirs) >= len(ours) and all((head[c].astype(str).to_numpy() == ours[c].astype(str).to_numpy()).all()
                                        for c in ("item", "index", "id_text")):
        return "same" if len(theirs) == len(ours) else "extends"
    return "other"


def check_catalog_mode(catalog: pd.DataFrame, data_dir: str | Path, mode: str) -> str:
    """A fine-tune of a bundle on ``data_dir``: the relation of the catalogs (``catalog_relation``), or
    ``BundleError`` where ``mode`` does not allow it. ``keep``: the same catalog; ``extend``: the same or one
    that extends it; ``replace``: any (another domain: every item of the data is new to the model)."""
    if mode not in CATALOG_MODES:
        raise BundleError(f"catalog={mode!r}: expected one of {', '.join(CATALOG_MODES)}")
    rel = catalog_relation(catalog, data_dir)
    if mode == "keep" and rel != "same":
        what = ("holds the bundle's items and new ones after them" if rel == "extends"
                else "is another catalog (other items, or the same ones indexed otherwise)")
        raise BundleError(f"{data_dir}: its catalog {what}, and the bundle's item IDs would name other items: "
                          f"set catalog=extend (new items get new tokens) or catalog=replace (another domain: "
                          f"every item is new to the model)")
    if mode == "extend" and rel == "other":
        raise BundleError(f"{data_dir}: its catalog does not extend the bundle's (its first items are not the "
                          f"bundle's, with their IDs): catalog=extend needs a dataset from `recflm prepare --update`; "
                          f"catalog=replace trains another domain's items from fresh vectors")
    return rel


def load_bundle(path: str | Path, device: str = "cpu") -> Bundle:
    p = Path(path)
    if not p.is_dir():
        raise BundleError(f"{p}: bundle directory not found")
    missing = [n for n in REQUIRED if not (p / n).is_file()]
    if missing:
        pickles = sorted(x.name for x in p.glob("*.bin")) + sorted(x.name for x in p.glob("*.pt"))
        hint = f" (found {', '.join(pickles)}: pickled weights are never loaded)" if pickles else ""
        raise BundleError(f"{p}: not a recflm bundle, missing {', '.join(missing)}{hint}")
    try:
        manifest = json.loads((p / "manifest.json").read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{p / 'manifest.json'}: not valid JSON: {e}") from None
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        model = RecT5.from_pretrained(p, use_safetensors=True).to(device).eval()
    except Exception as e:  # transformers / safetensors raise several kinds for a corrupt file
        raise BundleError(f"{p}: cannot load the model weights: {e}") from None
    return Bundle(p, model, RecTokenizer.load(p / "tokenizer.json"), pd.read_parquet(p / "items.parquet"), manifest)
