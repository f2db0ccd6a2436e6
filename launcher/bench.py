"""`pdlaunch bench`: replay one workload against the real engine at several rates, next to the
simulator's prediction for the same requests (same lengths, same arrival times), and report SLO
attainment, TTFT/TPOT percentiles, throughput and goodput as JSON and a PNG.
"""
from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time

from launcher.config import JobConfig
from launcher.errors import UserError
from launcher.plan import Plan
from launcher.planner.planning import latency_models, settings_from
from launcher.planner.simulator import InstanceSpec, Policy, Simulation, SimRequest, attainment, make_requests


def workload(cfg: JobConfig, rate: float, n: int, vocab: int) -> tuple[list[SimRequest], list[dict]]:
    """n requests at `rate` req/s with the planner's length distribution, as simulator requests and
    as engine input lines (random token prompts, exact output lengths, replayed arrival times)."""
    settings = settings_from(cfg)
    reqs = make_requests(n, rate, settings.lengths, settings.arrival, settings.cv, cfg.workload.seed)
    rng = random.Random(cfg.workload.seed + 1)
    lines = [{"custom_id": f"b{i}", "prompt": [rng.randrange(10, vocab) for _ in range(r.input_len)],
              "max_tokens": r.output_len, "ignore_eos": True, "arrival_s": r.arrival / 1e3}
             for i, r in enumerate(reqs)]
    return reqs, lines


def predict(cfg: JobConfig, plan: Plan, spec_kv_bytes: int, reqs: list[SimRequest]) -> list[SimRequest]:
    disagg, colo = latency_models(cfg)
    s = cfg.scheduler

    def inst(i, blocks):
        return InstanceSpec(i.tp, i.pp, blocks * s.block_size)

    policy = Policy(s.prefill_token_budget, s.max_decode_batch, spec_kv_bytes,
                    lambda p, d: cfg.cluster.intra_node_bandwidth_gbps)
    fresh = [SimRequest(r.arrival, r.input_len, r.output_len) for r in reqs]
    if plan.by_role("colocated"):
        sim = Simulation(colo, policy, colocated=[inst(i, s.decode_kv_blocks) for i in plan.by_role("colocated")])
    else:
        sim = Simulation(disagg, policy, [inst(i, s.prefill_kv_blocks) for i in plan.by_role("prefill")],
                         [inst(i, s.decode_kv_blocks) for i in plan.by_role("decode")])
    return sim.run(fresh)


def measured(results_path: str) -> list[SimRequest]:
    out = []
    with open(results_path) as f:
        for line in f:
            r = json.loads(line)
            m = r.get("metrics")
            if not m:
                continue
            req = SimRequest(0.0, r["usage"]["prompt_tokens"], r["usage"]["completion_tokens"])
            req.first_token = m["ttft_ms"]
            req.finish = m["ttft_ms"] + m["tpot_ms"] * (req.output_len - 1)
            out.append(req)
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def summary(reqs: list[SimRequest], cfg: JobConfig, wall_s: float | None = None) -> dict:
    ttft = [r.ttft for r in reqs]
    tpot = [r.tpot for r in reqs if r.output_len > 1]
    out = {"attainment": attainment(reqs, cfg.slo.ttft_ms, cfg.slo.tpot_ms),
           "ttft_ms_p50": statistics.median(ttft), "ttft_ms_p90": pct(ttft, 0.9),
           "tpot_ms_p50": statistics.median(tpot) if tpot else 0.0, "tpot_ms_p90": pct(tpot, 0.9)}
    if wall_s:
        out["output_tokens_per_s"] = sum(r.output_len for r in reqs) / wall_s
    return out


SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)


def slo_scale_curve(reqs: list[SimRequest], cfg: JobConfig) -> dict:
    """Attainment when both SLOs are multiplied by each scale (the paper's 'SLO scale' axis)."""
    return {str(k): attainment(reqs, cfg.slo.ttft_ms * k, cfg.slo.tpot_ms * k) for k in SCALES}


def plot(rows: list[dict], slo: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    top = max(r["rate"] for r in rows)
    for system in sorted({r["system"] for r in rows}):
        row = next(r for r in rows if r["system"] == system and r["rate"] == top)
        ax2.plot(SCALES, [row["slo_scale"][str(k)] * 100 for k in SCALES], "o-", label=f"{system} measured")
    ax2.axhline(slo["attainment"] * 100, color="grey", lw=0.8)
    ax2.set_xlabel(f"SLO scale (x TTFT {slo['ttft_ms']:.0f} ms, TPOT {slo['tpot_ms']:.0f} ms) at {top:g} req/s")
    ax2.set_ylabel("SLO attainment (%)")
    ax2.set_ylim(0, 105)
    ax2.legend(fontsize=8)
    for system in sorted({r["system"] for r in rows}):
        pts = sorted((r["rate"] / r["devices"], r["measured"]["attainment"] * 100, r["predicted"]["attainment"] * 100)
                     for r in rows if r["system"] == system)
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{system} measured")
        ax.plot([p[0] for p in pts], [p[2] for p in pts], "x--", color=line.get_color(), label=f"{system} simulated")
    ax.axhline(slo["attainment"] * 100, color="grey", lw=0.8)
    ax.set_xlabel("rate per device (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_bench(cfg: JobConfig, systems: dict[str, Plan], rates: list[float], n: int, vocab: int, kv_bytes: int,
              run_one, out_dir: str, quiet: bool = False) -> dict:
    """run_one(system, plan, input_path, output_path) -> wall seconds; runs the engine."""
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for rate in rates:
        reqs, lines = workload(cfg, rate, n, vocab)
        inp = os.path.join(out_dir, f"workload-{rate:g}.jsonl")
        with open(inp, "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
        for system, plan in systems.items():
            out = os.path.join(out_dir, f"results-{system}-{rate:g}.jsonl")
            if not quiet:
                print(f"[bench] {system} at {rate:g} req/s ({n} requests) ...", file=sys.stderr, flush=True)
            wall = run_one(system, plan, inp, out)
            got = measured(out)
            if len(got) != n:
                raise UserError(f"bench: {system} at {rate} req/s finished {len(got)} of {n} requests")
            row = {"system": system, "rate": rate, "devices": sum(i.size for i in plan.instances),
                   "measured": summary(got, cfg, wall), "predicted": summary(predict(cfg, plan, kv_bytes, reqs), cfg),
                   "slo_scale": slo_scale_curve(got, cfg)}
            row["error_points"] = abs(row["measured"]["attainment"] - row["predicted"]["attainment"]) * 100
            rows.append(row)
            if not quiet:
                print(f"[bench]   attainment measured {row['measured']['attainment']:.1%}, simulated "
                      f"{row['predicted']['attainment']:.1%}", file=sys.stderr, flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "slo": {"ttft_ms": cfg.slo.ttft_ms, "tpot_ms": cfg.slo.tpot_ms,
                                                           "attainment": cfg.slo.attainment},
              "requests_per_rate": n, "rows": rows}
    for system in systems:
        ok = [r["rate"] for r in rows if r["system"] == system and r["measured"]["attainment"] >= cfg.slo.attainment]
        devices = sum(i.size for i in systems[system].instances)
        result.setdefault("goodput_per_device", {})[system] = (max(ok) / devices) if ok else 0.0
    with open(os.path.join(out_dir, "bench.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(rows, result["slo"], os.path.join(out_dir, "attainment.png"),
         f"SLO attainment vs rate (TTFT <= {cfg.slo.ttft_ms:.0f} ms, TPOT <= {cfg.slo.tpot_ms:.0f} ms)")
    return result
