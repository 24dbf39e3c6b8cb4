"""A distillation run's metrics as the short Markdown report written next to the student."""

from __future__ import annotations


def render_distillation_md(m: dict) -> str:
    d, shape, cfg = m["distillation"], m["model"], m["train"]
    rows = [("student (this model)", m["num_params"], m["val_loss"], m["val_ppl"])]
    if d["teacher_val_loss"] is not None:
        rows.append((f"teacher ({d['teacher']})", d["teacher_num_params"], d["teacher_val_loss"], d["teacher_val_ppl"]))
    bigram = m["baselines"]["bigram"]
    rows.append(("smoothed bigram (same split and tokenizer)", None, bigram["val_loss"], bigram["val_ppl"]))
    table = "\n".join(f"| {name} | {f'{n:,}' if n else '-'} | {loss:.4f} | {ppl:.2f} |" for name, n, loss, ppl in rows)
    history = "\n".join(f"| {p['step']} | {p['train_loss']:.4f} | {p['val_loss']:.4f} | {p['val_ppl']:.2f} |"
                        for p in m["history"])
    cache = f"top-{d['cache_top_k']} teacher log-probs cached on disk" if d["cache_top_k"] else "teacher run live"
    return f"""# Distillation report

Distilled by selfhost. Reproduce with:

```
{m['command'] or 'selfhost distill ...'}
```

## Validation (nats per token, {m['val_tokens_scored']:,} held-out tokens)

| model | parameters | loss | perplexity |
|---|---|---|---|
{table}

## Run

- student: {d['student']}; {shape['num_layers']} layers, hidden {shape['hidden_size']}, {shape['num_heads']} heads \
/ {shape['num_kv_heads']} KV heads, MLP {shape['intermediate_size']}, context {shape['context_len']}
- loss: {d['alpha']:g} x T^2 x KL(teacher || student) at T={d['temperature']:g} + {1 - d['alpha']:g} x next-token \
cross-entropy; {cache}
- steps: {m['steps']:,} x {cfg['batch_size'] * cfg['grad_accum']} sequences; {m['tokens_seen']:,} tokens seen \
({m['epochs']:.2f} epochs of {m['train_tokens']:,} training tokens)
- optimiser: AdamW lr {cfg['lr']:g} (warm-up {m['warmup_steps']}, cosine to x{cfg['min_lr_ratio']:g}), clip \
{cfg['grad_clip']}; seed {m['seed']}; {m['device']}, {m['threads']} thread(s)
- time: {m['training_time_s'] / 60:.1f} min

## Validation during distillation

| step | train objective | val loss | val ppl |
|---|---|---|---|
{history}
"""
