"""Tokenizer, whole-word ids, model presets and bundles (no Ray)."""
import pandas as pd
import pytest
import torch

from recflm.bundle import BundleError, load_bundle, save_bundle
from recflm.model import build_model, count_parameters
from recflm.tokenizer import train_tokenizer

torch.set_num_threads(1)
TEXTS = ["Given the following interaction history of user_ml:1: 45, 3314 -> 17, predict the next item.",
         "How will user_ml:7 rate this item: 88 (Toy Story (1995))? Answer with a number from 1 to 5.",
         "Fill in the masked items in the sequence of user_ml:3: 12, <mask>, 1234", "4.1", "1234",
         "x <a3><b12><c7>, <a1><b2>"] * 40


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=400)


def words(tok, text):
    return tok.encode_batch([text])["whole_word_ids"][0].tolist()


@pytest.mark.parametrize("text, expected", [
    ("history 1234, 5678 -> 42", [1, 2, 2, 2, 3, 3, 3, 3, 3, 4, 4, 4, 5, 5, 5, 0]),
    ("x <mask> <a3><b12><c7>, 99", None),
])
def test_whole_word_ids_group_all_pieces_of_an_id(tok, text, expected):
    enc = tok.hf.encode(text, add_special_tokens=False)
    got = words(tok, text)
    assert got[-1] == 0 and len(got) == len(enc.tokens) + 1  # </s> gets 0
    if expected is not None:
        assert got == expected
    # every piece of a word shares one index and indices never go down
    assert all(b >= a for a, b in zip(got[:-1], got[1:-1]))
    n_words = len(text.split())
    assert max(got) == n_words


def test_cluster_tokens_and_item_tokens_are_single_tokens(tok):
    assert tok.hf.encode("<a3><b12><c7>", add_special_tokens=False).tokens == ["<a3>", "<b12>", "<c7>"]
    t2 = train_tokenizer(TEXTS, vocab_size=400, item_tokens=["1234", "5678"])
    enc = t2.hf.encode("items 1234, 5678", add_special_tokens=False)
    assert "1234" in enc.tokens and "5678" in enc.tokens
    assert t2.decode(t2.encode_batch(["items 1234, 5678"])["input_ids"][0]) == "items 1234, 5678"


def test_round_trip_text_and_truncation(tok):
    text = "user_ml:12 gave 4.1 stars to 3314 -> 17"
    assert tok.decode(tok.encode_batch([text])["input_ids"][0]) == text
    enc = tok.encode_batch([text, "1234"], max_length=5)
    assert enc["input_ids"].shape == (2, 5) and enc["input_ids"][0, -1] == tok.eos_id
    assert enc["attention_mask"][1].sum() == len(tok.hf.encode("1234", add_special_tokens=False).ids) + 1


def test_presets_sizes():
    assert count_parameters(build_model("tiny", 1000)) < 1_000_000
    assert 10_000_000 <= count_parameters(build_model("mini", 8000)) <= 15_000_000
    with pytest.raises(ValueError, match="unknown model preset"):
        build_model("huge", 100)


def test_tiny_model_learns_and_bundle_round_trip(tok, tmp_path):
    torch.manual_seed(0)
    model = build_model("tiny", tok.vocab_size, tok.pad_id, tok.eos_id, dropout_rate=0.0)
    src = ["history of user_ml:1: 45, 3314", "history of user_ml:7: 17, 88", "user_ml:3 rates 1234"]
    tgt = ["17", "1234", "4.1"]
    enc, labels = tok.encode_batch(src), tok.encode_targets(tgt)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    model.eval()
    out = save_bundle(tmp_path / "b", model, tok, pd.DataFrame({"item": ["a"], "index": [0], "id_text": ["17"]}),
                      {"note": "test"})
    b = load_bundle(out)
    with torch.no_grad():
        a = model(**enc, labels=labels).logits
        c = b.model(**enc, labels=labels).logits
        g1 = model.generate(**enc, max_new_tokens=4, num_beams=2)
        g2 = b.model.generate(**enc, max_new_tokens=4, num_beams=2)
    assert torch.equal(a, c) and torch.equal(g1, g2)
    assert b.manifest["note"] == "test" and b.manifest["parameters"] == count_parameters(model)
    assert (b.templates_dir / "sequential.yaml").exists()
    # whole-word ids matter: the same input without them gives other logits
    with torch.no_grad():
        no_ww = b.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).logits
    assert not torch.allclose(no_ww, c)


def test_bad_bundles_give_clear_errors(tmp_path):
    with pytest.raises(BundleError, match="bundle directory not found"):
        load_bundle(tmp_path / "nope")
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04junk")
    with pytest.raises(BundleError, match="pickled weights are never loaded"):
        load_bundle(d)


def test_byte_fallback_reads_any_text_without_unk_and_decodes_it_back():
    """A tokenizer trained on one stage's texts (here: span prompts only) encodes what any later stage
    sends: letters, accents, CJK and emoji it never saw become byte tokens, never <unk>."""
    from recflm.tokenizer import BYTE_TOKENS, UNK

    span_only = train_tokenizer(["Fill in the masked items in the sequence of user_1: 12, <mask>, 15"] * 20,
                                vocab_size=60, item_tokens=["12", "15"])
    unk = span_only.hf.token_to_id(UNK)
    assert all(span_only.hf.token_to_id(b) is not None for b in BYTE_TOKENS)
    for text in ["Which star rating will user_7 give item 12? (1 being lowest)", "Zoë's café: 日本 😀 quiz!",
                 "Write a short summary for this review by user_x: Great JERKY, would buy again."]:
        ids = span_only.hf.encode(text, add_special_tokens=False).ids
        assert unk not in ids and span_only.decode(ids) == text
    # a byte token is a piece of a character, not a word of its own: one whole-word index per word
    assert max(span_only.encode_batch(["日本 😀"])["whole_word_ids"][0].tolist()) == 2
    # the vocabulary size counts the learnt pieces; the 256 byte tokens come on top
    assert span_only.vocab_size <= 60 + len(BYTE_TOKENS) + 2
