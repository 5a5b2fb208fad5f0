"""Fuzzing `sweep validate`: any mutation of a shipped sweep file validates, or fails with exit code 2
and one `error: file:line: key: message` line; never a traceback, never slow, never a memory blow-up.

Deterministic (derandomized, no example database), and sized to run in well under a minute.
"""
from __future__ import annotations

import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from runner.cli import main
from runner.grid import points
from runner.limits import grid_size
from runner.spec import sweep_folder, validate

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))
TEXTS = [p.read_text() for p in SWEEPS]
SECONDS = 5  # per example, in process, with the imports already done
FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=150,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Values that broke, or could break, validation: non-finite and huge numbers, control characters,
# lone surrogates, aliases, nesting, dates Python refuses, paths and URIs that cannot work.
NASTY = [
    ".nan", ".inf", "-.inf", "1e999", "-1", "0", "101", "4294967296", "2147483648", "9" * 5000, "-0.0",
    "'cuda:-1'", "cuda:99999", "''", "'/'", "/", '"a\\0b"', '"a\\nb"', '"\\e[31m"', '"\\ud800"', '"\\x85"',
    '"\\t"', "[]", "{}", "null", "~", "yes", "*undefined", "&x [1, *x]", "&y {<<: *y}", "[" * 60, "{a: " * 40,
    "2026-13-45", "2026-01-01", "!!python/name:os.system ''", "!!binary aGVsbG8=", "!!set {a}", "ftp://x",
    "sqlite:///", "sqlite://", "http://", "x" * 300, "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]", "{a: 1}", "'output:.'",
    "'output:0.5'", "'fc:0.5,fc:0.5'", "[1, [2, [3]]]", "? [a]", "<<: {seed: 1}", "0x7fffffffffffffff",
    "1:30:00", "'実験'", "epoch:99999999999999999999", "!!int 1e3", "!!float abc", "<<: *nope", "isolate",
    "small_cnn", "resnet50", "'99999999,99999999'", "'99,99'",
]
# Lines worth dropping in anywhere: keys of every section, with nasty or plain values.
KEYS = ["name", "description", "tracking", "grid", "fixed", "include", "exclude", "launcher", "seed",
        "prune.iterations", "prune.ratio", "prune.layer_rates", "train.lr", "device", "model", "quant",
        "executor", "folder", "max_trials", "max_parallel", "timeout_min", "checkpoint_every_s", "slurm",
        "partition", "setup", "additional_parameters", "job_name", "mem_gb", "<<", "- seed", "-"]


def laughs(levels: int) -> str:
    """An alias chain under include: 9^levels values from a few hundred bytes."""
    text = "include:\n  - &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    return text + "".join(f"  - &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, levels))


def big_grid(n: int) -> str:
    """n axes of 10 valid values each."""
    keys = ["seed", "train.epochs", "train.batch_size", "dataset.train_size", "quant.calibration_batches",
            "quant.qat_epochs", "prune.retrain_epochs", "prune.iterations"]
    return "grid:\n" + "".join(f"  {k}: [{', '.join(map(str, range(1, 11)))}]\n" for k in keys[:n])


BLOCKS = [laughs(9), laughs(4), big_grid(6), big_grid(8), big_grid(3),
          "x: " + "[" * 20000 + "\n", "grid:\n  seed: " + "[" * 20000 + "]" * 20000 + "\n",
          "fixed:\n" + "".join("  " * i + f"  k{i}:\n" for i in range(40)),
          "launcher:\n  slurm:\n    setup: [\"a\\nb\"]\n    additional_parameters: {\"x\\ny\": 1}\n"]

value = st.one_of(st.sampled_from(NASTY), st.text(max_size=12), st.integers().map(str),
                  st.floats().map(repr))


@st.composite
def replace_value(draw, lines: list[str]) -> list[str]:
    """Give one `key: value` line another value."""
    keyed = [i for i, line in enumerate(lines) if re.match(r"\s*[-\w.]+:\s*\S", line)]
    if not keyed:
        return lines
    i = draw(st.sampled_from(keyed))
    key = lines[i].split(":", 1)[0]
    return lines[:i] + [f"{key}: {draw(value)}"] + lines[i + 1:]


@st.composite
def insert_line(draw, lines: list[str]) -> list[str]:
    """Insert a `key: value` line at any place and indentation."""
    i = draw(st.integers(0, len(lines)))
    indent = " " * draw(st.sampled_from([0, 2, 4, 6, 1]))
    return lines[:i] + [f"{indent}{draw(st.sampled_from(KEYS))}: {draw(value)}"] + lines[i:]


@st.composite
def edit_lines(draw, lines: list[str]) -> list[str]:
    """Delete, duplicate or re-indent one line."""
    if not lines:
        return lines
    i = draw(st.integers(0, len(lines) - 1))
    how = draw(st.sampled_from(["delete", "duplicate", "indent", "dedent"]))
    if how == "delete":
        return lines[:i] + lines[i + 1:]
    if how == "duplicate":
        return lines[:i + 1] + lines[i:]
    return lines[:i] + [("  " + lines[i]) if how == "indent" else lines[i].lstrip()] + lines[i + 1:]


@st.composite
def add_block(draw, lines: list[str]) -> list[str]:
    """Append a pathological block: alias bombs, deep nesting, huge grids, multi-line #SBATCH values."""
    return lines + draw(st.sampled_from(BLOCKS)).splitlines()


@st.composite
def document(draw) -> bytes:
    """A shipped sweep file after a few mutations, sometimes cut short or sprinkled with raw characters."""
    lines = draw(st.sampled_from(TEXTS)).splitlines()
    for _ in range(draw(st.integers(1, 4))):
        mutate = draw(st.sampled_from([replace_value, replace_value, insert_line, edit_lines, add_block]))
        lines = draw(mutate(lines))
    data = ("\n".join(lines) + "\n").encode("utf-8")
    if draw(st.booleans()) and draw(st.booleans()):
        at = draw(st.integers(0, len(data)))
        noise = draw(st.one_of(st.binary(max_size=6),
                               st.text(st.characters(blacklist_categories=("Cs",)), max_size=6).map(str.encode)))
        data = data[:at] + noise + data[at:] if draw(st.booleans()) else data[:at]
    return data


LINE = re.compile(r"error: (?P<file>.+?)(?::(?P<line>\d+))?: (?P<rest>\S.*)")


def check_outcome(path: Path, exit_code: int, stdout: str, stderr: str) -> None:
    """Success, or exit 2 with exactly one printable `error: file:line: key: message` line."""
    assert "Traceback" not in stdout + stderr, stderr
    if exit_code == 0:
        assert stdout.startswith(f"{path}: ok (") and stderr == "", (stdout, stderr)
        return
    assert exit_code == 2, (exit_code, stdout, stderr)
    assert stdout == "" and stderr.endswith("\n") and stderr.count("\n") == 1, stderr
    message = stderr[:-1]
    match = LINE.fullmatch(message)
    assert match and match.group("file") == str(path), message
    # no control character, line separator or lone surrogate may reach the terminal
    assert message.isprintable(), message


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder for the examples, with validation's imports (registries: torch) already done."""
    assert CliRunner().invoke(main, ["validate", str(SWEEPS[0])]).exit_code == 0
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(data=document())
def test_mutated_sweep_files_validate_or_fail_in_one_line(workdir, data):
    path = workdir / "sweep.yaml"
    path.write_bytes(data)
    start = time.monotonic()
    result = CliRunner().invoke(main, ["validate", str(path)])
    elapsed = time.monotonic() - start
    if result.exit_code not in (0, 2):  # show the traceback of what escaped
        raise AssertionError(f"exit {result.exit_code}: {result.exception!r}") from result.exception
    check_outcome(path, result.exit_code, result.stdout, result.stderr)
    event("valid" if result.exit_code == 0 else re.sub(r"[\d'].*", "", result.stderr.split(": ", 2)[-1])[:40])
    assert elapsed < SECONDS, f"{elapsed:.1f} s"


# -- the pathological cases in a child process, with its address space capped

MEMORY = 1024 * 2**20  # validation of these never imports torch; 1 GiB is ~40x what it needs
PATHOLOGICAL = {
    "billion-laughs": "name: t\n" + laughs(9),
    "billion-laughs-in-a-valid-place": "name: t\n" + laughs(9).replace("include:", "fixed:\n  seed: 1\ninclude:"),
    "deep-flow-nesting": "name: t\ngrid:\n  seed: " + "[" * 20000 + "]" * 20000 + "\n",
    "deep-block-nesting": "name: t\nfixed:\n" + "".join("  " * i + f"  k{i}:\n" for i in range(200)),
    "alias-chain": "name: t\ninclude:\n  - &a0 [0]\n" + "".join(f"  - &a{i} [*a{i - 1}]\n" for i in range(1, 900)),
    "grid-6-axes": "name: t\n" + big_grid(6),
    "grid-8-axes": "name: t\n" + big_grid(8),
    "huge-file": "name: t\ndescription: '" + "x" * (1 << 20) + "'\n",
}


def _run_capped(args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))

    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "runner.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60, preexec_fn=cap)
    return proc, time.monotonic() - start


@pytest.mark.parametrize("command", ["validate", "plan"])
@pytest.mark.parametrize("name", list(PATHOLOGICAL))
def test_pathological_files_fail_fast_in_bounded_memory(tmp_path, name, command):
    path = tmp_path / f"{name}.yaml"
    path.write_text(PATHOLOGICAL[name])
    proc, elapsed = _run_capped([command, str(path), *(["--tracking-uri", f"sqlite:///{tmp_path}/x.db"]
                                                      if command == "plan" else [])])
    check_outcome(path, proc.returncode, proc.stdout, proc.stderr)
    assert proc.returncode == 2
    assert elapsed < 15, f"{elapsed:.1f} s including the interpreter's start"  # in process: well under 1 s
    assert not (tmp_path / "x.db").exists()  # rejected before the store is touched


@settings(derandomize=True, database=None, deadline=None, max_examples=4)
@given(data=document())
def test_mutated_files_through_the_installed_command(tmp_path_factory, data):
    """A few examples through a real process: what a user's shell sees."""
    path = tmp_path_factory.mktemp("proc") / "sweep.yaml"
    path.write_bytes(data)
    proc = subprocess.run([sys.executable, "-m", "runner.cli", "validate", str(path)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    check_outcome(path, proc.returncode, proc.stdout, proc.stderr)


# -- properties of the pieces


@FUZZ
@given(a=st.text(max_size=40), b=st.text(max_size=40))
def test_sweep_folders_never_collide_or_escape(a, b):
    folder_a = sweep_folder(SimpleNamespace(name=a, launcher={}))
    folder_b = sweep_folder(SimpleNamespace(name=b, launcher={}))
    for folder in (folder_a, folder_b):
        assert folder.parent == Path(".submitit"), folder
        assert folder.name not in ("", ".", "..") and not folder.name.startswith(".") and "/" not in folder.name
        assert len(folder.name.encode("utf-8", "surrogatepass")) <= 255
    assert (folder_a == folder_b) == (a == b), (a, b, folder_a)


small_axes = st.dictionaries(st.sampled_from(["seed", "train.epochs", "dataset.train_size", "quant.qat_epochs"]),
                             st.lists(st.integers(1, 50), min_size=1, max_size=4), max_size=3)


@FUZZ
@given(axes=small_axes, include=st.lists(small_axes.filter(bool), max_size=2))
def test_grid_size_is_the_number_of_points(axes, include):
    raw = {"name": "t", **({"grid": axes} if axes else {}), **({"include": include} if include else {})}
    spec = validate(raw, "t.yaml", {})
    assert grid_size(spec.axes, spec.include) == len(points(spec))
