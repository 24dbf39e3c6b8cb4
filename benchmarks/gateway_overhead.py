"""What the gateway adds: a fast fake upstream called directly and through `selfhost serve --config`, same run.

    python benchmarks/gateway_overhead.py [--requests 2000] [--concurrency 1 32 128] [--repeats 3]
    python benchmarks/gateway_overhead.py --quick      # smoke sizes
    python benchmarks/gateway_overhead.py --pin        # 4+ CPUs: upstream, proxy and load generator apart

The upstream answers at once (a fixed chat completion) or streams 64 chunks and a
usage chunk; it runs in its own process, as does the gateway. Each cell's load comes
from a fresh load-generator process (aiohttp by default; `--client httpx` is the
generator of the first figures, which spent 3-4 ms of CPU a request itself): the same
code, requests and settings whether it calls the upstream directly or through the
gateway. Direct and gateway runs alternate (ABBA) `--repeats` times; the table shows
medians, the ratio's spread, the failed requests (direct / gateway: counted, not
timed), and the CPU each process spent per request (from /proc, Linux only): where
the load generator, the upstream and the gateway share the cores, the ratio is the
share of CPU the gateway takes, and those columns say what it pays for.
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
from dataclasses import dataclass
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


# -- the load generator: its own process, the same code and settings for every target -----------

def load_main(url: str, requests: int, concurrency: int, stream: bool, client: str) -> None:
    """Print one JSON line: p50 latency (ms), answered requests/s, failed requests, requests sent (warm-up
    included) and this process's CPU seconds for them."""
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    if client == "aiohttp":
        import aiohttp  # noqa: F401 - imported before the CPU clock starts
    cpu_before = time.process_time()
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        load = run_load_aiohttp if client == "aiohttp" else run_load_httpx
        p50, rps, failed = runner.run(load(url, requests, concurrency, stream))
    print(json.dumps({"p50_ms": p50, "rps": rps, "failed": failed, "sent": requests + warm_up(concurrency),
                      "cpu_s": time.process_time() - cpu_before}))


def warm_up(concurrency: int) -> int:
    return max(2 * concurrency, 16)  # every connection open before timing


async def timed(requests: int, concurrency: int, call) -> tuple[float, float, int]:
    """(p50 latency in ms, answered requests/s, failed requests): `call()` `requests` times, `concurrency` at a
    time, after a warm-up. `call` returns False for a failed request (counted, not timed)."""
    latencies: list[float] = []
    failed = 0

    async def worker(remaining):
        nonlocal failed
        for _ in remaining:
            start = time.perf_counter()
            if await call():
                latencies.append(time.perf_counter() - start)
            else:
                failed += 1

    remaining = iter(range(warm_up(concurrency)))
    await asyncio.gather(*(worker(remaining) for _ in range(concurrency)))
    latencies.clear()
    failed = 0
    remaining = iter(range(requests))
    start = time.perf_counter()
    await asyncio.gather(*(worker(remaining) for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    p50 = statistics.median(latencies) * 1e3 if latencies else float("nan")
    return p50, len(latencies) / elapsed, failed


async def run_load_aiohttp(url: str, requests: int, concurrency: int, stream: bool) -> tuple[float, float, int]:
    import aiohttp

    body = json.dumps({**BODY, "stream": True} if stream else BODY).encode()
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as client:
        async def call() -> bool:
            try:
                async with client.post(url, data=body, headers=headers) as response:
                    if stream:
                        async for _ in response.content.iter_any():
                            pass
                    else:
                        await response.read()
                    return response.status == 200
            except (TimeoutError, aiohttp.ClientError):
                return False

        return await timed(requests, concurrency, call)


async def run_load_httpx(url: str, requests: int, concurrency: int, stream: bool) -> tuple[float, float, int]:
    """The load generator of the first figures (~3-4 ms of its own CPU a request on the 2-core VM)."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        async def call() -> bool:
            try:
                if stream:
                    async with client.stream("POST", url, json={**BODY, "stream": True}) as response:
                        response.raise_for_status()
                        async for _ in response.aiter_raw():
                            pass
                else:
                    (await client.post(url, json=BODY)).raise_for_status()
            except httpx.HTTPError:
                return False
            return True

        return await timed(requests, concurrency, call)


@dataclass
class Cell:
    p50_ms: float
    rps: float
    failed: int
    client_cpu_ms: float  # the load generator's CPU per request
    upstream_cpu_ms: float | None  # the fake upstream's
    gateway_cpu_ms: float | None  # the proxy's (None when called directly)


def measure(url: str, args, concurrency: int, stream: bool, upstream_pid: int, proxy_pid: int | None,
            cpus: set[int] | None) -> Cell:
    """One cell from a fresh load-generator process (pinned to `cpus` where given)."""
    command = [sys.executable, __file__, "--load", url, str(args.requests), str(concurrency), str(int(stream)),
               args.client]
    before = {pid: cpu_seconds(pid) for pid in (upstream_pid, proxy_pid) if pid is not None}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    if cpus:
        os.sched_setaffinity(proc.pid, cpus)
    out, _ = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"the load generator failed (code {proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    sent = result["sent"]

    def per_request(pid):
        if pid is None or before.get(pid) is None:
            return None
        return (cpu_seconds(pid) - before[pid]) * 1e3 / sent

    return Cell(result["p50_ms"], result["rps"], result["failed"], result["cpu_s"] * 1e3 / sent,
                per_request(upstream_pid), per_request(proxy_pid))


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


def machine() -> str:
    """The CPU model as lscpu names it (else /proc/cpuinfo), and how many CPUs this process may use."""
    model = None
    if shutil.which("lscpu"):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                     None)
    return f"{len(os.sched_getaffinity(0))} CPUs ({model or cpu_model()})"


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="timed requests per cell and repeat")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved direct/gateway pairs per cell (median)")
    parser.add_argument("--client", choices=("aiohttp", "httpx"), default="aiohttp",
                        help="the load generator's HTTP client (httpx: the first figures' generator)")
    parser.add_argument("--pin", action="store_true",
                        help="4+ CPUs: the upstream on the first CPU, the proxy on the second, the load generator on "
                             "the rest")
    parser.add_argument("--quick", action="store_true", help="smoke sizes: 100 requests, concurrency 1 and 8, once")
    parser.add_argument("--litellm", help="LiteLLM's proxy command, from its own venv (default: `litellm` on PATH)")
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)  # internal: run the fake upstream
    parser.add_argument("--load", nargs=5, help=argparse.SUPPRESS)  # internal: URL REQUESTS CONCURRENCY STREAM CLIENT
    args = parser.parse_args()
    if args.serve_upstream:
        import uvicorn

        uvicorn.run(upstream_app, host="127.0.0.1", port=args.serve_upstream, log_level="warning", access_log=False)
        return
    if args.load:
        url, requests, concurrency, stream, client = args.load
        load_main(url, int(requests), int(concurrency), stream == "1", client)
        return
    if args.quick:
        args.requests, args.concurrency, args.repeats = 100, [1, 8], 1

    cpus = sorted(os.sched_getaffinity(0))
    if args.pin and len(cpus) < 4:
        raise SystemExit(f"--pin needs 4 CPUs or more; this process may use {len(cpus)}")
    upstream_cpus, proxy_cpus, client_cpus = ({cpus[0]}, {cpus[1]}, set(cpus[2:])) if args.pin else (None,) * 3

    def start(command: list[str], pinned: set[int] | None, **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(command, **kwargs)
        if pinned:
            os.sched_setaffinity(proc.pid, pinned)
        return proc

    upstream_port, gateway_port = free_port(), free_port()
    work = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    config = work / "selfhost.toml"
    config.write_text(f'[gateway]\nledger = "sqlite:///{work / "ledger.db"}"\n[[models]]\nname = "gpt"\n'
                      f'url = "http://127.0.0.1:{upstream_port}/v1"\nmodel = "gpt-4o-mini"\n')
    procs = [start([sys.executable, __file__, "--serve-upstream", str(upstream_port)], upstream_cpus)]
    try:
        wait_for(f"http://127.0.0.1:{upstream_port}/", procs[0])
        procs.append(start([sys.executable, "-m", "selfhost.cli", "serve", "--config", str(config), "--port",
                            str(gateway_port), "--log-level", "warning"], proxy_cpus, stdout=subprocess.DEVNULL))
        wait_for(f"http://127.0.0.1:{gateway_port}/health", procs[1])
        upstream, gateway = procs
        direct = f"http://127.0.0.1:{upstream_port}/v1/chat/completions"
        through = f"http://127.0.0.1:{gateway_port}/v1/chat/completions"
        placement = (f"pinned: upstream CPU {cpus[0]}, proxy CPU {cpus[1]}, load generator CPUs {cpus[2]}-{cpus[-1]}"
                     if args.pin else "not pinned: the load generator, the upstream and the proxy share every CPU")
        print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {machine()}; load average {load_average()}")
        print(f"load generator: {args.client}, its own process, the same for every target; {placement}; "
              f"{args.requests} requests per cell, {args.repeats} interleaved repeat(s), medians")
        print(f"{'mode':<7} {'conc':>4} {'direct p50':>10} {'gw p50':>8} {'added':>7} {'direct/s':>9} {'gw/s':>7} "
              f"{'ratio':>6} {'(min-max)':>11} {'cpu ms/req: client':>19} {'upstream':>9} {'gateway':>8} "
              f"{'failed':>7}")
        gateway_rps = {}
        for stream in (False, True):
            for concurrency in args.concurrency:
                pairs = []
                for repeat in range(args.repeats):  # ABBA: neither path always runs first
                    order = (direct, through) if repeat % 2 == 0 else (through, direct)
                    cells = {url: measure(url, args, concurrency, stream, upstream.pid,
                                          gateway.pid if url == through else None, client_cpus) for url in order}
                    pairs.append((cells[direct], cells[through]))
                d = [pair[0] for pair in pairs]
                g = [pair[1] for pair in pairs]
                ratios = [gc.rps / dc.rps for dc, gc in pairs]
                d_p50, g_p50 = (statistics.median(c.p50_ms for c in cs) for cs in (d, g))
                gateway_rps[stream, concurrency] = statistics.median(c.rps for c in g)
                print(f"{'stream' if stream else 'json':<7} {concurrency:>4} {d_p50:>10.2f} {g_p50:>8.2f} "
                      f"{g_p50 - d_p50:>7.2f} {statistics.median(c.rps for c in d):>9.0f} "
                      f"{gateway_rps[stream, concurrency]:>7.0f} {statistics.median(ratios):>6.2f} "
                      f"{f'{min(ratios):.2f}-{max(ratios):.2f}':>11} "
                      f"{_median_text(c.client_cpu_ms for c in g):>19} {_median_text(c.upstream_cpu_ms for c in d):>9} "
                      f"{_median_text(c.gateway_cpu_ms for c in g):>8} "
                      f"{f'{sum(c.failed for c in d)}/{sum(c.failed for c in g)}':>7}")
        print(f"load average at the end {load_average()}; cpu ms/req: per request sent (warm-up included), the "
              "client's and the gateway's through the gateway, the upstream's direct")
        gateway.terminate()  # idle, but the peer gets the machine to itself
        gateway.wait(timeout=10)
        litellm = args.litellm or shutil.which("litellm")
        if litellm is None:
            print("LiteLLM's proxy was not found: the peer comparison was skipped (install it in a venv of its own, "
                  "python -m venv /tmp/litellm && /tmp/litellm/bin/pip install 'litellm[proxy]', then pass "
                  "--litellm /tmp/litellm/bin/litellm).")
            return
        peer_port = free_port()
        procs.append(start_litellm(litellm, work, upstream_port, peer_port, proxy_cpus))
        wait_for(f"http://127.0.0.1:{peer_port}/health/liveliness", procs[-1], timeout_s=240)
        peer = f"http://127.0.0.1:{peer_port}/v1/chat/completions"
        print(f"LiteLLM {litellm_version(litellm)} proxy, same upstream, same load generator:")
        print(f"{'mode':<7} {'conc':>4} {'litellm p50':>11} {'litellm/s':>10} {'gw/s':>7} {'gw / litellm':>13} "
              f"{'litellm cpu ms/req':>19} {'failed':>7}")
        for stream in (False, True):
            for concurrency in args.concurrency:
                cells = [measure(peer, args, concurrency, stream, upstream.pid, procs[-1].pid, client_cpus)
                         for _ in range(args.repeats)]
                l_rps = statistics.median(c.rps for c in cells)
                g_rps = gateway_rps[stream, concurrency]
                print(f"{'stream' if stream else 'json':<7} {concurrency:>4} "
                      f"{statistics.median(c.p50_ms for c in cells):>11.2f} {l_rps:>10.0f} {g_rps:>7.0f} "
                      f"{g_rps / l_rps if l_rps else float('inf'):>13.2f} "
                      f"{_median_text(c.gateway_cpu_ms for c in cells):>19} {sum(c.failed for c in cells):>7}")
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)


def _median_text(values) -> str:
    values = [v for v in values if v is not None]
    return f"{statistics.median(values):.2f}" if values else "n/a"


def start_litellm(command: str, work: Path, upstream_port: int, port: int,
                  cpus: set[int] | None) -> subprocess.Popen:
    """LiteLLM's proxy in its own process, one model routed to the fake upstream, no database, no telemetry.

    Without a key, like the selfhost gateway here (both listen on loopback only)."""
    config = work / "litellm.yaml"
    config.write_text("model_list:\n  - model_name: gpt\n    litellm_params:\n      model: openai/gpt-4o-mini\n"
                      f"      api_base: http://127.0.0.1:{upstream_port}/v1\n      api_key: unused\n"
                      "litellm_settings:\n  telemetry: false\n")
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
           "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true"}
    proc = subprocess.Popen([command, "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
                             "--num_workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    if cpus:
        os.sched_setaffinity(proc.pid, cpus)
    return proc


def litellm_version(command: str) -> str:
    python = Path(command).with_name("python")
    if not python.exists():
        return "(version unknown)"
    probe = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
                           check=False, capture_output=True, text=True, timeout=60)
    return probe.stdout.strip() or "(version unknown)"


if __name__ == "__main__":
    main()
