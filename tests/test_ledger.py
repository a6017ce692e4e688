"""The ledger: atomic records, owners alive or gone, claims that never double-release."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from pytest_isolation.ledger import Ledger, Owner, ResourceRecord, process_started


def _record(
    owner: Owner,
    identifier: str = "/nowhere",
    *,
    data: dict[str, object] | None = None,
    created: float | None = None,
) -> ResourceRecord:
    return ResourceRecord(
        kind="directory",
        identifier=identifier,
        engine="basic",
        env_id="e1",
        owner=owner,
        data=data or {},
        created=created or time.time(),
    )


def _dead_owner() -> Owner:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    started = process_started(child.pid)
    child.wait()
    assert started is not None
    return Owner("dead-session", child.pid, started, Owner.current("x").host)


def test_records_round_trip(tmp_path: Path) -> None:
    """A record reads back equal, with its data."""
    ledger = Ledger(tmp_path)
    record = ledger.add(_record(Owner.current("s1"), data={"started": 1.5, "group": True}))
    assert ledger.records() == [record]
    assert ledger.records()[0].data["group"] is True
    ledger.remove(record)
    assert ledger.records() == []
    ledger.remove(record)  # removing twice is harmless


def test_writes_are_atomic_and_leave_no_temporaries(tmp_path: Path) -> None:
    """Only complete records are visible; temporary files are renamed into place."""
    ledger = Ledger(tmp_path)
    for index in range(20):
        ledger.add(_record(Owner.current("s"), identifier=f"/d{index}"))
    names = os.listdir(ledger.root)
    assert len(names) == 20
    assert all(name.endswith(".json") and not name.startswith(".") for name in names)


def test_records_are_oldest_first_and_filtered_by_session(tmp_path: Path) -> None:
    """records() sorts by creation; for_session() picks one run's."""
    ledger = Ledger(tmp_path)
    mine = Owner.current("mine")
    theirs = Owner.current("theirs")
    first = ledger.add(_record(mine, created=time.time() - 10))
    second = ledger.add(_record(theirs))
    assert ledger.records() == [first, second]
    assert ledger.for_session("mine") == [first]


def test_owner_liveness_follows_pid_and_start_time() -> None:
    """An owner is alive only while its pid runs with the same start time (pid reuse)."""
    me = Owner.current("s")
    assert me.alive()
    assert not _dead_owner().alive()
    reused = Owner("s", os.getpid(), me.started - 100.0, me.host)
    assert not reused.alive()
    elsewhere = Owner("s", 1, 0.0, "another-host")
    assert elsewhere.alive()  # never judge processes of another machine


def test_claim_is_exclusive(tmp_path: Path) -> None:
    """A record can be claimed once; the claim removes it when the block succeeds."""
    ledger = Ledger(tmp_path)
    record = ledger.add(_record(_dead_owner()))
    with ledger.claim(record) as first:
        assert first
        with ledger.claim(record) as second:
            assert not second
    assert ledger.records() == []


def test_failed_release_hands_the_record_back(tmp_path: Path) -> None:
    """If releasing raises, the record returns to the ledger for a later retry."""
    ledger = Ledger(tmp_path)
    record = ledger.add(_record(_dead_owner()))
    try:
        with ledger.claim(record) as mine:
            assert mine
            raise RuntimeError("busy")
    except RuntimeError:
        pass
    assert ledger.records() == [record]
    ledger.remove(record)


def test_claim_of_a_dead_sweeper_is_taken_over(tmp_path: Path) -> None:
    """A record claimed by a sweeper that died is visible again and can be claimed."""
    ledger = Ledger(tmp_path)
    record = ledger.add(_record(_dead_owner()))
    dead_pid = _dead_owner().pid
    os.rename(
        ledger.root / f"{record.id}.json", ledger.root / f"{record.id}.json.reaping.{dead_pid}"
    )
    assert ledger.records() == [record]
    with ledger.claim(record) as mine:
        assert mine
    assert ledger.records() == []
    assert os.listdir(ledger.root) == []


def test_claim_of_a_live_sweeper_hides_the_record(tmp_path: Path) -> None:
    """While a live sweeper holds a claim, others do not see the record."""
    ledger = Ledger(tmp_path)
    record = ledger.add(_record(_dead_owner()))
    os.rename(
        ledger.root / f"{record.id}.json", ledger.root / f"{record.id}.json.reaping.{os.getpid()}"
    )
    assert ledger.records() == []
    os.remove(ledger.root / f"{record.id}.json.reaping.{os.getpid()}")


def test_corrupt_files_are_skipped_and_reported(tmp_path: Path) -> None:
    """A damaged record does not break reading the others, and corrupt() names it."""
    ledger = Ledger(tmp_path)
    good = ledger.add(_record(Owner.current("s")))
    (ledger.root / "broken.json").write_text("{not json")
    assert ledger.records() == [good]
    assert ledger.corrupt() == [ledger.root / "broken.json"]
    ledger.remove(good)
    (ledger.root / "broken.json").unlink()


def test_keep_marks_a_record_with_its_deadline(tmp_path: Path) -> None:
    """keep() stores until when the resource is kept."""
    ledger = Ledger(tmp_path)
    record = ledger.add(_record(Owner.current("s")))
    kept = ledger.keep(record, until=1234.0)
    assert kept.kept and kept.kept_until == 1234.0
    assert ledger.records() == [kept]
    ledger.remove(kept)


def test_an_empty_or_missing_ledger_has_no_records(tmp_path: Path) -> None:
    """A ledger directory that does not exist yet is simply empty."""
    assert Ledger(tmp_path / "absent").records() == []
