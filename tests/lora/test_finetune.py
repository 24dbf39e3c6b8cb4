"""Fine-tuning: loss masks, a falling loss, and adapters PEFT loads with the same logits."""

import json

import pytest
import torch

from selfhost.lora.adapter_format import LoraConfig, read_adapter
from selfhost.lora.apply import apply_adapter
from selfhost.lora.data import DataError, load_examples
from selfhost.lora.finetune import Finetuner
from selfhost.models.loader import load_model
from selfhost.tokenizer import Tokenizer
from selfhost.train.config import TrainConfig
from tests.lora.conftest import peft_logits, selfhost_logits

CPU = torch.device("cpu")
CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "To be?"},
                     {"role": "assistant", "content": "Or not to be."}, {"role": "user", "content": "Why?"},
                     {"role": "assistant", "content": "The question."}]}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_only_assistant_tokens_carry_loss(tiny_checkpoint, tmp_path):
    tok = Tokenizer(tiny_checkpoint("llama"))
    [example] = load_examples(write_jsonl(tmp_path / "chat.jsonl", [CHAT]), tok, max_len=512)
    assert example.token_ids == tok.encode_chat(CHAT["messages"], add_generation_prompt=False)
    learned = tok.hf.decode([t for t, m in zip(example.token_ids, example.loss_mask) if m])
    # Each assistant turn with the template's end-of-turn marks; nothing of the system or user turns.
    assert learned == "Or not to be.<|end|>\nThe question.<|end|>\n"


# What each family's template makes the model write for the two assistant turns below.
TEMPLATE_TARGETS = {
    "gemma2": "Or not to be.<end_of_turn>\nThe question.<end_of_turn>\n",
    "llama3_1": "Or not to be.<|eot_id|>The question.<|eot_id|>",
    "mistral_v0_3": " Or not to be.</s> The question.</s>",
    "phi4_mini": "Or not to be.<|end|>The question.<|end|></s>",  # EOS only after the final turn
    "qwen2_5": "Or not to be.<|im_end|>\nThe question.<|im_end|>\n",
    "qwen3": "Or not to be.<|im_end|>\n<think>\n\n</think>\n\nThe question.<|im_end|>\n",  # final turn differs
}


@pytest.mark.parametrize("template", sorted(TEMPLATE_TARGETS))
def test_assistant_mask_under_real_chat_templates(tiny_checkpoint, template):
    from pathlib import Path

    from selfhost.lora.data import chat_example

    tok = Tokenizer(tiny_checkpoint("llama"))
    tok.hf.chat_template = (Path(__file__).parents[1] / "chat_templates" / f"{template}.jinja").read_text()
    messages = [m for m in CHAT["messages"] if m["role"] != "system"]  # some templates refuse a system turn
    example = chat_example(tok, messages)
    learned = tok.hf.decode([t for t, m in zip(example.token_ids, example.loss_mask) if m])
    assert learned == TEMPLATE_TARGETS[template]


def test_prompt_completion_and_text_masks(tiny_checkpoint, tmp_path):
    tok = Tokenizer(tiny_checkpoint("llama"))
    records = [{"prompt": "To be, or", "completion": " not to be"}, {"text": "the question"}]
    pair, text = load_examples(write_jsonl(tmp_path / "d.jsonl", records), tok, max_len=512)
    assert tok.hf.decode([t for t, m in zip(pair.token_ids, pair.loss_mask) if m]) == " not to be</s>"
    assert all(text.loss_mask)


def test_plain_text_file_is_cut_into_windows(tiny_checkpoint, tmp_path):
    tok = Tokenizer(tiny_checkpoint("llama"))
    path = tmp_path / "poems.txt"
    path.write_text("Whether 'tis nobler in the mind to suffer the slings and arrows. " * 8)
    examples = load_examples(path, tok, max_len=32)
    assert len(examples) > 2 and all(len(e.token_ids) <= 32 and all(e.loss_mask) for e in examples)
    assert [t for e in examples for t in e.token_ids] == tok.encode(path.read_text())


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty"),
        ('{"text": "fine"}\n{"text": "fine"\n', "line 2"),
        ('{"text": "fine"}\n\n{"prompt": "no completion"}\n', r"line 3: expected 'messages'"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', "line 1: the conversation has no assistant turn"),
        ('[1, 2]\n', "line 1: expected a JSON object"),
    ],
)
def test_bad_data_names_the_line(tiny_checkpoint, tmp_path, content, message):
    tok = Tokenizer(tiny_checkpoint("llama"))
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_examples(path, tok, max_len=64)


def test_finetuned_adapter_loads_in_peft_with_the_same_logits(tiny_checkpoint, tmp_path, prompt_ids):
    model_dir = tiny_checkpoint("qwen2")
    tok = Tokenizer(model_dir)
    records = [CHAT, {"prompt": "To be, or", "completion": " not to be"}, {"text": "whether 'tis nobler"}] * 3
    examples = load_examples(write_jsonl(tmp_path / "train.jsonl", records), tok, max_len=64)
    model = load_model(model_dir, torch.float32, CPU)
    lora = LoraConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"))
    cfg = TrainConfig(max_steps=12, batch_size=3, lr=1e-2, warmup_steps=2, weight_decay=0.0, eval_every=6)
    tuner = Finetuner(model, lora, cfg, examples, pad_id=tok.hf.pad_token_id)
    result = tuner.run(eval_examples=examples[:3], show_progress=False)
    assert result.eval_loss < result.base_eval_loss
    assert result.trainable_params < 0.1 * result.base_params
    out = tmp_path / "adapter"
    tuner.save(out)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    trained = selfhost_logits(model, prompt_ids)
    reloaded = load_model(model_dir, torch.float32, CPU)
    apply_adapter(reloaded, read_adapter(out))
    torch.testing.assert_close(selfhost_logits(reloaded, prompt_ids), trained, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(peft_logits(model_dir, out, prompt_ids), trained, atol=1e-4, rtol=1e-4)


def test_resumed_run_ends_with_the_same_adapter(tiny_checkpoint, tmp_path):
    from selfhost.lora.finetune import ResumeError

    model_dir = tiny_checkpoint("llama")
    tok = Tokenizer(model_dir)
    records = [{"prompt": f"line {i}:", "completion": " to be"} for i in range(5)]
    examples = load_examples(write_jsonl(tmp_path / "train.jsonl", records), tok, max_len=64)
    lora = LoraConfig(rank=2, alpha=4.0, target_modules=("q_proj", "up_proj"))
    cfg = TrainConfig(max_steps=6, batch_size=2, lr=1e-2, checkpoint_every=3, weight_decay=0.0)

    def tuner(checkpoints=None, data=examples):
        return Finetuner(load_model(model_dir, torch.float32, CPU), lora, cfg, data, 0, checkpoint_dir=checkpoints)

    straight = tuner()
    straight.run(show_progress=False)
    first = tuner(tmp_path / "ckpt")
    first.run(show_progress=False)
    resumed = tuner()
    resumed.resume(tmp_path / "ckpt" / "step-000003.pt")
    assert resumed.step == 3
    resumed.run(show_progress=False)
    for (key, a), b in zip(straight.adapter().modules.items(), resumed.adapter().modules.values()):
        torch.testing.assert_close(a.lora_a, b.lora_a, atol=0, rtol=0, msg=str(key))
        torch.testing.assert_close(a.lora_b, b.lora_b, atol=0, rtol=0, msg=str(key))
    with pytest.raises(ResumeError, match="other training data"):
        tuner(data=examples[:4]).resume(tmp_path / "ckpt" / "step-000003.pt")


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_finetune_over_a_quantized_base(tiny_checkpoint, quantization):
    from selfhost.lora.data import Example
    from selfhost.lora.finetune import load_base

    examples = [Example(list(range(1, 20)), [True] * 19)] * 4
    lora = LoraConfig(rank=2, alpha=4.0, target_modules=("q_proj", "down_proj"))
    cfg = TrainConfig(max_steps=4, batch_size=2, lr=1e-2, weight_decay=0.0)
    model = load_base(tiny_checkpoint("llama"), CPU, 64, quantization)
    result = Finetuner(model, lora, cfg, examples, 0).run(examples, show_progress=False)
    assert result.eval_loss < result.base_eval_loss


def test_finetune_refuses_the_packed_int4_kernel(tiny_checkpoint):
    from selfhost.errors import SelfhostError
    from selfhost.lora.data import Example
    from selfhost.quant.config import QuantConfig
    from selfhost.quant.int4 import Int4Linear

    model = load_model(tiny_checkpoint("llama"), torch.float32, CPU, quantization=QuantConfig(method="int4"))
    if not any(isinstance(m, Int4Linear) and m.kernel == "int4pack_cpu" for m in model.modules()):
        pytest.skip("torch's packed int4 CPU kernel is not used on this machine")
    lora = LoraConfig(rank=2, alpha=4.0, target_modules=("q_proj",))
    with pytest.raises(SelfhostError, match="no backward"):
        Finetuner(model, lora, TrainConfig(max_steps=1), [Example([1, 2, 3], [True] * 3)], 0)
