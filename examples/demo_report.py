"""The demo's results: a before/after table, reward_curve.png and summary.json (examples/demo.py)."""

from __future__ import annotations

import json
import time
from typing import Any


def _store_figures(demo: Any) -> dict:
    steps = demo.sql("SELECT step, policy_version, reward_mean, n_transitions, n_tokens, step_s, push_s "
                     "FROM train_steps WHERE run_id = 'demo' ORDER BY step")
    spans = demo.sql("SELECT count(*) AS n FROM spans")[0]["n"]
    later = demo.sql("SELECT min(policy_version) AS lo, max(policy_version) AS hi, count(*) AS calls, "
                     "count(prompt_token_ids) AS with_ids FROM llm_calls WHERE episode_id LIKE 'train-%'")[0]
    lag = demo.sql("SELECT median((received_unix_nano - end_time_unix_nano) / 1e9) AS s FROM spans "
                   "WHERE received_unix_nano IS NOT NULL")[0]["s"]
    return {"steps": steps, "spans": spans, "train_calls": later, "export_to_store_median_s": lag}


def _plot(demo: Any) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ys = [r.get("mean_reward") for r in demo.rounds]
    if ys and None not in ys:
        xs = list(range(1, len(ys) + 1))
        ax.plot(xs, ys, color="#9ab", lw=1, label="batch reward of each round (T=1, all episodes)")
        k = 10
        smooth = [sum(ys[max(0, i - k + 1):i + 1]) / len(ys[max(0, i - k + 1):i + 1]) for i in range(len(ys))]
        ax.plot(xs, smooth, color="#357", lw=2, label=f"batch reward, mean of last {k} rounds")
    ax.plot([e["step"] for e in demo.evals], [e["success"] for e in demo.evals], "o-", color="#c33", lw=2,
            label="held-out success (greedy, served by vLLM)")
    ax.set_xlabel("GRPO step (= policy version pushed to vLLM)")
    ax.set_ylabel("success")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    ax.set_title("tracetrain demo: tool agent trained from its own OpenTelemetry traces")
    path = demo.work / "reward_curve.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def write_report(demo: Any) -> dict:
    figures = _store_figures(demo)
    steps = figures["steps"]
    before, after = demo.evals[0], demo.evals[-1]
    wall_s = time.monotonic() - demo.t0
    sampling_s = sum(r["wall_s"] for r in demo.rounds)
    training_s = sum(s["step_s"] or 0 for s in steps)
    push_s = sum(s["push_s"] or 0 for s in steps)
    # a round whose groups all scored alike leaves a step row with nothing trained and no push
    trained = [s for s in steps if s["policy_version"] is not None]
    versions = [s["policy_version"] for s in trained]
    loop_closed = bool(figures["spans"] > 0 and trained and all(s["n_transitions"] for s in trained)
                       and after["policy_version_min"] is not None
                       and after["policy_version_min"] > before["policy_version_max"]
                       and (figures["train_calls"]["hi"] or 0) > (figures["train_calls"]["lo"] or 0))
    summary = {
        "success_before": before["success"], "success_after": after["success"],
        "improvement_pts": round(100 * (after["success"] - before["success"]), 1),
        "ratio": round(after["success"] / before["success"], 2) if before["success"] else None,
        "steps": len(steps), "steps_without_signal": len(steps) - len(trained), "wall_s": round(wall_s, 1),
        "evals": demo.evals,
        "policy_version_before": before["policy_version_max"], "policy_version_after": after["policy_version_min"],
        "policy_versions_pushed": versions[-1] if versions else 0,
        "spans_ingested": figures["spans"], "train_llm_calls": figures["train_calls"]["calls"],
        "train_llm_calls_with_token_ids": figures["train_calls"]["with_ids"],
        "time_s": {**{k: round(v, 1) for k, v in demo.seconds.items()},
                   "sampling_in_rounds_s": round(sampling_s, 1), "training_steps_s": round(training_s, 1),
                   "weight_push_s": round(push_s, 1),
                   "waiting_for_trainer_s": round(demo.seconds.get("rollout_rounds_s", 0) - sampling_s, 1),
                   "span_export_to_store_median_s": figures["export_to_store_median_s"]},
        "loop_closed": loop_closed, "quick": demo.args.quick, "seed": demo.args.seed,
        "plot": _plot(demo),
    }
    (demo.work / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print("\n                      held-out success   policy version")
    print(f"  initial policy      {100 * before['success']:15.1f}%   {before['policy_version_max']}")
    print(f"  after {len(steps):3d} steps     {100 * after['success']:15.1f}%   {after['policy_version_min']}")
    print(f"\n  {summary['improvement_pts']:+.1f} points in {wall_s / 60:.1f} min; "
          f"plot {summary['plot']}; summary {demo.work / 'summary.json'}")
    print("  time: " + ", ".join(f"{k} {v}" for k, v in summary["time_s"].items()), flush=True)
    return summary
