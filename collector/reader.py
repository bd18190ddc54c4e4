"""Read the span store from any process, while daemons write it.

The store is plain Parquet, so a reader needs no daemon and takes no lock: this
module opens an in-memory DuckDB and defines four views over the files.

* ``spans``: one row per span (every column of docs/schema.md, plus ``date``,
  the ingest-date partition).
* ``logs``: one row per OTLP log record.
* ``llm_calls``: one row per LLM call, with episode/task/rollout/agent filled in
  from the rest of the trace when the call's own span does not carry them,
  message content from GenAI log events when the span has none, and the
  latencies of vLLM's own ``llm_request`` span for the call (which is not a
  separate row).
* ``episodes``: one row per episode with its reward (the latest reward emitted in
  the episode, delayed rewards included), reward count and sum, LLM call count,
  time span, policy versions.

A view re-lists the files on every query, so a long-lived connection sees new
spans as soon as they are acknowledged.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from tracetrain.collector import store_layout as layout
from tracetrain.collector.schema import LOG_SCHEMA, SPAN_SCHEMA
from tracetrain.instrumentation import semconv as sc

SCHEMA_ANCHOR_DIR = ("date=1970-01-01", "service=_schema")
"""An empty file with the full schema, so queries work on an empty store and
``union_by_name`` always knows every column. Retention never removes it."""

T = TypeVar("T")
LLM_OPERATIONS = ("chat", "text_completion", "generate_content", "completion")


def ensure_schema_anchor(data_dir: Path) -> Path:
    """Write the empty schema files of ``spans/`` and ``logs/`` if missing; returns the spans one."""
    paths = []
    for table_dir, schema in ((layout.SPANS_DIR, SPAN_SCHEMA), (layout.LOGS_DIR, LOG_SCHEMA)):
        directory = data_dir / table_dir / SCHEMA_ANCHOR_DIR[0] / SCHEMA_ANCHOR_DIR[1]
        path = directory / f"schema-v{sc.SCHEMA_VERSION}.parquet"
        if not path.exists():
            directory.mkdir(parents=True, exist_ok=True)
            tmp = directory / f".schema-v{sc.SCHEMA_VERSION}.parquet.{os.getpid()}.tmp"
            pq.write_table(pa.Table.from_batches([], schema), tmp)
            tmp.replace(path)
        paths.append(path)
    return paths[0]


def ensure_training_anchors(data_dir: Path, view_root: Path | None = None) -> list[str]:
    """Write empty typed files for the training tables if missing; returns the view statements.

    The trainer writes ``DATA/training/<table>/run=<id>/*.parquet``; the anchor (``run=_schema``)
    keeps the views queryable (and typed) before any training ran.
    """
    statements = []
    for table, columns in ((sc.TABLE_TRAIN_STEPS, sc.TRAIN_STEP_COLUMNS),
                           (sc.TABLE_CHECKPOINTS, sc.CHECKPOINT_COLUMNS)):
        directory = data_dir / sc.TRAINING_DIR / table / "run=_schema"
        path = directory / f"schema-v{sc.SCHEMA_VERSION}.parquet"
        select = ", ".join(f"CAST(NULL AS {kind}) AS {name}" for name, kind in columns)
        if not path.exists():
            directory.mkdir(parents=True, exist_ok=True)
            tmp = directory / f".schema-v{sc.SCHEMA_VERSION}.parquet.{os.getpid()}.tmp"
            con = duckdb.connect(":memory:")
            try:
                con.execute(f"COPY (SELECT {select} WHERE false) TO {_sql_string(str(tmp))} (FORMAT parquet)")
            finally:
                con.close()
            tmp.replace(path)
        glob = str((view_root or data_dir) / sc.TRAINING_DIR / table / "*" / "*.parquet")
        names = ", ".join(name for name, _ in columns)
        statements.append(
            f"CREATE OR REPLACE VIEW {table} AS SELECT {names} FROM read_parquet({_sql_string(glob)}, "
            f"hive_partitioning = false, union_by_name = true)")
    return statements


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _source(glob: str) -> str:
    return (f"read_parquet({_sql_string(glob)}, hive_partitioning = true, "
            f"union_by_name = true, hive_types = {{'date': DATE, 'service': VARCHAR}})")


def _json_path(key: str) -> str:
    """A DuckDB JSON path literal for a top-level key that may contain dots."""
    return _sql_string('$."' + key + '"')


def _json_attr(key: str) -> str:
    """SQL for one attribute of the JSON ``attributes`` column, as JSON."""
    return f"json_extract({sc.COL_ATTRIBUTES}, {_json_path(key)})"


def view_statements(data_dir: Path) -> list[str]:
    """The SQL that defines ``spans``, ``logs``, ``llm_calls`` and ``episodes`` over a store."""
    return [
        f"CREATE OR REPLACE VIEW {sc.TABLE_SPANS} AS SELECT * EXCLUDE (service) "
        f"FROM {_source(layout.spans_glob(data_dir))}",
        f"CREATE OR REPLACE VIEW {sc.TABLE_LOGS} AS SELECT * EXCLUDE (service) "
        f"FROM {_source(layout.logs_glob(data_dir))}",
        _span_context_view(),
        _vllm_server_view(),
        _log_messages_view(),
        _llm_calls_view(),
        _episodes_view(),
    ]


def _resource(key: str) -> str:
    """SQL for one resource attribute as text (ids set through OTEL_RESOURCE_ATTRIBUTES)."""
    return f"json_extract_string(s.{sc.COL_RESOURCE_ATTRIBUTES}, {_sql_string(json_path(key))})"


def json_path(key: str) -> str:
    return '$."' + key.replace('"', '\\"') + '"'


def _span_context_view() -> str:
    vllm = f"({sc.COL_NAME} = {_sql_string(sc.VLLM_SERVER_SPAN_NAME)} AND {sc.COL_KIND} = 2)"
    is_llm = (f"(({sc.COL_OPERATION} IN {LLM_OPERATIONS!r} OR {sc.COL_RESPONSE_TOKEN_IDS} IS NOT NULL "
              f"OR {sc.COL_OUTPUT_MESSAGES} IS NOT NULL) AND NOT {vllm})")
    return f"""CREATE OR REPLACE VIEW _span_context AS
        SELECT s.*,
               coalesce(s.{sc.COL_EPISODE_ID}, t.trace_episode_id, {_resource(sc.EPISODE_ID)},
                        s.{sc.COL_TRACE_ID}) AS _episode,
               coalesce(s.{sc.COL_TASK_ID}, t.trace_task_id, {_resource(sc.TASK_ID)}) AS _task,
               coalesce(s.{sc.COL_ROLLOUT_ID}, t.trace_rollout_id, {_resource(sc.ROLLOUT_ID)}) AS _rollout,
               coalesce(s.{sc.COL_AGENT_NAME}, p.{sc.COL_AGENT_NAME}, t.trace_agent_name,
                        {_resource(sc.GEN_AI_AGENT_NAME)}) AS _agent,
               coalesce(s.{sc.COL_SCOPE_NAME} = {_sql_string(sc.FEEDBACK_SCOPE_NAME)}, false) AS _feedback,
               {is_llm} AS _is_llm
        FROM {sc.TABLE_SPANS} s
        LEFT JOIN (
            SELECT {sc.COL_TRACE_ID},
                   min({sc.COL_EPISODE_ID}) AS trace_episode_id,
                   min({sc.COL_TASK_ID}) AS trace_task_id,
                   min({sc.COL_ROLLOUT_ID}) AS trace_rollout_id,
                   min({sc.COL_AGENT_NAME}) AS trace_agent_name
            FROM {sc.TABLE_SPANS} GROUP BY {sc.COL_TRACE_ID}
        ) t USING ({sc.COL_TRACE_ID})
        LEFT JOIN (SELECT {sc.COL_TRACE_ID}, {sc.COL_SPAN_ID}, {sc.COL_AGENT_NAME} FROM {sc.TABLE_SPANS}) p
          ON p.{sc.COL_TRACE_ID} = s.{sc.COL_TRACE_ID} AND p.{sc.COL_SPAN_ID} = s.{sc.COL_PARENT_SPAN_ID}"""


# vLLM's llm_request latency attributes -> llm_calls columns (seconds).
SERVER_LATENCY_COLUMNS = {
    "e2e": "server_latency_e2e_s",
    "time_to_first_token": "server_time_to_first_token_s",
    "time_in_queue": "server_time_in_queue_s",
    "time_in_model_prefill": "server_time_in_model_prefill_s",
    "time_in_model_decode": "server_time_in_model_decode_s",
    "time_in_model_inference": "server_time_in_model_inference_s",
}


def _vllm_server_view() -> str:
    """vLLM's own SERVER spans, one per client span (their parent, through traceparent)."""
    latencies = ",\n               ".join(
        f"TRY_CAST({_json_attr(sc.VLLM_LATENCY_PREFIX + name)} AS DOUBLE) AS {column}"
        for name, column in SERVER_LATENCY_COLUMNS.items())
    return f"""CREATE OR REPLACE VIEW _vllm_server AS
        SELECT {sc.COL_TRACE_ID}, {sc.COL_PARENT_SPAN_ID}, {sc.COL_END_NS},
               json_extract_string({sc.COL_ATTRIBUTES}, {_json_path(sc.GEN_AI_REQUEST_ID)})
                   AS server_request_id,
               {sc.COL_INPUT_TOKENS} AS server_input_tokens, {sc.COL_OUTPUT_TOKENS} AS server_output_tokens,
               {latencies}
        FROM {sc.TABLE_SPANS}
        WHERE {sc.COL_NAME} = {_sql_string(sc.VLLM_SERVER_SPAN_NAME)} AND {sc.COL_KIND} = 2"""


def _log_messages_view() -> str:
    """Message content of GenAI log events, per span (contracts.md §2.3; log_rows normalized it)."""
    when = f"coalesce({sc.COL_TIME_NS}, {sc.COL_OBSERVED_NS})"
    order = f"{when}, {sc.COL_RECEIVED_NS}, {sc.COL_RECORD_SEQ}"
    direction = sc.COL_MESSAGE_DIRECTION
    return f"""CREATE OR REPLACE VIEW _log_messages AS
        SELECT {sc.COL_TRACE_ID}, {sc.COL_SPAN_ID},
               arg_max({sc.COL_INPUT_MESSAGES}, {when}) FILTER (WHERE {sc.COL_INPUT_MESSAGES} IS NOT NULL)
                   AS detail_input,
               arg_max({sc.COL_OUTPUT_MESSAGES}, {when}) FILTER (WHERE {sc.COL_OUTPUT_MESSAGES} IS NOT NULL)
                   AS detail_output,
               arg_max({sc.COL_SYSTEM_INSTRUCTIONS}, {when})
                   FILTER (WHERE {sc.COL_SYSTEM_INSTRUCTIONS} IS NOT NULL) AS detail_system,
               '[' || string_agg({sc.COL_MESSAGE}, ',' ORDER BY {order}) FILTER (WHERE {direction} = 'input')
                   || ']' AS event_input,
               '[' || string_agg({sc.COL_MESSAGE}, ',' ORDER BY {sc.COL_MESSAGE_INDEX} NULLS LAST, {order})
                   FILTER (WHERE {direction} = 'output') || ']' AS event_output
        FROM (SELECT DISTINCT ON ({sc.COL_RECORD_ID}) * FROM {sc.TABLE_LOGS}
              WHERE {sc.COL_SPAN_ID} IS NOT NULL
                AND ({sc.COL_MESSAGE} IS NOT NULL OR {sc.COL_INPUT_MESSAGES} IS NOT NULL
                     OR {sc.COL_OUTPUT_MESSAGES} IS NOT NULL OR {sc.COL_SYSTEM_INSTRUCTIONS} IS NOT NULL))
        GROUP BY {sc.COL_TRACE_ID}, {sc.COL_SPAN_ID}"""


def _llm_calls_view() -> str:
    server = ", ".join(f"coalesce(v.{c}, r.{c}) AS {c}"
                       for c in ("server_request_id", *SERVER_LATENCY_COLUMNS.values()))
    return f"""CREATE OR REPLACE VIEW {sc.VIEW_LLM_CALLS} AS
        SELECT c.{sc.COL_TRACE_ID}, c.{sc.COL_SPAN_ID}, c.{sc.COL_PARENT_SPAN_ID}, c.{sc.COL_NAME},
               c.{sc.COL_SERVICE_NAME}, c.{sc.COL_START_NS}, c.{sc.COL_END_NS},
               (c.{sc.COL_END_NS} - c.{sc.COL_START_NS}) / 1e9 AS duration_s, c.{sc.COL_STATUS_CODE},
               c.{sc.COL_OPERATION} AS operation, c.{sc.COL_PROVIDER} AS provider,
               coalesce(c.{sc.COL_RESPONSE_MODEL}, c.{sc.COL_REQUEST_MODEL}) AS model,
               c.{sc.COL_REQUEST_MODEL}, c.{sc.COL_RESPONSE_MODEL}, c.{sc.COL_RESPONSE_ID},
               coalesce(c.{sc.COL_INPUT_TOKENS}, v.server_input_tokens, r.server_input_tokens)
                   AS {sc.COL_INPUT_TOKENS},
               coalesce(c.{sc.COL_OUTPUT_TOKENS}, v.server_output_tokens, r.server_output_tokens)
                   AS {sc.COL_OUTPUT_TOKENS},
               coalesce(c.{sc.COL_INPUT_MESSAGES}, m.detail_input, m.event_input) AS {sc.COL_INPUT_MESSAGES},
               coalesce(c.{sc.COL_OUTPUT_MESSAGES}, m.detail_output, m.event_output) AS {sc.COL_OUTPUT_MESSAGES},
               coalesce(c.{sc.COL_SYSTEM_INSTRUCTIONS}, m.detail_system) AS {sc.COL_SYSTEM_INSTRUCTIONS},
               c.{sc.COL_PROMPT_TOKEN_IDS}, c.{sc.COL_RESPONSE_TOKEN_IDS}, c.{sc.COL_RESPONSE_LOGPROBS},
               c.{sc.COL_POLICY_VERSION}, c.{sc.COL_REWARD} AS call_reward,
               c._episode AS {sc.COL_EPISODE_ID}, c._task AS {sc.COL_TASK_ID},
               c._rollout AS {sc.COL_ROLLOUT_ID}, c._agent AS {sc.COL_AGENT_NAME},
               c.{sc.COL_CONVERSATION_ID}, {server}, c.{sc.COL_ATTRIBUTES}
        FROM _span_context c
        LEFT JOIN _log_messages m
          ON m.{sc.COL_TRACE_ID} = c.{sc.COL_TRACE_ID} AND m.{sc.COL_SPAN_ID} = c.{sc.COL_SPAN_ID}
        LEFT JOIN (SELECT * FROM _vllm_server QUALIFY row_number() OVER (
                       PARTITION BY {sc.COL_TRACE_ID}, {sc.COL_PARENT_SPAN_ID} ORDER BY {sc.COL_END_NS} DESC) = 1) v
          ON v.{sc.COL_TRACE_ID} = c.{sc.COL_TRACE_ID} AND v.{sc.COL_PARENT_SPAN_ID} = c.{sc.COL_SPAN_ID}
        LEFT JOIN (SELECT * FROM _vllm_server WHERE server_request_id IS NOT NULL QUALIFY row_number() OVER (
                       PARTITION BY server_request_id ORDER BY {sc.COL_END_NS} DESC) = 1) r
          ON v.{sc.COL_TRACE_ID} IS NULL AND r.server_request_id = c.{sc.COL_RESPONSE_ID}
        WHERE c._is_llm"""


def _episodes_view() -> str:
    """Episodes; rewards counted once per (trace_id, span_id), delayed ones included."""
    return f"""CREATE OR REPLACE VIEW {sc.VIEW_EPISODES} AS
        WITH ctx AS MATERIALIZED (
            SELECT _episode, _task, _rollout, _agent, _feedback, _is_llm, {sc.COL_TRACE_ID}, {sc.COL_SPAN_ID},
                   {sc.COL_SERVICE_NAME}, {sc.COL_REWARD}, {sc.COL_START_NS}, {sc.COL_END_NS},
                   {sc.COL_POLICY_VERSION}, {sc.COL_STATUS_CODE}
            FROM _span_context),
        rewards AS (
            SELECT _episode,
                   arg_max({sc.COL_REWARD}, {sc.COL_END_NS}) AS {sc.COL_REWARD},
                   sum({sc.COL_REWARD}) AS reward_sum,
                   count(*) AS n_rewards,
                   count(*) FILTER (WHERE _feedback) AS n_delayed_rewards
            FROM (SELECT DISTINCT ON ({sc.COL_TRACE_ID}, {sc.COL_SPAN_ID}) * FROM ctx
                  WHERE {sc.COL_REWARD} IS NOT NULL)
            GROUP BY _episode),
        spans AS (
            SELECT _episode,
                   min(_task) AS {sc.COL_TASK_ID},
                   min(_rollout) AS {sc.COL_ROLLOUT_ID},
                   min(_agent) AS {sc.COL_AGENT_NAME},
                   min({sc.COL_SERVICE_NAME}) AS {sc.COL_SERVICE_NAME},
                   count(*) FILTER (WHERE _is_llm) AS n_llm_calls,
                   count(*) AS n_spans,
                   min({sc.COL_START_NS}) AS {sc.COL_START_NS},
                   max({sc.COL_END_NS}) AS {sc.COL_END_NS},
                   min({sc.COL_POLICY_VERSION}) AS min_policy_version,
                   max({sc.COL_POLICY_VERSION}) AS max_policy_version,
                   bool_or({sc.COL_STATUS_CODE} = 2) AS has_error,
                   list(DISTINCT {sc.COL_TRACE_ID}) AS trace_ids
            FROM ctx WHERE NOT _feedback GROUP BY _episode)
        SELECT s._episode AS {sc.COL_EPISODE_ID}, s.{sc.COL_TASK_ID}, s.{sc.COL_ROLLOUT_ID}, s.{sc.COL_AGENT_NAME},
               s.{sc.COL_SERVICE_NAME}, r.{sc.COL_REWARD}, r.reward_sum, coalesce(r.n_rewards, 0) AS n_rewards,
               coalesce(r.n_delayed_rewards, 0) AS n_delayed_rewards, s.n_llm_calls, s.n_spans,
               s.{sc.COL_START_NS}, s.{sc.COL_END_NS}, s.min_policy_version, s.max_policy_version, s.has_error,
               s.trace_ids
        FROM spans s LEFT JOIN rewards r USING (_episode)"""


def write_views_file(data_dir: Path) -> Path:
    """Publish the view SQL as ``DATA/views.sql`` (paths under a placeholder) if it changed.

    Readers that must not import the collector (the trainer, plain DuckDB users) run it after
    replacing ``semconv.VIEWS_DATA_PLACEHOLDER`` with the store's path.
    """
    data_dir = Path(data_dir)
    ensure_schema_anchor(data_dir)
    placeholder = Path(sc.VIEWS_DATA_PLACEHOLDER)
    statements = [*view_statements(placeholder), *ensure_training_anchors(data_dir, view_root=placeholder)]
    text = "".join(statement.strip() + ";\n\n" for statement in statements)
    path = data_dir / sc.VIEWS_FILE
    if not path.exists() or path.read_text() != text:
        tmp = path.with_name(f".{sc.VIEWS_FILE}.{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return path


def connect(data_dir: str | Path, connection: duckdb.DuckDBPyConnection | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the store's views defined.

    Args:
        data_dir: the collector's ``--data`` directory.
        connection: define the views on this connection instead of a new one.

    Raises:
        FileNotFoundError: ``data_dir`` holds no span store.
    """
    data_dir = Path(data_dir)
    if not (data_dir / layout.SPANS_DIR).is_dir():
        raise FileNotFoundError(f"{data_dir} is not a tracetrain span store (no {layout.SPANS_DIR}/ folder); "
                                f"start `tracetrain collector --data {data_dir}` first")
    write_views_file(data_dir)
    con = connection or duckdb.connect(":memory:")
    for statement in [*view_statements(data_dir), *ensure_training_anchors(data_dir)]:
        con.execute(statement)
    return con


def query(data_dir: str | Path, sql: str, params: Any = None) -> pa.Table:
    """Run ``sql`` against the store's views and return an Arrow table.

    Example::

        query("data", "SELECT model, count(*) FROM llm_calls GROUP BY model")
    """
    con = connect(data_dir)
    try:
        return run_listing_safe(lambda: _to_table(con.sql(sql, params=params)))
    finally:
        con.close()


def _to_table(relation: Any) -> pa.Table:
    return relation.to_arrow_table() if relation is not None else pa.table({})


LISTING_RACE_RETRIES = 5


def run_listing_safe(run: Callable[[], T]) -> T:
    """Run a query, again if a file it listed vanished before it was read.

    A query lists the Parquet files when it starts; compaction may delete some of
    them (their spans now live in the merged file) before the query opens them.
    Re-running lists the files afresh, so the answer is complete and exact.
    """
    for attempt in range(LISTING_RACE_RETRIES):
        try:
            return run()
        except duckdb.IOException as exc:
            if "No such file" not in str(exc) or attempt == LISTING_RACE_RETRIES - 1:
                raise
            time.sleep(0.01 * (attempt + 1))
    raise AssertionError("unreachable")


def query_pandas(data_dir: str | Path, sql: str, params: Any = None) -> Any:
    """Like ``query`` but returns a pandas DataFrame (needs pandas installed)."""
    return query(data_dir, sql, params).to_pandas()
