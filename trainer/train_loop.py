"""``train(cfg)``: the RL loop over the span store, top to bottom.

    connect store -> select episodes after the watermark (--where, --agent)
      -> build transitions -> advantages -> batch -> minibatch updates
      -> checkpoint -> push weights to vLLM -> record the step row

Offline (default): every selected episode (all behaviour policy versions; the PPO ratio
against each call's behaviour logprobs is the importance correction) is split into
batches of ``batch_episodes`` (GRPO: complete task groups), one step per batch, for
``data_epochs`` passes or ``max_steps`` steps.

Online (``online=True``): poll the store for episodes after the watermark, train when a
batch is ready, push, repeat until ``max_steps`` or SIGINT/SIGTERM. An episode is trained
on once: the watermark and the ids consumed after it live in every checkpoint's
``trainer_state.json``, written atomically with the weights and optimizer state, so a
restart (even after kill -9) resumes at the last checkpoint without re-training anything
it had checkpointed. Episodes trained after the last checkpoint are trained again.

The stages are pure functions (``select_batch``, ``advance_watermark``, ``batch_stats``)
tested on their own; ``train`` wires them.
"""

from __future__ import annotations

import json
import math
import secrets
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import advantages as adv
from . import store
from . import transitions as tr
from .algorithms import AlgoConfig, get_algorithm
from .train_config import TrainConfig
from .train_tables import check_run_id

ADVANTAGES = {"grpo": adv.grpo, "baseline": adv.baseline, "none": lambda table: (table, Counter())}


class NothingToTrain(RuntimeError):
    """Offline: no selected episode can be trained on; the message says why, with counts."""


@dataclass
class RunState:
    """What a restart needs besides weights and optimizer state (saved in each checkpoint)."""

    run_id: str
    step: int = 0
    watermark: tuple[int, str] | None = None  # every episode at or before it is consumed or decided
    consumed: set[str] = field(default_factory=set)  # consumed episodes after the watermark
    policy_version: int | None = None  # last version pushed
    data_epoch: int = 0                # offline: pass in progress
    batch_in_epoch: int = 0            # offline: next batch of that pass

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "step": self.step,
                "watermark": list(self.watermark) if self.watermark else None,
                "consumed": sorted(self.consumed), "policy_version": self.policy_version,
                "data_epoch": self.data_epoch, "batch_in_epoch": self.batch_in_epoch}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "RunState":
        wm = d.get("watermark")
        return cls(run_id=d["run_id"], step=int(d["step"]), watermark=(int(wm[0]), str(wm[1])) if wm else None,
                   consumed=set(d.get("consumed") or ()), policy_version=d.get("policy_version"),
                   data_epoch=int(d.get("data_epoch", 0)), batch_in_epoch=int(d.get("batch_in_epoch", 0)))


@dataclass
class TrainReport:
    run_id: str
    steps_done: int                 # steps run by this call
    last_step: int                  # the run's step counter (resumed runs continue it)
    policy_version: int | None      # last version pushed (None: no push)
    checkpoint: str | None          # last checkpoint folder
    out_dir: str
    stop_reason: str                # max_steps | data_exhausted | stopped | nothing_trainable
    message: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list)  # the train_steps rows written by this call
    skipped: Counter = field(default_factory=Counter)         # over the whole call


# ---------------------------------------------------------------- pure stages

def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def episode_order(table: pa.Table) -> list[str]:
    """Distinct episode ids in first-appearance order."""
    seen: dict[str, None] = {}
    for e in table["episode_id"].to_pylist():
        seen.setdefault(e, None)
    return list(seen)


def plan_batches(transitions: pa.Table, cfg: TrainConfig, grouped: bool, complete_only: bool,
                 rng: np.random.Generator | None = None) -> tuple[list[list[str]], Counter]:
    """Episode-id batches of about ``cfg.batch_episodes`` episodes.

    grouped (GRPO): a batch holds whole task groups of ``group_size`` episodes (a task with
    2 * group_size episodes gives 2 groups; the leftover ones wait: ``incomplete_group``).
    ``complete_only`` False (offline) lets a batch end smaller than ``batch_episodes``.
    ``rng`` shuffles the units (groups or episodes); None keeps arrival order.
    """
    counts: Counter = Counter()
    episodes = episode_order(transitions)
    if grouped:
        first_row = {}
        for e, t in zip(transitions["episode_id"].to_pylist(), transitions["task_id"].to_pylist()):
            first_row.setdefault(e, t)
        by_task: dict[Any, list[str]] = {}
        for e in episodes:
            by_task.setdefault(first_row[e] if first_row[e] is not None else "\x00" + e, []).append(e)
        units = []
        for members in by_task.values():
            n_full = len(members) // cfg.group_size * cfg.group_size
            units += [members[i:i + cfg.group_size] for i in range(0, n_full, cfg.group_size)]
            if len(members) > n_full:
                counts["incomplete_group"] += len(members) - n_full
    else:
        units = [[e] for e in episodes]
    if rng is not None:
        units = [units[i] for i in rng.permutation(len(units))]
    batches: list[list[str]] = []
    current: list[str] = []
    for unit in units:
        current += unit
        if len(current) >= cfg.batch_episodes:
            batches.append(current)
            current = []
    if current:
        if complete_only:
            counts["batch_not_full"] += len(current)
        else:
            batches.append(current)
    return batches, +counts


def advance_watermark(calls: pa.Table, consumed: set[str],
                      watermark: tuple[int, str] | None) -> tuple[tuple[int, str] | None, set[str]]:
    """Move the watermark over the longest prefix (in (end time, id) order) of consumed episodes.

    Returns the new watermark and the consumed ids still after it (the rest are implied).
    """
    if calls.num_rows == 0:
        return watermark, consumed
    keys = calls.select([tr.EPISODE_END_COL, "episode_id"]).drop_null().group_by(
        [tr.EPISODE_END_COL, "episode_id"]).aggregate([])
    keys = keys.sort_by([(tr.EPISODE_END_COL, "ascending"), ("episode_id", "ascending")])
    new_wm = watermark
    passed: set[str] = set()
    for end_ns, episode in zip(keys[tr.EPISODE_END_COL].to_pylist(), keys["episode_id"].to_pylist()):
        if episode not in consumed:
            break
        new_wm = (int(end_ns), str(episode))
        passed.add(episode)
    return new_wm, consumed - passed


def decided_episodes(calls: pa.Table, transitions: pa.Table) -> set[str]:
    """Episodes of ``calls`` with no trainable call that will never get one (they have a reward,
    so waiting cannot help): consumed without training, so they do not hold the watermark."""
    if calls.num_rows == 0:
        return set()
    with_reward = calls.filter(pc.is_valid(calls[tr.EPISODE_REWARD_COL]))
    have = set(with_reward["episode_id"].to_pylist())
    return have - set(transitions["episode_id"].to_pylist())


def batch_stats(rows: pa.Table, success_threshold: float, current_version: int | None) -> dict[str, Any]:
    """Episode-level reward and success, staleness and sizes of the transitions in a batch."""
    episodes = rows.group_by("episode_id").aggregate([("episode_reward", "max"), ("reward", "max")])
    score = pc.coalesce(episodes["episode_reward_max"], episodes["reward_max"]).to_numpy(zero_copy_only=False)
    score = score.astype(np.float64)
    valid = score[~np.isnan(score)]
    versions = rows["policy_version"].drop_null().to_numpy(zero_copy_only=False)
    staleness = float(np.mean(current_version - versions)) if current_version is not None and len(versions) \
        else math.nan
    return {"n_episodes": episodes.num_rows, "n_transitions": rows.num_rows,
            "n_tokens": int(pc.sum(rows["n_response_tokens"]).as_py() or 0),
            "reward_mean": float(valid.mean()) if len(valid) else math.nan,
            "success_rate": float((valid >= success_threshold).mean()) if len(valid) else math.nan,
            "staleness_mean": staleness}


def filter_episodes(table: pa.Table, episode_ids: list[str]) -> pa.Table:
    return table.filter(pc.is_in(table["episode_id"], pa.array(episode_ids, pa.string())))


def describe_skips(counts: Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) or "none"


# ---------------------------------------------------------------- the loop

class _Stopper:
    """SIGINT/SIGTERM -> a clean stop after the current step (main thread only)."""

    def __init__(self, event: threading.Event | None):
        self.event = event or threading.Event()
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_Stopper":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, lambda *_: self.event.set())
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _progress(cfg: TrainConfig, text: str, enabled: bool) -> None:
    if enabled:
        end = "\r" if sys.stderr.isatty() else "\n"
        sys.stderr.write(f"\x1b[2K{text}{end}" if end == "\r" else text + end)
        sys.stderr.flush()


def train(cfg: TrainConfig, *, stop: threading.Event | None = None, progress: bool = True) -> TrainReport:
    """Train per ``cfg`` (see the module doc); returns what was done and why it stopped.

    Raises:
        NothingToTrain: offline, when no selected episode is trainable (message with counts).
        store.StoreUnavailable: ``cfg.data_dir`` is not a span store.
    """
    if cfg.algo == "apo":
        raise ValueError("apo is not a loss: call tracetrain.trainer.apo.run_apo(cfg)")
    from .train_session import Session  # torch-heavy half of the loop

    algorithm = get_algorithm(cfg.algo)
    run_id = check_run_id(cfg.run_id or new_run_id())
    out_dir = Path(cfg.out_dir or Path("tracetrain-runs") / run_id)
    con = store.connect(cfg.data_dir)
    session = Session(cfg, run_id, out_dir, algorithm)
    report = TrainReport(run_id=run_id, steps_done=0, last_step=session.state.step,
                         policy_version=session.state.policy_version, checkpoint=None, out_dir=str(out_dir),
                         stop_reason="")
    try:
        with _Stopper(stop) as stopper:
            if cfg.online:
                _online(cfg, con, session, report, stopper.event, progress)
            else:
                _offline(cfg, con, session, report, stopper.event, progress)
        session.checkpoint()  # the steps since the last periodic checkpoint (after a clean stop too)
    finally:
        con.close()
    report.last_step = session.state.step
    report.policy_version = session.state.policy_version
    report.checkpoint = str(session.last_checkpoint) if session.last_checkpoint else None
    return report


def _transition_cfg(cfg: TrainConfig, algorithm_needs_reward: bool, current_version: int | None,
                    tokenizer: Any) -> tr.TransitionConfig:
    return tr.TransitionConfig(max_len=cfg.max_len, agents=tuple(cfg.agents) or None,
                               current_version=current_version, max_staleness=cfg.max_staleness,
                               missing_logprobs="recompute", tokenizer=tokenizer)


def _load(cfg: TrainConfig, con: Any, session: Any, after: tuple[int, str] | None) -> tuple[pa.Table, pa.Table, Counter]:
    # Every call of the selected episodes is loaded, the other agents' too: build_transitions leaves
    # those out as ``agent_not_selected``, so train_steps.skipped says what --agent left untrained.
    calls = store.retry_listing(lambda: tr.load_calls(con, where=cfg.where, after=after))
    if session.state.consumed:
        calls = calls.filter(pc.invert(pc.is_in(calls["episode_id"],
                                                 pa.array(sorted(session.state.consumed), pa.string()))))
    tcfg = _transition_cfg(cfg, session.algorithm.needs_reward, session.state.policy_version, session.tokenizer)
    transitions, skips = tr.build_transitions(calls, tcfg)
    return calls, transitions, skips


def _nothing_message(calls: pa.Table, skips: Counter, con: Any = None, cfg: TrainConfig | None = None) -> str:
    n_episodes = len(set(calls["episode_id"].to_pylist())) if calls.num_rows else 0
    text = (f"nothing trainable: {n_episodes} episodes / {calls.num_rows} LLM calls selected; "
            f"left out: {describe_skips(skips)}")
    if (calls.num_rows == 0 or skips.get("agent_not_selected") == calls.num_rows) and con is not None \
            and cfg is not None:
        # say what the store holds, so a wrong --where / --agent is obvious
        where = f" WHERE ({cfg.where})" if cfg.where else ""
        matching = con.execute(f"SELECT count(*) FROM episodes{where}").fetchone()[0]
        total = con.execute("SELECT count(*) FROM episodes").fetchone()[0]
        agents = [r[0] for r in con.execute("SELECT DISTINCT agent_name FROM llm_calls ORDER BY 1").fetchall()]
        text += (f" (the store has {total} episodes, {matching} match --where; agents with LLM calls: "
                 f"{', '.join(str(a) for a in agents) or 'none'}; --agent: {', '.join(cfg.agents) or 'all'})")
    return text


def _offline(cfg: TrainConfig, con: Any, session: Any, report: TrainReport, stop: threading.Event,
             progress: bool) -> None:
    calls, transitions, skips = _load(cfg, con, session, after=None)
    grouped = session.algorithm.advantage == "grpo"
    state = session.state
    total = None
    while not stop.is_set():
        if cfg.max_steps is not None and state.step >= cfg.max_steps:
            report.stop_reason = "max_steps"
            return
        if state.data_epoch >= cfg.data_epochs:
            report.stop_reason = "data_exhausted"
            return
        rng = np.random.default_rng(cfg.seed + state.data_epoch)
        batches, plan_skips = plan_batches(transitions, cfg, grouped, complete_only=False, rng=rng)
        if not batches:
            report.stop_reason = "nothing_trainable"
            report.skipped.update(skips + plan_skips)
            report.message = _nothing_message(calls, skips + plan_skips, con, cfg)
            raise NothingToTrain(report.message)
        total = total or (cfg.max_steps if cfg.max_steps is not None else len(batches) * cfg.data_epochs)
        if state.batch_in_epoch >= len(batches):
            state.data_epoch += 1
            state.batch_in_epoch = 0
            continue
        ids = batches[state.batch_in_epoch]
        state.batch_in_epoch += 1
        step_skips = (skips + plan_skips) if state.batch_in_epoch == 1 else Counter()
        row = session.step(filter_episodes(transitions, ids), ids, step_skips)
        _after_step(cfg, report, row, step_skips, total, progress)


def _online(cfg: TrainConfig, con: Any, session: Any, report: TrainReport, stop: threading.Event,
            progress: bool) -> None:
    grouped = session.algorithm.advantage == "grpo"
    state = session.state
    session.push_on_resume()
    last_wait = ""
    # Batches ready at the last poll beyond the one trained: with a backlog, train them without
    # re-reading the store each step (a new poll sees new data at the latest once they are used).
    # With max_staleness set, poll every step so staleness is judged against the current version.
    backlog: list[list[str]] = []
    calls = transitions = None
    last_listing = None
    while not stop.is_set():
        if cfg.max_steps is not None and state.step >= cfg.max_steps:
            report.stop_reason = "max_steps"
            return
        step_skips: Counter = Counter()
        if not backlog or cfg.max_staleness is not None:
            listing = store.listing_fingerprint(cfg.data_dir)
            if not backlog and listing == last_listing:  # nothing new was stored: don't re-query
                stop.wait(cfg.poll_interval_s)
                continue
            last_listing = listing
            calls, transitions, skips = _load(cfg, con, session, after=state.watermark)
            backlog, plan_skips = plan_batches(transitions, cfg, grouped, complete_only=True)
            decided = decided_episodes(calls, transitions)
            step_skips = skips + plan_skips
            if decided - state.consumed:
                state.consumed |= decided
                state.watermark, state.consumed = advance_watermark(calls, state.consumed, state.watermark)
            if not backlog:
                wait = f"waiting for episodes (step {state.step}): {_nothing_message(calls, step_skips)}"
                if wait != last_wait:
                    _progress(cfg, wait, progress)
                    last_wait = wait
                stop.wait(cfg.poll_interval_s)
                continue
        ids = backlog.pop(0)
        state.consumed |= set(ids)
        state.watermark, state.consumed = advance_watermark(calls, state.consumed, state.watermark)
        row = session.step(filter_episodes(transitions, ids), ids, step_skips)
        _after_step(cfg, report, row, step_skips, cfg.max_steps, progress)
        last_wait = ""
    report.stop_reason = "stopped"


def _after_step(cfg: TrainConfig, report: TrainReport, row: dict[str, Any], skips: Counter, total: int | None,
                progress: bool) -> None:
    report.steps_done += 1
    report.rows.append(row)
    report.skipped.update(skips)

    def fmt(x: Any) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"
    of = f"/{total}" if total else ""
    _progress(cfg, f"step {row['step']}{of} | episodes {row['n_episodes']} | reward {fmt(row['reward_mean'])} | "
                   f"success {fmt(row['success_rate'])} | loss {fmt(row['loss'])} | kl {fmt(row['kl'])} | "
                   f"clip {fmt(row['clip_fraction'])} | v{row['policy_version'] if row['policy_version'] is not None else '-'}"
                   f" | {row['step_s']:.2f}s | skipped {json.loads(row['skipped']) or '-'}", progress)
