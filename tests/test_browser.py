"""Notebook 01 in JupyterLab, in a real browser, as a learner meets it.

The test starts JupyterLab on a free local port with a token, opens a copy of notebook 01 set to the "tiny" model
in the system Chromium (Debian's `chromium` and `chromium-driver`, driven by Selenium: no browser download),
runs all cells from the Run menu, waits for the step/layer browser widget, moves its step slider with the keyboard
and checks that the map it shows changes: the image the kernel sent, and two screenshots of the widget's output,
which are saved under the test's folder with the measured difference printed in the log. If the browser cannot
start, the test fails and says why.
"""
import base64
import io
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lab_server import LabServer
from test_notebooks import CI_PARAMETERS, CI_PARAMETERS_PER_NOTEBOOK

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "01_cross_attention_maps.ipynb"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
INSTALL = "install them with `apt-get install chromium chromium-driver` (or set CHROMIUM and CHROMEDRIVER)"
# the parameters cell of the copy the browser opens: CI's for notebook 01 (tiny, 4 steps), with the widgets on
PARAMETERS = {name: repr(value) for name, value in
              {**CI_PARAMETERS, **CI_PARAMETERS_PER_NOTEBOOK[NOTEBOOK.stem], "interactive": True}.items()}
RUN_ALL_TIMEOUT = 900  # s; about 2-3 minutes on a shared 2-core CPU (the toy model's premise section is most of it)


def notebook_with_parameters(source: Path, target: Path, parameters: dict) -> None:
    notebook = json.loads(source.read_text())
    cell = next(c for c in notebook["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    text = "".join(cell["source"])
    for name, value in parameters.items():
        text, found = re.subn(rf"^{name} = .*$", f"{name} = {value}  # set by tests/test_browser.py", text, flags=re.M)
        assert found == 1, f"the parameters cell of {source.name} should assign `{name} = ...` once, on its own line"
    cell["source"] = text.splitlines(keepends=True)
    target.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n")


def start_chromium(tmp_path: Path):
    """Chromium, headless, with a fresh profile; the network flags keep it from calling home (closed network)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if shutil.which(p) is None]
    if missing:
        pytest.fail(f"no browser for the JupyterLab test: {missing} not found; {INSTALL}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    try:
        service = Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
        return webdriver.Chrome(options=options, service=service)
    except Exception as error:  # noqa: BLE001 - any failure to start is the same verdict, with its reason
        pytest.fail(f"Chromium could not start ({CHROMIUM} driven by {CHROMEDRIVER}): {error}\n{INSTALL}")


def wait_for(what: str, condition, timeout: float, poll: float = 1.0, explain=lambda: "", quiet: bool = False):
    """condition()'s first true value within `timeout` seconds; else an AssertionError (or None if quiet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(poll)
    if quiet:
        return None
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}. {explain()}")


def run_all_cells(browser) -> bool:
    """Click Run, then Run All Cells, as a learner would. True if the menu item was there and clicked."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    try:
        next(e for e in browser.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-item") if e.text == "Run").click()
        item = wait_for("'Run All Cells'", lambda: next(
            (e for e in browser.find_elements(By.CSS_SELECTOR, "li.lm-Menu-item:not(.lm-mod-disabled)")
             if e.find_element(By.CSS_SELECTOR, ".lm-Menu-itemLabel").text == "Run All Cells"), None), 5, quiet=True)
        if item is None:
            browser.find_element(By.CSS_SELECTOR, "body").send_keys(Keys.ESCAPE)  # close the menu
            return False
        item.click()
        return True
    except (StopIteration, WebDriverException):  # the page was still settling: the caller tries again
        return False


# The prompts of the code cells ("[3]:", "[*]:" while running, "[ ]:" never run), read in the page.
PROMPTS_JS = "return [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(e => e.textContent.trim());"
# The images the page shows in cell outputs (the figures, and the widget's map), loaded and drawn.
FIGURES_JS = """return [...document.querySelectorAll('.jp-OutputArea-output.jp-RenderedImage img')]
    .filter(img => img.complete && img.naturalWidth > 0).length;"""
# The step/layer browser: the widget box whose first slider is "step"; its readout and its output's image.
BOX_JS = """return [...document.querySelectorAll('.widget-vbox')].find(b =>
    [...b.querySelectorAll('.widget-label')].some(l => l.textContent.trim() === 'step')) || null;"""
WIDGET_JS = BOX_JS.replace("return ", "const box = ", 1) + """
if (!box) return null;
const img = box.querySelector('.widget-output img');
return {readout: box.querySelector('.widget-readout').textContent.trim(), src: img ? img.src : null};
"""


def differing_pixels(a: bytes, b: bytes) -> tuple[float, float]:
    """(fraction of pixels that differ, mean absolute difference in 0..255) of two PNG screenshots."""
    x, y = (np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16) for png in (a, b))
    assert x.shape == y.shape, f"the widget's output changed size between the screenshots: {x.shape} vs {y.shape}"
    diff = np.abs(x - y)
    return float((diff.max(axis=-1) > 0).mean()), float(diff.mean())


@pytest.mark.slow
def test_notebook_01_in_jupyterlab_widget_reacts_to_its_step_slider(tmp_path, capsys):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    work = tmp_path / "notebooks"
    work.mkdir()
    notebook_with_parameters(NOTEBOOK, work / NOTEBOOK.name, PARAMETERS)
    lab = LabServer([sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={work}"]
                    + (["--allow-root"] if os.geteuid() == 0 else []),
                    home=tmp_path / "jupyter", cwd=work, env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    with lab.start(timeout=600):  # a loaded CI machine can take minutes to import JupyterLab
        browser = start_chromium(tmp_path)
        try:
            browser.get(f"{lab.url}/lab/tree/{NOTEBOOK.name}?token={lab.token}")
            prompts = lambda: browser.execute_script(PROMPTS_JS)  # noqa: E731
            idle = lambda: browser.find_elements(  # noqa: E731
                By.CSS_SELECTOR, ".jp-Notebook-ExecutionIndicator[data-status='idle']")
            explain = lambda: f"Cell prompts: {prompts()}. JupyterLab's log:\n{lab.log_tail(15)}"  # noqa: E731
            wait_for("the notebook to open with an idle kernel", lambda: prompts() and idle(), 120, explain=explain)

            # Run > Run All Cells, as a learner would
            started = time.monotonic()
            wait_for("Run > Run All Cells to start the cells", lambda: run_all_cells(browser) and wait_for(
                "a cell to start", lambda: any(p != "[ ]:" for p in prompts()), 10, explain=lambda: "", quiet=True),
                120, poll=0, explain=explain)
            # done when no cell is queued or running and the kernel is idle (Run All stops at an error)
            wait_for("the cells to run", lambda: "[*]:" not in (p := prompts()) and p[0] != "[ ]:" and idle(),
                     RUN_ALL_TIMEOUT, poll=3, explain=explain)
            run_seconds, ran_until = time.monotonic() - started, time.time_ns()

            # the notebook as the browser shows it: save it (Ctrl+S), then read what every cell produced. Only a
            # file written after the run ended counts: JupyterLab autosaves every 120 s, and a run longer than that
            # (a loaded machine) leaves an autosave without the last cells' outputs, which read as "did not run".
            path = work / NOTEBOOK.name
            browser.find_element(By.CSS_SELECTOR, "body").send_keys(Keys.CONTROL, "s")
            saved = wait_for("the browser to save the notebook",
                             lambda: path.stat().st_mtime_ns > ran_until and (n := json.loads(path.read_text()))
                             and any(c.get("outputs") for c in n["cells"] if c["cell_type"] == "code") and n, 60)
            code = [c for c in saved["cells"] if c["cell_type"] == "code"]
            errors = [(i, o.get("ename"), o.get("evalue")) for i, c in enumerate(code) for o in c["outputs"]
                      if o["output_type"] == "error"]
            assert not errors, f"cells raised in JupyterLab (code cell, error, message): {errors}"
            not_run = [i for i, c in enumerate(code) if not c.get("execution_count")]
            assert not not_run, f"code cells {not_run} did not run (prompts: {prompts()})"
            assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for c in code
                       for o in c["outputs"]), "no cell of the saved notebook holds a widget view"
            # the figures show: every PNG the kernel sent is an image in the page
            figures = sum("image/png" in o.get("data", {}) for c in code for o in c["outputs"])
            shown = browser.execute_script(FIGURES_JS)
            assert figures >= 5 and shown >= figures, (
                f"the kernel sent {figures} figures, the page shows {shown} images")

            widget = wait_for("the step/layer widget to render its map",
                              lambda: (w := browser.execute_script(WIDGET_JS)) and w["src"] and w, 60,
                              explain=lambda: f"widget: {browser.execute_script(WIDGET_JS)}")
            assert widget["readout"] == "mean", f"the step slider should start at 'mean', not {widget['readout']!r}"
            box = browser.execute_script(BOX_JS)
            output = box.find_element(By.CSS_SELECTOR, ".widget-output")
            browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
            time.sleep(1)  # let the scroll settle
            before = output.screenshot_as_png
            time.sleep(1)
            still = differing_pixels(before, output.screenshot_as_png)[0]  # the control: nothing moved

            # one step to the right with the keyboard: from "mean" to UNet call 0
            box.find_element(By.CSS_SELECTOR, ".widget-hslider .noUi-handle").send_keys(Keys.ARROW_RIGHT)
            moved = wait_for("the widget to show step 0's map",
                             lambda: (w := browser.execute_script(WIDGET_JS))["readout"] == "0"
                             and w["src"] and w["src"] != widget["src"] and w, 60,
                             explain=lambda: f"widget now: readout {browser.execute_script(WIDGET_JS)['readout']!r}")
            time.sleep(1)  # the new image is in the page; let it paint
            after = output.screenshot_as_png
            browser.save_screenshot(str(tmp_path / "notebook_after_run.png"))
        finally:
            browser.quit()

    (tmp_path / "widget_step_mean.png").write_bytes(before)
    (tmp_path / "widget_step_0.png").write_bytes(after)
    fraction, mean = differing_pixels(before, after)
    sizes = [len(base64.b64decode(w["src"].split(",", 1)[1])) for w in (widget, moved)]
    with capsys.disabled():
        print(f"\n[browser] notebook 01 ran in JupyterLab (Chromium) in {run_seconds:.0f} s, {shown} images shown; "
              f"step slider 'mean' -> '0': {fraction:.1%} of the widget's output pixels changed (mean |diff| "
              f"{mean:.1f}/255; unmoved, 1 s apart: {still:.1%}; the kernel's PNG {sizes[0]} -> {sizes[1]} bytes); "
              f"screenshots in {tmp_path}")
    assert still == 0, f"{still:.2%} of the widget's pixels changed while nothing moved: the comparison means nothing"
    assert fraction > 0.01, (f"moving the step slider changed only {fraction:.2%} of the widget's pixels: the map "
                             f"it shows did not change (screenshots in {tmp_path})")
