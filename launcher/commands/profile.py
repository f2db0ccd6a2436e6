"""`pdlaunch profile`: time the real engine on this hardware and fit the planner's latency model."""
from __future__ import annotations

import json
import os
import platform
import sys
import time

from contracts.config import load_config
from contracts.errors import UserError
from contracts.plan import check_layouts, packed_plan
from launcher.job_setup import check_hosts, cluster_hosts, model_dir_of, new_job, run_job
from launcher.machine import fingerprint
from launcher.model_files import read_shape
from launcher.planner.profile_fit import fit_entry, fit_pipeline, other_phase_slowdown, scaled_to_busy, shared_slowdown


def _degrees(text: str, flag: str) -> list[int]:
    """A comma-separated list of parallel degrees (>= 1) from the command line."""
    try:
        degrees = [int(d) for d in text.split(",")]
    except ValueError:
        degrees = []
    if not degrees or min(degrees) < 1:
        raise UserError(f"profile: {flag} takes degrees >= 1 separated by commas, e.g. 1,2; got {text!r}")
    return degrees


def profile(args) -> int:
    cfg = load_config(args.config)
    # It measures its own shapes and needs no earlier profile (whose L_m plays no part in them);
    # the config's may not exist yet, e.g. the first profile in a new dtype.
    cfg.planner.profile = cfg.planner.colocated_profile = ""
    hosts = cluster_hosts(cfg)
    model_dir = model_dir_of(cfg)
    shape = read_shape(model_dir)
    slots = sum(h.slots for h in hosts)
    tps = _degrees(args.tp, "--tp") if args.tp else \
        [t for t in (1, 2, 4, 8) if t <= slots and shape.num_kv_heads % t == 0][:2]
    pps = sorted(set(_degrees(args.pp, "--pp")) - {1}) if args.pp else []
    run_dir = os.path.abspath(args.run_dir or cfg.resolve(cfg.run_dir))
    os.makedirs(run_dir, exist_ok=True)

    def timings(tp: int, count: int, pp: int = 1) -> dict:
        """The profile job's timings per instance: `count` instances of TP `tp` x PP `pp` at once."""
        plan = packed_plan([("colocated", count, tp, pp)], hosts)
        check_layouts(plan, shape, hosts, key="plan")
        check_hosts(cfg, plan)
        samples_path = os.path.join(run_dir, f"profile-samples-tp{tp}-pp{pp}-x{count}.json")
        what = f"TP={tp}" + (f" PP={pp}" if pp > 1 else "")
        if not args.quiet:
            print(f"profiling {what} on {count} concurrent instance(s) ...", file=sys.stderr)
        run_job(new_job(cfg, plan, model_dir, mode="profile", profile_samples=samples_path), run_dir,
                f"profiling {what}")
        with open(samples_path) as f:
            per_instance = json.load(f)
        dtypes.update(inst["dtype"] for inst in per_instance.values())
        return per_instance

    def profiled(tp: int, count: int) -> dict:
        """Step samples of `count` instances of TP `tp` profiling at once."""
        per_instance = timings(tp, count)
        samples = {kind: [x for inst in per_instance.values() for x in inst["samples"].get(kind, [])]
                   for kind in ("prefill", "decode", "mixed", "extend")}
        for part in ("overhead", "beside_other_phase"):  # the latter from instance 0 of several
            samples[part] = {kind: [x for inst in per_instance.values()
                                    for x in inst["samples"].get(part, {}).get(kind, [])] for kind in ("prefill", "decode")}
        return samples

    entry, alone_fits, dtypes = {}, {}, set()
    for tp in tps:
        # every slot busy at once, as in a real deployment: the timings include the contention
        # of ranks sharing memory bandwidth (and, on small machines, cores), and instance 0 times
        # steps side by side beside idle neighbours, its own phase and the other phase (the
        # slowdowns); then one instance alone, whose timings the coefficients are fitted to
        count = 1 if args.alone else max(1, slots // tp)
        samples = profiled(tp, count)
        if count == 1:
            entry[str(tp)] = alone_fits[tp] = fit_entry(samples) | {"concurrent_instances": 1, "samples": samples}
            continue
        alone = profiled(tp, 1)
        # the forward's coefficients from the alone timings, scaled to a busy node; the step loop's
        # own cost as measured busy
        alone_fits[tp] = fit_entry(alone | {"overhead": samples["overhead"]})
        beside = samples["beside_other_phase"]
        slowdown = shared_slowdown(beside)
        entry[str(tp)] = scaled_to_busy(alone_fits[tp], slowdown) | {
            "concurrent_instances": count, "samples": samples, "shared_slowdown": slowdown,
            "other_phase_slowdown": other_phase_slowdown(beside, alone_fits[tp]["decoding_large_small_bs_threshold"]),
            "samples_alone": alone}
    overlaps = []
    for pp in pps:
        for tp in tps:
            if tp * pp > slots:
                print(f"pdlaunch profile: TP={tp} x PP={pp} needs {tp * pp} slots, the hostfile has {slots}; "
                      "skipped", file=sys.stderr)
                continue
            per_instance = timings(tp, 1, pp)
            measured = fit_pipeline(next(iter(per_instance.values()))["samples"]["pipeline"], alone_fits[tp], pp)
            entry[str(tp)].setdefault("pipeline", {})[str(pp)] = measured
            if pp == min(int(k) for k in entry[str(tp)]["pipeline"]):
                entry[str(tp)]["pp_stage_ms"] = measured["handoff_ms"]
            overlaps.append((pp, measured["overlap"]))
    name = os.path.basename(model_dir.rstrip("/"))
    if overlaps:  # stages count as overlapping when they win at least half of the ideal speed-up
        pipelined, source = all(o >= 1 + (pp - 1) / 2 for pp, o in overlaps), "measured"
    else:
        pipelined = cfg.scheduler.batches_in_flight
        source = "assumed from scheduler.batches_in_flight (pdlaunch profile --pp 2 measures it)"
    profile = {name: entry, "_meta": {"pipelined_pp": pipelined, "pipelined_pp_source": source,
                                      "date": time.strftime("%Y-%m-%d"),
                                      "machine": f"{platform.machine()}, {os.cpu_count()} cores, {cfg.cluster.device}",
                                      "dtype": "/".join(sorted(dtypes)), "source": "pdlaunch profile",
                                      "fingerprint": fingerprint(cfg.cluster.device, "/".join(sorted(dtypes)))}}
    with open(args.output, "w") as f:
        json.dump(profile, f, indent=1)
    if not args.quiet:
        for tp, e in entry.items():
            print(f"TP={tp}: prefill ms = {e['prefill'][0]:.2f} + {e['prefill'][1]:.4f}*sum(len) + "
                  f"{e['prefill'][2]:.2e}*sum(len^2) (max rel. error {e['fit_max_rel_error']['prefill']:.1%}); "
                  f"decode ms (batch >= {e['decoding_large_small_bs_threshold']}) = {e['decoding_largebs'][0]:.2f} + "
                  f"{e['decoding_largebs'][1]:.5f}*sum(ctx) + {e['decoding_largebs'][2]:.3f}*batch "
                  f"(max rel. error {e['fit_max_rel_error']['decode']:.1%}); "
                  f"L_m = {e['token_budget']}" +
                  (f"; mixed steps (chunked prefill) max rel. error {e['fit_max_rel_error']['mixed']:.1%}"
                   if "mixed" in e["fit_max_rel_error"] else "") +
                  (f"; extend chunks (after s cached tokens) + {e['extend'][0]:.2f} + {e['extend'][1]:.2e}*s ms "
                   f"(max rel. error {e['fit_max_rel_error']['extend']:.1%})" if "extend" in e else "") + ("; beside the same phase / idle: prefill {prefill:.2f}x, "
                                                   "decode {decode:.2f}x".format(**e["shared_slowdown"]) +
                                                   "; beside the other phase / the same: prefill {prefill:.2f}x, "
                                                   "decode {decode_smallbs:.2f}x small batches, {decode_largebs:.2f}x "
                                                   "large".format(**e["other_phase_slowdown"])
                                                   if "shared_slowdown" in e else "") +
                  "; step overhead ms: prefill {:.2f} + {:.2e}*tokens, decode {:.2f} + {:.2e}*context".format(
                      *e["step_overhead"]["prefill"], *e["step_overhead"]["decode"]))
        print(f"machine: {', '.join(f'{k} {v}' for k, v in profile['_meta']['fingerprint'].items())}")
        print(f"wrote {args.output}")
    return 0
