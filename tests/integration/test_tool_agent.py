"""examples/tool_agent.py against a scripted OpenAI-compatible server (stdlib HTTP, real sockets)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("openai")
ROOT = Path(__file__).resolve().parents[2]
AGENT = ROOT / "examples" / "tool_agent.py"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


tool_agent = _load("tool_agent")
demo_tasks = _load("demo_tasks")


def scripted_reply(messages: list[dict], mode: str) -> str:
    """What the tiny model writes when it gets everything right (vLLM text, special tokens kept)."""
    last = messages[-1]
    if mode == "chatty":
        return "I think it is about twelve."
    if last["role"] == "tool" and mode != "loop":
        return f"<answer>{last['content']}</answer>"
    question = messages[0]["content"]
    numbers = re.findall(r"\d+", question)
    if "item" in question:
        call = {"name": "price", "arguments": {"item": int(numbers[0])}}
    else:
        op = "+" if "+" in question else "-"
        call = {"name": "calc", "arguments": {"expression": f"{numbers[0]}{op}{numbers[1]}"}}
    return "<tool_call>" + json.dumps(call) + "</tool_call>"


@pytest.fixture()
def server():
    state = {"requests": [], "mode": "right", "lock": threading.Lock()}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state["lock"]:
                state["requests"].append(body)
            text = scripted_reply(body["messages"], state["mode"])
            out = json.dumps({"id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                              "choices": [{"index": 0, "finish_reason": "stop",
                                           "message": {"role": "assistant", "content": text}}],
                              "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state["base_url"] = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture()
def env(server, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", server["base_url"])
    monkeypatch.setenv("OPENAI_API_KEY", "EMPTY")
    monkeypatch.delenv("TOOL_AGENT_MODEL", raising=False)
    monkeypatch.delenv("TOOL_AGENT_TEMPERATURE", raising=False)
    return server


def test_two_call_episode_with_tool_turn(env):
    task = {"id": "t1", "question": "How much does item 412 cost?", "answer": str(tool_agent.price_of(412)),
            "temperature": 0}
    answer = tool_agent.solve(task)
    assert answer == task["answer"] and demo_tasks.grade(task, answer) == 1.0
    first, second = env["requests"]
    assert first["model"] == "policy-base" and first["temperature"] == 0
    assert first["skip_special_tokens"] is False  # <tool_call> is a special token: keep it in the text
    assert first["messages"] == [{"role": "user", "content": task["question"]}]
    assert second["messages"][:1] == first["messages"]
    assert second["messages"][1] == {"role": "assistant",
                                     "content": '<tool_call>{"name": "price", "arguments": {"item": 412}}</tool_call>'}
    assert second["messages"][2]["role"] == "tool" and second["messages"][2]["content"] == task["answer"]


def test_held_out_tasks_concurrently_default_temperature(env, monkeypatch):
    monkeypatch.setenv("TOOL_AGENT_MODEL", "policy")
    tasks = demo_tasks.make_tasks(48, demo_tasks.HELDOUT_SEED, "heldout")
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(tool_agent.solve, tasks))
    assert [demo_tasks.grade(t, a) for t, a in zip(tasks, answers)] == [1.0] * len(tasks)
    assert len(env["requests"]) == 2 * len(tasks)
    assert {r["model"] for r in env["requests"]} == {"policy"} and {r["temperature"] for r in env["requests"]} == {1.0}


def test_no_answer_ends_the_episode(env):
    env["mode"] = "chatty"
    assert tool_agent.solve({"question": "What is 3+4?"}) == ""
    assert len(env["requests"]) == 1
    env["mode"], env["requests"][:] = "loop", []
    assert tool_agent.solve({"question": "What is 3+4?"}) == ""
    assert len(env["requests"]) == tool_agent.MAX_LLM_CALLS


def test_runs_as_a_program_from_tracetrain_task(env):
    run_env = dict(os.environ, OPENAI_BASE_URL=env["base_url"], TOOL_AGENT_TEMPERATURE="0",
                   TRACETRAIN_TASK=json.dumps({"id": "x", "question": "What is 37-50?", "answer": "-13"}))
    out = subprocess.run([sys.executable, str(AGENT)], env=run_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "-13"
    out = subprocess.run([sys.executable, str(AGENT), "What is 37+50?"], env=run_env, capture_output=True,
                         text=True, timeout=60)
    assert out.stdout.strip() == "87"
    assert all(r["temperature"] == 0 for r in env["requests"])
