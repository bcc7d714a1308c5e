"""The executor in a process of its own, beside the replica that speaks HTTP.

In one process, the replica's HTTP and JSON work for the other requests holds the GIL that
the executor needs between its torch operations, and the gated path takes it more often
(every unit's gather and scatter), so a batch waits for the GIL on top of its compute.
``ProcessEngine`` keeps the replica's ``Engine`` (metadata, policies, input preparation)
and sends each batch to a child process that owns the GIL it runs under.

The child is a plain ``python -m serving.model_process`` started with ``subprocess``
(never a fork of the multi-threaded Ray worker), connected by a socket pair; batches and
results travel pickled between these two processes of ours, nothing else speaks on it.
It exits when the socket closes, so it never outlives its replica.
"""
from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Sequence

import torch

from serving.engine import Engine, Request, Result


class ModelProcessError(RuntimeError):
    """The model process is gone, or its stream is broken: the replica must be replaced (503)."""


class BatchError(RuntimeError):
    """One batch failed in a model process that keeps serving: a bug on the model path (500)."""


# Plain pickle, not Connection.send: with torch imported that would hand tensors over as shared
# file descriptors through multiprocessing's resource sharer, which needs a parent it forked.
def _send(conn: Connection, obj) -> None:
    conn.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _receive(conn: Connection):
    return pickle.loads(conn.recv_bytes())


class ProcessEngine(Engine):
    """``Engine`` whose ``run`` executes in a child process: batches run there one after another, and
    callers on several threads may queue the next ones meanwhile."""

    def __init__(self, checkpoint: str | os.PathLike, *, threads: int | None = None, start_timeout_s: float = 120.0):
        super().__init__(checkpoint, threads=threads)  # metadata and request preparation stay here
        parent, child = socket.socketpair()
        self._send_lock, self._turn = threading.Lock(), threading.Condition()
        self._sent = self._received = 0  # batches sent to / answered by the child
        self._broken = ""  # why the child can no longer be used
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "serving.model_process", str(child.fileno()), str(checkpoint), str(threads or 0)],
            pass_fds=(child.fileno(),), cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        child.close()
        self._conn = Connection(parent.detach())
        if not self._conn.poll(start_timeout_s):
            self.close()
            raise ModelProcessError(f"model process did not start within {start_timeout_s:g} s")
        status, detail = self._recv()
        if status != "ready":
            self.close()
            raise ModelProcessError(f"model process failed to load {checkpoint}: {detail}")

    def _recv(self):
        try:
            return _receive(self._conn)
        except (EOFError, OSError):
            raise ModelProcessError(f"model process exited (code {self._proc.poll()})") from None

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def run(self, requests: Sequence[Request]) -> list[Result]:
        """Thread-safe, and pipelined: a batch sent while another runs waits in the socket, so the
        child starts it as soon as it has sent the previous results. Answers come back in the
        order batches were sent; each caller takes its own."""
        with self._send_lock:
            if self._broken:
                raise ModelProcessError(self._broken)
            ticket = self._sent
            self._sent += 1
            try:
                _send(self._conn, list(requests))
            except OSError:
                self._break(f"model process exited (code {self._proc.poll()})")
            except BaseException as err:  # half a message may be in the socket: no later answer can be trusted
                self._break(f"sending a batch to the model process failed ({type(err).__name__}: {err})")
        with self._turn:
            while self._received != ticket and not self._broken:
                self._turn.wait()
            if self._broken:
                raise ModelProcessError(self._broken)
            try:
                status, payload = self._recv()
            except ModelProcessError as err:
                self._break(str(err))
            self._received += 1
            self._turn.notify_all()
        if status != "ok":  # the child is alive and serving: a 500 for this batch, not a restart
            raise BatchError(f"model process failed on a batch: {payload}")
        results, seconds = payload
        self.compute_s += seconds  # the child's own time on the batch, not the hand-off's
        return results

    def _break(self, reason: str) -> None:
        """The child is gone: every waiting and later call fails with ``reason``."""
        with self._turn:
            self._broken = reason
            self._turn.notify_all()
        raise ModelProcessError(reason)

    def close(self) -> None:
        self._conn.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()


def main(argv: list[str]) -> int:
    fd, checkpoint, threads = int(argv[0]), argv[1], int(argv[2])
    conn = Connection(fd)
    try:
        engine = Engine(checkpoint, threads=threads or None)
    except Exception as err:  # reported to the replica, which raises it
        _send(conn, ("error", f"{type(err).__name__}: {err}"))
        return 1
    # the process's CPU time per torch thread: it does nothing but run batches, and CPU time leaves out
    # the moments the OS gave its cores to the HTTP side, which wall time would count as model work
    threads = torch.get_num_threads()
    engine.clock = lambda: time.process_time() / threads
    _send(conn, ("ready", None))
    while True:
        try:
            requests = _receive(conn)
        except (EOFError, OSError):  # the replica is gone
            return 0
        try:
            before = engine.compute_s
            results = engine.run(requests)
            _send(conn, ("ok", (results, engine.compute_s - before)))
        except Exception as err:  # a bug in the model path: the replica answers 500 and logs it
            _send(conn, ("error", f"{type(err).__name__}: {err}"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
