"""Error kinds at the collector's boundaries, as in the OpenTelemetry Collector.

A ``PermanentError`` means the data itself is bad: retrying the same bytes can never
succeed (gRPC ``INVALID_ARGUMENT``, HTTP 400). A ``RetryableError`` means the collector
cannot take the data *now* (full queue, storage trouble, shutting down): the client
should retry after ``retry_after_s`` (gRPC ``UNAVAILABLE`` + ``RetryInfo``, HTTP 503 +
``Retry-After``). The mapping to wire status codes lives in the receivers, and follows
the OTLP specification's "Failures" section.
"""

from __future__ import annotations


class PermanentError(Exception):
    """The request is malformed or unacceptable; do not retry it."""


class PayloadTooLargeError(PermanentError):
    """The (decompressed) request is larger than the configured limit."""


class UnauthenticatedError(Exception):
    """The request lacks the bearer token the collector was started with."""


class RetryableError(Exception):
    """The collector cannot take the request now; retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
