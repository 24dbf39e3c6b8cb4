"""What `selfhost fit`/`cost` accept as a model: aliases, catalog Hub ids (base repos too),
checkpoint folders, and Hub ids whose config.json sits in the local HF cache."""

import json

import pytest
from huggingface_hub import constants

from selfhost.catalog import get_model, load_models
from selfhost.catalog.hf_config import architecture_from_config
from selfhost.catalog.references import resolve_model_spec
from selfhost.errors import InvalidParameterError, ModelNotFoundError
from selfhost.hub import EMBEDDED_MODEL_DIR, EMBEDDED_MODEL_NAME


@pytest.mark.parametrize("ref, alias", [
    ("llama3.1:8b", "llama3.1:8b"),
    ("meta-llama/Llama-3.1-8B-Instruct", "llama3.1:8b"),
    ("meta-llama/Llama-3.1-8B", "llama3.1:8b"),  # the base model the help names
    ("HuggingFaceTB/SmolLM2-135M", "smollm2:135m"),
    ("mistralai/Mistral-7B-v0.3", "mistral:7b"),
    ("mistralai/Mixtral-8x7B-v0.1", "mixtral:8x7b"),
])
def test_catalog_aliases_and_hub_ids_of_checkpoints_and_base_models(ref, alias):
    assert resolve_model_spec(ref).alias == alias


def test_every_hub_repo_names_one_entry():
    repos = [repo.lower() for spec in load_models().values() for repo in spec.hub_repos]
    assert len(repos) == len(set(repos))


@pytest.mark.parametrize("ref", [str(EMBEDDED_MODEL_DIR), EMBEDDED_MODEL_NAME])
def test_the_embedded_demo_model_is_planned_from_its_config(ref):
    spec = resolve_model_spec(ref)
    assert spec.alias == EMBEDDED_MODEL_NAME and spec.licence == ""
    arch = spec.arch
    assert (arch.layers, arch.hidden, arch.heads, arch.kv_heads, arch.head_dim, arch.vocab, arch.max_context) == (
        5, 160, 5, 5, 32, 4096, 256)
    assert arch.tied_embeddings


def _cache_config(cache, repo_id, config):
    """Lay out `config` as huggingface_hub caches a downloaded config.json."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(config))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")


def test_a_hub_id_outside_the_catalog_is_planned_from_its_cached_config(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    config = json.loads((EMBEDDED_MODEL_DIR / "config.json").read_text()) | {"num_hidden_layers": 7}
    _cache_config(tmp_path, "someone/tiny-llama", config)
    spec = resolve_model_spec("someone/tiny-llama")
    assert spec.alias == "someone/tiny-llama" and spec.arch.layers == 7


def test_a_hub_id_without_a_cached_config_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match=r"'someone/absent'.*never downloads.*huggingface-cli download"):
        resolve_model_spec("someone/absent")


def test_a_typo_still_suggests_the_alias():
    with pytest.raises(InvalidParameterError, match="did you mean 'llama3.1:8b'"):
        resolve_model_spec("lama3.1:8b")


def test_a_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model_spec(str(tmp_path))


def test_configs_of_the_families_map_onto_the_catalogs_facts():
    # Gemma 3 4B: the language model sits in text_config; 5 local layers per global one.
    gemma = architecture_from_config({"model_type": "gemma3", "text_config": {
        "model_type": "gemma3_text", "num_hidden_layers": 34, "hidden_size": 2560, "intermediate_size": 10240,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 262208,
        "max_position_embeddings": 131072, "sliding_window": 1024, "sliding_window_pattern": 6}})
    assert gemma == get_model("gemma3:4b").arch
    # Mixtral: experts as wide as the dense MLP; Qwen2: biases its config does not state.
    mixtral = architecture_from_config({
        "model_type": "mixtral", "num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 32768,
        "num_local_experts": 8, "num_experts_per_tok": 2, "tie_word_embeddings": False, "sliding_window": None})
    assert mixtral == get_model("mixtral:8x7b").arch
    qwen = architecture_from_config({
        "model_type": "qwen2", "num_hidden_layers": 28, "hidden_size": 3584, "intermediate_size": 18944,
        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 131072,
        "tie_word_embeddings": False, "sliding_window": 131072, "use_sliding_window": False})
    assert qwen == get_model("deepseek-r1:7b").arch


def test_gemma3_4b_vocab_is_its_configs():
    assert get_model("gemma3:4b").arch.vocab == 262_208
