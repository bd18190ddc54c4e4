"""Spans from the real OTel SDK exporter, through the real collector, into transitions and a batch."""

from __future__ import annotations

import math

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import Status, StatusCode
from tracetrain.instrumentation import semconv as sc
from tracetrain.trainer import advantages, batch, store, transitions

# (episode, task, reward, [(agent, prompt ids, response ids, logprobs, policy version)])
EPISODES = [
    ("ep-a1", "task-a", 1.0, [("planner", [1, 2], [3, 4], [-0.1, -0.2], 5),
                              ("planner", [1, 2, 3, 4, 9], [5], [-0.3], 5)]),   # merges with the call before
    ("ep-a2", "task-a", 0.0, [("planner", [1, 2], [6], [-0.4], 4),
                              ("coder", [7], [8, 8], [-0.5, -0.6], 4)]),
    ("ep-b1", "task-b", 0.5, [("coder", [7, 7], [9], [-0.7], 5)]),
    ("ep-b2", "task-b", 0.5, [("coder", [7, 7], [10], [-0.8], 5)]),              # zero-variance group
]


def _export(port: int, error_episode: str | None = None) -> None:
    provider = TracerProvider(resource=Resource.create({"service.name": "transitions-agent"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"127.0.0.1:{port}", insecure=True)))
    tracer = provider.get_tracer("test")
    clock = 1_767_225_600_000_000_000
    for episode, task, reward, calls in EPISODES:
        clock += 10**9
        root = tracer.start_span("agent", start_time=clock,
                                 attributes={sc.EPISODE_ID: episode, sc.TASK_ID: task})
        for i, (agent, prompt, response, logprobs, version) in enumerate(calls):
            start = clock + (i + 1) * 10**6
            span = tracer.start_span("chat tiny", context=_ctx(root), start_time=start, attributes={
                sc.GEN_AI_OPERATION_NAME: "chat", sc.GEN_AI_AGENT_NAME: agent, sc.INPUT_TOKEN_IDS: prompt,
                sc.OUTPUT_TOKEN_IDS: response, sc.OUTPUT_LOGPROBS: logprobs, sc.POLICY_VERSION: version})
            if episode == "ep-b2":
                span.set_attribute(sc.GEN_AI_RESPONSE_FINISH_REASONS, ["length"])
            if episode == error_episode:
                span.set_status(Status(StatusCode.ERROR))
            span.end(end_time=start + 10**5)
        tracer.start_span("reward", context=_ctx(root), start_time=clock + 10**8,
                          attributes={sc.REWARD: reward}).end(end_time=clock + 10**8)
        root.end(end_time=clock + 2 * 10**8)
    provider.shutdown()


def _ctx(span):
    from opentelemetry import trace
    return trace.set_span_in_context(span)


def test_sdk_spans_become_transitions_advantages_and_a_batch(collector, data_dir):
    _export(collector.grpc_port)
    con = store.connect(data_dir)
    calls = transitions.load_calls(con)
    assert calls.num_rows == 6
    assert calls["episode_id"].to_pylist() == ["ep-a1", "ep-a1", "ep-a2", "ep-a2", "ep-b1", "ep-b2"]
    assert calls["episode_reward"].to_pylist() == [1.0, 1.0, 0.0, 0.0, 0.5, 0.5]
    assert calls["agent_name"].to_pylist() == ["planner", "planner", "planner", "coder", "coder", "coder"]

    table, skipped = transitions.build_transitions(calls, transitions.TransitionConfig())
    assert skipped == {}
    rows = {(r["episode_id"], r["call_index"]): r for r in table.to_pylist()}
    assert set(rows) == {("ep-a1", 0), ("ep-a2", 0), ("ep-a2", 1), ("ep-b1", 0), ("ep-b2", 0)}
    merged = rows[("ep-a1", 0)]
    assert merged["input_ids"] == [1, 2, 3, 4, 9, 5] and merged["response_mask"] == [0, 0, 1, 1, 0, 1]
    assert [round(x, 6) for x in merged["old_logprobs"]] == [0.0, 0.0, -0.1, -0.2, 0.0, -0.3]
    assert merged["n_calls"] == 2 and merged["policy_version"] == 5 and merged["task_id"] == "task-a"
    assert transitions.merge_saving(table) == {"tokens_forwarded": 18, "tokens_forwarded_unmerged": 22,
                                               "saving": 1 - 18 / 22}

    scored, dropped = advantages.grpo(table)
    assert dropped == {"zero_variance_group": 2}
    # task-a: scores 1 and 0, mean 0.5, sample std sqrt(0.5)
    by_episode = {r["episode_id"]: r["advantage"] for r in scored.to_pylist()}
    assert math.isclose(by_episode["ep-a1"], 0.5 / (math.sqrt(0.5) + 1e-4), rel_tol=1e-6)
    assert math.isclose(by_episode["ep-a2"], -0.5 / (math.sqrt(0.5) + 1e-4), rel_tol=1e-6)

    out = batch.to_batch(scored, pad_token_id=0)
    assert tuple(out.input_ids.shape) == (3, 6)
    assert out.response_mask.sum().item() == 3 + 1 + 2
    assert out.episode_ids == ["ep-a1", "ep-a2", "ep-a2"]

    # online: the watermark after the first read selects nothing; SQL and agent filters apply
    mark = transitions.watermark(calls)
    assert mark is not None and mark[1] == "ep-b2"
    assert transitions.load_calls(con, after=mark).num_rows == 0
    first_two = transitions.load_calls(con, after=(calls["episode_end_time_unix_nano"][0].as_py(), "ep-a1"))
    assert set(first_two["episode_id"].to_pylist()) == {"ep-a2", "ep-b1", "ep-b2"}
    assert set(transitions.load_calls(con, where="task_id LIKE 'task-b%'")["episode_id"].to_pylist()) == {
        "ep-b1", "ep-b2"}
    assert transitions.load_calls(con, where="reward > 0.7")["span_id"].length() == 2
    assert transitions.load_calls(con, agents=["coder"])["agent_name"].to_pylist() == ["coder"] * 3
    assert transitions.load_calls(con, episode_ids=["ep-a2"])["span_id"].length() == 2
    con.close()


def test_error_episode_and_staleness_filters(collector, data_dir):
    _export(collector.grpc_port, error_episode="ep-a2")
    con = store.connect(data_dir)
    calls = transitions.load_calls(con)
    cfg = transitions.TransitionConfig(drop_error_episodes=True, current_version=6, max_staleness=1)
    table, skipped = transitions.build_transitions(calls, cfg)
    assert skipped == {"error_episode": 2}  # ep-a2's two calls; version 5 is 1 behind, kept
    cfg = transitions.TransitionConfig(current_version=7, max_staleness=1, agents=("planner",))
    table, skipped = transitions.build_transitions(calls, cfg)
    assert skipped == {"agent_not_selected": 3, "stale_policy": 3} and table.num_rows == 0
    assert calls["finish_reason"].to_pylist() == [None] * 5 + ["length"]
    table, skipped = transitions.build_transitions(calls, transitions.TransitionConfig(drop_truncated=True))
    assert skipped == {"truncated": 1} and table.num_rows == 4
    con.close()
