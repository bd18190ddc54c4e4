"""The demo's tool-using agent: a plain OpenAI-SDK program (no tracing code, no tracetrain).

One episode answers one question ("What is 37+12?", "How much does item 412 cost?") with
two tools, in the tiny demo model's own format (Qwen2.5-style tool calls written as text)::

    user:      How much does item 412 cost?
    assistant: <tool_call>{"name": "price", "arguments": {"item": 412}}</tool_call>   (LLM call 1)
    tool:      551
    assistant: <answer>551</answer>                                                 (LLM call 2)

The agent runs each tool call it finds (``calc``: ``a+b``, ``a-b``, ``a*b`` on integers;
``price``: the shop's price list) and sends the result back as a ``tool`` message, for at
most MAX_LLM_CALLS calls; the episode ends at the first ``<answer>...</answer>``, or at a
reply that is neither an answer nor a tool call. The assistant's reply goes back into the
conversation as the text it wrote, so the chat template renders the next prompt as the
previous prompt + reply + tool turn (token for token, for canonically tokenised replies).

``<tool_call>`` / ``</tool_call>`` are special tokens of the tiny model's tokenizer, and
vLLM drops special tokens from the text by default: the agent asks for them with
``extra_body={"skip_special_tokens": False}`` (an ordinary vLLM sampling parameter).

Use it as a function (``solve(task) -> answer``: ``tracetrain rollout --agent
examples.tool_agent:solve``) or as a program::

    TRACETRAIN_TASK='{"question": "What is 37+12?"}' python examples/tool_agent.py
    python examples/tool_agent.py "How much does item 412 cost?"

Configuration: OPENAI_BASE_URL (default http://127.0.0.1:8000/v1), OPENAI_API_KEY
(default ``EMPTY``), TOOL_AGENT_MODEL (default ``policy-base``: the name vLLM serves the
base weights under; ``policy`` for a pushed LoRA adapter), TOOL_AGENT_TEMPERATURE (default
1.0: sampling for training rollouts; 0 for greedy evaluation). A task dict's own
``temperature`` / ``model`` keys win over the environment.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading

import openai

MAX_LLM_CALLS = 3
MAX_TOKENS_PER_CALL = 48  # a tool call is ~22 tokens, an answer ~8
DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
DEFAULT_MODEL = "policy-base"

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
_EXPRESSION = re.compile(r"^\s*(-?\d{1,6})\s*([-+*])\s*(-?\d{1,6})\s*$")

_clients: dict[tuple[str, str], openai.OpenAI] = {}
_clients_lock = threading.Lock()


def price_of(item: int) -> int:
    """The shop's price list (the ``price`` tool): deterministic, not memorisable from few examples."""
    return (item * 7919 + 13) % 900 + 10


def calc(expression: str) -> str:
    """The ``calc`` tool: one integer operation, ``a+b`` / ``a-b`` / ``a*b`` (nothing is eval'd)."""
    m = _EXPRESSION.match(expression)
    if not m:
        return "error: bad expression"
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    return str({"+": a + b, "-": a - b, "*": a * b}[op])


def run_tool_call(text: str) -> str:
    """The text of the ``tool`` message for the JSON inside ``<tool_call>...</tool_call>``."""
    try:
        call = json.loads(text)
    except ValueError:
        return "error: tool call is not JSON"
    if not isinstance(call, dict) or not isinstance(call.get("arguments"), dict):
        return "error: tool call needs a name and an arguments object"
    args = call["arguments"]
    if call.get("name") == "calc":
        return calc(str(args.get("expression", "")))
    if call.get("name") == "price":
        item = args.get("item")
        if isinstance(item, str) and item.strip().isdigit():
            item = int(item)
        if not isinstance(item, int) or isinstance(item, bool):
            return "error: item must be an integer"
        return str(price_of(item))
    return "error: unknown tool"


def _client() -> openai.OpenAI:
    """One client per endpoint, shared by the threads of a rollout (it is thread-safe)."""
    key = (os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL, os.environ.get("OPENAI_API_KEY") or "EMPTY")
    with _clients_lock:
        if key not in _clients:
            _clients[key] = openai.OpenAI(base_url=key[0], api_key=key[1], max_retries=2, timeout=120.0)
        return _clients[key]


def _settings(task: dict) -> tuple[str, float]:
    model = task.get("model") or os.environ.get("TOOL_AGENT_MODEL") or DEFAULT_MODEL
    temperature = task.get("temperature", os.environ.get("TOOL_AGENT_TEMPERATURE", 1.0))
    return model, float(temperature)


def solve(task: dict) -> str:
    """Run one episode for ``task["question"]``; return the final answer ("" when none was given)."""
    model, temperature = _settings(task)
    client = _client()
    messages: list[dict] = [{"role": "user", "content": str(task["question"])}]
    for call_index in range(MAX_LLM_CALLS):
        response = client.chat.completions.create(
            model=model, messages=messages, temperature=temperature, max_tokens=MAX_TOKENS_PER_CALL,
            extra_body={"skip_special_tokens": False})
        text = (response.choices[0].message.content or "").split("<|im_end|>", 1)[0]
        answer = _ANSWER.search(text)
        if answer:
            return answer.group(1).strip()
        tool_call = _TOOL_CALL.search(text)
        if not tool_call:
            return ""
        messages.append({"role": "assistant", "content": text})
        messages.append({"role": "tool", "tool_call_id": f"call_{call_index}",
                         "content": run_tool_call(tool_call.group(1))})
    return ""


def _task_from_command_line(argv: list[str]) -> dict:
    raw = argv[1] if len(argv) > 1 else os.environ.get("TRACETRAIN_TASK") or os.environ.get("TASK")
    if not raw:
        sys.exit("usage: tool_agent.py QUESTION|TASK_JSON  (or set TRACETRAIN_TASK to a task JSON)")
    try:
        task = json.loads(raw)
    except ValueError:
        task = raw
    return task if isinstance(task, dict) else {"question": str(task)}


if __name__ == "__main__":
    print(solve(_task_from_command_line(sys.argv)))
