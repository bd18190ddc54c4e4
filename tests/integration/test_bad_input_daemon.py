"""Bad input against a real daemon, over OTLP/gRPC and OTLP/HTTP.

Each refusal must carry the OTLP status the specification gives it (INVALID_ARGUMENT /
400 with a google.rpc.Status body, RESOURCE_EXHAUSTED / 413, 415), spans that break the
data model are reported through ``partial_success``, and none of it may disturb the
daemon: afterwards the real OTel SDK exporters still land their spans, the store holds
exactly the valid spans sent, and ``/metrics`` counts the refusals.
"""

from __future__ import annotations

import functools
import math
import resource
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.rpc import code_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2

from tests.integration.bad_input_helpers import (
    JSON,
    PROTOBUF,
    GrpcClient,
    HttpClient,
    good_span,
    gzip_bytes,
    metric,
    new_trace_id,
    parse_status,
    request_of,
    scrape,
    span_keys,
    start_daemon,
    to_otlp_json,
)
from tracetrain.collector.daemon import Collector
from tracetrain.collector.reader import query
from tracetrain.instrumentation import semconv as sc

MAX_REQUEST = 1 << 20  # 1 MiB: small enough for cheap oversize tests, large enough for a gzip bomb to matter
GRPC_HARD_LIMIT = MAX_REQUEST + (1 << 20)  # grpcio's own receive limit (receiver adds 1 MiB)


class Session:
    def __init__(self, daemon: Collector, data_dir: Path) -> None:
        self.daemon, self.data_dir = daemon, data_dir
        self.grpc = GrpcClient(daemon.grpc_port)
        self.http = HttpClient(daemon.http_port)
        self.stored: set[str] = set()  # trace_id+span_id of every valid span acknowledged

    def valid_request(self, n: int = 2):
        trace_id = new_trace_id()
        return request_of(*(good_span(trace_id, name=f"ok-{i}") for i in range(n)))


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    data_dir = tmp_path_factory.mktemp("bad-input") / "data"
    daemon = start_daemon(data_dir, max_request_bytes=MAX_REQUEST)
    s = Session(daemon, data_dir)
    try:
        yield s
    finally:
        s.grpc.close()
        s.http.close()
        daemon.stop()


def assert_http_status_body(reply, http_status: int, content_type: str, *words: str) -> None:
    assert reply.code == str(http_status), (reply.code, reply.message)
    assert reply.content_type == content_type
    status = parse_status(reply.raw, reply.content_type)  # a google.rpc.Status, or this raises
    assert status.code == code_pb2.INVALID_ARGUMENT
    assert status.message
    for word in words:
        assert word in status.message.lower(), status.message


MALFORMED_PROTOBUF = [
    pytest.param(b"\x0a\xff\xff\xff\xff\x0f", id="length-past-end"),
    pytest.param(b"\xff" * 16, id="garbage"),
    pytest.param(b"\x0a\x05\x12\x03\x1a\x01", id="truncated"),
    pytest.param(b"\x0f\x00", id="bad-wire-type"),
]


@pytest.mark.parametrize("body", MALFORMED_PROTOBUF)
def test_malformed_protobuf_is_invalid_argument_over_grpc(session: Session, body: bytes) -> None:
    reply = session.grpc.send(body)
    assert reply.code == "INVALID_ARGUMENT"
    assert "malformed" in reply.message


@pytest.mark.parametrize("body", MALFORMED_PROTOBUF)
def test_malformed_protobuf_is_400_over_http(session: Session, body: bytes) -> None:
    assert_http_status_body(session.http.send(body), 400, PROTOBUF, "malformed")


def test_invalid_utf8_string_is_rejected_over_both(session: Session) -> None:
    request = session.valid_request(1)
    request.resource_spans[0].scope_spans[0].spans[0].name = "QQQQ"
    body = request.SerializeToString().replace(b"QQQQ", b"\xff\xfe\xfd\xfc")
    assert session.grpc.send(body).code == "INVALID_ARGUMENT"
    assert_http_status_body(session.http.send(body), 400, PROTOBUF)


@pytest.mark.parametrize("bad_id", ["zz" * 16, "0102", "not hex at all", "AQIDBAUGBwgJCgsMDQ4PEA=="])
def test_json_with_bad_trace_id_is_400(session: Session, bad_id: str) -> None:
    body = ('{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"%s","spanId":"0102030405060708",'
            '"name":"x"}]}]}]}' % bad_id).encode()
    reply = session.http.send(body, JSON)
    if bad_id == "0102":  # valid hex, wrong length: the span is rejected, not the request
        assert reply.code == "200" and reply.rejected_spans == 1 and "trace_id" in reply.error_message
    else:
        assert_http_status_body(reply, 400, JSON, "traceid")


@pytest.mark.parametrize("body", [b"{", b"[]", b"\xff\xfe", b'{"resourceSpans": 7}'])
def test_json_that_is_not_otlp_is_400(session: Session, body: bytes) -> None:
    assert_http_status_body(session.http.send(body, JSON), 400, JSON)


def test_gzip_header_on_a_body_that_is_not_gzip_is_400(session: Session) -> None:
    body = session.valid_request().SerializeToString()
    assert_http_status_body(session.http.send(body, PROTOBUF, "gzip"), 400, PROTOBUF, "gzip")
    truncated = gzip_bytes(body)[:-12]
    assert_http_status_body(session.http.send(truncated, PROTOBUF, "gzip"), 400, PROTOBUF, "gzip")
    assert_http_status_body(session.http.send(body, JSON, "gzip"), 400, JSON, "gzip")


def test_unknown_content_encoding_is_400(session: Session) -> None:
    body = session.valid_request().SerializeToString()
    assert_http_status_body(session.http.send(body, PROTOBUF, "br"), 400, PROTOBUF, "content-encoding")


@pytest.mark.parametrize("content_type", ["text/plain", "application/octet-stream", "application/grpc", None])
def test_unknown_content_type_is_415(session: Session, content_type: str | None) -> None:
    body = session.valid_request().SerializeToString()
    reply = session.http.send(body, content_type)
    assert reply.code == "415"
    status = parse_status(reply.raw, reply.content_type)
    assert "content-type" in status.message.lower()


def test_valid_gzip_requests_are_accepted(session: Session) -> None:
    """The control for the refusals above: the same transports take well-formed requests."""
    for content_type in (PROTOBUF, JSON):
        request = session.valid_request(3)
        body = request.SerializeToString() if content_type == PROTOBUF else to_otlp_json(request)
        reply = session.http.send(gzip_bytes(body), content_type, "gzip")
        assert reply.code == "200" and reply.rejected_spans == 0 and reply.content_type == content_type
        session.stored |= span_keys(request)
    request = session.valid_request(3)
    reply = session.grpc.send(request.SerializeToString())
    assert reply.ok and reply.rejected_spans == 0 and reply.error_message == ""
    session.stored |= span_keys(request)


def _padded_request(session: Session, size: int) -> bytes:
    request = session.valid_request(1)
    request.resource_spans[0].scope_spans[0].spans[0].attributes.add(key="pad").value.string_value = "p" * size
    return request.SerializeToString()


def test_request_over_max_request_bytes_is_413_and_resource_exhausted(session: Session) -> None:
    over = _padded_request(session, MAX_REQUEST + 1000)  # over the limit, under grpcio's own
    assert MAX_REQUEST < len(over) < GRPC_HARD_LIMIT
    reply = session.grpc.send(over)
    assert reply.code == "RESOURCE_EXHAUSTED"
    assert str(MAX_REQUEST) in reply.message
    reply = session.http.send(over)
    assert reply.code == "413"
    assert parse_status(reply.raw, reply.content_type).message
    way_over = _padded_request(session, GRPC_HARD_LIMIT + 1000)  # grpcio itself refuses this one
    assert session.grpc.send(way_over).code == "RESOURCE_EXHAUSTED"
    assert session.http.send(way_over, JSON).code == "413"
    # just under the limit is fine (two different requests: no span is sent twice)
    for send in (session.grpc.send, session.http.send):
        under = _padded_request(session, MAX_REQUEST - 1000)
        assert len(under) <= MAX_REQUEST
        reply = send(under)
        assert reply.ok and reply.rejected_spans == 0
        session.stored |= span_keys(trace_service_pb2.ExportTraceServiceRequest.FromString(under))


def _partially_bad_request(session: Session):
    trace_id = new_trace_id()
    good = [good_span(trace_id, name=f"good-{i}") for i in range(3)]
    bad_trace = good_span(trace_id, name="bad-trace-id")
    bad_trace.trace_id = trace_id[:15]
    bad_span = good_span(trace_id, name="bad-span-id")
    bad_span.span_id = bytes(8)
    bad_parent = good_span(trace_id, name="bad-parent", parent=b"\x01\x02\x03")
    # interleave good and bad spans over two resources
    request = request_of(good[0], bad_trace, good[1])
    request.resource_spans.extend(request_of(bad_span, good[2], bad_parent, service="other").resource_spans)
    return request, request_of(*good)


@pytest.mark.parametrize("transport", ["grpc", "http-protobuf", "http-json"])
def test_some_bad_spans_are_a_partial_success(session: Session, transport: str) -> None:
    request, good_only = _partially_bad_request(session)
    if transport == "grpc":
        reply = session.grpc.send(request.SerializeToString())
    elif transport == "http-protobuf":
        reply = session.http.send(request.SerializeToString())
    else:
        reply = session.http.send(to_otlp_json(request), JSON)
    assert reply.ok
    assert reply.rejected_spans == 3
    assert "rejected 3 of 6 spans" in reply.error_message
    for word in ("trace_id", "span_id", "parent_span_id"):
        assert word in reply.error_message
    session.stored |= span_keys(good_only)
    stored = {r["name"] for r in query(session.data_dir, "SELECT name FROM spans WHERE trace_id = $1",
                                       [good_only.resource_spans[0].scope_spans[0].spans[0].trace_id.hex()])
              .to_pylist()}
    assert stored == {"good-0", "good-1", "good-2"}


@functools.cache
def _gzip_of_zeros(total: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = bytes(1 << 20)
    parts = [compressor.compress(chunk) for _ in range(total // len(chunk))]
    parts.append(compressor.flush())
    return b"".join(parts)


@pytest.mark.parametrize("content_type", [PROTOBUF, JSON])
def test_gzip_bomb_is_413_quickly_without_inflating(session: Session, content_type: str) -> None:
    bomb = _gzip_of_zeros(200 << 20)  # 200 MB of zeros
    assert len(bomb) < MAX_REQUEST  # so only the decompressed size can trip the limit
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    started = time.monotonic()
    reply = session.http.send(bomb, content_type, "gzip")
    elapsed = time.monotonic() - started
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert reply.code == "413"
    assert "limit" in parse_status(reply.raw, reply.content_type).message
    assert elapsed < 5.0
    assert (peak_after - peak_before) * 1024 < 64 << 20, "the daemon inflated the bomb"


def test_bad_requests_are_counted_in_metrics(session: Session) -> None:
    before = scrape(session.daemon.http_port)
    session.grpc.send(b"\xff" * 8)  # malformed
    session.http.send(b"\xff" * 8)  # malformed
    session.http.send(b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"zz"}]}]}]}', JSON)  # malformed
    session.grpc.send(_padded_request(session, MAX_REQUEST + 10))  # too large, in the pipeline
    request, good_only = _partially_bad_request(session)
    assert session.grpc.send(request.SerializeToString()).rejected_spans == 3
    session.stored |= span_keys(good_only)
    after = scrape(session.daemon.http_port)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("tracetrain_bad_requests_total", reason="malformed") == 3
    assert delta("tracetrain_bad_requests_total", reason="too_large") == 1
    assert delta("tracetrain_requests_total", transport="grpc", outcome="invalid") == 2
    assert delta("tracetrain_requests_total", transport="http", outcome="invalid") == 2
    assert delta("tracetrain_requests_total", transport="grpc", outcome="partial") == 1
    assert delta("tracetrain_spans_rejected_total") == 3
    assert delta("tracetrain_spans_accepted_total") == 3


def test_http_level_refusals_are_counted_in_metrics(session: Session) -> None:
    """Refusals decided in the HTTP receiver, before the pipeline, are counted like the others."""
    body = session.valid_request().SerializeToString()
    before = scrape(session.daemon.http_port)
    assert session.http.send(body, PROTOBUF, "gzip").code == "400"  # not gzip
    assert session.http.send(_gzip_of_zeros(8 << 20), PROTOBUF, "gzip").code == "413"  # bomb
    assert session.http.send(_padded_request(session, MAX_REQUEST + 10)).code == "413"  # over client_max_size
    assert session.http.send(body, PROTOBUF, "br").code == "400"  # unknown Content-Encoding
    assert session.http.send(body, "text/plain").code == "415"  # unknown Content-Type
    after = scrape(session.daemon.http_port)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("tracetrain_bad_requests_total", reason="encoding") == 2
    assert delta("tracetrain_bad_requests_total", reason="too_large") == 2
    assert delta("tracetrain_bad_requests_total", reason="content_type") == 1
    bad = sum(v - metric(before, k[0], **dict(k[1])) for k, v in after.items()
              if k[0] == "tracetrain_bad_requests_total")
    assert bad == 5
    assert delta("tracetrain_requests_total", transport="http", outcome="invalid") == 5
    assert delta("tracetrain_requests_total", transport="grpc", outcome="invalid") == 0
    assert delta("tracetrain_spans_accepted_total") == 0


def _odd_request(trace_id: bytes, case: str):
    """(request of a good span and an odd one, the odd span, what must become of it)."""
    good, odd = good_span(trace_id, name="good"), good_span(trace_id, name="odd")
    if case == "kind-200":
        odd.kind = 200
        expect = "kind 200"
    elif case == "status-1000":
        odd.status.code = 1000
        expect = "status code 1000"
    elif case == "input-tokens-over-int64":
        odd.attributes.add(key=sc.GEN_AI_USAGE_INPUT_TOKENS).value.string_value = "100000000000000000000"
        expect = {sc.COL_INPUT_TOKENS: None}
    else:  # logprobs that take the slow decoder: an inexact int and infinities
        for kv in odd.attributes:
            if kv.key == sc.OUTPUT_LOGPROBS:
                kv.value.array_value.Clear()
                kv.value.array_value.values.extend([
                    common_pb2.AnyValue(int_value=2**53 + 1), common_pb2.AnyValue(double_value=-math.inf),
                    common_pb2.AnyValue(double_value=math.inf), common_pb2.AnyValue(double_value=-0.5)])
        expect = {sc.COL_RESPONSE_LOGPROBS: [float(2**53 + 1), -math.inf, math.inf, -0.5]}
    return request_of(good, odd), good, odd, expect


@pytest.mark.parametrize("case", ["kind-200", "status-1000", "input-tokens-over-int64", "logprobs-slow-path"])
@pytest.mark.parametrize("transport", ["grpc", "http-protobuf", "http-json"])
def test_unstorable_values_are_a_partial_success_not_an_internal_error(
        session: Session, case: str, transport: str) -> None:
    """Well-formed requests with values no column can hold: never a retryable internal error.

    A span with an enum outside the spec's range is rejected through ``partial_success``; an
    out-of-range typed value is stored as null; in every case the good span is stored.
    """
    trace_id = new_trace_id()
    request, good, odd, expect = _odd_request(trace_id, case)
    if transport == "grpc":
        reply = session.grpc.send(request.SerializeToString())
    elif transport == "http-protobuf":
        reply = session.http.send(request.SerializeToString())
    else:
        reply = session.http.send(to_otlp_json(request), JSON)
    assert reply.ok, (reply.code, reply.message)
    session.stored.add(trace_id.hex() + good.span_id.hex())
    rows = {r["name"]: r for r in query(
        session.data_dir, "SELECT * FROM spans WHERE trace_id = $1", [trace_id.hex()]).to_pylist()}
    if isinstance(expect, str):
        assert reply.rejected_spans == 1
        assert expect in reply.error_message and "'odd'" in reply.error_message, reply.error_message
        assert set(rows) == {"good"}
    else:
        assert reply.rejected_spans == 0 and reply.error_message == ""
        session.stored.add(trace_id.hex() + odd.span_id.hex())
        assert set(rows) == {"good", "odd"}
        for column, value in expect.items():
            assert rows["odd"][column] == value, (column, rows["odd"][column])


@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "1e400"])
@pytest.mark.parametrize("field", ["kind", "status"])
def test_json_infinite_enum_is_400_not_an_internal_error(session: Session, value: str, field: str) -> None:
    body = to_otlp_json(request_of(good_span(new_trace_id())))
    if field == "kind":
        assert body.count(b'"kind": 3') == 1
        body = body.replace(b'"kind": 3', b'"kind": ' + value.encode())
    else:
        assert body.count(b'"name": "chat"') == 1
        body = body.replace(b'"name": "chat"', b'"name": "chat", "status": {"code": ' + value.encode() + b"}")
    assert_http_status_body(session.http.send(body, JSON), 400, JSON)


def test_zz_after_all_that_the_sdk_exporters_still_work(session: Session) -> None:
    """Runs last in this module: the daemon survived, and stored exactly the valid spans."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporters = [
        GrpcExporter(endpoint=f"127.0.0.1:{session.daemon.grpc_port}", insecure=True, timeout=10),
        HttpExporter(endpoint=f"http://127.0.0.1:{session.daemon.http_port}/v1/traces", timeout=10),
    ]
    for exporter in exporters:
        memory = InMemorySpanExporter()
        provider = TracerProvider(resource=Resource.create({"service.name": "sdk-after-bad-input"}))
        provider.add_span_processor(SimpleSpanProcessor(memory))
        tracer = provider.get_tracer("tests.bad_input")
        with tracer.start_as_current_span("episode") as root:
            root.set_attribute("tracetrain.episode.id", "ep-bad-input")
            with tracer.start_as_current_span("chat model") as chat:
                chat.set_attribute("gen_ai.operation.name", "chat")
                chat.set_attribute("tracetrain.output.token_ids", [5, 6, 7])
        spans = memory.get_finished_spans()
        assert len(spans) == 2
        assert exporter.export(spans) == SpanExportResult.SUCCESS
        exporter.shutdown()
        provider.shutdown()
        session.stored |= {f"{s.context.trace_id:032x}{s.context.span_id:016x}" for s in spans}

    assert session.daemon.http is not None
    status, body = session.http.get("/healthz")
    assert status == 200 and b"ok" in body
    rows = query(session.data_dir, "SELECT trace_id || span_id AS k FROM spans").column("k").to_pylist()
    assert len(rows) == len(set(rows))  # nothing stored twice
    assert set(rows) == session.stored  # every valid span acknowledged, and nothing else
    total = query(session.data_dir, "SELECT count(*) AS c FROM spans")["c"][0].as_py()
    assert total == len(session.stored)
    sdk = query(session.data_dir, "SELECT count(*) AS c FROM spans WHERE service_name = 'sdk-after-bad-input'")
    assert sdk["c"][0].as_py() == 4
    after = scrape(session.daemon.http_port)
    assert sum(v for k, v in after.items() if k[0] == "tracetrain_bad_requests_total") >= 10
