"""report.html is self-contained and opens in headless Chromium with every figure loaded and no console
errors (skipped, with the reason, only where Chromium is not installed and EQLIN_REQUIRE_CHROMIUM is not set:
CI sets it, so there a missing browser fails)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

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


def test_report_is_self_contained(tiny_report):
    _, out = tiny_report
    page = (out / "report.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", page)
    assert page.count("data:image/png;base64,") == 5


@pytest.mark.skipif(shutil.which("chromium") is None and not os.environ.get("EQLIN_REQUIRE_CHROMIUM"),
                    reason="Debian's chromium package is not installed (set EQLIN_REQUIRE_CHROMIUM=1 to fail instead)")
def test_report_opens_in_headless_chromium(tiny_report, tmp_path):
    if shutil.which("chromium") is None:
        pytest.fail("EQLIN_REQUIRE_CHROMIUM is set but chromium is not on PATH: install Debian's chromium package")
    _, out = tiny_report
    page = (out / "report.html").read_text().replace("<head>", "<head>" + _PROBE, 1)
    probed = tmp_path / "probed.html"
    probed.write_text(page)
    run = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()],
        capture_output=True, text=True, timeout=120)
    match = re.search(r"data-check=\"([^\"]*)\"", run.stdout)
    assert match, run.stderr[-2000:]
    check = json.loads(match.group(1).replace("&quot;", '"'))
    assert check == {"images": 5, "loaded": 5, "errors": []}
