"""Scale on paper: a Poisson workload replayed against N simulated selfhost replicas.

    python benchmarks/scale_sim.py --measure              # fit this machine's step-time model (1 thread)
    python benchmarks/scale_sim.py --rate 6 --replicas 1 2 4 --prompt 128 --output 64
    python benchmarks/scale_sim.py --rate 4 --requests 64 --replicas 2 --kv-blocks 96 128 170 256

Each replica is the engine's scheduler in miniature: every step it decodes one token for
each running sequence and spends the rest of its token budget (max_num_batched_tokens) on
prompt chunks of waiting ones, first come first served, up to max_num_seqs; a step costs
the measured model  t = base_s + decode_s * decode_rows + prefill_s * prompt_tokens  (one
forward pass over a flat batch, as in selfhost). Requests go to the replica with the fewest
in flight (what the prefix router does for prompts it has not seen). Prefix caching is
modelled as a share of prompt tokens not computed (--prefix-hit), or, with --kv-blocks, on a
shared-prompt workload (each request one of --system-prompts system prompts plus a question of
its own) where each replica keeps a prefix cache in the engine's own BlockManager and requests
are routed by the cluster's PrefixTable or round-robin. The printout is what a real run prints
(benchmarks/scale_out.py): requests/s, output tokens/s, TTFT p50/p99, hit rates.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from selfhost.cluster.config import ClusterConfig
from selfhost.cluster.prefix_table import PrefixTable, prefix_keys
from selfhost.engine.block_manager import BlockManager

BLOCK_TOKENS = 16  # the engine's KV block

# The benchmark model: a ~14M-parameter random Llama, small enough that one CPU core serves a batch
# at a few hundred tokens/s, so scale-out runs take minutes (the 125M model of the other benchmarks
# would take an hour on one core per replica).
SCALE_LLAMA = {"vocab_size": 4096, "hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 6,
               "num_attention_heads": 6, "num_key_value_heads": 2, "max_position_embeddings": 2048,
               "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}


@dataclass(frozen=True)
class StepModel:
    """Seconds per engine step, linear in its decode rows and prompt tokens (fit by `measure`)."""

    base_s: float
    decode_s: float  # per running sequence decoding one token
    prefill_s: float  # per prompt token computed

    def step_s(self, decode_rows: int, prompt_tokens: int) -> float:
        return self.base_s + self.decode_s * decode_rows + self.prefill_s * prompt_tokens


@dataclass
class _Seq:
    arrival: float
    prompt_left: int
    output_left: int
    first_token: float | None = None
    done: float | None = None
    # With a modelled prefix cache: the prompt, and the fields the engine's BlockManager keeps on a sequence.
    token_ids: list[int] | None = None
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    num_computed_tokens: int = 0
    cache_root = None
    needs_prompt_logprobs = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class _Replica:
    waiting: list[_Seq] = field(default_factory=list)
    running: list[_Seq] = field(default_factory=list)
    busy_until: float = 0.0
    cache: BlockManager | None = None  # the engine's own block manager, when prefix caching is modelled

    @property
    def in_flight(self) -> int:
        return len(self.waiting) + len(self.running)

    def admit(self, seq: _Seq) -> bool:
        """Take the cached prefix and KV room for the whole request, as the engine does (False: no room yet)."""
        if self.cache is None:
            return True
        self.cache.match_prefix(seq)
        room = len(seq.token_ids) + seq.output_left - seq.num_computed_tokens
        if not self.cache.can_grow(seq, room):
            self.cache.free(seq)
            return False
        self.cache.record_admission(seq)
        self.cache.grow(seq, room)
        seq.prompt_left = len(seq.token_ids) - seq.num_computed_tokens
        return True

    def prefilled(self, seq: _Seq) -> None:
        """The prompt is computed: its full blocks become shareable."""
        if self.cache is not None:
            seq.num_computed_tokens = len(seq.token_ids)
            self.cache.commit_full_blocks(seq)

    def finish(self, seq: _Seq, output_ids: list[int]) -> None:
        """Output blocks are cached too, then every block goes back (cached ones stay until evicted)."""
        if self.cache is not None:
            seq.token_ids = seq.token_ids + output_ids
            seq.num_computed_tokens = len(seq.token_ids)
            self.cache.commit_full_blocks(seq)
            self.cache.free(seq)


def simulate(model: StepModel, replicas: int, rate: float, num_requests: int, prompt_tokens: int,
             output_tokens: int, prefix_hit: float = 0.0, max_num_seqs: int = 64, max_batched_tokens: int = 1024,
             seed: int = 0, arrivals: list[float] | None = None, prompts: list[list[int]] | None = None,
             kv_blocks: int | None = None, routing: str = "prefix",
             imbalance: int = ClusterConfig.routing_imbalance, overhead_s: float = 0.0) -> dict:
    """Replay `num_requests` Poisson arrivals at `rate`/s (or the given arrival times).

    Without `prompts`, every request has `prompt_tokens` of which a share `prefix_hit` is served from
    cache. With `prompts` (token ids, one per request) each replica keeps a prefix cache of `kv_blocks`
    KV blocks in the engine's own BlockManager, requests are routed by `routing` ("prefix": the
    cluster's PrefixTable, as the prefix-aware router; "round_robin"), and the figures include the
    cluster-wide prefix hit rate and the requests each replica served. `overhead_s`: what a request
    spends outside the engine (HTTP, proxy, front end, Ray hops; scale_out.py measures it on a lone
    request), added to its first token and its end. It is latency only: the CPU that path takes from
    the replicas on a shared machine is not modelled.
    """
    rng = random.Random(seed)
    if arrivals is None:
        now, arrivals = 0.0, []
        for _ in range(num_requests):
            now += rng.expovariate(rate) if rate > 0 else 0.0
            arrivals.append(now)
    if prompts is None:
        computed_prompt = max(1, round(prompt_tokens * (1 - prefix_hit)))
        seqs = [_Seq(t, computed_prompt, output_tokens) for t in arrivals]
    else:
        assert kv_blocks is not None and len(prompts) == len(arrivals), "prompts need kv_blocks and one arrival each"
        longest = max(map(len, prompts)) + output_tokens
        if -(-longest // BLOCK_TOKENS) > kv_blocks:
            raise ValueError(f"kv_blocks={kv_blocks} cannot hold one request of {longest} tokens")
        seqs = [_Seq(t, len(p), output_tokens, token_ids=list(p)) for t, p in zip(arrivals, prompts)]
    pool = [_Replica(cache=BlockManager(kv_blocks, BLOCK_TOKENS) if prompts is not None else None)
            for _ in range(replicas)]
    table, turn, served = PrefixTable(), itertools.count(), [0] * replicas
    unique_ids = itertools.count(-1, -1)  # output tokens: never shared with another request
    busy_s = 0.0  # every replica's steps together
    events = [(t, 0, i) for i, t in enumerate(arrivals)]  # (time, kind 0 = arrival / 1 = step end, index)
    heapq.heapify(events)
    while events:
        now, kind, index = heapq.heappop(events)
        if kind == 0:
            if routing == "round_robin":
                target = next(turn) % replicas
            else:
                keys = prefix_keys(seqs[index].token_ids) if prompts is not None else []
                target = table.route(keys, {r: pool[r].in_flight for r in range(replicas)}, imbalance)
            served[target] += 1
            pool[target].waiting.append(seqs[index])
            if pool[target].busy_until <= now:
                heapq.heappush(events, (now, 1, target))
            continue
        replica = pool[index]
        if replica.busy_until > now:
            continue  # a step is under way; its end schedules the next
        budget = max_batched_tokens - len(replica.running)
        while replica.waiting and len(replica.running) < max_num_seqs and budget > 0:
            if not replica.admit(replica.waiting[0]):
                break  # first come, first served: the head waits for KV room
            replica.running.append(replica.waiting.pop(0))
            budget -= replica.running[-1].prompt_left
        decode = [s for s in replica.running if s.prompt_left == 0]
        budget, prefill = max_batched_tokens - len(decode), 0
        for s in replica.running:
            if s.prompt_left and budget > 0:
                chunk = min(s.prompt_left, budget)
                s.prompt_left -= chunk
                budget -= chunk
                prefill += chunk
                if s.prompt_left == 0:
                    replica.prefilled(s)
        if not decode and not prefill:
            continue
        end = now + model.step_s(len(decode), prefill)
        busy_s += end - now
        for s in replica.running:
            if s.prompt_left == 0 and (s in decode or s.first_token is None):
                s.output_left -= 1
                s.first_token = s.first_token if s.first_token is not None else end
                if s.output_left == 0:
                    s.done = end
                    replica.finish(s, [next(unique_ids) for _ in range(output_tokens)])
        replica.running = [s for s in replica.running if s.done is None]
        replica.busy_until = end
        heapq.heappush(events, (end, 1, index))
    out = summarize([(s.arrival, s.first_token + overhead_s, s.done + overhead_s) for s in seqs], output_tokens)
    out["busy_s"] = busy_s
    if prompts is not None:
        queried = sum(r.cache.prefix_queried_tokens for r in pool)
        out["hit_rate"] = sum(r.cache.prefix_hit_tokens for r in pool) / queried if queried else 0.0
        out["served"] = served
    return out


def simulate_on_cores(model: StepModel, replicas: int, cores: float, serving_cpu_s_per_token: float,
                      *args, iterations: int = 14, **kwargs) -> dict:
    """`simulate` where the replicas share `cores` with the serving path (HTTP proxy, front end, Ray, the
    load generator), which spends `serving_cpu_s_per_token` of CPU per streamed output token (scale_out.py
    measures it per run). Every step stretches by one factor s >= 1 (each replica gets 1/s of a core while
    busy), the least for which the replicas' CPU and the serving path's fit the cores:
    busy(s) / wall(s) / s + throughput(s) x cost <= cores (bisection; the left side falls as s grows). A uniform slow-down, not a scheduler: it puts the serving
    path's CPU into the throughput figure, which plain `simulate` leaves out. The result carries
    `cpu_slowdown`."""
    def run(s: float) -> dict:
        out = simulate(StepModel(model.base_s * s, model.decode_s * s, model.prefill_s * s), replicas, *args,
                       **kwargs)
        out["cpu_slowdown"] = s
        return out

    def fits(out: dict) -> bool:
        # A replica whose steps run s times slower holds 1/s of a core while busy.
        replicas_cores = out["busy_s"] / out["wall_s"] / out["cpu_slowdown"]
        return replicas_cores + out["output_tok_s"] * serving_cpu_s_per_token <= cores

    best = run(1.0)
    if fits(best):
        return best
    low, high = 1.0, 2.0
    while not fits(best := run(high)) and high < 1e3:
        low, high = high, high * 2
    for _ in range(iterations):
        middle = (low + high) / 2
        out = run(middle)
        if fits(out):
            high, best = middle, out
        else:
            low = middle
    return best


def summarize(times: list[tuple[float, float, float]], output_tokens: int) -> dict:
    """(arrival, first token, done) per request -> the figures scale_out.py prints."""
    start = min(t[0] for t in times)
    wall = max(t[2] for t in times) - start
    ttft = sorted(t[1] - t[0] for t in times)
    return {"requests_per_s": len(times) / wall, "output_tok_s": len(times) * output_tokens / wall,
            "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
            "wall_s": wall}


def build_model(out_dir: Path, seed: int = 0) -> Path:
    """The benchmark's random Llama (SCALE_LLAMA), saved once with a tiny tokenizer."""
    if (out_dir / "model.safetensors").exists():
        return out_dir
    import torch
    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.tiny_models import save_tiny_tokenizer

    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**SCALE_LLAMA)).save_pretrained(out_dir)
    save_tiny_tokenizer(out_dir)
    return out_dir


def measure(model_dir: Path, threads: int = 1, prompt_tokens: int = 128) -> StepModel:
    """Fit StepModel from timed engine steps in this process (decode batches, then prompt chunks)."""
    import torch

    from selfhost import LLM, SamplingParams

    torch.set_num_threads(threads)
    llm = LLM(str(model_dir), kv_cache_memory="1GiB", weight_dtype="float32", enable_prefix_caching=False)
    engine, rng = llm.engine, random.Random(0)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(3, SCALE_LLAMA["vocab_size"]) for _ in range(n)]

    decode_points = []
    for batch in (1, 8, 32):
        for i in range(batch):
            engine.add_request(f"d{batch}-{i}", prompt(prompt_tokens), SamplingParams(max_tokens=40, ignore_eos=True))
        while any(s.num_computed_tokens < len(s.prompt_ids) for s in engine.sequences.values()):
            engine.step()
        times = []
        for _ in range(12):
            start = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - start)
        decode_points.append((batch, statistics.median(times)))
        for request_id in list(engine.sequences):
            engine.abort(request_id)
        engine.step() if engine.has_work else None
    prefill_points = []
    for length in (256, 1000):
        times = []
        for i in range(3):
            engine.add_request(f"p{length}-{i}", prompt(length), SamplingParams(max_tokens=1))
            start = time.perf_counter()
            while engine.has_work:
                engine.step()
            times.append(time.perf_counter() - start)
        prefill_points.append((length, statistics.median(times)))
    (b0, t0), (b1, t1) = decode_points[0], decode_points[-1]
    decode_s = (t1 - t0) / (b1 - b0)
    base_s = max(t0 - decode_s * b0, 0.0)
    (n0, p0), (n1, p1) = prefill_points
    prefill_s = (p1 - p0) / (n1 - n0)
    return StepModel(base_s=base_s, decode_s=decode_s, prefill_s=prefill_s)


def shared_prompt_workload(num_requests: int, num_systems: int, system_tokens: int, question_tokens: int,
                           seed: int, vocab_size: int = SCALE_LLAMA["vocab_size"]) -> list[list[int]]:
    """Each request: one of `num_systems` system prompts drawn at random, then a question of its own."""
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(3, vocab_size) for _ in range(n)]

    systems = [tokens(system_tokens) for _ in range(num_systems)]
    return [systems[rng.randrange(num_systems)] + tokens(question_tokens) for _ in range(num_requests)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", action="store_true", help="Fit the step model on this machine first.")
    parser.add_argument("--model-json", type=Path, default=Path("/tmp/selfhost-scale-step-model.json"))
    parser.add_argument("--step-ms", type=float, nargs=3, metavar=("BASE", "DECODE_ROW", "PROMPT_TOKEN"),
                        help="Use this step model (milliseconds) instead of a measured one.")
    parser.add_argument("--rate", type=float, default=8.0, help="Requests per second (Poisson).")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--output", type=int, default=64)
    parser.add_argument("--prefix-hit", type=float, default=0.0)
    parser.add_argument("--kv-blocks", type=int, nargs="+",
                        help="Shared-prompt workload instead: each replica's prefix cache in KV blocks (16 tokens), "
                             "prefix-aware against round-robin routing, for each size given.")
    parser.add_argument("--system-prompts", type=int, default=8)
    parser.add_argument("--system-tokens", type=int, default=384)
    parser.add_argument("--question-tokens", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=4, help="Shared-prompt workload: runs averaged.")
    parser.add_argument("--overhead-ms", type=float, default=0.0,
                        help="Per-request latency outside the engine (scale_out.py prints the measured one).")
    args = parser.parse_args()
    if args.step_ms:
        step = StepModel(*(ms / 1e3 for ms in args.step_ms))
    else:
        if args.measure or not args.model_json.exists():
            model_dir = build_model(Path("/tmp/selfhost-scale-llama"))
            args.model_json.write_text(json.dumps(measure(model_dir).__dict__))
        step = StepModel(**json.loads(args.model_json.read_text()))
    print(f"step model (1 thread): {step.base_s * 1e3:.2f} ms + {step.decode_s * 1e3:.3f} ms/decode row + "
          f"{step.prefill_s * 1e3:.4f} ms/prompt token")
    if args.kv_blocks:
        for n in args.replicas:
            for kv_blocks in args.kv_blocks:
                runs = {routing: [simulate(step, n, args.rate, args.requests, 0, args.output, seed=seed,
                                           prompts=shared_prompt_workload(args.requests, args.system_prompts,
                                                                          args.system_tokens, args.question_tokens,
                                                                          seed),
                                           kv_blocks=kv_blocks, routing=routing, overhead_s=args.overhead_ms / 1e3)
                                  for seed in range(args.seeds)]
                        for routing in ("prefix", "round_robin")}
                hit = {k: statistics.fmean(r["hit_rate"] for r in v) for k, v in runs.items()}
                ttft = {k: statistics.fmean(r["ttft_p50_s"] for r in v) for k, v in runs.items()}
                print(f"{n} replica(s), {kv_blocks} KV blocks each: hit rate {hit['prefix']:.1%} prefix-aware, "
                      f"{hit['round_robin']:.1%} round-robin ({hit['prefix'] / hit['round_robin']:.2f}x); TTFT p50 "
                      f"{ttft['prefix'] * 1e3:.0f} / {ttft['round_robin'] * 1e3:.0f} ms")
        return
    for n in args.replicas:
        r = simulate(step, n, args.rate, args.requests, args.prompt, args.output, args.prefix_hit,
                     overhead_s=args.overhead_ms / 1e3)
        print(f"{n} replica(s): {r['requests_per_s']:.2f} req/s, {r['output_tok_s']:.0f} output tok/s, "
              f"TTFT p50 {r['ttft_p50_s'] * 1e3:.0f} ms, p99 {r['ttft_p99_s'] * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
