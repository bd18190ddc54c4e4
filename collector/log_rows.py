"""OTLP log records -> Arrow rows of the ``logs`` table.

Log records arrive on ``LogsService/Export`` and ``POST /v1/logs``; they are stored
with their trace and span ids, event name, body and attributes (JSON), and go
through the same group commit as spans (``DecodedRequest.table == "logs"``).

GenAI instrumentations put message content in log events when asked to
(contracts.md §2.3): the contrib ``gen_ai.client.inference.operation.details``
event carries ``gen_ai.input.messages`` / ``gen_ai.output.messages`` attributes,
and the older per-message events (``gen_ai.{system,user,assistant,tool}.message``,
``gen_ai.choice``) carry one message each in their body. Those are normalized
here, once, into the message columns in the OTel parts format, so the
``llm_calls`` view only has to join them to their span.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
from google.protobuf.json_format import ParseDict, ParseError
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2

from tracetrain.collector import otlp_wire
from tracetrain.collector.errors import PermanentError
from tracetrain.collector.normalize import dumps, ensure_parts, make_message, openai_tool_calls
from tracetrain.collector.schema import LOG_SCHEMA
from tracetrain.collector.span_rows import UNKNOWN_SERVICE, DecodedRequest
from tracetrain.instrumentation import semconv as sc

_ZERO_TRACE_ID = bytes(16)
_ZERO_SPAN_ID = bytes(8)
_MESSAGE_EVENTS = {
    "gen_ai.system.message": "system",
    "gen_ai.user.message": "user",
    "gen_ai.assistant.message": "assistant",
    "gen_ai.tool.message": "tool",
}
_CHOICE_EVENT = "gen_ai.choice"
# Attributes of the operation-details event promoted to message columns (not repeated in `attributes`).
_DETAIL_COLUMNS = {
    sc.GEN_AI_INPUT_MESSAGES: sc.COL_INPUT_MESSAGES,
    sc.GEN_AI_OUTPUT_MESSAGES: sc.COL_OUTPUT_MESSAGES,
    sc.GEN_AI_SYSTEM_INSTRUCTIONS: sc.COL_SYSTEM_INSTRUCTIONS,
}


# ---------------------------------------------------------------- parsing


def parse_protobuf(body: bytes) -> logs_service_pb2.ExportLogsServiceRequest:
    """Parse an OTLP/protobuf ExportLogsServiceRequest.

    Raises:
        PermanentError: not a valid request.
    """
    try:
        return logs_service_pb2.ExportLogsServiceRequest.FromString(body)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise PermanentError(f"malformed OTLP logs protobuf: {exc}") from None


def parse_json(body: bytes) -> logs_service_pb2.ExportLogsServiceRequest:
    """Parse an OTLP/JSON ExportLogsServiceRequest (hex ids, integer enums).

    Raises:
        PermanentError: not UTF-8, not JSON, not the OTLP shape, or ids not hex.
    """
    try:
        document = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise PermanentError(f"OTLP/JSON body is not valid UTF-8: {exc}") from None
    except RecursionError:
        raise PermanentError("OTLP/JSON nesting is too deep") from None
    except ValueError as exc:
        raise PermanentError(f"malformed OTLP/JSON: {exc}") from None
    if not isinstance(document, dict):
        raise PermanentError("OTLP/JSON body must be an object with 'resourceLogs'")
    otlp_wire._check_depth(document, otlp_wire.MAX_JSON_DEPTH)
    for resource_logs in otlp_wire._as_list(document.get("resourceLogs")):
        for scope_logs in otlp_wire._as_list(otlp_wire._as_dict(resource_logs).get("scopeLogs")):
            for record in otlp_wire._as_list(otlp_wire._as_dict(scope_logs).get("logRecords")):
                otlp_wire._convert_ids(otlp_wire._as_dict(record))
    request = logs_service_pb2.ExportLogsServiceRequest()
    try:
        ParseDict(document, request, ignore_unknown_fields=True)
    except (ParseError, ValueError, TypeError, AttributeError) as exc:
        raise PermanentError(f"OTLP/JSON does not match ExportLogsServiceRequest: {exc}") from None
    except RecursionError:
        raise PermanentError("OTLP/JSON nesting is too deep") from None
    return request


# ---------------------------------------------------------------- messages


def _anyvalue(value: Any) -> Any:
    return otlp_wire._real_anyvalue_to_python(value, 0) if value.WhichOneof("value") else None


def _attributes(attributes: Iterable[Any]) -> dict[str, Any]:
    return {kv.key: _anyvalue(kv.value) for kv in attributes}


def _json_value(value: Any) -> Any:
    """A message attribute as sent: a JSON string (decoded) or a structured value."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _event_message(name: str, body: Any) -> tuple[str, dict, int | None] | None:
    """(direction, OTel message, choice index) for a per-message GenAI event."""
    body = _json_value(body) if isinstance(body, str) else body
    if not isinstance(body, dict):
        body = {"content": body} if body is not None else {}
    if name == _CHOICE_EVENT:
        inner = body.get("message") if isinstance(body.get("message"), dict) else {}
        calls = openai_tool_calls(body.get("tool_calls") or inner.get("tool_calls"))
        message = make_message(inner.get("role") or "assistant", inner.get("content"), calls,
                               finish_reason=body.get("finish_reason"))
        index = body.get("index")
        return "output", message, index if isinstance(index, int) and not isinstance(index, bool) else None
    role = body.get("role") if isinstance(body.get("role"), str) else _MESSAGE_EVENTS[name]
    message = make_message(role, body.get("content"), openai_tool_calls(body.get("tool_calls")),
                           body.get("id") or body.get("tool_call_id"), body.get("name"))
    return "input", message, None


def _message_columns(name: str | None, attrs: dict[str, Any], body: Any) -> dict[str, Any]:
    """The message columns of one record (empty unless it is a GenAI message event).

    Promoted attributes are removed from ``attrs``.
    """
    if name == sc.GEN_AI_OPERATION_DETAILS_EVENT:
        source = body if isinstance(body, dict) else {}
        out = {}
        for key, column in _DETAIL_COLUMNS.items():
            value = attrs.pop(key, None)
            if value is None:
                value = source.get(key)
            if value is not None:
                decoded = ensure_parts(_json_value(value))
                out[column] = decoded if isinstance(decoded, str) else dumps(decoded)
        return out
    if name in _MESSAGE_EVENTS or name == _CHOICE_EVENT:
        direction, message, index = _event_message(name, body)
        return {sc.COL_MESSAGE: dumps(message), sc.COL_MESSAGE_DIRECTION: direction, sc.COL_MESSAGE_INDEX: index}
    return {}


# ---------------------------------------------------------------- rows


def _check_ids(record: Any) -> str | None:
    if len(record.trace_id) not in (0, 16):
        return f"log record: trace_id must be empty or 16 bytes, got {len(record.trace_id)} bytes"
    if len(record.span_id) not in (0, 8):
        return f"log record: span_id must be empty or 8 bytes, got {len(record.span_id)} bytes"
    return None


def decode_logs_request(request: Any, received_ns: int, max_value_bytes: int) -> DecodedRequest:
    """Turn an ExportLogsServiceRequest into Arrow batches of the ``logs`` table, one per service.

    A record whose ids have the wrong length, or whose body or attributes are
    larger than ``max_value_bytes`` as JSON, is rejected (partial success).
    """
    out = DecodedRequest(table=sc.TABLE_LOGS)
    columns: dict[str, list] = {name: [] for name in LOG_SCHEMA.names}
    services: list[str] = []
    seq = 0
    for resource_logs in request.resource_logs:
        resource_attrs = _attributes(resource_logs.resource.attributes)
        service = resource_attrs.get(sc.SERVICE_NAME)
        service = service if isinstance(service, str) and service else UNKNOWN_SERVICE
        resource_json = dumps(resource_attrs) if resource_attrs else None
        for scope_logs in resource_logs.scope_logs:
            scope = (scope_logs.scope.name or None, scope_logs.scope.version or None)
            for record in scope_logs.log_records:
                out.spans_total += 1
                row = _record_row(record, max_value_bytes)
                if isinstance(row, str):
                    out.reject(row)
                    continue
                row.update({sc.COL_SERVICE_NAME: service, sc.COL_RESOURCE_ATTRIBUTES: resource_json,
                            sc.COL_SCOPE_NAME: scope[0], sc.COL_SCOPE_VERSION: scope[1],
                            sc.COL_RECEIVED_NS: received_ns, sc.COL_RECORD_SEQ: seq})
                seq += 1
                for name, values in columns.items():
                    values.append(row.get(name))
                services.append(service)
    if services:
        batch = pa.RecordBatch.from_pydict(columns, schema=LOG_SCHEMA)
        for service in sorted(set(services)):
            indices = [i for i, s in enumerate(services) if s == service]
            out.batches.append((service, batch if len(indices) == len(services)
                                else batch.take(pa.array(indices, pa.int64()))))
    return out


def _record_row(record: Any, max_value_bytes: int) -> dict[str, Any] | str:
    """One record's own columns, or a rejection message."""
    error = _check_ids(record)
    if error:
        return error
    attrs = _attributes(record.attributes)
    body = _anyvalue(record.body) if record.HasField("body") else None
    name = record.event_name or None
    if name is None and isinstance(attrs.get(sc.EVENT_NAME), str):
        name = attrs[sc.EVENT_NAME]
    record_id = hashlib.blake2b(record.SerializeToString(deterministic=True), digest_size=12).hexdigest()
    row = _message_columns(name, attrs, body)
    body_json = dumps(body) if body is not None else None
    attrs_json = dumps(attrs) if attrs else None
    for text in (body_json, attrs_json):
        if text is not None and len(text) > max_value_bytes:
            return f"log record {name or ''!r}: {len(text)} bytes of JSON, over the {max_value_bytes}-byte limit"
    trace_id, span_id = record.trace_id, record.span_id
    row.update({
        sc.COL_TRACE_ID: trace_id.hex() if trace_id and trace_id != _ZERO_TRACE_ID else None,
        sc.COL_SPAN_ID: span_id.hex() if span_id and span_id != _ZERO_SPAN_ID else None,
        sc.COL_TIME_NS: _clamp(record.time_unix_nano) or None,
        sc.COL_OBSERVED_NS: _clamp(record.observed_time_unix_nano) or None,
        sc.COL_SEVERITY_NUMBER: record.severity_number if 0 <= record.severity_number <= 127 else None,
        sc.COL_SEVERITY_TEXT: record.severity_text or None,
        sc.COL_EVENT_NAME: name,
        sc.COL_BODY: body_json,
        sc.COL_ATTRIBUTES: attrs_json,
        sc.COL_RECORD_ID: record_id,
    })
    return row


def _clamp(ns: int) -> int:
    return ns if ns < 2**63 else 2**63 - 1
