"""The review family's data rules and baselines: repeat_text rejection, holdout_short_users, and the review
baselines (lead, nearest, means, bow-ridge) on known inputs."""
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from recflm.clean import REASONS, RowCleaner, dedup_block, finalize_block, held_out_users, repeated_text
from recflm.config import PrepareConfig
from recflm.review_baselines import (BagOfWords, BowRidge, Lead, Means, Nearest, first_sentence,
                                     score_review_baselines)

NONE = np.array([], dtype=np.uint64)
SPEC = {"s": {"scale": (1.0, 5.0), "ts_unit": "s", "has_rating": True}}
COLS = ["source", "file", "kind", "user", "item", "rating", "ts", "text", "summary"]


def clean(rows):
    df = pd.DataFrame([dict(zip(COLS, r)) for r in rows], columns=COLS).astype("str")
    return RowCleaner(SPEC, 1.0, 5.0, 0, 4102444800, ["f"])(df)


# ----------------------------------------------------------------------------- repeat_text
def test_repeated_text_finds_a_block_said_again_and_again():
    got = repeated_text(pd.Series(["great great great", "Yum! Love it. Yum! Love it.", "so so", "bye bye",
                                   "very very good", "a b a", "good. GOOD! good?", None, "",
                                   "thanks thanks thanks thanks x"], dtype="object"))
    assert got.tolist() == [True, True, False, False, False, False, True, False, False, False]


def test_repeat_text_rows_are_rejected_with_their_reason():
    assert "repeat_text" in REASONS
    out = clean([("s", "f", "interaction", "u1", "i1", "5", "100", "Tasty!<br /> tasty!  TASTY", "yum"),
                 ("s", "f", "interaction", "u2", "i1", "4", "100", "Tasty and fresh, would buy again.", "ok"),
                 ("s", "f", "interaction", "u3", "i1", "4", "-5", "nice nice nice", "ok")])
    reasons = [None if pd.isna(r) else r for r in out["reason"]]
    assert reasons == ["repeat_text", None, "bad_timestamp"]  # the first reason found is the one kept
    assert out.loc[0, "text"] == "Tasty!<br /> tasty!  TASTY"  # a rejected row keeps what the file said


# ----------------------------------------------------------------------------- holdout_short_users
def _table(users_items: dict) -> pa.Table:
    rows = [("s", "f", "interaction", u, it, "4", str(100 + t), f"review {u} {it}", "sum")
            for u, items in users_items.items() for t, it in enumerate(items)]
    return pa.Table.from_pandas(dedup_block(clean(rows)), preserve_index=False)


def test_holdout_short_users_moves_a_seeded_share_whole_into_valid_and_test():
    users = {f"u{i}": ["a"] if i % 2 else ["a", "b"] for i in range(400)}
    users["long"] = ["a", "b", "c", "d"]
    t = _table(users)
    fin = finalize_block(t, NONE, 1, holdout=0.5, seed=7).to_pandas()
    fin = fin[fin["reason"].isna()]
    per_user = fin.groupby("user")["split"].agg(set)
    assert all(len(s) == 1 for u, s in per_user.items() if u != "s:long")  # a short user goes whole
    shares = per_user.drop("s:long").map(lambda s: next(iter(s))).value_counts(normalize=True)
    assert set(shares.index) == {"train", "valid", "test"}
    assert abs(shares["train"] - 0.5) < 0.1 and abs(shares["valid"] - 0.25) < 0.08 and abs(shares["test"] - 0.25) < 0.08
    long = fin[fin["user"] == "s:long"].sort_values("pos")["split"].tolist()
    assert long == ["train", "train", "valid", "test"]  # leave-one-out users are not touched
    again = finalize_block(t, NONE, 1, holdout=0.5, seed=7).to_pandas()
    assert again.sort_values(["user", "pos"])["split"].tolist() == \
        finalize_block(t, NONE, 1, holdout=0.5, seed=7).to_pandas().sort_values(["user", "pos"])["split"].tolist()
    other = finalize_block(t, NONE, 1, holdout=0.5, seed=8).to_pandas()
    assert other.sort_values(["user", "pos"])["split"].tolist() != again.sort_values(["user", "pos"])["split"].tolist()


def test_holdout_off_keeps_short_users_in_train():
    fin = finalize_block(_table({"u1": ["a"], "u2": ["a", "b"]}), NONE, 1).to_pandas()
    assert set(fin["split"]) == {"train"}
    assert (held_out_users(np.array(["a", "b"], dtype=object), 0.0, 1) == "").all()


def test_holdout_share_out_of_range_is_refused(tmp_path):
    from recflm.prepare import PrepareError, plan

    with pytest.raises(PrepareError, match="holdout_short_users"):
        plan(PrepareConfig(out=str(tmp_path / "d"), holdout_short_users=1.0))


# ----------------------------------------------------------------------------- review baselines
TRAIN = pd.DataFrame({
    "user": ["a", "a", "b", "c"], "item": ["x", "y", "x", "z"], "rating": [5.0, 3.0, 1.0, 4.0],
    "text": ["Great coffee, rich and smooth. Buy it.", "Decent tea, a bit weak.",
             "Awful stale coffee. Never again.", "Lovely smooth chocolate."],
    "summary": ["great coffee", "decent tea", "stale coffee", "lovely chocolate"]})


def test_first_sentence_and_bag_of_words():
    assert first_sentence("Great taste! Would buy again.") == "Great taste!"
    assert first_sentence("one two three four five six seven eight nine ten eleven") == \
        "one two three four five six seven eight nine ten"
    assert first_sentence(None) == "" and first_sentence("  ") == ""
    bow = BagOfWords().fit(["a b", "a c"])
    x = bow.transform(["a b b", "zzz"]).toarray()
    assert np.isclose(np.linalg.norm(x[0]), 1.0) and not x[1].any()  # unknown words: an empty vector
    assert x[0, bow.index["b"]] > x[0, bow.index["a"]]  # b: twice, and rarer


def test_review_baselines_on_known_inputs():
    rows = pd.DataFrame({
        "task": ["review", "review", "review-rating", "review-rating", "review-rating"],
        "user": ["d", "e", "a", "new", "new"], "item": ["x", "x", "z", "z", "q"],
        "text": ["Stale coffee, awful. Never buy.", "Lovely smooth chocolate! Yes.", "Great coffee, rich.",
                 "x", "y"],
        "target": ["stale coffee", "lovely smooth chocolate!", "5", "4", "4"]})
    assert Lead().summaries(rows[:2]) == ["Stale coffee, awful.", "Lovely smooth chocolate!"]
    assert Nearest().fit(TRAIN).summaries(rows[:2]) == ["stale coffee", "lovely chocolate"]
    # means: the user's mean (a: 4), else the item's (z: 4), else the global mean (13 / 4)
    assert Means().fit(TRAIN).ratings(rows[2:]) == [4.0, 4.0, 3.25]
    res = score_review_baselines(TRAIN, rows, (1.0, 5.0), log=lambda *a: None)
    assert set(res) == {"lead", "nearest", "means", "bow-ridge"}
    assert "review-rating" not in res["lead"] and "review" not in res["means"] and "review" not in res["bow-ridge"]
    assert res["nearest"]["review"]["ROUGE-1"] == pytest.approx(100 * (1.0 + 0.8) / 2)  # exact; 2 of 3 words
    m = res["means"]["review-rating"]
    assert m["n"] == 3 and m["RMSE"] == pytest.approx(math.sqrt((1 + 0 + 0.75 ** 2) / 3))
    assert res["lead"]["review"]["ROUGE-1"] < 100 and res["lead"]["review"]["n"] == 2


def test_bow_ridge_learns_the_sentiment_of_words():
    texts = ["great tasty love"] * 20 + ["awful stale bad"] * 20
    train = pd.DataFrame({"user": ["u"] * 40, "item": ["i"] * 40, "text": texts, "summary": ["s"] * 40,
                          "rating": [5.0] * 20 + [1.0] * 20})
    model = BowRidge().fit(train, (1.0, 5.0), alpha=0.1)
    hi, lo, unknown = model.ratings(pd.DataFrame({"text": ["love it, great", "stale and awful", "qwerty"]}))
    assert hi > 4.0 and lo < 2.0 and unknown == pytest.approx(3.0)
    assert all(1.0 <= v <= 5.0 for v in (hi, lo))


def test_served_manifest_is_json_safe():
    import json

    from recflm.serve_model import json_safe

    m = {"metrics": {"val_ndcg10": float("nan"), "val_loss": 3.5, "h": [float("inf"), 1]}, "families": ["review"]}
    out = json_safe(m)
    assert out == {"metrics": {"val_ndcg10": None, "val_loss": 3.5, "h": [None, 1]}, "families": ["review"]}
    json.dumps(out, allow_nan=False)


def test_bench_review_table_and_summary_line():
    from jobs.bench_review import configs, format_review_table, parse_args, summary_line

    results = {"recflm": {"review": {"ROUGE-L": 12.0, "BLEU-4": 1.0, "n": 50}, "review-rating": {"RMSE": 1.1, "n": 40}},
               "lead": {"review": {"ROUGE-L": 10.0, "n": 50}}, "means": {"review-rating": {"RMSE": float("nan"), "n": 40}}}
    table = format_review_table(results)
    assert "summaries n=50, star ratings n=40" in table
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[3:]}
    assert list(rows) == ["recflm", "lead", "means"] and rows["recflm"][3] == "12.0000" and rows["means"][4] == "—"
    assert summary_line(results, 2.0) == ("SUMMARY bench_review rougeL recflm=12.0000 lead=10.0000 nearest=nan "
                                          "rmse recflm=1.1000 means=nan bow_ridge=nan minutes=2.0")
    _, tcfg, ecfg = configs(parse_args(["--budget-minutes", "10", "--examples", "7", "lr=0.01"]), stamp=1)
    assert tcfg.max_minutes == 6.0 and tcfg.lr == 0.01 and tcfg.name == "bench_review_1"
    assert ecfg.baselines and ecfg.text_examples == 7 and ecfg.families == ["review", "rating"]
    with pytest.raises(SystemExit):
        parse_args(["notakeyvalue"])
