"""The dense sequential style: every position of a user's history supervised in one decoder pass,
the history as the decoder prefix at inference, and one token per item for an exact catalog ranking."""
import numpy as np
import pandas as pd
import pytest
import torch

from recflm.config import AugmentConfig, PromptConfig
from recflm.generate import CatalogTrie, ConstrainedBeamSearch
from recflm.model import build_model
from recflm.prompts import is_dense, load_templates, sequential_input, sequential_template
from recflm.tokenizer import train_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    ids = [f"i{i}" for i in range(60)]
    texts = [f"Predict the items user_{u} will interact with: {' '.join(rng.choice(ids, 6))}" for u in range(80)]
    tok = train_tokenizer(texts, vocab_size=300, item_tokens=ids)
    torch.manual_seed(0)
    model = build_model("tiny", tok.vocab_size, tok.pad_id, tok.eos_id, dropout_rate=0.0).eval()
    with torch.no_grad():
        model.shared.weight.mul_(10)
    return tok, model, CatalogTrie.from_catalog(tok, ids), ids


def test_token_losses_equal_the_full_forward(setup):
    tok, model, _, ids = setup
    enc = tok.encode_batch(["user_1 items", "user_22 other items please"])
    labels = torch.tensor([[tok.item_token_ids(["i3"])[0], tok.item_token_ids(["i7"])[0], -100],
                           tok.item_token_ids(["i1", "i2", "i9"])])
    loss, row = model(**enc, labels=labels, token_losses=True)
    assert row.tolist() == [0, 0, 1, 1, 1]
    ref = model(**enc, labels=labels).loss  # Hugging Face: mean over the supervised tokens
    assert torch.allclose(loss.mean(), ref, atol=1e-5)


def test_repeated_sources_are_encoded_once_with_the_same_losses(setup):
    """Dense examples share a few constant prompts: the encoder runs once per distinct source row, and
    the per-token losses are those of encoding every row."""
    tok, model, _, ids = setup
    enc = tok.encode_batch(["same prompt", "another prompt here", "same prompt", "same prompt"])
    labels = torch.tensor([tok.item_token_ids(["i3", "i5"]), tok.item_token_ids(["i1", "i2"]),
                           tok.item_token_ids(["i9", "i4"]), [tok.item_token_ids(["i8"])[0], -100]])
    calls = []
    hook = model.encoder.register_forward_hook(lambda _m, inp, out: calls.append(out.last_hidden_state.shape[0]))
    try:
        loss, row = model(**enc, labels=labels, token_losses=True)
    finally:
        hook.remove()
    assert calls == [2]  # two distinct sources in a batch of four
    full = model(**enc, labels=labels).logits.log_softmax(-1)
    keep = labels != -100
    ref = -full[keep].gather(1, labels[keep].unsqueeze(1)).squeeze(1)
    assert row.tolist() == [0, 0, 1, 1, 2, 2, 3] and torch.allclose(loss, ref, atol=1e-5)


def test_input_scale_multiplies_the_input_embeddings_only(tmp_path):
    s = 8.0
    m = build_model("tiny", 100, input_scale=s)
    x = torch.tensor([[3, 4]])
    assert m.config.input_scale == pytest.approx(s)
    assert torch.allclose(m.decoder.embed_tokens(x), m.shared.weight[x] * s)
    assert torch.allclose(m.encoder.embed_tokens(x), m.shared.weight[x] * s)
    assert m.lm_head.weight.data_ptr() == m.shared.weight.data_ptr()  # tied: the output layer reads the raw weights
    m.save_pretrained(tmp_path)
    from recflm.model import RecT5

    assert torch.allclose(RecT5.from_pretrained(tmp_path).decoder.embed_tokens(x), m.shared.weight[x] * s)


def test_next_token_logprobs_of_ragged_prefixes_equal_the_forward_pass(setup):
    tok, model, _, ids = setup
    enc = tok.encode_batch(["user_1 items", "user_2 items"])
    prefixes = [tok.item_token_ids(["i3", "i4", "i5"]), tok.item_token_ids(["i8"])]
    got = model.next_token_logprobs(enc["input_ids"], enc["attention_mask"], prefixes, enc["whole_word_ids"])
    for r, p in enumerate(prefixes):
        dec = torch.tensor([[tok.pad_id] + p])
        one = {k: v[r:r + 1] for k, v in enc.items()}
        out = model(**one, decoder_input_ids=dec).logits[0, -1]
        assert torch.allclose(got[r], torch.log_softmax(out, -1), atol=1e-4)


def test_prefix_search_is_the_exact_top_k_of_valid_unseen_items(setup):
    tok, model, trie, ids = setup
    search = ConstrainedBeamSearch(model, trie)
    assert [int(t) for t in search.item_tokens[:3]] == tok.item_token_ids(ids[:3])
    enc = tok.encode_batch(["user_1 items", "user_2 items"])
    prefixes = [tok.item_token_ids(["i3", "i4"]), tok.item_token_ids(["i8"])]
    exclude = [[3, 4], [8]]
    items, scores = search.search(enc, beams=10, k=10, exclude=exclude, prefix=prefixes)
    full = search.item_scores(enc, prefixes)
    for r in range(2):
        s = full[r].clone()
        s[exclude[r]] = -float("inf")
        assert items[r].tolist() == s.topk(10).indices.tolist()
        assert not set(items[r].tolist()) & set(exclude[r]) and (items[r] >= 0).all()
    # a catalog whose IDs are several tokens has no one-step next item: the prefix search says so
    pieces = train_tokenizer([f"x {i}" for i in range(1000, 1100)] * 3, vocab_size=200)
    multi = ConstrainedBeamSearch(model, CatalogTrie.from_catalog(pieces, [str(i) for i in range(1000, 1100)]))
    with pytest.raises(ValueError, match="one token per item"):
        multi.search(enc, beams=5, prefix=prefixes)
    with pytest.raises(ValueError, match="not one token"):
        pieces.item_token_ids(["1234"])


def test_dense_templates_and_the_shared_input_builder():
    temps = load_templates()
    seen, held = sequential_template(temps, True), sequential_template(temps, True, held_out=True)
    assert is_dense(seen) and is_dense(held) and not seen.held_out and held.held_out
    assert not is_dense(sequential_template(temps, False))
    src, prefix = sequential_input(seen, "u9", ["a", "b", "c"], 2)
    assert src == seen.source and prefix == ["b", "c"]  # the dense sources name no user
    src, prefix = sequential_input(sequential_template(temps, False), "u9", ["a", "b", "c"], 2)
    assert prefix is None and ": b, c," in src and " a," not in src


def test_dense_examples_cover_training_items_only(tmp_path):
    """Windows of dense_max_len training items (the latest first), never a validation or test item."""
    from recflm.augment import sequence_examples

    items = [f"it{i}" for i in range(30)]
    seq = pd.DataFrame({"user": ["u1", "u2"], "source": ["s", "s"], "items": [items[:25], items[:4]],
                        "index": [list(range(25)), list(range(4))], "n_train": [23, 2]})
    ctx = {"ids": np.array(items, dtype=object), "templates": load_templates(), "manifest": {"primary_source": "s"}}
    import recflm.augment as aug

    orig = aug._context
    aug._context = lambda *a: ctx
    try:
        prompts = PromptConfig(sequential_style="dense", dense_max_len=10)
        ex = sequence_examples(seq, "d", "", "train", 0, 1, prompts, AugmentConfig(), ["sequential"], False)
        u1 = [t.split(" ") for t in ex[ex["user"] == "u1"]["target"]]
        assert u1 == [items[13:23], items[3:13], items[0:3]]  # training items 0..22 only, the latest window first
        assert ex[ex["user"] == "u2"]["target"].tolist() == ["it0 it1"]
        assert set(ex["template"]) <= {t.id for t in load_templates()["sequential"] if is_dense(t) and not t.held_out}
        both = sequence_examples(seq, "d", "", "train", 0, 1, PromptConfig(sequential_style="both", dense_max_len=10),
                                 AugmentConfig(), ["sequential"], False)
        assert len(both) == len(ex) + 2 * PromptConfig().sequential_per_user
        valid = sequence_examples(seq, "d", "", "valid", 0, 1, prompts, AugmentConfig(), ["sequential"], False)
        assert valid[valid["user"] == "u1"]["target"].tolist() == [" ".join(items[14:24])]  # ends at the valid item
        with pytest.raises(ValueError, match="sequential_style"):
            sequence_examples(seq, "d", "", "train", 0, 1, PromptConfig(sequential_style="nope"), AugmentConfig(),
                              ["sequential"], False)
    finally:
        aug._context = orig


def test_seq_preset_keeps_unscaled_logits_through_save_and_load(tmp_path, setup):
    """The recipe's preset: small initial embeddings and unscaled output logits, the same in the dense
    loss, the next-item scores, Hugging Face's forward and after a reload."""
    from recflm.model import RecT5

    tok, _, _, _ = setup
    torch.manual_seed(0)
    model = build_model("seq", tok.vocab_size, tok.pad_id, tok.eos_id, dropout_rate=0.0).eval()
    assert model.config.scale_decoder_outputs is False and model.lm_head.weight is model.shared.weight
    assert 0.015 < float(model.shared.weight.std()) < 0.025
    x = torch.tensor([[5, 6]])  # inputs enter at unit scale: 1 / the embeddings' std
    assert model.config.input_scale == 50.0 and torch.allclose(model.decoder.embed_tokens(x), 50 * model.shared.weight[x])
    model.save_pretrained(tmp_path / "m")
    again = RecT5.from_pretrained(tmp_path / "m").eval()
    assert again.config.scale_decoder_outputs is False
    enc = tok.encode_batch(["user_1 items"])
    prefix = [tok.item_token_ids(["i3", "i4"])]
    ours = again.next_token_logprobs(enc["input_ids"], enc["attention_mask"], prefix, enc["whole_word_ids"])[0]
    ref = again(**enc, decoder_input_ids=torch.tensor([[tok.pad_id] + prefix[0]])).logits[0, -1]
    assert torch.allclose(ours, torch.log_softmax(ref, -1), atol=1e-4)
    assert torch.allclose(ours, model.next_token_logprobs(enc["input_ids"], enc["attention_mask"], prefix,
                                                          enc["whole_word_ids"])[0], atol=1e-5)
