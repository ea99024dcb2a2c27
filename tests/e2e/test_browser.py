"""The Chat tab in a real browser: Debian's headless Chromium driven by Playwright.

Playwright's own browser download does not work here, so the system chromium is launched
through `executable_path`. Missing chromium skips these tests locally and fails them in CI.
"""
from __future__ import annotations

import time

import pytest
from playwright.sync_api import expect

from tests.support.app import CORRUPT_NAME, TIMEOUT_MS, TRUNCATED_NAME

pytestmark = pytest.mark.browser

# Lengths of the newest assistant message, recorded by the page on every DOM change, so a
# fast stream is seen growing even between two polls from Python.
WATCH_ANSWER_JS = """() => {
  const last = () => { const b = document.querySelectorAll('[data-testid="bot"]');
                       return b.length ? b[b.length - 1].innerText.length : 0; };
  window.answerLengths = last() ? [last()] : [];
  new MutationObserver(() => {
    const n = last(), seen = window.answerLengths;
    if (n && n !== seen[seen.length - 1]) seen.push(n);
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture
def page(browser, chat_server):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    # offline machine: requests for web fonts etc. would hang until they time out
    page.route(lambda url: not url.startswith(chat_server.url), lambda route: route.abort())
    page.goto(chat_server.url)
    chat_box(page).wait_for()
    yield page
    page.close()


def chat_box(page):
    # the placeholder goes away after the first message; the chat box comes before the
    # accordion's system-prompt textbox in the page
    return page.locator('textarea[data-testid="textbox"]').first


def send(page, text: str) -> None:
    box = chat_box(page)
    box.fill(text)
    box.press("Enter")


def bot_messages(page):
    return page.locator('[data-testid="bot"]')


def wait_until_done(page) -> None:
    page.locator("button.stop-button").wait_for(state="hidden")
    page.locator("button.submit-button").wait_for()


def test_typed_message_gets_a_streamed_answer(page, artifacts_dir):
    expect(page.get_by_text("Serving:")).to_be_visible()
    for name in (CORRUPT_NAME, TRUNCATED_NAME):  # listed as unusable, the chat still works
        expect(page.get_by_text(name)).to_be_visible()
    expect(page.get_by_role("button", name="Model and sampling")).to_have_count(1)  # once
    page.evaluate(WATCH_ANSWER_JS)
    send(page, "Tell me three facts about dogs.")
    page.locator('[data-testid="user"]').filter(has_text="three facts about dogs").wait_for()
    bot_messages(page).last.wait_for()
    wait_until_done(page)
    answer = bot_messages(page).last.inner_text().strip()
    lengths = page.evaluate("window.answerLengths")
    assert answer and len(lengths) >= 3, lengths  # it arrived in pieces that grew
    assert lengths[-1] == max(lengths) > lengths[0], lengths  # (markdown may shrink one)
    page.screenshot(path=str(artifacts_dir / "chat.png"), full_page=True)


def test_settings_accordion_holds_the_controls(page):
    page.get_by_role("button", name="Model and sampling").click()
    expect(page.get_by_label("System prompt")).to_have_value("You are a helpful assistant.")
    expect(page.get_by_role("combobox", name="Model")).to_have_value(
        "Active model (SmolLM2-135M-Instruct.Q4_1.gguf)")
    for label, default in [("Temperature", "0.7"), ("Top-p", "0.95"), ("Top-k", "40"),
                           ("Repetition penalty", "1.1"), ("Max new tokens", "512")]:
        expect(page.get_by_label(f"number input for {label}")).to_have_value(default)


def short_answer_s(chat_server) -> float:
    started = time.monotonic()
    assert chat_server.client().predict("Hi", temperature=0.0, max_new_tokens=16,
                                        api_name="/chat").strip()
    return time.monotonic() - started


def test_stop_button_ends_a_long_answer(page, chat_server):
    baseline_s = short_answer_s(chat_server)
    send(page, "Write a very long story about a dragon, at least 2000 words.")
    page.wait_for_function("""() => { const b = document.querySelectorAll('[data-testid="bot"]');
                                     return b.length && b[b.length - 1].innerText.length > 40; }""")
    page.locator("button.stop-button").click()
    wait_until_done(page)
    stopped = bot_messages(page).last.inner_text()
    # the server stopped decoding too: the next request does not queue behind ~450 tokens
    assert short_answer_s(chat_server) < 3 * baseline_s + 1.0
    assert bot_messages(page).last.inner_text() == stopped  # nothing arrived after Stop
    send(page, "What is the capital of Germany?")  # and this page still chats
    page.locator('[data-testid="bot"]').nth(1).wait_for()
    wait_until_done(page)
    assert bot_messages(page).nth(1).inner_text().strip()


def test_retry_and_clear(page):
    send(page, "Say hello.")
    bot_messages(page).last.wait_for()
    wait_until_done(page)
    page.evaluate(WATCH_ANSWER_JS)
    page.get_by_role("button", name="Retry").click()
    page.wait_for_function("window.answerLengths.length > 1")  # a new answer is streaming
    wait_until_done(page)
    expect(page.locator('[data-testid="user"]')).to_have_count(1)  # retried, not re-asked
    expect(bot_messages(page)).to_have_count(1)
    assert bot_messages(page).last.inner_text().strip()
    page.get_by_role("button", name="Clear").click()
    expect(page.locator('[data-testid="user"]')).to_have_count(0)
    expect(bot_messages(page)).to_have_count(0)
