"""Atomic writes, tolerant reads (jobs/atomicio.py): a torn or corrupt file is set aside, a full disk names the file.

Full disks are real: a tiny tmpfs mounted for the test (needs root; elsewhere those tests are
skipped, and ``test_quota_errors_name_the_file_too`` still covers the error path by making
``os.write`` raise).
"""
import errno
import io
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from jobs import atomicio
from jobs.checkpoint import Checkpoint
from jobs.config import from_flat
from jobs.stages import StageCache, level_keys
from runner import records

ROOT = Path(__file__).resolve().parents[2]


def warned(capsys, path) -> str:
    err = capsys.readouterr().err
    assert f"warning: {path} is corrupt (" in err and "); ignoring it" in err, err
    return err


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


STATE = {"level": 1, "epoch": 2, "model": {"w": torch.arange(2000.0)}, "rows": [{"accuracy": 0.5}]}


@pytest.fixture
def tiny_fs(tmp_path):
    """A real 64 KiB filesystem (tmpfs); ``remount`` frees space as a user would."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    except FileNotFoundError:
        pytest.skip("no mount command here")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def remount(mnt: Path, size: str) -> None:
    """Grow (or shrink) the tmpfs at ``mnt``, keeping its files."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)


def fill(directory: Path) -> Path:
    """Fill the filesystem of ``directory`` up to its last byte."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as fh:
        try:
            while fh.write(b"\0" * 4096):
                pass
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


# Writers


def test_writes_replace_the_file_whole_and_leave_no_temp_files(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    atomicio.write_json(tmp_path / "a" / "m.json", {"token": "t", "outcome": {"status": "FINISHED"}})
    atomicio.write_text(tmp_path / "a" / "m.json", '{"token": "u", "outcome": {}}')
    atomicio.write_bytes(tmp_path / "a" / "b.bin", b"\x00\x01")
    atomicio.torch_save(STATE, tmp_path / "a" / "c.pt")
    assert atomicio.read_json(tmp_path / "a" / "m.json") == {"token": "u", "outcome": {}}
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"
    assert torch.equal(atomicio.torch_load(tmp_path / "a" / "c.pt")["model"]["w"], STATE["model"]["w"])
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.bin", "c.pt", "m.json"]
    assert len(synced) == 8  # each file and its directory


# Readers: missing, empty, truncated, garbage, wrong shape


def test_read_json_missing_is_none_without_a_warning(tmp_path, capsys):
    assert atomicio.read_json(tmp_path / "nothing.json") is None
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("content, reason", [
    (b"", "empty file"),
    (b'{"token": "abc", "outco', "invalid JSON"),
    (b"\xff\xfe\x00garbage", "not UTF-8"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"token": "abc"}', "no 'outcome'"),
])
def test_read_json_sets_a_corrupt_file_aside(tmp_path, capsys, content, reason):
    path = tmp_path / "outcome.json"
    path.write_bytes(content)
    assert atomicio.read_json(path, ("token", "outcome")) is None
    assert reason in warned(capsys, path)
    assert not path.exists() and (tmp_path / "outcome.json.corrupt").read_bytes() == content
    assert atomicio.read_json(path) is None and capsys.readouterr().err == ""  # warned once


def test_a_file_replaced_since_it_was_read_corrupt_is_kept(tmp_path, capsys):
    path = tmp_path / "outcome.json"
    path.write_bytes(b"")
    with open(path, "rb") as stale:  # read corrupt, then a writer put a whole one in its place
        atomicio.write_json(path, {"token": "t", "outcome": {}})
        atomicio.discard(path, "empty file", stale.fileno())
    assert atomicio.read_json(path) == {"token": "t", "outcome": {}}
    assert not (tmp_path / "outcome.json.corrupt").exists()


@pytest.mark.parametrize("cut", ["empty", "half", "one byte short", "garbage", "not a dict"])
def test_torch_load_sets_a_corrupt_file_aside(tmp_path, capsys, cut):
    data = torch_bytes(STATE)
    content = {"empty": b"", "half": data[:len(data) // 2], "one byte short": data[:-1],
               "garbage": os.urandom(3000), "not a dict": torch_bytes([1, 2, 3])}[cut]
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    assert atomicio.torch_load(path) is None
    warned(capsys, path)
    assert (tmp_path / "checkpoint.pt.corrupt").read_bytes() == content


def test_torch_load_catches_what_torch_raises_inside_a_whole_archive(tmp_path, capsys):
    # The archive's directory is intact (it passes the cheap end check) but its pickle is not.
    import zipfile

    path = tmp_path / "c.pt"
    path.write_bytes(torch_bytes(STATE))
    with zipfile.ZipFile(path) as zf:
        entries = {name: zf.read(name) for name in zf.namelist()}
    pickle_name = next(name for name in entries if name.endswith("data.pkl"))
    entries[pickle_name] = b"\x80\x02garbage"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    assert atomicio.torch_load(path) is None
    warned(capsys, path)


def test_read_jsonl_skips_a_torn_line_and_the_next_append_starts_a_new_one(tmp_path, capsys):
    path = tmp_path / "jobs.jsonl"
    atomicio.append_lines(path, [json.dumps({"n": 1}), json.dumps({"n": 2})])
    with open(path, "ab") as fh:
        fh.write(b'{"n": 3, "tr')  # a crash mid-write
    assert atomicio.read_jsonl(path) == [{"n": 1}, {"n": 2}]
    assert f"warning: {path} line 3 is corrupt (invalid JSON" in capsys.readouterr().err
    atomicio.append_line(path, json.dumps({"n": 4}))
    assert atomicio.read_jsonl(path) == [{"n": 1}, {"n": 2}, {"n": 4}]
    assert f"{path} line 3 is corrupt" in capsys.readouterr().err
    assert atomicio.read_jsonl(tmp_path / "none.jsonl") == []


def test_job_records_ignore_a_torn_last_line(tmp_path, capsys):
    record = records.JobRecord("t1", "one", "42", "local", 1.0, "out", "err")
    records.append(tmp_path, [record, records.JobRecord("t2", "two", "43", "local", 2.0, "out", "err")])
    data = (tmp_path / records.FILENAME).read_bytes()
    (tmp_path / records.FILENAME).write_bytes(data[:-20])
    assert records.latest(tmp_path) == {"t1": record}
    assert f"{tmp_path / records.FILENAME} line 2 is corrupt" in capsys.readouterr().err


def test_a_corrupt_checkpoint_or_run_id_means_starting_over(tmp_path, capsys):
    checkpoint = Checkpoint(tmp_path)
    checkpoint.save(STATE)
    checkpoint.path.write_bytes(checkpoint.path.read_bytes()[:100])
    assert checkpoint.load() is None
    warned(capsys, checkpoint.path)
    assert checkpoint.load() is None and capsys.readouterr().err == ""  # one warning, not one per read
    checkpoint.run_path.write_text("")
    assert checkpoint.run_id() is None
    warned(capsys, checkpoint.run_path)
    checkpoint.save_run_id("0123456789abcdef0123456789abcdef")
    assert checkpoint.run_id() == "0123456789abcdef0123456789abcdef"


def test_a_truncated_stage_is_not_there(tmp_path, capsys):
    cache = StageCache(tmp_path)
    cache.save("d-1", STATE)
    cache.save("d-1", {"row": {}, "histograms": []}, "final.pt")
    assert cache.has("d-1") and cache.load("d-1")["epoch"] == 2
    path = tmp_path / "d-1.pt"
    path.write_bytes(path.read_bytes()[:-200])
    assert not cache.has("d-1")  # so the trial computes the level again
    warned(capsys, path)
    assert (tmp_path / "d-1.pt.corrupt").exists() and not cache.has("d-1")
    (tmp_path / "d-1.final.pt").write_bytes(b"")
    assert cache.load("d-1", "final.pt") is None
    warned(capsys, tmp_path / "d-1.final.pt")


# A full disk


def test_a_full_disk_names_the_file_and_keeps_the_old_one(tiny_fs):
    target = tiny_fs / "outcome.json"
    atomicio.write_json(target, {"token": "old", "outcome": {}})
    for write, path in [(lambda p: atomicio.write_bytes(p, b"x" * 200_000), target),
                        (lambda p: atomicio.torch_save({"w": torch.zeros(50_000)}, p), tiny_fs / "checkpoint.pt"),
                        (lambda p: atomicio.write_json(p, {"big": "y" * 200_000}), target)]:
        with pytest.raises(OSError) as raised:
            write(path)
        assert raised.value.errno == errno.ENOSPC and str(raised.value) == f"no space left on {path}"
    assert atomicio.read_json(target) == {"token": "old", "outcome": {}}
    assert sorted(p.name for p in tiny_fs.iterdir()) == ["outcome.json"]  # no temp file left behind


def test_a_checkpoint_that_does_not_fit_leaves_the_previous_one(tiny_fs):
    checkpoint = Checkpoint(tiny_fs / "ck")
    checkpoint.save(STATE)
    with pytest.raises(OSError, match=re.escape(f"no space left on {checkpoint.path}")):
        checkpoint.save({**STATE, "epoch": 3, "model": {"w": torch.zeros(50_000)}})
    assert checkpoint.load()["epoch"] == 2


def test_an_append_on_a_full_disk_names_the_file_and_later_appends_are_read(tiny_fs, capsys):
    path = tiny_fs / "jobs.jsonl"
    atomicio.append_line(path, json.dumps({"n": 1}))
    with pytest.raises(OSError) as raised:
        atomicio.append_line(path, json.dumps({"n": 2, "pad": "z" * 200_000}))  # fills the disk mid-line
    assert raised.value.errno == errno.ENOSPC and str(raised.value) == f"no space left on {path}"
    remount(tiny_fs, "1m")  # space freed
    atomicio.append_line(path, json.dumps({"n": 3}))
    assert atomicio.read_jsonl(path) == [{"n": 1}, {"n": 3}]
    assert f"{path} line 2 is corrupt" in capsys.readouterr().err


def test_quota_errors_name_the_file_too(tmp_path, monkeypatch):
    # EDQUOT cannot be had from a tmpfs: os.write raises it here instead.
    def over_quota(fd, data):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(os, "write", over_quota)
    for write in (lambda p: atomicio.write_text(p, "x"), lambda p: atomicio.append_line(p, "{}")):
        with pytest.raises(OSError) as raised:
            write(tmp_path / "f")
        assert (raised.value.errno, str(raised.value)) == (errno.EDQUOT, f"no space left on {tmp_path / 'f'}")
    assert [p.name for p in tmp_path.iterdir()] in ([], ["f"])  # append's file may exist, empty
    monkeypatch.undo()
    assert atomicio.read_jsonl(tmp_path / "f") == []


def test_a_pack_reports_an_outcome_it_cannot_write_and_goes_on(tiny_fs, tmp_path, monkeypatch, one_thread):
    from jobs import packs
    from jobs.config import to_flat
    from jobs.task import PackJob, TrialJob
    from runner.store import prepare

    remount(tiny_fs, "16m")
    target = prepare(f"sqlite:///{tmp_path}/mlflow.db", "outcomes")
    settings = to_flat(from_flat({"dataset": "digits", "dataset.train_size": 200, "train.epochs": 1}))
    jobs = tuple(TrialJob(f"t{i}", f"t{i}", {**settings, "seed": i}, target, checkpoint_dir=str(tiny_fs / f"ck{i}"))
                 for i in range(2))
    real, calls = packs._run_claimed, []

    def then_the_disk_fills(job, token):
        # The first trial's run ends, then the disk fills before its marker is written; space
        # is freed again before the second trial.
        if calls:
            (tiny_fs / "filler").unlink()
        calls.append(job.trial_id)
        outcome = real(job, token)
        if len(calls) == 1:
            fill(tiny_fs)
        return outcome

    monkeypatch.setattr(packs, "_run_claimed", then_the_disk_fills)
    outcomes = packs.run_pack(PackJob(jobs, "tok"))
    marker = tiny_fs / "ck0" / "outcome.json"
    assert outcomes[0]["status"] == "FAILED"
    assert outcomes[0]["error"] == f"OSError: no space left on {marker}"
    assert outcomes[1]["status"] == "FINISHED" and not marker.exists()
    assert atomicio.read_json(tiny_fs / "ck1" / "outcome.json")["outcome"]["status"] == "FINISHED"


# Through the command line


SWEEP = """\
name: {name}
tracking: sqlite:///{tmp}/store/mlflow.db
grid:
{grid}
fixed:
  dataset: digits
  dataset.train_size: 300
  model: lenet_300_100
  prune.method: l1_global
  prune.iterations: 1
  train.epochs: 1
launcher:
  folder: {tmp}/sw
{extra}"""


def sweep(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([str(Path(sys.executable).parent / "sweep"), *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)


def runs_by_trial(tmp_path: Path, name: str) -> dict[str, list]:
    """Every trial id's runs in the store, by status."""
    client = MlflowClient(f"sqlite:///{tmp_path}/store/mlflow.db")
    exp = client.get_experiment_by_name(name)
    out: dict[str, list] = {}
    for run in client.search_runs([exp.experiment_id], max_results=1000):
        out.setdefault(run.data.tags["trial_id"], []).append(run)
    return out


def plan_ids(tmp_path: Path, path: Path, *args: str) -> dict[tuple, str]:
    plan = sweep(tmp_path, "plan", str(path), "--format", "json", *args)
    assert plan.returncode == 0, plan.stderr
    return {(row["quant"], row["seed"]): row["trial_id"] for row in json.loads(plan.stdout)["trials"]}


def worker_logs(folder: Path) -> str:
    return "".join(p.read_text() for p in folder.glob("*_log.err"))


@pytest.mark.slow
def test_corrupt_files_are_set_aside_and_every_trial_finishes_once(tmp_path):
    path = tmp_path / "atomic.yaml"
    path.write_text(SWEEP.format(name="atomic", tmp=tmp_path, extra="", grid=textwrap.indent(
        "prune.ratio: [0.8]\nquant: [none, dynamic]\nseed: [0, 1]", "  ")))
    first = sweep(tmp_path, "run", str(path), "--executor", "local", "--max-parallel", "2")
    assert first.returncode == 0 and "finished 4, skipped 0, failed 0" in first.stdout, first.stdout + first.stderr
    folder = tmp_path / "sw"
    more = ("--set", "quant=[none, dynamic, static]")
    ids = plan_ids(tmp_path, path, *more)
    # What a crash or a full disk of an older tool left behind:
    jobs = folder / "jobs.jsonl"
    jobs.write_bytes(jobs.read_bytes()[:-40])  # a torn last line
    (folder / "checkpoints" / ids[("none", 0)] / "outcome.json").write_bytes(b"")  # a finished trial's
    fixed = {"dataset": "digits", "dataset.train_size": 300, "model": "lenet_300_100", "prune.ratio": 0.8,
             "prune.method": "l1_global", "prune.iterations": 1, "train.epochs": 1, "quant": "static"}
    keys = {seed: level_keys(from_flat({**fixed, "seed": seed})) for seed in (0, 1)}
    stages = folder / "stages"
    level_state = (stages / f"{keys[0][1]}.pt").read_bytes()
    for stage in (stages / f"{keys[0][1]}.pt", stages / f"{keys[1][0]}.pt", stages / f"{keys[1][1]}.pt"):
        stage.write_bytes(stage.read_bytes()[:stage.stat().st_size // 2])
    # ...and for a trial that will run now: a zero-byte outcome, a torn checkpoint and run id.
    mangled = folder / "checkpoints" / ids[("static", 1)]
    mangled.mkdir(parents=True)
    (mangled / "outcome.json").write_bytes(b"")
    (mangled / "checkpoint.pt").write_bytes(level_state[:len(level_state) // 3])
    (mangled / "run_id").write_bytes(b"")

    again = sweep(tmp_path, "run", str(path), "--executor", "local", "--max-parallel", "2", *more)
    output = again.stdout + again.stderr
    assert again.returncode == 0 and "finished 2, skipped 4, failed 0" in again.stdout, output
    assert "Traceback" not in output
    assert f"warning: {jobs} line 4 is corrupt (invalid JSON" in again.stderr
    logs = worker_logs(folder) + again.stderr
    assert logs.count(f"warning: {mangled / 'checkpoint.pt'} is corrupt") == 1, logs
    for stage in (keys[0][1], keys[1][1]):  # the deepest ones: found torn, set aside, computed again
        assert f"warning: {stages / stage}.pt is corrupt (truncated or not a torch file)" in logs
        assert (stages / f"{stage}.pt.corrupt").exists()
    for name in ("outcome.json", "checkpoint.pt", "run_id"):
        assert (mangled / f"{name}.corrupt").exists(), name

    status = sweep(tmp_path, "status", str(path), "--format", "json", *more)
    assert status.returncode == 0 and "Traceback" not in status.stderr, status.stderr
    assert {row["state"] for row in json.loads(status.stdout)["trials"]} == {"finished"}
    runs = runs_by_trial(tmp_path, "atomic")
    assert set(runs) == set(ids.values())
    for trial_id, found in runs.items():
        assert [r.info.status for r in found] == ["FINISHED"], trial_id
    reused = {r.data.tags["trial_id"]: r.data.tags.get("reused_levels") for found in runs.values() for r in found}
    assert reused[ids[("static", 0)]] == "0" and reused[ids[("static", 1)]] is None  # levels computed again


@pytest.mark.slow
def test_a_full_disk_fails_trials_naming_the_file_and_a_rerun_completes_them(tmp_path, tiny_fs):
    path = tmp_path / "full.yaml"
    # Two trials share a dense model (stored for both), a third trains alone (its checkpoint only).
    path.write_text(SWEEP.format(name="full", tmp=tmp_path, grid="  prune.ratio: [0.5, 0.8]",
                                 extra="include:\n  - prune.ratio: 0.8\n    seed: 1\n"))
    folder = tmp_path / "sw"
    folder.mkdir()
    for name in ("checkpoints", "stages"):  # the trials' states go to the tiny disk
        (tiny_fs / name).mkdir()
        (folder / name).symlink_to(tiny_fs / name)
    run = sweep(tmp_path, "run", str(path), "--executor", "local", "--max-parallel", "1")
    assert run.returncode == 1 and "finished 0, skipped 0, failed 3" in run.stdout, run.stdout + run.stderr
    failures = [line for line in run.stderr.splitlines() if line.strip().startswith("FAILED")]
    assert len(failures) == 3 and all(f"no space left on {tiny_fs}/" in line for line in failures), run.stderr
    assert {line.split(f"{tiny_fs}/")[1].split("/")[0] for line in failures} == {"stages", "checkpoints"}
    assert any(line.endswith("/checkpoint.pt") for line in failures)
    runs = runs_by_trial(tmp_path, "full")
    assert len(runs) == 3
    for found in runs.values():
        (failed,) = found
        assert failed.info.status == "FAILED"
        assert failed.data.tags["error"].startswith(f"OSError: no space left on {tiny_fs}/")
    status = sweep(tmp_path, "status", str(path), "--format", "json")
    assert status.returncode == 0, status.stderr
    assert {row["state"] for row in json.loads(status.stdout)["trials"]} == {"failed"}
    assert all("no space left on" in row["error"] for row in json.loads(status.stdout)["trials"])

    remount(tiny_fs, "64m")
    again = sweep(tmp_path, "run", str(path), "--executor", "local", "--max-parallel", "1")
    assert again.returncode == 0 and "finished 3, skipped 0, failed 0" in again.stdout, again.stdout + again.stderr
    for found in runs_by_trial(tmp_path, "full").values():
        assert sorted(r.info.status for r in found) == ["FAILED", "FINISHED"]
    assert len(runs_by_trial(tmp_path, "full")) == 3
