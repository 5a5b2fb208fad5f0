"""Plan a sweep as stages: which levels are shared, which trials run together, what runs first.

Trials share prefixes (``jobs.stages``): the dense model of a (dataset, model, seed, training)
serves every prune method, ratio and quant mode, a pruning trajectory every quant mode. The
plan computes each shared level once:
- Trials with the same trajectory (they differ only in quantization) always run in the same
  job, one after another; the first trains the levels, the others load them.
- ``trials_per_job`` packs several such groups into one job (one process, one import, one
  SLURM allocation), grouped by dense model.
- A dense model used by several jobs is a *stage job* on SLURM, submitted first; the jobs
  that need it depend on it (``afterany``), so nothing waits on a GPU. Locally the jobs start
  at once and the first to reach a shared level computes it while the others wait on its lock.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from jobs.stages import level_keys, training_epochs
from runner.grid import Trial


@dataclass
class Pack:
    """Trials that run in one job, in order."""

    trials: list[Trial]
    needs: set[str] = field(default_factory=set)  # stage jobs (dense keys) that must finish first


@dataclass
class StagePlan:
    """The shared-stage plan of a sweep's trials to run."""

    keys: dict[str, list[str]]  # trial id -> its level keys
    save_levels: dict[str, tuple[int, ...]]  # trial id -> levels it stores for other trials
    packs: list[Pack]
    stage_jobs: dict[str, Trial]  # dense key -> a trial whose settings define it
    work: dict[str, int]

    def saved(self, workers: int | None = None) -> str:
        """One line on the work the sharing saves (``workers``: local workers sharing one pack out)."""
        w = self.work
        jobs = (f"{workers} local worker(s) share the trials out" if workers
                else f"{len(self.packs)} job(s)" + (f" after {len(self.stage_jobs)} stage job(s)"
                                                   if self.stage_jobs else ""))
        return (f"level stages: {w['level_stages']} to train (naive {w['naive_level_stages']}), "
                f"training epochs: {w['epochs']} (naive {w['naive_epochs']}), "
                f"dense models: {w['dense']} (naive {w['naive_dense']}); {jobs}")


def _interleave(packs: list[Pack], first_dense: list[str]) -> list[Pack]:
    """Round-robin over dense models so that parallel slots start on different dense stages."""
    by_dense: dict[str, list[Pack]] = defaultdict(list)
    for pack, dense in zip(packs, first_dense):
        by_dense[dense].append(pack)
    queues = list(by_dense.values())
    out = []
    while any(queues):
        for queue in queues:
            if queue:
                out.append(queue.pop(0))
    return out


def plan(trials: list[Trial], trials_per_job: int = 1, cached: set[str] = frozenset(),
         stage_jobs: bool = False, shared: bool = True) -> StagePlan:
    """Group ``trials`` into packs and find the levels to store and the dense stages to run first.

    ``cached``: level keys already in the stage cache (from an earlier run); ``stage_jobs``:
    turn dense models shared by several packs into stage jobs (SLURM); ``shared=False``: every
    trial computes all of its levels itself (the naive way, for comparisons).
    """
    keys = {t.id: level_keys(t.config) for t in trials}
    if not shared:  # tell every trial apart, so nothing counts as shared
        keys = {tid: [f"{k}@{tid}" for k in ks] for tid, ks in keys.items()}
    consumers = Counter(k for ks in keys.values() for k in ks)
    save = {}
    for t in trials:
        shared = [level for level, key in enumerate(keys[t.id]) if consumers[key] >= 2]
        # Storing the deepest shared level is enough: whoever needs it jumps straight there.
        save[t.id] = (max(shared),) if shared else ()
    for t in trials:  # a dense model shared with other trajectories is stored too
        if consumers[keys[t.id][0]] >= 2 and 0 not in save[t.id]:
            save[t.id] = tuple(sorted({0, *save[t.id]}))

    groups: dict[str, list[Trial]] = defaultdict(list)
    for t in trials:
        groups[keys[t.id][-1]].append(t)
    # Groups of one dense model stay adjacent, so a pack holds as few dense models as it can.
    ordered = sorted(groups.values(), key=lambda g: keys[g[0].id][0])
    packs: list[Pack] = []
    for group in ordered:
        if packs and len(packs[-1].trials) + len(group) <= trials_per_job:
            packs[-1].trials.extend(group)
        else:
            packs.append(Pack(list(group)))
    dense_in = [{keys[t.id][0] for t in pack.trials} for pack in packs]

    jobs: dict[str, Trial] = {}
    if stage_jobs:
        packs_per_dense = Counter(d for ds in dense_in for d in ds)
        for pack, denses in zip(packs, dense_in):
            for dense in sorted(denses):
                if packs_per_dense[dense] >= 2 and dense not in cached:
                    jobs.setdefault(dense, next(t for t in pack.trials if keys[t.id][0] == dense))
                    pack.needs.add(dense)
    else:
        packs = _interleave(packs, [min(ds) for ds in dense_in])

    unique = {k for ks in keys.values() for k in ks}
    epochs_of = {k: e for t in trials for k, e in zip(keys[t.id], training_epochs(t.config))}
    work = {"trials": len(trials),
            "naive_level_stages": sum(len(ks) for ks in keys.values()),
            "level_stages": len(unique - set(cached)),
            "naive_epochs": sum(sum(training_epochs(t.config)) for t in trials),
            "epochs": sum(e for k, e in epochs_of.items() if k not in cached),
            "naive_dense": len(trials),
            "dense": len({ks[0] for ks in keys.values()} - set(cached))}
    return StagePlan(keys, save, packs, jobs, work)
