"""The dense rating style: a user's (item, rating) pairs as one decoder sequence, every rating a target
predicted from the items and ratings before it and the item it rates; at inference the history's pairs,
then the asked item, are the decoder prefix and the answer is the expected rating over the rating tokens."""
import numpy as np
import pandas as pd
import pytest
import torch

from recflm.config import AugmentConfig, PromptConfig
from recflm.model import build_model
from recflm.prompts import (is_dense_rating, load_templates, rated_sequence, rating_input, rating_template,
                            rating_token, rating_tokens)
from recflm.tokenizer import train_tokenizer

torch.set_num_threads(1)
IDS = [f"i{i}" for i in range(12)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["Rate each item of this user's history", "predict the items"] * 5, vocab_size=200,
                           item_tokens=IDS + rating_tokens(1.0, 5.0))


def test_rating_tokens_and_the_shared_input_builder(tok):
    assert rating_token(4.111, 1.0, 5.0) == "<rating_4.1>" and rating_token(7, 1.0, 5.0) == "<rating_5.0>"
    assert rating_token(0.2, 1.0, 5.0) == "<rating_1.0>" and len(rating_tokens(1.0, 5.0)) == 41
    assert len(set(tok.item_token_ids(rating_tokens(1.0, 5.0)))) == 41  # one token each
    assert rated_sequence(["i1", "i2"], [4.0, 2.46], 1.0, 5.0) == "i1 <rating_4.0> i2 <rating_2.5>"
    temps = load_templates()
    seen, held = rating_template(temps, True), rating_template(temps, True, held_out=True)
    assert is_dense_rating(seen) and is_dense_rating(held) and held.held_out and not seen.held_out
    assert not is_dense_rating(rating_template(temps, False))
    src, prefix = rating_input(seen, ["i1", "i2", "i3"], [1.0, 2.0, 3.0], "i9", 3, 1.0, 5.0)
    # the last max_pairs - 1 pairs, then the item; the source names no user
    assert src == seen.source and prefix == ["i2", "<rating_2.0>", "i3", "<rating_3.0>", "i9"]
    assert rating_input(seen, [], [], "i9", 3, 1.0, 5.0)[1] == ["i9"]  # an unknown user: the item alone


def _with_context(fn):
    import recflm.augment as aug

    ctx = {"ids": np.array(IDS, dtype=object), "templates": load_templates(), "manifest": {"primary_source": "s"},
           "scale": (1.0, 5.0)}
    orig = aug._context
    aug._context = lambda *a: ctx
    try:
        return fn()
    finally:
        aug._context = orig


def test_dense_rating_examples_use_training_pairs_only():
    """Windows of rating_window rated training items (the latest first); an unrated item is left out; an
    evaluation row ends at its split's item and rating; the interaction rows then make no rating prompts."""
    from recflm.augment import interaction_examples, sequence_examples

    ratings = [float(1 + i % 5) for i in range(10)]
    ratings[2] = float("nan")
    seq = pd.DataFrame({"user": ["u1"], "source": ["s"], "items": [[f"k{i}" for i in range(10)]],
                        "index": [list(range(10))], "n_train": [8], "ratings": [ratings]})
    prompts = PromptConfig(rating_style="dense", rating_window=3)
    ex = _with_context(lambda: sequence_examples(seq, "d", "", "train", 0, 1, prompts, AugmentConfig(), ["rating"],
                                                 False))
    rated = [0, 1, 3, 4, 5, 6, 7]  # the training items with a rating
    windows = [rated[4:7], rated[1:4], rated[0:1]]
    assert ex["target"].tolist() == [rated_sequence([IDS[k] for k in w], [ratings[k] for k in w], 1.0, 5.0)
                                     for w in windows]
    assert set(ex["family"]) == {"rating"} and ex["item"].tolist() == ["k7", "k4", "k0"]
    assert set(ex["template"]) <= {t.id for t in load_templates()["rating"] if is_dense_rating(t) and not t.held_out}
    valid = _with_context(lambda: sequence_examples(seq, "d", "", "valid", 0, 1, prompts, AugmentConfig(),
                                                    ["rating"], False))
    assert valid["target"].tolist() == ["i6 <rating_2.0> i7 <rating_3.0> i8 <rating_4.0>"] and valid["item"][0] == "k8"
    inter = pd.DataFrame({"user": ["u1"], "item": ["k0"], "rating": [4.0], "text": [None], "summary": [None],
                          "source": ["s"], "split": ["train"]})
    ctx_items = pd.Index([f"k{i}" for i in range(10)])
    import recflm.augment as aug

    def run():
        aug._context("d", "")["index"] = ctx_items
        aug._context("d", "")["desc"] = np.array(IDS, dtype=object)
        return interaction_examples(inter, "d", "", "train", 0, 1, prompts, AugmentConfig(rating_noise=0.0),
                                    ["rating"], False)
    assert len(_with_context(run)) == 0
    with pytest.raises(ValueError, match="rating_style"):
        _with_context(lambda: sequence_examples(seq, "d", "", "train", 0, 1, PromptConfig(rating_style="nope"),
                                                AugmentConfig(), ["rating"], False))


def test_dense_rating_rows_read_their_items_and_are_supervised_at_their_ratings(tok):
    from recflm.train import _batch_tensors, _example_losses

    temps = load_templates()
    t = rating_template(temps, True)
    batch = pd.DataFrame({"template": [t.id, "sequential-dense-1"], "source": [t.source, "Predict the items"],
                          "target": ["i1 <rating_4.0> i2 <rating_2.0>", "i3 i4 i5"], "family": ["rating", "sequential"]})
    cfg = {"max_source_len": 64, "max_target_len": 8, "dense_templates": ["sequential-dense-1"],
           "dense_rating_templates": [t.id], "dense_max_len": 10, "rating_window": 5}
    enc, labels, dense = _batch_tensors(tok, batch, cfg, "cpu")
    r4, r2 = tok.item_token_ids(["<rating_4.0>", "<rating_2.0>"])
    i1, i2, i3, i4, i5 = tok.item_token_ids(["i1", "i2", "i3", "i4", "i5"])
    assert labels.tolist() == [[-100, r4, -100, r2], [i3, i4, i5, -100]] and dense.tolist() == [True, True]
    # the decoder reads every token of the pairs (the start token first); sequence rows as T5 shifts them
    assert enc["decoder_input_ids"].tolist() == [[tok.pad_id, i1, r4, i2], [tok.pad_id, i3, i4, i5]]
    torch.manual_seed(0)
    model = build_model("tiny", tok.vocab_size, tok.pad_id, tok.eos_id, dropout_rate=0.0).eval()
    loss, per_ex = _example_losses(model, enc, labels, dense)
    full = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], whole_word_ids=enc["whole_word_ids"],
                 decoder_input_ids=enc["decoder_input_ids"]).logits.log_softmax(-1)
    keep = labels != -100
    ref = -full[keep].gather(1, labels[keep].unsqueeze(1)).squeeze(1)
    assert torch.allclose(loss, ref.mean(), atol=1e-5)  # 2 + 3 targets, each counted once
    assert torch.allclose(per_ex, torch.stack([ref[:2].mean(), ref[2:].mean()]), atol=1e-5)


def test_a_trained_dense_rating_model_predicts_the_ratings_it_learnt(tok):
    """Items 0-5 are always rated 5, items 6-11 always 1: after a few hundred steps the expected rating
    after any history is near the item's rating, and always on the scale."""
    from recflm.generate import predict_ratings_dense
    from recflm.train import _batch_tensors, _example_losses

    t = rating_template(load_templates(), True)
    rng = np.random.default_rng(0)
    rate = lambda k: 5.0 if k < 6 else 1.0  # noqa: E731
    cfg = {"max_source_len": 64, "max_target_len": 8, "dense_templates": [], "dense_rating_templates": [t.id],
           "dense_max_len": 10, "rating_window": 4}
    torch.manual_seed(0)
    model = build_model("seq", tok.vocab_size, tok.pad_id, tok.eos_id, dropout_rate=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        rows = [rng.choice(12, size=4, replace=False) for _ in range(16)]
        batch = pd.DataFrame({"template": t.id, "source": t.source, "family": "rating",
                              "target": [rated_sequence([IDS[k] for k in r], [rate(k) for k in r], 1.0, 5.0)
                                         for r in rows]})
        enc, labels, dense = _batch_tensors(tok, batch, cfg, "cpu")
        loss, _ = _example_losses(model, enc, labels, dense)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    asks = [(["i0", "i7"], [5.0, 1.0], "i2"), (["i1"], [5.0], "i9"), ([], [], "i4"), ([], [], "i11")]
    inputs = [rating_input(t, h, r, it, 4, 1.0, 5.0) for h, r, it in asks]
    got = [float(x) for x in predict_ratings_dense(model, tok, [s for s, _ in inputs], [p for _, p in inputs],
                                                   1.0, 5.0)]
    assert got[0] > 4.5 and got[1] < 1.5 and got[2] > 4.5 and got[3] < 1.5, got


def test_free_text_never_writes_a_rating_token(tok):
    """Explanations and summaries are words: a model that favours a rating token still writes none."""
    from recflm.generate import generate_text

    torch.manual_seed(0)
    model = build_model("tiny", tok.vocab_size, tok.pad_id, tok.eos_id, dropout_rate=0.0).eval()
    r = tok.item_token_ids(["<rating_4.0>"])[0]
    def favour(module, inputs, logits):  # the rating token's logit on top everywhere
        logits[..., r] += 100.0
        return logits

    model.lm_head.register_forward_hook(favour)
    src = ["Rate each item of this user's history"]
    favoured = model.generate(**tok.encode_batch(src), max_new_tokens=3, do_sample=False)[0].tolist()
    assert r in favoured  # without the ban the model writes it
    assert "<rating_" not in generate_text(model, tok, src, max_new_tokens=6)[0]
