"""The child process that trainings and offline evaluations run in (trainer/isolation.py)."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest

from trainer.isolation import ChildDied, ChildProcess, Inline


def test_calls_run_in_another_process_and_return_their_results() -> None:
    with ChildProcess() as child:
        assert child.call(os.getpid) == child.pid != os.getpid()
        assert child.call(sorted, [3, 1, 2], reverse=True) == [3, 2, 1]
        # One process serves every call of a pass (the model files stay in its page cache).
        assert child.call(os.getpid) == child.pid
    assert Inline().call(os.getpid) == os.getpid()


def test_an_exception_in_the_child_is_raised_here_with_its_type_and_message() -> None:
    with ChildProcess() as child:
        with pytest.raises(ValueError, match="invalid literal"):
            child.call(int, "not a number")
        assert child.call(int, "7") == 7  # the child survives a failed call


def test_the_thread_count_the_parent_chose_is_kept() -> None:
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ChildProcess() as child:
            assert child.call(torch.get_num_threads) == 1
    finally:
        torch.set_num_threads(before)


def test_a_child_that_dies_mid_call_fails_the_call_instead_of_hanging() -> None:
    with ChildProcess() as child:
        with pytest.raises(ChildDied, match="exited with code 3"):
            child.call(os._exit, 3)
        with pytest.raises(ChildDied):
            child.call(os.getpid)


def test_kill_stops_a_running_call_at_once() -> None:
    child = ChildProcess()
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            child.call(time.sleep, 60)
        except BaseException as exc:
            outcome.append(exc)

    caller = threading.Thread(target=run)
    caller.start()
    time.sleep(1.0)
    started = time.monotonic()
    child.kill()
    caller.join(10)
    child.close()
    assert not caller.is_alive() and time.monotonic() - started < 5
    assert len(outcome) == 1 and isinstance(outcome[0], ChildDied)
    assert "stopped" in str(outcome[0])


def test_an_answer_that_cannot_be_pickled_comes_back_as_an_error() -> None:
    with ChildProcess() as child:
        with pytest.raises(RuntimeError, match=r"(?i)pickle"):
            child.call(threading.Lock)
        assert child.call(sys.getrecursionlimit) > 0
