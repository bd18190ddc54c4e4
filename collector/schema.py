"""The span table's Arrow schema: one place, built from the names in ``semconv``.

docs/schema.md describes each column; ``tests/unit/collector/test_schema_docs.py``
keeps the two in step.
"""

from __future__ import annotations

import pyarrow as pa

from tracetrain.instrumentation import semconv as sc

SPAN_SCHEMA = pa.schema(
    [
        pa.field(sc.COL_TRACE_ID, pa.string(), nullable=False),
        pa.field(sc.COL_SPAN_ID, pa.string(), nullable=False),
        pa.field(sc.COL_PARENT_SPAN_ID, pa.string()),
        pa.field(sc.COL_TRACE_STATE, pa.string()),
        pa.field(sc.COL_NAME, pa.string()),
        pa.field(sc.COL_KIND, pa.int8()),
        pa.field(sc.COL_START_NS, pa.int64()),
        pa.field(sc.COL_END_NS, pa.int64()),
        pa.field(sc.COL_STATUS_CODE, pa.int8()),
        pa.field(sc.COL_STATUS_MESSAGE, pa.string()),
        pa.field(sc.COL_SERVICE_NAME, pa.string()),
        pa.field(sc.COL_RESOURCE_ATTRIBUTES, pa.string()),
        pa.field(sc.COL_SCOPE_NAME, pa.string()),
        pa.field(sc.COL_SCOPE_VERSION, pa.string()),
        pa.field(sc.COL_ATTRIBUTES, pa.string()),
        pa.field(sc.COL_EVENTS, pa.string()),
        pa.field(sc.COL_LINKS, pa.string()),
        pa.field(sc.COL_RECEIVED_NS, pa.int64()),
        pa.field(sc.COL_OPERATION, pa.string()),
        pa.field(sc.COL_PROVIDER, pa.string()),
        pa.field(sc.COL_REQUEST_MODEL, pa.string()),
        pa.field(sc.COL_RESPONSE_MODEL, pa.string()),
        pa.field(sc.COL_RESPONSE_ID, pa.string()),
        pa.field(sc.COL_INPUT_TOKENS, pa.int64()),
        pa.field(sc.COL_OUTPUT_TOKENS, pa.int64()),
        pa.field(sc.COL_INPUT_MESSAGES, pa.string()),
        pa.field(sc.COL_OUTPUT_MESSAGES, pa.string()),
        pa.field(sc.COL_SYSTEM_INSTRUCTIONS, pa.string()),
        pa.field(sc.COL_PROMPT_TOKEN_IDS, pa.list_(pa.int64())),
        pa.field(sc.COL_RESPONSE_TOKEN_IDS, pa.list_(pa.int64())),
        pa.field(sc.COL_RESPONSE_LOGPROBS, pa.list_(pa.float64())),
        pa.field(sc.COL_REWARD, pa.float64()),
        pa.field(sc.COL_POLICY_VERSION, pa.int64()),
        pa.field(sc.COL_EPISODE_ID, pa.string()),
        pa.field(sc.COL_TASK_ID, pa.string()),
        pa.field(sc.COL_ROLLOUT_ID, pa.string()),
        pa.field(sc.COL_AGENT_NAME, pa.string()),
        pa.field(sc.COL_CONVERSATION_ID, pa.string()),
    ],
    metadata={sc.PARQUET_SCHEMA_VERSION_KEY: str(sc.SCHEMA_VERSION)},
)
"""One row per span. JSON columns are UTF-8 text (query them with DuckDB's ``->>``)."""

SCALAR_COLUMNS = [f.name for f in SPAN_SCHEMA if not pa.types.is_list(f.type)]
"""Columns built from per-span Python values."""

LOG_SCHEMA = pa.schema(
    [
        pa.field(sc.COL_TRACE_ID, pa.string()),
        pa.field(sc.COL_SPAN_ID, pa.string()),
        pa.field(sc.COL_TIME_NS, pa.int64()),
        pa.field(sc.COL_OBSERVED_NS, pa.int64()),
        pa.field(sc.COL_SEVERITY_NUMBER, pa.int8()),
        pa.field(sc.COL_SEVERITY_TEXT, pa.string()),
        pa.field(sc.COL_EVENT_NAME, pa.string()),
        pa.field(sc.COL_BODY, pa.string()),
        pa.field(sc.COL_ATTRIBUTES, pa.string()),
        pa.field(sc.COL_SERVICE_NAME, pa.string()),
        pa.field(sc.COL_RESOURCE_ATTRIBUTES, pa.string()),
        pa.field(sc.COL_SCOPE_NAME, pa.string()),
        pa.field(sc.COL_SCOPE_VERSION, pa.string()),
        pa.field(sc.COL_RECEIVED_NS, pa.int64()),
        pa.field(sc.COL_RECORD_ID, pa.string(), nullable=False),
        pa.field(sc.COL_INPUT_MESSAGES, pa.string()),
        pa.field(sc.COL_OUTPUT_MESSAGES, pa.string()),
        pa.field(sc.COL_SYSTEM_INSTRUCTIONS, pa.string()),
        pa.field(sc.COL_MESSAGE, pa.string()),
        pa.field(sc.COL_MESSAGE_DIRECTION, pa.string()),
        pa.field(sc.COL_MESSAGE_INDEX, pa.int64()),
        pa.field(sc.COL_RECORD_SEQ, pa.int64()),
    ],
    metadata={sc.PARQUET_SCHEMA_VERSION_KEY: str(sc.SCHEMA_VERSION)},
)
"""One row per OTLP log record (``DATA/logs/``). GenAI message events are also
normalized into the message columns (OTel parts format), which ``llm_calls`` joins."""
