"""Default lengths fitted to the served context, and the reasons a run shows for failed requests."""

from __future__ import annotations

import asyncio

from selfhost.bench.client import EndpointClient, EndpointConfig, served_context
from selfhost.bench.defaults import choose_lengths
from selfhost.bench.dist import parse_length_dist
from selfhost.bench.record import RequestRecord
from selfhost.bench.report import failure_lines
from selfhost.bench.runner import Level, LevelRun
from selfhost.bench.workload import BenchRequest


def test_defaults_stay_when_the_context_is_unknown_or_large():
    assert choose_lengths(None, None, None, "m") == choose_lengths(None, None, 32768, "m")
    chosen = choose_lengths(None, None, 32768, "m")
    assert (chosen.prompt, chosen.output, chosen.note) == ("fixed:256", "fixed:128", None)


def test_defaults_shrink_to_half_a_small_context_and_say_so():
    chosen = choose_lengths(None, None, 256, "demo")
    prompt, output = parse_length_dist(chosen.prompt).upper, parse_length_dist(chosen.output).upper
    assert prompt + output <= 128 and prompt == 2 * output - 1  # the 2:1 ratio of the defaults
    assert "256-token context" in chosen.note and "'demo'" in chosen.note


def test_chosen_lengths_are_kept_with_a_warning_when_they_overflow():
    chosen = choose_lengths("uniform:10-300", "fixed:20", 256, "demo")
    assert (chosen.prompt, chosen.output) == ("uniform:10-300", "fixed:20")
    assert chosen.note.startswith("warning") and "320 tokens" in chosen.note
    assert choose_lengths("fixed:50", None, 256, "demo").note is not None  # the output default shrank
    assert choose_lengths("fixed:50", "fixed:20", 256, "demo").note is None


def test_served_context_reads_max_model_len_of_the_named_model():
    models = [{"id": "a", "max_model_len": 4096}, {"id": "b", "max_model_len": 256}, {"id": "c"}]
    assert served_context(models, "b") == 256
    assert served_context(models, "c") is None and served_context(models, "zzz") is None


def test_failure_lines_count_each_reason_per_level():
    def record(i, detail=None):
        return RequestRecord(i, 0.0, 1.0, error="http" if detail else None, error_detail=detail)

    run = LevelRun(Level(2), [record(0, "HTTP 400: too long"), record(1, "HTTP 400: too long"),
                              record(2, "HTTP 500: boom"), record(3)])
    assert failure_lines([run, LevelRun(Level(4), [record(0)])]) == [
        "c2: 3 of 4 requests failed:", "  2 x HTTP 400: too long", "  1 x HTTP 500: boom"]


def test_an_error_response_is_recorded_by_its_message(fake):
    async def send():
        async with EndpointClient(EndpointConfig(fake.url, "http500")) as client:
            return await client.send(BenchRequest(0, (("user", "hi"),), 4), 0.0)

    record = asyncio.run(send())
    assert record.error == "http" and record.error_detail == "HTTP 500: injected failure"
