"""Opening a generated report in headless Chromium, as a reader would, at a given window width: its script and
console errors, per image whether it decoded and which methods it draws (`data-methods`) against those the store
offers it (`data-expected`), how far the page overflows the window sideways, and which tables or the nav stick out
of it (a table cut at the window's edge)."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

CHECK_SCRIPT = """
<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || e.type)), true);
const origError = console.error;
console.error = (...a) => { window.__errors.push(a.join(' ')); origError(...a); };
window.addEventListener('load', () => {
  const imgs = Array.from(document.images).map(i => ({ok: i.complete && i.naturalWidth > 0,
    methods: i.dataset.methods || '', expected: i.dataset.expected || ''}));
  const root = document.documentElement;
  const cut = Array.from(document.querySelectorAll('table, nav, .headline')).filter(
    el => el.getBoundingClientRect().right > root.clientWidth + 1).map(
    el => (el.closest('section, article') || {}).id || el.tagName);
  const out = document.createElement('pre');
  out.id = '__check';
  out.textContent = JSON.stringify({errors: window.__errors, images: imgs,
    overflow_px: root.scrollWidth - root.clientWidth, cut: cut, width: root.clientWidth});
  document.body.appendChild(out);
});
</script>
"""


def chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def browser_check(page: Path, tmp_path: Path, width: int = 1400) -> dict:
    """Load `page` in headless Chromium in a window `width` px wide; return its script errors, per image whether it
    decoded and which methods it draws (`data-methods`) against those the store offers it (`data-expected`), the
    page's sideways overflow in px (`overflow_px`, 0 when nothing sticks out) and the tables or nav cut at the
    window's edge (`cut`)."""
    browser = chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    checked = tmp_path / f"checked-{page.name}"
    # The probe goes first in <head> so that it sees every error of the page proper.
    checked.write_text(page.read_text().replace("<head>", "<head>" + CHECK_SCRIPT, 1))
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=5000", f"--window-size={width},1000",
             "--dump-dom", checked.as_uri()],
            capture_output=True, text=True, timeout=120,
        )
    dom = proc.stdout
    assert '<pre id="__check">' in dom, proc.stderr[-2000:]
    return json.loads(dom.split('<pre id="__check">', 1)[1].split("</pre>", 1)[0].replace("&quot;", '"'))
