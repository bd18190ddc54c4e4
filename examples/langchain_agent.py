"""A LangChain agent (langchain-openai ChatOpenAI + a tool): no tracing code, no tracetrain.

The same calculator task as examples/openai_agent.py, written the LangChain way:
a ``@tool``, ``ChatOpenAI.bind_tools``, and a loop that runs the tool calls until
the model answers. LangChain calls the OpenAI client underneath, so the capture
sees its requests like any other.

    pip install 'tracetrain[examples]'
    tracetrain run --task-id t-1 -- python examples/langchain_agent.py "What is 6*7?"

Configuration: task from the first argument or $TASK; OPENAI_BASE_URL (default
http://127.0.0.1:8000/v1), OPENAI_API_KEY (default ``EMPTY``), MODEL (default
``tiny``); ``--stream`` streams the calls. Prints the final answer.
"""

from __future__ import annotations

import argparse
import ast
import operator
import os

from langchain_core.messages import HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

MAX_LLM_CALLS = 4
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.USub: operator.neg}


@tool
def calc(expression: str) -> str:
    """Evaluate an arithmetic expression with + - * / and parentheses."""
    def evaluate(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](evaluate(node.left), evaluate(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](evaluate(node.operand))
        raise ValueError(f"unsupported expression: {expression!r}")
    try:
        result = evaluate(ast.parse(expression, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError) as error:
        return f"error: {error}"
    return str(int(result)) if float(result).is_integer() else str(result)


def run(task: str, stream: bool) -> str:
    llm = ChatOpenAI(model=os.environ.get("MODEL", "tiny"),
                     base_url=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"),
                     api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"), temperature=0.7, max_tokens=128,
                     streaming=stream).bind_tools([calc])
    messages = [SystemMessage("You are a careful calculator agent. Use the calc tool, then answer briefly."),
                HumanMessage(task)]
    for _ in range(MAX_LLM_CALLS):
        reply = llm.invoke(messages)
        messages.append(reply)
        if not reply.tool_calls:
            return str(reply.content)
        for call in reply.tool_calls:
            messages.append(ToolMessage(calc.invoke(call["args"]), tool_call_id=call["id"]))
    return "no answer"


def main() -> None:
    parser = argparse.ArgumentParser(description="A calculator agent on LangChain.")
    parser.add_argument("task", nargs="?", default=os.environ.get("TASK", "What is 6*7?"))
    parser.add_argument("--stream", action="store_true", help="stream the LLM calls")
    args = parser.parse_args()
    print(run(args.task, args.stream))


if __name__ == "__main__":
    main()
