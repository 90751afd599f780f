"""The model side of ``recflm serve``: one loaded bundle (``ModelState``) and the model deployment
(``Recommender``) that answers with batched model calls.

``ModelState`` holds everything derived from one bundle: the catalog and its constrained-decoding trie, the
bundle's prompt templates and inference settings, the known users' training histories from the dataset the
bundle was trained on (``PreparedData``), the weights cast to the served dtype. A rollout builds a new one
beside the old and swaps it in whole.

``Recommender`` (wrapped by ``serve.deployment`` in ``serve.build_app``) gets its bundle through
``user_config`` (``reconfigure``), checks item and user ids against its own catalog and answers with batched
model calls (``serve.batch``): constrained beam search over the catalog for recommendations (catalog items
only, the history excluded), expected-rating decoding (the mean over the scale's rating texts) for ratings
and review ratings, beam decoding for explanations and review summaries (``review``: only for a bundle
trained on the review family, else a 409 ``no_review_family``). Its methods take requests the ingress
(``serve_api``) already validated, and answer a dict, or ``{"error": {...}}`` (``model_error``) that the
ingress turns into a 4xx.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from .prompts import rated_positions, rating_input, sequential_input

if TYPE_CHECKING:
    from .serve import ServeConfig

logger = logging.getLogger("ray.serve")


def log_now(level: int, message: str) -> None:
    """Log an operator-facing message and write it out at once: Serve's throughput mode buffers a replica's
    log records (RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE) until the buffer fills or an error comes."""
    logger.log(level, message)
    for handler in logger.handlers:
        handler.flush()


def model_error(status: int, reason: str, field: str, message: str, retry_after: int | None = None) -> dict:
    """The answer for a request the model side refuses: the ingress sends it as a JSON error with ``status``
    (and a ``Retry-After`` header when ``retry_after`` seconds are given)."""
    out = {"status": status, "reason": reason, "field": field, "message": message}
    return {"error": {**out, "retry_after": retry_after} if retry_after is not None else out}



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


def json_safe(obj):
    """``obj`` with every NaN or infinite float as None: a manifest's metrics may hold NaN (a bundle trained
    without a next-item family has no val_ndcg10), and JSON has no NaN."""
    import math

    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _listing(values: list, limit: int = 10) -> str:
    shown = ", ".join(repr(v) for v in values[:limit])
    return shown + (f" and {len(values) - limit} more" if len(values) > limit else "")


REVIEW_TASKS = {"summary": "{summary}", "rating": "{rating}"}  # POST /v1/review's task -> the template target


def review_templates(temps: list) -> dict:
    """task -> [(seen review template with that target, the fields its source needs)], most fields first: a
    request is rendered with the first whose fields it has (``user``, ``item``, ``text``)."""
    from string import Formatter

    def needs(t) -> frozenset:
        return frozenset(f for _, f, _, _ in Formatter().parse(t.source) if f)

    out = {}
    for task, target in REVIEW_TASKS.items():
        seen = [(t, needs(t)) for t in temps if not t.held_out and t.target == target
                and needs(t) <= {"user", "item", "text"}]
        out[task] = sorted(seen, key=lambda tn: -len(tn[1]))
    return out


class ModelState:
    """One loaded bundle and everything derived from it; replaced whole on a rollout."""

    def __init__(self, bundle: str, data: str = "", dtype: str = "float32"):
        from .bundle import load_bundle
        from .generate import CatalogTrie, ConstrainedBeamSearch
        from .prompts import load_templates, rating_template, sequential_template

        t0 = time.perf_counter()
        self.bundle = load_bundle(bundle)
        b = self.bundle
        self.path = str(Path(bundle).resolve())
        self.manifest = json_safe(b.manifest)  # what GET /v1/model answers (JSON)
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
        # dense rating bundles read the user's (item, rating) pairs, then the item, as the decoder prefix
        self.dense_rating = self.inference.get("rating") == "dense"
        self.t_rating = rating_template(temps, True) if self.dense_rating else first_seen(
            "rating", {"user", "item", "item_desc"})
        self.rating_history = int(self.inference.get("rating_history", 0))
        self.t_explain = first_seen("explanation", {"user", "item", "item_desc"})
        # the review family (POST /v1/review): its first seen templates per answer, when the bundle learnt it
        self.review_family = "review" in (b.manifest.get("families") or []) and "review" in temps
        self.t_review = review_templates(temps.get("review", [])) if self.review_family else {}
        self.data_dir = data or b.manifest.get("data", {}).get("path") or ""
        self._read_dataset()
        if "history" in self.inference:  # the bundle says how many history items its input holds
            self.max_prompt_history = int(self.inference["history"])
        self._entries = [self._entry(i) for i in range(len(cat))]
        self._load_candidates()
        self.load_s = round(time.perf_counter() - t0, 2)

    def _load_candidates(self) -> None:
        """The bundle's two-tower candidate model (``recflm candidates``), if it has one, with the catalog's
        item vectors computed once; it must name the bundle's items, in the same order."""
        from .baselines import TwoTower
        from .bundle import BundleError

        self.candidates, self.candidate_items = None, None
        if not (self.bundle.path / TwoTower.CONFIG).is_file():
            return
        model = TwoTower.load(self.bundle.path)
        if model.config.get("items") != [str(k) for k in self.catalog["item"]]:
            raise BundleError(f"{self.bundle.path / TwoTower.CONFIG}: the candidate model was trained on another "
                              f"catalog ({model.n_items} items); run `recflm candidates --bundle {self.bundle.path}` "
                              "again")
        self.candidates, self.candidate_items = model, model.item_matrix()

    def _read_dataset(self) -> None:
        """Known users' training histories (and their ratings) and the prompt settings from the dataset, when
        it is there."""
        from .bundle import check_catalog
        from .config import PrepareConfig, PromptConfig
        from .dataset import SEQUENCES, PreparedData

        self.histories: dict[str, list[int]] = {}
        self.ratings: dict[str, list[float]] = {}
        self.max_prompt_history = PromptConfig().max_history
        self.max_text_chars = PromptConfig().max_text_chars  # review text in prompts is cut to this, as in training
        self.scale = (PrepareConfig().rating_min, PrepareConfig().rating_max)
        if not (self.data_dir and (Path(self.data_dir) / SEQUENCES).exists()):
            self.histories_from = None
            log_now(logging.WARNING, f"recflm serve: no dataset at {self.data_dir!r}: known-user requests are off, "
                           "requests must carry a history")
            return
        data = PreparedData.open(self.data_dir)
        check_catalog(self.catalog, self.data_dir)  # another dataset's item indices would name other items
        pc = data.manifest.get("config", {})
        self.max_prompt_history = int(pc.get("prompts", {}).get("max_history", self.max_prompt_history))
        self.scale = (float(pc.get("rating_min", self.scale[0])), float(pc.get("rating_max", self.scale[1])))
        s = data.sequences_pandas(columns=["user", "index", "n_train"] + (["ratings"] if self.dense_rating else []))
        self.histories = {str(u): [int(i) for i in ix[:int(n)]] for u, ix, n in
                          zip(s["user"], s["index"], s["n_train"])}
        if self.dense_rating:
            self.ratings = {str(u): [float(r) for r in rs[:int(n)]] for u, rs, n in
                            zip(s["user"], s["ratings"], s["n_train"])}
        self.histories_from = str(data.path / SEQUENCES)
        self.max_text_chars = int(pc.get("prompts", {}).get("max_text_chars", self.max_text_chars))

    def rating_prompt(self, user: str, item: int) -> tuple[str, list | None]:
        """A dense rating bundle's input for (user, catalog index): the source and the decoder prefix of the
        user's rated training items (none for an unknown user), then the item."""
        hist, rates = self.histories.get(user, []), self.ratings.get(user, [])
        known = rated_positions(rates, len(rates))
        return rating_input(self.t_rating, [self.ids[hist[k]] for k in known], [rates[k] for k in known],
                            self.ids[item], self.rating_history + 1, *self.scale)

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

    def __init__(self, cfg: "ServeConfig", metrics=None):
        import torch
        from ray import serve

        from .serve_metrics import ServeMetrics

        self.cfg = cfg
        torch.set_num_threads(max(1, int(cfg.threads)))
        self.metrics = metrics or ServeMetrics()
        self.state: ModelState | None = None
        batch = dict(max_batch_size=cfg.max_batch_size, batch_wait_timeout_s=cfg.batch_wait_timeout_s)
        self._recommend = serve.batch(**batch)(self._recommend_batch)
        self._rate = serve.batch(**batch)(self._rate_batch)
        self._explain = serve.batch(**batch)(self._explain_batch)
        self._summarize = serve.batch(**batch)(self._summarize_batch)
        self._review_rate = serve.batch(**batch)(self._review_rate_batch)
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
        new = ModelState(bundle, user_config.get("data") or "", self.cfg.dtype)
        self.state = new  # requests already running finish with the state they started with
        log_now(logging.INFO, f"recflm serve: serving bundle {new.path} (version {new.version}, {len(new.ids)} items, "
                    f"{len(new.histories)} known users, loaded in {new.load_s} s)")

    def check_health(self) -> None:
        if self.state is None:
            raise RuntimeError("no bundle loaded")

    # -------------------------------------------------------------- requests (validated by the Api)
    def _unknown_items(self, st: ModelState, keys: list[str], field: str) -> dict | None:
        unknown = [k for k in keys if k not in st.index]
        if unknown:
            return model_error(404, "unknown_item", field, f"unknown item ids: {_listing(unknown)} "
                        f"(not in the catalog of {len(st.ids)} items)")
        return None

    def _history(self, st: ModelState, req: dict) -> tuple[list[int], str, dict | None]:
        """(catalog indices, where they came from, None) of a request's history (or, without one, the known
        user's training history), or ([], "", the 4xx answer) for unknown item ids or an unknown user."""
        user, history = req.get("user"), req.get("history")
        if history is not None:
            bad = self._unknown_items(st, history, "history")
            if bad:
                return [], "", bad
            return [st.index[h] for h in history], "request", None
        if user in st.histories:
            return st.histories[user], "training data", None
        why = "no dataset with users' histories is loaded" if st.histories_from is None else \
            "not a user of the training data"
        return [], "", model_error(404, "unknown_user", "user", f"unknown user {user!r} ({why}): send its history "
                                   "as a list of item ids in 'history'")

    async def recommend(self, req: dict) -> dict:
        st = self.state
        user = req.get("user")
        hist, source, bad = self._history(st, req)
        if bad:
            return bad
        k = int(req["k"])
        prompt, prefix = sequential_input(st.t_seq, user or "new", [st.ids[i] for i in hist], st.max_prompt_history)
        exclude = set(hist) if req.get("exclude_seen", True) else set()
        found = await self._recommend((st, prompt, exclude, k, prefix))
        return {"user": user, "known_user": user in st.histories, "history_source": source,
                "history_length": len(hist), "k": k,
                "items": [{"rank": r + 1, **st.item_entry(i), "score": round(s, 4)} for r, (i, s) in enumerate(found)],
                "model_version": st.version}

    def candidates(self, req: dict) -> dict:
        """The top ``k`` catalog items by the two-tower's cosine scores after the history: one matrix product,
        no generation (the fast first stage beside ``recommend``)."""
        import numpy as np

        st = self.state
        if st.candidates is None:
            return model_error(404, "no_candidate_model", "", f"the bundle {st.path} has no candidate model: "
                               f"train one with `recflm candidates --bundle {st.path}`")
        user = req.get("user")
        hist, source, bad = self._history(st, req)
        if bad:
            return bad
        k = int(req["k"])
        scores = st.candidates.scores([hist], items=st.candidate_items)[0].astype(np.float64)
        if req.get("exclude_history", True) and hist:
            scores[np.asarray(hist, dtype=np.int64)] = -np.inf
        k = min(k, int(np.isfinite(scores).sum()))
        top = np.argpartition(-scores, k - 1)[:k] if k else np.zeros(0, dtype=np.int64)
        top = top[np.lexsort((top, -scores[top]))]  # best first, ties by catalog index
        return {"user": user, "known_user": user in st.histories, "history_source": source,
                "history_length": len(hist), "k": k, "model": "two-tower",
                "items": [{"rank": r + 1, **st.item_entry(int(i)), "score": round(float(scores[i]), 4)}
                          for r, i in enumerate(top)],
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
        if st.dense_rating:
            bad = self._unknown_items(st, [req["item"]], "item")
            if bad:
                return bad
            prompt, prefix = st.rating_prompt(req["user"], st.index[req["item"]])
        else:
            (prompt, bad), prefix = self._pair_prompt(st, req, st.t_rating), None
            if bad:
                return bad
        text = await self._rate((st, prompt, prefix))
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

    async def review(self, req: dict) -> dict:
        """A review's summary or star rating, from its text (and who wrote it about what, when given)."""
        from .clean import normalise_text
        from .generate import parse_rating
        from .prompts import format_rating

        st, task = self.state, req.get("task") or "summary"
        if not st.review_family:
            return model_error(409, "no_review_family", "task", f"the served bundle was not trained on the review "
                               f"family (its families: {', '.join(st.manifest.get('families') or []) or 'none'})")
        item, user = req.get("item"), req.get("user")
        if item is not None:
            bad = self._unknown_items(st, [item], "item")
            if bad:
                return bad
        have = {"text"} | ({"user"} if user is not None else set()) | ({"item"} if item is not None else set())
        # the template that uses the most of what the request gives; an anonymous writer is "new", as in recommend
        temp = next((t for t, need in st.t_review.get(task, []) if need <= have), None) or \
            next((t for t, need in st.t_review.get(task, []) if need <= have | {"user"}), None)
        if temp is None:
            return model_error(409, "no_review_family", "task", f"the bundle's review templates have no seen "
                               f"template for task {task!r}")
        import pandas as pd

        text = normalise_text(pd.Series([req["text"]], dtype="object")).iloc[0] or ""
        fields = {"text": text[:st.max_text_chars], "user": user or "new",
                  "item": st.ids[st.index[item]] if item is not None else "", "summary": "",
                  "rating": format_rating(st.scale[0])}
        prompt = temp.render(fields)[0]
        out = {"task": task, "user": user, "item": item, "known_user": user in st.histories if user else False,
               "template": temp.id, "model_version": st.version}
        if task == "summary":
            return {**out, "summary": await self._summarize((st, prompt))}
        answer = await self._review_rate((st, prompt))
        value = parse_rating(answer, *st.scale)
        out.update(rating=value, text=answer, scale=list(st.scale))
        if value is None:
            out["parse_error"] = f"the model's output {answer!r} is not a number in [{st.scale[0]}, {st.scale[1]}]"
        return out

    def item(self, key: str) -> dict:
        st = self.state
        if key not in st.index:
            return model_error(404, "unknown_item", "item", f"unknown item id {key!r} (not in the catalog of "
                        f"{len(st.ids)} items)")
        return st.item_entry(st.index[key])

    def info(self) -> dict:
        st = self.state
        return {"bundle": st.path, "model_version": st.version, "manifest": st.manifest, "items": len(st.ids),
                "known_users": len(st.histories), "histories": st.histories_from,
                "example_users": list(st.histories)[:3], "prompt_history": st.max_prompt_history,
                "rating_scale": list(st.scale),
                "candidates": None if st.candidates is None else {
                    "model": "two-tower", "dim": st.candidates.dim, "attribute_values": st.candidates.n_attrs,
                    "best_val_ndcg10": st.candidates.best_val_ndcg10, "trained_unix": st.candidates.config.get(
                        "trained_unix")},
                "templates": {"sequential": st.t_seq.id, "rating": st.t_rating.id, "explanation": st.t_explain.id,
                              **({f"review-{k}": [t.id for t, _ in v] for k, v in st.t_review.items()})},
                "review_family": st.review_family}

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
            items, scores = st.search.search(enc, beams=self.cfg.beams, k=max(jobs[j][3] for j in group),
                                             exclude=[jobs[j][2] for j in group], prefix=prefix)
            for r, j in enumerate(group):
                found = [(int(i), float(s)) for i, s in zip(items[r].tolist(), scores[r].tolist()) if i >= 0]
                out[j] = found[:jobs[j][3]]
        return out

    def _texts(self, jobs: list[tuple], answer) -> list[str]:
        """``answer(state, jobs of the state)`` for each bundle's group of jobs, in the jobs' order."""
        out: list = [None] * len(jobs)
        for group in self._groups(jobs):
            for j, t in zip(group, answer(jobs[group[0]][0], [jobs[j] for j in group])):
                out[j] = t
        return out

    def _generate(self, jobs: list[tuple], tokens: int, beams: int) -> list[str]:
        from .generate import generate_text

        return self._texts(jobs, lambda st, js: generate_text(st.bundle.model, st.bundle.tokenizer, [j[1] for j in js],
                                                              tokens, beams, st.max_source_len))

    async def _rate_batch(self, jobs: list[tuple]) -> list[str]:
        import asyncio

        self.metrics.batch.observe(len(jobs), tags={"task": "rating"})
        return await asyncio.to_thread(self._expected_ratings, jobs)

    def _expected_ratings(self, jobs: list[tuple]) -> list[str]:
        """The expected rating over the scale's rating texts (or, dense rating bundles, rating tokens after
        the prefix), as ``recflm evaluate`` scores it."""
        from .generate import predict_ratings, predict_ratings_dense

        def answer(st, js):
            m, tok, prompts = st.bundle.model, st.bundle.tokenizer, [j[1] for j in js]
            if st.dense_rating:
                return predict_ratings_dense(m, tok, prompts, [j[2] for j in js], *st.scale, st.max_source_len)
            return predict_ratings(m, tok, prompts, *st.scale, st.max_source_len)

        return self._texts(jobs, answer)

    async def _explain_batch(self, jobs: list[tuple]) -> list[str]:
        import asyncio

        self.metrics.batch.observe(len(jobs), tags={"task": "explain"})
        return await asyncio.to_thread(self._generate, jobs, self.cfg.explain_tokens, self.cfg.explain_beams)

    async def _summarize_batch(self, jobs: list[tuple]) -> list[str]:
        import asyncio

        self.metrics.batch.observe(len(jobs), tags={"task": "review"})
        return await asyncio.to_thread(self._generate, jobs, self.cfg.explain_tokens, self.cfg.explain_beams)

    async def _review_rate_batch(self, jobs: list[tuple]) -> list[str]:
        """Review ratings: the expected rating over the scale's rating texts, whatever the bundle's rating style
        (the review family is always prompt style), as ``recflm evaluate`` scores ``review-rating``."""
        import asyncio

        from .generate import predict_ratings

        self.metrics.batch.observe(len(jobs), tags={"task": "review-rating"})
        return await asyncio.to_thread(self._texts, jobs, lambda st, js: predict_ratings(
            st.bundle.model, st.bundle.tokenizer, [j[1] for j in js], *st.scale, st.max_source_len))
