"""The web chat page in a real browser: headless Debian Chromium, driven over the DevTools protocol
(`--remote-debugging-pipe`: JSON messages on file descriptors 3 and 4, no extra package), uploads an
image, asks a question, waits for the streamed reply, and saves a screenshot."""

import base64
import contextlib
import json
import os
import shutil
import subprocess
import time

import pytest
from PIL import Image
from serving_fixtures import png_bytes, running_server, shared_chat_model

from llava_jax.inference.openai_protocol import Limits
from llava_jax.inference.server import ServerConfig, create_app

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--remote-debugging-pipe",
]


class Browser:
    """A minimal DevTools-protocol client over Chromium's debugging pipe."""

    def __init__(self, executable: str, profile_dir, timeout: float = 60.0):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # Chromium reads commands from fd 3 and writes replies to fd 4.
        script = f'exec "$0" "$@" 3<&{to_chrome_r} 4>&{from_chrome_w} {to_chrome_r}<&- {from_chrome_w}>&-'
        self.process = subprocess.Popen(
            ["bash", "-c", script, executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}", "about:blank"],
            pass_fds=(to_chrome_r, from_chrome_w),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.timeout = timeout
        self._next_id = 0
        self._buffer = b""
        self.events: list[dict] = []
        self.session = None

    def _read_message(self, deadline: float) -> dict:
        import select

        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from Chromium")
            ready, _, _ = select.select([self._from_chrome], [], [], left)
            if ready:
                data = os.read(self._from_chrome, 1 << 20)
                if not data:
                    raise RuntimeError(f"Chromium closed the pipe: {self.process.stderr.read()[-2000:]!r}")
                self._buffer += data
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, *, session: bool = True) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)[
            "sessionId"
        ]
        self.send("Page.enable")
        self.send("Runtime.enable")
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1100, "height": 800, "deviceScaleFactor": 1, "mobile": False},
        )
        self.send("Page.navigate", {"url": url})
        self.wait_for("document.readyState === 'complete' && !!document.getElementById('send')")

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"page never satisfied: {expression}")

    def set_file(self, selector: str, path) -> None:
        root = self.send("DOM.getDocument")["root"]["nodeId"]
        node = self.send("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]
        self.send("DOM.setFileInputFiles", {"files": [str(path)], "nodeId": node})

    def screenshot(self, path) -> None:
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):
            self.send("Browser.close", session=False)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs Debian's chromium package")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


def test_upload_image_ask_and_get_a_streamed_reply(tmp_path, tmp_path_factory):
    executable = _chromium()
    chat = shared_chat_model(tmp_path_factory)
    app = create_app(chat, ServerConfig(model_name="tiny-llava", chunk_size=2, limits=Limits(default_max_tokens=24)))
    image = tmp_path / "photo.png"
    image.write_bytes(png_bytes(320, 240, seed=7))
    with running_server(app) as url:
        browser = Browser(executable, tmp_path / "profile")
        try:
            browser.open(url + "/")
            assert browser.evaluate("document.getElementById('model').textContent") == "tiny-llava"
            browser.set_file("#image-input", image)
            browser.wait_for("document.getElementById('preview').style.display === 'block'")
            browser.evaluate(
                "document.getElementById('temperature').value = '0';"
                "document.getElementById('max-tokens').value = '12';"
                "document.getElementById('prompt').value = 'What is in this picture?';"
                "document.getElementById('send').click(); true"
            )
            browser.wait_for("!!document.querySelector('.msg.assistant[data-done]')", timeout=120)
            reply = browser.evaluate("document.querySelector('.msg.assistant .text').textContent")
            status = browser.evaluate("document.getElementById('status').className")
            shown = browser.evaluate("document.querySelector('.msg.user img') !== null")
            second = browser.evaluate("document.querySelectorAll('.msg').length")
            shot = tmp_path / "chat.png"
            browser.screenshot(shot)
        finally:
            browser.close()
    assert status != "error", browser.events[-5:]
    assert reply and reply.strip(), "no reply text appeared"
    assert shown, "the uploaded image is not shown with the question"
    assert second == 2
    with Image.open(shot) as im:
        im.verify()
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.size == (1100, 800)
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is None or len(colours) > 10, "the screenshot is blank"
    # the request reached the model through the API, with the image
    assert app.state.scheduler.completed >= 1
