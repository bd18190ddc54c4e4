"""`tracetrain proxy`: an OpenAI-compatible reverse proxy that records LLM calls.

Put it in front of vLLM and point any agent, in any language, at it instead:

    tracetrain proxy --upstream http://127.0.0.1:8000 --listen 127.0.0.1:8001

For ``POST /v1/chat/completions`` and ``POST /v1/completions`` it asks vLLM for
token ids and logprobs (unless the caller set those fields), relays the answer
byte for byte (SSE chunk by chunk, as it arrives), and emits one LLM span per
choice to the collector over OTLP/gRPC. The span continues the caller's W3C
``traceparent``, and the proxy sends its own span's ``traceparent`` upstream, so
vLLM's ``llm_request`` span joins the same trace. Every other path is relayed
untouched. The proxy never fails a call because of capture: capture errors are
logged and the response still flows; an unreachable upstream is a 502.

Docs: docs/proxy.md.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import click
from aiohttp import web
from multidict import CIMultiDict
from opentelemetry import baggage, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from tracetrain.collector.proxy_capture import (
    CAPTURED_OPERATIONS,
    CONTEXT_BAGGAGE_KEYS,
    CONTEXT_HEADERS,
    CallRecord,
    SseParser,
    augment_request,
)
from tracetrain.collector.proxy_export import FastArrayOTLPSpanExporter
from tracetrain.collector.proxy_prompt import SystemPromptFile
from tracetrain.instrumentation import semconv as sc

logger = logging.getLogger(__name__)

# RFC 9110 §7.6.1: meaningful for one connection only, never forwarded. Length and
# host are recomputed for the next hop.
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length",
})
_TRACE_HEADERS = frozenset({"traceparent", "tracestate", "baggage"})
# Explicit W3C propagators rather than the global one, so OTEL_PROPAGATORS in the
# proxy's environment cannot change what it reads from callers.
PROPAGATOR = CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])


@dataclass(frozen=True)
class ProxyConfig:
    """Everything `tracetrain proxy` can be told."""

    upstream_url: str
    listen: str = "127.0.0.1:8001"
    collector_url: str = "http://127.0.0.1:4317"
    service_name: str = "tracetrain-proxy"
    auth_token: str | None = None
    upstream_timeout_s: float = 3600.0
    upstream_connect_timeout_s: float = 10.0
    max_request_bytes: int = 64 << 20
    span_schedule_delay_millis: float = 500.0
    system_prompt_file: str | None = None  # replace/insert the system message of chat requests


def upstream_base(url: str) -> str:
    """``scheme://host:port[/prefix]`` with any trailing ``/v1`` dropped.

    Callers' paths already start with ``/v1``; people often paste an OpenAI
    ``base_url`` (``http://host:8000/v1``) as the upstream, so accept both.
    """
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"upstream {url!r} must be an http(s) URL such as http://127.0.0.1:8000")
    path = parts.path.rstrip("/")
    path = path[: -len("/v1")] if path.endswith("/v1") else path
    return f"{parts.scheme}://{parts.netloc}{path}"


def build_tracer_provider(config: ProxyConfig) -> tuple[TracerProvider, FastArrayOTLPSpanExporter]:
    """A TracerProvider exporting over OTLP/gRPC to the collector, batched in the background."""
    headers = {"authorization": f"Bearer {config.auth_token}"} if config.auth_token else None
    exporter = FastArrayOTLPSpanExporter(endpoint=config.collector_url, headers=headers,
                                         insecure=config.collector_url.startswith("http://"))
    provider = TracerProvider(resource=Resource.create({"service.name": config.service_name}))
    # small batches: a span can hold tens of thousands of token ids, and the default
    # 512-span batch could exceed a gRPC message limit
    provider.add_span_processor(BatchSpanProcessor(
        exporter, max_export_batch_size=64, schedule_delay_millis=config.span_schedule_delay_millis))
    return provider, exporter


def _forward_headers(headers: Any, captured: bool) -> CIMultiDict:
    out = CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in _HOP_BY_HOP)
    # aiohttp would otherwise ask for gzip on the caller's behalf; captured calls must be
    # readable by the proxy, the rest keeps whatever the caller accepts
    out["Accept-Encoding"] = "identity" if captured else headers.get("Accept-Encoding", "identity")
    return out


def _response_headers(headers: Any) -> CIMultiDict:
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in _HOP_BY_HOP)


def _error_response(status: int, message: str, error_type: str) -> web.Response:
    """An OpenAI-style error body, so clients raise their usual exception."""
    return web.json_response({"error": {"message": message, "type": error_type, "code": status}}, status=status)


class UpstreamUnavailable(Exception):
    """The upstream could not be reached or did not answer: the caller gets ``status``."""

    def __init__(self, status: int, message: str, error_type: str) -> None:
        super().__init__(message)
        self.status, self.message, self.error_type = status, message, error_type

    def response(self) -> web.Response:
        return _error_response(self.status, self.message, self.error_type)


def caller_context(headers: Any, ctx: Context) -> dict[str, str]:
    """Episode/task/... ids from the caller's baggage, overridden by explicit headers."""
    values = {key: str(value) for key, value in baggage.get_all(ctx).items() if key in CONTEXT_BAGGAGE_KEYS}
    for header, key in CONTEXT_HEADERS.items():
        if headers.get(header):
            values[key] = headers[header]
    return values


class LLMProxy:
    """The proxy server in its own thread and event loop. ``start()`` binds; ``stop()`` flushes spans."""

    def __init__(self, config: ProxyConfig, tracer_provider: TracerProvider | None = None) -> None:
        self.config = config
        self.upstream = upstream_base(config.upstream_url)
        # with our own exporter, token arrays skip the SDK's per-element validation (proxy_export.py)
        self._array_exporter: FastArrayOTLPSpanExporter | None = None
        if tracer_provider is None:
            tracer_provider, self._array_exporter = build_tracer_provider(config)
        self.provider = tracer_provider
        self.tracer = self.provider.get_tracer("tracetrain.proxy")
        self.system_prompt = SystemPromptFile(config.system_prompt_file) if config.system_prompt_file else None
        host, _, port = config.listen.rpartition(":")
        if not port.isdigit():
            raise ValueError(f"--listen {config.listen!r} must be host:port")
        self.host, self.port = host.strip("[]") or "127.0.0.1", int(port)
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._thread: threading.Thread | None = None
        # captured calls whose span is not ended yet: the caller may hold the whole answer
        # a moment before the span ends, and flush() must not miss it
        self._open_calls = 0
        self._calls_done = threading.Condition()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "LLMProxy":
        """Bind and serve; raises OSError if the address is taken. Idempotent."""
        if self._thread is not None:
            return self
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(self._startup())
            except BaseException as exc:  # report bind errors to the caller's thread
                failure.append(exc)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="tracetrain-proxy", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread = None
            raise OSError(f"cannot listen on {self.host}:{self.port}: {failure[0]}")
        return self

    async def _startup(self) -> None:
        app = web.Application(client_max_size=self.config.max_request_bytes)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await self._runner.cleanup()
            raise
        sockets = site._server.sockets if site._server else []  # noqa: SLF001 - to learn port 0
        if sockets:
            self.port = sockets[0].getsockname()[1]
        # created after the bind, with no await before it, so no request can arrive first
        timeout = aiohttp.ClientTimeout(total=self.config.upstream_timeout_s,
                                        sock_connect=self.config.upstream_connect_timeout_s)
        # auto_decompress off: bodies are relayed exactly as the upstream sent them
        self._session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False,
                                              connector=aiohttp.TCPConnector(limit=0))

    def stop(self) -> None:
        """Stop serving, then flush every span still queued. Idempotent."""
        if self._thread is not None:
            async def shutdown() -> None:
                if self._runner is not None:
                    await self._runner.cleanup()
                if self._session is not None:
                    await self._session.close()

            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
            self._thread = None
        self.provider.shutdown()

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait for calls in progress to end (up to ``timeout_s``), then export every span now."""
        deadline = time.monotonic() + timeout_s
        with self._calls_done:
            self._calls_done.wait_for(lambda: self._open_calls == 0, timeout_s)
        return self.provider.force_flush(int(max(0.0, deadline - time.monotonic()) * 1000))

    def __enter__(self) -> "LLMProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve_until_signal(self) -> None:
        """Run until SIGINT or SIGTERM, then stop and flush."""
        stop_requested = threading.Event()

        def request_stop(signum: int, frame: FrameType | None) -> None:
            stop_requested.set()

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
        self.start()
        while not stop_requested.wait(0.5):
            pass
        self.stop()

    # ------------------------------------------------------------ request handling

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        """Every path. Never raises: the agent gets the upstream's answer or a clean error."""
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _error_response(413, f"request is over the proxy's {self.config.max_request_bytes}-byte limit",
                                   "invalid_request_error")
        try:
            operation = CAPTURED_OPERATIONS.get(request.path) if request.method == "POST" else None
            parsed = _json_object(body) if operation else None
            if operation and parsed is not None:
                return await self._captured(request, operation, parsed)
            return await self._transparent(request, body)
        except Exception:  # a bug here must not take the agent down
            logger.exception("proxy error on %s %s", request.method, request.path)
            return _error_response(500, "tracetrain proxy internal error", "proxy_error")

    async def _transparent(self, request: web.Request, body: bytes) -> web.StreamResponse:
        headers = _forward_headers(request.headers, captured=False)
        try:
            upstream = await self._open_upstream(request, body, headers)
        except UpstreamUnavailable as exc:
            return exc.response()
        async with upstream:
            response, _ = await self._relay(request, upstream, lambda data: None)
        return response

    async def _captured(self, request: web.Request, operation: str, body: dict[str, Any]) -> web.StreamResponse:
        with self._calls_done:
            self._open_calls += 1
        try:
            return await self._captured_call(request, operation, body)
        finally:
            with self._calls_done:
                self._open_calls -= 1
                self._calls_done.notify_all()

    async def _captured_call(self, request: web.Request, operation: str, body: dict[str, Any]) -> web.StreamResponse:
        start_ns = time.time_ns()
        if self.system_prompt is not None and operation == "chat":
            body = self.system_prompt.apply(body)  # before the record: the span shows what the model saw
        parent = PROPAGATOR.extract(request.headers)
        record = CallRecord(operation, body, caller_context(request.headers, parent))
        name = f"{operation} {record.request_model}" if record.request_model else operation
        span = self.tracer.start_span(name, context=parent, kind=trace.SpanKind.CLIENT,
                                      attributes=record.request_attributes(self.upstream), start_time=start_ns)
        headers = _forward_headers(request.headers, captured=True)
        for key in _TRACE_HEADERS:
            headers.popall(key, None)
        carrier: dict[str, str] = {}
        PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span, parent))
        headers.update(carrier)
        forwarded = json.dumps(augment_request(operation, body), ensure_ascii=False).encode()
        headers["Content-Type"] = "application/json"
        status: int | None = None
        sink: _CaptureSink | None = None
        try:
            try:
                upstream = await self._open_upstream(request, forwarded, headers)
            except UpstreamUnavailable as exc:
                status, record.error = exc.status, exc.message
                return exc.response()
            status = upstream.status
            record.set_policy_version(upstream.headers.get(sc.POLICY_VERSION_HEADER))
            async with upstream:
                sink = _capture_sink(record, upstream)
                response, relay_error = await self._relay(request, upstream, sink.feed)
            sink.finish(status)
            record.error = record.error or relay_error
            return response
        finally:
            self._finish_spans(span, record, parent, name, start_ns, status, sink is not None and sink.failed)

    async def _open_upstream(self, request: web.Request, body: bytes, headers: CIMultiDict) -> aiohttp.ClientResponse:
        """Send the request upstream and return once its status and headers are in."""
        url = self.upstream + request.rel_url.raw_path_qs
        assert self._session is not None
        try:
            return await self._session.request(request.method, url, data=body, headers=headers,
                                               allow_redirects=False)
        except asyncio.TimeoutError:
            raise UpstreamUnavailable(504, f"upstream {self.upstream} did not answer in time",
                                      "upstream_timeout") from None
        except aiohttp.ClientError as exc:
            logger.warning("upstream %s unreachable: %s", self.upstream, exc)
            raise UpstreamUnavailable(502, f"upstream {self.upstream} unreachable: {exc}",
                                      "upstream_unreachable") from None

    async def _relay(self, request: web.Request, upstream: aiohttp.ClientResponse,
                     sink: Callable[[bytes], None]) -> tuple[web.StreamResponse, str | None]:
        """Copy the upstream response to the caller as it arrives; returns it and any relay error."""
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                      headers=_response_headers(upstream.headers))
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        await response.prepare(request)
        try:
            async for data in upstream.content.iter_any():
                sink(data)
                try:
                    await response.write(data)
                except ConnectionResetError:  # aiohttp's ClientConnectionResetError included
                    return response, "client disconnected"  # closing upstream makes vLLM abort the request
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            # headers are gone already: cut the connection so the caller sees a truncated body,
            # not a well-formed end
            if request.transport is not None:
                request.transport.close()
            return response, f"upstream failed mid-response: {exc!r}"
        await response.write_eof()
        return response, None

    def _finish_spans(self, span: trace.Span, record: CallRecord, parent: Context, name: str,
                      start_ns: int, http_status: int | None, capture_failed: bool) -> None:
        """Fill in the span, plus one sibling per further prompt of a completions batch; never raises."""
        end_ns = time.time_ns()
        try:
            if http_status is not None and http_status >= 400 and not record.error:
                record.error = f"upstream HTTP {http_status}"
            per_call = record.span_attributes(capture_failed)
            # further prompts are siblings of the first under the caller's span; with no caller
            # trace they hang under the first instead, so one request stays one trace
            sibling_parent = parent if trace.get_current_span(parent).get_span_context().is_valid \
                else trace.set_span_in_context(span, parent)
            spans = [span] + [
                self.tracer.start_span(name, context=sibling_parent, kind=trace.SpanKind.CLIENT,
                                       attributes=record.request_attributes(self.upstream), start_time=start_ns)
                for _ in per_call[1:]]
            for each, attributes in zip(spans, per_call):
                if self._array_exporter is not None:
                    arrays = {k: v for k, v in attributes.items() if isinstance(v, list)}
                    attributes = {k: v for k, v in attributes.items() if k not in arrays}
                    attributes.update(self._array_exporter.attach_arrays(each.get_span_context(), arrays))
                each.set_attributes(attributes)
                if record.error:
                    each.set_attribute(ERROR_TYPE, str(http_status) if http_status and http_status >= 400
                                       else "proxy_relay_error")
                    each.set_status(trace.StatusCode.ERROR, record.error[:500])
                each.end(end_time=end_ns)
        except Exception:
            logger.exception("could not record the LLM span")
            span.end(end_time=end_ns)


def _json_object(body: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, or None (then it is relayed as is and the upstream judges it)."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


class _CaptureSink:
    """Watches the relayed bytes: SSE events as they pass, or the whole JSON body at the end."""

    def __init__(self, record: CallRecord, streaming: bool, encoding: str) -> None:
        self.record, self.streaming, self.encoding = record, streaming, encoding
        self.parser = SseParser() if streaming else None
        self.chunks: list[bytes] = []
        self.failed = False

    def feed(self, data: bytes) -> None:
        if self.failed:
            return
        try:
            if self.parser is None:
                self.chunks.append(data)
                return
            for event in self.parser.feed(data):
                if event.strip() != "[DONE]":
                    chunk = json.loads(event)
                    if isinstance(chunk, dict):
                        self.record.add_chunk(chunk)
        except Exception as exc:  # a capture problem costs the span's detail, never the call
            self._give_up(exc)

    def finish(self, http_status: int) -> None:
        if self.streaming or self.failed:
            return
        try:
            body = b"".join(self.chunks)
            body = gzip.decompress(body) if self.encoding == "gzip" else body
            parsed = json.loads(body)
            if http_status < 400 and isinstance(parsed, dict):
                self.record.add_response(parsed)
            elif isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
                self.record.error = str(parsed["error"].get("message") or parsed["error"])
        except Exception as exc:
            self._give_up(exc)

    def _give_up(self, exc: Exception) -> None:
        self.failed = True
        logger.warning("could not read the upstream response for capture (%r); relayed it unchanged", exc)


def _capture_sink(record: CallRecord, upstream: aiohttp.ClientResponse) -> _CaptureSink:
    streaming = upstream.content_type == "text/event-stream"
    return _CaptureSink(record, streaming, upstream.headers.get("Content-Encoding", "identity").lower())


# ---------------------------------------------------------------- command


@click.command("proxy")
@click.option("--upstream", "upstream_url", required=True, envvar="TRACETRAIN_PROXY_UPSTREAM",
              help="The vLLM (OpenAI-compatible) server, e.g. http://127.0.0.1:8000. [env TRACETRAIN_PROXY_UPSTREAM]")
@click.option("--listen", default="127.0.0.1:8001", show_default=True, envvar="TRACETRAIN_PROXY_LISTEN",
              help="host:port to serve on; port 0 picks a free one. [env TRACETRAIN_PROXY_LISTEN]")
@click.option("--collector", "collector_url", default=None,
              help="Collector OTLP/gRPC endpoint. [default: $OTEL_EXPORTER_OTLP_ENDPOINT, else http://127.0.0.1:4317]")
@click.option("--service-name", default=None,
              help="service.name of the proxy's spans. [default: $OTEL_SERVICE_NAME, else tracetrain-proxy]")
@click.option("--auth-token", default=None, envvar="TRACETRAIN_COLLECTOR_AUTH_TOKEN",
              help="Bearer token the collector requires. [env TRACETRAIN_COLLECTOR_AUTH_TOKEN]")
@click.option("--upstream-timeout-s", type=float, default=3600.0, show_default=True,
              help="Longest an upstream call may take, streaming included.")
@click.option("--system-prompt-file", type=click.Path(dir_okay=False), default=None,
              envvar="TRACETRAIN_PROXY_SYSTEM_PROMPT_FILE",
              help="Replace (or insert) the system message of chat requests with this file's prompt: plain text, "
                   "or JSON with a \"prompt\" key such as an APO current.json; re-read when it changes. "
                   "[env TRACETRAIN_PROXY_SYSTEM_PROMPT_FILE]")
@click.option("--log-level", default="INFO", show_default=True, help="Python logging level.")
def proxy_command(upstream_url: str, listen: str, collector_url: str | None, service_name: str | None,
                  auth_token: str | None, upstream_timeout_s: float, system_prompt_file: str | None,
                  log_level: str) -> None:
    """Run an OpenAI-compatible proxy in front of vLLM that records every LLM call.

    Chat and completions requests get `return_token_ids` and `logprobs` added
    (unless the caller set them) and leave one span per choice with prompt and
    response token ids, logprobs and messages, continuing the caller's W3C
    traceparent. Responses, streamed or not, are relayed unchanged. See docs/proxy.md.
    """
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ProxyConfig(
        upstream_url=upstream_url, listen=listen,
        collector_url=collector_url or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "http://127.0.0.1:4317",
        service_name=service_name or os.environ.get("OTEL_SERVICE_NAME") or "tracetrain-proxy",
        auth_token=auth_token, upstream_timeout_s=upstream_timeout_s, system_prompt_file=system_prompt_file)
    try:
        proxy = LLMProxy(config)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        proxy.start()
    except OSError as exc:
        raise click.ClickException(str(exc)) from None
    # one parseable line, whatever the log level: scripts and tests wait for it
    click.echo(f"tracetrain proxy: listening on {proxy.url} -> {proxy.upstream}; spans to {config.collector_url}",
               err=True)
    proxy.serve_until_signal()
