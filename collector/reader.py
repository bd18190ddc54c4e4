"""Read the span store from any process, while daemons write it.

The store is plain Parquet, so a reader needs no daemon and takes no lock: this
module opens an in-memory DuckDB and defines three views over the files.

* ``spans``: one row per span (every column of docs/schema.md, plus ``date``,
  the ingest-date partition).
* ``llm_calls``: one row per LLM call, with episode/task/rollout/agent filled in
  from the rest of the trace when the call's own span does not carry them.
* ``episodes``: one row per episode with its reward (the latest reward emitted in
  the episode), reward count and sum, LLM call count, time span, policy versions.

A view re-lists the files on every query, so a long-lived connection sees new
spans as soon as they are acknowledged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from tracetrain.collector import store_layout as layout
from tracetrain.collector.schema import SPAN_SCHEMA
from tracetrain.instrumentation import semconv as sc

SCHEMA_ANCHOR_DIR = ("date=1970-01-01", "service=_schema")
"""An empty file with the full schema, so queries work on an empty store and
``union_by_name`` always knows every column. Retention never removes it."""

LLM_OPERATIONS = ("chat", "text_completion", "generate_content", "completion")


def ensure_schema_anchor(data_dir: Path) -> Path:
    directory = data_dir / layout.SPANS_DIR / SCHEMA_ANCHOR_DIR[0] / SCHEMA_ANCHOR_DIR[1]
    path = directory / f"schema-v{sc.SCHEMA_VERSION}.parquet"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".schema-v{sc.SCHEMA_VERSION}.parquet.tmp"
        pq.write_table(pa.Table.from_batches([], SPAN_SCHEMA), tmp)
        tmp.replace(path)
    return path


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def view_statements(data_dir: Path) -> list[str]:
    """The SQL that defines ``spans``, ``llm_calls`` and ``episodes`` over a store."""
    source = (f"read_parquet({_sql_string(layout.spans_glob(data_dir))}, hive_partitioning = true, "
              f"union_by_name = true, hive_types = {{'date': DATE, 'service': VARCHAR}})")
    is_llm = (f"(gen_ai_operation IN {LLM_OPERATIONS!r} OR response_token_ids IS NOT NULL "
              f"OR output_messages IS NOT NULL)")
    return [
        f"CREATE OR REPLACE VIEW {sc.TABLE_SPANS} AS SELECT * EXCLUDE (service) FROM {source}",
        f"""CREATE OR REPLACE VIEW _span_context AS
            SELECT s.*,
                   coalesce(s.{sc.COL_EPISODE_ID}, t.trace_episode_id, s.{sc.COL_TRACE_ID}) AS _episode,
                   coalesce(s.{sc.COL_TASK_ID}, t.trace_task_id) AS _task,
                   coalesce(s.{sc.COL_ROLLOUT_ID}, t.trace_rollout_id) AS _rollout,
                   coalesce(s.{sc.COL_AGENT_NAME}, p.{sc.COL_AGENT_NAME}, t.trace_agent_name) AS _agent,
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
              ON p.{sc.COL_TRACE_ID} = s.{sc.COL_TRACE_ID} AND p.{sc.COL_SPAN_ID} = s.{sc.COL_PARENT_SPAN_ID}""",
        f"""CREATE OR REPLACE VIEW {sc.VIEW_LLM_CALLS} AS
            SELECT {sc.COL_TRACE_ID}, {sc.COL_SPAN_ID}, {sc.COL_PARENT_SPAN_ID}, {sc.COL_NAME},
                   {sc.COL_SERVICE_NAME}, {sc.COL_START_NS}, {sc.COL_END_NS},
                   ({sc.COL_END_NS} - {sc.COL_START_NS}) / 1e9 AS duration_s, {sc.COL_STATUS_CODE},
                   {sc.COL_OPERATION} AS operation, {sc.COL_PROVIDER} AS provider,
                   coalesce({sc.COL_RESPONSE_MODEL}, {sc.COL_REQUEST_MODEL}) AS model,
                   {sc.COL_REQUEST_MODEL}, {sc.COL_RESPONSE_MODEL}, {sc.COL_RESPONSE_ID},
                   {sc.COL_INPUT_TOKENS}, {sc.COL_OUTPUT_TOKENS},
                   {sc.COL_INPUT_MESSAGES}, {sc.COL_OUTPUT_MESSAGES}, {sc.COL_SYSTEM_INSTRUCTIONS},
                   {sc.COL_PROMPT_TOKEN_IDS}, {sc.COL_RESPONSE_TOKEN_IDS}, {sc.COL_RESPONSE_LOGPROBS},
                   {sc.COL_POLICY_VERSION}, {sc.COL_REWARD} AS call_reward,
                   _episode AS {sc.COL_EPISODE_ID}, _task AS {sc.COL_TASK_ID},
                   _rollout AS {sc.COL_ROLLOUT_ID}, _agent AS {sc.COL_AGENT_NAME},
                   {sc.COL_CONVERSATION_ID}, {sc.COL_ATTRIBUTES}
            FROM _span_context WHERE _is_llm""",
        f"""CREATE OR REPLACE VIEW {sc.VIEW_EPISODES} AS
            SELECT _episode AS {sc.COL_EPISODE_ID},
                   min(_task) AS {sc.COL_TASK_ID},
                   min(_rollout) AS {sc.COL_ROLLOUT_ID},
                   min(_agent) AS {sc.COL_AGENT_NAME},
                   min({sc.COL_SERVICE_NAME}) AS {sc.COL_SERVICE_NAME},
                   arg_max({sc.COL_REWARD}, {sc.COL_END_NS}) FILTER (WHERE {sc.COL_REWARD} IS NOT NULL)
                       AS {sc.COL_REWARD},
                   sum({sc.COL_REWARD}) AS reward_sum,
                   count({sc.COL_REWARD}) AS n_rewards,
                   count(*) FILTER (WHERE _is_llm) AS n_llm_calls,
                   count(*) AS n_spans,
                   min({sc.COL_START_NS}) AS {sc.COL_START_NS},
                   max({sc.COL_END_NS}) AS {sc.COL_END_NS},
                   min({sc.COL_POLICY_VERSION}) AS min_policy_version,
                   max({sc.COL_POLICY_VERSION}) AS max_policy_version,
                   bool_or({sc.COL_STATUS_CODE} = 2) AS has_error,
                   list(DISTINCT {sc.COL_TRACE_ID}) AS trace_ids
            FROM _span_context GROUP BY _episode""",
    ]


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
    ensure_schema_anchor(data_dir)
    con = connection or duckdb.connect(":memory:")
    for statement in view_statements(data_dir):
        con.execute(statement)
    return con


def query(data_dir: str | Path, sql: str, params: Any = None) -> pa.Table:
    """Run ``sql`` against the store's views and return an Arrow table.

    Example::

        query("data", "SELECT model, count(*) FROM llm_calls GROUP BY model")
    """
    con = connect(data_dir)
    try:
        relation = con.sql(sql, params=params)
        return relation.to_arrow_table() if relation is not None else pa.table({})
    finally:
        con.close()


def query_pandas(data_dir: str | Path, sql: str, params: Any = None) -> Any:
    """Like ``query`` but returns a pandas DataFrame (needs pandas installed)."""
    return query(data_dir, sql, params).to_pandas()
