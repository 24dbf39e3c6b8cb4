"""ClusterConfig: how many engine replicas Ray Serve runs, where, and how requests reach them.

Frozen and checked once; `deployment_options()` turns it into Ray Serve's own
deployment arguments (replica count or autoscaling, each replica's CPU/GPU
share, the request router), so nothing else translates these numbers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from selfhost.errors import InvalidParameterError

# Slots a replica keeps beyond max_ongoing_requests for front ends' `deltas` streams (one per front end), so
# one can always connect to a replica whose queue the front end's requests have filled; the router keeps
# those requests within max_ongoing_requests itself.
STREAM_SLOTS = 4

ROUTERS = {
    "prefix": "selfhost.cluster.router:PrefixAffinityRouter",
    "round_robin": "selfhost.cluster.router:RoundRobinRouter",
}


@dataclass(frozen=True)
class ClusterConfig:
    replicas: int = 1  # fixed replica count; ignored under `autoscale`
    autoscale: tuple[int, int] | None = None  # (min, max) replicas: Ray Serve scales on ongoing requests
    address: str | None = None  # None: start a local Ray; "auto"; "ray://host:10001"; "host:6379"
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    routing: Literal["prefix", "round_robin"] = "prefix"
    # The replica holding a prompt's prefix is taken unless it has more than this many requests in flight
    # beyond the least busy replica (bounded imbalance). Under continuous batching one more request costs
    # a replica one decode row per step, far less than recomputing a shared prefix elsewhere, so the bound
    # is loose (benchmarks/scale_sim.py, 8 shared prompts, 10-17 requests/s: 8 hit 2-5 points more than 4,
    # and 2 hit 3-9 points less, TTFT p50 about the same).
    routing_imbalance: int = 8
    max_ongoing_requests: int = 64  # per replica: what the router lets wait in one engine
    # A replica sends a stream's first tokens at once, then at most one message per interval with every token
    # made meanwhile (0: one message per engine step). Each message through Ray costs the front end ~1-2 ms of
    # CPU, so per-step messages made the front end and Serve's proxy the busiest processes of a loaded box.
    stream_interval_ms: float = 20.0
    # One Ray stream per replica carries every delta of the front end's requests there (outbox.py), instead
    # of one stream per request: the front end receives one message per interval per replica, not per request.
    multiplex_streams: bool = True
    # With multiplex_streams: a request's tokens that wait for the same message go as one delta, so the client
    # gets one event for them (as from a speculative step) instead of one per token. Every event costs the
    # front end and Serve's proxy CPU, ~0.9 ms together per event on a 2-core box, which they take from the
    # replicas. The first token is still sent at once, the rest at most stream_interval_ms late.
    merge_deltas: bool = True
    target_ongoing_requests: float = 4.0  # autoscaling target per replica (queued + running sequences)
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 30.0
    autoscale_metrics_interval_s: float = 1.0
    app_name: str = "selfhost"

    def __post_init__(self):
        if self.replicas < 1:
            raise InvalidParameterError(f"--replicas {self.replicas}: must be at least 1", param="replicas")
        if self.autoscale is not None:
            low, high = self.autoscale
            if not 1 <= low <= high:
                raise InvalidParameterError(f"--autoscale {low},{high}: needs 1 <= MIN <= MAX", param="autoscale")
        if self.cpus_per_replica <= 0:
            raise InvalidParameterError(f"--cpus-per-replica {self.cpus_per_replica}: must be positive",
                                        param="cpus_per_replica")
        if self.gpus_per_replica < 0:
            raise InvalidParameterError(f"--gpus-per-replica {self.gpus_per_replica}: must be 0 or more",
                                        param="gpus_per_replica")
        if self.routing not in ROUTERS:
            raise InvalidParameterError(f"--routing {self.routing!r}: choose one of {', '.join(ROUTERS)}",
                                        param="routing")
        if self.stream_interval_ms < 0:
            raise InvalidParameterError(f"stream_interval_ms {self.stream_interval_ms}: must be 0 or more",
                                        param="stream_interval_ms")
        if self.routing_imbalance < 0 or self.max_ongoing_requests < 1 or self.target_ongoing_requests <= 0:
            raise InvalidParameterError("routing_imbalance must be >= 0, max_ongoing_requests >= 1 and "
                                        "target_ongoing_requests > 0", param="routing")

    @staticmethod
    def parse_autoscale(text: str) -> tuple[int, int]:
        """'1,4' -> (1, 4); anything else is an error naming the text."""
        low, sep, high = text.partition(",")
        try:
            if not sep:
                raise ValueError
            return int(low), int(high)
        except ValueError:
            raise InvalidParameterError(f"--autoscale {text!r}: expected MIN,MAX such as 1,4",
                                        param="autoscale") from None

    @property
    def peak_replicas(self) -> int:
        return self.autoscale[1] if self.autoscale else self.replicas

    @property
    def initial_replicas(self) -> int:
        return self.autoscale[0] if self.autoscale else self.replicas

    def deployment_options(self) -> dict[str, Any]:
        """Ray Serve's arguments for the engine deployment."""
        options: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.cpus_per_replica, "num_gpus": self.gpus_per_replica},
            "max_ongoing_requests": self.max_ongoing_requests + (STREAM_SLOTS if self.multiplex_streams else 0),
            "request_router_config": {
                "request_router_class": ROUTERS[self.routing],
                "request_router_kwargs": {"imbalance": self.routing_imbalance,
                                          "max_ongoing": self.max_ongoing_requests},
                # Routing reads its own in-flight counts (router.py); Serve's queue-length probes only refresh them.
                "request_routing_stats_period_s": 1.0,
            },
            # A dead replica is found by its failed calls at once; this catches a hung one.
            "health_check_period_s": 2.0,
            "health_check_timeout_s": 30.0,
        }
        if self.autoscale is None:
            options["num_replicas"] = self.replicas
        else:
            low, high = self.autoscale
            options["autoscaling_config"] = {
                "min_replicas": low, "max_replicas": high, "initial_replicas": low,
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s,
                "metrics_interval_s": self.autoscale_metrics_interval_s,
                "look_back_period_s": max(2 * self.autoscale_metrics_interval_s, 2.0),
            }
        return options

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (a KubeRay manifest's `args`, a Serve config file); `from_dict` reads it back."""
        out = dataclasses.asdict(self)
        out["autoscale"] = list(self.autoscale) if self.autoscale else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClusterConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InvalidParameterError(f"unknown cluster setting(s) {sorted(unknown)}; known: {sorted(known)}")
        data = dict(data)
        if data.get("autoscale") is not None:
            data["autoscale"] = tuple(data["autoscale"])
        return cls(**data)
