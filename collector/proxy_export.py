"""The proxy's OTLP/gRPC span exporter, with a fast path for token-id and logprob arrays.

The stock encoder (``opentelemetry.exporter.otlp.proto.common``) builds one
``AnyValue`` per array element in Python, about 3 µs each: a call with 8k prompt
ids, 1k response ids and 1k logprobs costs ~30 ms of GIL time in the export
thread, which the proxy's event loop then waits for. Here numeric arrays are
written straight to protobuf wire bytes (NumPy for doubles, a per-value cache for
ints) and parsed back by upb in C, ~30x faster. Everything else is the stock
encoder, so the request on the wire is the same OTLP.

The proxy goes one step further: it hands a span's arrays to ``attach_arrays``
instead of setting them as span attributes, which also skips the SDK's
per-element attribute validation (~1 µs per element); they are encoded at once
and joined to the span when it is exported.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanContext

FAST_MIN_ELEMENTS = 16
"""Shorter arrays are not worth the detour."""

# Wire format (protobuf): KeyValue{1: key, 2: AnyValue}; AnyValue{5: ArrayValue};
# ArrayValue{1: repeated AnyValue}; AnyValue{3: int64 varint | 4: double fixed64}.
_VALUES_TAG = b"\x0a"  # ArrayValue.values, length-delimited
_INT_TAG = b"\x18"  # AnyValue.int_value, varint
_DOUBLE_ELEMENT = np.dtype([("head", "S3"), ("value", "<f8")])  # 0a 09 21 + 8 bytes: one double AnyValue
_INT_CACHE_MAX = 1 << 20  # token ids repeat; a vocabulary fits


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # int64 two's complement, as protobuf writes negative varints
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


_int_elements: dict[int, bytes] = {}


def _int_element(value: int) -> bytes:
    element = _int_elements.get(value)
    if element is None:
        payload = _INT_TAG + _varint(value)
        element = _VALUES_TAG + bytes([len(payload)]) + payload
        if len(_int_elements) < _INT_CACHE_MAX:
            _int_elements[value] = element
    return element


def _length_delimited(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


def array_key_value_bytes(key: str, values: Sequence[Any]) -> bytes | None:
    """Wire bytes of ``KeyValue(key, AnyValue(array_value=values))`` for an all-int or all-float array."""
    if all(type(v) is int for v in values):
        array = b"".join([_int_element(v) for v in values])
    elif all(type(v) is float for v in values):
        elements = np.empty(len(values), _DOUBLE_ELEMENT)
        elements["head"] = b"\x0a\x09\x21"
        elements["value"] = values
        array = elements.tobytes()
    else:
        return None
    any_value = _length_delimited(b"\x2a", array)
    return _length_delimited(b"\x0a", key.encode()) + _length_delimited(b"\x12", any_value)


def _big_arrays(span: ReadableSpan) -> dict[str, bytes]:
    out = {}
    for key, value in (span.attributes or {}).items():
        if isinstance(value, (tuple, list)) and len(value) >= FAST_MIN_ELEMENTS:
            encoded = array_key_value_bytes(key, value)
            if encoded is not None:
                out[key] = encoded
    return out


def encode_spans_fast(spans: Sequence[ReadableSpan],
                      attached: Mapping[tuple[int, int], dict[str, bytes]] | None = None,
                      ) -> ExportTraceServiceRequest:
    """``encode_spans`` with large numeric arrays encoded directly, plus already-encoded ``attached``
    attributes per (trace id, span id); the same request as if all were span attributes."""
    views, arrays = [], {}
    for span in spans:
        context = span.get_span_context()
        key = (context.trace_id, context.span_id)
        big = _big_arrays(span)
        if big or (attached and key in attached):
            arrays[key] = {**(attached or {}).get(key, {}), **big}
        if not big:
            views.append(span)
            continue
        small = {k: v for k, v in span.attributes.items() if k not in big}
        views.append(ReadableSpan(
            name=span.name, context=context, parent=span.parent, resource=span.resource, attributes=small,
            events=span.events, links=span.links, kind=span.kind, status=span.status, start_time=span.start_time,
            end_time=span.end_time, instrumentation_scope=span.instrumentation_scope))
    request = encode_spans(views)
    if arrays:
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for pb_span in scope_spans.spans:
                    key = (int.from_bytes(pb_span.trace_id, "big"), int.from_bytes(pb_span.span_id, "big"))
                    for encoded in arrays.get(key, {}).values():
                        pb_span.attributes.append(KeyValue.FromString(encoded))
    return request


class FastArrayOTLPSpanExporter(OTLPSpanExporter):
    """OTLPSpanExporter (gRPC) that encodes token-id and logprob arrays without per-element Python objects."""

    MAX_ATTACHED_SPANS = 8192
    """Arrays of spans the batch processor dropped (queue full) are forgotten past this many."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._attached: OrderedDict[tuple[int, int], dict[str, bytes]] = OrderedDict()
        self._attached_lock = threading.Lock()

    def attach_arrays(self, context: SpanContext, arrays: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
        """Encode the int/float arrays now, to be exported as attributes of the span; call before it ends.

        Returns what could not take this path (mixed or short arrays): set those on the span."""
        encoded, rest = {}, {}
        for key, values in arrays.items():
            wire = array_key_value_bytes(key, values) if len(values) >= FAST_MIN_ELEMENTS else None
            if wire is None:
                rest[key] = values
            else:
                encoded[key] = wire
        if encoded:
            with self._attached_lock:
                self._attached[(context.trace_id, context.span_id)] = encoded
                while len(self._attached) > self.MAX_ATTACHED_SPANS:
                    self._attached.popitem(last=False)
        return rest

    def _translate_data(self, data: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
        with self._attached_lock:
            attached = {}
            for span in data:
                key = (span.get_span_context().trace_id, span.get_span_context().span_id)
                if key in self._attached:
                    attached[key] = self._attached.pop(key)
        return encode_spans_fast(data, attached)

