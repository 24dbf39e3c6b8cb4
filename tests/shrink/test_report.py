"""The shrink report: variant names, the frontier, and a whole report written for a tiny model."""

import json

import pytest

from selfhost.errors import InvalidParameterError
from selfhost.shrink.report import Variant, VariantRow, frontier, parse_variants


def test_variants_name_the_base_precisions_folders_and_quantized_folders(tmp_path):
    pruned = tmp_path / "pruned"
    variants = parse_variants(f"fp32,int8,int4,{pruned},{pruned}+int8", "base")
    assert variants == [
        Variant("fp32", "base", None), Variant("int8", "base", "int8"), Variant("int4", "base", "int4"),
        Variant("pruned", str(pruned), None), Variant("pruned+int8", str(pruned), "int8"),
    ]


@pytest.mark.parametrize("spec, message", [("fp32,,int8", "empty entry"), ("fp32,int8,int8", "twice")])
def test_bad_variant_lists_are_refused(spec, message):
    with pytest.raises(InvalidParameterError, match=message):
        parse_variants(spec, "base")


def test_the_frontier_keeps_what_nothing_beats_on_both_memory_and_perplexity():
    rows = [VariantRow("fp32", 10, 1000, 1, 1, 20.0), VariantRow("int8", None, 260, 1, 1, 20.1),
            VariantRow("pruned", 7, 700, 1, 1, 22.0), VariantRow("pruned+int8", None, 180, 1, 1, 22.1),
            VariantRow("worse", 9, 900, 1, 1, 25.0)]
    assert frontier(rows) == ["pruned+int8", "int8", "fp32"]


def test_shrink_report_writes_table_json_and_plot(teacher_dir, corpus_file, tmp_path):
    from typer.testing import CliRunner

    from tests.shrink.test_cli import cli_app

    pruned = tmp_path / "pruned"
    runner = CliRunner()
    result = runner.invoke(cli_app(), ["prune", str(teacher_dir), "-o", str(pruned), "--drop-layers", "1",
                                       "--calibration", str(corpus_file), "--calibration-window", "32",
                                       "--no-progress"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "report"
    result = runner.invoke(cli_app(), ["shrink-report", str(teacher_dir), "--text", str(corpus_file), "--out", str(out),
                                       "--variants", f"fp32,int8,{pruned},{pruned}+int8", "--repeats", "1",
                                       "--batch-size", "2", "--decode-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["frontier.png", "shrink_report.json", "shrink_report.md"]
    report = json.loads((out / "shrink_report.json").read_text())
    rows = {r["name"]: r for r in report["variants"]}
    assert list(rows) == ["fp32", "int8", "pruned", "pruned+int8"]
    assert rows["pruned"]["num_params"] < rows["fp32"]["num_params"]
    assert rows["pruned+int8"]["weight_bytes"] < rows["int8"]["weight_bytes"] < rows["fp32"]["weight_bytes"]
    assert rows["int8"]["perplexity"] == pytest.approx(rows["fp32"]["perplexity"], rel=0.05)
    assert set(report["frontier"]) <= set(rows) and "pruned+int8" in report["frontier"]  # the smallest always is
    assert "| pruned+int8 |" in (out / "shrink_report.md").read_text()


def test_speeds_are_timed_in_turn_each_repeat_running_every_variant_once():
    from types import SimpleNamespace

    from selfhost.shrink import report

    calls = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def generate(self, prompts, params):
            calls.append(self.name)
            return [SimpleNamespace(token_ids=[0] * params.max_tokens) for _ in prompts]

    rates = report._interleaved_tok_s([(Fake("a"), [[1]], 4), (Fake("b"), [[1], [2]], 3)], repeats=3)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # one warm-up each, then alternating
    assert len(rates) == 2 and all(r > 0 for r in rates)


@pytest.mark.parametrize("free_bytes,groups", [(10**12, [3]), (4 * 150, [1, 1, 1]), (4 * 250, [2, 1])])
def test_variants_are_loaded_side_by_side_while_a_quarter_of_free_memory_holds_them(monkeypatch, free_bytes, groups):
    from selfhost.shrink import report

    variants = [Variant(name, "m", None) for name in ("fp32", "a", "b")]
    monkeypatch.setattr("selfhost.host_memory.available_memory_bytes", lambda: free_bytes)
    monkeypatch.setattr(report, "_load", lambda v, ids, s: report._Loaded(v, None, [], [], 1, 100))
    measured = []

    def measure(group, eval_ids, settings):
        measured.append(len(group))
        return [VariantRow(g.variant.name, None, g.weight_bytes, 1.0, 1.0, 1.0) for g in group]

    monkeypatch.setattr(report, "_measure_group", measure)
    rows = report.measure_all(variants, [1] * 64, report.MeasureSettings())
    assert measured == groups
    assert [r.name for r in rows] == ["fp32", "a", "b"]  # in the variants' order whatever the grouping
