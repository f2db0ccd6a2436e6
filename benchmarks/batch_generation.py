"""Offline batch generation benchmark: 200 requests of mixed lengths through the embedded default
(SmolLM2-135M, 1 prefill + 1 decode rank), all known upfront; throughput and latency percentiles
as JSON, and a PNG of when requests got their first token and finished, and of their TPOT.

    python benchmarks/batch_generation.py [--requests 200] [--out benchmarks/results/batch-generation.json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPICS = ["the ocean", "a city at night", "learning to cook", "the history of paper", "black holes", "gardening",
          "a job interview", "rainy mornings", "the stock market", "mountain hiking", "chess openings", "bees"]
ASKS = ["Write one sentence about {t}.", "Give three facts about {t}.",
        "Explain {t} to a ten-year-old in a short paragraph.",
        "Write a detailed, well-structured essay introduction about {t}, with a thesis statement, "
        "some context, and a preview of three arguments you would develop."]


def plot(results_path: str, report: dict, path: str) -> None:
    """All requests arrive at t=0, so each one's completion time is TTFT + TPOT x (tokens - 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ttft, done, tpot = [], [], []
    with open(results_path) as f:
        for line in f:
            r = json.loads(line)
            m, n = r.get("metrics"), r["response"]["body"]["usage"]["completion_tokens"] if r.get("response") else 0
            if m and n:
                ttft.append(m["ttft_ms"] / 1e3)
                done.append((m["ttft_ms"] + m["tpot_ms"] * (n - 1)) / 1e3)
                tpot.append(m["tpot_ms"])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for values, label in ((ttft, "first token"), (done, "finished")):
        ax.plot(sorted(values), range(1, len(values) + 1), label=label)
    ax.set_xlabel("seconds since start (all requests known at t=0)")
    ax.set_ylabel("requests")
    ax.set_title(f"{len(done)} requests, {report['output_tokens']} tokens, "
                 f"{report['output_tokens_per_s']:.1f} tok/s", fontsize=9)
    ax.legend()
    ax2.hist(tpot, bins=30)
    ax2.set_xlabel("TPOT (ms; includes waiting for a decode slot)")
    ax2.set_ylabel("requests")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--out", default="benchmarks/results/batch-generation.json")
    args = parser.parse_args()
    rng = random.Random(0)
    run_dir = os.path.join(ROOT, "runs", "batch-bench")
    os.makedirs(run_dir, exist_ok=True)
    inp = os.path.join(run_dir, "input.jsonl")
    with open(inp, "w") as f:
        for i in range(args.requests):
            ask = rng.choice(ASKS).format(t=rng.choice(TOPICS))
            f.write(json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"messages": [{"role": "user", "content": ask}],
                                         "max_tokens": rng.choice([16, 32, 64])}}) + "\n")
    out = os.path.join(run_dir, "output.jsonl")
    cmd = [os.path.join(os.path.dirname(sys.executable), "pdlaunch"), "generate",
           os.path.join(ROOT, "configs", "cpu-default.yaml"), "--input", inp, "--output", out, "--run-dir", run_dir]
    subprocess.run(cmd, check=True)
    with open(os.path.join(run_dir, "report.json")) as f:
        report = json.load(f)
    report.update(requests_in=args.requests, machine=f"{os.uname().machine}, {os.cpu_count()} cores",
                  placement=f"1 prefill (TP1) + 1 decode (TP1), SmolLM2-135M {report['dtype']}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    png = os.path.splitext(args.out)[0] + ".png"
    plot(out, report, png)
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
