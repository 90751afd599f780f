"""The review family end to end on a slice of the Amazon Fine Food sample (../shared; skipped without it):
prepare holds short-history users out whole and yields review rows, a tiny review-trained bundle, and
POST /v1/review: 409 on a bundle without the review family, 200 on one with it, bad requests refused."""
import gzip
from pathlib import Path

import httpx
import pytest

from recflm.runtime import free_port
from recflm.serve import ServeConfig, run

pytestmark = pytest.mark.integration

FINEFOOD = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "amazon-fine-food-reviews-sample" / \
    "Reviews_first7567.csv.gz"
ROWS = 800  # the slice: the first rows (products in file order), every column
APP = "recflm-review-test"


@pytest.fixture(scope="module")
def finefood(ray_session, tmp_path_factory):
    from recflm.config import PrepareConfig
    from recflm.prepare import run as prepare

    if not FINEFOOD.exists():
        pytest.skip(f"the Amazon Fine Food sample is not at {FINEFOOD} (../shared is absent)")
    tmp = tmp_path_factory.mktemp("finefood")
    with gzip.open(FINEFOOD, "rt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(ROWS + 1)]
    (tmp / "reviews.csv").write_text("".join(lines).rstrip("\n"), encoding="utf-8")
    cfg = PrepareConfig(out=str(tmp / "data"), k_core=0, holdout_short_users=0.3, sources=[{
        "type": "table", "name": "ff", "path": str(tmp / "reviews.csv"),
        "columns": {"user": "UserId", "item": "ProductId", "rating": "Score", "ts": "Time", "text": "Text",
                    "summary": "Summary"}}])
    cfg.prompts.families = ["rating", "explanation", "review"]
    stats = prepare(cfg, log=lambda *a: None)
    return tmp / "data", cfg, stats


def test_finefood_prepare_holds_short_users_out_and_yields_review_rows(finefood):
    from recflm.augment import example_dataset
    from recflm.dataset import PreparedData

    data_dir, cfg, stats = finefood
    assert stats["input_rows"] == ROWS and stats["kept"] + stats["rejected"] == ROWS
    assert "review" in stats["families"]
    held = stats["held_out_users"]
    assert 0.2 * stats["users"] < held < 0.4 * stats["users"]  # 30% of the (almost all one-off) users
    assert stats["split_rows"]["valid"] > 0 and stats["split_rows"]["test"] > 0
    inter = PreparedData.open(data_dir).interactions_pandas(columns=["user", "item", "split"])
    by_user = inter.groupby("user")["split"].agg(set)
    held_users = set(by_user[by_user.map(lambda s: "train" not in s)].index)
    assert len(held_users) == held
    assert not set(inter.loc[inter["split"] == "train", "user"]) & held_users  # held out whole: leak-free
    test = example_dataset(data_dir, cfg, split="test", families=["review"], log=lambda *a: None).to_pandas()
    assert len(test) > 0 and set(test["family"]) == {"review"} and set(test["user"]) <= held_users
    train = example_dataset(data_dir, cfg, split="train", families=["review"], log=lambda *a: None).to_pandas()
    assert not set(train["user"]) & held_users
    targets = set(train["target"])
    assert any(t.replace(".", "").isdigit() for t in targets)  # star ratings
    assert any(not t.replace(".", "").isdigit() for t in targets)  # summaries


@pytest.fixture(scope="module")
def review_bundle(finefood, tmp_path_factory):
    from recflm.train import TrainConfig, run as train

    data_dir, _, _ = finefood
    tmp = tmp_path_factory.mktemp("review_bundle")
    cfg = TrainConfig(data=str(data_dir), out=str(tmp / "bundle"), storage_path=str(tmp / "runs"), name="review",
                      preset="tiny", workers=0, epochs=1, batch_size=16, vocab_size=600, max_steps=20,
                      log_every=10, checkpoint_every=0, val_examples=16, val_users=0, shuffle_buffer=200,
                      families=["review"])
    return train(cfg, log=lambda *a: None)


@pytest.fixture(scope="module")
def deploy(ray_session):
    """Deploys a bundle on this module's app (one port, auth off, whatever ran before) and returns its URL."""
    from ray import serve

    base = dict(name=APP, host="127.0.0.1", port=free_port(), num_cpus=0.25, api_cpus=0.1, threads=1, beams=5,
                default_k=3, max_history=30, max_body_bytes=16384, max_review_chars=1000, max_batch_size=4,
                max_ongoing_requests=8, target_ongoing_requests=2, min_replicas=1, max_replicas=1, layout="fused",
                explain_tokens=6, explain_beams=1, auth_token_env="", auth_token_file="")

    def go(bundle) -> str:
        return run(ServeConfig(**{**base, "bundle": str(bundle)}), log=lambda *a: None)

    yield go
    serve.delete(APP)


REVIEW = "I have bought several of the Vitality canned dog food products and found them all to be of good quality."


def test_review_route_answers_409_without_the_review_family(deploy, tiny_bundle):
    bundle, _ = tiny_bundle
    url = deploy(bundle)
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/review", json={"text": REVIEW, "task": "summary"})
        assert r.status_code == 409 and r.json()["error"] == "no_review_family" and r.json()["field"] == "task"
        assert r.headers["x-recflm-error"] == "no_review_family"
        info = c.get("/v1/model").json()
        assert info["review_family"] is False and info["limits"]["max_review_chars"] == 1000
        spec = c.get("/openapi.json").json()["paths"]["/v1/review"]["post"]
        assert "409" in spec["responses"] and "422" in spec["responses"]


def test_review_route_summarizes_and_rates_with_a_review_bundle(deploy, review_bundle, finefood):
    from recflm.dataset import PreparedData

    url = deploy(review_bundle)
    item = str(PreparedData.open(finefood[0]).catalog["item"].iloc[0])
    with httpx.Client(base_url=url, timeout=60) as c:
        info = c.get("/v1/model")  # a manifest with NaN metrics (no next-item family) is still JSON
        assert info.status_code == 200, info.text
        assert info.json()["review_family"] is True
        r = c.post("/v1/review", json={"text": REVIEW, "task": "summary", "user": "ff:someone", "item": item})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["task"] == "summary" and isinstance(out["summary"], str) and out["template"] == "review-4"
        r = c.post("/v1/review", json={"text": REVIEW, "task": "rating"})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["task"] == "rating" and out["scale"] == [1.0, 5.0] and out["template"] == "review-3"
        assert out["rating"] is not None and 1.0 <= out["rating"] <= 5.0
        assert c.post("/v1/review", json={"text": REVIEW}).json()["template"] == "review-2"  # summary, text only
        # validated like the other routes: JSON errors with a reason and the field
        for body, status, reason, field in [
                ({"task": "summary"}, 422, "missing_field", "text"),
                ({"text": ""}, 422, "too_short", "text"),
                ({"text": "x" * 1001}, 422, "too_long", "text"),
                ({"text": REVIEW, "task": "poem"}, 422, "invalid_value", "task"),
                ({"text": REVIEW, "stars": 5}, 422, "unknown_field", "stars"),
                ({"text": 5}, 422, "wrong_type", "text"),
                ({"text": REVIEW, "item": "ff:no-such-item"}, 404, "unknown_item", "item")]:
            r = c.post("/v1/review", json=body)
            assert (r.status_code, r.json()["error"], r.json()["field"]) == (status, reason, field), (body, r.text)
