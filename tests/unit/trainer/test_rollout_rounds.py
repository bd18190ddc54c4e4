"""Rollout rounds: task order and waiting for a newer served policy."""

from __future__ import annotations

import http.server
import threading

import pytest

from tracetrain.instrumentation import semconv as sc
from tracetrain.trainer import rollout_rounds
from tracetrain.trainer.rollout import RolloutError


def test_rounds_use_every_task_once_per_pass_and_never_twice_in_a_round():
    tasks = [{"id": i} for i in range(10)]
    rounds = [rollout_rounds.round_tasks(tasks, 3, r, seed=7) for r in range(6)]  # 3 rounds per pass of 9
    for chosen in rounds:
        assert len({t["id"] for t in chosen}) == 3
    first_pass = [t["id"] for r in rounds[:3] for t in r]
    assert len(set(first_pass)) == 9
    assert rounds[:3] != rounds[3:]  # the next pass is reshuffled
    assert rollout_rounds.round_tasks(tasks, 3, 4, seed=7) == rounds[4]  # deterministic
    with pytest.raises(RolloutError, match="tasks_per_round"):
        rollout_rounds.round_tasks(tasks, 11, 0, seed=0)


class _Versions(http.server.BaseHTTPRequestHandler):
    versions: list = []

    def do_GET(self):  # noqa: N802 - http.server's name
        version = self.versions.pop(0) if len(self.versions) > 1 else self.versions[0]
        self.send_response(200)
        if version is not None:
            self.send_header(sc.POLICY_VERSION_HEADER, str(version))
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.fixture
def version_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Versions)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_wait_returns_the_first_newer_version(version_server):
    _Versions.versions = [3, None, 3, 4]
    url = f"http://127.0.0.1:{version_server.server_port}"
    assert rollout_rounds.served_policy_version(url) == 3
    assert rollout_rounds.wait_for_policy_above(url + "/v1", 3, timeout_s=5, poll_s=0.01) == 4


def test_wait_times_out_with_a_clear_error(version_server):
    _Versions.versions = [5]
    url = f"http://127.0.0.1:{version_server.server_port}"
    with pytest.raises(rollout_rounds.PolicyWaitTimeout, match="still serves policy version 5"):
        rollout_rounds.wait_for_policy_above(url, 5, timeout_s=0.2, poll_s=0.05)


def test_unreachable_endpoint_has_no_version():
    assert rollout_rounds.served_policy_version("http://127.0.0.1:9", timeout_s=0.5) is None
