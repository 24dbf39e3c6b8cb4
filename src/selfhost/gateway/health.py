"""Active health checks: every deployment's `GET /models`, on a timer.

Passive checks (a failed request cools its deployment down) find a dead upstream
only by failing a client's first attempt; the probe finds it first, and ends a
cooldown early once the upstream answers again. A probe that fails marks the
deployment failed exactly as a request would.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from selfhost.gateway.deployments import Deployment
from selfhost.gateway.upstream_http import TRANSPORT_ERRORS

log = logging.getLogger("selfhost.gateway")


class HealthChecker:
    def __init__(self, deployments: list[Deployment], client: aiohttp.ClientSession, interval_s: float,
                 cooldown_s: float, timeout_s: float):
        self.deployments, self.client = deployments, client
        self.interval_s, self.cooldown_s, self.timeout_s = interval_s, cooldown_s, timeout_s
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await asyncio.gather(*(self.probe(d) for d in self.deployments))

    async def probe(self, deployment: Deployment) -> bool:
        headers = {"Authorization": f"Bearer {deployment.api_key}"} if deployment.api_key else {}
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            async with self.client.get(f"{deployment.url}/models", headers=headers, timeout=timeout,
                                       **deployment.via_proxy) as response:
                healthy = response.status < 500 and response.status != 429
        except TRANSPORT_ERRORS:
            healthy = False
        if healthy and deployment.failures:
            log.info("deployment %s answers its health check again; back in rotation", deployment.id)
            deployment.mark_healthy()
        elif not healthy:
            if not deployment.failures:
                log.warning("deployment %s failed its health check; cooling down", deployment.id)
            deployment.mark_failed(self.cooldown_s)
        return healthy
