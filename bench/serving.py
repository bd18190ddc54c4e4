"""Serving benchmark: push latency (LoRA, full), tokens/s at concurrency 1 and 32, logprob agreement.

    .venv/bin/python bench/serving.py [--size tiny] [--dtype float32] [--pushes 8] [--out bench/results]

Starts the real vLLM server from .venv-serve on a fresh `tracetrain model init` model,
writes bench/results/serving-<UTC time>.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tracetrain.trainer import logprob_check, model_init, serving, weight_push  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def throughput(url: str, model: str, concurrency: int, requests: int, max_tokens: int = 64) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": "What is 37*48?"}], "max_tokens": max_tokens,
            "temperature": 1.0, "logprobs": True, "return_token_ids": True, "ignore_eos": True}
    lock = threading.Lock()
    todo = list(range(requests))
    tokens = []
    lat = []
    errors = []

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            t = time.monotonic()
            status, data, _ = serving.http_json(url + "/v1/chat/completions", dict(body, seed=i), timeout=300)
            with lock:
                if status != 200:
                    errors.append(status)
                else:
                    tokens.append(len(data["choices"][0]["token_ids"]))
                    lat.append(time.monotonic() - t)

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.monotonic() - t0
    return {"concurrency": concurrency, "requests": requests, "tokens_per_request": max_tokens,
            "tokens_per_s": sum(tokens) / wall, "requests_per_s": len(tokens) / wall, "wall_s": wall,
            "latency_p50_s": statistics.median(lat) if lat else None, "errors": len(errors)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--pushes", type=int, default=8)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    work = Path(tempfile.mkdtemp(prefix="tt-bench-serving-"))
    model_dir = str(model_init.init_model(work / "model", size=args.size, seed=0))
    h = serving.start_server(model_dir, _port(), dtype=args.dtype, log_path=str(work / "vllm.log"))
    res: dict = {"bench": "serving", "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                             "loadavg_1m_start": os.getloadavg()[0]},
                 "model": {"size": args.size, "dtype": args.dtype,
                           **json.loads(Path(model_dir, "tracetrain_model.json").read_text())},
                 "server_start_s": h.started_s}
    try:
        p = weight_push.WeightPusher(h.url, h.state_file, str(work / "push"), base_model_dir=model_dir)
        agree = {"base": logprob_check.check_agreement(h.url, h.served_name, model_dir).as_dict()}
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        lora_s, lora_total = [], []
        last = None
        for i in range(args.pushes):
            torch.manual_seed(100 + i)
            pm = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                                LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                           init_lora_weights=False))
            last = p.push_lora(pm)
            lora_s.append(last.seconds)
            lora_total.append(last.seconds + last.write_seconds)
        agree["lora"] = logprob_check.check_agreement(h.url, "policy", model_dir, adapter=last.path).as_dict()
        full_s, full_total = [], []
        for i in range(args.pushes):
            torch.manual_seed(200 + i)
            sd = {k: v + 0.05 * torch.randn_like(v) for k, v in base.state_dict().items()}
            last = p.push_full(sd)
            full_s.append(last.seconds)
            full_total.append(last.seconds + last.write_seconds)
        agree["full"] = logprob_check.check_agreement(h.url, h.served_name, model_dir,
                                                      full_weights=last.path).as_dict()
        res["push_latency_s"] = {
            "lora_server_median": statistics.median(lora_s), "lora_total_median": statistics.median(lora_total),
            "full_server_median": statistics.median(full_s), "full_total_median": statistics.median(full_total),
            "n": args.pushes,
            "note": "server = load/reload RPC + /reset_prefix_cache; total adds writing the new version folder "
                    "(+ validation for full)"}
        res["policy_version_final"] = p.version
        res["logprob_agreement"] = agree
        res["throughput"] = {"base": [throughput(h.url, h.served_name, 1, 4), throughput(h.url, h.served_name, 32, 128)],
                             "lora": [throughput(h.url, "policy", 1, 4), throughput(h.url, "policy", 32, 128)]}
        res["machine"]["loadavg_1m_end"] = os.getloadavg()[0]
    finally:
        h.stop()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"serving-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
