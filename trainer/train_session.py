"""The torch-side half of ``train``: policy, optimizers, checkpoints, pushes and step rows.

``Session(cfg, run_id, out_dir, algorithm)`` loads the policy (resuming from
``out_dir/LATEST`` when it exists) and ``Session.step(rows, episode_ids, skips)`` does one
optimizer step on a transitions table and returns the ``train_steps`` row it wrote:

    advantages -> per policy (agent): to_batch -> update_policy
      -> checkpoint (weights/adapters + optimizers + RunState) -> push -> train_steps/checkpoints rows
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from .algorithms import AlgoConfig, Algorithm
from .batch import to_batch
from .policy import LoraSpec, Policy, latest_checkpoint, load_checkpoint, load_policy, save_checkpoint
from .train_config import TrainConfig
from .train_loop import ADVANTAGES, RunState, batch_stats
from .train_step import UpdateConfig, make_optimizer, update_policy
from .train_tables import write_checkpoint_row, write_train_step


class Session:
    def __init__(self, cfg: TrainConfig, run_id: str, out_dir: Path, algorithm: Algorithm):
        import torch
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if not cfg.model_dir:
            raise ValueError("model_dir is required (--model DIR)")
        self.cfg, self.algorithm, self.out_dir = cfg, algorithm, Path(out_dir)
        lora = LoraSpec(r=cfg.lora_r, alpha=cfg.lora_alpha) if cfg.lora else None
        self.policy: Policy = load_policy(cfg.model_dir, lora=lora, agents=cfg.agents, seed=cfg.seed)
        self.tokenizer = self.policy.tokenizer
        self.reference = None
        if cfg.kl_beta > 0 and lora is None:  # LoRA's reference is the base with adapters off
            self.reference = copy.deepcopy(self.policy.model).eval().requires_grad_(False)
        self.optimizers = {key: make_optimizer(self.policy.parameters_of(key), cfg.learning_rate,
                                               cfg.weight_decay, cfg.adam_beta2) for key in self.policy.agents}
        self.algo_cfg = AlgoConfig(clip_eps=cfg.clip_eps, dual_clip_c=cfg.dual_clip_c, kl_beta=cfg.kl_beta)
        self.state = RunState(run_id=run_id)
        self.last_checkpoint: Path | None = None
        self.uncheckpointed: list[tuple[pa.Table, list[str]]] = []  # steps since the last checkpoint
        self.resumed = False
        latest = latest_checkpoint(self.out_dir)
        if latest is not None:
            saved = load_checkpoint(self.policy, self.optimizers, latest)
            if saved.get("run_id") != run_id:
                raise ValueError(f"{self.out_dir} holds run {saved.get('run_id')!r}, not {run_id!r}")
            self.state = RunState.from_json(saved)
            self.last_checkpoint, self.resumed = latest, True
        self.pushers = self._pushers()
        if self.pushers and not self.resumed:
            self.state.policy_version = next(iter(self.pushers.values())).version

    # -- pushing -------------------------------------------------------------------------
    def _pushers(self) -> dict[str | None, Any]:
        if not self.cfg.serve_url:
            return {}
        from .weight_push import WeightPusher
        from .serving import LORA_NAME
        pushers = {}
        for key in self.policy.agents:
            adapter = self.policy.adapters.get(key, "full")
            single = len(self.policy.agents) == 1
            state_file = self.cfg.serve_state_file if single and self.cfg.serve_state_file else \
                str(self.out_dir / f"policy_state{'' if single else '.' + adapter}.json")
            self.out_dir.mkdir(parents=True, exist_ok=True)
            pushers[key] = WeightPusher(self.cfg.serve_url, state_file, str(self.out_dir / "push" / adapter),
                                        base_model_dir=self.cfg.model_dir,
                                        lora_name=LORA_NAME if key is None else f"{LORA_NAME}-{key}")
        return pushers

    def push(self) -> tuple[int | None, float | None]:
        """Push every policy; returns (new version, seconds) or (None, None) without a server."""
        if not self.pushers:
            return None, None
        t0 = time.perf_counter()
        version = None
        for key, pusher in self.pushers.items():
            if self.policy.lora is not None:
                folder = self.policy.save_adapter(key, self.out_dir / "push-src" / self.policy.adapters[key])
                version = pusher.push_lora(str(folder)).version
            else:
                version = pusher.push_full(self.policy.full_state_dict()).version
        self.state.policy_version = version
        return version, time.perf_counter() - t0

    def push_on_resume(self) -> None:
        """After a restart, make the server serve the checkpointed policy (it may have missed a push)."""
        if self.resumed and self.pushers:
            self.push()

    # -- one step ------------------------------------------------------------------------
    def step(self, rows: pa.Table, episode_ids: list[str], skips: Counter) -> dict[str, Any]:
        """One optimizer step on ``rows`` (transitions of ``episode_ids``); returns its train_steps row."""
        t0 = time.perf_counter()
        cfg = self.cfg
        skips = Counter(skips)
        rows, adv_skips = ADVANTAGES[self.algorithm.advantage](rows)
        skips.update(adv_skips)
        behaviour_version = self.state.policy_version
        metrics: dict[str | None, dict[str, float]] = {}
        update_s, n_updates = 0.0, 0
        for i, key in enumerate(self.policy.agents):
            mine = rows if key is None else rows.filter(pc.equal(rows["agent_name"], key))
            if mine.num_rows == 0:
                continue
            batch = to_batch(mine, self.policy.pad_token_id)
            upd = UpdateConfig(epochs=cfg.epochs, minibatches=cfg.minibatches, grad_clip=cfg.grad_clip,
                               seed=cfg.seed * 1_000_003 + self.state.step * 101 + i)
            result = update_policy(self.policy, key, self.optimizers[key], batch, self.algorithm,
                                   self.algo_cfg, upd, self.reference)
            metrics[key] = result.metrics | {"update_s": result.update_s, "n_tokens": result.n_tokens}
            update_s += result.update_s
            n_updates += result.n_updates
        update_end_ns = time.time_ns()
        self.state.step += 1
        self.uncheckpointed.append((rows, episode_ids))
        due = self.state.step % cfg.checkpoint_every == 0
        if due:
            self._save()
        checkpoint_end_ns = time.time_ns()
        version, push_s = self.push() if n_updates else (None, None)
        pushed_ns = time.time_ns()
        if due:
            self._write_lineage()  # after the push: the row names the version these weights serve as
        step_s = time.perf_counter() - t0
        out = self._record(rows, episode_ids, skips, metrics, behaviour_version, version, push_s, step_s, update_s)
        # for benchmarks: where the step's time went (not stored)
        out["timing"] = {"step_s": step_s, "update_s": update_s, "push_s": push_s or 0.0,
                         "update_end_unix_nano": update_end_ns, "checkpoint_end_unix_nano": checkpoint_end_ns,
                         "pushed_unix_nano": pushed_ns}
        return out

    def checkpoint(self) -> None:
        """Checkpoint the steps since the last checkpoint, if any (the loop calls it at the end)."""
        if self.uncheckpointed:
            self._save()
            self._write_lineage()

    def _save(self) -> None:
        self.last_checkpoint = save_checkpoint(self.policy, self.optimizers,
                                               self.state.to_json() | {"algo": self.cfg.algo},
                                               self.out_dir, keep=self.cfg.keep_checkpoints)

    def _write_lineage(self) -> None:
        """``checkpoints`` rows: the episodes (and their behaviour versions) of the steps since the last one."""
        assert self.last_checkpoint is not None
        rows = pa.concat_tables([r for r, _ in self.uncheckpointed])
        episode_ids = [e for _, ids in self.uncheckpointed for e in ids]
        lineage = []
        for key in self.policy.agents:
            mine = rows if key is None else rows.filter(pc.equal(rows["agent_name"], key))
            if key is not None and mine.num_rows == 0:
                continue
            lineage.append({
                "run_id": self.state.run_id, "step": self.state.step, "agent_name": key,
                "policy_version": self.state.policy_version,
                "path": str(self.last_checkpoint.resolve()),
                "episode_ids": list(episode_ids) if key is None else sorted(set(mine["episode_id"].to_pylist())),
                "trained_policy_versions": sorted({int(v) for v in mine["policy_version"].drop_null().to_pylist()})})
        if lineage:
            write_checkpoint_row(self.cfg.data_dir, lineage)
        self.uncheckpointed = []

    def _record(self, rows: pa.Table, episode_ids: list[str], skips: Counter, metrics: dict, behaviour_version,
                version: int | None, push_s: float | None, step_s: float, update_s: float) -> dict[str, Any]:
        cfg, step = self.cfg, self.state.step
        out_rows, first = [], None
        keys = list(metrics) or [self.policy.agents[0]]
        for key in keys:
            mine = rows if key is None else rows.filter(pc.equal(rows["agent_name"], key))
            m = metrics.get(key, {})
            stats = batch_stats(mine, cfg.success_threshold, behaviour_version)
            if mine.num_rows == 0:  # nothing survived advantages: report the episodes of the batch
                stats["n_episodes"] = len(episode_ids)
            n_tokens = m.get("n_tokens", 0)
            row = {"run_id": self.state.run_id, "step": step, "algo": cfg.algo, "agent_name": key,
                   "policy_version": version, **stats, "n_tokens": n_tokens,
                   "loss": m.get("loss", math.nan), "kl": m.get("kl", math.nan),
                   "clip_fraction": m.get("clip_fraction", math.nan),
                   "tokens_per_s": n_tokens * cfg.epochs / m["update_s"] if m.get("update_s") else math.nan,
                   "step_s": step_s, "push_s": push_s, "eval_success": None,
                   "skipped": json.dumps(dict(sorted(skips.items())))}
            out_rows.append(row)
            first = first or row
        write_train_step(cfg.data_dir, out_rows)
        first = dict(first)
        first["metrics"] = {str(k): v for k, v in metrics.items()}
        return first

