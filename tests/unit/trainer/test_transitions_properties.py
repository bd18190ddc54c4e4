"""Properties of transitions, advantages and batches over generated multi-turn episode sets."""

from __future__ import annotations

import collections
import math

import numpy as np
import pyarrow.compute as pc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tracetrain.trainer import advantages, batch
from tracetrain.trainer.transitions import TransitionConfig, build_transitions, calls_table

AGENTS = ["a", "b", None]


def _logprob(token: int) -> float:
    """Context-free behaviour logprob of a token: merged or not, a token keeps its value."""
    return -((token * 37) % 17 + 1) / 10.0


@st.composite
def episode_sets(draw):
    """Episodes whose calls often extend an earlier call of the same agent (multi-turn)."""
    calls = []
    n_episodes = draw(st.integers(1, 7))
    for e in range(n_episodes):
        task = draw(st.sampled_from(["t0", "t1", "t2", None]))
        reward = draw(st.sampled_from([0.0, 0.5, 1.0, None]))
        last: dict = {}
        for c in range(draw(st.integers(1, 5))):
            agent = draw(st.sampled_from(AGENTS))
            tokens = st.lists(st.integers(1, 40), min_size=1, max_size=4)
            if agent in last and draw(st.booleans()):
                prompt = last[agent] + draw(st.lists(st.integers(1, 40), max_size=3))
            else:
                prompt = draw(tokens)
            response = draw(tokens)
            last[agent] = prompt + response
            calls.append(dict(episode_id=f"e{e}", task_id=task, agent_name=agent, trace_id=f"tr{e}",
                              span_id=f"e{e}c{c}", start_time_unix_nano=c, prompt_token_ids=prompt,
                              response_token_ids=response, response_logprobs=[_logprob(t) for t in response],
                              episode_reward=reward, policy_version=draw(st.sampled_from([None, 1, 2]))))
    return calls


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(episode_sets(), st.booleans())
def test_masks_line_up_with_ids_and_logprobs(calls, merge):
    table, _ = build_transitions(calls_table(calls), TransitionConfig(merge=merge))
    by_span = {c["span_id"]: c for c in calls}
    for row in table.to_pylist():
        ids, mask, old = row["input_ids"], row["response_mask"], row["old_logprobs"]
        assert len(ids) == len(mask) == len(old)
        assert all(o == 0.0 for o, m in zip(old, mask) if m == 0)
        assert sum(mask) == row["n_response_tokens"] and mask.index(1) == row["n_prompt_tokens"]
        sampled = [t for t, m in zip(ids, mask) if m]
        members = [by_span[s] for s in row["span_ids"]]
        assert sampled == [t for c in members for t in c["response_token_ids"]]
        assert [round(o, 5) for o, m in zip(old, mask) if m] == [round(_logprob(t), 5) for t in sampled]
        assert ids[:len(members[0]["prompt_token_ids"])] == members[0]["prompt_token_ids"]
        assert ids == members[-1]["prompt_token_ids"] + members[-1]["response_token_ids"]
        assert {c["episode_id"] for c in members} == {row["episode_id"]}
        assert {c["agent_name"] for c in members} == {row["agent_name"]}


def _token_terms(calls, merge):
    """Per response token (episode, id, old logprob, advantage) and a loss summed over a Batch."""
    table, _ = build_transitions(calls_table(calls), TransitionConfig(merge=merge))
    scored, _ = advantages.grpo(table)
    out = batch.to_batch(scored, pad_token_id=0)
    terms = collections.Counter()
    ids, mask = out.input_ids.numpy(), out.response_mask.numpy()
    old, adv = out.old_logprobs.numpy(), out.advantages.numpy()
    for b, episode in enumerate(out.episode_ids):
        for t in np.flatnonzero(mask[b]):
            terms[(episode, int(ids[b, t]), round(float(old[b, t]), 5), round(float(adv[b, t]), 5))] += 1
    # a "new policy" logprob that depends only on the token id: the loss must not see the layout
    new = -((ids * 37) % 17 + 1) / 10.0 + 0.01 * (ids % 3)
    loss = float((np.exp(new - old) * adv * mask).sum())
    return terms, loss, sum(len(x) for x in scored["input_ids"].to_pylist())


@SETTINGS
@given(episode_sets())
def test_merged_and_unmerged_give_the_same_token_level_loss(calls):
    merged_terms, merged_loss, merged_tokens = _token_terms(calls, merge=True)
    plain_terms, plain_loss, plain_tokens = _token_terms(calls, merge=False)
    assert merged_terms == plain_terms
    assert math.isclose(merged_loss, plain_loss, rel_tol=1e-5, abs_tol=1e-5)
    assert merged_tokens <= plain_tokens


@SETTINGS
@given(episode_sets())
def test_no_episode_leaks_into_another_group(calls):
    table, _ = build_transitions(calls_table(calls), TransitionConfig())
    scored, skipped = advantages.grpo(table)
    advantage = {}
    for row in scored.to_pylist():
        assert advantage.setdefault(row["episode_id"], row["advantage"]) == row["advantage"]  # one per episode
    tasks = {row["episode_id"]: row["task_id"] for row in table.to_pylist()}
    for task in {t for t in tasks.values() if t is not None}:
        alone, _ = advantages.grpo(table.filter(pc.equal(table["task_id"], task)))
        assert {r["episode_id"]: r["advantage"] for r in alone.to_pylist()} == {
            e: a for e, a in advantage.items() if tasks[e] == task}
        # each episode counts once, whatever its number of rows: the group's advantages sum to 0
        assert abs(sum(a for e, a in advantage.items() if tasks[e] == task)) < 1e-4
    assert not any(tasks[e] is None for e in advantage)  # a task-less episode is a group of one
    dropped = len(set(tasks)) - len(advantage)
    assert skipped.get("zero_variance_group", 0) == dropped


@SETTINGS
@given(episode_sets(), st.integers(0, 3))
def test_batch_is_the_table_padded(calls, extra):
    table, _ = build_transitions(calls_table(calls), TransitionConfig())
    scored, _ = advantages.baseline(table)
    rows = scored.to_pylist()
    longest = max((len(r["input_ids"]) for r in rows), default=0)
    out = batch.to_batch(scored, pad_token_id=-7, max_len=longest + extra)
    assert tuple(out.input_ids.shape) == (len(rows), longest + extra)
    for b, row in enumerate(rows):
        n = len(row["input_ids"])
        assert out.input_ids[b, :n].tolist() == row["input_ids"] and set(out.input_ids[b, n:].tolist()) <= {-7}
        assert out.attention_mask[b].sum().item() == n
        assert out.response_mask[b, :n].tolist() == row["response_mask"]
        assert np.allclose(out.advantages[b].numpy(), np.float32(row["advantage"]) * out.response_mask[b].numpy())
