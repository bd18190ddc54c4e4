"""APO end to end: a scripted critic (stdlib fake OpenAI server), a toy agent whose reward depends on its
system prompt and whose episodes land in a real collector, versioned prompt files, train_steps rows."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from tracetrain.trainer import prompt_store
from tracetrain.trainer.apo import ApoConfig, ApoError, apo_config_from, prompt_environment, run_apo
from tracetrain.trainer.apo_critic import parse_prompts
from tracetrain.trainer.cli_apo import apo_command, load_apo_config, prompt_command
from tracetrain.trainer.store import connect

from tests.integration.fake_chat import FakeChat
from tests.integration.otel_episodes import EpisodeWriter

ROOT = Path(__file__).resolve().parents[2]
TASKS = [{"id": "t1", "question": "6*7?", "answer": "42"}, {"id": "t2", "question": "2+2?", "answer": "4"}]
BASE = "You are a calculator."
STEP = "Think step by step."
FULL = "Think step by step. End with 'Final answer:'."


def prompt_reward(prompt: str) -> float:
    """The toy agent's success: 0.5 per key phrase the critic can propose."""
    return 0.5 * ("step by step" in prompt) + 0.5 * ("final answer" in prompt.lower())


def critic_script(request: dict) -> str:
    """Critique first; then edits that depend on the prompt under critique."""
    current = re.search(r"<current>\n(.*?)\n</current>", request["messages"][1]["content"], re.DOTALL).group(1)
    if request["messages"][-1]["role"] == "user" and len(request["messages"]) == 2:
        return "The prompt never asks the agent to reason step by step or to mark its final answer."
    if "step by step" in current:
        return f"<prompt>{FULL}</prompt>\n<prompt>{STEP} Be brief.</prompt>"
    return f"Here you go:\n<prompt>Be brief.</prompt>\n<prompt>{STEP}</prompt>"


class ToyAgent:
    """Reads its prompt from $SYSTEM_PROMPT like an unchanged agent; emits spans and its reward itself."""

    def __init__(self, writer: EpisodeWriter) -> None:
        self.writer = writer

    def __call__(self, task: dict) -> None:
        prompt = os.environ["SYSTEM_PROMPT"]
        reward = prompt_reward(prompt)
        answer = f"Final answer: {task['answer']}" if reward == 1.0 else "I don't know"
        self.writer.record(task["episode_id"], task["id"], prompt, task["question"], answer, reward=reward)
        # the reward is read back from the store


def test_apo_improves_the_prompt_publishes_versions_and_records_rounds(collector, data_dir):
    writer = EpisodeWriter(collector.grpc_port)
    try:
        with FakeChat(critic_script) as critic:
            cfg = ApoConfig(data_dir=str(data_dir), critic_url=critic.url, critic_model="critic-1",
                            agent=ToyAgent(writer), tasks=TASKS, rounds=2, candidates=2, beam_width=2,
                            prompt_name="calc", initial_prompt=BASE, evaluation="inline", run_id="apo-test")
            result = run_apo(cfg)
    finally:
        writer.close()
    assert (result.baseline_score, result.best.score, result.best.prompt, result.best.version) == (0.0, 1.0, FULL, 3)
    resources = data_dir / "resources"
    assert prompt_store.versions(resources, "calc") == [1, 2, 3]
    v1, v2, v3 = (prompt_store.load_version(resources, "calc", n) for n in (1, 2, 3))
    assert (v1.prompt, v1.parent_version, v1.score) == (BASE, None, 0.0)
    assert (v2.prompt, v2.parent_version, v2.score) == (STEP, 1, 0.5)
    assert (v3.prompt, v3.parent_version, v3.score) == (FULL, 2, 1.0)
    assert v2.critiqued_episode_ids == ["apo-test-r0-t1-0", "apo-test-r0-t2-0"]
    assert "step by step" in v2.critique and v3.run_id == "apo-test" and len(v3.eval_episode_ids) == 2
    assert prompt_store.current_prompt(resources, "calc") == FULL
    assert prompt_environment(resources, "calc", base={})["SYSTEM_PROMPT"] == FULL
    # the critic read the failed episodes from the store: their system prompt and final answer
    first = critic.requests[0]["messages"][1]["content"]
    assert "[system] You are a calculator." in first and "[final answer] I don't know" in first
    assert "apo-test-r0-t1-0" in first
    con = connect(data_dir)
    try:
        steps = con.execute("SELECT step, algo, reward_mean, policy_version, n_episodes, success_rate, skipped "
                            "FROM train_steps WHERE run_id = 'apo-test' ORDER BY step").fetchall()
        evaluated = con.execute("SELECT count(*) FROM episodes WHERE episode_id LIKE 'apo-test-%'").fetchone()[0]
    finally:
        con.close()
    assert [s[:5] for s in steps] == [(1, "apo", 0.0, 1, 2), (2, "apo", 0.5, 2, 2), (3, "apo", 1.0, 3, 2)]
    assert steps[2][5] == 1.0 and json.loads(steps[2][6]) == {"duplicate_prompt": 1}
    assert evaluated == 2 + 4 + 2  # baseline, 2 candidates, then 1 new + 1 duplicate left out


def test_parse_prompts_forms():
    assert parse_prompts("x <prompt> a </prompt> <PROMPT>b</PROMPT> <prompt>a</prompt>") == ["a", "b"]
    assert parse_prompts('{"prompts": ["p1", "p2"]}') == ["p1", "p2"]
    assert parse_prompts("no prompts here") == []


def _file_agent(tmp_path):
    path = tmp_path / "agent_mod.py"
    path.write_text("import os\n"
                    "def run(task):\n"
                    "    p = os.environ['SYSTEM_PROMPT']\n"
                    "    assert task['system_prompt'] == p\n"
                    "    return {'reward': 0.5 * ('step by step' in p) + 0.5 * ('final answer' in p.lower())}\n")
    return f"{path}:run"


def test_apo_command_resumes_from_the_published_prompt_and_reports_bad_critics(collector, data_dir, tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(t) + "\n" for t in TASKS))
    resources = data_dir / "resources"
    prompt_store.publish(resources, "calc", STEP, score=None)
    runner = CliRunner()
    with FakeChat(critic_script) as critic:
        args = ["--data", str(data_dir), "--critic-url", critic.url, "--agent", _file_agent(tmp_path),
                "--tasks", str(tasks), "--rounds", "1", "--candidates", "1", "--prompt-name", "calc",
                "--evaluation", "inline", "--run-id", "apo-cli"]
        result = runner.invoke(apo_command, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert (out["baseline_score"], out["best_score"], out["best_version"], out["prompt"]) == (0.5, 1.0, 2, FULL)
    assert "round 1: best candidate 1.0000, current version v2" in result.stderr
    shown = runner.invoke(prompt_command, ["--data", str(data_dir), "--name", "calc", "--json"])
    assert json.loads(shown.stdout)["parent_version"] == 1 and json.loads(shown.stdout)["prompt"] == FULL
    back = runner.invoke(prompt_command, ["--data", str(data_dir), "--name", "calc", "--version", "1", "--set-current"])
    assert back.exit_code == 0 and back.stdout.strip() == STEP
    assert prompt_store.current_prompt(resources, "calc") == STEP
    missing = runner.invoke(prompt_command, ["--data", str(data_dir), "--name", "nothing"])
    assert missing.exit_code == 1 and "does not exist" in missing.output

    with FakeChat(lambda r: "I have no idea what to change.") as critic:
        result = runner.invoke(apo_command, [*args[:2], "--critic-url", critic.url, *args[4:-1], "apo-bad"])
    assert result.exit_code == 0, result.output  # a round without usable proposals is recorded, not fatal
    con = connect(data_dir)
    try:
        (skipped,) = con.execute("SELECT skipped FROM train_steps WHERE run_id = 'apo-bad' AND step = 2").fetchone()
    finally:
        con.close()
    assert json.loads(skipped) == {"critic_unparseable": 1}
    with FakeChat(lambda r: (401, b'{"error": {"message": "bad key"}}')) as critic:
        result = runner.invoke(apo_command, [*args[:2], "--critic-url", critic.url, *args[4:-1], "apo-401"])
    assert result.exit_code == 1 and "HTTP 401" in result.output and "bad key" in result.output
    result = runner.invoke(apo_command, ["--data", str(data_dir), "--critic-url", "http://x", "--agent",
                                         _file_agent(tmp_path), "--tasks", str(tasks), "--prompt-name", "fresh"])
    assert result.exit_code == 1 and "no starting prompt" in result.output


def test_apo_config_layers(tmp_path):
    toml = tmp_path / "t.toml"
    toml.write_text('[apo]\nrounds = 5\ncritic_model = "from-toml"\ncandidates = 2\n')
    cfg = load_apo_config({"candidates": 7}, toml, environ={"TRACETRAIN_APO_ROUNDS": "6"})
    assert (cfg.rounds, cfg.critic_model, cfg.candidates) == (6, "from-toml", 7)
    toml.write_text("[apo]\nbogus = 1\n")
    with pytest.raises(ApoError, match="unknown keys"):
        load_apo_config(None, toml, environ={})
    with pytest.raises(ApoError, match="rounds must be >= 1"):
        ApoConfig(rounds=0)


def test_train_config_maps_onto_apo_settings(tmp_path, monkeypatch):
    """`tracetrain train --algo apo` hands run_apo its TrainConfig; the rest comes from [apo] and the env."""
    from tracetrain.trainer.train_config import TrainConfig

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tracetrain.toml").write_text('[apo]\ncritic_url = "http://critic"\nrounds = 2\n')
    monkeypatch.setenv("TRACETRAIN_APO_PROMPT_NAME", "calc")
    train = TrainConfig(data_dir="/d", algo="apo", where="reward < 1", run_id="r-1", success_threshold=0.5,
                        agents=("solver",))
    cfg = apo_config_from(train)
    assert (cfg.data_dir, cfg.where, cfg.run_id, cfg.success_threshold, cfg.agent_name) == (
        "/d", "reward < 1", "r-1", 0.5, "solver")
    assert (cfg.critic_url, cfg.rounds, cfg.prompt_name) == ("http://critic", 2, "calc")


@pytest.mark.slow
def test_apo_through_the_rollout_runner_with_a_command_agent(collector, data_dir):
    """--evaluation rollout: one process per run (tracetrain rollout's runner), prompt in $SYSTEM_PROMPT."""
    agent = f"{sys.executable} {ROOT / 'tests' / 'integration' / 'agents' / 'apo_prompt_agent.py'}"
    with FakeChat(critic_script) as critic:
        cfg = ApoConfig(data_dir=str(data_dir), critic_url=critic.url, agent=agent, tasks=TASKS[:1], rounds=1,
                        candidates=2, prompt_name="calc", initial_prompt=BASE, evaluation="rollout",
                        collector_url=f"http://127.0.0.1:{collector.grpc_port}", run_id="apo-roll", timeout_s=60)
        result = run_apo(cfg)
    assert (result.baseline_score, result.best.score, result.best.prompt, result.best.version) == (0.0, 0.5, STEP, 2)
    assert "apo-roll-r0-t1-0" in critic.requests[0]["messages"][1]["content"]
    con = connect(data_dir)
    try:
        rewards = dict(con.execute("SELECT episode_id, reward FROM episodes WHERE episode_id LIKE 'apo-roll-r1%'")
                       .fetchall())
    finally:
        con.close()
    assert sorted(rewards.values()) == [0.0, 0.5]  # the rollout runner stored each run's reward


def test_apo_without_a_span_store_uses_what_the_runner_saw(tmp_path):
    """An inline agent that returns its reward needs no collector: the critic sees the task and the answer."""
    data = tmp_path / "no-store"
    with FakeChat(critic_script) as critic:
        cfg = ApoConfig(data_dir=str(data), critic_url=critic.url, agent=_file_agent(tmp_path), tasks=TASKS[:1],
                        rounds=1, candidates=2, initial_prompt=BASE, evaluation="inline", run_id="apo-bare")
        result = run_apo(cfg)
    assert (result.best.prompt, result.best.version, result.best.score) == (STEP, 2, 0.5)
    assert '"question": "6*7?"' in critic.requests[0]["messages"][1]["content"]
    steps = sorted(p.name for p in (data / "training" / "train_steps" / "run=apo-bare").iterdir())
    assert steps == ["step-0000000001.parquet", "step-0000000002.parquet"]
    assert prompt_store.current_prompt(data / "resources", "system") == STEP
