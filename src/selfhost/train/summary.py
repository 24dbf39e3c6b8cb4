"""A run's metrics as the short Markdown report written next to the model."""

from __future__ import annotations


def unigram_warning(m: dict) -> str | None:
    """Why a run whose validation loss is no better than token frequencies alone is not a usable model."""
    unigram = m["baselines"]["unigram"]["val_loss"]
    if m["val_loss"] < unigram:
        return None
    cfg = m["train"]
    return (
        f"the model's validation loss {m['val_loss']:.4f} is not better than the unigram baseline {unigram:.4f}, "
        "which ignores context entirely: the model has not learned anything usable yet. Likely causes: too few "
        f"steps ({m['steps']:,} run; try --steps), a learning rate too high or too low (--lr {cfg['lr']:g}), "
        f"or too little data ({m['train_tokens']:,} training tokens)."
    )


def render_training_md(m: dict) -> str:
    shape, cfg = m["model"], m["train"]
    warning = unigram_warning(m)
    warning_md = f"\n> **Warning:** {warning}\n" if warning else ""
    bigram, unigram = m["baselines"]["bigram"], m["baselines"]["unigram"]
    rows = [
        ("this model", m["val_loss"], m["val_ppl"]),
        ("smoothed bigram (same split and tokenizer)", bigram["val_loss"], bigram["val_ppl"]),
        ("unigram (same split and tokenizer)", unigram["val_loss"], unigram["val_ppl"]),
    ]
    table = "\n".join(f"| {name} | {loss:.4f} | {ppl:.2f} |" for name, loss, ppl in rows)
    history = "\n".join(
        f"| {p['step']} | {p['train_loss']:.4f} | {p['val_loss']:.4f} | {p['val_ppl']:.2f} | {p['elapsed_s'] / 60:.1f} |"
        for p in m["history"]
    )
    return f"""# Training report

Trained by `selfhost train`. Reproduce with:

```
{m['command'] or 'selfhost train ...'}
```

## Validation (nats per token, {m['val_tokens_scored']:,} held-out tokens)

| model | loss | perplexity |
|---|---|---|
{table}
{warning_md}
## Run

- parameters: {m['num_params']:,} ({shape['num_layers']} layers, hidden {shape['hidden_size']}, \
{shape['num_heads']} heads / {shape['num_kv_heads']} KV heads, MLP {shape['intermediate_size']}, \
context {shape['context_len']}, vocabulary {shape['vocab_size']})
- steps: {m['steps']:,} x {cfg['batch_size'] * cfg['grad_accum']} sequences; {m['tokens_seen']:,} tokens seen \
({m['epochs']:.2f} epochs of {m['train_tokens']:,} training tokens)
- optimiser: AdamW lr {cfg['lr']:g} (warm-up {m['warmup_steps']}, cosine to x{cfg['min_lr_ratio']:g}), \
weight decay {cfg['weight_decay']:g}, betas ({cfg['beta1']:g}, {cfg['beta2']:g}), clip {cfg['grad_clip']}
- seed {m['seed']}; {m['device']}, {m['threads']} thread(s), torch {m['torch']}
- training time: {m['training_time_s'] / 60:.1f} min ({m['tokens_per_s']:,.0f} tokens/s); weights saved as {m['save_dtype']}

## Validation during training

| step | train loss | val loss | val ppl | minutes |
|---|---|---|---|---|
{history}
"""
