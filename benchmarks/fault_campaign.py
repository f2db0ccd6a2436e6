"""Fault campaign: kill -9 or SIGSTOP one rank of a running disaggregated job and check that the
job ends within watchdog_s + 10 s naming the rank, its role and host, leaves no process behind,
and that `--resume` then answers every request exactly once with the tokens of an undisturbed run.

The job: a tiny random Llama (tests/conftest.py), 2 prefill instances (TP 2) and 2 decode
instances (PP 2), 9 ranks; Poisson arrivals. Targets cycle through the controller, a prefill
leader, a prefill follower, a decode leader and a decode follower; the signal alternates from
trial to trial (shifted every five trials, so ten trials cover every target with both signals); the
moment is random (after a random number of finished requests, 5 to 70 % of them). Exits non-zero
unless every trial is clean and exact.

    python benchmarks/fault_campaign.py [--trials 20] [--requests 100] [--out benchmarks/results/fault-campaign]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from conftest import TINY, ragged_prompts, write_word_tokenizer  # noqa: E402

LAYOUT = {"mode": "disaggregated", "prefill": {"instances": 2, "tp": 2, "pp": 1},
          "decode": {"instances": 2, "tp": 1, "pp": 2}}
# rank layout: 0 controller; 1-2 prefill instance 0 (TP 0, 1); 3-4 prefill 1; 5-6 decode instance 2 (PP 0, 1); 7-8 decode 3
TARGETS = [("controller", 0, "controller"), ("prefill leader", 1, "prefill instance 0"),
           ("prefill follower", 4, "prefill instance 1"), ("decode leader", 7, "decode instance 3"),
           ("decode follower", 6, "decode instance 2")]
SIGNALS = [("kill -9", signal.SIGKILL), ("SIGSTOP", signal.SIGSTOP)]
MAX_TOKENS = 16


def build_model(path: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY)).eval().save_pretrained(path, safe_serialization=True)
    write_word_tokenizer(path, TINY["vocab_size"])


def write_config(workdir: str, model_dir: str, requests: int, rate: float, watchdog_s: float) -> str:
    with open(os.path.join(workdir, "hosts"), "w") as f:
        f.write("localhost slots=8\n")
    with open(os.path.join(workdir, "in.jsonl"), "w") as f:
        for i, p in enumerate(ragged_prompts(requests, seed=11)):
            f.write(json.dumps({"custom_id": f"r{i}", "prompt": p, "max_tokens": MAX_TOKENS, "ignore_eos": True}) + "\n")
    cfg = {"model": {"path": model_dir, "max_model_len": 256}, "cluster": {"hostfile": "hosts"}, "placement": LAYOUT,
           "scheduler": {"block_size": 4, "prefill_token_budget": 128, "max_decode_batch": 16, "prefill_kv_blocks": 256,
                         "decode_kv_blocks": 256, "watchdog_s": watchdog_s},
           "workload": {"input": "in.jsonl", "output": "out.jsonl", "arrival": "poisson", "rate": rate, "seed": 3},
           "run_dir": "run"}
    path = os.path.join(workdir, "job.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def start(config: str, output: str, run_dir: str, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "launcher.cli", "generate", config, "--quiet", "--output", output,
                             "--run-dir", run_dir, *extra], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def count_lines(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.endswith(b"\n"))
    except FileNotFoundError:
        return 0


def processes_of(run_dir: str) -> dict[int, int]:
    """{global rank: pid} of the processes started for this run directory (ranks, mpirun)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline").read()
            if run_dir + "/" not in cmd:
                continue
            env = dict(kv.split("=", 1) for kv in open(f"/proc/{pid}/environ").read().split("\0") if "=" in kv)
        except OSError:
            continue
        found[int(env.get("OMPI_COMM_WORLD_RANK", -1 - len(found)))] = int(pid)
    return found


def read_tokens(path: str) -> tuple[dict[str, list[int]], int]:
    """custom_id -> token_ids, and the number of lines (to count duplicates)."""
    with open(path) as f:
        records = [json.loads(line) for line in f]
    return {r["custom_id"]: r.get("token_ids") for r in records}, len(records)


def run_reference(config: str, workdir: str) -> dict[str, list[int]]:
    out = os.path.join(workdir, "reference.jsonl")
    proc = start(config, out, os.path.join(workdir, "run-reference"))
    _, err = proc.communicate(timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"fault campaign: the undisturbed run failed:\n{err[-3000:]}")
    return read_tokens(out)[0]


def trial(index: int, config: str, workdir: str, requests: int, watchdog_s: float, reference: dict,
          rng: random.Random) -> dict:
    name, rank, role = TARGETS[index % len(TARGETS)]
    sig_name, sig = SIGNALS[(index + index // len(TARGETS)) % len(SIGNALS)]
    out, run_dir = os.path.join(workdir, f"out-{index}.jsonl"), os.path.join(workdir, f"run-{index}")
    after = rng.randint(max(1, requests // 20), max(2, requests * 7 // 10))
    proc = start(config, out, run_dir)
    while count_lines(out) < after and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(rng.uniform(0, 0.5))
    row = {"trial": index, "target": name, "rank": rank, "signal": sig_name, "after_results": count_lines(out)}
    pid = processes_of(run_dir).get(rank)
    if pid is None or proc.poll() is not None:
        proc.kill()
        return row | {"ok": False, "why": "the job ended before the fault"}
    sent = time.time()
    os.kill(pid, sig)
    try:
        _, err = proc.communicate(timeout=watchdog_s + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        err += "\n(the launcher did not end)"
    row["ended_s"] = round(time.time() - sent, 1)
    time.sleep(1.0)
    left = processes_of(run_dir)
    for p in left.values():  # clean up for the next trial, but count it
        os.kill(p, signal.SIGKILL)
    host = os.uname().nodename
    diagnosis = [line for line in err.splitlines() if line.startswith("pdlaunch:") and f"rank {rank} on" in line]
    row |= {"exit_code": proc.returncode, "leftover_processes": len(left),
            "diagnosis": diagnosis[0] if diagnosis else err.strip().splitlines()[-1:],
            "names_rank_role_host": bool(diagnosis) and any(role in d and host in d for d in diagnosis)}
    resumed = start(config, out, run_dir, "--resume")
    _, resume_err = resumed.communicate(timeout=900)
    tokens, lines = read_tokens(out)
    row |= {"resume_exit_code": resumed.returncode, "results": lines,
            "exactly_once": lines == requests and set(tokens) == set(reference),
            "tokens_identical": tokens == reference}
    row["ok"] = (proc.returncode != 0 and row["ended_s"] <= watchdog_s + 10 and not left
                 and row["names_rank_role_host"] and resumed.returncode == 0 and row["exactly_once"]
                 and row["tokens_identical"])
    if not row["ok"]:
        row["stderr_tail"] = err[-1500:]
        row["resume_stderr_tail"] = resume_err[-800:]
    return row


def campaign_args(doc: str, trials: int, requests: int, out_name: str) -> argparse.Namespace:
    """The options both campaigns take (this one and concurrency_campaign.py), with their defaults."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=trials)
    parser.add_argument("--requests", type=int, default=requests)
    parser.add_argument("--rate", type=float, default=4.0, help="Poisson arrival rate, requests/s")
    parser.add_argument("--watchdog", type=float, default=10.0, help="scheduler.watchdog_s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", out_name))
    return parser.parse_args()


def main() -> int:
    args = campaign_args(__doc__, 20, 100, "fault-campaign")
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    rng = random.Random(args.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="pdlaunch-faults-") as workdir:
        model_dir = os.path.join(workdir, "model")
        build_model(model_dir)
        config = write_config(workdir, model_dir, args.requests, args.rate, args.watchdog)
        with Progress(transient=True) as progress:
            task = progress.add_task("undisturbed run", total=args.trials + 1)
            reference = run_reference(config, workdir)
            for i in range(args.trials):
                progress.update(task, advance=1, description=f"trial {i + 1}/{args.trials}")
                rows.append(trial(i, config, workdir, args.requests, args.watchdog, reference, rng))
    os.makedirs(args.out, exist_ok=True)
    summary = {"date": datetime.date.today().isoformat(), "requests": args.requests, "watchdog_s": args.watchdog,
               "layout": LAYOUT, "trials": len(rows), "clean_and_exact": sum(r["ok"] for r in rows), "rows": rows}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    table = Table(title=f"fault campaign: {summary['clean_and_exact']}/{len(rows)} trials clean and exact "
                        f"(watchdog {args.watchdog:g} s, {args.requests} requests)")
    for col in ("trial", "target (rank)", "signal", "after results", "ended in", "names rank/role/host",
                "processes left", "resume exact", "ok"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["trial"]), f"{r['target']} ({r['rank']})", r["signal"], str(r["after_results"]),
                      f"{r.get('ended_s', float('nan')):.1f} s", str(r.get("names_rank_role_host")),
                      str(r.get("leftover_processes")), str(r.get("exactly_once") and r.get("tokens_identical")),
                      "yes" if r["ok"] else "NO")
    Console().print(table)
    return 0 if summary["clean_and_exact"] == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
