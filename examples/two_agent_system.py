"""A two-agent system over the demo's tool task: a plain OpenAI-SDK program (no tracetrain import).

Two agents share one episode, one LLM call each, and hand the conversation over::

    user:      How much does item 412 cost?
    caller:    <tool_call>{"name": "price", "arguments": {"item": 412}}</tool_call>   (agent "caller")
    tool:      551
    answerer:  <answer>551</answer>                                                 (agent "answerer")

* **caller** reads the question and writes the tool call; the system runs the tool
  (``calc`` / ``price`` of examples/tool_agent.py);
* **answerer** reads the question, the call and the tool's result and writes the answer.

Each agent's LLM call runs inside its own OpenTelemetry span, ``invoke_agent caller`` /
``invoke_agent answerer``, with the standard GenAI attributes ``gen_ai.operation.name =
invoke_agent`` and ``gen_ai.agent.name``. That is all the trainer needs to tell them apart:
the collector gives every LLM-call span the agent name of its parent span
(``llm_calls.agent_name``), and ``tracetrain train --agent caller`` trains only caller's calls.
Only the OpenTelemetry *API* is used: without an SDK (plain ``python``) the spans are no-ops;
under ``tracetrain rollout`` / ``tracetrain run`` they are exported with the LLM calls.

Each agent can be served by its own model name, so a trained agent can run on its adapter
while the other stays on the base weights: TWO_AGENTS_CALLER_MODEL and
TWO_AGENTS_ANSWERER_MODEL (default: TOOL_AGENT_MODEL, else ``policy-base``). The endpoint,
key and temperature come from the same variables as examples/tool_agent.py (OPENAI_BASE_URL,
OPENAI_API_KEY, TOOL_AGENT_TEMPERATURE); a task's ``temperature`` key wins.

Use it as ``--agent examples/two_agent_system.py:solve`` or as a program::

    python examples/two_agent_system.py "What is 37+12?"
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

from opentelemetry import trace

AGENTS = ("caller", "answerer")
MODEL_VARIABLES = {"caller": "TWO_AGENTS_CALLER_MODEL", "answerer": "TWO_AGENTS_ANSWERER_MODEL"}


def _load_example(file_name: str, module_name: str):
    """Another examples/ file as a module, loaded once.

    Loaded by path because examples/ is not a package and this file is itself loaded by path
    (``--agent examples/two_agent_system.py:solve``).
    """
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, Path(__file__).with_name(file_name))
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


tools = _load_example("tool_agent.py", "tracetrain_example_tool_agent")  # tools, client, reply format
_tracer = trace.get_tracer("two_agent_system")


def model_of(agent: str, task: dict) -> str:
    """The served model name one agent calls (its own variable, else the shared one)."""
    return (task.get(f"{agent}_model") or os.environ.get(MODEL_VARIABLES[agent])
            or os.environ.get("TOOL_AGENT_MODEL") or tools.DEFAULT_MODEL)


def run_agent(agent: str, messages: list[dict], task: dict) -> str:
    """One LLM call by ``agent`` inside its ``invoke_agent`` span; returns the reply's text."""
    temperature = float(task.get("temperature", os.environ.get("TOOL_AGENT_TEMPERATURE", 1.0)))
    attributes = {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": agent}
    with _tracer.start_as_current_span(f"invoke_agent {agent}", attributes=attributes):
        response = tools._client().chat.completions.create(
            model=model_of(agent, task), messages=messages, temperature=temperature,
            max_tokens=tools.MAX_TOKENS_PER_CALL, extra_body={"skip_special_tokens": False})
    return (response.choices[0].message.content or "").split("<|im_end|>", 1)[0]


def solve(task: dict) -> str:
    """One episode: caller writes the tool call, the tool runs, answerer answers ("" when none)."""
    messages: list[dict] = [{"role": "user", "content": str(task["question"])}]
    text = run_agent("caller", messages, task)
    answer = tools._ANSWER.search(text)
    if answer:  # caller answered by itself: the answerer has nothing to do
        return answer.group(1).strip()
    tool_call = tools._TOOL_CALL.search(text)
    if not tool_call:
        return ""
    messages.append({"role": "assistant", "content": text})
    messages.append({"role": "tool", "tool_call_id": "call_0", "content": tools.run_tool_call(tool_call.group(1))})
    answer = tools._ANSWER.search(run_agent("answerer", messages, task))
    return answer.group(1).strip() if answer else ""


def grade(task: dict, answer: str | None) -> float:
    """examples/demo_tasks.py's ``grade_partial``: 1.0 right, 0.1 a wrong number, else 0.0."""
    return _load_example("demo_tasks.py", "tracetrain_example_demo_tasks").grade_partial(task, answer)


if __name__ == "__main__":
    raw = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("TRACETRAIN_TASK")
    if not raw:
        sys.exit("usage: two_agent_system.py QUESTION|TASK_JSON  (or set TRACETRAIN_TASK to a task JSON)")
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = raw
    print(solve(parsed if isinstance(parsed, dict) else {"question": str(parsed)}))
