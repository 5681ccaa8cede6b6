"""The chat page at `/` in a real headless Chromium (Debian's package, driven by Playwright; no browser download)."""

import shutil

import pytest

pytestmark = pytest.mark.slow  # every test here needs a training run, a server or a browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
MESSAGE = "你好，今天过得怎么样？"
TIMEOUT_MS = 180_000


@pytest.fixture(scope="module")
def page(server):
    if not shutil.which(CHROMIUM):
        pytest.skip("Chromium is not installed (apt-get install chromium; .ci/run does it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 700})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(server.url)
            page.fill("#api_key", server.api_key)
            page.dispatch_event("#api_key", "change")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('ready')")
            # A seed and temperature with which the smoke run's fine-tuned reply is several characters long.
            page.fill("#seed", "5")
            page.fill("#temperature", "1")
            page.fill("#max_tokens", "24")
            yield page
        finally:
            browser.close()


def send(page, text: str) -> list[dict]:
    """Type `text`, press Enter and wait for every shown pane's reply; the bodies of the requests it made."""
    sent = []

    def record(request):
        if request.url.endswith("/v1/chat/completions"):
            sent.append(request.post_data_json)

    page.on("request", record)
    try:
        page.fill("#message", text)
        page.press("#message", "Enter")
        page.wait_for_function(
            "[...document.querySelectorAll('.pane')].filter(p => p.style.display !== 'none')"
            ".every(p => { const r = p.querySelectorAll('.msg.assistant'); "
            "return r.length && r[r.length - 1].dataset.state === 'done'; })"
        )
    finally:
        page.remove_listener("request", record)
    return sent


def replies(page, pane: str) -> list[dict]:
    return page.eval_on_selector_all(
        f"#{pane} .msg", "els => els.map(e => ({cls: e.className, text: e.textContent, chunks: e.dataset.chunks}))"
    )


def test_page_streams_both_replies_and_reset_clears_the_history(page, server):
    assert page.inner_text("#tuned h2") == f"Fine-tuned: {server.tuned}"
    assert page.inner_text("#base h2") == f"Base: {server.base}"

    requests = send(page, MESSAGE)
    assert sorted(r["model"] for r in requests) == sorted([server.tuned, server.base])
    assert all(r["stream"] and r["messages"] == [{"role": "user", "content": MESSAGE}] for r in requests)
    for pane in ("tuned", "base"):
        user, reply = replies(page, pane)
        assert user == {"cls": "msg user", "text": MESSAGE, "chunks": None}
        assert reply["cls"] == "msg assistant" and reply["text"].strip()
        assert int(reply["chunks"]) >= 2, reply  # streamed in: several events, not one answer

    second = send(page, "再说一遍")
    assert all(len(r["messages"]) == 3 for r in second)  # the conversation is remembered
    page.click("#reset")
    assert replies(page, "tuned") == [] and replies(page, "base") == []
    after_reset = send(page, MESSAGE)
    assert all(r["messages"] == [{"role": "user", "content": MESSAGE}] for r in after_reset)
    page.screenshot(path=str(server.log.parent / "serve.png"))


def test_switching_the_comparison_off_asks_the_fine_tuned_model_only(page, server):
    page.click("#reset")
    page.uncheck("#compare")
    assert not page.is_visible("#base")
    requests = send(page, MESSAGE)
    assert [r["model"] for r in requests] == [server.tuned]
    assert replies(page, "base") == []
    page.check("#compare")
