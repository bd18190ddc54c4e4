"""The collector's own Prometheus metrics (served at ``/metrics``).

Each daemon has its own registry, so tests can run several in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class CollectorMetrics:
    """Counters for everything that enters, is stored, refused or rejected."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.spans_received = Counter(
            "tracetrain_spans_received", "Spans in requests that reached the decoder.", registry=r)
        self.spans_accepted = Counter(
            "tracetrain_spans_accepted", "Spans durably stored and acknowledged.", registry=r)
        self.spans_duplicate = Counter(
            "tracetrain_spans_duplicate",
            "Spans acknowledged without storing again: retries of spans stored before a restart.", registry=r)
        self.spans_refused = Counter(
            "tracetrain_spans_refused",
            "Decoded spans refused with a retryable error (storage trouble, commit timeout). Requests refused "
            "before decoding (over max_pending_bytes) are counted in tracetrain_requests_total{outcome=\"refused\"}.",
            registry=r)
        self.spans_rejected = Counter(
            "tracetrain_spans_rejected", "Spans rejected as invalid (partial_success or a 400).", registry=r)
        self.requests = Counter(
            "tracetrain_requests", "Export requests by transport and outcome.",
            ["transport", "outcome"], registry=r)
        self.bad_requests = Counter(
            "tracetrain_bad_requests", "Requests refused as malformed, by reason.", ["reason"], registry=r)
        self.bytes_written = Counter(
            "tracetrain_log_bytes_written", "Bytes of Parquet committed to the store.", registry=r)
        self.files_written = Counter("tracetrain_files_written", "Span files committed.", registry=r)
        self.commit_failures = Counter(
            "tracetrain_commit_failures", "Group commits that failed (clients were told to retry).", registry=r)
        self.compactions = Counter("tracetrain_compactions", "Span files merged by the compactor.", registry=r)
        self.pending_bytes = Gauge(
            "tracetrain_pending_bytes", "Wire bytes of requests admitted but not yet committed.", registry=r)
        self.commit_seconds = Histogram(
            "tracetrain_commit_seconds", "Time to write and fsync one group commit.",
            buckets=_LATENCY_BUCKETS_S, registry=r)
        self.lag_to_queryable_seconds = Histogram(
            "tracetrain_lag_to_queryable_seconds",
            "From receiving a request to its spans being visible to readers (= acknowledged).",
            buckets=_LATENCY_BUCKETS_S, registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
