"""The demo's tasks and grader (examples/demo_tasks.py) and the tools of examples/tool_agent.py."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


demo_tasks = _load("demo_tasks")


def _key(task: dict) -> str:
    q = task["question"]
    digits = [int(x) for x in "".join(c if c.isdigit() else " " for c in q).split()]
    return demo_tasks.problem_key(task["kind"], *digits)


def test_heldout_is_fixed_distinct_balanced_and_disjoint_from_train():
    held = demo_tasks.make_tasks(256, demo_tasks.HELDOUT_SEED, "heldout")
    assert held == demo_tasks.make_tasks(256, demo_tasks.HELDOUT_SEED, "heldout")
    train = demo_tasks.make_tasks(4800, 0, "train")
    held_keys = {_key(t) for t in held}
    assert len(held_keys) == 256  # no problem twice
    assert not held_keys & {_key(t) for t in train}
    assert all(demo_tasks.is_heldout(k) for k in held_keys)
    kinds = Counter(t["kind"] for t in held)
    assert set(kinds) == {"add", "sub", "price"} and 100 <= kinds["price"] <= 156
    assert len({t["id"] for t in train + held}) == len(train) + len(held)
    assert not any("*" in t["question"] for t in train + held)


def test_answers_are_right():
    for t in demo_tasks.make_tasks(200, 3, "train"):
        a, *rest = [int(x) for x in "".join(c if c.isdigit() else " " for c in t["question"]).split()]
        want = {"add": lambda: a + rest[0], "sub": lambda: a - rest[0], "price": lambda: demo_tasks.price_of(a)}
        assert t["answer"] == str(want[t["kind"]]())


def test_grade_is_exact_match():
    task = {"id": "t", "question": "What is 50-60?", "answer": "-10"}
    assert demo_tasks.grade(task, "-10") == 1.0
    assert demo_tasks.grade(task, " -10 ") == 1.0
    assert demo_tasks.grade(task, "10") == 0.0
    assert demo_tasks.grade(task, "-10.0") == 0.0
    assert demo_tasks.grade(task, "") == 0.0
    assert demo_tasks.grade(task, None) == 0.0


def test_cli_writes_jsonl(tmp_path):
    demo_tasks.main(["--out", str(tmp_path), "--train", "40", "--heldout", "16"])
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (tmp_path / "heldout.jsonl").read_text().splitlines()]
    assert len(train) == 40 and len(held) == 16
    assert set(train[0]) == {"id", "question", "answer", "kind"}
    with pytest.raises(ValueError, match="split"):
        demo_tasks.make_tasks(1, 0, "dev")


def test_same_split_and_prices_as_the_warmup():
    warmup = pytest.importorskip("tracetrain.trainer.warmup")
    tool_agent = _load("tool_agent")
    for item in range(100, 1000):
        assert demo_tasks.price_of(item) == warmup.price_of(item) == tool_agent.price_of(item)
        key = demo_tasks.problem_key("price", item)
        assert key == warmup.problem_key("price", item) and demo_tasks.is_heldout(key) == warmup.is_heldout(key)
    for a in range(2, 100):
        for kind in ("add", "sub"):
            key = demo_tasks.problem_key(kind, a, 101 - a)
            assert demo_tasks.is_heldout(key) == warmup.is_heldout(key)
    assert demo_tasks.CALC_PHRASES == warmup._CALC_PHRASES and demo_tasks.PRICE_PHRASES == warmup._PRICE_PHRASES
    # the warm-up's demonstrations never show a held-out problem
    held = {_key(t) for t in demo_tasks.make_tasks(256, demo_tasks.HELDOUT_SEED, "heldout")}
    demos = warmup.make_examples("tools", 256, 0)
    assert not held & {_key({"question": d["messages"][0]["content"], "kind": d["kind"]}) for d in demos}


def test_agent_tools():
    tool_agent = _load("tool_agent")
    assert tool_agent.run_tool_call('{"name": "calc", "arguments": {"expression": "37+12"}}') == "49"
    assert tool_agent.run_tool_call('{"name": "calc", "arguments": {"expression": "7-12"}}') == "-5"
    assert tool_agent.run_tool_call('{"name": "price", "arguments": {"item": 412}}') == str(tool_agent.price_of(412))
    assert tool_agent.run_tool_call('{"name": "price", "arguments": {"item": "412"}}') == str(tool_agent.price_of(412))
    assert tool_agent.run_tool_call('{"name": "calc", "arguments": {"expression": "__import__(1)"}}').startswith("error")
    assert tool_agent.run_tool_call('{"name": "shell", "arguments": {}}') == "error: unknown tool"
    assert tool_agent.run_tool_call("{nope").startswith("error")
    assert tool_agent.run_tool_call('{"name": "price", "arguments": {"item": true}}').startswith("error")
