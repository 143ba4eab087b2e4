"""A temporary Prefect API server for one command-line run, which stops when its parent does.

Prefect starts its own temporary server when ``PREFECT_API_URL`` is unset, but a CLI killed with
SIGKILL leaves that server running and listening. ``temporary_server`` starts the same server
(uvicorn serving ``prefect.server.api.server:create_app``, the UI off) as a child process that
exits with its parent: on Linux through ``PR_SET_PDEATHSIG``, everywhere through a watchdog
thread that notices the parent is gone.

Prefect is imported only inside the child (``python -m rbridge_core.local_server``), so
``rbridge_core`` stays importable without it.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rbridge_core.errors import RbridgeError

STARTUP_TIMEOUT_S = 120.0  # a first start creates the SQLite database (migrations)
WATCHDOG_PERIOD_S = 0.5
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Environment of Prefect's own temporary server: no UI, ephemeral mode. Telemetry off: it needs
# the internet and contends with the flow run for the SQLite lock.
SERVER_ENV = {
    "PREFECT_UI_ENABLED": "0",
    "PREFECT__SERVER_EPHEMERAL": "1",
    "PREFECT__SERVER_FINAL": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


class ServerError(RbridgeError):
    """The temporary Prefect server did not start; the message names its log."""


@contextmanager
def temporary_server(log_path: str | Path, timeout_s: float = STARTUP_TIMEOUT_S) -> Iterator[str]:
    """Run a temporary Prefect server for the ``with`` block; yields its API URL.

    The server's output goes to ``log_path``. It is stopped on leaving the block, and exits by
    itself if this process dies first (SIGKILL included). Raises ``ServerError`` if it does not
    answer within ``timeout_s``.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc, url = _start(log, log_path, timeout_s)
        try:
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _start(log, log_path: Path, timeout_s: float) -> tuple[subprocess.Popen, str]:
    # PR_SET_PDEATHSIG fires when the *thread* that started the child ends: ask for it only
    # from the main thread, which lives as long as the process; the watchdog covers the rest.
    death_signal = threading.current_thread() is threading.main_thread()
    for _attempt in range(3):  # another process may take the free port before the server does
        port = _free_port()
        command = [sys.executable, "-m", "rbridge_core.local_server", "--port", str(port)]
        command += ["--parent", str(os.getpid())] + (["--death-signal"] if death_signal else [])
        proc = subprocess.Popen(
            command,
            env={**os.environ, **SERVER_ENV},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}/api"
        if _wait_until_up(f"{url}/health", proc, timeout_s):
            return proc, url
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            raise ServerError(
                f"temporary Prefect server did not start ({log_path}): no answer on {url} "
                f"within {timeout_s:.0f}s; set PREFECT_API_URL to use a running server"
            )
        if b"address already in use" not in log_path.read_bytes()[-4096:].lower():
            break
    raise ServerError(
        f"temporary Prefect server did not start ({log_path}): it exited with code "
        f"{proc.returncode}; its log says why"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(health_url: str, proc: subprocess.Popen, timeout_s: float) -> bool:
    """True once ``health_url`` answers; False if ``proc`` exits or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(health_url, timeout=2):
                return True
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    return False


# ---------------------------------------------------------------------------------------------
# The child


def _die_with_parent(parent: int, death_signal: bool) -> None:
    """Exit when process ``parent`` is gone: SIGTERM from the kernel (Linux) and a watchdog."""
    if death_signal and sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request above took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(WATCHDOG_PERIOD_S)
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn shuts down gracefully
        time.sleep(10)
        os._exit(1)  # it did not

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True, help="exit when this PID is gone")
    parser.add_argument("--death-signal", action="store_true", help="use PR_SET_PDEATHSIG")
    args = parser.parse_args(argv)
    _die_with_parent(args.parent, args.death_signal)
    import uvicorn

    uvicorn.run(
        "prefect.server.api.server:create_app",
        factory=True,
        host="127.0.0.1",
        port=args.port,
        log_level="error",
        lifespan="on",
    )


if __name__ == "__main__":
    main()
