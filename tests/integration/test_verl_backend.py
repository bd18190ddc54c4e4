"""verl backend: transitions -> verl DataProto, and verl's GRPO advantages against ours.

The padding logic (pure NumPy) is checked here in the main venv; everything that needs verl
runs in .venv-verl (`make verl-env`) through tests/integration/verl_probe.py, once per module.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tracetrain.trainer import advantages
from tracetrain.trainer.verl_backend import pad_rows

ROOT = Path(__file__).resolve().parents[2]
VERL_PYTHON = ROOT / ".venv-verl" / "bin" / "python"
PROBE = Path(__file__).with_name("verl_probe.py")
IN_CI = os.environ.get("CI") == "true"

SCHEMA = pa.schema([
    ("episode_id", pa.string()), ("task_id", pa.string()), ("rollout_id", pa.string()),
    ("agent_name", pa.string()), ("trace_id", pa.string()), ("call_index", pa.int32()),
    ("policy_version", pa.int64()), ("input_ids", pa.list_(pa.int32())),
    ("response_mask", pa.list_(pa.int8())), ("old_logprobs", pa.list_(pa.float32())),
    ("episode_reward", pa.float64()), ("reward", pa.float64()), ("advantage", pa.float32()),
])


def _table(rows: list[dict]) -> pa.Table:
    defaults = dict(task_id=None, rollout_id=None, agent_name="calc", trace_id="t" * 32, call_index=0,
                    policy_version=3, advantage=None)
    full = [{**defaults, **r, "episode_reward": r.get("episode_reward", r["reward"])} for r in rows]
    return pa.Table.from_pylist(full, schema=SCHEMA)


# Three rows of task "t": a 3-token prompt with a 2-token answer; a 2-token prompt with a
# 1-token answer; a merged two-call row: prompt [11], answer [41 42], tool turn [51 52]
# (mask 0), answer [43].
HAND = _table([
    dict(episode_id="e1", task_id="t", input_ids=[11, 12, 13, 21, 22], response_mask=[0, 0, 0, 1, 1],
         old_logprobs=[0, 0, 0, -0.5, -0.25], reward=1.0, advantage=0.5),
    dict(episode_id="e2", task_id="t", input_ids=[11, 12, 31], response_mask=[0, 0, 1],
         old_logprobs=[0, 0, -1.0], reward=0.0, advantage=-0.5, agent_name=None),
    dict(episode_id="e3", task_id="t", input_ids=[11, 41, 42, 51, 52, 43], response_mask=[0, 1, 1, 0, 0, 1],
         old_logprobs=[0, -0.125, -0.25, 0, 0, -0.375], reward=0.5, advantage=0.25, call_index=0),
])
HAND_PROMPTS = [[11, 12, 13], [0, 11, 12], [0, 0, 11]]
HAND_RESPONSES = [[21, 22, 0, 0, 0], [31, 0, 0, 0, 0], [41, 42, 51, 52, 43]]
HAND_RESPONSE_MASK = [[1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 0, 0, 1]]
HAND_ATTENTION = [[1, 1, 1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1]]
HAND_POSITIONS = [[0, 1, 2, 3, 4, 4, 4, 4], [0, 0, 1, 2, 2, 2, 2, 2], [0, 0, 0, 1, 2, 3, 4, 5]]
HAND_LOGPROBS = [[-0.5, -0.25, 0, 0, 0], [-1.0, 0, 0, 0, 0], [-0.125, -0.25, 0, 0, -0.375]]
HAND_REWARDS = [[0, 1.0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0.5]]


def _groups_table(seed: int = 7) -> pa.Table:
    """Single-call episodes: tasks a/b with spread, c with equal scores, d alone, one without task."""
    rng = np.random.default_rng(seed)
    plan = [("a", [1.0, 0.0, 0.5, 1.0]), ("b", [0.2, 0.9, 0.4]), ("c", [1.0, 1.0, 1.0]), ("d", [0.7]), (None, [0.3])]
    rows = []
    for task, scores in plan:
        for k, score in enumerate(scores):
            n_prompt, n_answer = int(rng.integers(2, 7)), int(rng.integers(1, 6))
            ids = rng.integers(5, 500, n_prompt + n_answer).tolist()
            lps = [0.0] * n_prompt + (-rng.random(n_answer)).round(3).tolist()
            rows.append(dict(episode_id=f"{task}-{k}", task_id=task, rollout_id=f"r-{task}", input_ids=ids,
                             response_mask=[0] * n_prompt + [1] * n_answer, old_logprobs=lps, reward=score))
    return _table(rows)


# Task "m": episode m1 made of two rows (two calls that did not merge), m2 and m3 one row each.
MULTI = _table([
    dict(episode_id="m1", task_id="m", input_ids=[1, 2, 3, 4], response_mask=[0, 0, 1, 1],
         old_logprobs=[0, 0, -0.5, -0.5], reward=1.0, call_index=0),
    dict(episode_id="m1", task_id="m", input_ids=[1, 2, 9, 3, 4, 5], response_mask=[0, 0, 0, 0, 0, 1],
         old_logprobs=[0, 0, 0, 0, 0, -0.5], reward=1.0, call_index=1),
    dict(episode_id="m2", task_id="m", input_ids=[1, 2, 6], response_mask=[0, 0, 1],
         old_logprobs=[0, 0, -0.5], reward=0.0),
    dict(episode_id="m3", task_id="m", input_ids=[1, 2, 7, 8], response_mask=[0, 0, 1, 1],
         old_logprobs=[0, 0, -0.5, -0.5], reward=0.5),
])


# ---- padding, in the main venv (no verl needed) ---------------------------------------------

def test_pad_rows_matches_hand_computed_layout():
    rows = pad_rows(HAND, pad_token_id=0)
    assert rows.prompts.tolist() == HAND_PROMPTS
    assert rows.responses.tolist() == HAND_RESPONSES
    assert rows.response_mask.tolist() == HAND_RESPONSE_MASK
    assert np.concatenate([rows.prompt_mask, rows.response_attention], 1).tolist() == HAND_ATTENTION
    np.testing.assert_array_equal(rows.old_logprobs, np.array(HAND_LOGPROBS, np.float32))
    np.testing.assert_array_equal(rows.token_rewards, np.array(HAND_REWARDS, np.float32))
    np.testing.assert_array_equal(rows.advantages, np.array([0.5, -0.5, 0.25], np.float32)[:, None] * HAND_RESPONSE_MASK)


def test_pad_rows_handles_chunked_and_sliced_tables():
    chunked = pa.concat_tables([HAND.slice(0, 1), HAND.slice(1, 2)])
    assert chunked["input_ids"].num_chunks == 2
    rows = pad_rows(chunked, pad_token_id=0)
    assert rows.prompts.tolist() == HAND_PROMPTS and rows.responses.tolist() == HAND_RESPONSES
    tail = pad_rows(HAND.slice(1, 2), pad_token_id=0)  # list offsets that do not start at 0
    assert tail.prompts.tolist() == [[11, 12], [0, 11]]
    assert tail.responses.tolist() == [[31, 0, 0, 0, 0], [41, 42, 51, 52, 43]]


def test_pad_rows_fixed_widths_and_pad_id():
    rows = pad_rows(HAND, pad_token_id=99, max_prompt_len=4, max_response_len=7)
    assert rows.prompts.tolist() == [[99, 11, 12, 13], [99, 99, 11, 12], [99, 99, 99, 11]]
    assert rows.responses[0].tolist() == [21, 22, 99, 99, 99, 99, 99]
    assert rows.token_rewards.shape == (3, 7) and rows.token_rewards[2, 4] == 0.5


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t.drop_columns(["old_logprobs"]), "lacks columns"),
    (lambda t: t.set_column(t.schema.get_field_index("response_mask"), "response_mask",
                            pa.array([[0] * 5, [0, 0, 1], [0, 1, 1, 0, 0, 1]], pa.list_(pa.int8()))), "no policy token"),
    (lambda t: t.set_column(t.schema.get_field_index("old_logprobs"), "old_logprobs",
                            pa.array([[0.0] * 4, [0, 0, -1.0], [0.0] * 6], pa.list_(pa.float32()))), "differ in length"),
    (lambda t: t.set_column(t.schema.get_field_index("reward"), "reward", pa.array([1.0, None, 0.5])), "reward"),
    (lambda t: t.set_column(t.schema.get_field_index("old_logprobs"), "old_logprobs",
                            pa.array([[0, 0, 0, -0.5, -0.25], [0, 0, float("nan")], [0.0] * 6], pa.list_(pa.float32()))),
     "1 row.*unknown \\(NaN\\) behaviour logprobs"),
    (lambda t: t.set_column(t.schema.get_field_index("advantage"), "advantage", pa.array([1.0, None, 0.5], pa.float32())),
     "filled for some rows only"),
])
def test_pad_rows_rejects_bad_tables(mutate, message):
    with pytest.raises(ValueError, match=message):
        pad_rows(mutate(HAND), pad_token_id=0)


def test_pad_rows_without_advantages_and_empty():
    no_adv = HAND.set_column(HAND.schema.get_field_index("advantage"), "advantage", pa.nulls(3, pa.float32()))
    assert pad_rows(no_adv, 0).advantages is None
    assert pad_rows(HAND.drop_columns(["advantage"]), 0).advantages is None
    all_nan = HAND.set_column(HAND.schema.get_field_index("advantage"), "advantage", pa.array([float("nan")] * 3, pa.float32()))
    assert pad_rows(all_nan, 0).advantages is None
    empty = pad_rows(HAND.slice(0, 0), 0)
    assert empty.prompts.shape == (0, 0) and empty.responses.shape == (0, 0)


def test_pad_rows_rejects_rows_over_the_maximum():
    with pytest.raises(ValueError, match="2 row.*prompt longer than 1 tokens"):
        pad_rows(HAND, 0, max_prompt_len=1)
    with pytest.raises(ValueError, match="response longer than 4 tokens"):
        pad_rows(HAND, 0, max_response_len=4)


# ---- verl itself, in .venv-verl -------------------------------------------------------------

def _need_verl_venv() -> None:
    if VERL_PYTHON.exists():
        return
    if IN_CI:
        pytest.fail(".venv-verl is missing in CI: `make test` builds it (make verl-env)")
    pytest.skip("run `make verl-env` first (.venv-verl with verl 0.9.1; CI always runs these tests)")


def _probe_env() -> dict[str, str]:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false")
    return env


def _store_transitions(data_dir: Path) -> pa.Table:
    """Real spans (OTel SDK -> collector -> store) built into transitions by the trainer."""
    from tests.conftest import make_collector
    from tests.integration.test_transitions_store import _export
    from tracetrain.trainer import store, transitions

    daemon = make_collector(data_dir)
    try:
        _export(daemon.grpc_port)
    finally:
        daemon.stop()
    table, _ = transitions.build_transitions(transitions.load_calls(store.connect(data_dir)))
    return table


@pytest.fixture(scope="module")
def probed(tmp_path_factory) -> dict[str, dict]:
    _need_verl_venv()
    work = tmp_path_factory.mktemp("verl")
    from_store = _store_transitions(work / "data")
    # ours_multi: MULTI with tracetrain's own GRPO advantages filled in
    cases = {"hand": HAND, "groups": _groups_table(), "multi": MULTI, "ours_multi": advantages.grpo(MULTI, eps=1e-6)[0],
             "ours_groups": advantages.grpo(_groups_table(), eps=1e-6)[0],
             "store": from_store, "ours_store": advantages.grpo(from_store, eps=1e-6)[0]}
    for name, table in cases.items():
        pq.write_table(table, work / f"{name}.parquet")
    # docs/scale-out.md's python example runs on the first table (HAND)
    doc = (ROOT / "docs" / "scale-out.md").read_text()
    (work / "snippet.py").write_text(re.findall(r"```python\n(.*?)```", doc, re.S)[-1])
    out = subprocess.run([str(VERL_PYTHON), str(PROBE), "convert", str(work), *(str(work / f"{n}.parquet") for n in cases)],
                         capture_output=True, text=True, timeout=240, cwd=work,
                         env=_probe_env() | {"TT_DOC_SNIPPET": str(work / "snippet.py")})
    assert out.returncode == 0, out.stderr[-4000:]
    results = {name: json.loads((work / f"{name}.json").read_text()) for name in cases}
    results["doc_snippet"] = json.loads((work / "doc_snippet.json").read_text())
    return results


def test_dataproto_has_verl_keys_and_hand_computed_values(probed):
    result = probed["hand"]
    batch = result["dataproto"]["batch"]
    assert set(batch) == {"prompts", "responses", "response_mask", "input_ids", "attention_mask", "position_ids",
                          "rollout_log_probs", "old_log_probs", "rm_scores", "token_level_scores",
                          "token_level_rewards", "advantages"}
    assert batch["prompts"]["values"] == HAND_PROMPTS and batch["prompts"]["dtype"] == "int64"
    assert batch["responses"]["values"] == HAND_RESPONSES
    assert batch["response_mask"]["values"] == HAND_RESPONSE_MASK
    assert batch["input_ids"]["values"] == [p + r for p, r in zip(HAND_PROMPTS, HAND_RESPONSES)]
    assert batch["attention_mask"]["values"] == HAND_ATTENTION
    assert batch["position_ids"]["values"] == HAND_POSITIONS
    for key in ("rollout_log_probs", "old_log_probs"):
        assert batch[key]["dtype"] == "float32"
        np.testing.assert_allclose(batch[key]["values"], HAND_LOGPROBS, atol=1e-7)
    for key in ("rm_scores", "token_level_scores", "token_level_rewards"):
        assert batch[key]["values"] == HAND_REWARDS
    np.testing.assert_allclose(batch["advantages"]["values"], np.array([[0.5], [-0.5], [0.25]]) * HAND_RESPONSE_MASK)
    non_tensor = result["dataproto"]["non_tensor_batch"]
    assert non_tensor["uid"] == ["t", "t", "t"] and non_tensor["episode_id"] == ["e1", "e2", "e3"]
    assert non_tensor["agent_name"] == ["calc", None, "calc"] and non_tensor["policy_version"] == [3, 3, 3]
    assert result["dataproto"]["meta_info"] == {"pad_token_id": 0, "global_token_num": [5, 3, 6]}


def test_verl_helpers_agree_with_the_layout(probed):
    result = probed["hand"]
    batch = result["dataproto"]["batch"]
    assert result["verl_position_ids"] == batch["position_ids"]["values"]  # verl.utils.model
    assert result["verl_response_attention"] == [row[3:] for row in HAND_ATTENTION]
    assert result["chunk_concat_equal"] is True
    # verl's actor update unpads each row back to exactly the table's token ids
    assert result["no_padding_input_ids"] == HAND["input_ids"].to_pylist()
    assert result["no_padding_position_ids"] == [list(range(n)) for n in (5, 3, 6)]
    assert "prompt longer than 1 tokens" in result["too_long_error"]


def test_verl_grpo_matches_hand_computed_reference(probed):
    # scores 1, 0, 0.5: mean 0.5, unbiased std 0.5
    expected = np.array([0.5, -0.5, 0.0]) / (0.5 + 1e-6)
    result = probed["hand"]
    np.testing.assert_allclose(result["grpo_rows_eps1e-06"], expected, rtol=1e-6)
    np.testing.assert_allclose(result["grpo_tokens_eps1e-06"], expected[:, None] * np.array(HAND_RESPONSE_MASK), rtol=1e-6)
    np.testing.assert_allclose(result["ray_trainer_rows"], expected, rtol=1e-6)


@pytest.mark.parametrize("eps, key", [(1e-4, "grpo_rows_eps0.0001"), (1e-6, "grpo_rows_eps1e-06"),
                                      (1e-6, "ray_trainer_rows")])
def test_verl_grpo_agrees_with_ours_for_one_row_per_episode(probed, eps, key):
    table = _groups_table()
    ours, skipped = advantages.grpo(table, eps=eps)
    verl_rows = dict(zip(table["episode_id"].to_pylist(), probed["groups"][key]))
    kept = dict(zip(ours["episode_id"].to_pylist(), ours["advantage"].to_pylist()))
    assert set(kept) == {f"a-{k}" for k in range(4)} | {f"b-{k}" for k in range(3)}
    for episode, advantage in kept.items():
        assert verl_rows[episode] == pytest.approx(advantage, abs=2e-6), episode
    # what we drop, verl keeps: equal scores -> 0; a group of one -> its raw score (mean 0, std 1)
    assert skipped["zero_variance_group"] == 5
    assert [verl_rows[f"c-{k}"] for k in range(3)] == [0.0, 0.0, 0.0]
    assert verl_rows["d-0"] == pytest.approx(0.7 / (1 + eps)) and verl_rows["None-0"] == pytest.approx(0.3 / (1 + eps))


def test_multi_row_episode_differs_and_our_advantages_pass_through(probed):
    ours, _ = advantages.grpo(MULTI, eps=1e-6)
    ours_by_row = ours["advantage"].to_numpy()
    # ours: one score per episode (1, 0, 0.5): m1's two rows both get 0.5 / 0.5
    np.testing.assert_allclose(ours_by_row, [1.0, 1.0, -1.0, 0.0], atol=1e-5)
    # verl: one score per row (1, 1, 0, 0.5): mean 0.625, unbiased std sqrt(0.6875 / 3)
    std = np.sqrt(0.6875 / 3)
    expected_verl = (np.array([1.0, 1.0, 0.0, 0.5]) - 0.625) / (std + 1e-6)
    np.testing.assert_allclose(probed["multi"]["grpo_rows_eps1e-06"], expected_verl, rtol=1e-5)
    assert abs(probed["multi"]["grpo_rows_eps1e-06"][0] - ours_by_row[0]) > 0.2


def test_our_advantages_reach_the_dataproto(probed):
    """The multi-row remedy: compute advantages with tracetrain, hand verl the `advantages` key."""
    ours, _ = advantages.grpo(MULTI, eps=1e-6)
    expected = ours["advantage"].to_numpy()[:, None] * pad_rows(ours, 0).response_mask
    got = probed["ours_multi"]["dataproto"]["batch"]["advantages"]
    assert got["dtype"] == "float32"
    np.testing.assert_allclose(got["values"], expected, atol=1e-6)
    np.testing.assert_allclose(expected, [[1, 1], [1, 0], [-1, 0], [0, 0]], atol=1e-5)  # R = 2


def test_scale_out_doc_example_runs(probed):
    """The docs' example: tracetrain's GRPO (e3's row is in a group with spread) reaches verl's batch."""
    ours, _ = advantages.grpo(HAND, eps=1e-6)
    expected = ours["advantage"].to_numpy()[:, None] * np.array(HAND_RESPONSE_MASK)
    got = np.array(probed["doc_snippet"])
    assert got.shape == (3, 2048)  # the example pads to max_response_len=2048
    np.testing.assert_allclose(got[:, :5], expected, atol=1e-6)
    assert not got[:, 5:].any()
    assert np.abs(expected).max() > 0.9


def test_transitions_from_the_store_convert(probed):
    """Spans -> collector -> store -> build_transitions -> DataProto (episodes of test_transitions_store)."""
    result = probed["store"]["dataproto"]
    non_tensor = result["non_tensor_batch"]
    rows = {(e, c): i for i, (e, c) in enumerate(zip(non_tensor["episode_id"], non_tensor["call_index"]))}
    assert set(rows) == {("ep-a1", 0), ("ep-a2", 0), ("ep-a2", 1), ("ep-b1", 0), ("ep-b2", 0)}
    assert "advantages" not in result["batch"]  # build_transitions leaves the column NaN
    merged = rows[("ep-a1", 0)]  # two calls merged: prompt [1 2], answer [3 4], tool token 9, answer [5]
    batch = result["batch"]
    width_p = batch["prompts"]["shape"][1]
    assert batch["prompts"]["values"][merged][-2:] == [1, 2]
    assert batch["responses"]["values"][merged][:4] == [3, 4, 9, 5]
    assert batch["response_mask"]["values"][merged][:4] == [1, 1, 0, 1]
    np.testing.assert_allclose(batch["rollout_log_probs"]["values"][merged][:4], [-0.1, -0.2, 0.0, -0.3], atol=1e-6)
    assert batch["token_level_rewards"]["values"][merged][3] == 1.0
    assert non_tensor["uid"][merged] == "task-a" and non_tensor["agent_name"][merged] == "planner"
    assert non_tensor["policy_version"][merged] == 5 and width_p == 2
    # verl's GRPO on these rows: task-a has ep-a1 (1 row, score 1) and ep-a2 (2 rows, score 0):
    # per row scores 1, 0, 0 -> verl differs from ours (per episode: +-0.707) as documented
    verl_a1 = probed["store"]["grpo_rows_eps1e-06"][merged]
    assert verl_a1 == pytest.approx((1 - 1 / 3) / (np.sqrt(1 / 3) + 1e-6), rel=1e-5)


@pytest.mark.parametrize("case", ["ours_multi", "ours_groups", "ours_store"])
def test_verl_ppo_clip_loss_equals_ours_on_the_same_rows(probed, case):
    """verl's 'vanilla' policy loss (clip 0.2, dual clip 3, token-mean) = tracetrain's ppo_clip_loss."""
    loss = probed[case]["loss"]
    assert loss["old_logprobs_same"] is True
    values = [loss[f"scale{s:g}"] for s in (0.05, 0.5, 2.0)]
    for verl_loss, our_loss in values:
        assert verl_loss == pytest.approx(our_loss, rel=1e-5, abs=1e-6)
    assert len({round(v, 4) for v, _ in values}) == 3  # the three perturbations gave different losses


def _namespace_prefix() -> list[str] | None:
    """A private network namespace with only `lo`, so Ray cannot bind outside loopback."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return None
    for flags in (["-n"], ["-rn"]):
        if subprocess.run(["unshare", *flags, "true"], capture_output=True).returncode == 0:
            return ["unshare", *flags]
    return None


@pytest.mark.slow
def test_ray_task_converts_a_batch_on_loopback(tmp_path):
    _need_verl_venv()
    prefix = _namespace_prefix()
    if prefix is None:
        pytest.skip("needs `unshare -n` (a private network namespace) so Ray binds nothing but loopback")
    pq.write_table(_groups_table(), tmp_path / "groups.parquet")
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    env = _probe_env() | {"RAY_TMPDIR": ray_tmp, "TMPDIR": ray_tmp}
    script = 'ip link set lo up && exec "$0" "$@"'
    try:
        out = subprocess.run([*prefix, "sh", "-c", script, str(VERL_PYTHON), str(PROBE), "ray",
                              str(tmp_path / "ray.json"), str(tmp_path / "groups.parquet")],
                             capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads((tmp_path / "ray.json").read_text())
    assert result["same_as_local"] is True and "advantages" in result["keys"]
    assert result["node_addresses"] == ["127.0.0.1"]
