"""The recflm service's own Prometheus metrics, defined once here with ``ray.serve.metrics``.

Each Serve replica builds one ``ServeMetrics`` in its constructor (Serve adds the ``application``,
``deployment`` and ``replica`` tags from the replica's context, so the objects must be created inside
the replica). Ray's per-node metrics agent exports them next to the built-in ``ray_serve_*`` metrics
on its metrics export port; there every name carries a ``ray_`` prefix and counters a ``_total``
suffix:

    ray_recflm_requests_total{endpoint, status}            requests answered, by route and HTTP status
    ray_recflm_request_latency_ms_{bucket,sum,count}       time in the ingress per request, by route
    ray_recflm_invalid_requests_total{endpoint, reason}    4xx answers by reason (unknown_item, ...)
    ray_recflm_items_returned_total{endpoint}              items in recommendation answers
    ray_recflm_batch_size_{bucket,sum,count}{task}         requests per model batch (recommend, rating, explain)
    ray_recflm_model_info{bundle, model_version}           1 for the bundle a replica serves (re-reported
                                                           every second; a replaced bundle's series ages out)
"""
from __future__ import annotations

LATENCY_MS = [2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]
BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128]

REQUESTS = "recflm_requests"
LATENCY = "recflm_request_latency_ms"
INVALID = "recflm_invalid_requests"
ITEMS = "recflm_items_returned"
BATCH = "recflm_batch_size"
MODEL_INFO = "recflm_model_info"


class ServeMetrics:
    def __init__(self):
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.requests = Counter(REQUESTS, description="Requests answered by the recflm service, by endpoint "
                                "and HTTP status.", tag_keys=("endpoint", "status"))
        self.latency = Histogram(LATENCY, description="Request latency in the recflm ingress (ms).",
                                 boundaries=LATENCY_MS, tag_keys=("endpoint",))
        self.invalid = Counter(INVALID, description="Rejected (4xx) requests by reason.",
                               tag_keys=("endpoint", "reason"))
        self.items = Counter(ITEMS, description="Items returned in recommendation answers.",
                             tag_keys=("endpoint",))
        self.batch = Histogram(BATCH, description="Requests per model batch (@serve.batch).",
                               boundaries=BATCH_SIZES, tag_keys=("task",))
        self.model_info = Gauge(MODEL_INFO, description="The bundle this replica serves (always 1).",
                                tag_keys=("bundle", "model_version"))
