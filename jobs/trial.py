"""One trial: train dense, prune level by level with rewinding and retraining, quantize, measure.

``run_trial`` is what every executor runs (through ``jobs.task.TrialTask``).
It never raises for a failing trial: the failure is recorded in MLflow and returned, so that
the launcher and the other trials go on. With a checkpoint directory, the trial saves its
state after every epoch and level; a requeued or re-run trial resumes there, in the same
MLflow run, and its numbers equal those of an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import math
import os
import random
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import submitit
import torch
from mlflow.entities import Metric, RunTag
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
from jobs.stages import StageCache, level_keys, levels_of
from jobs.task import StageJob, TrialJob
from jobs.tracking import TrialRun, close_abandoned_runs, retry
from jobs.train import Diverged, lr_at, make_loader, resolve_device, train

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


@dataclass
class StageUse:
    """How a trial shares level states with other trials of its sweep (see ``jobs.stages``).

    ``keys``: the trial's level keys; ``save_levels``: levels other trials will reuse, stored
    after computing them; ``wait``: wait for another process computing a shared level instead
    of computing it too; ``producer``: who computed an entry (tags of the trials reusing it).
    """

    cache: StageCache
    keys: list[str]
    save_levels: frozenset[int] = frozenset()
    wait: bool = True
    producer: dict[str, str] = field(default_factory=dict)
    waited_s: float = 0.0  # time blocked on another process's lock: neither compute nor tracking

    def deepest(self, first: int) -> int | None:
        """The deepest level >= ``first`` whose state is already on disk."""
        return next((k for k in range(len(self.keys) - 1, first - 1, -1) if self.cache.has(self.keys[k])), None)


def _final_extras(model, input_shape) -> dict[str, Any]:
    """The final level's float measurements that only the last level gets (latency, histograms)."""
    model.to("cpu")
    return {"row": {"latency_ms": latency_ms_per_sample(model, input_shape), **latency(model, input_shape)},
            "histograms": weight_histograms(model).assign(stage="float").to_dict("records")}


class _Stopwatch:
    """Seconds spent inside ``timed`` calls (a trial's tracking time, its state I/O time)."""

    def __init__(self):
        self.seconds = 0.0

    def timed(self, fn: Callable) -> Callable:
        """``fn``, with its time added to ``seconds``."""
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return wrapper


def execute(cfg: TrialConfig, on_row: Callable[[dict], None] = lambda row: None,
            checkpoint: Checkpoint | None = None, on_curve: Callable[[list[dict]], None] = lambda c: None,
            stages: StageUse | None = None,
            on_reuse: Callable[[list[dict], list[dict], dict], None] = lambda rows, curves, producer: None,
            until_level: int | None = None, io: _Stopwatch | None = None,
            checkpoint_every_s: float = 0.0) -> TrialResult:
    """Run (or resume) the trial's levels and quant stage; ``on_row`` gets each results row as it lands.

    With ``stages``, levels already computed by another trial are loaded instead of trained
    (``on_reuse`` gets their rows and curves) and shared levels are stored once computed.
    ``until_level`` stops after that level, without quantization (a dense stage job).
    ``io`` accumulates the time spent loading the dataset and reading and writing states
    (checkpoints, the stage cache): the trial's cost that is not training or measuring.
    The checkpoint is written at the end of every level and, within a level, at the end of an
    epoch once ``checkpoint_every_s`` have passed since the last write (0: every epoch), or
    sooner where writing is cheap: once 20 times the last write's duration have passed.
    """
    io = io or _Stopwatch()
    state = io.timed(checkpoint.load)() if checkpoint else None
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    data = io.timed(load_dataset)(cfg.dataset)
    test_loader = make_loader(data.test, EVAL_BATCH, shuffle=False, device=device)
    loader = make_loader(data.train, cfg.train.batch_size, shuffle=True, seed=cfg.seed, device=device)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    init_state = copy.deepcopy(model.state_dict())
    flops = dense_flops(model, data.input_shape)
    levels = levels_of(cfg)
    last = levels if until_level is None else min(levels, until_level)
    amount = level_amount(cfg.prune.ratio, levels) if levels else 0.0
    kind, at = parse_rewind(cfg.prune.rewind)
    late = levels > 0 and kind in ("epoch", "step") and at > 0
    rewind_state = None if late else init_state
    result = TrialResult()
    start_level, start_epoch, optimizer_state, elapsed = 0, 0, None, 0.0

    def restore(saved: dict) -> None:
        nonlocal init_state, rewind_state
        init_state, rewind_state = saved["init_state"], saved["rewind_state"]
        result.rows = copy.deepcopy(saved["rows"])
        result.curves, result.tables = copy.deepcopy(saved["curves"]), copy.deepcopy(saved["tables"])
        if saved["masked"] and not any(hasattr(m, "weight_mask") for m in model.modules()):
            _add_empty_masks(model)
        model.load_state_dict(saved["model"])
        set_rng_state(saved["rng"])

    if state is not None:
        restore(state)
        start_level, start_epoch = state["level"], state["epoch"]
        optimizer_state, elapsed = state["optimizer"], state["seconds"]

    def snapshot(level: int, epoch: int, optimizer=None, seconds: float = 0.0) -> dict:
        return {"level": level, "epoch": epoch, "rows": result.rows, "curves": result.curves,
                "tables": result.tables,
                "model": model.state_dict(), "init_state": init_state, "rewind_state": rewind_state,
                "masked": any(hasattr(m, "weight_mask") for m in model.modules()),
                "optimizer": None if optimizer is None else optimizer.state_dict(),
                "seconds": seconds, "rng": rng_state(), "producer": stages.producer if stages else {}}

    last_saved, save_cost = time.monotonic(), None

    @io.timed
    def save(level: int, epoch: int, optimizer=None, seconds: float = 0.0) -> None:
        nonlocal last_saved, save_cost
        if checkpoint is not None:
            began = time.monotonic()
            checkpoint.save(snapshot(level, epoch, optimizer, seconds))
            last_saved = time.monotonic()
            save_cost = last_saved - began

    def save_due() -> bool:
        # At most ~5% of the time goes to checkpoints, and at most checkpoint_every_s of work
        # is lost to a requeue: a small model saves every few epochs, a large one every epoch.
        every = checkpoint_every_s if save_cost is None else min(checkpoint_every_s, 20 * save_cost)
        return time.monotonic() - last_saved >= every

    def fresh_state(level: int) -> dict:
        torch.manual_seed(derive_seed(cfg.seed, "reinit", level))
        random_init = dataclasses.replace(cfg.model, weights="")  # the control is random, never the file
        return build_model(random_init, data.input_shape, data.num_classes).state_dict()

    def capture(now: int, unit: str) -> None:
        nonlocal rewind_state
        if late and kind == unit and now == at:
            rewind_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})

    def reuse(level: int, saved: dict) -> None:
        restore(saved)
        if level == levels and until_level is None:
            # The entry holds the level without its final-only measurements: they come from
            # the producer's own (stored beside it) or are measured here.
            key = stages.keys[level]
            extras = io.timed(stages.cache.load)(key, "final.pt") or _final_extras(model, data.input_shape)
            result.rows[-1].update(extras["row"])
            result.tables["weight_histograms.csv"] = extras["histograms"]
        on_reuse(result.rows, result.curves, {**saved.get("producer", {}), "level": str(level)})

    model.to(device)
    level = start_level
    while level <= last:
        resuming = level == start_level and start_epoch > 0
        if stages is not None and not resuming:
            found = stages.deepest(level)
            if found is not None:
                reuse(found, io.timed(stages.cache.load)(stages.keys[found]))
                level = found + 1
                continue
        with contextlib.ExitStack() as held:
            holds = False
            if stages is not None and not resuming and level in stages.save_levels:
                asked = time.perf_counter()
                holds = held.enter_context(stages.cache.lock(stages.keys[level], stages.wait))
                stages.waited_s += time.perf_counter() - asked
                saved = io.timed(stages.cache.load)(stages.keys[level]) if holds else None
                if saved is not None:  # computed by another process while we waited
                    reuse(level, saved)
                    level += 1
                    continue
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
                result.curves.append({"step": len(result.curves), "level": level, "epoch": epoch,
                                      "train_loss": loss, "test_accuracy": accuracy,
                                      "lr": lr_at(cfg.train, epoch, epochs)})
                if level == 0:
                    capture(epoch + 1, "epoch")
                # Small models train an epoch in milliseconds: a state per epoch would cost as
                # much as the epoch. A requeued trial resumes from the last state, RNG included;
                # never from a diverged one, which would only diverge again, an epoch later.
                if save_due() and math.isfinite(loss):
                    save(level, epoch + 1, optimizer, seconds)

            try:
                seconds = train(model, loader, cfg.train, device, epochs=epochs,
                                start_epoch=start_epoch if resuming else 0,
                                optimizer_state=optimizer_state if resuming else None,
                                epoch_seed=lambda epoch: derive_seed(cfg.seed, "data", level, epoch),
                                on_epoch=end_of_epoch,
                                on_step=(lambda step: capture(step, "step")) if level == 0 else None,
                                elapsed=elapsed if resuming else 0.0, level=level)
            except Diverged:
                # The level's curve up to the non-finite loss is the evidence: log it before failing.
                on_curve([point for point in result.curves if point["level"] == level])
                raise
            on_curve([point for point in result.curves if point["level"] == level])
            row = float_row(model, level, data.input_shape, test_loader, device, flops, seconds)
            stats = layer_stats(model, data.input_shape).assign(level=level)
            result.tables["layers.csv"] = result.tables.get("layers.csv", []) + stats.to_dict("records")
            result.rows.append(row)
            if holds:
                io.timed(stages.cache.save)(stages.keys[level], snapshot(level + 1, 0))
            if level == levels and until_level is None:
                extras = _final_extras(model, data.input_shape)
                if holds:
                    io.timed(stages.cache.save)(stages.keys[level], extras, "final.pt")
                row.update(extras["row"])
                result.tables["weight_histograms.csv"] = extras["histograms"]
            on_row(row)
            save(level + 1, 0)
        level += 1

    if cfg.quant.mode != "none" and until_level is None:
        # Reseeded so the quant stage draws the same numbers whether the levels before it were
        # trained here, resumed from a checkpoint or reused from another trial.
        seed_everything(derive_seed(cfg.seed, "quant"))
        calibration = make_loader(data.train, cfg.train.batch_size, shuffle=True, seed=cfg.seed)
        quant_data = QuantData(calibration=calibration, train_loader=loader, train_cfg=cfg.train, device=device,
                               epoch_seed=lambda epoch: derive_seed(cfg.seed, "qat", epoch))
        try:
            qmodel = quantize(model.to("cpu"), cfg.quant, quant_data)
        except Diverged as exc:  # qat fine-tuning: train() there does not know the level
            raise Diverged(levels, exc.epoch, exc.loss) from exc
        row = quant_row(model, qmodel, cfg.quant.mode, levels, data.input_shape, test_loader, flops)
        result.tables["weight_histograms.csv"] = (result.tables.get("weight_histograms.csv", []) +
                                                  weight_histograms(qmodel).assign(stage=cfg.quant.mode)
                                                  .to_dict("records"))
        result.rows.append(row)
        on_row(row)
    return result


def _threads(job_threads: int | None) -> None:
    # Use the CPUs we were given, not every core of a shared node.
    threads = job_threads or int(os.environ.get("SLURM_CPUS_PER_TASK", "0"))
    if threads:
        torch.set_num_threads(threads)


def _stage_use(job: TrialJob, cfg: TrialConfig, producer: dict[str, str]) -> StageUse | None:
    if not job.stage_dir:
        return None
    return StageUse(StageCache(job.stage_dir), level_keys(cfg), frozenset(job.save_levels),
                    job.wait_for_stages, producer)


def run_trial(job: TrialJob) -> dict[str, Any]:
    """Run one trial and record it in MLflow; return its status (never raises for trial errors)."""
    started = time.perf_counter()
    _threads(job.threads)
    tracking, io = _Stopwatch(), _Stopwatch()
    checkpoint = Checkpoint(job.checkpoint_dir) if job.checkpoint_dir else None
    previous = io.timed(checkpoint.load)() if checkpoint else None
    tags = {**job.tags, "device_used": str(resolve_device(job.settings.get("device", "auto"))),
            "torch_threads": str(torch.get_num_threads())}
    if os.environ.get("SLURM_JOB_ID"):
        tags["slurm_job_id"] = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ["SLURM_JOB_ID"])
        if os.environ.get("SLURM_ARRAY_TASK_ID"):
            tags["slurm_array_task_id"] = os.environ["SLURM_ARRAY_TASK_ID"]
    run = tracking.timed(TrialRun)(job.target, job.trial_id, job.name, job.settings, tags,
                                   resume_run_id=checkpoint.run_id() if checkpoint else None)
    if job.ledger_dir:  # we hold the trial's lease: any other RUNNING run of it was abandoned
        tracking.timed(close_abandoned_runs)(run.client, job.target.experiment_id, job.trial_id, run.run_id)
    partial = TrialResult(rows=list(previous["rows"]) if previous else [])
    cfg = from_flat(job.settings)
    stages = _stage_use(job, cfg, {"trial_id": job.trial_id, "run_id": run.run_id, "name": job.name})

    @tracking.timed
    def on_row(row: dict) -> None:
        partial.rows.append(row)
        run.log_row(row, prefix="" if row["stage"] == "float" else "quant.")

    @tracking.timed
    def on_reuse(rows: list[dict], curves: list[dict], producer: dict) -> None:
        # Reused levels land in this run like computed ones, in one batch, tagged with their source.
        partial.rows[:] = list(rows)
        run.log_rows(rows)
        run.log_curve(curves)
        source = {"reused_levels": "0" if producer["level"] == "0" else f"0-{producer['level']}",
                  "reused_from": producer.get("trial_id") or producer.get("stage", ""),
                  "reused_from_run": producer.get("run_id", "")}
        retry(run.client.log_batch, run.run_id, tags=[RunTag(k, v) for k, v in source.items()])

    def timings() -> dict[str, float]:
        total = time.perf_counter() - started
        waited = stages.waited_s if stages else 0.0
        return {"tracking_time_s": tracking.seconds, "stage_wait_time_s": waited, "io_time_s": io.seconds,
                "compute_time_s": max(total - tracking.seconds - waited - io.seconds, 0.0)}

    def log_timings(values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        # A resumed run keeps the timings its interrupted attempt logged at this step (once per step).
        fresh = [Metric(k, v, now, step) for k, v in values.items() if (k, step) not in run.logged]
        if fresh:
            retry(run.client.log_batch, run.run_id, metrics=fresh)
            run.logged |= {(m.key, step) for m in fresh}

    try:
        if checkpoint is not None:  # inside: a full disk here fails the run with its cause
            checkpoint.save_run_id(run.run_id)
        result = execute(cfg, on_row, checkpoint, on_curve=tracking.timed(run.log_curve), stages=stages,
                         on_reuse=on_reuse, io=io, checkpoint_every_s=job.checkpoint_every_s)
    except Exception as exc:
        text = traceback.format_exc()
        log_timings(timings(), int(partial.rows[-1]["level"]) if partial.rows else 0)
        # Divergence is an outcome, not a bug: its own message, no exception class in front.
        error = str(exc) if isinstance(exc, Diverged) else text.strip().splitlines()[-1]
        run.fail(partial.rows, job.settings, text, error=error,
                 tags={"diverged": "true"} if isinstance(exc, Diverged) else None)
        # Out of time for good: keep the state so that a later `sweep run` resumes it. A diverged
        # trial's state goes too: it is deterministic, so resuming it would diverge again.
        if checkpoint is not None and not isinstance(exc, submitit.core.utils.UncompletedJobError):
            checkpoint.clear()
        return {"trial_id": job.trial_id, "run_id": run.run_id, "status": "FAILED", "error": error,
                "diverged": isinstance(exc, Diverged)}
    spent = timings()
    log_timings(spent, levels_of(cfg))
    run.finish(result.rows, job.settings, {"curves.csv": result.curves, **result.tables})
    if checkpoint is not None:
        checkpoint.clear()
    return {"trial_id": job.trial_id, "run_id": run.run_id, "status": "FINISHED", "error": None, **spent}


def run_stage(job: StageJob) -> dict[str, Any]:
    """Compute a shared dense stage into the cache (no MLflow run: its trials log it as reused)."""
    _threads(job.threads)
    cfg = from_flat(job.settings)
    cache = StageCache(job.stage_dir)
    if cache.has(job.key):
        return {"stage": job.key, "status": "FINISHED", "computed": False}
    producer = {"stage": job.key, "slurm_job_id": os.environ.get("SLURM_JOB_ID", "")}
    stages = StageUse(cache, level_keys(cfg), frozenset({0}), True, producer)
    checkpoint = Checkpoint(job.checkpoint_dir)
    execute(cfg, checkpoint=checkpoint, stages=stages, until_level=0)
    checkpoint.clear()
    return {"stage": job.key, "status": "FINISHED", "computed": True}
