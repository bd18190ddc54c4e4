"""The dashboard's HTTP API against a real collector filled through the OTel SDK exporter."""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import make_collector
from tests.integration import ui_store
from tests.integration.ui_store import EPISODES, T0_NS, TOKEN

NEWEST_FIRST = [e.episode_id for e in sorted(EPISODES, key=lambda e: e.start_s, reverse=True)]


def fetch(port: int, path: str, token: str | None = TOKEN, cookie: str | None = None) -> tuple[int, str, bytes]:
    """GET with aiohttp's client: (status, content type, body)."""
    async def run() -> tuple[int, str, bytes]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if cookie is not None:
            headers["Cookie"] = f"tracetrain_token={cookie}"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}{path}", headers=headers,
                                   allow_redirects=False) as response:
                return response.status, response.content_type, await response.read()
    return asyncio.run(run())


def api(port: int, path: str, **params) -> dict:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    status, _, body = fetch(port, f"/ui/api/{path}" + (f"?{query}" if query else ""))
    assert status == 200, body
    return json.loads(body)


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("ui") / "data"
    daemon = make_collector(data_dir, auth_token=TOKEN)
    try:
        traces = ui_store.export_episodes(daemon.http_port)
        ui_store.post_delayed_reward(daemon.http_port)
        ui_store.write_training(data_dir)
        yield daemon, data_dir, traces
    finally:
        daemon.stop()


def _ids(page: dict) -> list[str]:
    return [e["episode_id"] for e in page["episodes"]]


def test_episode_list_filters_search_and_rewards(filled):
    daemon, _, traces = filled
    port = daemon.http_port
    page = api(port, "episodes", facets=1)
    assert _ids(page) == NEWEST_FIRST and page["total"] == len(EPISODES) and page["next_cursor"] is None
    by_id = {e["episode_id"]: e for e in page["episodes"]}
    delayed = by_id["ep-price-1"]  # the delayed 0.75 is later than the inline 0.25, so it is the reward
    assert (delayed["reward"], delayed["n_rewards"], delayed["n_delayed_rewards"]) == (0.75, 2, 1)
    assert by_id["ep-calc-1"]["n_llm_calls"] == 1 and by_id["ep-calc-1"]["n_spans"] == 4
    assert by_id["ep-calc-2"]["trace_ids"] == [traces["ep-calc-2"]]
    assert page["facets"]["service"] == ["calc-agent", "price-agent"]
    assert page["facets"]["policy_version"] == [1, 2, 3]
    assert set(page["facets"]["task"]) == {"add", "mul", "quote"}

    assert _ids(api(port, "episodes", service="price-agent")) == ["ep-price-2", "ep-price-1"]
    assert _ids(api(port, "episodes", task="add")) == ["ep-calc-3", "ep-calc-1"]
    assert _ids(api(port, "episodes", agent="solver", reward_min=0.5)) == ["ep-calc-3", "ep-calc-2"]
    assert _ids(api(port, "episodes", reward_max=0.3)) == ["ep-calc-1"]
    assert _ids(api(port, "episodes", policy_version=1)) == ["ep-calc-2", "ep-calc-1"]
    assert _ids(api(port, "episodes", q="PRICE-2")) == ["ep-price-2"]
    assert _ids(api(port, "episodes", q=traces["ep-calc-1"])) == ["ep-calc-1"]
    since_s, until_s = (T0_NS + 25 * 10**9) / 1e9, (T0_NS + 41 * 10**9) / 1e9
    assert _ids(api(port, "episodes", since=since_s)) == ["ep-price-2", "ep-price-1"]
    assert _ids(api(port, "episodes", since=since_s, until=until_s)) == ["ep-price-1"]
    since_iso = datetime.fromtimestamp(since_s, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert _ids(api(port, "episodes", since=since_iso)) == ["ep-price-2", "ep-price-1"]
    assert api(port, "episodes", service="nope")["total"] == 0


def test_keyset_pages_cover_the_list_once(filled):
    port = filled[0].http_port
    seen, cursor, pages = [], "", 0
    while True:
        page = api(port, "episodes", limit=2, cursor=cursor, service="")
        assert page["total"] == len(EPISODES) and len(page["episodes"]) <= 2
        seen += _ids(page)
        pages += 1
        if page["next_cursor"] is None:
            break
        cursor = page["next_cursor"]
    assert seen == NEWEST_FIRST and pages == 3
    filtered = api(port, "episodes", limit=1, service="calc-agent")
    second = api(port, "episodes", limit=1, service="calc-agent", cursor=filtered["next_cursor"])
    assert _ids(filtered) + _ids(second) == ["ep-calc-3", "ep-calc-2"] and second["total"] == 3


@pytest.mark.parametrize("path", [
    "episodes?reward_min=abc", "episodes?limit=0", "episodes?cursor=%25%25", "episodes?since=yesterday",
    "episodes?policy_version=1.5", "trace/not-a-trace-id", "training?success_threshold=x"])
def test_bad_queries_are_400_with_a_message(filled, path):
    status, content_type, body = fetch(filled[0].http_port, "/ui/api/" + path)
    assert status == 400 and content_type == "application/json" and json.loads(body)["error"]


def test_trace_view_has_the_tree_llm_tokens_and_delayed_rewards(filled):
    daemon, _, traces = filled
    assert fetch(daemon.http_port, "/ui/api/trace/" + "ab" * 16)[0] == 404
    trace = api(daemon.http_port, "trace/" + traces["ep-price-1"])
    spans = {s["name"]: s for s in trace["spans"]}
    assert set(spans) == {"invoke_agent pricer", "chat tiny", "execute_tool calc", "reward"}
    root = spans["invoke_agent pricer"]
    assert root["parent_span_id"] is None and root["offset_ms"] == 0 and root["duration_ms"] == 2000
    assert all(s["parent_span_id"] == root["span_id"] for s in trace["spans"] if s is not root)
    chat = spans["chat tiny"]
    assert (chat["offset_ms"], chat["duration_ms"]) == (100, 1000)
    llm = chat["llm"]
    assert llm["response_token_ids"] == ui_store.RESPONSE_IDS and llm["response_logprobs"] == ui_store.RESPONSE_LOGPROBS
    assert llm["prompt_token_ids"] == [7, 8, 9] and (llm["input_tokens"], llm["output_tokens"]) == (3, 4)
    assert llm["output_messages"][0]["parts"][0]["content"] == "answer-ep-price-1"
    assert spans["execute_tool calc"]["llm"] is None
    assert trace["low_prob_logprob"] == pytest.approx(math.log(0.1))
    assert [(r["value"], r["delayed"]) for r in trace["rewards"]] == [(0.25, False), (0.75, True)]
    assert trace["rewards"][1]["name"] == "user_feedback"
    assert trace["episodes"][0]["episode_id"] == "ep-price-1"


def test_training_curves_pushes_lineage_and_reward_per_version(filled):
    training = api(filled[0].http_port, "training")
    assert [s["step"] for s in training["steps"]] == [1, 2, 3, 4, 5, 6]
    assert training["steps"][2]["loss"] == pytest.approx(1 / 3) and training["steps"][0]["skipped"] == {"no_token_ids": 1}
    assert [(p["step"], p["policy_version"]) for p in training["pushes"]] == [(2, 2), (4, 3), (6, 4)]
    first = training["checkpoints"][0]
    assert (first["step"], first["policy_version"], first["n_episodes"]) == (2, 2, 2)
    assert sorted(first["episode_ids"]) == ["ep-calc-1", "ep-calc-2"] and first["trained_policy_versions"] == [1]
    per_version = {v["policy_version"]: v for v in training["per_policy_version"]}
    assert (per_version[1]["n_episodes"], per_version[1]["reward_mean"], per_version[1]["success_rate"]) == (2, 0.5, 0.5)
    assert per_version[2]["reward_mean"] == pytest.approx((1.0 + 0.75) / 2) and per_version[2]["success_rate"] == 0.5
    strict = api(filled[0].http_port, "training", success_threshold=0.7)
    assert {v["policy_version"]: v["success_rate"] for v in strict["per_policy_version"]}[2] == 1.0


def test_health_reports_counters_lag_and_storage(filled):
    daemon, data_dir, _ = filled
    health = api(daemon.http_port, "health")
    stored = len(EPISODES) * 4 + 1  # four spans per episode and the delayed reward span
    assert health["totals"]["spans_accepted"] == stored and health["totals"]["spans_refused"] == 0
    assert health["lag_to_queryable_s"]["mean"] > 0 and health["lag_to_queryable_s"]["p99_le"] > 0
    on_disk = sum(p.stat().st_size for p in Path(data_dir).rglob("*") if p.is_file())
    assert abs(health["storage"]["total_bytes"] - on_disk) <= on_disk * 0.05
    assert health["storage"]["by_folder"]["spans"] > 0 and health["storage"]["by_folder"]["training"] > 0


UI_PATHS = ["/ui", "/ui/", "/ui/static/app.js", "/ui/static/pages.js", "/ui/static/index.html",
            "/ui/api/episodes", "/ui/api/training", "/ui/api/health", "/ui/api/trace/" + "ab" * 16, "/ui/api/nope"]


@pytest.mark.parametrize("path", UI_PATHS)
def test_every_ui_route_needs_the_token(filled, path):
    port = filled[0].http_port
    for token, cookie in ((None, None), ("wrong", None), (None, "wrong")):
        status, _, body = fetch(port, path, token=token, cookie=cookie)
        assert status == 401, (path, token, cookie)
        assert b"ep-" not in body and b"calc-agent" not in body and b"function h(" not in body
    assert fetch(port, path)[0] in (200, 302, 404)
    assert fetch(port, path, token=None, cookie=TOKEN)[0] in (200, 302, 404)  # the browser's way


def test_the_401_page_is_a_token_form_and_the_cookie_opens_the_list(filled):
    port = filled[0].http_port
    status, content_type, body = fetch(port, "/ui/", token=None)
    assert (status, content_type) == (401, "text/html") and b'id="login"' in body
    assert fetch(port, "/ui/static/login.js", token=None)[0] == 200  # the form's script: no data in it
    status, _, body = fetch(port, "/ui/api/episodes", token=None, cookie=TOKEN)
    assert status == 200 and json.loads(body)["total"] == len(EPISODES)


def test_cache_follows_new_files_and_is_reused_otherwise(filled, monkeypatch):
    from tracetrain.collector.ui import store as ui_store_module

    monkeypatch.setattr(ui_store_module, "SYNC_REBUILD_S", 1e9)  # a loaded test box must not make it "costly"
    daemon, data_dir, _ = filled
    api(daemon.http_port, "episodes")
    store = daemon.dashboard.store
    rebuilds = store.rebuilds
    api(daemon.http_port, "episodes", service="calc-agent")
    api(daemon.http_port, "training")
    assert store.rebuilds == rebuilds  # no file changed
    ui_store.post_delayed_reward(daemon.http_port, reward_id="ui-r2", value=-1.0)
    page = api(daemon.http_port, "episodes", q="ep-price-1")
    assert store.rebuilds == rebuilds + 1 and page["episodes"][0]["reward"] == -1.0 and not page["stale"]


def test_without_token_the_dashboard_is_open_and_no_ui_turns_it_off(tmp_path):
    open_daemon = make_collector(tmp_path / "open")
    closed = make_collector(tmp_path / "closed", ui=False)
    try:
        status, content_type, body = fetch(open_daemon.http_port, "/ui/", token=None)
        assert (status, content_type) == (200, "text/html") and b"/ui/static/app.js" in body
        assert api(open_daemon.http_port, "episodes")["total"] == 0
        assert fetch(closed.http_port, "/ui/", token=None)[0] == 404
        assert fetch(closed.http_port, "/ui/api/episodes", token=None)[0] == 404
        assert closed.dashboard is None
    finally:
        open_daemon.stop()
        closed.stop()


def test_static_assets_fetch_nothing_from_elsewhere():
    static = Path(__file__).resolve().parents[2] / "collector" / "ui" / "static"
    for path in static.iterdir():
        text = path.read_text()
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text, path
    assert os.path.getsize(static / "index.html") < 4096


def test_a_costly_rebuild_runs_in_the_background_and_answers_stay_available(filled, monkeypatch):
    from tracetrain.collector.ui import store as ui_store_module

    daemon, data_dir, _ = filled
    monkeypatch.setattr(ui_store_module, "SYNC_REBUILD_S", 0.0)  # every rebuild counts as costly
    monkeypatch.setattr(ui_store_module, "REBUILD_BUDGET", 1e9)  # and may start at once
    store = ui_store_module.UiStore(data_dir)
    try:
        before = store.episodes(ui_store_module.EpisodeFilter(q="ep-price-1"))
        assert not before["stale"] and store.rebuilds == 1
        gate, build = threading.Event(), store._build
        monkeypatch.setattr(store, "_build", lambda listing: (gate.wait(60), build(listing)))
        ui_store.post_delayed_reward(daemon.http_port, reward_id="ui-r3", value=0.5)
        during = store.episodes(ui_store_module.EpisodeFilter(q="ep-price-1"))
        assert during["stale"] and during["episodes"] == before["episodes"]  # the old table answers
        gate.set()
        store._builder.join(60)
        after = store.episodes(ui_store_module.EpisodeFilter(q="ep-price-1"))
        assert not after["stale"] and store.rebuilds == 2 and after["episodes"][0]["reward"] == 0.5
    finally:
        store.close()


def test_a_big_store_gets_its_episode_list_built_at_start(filled, tmp_path, monkeypatch):
    from tracetrain.collector.ui import api as ui_api

    monkeypatch.setattr(ui_api, "WARM_UP_MIN_SPAN_BYTES", 1)  # the filled store counts as big
    shutil.copytree(filled[1], tmp_path / "copy", ignore=shutil.ignore_patterns("_writers"))
    daemon = make_collector(tmp_path / "copy")
    try:
        deadline = time.monotonic() + 30
        while daemon.dashboard._store is None or daemon.dashboard._store.rebuilds == 0:
            assert time.monotonic() < deadline, "no episode list built at start-up"
            time.sleep(0.05)
        assert api(daemon.http_port, "episodes")["total"] == len(EPISODES)
        assert daemon.dashboard.store.rebuilds == 1  # the request used the table built at start
    finally:
        daemon.stop()
