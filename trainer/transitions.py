"""LLM calls from the span store -> token-level transitions the trainer learns from.

Two steps, both pure data work (no torch):

* ``load_calls(con, ...)``: one DuckDB query over the store's ``llm_calls`` and ``episodes``
  views (``trainer.store.connect``) into an Arrow table, one row per LLM call, with the
  episode's reward, end time and error flag. ``where`` filters episodes with user SQL;
  ``after`` is the online trainer's watermark.
* ``build_transitions(calls, cfg)``: assigns rewards, drops calls that cannot be trained on
  (each one counted under a reason), optionally re-tokenizes calls captured without ids and
  merges multi-turn calls into one sequence. Returns the transitions table of
  docs/training.md "Transitions" and a ``Counter`` of skip reasons.

Token lists are handled as flat NumPy arrays plus offsets (Arrow's list layout); the only
Python loops are per call for re-tokenization and per call for discounted per-call returns.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tracetrain.instrumentation import semconv as sc

SkipCounts = collections.Counter
"""Calls (or episodes) left out, by reason: see docs/training.md "Transitions"."""

EPISODE_END_COL = "episode_end_time_unix_nano"
EPISODE_REWARD_COL = "episode_reward"
CALL_REWARD_COL = "call_reward"
HAS_ERROR_COL = "has_error"
FINISH_REASON_COL = "finish_reason"
TRUNCATED_FINISH_REASONS = ("length", "max_tokens")

TRANSITION_SCHEMA = pa.schema([
    pa.field("episode_id", pa.string()),
    pa.field("task_id", pa.string()),
    pa.field("rollout_id", pa.string()),
    pa.field("agent_name", pa.string()),
    pa.field("trace_id", pa.string()),
    pa.field("span_ids", pa.list_(pa.string())),
    pa.field("call_index", pa.int32()),
    pa.field("n_calls", pa.int32()),
    pa.field("policy_version", pa.int64()),
    pa.field("input_ids", pa.list_(pa.int32())),
    pa.field("response_mask", pa.list_(pa.int8())),
    pa.field("old_logprobs", pa.list_(pa.float32())),
    pa.field("episode_reward", pa.float64()),
    pa.field("reward", pa.float64()),
    pa.field("advantage", pa.float32()),
    pa.field("n_prompt_tokens", pa.int32()),
    pa.field("n_response_tokens", pa.int32()),
    pa.field("calls_to_end", pa.int32()),
    pa.field("n_tokens_unmerged", pa.int64()),
])
"""Columns of a transitions table. ``calls_to_end`` (calls after the row's last call in its
episode) and ``n_tokens_unmerged`` (tokens the row's calls would forward one by one) are
extras beyond TRAINER_API.md, used by ``advantages.baseline`` and ``merge_saving``."""


# ---------------------------------------------------------------- loading


def load_calls(con: Any, *, where: str | None = None, agents: list[str] | None = None,
               episode_ids: list[str] | None = None, after: tuple[int, str] | None = None) -> pa.Table:
    """One row per LLM call of the selected episodes, ordered by (episode end, episode, call start).

    Args:
        con: a connection from ``tracetrain.trainer.store.connect``.
        where: SQL condition over the ``episodes`` view's columns (``reward > 0.5``,
            ``task_id LIKE 'calc%'``); user SQL, run as is against the read-only views.
        agents: keep only calls whose ``agent_name`` is one of these.
        episode_ids: keep only these episodes.
        after: watermark ``(episode_end_time_unix_nano, episode_id)``: only episodes that sort
            strictly after it in (end time, id) order, so an online trainer reads each once.

    Columns: episode_id, task_id, rollout_id, agent_name, trace_id, span_id,
    start_time_unix_nano, policy_version, prompt_token_ids, response_token_ids,
    response_logprobs, call_reward, episode_reward, episode_end_time_unix_nano, has_error,
    status_code, finish_reason (of the first choice), and for calls without response ids
    (re-tokenization) input_messages, output_messages, system_instructions, attributes (NULL
    on the others).
    """
    conditions, params = [], []
    if agents is not None:
        conditions.append(f"c.{sc.COL_AGENT_NAME} IN (SELECT unnest(?::VARCHAR[]))")
        params.append(list(agents))
    if episode_ids is not None:
        conditions.append(f"c.{sc.COL_EPISODE_ID} IN (SELECT unnest(?::VARCHAR[]))")
        params.append(list(episode_ids))
    if after is not None:
        end_ns, episode = after
        conditions.append(f"(e.{sc.COL_END_NS}, e.{sc.COL_EPISODE_ID}) > (?::BIGINT, ?::VARCHAR)")
        params.extend([int(end_ns), str(episode)])
    episode_filter = f"WHERE ({where})" if where else ""
    call_filter = ("WHERE " + " AND ".join(conditions)) if conditions else ""
    no_ids = f"c.{sc.COL_RESPONSE_TOKEN_IDS} IS NULL"
    finish = "'$.\"" + sc.GEN_AI_RESPONSE_FINISH_REASONS + "\"[0]'"
    sql = f"""
        SELECT c.{sc.COL_EPISODE_ID}, coalesce(c.{sc.COL_TASK_ID}, e.{sc.COL_TASK_ID}) AS {sc.COL_TASK_ID},
               coalesce(c.{sc.COL_ROLLOUT_ID}, e.{sc.COL_ROLLOUT_ID}) AS {sc.COL_ROLLOUT_ID},
               c.{sc.COL_AGENT_NAME}, c.{sc.COL_TRACE_ID}, c.{sc.COL_SPAN_ID}, c.{sc.COL_START_NS},
               c.{sc.COL_POLICY_VERSION}, c.{sc.COL_PROMPT_TOKEN_IDS}, c.{sc.COL_RESPONSE_TOKEN_IDS},
               c.{sc.COL_RESPONSE_LOGPROBS}, c.call_reward AS {CALL_REWARD_COL},
               e.{sc.COL_REWARD} AS {EPISODE_REWARD_COL}, e.{sc.COL_END_NS} AS {EPISODE_END_COL},
               e.has_error AS {HAS_ERROR_COL}, c.{sc.COL_STATUS_CODE},
               json_extract_string(c.{sc.COL_ATTRIBUTES}, {finish}) AS {FINISH_REASON_COL},
               CASE WHEN {no_ids} THEN c.{sc.COL_INPUT_MESSAGES} END AS {sc.COL_INPUT_MESSAGES},
               CASE WHEN {no_ids} THEN c.{sc.COL_OUTPUT_MESSAGES} END AS {sc.COL_OUTPUT_MESSAGES},
               CASE WHEN {no_ids} THEN c.{sc.COL_SYSTEM_INSTRUCTIONS} END AS {sc.COL_SYSTEM_INSTRUCTIONS},
               CASE WHEN {no_ids} THEN c.{sc.COL_ATTRIBUTES} END AS {sc.COL_ATTRIBUTES}
        FROM {sc.VIEW_LLM_CALLS} c
        JOIN (SELECT * FROM {sc.VIEW_EPISODES} {episode_filter}) e USING ({sc.COL_EPISODE_ID})
        {call_filter}
        ORDER BY e.{sc.COL_END_NS}, c.{sc.COL_EPISODE_ID}, c.{sc.COL_START_NS}, c.{sc.COL_SPAN_ID},
                 c.{sc.COL_TRACE_ID}"""
    return _drop_repeated_spans(con.sql(sql, params=params or None).to_arrow_table())


def _drop_repeated_spans(calls: pa.Table) -> pa.Table:
    """One row per (trace_id, span_id): a span stored twice (a client retry after a crash) sorts
    next to itself, so comparing neighbours is enough (and much cheaper than DISTINCT in SQL)."""
    if calls.num_rows < 2:
        return calls
    same = None
    for name in (sc.COL_TRACE_ID, sc.COL_SPAN_ID):
        column = calls[name].combine_chunks()
        equal = pc.fill_null(pc.equal(column[1:], column[:-1]), False)
        same = equal if same is None else pc.and_(same, equal)
    repeated = np.concatenate([[False], same.to_numpy(zero_copy_only=False)])
    return calls.filter(pa.array(~repeated)) if repeated.any() else calls


def watermark(calls: pa.Table) -> tuple[int, str] | None:
    """The ``after`` value that skips every episode of ``calls`` next time (None when empty)."""
    if calls.num_rows == 0:
        return None
    keys = calls.select([EPISODE_END_COL, sc.COL_EPISODE_ID]).drop_null()
    if keys.num_rows == 0:
        return None
    last = keys.sort_by([(EPISODE_END_COL, "descending"), (sc.COL_EPISODE_ID, "descending")]).slice(0, 1)
    return int(last[EPISODE_END_COL][0].as_py()), str(last[sc.COL_EPISODE_ID][0].as_py())


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class TransitionConfig:
    """How calls become transitions (docs/training.md "Transitions").

    reward: ``episode`` (LightningRL: the episode's reward for every call) or ``call`` (each
        call's own ``call_reward``, missing ones 0, summed into discounted returns).
    gamma: discount per call, counted back from the episode's last call (1.0: none).
    max_len: drop calls whose prompt + response is longer (``too_long``); None: no limit.
    agents: train only these agents' calls (others: ``agent_not_selected``); None: all.
    current_version / max_staleness: drop calls whose policy_version lags the current one by
        more than ``max_staleness`` versions (``stale_policy``); calls without a version stay.
    drop_error_episodes: drop calls of episodes with an error span (``error_episode``).
    drop_truncated: drop calls whose response hit the token limit (finish reason ``length``):
        ``truncated``.
    missing_logprobs: ``skip`` calls with ids but no logprobs (``no_logprobs``), or ``recompute``:
        keep them with NaN old logprobs (the loss then uses the current policy's, detached).
    retokenize: rebuild ids of calls captured without them from their messages (needs
        ``tokenizer``); their old logprobs are NaN as above.
    merge: merge consecutive calls of one agent in one episode into one sequence when the
        later prompt extends the earlier prompt + response and their rewards are equal.
    """

    reward: Literal["episode", "call"] = "episode"
    gamma: float = 1.0
    max_len: int | None = None
    agents: tuple[str, ...] | None = None
    current_version: int | None = None
    max_staleness: int | None = None
    drop_error_episodes: bool = False
    drop_truncated: bool = False
    missing_logprobs: Literal["skip", "recompute"] = "skip"
    retokenize: bool = False
    tokenizer: Any = None
    template_kwargs: tuple[tuple[str, Any], ...] = ()
    merge: bool = True

    def __post_init__(self) -> None:
        if self.reward not in ("episode", "call"):
            raise ValueError(f"reward must be 'episode' or 'call', not {self.reward!r}")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], not {self.gamma}")
        if self.missing_logprobs not in ("skip", "recompute"):
            raise ValueError(f"missing_logprobs must be 'skip' or 'recompute', not {self.missing_logprobs!r}")


# ---------------------------------------------------------------- list helpers


_LIST_TYPES = {  # the store's types of the token lists
    sc.COL_PROMPT_TOKEN_IDS: pa.list_(pa.int64()), sc.COL_RESPONSE_TOKEN_IDS: pa.list_(pa.int64()),
    sc.COL_RESPONSE_LOGPROBS: pa.list_(pa.float64())}


def _lengths(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Per-row list length, 0 for NULL lists (int64)."""
    return pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False).astype(np.int64)


def _flat(column: pa.ChunkedArray | pa.Array, dtype: Any) -> np.ndarray:
    """All list values in row order (NULL lists contribute nothing)."""
    values = pc.list_flatten(column)
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    return values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _spread(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """starts[i], starts[i]+1, ... (lengths[i] of them) for every i, concatenated."""
    shift = np.repeat(starts - _offsets(lengths)[:-1], lengths)
    shift += np.arange(len(shift), dtype=np.int64)
    return shift


def _list_array(values: np.ndarray, lengths: np.ndarray, value_type: pa.DataType) -> pa.Array:
    offsets = _offsets(lengths)
    if offsets[-1] >= 2**31:  # list<...> has int32 offsets: build transitions in smaller pieces
        raise ValueError(f"{offsets[-1]} tokens in one transitions table; load fewer episodes at a time")
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, value_type))


def _np(column: pa.ChunkedArray, fill: Any, dtype: Any) -> np.ndarray:
    return pc.fill_null(column, fill).to_numpy(zero_copy_only=False).astype(dtype, copy=False)


# ---------------------------------------------------------------- rewards and filters


def _episode_positions(episodes: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For rows sorted by episode: (episode number, index within episode, calls in episode)."""
    n = len(episodes)
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    values = episodes.combine_chunks() if isinstance(episodes, pa.ChunkedArray) else episodes
    new = np.ones(n, dtype=bool)
    if n > 1:
        new[1:] = pc.fill_null(pc.not_equal(values[1:], values[:-1]), True).to_numpy(zero_copy_only=False)
    episode = np.cumsum(new) - 1
    starts = np.flatnonzero(new)
    index = np.arange(n) - starts[episode]
    counts = np.diff(np.append(starts, n))
    return episode, index, counts[episode]


def _assign_rewards(calls: pa.Table, cfg: TransitionConfig, episode: np.ndarray, index: np.ndarray,
                    size: np.ndarray) -> np.ndarray:
    """Reward of each call (NaN: none), rows sorted by episode then call order."""
    to_end = (size - 1 - index).astype(np.float64)
    if cfg.reward == "episode":
        episode_reward = _np(calls[EPISODE_REWARD_COL], np.nan, np.float64)
        return episode_reward * np.power(cfg.gamma, to_end)
    call_reward = _np(calls[CALL_REWARD_COL], np.nan, np.float64)
    has = ~np.isnan(call_reward)
    any_in_episode = np.zeros(int(episode.max()) + 1 if len(episode) else 0, dtype=bool)
    np.logical_or.at(any_in_episode, episode, has)
    step = np.where(has, call_reward, 0.0)
    returns = np.empty_like(step)
    running, last_episode = 0.0, -1
    for i in range(len(step) - 1, -1, -1):  # one pass per call, not per token
        if episode[i] != last_episode:
            running, last_episode = 0.0, episode[i]
        running = step[i] + cfg.gamma * running
        returns[i] = running
    returns[~any_in_episode[episode]] = np.nan
    return returns


def _list_shapes(calls: pa.Table, order: np.ndarray) -> dict[str, np.ndarray]:
    """Lengths of the id/logprob lists (and NULL prompts), in ``order``."""
    return {"prompt": _lengths(calls[sc.COL_PROMPT_TOKEN_IDS])[order],
            "response": _lengths(calls[sc.COL_RESPONSE_TOKEN_IDS])[order],
            "logprobs": _lengths(calls[sc.COL_RESPONSE_LOGPROBS])[order],
            "prompt_null": calls[sc.COL_PROMPT_TOKEN_IDS].is_null().to_numpy(zero_copy_only=False)[order]}


def _skip_reasons(head: pa.Table, shapes: dict[str, np.ndarray], cfg: TransitionConfig,
                  reward: np.ndarray) -> np.ndarray:
    """Reason code per call ('' = keep, 'retokenize', 'nan_logprobs' = keep after patching)."""
    reason = np.full(head.num_rows, "", dtype=object)

    def mark(mask: np.ndarray, why: str) -> None:
        reason[(reason == "") & mask] = why

    if cfg.agents is not None:
        mark(~pc.fill_null(pc.is_in(head[sc.COL_AGENT_NAME], pa.array(list(cfg.agents), pa.string())),
                           False).to_numpy(zero_copy_only=False), "agent_not_selected")
    if cfg.drop_error_episodes:
        mark(_np(head[HAS_ERROR_COL], False, bool), "error_episode")
    mark(np.isnan(reward), "no_reward")
    if cfg.drop_truncated and FINISH_REASON_COL in head.column_names:
        mark(pc.fill_null(pc.is_in(head[FINISH_REASON_COL], pa.array(TRUNCATED_FINISH_REASONS)), False)
             .to_numpy(zero_copy_only=False), "truncated")
    if cfg.current_version is not None and cfg.max_staleness is not None:
        version = _np(head[sc.COL_POLICY_VERSION], cfg.current_version, np.int64)
        mark(cfg.current_version - version > cfg.max_staleness, "stale_policy")
    no_ids = (shapes["response"] == 0) | shapes["prompt_null"]
    can_retokenize = cfg.retokenize and cfg.tokenizer is not None
    mark(no_ids, "retokenize" if can_retokenize else "no_token_ids")
    if cfg.max_len is not None:
        mark(shapes["prompt"] + shapes["response"] > cfg.max_len, "too_long")
    mark(shapes["logprobs"] != shapes["response"], "nan_logprobs" if cfg.missing_logprobs == "recompute"
         else "no_logprobs")
    return reason


# ---------------------------------------------------------------- re-tokenization and patching


def _retokenize(row: dict[str, Any], cfg: TransitionConfig) -> tuple[list[int], list[int]] | None:
    """(prompt ids, response ids) rebuilt from the call's messages, or None."""
    from tracetrain.trainer import tokenizer_chat as chat_io

    chat = chat_io.chat_messages(row.get(sc.COL_INPUT_MESSAGES), row.get(sc.COL_SYSTEM_INSTRUCTIONS))
    text, _why = chat_io.output_text(row.get(sc.COL_OUTPUT_MESSAGES))
    if not chat or not text:
        return None
    try:
        prompt = chat_io.render_prompt_ids(cfg.tokenizer, chat, chat_io.tool_definitions(row.get(sc.COL_ATTRIBUTES)),
                                           dict(cfg.template_kwargs))
        response = [int(i) for i in cfg.tokenizer.encode(text, add_special_tokens=False)]
    except Exception:  # a template or tokenizer that cannot render this chat: count it, go on
        return None
    return (prompt, response) if response else None


def _patched_rows(calls: pa.Table, order: np.ndarray, reason: np.ndarray, cfg: TransitionConfig,
                  counts: collections.Counter) -> tuple[pa.Table, np.ndarray]:
    """Id/logprob lists of the calls kept after re-tokenization or with unknown logprobs (NaN).

    Returns a table of the three list columns and the sorted positions of its rows.
    """
    wanted = np.flatnonzero((reason == "retokenize") | (reason == "nan_logprobs"))
    lists: dict[str, list] = {name: [] for name in _LIST_TYPES}
    kept = []
    for i in wanted:
        row = calls.slice(int(order[i]), 1).to_pylist()[0]
        if reason[i] == "retokenize":
            ids = _retokenize(row, cfg)
            if ids is None:
                counts["retokenize_failed"] += 1
                continue
            if cfg.max_len is not None and len(ids[0]) + len(ids[1]) > cfg.max_len:
                counts["too_long"] += 1
                continue
            counts["retokenized"] += 1
            prompt, response = ids
        else:
            prompt, response = row[sc.COL_PROMPT_TOKEN_IDS], row[sc.COL_RESPONSE_TOKEN_IDS]
        for name, values in zip(_LIST_TYPES, (prompt, response, [math.nan] * len(response))):
            lists[name].append(values)
        kept.append(int(i))
    table = pa.table({name: pa.array(values, _LIST_TYPES[name]) for name, values in lists.items()})
    return table, np.asarray(kept, dtype=np.int64)


# ---------------------------------------------------------------- building


def _normalize(calls: pa.Table) -> pa.Table:
    """Same list types whatever produced ``calls`` (DuckDB, a test, an all-NULL column)."""
    for name, kind in _LIST_TYPES.items():
        index = calls.schema.get_field_index(name)
        if calls.schema.field(name).type != kind:
            calls = calls.set_column(index, name, calls[name].cast(kind))
    return calls


def build_transitions(calls: pa.Table, cfg: TransitionConfig | None = None) -> tuple[pa.Table, collections.Counter]:
    """The transitions table (``TRANSITION_SCHEMA``) of ``calls`` and the calls left out, by reason.

    ``calls`` has the columns of ``load_calls``. Rows come out ordered by episode, agent and
    call order; ``advantage`` is NaN until ``advantages.grpo`` / ``baseline`` fill it.
    """
    cfg = cfg or TransitionConfig()
    counts: collections.Counter = collections.Counter()
    if calls.num_rows == 0:
        return TRANSITION_SCHEMA.empty_table(), counts
    calls = _normalize(calls)
    # sort scalars only; the token lists are gathered once, in their final order, at the end
    order = pc.sort_indices(calls, sort_keys=[(sc.COL_EPISODE_ID, "ascending"), (sc.COL_START_NS, "ascending"),
                                              (sc.COL_SPAN_ID, "ascending")]).to_numpy().astype(np.int64)
    head = calls.drop_columns(list(_LIST_TYPES)).take(order)
    episode, index, size = _episode_positions(head[sc.COL_EPISODE_ID])
    reward = _assign_rewards(head, cfg, episode, index, size)
    head = (head.append_column("_reward", pa.array(reward, pa.float64()))
            .append_column("_call_index", pa.array(index, pa.int32()))
            .append_column("_calls_to_end", pa.array(size - 1 - index, pa.int32())))
    reason = _skip_reasons(head, _list_shapes(calls, order), cfg, reward)
    for why, count in collections.Counter(reason[(reason != "") & (reason != "retokenize")
                                                 & (reason != "nan_logprobs")]).items():
        counts[why] += count
    patched, patched_at = _patched_rows(calls, order, reason, cfg, counts)
    good = np.flatnonzero(reason == "")
    if len(good) + len(patched_at) == 0:
        return TRANSITION_SCHEMA.empty_table(), counts
    kept = head.take(pa.array(np.concatenate([good, patched_at])))
    source = np.concatenate([order[good], calls.num_rows + np.arange(len(patched_at))])
    final = pc.sort_indices(kept, sort_keys=[(sc.COL_EPISODE_ID, "ascending"), (sc.COL_AGENT_NAME, "ascending"),
                                             ("_call_index", "ascending")]).to_numpy().astype(np.int64)
    kept = kept.take(pa.array(final))
    token_lists = pa.concat_tables([calls.select(list(_LIST_TYPES)), patched]).take(pa.array(source[final]))
    for name in _LIST_TYPES:
        kept = kept.append_column(name, token_lists[name])
    return _assemble(kept, cfg.merge), counts


def _sequences(kept: pa.Table) -> dict[str, np.ndarray]:
    """Flat prompt+response ids of every call, with lengths and offsets."""
    p_len, r_len = _lengths(kept[sc.COL_PROMPT_TOKEN_IDS]), _lengths(kept[sc.COL_RESPONSE_TOKEN_IDS])
    s_len = p_len + r_len
    s_off = _offsets(s_len)
    seq = np.empty(int(s_off[-1]), dtype=np.int32)
    seq[_spread(s_off[:-1], p_len)] = _flat(kept[sc.COL_PROMPT_TOKEN_IDS], np.int32)
    seq[_spread(s_off[:-1] + p_len, r_len)] = _flat(kept[sc.COL_RESPONSE_TOKEN_IDS], np.int32)
    return {"p_len": p_len, "r_len": r_len, "s_len": s_len, "s_off": s_off, "seq": seq,
            "logprobs": _flat(kept[sc.COL_RESPONSE_LOGPROBS], np.float32)}


def _mergeable(kept: pa.Table, s: dict[str, np.ndarray]) -> np.ndarray:
    """ok[i]: call i+1 continues call i (same episode, agent and reward; its prompt starts
    with call i's prompt + response)."""
    n = kept.num_rows
    ok = np.zeros(max(n - 1, 0), dtype=bool)
    if n < 2:
        return ok
    episodes = kept[sc.COL_EPISODE_ID].combine_chunks()
    agents = pc.fill_null(kept[sc.COL_AGENT_NAME], "\x00").combine_chunks()
    reward = kept["_reward"].to_numpy()
    same = (pc.equal(episodes[1:], episodes[:-1]).to_numpy(zero_copy_only=False)
            & pc.equal(agents[1:], agents[:-1]).to_numpy(zero_copy_only=False)
            & (reward[1:] == reward[:-1]) & (s["p_len"][1:] >= s["s_len"][:-1]))
    candidates = np.flatnonzero(same)
    if candidates.size == 0:
        return ok
    length = s["s_len"][candidates]  # > 0: every kept call has response ids
    earlier = _spread(s["s_off"][candidates], length)
    later = _spread(s["s_off"][candidates + 1], length)
    mismatches = np.add.reduceat((s["seq"][earlier] != s["seq"][later]).astype(np.int64),
                                 _offsets(length)[:-1])
    ok[candidates] = mismatches == 0
    return ok


def _assemble(kept: pa.Table, merge: bool) -> pa.Table:
    """One row per chain of merged calls (a chain of one call when not merged)."""
    n = kept.num_rows
    s = _sequences(kept)
    starts = np.ones(n, dtype=bool)
    if merge:
        starts[1:] = ~_mergeable(kept, s)
    chain = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    last = np.append(first[1:] - 1, n - 1)
    # each call's sequence is a prefix of the next one in its chain: the row is the last call's
    row_len = s["s_len"][last]
    row_off = _offsets(row_len)
    input_ids = s["seq"][_spread(s["s_off"][last], row_len)]
    response_mask = np.zeros(len(input_ids), dtype=np.int8)
    old_logprobs = np.zeros(len(input_ids), dtype=np.float32)
    targets = _spread(row_off[chain] + s["p_len"], s["r_len"])
    response_mask[targets] = 1
    old_logprobs[targets] = s["logprobs"]

    version = kept[sc.COL_POLICY_VERSION]
    has_version = np.logical_or.reduceat(version.is_valid().to_numpy(zero_copy_only=False), first)
    min_version = np.minimum.reduceat(_np(version, np.iinfo(np.int64).max, np.int64), first)
    take_first = pa.array(first, pa.int64())
    head = kept.select([sc.COL_EPISODE_ID, sc.COL_TASK_ID, sc.COL_ROLLOUT_ID, sc.COL_AGENT_NAME, sc.COL_TRACE_ID,
                        "_call_index", EPISODE_REWARD_COL, "_reward"]).take(take_first)  # no token lists
    columns = {
        "episode_id": head[sc.COL_EPISODE_ID], "task_id": head[sc.COL_TASK_ID],
        "rollout_id": head[sc.COL_ROLLOUT_ID], "agent_name": head[sc.COL_AGENT_NAME],
        "trace_id": head[sc.COL_TRACE_ID],
        "span_ids": pa.ListArray.from_arrays(pa.array(np.append(first, n).astype(np.int32)),
                                             kept[sc.COL_SPAN_ID].combine_chunks()),
        "call_index": head["_call_index"],
        "n_calls": pa.array(np.diff(np.append(first, n)), pa.int32()),
        "policy_version": pa.array(min_version, pa.int64(), mask=~has_version),
        "input_ids": _list_array(input_ids, row_len, pa.int32()),
        "response_mask": _list_array(response_mask, row_len, pa.int8()),
        "old_logprobs": _list_array(old_logprobs, row_len, pa.float32()),
        "episode_reward": head[EPISODE_REWARD_COL].cast(pa.float64()),
        "reward": head["_reward"],
        "advantage": pa.array(np.full(len(first), np.nan, dtype=np.float32)),
        "n_prompt_tokens": pa.array(s["p_len"][first], pa.int32()),
        "n_response_tokens": pa.array(np.add.reduceat(s["r_len"], first), pa.int32()),
        "calls_to_end": kept["_calls_to_end"].take(pa.array(last, pa.int64())),
        "n_tokens_unmerged": pa.array(np.add.reduceat(s["s_len"], first), pa.int64()),
    }
    return pa.table([columns[f.name] for f in TRANSITION_SCHEMA], schema=TRANSITION_SCHEMA)


def merge_saving(transitions: pa.Table) -> dict[str, float]:
    """Tokens a forward pass sees with the rows as built vs one sequence per call."""
    merged = int(pc.sum(pc.list_value_length(transitions["input_ids"])).as_py() or 0)
    unmerged = int(pc.sum(transitions["n_tokens_unmerged"]).as_py() or 0)
    return {"tokens_forwarded": merged, "tokens_forwarded_unmerged": unmerged,
            "saving": (1.0 - merged / unmerged) if unmerged else 0.0}


CALLS_SCHEMA = pa.schema([
    pa.field(sc.COL_EPISODE_ID, pa.string()), pa.field(sc.COL_TASK_ID, pa.string()),
    pa.field(sc.COL_ROLLOUT_ID, pa.string()), pa.field(sc.COL_AGENT_NAME, pa.string()),
    pa.field(sc.COL_TRACE_ID, pa.string()), pa.field(sc.COL_SPAN_ID, pa.string()),
    pa.field(sc.COL_START_NS, pa.int64()), pa.field(sc.COL_POLICY_VERSION, pa.int64()),
    *(pa.field(name, kind) for name, kind in _LIST_TYPES.items()),
    pa.field(CALL_REWARD_COL, pa.float64()), pa.field(EPISODE_REWARD_COL, pa.float64()),
    pa.field(EPISODE_END_COL, pa.int64()), pa.field(HAS_ERROR_COL, pa.bool_()),
    pa.field(sc.COL_STATUS_CODE, pa.int8()), pa.field(FINISH_REASON_COL, pa.string()),
    pa.field(sc.COL_INPUT_MESSAGES, pa.string()),
    pa.field(sc.COL_OUTPUT_MESSAGES, pa.string()), pa.field(sc.COL_SYSTEM_INSTRUCTIONS, pa.string()),
    pa.field(sc.COL_ATTRIBUTES, pa.string()),
])
"""Columns of ``load_calls`` (the store's types)."""


def calls_table(rows: list[dict[str, Any]]) -> pa.Table:
    """A ``load_calls``-shaped table from dicts (missing keys NULL): for tests and rollouts
    that hold calls in memory."""
    return pa.Table.from_pylist([{f.name: row.get(f.name) for f in CALLS_SCHEMA} for row in rows], CALLS_SCHEMA)
