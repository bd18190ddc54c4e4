"""Targeted bad input through ``otlp_wire`` parsing and ``span_rows.decode_request``.

A request that is not valid OTLP at all raises ``PermanentError`` (400 / INVALID_ARGUMENT).
A span that breaks the data model (bad ids, oversized values) is rejected on its own
with a clear message, and the rest of the request is kept (``partial_success``).
Nothing raises anything else.
"""

from __future__ import annotations

import json
import math

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from tracetrain.collector import otlp_wire
from tracetrain.collector.errors import PermanentError
from tracetrain.collector.otlp_wire import MAX_ANYVALUE_DEPTH
from tracetrain.collector.span_rows import decode_request
from tracetrain.instrumentation import semconv as sc

TRACE_ID = bytes(range(1, 17))
LIMIT = 1 << 20


def make_span(span_id: bytes, name: str = "good", trace_id: bytes = TRACE_ID, parent: bytes = b"",
              attrs: list[common_pb2.KeyValue] | None = None, **fields) -> trace_pb2.Span:
    return trace_pb2.Span(trace_id=trace_id, span_id=span_id, parent_span_id=parent, name=name,
                          start_time_unix_nano=10, end_time_unix_nano=20, attributes=attrs or [], **fields)


def make_request(*spans: trace_pb2.Span, service: str = "svc") -> trace_service_pb2.ExportTraceServiceRequest:
    request = trace_service_pb2.ExportTraceServiceRequest()
    rs = request.resource_spans.add()
    rs.resource.attributes.add(key=sc.SERVICE_NAME).value.string_value = service
    rs.scope_spans.add().spans.extend(spans)
    return request


def decode(body: bytes, max_value_bytes: int = LIMIT, parse=otlp_wire.parse_protobuf):
    return decode_request(parse(body), received_ns=1, max_value_bytes=max_value_bytes)


def stored(decoded) -> dict[str, dict]:
    return {row["span_id"]: row for _, batch in decoded.batches for row in batch.to_pylist()}


def sid(n: int) -> bytes:
    return n.to_bytes(8, "big")


def kv(key: str, **value) -> common_pb2.KeyValue:
    return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(**value))


def int_array(values: list[int]) -> common_pb2.AnyValue:
    return common_pb2.AnyValue(array_value=common_pb2.ArrayValue(
        values=[common_pb2.AnyValue(int_value=v) for v in values]))


# ---------------------------------------------------------------- ids


BAD_ID_SPANS = [
    pytest.param(dict(trace_id=TRACE_ID[:15]), "trace_id", "15 bytes", id="trace-id-15-bytes"),
    pytest.param(dict(trace_id=bytes(16)), "trace_id", "non-zero", id="trace-id-all-zero"),
    pytest.param(dict(trace_id=b""), "trace_id", "0 bytes", id="trace-id-missing"),
    pytest.param(dict(trace_id=TRACE_ID + b"\x01"), "trace_id", "17 bytes", id="trace-id-17-bytes"),
    pytest.param(dict(span_id=b"\x01" * 7), "span_id", "7 bytes", id="span-id-7-bytes"),
    pytest.param(dict(span_id=bytes(8)), "span_id", "non-zero", id="span-id-all-zero"),
    pytest.param(dict(span_id=b""), "span_id", "0 bytes", id="span-id-missing"),
    pytest.param(dict(parent=b"\x01\x02\x03"), "parent_span_id", "3 bytes", id="parent-3-bytes"),
    pytest.param(dict(parent=b"\x01" * 16), "parent_span_id", "16 bytes", id="parent-16-bytes"),
]


@pytest.mark.parametrize(("overrides", "field", "detail"), BAD_ID_SPANS)
def test_bad_ids_reject_only_that_span(overrides: dict, field: str, detail: str) -> None:
    bad = make_span(**{"span_id": sid(99), "name": "the-bad-one", **overrides})
    request = make_request(make_span(sid(1)), bad, make_span(sid(2), parent=sid(1)))
    decoded = decode(request.SerializeToString())
    assert decoded.spans_total == 3
    assert decoded.spans_rejected == 1
    assert decoded.rows == 2
    assert set(stored(decoded)) == {sid(1).hex(), sid(2).hex()}
    (message,) = decoded.rejection_messages
    assert field in message and detail in message and "the-bad-one" in message


def test_bad_ids_in_json_reject_only_that_span() -> None:
    good = {"traceId": TRACE_ID.hex(), "spanId": sid(1).hex(), "name": "good"}
    bad = [
        {"traceId": TRACE_ID.hex()[:30], "spanId": sid(2).hex(), "name": "short-trace"},  # 15 bytes
        {"traceId": "00" * 16, "spanId": sid(3).hex(), "name": "zero-trace"},
        {"traceId": TRACE_ID.hex(), "spanId": sid(4).hex()[:14], "name": "short-span"},  # 7 bytes
        {"traceId": TRACE_ID.hex(), "spanId": sid(5).hex(), "parentSpanId": "010203", "name": "short-parent"},
    ]
    body = json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [good, *bad]}]}]}).encode()
    decoded = decode(body, parse=otlp_wire.parse_json)
    assert (decoded.spans_total, decoded.spans_rejected, decoded.rows) == (5, 4, 1)
    assert set(stored(decoded)) == {sid(1).hex()}
    joined = " | ".join(decoded.rejection_messages)
    for name in ("short-trace", "zero-trace", "short-span", "short-parent"):
        assert name in joined


def test_rejection_messages_are_bounded_but_counted() -> None:
    bad = [make_span(b"\x01" * 7, name=f"bad-{i}") for i in range(50)]
    decoded = decode(make_request(make_span(sid(1)), *bad).SerializeToString())
    assert decoded.spans_rejected == 50 and decoded.rows == 1
    assert len(decoded.rejection_messages) == 5


def test_a_request_of_only_bad_spans_stores_nothing() -> None:
    decoded = decode(make_request(make_span(bytes(8)), make_span(sid(1), trace_id=bytes(16))).SerializeToString())
    assert (decoded.spans_total, decoded.spans_rejected, decoded.rows, decoded.batches) == (2, 2, 0, [])


# ---------------------------------------------------------------- invalid UTF-8

MARK = "QQQQ"


def _with_invalid_utf8(request: trace_service_pb2.ExportTraceServiceRequest) -> bytes:
    body = request.SerializeToString()
    assert body.count(MARK.encode()) == 1
    return body.replace(MARK.encode(), b"\xff\xfe\xc3\x28")  # same length: framing stays valid


@pytest.mark.parametrize("where", ["span-name", "attribute-key", "attribute-value", "resource-attribute",
                                   "event-name", "status-message", "kvlist-value", "scope-name"])
def test_invalid_utf8_in_a_string_field_is_a_permanent_error(where: str) -> None:
    span = make_span(sid(1))
    request = make_request(span)
    target = request.resource_spans[0].scope_spans[0].spans[0]
    if where == "span-name":
        target.name = MARK
    elif where == "attribute-key":
        target.attributes.add(key=MARK).value.int_value = 1
    elif where == "attribute-value":
        target.attributes.add(key="k").value.string_value = MARK
    elif where == "resource-attribute":
        request.resource_spans[0].resource.attributes.add(key="r").value.string_value = MARK
    elif where == "event-name":
        target.events.add(name=MARK)
    elif where == "status-message":
        target.status.message = MARK
    elif where == "kvlist-value":
        target.attributes.add(key="k").value.kvlist_value.values.add(key="x").value.string_value = MARK
    else:
        request.resource_spans[0].scope_spans[0].scope.name = MARK
    with pytest.raises(PermanentError, match="malformed OTLP protobuf"):
        otlp_wire.parse_protobuf(_with_invalid_utf8(request))


def test_invalid_utf8_inside_an_array_value_becomes_null_not_garbage() -> None:
    """Arrays are parsed lazily (shadow schema): a bad string inside one nulls that attribute only."""
    array = common_pb2.AnyValue(array_value=common_pb2.ArrayValue(values=[
        common_pb2.AnyValue(string_value=MARK), common_pb2.AnyValue(int_value=1)]))
    request = make_request(make_span(sid(1), attrs=[common_pb2.KeyValue(key="arr", value=array),
                                                    kv("ok", string_value="fine")]))
    decoded = decode(_with_invalid_utf8(request))
    assert decoded.rows == 1 and decoded.spans_rejected == 0
    assert json.loads(stored(decoded)[sid(1).hex()]["attributes"]) == {"arr": None, "ok": "fine"}


def test_json_that_is_not_utf8_is_a_permanent_error() -> None:
    with pytest.raises(PermanentError, match="UTF-8"):
        otlp_wire.parse_json(b'{"resourceSpans": [], "x": "\xff"}')


def test_json_lone_surrogate_is_a_permanent_error() -> None:
    body = json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [
        {"traceId": TRACE_ID.hex(), "spanId": sid(1).hex(), "name": "\ud800"}]}]}]}).encode()
    with pytest.raises(PermanentError):
        otlp_wire.parse_json(body)


# ---------------------------------------------------------------- value size


def test_oversized_string_value_rejects_that_span_only() -> None:
    request = make_request(
        make_span(sid(1), attrs=[kv("small", string_value="x" * 100)]),
        make_span(sid(2), name="big", attrs=[kv("prompt", string_value="x" * 101)]),
        make_span(sid(3), attrs=[kv("exact", string_value="y" * 100)]),
    )
    decoded = decode(request.SerializeToString(), max_value_bytes=100)
    assert (decoded.spans_rejected, decoded.rows) == (1, 2)
    assert set(stored(decoded)) == {sid(1).hex(), sid(3).hex()}
    (message,) = decoded.rejection_messages
    assert "'prompt'" in message and "101" in message and "100-byte limit" in message and "'big'" in message


def test_oversized_array_value_rejects_that_span_only() -> None:
    big = int_array(list(range(1000)))  # > 1000 bytes on the wire
    request = make_request(
        make_span(sid(1), attrs=[common_pb2.KeyValue(key=sc.OUTPUT_TOKEN_IDS, value=int_array([1, 2]))]),
        make_span(sid(2), attrs=[common_pb2.KeyValue(key=sc.OUTPUT_TOKEN_IDS, value=big)]),
        make_span(sid(3), attrs=[common_pb2.KeyValue(key="plain.array", value=big)]),
    )
    decoded = decode(request.SerializeToString(), max_value_bytes=1000)
    assert (decoded.spans_rejected, decoded.rows) == (2, 1)
    rows = stored(decoded)
    assert rows[sid(1).hex()][sc.COL_RESPONSE_TOKEN_IDS] == [1, 2]
    assert all("over the 1000-byte limit" in m for m in decoded.rejection_messages)


def test_value_limit_counts_utf8_bytes() -> None:
    """The limit is in UTF-8 bytes, not code points: 60 U+1F600 are 240 bytes, 25 are exactly 100."""
    request = make_request(make_span(sid(1), name="emoji", attrs=[kv("emoji", string_value="\U0001F600" * 60)]),
                           make_span(sid(2), attrs=[kv("emoji", string_value="\U0001F600" * 25)]))
    decoded = decode(request.SerializeToString(), max_value_bytes=100)
    assert (decoded.spans_rejected, decoded.rows) == (1, 1)
    assert set(stored(decoded)) == {sid(2).hex()}
    (message,) = decoded.rejection_messages
    assert "'emoji'" in message and "240 bytes" in message and "100-byte limit" in message


@pytest.mark.parametrize("value", [
    pytest.param(common_pb2.AnyValue(bytes_value=b"z" * 1000), id="bytes_value"),
    pytest.param(common_pb2.AnyValue(kvlist_value=common_pb2.KeyValueList(
        values=[kv("inner", string_value="z" * 1000)])), id="kvlist_value"),
])
def test_value_limit_applies_to_every_value_kind(value: common_pb2.AnyValue) -> None:
    request = make_request(make_span(sid(1), name="big-one", attrs=[common_pb2.KeyValue(key="big", value=value)]),
                           make_span(sid(2)))
    decoded = decode(request.SerializeToString(), max_value_bytes=100)
    assert (decoded.spans_rejected, decoded.rows) == (1, 1)
    assert set(stored(decoded)) == {sid(2).hex()}
    (message,) = decoded.rejection_messages
    assert "'big'" in message and "100-byte limit" in message and "'big-one'" in message
    # the same value under the limit is stored
    assert decode(request.SerializeToString(), max_value_bytes=2000).rows == 2


@pytest.mark.parametrize("where", ["event", "link"])
def test_value_limit_applies_to_events_and_links(where: str) -> None:
    big = make_span(sid(1), name="big-one")
    if where == "event":
        big.events.add(name="e").attributes.append(kv("payload", string_value="z" * 1000))
    else:
        big.links.add(trace_id=TRACE_ID, span_id=sid(9)).attributes.append(kv("payload", string_value="z" * 1000))
    small = make_span(sid(2))
    small.events.add(name="e").attributes.append(kv("payload", string_value="z" * 10))
    small.links.add(trace_id=TRACE_ID, span_id=sid(9))
    request = make_request(big, small)
    decoded = decode(request.SerializeToString(), max_value_bytes=100)
    assert (decoded.spans_rejected, decoded.rows) == (1, 1)
    assert set(stored(decoded)) == {sid(2).hex()}
    (message,) = decoded.rejection_messages
    assert where in message and "100-byte limit" in message and "'big-one'" in message
    assert decode(request.SerializeToString(), max_value_bytes=2000).rows == 2


# ---------------------------------------------------------------- nesting


# Built in place, top down: protobuf refuses to copy or merge messages this deep.
def nest_kvlist(value: common_pb2.AnyValue, levels: int) -> None:
    for _ in range(levels):
        value = value.kvlist_value.values.add(key="l").value
    value.string_value = "leaf"


def nest_array(value: common_pb2.AnyValue, levels: int) -> None:
    for _ in range(levels):
        value = value.array_value.values.add()
    value.int_value = 7


def span_with_deep_attribute(nest, levels: int) -> bytes:
    request = make_request(make_span(sid(1)))
    span = request.resource_spans[0].scope_spans[0].spans[0]
    nest(span.attributes.add(key="deep").value, levels)
    span.attributes.add(key="ok").value.int_value = 1
    return request.SerializeToString()


def _depth_of(value: object, leaf: object) -> int | str:
    depth = 0
    while isinstance(value, (dict, list)):
        value = value["l"] if isinstance(value, dict) else value[0]
        depth += 1
    return depth if value == leaf else value


@pytest.mark.parametrize("levels", [10, 30, 32, 40, 200, 2000])
def test_deeply_nested_kvlist_is_refused_or_stored_with_placeholder(levels: int) -> None:
    body = span_with_deep_attribute(nest_kvlist, levels)
    try:
        decoded = decode(body)
    except PermanentError as exc:
        assert levels > MAX_ANYVALUE_DEPTH - 5, "a shallow kvlist must be stored"
        assert "malformed" in str(exc)
        return
    (row,) = stored(decoded).values()
    deep = json.loads(row["attributes"])["deep"]
    depth = _depth_of(deep, "leaf")
    if levels <= MAX_ANYVALUE_DEPTH:
        assert depth == levels  # stored exactly
    else:
        assert depth == "<nested too deep>"


@pytest.mark.parametrize("levels", [5, 31, 40, 200, 2000])
def test_deeply_nested_array_is_null_or_placeholder_never_a_crash(levels: int) -> None:
    decoded = decode(span_with_deep_attribute(nest_array, levels))
    (row,) = stored(decoded).values()
    attrs = json.loads(row["attributes"])
    assert attrs["ok"] == 1
    if levels <= MAX_ANYVALUE_DEPTH:
        assert _depth_of(attrs["deep"], 7) == levels
    else:  # too deep for the placeholder, or for protobuf's own recursion limit (then null)
        assert attrs["deep"] is None or "<nested too deep>" in json.dumps(attrs["deep"])


@pytest.mark.parametrize("levels", [20, 200, 5000])
def test_deeply_nested_kvlist_in_json_is_a_permanent_error(levels: int) -> None:
    value = '{"kvlistValue": {"values": [{"key": "l", "value": ' * levels + '{"stringValue": "leaf"}' + "}]}}" * levels
    span = (f'{{"traceId": "{TRACE_ID.hex()}", "spanId": "{sid(1).hex()}", '
            f'"attributes": [{{"key": "deep", "value": {value}}}]}}')
    body = f'{{"resourceSpans": [{{"scopeSpans": [{{"spans": [{span}]}}]}}]}}'.encode()
    if levels < 100:
        json.loads(body)  # well-formed, just deep
    with pytest.raises(PermanentError, match="nesting|deep"):
        otlp_wire.parse_json(body)


# ---------------------------------------------------------------- OTLP/JSON shape


def _json_span(**fields) -> bytes:
    span = {"traceId": TRACE_ID.hex(), "spanId": sid(1).hex(), **fields}
    return json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [span]}]}]}).encode()


@pytest.mark.parametrize("fields", [
    pytest.param({"traceId": "z" * 32}, id="trace-id-not-hex"),
    pytest.param({"traceId": "0102030405060708090a0b0c0d0e0f1"}, id="trace-id-odd-length"),
    pytest.param({"traceId": "AQIDBAUGBwgJCgsMDQ4PEA=="}, id="trace-id-base64"),
    pytest.param({"traceId": 1234}, id="trace-id-number"),
    pytest.param({"traceId": ["01"]}, id="trace-id-list"),
    pytest.param({"spanId": "xyz"}, id="span-id-not-hex"),
    pytest.param({"parentSpanId": "0g" * 8}, id="parent-not-hex"),
    pytest.param({"links": [{"traceId": TRACE_ID.hex(), "spanId": "nothex!!"}]}, id="link-span-id-not-hex"),
    pytest.param({"startTimeUnixNano": "soon"}, id="time-not-a-number"),
    pytest.param({"startTimeUnixNano": -1}, id="time-negative"),
    pytest.param({"attributes": [{"key": "k", "value": {"intValue": "12x"}}]}, id="int-value-not-int"),
    pytest.param({"attributes": [{"key": "k", "value": {"intValue": "9223372036854775808"}}]}, id="int-over-int64"),
    pytest.param({"attributes": [{"key": "k", "value": {"doubleValue": "lots"}}]}, id="double-not-a-number"),
    pytest.param({"attributes": "k=v"}, id="attributes-not-a-list"),
])
def test_malformed_otlp_json_is_a_permanent_error(fields: dict) -> None:
    with pytest.raises(PermanentError) as excinfo:
        otlp_wire.parse_json(_json_span(**fields))
    assert str(excinfo.value)


@pytest.mark.parametrize("body", [
    b"", b"null", b"[]", b"42", b'"resourceSpans"', b"{", b'{"resourceSpans": [}', b"\xef\xbb\xbf{}",
    b'{"resourceSpans": {"scopeSpans": []}}', b'{"resourceSpans": [1]}', b'{"resourceSpans": [{"scopeSpans": 3}]}',
    b'{"resourceSpans": [{"scopeSpans": [{"spans": [null]}]}]}',
])
def test_json_not_an_otlp_request_is_a_permanent_error(body: bytes) -> None:
    with pytest.raises(PermanentError):
        otlp_wire.parse_json(body)


def test_json_empty_object_and_unknown_fields_are_an_empty_request() -> None:
    for body in (b"{}", b'{"resourceSpans": []}', b'{"somethingElse": {"a": 1}}'):
        assert decode(body, parse=otlp_wire.parse_json).spans_total == 0


# ---------------------------------------------------------------- values that break typed columns or normalize
# Each case is one bad span next to a good one. decode_request must not raise: the bad span
# may be rejected (partial_success) or stored with the odd value dropped, but the good span stays.

GOOD = make_span(sid(1), name="good")


def _array_attr(key: str, raw_array: bytes) -> bytes:
    """A request whose span carries ``key`` with exactly these (shadow) array bytes."""
    shadow = otlp_wire.ShadowExportTraceServiceRequest()
    rs = shadow.resource_spans.add()
    spans = rs.scope_spans.add().spans
    spans.add().CopyFrom(otlp_wire.parse_protobuf(make_request(GOOD).SerializeToString())
                         .resource_spans[0].scope_spans[0].spans[0])
    odd = spans.add(trace_id=TRACE_ID, span_id=sid(2), name="odd")
    odd.attributes.add(key=key).value.array_value = raw_array
    return shadow.SerializeToString()


def _odd(**fields) -> bytes:
    """GOOD next to one span named 'odd' (span id 2) built from ``fields``."""
    return make_request(GOOD, make_span(sid(2), name="odd", **fields)).SerializeToString()


def _rejected(detail: str) -> dict:
    return {"rejected": detail}


# (body, what becomes of the odd span): {"rejected": words of the message} or {column: stored value}.
ODD_VALUES = [
    # Enums outside the spec's range: the span is rejected (partial_success), not the request.
    pytest.param(_odd(kind=200), _rejected("kind 200 is not a SpanKind"), id="span-kind-200"),
    pytest.param(_odd(kind=6), _rejected("kind 6 is not a SpanKind"), id="span-kind-6"),
    pytest.param(_odd(kind=-1), _rejected("kind -1 is not a SpanKind"), id="span-kind--1"),
    pytest.param(_odd(kind=99, status=trace_pb2.Status(code=-5)), _rejected("kind 99"), id="kind-99-status--5"),
    pytest.param(_odd(status=trace_pb2.Status(code=1000)), _rejected("status code 1000 is not a StatusCode"),
                 id="status-code-1000"),
    pytest.param(_odd(status=trace_pb2.Status(code=3)), _rejected("status code 3"), id="status-code-3"),
    pytest.param(_odd(status=trace_pb2.Status(code=-5)), _rejected("status code -5"), id="status-code--5"),
    pytest.param(_odd(kind=5, status=trace_pb2.Status(code=2)), {sc.COL_KIND: 5, sc.COL_STATUS_CODE: 2},
                 id="kind-5-status-2-stored"),  # control: the largest valid values
    # Typed int columns: a value outside int64 leaves the column null (the attribute keeps it).
    pytest.param(_odd(attrs=[kv(sc.GEN_AI_USAGE_INPUT_TOKENS, string_value="100000000000000000000")]),
                 {sc.COL_INPUT_TOKENS: None}, id="input-tokens-string-over-int64"),
    pytest.param(_odd(attrs=[kv(sc.GEN_AI_USAGE_INPUT_TOKENS, string_value="9223372036854775807")]),
                 {sc.COL_INPUT_TOKENS: 2**63 - 1}, id="input-tokens-string-int64-max"),
    pytest.param(_odd(attrs=[kv(sc.POLICY_VERSION, double_value=1e20)]), {sc.COL_POLICY_VERSION: None},
                 id="policy-version-double-1e20"),
    pytest.param(_odd(attrs=[kv(sc.POLICY_VERSION, double_value=-(2.0**63))]), {sc.COL_POLICY_VERSION: -(2**63)},
                 id="policy-version-double-int64-min"),
    # Array bytes the vectorized decoders cannot take: null or widened, never a crash.
    pytest.param(_array_attr(sc.OUTPUT_TOKEN_IDS, b"\x80"), {sc.COL_RESPONSE_TOKEN_IDS: None},
                 id="token-ids-array-bytes-0x80"),
    pytest.param(_array_attr(sc.OUTPUT_TOKEN_IDS, b"\xff\xff\xff"), {sc.COL_RESPONSE_TOKEN_IDS: None},
                 id="token-ids-array-bytes-0xff"),
    pytest.param(_odd(attrs=[common_pb2.KeyValue(key=sc.OUTPUT_LOGPROBS, value=int_array([2**53 + 1]))]),
                 {sc.COL_RESPONSE_LOGPROBS: [float(2**53 + 1)]}, id="logprobs-int-2**53+1"),
    pytest.param(_odd(attrs=[common_pb2.KeyValue(key=sc.OUTPUT_LOGPROBS, value=int_array([2**63 - 1, -3]))]),
                 {sc.COL_RESPONSE_LOGPROBS: [float(2**63 - 1), -3.0]}, id="logprobs-int64-max"),
    pytest.param(_odd(attrs=[common_pb2.KeyValue(key=sc.OUTPUT_LOGPROBS, value=common_pb2.AnyValue(
                     array_value=common_pb2.ArrayValue(values=[common_pb2.AnyValue(double_value=-math.inf),
                                                               common_pb2.AnyValue(int_value=1),
                                                               common_pb2.AnyValue(double_value=math.inf)])))]),
                 {sc.COL_RESPONSE_LOGPROBS: [-math.inf, 1.0, math.inf]},
                 id="logprobs-non-finite-on-the-slow-path"),  # ints and doubles mixed: not the fast path
    # Other conventions' keys that look like indexes but are not ints.
    pytest.param(_odd(attrs=[kv("gen_ai.prompt.0.role", string_value="user"),
                             kv("gen_ai.prompt.\u00b2.content", string_value="hi")]),
                 {}, id="traceloop-index-superscript-two"),  # '²'.isdigit() but not int()
    pytest.param(_odd(attrs=[kv(sc.OPENINFERENCE_SPAN_KIND, string_value="LLM"),
                             kv("llm.input_messages." + "7" * 5000 + ".message.role", string_value="user")]),
                 {}, id="openinference-index-5000-digits"),  # over int()'s digit limit
    # Odd but harmless values.
    pytest.param(_odd(attrs=[
        kv(sc.GEN_AI_USAGE_INPUT_TOKENS, string_value="1e30"), kv(sc.GEN_AI_USAGE_OUTPUT_TOKENS, double_value=1.5),
        kv(sc.REWARD, string_value="not a number"), kv(sc.POLICY_VERSION, int_value=-(2**63))]),
                 {sc.COL_INPUT_TOKENS: None, sc.COL_OUTPUT_TOKENS: None, sc.COL_REWARD: None,
                  sc.COL_POLICY_VERSION: -(2**63)}, id="typed-values-unparseable"),
    pytest.param(_array_attr(sc.OUTPUT_TOKEN_IDS, b"\x0a\x02\x18"), {sc.COL_RESPONSE_TOKEN_IDS: None},
                 id="token-ids-truncated"),
    pytest.param(_array_attr(sc.OUTPUT_LOGPROBS, b"\x0a\x09\x21\x00"), {sc.COL_RESPONSE_LOGPROBS: None},
                 id="logprobs-truncated"),
]


@pytest.mark.parametrize(("body", "expect"), ODD_VALUES)
def test_odd_values_never_fail_the_whole_request(body: bytes, expect: dict) -> None:
    decoded = decode(body)
    rows = stored(decoded)
    assert decoded.spans_total == 2
    assert sid(1).hex() in rows and rows[sid(1).hex()]["name"] == "good"
    if "rejected" in expect:
        assert (decoded.rows, decoded.spans_rejected) == (1, 1)
        (message,) = decoded.rejection_messages
        assert expect["rejected"] in message and "'odd'" in message, message
    else:
        assert (decoded.rows, decoded.spans_rejected) == (2, 0), decoded.rejection_messages
        odd = rows[sid(2).hex()]
        for column, value in expect.items():
            assert odd[column] == value, (column, odd[column])
