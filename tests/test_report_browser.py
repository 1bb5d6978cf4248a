"""report.html in a real headless chromium: it loads offline, its controls redraw, no console errors.

The browser is driven over the Chrome DevTools Protocol on a pipe
(``--remote-debugging-pipe``: commands on fd 3, replies on fd 4, NUL-terminated JSON).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from voxplain.report import Study, write_report

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """Path of a chromium-family browser, or None."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """A headless chromium and a minimal DevTools client for one page."""

    def __init__(self, executable: str, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="voxplain-chromium-")
        cmd_r, self._cmd_w = os.pipe()
        self._resp_r, resp_w = os.pipe()

        def child_fds():  # the protocol's fixed descriptors in the browser process
            # move both ends above 3 and 4 first: a pipe end may already be fd 3 or 4, and
            # dup2 onto itself would leave it close-on-exec
            high_r = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10)
            high_w = fcntl.fcntl(resp_w, fcntl.F_DUPFD, 10)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        self.proc = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--remote-debugging-pipe", f"--user-data-dir={self.profile}",
             "about:blank"],
            preexec_fn=child_fds, close_fds=False,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(resp_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []
        self.session = None
        targets = self.call("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True,
                                 _session=False)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("no reply from chromium")
            chunk = os.read(self._resp_r, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, _session: bool = True, **params):
        """Send one command and return its result; events seen meanwhile are kept in :attr:`events`."""
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params}
        if _session and self.session:
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def evaluate(self, expression: str):
        """Value of a JavaScript expression in the page (promises awaited)."""
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page error evaluating {expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0):
        """Poll until ``expression`` is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"timed out waiting for {expression!r}")

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads reported so far."""
        out = []
        for e in self.events:
            method, p = e.get("method"), e.get("params", {})
            if method == "Runtime.exceptionThrown":
                out.append(json.dumps(p.get("exceptionDetails", {}))[:500])
            elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(" ".join(str(a.get("value", a.get("description"))) for a in p.get("args", [])))
            elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append(p["entry"].get("text", ""))
        return out

    def close(self) -> None:
        try:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._cmd_w, self._resp_r):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)


def _canvas(browser: Browser, view: str = "axial") -> str:
    return browser.evaluate(f"document.getElementById('view-{view}').toDataURL()")


def _set(browser: Browser, element: str, value, event: str) -> None:
    browser.evaluate(
        f"(() => {{ const e = document.getElementById({json.dumps(element)}); e.value = {json.dumps(value)};"
        f" e.dispatchEvent(new Event({json.dumps(event)})); }})()")


def _rendered(browser: Browser) -> int:
    return int(browser.evaluate("Number(document.body.dataset.rendered || 0)"))


def _after(browser: Browser, action) -> None:
    """Run ``action`` and wait for the viewer's next redraw."""
    before = _rendered(browser)
    action()
    browser.wait_for(f"Number(document.body.dataset.rendered || 0) > {before}")


def check_report_in_browser(report: Path) -> dict:
    """Load ``report`` in headless chromium, move a slice slider, switch method; assert the canvas changed
    each time and the page logged no errors. Returns what was seen. Skips if there is no chromium."""
    exe = find_chromium()
    if exe is None:
        pytest.skip("no chromium found (install Debian's chromium: apt-get install -y chromium chromium-driver)")
    browser = Browser(exe)
    try:
        browser.call("Page.navigate", url=Path(report).resolve().as_uri())
        browser.wait_for("window.voxplainReady === true")
        seen = {"title": browser.evaluate("document.title")}
        axial = _canvas(browser)
        is_volume = browser.evaluate("document.getElementById('box-coronal').style.display !== 'none'")
        slider = "slice-axial" if is_volume else "opacity"  # a 2D image has one slice
        current = int(browser.evaluate(f"Number(document.getElementById('{slider}').value)"))
        maximum = int(browser.evaluate(f"Number(document.getElementById('{slider}').max)"))
        if is_volume:  # the neighbouring slice
            value = current - 1 if current > 0 else current + 1
        else:
            value = maximum if current != maximum else maximum // 2  # keep the overlay visible
        _after(browser, lambda: _set(browser, slider, str(value), "input"))
        moved = _canvas(browser)
        assert moved != axial, f"moving {slider} did not change the axial view"
        methods = browser.evaluate("Array.from(document.getElementById('method').options).map(o => o.value)")
        assert len(methods) >= 2, f"the report should offer several methods, has {methods}"
        method = browser.evaluate("document.getElementById('method').value")
        other = next(m for m in methods if m != method)
        _after(browser, lambda: _set(browser, "method", other, "change"))
        switched = _canvas(browser)
        assert switched != moved, f"switching method {method} -> {other} did not change the view"
        seen.update(methods=methods, volume=bool(is_volume),
                    studies=browser.evaluate("document.getElementById('study').options.length"),
                    figures=browser.evaluate("document.querySelectorAll('#figures img').length"))
        assert not browser.errors(), f"console errors: {browser.errors()}"
        return seen
    finally:
        browser.close()


def _studies():
    rng = np.random.default_rng(0)
    shape = (18, 22, 14)
    zz = np.indices(shape)
    blob = np.exp(-((zz[0] - 6) ** 2 + (zz[1] - 14) ** 2 + (zz[2] - 9) ** 2) / 10.0)
    img = rng.normal(size=(4, *shape)).astype(np.float32) + 3 * blob
    maps = {"WT": {"vanilla_gradient": rng.normal(size=(4, *shape)) * blob,
                   "gradcam": np.roll(blob, 5, axis=0)[None]},
            "ET": {"vanilla_gradient": rng.normal(size=(4, *shape))}}
    volume = Study("segmentation", img, ["t1", "t1ce", "t2", "flair"], maps, prediction={"WT voxels": 12},
                   spacing=(1.0, 1.0, 2.0))
    image = Study("slice", rng.random((1, 30, 26)), ["grey"],
                  {"tumour": {"xrai": rng.random((1, 30, 26)), "blur_ig": rng.normal(size=(1, 30, 26))}})
    return [volume, image]


@pytest.mark.slow
def test_report_html_in_headless_chromium(tmp_path):
    write_report(tmp_path, _studies(), settings={"seed": 0})
    page = (tmp_path / "report.html").read_text()
    assert "http://" not in page and "https://" not in page  # nothing fetched from the network
    seen = check_report_in_browser(tmp_path / "report.html")
    assert seen["volume"] and seen["studies"] == 2 and seen["figures"] == 2
    assert seen["methods"] == ["vanilla_gradient", "gradcam"]


@pytest.mark.slow
def test_report_html_2d_only_in_headless_chromium(tmp_path):
    write_report(tmp_path, _studies()[1:])
    seen = check_report_in_browser(tmp_path / "report.html")
    assert not seen["volume"]


@pytest.mark.slow
def test_click_on_a_view_moves_the_other_views(tmp_path):
    exe = find_chromium()
    if exe is None:
        pytest.skip("no chromium found (install Debian's chromium: apt-get install -y chromium chromium-driver)")
    write_report(tmp_path, _studies()[:1])
    browser = Browser(exe)
    try:
        browser.call("Page.navigate", url=(tmp_path / "report.html").resolve().as_uri())
        browser.wait_for("window.voxplainReady === true")
        x, y = browser.evaluate("(() => { const b = document.getElementById('view-axial').getBoundingClientRect();"
                                " return [b.left + 0.2 * b.width, b.top + 0.3 * b.height]; })()")

        def click():
            for kind in ("mousePressed", "mouseReleased"):
                browser.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

        _after(browser, click)
        # axial view of an (18, 22, 14) volume: x to the right, y up
        sagittal = int(browser.evaluate("Number(document.getElementById('slice-sagittal').value)"))
        coronal = int(browser.evaluate("Number(document.getElementById('slice-coronal').value)"))
        assert sagittal == int(0.2 * 18) and coronal == 22 - 1 - int(0.3 * 22)
        assert not browser.errors(), browser.errors()
    finally:
        browser.close()


@pytest.mark.slow
def test_viewer_opens_on_the_target_region_and_flags_an_empty_map(tmp_path):
    from voxplain.report.regions import region_centre
    from voxplain.report.study import TargetInfo

    exe = find_chromium()
    if exe is None:
        pytest.skip("no chromium found (install Debian's chromium: apt-get install -y chromium chromium-driver)")
    rng = np.random.default_rng(0)
    shape = (18, 22, 14)
    truth = np.zeros(shape, bool)
    truth[3:7, 12:17, 2:5] = True
    predicted = np.roll(truth, 1, axis=0)
    maps = {"WT": {"vanilla_gradient": rng.normal(size=(4, *shape)), "guided_backprop": np.zeros((4, *shape))}}
    study = Study("seg", rng.normal(size=(4, *shape)), ["t1", "t1ce", "t2", "flair"], maps,
                  prediction={"regions": [{"region": "WT", "predicted_voxels": 60, "predicted_ml": 0.06,
                                           "truth_voxels": 60, "truth_ml": 0.06, "dice": 0.75}],
                              "disagreements": ["no ET predicted, ground truth has 3 ET voxels"]},
                  targets={"WT": TargetInfo("WT logit, mean over 60 predicted voxels", predicted, truth)},
                  skipped={"ET": "model predicts no ET voxels"})
    write_report(tmp_path, [study])
    browser = Browser(exe)
    try:
        browser.call("Page.navigate", url=(tmp_path / "report.html").resolve().as_uri())
        browser.wait_for("window.voxplainReady === true")
        pos = [int(browser.evaluate(f"Number(document.getElementById('slice-{v}').value)"))
               for v in ("sagittal", "coronal", "axial")]
        assert pos == region_centre(truth)  # the viewer opens on the tumour, not the volume's middle
        text = lambda i: browser.evaluate(f"document.getElementById('{i}').textContent")  # noqa: E731
        assert "WT logit, mean over 60 predicted voxels" in text("target-info")
        assert "ET (model predicts no ET voxels)" in text("skipped")
        assert "no ET predicted" in text("prediction") and browser.evaluate(
            "document.querySelectorAll('#prediction th').length") == 6
        assert "99th percentile" in text("cb-label")
        # the outlines are drawn: the axial view changes when they are switched off
        with_outline = _canvas(browser)
        _after(browser, lambda: browser.evaluate(
            "(() => { for (const id of ['show-truth', 'show-predicted']) { const e = document.getElementById(id);"
            " e.checked = false; e.dispatchEvent(new Event('change')); } })()"))
        assert _canvas(browser) != with_outline
        _after(browser, lambda: _set(browser, "method", "guided_backprop", "change"))
        assert "map is all zero" in text("cb-label") and "≥" not in text("colourbar-box")
        assert browser.evaluate("getComputedStyle(document.getElementById('colourbar')).display") == "none"
        assert "map is all zero" in text("map-notes")
        assert not browser.errors(), browser.errors()
    finally:
        browser.close()
