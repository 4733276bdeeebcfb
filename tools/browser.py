"""Debian's headless chromium, driven through the DevTools protocol on a pipe.

No selenium, no webdriver, no port: ``--remote-debugging-pipe`` makes chromium
read protocol commands (JSON, each ended by a NUL byte) from its fd 3 and write
answers and events to its fd 4. That is all the demo's test needs to open a
page, wait for its images, read the bytes of the images it loaded, and take a
screenshot; it is also how the README's screenshot is made:

    .venv/bin/python tools/browser.py URL docs/demo.png [--wait-images N]
"""

import argparse
import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from devcarbon import stop_group_of  # noqa: E402

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium():
    """The chromium command on PATH, or None."""
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


class BrowserError(RuntimeError):
    pass


class Chromium:
    """One headless chromium with one page; use as a context manager."""

    def __init__(self, executable=None, width=1280, height=900):
        self.executable = executable or find_chromium()
        if not self.executable:
            raise BrowserError("no chromium on PATH (apt-get install chromium)")
        self.width, self.height = width, height
        self.process = None
        self.profile = None
        self.session = None
        self.events = []
        self._next_id = 0
        self._buffer = b""

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self, timeout=30):
        self.profile = tempfile.mkdtemp(prefix="amproxy-chromium-")
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def pipes_on_3_and_4():
            # Out of the way first, so that neither dup2 closes the other's source.
            a = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
            b = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        args = [self.executable, "--headless=new", "--remote-debugging-pipe",
                "--user-data-dir=%s" % self.profile, "--no-first-run",
                "--no-default-browser-check", "--disable-gpu", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
                "--mute-audio", "--window-size=%d,%d" % (self.width, self.height)]
        if os.geteuid() == 0:
            args.append("--no-sandbox")  # chromium refuses to run as root with its sandbox
        self.process = subprocess.Popen(
            args + ["about:blank"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, preexec_fn=pipes_on_3_and_4, pass_fds=(3, 4),
            start_new_session=True)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        deadline = time.monotonic() + timeout
        targets = self.call("Target.getTargets", timeout=timeout)["targetInfos"]
        pages = [t for t in targets if t["type"] == "page"]
        if not pages:
            target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        else:
            target = pages[0]["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 timeout=max(1, deadline - time.monotonic()))["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": self.width, "height": self.height, "deviceScaleFactor": 1,
                   "mobile": False}, session=True)
        self.call("Network.enable", session=True)
        self.call("Page.enable", session=True)
        return self

    def stop(self):
        stop_group_of(self.process, 10)
        for fd in ("_to_chrome", "_from_chrome"):
            if getattr(self, fd, None) is not None:
                os.close(getattr(self, fd))
                setattr(self, fd, None)
        if self.profile:
            shutil.rmtree(self.profile, ignore_errors=True)
            self.profile = None

    # The protocol.

    def _read_message(self, deadline):
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self._from_chrome], [], [], left)
            if not ready:
                return None
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise BrowserError("chromium closed its pipe (exit status %r)"
                                   % self.process.poll())
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method, params=None, session=False, timeout=30):
        """Send one command and return its result; events that arrive meanwhile are
        kept in ``events``."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            answer = self._read_message(deadline)
            if answer is None:
                raise BrowserError("no answer to %s within %g s" % (method, timeout))
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise BrowserError("%s: %s" % (method, answer["error"]))
                return answer["result"]
            if "method" in answer:
                self.events.append(answer)

    # What the test and the screenshot need.

    def navigate(self, url):
        self.call("Page.navigate", {"url": url}, session=True)

    def evaluate(self, expression):
        """The value of a JavaScript expression (JSON-serializable) in the page."""
        result = self.call("Runtime.evaluate", {"expression": expression,
                                                "returnByValue": True}, session=True)
        if "exceptionDetails" in result:
            raise BrowserError("JavaScript error: %s" % result["exceptionDetails"])
        return result["result"].get("value")

    def images(self, url_part):
        """[{src, complete, width, height}] of the page's <img> whose src contains
        ``url_part``, as the browser shows them now."""
        return self.evaluate(
            "Array.from(document.images).filter(i => i.src.indexOf(%s) >= 0).map(i => "
            "({src: i.src, complete: i.complete, width: i.naturalWidth, "
            "height: i.naturalHeight}))" % json.dumps(url_part))

    def wait_images(self, url_part, count, timeout=30, interval=0.25):
        """Wait until at least ``count`` such images are loaded (decoded, non-empty);
        return them."""
        deadline = time.monotonic() + timeout
        while True:
            images = self.images(url_part) or []
            loaded = [i for i in images if i["complete"] and i["width"] > 0]
            if len(loaded) >= count and len(loaded) == len(images):
                return loaded
            if time.monotonic() >= deadline:
                raise BrowserError("after %g s, %d of %d images loaded: %r" % (
                    timeout, len(loaded), count, images))
            time.sleep(interval)

    def responses(self):
        """{url: (requestId, status, mimeType)} of every response received so far."""
        self.call("Runtime.evaluate", {"expression": "0"}, session=True)  # collect events
        seen = {}
        for event in self.events:
            if event.get("method") == "Network.responseReceived":
                params = event["params"]
                response = params["response"]
                seen[response["url"]] = (params["requestId"], response["status"],
                                         response["mimeType"])
        return seen

    def body(self, request_id):
        """The bytes of a response the page received."""
        result = self.call("Network.getResponseBody", {"requestId": request_id}, session=True)
        if result.get("base64Encoded"):
            return base64.b64decode(result["body"])
        return result["body"].encode()

    def screenshot(self):
        """The page as a PNG."""
        return base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"},
                                          session=True)["data"])


def main(argv=None):
    parser = argparse.ArgumentParser(description="Screenshot a page with headless chromium.")
    parser.add_argument("url")
    parser.add_argument("output")
    parser.add_argument("--wait-images", type=int, default=0, metavar="N",
                        help="first wait until N graph images (/render) are loaded")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args(argv)
    with Chromium(width=args.width, height=args.height) as browser:
        browser.navigate(args.url)
        if args.wait_images:
            browser.wait_images("/render", args.wait_images, timeout=60)
        time.sleep(0.5)  # the last image painted
        with open(args.output, "wb") as f:
            f.write(browser.screenshot())


if __name__ == "__main__":
    sys.exit(main())
