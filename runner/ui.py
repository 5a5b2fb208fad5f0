"""A lean MLflow UI server for browsing a store.

A default ``mlflow server`` starts 4 workers and a job runner with 7 consumers (about 3 GB);
browsing needs one worker and no job runner (about 0.5 GB).
"""
from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Callable


def runs_url(port: int, experiment_id: str | None) -> str:
    """The runs table of an experiment (the bare experiment URL opens MLflow's GenAI overview)."""
    base = f"http://127.0.0.1:{port}/"
    return f"{base}#/experiments/{experiment_id}/runs" if experiment_id else base


class PortInUse(RuntimeError):
    """The port asked for is taken by another program (perhaps another MLflow server)."""


def check_port(port: int) -> None:
    """Raise PortInUse if something already listens on 127.0.0.1:``port``."""
    # Else /health would be answered by that other server and its URL printed as ours.
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(f"port {port} is in use; pass --port") from None
            raise


def start_server(uri: str, port: int, timeout_s: float = 120.0) -> subprocess.Popen:
    """Start ``mlflow server`` on 127.0.0.1 and return once it answers /health (PortInUse if the port is taken)."""
    check_port(port)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with code {proc.returncode} (is port {port} free?)")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                # Ours only if it still runs: another server may have taken the port meanwhile.
                if resp.status == 200 and proc.poll() is None:
                    return proc
        except OSError:
            time.sleep(0.3)
    stop_server(proc)
    raise RuntimeError(f"mlflow server did not answer on port {port} within {timeout_s:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    """Stop the server started by ``start_server`` (SIGTERM, then SIGKILL)."""
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve(uri: str, port: int, experiment_id: str | None, echo: Callable[[str], None] = print) -> None:
    """Serve the UI until interrupted."""
    echo(f"starting the MLflow UI for {uri} ...")
    # A shell starts background commands with SIGINT ignored (and Python keeps it so), and
    # `kill` sends SIGTERM: both must stop the server, not leave it running.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    proc = start_server(uri, port)
    echo(f"runs table: {runs_url(port, experiment_id)}")
    echo("press Ctrl-C to stop")
    try:
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop_server(proc)
