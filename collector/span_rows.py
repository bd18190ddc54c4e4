"""Decoded OTLP request -> Arrow record batches of span rows (the ingest hot path).

One pass over the spans fills plain Python lists, one per column; token-id and
logprob arrays are collected as bytes and decoded in bulk at the end
(``anyvalue_arrays``). Spans that break the OTLP data model (ids of the wrong
length, all-zero ids, oversized values) are rejected one by one and reported
through ``partial_success``; the rest of the request is kept.
"""

from __future__ import annotations

import json
from collections.abc import Container
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from tracetrain.collector.anyvalue_arrays import (
    decode_double_arrays,
    decode_int_arrays,
    numbers_from_array_bytes,
)
from tracetrain.collector.normalize import NORMALIZED_RANK, TRIGGER_KEYS, normalize
from tracetrain.collector.otlp_wire import (
    _json_double,
    array_bytes_to_python,
    shadow_anyvalue_to_python,
)
from tracetrain.collector.schema import SCALAR_COLUMNS, SPAN_SCHEMA
from tracetrain.instrumentation import semconv as sc

UNKNOWN_SERVICE = "unknown_service"
_ZERO_TRACE_ID = bytes(16)
_ZERO_SPAN_ID = bytes(8)
_ARRAY_COLUMNS = {
    sc.INPUT_TOKEN_IDS: sc.COL_PROMPT_TOKEN_IDS,
    sc.OUTPUT_TOKEN_IDS: sc.COL_RESPONSE_TOKEN_IDS,
    sc.OUTPUT_LOGPROBS: sc.COL_RESPONSE_LOGPROBS,
}
_MESSAGE_COLUMNS = {
    sc.GEN_AI_INPUT_MESSAGES: sc.COL_INPUT_MESSAGES,
    sc.GEN_AI_OUTPUT_MESSAGES: sc.COL_OUTPUT_MESSAGES,
    sc.GEN_AI_SYSTEM_INSTRUCTIONS: sc.COL_SYSTEM_INSTRUCTIONS,
}
# Scalar attributes copied into typed columns (they also stay in `attributes`).
# The first key present in each tuple wins, so the current convention comes first.
_TYPED_SOURCES: dict[str, tuple[str, ...]] = {
    sc.COL_OPERATION: (sc.GEN_AI_OPERATION_NAME,),
    sc.COL_PROVIDER: (sc.GEN_AI_PROVIDER_NAME, sc.GEN_AI_SYSTEM, sc.OPENINFERENCE_PROVIDER, sc.OPENINFERENCE_SYSTEM),
    sc.COL_REQUEST_MODEL: (
        sc.GEN_AI_REQUEST_MODEL, sc.OPENINFERENCE_REQUEST_MODEL_NAME, sc.OPENINFERENCE_MODEL_NAME),
    sc.COL_RESPONSE_MODEL: (sc.GEN_AI_RESPONSE_MODEL, sc.OPENINFERENCE_RESPONSE_MODEL_NAME),
    sc.COL_RESPONSE_ID: (sc.GEN_AI_RESPONSE_ID,),
    sc.COL_INPUT_TOKENS: (
        sc.GEN_AI_USAGE_INPUT_TOKENS, sc.GEN_AI_USAGE_PROMPT_TOKENS, sc.OPENINFERENCE_TOKEN_COUNT_PROMPT),
    sc.COL_OUTPUT_TOKENS: (
        sc.GEN_AI_USAGE_OUTPUT_TOKENS, sc.GEN_AI_USAGE_COMPLETION_TOKENS, sc.OPENINFERENCE_TOKEN_COUNT_COMPLETION),
    sc.COL_REWARD: (sc.REWARD,),
    sc.COL_POLICY_VERSION: (sc.POLICY_VERSION,),
    sc.COL_EPISODE_ID: (sc.EPISODE_ID,),
    sc.COL_TASK_ID: (sc.TASK_ID,),
    sc.COL_ROLLOUT_ID: (sc.ROLLOUT_ID,),
    sc.COL_AGENT_NAME: (sc.GEN_AI_AGENT_NAME, sc.OPENINFERENCE_AGENT_NAME),
    sc.COL_CONVERSATION_ID: (sc.GEN_AI_CONVERSATION_ID, sc.OPENINFERENCE_SESSION_ID),
}
# Resource attributes (`tracetrain run` sets them through OTEL_RESOURCE_ATTRIBUTES) that the
# views use when neither the span nor its trace sets the column (reader._span_context_view).
RESOURCE_SOURCES = {
    sc.EPISODE_ID: sc.COL_EPISODE_ID,
    sc.TASK_ID: sc.COL_TASK_ID,
    sc.ROLLOUT_ID: sc.COL_ROLLOUT_ID,
    sc.GEN_AI_AGENT_NAME: sc.COL_AGENT_NAME,
}
# Keys of other conventions: a span with one of them goes through `normalize`. They route
# to this pseudo column, which no real column reads, so detecting them costs no extra work
# in the attribute loop.
_NORMALIZE = "\x00normalize"
_INT_COLUMNS = {sc.COL_INPUT_TOKENS, sc.COL_OUTPUT_TOKENS, sc.COL_POLICY_VERSION}
_FLOAT_COLUMNS = {sc.COL_REWARD}
_ROUTE_ARRAY, _ROUTE_MESSAGE, _ROUTE_TYPED = 0, 1, 2
_ARRAY_COLUMN_NAMES = tuple(_ARRAY_COLUMNS.values())


@dataclass
class DecodedRequest:
    """What one request became: batches per service, plus the accounting."""

    batches: list[tuple[str, pa.RecordBatch]] = field(default_factory=list)
    spans_total: int = 0
    spans_rejected: int = 0
    spans_duplicate: int = 0
    rejection_messages: list[str] = field(default_factory=list)
    table: str = sc.TABLE_SPANS
    """Which table the batches go to (``spans``, or ``logs`` for log records)."""

    @property
    def spans_accepted(self) -> int:
        return self.spans_total - self.spans_rejected

    @property
    def rows(self) -> int:
        return sum(batch.num_rows for _, batch in self.batches)

    def reject(self, message: str) -> None:
        self.spans_rejected += 1
        if len(self.rejection_messages) < 5:  # enough to explain, bounded for the reply
            self.rejection_messages.append(message)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _json_text(text: str) -> str:
    """``text`` if it is JSON, else ``text`` encoded as a JSON string (message columns hold JSON)."""
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return _dumps(text)
    return text


def _attributes_to_dict(attributes: Any) -> dict[str, Any]:
    return {kv.key: shadow_anyvalue_to_python(kv.value) for kv in attributes}


def _as_str(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return _dumps(value)


def _as_int(value: Any) -> int | None:
    """An int64 column value, or None for anything else (bools, fractions, out of range)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            return None
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**63 else None
    return None


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _build_routes() -> dict[str, tuple[int, str, int]]:
    """attribute key -> (what it feeds, which column, rank among the column's sources)."""
    routes: dict[str, tuple[int, str, int]] = {}
    for key, column in _ARRAY_COLUMNS.items():
        routes[key] = (_ROUTE_ARRAY, column, 0)
    for key, column in _MESSAGE_COLUMNS.items():
        routes[key] = (_ROUTE_MESSAGE, column, 0)
    for column, keys in _TYPED_SOURCES.items():
        for rank, key in enumerate(keys):
            routes[key] = (_ROUTE_TYPED, column, rank)
    for key in TRIGGER_KEYS:
        assert key not in routes, key
        routes[key] = (_ROUTE_TYPED, _NORMALIZE, 0)
    return routes


_KEY_ROUTES = _build_routes()
_TYPED_COLUMN_COERCIONS = tuple(
    (column, _as_int if column in _INT_COLUMNS else _as_float if column in _FLOAT_COLUMNS else _as_str)
    for column in (*_TYPED_SOURCES, *_MESSAGE_COLUMNS.values()))
_TYPED_COLUMN_NAMES = tuple(column for column, _ in _TYPED_COLUMN_COERCIONS)


class _Columns:
    """Per-column Python lists for the rows of one request."""

    def __init__(self) -> None:
        self.scalars: dict[str, list] = {name: [] for name in SCALAR_COLUMNS}
        self.arrays: dict[str, list] = {name: [] for name in _ARRAY_COLUMNS.values()}
        self.services: list[str] = []

    def to_batches(self) -> list[tuple[str, pa.RecordBatch]]:
        if not self.services:
            return []
        arrays = []
        for f in SPAN_SCHEMA:
            if f.name in self.arrays:
                decode = decode_double_arrays if pa.types.is_floating(f.type.value_type) else decode_int_arrays
                arrays.append(decode(self.arrays[f.name], numbers_from_array_bytes))
            else:
                arrays.append(pa.array(self.scalars[f.name], f.type))
        batch = pa.RecordBatch.from_arrays(arrays, schema=SPAN_SCHEMA)
        services = set(self.services)
        if len(services) == 1:
            return [(self.services[0], batch)]
        out = []
        for service in sorted(services):
            indices = [i for i, s in enumerate(self.services) if s == service]
            out.append((service, batch.take(pa.array(indices, pa.int64()))))
        return out


def decode_request(
    request: Any,
    received_ns: int,
    max_value_bytes: int,
    recent_span_keys: Container[str] | None = None,
) -> DecodedRequest:
    """Turn a (shadow) ExportTraceServiceRequest into Arrow batches, one per service.

    Args:
        request: message from ``otlp_wire.parse_protobuf`` / ``parse_json``.
        received_ns: receive time, stored in ``received_unix_nano``.
        max_value_bytes: a span with a longer attribute value is rejected.
        recent_span_keys: ``trace_id + span_id`` hex keys already stored (after a
            restart); such spans are counted as duplicates and not stored again.
    """
    out = DecodedRequest()
    columns = _Columns()
    for resource_spans in request.resource_spans:
        resource_attrs = _attributes_to_dict(resource_spans.resource.attributes)
        service = resource_attrs.get(sc.SERVICE_NAME)
        service = service if isinstance(service, str) and service else UNKNOWN_SERVICE
        resource_json = _dumps(resource_attrs) if resource_attrs else None
        # Ids in the resource (OTEL_RESOURCE_ATTRIBUTES, `tracetrain run`) are NOT copied into the
        # span's columns: they rank below ids set on the trace's own spans, which only the
        # reader's views can see (reader._span_context_view reads them from resource_attributes).
        resource_typed: dict[str, tuple[int, Any]] = {}
        for scope_spans in resource_spans.scope_spans:
            scope = (scope_spans.scope.name or None, scope_spans.scope.version or None)
            for span in scope_spans.spans:
                out.spans_total += 1
                error = _append_span(columns, span, service, resource_json, resource_typed, scope, received_ns,
                                     max_value_bytes, recent_span_keys)
                if error == "duplicate":
                    out.spans_duplicate += 1
                elif error:
                    out.reject(error)
    out.batches = columns.to_batches()
    return out


def _check_ids(span: Any) -> str | None:
    trace_id, span_id, parent = span.trace_id, span.span_id, span.parent_span_id
    if len(trace_id) != 16 or trace_id == _ZERO_TRACE_ID:
        return f"span {span.name[:80]!r}: trace_id must be 16 non-zero bytes, got {len(trace_id)} bytes"
    if len(span_id) != 8 or span_id == _ZERO_SPAN_ID:
        return f"span {span.name[:80]!r}: span_id must be 8 non-zero bytes, got {len(span_id)} bytes"
    if len(parent) not in (0, 8):
        return f"span {span.name[:80]!r}: parent_span_id must be empty or 8 bytes, got {len(parent)} bytes"
    # Enums are open in proto3, but a value outside the spec's range is not a span we can store.
    if not 0 <= span.kind <= 5:
        return f"span {span.name[:80]!r}: kind {span.kind} is not a SpanKind (0-5)"
    if not 0 <= span.status.code <= 2:
        return f"span {span.name[:80]!r}: status code {span.status.code} is not a StatusCode (0-2)"
    return None


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _check_sizes(span: Any, max_value_bytes: int) -> str | None:
    """Events and links are bounded like attribute values (each as a whole)."""
    for label, items in (("event", span.events), ("link", span.links)):
        for item in items:
            size = item.ByteSize()
            if size > max_value_bytes:
                return f"span {span.name[:80]!r}: an {label} is {size} bytes, over the {max_value_bytes}-byte limit"
    return None


def _append_span(
    columns: _Columns,
    span: Any,
    service: str,
    resource_json: str | None,
    resource_typed: dict[str, tuple[int, Any]],
    scope: tuple[str | None, str | None],
    received_ns: int,
    max_value_bytes: int,
    recent_span_keys: Container[str] | None,
) -> str | None:
    """Append one span's row; return a rejection message, "duplicate", or None.

    This loop runs once per attribute of every span stored, so it is written for
    speed: one dict lookup decides what an attribute feeds (``_KEY_ROUTES``).
    """
    error = _check_ids(span) or ((span.events or span.links) and _check_sizes(span, max_value_bytes))
    if error:
        return error
    trace_hex = span.trace_id.hex()
    span_hex = span.span_id.hex()
    if recent_span_keys is not None and trace_hex + span_hex in recent_span_keys:
        return "duplicate"
    attrs: dict[str, Any] = {}
    typed: dict[str, tuple[int, Any]] = {}
    arrays: dict[str, bytes] = {}
    routes = _KEY_ROUTES
    for kv in span.attributes:
        key = kv.key
        value = kv.value
        which = value.WhichOneof("value")
        route = routes.get(key)
        if which == "string_value":
            py = value.string_value
            # A char is 1-4 UTF-8 bytes: only strings that might be over the limit get measured.
            if len(py) * 4 > max_value_bytes and _utf8_len(py) > max_value_bytes:
                return _too_large(span, key, _utf8_len(py), max_value_bytes)
        elif which == "array_value":
            raw = value.array_value
            if len(raw) > max_value_bytes:
                return _too_large(span, key, len(raw), max_value_bytes)
            if route is not None and route[0] == _ROUTE_ARRAY:
                arrays[route[1]] = raw
                continue
            py = array_bytes_to_python(raw)
        elif which == "int_value" or which == "bool_value":
            py = getattr(value, which)
        elif which == "double_value":
            py = _json_double(value.double_value)
        else:  # kvlist, bytes or unset: rare, so measuring the whole value is affordable
            size = value.ByteSize()
            if size > max_value_bytes:
                return _too_large(span, key, size, max_value_bytes)
            py = shadow_anyvalue_to_python(value)
        if route is None:
            attrs[key] = py
            continue
        kind, column, rank = route
        if kind == _ROUTE_MESSAGE:
            if not isinstance(py, str):
                py = _dumps(py)
            else:
                first = py[:1]
                if first != "[" and first != "{":  # JSON messages start so; only odd values pay for a parse
                    py = _json_text(py)
            typed[column] = (rank, py)
            continue
        current = typed.get(column)
        if current is None or current[0] > rank:
            typed[column] = (rank, py)
        attrs[key] = py
    if typed and _NORMALIZE in typed:  # a key of another convention was seen
        normalize(attrs, typed, span.name)
    if resource_typed:
        for column, entry in resource_typed.items():
            typed.setdefault(column, entry)
    _append_row(columns, span, trace_hex, span_hex, service, resource_json, scope, received_ns, attrs, typed)
    array_rows = columns.arrays
    for column in _ARRAY_COLUMN_NAMES:
        array_rows[column].append(arrays.get(column))
    return None


def _too_large(span: Any, key: str, size: int, limit: int) -> str:
    return f"span {span.name[:80]!r}: attribute {key[:80]!r} is {size} bytes, over the {limit}-byte limit"


def _append_row(
    columns: _Columns,
    span: Any,
    trace_hex: str,
    span_hex: str,
    service: str,
    resource_json: str | None,
    scope: tuple[str | None, str | None],
    received_ns: int,
    attrs: dict[str, Any],
    typed: dict[str, tuple[int, Any]],
) -> None:
    c = columns.scalars
    status = span.status
    c[sc.COL_TRACE_ID].append(trace_hex)
    c[sc.COL_SPAN_ID].append(span_hex)
    c[sc.COL_PARENT_SPAN_ID].append(span.parent_span_id.hex() or None)
    c[sc.COL_TRACE_STATE].append(span.trace_state or None)
    c[sc.COL_NAME].append(span.name)
    c[sc.COL_KIND].append(span.kind)
    c[sc.COL_START_NS].append(_clamp_ns(span.start_time_unix_nano))
    c[sc.COL_END_NS].append(_clamp_ns(span.end_time_unix_nano))
    c[sc.COL_STATUS_CODE].append(status.code)
    c[sc.COL_STATUS_MESSAGE].append(status.message or None)
    c[sc.COL_SERVICE_NAME].append(service)
    c[sc.COL_RESOURCE_ATTRIBUTES].append(resource_json)
    c[sc.COL_SCOPE_NAME].append(scope[0])
    c[sc.COL_SCOPE_VERSION].append(scope[1])
    c[sc.COL_ATTRIBUTES].append(_dumps(attrs) if attrs else None)
    c[sc.COL_EVENTS].append(_events_json(span.events) if span.events else None)
    c[sc.COL_LINKS].append(_links_json(span.links) if span.links else None)
    c[sc.COL_RECEIVED_NS].append(received_ns)
    if not typed:
        for column in _TYPED_COLUMN_NAMES:
            c[column].append(None)
    else:
        for column, coerce in _TYPED_COLUMN_COERCIONS:
            entry = typed.get(column)
            c[column].append(None if entry is None else coerce(entry[1]))
    columns.services.append(service)


def _clamp_ns(ns: int) -> int:
    # fixed64 on the wire, int64 in the table: values past year 2262 are clamped.
    return ns if ns < 2**63 else 2**63 - 1


def _events_json(events: Any) -> str:
    return _dumps([
        {
            "name": e.name,
            "time_unix_nano": e.time_unix_nano,
            "attributes": _attributes_to_dict(e.attributes),
        }
        for e in events
    ])


def _links_json(links: Any) -> str:
    return _dumps([
        {
            "trace_id": link.trace_id.hex(),
            "span_id": link.span_id.hex(),
            "trace_state": link.trace_state or None,
            "attributes": _attributes_to_dict(link.attributes),
        }
        for link in links
    ])
