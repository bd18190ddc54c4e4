"""Rollouts in rounds, in step with an online trainer.

An online RL run alternates: sample a batch of episodes with the policy being served, let
the trainer update on them and push new weights, sample the next batch with the new
policy. ``run_rounds`` is the sampling side: each round draws ``tasks_per_round`` fresh
tasks (a seeded shuffle, cycling when the task file is exhausted), runs each ``group_size``
times through ``run_rollouts`` and, when ``policy_url`` is given, waits until the serving
endpoint answers with a newer policy version (the ``x-tracetrain-policy-version`` header
that ``tracetrain serve`` puts on every ``/v1/*`` response) before the next round, and
after the last one (so the trainer has taken every round when it returns).
With ``policy_lag=1`` sampling and training overlap: round i+1 starts as soon as the
trainer has taken round i-1 (it pushes one version per round, so round k is taken when the
version served at the start has grown by k+1), so the trainer updates on round i while
round i+1 is sampled one version behind
(the captured behaviour log-probs and PPO-clip importance ratios correct for it).
Without ``policy_url`` rounds follow each other at once (off-policy: the trainer's
importance ratios and staleness limit handle the lag).
"""

from __future__ import annotations

import logging
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from tracetrain.instrumentation import semconv as sc

from .rollout import RolloutError, RolloutSummary, run_rollouts

logger = logging.getLogger(__name__)


class PolicyWaitTimeout(RuntimeError):
    """The serving endpoint did not move to a newer policy version in time."""


def _models_url(base_url: str) -> str:
    base = base_url.rstrip("/")
    return (base if base.endswith("/v1") else base + "/v1") + "/models"


def served_policy_version(base_url: str, timeout_s: float = 5.0) -> int | None:
    """The policy version the endpoint answers with now (None: no or an ambiguous header)."""
    try:
        with urllib.request.urlopen(_models_url(base_url), timeout=timeout_s) as response:  # noqa: S310 - loopback
            value = response.headers.get(sc.POLICY_VERSION_HEADER)
    except (OSError, urllib.error.URLError):
        return None
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def wait_for_policy_above(base_url: str, version: int | None, timeout_s: float, poll_s: float = 0.1) -> int:
    """Block until the endpoint serves a version greater than ``version``; returns it."""
    deadline = time.monotonic() + timeout_s
    while True:
        current = served_policy_version(base_url)
        if current is not None and (version is None or current > version):
            return current
        if time.monotonic() >= deadline:
            raise PolicyWaitTimeout(f"{base_url} still serves policy version {current} after {timeout_s:g} s "
                                    f"(waiting for > {version}); is `tracetrain train --online` running?")
        time.sleep(poll_s)


def round_tasks(tasks: Sequence[dict], tasks_per_round: int, round_index: int, seed: int) -> list[dict]:
    """The tasks of round ``round_index``: consecutive slices of seeded shuffles of ``tasks``.

    Every task is used once before any is used again; a round never holds a task twice.
    """
    if not 1 <= tasks_per_round <= len(tasks):
        raise RolloutError(f"tasks_per_round must be between 1 and the number of tasks ({len(tasks)})")
    per_epoch = len(tasks) // tasks_per_round
    epoch, slot = divmod(round_index, per_epoch)
    order = list(range(len(tasks)))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return [tasks[i] for i in order[slot * tasks_per_round:(slot + 1) * tasks_per_round]]


def run_rounds(tasks: Sequence[dict], agent: Any, *, rounds: int, tasks_per_round: int, group_size: int,
               run_id: str, policy_url: str | None = None, policy_timeout_s: float = 600.0,
               continue_on_policy_timeout: bool = False, seed: int = 0, policy_lag: int = 0,
               on_round: Callable[[int, RolloutSummary, int | None], None] | None = None,
               **rollout_options: Any) -> list[RolloutSummary]:
    """Run ``rounds`` rounds of ``tasks_per_round`` x ``group_size`` episodes.

    Episode ids are ``<run_id>-r<round>-<task_id>-<k>``. ``rollout_options`` go to
    ``run_rollouts`` (concurrency, collector, grader, timeout_s...). ``on_round(i, summary,
    version)`` is called after each round with the policy version the round was sampled
    with (None when unknown). A trainer that found nothing to learn from a round (every
    group scored alike) pushes nothing; with ``continue_on_policy_timeout`` the next round
    then samples with the same policy after ``policy_timeout_s`` instead of failing.
    ``policy_lag`` (with ``policy_url``): how many rounds the trainer may still have to
    take when the next round starts (0: strictly on-policy; 1: sample while it trains).

    Raises:
        PolicyWaitTimeout: ``policy_url`` did not move to a newer version in time (and
            ``continue_on_policy_timeout`` is false).
        RolloutError: bad arguments.
    """
    if rounds < 1:
        raise RolloutError("rounds must be >= 1")
    if policy_lag < 0:
        raise RolloutError("policy_lag must be >= 0")
    summaries = []
    start_version = served_policy_version(policy_url) if policy_url and policy_lag else None
    skipped = 0  # with policy_lag: rounds the trainer took without a push, each waited out once
    for index in range(rounds):
        version = served_policy_version(policy_url) if policy_url else None
        summary = run_rollouts(round_tasks(tasks, tasks_per_round, index, seed), agent, group_size=group_size,
                               run_id=f"{run_id}-r{index}", **rollout_options)
        summaries.append(summary)
        if on_round:
            on_round(index, summary, version)
        if not policy_url:
            continue
        if not policy_lag or start_version is None:
            _await_newer(policy_url, version, policy_timeout_s, continue_on_policy_timeout, index)
            continue
        # the trainer pushes one version per round it takes: round k is taken at start_version + k + 1
        # (less the rounds it skipped); wait for round index - policy_lag, after the last round for all
        taken = index - policy_lag if index < rounds - 1 else index
        if taken >= 0 and not _await_newer(policy_url, start_version + taken - skipped, policy_timeout_s,
                                           continue_on_policy_timeout, index):
            skipped += 1
    return summaries


def _await_newer(policy_url: str, version: int | None, timeout_s: float, continue_on_timeout: bool,
                 index: int) -> bool:
    """Wait for a version above ``version``; False when it timed out and ``continue_on_timeout``."""
    try:
        wait_for_policy_above(policy_url, version, timeout_s)
        return True
    except PolicyWaitTimeout as error:
        if not continue_on_timeout:
            raise
        logger.warning("round %d: %s; sampling the next round with the same policy", index, error)
        return False
