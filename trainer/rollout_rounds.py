"""Rollouts in rounds, in step with an online trainer.

An online RL run alternates: sample a batch of episodes with the policy being served, let
the trainer update on them and push new weights, sample the next batch with the new
policy. ``run_rounds`` is the sampling side: each round draws ``tasks_per_round`` fresh
tasks (a seeded shuffle, cycling when the task file is exhausted), runs each ``group_size``
times through ``run_rollouts`` and, when ``policy_url`` is given, waits until the serving
endpoint answers with a newer policy version (the ``x-tracetrain-policy-version`` header
that ``tracetrain serve`` puts on every ``/v1/*`` response) before the next round, and
after the last one (so the trainer has taken every round when it returns).
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
               continue_on_policy_timeout: bool = False, seed: int = 0,
               on_round: Callable[[int, RolloutSummary, int | None], None] | None = None,
               **rollout_options: Any) -> list[RolloutSummary]:
    """Run ``rounds`` rounds of ``tasks_per_round`` x ``group_size`` episodes.

    Episode ids are ``<run_id>-r<round>-<task_id>-<k>``. ``rollout_options`` go to
    ``run_rollouts`` (concurrency, collector, grader, timeout_s...). ``on_round(i, summary,
    version)`` is called after each round with the policy version the round was sampled
    with (None when unknown). A trainer that found nothing to learn from a round (every
    group scored alike) pushes nothing; with ``continue_on_policy_timeout`` the next round
    then samples with the same policy after ``policy_timeout_s`` instead of failing.

    Raises:
        PolicyWaitTimeout: ``policy_url`` did not move to a newer version in time (and
            ``continue_on_policy_timeout`` is false).
        RolloutError: bad arguments.
    """
    if rounds < 1:
        raise RolloutError("rounds must be >= 1")
    summaries = []
    for index in range(rounds):
        version = served_policy_version(policy_url) if policy_url else None
        summary = run_rollouts(round_tasks(tasks, tasks_per_round, index, seed), agent, group_size=group_size,
                               run_id=f"{run_id}-r{index}", **rollout_options)
        summaries.append(summary)
        if on_round:
            on_round(index, summary, version)
        if policy_url:
            try:
                wait_for_policy_above(policy_url, version, policy_timeout_s)
            except PolicyWaitTimeout as error:
                if not continue_on_policy_timeout:
                    raise
                logger.warning("round %d: %s; sampling the next round with the same policy", index, error)
    return summaries
