"""One memory-size parser, one meaning: the engine, the server and the planner agree."""

import pytest

from selfhost import host_memory
from selfhost.engine.config import EngineConfig, parse_memory
from selfhost.errors import InvalidParameterError
from selfhost.plan.units import parse_rate
from selfhost.server.settings import ServerSettings
from selfhost.units import parse_size, parse_size_or_fraction


@pytest.mark.parametrize("text, expected", [
    ("16GB", 16 * 10**9), ("512MiB", 512 * 2**20), ("2GiB", 2 * 2**30), ("2 gib", 2 * 2**30),
    ("1.5GB", 1_500_000_000), ("4096B", 4096), (4096, 4096),
])
def test_sizes_with_units_and_python_ints(text, expected):
    assert parse_size(text) == expected
    assert parse_size_or_fraction(text) == expected
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["16", "0.5", "8 ", "lots", "16G", "-3GB", "0GB", 0, -5, 1.5e9, True])
def test_a_bare_number_or_anything_without_a_byte_unit_is_refused_with_the_accepted_forms(text):
    with pytest.raises(InvalidParameterError, match="memory") as err:
        parse_size(text, what="memory")
    assert repr(text) in str(err.value)


def test_the_refusal_names_the_forms():
    with pytest.raises(InvalidParameterError, match=r"'16'.*'16GB', '512MiB' or '2GiB'"):
        parse_size("16", what="--mem")


@pytest.mark.parametrize("value, expected", [("0.5", 0.5), (0.3, 0.3), ("1", 1.0), (1.0, 1.0)])
def test_kv_cache_memory_takes_a_bare_number_in_0_1_as_a_share_of_free_memory(value, expected):
    assert parse_memory(value) == expected
    assert isinstance(parse_memory(value), float)


@pytest.mark.parametrize("value", ["16", "1.5", 2.0, "0", 0.0, "-0.5", "lots"])
def test_kv_cache_memory_refuses_other_bare_numbers_and_says_what_it_accepts(value):
    with pytest.raises(InvalidParameterError, match=r"kv_cache_memory=.*2GiB.*\(0, 1\]"):
        EngineConfig(kv_cache_memory=value)


def test_the_server_and_the_planner_read_sizes_the_same_way():
    assert ServerSettings(memory_budget="12GiB").memory_budget_bytes == 12 * 2**30
    with pytest.raises(ValueError, match="memory_budget='16'"):
        ServerSettings(memory_budget="16")
    with pytest.raises(ValueError, match="kv_cache_memory='16'"):
        ServerSettings(kv_cache_memory="16")
    assert ServerSettings(kv_cache_memory="0.3").kv_cache_memory == "0.3"
    assert parse_rate("100GB/s") == 100e9
    with pytest.raises(InvalidParameterError, match="'100'"):
        parse_rate("100")


def test_free_memory_is_memavailable_not_memfree(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemFree:          200000 kB\nMemAvailable:    9000000 kB\n")
    monkeypatch.setattr(host_memory, "_MEMINFO", meminfo)
    assert host_memory.available_memory_bytes() == 9_000_000 * 1024


def test_free_memory_of_the_engine_reads_the_one_function(monkeypatch):
    import torch

    from selfhost.engine import llm_engine

    monkeypatch.setattr(llm_engine, "available_memory_bytes", lambda: 123 * 2**20)
    assert llm_engine.free_memory_bytes(torch.device("cpu")) == 123 * 2**20
