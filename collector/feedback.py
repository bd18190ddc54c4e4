"""Delayed rewards: attach a reward to an episode after it ended.

``FeedbackService.add_reward`` backs gRPC ``tracetrain.v1.FeedbackService/AddReward``,
``POST /v1/rewards`` and ``tracetrain reward``. A reward is stored as one span row
(name ``reward``, scope ``tracetrain.feedback``, attributes ``tracetrain.reward``,
``tracetrain.episode.id``, ``tracetrain.reward.id``, ``tracetrain.reward.delayed``)
that goes through the ingest pipeline like any exported span, so it is fsynced
before the call returns, and the ``episodes`` view picks it up.

Idempotency: the reward's trace and span ids are derived from its ``reward_id``.
A retry with the same id finds that span (in memory, else in the store) and
stores nothing; if two copies ever land (two daemons, a crash before the reply),
the writer's restart dedup, compaction and the ``episodes`` view all key on
those ids, so it still counts once.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from tracetrain.collector import otlp_wire, reader
from tracetrain.collector.errors import PermanentError
from tracetrain.collector.ingest import IngestPipeline
from tracetrain.instrumentation import semconv as sc

MAX_ID_CHARS = 256
_CACHE_SIZE = 100_000


class UnknownEpisodeError(Exception):
    """No span of the episode is in the store (gRPC NOT_FOUND, HTTP 404)."""


class RewardConflictError(Exception):
    """The reward id is already stored with another episode or value (ALREADY_EXISTS, 409)."""


@dataclass(frozen=True)
class RewardResult:
    accepted: bool
    duplicate: bool
    reward_id: str


def reward_span_ids(reward_id: str) -> tuple[bytes, bytes]:
    """The (trace_id, span_id) a reward id always maps to."""
    digest = hashlib.sha256(b"tracetrain.reward\x00" + reward_id.encode("utf-8")).digest()
    trace_id, span_id = digest[:16], digest[16:24]
    return trace_id if any(trace_id) else b"\x01" * 16, span_id if any(span_id) else b"\x01" * 8


def _anyvalue(value: Any) -> common_pb2.AnyValue:
    if isinstance(value, bool):
        return common_pb2.AnyValue(bool_value=value)
    if isinstance(value, int) and -(2**63) <= value < 2**63:
        return common_pb2.AnyValue(int_value=value)
    if isinstance(value, float):
        return common_pb2.AnyValue(double_value=value)
    if isinstance(value, str):
        return common_pb2.AnyValue(string_value=value)
    if isinstance(value, (list, tuple)):
        return common_pb2.AnyValue(array_value=common_pb2.ArrayValue(values=[_anyvalue(v) for v in value]))
    if isinstance(value, dict):
        return common_pb2.AnyValue(kvlist_value=common_pb2.KeyValueList(values=[
            common_pb2.KeyValue(key=str(k), value=_anyvalue(v)) for k, v in value.items()]))
    if value is None:
        return common_pb2.AnyValue()
    return common_pb2.AnyValue(string_value=str(value))


def _check_id(what: str, value: Any, required: bool) -> str | None:
    if value is None or value == "":
        if required:
            raise PermanentError(f"{what} is required")
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise PermanentError(f"{what} must be a string, got {type(value).__name__}")
    if len(value) > MAX_ID_CHARS:
        raise PermanentError(f"{what} is longer than {MAX_ID_CHARS} characters")
    return value


class FeedbackService:
    """Validates, dedupes and durably stores delayed rewards for one daemon."""

    def __init__(self, pipeline: IngestPipeline, data_dir: Path) -> None:
        self.pipeline = pipeline
        self.data_dir = Path(data_dir)
        self._lock = threading.Lock()  # one reward at a time: the dedup check and the write are one step
        self._connection = None
        self._known_episodes: OrderedDict[str, None] = OrderedDict()
        self._stored: OrderedDict[str, tuple[str, float]] = OrderedDict()  # span key -> (episode, value)

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def add_reward(self, episode_id: Any, value: Any, name: Any = None, reward_id: Any = None,
                   attributes: dict | None = None, time_unix_nano: int | None = None,
                   transport: str = "feedback", peer: str = "?") -> RewardResult:
        """Store one reward for ``episode_id``; return once it is durable.

        Raises:
            PermanentError: invalid arguments.
            UnknownEpisodeError: no span of the episode is stored.
            RewardConflictError: ``reward_id`` is stored with another episode or value.
            RetryableError: the collector cannot store it now.
        """
        episode_id = _check_id("episode_id", episode_id, required=True)
        reward_id = _check_id("reward_id", reward_id, required=False) or uuid.uuid4().hex
        name = _check_id("name", name, required=False)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise PermanentError(f"value must be a finite number, got {value!r}")
        if attributes is not None and not isinstance(attributes, dict):
            raise PermanentError("attributes must be an object")
        if time_unix_nano is not None and (isinstance(time_unix_nano, bool) or not isinstance(time_unix_nano, int)
                                           or not 0 <= time_unix_nano < 2**63):
            raise PermanentError(f"time_unix_nano must be a non-negative integer, got {time_unix_nano!r}")
        trace_id, span_id = reward_span_ids(reward_id)
        key = trace_id.hex() + span_id.hex()
        with self._lock:
            stored = self._stored.get(key) or self._lookup_reward(trace_id.hex(), span_id.hex())
            if stored is not None:
                if stored != (episode_id, float(value)):
                    raise RewardConflictError(
                        f"reward_id {reward_id!r} is already stored for episode {stored[0]!r} with value "
                        f"{stored[1]!r}; use a new reward_id for a different reward")
                return RewardResult(True, True, reward_id)
            if not self._episode_exists(episode_id):
                raise UnknownEpisodeError(
                    f"episode {episode_id!r} is not in the store (no span has tracetrain.episode.id or trace id "
                    f"{episode_id!r}); check the id, or retry once the agent's spans are exported")
            body = _reward_request(episode_id, float(value), name, reward_id, attributes or {},
                                   time_unix_nano or time.time_ns(), trace_id, span_id)
            result = self.pipeline.export(body, transport, otlp_wire.parse_protobuf, peer)
            if result.rejected_spans:
                raise PermanentError(result.error_message)
            self._remember(self._stored, key, (episode_id, float(value)))
            return RewardResult(True, False, reward_id)

    # ------------------------------------------------------------ store lookups

    def _query(self, sql: str, params: list) -> list[tuple]:
        if self._connection is None:
            self._connection = reader.connect(self.data_dir)
        connection = self._connection
        return reader.run_listing_safe(lambda: connection.execute(sql, params).fetchall())

    def _lookup_reward(self, trace_hex: str, span_hex: str) -> tuple[str, float] | None:
        rows = self._query(f"SELECT {sc.COL_EPISODE_ID}, {sc.COL_REWARD} FROM {sc.TABLE_SPANS} "
                           f"WHERE {sc.COL_TRACE_ID} = ? AND {sc.COL_SPAN_ID} = ? LIMIT 1", [trace_hex, span_hex])
        if not rows:
            return None
        return rows[0][0], rows[0][1]

    def _episode_exists(self, episode_id: str) -> bool:
        if episode_id in self._known_episodes:
            return True
        rows = self._query(f"SELECT 1 FROM {sc.TABLE_SPANS} WHERE ({sc.COL_EPISODE_ID} = ? OR {sc.COL_TRACE_ID} = ?) "
                           f"AND coalesce({sc.COL_SCOPE_NAME}, '') <> ? LIMIT 1",
                           [episode_id, episode_id, sc.FEEDBACK_SCOPE_NAME])
        if rows:
            self._remember(self._known_episodes, episode_id, None)
        return bool(rows)

    @staticmethod
    def _remember(cache: OrderedDict, key: str, value: Any) -> None:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)


def _reward_request(episode_id: str, value: float, name: str | None, reward_id: str, attributes: dict,
                    time_ns: int, trace_id: bytes, span_id: bytes) -> bytes:
    """The ExportTraceServiceRequest carrying one reward span."""
    attrs = {str(k): v for k, v in attributes.items()}
    attrs.update({sc.REWARD: value, sc.EPISODE_ID: episode_id, sc.REWARD_ID: reward_id, sc.REWARD_DELAYED: True})
    if name:
        attrs[sc.REWARD_NAME] = name
    span = trace_pb2.Span(
        trace_id=trace_id, span_id=span_id, name="reward", kind=trace_pb2.Span.SPAN_KIND_INTERNAL,
        start_time_unix_nano=time_ns, end_time_unix_nano=time_ns,
        attributes=[common_pb2.KeyValue(key=k, value=_anyvalue(v)) for k, v in attrs.items()])
    request = trace_service_pb2.ExportTraceServiceRequest(resource_spans=[trace_pb2.ResourceSpans(
        resource=resource_pb2.Resource(attributes=[common_pb2.KeyValue(
            key=sc.SERVICE_NAME, value=common_pb2.AnyValue(string_value=sc.FEEDBACK_SERVICE_NAME))]),
        scope_spans=[trace_pb2.ScopeSpans(scope=common_pb2.InstrumentationScope(name=sc.FEEDBACK_SCOPE_NAME),
                                          spans=[span])])])
    return request.SerializeToString()
