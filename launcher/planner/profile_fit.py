"""Fits `pdlaunch profile` samples into DistServe-format latency coefficients and finds L_m."""
from __future__ import annotations

import numpy as np


def _fit(rows: list[list[float]], ys: list[float], known: list[float] | None = None) -> list[float]:
    """Least squares on relative error: each row weighted by 1/y; coefficients kept >= 0.
    `known`: each sample's time from terms already fitted, which the rows' terms add to."""
    y = np.array(ys, dtype=float)
    a = np.array(rows, dtype=float) / y[:, None]
    target = 1.0 - (np.array(known, dtype=float) / y if known is not None else np.zeros(len(y)))
    coef, *_ = np.linalg.lstsq(a, target, rcond=None)
    if (coef < 0).any():  # refit without the negative terms (they are noise at this scale)
        keep = coef >= 0
        coef = np.zeros_like(coef)
        if keep.any():
            coef[keep], *_ = np.linalg.lstsq(a[:, keep], target, rcond=None)
        coef = np.maximum(coef, 0.0)
    return [float(x) for x in coef]


def fit_prefill(samples: list[dict]) -> list[float]:
    rows = [[1.0, sum(s["lens"]), sum(n * n for n in s["lens"])] for s in samples]
    return _fit(rows, [s["ms"] for s in samples])


def _starts(sample: dict) -> list[int]:
    return sample.get("starts") or [0] * len(sample["lens"])


def fit_extend(samples: list[dict], prefill: list[float]) -> list[float]:
    """[ms per prompt chunk after cached tokens, ms per cached token it attends over]: what extend
    steps (tails behind a cached prefix, later chunks of a long prompt) cost beyond the fitted
    prefill terms, which fresh prompts alone determine; [0, 0] without samples."""
    if not samples:
        return [0.0, 0.0]
    rows = [[sum(1 for x in _starts(s) if x > 0), sum(_starts(s))] for s in samples]
    return _fit(rows, [s["ms"] for s in samples], [predicted_ms(prefill, s, "prefill") for s in samples])


def fit_decode(samples: list[dict]) -> list[float]:
    rows = [[1.0, s["context_sum"], s["batch"]] for s in samples]
    return _fit(rows, [s["ms"] for s in samples])


def _decode_shapes(samples: list[dict]) -> int:
    return len({(s["batch"], s["context_sum"]) for s in samples})


def fit_decode_split(samples: list[dict]) -> tuple[list[float], list[float], int]:
    """Small- and large-batch coefficient sets (DistServe's format) and the batch size where the
    large set starts, chosen for the smallest worst-case relative error. CPUs show such a step
    between batch 1 (matrix-vector kernels) and batch 2+ (matrix-matrix kernels)."""
    best = None
    for threshold in sorted({s["batch"] for s in samples})[1:] + [10 ** 9]:
        small = [s for s in samples if s["batch"] < threshold]
        large = [s for s in samples if s["batch"] >= threshold] or small
        if min(_decode_shapes(small), _decode_shapes(large)) < 3 and threshold < 10 ** 9:
            continue  # three coefficients from fewer shapes fit anything: not evidence of a step
        cs, cl = fit_decode(small), fit_decode(large)
        err = max(relative_errors(small, cs, "decode") + relative_errors(large, cl, "decode"))
        if best is None or err < best[0]:
            best = (err, cs, cl, threshold)
    return best[1], best[2], best[3]


def fit_entry(samples: dict) -> dict:
    """A DistServe-format profile entry for one TP degree, fitted to {"prefill": [...], "decode":
    [...]} forward timings of `pdlaunch profile`'s chosen shapes, plus the step loop's own cost
    (step_overhead) where samples["overhead"] has it."""
    prefill = fit_prefill(samples["prefill"])
    small, large, threshold = fit_decode_split(samples["decode"])
    decode_errors = relative_errors([x for x in samples["decode"] if x["batch"] < threshold], small, "decode") + \
        relative_errors([x for x in samples["decode"] if x["batch"] >= threshold], large, "decode")
    entry = {"prefill": prefill, "decoding_smallbs": small, "decoding_largebs": large,
             "decoding_large_small_bs_threshold": threshold, "pp_stage_ms": 0.5,
             "token_budget": token_budget(samples["prefill"]),
             "fit_max_rel_error": {"prefill": max(relative_errors(samples["prefill"], prefill, "prefill")),
                                   "decode": max(decode_errors)}}
    if samples.get("extend"):
        entry["extend"] = fit_extend(samples["extend"], prefill)
        entry["fit_max_rel_error"]["extend"] = max(relative_errors(samples["extend"], prefill, "prefill",
                                                                   entry["extend"]))
    if samples.get("mixed"):
        entry["fit_max_rel_error"]["mixed"] = max(mixed_relative_errors(samples["mixed"], entry))
    if "overhead" in samples:
        entry["step_overhead"] = {phase: fit_overhead(samples["overhead"][phase]) for phase in ("prefill", "decode")}
    return entry


def scaled_to_busy(alone: dict, slowdown: dict) -> dict:
    """An entry fitted to an instance's alone timings, its forward coefficients scaled by the busy /
    alone ratio per phase (`slowdown`). Steps time-sliced with other instances' on shared cores
    scatter 2-5x around their median (measured on 2 cores), enough for a least-squares fit to zero
    a coefficient, while alone they fit within a few per cent and the median ratio is robust."""
    def times(coef: list[float], k: float) -> list[float]:
        return [x * k for x in coef]

    return alone | {"prefill": times(alone["prefill"], slowdown["prefill"]),
                    "decoding_smallbs": times(alone["decoding_smallbs"], slowdown["decode"]),
                    "decoding_largebs": times(alone["decoding_largebs"], slowdown["decode"])} | \
        ({"extend": times(alone["extend"], slowdown["prefill"])} if "extend" in alone else {})


def fit_overhead(samples: list[dict]) -> list[float]:
    """[ms per step, ms per context token] of the step loop's cost beyond the forward (least
    squares, both >= 0); [0, 0] without samples."""
    if not samples:
        return [0.0, 0.0]
    a = np.array([[1.0, x["context_tokens"]] for x in samples])
    y = np.array([x["ms"] for x in samples])
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    if coef[1] < 0:
        coef = np.array([float(np.mean(y)), 0.0])
    if coef[0] < 0:
        coef = np.array([0.0, float(np.dot(a[:, 1], y) / np.dot(a[:, 1], a[:, 1]))])
    return [float(x) for x in coef]


def _median(values: list[float]) -> float:
    return float(np.median(values)) if values else 1.0


def shared_slowdown(beside: dict) -> dict:
    """Per phase, the median ratio of a shape's step time while every other instance on the node
    runs the same phase to its time while they idle (beside_other_phase samples: timed side by
    side, since two jobs minutes apart differ by more than the effect on a shared machine)."""
    return {phase: _median([x["same_ms"] / x["alone_ms"] for x in beside[phase]]) for phase in ("prefill", "decode")}


def other_phase_slowdown(beside: dict, threshold: int) -> dict:
    """The median ratio of a step's time beside the other phase to its time beside the same phase
    (beside_other_phase samples, timed side by side): for prefill, and for decode below and from
    the small/large batch `threshold` apart, since a decode step's share of the memory system, and
    so its slowdown, grows with its batch. A decode half without samples takes the other's."""
    def ratios(samples: list[dict]) -> list[float]:
        return [x["ms"] / x["same_ms"] for x in samples]

    small = ratios([x for x in beside["decode"] if x["batch"] < threshold])
    large = ratios([x for x in beside["decode"] if x["batch"] >= threshold])
    return {"prefill": _median(ratios(beside["prefill"])), "decode_smallbs": _median(small or large),
            "decode_largebs": _median(large or small)}


def token_budget(samples: list[dict], share: float = 0.9) -> int:
    """L_m: the smallest batch token count whose prefill throughput reaches `share` of the best seen;
    bigger batches only add latency."""
    points = sorted((sum(s["lens"]), sum(s["lens"]) / s["ms"]) for s in samples)
    best = max(t for _, t in points)
    return next(n for n, t in points if t >= share * best)


def predicted_ms(coef: list[float], sample: dict, kind: str, extend: list[float] | None = None) -> float:
    """A fitted coefficient set's time for a prefill (`lens`, maybe `starts`: tokens cached before
    each chunk, with `extend` the extend terms) or decode (`batch`, `context_sum`) sample."""
    if kind == "prefill":
        starts = _starts(sample)
        e0, e1 = extend or (0.0, 0.0)
        return coef[0] + coef[1] * sum(sample["lens"]) + \
            coef[2] * sum((s + n) ** 2 - s * s for s, n in zip(starts, sample["lens"])) + \
            sum(e0 + e1 * s for s in starts if s > 0)
    return coef[0] + coef[1] * sample["context_sum"] + coef[2] * sample["batch"]


def relative_errors(samples: list[dict], coef: list[float], kind: str, extend: list[float] | None = None) -> list[float]:
    return [abs(predicted_ms(coef, s, kind, extend) - s["ms"]) / s["ms"] for s in samples]


def mixed_relative_errors(samples: list[dict], entry: dict) -> list[float]:
    """How far the latency model's price of chunked prefill's mixed steps (prompt chunks beside
    decodes, LatencyModel.mixed_ms) from the entry's prefill and decode coefficients lies from the
    mixed steps `pdlaunch profile` timed: the check that the fit covers them."""
    from launcher.planner.latency import Coefficients, LatencyModel

    coef = Coefficients(tuple(entry["prefill"]), tuple(entry["decoding_smallbs"]), tuple(entry["decoding_largebs"]),
                        entry["decoding_large_small_bs_threshold"], extend=tuple(entry.get("extend", (0.0, 0.0))))
    model = LatencyModel("fit", {1: coef})
    return [abs(model.mixed_ms(s["lens"], s["starts"], s["batch"], s["context_sum"], 1) - s["ms"]) / s["ms"]
            for s in samples]


def fit_pipeline(samples: list[dict], pp1: dict, pp: int) -> dict:
    """What PP `pp` changes against the same TP's PP1 entry `pp1` (fitted to timings alone, as the
    PP instance runs): the hand-off per stage boundary (its latency beyond PP1's, per boundary,
    median, >= 0) and, per phase, the overlap (latency / interval with its steps in flight, median,
    in [1, pp]: 1 = the stages never work at once, pp = perfect pipelining). Phases differ: a
    prefill stage computes, two decode stages stream weights over the memory they share."""
    def pp1_ms(x: dict) -> float:
        if x["phase"] == "prefill":
            return predicted_ms(pp1["prefill"], x, "prefill")
        small = x["batch"] < pp1["decoding_large_small_bs_threshold"]
        return predicted_ms(pp1["decoding_smallbs" if small else "decoding_largebs"], x, "decode")

    def overlap(of: list[dict]) -> float:
        return min(max(float(np.median([x["latency_ms"] / x["interval_ms"] for x in of])), 1.0), float(pp))

    handoff = float(np.median([(x["latency_ms"] - pp1_ms(x)) / (pp - 1) for x in samples]))
    by_phase = {phase: overlap([x for x in samples if x["phase"] == phase]) for phase in ("prefill", "decode")
                if any(x["phase"] == phase for x in samples)}
    return {"handoff_ms": max(handoff, 0.0), "overlap": overlap(samples), "overlap_by_phase": by_phase,
            "samples": samples}
