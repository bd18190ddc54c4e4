"""OTLP/HTTP receiver plus the daemon's HTTP endpoints (aiohttp).

* ``POST /v1/traces``: binary protobuf or JSON (by Content-Type), gzip or not (by
  Content-Encoding), chunked or not; the reply echoes the request's content type.
  Errors carry a ``google.rpc.Status`` body; 400 for bad data, 413 for too large,
  415 for an unknown content type, 503 + ``Retry-After`` for back-pressure, 401
  without the bearer token.
* ``GET /metrics``: Prometheus text format. ``GET /healthz``: liveness.

The decode-and-commit work runs in a thread pool so the event loop keeps serving
health checks and other clients while a large request is stored.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import ssl
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web
from google.protobuf import json_format
from google.rpc import code_pb2, status_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from tracetrain.collector import otlp_wire
from tracetrain.collector.errors import PayloadTooLargeError, PermanentError, RetryableError
from tracetrain.collector.ingest import ExportResult, IngestPipeline

logger = logging.getLogger(__name__)
PROTOBUF = "application/x-protobuf"
JSON = "application/json"


def gunzip_limited(body: bytes, limit: int) -> bytes:
    """Decompress gzip without ever holding more than ``limit`` bytes (zip bombs)."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise PermanentError(f"body is not valid gzip: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise PayloadTooLargeError(f"decompressed request is over the {limit}-byte limit")
    if not inflater.eof:
        raise PermanentError("gzip body is truncated")
    return out


class HttpReceiver:
    """aiohttp server for OTLP/HTTP, /metrics and /healthz, in its own thread."""

    def __init__(
        self,
        pipeline: IngestPipeline,
        host: str,
        port: int,
        auth_token: str | None = None,
        tls_cert_file: str | None = None,
        tls_key_file: str | None = None,
        max_workers: int = 16,
    ) -> None:
        self.pipeline, self.host, self.port, self.auth_token = pipeline, host, port, auth_token
        self.ssl_context = None
        if tls_cert_file and tls_key_file:
            self.ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.ssl_context.load_cert_chain(tls_cert_file, tls_key_file)
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="tracetrain-http")
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.extra_routes: list[web.RouteDef] = []

    def _app(self) -> web.Application:
        # aiohttp's own limit applies to the body as sent; gzip is bounded in gunzip_limited.
        app = web.Application(client_max_size=self.pipeline.max_request_bytes + 1,
                              middlewares=[self._auth_middleware])
        app.add_routes([
            web.post("/v1/traces", self._traces),
            web.get("/metrics", self._metrics),
            web.get("/healthz", self._healthz),
            *self.extra_routes,
        ])
        return app

    def start(self) -> None:
        """Bind and serve; raises OSError if the port is taken."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                self._runner = web.AppRunner(self._app(), access_log=None, handle_signals=False,
                                             auto_decompress=False)  # gunzip_limited bounds it
                self._loop.run_until_complete(self._runner.setup())
                site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context,
                                   reuse_address=True)
                self._loop.run_until_complete(site.start())
                sockets = site._server.sockets if site._server else []  # noqa: SLF001 - to learn port 0
                if sockets:
                    self.port = sockets[0].getsockname()[1]
            except BaseException as exc:  # report bind errors to the caller's thread
                failure.append(exc)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="tracetrain-http", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise OSError(f"cannot listen on {self.host}:{self.port} for OTLP/HTTP: {failure[0]}")

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._thread = None
        self._pool.shutdown(wait=True)

    # ------------------------------------------------------------ handlers

    @web.middleware
    async def _auth_middleware(self, request: web.Request, handler):
        if self.auth_token is not None and request.path != "/healthz":
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), self.auth_token):
                self.pipeline.count_unauthenticated("http")
                return self._status_response(401, code_pb2.UNAUTHENTICATED, "missing or wrong bearer token",
                                             JSON if "json" in request.content_type else PROTOBUF)
        return await handler(request)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _metrics(self, request: web.Request) -> web.Response:
        body = await self._loop.run_in_executor(self._pool, self.pipeline.metrics.exposition)
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def _traces(self, request: web.Request) -> web.Response:
        content_type = request.content_type
        if content_type == JSON:
            parse = otlp_wire.parse_json
        elif content_type in (PROTOBUF, "application/protobuf"):
            content_type, parse = PROTOBUF, otlp_wire.parse_protobuf
        else:
            return self._status_response(415, code_pb2.INVALID_ARGUMENT,
                                         f"unsupported Content-Type {content_type!r}; "
                                         f"use {PROTOBUF} or {JSON}", JSON)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._status_response(413, code_pb2.INVALID_ARGUMENT,
                                         f"request is over the {self.pipeline.max_request_bytes}-byte limit",
                                         content_type)
        encoding = request.headers.get("Content-Encoding", "identity").lower()
        peer = request.remote or "?"
        try:
            result = await self._loop.run_in_executor(
                self._pool, self._decode_and_export, body, encoding, parse, peer)
        except PayloadTooLargeError as exc:
            return self._status_response(413, code_pb2.INVALID_ARGUMENT, str(exc), content_type)
        except PermanentError as exc:
            return self._status_response(400, code_pb2.INVALID_ARGUMENT, str(exc), content_type)
        except RetryableError as exc:
            response = self._status_response(503, code_pb2.UNAVAILABLE, str(exc), content_type)
            response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
            return response
        except Exception:
            logger.exception("unexpected error in OTLP/HTTP export")
            response = self._status_response(503, code_pb2.UNAVAILABLE, "internal error; retry later", content_type)
            response.headers["Retry-After"] = "2"
            return response
        return self._export_response(result, content_type)

    def _decode_and_export(self, body: bytes, encoding: str, parse, peer: str) -> ExportResult:
        if encoding == "gzip":
            body = gunzip_limited(body, self.pipeline.max_request_bytes)
        elif encoding not in ("identity", ""):
            raise PermanentError(f"unsupported Content-Encoding {encoding!r}; use gzip or none")
        return self.pipeline.export(body, "http", parse, peer)

    @staticmethod
    def _export_response(result: ExportResult, content_type: str) -> web.Response:
        response = trace_service_pb2.ExportTraceServiceResponse()
        if result.rejected_spans or result.error_message:
            response.partial_success.rejected_spans = result.rejected_spans
            response.partial_success.error_message = result.error_message
        if content_type == JSON:
            return web.Response(text=json_format.MessageToJson(response, indent=None), content_type=JSON)
        return web.Response(body=response.SerializeToString(), content_type=PROTOBUF)

    @staticmethod
    def _status_response(http_status: int, code: int, message: str, content_type: str) -> web.Response:
        status = status_pb2.Status(code=code, message=message)
        if content_type == JSON:
            return web.Response(status=http_status, text=json_format.MessageToJson(status, indent=None),
                                content_type=JSON)
        return web.Response(status=http_status, body=status.SerializeToString(), content_type=PROTOBUF)
