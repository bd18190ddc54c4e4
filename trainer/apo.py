"""APO: automatic prompt optimization from traces (``tracetrain apo``, ``tracetrain train --algo apo``).

A textual-gradient beam search over the agent's system prompt, the agent left unchanged:

1. evaluate the current prompt: run the agent on the tasks (``rollout.run_rollouts``,
   or in-process calls), each run an episode in the store with a reward;
2. read the low-reward episodes (the evaluation's, plus the store's that ``--where``
   selects) with their messages and final answers;
3. a critic LLM (OpenAI-compatible endpoint) critiques the prompt against them (the
   "gradient"), then writes N edited prompts;
4. evaluate every candidate the same way, keep the best ``beam_width`` prompts, and
   publish a better one as a new version of the prompt resource
   (``prompt_store``: ``DATA/resources/prompts/<name>/v<N>.json`` + ``current.json``,
   with its parent, score and the episodes critiqued);
5. record the round as a ``train_steps`` row (algo ``apo``, reward_mean = the round's
   best candidate score, policy_version = the current prompt version); repeat.

The agent reads the prompt the way it already does: the ``SYSTEM_PROMPT`` environment
variable (``prompt_env``), a task field (``prompt_task_key``), or through
``tracetrain proxy --system-prompt-file .../current.json``. docs/apo.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracetrain.instrumentation import semconv as sc
from tracetrain.trainer import prompt_store
from tracetrain.trainer.apo_config import (
    ApoConfig,
    ApoError,
    apo_config_from,
    load_apo_config,
)
from tracetrain.trainer.apo_critic import (
    CriticOutputError,
    FailedRun,
    parse_prompts,
    propose,
)
from tracetrain.trainer.episode_view import load_episodes
from tracetrain.trainer.prompt_store import PromptVersion, current_prompt
from tracetrain.trainer.rewards import episode_transcript
from tracetrain.trainer.store import StoreUnavailable, connect

logger = logging.getLogger(__name__)

__all__ = [
    "ApoConfig",
    "ApoError",
    "ApoResult",
    "Candidate",
    "Evaluation",
    "apo_config_from",
    "current_prompt",
    "load_apo_config",
    "parse_prompts",
    "prompt_environment",
    "run_apo",
]

RESOURCES_DIR = "resources"


@dataclass
class Evaluation:
    """One prompt run on every task: per-episode rewards (None: the run gave none)."""

    rewards: dict[str, float | None]
    answers: dict[str, Any] = field(default_factory=dict)
    tasks: dict[str, dict] = field(default_factory=dict)   # episode id -> task
    failure_reward: float = 0.0

    @property
    def score(self) -> float:
        values = [self.failure_reward if v is None else v for v in self.rewards.values()]
        return sum(values) / len(values) if values else float("nan")

    def success_rate(self, threshold: float) -> float:
        values = [v for v in self.rewards.values() if v is not None and v >= threshold]
        return len(values) / len(self.rewards) if self.rewards else float("nan")


@dataclass
class Candidate:
    prompt: str
    evaluation: Evaluation
    version: int | None = None          # published version, if it was published
    parent_version: int | None = None   # nearest published ancestor
    critique: str | None = None
    critiqued_episode_ids: list[str] = field(default_factory=list)

    @property
    def score(self) -> float:
        return self.evaluation.score


@dataclass
class ApoResult:
    run_id: str
    best: PromptVersion
    baseline_score: float
    rounds: list[dict] = field(default_factory=list)   # the train_steps rows written


# ---------------------------------------------------------------- configuration


def prompt_environment(resources_dir: str | os.PathLike, name: str, variable: str = "SYSTEM_PROMPT",
                       base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default os.environ) with ``variable`` set to the current prompt of ``name`` (unchanged if none)."""
    env = dict(os.environ if base is None else base)
    prompt = current_prompt(resources_dir, name)
    if prompt is not None:
        env[variable] = prompt
    return env


@contextlib.contextmanager
def _prompt_in_env(variable: str, prompt: str) -> Iterator[None]:
    """Set the agent's prompt variable for an evaluation (in-process agents and child processes read it)."""
    before = os.environ.get(variable)
    os.environ[variable] = prompt
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = before


# ---------------------------------------------------------------- evaluation


def _tasks(cfg: ApoConfig) -> list[dict]:
    if cfg.tasks is None:
        raise ApoError("APO needs tasks to evaluate prompts on (--tasks FILE.jsonl)")
    if isinstance(cfg.tasks, (str, Path)):
        from tracetrain.trainer.rollout import RolloutError, load_tasks
        try:
            return load_tasks(cfg.tasks)
        except RolloutError as exc:
            raise ApoError(str(exc)) from None
    tasks = [dict(t) for t in cfg.tasks]
    if not tasks or any("id" not in t for t in tasks):
        raise ApoError("tasks must be a non-empty list of dicts, each with an \"id\"")
    return tasks


def _with_prompt(tasks: Sequence[dict], cfg: ApoConfig, prompt: str) -> list[dict]:
    return [{**t, cfg.prompt_task_key: prompt} if cfg.prompt_task_key else dict(t) for t in tasks]


def _evaluation_kind(cfg: ApoConfig) -> str:
    if cfg.evaluation != "auto":
        return cfg.evaluation
    try:
        import tracetrain.trainer.rollout  # noqa: F401
    except ImportError:
        return "inline"
    return "rollout"


def evaluate(cfg: ApoConfig, prompt: str, tasks: Sequence[dict], tag: str) -> Evaluation:
    """Run the agent with ``prompt`` on every task ``samples_per_task`` times; episode ids start with ``tag``."""
    with _prompt_in_env(cfg.prompt_env, prompt):
        if _evaluation_kind(cfg) == "rollout":
            return _evaluate_rollout(cfg, _with_prompt(tasks, cfg, prompt), tag)
        return _evaluate_inline(cfg, _with_prompt(tasks, cfg, prompt), tag)


def _evaluate_rollout(cfg: ApoConfig, tasks: list[dict], tag: str) -> Evaluation:
    from tracetrain.trainer.rollout import RolloutError, run_rollouts
    try:
        summary = run_rollouts(tasks, cfg.agent, group_size=cfg.samples_per_task, concurrency=cfg.concurrency,
                               collector=cfg.collector_url, grader=cfg.grader, timeout_s=cfg.timeout_s,
                               failure_reward=cfg.failure_reward, run_id=tag, agent_name=cfg.agent_name)
    except (RolloutError, ValueError) as exc:
        raise ApoError(f"cannot run the agent: {exc}") from None
    by_id = {str(t["id"]): t for t in tasks}
    return Evaluation({r.episode_id: r.reward for r in summary.results},
                      {r.episode_id: r.answer for r in summary.results},
                      {r.episode_id: by_id.get(r.task_id, {}) for r in summary.results}, cfg.failure_reward)


def _load_callable(spec: Any) -> Callable:
    if callable(spec):
        return spec
    from tracetrain.trainer.rewards import RewardError, load_object
    try:
        function = load_object(str(spec))
    except RewardError as exc:
        raise ApoError(f"--agent: {exc} (inline evaluation needs a Python function)") from None
    if not callable(function):
        raise ApoError(f"--agent {spec!r} is not callable")
    return function


def _reward_from(output: Any) -> float | None:
    if isinstance(output, dict):
        output = output.get("reward")
    if isinstance(output, (int, float)) and not isinstance(output, bool) and math.isfinite(output):
        return float(output)
    return None


def _evaluate_inline(cfg: ApoConfig, tasks: list[dict], tag: str) -> Evaluation:
    """Call ``agent(task)`` in this process; the task carries ``episode_id`` (and the prompt).

    The reward is what the agent returns (a number or ``{"reward": x}``), else the grader's,
    else the reward the agent emitted into the store for that episode id.
    """
    agent = _load_callable(cfg.agent)
    grader = _load_callable(cfg.grader) if cfg.grader is not None else None
    result = Evaluation({}, failure_reward=cfg.failure_reward)
    for k in range(cfg.samples_per_task):
        for task in tasks:
            episode_id = f"{tag}-{task['id']}-{k}"
            result.tasks[episode_id] = task
            try:
                output = agent({**task, "episode_id": episode_id})
            except Exception as exc:  # noqa: BLE001 - the agent's failure is the episode's
                logger.warning("episode %s failed: %s: %s", episode_id, type(exc).__name__, exc)
                result.rewards[episode_id] = None
                continue
            result.answers[episode_id] = output
            reward = _reward_from(output)
            if reward is None and grader is not None:
                reward = _reward_from(grader(task, output))
            result.rewards[episode_id] = reward
    missing = [e for e, r in result.rewards.items() if r is None and e in result.answers]
    if missing:
        result.rewards.update(_stored_rewards(cfg, missing))
    return result


def _stored_rewards(cfg: ApoConfig, episode_ids: list[str]) -> dict[str, float]:
    """Rewards the agent emitted itself, once they are in the store (up to ``store_wait_s``)."""
    deadline = time.monotonic() + cfg.store_wait_s
    con = connect(cfg.data_dir)
    try:
        while True:
            rows = con.execute(f"SELECT {sc.COL_EPISODE_ID}, {sc.COL_REWARD} FROM {sc.VIEW_EPISODES} "
                               f"WHERE {sc.COL_EPISODE_ID} IN (SELECT unnest(?)) AND {sc.COL_REWARD} IS NOT NULL",
                               [episode_ids]).fetchall()
            if len(rows) == len(episode_ids) or time.monotonic() > deadline:
                return {e: float(r) for e, r in rows}
            time.sleep(0.2)
    finally:
        con.close()


# ---------------------------------------------------------------- critique material


def _failed_runs(cfg: ApoConfig, candidate: Candidate, extra_ids: Sequence[str]) -> list[FailedRun]:
    """The parent's lowest-reward episodes (plus stored ones ``where`` picked), as the critic reads them."""
    ranked = sorted(candidate.evaluation.rewards.items(),
                    key=lambda item: cfg.failure_reward if item[1] is None else item[1])
    low = [e for e, r in ranked if r is None or r < cfg.success_threshold][: cfg.critique_episodes]
    wanted = low + [e for e in extra_ids if e not in low][: max(0, cfg.critique_episodes - len(low))]
    if not wanted:
        return []
    try:
        con = connect(cfg.data_dir)
    except StoreUnavailable:  # no collector ever opened the store: only what the runner saw
        stored = {}
    else:
        try:
            stored = {e.episode_id: e for e in load_episodes(con, wanted)}
        finally:
            con.close()
    runs = []
    for episode_id in wanted:
        reward = candidate.evaluation.rewards.get(episode_id)
        episode = stored.get(episode_id)
        if episode is not None:
            runs.append(FailedRun(episode_id, reward if reward is not None else episode.reward,
                                  episode_transcript(episode, max_chars=3000)))
        else:  # the agent left no spans: what the runner saw is all there is
            task = candidate.evaluation.tasks.get(episode_id, {})
            answer = candidate.evaluation.answers.get(episode_id)
            runs.append(FailedRun(episode_id, reward, f"task: {json.dumps(task, default=str)[:1500]}\n"
                                                      f"[final answer] {answer!r}"[:3000]))
    return runs


def _stored_failures(cfg: ApoConfig) -> list[str]:
    """Low-reward episodes already in the store that ``where`` selects (critiqued in round 1)."""
    if not cfg.where:
        return []
    con = connect(cfg.data_dir)
    try:
        rows = con.execute(f"SELECT {sc.COL_EPISODE_ID} FROM {sc.VIEW_EPISODES} WHERE ({cfg.where}) "
                           f"AND {sc.COL_REWARD} < ? ORDER BY {sc.COL_REWARD}, {sc.COL_START_NS} DESC LIMIT ?",
                           [cfg.success_threshold, cfg.critique_episodes]).fetchall()
    except Exception as exc:  # duckdb errors for a bad condition
        raise ApoError(f"--where: {exc}") from None
    finally:
        con.close()
    return [row[0] for row in rows]


def _starting_prompt(cfg: ApoConfig, resources: Path) -> tuple[str, PromptVersion | None]:
    published = None
    try:
        published = prompt_store.load_version(resources, cfg.prompt_name)
    except prompt_store.PromptNotFound:
        pass
    prompt = cfg.initial_prompt or (published.prompt if published else None)
    if not prompt:
        raise ApoError(f"no starting prompt: give --initial-prompt, or publish one as "
                       f"{resources}/prompts/{cfg.prompt_name}/ first")
    return prompt, published


# ---------------------------------------------------------------- the search


def _step_row(run_id: str, step: int, best_round: Candidate, current_version: int, cfg: ApoConfig,
              skipped: dict[str, int], step_s: float) -> dict:
    return {"run_id": run_id, "step": step, "algo": "apo", "agent_name": cfg.agent_name,
            "policy_version": current_version, "n_episodes": len(best_round.evaluation.rewards),
            "reward_mean": best_round.score,
            "success_rate": best_round.evaluation.success_rate(cfg.success_threshold),
            "step_s": step_s, "skipped": json.dumps(skipped, sort_keys=True)}


def _expand(cfg: ApoConfig, beam: list[Candidate], tasks: list[dict], tag: str, extra_ids: Sequence[str],
            seen: set[str], skipped: dict[str, int]) -> list[Candidate]:
    """One round: critique each beam member and evaluate its edits (``candidates`` in all)."""
    shares = [cfg.candidates // len(beam) + (1 if i < cfg.candidates % len(beam) else 0) for i in range(len(beam))]
    children: list[Candidate] = []
    for parent, k in zip(beam, shares):
        if k == 0:
            continue
        runs = _failed_runs(cfg, parent, extra_ids)
        try:
            proposal = propose(cfg.critic_url, cfg.critic_model, parent.prompt, runs, k,
                               api_key=cfg.critic_api_key, timeout_s=cfg.critic_timeout_s)
        except CriticOutputError as exc:
            logger.warning("%s", exc)
            skipped["critic_unparseable"] = skipped.get("critic_unparseable", 0) + 1
            continue
        for prompt in proposal.prompts:
            if prompt in seen:
                skipped["duplicate_prompt"] = skipped.get("duplicate_prompt", 0) + 1
                continue
            seen.add(prompt)
            evaluation = evaluate(cfg, prompt, tasks, f"{tag}c{len(children) + 1}")
            children.append(Candidate(prompt, evaluation, None, parent.version or parent.parent_version,
                                      proposal.critique, [run.episode_id for run in runs]))
            logger.info("%s candidate %d: score %.4f", tag, len(children), children[-1].score)
    return children


def _publish(cfg: ApoConfig, resources: Path, run_id: str, candidate: Candidate) -> PromptVersion:
    record = prompt_store.publish(
        resources, cfg.prompt_name, candidate.prompt, parent_version=candidate.parent_version,
        score=candidate.score, n_evaluated=len(candidate.evaluation.rewards),
        critiqued_episode_ids=candidate.critiqued_episode_ids,
        eval_episode_ids=list(candidate.evaluation.rewards), critique=candidate.critique, run_id=run_id,
        meta={"algo": "apo", "critic_model": cfg.critic_model})
    candidate.version = record.version
    return record


def run_apo(cfg: Any, progress: Callable[[dict], None] | None = None) -> ApoResult:
    """Optimize the agent's system prompt; returns the best published version and the rows written.

    Args:
        cfg: an ``ApoConfig``, or the training loop's ``TrainConfig`` (APO settings then come
            from ``tracetrain.toml`` ``[apo]`` and ``TRACETRAIN_APO_*``).
        progress: called with each round's ``train_steps`` row.

    Raises:
        ApoError: bad settings, no starting prompt, or no evaluation gave a reward.
        ChatError: the critic endpoint is unreachable or refuses the requests.
    """
    from tracetrain.trainer.train_tables import write_train_step

    cfg = apo_config_from(cfg)
    if not cfg.critic_url or cfg.agent is None:
        raise ApoError("APO needs --critic-url (an OpenAI-compatible endpoint) and --agent")
    run_id = cfg.run_id or f"apo-{uuid.uuid4().hex[:8]}"
    resources = Path(cfg.resources_dir or Path(cfg.data_dir) / RESOURCES_DIR)
    tasks = _tasks(cfg)
    prompt, published = _starting_prompt(cfg, resources)
    started = time.perf_counter()
    baseline = Candidate(prompt, evaluate(cfg, prompt, tasks, f"{run_id}-r0"))
    if all(v is None for v in baseline.evaluation.rewards.values()):
        raise ApoError("no episode of the baseline evaluation got a reward: give a grader, or make the agent "
                       "return or emit one")
    if published is not None and published.prompt == prompt:
        baseline.version = published.version
    else:
        baseline.parent_version = published.version if published else None
        _publish(cfg, resources, run_id, baseline)
    rows = [_step_row(run_id, 1, baseline, baseline.version, cfg, {}, time.perf_counter() - started)]
    write_train_step(cfg.data_dir, rows[-1])
    if progress:
        progress(rows[-1])
    beam, best, seen = [baseline], baseline, {prompt}
    extra = _stored_failures(cfg)
    for round_index in range(1, cfg.rounds + 1):
        started, skipped = time.perf_counter(), {}
        children = _expand(cfg, beam, tasks, f"{run_id}-r{round_index}", extra if round_index == 1 else (),
                           seen, skipped)
        if children:
            top = max(children, key=lambda c: c.score)
            if top.score > best.score:
                _publish(cfg, resources, run_id, top)
                best = top
            beam = sorted(beam + children, key=lambda c: -c.score)[: cfg.beam_width]
        rows.append(_step_row(run_id, round_index + 1, max(children, key=lambda c: c.score) if children else best,
                              best.version, cfg, skipped, time.perf_counter() - started))
        write_train_step(cfg.data_dir, rows[-1])
        if progress:
            progress(rows[-1])
    return ApoResult(run_id, prompt_store.load_version(resources, cfg.prompt_name, best.version),
                     baseline.score, rows)
