"""The commands end to end, through the real entry point, so errors print as one line."""

import subprocess
import sys

import pytest


def selfhost(*args):
    code = "import sys; from selfhost.cli.main import main; sys.argv = ['selfhost', *sys.argv[1:]]; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})


def test_models_filters():
    out = selfhost("models", "--family", "qwen2.5", "--max-params", "8B")
    assert out.returncode == 0, out.stderr
    assert "qwen2.5:7b" in out.stdout and "qwen2.5:14b" not in out.stdout


def test_fit_and_ranking():
    out = selfhost("fit", "llama3.1:8b", "--device", "rtx4090", "--monthly-users", "800M")
    assert out.returncode == 0, out.stderr
    assert "fits" in out.stdout and "700,000,000" in out.stdout
    ranked = selfhost("fit", "--device", "custom", "--mem", "16GB", "--bandwidth", "100GB/s", "--quant", "int4", "--top", "5")
    assert ranked.returncode == 0, ranked.stderr
    assert "int4" in ranked.stdout
    int8_kv = selfhost("fit", "llama3.1:8b", "--device", "rtx4090", "--kv-cache-dtype", "int8")
    assert int8_kv.returncode == 0, int8_kv.stderr
    assert "fp16 + int8 KV" in int8_kv.stdout


def test_cost_writes_report(tmp_path):
    out = selfhost("cost", "llama3.1:8b", "--device", "rtx4090", "--volume", "1B", "--api", "gpt-4o",
                   "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "crossover" in out.stdout
    assert (tmp_path / "cost.png").stat().st_size > 0 and (tmp_path / "cost.html").stat().st_size > 0


@pytest.mark.parametrize("args, message", [
    (("fit", "lama3.1:8b", "--device", "rtx4090"), "did you mean 'llama3.1:8b'"),
    (("fit", "llama3.1:8b", "--device", "rtx490"), "did you mean 'rtx4090'"),
    (("fit", "llama3.1:8b", "--device", "custom", "--mem", "16GB", "--bandwidth", "0GB/s"), "--bandwidth='0GB/s'"),
    (("fit", "llama3.1:8b", "--device", "custom", "--mem", "16GB"), "needs --mem"),
    (("fit", "llama3.1:8b", "--concurrency", "0"), "--concurrency must be > 0"),
    (("fit", "llama3.1:8b", "--kv-cache-dtype", "fp8"), "unknown KV cache dtype 'fp8'"),
    (("fit", "--kv-cache-dtype", "int8"), "--kv-cache-dtype plans one model"),
    (("cost", "llama3.1:8b", "--volume", "-5M"), "--volume"),
    (("cost", "llama3.1:405b", "--device", "rtx4090", "--volume", "1B"), "usable"),
])
def test_bad_input_is_one_line_without_traceback(args, message):
    out = selfhost(*args)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert message in out.stderr


def _html_table(path):
    """Rows of <th>/<td> texts of the page's table."""
    from html.parser import HTMLParser

    class Cells(HTMLParser):
        def __init__(self):
            super().__init__()
            self.rows, self.cell = [], None

        def handle_starttag(self, tag, attrs):
            if tag == "tr":
                self.rows.append([])
            elif tag in ("td", "th"):
                self.cell = ""

        def handle_data(self, data):
            if self.cell is not None:
                self.cell += data

        def handle_endtag(self, tag):
            if tag in ("td", "th"):
                self.rows[-1].append(self.cell.strip())
                self.cell = None

    parser = Cells()
    parser.feed(path.read_text())
    return parser.rows


def test_cost_report_rows_have_a_cell_under_every_header(tmp_path):
    import json

    out = selfhost("cost", "llama3.1:8b", "--device", "rtx4090", "--volume", "1B", "--api", "gpt-4o",
                   "--api", "gpt-4o-mini", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    header, *rows = _html_table(tmp_path / "cost.html")
    assert "self $/M" in header and len(rows) == 2
    assert all(len(row) == len(header) for row in rows)
    by_header = dict(zip(header, rows[0]))
    summary = json.loads((tmp_path / "cost.json").read_text())
    assert by_header["self $/M"] == f"{summary['apis'][0]['self_usd_per_m_tokens']:,.3f}"
    assert by_header["API $/M"] == f"{summary['apis'][0]['api_usd_per_m_tokens']:,.2f}"


def test_a_break_even_beyond_any_horizon_is_never_everywhere(tmp_path):
    import json

    out = selfhost("cost", "llama3.1:8b", "--device", "rtx4090", "--volume", "1", "--api", "gpt-4o",
                   "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "366,097" not in out.stdout and "never" in out.stdout
    header, row = _html_table(tmp_path / "cost.html")
    assert dict(zip(header, row))["break-even month"] == "never"
    assert json.loads((tmp_path / "cost.json").read_text())["apis"][0]["break_even_months"] is None


def test_fit_on_a_cpu_defaults_to_fp32_as_the_engine_runs():
    from selfhost.device import pick_dtype
    from selfhost.plan.precision import default_precision

    import torch

    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert default_precision("cpu").name == "fp32" and default_precision("gpu").name == "fp16"
    cpu = selfhost("fit", "qwen2.5:0.5b", "--device", "custom", "--kind", "cpu", "--mem", "16GB", "--bandwidth", "50GB/s")
    assert cpu.returncode == 0, cpu.stderr
    assert "cpu, fp32," in cpu.stdout
    gpu = selfhost("fit", "qwen2.5:0.5b", "--device", "rtx4090")
    assert "GB), fp16," in gpu.stdout


@pytest.mark.parametrize("ref", ["meta-llama/Llama-3.1-8B", "HuggingFaceTB/SmolLM2-135M", "selfhost/shakespeare",
                                 "src/selfhost/assets/shakespeare"])
def test_fit_and_cost_take_the_references_the_help_promises(ref):
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    ref = str(root / ref) if ref.startswith("src/") else ref
    out = selfhost("fit", ref, "--device", "rtx4090")
    assert out.returncode == 0, out.stderr
    assert "fits" in out.stdout
    priced = selfhost("cost", ref, "--device", "rtx4090", "--volume", "1B", "--api", "gpt-4o")
    assert priced.returncode == 0, priced.stderr


@pytest.mark.parametrize("ref", ["gpt-oss:20b", "openai/gpt-oss-120b"])
def test_fit_and_cost_of_gpt_oss(ref):
    # At 4 bits both fit one 80 GB card, as OpenAI says of its MXFP4 release.
    out = selfhost("fit", ref, "--device", "h100", "--quant", "int4")
    assert out.returncode == 0, out.stderr
    assert "fits" in out.stdout
    priced = selfhost("cost", ref, "--device", "h100", "--quant", "int4", "--volume", "1B", "--api", "gpt-4o")
    assert priced.returncode == 0, priced.stderr
    assert "crossover" in priced.stdout


def test_cost_refuses_a_bench_result_of_another_model(tmp_path):
    import json

    result = tmp_path / "qwen.json"
    result.write_text(json.dumps({"schema": "selfhost.bench.throughput/1", "output_tok_s": 50.0, "model": "qwen2.5:7b"}))
    out = selfhost("cost", "llama3.1:8b", "--volume", "1B", "--bench-result", str(result))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "measured model 'qwen2.5:7b', not llama3.1:8b" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    forced = selfhost("cost", "llama3.1:8b", "--volume", "1B", "--bench-result", str(result), "--any-bench-model")
    assert forced.returncode == 0, forced.stderr
    same = selfhost("cost", "qwen2.5:7b", "--volume", "1B", "--bench-result", str(result))
    assert same.returncode == 0, same.stderr


def test_fit_estimates_speculative_decoding():
    out = selfhost("fit", "llama3.1:8b", "-d", "rtx4090", "--speculative-acceptance", "0.7", "--draft", "llama3.2:1b")
    assert out.returncode == 0, out.stderr
    assert "speculative (draft llama3.2:1b, K=4, acceptance 0.70)" in out.stdout and "x plain decoding" in out.stdout
    bad = selfhost("fit", "llama3.1:8b", "--speculative-acceptance", "1.5")
    assert bad.returncode == 1 and "between 0 and 1" in bad.stderr and "Traceback" not in bad.stderr
