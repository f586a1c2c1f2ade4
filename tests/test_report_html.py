"""The HTML report renders in headless Chromium with its plots and no console errors."""

import shutil
import subprocess

import pytest

from torchshrink.recipe import compress, recipe_from_yaml
from torchshrink.recipe.report import regenerate
from torchshrink.recipe.task import generic_task

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it as root)")


def render(path):
    """(DOM after load, console lines) of a local page in headless Chromium."""
    res = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={path.parent / 'chrome-profile'}", "--enable-logging=stderr", "--v=0",
         "--dump-dom", path.resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    console = [line for line in res.stderr.splitlines() if "CONSOLE" in line]
    return res.stdout, console


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from tests.conftest import tiny_net

    d = tmp_path_factory.mktemp("html") / "run"
    recipe = recipe_from_yaml("stages:\n  - kind: cast\n    dtype: float16\n    select: {types: [Linear]}\n  - kind: cast\n    dtype: bfloat16\n    select: {include: [conv]}\n")
    net = tiny_net()
    compress(net, recipe, d, task=generic_task(net))
    return d


def test_report_html_is_self_contained_with_plots(run_dir):
    html = (run_dir / "report.html").read_text()
    assert html.count("<svg") >= 4 and "agreement_mean vs size across stages" in html
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "https://" not in html
    (run_dir / "report.html").unlink()
    assert regenerate(run_dir).read_text() == html  # rebuilt from report.json alone


@needs_chromium
def test_report_renders_in_chromium_without_console_errors(run_dir):
    dom, console = render(run_dir / "report.html")
    assert "torchshrink report" in dom and dom.count("<svg") >= 4 and "<circle" in dom
    assert console == [], console


@needs_chromium
def test_console_error_detection_works(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text("<html><body><p>x</p><script>undefinedFunction()</script></body></html>")
    _, console = render(page)
    assert any("undefinedFunction" in line for line in console)
