"""Progress bar while a job runs and the summary (table + JSON report) when it ends, on rank 0."""
from __future__ import annotations

import json
import statistics
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from launcher.stats import percentile


def summarize(records: list[dict], wall_s: float, slo, instances: list | None = None) -> dict:
    ok = [r for r in records if r.get("metrics")]
    ttft = [r["metrics"]["ttft_ms"] for r in ok]
    tpot = [r["metrics"]["tpot_ms"] for r in ok if _usage(r)["completion_tokens"] > 1]
    out_tokens = sum(len(r.get("token_ids", [])) for r in ok)
    in_tokens = sum(_usage(r)["prompt_tokens"] for r in ok)
    met = [r for r in ok if r["metrics"]["ttft_ms"] <= slo.ttft_ms and r["metrics"]["tpot_ms"] <= slo.tpot_ms]
    return {
        "requests": len(records), "errors": len(records) - len(ok), "input_tokens": in_tokens,
        "output_tokens": out_tokens, "wall_s": wall_s,
        "output_tokens_per_s": out_tokens / wall_s if wall_s > 0 else 0.0,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else 0.0,
        "ttft_ms": {f"p{q}": percentile(ttft, q / 100) for q in (50, 90, 99)},
        "tpot_ms": {f"p{q}": percentile(tpot, q / 100) for q in (50, 90, 99)},
        "ttft_ms_mean": statistics.fmean(ttft) if ttft else 0.0,
        "tpot_ms_mean": statistics.fmean(tpot) if tpot else 0.0,
        "instances": instances,
        "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms,
                "attainment": len(met) / len(ok) if ok else 0.0, "target": slo.attainment},
    }


def _usage(record: dict) -> dict:
    if "usage" in record:
        return record["usage"]
    return record["response"]["body"]["usage"]


class Reporter:
    def __init__(self, total: int, quiet: bool, slo):
        self.quiet, self.slo, self.tokens = quiet, slo, 0
        self.console = Console(file=sys.stderr)
        self.progress = None if quiet else Progress(
            TextColumn("[bold]generating"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, transient=False)
        self.task = self.progress.add_task("requests", total=total, rate="") if self.progress else None
        self._start = None

    def __enter__(self):
        import time

        self._start = time.time()
        if self.progress:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress:
            self.progress.stop()

    def advance(self, record: dict) -> None:
        import time

        self.tokens += len(record.get("token_ids", []))
        if self.progress:
            elapsed = max(time.time() - self._start, 1e-6)
            self.progress.update(self.task, advance=1, rate=f"{self.tokens / elapsed:.1f} tok/s")

    def summary(self, records: list[dict], stats: dict, report_path: str | None, dtype: str,
                planned: dict | None = None) -> dict:
        """planned: the planner's figures and choice when the plan came from it (plan.predicted)."""
        s = summarize(records, stats["wall_s"], self.slo, stats.get("instances")) | {"dtype": dtype}
        if planned:
            s["placement"] = planned
        if report_path:
            with open(report_path, "w") as f:
                json.dump(s, f, indent=2)
        if not self.quiet:
            table = Table(title="pdlaunch summary")
            table.add_column("metric")
            table.add_column("value", justify="right")
            rows = [("placement", f"{planned['mode']} {planned['layout']} (the planner's choice)")] if planned else []
            rows += [("model dtype", dtype), ("requests", s["requests"]), ("errors", s["errors"]), ("input tokens", s["input_tokens"]),
                    ("output tokens", s["output_tokens"]), ("wall time", f"{s['wall_s']:.2f} s"),
                    ("throughput", f"{s['output_tokens_per_s']:.1f} tok/s, {s['requests_per_s']:.2f} req/s")]
            for name in ("ttft_ms", "tpot_ms"):
                p = s[name]
                rows.append((name.replace("_ms", " p50/p90/p99"),
                             f"{p['p50']:.0f} / {p['p90']:.0f} / {p['p99']:.0f} ms"))
            slo = s["slo"]
            rows.append(("SLO attainment", f"{slo['attainment'] * 100:.1f} % (TTFT <= {slo['ttft_ms']:.0f} ms, "
                                           f"TPOT <= {slo['tpot_ms']:.0f} ms)"))
            for k, v in rows:
                table.add_row(k, str(v))
            self.console.print(table)
        return s
