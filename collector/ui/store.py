"""The dashboard's queries over the span store, with the episode list cached.

``episodes`` is an aggregate over every span, seconds of work on a store of a
million spans, so ``UiStore`` materializes it once into an in-memory table and
reuses it until the store's file listing (paths, sizes, mtimes) changes. A
rebuild that took long is not repeated more often than ``REBUILD_BUDGET`` allows,
so a busy collector does not spend its CPU recomputing the list; answers then say
how old they are (``as_of_unix_s``, ``stale``).
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb

from tracetrain.collector import reader
from tracetrain.collector import store_layout as layout
from tracetrain.instrumentation import semconv as sc

logger = logging.getLogger(__name__)
EPISODE_COLUMNS = (
    "episode_id", "task_id", "rollout_id", "agent_name", "service_name", "reward", "reward_sum", "n_rewards",
    "n_delayed_rewards", "n_llm_calls", "n_spans", "start_time_unix_nano", "end_time_unix_nano",
    "min_policy_version", "max_policy_version", "has_error", "trace_ids")
MAX_PAGE = 500
MAX_TRACE_SPANS = 5000
MAX_FACET_VALUES = 200
REBUILD_BUDGET = 0.2
"""Share of wall time the episode-list cache may spend rebuilding while files keep changing."""
SYNC_REBUILD_S = 0.5
"""A rebuild that took less than this runs inside the request (always fresh); a longer one in the background."""
LOW_PROB_LOGPROB = math.log(0.1)
"""Tokens sampled with probability under 10 % are highlighted in the trace view."""


class BadQuery(ValueError):
    """A filter or cursor the API cannot read (HTTP 400)."""


@dataclass(frozen=True)
class EpisodeFilter:
    """Filters of the episode list; None means "any"."""

    service: str | None = None
    task: str | None = None
    agent: str | None = None
    reward_min: float | None = None
    reward_max: float | None = None
    policy_version: int | None = None
    since_ns: int | None = None
    until_ns: int | None = None
    q: str | None = None

    def where(self) -> tuple[list[str], list[Any]]:
        """SQL conditions (ANDed) and their parameters."""
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (("service_name", self.service), ("task_id", self.task), ("agent_name", self.agent)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if self.reward_min is not None:
            clauses.append("reward >= ?")
            params.append(self.reward_min)
        if self.reward_max is not None:
            clauses.append("reward <= ?")
            params.append(self.reward_max)
        if self.policy_version is not None:  # an episode may span a weight push
            clauses.append("? BETWEEN min_policy_version AND max_policy_version")
            params.append(self.policy_version)
        if self.since_ns is not None:
            clauses.append("end_time_unix_nano >= ?")
            params.append(self.since_ns)
        if self.until_ns is not None:
            clauses.append("end_time_unix_nano < ?")
            params.append(self.until_ns)
        if self.q:
            needle = self.q.lower()
            clauses.append("(contains(lower(episode_id), ?) OR contains(lower(coalesce(task_id, '')), ?) "
                           "OR contains(lower(coalesce(agent_name, '')), ?) "
                           "OR contains(lower(coalesce(service_name, '')), ?) OR list_contains(trace_ids, ?))")
            params.extend([needle, needle, needle, needle, self.q.lower()])
        return clauses, params


def parse_time_ns(text: str | None, name: str) -> int | None:
    """``2026-11-28T04:00:00Z``, ``2026-11-28`` or unix seconds -> unix ns."""
    if text is None or text == "":
        return None
    try:
        return int(float(text) * 1e9)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BadQuery(f"{name}={text!r} is neither an ISO 8601 time nor unix seconds") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1e9)


def encode_cursor(end_ns: int, episode_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([end_ns, episode_id]).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    try:
        end_ns, episode_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return int(end_ns), str(episode_id)
    except (ValueError, TypeError):
        raise BadQuery(f"cursor {cursor!r} is not one this API returned") from None


def store_listing(data_dir: Path) -> tuple[tuple[str, int, int], ...]:
    """(path, size, mtime_ns) of every committed span file: the episode cache's key."""
    entries = []
    root = data_dir / layout.SPANS_DIR
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.endswith(".parquet") and not name.startswith("."):
                path = os.path.join(dirpath, name)
                try:
                    stat = os.stat(path)
                except FileNotFoundError:  # compacted away while we listed
                    continue
                entries.append((path, stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(entries))


def storage_bytes(data_dir: Path) -> dict[str, int]:
    """Bytes on disk under the store, by top-level folder, and the number of files."""
    sizes: dict[str, int] = {}
    n_files = 0
    for dirpath, _, filenames in os.walk(data_dir):
        top = Path(dirpath).relative_to(data_dir).parts[:1]
        key = top[0] if top else "."
        for name in filenames:
            try:
                sizes[key] = sizes.get(key, 0) + os.stat(os.path.join(dirpath, name)).st_size
                n_files += 1
            except FileNotFoundError:
                continue
    return {"total_bytes": sum(sizes.values()), "files": n_files, "by_folder": sizes}


def _rows(cursor: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> list[dict]:
    relation = cursor.execute(sql, params or [])
    names = [d[0] for d in relation.description]
    return [dict(zip(names, row)) for row in relation.fetchall()]


class UiStore:
    """Thread-safe read access for the dashboard; one in-memory DuckDB, a cursor per query."""

    def __init__(self, data_dir: str | Path, duckdb_threads: int = 2) -> None:
        self.data_dir = Path(data_dir)
        self._con = reader.connect(self.data_dir)
        self._con.execute(f"SET threads = {int(duckdb_threads)}")
        self._lock = threading.Lock()
        self._listing: tuple | None = None
        self._built_at_s = 0.0
        self._build_s = 0.0
        self._builder: threading.Thread | None = None
        self._facets_cache: tuple[int, dict] | None = None
        self.rebuilds = 0

    def close(self) -> None:
        builder = self._builder
        if builder is not None:
            builder.join(120)
        self._con.close()

    def _query(self, sql: str, params: list | None = None) -> list[dict]:
        cursor = self._con.cursor()
        try:
            return reader.run_listing_safe(lambda: _rows(cursor, sql, params))
        finally:
            cursor.close()

    # ------------------------------------------------------------ episode cache

    def refresh_episodes(self) -> dict[str, Any]:
        """Rebuild the episode table if the span files changed.

        The first build, and any rebuild that was cheap last time (under SYNC_REBUILD_S), runs
        here, so small stores are always fresh. A costly one runs in the background, at most
        once per ``build time / REBUILD_BUDGET``, while answers come from the previous table,
        marked stale.
        """
        with self._lock:
            listing = store_listing(self.data_dir)
            changed = listing != self._listing
            if self._listing is None or (changed and self._build_s < SYNC_REBUILD_S):
                self._build(listing)
            elif (changed and self._builder is None
                  and time.time() - self._built_at_s >= self._build_s / REBUILD_BUDGET):
                self._builder = threading.Thread(target=self._build_in_background, args=(listing,),
                                                 name="tracetrain-ui-episodes", daemon=True)
                self._builder.start()
            return {"as_of_unix_s": self._built_at_s, "stale": listing != self._listing,
                    "cache_build_s": round(self._build_s, 4)}

    def _build(self, listing: tuple) -> None:
        """Materialize ``episodes`` as of ``listing`` and swap it in (one statement: readers see old or new)."""
        started_s, started = time.time(), time.perf_counter()
        cursor = self._con.cursor()
        try:
            # The keyset cursor needs an end time on every row.
            columns = ", ".join("coalesce(end_time_unix_nano, start_time_unix_nano, 0) AS end_time_unix_nano"
                                if c == "end_time_unix_nano" else c for c in EPISODE_COLUMNS)
            reader.run_listing_safe(lambda: cursor.execute(
                f"CREATE OR REPLACE TABLE _ui_episodes_next AS SELECT {columns} FROM {sc.VIEW_EPISODES}"))
            cursor.execute("CREATE OR REPLACE TABLE _ui_episodes AS SELECT * FROM _ui_episodes_next")
            cursor.execute("DROP TABLE _ui_episodes_next")
        finally:
            cursor.close()
        self._build_s = time.perf_counter() - started
        self._listing, self._built_at_s = listing, started_s
        self.rebuilds += 1

    def _build_in_background(self, listing: tuple) -> None:
        try:
            self._build(listing)
        except Exception:  # the next request retries; the old table keeps serving
            logger.exception("rebuilding the dashboard's episode list failed")
            self._built_at_s = time.time()
        finally:
            self._builder = None

    def episodes(self, filters: EpisodeFilter, cursor: str | None = None, limit: int = 50,
                 facets: bool = False) -> dict[str, Any]:
        """One page of episodes, newest end time first; ``next_cursor`` continues it (keyset)."""
        if not 1 <= limit <= MAX_PAGE:
            raise BadQuery(f"limit must be 1..{MAX_PAGE}, got {limit}")
        freshness = self.refresh_episodes()
        clauses, params = filters.where()
        count_sql = "SELECT count(*) AS n FROM _ui_episodes" + (" WHERE " + " AND ".join(clauses) if clauses else "")
        total = self._query(count_sql, params)[0]["n"]
        if cursor:
            end_ns, episode_id = decode_cursor(cursor)
            clauses.append("(end_time_unix_nano < ? OR (end_time_unix_nano = ? AND episode_id < ?))")
            params.extend([end_ns, end_ns, episode_id])
        where = " WHERE " + " AND ".join(clauses) if clauses else ""
        rows = self._query(f"SELECT * FROM _ui_episodes{where} "
                           f"ORDER BY end_time_unix_nano DESC, episode_id DESC LIMIT {limit + 1}", params)
        next_cursor = None
        if len(rows) > limit:
            rows = rows[:limit]
            next_cursor = encode_cursor(rows[-1]["end_time_unix_nano"], rows[-1]["episode_id"])
        answer = {"episodes": [_episode_json(row) for row in rows], "total": total,
                  "next_cursor": next_cursor, **freshness}
        if facets:
            answer["facets"] = self._facets()
        return answer

    def _facets(self) -> dict[str, list]:
        """Values for the filter menus, computed once per build of the episode table."""
        built = self.rebuilds
        cached = self._facets_cache
        if cached is not None and cached[0] == built:
            return cached[1]
        facets = self._compute_facets()
        self._facets_cache = (built, facets)
        return facets

    def _compute_facets(self) -> dict[str, list]:
        facets = {}
        for name, column in (("service", "service_name"), ("task", "task_id"), ("agent", "agent_name")):
            facets[name] = [r["v"] for r in self._query(
                f"SELECT {column} AS v FROM _ui_episodes WHERE {column} IS NOT NULL GROUP BY v "
                f"ORDER BY count(*) DESC, v LIMIT {MAX_FACET_VALUES}")]
        facets["policy_version"] = [r["v"] for r in self._query(
            "SELECT DISTINCT unnest([min_policy_version, max_policy_version]) AS v FROM _ui_episodes "
            f"WHERE min_policy_version IS NOT NULL ORDER BY v LIMIT {MAX_FACET_VALUES}")]
        return facets

    # ------------------------------------------------------------ one trace

    def trace(self, trace_id: str) -> dict[str, Any] | None:
        """Spans of a trace (waterfall), LLM call details, and its episode's rewards.

        One scan of ``spans`` for the trace; the ``llm_calls`` view is not used here because
        it resolves episode context over the whole store, which a single trace does not need.
        """
        trace_id = trace_id.lower()
        if len(trace_id) != 32 or any(c not in "0123456789abcdef" for c in trace_id):
            raise BadQuery(f"trace id {trace_id!r} is not 32 hex digits")
        spans = self._query(
            f"""SELECT DISTINCT ON (span_id) * EXCLUDE (trace_id, date)
                FROM {sc.TABLE_SPANS} WHERE trace_id = ?
                ORDER BY span_id, received_unix_nano LIMIT {MAX_TRACE_SPANS}""", [trace_id])
        if not spans:
            return None
        self.refresh_episodes()
        episodes = [_episode_json(r) for r in self._query(
            "SELECT * FROM _ui_episodes WHERE list_contains(trace_ids, ?)", [trace_id])]
        t0 = min(s["start_time_unix_nano"] or 0 for s in spans)
        spans.sort(key=lambda s: (s["start_time_unix_nano"] or 0, s["span_id"]))
        calls = _llm_calls(spans, self._log_messages(trace_id))
        rewards = self._rewards(trace_id, spans, episodes, t0)
        return {"trace_id": trace_id, "start_unix_ms": t0 / 1e6,
                "spans": [_span_json(s, t0, calls.get(s["span_id"])) for s in spans],
                "episodes": episodes, "rewards": rewards, "low_prob_logprob": LOW_PROB_LOGPROB}

    def _log_messages(self, trace_id: str) -> dict[str, dict]:
        """Message content that arrived as GenAI log events, per span id (reader's ``_log_messages``)."""
        rows = self._query("SELECT * FROM _log_messages WHERE trace_id = ?", [trace_id])
        return {r["span_id"]: r for r in rows}

    def _rewards(self, trace_id: str, spans: list[dict], episodes: list[dict], t0: int) -> list[dict]:
        """Rewards in this trace, in the episode's other traces, and delayed ones for the episode.

        Delayed rewards are spans of their own trace under the feedback service's partition, so
        only those files are read for them.
        """
        rows = [dict(s, trace_id=trace_id, delayed=False) for s in spans if s["reward"] is not None]
        episode_ids = [e["episode_id"] for e in episodes] or [trace_id]
        other_traces = sorted({t for e in episodes for t in e["trace_ids"]} - {trace_id})
        columns = "trace_id, span_id, name, end_time_unix_nano, reward, attributes"
        if other_traces:
            marks = ", ".join("?" * len(other_traces))
            rows += [dict(r, delayed=False) for r in self._query(
                f"SELECT DISTINCT ON (trace_id, span_id) {columns} FROM {sc.TABLE_SPANS} "
                f"WHERE reward IS NOT NULL AND trace_id IN ({marks})", other_traces)]
        feedback_files = sorted(str(p) for p in self.data_dir.glob(
            f"{layout.SPANS_DIR}/*/{layout.partition_dir(Path(), 'x', sc.FEEDBACK_SERVICE_NAME).name}/*.parquet"))
        if feedback_files:
            marks = ", ".join("?" * len(episode_ids))
            rows += [dict(r, delayed=True) for r in self._query(
                f"SELECT DISTINCT ON (trace_id, span_id) {columns} "
                f"FROM read_parquet(?, union_by_name = true) "
                f"WHERE reward IS NOT NULL AND episode_id IN ({marks}) AND scope_name = ?",
                [feedback_files, *episode_ids, sc.FEEDBACK_SCOPE_NAME])]
        rows.sort(key=lambda r: (r["end_time_unix_nano"] or 0, r["span_id"]))
        out = []
        for r in rows:
            attributes = _maybe_json(r["attributes"])
            name = attributes.get(sc.REWARD_NAME) if isinstance(attributes, dict) else None
            out.append({"trace_id": r["trace_id"], "span_id": r["span_id"], "name": name or r["name"],
                        "value": r["reward"], "delayed": r["delayed"],
                        "unix_ms": (r["end_time_unix_nano"] or 0) / 1e6,
                        "offset_ms": ((r["end_time_unix_nano"] or t0) - t0) / 1e6, "attributes": attributes})
        return out

    # ------------------------------------------------------------ training

    def training(self, success_threshold: float = 1.0, max_steps: int = 20000) -> dict[str, Any]:
        """Training curves, weight pushes, checkpoint lineage and reward per policy version."""
        steps = self._query(
            f"SELECT * EXCLUDE (skipped), skipped FROM {sc.TABLE_TRAIN_STEPS} WHERE run_id IS NOT NULL "
            f"ORDER BY run_id, step LIMIT {int(max_steps)}")
        checkpoints = self._query(
            f"""SELECT run_id, step, time_unix_nano, agent_name, policy_version, path,
                       len(episode_ids) AS n_episodes, episode_ids[1:50] AS episode_ids,
                       list_sort(list_distinct(trained_policy_versions)) AS trained_policy_versions
                FROM {sc.TABLE_CHECKPOINTS} WHERE run_id IS NOT NULL ORDER BY time_unix_nano, run_id, step""")
        self.refresh_episodes()
        per_version = self._query(
            """SELECT max_policy_version AS policy_version, count(*) AS n_episodes,
                      count(reward) AS n_rewarded, avg(reward) AS reward_mean,
                      avg(CASE WHEN reward >= ? THEN 1.0 ELSE 0.0 END) FILTER (WHERE reward IS NOT NULL)
                          AS success_rate,
                      min(start_time_unix_nano) AS first_ns, max(end_time_unix_nano) AS last_ns
               FROM _ui_episodes GROUP BY max_policy_version ORDER BY max_policy_version NULLS FIRST""",
            [success_threshold])
        for row in steps:
            row["unix_ms"] = (row.pop("time_unix_nano") or 0) / 1e6
            row["skipped"] = _maybe_json(row["skipped"])
        for row in checkpoints:
            row["unix_ms"] = (row.pop("time_unix_nano") or 0) / 1e6
        for row in per_version:
            row["first_unix_ms"] = (row.pop("first_ns") or 0) / 1e6
            row["last_unix_ms"] = (row.pop("last_ns") or 0) / 1e6
        pushes = [{"run_id": s["run_id"], "step": s["step"], "unix_ms": s["unix_ms"],
                   "policy_version": s["policy_version"], "push_s": s["push_s"]}
                  for s in steps if s["push_s"] is not None and s["policy_version"] is not None]
        return {"steps": steps, "checkpoints": checkpoints, "pushes": pushes, "per_policy_version": per_version,
                "success_threshold": success_threshold}


def _maybe_json(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _episode_json(row: dict) -> dict:
    out = dict(row)
    out["start_unix_ms"] = (out.pop("start_time_unix_nano") or 0) / 1e6
    end_ns = out.pop("end_time_unix_nano") or 0
    out["end_unix_ms"] = end_ns / 1e6
    out["trace_ids"] = sorted(out.get("trace_ids") or [])
    return out


_SPAN_FIELDS = ("span_id", "parent_span_id", "name", "kind", "status_code", "status_message", "service_name",
                "scope_name", "attributes", "events", "gen_ai_operation", "request_model", "response_model",
                "input_tokens", "output_tokens", "reward", "policy_version", "episode_id", "task_id", "agent_name")


def _span_json(row: dict, t0: int, call: dict | None) -> dict:
    span = {k: row[k] for k in _SPAN_FIELDS}
    start, end = row["start_time_unix_nano"] or t0, row["end_time_unix_nano"] or t0
    span["offset_ms"], span["duration_ms"] = (start - t0) / 1e6, max(0, end - start) / 1e6
    span["attributes"] = _maybe_json(span["attributes"])
    span["events"] = _maybe_json(span["events"])
    span["llm"] = call
    return span


def _is_vllm_server(span: dict) -> bool:
    """vLLM's own ``llm_request`` SERVER span: shown as its client call's server latencies, not a row."""
    return span["name"] == sc.VLLM_SERVER_SPAN_NAME and span["kind"] == 2


def _is_llm(span: dict) -> bool:
    """The same test as the reader's ``llm_calls`` view."""
    return (span["gen_ai_operation"] in reader.LLM_OPERATIONS or span["response_token_ids"] is not None
            or span["output_messages"] is not None) and not _is_vllm_server(span)


def _llm_calls(spans: list[dict], log_messages: dict[str, dict]) -> dict[str, dict]:
    """LLM call details per span id: messages (span, else log events), token ids, logprobs, server latency."""
    server = {s["parent_span_id"]: _maybe_json(s["attributes"]) for s in spans if _is_vllm_server(s)}
    calls = {}
    for span in spans:
        if not _is_llm(span):
            continue
        logs = log_messages.get(span["span_id"], {})
        latency = server.get(span["span_id"]) or {}
        calls[span["span_id"]] = {
            "model": span["response_model"] or span["request_model"],
            "input_tokens": span["input_tokens"], "output_tokens": span["output_tokens"],
            "input_messages": _maybe_json(span["input_messages"] or logs.get("detail_input") or logs.get("event_input")),
            "output_messages": _maybe_json(
                span["output_messages"] or logs.get("detail_output") or logs.get("event_output")),
            "system_instructions": _maybe_json(span["system_instructions"] or logs.get("detail_system")),
            "prompt_token_ids": span["prompt_token_ids"], "response_token_ids": span["response_token_ids"],
            "response_logprobs": span["response_logprobs"], "policy_version": span["policy_version"],
            "server_time_to_first_token_s": latency.get(sc.VLLM_LATENCY_PREFIX + "time_to_first_token"),
            "server_latency_e2e_s": latency.get(sc.VLLM_LATENCY_PREFIX + "e2e"),
        }
    return calls
