"""The dashboard in a real headless browser (Debian chromium driven by playwright-core).

A real collector with a bearer token is filled through the OTel SDK exporter
(tests/integration/ui_store.py); ``ui_browser/drive_ui.js`` logs in through the 401
page, lists episodes, filters them, opens an episode's waterfall and its LLM call,
then the training and health pages, and saves a screenshot of each under
``$TRACETRAIN_ARTIFACTS_DIR`` (default tests/artifacts/ui/).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import make_collector
from tests.integration import ui_store
from tests.integration.ui_store import DELAYED, EPISODES, RESPONSE_IDS, TOKEN

ROOT = Path(__file__).resolve().parents[2]
DRIVER_DIR = ROOT / "tests" / "integration" / "ui_browser"
CHROMIUM = os.environ.get("TRACETRAIN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


def _browser_ready() -> bool:
    return (shutil.which("node") is not None and Path(CHROMIUM).exists()
            and (DRIVER_DIR / "node_modules" / "playwright-core").is_dir())


def artifacts_dir() -> Path:
    return Path(os.environ.get("TRACETRAIN_ARTIFACTS_DIR") or ROOT / "tests" / "artifacts") / "ui"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CI") != "true" and not _browser_ready(),
                    reason="run `make ui-deps` (chromium + playwright-core) first; CI always runs this test")
def test_dashboard_in_headless_chromium(tmp_path):
    data_dir = tmp_path / "data"
    daemon = make_collector(data_dir, auth_token=TOKEN)
    try:
        ui_store.export_episodes(daemon.http_port)
        ui_store.post_delayed_reward(daemon.http_port)
        ui_store.write_training(data_dir)
        service = "price-agent"
        expect = {"service": service, "service_episodes": sum(e.service == service for e in EPISODES),
                  "episode": DELAYED[0]}
        env = {**os.environ, "UI_URL": f"http://127.0.0.1:{daemon.http_port}/ui/", "UI_TOKEN": TOKEN,
               "CHROMIUM": CHROMIUM, "ARTIFACTS_DIR": str(artifacts_dir()), "EXPECT": json.dumps(expect)}
        out = subprocess.run(["node", str(DRIVER_DIR / "drive_ui.js")], env=env, capture_output=True, text=True,
                             timeout=180)
    finally:
        daemon.stop()
    assert out.returncode == 0, out.stderr + out.stdout
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert (seen["page_errors"], seen["foreign_requests"], seen["console_errors"]) == ([], [], [])
    assert seen["login_status"] == 401 and not seen["login_page_has_data"]
    newest_first = [e.episode_id for e in sorted(EPISODES, key=lambda e: e.start_s, reverse=True)]
    assert seen["all_episode_ids"] == newest_first and f"{len(EPISODES)} episodes match" in seen["total_text"]
    assert seen["filtered_rows"] == expect["service_episodes"] < seen["all_rows"]
    assert set(seen["filtered_services"]) == {service}
    assert seen["waterfall_spans"] == 4 and any(name.startswith("chat tiny") for name in seen["span_names"])
    root_bar, chat_bar = seen["bar_widths_px"][:2]  # the waterfall is drawn to scale: 2 s root, 1 s call
    assert abs(root_bar - seen["track_width_px"]) <= 2 and abs(chat_bar - root_bar / 2) <= 2
    assert len(seen["reward_rows"]) == 2 and any("delayed" in row and "0.75" in row for row in seen["reward_rows"])
    assert seen["response_tokens"] == [str(i) for i in RESPONSE_IDS]
    assert seen["low_tokens"] == [str(RESPONSE_IDS[1])]  # logprob -3.2 < log(0.1)
    assert f"answer-{DELAYED[0]}" in seen["detail_text"]
    assert {"Loss", "KL to reference", "Clip fraction", "Weight pushes over time"} <= set(seen["chart_titles"])
    assert seen["drawn_series"] >= 6 and seen["checkpoint_rows"] == 3
    assert seen["spans_accepted_card"] == str(len(EPISODES) * 4 + 1)
    assert len(seen["screenshots"]) == 7 and all(Path(p).stat().st_size > 5000 for p in seen["screenshots"])
