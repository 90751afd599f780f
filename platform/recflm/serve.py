"""``recflm serve``: a model bundle as an HTTP JSON service on Ray Serve.

One Serve application, in one of two layouts (``ServeConfig.layout``):

- ``fused``: one deployment, ``Recommender``, each replica the FastAPI ingress and the model at
  once (``Service``): no call between processes per request, the fastest on CPU.
- ``split``: ``Api``, the ingress, in front of ``Recommender``, the model deployment; for model
  replicas on GPUs while the HTTP work scales on CPUs, or an ingress that retries while model
  replicas restart.
- ``auto`` (default): fused where Serve's HAProxy ingress runs, split behind Serve's Python proxy.
  HAProxy closes the connections of a replica that dies at once, while the Python proxy held the
  requests of a killed fused replica until its request timeout; the split layout's ingress retries
  them on another model replica.

The ingress (``Api``; ``Service`` is an ``Api`` holding the model itself) is a FastAPI app built
inside the replica (``__serve_build_asgi_app__``, so the limits in its OpenAPI schema come from the
config). It checks the optional bearer token, the body size and type, validates every field, answers
each bad request with a 4xx that names the field and the problem, and records the request metrics
(``serve_metrics``). The model (``Recommender``, autoscaling on ongoing requests) gets its bundle
through ``user_config`` (``{"bundle", "data"}``); ``reconfigure`` loads a new bundle beside the old
one and swaps it in, so requests keep being answered during a rollout. It checks item and user ids
against its own catalog and answers with batched model calls (``serve.batch``): constrained beam
search over the catalog for recommendations (catalog items only, the history excluded),
expected-rating decoding (the mean over the scale's rating texts) for ratings and beam decoding for explanations.

``throughput_mode`` (default on) starts a local Ray with Serve's HAProxy ingress and
throughput-optimized data plane (``THROUGHPUT_ENV``); a cluster takes them from its environment.

Endpoints (``/docs`` shows the OpenAPI schema)::

    POST /v1/recommend  {"user": "ml:1"} or {"history": ["ml:1", ...]}, "k": 10, "exclude_seen": true
    POST /v1/rating     {"user": "ml:1", "item": "ml:318"}
    POST /v1/explain    {"user": "ml:1", "item": "ml:318"}
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
import hashlib
import json
import logging
import os
import threading
import warnings
import time
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, from_dict, load_config, to_dict
from .prompts import sequential_input

HELP = "serve a model bundle over HTTP with Ray Serve (batched, autoscaling, metrics)"
API_VERSION = "v1"
OPEN_PATHS = ("/v1/health", "/docs", "/openapi.json", "/docs/oauth2-redirect")
logger = logging.getLogger("ray.serve")


def _log_now(level: int, message: str) -> None:
    """Log an operator-facing message and write it out at once: Serve's throughput mode buffers a replica's
    log records (RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE) until the buffer fills or an error comes."""
    logger.log(level, message)
    for handler in logger.handlers:
        handler.flush()


@dataclass
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
    explain_tokens: int = 32
    explain_beams: int = 4
    # "fused": one deployment is both the FastAPI ingress and the model (each replica answers HTTP itself: no hop
    # between processes, the fastest on CPU); "split": an ingress deployment (Api) in front of the model deployment
    # (Recommender), for model replicas on GPUs while the HTTP work scales on CPUs, or an ingress that must stay up
    # while model replicas restart. Both hold the model in a deployment named Recommender. "auto": fused where
    # Serve's HAProxy ingress runs (it drops a dead replica's connections at once), split behind the Python proxy.
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
    for key in ("max_history", "max_body_bytes", "max_id_chars", "threads", "api_replicas", "max_batch_size"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be at least 1")


def load_serve_config(path: str | None, overrides: list[str] | None = None) -> ServeConfig:
    """A ServeConfig from a recflm YAML (ServeConfig keys) or from a Serve config file such as
    ``jobs/serve.yaml`` (its recflm application's ``args`` plus ``http_options``), then overrides."""
    import yaml

    from .config import apply_override

    try:
        doc = yaml.safe_load(Path(path).read_text()) if path and Path(path).is_file() else None
    except yaml.YAMLError:
        doc = None  # load_config says what is wrong with it
    if not isinstance(doc, dict) or "applications" not in doc:
        return load_config(ServeConfig, path, overrides)
    apps = [a for a in doc["applications"] or [] if str(a.get("import_path", "")).startswith("recflm.serve")]
    if not apps:
        raise ConfigError(f"{path}: no application with import_path recflm.serve:app_builder")
    data = {k: v for k, v in (doc.get("http_options") or {}).items() if k in ("host", "port", "request_timeout_s")}
    data.update({"name": apps[0].get("name", "recflm"), "route_prefix": apps[0].get("route_prefix", "/")})
    data.update(apps[0].get("args") or {})
    for o in overrides or []:
        apply_override(data, o)
    return from_dict(ServeConfig, {**to_dict(ServeConfig()), **data})


# ----------------------------------------------------------------------------- the model side
def _err(status: int, reason: str, field: str, message: str) -> dict:
    return {"error": {"status": status, "reason": reason, "field": field, "message": message}}


DTYPES = ("float32", "bfloat16", "int8")
LAYOUTS = ("auto", "fused", "split")
THROUGHPUT_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def haproxy_ingress(ray_cluster: bool = False) -> bool:
    """Whether Serve's HTTP ingress is HAProxy: from this process's environment, or (``ray_cluster``) from
    the environment the running Ray cluster's workers inherit from their node (asked with a 0-CPU task)."""
    if not ray_cluster:
        return os.environ.get("RAY_SERVE_ENABLE_HA_PROXY", "0") == "1"
    import ray

    return bool(ray.get(ray.remote(num_cpus=0)(haproxy_ingress).remote(), timeout=120))


def resolve_layout(cfg: "ServeConfig", haproxy: bool | None = None) -> str:
    """``cfg.layout``, with "auto" made fused behind HAProxy (``haproxy``; None: this process's environment
    says), split otherwise."""
    if cfg.layout != "auto":
        return cfg.layout
    return "fused" if (haproxy_ingress() if haproxy is None else haproxy) else "split"


def set_throughput_env() -> None:
    """Put ``THROUGHPUT_ENV`` into this process's environment (unless set already) for a Ray it is about to
    start: Serve's processes inherit it. HAProxy's stats and metrics listeners get free ports rather than their
    fixed defaults (8404, 9101), so that two local Rays on one machine do not share them. A replica that
    leaves drains for 5 s instead of 30: on one node HAProxy hears of it at once, and retries refused
    connections on other replicas."""
    from .runtime import free_port

    for k, v in THROUGHPUT_ENV.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "5")
    for k in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):
        os.environ.setdefault(k, str(free_port()))


def cast_model(model, dtype: str):
    """The model with its weights as served (see ``ServeConfig.dtype``)."""
    import torch

    if dtype == "bfloat16":
        return model.to(torch.bfloat16)
    if dtype == "int8":
        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():  # torch.ao.quantization's deprecation notice: the API still works
            warnings.simplefilter("ignore")
            return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    return model


def _listing(values: list, limit: int = 10) -> str:
    shown = ", ".join(repr(v) for v in values[:limit])
    return shown + (f" and {len(values) - limit} more" if len(values) > limit else "")


class ModelState:
    """One loaded bundle and everything derived from it; replaced whole on a rollout."""

    def __init__(self, bundle: str, data: str = "", dtype: str = "float32"):
        import pandas as pd

        from .bundle import load_bundle
        from .config import PrepareConfig, PromptConfig
        from .generate import CatalogTrie, ConstrainedBeamSearch
        from .prompts import load_templates, sequential_template

        t0 = time.perf_counter()
        self.bundle = load_bundle(bundle)
        b = self.bundle
        self.path = str(Path(bundle).resolve())
        self.manifest = b.manifest
        self.version = hashlib.sha256((b.path / "manifest.json").read_bytes()).hexdigest()[:12]
        cat = b.catalog.sort_values("index").reset_index(drop=True)
        self.catalog = cat
        self.ids = [str(x) for x in cat["id_text"]]
        titles = cat["title"] if "title" in cat else [None] * len(cat)
        # the item description exactly as the data stage renders it into prompts
        self.desc = [f"{i} ({t})" if isinstance(t, str) else i for i, t in zip(self.ids, titles)]
        self.index = {str(k): i for i, k in enumerate(cat["item"])}
        self.trie = CatalogTrie.from_catalog(b.tokenizer, self.ids)
        b.model = cast_model(b.model, dtype)
        self.dtype = dtype
        self.search = ConstrainedBeamSearch(b.model, self.trie)
        self.max_source_len = int(b.manifest.get("train_config", {}).get("max_source_len", 256))
        temps = load_templates(b.templates_dir)

        def first_seen(family: str, fields: set):
            from string import Formatter

            for t in temps[family]:
                names = {f for _, f, _, _ in Formatter().parse(t.source) if f}
                if not t.held_out and names <= fields:
                    return t
            raise ValueError(f"{b.templates_dir}: no seen {family} template uses only {sorted(fields)}")

        # the bundle's inference settings say how it is asked for next items (train.inference_settings)
        self.inference = dict(b.manifest.get("inference") or {})
        self.dense = self.inference.get("sequential") == "dense"
        self.t_seq = sequential_template(temps, self.dense) if self.dense else first_seen("sequential",
                                                                                          {"user", "history"})
        self.t_rating = first_seen("rating", {"user", "item", "item_desc"})
        self.t_explain = first_seen("explanation", {"user", "item", "item_desc"})
        # known users' training histories and the prompt settings from the dataset, when it is there
        self.data_dir = data or b.manifest.get("data", {}).get("path") or ""
        self.histories: dict[str, list[int]] = {}
        self.max_prompt_history = PromptConfig().max_history
        self.scale = (PrepareConfig().rating_min, PrepareConfig().rating_max)
        seqs = Path(self.data_dir) / "sequences.parquet" if self.data_dir else None
        if seqs is not None and seqs.exists():
            from .bundle import check_catalog

            check_catalog(cat, self.data_dir)  # another dataset's item indices would name other items
            dm = json.loads((Path(self.data_dir) / "manifest.json").read_text())
            pc = dm.get("config", {})
            self.max_prompt_history = int(pc.get("prompts", {}).get("max_history", self.max_prompt_history))
            self.scale = (float(pc.get("rating_min", self.scale[0])), float(pc.get("rating_max", self.scale[1])))
            s = pd.read_parquet(seqs, columns=["user", "index", "n_train"])
            self.histories = {str(u): [int(i) for i in ix[:int(n)]] for u, ix, n in
                              zip(s["user"], s["index"], s["n_train"])}
            self.histories_from = str(seqs)
        else:
            self.histories_from = None
            _log_now(logging.WARNING, f"recflm serve: no dataset at {self.data_dir!r}: known-user requests are off, "
                           "requests must carry a history")
        if "history" in self.inference:  # the bundle says how many history items its input holds
            self.max_prompt_history = int(self.inference["history"])
        self._entries = [self._entry(i) for i in range(len(cat))]
        self.load_s = round(time.perf_counter() - t0, 2)

    @property
    def tags(self) -> dict:
        return {"bundle": self.path, "model_version": self.version}

    def item_entry(self, i: int) -> dict:
        return dict(self._entries[i])

    def _entry(self, i: int) -> dict:
        row = self.catalog.iloc[i]
        out = {"item": str(row["item"]), "index": int(i), "id": self.ids[i]}
        for col in ("title", "genres", "source"):
            if col in row and isinstance(row[col], str):
                out[col] = row[col]
        for col in ("n_train", "n_total"):
            if col in row and row[col] == row[col]:
                out[col] = int(row[col])
        return out


class Recommender:
    """The model deployment (wrapped by ``serve.deployment`` in ``build_app``)."""

    def __init__(self, settings: dict, metrics=None):
        import torch
        from ray import serve

        from .serve_metrics import ServeMetrics

        self.s = settings
        torch.set_num_threads(max(1, int(settings["threads"])))
        self.metrics = metrics or ServeMetrics()
        self.state: ModelState | None = None
        batch = dict(max_batch_size=settings["max_batch_size"], batch_wait_timeout_s=settings["batch_wait_timeout_s"])
        self._recommend = serve.batch(**batch)(self._recommend_batch)
        self._rate = serve.batch(**batch)(self._rate_batch)
        self._explain = serve.batch(**batch)(self._explain_batch)
        # Ray drops a gauge series that is not re-reported within two metric report intervals,
        # so the model-info gauge is refreshed from a small thread while the replica lives
        threading.Thread(target=self._report_model_info, daemon=True).start()

    def _report_model_info(self) -> None:
        while True:
            st = self.state
            if st is not None:
                self.metrics.model_info.set(1, tags=st.tags)
            time.sleep(1.0)

    def reconfigure(self, user_config: dict) -> None:
        """Load the bundle named in user_config and swap it in (the old one answers until then)."""
        bundle = user_config.get("bundle") or ""
        if self.state is not None and self.state.path == str(Path(bundle).resolve()) and \
                self.state.data_dir == (user_config.get("data") or self.state.data_dir):
            return
        new = ModelState(bundle, user_config.get("data") or "", self.s.get("dtype", "float32"))
        self.state = new  # requests already running finish with the state they started with
        _log_now(logging.INFO, f"recflm serve: serving bundle {new.path} (version {new.version}, {len(new.ids)} items, "
                    f"{len(new.histories)} known users, loaded in {new.load_s} s)")

    def check_health(self) -> None:
        if self.state is None:
            raise RuntimeError("no bundle loaded")

    # -------------------------------------------------------------- requests (validated by the Api)
    def _unknown_items(self, st: ModelState, keys: list[str], field: str) -> dict | None:
        unknown = [k for k in keys if k not in st.index]
        if unknown:
            return _err(422, "unknown_item", field, f"unknown item ids: {_listing(unknown)} "
                        f"(not in the catalog of {len(st.ids)} items)")
        return None

    async def recommend(self, req: dict) -> dict:
        st = self.state
        user, history = req.get("user"), req.get("history")
        if history is not None:
            bad = self._unknown_items(st, history, "history")
            if bad:
                return bad
            hist, source = [st.index[h] for h in history], "request"
        elif user in st.histories:
            hist, source = st.histories[user], "training data"
        else:
            why = "no dataset with users' histories is loaded" if st.histories_from is None else \
                "not a user of the training data"
            return _err(422, "unknown_user", "user", f"unknown user {user!r} ({why}): send its history "
                        "as a list of item ids in 'history'")
        k = int(req["k"])
        prompt, prefix = sequential_input(st.t_seq, user or "new", [st.ids[i] for i in hist], st.max_prompt_history)
        exclude = set(hist) if req.get("exclude_seen", True) else set()
        found = await self._recommend((st, prompt, exclude, k, prefix))
        return {"user": user, "known_user": user in st.histories, "history_source": source,
                "history_length": len(hist), "k": k,
                "items": [{"rank": r + 1, **st.item_entry(i), "score": round(s, 4)} for r, (i, s) in enumerate(found)],
                "model_version": st.version}

    def _pair_prompt(self, st: ModelState, req: dict, template) -> tuple[str | None, dict | None]:
        """The (user, item) prompt of ``template``, or the 4xx answer for an unknown item."""
        bad = self._unknown_items(st, [req["item"]], "item")
        if bad:
            return None, bad
        i = st.index[req["item"]]
        return template.source.format(user=req["user"], item=st.ids[i], item_desc=st.desc[i]), None

    async def rating(self, req: dict) -> dict:
        from .generate import parse_rating

        st = self.state
        prompt, bad = self._pair_prompt(st, req, st.t_rating)
        if bad:
            return bad
        text = await self._rate((st, prompt))
        value = parse_rating(text, *st.scale)
        out = {"user": req["user"], "item": req["item"], "known_user": req["user"] in st.histories,
               "rating": value, "text": text, "scale": list(st.scale), "model_version": st.version}
        if value is None:
            out["parse_error"] = f"the model's output {text!r} is not a number in [{st.scale[0]}, {st.scale[1]}]"
        return out

    async def explain(self, req: dict) -> dict:
        st = self.state
        prompt, bad = self._pair_prompt(st, req, st.t_explain)
        if bad:
            return bad
        text = await self._explain((st, prompt))
        return {"user": req["user"], "item": req["item"], "known_user": req["user"] in st.histories,
                "explanation": text, "model_version": st.version}

    def item(self, key: str) -> dict:
        st = self.state
        if key not in st.index:
            return _err(404, "unknown_item", "item", f"unknown item id {key!r} (not in the catalog of "
                        f"{len(st.ids)} items)")
        return st.item_entry(st.index[key])

    def info(self) -> dict:
        st = self.state
        return {"bundle": st.path, "model_version": st.version, "manifest": st.manifest, "items": len(st.ids),
                "known_users": len(st.histories), "histories": st.histories_from,
                "example_users": list(st.histories)[:3], "prompt_history": st.max_prompt_history,
                "rating_scale": list(st.scale),
                "templates": {"sequential": st.t_seq.id, "rating": st.t_rating.id, "explanation": st.t_explain.id}}

    def health(self) -> dict:
        return {"status": "ok", "bundle": self.state.path, "model_version": self.state.version}

    # -------------------------------------------------------------- batched model calls
    @staticmethod
    def _groups(jobs: list) -> list[list[int]]:
        """Job positions per model state (a batch spans two bundles only during a rollout)."""
        groups: dict[int, list[int]] = {}
        for j, job in enumerate(jobs):
            groups.setdefault(id(job[0]), []).append(j)
        return list(groups.values())

    async def _recommend_batch(self, jobs: list[tuple]) -> list[list[tuple[int, float]]]:
        import asyncio

        self.metrics.batch.observe(len(jobs), tags={"task": "recommend"})
        return await asyncio.to_thread(self._search, jobs)

    def _search(self, jobs: list[tuple]) -> list:
        out: list = [None] * len(jobs)
        for group in self._groups(jobs):
            st = jobs[group[0]][0]
            tok = st.bundle.tokenizer
            enc = tok.encode_batch([jobs[j][1] for j in group], st.max_source_len)
            prefix = [tok.item_token_ids(jobs[j][4]) for j in group] if st.dense else None
            items, scores = st.search.search(enc, beams=self.s["beams"], k=max(jobs[j][3] for j in group),
                                             exclude=[jobs[j][2] for j in group], prefix=prefix)
            for r, j in enumerate(group):
                found = [(int(i), float(s)) for i, s in zip(items[r].tolist(), scores[r].tolist()) if i >= 0]
                out[j] = found[:jobs[j][3]]
        return out

    def _texts(self, jobs: list[tuple], answer) -> list[str]:
        """``answer(state, prompts)`` for each bundle's group of jobs, in the jobs' order."""
        out: list = [None] * len(jobs)
        for group in self._groups(jobs):
            st = jobs[group[0]][0]
            for j, t in zip(group, answer(st, [jobs[j][1] for j in group])):
                out[j] = t
        return out

    def _generate(self, jobs: list[tuple], tokens: int, beams: int) -> list[str]:
        from .generate import generate_text

        return self._texts(jobs, lambda st, prompts: generate_text(st.bundle.model, st.bundle.tokenizer, prompts,
                                                                   tokens, beams, st.max_source_len))

    async def _rate_batch(self, jobs: list[tuple]) -> list[str]:
        import asyncio

        self.metrics.batch.observe(len(jobs), tags={"task": "rating"})
        return await asyncio.to_thread(self._expected_ratings, jobs)

    def _expected_ratings(self, jobs: list[tuple]) -> list[str]:
        """The expected rating over the scale's rating texts, as ``recflm evaluate`` scores it."""
        from .generate import predict_ratings

        return self._texts(jobs, lambda st, prompts: predict_ratings(st.bundle.model, st.bundle.tokenizer, prompts,
                                                                     *st.scale, st.max_source_len))

    async def _explain_batch(self, jobs: list[tuple]) -> list[str]:
        import asyncio

        self.metrics.batch.observe(len(jobs), tags={"task": "explain"})
        return await asyncio.to_thread(self._generate, jobs, self.s["explain_tokens"], self.s["explain_beams"])


# ----------------------------------------------------------------------------- the HTTP side
def _read_token(settings: dict) -> tuple[str | None, str]:
    if settings.get("auth_token_file"):
        p = Path(settings["auth_token_file"])
        token = p.read_text().strip()  # a missing file stops the replica: the operator asked for auth
        if not token:
            raise ValueError(f"auth_token_file {p} is empty")
        return token, f"file {p}"
    env = settings.get("auth_token_env") or ""
    if env and os.environ.get(env, "").strip():
        return os.environ[env].strip(), f"environment variable {env}"
    return None, ""


class Api:
    """The ingress deployment (wrapped by ``serve.ingress()`` and ``serve.deployment`` in ``build_app``)."""

    def __init__(self, model, settings: dict, metrics=None):
        from .serve_metrics import ServeMetrics

        self.model, self.s = model, settings
        self.metrics = metrics or ServeMetrics()
        self.token, where = _read_token(settings)
        if self.token:
            _log_now(logging.INFO, f"recflm serve: bearer-token authentication is on (token from {where})")
        else:
            _log_now(logging.WARNING, "recflm serve: authentication is OFF: every client may call the API (set the "
                           f"{settings.get('auth_token_env') or 'token'} environment variable or auth_token_file "
                           "to require a bearer token)")

    async def call(self, method: str, arg=None) -> dict:
        """Call the model deployment; a replica lost mid-request is retried once on another."""
        from ray import exceptions as rex
        from ray.serve.exceptions import BackPressureError

        for attempt in (1, 2):
            try:
                handle = getattr(self.model, method)
                return await (handle.remote(arg) if arg is not None else handle.remote())
            except (rex.RayActorError, rex.ActorUnavailableError) as e:
                if attempt == 2:
                    return _err(503, "unavailable", "", f"model replica unavailable, retry later ({type(e).__name__})")
            except BackPressureError:
                return _err(503, "overloaded", "", "the model deployment is overloaded, retry later")

    def __serve_build_asgi_app__(self):
        return build_fastapi(self)


class Service(Api):
    """The fused layout's one deployment: the ingress with the model in its own process (a Recommender
    object, not a handle), so that a request costs no call between processes. Bundles still arrive
    through ``user_config``; ``reconfigure`` and the health check go to the model."""

    def __init__(self, settings: dict):
        from .serve_metrics import ServeMetrics

        metrics = ServeMetrics()
        self.recommender = Recommender(settings, metrics)
        super().__init__(None, settings, metrics)

    def reconfigure(self, user_config: dict) -> None:
        self.recommender.reconfigure(user_config)

    def check_health(self) -> None:
        self.recommender.check_health()

    async def call(self, method: str, arg=None) -> dict:
        import inspect

        fn = getattr(self.recommender, method)
        out = fn(arg) if arg is not None else fn()
        return await out if inspect.isawaitable(out) else out


def build_fastapi(api: Api):
    """The FastAPI app of the ingress, with the config's limits in its schema."""
    import hmac
    from typing import Annotated, Optional

    from fastapi import FastAPI, Path as PathParam, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.routing import Match

    from . import __version__

    s = api.s
    Id = Annotated[str, Field(min_length=1, max_length=s["max_id_chars"])]

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)

    class RecommendRequest(Strict):
        user: Optional[Id] = Field(None, description="a user id of the training data (its history is used when "
                                   "no history is given)", examples=["ml:1"])
        history: Optional[list[Id]] = Field(None, min_length=1, max_length=s["max_history"],
                                            description="item ids the user interacted with, oldest first",
                                            examples=[["ml:1", "ml:50"]])
        k: int = Field(s["default_k"], ge=1, le=s["beams"], description="how many items to return")
        exclude_seen: bool = Field(True, description="never recommend an item of the history")

    class PairRequest(Strict):
        user: Id = Field(description="a user id (one never seen in training works too)", examples=["ml:1"])
        item: Id = Field(description="an item id of the catalog", examples=["ml:318"])

    app = FastAPI(title="recflm", version=__version__,
                  description="Recommendations, rating predictions and explanations from one text-to-text model.")

    def error(status: int, reason: str, field: str, message: str, headers: dict | None = None) -> JSONResponse:
        body = {"error": reason, "field": field, "message": f"{field}: {message}" if field else message}
        return JSONResponse(body, status_code=status, headers={"x-recflm-error": reason, **(headers or {})})

    def answer(out: dict):
        return error(**out["error"]) if "error" in out else out

    # pydantic error type -> (reason, how to say it)
    kinds = {"missing": "missing_field", "extra_forbidden": "unknown_field", "greater_than_equal": "out_of_range",
             "less_than_equal": "out_of_range", "too_long": "too_long", "string_too_long": "too_long",
             "too_short": "too_short", "string_too_short": "too_short"}

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        e = errs[0]
        loc = [str(x) for x in e.get("loc", ()) if x not in ("body", "path", "query")]
        field = ".".join(loc) or "body"
        if e.get("type") == "json_invalid":
            ctx = e.get("ctx") or {}
            return error(400, "malformed_json", "body", f"malformed JSON: {ctx.get('error', e.get('msg'))}")
        reason = kinds.get(e.get("type"), "wrong_type" if "type" in str(e.get("type")) else "invalid_value")
        if e.get("type") == "missing" and field == "body":
            reason, msg = "missing_field", "a JSON object is required"
        else:
            got = e.get("input")
            quiet = e.get("type") in ("missing", "too_long", "string_too_long") or isinstance(got, (dict, list))
            shown = "" if quiet else f", got {repr(got)[:40]}"
            msg = f"{e.get('msg')}{shown}"
        if len(errs) > 1:
            msg += f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})"
        return error(422, reason, field, msg)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400:  # FastAPI could not even decode the body (not UTF-8, ...)
            return error(400, "malformed_json", "body", f"malformed JSON: {exc.detail}")
        reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error(exc.status_code, reason, "", f"{request.method} {request.url.path}: {exc.detail}")

    def endpoint_of(scope) -> str:
        for route in app.router.routes:
            if route.matches(scope)[0] == Match.FULL:
                return route.path
        return "unmatched"

    @app.middleware("http")
    async def guard(request: Request, call_next):
        t0 = time.perf_counter()
        endpoint = endpoint_of(request.scope)
        resp = None
        if api.token and endpoint not in OPEN_PATHS:
            auth = request.headers.get("authorization", "")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not given or not hmac.compare_digest(given.encode(), api.token.encode()):
                resp = error(401, "unauthorized", "authorization", "a valid 'Authorization: Bearer <token>' "
                             "header is required" if not given else "wrong bearer token",
                             headers={"WWW-Authenticate": "Bearer"})
        if resp is None and request.method == "POST":
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            length = request.headers.get("content-length")
            if ctype != "application/json":
                resp = error(415, "unsupported_media_type", "content-type",
                             f"send the body as application/json, not {ctype or 'nothing'!r}")
            elif length is not None and (not length.isdigit() or int(length) > s["max_body_bytes"]):
                resp = error(413, "body_too_large", "body", f"the body may hold at most {s['max_body_bytes']} bytes, "
                             f"this one has {length}") if length.isdigit() else \
                    error(400, "bad_header", "content-length", f"not a number: {length!r}")
            elif length is None and len(await request.body()) > s["max_body_bytes"]:
                resp = error(413, "body_too_large", "body", f"the body may hold at most {s['max_body_bytes']} bytes")
        if resp is None:
            try:
                resp = await call_next(request)
            except Exception as e:  # a bug, not an input error: say so, log it, keep serving
                logger.exception(f"recflm serve: {request.method} {request.url.path} failed")
                resp = error(500, "internal", "", f"internal error ({type(e).__name__}); see the replica log")
        status = resp.status_code
        api.metrics.requests.inc(tags={"endpoint": endpoint, "status": str(status)})
        api.metrics.latency.observe((time.perf_counter() - t0) * 1000, tags={"endpoint": endpoint})
        if 400 <= status < 500:
            api.metrics.invalid.inc(tags={"endpoint": endpoint,
                                          "reason": resp.headers.get("x-recflm-error", str(status))})
        return resp

    @app.post("/v1/recommend", summary="Recommend next items for a known user or a raw history of item ids")
    async def recommend(body: RecommendRequest):
        if body.user is None and body.history is None:
            return error(422, "missing_field", "user", "give a known user id ('user') or a history of item ids "
                         "('history')")
        out = await api.call("recommend", body.model_dump())
        if "items" in out:
            api.metrics.items.inc(len(out["items"]), tags={"endpoint": "/v1/recommend"})
        return answer(out)

    @app.post("/v1/rating", summary="Predict the rating a user gives an item")
    async def rating(body: PairRequest):
        return answer(await api.call("rating", body.model_dump()))

    @app.post("/v1/explain", summary="Explain, in text, why an item suits a user")
    async def explain(body: PairRequest):
        return answer(await api.call("explain", body.model_dump()))

    @app.get("/v1/items/{item:path}", summary="Look up an item of the catalog")
    async def item(item: Annotated[str, PathParam(min_length=1, max_length=s["max_id_chars"])]):
        return answer(await api.call("item", item))

    @app.get("/v1/model", summary="The served bundle: manifest, version and serving settings")
    async def model_info():
        out = await api.call("info")
        if "error" in out:
            return answer(out)
        keys = ("beams", "default_k", "max_history", "max_body_bytes", "max_batch_size", "min_replicas", "max_replicas",
                "dtype", "layout")
        return {**out, "api_version": API_VERSION, "auth": bool(api.token), "limits": {k: s[k] for k in keys}}

    @app.get("/v1/health", summary="Liveness of the ingress and the model deployment (no token needed)")
    async def health():
        return answer(await api.call("health"))

    return app


# ----------------------------------------------------------------------------- building and running
def build_app(cfg: ServeConfig):
    """The Serve application for ``cfg``: the fused Recommender (ingress and model in one deployment), or
    the Api ingress bound to the Recommender (layout "split")."""
    from ray import serve

    check_config(cfg)
    # the bundle travels in user_config only, so changing it is a reconfigure, not a new deployment
    settings = {k: v for k, v in to_dict(cfg).items() if k not in ("bundle", "data")}
    # a Serve config's application builder runs on the cluster, where the environment is the nodes' own
    settings["layout"] = resolve_layout(cfg)
    fused = settings["layout"] == "fused"
    model = serve.deployment(
        name="Recommender", max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.num_cpus},
        autoscaling_config={"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                            "initial_replicas": cfg.min_replicas,
                            "target_ongoing_requests": cfg.target_ongoing_requests,
                            "upscale_delay_s": cfg.upscale_delay_s, "downscale_delay_s": cfg.downscale_delay_s,
                            "look_back_period_s": cfg.look_back_period_s},
        user_config={"bundle": cfg.bundle, "data": cfg.data}, health_check_period_s=5,
        graceful_shutdown_timeout_s=30)(serve.ingress()(Service) if fused else Recommender)
    if fused:
        return model.bind(settings)
    ingress = serve.deployment(name="Api", num_replicas=cfg.api_replicas,
                               max_ongoing_requests=cfg.api_max_ongoing_requests,
                               ray_actor_options={"num_cpus": cfg.api_cpus})(serve.ingress()(Api))
    return ingress.bind(model.bind(settings), settings)


def app_builder(args: dict):
    """Application builder for Serve config files (``import_path: recflm.serve:app_builder``):
    ``args`` are ServeConfig keys."""
    return build_app(from_dict(ServeConfig, {**to_dict(ServeConfig()), **(args or {})}))


def check_bundle(path: str) -> str:
    from .bundle import REQUIRED

    p = Path(path).resolve()
    if not p.is_dir():
        raise FileNotFoundError(f"bundle directory {path} not found")
    missing = [n for n in REQUIRED if not (p / n).is_file()]
    if missing:
        raise ValueError(f"{path}: not a recflm bundle, missing {', '.join(missing)}")
    return str(p)


def run(cfg: ServeConfig, log=print) -> str:
    """Deploy (or update: a rolling update without failed requests) the application; return its URL."""
    import math

    import ray
    from ray import serve

    from .runtime import ensure_ray

    check_config(cfg)
    cfg.bundle = check_bundle(cfg.bundle)
    if cfg.data:
        cfg.data = str(Path(cfg.data).resolve())
    # a local cluster started here gets enough logical CPUs for every replica at max scale
    need = cfg.max_replicas * cfg.num_cpus + (cfg.layout != "fused") * cfg.api_replicas * cfg.api_cpus + 1
    if cfg.throughput_mode and not ray.is_initialized():
        set_throughput_env()
    ensure_ray(num_cpus=max(os.cpu_count() or 1, math.ceil(need)))
    haproxy = haproxy_ingress(ray_cluster=True)
    cfg.layout = resolve_layout(cfg, haproxy)
    if cfg.port == 0:  # any free port
        import socket

        with socket.socket() as sock:
            sock.bind((cfg.host if cfg.host not in ("0.0.0.0", "") else "127.0.0.1", 0))
            cfg.port = sock.getsockname()[1]
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


def demo(url: str, token: str | None = None, log=print) -> int:
    """Send a few real requests and print them with their answers."""
    import urllib.error
    import urllib.request

    def call(method: str, path: str, body: dict | None = None):
        req = urllib.request.Request(url + path, method=method, data=json.dumps(body).encode() if body else None,
                                     headers={"content-type": "application/json",
                                              **({"authorization": f"Bearer {token}"} if token else {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                status, out = r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            status, out = e.code, json.loads(e.read() or b"{}")
        log(f"\n{method} {path}" + (f" {json.dumps(body)}" if body else "") + f"\n  -> {status}")
        return status, out

    _, info = call("GET", "/v1/model")
    log(f"  bundle {info.get('bundle')} (version {info.get('model_version')}), {info.get('items')} items, "
        f"{info.get('known_users')} known users")
    user = (info.get("example_users") or ["ml:1"])[0]
    _, rec = call("POST", "/v1/recommend", {"user": user, "k": 5})
    for it in rec.get("items", []):
        log(f"  {it['rank']}. {it['item']:<10} {it.get('title', ''):<50.50} score {it['score']}")
    items = [it["item"] for it in rec.get("items", [])]
    if items:
        _, rec2 = call("POST", "/v1/recommend", {"user": "someone-new", "history": items[:3], "k": 3})
        log("  " + ", ".join(f"{it['item']} ({it.get('title', '')})" for it in rec2.get("items", [])))
        _, r = call("POST", "/v1/rating", {"user": user, "item": items[0]})
        log(f"  rating {r.get('rating')}" + (f" ({r['parse_error']})" if r.get("parse_error") else ""))
        _, e = call("POST", "/v1/explain", {"user": user, "item": items[0]})
        log(f"  explanation: {e.get('explanation')!r}")
        _, it = call("GET", f"/v1/items/{items[0]}")
        log(f"  {it}")
    _, bad = call("POST", "/v1/recommend", {"history": ["no-such-item"], "k": 500})
    log(f"  {bad.get('message')}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
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
    cfg = load_serve_config(args.config, args.overrides)
    for flag in ("bundle", "data", "host", "port", "name", "min_replicas", "max_replicas", "auth_token_file", "dtype"):
        if getattr(args, flag, None) is not None:
            setattr(cfg, flag, getattr(args, flag))
    url = run(cfg)
    from ray import serve

    if args.detach:
        print(f"serve: deployed; it runs as long as the Ray cluster does (a local cluster started by this "
              f"command ends with it: `ray start --head` first). Stop it with `serve delete {cfg.name}`.")
        return 0
    if args.demo:
        token, _ = _read_token(to_dict(cfg))
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
