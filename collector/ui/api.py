"""The dashboard's HTTP side: ``/ui`` (static page) and ``/ui/api/*`` (JSON), on the collector's port.

Every route is a read. Queries run in a small thread pool of their own, so at
most ``max_workers`` dashboard queries run at once and the OTLP receivers' pool
never waits for them. The collector's bearer-token middleware guards every
route; a browser, which cannot send an ``Authorization`` header on navigation,
may send the token as the ``tracetrain_token`` cookie (set by the 401 page's form).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aiohttp import web

from tracetrain.collector.metrics import CollectorMetrics
from tracetrain.collector.ui.store import (BadQuery, EpisodeFilter, UiStore, parse_time_ns, storage_bytes,
                                           store_listing)

logger = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).parent / "static"
STATIC_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
SECURITY_HEADERS = {
    # Nothing may come from anywhere but the collector itself; no inline script.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
}
LOGIN_ASSETS = ("login.js", "style.css")
WARM_UP_MIN_SPAN_BYTES = 32 << 20
"""From this much span Parquet on disk, the episode list is built at start-up, in the dashboard's pool."""
HEALTH_SAMPLE_INTERVAL_S = 1.0
HEALTH_HISTORY = 300


class HealthSampler:
    """Samples the daemon's counters once a second, for rates and the last five minutes' chart."""

    def __init__(self, metrics: CollectorMetrics) -> None:
        self.metrics = metrics
        self.samples: deque[dict[str, float]] = deque(maxlen=HEALTH_HISTORY)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tracetrain-ui-health", daemon=True)

    def start(self) -> None:
        self.sample()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(HEALTH_SAMPLE_INTERVAL_S):
            self.sample()

    def _sum(self, sample_name: str, **labels: str) -> float:
        total = 0.0
        for family in self.metrics.registry.collect():
            for sample in family.samples:
                if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total

    def sample(self) -> dict[str, float]:
        lag = "tracetrain_lag_to_queryable_seconds"
        point = {
            "unix_s": time.time(),
            "spans_accepted": self._sum("tracetrain_spans_accepted_total"),
            "spans_received": self._sum("tracetrain_spans_received_total"),
            "spans_refused": self._sum("tracetrain_spans_refused_total"),
            "spans_rejected": self._sum("tracetrain_spans_rejected_total"),
            "requests_refused": self._sum("tracetrain_requests_total", outcome="refused"),
            "bad_requests": self._sum("tracetrain_bad_requests_total"),
            "commit_failures": self._sum("tracetrain_commit_failures_total"),
            "pending_bytes": self._sum("tracetrain_pending_bytes"),
            "lag_count": self._sum(lag + "_count"),
            "lag_sum_s": self._sum(lag + "_sum"),
        }
        self.samples.append(point)
        return point

    def lag_buckets(self) -> list[tuple[float, float]]:
        """Cumulative (upper bound s, count) pairs of the lag-to-queryable histogram."""
        out = []
        for family in self.metrics.registry.collect():
            for sample in family.samples:
                if sample.name == "tracetrain_lag_to_queryable_seconds_bucket":
                    out.append((float(sample.labels["le"]), sample.value))
        return sorted(out)


def _quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Upper bound of the bucket holding quantile ``q`` (what a Prometheus histogram can tell)."""
    if not buckets or buckets[-1][1] == 0:
        return None
    target = q * buckets[-1][1]
    for bound, count in buckets:
        if count >= target:
            return bound
    return None


class DashboardApi:
    """Routes and state of the dashboard for one collector daemon."""

    def __init__(self, data_dir: str | Path, metrics: CollectorMetrics, max_workers: int = 2) -> None:
        self.data_dir = Path(data_dir)
        self.health_sampler = HealthSampler(metrics)
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="tracetrain-ui")
        self._store: UiStore | None = None
        self._store_lock = threading.Lock()

    def start(self) -> None:
        """Start sampling; on a big store, build the episode list now so the first visitor does not wait."""
        self.health_sampler.start()
        span_bytes = sum(size for _, size, _ in store_listing(self.data_dir))
        if span_bytes >= WARM_UP_MIN_SPAN_BYTES:
            self._pool.submit(self._warm_up)

    def _warm_up(self) -> None:
        try:
            self.store.refresh_episodes()
        except Exception:  # the first request will try again and report it
            logger.exception("building the dashboard's episode list at start-up failed")

    def close(self) -> None:
        self.health_sampler.stop()
        self._pool.shutdown(wait=True)
        if self._store is not None:
            self._store.close()

    @property
    def store(self) -> UiStore:
        with self._store_lock:  # opened on first use: the store exists by then
            if self._store is None:
                self._store = UiStore(self.data_dir)
            return self._store

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/ui", self._redirect),
            web.get("/ui/", self._index),
            web.get("/ui/static/{name}", self._static),
            web.get("/ui/api/episodes", self._episodes),
            web.get("/ui/api/trace/{trace_id}", self._trace),
            web.get("/ui/api/training", self._training),
            web.get("/ui/api/health", self._health),
        ]

    def unauthorized(self, request: web.Request) -> web.Response:
        """The 401 for /ui paths: JSON for the API, a token form (no data) for pages."""
        if request.path.startswith("/ui/api/"):
            return web.json_response({"error": "missing or wrong bearer token"}, status=401,
                                     headers=SECURITY_HEADERS)
        name = request.path.removeprefix("/ui/static/")
        if name in LOGIN_ASSETS:  # the token form's own script and style: no data in them
            return self._file(name)
        if request.path.startswith("/ui/static/"):
            return web.Response(status=401, text="missing or wrong bearer token", headers=SECURITY_HEADERS)
        return web.Response(status=401, body=(STATIC_DIR / "login.html").read_bytes(), content_type="text/html",
                            headers=SECURITY_HEADERS)

    # ------------------------------------------------------------ handlers

    async def _redirect(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/ui/")

    async def _index(self, request: web.Request) -> web.Response:
        return self._file("index.html")

    async def _static(self, request: web.Request) -> web.Response:
        return self._file(request.match_info["name"])

    def _file(self, name: str) -> web.Response:
        path = STATIC_DIR / name
        if "/" in name or name.startswith(".") or path.suffix not in STATIC_TYPES or not path.is_file():
            raise web.HTTPNotFound()
        return web.Response(body=path.read_bytes(), content_type=STATIC_TYPES[path.suffix],
                            headers=SECURITY_HEADERS)

    async def _json(self, work, *args) -> web.Response:
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._pool, work, *args)
        except BadQuery as exc:
            return web.json_response({"error": str(exc)}, status=400, headers=SECURITY_HEADERS)
        if result is None:
            return web.json_response({"error": "not found"}, status=404, headers=SECURITY_HEADERS)
        return web.json_response(result, headers=SECURITY_HEADERS, dumps=_dumps)

    async def _episodes(self, request: web.Request) -> web.Response:
        query = request.query
        try:
            filters = EpisodeFilter(
                service=query.get("service") or None, task=query.get("task") or None,
                agent=query.get("agent") or None,
                reward_min=_number(query, "reward_min", float), reward_max=_number(query, "reward_max", float),
                policy_version=_number(query, "policy_version", int),
                since_ns=parse_time_ns(query.get("since"), "since"),
                until_ns=parse_time_ns(query.get("until"), "until"), q=query.get("q") or None)
            limit = _number(query, "limit", int)
        except BadQuery as exc:
            return web.json_response({"error": str(exc)}, status=400, headers=SECURITY_HEADERS)
        facets = query.get("facets") in ("1", "true")
        return await self._json(lambda: self.store.episodes(
            filters, query.get("cursor") or None, 50 if limit is None else limit, facets))

    async def _trace(self, request: web.Request) -> web.Response:
        return await self._json(lambda: self.store.trace(request.match_info["trace_id"]))

    async def _training(self, request: web.Request) -> web.Response:
        try:
            threshold = _number(request.query, "success_threshold", float)
        except BadQuery as exc:
            return web.json_response({"error": str(exc)}, status=400, headers=SECURITY_HEADERS)
        return await self._json(lambda: self.store.training(1.0 if threshold is None else threshold))

    async def _health(self, request: web.Request) -> web.Response:
        return await self._json(self.health)

    def health(self) -> dict[str, Any]:
        """Ingestion health: rates over the last minute, totals, lag quantiles, storage size."""
        sampler = self.health_sampler
        now = sampler.sample()
        history = list(sampler.samples)
        base = next((s for s in history if now["unix_s"] - s["unix_s"] <= 60.0), history[0])
        elapsed_s = now["unix_s"] - base["unix_s"]

        def rate(key: str) -> float | None:
            return (now[key] - base[key]) / elapsed_s if elapsed_s >= 0.5 else None

        series = [{"unix_s": b["unix_s"], "spans_per_s": (b["spans_accepted"] - a["spans_accepted"])
                   / max(1e-9, b["unix_s"] - a["unix_s"])} for a, b in zip(history, history[1:])]
        buckets = sampler.lag_buckets()
        recent_lags = now["lag_count"] - base["lag_count"]
        return {
            "totals": now,
            "spans_per_s": rate("spans_accepted"),
            "refusals_per_s": rate("spans_refused") if elapsed_s >= 0.5 else None,
            "window_s": elapsed_s,
            "spans_per_s_series": series,
            "lag_to_queryable_s": {
                "mean": now["lag_sum_s"] / now["lag_count"] if now["lag_count"] else None,
                "recent_mean": (now["lag_sum_s"] - base["lag_sum_s"]) / recent_lags if recent_lags else None,
                "p50_le": _quantile(buckets, 0.5), "p99_le": _quantile(buckets, 0.99),
                "buckets": [{"le": le, "count": count} for le, count in buckets],
            },
            "storage": storage_bytes(self.data_dir),
            "data_dir": str(self.data_dir.resolve()),
        }


def _number(query, name: str, kind):
    text = query.get(name)
    if text is None or text == "":
        return None
    try:
        return kind(text)
    except ValueError:
        raise BadQuery(f"{name}={text!r} is not {'an integer' if kind is int else 'a number'}") from None


def _dumps(value: Any) -> str:
    def clean(v: Any) -> Any:  # NaN/inf are not JSON
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(value), default=str)
