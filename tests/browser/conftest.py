"""Fixtures for the browser tests: a private JupyterLab server and a headless Chromium that
Playwright drives over the DevTools protocol. Both run as child processes we start ourselves,
so teardown can stop them by PID even when a test fails halfway."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--disable-dev-shm-usage"]
VIEWPORT = {"width": 1400, "height": 1000}
SERVER_START_TIMEOUT = 120  # seconds; JupyterLab imports a lot and the CPUs may be shared
BROWSER_START_TIMEOUT = 60

# User settings the server reads from its private settings dir: no news or update toasts over
# the screenshots, and every cell kept in the DOM so the test can read all prompts.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification": {"checkForUpdates": False,
                                                     "fetchNews": "false"},
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
}


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: drives JupyterLab in headless Chromium (slow)")


def stop_process(process: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM the process group we started, then SIGKILL it if it outlives the timeout."""
    if process.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)  # the whole group, e.g. chromium's renderers
        except ProcessLookupError:
            return
        try:
            process.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_until(condition, timeout: float, what: str, process: subprocess.Popen, log: Path):
    """Poll condition() until it returns something truthy; skip if the process died or it
    took longer than timeout, quoting the end of the process's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        if process.poll() is not None:
            break
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-2000:]
    stop_process(process)
    pytest.skip(f"{what} did not start (exit code {process.poll()}); log tail:\n{tail}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class JupyterLab:
    url: str
    token: str
    root: Path  # the server's notebook dir; tests copy notebooks into it

    def api(self, path: str):
        """GET a Jupyter REST endpoint with the token; the decoded JSON, or None if it fails."""
        request = urllib.request.Request(f"{self.url}/api/{path}",
                                         headers={"Authorization": f"token {self.token}"})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return json.load(response)
        except (OSError, urllib.error.URLError, ValueError):
            return None


@pytest.fixture(scope="module")
def jupyter_lab(tmp_path_factory) -> JupyterLab:
    """A JupyterLab server on a free local port, token auth on, with private config, data,
    runtime and IPython dirs, serving a scratch notebook dir (so running a notebook there
    neither autosaves outputs into the repo's notebooks nor writes its figures/ and runs/)."""
    home = tmp_path_factory.mktemp("jupyter")
    root = home / "root"
    root.mkdir()
    for name, settings in LAB_SETTINGS.items():
        path = home / "config" / "lab" / "user-settings" / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings))
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(home / "config"),
               JUPYTER_DATA_DIR=str(home / "data"), JUPYTER_RUNTIME_DIR=str(home / "runtime"),
               IPYTHONDIR=str(home / "ipython"), EASE_PROGRESS="0")
    token, port = secrets.token_hex(16), free_port()
    log = home / "jupyterlab.log"
    command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root",
               "--ip=127.0.0.1", f"--port={port}", "--ServerApp.port_retries=0",
               f"--ServerApp.token={token}", f"--notebook-dir={root}",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
               "--LabApp.expose_app_in_browser=True"]  # the test reads the notebook model
    with open(log, "wb") as out:
        server = subprocess.Popen(command, cwd=root, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    lab = JupyterLab(f"http://127.0.0.1:{port}", token, root)
    try:
        wait_until(lambda: lab.api("status"), SERVER_START_TIMEOUT, "JupyterLab", server, log)
        yield lab
    finally:
        for kernel in lab.api("kernels") or []:  # shut kernels down before the server goes
            request = urllib.request.Request(f"{lab.url}/api/kernels/{kernel['id']}",
                                             method="DELETE",
                                             headers={"Authorization": f"token {token}"})
            try:
                urllib.request.urlopen(request, timeout=10).close()
            except OSError:
                pass  # the process-group kill below still ends the kernel
        stop_process(server)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium started by us (so we hold its PID), driven by Playwright over CDP."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: apt-get install chromium")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed: pip install playwright")
    profile = tmp_path_factory.mktemp("chromium")
    log = profile.parent / f"{profile.name}.log"
    command = [str(CHROMIUM), *CHROMIUM_FLAGS, "--remote-debugging-port=0",
               f"--user-data-dir={profile}", "about:blank"]
    with open(log, "wb") as out:
        chromium = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    # Chromium writes the port it picked to this file once DevTools listens.
    port_file = profile / "DevToolsActivePort"

    def devtools_port():
        lines = port_file.read_text().split() if port_file.exists() else []
        return lines[0] if lines else None

    try:
        port = wait_until(devtools_port, BROWSER_START_TIMEOUT, "Chromium", chromium, log)
        with sync_api.sync_playwright() as playwright:
            connected = playwright.chromium.connect_over_cdp(f"http://127.0.0.1:{port}")
            try:
                yield connected
            finally:
                connected.close()
    finally:
        stop_process(chromium)


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
    page = context.new_page()
    yield page
    context.close()
