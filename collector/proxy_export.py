"""The proxy's OTLP/gRPC span exporter, with a fast path for token-id and logprob arrays.

The stock encoder (``opentelemetry.exporter.otlp.proto.common``) builds one
``AnyValue`` per array element in Python, about 3 µs each: a call with 8k prompt
ids, 1k response ids and 1k logprobs costs ~30 ms of GIL time in the export
thread, which the proxy's event loop then waits for. Here numeric arrays are
written straight to protobuf wire bytes with NumPy and parsed back by upb in C,
~30x faster. Everything else is the stock
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
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanContext

FAST_MIN_ELEMENTS = 16
"""Shorter arrays are not worth the detour."""
NUMPY_MIN_ELEMENTS = 512
"""Int arrays from this length on are encoded with NumPy; shorter ones through a per-value cache."""

# Wire format (protobuf): KeyValue{1: key, 2: AnyValue}; AnyValue{5: ArrayValue};
# ArrayValue{1: repeated AnyValue}; AnyValue{3: int64 varint | 4: double fixed64}.
_VALUES_TAG = b"\x0a"  # ArrayValue.values, length-delimited
_DOUBLE_ELEMENT = np.dtype([("head", "S3"), ("value", "<f8")])  # 0a 09 21 + 8 bytes: one double AnyValue


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


_element_cache: dict[int, bytes] = {}
_ELEMENT_CACHE_MAX = 1 << 18  # token ids repeat: a vocabulary's worth of elements


def _int_elements_small(values: Sequence[int]) -> bytes:
    """Same bytes as ``_int_elements``, cheaper below a few hundred values (NumPy has a fixed cost)."""
    out = []
    for value in values:
        element = _element_cache.get(value)
        if element is None:
            payload = b"\x18" + _varint(value)
            element = b"\x0a" + bytes([len(payload)]) + payload
            if len(_element_cache) < _ELEMENT_CACHE_MAX:
                _element_cache[value] = element
        out.append(element)
    return b"".join(out)


_VARINT_LIMITS = np.array([1 << (7 * k) for k in range(1, 10)], np.uint64)  # 2^7 .. 2^63


def _int_elements(values: np.ndarray) -> bytes:
    """Wire bytes of one int ``AnyValue`` per value (0a len 18 varint...), all rows at once.

    Each value's element is laid out in a row of 3 head bytes plus as many varint
    bytes as the longest value needs (3 for a 2M vocabulary); the unused tail of
    each row is masked out when the rows are flattened."""
    unsigned = values.astype(np.int64, copy=False).view(np.uint64)  # negative -> 10-byte varint, as protobuf
    n_bytes = np.searchsorted(_VARINT_LIMITS, unsigned, side="right") + 1
    width = int(n_bytes.max())
    rows = np.empty((len(values), 3 + width), np.uint8)
    rows[:, 0], rows[:, 1], rows[:, 2] = 0x0A, 1 + n_bytes, 0x18
    for j in range(width):  # 7 bits per byte, low first; continuation bit on all but the last
        group = ((unsigned >> np.uint64(7 * j)) & np.uint64(0x7F)).astype(np.uint8)
        rows[:, 3 + j] = group | ((n_bytes > j + 1).astype(np.uint8) << 7)
    keep = np.arange(3 + width)[None, :] < (3 + n_bytes)[:, None]
    return rows[keep].tobytes()


def _length_delimited(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


def array_key_value_bytes(key: str, values: Sequence[Any]) -> bytes | None:
    """Wire bytes of ``KeyValue(key, AnyValue(array_value=values))`` for an all-int or all-float array."""
    if len(values) < NUMPY_MIN_ELEMENTS and all(type(v) is int and -(2**63) <= v < 2**63 for v in values):
        array = _int_elements_small(values)
        return _key_value(key, array)
    try:
        array_in = np.asarray(values)
    except (OverflowError, ValueError):  # an int past int64, ragged nesting
        return None
    if array_in.ndim != 1:
        return None
    if array_in.dtype.kind == "i":
        array = _int_elements(array_in)
    elif array_in.dtype.kind == "f":  # floats (ints mixed in become doubles, as the SDK would refuse them)
        elements = np.empty(len(array_in), _DOUBLE_ELEMENT)
        elements["head"] = b"\x0a\x09\x21"
        elements["value"] = array_in
        array = elements.tobytes()
    else:  # strings, bools, objects: the stock encoder
        return None
    return _key_value(key, array)


def _key_value(key: str, array_elements: bytes) -> bytes:
    any_value = _length_delimited(b"\x2a", array_elements)
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
                        # merged as Span field 9 (attributes): parsed in C, no copy of a parsed message
                        pb_span.MergeFromString(_length_delimited(b"\x4a", encoded))
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

