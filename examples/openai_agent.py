"""A plain tool-using agent on the OpenAI Python SDK: no tracing code, no tracetrain.

It answers arithmetic questions with a ``calc`` tool: ask the model, run the tool
calls it makes, send the results back, until it answers (2 LLM calls for one
calculation, at most MAX_LLM_CALLS). It gives itself no reward; rewards come from
outside (a grader, ``tracetrain reward``).

Run it as is against any OpenAI-compatible endpoint, or with capture:

    tracetrain run --task-id t-1 -- python examples/openai_agent.py "What is 12*7+3?"
    opentelemetry-instrument python examples/openai_agent.py      # task from $TASK

Configuration: the task is the first argument, else $TASK; OPENAI_BASE_URL
(default http://127.0.0.1:8000/v1, e.g. vLLM or examples/fake_vllm_server.py),
OPENAI_API_KEY (default ``EMPTY``; vLLM takes any), MODEL (default ``tiny``).
``--stream`` streams every call, ``--async`` uses AsyncOpenAI, ``--n N`` asks for
N choices per call (the agent follows the first). Prints the final answer.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import json
import operator
import os

import openai

MAX_LLM_CALLS = 4
SYSTEM_PROMPT = "You are a careful calculator agent. Use the calc tool for arithmetic, then answer briefly."
CALC_TOOL = {"type": "function", "function": {
    "name": "calc", "description": "Evaluate an arithmetic expression with + - * / and parentheses.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.USub: operator.neg, ast.UAdd: operator.pos}


def calc(expression: str) -> str:
    """The tool: arithmetic only (no eval of arbitrary code)."""
    def evaluate(node):
        if isinstance(node, ast.Expression):
            return evaluate(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](evaluate(node.left), evaluate(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](evaluate(node.operand))
        raise ValueError(f"unsupported expression: {expression!r}")
    try:
        result = evaluate(ast.parse(expression, mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError) as error:
        return f"error: {error}"
    return str(int(result)) if float(result).is_integer() else str(result)


def _collect_stream(chunks) -> dict:
    """Rebuild the first choice's message from streamed chunks."""
    message = {"role": "assistant", "content": "", "tool_calls": {}}
    for chunk in chunks:
        for choice in chunk.choices:
            if choice.index != 0:
                continue
            message["content"] += choice.delta.content or ""
            for call in choice.delta.tool_calls or ():
                slot = message["tool_calls"].setdefault(call.index, {"id": None, "name": "", "arguments": ""})
                slot["id"] = call.id or slot["id"]
                if call.function:
                    slot["name"] += call.function.name or ""
                    slot["arguments"] += call.function.arguments or ""
    return message


def _from_response(response) -> dict:
    choice = response.choices[0].message
    calls = {i: {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
             for i, c in enumerate(choice.tool_calls or ())}
    return {"role": "assistant", "content": choice.content or "", "tool_calls": calls}


def _next_messages(messages: list[dict], reply: dict) -> list[dict] | None:
    """History after the model's reply and the tool results, or None when it answered."""
    if not reply["tool_calls"]:
        return None
    calls = [reply["tool_calls"][i] for i in sorted(reply["tool_calls"])]
    messages = messages + [{"role": "assistant", "content": reply["content"] or None, "tool_calls": [
        {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
        for c in calls]}]
    for call in calls:
        arguments = json.loads(call["arguments"] or "{}")
        messages.append({"role": "tool", "tool_call_id": call["id"], "content": calc(arguments.get("expression", ""))})
    return messages


def run_sync(client: openai.OpenAI, model: str, task: str, stream: bool, n: int) -> str:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": task}]
    for _ in range(MAX_LLM_CALLS):
        response = client.chat.completions.create(model=model, messages=messages, tools=[CALC_TOOL], n=n,
                                                  stream=stream, temperature=0.7, max_tokens=128)
        reply = _collect_stream(response) if stream else _from_response(response)
        following = _next_messages(messages, reply)
        if following is None:
            return reply["content"]
        messages = following
    return "no answer"


async def run_async(client: openai.AsyncOpenAI, model: str, task: str, stream: bool, n: int) -> str:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": task}]
    for _ in range(MAX_LLM_CALLS):
        response = await client.chat.completions.create(model=model, messages=messages, tools=[CALC_TOOL], n=n,
                                                        stream=stream, temperature=0.7, max_tokens=128)
        reply = _collect_stream([chunk async for chunk in response]) if stream else _from_response(response)
        following = _next_messages(messages, reply)
        if following is None:
            return reply["content"]
        messages = following
    return "no answer"


def main() -> None:
    parser = argparse.ArgumentParser(description="A calculator agent on the OpenAI SDK.")
    parser.add_argument("task", nargs="?", default=os.environ.get("TASK", "What is 12*7+3?"))
    parser.add_argument("--stream", action="store_true", help="stream every LLM call")
    parser.add_argument("--async", dest="use_async", action="store_true", help="use AsyncOpenAI")
    parser.add_argument("--n", type=int, default=1, help="choices per LLM call (the agent follows the first)")
    args = parser.parse_args()
    base_url = os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1")
    api_key = os.environ.get("OPENAI_API_KEY", "EMPTY")
    model = os.environ.get("MODEL", "tiny")
    if args.use_async:
        answer = asyncio.run(run_async(openai.AsyncOpenAI(base_url=base_url, api_key=api_key), model, args.task,
                                       args.stream, args.n))
    else:
        answer = run_sync(openai.OpenAI(base_url=base_url, api_key=api_key), model, args.task, args.stream, args.n)
    print(answer)


if __name__ == "__main__":
    main()
