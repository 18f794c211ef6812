"""edge_qmul/threads.py: the kernels give up a thread while another process keeps a CPU busy, and
never go above the thread count they were given (benchmarks/contention.py measures why)."""
from __future__ import annotations

import subprocess
import sys
import time

import numba
import pytest

from edge_qmul import threads


def test_threads_for_gives_up_every_cpu_others_hold_more_than_half():
    assert threads.threads_for(0.0, 2) == 2
    assert threads.threads_for(0.49, 2) == 2
    assert threads.threads_for(0.51, 2) == 1
    assert threads.threads_for(1.9, 2) == 1
    assert threads.threads_for(5.0, 2) == 1
    assert threads.threads_for(1.2, 4) == 3
    assert threads.threads_for(0.0, 1) == 1


def _look_twice():
    threads._state.__dict__.pop("next", None)
    threads.update()
    time.sleep(threads.PERIOD + 0.2)
    threads.update()


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="one CPU: nothing to give up")
def test_one_thread_beside_a_spinning_process_and_the_ceiling_kept(monkeypatch):
    monkeypatch.setenv("EDGE_QMUL_THREADS", "auto")
    before = numba.get_num_threads()
    threads._state.__dict__.clear()
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        numba.set_num_threads(2)
        time.sleep(0.3)
        _look_twice()
        assert numba.get_num_threads() == 1  # a spinner holds a whole CPU
        threads.set_threads(1)  # someone sets 1: the ceiling
        spinner.kill()
        spinner.wait()
        _look_twice()
        assert numba.get_num_threads() == 1
    finally:
        spinner.kill()
        numba.set_num_threads(before)
        threads._state.__dict__.clear()


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="one CPU: nothing to give up")
def test_a_count_set_by_numba_itself_is_the_new_ceiling(monkeypatch):
    monkeypatch.setenv("EDGE_QMUL_THREADS", "auto")
    before = numba.get_num_threads()
    threads._state.__dict__.clear()
    try:
        threads.set_threads(2)
        numba.set_num_threads(1)  # not the count the rule chose (2): seen as the new ceiling
        _look_twice()
        assert numba.get_num_threads() == 1
    finally:
        numba.set_num_threads(before)
        threads._state.__dict__.clear()


def test_fixed_leaves_the_thread_count_alone(monkeypatch):
    monkeypatch.setenv("EDGE_QMUL_THREADS", "fixed")
    threads._state.__dict__.clear()
    before = numba.get_num_threads()
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        _look_twice()
        assert numba.get_num_threads() == before
    finally:
        spinner.kill()
        threads._state.__dict__.clear()
