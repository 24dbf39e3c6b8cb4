"""CPU weights live in one arena (huge-page backed where the kernel allows), tied weights stay tied."""

import torch
from torch import nn

from selfhost.models.weight_arena import ALIGN_BYTES, place_weights_in_arena


def test_every_parameter_becomes_an_aligned_view_of_one_block_and_ties_survive():
    model = nn.ModuleList([nn.Embedding(100, 24), nn.Linear(24, 7), nn.Linear(24, 100, bias=False)])
    model[2].weight = model[0].weight  # a tied output head
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    total = place_weights_in_arena(model)
    params = list(model.parameters())
    assert len(params) == 3  # embedding (shared with the head), linear weight and bias
    storages = {p.untyped_storage().data_ptr() for p in params}
    assert len(storages) == 1
    assert all(p.data_ptr() % ALIGN_BYTES == 0 for p in params)
    assert total >= sum(p.numel() * p.element_size() for p in params)
    assert model[2].weight is model[0].weight
    for name, p in model.named_parameters():
        assert p.shape == before[name].shape and p.dtype == before[name].dtype
    # the views do not overlap: writing one leaves the others alone
    with torch.no_grad():
        for i, p in enumerate(params):
            p.fill_(float(i))
    assert all((p == float(i)).all() for i, p in enumerate(params))


def test_loaded_cpu_model_uses_the_arena(tiny_checkpoint):
    from selfhost.models.loader import load_model

    model = load_model(tiny_checkpoint("llama"), torch.float32, torch.device("cpu"))
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(storages) == 1


def test_quantizing_on_the_fly_lets_the_fp32_arena_go(tiny_checkpoint):
    from selfhost import LLM

    llm = LLM(str(tiny_checkpoint("llama")), device="cpu", quantization="int8")
    params = list(llm.model.parameters())
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in params}
    # one small arena holding what stayed fp32, not the whole fp32 model's
    assert len(storages) == 1
    assert sum(storages.values()) <= sum(p.numel() * p.element_size() for p in params) + 64 * (len(params) + 1)
