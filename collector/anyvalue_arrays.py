"""Vectorized decoding of OTLP ``ArrayValue`` bytes into Arrow list columns.

Token ids and logprobs arrive as ``AnyValue{array_value: ArrayValue{values: [AnyValue{int_value}]}}``:
one nested message per token. Walking them as protobuf objects costs ~50 ns per
element in Python (~50 µs per LLM span), more than all other work on a span. So the
receiver keeps each array as its serialized bytes (see ``otlp_wire``) and this module
decodes all arrays of one request at once with NumPy, straight from the wire format:

* an int element is ``0a LEN 18 <varint>`` (field 1 = AnyValue, field 3 = int_value);
* a double element is ``0a 09 21 <8 bytes little-endian>`` (field 4 = double_value).

An array that is not exactly of that shape (strings, mixed types, unusual but legal
encodings) is decoded by the slow, general path instead, so the result is always
what the protobuf library would have produced.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
from google.protobuf.message import DecodeError
from opentelemetry.proto.common.v1 import common_pb2

_DOUBLE_ELEMENT = np.dtype([("tag", "u1"), ("length", "u1"), ("field", "u1"), ("value", "<f8")])
_TAG_ANYVALUE = 0x0A
_TAG_INT_VALUE = 0x18
_TAG_DOUBLE_VALUE = 0x21

SlowDecoder = Callable[[bytes], list | None]
"""Decodes one ArrayValue's bytes the general way; returns None if not all numbers."""


def decode_int_arrays(rows: Sequence[bytes | None], slow: SlowDecoder) -> pa.ListArray:
    """Decode serialized ArrayValues of ints into one ``list<int64>`` Arrow array.

    Args:
        rows: one serialized ``ArrayValue`` per row (``b""`` is an empty list, None null).
        slow: fallback for arrays that are not plain int arrays.

    Returns:
        A ListArray of len(rows) rows; a row whose array holds non-int values is null.
    """
    raws = [r or b"" for r in rows]
    buf = np.frombuffer(b"".join(raws), np.uint8)
    decoded = _vector_decode_ints(buf)
    if decoded is None:
        return _slow_lists(rows, slow, pa.int64())
    values, element_starts = decoded
    ends = np.cumsum(np.fromiter((len(r) for r in raws), np.int64, len(raws)))
    # An array's elements are those starting before its end; arrays hold whole elements
    # only if no element straddles a boundary, i.e. every boundary is an element start.
    counts_before_end = np.searchsorted(element_starts, ends, side="left")
    boundaries = ends[:-1][ends[:-1] < buf.size]
    if boundaries.size:
        at = np.minimum(np.searchsorted(element_starts, boundaries), element_starts.size - 1)
        if not np.array_equal(element_starts[at], boundaries):
            return _slow_lists(rows, slow, pa.int64())
    lengths = np.diff(counts_before_end, prepend=0)
    return _list_array(lengths, pa.array(values, pa.int64()), rows)


def _list_array(lengths: np.ndarray, values: pa.Array, rows: Sequence[bytes | None]) -> pa.ListArray:
    offsets = np.zeros(len(rows) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    mask = pa.array([r is None for r in rows], pa.bool_())
    return pa.ListArray.from_arrays(pa.array(offsets), values, mask=mask)


def _vector_decode_ints(buf: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(values, element start offsets) of concatenated int elements, or None if the layout is off."""
    if buf.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    # Every int element has exactly four bytes below 0x80: the 0x0a tag, its length, the
    # 0x18 tag and the varint's last byte; varint continuation bytes are >= 0x80.
    low = np.flatnonzero(buf < 0x80)
    if low.size == 0 or low.size % 4:
        return None
    quads = low.reshape(-1, 4)
    tag_pos, field_pos, last_pos = quads[:, 0], quads[:, 2], quads[:, 3]
    varint_len = last_pos - field_pos
    if not (
        tag_pos[0] == 0
        and last_pos[-1] == buf.size - 1
        and np.array_equal(tag_pos[1:], last_pos[:-1] + 1)
        and np.array_equal(quads[:, 1], tag_pos + 1)
        and np.array_equal(field_pos, tag_pos + 2)
        and np.all(buf[tag_pos] == _TAG_ANYVALUE)
        and np.all(buf[field_pos] == _TAG_INT_VALUE)
        and np.array_equal(buf[tag_pos + 1], (varint_len + 1).astype(np.uint8))
        and varint_len.max() <= 10
    ):
        return None
    values = (buf[last_pos].astype(np.uint64)) << (np.uint64(7) * (varint_len - 1).astype(np.uint64))
    padded = np.concatenate([buf, np.zeros(10, np.uint8)])  # reads past the end land in zeros
    for j in range(int(varint_len.max()) - 1):  # continuation bytes (with their high bit set)
        byte = padded[field_pos + 1 + j].astype(np.uint64) & np.uint64(0x7F)
        values |= (byte << np.uint64(7 * j)) * (varint_len > j + 1)
    return values.view(np.int64), tag_pos  # two's complement, as protobuf's int64


def decode_double_arrays(rows: Sequence[bytes | None], slow: SlowDecoder) -> pa.ListArray:
    """Decode serialized ArrayValues of doubles into one ``list<double>`` Arrow array.

    Args:
        rows: one serialized ``ArrayValue`` per row (``b""`` is an empty list, None null).
        slow: fallback for arrays that are not plain double arrays (ints are widened).

    Returns:
        A ListArray of len(rows) rows; a row whose array holds non-numbers is null.
    """
    raws = [r or b"" for r in rows]
    if all(len(r) % _DOUBLE_ELEMENT.itemsize == 0 for r in raws):
        elements = np.frombuffer(b"".join(raws), _DOUBLE_ELEMENT)
        if (
            np.all(elements["tag"] == _TAG_ANYVALUE)
            and np.all(elements["length"] == 9)
            and np.all(elements["field"] == _TAG_DOUBLE_VALUE)
        ):
            lengths = np.fromiter((len(r) // _DOUBLE_ELEMENT.itemsize for r in raws), np.int64, len(raws))
            return _list_array(lengths, pa.array(elements["value"].copy(), pa.float64()), rows)
    return _slow_lists(rows, slow, pa.float64())


def _slow_lists(rows: Sequence[bytes | None], slow: SlowDecoder, value_type: pa.DataType) -> pa.ListArray:
    decoded_rows: list[list | None] = []
    for raw in rows:
        decoded = None if raw is None else slow(raw)
        if decoded is not None and not all(_is_number(x, value_type) for x in decoded):
            decoded = None
        if decoded is not None and value_type == pa.float64():
            try:
                decoded = [float(x) for x in decoded]  # ints too large for a double round, as in C
            except OverflowError:
                decoded = None
        decoded_rows.append(decoded)
    return pa.array(decoded_rows, pa.list_(value_type))


def numbers_from_array_bytes(raw: bytes) -> list | None:
    """The slow decoder for numeric columns: raw ints and doubles (NaN and inf kept)."""
    try:
        array = common_pb2.ArrayValue.FromString(raw)
    except DecodeError:
        return None
    out: list = []
    for value in array.values:
        which = value.WhichOneof("value")
        if which not in ("int_value", "double_value"):
            return None
        out.append(getattr(value, which))
    return out


def _is_number(x: object, value_type: pa.DataType) -> bool:
    if isinstance(x, bool):
        return False
    if value_type == pa.int64():
        return isinstance(x, int)
    return isinstance(x, (int, float))
