"""`selfhost prices` and `selfhost cost --api` end to end, through the real entry point."""

import http.server
import json
import subprocess
import sys
import threading

import pytest

# genai-prices 0.2.5 rates, US$ per million tokens (input / output): OpenAI gpt-4o 2.50 / 10;
# Claude Sonnet 4.5 3 / 15; Groq Llama 3.1 8B 0.05 / 0.08; Gemini 2.5 Pro 1.25 / 10 with
# 0.125 cached, and above 200K prompt tokens 2.5 / 15 / 0.25 cached.
SEED = ("cost", "llama3.1:8b", "--device", "rtx4090", "--price", "3500", "--volume", "1B", "--concurrency", "16",
        "--month", "2026-12")


def selfhost(*args, cache, **env):
    code = "import sys; from selfhost.cli.main import main; sys.argv = ['selfhost', *sys.argv[1:]]; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env={"COLUMNS": "1000", "PATH": "/usr/bin:/bin", "XDG_CACHE_HOME": str(cache), **env})


def test_cost_of_the_seed_scenario_equals_the_hand_computed_bills(tmp_path):
    out = selfhost(*SEED, "--api", "openai/gpt-4o", "--api", "claude-sonnet-4-5", "--api", "groq/llama-3.1-8b-instant",
                   "--out", str(tmp_path), cache=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = {row["api"]: row for row in json.loads((tmp_path / "cost.json").read_text())["apis"]}
    # 750M prompt and 250M output tokens a month.
    expected = {"openai/gpt-4o": 750 * 2.5 + 250 * 10, "anthropic/claude-sonnet-4-5": 750 * 3 + 250 * 15,
                "groq/llama-3.1-8b-instant": 750 * 0.05 + 250 * 0.08}
    assert {api: row["api_usd_per_month"] for api, row in rows.items()} == pytest.approx(expected)
    assert {row["price_as_of"] for row in rows.values()} == {"2026-11-19"}
    assert "4,375.00" in out.stdout and "6,000.00" in out.stdout and "57.50" in out.stdout


def test_cost_with_cached_prompts_and_long_requests_reaches_the_long_context_tier(tmp_path):
    # 300K-token requests carry 225K prompt tokens (> 200K); half of the 750M prompt tokens are cached.
    out = selfhost(*SEED, "--api", "google/gemini-2.5-pro", "--cached-share", "0.5", "--request-tokens", "300K",
                   "--out", str(tmp_path), cache=tmp_path)
    assert out.returncode == 0, out.stderr
    (row,) = json.loads((tmp_path / "cost.json").read_text())["apis"]
    assert row["api_usd_per_month"] == pytest.approx(375 * 2.5 + 375 * 0.25 + 250 * 15)


def test_cost_without_api_compares_the_default_set_each_with_its_date(tmp_path):
    out = selfhost(*SEED, "--out", str(tmp_path), cache=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "cost.json").read_text())["apis"]
    providers = {row["api"].split("/")[0] for row in rows}
    assert {"openai", "anthropic", "google", "deepseek", "mistral", "x-ai", "groq", "together", "fireworks",
            "openrouter"} <= providers
    assert all(row["price_as_of"] == "2026-11-19" and row["api_usd_per_month"] > 0 for row in rows)


def test_an_unpriced_api_is_left_out_with_a_warning_not_costed_at_zero(tmp_path):
    out = selfhost(*SEED, "--api", "openrouter/meta-llama/llama-3.1-8b-instruct:free", "--api", "gpt-4o",
                   "--out", str(tmp_path), cache=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "llama-3.1-8b-instruct:free: unpriced" in out.stdout
    assert [row["api"] for row in json.loads((tmp_path / "cost.json").read_text())["apis"]] == ["openai/gpt-4o"]


@pytest.mark.parametrize("args, message", [
    (("--api", "gpt4o"), "did you mean 'openai/gpt-4o'"),
    (("--api", "llama-3.1-8b-instant-groq"), "did you mean 'groq/llama-3.1-8b-instant'"),
    (("--api", "gpt-4o", "--cached-share", "1.5"), "--cached-share must be in [0, 1]"),
    (("--api", "gpt-4o", "--month", "Dec"), "--month must be YYYY-MM"),
])
def test_bad_api_input_is_one_line(tmp_path, args, message):
    out = selfhost(*SEED, *args, cache=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_prices_lists_rates_dates_and_sources_as_json(tmp_path):
    out = selfhost("prices", "--provider", "groq", "--model", "llama-3.1-8b", "--json", cache=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = {row["id"]: row for row in json.loads(out.stdout)}
    groq = rows["groq/llama-3.1-8b-instant"]
    assert (groq["input_usd_per_m"], groq["output_usd_per_m"], groq["as_of"]) == (0.05, 0.08, "2026-11-19")
    assert groq["source"] == "genai-prices 0.2.5: https://console.groq.com/docs/models"
    assert all(row_id.startswith("groq/") for row_id in rows)


def test_prices_table_shows_long_context_rates_and_price_changes(tmp_path):
    out = selfhost("prices", "--provider", "google", "--model", "gemini-2.5-pro", "--on", "2026-12-01", cache=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "google/gemini-2.5-pro" in out.stdout and ">200,000: in 2.500, out 15.000" in out.stdout
    changed = selfhost("prices", "--model", "mistral-large-4", "--on", "2026-10-21", "--json", cache=tmp_path)
    (row,) = [row for row in json.loads(changed.stdout) if row["id"] == "mistral/mistral-large-4"]
    assert (row["input_usd_per_m"], row["since"], row["next_change"]) == (1.36, "2026-10-20", "2026-10-29")


def test_prices_check_flags_entries_older_than_the_threshold(tmp_path):
    fresh = selfhost("prices", "--check", "--on", "2026-12-06", cache=tmp_path)
    assert fresh.returncode == 0, fresh.stderr
    assert "genai-prices 0.2.5" in fresh.stdout and "ok" in fresh.stdout
    stale = selfhost("prices", "--check", "--on", "2027-06-01", "--max-age-days", "90", cache=tmp_path)
    assert stale.returncode == 1 and "STALE" in stale.stdout and "Traceback" not in stale.stderr
    assert "older than 90 days" in stale.stderr


def test_overrides_from_the_operators_file(tmp_path):
    table = tmp_path / "prices.toml"
    table.write_text('[[price]]\nid = "acme/acme-8b"\nprovider = "Acme"\nmodel = "Acme 8B"\n'
                     'input_usd_per_m = 0.02\noutput_usd_per_m = 0.04\nas_of = 2026-12-01\n'
                     'source = "https://example.com/acme"\n')
    listed = selfhost("prices", "--provider", "acme", "--json", cache=tmp_path, SELFHOST_API_PRICES=str(table))
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert (row["id"], row["as_of"], row["source"], row["override"]) == (
        "acme/acme-8b", "2026-12-01", "https://example.com/acme", True)
    costed = selfhost(*SEED, "--api", "acme/acme-8b", "--out", str(tmp_path), cache=tmp_path,
                      SELFHOST_API_PRICES=str(table))
    assert costed.returncode == 0, costed.stderr
    (cost,) = json.loads((tmp_path / "cost.json").read_text())["apis"]
    assert cost["api_usd_per_month"] == pytest.approx(750 * 0.02 + 250 * 0.04)


def test_update_says_when_it_cannot_reach_the_source(tmp_path):
    out = selfhost("prices", "--update", cache=tmp_path, SELFHOST_PRICES_URL="http://127.0.0.1:9/data.json")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "cannot fetch newer prices from http://127.0.0.1:9/data.json" in out.stderr
    assert "still using genai-prices 0.2.5 of 2026-11-19" in out.stderr
    assert not (tmp_path / "selfhost" / "genai-prices.json").exists()


NEWER_DATA = [{"id": "acme", "name": "Acme", "api_pattern": "https://acme", "pricing_urls": ["https://acme/prices"],
               "models": [{"id": "acme-1", "match": {"equals": "acme-1"}, "prices": {"input_mtok": 1, "output_mtok": 2}}]}]


@pytest.fixture
def price_server():
    """genai-prices-format data over loopback HTTP, standing in for GitHub."""
    body = json.dumps(NEWER_DATA).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/data.json"
    server.shutdown()


def test_update_fetches_a_newer_snapshot_that_later_runs_use_offline(tmp_path, price_server):
    import datetime as dt

    out = selfhost("prices", "--update", cache=tmp_path, SELFHOST_PRICES_URL=price_server)
    assert out.returncode == 0, out.stderr
    assert "fetched 1 models from 1 providers" in out.stdout
    saved = json.loads((tmp_path / "selfhost" / "genai-prices.json").read_text())
    assert saved["providers"] == NEWER_DATA and saved["fetched"] == dt.date.today().isoformat()
    # A later run, with no URL and no server, reads the fetched data.
    listed = selfhost("prices", "--json", cache=tmp_path)
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert (row["id"], row["input_usd_per_m"], row["as_of"]) == ("acme/acme-1", 1.0, dt.date.today().isoformat())
    assert row["source"] == f"genai-prices data fetched from {price_server}: https://acme/prices"
