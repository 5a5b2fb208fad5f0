"""One trial: train dense, prune level by level with rewinding and retraining, quantize, measure.

``run_trial`` is what every executor runs (through ``jobs.task.TrialTask``).
It never raises for a failing trial: the failure is recorded in MLflow and returned, so that
the launcher and the other trials go on. With a checkpoint directory, the trial saves its
state after every epoch and level; a requeued or re-run trial resumes there, in the same
MLflow run, and its numbers equal those of an uninterrupted run.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import random
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import submitit
import torch
from torch.nn.utils import prune

from jobs.checkpoint import Checkpoint, rng_state, set_rng_state
from jobs.config import TrialConfig, from_flat
from jobs.data import load_dataset
from jobs.measure import (compression, dense_flops, evaluate, latency, latency_ms_per_sample, layer_stats,
                          peak_memory_bytes, quant_error, serialized_size, sparse_size, sparsity,
                          weight_histograms)
from jobs.models import build_model, prunable_parameters
from jobs.pruning import REWINDS, level_amount, parse_rewind, prune_level
from jobs.quantization import QuantData, layer_weights, quantize
from jobs.task import TrialJob
from jobs.tracking import TrialRun
from jobs.train import lr_at, make_loader, resolve_device, train

EVAL_BATCH = 256


def derive_seed(*parts: Any) -> int:
    """A seed that depends only on ``parts`` (trial seed, purpose, level, epoch)."""
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:8], 16)


def seed_everything(seed: int) -> None:
    """Seed every RNG a trial touches (torch, numpy, random)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _add_empty_masks(model: torch.nn.Module) -> None:
    """Give every prunable layer a mask so that a pruned state dict loads into a fresh model."""
    for module, name in prunable_parameters(model):
        prune.identity(module, name)


@dataclass
class TrialResult:
    """Everything a trial produced: per level/stage rows, per-epoch curves, per-layer tables."""

    rows: list[dict] = field(default_factory=list)
    curves: list[dict] = field(default_factory=list)
    tables: dict[str, Any] = field(default_factory=dict)


def float_row(model, level: int, input_shape, test_loader, device, flops: int, seconds: float) -> dict:
    """The measurements of one level's trained float model."""
    return {"level": level, "stage": "float", **evaluate(model, test_loader, device), **sparsity(model),
            **{k: v for k, v in compression(model, input_shape).items() if k != "flops"}, "flops": flops,
            "train_time_s": seconds, "size_bytes": serialized_size(model), "sparse_size_bytes": sparse_size(model),
            **peak_memory_bytes(device)}


def quant_row(model, qmodel, mode: str, level: int, input_shape, test_loader, flops: int) -> dict:
    """The measurements of the quantized final model, and its error against the float one."""
    weights = [w for _, w in layer_weights(qmodel)]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    return {"level": level, "stage": mode, **evaluate(qmodel, test_loader, torch.device("cpu")),
            "sparsity": zeros / total if total else float("nan"), "flops": flops,
            "size_bytes": serialized_size(qmodel), "latency_ms": latency_ms_per_sample(qmodel, input_shape),
            **latency(qmodel, input_shape), **quant_error(model, qmodel, test_loader), **peak_memory_bytes()}


def execute(cfg: TrialConfig, on_row: Callable[[dict], None] = lambda row: None,
            checkpoint: Checkpoint | None = None, on_curve: Callable[[list[dict]], None] = lambda c: None
            ) -> TrialResult:
    """Run (or resume) the trial's levels and quant stage; ``on_row`` gets each results row as it lands."""
    state = checkpoint.load() if checkpoint else None
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    data = load_dataset(cfg.dataset)
    test_loader = make_loader(data.test, EVAL_BATCH, shuffle=False)
    loader = make_loader(data.train, cfg.train.batch_size, shuffle=True, seed=cfg.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    init_state = copy.deepcopy(model.state_dict())
    flops = dense_flops(model, data.input_shape)
    levels = cfg.prune.iterations if cfg.prune.ratio > 0 else 0
    amount = level_amount(cfg.prune.ratio, levels) if levels else 0.0
    kind, at = parse_rewind(cfg.prune.rewind)
    late = levels > 0 and kind in ("epoch", "step") and at > 0
    rewind_state = None if late else init_state
    result = TrialResult()

    start_level, start_epoch, optimizer_state, elapsed = 0, 0, None, 0.0
    if state is not None:
        init_state, rewind_state = state["init_state"], state["rewind_state"]
        result.rows, result.curves, result.tables = state["rows"], state["curves"], state["tables"]
        start_level, start_epoch = state["level"], state["epoch"]
        optimizer_state, elapsed = state["optimizer"], state["seconds"]
        if state["masked"]:
            _add_empty_masks(model)
        model.load_state_dict(state["model"])
        set_rng_state(state["rng"])

    def save(level: int, epoch: int, optimizer=None, seconds: float = 0.0) -> None:
        if checkpoint is not None:
            checkpoint.save({"level": level, "epoch": epoch, "rows": result.rows, "curves": result.curves,
                             "tables": result.tables,
                             "model": model.state_dict(), "init_state": init_state, "rewind_state": rewind_state,
                             "masked": any(hasattr(m, "weight_mask") for m in model.modules()),
                             "optimizer": None if optimizer is None else optimizer.state_dict(),
                             "seconds": seconds, "rng": rng_state()})

    def fresh_state(level: int) -> dict:
        torch.manual_seed(derive_seed(cfg.seed, "reinit", level))
        random_init = dataclasses.replace(cfg.model, weights="")  # the control is random, never the file
        return build_model(random_init, data.input_shape, data.num_classes).state_dict()

    def capture(now: int, unit: str) -> None:
        nonlocal rewind_state
        if late and kind == unit and now == at:
            rewind_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})

    model.to(device)
    for level in range(start_level, levels + 1):
        resuming = level == start_level and start_epoch > 0
        if level > 0 and not resuming:
            if rewind_state is None:
                raise ValueError(f"prune.rewind {cfg.prune.rewind}: the dense training ({cfg.train.epochs} "
                                 f"epochs, {cfg.train.epochs * len(loader)} steps) never reached it")
            torch.manual_seed(derive_seed(cfg.seed, "prune", level))  # random pruning draws
            prune_level(model, cfg.prune, amount)
            REWINDS[kind](model, rewind_state, lambda: fresh_state(level))
        retrain = cfg.prune.retrain_epochs
        epochs = cfg.train.epochs if level == 0 or retrain < 0 else retrain

        def end_of_epoch(epoch, loss, optimizer, seconds, level=level, epochs=epochs):
            accuracy = evaluate(model, test_loader, device)["accuracy"]
            result.curves.append({"step": len(result.curves), "level": level, "epoch": epoch, "train_loss": loss,
                                  "test_accuracy": accuracy, "lr": lr_at(cfg.train, epoch, epochs)})
            if level == 0:
                capture(epoch + 1, "epoch")
            save(level, epoch + 1, optimizer, seconds)

        seconds = train(model, loader, cfg.train, device, epochs=epochs,
                        start_epoch=start_epoch if resuming else 0,
                        optimizer_state=optimizer_state if resuming else None,
                        epoch_seed=lambda epoch: derive_seed(cfg.seed, "data", level, epoch),
                        on_epoch=end_of_epoch,
                        on_step=(lambda step: capture(step, "step")) if level == 0 else None,
                        elapsed=elapsed if resuming else 0.0)
        on_curve([point for point in result.curves if point["level"] == level])
        row = float_row(model, level, data.input_shape, test_loader, device, flops, seconds)
        stats = layer_stats(model, data.input_shape).assign(level=level)
        result.tables["layers.csv"] = result.tables.get("layers.csv", []) + stats.to_dict("records")
        if level == levels:
            model.to("cpu")
            row.update(latency_ms=latency_ms_per_sample(model, data.input_shape), **latency(model, data.input_shape))
            result.tables["weight_histograms.csv"] = weight_histograms(model).assign(stage="float").to_dict("records")
        result.rows.append(row)
        on_row(row)
        save(level + 1, 0)

    if cfg.quant.mode != "none":
        calibration = make_loader(data.train, cfg.train.batch_size, shuffle=True, seed=cfg.seed)
        quant_data = QuantData(calibration=calibration, train_loader=loader, train_cfg=cfg.train, device=device,
                               epoch_seed=lambda epoch: derive_seed(cfg.seed, "qat", epoch))
        qmodel = quantize(model.to("cpu"), cfg.quant, quant_data)
        row = quant_row(model, qmodel, cfg.quant.mode, levels, data.input_shape, test_loader, flops)
        result.tables["weight_histograms.csv"] = (result.tables.get("weight_histograms.csv", []) +
                                                  weight_histograms(qmodel).assign(stage=cfg.quant.mode)
                                                  .to_dict("records"))
        result.rows.append(row)
        on_row(row)
    return result


def run_trial(job: TrialJob) -> dict[str, Any]:
    """Run one trial and record it in MLflow; return its status (never raises for trial errors)."""
    # Use the CPUs we were given, not every core of a shared node.
    threads = job.threads or int(os.environ.get("SLURM_CPUS_PER_TASK", "0"))
    if threads:
        torch.set_num_threads(threads)
    checkpoint = Checkpoint(job.checkpoint_dir) if job.checkpoint_dir else None
    previous = checkpoint.load() if checkpoint else None
    tags = {**job.tags, "device_used": str(resolve_device(job.settings.get("device", "auto")))}
    if os.environ.get("SLURM_JOB_ID"):
        tags["slurm_job_id"] = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ["SLURM_JOB_ID"])
        if os.environ.get("SLURM_ARRAY_TASK_ID"):
            tags["slurm_array_task_id"] = os.environ["SLURM_ARRAY_TASK_ID"]
    run = TrialRun(job.target, job.trial_id, job.name, job.settings, tags,
                   resume_run_id=checkpoint.run_id() if checkpoint else None)
    if checkpoint is not None:
        checkpoint.save_run_id(run.run_id)
    partial = TrialResult(rows=list(previous["rows"]) if previous else [])

    def on_row(row: dict) -> None:
        partial.rows.append(row)
        run.log_row(row, prefix="" if row["stage"] == "float" else "quant.")

    try:
        result = execute(from_flat(job.settings), on_row, checkpoint, on_curve=run.log_curve)
    except Exception as exc:
        text = traceback.format_exc()
        run.fail(partial.rows, job.settings, text)
        # Out of time for good: keep the state so that a later `sweep run` resumes it.
        if checkpoint is not None and not isinstance(exc, submitit.core.utils.UncompletedJobError):
            checkpoint.clear()
        return {"trial_id": job.trial_id, "run_id": run.run_id, "status": "FAILED",
                "error": text.strip().splitlines()[-1]}
    run.finish(result.rows, job.settings, {"curves.csv": result.curves, **result.tables})
    if checkpoint is not None:
        checkpoint.clear()
    return {"trial_id": job.trial_id, "run_id": run.run_id, "status": "FINISHED", "error": None}
