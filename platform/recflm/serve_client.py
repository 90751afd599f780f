"""The demo client of ``recflm serve --demo``: a few real requests against a running service, printed with
their answers (a known user's recommendations, a raw history's, a rating, an explanation, an item, a
review's summary and rating for a review-family bundle, and one bad request with its error). Standard library only, as a user's own client might be."""
from __future__ import annotations

import json


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
    if info.get("review_family"):
        text = "I have bought several of these and they were all of good quality. My dog loves them."
        _, rv = call("POST", "/v1/review", {"text": text, "task": "summary"})
        log(f"  summary: {rv.get('summary')!r}")
        _, rv = call("POST", "/v1/review", {"text": text, "task": "rating"})
        log(f"  rating: {rv.get('rating')}")
    _, bad = call("POST", "/v1/recommend", {"history": ["no-such-item"], "k": 500})
    log(f"  {bad.get('message')}")
    return 0
