"""A single-threaded fork server, so that forking machines is safe in a threaded driver.

The driver runs threads (keepalives, output, calls); a child forked from it could inherit a
lock some thread held. The fork server is forked once, when the session starts, and is never
threaded, so every machine forked from it starts clean. The driver hands it each machine's
three channel fds over a unix socket (SCM_RIGHTS) and learns the pid back; the fork server
reaps children and reports how each exited. It exits when the driver's socket closes.
"""
from __future__ import annotations

import gc
import os
import pickle
import select
import signal
import socket
import struct
import threading
import time
from typing import Callable, Dict, List

__all__ = ["ForkServer"]

_HDR = struct.Struct("!I")


def _send_msg(sock: socket.socket, obj) -> None:
    data = pickle.dumps(obj)
    sock.sendall(_HDR.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def _recv_msg(sock: socket.socket):
    n, = _HDR.unpack(_recv_exact(sock, _HDR.size))
    return pickle.loads(_recv_exact(sock, n))


def _child(fds: List[int], sock: socket.socket, wake_r: int, wake_w: int) -> None:
    """In the forked machine: wire fds 0, 1, 2 and become a worker."""
    try:
        sock.close()
        os.close(wake_r)
        os.close(wake_w)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setpgid(0, 0)  # Ctrl-C in the driver's terminal is for the driver alone
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        from .. import worker
        worker.main()
    finally:
        os._exit(70)


def _max_fd() -> int:
    try:
        return max(int(name) for name in os.listdir("/proc/self/fd")) + 1
    except (OSError, ValueError):
        return os.sysconf("SC_OPEN_MAX")


def _serve(sock: socket.socket) -> None:
    """The fork server's loop (never returns)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Machines must not inherit the driver's files and sockets (a listening socket kept
    # open in a machine keeps its port bound; a pipe kept open hides EOF from its peer).
    # Objects of the driver that own those fds are never freed here: their frames are
    # frozen in this process and the cycle collector is off.
    gc.disable()
    keep = sock.fileno()
    os.closerange(3, keep)
    os.closerange(keep + 1, _max_fd())
    from .. import worker  # noqa: F401  imported once here, not in every machine
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *a: None)
    children = set()
    try:
        while True:
            r, _, _ = select.select([sock, wake_r], [], [])
            if wake_r in r:
                os.read(wake_r, 4096)
            while children:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                children.discard(pid)
                _send_msg(sock, ("exit", pid, os.waitstatus_to_exitcode(status)))
            if sock in r:
                try:
                    msg, fds, _, _ = socket.recv_fds(sock, 4096, 3)
                except OSError:
                    break
                if not msg:
                    break
                pid = os.fork()
                if pid == 0:
                    _child(fds, sock, wake_r, wake_w)
                for fd in fds:
                    os.close(fd)
                children.add(pid)
                _send_msg(sock, ("pid", pid))
    finally:
        os._exit(0)


class ForkServer:
    """Driver-side handle of the fork server."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:
            ours.close()
            try:
                _serve(theirs)
            finally:
                os._exit(0)
        theirs.close()
        self.pid = pid
        self._sock = ours
        self._lock = threading.Lock()
        self._pids: List[int] = []
        self._pid_ready = threading.Condition()
        self._exits: Dict[int, Callable[[int], None]] = {}
        self._early: Dict[int, int] = {}
        self._closed = False
        threading.Thread(target=self._read, name="bigmp-forkserver", daemon=True).start()

    def fork(self, fds: List[int], on_exit: Callable[[int], None]) -> int:
        """Fork a machine with ``fds`` as its 0, 1, 2; ``on_exit(code)`` runs when it exits."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the fork server has stopped")
            socket.send_fds(self._sock, [b"f"], fds)
            with self._pid_ready:
                while not self._pids and not self._closed:
                    self._pid_ready.wait()
                if not self._pids:
                    raise RuntimeError("the fork server exited")
                pid = self._pids.pop(0)
                early = self._early.pop(pid, None)
                if early is None:
                    self._exits[pid] = on_exit
        if early is not None:
            on_exit(early)
        return pid

    def _read(self) -> None:
        try:
            while True:
                msg = _recv_msg(self._sock)
                if msg[0] == "pid":
                    with self._pid_ready:
                        self._pids.append(msg[1])
                        self._pid_ready.notify_all()
                elif msg[0] == "exit":
                    _, pid, code = msg
                    with self._pid_ready:
                        fn = self._exits.pop(pid, None)
                        if fn is None:
                            self._early[pid] = code
                    if fn is not None:
                        fn(code)
        except (EOFError, OSError):
            pass
        finally:
            with self._pid_ready:
                self._closed = True
                self._pid_ready.notify_all()

    def close(self) -> None:
        """Stop the fork server (its machines keep running until their own channels close)."""
        self._closed = True
        try:
            # shutdown, not just close: the reader thread blocked in recv holds the socket
            # open, and the fork server would never see EOF.
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        deadline = time.monotonic() + 5.0
        while True:
            try:
                pid, _ = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return
            if pid or time.monotonic() > deadline:
                break
            time.sleep(0.005)
        if not pid:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)

