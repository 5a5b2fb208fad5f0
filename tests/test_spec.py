"""Sweep-file validation: every mistake is one line naming file, line, key and what is allowed; exit 2."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.cli import main
from runner.errors import SpecError
from runner.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "sweeps" / "quickstart.yaml"
SETTING_NAMES = "dataset, dataset.augment, dataset.download, dataset.normalize, dataset.root"  # the start of the allowed settings list


def write(tmp_path: Path, text: str, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def validate_cli(*args: str):
    return CliRunner().invoke(main, ["validate", *map(str, args)])


def error_line(result) -> str:
    """The single error line on stderr, checked for exit code 2, one line and no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.stdout == ""
    assert "Traceback" not in result.output
    assert result.stderr.startswith("error: ") and result.stderr.endswith("\n")
    message = result.stderr[:-1]
    assert "\n" not in message, message
    return message


# (id, yaml text, line, key path (None: no key), fragments the message must contain)
CASES = [
    # -- not YAML, not a mapping
    ("yaml-unclosed-list", "name: t\ngrid:\n  seed: [0, 1\nfixed: {}\n", 4, None,
     ["not valid YAML", "while parsing a flow sequence on line 3"]),
    ("yaml-bad-indent", "name: t\n  grid: 1\n", 2, None, ["not valid YAML", "mapping values are not allowed"]),
    ("yaml-tab", "name: t\nfixed:\n\tseed: 1\n", 3, None, ["not valid YAML", "indent with spaces, not tabs"]),
    ("yaml-two-documents", "name: t\n---\nname: u\n", 2, None, ["not valid YAML", "single document"]),
    ("yaml-python-tag", "name: t\nfixed:\n  seed: !!python/object/apply:os.system [ls]\n", 3, "fixed.seed",
     ["not valid YAML", "unsupported tag 'tag:yaml.org,2002:python/object/apply:os.system'"]),
    ("yaml-python-scalar-tag", "name: t\nfixed:\n  seed: !!python/name:os.system ''\n", 3, "fixed.seed",
     ["not valid YAML", "could not determine a constructor"]),
    ("yaml-control-char", "name: t\nfixed:\n  seed: 1\x07\n", 3, None, ["unacceptable character #x0007"]),
    ("yaml-recursive-alias", "name: t\ngrid:\n  seed: &s [1, *s]\n", 3, "grid.seed[1]", ["recursive alias"]),
    ("not-mapping-list", "- name: t\n- grid: {}\n", 1, None,
     ["a sweep file must be a mapping with keys name, description", "got list"]),
    ("not-mapping-scalar", "just some text\n", 1, None, ["must be a mapping", "got str 'just some text'"]),
    ("not-mapping-empty", "# only a comment\n", 1, None, ["must be a mapping", "got an empty file"]),
    # -- duplicate keys, at every level
    ("dup-top", "name: t\ngrid:\n  seed: [0]\nname: u\n", 4, "name", ["duplicate key (first given on line 1)"]),
    ("dup-grid", "name: t\ngrid:\n  seed: [0]\n  quant: [none]\n  seed: [1]\n", 5, "grid.seed",
     ["duplicate key (first given on line 3)"]),
    ("dup-fixed", "name: t\nfixed:\n  seed: 0\n  seed: 1\n", 4, "fixed.seed",
     ["duplicate key (first given on line 3)"]),
    ("dup-fixed-nested", "name: t\nfixed:\n  train:\n    epochs: 3\n    epochs: 4\n", 5, "fixed.train.epochs",
     ["duplicate key (first given on line 4)"]),
    ("dup-nested-and-dotted", "name: t\nfixed:\n  train:\n    epochs: 3\n  train.epochs: 4\n", 5,
     "fixed.train.epochs", ["duplicate setting 'train.epochs' (first given on line 4)"]),
    ("dup-grid-nested-and-dotted", "name: t\ngrid:\n  prune.ratio: [0.5]\n  prune:\n    ratio: [0.8]\n", 5,
     "grid.prune.ratio", ["duplicate setting 'prune.ratio' (first given on line 3)"]),
    ("dup-launcher", "name: t\nlauncher:\n  executor: local\n  executor: slurm\n", 4, "launcher.executor",
     ["duplicate key (first given on line 3)"]),
    ("dup-slurm", "name: t\nlauncher:\n  slurm:\n    nodes: 1\n    nodes: 2\n", 5, "launcher.slurm.nodes",
     ["duplicate key (first given on line 4)"]),
    ("dup-include-rule", "name: t\ngrid:\n  seed: [0]\ninclude:\n  - quant: static\n    quant: none\n", 6,
     "include[0].quant", ["duplicate key (first given on line 5)"]),
    ("dup-flow-mapping", "name: t\nfixed: {seed: 0, seed: 1}\n", 2, "fixed.seed", ["duplicate key"]),
    # -- unknown keys, at every level, with a near-miss suggestion
    ("unknown-top", "name: t\ngird:\n  seed: [0]\n", 2, "gird",
     ["unknown key 'gird'", "allowed: description, exclude, fixed, grid,", "(did you mean 'grid'?)"]),
    ("unknown-grid", "name: t\ngrid:\n  prune.ration: [0.5]\n", 3, "grid.prune.ration",
     ["unknown setting 'prune.ration'", SETTING_NAMES, "(did you mean 'prune.ratio'?)"]),
    ("unknown-grid-nested", "name: t\ngrid:\n  prune:\n    methd: [l1_global]\n", 4, "grid.prune.methd",
     ["unknown setting 'prune.methd'", "(did you mean 'prune.method'?)"]),
    ("unknown-fixed", "name: t\nfixed:\n  modle: lenet5\n", 3, "fixed.modle",
     ["unknown setting 'modle'", SETTING_NAMES, "(did you mean 'model'?)"]),
    ("unknown-fixed-nested", "name: t\nfixed:\n  seed: 0\n  train:\n    epocs: 3\n", 5, "fixed.train.epocs",
     ["unknown setting 'train.epocs'", "train.amp, train.batch_size, train.channels_last, train.compile, train.epochs", "(did you mean 'train.epochs'?)"]),
    ("unknown-fixed-flow", "name: t\nfixed: {train: {epocs: 3}}\n", 2, "fixed.train.epocs",
     ["(did you mean 'train.epochs'?)"]),
    ("unknown-include", "name: t\ngrid:\n  seed: [0]\ninclude:\n  - quantt: static\n", 5, "include[0].quantt",
     ["unknown setting 'quantt'", "(did you mean 'quant'?)"]),
    ("unknown-exclude", "name: t\ngrid:\n  seed: [0, 1]\nexclude:\n  - seed: 0\n  - sed: 1\n", 6, "exclude[1].sed",
     ["unknown setting 'sed'", "(did you mean 'seed'?)"]),
    ("unknown-launcher", "name: t\nlauncher:\n  executor: local\n  max_paralel: 2\n", 4, "launcher.max_paralel",
     ["unknown launcher option 'max_paralel'", "allowed: checkpoint_every_s, executor, folder, job_name, max_parallel, max_requeues, share_stages, slurm, "
      "timeout_min, trials_at_once, trials_per_job",
      "(did you mean 'max_parallel'?)"]),
    ("unknown-slurm", "name: t\nlauncher:\n  executor: slurm\n  slurm:\n    partion: gpu\n", 5,
     "launcher.slurm.partion", ["unknown slurm option 'partion'", "account, additional_parameters",
                                "(did you mean 'partition'?)"]),
    # -- wrong types
    ("type-epochs-text", "name: t\nfixed:\n  train.epochs: three\n", 3, "fixed.train.epochs",
     ["expected an integer, got 'three'"]),
    ("type-ratio-text", "name: t\ngrid:\n  prune.ratio: [0.5, high]\n", 3, "grid.prune.ratio[1]",
     ["expected a number, got 'high'"]),
    ("type-ratio-block-list", "name: t\ngrid:\n  prune.ratio:\n    - 0.5\n    - high\n", 5, "grid.prune.ratio[1]",
     ["expected a number, got 'high'"]),
    ("type-bool-for-int", "name: t\nfixed:\n  seed: true\n", 3, "fixed.seed", ["expected an integer, got True"]),
    ("type-float-for-int", "name: t\nfixed:\n  train:\n    epochs: 2.5\n", 4, "fixed.train.epochs",
     ["expected an integer, got 2.5"]),
    ("type-bool-for-float", "name: t\nfixed:\n  prune.ratio: false\n", 3, "fixed.prune.ratio",
     ["expected a number, got False"]),
    ("type-int-for-bool", "name: t\nfixed:\n  dataset.download: 1\n", 3, "fixed.dataset.download",
     ["expected true/false, got 1"]),
    ("type-int-for-text", "name: t\nfixed:\n  device: 0\n", 3, "fixed.device", ["expected text, got 0"]),
    ("type-mapping-for-setting", "name: t\nfixed:\n  model: {name: lenet5}\n", 3, "fixed.model",
     ["expected text", "its options are separate keys: model.channels, model.finetune"]),
    ("type-axis-scalar", "name: t\ngrid:\n  quant: static\n", 3, "grid.quant",
     ["an axis needs a list of values, got 'static'"]),
    ("type-axis-null", "name: t\ngrid:\n  quant:\n", 3, "grid.quant", ["an axis needs a list of values, got None"]),
    ("type-grid-list", "name: t\ngrid:\n  - seed: [0]\n", 2, "grid", ["expected a mapping, got list"]),
    ("type-fixed-list", "name: t\nfixed:\n  - seed: 0\n  - quant: none\n", 2, "fixed",
     ["expected a mapping, got list"]),
    ("type-fixed-value-list", "name: t\nfixed:\n  seed: [0, 1]\n", 3, "fixed.seed",
     ["fixed settings take one value, got a list", "move 'seed' to grid"]),
    ("type-section-scalar", "name: t\nfixed:\n  train: 3\n", 3, "fixed.train",
     ["expected a mapping of train settings, got 3", "allowed names: amp, batch_size, channels_last, compile, epochs, lr"]),
    ("type-include-not-list", "name: t\ninclude:\n  seed: 1\n", 2, "include", ["expected a list of rules"]),
    ("type-rule-not-mapping", "name: t\nexclude:\n  - seed\n", 3, "exclude[0]", ["expected a mapping, got str"]),
    ("type-name", "name: 3\n", 1, "name", ["expected text (the MLflow experiment), got 3"]),
    ("type-description", "name: t\ndescription: [a]\n", 2, "description", ["expected text, got ['a']"]),
    ("type-key-not-text", "name: t\nfixed:\n  1: 2\n", 3, "fixed", ["keys must be text, got 1"]),
    ("type-launcher-list", "name: t\nlauncher: [local]\n", 2, "launcher", ["expected a mapping, got list"]),
    ("type-max-parallel-bool", "name: t\nlauncher:\n  max_parallel: yes\n", 3, "launcher.max_parallel",
     ["expected an integer, got True"]),
    ("type-slurm-list", "name: t\nlauncher:\n  slurm: [gpu]\n", 3, "launcher.slurm", ["expected a mapping"]),
    ("type-slurm-setup", "name: t\nlauncher:\n  slurm:\n    setup: [1]\n", 4, "launcher.slurm.setup",
     ["expected a list of shell lines (text)"]),
    # -- missing or empty
    ("missing-name", "grid:\n  seed: [0]\n", 1, "name", ["required: a non-empty name"]),
    ("empty-axis", "name: t\ngrid:\n  seed: [0]\n  quant: []\n", 4, "grid.quant",
     ["empty list of values; give at least one"]),
    ("empty-include-values", "name: t\ngrid:\n  seed: [0]\ninclude:\n  - prune.ratio: []\n", 5,
     "include[0].prune.ratio", ["empty list of values"]),
    ("empty-rule", "name: t\ninclude:\n  - {}\n", 3, "include[0]", ["empty rule; give at least one setting"]),
    # -- registry names
    ("unknown-dataset", "name: t\nfixed:\n  dataset: mnsit\n", 3, "fixed.dataset",
     ["unknown value 'mnsit'", "allowed: cifar10, cifar100, digits, fashion_mnist, imagefolder, mnist, synthetic", "(did you mean 'mnist'?)"]),
    ("unknown-model", "name: t\ngrid:\n  model: [lenet5, lenet_300]\n", 3, "grid.model[1]",
     ["unknown value 'lenet_300'", "allowed: alexnet, conv2, conv4, conv6, lenet5, lenet_300_100, resnet18", "(did you mean 'lenet_300_100'?)"]),
    ("unknown-prune-method", "name: t\ngrid:\n  prune.method: [l1_globl]\n", 3, "grid.prune.method[0]",
     ["unknown value 'l1_globl'", "allowed: l1_global, l1_local, ln_structured, random_global, random_local",
      "(did you mean 'l1_global'?)"]),
    ("unknown-rewind", "name: t\nfixed:\n  prune:\n    rewind: initial\n", 4, "fixed.prune.rewind",
     ["'initial' is not allowed", "must be init, none, reinit, epoch:N or step:N"]),
    ("unknown-quant", "name: t\ngrid:\n  quant: [none, statc]\n", 3, "grid.quant[1]",
     ["unknown value 'statc'", "allowed: dynamic, dynamic_fp16, none, qat, static, w1, w10", "(did you mean 'static'?)"]),
    ("unknown-optimizer", "name: t\nfixed:\n  train.optimizer: adamw\n", 3, "fixed.train.optimizer",
     ["unknown value 'adamw'", "allowed: adam, sgd"]),
    ("unknown-executor", "name: t\nlauncher:\n  executor: slrum\n", 3, "launcher.executor",
     ["unknown value 'slrum'", "allowed: debug, local, slurm", "(did you mean 'slurm'?)"]),
    # -- ranges
    ("ratio-one", "name: t\ngrid:\n  prune.ratio: [0, 0.5, 1.0]\n", 3, "grid.prune.ratio[2]",
     ["1.0 is not allowed; must be in [0, 1)"]),
    ("ratio-negative", "name: t\nfixed:\n  prune.ratio: -0.1\n", 3, "fixed.prune.ratio",
     ["-0.1 is not allowed; must be in [0, 1)"]),
    ("iterations-zero", "name: t\ngrid:\n  prune.iterations: [1, 0]\n", 3, "grid.prune.iterations[1]",
     ["0 is not allowed; must be >= 1"]),
    ("epochs-zero", "name: t\nfixed:\n  train:\n    epochs: 0\n", 4, "fixed.train.epochs",
     ["0 is not allowed; must be >= 1"]),
    ("lr-zero", "name: t\nfixed:\n  train.lr: 0\n", 3, "fixed.train.lr", ["0.0 is not allowed; must be > 0"]),
    ("device", "name: t\nfixed:\n  device: gpu\n", 3, "fixed.device", ["must be auto, cpu, cuda or cuda:N"]),
    ("max-parallel-zero", "name: t\nlauncher:\n  max_parallel: 0\n", 3, "launcher.max_parallel",
     ["0 is not allowed; must be >= 1"]),
    ("slurm-mem", "name: t\nlauncher:\n  slurm:\n    mem_gb: 0\n", 4, "launcher.slurm.mem_gb",
     ["0 is not allowed; must be > 0"]),
    # -- a setting in two places
    ("axis-and-fixed", "name: t\ngrid:\n  seed: [0, 1]\nfixed:\n  seed: 2\n", 5, "fixed.seed",
     ["'seed' is both an axis (grid, line 3) and fixed"]),
    ("axis-and-fixed-nested", "name: t\ngrid:\n  train.epochs: [1, 2]\nfixed:\n  train:\n    epochs: 2\n", 6,
     "fixed.train.epochs", ["'train.epochs' is both an axis (grid, line 3) and fixed"]),
]


@pytest.mark.parametrize("text, line, key, fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_sweep_file(tmp_path, text, line, key, fragments):
    path = write(tmp_path, text)
    message = error_line(validate_cli(path))
    prefix = f"error: {path}:{line}: " + (f"{key}: " if key else "")
    assert message.startswith(prefix), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_case_ids_are_unique():
    assert len({c[0] for c in CASES}) == len(CASES)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    message = error_line(validate_cli(path))
    assert message == f"error: {path}: cannot read the sweep file: No such file or directory"


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"name: t\ndescription: caf\xe9\n")
    message = error_line(validate_cli(path))
    assert message.startswith(f"error: {path}:2: not UTF-8 text (byte 0xe9")


# (id, --set values, key, fragments); applied to the valid quickstart file
SET_CASES = [
    ("unknown-key", ["prune.ration=0.5"], "prune.ration",
     ["unknown setting 'prune.ration'", SETTING_NAMES, "(did you mean 'prune.ratio'?)"]),
    ("group-key", ["train={epochs: 3}"], "train", ["'train' is a group of settings", "train.<name>", "epochs"]),
    ("bad-type", ["prune.ratio=high"], "prune.ratio", ["expected a number, got 'high'"]),
    ("bad-range", ["prune.ratio=[0.5, 1.0]"], "prune.ratio", ["1.0 is not allowed; must be in [0, 1)"]),
    ("bad-name", ["dataset=mnsit"], "dataset", ["unknown value 'mnsit'", "(did you mean 'mnist'?)"]),
    ("bool-for-int", ["seed=true"], "seed", ["expected an integer, got True"]),
    ("empty-list", ["quant=[]"], "quant", ["empty list of values"]),
    ("no-equals", ["seed"], "seed", ["expected key=value"]),
    ("bad-yaml", ["seed=[1"], "seed", ["value is not valid YAML", "expected ',' or ']'"]),
    ("second-override", ["seed=1", "train.epochs=0"], "train.epochs", ["0 is not allowed; must be >= 1"]),
]


@pytest.mark.parametrize("values, key, fragments", [c[1:] for c in SET_CASES], ids=[c[0] for c in SET_CASES])
def test_invalid_set_override(values, key, fragments):
    args = [a for v in values for a in ("--set", v)]
    message = error_line(validate_cli(QUICKSTART, *args))
    assert message.startswith(f"error: --set: {key}: "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_bad_file_fails_before_anything_runs_or_is_logged(tmp_path):
    """`run` on a bad file exits 2 without creating a store, a job folder or anything else."""
    bad = write(tmp_path, "name: t\ngrid:\n  prune.ratio: [1.0]\nlauncher:\n  folder: jobs\n")
    work = tmp_path / "work"
    work.mkdir()
    runner = CliRunner()
    cwd = os.getcwd()
    os.chdir(work)
    try:
        result = runner.invoke(main, ["run", str(bad), "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}"])
    finally:
        os.chdir(cwd)
    assert error_line(result).startswith(f"error: {bad}:3: grid.prune.ratio[0]: ")
    assert list(work.iterdir()) == []


def test_cli_subprocess_has_no_traceback(tmp_path):
    path = write(tmp_path, "name: t\nfixed:\n  train:\n    epocs: 3\n")
    proc = subprocess.run([sys.executable, "-m", "runner.cli", "validate", str(path)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"error: {path}:4: fixed.train.epocs: ")
    assert "(did you mean 'train.epochs'?)" in proc.stderr


# -- valid files


def test_quickstart_validates():
    result = validate_cli(QUICKSTART)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{QUICKSTART}: ok (48 grid points, 39 unique trials)\n"
    assert result.stderr == ""


def test_nested_equals_dotted(tmp_path):
    nested = load_spec(write(tmp_path, "name: t\nfixed:\n  train:\n    epochs: 3\n    lr: 0.1\n  prune:\n"
                                       "    ratio: 0.5\n  model: lenet5\n", "nested.yaml"))
    dotted = load_spec(write(tmp_path, "name: t\nfixed:\n  train.epochs: 3\n  train.lr: 0.1\n"
                                       "  prune.ratio: 0.5\n  model: lenet5\n", "dotted.yaml"))
    assert nested.fixed == dotted.fixed == {"train.epochs": 3, "train.lr": 0.1, "prune.ratio": 0.5,
                                            "model": "lenet5"}


def test_nested_axes_equal_dotted(tmp_path):
    nested = load_spec(write(tmp_path, "name: t\ngrid:\n  prune:\n    ratio: [0, 0.5]\n", "nested.yaml"))
    dotted = load_spec(write(tmp_path, "name: t\ngrid:\n  prune.ratio: [0, 0.5]\n", "dotted.yaml"))
    assert nested.axes == dotted.axes == {"prune.ratio": [0.0, 0.5]}


def test_int_for_float_becomes_float(tmp_path):
    spec = load_spec(write(tmp_path, "name: t\ngrid:\n  prune.ratio: [0, 0.5]\nfixed:\n  train.lr: 1\n"))
    assert spec.axes["prune.ratio"] == [0.0, 0.5]
    assert all(type(v) is float for v in spec.axes["prune.ratio"])
    assert spec.fixed["train.lr"] == 1.0 and type(spec.fixed["train.lr"]) is float


def test_exponent_without_dot_is_a_number(tmp_path):
    """PyYAML alone reads 1e-3 as text; sweep files (and --set) read it as a number."""
    spec = load_spec(write(tmp_path, "name: t\nfixed:\n  train.lr: 1e-3\n  train.weight_decay: 5E-4\n"),
                     ["train.momentum=1e-1"])
    assert spec.fixed == {"train.lr": 0.001, "train.weight_decay": 0.0005, "train.momentum": 0.1}


def test_yaml_merge_keys(tmp_path):
    text = ("name: t\ngrid:\n  seed: [0]\ninclude:\n  - &big {model: resnet18, dataset: cifar10}\n"
            "  - <<: *big\n    dataset: mnist\n")
    spec = load_spec(write(tmp_path, text))
    assert spec.include == [{"model": ["resnet18"], "dataset": ["cifar10"]},
                            {"dataset": ["mnist"], "model": ["resnet18"]}]


def test_set_dataset_on_quickstart():
    result = validate_cli(QUICKSTART, "--set", "dataset=synthetic")
    assert result.exit_code == 0, result.output
    assert "ok (48 grid points, 39 unique trials)" in result.stdout
    assert load_spec(QUICKSTART, ["dataset=synthetic"]).fixed["dataset"] == "synthetic"


def test_set_list_replaces_axis():
    spec = load_spec(QUICKSTART, ["prune.ratio=[0.5]"])
    assert spec.axes["prune.ratio"] == [0.5]
    result = validate_cli(QUICKSTART, "--set", "prune.ratio=[0.5]")
    assert result.exit_code == 0, result.output
    assert "ok (12 grid points, 12 unique trials)" in result.stdout  # 2 methods x 2 schedules x 3 quant modes


def test_set_list_turns_fixed_into_axis():
    spec = load_spec(QUICKSTART, ["seed=[0, 1]"])
    assert spec.axes["seed"] == [0, 1] and "seed" not in spec.fixed


def test_spec_error_is_always_one_line():
    err = SpecError("f.yaml", 3, "grid.seed", "first\n  second\nthird")
    assert str(err) == "f.yaml:3: grid.seed: first second third"
