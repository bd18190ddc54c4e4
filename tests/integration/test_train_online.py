"""`train --online`: polls a real collector's store, trains each episode once, checkpoints, resumes
after kill -9, stops cleanly on SIGTERM; offline mode explains an untrainable selection."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.conftest import make_collector
from tests.integration.rl_episodes import Call, Episode, export_episodes
from tracetrain.trainer import model_init, store
from tracetrain.trainer.train_config import TrainConfig
from tracetrain.trainer.train_loop import NothingToTrain, train

ROOT = Path(__file__).resolve().parents[2]
UNIFORM = -math.log(512)  # a random-init tiny model is close to uniform over its 512 tokens


def synthetic(prefix: str, n_tasks: int, group: int, seed: int) -> list[Episode]:
    """Token-level episodes with varied rewards in every group (2 calls each, merged into one row)."""
    rng = random.Random(seed)
    out = []
    for t in range(n_tasks):
        for g in range(group):
            prompt = [rng.randrange(10, 300) for _ in range(12)]
            r1 = [rng.randrange(10, 300) for _ in range(6)]
            prompt2 = prompt + r1 + [rng.randrange(10, 300) for _ in range(4)]
            r2 = [rng.randrange(10, 300) for _ in range(5)]
            ep = Episode(f"{prefix}-{t}-{g}", f"{prefix}-task-{t}", "", reward=float(g % 2))
            ep.calls = [Call(prompt, r1, [UNIFORM] * len(r1)), Call(prompt2, r2, [UNIFORM] * len(r2))]
            out.append(ep)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return model_init.init_model(tmp_path_factory.mktemp("m") / "tiny", size="tiny", seed=0)


def _lineage(data) -> dict[int, list[str]]:
    con = store.connect(data)
    try:
        rows = con.sql("SELECT step, episode_ids FROM checkpoints WHERE run_id = 'r' ORDER BY step").fetchall()
    finally:
        con.close()
    return {step: sorted(ids) for step, ids in rows}


def _wait(predicate, timeout_s: float, what: str, proc=None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"trainer exited ({proc.returncode}) while waiting for {what}:\n"
                                 + proc.stderr.read().decode(errors="replace")[-3000:])
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_online_in_process_trains_each_episode_once(tiny, tmp_path):
    data = tmp_path / "data"
    collector = make_collector(data)
    t0 = time.time_ns()
    try:
        export_episodes(collector.grpc_port, synthetic("a", 2, 4, 0), t0)
        export_episodes(collector.grpc_port, synthetic("w", 1, 3, 5), t0 + 10**9, first_index=100)  # 3 of 4
        cfg = TrainConfig(data_dir=str(data), model_dir=str(tiny), online=True, group_size=4, batch_episodes=8,
                          poll_interval_s=0.1, run_id="r", out_dir=str(tmp_path / "run"), threads=1, max_steps=2)
        stop = threading.Event()
        result = {}
        worker = threading.Thread(target=lambda: result.setdefault("report", train(cfg, stop=stop, progress=False)))
        worker.start()
        _wait(lambda: 1 in _lineage(data), 120, "step 1")
        export_episodes(collector.grpc_port, synthetic("b", 2, 4, 1), t0 + 2 * 10**9, first_index=200)
        worker.join(180)
        assert not worker.is_alive()
    finally:
        stop.set()
        collector.stop()
    report = result["report"]
    assert report.stop_reason == "max_steps" and report.steps_done == 2
    lineage = _lineage(data)
    assert lineage[1] == sorted(e.episode_id for e in synthetic("a", 2, 4, 0))
    assert lineage[2] == sorted(e.episode_id for e in synthetic("b", 2, 4, 1))
    first = report.rows[0]
    assert json.loads(first["skipped"]) == {"incomplete_group": 3}  # the 3-episode group waits, counted
    assert first["n_episodes"] == 8 and first["n_transitions"] == 8 and first["n_tokens"] == 8 * 11
    assert first["reward_mean"] == 0.5 and first["success_rate"] == 0.5


def _spawn(data, tiny, out, *extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "tracetrain.collector", "train", "--data", str(data), "--model", str(tiny),
           "--online", "--group-size", "4", "--batch-episodes", "8", "--poll-interval-s", "0.2", "--run-id", "r",
           "--out", str(out), "--threads", "1", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_online_subprocess_resumes_after_kill_9_and_stops_on_sigterm(tiny, tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    collector = make_collector(data)
    t0 = time.time_ns()
    a, b, c = synthetic("a", 2, 4, 0), synthetic("b", 2, 4, 1), synthetic("c", 2, 4, 2)
    try:
        export_episodes(collector.grpc_port, a, t0)
        export_episodes(collector.grpc_port, b, t0 + 10**9, first_index=100)
        proc = _spawn(data, tiny, out)
        try:
            _wait(lambda: 1 in _lineage(data), 180, "step 1", proc)
            proc.kill()  # kill -9, possibly in the middle of step 2
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
        # restart: resumes from the last checkpoint, trains b exactly once, stops at max_steps
        proc = _spawn(data, tiny, out, "--max-steps", "2")
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stderr.decode(errors="replace")[-3000:]
        summary = json.loads(stdout.decode().strip().splitlines()[-1])
        assert summary["last_step"] == 2 and summary["stop_reason"] == "max_steps"
        lineage = _lineage(data)
        assert lineage == {1: sorted(e.episode_id for e in a), 2: sorted(e.episode_id for e in b)}
        # a third start trains c as step 3, then SIGTERM stops it cleanly
        proc = _spawn(data, tiny, out)
        try:
            export_episodes(collector.grpc_port, c, t0 + 2 * 10**9, first_index=200)
            _wait(lambda: 3 in _lineage(data), 180, "step 3", proc)
            proc.send_signal(signal.SIGTERM)
            stdout, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, stderr.decode(errors="replace")[-3000:]
        assert json.loads(stdout.decode().strip().splitlines()[-1])["stop_reason"] == "stopped"
        assert _lineage(data)[3] == sorted(e.episode_id for e in c)
        assert max(_lineage(data)) == 3  # nothing trained twice, nothing extra
    finally:
        collector.stop()


def test_offline_nothing_trainable_says_why(tiny, tmp_path):
    data = tmp_path / "data"
    collector = make_collector(data)
    try:
        eps = synthetic("z", 1, 4, 3)
        for ep in eps:
            ep.reward = 1.0  # one group, all equal: no signal
        export_episodes(collector.grpc_port, eps, time.time_ns())
    finally:
        collector.stop()
    cfg = TrainConfig(data_dir=str(data), model_dir=str(tiny), group_size=4, batch_episodes=4, run_id="r",
                      out_dir=str(tmp_path / "run"), threads=1)
    report = train(cfg, progress=False)  # a step that learns nothing is still reported, with the reason
    assert report.rows[0]["n_tokens"] == 0 and json.loads(report.rows[0]["skipped"]) == {"zero_variance_group": 4}
    with pytest.raises(NothingToTrain, match=r"4 episodes / (\d+) LLM calls selected; left out: agent_not_selected \1 "
                                             r"\(the store has "
                                             r"4 episodes, 4 match --where; agents with LLM calls: None; --agent: other"):
        train(TrainConfig(data_dir=str(data), model_dir=str(tiny), agents=("other",), run_id="r2",
                          out_dir=str(tmp_path / "run2"), threads=1), progress=False)


def test_lora_one_adapter_per_agent_trains_only_its_own(tiny, tmp_path):
    from safetensors.torch import load_file
    from tracetrain.trainer.policy import LoraSpec, latest_checkpoint, load_policy
    data = tmp_path / "data"
    collector = make_collector(data)
    try:
        export_episodes(collector.grpc_port, synthetic("p", 1, 4, 7), time.time_ns(), agent="planner")
        export_episodes(collector.grpc_port, synthetic("q", 1, 4, 8), time.time_ns(), agent="other", first_index=50)
    finally:
        collector.stop()
    cfg = TrainConfig(data_dir=str(data), model_dir=str(tiny), lora=True, agents=("planner", "coder"), group_size=4,
                      batch_episodes=4, run_id="r", out_dir=str(tmp_path / "run"), threads=1, lr=1e-2)
    report = train(cfg, progress=False)
    assert report.steps_done == 1
    assert report.rows[0]["agent_name"] == "planner" and report.rows[0]["n_tokens"] == 4 * 11
    fresh = load_policy(tiny, lora=LoraSpec(), agents=("planner", "coder"), seed=0)
    ckpt = latest_checkpoint(tmp_path / "run")
    for agent, changed in (("planner", True), ("coder", False)):
        saved = load_file(str(ckpt / "adapters" / f"agent_{agent}" / "adapter_model.safetensors"))
        init = {n: p for n, p in fresh.model.named_parameters() if f".agent_{agent}." in n}
        assert saved and len(saved) == len(init)
        differs = any(not torch.equal(saved[k], init[k.replace(".weight", f".agent_{agent}.weight")])
                      for k in saved)
        assert differs is changed, agent
    con = store.connect(data)
    rows = con.sql("SELECT agent_name, n_episodes FROM train_steps WHERE run_id = 'r'").fetchall()
    con.close()
    assert rows == [("planner", 4)]  # the other agent's episodes were not selected


@pytest.mark.parametrize("algo", ["ppo", "sft"])
def test_offline_ppo_and_sft_train_from_the_store(tiny, tmp_path, algo):
    data = tmp_path / "data"
    collector = make_collector(data)
    try:
        export_episodes(collector.grpc_port, synthetic("s", 2, 4, 11), time.time_ns())
    finally:
        collector.stop()
    where = "reward >= 1" if algo == "sft" else None  # SFT clones the rewarded episodes only
    cfg = TrainConfig(data_dir=str(data), model_dir=str(tiny), algo=algo, batch_episodes=4, group_size=1,
                      where=where, run_id="r", out_dir=str(tmp_path / "run"), threads=1)
    report = train(cfg, progress=False)
    assert report.stop_reason == "data_exhausted"
    assert report.steps_done == (1 if algo == "sft" else 2)
    for row in report.rows:
        assert row["algo"] == algo and row["n_tokens"] == 4 * 11 and math.isfinite(row["loss"])
    if algo == "sft":  # NLL of random tokens under a random-init model: around log(512) = 6.2 nats
        assert 4 < report.rows[0]["loss"] < 10 and report.rows[0]["reward_mean"] == 1.0


def test_algo_apo_dispatches_to_apo(tmp_path):
    from click.testing import CliRunner
    from tracetrain.trainer.cli_train import train_command
    r = CliRunner().invoke(train_command, ["--data", str(tmp_path), "--algo", "apo"])
    assert r.exit_code == 1 and "APO needs --critic-url" in r.output and "Traceback" not in r.output


def test_checkpoint_every_k_steps_keeps_the_lineage_of_each_step(tiny, tmp_path):
    data = tmp_path / "data"
    collector = make_collector(data)
    try:
        export_episodes(collector.grpc_port, synthetic("k", 4, 4, 12), time.time_ns())
    finally:
        collector.stop()
    cfg = TrainConfig(data_dir=str(data), model_dir=str(tiny), group_size=4, batch_episodes=4, checkpoint_every=3,
                      run_id="r", out_dir=str(tmp_path / "run"), threads=1)
    report = train(cfg, progress=False)
    assert report.steps_done == 4 and report.checkpoint.endswith("step-0000000004")
    lineage = _lineage(data)
    assert sorted(lineage) == [3, 4] and len(lineage[3]) == 12 and len(lineage[4]) == 4
    assert sorted(lineage[3] + lineage[4]) == sorted(e.episode_id for e in synthetic("k", 4, 4, 12))
    assert sorted(p.name for p in (tmp_path / "run").glob("step-*")) == ["step-0000000003", "step-0000000004"]
