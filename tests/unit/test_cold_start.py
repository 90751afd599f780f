"""Cold start without a cluster: P5's attribute prompts, AUC, the new-user slices and their table."""
import math

import numpy as np
import pandas as pd
import pytest

from recflm.config import AugmentConfig, PromptConfig
from recflm.evaluate import cold_slices, format_cold_start, ranking_result, yesno_results
from recflm.metrics import auc
from recflm.prompts import (ATTR_CANDIDATES, ATTR_CANDIDATES_FIELD, ATTR_FIELD, attr_template, is_attr,
                            item_attributes, load_templates, usable)


def test_auc_on_known_inputs():
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75  # 3 of the 4 (positive, negative) pairs in order
    assert auc([3, 2, 1], [1, 1, 0]) == 1.0 and auc([1, 2, 3], [1, 1, 0]) == 0.0
    assert auc([1, 1, 1, 1], [1, 0, 1, 0]) == 0.5  # ties count one half
    assert auc([2, 1, 1, 0], [1, 1, 0, 0]) == pytest.approx((1 + 1 + 0.5 + 1) / 4)
    assert math.isnan(auc([1, 2], [1, 1]))  # one class only: undefined, not 0 or 1


def test_item_attributes_from_titles_genres_and_attribute_ids():
    cat = pd.DataFrame({"title": ["Toy Story (1995)", None, "  ", "Heat"],
                        "genres": ["Adventure|Animation", "Drama", None, "(no genres listed)"],
                        "attributes": [None, ["12", "7"], None, None]})
    assert item_attributes(cat) == ['titled "Toy Story (1995)", genres Adventure, Animation',
                                    "genres Drama, attributes 12, 7", None, 'titled "Heat"']
    assert item_attributes(pd.DataFrame({"item": ["a", "b"]})) == [None, None]  # no attribute column at all


def test_attribute_templates_render_from_attributes_and_two_are_held_out():
    direct = load_templates()["direct"]
    attr = [t for t in direct if is_attr(t)]
    assert len(attr) == 5 and sum(t.held_out for t in attr) == 2
    assert all("{item}" not in t.source for t in attr)  # the item is described, never named by its ID
    yes, choice = attr_template(load_templates(), False), attr_template(load_templates(), True)
    assert not yes.held_out and attr_template(load_templates(), False, held_out=True).held_out
    desc = 'titled "Heat (1995)", genres Action, Crime'
    src, tgt = yes.render({"user": "ml:7", "history": "1, 2", ATTR_FIELD: desc, "answer": "yes"})
    assert desc in src and "ml:7" in src and tgt == "yes"
    src, tgt = choice.render({"user": "ml:7", "history": "1, 2", ATTR_FIELD: desc,
                              ATTR_CANDIDATES_FIELD: f'titled "Up"; {desc}'})
    assert 'titled "Up"' in src and tgt == desc
    # an example whose item has no attributes never picks one (the field is None)
    ex = {"user": "u", "history": "1", "item": "5", "answer": "no", ATTR_FIELD: None}
    assert not any(is_attr(t) for t in usable(direct, ex, None)) and usable(direct, ex, False)


def test_training_direct_examples_describe_items_by_attributes_where_the_catalog_has_them():
    import recflm.augment as aug

    n = 40
    ids = np.array([str(i + 1) for i in range(n)], dtype=object)
    attrs = [f'titled "Film {i}", genres G{i % 3}' if i % 10 else None for i in range(n)]  # 4 items without
    seq = pd.DataFrame({"user": [f"u{u}" for u in range(30)], "source": ["s"] * 30,
                        "items": [[f"k{(u + j) % n}" for j in range(8)] for u in range(30)],
                        "index": [[(u + j) % n for j in range(8)] for u in range(30)], "n_train": [6] * 30})
    ctx = {"ids": ids, "templates": load_templates(), "manifest": {"primary_source": "s"}, "attrs": attrs,
           "holdout": frozenset({"u0", "u1"})}
    orig = aug._context
    aug._context = lambda *a: ctx
    try:
        prompts = PromptConfig(direct_per_user=8)
        ex = aug.sequence_examples(seq, "d", "", "train", 0, 3, prompts, AugmentConfig(), ["direct"], False)
        valid = aug.sequence_examples(seq, "d", "", "valid", 0, 3, prompts, AugmentConfig(), ["direct"], False)
        test = aug.sequence_examples(seq, "d", "", "test", 0, 3, prompts, AugmentConfig(), ["direct"], False)
    finally:
        aug._context = orig
    assert not {"u0", "u1"} & (set(ex["user"]) | set(valid["user"]))  # held-out users: no train or valid example
    assert {"u0", "u1"} <= set(test["user"])  # ... but they are evaluated
    temps = {t.id: t for t in load_templates()["direct"]}
    used = ex[ex["template"].map(lambda t: is_attr(temps[t]))]
    assert len(used) and not any(temps[t].held_out for t in ex["template"])
    described = set(a for a in attrs if a)
    for src, tgt, t in zip(used["source"], used["target"], used["template"]):
        if ATTR_CANDIDATES_FIELD in temps[t].fields:  # the choice: the target is one of the listed candidates
            assert tgt in described and tgt in src and src.count('titled "') == ATTR_CANDIDATES
        else:
            assert tgt in ("yes", "no") and any(a in src for a in described)


def test_new_user_slices_with_n_and_a_model_without_an_answer_shown_na():
    rows = pd.DataFrame({"history_len": [4, 6, 2, 9], "item_count": [1, 8, 3, 9],
                         "new_user": [True, False, True, False], "truth": [1, 1, 0, 0]})
    assert "new-user" not in cold_slices(rows, [3])  # a dataset without held-out users: no such slice
    res = ranking_result([0, -1, 12, 3], rows, "sequential/seen", [3], users=True)
    assert res["sequential/seen|new-user"]["n"] == 2 and res["sequential/seen|seen-user"]["n"] == 2
    assert res["sequential/seen|new-user"]["HR@10"] == 0.5 and res["sequential/seen|seen-user"]["HR@10"] == 0.5
    assert res["sequential/seen|seen-user"]["HR@5"] == 0.5 and res["sequential/seen|new-user"]["HR@1"] == 0.5
    yn = yesno_results([0.9, 0.2, 0.1, 0.8], rows, "direct-attr", odds=False, users=True)
    assert yn["direct-attr"]["AUC"] == 0.75 and yn["direct-attr|new-user"]["AUC"] == 1.0
    assert yn["direct-attr|seen-user"]["AUC"] == 0.0 and yn["direct-attr|new-user"]["n"] == 2
    results = {"recflm": {**res, **yn},
               "two-tower": {"sequential/seen|new-user": {"n": 2, "n/a": "per-user ID"},
                             "sequential/seen|seen-user": res["sequential/seen|seen-user"]}}
    table = format_cold_start(results, [3])
    line = next(x for x in table.splitlines() if x.startswith("sequential/seen|new-user"))
    assert line.split()[1] == "2" and line.split()[-1] == "n/a" and "0.5000" in line
    assert any(x.startswith("direct-attr|new-user") and "1.0000" in x for x in table.splitlines())
