"""nbval settings: compare the plain-text outputs of cells marked # NBVAL_CHECK_OUTPUT.

HTML tables repeat the plain text, and widget views carry random model ids, so neither is
compared; nbval never compares images."""

import os

os.environ.setdefault("EASE_PROGRESS", "0")


def pytest_collectstart(collector):
    if collector.fspath and collector.fspath.ext == ".ipynb":
        collector.skip_compare += ("text/html", "application/vnd.jupyter.widget-view+json",
                                   "application/vnd.jupyter.widget-state+json")
