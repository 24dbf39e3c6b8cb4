"""`selfhost finetune` and `selfhost merge` from the command line, and the errors users can cause."""

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from selfhost.cli.lora import register
from selfhost.errors import InvalidParameterError
from selfhost.lora.adapter_format import AdapterError, read_adapter
from selfhost.lora.apply import apply_adapter
from selfhost.lora.data import DataError
from selfhost.models.loader import load_model
from tests.lora.conftest import make_peft_adapter, selfhost_logits

runner = CliRunner()
CPU = torch.device("cpu")


@pytest.fixture
def cli():
    app = typer.Typer()
    register(app)
    return app


def invoke(cli, *args):
    return runner.invoke(cli, [*map(str, args)])


@pytest.mark.parametrize("family", ["llama", "llama3-rope"])  # untied head; tied head with q/k/v biases
def test_merged_checkpoint_equals_the_unmerged_adapter(cli, tiny_checkpoint, tmp_path, prompt_ids, family):
    model_dir = tiny_checkpoint(family)
    adapter_dir = make_peft_adapter(model_dir, tmp_path / "adapter", ["q_proj", "k_proj", "o_proj", "up_proj",
                                                                      "down_proj"], r=4, lora_alpha=8)
    out = tmp_path / "merged"
    result = invoke(cli, "merge", model_dir, adapter_dir, "-o", out)
    assert result.exit_code == 0, result.output
    assert "15 weights merged" in result.output  # 3 layers x 5 modules
    assert {p.name for p in model_dir.iterdir()} == {p.name for p in out.iterdir()}
    unmerged = load_model(model_dir, torch.float32, CPU)
    apply_adapter(unmerged, read_adapter(adapter_dir))
    merged = load_model(out, torch.float32, CPU)
    torch.testing.assert_close(selfhost_logits(merged, prompt_ids), selfhost_logits(unmerged, prompt_ids),
                               atol=1e-4, rtol=1e-4)


def test_merge_refuses_an_adapter_for_another_base(cli, tiny_checkpoint, tmp_path):
    adapter_dir = make_peft_adapter(tiny_checkpoint("llama"), tmp_path / "adapter", ["q_proj"], r=4, lora_alpha=8)
    out = tmp_path / "merged"
    result = invoke(cli, "merge", tiny_checkpoint("llama-linear-rope"), adapter_dir, "-o", out)
    assert isinstance(result.exception, AdapterError), result.output
    assert "another base model" in str(result.exception)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no partial output


def test_finetune_writes_a_peft_adapter(cli, tiny_checkpoint, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"line {i}:", "completion": " to be"}) + "\n" for i in range(6)))
    out = tmp_path / "adapter"
    result = invoke(cli, "finetune", tiny_checkpoint("llama"), "--data", data, "--eval", data, "--lora-rank", 2,
                    "--targets", "q,v,down", "--steps", 3, "--batch-size", 2, "--no-progress", "-o", out,
                    "--quantization", "int4")  # QLoRA-style: the adapters train over int4 weights
    assert result.exit_code == 0, result.output
    assert "eval perplexity" in result.output
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (2, 4.0, ["down_proj", "q_proj", "v_proj"])
    assert len(read_adapter(out).modules) == 9
    report = json.loads((out / "finetune_report.json").read_text())
    assert report["steps"] == 3 and report["eval_ppl"] > 0 and report["base_eval_ppl"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "train.jsonl"]  # checkpoints removed


@pytest.mark.parametrize(
    "args, error, message",
    [
        (["--targets", "q,lm_head"], InvalidParameterError, "unknown --targets lm_head"),
        (["--lora-rank", 0], AdapterError, "rank r=0"),
        (["--quantization", "int3"], InvalidParameterError, "int3"),
    ],
)
def test_finetune_refuses_bad_options(cli, tiny_checkpoint, tmp_path, args, error, message):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "to be"}\n')
    result = invoke(cli, "finetune", tiny_checkpoint("llama"), "--data", data, "-o", tmp_path / "out", *args)
    assert isinstance(result.exception, error) and message in str(result.exception), result.output
    assert not (tmp_path / "out").exists()


def test_finetune_refuses_malformed_data_without_output(cli, tiny_checkpoint, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "to be"}\nnot json\n')
    result = invoke(cli, "finetune", tiny_checkpoint("llama"), "--data", data, "-o", tmp_path / "out")
    assert isinstance(result.exception, DataError) and "line 2" in str(result.exception)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl"]
