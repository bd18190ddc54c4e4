"""Test helper: sample tool-task episodes in process (HF generate, T=1, behaviour logprobs) and
export them to a real collector as OTLP spans with token ids, logprobs, versions and rewards.

An episode is the tool task of trainer/warmup.py: the user asks (calc or price), the model calls
a tool (``<tool_call>{...}</tool_call>``), gets the result in a ``tool`` turn and answers
``<answer>N</answer>``. Call k+1's prompt ids are call k's prompt + response ids + the tool
turn's ids (the agent keeps token ids, as a vLLM agent with token-id capture does).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from tests.integration.spanfactory import EXPORT_METHOD
from tracetrain.instrumentation import semconv as sc
from tracetrain.trainer.warmup import make_examples, price_of

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_TOOL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
_EXPR = re.compile(r"^\s*(-?\d{1,6})\s*([-+*])\s*(-?\d{1,6})\s*$")


@dataclass
class Call:
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]


@dataclass
class Episode:
    episode_id: str
    task_id: str
    answer: str
    calls: list[Call] = field(default_factory=list)
    reward: float = 0.0


def run_tool(text: str) -> tuple[str, str | None]:
    """("answer", N) | ("tool", result text) | ("stop", None) for one reply."""
    text = text.split("<|im_end|>", 1)[0]
    m = _ANSWER.search(text)
    if m:
        return "answer", m.group(1).strip()
    m = _TOOL.search(text)
    if not m:
        return "stop", None
    try:
        call = json.loads(m.group(1))
        name, args = call["name"], call["arguments"]
        if name == "calc":
            e = _EXPR.match(str(args["expression"]))
            a, op, b = int(e.group(1)), e.group(2), int(e.group(3))
            return "tool", str({"+": a + b, "-": a - b, "*": a * b}[op])
        if name == "price":
            return "tool", str(price_of(int(args["item"])))
    except Exception:  # noqa: BLE001 - any malformed call is a tool error, as in the demo agent
        pass
    return "tool", "error: bad tool call"


def sample(model, tok, prompts: list[list[int]], max_new_tokens: int = 40) -> list[Call]:
    """One T=1 sample per prompt, with the behaviour logprob of every sampled token."""
    import torch
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        attn[r, width - len(p):] = 1
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=1.0, top_k=0,
                             top_p=1.0, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, output_logits=True, return_dict_in_generate=True)
    model.train()
    gen = out.sequences[:, width:]
    logp = torch.stack([torch.log_softmax(x.float(), -1) for x in out.logits], 1)  # [B, S, V]
    picked = logp.gather(-1, gen.unsqueeze(-1)).squeeze(-1)
    calls = []
    for r, p in enumerate(prompts):
        row = gen[r].tolist()
        n = row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
        calls.append(Call(list(p), row[:n], [float(x) for x in picked[r, :n]]))
    return calls


def sample_episodes(model, tok, task: str, n_tasks: int, group_size: int, seed: int,
                    prefix: str = "ep", max_calls: int = 2) -> list[Episode]:
    """``n_tasks`` problems x ``group_size`` samples.

    The verifier's reward: 0.5 when the first reply is a tool call the tool accepts, plus 0.5
    for the right final answer (so a barely warmed-up model already gets varied rewards).
    """
    import torch
    torch.manual_seed(seed)
    problems = make_examples(task, n_tasks, seed)
    episodes, prompts = [], []
    for t, ex in enumerate(problems):
        question = ex["messages"][0]["content"]
        text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                       add_generation_prompt=True)
        p = tok(text, add_special_tokens=False)["input_ids"]
        for g in range(group_size):
            episodes.append(Episode(f"{prefix}-{seed}-{t}-{g}", f"{task}-{seed}-{t}", ex["answer"]))
            prompts.append(p)
    active = list(range(len(episodes)))
    for _ in range(max_calls):
        if not active:
            break
        calls = sample(model, tok, [prompts[i] for i in active])
        still = []
        for i, call in zip(active, calls):
            episodes[i].calls.append(call)
            kind, value = run_tool(tok.decode(call.response_ids))
            if kind == "answer":
                episodes[i].reward += 0.5 * float(value == episodes[i].answer)
            elif kind == "tool":
                if len(episodes[i].calls) == 1 and not value.startswith("error"):
                    episodes[i].reward += 0.5  # partial credit: a well-formed tool call that ran
                turn = tok("\n<|im_start|>tool\n" + value + "<|im_end|>\n<|im_start|>assistant\n",
                           add_special_tokens=False)["input_ids"]
                prompts[i] = call.prompt_ids + call.response_ids + turn
                still.append(i)
        active = still
    return episodes


def _kv(key: str, value) -> common_pb2.KeyValue:
    if isinstance(value, bool) or isinstance(value, str):
        return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(string_value=str(value)))
    if isinstance(value, int):
        return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(int_value=value))
    if isinstance(value, float):
        return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(double_value=value))
    items = [common_pb2.AnyValue(double_value=v) if isinstance(v, float) else common_pb2.AnyValue(int_value=v)
             for v in value]
    return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(array_value=common_pb2.ArrayValue(values=items)))


def episode_spans(ep: Episode, index: int, t0_ns: int, policy_version: int, agent: str | None) -> list:
    trace_id = (index + 1).to_bytes(8, "big") + ep.episode_id.encode()[:8].ljust(8, b"_")
    root_id = b"\x01" + (index + 1).to_bytes(7, "big")
    start = t0_ns + index * 1_000_000
    end = start + 900_000
    root_attrs = [_kv(sc.EPISODE_ID, ep.episode_id), _kv(sc.TASK_ID, ep.task_id),
                  _kv(sc.ROLLOUT_ID, ep.episode_id), _kv(sc.REWARD, float(ep.reward))]
    if agent:
        root_attrs.append(_kv(sc.GEN_AI_AGENT_NAME, agent))
    spans = [trace_pb2.Span(trace_id=trace_id, span_id=root_id, name="agent", kind=1,
                            start_time_unix_nano=start, end_time_unix_nano=end, attributes=root_attrs)]
    for k, call in enumerate(ep.calls):
        attrs = [_kv(sc.GEN_AI_OPERATION_NAME, "chat"), _kv(sc.GEN_AI_REQUEST_MODEL, "policy"),
                 _kv(sc.INPUT_TOKEN_IDS, call.prompt_ids), _kv(sc.OUTPUT_TOKEN_IDS, call.response_ids),
                 _kv(sc.OUTPUT_LOGPROBS, [float(x) for x in call.logprobs]),
                 _kv(sc.POLICY_VERSION, int(policy_version))]
        if agent:
            attrs.append(_kv(sc.GEN_AI_AGENT_NAME, agent))
        spans.append(trace_pb2.Span(trace_id=trace_id, span_id=bytes([2 + k]) + (index + 1).to_bytes(7, "big"),
                                    parent_span_id=root_id, name="chat policy", kind=3,
                                    start_time_unix_nano=start + 1000 * (k + 1),
                                    end_time_unix_nano=start + 1000 * (k + 1) + 500, attributes=attrs))
    return spans


def export_episodes(grpc_port: int, episodes: list[Episode], t0_ns: int, policy_version: int = 0,
                    agent: str | None = None, chunk: int = 64, first_index: int = 0) -> None:
    """Send the episodes to the collector over OTLP/gRPC (acknowledged = durable)."""
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        export = channel.unary_unary(EXPORT_METHOD)
        for start in range(0, len(episodes), chunk):
            spans = []
            for i, ep in enumerate(episodes[start:start + chunk], start=first_index + start):
                spans += episode_spans(ep, i, t0_ns, policy_version, agent)
            request = trace_service_pb2.ExportTraceServiceRequest(resource_spans=[trace_pb2.ResourceSpans(
                resource=resource_pb2.Resource(attributes=[_kv("service.name", agent or "tool-agent")]),
                scope_spans=[trace_pb2.ScopeSpans(spans=spans)])])
            export(request.SerializeToString(), timeout=30)
