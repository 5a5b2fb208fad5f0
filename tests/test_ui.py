"""`sweep ui` serves the store's runs on 127.0.0.1 and prints the runs table's URL."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.cli import main
from tests.test_e2e import write_sweep

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sweep_ui_serves_the_runs(tmp_path):
    path = write_sweep(tmp_path, name="uisweep")
    result = CliRunner().invoke(main, ["run", str(path), "--executor", "debug", "--set", "quant=none",
                                       "--set", "train.epochs=1"])
    assert result.exit_code == 0, result.output
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "runner.cli", "ui", str(path), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "sweep ui exited before printing the URL"
            match = re.search(r"runs table: (\S+)", line)
            url = match and match.group(1)
        assert url is not None
        exp_id = re.fullmatch(rf"http://127\.0\.0\.1:{port}/#/experiments/(\d+)/runs", url).group(1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as resp:
            assert resp.status == 200 and b"<html" in resp.read().lower()
        body = json.dumps({"experiment_ids": [exp_id], "max_results": 100}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            found = json.loads(resp.read())["runs"]
        assert len(found) == 2
        names = {t["value"] for r in found for t in r["data"]["tags"] if t["key"] == "sweep"}
        assert names == {"uisweep"}
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    # the server is gone with the command: nothing listens on the port any more
    deadline = time.monotonic() + 30
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                break
        assert time.monotonic() < deadline, "the MLflow server outlived `sweep ui`"
        time.sleep(0.5)
