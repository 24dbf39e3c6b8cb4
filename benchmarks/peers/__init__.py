"""Peers run fairly: each system in a process of its own, on the same token ids.

A benchmark (decode_cpu.py, throughput.py) writes one job file per system and
starts that system's peer script with the system's own Python and only its own
documented settings; the script loads the model, runs the job's tasks and writes
its timings and output token ids back as JSON. Nothing of one system (selfhost's
OpenMP variables set at import, vLLM's pinned torch) can reach another.

    job.py                the job a peer receives and the result it writes (stdlib only)
    selfhost_peer.py      selfhost: LLM(...).generate
    transformers_peer.py  transformers: generate / generate_batch with its defaults
    vllm_peer.py          vLLM's CPU build, from a venv of its own (made on first use)
    driver.py             start each peer in a clean environment, collect results or reasons
    options.py            the command-line options both benchmarks share
    report.py             the tables: speeds, ratios, greedy agreement, physical-limit fractions
"""
