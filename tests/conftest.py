"""Shared fixtures: a real S3-compatible server (moto in server mode) and a real Prefect server,
each on 127.0.0.1, one per test session."""

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from processes import free_port, stop, wait_until_up


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server in its own process, as s3fs's own tests run it; its URL.

    The AWS variables point boto/s3fs (in this process and in child processes) at it for the
    session; they are restored afterwards and the server is stopped by its PID.
    """
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": url,
    }
    saved = {k: os.environ.get(k) for k in env}
    try:
        wait_until_up(url, proc)
        os.environ.update(env)
        yield url
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        stop(proc)


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A fresh, empty bucket on the session's S3 server: ``s3://<name>``."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    name = f"rbridge-test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One real Prefect server (`prefect server start`, SQLite, with its UI) on 127.0.0.1 for the
    session; this process's Prefect settings point at it, and its API URL is returned for child
    processes (workers, served flows, a browser). Stopped by its PID at the end."""
    pytest.importorskip("prefect")
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        # no telemetry: there is no internet here, and its writes contend for the SQLite lock
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": api_url,
    }
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "wb")  # noqa: SIM115 - closed in the finally below
    prefect_cli = str(Path(sys.executable).with_name("prefect"))
    proc = subprocess.Popen(
        [prefect_cli, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until_up(f"{api_url}/health", proc, timeout_s=180)
        with temporary_settings({PREFECT_API_URL: api_url}):
            yield api_url
    finally:
        from prefect.logging.handlers import APILogWorker

        try:
            APILogWorker.drain_all(timeout=10)  # ship buffered run logs while the server is up
        finally:
            stop(proc)
            log.close()
