"""Fuzz a real daemon with random and mutated OTLP payloads over gRPC and HTTP.

About 3000 payloads (fixed seed, so the same ones every run), derived from valid requests
by flipping and overwriting bytes, truncating, duplicating chunks, splicing and by
replacing values in the OTLP/JSON form, half over gRPC and half over HTTP (protobuf or
JSON, gzip or not), from a few threads at once. Every reply must be an allowed OTLP
outcome: no internal error, and no back-pressure either (a few clients sending small
requests never fill the admission budget), so no 5xx / UNAVAILABLE / INTERNAL at all.
Afterwards the daemon still answers /healthz, still stores a valid request, and
``/metrics`` counted every refusal.
"""

from __future__ import annotations

import collections
import functools
import gzip
import json
import math
import random
import threading
import time
from dataclasses import dataclass

import pytest
from opentelemetry.proto.common.v1 import common_pb2

from tests.integration.bad_input_helpers import (
    JSON,
    PROTOBUF,
    GrpcClient,
    HttpClient,
    good_span,
    metric,
    new_trace_id,
    request_of,
    scrape,
    span_keys,
    start_daemon,
    to_otlp_json,
)
from tracetrain.collector import otlp_wire
from tracetrain.collector.errors import PermanentError
from tracetrain.collector.http_receiver import gunzip_limited
from tracetrain.collector.reader import query
from tracetrain.collector.span_rows import decode_request
from tracetrain.instrumentation import semconv as sc

pytestmark = pytest.mark.slow

SEED = 0x07E1_F022
N_PAYLOADS = 3000
N_THREADS = 4
TIME_BUDGET_S = 60.0
MAX_REQUEST = 256 << 10

ALLOWED = {
    "grpc": {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"},
    "http": {"200", "400", "413", "415"},
}
REFUSED = {("grpc", "INVALID_ARGUMENT"), ("grpc", "RESOURCE_EXHAUSTED"), ("http", "400"), ("http", "413"),
           ("http", "415")}


@dataclass
class Payload:
    transport: str  # "grpc" or "http"
    body: bytes
    content_type: str | None = PROTOBUF
    encoding: str | None = None
    how: str = ""


# ---------------------------------------------------------------- seeds


def _seed_requests() -> list:
    requests = []
    for n_spans in (1, 3, 8):
        trace_id = new_trace_id()
        spans = [good_span(trace_id, name=f"seed-{n_spans}-{i}") for i in range(n_spans)]
        for i, span in enumerate(spans[1:], 1):
            span.parent_span_id = spans[0].span_id
            span.links.add(trace_id=trace_id, span_id=spans[i - 1].span_id, trace_state="k=v")
        rich = spans[0]
        rich.status.code, rich.status.message = 2, "boom ✗"
        rich.attributes.add(key=sc.GEN_AI_USAGE_INPUT_TOKENS).value.int_value = 120
        rich.attributes.add(key=sc.REWARD).value.double_value = 0.75
        rich.attributes.add(key=sc.INPUT_TOKEN_IDS).value.array_value.values.extend(
            common_pb2.AnyValue(int_value=t) for t in range(0, 4000, 37))
        kvlist = rich.attributes.add(key="nested").value.kvlist_value
        kvlist.values.add(key="list").value.array_value.values.extend(
            [common_pb2.AnyValue(string_value="ß"), common_pb2.AnyValue(bool_value=True),
             common_pb2.AnyValue(bytes_value=b"\x00\x01")])
        kvlist.values.add(key="d").value.double_value = -1.5
        requests.append(request_of(*spans, service=f"fuzz-{n_spans}"))
    return requests


# ---------------------------------------------------------------- mutations


def _mutate_bytes(rng: random.Random, raw: bytes, pool: list[bytes]) -> tuple[bytes, str]:
    buf = bytearray(raw)
    ops = []
    for _ in range(rng.choice((1, 1, 1, 2, 3, 6))):
        op = rng.choice(("flip", "set", "truncate", "duplicate", "insert", "delete", "splice", "varint"))
        ops.append(op)
        if not buf:
            buf.extend(rng.randbytes(rng.randint(1, 16)))
            continue
        i = rng.randrange(len(buf))
        if op == "flip":
            buf[i] ^= 1 << rng.randrange(8)
        elif op == "set":
            buf[i] = rng.choice((0x00, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif op == "truncate":
            del buf[i:]
        elif op == "duplicate":
            j = min(len(buf), i + rng.randint(1, 64))
            buf[j:j] = buf[i:j] * rng.randint(1, 3)
        elif op == "insert":
            buf[i:i] = rng.randbytes(rng.randint(1, 8))
        elif op == "delete":
            del buf[i:i + rng.randint(1, 16)]
        elif op == "splice":
            other = rng.choice(pool)
            k = rng.randrange(len(other) + 1)
            buf = buf[:i] + bytearray(other[k:k + rng.randint(1, 200)]) + buf[i:]
        else:  # a long varint where a length or value was
            buf[i:i + 1] = bytes([0xFF] * rng.randint(1, 10) + [rng.randrange(0x80)])
    return bytes(buf), "+".join(ops)


def _random_json_value(rng: random.Random, depth: int = 0) -> object:
    r = rng.random()
    if depth < 3 and r < 0.15:
        return [_random_json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if depth < 3 and r < 0.3:
        keys = ("stringValue", "intValue", "doubleValue", "kvlistValue", "arrayValue", "values", "key", "value",
                "traceId", "spanId", "name", "x")
        return {rng.choice(keys): _random_json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return rng.choice((
        None, True, False, 0, -1, 2**63, -(2**63) - 1, 2**64, 10**30, 1.5, -0.0, 1e300, "", "x" * rng.randint(1, 40),
        "0" * 32, "ff" * 8, "zz", "AQID", "NaN", "Infinity", "-1", "12345678901234567890", "\u00e9\u2603",
        rng.randrange(-1000, 1000), rng.random() * 1e6, rng.randbytes(4).hex(),
    ))


def _json_paths(document: object, prefix: tuple = ()) -> list[tuple]:
    paths = [prefix]
    if isinstance(document, dict):
        for key, value in document.items():
            paths.extend(_json_paths(value, (*prefix, key)))
    elif isinstance(document, list):
        for i, value in enumerate(document):
            paths.extend(_json_paths(value, (*prefix, i)))
    return paths


def _mutate_json(rng: random.Random, body: bytes) -> tuple[bytes, str]:
    document = json.loads(body)
    paths = [p for p in _json_paths(document) if p]
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(paths)
        parent = document
        try:
            for step in path[:-1]:
                parent = parent[step]
            if rng.random() < 0.2 and isinstance(parent, dict):
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = _random_json_value(rng)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier replacement removed this path
    return json.dumps(document, ensure_ascii=rng.random() < 0.5).encode("utf-8"), "json-replace"


_TYPED_KEYS = (sc.GEN_AI_USAGE_INPUT_TOKENS, sc.GEN_AI_USAGE_OUTPUT_TOKENS, sc.POLICY_VERSION, sc.REWARD,
               sc.GEN_AI_REQUEST_MODEL, sc.EPISODE_ID, sc.INPUT_TOKEN_IDS, sc.OUTPUT_TOKEN_IDS, sc.OUTPUT_LOGPROBS,
               sc.GEN_AI_INPUT_MESSAGES, sc.SERVICE_NAME, "gen_ai.prompt.0.content", sc.OPENINFERENCE_SPAN_KIND)


def _random_anyvalue(rng: random.Random, depth: int = 0) -> common_pb2.AnyValue:
    value = common_pb2.AnyValue()
    kind = rng.choice(("int", "double", "string", "bool", "bytes", "array", "kvlist", "empty"))
    if kind == "int":
        value.int_value = rng.choice((0, -1, 2**63 - 1, -(2**63), 2**53 + 1, rng.randrange(-1000, 10**6)))
    elif kind == "double":
        value.double_value = rng.choice((0.0, -0.0, math.inf, -math.inf, math.nan, 1e20, -1e300, rng.random()))
    elif kind == "string":
        value.string_value = rng.choice(("", "x", "12", "1e30", "100000000000000000000", "é☃\U0001F600", "[{]"))
    elif kind == "bool":
        value.bool_value = rng.random() < 0.5
    elif kind == "bytes":
        value.bytes_value = rng.randbytes(rng.randint(0, 8))
    elif kind == "array" and depth < 3:
        value.array_value.SetInParent()
        value.array_value.values.extend(_random_anyvalue(rng, depth + 1) for _ in range(rng.randint(0, 4)))
    elif kind == "kvlist" and depth < 3:
        value.kvlist_value.SetInParent()
        for _ in range(rng.randint(0, 3)):
            value.kvlist_value.values.add(key=rng.choice(("a", "", "role"))).value.CopyFrom(
                _random_anyvalue(rng, depth + 1))
    return value


def _mutate_semantic(rng: random.Random, request) -> tuple[bytes, str]:
    """Well-formed protobuf with odd field values: reaches the decoder instead of the parser."""
    request = type(request).FromString(request.SerializeToString())
    spans = [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
    ops = []
    for _ in range(rng.randint(1, 3)):
        span = rng.choice(spans)
        op = rng.choice(("kind", "status", "ids", "times", "attribute", "name", "event"))
        ops.append(op)
        if op == "kind":
            span.kind = rng.choice((0, 5, 6, 99, 127, 128, 1000, -1, 2**31 - 1, -(2**31)))
        elif op == "status":
            span.status.code = rng.choice((0, 2, 3, 127, 128, -129, 2**31 - 1))
        elif op == "ids":
            field = rng.choice(("trace_id", "span_id", "parent_span_id"))
            setattr(span, field, rng.choice((b"", bytes(16), bytes(8), rng.randbytes(rng.randint(1, 20)))))
        elif op == "times":
            span.start_time_unix_nano = rng.choice((0, 2**63, 2**64 - 1, rng.randrange(2**64)))
            span.end_time_unix_nano = rng.choice((0, 2**63 - 1, 2**64 - 1))
        elif op == "attribute":
            span.attributes.add(key=rng.choice(_TYPED_KEYS + ("k", ""))).value.CopyFrom(_random_anyvalue(rng))
        elif op == "name":
            span.name = rng.choice(("", "\x00", "é" * 300, "\U0001F600"))
        else:
            span.events.add(name="e", time_unix_nano=rng.randrange(2**64)).attributes.add(
                key="v").value.CopyFrom(_random_anyvalue(rng))
    return request.SerializeToString(), "semantic:" + "+".join(ops)


def make_payloads(rng: random.Random) -> list[Payload]:
    seeds = _seed_requests()
    pb_pool = [r.SerializeToString() for r in seeds]
    json_pool = [to_otlp_json(r) for r in seeds]
    payloads: list[Payload] = []
    for n in range(N_PAYLOADS):
        transport = "grpc" if n % 2 == 0 else "http"
        as_json = transport == "http" and rng.random() < 0.5
        pool = json_pool if as_json else pb_pool
        base = rng.choice(pool)
        r = rng.random()
        if r < 0.05:
            body, how = rng.randbytes(rng.choice((0, 1, 2, 7, 64, 1000))), "random"
        elif r < 0.08:
            body, how = base, "valid"
        elif r < 0.10:
            body, how = base + bytes(MAX_REQUEST), "oversize"
        elif r < 0.25:
            body, how = _mutate_semantic(rng, rng.choice(seeds))
            if as_json:
                body = to_otlp_json(type(seeds[0]).FromString(body))
        elif as_json and r < 0.6:
            body, how = _mutate_json(rng, base)
        else:
            body, how = _mutate_bytes(rng, base, pool)
        payload = Payload(transport, body, JSON if as_json else PROTOBUF, None, how)
        if transport == "http":
            g = rng.random()
            if g < 0.25:
                payload.body, payload.encoding = gzip.compress(body, 1), "gzip"
            elif g < 0.30:  # a damaged gzip stream
                payload.body, payload.encoding = _mutate_bytes(rng, gzip.compress(body, 1), [body])[0], "gzip"
            elif g < 0.32:
                payload.encoding = rng.choice(("deflate", "br", "gzip, gzip"))
            c = rng.random()
            if c < 0.02:
                payload.content_type = rng.choice(("text/plain", "application/octet-stream", None))
            elif c < 0.04:
                payload.content_type = (JSON if as_json else PROTOBUF) + "; charset=utf-8"
        payloads.append(payload)
    return payloads


@functools.cache
def seeded_payloads() -> tuple[Payload, ...]:
    """The fixed-seed payloads, made once for both tests."""
    return tuple(make_payloads(random.Random(SEED)))


# ---------------------------------------------------------------- the tests


def test_fuzzed_payloads_get_only_allowed_outcomes(tmp_path) -> None:
    payloads = seeded_payloads()
    daemon = start_daemon(tmp_path / "data", max_request_bytes=MAX_REQUEST)
    outcomes: collections.Counter = collections.Counter()
    unexpected: list[tuple[Payload, str, str]] = []
    lock = threading.Lock()
    deadline = time.monotonic() + TIME_BUDGET_S
    sent = [0]

    def worker(index: int) -> None:
        grpc_client = GrpcClient(daemon.grpc_port)
        http_client = HttpClient(daemon.http_port)
        try:
            for payload in payloads[index::N_THREADS]:
                if time.monotonic() > deadline:
                    return
                if payload.transport == "grpc":
                    reply = grpc_client.send(payload.body, timeout=20)
                else:
                    reply = http_client.send(payload.body, payload.content_type, payload.encoding)
                with lock:
                    sent[0] += 1
                    outcomes[(payload.transport, reply.code)] += 1
                    if reply.code not in ALLOWED[payload.transport]:
                        unexpected.append((payload, reply.code, reply.message))
                    elif reply.ok:
                        assert reply.error_message or reply.rejected_spans == 0
        finally:
            grpc_client.close()
            http_client.close()

    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            worker(index)
        except BaseException as exc:  # surfaced below: a client-side crash is a failure too
            errors.append(exc)

    started = time.monotonic()
    try:
        threads = [threading.Thread(target=run, args=(i,), name=f"fuzz-{i}") for i in range(N_THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIME_BUDGET_S + 60)
        elapsed = time.monotonic() - started
        assert not any(t.is_alive() for t in threads), "a fuzz client hung"
        assert not errors, errors[:3]

        print(f"\nfuzz: {sent[0]} payloads in {elapsed:.1f}s; outcomes {dict(sorted(outcomes.items()))}")
        # No tolerance: an internal error (503 / UNAVAILABLE "internal error; retry later") is a collector
        # bug, and back-pressure (503 / UNAVAILABLE "collector is busy") cannot happen at this load.
        assert not unexpected, [(p.transport, p.content_type, p.encoding, p.how, code, message, p.body[:80])
                                for p, code, message in unexpected[:5]]
        assert sent[0] >= min(N_PAYLOADS, 1000), "too few payloads sent within the time budget"
        # The fuzz reached every kind of outcome (else the mutations are too weak to mean much).
        for key in (("grpc", "OK"), ("grpc", "INVALID_ARGUMENT"), ("grpc", "RESOURCE_EXHAUSTED"),
                    ("http", "200"), ("http", "400"), ("http", "413"), ("http", "415")):
            assert outcomes[key] > 0, (key, outcomes)

        # Still alive, still healthy, still storing.
        http_client = HttpClient(daemon.http_port)
        status, body = http_client.get("/healthz")
        assert status == 200 and json.loads(body) == {"status": "ok"}
        final_grpc = request_of(good_span(new_trace_id(), name="final-grpc"), service="fuzz-final")
        final_http = request_of(good_span(new_trace_id(), name="final-http"), service="fuzz-final")
        grpc_client = GrpcClient(daemon.grpc_port)
        try:
            reply = grpc_client.send(final_grpc.SerializeToString())
            assert reply.code == "OK" and reply.rejected_spans == 0
        finally:
            grpc_client.close()
        reply = http_client.send(to_otlp_json(final_http), JSON)
        assert reply.code == "200" and reply.rejected_spans == 0
        http_client.close()
        stored = {r["k"] for r in query(
            daemon.config.data_dir,
            "SELECT trace_id || span_id AS k FROM spans WHERE service_name = 'fuzz-final'").to_pylist()}
        assert stored == span_keys(final_grpc) | span_keys(final_http)
        # Every refusal is counted once, whether the receiver or the pipeline refused it.
        samples = scrape(daemon.http_port)
        bad = sum(v for k, v in samples.items() if k[0] == "tracetrain_bad_requests_total")
        assert bad == sum(n for key, n in outcomes.items() if key in REFUSED), outcomes
        for transport in ("grpc", "http"):
            invalid = metric(samples, "tracetrain_requests_total", transport=transport, outcome="invalid")
            assert invalid == sum(n for (t, _), n in outcomes.items() if t == transport and (t, _) in REFUSED)
    finally:
        daemon.stop()


def test_fuzzed_payloads_offline_parse_or_permanent_error_and_decode() -> None:
    """The same payloads through the receiver's steps, in-process: PermanentError or stored, nothing else.

    The daemon test only sees a status code; this one names the exact payload and exception
    if the decoder breaks on one of them.
    """
    failures = []
    counts: collections.Counter = collections.Counter()
    for payload in seeded_payloads():
        content_type = (payload.content_type or "").split(";")[0]
        if content_type not in (JSON, PROTOBUF) or payload.encoding not in (None, "gzip"):
            counts["refused before parsing"] += 1  # 415 / 400, decided on the headers
            continue
        try:
            body = gunzip_limited(payload.body, MAX_REQUEST) if payload.encoding == "gzip" else payload.body
            if len(body) > MAX_REQUEST:
                raise PermanentError("too large")
            parse = otlp_wire.parse_json if content_type == JSON else otlp_wire.parse_protobuf
            request = parse(body)
        except PermanentError:
            counts["permanent error"] += 1
            continue
        except Exception as exc:  # anything else is the failure looked for
            failures.append(("parse", payload.how, content_type, repr(exc), payload.body[:80]))
            continue
        try:
            decoded = decode_request(request, received_ns=1, max_value_bytes=8 << 20)
        except Exception as exc:
            failures.append(("decode", payload.how, content_type, repr(exc), payload.body[:80]))
            continue
        assert decoded.rows + decoded.spans_rejected + decoded.spans_duplicate == decoded.spans_total
        counts["rejected some spans" if decoded.spans_rejected else "decoded"] += 1
    assert not failures, failures[:5]
    assert all(counts[k] > 0 for k in ("refused before parsing", "permanent error", "rejected some spans",
                                       "decoded")), counts
