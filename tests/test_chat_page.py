"""The API's chat page against a live loopback swarm: served at `/`, and driven in headless Chromium over the
DevTools protocol (a message typed, its answer streamed token by token, the same as the API's non-streamed one)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import signal
import time
import urllib.request

import pytest
from browser import HEADLESS_FLAGS, chromium_binary

PROMPT = "Hello, swarm!"
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def api(swarm) -> str:
    return swarm.start_api("--codec", "none", name="chat-api")  # codec none: exact, so the page's answer is known


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.loads(reply.read())


def test_page_is_served_at_the_root(api):
    with urllib.request.urlopen(api, timeout=30) as reply:
        assert reply.status == 200 and reply.headers.get_content_type() == "text/html"
        page = reply.read().decode()
    for element in ('id="prompt"', 'id="send"', 'id="messages"', 'id="model"', 'name="viewport"'):
        assert element in page
    assert "innerHTML" not in page and "http://" not in page and "https://" not in page  # no markup, no CDN


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: it reads
    commands from fd 3 and writes replies and events to fd 4, NUL-terminated JSON), attached to one page."""

    def __init__(self, tmp_path):
        binary = chromium_binary()
        commands_read, commands_write = os.pipe()
        events_read, events_write = os.pipe()
        argv = [
            binary,
            *HEADLESS_FLAGS,
            "--hide-scrollbars",
            "--remote-debugging-pipe",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "about:blank",
        ]
        self.log = tmp_path / "chromium.log"
        log = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:  # its own process group, so that killing it takes its renderers along
            self.pid = os.posix_spawn(
                binary,
                argv,
                os.environ,
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, commands_read, 3),
                    (os.POSIX_SPAWN_DUP2, events_write, 4),
                    (os.POSIX_SPAWN_DUP2, log, 1),
                    (os.POSIX_SPAWN_DUP2, log, 2),
                ],
                setpgroup=0,
            )
        finally:
            for fd in (commands_read, events_write, log):
                os.close(fd)
        self.commands = open(commands_write, "wb")  # noqa: SIM115 - closed in close()
        self.events = events_read
        self.buffer = b""
        self.last_id = 0
        self.session = None
        try:
            page = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
            self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        except BaseException:
            self.close()
            raise

    def call(self, method: str, timeout: float = 30.0, **params) -> dict:
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params}
        if self.session is not None:
            message["sessionId"] = self.session
        self.commands.write(json.dumps(message).encode() + b"\0")
        self.commands.flush()
        deadline = time.monotonic() + timeout
        while True:
            reply = self._receive(deadline, method)
            if reply.get("id") == self.last_id:  # anything else is an event, which nothing here waits for
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply["result"]

    def _receive(self, deadline: float, method: str) -> dict:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            assert left > 0 and select.select([self.events], [], [], left)[0], f"Chromium did not answer {method}"
            chunk = os.read(self.events, 1 << 20)
            assert chunk, f"Chromium exited:\n{self.log.read_text()[-3000:]}"
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (awaited when it is a promise)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, f"{expression}: {result['exceptionDetails']}"
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)):
            error = self.evaluate("(e => e.hidden ? '' : e.textContent)(document.getElementById('error'))")
            assert time.monotonic() < deadline, f"no {what} after {timeout} s; the page shows: {error!r}"
            time.sleep(0.1)
        return value

    def resize(self, width: int, height: int, mobile: bool = False) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=mobile)

    def open(self, url: str) -> None:
        self.call("Page.enable")
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'", 30, "page load")

    def screenshot(self, path) -> bytes:
        data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        path.write_bytes(data)
        return data

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        self.commands.close()
        os.close(self.events)


@pytest.fixture
def chromium(tmp_path):
    browser = Chromium(tmp_path)
    try:
        yield browser
    finally:
        browser.close()


def open_chat(chromium: Chromium, api: str, width: int = 1280, height: int = 900, mobile: bool = False) -> str:
    """Opens the page at that size, waits for the model list, and returns the model picked."""
    chromium.resize(width, height, mobile)
    chromium.open(api)
    return chromium.wait_for("document.getElementById('model').value", 30, "model in the select")


# records the length of the last assistant bubble's text at every change, as the page sees it
WATCH_ANSWERS = """
window.answerLengths = [];
new MutationObserver(() => {
    const answers = document.querySelectorAll('#messages .assistant');
    if (answers.length) window.answerLengths.push(answers[answers.length - 1].textContent.length);
}).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
"""


def answer(chromium: Chromium, number: int) -> str:
    """The text of the `number`-th assistant answer (from 1), once the page marks it done."""
    selector = f"#messages .assistant[data-done='true']:nth-of-type({2 * number})"
    found = f"document.querySelector({json.dumps(selector)})"
    chromium.wait_for(f"{found} !== null", 90, f"answer {number}")
    return chromium.evaluate(f"{found}.textContent")


def test_an_answer_streams_into_the_page(api, chromium, tmp_path):
    model = open_chat(chromium, api)
    chromium.evaluate(f"""
        document.getElementById('temperature').value = '0';
        document.getElementById('max_tokens').value = '{MAX_TOKENS}';
        {WATCH_ANSWERS}
        document.getElementById('prompt').value = {json.dumps(PROMPT)};
        document.getElementById('send').click();
    """)
    first = answer(chromium, 1)
    lengths = chromium.evaluate("window.answerLengths")
    assert first and len({n for n in lengths if n}) > 1, f"not streamed: lengths seen {lengths}"
    assert chromium.evaluate("document.getElementById('error').hidden")

    # what the page got token by token is what the API answers in one piece (greedy, exact codec)
    request = {"model": model, "temperature": 0, "top_p": 1, "max_tokens": MAX_TOKENS}
    messages = [{"role": "user", "content": PROMPT}]
    whole = post(api + "v1/chat/completions", {**request, "messages": messages})
    assert whole["choices"][0]["message"]["content"] == first

    # a second turn, typed and sent with Enter, carries the first one with it
    chromium.evaluate("document.getElementById('prompt').focus()")
    chromium.call("Input.insertText", text="And then?")
    for kind in ("keyDown", "keyUp"):
        chromium.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13)
    second = answer(chromium, 2)
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}]
    whole = post(api + "v1/chat/completions", {**request, "messages": messages})
    assert whole["choices"][0]["message"]["content"] == second
    assert chromium.evaluate("document.querySelectorAll('#messages .bubble').length") == 4

    png = chromium.screenshot(tmp_path / "chat.png")
    assert len(png) > 1000 and png.startswith(b"\x89PNG\r\n\x1a\n")


def test_page_fits_a_phone(api, chromium, tmp_path):
    open_chat(chromium, api, 390, 844, mobile=True)
    long_word = "x" * 300  # must wrap inside its bubble, not widen the page
    chromium.evaluate(f"""
        document.getElementById('settings').open = true;
        document.getElementById('max_tokens').value = '8';
        document.getElementById('prompt').value = '{long_word}';
        document.getElementById('send').click();
    """)
    answer(chromium, 1)
    assert chromium.evaluate("document.documentElement.scrollWidth") <= 390
    assert chromium.evaluate("document.getElementById('send').getBoundingClientRect().right") <= 390
    png = chromium.screenshot(tmp_path / "chat-phone.png")
    assert png.startswith(b"\x89PNG")


def test_errors_show_in_the_page_and_stop_aborts(api, chromium):
    open_chat(chromium, api)
    chromium.evaluate("""
        const select = document.getElementById('model');
        select.append(new Option('no-such-model', 'no-such-model'));
        select.value = 'no-such-model';
        document.getElementById('prompt').value = 'Anyone there?';
        document.getElementById('send').click();
    """)
    shown = "(e => e.hidden ? '' : e.textContent)(document.getElementById('error'))"
    assert "does not exist" in chromium.wait_for(shown, 30, "error")
    assert chromium.evaluate("document.getElementById('prompt').value") == "Anyone there?"  # back, to retry
    assert chromium.evaluate("document.querySelectorAll('#messages .bubble').length") == 0

    chromium.evaluate("""
        document.getElementById('model').selectedIndex = 0;
        document.getElementById('temperature').value = '0';  // greedy: no early end by chance before Stop
        document.getElementById('max_tokens').value = '400';
        document.getElementById('send').click();
    """)
    chromium.wait_for("document.querySelector('#messages .assistant').textContent.length > 0", 60, "first tokens")
    chromium.evaluate("document.getElementById('stop').click()")
    chromium.wait_for("document.querySelector('#messages .assistant').dataset.done === 'true'", 30, "stop")
    assert chromium.evaluate("document.querySelector('#messages .assistant').dataset.stopped") == "true"
    assert chromium.evaluate("document.getElementById('error').hidden")
    assert chromium.evaluate("document.getElementById('stop').hidden && !document.getElementById('send').disabled")
