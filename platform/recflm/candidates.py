"""``recflm candidates``: train the bundle's candidate model, the two-tower of ``baselines.TwoTower``.

The two-tower answers any history (a known user's or a new one's) with cosine scores over the whole catalog
in one matrix product, no generation: the fast first stage ``POST /v1/candidates`` serves beside the
generative model. It is trained on the training split of the bundle's dataset (the one its manifest names,
or ``--data``, which must index the catalog alike), with the item attributes the dataset has (MovieLens
genres, an item table's attrs), stops early on validation NDCG@10 and is written into the bundle::

    candidates.safetensors   the weights and the items' attribute ids
    candidates.json          sizes, settings, the catalog's item keys in index order, the training record

Serving loads it without retraining; a bundle without it answers /v1/candidates with 404
``no_candidate_model``.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .config import flags_into, load_config, to_dict


@dataclass
class CandidatesConfig:
    bundle: str = "runs/model"
    data: str = ""  # prepared dataset (default: the one the bundle was trained on)
    dim: int = 64
    max_len: int = 50  # history items the user tower reads (the latest)
    temperature: float = 0.1
    epochs: int = 50  # most epochs; it stops early on validation NDCG@10 ...
    patience: int = 5  # ... after this many epochs without improvement, keeping the best epoch,
    minutes: float = 5  # ... or after this many minutes (0: no limit)
    batch: int = 64
    negatives: int = 1024  # uniformly sampled negatives per batch (beside the in-batch ones)
    lr: float = 2e-3
    seed: int = 2022


def run(cfg: CandidatesConfig, log=print) -> Path:
    """Train the two-tower on the bundle's training data and write it into the bundle; returns the bundle."""
    import pandas as pd

    from .baselines import TwoTower, attribute_ids
    from .bundle import BundleError, check_catalog
    from .dataset import PreparedData

    b = Path(cfg.bundle)
    if not (b / "manifest.json").is_file() or not (b / "items.parquet").is_file():
        raise BundleError(f"{b}: not a recflm bundle (no manifest.json / items.parquet)")
    manifest = json.loads((b / "manifest.json").read_text())
    data_dir = cfg.data or manifest.get("data", {}).get("path") or ""
    if not data_dir:
        raise BundleError(f"{b}: its manifest names no dataset: give --data")
    data = PreparedData.open(data_dir)
    catalog = pd.read_parquet(b / "items.parquet").sort_values("index").reset_index(drop=True)
    check_catalog(catalog, data_dir)  # the histories are item indices: they must mean the bundle's items
    seqs = data.sequences_pandas(columns=["user", "index", "n_train"])
    # users held out of training (prepare --holdout-users) stay new users for this model too
    seqs = seqs[~seqs["user"].isin(data.holdout_users)].reset_index(drop=True)
    train = [[int(i) for i in ix[:int(n)]] for ix, n in zip(seqs["index"], seqs["n_train"])]
    has_valid = [len(ix) > int(n) for ix, n in zip(seqs["index"], seqs["n_train"])]
    valid = ([t for t, v in zip(train, has_valid) if v],
             [int(ix[int(n)]) for ix, n, v in zip(seqs["index"], seqs["n_train"], has_valid) if v])
    attrs, vocab = attribute_ids(data.catalog)  # the dataset's catalog: the same items, with their attributes
    log(f"candidates: {len(train)} users, {len(catalog)} items, {len(vocab)} attribute values, "
        f"{sum(max(0, len(t) - 1) for t in train)} training examples")
    model = TwoTower(len(catalog), cfg.dim, cfg.temperature, cfg.max_len, attrs)
    model.fit(train, seed=cfg.seed, epochs=cfg.epochs, batch=cfg.batch, negatives=cfg.negatives, lr=cfg.lr,
              valid=valid if valid[0] else None, patience=cfg.patience, max_minutes=cfg.minutes or None, log=log)
    tmp = b / ".candidates.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save(tmp, extra={"items": [str(k) for k in catalog["item"]], "attributes": vocab, "data": str(data_dir),
                           "trained_unix": int(time.time()), "train_seconds": round(model.train_seconds, 1),
                           "config": to_dict(cfg)})
    for name in (TwoTower.WEIGHTS, TwoTower.CONFIG):  # the weights first: a reader keys on the config
        (tmp / name).replace(b / name)
    tmp.rmdir()
    best = f", valid NDCG@10 {model.best_val_ndcg10:.4f} at epoch {model.best_epoch}" \
        if model.best_val_ndcg10 is not None else ""
    log(f"candidates: trained {model.epochs_run} epoch(s) in {model.train_seconds:.0f} s{best}; written to "
        f"{b / TwoTower.WEIGHTS} and {b / TwoTower.CONFIG}")
    return b


# ----------------------------------------------------------------------------- the CLI stage (recflm candidates)
HELP = "train the bundle's two-tower candidate model (served as POST /v1/candidates)"


def add_arguments(p, name: str) -> None:
    p.description = HELP + ". Writes candidates.safetensors and candidates.json into the bundle."
    p.add_argument("--bundle", help="the model bundle (config key: bundle)")
    p.add_argument("--data", help="prepared dataset directory (default: the one the bundle was trained on)")
    p.add_argument("--minutes", type=float, help="training time limit in minutes (0: none; config key: minutes)")


def command(args) -> int:
    cfg = flags_into(load_config(CandidatesConfig, args.config, args.overrides), args, ("bundle", "data", "minutes"))
    run(cfg)
    return 0
