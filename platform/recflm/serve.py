"""``recflm serve``: a model bundle as an HTTP JSON service on Ray Serve.

Serving lives in three rooms, this one the front door:

- ``serve.py`` (here): ``ServeConfig`` and its checks, the layout and throughput policy, the Serve
  application (``build_app``, ``app_builder`` for Serve config files), ``run`` and the CLI;
- ``serve_model.py``: the model side, ``ModelState`` (one loaded bundle) and ``Recommender`` (batched
  model calls, bundle swaps);
- ``serve_api.py``: the HTTP side, the ingress deployment and its FastAPI app (schemas, errors, auth,
  metrics middleware, routes); ``serve_metrics.py`` the Prometheus metrics; ``serve_client.py`` the
  demo client of ``--demo``.

One Serve application, in one of two layouts (``ServeConfig.layout``):

- ``fused``: one deployment, ``Recommender``, each replica the FastAPI ingress and the model at
  once (``serve_api.Service``): no call between processes per request, the fastest on CPU.
- ``split``: ``Api``, the ingress, in front of ``Recommender``, the model deployment; for model
  replicas on GPUs while the HTTP work scales on CPUs, or an ingress that retries while model
  replicas restart.
- ``auto`` (default): split. A model replica that dies loses no request: the ingress replays the call on
  another model replica (every endpoint is read-only), and with one replica it answers a JSON 503 with
  Retry-After while the replica restarts. Fused behind HAProxy, the requests in flight on a killed replica
  lost their connection in some runs even with HAProxy's replays (``HAPROXY_RETRY_ENV``), and behind
  Serve's Python proxy they were held until the request timeout; fused is for the last bit of throughput
  where that is acceptable.

The config is read and checked once (``load_serve_config``, ``check_config``) and never changed in place:
``run`` derives the deployed config with ``dataclasses.replace`` and the replicas get it typed. The model
gets its bundle through ``user_config`` (``{"bundle", "data"}``), so a new bundle is a reconfigure
(a rollout without failed requests), not a new deployment.

``throughput_mode`` (default on) starts a local Ray with Serve's HAProxy ingress and
throughput-optimized data plane (``THROUGHPUT_ENV``); a cluster takes them from its environment.

Endpoints (``/docs`` shows the OpenAPI schema, the contract)::

    POST /v1/recommend  {"user": "ml:1"} or {"history": ["ml:1", ...]}, "k": 10, "exclude_seen": true
    POST /v1/rating     {"user": "ml:1", "item": "ml:318"}
    POST /v1/explain    {"user": "ml:1", "item": "ml:318"}
    POST /v1/review     {"text": "...", "task": "summary" | "rating", "user"?, "item"?}  (review-family bundles)
    GET  /v1/items/{item}   the catalog entry of an item
    GET  /v1/model          the bundle manifest and the serving settings
    GET  /v1/health         no token needed (probes)

Prompts are rendered with the bundle's own templates, the first seen (not held-out) template of each
family, exactly as ``evaluate.build_rows`` renders them. A known user's history is the training
prefix of its sequence in the dataset the bundle was trained on (``sequences.parquet`` in the
bundle manifest's ``data.path``, or ``data`` in the config); without that dataset only requests
that carry a history work. A user id the model never saw works from the history alone.

The same application is described by ``jobs/serve.yaml`` (``import_path: recflm.serve:app_builder``)
for ``serve deploy`` and a KubeRay RayService.
"""

import argparse
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, flags_into, from_dict

HELP = "serve a model bundle over HTTP with Ray Serve (batched, autoscaling, metrics)"
DTYPES = ("float32", "bfloat16", "int8")
LAYOUTS = ("auto", "fused", "split")
THROUGHPUT_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
# HAProxy replays a request whose replica died before answering (the connection refused, or closed with no
# answer) on another replica. Ray's default retries refused connections only; every recflm endpoint is a
# read-only call (recommend, rating, explain, lookups), safe to send twice, so a lost replica loses no request.
HAPROXY_RETRY_ENV = {"RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response junk-response", "RAY_SERVE_HAPROXY_RETRIES": "3"}


@dataclass(frozen=True)
class ServeConfig:
    bundle: str = "runs/model"  # the model bundle
    data: str = ""  # dataset dir with known users' histories ("" = the bundle manifest's data.path)
    name: str = "recflm"  # Serve application name
    route_prefix: str = "/"
    host: str = "127.0.0.1"  # HTTP proxy address (used when this command starts Serve)
    port: int = 8000  # 0: any free port
    request_timeout_s: float = 60.0
    # requests
    beams: int = 20  # constrained beam width; k may go up to it
    default_k: int = 10
    max_history: int = 200  # items a request's history may hold (the prompt uses the last ones)
    max_id_chars: int = 200  # longest user / item id accepted
    max_body_bytes: int = 65536
    max_review_chars: int = 5000  # longest review text POST /v1/review accepts (the prompt uses its first part)
    max_candidates: int = 200  # the most items POST /v1/candidates returns (its default k)
    explain_tokens: int = 32
    explain_beams: int = 4
    # "fused": one deployment is both the FastAPI ingress and the model (each replica answers HTTP itself: no hop
    # between processes, the fastest on CPU); "split": an ingress deployment (Api) in front of the model deployment
    # (Recommender), for model replicas on GPUs while the HTTP work scales on CPUs, or an ingress that must stay up
    # while model replicas restart. Both hold the model in a deployment named Recommender. "auto": split (a lost
    # model replica loses no request: the ingress replays its calls on another).
    layout: str = "auto"
    # Serve's HAProxy ingress and throughput-optimized data plane (RAY_SERVE_ENABLE_HA_PROXY=1,
    # RAY_SERVE_THROUGHPUT_OPTIMIZED=1) for a Ray this command starts; a running cluster takes them from its
    # nodes' environment at `ray start` (k8s/rayservice.yaml sets them)
    throughput_mode: bool = True
    # model deployment: batching, autoscaling, resources
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01
    max_ongoing_requests: int = 24  # per model replica; >= max_batch_size
    num_cpus: float = 1.0  # CPUs reserved per model replica (fractions allowed)
    threads: int = 1  # torch threads per model replica
    # weights as served: float32 (the trained model exactly), bfloat16 (CPUs with AVX512-BF16 or AMX, GPUs),
    # or int8 (dynamically quantized linear layers, CPU): faster, top-k lists may differ slightly
    dtype: str = "float32"
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 8.0
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 30.0
    look_back_period_s: float = 15.0
    # ingress deployment (layout "split")
    api_replicas: int = 1
    api_cpus: float = 0.25
    api_max_ongoing_requests: int = 256
    # bearer-token auth: from the file if set, else from the env var if set there; otherwise off
    auth_token_env: str = "RECFLM_SERVE_TOKEN"
    auth_token_file: str = ""


REVIEW_BODY_SLACK = 1024  # bytes of a POST /v1/review body beside its text (the other fields, JSON)
# the bytes one character of the text may take in the JSON body: a character outside the BMP, written as an
# escaped surrogate pair ("\ud83d\ude00", what json.dumps sends by default), is 12
REVIEW_BYTES_PER_CHAR = 12


def check_config(cfg: ServeConfig) -> None:
    if not cfg.bundle:
        raise ConfigError("bundle: no bundle given")
    if not 1 <= cfg.default_k <= cfg.beams:
        raise ConfigError(f"default_k={cfg.default_k} must be between 1 and beams={cfg.beams}")
    if cfg.max_ongoing_requests < cfg.max_batch_size:
        raise ConfigError(f"max_ongoing_requests={cfg.max_ongoing_requests} must be >= max_batch_size="
                          f"{cfg.max_batch_size}, or batches never fill")
    if not 0 < cfg.target_ongoing_requests < cfg.max_ongoing_requests:
        raise ConfigError(f"target_ongoing_requests={cfg.target_ongoing_requests} must be above 0 and below "
                          f"max_ongoing_requests={cfg.max_ongoing_requests}, or the deployment never scales up")
    if not 1 <= cfg.min_replicas <= cfg.max_replicas:
        raise ConfigError(f"replicas: need 1 <= min_replicas ({cfg.min_replicas}) <= max_replicas ({cfg.max_replicas})")
    if cfg.layout not in LAYOUTS:
        raise ConfigError(f"layout={cfg.layout!r}: expected one of {', '.join(LAYOUTS)}")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype={cfg.dtype!r}: expected one of {', '.join(DTYPES)}")
    for key in ("num_cpus", "api_cpus"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key} must be positive")
    for key in ("max_history", "max_review_chars", "max_body_bytes", "max_id_chars", "threads", "api_replicas",
                "max_batch_size", "max_candidates"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be at least 1")
    need = cfg.max_review_chars * REVIEW_BYTES_PER_CHAR + REVIEW_BODY_SLACK
    if need > cfg.max_body_bytes:  # the schema would promise what 413 refuses
        raise ConfigError(f"max_review_chars={cfg.max_review_chars} does not fit in max_body_bytes="
                          f"{cfg.max_body_bytes}: a review that long, its characters JSON-escaped (up to "
                          f"{REVIEW_BYTES_PER_CHAR} bytes each), needs max_body_bytes >= {need} "
                          f"(or lower max_review_chars)")


def load_serve_config(path: str | None, overrides: list[str] | None = None) -> ServeConfig:
    """The ServeConfig of a recflm YAML (ServeConfig keys) or of a Serve config file such as ``jobs/serve.yaml``
    (its recflm application's ``args`` plus ``http_options``), overrides on top; the file is read once,
    the keys checked against ServeConfig (unset ones keep its defaults); ``run`` checks the values, once the
    command's flags are on top."""
    from .config import apply_override, read_yaml_mapping

    doc = read_yaml_mapping(path) if path else {}
    if "applications" in doc:  # a Serve config file
        apps = [a for a in doc["applications"] or [] if str(a.get("import_path", "")).startswith("recflm.serve")]
        if not apps:
            raise ConfigError(f"{path}: no application with import_path recflm.serve:app_builder")
        data = {k: v for k, v in (doc.get("http_options") or {}).items() if k in ("host", "port", "request_timeout_s")}
        data.update({"name": apps[0].get("name", "recflm"), "route_prefix": apps[0].get("route_prefix", "/")})
        data.update(apps[0].get("args") or {})
    else:
        data = doc
    for o in overrides or []:
        apply_override(data, o)
    return from_dict(ServeConfig, data)


# ----------------------------------------------------------------------------- layout and throughput
def haproxy_ingress(ray_cluster: bool = False) -> bool:
    """Whether Serve's HTTP ingress is HAProxy: from this process's environment, or (``ray_cluster``) from
    the environment the running Ray cluster's workers inherit from their node (asked with a 0-CPU task)."""
    if not ray_cluster:
        return os.environ.get("RAY_SERVE_ENABLE_HA_PROXY", "0") == "1"
    import ray

    return bool(ray.get(ray.remote(num_cpus=0)(haproxy_ingress).remote(), timeout=120))


def resolve_layout(cfg: "ServeConfig") -> str:
    """``cfg.layout``, with "auto" made split: the ingress replays the calls of a model replica that died on
    another one (0 failed requests with two replicas, a JSON 503 with Retry-After with one). Fused, HAProxy's
    replays (``HAPROXY_RETRY_ENV``) did not always reach the requests in flight on a killed replica, and with
    one replica HAProxy's own answer while it restarts is a plain-text 500."""
    return "split" if cfg.layout == "auto" else cfg.layout


def set_throughput_env() -> None:
    """Put ``THROUGHPUT_ENV`` into this process's environment (unless set already) for a Ray it is about to
    start: Serve's processes inherit it. HAProxy's stats and metrics listeners get free ports rather than their
    fixed defaults (8404, 9101), so that two local Rays on one machine do not share them. A replica that
    leaves drains for 5 s instead of 30: on one node HAProxy hears of it at once, and retries refused
    connections on other replicas."""
    from .runtime import free_port

    for k, v in {**THROUGHPUT_ENV, **HAPROXY_RETRY_ENV}.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "5")
    for k in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):
        os.environ.setdefault(k, str(free_port()))


# ----------------------------------------------------------------------------- building and running
def build_app(cfg: ServeConfig):
    """The Serve application for ``cfg`` (checked: ``run`` and ``app_builder`` check it first): the fused Recommender (ingress and model in one deployment), or
    the Api ingress bound to the Recommender (layout "split"). The replicas get ``cfg`` itself, its layout
    resolved (a Serve config's application builder runs on the cluster, where the environment is the
    nodes' own); the bundle travels in user_config only, so changing it is a reconfigure."""
    from ray import serve

    from .serve_api import Api, Service
    from .serve_model import Recommender

    cfg = dataclasses.replace(cfg, layout=resolve_layout(cfg))
    fused = cfg.layout == "fused"
    model = serve.deployment(
        name="Recommender", max_ongoing_requests=cfg.max_ongoing_requests,
        # glibc's per-thread malloc arenas (batches run in worker threads) grow a replica's memory for
        # hours; two arenas keep it flat (jobs/bench_soak.py)
        ray_actor_options={"num_cpus": cfg.num_cpus, "runtime_env": {"env_vars": {"MALLOC_ARENA_MAX": "2"}}},
        autoscaling_config={"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                            "initial_replicas": cfg.min_replicas,
                            "target_ongoing_requests": cfg.target_ongoing_requests,
                            "upscale_delay_s": cfg.upscale_delay_s, "downscale_delay_s": cfg.downscale_delay_s,
                            "look_back_period_s": cfg.look_back_period_s},
        user_config={"bundle": cfg.bundle, "data": cfg.data}, health_check_period_s=5,
        graceful_shutdown_timeout_s=30)(serve.ingress()(Service) if fused else Recommender)
    # the replicas' own copy leaves the bundle out: it arrives as user_config, so that with `serve deploy`
    # a new bundle changes no init argument and is swapped in by reconfigure on the running replicas
    # (an imperative serve.run, as `recflm serve --bundle NEW`, rolls new replicas out; no request fails either way)
    settings = dataclasses.replace(cfg, bundle="", data="")
    if fused:
        return model.bind(settings)
    ingress = serve.deployment(name="Api", num_replicas=cfg.api_replicas,
                               max_ongoing_requests=cfg.api_max_ongoing_requests,
                               ray_actor_options={"num_cpus": cfg.api_cpus})(serve.ingress()(Api))
    return ingress.bind(model.bind(settings), settings)


def app_builder(args: dict):
    """Application builder for Serve config files (``import_path: recflm.serve:app_builder``):
    ``args`` are ServeConfig keys, checked here (``run`` checks its own config before ``build_app``)."""
    cfg = from_dict(ServeConfig, dict(args or {}))
    check_config(cfg)
    return build_app(cfg)


def check_bundle(path: str) -> str:
    from .bundle import REQUIRED

    p = Path(path).resolve()
    if not p.is_dir():
        raise FileNotFoundError(f"bundle directory {path} not found")
    missing = [n for n in REQUIRED if not (p / n).is_file()]
    if missing:
        raise ValueError(f"{path}: not a recflm bundle, missing {', '.join(missing)}")
    return str(p)


def check_data(bundle: str, data: str) -> str:
    """``data`` resolved ("" stays "": the replicas then use the bundle's own dataset). The dataset that gives
    known users' histories (``data``, else the one named in the bundle's manifest) is checked here, on the
    driver, against the bundle's catalog: a deploy with another dataset's item indices fails at once with a
    message instead of in every replica."""
    import json

    import pandas as pd

    from .bundle import check_catalog

    manifest = json.loads((Path(bundle) / "manifest.json").read_text())
    path = data or manifest.get("data", {}).get("path") or ""
    if data and not (Path(data) / "sequences.parquet").exists():
        raise FileNotFoundError(f"data {data}: not a prepared dataset (no sequences.parquet)")
    if path and (Path(path) / "sequences.parquet").exists():
        check_catalog(pd.read_parquet(Path(bundle) / "items.parquet"), path)
    return str(Path(data).resolve()) if data else ""


def run(cfg: ServeConfig, log=print) -> str:
    """Deploy (or update: a rolling update without failed requests) the application; return its URL."""
    import math

    import ray
    from ray import serve

    from .runtime import ensure_ray, free_port

    check_config(cfg)
    bundle = check_bundle(cfg.bundle)
    cfg = dataclasses.replace(cfg, bundle=bundle, data=check_data(bundle, cfg.data))
    # a local cluster started here gets enough logical CPUs for every replica at max scale
    need = cfg.max_replicas * cfg.num_cpus + (cfg.layout != "fused") * cfg.api_replicas * cfg.api_cpus + 1
    if cfg.throughput_mode and not ray.is_initialized():
        set_throughput_env()
    ensure_ray(num_cpus=max(os.cpu_count() or 1, math.ceil(need)))
    haproxy = haproxy_ingress(ray_cluster=True)
    cfg = dataclasses.replace(cfg, layout=resolve_layout(cfg))
    if cfg.port == 0:  # any free port
        cfg = dataclasses.replace(cfg, port=free_port(cfg.host if cfg.host not in ("0.0.0.0", "") else "127.0.0.1"))
    for attempt in (1, 2, 3):  # on an overloaded node Serve may replace a proxy that starts too slowly
        try:
            serve.start(http_options={"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s})
            break
        except ray.exceptions.RayActorError:
            if attempt == 3:
                raise
    host, port = cfg.host, cfg.port
    try:  # Serve may already run with other HTTP options: report where it really listens
        from ray.serve.context import _get_global_client

        http = _get_global_client().http_config
        host, port = http.host, http.port
    except Exception:
        pass
    t0 = time.perf_counter()
    serve.run(build_app(cfg), name=cfg.name, route_prefix=cfg.route_prefix)
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    url = f"http://{host}:{port}{cfg.route_prefix.rstrip('/')}"
    _wait_for_proxy(f"http://{host}:{port}/-/healthz")
    log(f"serve: application {cfg.name!r} ready in {time.perf_counter() - t0:.1f} s at {url}/v1 "
        f"(bundle {cfg.bundle}; layout {cfg.layout}; {'HAProxy' if haproxy else 'Python proxy'} ingress; "
        f"OpenAPI docs at {url}/docs; Ray {ray.__version__})")
    return url


def _wait_for_proxy(health_url: str, timeout_s: float = 120.0) -> None:
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(health_url, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.time() > deadline:
            raise RuntimeError(f"the Serve HTTP proxy does not answer at {health_url}")
        time.sleep(0.5)



FLAGS = ("bundle", "data", "host", "port", "name", "min_replicas", "max_replicas", "auth_token_file", "dtype")


def add_arguments(p: argparse.ArgumentParser, name: str = "") -> None:
    p.add_argument("--bundle", "-b", help="the model bundle to serve (config key: bundle)")
    p.add_argument("--data", help="dataset dir with known users' histories (default: the bundle's)")
    p.add_argument("--host", help="HTTP address when this command starts Serve (config key: host)")
    p.add_argument("--port", type=int,
                   help="HTTP port when this command starts Serve, 0 for any free one (config key: port)")
    p.add_argument("--name", help="Serve application name (config key: name)")
    p.add_argument("--min-replicas", type=int, help="fewest model replicas (config key: min_replicas)")
    p.add_argument("--max-replicas", type=int, help="most model replicas (config key: max_replicas)")
    p.add_argument("--auth-token-file", help="require the bearer token in this file (config key: auth_token_file)")
    p.add_argument("--dtype", choices=DTYPES, help="weights as served: float32 (default, exact), bfloat16, or int8 "
                   "(quantized linear layers: faster on CPU, top-k may differ slightly) (config key: dtype)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--detach", action="store_true",
                      help="deploy and return (the application keeps running on the cluster; "
                           "stop it with `serve shutdown` or `serve delete NAME`)")
    mode.add_argument("--demo", action="store_true",
                      help="deploy, send a few real requests, print them with their answers, and shut down")


def command(args) -> int:
    cfg = flags_into(load_serve_config(args.config, args.overrides), args, FLAGS)
    url = run(cfg)
    from ray import serve

    if args.detach:
        print(f"serve: deployed; it runs as long as the Ray cluster does (a local cluster started by this "
              f"command ends with it: `ray start --head` first). Stop it with `serve delete {cfg.name}`.")
        return 0
    if args.demo:
        from .serve_api import read_token
        from .serve_client import demo

        token, _ = read_token(cfg)
        try:
            return demo(url, token)
        finally:
            serve.delete(cfg.name)
    print(f"serve: serving at {url}/v1 (Ctrl-C to stop)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("serve: stopping")
        serve.delete(cfg.name)
    return 0
