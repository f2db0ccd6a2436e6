"""`pdlaunch bench`'s outputs for people: the rich table and the attainment plot."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)  # SLO multiples of the attainment curve
# (a bench row's error field, the simulation it compares, its key in the fidelity summary, its
# label): the error is |simulated - measured| attainment in points
FIDELITY_FIELDS = (("error_points", "calibrated", "calibrated", "calibrated"),
                   ("error_points_profile", "predicted", "profile", "profile"),
                   ("error_points_replayed", "replayed", "replayed", "run speed"))


def print_bench(result: dict) -> None:
    console = Console()
    table = Table(title=f"pdlaunch bench: SLO attainment, engine vs simulator ({result['requests_per_rate']} "
                        "requests per rate, one job per system): simulated calibrated by the probe, from the profile "
                        "as it is, and at the speed the run's steps had (run speed); err: points off the measured")
    for col in ("system", "rate", "measured", *(h for *_, label in FIDELITY_FIELDS for h in (label, "err")),
                "TTFT p90", "TPOT p90", "tok/s"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        m = r["measured"]
        simulated = [cell for field, name, *_ in FIDELITY_FIELDS for cell in
                     ((f"{r[name]['attainment']:.1%}", f"{r[field]:.1f}") if field in r else ("-", "-"))]
        table.add_row(r["system"], f"{r['rate']:g}", f"{m['attainment']:.1%}", *simulated,
                      f"{m['ttft_ms_p90']:.0f} ms", f"{m['tpot_ms_p90']:.0f} ms", f"{m['output_tokens_per_s']:.1f}")
    console.print(table)
    for system, f in result["fidelity"].items():
        repeat = f["engine_repeat_points"]
        errors = "; ".join(f"{label} mean {f[key]['mean_points']:.1f} / worst {f[key]['worst_points']:.1f}"
                           for _, _, key, label in FIDELITY_FIELDS if key in f)
        console.print(f"{system}: error over {f['calibrated']['rows']} rates, points: {errors}" +
                      (f"; the engine's repeat of a rate differed by {', '.join(f'{x:.0f}' for x in repeat)} points"
                       if repeat else ""))
    for system, g in result["goodput_per_device"].items():
        lo, hi = g["bracket"]
        upper = "no rate failed" if hi is None else f"{hi:.3f} failed"
        if g["stopped_by_time_budget"]:
            upper += "; bisection stopped by the time budget"
        console.print(f"{system}: goodput {g['measured']:.3f} req/s/device on the engine ({lo:.3f} met the SLOs, "
                      f"{upper}; {g['engine_runs']} rates); simulated {g['simulated_calibrated']:.3f} (calibrated), "
                      f"{g['simulated_profile']:.3f} (profile)")
    for name, r in result.get("goodput_ratio", {}).items():
        console.print(f"{name} goodput per device: " + ("no rate met the SLOs for the second system" if r is None else
                      f"{r['ratio']:.2f}x (the brackets allow {r['low']:.2f}-" +
                      (f"{r['high']:.2f}x)" if r["high"] is not None else "any higher: no rate failed)")))


def plot(rows: list[dict], slo: dict, path: str, title: str) -> None:
    """Left: attainment vs per-device rate, measured and simulated (profile, calibrated); right:
    attainment vs SLO scale at each system's highest rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for system in sorted({r["system"] for r in rows}):
        mine = sorted((r for r in rows if r["system"] == system), key=lambda r: r["rate"])
        rate = [r["rate"] / r["devices"] for r in mine]
        line, = ax.plot(rate, [r["measured"]["attainment"] * 100 for r in mine], "o-", label=f"{system} measured")
        ax.plot(rate, [r["predicted"]["attainment"] * 100 for r in mine], "x:", color=line.get_color(),
                label=f"{system} simulated (profile)")
        ax.plot(rate, [r["calibrated"]["attainment"] * 100 for r in mine], "+--", color=line.get_color(),
                label=f"{system} simulated (calibrated)")
        ax2.plot(SCALES, [mine[-1]["slo_scale"][str(k)] * 100 for k in SCALES], "o-",
                 label=f"{system} measured at {mine[-1]['rate']:g} req/s")
    for a in (ax, ax2):
        a.axhline(slo["attainment"] * 100, color="grey", lw=0.8)
        a.set_ylabel("SLO attainment (%)")
        a.set_ylim(0, 105)
        a.legend(fontsize=7)
    ax.set_xlabel("rate per device (req/s)")
    ax.set_title(title, fontsize=9)
    ax2.set_xlabel(f"SLO scale (x TTFT {slo['ttft_ms']:.0f} ms, TPOT {slo['tpot_ms']:.0f} ms)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
