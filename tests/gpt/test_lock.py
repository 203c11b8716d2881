"""gpt.lock: one trainer per run folder; a dead trainer's lock is taken over."""

import os
import subprocess
import sys

import pytest

from gpt.lock import LOCK_FILE, RunInUseError, RunLock

HOLD = ("import sys, time; from gpt.lock import RunLock; RunLock(sys.argv[1]).acquire(); "
        "print('locked', flush=True); time.sleep(60)")


def test_a_second_lock_names_the_holder_and_a_released_lock_is_free(tmp_path):
    with RunLock(str(tmp_path)), pytest.raises(RunInUseError, match=rf"pid {os.getpid()}\b"):
        RunLock(str(tmp_path)).acquire()
    with RunLock(str(tmp_path)):  # released on exit
        pass
    assert os.listdir(tmp_path) == []  # the lock file goes with the lock
    fresh = tmp_path / "new_run"
    with RunLock(str(fresh)):
        assert fresh.is_dir()
    assert not fresh.exists()  # a folder the lock made, still empty, goes too


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunInUseError, match=f"in use by pid {proc.pid}"):
            RunLock(str(tmp_path)).acquire()
    finally:
        proc.kill()  # SIGKILL: it never unlocks, the lock file stays with its pid in it
        proc.wait(timeout=30)
    assert (tmp_path / LOCK_FILE).read_text().strip() == str(proc.pid)
    with RunLock(str(tmp_path)):
        assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())


def test_a_stale_pid_longer_than_ours_leaves_no_tail(tmp_path):
    """The takeover empties the lock file: writing our pid over a longer dead one would leave
    its tail ("27570\\n3999" from "2757013999"), and the next refusal would name a pid that
    never held the lock."""
    stale = "9" * 12 + "\n"  # no real pid is this long: longer than any we get
    (tmp_path / LOCK_FILE).write_text(stale)
    with RunLock(str(tmp_path)):
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        with pytest.raises(RunInUseError, match=rf"in use by pid {os.getpid()} \("):
            RunLock(str(tmp_path)).acquire()
