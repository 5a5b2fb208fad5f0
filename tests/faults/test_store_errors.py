"""A tracking store that cannot be used fails at once, in one line, exit code 3; its creation is race-free.

Real processes and real SQLite files: the CLI is driven as a user drives it, read-only places
are made so for root too (``chattr +i``; chmod does not stop root), a full disk is a small
tmpfs, and a dead server is a port nothing listens on.
"""
import json
import os
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from jobs import retrying, storeguard
from jobs.storeguard import StoreError

ROOT = Path(__file__).resolve().parents[2]
FIX = "choose another store with --tracking-uri"


def write_sweep(folder: Path, uri: str, name: str = "storeerr") -> Path:
    """A one-trial sweep file whose store is ``uri``."""
    path = folder / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: {name}
        tracking: {uri}
        fixed:
          dataset: digits
          model: lenet_300_100
          prune.method: l1_global
          prune.ratio: 0.5
          prune.iterations: 1
          train.epochs: 1
          quant: none
        launcher:
          executor: debug
          folder: {folder}/submitit
        """))
    return path


def sweep(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the ``sweep`` command as a user does, in ``cwd``, with no store chosen by the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "runner.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one error line a failed command printed, after checking it printed no traceback."""
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    return result.stderr.strip().splitlines()[-1]


def make_store(db: Path, sweep_name: str = "storeerr") -> str:
    """A store with one experiment, created in a process of its own (as ``sweep run`` would)."""
    code = ("import sys; from jobs.tracking import prepare_store; "
            "print(prepare_store(sys.argv[1], sys.argv[2]).experiment_id)")
    subprocess.run([sys.executable, "-c", code, f"sqlite:///{db}", sweep_name], check=True, cwd=ROOT,
                   capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return f"sqlite:///{db}"


@contextmanager
def unwritable(path: Path):
    """Make a file or directory refuse writes, for root too; yield the OS's words for the refusal."""
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not available here (root ignores chmod)")
        undo = ["chattr", "-i", str(path)]
    else:
        mode = path.stat().st_mode
        path.chmod(0o555 if path.is_dir() else 0o444)
        undo = None
    try:
        probe = path / "probe" if path.is_dir() else path
        try:  # check that it really refuses
            with open(probe, "a"):
                pass
        except OSError as exc:
            yield exc.strerror.lower()
        else:
            pytest.fail(f"{path} still takes writes")
    finally:
        if undo:
            subprocess.run(undo, check=True)
        else:
            path.chmod(mode)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- read-only stores -------------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_read_only_store_directory_fails_at_once(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    db = store / "mlflow.db"
    path = write_sweep(tmp_path, f"sqlite:///{db}")
    with unwritable(store) as why:
        result = sweep("run", str(path), cwd=tmp_path)
    assert result.returncode == 3, result.stderr
    assert error_line(result) == (f"error: the store {db} cannot be written: its directory {store} is read-only "
                                  f"({why}) — make it writable, or {FIX}")
    assert list(store.iterdir()) == []


@pytest.mark.timeout(120)
def test_read_only_existing_store_names_the_cause(tmp_path):
    db = tmp_path / "mlflow.db"
    uri = make_store(db)
    path = write_sweep(tmp_path, uri)
    before = db.read_bytes()
    with unwritable(db):
        # A trial not run yet: `sweep run` must write, and says why it cannot.
        result = sweep("run", str(path), cwd=tmp_path)
        assert result.returncode == 3, result.stderr
        assert error_line(result) == (f"error: the store {db} is read-only (attempt to write a readonly database) "
                                      f"— make it writable, or {FIX}")
        # The same error local workers report for every trial (jobs.packs), not SQLAlchemy's autoflush advice.
        from jobs.tracking import prepare_store

        with pytest.raises(StoreError, match="is read-only \\(attempt to write a readonly database\\)"):
            prepare_store(uri, "another")
        # Reading needs no write: plan and export still work on it.
        assert sweep("plan", str(path), "--format", "json", cwd=tmp_path).returncode == 0
        exported = sweep("export", "storeerr", "-o", str(tmp_path / "out.csv"), "--tracking-uri", uri, cwd=tmp_path)
        assert exported.returncode == 0, exported.stderr
    assert db.read_bytes() == before


@pytest.mark.timeout(60)
def test_directory_that_cannot_exist(tmp_path):
    (tmp_path / "afile").write_text("")
    db = tmp_path / "afile" / "mlflow.db"
    result = sweep("run", str(write_sweep(tmp_path, f"sqlite:///{db}")), cwd=tmp_path)
    assert result.returncode == 3, result.stderr
    assert error_line(result).startswith(f"error: the directory of the store {db} does not exist and cannot be "
                                         "created (")


def test_permanent_errors_are_not_retried(monkeypatch):
    monkeypatch.setattr(retrying.time, "sleep", lambda s: pytest.fail("a permanent error was retried"))
    calls = []

    def unopenable():
        calls.append(1)
        raise sqlite3.OperationalError("unable to open database file")

    with pytest.raises(StoreError, match="cannot be opened \\(unable to open database file\\)"):
        retrying.retry(unopenable)
    assert len(calls) == 1
    for message in ("attempt to write a readonly database", "database or disk is full"):
        with pytest.raises(StoreError):
            retrying.retry(lambda: (_ for _ in ()).throw(sqlite3.OperationalError(message)))


def test_contention_is_still_retried(monkeypatch):
    monkeypatch.setattr(retrying.time, "sleep", lambda s: None)
    calls = []

    def locked_twice():
        calls.append(1)
        if len(calls) < 3:
            raise sqlite3.OperationalError("database is locked")
        return "ok"

    assert retrying.retry(locked_twice) == "ok" and len(calls) == 3
    with pytest.raises(ValueError):  # not a store condition: raised as it is
        retrying.retry(lambda: (_ for _ in ()).throw(ValueError("bad param")))


# --- a full disk ------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs, too small for a new MLflow store once mostly filled."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
        (mount / "filler").write_bytes(b"\0" * (free - 200_000))
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.timeout(120)
def test_full_disk_is_one_line(tmp_path, small_disk):
    db = small_disk / "mlflow.db"
    path = write_sweep(tmp_path, f"sqlite:///{db}")
    result = sweep("run", str(path), cwd=tmp_path)
    assert result.returncode == 3, result.stderr
    assert error_line(result) == (f"error: the disk holding {db} is full (database or disk is full) — free some "
                                  f"space, or {FIX}")
    exported = sweep("export", "storeerr", "-o", str(tmp_path / "out.csv"), "--tracking-uri", f"sqlite:///{db}",
                     cwd=tmp_path)
    assert exported.returncode == 3 and error_line(exported).startswith(f"error: the disk holding {db} is full")


# --- servers and schemes ----------------------------------------------------------------------------

@pytest.mark.timeout(60)  # MLflow's own client retries for about 16 minutes
def test_unreachable_server_fails_in_one_line(tmp_path):
    port = free_port()  # nothing listens on it
    uri = f"http://127.0.0.1:{port}/"
    path = write_sweep(tmp_path, uri)
    for args in (["plan", str(path)], ["run", str(path)], ["status", str(path)],
                 ["export", "storeerr", "-o", str(tmp_path / "out.csv"), "--tracking-uri", uri]):
        result = sweep(*args, cwd=tmp_path)
        assert result.returncode == 3, (args, result.stderr)
        assert error_line(result) == (f"error: the tracking server http://127.0.0.1:{port} does not answer "
                                      f"(connection refused) — start it, or {FIX}")


@pytest.mark.timeout(60)
def test_silent_server_fails_after_the_probe_timeout(tmp_path):
    with socket.socket() as listener:  # accepts connections (the kernel does) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        result = sweep("plan", str(write_sweep(tmp_path, f"http://127.0.0.1:{port}")), cwd=tmp_path)
    assert result.returncode == 3, result.stderr
    assert error_line(result) == (f"error: the tracking server http://127.0.0.1:{port} does not answer (no answer "
                                  f"within {storeguard.PROBE_TIMEOUT_S:g} s) — start it, or {FIX}")


class _Health(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


def test_answering_server_passes_and_bounds_mlflow_retries(monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for key in storeguard.HTTP_DEFAULTS:
            monkeypatch.delenv(key, raising=False)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "77")  # the user's own choice stays
        storeguard.check_uri(f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
        server.server_close()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"
    assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "1"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "77"


@pytest.mark.timeout(60)
def test_wrong_scheme(tmp_path):
    path = write_sweep(tmp_path, "sqlite:///mlflow.db")
    result = sweep("plan", str(path), "--tracking-uri", "foo://bar", cwd=tmp_path)
    assert result.returncode == 3
    assert error_line(result) == ("error: unsupported tracking URI 'foo://bar' — use sqlite:///path/to/mlflow.db, "
                                  "http(s)://host:port (an mlflow server) or a database URL (postgresql://, "
                                  "mysql://, mssql://)")
    result = sweep("plan", str(path), "--tracking-uri", "sqlite://mlflow.db", cwd=tmp_path)
    assert result.returncode == 3
    assert error_line(result) == ("error: 'sqlite://mlflow.db' is not a SQLite file URI — write "
                                  "sqlite:///relative/path.db or sqlite:////absolute/path.db")


# --- export and ui ----------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_export_of_a_broken_store(tmp_path):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"this is not a database, " * 100)
    result = sweep("export", "storeerr", "-o", str(tmp_path / "out.csv"), "--tracking-uri", f"sqlite:///{db}",
                   cwd=tmp_path)
    assert result.returncode == 3
    assert error_line(result) == (f"error: the store {db} is damaged or not an MLflow store (file is not a "
                                  f"database) — move it aside (a new one is created in its place), or {FIX}")
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.timeout(60)
def test_export_without_a_store_creates_none(tmp_path):
    result = sweep("export", "storeerr", "-o", str(tmp_path / "out.csv"), cwd=tmp_path)
    assert result.returncode == 3
    assert error_line(result) == (f"error: there is no store at {tmp_path / 'mlflow.db'} — run a sweep first, "
                                  f"or {FIX}")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.timeout(60)
def test_ui_without_a_store_creates_none(tmp_path):
    for args in (["ui", "storeerr"], ["ui"]):
        result = sweep(*args, "--port", str(free_port()), cwd=tmp_path)
        assert result.returncode == 3, result.stderr
        assert error_line(result) == (f"error: there is no store at {tmp_path / 'mlflow.db'} — run a sweep first, "
                                      f"or {FIX}")
        assert list(tmp_path.iterdir()) == []


@pytest.mark.timeout(120)
def test_ui_on_a_busy_port_fails(tmp_path):
    uri = make_store(tmp_path / "mlflow.db")
    with socket.socket() as other:  # another program on the port (an MLflow server of another store, say)
        other.bind(("127.0.0.1", 0))
        other.listen(8)
        port = other.getsockname()[1]
        result = sweep("ui", "storeerr", "--port", str(port), "--tracking-uri", uri, cwd=tmp_path)
    assert result.returncode != 0
    assert error_line(result) == f"Error: port {port} is in use; pass --port"
    assert "runs table" not in result.stdout


# --- concurrent creation ----------------------------------------------------------------------------

RACER = """\
import json, sys, time
from pathlib import Path
role, uri, name, out = sys.argv[1:5]
import mlflow.store.tracking.sqlalchemy_store  # the slow import first, so that all start together
from jobs.tracking import prepare_store
from runner.store import find_experiment_id
Path(out + ".ready").touch()
while not Path(out).parent.joinpath("go").exists():
    time.sleep(0.005)
try:
    if role == "create":
        found = prepare_store(uri, name).experiment_id
    else:
        found = find_experiment_id(uri, name)
    Path(out).write_text(json.dumps({"id": found}))
except Exception as exc:
    Path(out).write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_concurrent_creation_makes_one_store(tmp_path):
    """8 processes create one new store and one experiment, 2 others create two more, 2 read, all at once."""
    db = tmp_path / "store" / "mlflow.db"
    uri = f"sqlite:///{db}"
    roles = [("create", "shared")] * 8 + [("create", "solo-a"), ("create", "solo-b"), ("read", "shared"),
                                          ("read", "solo-a")]
    runs = tmp_path / "runs"
    runs.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", RACER, role, uri, name, str(runs / f"{i}.json")],
                              env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i, (role, name) in enumerate(roles)]
    deadline = time.monotonic() + 300
    while len(list(runs.glob("*.ready"))) < len(roles):
        assert all(p.poll() is None for p in procs), [p.stderr.read() for p in procs if p.poll() is not None]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    (runs / "go").touch()
    for p in procs:
        p.wait(timeout=300)
    said = [json.loads((runs / f"{i}.json").read_text()) for i in range(len(roles))]
    assert not [s for s in said if "error" in s], said
    ids = {}
    for (role, name), s in zip(roles, said):
        if role == "create":
            ids.setdefault(name, set()).add(s["id"])
    assert {name: len(found) for name, found in ids.items()} == {"shared": 1, "solo-a": 1, "solo-b": 1}
    assert len({found.pop() for found in ids.values()}) == 3
    # Readers saw nothing yet, or the one experiment.
    assert said[10]["id"] in (None, *[s["id"] for s in said[:8]])

    # One sound store that a fresh process opens: no half-made migration left behind.
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert con.execute("SELECT count(*) FROM sqlite_master WHERE name LIKE '_alembic_tmp%'").fetchone() == (0,)
        assert len(con.execute("SELECT version_num FROM alembic_version").fetchall()) == 1
        names = [n for (n,) in con.execute("SELECT name FROM experiments ORDER BY name")]
    assert names == ["Default", "shared", "solo-a", "solo-b"]
    code = ("import sys; from mlflow.tracking import MlflowClient; "
            "print(sorted(e.name for e in MlflowClient(sys.argv[1]).search_experiments()))")
    opened = subprocess.run([sys.executable, "-c", code, uri], capture_output=True, text=True, env=env)
    assert opened.returncode == 0, opened.stderr
    assert opened.stdout.strip() == str(["Default", "shared", "solo-a", "solo-b"])
