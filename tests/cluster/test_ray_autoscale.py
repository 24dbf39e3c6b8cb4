"""Autoscaling through Ray Serve: 1 -> 2 replicas under a queue, back to 1 when idle (short delays)."""

from __future__ import annotations

import random
import threading

import httpx
import pytest

from tests.cluster.conftest import ServeApp

pytest.importorskip("ray")


def test_scales_up_under_a_queue_and_down_when_idle(ray_instance, cluster_model):
    from selfhost.cluster.config import ClusterConfig

    cluster = ClusterConfig(autoscale=(1, 2), target_ongoing_requests=2, upscale_delay_s=1, downscale_delay_s=3,
                            autoscale_metrics_interval_s=0.5, app_name="scale")
    app = ServeApp(cluster_model, cluster)
    try:
        assert app.running_replicas() == 1
        stop = threading.Event()

        def keep_busy(seed: int) -> None:
            rng = random.Random(seed)
            while not stop.is_set():
                prompt = [rng.randrange(3, 500) for _ in range(12)]
                httpx.post(f"{app.url}/v1/completions", timeout=120, json={
                    "model": "tiny", "prompt": prompt, "max_tokens": 200, "ignore_eos": True}).raise_for_status()

        clients = [threading.Thread(target=keep_busy, args=(i,), daemon=True) for i in range(8)]
        for client in clients:
            client.start()
        try:
            app.wait_for(lambda: app.running_replicas() == 2, timeout_s=90, what="a second replica under load")
        finally:
            stop.set()
            for client in clients:
                client.join(timeout=120)
        app.wait_for(lambda: app.running_replicas() == 1, timeout_s=90, what="scaling back to one replica")
    finally:
        app.close()
