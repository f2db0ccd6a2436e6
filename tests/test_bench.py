"""`pdlaunch bench`'s goodput bracket and time budget, on synthetic engine runs (no processes)."""
from __future__ import annotations

import pytest

from launcher.bench import OutOfTime, measured_goodput


def row(rate: float, attainment: float) -> dict:
    return {"system": "s", "rate": rate, "devices": 2, "measured": {"attainment": attainment}}


def engine(threshold: float, rows: list, budget_runs: int = 99):
    """probe(rate): an engine run that meets the SLOs up to `threshold`, until the budget is spent."""
    tested = len(rows)

    def probe(rate: float) -> dict:
        if len(rows) - tested >= budget_runs:
            raise OutOfTime
        rows.append(row(rate, 1.0 if rate <= threshold else 0.5))
        return rows[-1]
    return probe


@pytest.mark.parametrize("threshold", [0.1, 0.45, 0.61, 1.7])
def test_bisection_brackets_the_engines_threshold(threshold):
    rows = [row(0.3, float(threshold >= 0.3)), row(0.6, float(threshold >= 0.6)), row(0.9, float(threshold >= 0.9))]
    g = measured_goodput(rows, "s", 0.9, 0.01, 20, engine(threshold, rows))
    lo, hi = g["bracket"]
    assert lo * 2 <= threshold < hi * 2 and hi - lo <= 0.01 + 1e-9
    assert g["measured"] == lo and g["engine_runs"] == len(rows) and not g["stopped_by_time_budget"]


def test_time_budget_stops_bisection_with_the_bracket_of_the_runs_made():
    rows = [row(0.3, 1.0), row(0.6, 0.0)]
    g = measured_goodput(rows, "s", 0.9, 0.001, 20, engine(0.5, rows, budget_runs=1))
    assert g["stopped_by_time_budget"] and g["engine_runs"] == 3
    assert g["bracket"] == pytest.approx([0.45 / 2, 0.6 / 2])  # one probe at 0.45 passed, then no time


def test_without_probes_an_unbroken_run_of_passes_has_no_upper_end():
    rows = [row(0.3, 1.0), row(0.6, 0.95)]
    g = measured_goodput(rows, "s", 0.9, 0.01, 0, None)
    assert g["bracket"] == [0.3, None] and g["measured"] == 0.3
