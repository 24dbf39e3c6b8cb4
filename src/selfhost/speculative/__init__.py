"""Speculative decoding in the batching engine (issue 24).

config.py       SpeculativeConfig: "ngram" or "draft:PATH", and the most tokens proposed per step
speculator.py   the engine's side: proposals before a step, verification after it, statistics
state.py        what a sequence's speculation holds between proposing and verifying; the engine's totals
ngram.py        prompt-lookup proposals: continue the longest recent n-gram match (an incremental index)
draft.py        a draft model's proposals, on the engine's own runner with its own paged KV cache
verify.py       accepting proposals: greedy (exact match) and rejection sampling (the target's
                distribution, exactly)
adaptive.py     how many tokens to propose next, from the recent acceptance of each sequence
step_cost.py    when proposals pay: step time by token count, measured as the engine runs
"""
