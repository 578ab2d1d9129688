"""The chat page at / in headless Chromium (Debian's chromium, driven by Playwright): a streamed reply appears."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.server.conftest import API_KEY, LiveServer

sync_api = pytest.importorskip("playwright.sync_api")

# Counts how the assistant's reply grows: one entry per DOM change, the reply's length at that moment.
WATCH_REPLY = """
() => {
  window.replyLengths = [];
  new MutationObserver(() => {
    const body = document.querySelector('.msg.assistant .body');
    if (body) window.replyLengths.push(body.textContent.length);
  }).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});
}
"""


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; scripts/test.sh installs it (apt package chromium)")
        pytest.skip("chromium is not installed (scripts/test.sh installs it)")
    return path


def test_chat_page_streams_a_reply(server: LiveServer) -> None:
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        browser = playwright.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            assert page.title()
            page.fill("#api-key", API_KEY)
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "32")
            page.evaluate(WATCH_REPLY)
            page.fill("#input", "Say hello in Chinese (你好) and show one line of Python.")
            page.press("#input", "Enter")

            stats = page.locator(".msg.assistant .stats")
            sync_api.expect(stats).to_contain_text("tokens/s", timeout=120_000)
            assert "error" not in stats.inner_text()
            assert "32 tokens" in stats.inner_text()
            assert page.locator(".msg.user .body").inner_text() == \
                "Say hello in Chinese (你好) and show one line of Python."
            reply = page.locator(".msg.assistant .body").text_content() or ""
            assert reply.strip()
            lengths = page.evaluate("window.replyLengths")
            growing = sorted({n for n in lengths if n > 0})
            assert len(growing) >= 3, f"the reply did not arrive in pieces: {lengths}"
            assert growing[-1] == len(reply)
            assert page.locator("#send").is_enabled()
        finally:
            browser.close()
