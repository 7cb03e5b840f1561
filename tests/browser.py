"""Open a self-contained HTML page in headless Chromium and report what loaded, for the report tests.

Skipped, with the reason, where Chromium is not installed, unless EQLIN_REQUIRE_CHROMIUM is set (CI sets it):
then a missing browser fails the test."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

needs_chromium = pytest.mark.skipif(
    shutil.which("chromium") is None and not os.environ.get("EQLIN_REQUIRE_CHROMIUM"),
    reason="Debian's chromium package is not installed (set EQLIN_REQUIRE_CHROMIUM=1 to fail instead)")

_PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => __errors.push(String(e.message || (e.target && e.target.src))), true);
const __ce = console.error; console.error = (...a) => { __errors.push(a.join(' ')); __ce(...a); };
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute('data-check', JSON.stringify({images: imgs.length, loaded: ok, errors: __errors}));
});
</script>"""


def opened(page: Path, scratch: Path) -> dict:
    """{"images": n, "loaded": n, "errors": [...]} of `page` after it loads in headless Chromium."""
    if shutil.which("chromium") is None:
        pytest.fail("EQLIN_REQUIRE_CHROMIUM is set but chromium is not on PATH: install Debian's chromium package")
    probed = scratch / "probed.html"
    probed.write_text(page.read_text().replace("<head>", "<head>" + _PROBE, 1))
    run = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={scratch / 'profile'}", "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()],
        capture_output=True, text=True, timeout=120)
    match = re.search(r"data-check=\"([^\"]*)\"", run.stdout)
    assert match, run.stderr[-2000:]
    return json.loads(match.group(1).replace("&quot;", '"'))
