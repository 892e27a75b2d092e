"""The chat page at ``/`` in a real browser (Debian's Chromium, driven by Playwright) against
the tiny model served over HTTP: an image attached and a question asked, the answer streamed in
and equal to the API's own answer to the same request, a second turn carrying the first, Stop,
drag and drop, and an error shown."""

import contextlib
import json
import shutil
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageDraw

import servehelp
from servehelp import served, tiny_model  # noqa: F401

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = Path("/tmp/interleaf-page.png")
COMPLETIONS = "/v1/chat/completions"
MAX_TOKENS = 24

# Every change to a streaming answer, with the state of the buttons at that moment.
OBSERVER = """
window.__seen = [];
new MutationObserver(() => {
  for (const el of document.querySelectorAll('.assistant[data-streaming="true"]')) {
    window.__seen.push({
      text: el.textContent,
      send: document.getElementById("send").disabled,
      stop: !document.getElementById("stop").hidden,
    });
  }
}).observe(document, { subtree: true, childList: true, characterData: true });
"""

DROP = """([b64, name]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const dt = new DataTransfer();
  dt.items.add(new File([bytes], name, { type: "image/png" }));
  document.body.dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true }));
}"""


def picture(path: Path) -> bytes:
    image = Image.new("RGB", (96, 96), (235, 240, 250))
    draw = ImageDraw.Draw(image)
    draw.rectangle((8, 50, 88, 88), fill=(60, 140, 80))
    draw.ellipse((52, 10, 84, 42), fill=(250, 190, 40))
    draw.polygon([(12, 50), (36, 18), (60, 50)], fill=(200, 60, 50))
    image.save(path, format="PNG")
    return path.read_bytes()


def direct(served, body: dict) -> str:
    """The API's answer to the same request, not streamed."""
    r = httpx.post(
        served.url + COMPLETIONS,
        json={**body, "stream": False},
        headers={"Authorization": f"Bearer {servehelp.API_KEY}"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def streamed(served, body: dict) -> list[str]:
    """The API's answer to the same request, streamed: its content pieces."""
    pieces = []
    headers = {"Authorization": f"Bearer {servehelp.API_KEY}"}
    with httpx.stream("POST", served.url + COMPLETIONS, json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"]
                if delta.get("content"):
                    pieces.append(delta["content"])
    return pieces


# The tiny random model's greedy answer depends on the CPU's rounding; the page is seen to grow
# only if the answer comes in several visible pieces: the first of these questions that does.
QUESTIONS = (
    "What is in this picture?",
    "Describe this picture.",
    "What do you see here?",
    "Tell me about the image.",
    "What shapes are there?",
    "Which colours can you see?",
)


def question_that_streams(served, raw: bytes) -> str:
    for question in QUESTIONS:
        content = [
            {"type": "image_url", "image_url": {"url": servehelp.data_url(raw)}},
            {"type": "text", "text": question},
        ]
        body = {
            "model": servehelp.MODEL_NAME,
            "messages": [{"role": "user", "content": content}],
            "stream": True,
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
        }
        if sum(1 for piece in streamed(served, body) if piece.strip()) >= 4:
            return question
    pytest.fail(f"none of {len(QUESTIONS)} questions gets an answer of 4 visible pieces from the tiny model")


def ask(page, text: str, *, enter: bool = False) -> dict:
    """Type ``text``, send it, and return the JSON body the page posted."""
    page.fill("#message", text)
    with page.expect_request(lambda r: r.url.endswith(COMPLETIONS) and r.method == "POST") as request:
        if enter:
            page.press("#message", "Enter")
        else:
            page.click("#send")
    return request.value


def finished_answer(page, index: int) -> str:
    """The text of the ``index``-th answer once it has finished streaming."""
    from playwright.sync_api import expect

    answer = page.locator(".assistant").nth(index)
    expect(answer).to_have_attribute("data-streaming", "false")
    return answer.evaluate("el => el.textContent")


def test_chat_page(served, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    from playwright.sync_api import expect, sync_playwright

    raw = picture(tmp_path / "picture.png")
    question = question_that_streams(served, raw)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 820})
            page.set_default_timeout(30_000)
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.add_init_script(OBSERVER)
            page.goto(served.url + "/")
            expect(page.locator("#model-name")).to_have_text(servehelp.MODEL_NAME)
            # the page's default (128) capped at the server's limit, which /health tells it
            expect(page.locator("#max-tokens")).to_have_value(str(served.options.limits.max_tokens))
            expect(page.locator("#temperature")).to_have_value("0")
            expect(page.locator("#stop")).to_be_hidden()

            page.fill("#api-key", servehelp.API_KEY)
            page.fill("#max-tokens", str(MAX_TOKENS))
            page.set_input_files("#file", str(tmp_path / "picture.png"))
            expect(page.locator("#attachments img")).to_have_count(1)

            # -- the first turn: an image and a question -----------------------------------
            request = ask(page, question)
            body = json.loads(request.post_data)
            assert body["model"] == servehelp.MODEL_NAME
            assert body["stream"] is True
            assert body["max_tokens"] == MAX_TOKENS and body["temperature"] == 0
            assert body["messages"] == [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": servehelp.data_url(raw)}},
                        {"type": "text", "text": question},
                    ],
                }
            ]
            first = finished_answer(page, 0)
            assert first, "the answer is empty"
            assert first == direct(served, body)
            expect(page.locator("#send")).to_be_enabled()
            expect(page.locator("#stop")).to_be_hidden()
            expect(page.locator("#attachments img")).to_have_count(0)
            expect(page.locator("#message")).to_have_value("")

            # It streamed: the server sends it in pieces, and the page showed it growing while
            # Send was disabled and Stop shown.
            pieces = streamed(served, body)
            assert len(pieces) > 1 and "".join(pieces) == first
            seen = page.evaluate("window.__seen")
            growing = {s["text"] for s in seen if s["text"]}
            assert len(growing) >= 2, seen
            assert all(s["send"] and s["stop"] for s in seen)

            # The user's message shows its image.
            thumb = page.locator(".user img").first
            expect(thumb).to_be_visible()
            assert thumb.evaluate("img => img.naturalWidth") == 96
            assert page.locator(".user").first.text_content() == question
            page.screenshot(path=str(tmp_path / "page.png"))
            shutil.copyfile(tmp_path / "page.png", SCREENSHOT)

            # -- the second turn carries the first, image included ---------------------------
            request = ask(page, "And what colour is the sun?", enter=True)
            body = json.loads(request.post_data)
            assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
            assert body["messages"][0]["content"][0] == {
                "type": "image_url",
                "image_url": {"url": servehelp.data_url(raw)},
            }
            assert body["messages"][1]["content"] == first
            assert body["messages"][2]["content"] == [{"type": "text", "text": "And what colour is the sun?"}]
            second = finished_answer(page, 1)
            assert second == direct(served, body)
            expect(page.locator(".user")).to_have_count(2)
            expect(page.locator(".assistant")).to_have_count(2)

            # -- Stop aborts an answer that has not come: the turn goes back to the composer ----
            held = []

            def hold(route):
                held.append(route)

            page.route("**" + COMPLETIONS, hold)
            page.fill("#message", "Never answered")
            page.click("#send")
            expect(page.locator("#send")).to_be_disabled()
            expect(page.locator("#stop")).to_be_visible()
            page.click("#stop")
            expect(page.locator("#send")).to_be_enabled()
            expect(page.locator("#stop")).to_be_hidden()
            expect(page.locator(".assistant")).to_have_count(2)
            expect(page.locator(".user.failed")).to_have_count(1)
            expect(page.locator("#message")).to_have_value("Never answered")
            page.unroute("**" + COMPLETIONS, hold)
            for route in held:
                with contextlib.suppress(Exception):  # the page has already given up on it
                    route.abort()

            # -- drag and drop attaches; the thumbnail's button removes it ---------------------
            page.evaluate(DROP, [servehelp.data_url(raw).split(",", 1)[1], "dropped.png"])
            expect(page.locator("#attachments img")).to_have_count(1)
            page.click("#attachments .remove")
            expect(page.locator("#attachments img")).to_have_count(0)

            # -- an error is shown with the server's message --------------------------------
            page.fill("#api-key", "sk-wrong")
            ask(page, "Who am I?")
            expect(page.locator("#messages .error")).to_contain_text("API key")
            expect(page.locator("#send")).to_be_enabled()

            # -- New chat clears the conversation; the key outlives a reload ------------------
            page.click("#new-chat")
            expect(page.locator("#messages .user")).to_have_count(0)
            expect(page.locator("#messages .assistant")).to_have_count(0)
            expect(page.locator("#messages .error")).to_have_count(0)
            page.reload()
            expect(page.locator("#api-key")).to_have_value("sk-wrong")
            assert errors == []
        finally:
            browser.close()
