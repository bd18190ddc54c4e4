"""The proxy's fast OTLP encoding of token arrays is byte-for-byte the stock encoding."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from tracetrain.collector.proxy_export import FastArrayOTLPSpanExporter, array_key_value_bytes, encode_spans_fast

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
FLOATS = st.floats(allow_nan=True, allow_infinity=True)


class _Keep(SpanExporter):
    def __init__(self) -> None:
        self.spans = []

    def export(self, spans):
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


def _ended_span(attributes: dict):
    keep = _Keep()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(keep))
    provider.get_tracer("t").start_span("s", attributes=attributes).end()
    return keep.spans


def _attributes(request) -> dict[str, bytes]:
    [span] = [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
    return {kv.key: kv.value.SerializeToString() for kv in span.attributes}


@settings(max_examples=60, deadline=None)
@given(ints=st.lists(INT64, min_size=16, max_size=1200), floats=st.lists(FLOATS, min_size=16, max_size=300),
       small=st.lists(st.integers(0, 300), max_size=15))
def test_fast_encoding_equals_stock(ints, floats, small):
    spans = _ended_span({"ids": ints, "lp": floats, "few": small, "text": "x", "flags": [True] * 20})
    fast, stock = _attributes(encode_spans_fast(spans)), _attributes(encode_spans(spans))
    assert fast.keys() == stock.keys()
    for key in fast:
        if key == "lp" and any(math.isnan(f) for f in floats):  # NaN payload bits may differ; compare decoded
            continue
        assert fast[key] == stock[key], key


def test_attached_arrays_are_exported_as_attributes():
    exporter = FastArrayOTLPSpanExporter(endpoint="http://127.0.0.1:9", insecure=True)
    keep = _Keep()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(keep))
    span = provider.get_tracer("t").start_span("s", attributes={"a": 1})
    rest = exporter.attach_arrays(span.get_span_context(), {"ids": list(range(100)), "lp": [-0.5] * 20,
                                                           "short": [1, 2], "names": ["a"] * 20})
    assert rest == {"short": [1, 2], "names": ["a"] * 20}
    span.set_attributes(rest)
    span.end()
    fast = _attributes(exporter._translate_data(keep.spans))
    reference = _attributes(encode_spans(_ended_span({"a": 1, "ids": list(range(100)), "lp": [-0.5] * 20,
                                                      "short": [1, 2], "names": ["a"] * 20})))
    assert fast == reference
    assert exporter._translate_data(keep.spans) is not None and not exporter._attached  # consumed once


def test_unencodable_arrays_fall_back():
    assert array_key_value_bytes("k", [2**64] * 20) is None
    assert array_key_value_bytes("k", ["a"] * 20) is None
    assert array_key_value_bytes("k", [True] * 20) is None


def test_long_int_arrays_take_the_numpy_path():
    import random

    rng = random.Random(7)
    for ids in ([rng.randrange(150_000) for _ in range(5000)], [rng.randrange(-(2**63), 2**63) for _ in range(3000)],
                [0, 127, 128, 16383, 16384, 2**63 - 1, -1, -(2**63)] * 100):
        spans = _ended_span({"ids": ids})
        assert _attributes(encode_spans_fast(spans)) == _attributes(encode_spans(spans))
