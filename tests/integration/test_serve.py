"""recflm serve end to end over HTTP: a real Serve application on a free loopback port, serving the
tiny bundle. Every endpoint, a table of bad requests, the metrics on Ray's export port, a replica
killed under load, a rollout of a second bundle under load, and bearer-token auth."""
import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest

from recflm.runtime import free_port
from recflm.serve import ServeConfig, run

pytestmark = pytest.mark.integration

APP = "recflm-test"


def _config(bundle, **kw) -> ServeConfig:
    base = dict(bundle=str(bundle), name=APP, host="127.0.0.1", port=free_port(), num_cpus=0.25, api_cpus=0.1,
                threads=1, beams=10, default_k=5, max_history=30, max_body_bytes=4096, max_review_chars=250, max_batch_size=8,
                max_ongoing_requests=16, target_ongoing_requests=4, min_replicas=2, max_replicas=2,
                upscale_delay_s=30, explain_tokens=8, explain_beams=2, auth_token_env="")
    return ServeConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def served(ray_session, tiny_bundle):
    from ray import serve

    bundle, _ = tiny_bundle
    cfg = _config(bundle)
    url = run(cfg, log=lambda *a: None)
    catalog = pd.read_parquet(Path(bundle) / "items.parquet")
    with httpx.Client(base_url=url, timeout=60) as client:
        info = client.get("/v1/model").json()
        yield {"url": url, "cfg": cfg, "client": client, "catalog": catalog, "info": info, "bundle": Path(bundle),
               "metrics_port": ray_session["metrics_port"]}
    # the whole of Serve goes with this module: an idle controller and proxies would slow the tests after it
    serve.shutdown()


def _known_user(served):
    from recflm.dataset import PreparedData

    data = PreparedData.open(served["info"]["manifest"]["data"]["path"])
    seqs = data.sequences_pandas(columns=["user", "index", "n_train"])
    user, index, n = seqs.iloc[0]
    return str(user), [int(i) for i in index[:int(n)]]


def test_endpoints(served):
    from recflm.bundle import load_bundle
    from recflm.generate import CatalogTrie, ConstrainedBeamSearch
    from recflm.prompts import load_templates

    c, catalog = served["client"], served["catalog"]
    assert c.get("/v1/health").json()["status"] == "ok"
    info = served["info"]
    assert info["manifest"] == json.loads((served["bundle"] / "manifest.json").read_text())
    assert info["items"] == len(catalog) and info["known_users"] > 0 and info["auth"] is False
    schema = c.get("/openapi.json").json()
    assert {"/v1/recommend", "/v1/rating", "/v1/explain", "/v1/items/{item}", "/v1/model", "/v1/health"} <= \
        set(schema["paths"])
    assert schema["components"]["schemas"]["RecommendRequest"]["properties"]["k"]["maximum"] == 10

    # a known user: its training history from the dataset, seen items excluded, catalog items only
    user, hist = _known_user(served)
    r = c.post("/v1/recommend", json={"user": user, "k": 5})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["known_user"] and out["history_source"] == "training data" and out["history_length"] == len(hist)
    assert [it["rank"] for it in out["items"]] == [1, 2, 3, 4, 5]
    keys = set(catalog["item"])
    got = [it["index"] for it in out["items"]]
    assert all(it["item"] in keys for it in out["items"]) and not set(got) & set(hist)
    # the same answer as the constrained search run here on the prompt evaluate would render
    b = load_bundle(served["bundle"])
    ids = list(b.catalog.sort_values("index")["id_text"])
    temp = next(t for t in load_templates(b.templates_dir)["sequential"] if not t.held_out)
    prompt, _ = temp.render({"user": user, "history": ", ".join(ids[i] for i in hist[-20:]), "item": ""})
    items, _ = ConstrainedBeamSearch(b.model, CatalogTrie.from_catalog(b.tokenizer, ids)).search(
        b.tokenizer.encode_batch([prompt], 256), beams=10, k=5, exclude=[hist])
    assert got == items[0].tolist()

    # a user never seen in training, from its history alone; k and exclusion honoured
    history = [str(k) for k in catalog.sort_values("index")["item"][:4]]
    r = c.post("/v1/recommend", json={"user": "brand-new", "history": history, "k": 3})
    out = r.json()
    assert r.status_code == 200 and not out["known_user"] and out["history_source"] == "request"
    assert len(out["items"]) == 3 and not {it["item"] for it in out["items"]} & set(history)
    r = c.post("/v1/recommend", json={"history": history, "k": 10, "exclude_seen": False})
    assert r.status_code == 200 and len(r.json()["items"]) == 10

    item = out["items"][0]["item"]
    r = c.post("/v1/rating", json={"user": user, "item": item})
    assert r.status_code == 200, r.text
    rating = r.json()
    lo, hi = rating["scale"]
    # the tiny model is barely trained: either a number on the scale or a clear parse error, never a crash
    assert (rating["rating"] is not None and lo <= rating["rating"] <= hi) or \
        (rating["rating"] is None and "not a number" in rating["parse_error"])
    r = c.post("/v1/explain", json={"user": "brand-new", "item": item})
    assert r.status_code == 200 and isinstance(r.json()["explanation"], str) and not r.json()["known_user"]
    r = c.get(f"/v1/items/{item}")
    row = catalog[catalog["item"] == item].iloc[0]
    assert r.status_code == 200 and r.json()["index"] == int(row["index"]) and r.json()["id"] == row["id_text"]
    assert r.json().get("title") == row["title"]


def test_auth_off_is_logged(served):
    import ray

    logs = Path(ray._private.worker.global_worker.node.get_session_dir_path()) / "logs" / "serve"
    text = "".join(p.read_text(errors="replace") for p in logs.glob(f"replica_{APP}_*.log"))
    assert "authentication is OFF" in text


def _chunks(data: bytes):
    for i in range(0, len(data), 1000):
        yield data[i:i + 1000]


def test_bad_requests(served):
    c, catalog = served["client"], served["catalog"]
    user, _ = _known_user(served)
    items = [str(k) for k in catalog["item"]]
    item = items[0]
    big = json.dumps({"user": user, "pad": "x" * 5000}).encode()
    cases = [  # (method, path, json body or raw bytes, headers, status, reason, words in the message)
        ("POST", "/v1/recommend", {"history": [item, "nope:1", "nope:2"]}, {}, 404, "unknown_item", ["history", "'nope:1'", "'nope:2'"]),
        ("POST", "/v1/recommend", {"user": user, "k": 0}, {}, 422, "out_of_range", ["k", "greater than or equal to 1"]),
        ("POST", "/v1/recommend", {"user": user, "k": 11}, {}, 422, "out_of_range", ["k", "less than or equal to 10"]),
        ("POST", "/v1/recommend", {"history": items[:31]}, {}, 422, "too_long", ["history", "at most 30"]),
        ("POST", "/v1/recommend", {"history": []}, {}, 422, "too_short", ["history"]),
        ("POST", "/v1/recommend", b'{"user": "ml:1", ', {}, 400, "malformed_json", ["body", "JSON"]),
        ("POST", "/v1/recommend", b"\xff\xfe\x00", {}, 400, "malformed_json", ["body"]),
        ("POST", "/v1/recommend", big, {}, 413, "body_too_large", ["body", "4096"]),
        ("POST", "/v1/recommend", _chunks(big), {}, 413, "body_too_large", ["body", "4096"]),
        ("POST", "/v1/recommend", {"user": user, "k": "10"}, {}, 422, "wrong_type", ["k", "integer", "'10'"]),
        ("POST", "/v1/recommend", {"user": user, "k": 2.5}, {}, 422, "wrong_type", ["k", "integer"]),
        ("POST", "/v1/recommend", {"user": 5}, {}, 422, "wrong_type", ["user", "string"]),
        ("POST", "/v1/recommend", {"history": item}, {}, 422, "wrong_type", ["history", "list"]),
        ("POST", "/v1/recommend", {"user": user, "exclude_seen": "yes"}, {}, 422, "wrong_type", ["exclude_seen"]),
        ("POST", "/v1/recommend", [user], {}, 422, "wrong_type", ["body"]),
        ("POST", "/v1/recommend", {"user": "never-seen-user"}, {}, 404, "unknown_user", ["user", "'never-seen-user'", "history"]),
        ("POST", "/v1/recommend", {}, {}, 422, "missing_field", ["user", "history"]),
        ("POST", "/v1/recommend", {"user": user, "kk": 3}, {}, 422, "unknown_field", ["kk"]),
        ("POST", "/v1/recommend", b'{"user": "x"}', {"content-type": "text/plain"}, 415, "unsupported_media_type", ["content-type", "application/json"]),
        ("POST", "/v1/rating", {"user": user}, {}, 422, "missing_field", ["item", "required"]),
        ("POST", "/v1/rating", {"user": user, "item": "nope:9"}, {}, 404, "unknown_item", ["item", "'nope:9'"]),
        ("POST", "/v1/explain", {"user": "", "item": item}, {}, 422, "too_short", ["user"]),
        ("POST", "/v1/explain", {"user": "u" * 201, "item": item}, {}, 422, "too_long", ["user", "200"]),
        ("GET", "/v1/items/nope:7", None, {}, 404, "unknown_item", ["item", "'nope:7'"]),
        ("GET", "/v1/recommend", None, {}, 405, "method_not_allowed", ["/v1/recommend"]),
        ("GET", "/v1/nothing-here", None, {}, 404, "not_found", ["/v1/nothing-here"]),
    ]
    for method, path, body, headers, status, reason, words in cases:
        kw = {"headers": headers}
        if isinstance(body, (dict, list)):
            kw["json"] = body
        elif body is not None:
            kw["content"] = body
            kw["headers"] = {"content-type": "application/json", **headers}
        r = c.request(method, path, **kw)
        assert r.status_code == status, (method, path, r.status_code, r.text)
        out = r.json()
        assert out["error"] == reason, (path, body, out)
        for w in words:
            assert w in out["message"], (path, w, out)
    assert c.get("/v1/recommend").headers.get("allow") == "POST"  # a 405 says what is allowed
    # nothing above crashed anything: the service still answers
    assert c.get("/v1/health").status_code == 200
    assert c.post("/v1/recommend", json={"user": user, "k": 2}).status_code == 200


def _scrape(port: int) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out: dict = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def _value(m: dict, name: str, **labels) -> float:
    return sum(v for lab, v in m.get(name, []) if all(lab.get(k) == str(x) for k, x in labels.items()))


def test_metrics(served):
    c = served["client"]
    user, _ = _known_user(served)
    for _ in range(3):
        assert c.post("/v1/recommend", json={"user": user, "k": 4}).status_code == 200
    assert c.post("/v1/recommend", json={"history": ["nope:1"]}).status_code == 404
    want = {  # name -> labels that must be on a sample with a positive value
        "ray_recflm_requests_total": {"endpoint": "/v1/recommend", "status": "200", "application": APP},
        "ray_recflm_invalid_requests_total": {"endpoint": "/v1/recommend", "reason": "unknown_item"},
        "ray_recflm_items_returned_total": {"endpoint": "/v1/recommend"},
        "ray_recflm_request_latency_ms_count": {"endpoint": "/v1/recommend"},
        "ray_recflm_batch_size_count": {"task": "recommend", "deployment": "Recommender"},
        "ray_recflm_model_info": {"bundle": str(served["bundle"].resolve()),
                                  "model_version": served["info"]["model_version"]},
        "ray_serve_num_http_requests_total": {"application": APP},
    }
    deadline = time.time() + 40
    while True:
        m = _scrape(served["metrics_port"])
        missing = [n for n, lab in want.items() if _value(m, n, **lab) <= 0]
        if not missing or time.time() > deadline:
            break
        time.sleep(1)
    assert not missing, f"metrics not exported: {missing}"
    assert _value(m, "ray_recflm_items_returned_total", endpoint="/v1/recommend") >= 12
    assert _value(m, "ray_recflm_requests_total", endpoint="/v1/recommend", status="404") >= 1
    assert any(lab.get("le") == "+Inf" for lab, _ in m["ray_recflm_batch_size_bucket"])


def test_the_openapi_spec_is_the_contract(served, tmp_path):
    """schemathesis, as a user's team would run it, against the running service: every check, its
    examples, coverage and fuzzing phases with a bounded number of cases, zero failures. The spec must
    declare every status the service answers with and its error schema, say what validation enforces
    (user or history, k's range, the body limit) and 405 must carry Allow."""
    out = _schemathesis(served, tmp_path)
    assert "passed" in out and "failed" not in out.split("SUMMARY")[-1].lower(), out[-8000:]


# schemathesis's negative-data check counts only some 4xx as a rejection, not 413: a schema-violating body that is
# also over max_body_bytes (a long string of escaped characters) is refused with 413 before it is parsed, which is
# a rejection. Its other checks keep their defaults (a schema-valid body answered 413 still fails them).
SCHEMATHESIS_TOML = """[checks.negative_data_rejection]
expected-statuses = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429, "5xx"]
"""


def _schemathesis(served, tmp_path, *extra) -> str:
    """Runs schemathesis as a user's team would against the served spec (every check; the examples, coverage and
    fuzzing phases, a bounded number of cases, a fixed seed), asserts zero failures and returns its output."""
    import subprocess
    import sys

    exe = shutil.which("schemathesis") or str(Path(sys.executable).with_name("schemathesis"))
    if not Path(exe).exists():
        pytest.fail("schemathesis is not installed: it is a test dependency (make venv)")
    conf = tmp_path / "schemathesis.toml"
    conf.write_text(SCHEMATHESIS_TOML)
    proc = subprocess.run([exe, "--config-file", str(conf), "run", f"{served['url']}/openapi.json",
                           "--checks", "all", *extra,
                           "--phases", "examples,coverage,fuzzing", "--max-examples", "12", "--seed", "7",
                           "--workers", "1", "--generation-database", "none", "--no-color", "--request-timeout", "60",
                           "--suppress-health-check", "all", "--warnings", "off"],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    tail = proc.stdout[-8000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    return proc.stdout


def _stream(url: str, body: dict, stop: threading.Event, results: list, headers=None):
    """A client that records every answer, whatever it is: (time, status or -1, the model version of a 200,
    else the error reason of a JSON body, "not JSON: ..." for any other body, or the connection error),
    plus the answer's Retry-After header."""
    with httpx.Client(base_url=url, timeout=60, headers=headers or {}) as c:
        while not stop.is_set():
            try:
                r = c.post("/v1/recommend", json=body)
            except httpx.HTTPError as e:
                results.append((time.time(), -1, type(e).__name__, None))
                continue
            try:
                out = r.json()
                what = out.get("model_version") if r.status_code == 200 else out.get("error")
            except ValueError:
                what = f"not JSON: {r.headers.get('content-type')} {r.text[:40]!r}"
            results.append((time.time(), r.status_code, what, r.headers.get("retry-after")))


def _streams(url: str, body: dict, n: int = 3):
    """``n`` client threads sending ``body`` in a loop until ``stop`` is set: (stop, results, threads)."""
    stop, results = threading.Event(), []
    threads = [threading.Thread(target=_stream, args=(url, body, stop, results)) for _ in range(n)]
    for t in threads:
        t.start()
    return stop, results, threads


def _replicas(deployment: str, app: str = APP) -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::{app}#{deployment}#"))


def _kill_a_model_replica_under_load(url: str, body: dict, app: str = APP):
    """Three client streams; one Recommender replica killed; wait until it is replaced and a request after
    the kill succeeded: (kill time, results of the streams)."""
    import ray

    before = _replicas("Recommender", app)
    assert before
    stop, results, threads = _streams(url, body)
    time.sleep(1.5)
    killed_at = time.time()
    ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
    deadline = time.time() + 60
    while time.time() < deadline and (before[0] in _replicas("Recommender", app) or not _replicas("Recommender", app)
                                      or not [r for r in results if r[0] > killed_at + 1 and r[1] == 200]):
        time.sleep(0.5)
    time.sleep(2)
    stop.set()
    for t in threads:
        t.join()
    after = _replicas("Recommender", app)
    assert before[0] not in after and after, (before, after)
    assert [r[1] for r in results].count(200) > 10
    # the service recovered: everything after the replacement succeeded
    assert all(r[1] == 200 for r in results[-5:])
    return killed_at, results


def test_replica_killed_under_load_loses_no_request(served):
    """Two model replicas behind the ingress (layout auto: split): one is killed under load and every
    request succeeds, those in flight at the kill included: the ingress replays a call whose replica died on
    the other replica (every endpoint is read-only)."""
    assert served["cfg"].layout == "auto" and served["info"]["limits"]["layout"] == "split"
    user, _ = _known_user(served)
    killed_at, results = _kill_a_model_replica_under_load(served["url"], {"user": user, "k": 3})
    failed = [(round(r[0] - killed_at, 2), *r[1:]) for r in results if r[1] != 200]
    assert len(results) > 10 and not failed, failed
    assert served["client"].post("/v1/recommend", json={"user": user}).status_code == 200


def test_fused_layout_answers_as_the_split_one(served):
    """The fused layout (each replica the ingress and the model: the most throughput, no replay of a killed
    replica's requests) serves the same answers and the same contract."""
    from ray import serve

    app = APP + "-fused"
    cfg = _config(served["bundle"], name=app, route_prefix="/fused", port=served["cfg"].port, layout="fused",
                  min_replicas=1, max_replicas=1)
    url = run(cfg, log=lambda *a: None)
    try:
        user, _ = _known_user(served)
        body = {"user": user, "k": 3}
        with httpx.Client(base_url=url, timeout=60) as c:
            assert c.get("/v1/model").json()["limits"]["layout"] == "fused"
            r = c.post("/v1/recommend", json=body)
            assert r.status_code == 200
            assert r.json()["items"] == served["client"].post("/v1/recommend", json=body).json()["items"]
            bad = c.post("/v1/recommend", json={"user": user, "k": 500})
            assert bad.status_code == 422 and bad.json()["field"] == "k"
        assert _replicas("Recommender", app) and not _replicas("Api", app)
    finally:
        serve.delete(app)


def test_one_replica_lost_answers_json_503_with_retry_after(served):
    """One model replica: layout auto is split, and while the killed replica is replaced the ingress answers
    a JSON 503 with Retry-After (never a 500, an HTML or text page, a dropped connection or a hang)."""
    from ray import serve

    app = APP + "-one"
    cfg = _config(served["bundle"], name=app, route_prefix="/one", port=served["cfg"].port, min_replicas=1,
                  max_replicas=1)
    url = run(cfg, log=lambda *a: None)
    try:
        user, _ = _known_user(served)
        with httpx.Client(base_url=url, timeout=60) as c:
            info = c.get("/v1/model").json()
            assert info["limits"]["layout"] == "split"
            assert c.post("/v1/recommend", json={"user": user, "k": 2}).status_code == 200
            r = c.post("/v1/recommend", json={"user": user, "k": 500})
            assert r.status_code == 422 and r.json()["field"] == "k"
        assert _replicas("Api", app) and _replicas("Recommender", app)
        _, results = _kill_a_model_replica_under_load(url, {"user": user, "k": 3}, app)
        failed = [r for r in results if r[1] != 200]
        assert all(code == 503 and why in ("unavailable", "overloaded") and retry is not None and int(retry) > 0
                   for _, code, why, retry in failed), failed
    finally:
        serve.delete(app)


def test_rollout_of_a_second_bundle_without_failed_requests(served, tmp_path):
    second = tmp_path / "second"
    shutil.copytree(served["bundle"], second)
    manifest = json.loads((second / "manifest.json").read_text())
    (second / "manifest.json").write_text(json.dumps({**manifest, "rollout": "second bundle"}))
    user, _ = _known_user(served)
    old_version = served["info"]["model_version"]
    stop, results, threads = _streams(served["url"], {"user": user, "k": 3})
    time.sleep(1)
    cfg = served["cfg"]
    run(ServeConfig(**{**cfg.__dict__, "bundle": str(second)}), log=lambda *a: None)
    time.sleep(2)
    stop.set()
    for t in threads:
        t.join()
    codes = [r[1] for r in results]
    versions = [r[2] for r in results]
    assert codes and set(codes) == {200}, sorted(set(codes))
    info = served["client"].get("/v1/model").json()
    assert info["bundle"] == str(second.resolve()) and info["model_version"] != old_version
    assert old_version in versions and versions[-1] == info["model_version"]


def test_rollout_of_an_incrementally_updated_bundle_without_failed_requests(served, updated_bundle):
    """A bundle served, then the one fine-tuned from it on its `prepare --update` dataset (catalog=extend) rolled
    out under load: every request is answered 200 and the new items are served after it."""
    from ray import serve

    base, updated = updated_bundle
    app = APP + "-update"
    cfg = _config(base, name=app, route_prefix="/upd", port=served["cfg"].port, min_replicas=1, max_replicas=1)
    url = run(cfg, log=lambda *a: None)
    try:
        new_items = pd.read_parquet(Path(updated) / "items.parquet")
        n_base = len(pd.read_parquet(Path(base) / "items.parquet"))
        with httpx.Client(base_url=url, timeout=60) as c:
            before = c.get("/v1/model").json()
            assert before["items"] == n_base and c.get(f"/v1/items/{new_items['item'].iloc[-1]}").status_code == 404
            stop, results, threads = _streams(url, {"user": "shop:u0", "k": 3})  # a user of both datasets
            time.sleep(1)
            run(ServeConfig(**{**cfg.__dict__, "bundle": str(updated)}), log=lambda *a: None)
            time.sleep(2)
            stop.set()
            for t in threads:
                t.join()
            codes = [r[1] for r in results]
            assert codes and set(codes) == {200}, sorted(set(codes))
            info = c.get("/v1/model").json()
            assert info["bundle"] == str(Path(updated).resolve()) and info["items"] == len(new_items) > n_base
            assert before["model_version"] in [r[2] for r in results] and results[-1][2] == info["model_version"]
            assert c.get(f"/v1/items/{new_items['item'].iloc[-1]}").status_code == 200
    finally:
        serve.delete(app)


def test_reconfigure_swaps_bundles_in_place(served, tmp_path):
    """The path `serve deploy` takes when only the bundle changes: user_config -> reconfigure."""
    from recflm.serve_model import Recommender

    second = tmp_path / "b2"
    shutil.copytree(served["bundle"], second)
    (second / "manifest.json").write_text(json.dumps({**served["info"]["manifest"], "rollout": "in place"}))
    r = Recommender(served["cfg"])
    r.reconfigure({"bundle": str(served["bundle"]), "data": ""})
    first = r.info()["model_version"]
    r.reconfigure({"bundle": str(second), "data": ""})
    assert r.info()["model_version"] != first and r.info()["bundle"] == str(second.resolve())
    # the swapped-in state answers (the batched call itself needs a Serve replica: covered over HTTP)
    found = r._search([(r.state, "Here is the history of user_x: 1, 2. What to recommend next?", {0}, 3)])
    assert len(found[0]) == 3 and all(0 < i < len(r.state.ids) for i, _ in found[0])


def test_auth(served, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    cfg = served["cfg"]
    run(ServeConfig(**{**cfg.__dict__, "auth_token_file": str(token)}), log=lambda *a: None)
    try:
        c = served["client"]
        user, _ = _known_user(served)
        body = {"user": user, "k": 2}
        r = c.post("/v1/recommend", json=body)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized" and "Bearer" in r.json()["message"]
        assert r.headers["www-authenticate"] == "Bearer"
        r = c.post("/v1/recommend", json=body, headers={"authorization": "Bearer wrong"})
        assert r.status_code == 401 and "wrong bearer token" in r.json()["message"]
        assert c.get("/v1/model").status_code == 401
        ok = {"authorization": "Bearer s3cret-token"}
        assert c.post("/v1/recommend", json=body, headers=ok).status_code == 200
        assert c.get("/v1/model", headers=ok).json()["auth"] is True
        assert c.get("/v1/health").status_code == 200  # probes need no token
    finally:  # later tests talk to the service without a token
        run(cfg, log=lambda *a: None)


def test_candidates_endpoint(served, tmp_path):
    """POST /v1/candidates: 404 no_candidate_model until `recflm candidates` trained one into the bundle, then the
    two-tower's top k (the scores a loaded copy computes here), validated like /v1/recommend, and the spec still
    the contract (schemathesis on the route with a candidate model served)."""

    import numpy as np

    from recflm.baselines import TwoTower
    from recflm.candidates import CandidatesConfig, run as train_candidates

    c, catalog, cfg = served["client"], served["catalog"], served["cfg"]
    user, hist = _known_user(served)
    r = c.post("/v1/candidates", json={"user": user, "k": 3})
    assert r.status_code == 404 and r.json()["error"] == "no_candidate_model", r.text
    assert "recflm candidates --bundle" in r.json()["message"]

    second = tmp_path / "with_candidates"
    shutil.copytree(served["bundle"], second)
    (second / "manifest.json").write_text(json.dumps({**served["info"]["manifest"], "rollout": "candidates"}))
    train_candidates(CandidatesConfig(bundle=str(second), dim=16, epochs=2, minutes=1, negatives=128),
                     log=lambda *a: None)
    assert (second / "candidates.safetensors").is_file() and (second / "candidates.json").is_file()
    run(ServeConfig(**{**cfg.__dict__, "bundle": str(second)}), log=lambda *a: None)
    try:
        info = c.get("/v1/model").json()
        assert info["bundle"] == str(second.resolve()) and info["candidates"]["model"] == "two-tower"
        assert info["limits"]["max_candidates"] == cfg.max_candidates == 200
        schema = c.get("/openapi.json").json()
        assert schema["components"]["schemas"]["CandidatesRequest"]["properties"]["k"]["maximum"] == 200

        # a known user: its training history, the history excluded, best first, as the loaded model scores it
        r = c.post("/v1/candidates", json={"user": user, "k": 7})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["history_source"] == "training data" and out["known_user"] and out["history_length"] == len(hist)
        assert [it["rank"] for it in out["items"]] == list(range(1, 8))
        got = [it["index"] for it in out["items"]]
        assert not set(got) & set(hist) and all(it["item"] in set(catalog["item"]) for it in out["items"])
        scores = [it["score"] for it in out["items"]]
        assert scores == sorted(scores, reverse=True)
        s = TwoTower.load(second).scores([hist])[0]
        s[hist] = -np.inf
        assert set(got) == set(np.argsort(-s, kind="stable")[:7].tolist()) or \
            np.allclose(sorted(s[got]), sorted(np.sort(s)[::-1][:7]), atol=1e-4)  # ties may swap places
        # a new user's history; the default k is max_candidates; exclude_history honoured
        history = [str(k) for k in catalog.sort_values("index")["item"][:4]]
        r = c.post("/v1/candidates", json={"user": "brand-new", "history": history})
        assert r.status_code == 200 and len(r.json()["items"]) == 200 and not r.json()["known_user"]
        assert not {it["item"] for it in r.json()["items"]} & set(history)
        r = c.post("/v1/candidates", json={"history": history, "k": 50, "exclude_history": False})
        assert r.status_code == 200 and len(r.json()["items"]) == 50
        r = c.post("/v1/candidates", json={"history": history, "k": 3.0})  # JSON Schema's integer includes 3.0
        assert r.status_code == 200 and len(r.json()["items"]) == 3, r.text

        big = json.dumps({"user": user, "pad": "x" * 5000}).encode()
        for body, status, reason, words in [
            ({"history": [history[0], "nope:1"]}, 404, "unknown_item", ["history", "'nope:1'"]),
            ({"user": "never-seen-user"}, 404, "unknown_user", ["user", "history"]),
            ({"user": user, "k": 0}, 422, "out_of_range", ["k", "greater than or equal to 1"]),
            ({"user": user, "k": 201}, 422, "out_of_range", ["k", "less than or equal to 200"]),
            ({"user": user, "k": 2.5}, 422, "wrong_type", ["k", "integer"]),
            ({}, 422, "missing_field", ["user", "history"]),
            ({"user": user, "exclude_seen": True}, 422, "unknown_field", ["exclude_seen"]),
            (big, 413, "body_too_large", ["body", "4096"]),
        ]:
            r = c.post("/v1/candidates", **({"json": body} if isinstance(body, dict) else
                                            {"content": body, "headers": {"content-type": "application/json"}}))
            assert r.status_code == status and r.json()["error"] == reason, (body, r.status_code, r.text)
            assert all(w in r.json()["message"] for w in words), (body, r.json())

        _schemathesis(served, tmp_path, "--include-path", "/v1/candidates")
    finally:
        run(ServeConfig(**{**cfg.__dict__, "bundle": str(served["bundle"])}), log=lambda *a: None)
