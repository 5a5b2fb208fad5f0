"""The ledger's claims: one winner among racing processes, expiry, fencing, release, requeue."""
import json
import multiprocessing
import os
import time

import pytest

from jobs import ledger
from jobs.ledger import SUBMISSION, Holder, Lease, Ledger


def _claim_in_child(root: str, trial_id: str, barrier, results) -> None:
    barrier.wait()
    got = Ledger(root).claim(trial_id, Holder.me())
    results.put((os.getpid(), isinstance(got, Lease)))
    if isinstance(got, Lease):
        time.sleep(1.0)  # hold it while the others try


def test_racing_processes_one_winner(tmp_path):
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(12), ctx.Queue()
    procs = [ctx.Process(target=_claim_in_child, args=(str(tmp_path), "t1", barrier, results)) for _ in range(12)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=30) for _ in procs]
    for p in procs:
        p.join()
    assert sum(won for _, won in outcomes) == 1, outcomes


def test_claim_refused_while_held_and_granted_after_release(tmp_path):
    book = Ledger(tmp_path)
    first = book.claim("t", Holder.me(token="a"))
    assert isinstance(first, Lease)
    # Same process, another claim (a second worker thread would be the same): a live lease is held.
    refused = book.claim("t", Holder("elsewhere", 1, "77_3"))
    assert not isinstance(refused, Lease) and refused[0].token == "a"
    first.release()
    second = book.claim("t", Holder("elsewhere", 2))
    assert isinstance(second, Lease) and second.generation == first.generation + 1


def test_dead_holder_on_this_host_expires_at_once(tmp_path):
    book = Ledger(tmp_path)
    child = multiprocessing.get_context("fork").Process(target=lambda: book.claim("t", Holder.me()))
    child.start()
    child.join()
    holder, live = book.holder("t")
    assert holder.pid == child.pid and not live
    assert isinstance(book.claim("t", Holder.me()), Lease)


def test_stale_heartbeat_on_another_host_expires_after_the_ttl(tmp_path, monkeypatch):
    book = Ledger(tmp_path)
    far = book.claim("t", Holder("node-elsewhere", 12345))
    assert isinstance(far, Lease)
    assert book.holder("t")[1]  # fresh heartbeat, another host: presumed alive
    old = time.time() - ledger.LEASE_TTL_S - 1
    os.utime(far.path, (old, old))
    assert not book.holder("t")[1]
    taker = book.claim("t", Holder.me())
    assert isinstance(taker, Lease)
    # The stalled holder wakes up: it finds itself fenced off instead of writing on.
    assert far.superseded() and not far.beat() and far.lost.is_set()


def test_a_requeued_slurm_task_takes_its_own_lease_back(tmp_path):
    book = Ledger(tmp_path)
    assert isinstance(book.claim("t", Holder("node1", 111, "55_2")), Lease)
    assert not isinstance(book.claim("t", Holder("node2", 222, "55_3")), Lease)
    assert isinstance(book.claim("t", Holder("node2", 222, "55_2")), Lease)


def test_torn_lease_and_state_files_are_survived(tmp_path):
    book = Ledger(tmp_path)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "state.json").write_text('{"state": "runn')
    assert book.read("t").state == "not submitted"
    (tmp_path / "t" / "lease.1").write_text("")
    os.utime(tmp_path / "t" / "lease.1", (0, 0))  # an empty, long-dead claim
    assert isinstance(book.claim("t", Holder.me()), Lease)


def test_states_round_trip(tmp_path):
    book = Ledger(tmp_path)
    book.update("t", state="running", attempts=2, holder=Holder("h", 1), error="")
    state = book.read("t")
    assert (state.state, state.attempts, state.holder.host) == ("running", 2, "h")
    assert json.loads((tmp_path / "t" / "state.json").read_text())["state"] == "running"
    assert book.known() == ["t"]


def test_heartbeat_thread_keeps_a_lease_alive(tmp_path, monkeypatch):
    monkeypatch.setattr(ledger, "HEARTBEAT_S", 0.05)
    book = Ledger(tmp_path)
    lease = book.claim(SUBMISSION, Holder("elsewhere", 9))
    old = time.time() - 1000
    os.utime(lease.path, (old, old))
    lease.keep_alive()
    time.sleep(0.3)
    assert time.time() - lease.path.stat().st_mtime < 5
    lease.release()
    assert not book.holder(SUBMISSION)[1]
    assert book.known() == []  # the submission lease is not a trial
