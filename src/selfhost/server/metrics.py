"""Prometheus metrics (GET /metrics) and the rolling figures behind the web page's stats panel.

Counters and histograms are updated by the serving code as requests finish;
engine gauges (queue depth, KV blocks, prefix hit rate) are read from each
model's engine at scrape time, so they are never stale.
"""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
RATE_WINDOW_S = 5.0


class _EngineCollector:
    """Reads every loaded model's EngineStats when Prometheus scrapes."""

    def __init__(self, registry_of_models):
        self.models = registry_of_models

    def collect(self):
        gauges = {
            "num_running": GaugeMetricFamily("selfhost_num_requests_running", "Requests in the running batch", labels=["model"]),
            "num_waiting": GaugeMetricFamily("selfhost_num_requests_waiting", "Requests queued for the batch", labels=["model"]),
            "kv_blocks_used": GaugeMetricFamily("selfhost_kv_blocks_used", "KV-cache blocks held by requests", labels=["model"]),
            "kv_blocks_total": GaugeMetricFamily("selfhost_kv_blocks_total", "KV-cache blocks in all", labels=["model"]),
            "prefix_hit_rate": GaugeMetricFamily("selfhost_prefix_cache_hit_rate", "Share of prompt tokens served from the prefix cache", labels=["model"]),
            "num_preemptions": GaugeMetricFamily("selfhost_num_preemptions", "Requests preempted so far", labels=["model"]),
        }
        precision = GaugeMetricFamily(
            "selfhost_precision_info", "Weights' and KV cache's dtypes and the linear kernels chosen on this CPU (1)",
            labels=["model", "weights", "kv_cache", "kernels"],
        )
        speculation = {
            "spec_proposed_tokens": CounterMetricFamily(
                "selfhost_spec_decode_num_draft_tokens", "Tokens proposed by speculative decoding", labels=["model"]),
            "spec_accepted_tokens": CounterMetricFamily(
                "selfhost_spec_decode_num_accepted_tokens", "Proposed tokens the target model accepted", labels=["model"]),
            "spec_acceptance_rate": GaugeMetricFamily(
                "selfhost_spec_decode_acceptance_rate", "Share of proposed tokens accepted", labels=["model"]),
            "spec_mean_accepted_length": GaugeMetricFamily(
                "selfhost_spec_decode_mean_accepted_length",
                "Tokens appended per verifying step of a sequence (accepted proposals + the target's own)", labels=["model"]),
        }
        for name, served in list(self.models.models.items()):
            stats = served.engine.stats()
            for field, gauge in gauges.items():
                gauge.add_metric([name], getattr(stats, field))
            precision.add_metric([name, stats.weight_dtype or "", stats.kv_cache_dtype or "", stats.linear_kernels or ""], 1)
            if stats.speculative_method is not None:
                for field, family in speculation.items():
                    family.add_metric([name], getattr(stats, field))
        yield from gauges.values()
        yield precision
        yield from speculation.values()


class ServerMetrics:
    def __init__(self, models):
        self.registry = CollectorRegistry()
        self.requests = Counter("selfhost_http_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=self.registry)
        self.prompt_tokens = Counter("selfhost_prompt_tokens", "Prompt tokens processed", ["model"], registry=self.registry)
        self.generation_tokens = Counter("selfhost_generation_tokens", "Tokens generated", ["model"], registry=self.registry)
        self.ttft = Histogram("selfhost_time_to_first_token_seconds", "Time from request to first token",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("selfhost_time_per_output_token_seconds", "Mean time between output tokens of a request",
                              ["model"], buckets=_TPOT_BUCKETS, registry=self.registry)
        self.e2e = Histogram("selfhost_request_duration_seconds", "Time from request to last token",
                             ["model"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(models))
        self._recent_tokens: deque[tuple[float, int]] = deque()

    def observe_tokens(self, num_tokens: int) -> None:
        """Generated tokens as they stream, for the tokens/s figure."""
        now = time.monotonic()
        self._recent_tokens.append((now, num_tokens))
        while self._recent_tokens and self._recent_tokens[0][0] < now - RATE_WINDOW_S:
            self._recent_tokens.popleft()

    def tokens_per_s(self) -> float:
        cutoff = time.monotonic() - RATE_WINDOW_S
        return sum(n for t, n in self._recent_tokens if t >= cutoff) / RATE_WINDOW_S

    def observe_request(self, model: str, prompt_tokens: int, output_tokens: int,
                        start: float, first_token: float | None, end: float) -> None:
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.generation_tokens.labels(model).inc(output_tokens)
        if first_token is not None:
            self.ttft.labels(model).observe(first_token - start)
            if output_tokens > 1:
                self.tpot.labels(model).observe((end - first_token) / (output_tokens - 1))
        self.e2e.labels(model).observe(end - start)
