#!/usr/bin/env node
// SPDX-License-Identifier: Apache-2.0
//
// export_spans.js - tiny OTLP span producer for tracetrain integration tests.
//
// Usage:  node export_spans.js [N]        (N child spans, default 5)
//
// Configured ONLY through standard OTel env vars:
//   OTEL_EXPORTER_OTLP_ENDPOINT    e.g. http://127.0.0.1:4317 (grpc) / http://127.0.0.1:4318 (http)
//   OTEL_EXPORTER_OTLP_PROTOCOL    grpc | http/protobuf (spec default: http/protobuf)
//   OTEL_EXPORTER_OTLP_HEADERS     k1=v1,k2=v2  (gRPC metadata / HTTP headers)
//   OTEL_EXPORTER_OTLP_TIMEOUT     per-export timeout in ms (default 10000)
//   OTEL_SERVICE_NAME              -> resource service.name (via the env detector)
//   OTEL_NODE_RESOURCE_DETECTORS   env,host,os,process (also: all, none, serviceinstance)
//   OTEL_LOG_LEVEL                 SDK diagnostics level, written to stderr (default warn)
// plus TT_RUN_TAG (default "node") -> tracetrain.episode.id on the root span.
//
// Output: exactly one JSON line on stdout:
//   {"trace_id": "<32 hex>", "span_ids": [root, child0, ...], "n": N, ...}
// Exit status: 0 only if every span was exported successfully; 1 on export failure,
// 2 on bad configuration/arguments, 3 if the whole run exceeded its watchdog.
'use strict';

const api = require('@opentelemetry/api');
const { ExportResultCode, diagLogLevelFromString } = require('@opentelemetry/core');
const {
  detectResources,
  envDetector,
  hostDetector,
  osDetector,
  processDetector,
  serviceInstanceIdDetector,
} = require('@opentelemetry/resources');
const { BatchSpanProcessor } = require('@opentelemetry/sdk-trace-base');
const { NodeTracerProvider } = require('@opentelemetry/sdk-trace-node');

function fail(code, msg) {
  process.stderr.write(`export_spans: ${msg}\n`);
  process.exit(code);
}

// --- diagnostics go to stderr only (stdout is reserved for the JSON result line) ---
const logLevel =
  diagLogLevelFromString((process.env.OTEL_LOG_LEVEL || 'warn').trim()) ?? api.DiagLogLevel.WARN;
const toStderr = (tag) => (...args) => process.stderr.write(`[otel ${tag}] ${args.join(' ')}\n`);
api.diag.setLogger(
  {
    error: toStderr('error'),
    warn: toStderr('warn'),
    info: toStderr('info'),
    debug: toStderr('debug'),
    verbose: toStderr('verbose'),
  },
  { logLevel, suppressOverrideMessage: true },
);

// --- arguments ---
const n = process.argv.length > 2 ? Number(process.argv[2]) : 5;
if (!Number.isInteger(n) || n < 0) fail(2, `N must be a non-negative integer, got ${process.argv[2]}`);
const runTag = process.env.TT_RUN_TAG || 'node';

// --- watchdog: never hang a test run (unref'd, so it does not keep the process alive) ---
const watchdogMs = Number(process.env.TT_WATCHDOG_MS || 60000);
setTimeout(() => fail(3, `watchdog: run exceeded ${watchdogMs} ms`), watchdogMs).unref();

// --- exporter, chosen by the standard protocol env var ---
function createExporter() {
  const protocol = (
    process.env.OTEL_EXPORTER_OTLP_TRACES_PROTOCOL ||
    process.env.OTEL_EXPORTER_OTLP_PROTOCOL ||
    'http/protobuf'
  ).trim();
  if (protocol === 'grpc') {
    const { OTLPTraceExporter } = require('@opentelemetry/exporter-trace-otlp-grpc');
    return { protocol, exporter: new OTLPTraceExporter() };
  }
  if (protocol === 'http/protobuf') {
    const { OTLPTraceExporter } = require('@opentelemetry/exporter-trace-otlp-proto');
    return { protocol, exporter: new OTLPTraceExporter() };
  }
  return fail(2, `unsupported OTEL_EXPORTER_OTLP_PROTOCOL=${protocol} (use grpc or http/protobuf)`);
}

// Wrap export() so every failed batch is recorded (the BatchSpanProcessor would
// otherwise only log it through the global error handler).
const exportState = { ok: 0, failed: 0, errors: [] };
function instrumentExporter(exporter) {
  const origExport = exporter.export.bind(exporter);
  exporter.export = (spans, resultCallback) => {
    origExport(spans, (result) => {
      if (result.code === ExportResultCode.SUCCESS) {
        exportState.ok += spans.length;
      } else {
        exportState.failed += spans.length;
        exportState.errors.push(String((result.error && result.error.message) || result.error || 'unknown'));
      }
      resultCallback(result);
    });
  };
  return exporter;
}

// --- resource: only from the detectors named in OTEL_NODE_RESOURCE_DETECTORS ---
const DETECTORS = {
  env: envDetector,
  host: hostDetector,
  os: osDetector,
  process: processDetector,
  serviceinstance: serviceInstanceIdDetector,
};
function detectorsFromEnv() {
  const raw = (process.env.OTEL_NODE_RESOURCE_DETECTORS || 'all').split(',').map((s) => s.trim()).filter(Boolean);
  if (raw.includes('none')) return [];
  if (raw.includes('all')) return [envDetector, hostDetector, osDetector, processDetector];
  return raw.map((name) => DETECTORS[name] || fail(2, `unknown resource detector "${name}"`));
}

async function main() {
  const resource = detectResources({ detectors: detectorsFromEnv() });
  if (resource.waitForAsyncAttributes) await resource.waitForAsyncAttributes();

  const { protocol, exporter } = createExporter();
  const provider = new NodeTracerProvider({
    resource,
    spanProcessors: [new BatchSpanProcessor(instrumentExporter(exporter))],
  });
  const tracer = provider.getTracer('tracetrain-node-exporter', '0.0.0');

  // Parent/child linkage is passed explicitly through a Context (no global context
  // manager is registered, so startActiveSpan/context.active() would NOT link spans).
  const root = tracer.startSpan('node-agent', {
    kind: api.SpanKind.INTERNAL,
    attributes: {
      'gen_ai.operation.name': 'invoke_agent',
      'tracetrain.episode.id': runTag,
      'gen_ai.agent.name': 'node-agent',
    },
  });
  const rootCtx = api.trace.setSpan(api.ROOT_CONTEXT, root);
  const traceId = root.spanContext().traceId;
  const spanIds = [root.spanContext().spanId];
  for (let i = 0; i < n; i++) {
    const child = tracer.startSpan(
      'chat tiny-model',
      {
        kind: api.SpanKind.CLIENT,
        attributes: {
          'gen_ai.operation.name': 'chat',
          'gen_ai.request.model': 'tiny-model',
          'gen_ai.usage.input_tokens': 10 + i, // JS integer -> OTLP intValue
          'gen_ai.usage.output_tokens': 3,
          'tracetrain.output.token_ids': [1, 2, 3 + i], // int array
          'tracetrain.output.logprobs': [-0.5, -0.25, -0.125], // double array (non-integral)
          'gen_ai.input.messages': JSON.stringify([
            { role: 'user', parts: [{ type: 'text', content: `hello é ✓ ${i}` }] },
          ]),
        },
      },
      rootCtx,
    );
    child.addEvent('tool.done', { 'gen_ai.tool.name': 'calculator', 'tool.call.index': i });
    if (child.spanContext().traceId !== traceId) fail(1, 'internal: child span not in root trace');
    spanIds.push(child.spanContext().spanId);
    child.end();
  }
  root.end();

  let flushError = null;
  try {
    await provider.forceFlush();
  } catch (e) {
    flushError = e;
  }
  try {
    await provider.shutdown();
  } catch (e) {
    flushError = flushError || e;
  }

  const expected = n + 1;
  const success = !flushError && exportState.failed === 0 && exportState.ok === expected;
  process.stdout.write(
    JSON.stringify({
      trace_id: traceId,
      span_ids: spanIds,
      n,
      protocol,
      exported: exportState.ok,
      ok: success,
    }) + '\n',
  );
  if (!success) {
    const why = [
      flushError && `flush/shutdown: ${flushError.message || flushError}`,
      exportState.failed && `${exportState.failed} span(s) failed: ${exportState.errors.join('; ')}`,
      exportState.ok !== expected && `exported ${exportState.ok}/${expected} spans`,
    ].filter(Boolean);
    fail(1, `export failed: ${why.join(' | ')}`);
  }
  process.exit(0);
}

main().catch((e) => fail(1, `unexpected error: ${(e && e.stack) || e}`));
