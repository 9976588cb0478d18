"""Start a JupyterLab server for a test: a free local port, a random token, its own config folders.

Used by tests/test_lab.py (scripts/lab.sh, headless) and tests/test_browser.py (a notebook in Chromium).
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LabServer:
    """A JupyterLab server process started by `command` (a list), with the port and token appended.

    Its Jupyter config and runtime folders are under `home`, so the user's settings and workspaces neither
    change the test nor are changed by it. Stop it with stop() (or use it as a context manager).
    """

    def __init__(self, command: list[str], home: Path, cwd: Path | None = None, env: dict | None = None):
        self.port, self.token = free_port(), secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        home.mkdir(parents=True, exist_ok=True)
        self.log_path = home / "jupyterlab.log"
        self.env = {**os.environ, "JUPYTER_CONFIG_DIR": str(home / "config"),
                    "JUPYTER_RUNTIME_DIR": str(home / "runtime"), **(env or {})}
        self.command = command + ["--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}",
                                  "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
                                  # the network is closed: no news feed, no update check
                                  "--LabApp.news_url=None",
                                  "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
        # no "Would you like to get notified about official Jupyter news?" toast over the notebook
        settings = home / "config" / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
        settings.mkdir(parents=True, exist_ok=True)
        (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}\n')
        self.cwd = cwd
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 300.0) -> "LabServer":
        assert self.process is None, "this server was started already"
        log = open(self.log_path, "w")
        # its own process group, so that stop() ends the server and whatever it started (kernels)
        self.process = subprocess.Popen(self.command, cwd=self.cwd, env=self.env, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with status {self.process.returncode} before answering; "
                                   f"its log ({self.log_path}) ends with:\n{self.log_tail()}")
            try:
                if self.get("/api/status")["started"]:
                    return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(1)
            except BaseException:
                self.stop()
                raise
        self.stop()
        raise RuntimeError(f"JupyterLab did not answer on {self.url} within {timeout:.0f} s; "
                           f"its log ends with:\n{self.log_tail()}")

    def get(self, path: str, raw: bool = False):
        request = urllib.request.Request(self.url + path, headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        return body.decode() if raw else json.loads(body)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> "LabServer":
        return self if self.process is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
