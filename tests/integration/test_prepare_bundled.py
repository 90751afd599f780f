"""recflm prepare on the bundled MovieLens data: accounting, splits, leak-freedom, examples."""
import re
from pathlib import Path

import pandas as pd
import pytest

from recflm.augment import example_dataset
from recflm.dataset import PreparedData
from recflm.readers import BUNDLED

pytestmark = pytest.mark.integration


def _csv_rows(path: Path) -> int:
    return len(pd.read_csv(path))


def test_every_input_row_is_kept_or_rejected(bundled_dataset):
    out, _, stats = bundled_dataset
    data = PreparedData.open(out)
    # independent count of the input: the bundled files read with pandas
    n_input = _csv_rows(BUNDLED / "ratings.csv") + _csv_rows(BUNDLED / "tags.csv")
    assert stats["input_rows"] == n_input
    assert stats["kept"] + stats["rejected"] == n_input
    rejects = data.rejects_pandas()
    assert len(rejects) == stats["rejected"]
    assert rejects["reason"].value_counts().to_dict() == stats["rejected_by_reason"]
    inter = data.interactions_pandas()
    assert len(inter) == stats["kept_interactions"]
    # tags are kept as the text of their interaction: kept = interactions + merged tag rows
    assert stats["kept"] == len(inter) + stats["kept_tags_as_text"]
    per_file = stats["per_file"]
    assert per_file[str(BUNDLED / "ratings.csv")]["input_rows"] == _csv_rows(BUNDLED / "ratings.csv")


def test_kcore_holds_and_text_is_clean(bundled_dataset):
    out, cfg, _ = bundled_dataset
    inter = PreparedData.open(out).interactions_pandas()
    assert inter.groupby("user").size().min() >= cfg.k_core
    assert inter.groupby("item").size().min() >= cfg.k_core
    assert not inter.duplicated(["user", "item"]).any()
    text = inter["text"].dropna()
    assert len(text) > 0 and (text.str.len() > 0).all()
    assert not text.str.contains(r"\s{2,}|^\s|\s$", regex=True).any()
    assert inter["rating"].between(cfg.rating_min, cfg.rating_max).all()
    assert inter["user"].str.startswith("ml:").all() and inter["item"].str.startswith("ml:").all()


def test_leave_one_out_split_in_time_order(bundled_dataset):
    out, _, stats = bundled_dataset
    data = PreparedData.open(out)
    inter = data.interactions_pandas()
    seqs = data.sequences_pandas()
    assert seqs["user"].is_unique and len(seqs) == stats["users"]
    for _, g in inter.groupby("user"):
        g = g.sort_values("pos")
        assert g["ts"].is_monotonic_increasing
        assert list(g["split"].iloc[-2:]) == ["valid", "test"]
        assert (g["split"].iloc[:-2] == "train").all()
    s = seqs.iloc[0]
    assert s["n_train"] == len(s["items"]) - 2
    catalog = data.catalog
    assert catalog["id_text"].is_unique and len(catalog) == stats["items"]
    assert list(catalog["index"]) == list(range(len(catalog)))


def _max_plus_k_hr5(histories: list[list[int]], targets: list[int]) -> float:
    hits = 0
    for hist, target in zip(histories, targets):
        seen, top, preds, k = set(hist), max(hist), [], 1
        while len(preds) < 5:
            if top + k not in seen:
                preds.append(top + k)
            k += 1
        hits += target in preds
    return hits / len(targets)


def test_no_id_leak_max_history_plus_k(bundled_dataset):
    """The "predict max(history ID)+k" rule must be useless on our default IDs (notes §4.2)."""
    out, _, _ = bundled_dataset
    seqs = PreparedData.open(out).sequences_pandas()
    hist, target = [], []
    for ids, n_train in zip(seqs["ids"], seqs["n_train"]):
        ids = [int(x) for x in ids]
        hist.append(ids[: n_train + 1])
        target.append(ids[n_train + 1])
    ours = _max_plus_k_hr5(hist, target)
    assert ours < 0.01
    # the same rule on P5's numbering (first appearance along full histories, test items included)
    # scores far higher: this shows the check can fail
    order = {}
    for items in seqs.sample(frac=1.0, random_state=0)["items"]:
        for it in items:
            order.setdefault(it, len(order) + 1)
    hist_p5, target_p5 = [], []
    for items, n_train in zip(seqs["items"], seqs["n_train"]):
        nums = [order[i] for i in items]
        hist_p5.append(nums[: n_train + 1])
        target_p5.append(nums[n_train + 1])
    assert _max_plus_k_hr5(hist_p5, target_p5) > 5 * max(ours, 0.004)


def test_no_heldout_pair_in_training_examples(bundled_dataset):
    out, cfg, _ = bundled_dataset
    data = PreparedData.open(out)
    seqs = data.sequences_pandas()
    held_items = {}  # user -> held-out item keys; user -> held-out ID texts
    held_ids = {}
    for user, items, ids, n_train in zip(seqs["user"], seqs["items"], seqs["ids"], seqs["n_train"]):
        held_items[user] = set(items[n_train:])
        held_ids[user] = set(ids[n_train:])
    n = 0
    for epoch in (0, 1):
        ex = example_dataset(out, cfg, split="train", epoch=epoch).to_pandas()
        assert set(ex["family"]) == {"rating", "sequential", "direct", "explanation"}
        for user, item, fam, source, target in ex[["user", "item", "family", "source", "target"]].itertuples(
                index=False):
            assert item not in held_items[user], (fam, source)
            if fam in ("sequential", "direct"):
                text = re.sub(r"(?i)user_\S+", " ", source) + " " + target
                numbers = set(re.findall(r"(?<![\d.])\d+(?![\d.])", text))
                assert not numbers & held_ids[user], (fam, source, target)
            n += 1
    assert n > 10_000


def test_examples_are_seeded_and_redrawn_each_epoch(bundled_dataset):
    out, cfg, _ = bundled_dataset
    a = example_dataset(out, cfg, split="train", epoch=0, families=["sequential"]).to_pandas()
    b = example_dataset(out, cfg, split="train", epoch=0, families=["sequential"]).to_pandas()
    c = example_dataset(out, cfg, split="train", epoch=1, families=["sequential"]).to_pandas()
    key = ["user", "source", "target"]
    pd.testing.assert_frame_equal(a.sort_values(key)[key].reset_index(drop=True),
                                  b.sort_values(key)[key].reset_index(drop=True))
    assert set(map(tuple, a[key].to_numpy())) != set(map(tuple, c[key].to_numpy()))
    assert a["template"].str.startswith("sequential-").all()
    assert not (a["template"] == "sequential-6").any()  # held out from training


def test_the_training_mix_thins_families_inside_the_tasks(bundled_dataset):
    """``keep`` (the balanced mix) drops rating rows before their text is built: a seeded subset of the
    full epoch's examples, about the asked share, the other families untouched."""
    from recflm.augment import interaction_examples, sequence_examples
    from recflm.dataset import INTERACTIONS, SEQUENCES

    out, cfg, _ = bundled_dataset
    kw = dict(data_dir=str(out), templates_dir=cfg.prompts.templates_dir, split="train", epoch=0, seed=cfg.seed,
              prompts=cfg.prompts, aug=cfg.augment, held_out=False)
    inter = pd.read_parquet(Path(out) / INTERACTIONS).head(20000)
    full = interaction_examples(inter, families=["rating"], **kw)
    thin = interaction_examples(inter, families=["rating"], keep={"rating": 0.1}, **kw)
    again = interaction_examples(inter.sample(frac=1, random_state=0), families=["rating"], keep={"rating": 0.1},
                                 **kw)
    key = ["family", "user", "source", "target"]
    rows = lambda df: set(map(tuple, df[key].to_numpy()))  # noqa: E731
    assert len(full) > 10000 and 0.08 * len(full) < len(thin) < 0.12 * len(full)
    assert rows(thin) <= rows(full) and rows(thin) == rows(again)  # the same draw, whatever the batch order
    users = pd.read_parquet(Path(out) / SEQUENCES).head(100)
    seq = [sequence_examples(users, families=["direct", "sequential"], keep=k, **kw)
           for k in ({}, {"rating": 0.1}, {"direct": 0.5})]
    assert rows(seq[0]) == rows(seq[1])  # per-user families kept whole when only rating is thinned
    half = seq[2][seq[2]["family"] == "direct"]
    assert rows(half) < rows(seq[0]) and 0.3 * (seq[0]["family"] == "direct").sum() < len(half)


def test_eval_examples_use_the_heldout_item(bundled_dataset):
    out, cfg, _ = bundled_dataset
    data = PreparedData.open(out)
    seqs = data.sequences_pandas().set_index("user")
    ex = example_dataset(out, cfg, split="test", families=["sequential", "direct"], held_out=None).to_pandas()
    seq = ex[ex["family"] == "sequential"]
    assert len(seq) == len(seqs)
    for user, item, target in seq[["user", "item", "target"]].head(50).itertuples(index=False):
        s = seqs.loc[user]
        assert item == s["items"][-1] and target == s["ids"][-1]
    direct = ex[ex["family"] == "direct"]
    cands = direct["source"].str.extract(r"candidates(?: to recommend for \S+)?: (.*)$")[0].dropna()
    assert len(cands) > 0
    sizes = cands.str.split(", ").map(len)
    assert (sizes == 100).all()
    # the fixed negatives are the same on every call (seeded per user)
    again = example_dataset(out, cfg, split="test", families=["direct"], held_out=None).to_pandas()
    a = direct.set_index("user")["source"].str.extract(r"((?:\d+, ){99}\d+)")[0].str.split(", ").map(sorted)
    b = again.set_index("user")["source"].str.extract(r"((?:\d+, ){99}\d+)")[0].str.split(", ").map(sorted)
    assert a.sort_index().tolist() == b.sort_index().tolist()
