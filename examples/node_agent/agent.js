#!/usr/bin/env node
// SPDX-License-Identifier: Apache-2.0
//
// agent.js - a Node.js tool-using agent whose runs become training data, with no
// tracetrain code in it: only the OpenTelemetry JS SDK and the global fetch().
//
//   invoke_agent node-agent            root span: episode id, task id, agent name
//   ├─ chat <model>                    made by `tracetrain proxy`: prompt/response token ids, logprobs
//   ├─ execute_tool calc               the tool call the model asked for
//   ├─ chat <model>                    second LLM call, streamed (SSE) through the proxy
//   └─ reward                          tracetrain.reward: an inline reward, from any language
//
// The LLM spans come from the proxy, which continues this process's trace: every
// fetch() carries a W3C `traceparent` (and `baggage` with the episode id), injected
// with the standard propagators.
//
// Configuration, environment only:
//   OTEL_EXPORTER_OTLP_ENDPOINT     the collector, e.g. http://127.0.0.1:4317 (grpc) or :4318 (http/protobuf)
//   OTEL_EXPORTER_OTLP_PROTOCOL     grpc | http/protobuf (default http/protobuf, as the spec says)
//   OTEL_EXPORTER_OTLP_HEADERS      e.g. authorization=Bearer%20TOKEN
//   OTEL_SERVICE_NAME               service.name of this agent's spans
//   OTEL_NODE_RESOURCE_DETECTORS    set env,host,os,process: the default also runs cloud detectors
//   TRACETRAIN_PROXY_URL            OpenAI base URL of `tracetrain proxy` (default http://127.0.0.1:8001/v1)
//   AGENT_MODEL                     model name to ask for (default tiny-model)
//   AGENT_EPISODE_ID, AGENT_TASK_ID ids for this run (default: random episode, task "mul-6-7")
//   AGENT_QUESTION                  default "What is 6 * 7?"
//
// Output: one JSON line on stdout {"trace_id", "episode_id", "answer", "reward", "exported"}.
// Exit status 0 when the run finished and every span was exported, 1 otherwise.
'use strict';

const crypto = require('node:crypto');
const api = require('@opentelemetry/api');
const {
  CompositePropagator,
  ExportResultCode,
  W3CBaggagePropagator,
  W3CTraceContextPropagator,
} = require('@opentelemetry/core');
const { detectResources, envDetector, hostDetector, osDetector, processDetector } = require('@opentelemetry/resources');
const { BatchSpanProcessor } = require('@opentelemetry/sdk-trace-base');
const { NodeTracerProvider } = require('@opentelemetry/sdk-trace-node');

const PROXY_URL = (process.env.TRACETRAIN_PROXY_URL || 'http://127.0.0.1:8001/v1').replace(/\/$/, '');
const MODEL = process.env.AGENT_MODEL || 'tiny-model';
const EPISODE_ID = process.env.AGENT_EPISODE_ID || `ep-${crypto.randomUUID()}`;
const TASK_ID = process.env.AGENT_TASK_ID || 'mul-6-7';
const QUESTION = process.env.AGENT_QUESTION || 'What is 6 * 7?';
const TOOLS = [{
  type: 'function',
  function: {
    name: 'calc',
    description: 'Multiply two integers written as "a*b".',
    parameters: { type: 'object', properties: { expression: { type: 'string' } }, required: ['expression'] },
  },
}];

// ---------------------------------------------------------------- OpenTelemetry setup

function createExporter() {
  const protocol = (process.env.OTEL_EXPORTER_OTLP_TRACES_PROTOCOL
    || process.env.OTEL_EXPORTER_OTLP_PROTOCOL || 'http/protobuf').trim();
  const module = protocol === 'grpc' ? '@opentelemetry/exporter-trace-otlp-grpc'
    : protocol === 'http/protobuf' ? '@opentelemetry/exporter-trace-otlp-proto' : null;
  if (!module) throw new Error(`unsupported OTEL_EXPORTER_OTLP_PROTOCOL=${protocol} (grpc or http/protobuf)`);
  const { OTLPTraceExporter } = require(module);
  return new OTLPTraceExporter(); // endpoint, headers, timeout: from OTEL_EXPORTER_OTLP_*
}

// Count exported and failed spans: the batch processor only logs failures.
const exported = { ok: 0, failed: 0 };
function counting(exporter) {
  const send = exporter.export.bind(exporter);
  exporter.export = (spans, done) => send(spans, (result) => {
    exported[result.code === ExportResultCode.SUCCESS ? 'ok' : 'failed'] += spans.length;
    done(result);
  });
  return exporter;
}

function detectors() {
  const all = { env: envDetector, host: hostDetector, os: osDetector, process: processDetector };
  const names = (process.env.OTEL_NODE_RESOURCE_DETECTORS || 'env,host,os,process').split(',').map((s) => s.trim());
  return names.filter((name) => all[name]).map((name) => all[name]);
}

function startTracing() {
  const provider = new NodeTracerProvider({
    resource: detectResources({ detectors: detectors() }),
    spanProcessors: [new BatchSpanProcessor(counting(createExporter()))],
  });
  // registers the async context manager (so startActiveSpan nests) and the W3C propagators
  provider.register({
    propagator: new CompositePropagator({
      propagators: [new W3CTraceContextPropagator(), new W3CBaggagePropagator()],
    }),
  });
  return provider;
}

// ---------------------------------------------------------------- the LLM, through the proxy

async function chat(messages, { stream }) {
  const headers = { 'content-type': 'application/json' };
  api.propagation.inject(api.context.active(), headers); // traceparent + baggage: the proxy continues our trace
  const response = await fetch(`${PROXY_URL}/chat/completions`, {
    method: 'POST',
    headers,
    body: JSON.stringify({ model: MODEL, messages, tools: TOOLS, stream }),
  });
  if (!response.ok) throw new Error(`LLM call failed: HTTP ${response.status} ${await response.text()}`);
  return stream ? readStream(response) : (await response.json()).choices[0].message;
}

// Rebuild the assistant message from OpenAI SSE chunks.
async function readStream(response) {
  const message = { role: 'assistant', content: '', tool_calls: [] };
  const decoder = new TextDecoder();
  let buffer = '';
  for await (const bytes of response.body) {
    buffer += decoder.decode(bytes, { stream: true });
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split('\n').filter((l) => l.startsWith('data:')).map((l) => l.slice(5).trim()).join('\n');
      if (!data || data === '[DONE]') continue;
      for (const choice of JSON.parse(data).choices || []) {
        const delta = choice.delta || {};
        if (delta.content) message.content += delta.content;
        for (const call of delta.tool_calls || []) {
          const slot = message.tool_calls[call.index] ||= { id: call.id, type: 'function', function: { name: '', arguments: '' } };
          if (call.function && call.function.name) slot.function.name = call.function.name;
          if (call.function && call.function.arguments) slot.function.arguments += call.function.arguments;
        }
      }
    }
  }
  if (!message.tool_calls.length) delete message.tool_calls;
  return message;
}

// ---------------------------------------------------------------- the tool

function calc(expression) {
  const match = /^\s*(-?\d+)\s*\*\s*(-?\d+)\s*$/.exec(expression || '');
  if (!match) throw new Error(`calc only multiplies "a*b", got ${JSON.stringify(expression)}`);
  return String(Number(match[1]) * Number(match[2]));
}

async function runTool(tracer, call) {
  return tracer.startActiveSpan(`execute_tool ${call.function.name}`, {
    attributes: {
      'gen_ai.operation.name': 'execute_tool',
      'gen_ai.tool.name': call.function.name,
      'gen_ai.tool.call.id': call.id,
      'gen_ai.tool.call.arguments': call.function.arguments,
    },
  }, (span) => {
    try {
      const result = calc(JSON.parse(call.function.arguments).expression);
      span.setAttribute('gen_ai.tool.call.result', result);
      return result;
    } catch (error) {
      span.setStatus({ code: api.SpanStatusCode.ERROR, message: String(error.message || error) });
      return `error: ${error.message || error}`;
    } finally {
      span.end();
    }
  });
}

// ---------------------------------------------------------------- one episode

async function runEpisode(tracer) {
  return tracer.startActiveSpan('invoke_agent node-agent', {
    attributes: {
      'gen_ai.operation.name': 'invoke_agent',
      'gen_ai.agent.name': 'node-agent',
      'tracetrain.episode.id': EPISODE_ID,
      'tracetrain.task.id': TASK_ID,
    },
  }, async (root) => {
    // baggage tells the proxy the episode and task of each call it records
    const baggage = api.propagation.createBaggage({
      'tracetrain.episode.id': { value: EPISODE_ID },
      'tracetrain.task.id': { value: TASK_ID },
    });
    return api.context.with(api.propagation.setBaggage(api.context.active(), baggage), async () => {
      try {
        const messages = [
          { role: 'system', content: 'Use the calc tool, then answer with the number.' },
          { role: 'user', content: QUESTION },
        ];
        const first = await chat(messages, { stream: false });
        messages.push(first);
        for (const call of first.tool_calls || []) {
          messages.push({ role: 'tool', tool_call_id: call.id, content: await runTool(tracer, call) });
        }
        const final = await chat(messages, { stream: true });
        const answer = final.content || '';
        const expected = calc((/(-?\d+\s*\*\s*-?\d+)/.exec(QUESTION) || [])[1]);
        const reward = answer.includes(expected) ? 1.0 : 0.0;
        // an inline reward: any span in the episode carrying tracetrain.reward
        tracer.startSpan('reward', {
          attributes: { 'tracetrain.reward': reward, 'tracetrain.reward.source': 'exact_match' },
        }).end();
        return { trace_id: root.spanContext().traceId, episode_id: EPISODE_ID, answer, reward };
      } catch (error) {
        root.setStatus({ code: api.SpanStatusCode.ERROR, message: String(error.message || error) });
        throw error;
      } finally {
        root.end();
      }
    });
  });
}

async function main() {
  const provider = startTracing();
  let result;
  let failure = null;
  try {
    result = await runEpisode(api.trace.getTracer('tracetrain-example-node-agent', '0.0.0'));
  } catch (error) {
    failure = error;
  }
  await provider.shutdown(); // flushes every span before exit
  if (failure) {
    process.stderr.write(`node agent: ${failure.stack || failure}\n`);
    process.exit(1);
  }
  process.stdout.write(`${JSON.stringify({ ...result, exported: exported.ok })}\n`);
  process.exit(exported.failed ? 1 : 0);
}

main();
