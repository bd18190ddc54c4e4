"""`make demo-two-agents`: train one agent of a two-agent system; the other one stays untouched.

The system is examples/two_agent_system.py: agent **caller** writes the tool call, agent
**answerer** reads the tool's result and writes the answer, each LLM call under its own
``invoke_agent`` span with ``gen_ai.agent.name`` (plain OpenAI SDK + OpenTelemetry API).
Every stage is a plain `tracetrain` command (docs/examples.md lists them):

1. `tracetrain model init` + `tracetrain model warmup --task tools`: the tiny warmed-up model;
2. `tracetrain collector` and `tracetrain serve` (vLLM, base weights, both agents on them);
3. `tracetrain rollout` of the two-agent system (T=1, groups of 8): both agents' LLM calls land
   in the store with token ids, logprobs and their agent name; then the services stop;
4. `tracetrain train --lora --agent caller` (offline GRPO from the stored spans): one adapter,
   caller's; the answerer's calls are left out (``agent_not_selected`` in ``train_steps.skipped``);
5. `tracetrain train --lora --agent caller --agent answerer`: two adapters, two policies, one
   ``train_steps`` row per agent and step;
6. the proof, in ``summary.json``: sha256 of the base weights before and after (the answerer
   runs on them, unchanged), and of each adapter at its initial value and after training,
   with the number of tensors that changed.

``--quick`` is the short form CI runs (tests/integration/test_two_agents.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # demo.py: the shared process helpers

from demo import OFFLINE_ENV, ROOT, TT, Demo  # noqa: E402,F401

SYSTEM = f"{ROOT / 'examples' / 'two_agent_system.py'}:solve"
GRADER = f"{ROOT / 'examples' / 'two_agent_system.py'}:grade"  # exact answer 1, a wrong number 0.1
LORA_R, LORA_ALPHA = 8, 16  # tracetrain train's defaults


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=str(ROOT / "tracetrain-data" / "two-agents"),
                        help="fresh folder for everything")
    parser.add_argument("--tasks", type=int, default=32, help="training tasks sampled (each --group-size times)")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--batch-episodes", type=int, default=64, help="episodes per GRPO step")
    parser.add_argument("--concurrency", type=int, default=32, help="episodes in flight")
    parser.add_argument("--warmup-stop", type=float, default=0.1,
                        help="warm-up stops at this dev success (the proof needs rewards that vary, not skill)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="CI form: 16 tasks x 8 (2 steps per run)")
    args = parser.parse_args(argv)
    if args.quick:  # 8 groups per batch: a batch with no reward variance at all is very unlikely
        args.tasks = 16
    return args


def sha256_of(paths: list[Path]) -> str:
    """One digest over the files' names and bytes (sorted), e.g. every weight file of a model."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def initial_adapters(model_dir: Path, agents: tuple[str, ...], seed: int, out: Path) -> dict[str | None, Path]:
    """The adapters ``tracetrain train --lora`` starts from (same seed: same values), saved to ``out``."""
    from tracetrain.trainer.policy import LoraSpec, load_policy

    policy = load_policy(model_dir, lora=LoraSpec(r=LORA_R, alpha=LORA_ALPHA), agents=agents, seed=seed)
    return {key: policy.save_adapter(key, out / policy.adapters[key]) for key in policy.agents}


def compare_adapter(initial: Path, trained: Path) -> dict:
    """sha256 of the adapter before/after and how many of its tensors changed."""
    from safetensors.torch import load_file

    before = load_file(str(initial / "adapter_model.safetensors"))
    after = load_file(str(trained / "adapter_model.safetensors"))
    if before.keys() != after.keys():
        raise SystemExit(f"{trained} does not hold the same tensors as {initial}")
    changed = [k for k in before if not bool((before[k] == after[k]).all())]
    return {"sha256_initial": sha256_of([initial / "adapter_model.safetensors"]),
            "sha256_trained": sha256_of([trained / "adapter_model.safetensors"]),
            "tensors": len(before), "tensors_changed": len(changed),
            "max_abs_change": max((float((after[k] - before[k]).abs().max()) for k in changed), default=0.0)}


class TwoAgents(Demo):
    """The example's stages; process handling (start, wait, stop, sql) comes from examples/demo.py."""

    def prepare(self) -> None:
        import shutil
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        a = self.args
        self.run("model_init_s", [*TT, "model", "init", "--out", str(self.model), "--seed", str(a.seed)])
        self.run("warmup_s", [*TT, "model", "warmup", "--model", str(self.model), "--task", "tools",
                              "--seed", str(a.seed), "--stop-at-success", str(a.warmup_stop)])
        self.run("tasks_s", [sys.executable, str(ROOT / "examples" / "demo_tasks.py"), "--out", str(self.tasks),
                             "--train", str(a.tasks), "--heldout", "8", "--seed", str(a.seed)])
        self.base_sha256_before = sha256_of(list(self.model.glob("*.safetensors")))

    def sample(self) -> dict:
        """Both agents, base weights, T=1: one rollout of every task x group size, into the store."""
        a = self.args
        out = self.run("rollout_s", [*TT, "rollout", "--tasks", str(self.tasks / "train.jsonl"), "--agent", SYSTEM,
                                     "--grader", GRADER, "-G", str(a.group_size), "-C", str(a.concurrency),
                                     "--run-id", "sample", "--failure-reward", "0", "--seed", str(a.seed),
                                     "--collector", f"http://127.0.0.1:{self.grpc_port}",
                                     "--service-name", "two-agents", "--agent-name", "two_agent_system", "--quiet"],
                       env={**self.env, "TOOL_AGENT_TEMPERATURE": "1.0"}, stdout=subprocess.PIPE, text=True)
        summary = json.loads(out.stdout.strip().splitlines()[-1])
        self.say(f"sampled {summary['episodes']} episodes, mean reward {summary['mean_reward'] or 0:.3f}")
        return summary

    def stored_calls(self) -> dict:
        rows = self.sql("SELECT agent_name, count(*) AS calls, count(response_token_ids) AS with_ids, "
                        "count(response_logprobs) AS with_logprobs FROM llm_calls "
                        "WHERE episode_id LIKE 'sample-%' GROUP BY 1 ORDER BY 1")
        return {str(r["agent_name"]): {k: r[k] for k in ("calls", "with_ids", "with_logprobs")} for r in rows}

    def train(self, run_id: str, agents: tuple[str, ...]) -> dict:
        """One offline GRPO run with one LoRA adapter per agent; returns its report and proof."""
        a = self.args
        agent_flags = [flag for agent in agents for flag in ("--agent", agent)]
        out = self.run(f"train_{run_id}_s", [
            *TT, "train", "--data", str(self.data), "--model", str(self.model), "--algo", "grpo", "--lora",
            *agent_flags, "--where", "episode_id LIKE 'sample-%'", "--group-size", str(a.group_size),
            "--batch-episodes", str(a.batch_episodes), "--seed", str(a.seed), "--threads", "2",
            "--run-id", run_id, "--out", str(self.work / "runs" / run_id)], stdout=subprocess.PIPE, text=True)
        report = json.loads(out.stdout.strip().splitlines()[-1])
        checkpoint = Path(report["checkpoint"])
        initial = initial_adapters(self.model, agents, a.seed, self.work / "initial-adapters" / run_id)
        names = {key: folder.name for key, folder in initial.items()}
        adapters = {}
        for key, folder in initial.items():
            agent = key if key is not None else agents[0]  # one agent: its adapter is peft's "default"
            adapters[agent] = {"adapter": names[key], **compare_adapter(folder, checkpoint / "adapters" / names[key])}
        steps = self.sql(f"SELECT step, agent_name, n_episodes, n_transitions, n_tokens, reward_mean, loss, skipped "
                         f"FROM train_steps WHERE run_id = '{run_id}' ORDER BY step, agent_name")
        for step in steps:
            step["skipped"] = json.loads(step["skipped"] or "{}")
        saved = sorted(p.name for p in (checkpoint / "adapters").iterdir())
        for agent, info in adapters.items():
            self.say(f"{run_id}: {agent}'s adapter {info['adapter']}: {info['tensors_changed']}/{info['tensors']} "
                     f"tensors changed, sha256 {info['sha256_initial'][:12]} -> {info['sha256_trained'][:12]}")
        return {"agents": list(agents), "report": report, "checkpoint_adapters": saved, "adapters": adapters,
                "train_steps": steps}


def summarize(demo: TwoAgents, sampled: dict, calls: dict, runs: dict) -> dict:
    base_after = sha256_of(list(demo.model.glob("*.safetensors")))
    one = runs["caller-only"]
    step_skips: dict[str, int] = {}
    for step in one["train_steps"]:
        for reason, n in step["skipped"].items():
            step_skips[reason] = step_skips.get(reason, 0) + n
    both_agents = {s["agent_name"] for s in runs["both"]["train_steps"]}
    checks = {
        "both_agents_in_store": {"caller", "answerer"} <= set(calls),
        "base_weights_unchanged": demo.base_sha256_before == base_after,
        "caller_only_trained_caller": one["adapters"]["caller"]["tensors_changed"] > 0,
        "caller_only_has_no_answerer_adapter": one["checkpoint_adapters"] == ["default"],
        "answerer_calls_not_selected": step_skips.get("agent_not_selected") == calls.get("answerer", {}).get("calls"),
        "both_trained_two_adapters": all(info["tensors_changed"] > 0 for info in runs["both"]["adapters"].values()),
        "both_has_rows_per_agent": both_agents == {"caller", "answerer"},
        # same seed, same data: caller's adapter is byte for byte what it is without the answerer's
        "caller_same_with_or_without_answerer": runs["both"]["adapters"]["caller"]["sha256_trained"]
        == one["adapters"]["caller"]["sha256_trained"],
    }
    summary = {"sampled": sampled, "llm_calls_by_agent": calls,
               "base_weights_sha256": {"before": demo.base_sha256_before, "after": base_after},
               "caller_only_skipped": step_skips, "runs": runs, "checks": checks, "ok": all(checks.values()),
               "seconds": {k: round(v, 1) for k, v in demo.seconds.items()},
               "wall_s": round(time.monotonic() - demo.t0, 1)}
    (demo.work / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    demo = TwoAgents(parse_args(argv))
    try:
        demo.prepare()
        demo.start_services()
        sampled = demo.sample()
    finally:
        demo.stop_all()  # training is offline: vLLM and the collector are not needed (nor their CPU)
    calls = demo.stored_calls()
    demo.say(f"LLM calls in the store by agent: {json.dumps(calls)}")
    runs = {"caller-only": demo.train("caller-only", ("caller",)),
            "both": demo.train("both", ("caller", "answerer"))}
    summary = summarize(demo, sampled, calls, runs)
    demo.say(f"base weights sha256 {summary['base_weights_sha256']['before'][:12]} before, "
             f"{summary['base_weights_sha256']['after'][:12]} after (the answerer runs on them)")
    demo.say(f"--agent caller left out: {summary['caller_only_skipped']}")
    for name, ok in summary["checks"].items():
        demo.say(f"{'ok  ' if ok else 'FAIL'} {name}")
    demo.say(f"summary: {demo.work / 'summary.json'} ({summary['wall_s']} s)")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
