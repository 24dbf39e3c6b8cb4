"""Remote deployments and the order a request tries them in.

A public model name maps to one or more deployments. A request tries its name's
deployments first, least outstanding requests per unit of `weight` first, then each
fallback's in turn; a deployment at its `max_concurrency` is skipped, and one that
failed recently (cooling down) goes after every healthy one, so it is still tried when
nothing else is left. State changes only on the event loop, so no locks are needed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from selfhost.gateway.config import GatewayConfig, ModelEntry


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
        for entry in config.models:
            # A name's fallbacks are the union of its entries', in the order written.
            known = self.fallbacks.get(entry.name, ())
            self.fallbacks[entry.name] = known + tuple(f for f in entry.fallbacks if f not in known)
        for entry in config.remote_entries:
            siblings = self.deployments.setdefault(entry.name, [])
            siblings.append(_deployment(entry, len(siblings), config.api_key(entry)))
            siblings[-1].siblings = siblings

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
            order += _ranked(self.deployments.get(current, []), now)
            for fallback in self.fallbacks.get(current, ()):
                if fallback not in seen:
                    seen.add(fallback)
                    queue.append(fallback)
        return order, local_fallback


def _ranked(group: list[Deployment], now: float) -> list[Deployment]:
    open_ = [d for d in group if d.has_capacity()]
    healthy = sorted((d for d in open_ if not d.is_cooling(now)), key=Deployment.load)
    cooling = sorted((d for d in open_ if d.is_cooling(now)), key=lambda d: d.cooldown_until)
    return healthy + cooling


def _deployment(entry: ModelEntry, index: int, api_key: str | None) -> Deployment:
    return Deployment(
        id=entry.deployment or f"{entry.name}/{index}", name=entry.name, url=entry.url.rstrip("/"),
        model=entry.model, price_model=entry.price_model or entry.model, api_key=api_key, weight=entry.weight,
        max_concurrency=entry.max_concurrency,
    )
