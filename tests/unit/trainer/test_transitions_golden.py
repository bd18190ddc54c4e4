"""Transitions and advantages of a small hand-built multi-turn, multi-agent episode set.

Every expected number below is worked out by hand from the calls in CALLS.
"""

from __future__ import annotations

import json
import math

import pytest
from tracetrain.trainer import advantages, batch, transitions
from tracetrain.trainer.transitions import TransitionConfig, build_transitions, calls_table


def _call(episode, task, agent, span, start, prompt, response, logprobs, reward, version=None, call_reward=None):
    return dict(episode_id=episode, task_id=task, agent_name=agent, trace_id="tr-" + episode, span_id=span,
                start_time_unix_nano=start, prompt_token_ids=prompt, response_token_ids=response,
                response_logprobs=logprobs, episode_reward=reward, policy_version=version, call_reward=call_reward,
                episode_end_time_unix_nano=1000, has_error=False)


CALLS = [
    # task t1, three episodes; e1 has two planner calls that merge around a coder call
    _call("e1", "t1", "planner", "s11", 10, [1, 2], [3, 4], [-0.1, -0.2], 1.0, 3),
    _call("e1", "t1", "coder", "s12", 20, [50], [51], [-0.5], 1.0, 3),
    _call("e1", "t1", "planner", "s13", 30, [1, 2, 3, 4, 7, 8], [9], [-0.3], 1.0, 4),
    _call("e2", "t1", "planner", "s21", 10, [1, 2], [5], [-0.4], 0.0, 3),
    _call("e2", "t1", "planner", "s22", 20, [1, 2, 6], [5], [-0.6], 0.0, 3),   # [1,2,6] does not extend [1,2,5]
    _call("e3", "t1", "planner", "s31", 10, None, None, None, 0.5),             # captured without ids
    _call("e3", "t1", "coder", "s32", 20, [50], [52, 53], [-0.7, -0.8], 0.5),
    # task t2: e4 has no reward
    _call("e4", "t2", "planner", "s41", 10, [1], [2], [-0.1], None),
    _call("e5", "t2", "coder", "s51", 10, [60], [61], [-0.2], 1.0),
    _call("e6", "t2", "coder", "s61", 10, [60], [62], [-0.9], 0.0),
    # no task id: a group of its own
    _call("e7", None, "planner", "s71", 10, [70], [71], [-0.05], 1.0),
]


def _rows(table):
    out = []
    for row in table.to_pylist():
        row["old_logprobs"] = [round(x, 6) for x in row["old_logprobs"]]
        out.append(row)
    return out


def test_golden_transitions():
    table, skipped = build_transitions(calls_table(CALLS), TransitionConfig())
    assert skipped == {"no_token_ids": 1, "no_reward": 1}
    got = [(r["episode_id"], r["agent_name"], r["span_ids"], r["call_index"], r["n_calls"], r["policy_version"],
            r["input_ids"], r["response_mask"], r["old_logprobs"], r["reward"], r["n_prompt_tokens"],
            r["n_response_tokens"], r["calls_to_end"], r["n_tokens_unmerged"]) for r in _rows(table)]
    assert got == [
        ("e1", "coder", ["s12"], 1, 1, 3, [50, 51], [0, 1], [0.0, -0.5], 1.0, 1, 1, 1, 2),
        ("e1", "planner", ["s11", "s13"], 0, 2, 3, [1, 2, 3, 4, 7, 8, 9], [0, 0, 1, 1, 0, 0, 1],
         [0.0, 0.0, -0.1, -0.2, 0.0, 0.0, -0.3], 1.0, 2, 3, 0, 11),
        ("e2", "planner", ["s21"], 0, 1, 3, [1, 2, 5], [0, 0, 1], [0.0, 0.0, -0.4], 0.0, 2, 1, 1, 3),
        ("e2", "planner", ["s22"], 1, 1, 3, [1, 2, 6, 5], [0, 0, 0, 1], [0.0, 0.0, 0.0, -0.6], 0.0, 3, 1, 0, 4),
        ("e3", "coder", ["s32"], 1, 1, None, [50, 52, 53], [0, 1, 1], [0.0, -0.7, -0.8], 0.5, 1, 2, 0, 3),
        ("e5", "coder", ["s51"], 0, 1, None, [60, 61], [0, 1], [0.0, -0.2], 1.0, 1, 1, 0, 2),
        ("e6", "coder", ["s61"], 0, 1, None, [60, 62], [0, 1], [0.0, -0.9], 0.0, 1, 1, 0, 2),
        ("e7", "planner", ["s71"], 0, 1, None, [70, 71], [0, 1], [0.0, -0.05], 1.0, 1, 1, 0, 2),
    ]
    # 2+7+3+4+3+2+2+2 forwarded instead of 2+11+3+4+3+2+2+2
    assert transitions.merge_saving(table) == {"tokens_forwarded": 25, "tokens_forwarded_unmerged": 29,
                                               "saving": 1 - 25 / 29}


def test_golden_unmerged_and_discounted():
    table, _ = build_transitions(calls_table(CALLS), TransitionConfig(merge=False))
    e1 = [(r["span_ids"], r["input_ids"], r["response_mask"]) for r in _rows(table) if r["episode_id"] == "e1"]
    assert e1 == [(["s12"], [50, 51], [0, 1]), (["s11"], [1, 2, 3, 4], [0, 0, 1, 1]),
                  (["s13"], [1, 2, 3, 4, 7, 8, 9], [0, 0, 0, 0, 0, 0, 1])]
    # gamma 0.5 over e1's three calls: 0.25, 0.5, 1.0; unequal rewards never merge
    table, _ = build_transitions(calls_table(CALLS), TransitionConfig(gamma=0.5))
    e1 = {tuple(r["span_ids"]): r["reward"] for r in table.to_pylist() if r["episode_id"] == "e1"}
    assert e1 == {("s11",): 0.25, ("s12",): 0.5, ("s13",): 1.0}


def test_golden_per_call_returns():
    calls = [_call("p", "t", "a", "c1", 1, [1], [2], [-1.0], 9.0),
             _call("p", "t", "a", "c2", 2, [1, 2, 3], [4], [-1.0], 9.0, call_reward=0.2),
             _call("p", "t", "a", "c3", 3, [5], [6], [-1.0], 9.0, call_reward=1.0),
             _call("q", "t", "a", "d1", 1, [1], [2], [-1.0], 9.0)]   # no call reward at all
    table, skipped = build_transitions(calls_table(calls), TransitionConfig(reward="call", gamma=0.5))
    assert skipped == {"no_reward": 1}
    # c3: 1.0; c2: 0.2 + 0.5 * 1.0 = 0.7; c1: 0 + 0.5 * 0.7 = 0.35 (different rewards: c1, c2 not merged)
    assert [(r["span_ids"], r["reward"]) for r in table.to_pylist()] == [
        (["c1"], 0.35), (["c2"], 0.7), (["c3"], 1.0)]


def test_golden_grpo():
    table, _ = build_transitions(calls_table(CALLS), TransitionConfig())
    scored, dropped = advantages.grpo(table)
    assert dropped == {"zero_variance_group": 1}  # e7, alone in its group
    # t1: scores 1.0, 0.0, 0.5 -> mean 0.5, sample std 0.5; t2: 1.0, 0.0 -> mean 0.5, std sqrt(0.5)
    expected = {"e1": 0.9998000399920016, "e2": -0.9998000399920016, "e3": 0.0,
                "e5": 0.7070067953266834, "e6": -0.7070067953266834}
    got = [(r["episode_id"], r["advantage"]) for r in scored.to_pylist()]
    assert [e for e, _ in got] == ["e1", "e1", "e2", "e2", "e3", "e5", "e6"]
    for episode, advantage in got:
        assert advantage == pytest.approx(expected[episode], rel=1e-6, abs=1e-7)


def test_golden_baseline():
    table, _ = build_transitions(calls_table(CALLS), TransitionConfig())
    scored, dropped = advantages.baseline(table)
    assert dropped == {}
    got = {(r["episode_id"], tuple(r["span_ids"])): r["advantage"] for r in scored.to_pylist()}
    assert got == {("e1", ("s12",)): 0.5, ("e1", ("s11", "s13")): 0.5, ("e2", ("s21",)): -0.5,
                   ("e2", ("s22",)): -0.5, ("e3", ("s32",)): 0.0, ("e5", ("s51",)): 0.5,
                   ("e6", ("s61",)): -0.5, ("e7", ("s71",)): 0.0}
    scored, _ = advantages.baseline(table, gamma=0.5)  # one call to the episode's end halves it
    got = {(r["episode_id"], tuple(r["span_ids"])): r["advantage"] for r in scored.to_pylist()}
    assert got[("e1", ("s12",))] == 0.25 and got[("e2", ("s21",))] == -0.25 and got[("e2", ("s22",))] == -0.5


def test_golden_batch():
    table, _ = build_transitions(calls_table(CALLS), TransitionConfig())
    scored, _ = advantages.grpo(table)
    out = batch.to_batch(scored, pad_token_id=99)
    assert tuple(out.input_ids.shape) == (7, 7)
    assert out.input_ids[0].tolist() == [50, 51, 99, 99, 99, 99, 99]
    assert out.attention_mask[0].tolist() == [1, 1, 0, 0, 0, 0, 0]
    assert out.response_mask[1].tolist() == [0, 0, 1, 1, 0, 0, 1]
    assert [round(x, 6) for x in out.old_logprobs[1].tolist()] == [0.0, 0.0, -0.1, -0.2, 0.0, 0.0, -0.3]
    assert [round(x, 4) for x in out.advantages[1].tolist()] == [0.0, 0.0, 0.9998, 0.9998, 0.0, 0.0, 0.9998]
    assert out.policy_versions.tolist() == [3, 3, 3, 3, -1, -1, -1]
    assert out.episode_ids == ["e1", "e1", "e2", "e2", "e3", "e5", "e6"]
    assert tuple(batch.to_batch(scored, pad_token_id=0, max_len=9).input_ids.shape) == (7, 9)
    with pytest.raises(ValueError, match="max_len=6"):
        batch.to_batch(scored, pad_token_id=0, max_len=6)


def test_filters_with_counted_reasons():
    calls = list(CALLS) + [
        _call("e8", "t3", "coder", "s81", 10, [1, 2, 3], [4, 5, 6], [-0.1, -0.1, -0.1], 1.0, 4),  # too long
        _call("e8", "t3", "coder", "s82", 20, [1], [4], None, 1.0, 4),                             # no logprobs
        _call("e8", "t3", "coder", "s83", 30, [1], [4], [-0.1, -0.2], 1.0, 4),                     # wrong length
    ]
    cfg = TransitionConfig(max_len=5, current_version=4, max_staleness=0, agents=("coder",))
    table, skipped = build_transitions(calls_table(calls), cfg)
    # planner calls: 7 (s31 and s41 included: the agent filter comes first); stale: s12 (v3)
    assert skipped == {"agent_not_selected": 7, "stale_policy": 1, "too_long": 1, "no_logprobs": 2}
    assert sorted(s for r in table.to_pylist() for s in r["span_ids"]) == ["s32", "s51", "s61"]
    table, skipped = build_transitions(calls_table(calls), TransitionConfig(missing_logprobs="recompute"))
    kept = {r["span_ids"][0]: r["old_logprobs"] for r in table.to_pylist() if r["episode_id"] == "e8"}
    assert kept["s81"] == pytest.approx([0, 0, 0, -0.1, -0.1, -0.1])
    assert kept["s82"][0] == 0.0 and math.isnan(kept["s82"][1]) and math.isnan(kept["s83"][1])


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="gamma"):
        TransitionConfig(gamma=0.0)
    with pytest.raises(ValueError, match="reward"):
        TransitionConfig(reward="turn")


def test_empty_input():
    table, skipped = build_transitions(calls_table([]))
    assert table.num_rows == 0 and table.schema == transitions.TRANSITION_SCHEMA and skipped == {}
    assert advantages.grpo(table)[0].num_rows == 0
    assert tuple(batch.to_batch(table, pad_token_id=0).input_ids.shape) == (0, 0)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tracetrain.trainer.tokenizer_chat import load_tokenizer

    from tests.integration.fake_upstream import build_tiny_tokenizer

    return load_tokenizer(str(build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))))


def test_retokenize_rebuilds_ids_with_unknown_logprobs(tokenizer):
    messages = [{"role": "user", "parts": [{"type": "text", "content": "what is 2+3?"}]}]
    reply = [{"role": "assistant", "parts": [{"type": "text", "content": "5"}]}]
    row = dict(CALLS[5], input_messages=json.dumps(messages), output_messages=json.dumps(reply))
    broken = dict(CALLS[5], span_id="s3x", start_time_unix_nano=11, input_messages=json.dumps(messages),
                  output_messages=json.dumps([{"role": "assistant", "parts": [{"type": "tool_call", "name": "f"}]}]))
    calls = calls_table([row, broken, CALLS[6]])
    table, skipped = build_transitions(calls, TransitionConfig(retokenize=True, tokenizer=tokenizer))
    assert skipped == {"retokenized": 1, "retokenize_failed": 1}
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "what is 2+3?"}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    response = tokenizer.encode("5", add_special_tokens=False)
    (rebuilt,) = [r for r in table.to_pylist() if r["span_ids"] == ["s31"]]
    assert rebuilt["input_ids"] == list(prompt) + list(response)
    assert rebuilt["response_mask"] == [0] * len(prompt) + [1] * len(response)
    assert all(math.isnan(x) for x in rebuilt["old_logprobs"][len(prompt):])
    # without a tokenizer the call is only counted
    _, skipped = build_transitions(calls, TransitionConfig(retokenize=True))
    assert skipped == {"no_token_ids": 2}


def test_resolve_old_logprobs_uses_detached_current_ones():
    import torch

    calls = calls_table([_call("x", "t", "a", "c", 1, [1], [2, 3], None, 1.0)])
    table, _ = build_transitions(calls, TransitionConfig(missing_logprobs="recompute"))
    out = batch.to_batch(table, pad_token_id=0)
    new = torch.tensor([[0.0, -1.0, -2.0]], requires_grad=True)
    old = batch.resolve_old_logprobs(out, new)
    assert old.tolist() == [[0.0, -1.0, -2.0]] and not old.requires_grad


def test_a_span_stored_twice_is_loaded_once():
    rows = [CALLS[0], CALLS[0], CALLS[1], dict(CALLS[1], trace_id="other")]
    kept = transitions._drop_repeated_spans(calls_table(rows))
    assert kept["span_id"].to_pylist() == ["s11", "s12", "s12"]
