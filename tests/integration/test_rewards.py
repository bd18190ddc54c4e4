"""Rewards computed from stored spans: episode view, verifier, tool-error penalty, SQL, LLM judge, posting back."""

from __future__ import annotations

import json
import socket

import pytest
from click.testing import CliRunner
from tracetrain.trainer import rewards as rw
from tracetrain.trainer.cli_rewards import score_command
from tracetrain.trainer.episode_view import load_episodes
from tracetrain.trainer.openai_chat import ChatError
from tracetrain.trainer.reward_post import post_rewards
from tracetrain.trainer.store import connect

from tests.integration.fake_chat import FakeChat
from tests.integration.otel_episodes import EpisodeWriter

SYSTEM = "You are a careful calculator."


@pytest.fixture
def store(collector, data_dir):
    writer = EpisodeWriter(collector.grpc_port)
    try:
        writer.record("ep-good", "t1", SYSTEM, "What is 6*7?", "The answer is 42.", tool_errors=2, tool_ok=1,
                      reward=0.0, expected="42")
        writer.record("ep-bad", "t1", SYSTEM, "What is 6*7?", "It is 41", tool_errors=1, expected="42")
        writer.record("ep-free", "t2", None, "Say hi", "Hello there", tool_ok=1)
    finally:
        writer.close()
    con = connect(data_dir)
    yield con
    con.close()


def test_episode_view_reads_calls_answers_tools_and_rewards(store):
    good, bad, free = load_episodes(store, ["ep-good", "ep-bad", "ep-free"])
    assert (good.episode_id, good.task_id, good.agent_name) == ("ep-good", "t1", "toy")
    assert good.final_answer == "The answer is 42." and good.system_prompt == SYSTEM
    assert [m["role"] for m in good.llm_calls[0].messages] == ["system", "user"]
    assert len(good.tool_spans) == 3 and len(good.tool_errors) == 2
    assert good.tool_errors[0].tool_name == "calc" and good.tool_errors[0].status_message == "bad expression"
    assert [(r.value, r.name, r.delayed) for r in good.rewards] == [(0.0, "inline", False)] and good.reward == 0.0
    assert good.attributes["task.expected"] == "42"
    assert bad.rewards == [] and bad.reward is None and len(bad.tool_errors) == 1
    assert free.system_prompt is None and free.tool_errors == [] and free.final_answer == "Hello there"
    assert load_episodes(store, ["nope"]) == []
    assert {e.episode_id for e in load_episodes(store)} == {"ep-good", "ep-bad", "ep-free"}


def test_verifier_penalty_and_combination(store):
    verifier = rw.final_answer_verifier("task.expected")
    assert rw.compute_rewards(store, verifier) == {"ep-good": 1.0, "ep-bad": 0.0}  # ep-free: nothing expected
    by_task = rw.final_answer_verifier({"t1": "41", "t2": "hello"})
    assert rw.compute_rewards(store, by_task) == {"ep-good": 0.0, "ep-bad": 1.0, "ep-free": 1.0}
    penalty = rw.tool_error_penalty(0.25)
    assert rw.compute_rewards(store, penalty) == {"ep-good": -0.5, "ep-bad": -0.25, "ep-free": -0.0}
    assert rw.compute_rewards(store, rw.tool_error_penalty(0.25, max_penalty=0.3), ["ep-good"]) == {"ep-good": -0.3}
    both = rw.combine(verifier, penalty)
    assert rw.compute_rewards(store, both) == {"ep-good": 0.5, "ep-bad": -0.25, "ep-free": -0.0}


def test_sql_rewards_and_bad_functions(store):
    sql = "SELECT episode_id, n_llm_calls * 2.0 FROM episodes"
    assert rw.compute_rewards(store, sql) == {"ep-good": 2.0, "ep-bad": 2.0, "ep-free": 2.0}
    assert rw.compute_rewards(store, "sql:" + sql, ["ep-bad"]) == {"ep-bad": 2.0}
    with pytest.raises(rw.RewardError, match="exactly two columns"):
        rw.compute_rewards(store, "SELECT episode_id FROM episodes")
    with pytest.raises(rw.RewardError, match="reward SQL failed"):
        rw.compute_rewards(store, "SELECT nope FROM episodes")
    with pytest.raises(rw.RewardError, match="finite number"):
        rw.compute_rewards(store, lambda episode: float("nan"))
    report = rw.score_episodes(store, lambda e: 1 / 0 if e.episode_id == "ep-bad" else 1.0, on_error="skip")
    assert report.rewards == {"ep-good": 1.0, "ep-free": 1.0}
    assert "ZeroDivisionError" in report.errors["ep-bad"]
    progress: list[int] = []
    chunked = rw.score_episodes(store, rw.tool_error_penalty(1.0), ["ep-good", "nope", "ep-bad"], chunk_episodes=2,
                                on_progress=progress.append)
    assert (chunked.rewards, chunked.missing, progress) == ({"ep-good": -2.0, "ep-bad": -1.0}, ["nope"], [2, 1])


def test_resolve_reward_fn_specs(store, tmp_path):
    module = tmp_path / "my_rewards.py"
    module.write_text("def reward(episode):\n    return len(episode.final_answer or '')\n")
    from_file = rw.resolve_reward_fn(f"{module}:reward")
    assert from_file(store, ["ep-free"]) == {"ep-free": float(len("Hello there"))}
    from_sql = rw.resolve_reward_fn("sql:SELECT episode_id, 3 FROM episodes WHERE task_id = 't2'")
    assert from_sql(store, None) == {"ep-free": 3.0}
    builtin = rw.resolve_reward_fn("tracetrain.trainer.rewards:episode_transcript")  # returns text, not a number
    with pytest.raises(rw.RewardError, match="finite number"):
        builtin(store, ["ep-good"])
    for bad, message in (("nocolon", "module:function"), ("no_such_module_x:f", "cannot import"),
                         (f"{module}:missing", "has no"), ("tracetrain.trainer.rewards:SQL_PREFIX", "not callable")):
        with pytest.raises(rw.RewardError, match=message):
            rw.resolve_reward_fn(bad)


def _judge_script(request: dict) -> str:
    transcript = request["messages"][1]["content"]
    return "Correct and short.\nSCORE: 8" if "42." in transcript else "Looks plausible to me."


def test_llm_judge_scores_and_counts_malformed_answers(store):
    with FakeChat(_judge_script) as fake:
        judge = rw.llm_judge(fake.url, "judge-model", "Is 6*7 answered right?", api_key="k-1")
        report = rw.score_episodes(store, judge, ["ep-good", "ep-bad"], on_error="skip", workers=2)
        assert report.rewards == {"ep-good": 0.8}
        assert "ep-bad" in report.errors["ep-bad"] and "SCORE" in report.errors["ep-bad"]
        with pytest.raises(rw.JudgeOutputError, match="no 'SCORE"):
            rw.compute_rewards(store, judge, ["ep-bad"])
        request = fake.requests[0]
        assert request["_path"] == "/v1/chat/completions" and request["_auth"] == "Bearer k-1"
        assert request["model"] == "judge-model" and "Is 6*7 answered right?" in request["messages"][0]["content"]
        assert "[system] You are a careful calculator." in request["messages"][1]["content"]
    with FakeChat(lambda r: "SCORE: 12") as fake:
        with pytest.raises(rw.JudgeOutputError, match="outside 0..10"):
            rw.compute_rewards(store, rw.llm_judge(fake.url, "m", "r"), ["ep-good"])
    with FakeChat(lambda r: (400, b'{"error": {"message": "model m does not exist"}}')) as fake:
        with pytest.raises(ChatError, match="HTTP 400.*model m does not exist"):
            rw.compute_rewards(store, rw.llm_judge(fake.url, "m", "r"), ["ep-good"])
    with FakeChat(lambda r: (200, b"not json")) as fake:
        with pytest.raises(ChatError, match="not a chat completion"):
            rw.compute_rewards(store, rw.llm_judge(fake.url, "m", "r"), ["ep-good"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(ChatError, match=r"cannot reach .*Connection refused \(after 2 attempts\)"):
        rw.compute_rewards(store, rw.llm_judge(f"http://127.0.0.1:{closed}", "m", "r", timeout_s=2, attempts=2),
                           ["ep-good"])


def _episode_reward(con, episode_id):
    return con.execute("SELECT reward, n_rewards, n_delayed_rewards FROM episodes WHERE episode_id = ?",
                       [episode_id]).fetchone()


def test_posted_rewards_are_stored_once_and_become_the_episode_reward(store, collector):
    url = f"http://127.0.0.1:{collector.http_port}"
    computed = rw.compute_rewards(store, rw.final_answer_verifier("task.expected"))
    report = post_rewards(url, computed, name="verifier")
    assert (report.stored, report.duplicate, report.failed) == (2, 0, {})
    assert _episode_reward(store, "ep-good") == (1.0, 2, 1) and _episode_reward(store, "ep-bad") == (0.0, 1, 1)
    again = post_rewards(url, computed, name="verifier")
    assert (again.stored, again.duplicate) == (0, 2) and _episode_reward(store, "ep-good") == (1.0, 2, 1)
    (good,) = load_episodes(store, ["ep-good"])
    assert [(r.name, r.delayed) for r in good.rewards] == [("inline", False), ("verifier", True)]
    unknown = post_rewards(url, {"ep-nope": 1.0})
    assert "404" in unknown.failed["ep-nope"] and "ep-nope" in unknown.failed["ep-nope"]


def test_score_command(store, collector, data_dir):
    runner = CliRunner()
    result = runner.invoke(score_command, ["--data", str(data_dir), "--verify-key", "task.expected",
                                           "--tool-error-penalty", "0.25", "--where", "task_id = 't1'",
                                           "--post", f"http://127.0.0.1:{collector.http_port}", "--name", "v+p"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted((r["episode_id"], r["reward"]) for r in lines) == [("ep-bad", -0.25), ("ep-good", 0.5)]
    assert "scored 2 of 2 episodes" in result.stderr and "stored 2" in result.stderr
    assert _episode_reward(store, "ep-good")[0] == 0.5
    with FakeChat(_judge_script) as fake:
        result = runner.invoke(score_command, ["--data", str(data_dir), "--judge-url", fake.url])
    assert result.exit_code == 1 and "scored 1 of 3 episodes; 0 without a reward, 2 failed" in result.stderr and "no 'SCORE" in result.stderr
    assert [json.loads(line)["episode_id"] for line in result.stdout.splitlines()] == ["ep-good"]
    for args, message in ((["--sql", "SELECT 1, 2", "--verify-key", "x"], "do not combine"),
                          ([], "give a reward"), (["--fn", "nope"], "module:function"),
                          (["--verify-key", "x", "--where", "bogus_column = 1"], "--where")):
        result = runner.invoke(score_command, ["--data", str(data_dir), *args])
        assert result.exit_code == 2 and message in result.output, result.output
    result = runner.invoke(score_command, ["--data", str(data_dir / "missing"), "--verify-key", "x"])
    assert result.exit_code == 1 and "not a tracetrain span store" in result.output
