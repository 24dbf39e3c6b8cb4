"""Gateway: the deployment table, the shared proxy and the ledger, built once from a config file."""

from __future__ import annotations

import asyncio
import datetime as dt
import time

try:
    import aiohttp  # noqa: F401 - the proxy's clients; checked here so a missing extra is one clear line
    import httptools  # noqa: F401
except ImportError:
    from selfhost.gateway.config import GatewayConfigError

    raise GatewayConfigError("the gateway needs aiohttp for its remote models: pip install 'selfhost[gateway]'") from None

from selfhost.gateway.admission import Admission
from selfhost.gateway.budgets import KeyBudgets
from selfhost.gateway.config import GatewayConfig
from selfhost.gateway.deployments import DeploymentTable
from selfhost.gateway.health import HealthChecker
from selfhost.gateway.keys import KeyStore
from selfhost.gateway.ledger import Ledger
from selfhost.gateway.local_meter import LocalMeter
from selfhost.gateway.proxy import Proxy
from selfhost.plan.pricing import UsageRecord


class Gateway:
    def __init__(self, config: GatewayConfig):
        self.config = config
        self.started_at = int(time.time())
        self.table = DeploymentTable(config)
        self.ledger = Ledger(config.gateway.ledger)
        self.proxy = Proxy(self.table, config.gateway, self.ledger)
        self.local_meter = LocalMeter(config.local_entries, self.ledger)
        self.keys = KeyStore(self.ledger.engine)
        self.budgets = KeyBudgets(self.ledger)
        self.health: HealthChecker | None = None  # started with the proxy's session, on the event loop
        self.admission = Admission(self.keys, self.budgets, self.table, config.gateway.require_key)

    def attach_metrics(self, registry) -> None:
        from selfhost.gateway.metrics import GatewayMetrics

        self.proxy.metrics = self.local_meter.metrics = GatewayMetrics(registry)

    def local_model_args(self) -> list[str]:
        """The config's local models as `selfhost serve` arguments (NAME=PATH)."""
        return [f"{e.name}={e.path}" for e in self.config.local_entries]

    async def start(self) -> None:
        # The price catalog loads on first use (a second or so) and each deployment's rate card on its first
        # price: pay both before the first request does.
        today = dt.datetime.now(dt.UTC)
        await asyncio.to_thread(lambda: [d.pricer.price(UsageRecord(), today) for d in self.table.all()])
        self.proxy.start()
        settings = self.config.gateway
        if settings.health_check_interval_s is not None:
            self.health = HealthChecker(self.table.all(), self.proxy.client, settings.health_check_interval_s,
                                        settings.cooldown_s, settings.connect_timeout_s)
            self.health.start()

    async def aclose(self) -> None:
        if self.health is not None:
            await self.health.stop()
        await self.proxy.aclose()
        await asyncio.to_thread(self.ledger.close)

    def describe(self) -> str:
        """The start-up banner's lines (no keys; the ledger URL without its password): the deployments and the
        ledger, then what each local model's tokens cost."""
        names = {d.name for d in self.table.all()}
        url = self.ledger.engine.url.render_as_string(hide_password=True)
        line = f"gateway: {len(self.table.all())} remote deployment(s) of {len(names)} model(s), ledger {url}"
        return "\n  ".join([line, *(rate.describe() for rate in self.local_meter.rates.values())])
