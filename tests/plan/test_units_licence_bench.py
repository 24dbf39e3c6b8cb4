import json

import pytest

from selfhost.catalog import get_model
from selfhost.errors import InvalidParameterError
from selfhost.plan.bench_result import read_bench_result
from selfhost.plan.licence import licence_warnings
from selfhost.plan.units import parse_count, parse_rate


def test_units():
    assert parse_rate("100GB/s") == 100e9
    assert parse_count("800M") == 8e8
    assert parse_count("1.5B") == 1.5e9
    assert parse_count("1e9") == 1e9
    with pytest.raises(InvalidParameterError, match="'lots'"):
        parse_count("lots")
    with pytest.raises(InvalidParameterError, match="'-3GB/s'"):
        parse_rate("-3GB/s")


def test_llama_licence_guard_at_800m_users():
    warnings = licence_warnings(get_model("llama3.1:8b"), monthly_users=800e6)
    assert any("700,000,000" in w for w in warnings)
    assert not any("700,000,000" in w for w in licence_warnings(get_model("llama3.1:8b"), monthly_users=1e6))
    assert not licence_warnings(get_model("qwen2.5:7b"), monthly_users=800e6)  # Apache-2.0


def test_non_commercial_licence_warns():
    assert any("commercial" in w for w in licence_warnings(get_model("qwen2.5:3b")))


def test_bench_result(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"schema": "selfhost.bench.throughput/1", "output_tok_s": 250.0}))
    assert read_bench_result(path).output_tok_s == 250.0
    path.write_text(json.dumps({"schema": "selfhost.bench/1", "output_tok_s": 80, "levels": []}))
    assert read_bench_result(path).output_tok_s == 80.0
    path.write_text(json.dumps({"schema": "selfhost.bench.throughput/1", "output_tok_s": 0}))
    with pytest.raises(InvalidParameterError, match="output_tok_s"):
        read_bench_result(path)
    path.write_text("{not json")
    with pytest.raises(InvalidParameterError, match="not JSON"):
        read_bench_result(path)
    with pytest.raises(InvalidParameterError, match="cannot read"):
        read_bench_result(tmp_path / "missing.json")


def test_bench_result_names_its_model(tmp_path):
    from selfhost.plan.bench_result import measured_model_matches

    throughput = tmp_path / "t.json"
    throughput.write_text(json.dumps({"schema": "selfhost.bench.throughput/1", "output_tok_s": 9.0, "model": "qwen2.5:7b"}))
    assert read_bench_result(throughput).model == "qwen2.5:7b"
    full = tmp_path / "full.json"
    full.write_text(json.dumps({"schema": "selfhost.bench/1", "output_tok_s": 9.0, "endpoint": {"model": "x/y"}}))
    assert read_bench_result(full).model == "x/y"
    llama = get_model("llama3.1:8b")
    for same in ("llama3.1:8b", "meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B",
                 "/models/Llama-3.1-8B-Instruct"):
        assert measured_model_matches(same, llama), same
    for other in ("qwen2.5:7b", "Qwen/Qwen2.5-7B-Instruct", "/models/qwen", "gpt-4o"):
        assert not measured_model_matches(other, llama), other
