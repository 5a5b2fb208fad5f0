"""Trial settings as frozen dataclasses: the schema of every sweep key and a trial's identity.

A setting's *flat key* is ``section.field`` (``prune.ratio``); a section's primary field is
written as the bare section name (``model`` is ``model.name``, ``quant`` is ``quant.mode``).
Field metadata carries what validation needs: ``choices`` (a callable returning the allowed
names, usually a registry), ``check`` (predicate, description) and ``doc``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable


def registry_names(module: str, name: str) -> Callable[[], list[str]]:
    """Return a callable listing a registry's keys, imported lazily to keep imports light."""

    def names() -> list[str]:
        import importlib

        return sorted(getattr(importlib.import_module(module), name))

    return names


def _setting(default: Any, doc: str, *, choices=None, check=None, hash_default: bool = True):
    """Declare one setting; ``hash_default=False`` is for settings added after ids were pinned."""
    meta = {"doc": doc, "choices": choices, "check": check, "hash_default": hash_default}
    return field(default=default, metadata=meta)


_positive = (lambda v: v >= 1, ">= 1")


def _int_list(text: str) -> bool:
    return bool(re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*", text)) and all(int(x) > 0 for x in text.split(","))


def _rate_list(text: str) -> bool:
    return text == "" or bool(re.fullmatch(r"\s*[\w.]+\s*:\s*[\d.]+\s*(,\s*[\w.]+\s*:\s*[\d.]+\s*)*", text))

_non_negative = (lambda v: v >= 0, ">= 0")


@dataclass(frozen=True)
class DatasetConfig:
    """Which data a trial trains on and where it lives."""

    PRIMARY = "name"
    name: str = _setting("digits", "dataset name", choices=registry_names("jobs.data", "DATASETS"))
    root: str = _setting("data", "data root holding torchvision-format datasets; for imagefolder, the "
                         "train/ + val/ tree itself")
    download: bool = _setting(False, "download missing torchvision datasets (needs internet)")
    train_size: int = _setting(0, "use only the first N training samples (0: all)", check=_non_negative)
    # Added after trial ids were pinned: hashed only when set to a non-default value.
    augment: bool = _setting(False, "standard training augmentation of the dataset (crops, flips)",
                             hash_default=False)
    normalize: bool = _setting(True, "standard per-channel normalisation of the dataset", hash_default=False)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and its options."""

    PRIMARY = "name"
    name: str = _setting("lenet_300_100", "model name", choices=registry_names("jobs.models", "MODELS"))
    small_stem: bool = _setting(True, "resnet18/34/50 and alexnet: small-image stem (3x3 stride-1 first conv, no max-pool)")
    weights: str = _setting("", "initial weights: a state dict or torchvision weights file ('' = random init)",
                            hash_default=False)
    finetune: str = _setting("full", "with weights: train all layers (full) or only the new output layer (head)",
                             choices=lambda: ["full", "head"], hash_default=False)
    channels: str = _setting("32,64", "small_cnn: output channels per conv layer, comma-separated",
                             check=(lambda v: _int_list(v), "comma-separated positive integers"),
                             hash_default=False)
    kernel_sizes: str = _setting("3,3", "small_cnn: kernel size per conv layer, comma-separated",
                                 check=(lambda v: _int_list(v), "comma-separated positive integers"),
                                 hash_default=False)


@dataclass(frozen=True)
class TrainConfig:
    """Training of the dense model and of every pruning level."""

    PRIMARY = None
    epochs: int = _setting(2, "epochs of training per level", check=_positive)
    batch_size: int = _setting(64, "mini-batch size", check=_positive)
    optimizer: str = _setting("sgd", "optimizer", choices=lambda: ["adam", "sgd"])
    lr: float = _setting(0.05, "learning rate", check=(lambda v: v > 0, "> 0"))
    momentum: float = _setting(0.9, "SGD momentum", check=_non_negative)
    weight_decay: float = _setting(0.0, "L2 weight decay", check=_non_negative)
    lr_schedule: str = _setting("constant", "learning-rate schedule, restarted on every level",
                                choices=lambda: ["constant", "cosine", "step"], hash_default=False)
    # Values avoid on/off: YAML 1.1 reads those as booleans.
    amp: str = _setting("auto", "mixed precision of float training: auto (bf16 on GPUs that support it, else "
                        "fp16; float32 on the CPU), bf16, fp16 (with loss scaling) or none (float32)",
                        choices=lambda: ["auto", "bf16", "fp16", "none"], hash_default=False)
    channels_last: str = _setting("auto", "channels-last memory format in training (auto: on the GPU for "
                                  "models with convolutions)", choices=lambda: ["always", "auto", "never"],
                                  hash_default=False)
    compile: bool = _setting(False, "torch.compile the model for training (compiling costs time per level)",
                             hash_default=False)


@dataclass(frozen=True)
class PruneConfig:
    """Iterative pruning: ``iterations`` levels that together remove ``ratio`` of the weights."""

    PRIMARY = None
    method: str = _setting("l1_global", "pruning method", choices=registry_names("jobs.pruning", "PRUNE_METHODS"))
    ratio: float = _setting(0.0, "fraction of prunable weights removed in the end",
                            check=(lambda v: 0 <= v < 1, "in [0, 1)"))
    iterations: int = _setting(1, "pruning levels to reach the ratio", check=_positive)
    rewind: str = _setting("init", "what surviving weights are reset to before retraining",
                           check=(lambda v: bool(re.fullmatch(r"init|none|reinit|(epoch|step):\d+", v)),
                                  "init, none, reinit, epoch:N or step:N"))
    retrain_epochs: int = _setting(-1, "epochs of retraining per pruning level (-1: train.epochs; 0: none, "
                                   "evaluate right after pruning)", check=(lambda v: v >= -1, ">= -1"),
                                   hash_default=False)
    scope: str = _setting("all", "which layers are pruned: all, first_conv, layers (prune.layers), "
                          "isolate (one trial per layer)", choices=lambda: ["all", "first_conv", "isolate", "layers"],
                          hash_default=False)
    layers: str = _setting("", "scope layers: comma-separated layer names", hash_default=False)
    ignore: str = _setting("", "comma-separated layer names never pruned", hash_default=False)
    layer_rates: str = _setting("", "per-layer rate multipliers, e.g. 'output:0.5' (output = last layer)",
                                check=(lambda v: _rate_list(v), "name:factor pairs, comma-separated"),
                                hash_default=False)
    norm: float = _setting(2.0, "ln_structured: the norm ranking channels (1, 2, ...)",
                           check=(lambda v: v > 0, "> 0"), hash_default=False)


@dataclass(frozen=True)
class QuantConfig:
    """Quantization of the final level's model."""

    PRIMARY = "mode"
    mode: str = _setting("none", "quantization mode", choices=registry_names("jobs.quantization", "QUANT_MODES"))
    backend: str = _setting("x86", "quantized engine", choices=lambda: ["fbgemm", "qnnpack", "x86"])
    calibration_batches: int = _setting(8, "training batches used to calibrate static quantization",
                                        check=_positive)
    qat_epochs: int = _setting(1, "qat: epochs of fake-quantized fine-tuning before conversion",
                               check=_positive, hash_default=False)


@dataclass(frozen=True)
class TrialConfig:
    """Every setting of one trial, resolved."""

    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    seed: int = _setting(0, "random seed (model init, data order)", check=_non_negative)
    device: str = _setting("auto", "device for float training and evaluation (int8 models always run on the CPU)",
                           check=(lambda v: v in ("auto", "cpu", "cuda") or v.startswith("cuda:"),
                                  "auto, cpu, cuda or cuda:N"))


@dataclass(frozen=True)
class SettingInfo:
    """One flat setting key and what is allowed for it."""

    key: str
    type: type
    default: Any
    doc: str
    choices: Callable[[], list[str]] | None
    check: tuple[Callable[[Any], bool], str] | None
    hash_default: bool


def _flat_key(section: str | None, name: str, primary: str | None) -> str:
    if section is None:
        return name
    return section if name == primary else f"{section}.{name}"


def _collect() -> dict[str, SettingInfo]:
    types = {"str": str, "int": int, "float": float, "bool": bool}
    out: dict[str, SettingInfo] = {}

    def add(cls, section: str | None) -> None:
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
                add(f.default_factory, f.name)
                continue
            key = _flat_key(section, f.name, getattr(cls, "PRIMARY", None))
            out[key] = SettingInfo(key, types[f.type], f.default, f.metadata["doc"], f.metadata["choices"],
                                   f.metadata["check"], f.metadata["hash_default"])

    add(TrialConfig, None)
    return out


SETTINGS: dict[str, SettingInfo] = _collect()


def to_flat(cfg: TrialConfig) -> dict[str, Any]:
    """Flatten a config into ``{flat_key: value}`` in schema order."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            for g in dataclasses.fields(value):
                out[_flat_key(f.name, g.name, getattr(value, "PRIMARY", None))] = getattr(value, g.name)
        else:
            out[f.name] = value
    return out


def from_flat(flat: dict[str, Any]) -> TrialConfig:
    """Build a config from flat keys; missing keys take their defaults."""
    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for f in dataclasses.fields(TrialConfig):
        if f.default_factory is not dataclasses.MISSING:
            cls = f.default_factory
            kwargs = {}
            for g in dataclasses.fields(cls):
                key = _flat_key(f.name, g.name, cls.PRIMARY)
                if key in flat:
                    kwargs[g.name] = flat[key]
            sections[f.name] = cls(**kwargs)
        elif f.name in flat:
            top[f.name] = flat[f.name]
    unknown = set(flat) - set(SETTINGS)
    if unknown:
        raise KeyError(f"unknown settings: {sorted(unknown)}")
    return TrialConfig(**sections, **top)


def identity(cfg: TrialConfig) -> dict[str, Any]:
    """The settings that name a trial: all of them, except later additions left at their default."""
    flat = to_flat(cfg)
    return {k: v for k, v in flat.items() if SETTINGS[k].hash_default or v != SETTINGS[k].default}


def trial_id(cfg: TrialConfig) -> str:
    """Short stable hash of the canonical resolved config."""
    blob = json.dumps(identity(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
