"""Speculative decoding's building blocks (issue 24; not yet wired into the engine's steps).

ngram.py     prompt-lookup proposals: continue the longest recent n-gram match
verify.py    accepting proposals: greedy (exact match) and rejection sampling (the target's
             distribution, exactly)
adaptive.py  how many tokens to propose next, from the recent acceptance of each sequence
"""
