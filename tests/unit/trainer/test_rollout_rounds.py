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


def _record_rounds(monkeypatch, served: list[int]) -> list:
    """Fake serving (``served``: the versions answered, in order) and rollouts; returns the log."""
    log: list = []
    answers = iter(served)
    monkeypatch.setattr(rollout_rounds, "served_policy_version", lambda url: next(answers))
    monkeypatch.setattr(rollout_rounds, "run_rollouts", lambda tasks, agent, run_id, **kw: log.append(run_id))
    monkeypatch.setattr(rollout_rounds, "wait_for_policy_above",
                        lambda url, version, timeout_s: log.append(("wait above", version)))
    return log


def test_on_policy_rounds_wait_for_a_version_newer_than_they_sampled_with(monkeypatch):
    log = _record_rounds(monkeypatch, [0, 1, 2])
    rollout_rounds.run_rounds([{"id": 1}, {"id": 2}], None, rounds=3, tasks_per_round=1, group_size=2, run_id="t",
                              policy_url="http://x")
    assert log == ["t-r0", ("wait above", 0), "t-r1", ("wait above", 1), "t-r2", ("wait above", 2)]


def test_policy_lag_one_samples_the_next_round_while_the_trainer_takes_this_one(monkeypatch):
    # served versions: at the start, then at the start of each round
    log = _record_rounds(monkeypatch, [5, 5, 5, 6, 7])
    rollout_rounds.run_rounds([{"id": 1}, {"id": 2}], None, rounds=4, tasks_per_round=1, group_size=2, run_id="t",
                              policy_url="http://x", policy_lag=1)
    # no wait after r0; after r1 wait until r0 is taken (one push past 5); after the last round wait
    # until every round is taken (four pushes past 5)
    assert log == ["t-r0", "t-r1", ("wait above", 5), "t-r2", ("wait above", 6), "t-r3", ("wait above", 8)]
    with pytest.raises(RolloutError, match="policy_lag"):
        rollout_rounds.run_rounds([{"id": 1}], None, rounds=1, tasks_per_round=1, group_size=1, run_id="t",
                                  policy_url="http://x", policy_lag=-1)


def test_a_round_taken_without_a_push_is_waited_out_once(monkeypatch):
    log = _record_rounds(monkeypatch, [0, 0, 0, 0, 1])
    timeouts = iter([True, False, True])  # the wait for r1 times out: the trainer pushed nothing for it

    def wait(url, version, timeout_s):
        log.append(("wait above", version))
        if not next(timeouts):
            raise rollout_rounds.PolicyWaitTimeout("no new version")

    monkeypatch.setattr(rollout_rounds, "wait_for_policy_above", wait)
    rollout_rounds.run_rounds([{"id": 1}, {"id": 2}], None, rounds=4, tasks_per_round=1, group_size=2, run_id="t",
                              policy_url="http://x", policy_lag=1, continue_on_policy_timeout=True)
    # r0 taken (> 0); r1 not (the wait above 1 times out); so the last round is all taken at 3 - 1 pushes
    assert log == ["t-r0", "t-r1", ("wait above", 0), "t-r2", ("wait above", 1), "t-r3", ("wait above", 2)]
