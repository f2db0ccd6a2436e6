"""The server's live metrics in Prometheus form (GET /metrics): what vLLM's and Dynamo's users
scrape, named pdlaunch_*. Request-level figures come from results as they finish; queue, batch
and KV occupancy from each instance's heartbeat (once a second)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from contracts.protocol import Heartbeat
from engine.blocks import blocks_for
from engine.prefix_cache import hit_rate
from engine.results import metrics_of

disable_created_metrics()  # no *_created series beside each counter: nothing here restarts within a process

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5)


class ServeMetrics:
    def __init__(self, slo, block_size: int):
        self.slo, self.block_size = slo, block_size
        self.registry = r = CollectorRegistry()
        self.requests = Counter("pdlaunch_requests", "Requests by outcome: finished, aborted (client gone or "
                                "drain timed out), rejected (429/503: queue full or draining), invalid (400)",
                                ["outcome"], registry=r)
        self.prompt_tokens = Counter("pdlaunch_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("pdlaunch_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("pdlaunch_time_to_first_token_seconds", "Arrival to first token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.tpot = Histogram("pdlaunch_time_per_output_token_seconds", "Mean time per token after the first",
                              buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("pdlaunch_e2e_request_latency_seconds", "Arrival to last token", buckets=LATENCY_BUCKETS,
                             registry=r)
        self.transfer = Histogram("pdlaunch_kv_transfer_seconds", "Prefill-to-decode KV transfer of a request",
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.slo_met = Counter("pdlaunch_slo_met", "Finished requests within both the TTFT and the TPOT SLO",
                               registry=r)
        self.attainment = Gauge("pdlaunch_slo_attainment", "Share of finished requests within both SLOs", registry=r)
        self.kv_pulled = Counter("pdlaunch_kv_blocks_pulled", "KV blocks moved from prefill to decode instances",
                                 registry=r)
        self.waiting_first = Gauge("pdlaunch_requests_waiting_first_token",
                                   "Admitted requests without their first token (what serve.max_queue bounds)",
                                   registry=r)
        self.in_flight = Gauge("pdlaunch_requests_in_flight", "Admitted requests not finished", registry=r)
        labels = ["instance", "role"]
        self.waiting = Gauge("pdlaunch_instance_waiting", "Requests queued at an instance (prefill: for a prefill "
                             "batch; decode: for room to pull their KV)", labels, registry=r)
        self.running = Gauge("pdlaunch_instance_running", "Sequences in an instance's decode batch", labels, registry=r)
        self.kv_used = Gauge("pdlaunch_instance_kv_blocks_used", "KV blocks held (a prefill instance: its hold area)",
                             labels, registry=r)
        self.kv_cached = Gauge("pdlaunch_instance_kv_blocks_cached", "KV blocks of cached prefixes that no request "
                               "holds (kept until their room is needed; not in kv_blocks_used)", labels, registry=r)
        self.kv_total = Gauge("pdlaunch_instance_kv_blocks", "KV blocks of an instance", labels, registry=r)
        self.prefix_hit_rate = Gauge("pdlaunch_instance_prefix_cache_hit_rate", "Share of the prompt tokens an "
                                     "instance admitted that its prefix cache served (decode, with "
                                     "scheduler.decode_prefix_reuse: that it did not pull)", labels, registry=r)
        self.cached_tokens = Counter("pdlaunch_prompt_tokens_cached", "Prompt tokens of finished requests served "
                                     "from a prefix cache", registry=r)
        self.finished_count = self.met_count = 0

    def finished(self, prompt_tokens: int, result, arrival: float) -> dict:
        """Counts a finished request; returns its metrics (with `slo_met`) for the request log."""
        m = metrics_of(result, arrival)
        self.prompt_tokens.inc(prompt_tokens)
        self.cached_tokens.inc(result.cached_tokens)
        self.ttft.observe(m["ttft_ms"] / 1e3)
        self.e2e.observe(m["e2e_ms"] / 1e3)
        if len(result.output) > 1:
            self.tpot.observe(m["tpot_ms"] / 1e3)
        if "transfer_ms" in m:
            self.transfer.observe(m["transfer_ms"] / 1e3)
            self.kv_pulled.inc(blocks_for(prompt_tokens, self.block_size))
        met = m["ttft_ms"] <= self.slo.ttft_ms and m["tpot_ms"] <= self.slo.tpot_ms
        self.finished_count += 1
        self.met_count += met
        self.slo_met.inc(int(met))
        self.attainment.set(self.met_count / self.finished_count)
        m["slo_met"] = met
        return m

    def instance(self, beat: Heartbeat, role: str) -> None:
        labels, state = (str(beat.instance), role), beat.state
        self.waiting.labels(*labels).set(state.waiting)
        self.running.labels(*labels).set(state.running)
        self.kv_used.labels(*labels).set(state.kv_used)
        self.kv_cached.labels(*labels).set(state.kv_cached)
        self.kv_total.labels(*labels).set(state.kv_blocks)
        self.prefix_hit_rate.labels(*labels).set(hit_rate(vars(state)))

    def render(self) -> bytes:
        return generate_latest(self.registry)
