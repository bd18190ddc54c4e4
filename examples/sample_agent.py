"""A sample tool-using agent that emits training-grade GenAI spans.

It solves small arithmetic tasks with a scripted "model" and a calculator tool,
and is configured for export ONLY through the standard OpenTelemetry variables
(OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_PROTOCOL, OTEL_SERVICE_NAME...),
like any agent you point at tracetrain. Until the trainer and the vLLM-backed
example agents land, it stands in for a real model: its "token ids" are the UTF-8
bytes of the text and its logprobs come from a seeded generator.

    OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 python examples/sample_agent.py --episodes 8
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

if os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc") == "grpc":
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
else:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

MODEL = "sample-policy"


def _message(role: str, text: str) -> dict:
    return {"role": role, "parts": [{"type": "text", "content": text}]}


def _llm_call(tracer, rng: random.Random, messages: list[dict], reply: str, policy_version: int) -> None:
    prompt = json.dumps(messages, ensure_ascii=False)
    prompt_ids = list(prompt.encode()[-64:])
    reply_ids = list(reply.encode())
    logprobs = [round(math.log(rng.uniform(0.3, 1.0)), 6) for _ in reply_ids]
    with tracer.start_as_current_span(f"chat {MODEL}", kind=trace.SpanKind.CLIENT, attributes={
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "tracetrain-sample",
        "gen_ai.request.model": MODEL, "gen_ai.response.model": MODEL,
        "gen_ai.usage.input_tokens": len(prompt_ids), "gen_ai.usage.output_tokens": len(reply_ids),
        "gen_ai.input.messages": prompt,
        "gen_ai.output.messages": json.dumps([{**_message("assistant", reply), "finish_reason": "stop"}]),
        "tracetrain.input.token_ids": prompt_ids, "tracetrain.output.token_ids": reply_ids,
        "tracetrain.output.logprobs": logprobs, "tracetrain.policy.version": policy_version,
    }):
        pass


def run_episode(tracer, rng: random.Random, episode: int, skill: float) -> float:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    task = f"What is {a} * {b}?"
    with tracer.start_as_current_span("invoke_agent calc-agent", attributes={
        "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "calc-agent",
        "tracetrain.episode.id": f"ep-{episode:04d}", "tracetrain.task.id": f"mul-{a}-{b}",
    }):
        history = [_message("system", "Use the calc tool, then answer with the number."), _message("user", task)]
        call = f'calc("{a}*{b}")'
        _llm_call(tracer, rng, history, call, policy_version=0)
        with tracer.start_as_current_span("execute_tool calc", attributes={
            "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "calc",
            "gen_ai.tool.call.arguments": json.dumps({"expression": f"{a}*{b}"}),
            "gen_ai.tool.call.result": str(a * b),
        }):
            result = a * b
        history += [_message("assistant", call), _message("tool", str(result))]
        answer = str(result if rng.random() < skill else result + rng.randint(1, 9))
        _llm_call(tracer, rng, history, answer, policy_version=0)
        reward = 1.0 if answer == str(a * b) else 0.0
        with tracer.start_as_current_span("reward", attributes={
            "tracetrain.reward": reward, "tracetrain.reward.source": "exact_match"}):
            pass
    return reward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--skill", type=float, default=0.5, help="chance the final answer is right")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    provider = TracerProvider(resource=Resource.create())
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    tracer = provider.get_tracer("tracetrain.examples.sample_agent", "0.1.0")
    rng = random.Random(args.seed)
    rewards = [run_episode(tracer, rng, i, args.skill) for i in range(args.episodes)]
    provider.shutdown()  # flushes every span before exit
    print(f"sample agent: {len(rewards)} episodes, mean reward {sum(rewards) / len(rewards):.2f}")


if __name__ == "__main__":
    main()
