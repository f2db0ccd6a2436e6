"""How the latency model prices the steps a bench job's engine really ran, by kind and size.

The bench's fidelity rows compare attainment, where a price a few percent off moves a request
across an SLO near the knee; this says which steps were mispriced: per step kind (prefill, decode,
mixed) and tokens per step, the median ratio of the engine's step time to the model's price of the
same shape. Ratios include whatever contention the step met (the model's price is the profile's,
every slot busy), so a whole table near 1.0 means the machine ran as profiled and calibrated, and
one class far from the rest means the model's shape is wrong there. Pure Python.
"""
from __future__ import annotations

import statistics
from collections.abc import Iterator

from contracts.plan import Plan
from launcher.planner.latency import LatencyModel

SIZE_EDGES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # tokens per step: a class is [edge, next edge)


def _class_edge(tokens: int) -> int:
    """The lower edge of the tokens-per-step class a step falls in."""
    return max(e for e in SIZE_EDGES if e <= max(tokens, 1))


def size_class(tokens: int) -> str:
    """The tokens-per-step class a step falls in, as '4-7' (or '512+')."""
    lower = _class_edge(tokens)
    upper = next((e for e in SIZE_EDGES if e > lower), None)
    if upper is None:
        return f"{lower}+"
    return str(lower) if upper == lower + 1 else f"{lower}-{upper - 1}"


def step_price(latency: LatencyModel, step: dict, tp: int, pp: int) -> float:
    """The model's price (ms) of one engine step sample (report.json's step_samples: a prefill has
    lens, a decode batch and context_sum, a mixed step all three)."""
    lens = step.get("lens", [])
    return latency.mixed_ms(lens, step.get("starts") or [0] * len(lens), step.get("batch", 0),
                            step.get("context_sum", 0), tp, pp)


def priced_steps(report: dict, plan: Plan, latency: LatencyModel) -> Iterator[tuple[str, dict, float]]:
    """(kind, step sample, engine time / model price) for every step the job's instances ran."""
    for stats in report.get("instances", []):
        inst = plan.instances[stats["instance"]]
        for kind, samples in stats.get("step_samples", {}).items():
            for step in samples:
                price = step_price(latency, step, inst.tp, inst.pp)
                if price > 0:
                    yield kind, step, step["ms"] / price


def step_pricing(report: dict, plan: Plan, latency: LatencyModel) -> list[dict]:
    """[{kind, tokens, steps, ratio}]: per step kind and tokens-per-step class, how many steps the
    job's instances ran and the median of engine time / model price, sorted by kind and size."""
    ratios: dict[tuple[str, int, str], list[float]] = {}
    for kind, step, ratio in priced_steps(report, plan, latency):
        tokens = sum(step.get("lens", [])) + step.get("batch", 0)
        key = (kind, _class_edge(tokens), size_class(tokens))
        ratios.setdefault(key, []).append(ratio)
    return [{"kind": kind, "tokens": label, "steps": len(r), "ratio": round(statistics.median(r), 3)}
            for (kind, _, label), r in sorted(ratios.items())]


def run_factors(report: dict, plan: Plan, latency: LatencyModel) -> dict:
    """{"prefill": x, "decode": y, "steps": {...}}: the median of engine time / `latency`'s price
    over the job's steps with prompt tokens (prefill and mixed) and over its decode steps, the
    factors that make the model's prices the job's own on the whole. Scaled by them, the simulator
    replays the job with the machine's speed as it ran (not as a probe foresaw it), so what error is
    left is the simulator's scheduling and the shape of its prices, not the machine's drift."""
    ratios: dict[str, list[float]] = {"prefill": [], "decode": []}
    for kind, _, ratio in priced_steps(report, plan, latency):
        ratios["decode" if kind == "decode" else "prefill"].append(ratio)
    return {phase: statistics.median(r) if r else 1.0 for phase, r in ratios.items()} | \
        {"steps": {phase: len(r) for phase, r in ratios.items()}}


def pricing_line(rows: list[dict]) -> str:
    """One line: 'decode 1: 0.95x (742), decode 2-3: 1.14x (751), ...'."""
    return ", ".join(f"{r['kind']} {r['tokens']}: {r['ratio']:.2f}x ({r['steps']})" for r in rows)
