"""Prometheus counters for the gateway, on the server's own registry (served at /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from selfhost.gateway.ledger import LedgerEntry

NO_KEY = "none"


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter("selfhost_gateway_requests", "Gateway requests recorded in the ledger",
                                ["model", "deployment", "status"], registry=registry)
        self.spend_usd = Counter("selfhost_gateway_spend_usd", "Dollars spent through the gateway (priced requests)",
                                 ["key", "model"], registry=registry)
        self.unpriced = Counter("selfhost_gateway_unpriced_requests", "Requests no price source could price",
                                ["key", "model"], registry=registry)
        self.upstream_failures = Counter("selfhost_gateway_upstream_failures",
                                         "Attempts that failed before their first byte (then retried elsewhere)",
                                         ["deployment"], registry=registry)

    def observe(self, entry: LedgerEntry) -> None:
        key = entry.key_name or NO_KEY
        self.requests.labels(entry.model, entry.deployment, entry.status).inc()
        cost = entry.priced.cost
        if cost.is_priced:
            self.spend_usd.labels(key, entry.model).inc(float(cost.usd))
        else:
            self.unpriced.labels(key, entry.model).inc()
