import numpy as np
import pandas as pd
import pyarrow as pa

from recflm.clean import RowCleaner, dedup_block, finalize_block, kcore_item_counts, key_hash, normalise_text

NONE = np.array([], dtype=np.uint64)

SPEC = {"s": {"scale": (1.0, 5.0), "ts_unit": "s", "has_rating": True}}


def raw(rows):
    cols = ["source", "file", "kind", "user", "item", "rating", "ts", "text", "summary"]
    return pd.DataFrame([dict(zip(cols, r)) for r in rows], columns=cols).astype("str")


def reasons(df):
    return [None if pd.isna(r) else r for r in df["reason"]]


def clean(rows):
    return RowCleaner(SPEC, 1.0, 5.0, 0, 4102444800, ["f"])(raw(rows))


def test_row_reasons_and_normalisation():
    out = clean([
        ("s", "f", "interaction", "u1", "i1", "5", "100", "Great&amp;  good<br />stuff ", None),
        ("s", "f", "interaction", None, "i1", "5", "100", None, None),
        ("s", "f", "interaction", "u1", " ", "5", "100", None, None),
        ("s", "f", "interaction", "u1", "i2", "five", "100", None, None),
        ("s", "f", "interaction", "u1", "i2", "7", "100", None, None),
        ("s", "f", "interaction", "u1", "i2", None, "100", None, None),
        ("s", "f", "interaction", "u1", "i2", "3", "yesterday-ish", None, None),
        ("s", "f", "interaction", "u1", "i2", "3", "-7", None, None),
        ("s", "f", "interaction", "u1", "i3", "1", "2012-10-26", "   ", None),
        ("s", "f", "malformed", None, None, None, None, "a,b,c,d,e", None),
    ])
    assert reasons(out)[1:] == [
        "missing_user", "missing_item", "bad_rating", "rating_out_of_range", "missing_rating",
        "bad_timestamp", "bad_timestamp", None, "malformed_row"]
    ok = out.iloc[0]
    assert ok["user"] == "s:u1" and ok["item"] == "s:i1" and ok["rating"] == 5.0 and ok["ts"] == 100
    assert ok["text"] == "Great& good stuff"
    assert out.iloc[8]["ts"] == 1351209600 and pd.isna(out.iloc[8]["text"])  # date string parsed; blank -> null
    assert out.iloc[3]["rating_raw"] == "five" and out.iloc[6]["ts_raw"] == "yesterday-ish"


def test_rating_scale_is_mapped_linearly():
    c = RowCleaner({"m": {"scale": (0.5, 5.0), "ts_unit": "ms", "has_rating": True}}, 1.0, 5.0, 0, 4102444800)
    out = c(raw([("m", "f", "interaction", "u", "i", "0.5", "5000", None, None),
                 ("m", "f", "interaction", "u", "j", "5.0", "5000", None, None)]))
    assert out["rating"].tolist() == [1.0, 5.0] and out["ts"].tolist() == [5, 5]


def test_normalise_text_entities_tags_whitespace():
    s = normalise_text(pd.Series(["a &lt;b&gt;\n\tc", "<a href='x'>link</a>", "", None], dtype="str"))
    assert s.iloc[0] == "a <b> c" and s.iloc[1] == "link" and pd.isna(s.iloc[2]) and pd.isna(s.iloc[3])


def test_dedup_exact_repeat_and_tags():
    df = clean([
        ("s", "f", "interaction", "u", "a", "4", "10", None, None),
        ("s", "f", "interaction", "u", "a", "4", "10", None, None),   # exact duplicate
        ("s", "f", "interaction", "u", "a", "2", "50", None, None),   # later repeat wins
        ("s", "f", "interaction", "u", "b", "3", "20", None, None),
        ("s", "f", "tag", "u", "b", None, "21", "funny", None),
        ("s", "f", "tag", "u", "b", None, "22", "dark", None),
        ("s", "f", "tag", "u", "c", None, "23", "orphan", None),
    ])
    out = dedup_block(df)
    assert reasons(out) == ["repeat_earlier", "duplicate", None, None, None, None,
                                      "tag_without_interaction"]
    b = out[(out["item"] == "s:b") & (out["kind"] == "interaction")].iloc[0]
    assert b["text"] == "funny; dark"


def _users(n_items_per_user):
    rows = []
    for u, items in n_items_per_user.items():
        for t, it in enumerate(items):
            rows.append(("s", "f", "interaction", u, it, "3", str(100 + t), None, None))
    return pa.Table.from_pandas(dedup_block(clean(rows)), preserve_index=False)


def test_kcore_counts_and_finalize_split():
    df = _users({"u1": ["a", "b", "c"], "u2": ["a", "b", "c"], "u3": ["a", "b"]})
    counts = kcore_item_counts(df, NONE, 3).to_pandas().set_index("item_hash")["n"].to_dict()
    h = dict(zip(["s:a", "s:b", "s:c"], key_hash(np.array(["s:a", "s:b", "s:c"], dtype=object))))
    assert counts == {h["s:a"]: 2, h["s:b"]: 2, h["s:c"]: 2}  # u3 has 2 < 3 interactions and is out
    removed = np.sort(np.array([h["s:c"]], dtype=np.uint64))
    fin = finalize_block(df, removed, 2).to_pandas()
    assert set(fin.loc[fin["reason"] == "kcore", "item"]) == {"s:c"}
    fin = finalize_block(df, NONE, 3).to_pandas()
    assert (fin.loc[fin["user"] == "s:u3", "reason"] == "kcore").all()
    u1 = fin[fin["user"] == "s:u1"].sort_values("pos")
    assert u1["split"].tolist() == ["train", "valid", "test"] and u1["item"].tolist() == ["s:a", "s:b", "s:c"]


def test_short_users_stay_in_train():
    fin = finalize_block(_users({"u": ["a", "b"]}), NONE, 1).to_pandas()
    assert fin["split"].tolist() == ["train", "train"]
