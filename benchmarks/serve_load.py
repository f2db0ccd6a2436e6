"""Load test through the HTTP endpoint: disaggregated vs colocated goodput as a client sees it.

For each system (the config's disaggregated placement, and colocated instances on as many ranks),
`pdlaunch serve` is started and the official openai client (async, streaming) sends Poisson
arrivals with the planner's length distribution, the very trace `pdlaunch bench` replays at that
rate (launcher.bench_trace.segment_requests). Per rate: client-side TTFT (to the first text chunk), TPOT
and SLO attainment, beside the server's own /metrics over the same requests.

    python benchmarks/serve_load.py [--config configs/bench-cpu.yaml] [--rates 0.4,0.8] [--requests 30]

Writes benchmarks/results/serve_load.json and .md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import sys
import time
import urllib.request

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from conftest import ServerProcess  # noqa: E402

from contracts.config import load_config  # noqa: E402
from launcher.bench_trace import segment_requests  # noqa: E402

OUT = os.path.join(ROOT, "benchmarks", "results")


def scrape(url: str) -> dict:
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    names = ("pdlaunch_time_to_first_token_seconds_sum", "pdlaunch_time_to_first_token_seconds_count",
             "pdlaunch_time_per_output_token_seconds_sum", "pdlaunch_time_per_output_token_seconds_count",
             "pdlaunch_slo_met_total")
    return {n: float(m.group(1)) if (m := re.search(re.escape(n) + r" ([0-9.e+-]+)$", text, re.M)) else 0.0
            for n in names}


async def one(client, model: str, req, vocab: int, rng: random.Random, start: float) -> dict:
    prompt = [rng.randrange(10, vocab) for _ in range(req.input_len)]
    await asyncio.sleep(max(0.0, start + req.arrival / 1e3 - time.perf_counter()))
    sent = time.perf_counter()
    first = last = None
    tokens = 0
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=req.output_len, stream=True,
                                             stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].text:
            first = first or now
            last = now
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    ttft = (first - sent) if first else float("nan")
    tpot = (last - first) / (tokens - 1) if first and tokens > 1 else 0.0
    return {"ttft_s": ttft, "tpot_s": tpot, "tokens": tokens}


async def drive(url: str, trace, vocab: int, seed: int) -> list[dict]:
    from openai import AsyncOpenAI

    rng = random.Random(seed)
    async with AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600) as client:
        model = (await client.models.list()).data[0].id
        start = time.perf_counter()
        return await asyncio.gather(*(one(client, model, r, vocab, rng, start) for r in trace))


def measure(url: str, cfg, rate: float, n: int, vocab: int) -> dict:
    trace = segment_requests(cfg, rate, n)
    before = scrape(url)
    answers = asyncio.run(drive(url, trace, vocab, seed=round(rate * 1000)))
    after = scrape(url)
    d = {k: after[k] - before[k] for k in after}
    slo_ttft, slo_tpot = cfg.slo.ttft_ms / 1e3, cfg.slo.tpot_ms / 1e3
    met = sum(a["ttft_s"] <= slo_ttft and a["tpot_s"] <= slo_tpot for a in answers)
    return {
        "rate": rate, "requests": n,
        "client": {"attainment": met / n, "ttft_median_s": statistics.median(a["ttft_s"] for a in answers),
                   "tpot_median_s": statistics.median(a["tpot_s"] for a in answers)},
        "server": {"attainment": d["pdlaunch_slo_met_total"] / max(d["pdlaunch_time_to_first_token_seconds_count"], 1),
                   "ttft_mean_s": d["pdlaunch_time_to_first_token_seconds_sum"] /
                   max(d["pdlaunch_time_to_first_token_seconds_count"], 1),
                   "tpot_mean_s": d["pdlaunch_time_per_output_token_seconds_sum"] /
                   max(d["pdlaunch_time_per_output_token_seconds_count"], 1)},
        "client_ttft_mean_s": statistics.fmean(a["ttft_s"] for a in answers),
    }


def system_configs(config: str, work: str) -> dict[str, str]:
    """The config as given (disaggregated) and colocated on the same number of ranks, paths absolute."""
    with open(config) as f:
        base = yaml.safe_load(f)
    here = os.path.dirname(os.path.abspath(config))
    base["cluster"]["hostfile"] = os.path.join(here, base["cluster"]["hostfile"])
    base["planner"]["profile"] = os.path.join(here, base["planner"]["profile"])
    p = base["placement"]
    ranks = sum(p[r]["instances"] * p[r]["tp"] * p[r]["pp"] for r in ("prefill", "decode"))
    colocated = dict(base, placement={"mode": "colocated", "colocated": {"instances": ranks, "tp": 1, "pp": 1}})
    out = {}
    for name, cfg in (("disaggregated", base), ("colocated", colocated)):
        out[name] = os.path.join(work, f"{name}.yaml")
        with open(out[name], "w") as f:
            yaml.safe_dump(dict(cfg, run_dir=os.path.join(work, name)), f)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "bench-cpu.yaml"))
    parser.add_argument("--rates", default="0.4,0.8")
    parser.add_argument("--requests", type=int, default=30)
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    work = os.path.join(ROOT, "runs", "serve-load")
    os.makedirs(work, exist_ok=True)
    rows = []
    for system, config in system_configs(args.config, work).items():
        cfg = load_config(config)
        from launcher.job_setup import model_dir_of
        from launcher.model_files import read_shape

        vocab = read_shape(model_dir_of(cfg)).vocab_size
        server = ServerProcess(config, os.path.join(work, system))
        try:
            for rate in rates:
                row = {"system": system, **measure(server.url, cfg, rate, args.requests, vocab)}
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            server.stop(timeout=120)
    slo = load_config(args.config).slo
    goodput = {s: max((r["rate"] for r in rows if r["system"] == s and r["client"]["attainment"] >= slo.attainment),
                      default=0.0) for s in ("disaggregated", "colocated")}
    result = {"date": time.strftime("%Y-%m-%d"), "config": os.path.relpath(args.config, ROOT),
              "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms, "attainment": slo.attainment},
              "rows": rows, "goodput_tested_rates": goodput}
    with open(os.path.join(OUT, "serve_load.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = [f"# HTTP load test ({result['date']}, {result['config']}, {args.requests} requests per rate, "
             f"SLO TTFT {slo.ttft_ms:g} ms, TPOT {slo.tpot_ms:g} ms)", "",
             "| system | rate (req/s) | client attainment | server attainment | client TTFT median (s) | "
             "server TTFT mean (s) | client TPOT median (ms) | server TPOT mean (ms) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c, s = r["client"], r["server"]
        lines.append(f"| {r['system']} | {r['rate']:g} | {c['attainment']:.2f} | {s['attainment']:.2f} | "
                     f"{c['ttft_median_s']:.2f} | {s['ttft_mean_s']:.2f} | {c['tpot_median_s'] * 1e3:.0f} | "
                     f"{s['tpot_mean_s'] * 1e3:.0f} |")
    lines += ["", f"Goodput (highest tested rate with client attainment >= {slo.attainment:g}): "
              + ", ".join(f"{k} {v:g} req/s" for k, v in goodput.items())]
    with open(os.path.join(OUT, "serve_load.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
