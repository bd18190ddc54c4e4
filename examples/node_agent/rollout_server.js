#!/usr/bin/env node
// SPDX-License-Identifier: Apache-2.0
//
// rollout_server.js - the agent-server protocol of `tracetrain rollout --agent-server` in
// Node.js (docs/rollout.md), around the same calculator agent as agent.js: many tasks per
// process, several at once, no tracetrain code, only the OpenTelemetry JS SDK and fetch().
//
//   tracetrain proxy --upstream http://127.0.0.1:8000 --listen 127.0.0.1:8001 &
//   TRACETRAIN_PROXY_URL=http://127.0.0.1:8001/v1 tracetrain rollout --tasks tasks.jsonl \
//       --agent-server "node examples/node_agent/rollout_server.js" --grader examples/rollout_agent.py:grade
//
// stdout: {"type":"ready"}, then one {"episode_id", "answer"} (or "error") line per task.
// Each task runs under an `invoke_agent` span that continues the runner's traceparent and
// carries the episode, task and rollout ids; the ids also travel as baggage, so the proxy
// puts them on the LLM spans it records. The OTEL_* variables come from the runner.
'use strict';

const readline = require('node:readline');
const api = require('@opentelemetry/api');
const { CompositePropagator, W3CBaggagePropagator, W3CTraceContextPropagator } = require('@opentelemetry/core');
const { detectResources, envDetector, hostDetector, osDetector, processDetector } = require('@opentelemetry/resources');
const { BatchSpanProcessor } = require('@opentelemetry/sdk-trace-base');
const { NodeTracerProvider } = require('@opentelemetry/sdk-trace-node');

const PROXY_URL = (process.env.TRACETRAIN_PROXY_URL || 'http://127.0.0.1:8001/v1').replace(/\/$/, '');
const MODEL = process.env.AGENT_MODEL || 'tiny-model';
const TOOLS = [{ type: 'function', function: { name: 'calc', description: 'Multiply "a*b".',
  parameters: { type: 'object', properties: { expression: { type: 'string' } }, required: ['expression'] } } }];

function startTracing() {
  const protocol = (process.env.OTEL_EXPORTER_OTLP_PROTOCOL || 'http/protobuf').trim();
  const { OTLPTraceExporter } = require(protocol === 'grpc' ? '@opentelemetry/exporter-trace-otlp-grpc'
    : '@opentelemetry/exporter-trace-otlp-proto');
  const provider = new NodeTracerProvider({
    resource: detectResources({ detectors: [envDetector, hostDetector, osDetector, processDetector] }),
    spanProcessors: [new BatchSpanProcessor(new OTLPTraceExporter())],
  });
  provider.register({ propagator: new CompositePropagator({
    propagators: [new W3CTraceContextPropagator(), new W3CBaggagePropagator()] }) });
  return provider;
}

async function chat(messages) {
  const headers = { 'content-type': 'application/json' };
  api.propagation.inject(api.context.active(), headers); // traceparent + baggage for the proxy
  const response = await fetch(`${PROXY_URL}/chat/completions`, {
    method: 'POST', headers, body: JSON.stringify({ model: MODEL, messages, tools: TOOLS }) });
  if (!response.ok) throw new Error(`LLM call failed: HTTP ${response.status}`);
  return (await response.json()).choices[0].message;
}

function calc(expression) {
  const match = /^\s*(-?\d+)\s*\*\s*(-?\d+)\s*$/.exec(expression || '');
  return match ? String(Number(match[1]) * Number(match[2])) : `error: cannot compute ${expression}`;
}

async function solve(task) {
  const messages = [{ role: 'system', content: 'Use the calc tool, then answer.' },
    { role: 'user', content: task.prompt }];
  for (let turn = 0; turn < 4; turn += 1) {
    const reply = await chat(messages);
    if (!reply.tool_calls || !reply.tool_calls.length) return reply.content || '';
    messages.push(reply);
    for (const call of reply.tool_calls) {
      messages.push({ role: 'tool', tool_call_id: call.id, content: calc(JSON.parse(call.function.arguments).expression) });
    }
  }
  return 'no answer';
}

async function handle(tracer, message) {
  const ids = { 'tracetrain.episode.id': message.episode_id, 'tracetrain.task.id': message.task_id,
    'tracetrain.rollout.id': message.rollout_id };
  // continue the runner's trace, and carry the ids as baggage to the proxy
  let ctx = api.propagation.extract(api.ROOT_CONTEXT, { traceparent: message.traceparent });
  const baggage = api.propagation.createBaggage(Object.fromEntries(Object.entries(ids).map(([k, v]) => [k, { value: v }])));
  ctx = api.propagation.setBaggage(ctx, baggage);
  const attributes = { 'gen_ai.operation.name': 'invoke_agent', 'gen_ai.agent.name': 'node-agent', ...ids };
  const result = { episode_id: message.episode_id };
  await tracer.startActiveSpan('invoke_agent node-agent', { attributes }, ctx, async (root) => {
    try {
      result.answer = await solve(message.task);
    } catch (error) {
      result.error = String(error.message || error);
      root.setStatus({ code: api.SpanStatusCode.ERROR, message: result.error });
    } finally {
      root.end();
    }
  });
  process.stdout.write(`${JSON.stringify(result)}\n`);
}

async function main() {
  const provider = startTracing();
  const tracer = api.trace.getTracer('tracetrain-example-node-rollout-server', '0.0.0');
  const running = new Set();
  process.stdout.write('{"type":"ready"}\n');
  for await (const line of readline.createInterface({ input: process.stdin })) {
    const message = JSON.parse(line);
    if (message.type !== 'task') continue; // cancel: nothing to stop in this small agent
    const job = handle(tracer, message).finally(() => running.delete(job));
    running.add(job);
  }
  await Promise.allSettled(running); // EOF: finish what is running, flush, exit
  await provider.shutdown();
  process.exit(0);
}

main();
