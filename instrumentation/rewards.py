"""Rewards and episodes from inside an agent: ``emit_reward`` and ``episode``.

By default one trace is one episode, and ``tracetrain run`` gives a whole process
one episode id (in the resource). Agents that run many episodes in one process
open each with ``episode(task_id=...)``: a new trace whose root ``invoke_agent``
span carries the episode, task, rollout and agent attributes, which the collector
spreads to every span of the trace. ``emit_reward`` records a reward span in the
current episode.

Neither ever raises into the agent (a failure is a counted drop); without an
OpenTelemetry SDK configured both do nothing.
"""

from __future__ import annotations

import contextvars
import math
import os
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.trace import Link, Status, StatusCode

from tracetrain.instrumentation import env
from tracetrain.instrumentation import semconv as sc
from tracetrain.instrumentation.drops import record_drop

SCOPE_NAME = "tracetrain.instrumentation"
REWARD_SPAN_NAME = "reward"
_ATTRIBUTE_TYPES = (str, bool, int, float)
_tracer_provider: trace.TracerProvider | None = None  # None: the global one (tests set their own)


_stamped_providers: weakref.WeakSet = weakref.WeakSet()
_ID_KEYS = (sc.EPISODE_ID, sc.TASK_ID, sc.ROLLOUT_ID)


def _tracer() -> trace.Tracer:
    provider = _tracer_provider or trace.get_tracer_provider()
    if provider not in _stamped_providers and hasattr(provider, "add_span_processor"):  # an SDK provider
        provider.add_span_processor(EpisodeIdsSpanProcessor())
        _stamped_providers.add(provider)
    return trace.get_tracer(SCOPE_NAME, tracer_provider=provider)


class EpisodeIdsSpanProcessor(SpanProcessor):
    """Copies the open episode's ids onto every span started inside it.

    The collector also fills a span's ids from the rest of its trace, but a run-wide
    id in the resource (``tracetrain run``) would otherwise win over the episode's
    own for spans that carry none. The agent name is not copied: in a multi-agent
    episode each span's agent is found through its parents, not its episode.
    """

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        opened = _current_episode.get()
        if opened is None:
            return
        try:
            present = span.attributes or {}
            ids = opened.attributes()
            span.set_attributes({key: ids[key] for key in _ID_KEYS if key in ids and key not in present})
        except Exception as error:  # noqa: BLE001
            record_drop("episode_ids_not_stamped", error)

    def on_end(self, span: Any) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


@dataclass(frozen=True)
class Episode:
    """The episode opened by ``episode()``; ``span`` is its root span."""

    episode_id: str
    task_id: str | None = None
    rollout_id: str | None = None
    agent_name: str | None = None
    span: Any = None

    def attributes(self) -> dict[str, str]:
        attrs = {sc.EPISODE_ID: self.episode_id}
        for key, value in ((sc.TASK_ID, self.task_id), (sc.ROLLOUT_ID, self.rollout_id),
                           (sc.GEN_AI_AGENT_NAME, self.agent_name)):
            if value is not None:
                attrs[key] = value
        return attrs


_current_episode: contextvars.ContextVar[Episode | None] = contextvars.ContextVar("tracetrain_episode", default=None)


def current_episode() -> Episode | None:
    """The innermost open ``episode()`` in this context, if any."""
    return _current_episode.get()


def _start_episode(task_id: Any, episode_id: Any, rollout_id: Any, agent_name: Any) -> tuple[Episode, tuple]:
    """Open the root span and make it current; returns the episode and the tokens to undo that."""
    episode = Episode(str(episode_id) if episode_id is not None else uuid.uuid4().hex,
                      None if task_id is None else str(task_id), None if rollout_id is None else str(rollout_id),
                      None if agent_name is None else str(agent_name))
    attributes = {sc.GEN_AI_OPERATION_NAME: "invoke_agent", **episode.attributes()}
    enclosing = trace.get_current_span().get_span_context()
    # A new trace, not a child: the collector fills a trace's spans with the ids of
    # its root, so two episodes must never share a trace. Link to what enclosed it.
    links = [Link(enclosing)] if enclosing.is_valid else None
    name = f"invoke_agent {episode.agent_name}" if episode.agent_name else "invoke_agent"
    span = _tracer().start_span(name, context=otel_context.Context(), kind=trace.SpanKind.INTERNAL,
                                attributes=attributes, links=links)
    episode = Episode(episode.episode_id, episode.task_id, episode.rollout_id, episode.agent_name, span)
    tokens = (otel_context.attach(trace.set_span_in_context(span)), _current_episode.set(episode))
    return episode, tokens


@contextmanager
def episode(task_id: Any = None, episode_id: Any = None, rollout_id: Any = None,
            agent_name: str | None = None) -> Iterator[Episode | None]:
    """Run one episode: everything inside lands in one trace under its ``invoke_agent`` root.

    Args:
        task_id: the task attempted (GRPO groups rollouts by it).
        episode_id: defaults to a fresh random id.
        rollout_id: which sample of the task this is.
        agent_name: ``gen_ai.agent.name`` of the agent running it.

    Yields the Episode (None only if tracetrain itself failed; the block runs anyway).
    An exception from the block marks the root span as an error and propagates.
    """
    opened: Episode | None = None
    tokens: tuple = ()
    try:
        opened, tokens = _start_episode(task_id, episode_id, rollout_id, agent_name)
    except Exception as error:  # noqa: BLE001
        record_drop("episode_start_failed", error)
    try:
        yield opened
    except BaseException as error:
        _end_episode(opened, tokens, error)
        raise
    _end_episode(opened, tokens, None)


def _end_episode(opened: Episode | None, tokens: tuple, error: BaseException | None) -> None:
    try:
        if tokens:
            otel_context.detach(tokens[0])
            _current_episode.reset(tokens[1])
        if opened is not None and opened.span is not None:
            if error is not None:
                opened.span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
            opened.span.end()
    except Exception as failure:  # noqa: BLE001
        record_drop("episode_end_failed", failure)


def emit_reward(value: float, name: str | None = None, **attrs: Any) -> None:
    """Record a reward in the current episode, as a ``reward`` span.

    The span is a child of the current span (so it joins the current trace and
    episode); it also carries the episode id of the enclosing ``episode()``, or of
    ``tracetrain run`` (TRACETRAIN_EPISODE_ID) when there is none.

    Args:
        value: the reward; a finite number.
        name: which reward (``tests_passed``, ``user_feedback``...): ``tracetrain.reward.name``.
        **attrs: extra attributes, each stored as ``tracetrain.reward.<key>``
            (``source="grader"`` gives ``tracetrain.reward.source``).
    """
    try:
        reward = float(value)
        if not math.isfinite(reward):
            raise ValueError(f"reward must be finite, got {value!r}")
        attributes: dict[str, Any] = {sc.REWARD: reward}
        if name is not None:
            attributes[sc.REWARD_NAME] = str(name)
        for key, extra in attrs.items():
            if isinstance(extra, _ATTRIBUTE_TYPES):
                attributes[f"tracetrain.reward.{key}"] = extra
            else:
                attributes[f"tracetrain.reward.{key}"] = str(extra)
        opened = _current_episode.get()
        if opened is not None:
            attributes.update(opened.attributes())
        elif os.environ.get(env.TRACETRAIN_EPISODE_ID):
            attributes[sc.EPISODE_ID] = os.environ[env.TRACETRAIN_EPISODE_ID]
        _tracer().start_span(REWARD_SPAN_NAME, attributes=attributes).end()
    except Exception as error:  # noqa: BLE001
        record_drop("reward_not_recorded", error)
