"""End to end: open an interactive notebook in JupyterLab, run all cells in a real browser, move
its ipywidgets slider and check the plot redraws. This is the path a reader takes, and the only
test that exercises the widget front end (the views themselves are unit-tested without it)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS_DIR = REPO_ROOT / "test-artifacts" / "browser"  # ignored by git; the README shows them

RUN_ALL_TIMEOUT_MS = 10 * 60_000  # the first run trains the notebook's models on CPU
REDRAW_TIMEOUT_MS = 120_000
PAGE_TIMEOUT_MS = 60_000


@dataclass(frozen=True)
class SliderCase:
    notebook: str  # a file in notebooks/
    slider: str  # the description of the ipywidgets slider to move; its output is a figure


CASES = [
    SliderCase("03_routing_threshold.ipynb", "threshold"),
    SliderCase("05_generation.ipynb", "threshold"),
]
PARAMS = [pytest.param(case, id=case.notebook.removesuffix(".ipynb"), marks=pytest.mark.skipif(
    not (REPO_ROOT / "notebooks" / case.notebook).exists(),
    reason=f"notebooks/{case.notebook} does not exist")) for case in CASES]

# The notebook's state read from the page: JupyterLab's own model (exposed with
# --LabApp.expose_app_in_browser) for the kernel's status, execution counts and errors, the
# DOM for the "[*]" prompts of queued cells.
NOTEBOOK_STATE_JS = """() => {
    const panel = window.jupyterapp.shell.currentWidget;
    const cells = panel.content.widgets.filter(cell => cell.model.type === 'code');
    const errors = cells.flatMap(cell => cell.model.outputs.toJSON())
        .filter(output => output.output_type === 'error')
        .map(output => output.traceback.join('\\n').replace(/\\x1b\\[[0-9;]*m/g, ''));
    const prompts = [...panel.node.querySelectorAll('.jp-InputPrompt')].map(p => p.textContent);
    const kernel = panel.sessionContext.session?.kernel;
    return {
        executed: cells.filter(cell => cell.model.executionCount !== null).length,
        cells: cells.length,
        queued: prompts.filter(p => p.includes('*')).length,
        kernel: kernel ? kernel.status : null,
        errors,
    };
}"""

RUN_FINISHED_JS = f"""() => {{
    const state = ({NOTEBOOK_STATE_JS})();
    return state.queued === 0 && state.kernel === 'idle'
        && (state.errors.length > 0 || state.executed === state.cells);
}}"""


def copy_without_outputs(case: SliderCase, root):
    """Copy the notebook into the server's dir with outputs and execution counts cleared, so
    the run's progress reads unambiguously from the counts; returns its path under root."""
    notebook = json.loads((REPO_ROOT / "notebooks" / case.notebook).read_text())
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    target = root / "notebooks" / case.notebook
    target.parent.mkdir(exist_ok=True)
    target.write_text(json.dumps(notebook))
    return target.relative_to(root).as_posix()


def artifact(case: SliderCase, label: str):
    return ARTIFACTS_DIR / f"{case.notebook.removesuffix('.ipynb')}-{label}.png"


def screenshot(page, case: SliderCase, label: str, interact=None) -> None:
    """Save the viewport, scrolled so the interact cell's code, slider and figure show."""
    if interact is not None:
        interact.evaluate("node => node.closest('.jp-Cell').scrollIntoView({block: 'start'})")
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=artifact(case, label))


def run_all_cells(page) -> None:
    page.locator(".lm-MenuBar-itemLabel").filter(has_text=re.compile("^Run$")).click()
    page.locator(".lm-Menu-itemLabel").filter(has_text=re.compile("^Run All Cells$")).click()
    page.wait_for_function(RUN_FINISHED_JS, timeout=RUN_ALL_TIMEOUT_MS, polling=500)
    state = page.evaluate(NOTEBOOK_STATE_JS)
    if state["errors"]:
        pytest.fail("the notebook raised:\n" + "\n\n".join(state["errors"]), pytrace=False)
    assert state["executed"] == state["cells"], f"not every cell ran: {state}"


def figure_source(interact) -> str:
    """The data URL of the figure the interact output shows now."""
    return interact.locator(".widget-output img").first.get_attribute("src")


@pytest.mark.parametrize("case", PARAMS)
def test_slider_redraws_output(case, page, jupyter_lab):  # the browser first: it may skip
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    artifact(case, "failure").unlink(missing_ok=True)
    path = copy_without_outputs(case, jupyter_lab.root)
    page.goto(f"{jupyter_lab.url}/lab/tree/{path}?reset&token={jupyter_lab.token}")
    try:
        # Run All before the kernel is up would open a "Select Kernel" dialog instead.
        page.wait_for_function("() => window.jupyterapp?.shell.currentWidget?.sessionContext"
                               "?.session?.kernel?.status === 'idle'", timeout=PAGE_TIMEOUT_MS * 2)
        page.evaluate("() => window.jupyterapp.shell.collapseLeft()")  # room for the notebook
        run_all_cells(page)

        slider = page.locator(".widget-slider").filter(
            has=page.locator(".widget-label", has_text=case.slider)).first
        interact = page.locator(".widget-interact").filter(has=slider).first
        slider.wait_for(state="visible")
        readout = slider.locator(".widget-readout")
        handle = slider.locator(".noUi-handle")
        figure_before, value_before = figure_source(interact), readout.inner_text()
        assert figure_before.startswith("data:image/png;base64,"), figure_before[:80]
        screenshot(page, case, "before", interact)

        handle.press("PageDown")  # five steps down: one change event, so one redraw
        # The output keeps the old figure until the new one arrives (clear_output(wait=True)).
        page.wait_for_function(
            "([node, before]) => { const img = node.querySelector('.widget-output img');"
            " return img !== null && img.src !== before; }",
            arg=[interact.element_handle(), figure_before], timeout=REDRAW_TIMEOUT_MS)
        value_after = readout.inner_text()
        screenshot(page, case, "after", interact)
    except Exception:
        screenshot(page, case, "failure")
        raise
    assert value_after != value_before, f"the slider's readout stayed at {value_before}"
