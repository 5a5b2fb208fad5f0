"""One trial: train dense, prune level by level with rewinding and retraining, quantize, measure.

``run_trial`` is what every executor runs (in process, as a local process or a SLURM task).
It never raises for a failing trial: the failure is recorded in MLflow and returned, so that
the launcher and the other trials go on.
"""
from __future__ import annotations

import copy
import os
import random
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from jobs.config import TrialConfig, from_flat
from jobs.data import DataBundle, load_dataset
from jobs.measure import dense_flops, evaluate, latency_ms_per_sample, serialized_size, sparsity
from jobs.models import build_model
from jobs.pruning import REWINDS, level_amount, prune_level
from jobs.quantization import quantize
from jobs.tracking import TrackingTarget, TrialRun
from jobs.train import make_loader, resolve_device, train

EVAL_BATCH = 256


@dataclass(frozen=True)
class TrialJob:
    """What a worker needs to run one trial; small and picklable."""

    trial_id: str
    name: str
    settings: dict[str, Any]
    target: TrackingTarget
    tags: dict[str, str] = field(default_factory=dict)
    threads: int | None = None


def seed_everything(seed: int) -> None:
    """Seed every RNG a trial touches (torch, numpy, random)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pruning_levels(cfg: TrialConfig, data: DataBundle, device: torch.device
                   ) -> Iterator[tuple[int, nn.Module, float]]:
    """Train dense (level 0), then prune, rewind and retrain per level; yield (level, model, seconds)."""
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    init_state = copy.deepcopy(model.state_dict())

    def fresh_state(level: int) -> dict:
        # A new draw per level, reproducible from the trial seed.
        torch.manual_seed(cfg.seed * 1000 + level)
        return build_model(cfg.model, data.input_shape, data.num_classes).state_dict()

    levels = cfg.prune.iterations if cfg.prune.ratio > 0 else 0
    amount = level_amount(cfg.prune.ratio, levels) if levels else 0.0
    loader = make_loader(data.train, cfg.train.batch_size, shuffle=True, seed=cfg.seed)
    model.to(device)
    for level in range(levels + 1):
        if level > 0:
            prune_level(model, cfg.prune.method, amount)
            REWINDS[cfg.prune.rewind](model, init_state, lambda: fresh_state(level))
        # Each level sees its own data order, fixed by the seed.
        loader.generator.manual_seed(cfg.seed * 1000 + level)
        yield level, model, train(model, loader, cfg.train, device)


def execute(cfg: TrialConfig, on_row: Callable[[dict], None] = lambda row: None) -> list[dict]:
    """Run the trial's levels and quant stage; call ``on_row`` with each results row as it lands."""
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    data = load_dataset(cfg.dataset)
    test_loader = make_loader(data.test, EVAL_BATCH, shuffle=False)
    flops = None
    last = cfg.prune.iterations if cfg.prune.ratio > 0 else 0
    rows: list[dict] = []
    for level, model, seconds in pruning_levels(cfg, data, device):
        flops = flops or dense_flops(model, data.input_shape)
        row = {"level": level, "stage": "float", **evaluate(model, test_loader, device),
               **sparsity(model), "flops": flops, "train_time_s": seconds, "size_bytes": serialized_size(model)}
        if level == last:
            model.to("cpu")
            row["latency_ms"] = latency_ms_per_sample(model, data.input_shape)
        rows.append(row)
        on_row(row)

    if cfg.quant.mode != "none":
        calibration = make_loader(data.train, cfg.train.batch_size, shuffle=True, seed=cfg.seed)
        qmodel = quantize(model, cfg.quant, calibration)
        cpu = torch.device("cpu")
        row = {"level": last, "stage": cfg.quant.mode, **evaluate(qmodel, test_loader, cpu),
               "flops": flops, "size_bytes": serialized_size(qmodel),
               "latency_ms": latency_ms_per_sample(qmodel, data.input_shape)}
        rows.append(row)
        on_row(row)
    return rows


def run_trial(job: TrialJob) -> dict[str, Any]:
    """Run one trial and record it in MLflow; return its status (never raises for trial errors)."""
    if job.threads:
        torch.set_num_threads(job.threads)
    tags = {**job.tags, "device_used": str(resolve_device(job.settings.get("device", "auto")))}
    if os.environ.get("SLURM_JOB_ID"):
        tags["slurm_job_id"] = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ["SLURM_JOB_ID"])
    run = TrialRun(job.target, job.trial_id, job.name, job.settings, tags)
    rows: list[dict] = []

    def on_row(row: dict) -> None:
        rows.append(row)
        run.log_row(row, prefix="" if row["stage"] == "float" else "quant.")

    try:
        execute(from_flat(job.settings), on_row)
    except Exception:
        text = traceback.format_exc()
        run.fail(rows, job.settings, text)
        return {"trial_id": job.trial_id, "run_id": run.run_id, "status": "FAILED",
                "error": text.strip().splitlines()[-1]}
    run.finish(rows, job.settings)
    return {"trial_id": job.trial_id, "run_id": run.run_id, "status": "FINISHED", "error": None}
