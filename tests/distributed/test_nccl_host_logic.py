"""The host-side logic of :class:`pymglu.distributed.nccl.NCCLCommunicator` without NCCL or a GPU: the
bounded poll that may leave the latest replays in flight, and the abort that drops the registered CUDA
graphs only once ``ncclCommAbort`` runs on its own thread. A stand-in replaces the NCCL communicator
(``comm``) and the device events (objects with ``done``)."""
from __future__ import annotations

import threading
import time

import pytest

from pymglu.distributed.comm import DistributedTimeoutError
from pymglu.distributed.nccl import NCCLCommunicator


class _Event:
    def __init__(self, done: bool) -> None:
        self.done = done


class _Nccl:
    """Stands in for cupy.cuda.nccl: ``NcclError`` and a communicator whose abort is recorded."""

    class NcclError(Exception):
        pass

    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = []

    def check_async_error(self) -> None:
        pass

    def abort(self) -> None:
        self.log.append(("abort begins", threading.current_thread().name))
        time.sleep(0.3)  # ncclCommAbort: raises its flag, then waits for the graphs to be destroyed
        self.log.append(("abort returns", threading.current_thread().name))


def _communicator(timeout: float = 0.2) -> tuple[NCCLCommunicator, _Nccl]:
    comm = object.__new__(NCCLCommunicator)  # no NCCL init: only the host-side state the methods use
    fake = _Nccl()
    comm.comm, comm._nccl, comm.rank, comm.timeout = fake, fake, 0, timeout
    comm._aborted, comm._error, comm._watched, comm._graph_releases = False, None, [], []
    return comm, fake


def test_the_poll_leaves_the_latest_events_in_flight():
    comm, _ = _communicator()
    done, running = _Event(True), _Event(False)
    comm._watched = [done, done, running]
    comm.check_pending(in_flight=1)  # the running event is the latest: left alone, no wait
    assert comm._watched == [running]
    running.done = True
    comm.check_pending()
    assert comm._watched == []


def test_a_running_event_older_than_the_allowance_times_out_and_aborts():
    comm, fake = _communicator(timeout=0.2)
    comm._watched = [_Event(False), _Event(True)]
    start = time.monotonic()
    with pytest.raises(DistributedTimeoutError, match=r"no answer from the other ranks after 0.2 s"):
        comm.check_pending(in_flight=1)
    assert 0.2 <= time.monotonic() - start < 5.0
    assert [what for what, _ in fake.log] == ["abort begins", "abort returns"]
    with pytest.raises(DistributedTimeoutError):  # the error sticks: every later call raises it
        comm.check_pending()


def test_the_abort_drops_the_graphs_after_ncclcommabort_has_begun_on_its_thread():
    comm, fake = _communicator()

    class Step:  # a graph step: its release is registered as a bound method (held weakly)
        def __init__(self) -> None:
            self.graph = "graph"

        def drop(self) -> None:
            fake.log.append(("graph dropped", threading.current_thread().name))
            self.graph = None

    step, gone = Step(), Step()
    comm.register_graph_release(step.drop)
    comm.register_graph_release(gone.drop)
    del gone  # a graph step that no longer exists is skipped
    comm._abort_nccl()
    assert step.graph is None
    events = [what for what, _ in fake.log]
    assert events == ["abort begins", "graph dropped", "abort returns"]
    threads = dict(fake.log)
    assert threads["abort begins"] != threads["graph dropped"] == threading.main_thread().name
    comm._abort_nccl()  # once only
    assert len(fake.log) == 3


def test_without_graphs_the_abort_runs_on_the_calling_thread():
    comm, fake = _communicator()
    comm._abort_nccl()
    assert fake.log == [("abort begins", threading.main_thread().name), ("abort returns", threading.main_thread().name)]
