"""Build OTLP requests with known, unique span ids for integration tests."""

from __future__ import annotations

import itertools
import struct
import threading

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
_counter = itertools.count(1)
_lock = threading.Lock()


def _next() -> int:
    with _lock:
        return next(_counter)


def make_request(n_spans: int, service: str = "test-agent", tag: int = 0) -> tuple[bytes, list[str]]:
    """A serialized ExportTraceServiceRequest and the ``trace_id+span_id`` keys it carries."""
    spans, keys = [], []
    trace_id = struct.pack(">QQ", tag + 1, _next())
    for i in range(n_spans):
        span_id = struct.pack(">Q", (_next() << 8) | 1)
        spans.append(trace_pb2.Span(
            trace_id=trace_id, span_id=span_id, name=f"chat {i}", kind=3,
            start_time_unix_nano=1_700_000_000_000_000_000 + i, end_time_unix_nano=1_700_000_000_000_001_000 + i,
            attributes=[
                common_pb2.KeyValue(key="gen_ai.operation.name", value=common_pb2.AnyValue(string_value="chat")),
                common_pb2.KeyValue(key="tracetrain.output.token_ids", value=common_pb2.AnyValue(
                    array_value=common_pb2.ArrayValue(values=[common_pb2.AnyValue(int_value=t) for t in range(8)]))),
            ]))
        keys.append(trace_id.hex() + span_id.hex())
    request = ts.ExportTraceServiceRequest(resource_spans=[trace_pb2.ResourceSpans(
        resource=resource_pb2.Resource(attributes=[
            common_pb2.KeyValue(key="service.name", value=common_pb2.AnyValue(string_value=service))]),
        scope_spans=[trace_pb2.ScopeSpans(spans=spans)])])
    return request.SerializeToString(), keys
