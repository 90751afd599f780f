"""Readers for every source type, merged into one dataset; bad input stops with a clear message."""
import gzip
import json

import pandas as pd
import pytest

from recflm.cli import main
from recflm.config import PrepareConfig
from recflm.dataset import PreparedData
from recflm.prepare import run

from ..conftest import SHARED

FOOD = SHARED / "amazon-fine-food-reviews-sample" / "Reviews_first7567.csv.gz"


def write_movielens(d, n_users=12, n_items=8):
    d.mkdir(parents=True)
    rows = [(u, i, 0.5 + (u * i) % 10 / 2, 1_000_000 + u * 100 + i) for u in range(n_users) for i in range(n_items)]
    pd.DataFrame(rows, columns=["userId", "movieId", "rating", "timestamp"]).to_csv(d / "ratings.csv", index=False)
    pd.DataFrame({"movieId": range(n_items), "title": [f"Movie {i} (2001)" for i in range(n_items)],
                  "genres": "Drama"}).to_csv(d / "movies.csv", index=False)
    with open(d / "ratings.csv", "a") as f:
        f.write("3,2,4.0\n")  # malformed: a field is missing
        f.write("4,1,4.0,1000401\n")  # exact duplicate
    return len(rows) + 2


def write_amazon(path, n_users=10, n_items=6):
    lines = []
    for u in range(n_users):
        for i in range(n_items):
            lines.append(json.dumps({"reviewerID": f"R{u}", "asin": f"B{i}", "overall": 1 + (u + i) % 5,
                                     "unixReviewTime": 1_300_000_000 + 86400 * (u * n_items + i),
                                     "reviewText": f"Tasty &amp; cheap,   item {i} <br />really", "summary": f"ok {i}"}))
    lines.append("{not json")
    lines.append(json.dumps({"reviewerID": "R1", "asin": "B9", "overall": 11, "unixReviewTime": 1_300_000_000}))
    lines.append(json.dumps({"asin": "B2", "overall": 3, "unixReviewTime": 1_300_000_000}))
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    return len(lines)


@pytest.fixture(scope="module")
def merged(ray_session, tmp_path_factory):
    if not FOOD.is_file():
        pytest.skip(f"needs the shared Amazon Fine Food sample at {FOOD} (not in a lone clone of the repo)")
    tmp = tmp_path_factory.mktemp("src")
    n_ml = write_movielens(tmp / "ml")
    n_az = write_amazon(tmp / "reviews.jsonl.gz")
    food = pd.read_csv(FOOD).head(3000)
    food.to_parquet(tmp / "food.parquet", index=False)
    cfg = PrepareConfig(out=str(tmp / "out"), k_core=2, sources=[
        {"type": "movielens", "path": str(tmp / "ml"), "name": "ml"},
        {"type": "amazon", "path": str(tmp / "reviews.jsonl.gz"), "name": "az"},
        {"type": "table", "path": str(FOOD), "name": "food",
         "columns": {"user": "UserId", "item": "ProductId", "rating": "Score", "ts": "Time",
                     "text": "Text", "summary": "Summary"}},
        {"type": "table", "path": str(tmp / "food.parquet"), "name": "foodpq",
         "columns": {"user": "UserId", "item": "ProductId", "rating": "Score", "ts": "Time"}},
    ])
    stats = run(cfg, log=lambda *a: None)
    return tmp, cfg, stats, {"ml": n_ml, "az": n_az, "food": 7567, "foodpq": 3000}


def test_every_row_accounted_per_source(merged):
    tmp, cfg, stats, n_in = merged
    assert stats["input_rows"] == sum(n_in.values())
    assert stats["kept"] + stats["rejected"] == stats["input_rows"]
    per_file = stats["per_file"]
    assert per_file[str(FOOD)]["input_rows"] == 7567
    assert per_file[str(tmp / "reviews.jsonl.gz")]["input_rows"] == n_in["az"]
    reasons = stats["rejected_by_reason"]
    assert reasons["malformed_row"] == 2 and reasons["duplicate"] >= 1
    assert reasons["rating_out_of_range"] >= 1 and reasons["missing_user"] >= 1
    rejects = PreparedData.open(tmp / "out").rejects_pandas()
    assert rejects["reason"].value_counts().to_dict() == reasons
    assert (rejects.loc[rejects["reason"] == "malformed_row", "text"].str.contains("not json|3,2,4.0")).all()


def test_sources_are_namespaced_and_normalised(merged):
    tmp, cfg, stats, _ = merged
    data = PreparedData.open(tmp / "out")
    inter = data.interactions_pandas()
    assert set(inter["source"]) == {"ml", "az", "food", "foodpq"}
    for src in ("ml", "az", "food", "foodpq"):
        part = inter[inter["source"] == src]
        assert part["user"].str.startswith(src + ":").all() and part["item"].str.startswith(src + ":").all()
    assert inter["rating"].between(1.0, 5.0).all()
    az = inter[inter["source"] == "az"]
    assert az["text"].str.match(r"^Tasty & cheap, item \d really$").all()
    assert inter.loc[inter["source"] == "foodpq", "text"].isna().all()  # no text column mapped: null, not ""
    assert "review" in data.families and "explanation" in data.families
    assert set(data.manifest["review_sources"]) == {"az", "food"}
    cat = data.catalog
    assert cat.loc[cat["source"] == "ml", "title"].str.startswith("Movie").all()


def test_cli_preview_prints_every_family(merged, capsys):
    tmp, cfg, _, _ = merged
    assert main(["prepare", "--out", str(tmp / "out"), "--skip-existing", "--preview", "1"]) == 0
    out = capsys.readouterr().out
    for fam in ("rating", "sequential", "explanation", "review", "direct"):
        assert f"[{fam} / {fam}-" in out
    assert "input rows" in out


def test_collaborative_and_random_indexing(ray_session, tmp_path):
    ml = tmp_path / "ml"
    write_movielens(ml, n_users=40, n_items=30)
    for scheme in ("collaborative", "random"):
        out = tmp_path / scheme
        cfg = PrepareConfig(out=str(out), k_core=3, indexing=scheme, collab_leaf_size=8, collab_clusters=4,
                            sources=[{"type": "movielens", "path": str(ml)}])
        run(cfg, log=lambda *a: None)
        cat = PreparedData.open(out).catalog
        assert cat["id_text"].is_unique and len(cat) == 30
        if scheme == "collaborative":
            assert cat["id_text"].str.fullmatch(r"(<[a-z]\d+>)+").all()
        seqs = PreparedData.open(out).sequences_pandas()
        assert all(len(a) == len(b) for a, b in zip(seqs["ids"], seqs["items"]))


def _events(n_users=8, n_items=6):
    return [(f"u{u}", f"i{i}", 1 + (u + i) % 5, 1_600_000_000 + 3600 * (u * n_items + i), f"good, cheap, item {i}")
            for u in range(n_users) for i in range(n_items)]


def test_tab_separated_and_other_delimiters(ray_session, tmp_path, capsys):
    """A .tsv.gz table is read as tab-separated (commas inside fields are text), a record with the wrong
    number of fields is rejected as malformed and counted; --delimiter reads any other separator."""
    rows = _events()
    tsv = tmp_path / "events.tsv.gz"
    with gzip.open(tsv, "wt") as f:
        f.write("uid\titem_id\tstars\ttime\tnote\n")
        f.writelines("\t".join(map(str, r)) + "\n" for r in rows)
        f.write("u1\ti2\n")  # too few fields
    cols = "user=uid,item=item_id,rating=stars,ts=time,text=note"
    assert main(["prepare", "--out", str(tmp_path / "t"), "--k-core", "2", "--table", str(tsv), "--columns", cols]) == 0
    data = PreparedData.open(tmp_path / "t")
    assert data.stats["kept"] == len(rows) and data.stats["rejected_by_reason"] == {"malformed_row": 1}
    texts = data.interactions_pandas(columns=["text"])["text"]
    assert texts.str.startswith("good, cheap, item").all()
    semi = tmp_path / "events.csv"
    semi.write_text("uid;item_id;stars;time;note\n" + "".join(";".join(map(str, r)) + "\n" for r in rows))
    assert main(["prepare", "--out", str(tmp_path / "s"), "--k-core", "2", "--table", str(semi), "--columns", cols,
                 "--delimiter", ";"]) == 0
    assert PreparedData.open(tmp_path / "s").stats["kept"] == len(rows)
    capsys.readouterr()
    # read with the wrong separator, the columns are not there: one message, before any work
    assert main(["prepare", "--out", str(tmp_path / "w"), "--table", str(semi), "--columns", cols]) == 2
    assert "missing column(s)" in capsys.readouterr().err and not (tmp_path / "w").exists()
