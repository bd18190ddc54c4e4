"""Fill a real collector for the dashboard tests: OTel SDK spans, a delayed reward, training rows.

Spans go through the real OpenTelemetry Python SDK and its OTLP/HTTP exporter into a
running collector; the delayed reward through ``POST /v1/rewards``. The training tables
are written as Parquet in the trainer's layout (docs/schema.md), since the trainer is
not part of these tests.
"""

from __future__ import annotations

import json
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from tracetrain.instrumentation import semconv as sc

TOKEN = "ui-test-token"
LOW_LOGPROB = -3.2  # p = 0.04: highlighted
T0_NS = (int(time.time()) - 3600) * 10**9


@dataclass(frozen=True)
class Episode:
    episode_id: str
    service: str
    task: str
    agent: str
    policy_version: int
    reward: float
    start_s: float  # after T0


EPISODES = (
    Episode("ep-calc-1", "calc-agent", "add", "solver", 1, 0.0, 0),
    Episode("ep-calc-2", "calc-agent", "mul", "solver", 1, 1.0, 10),
    Episode("ep-calc-3", "calc-agent", "add", "solver", 2, 1.0, 20),
    Episode("ep-price-1", "price-agent", "quote", "pricer", 2, 0.25, 30),
    Episode("ep-price-2", "price-agent", "quote", "pricer", 3, 1.0, 40),
)
DELAYED = ("ep-price-1", 0.75, "user_feedback")
RESPONSE_IDS = [1001, 1002, 1003, 1004]
RESPONSE_LOGPROBS = [-0.01, LOW_LOGPROB, -0.2, -0.05]


def _ns(seconds: float) -> int:
    return T0_NS + int(seconds * 1e9)


def export_episodes(http_port: int, token: str | None = TOKEN) -> dict[str, str]:
    """Export EPISODES through the OTel SDK; returns episode id -> trace id (hex)."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    traces: dict[str, str] = {}
    for service in sorted({e.service for e in EPISODES}):
        exporter = OTLPSpanExporter(endpoint=f"http://127.0.0.1:{http_port}/v1/traces", headers=headers, timeout=30)
        provider = TracerProvider(resource=Resource.create({"service.name": service}))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        tracer = provider.get_tracer("tracetrain-ui-test")
        for episode in (e for e in EPISODES if e.service == service):
            traces[episode.episode_id] = _one_episode(tracer, episode)
        provider.shutdown()
    return traces


def _one_episode(tracer, e: Episode) -> str:
    root = tracer.start_span("invoke_agent " + e.agent, start_time=_ns(e.start_s), attributes={
        sc.EPISODE_ID: e.episode_id, sc.TASK_ID: e.task, sc.GEN_AI_AGENT_NAME: e.agent,
        sc.GEN_AI_OPERATION_NAME: "invoke_agent"})
    context = trace.set_span_in_context(root)
    chat = tracer.start_span("chat tiny", context=context, start_time=_ns(e.start_s + 0.1), attributes={
        sc.GEN_AI_OPERATION_NAME: "chat", sc.GEN_AI_REQUEST_MODEL: "tiny", sc.GEN_AI_USAGE_INPUT_TOKENS: 3,
        sc.GEN_AI_USAGE_OUTPUT_TOKENS: len(RESPONSE_IDS), sc.POLICY_VERSION: e.policy_version,
        sc.GEN_AI_INPUT_MESSAGES: json.dumps([{"role": "user", "parts": [
            {"type": "text", "content": f"solve {e.task} for {e.episode_id}"}]}]),
        sc.GEN_AI_OUTPUT_MESSAGES: json.dumps([{"role": "assistant", "finish_reason": "stop", "parts": [
            {"type": "text", "content": f"answer-{e.episode_id}"}]}]),
        sc.INPUT_TOKEN_IDS: [7, 8, 9], sc.OUTPUT_TOKEN_IDS: RESPONSE_IDS, sc.OUTPUT_LOGPROBS: RESPONSE_LOGPROBS})
    chat.end(end_time=_ns(e.start_s + 1.1))
    tool = tracer.start_span("execute_tool calc", context=context, start_time=_ns(e.start_s + 1.2),
                             attributes={sc.GEN_AI_OPERATION_NAME: "execute_tool", sc.GEN_AI_TOOL_NAME: "calc"})
    tool.end(end_time=_ns(e.start_s + 1.5))
    reward = tracer.start_span("reward", context=context, start_time=_ns(e.start_s + 1.6),
                               attributes={sc.REWARD: e.reward})
    reward.end(end_time=_ns(e.start_s + 1.6))
    root.end(end_time=_ns(e.start_s + 2.0))
    return format(root.get_span_context().trace_id, "032x")


def post_delayed_reward(http_port: int, token: str | None = TOKEN, reward_id: str = "ui-r1",
                        value: float | None = None) -> None:
    """POST /v1/rewards: DELAYED's reward (or ``value``) for its episode."""
    episode_id, default_value, name = DELAYED
    value = default_value if value is None else value
    body = json.dumps({"episode_id": episode_id, "value": value, "name": name, "reward_id": reward_id}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/rewards", data=body, headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200


_ARROW = {"VARCHAR": pa.string(), "BIGINT": pa.int64(), "DOUBLE": pa.float64(),
          "VARCHAR[]": pa.list_(pa.string()), "BIGINT[]": pa.list_(pa.int64())}


def _write(path: Path, columns, row: dict) -> None:
    schema = pa.schema([(name, _ARROW[kind]) for name, kind in columns])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([{name: row.get(name) for name, _ in columns}], schema), path)


def write_training(data_dir: Path, run_id: str = "run-a", n_steps: int = 6) -> None:
    """Train steps 1..n (a push every 2 steps) and a checkpoint at every push, trainer layout."""
    steps_dir = data_dir / sc.TRAINING_DIR / sc.TABLE_TRAIN_STEPS / f"run={run_id}"
    ckpt_dir = data_dir / sc.TRAINING_DIR / sc.TABLE_CHECKPOINTS / f"run={run_id}"
    for step in range(1, n_steps + 1):
        pushed = step % 2 == 0
        version = step // 2 + 1 if pushed else None
        _write(steps_dir / f"step-{step:010d}.parquet", sc.TRAIN_STEP_COLUMNS, {
            "run_id": run_id, "step": step, "time_unix_nano": _ns(100 + step * 5), "algo": "grpo",
            "agent_name": "solver", "policy_version": version, "n_episodes": 4, "n_transitions": 8,
            "n_tokens": 64, "reward_mean": 0.2 + 0.1 * step, "success_rate": 0.1 * step, "loss": 1.0 / step,
            "kl": 0.01 * step, "clip_fraction": 0.05 + 0.01 * step, "staleness_mean": 0.5, "tokens_per_s": 900.0,
            "step_s": 2.0, "push_s": 0.4 if pushed else None, "eval_success": None,
            "skipped": json.dumps({"no_token_ids": 1})})
        if pushed:
            _write(ckpt_dir / f"ckpt-{step:010d}.parquet", sc.CHECKPOINT_COLUMNS, {
                "run_id": run_id, "step": step, "time_unix_nano": _ns(100 + step * 5), "agent_name": "solver",
                "policy_version": version, "path": f"/ckpt/{run_id}/step-{step}",
                "episode_ids": [e.episode_id for e in EPISODES if e.policy_version == version - 1],
                "trained_policy_versions": [version - 1]})
