"""Property tests for OTLP request decoding (``otlp_wire`` + ``span_rows.decode_request``).

* Any bytes given to ``parse_protobuf`` / ``parse_json`` either parse or raise
  ``PermanentError`` (the receivers map it to INVALID_ARGUMENT / 400), never anything else.
* A random valid ExportTraceServiceRequest, as protobuf and as OTLP/JSON, decodes to
  exactly the rows that were built.
"""

from __future__ import annotations

import base64
import json
import math
import os
from dataclasses import dataclass

import pytest
from google.protobuf.json_format import MessageToDict
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2

from tracetrain.collector import otlp_wire
from tracetrain.collector.errors import PermanentError
from tracetrain.collector.span_rows import UNKNOWN_SERVICE, decode_request
from tracetrain.instrumentation import semconv as sc

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
U64_MAX = 2**64 - 1
# TRACETRAIN_HYPOTHESIS_SCALE=20 runs 20x the examples (a deeper, slower search).
SCALE = int(os.environ.get("TRACETRAIN_HYPOTHESIS_SCALE", "1"))
SETTINGS = settings(max_examples=100 * SCALE, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEWER = settings(SETTINGS, max_examples=40 * SCALE)


# ---------------------------------------------------------------- Python value <-> AnyValue


def to_anyvalue(value: object) -> common_pb2.AnyValue:
    v = common_pb2.AnyValue()
    if value is None:
        pass
    elif isinstance(value, bool):
        v.bool_value = value
    elif isinstance(value, int):
        v.int_value = value
    elif isinstance(value, float):
        v.double_value = value
    elif isinstance(value, str):
        v.string_value = value
    elif isinstance(value, bytes):
        v.bytes_value = value
    elif isinstance(value, list):
        v.array_value.SetInParent()  # an empty list is still an array
        v.array_value.values.extend(to_anyvalue(x) for x in value)
    elif isinstance(value, dict):
        v.kvlist_value.SetInParent()
        for key, item in value.items():
            v.kvlist_value.values.add(key=key).value.CopyFrom(to_anyvalue(item))
    else:  # pragma: no cover
        raise TypeError(value)
    return v


def expected_json(value: object) -> object:
    """What the stored JSON must hold for ``value`` (as json.loads reads it back)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # 'nan', 'inf', '-inf': JSON has no such numbers
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, list):
        return [expected_json(x) for x in value]
    if isinstance(value, dict):
        return {k: expected_json(x) for k, x in value.items()}
    return value


def key_values(attrs: dict[str, object]) -> list[common_pb2.KeyValue]:
    return [common_pb2.KeyValue(key=k, value=to_anyvalue(v)) for k, v in attrs.items()]


# ---------------------------------------------------------------- strategies

int64s = st.integers(INT64_MIN, INT64_MAX)
leaf_values = st.one_of(
    st.none(), st.booleans(), int64s, st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.binary(max_size=12))
any_values = st.recursive(
    leaf_values,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.text(max_size=6), children, max_size=3)),
    max_leaves=10,
)
# Keys that cannot collide with the keys span_rows promotes to typed columns.
attr_keys = st.text(max_size=10).map(lambda s: "k." + s)
attributes = st.dictionaries(attr_keys, any_values, max_size=5)
nonzero_trace_ids = st.binary(min_size=16, max_size=16).filter(any)
nonzero_span_ids = st.binary(min_size=8, max_size=8).filter(any)
u64 = st.one_of(st.integers(0, U64_MAX), st.sampled_from([0, 2**63 - 1, 2**63, U64_MAX]))


@dataclass
class SpanSpec:
    trace_id: bytes
    span_id: bytes
    parent: bytes
    trace_state: str
    name: str
    kind: int
    start: int
    end: int
    status_code: int
    status_message: str
    attrs: dict
    events: list  # (name, time, attrs)
    links: list  # (trace_id, span_id, trace_state, attrs)
    token_ids: list[int] | None
    logprobs: list[float | int] | None


@dataclass
class ResourceSpec:
    attrs: dict
    scope_name: str
    scope_version: str
    spans: list[SpanSpec]


@st.composite
def span_specs(draw: st.DrawFn, span_id: bytes) -> SpanSpec:
    return SpanSpec(
        trace_id=draw(nonzero_trace_ids),
        span_id=span_id,
        parent=draw(st.one_of(st.just(b""), st.binary(min_size=8, max_size=8))),
        trace_state=draw(st.sampled_from(["", "a=b", "vendor=x,other=y"])),
        name=draw(st.text(max_size=20)),
        kind=draw(st.integers(0, 5)),
        start=draw(u64),
        end=draw(u64),
        status_code=draw(st.integers(0, 2)),
        status_message=draw(st.text(max_size=10)),
        attrs=draw(attributes),
        events=draw(st.lists(st.tuples(st.text(max_size=8), u64, attributes), max_size=2)),
        links=draw(st.lists(st.tuples(nonzero_trace_ids, nonzero_span_ids, st.sampled_from(["", "k=v"]),
                                      attributes), max_size=2)),
        token_ids=draw(st.one_of(st.none(), st.lists(int64s, max_size=20))),
        # mostly doubles (the vectorized path); an int sends the row to the slow path, where
        # NaN and infinities must survive too and ints that no double holds exactly are rounded
        logprobs=draw(st.one_of(st.none(), st.lists(st.floats(allow_nan=True), max_size=20),
                                st.lists(st.one_of(st.floats(allow_nan=True), int64s,
                                                   st.sampled_from([2**53 + 1, INT64_MAX])), max_size=20))),
    )


@st.composite
def request_specs(draw: st.DrawFn) -> list[ResourceSpec]:
    n_spans = draw(st.integers(1, 6))
    span_ids = draw(st.lists(nonzero_span_ids, min_size=n_spans, max_size=n_spans, unique=True))
    spans = [draw(span_specs(sid)) for sid in span_ids]
    # split the spans over 1-3 resources
    cuts = sorted(draw(st.lists(st.integers(0, n_spans), max_size=2)))
    groups = [spans[a:b] for a, b in zip([0, *cuts], [*cuts, n_spans])]
    resources = []
    for group in groups:
        res_attrs = draw(attributes)
        service = draw(st.one_of(st.none(), st.sampled_from(["svc-a", "svc-b", "écho ☃", ""])))
        if service is not None:
            res_attrs[sc.SERVICE_NAME] = service
        resources.append(ResourceSpec(res_attrs, draw(st.text(max_size=8)), draw(st.text(max_size=5)), group))
    return resources


def build_request(resources: list[ResourceSpec]) -> trace_service_pb2.ExportTraceServiceRequest:
    request = trace_service_pb2.ExportTraceServiceRequest()
    for res in resources:
        rs = request.resource_spans.add()
        rs.resource.attributes.extend(key_values(res.attrs))
        ss = rs.scope_spans.add()
        ss.scope.name, ss.scope.version = res.scope_name, res.scope_version
        for s in res.spans:
            span = ss.spans.add(
                trace_id=s.trace_id, span_id=s.span_id, parent_span_id=s.parent, trace_state=s.trace_state,
                name=s.name, kind=s.kind, start_time_unix_nano=s.start, end_time_unix_nano=s.end)
            span.status.code, span.status.message = s.status_code, s.status_message
            span.attributes.extend(key_values(s.attrs))
            if s.token_ids is not None:
                span.attributes.add(key=sc.INPUT_TOKEN_IDS).value.CopyFrom(to_anyvalue(list(s.token_ids)))
            if s.logprobs is not None:
                span.attributes.add(key=sc.OUTPUT_LOGPROBS).value.CopyFrom(to_anyvalue(list(s.logprobs)))
            for name, time_ns, attrs in s.events:
                span.events.add(name=name, time_unix_nano=time_ns).attributes.extend(key_values(attrs))
            for trace_id, span_id, state, attrs in s.links:
                span.links.add(trace_id=trace_id, span_id=span_id, trace_state=state).attributes.extend(
                    key_values(attrs))
    return request


def expected_rows(resources: list[ResourceSpec]) -> dict[str, dict]:
    rows = {}
    for res in resources:
        service = res.attrs.get(sc.SERVICE_NAME)
        for s in res.spans:
            rows[s.span_id.hex()] = {
                sc.COL_TRACE_ID: s.trace_id.hex(),
                sc.COL_SPAN_ID: s.span_id.hex(),
                sc.COL_PARENT_SPAN_ID: s.parent.hex() or None,
                sc.COL_TRACE_STATE: s.trace_state or None,
                sc.COL_NAME: s.name,
                sc.COL_KIND: s.kind,
                sc.COL_START_NS: min(s.start, 2**63 - 1),
                sc.COL_END_NS: min(s.end, 2**63 - 1),
                sc.COL_STATUS_CODE: s.status_code,
                sc.COL_STATUS_MESSAGE: s.status_message or None,
                sc.COL_SERVICE_NAME: service if isinstance(service, str) and service else UNKNOWN_SERVICE,
                sc.COL_RESOURCE_ATTRIBUTES: expected_json(res.attrs) if res.attrs else None,
                sc.COL_SCOPE_NAME: res.scope_name or None,
                sc.COL_SCOPE_VERSION: res.scope_version or None,
                sc.COL_ATTRIBUTES: expected_json(s.attrs) if s.attrs else None,
                sc.COL_EVENTS: [{"name": n, "time_unix_nano": t, "attributes": expected_json(a)}
                                for n, t, a in s.events] or None,
                sc.COL_LINKS: [{"trace_id": t.hex(), "span_id": i.hex(), "trace_state": st_ or None,
                                "attributes": expected_json(a)} for t, i, st_, a in s.links] or None,
                sc.COL_RECEIVED_NS: 1,
                sc.COL_PROMPT_TOKEN_IDS: s.token_ids,
                sc.COL_RESPONSE_LOGPROBS: None if s.logprobs is None else [float(x) for x in s.logprobs],
                sc.COL_RESPONSE_TOKEN_IDS: None,
            }
    return rows


JSON_COLUMNS = (sc.COL_RESOURCE_ATTRIBUTES, sc.COL_ATTRIBUTES, sc.COL_EVENTS, sc.COL_LINKS)


def decoded_rows(request: object) -> dict[str, dict]:
    decoded = decode_request(request, received_ns=1, max_value_bytes=1 << 20)
    assert decoded.spans_rejected == 0, decoded.rejection_messages
    rows: dict[str, dict] = {}
    for service, batch in decoded.batches:
        for row in batch.to_pylist():
            assert row[sc.COL_SERVICE_NAME] == service
            assert row[sc.COL_SPAN_ID] not in rows
            for column in JSON_COLUMNS:
                if row[column] is not None:
                    row[column] = json.loads(row[column])
            rows[row[sc.COL_SPAN_ID]] = row
    assert decoded.rows == len(rows) == decoded.spans_total
    return rows


def _same_floats(got: list[float] | None, want: list[float] | None) -> bool:
    if got is None or want is None:
        return got is want
    return len(got) == len(want) and all(
        (math.isnan(g) and math.isnan(w)) or (g == w and math.copysign(1, g) == math.copysign(1, w))
        for g, w in zip(got, want))


def assert_rows_match(got: dict[str, dict], want: dict[str, dict]) -> None:
    assert got.keys() == want.keys()
    for span_id, expected in want.items():
        row = got[span_id]
        for column, value in expected.items():
            if column == sc.COL_RESPONSE_LOGPROBS:
                assert _same_floats(row[column], value), (column, row[column], value)
            else:
                assert row[column] == value, (column, row[column], value)


def to_otlp_json(request: trace_service_pb2.ExportTraceServiceRequest) -> bytes:
    """OTLP/JSON as the spec writes it: proto3 JSON, but hex ids and integer enums."""
    document = MessageToDict(request, use_integers_for_enums=True)

    def hexify(obj: dict) -> None:
        for key in ("traceId", "spanId", "parentSpanId"):
            if key in obj:
                obj[key] = base64.b64decode(obj[key]).hex()

    for rs in document.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for span in ss.get("spans", []):
                hexify(span)
                for link in span.get("links", []):
                    hexify(link)
    return json.dumps(document, ensure_ascii=False).encode("utf-8")


# ---------------------------------------------------------------- round trips


@FEWER
@given(request_specs())
def test_protobuf_round_trip(resources: list[ResourceSpec]) -> None:
    body = build_request(resources).SerializeToString()
    assert_rows_match(decoded_rows(otlp_wire.parse_protobuf(body)), expected_rows(resources))


@FEWER
@given(request_specs())
def test_otlp_json_round_trip(resources: list[ResourceSpec]) -> None:
    request = build_request(resources)
    body = to_otlp_json(request)
    from_json = decoded_rows(otlp_wire.parse_json(body))
    assert_rows_match(from_json, expected_rows(resources))
    # and exactly the same rows as the protobuf form
    from_pb = decoded_rows(otlp_wire.parse_protobuf(request.SerializeToString()))
    assert from_json.keys() == from_pb.keys()
    for span_id, row in from_pb.items():
        other = dict(from_json[span_id])
        assert _same_floats(other.pop(sc.COL_RESPONSE_LOGPROBS), row[sc.COL_RESPONSE_LOGPROBS])
        assert other == {k: v for k, v in row.items() if k != sc.COL_RESPONSE_LOGPROBS}


def test_round_trip_fixed_example() -> None:
    """A hand-checked instance of the round trip, independent of the strategies."""
    span = SpanSpec(
        trace_id=bytes(range(1, 17)), span_id=bytes(range(1, 9)), parent=b"\xff" * 8, trace_state="a=b",
        name="chat ☃ \x00 \U0001F600", kind=3, start=2**64 - 1, end=5, status_code=2, status_message="boom",
        attrs={"k.s": "x", "k.i": -(2**63), "k.d": math.nan, "k.inf": -math.inf, "k.b": True, "k.bytes": b"\x00\xff",
               "k.arr": [1, "a", [2.5, None]], "k.kv": {"n": {"m": [False]}}, "k.none": None},
        events=[("ev", 7, {"k.e": 1})], links=[(b"\x02" * 16, b"\x03" * 8, "", {})],
        token_ids=[1, 2, INT64_MAX], logprobs=[-0.5, -math.inf])
    # ints among the logprobs: the row takes the slow path, which keeps NaN/inf and rounds 2**53 + 1
    mixed = SpanSpec(
        trace_id=bytes(range(1, 17)), span_id=bytes(range(2, 10)), parent=b"", trace_state="", name="mixed",
        kind=0, start=1, end=2, status_code=0, status_message="", attrs={}, events=[], links=[], token_ids=None,
        logprobs=[math.nan, 2**53 + 1, -math.inf, 1, 0.25])
    resources = [ResourceSpec({sc.SERVICE_NAME: "svc"}, "scope", "1.0", [span, mixed])]
    want = expected_rows(resources)
    assert _same_floats(want[mixed.span_id.hex()][sc.COL_RESPONSE_LOGPROBS],
                        [math.nan, 9007199254740992.0, -math.inf, 1.0, 0.25])
    row = want[span.span_id.hex()]
    assert row[sc.COL_ATTRIBUTES] == {
        "k.s": "x", "k.i": -(2**63), "k.d": "nan", "k.inf": "-inf", "k.b": True, "k.bytes": "AP8=",
        "k.arr": [1, "a", [2.5, None]], "k.kv": {"n": {"m": [False]}}, "k.none": None}
    assert row[sc.COL_START_NS] == 2**63 - 1
    request = build_request(resources)
    assert_rows_match(decoded_rows(otlp_wire.parse_protobuf(request.SerializeToString())), want)
    assert_rows_match(decoded_rows(otlp_wire.parse_json(to_otlp_json(request))), want)


# ---------------------------------------------------------------- garbage in: PermanentError only


def _parse_protobuf_or_permanent(body: bytes) -> object | None:
    try:
        return otlp_wire.parse_protobuf(body)
    except PermanentError as exc:
        assert str(exc)  # a message for the client
        return None


def _parse_json_or_permanent(body: bytes) -> object | None:
    try:
        return otlp_wire.parse_json(body)
    except PermanentError as exc:
        assert str(exc)
        return None


@SETTINGS
@given(st.binary(max_size=300))
@example(b"")
@example(b"\x0a")
@example(b"\x0a\xff\xff\xff\xff\x0f")
@example(b"\xff" * 11)
@example(b"\x0a\x05\x12\x03\x1a\x01\xff")
def test_random_bytes_parse_or_permanent_error(body: bytes) -> None:
    _parse_protobuf_or_permanent(body)
    _parse_json_or_permanent(body)


def _rich_request() -> trace_service_pb2.ExportTraceServiceRequest:
    span = SpanSpec(
        trace_id=bytes(range(1, 17)), span_id=bytes(range(1, 9)), parent=bytes(range(9, 17)), trace_state="t=1",
        name="chat", kind=3, start=1_700_000_000_000_000_000, end=1_700_000_000_000_000_500, status_code=1,
        status_message="", attrs={"k.s": "hello", "k.i": 42, "k.d": 0.25, "k.b": True, "k.bytes": b"\x01\x02",
                                  "k.arr": ["a", 1, 2.0], "k.kv": {"x": [1, {"y": "z"}]}},
        events=[("tok", 123, {"k.e": "v"})], links=[(b"\x07" * 16, b"\x08" * 8, "s=1", {"k.l": 1})],
        token_ids=[1, 200, 70000], logprobs=[-0.1, -2.5])
    other = SpanSpec(
        trace_id=bytes(range(1, 17)), span_id=bytes(range(20, 28)), parent=b"", trace_state="", name="tool",
        kind=1, start=1, end=2, status_code=0, status_message="",
        attrs={sc.GEN_AI_USAGE_INPUT_TOKENS: 12, sc.REWARD: 0.5, "k.t": "x"},
        events=[], links=[], token_ids=[5], logprobs=None)
    return build_request([ResourceSpec({sc.SERVICE_NAME: "svc", "k.r": 1}, "scope", "1", [span, other])])


RICH_BODY = _rich_request().SerializeToString()
RICH_JSON = to_otlp_json(_rich_request())


def _mutate(raw: bytes, data: st.DataObject, max_ops: int = 4) -> bytes:
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, max_ops))):
        op = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "duplicate"]))
        if not buf:
            buf.extend(data.draw(st.binary(min_size=1, max_size=8)))
            continue
        i = data.draw(st.integers(0, len(buf) - 1))
        if op == "flip":
            buf[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set":
            buf[i] = data.draw(st.integers(0, 255))
        elif op == "insert":
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del buf[i:i + data.draw(st.integers(1, 4))]
        elif op == "truncate":
            del buf[i:]
        else:
            j = data.draw(st.integers(i, min(len(buf), i + 32)))
            buf[j:j] = buf[i:j]
    return bytes(buf)


def _decode_never_crashes(request: object) -> None:
    """Whatever parsed is decoded without raising: bad spans are rejected, the rest stored."""
    decoded = decode_request(request, received_ns=1, max_value_bytes=1 << 20)
    assert decoded.spans_total == sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
    for _, batch in decoded.batches:  # a span with an enum outside the spec's range is rejected, not stored
        assert all(0 <= k <= 5 for k in batch.column(sc.COL_KIND).to_pylist())
        assert all(0 <= c <= 2 for c in batch.column(sc.COL_STATUS_CODE).to_pylist())
    assert decoded.rows + decoded.spans_rejected + decoded.spans_duplicate == decoded.spans_total
    assert len(decoded.rejection_messages) == min(decoded.spans_rejected, 5)
    assert all(decoded.rejection_messages)


@SETTINGS
@given(st.data())
def test_mutated_protobuf_parses_or_permanent_error_and_decodes(data: st.DataObject) -> None:
    body = _mutate(RICH_BODY, data)
    request = _parse_protobuf_or_permanent(body)
    if request is not None:
        _decode_never_crashes(request)


json_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.sampled_from(["", "0" * 32, "zz", "0102", "AQID", "NaN", "Infinity", "-1", "1e999"]))
OTLP_KEYS = ["resourceSpans", "scopeSpans", "spans", "traceId", "spanId", "parentSpanId", "name", "kind",
             "attributes", "key", "value", "stringValue", "intValue", "doubleValue", "boolValue", "bytesValue",
             "arrayValue", "kvlistValue", "values", "events", "links", "status", "code", "message",
             "startTimeUnixNano", "endTimeUnixNano", "timeUnixNano", "resource", "scope", "traceState",
             "droppedAttributesCount", "flags", "version", "schemaUrl", "trace_id", "unknownField"]
json_values = st.recursive(
    json_leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.one_of(st.sampled_from(OTLP_KEYS), st.text(max_size=5)), children, max_size=4)),
    max_leaves=15,
)


def _paths(document: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(document, dict):
        for key, value in document.items():
            out.extend(_paths(value, (*prefix, key)))
    elif isinstance(document, list):
        for i, value in enumerate(document):
            out.extend(_paths(value, (*prefix, i)))
    return out


def _replace(document: object, path: tuple, value: object) -> object:
    if not path:
        return value
    parent = document
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = value
    return document


@SETTINGS
@given(json_values)
@example({"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]})
@example({"resourceSpans": "x"})
@example({"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": 5}]}]}]})
@example({"resourceSpans": [{"scopeSpans": [{"spans": [{"spanId": "0" * 16, "kind": "SPAN_KIND_FOO"}]}]}]})
@example({"resourceSpans": [{"scopeSpans": [{"spans": [{"kind": math.inf, "status": {"code": -math.inf}}]}]}]})
@example({"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "01" * 16, "spanId": "02" * 8, "kind": 200,
                                                       "status": {"code": 1000}}]}]}]})
def test_random_json_documents_parse_or_permanent_error(document: object) -> None:
    request = _parse_json_or_permanent(json.dumps(document).encode())
    if request is not None:
        _decode_never_crashes(request)


@SETTINGS
@given(st.data())
def test_valid_json_with_one_value_replaced_parses_or_permanent_error(data: st.DataObject) -> None:
    document = json.loads(RICH_JSON)
    path = data.draw(st.sampled_from(_paths(document)))
    document = _replace(document, path, data.draw(json_values))
    request = _parse_json_or_permanent(json.dumps(document).encode())
    if request is not None:
        _decode_never_crashes(request)


@SETTINGS
@given(st.data())
def test_mutated_json_bytes_parse_or_permanent_error(data: st.DataObject) -> None:
    body = _mutate(RICH_JSON, data)
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        document = None
    request = _parse_json_or_permanent(body)
    if request is not None:
        _decode_never_crashes(request)


OTHER_CONVENTION_PREFIXES = ["llm.input_messages.{}.message.", "llm.output_messages.{}.message.",
                             "gen_ai.prompt.{}.", "gen_ai.completion.{}.", "llm.prompts.{}.", "llm.choices.{}."]
OTHER_CONVENTION_FIELDS = ["role", "content", "name", "tool_call_id", "finish_reason", "prompt.text",
                           "completion.text", "tool_calls.{}.id", "tool_calls.{}.name", "tool_calls.{}.arguments",
                           "tool_calls.{}.tool_call.function.name", "contents.{}.message_content.type",
                           "contents.{}.message_content.text", "contents.{}.message_content.image.image.url"]
indices = st.one_of(st.integers(0, 3).map(str),
                    st.sampled_from(["", "x", "-1", "01", "9" * 30, "\u00b2", "\u0661", "7" * 5000]))


@st.composite
def other_convention_attributes(draw: st.DrawFn) -> dict:
    attrs = {}
    for _ in range(draw(st.integers(1, 8))):
        prefix = draw(st.sampled_from(OTHER_CONVENTION_PREFIXES)).format(draw(indices))
        key = prefix + draw(st.sampled_from(OTHER_CONVENTION_FIELDS)).format(draw(indices))
        attrs[key] = draw(any_values)
    trigger = draw(st.sampled_from([sc.OPENINFERENCE_SPAN_KIND, sc.TRACELOOP_REQUEST_TYPE, sc.TRACELOOP_SPAN_KIND,
                                    "gen_ai.prompt.0.role", "llm.input_messages.0.message.role"]))
    attrs[trigger] = draw(st.one_of(st.sampled_from(["LLM", "llm", "AGENT", "TOOL", "chat", "agent", "tool"]),
                                    any_values))
    for key in (sc.GEN_AI_SYSTEM, "llm.finish_reason", sc.TRACELOOP_ENTITY_NAME, sc.GEN_AI_INPUT_MESSAGES):
        if draw(st.booleans()):
            attrs[key] = draw(any_values)
    return attrs


@SETTINGS
@given(other_convention_attributes())
@example({sc.OPENINFERENCE_SPAN_KIND: "LLM", "llm.input_messages.0.message.contents.0.message_content.type": None,
          "llm.input_messages.0.message.tool_calls.0.tool_call.id": [1, {"a": b"x"}]})
@example({"gen_ai.prompt.0.role": {"x": 1}, "gen_ai.prompt.0.content": [{"type": ["image_url"]}]})
def test_other_convention_attributes_never_crash_decode(attrs: dict) -> None:
    """Spans in other LLM conventions go through ``normalize``: random values must not break it."""
    request = build_request([ResourceSpec({}, "", "", [SpanSpec(
        trace_id=b"\x01" * 16, span_id=b"\x02" * 8, parent=b"", trace_state="", name="llm", kind=1, start=1,
        end=2, status_code=0, status_message="", attrs=attrs, events=[], links=[], token_ids=None,
        logprobs=None)])])
    decoded = decode_request(otlp_wire.parse_protobuf(request.SerializeToString()), received_ns=1,
                             max_value_bytes=1 << 20)
    assert decoded.rows == 1
    (row,) = decoded.batches[0][1].to_pylist()
    columns = [sc.COL_OUTPUT_MESSAGES, sc.COL_ATTRIBUTES]
    if not isinstance(attrs.get(sc.GEN_AI_INPUT_MESSAGES), str):  # a string one is stored as given
        columns.append(sc.COL_INPUT_MESSAGES)
    for column in columns:
        if row[column] is not None:
            json.loads(row[column])  # valid JSON text


def test_deep_json_is_a_permanent_error() -> None:
    for depth in (70, 5000, 200_000):
        with pytest.raises(PermanentError):
            otlp_wire.parse_json(b"[" * depth + b"]" * depth)
        with pytest.raises(PermanentError):
            otlp_wire.parse_json(b'{"resourceSpans":' + b"[" * depth + b"]" * depth + b"}")


@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "1e400"])
@pytest.mark.parametrize("where", ["span_kind", "status_code"])
def test_json_infinite_enum_is_a_permanent_error(value: str, where: str) -> None:
    field = f'"kind": {value}' if where == "span_kind" else f'"status": {{"code": {value}}}'
    body = ('{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"0102030405060708090a0b0c0d0e0f10",'
            f'"spanId":"0102030405060708",{field}}}]}}]}}]}}').encode()
    json.loads(body)  # valid JSON
    with pytest.raises(PermanentError):
        otlp_wire.parse_json(body)
