"""Progress lines while a job runs and the summary (table + JSON report, then where the results are)
when it ends, on rank 0."""
from __future__ import annotations

import statistics
import sys
import threading
import time

from rich.console import Console
from rich.table import Table

from contracts.run_report import write_report
from engine.prefix_cache import hit_rate
from launcher.stats import percentile


def summarize(records: list[dict], wall_s: float, slo, instances: list | None = None) -> dict:
    ok = [r for r in records if r.get("metrics")]
    ttft = [r["metrics"]["ttft_ms"] for r in ok]
    tpot = [r["metrics"]["tpot_ms"] for r in ok if _usage(r)["completion_tokens"] > 1]
    out_tokens = sum(len(r.get("token_ids", [])) for r in ok)
    in_tokens = sum(_usage(r)["prompt_tokens"] for r in ok)
    met = [r for r in ok if r["metrics"]["ttft_ms"] <= slo.ttft_ms and r["metrics"]["tpot_ms"] <= slo.tpot_ms]
    cached = sum(r["metrics"].get("cached_tokens", 0) for r in ok)
    return {
        "requests": len(records), "errors": len(records) - len(ok), "input_tokens": in_tokens,
        "cached_tokens": cached, "prefix_hit_rate": cached / in_tokens if in_tokens else 0.0,
        "output_tokens": out_tokens, "wall_s": wall_s,
        "output_tokens_per_s": out_tokens / wall_s if wall_s > 0 else 0.0,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else 0.0,
        "ttft_ms": {f"p{q}": percentile(ttft, q / 100) for q in (50, 90, 99)},
        "tpot_ms": {f"p{q}": percentile(tpot, q / 100) for q in (50, 90, 99)},
        "ttft_ms_mean": statistics.fmean(ttft) if ttft else 0.0,
        "tpot_ms_mean": statistics.fmean(tpot) if tpot else 0.0,
        "instances": [i | {"prefix_hit_rate": hit_rate(i)} for i in instances] if instances else instances,
        "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms,
                "attainment": len(met) / len(ok) if ok else 0.0, "target": slo.attainment},
    }


def _usage(record: dict) -> dict:
    if "usage" in record:
        return record["usage"]
    return record["response"]["body"]["usage"]


class Reporter:
    """Plain progress lines while the job runs, one every `interval` seconds: rank 0's stderr reaches
    the user through mpirun's pipe and the launcher's line relay (a terminal never sees it directly,
    a Slurm job log is a file), so a redrawn bar would only show at the end; a line is what a
    user tailing a job log sees, as vLLM's throughput lines."""

    def __init__(self, total: int, quiet: bool, slo, interval: float = 10.0):
        self.total, self.quiet, self.slo, self.interval = total, quiet, slo, interval
        self.tokens = self.done = self.errors = 0
        self.ttft: list[float] = []
        self.tpot: list[float] = []
        self.console = Console(file=sys.stderr)
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.ticker = threading.Thread(target=self._tick, name="pdlaunch-progress", daemon=True)
        self._start = time.time()

    def __enter__(self):
        self._start = time.time()
        if not self.quiet:
            self.ticker.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        if self.ticker.is_alive():
            self.ticker.join()

    def advance(self, record: dict) -> None:
        with self.lock:
            self.done += 1
            self.tokens += len(record.get("token_ids", []))
            metrics = record.get("metrics")
            if not metrics:
                self.errors += 1
                return
            self.ttft.append(metrics["ttft_ms"])
            if len(metrics.get("token_times", ())) > 1:
                self.tpot.append(metrics["tpot_ms"])

    def line(self) -> str:
        """done/total, errors, output tok/s, TTFT and TPOT p50 so far, and the ETA at the rate so far."""
        with self.lock:
            elapsed = max(time.time() - self._start, 1e-6)
            rate = self.done / elapsed
            eta = _duration((self.total - self.done) / rate) if rate > 0 else "?"
            return (f"pdlaunch: progress {self.done}/{self.total} requests, {self.errors} errors, "
                    f"{self.tokens / elapsed:.1f} tok/s, TTFT p50 {percentile(self.ttft, 0.5):.0f} ms, "
                    f"TPOT p50 {percentile(self.tpot, 0.5):.0f} ms, elapsed {_duration(elapsed)}, ETA {eta}")

    def _tick(self) -> None:
        while not self.stopped.wait(self.interval):
            print(self.line(), file=sys.stderr, flush=True)

    def summary(self, records: list[dict], stats: dict, report_path: str | None, dtype: str,
                results_path: str | None = None, planned: dict | None = None) -> dict:
        """planned: the planner's figures and choice when the plan came from it (plan.predicted)."""
        s = summarize(records, stats["wall_s"], self.slo, stats.get("instances")) | {"dtype": dtype}
        if planned:
            s["placement"] = planned
        if report_path:
            write_report(report_path, "finished", s)
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
            hit_rates = [f"{i['instance']}: {i['prefix_hit_rate'] * 100:.0f} %" for i in s["instances"] or ()
                         if i.get("prefix_query_tokens")]
            if hit_rates:
                rows.append(("prefix cache hits", f"{s['prefix_hit_rate'] * 100:.1f} % of input tokens "
                                                  f"(per instance {', '.join(hit_rates)})"))
            slo = s["slo"]
            rows.append(("SLO attainment", f"{slo['attainment'] * 100:.1f} % (TTFT <= {slo['ttft_ms']:.0f} ms, "
                                           f"TPOT <= {slo['tpot_ms']:.0f} ms)"))
            for k, v in rows:
                table.add_row(k, str(v))
            self.console.print(table)
            for what, path in (("results", results_path), ("report", report_path)):
                if path:
                    print(f"pdlaunch: {what}: {path}", file=sys.stderr, flush=True)
        return s


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
