"""Remote deployments and the order a request tries them in.

A public model name maps to one or more deployments. A request tries its name's
deployments first, least outstanding requests per unit of `weight` first, then each
fallback's in turn; a deployment at its `max_concurrency` is skipped, and one that
failed recently (cooling down) goes after every healthy one, so it is still tried when
nothing else is left. State changes only on the event loop, so no locks are needed.
"""

from __future__ import annotations

import datetime as dt
import math
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from decimal import Decimal

from selfhost.gateway.config import GatewayConfig, ModelEntry
from selfhost.gateway.rate_card import Pricer
from selfhost.gateway.upstream_http import proxy_for
from selfhost.plan.pricing import UsageRecord

LATENCY_WINDOW = 50  # recent requests whose median time to first byte the cheapest router judges
# ...if no older than this: a deployment passed over for being slow gets traffic (and is measured) again.
LATENCY_MAX_AGE_S = 60.0
# The request `router = "cheapest"` compares deployments on: 1000 prompt tokens, 250 generated.
REFERENCE_USAGE = UsageRecord(input_tokens=1000, output_tokens=250)


@dataclass
class Deployment:
    """One remote upstream of a public model name, and its live load and health."""

    id: str
    name: str  # the public model name it serves
    url: str  # the OpenAI-compatible base URL, ending before /chat/completions
    model: str  # the upstream's id for the model
    price_model: str  # the catalog id its requests are priced under
    api_key: str | None = field(default=None, repr=False)  # never printed, logged or stored
    weight: float = 1.0
    max_concurrency: int | None = None
    outstanding: int = 0
    started: int = 0  # requests ever sent: breaks ties between equally loaded deployments in turn
    cooldown_until: float = 0.0
    failures: int = 0
    siblings: list[Deployment] = field(default_factory=list, repr=False, compare=False)  # its name's, itself too
    # (when, seconds to the first byte) of its recent requests
    latencies_s: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW), repr=False, compare=False)
    reference_usd: Decimal | None = None  # the reference request's price; None: unpriced (ranked last by cost)
    headers: dict = field(init=False, repr=False, compare=False)  # what every request to it carries, its key too
    pricer: Pricer = field(init=False, repr=False, compare=False)  # prices its requests under price_model
    via_proxy: dict = field(init=False, repr=False, compare=False)  # HTTP(S)_PROXY for its url, read at start-up

    def __post_init__(self) -> None:
        self.pricer = Pricer(self.price_model)
        self.via_proxy = proxy_for(self.url)
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            self.headers["Authorization"] = f"Bearer {self.api_key}"

    def is_cooling(self, now: float) -> bool:
        return now < self.cooldown_until

    def has_capacity(self) -> bool:
        return self.max_concurrency is None or self.outstanding < self.max_concurrency

    def load(self) -> tuple[float, float]:
        return self.outstanding / self.weight, self.started / self.weight

    def begin(self) -> None:
        self.outstanding += 1
        self.started += 1

    def end(self) -> None:
        self.outstanding -= 1

    def observe_latency(self, seconds: float) -> None:
        self.latencies_s.append((time.monotonic(), seconds))

    def meets(self, objective_ms: float) -> bool:
        """Whether its recent median time to first byte is within the objective (yes while it has none)."""
        while self.latencies_s and self.latencies_s[0][0] < time.monotonic() - LATENCY_MAX_AGE_S:
            self.latencies_s.popleft()
        return not self.latencies_s or statistics.median(s for _, s in self.latencies_s) * 1e3 <= objective_ms

    def mark_failed(self, cooldown_s: float) -> None:
        self.failures += 1
        self.cooldown_until = time.monotonic() + cooldown_s

    def mark_healthy(self) -> None:
        if self.failures:
            # Back from a cooldown: level with its siblings, or the tie-break on `started` would send it every
            # idle request until it caught up with what they served meanwhile.
            self.started = max(s.started / s.weight for s in self.siblings) * self.weight
        self.failures = 0
        self.cooldown_until = 0.0


class DeploymentTable:
    """Public name -> its deployments, plus each name's fallbacks and which names are local."""

    def __init__(self, config: GatewayConfig):
        self.deployments: dict[str, list[Deployment]] = {}
        self.fallbacks: dict[str, tuple[str, ...]] = {}
        self.local_names = {e.name for e in config.local_entries}
        self.router, self.latency_objective_ms = config.gateway.router, config.gateway.latency_objective_ms
        for entry in config.models:
            # A name's fallbacks are the union of its entries', in the order written.
            known = self.fallbacks.get(entry.name, ())
            self.fallbacks[entry.name] = known + tuple(f for f in entry.fallbacks if f not in known)
        for entry in config.remote_entries:
            siblings = self.deployments.setdefault(entry.name, [])
            siblings.append(_deployment(entry, len(siblings), config.api_key(entry)))
            siblings[-1].siblings = siblings
        if self.router == "cheapest":
            today = dt.datetime.now(dt.UTC)
            for deployment in self.all():
                cost = deployment.pricer.price(REFERENCE_USAGE, today)
                deployment.reference_usd = cost.usd if cost.is_priced else None

    def is_remote(self, name: str) -> bool:
        return name in self.deployments

    def all(self) -> list[Deployment]:
        return [d for group in self.deployments.values() for d in group]

    def plan(self, name: str) -> tuple[list[Deployment], str | None]:
        """The deployments to try for `name`, in order, and the local fallback that comes after them (if any).

        Fallbacks are followed breadth-first, each name once; a local model ends the plan,
        as it answers through selfhost's own routes.
        """
        now = time.monotonic()
        order: list[Deployment] = []
        local_fallback = None
        seen, queue = {name}, [name]
        while queue:
            current = queue.pop(0)
            if current in self.local_names:
                local_fallback = local_fallback or current
                continue
            order += self._ranked(self.deployments.get(current, []), now)
            for fallback in self.fallbacks.get(current, ()):
                if fallback not in seen:
                    seen.add(fallback)
                    queue.append(fallback)
        return order, local_fallback

    def _ranked(self, group: list[Deployment], now: float) -> list[Deployment]:
        open_ = [d for d in group if d.has_capacity()]
        healthy = sorted((d for d in open_ if not d.is_cooling(now)), key=self._preference)
        cooling = sorted((d for d in open_ if d.is_cooling(now)), key=lambda d: d.cooldown_until)
        return healthy + cooling

    def _preference(self, deployment: Deployment) -> tuple:
        if self.router == "cheapest":  # within the objective first, then cheapest, then least loaded
            cost = math.inf if deployment.reference_usd is None else deployment.reference_usd
            return (not deployment.meets(self.latency_objective_ms), cost, *deployment.load())
        return deployment.load()


def _deployment(entry: ModelEntry, index: int, api_key: str | None) -> Deployment:
    return Deployment(
        id=entry.deployment or f"{entry.name}/{index}", name=entry.name, url=entry.url.rstrip("/"),
        model=entry.model, price_model=entry.price_model or entry.model, api_key=api_key, weight=entry.weight,
        max_concurrency=entry.max_concurrency,
    )
