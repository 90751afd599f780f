"""The self-supervised ``next`` family: causal next-item targets over every window of a user's training
sequence, in the dense rows' shape (a fixed source naming no user, one token per item), and which families an
``objective=self-supervised`` run may name."""
import numpy as np
import pandas as pd
import pytest

import recflm.augment as aug
from recflm.augment import NEXT, NEXT_SOURCE, SPAN, sequence_examples
from recflm.config import AugmentConfig, ConfigError, PromptConfig
from recflm.prompts import load_templates
from recflm.train import SELF_SUPERVISED_FAMILIES, TrainConfig, _batch_tensors, self_supervised_families

ITEMS = [f"it{i}" for i in range(30)]


@pytest.fixture
def examples(monkeypatch):
    """sequence_examples over three users (25 items of which 23 train, 4 of which 2, 3 of which 1), the catalog
    and templates in place of a prepared dataset; u9 is held out of training."""
    seq = pd.DataFrame({"user": ["u1", "u2", "u3", "u9"], "source": ["s"] * 4,
                        "items": [ITEMS[:25], ITEMS[:4], ITEMS[:3], ITEMS[:10]],
                        "index": [list(range(25)), list(range(4)), list(range(3)), list(range(10))],
                        "n_train": [23, 2, 1, 8]})
    ctx = {"ids": np.array(ITEMS, dtype=object), "templates": load_templates(), "manifest": {"primary_source": "s"},
           "holdout": {"u9"}}
    monkeypatch.setattr(aug, "_context", lambda *a: ctx)

    def make(split, families, **prompts):
        return sequence_examples(seq, "d", "", split, 0, 1, PromptConfig(**{"dense_max_len": 10, **prompts}),
                                 AugmentConfig(), families, False)
    return make


def test_next_rows_are_the_windows_of_the_training_items(examples):
    ex = examples("train", [NEXT])
    assert (ex["family"] == NEXT).all() and (ex["template"] == NEXT).all() and (ex["source"] == NEXT_SOURCE).all()
    assert not any(u in s for s in ex["source"] for u in ("u1", "u2", "user_"))  # the source names no user
    u1 = [t.split(" ") for t in ex[ex["user"] == "u1"]["target"]]
    # one row per window of dense_max_len training items, the latest first; never the valid (22+1) or test item
    assert u1 == [ITEMS[13:23], ITEMS[3:13], ITEMS[0:3]]
    assert ex[ex["user"] == "u1"]["item"].tolist() == [ITEMS[22], ITEMS[12], ITEMS[2]]  # each window's last item
    assert ex[ex["user"] == "u2"]["target"].tolist() == ["it0 it1"]
    assert set(ex["user"]) == {"u1", "u2"}  # one training item: no next-item target; held-out users: none
    # every training item is in exactly one window: the rows cover the training sequence, nothing else
    assert sorted(sum(u1, [])) == sorted(ITEMS[:23])
    # other lengths: windows of dense_max_len, as the dense sequential rows'
    assert [len(t.split(" ")) for t in examples("train", [NEXT], dense_max_len=5)
            .query("user == 'u1'")["target"]] == [5, 5, 5, 5, 3]


def test_next_beside_span_and_on_the_evaluation_splits(examples):
    both = examples("train", [SPAN, NEXT], span_windows=True)
    assert set(both["family"]) == {SPAN, NEXT}
    assert both[both["family"] == NEXT]["target"].tolist() == examples("train", [NEXT])["target"].tolist()
    assert not both[both["family"] == SPAN]["source"].str.contains(NEXT_SOURCE, regex=False).any()
    # validation: the window that ends at the valid item (its last position is the held-out next item)
    valid = examples("valid", [NEXT])
    assert valid.set_index("user")["target"].to_dict() == {"u1": " ".join(ITEMS[14:24]), "u2": "it0 it1 it2",
                                                          "u3": "it0 it1"}
    assert valid.set_index("user")["item"].to_dict() == {"u1": ITEMS[23], "u2": ITEMS[2], "u3": ITEMS[1]}
    test = examples("test", [NEXT])
    assert test.set_index("user")["target"]["u1"] == " ".join(ITEMS[15:25])


def test_next_rows_are_dense_in_the_training_batch():
    """Read as dense rows (``dense_templates`` holds ``next``): one item token per position, no ``</s>``."""
    from recflm.tokenizer import train_tokenizer

    tok = train_tokenizer([NEXT_SOURCE] * 20 + ["Fill in the masked items"] * 20, vocab_size=200, item_tokens=ITEMS)
    batch = pd.DataFrame({"family": [NEXT, SPAN], "template": [NEXT, SPAN], "source": [NEXT_SOURCE, "Fill in <mask>"],
                          "target": ["it3 it4 it5", "it7"]})
    cfg = {"max_source_len": 32, "max_target_len": 8, "dense_templates": ["sequential-dense-1", NEXT],
           "dense_max_len": 10}
    _, labels, dense = _batch_tensors(tok, batch, cfg, "cpu")
    assert dense.tolist() == [True, False]
    assert labels[0, :3].tolist() == tok.item_token_ids(["it3", "it4", "it5"]) and (labels[0, 3:] == -100).all()
    assert labels[1, :2].tolist() == [*tok.item_token_ids(["it7"]), tok.eos_id]  # span: a plain target


def test_self_supervised_families_are_selectable():
    log = []
    # a labelled recipe's families (or TrainConfig's default list): not this objective's, the default instead
    assert self_supervised_families(TrainConfig().families, log.append) == SELF_SUPERVISED_FAMILIES == ["span"]
    assert self_supervised_families(["sequential", "rating"], log.append) == ["span"] and len(log) == 2
    assert self_supervised_families(["next"]) == ["next"]
    assert self_supervised_families(["span", "next"]) == ["span", "next"]
    assert self_supervised_families(["next", "span", "next"]) == ["next", "span"]
    with pytest.raises(ConfigError, match=r"objective=self-supervised: 'sequential' is a labelled task family"):
        self_supervised_families(["next", "sequential"])
    with pytest.raises(ConfigError, match=r"unknown task family 'nxt'"):
        self_supervised_families(["nxt"])
