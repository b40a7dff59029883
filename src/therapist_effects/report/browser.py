"""Render a report in headless Chromium: full-page screenshot, console errors, images, network.

Dependency-free: Chromium (Debian's ``/usr/bin/chromium``) is driven through the DevTools protocol
over ``--remote-debugging-pipe`` (JSON messages separated by NUL bytes on file descriptors 3 and 4),
so neither Selenium nor Playwright is needed. Used by the report tests and to regenerate the
screenshots in ``docs/img/``::

    from therapist_effects.report.browser import screenshot
    screenshot("results/demo/report.html", "docs/img/research_report.png")
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--mute-audio",
)

# Run in the page after load: one record per <img> (did it decode?), plus the figures given as inline SVG.
_IMAGES_JS = """JSON.stringify({
  images: Array.from(document.images).map(i => ({
      src: i.getAttribute('src') ? i.getAttribute('src').slice(0, 40) : '',
      alt: i.getAttribute('alt') || '',
      loaded: i.complete && i.naturalWidth > 0,
      width: i.naturalWidth})),
  svgs: document.querySelectorAll('svg').length,
  scripts: document.scripts.length,
  title: document.title,
  text: document.body ? document.body.innerText : ''})"""


def find_chromium() -> str | None:
    """Path of a Chromium executable (``$CHROMIUM`` first, then ``/usr/bin/chromium``, then PATH)."""
    for cand in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if cand and os.path.exists(cand) and os.access(cand, os.X_OK):
            return cand
    return None


class BrowserError(RuntimeError):
    """Chromium could not be started or did not answer."""


@dataclass
class PageResult:
    """What a rendered page did: console errors, uncaught exceptions, dialogs, images and requests."""

    url: str
    console_errors: list[str] = field(default_factory=list)
    console_messages: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)
    svgs: int = 0
    scripts: int = 0
    title: str = ""
    text: str = ""
    width: int = 0
    height: int = 0
    png_path: str | None = None
    pdf_path: str | None = None
    evaluated: Any = None  # the JSON value of ``render(..., evaluate=...)``

    @property
    def external_requests(self) -> list[str]:
        """Requests for anything other than the file itself and inline ``data:`` URLs."""
        return [u for u in self.requests if not (u.startswith("data:") or u == self.url)]

    @property
    def broken_images(self) -> list[dict]:
        return [i for i in self.images if not i["loaded"]]


class _Pipe:
    def __init__(self, proc: subprocess.Popen, write_fd: int, read_fd: int):
        self.proc, self.write_fd, self.read_fd = proc, write_fd, read_fd
        self.buf = b""
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.write_fd, json.dumps(msg).encode() + b"\0")
        want = self.next_id
        deadline = time.monotonic() + timeout
        while True:
            for m in self._read(deadline):
                if m.get("id") == want:
                    if "error" in m:
                        raise BrowserError(f"{method}: {m['error'].get('message')}")
                    return m.get("result", {})
                self.events.append(m)

    def wait_event(self, method: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        for i, m in enumerate(self.events):
            if m.get("method") == method:
                return self.events.pop(i)
        while True:
            for m in self._read(deadline):
                if m.get("method") == method:
                    return m
                self.events.append(m)

    def _read(self, deadline: float) -> list[dict]:
        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError("timed out waiting for Chromium")
            ready, _, _ = select.select([self.read_fd], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self.read_fd, 1 << 20)
                if not chunk:
                    raise BrowserError("Chromium closed the DevTools pipe")
                self.buf += chunk
            elif self.proc.poll() is not None:
                raise BrowserError(f"Chromium exited with status {self.proc.returncode}")
        *msgs, self.buf = self.buf.split(b"\0")
        return [json.loads(m) for m in msgs if m]


def render(html_path: str | Path, png_path: str | Path | None = None, *, width: int = 1280,
           pdf_path: str | Path | None = None, media: str | None = None,
           timeout: float = 60.0, evaluate: str | None = None) -> PageResult:
    """Open ``html_path`` in headless Chromium and report what happened.

    Collects console messages (errors separately), uncaught exceptions, JavaScript dialogs
    (``alert`` etc., which are dismissed and recorded), every network request, and for each
    ``<img>`` whether it decoded (``complete && naturalWidth > 0``). With ``png_path`` a full-page
    screenshot ``width`` CSS pixels wide is saved; with ``pdf_path`` the page is printed to PDF
    (print stylesheet). ``media="print"`` emulates print media for the screenshot. ``evaluate``: a
    JavaScript expression evaluated after load whose JSON-serialisable value is ``result.evaluated``.
    """
    exe = find_chromium()
    if exe is None:
        raise BrowserError("Chromium not found (set $CHROMIUM or install /usr/bin/chromium)")
    url = Path(html_path).resolve().as_uri()
    to_chrome_r, to_chrome_w = os.pipe()
    from_chrome_r, from_chrome_w = os.pipe()
    # move the child's ends above 9 so that the shell's "3<&N 4>&M" cannot clobber one with the other
    for name in ("to_chrome_r", "from_chrome_w"):
        fd = locals()[name]
        high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(fd)
        if name == "to_chrome_r":
            to_chrome_r = high
        else:
            from_chrome_w = high
    profile = tempfile.mkdtemp(prefix="te-chromium-")
    args = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe",
            f"--window-size={width},900", "about:blank"]
    # Chromium reads commands on fd 3 and writes replies on fd 4; bash maps our pipe ends there
    # (bash, not dash: dash's redirections take single-digit descriptors only).
    cmd = [shutil.which("bash") or "/bin/bash", "-c", f'exec "$@" 3<&{to_chrome_r} 4>&{from_chrome_w}', "bash", *args]
    proc = subprocess.Popen(cmd, pass_fds=(to_chrome_r, from_chrome_w), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=_log_target())
    os.close(to_chrome_r)
    os.close(from_chrome_w)
    pipe = _Pipe(proc, to_chrome_w, from_chrome_r)
    result = PageResult(url=url)
    try:
        target = pipe.send("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
        sess = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            pipe.send(f"{domain}.enable", session=sess)
        pipe.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=sess)
        if media:
            pipe.send("Emulation.setEmulatedMedia", {"media": media}, session=sess)
        pipe.send("Page.navigate", {"url": url}, session=sess)
        deadline = time.monotonic() + timeout
        loaded = False
        while not loaded:
            for m in pipe._read(deadline):
                method = m.get("method")
                if method == "Page.javascriptDialogOpening":
                    result.dialogs.append(f"{m['params'].get('type')}: {m['params'].get('message')}")
                    # answer without waiting: the page is blocked until the dialog is closed
                    pipe.next_id += 1
                    os.write(pipe.write_fd, json.dumps({
                        "id": pipe.next_id, "method": "Page.handleJavaScriptDialog",
                        "params": {"accept": False}, "sessionId": sess}).encode() + b"\0")
                elif method == "Page.loadEventFired":
                    loaded = True
                else:
                    pipe.events.append(m)
        out = pipe.send("Runtime.evaluate", {"expression": _IMAGES_JS, "returnByValue": True,
                                             "awaitPromise": False}, session=sess)
        info = json.loads(out["result"]["value"])
        result.images, result.svgs = info["images"], info["svgs"]
        result.scripts, result.title, result.text = info["scripts"], info["title"], info["text"]
        if evaluate is not None:
            ev = pipe.send("Runtime.evaluate", {"expression": f"JSON.stringify({evaluate})", "returnByValue": True,
                                                "awaitPromise": False}, session=sess)
            result.evaluated = json.loads(ev["result"].get("value") or "null")
        metrics = pipe.send("Page.getLayoutMetrics", session=sess)
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        result.width, result.height = width, int(max(size["height"], 1) + 0.999)
        if png_path is not None:
            pipe.send("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": result.height, "deviceScaleFactor": 1,
                       "mobile": False}, session=sess)
            shot = pipe.send("Page.captureScreenshot",
                             {"format": "png", "captureBeyondViewport": True,
                              "clip": {"x": 0, "y": 0, "width": width, "height": result.height,
                                       "scale": 1}}, session=sess, timeout=timeout)
            Path(png_path).parent.mkdir(parents=True, exist_ok=True)
            Path(png_path).write_bytes(base64.b64decode(shot["data"]))
            result.png_path = str(png_path)
        if pdf_path is not None:
            pdf = pipe.send("Page.printToPDF", {"printBackground": True}, session=sess, timeout=timeout)
            Path(pdf_path).write_bytes(base64.b64decode(pdf["data"]))
            result.pdf_path = str(pdf_path)
        # drain what arrived meanwhile
        for m in pipe.events:
            _record(result, m)
        pipe.events.clear()
        try:
            pipe.send("Browser.close", timeout=5)
        except BrowserError:
            pass
    finally:
        os.close(to_chrome_w)
        os.close(from_chrome_r)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)
    return result


def _record(result: PageResult, m: dict) -> None:
    method, p = m.get("method"), m.get("params", {})
    if method == "Runtime.consoleAPICalled":
        text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
        result.console_messages.append(f"{p.get('type')}: {text}")
        if p.get("type") in ("error", "assert"):
            result.console_errors.append(text)
    elif method == "Runtime.exceptionThrown":
        d = p.get("exceptionDetails", {})
        result.exceptions.append(d.get("exception", {}).get("description") or d.get("text", ""))
    elif method == "Log.entryAdded":
        e = p.get("entry", {})
        result.console_messages.append(f"{e.get('level')}: {e.get('text')}")
        if e.get("level") == "error":
            result.console_errors.append(f"{e.get('source')}: {e.get('text')} {e.get('url', '')}".strip())
    elif method == "Network.requestWillBeSent":
        result.requests.append(p.get("request", {}).get("url", ""))
    elif method == "Page.javascriptDialogOpening":
        result.dialogs.append(f"{p.get('type')}: {p.get('message')}")


def screenshot(html_path: str | Path, png_path: str | Path, width: int = 1280) -> PageResult:
    """Save a full-page PNG screenshot of ``html_path``, ``width`` CSS pixels wide."""
    return render(html_path, png_path, width=width)


def _log_target():
    """Chromium's stderr: discarded, or appended to the file named by $TE_CHROMIUM_LOG (debugging)."""
    path = os.environ.get("TE_CHROMIUM_LOG")
    return open(path, "ab") if path else subprocess.DEVNULL  # noqa: SIM115 - closed with the process


def print_to_pdf(html_path: str | Path, pdf_path: str | Path, timeout: float = 120.0) -> Path:
    """Print ``html_path`` to ``pdf_path`` as a reader would: ``chromium --headless --print-to-pdf``
    (the page's print stylesheet and its ``@page`` size, A4 for the reports; no header or footer)."""
    exe = find_chromium()
    if exe is None:
        raise BrowserError("Chromium not found (set $CHROMIUM or install /usr/bin/chromium)")
    pdf = Path(pdf_path).resolve()
    pdf.parent.mkdir(parents=True, exist_ok=True)
    profile = tempfile.mkdtemp(prefix="te-chromium-")
    try:
        proc = subprocess.run(
            [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--no-pdf-header-footer",
             f"--print-to-pdf={pdf}", Path(html_path).resolve().as_uri()],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=_log_target(), timeout=timeout)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    if proc.returncode != 0 or not pdf.exists():
        raise BrowserError(f"Chromium --print-to-pdf failed with status {proc.returncode}")
    return pdf
