"""Item features (TrainConfig.item_features): an item token's embedding is its own vector plus the mean of its
attribute values' embeddings, in the inputs of both stacks and in the output layer alike (no Ray)."""
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from recflm.config import ConfigError
from recflm.generate import CatalogTrie, ConstrainedBeamSearch
from recflm.model import RecT5, adapt_embeddings, build_model
from recflm.tokenizer import train_tokenizer
from recflm.train import TrainConfig, _item_feature_table

torch.set_num_threads(1)
IDS = [f"i{i}" for i in range(30)]
ATTRS = {"i1": [1, 2], "i2": [2], "i3": [3, 1, 4]}  # the other items have none


@pytest.fixture(scope="module")
def setup():
    tok = train_tokenizer([f"Predict the items user_{u} will interact with: i{u % 30} i{(3 * u) % 30}"
                           for u in range(60)], vocab_size=300, item_tokens=IDS)
    torch.manual_seed(0)
    model = build_model("seq", tok.vocab_size, tok.pad_id, tok.eos_id, dropout_rate=0.0,
                        item_feature_attrs=4, item_feature_slots=3).eval()
    tokens = tok.item_token_ids(list(ATTRS))
    model.set_item_features(tokens, list(ATTRS.values()))
    return tok, model, dict(zip(ATTRS, tokens))


def feature(model, attrs):
    return model.item_feature_embed.weight[attrs].mean(0)


def test_features_enter_the_inputs_and_the_output_layer(setup):
    tok, model, tokens = setup
    W, s = model.shared.weight, model.config.input_scale
    t1, t3, plain = tokens["i1"], tokens["i3"], tok.item_token_ids(["i9"])[0]
    x = torch.tensor([[t1, t3, plain]])
    want = torch.stack([W[t1] + feature(model, [1, 2]), W[t3] + feature(model, [3, 1, 4]), W[plain]]) * s
    for emb in (model.encoder.embed_tokens, model.decoder.embed_tokens):
        assert torch.allclose(emb(x)[0], want, atol=1e-6)
    assert model.item_feature_embed.weight[0].abs().sum() == 0 and feature(model, [1]).abs().sum() > 0
    h = torch.randn(2, model.config.d_model)
    full = W.detach().clone()
    for item, attrs in ATTRS.items():
        full[tokens[item]] += feature(model, attrs).detach()
    assert torch.allclose(model.lm_head(h), h @ full.T, atol=1e-5)
    # two items sharing attribute values share part of their scores
    assert not torch.allclose(model.lm_head(h)[:, t1], (h @ W.T)[:, t1])


def test_every_scoring_path_agrees_and_a_reload_keeps_the_features(setup, tmp_path):
    tok, model, tokens = setup
    enc = tok.encode_batch(["user_1 items", "user_2 items"])
    prefixes = [tok.item_token_ids(["i1", "i3"]), tok.item_token_ids(["i2"])]
    ours = model.next_token_logprobs(enc["input_ids"], enc["attention_mask"], prefixes, enc["whole_word_ids"])
    for r, p in enumerate(prefixes):
        one = {k: v[r:r + 1] for k, v in enc.items()}
        ref = model(**one, decoder_input_ids=torch.tensor([[tok.pad_id] + p])).logits[0, -1]
        assert torch.allclose(ours[r], torch.log_softmax(ref, -1), atol=1e-4)
    search = ConstrainedBeamSearch(model, CatalogTrie.from_catalog(tok, IDS))
    assert torch.allclose(search.item_scores(enc, prefixes), ours[:, search.item_tokens], atol=1e-4)
    # the incremental beam decoder (the prompt style's constrained search) reads the same embeddings
    from recflm.generate import _BeamDecoder

    dec = _BeamDecoder(model)
    with torch.no_grad():
        dec.start(model.encode(enc["input_ids"], enc["attention_mask"], enc["whole_word_ids"]).last_hidden_state,
                  enc["attention_mask"])
        first = dec.step(torch.full((2,), tok.pad_id))
        ref = model(**enc, decoder_input_ids=torch.full((2, 1), tok.pad_id)).logits[:, 0]
    assert torch.allclose(first, torch.log_softmax(ref, -1), atol=1e-4)
    model.save_pretrained(tmp_path / "m")
    again = RecT5.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(again.item_feature_index, model.item_feature_index)
    assert torch.allclose(again.next_token_logprobs(enc["input_ids"], enc["attention_mask"], prefixes,
                                                    enc["whole_word_ids"]), ours, atol=1e-5)


def test_the_loss_trains_the_attribute_embeddings(setup):
    tok, model, tokens = setup
    enc = tok.encode_batch(["user_1 items"])
    labels = torch.tensor([[tokens["i1"], tokens["i2"]]])
    model.zero_grad()
    loss, _ = model(**enc, labels=labels, token_losses=True)
    loss.sum().backward()
    g = model.item_feature_embed.weight.grad
    assert g[1:3].abs().sum() > 0 and g[0].abs().sum() == 0
    model.zero_grad()


def test_a_grown_catalog_keeps_old_features_and_fresh_tokens_have_none(setup):
    tok, _, tokens = setup
    torch.manual_seed(0)
    model = build_model("tiny", tok.vocab_size, item_feature_attrs=4, item_feature_slots=3)
    model.set_item_features(list(tokens.values()), list(ATTRS.values()))
    adapt_embeddings(model, tok.vocab_size + 5, fresh=[tokens["i2"]])
    assert model.item_feature_index.shape == (tok.vocab_size + 5, 3)
    assert model.item_feature_index[tokens["i3"]].tolist() == [3, 1, 4]
    assert model.item_feature_index[tokens["i2"]].sum() == 0 and model.item_feature_index[-5:].sum() == 0
    assert model.shared(torch.tensor([tok.vocab_size + 2])).shape == (1, model.config.d_model)


def test_the_feature_table_from_a_catalog_and_its_errors(tmp_path):
    tok = train_tokenizer(["a b c"] * 5, vocab_size=100, item_tokens=["1", "2", "3"])
    tok.save(tmp_path / "tok.json")
    catalog = pd.DataFrame({"id_text": ["1", "2", "3"], "attributes": [["red", "toy"], [], ["toy"]]})
    data = SimpleNamespace(catalog=catalog, id_texts=["1", "2", "3"])
    cfg = TrainConfig(item_features=True, item_token_mode="token", data="runs/d")
    table = _item_feature_table(cfg, data, tmp_path / "tok.json")
    assert table["n_attrs"] == 2 and table["slots"] == 2 and table["attrs"] == [[1, 2], [], [2]]
    assert table["tokens"] == tok.item_token_ids(["1", "2", "3"])
    assert _item_feature_table(TrainConfig(item_features=False), data, tmp_path / "tok.json") == {}
    bare = SimpleNamespace(catalog=catalog.assign(attributes=[[], [], []]), id_texts=["1", "2", "3"])
    with pytest.raises(ConfigError, match="has no item attributes"):
        _item_feature_table(cfg, bare, tmp_path / "tok.json")
    assert table["values"] == ["red", "toy"]
    # a fine-tune: the bundle's values name the data's attributes (a new value is dropped, a new item that has
    # known values borrows their vectors); another domain's items get none
    import json

    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "config.json").write_text(json.dumps({"item_feature_values": ["toy", "red"],
                                                                 "item_feature_slots": 2}))
    grown = SimpleNamespace(catalog=catalog.assign(attributes=[["red", "toy"], ["new", "toy"], ["toy"]]),
                            id_texts=["1", "2", "3"])
    ft = TrainConfig(init_bundle=str(tmp_path / "bundle"), item_token_mode="token")
    again = _item_feature_table(ft, grown, tmp_path / "tok.json", "extends")
    assert again["attrs"] == [[2, 1], [1], [1]] and again["n_attrs"] == 2 and again["slots"] == 2
    assert _item_feature_table(ft, grown, tmp_path / "tok.json", "other") == {}
    with pytest.raises(ConfigError, match="one token per item"):
        _item_feature_table(TrainConfig(item_features=True, item_token_mode="pieces"), data, tmp_path / "tok.json")


def test_the_output_layer_features_follow_every_change_of_the_weights_without_gradients(setup):
    tok, _, tokens = setup
    torch.manual_seed(0)
    model = build_model("tiny", tok.vocab_size, item_feature_attrs=4, item_feature_slots=3).eval()
    model.set_item_features(list(tokens.values()), list(ATTRS.values()))
    t1 = tokens["i1"]
    with torch.no_grad():
        first = model._all_features()
        assert model._all_features() is first  # computed once per state of the weights
        assert torch.allclose(first[t1], feature(model, [1, 2]))
        model.item_feature_embed.weight[1] += 1.0  # as an optimizer step does, in place
        assert torch.allclose(model._all_features()[t1], feature(model, [1, 2]))
        model.set_item_features([t1], [[3]])
        assert torch.allclose(model._all_features()[t1], feature(model, [3]))
        assert model._all_features()[tokens["i3"]].abs().sum() == 0
    with torch.enable_grad():
        assert model._all_features().requires_grad  # training never reads the cache


def test_the_slot_cap_reserves_no_values_it_drops(tmp_path):
    from recflm import train

    tok = train_tokenizer(["a b c"] * 5, vocab_size=100, item_tokens=["1", "2"])
    tok.save(tmp_path / "tok.json")
    many = [f"v{i}" for i in range(train.ITEM_FEATURE_SLOTS + 3)]
    data = SimpleNamespace(catalog=pd.DataFrame({"id_text": ["1", "2"], "attributes": [many, ["v0"]]}),
                           id_texts=["1", "2"])
    table = _item_feature_table(TrainConfig(item_features=True, item_token_mode="token", data="runs/d"), data,
                                tmp_path / "tok.json")
    assert table["n_attrs"] == train.ITEM_FEATURE_SLOTS == table["slots"] == len(table["values"])
    assert table["attrs"][1] == [1]
