"""One episode as a reward function sees it, loaded from the span store's views.

``load_episodes(con, episode_ids)`` reads ``episodes``, ``llm_calls`` and ``spans``
(through ``tracetrain.trainer.store.connect``, never the collector) and returns one
``Episode`` per id: its LLM calls with messages in OpenAI chat shape, the final
answer text, its tool spans and which of them failed, the rewards already emitted
(inline and delayed), and the merged attributes of its spans. Three queries for any
number of episodes; duplicate span rows (at-least-once delivery) count once.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import duckdb
from tracetrain.instrumentation import semconv as sc
from tracetrain.trainer.store import retry_listing
from tracetrain.trainer.tokenizer_chat import otel_message_to_chat

STATUS_ERROR = 2
TOOL_OPERATION = "execute_tool"
ERROR_TYPE_KEY = "error.type"
TOOL_CALL_RESULT_KEY = "gen_ai.tool.call.result"
TOOL_CALL_ARGUMENTS_KEY = "gen_ai.tool.call.arguments"


@dataclass(frozen=True)
class LlmCall:
    """One LLM call of the episode (a row of ``llm_calls``), messages as OpenAI chat dicts."""

    trace_id: str
    span_id: str
    start_time_unix_nano: int
    model: str | None
    messages: list[dict[str, Any]]          # the prompt: [{"role", "content", ...}]
    output_messages: list[dict[str, Any]]   # one per choice
    status_code: int | None
    policy_version: int | None
    call_reward: float | None

    @property
    def output_text(self) -> str | None:
        """Text of the first choice (None when the call returned no text)."""
        if not self.output_messages:
            return None
        content = self.output_messages[0].get("content")
        return content if isinstance(content, str) and content != "" else None

    @property
    def system_prompt(self) -> str | None:
        """Content of the first system message sent, if any."""
        for message in self.messages:
            if message.get("role") in ("system", "developer"):
                return message.get("content") if isinstance(message.get("content"), str) else None
        return None


@dataclass(frozen=True)
class ToolSpan:
    """A tool execution span (``gen_ai.operation.name = execute_tool`` or carrying ``gen_ai.tool.name``)."""

    trace_id: str
    span_id: str
    name: str
    tool_name: str | None
    status_code: int | None
    status_message: str | None
    attributes: dict[str, Any]

    @property
    def error(self) -> bool:
        """The tool failed: status ERROR, or an ``error.type`` attribute (OTel's error convention)."""
        return self.status_code == STATUS_ERROR or bool(self.attributes.get(ERROR_TYPE_KEY))


@dataclass(frozen=True)
class EmittedReward:
    """A reward already in the store: an inline ``emit_reward`` span or a delayed one."""

    value: float
    name: str | None
    delayed: bool
    time_unix_nano: int | None


@dataclass(frozen=True)
class Episode:
    """What a reward function gets: one episode, read from the span tables."""

    episode_id: str
    task_id: str | None
    rollout_id: str | None
    agent_name: str | None
    reward: float | None                    # the episodes view's reward (latest emitted)
    has_error: bool
    llm_calls: list[LlmCall] = field(default_factory=list)
    tool_spans: list[ToolSpan] = field(default_factory=list)
    rewards: list[EmittedReward] = field(default_factory=list)
    attributes: dict[str, Any] = field(default_factory=dict)  # every span's attributes, earliest wins

    @property
    def final_answer(self) -> str | None:
        """The text of the last LLM call that returned text (the agent's answer)."""
        for call in reversed(self.llm_calls):
            if call.output_text is not None:
                return call.output_text
        return None

    @property
    def system_prompt(self) -> str | None:
        """The system prompt of the episode's first LLM call that had one."""
        return next((call.system_prompt for call in self.llm_calls if call.system_prompt is not None), None)

    @property
    def tool_errors(self) -> list[ToolSpan]:
        return [span for span in self.tool_spans if span.error]


def _json(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return None


def chat_messages(raw: Any) -> list[dict[str, Any]]:
    """OTel ``{role, parts}`` or OpenAI ``{role, content}`` messages (JSON text or parsed) as chat dicts."""
    messages = _json(raw)
    if not isinstance(messages, list):
        return []
    out = []
    for message in messages:
        if not isinstance(message, dict):
            continue
        if "parts" in message:
            out.append(otel_message_to_chat(message))
        else:  # stored as sent, OpenAI-shaped
            content = message.get("content")
            if isinstance(content, list):  # content parts: keep the text ones
                content = "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
            out.append({**message, "role": message.get("role", "user"), "content": content or ""})
    return out


def _system_instructions(raw: Any) -> str | None:
    value = _json(raw)
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(str(p.get("content", "")) for p in value if isinstance(p, dict)) or None
    return None


def _query(con: duckdb.DuckDBPyConnection, sql: str, params: list) -> list[dict[str, Any]]:
    def run() -> list[dict[str, Any]]:
        cursor = con.execute(sql, params)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]
    return retry_listing(run)


def episode_ids_in_store(con: duckdb.DuckDBPyConnection, where: str | None = None) -> list[str]:
    """Every episode id of the ``episodes`` view (optionally filtered by a SQL condition), oldest first."""
    condition = f"WHERE {where}" if where else ""
    rows = _query(con, f"SELECT {sc.COL_EPISODE_ID} FROM {sc.VIEW_EPISODES} {condition} "
                       f"ORDER BY {sc.COL_START_NS}, {sc.COL_EPISODE_ID}", [])
    return [row[sc.COL_EPISODE_ID] for row in rows]


def load_episodes(con: duckdb.DuckDBPyConnection, episode_ids: Sequence[str] | None = None) -> list[Episode]:
    """The episodes ``episode_ids`` (default: all), in that order; unknown ids are left out.

    Args:
        con: a connection from ``tracetrain.trainer.store.connect``.
        episode_ids: which episodes; None for every episode in the store.
    """
    ids = list(episode_ids) if episode_ids is not None else episode_ids_in_store(con)
    if not ids:
        return []
    heads = _query(con, f"SELECT * FROM {sc.VIEW_EPISODES} WHERE {sc.COL_EPISODE_ID} IN (SELECT unnest(?))", [ids])
    by_id = {row[sc.COL_EPISODE_ID]: row for row in heads}
    calls = _load_calls(con, list(by_id))
    trace_episode = {trace: ep for ep, row in by_id.items() for trace in row.get("trace_ids") or ()}
    spans = _load_spans(con, list(by_id), list(trace_episode))
    tools: dict[str, list[ToolSpan]] = {}
    rewards: dict[str, list[EmittedReward]] = {}
    attributes: dict[str, dict[str, Any]] = {}
    for span in spans:
        # a span's own episode id wins over its trace's (two episodes may share a trace)
        episode = span[sc.COL_EPISODE_ID] or trace_episode.get(span[sc.COL_TRACE_ID])
        if episode not in by_id:
            continue
        attrs = _json(span[sc.COL_ATTRIBUTES]) or {}
        merged = attributes.setdefault(episode, {})
        for key, value in attrs.items():
            merged.setdefault(key, value)
        if span[sc.COL_REWARD] is not None:
            rewards.setdefault(episode, []).append(EmittedReward(
                float(span[sc.COL_REWARD]), attrs.get(sc.REWARD_NAME),
                span[sc.COL_SCOPE_NAME] == sc.FEEDBACK_SCOPE_NAME, span[sc.COL_END_NS]))
        if span[sc.COL_OPERATION] == TOOL_OPERATION or sc.GEN_AI_TOOL_NAME in attrs:
            tools.setdefault(episode, []).append(ToolSpan(
                span[sc.COL_TRACE_ID], span[sc.COL_SPAN_ID], span[sc.COL_NAME], attrs.get(sc.GEN_AI_TOOL_NAME),
                span[sc.COL_STATUS_CODE], span[sc.COL_STATUS_MESSAGE], attrs))
    return [Episode(
        episode_id=ep, task_id=by_id[ep][sc.COL_TASK_ID], rollout_id=by_id[ep][sc.COL_ROLLOUT_ID],
        agent_name=by_id[ep][sc.COL_AGENT_NAME], reward=by_id[ep][sc.COL_REWARD],
        has_error=bool(by_id[ep]["has_error"]), llm_calls=calls.get(ep, []), tool_spans=tools.get(ep, []),
        rewards=rewards.get(ep, []), attributes=attributes.get(ep, {})) for ep in ids if ep in by_id]


def _load_calls(con: duckdb.DuckDBPyConnection, ids: list[str]) -> dict[str, list[LlmCall]]:
    rows = _query(con, f"""
        SELECT DISTINCT ON ({sc.COL_TRACE_ID}, {sc.COL_SPAN_ID}) *
        FROM {sc.VIEW_LLM_CALLS} WHERE {sc.COL_EPISODE_ID} IN (SELECT unnest(?))
        ORDER BY {sc.COL_TRACE_ID}, {sc.COL_SPAN_ID}""", [ids])
    rows.sort(key=lambda r: (r[sc.COL_START_NS] or 0, r[sc.COL_SPAN_ID]))
    calls: dict[str, list[LlmCall]] = {}
    for row in rows:
        messages = chat_messages(row[sc.COL_INPUT_MESSAGES])
        system = _system_instructions(row[sc.COL_SYSTEM_INSTRUCTIONS])
        if system and not any(m.get("role") == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": system})
        calls.setdefault(row[sc.COL_EPISODE_ID], []).append(LlmCall(
            row[sc.COL_TRACE_ID], row[sc.COL_SPAN_ID], row[sc.COL_START_NS], row["model"], messages,
            chat_messages(row[sc.COL_OUTPUT_MESSAGES]), row[sc.COL_STATUS_CODE], row[sc.COL_POLICY_VERSION],
            row["call_reward"]))
    return calls


def _load_spans(con: duckdb.DuckDBPyConnection, ids: list[str], trace_ids: list[str]) -> list[dict[str, Any]]:
    """Spans of the episodes' traces plus reward spans naming them (delayed rewards live in their own trace)."""
    columns = ", ".join((sc.COL_TRACE_ID, sc.COL_SPAN_ID, sc.COL_NAME, sc.COL_START_NS, sc.COL_END_NS,
                         sc.COL_STATUS_CODE, sc.COL_STATUS_MESSAGE, sc.COL_SCOPE_NAME, sc.COL_ATTRIBUTES,
                         sc.COL_OPERATION, sc.COL_REWARD, sc.COL_EPISODE_ID))
    rows = _query(con, f"""
        SELECT DISTINCT ON ({sc.COL_TRACE_ID}, {sc.COL_SPAN_ID}) {columns} FROM {sc.TABLE_SPANS}
        WHERE {sc.COL_TRACE_ID} IN (SELECT unnest(?)) OR {sc.COL_EPISODE_ID} IN (SELECT unnest(?))
        ORDER BY {sc.COL_TRACE_ID}, {sc.COL_SPAN_ID}""", [trace_ids, ids])
    rows.sort(key=lambda r: (r[sc.COL_START_NS] or 0, r[sc.COL_SPAN_ID]))
    return rows
