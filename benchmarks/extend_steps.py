"""Extend steps (prompt chunks after cached tokens: the tails behind a cached prefix) timed on one
rank side by side with fresh prefills, and a profile's extend terms fitted from them.

A profile taken before `pdlaunch profile` timed extend steps has no extend terms, and rerunning the
whole profile re-measures every coefficient on a machine whose speed drifts by tens of per cent
within the hour. This times fresh one-prompt prefills in turn with `pdlaunch profile`'s extend shapes
(engine.step_timing.EXTEND_SHAPES) in one process, rounds interleaved; scales the extend timings by
the median ratio of the profile's price of the fresh prefills to their timings here (the drift, as
`pdlaunch bench`'s calibration probe measures it); and fits the extend terms against the profile's
own prefill terms (launcher.planner.profile_fit.fit_extend). With --write they go into the profile.

    python benchmarks/extend_steps.py [--profile configs/profiles/cpu-smollm2-float32.json] [--repeats 3] [--write]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from engine.batch import build_batch  # noqa: E402
from engine.step_timing import EXTEND_SHAPES, _extend_plan  # noqa: E402
from engine_vs_transformers import BLOCK, Ours  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from launcher.model_files import resolve_model_dir  # noqa: E402
from launcher.planner.latency import load_profile  # noqa: E402
from launcher.planner.profile_fit import fit_extend, predicted_ms  # noqa: E402

FRESH = (64, 128, 256, 512)  # one-prompt prefills: shapes of the profile's own fit


def timed_ms(ours: Ours, seqs) -> float:
    """One forward of the step's chunks (batch building and the argmax included, as a step's)."""
    started = time.perf_counter()
    with torch.inference_mode():
        batch = build_batch(list(seqs), BLOCK, ours.cos, ours.sin)
        ours.stage(batch.token_ids, batch, ours.cache.k, ours.cache.v).argmax(-1)
    return (time.perf_counter() - started) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=os.path.join(ROOT, "configs", "profiles", "cpu-smollm2-float32.json"))
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="store the fitted extend terms in the profile's TP1 entry")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "extend_steps.json"))
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    ours = Ours(resolve_model_dir(args.model), 4096 * BLOCK)
    vocab = ours.shape.vocab_size
    shapes = [({"lens": [n]}, _extend_plan(1, n, 0, BLOCK, vocab).seqs) for n in FRESH] + \
        [({"lens": [n] * b, "starts": [s] * b}, _extend_plan(b, n, s, BLOCK, vocab).seqs) for b, n, s in EXTEND_SHAPES]
    timed_ms(ours, shapes[0][1])  # warm-up
    times = [[] for _ in shapes]
    load = [os.getloadavg()[0]]
    for _ in range(args.repeats):  # rounds: each shape once, so the machine's drift hits all alike
        for i, (_, seqs) in enumerate(shapes):
            times[i].append(timed_ms(ours, seqs))
        load.append(os.getloadavg()[0])
    with open(args.profile) as f:
        profile = json.load(f)
    name = next(k for k in profile if not k.startswith("_"))
    entry = profile[name]["1"]
    fresh = [key | {"ms": statistics.median(t)} for (key, _), t in zip(shapes, times) if "starts" not in key]
    drift = statistics.median(predicted_ms(entry["prefill"], x, "prefill") / x["ms"] for x in fresh)
    extend = [key | {"ms": statistics.median(t) * drift} for (key, _), t in zip(shapes, times) if "starts" in key]
    terms = fit_extend(extend, entry["prefill"])
    model = load_profile(args.profile)
    rows = [x | {"model_ms_before": predicted_ms(entry["prefill"], x, "prefill"),
                 "model_ms_after": predicted_ms(entry["prefill"], x, "prefill", terms)} for x in extend]
    out = {"profile": os.path.relpath(args.profile, ROOT), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "load_average": load, "drift_profile_over_here": drift, "fresh": fresh, "extend": rows,
           "extend_terms": terms, "profile_had": list(model.by_tp[1].extend)}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    for x in rows:
        print(f"{len(x['lens']):2d} x {x['lens'][0]:3d} tokens after {x['starts'][0]:3d}: {x['ms']:7.1f} ms (at the "
              f"profile's speed), model {x['model_ms_before']:7.1f} ms without extend terms, "
              f"{x['model_ms_after']:7.1f} ms with them")
    print(f"drift: the profile prices fresh prefills at {drift:.2f}x their time here (load {min(load):.1f}-"
          f"{max(load):.1f}); extend terms: {terms[0]:.2f} ms per chunk + {terms[1]:.4f} ms per cached token")
    if args.write:
        entry["extend"] = terms
        entry["extend_source"] = (f"benchmarks/extend_steps.py {out['date']}: extend steps timed beside fresh "
                                  f"prefills, scaled by the drift {drift:.2f}")
        with open(args.profile, "w") as f:
            json.dump(profile, f, indent=1)
        print(f"wrote the extend terms into {args.profile}")


if __name__ == "__main__":
    main()
