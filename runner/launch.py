"""Submit trials through submitit executors: debug, local or slurm.

Caveats users hit:
- ``folder`` holds submitit's pickles and logs, the job records and the trials'
  checkpoints; on a cluster it must be on a filesystem that compute nodes share with the
  submitting node.
- Running on this machine (``debug``, ``local``, local workers) is ``runner.local``.
- On SLURM every trial is one task of a job array (arrays are chunked under the cluster's
  MaxArraySize). Trials are submitit Checkpointables: on preemption or at the time limit
  (SIGUSR2 ``signal_delay_s`` before it) the task is requeued and resumes from its last
  checkpoint, at most ``max_requeues`` times for time limits.
- A job that dies without writing a result (killed, out of memory) cannot record its own
  failure; a waiting launcher then marks its MLflow run FAILED with the executor's error.
"""
from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import submitit

from jobs.ledger import Ledger
from jobs.task import HELD, PackJob, StageJob, TrackingTarget, TrialJob, TrialTask
from jobs.retrying import retry
from runner import records, scheduler
from runner.grid import Trial
from jobs.stages import training_epochs
from runner.plan import Pack, StagePlan, plan

DEFAULT_TIMEOUT_MIN = 24 * 60
DEFAULT_MAX_REQUEUES = 10
DEFAULT_CHECKPOINT_EVERY_S = 60.0
SLURM_PASSTHROUGH = ("partition", "account", "qos", "nodes", "cpus_per_task", "gpus_per_node", "constraint",
                     "exclude", "setup", "additional_parameters")


def debug_executor(folder: Path, opts: dict[str, Any], max_parallel: int) -> submitit.Executor:
    """Run trials one after another in this process (tests, pdb)."""
    return submitit.DebugExecutor(folder=folder)


def local_executor(folder: Path, opts: dict[str, Any], max_parallel: int) -> submitit.Executor:
    """Run each trial as a local process."""
    ex = submitit.LocalExecutor(folder=folder, max_num_timeout=opts.get("max_requeues", DEFAULT_MAX_REQUEUES))
    ex.update_parameters(timeout_min=opts.get("timeout_min", DEFAULT_TIMEOUT_MIN))
    return ex


def slurm_executor(folder: Path, opts: dict[str, Any], max_parallel: int) -> submitit.Executor:
    """Submit trials as SLURM job arrays with at most ``max_parallel`` running at once."""
    slurm = dict(opts.get("slurm", {}))
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=opts.get("max_requeues", DEFAULT_MAX_REQUEUES))
    params: dict[str, Any] = {"time": opts.get("timeout_min", DEFAULT_TIMEOUT_MIN),
                              "array_parallelism": max_parallel, "job_name": opts.get("job_name", "sweep")}
    params.update({k: slurm[k] for k in SLURM_PASSTHROUGH if k in slurm})
    if "mem_gb" in slurm:
        params["mem"] = f"{int(slurm['mem_gb'] * 1024)}M"
    if "signal_delay_s" in slurm:
        params["signal_delay_s"] = slurm["signal_delay_s"]
    ex.update_parameters(**params)
    return ex


EXECUTORS: dict[str, Callable[[Path, dict[str, Any], int], submitit.Executor]] = {
    "debug": debug_executor,
    "local": local_executor,
    "slurm": slurm_executor,
}


@dataclass
class Summary:
    """What happened to the trials of one ``sweep run``."""

    finished: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    held: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no trial failed."""
        return not self.failed

    def account(self, trial_id: str, outcome: dict[str, Any]) -> str:
        """Book one trial's outcome; returns what the progress display says of it."""
        if outcome["status"] == "FINISHED":
            self.finished.append(trial_id)
            return "finished"
        if outcome["status"] == HELD:
            self.held[trial_id] = outcome["error"]
            return "running elsewhere"
        self.failed[trial_id] = outcome["error"]
        return "failed"


def threads_per_trial(executor: str, max_parallel: int) -> int | None:
    """Share this machine's cores between local trials; SLURM gives each its cpus_per_task."""
    if executor == "local":
        return max(1, (os.cpu_count() or 1) // max_parallel)
    return None  # in process: torch's default; on SLURM: the job's SLURM_CPUS_PER_TASK


def payloads(trials: list[Trial], target: TrackingTarget, executor: str, folder: Path,
             max_parallel: int, tags: dict[str, str] | None = None,
             stage_plan: StagePlan | None = None,
             checkpoint_every_s: float = DEFAULT_CHECKPOINT_EVERY_S) -> list[TrialJob]:
    """The picklable job of each trial, with its checkpoint directory (and stage cache) under ``folder``."""
    threads = threads_per_trial(executor, max_parallel)
    stage_dir = str(stage_folder(folder)) if stage_plan is not None else None
    return [TrialJob(t.id, t.name, t.flat, target, {"executor": executor, **(tags or {})}, threads,
                     str((folder / "checkpoints" / t.id).resolve()), stage_dir=stage_dir,
                     save_levels=stage_plan.save_levels.get(t.id, ()) if stage_plan else (),
                     # On SLURM a job waiting on another's lock would hold its GPU idle.
                     wait_for_stages=executor != "slurm", checkpoint_every_s=checkpoint_every_s,
                     ledger_dir=str(Ledger.of(folder).root))
            for t in trials]


def stage_folder(folder: Path) -> Path:
    """Where a sweep's shared level states live (beside its checkpoints)."""
    return (folder / "stages").resolve()


def cached_stages(folder: Path) -> set[str]:
    """Level keys already in the sweep's stage cache."""
    root = stage_folder(folder)
    return {p.name[:-3] for p in root.glob("*.pt") if not p.name.endswith(".final.pt")} if root.exists() else set()


def groups_of(pack: Pack, keys: dict[str, list[str]]) -> list[list[int]]:
    """The pack's trajectory groups: runs of trials (indices) with the same level keys."""
    groups: list[list[int]] = []
    for i, trial in enumerate(pack.trials):
        if groups and keys[pack.trials[groups[-1][0]].id] == keys[trial.id]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def lanes_of(pack: Pack, keys: dict[str, list[str]], at_once: int) -> tuple[tuple[int, ...], ...]:
    """Split a pack into at most ``at_once`` lanes of whole trajectory groups, balanced by trial count."""
    groups = groups_of(pack, keys)
    lanes: list[list[int]] = [[] for _ in range(min(at_once, len(groups)))]
    for group in sorted(groups, key=len, reverse=True):
        min(lanes, key=len).extend(group)
    return tuple(tuple(sorted(lane)) for lane in lanes if lane) if len(lanes) > 1 else ()


def pack_payloads(stage_plan: StagePlan, jobs: list[TrialJob], at_once: int = 1) -> list[tuple[PackJob, Pack]]:
    """One PackJob per pack of the plan, tokened so a requeued pack knows what it already ran."""
    by_id = {j.trial_id: j for j in jobs}
    token = uuid.uuid4().hex
    return [(PackJob(tuple(by_id[t.id] for t in pack.trials), f"{token}-{i}",
                     lanes_of(pack, stage_plan.keys, at_once)), pack)
            for i, pack in enumerate(stage_plan.packs)]


def plan_for(trials: list[Trial], executor: str, max_parallel: int, folder: Path,
             launcher: dict[str, Any]) -> StagePlan:
    """The stage plan of the trials to run, from the launcher options (trials_per_job, share_stages)."""
    # Locally without trials_per_job: one pack that the workers share out (see uses_workers).
    per_job = max(1, len(trials)) if uses_workers(executor, launcher) else launcher.get("trials_per_job", 1)
    if not launcher.get("share_stages", True):
        return plan(trials, per_job, shared=False)
    return plan(trials, per_job, cached=cached_stages(folder), stage_jobs=executor == "slurm")


def uses_workers(executor: str, launcher: dict[str, Any]) -> bool:
    """Locally, unless ``trials_per_job`` is set, ``max_parallel`` workers pull trial groups as they free up."""
    return executor == "local" and "trials_per_job" not in launcher


def worker_payloads(stage_plan: StagePlan, jobs: list[TrialJob], workers: int,
                    folder: Path) -> list[tuple[PackJob, Pack]]:
    """``workers`` copies of one pack of every trial; each worker runs the groups it claims first.

    Longest trajectories go first, so that no worker is left with a long one at the end.
    """
    by_id = {j.trial_id: j for j in jobs}
    everything = Pack([t for pack in stage_plan.packs for t in pack.trials])
    groups = groups_of(everything, stage_plan.keys)
    groups.sort(key=lambda g: -sum(training_epochs(everything.trials[g[0]].config)))
    payload = PackJob(tuple(by_id[t.id] for t in everything.trials), uuid.uuid4().hex,
                      claim_dir=str((folder / "claims").resolve()), groups=tuple(tuple(g) for g in groups),
                      prepare_store=True)
    return [(payload, everything)] * max(1, min(workers, len(groups)))


def packed_jobs(stage_plan: StagePlan, trials: list[Trial], target: TrackingTarget, executor: str, folder: Path,
                max_parallel: int, share_stages: bool = True, at_once: int = 1,
                workers: bool = False, checkpoint_every_s: float = DEFAULT_CHECKPOINT_EVERY_S,
                ) -> list[tuple[PackJob, Pack]]:
    """The payloads of the plan's packs, ready to submit (``at_once``: trials a job runs at the same time;
    ``workers``: ``max_parallel`` jobs sharing the trials out instead, see ``uses_workers``)."""
    jobs = payloads(trials, target, executor, folder, max_parallel,
                    stage_plan=stage_plan if share_stages else None, checkpoint_every_s=checkpoint_every_s)
    if workers:
        return worker_payloads(stage_plan, jobs, max_parallel, folder)
    return pack_payloads(stage_plan, jobs, at_once)


def mark_lost(target: TrackingTarget, trial_id: str, error: str) -> None:
    """Mark a trial's unfinished runs FAILED when its process died without saying so."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(target.uri)
    runs = retry(client.search_runs, [target.experiment_id],
                 filter_string=f"tags.trial_id = '{trial_id}' and attributes.status = 'RUNNING'")
    for run in runs:
        retry(client.set_tag, run.info.run_id, "error", error[:5000])
        retry(client.set_terminated, run.info.run_id, "FAILED")


def job_error(exc: Exception) -> str:
    """One line saying why a job ended without a result: where it has a traceback, its last line."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    # submitit's FailedJobError: the job's traceback between two rules, then where its logs are.
    parts = text.split("----------------------")
    if len(parts) >= 3 and "failed during processing" in parts[0]:
        trace = [line.strip() for line in parts[1].splitlines() if line.strip()]
        if trace:
            return trace[-1]
    # A killed job has no traceback: submitit's first line says so; its stderr tail is noise (warnings).
    if "has not produced any output" in text:
        return f"the job's process ended without a result ({text.splitlines()[0].split(' with path')[0]}); " \
               "a re-run resumes its trial"
    return text.splitlines()[-1]


def collect(job, pack: Pack, target: TrackingTarget, summary: Summary,
             progress: Callable[[Trial, str], None]) -> None:
    try:
        outcomes = job.result()
    except Exception as exc:  # the job process itself died: trials it finished before stay finished
        from runner.store import finished_trials

        message = job_error(exc)
        done = finished_trials(target.uri, target.sweep)
        for trial in pack.trials:
            if trial.id in done:
                summary.finished.append(trial.id)
            else:
                mark_lost(target, trial.id, message)
                summary.failed[trial.id] = message
            progress(trial, "failed" if trial.id in summary.failed else "finished")
        return
    by_id = {o["trial_id"]: o for o in (outcomes if isinstance(outcomes, list) else [outcomes])}
    for trial in pack.trials:
        outcome = by_id.get(trial.id, {"status": "FAILED", "error": "the job returned no outcome for it"})
        progress(trial, summary.account(trial.id, outcome))


def job_records(job, pack: Pack, executor: str) -> list[records.JobRecord]:
    """The job record of each trial of the pack the job runs."""
    return [records.record_for(job, t.id, t.name, executor) for t in pack.trials]


def submit_slurm(ex: submitit.Executor, packed: list[tuple[PackJob, Pack]], stage_plan: StagePlan,
                 folder: Path, threads: int | None = None) -> list[tuple[Any, Pack]]:
    """Submit stage jobs, then the packs as job arrays depending on them; record who runs what.

    Arrays stay under MaxArraySize. A pack needing a dense stage waits for that stage's
    array task (``afterany``: if the stage failed, the pack computes it itself).
    """
    chunk = scheduler.max_array_size()
    stage_ids: dict[str, str] = {}
    stages = [StageJob(key, trial.flat, str(stage_folder(folder)),
                       str((folder / "checkpoints" / f"stage-{key}").resolve()), threads)
              for key, trial in stage_plan.stage_jobs.items()]
    for start in range(0, len(stages), chunk):
        with ex.batch():
            part = [ex.submit(TrialTask(), job) for job in stages[start:start + chunk]]
        stage_ids.update({job.key: str(sub.job_id) for job, sub in zip(stages[start:start + chunk], part)})
        records.append(folder, [records.JobRecord(f"stage:{job.key}", f"dense stage {job.key}", str(sub.job_id),
                                                  "slurm", time.time(), str(sub.paths.stdout), str(sub.paths.stderr))
                                for job, sub in zip(stages[start:start + chunk], part)])
    by_needs: dict[tuple[str, ...], list[tuple[PackJob, Pack]]] = {}
    for item in packed:
        by_needs.setdefault(tuple(sorted(item[1].needs)), []).append(item)
    submitted = []
    for needs, items in by_needs.items():
        ex.update_parameters(dependency=("afterany:" + ":".join(stage_ids[k] for k in needs)) if needs else None)
        for start in range(0, len(items), chunk):
            with ex.batch():
                part = [ex.submit(TrialTask(), payload) for payload, _ in items[start:start + chunk]]
            for job, (_, pack) in zip(part, items[start:start + chunk]):
                records.append(folder, job_records(job, pack, "slurm"))
                submitted.append((job, pack))
    ex.update_parameters(dependency=None)
    return submitted


def wait(submitted: list[tuple[Any, Pack]], target: TrackingTarget,
         progress: Callable[[Trial, str], None] = lambda trial, status: None) -> Summary:
    """Follow submitted jobs until all ended; returns what happened."""
    summary = Summary()
    pending = list(submitted)
    while pending:
        still = []
        for job, pack in pending:
            if job.done():
                collect(job, pack, target, summary, progress)
            else:
                still.append((job, pack))
        if len(still) == len(pending):
            time.sleep(1.0)
        pending = still
    return summary
