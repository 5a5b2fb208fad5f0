"""submitit against the real SLURM cluster (scripts/slurm-local.sh): one job, and one array.

Skipped without a cluster; failed instead when LOTTERY_SWEEPS_REQUIRE_SLURM=1 (CI).
"""
import operator
import time

import pytest
import submitit

from slurm_cluster import requires_slurm

# The job's callable is pickled by reference, and the node runs this venv's python from the
# submit directory, where this test module is not importable: so use a stdlib function.


def make_executor(folder, **extra):
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(slurm_partition="debug", timeout_min=5, cpus_per_task=1, **extra)
    return executor


def final_state(job, timeout=15.0):
    """The job's state in sacct, once terminal: sacct can lag the result pickle by a moment.

    `job.state` would serve a cached sacct answer (submitit rate-limits its sacct calls),
    so ask with mode="force".
    """
    deadline = time.monotonic() + timeout
    while (state := job.get_info(mode="force").get("State", "UNKNOWN")) in {
        "PENDING", "RUNNING", "COMPLETING", "UNKNOWN"
    }:
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return state


@requires_slurm
@pytest.mark.timeout(60)
def test_single_job(tmp_path):
    executor = make_executor(tmp_path)
    job = executor.submit(operator.add, 2, 2)
    assert job.job_id.isdigit(), job.job_id
    assert job.result() == 4
    assert final_state(job) == "COMPLETED"


@requires_slurm
@pytest.mark.timeout(60)
def test_batch_is_one_array(tmp_path):
    executor = make_executor(tmp_path, slurm_array_parallelism=2)
    with executor.batch():
        jobs = [executor.submit(operator.mul, i, 10) for i in range(4)]
    assert [job.result() for job in jobs] == [0, 10, 20, 30]
    array_ids = {job.job_id.split("_")[0] for job in jobs}
    assert len(array_ids) == 1, [job.job_id for job in jobs]
    (array_id,) = array_ids
    assert array_id.isdigit()
    assert sorted(job.job_id for job in jobs) == [f"{array_id}_{i}" for i in range(4)]
    assert {final_state(job) for job in jobs} == {"COMPLETED"}
