"""Rewards computed from spans: a function (or SQL) over episodes, besides the ones agents emit.

A reward function is either

* a Python callable ``fn(episode: Episode) -> float | None`` (None: no reward for that
  episode), given an ``episode_view.Episode`` read from the store, or
* SQL over the store's views returning ``(episode_id, reward)`` rows.

``compute_rewards(con, fn_or_sql, episode_ids)`` applies one and returns
``{episode_id: reward}``. Built-ins: ``final_answer_verifier``, ``tool_error_penalty``,
``llm_judge`` (an OpenAI-compatible endpoint), and ``combine`` to add them up.
``resolve_reward_fn("module:function" | "sql:SELECT ...")`` gives the training loop
a ``callable(con, episode_ids) -> dict``; ``reward_post.post_rewards`` stores the
results as delayed rewards through the collector, so every reader sees them.
"""

from __future__ import annotations

import decimal
import importlib
import importlib.util
import math
import numbers
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
from tracetrain.trainer.episode_view import Episode, episode_ids_in_store, load_episodes
from tracetrain.trainer.openai_chat import ChatError, chat_completion
from tracetrain.trainer.store import retry_listing

EpisodeRewardFn = Callable[[Episode], float | None]
BatchRewardFn = Callable[[duckdb.DuckDBPyConnection, Sequence[str] | None], dict[str, float]]
SQL_PREFIX = "sql:"

__all__ = [
    "Episode",
    "JudgeOutputError",
    "RewardError",
    "RewardReport",
    "combine",
    "compute_rewards",
    "final_answer_verifier",
    "llm_judge",
    "resolve_reward_fn",
    "score_episodes",
    "tool_error_penalty",
]


class RewardError(ValueError):
    """A reward function or query is unusable, or gave something that is not a finite number."""


class JudgeOutputError(RewardError):
    """The judge answered without a readable score."""


@dataclass
class RewardReport:
    """What ``score_episodes`` did: rewards, episodes with no reward, failures, and ids not in the store."""

    rewards: dict[str, float] = field(default_factory=dict)
    no_reward: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


def _finite(value: Any, where: str) -> float:
    # numbers.Real covers NumPy scalars; SQL DECIMAL arrives as decimal.Decimal
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, decimal.Decimal)) \
            or not math.isfinite(float(value)):
        raise RewardError(f"{where} gave {value!r}; a reward must be a finite number (or None for no reward)")
    return float(value)


def is_sql(spec: Any) -> bool:
    return isinstance(spec, str) and (spec.startswith(SQL_PREFIX) or
                                      re.match(r"\s*(select|with)\b", spec, re.IGNORECASE) is not None)


def score_episodes(con: duckdb.DuckDBPyConnection, fn_or_sql: EpisodeRewardFn | str,
                   episode_ids: Sequence[str] | None = None, on_error: str = "raise",
                   workers: int = 1, chunk_episodes: int = 500,
                   on_progress: Callable[[int], None] | None = None) -> RewardReport:
    """Apply a reward function or SQL to episodes; ``on_error="skip"`` records failures instead of raising.

    Args:
        con: a connection from ``tracetrain.trainer.store.connect``.
        fn_or_sql: ``fn(Episode) -> float | None``, or SQL (optionally ``sql:``-prefixed).
        episode_ids: which episodes; None for all.
        on_error: ``raise`` (first failure raises) or ``skip`` (failures land in ``errors``).
        workers: threads calling ``fn`` (useful for an LLM judge; 1 for plain functions).
        chunk_episodes: episodes loaded from the store at a time (bounds memory on big stores).
        on_progress: called with the number of episodes just scored (progress bars).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    report = RewardReport()
    if is_sql(fn_or_sql):
        report.rewards = _sql_rewards(con, str(fn_or_sql), episode_ids)
        wanted = episode_ids if episode_ids is not None else episode_ids_in_store(con)
        report.no_reward = [e for e in wanted if e not in report.rewards]
        return report
    if not callable(fn_or_sql):
        raise RewardError(f"a reward function must be callable or SQL, got {fn_or_sql!r}")
    ids = list(episode_ids) if episode_ids is not None else episode_ids_in_store(con)

    def one(episode: Episode) -> tuple[str, float | None, str | None]:
        try:
            value = fn_or_sql(episode)
            return episode.episode_id, None if value is None else _finite(value, _name(fn_or_sql)), None
        except Exception as exc:  # skip mode counts any failure of the user's function
            if on_error == "raise":
                raise
            message = str(exc) if isinstance(exc, (RewardError, ChatError)) else f"{type(exc).__name__}: {exc}"
            return episode.episode_id, None, message

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for start in range(0, len(ids), chunk_episodes):
            chunk = ids[start:start + chunk_episodes]
            episodes = load_episodes(con, chunk)
            found = {e.episode_id for e in episodes}
            report.missing += [e for e in chunk if e not in found]
            for episode_id, value, error in pool.map(one, episodes):
                if error is not None:
                    report.errors[episode_id] = error
                elif value is None:
                    report.no_reward.append(episode_id)
                else:
                    report.rewards[episode_id] = value
            if on_progress:
                on_progress(len(chunk))
    return report


def compute_rewards(con: duckdb.DuckDBPyConnection, fn_or_sql: EpisodeRewardFn | str,
                    episode_ids: Sequence[str] | None = None) -> dict[str, float]:
    """``{episode_id: reward}`` for the episodes the function or SQL scores; raises on the first failure."""
    return score_episodes(con, fn_or_sql, episode_ids).rewards


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _sql_rewards(con: duckdb.DuckDBPyConnection, sql: str, episode_ids: Sequence[str] | None) -> dict[str, float]:
    query = sql.removeprefix(SQL_PREFIX)
    try:
        cursor = retry_listing(lambda: con.execute(query))
        rows = cursor.fetchall()
    except duckdb.Error as exc:
        raise RewardError(f"reward SQL failed: {exc}") from None
    if cursor.description is None or len(cursor.description) != 2:
        raise RewardError("reward SQL must return exactly two columns: (episode_id, reward)")
    wanted = None if episode_ids is None else set(episode_ids)
    out: dict[str, float] = {}
    for episode_id, value in rows:
        if episode_id is None or value is None or (wanted is not None and str(episode_id) not in wanted):
            continue
        out[str(episode_id)] = _finite(value, f"reward SQL for episode {episode_id!r}")
    return out


# ---------------------------------------------------------------- built-ins


def _normalize(text: str) -> str:
    return " ".join(text.casefold().split())


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def answer_matches(answer: str, expected: str, match: str = "auto") -> bool:
    """Whether ``answer`` gives ``expected``: ``exact``, ``contains`` (word-bounded), ``last_number``, or ``auto``.

    ``auto`` compares the last number of the answer when ``expected`` is a number, else ``contains``.
    Both ignore case and runs of whitespace.
    """
    if match == "auto":
        match = "last_number" if _NUMBER.fullmatch(expected.strip()) else "contains"
    if match == "exact":
        return _normalize(answer) == _normalize(expected)
    if match == "contains":
        return re.search(rf"(?<!\w){re.escape(_normalize(expected))}(?!\w)", _normalize(answer)) is not None
    if match == "last_number":
        numbers = _NUMBER.findall(answer)
        return bool(numbers) and math.isclose(float(numbers[-1]), float(expected), rel_tol=1e-9, abs_tol=1e-9)
    raise ValueError(f"match must be exact, contains, last_number or auto, got {match!r}")


def final_answer_verifier(expected: str | Mapping[str, str] | Callable[[Episode], str | None], match: str = "auto",
                          correct: float = 1.0, wrong: float = 0.0) -> EpisodeRewardFn:
    """Reward ``correct`` when the episode's final answer gives the expected one, else ``wrong``.

    Args:
        expected: where the expected answer comes from: an attribute key on the episode's
            spans (e.g. ``"task.expected"`` set on the agent's root span), a mapping
            ``task_id -> answer``, or ``fn(Episode) -> answer``.
        match: see ``answer_matches``.

    Episodes whose expected answer is unknown get no reward (None); an episode with no
    final answer is wrong.
    """
    def expected_of(episode: Episode) -> str | None:
        if callable(expected):
            value = expected(episode)
        elif isinstance(expected, Mapping):
            value = expected.get(episode.task_id) if episode.task_id is not None else None
        else:
            value = episode.attributes.get(expected)
        return None if value is None else str(value)

    def verify(episode: Episode) -> float | None:
        want = expected_of(episode)
        if want is None:
            return None
        answer = episode.final_answer
        return correct if answer is not None and answer_matches(answer, want, match) else wrong

    verify.__qualname__ = "final_answer_verifier"
    return verify


def tool_error_penalty(per_error: float = 0.1, max_penalty: float | None = None) -> EpisodeRewardFn:
    """``-per_error`` for each failed tool span of the episode (0.0 with none), at most ``max_penalty`` in all."""
    if per_error < 0:
        raise ValueError("per_error is the size of the penalty and must be >= 0")

    def penalty(episode: Episode) -> float:
        total = per_error * len(episode.tool_errors)
        return -(min(total, max_penalty) if max_penalty is not None else total)

    penalty.__qualname__ = "tool_error_penalty"
    return penalty


def combine(*fns: EpisodeRewardFn, weights: Sequence[float] | None = None) -> EpisodeRewardFn:
    """The weighted sum of several reward functions; None only when every one gives None."""
    weights = list(weights) if weights is not None else [1.0] * len(fns)
    if len(weights) != len(fns) or not fns:
        raise ValueError("combine needs at least one function and one weight per function")

    def total(episode: Episode) -> float | None:
        values = [(w, fn(episode)) for w, fn in zip(weights, fns)]
        present = [w * _finite(v, _name(fn)) for (w, v), fn in zip(values, fns) if v is not None]
        return sum(present) if present else None

    total.__qualname__ = "combine(" + ", ".join(_name(fn) for fn in fns) + ")"
    return total


JUDGE_SYSTEM = (
    "You grade one run of an AI agent. Rubric:\n{rubric}\n\n"
    "Reply with a short reason, then a last line exactly of the form `SCORE: <number>` with a number "
    "from 0 to {max_score}.")
_SCORE = re.compile(r"score\s*[:=]\s*\**\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)


def episode_transcript(episode: Episode, max_chars: int = 6000) -> str:
    """The episode as text for a judge or critic: the last call's messages, its answer, tool errors."""
    lines = [f"task: {episode.task_id}"] if episode.task_id else []
    if episode.llm_calls:
        last = episode.llm_calls[-1]
        lines += [f"[{m.get('role')}] {m.get('content') or ''}" for m in last.messages]
    lines.append(f"[final answer] {episode.final_answer or '(none)'}")
    lines += [f"[tool error] {t.tool_name or t.name}: {t.status_message or t.attributes.get('error.type')}"
              for t in episode.tool_errors]
    text = "\n".join(lines)
    return text if len(text) <= max_chars else text[: max_chars // 2] + "\n...\n" + text[-max_chars // 2:]


def parse_judge_score(text: str, max_score: float) -> float:
    """The score in a judge's answer, scaled to [0, 1]; ``JudgeOutputError`` if there is none in range."""
    found = _SCORE.findall(text)
    if not found:
        raise JudgeOutputError(f"judge answer has no 'SCORE: <number>' line: {text[:200]!r}")
    score = float(found[-1])
    if not 0 <= score <= max_score:
        raise JudgeOutputError(f"judge score {score} is outside 0..{max_score}: {text[:200]!r}")
    return score / max_score


def llm_judge(base_url: str, model: str, rubric: str, api_key: str | None = None, max_score: float = 10.0,
              timeout_s: float = 60.0, attempts: int = 3) -> EpisodeRewardFn:
    """An LLM judge at an OpenAI-compatible endpoint; reward = its score / ``max_score`` (0..1).

    The judge sees the rubric and ``episode_transcript(episode)`` and must end with
    ``SCORE: <n>``. An answer without one raises ``JudgeOutputError`` (``score_episodes``
    with ``on_error="skip"`` counts it instead); an unreachable endpoint raises ``ChatError``
    after ``attempts`` tries of ``timeout_s`` each.
    """
    system = JUDGE_SYSTEM.format(rubric=rubric, max_score=f"{max_score:g}")

    def judge(episode: Episode) -> float:
        answer = chat_completion(base_url, model, [{"role": "system", "content": system},
                                                   {"role": "user", "content": episode_transcript(episode)}],
                                 api_key=api_key, timeout_s=timeout_s, attempts=attempts, temperature=0.0)
        try:
            return parse_judge_score(answer, max_score)
        except JudgeOutputError as exc:
            raise JudgeOutputError(f"episode {episode.episode_id}: {exc}") from None

    judge.__qualname__ = f"llm_judge({model})"
    return judge


# ---------------------------------------------------------------- resolving a spec


def load_object(spec: str) -> Any:
    """``package.module:name`` or ``path/to/file.py:name`` -> the object."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise RewardError(f"{spec!r} is not module:function (or path/to/file.py:function)")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise RewardError(f"{module_name} is not a file")
            unique = f"_tracetrain_user_{abs(hash(str(path.resolve())))}"
            module_spec = importlib.util.spec_from_file_location(unique, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[unique] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RewardError(f"cannot import {module_name!r}: {exc}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise RewardError(f"{module_name!r} has no {attr!r}") from None


def resolve_reward_fn(spec: str | EpisodeRewardFn) -> BatchRewardFn:
    """``"module:function"`` (an ``fn(Episode)``), ``"sql:SELECT ..."`` or a callable -> ``f(con, episode_ids)``.

    The result returns ``{episode_id: reward}`` and raises ``RewardError`` on a bad value.
    """
    if callable(spec):
        fn: EpisodeRewardFn | str = spec
    elif is_sql(spec):
        fn = spec
    elif isinstance(spec, str):
        fn = load_object(spec)
        if not callable(fn):
            raise RewardError(f"{spec!r} is not callable")
    else:
        raise RewardError(f"a reward spec is 'module:function' or 'sql:SELECT ...', got {spec!r}")

    def batch(con: duckdb.DuckDBPyConnection, episode_ids: Sequence[str] | None = None) -> dict[str, float]:
        return compute_rewards(con, fn, episode_ids)

    return batch
