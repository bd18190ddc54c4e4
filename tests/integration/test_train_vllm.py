"""`train --online` against the real vLLM (.venv-serve): every step pushes the new policy, the
server answers with the new version, and what it serves is exactly the trained weights.

Skipped only when .venv-serve is missing outside CI (CI=true makes that a failure).
"""

from __future__ import annotations


import threading
import time

import pytest

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from tests.conftest import make_collector
from tests.integration.test_train_online import _lineage, _wait, synthetic
from tests.integration.rl_episodes import export_episodes
from tracetrain.trainer import logprob_check, serving, store
from tracetrain.trainer.train_config import TrainConfig
from tracetrain.trainer.train_loop import train
from tests.integration.vllm_fixtures import model_dir, server  # noqa: F401 - fixtures

TOL = 1e-4


def _version_header(server, model: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": "What is 2+3?"}], "max_tokens": 4}
    status, data, headers = serving.http_json(server.url + "/v1/chat/completions", body, timeout=120)
    assert status == 200, data
    return {k.lower(): v for k, v in headers.items()}["x-tracetrain-policy-version"]


def _run_online(server, model_dir, tmp_path, name: str, prefix: str, version: int, **kw):
    data = tmp_path / "data"
    collector = make_collector(data)
    t0 = time.time_ns()
    cfg = TrainConfig(data_dir=str(data), model_dir=model_dir, online=True, group_size=4, batch_episodes=8,
                      poll_interval_s=0.2, run_id="r", out_dir=str(tmp_path / name), threads=1, max_steps=2,
                      serve_url=server.url, serve_state_file=server.state_file, lr=1e-2, **kw)
    result: dict = {}
    try:
        export_episodes(collector.grpc_port, synthetic(prefix + "a", 2, 4, 0), t0, policy_version=version)
        worker = threading.Thread(target=lambda: result.setdefault("r", train(cfg, progress=False)))
        worker.start()
        _wait(lambda: 1 in _lineage(data), 300, "step 1")
        export_episodes(collector.grpc_port, synthetic(prefix + "b", 2, 4, 1), t0 + 10**9, policy_version=version,
                        first_index=100)  # sampled before step 1's push
        worker.join(300)
        assert not worker.is_alive()
    finally:
        collector.stop()
    con = store.connect(data)
    rows = con.sql("SELECT step, policy_version, push_s, staleness_mean FROM train_steps WHERE run_id = 'r' "
                   "ORDER BY step").fetchall()
    con.close()
    return result["r"], rows


def test_online_lora_push_serves_the_adapter(server, model_dir, tmp_path):
    v0 = int(_version_header(server, server.served_name))
    report, rows = _run_online(server, model_dir, tmp_path, "lora", "l", v0, lora=True)
    assert report.policy_version == v0 + 2 and [r[1] for r in rows] == [v0 + 1, v0 + 2]
    assert _version_header(server, "policy") == str(v0 + 2)
    pushed = sorted((tmp_path / "lora" / "push").rglob("v*"))[-1]
    agreement = logprob_check.check_agreement(server.url, "policy", model_dir, adapter=str(pushed))
    assert agreement.n_tokens > 0 and agreement.max_abs <= TOL, agreement.as_dict()


# runs after the LoRA test: a full push replaces the base weights the LoRA test compares against
def test_online_full_weights_push_serves_the_trained_policy(server, model_dir, tmp_path):
    v0 = int(_version_header(server, server.served_name))
    report, rows = _run_online(server, model_dir, tmp_path, "full", "f", v0)
    assert report.policy_version == v0 + 2 and report.stop_reason == "max_steps"
    assert [(r[0], r[1]) for r in rows] == [(1, v0 + 1), (2, v0 + 2)] and all(r[2] > 0 for r in rows)
    assert [r[3] for r in rows] == [0.0, 1.0]  # step 2 trained on samples one version behind
    assert _version_header(server, server.served_name) == str(v0 + 2)
    pushed = sorted((tmp_path / "full" / "push").rglob("v*"))[-1]
    agreement = logprob_check.check_agreement(server.url, server.served_name, model_dir, full_weights=str(pushed))
    assert agreement.n_tokens > 0 and agreement.max_abs <= TOL, agreement.as_dict()
