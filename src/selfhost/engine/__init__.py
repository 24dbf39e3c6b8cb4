"""Scheduling, KV memory and the step loop that drives a model."""
