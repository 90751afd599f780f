"""The serve config without Ray: jobs/serve.yaml as Serve and recflm read it, the checks, the layout policy,
the config being typed and never changed in place, flags on top of a config, and the OpenAPI schema of the
app built from it (the request limits it declares)."""
import argparse
import dataclasses
from pathlib import Path

import pytest

from recflm.config import ConfigError, flags_into
from recflm.serve import FLAGS, ServeConfig, check_config, load_serve_config, resolve_layout

ROOT = Path(__file__).resolve().parents[2]


def test_serve_yaml_is_a_valid_serve_config_and_drives_the_app():
    """jobs/serve.yaml: what `serve deploy` and a RayService's serveConfigV2 accept, and what
    `recflm serve --config` and `python -m jobs.deploy` read."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from recflm.config import ConfigError
    from recflm.serve import app_builder, check_config, load_serve_config

    path = ROOT / "jobs" / "serve.yaml"
    doc = yaml.safe_load(path.read_text())
    schema = ServeDeploySchema.model_validate(doc)
    app = schema.applications[0]
    assert app.import_path == "recflm.serve:app_builder" and "bundle" in app.args
    cfg = load_serve_config(str(path), ["max_replicas=3"])
    assert cfg.bundle == app.args["bundle"] and cfg.port == doc["http_options"]["port"] and cfg.max_replicas == 3
    built = app_builder(app.args)  # builds without Ray running: the ingress of the configured application
    assert built._bound_deployment.name in ("Recommender", "Api")
    with pytest.raises(ConfigError, match="max_ongoing_requests=4 must be >= max_batch_size=16"):
        check_config(ServeConfig(max_ongoing_requests=4, target_ongoing_requests=2))
    with pytest.raises(ConfigError, match="unknown config key nope"):
        load_serve_config(str(path), ["nope=1"])


def test_layout_auto_is_split_whatever_the_ingress(monkeypatch):
    """auto is split (the ingress replays a lost model replica's calls), behind HAProxy or not, with one or
    more replicas; fused and split are taken as given."""
    for haproxy in ("1", "0"):
        monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", haproxy)
        assert resolve_layout(ServeConfig(min_replicas=2)) == "split" == resolve_layout(ServeConfig(min_replicas=1))
        assert resolve_layout(ServeConfig(layout="fused", min_replicas=2)) == "fused"
    with pytest.raises(ConfigError, match="layout='joint': expected one of auto, fused, split"):
        check_config(ServeConfig(layout="joint"))


def test_the_config_is_typed_and_never_changed_in_place(tmp_path):
    cfg = ServeConfig(bundle="b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.port = 1  # run() derives new configs with dataclasses.replace
    (tmp_path / "serve.yaml").write_text("bundle: runs/x\nmax_replicas: 4\nbeams: 30\n")
    cfg = load_serve_config(str(tmp_path / "serve.yaml"), ["default_k=12"])
    assert (cfg.bundle, cfg.max_replicas, cfg.beams, cfg.default_k) == ("runs/x", 4, 30, 12)
    args = argparse.Namespace(**{f: None for f in FLAGS})
    args.port, args.dtype = 9000, "int8"
    out = flags_into(cfg, args, FLAGS)
    assert (out.port, out.dtype, out.bundle) == (9000, "int8", "runs/x") and cfg.port == 8000
    with pytest.raises(ConfigError, match="default_k=31 must be between 1 and beams=30"):
        check_config(dataclasses.replace(cfg, default_k=31))
    with pytest.raises(ConfigError, match="min_replicas"):
        check_config(dataclasses.replace(cfg, min_replicas=5))
    with pytest.raises(ConfigError, match="threads must be at least 1"):
        check_config(dataclasses.replace(cfg, threads=0))
    with pytest.raises(ConfigError, match="max_review_chars=9000 does not fit in max_body_bytes=8192"):
        check_config(dataclasses.replace(cfg, max_review_chars=9000, max_body_bytes=8192))
    # 1000 characters, each JSON-escaped as a surrogate pair (12 bytes), and the other fields do not fit in 8 KiB
    with pytest.raises(ConfigError, match="needs max_body_bytes >= 13024"):
        check_config(dataclasses.replace(cfg, max_review_chars=1000, max_body_bytes=8192))
    check_config(dataclasses.replace(cfg, max_review_chars=500, max_body_bytes=8192))
    with pytest.raises(ConfigError, match="max_candidates must be at least 1"):
        check_config(dataclasses.replace(cfg, max_candidates=0))


def test_the_openapi_schema_says_what_validation_enforces():
    """The app's schema, built here without Ray or a model: the limits of the config, "user or history",
    and every error status with the error body's schema."""
    from recflm.serve_api import Api, build_fastapi

    cfg = ServeConfig(bundle="b", beams=12, max_history=40, max_id_chars=50, max_body_bytes=2048, auth_token_env="")
    spec = build_fastapi(Api(None, cfg)).openapi()
    rec = spec["components"]["schemas"]["RecommendRequest"]
    assert rec["properties"]["k"]["maximum"] == 12 and rec["properties"]["k"]["minimum"] == 1
    assert rec["properties"]["history"]["anyOf"][0]["maxItems"] == 40
    assert [a["required"] for a in rec["anyOf"]] == [["user"], ["history"]] and rec["additionalProperties"] is False
    assert "2048 bytes" in rec["description"]
    for path, method, statuses in (("/v1/recommend", "post", {"400", "401", "404", "413", "415", "422", "500", "503"}),
                                   ("/v1/items/{item}", "get", {"401", "404", "422", "500", "503"}),
                                   ("/v1/health", "get", {"500", "503"})):
        responses = spec["paths"][path][method]["responses"]
        assert set(responses) == {"200"} | statuses, (path, sorted(responses))
        for s in statuses:
            ref = responses[s]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith("/ErrorBody")
    cand = spec["components"]["schemas"]["CandidatesRequest"]
    assert cand["properties"]["k"]["maximum"] == cfg.max_candidates == 200 and cand["properties"]["k"]["default"] == 200
    assert [a["required"] for a in cand["anyOf"]] == [["user"], ["history"]] and cand["additionalProperties"] is False
    assert set(spec["paths"]["/v1/candidates"]["post"]["responses"]) == \
        {"200", "400", "401", "404", "413", "415", "422", "500", "503"}
    # JSON Schema's integer includes 3.0: both k fields take a whole-number float, and nothing else
    from recflm.serve_api import request_models

    Rec, _, _, Cand = request_models(cfg)
    assert Rec.model_validate({"user": "u", "k": 3.0}).k == 3 and Cand.model_validate({"user": "u", "k": 7.0}).k == 7
    for bad in (2.5, "3", True):
        with pytest.raises(Exception, match="valid integer"):
            Cand.model_validate({"user": "u", "k": bad})
    assert "Retry-After" in spec["paths"]["/v1/rating"]["post"]["responses"]["503"]["headers"]
    review = spec["components"]["schemas"]["ReviewRequest"]
    assert review["properties"]["text"]["maxLength"] == cfg.max_review_chars and review["required"] == ["text"]
    assert review["properties"]["task"]["enum"] == ["summary", "rating"] and review["additionalProperties"] is False
    assert set(spec["paths"]["/v1/review"]["post"]["responses"]) == \
        {"200", "400", "401", "404", "409", "413", "415", "422", "500", "503"}
    assert set(spec["components"]["schemas"]["ErrorBody"]["required"]) == {"error", "field", "message"}
