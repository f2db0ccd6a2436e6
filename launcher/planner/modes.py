"""The planner's architecture decision (`--mode auto|disaggregated|colocated`): whichever of the
best disaggregated and the best colocated placement (launcher/planner/search.py) sustains the SLOs
at the higher rate per device, ties as search.rank_key, with the reason in words.
Mixed deployments (some devices colocated, some split) are not searched: with traffic split in
proportion to capacity their per-device goodput is the device-weighted mean of their parts', so
they never beat the better pure mode per device.
"""
from __future__ import annotations

from dataclasses import dataclass

from launcher.planner.search import PlacementResult, rank_key


MODES = ("auto", "disaggregated", "colocated")


@dataclass
class ModeChoice:
    """The planner's architecture decision: both modes' best placements (None where a mode has no
    layout that meets the SLOs) and which one it writes, with the reason in words."""

    mode: str
    placements: dict[str, PlacementResult | None]
    reason: str
    errors: dict[str, str]

    @property
    def chosen(self) -> PlacementResult:
        return self.placements[self.mode]


def choose_mode(disaggregated: PlacementResult | None, colocated: PlacementResult | None, requested: str = "auto",
                errors: dict[str, str] | None = None) -> ModeChoice:
    """auto: the mode whose placement sustains the SLOs at the higher rate per device (ties as
    rank_key: fewer devices, then lower mean TPOT); otherwise the requested mode, with the
    comparison stated either way."""
    placements, errors = {"disaggregated": disaggregated, "colocated": colocated}, dict(errors or {})
    ok = {m: r for m, r in placements.items() if r is not None and r.per_device_goodput > 0}
    for m in placements:
        if m not in ok:
            errors.setdefault(m, "no layout meets the SLOs at any rate")
    if requested != "auto":
        if requested not in ok:
            raise ValueError(f"{requested}: {errors[requested]}")
        other = next(m for m in placements if m != requested)
        return ModeChoice(requested, placements, f"as requested (--mode {requested}); " + (
            _comparison(requested, ok[requested], other, ok[other]) if other in ok else f"{other}: {errors[other]}"),
            errors)
    if not ok:
        raise ValueError("; ".join(f"{m}: {e}" for m, e in errors.items()))
    if len(ok) == 1:
        mode = next(iter(ok))
        other = next(m for m in placements if m != mode)
        return ModeChoice(mode, placements, f"{other}: {errors[other]}", errors)
    mode = max(ok, key=lambda m: rank_key(ok[m].per_device_goodput, ok[m].devices, ok[m].mean_tpot_ms))
    other = next(m for m in ok if m != mode)
    return ModeChoice(mode, placements, _comparison(mode, ok[mode], other, ok[other]), errors)


def _comparison(mode: str, a: PlacementResult, other: str, b: PlacementResult) -> str:
    if a.per_device_goodput != b.per_device_goodput:
        ratio = a.per_device_goodput / b.per_device_goodput
        word = "higher" if ratio > 1 else "lower"
        return (f"{mode} sustains the SLOs at {a.per_device_goodput:.3g} req/s per device, {word} than {other}'s "
                f"{b.per_device_goodput:.3g} ({ratio:.2f}x)")
    same = f"both sustain {a.per_device_goodput:.3g} req/s per device; "
    if a.devices != b.devices:
        return same + f"{mode} on {'fewer' if a.devices < b.devices else 'more'} devices ({a.devices} vs {b.devices})"
    return same + (f"{mode} at the {'lower' if a.mean_tpot_ms <= b.mean_tpot_ms else 'higher'} mean TPOT "
                   f"({a.mean_tpot_ms:.0f} vs {b.mean_tpot_ms:.0f} ms)")
