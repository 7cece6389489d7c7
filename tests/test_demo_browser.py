"""``att3d demo`` in a real browser: headless Chromium (Debian's package) driven by Playwright against the served app.

The server is ``att3d demo`` itself, started in a subprocess on a free 127.0.0.1 port (one torch thread) and stopped
at the end. Checks: the page loads and its opening object renders; a typed prompt becomes a visible object of the
prompt's colour in the 3D viewer (pixels of a screenshot of its WebGL canvas) that turns when dragged; the time
from the click to that object on screen is measured in the page and printed (target: under 1.5 s on the 2-core
CPU); the GLB download is a valid GLB; the interpolation slider changes the object; empty and too long prompts
get a message in the page; files outside the app's output folder are not served.

Chromium comes from ``scripts/install_browser.sh`` (run by scripts/test.sh); a missing browser FAILS this test, it
is skipped only when ``ATT3D_NO_BROWSER=1`` is set. ``ATT3D_UPDATE_SCREENSHOTS=1`` writes the screenshots to
docs/images/demo-*.png (else to the test's tmp folder); ``ATT3D_DEMO_LATENCY_LIMIT`` (seconds; unset: no bound,
the time is only printed: speed targets are benchmarks, not tests) bounds the median click-to-object time.

How the time is taken: a capture-phase click listener stamps the click, then each animation frame the viewer's
canvas is read (WebGL contexts are created with ``preserveDrawingBuffer`` so that the page can read them) until it
shows a new object: enough non-white pixels and enough of them different from before the click. WebGPU is hidden
from the page (its adapter request fails in headless Chromium and the viewer would first wait for that).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "assets" / "att3d-shapes64"
DOCS_IMAGES = REPO / "docs" / "images"
UPDATE_SCREENSHOTS = os.environ.get("ATT3D_UPDATE_SCREENSHOTS", "") == "1"
LATENCY_LIMIT = float(os.environ.get("ATT3D_DEMO_LATENCY_LIMIT", "inf"))  # speed is a benchmark, not a test
TIMEOUT_MS = 30_000

pytestmark = pytest.mark.skipif(os.environ.get("ATT3D_NO_BROWSER", "") == "1",
                                reason="ATT3D_NO_BROWSER=1: browser test switched off")

# Runs in the page before its own scripts.
INIT_SCRIPT = """
delete Navigator.prototype.gpu;
const __att3dGetContext = HTMLCanvasElement.prototype.getContext;
HTMLCanvasElement.prototype.getContext = function (type, attrs) {
  if (type === 'webgl' || type === 'webgl2') attrs = Object.assign({}, attrs || {}, {preserveDrawingBuffer: true});
  return __att3dGetContext.call(this, type, attrs);
};
window.__att3dSig = (sel) => {
  const c = document.querySelector(sel + ' canvas');
  if (!c || !c.width || !c.height) return null;
  const o = document.createElement('canvas'); o.width = 48; o.height = 48;
  const g = o.getContext('2d'); g.drawImage(c, 0, 0, 48, 48);
  return Array.from(g.getImageData(0, 0, 48, 48).data);
};
window.__att3dMark = (sel, button) => {
  window.__att3dBefore = window.__att3dSig(sel);
  window.__att3dClick = null;
  document.querySelector(button).addEventListener('click', () => { window.__att3dClick = performance.now(); },
                                                  {capture: true, once: true});
};
// ms from the click (or now) to the first frame showing an object that differs from before the click, once the
// element `status` says `text` (the server's answer has arrived); -1: timeout
window.__att3dWait = (sel, timeout, status, text) => new Promise((resolve) => {
  const before = window.__att3dBefore, start = performance.now();
  const tick = () => {
    const s = (!status || document.querySelector(status).innerText.includes(text)) ? window.__att3dSig(sel) : null;
    if (s) {
      let fg = 0, diff = 0;
      for (let i = 0; i < s.length; i += 4) {
        if (Math.abs(s[i] - 255) + Math.abs(s[i + 1] - 255) + Math.abs(s[i + 2] - 255) > 60) fg++;
        if (before && Math.abs(s[i] - before[i]) + Math.abs(s[i + 1] - before[i + 1])
            + Math.abs(s[i + 2] - before[i + 2]) > 60) diff++;
      }
      const n = s.length / 4;
      if (fg > 0.02 * n && (!before || diff > 0.01 * n)) {
        resolve(performance.now() - (window.__att3dClick ?? start)); return;
      }
    }
    if (performance.now() - start > timeout) { resolve(-1); return; }
    requestAnimationFrame(tick);
  };
  tick();
});
"""


@dataclass
class Server:
    url: str
    out: Path
    log: Path
    proc: subprocess.Popen


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not (MODEL / "model.safetensors").is_file():
        pytest.fail(f"the shipped model {MODEL} is missing")
    root = tmp_path_factory.mktemp("demo-browser")
    port = _free_port()
    out, log = root / "out", root / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("ATT3D_DEBUG", None)
    cmd = [sys.executable, "-m", "att3d", "demo", "--host", "127.0.0.1", "--port", str(port), "--out", str(out),
           "--model", str(MODEL), "--threads", "1"]
    with open(log, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"att3d demo exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if _get(url + "/")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"att3d demo did not serve {url} within 120 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)
        yield Server(url, out.resolve(), log, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@pytest.fixture(scope="module")
def page(server):
    exe = os.environ.get("ATT3D_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        pytest.fail("no chromium on PATH: run `bash scripts/install_browser.sh` (apt-get install chromium), "
                    "or set ATT3D_NO_BROWSER=1 to skip the browser test")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -e '.[dev]'")
    pw = sync_playwright().start()
    browser = None
    try:
        browser = pw.chromium.launch(executable_path=exe, timeout=60_000, args=[
            "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist",
            "--disable-dev-shm-usage"])
        context = browser.new_context(viewport={"width": 1280, "height": 900}, device_scale_factor=1,
                                      accept_downloads=True)
        context.add_init_script(INIT_SCRIPT)
        local = ("http://127.0.0.1", "data:", "blob:")
        context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(local)
                      else route.abort())  # the page must work offline
        pg = context.new_page()
        pg.set_default_timeout(TIMEOUT_MS)
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.att3d_errors = errors
        yield pg
    finally:
        if browser is not None:
            browser.close()
        pw.stop()


def _screenshot(page, name: str, tmp_path: Path) -> None:
    """The page (from its top) as docs/images/<name> with ATT3D_UPDATE_SCREENSHOTS=1, else into tmp_path."""
    folder = DOCS_IMAGES if UPDATE_SCREENSHOTS else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    page.evaluate("() => window.scrollTo(0, 0)")
    page.wait_for_timeout(300)
    page.screenshot(path=str(folder / name))


def _pixels(page, selector: str):
    """The viewer's canvas as an (H, W, 3) int array, from a real screenshot."""
    import numpy as np
    from PIL import Image

    png = page.locator(f"{selector} canvas").screenshot()
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def _object_colour(px) -> tuple[float, list[float]]:
    """(fraction of non-background pixels, their mean RGB)."""
    fg = abs(px - 255).sum(-1) > 60
    return float(fg.mean()), px[fg].mean(0).tolist() if fg.any() else [255.0, 255.0, 255.0]


def _wait_for_new_object(page, selector: str, status: str, text: str, button: str | None = None, action=None,
                         done: str | None = None) -> float:
    """Seconds from the click on ``button`` (or from ``action()``) until ``selector``'s canvas shows a new object,
    with ``text`` in the element ``status``; then waits for ``done`` in it too (the request has finished)."""
    page.evaluate("([s, b]) => window.__att3dMark(s, b || 'body')", [selector, button])
    t0 = time.perf_counter()
    if button:
        page.click(button)
    else:
        action()
    ms = page.evaluate("([s, t, st, x]) => window.__att3dWait(s, t, st, x)", [selector, TIMEOUT_MS, status, text])
    assert ms >= 0, f"{selector} showed no new object with {text!r} in {status} within {TIMEOUT_MS / 1000:.0f} s"
    seconds = ms / 1000 if button else time.perf_counter() - t0
    page.wait_for_function("([st, x]) => document.querySelector(st).innerText.includes(x)", arg=[status, done or text])
    return seconds


def _dominant(rgb: list[float], channel: int, margin: float = 40) -> bool:
    return all(rgb[channel] > rgb[k] + margin for k in range(3) if k != channel)


def test_page_loads_and_shows_the_opening_object(page, server):
    t0 = time.perf_counter()
    page.goto(server.url + "/")
    page.wait_for_selector("#prompt textarea")
    assert "att3d" in page.title()
    assert "assets/att3d-shapes64" in page.locator("#model").inner_text() or \
        page.locator("#model input").input_value() == "assets/att3d-shapes64"
    page.evaluate("() => { window.__att3dBefore = null; window.__att3dClick = null; }")
    assert page.evaluate("([s, t]) => window.__att3dWait(s, t)", ["#viewer", TIMEOUT_MS]) >= 0
    print(f"\npage with its opening object: {time.perf_counter() - t0:.2f} s")
    assert "Showing" in page.locator("#status").inner_text()


# (prompt, its colour's dominant RGB channel); "a orange cube" and "a red sphere" were held out in training. The last
# one is dragged: a cube, since a turning sphere looks almost the same (the light is fixed in the world)
PROMPTS = [("a blue torus", 2), ("a red sphere", 0), ("a orange cube", 0)]


def _generate(page, prompt: str, channel: int) -> float:
    """Type ``prompt``, click Generate: seconds from the click to its object on screen (checked on a screenshot)."""
    page.fill("#prompt textarea", prompt)
    dt = _wait_for_new_object(page, "#viewer", "#status", f"{prompt}: generated in", "#generate",
                              done="Downloads: GLB")
    frac, rgb = _object_colour(_pixels(page, "#viewer"))
    print(f"{prompt!r}: click to object on screen {dt:.2f} s; {frac:.1%} of the viewer, mean colour "
          f"{[round(c) for c in rgb]}; {page.locator('#status').inner_text()}")
    assert frac > 0.03, f"{prompt}: the viewer is (nearly) blank"
    assert _dominant(rgb, channel, 20), f"{prompt}: unexpected colour {rgb}"
    return dt


def test_prompt_to_a_visible_rotatable_object_and_glb_download(page, server, tmp_path):
    # Timing: the median over the prompts; other load on the machine only adds time, so a second round may
    # replace a slow first one (both are printed).
    rounds = []
    for _ in range(2):
        rounds.append(statistics.median(_generate(page, p, c) for p, c in PROMPTS))
        print(f"median click to object: {rounds[-1]:.2f} s (limit {LATENCY_LIMIT} s)")
        if rounds[-1] < LATENCY_LIMIT:
            break

    # rotatable: dragging across the canvas turns the object
    before = _pixels(page, "#viewer")
    box = page.locator("#viewer canvas").bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x - 80, y - 60)
    page.mouse.down()
    for k in range(1, 11):
        page.mouse.move(x - 80 + 16 * k, y - 60 + 12 * k)
    page.mouse.up()
    page.wait_for_timeout(400)
    after = _pixels(page, "#viewer")
    changed = float((abs(after - before).sum(-1) > 60).mean())
    print(f"drag: {changed:.1%} of the viewer's pixels changed")
    assert changed > 0.01, "dragging did not rotate the object"
    _screenshot(page, "demo-generate.png", tmp_path)

    # downloads: GLB (valid glTF binary with a mesh), PLY
    import trimesh

    last = PROMPTS[-1][0].replace(" ", "-")
    with page.expect_download() as info:
        page.click("#dl-glb")
    data = Path(info.value.path()).read_bytes()
    assert info.value.suggested_filename == f"{last}.glb"
    assert data[:4] == b"glTF" and int.from_bytes(data[4:8], "little") == 2
    assert int.from_bytes(data[8:12], "little") == len(data)
    scene = trimesh.load(io.BytesIO(data), file_type="glb")
    assert sum(len(g.faces) for g in scene.geometry.values()) > 1000
    with page.expect_download() as info:
        page.click("#dl-ply")
    assert info.value.suggested_filename == f"{last}.ply"
    assert Path(info.value.path()).read_bytes()[:3] == b"ply"
    assert min(rounds) < LATENCY_LIMIT, f"median click-to-object time {min(rounds):.2f} s >= {LATENCY_LIMIT} s"


def test_interpolation_slider_changes_the_object(page, server, tmp_path):
    page.get_by_role("tab", name="Interpolate").click()
    page.fill("#prompt-a textarea", "a red cube")
    page.fill("#prompt-b textarea", "a blue sphere")
    slider = page.locator("#interp-t input[type=range]")
    _wait_for_new_object(page, "#interp-viewer", "#interp-status", "100% a red cube", "#interp-show")
    frac, red = _object_colour(_pixels(page, "#interp-viewer"))
    assert frac > 0.03 and _dominant(red, 0), f"slider at 0: not the red cube ({red})"
    dt = _wait_for_new_object(page, "#interp-viewer", "#interp-status", "100% a blue sphere",
                              action=lambda: slider.fill("1"))
    frac, blue = _object_colour(_pixels(page, "#interp-viewer"))
    print(f"\nslider 0 -> 1: new object in {dt:.2f} s; mean colour {[round(c) for c in red]} -> "
          f"{[round(c) for c in blue]}")
    assert frac > 0.03 and _dominant(blue, 2), f"slider at 1: not the blue sphere ({blue})"
    _wait_for_new_object(page, "#interp-viewer", "#interp-status", "50% a red cube + 50% a blue sphere",
                         action=lambda: slider.fill("0.5"))
    # the animation: progress is shown while it renders, then the video
    page.evaluate("""() => { window.__att3dProgress = '';
        const el = document.querySelector('#interp-video [data-testid=status-tracker]');
        new MutationObserver(() => { window.__att3dProgress += el.innerText + ' | '; })
            .observe(el, {subtree: true, childList: true, characterData: true}); }""")
    t0 = time.perf_counter()
    page.click("#interp-animate")
    page.wait_for_selector("#interp-video video", timeout=90_000)
    page.wait_for_function("() => document.querySelector('#interp-status').innerText.includes('Animation of')")
    progress = page.evaluate("() => window.__att3dProgress")
    print(f"animation: {time.perf_counter() - t0:.1f} s ({page.locator('#interp-status').inner_text()}); "
          f"progress shown: {progress[-120:]!r}")
    assert "interpolate" in progress, "no progress was shown while the animation rendered"
    _screenshot(page, "demo-interpolate.png", tmp_path)


def test_bad_prompts_get_a_message_in_the_page(page, server):
    page.get_by_role("tab", name="Text to 3D").click()
    # each message differs from the one before, so each wait needs this click's answer (not the last one's)
    before = "no message yet"
    for text, words in (("", "empty prompt"), ("x" * 250, "too long"), ("   ", "empty prompt")):
        page.fill("#prompt textarea", text)
        page.click("#generate")
        page.wait_for_function("([w, b]) => { const s = document.querySelector('#status').innerText;"
                               " return s.includes(w) && !s.includes(b); }", arg=[words, before])
        assert "Traceback" not in page.locator("#status").inner_text()
        before = words
    assert "Traceback" not in page.locator("body").inner_text()
    assert page.att3d_errors == []


def test_model_card_tab(page, server, tmp_path):
    page.get_by_role("tab", name="Model card").click()
    page.wait_for_selector("#card-figures img")
    assert page.locator("#card-figures img").count() >= 2
    page.wait_for_function("() => document.querySelector('#card').innerText.includes('att3d-shapes64: an amortized')")
    _screenshot(page, "demo-card.png", tmp_path)


def test_only_the_output_folder_is_served(server):
    glbs = sorted(server.out.glob("gen-*/*.glb"))
    assert glbs, "no generated GLB in the output folder"
    assert _get(f"{server.url}/gradio_api/file={glbs[0]}")[0] == 200
    for path in (REPO / "README.md", MODEL / "model_config.json", Path("/etc/passwd"), server.log,
                 f"{server.out}/../server.log", f"{glbs[0].parent}/../../server.log"):
        code, _ = _get(f"{server.url}/gradio_api/file={path}")
        assert code in (403, 404), f"{path} is served ({code})"
    # the app wrote nothing beside its output folder (the server's log is the test's)
    assert sorted(p.name for p in server.out.parent.iterdir()) == ["out", "server.log"]
