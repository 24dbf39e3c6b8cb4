import datetime as dt

import pytest

from selfhost.catalog import (
    get_device,
    get_licence,
    get_model,
    load_devices,
    load_licences,
    load_models,
    load_price_catalog,
    resolve_alias,
)
from selfhost.errors import InvalidParameterError, SelfhostError

MODELS = list(load_models().values())


@pytest.mark.parametrize("spec", MODELS, ids=lambda s: s.alias)
def test_every_model_is_sourced_and_dated(spec):
    assert spec.sources and spec.sources[0].startswith("https://huggingface.co/")
    assert spec.sources[0].endswith("config.json")
    assert dt.date(2026, 11, 25) <= spec.retrieved <= dt.date(2026, 12, 6)  # the days the catalog was read
    assert spec.params_source
    get_licence(spec.licence)  # every licence id resolves


@pytest.mark.parametrize("spec", MODELS, ids=lambda s: s.alias)
def test_parameter_count_from_architecture_matches_published(spec):
    computed_b = spec.weight_params / 1e9
    assert computed_b == pytest.approx(spec.params_b, rel=0.03)
    if spec.arch.is_moe:
        assert spec.active_params_as_published / 1e9 == pytest.approx(spec.active_params_b, rel=0.03)


def test_catalog_covers_the_issue_families():
    families = {m.family for m in MODELS}
    assert {"llama3", "mistral", "mixtral", "gemma2", "gemma3", "qwen2.5", "qwen3",
            "deepseek-r1-distill", "deepseek-v3", "gpt-oss", "phi", "smollm2", "tinyllama"} <= families
    aliases = {m.alias for m in MODELS}
    for alias in ["llama3.1:8b", "llama3.1:70b", "llama3.1:405b", "llama3.2:1b", "llama3.2:3b",
                  "qwen2.5:0.5b", "qwen2.5:72b", "deepseek-r1:1.5b", "deepseek-r1:70b", "deepseek-v3",
                  "phi2", "phi3:mini", "phi3.5:mini", "phi4", "gemma3:1b", "gemma2:27b", "mixtral:8x7b",
                  "qwen3:30b-a3b", "gpt-oss:20b", "gpt-oss:120b"]:
        assert alias in aliases


def test_aliases_and_repos_are_unique():
    aliases = [m.alias for m in MODELS]
    repos = [m.hf_repo.lower() for m in MODELS]
    assert len(set(aliases)) == len(aliases)
    assert len(set(repos)) == len(repos)


def test_resolve_alias():
    assert resolve_alias("qwen2.5:0.5b") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert resolve_alias("llama3.2:1b") == "meta-llama/Llama-3.2-1B-Instruct"
    assert resolve_alias(" Llama3.2:1B ") == "meta-llama/Llama-3.2-1B-Instruct"
    assert resolve_alias("meta-llama/Llama-3.2-1B-Instruct") is None  # already a repo id
    assert resolve_alias("not-a-model") is None


def test_get_model_by_alias_or_repo():
    assert get_model("meta-llama/Llama-3.1-8B-Instruct").alias == "llama3.1:8b"
    assert get_model("LLAMA3.1:8B").alias == "llama3.1:8b"


def test_unknown_names_suggest_close_ones():
    with pytest.raises(InvalidParameterError, match="did you mean 'llama3.1:8b'"):
        get_model("lama3.1:8b")
    with pytest.raises(SelfhostError, match="'h100'"):
        get_device("h10")


def test_known_llama_8b_facts():
    arch = get_model("llama3.1:8b").arch
    assert (arch.layers, arch.hidden, arch.kv_heads, arch.head_dim, arch.vocab) == (32, 4096, 8, 128, 128256)


def test_gpt_oss_facts():
    """The two releases differ only in depth and expert count; OpenAI counts active parameters
    without the input embedding table (0.58B), which the published 3.6B and 5.1B only match so."""
    small, large = get_model("openai/gpt-oss-20b"), get_model("gpt-oss:120b")
    for spec, layers, experts in ((small, 24, 32), (large, 36, 128)):
        arch = spec.arch
        assert (arch.layers, arch.experts, arch.experts_per_token, arch.moe_intermediate) == (layers, experts, 4, 2880)
        assert (arch.hidden, arch.heads, arch.kv_heads, arch.head_dim, arch.vocab) == (2880, 64, 8, 64, 201_088)
        assert (arch.sliding_window, arch.sliding_layers, arch.dense_layers) == (128, layers // 2, 0)
        assert arch.qkv_bias and not arch.tied_embeddings and spec.licence == "apache-2_0"
        assert spec.active_params - spec.active_params_as_published == 201_088 * 2880
    # Per layer: attention 2 * 2880 * 4096 + 2 * 2880 * 512 + 5120 biases, experts 3 * 2880^2 each, router.
    per_layer = 26_547_200 + 32 * 24_883_200 + 2880 * 32
    assert small.arch.total_params() == 24 * per_layer + 2 * 201_088 * 2880
    assert round(small.active_params_as_published / 1e7) == 361  # the published 3.6B
    assert round(large.active_params_as_published / 1e7) == 513  # the published 5.1B


def test_licence_terms():
    licences = load_licences()
    assert licences["llama3_1"].max_monthly_users == 700_000_000
    assert licences["qwen_research"].commercial_use is False
    assert licences["apache-2_0"].max_monthly_users is None
    assert get_model("qwen2.5:3b").licence == "qwen_research"
    assert get_model("qwen2.5:72b").licence == "qwen"
    assert get_model("deepseek-r1:8b").licence == "llama3_1"


def test_devices_and_prices_are_sourced():
    devices = load_devices()
    assert {"rpi5-8gb", "jetson-orin-nano-8gb", "jetson-agx-orin-64gb", "apple-m4-pro-24gb", "x86-desktop",
            "rtx4090", "l4", "a100-80gb", "h100", "h200"} <= set(devices)
    for device in devices.values():
        assert device.sources
        assert device.price_usd is not None or device.rent_usd_per_hour is not None
    from selfhost.catalog.prices import default_comparison_ids

    catalog = load_price_catalog()
    for model_id in default_comparison_ids():
        model = catalog.get(model_id)
        assert model.id == model_id and "https://" in model.source and model.as_of is not None


def test_catalog_import_stays_light():
    import subprocess
    import sys

    code = "import sys, selfhost.catalog as c; c.resolve_alias('qwen2.5:0.5b'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
