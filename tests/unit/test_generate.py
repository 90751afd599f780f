"""Constrained beam search against Hugging Face generate + prefix_allowed_tokens_fn, and its guarantees."""
import numpy as np
import pytest
import torch

from recflm.generate import CatalogTrie, ConstrainedBeamSearch, hf_reference, parse_rating, score_candidates
from recflm.model import build_model
from recflm.tokenizer import train_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    ids = [str(i) for i in rng.choice(np.arange(1000, 5000), size=300, replace=False)] + ["7", "71", "712"]  # prefixes of each other
    texts = [f"user_{u} watched {', '.join(rng.choice(ids, 8))} next {rng.choice(ids)}" for u in range(400)]
    tok = train_tokenizer(texts + ids, vocab_size=500)
    torch.manual_seed(0)
    model = build_model("tiny", tok.vocab_size, tok.pad_id, tok.eos_id, dropout_rate=0.0).eval()
    # random weights give near-uniform outputs; sharpen them so beams really compete
    with torch.no_grad():
        model.shared.weight.mul_(20)
    trie = CatalogTrie.from_catalog(tok, ids)
    sources = [f"user_{u} watched {', '.join(rng.choice(ids, 6))} next" for u in range(12)]
    return tok, model, trie, ids, sources


def test_trie_allows_exactly_the_catalog(setup):
    tok, _, trie, ids, _ = setup
    for i in [0, 5, len(ids) - 1]:
        seq = tok.encode_ids(ids[i])
        prefix = [tok.pad_id]
        for t in seq:
            assert t in trie.allowed(prefix)
            prefix.append(t)
    assert trie.allowed([tok.pad_id, tok.vocab_size - 1]) == [tok.pad_id]  # off the trie: nothing valid
    with pytest.raises(ValueError, match="same token sequence"):
        CatalogTrie([[5, 1], [5, 1]], 0, 1)


@pytest.mark.parametrize("beams", [5, 20])
def test_top_k_equals_hugging_face_reference(setup, beams):
    tok, model, trie, ids, sources = setup
    enc = tok.encode_batch(sources)
    ours, our_scores = ConstrainedBeamSearch(model, trie).search(enc, beams=beams)
    ref, ref_scores = hf_reference(model, enc, trie, beams, beams)
    assert (ours >= 0).all() and (ours < len(ids)).all()
    assert torch.equal(ours, ref)
    assert torch.allclose(our_scores, ref_scores, atol=1e-4)
    assert len(set(ours[0].tolist())) == beams  # distinct items


def test_exclusion_and_k(setup):
    tok, model, trie, ids, sources = setup
    enc = tok.encode_batch(sources[:4])
    search = ConstrainedBeamSearch(model, trie)
    full, _ = search.search(enc, beams=10)
    banned = [full[b, :3].tolist() for b in range(4)]
    items, scores = search.search(enc, beams=10, k=5, exclude=banned)
    assert items.shape == (4, 5)
    for b in range(4):
        assert not set(items[b].tolist()) & set(banned[b])
        assert items[b, 0] == full[b, 3]  # the next best item moves up
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    with pytest.raises(ValueError, match="larger than the beam width"):
        search.search(enc, beams=5, k=6)


def test_parse_rating():
    assert parse_rating("4.1", 1, 5) == 4.1 and parse_rating(" 3 ", 1, 5) == 3.0
    assert parse_rating("7", 1, 5) is None and parse_rating("four", 1, 5) is None and parse_rating("", 1, 5) is None


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_served_dtypes_keep_outputs_valid_and_close(setup, dtype):
    """recflm serve's dtype option: a cast copy of the model still returns only catalog items, and its
    top-k mostly agrees with the float32 model's."""
    import copy

    from recflm.config import ConfigError
    from recflm.serve import ServeConfig, check_config
    from recflm.serve_model import cast_model

    tok, model, trie, ids, sources = setup
    enc = tok.encode_batch(sources)
    ref, _ = ConstrainedBeamSearch(model, trie).search(enc, beams=10)
    cast = cast_model(copy.deepcopy(model), dtype)
    if dtype == "int8":
        assert not any(type(m) is torch.nn.Linear for m in cast.modules())  # every linear layer quantized
    else:
        assert next(cast.parameters()).dtype == torch.bfloat16
    items, scores = ConstrainedBeamSearch(cast, trie).search(enc, beams=10)
    assert (items >= 0).all() and (items < len(ids)).all() and torch.isfinite(scores).all()
    overlap = np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(items, ref)])
    assert overlap > 0.7
    with pytest.raises(ConfigError, match="dtype='fp8'"):
        check_config(ServeConfig(bundle="b", dtype="fp8"))


def test_score_candidates_equals_teacher_forced_forward(setup):
    """The 1-of-N scorer (shared cross-attention, candidates stepped together) gives each candidate the
    summed log-probability the model's own teacher-forced forward gives it."""
    tok, model, trie, ids, sources = setup
    rng = np.random.default_rng(1)
    cands = [[ids[i] for i in rng.choice(len(ids), 7, replace=False)] + ["7", "712"] for _ in sources[:5]]
    got = score_candidates(model, tok, sources[:5], cands)
    for src, cs, g in zip(sources[:5], cands, got):
        enc = tok.encode_batch([src] * len(cs))
        labels = tok.encode_targets(cs, 32)
        with torch.no_grad():
            logits = model(**enc, labels=labels).logits
        lp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        ref = (lp * (labels != -100)).sum(1).numpy()
        assert np.allclose(g, ref, atol=1e-4)
    uneven = score_candidates(model, tok, sources[:2], [cands[0], cands[1][:3]])  # different counts per source
    assert np.allclose(uneven[0], got[0], atol=1e-4) and np.allclose(uneven[1], got[1][:3], atol=1e-4)


def test_expected_rating_is_the_mean_over_the_scale(setup):
    from recflm.generate import predict_ratings, rating_values

    tok, model, _, _, sources = setup
    values = rating_values(1.0, 5.0)
    assert values[0] == "1.0" and values[-1] == "5.0" and len(values) == 41
    got = [parse_rating(t, 1.0, 5.0) for t in predict_ratings(model, tok, sources[:3], 1.0, 5.0)]
    assert all(g is not None and 1.0 <= g <= 5.0 for g in got)  # always a number on the scale
    # a model whose every answer is one rating text: the expectation is that rating
    import recflm.generate as gen

    orig = gen.score_candidates
    try:
        gen.score_candidates = lambda m, t, src, cands, n=256: [np.where(np.array(c) == "4.2", 0.0, -50.0) for c in cands]
        assert predict_ratings(model, tok, sources[:2], 1.0, 5.0) == ["4.20", "4.20"]
        # two equally likely answers: their mean
        gen.score_candidates = lambda m, t, src, cands, n=256: [np.where(np.isin(c, ["2.0", "5.0"]), 0.0, -50.0)
                                                                for c in cands]
        assert predict_ratings(model, tok, sources[:1], 1.0, 5.0) == ["3.50"]
    finally:
        gen.score_candidates = orig
