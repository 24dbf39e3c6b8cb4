"""The peer runner's pure parts: option parsing, clean environments, agreement, the tables,
the model arithmetic, and one real peer process (transformers on a tiny model) end to end.
No test here depends on how fast this machine is."""

import argparse
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.model_costs import decode_bytes_per_token, prompt_flops
from benchmarks.peers import driver, options, report, vllm_int8
from benchmarks.peers.driver import Peer, PeerRun, clean_environment, pool_rounds, run_peer
from selfhost.bench.machine_limits import MachineLimits
from selfhost.cpu_identity import read_cpu_identity


def test_clean_environment_drops_thread_and_allocator_variables(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("KMP_BLOCKTIME", "0")
    monkeypatch.setenv("LD_PRELOAD", "/lib/x.so")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    monkeypatch.setenv("SOMETHING_ELSE", "kept")
    env = clean_environment({"VLLM_CPU_KVCACHE_SPACE": "4"})
    assert not {"OMP_WAIT_POLICY", "KMP_BLOCKTIME", "LD_PRELOAD", "MKL_NUM_THREADS"} & set(env)
    assert env["SOMETHING_ELSE"] == "kept" and env["VLLM_CPU_KVCACHE_SPACE"] == "4"


def test_list_options_map_spellings_drop_repeats_and_name_the_choices():
    parse = options.list_of(options.DTYPES, "--weight-dtype")
    assert parse("float32, bf16,fp32") == ["fp32", "bf16"]
    with pytest.raises(argparse.ArgumentTypeError, match="'fp16' is not one of"):
        parse("fp16")


def test_no_amx_reaches_every_peer_and_the_probe_through_their_environment(monkeypatch):
    monkeypatch.delenv("SELFHOST_NO_AMX", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    ap = argparse.ArgumentParser()
    options.add_peer_options(ap)
    assert options.keep_amx_off(ap.parse_args([])) == [] and "SELFHOST_NO_AMX" not in clean_environment({})
    with monkeypatch.context() as env:  # keep_amx_off sets os.environ: restored on leaving
        env.setattr(options.os, "environ", dict(options.os.environ))
        lines = options.keep_amx_off(ap.parse_args(["--no-amx"]))
        assert lines and "AMX kept off" in lines[0]
        peer_env = clean_environment({})  # what every peer and the probe start with
        assert peer_env["SELFHOST_NO_AMX"] == "1" and peer_env["ONEDNN_MAX_CPU_ISA"] == "AVX512_CORE_BF16"
        assert not any(f.startswith("amx") for f in read_cpu_identity().isa_flags)
        # vLLM is told the same (vllm_peer.py): its W8A8 rows take the activations of its non-AMX int8 path.
        assert options.vllm_int8_dtype() == "float32"
    assert "SELFHOST_NO_AMX" not in clean_environment({})


def test_peers_follow_the_options(tmp_path):
    ap = argparse.ArgumentParser()
    options.add_peer_options(ap)
    args = ap.parse_args(["--systems", "selfhost,vllm", "--weight-dtype", "bfloat16", "--vllm-dtype", "fp32,bf16"])
    labels = [p.label for p in
              options.selfhost_peers(args, ("decode",)) + options.vllm_peers(args, ("decode",), tmp_path)]
    assert labels == ["selfhost bf16", "vLLM CPU fp32", "vLLM CPU bf16"]
    assert "transformers" not in args.systems
    args = ap.parse_args(["--systems", "vllm", "--vllm-dtype", "bf16", "--vllm-kv-cache-dtype", "auto,fp8"])
    peers = options.vllm_peers(args, ("decode",), tmp_path)
    assert [p.label for p in peers] == ["vLLM CPU bf16", "vLLM CPU bf16 kv fp8"]
    assert [p.settings["kv_cache_dtype"] for p in peers] == ["auto", "fp8"]
    assert not any("model_dir" in p.settings for p in peers)  # the model the job names


def test_int8_rows_run_selfhost_quantization_and_vllm_w8a8_on_a_copy_written_once(tiny_checkpoint, tmp_path):
    model_dir = shutil.copytree(tiny_checkpoint("llama"), tmp_path / "model")  # the copy is written beside it
    ap = argparse.ArgumentParser()
    options.add_peer_options(ap)
    args = ap.parse_args(["--systems", "selfhost,vllm", "--weight-dtype", "fp32,int8", "--vllm-dtype", "int8"])
    selfhost = options.selfhost_peers(args, ("ttft",))
    assert [(p.label, p.weight_precision) for p in selfhost] == [("selfhost fp32", "fp32"), ("selfhost int8", "int8")]
    assert selfhost[1].settings["quantization"] == "int8" and selfhost[0].settings.get("quantization") is None
    (vllm,) = options.vllm_peers(args, ("ttft",), model_dir)
    assert vllm.weight_precision == "int8" and vllm.settings["dtype"] == options.vllm_int8_dtype()
    assert options.vllm_int8_dtype(("avx512f", "amx_bf16", "amx_int8")) == "bfloat16"  # vLLM's AMX int8 kernel
    assert options.vllm_int8_dtype(("avx512f", "avx512_vnni")) == "float32"
    head = "bf16" if options.vllm_int8_dtype() == "bfloat16" else "fp32"
    assert vllm.head_precision == head and selfhost[1].head_precision is None  # vLLM's recipe keeps its head
    copy = Path(vllm.settings["model_dir"])
    assert copy == model_dir / "vllm-w8a8" and (copy / "config.json").exists()
    written = (copy / "model.safetensors").stat().st_mtime_ns
    options.vllm_peers(args, ("ttft",), model_dir)
    assert (copy / "model.safetensors").stat().st_mtime_ns == written  # kept, not rewritten


def test_the_w8a8_copy_holds_int8_rows_that_give_back_the_weights(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file

    model_dir = shutil.copytree(tiny_checkpoint("llama"), tmp_path / "model")
    copy = vllm_int8.w8a8_checkpoint(model_dir)
    original = load_file(next(model_dir.glob("*.safetensors")))
    quantized = load_file(copy / "model.safetensors")
    linear = [n for n in original if n.endswith("_proj.weight")]
    assert linear and all(quantized[n].dtype == torch.int8 for n in linear)
    for name in linear:
        w, q, scale = original[name].float(), quantized[name].float(), quantized[name[:-6] + "weight_scale"]
        assert scale.shape == (w.shape[0], 1)
        assert q.abs().amax(dim=1).eq(127).all()  # each row's largest weight maps to +-127
        torch.testing.assert_close(q * scale, w, atol=float(scale.max()) / 2 + 1e-7, rtol=0)
    kept = [n for n in original if n not in linear]
    assert all(torch.equal(quantized[n], original[n]) for n in kept)  # embeddings, norms, the head
    config = json.loads((copy / "config.json").read_text())
    groups = config["quantization_config"]["config_groups"]["group_0"]
    assert groups["weights"]["strategy"] == "channel" and groups["input_activations"]["dynamic"] is True
    assert config["quantization_config"]["ignore"] == ["lm_head"]
    assert not list(model_dir.glob(".vllm-w8a8-*"))  # no staging folder left behind


def test_agreement_counts_identical_outputs_and_the_shared_leading_tokens():
    reference = [[[1, 2, 3, 4], [5, 6, 7, 8]]]
    assert report.agreement([[[1, 2, 3, 4], [5, 6, 7, 8]]], reference) == "2/2"
    # One output identical, one diverging after 2 of 4 tokens: 6 of 8 leading tokens shared.
    assert report.agreement([[[1, 2, 3, 4], [5, 6, 0, 8]]], reference) == "1/2 (first 75% of tokens same)"


def _run(label, system, precision, tok_s, tokens, error=None, others=0.0):
    peer = Peer(system, label, {}, precision, ("decode",))
    if error:
        return PeerRun(peer, error=error)
    task = {"seconds": [1.0], "output_tokens": [tok_s], "token_ids": [[tokens]], "others_cpu": [others]}
    return PeerRun(peer, result={"tasks": {"decode": task}, "info": {}, "load_avg_end": [0.5, 0, 0],
                                 "load_seconds": 1.0})


def test_speed_table_ratios_fractions_and_a_missing_peer(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "tie_word_embeddings": False}))
    runs = [_run("selfhost fp32", "selfhost", "fp32", 40.0, [1, 2]),
            _run("transformers fp32", "transformers", "fp32", 10.0, [1, 3], others=0.5),
            _run("vLLM CPU bf16", "vllm", "bf16", 0, [], error="no venv")]
    limits = MachineLimits("cpu", (), 2, 2, (0, 0, 0), "", None, read_gb_s=1e-3, matmul_gflop_s={"fp32": 1.0})
    lines = report.speed_table(runs, "decode", report.best_tok_s, "tok/s", lambda v: f"{v:.1f}", True,
                               report.decode_extra_columns(limits, tmp_path))
    header, selfhost, hf, vllm, legend, disturbed, note = lines
    assert "selfhost fp32 speed-up" in header and "of read bandwidth" in header
    assert "4.00x" in hf and "0/1 (first 50% of tokens same)" in hf
    bytes_per_token = decode_bytes_per_token(tmp_path, "fp32")
    assert f"{bytes_per_token * 10.0 / 1e6:.0%}" in hf  # 1 MB/s of read bandwidth in the limits
    assert "not run (1)" in vllm and note == "(1) vLLM CPU bf16 did not run: no venv"
    assert legend.startswith("speed-up: how many times faster")
    assert hf.endswith("50%") and selfhost.endswith("0%")  # others' CPU during the timed runs
    assert disturbed.startswith("warning: other processes took") and disturbed.endswith(": transformers fp32")


def test_model_arithmetic_by_hand(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 10, "tie_word_embeddings": False}))
    # q 8x8, k and v 8x4 each, o 8x8, gate/up/down 3 x 8x16: 576 linear weights; head 10x8.
    assert decode_bytes_per_token(tmp_path, "fp32") == (576 + 80) * 4
    assert decode_bytes_per_token(tmp_path, "bf16") == (576 + 80) * 2
    # vLLM's W8A8 rows: int8 linears (a 2-byte scale per 128 weights) and an fp32 head.
    assert decode_bytes_per_token(tmp_path, "int8", head_precision="fp32") == 576 * (1 + 2 / 128) + 80 * 4
    # 3 tokens: 2*576*3 linear, attention 4*layers*heads*head_dim*(1+2+3), head once.
    assert prompt_flops(tmp_path, 3) == 2 * 576 * 3 + 4 * 1 * 2 * 4 * 6 + 2 * 80


def test_a_transformers_peer_runs_in_its_own_process_and_reports(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("llama")
    task = {"name": "decode", "runs": [[[5, 6, 7]], [[8, 9, 10, 11]]], "warmup_runs": 1, "max_tokens": 3}
    job = {"model_dir": str(model), "threads": 1, "settings": {"batching": "sequential"}, "tasks": [task]}
    peer = Peer("transformers", "transformers fp32", job["settings"], "fp32", ("decode",))
    run = run_peer(peer, lambda: (sys.executable, {}, []), job, tmp_path, timeout_s=300)
    assert run.error is None, run.error
    decode = run.task("decode")
    assert decode["output_tokens"] == [3] and len(decode["token_ids"][0][0]) == 3
    assert 0.0 <= decode["others_cpu"][0] <= 1.0
    assert run.result["info"]["omp_env"] == {}  # selfhost's OMP_WAIT_POLICY did not leak in


def test_a_peer_that_cannot_start_is_a_reason_not_a_crash(tmp_path):
    peer = Peer("vllm", "vLLM CPU fp32", {}, "fp32", ("decode",))

    def missing():
        raise RuntimeError("--vllm-python /nowhere does not exist")

    run = run_peer(peer, missing, {}, tmp_path, timeout_s=5)
    assert run.result is None and run.error == "--vllm-python /nowhere does not exist"


def test_in_process_vllm_gets_the_binding_its_worker_would_get():
    from benchmarks.peers.vllm_peer import VllmUnavailable, _worker_binding

    iomp = _worker_binding("0-1", "/usr/lib/libtcmalloc_minimal.so.4:/venv/lib/libiomp5.so")
    assert iomp == {"OMP_NUM_THREADS": "2", "KMP_AFFINITY": "granularity=fine,explicit,proclist=[0,1]",
                    "KMP_BLOCKTIME": "5", "KMP_TPAUSE": "0"}
    assert _worker_binding("0,2", "/torch/lib/libgomp.so.1") == {"OMP_NUM_THREADS": "2", "GOMP_CPU_AFFINITY": "0 2"}
    assert _worker_binding("3", "")["OMP_PLACES"] == "{3}"
    with pytest.raises(VllmUnavailable, match="expected CPU ids"):
        _worker_binding("0-1|2-3", "")


def test_llama_cpp_is_a_single_stream_peer_with_a_row_per_gguf_type(tmp_path):
    ap = argparse.ArgumentParser()
    options.add_peer_options(ap, options.SINGLE_STREAM_SYSTEMS)
    args = ap.parse_args(["--systems", "selfhost,llama_cpp", "--weight-dtype", "bf16", "--llama-cpp-types", "q8_0,f16"])
    written = []
    peers = options.llama_cpp_peers(args, ("decode", "ttft"), lambda t: written.append(t) or tmp_path / f"m.{t}.gguf")
    assert [(p.label, p.weight_precision, p.settings["type"]) for p in peers] == [
        ("llama.cpp q8_0", "int8", "q8_0"), ("llama.cpp f16", "bf16", "f16")]
    assert written == ["q8_0", "f16"] and peers[0].settings["gguf"] == str(tmp_path / "m.q8_0.gguf")
    # throughput.py batches many requests: llama-cpp-python runs one sequence, so it is not offered there.
    batch = argparse.ArgumentParser()
    options.add_peer_options(batch)
    with pytest.raises(SystemExit):
        batch.parse_args(["--systems", "llama_cpp"])


def test_a_llama_cpp_peer_that_cannot_run_says_why(tmp_path):
    from benchmarks.peers.llama_cpp_peer import LlamaCppUnavailable, launch

    with pytest.raises(LlamaCppUnavailable, match="is not a folder"):
        launch(None, str(tmp_path / "nowhere"), tmp_path / "venv")
    with pytest.raises(LlamaCppUnavailable, match="does not exist"):
        launch(tmp_path / "no-python", None, tmp_path / "venv")


def test_a_llama_cpp_peer_runs_a_selfhost_gguf_greedily_or_names_the_missing_module(tiny_checkpoint, tmp_path):
    import importlib.util

    from selfhost.quant.gguf_export import export_gguf

    model = tiny_checkpoint("llama")
    gguf = tmp_path / "model.f16.gguf"
    export_gguf(model, gguf, "f16")
    task = {"name": "decode", "runs": [[[5, 6, 7]], [[8, 9, 10, 11]]], "warmup_runs": 1, "max_tokens": 3}
    job = {"model_dir": str(model), "threads": 1, "settings": {"gguf": str(gguf), "type": "f16"}, "tasks": [task]}
    peer = Peer("llama_cpp", "llama.cpp f16", job["settings"], "bf16", ("decode",))
    run = run_peer(peer, lambda: (sys.executable, {}, []), job, tmp_path, timeout_s=300)
    if importlib.util.find_spec("llama_cpp") is None:  # the gguf-check extra is not in the test install
        assert run.result is None and "llama_cpp does not import" in run.error
        return
    assert run.error is None, run.error
    assert run.task("decode")["output_tokens"] == [3]
    assert run.result["info"]["n_threads"] == 1


def test_a_peer_venv_that_fails_to_install_raises_the_peers_reason_and_is_not_marked(tmp_path):
    from benchmarks.peers.venvs import is_installed, make_venv

    class Unavailable(RuntimeError):
        pass

    venv = tmp_path / "peer"
    with pytest.raises(Unavailable, match=r"installing nothing-here failed \(.*\); try another index; full log"):
        make_venv(venv, [["install", "--no-index", str(tmp_path / "no-such-package")]], "nothing-here", Unavailable,
                  "try another index")
    assert not is_installed(venv)  # the next run installs again instead of trusting a broken venv


def _round(peer, seconds, error=None):
    run = PeerRun(peer, seconds=1.0)
    if error:
        run.error = error
    else:
        run.result = {"info": {"round": seconds[0]}, "load_seconds": 2.0,
                      "tasks": {"ttft": {"seconds": seconds, "output_tokens": [1] * len(seconds),
                                         "others_cpu": [0.0] * len(seconds), "token_ids": [[[7]]] * len(seconds)}}}
    return run


def test_rounds_run_every_row_in_turn_and_pool_each_rows_timed_runs(monkeypatch, tmp_path):
    peers = [Peer("selfhost", "a", {}, "fp32", ("ttft",)), Peer("vllm", "b", {}, "fp32", ("ttft",))]
    order, clock = [], iter([0.5, 0.9, 0.4, 0.8, 0.6, 0.7])

    def fake_run_peer(peer, launch, job, work_dir, timeout_s):
        order.append((peer.label, work_dir.name))
        return _round(peer, [next(clock)])

    monkeypatch.setattr(driver, "run_peer", fake_run_peer)
    runs = driver.run_peers(peers, {"selfhost": None, "vllm": None}, lambda p: {}, tmp_path, 10, rounds=3)
    assert order == [("a", "round-1"), ("b", "round-1"), ("a", "round-2"), ("b", "round-2"),
                     ("a", "round-3"), ("b", "round-3")]  # interleaved, each round its own folder
    assert [r.task("ttft")["seconds"] for r in runs] == [[0.5, 0.4, 0.6], [0.9, 0.8, 0.7]]
    assert report.best_seconds(runs[0].task("ttft")) == 0.4 and runs[0].seconds == 3.0
    assert runs[0].result["load_seconds"] == 2.0 and runs[0].result["rounds"] == 3
    (line,) = [x for x in report.settings_lines(runs) if x.startswith("  a:")]
    assert line.endswith("load 2 s (the slowest of 3 rounds), processes 3 s")


def test_a_failed_round_is_a_note_and_a_row_with_no_result_keeps_its_error():
    peer = Peer("vllm", "b", {}, "fp32", ("ttft",))
    rounds = [_round(peer, [0.9]), _round(peer, [], error="crashed"), _round(peer, [0.7])]
    pooled = pool_rounds(rounds)
    assert pooled.error is None and pooled.task("ttft")["seconds"] == [0.9, 0.7]
    assert pooled.notes == ["round 2 of 3: crashed"]
    assert rounds[0].result["tasks"]["ttft"]["seconds"] == [0.9]  # the rounds' own results untouched
    failed = pool_rounds([_round(peer, [], error="no venv"), _round(peer, [], error="no venv")])
    assert failed.result is None and failed.error == "no venv"
