"""The collector daemon: receivers -> ingest pipeline -> span writer, plus upkeep.

``Collector(config).start()`` binds the ports and returns; ``stop()`` stops taking
requests, commits what was admitted, and releases the writer id. Both are
idempotent, and ``stop()`` is safe without ``start()``.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import threading
from types import FrameType

from tracetrain.collector.compactor import Compactor
from tracetrain.collector.config import CollectorConfig
from tracetrain.collector.feedback import FeedbackService
from tracetrain.collector.grpc_receiver import GrpcReceiver
from tracetrain.collector.http_receiver import HttpReceiver
from tracetrain.collector.ingest import IngestPipeline
from tracetrain.collector.metrics import CollectorMetrics
from tracetrain.collector.span_writer import SpanWriter

logger = logging.getLogger(__name__)


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas for this process (call before threads start).

    glibc gives each busy thread its own arena (up to 8 per core) and keeps freed
    memory in it; with dozens of receiver threads that alone doubled the RSS under
    load. Returns False where glibc or mallopt is not available.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


_M_ARENA_MAX = -8  # from glibc's malloc.h


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"endpoint {endpoint!r} must be host:port")
    return host.strip("[]") or "127.0.0.1", int(port)


class Collector:
    """One daemon process's worth of collector."""

    def __init__(self, config: CollectorConfig) -> None:
        self.config = config
        self.metrics = CollectorMetrics()
        self.writer = SpanWriter(
            config.data_path, self.metrics, writer_id=config.writer_id,
            max_pending_bytes=config.max_pending_bytes, fsync=config.fsync)
        self.pipeline = IngestPipeline(
            self.writer, self.metrics, max_request_bytes=config.max_request_bytes,
            max_value_bytes=config.max_value_bytes)
        self.feedback = FeedbackService(self.pipeline, config.data_path)
        self.compactor = Compactor(
            config.data_path, self.writer.writer_id, self.writer.allocate_seq, self.metrics,
            interval_s=config.compact_interval_s, min_files=config.compact_min_files,
            retention_days=config.retention_days)
        self.grpc: GrpcReceiver | None = None
        self.http: HttpReceiver | None = None
        self.dashboard = None  # tracetrain.collector.ui.api.DashboardApi when the UI is on
        self._started = False
        self._stopped = threading.Event()

    @property
    def grpc_port(self) -> int | None:
        return self.grpc.port if self.grpc else None

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http else None

    def start(self) -> "Collector":
        if self._started:
            return self
        self._started = True
        cfg = self.config
        self.writer.start()
        try:
            if cfg.grpc_endpoint:
                self.grpc = GrpcReceiver(self.pipeline, cfg.grpc_endpoint, cfg.auth_token,
                                         cfg.tls_cert_file, cfg.tls_key_file, feedback=self.feedback)
                self.grpc.start()
            if cfg.http_endpoint:
                host, port = split_endpoint(cfg.http_endpoint)
                self.http = HttpReceiver(self.pipeline, host, port, cfg.auth_token,
                                         cfg.tls_cert_file, cfg.tls_key_file, feedback=self.feedback)
                if cfg.ui:
                    self._add_dashboard(self.http)
                self.http.start()
        except BaseException:
            self.stop()
            raise
        self.compactor.start()
        logger.info(
            "tracetrain collector: writer %s on %s; OTLP/gRPC %s, OTLP/HTTP %s%s",
            self.writer.writer_id, cfg.data_dir,
            f"{cfg.grpc_endpoint.rpartition(':')[0]}:{self.grpc_port}" if self.grpc else "off",
            f"{self.http.host}:{self.http_port}" if self.http else "off",
            " (auth token required)" if cfg.auth_token else "")
        if self.dashboard is not None and self.http is not None:
            scheme = "https" if cfg.tls_cert_file else "http"
            logger.info("tracetrain dashboard: %s://%s:%s/ui", scheme, self.http.host, self.http_port)
        return self

    def _add_dashboard(self, http: HttpReceiver) -> None:
        from tracetrain.collector.ui.api import DashboardApi  # duckdb queries only when the UI is on

        self.dashboard = DashboardApi(self.config.data_path, self.metrics)
        http.extra_routes.extend(self.dashboard.routes())
        http.cookie_auth_prefixes["/ui"] = self.dashboard.unauthorized
        self.dashboard.start()

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self.grpc is not None:
            self.grpc.stop(grace_s=10.0)  # in-flight exports finish and are acknowledged
        if self.http is not None:
            self.http.stop()
        if self.dashboard is not None:
            self.dashboard.close()
        self.compactor.close()
        self.feedback.close()
        self.writer.close()
        logger.info("tracetrain collector stopped")

    def wait(self, timeout_s: float | None = None) -> bool:
        return self._stopped.wait(timeout_s)

    def __enter__(self) -> "Collector":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve_until_signal(self) -> None:
        """Run until SIGINT or SIGTERM, then stop gracefully."""
        stop_requested = threading.Event()

        def request_stop(signum: int, frame: FrameType | None) -> None:
            logger.info("signal %d received: stopping", signum)
            stop_requested.set()

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
        self.start()
        while not stop_requested.wait(0.5):
            pass
        self.stop()
