"""The transport-independent part of an OTLP export: admit, decode, commit.

Both receivers (gRPC and HTTP) call ``IngestPipeline.export`` with the request
bytes and get back an ``ExportResult`` or one of the errors in ``errors``; they
only translate that to their wire status codes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter

from tracetrain.collector import otlp_wire
from tracetrain.collector.errors import PayloadTooLargeError, PermanentError, RetryableError
from tracetrain.collector.log_rows import decode_logs_request
from tracetrain.collector.metrics import CollectorMetrics
from tracetrain.collector.span_rows import decode_request
from tracetrain.collector.span_writer import SpanWriter

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportResult:
    """What to tell the client: how many spans were rejected and why (partial_success)."""

    rejected_spans: int = 0
    error_message: str = ""


class _RateLimitedLog:
    """Log a bad-input line at most once per interval per reason (a flood must not fill disks)."""

    def __init__(self, interval_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}

    def warning(self, reason: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(reason, -1e9) >= self.interval_s:
            self._last[reason] = now
            logger.warning(message, *args)


@dataclass(frozen=True)
class _Counters:
    """Per-item counters of one signal (spans, or log records)."""

    noun: str
    received: Any
    accepted: Any
    refused: Any
    rejected: Any
    duplicate: Any = None


def _log_counters(metrics: CollectorMetrics) -> _Counters:
    def counter(what: str, help_text: str) -> Counter:
        return Counter(f"tracetrain_log_records_{what}", help_text, registry=metrics.registry)

    return _Counters(
        "log records",
        counter("received", "Log records in requests that reached the decoder."),
        counter("accepted", "Log records durably stored and acknowledged."),
        counter("refused", "Log records refused with a retryable error."),
        counter("rejected", "Log records rejected as invalid (partial_success)."))


class IngestPipeline:
    """Admission control, decoding and durable commit for one daemon."""

    def __init__(
        self,
        writer: SpanWriter,
        metrics: CollectorMetrics,
        max_request_bytes: int = 64 << 20,
        max_value_bytes: int = 8 << 20,
        commit_timeout_s: float = 60.0,
        max_concurrent_decodes: int = 1,
    ) -> None:
        self.writer = writer
        self.metrics = metrics
        self.max_request_bytes = max_request_bytes
        self.max_value_bytes = max_value_bytes
        self.commit_timeout_s = commit_timeout_s
        self._log = _RateLimitedLog()
        self._decode_slots = threading.BoundedSemaphore(max_concurrent_decodes)
        self._span_counters = _Counters("spans", metrics.spans_received, metrics.spans_accepted,
                                        metrics.spans_refused, metrics.spans_rejected, metrics.spans_duplicate)
        self._log_counters = _log_counters(metrics)

    def export_logs(self, body: bytes, transport: str, parse: Callable[[bytes], Any], peer: str = "?") -> ExportResult:
        """Store the records of one ExportLogsServiceRequest; return once durable (same rules as spans)."""
        return self.export(body, transport, parse, peer, logs=True)

    def export(self, body: bytes, transport: str, parse: Callable[[bytes], Any] = otlp_wire.parse_protobuf,
               peer: str = "?", logs: bool = False) -> ExportResult:
        """Store the spans of one ExportTraceServiceRequest (or log records); return once durable.

        Raises:
            PermanentError: malformed or oversized request (do not retry).
            RetryableError: over capacity or storage trouble (retry later).
        """
        received_ns = time.time_ns()
        if len(body) > self.max_request_bytes:
            self._bad(transport, "too_large", peer, f"{len(body)} bytes")
            raise PayloadTooLargeError(
                f"request is {len(body)} bytes, over the {self.max_request_bytes}-byte limit")
        try:
            ticket = self.writer.admit(len(body))
        except RetryableError:
            self.metrics.requests.labels(transport, "refused").inc()
            raise
        try:
            try:
                # Decoding is pure-Python CPU work under the GIL: more threads at it only
                # add switching overhead and hold more decoded objects in memory at once.
                with self._decode_slots:
                    request = parse(body)
                    if logs:
                        decoded = decode_logs_request(request, received_ns, self.max_value_bytes)
                    else:
                        decoded = decode_request(request, received_ns, self.max_value_bytes,
                                                 self.writer.active_recent_keys())
                    # The parsed message and the wrappers decoding created weigh ~15x the wire
                    # bytes; drop them now rather than while this request waits for its commit.
                    del request
            except PermanentError as exc:
                self._bad(transport, "malformed", peer, str(exc))
                raise
            future = self.writer.submit(decoded, ticket, received_ns)
        except BaseException:
            ticket.release()
            raise
        counters = self._log_counters if logs else self._span_counters
        counters.received.inc(decoded.spans_total)
        try:
            future.result(timeout=self.commit_timeout_s)
        except RetryableError:
            counters.refused.inc(decoded.rows)
            self.metrics.requests.labels(transport, "refused").inc()
            raise
        except TimeoutError:
            counters.refused.inc(decoded.rows)
            self.metrics.requests.labels(transport, "refused").inc()
            raise RetryableError("commit did not finish in time; retry later", 2.0) from None
        counters.accepted.inc(decoded.rows + decoded.spans_duplicate)
        if counters.duplicate is not None:
            counters.duplicate.inc(decoded.spans_duplicate)
        if decoded.spans_rejected:
            counters.rejected.inc(decoded.spans_rejected)
            self.metrics.requests.labels(transport, "partial").inc()
            self._log.warning("rejected_" + counters.noun, "%s export from %s: rejected %d of %d %s: %s", transport,
                              peer, decoded.spans_rejected, decoded.spans_total, counters.noun,
                              decoded.rejection_messages[0])
            message = f"rejected {decoded.spans_rejected} of {decoded.spans_total} {counters.noun}: " + "; ".join(
                decoded.rejection_messages)
            return ExportResult(decoded.spans_rejected, message)
        self.metrics.requests.labels(transport, "ok").inc()
        return ExportResult()

    def _bad(self, transport: str, reason: str, peer: str, detail: str) -> None:
        self.metrics.bad_requests.labels(reason).inc()
        self.metrics.requests.labels(transport, "invalid").inc()
        self._log.warning(reason, "%s export from %s refused (%s): %s", transport, peer, reason, detail[:300])

    def count_bad(self, transport: str, reason: str, peer: str, detail: str) -> None:
        """Count (and log, rate-limited) a request refused before it reached ``export``."""
        self._bad(transport, reason, peer, detail)

    def count_unauthenticated(self, transport: str) -> None:
        self.metrics.requests.labels(transport, "unauthenticated").inc()
        self.metrics.bad_requests.labels("unauthenticated").inc()
