"""OTLP request decoding: protobuf and OTLP/JSON bytes in, message objects out.

The receiver parses requests with a *shadow* of the OTLP trace schema that differs
in one field: ``AnyValue.array_value`` is declared ``bytes`` instead of
``ArrayValue``. Both are length-delimited on the wire, so the shadow parses every
valid OTLP request, but leaves each array as its serialized bytes. Token-id and
logprob arrays (hundreds of elements per LLM span) then skip the per-element
Python objects entirely and are decoded in bulk by ``anyvalue_arrays``; other
arrays are parsed on demand with the real ``ArrayValue`` class.

Every decoding failure raises ``PermanentError`` with a message fit for the client.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.json_format import ParseDict, ParseError
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from tracetrain.collector.errors import PermanentError

MAX_JSON_DEPTH = 64
"""OTLP/JSON nesting deeper than this is refused (it is never legitimate)."""
MAX_ANYVALUE_DEPTH = 32
"""Nested AnyValue kvlists/arrays deeper than this are stored as a placeholder."""


def _shadow_pool() -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    for module in (common_pb2, resource_pb2, trace_pb2, trace_service_pb2):
        file_proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(file_proto)
        for message in file_proto.message_type:
            if message.name != "AnyValue" or not file_proto.package.endswith("common.v1"):
                continue
            for field in message.field:
                if field.name == "array_value":
                    field.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
                    field.ClearField("type_name")
        pool.Add(file_proto)
    return pool


_POOL = _shadow_pool()
ShadowExportTraceServiceRequest = message_factory.GetMessageClass(
    _POOL.FindMessageTypeByName("opentelemetry.proto.collector.trace.v1.ExportTraceServiceRequest")
)
"""Parses any ExportTraceServiceRequest; ``AnyValue.array_value`` stays bytes."""


def parse_protobuf(body: bytes) -> Any:
    """Parse an OTLP/protobuf ExportTraceServiceRequest into the shadow message.

    Raises:
        PermanentError: the bytes are not a valid request (bad wire format,
            invalid UTF-8 in a string, nesting too deep).
    """
    try:
        return ShadowExportTraceServiceRequest.FromString(body)
    except (DecodeError, RuntimeError, ValueError) as exc:  # RuntimeError: recursion limit
        raise PermanentError(f"malformed OTLP protobuf: {exc}") from None


def parse_json(body: bytes) -> Any:
    """Parse an OTLP/JSON ExportTraceServiceRequest into the shadow message.

    Follows the OTLP/JSON rules: hex trace and span ids, integer enums, lowerCamelCase
    keys, int64 as string or number, unknown fields ignored.

    Raises:
        PermanentError: not UTF-8, not JSON, not the OTLP shape, or ids not hex.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PermanentError(f"OTLP/JSON body is not valid UTF-8: {exc}") from None
    try:
        document = json.loads(text)
    except RecursionError:
        raise PermanentError("OTLP/JSON nesting is too deep") from None
    except ValueError as exc:
        raise PermanentError(f"malformed OTLP/JSON: {exc}") from None
    if not isinstance(document, dict):
        raise PermanentError("OTLP/JSON body must be an object with 'resourceSpans'")
    _check_depth(document, MAX_JSON_DEPTH)
    _hex_ids_to_base64(document)
    request = trace_service_pb2.ExportTraceServiceRequest()
    try:
        ParseDict(document, request, ignore_unknown_fields=True)
    except (ParseError, ValueError, TypeError, AttributeError, OverflowError) as exc:
        raise PermanentError(f"OTLP/JSON does not match ExportTraceServiceRequest: {exc}") from None
    except RecursionError:
        raise PermanentError("OTLP/JSON nesting is too deep") from None
    return parse_protobuf(request.SerializeToString())


def _check_depth(value: Any, limit: int) -> None:
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            raise PermanentError(f"OTLP/JSON nesting deeper than {limit} levels")
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)


_ID_KEYS = {"traceId": 16, "spanId": 8, "parentSpanId": 8}


def _hex_ids_to_base64(document: dict) -> None:
    """OTLP/JSON writes ids as hex, proto3 JSON expects base64: convert in place."""
    for resource_spans in _as_list(document.get("resourceSpans")):
        for scope_spans in _as_list(_as_dict(resource_spans).get("scopeSpans")):
            for span in _as_list(_as_dict(scope_spans).get("spans")):
                span = _as_dict(span)
                _convert_ids(span)
                for link in _as_list(span.get("links")):
                    _convert_ids(_as_dict(link))


def _convert_ids(obj: dict) -> None:
    for key in _ID_KEYS:
        value = obj.get(key)
        if value in (None, ""):
            obj.pop(key, None)
            continue
        if not isinstance(value, str):
            raise PermanentError(f"OTLP/JSON {key} must be a hex string, got {type(value).__name__}")
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            raise PermanentError(f"OTLP/JSON {key} is not hex: {value[:40]!r}") from None
        obj[key] = base64.b64encode(raw).decode("ascii")


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise PermanentError(f"OTLP/JSON expected a list, got {type(value).__name__}")
    return value


def _as_dict(value: Any) -> dict:
    if not isinstance(value, dict):
        raise PermanentError(f"OTLP/JSON expected an object, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------- AnyValue -> Python


def array_bytes_to_python(raw: bytes, depth: int = 0) -> list | None:
    """Decode a serialized ArrayValue to a Python list (None if it is malformed)."""
    try:
        array = common_pb2.ArrayValue.FromString(raw)
    except (DecodeError, RuntimeError):
        return None
    return [_real_anyvalue_to_python(v, depth + 1) for v in array.values]


def shadow_anyvalue_to_python(value: Any, depth: int = 0) -> Any:
    """Convert a shadow AnyValue to a JSON-compatible Python value."""
    which = value.WhichOneof("value")
    if which == "string_value":
        return value.string_value
    if which == "int_value":
        return value.int_value
    if which == "double_value":
        return _json_double(value.double_value)
    if which == "bool_value":
        return value.bool_value
    if which == "array_value":
        return array_bytes_to_python(value.array_value, depth)
    if which == "kvlist_value":
        return _kvlist_to_python(value.kvlist_value.values, depth, shadow=True)
    if which == "bytes_value":
        return base64.b64encode(value.bytes_value).decode("ascii")
    return None


def _real_anyvalue_to_python(value: common_pb2.AnyValue, depth: int) -> Any:
    if depth > MAX_ANYVALUE_DEPTH:
        return "<nested too deep>"
    which = value.WhichOneof("value")
    if which == "array_value":
        return [_real_anyvalue_to_python(v, depth + 1) for v in value.array_value.values]
    if which == "kvlist_value":
        return _kvlist_to_python(value.kvlist_value.values, depth, shadow=False)
    if which == "double_value":
        return _json_double(value.double_value)
    if which == "bytes_value":
        return base64.b64encode(value.bytes_value).decode("ascii")
    return getattr(value, which) if which else None


def _kvlist_to_python(values: Any, depth: int, shadow: bool) -> Any:
    if depth > MAX_ANYVALUE_DEPTH:
        return "<nested too deep>"
    convert = shadow_anyvalue_to_python if shadow else _real_anyvalue_to_python
    return {kv.key: convert(kv.value, depth + 1) for kv in values}


def _json_double(x: float) -> float | str:
    # JSON has no NaN or infinity; DuckDB would refuse the whole document.
    if x != x or x in (float("inf"), float("-inf")):
        return str(x)
    return x
