"""Structured pruning: identity when nothing is cut, a smaller standard checkpoint that transformers,
GGUF export and the fit planner read, importance that finds a useless layer, and clear refusals."""

import json

import gguf
import pytest
import torch
from safetensors.torch import load_file, save_file

from selfhost.errors import InvalidParameterError
from selfhost.models.loader import load_model, read_config
from selfhost.shrink.importance import Importance, calibration_windows, measure_importance
from selfhost.shrink.prune import PruneConfig, plan_pruning
from selfhost.shrink.prune_run import Calibration, prune
from selfhost.train.attention import BatchCausalAttention
from tests.tiny_models import _CORPUS, make_tiny_checkpoint
from tests.train.conftest import assert_matches_transformers

CPU = torch.device("cpu")
CALIBRATION = Calibration(_CORPUS, window=64, max_windows=4)


def quiet():
    from rich.console import Console

    return Console(quiet=True)


def run_prune(model_dir, out, cfg, calibration=CALIBRATION):
    return prune(str(model_dir), out, cfg, calibration, show_progress=False, console=quiet())


@torch.no_grad()
def logits_of(model_dir, tokens):
    model = load_model(model_dir, torch.float32, CPU)
    hidden = model(tokens, torch.arange(len(tokens)), BatchCausalAttention(1, len(tokens)))
    return model.compute_logits(hidden)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """4 query heads in 2 KV groups, untied head."""
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama") / "m")


def test_pruning_nothing_is_the_identity(llama_dir, tmp_path):
    out = run_prune(llama_dir, tmp_path / "same", PruneConfig(drop_layers=0, mlp_width=1.0, heads=1.0), None)
    tokens = torch.arange(3, 40)
    assert torch.equal(logits_of(out, tokens), logits_of(llama_dir, tokens))
    assert read_config(out)["num_hidden_layers"] == read_config(llama_dir)["num_hidden_layers"]


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_a_pruned_checkpoint_is_smaller_and_transformers_loads_it_like_selfhost(family, tmp_path):
    source = make_tiny_checkpoint(family, tmp_path / "source")
    out = run_prune(source, tmp_path / "pruned", PruneConfig(drop_layers=1, mlp_width=0.5, heads=0.5))
    cfg, before = read_config(out), read_config(source)
    assert cfg["num_hidden_layers"] == before["num_hidden_layers"] - 1
    assert cfg["intermediate_size"] == before["intermediate_size"] // 2
    assert cfg["num_attention_heads"] == before["num_attention_heads"] // 2
    # The config describes the tensors exactly: every projection has the shape its numbers imply.
    tensors = load_file(out / "model.safetensors")
    D, h = cfg["head_dim"], cfg["hidden_size"]
    for i in range(cfg["num_hidden_layers"]):
        prefix = f"model.layers.{i}"
        assert tensors[f"{prefix}.self_attn.q_proj.weight"].shape == (cfg["num_attention_heads"] * D, h)
        assert tensors[f"{prefix}.self_attn.k_proj.weight"].shape == (cfg["num_key_value_heads"] * D, h)
        assert tensors[f"{prefix}.self_attn.o_proj.weight"].shape == (h, cfg["num_attention_heads"] * D)
        assert tensors[f"{prefix}.mlp.down_proj.weight"].shape == (h, cfg["intermediate_size"])
    assert not any(name.startswith(f"model.layers.{cfg['num_hidden_layers']}.") for name in tensors)
    assert_matches_transformers(out, "To be, or not to be, that is the question", tol=1e-4)


def test_gqa_keeps_every_kv_head_and_the_best_query_head_of_each_group(llama_dir):
    spec = load_model(llama_dir, torch.float32, CPU).spec  # 4 heads, 2 KV groups of 2, 3 layers
    scores = torch.tensor([[1.0, 5.0, 9.0, 2.0], [7.0, 1.0, 1.0, 8.0], [3.0, 4.0, 0.5, 0.1]])
    importance = Importance(torch.tensor([0.3, 0.1, 0.2]), scores, torch.ones(3, spec.intermediate_size), 1)
    plan = plan_pruning(spec, PruneConfig(heads=0.5), importance)
    assert plan.keep_heads == ((1, 2), (0, 3), (1, 2))
    assert plan.keep_kv_heads == ((0, 1),) * 3
    assert plan_pruning(spec, PruneConfig(drop_layers=1), importance).keep_layers == (0, 2)


def test_without_gqa_whole_heads_go_with_their_kv_heads(tmp_path):
    source = make_tiny_checkpoint("llama", tmp_path / "mha", num_key_value_heads=4)
    spec = load_model(source, torch.float32, CPU).spec
    scores = torch.tensor([[1.0, 5.0, 9.0, 2.0]] * 3)
    importance = Importance(torch.zeros(3), scores, torch.ones(3, spec.intermediate_size), 1)
    plan = plan_pruning(spec, PruneConfig(heads=0.5), importance)
    assert plan.keep_heads == plan.keep_kv_heads == ((1, 2),) * 3
    out = run_prune(source, tmp_path / "pruned", PruneConfig(heads=0.5))
    assert read_config(out)["num_key_value_heads"] == read_config(out)["num_attention_heads"] == 2
    assert_matches_transformers(out, "Hello world", tol=1e-4)
    # 3 heads would not divide the width of 64, which transformers' LlamaConfig refuses to load.
    with pytest.raises(InvalidParameterError, match="Fractions that work: 0.25, 0.5, 1"):
        run_prune(source, tmp_path / "three", PruneConfig(heads=0.75))


def _with_identity_block(source, out, index):
    """`source` with a block at `index` whose attention and MLP write nothing: output = input."""
    make_tiny_checkpoint("llama", out, num_hidden_layers=4)
    tensors, old = load_file(out / "model.safetensors"), load_file(source / "model.safetensors")
    for name, tensor in old.items():
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            i = int(i) + (int(i) >= index)
            tensors[f"model.layers.{i}.{rest}"] = tensor
        else:
            tensors[name] = tensor
    for proj in ("self_attn.o_proj", "mlp.down_proj"):
        tensors[f"model.layers.{index}.{proj}.weight"].zero_()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_importance_ranks_an_inserted_identity_block_first_and_dropping_it_changes_nothing(llama_dir, tmp_path):
    padded = _with_identity_block(llama_dir, tmp_path / "padded", index=2)
    model = load_model(padded, torch.float32, CPU)
    ids = torch.arange(3, 3 + 4 * 64).tolist()
    importance = measure_importance(model, calibration_windows(ids, 64, 4), show_progress=False)
    assert importance.layers_least_important_first()[0] == 2
    assert importance.layer_scores[2].item() < 1e-3 < importance.layer_scores.sort().values[1].item()
    out = run_prune(padded, tmp_path / "pruned", PruneConfig(drop_layers=1))
    assert json.loads((out / "pruning.json").read_text())["kept_layers"] == [0, 1, 3]
    tokens = torch.arange(3, 40)
    torch.testing.assert_close(logits_of(out, tokens), logits_of(llama_dir, tokens), rtol=0, atol=1e-5)


def test_gguf_export_and_the_fit_planner_read_a_pruned_checkpoint(llama_dir, tmp_path):
    from selfhost.catalog.references import resolve_model_spec
    from selfhost.quant.gguf_export import export_gguf

    out = run_prune(llama_dir, tmp_path / "pruned", PruneConfig(drop_layers=1, mlp_width=0.5, heads=0.5))
    export_gguf(out, tmp_path / "pruned.gguf", "f16")
    reader = gguf.GGUFReader(str(tmp_path / "pruned.gguf"))

    def field(key):
        return reader.fields[key].parts[-1][0].item()

    assert field("llama.block_count") == 2
    assert field("llama.attention.head_count") == 2 and field("llama.attention.head_count_kv") == 2
    assert field("llama.feed_forward_length") == 64
    assert field("llama.attention.key_length") == 16
    model = load_model(out, torch.float32, CPU)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert resolve_model_spec(str(out)).weight_params == sum(p.numel() for p in model.parameters()) - norms


@pytest.mark.parametrize("cfg, calibration, message", [
    (PruneConfig(drop_layers=3), CALIBRATION, "--drop-layers 3 would leave no layer: the model has 3"),
    (PruneConfig(keep_layers=(0, 5)), CALIBRATION, r"--keep-layers 0,5 must list distinct layer indices in \[0, 2\]"),
    (PruneConfig(heads=0.25), CALIBRATION, "fewer than one per KV group"),
    (PruneConfig(mlp_width=0.5), Calibration("To be", window=64), "shorter than one window of 64"),
    (PruneConfig(mlp_width=0.5), None, "needs calibration text"),
])
def test_bad_requests_fail_clearly_and_write_nothing(llama_dir, tmp_path, cfg, calibration, message):
    with pytest.raises(InvalidParameterError, match=message):
        run_prune(llama_dir, tmp_path / "out", cfg, calibration)
    assert list(tmp_path.iterdir()) == []


def test_fractions_outside_zero_to_one_are_refused():
    with pytest.raises(InvalidParameterError, match=r"--mlp-width 0.0 must be in \(0, 1\]"):
        PruneConfig(mlp_width=0.0)
    with pytest.raises(InvalidParameterError, match="not both"):
        PruneConfig(drop_layers=1, keep_layers=(0,))
