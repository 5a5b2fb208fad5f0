"""Sweep-file validation: every mistake is one line naming file, line, key and what is allowed; exit 2."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.cli import main
from runner.errors import SpecError
from runner.grid import expand
from runner.spec import load_spec, sweep_folder, validate

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


def laughs(levels: int = 9, where: str = "include") -> str:
    """A 'billion laughs' alias chain: each level lists the previous one 9 times (under 1 KB)."""
    text = f"name: t\n{where}:\n  - &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    return text + "".join(f"  - &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, levels))


def alias_chain(links: int = 60) -> str:
    """Anchors that each wrap the previous one: shallow as written, 60 levels deep once expanded."""
    return "name: t\ninclude:\n  - &a0 [0]\n" + "".join(f"  - &a{i} [*a{i - 1}]\n" for i in range(1, links))


def axes(n: int) -> str:
    """A grid of n axes with 10 valid values each (10^n points)."""
    keys = ["seed", "train.epochs", "train.batch_size", "dataset.train_size", "quant.calibration_batches",
            "quant.qat_epochs", "prune.retrain_epochs", "prune.iterations"]
    return "name: t\ngrid:\n" + "".join(f"  {k}: [{', '.join(map(str, range(1, 11)))}]\n" for k in keys[:n])


def slurm(key: str, value: str) -> str:
    """A sweep with one launcher.slurm option (value written as YAML)."""
    return f"name: t\nlauncher:\n  slurm:\n    {key}: {value}\n"


CONTROL = "control characters and line breaks are not allowed"


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
     ["unknown launcher option 'max_paralel'", "allowed: checkpoint_every_s, executor, folder, job_name, max_parallel, max_requeues, max_trials, share_stages, slurm, "
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
    # -- bounded YAML: alias expansion, nesting, values Python cannot hold
    ("yaml-billion-laughs", laughs(), 11, "include[8][0]",
     ["aliases expand the file to 490,329,059 values", "(alias *a7 here)", "at most 100,000"]),
    ("yaml-billion-laughs-used-by-an-axis", laughs(9, "fixed") + "grid:\n  seed: *a8\n", 11, "fixed[8][0]",
     ["aliases expand the file to 926,177,112 values", "(alias *a7 here)"]),
    ("yaml-laughs-under-unknown-key", laughs().replace("include:", "lol:"), 2, "lol",
     ["unknown key 'lol'", "allowed: description, exclude"]),
    ("yaml-laughs-under-unknown-launcher-option", "name: t\nlauncher:\n  lol: &a [1, 2]\n  lol2: [*a, *a]\n", 3,
     "launcher.lol", ["unknown launcher option 'lol'"]),
    ("yaml-deep-nesting", "name: t\ngrid:\n  seed: " + "[" * 20000 + "]" * 20000 + "\n", 3, None,
     ["nested more than 32 levels deep"]),
    ("yaml-deep-block-nesting", "name: t\nfixed:\n" + "".join("  " * i + f"  k{i}:\n" for i in range(40)), 33, None,
     ["nested more than 32 levels deep"]),
    ("yaml-alias-chain-depth", alias_chain(), 62, "include[59][0]",
     ["aliases nest values 63 levels deep", "(alias *a58 here)", "at most 32"]),
    ("yaml-huge-integer", "name: t\nfixed:\n  seed: " + "1" * 5000 + "\n", 3, "fixed.seed",
     ["not a valid value", "4300 digits"]),
    ("yaml-impossible-date", "name: t\ndescription: 2026-13-45\n", 2, "description",
     ["not a valid value: month must be in 1..12"]),
    ("yaml-list-as-key", "name: t\n? [a]\n: 1\n", 2, None, ["keys must be text, got a list or mapping"]),
    ("yaml-undefined-alias", "name: t\ngrid:\n  seed: *nope\n", 3, None, ["not valid YAML", "undefined alias"]),
    # -- grid size, computed from the axis lengths before any point is built
    ("grid-6-axes", axes(6), 2, "grid",
     ["the grid has 1,000,000 points (seed 10 x train.epochs 10 x", "at most 10,000 (launcher.max_trials)"]),
    ("grid-8-axes", axes(8), 2, "grid", ["the grid has 100,000,000 points", "prune.iterations 10)"]),
    ("grid-include-counts", axes(4) + "include:\n  - seed: [0]\n", 2, "grid",
     ["the grid has 11,000 points", "+ 1 include rule(s)"]),
    ("grid-over-own-limit", "name: t\ngrid:\n  seed: [0, 1, 2]\nlauncher:\n  max_trials: 2\n", 2, "grid",
     ["the grid has 3 points", "at most 2 (launcher.max_trials)"]),
    ("max-trials-zero", "name: t\nlauncher:\n  max_trials: 0\n", 3, "launcher.max_trials",
     ["0 is not allowed; must be in 1..1000000"]),
    ("max-trials-beyond-ceiling", "name: t\nlauncher:\n  max_trials: 1000001\n", 3, "launcher.max_trials",
     ["must be in 1..1000000"]),
    ("grid-empty-list", "name: t\ngrid: []\n", 2, "grid", ["expected a mapping, got list []"]),
    ("grid-empty-mapping", "name: t\ngrid: {}\n", 2, "grid", ["empty grid", "leave grid out for a single trial"]),
    ("grid-null", "name: t\ngrid:\n", 2, "grid", ["empty grid; give at least one axis"]),
    ("exclude-everything", "name: t\ngrid:\n  seed: [0, 1]\nexclude:\n  - seed: 0\n  - seed: 1\n", 4, "exclude",
     ["these rules drop all 2 grid points; nothing would run"]),
    # -- bounds: iterations, seeds, finite floats, 32-bit integers, layer rates, devices
    ("iterations-beyond-100", "name: t\ngrid:\n  prune.iterations: [1, 101]\n", 3, "grid.prune.iterations[1]",
     ["101 is not allowed; must be in 1..100"]),
    ("iterations-million", "name: t\nfixed:\n  prune.iterations: 1000000\n", 3, "fixed.prune.iterations",
     ["must be in 1..100"]),
    ("seed-beyond-32-bit", "name: t\nfixed:\n  seed: 4294967296\n", 3, "fixed.seed",
     ["4294967296 is not allowed; must be in 0..4294967295"]),
    ("seed-negative", "name: t\ngrid:\n  seed: [0, -1]\n", 3, "grid.seed[1]", ["-1 is not allowed; must be >= 0"]),
    ("lr-inf", "name: t\nfixed:\n  train.lr: .inf\n", 3, "fixed.train.lr", ["inf is not allowed; must be a finite number"]),
    ("lr-nan", "name: t\ngrid:\n  train.lr: [0.1, .nan]\n", 3, "grid.train.lr[1]",
     ["nan is not allowed; must be a finite number"]),
    ("lr-overflowing-exponent", "name: t\nfixed:\n  train.lr: 1e999\n", 3, "fixed.train.lr",
     ["inf is not allowed; must be a finite number"]),
    ("lr-integer-beyond-float", "name: t\nfixed:\n  train.lr: " + "9" * 400 + "\n", 3, "fixed.train.lr",
     ["is not allowed; must be a finite number"]),
    ("ratio-nan", "name: t\nfixed:\n  prune.ratio: .nan\n", 3, "fixed.prune.ratio", ["must be a finite number"]),
    ("momentum-inf", "name: t\nfixed:\n  train:\n    momentum: .inf\n", 4, "fixed.train.momentum",
     ["must be a finite number"]),
    ("norm-negative-inf", "name: t\nfixed:\n  prune.norm: -.inf\n", 3, "fixed.prune.norm", ["-inf is not allowed"]),
    ("epochs-beyond-32-bit", "name: t\nfixed:\n  train.epochs: 4294967296\n", 3, "fixed.train.epochs",
     ["4294967296 is not allowed; must be at most 2147483647"]),
    ("checkpoint-every-inf", "name: t\nlauncher:\n  checkpoint_every_s: .inf\n", 3, "launcher.checkpoint_every_s",
     ["inf is not allowed; must be a finite number"]),
    ("checkpoint-every-nan", "name: t\nlauncher:\n  checkpoint_every_s: .nan\n", 3, "launcher.checkpoint_every_s",
     ["nan is not allowed; must be a finite number"]),
    ("timeout-beyond-32-bit", "name: t\nlauncher:\n  timeout_min: 100000000000\n", 3, "launcher.timeout_min",
     ["must be at most 2147483647"]),
    ("slurm-mem-inf", slurm("mem_gb", ".inf"), 4, "launcher.slurm.mem_gb", ["must be a finite number"]),
    ("slurm-signal-delay-huge", slurm("signal_delay_s", "99999999999"), 4, "launcher.slurm.signal_delay_s",
     ["must be at most 2147483647"]),
    ("layer-rates-dot", "name: t\nfixed:\n  prune.layer_rates: 'output:.'\n", 3, "fixed.prune.layer_rates",
     ["'output:.' is not allowed", "factors finite and > 0"]),
    ("layer-rates-two-dots", "name: t\nfixed:\n  prune.layer_rates: 'fc:1.2.3'\n", 3, "fixed.prune.layer_rates",
     ["'fc:1.2.3' is not allowed"]),
    ("layer-rates-zero", "name: t\ngrid:\n  prune.layer_rates: ['output:0.5', 'output:0']\n", 3,
     "grid.prune.layer_rates[1]", ["'output:0' is not allowed"]),
    ("layer-rates-twice", "name: t\nfixed:\n  prune.layer_rates: 'fc:0.5, fc:0.7'\n", 3, "fixed.prune.layer_rates",
     ["each layer once"]),
    ("layer-rates-not-pairs", "name: t\nfixed:\n  prune.layer_rates: 'output'\n", 3, "fixed.prune.layer_rates",
     ["must be name:factor pairs"]),
    ("device-cuda-minus-one", "name: t\nfixed:\n  device: 'cuda:-1'\n", 3, "fixed.device",
     ["'cuda:-1' is not allowed; must be auto, cpu, cuda or cuda:N with N in 0..1023"]),
    ("device-cuda-huge", "name: t\nfixed:\n  device: 'cuda:99999'\n", 3, "fixed.device", ["N in 0..1023"]),
    ("device-cuda-text", "name: t\nfixed:\n  device: 'cuda:x'\n", 3, "fixed.device", ["'cuda:x' is not allowed"]),
    # -- text: control characters, surrogates, lengths
    ("name-nul", 'name: "a\\0b"\n', 1, "name", ["the name 'a\\x00b' contains a control character \\x00", CONTROL]),
    ("name-newline", 'name: "a\\nb"\n', 1, "name", ["control character \\n at position 1"]),
    ("name-escape", 'name: "run\\e[31m"\n', 1, "name", ["control character \\x1b at position 3"]),
    ("name-c1-control", 'name: "a\\x85b"\n', 1, "name", ["control character \\x85"]),
    ("name-lone-surrogate", 'name: "a\\ud800b"\n', 1, "name", ["lone surrogate \\ud800 at position 1"]),
    ("name-too-long", "name: " + "x" * 201 + "\n", 1, "name", ["is 201 characters long; at most 200"]),
    ("description-escape", 'name: t\ndescription: "ok\\nbut \\e[2J"\n', 2, "description",
     ["the description contains a control character \\x1b"]),
    ("setting-text-nul", 'name: t\nfixed:\n  dataset.root: "/data\\0/x"\n', 3, "fixed.dataset.root",
     ["'/data\\x00/x' contains a control character \\x00"]),
    ("setting-text-too-long", "name: t\nfixed:\n  model.weights: " + "w" * 4097 + "\n", 3, "fixed.model.weights",
     ["is 4097 characters long; at most 4096"]),
    ("unknown-key-escape-shown", 'name: t\n"gr\\eid": {}\n', 2, "gr\\x1bid",
     ["unknown key 'gr\\x1bid'", "(did you mean 'grid'?)"]),
    ("partition-newline", slurm("partition", '"gpu\\n#SBATCH --uid=0"'), 4, "launcher.slurm.partition",
     ["'gpu\\n#SBATCH --uid=0' contains a control character \\n at position 3", CONTROL]),
    ("account-carriage-return", slurm("account", '"lab\\r"'), 4, "launcher.slurm.account", ["\\r"]),
    ("qos-escape", slurm("qos", '"normal\\e"'), 4, "launcher.slurm.qos", ["\\x1b"]),
    ("constraint-nul", slurm("constraint", '"a100\\0"'), 4, "launcher.slurm.constraint", ["\\x00"]),
    ("slurm-exclude-newline", slurm("exclude", '"node1\\nnode2"'), 4, "launcher.slurm.exclude", ["\\n"]),
    ("partition-surrogate", slurm("partition", '"\\udc80"'), 4, "launcher.slurm.partition", ["lone surrogate"]),
    ("job-name-newline", 'name: t\nlauncher:\n  job_name: "a\\nb"\n', 3, "launcher.job_name", ["\\n", CONTROL]),
    ("folder-newline", 'name: t\nlauncher:\n  folder: "jobs\\n"\n', 3, "launcher.folder", ["\\n"]),
    ("folder-empty", "name: t\nlauncher:\n  folder: ''\n", 3, "launcher.folder",
     ["'' is empty; give a folder for the job logs or leave folder out"]),
    ("folder-blank", "name: t\nlauncher:\n  folder: '   '\n", 3, "launcher.folder", ["is empty"]),
    ("folder-root", "name: t\nlauncher:\n  folder: /\n", 3, "launcher.folder",
     ["'/' is the filesystem root; give a folder of its own"]),
    ("folder-root-spelled-otherwise", "name: t\nlauncher:\n  folder: /tmp/../.\n", 3, "launcher.folder",
     ["is the filesystem root"]),
    ("additional-parameter-key-newline", slurm("additional_parameters", '{"mail\\ntype": END}'), 4,
     "launcher.slurm.additional_parameters", ["option name 'mail\\ntype' is not an #SBATCH option name"]),
    ("additional-parameter-key-space", slurm("additional_parameters", "{'mail type': END}"), 4,
     "launcher.slurm.additional_parameters", ["option name 'mail type'"]),
    ("additional-parameter-value-newline", slurm("additional_parameters", '{mail-type: "END\\n#SBATCH -x"}'), 4,
     "launcher.slurm.additional_parameters", ["mail-type: 'END\\n#SBATCH -x' contains a control character \\n"]),
    ("additional-parameter-value-list", slurm("additional_parameters", "{mail-type: [END]}"), 4,
     "launcher.slurm.additional_parameters", ["mail-type: expected text, a number or true/false, got ['END']"]),
    ("additional-parameter-value-inf", slurm("additional_parameters", "{nice: .inf}"), 4,
     "launcher.slurm.additional_parameters", ["nice: inf is not allowed; must be a finite number"]),
    ("setup-newline-in-entry", slurm("setup", '["module load cuda", "true\\nrm -rf ~"]'), 4, "launcher.slurm.setup",
     ["line 2 'true\\nrm -rf ~' contains a control character \\n at position 4"]),
    ("tracking-ftp", "name: t\ntracking: ftp://host/store\n", 2, "tracking",
     ["unknown store 'ftp://host/store'", "allowed schemes: sqlite:///, file://, http://, https://, postgresql://, mysql://, mssql://, databricks"]),
    ("tracking-garbage", "name: t\ntracking: garbage\n", 2, "tracking", ["unknown store 'garbage'; allowed schemes"]),
    ("tracking-sqlite-in-memory", "name: t\ntracking: 'sqlite://'\n", 2, "tracking", ["allowed schemes"]),
    ("tracking-no-target", "name: t\ntracking: 'sqlite:///'\n", 2, "tracking",
     ["names no database, host or path after sqlite:///"]),
    ("tracking-newline", 'name: t\ntracking: "http://host\\n"\n', 2, "tracking", ["\\n", CONTROL]),
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
    ("billion-laughs", ["seed=[&a0 [1,1,1,1,1,1,1,1,1]" + "".join(
        f", &a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)) + "]"], "seed",
     ["the value holds 490,329,055 values once aliases are expanded; at most 100,000"]),
    ("deep-nesting", ["seed=" + "[" * 5000], "seed", ["nested more than 32 levels deep"]),
    ("huge-integer", ["seed=" + "9" * 5000], "seed", ["value is not valid YAML", "4300 digits"]),
    ("inf", ["train.lr=.inf"], "train.lr", ["inf is not allowed; must be a finite number"]),
    ("iterations", ["prune.iterations=[1, 1000]"], "prune.iterations", ["1000 is not allowed; must be in 1..100"]),
    ("control-in-key", ["se\x1bed=1"], "se\\x1bed", ["unknown setting 'se\\x1bed'"]),
    ("control-in-value", ['dataset.root="a\\0b"'], "dataset.root", ["contains a control character \\x00"]),
]


@pytest.mark.parametrize("values, key, fragments", [c[1:] for c in SET_CASES], ids=[c[0] for c in SET_CASES])
def test_invalid_set_override(values, key, fragments):
    args = [a for v in values for a in ("--set", v)]
    message = error_line(validate_cli(QUICKSTART, *args))
    assert message.startswith(f"error: --set: {key}: "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


# (id, --launcher values, key, fragments); applied to the valid quickstart file
LAUNCHER_CASES = [
    ("folder-root", ["folder=/"], "folder", ["'/' is the filesystem root"]),
    ("folder-empty", ["folder=''"], "folder", ["'' is empty"]),
    ("max-trials-zero", ["max_trials=0"], "max_trials", ["0 is not allowed; must be in 1..1000000"]),
    ("partition-newline", ['slurm.partition="gpu\\nx"'], "slurm.partition", ["contains a control character \\n"]),
    ("partition-real-newline", ["slurm.partition='gpu\n\n#SBATCH -x'"], "slurm.partition",
     ["contains a control character \\n"]),
    ("checkpoint-nan", ["checkpoint_every_s=.nan"], "checkpoint_every_s", ["nan is not allowed"]),
    ("setup-newline", ['slurm.setup=["a\\nb"]'], "slurm.setup", ["line 1 'a\\nb' contains"]),
    ("laughs", ["slurm.setup=[&a [x,x,x,x,x,x,x,x,x,x], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], "
                "&c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], "
                "&e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d], [*e,*e]]"], "slurm.setup", ["once aliases are expanded"]),
]


@pytest.mark.parametrize("values, key, fragments", [c[1:] for c in LAUNCHER_CASES],
                         ids=[c[0] for c in LAUNCHER_CASES])
def test_invalid_launcher_override(values, key, fragments):
    args = [a for v in values for a in ("--launcher", v)]
    message = error_line(CliRunner().invoke(main, ["run", "--dry-run", str(QUICKSTART), *args]))
    assert message.startswith(f"error: --launcher: {key}: "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_file_larger_than_the_limit(tmp_path):
    path = write(tmp_path, "name: t\ndescription: '" + "x" * (128 * 1024) + "'\n")
    assert error_line(validate_cli(path)) == (f"error: {path}: the file is larger than 128 KiB; a sweep file is "
                                              "a few KB (write long axes as fewer values)")


def test_endless_file_is_not_read_to_its_end():
    start = time.monotonic()
    assert "the file is larger than 128 KiB" in error_line(validate_cli("/dev/zero"))
    assert time.monotonic() - start < 5


def test_huge_grid_is_refused_without_building_it(tmp_path):
    """10^8 points are refused from the axis lengths: in well under a second and a few MB."""
    path = write(tmp_path, axes(8))
    tracemalloc.start()
    start = time.monotonic()
    try:
        with pytest.raises(SpecError, match="the grid has 100,000,000 points"):
            load_spec(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - start < 5 and peak < 20 * 2**20, (time.monotonic() - start, peak)


def test_max_trials_raises_the_limit(tmp_path):
    text = "name: t\ngrid:\n  seed: [0, 1, 2]\nlauncher:\n  max_trials: 2\n"
    assert "at most 2 (launcher.max_trials)" in error_line(validate_cli(write(tmp_path, text)))
    result = CliRunner().invoke(main, ["validate", str(write(tmp_path, text.replace("2\n", "3\n")))])
    assert result.exit_code == 0 and "ok (3 grid points, 3 unique trials)" in result.stdout, result.output
    spec = load_spec(write(tmp_path, text), launcher_overrides=["max_trials=3"])
    assert spec.launcher["max_trials"] == 3 and len(expand(spec)[1]) == 3


def test_grid_limit_counts_the_trials_isolate_makes():
    """prune.scope: isolate makes one trial per layer, past what the axis lengths could tell."""
    spec = validate({"name": "t", "grid": {"prune.scope": ["isolate"]}, "launcher": {"max_trials": 3},
                     "fixed": {"model": "lenet5", "prune.ratio": 0.5}}, "t.yaml", {("grid",): 2})
    with pytest.raises(SpecError, match=r"t.yaml:2: grid: the grid expands to more than 3 trials"):
        expand(spec)


@pytest.mark.parametrize("model", [{"model.weights": "/nonexistent/weights.pt"},
                                   {"model": "small_cnn", "model.channels": "99999999,99999999"}])
def test_isolate_lists_layers_without_weights_or_memory(tmp_path, model):
    """Layer names come from the structure alone: no weights file needed, no 10^8-channel tensors allocated."""
    fixed = "".join(f"  {k}: '{v}'\n" for k, v in model.items())
    path = write(tmp_path, f"name: t\nfixed:\n{fixed}  prune.ratio: 0.5\n  prune.scope: isolate\n")
    start = time.monotonic()
    result = validate_cli(path)
    assert result.exit_code == 0, result.output
    assert "ok (1 grid points, 3 unique trials)" in result.stdout and time.monotonic() - start < 5


def test_grid_limit_counts_set_overrides():
    with pytest.raises(SpecError, match="the grid has 48,000 points"):
        load_spec(QUICKSTART, ["seed=[" + ", ".join(map(str, range(1000))) + "]"])


@pytest.mark.parametrize("uri", ["sqlite:///mlflow.db", "sqlite:////abs/mlflow.db", "file:///tmp/mlruns",
                                 "http://host:5000", "https://host", "postgresql://u@h/db",
                                 "postgresql+psycopg2://u@h/db", "mysql+pymysql://u@h/db", "mssql+pyodbc://h/db",
                                 "databricks", "databricks://profile"])
def test_tracking_schemes_that_validate(tmp_path, uri):
    assert load_spec(write(tmp_path, f"name: t\ntracking: '{uri}'\n")).tracking == uri


# -- the sweep's folder


def folder_of(name: str, **launcher) -> Path:
    return sweep_folder(validate({"name": name, "launcher": launcher}, "t.yaml", {}))


def test_safe_names_keep_their_folder():
    assert sweep_folder(load_spec(QUICKSTART)) == Path(".submitit/quickstart")
    for name in ("lth-cifar10", "hpc_lottery.v2", "a", "A-1_b.c"):
        assert folder_of(name) == Path(".submitit") / name


def test_other_names_get_a_slug_and_a_hash():
    one, two = folder_of("实验一"), folder_of("实验二")
    assert one != two and one.parent == two.parent == Path(".submitit")
    assert re.fullmatch(r"sweep\+[0-9a-f]{10}", one.name), one
    assert folder_of("lth cifar10").name.startswith("lth-cifar10+")
    assert folder_of("lth cifar10") != folder_of("lth-cifar10") != folder_of("lth/cifar10")
    assert folder_of("实验一") == one  # stable


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "../../etc", "-", "/", "~"])
def test_folder_never_escapes_or_hides(name):
    folder = folder_of(name)
    assert folder.parent == Path(".submitit") and folder.name not in (".", "..")
    assert not folder.name.startswith(".") and "/" not in folder.name


def test_given_folder_is_used_as_is():
    assert folder_of("t", folder="/shared/jobs") == Path("/shared/jobs")


def test_cli_sweep_folder_delegates():
    from runner.cli import sweep_folder as cli_sweep_folder

    spec = validate({"name": "实验一"}, "t.yaml", {})
    assert cli_sweep_folder(spec) == sweep_folder(spec)


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
