"""Measure serving stacks: a load generator for OpenAI-compatible endpoints,
the statistics over its records, reports, plots and MLflow tracking.

The pipeline reads off the files: `dist` + `workload` decide what to send,
`client` sends one request and times it, `runner` drives a concurrency level,
`stats` turns records into percentiles, `result` is the JSON contract, and
`report`, `plots`, `tracking` show and keep it. `offline` runs the same workload
through the in-process engine. Apart from the pipeline: `device_probe` and
`fit_calibration` measure this machine and selfhost for the planner, and
`machine_limits` measures the machine's ceilings for benchmark tables.
"""
