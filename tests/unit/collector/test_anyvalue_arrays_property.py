"""Property tests: the vectorized ArrayValue decoders agree with the protobuf library.

``anyvalue_arrays`` decodes token-id and logprob arrays straight from the wire bytes
with NumPy and falls back to a slow, general decoder for anything else. Whatever the
input, a row must come out either exactly as ``common_pb2.ArrayValue`` decodes it, or
null (never a wrong number, never an exception).

The slow decoder passed in is ``numbers_from_array_bytes``, the one ``span_rows`` uses for
these columns, so NaN and infinities come out as numbers on either path.
"""

from __future__ import annotations

import math
import os
import struct

import pyarrow as pa
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.common.v1 import common_pb2

from tracetrain.collector.anyvalue_arrays import decode_double_arrays, decode_int_arrays, numbers_from_array_bytes

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# TRACETRAIN_HYPOTHESIS_SCALE=20 runs 20x the examples (a deeper, slower search).
SCALE = int(os.environ.get("TRACETRAIN_HYPOTHESIS_SCALE", "1"))
SETTINGS = settings(max_examples=100 * SCALE, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
FEWER = settings(SETTINGS, max_examples=50 * SCALE)  # for the costlier recursive strategies

int64s = st.one_of(
    st.integers(INT64_MIN, INT64_MAX),
    st.sampled_from([0, 1, -1, 127, 128, 16383, 16384, INT64_MIN, INT64_MAX, 2**31, -(2**31), 2**53 + 1]),
)
doubles = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, math.inf, -math.inf, math.nan, 5e-324, -1.7976931348623157e308]),
)


# ---------------------------------------------------------------- helpers


def _anyvalue(value: object) -> common_pb2.AnyValue:
    v = common_pb2.AnyValue()
    if value is None:
        pass  # an AnyValue with no value set
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
        v.array_value.values.extend(_anyvalue(x) for x in value)
    elif isinstance(value, dict):
        v.kvlist_value.SetInParent()
        for key, item in value.items():
            v.kvlist_value.values.add(key=key).value.CopyFrom(_anyvalue(item))
    else:  # pragma: no cover - strategy bug
        raise TypeError(value)
    return v


def encode_array(values: list) -> bytes:
    """Real protobuf bytes of an ArrayValue holding ``values``."""
    return common_pb2.ArrayValue(values=[_anyvalue(x) for x in values]).SerializeToString()


def protobuf_values(raw: bytes) -> list | None:
    """Decode with the protobuf library: a list of (kind, value) pairs, or None if malformed."""
    try:
        array = common_pb2.ArrayValue.FromString(raw)
    except DecodeError:
        return None
    return [(v.WhichOneof("value"), getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None)
            for v in array.values]


def same_double(a: float, b: float) -> bool:
    """Bit-level float equality, except that every NaN equals every NaN."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


def same_double_list(got: list[float], want: list[float]) -> bool:
    return len(got) == len(want) and all(same_double(g, w) for g, w in zip(got, want))


def decode_ints(rows: list[bytes | None]) -> list:
    result = decode_int_arrays(rows, numbers_from_array_bytes)
    assert result.type == pa.list_(pa.int64())
    assert len(result) == len(rows)
    return result.to_pylist()


def decode_doubles(rows: list[bytes | None]) -> list:
    result = decode_double_arrays(rows, numbers_from_array_bytes)
    assert result.type == pa.list_(pa.float64())
    assert len(result) == len(rows)
    return result.to_pylist()


def expected_int_row(raw: bytes | None) -> list[int] | None:
    """What the int decoder must return for ``raw``: protobuf's ints, or null if not all ints."""
    if raw is None:
        return None
    decoded = protobuf_values(raw)
    if decoded is None or any(kind != "int_value" for kind, _ in decoded):
        return None
    return [value for _, value in decoded]


# ---------------------------------------------------------------- int arrays

int_rows = st.lists(st.one_of(st.none(), st.lists(int64s, max_size=40)), max_size=12)


@SETTINGS
@given(int_rows)
@example([])
@example([None])
@example([[]])
@example([[], None, [0], [INT64_MIN, INT64_MAX, -1, 0, 1]])
def test_int_arrays_match_protobuf(rows: list[list[int] | None]) -> None:
    raws = [None if r is None else encode_array(r) for r in rows]
    for raw, want in zip(raws, rows):
        if raw is not None:  # the encoding really is what protobuf reads back
            assert [v for _, v in protobuf_values(raw)] == want
    assert decode_ints(raws) == rows


@SETTINGS
@given(st.lists(st.lists(int64s, max_size=30), min_size=1, max_size=8), st.data())
def test_int_arrays_with_a_non_int_row_fall_back_per_row(rows: list[list[int]], data: st.DataObject) -> None:
    """One row that is not all ints sends the batch to the slow path; the int rows stay exact."""
    bad_index = data.draw(st.integers(0, len(rows)))
    bad = data.draw(st.lists(st.one_of(st.text(max_size=5), st.booleans(), doubles), min_size=1, max_size=5)
                    .map(lambda xs: xs + [1.5]))  # at least one double: surely not an int array
    raws = [encode_array(r) for r in rows]
    raws.insert(bad_index, encode_array(bad))
    want: list = list(rows)
    want.insert(bad_index, None)
    assert decode_ints(raws) == want


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(bytes([0x0A, 0x03, 0x18, 0x85, 0x00]), id="padded-varint"),  # 5, non-canonical
        pytest.param(bytes([0x0A, 0x0B, 0x18] + [0xFF] * 9 + [0x7F]), id="10-byte-varint-high-last-byte"),
        pytest.param(bytes([0x0A, 0x0C, 0x18] + [0xFF] * 10 + [0x01]), id="11-byte-varint"),
        pytest.param(bytes([0x0A, 0x04, 0x18, 0x01, 0x18, 0x02]), id="int-value-twice-last-wins"),
        pytest.param(bytes([0x0A, 0x06, 0x18, 0x01, 0x18, 0x02, 0x18, 0x03]), id="8-low-bytes-one-element"),
        pytest.param(bytes([0x0A, 0x02, 0x18, 0x05, 0x0A, 0x00]), id="int-then-empty-anyvalue"),
        pytest.param(bytes([0x0A, 0x02, 0x18, 0x05, 0x0A, 0x02, 0x18]), id="truncated"),
        pytest.param(bytes([0x0A, 0x02, 0x20, 0x01]), id="bool-element"),
        pytest.param(bytes([0x12, 0x02, 0x18, 0x01]), id="unknown-field-2"),
        pytest.param(bytes([0x0A, 0x02, 0x18, 0x05]) * 3 + bytes([0x0A, 0x03, 0x18, 0x80, 0x01]), id="ints-then-128"),
        pytest.param(b"\x0a\x02\x18" + _varint(-1)[:1], id="garbage"),
    ],
)
def test_int_arrays_unusual_encodings_match_protobuf(raw: bytes) -> None:
    want = expected_int_row(raw)
    assert decode_ints([raw]) == [want]
    # and the same row among plain rows (fast path for the others is still exact)
    plain = encode_array([1, 2, 300])
    assert decode_ints([plain, raw, None, plain]) == [[1, 2, 300], want, None, [1, 2, 300]]


def _mutate(raw: bytes, data: st.DataObject) -> bytes:
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if op in ("flip", "set", "delete") and not buf:
            continue
        if op == "flip":
            i = data.draw(st.integers(0, len(buf) - 1))
            buf[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set":
            buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
        elif op == "insert":
            buf.insert(data.draw(st.integers(0, len(buf))), data.draw(st.integers(0, 255)))
        elif op == "delete":
            del buf[data.draw(st.integers(0, len(buf) - 1))]
        else:
            del buf[data.draw(st.integers(0, len(buf))):]
    return bytes(buf)


@SETTINGS
@given(st.lists(st.lists(int64s, max_size=10), min_size=1, max_size=5), st.data())
def test_int_arrays_mutated_bytes_exact_or_null(rows: list[list[int]], data: st.DataObject) -> None:
    raws: list[bytes | None] = [encode_array(r) for r in rows]
    i = data.draw(st.integers(0, len(raws) - 1))
    raws[i] = _mutate(raws[i], data)
    assert decode_ints(raws) == [expected_int_row(r) for r in raws]


@SETTINGS
@given(st.lists(st.one_of(st.none(), st.binary(max_size=40)), max_size=6))
@example([b"\x80"])
@example([None, b"\xff" * 12, b""])
def test_int_arrays_arbitrary_bytes_exact_or_null(raws: list[bytes | None]) -> None:
    assert decode_ints(raws) == [expected_int_row(r) for r in raws]


@pytest.mark.parametrize("rows", [[b"\x80"], [b"", b"\xff\xff"], [None, b"\x90\x91", b""]])
def test_int_arrays_all_high_bytes_is_null_not_a_crash(rows: list[bytes | None]) -> None:
    """Non-empty bytes with no byte below 0x80 (no element can end there): null rows, no IndexError."""
    got = decode_ints(rows)
    assert got == [expected_int_row(r) for r in rows]
    assert got == [None if r is None else ([] if r == b"" else None) for r in rows]
    # next to a plain row, which stays exact
    assert decode_ints([encode_array([1, 300]), *rows]) == [[1, 300], *got]


# ---------------------------------------------------------------- double arrays

double_rows = st.lists(st.one_of(st.none(), st.lists(doubles, max_size=40)), max_size=12)


@SETTINGS
@given(double_rows)
@example([[0.0, -0.0, math.inf, -math.inf, math.nan, 5e-324]])
@example([None, [], None])
def test_double_arrays_match_protobuf(rows: list[list[float] | None]) -> None:
    raws = [None if r is None else encode_array(r) for r in rows]
    got = decode_doubles(raws)
    assert len(got) == len(rows)
    for g, want, raw in zip(got, rows, raws):
        if want is None:
            assert g is None
            continue
        pb = [v for _, v in protobuf_values(raw)]
        assert same_double_list(pb, want)  # the encoding round-trips through protobuf
        assert g is not None and same_double_list(g, want), (g, want)


def test_double_arrays_keep_signed_zero_and_nan_payloadless() -> None:
    raw = encode_array([-0.0, 0.0, math.nan, math.inf, -math.inf])
    (row,) = decode_doubles([raw])
    assert math.copysign(1.0, row[0]) == -1.0 and math.copysign(1.0, row[1]) == 1.0
    assert math.isnan(row[2]) and row[3] == math.inf and row[4] == -math.inf


def test_double_arrays_widen_int_rows_exactly() -> None:
    rows = [[1, -2, 0, 2**53], [0.5, 3, -7]]
    got = decode_doubles([encode_array(r) for r in rows])
    assert got == [[1.0, -2.0, 0.0, float(2**53)], [0.5, 3.0, -7.0]]


def test_double_element_with_exact_double_bytes_layout_but_other_field() -> None:
    # 12 bytes like a double element, but field 5 (0x29 is not a valid AnyValue double tag).
    raw = b"\x0a\x09\x29" + struct.pack("<d", 1.25)
    assert decode_doubles([raw, encode_array([2.5])]) == [None, [2.5]]


@pytest.mark.parametrize("value", [2**53 + 1, -(2**63) + 1, INT64_MAX, INT64_MIN])
def test_double_arrays_inexact_int_is_widened_not_a_crash(value: int) -> None:
    """An int no double represents exactly is rounded to the nearest double, as protobuf readers do."""
    got = decode_doubles([encode_array([value]), encode_array([0.5])])
    assert got == [[float(value)], [0.5]]
    got = decode_doubles([encode_array([1.5, value, -2])])
    assert got == [[1.5, float(value), -2.0]]


def expected_double_row(raw: bytes | None) -> list[float] | None:
    """What the double decoder must return for ``raw``: protobuf's numbers as doubles, or null."""
    if raw is None:
        return None
    decoded = protobuf_values(raw)
    if decoded is None or any(kind not in ("int_value", "double_value") for kind, _ in decoded):
        return None
    return [float(v) for _, v in decoded]  # ints widen (rounding); NaN and infinities kept


def assert_double_rows(got: list, raws: list[bytes | None]) -> None:
    for g, raw in zip(got, raws):
        want = expected_double_row(raw)
        if want is None:
            assert g is None, (g, raw)
        else:
            assert g is not None and same_double_list(g, want), (g, want, raw)


@SETTINGS
@given(st.lists(st.lists(doubles, max_size=8), min_size=1, max_size=5), st.data())
def test_double_arrays_mutated_bytes_exact_or_null(rows: list[list[float]], data: st.DataObject) -> None:
    raws: list[bytes | None] = [encode_array(r) for r in rows]
    i = data.draw(st.integers(0, len(raws) - 1))
    raws[i] = _mutate(raws[i], data)
    assert_double_rows(decode_doubles(raws), raws)


@SETTINGS
@given(st.lists(st.one_of(st.none(), st.binary(max_size=48)), max_size=6))
def test_double_arrays_arbitrary_bytes_exact_or_null(raws: list[bytes | None]) -> None:
    assert_double_rows(decode_doubles(raws), raws)


def test_double_arrays_non_finite_survive_the_slow_path() -> None:
    """A row's NaN/inf must not depend on whether its neighbours send the batch to the slow path."""
    with_inf = encode_array([-math.inf, 1.5, math.inf])
    assert decode_doubles([with_inf]) == [[-math.inf, 1.5, math.inf]]  # fast path
    # A neighbouring row of ints forces the slow path for the whole batch:
    assert decode_doubles([with_inf, encode_array([1])]) == [[-math.inf, 1.5, math.inf], [1.0]]
    # and so does a row mixing ints and doubles; NaN stays NaN
    (row,) = decode_doubles([encode_array([math.nan, 2, -math.inf])])
    assert math.isnan(row[0]) and row[1:] == [2.0, -math.inf]


def test_numbers_from_array_bytes_keeps_non_finite_and_refuses_non_numbers() -> None:
    got = numbers_from_array_bytes(encode_array([math.nan, -math.inf, 3, 0.5]))
    assert math.isnan(got[0]) and got[1:] == [-math.inf, 3, 0.5] and isinstance(got[2], int)
    assert numbers_from_array_bytes(encode_array([])) == []
    for values in ([1, "2"], [True], [1.0, None], [[1.0]], [{"a": 1}], [b"\x01"]):
        assert numbers_from_array_bytes(encode_array(values)) is None, values
    assert numbers_from_array_bytes(b"\x0a\x09\x21\x00") is None  # truncated


# ---------------------------------------------------------------- mixed and other arrays

leaf_values = st.one_of(
    st.none(), st.booleans(), int64s, doubles, st.text(max_size=6), st.binary(max_size=6))
any_values = st.recursive(
    leaf_values,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=4), children, max_size=3),
    ),
    max_leaves=12,
)
mixed_rows = st.lists(st.one_of(st.none(), st.lists(any_values, max_size=6)), max_size=8)


@FEWER
@given(mixed_rows)
@example([[1, "2"], [True, 1], [[1], 2], [1, 2.0], [{"a": 1}], [b"\x01"], [None, 1]])
def test_mixed_arrays_into_int_column_are_exact_or_null(rows: list[list | None]) -> None:
    raws = [None if r is None else encode_array(r) for r in rows]
    got = decode_ints(raws)
    for g, row, raw in zip(got, rows, raws):
        if row is not None and all(isinstance(x, int) and not isinstance(x, bool) for x in row):
            assert g == row  # all ints: must be decoded, exactly
        else:
            assert g is None, (g, row)  # anything else (bools included) is null, never a number
        assert g == expected_int_row(raw)


@FEWER
@given(mixed_rows)
@example([[1, 2.5], [True, 1.0], [[1.0]], ["1.0"], [1.0, None]])
@example([[2**53 + 1, math.nan], [-math.inf, 1], [INT64_MAX]])
def test_mixed_arrays_into_double_column_are_exact_or_null(rows: list[list | None]) -> None:
    raws = [None if r is None else encode_array(r) for r in rows]
    got = decode_doubles(raws)
    assert_double_rows(got, raws)
    for g, row in zip(got, rows):
        numeric = row is not None and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in row)
        if not numeric:
            assert g is None, (g, row)
        else:  # all numbers, NaN and infinities included: decoded, ints widened
            assert g is not None and same_double_list(g, [float(x) for x in row]), (g, row)
