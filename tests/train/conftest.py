import random

import pytest

from selfhost.train.config import ModelShape, TrainConfig

TINY_SHAPE = ModelShape(
    vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, context_len=32
)


def make_corpus_text(seed: int = 0, lines: int = 400) -> str:
    """Play-like text from a small grammar: learnable structure, unlike random tokens."""
    rng = random.Random(seed)
    speakers = ["HAMLET", "OPHELIA", "HORATIO", "KING"]
    subjects = ["the king", "my lord", "sweet lady", "the ghost", "this night", "good friend"]
    verbs = ["doth love", "shall see", "must fear", "will follow", "hath found", "cannot know"]
    objects = ["the crown", "his father", "a dream", "the sea", "my heart", "her grave"]
    out = []
    for _ in range(lines // 3):
        out.append(f"{rng.choice(speakers)}:")
        for _ in range(2):
            out.append(f"{rng.choice(subjects).capitalize()} {rng.choice(verbs)} {rng.choice(objects)}.")
        out.append("")
    return "\n".join(out)


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(make_corpus_text())
    return path


def tiny_config(**overrides) -> TrainConfig:
    fields = dict(max_steps=40, batch_size=8, lr=1e-2, eval_every=20, eval_tokens=2048, checkpoint_every=10,
                  val_fraction=0.1, seed=7)
    return TrainConfig(**{**fields, **overrides})


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models spend their time in thread hand-offs; one thread is faster and immune to busy cores."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def assert_matches_transformers(model_dir, prompt: str, tol: float = 1e-4) -> None:
    """selfhost and transformers load `model_dir` alike: same tokens, logits within `tol` (fp32)."""
    import torch
    import transformers

    from selfhost import LLM
    from selfhost.engine.kv_cache import ContiguousKVCache

    ref, info = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    llm = LLM(str(model_dir), device="cpu", dtype="float32")
    ids = llm.tokenizer.encode(prompt)
    assert ids == hf_tok(prompt)["input_ids"]
    prompt_ids = torch.tensor(ids)

    model = llm.model
    kv = ContiguousKVCache(model.spec, len(ids) + 1, torch.float32, torch.device("cpu"))
    with torch.inference_mode():
        kv.begin_step(len(ids))
        ours = model.compute_logits(model(prompt_ids, torch.arange(len(ids)), kv))
        kv.end_step(len(ids))
        theirs = ref.eval()(prompt_ids[None]).logits[0]
    assert (ours - theirs).abs().max().item() <= tol
