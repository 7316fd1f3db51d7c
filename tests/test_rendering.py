"""The reports as a person sees them: headless Chromium opens them and the tables and plots must render.

Needs Debian's ``chromium`` and ``chromium-driver`` and the ``selenium`` package; skipped
without them. With ``LORABENCH_SCREENSHOTS=DIR`` it also saves a screenshot of each page
(``docs/`` holds the committed ones).
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from lorabench.storage.history import read_run
from lorabench.report.pages import write_report

ROOT = Path(__file__).resolve().parent.parent
STORED_RUN = Path(__file__).parent / "data" / "stored-run.json"
STORED_2X2 = Path(__file__).parent / "data" / "stored-run-2x2.json"  # two models x two data sets

pytestmark = pytest.mark.skipif(
    shutil.which("chromium") is None or shutil.which("chromedriver") is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1100"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")),
                              options=options)
    yield driver
    driver.quit()


@pytest.fixture
def serve():
    """Serve a folder over HTTP on a free port (the Allure report fetches its data, which file:// forbids)."""
    servers = []

    def start(folder: Path) -> str:
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()


def screenshot(driver, name: str) -> None:
    folder = os.environ.get("LORABENCH_SCREENSHOTS")
    if folder:
        driver.save_screenshot(str(Path(folder) / name))


def wait_for(driver, script: str, timeout: float = 30.0):
    ui = pytest.importorskip("selenium.webdriver.support.ui", reason="needs selenium (pip install selenium)")
    return ui.WebDriverWait(driver, timeout).until(lambda d: d.execute_script(script))


# Every inline plot's rendered width, once the page has laid them out.
PLOT_WIDTHS = "return [...document.querySelectorAll('.plots svg')].map(s => s.getBoundingClientRect().width)"
# Tables wider than the 1400 px window (their own box, or a wrapper that has to scroll).
TOO_WIDE = """return [...document.querySelectorAll('.wide')].filter(w => w.scrollWidth > w.clientWidth
    || w.getBoundingClientRect().right > window.innerWidth).map(w => w.firstElementChild.id)"""


def test_summary_html_tables_and_plots_render(tmp_path, browser):
    run = read_run(STORED_RUN)
    run.name = "0b84d3c4a19e93fd62a1578499607272f8c84a20_20261204_192711_uncommited-changes"  # as autosave names it
    write_report(run, tmp_path)
    (tmp_path / "plots").rename(tmp_path / "moved")  # self-contained: the page needs no file beside it
    browser.get((tmp_path / "summary.html").as_uri())
    rows = browser.execute_script("return document.querySelectorAll('#results-1 tbody tr').length")
    assert rows == 3
    widths = browser.execute_script(PLOT_WIDTHS)
    assert len(widths) == 5 and all(w > 300 for w in widths)
    assert browser.execute_script("return document.images.length") == 0
    assert browser.execute_script(TOO_WIDE) == []
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    screenshot(browser, "report-summary.png")


def test_two_models_on_two_data_sets_render_labelled_by_both(tmp_path, browser):
    run = read_run(STORED_2X2)
    write_report(run, tmp_path)
    browser.get((tmp_path / "summary.html").as_uri())
    cross = browser.execute_script("return document.querySelectorAll('#model-by-dataset tbody tr').length")
    assert cross == len(run.results)
    titles = browser.execute_script("return [...document.querySelectorAll('h2')].map(h => h.innerText)")
    for model in ("tiny-llama", "tiny-qwen"):
        for dataset in ("digit-reverse", "add-qa"):
            assert any(t.startswith(f"{model} on ") and dataset in t for t in titles), (model, dataset, titles)
    assert browser.execute_script("return document.querySelectorAll('#configurations tbody tr').length") >= 5
    assert browser.execute_script("return document.getElementById('gates') !== null")
    widths = browser.execute_script(PLOT_WIDTHS)
    assert len(widths) == 5 and all(w > 1000 for w in widths)  # each plot is a 2 x 2 grid of panels
    assert browser.execute_script(TOO_WIDE) == []  # the gates and the four results tables fit too
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    screenshot(browser, "report-2x2.png")
    folder = os.environ.get("LORABENCH_SCREENSHOTS")
    if folder:
        figures = browser.find_elements("css selector", ".plots figure")
        for figure, name in zip(figures[-2:], ("report-2x2-pareto.png", "report-2x2-loss-curves.png")):
            browser.execute_script("arguments[0].scrollIntoView()", figure)
            figure.screenshot(str(Path(folder) / name))


@pytest.mark.skipif(not (ROOT / "node_modules" / ".bin" / "allure").exists() and shutil.which("npm") is None,
                    reason="needs the Allure 3 command line (scripts/allure-report installs it with npm)")
def test_allure_report_renders_the_cases(browser, serve, allure_results, allure_workdir):
    results, work = allure_results, allure_workdir
    subprocess.run([str(work / "scripts" / "allure-report"), str(results)], check=True, capture_output=True,
                   timeout=600, cwd=work)
    browser.get(serve(work / "reports" / "allure-report") + "index.html")
    text = wait_for(browser, "const t = document.body.innerText; return t.includes('test_finetune') ? t : false;", 60)
    assert "test_finetune" in text
    screenshot(browser, "report-allure.png")
    # the run's comparison across configurations, a global attachment holding the summary page
    browser.find_element("xpath", "//span[contains(text(), 'Global Attachments')]").click()
    wait_for(browser, "return document.body.innerText.includes('comparison: every configuration')")
    browser.find_element("xpath", "//*[contains(text(), 'comparison: every configuration')]").click()
    frame = wait_for(browser, "const f = document.querySelector('iframe'); "
                              "return f && f.getBoundingClientRect().height > 1000 ? f : false;")
    browser.switch_to.frame(frame)
    assert browser.execute_script("return document.querySelectorAll('#results-1 tbody tr').length") == 2
    assert browser.execute_script("return document.querySelectorAll('.plots svg').length") == 5
    browser.switch_to.default_content()
    screenshot(browser, "allure-comparison.png")
