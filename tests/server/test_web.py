"""The chat page in headless Chromium (Playwright driving Debian's /usr/bin/chromium).

CI needs: `apt-get install -y chromium` and `pip install playwright` (the dev extra);
Playwright's own browser download is not used.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.server.conftest import MODEL

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install -y chromium)")


@pytest.fixture
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        page = browser.new_page()
        yield page
        browser.close()


def test_chat_streams_into_the_page_and_stats_update(server, page):
    page.goto(server.url + "/")
    page.wait_for_function(f"document.querySelector('#model').value === '{MODEL}'", timeout=20_000)
    page.fill("#max-tokens", "40")
    page.fill("#prompt", "To be, or not to be")
    # Record whether text showed up while the reply was still streaming (not only at the end).
    page.evaluate("""() => new MutationObserver(() => {
        const el = document.querySelector('.msg.assistant');
        if (el && el.classList.contains('streaming') && el.textContent.length > 0) window.sawPartial = true;
    }).observe(document.querySelector('#messages'), {subtree: true, childList: true, characterData: true})""")
    page.click("#send")
    page.wait_for_selector(".msg.user")
    page.wait_for_selector(".msg.assistant:not(.streaming)", timeout=60_000)
    assert page.evaluate("window.sawPartial === true")
    assert page.text_content(".msg.assistant")
    assert page.text_content(".msg.user") == "To be, or not to be"
    assert page.text_content("#error") == ""
    page.wait_for_function("document.querySelector('#stat-running').textContent !== '–'", timeout=10_000)
    assert "%" in page.text_content("#stat-kv")


def test_tool_calls_show_in_the_conversation_and_results_go_back(server, page):
    tools = ('[{"type": "function", "function": {"name": "add", "parameters": {"type": "object", '
             '"properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["a"]}}}]')
    page.goto(server.url + "/")
    page.wait_for_function(f"document.querySelector('#model').value === '{MODEL}'", timeout=20_000)
    page.click("#tools-box summary")
    page.fill("#tools", tools)
    page.select_option("#tool-choice", "required")
    page.fill("#temperature", "0")
    page.fill("#prompt", "What is 2 + 3?")
    page.click("#send")
    page.wait_for_selector(".msg.tool-call", timeout=60_000)
    # The block shows as soon as the name is written; the arguments fill in as they stream.
    page.wait_for_function("document.querySelector('#prompt').placeholder.includes('Result of add')",
                           timeout=60_000)
    call = page.text_content(".msg.tool-call")
    name, _, arguments = call.partition("(")
    assert name == "add" and 0 <= json.loads(arguments.removesuffix(")"))["a"] <= 9
    assert "Result of add" in page.get_attribute("#prompt", "placeholder")
    page.select_option("#tool-choice", "none")
    page.fill("#prompt", "5")
    page.click("#send")
    page.wait_for_selector(".msg.tool-result", timeout=10_000)
    page.wait_for_selector(".msg.assistant:not(.streaming)", timeout=60_000)
    assert page.text_content(".msg.tool-result") == "5"
    assert page.text_content("#error") == ""
