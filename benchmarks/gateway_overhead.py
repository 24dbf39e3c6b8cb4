"""What the gateway adds: a fast fake upstream called directly and through `selfhost serve --config`, same run.

    python benchmarks/gateway_overhead.py [--requests 2000] [--concurrency 1 32 128]
    python benchmarks/gateway_overhead.py --quick      # smoke sizes

The upstream answers at once (a fixed chat completion) or streams 64 chunks and a
usage chunk; it runs in its own process, as does the gateway, so neither shares the
load generator's interpreter. For each concurrency: p50 latency and requests/s, direct
and through the gateway, non-streamed and streamed; the requests that failed (direct /
gateway: counted, not timed); and the CPU time the gateway process spent per request
(from /proc, Linux only): on a machine whose cores the load generator, the upstream
and the gateway share, that CPU is what the ratio pays for.
Targets (issue 16): added p50 at concurrency 1 <= 2 ms; through-gateway requests/s
>= 90% of direct at 32 and 128.

LiteLLM's proxy is the peer, run in its own process from its own virtual environment
against the same upstream (target: the gateway >= 2x its requests/s); where it is not
found the output says so:

    python -m venv /tmp/litellm && /tmp/litellm/bin/pip install 'litellm[proxy]'
    python benchmarks/gateway_overhead.py --litellm /tmp/litellm/bin/litellm
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.live_server import free_port

CHUNKS = 64
USAGE = {"prompt_tokens": 12, "completion_tokens": CHUNKS, "total_tokens": 12 + CHUNKS}
BODY = {"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}


# -- the fake upstream (a raw ASGI app: as little of its own overhead as possible) --------------

def _completion() -> bytes:
    return json.dumps({"id": "c", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                    "finish_reason": "stop"}], "usage": USAGE}).encode()


def _stream() -> list[bytes]:
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini",
             "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]}
    events = [f"data: {json.dumps(chunk)}\n\n".encode()] * CHUNKS
    usage = {**chunk, "choices": [], "usage": USAGE}
    return events + [f"data: {json.dumps(usage)}\n\n".encode(), b"data: [DONE]\n\n"]


async def upstream_app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if json.loads(body or b"{}").get("stream"):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for event in _stream():
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    else:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": _completion()})


# -- the load generator -------------------------------------------------------------------------

async def run_load(url: str, requests: int, concurrency: int, stream: bool) -> tuple[float, float, int]:
    """(p50 latency in ms, answered requests/s, failed requests) for `requests` calls, `concurrency` at a time.

    A failed request (an HTTP error status or a dropped connection) is counted, not timed."""
    latencies: list[float] = []
    failed = 0
    remaining = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        async def worker():
            nonlocal failed
            for _ in remaining:
                start = time.perf_counter()
                try:
                    if stream:
                        async with client.stream("POST", url, json={**BODY, "stream": True}) as response:
                            response.raise_for_status()
                            async for _ in response.aiter_raw():
                                pass
                    else:
                        (await client.post(url, json=BODY)).raise_for_status()
                except httpx.HTTPError:
                    failed += 1
                    continue
                latencies.append(time.perf_counter() - start)

        remaining = iter(range(max(2 * concurrency, 16)))  # warm-up: every connection open before timing
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        latencies.clear()
        failed = 0
        remaining = iter(range(requests))
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    p50 = statistics.median(latencies) * 1e3 if latencies else float("nan")
    return p50, len(latencies) / elapsed, failed


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux); None where /proc is not there."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def wait_for(url: str, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"a server exited early (code {proc.returncode})")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.2)
    raise SystemExit(f"{url} did not answer within {timeout_s} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--quick", action="store_true", help="smoke sizes: 100 requests, concurrency 1 and 8")
    parser.add_argument("--litellm", help="LiteLLM's proxy command, from its own venv (default: `litellm` on PATH)")
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)  # internal: run the fake upstream
    args = parser.parse_args()
    if args.serve_upstream:
        import uvicorn

        uvicorn.run(upstream_app, host="127.0.0.1", port=args.serve_upstream, log_level="warning", access_log=False)
        return
    if args.quick:
        args.requests, args.concurrency = 100, [1, 8]

    upstream_port, gateway_port = free_port(), free_port()
    work = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    config = work / "selfhost.toml"
    config.write_text(f'[gateway]\nledger = "sqlite:///{work / "ledger.db"}"\n[[models]]\nname = "gpt"\n'
                      f'url = "http://127.0.0.1:{upstream_port}/v1"\nmodel = "gpt-4o-mini"\n')
    procs = [subprocess.Popen([sys.executable, __file__, "--serve-upstream", str(upstream_port)])]
    try:
        wait_for(f"http://127.0.0.1:{upstream_port}/", procs[0])
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "selfhost.cli", "serve", "--config", str(config), "--port", str(gateway_port),
             "--log-level", "warning"], stdout=subprocess.DEVNULL, env={**os.environ}))
        wait_for(f"http://127.0.0.1:{gateway_port}/health", procs[1])
        direct = f"http://127.0.0.1:{upstream_port}/v1/chat/completions"
        through = f"http://127.0.0.1:{gateway_port}/v1/chat/completions"
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPUs ({cpu_model()}); "
              f"load average {load}; {args.requests} requests per cell")
        print(f"{'mode':<8} {'conc':>5} {'direct p50 ms':>14} {'gateway p50 ms':>15} {'added ms':>9} "
              f"{'direct req/s':>13} {'gateway req/s':>14} {'ratio':>6} {'gateway cpu ms/req':>19} {'failed':>7}")
        gateway_rps = {}
        for stream in (False, True):
            for concurrency in args.concurrency:
                d_p50, d_rps, d_failed = asyncio.run(run_load(direct, args.requests, concurrency, stream))
                cpu_before = cpu_seconds(procs[1].pid)
                g_p50, g_rps, g_failed = asyncio.run(run_load(through, args.requests, concurrency, stream))
                cpu_after = cpu_seconds(procs[1].pid)
                # The warm-up's requests ran through the gateway too: they are counted.
                warmed = args.requests + max(2 * concurrency, 16)
                cpu = "n/a" if cpu_before is None else f"{(cpu_after - cpu_before) * 1e3 / warmed:.2f}"
                print(f"{'stream' if stream else 'json':<8} {concurrency:>5} {d_p50:>14.2f} {g_p50:>15.2f} "
                      f"{g_p50 - d_p50:>9.2f} {d_rps:>13.0f} {g_rps:>14.0f} {g_rps / d_rps:>6.2f} {cpu:>19} "
                      f"{f'{d_failed}/{g_failed}':>7}")
                gateway_rps[stream, concurrency] = g_rps
        procs[1].terminate()  # idle, but the peer gets the machine to itself
        procs[1].wait(timeout=10)
        litellm = args.litellm or shutil.which("litellm")
        if litellm is None:
            print("LiteLLM's proxy was not found: the peer comparison was skipped (install it in a venv of its own, "
                  "python -m venv /tmp/litellm && /tmp/litellm/bin/pip install 'litellm[proxy]', then pass "
                  "--litellm /tmp/litellm/bin/litellm).")
            return
        peer_port = free_port()
        procs.append(start_litellm(litellm, work, upstream_port, peer_port))
        wait_for(f"http://127.0.0.1:{peer_port}/health/liveliness", procs[-1], timeout_s=240)
        peer = f"http://127.0.0.1:{peer_port}/v1/chat/completions"
        print(f"LiteLLM {litellm_version(litellm)} proxy, same upstream:")
        print(f"{'mode':<8} {'conc':>5} {'litellm p50 ms':>15} {'litellm req/s':>14} {'gateway req/s':>14} "
              f"{'gateway / litellm':>18} {'failed':>7}")
        for stream in (False, True):
            for concurrency in args.concurrency:
                l_p50, l_rps, l_failed = asyncio.run(run_load(peer, args.requests, concurrency, stream))
                g_rps = gateway_rps[stream, concurrency]
                print(f"{'stream' if stream else 'json':<8} {concurrency:>5} {l_p50:>15.2f} {l_rps:>14.0f} "
                      f"{g_rps:>14.0f} {g_rps / l_rps if l_rps else float('inf'):>18.2f} {l_failed:>7}")
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)


def start_litellm(command: str, work: Path, upstream_port: int, port: int) -> subprocess.Popen:
    """LiteLLM's proxy in its own process, one model routed to the fake upstream, no database, no telemetry.

    Without a key, like the selfhost gateway here (both listen on loopback only)."""
    config = work / "litellm.yaml"
    config.write_text("model_list:\n  - model_name: gpt\n    litellm_params:\n      model: openai/gpt-4o-mini\n"
                      f"      api_base: http://127.0.0.1:{upstream_port}/v1\n      api_key: unused\n"
                      "litellm_settings:\n  telemetry: false\n")
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
           "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true"}
    return subprocess.Popen([command, "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
                             "--num_workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def litellm_version(command: str) -> str:
    python = Path(command).with_name("python")
    if not python.exists():
        return "(version unknown)"
    probe = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
                           check=False, capture_output=True, text=True, timeout=60)
    return probe.stdout.strip() or "(version unknown)"


if __name__ == "__main__":
    main()
