"""The Gradio chat UI in a real browser: headless Chromium (Debian's /usr/bin/chromium, driven by
playwright) opens the page of a server on a tiny LLaMA, sends a message, watches the reply stream in and
checks it against generate_ids; then the max-length slider, Regenerate and Clear.

Needs: apt-get install -y chromium; pip install playwright (no `playwright install`: we drive the system
browser)."""
import os
import re
import shutil
import tempfile
import time

import pytest

from test_serve import Server, free_port, reference  # noqa: F401  (fixtures; llama comes from conftest)

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing (apt-get install -y chromium)")
MAX_LENGTH = 12
# Replies the page shows exactly as text (no markdown syntax, control characters or U+FFFD).
PLAIN = re.compile(r"[A-Za-z0-9 \u4e00-\u9fff]+")


@pytest.fixture(scope="module")
def ui_server(tiny_dir, tmp_path_factory):
    ui_port = free_port()
    srv = Server(["--model_name_or_path", tiny_dir("llama"), "--port", str(ui_port), "--max_length", str(MAX_LENGTH), "--src_length", "64",
                  "--debug_step_delay", "0.1"], tmp_path_factory.mktemp("serve_ui") / "server.log")
    srv.ui_url = f"http://127.0.0.1:{ui_port}/"
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def page():
    try:
        from playwright import sync_api
    except ImportError:
        pytest.fail("playwright is missing: pip install playwright (it drives /usr/bin/chromium; no `playwright install` needed)")
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            yield browser.new_page()
        finally:
            browser.close()
            shutil.rmtree(profile, ignore_errors=True)


def plain_prompt(reference):
    """A prompt whose greedy reply (and its shorter version) renders as plain text, so the page shows it verbatim."""
    for i in range(200):
        prompt = f"spell: {i}"
        if PLAIN.fullmatch(reference([prompt], [], MAX_LENGTH)) and PLAIN.fullmatch(reference([prompt], [], 3)):
            return prompt
    pytest.fail("no prompt with a plain-text reply among 200 candidates")


def bot_messages(page):
    return page.evaluate("() => Array.from(document.querySelectorAll('[data-testid=\"bot\"]')).map(e => e.innerText.trim())")


def watch_reply(page, server, count: int, want: str, timeout: float = 60.0):
    """Poll the page until the count-th bot message equals `want`; returns every distinct text seen on the way."""
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        msgs = bot_messages(page)
        text = msgs[count - 1] if len(msgs) >= count else None
        if text is not None and (not seen or seen[-1] != text):
            seen.append(text)
        if text == want:
            break
        time.sleep(0.03)
    else:
        raise AssertionError(f"reply never became {want!r}; saw {seen}")
    # `want` may be a prefix on the way to a longer reply: it must still be the reply once the server is idle
    deadline = time.time() + timeout
    while time.time() < deadline and not (lambda h: h["running"] == 0 and h["queued"] == 0)(server.health()):
        time.sleep(0.05)
    time.sleep(0.3)  # the last update reaches the page
    assert bot_messages(page)[count - 1] == want
    return seen


def test_chat_page_streams_the_reply(ui_server, page, reference):
    prompt = plain_prompt(reference)
    want = reference([prompt], [], MAX_LENGTH)
    page.goto(ui_server.ui_url, wait_until="domcontentloaded")
    box = page.locator("#message textarea")
    box.wait_for(timeout=60000)
    box.fill(prompt)
    box.press("Enter")
    seen = watch_reply(page, ui_server, 1, want)
    # streamed: the page showed growing prefixes of the reply before the whole of it (12 tokens x 100 ms)
    assert len(seen) >= 3 and all(want.startswith(s) for s in seen), seen
    assert page.evaluate("() => document.querySelectorAll('[data-testid=\"user\"]').length") == 1

    # Regenerate replaces the last reply (greedy: the same one) instead of adding a turn
    page.locator("#regenerate").click()
    page.wait_for_function("() => document.querySelectorAll('[data-testid=\"bot\"]').length === 0 || "
                           "document.querySelector('[data-testid=\"bot\"]').innerText.trim().length < %d" % len(want), timeout=30000)
    watch_reply(page, ui_server, 1, want)
    assert len(bot_messages(page)) == 1

    # the max-length slider reaches the server: a second turn limited to 3 new tokens
    page.get_by_text("Generation settings").click()
    length = page.get_by_label("max length (new tokens)").first
    number = page.locator("input[type=number][aria-label='number input for max length (new tokens)']")
    target = number if number.count() else length
    target.fill("3")
    target.press("Enter")
    box.fill(prompt)
    box.press("Enter")
    short = reference([prompt, prompt], [want], 3)
    assert short != reference([prompt, prompt], [want], MAX_LENGTH)
    watch_reply(page, ui_server, 2, short)

    page.locator("#clear").click()
    page.wait_for_function("() => document.querySelectorAll('[data-testid=\"bot\"], [data-testid=\"user\"]').length === 0", timeout=30000)
