"""A bundle fine-tuned on a catalog it was not trained on: how the catalogs relate, which tokens are added and
start fresh, and the model's embeddings grown in place (no Ray)."""
import pandas as pd
import pytest
import torch

from recflm.bundle import BundleError, catalog_relation, check_catalog_mode
from recflm.model import adapt_embeddings, build_model
from recflm.tokenizer import train_tokenizer
from recflm.train import _fit_catalog


def catalog(items, ids=None):
    return pd.DataFrame({"item": items, "index": range(len(items)), "id_text": ids or [str(i + 1) for i in range(len(items))]})


def data_dir(tmp_path, name, cat):
    d = tmp_path / name
    d.mkdir()
    cat.to_parquet(d / "items.parquet")
    return d


def test_catalog_relations_and_what_each_mode_allows(tmp_path):
    ours = catalog(["a", "b", "c"])
    same = data_dir(tmp_path, "same", catalog(["a", "b", "c"]))
    ext = data_dir(tmp_path, "ext", catalog(["a", "b", "c", "d"]))
    other = data_dir(tmp_path, "other", catalog(["x", "y", "z", "w"]))
    moved = data_dir(tmp_path, "moved", catalog(["b", "a", "c", "d"]))  # the same items, indexed otherwise
    assert [catalog_relation(ours, d) for d in (same, ext, other, moved)] == ["same", "extends", "other", "other"]
    assert check_catalog_mode(ours, same, "keep") == "same"
    with pytest.raises(BundleError, match="catalog=extend"):
        check_catalog_mode(ours, ext, "keep")
    with pytest.raises(BundleError, match="another catalog"):
        check_catalog_mode(ours, other, "keep")
    assert check_catalog_mode(ours, ext, "extend") == "extends"
    with pytest.raises(BundleError, match="does not extend"):
        check_catalog_mode(ours, moved, "extend")
    assert check_catalog_mode(ours, other, "replace") == "other"
    with pytest.raises(BundleError, match="expected one of"):
        check_catalog_mode(ours, same, "merge")


def test_new_item_tokens_and_the_ones_that_start_fresh():
    old = catalog(["a", "b", "c"], ["101", "102", "103"])
    tok = train_tokenizer(["predict the items"] * 5, vocab_size=50, item_tokens=["101", "102", "103"])
    n = tok.vocab_size
    fresh = _fit_catalog(tok, old, ["101", "102", "103", "104", "105"], "extends", log=lambda *a: None)
    assert tok.vocab_size == n + 2 and tok.item_token_ids(["104", "105"]) == fresh  # only the new items start fresh
    old_ids, new_ids = (tok.hf.encode(t, add_special_tokens=False).ids for t in ("101 102", "101 105"))
    assert new_ids[:-1] == old_ids[:-1] and new_ids[-1] == fresh[1]  # a new item reads as an old one does
    tok2 = train_tokenizer(["predict the items"] * 5, vocab_size=50, item_tokens=["101", "102", "103"])
    fresh = _fit_catalog(tok2, old, ["101", "102", "103", "104"], "other", log=lambda *a: None)
    assert tok2.item_token_ids(["101", "102", "103", "104"]) == fresh  # another domain: every item is new
    pieces = train_tokenizer(["item 1 2 3 12 23"] * 5, vocab_size=50)  # sub-word IDs: nothing to add
    assert _fit_catalog(pieces, old, ["1", "2", "45"], "other", log=lambda *a: None) == []


def test_embeddings_grow_in_place_keeping_the_old_rows_and_the_scale_hook():
    torch.manual_seed(0)
    model = build_model("seq", 40, 0, 1)
    old = model.shared.weight.detach().clone()
    emb = model.shared
    ids = torch.tensor([[3, 5, 41]])
    adapt_embeddings(model, 45, fresh=[5], seed=1)
    w = model.shared.weight.detach()
    assert model.shared is emb and w.shape == (45, old.shape[1]) and model.config.vocab_size == 45
    assert torch.equal(w[:5], old[:5]) and not torch.equal(w[5], old[5])  # row 5 starts fresh, the rest kept
    assert model.lm_head.weight is model.shared.weight and model.encoder.embed_tokens.weight is model.shared.weight
    assert 0.2 < float(w[40:].std() / old.std()) < 5  # new rows with the spread of the old ones
    scale = float(getattr(model.config, "input_scale", 1.0))
    assert torch.allclose(model.shared(ids), w[ids] * scale)  # the input-scale hook survived
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([[41, 1]]))
    assert out.logits.shape[-1] == 45 and torch.isfinite(out.loss)
