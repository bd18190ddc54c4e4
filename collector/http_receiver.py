"""OTLP/HTTP receiver plus the daemon's HTTP endpoints (aiohttp).

* ``POST /v1/traces``: binary protobuf or JSON (by Content-Type), gzip or not (by
  Content-Encoding), chunked or not; the reply echoes the request's content type.
  Errors carry a ``google.rpc.Status`` body; 400 for bad data, 413 for too large,
  415 for an unknown content type, 503 + ``Retry-After`` for back-pressure, 401
  without the bearer token.
* ``POST /v1/logs``: OTLP/HTTP log records, same rules as ``/v1/traces``.
* ``POST /v1/rewards``: a delayed reward, JSON ``{"episode_id", "value", "name",
  "reward_id", "attributes"}`` (or a protobuf ``AddRewardRequest``); 404 for an
  unknown episode, 409 for a reward id reused for another reward.
* ``GET /metrics``: Prometheus text format. ``GET /healthz``: liveness.

The decode-and-commit work runs in a thread pool so the event loop keeps serving
health checks and other clients while a large request is stored.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import ssl
import threading
import urllib.parse
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web
from google.protobuf import json_format
from google.rpc import code_pb2, status_pb2
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from tracetrain.collector import feedback_proto, log_rows, otlp_wire
from tracetrain.collector.errors import PayloadTooLargeError, PermanentError, RetryableError
from tracetrain.collector.feedback import FeedbackService, RewardConflictError, UnknownEpisodeError
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
        feedback: FeedbackService | None = None,
    ) -> None:
        self.pipeline, self.host, self.port, self.auth_token = pipeline, host, port, auth_token
        self.feedback = feedback
        self.ssl_context = None
        if tls_cert_file and tls_key_file:
            self.ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.ssl_context.load_cert_chain(tls_cert_file, tls_key_file)
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="tracetrain-http")
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.extra_routes: list[web.RouteDef] = []
        # Path prefix -> its 401 reply. Under these prefixes (browser pages: the dashboard) the token
        # may also come as the ``tracetrain_token`` cookie, since a browser cannot add the header.
        self.cookie_auth_prefixes: dict[str, Callable[[web.Request], web.Response]] = {}

    def _app(self) -> web.Application:
        # aiohttp's own limit applies to the body as sent; gzip is bounded in gunzip_limited.
        app = web.Application(client_max_size=self.pipeline.max_request_bytes + 1,
                              middlewares=[self._auth_middleware])
        app.add_routes([
            web.post("/v1/traces", self._traces),
            web.post("/v1/logs", self._logs),
            web.post("/v1/rewards", self._rewards),
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
                prefix = next((p for p in self.cookie_auth_prefixes
                               if request.path == p or request.path.startswith(p + "/")), None)
                if prefix is not None:
                    cookie = urllib.parse.unquote(request.cookies.get("tracetrain_token", ""))
                    if hmac.compare_digest(cookie.encode(), self.auth_token.encode()):
                        return await handler(request)
                    self.pipeline.count_unauthenticated("http")
                    return self.cookie_auth_prefixes[prefix](request)
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
        return await self._otlp(request, otlp_wire.parse_protobuf, otlp_wire.parse_json, self.pipeline.export,
                                "http", trace_service_pb2.ExportTraceServiceResponse, "rejected_spans")

    async def _logs(self, request: web.Request) -> web.Response:
        return await self._otlp(request, log_rows.parse_protobuf, log_rows.parse_json, self.pipeline.export_logs,
                                "http_logs", logs_service_pb2.ExportLogsServiceResponse, "rejected_log_records")

    async def _otlp(self, request: web.Request, parse_protobuf, parse_json, export, transport: str,
                    response_class, rejected_field: str) -> web.Response:
        content_type = request.content_type
        if content_type == JSON:
            parse = parse_json
        elif content_type in (PROTOBUF, "application/protobuf"):
            content_type, parse = PROTOBUF, parse_protobuf
        else:
            self.pipeline.count_bad(transport, "content_type", request.remote or "?", content_type)
            return self._status_response(415, code_pb2.INVALID_ARGUMENT,
                                         f"unsupported Content-Type {content_type!r}; "
                                         f"use {PROTOBUF} or {JSON}", JSON)
        outcome = await self._run(request, content_type, self._decode_and_export, parse, export, transport)
        if isinstance(outcome, web.Response):
            return outcome
        return self._export_response(outcome, content_type, response_class, rejected_field)

    async def _rewards(self, request: web.Request) -> web.Response:
        content_type = request.content_type
        if content_type in ("application/protobuf", PROTOBUF):
            content_type = PROTOBUF
        elif content_type != JSON:
            return self._status_response(415, code_pb2.INVALID_ARGUMENT,
                                         f"unsupported Content-Type {content_type!r}; use {JSON}", JSON)
        if self.feedback is None:
            return self._status_response(404, code_pb2.UNIMPLEMENTED, "no feedback service here", content_type)
        outcome = await self._run(request, content_type, self._add_reward, content_type)
        if isinstance(outcome, web.Response):
            return outcome
        response = feedback_proto.AddRewardResponse(
            accepted=outcome.accepted, duplicate=outcome.duplicate, reward_id=outcome.reward_id)
        if content_type == JSON:
            return web.json_response({"accepted": outcome.accepted, "duplicate": outcome.duplicate,
                                      "reward_id": outcome.reward_id})
        return web.Response(body=response.SerializeToString(), content_type=PROTOBUF)

    async def _run(self, request: web.Request, content_type: str, work, *args):
        """Read the body and run ``work(body, encoding, peer, *args)`` in the pool.

        Returns its result, or the error response the OTLP rules give for what it raised.
        """
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            self.pipeline.count_bad("http", "too_large", request.remote or "?", request.path)
            return self._status_response(413, code_pb2.INVALID_ARGUMENT,
                                         f"request is over the {self.pipeline.max_request_bytes}-byte limit",
                                         content_type)
        encoding = request.headers.get("Content-Encoding", "identity").lower()
        try:
            return await self._loop.run_in_executor(
                self._pool, work, body, encoding, request.remote or "?", *args)
        except PayloadTooLargeError as exc:
            return self._status_response(413, code_pb2.INVALID_ARGUMENT, str(exc), content_type)
        except PermanentError as exc:
            return self._status_response(400, code_pb2.INVALID_ARGUMENT, str(exc), content_type)
        except UnknownEpisodeError as exc:
            return self._status_response(404, code_pb2.NOT_FOUND, str(exc), content_type)
        except RewardConflictError as exc:
            return self._status_response(409, code_pb2.ALREADY_EXISTS, str(exc), content_type)
        except RetryableError as exc:
            response = self._status_response(503, code_pb2.UNAVAILABLE, str(exc), content_type)
            response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
            return response
        except Exception:
            logger.exception("unexpected error in HTTP %s", request.path)
            response = self._status_response(503, code_pb2.UNAVAILABLE, "internal error; retry later", content_type)
            response.headers["Retry-After"] = "2"
            return response

    def _decode_and_export(self, body: bytes, encoding: str, peer: str, parse, export=None,
                           transport: str = "http") -> ExportResult:
        return (export or self.pipeline.export)(self._decompress(body, encoding, peer), transport, parse, peer)

    def _decompress(self, body: bytes, encoding: str, peer: str = "?") -> bytes:
        try:
            if encoding == "gzip":
                return gunzip_limited(body, self.pipeline.max_request_bytes)
            if encoding not in ("identity", ""):
                raise PermanentError(f"unsupported Content-Encoding {encoding!r}; use gzip or none")
        except PermanentError as exc:
            reason = "too_large" if isinstance(exc, PayloadTooLargeError) else "encoding"
            self.pipeline.count_bad("http", reason, peer, str(exc))
            raise
        return body

    def _add_reward(self, body: bytes, encoding: str, peer: str, content_type: str):
        body = self._decompress(body, encoding)
        if content_type == PROTOBUF:
            try:
                message = feedback_proto.AddRewardRequest.FromString(body)
            except Exception as exc:  # DecodeError and friends
                raise PermanentError(f"malformed AddRewardRequest: {exc}") from None
            fields = json_format.MessageToDict(message, preserving_proto_field_name=True)
            fields["value"] = message.value if message.HasField("value") else None
            fields["time_unix_nano"] = message.time_unix_nano or None
        else:
            try:
                fields = json.loads(body.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError) as exc:
                raise PermanentError(f"malformed JSON: {exc}") from None
            if not isinstance(fields, dict):
                raise PermanentError('the body must be a JSON object {"episode_id", "value", ...}')
        unknown = set(fields) - {"episode_id", "value", "name", "reward_id", "attributes", "time_unix_nano"}
        if unknown:
            raise PermanentError(f"unknown fields {sorted(unknown)}")
        if fields.get("value") is None:
            raise PermanentError("value is required")
        time_ns = fields.get("time_unix_nano")
        if isinstance(time_ns, str) and time_ns.isdigit():
            time_ns = int(time_ns)
        return self.feedback.add_reward(fields.get("episode_id"), fields["value"], fields.get("name"),
                                        fields.get("reward_id"), fields.get("attributes"), time_ns,
                                        "http_feedback", peer)

    @staticmethod
    def _export_response(result: ExportResult, content_type: str,
                         response_class=trace_service_pb2.ExportTraceServiceResponse,
                         rejected_field: str = "rejected_spans") -> web.Response:
        response = response_class()
        if result.rejected_spans or result.error_message:
            setattr(response.partial_success, rejected_field, result.rejected_spans)
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
