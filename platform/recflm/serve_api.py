"""The HTTP side of ``recflm serve``: the ingress deployment and its FastAPI app.

``Api`` is the ingress (wrapped by ``serve.ingress()`` and ``serve.deployment`` in ``serve.build_app``):
it holds a handle to the model deployment (layout "split") and retries a call once when its replica is
lost; ``Service`` is an ``Api`` that holds the model itself (layout "fused"). Both build their FastAPI app
inside the replica (``__serve_build_asgi_app__``), so that the limits in its OpenAPI schema come from the
config, in four parts:

- ``request_models``: the request schemas, with the limits validation enforces (id lengths, history
  length, k's range, "user or history", review text length);
- ``add_error_handlers``: every error is JSON, ``ErrorBody`` (``error`` reason, ``field``, ``message``),
  with the reason in an ``x-recflm-error`` header; 405 carries ``Allow``, 503 ``Retry-After``;
- ``add_guard``: the middleware that checks the bearer token, the body's type and size, turns an
  unexpected exception into a JSON 500 and records the request metrics (``serve_metrics``);
- ``add_routes``: the endpoints, each declaring every status it answers with and its error schema.

The OpenAPI schema at ``/openapi.json`` is the contract: ``tests/integration/test_serve.py`` runs
schemathesis against the running service with every check.
"""

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .serve_model import Recommender, log_now, logger, model_error

if TYPE_CHECKING:
    from .serve import ServeConfig

API_VERSION = "v1"
OPEN_PATHS = ("/v1/health", "/docs", "/openapi.json", "/docs/oauth2-redirect")  # no token needed
CALL_ATTEMPTS = 3  # a model call lost with its replica: sent again to another this many times in all
RETRY_AFTER_S = 2  # the Retry-After of a 503: a lost replica's successor or a free slot is seconds away
# pydantic error type -> the reason a 422 names
VALIDATION_REASONS = {"missing": "missing_field", "extra_forbidden": "unknown_field", "greater_than_equal": "out_of_range",
                      "less_than_equal": "out_of_range", "too_long": "too_long", "string_too_long": "too_long",
                      "too_short": "too_short", "string_too_short": "too_short"}


def read_token(cfg: "ServeConfig") -> tuple[str | None, str]:
    """The bearer token the service requires and where it came from, or (None, "") when auth is off."""
    if cfg.auth_token_file:
        p = Path(cfg.auth_token_file)
        token = p.read_text().strip()  # a missing file stops the replica: the operator asked for auth
        if not token:
            raise ValueError(f"auth_token_file {p} is empty")
        return token, f"file {p}"
    env = cfg.auth_token_env or ""
    if env and os.environ.get(env, "").strip():
        return os.environ[env].strip(), f"environment variable {env}"
    return None, ""


class Api:
    """The ingress deployment (wrapped by ``serve.ingress()`` and ``serve.deployment`` in ``build_app``)."""

    def __init__(self, model, cfg: "ServeConfig", metrics=None):
        from .serve_metrics import ServeMetrics

        self.model, self.cfg = model, cfg
        self.metrics = metrics or ServeMetrics()
        self.token, where = read_token(cfg)
        if self.token:
            log_now(logging.INFO, f"recflm serve: bearer-token authentication is on (token from {where})")
        else:
            log_now(logging.WARNING, "recflm serve: authentication is OFF: every client may call the API (set the "
                           f"{cfg.auth_token_env or 'token'} environment variable or auth_token_file "
                           "to require a bearer token)")

    async def call(self, method: str, arg=None) -> dict:
        """Call the model deployment; a call whose replica died or is unreachable is replayed on another (every
        model method is read-only), up to ``CALL_ATTEMPTS`` times, then answered with a JSON 503."""
        import asyncio

        from ray import exceptions as rex
        from ray.serve.exceptions import BackPressureError

        for attempt in range(1, CALL_ATTEMPTS + 1):
            try:
                handle = getattr(self.model, method)
                return await (handle.remote(arg) if arg is not None else handle.remote())
            except (rex.RayActorError, rex.ActorUnavailableError) as e:
                if attempt == CALL_ATTEMPTS:
                    return model_error(503, "unavailable", "", "model replica unavailable, retry later "
                                       f"({type(e).__name__})", retry_after=RETRY_AFTER_S)
                await asyncio.sleep(0.05 * attempt)  # the router hears of the dead replica meanwhile
            except BackPressureError:
                return model_error(503, "overloaded", "", "the model deployment is overloaded, retry later",
                                   retry_after=RETRY_AFTER_S)

    def __serve_build_asgi_app__(self):
        return build_fastapi(self)


class Service(Api):
    """The fused layout's one deployment: the ingress with the model in its own process (a Recommender
    object, not a handle), so that a request costs no call between processes. Bundles still arrive
    through ``user_config``; ``reconfigure`` and the health check go to the model."""

    def __init__(self, cfg: "ServeConfig"):
        from .serve_metrics import ServeMetrics

        metrics = ServeMetrics()
        self.recommender = Recommender(cfg, metrics)
        super().__init__(None, cfg, metrics)

    def reconfigure(self, user_config: dict) -> None:
        self.recommender.reconfigure(user_config)

    def check_health(self) -> None:
        self.recommender.check_health()

    async def call(self, method: str, arg=None) -> dict:
        import inspect

        fn = getattr(self.recommender, method)
        out = fn(arg) if arg is not None else fn()
        return await out if inspect.isawaitable(out) else out



def error_response(status: int, reason: str, field: str, message: str, headers: dict | None = None,
                   retry_after: int | None = None):
    """The JSON answer of every error: ``{"error": reason, "field": field, "message": ...}``."""
    from fastapi.responses import JSONResponse

    body = {"error": reason, "field": field, "message": f"{field}: {message}" if field else message}
    extra = {"Retry-After": str(retry_after)} if retry_after is not None else {}
    return JSONResponse(body, status_code=status, headers={"x-recflm-error": reason, **extra, **(headers or {})})


def answer(out: dict):
    """A model-side answer as the HTTP response: the dict, or the error it carries (``model_error``)."""
    return error_response(**out["error"]) if "error" in out else out


def error_schema():
    """The pydantic model of every error body (the OpenAPI schema of each declared 4xx / 5xx)."""
    from pydantic import BaseModel, Field

    class ErrorBody(BaseModel):
        error: str = Field(description="the reason, a stable token (unknown_item, out_of_range, ...)",
                           examples=["unknown_item"])
        field: str = Field(description="the request field at fault ('' when none)", examples=["history"])
        message: str = Field(description="what is wrong, in words")

    return ErrorBody


def request_models(cfg: "ServeConfig"):
    """(RecommendRequest, PairRequest, ReviewRequest, CandidatesRequest): the request schemas with the config's
    limits."""
    from typing import Annotated, Literal, Optional

    from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

    Id = Annotated[str, Field(min_length=1, max_length=cfg.max_id_chars)]
    # JSON Schema's integer includes 87.0: a whole-number float is taken as the integer it is, anything else
    # (2.5, "10", true) stays a wrong type under strict validation
    Count = Annotated[int, BeforeValidator(lambda v: int(v) if isinstance(v, float) and v.is_integer() else v)]
    body_note = f" The JSON body may hold at most {cfg.max_body_bytes} bytes."

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)

    class RecommendRequest(Strict):
        # "user or history": one of them must be given, and not null (the schema's anyOf says so)
        model_config = ConfigDict(json_schema_extra={
            "anyOf": [{"required": ["user"], "properties": {"user": {"type": "string"}}},
                      {"required": ["history"], "properties": {"history": {"type": "array"}}}],
            "description": "A known user (its training history is used) or a history of catalog item ids, or "
                           "both (the history is used). Unknown ids are answered with 404." + body_note})
        user: Optional[Id] = Field(None, description="a user id of the training data (its history is used when "
                                   "no history is given)", examples=["ml:1"])
        history: Optional[list[Id]] = Field(None, min_length=1, max_length=cfg.max_history,
                                            description="item ids of the catalog the user interacted with, "
                                            "oldest first", examples=[["ml:1", "ml:50"]])
        k: Count = Field(cfg.default_k, ge=1, le=cfg.beams, description="how many items to return")
        exclude_seen: bool = Field(True, description="never recommend an item of the history")

    class PairRequest(Strict):
        model_config = ConfigDict(json_schema_extra={
            "description": "A user and an item of the catalog (an unknown item is answered with 404)." + body_note})
        user: Id = Field(description="a user id (one never seen in training works too)", examples=["ml:1"])
        item: Id = Field(description="an item id of the catalog", examples=["ml:318"])

    class ReviewRequest(Strict):
        model_config = ConfigDict(json_schema_extra={
            "description": "A review's text, and optionally who wrote it about what: the model answers the "
                           "review family's task, the review's summary (headline) or its star rating. A bundle "
                           "not trained on the review family answers 409; an unknown item 404." + body_note})
        text: str = Field(min_length=1, max_length=cfg.max_review_chars, description="the review text (HTML is "
                          "removed and it is cut to the bundle's prompt length, as in training)",
                          examples=["I have bought several of these and found them all to be of good quality."])
        task: Literal["summary", "rating"] = Field("summary", description="summary: a short headline for the "
                                                   "review; rating: the star rating the review carries")
        user: Optional[Id] = Field(None, description="who wrote the review (any id; one of the training data "
                                   "is known to the model)", examples=["ff:A3SGXH7AUHU8GW"])
        item: Optional[Id] = Field(None, description="an item id of the catalog the review is about",
                                   examples=["ff:B001E4KFG0"])

    class CandidatesRequest(Strict):
        model_config = ConfigDict(json_schema_extra={
            "anyOf": [{"required": ["user"], "properties": {"user": {"type": "string"}}},
                      {"required": ["history"], "properties": {"history": {"type": "array"}}}],
            "description": "A known user or a history of catalog item ids, or both (the history is used), answered "
                           "by the bundle's two-tower candidate model (`recflm candidates`): the top k items by "
                           "cosine score, no generation. Unknown ids, or a bundle without a candidate model, are "
                           "answered with 404." + body_note})
        user: Optional[Id] = Field(None, description="a user id of the training data (its history is used when "
                                   "no history is given)", examples=["ml:1"])
        history: Optional[list[Id]] = Field(None, min_length=1, max_length=cfg.max_history,
                                            description="item ids of the catalog the user interacted with, "
                                            "oldest first", examples=[["ml:1", "ml:50"]])
        k: Count = Field(cfg.max_candidates, ge=1, le=cfg.max_candidates, description="how many candidates to return")
        exclude_history: bool = Field(True, description="never return an item of the history")

    return RecommendRequest, PairRequest, ReviewRequest, CandidatesRequest


def add_error_handlers(app) -> None:
    """Validation errors as 422 (400 for a body that is not JSON), other HTTP errors (404, 405) as JSON."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        e = errs[0]
        loc = [str(x) for x in e.get("loc", ()) if x not in ("body", "path", "query")]
        field = ".".join(loc) or "body"
        if e.get("type") == "json_invalid":
            ctx = e.get("ctx") or {}
            return error_response(400, "malformed_json", "body", f"malformed JSON: {ctx.get('error', e.get('msg'))}")
        reason = VALIDATION_REASONS.get(e.get("type"), "wrong_type" if "type" in str(e.get("type")) else "invalid_value")
        if e.get("type") == "missing" and field == "body":
            reason, msg = "missing_field", "a JSON object is required"
        else:
            got = e.get("input")
            quiet = e.get("type") in ("missing", "too_long", "string_too_long") or isinstance(got, (dict, list))
            shown = "" if quiet else f", got {repr(got)[:40]}"
            msg = f"{e.get('msg')}{shown}"
        if len(errs) > 1:
            msg += f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})"
        return error_response(422, reason, field, msg)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400:  # FastAPI could not even decode the body (not UTF-8, ...)
            return error_response(400, "malformed_json", "body", f"malformed JSON: {exc.detail}")
        reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, reason, "", f"{request.method} {request.url.path}: {exc.detail}",
                              headers=dict(exc.headers or {}))  # 405: the Allow header


def add_guard(app, api: "Api") -> None:
    """The middleware in front of every route: auth, body type and size, the JSON 500, the metrics."""
    import hmac

    from fastapi import Request
    from starlette.routing import Match

    cfg = api.cfg

    def endpoint_of(scope) -> str:
        for route in app.router.routes:
            if route.matches(scope)[0] == Match.FULL:
                return route.path
        return "unmatched"

    async def refusal(request: Request, endpoint: str):
        """The 4xx of a request refused before its route runs, or None."""
        if api.token and endpoint not in OPEN_PATHS:
            auth = request.headers.get("authorization", "")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not given or not hmac.compare_digest(given.encode(), api.token.encode()):
                return error_response(401, "unauthorized", "authorization", "a valid 'Authorization: Bearer "
                                      "<token>' header is required" if not given else "wrong bearer token",
                                      headers={"WWW-Authenticate": "Bearer"})
        if request.method != "POST" or endpoint == "unmatched":  # no route for it: the router answers 404 / 405
            return None
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        length = request.headers.get("content-length")
        if ctype != "application/json":
            return error_response(415, "unsupported_media_type", "content-type",
                                  f"send the body as application/json, not {ctype or 'nothing'!r}")
        if length is not None and not length.isdigit():
            return error_response(400, "bad_header", "content-length", f"not a number: {length!r}")
        size = int(length) if length is not None else len(await request.body())
        if size > cfg.max_body_bytes:
            return error_response(413, "body_too_large", "body", f"the body may hold at most {cfg.max_body_bytes} "
                                  f"bytes, this one has {size}")
        return None

    @app.middleware("http")
    async def guard(request: Request, call_next):
        t0 = time.perf_counter()
        endpoint = endpoint_of(request.scope)
        resp = await refusal(request, endpoint)
        if resp is None:
            try:
                resp = await call_next(request)
            except Exception as e:  # a bug, not an input error: say so, log it, keep serving
                logger.exception(f"recflm serve: {request.method} {request.url.path} failed")
                resp = error_response(500, "internal", "", f"internal error ({type(e).__name__}); see the replica log")
        status = resp.status_code
        api.metrics.requests.inc(tags={"endpoint": endpoint, "status": str(status)})
        api.metrics.latency.observe((time.perf_counter() - t0) * 1000, tags={"endpoint": endpoint})
        if 400 <= status < 500:
            api.metrics.invalid.inc(tags={"endpoint": endpoint,
                                          "reason": resp.headers.get("x-recflm-error", str(status))})
        return resp


def declared_errors(body, *statuses: int) -> dict:
    """FastAPI ``responses`` for the error statuses a route answers with, each with ``body``, the error schema."""
    why = {400: "the body is not JSON, or a header is malformed", 401: "a bearer token is required (when auth is on)",
           404: "an id that is not in the catalog or the training data, no such path, or (/v1/candidates) a "
                "bundle without a candidate model",
           409: "the served bundle was not trained on the task's family (no_review_family)",
           413: "the body is larger than max_body_bytes", 415: "the body is not application/json",
           422: "a field is missing, unknown, of the wrong type or out of its range",
           500: "a bug in the service (its log says more)",
           503: "no model replica can answer now: retry after the Retry-After header's seconds"}
    out = {s: {"model": body, "description": why[s]} for s in statuses}
    if 503 in out:
        out[503]["headers"] = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
    if 401 in out:
        out[401]["headers"] = {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}}
    return out


def add_routes(app, api: "Api") -> None:
    from typing import Annotated

    from fastapi import Path as PathParam

    cfg = api.cfg
    RecommendRequest, PairRequest, ReviewRequest, CandidatesRequest = request_models(cfg)
    body = error_schema()
    post = declared_errors(body, 400, 401, 404, 413, 415, 422, 500, 503)
    get = declared_errors(body, 401, 500, 503)

    @app.post("/v1/recommend", summary="Recommend next items for a known user or a raw history of item ids",
              responses=post)
    async def recommend(body: RecommendRequest):
        if body.user is None and body.history is None:
            return error_response(422, "missing_field", "user", "give a known user id ('user') or a history of item "
                                  "ids ('history')")
        out = await api.call("recommend", body.model_dump())
        if "items" in out:
            api.metrics.items.inc(len(out["items"]), tags={"endpoint": "/v1/recommend"})
        return answer(out)

    @app.post("/v1/candidates", summary="Candidate items for a known user or a raw history, by the two-tower "
              "model (fast: no generation)", responses=post)
    async def candidates(body: CandidatesRequest):
        if body.user is None and body.history is None:
            return error_response(422, "missing_field", "user", "give a known user id ('user') or a history of item "
                                  "ids ('history')")
        out = await api.call("candidates", body.model_dump())
        if "items" in out:
            api.metrics.items.inc(len(out["items"]), tags={"endpoint": "/v1/candidates"})
        return answer(out)

    @app.post("/v1/rating", summary="Predict the rating a user gives an item", responses=post)
    async def rating(body: PairRequest):
        return answer(await api.call("rating", body.model_dump()))

    @app.post("/v1/explain", summary="Explain, in text, why an item suits a user", responses=post)
    async def explain(body: PairRequest):
        return answer(await api.call("explain", body.model_dump()))

    @app.post("/v1/review", summary="Summarize a review, or predict the star rating it carries",
              responses=declared_errors(body, 400, 401, 404, 409, 413, 415, 422, 500, 503))
    async def review(body: ReviewRequest):
        return answer(await api.call("review", body.model_dump()))

    @app.get("/v1/items/{item:path}", summary="Look up an item of the catalog",
             responses=declared_errors(body, 401, 404, 422, 500, 503))
    async def item(item: Annotated[str, PathParam(min_length=1, max_length=cfg.max_id_chars)]):
        return answer(await api.call("item", item))

    @app.get("/v1/model", summary="The served bundle: manifest, version and serving settings", responses=get)
    async def model_info():
        out = await api.call("info")
        if "error" in out:
            return answer(out)
        keys = ("beams", "default_k", "max_history", "max_review_chars", "max_candidates", "max_body_bytes",
                "max_batch_size", "min_replicas", "max_replicas", "dtype", "layout")
        return {**out, "api_version": API_VERSION, "auth": bool(api.token),
                "limits": {k: getattr(cfg, k) for k in keys}}

    @app.get("/v1/health", summary="Liveness of the ingress and the model deployment (no token needed)",
             responses=declared_errors(body, 500, 503))
    async def health():
        return answer(await api.call("health"))


def build_fastapi(api: "Api"):
    """The FastAPI app of the ingress, with the config's limits in its schema."""
    from fastapi import FastAPI

    from . import __version__

    app = FastAPI(title="recflm", version=__version__,
                  description="Recommendations, rating predictions, explanations and review summaries from one "
                              "text-to-text model.")
    add_error_handlers(app)
    add_guard(app, api)
    add_routes(app, api)
    return app
