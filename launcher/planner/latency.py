"""Latency model per (model, hardware, TP degree), in milliseconds.

prefill(lens)            = a + b * sum(len) + c * sum(len^2)
decode(batch, contexts)  = a + b * sum(context) + c * batch   (small- and large-batch sets)
a prompt chunk of n tokens after s cached ones (a later chunk of a long prompt, or the tail behind a
cached prefix) costs the prefill terms b * n + c * ((s+n)^2 - s^2) (its chunks sum to the whole
prompt's) plus the extend terms e0 + e1 * s: reading its cached context back out of the paged cache
and attending over it through a mask, work a fresh prompt's causal attention never does and whose
cost the quadratic term, fitted to fresh prompts, leaves out (a profile without extend timings: 0);
a mixed step (chunked prefill: decodes + prompt chunks)
pays the larger fixed cost a of the two phases once, plus each part's terms beyond its a.
plus, per step, the framework's fixed cost on the first stage: o0 + o1 * context tokens (per phase;
the engine's Python loop, or DistServe's 2 ms + 1e-4 ms per token). PP divides the compute and adds
a per-stage hand-off; KV transfer = bytes / link bandwidth.
Where instances share a node's cores and memory (CPUs), `pdlaunch profile` times steps side by side
beside idle neighbours, neighbours running the same phase and neighbours running the other phase:
same / idle (shared_slowdown, per phase) tells the simulator how much faster a step runs while no
other instance on its node is stepping, and other / same (other_phase_slowdown) how much slower it
runs beside a prefill (decode) instance.

Profiles use DistServe's published format (configs/profiles/distserve-*.json), which `pdlaunch profile` also writes:
{model: {tp: {"prefill": [a,b,c], "decoding_smallbs": [...], "decoding_largebs": [...],
"decoding_large_small_bs_threshold": N, ...}}}. Pure Python.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from contracts.errors import UserError


@dataclass(frozen=True)
class ModelSpec:
    """What the planner needs of a model: its size and its KV bytes per token."""

    name: str
    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    params: float           # parameter count
    dtype_bytes: int = 2

    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def weight_bytes(self) -> float:
        return self.params * self.dtype_bytes


# OPT shapes (MHA: KV heads = heads) for the paper's settings.
KNOWN_MODELS = {
    "facebook/opt-13b": ModelSpec("facebook/opt-13b", 40, 5120, 40, 128, 12.85e9),
    "facebook/opt-66b": ModelSpec("facebook/opt-66b", 64, 9216, 72, 128, 65.7e9),
    "facebook/opt-175b": ModelSpec("facebook/opt-175b", 96, 12288, 96, 128, 175e9),
}


@dataclass(frozen=True)
class Coefficients:
    prefill: tuple[float, float, float]
    decode_small: tuple[float, float, float]
    decode_large: tuple[float, float, float]
    threshold: int = 95
    pp_stage_ms: float = 1.0        # added per PP stage (DistServe's simulator: 1 ms)
    token_budget: int | None = None  # L_m found by profiling, if any
    shared_slowdown: tuple[float, float] = (1.0, 1.0)  # (prefill, decode): beside the same phase / idle
    prefill_overhead: tuple[float, float] = (0.0, 0.0)  # per step: ms + ms per context token
    decode_overhead: tuple[float, float] = (0.0, 0.0)
    # (pp, prefill overlap, decode overlap): latency / interval, measured by `pdlaunch profile --pp`
    pp_overlap: tuple[tuple[int, float, float], ...] = ()
    # (prefill, decode below the threshold, decode from it): a step's time beside another instance
    # running the other phase / beside one running the same; None where the profile did not measure it
    other_phase_slowdown: tuple[float, float, float] | None = None
    # a chunk after s cached tokens: ms per such chunk + ms per cached token (pdlaunch profile's extend timings)
    extend: tuple[float, float] = (0.0, 0.0)


@dataclass
class LatencyModel:
    model: str
    by_tp: dict[int, Coefficients]
    source: str = ""
    pipelined_pp: bool = True  # PP stages overlap micro-batches (DistServe) vs. run one batch at a time
    meta: dict = field(default_factory=dict)

    def tp_degrees(self) -> list[int]:
        return sorted(self.by_tp)

    def _coef(self, tp: int) -> Coefficients:
        if tp not in self.by_tp:
            raise UserError(f"planner: the latency profile of {self.model} has no TP={tp}; "
                            f"it covers TP {self.tp_degrees()}")
        return self.by_tp[tp]

    def step_overhead_ms(self, phase: str, context_tokens: float, tp: int) -> float:
        """The framework's fixed cost of one step (scheduling, messages, launch), paid serially on
        the first stage whatever the batch's compute."""
        coef = self._coef(tp)
        o0, o1 = coef.prefill_overhead if phase == "prefill" else coef.decode_overhead
        return o0 + o1 * context_tokens

    def _prefill_compute_ms(self, lens: list[int], coef: Coefficients, pp: int,
                            starts: list[int] | None = None) -> float:
        a, b, c = coef.prefill
        starts = starts or [0] * len(lens)
        quadratic = sum((s + n) ** 2 - s * s for s, n in zip(starts, lens))
        e0, e1 = coef.extend
        extend = sum(e0 + e1 * s for s in starts if s > 0)
        return a + b * sum(lens) + c * quadratic + extend + coef.pp_stage_ms * (pp - 1)

    def prefill_ms(self, lens: list[int], tp: int, pp: int = 1, starts: list[int] | None = None) -> float:
        """Latency of one prefill batch through all PP stages: PP does not shorten it, it adds a
        per-stage hand-off (PP raises throughput; TP lowers latency). `starts`: tokens already
        cached before each chunk (chunked prefill), 0 by default."""
        coef = self._coef(tp)
        return self._prefill_compute_ms(lens, coef, pp, starts) + self.step_overhead_ms("prefill", sum(lens), tp)

    def overlap(self, tp: int, pp: int, phase: str) -> float | None:
        """How many steps of `phase` a TP x PP instance's stages work on at once, on average:
        measured by the profile, else pp when its stages are assumed to overlap; None when they do
        not (or pp 1)."""
        if pp == 1:
            return None
        measured = {p: (prefill, decode) for p, prefill, decode in self._coef(tp).pp_overlap}
        if pp in measured:
            return measured[pp][0 if phase == "prefill" else 1]
        return float(pp) if self.pipelined_pp else None

    def _interval_ms(self, phase: str, compute_ms: float, context_tokens: float, tp: int, pp: int) -> float:
        """How soon, in steady state, the first stage takes the next step after one of `compute_ms`:
        that compute divided by how many steps the stages work on at once (1 where they do not
        overlap: the whole latency), plus the step's fixed cost, which the first stage pays alone."""
        overlap = self.overlap(tp, pp, phase) or 1.0
        return compute_ms / overlap + self.step_overhead_ms(phase, context_tokens, tp)

    def prefill_interval_ms(self, lens: list[int], tp: int, pp: int = 1, starts: list[int] | None = None) -> float:
        """How soon the instance can start its next prefill batch after this one."""
        return self._interval_ms("prefill", self._prefill_compute_ms(lens, self._coef(tp), pp, starts), sum(lens), tp,
                                 pp)

    def _mixed(self, lens: list[int], starts: list[int], batch: int, context_sum: float,
               tp: int, pp: int) -> tuple[float, float]:
        """(compute, fixed per-step cost) of a step with prompt chunks and `batch` decodes: the
        larger intercept of the two phases once, each part's terms beyond it."""
        coef = self._coef(tp)
        prefill = self._prefill_compute_ms(lens, coef, pp, starts)
        decode = self._decode_compute_ms(batch, context_sum, coef, pp)
        a_prefill = coef.prefill[0]
        a_decode = (coef.decode_small if batch < coef.threshold else coef.decode_large)[0]
        stages = coef.pp_stage_ms * (pp - 1)
        compute = max(a_prefill, a_decode) + (prefill - a_prefill - stages) + (decode - a_decode - stages) + stages
        (p0, p1), (d0, d1) = coef.prefill_overhead, coef.decode_overhead
        return compute, max(p0, d0) + p1 * sum(lens) + d1 * context_sum

    def mixed_ms(self, lens: list[int], starts: list[int], batch: int, context_sum: float, tp: int,
                 pp: int = 1) -> float:
        """Latency of a chunked-prefill step: prompt chunks `lens` (after `starts` cached tokens
        each) beside `batch` one-token decodes over `context_sum` tokens; a pure prefill or pure
        decode step where one part is empty."""
        if not lens:
            return self.decode_trip_ms(batch, context_sum, tp, pp)
        if not batch:
            return self.prefill_ms(lens, tp, pp, starts)
        compute, fixed = self._mixed(lens, starts, batch, context_sum, tp, pp)
        return compute + fixed

    def mixed_interval_ms(self, lens: list[int], starts: list[int], batch: int, context_sum: float, tp: int,
                          pp: int = 1) -> float:
        """How soon the first stage takes the next step after a chunked-prefill step."""
        if not lens:
            return self.decode_interval_ms(batch, context_sum, tp, pp)
        if not batch:
            return self.prefill_interval_ms(lens, tp, pp, starts)
        compute, fixed = self._mixed(lens, starts, batch, context_sum, tp, pp)
        return compute / (self.overlap(tp, pp, "prefill") or 1.0) + fixed

    def decode_trip_ms(self, batch: int, context_sum: int, tp: int, pp: int = 1) -> float:
        """One decode step of `batch` sequences through every stage, nothing else in flight."""
        return self._decode_compute_ms(batch, context_sum, self._coef(tp), pp) + \
            self.step_overhead_ms("decode", context_sum, tp)

    def _decode_compute_ms(self, batch: int, context_sum: float, coef: Coefficients, pp: int) -> float:
        a, b, c = coef.decode_small if batch < coef.threshold else coef.decode_large
        return a + b * context_sum + c * batch + coef.pp_stage_ms * (pp - 1)

    def decode_interval_ms(self, batch: int, context_sum: int, tp: int, pp: int = 1) -> float:
        """How soon the first stage takes the next decode step after this one."""
        return self._interval_ms("decode", self._decode_compute_ms(batch, context_sum, self._coef(tp), pp),
                                 context_sum, tp, pp)

    def decode_ms(self, batch: int, context_sum: int, tp: int, pp: int = 1) -> float:
        """Time for every sequence of the batch to advance one token. With overlapping stages the
        batch runs as min(pp, batch) groups that take turns through the stages (as the engine's
        scheduler splits it): a round is one interval per group, and never shorter than one
        group's trip (one sequence alone has nothing to overlap with)."""
        if self.overlap(tp, pp, "decode") is None:
            return self.decode_trip_ms(batch, context_sum, tp, pp)
        groups = min(pp, max(batch, 1))
        batch, context_sum = -(-batch // groups), context_sum / groups
        return max(self.decode_trip_ms(batch, context_sum, tp, pp),
                   groups * self.decode_interval_ms(batch, context_sum, tp, pp))

    def token_budget(self, tp: int) -> int | None:
        """L_m that `pdlaunch profile` found for TP `tp`, if the profile has one."""
        return self._coef(tp).token_budget if tp in self.by_tp else None

    def alone_factor(self, tp: int, phase: str) -> float:
        """What a step of `phase` costs alone on its node, as a share of the profiled (busy) cost."""
        prefill, decode = self._coef(tp).shared_slowdown
        return 1.0 / (prefill if phase == "prefill" else decode)

    def other_phase_factor(self, tp: int, phase: str, batch: int) -> float:
        """What a step of `phase` (a decode step of `batch` sequences) costs while an instance on
        its node runs the other phase, as a share of the profiled cost (timed beside the same
        phase); 1 where the profile has no such timings."""
        coef = self._coef(tp)
        if coef.other_phase_slowdown is None:
            return 1.0
        prefill, decode_small, decode_large = coef.other_phase_slowdown
        if phase == "prefill":
            return prefill
        return decode_small if batch < coef.threshold else decode_large

    def shares_nodes(self) -> bool:
        return any(c.shared_slowdown != (1.0, 1.0) or c.other_phase_slowdown is not None for c in self.by_tp.values())


def transfer_ms(num_bytes: float, bandwidth_gbps: float) -> float:
    """KV transfer time over a link of `bandwidth_gbps` gigabytes per second."""
    return num_bytes / (bandwidth_gbps * 1e9) * 1e3


def _coefficients(raw: dict, meta: dict, where: str) -> Coefficients:
    """One TP entry; pp_stage_ms and step_overhead default to the file's _meta (where the anchor
    profiles carry DistServe's simulator constants), else 1 ms and none."""
    try:
        slowdown = raw.get("shared_slowdown", {})
        other = raw.get("other_phase_slowdown")
        overhead = raw.get("step_overhead", meta.get("step_overhead", {}))
        return Coefficients(tuple(raw["prefill"]), tuple(raw["decoding_smallbs"]), tuple(raw["decoding_largebs"]),
                            int(raw.get("decoding_large_small_bs_threshold", 95)),
                            float(raw.get("pp_stage_ms", meta.get("pp_stage_ms", 1.0))),
                            raw.get("token_budget"),
                            (float(slowdown.get("prefill", 1.0)), float(slowdown.get("decode", 1.0))),
                            _pair(overhead.get("prefill", (0.0, 0.0))), _pair(overhead.get("decode", (0.0, 0.0))),
                            tuple(sorted(_overlaps(int(pp), m) for pp, m in raw.get("pipeline", {}).items())),
                            None if other is None else (float(other["prefill"]), float(other["decode_smallbs"]),
                                                        float(other["decode_largebs"])),
                            _pair(raw.get("extend", (0.0, 0.0))))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"planner: profile {where} lacks or mangles {e}; expected prefill, decoding_smallbs, "
                        "decoding_largebs as [a, b, c]") from None


def _overlaps(pp: int, measured: dict) -> tuple[int, float, float]:
    """(pp, prefill overlap, decode overlap) of a profile's `pipeline` entry (one figure for both
    where the profile has no per-phase ones)."""
    both = float(measured["overlap"])
    by_phase = measured.get("overlap_by_phase", {})
    return pp, float(by_phase.get("prefill", both)), float(by_phase.get("decode", both))


def _pair(values) -> tuple[float, float]:
    const, per_token = values
    return float(const), float(per_token)


def _read(path: str, model: str | None) -> tuple[dict, str]:
    """The profile file's data and the model entry to use."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UserError(f"planner: profile '{path}' not found; measure this model on this hardware with "
                        f"`pdlaunch profile CONFIG -o {path}` (configs/profiles/distserve-profile-a100-80g.json "
                        "only fits DistServe's OPT models on A100 GPUs)") from None
    except json.JSONDecodeError as e:
        raise UserError(f"planner: profile '{path}' is not valid JSON ({e.msg})") from None
    models = [k for k in data if not k.startswith("_")]
    if model is None:
        if len(models) != 1:
            raise UserError(f"planner: profile '{path}' holds {', '.join(models)}; set planner.profile_model")
        model = models[0]
    if model not in data:
        raise UserError(f"planner: profile '{path}' has no model '{model}'; it has {', '.join(models)}")
    return data, model


def read_profile_entry(path: str, model: str | None, tp: int) -> dict:
    """The raw profile entry of one TP degree (with `pdlaunch profile`'s samples), {} if absent."""
    data, model = _read(path, model)
    return data[model].get(str(tp), {})


def load_profile(path: str, model: str | None = None) -> LatencyModel:
    """Reads a DistServe-format profile; `model` picks an entry when it holds several."""
    data, model = _read(path, model)
    meta = data.get("_meta", {})
    by_tp = {int(tp): _coefficients(raw, meta, f"{path}:{model}:tp{tp}") for tp, raw in data[model].items()
             if tp.isdigit()}
    return LatencyModel(model, by_tp, path, pipelined_pp=bool(meta.get("pipelined_pp", True)), meta=meta)


DEFAULT_TOKEN_BUDGET = 512  # L_m where neither the config nor the profile gives one


def prefill_token_budget(configured: int | None, latency: LatencyModel | None, tp: int) -> int:
    """An instance's L_m: the configured number, or (auto: None) the profile's for its TP degree,
    else DEFAULT_TOKEN_BUDGET. The engine's scheduler and the simulator both take it from here."""
    if configured is not None:
        return configured
    profiled = latency.token_budget(tp) if latency is not None else None
    return profiled or DEFAULT_TOKEN_BUDGET


def kv_capacity_tokens(spec: ModelSpec, memory_gb: float, tp: int, pp: int, utilization: float = 0.9) -> int:
    """KV tokens an instance of tp x pp devices can hold beside its weights."""
    free = memory_gb * 1e9 * utilization * tp * pp - spec.weight_bytes()
    return max(int(free // spec.kv_bytes_per_token()), 0)
