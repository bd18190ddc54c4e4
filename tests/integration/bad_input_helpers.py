"""Helpers for the bad-input and fuzz tests: a daemon, raw OTLP clients, /metrics parsing.

Raw clients on purpose: the SDK exporters never send malformed bytes, and they hide the
status codes behind retries. Everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import base64
import gzip
import http.client
import itertools
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import json_format
from google.rpc import status_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from prometheus_client.parser import text_string_to_metric_families

from tracetrain.collector.config import CollectorConfig
from tracetrain.collector.daemon import Collector
from tracetrain.instrumentation import semconv as sc

EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
PROTOBUF = "application/x-protobuf"
JSON = "application/json"


def start_daemon(data_dir: Path, **overrides) -> Collector:
    """A started collector on ephemeral loopback ports; the caller must ``stop()`` it."""
    options = dict(data_dir=str(data_dir), grpc_endpoint="127.0.0.1:0", http_endpoint="127.0.0.1:0",
                   compact_interval_s=3600.0, log_level="WARNING")
    options.update(overrides)
    return Collector(CollectorConfig(**options)).start()


# ---------------------------------------------------------------- requests

_ids = itertools.count(1)
_ids_lock = threading.Lock()


def _next_id() -> int:
    with _ids_lock:
        return next(_ids)


def new_trace_id() -> bytes:
    return (0x7E57 << 112 | _next_id()).to_bytes(16, "big")


def new_span_id() -> bytes:
    return (0x5A << 56 | _next_id()).to_bytes(8, "big")


def good_span(trace_id: bytes, name: str = "chat", parent: bytes = b"") -> trace_pb2.Span:
    span = trace_pb2.Span(trace_id=trace_id, span_id=new_span_id(), parent_span_id=parent, name=name, kind=3,
                          start_time_unix_nano=1_700_000_000_000_000_000,
                          end_time_unix_nano=1_700_000_000_000_500_000)
    span.attributes.add(key=sc.GEN_AI_OPERATION_NAME).value.string_value = "chat"
    span.attributes.add(key="note").value.string_value = "héllo ✓"
    tokens = span.attributes.add(key=sc.OUTPUT_TOKEN_IDS).value.array_value
    tokens.values.extend(common_pb2.AnyValue(int_value=t) for t in (1, 300, 70000))
    logprobs = span.attributes.add(key=sc.OUTPUT_LOGPROBS).value.array_value
    logprobs.values.extend(common_pb2.AnyValue(double_value=x) for x in (-0.5, -1.25, 0.0))
    span.events.add(name="tok", time_unix_nano=1_700_000_000_000_100_000).attributes.add(
        key="i").value.int_value = 1
    return span


def request_of(*spans: trace_pb2.Span, service: str = "bad-input-test") -> trace_service_pb2.ExportTraceServiceRequest:
    request = trace_service_pb2.ExportTraceServiceRequest()
    rs = request.resource_spans.add()
    rs.resource.attributes.add(key=sc.SERVICE_NAME).value.string_value = service
    ss = rs.scope_spans.add()
    ss.scope.name = "tests"
    ss.spans.extend(spans)
    return request


def span_keys(request: trace_service_pb2.ExportTraceServiceRequest) -> set[str]:
    """``trace_id + span_id`` hex of every span in ``request``."""
    return {s.trace_id.hex() + s.span_id.hex()
            for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans}


def to_otlp_json(request: trace_service_pb2.ExportTraceServiceRequest) -> bytes:
    """OTLP/JSON: proto3 JSON with hex ids and integer enums."""
    document = json_format.MessageToDict(request, use_integers_for_enums=True)
    for rs in document.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for span in ss.get("spans", []):
                for obj in (span, *span.get("links", [])):
                    for key in ("traceId", "spanId", "parentSpanId"):
                        if key in obj:
                            obj[key] = base64.b64decode(obj[key]).hex()
    return json.dumps(document).encode()


# ---------------------------------------------------------------- clients


@dataclass
class Reply:
    """One export outcome, from either transport."""

    transport: str
    code: str  # gRPC: StatusCode name; HTTP: the status number as text
    message: str = ""
    rejected_spans: int = 0
    error_message: str = ""
    content_type: str = ""
    raw: bytes = b""

    @property
    def ok(self) -> bool:
        return self.code in ("OK", "200")


class GrpcClient:
    def __init__(self, port: int) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.export = self.channel.unary_unary(EXPORT_METHOD, request_serializer=None, response_deserializer=None)

    def send(self, body: bytes, timeout: float = 20.0) -> Reply:
        try:
            raw = self.export(body, timeout=timeout)
        except grpc.RpcError as exc:
            return Reply("grpc", exc.code().name, exc.details() or "")
        response = trace_service_pb2.ExportTraceServiceResponse.FromString(raw)
        return Reply("grpc", "OK", "", response.partial_success.rejected_spans,
                     response.partial_success.error_message, raw=raw)

    def close(self) -> None:
        self.channel.close()


class HttpClient:
    """One keep-alive connection (reconnects after the server closes it)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn: http.client.HTTPConnection | None = None

    def post(self, body: bytes, content_type: str | None = PROTOBUF, encoding: str | None = None,
             path: str = "/v1/traces", timeout: float = 20.0) -> tuple[int, dict[str, str], bytes]:
        headers = {}
        if content_type is not None:
            headers["Content-Type"] = content_type
        if encoding is not None:
            headers["Content-Encoding"] = encoding
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
            try:
                self.conn.request("POST", path, body=body, headers=headers)
                response = self.conn.getresponse()
                data = response.read()
            except (ConnectionError, http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
                continue
            if response.getheader("Connection", "").lower() == "close":
                self.conn.close()
                self.conn = None
            return response.status, {k.lower(): v for k, v in response.getheaders()}, data
        raise AssertionError("unreachable")

    def send(self, body: bytes, content_type: str | None = PROTOBUF, encoding: str | None = None) -> Reply:
        status, headers, data = self.post(body, content_type, encoding)
        reply_type = headers.get("content-type", "").split(";")[0]
        reply = Reply("http", str(status), content_type=reply_type, raw=data)
        if status == 200:
            response = trace_service_pb2.ExportTraceServiceResponse()
            if reply_type == JSON:
                json_format.Parse(data.decode(), response)
            else:
                response.ParseFromString(data)
            reply.rejected_spans = response.partial_success.rejected_spans
            reply.error_message = response.partial_success.error_message
        else:
            reply.message = parse_status(data, reply_type).message
        return reply

    def get(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def parse_status(data: bytes, content_type: str) -> status_pb2.Status:
    """The google.rpc.Status body of an HTTP error reply (raises if it is not one)."""
    status = status_pb2.Status()
    if content_type == JSON:
        json_format.Parse(data.decode("utf-8"), status)
    else:
        status.ParseFromString(data)
    return status


def gzip_bytes(body: bytes) -> bytes:
    return gzip.compress(body, compresslevel=1)


# ---------------------------------------------------------------- /metrics


def scrape(http_port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """All samples of ``/metrics`` as {(sample name, sorted labels): value}."""
    status, body = HttpClient(http_port).get("/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)
