import pytest
import torch

from selfhost.train.attention import BatchCausalAttention


def make_peft_adapter(model_dir, out_dir, targets, seed=0, **config):
    """A PEFT adapter with random (non-zero) A and B on the transformers model in `model_dir`."""
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(target_modules=list(targets), init_lora_weights=False, **config))
    peft_model.save_pretrained(str(out_dir))
    return out_dir


def peft_logits(model_dir, adapter_dir, ids):
    import transformers
    from peft import PeftModel

    base = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def selfhost_logits(model, ids):
    """(T, vocab) logits of one sequence through selfhost's CausalLM (no cache: the training attention)."""
    with torch.no_grad():
        tokens = torch.tensor(ids)
        hidden = model(tokens, torch.arange(len(ids)), BatchCausalAttention(1, len(ids)))
        return model.compute_logits(hidden)


@pytest.fixture
def prompt_ids():
    return [1, 17, 250, 3, 99, 401, 42, 8, 300, 5, 77, 123]
