"""Job configuration: one YAML file, read with yaml.safe_load into validated dataclasses.

Every mistake becomes a UserError naming the key (e.g. `placement.prefill.tp`) and the fix.
Relative paths in the file are resolved against the directory of the config file.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import socket
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import yaml

from contracts.errors import UserError
from contracts.sampling_params import SamplingParams, check_sampling

EMBEDDED_MODEL = "embedded"


@dataclass
class ModelConfig:
    path: str = EMBEDDED_MODEL  # HF Llama directory, a .gguf file, or "embedded" (SmolLM2-135M-Instruct)
    dtype: str = "auto"  # auto: bfloat16 where the CPU/GPU computes it natively, else float32 (launcher/dtypes.py)
    max_model_len: int = 2048
    chat_template: str = "auto"  # "auto": use the model's template for chat requests; "none": never

    choices = {"dtype": ("auto", "float32", "bfloat16", "float16"), "chat_template": ("auto", "none")}


@dataclass
class ClusterConfig:
    hostfile: str = "../hostfiles/localhost"
    device: str = "cpu"  # cpu: gloo data plane; cuda: NCCL (not testable on CPU-only machines)
    master_addr: str = "auto"  # rendezvous address (the only listener the job opens); auto: see launcher/network.py
    interface: str = ""  # network interface for every socket of the job (e.g. ib0, eth0); empty: loopback on one host
    master_port: int = 0  # 0: pick a free port on rank 0 and share it over MPI
    intra_node_bandwidth_gbps: float = 12.0
    inter_node_bandwidth_gbps: float = 3.125

    choices = {"device": ("cpu", "cuda")}


@dataclass
class PhaseConfig:
    instances: int = 1
    tp: int = 1
    pp: int = 1


@dataclass
class PlacementConfig:
    mode: str = "disaggregated"  # disaggregated | colocated: the layouts below; auto: planned at launch
    prefill: PhaseConfig = field(default_factory=PhaseConfig)
    decode: PhaseConfig = field(default_factory=PhaseConfig)
    colocated: PhaseConfig = field(default_factory=PhaseConfig)
    plan: Optional[str] = None  # a plan file from `pdlaunch plan`; overrides the phase layouts

    choices = {"mode": ("disaggregated", "colocated", "auto")}  # auto: the planner chooses at launch (launcher/auto_plan.py)


@dataclass
class SchedulerConfig:
    prefill_token_budget: Union[int, str] = "auto"  # L_m: most prompt tokens in one prefill batch; auto: the profile's

    @property
    def token_budget(self) -> Optional[int]:
        """L_m as configured; None for auto (each instance's from the planner's profile)."""
        return None if self.prefill_token_budget == "auto" else self.prefill_token_budget
    # colocated instances: chunked (each step: the running decodes + prompt chunks up to
    # step_token_budget tokens, vLLM/Sarathi-Serve) or prefill_first (whole prefill batches between decode steps)
    colocated_policy: str = "chunked"
    step_token_budget: Union[int, str] = "auto"  # chunked: most tokens in one step, decodes included; auto: L_m
    max_decode_batch: int = 32
    batches_in_flight: bool = True  # PP > 1: up to PP steps in flight (stage 0 starts the next while the others finish)
    block_size: int = 16
    prefill_kv_blocks: int = 512  # per prefill instance: the KV hold area
    decode_kv_blocks: int = 1024  # per decode (or colocated) instance
    watchdog_s: float = 30.0  # a rank silent this long ends the job
    idle_sleep_ms: float = 10.0  # an idle rank's sleep between polls (0.5 ms while work came within 0.2 s)
    prefix_caching: bool = True  # prefill/colocated instances reuse the KV blocks of equal prompt prefixes
    decode_prefix_reuse: bool = False  # a decode instance that holds a prompt's leading blocks pulls only the rest

    choices = {"colocated_policy": ("chunked", "prefill_first")}


@dataclass
class SLOConfig:
    ttft_ms: float = 2000.0
    tpot_ms: float = 200.0
    attainment: float = 0.9


@dataclass
class WorkloadConfig:
    input: str = "../examples/prompts.jsonl"
    output: str = "results.jsonl"
    arrival: str = "all"  # all: offline, every request at t=0; poisson / gamma: at `rate` req/s
    rate: float = 1.0
    cv: float = 1.0  # gamma arrivals: coefficient of variation (burstiness)
    seed: int = 0

    choices = {"arrival": ("all", "poisson", "gamma")}


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # where `pdlaunch serve` listens (0.0.0.0: every interface of rank 0's node)
    port: int = 8000         # 0: any free port, named in the "serving" line
    model_name: str = ""     # the `model` clients send; empty: the model directory's name
    max_queue: int = 64      # most admitted requests waiting for their first token; more get 429 at once
    drain_s: float = 30.0    # on SIGTERM: how long running requests may take to finish
    api_key: tuple[str, ...] = ()  # keys clients send as `Authorization: Bearer KEY` on /v1/* (a string or a list)
    max_body_bytes: int = 4 * 1024 * 1024  # a larger request body gets 413 before it is read


@dataclass
class PlannerConfig:
    profile: str = ""               # DistServe-format latency profile (from `pdlaunch profile` or configs/profiles/distserve-*.json); {dtype}: the job's dtype
    profile_model: Optional[str] = None   # the entry of the profile file to use
    colocated_profile: Optional[str] = None  # profile of the colocated baseline (default: profile)
    model: Optional[str] = None     # a known model to plan for (facebook/opt-13b, -66b, -175b) instead of model.path
    affinity: str = "high"          # high: Algorithm 1; low: Algorithm 2
    gpus_per_node: int = 0          # 0: the hostfile's slots
    memory_gb: float = 80.0         # device memory, for the KV capacity of each layout
    num_requests: int = 300         # the fewest requests a goodput probe simulates
    span_s: float = 0.0             # arrival span of a probe; 0: ten request lifetimes at the SLOs (>= 30 s)
    max_requests: int = 6000        # cap on a probe's requests (rate x span)
    precision: float = 0.25         # goodput bisection stops when the bracket is narrower (req/s/device)
    rule: str = "joint"             # joint: both SLOs per request; separate: P90 TTFT and P90 TPOT each
    target_rate: float = 0.0        # req/s to serve; 0 = the best split of the cluster's devices
    lengths: str = "fixed"          # fixed | uniform | lognormal | trace
    input_len: float = 128.0        # mean (fixed/lognormal) prompt length
    output_len: float = 32.0
    length_cv: float = 0.5
    trace: Optional[str] = None     # lengths from a trace: DistServe's {prompt_len, output_len} list or a results file
    shared_prefix: int = 0          # tokens of a prefix (system prompt) that a share of the prompts begin with
    shared_prefix_share: float = 1.0  # that share; with scheduler.prefix_caching only the rest of a prompt is prefilled
    include_transfer: bool = True   # DistServe's search ignores KV transfer time; we model it unless told
    calibrate: bool = True          # a profile of another machine: scale it by a short probe here (else warn)
    mode: str = "auto"              # auto: whichever of disaggregated / colocated sustains the SLOs at more req/s per device

    choices = {"affinity": ("high", "low"), "rule": ("joint", "separate"), "mode": ("auto", "disaggregated", "colocated"),
               "lengths": ("fixed", "uniform", "lognormal", "trace")}


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    slo: SLOConfig = field(default_factory=SLOConfig)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    run_dir: str = "runs/latest"
    base_dir: str = field(default=".", metadata={"internal": True})

    def resolve(self, path: str) -> str:
        """A path from the config, made absolute against the config file's directory."""
        return path if os.path.isabs(path) else os.path.normpath(os.path.join(self.base_dir, path))


POSITIVE_INTS = {
    "model.max_model_len", "cluster.master_port", "placement.prefill.instances",
    "placement.prefill.tp", "placement.prefill.pp", "placement.decode.instances",
    "placement.decode.tp", "placement.decode.pp", "placement.colocated.instances",
    "placement.colocated.tp", "placement.colocated.pp", "scheduler.prefill_token_budget",
    "scheduler.step_token_budget",
    "scheduler.max_decode_batch", "scheduler.block_size", "scheduler.prefill_kv_blocks",
    "scheduler.decode_kv_blocks", "planner.num_requests",
    "planner.max_requests", "serve.port", "serve.max_queue", "serve.max_body_bytes",
}
ZERO_ALLOWED = {"cluster.master_port", "serve.port", "placement.prefill.instances", "placement.decode.instances"}


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            list: "a list"}.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Checks one scalar against its annotated type; ints are accepted where numbers are."""
    origin = typing.get_origin(tp)
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if args == [int, str]:  # a number or "auto"
            if value == "auto":
                return value
            if not isinstance(value, int) or isinstance(value, bool):
                raise UserError(f"config: '{key}' must be an integer or auto, got {value!r}; fix its value")
            return value
        return _convert(value, args[0], key)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is list and isinstance(value, list):
        return value
    if origin is tuple and isinstance(value, str):  # one string where a list of them is allowed
        value = [value]
    if origin is tuple and isinstance(value, (list, tuple)):  # e.g. sampling.stop: a YAML list
        if not all(isinstance(v, str) for v in value):
            raise UserError(f"config: '{key}' must be a list of strings, got {value!r}; fix its value")
        return tuple(value)
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise UserError(f"config: '{key}' must be {_type_name(tp)}, got {value!r}; fix its value")


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Builds dataclass `cls` from a mapping, rejecting unknown keys with a suggestion."""
    where = prefix or "the top level"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"config: '{where}' must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    public = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in public:
            close = difflib.get_close_matches(str(key), public, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(public)}"
            raise UserError(f"config: unknown key '{full}'; {hint}")
        kwargs[key] = _convert(value, hints[key], full)
        choices = getattr(cls, "choices", {}).get(key)
        if choices and kwargs[key] not in choices:
            raise UserError(f"config: '{full}' must be one of {', '.join(choices)}, got {value!r}")
        if full in POSITIVE_INTS and kwargs[key] != "auto":
            low = 0 if full in ZERO_ALLOWED else 1
            if kwargs[key] < low:
                raise UserError(f"config: '{full}' must be >= {low}, got {value!r}")
    return cls(**kwargs)


def _check_ranges(cfg: JobConfig) -> None:
    if not 0.0 < cfg.slo.attainment <= 1.0:
        raise UserError(f"config: 'slo.attainment' must be in (0, 1], got {cfg.slo.attainment}")
    for key in ("ttft_ms", "tpot_ms"):
        if getattr(cfg.slo, key) <= 0:
            raise UserError(f"config: 'slo.{key}' must be > 0 milliseconds")
    try:
        check_sampling(dataclasses.asdict(cfg.sampling))
    except ValueError as e:
        raise UserError(f"config: 'sampling.{str(e)[1:]}") from None  # the message starts with 'field'

    if cfg.workload.rate <= 0:
        raise UserError("config: 'workload.rate' must be > 0 requests per second")
    if cfg.workload.cv <= 0:
        raise UserError("config: 'workload.cv' must be > 0")
    if cfg.planner.span_s < 0 or not cfg.planner.precision > 0:
        raise UserError("config: 'planner.span_s' must be >= 0 seconds (0 = automatic) and 'planner.precision' > 0")
    if cfg.planner.shared_prefix < 0 or not 0 <= cfg.planner.shared_prefix_share <= 1:
        raise UserError("config: 'planner.shared_prefix' must be >= 0 tokens and 'planner.shared_prefix_share' in "
                        "[0, 1]")
    if not 0 < cfg.scheduler.idle_sleep_ms <= 1000:
        raise UserError("config: 'scheduler.idle_sleep_ms' must be in (0, 1000] milliseconds")
    s = cfg.scheduler
    if s.colocated_policy == "chunked" and s.step_token_budget != "auto" and s.step_token_budget <= s.max_decode_batch:
        raise UserError(f"config: 'scheduler.step_token_budget' ({s.step_token_budget}) must exceed "
                        f"'scheduler.max_decode_batch' ({s.max_decode_batch}): decode tokens count against it, "
                        "and a full batch would leave no room for prompts")
    if cfg.scheduler.watchdog_s <= 0:
        raise UserError("config: 'scheduler.watchdog_s' must be > 0 seconds")
    if cfg.serve.port > 65535 or cfg.serve.drain_s < 0:
        raise UserError("config: 'serve.port' must be in [0, 65535] (0: any free port) and 'serve.drain_s' >= 0 "
                        "seconds")
    if not all(key.strip() for key in cfg.serve.api_key):
        raise UserError("config: 'serve.api_key' has an empty key; remove it or give it a value")
    p = cfg.placement
    if p.mode == "disaggregated" and (p.prefill.instances < 1 or p.decode.instances < 1) and not p.plan:
        raise UserError("config: disaggregated placement needs 'placement.prefill.instances' and "
                        "'placement.decode.instances' >= 1 (or set placement.mode: colocated)")
    if cfg.cluster.interface:
        check_interface(cfg.cluster.interface)


def check_interface(name: str) -> None:
    """The job's sockets can only bind an interface this machine has."""
    have = [n for _, n in socket.if_nameindex()]
    if name not in have:
        raise UserError(f"config: 'cluster.interface' = {name!r} is not a network interface of this machine "
                        f"(it has: {', '.join(have)}); pick one of those or leave it empty")


def load_config(path: str) -> JobConfig:
    """Reads and validates a job config; raises UserError on any mistake."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise UserError(f"config: file '{path}' not found; pass an existing YAML file "
                        "(see configs/ for examples)") from None
    except IsADirectoryError:
        raise UserError(f"config: '{path}' is a directory; pass a YAML file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid syntax"
        raise UserError(f"config: '{path}' is not valid YAML{where}: {problem}") from None
    cfg = _build(JobConfig, data, "")
    cfg.base_dir = os.path.dirname(os.path.abspath(path))
    _check_ranges(cfg)
    return cfg


def config_from_dict(data: dict) -> JobConfig:
    """A config from the job file's `dataclasses.asdict` copy (the engine's side); keeps base_dir."""
    base = data.pop("base_dir", ".")
    cfg = _build(JobConfig, data, "")
    cfg.base_dir = base
    return cfg
