"""Helpers for benchmarks/bench.py: services, pinning, baseline servers and optional peers.

Everything a child process or a bigmp machine has to run lives here at module level, so
it is pickled by reference. Traffic stays on loopback (127.0.0.1) or unix sockets.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import struct
import time
from multiprocessing import connection as mpc
from multiprocessing.managers import BaseManager

FORK = mp.get_context("fork")
_LEN = struct.Struct("!Q")


# -- what the servers serve ---------------------------------------------------------------

class Echo:
    """The service (bigmp) and the registered class (managers): echo and no-op."""

    def echo(self, x):
        return x

    def noop(self):
        return None


class StdManager(BaseManager):
    pass


StdManager.register("Echo", Echo)


def big_manager_class():
    import bigmp

    class BigEchoManager(bigmp.BigManager):
        pass

    BigEchoManager.register("Echo", Echo)
    return BigEchoManager


# -- CPU pinning (taskset semantics, for every thread of a process) ----------------------

def pin(pid: int, cpus) -> None:
    """Set the affinity of every thread of ``pid``; threads it starts later inherit it."""
    cpus = set(cpus)
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        tids = [str(pid)]
    for tid in tids:
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass   # a thread that ended meanwhile


def process_tree(pid: int) -> list:
    """``pid`` and all its descendants (bigmp machines hang off a fork server)."""
    try:
        import psutil
        p = psutil.Process(pid)
        return [pid] + [c.pid for c in p.children(recursive=True)]
    except Exception:
        return [pid]


def _hang_up(fd: int) -> None:
    """shutdown(2) a socket: the peer sees EOF even if a forked process holds a copy of it."""
    s = socket.socket(fileno=os.dup(fd))
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        s.close()


# -- raw multiprocessing.connection echo (case 1) ----------------------------------------

def _mpc_echo_server(reply, cpus):
    if cpus:
        pin(os.getpid(), cpus)
    with mpc.Listener() as listener:           # AF_UNIX, like the managers in case 1
        reply.send(listener.address)
        reply.close()
        conn = listener.accept()
        try:
            while True:
                conn.send(conn.recv())
        except (EOFError, OSError):
            pass
        finally:
            conn.close()


class MpcEcho:
    """A child process echoing ``multiprocessing.connection`` send/recv objects."""

    def __init__(self, cpus=None):
        r, w = FORK.Pipe(duplex=False)
        self.proc = FORK.Process(target=_mpc_echo_server, args=(w, cpus), daemon=True)
        self.proc.start()
        w.close()
        self.conn = mpc.Client(r.recv())
        r.close()

    def call(self, x):
        self.conn.send(x)
        return self.conn.recv()

    def close(self):
        _hang_up(self.conn.fileno())
        self.conn.close()
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


# -- raw socket bulk echo (case 3) --------------------------------------------------------

def _recv_exact_into(sock, view):
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if not n:
            raise EOFError
        got += n


def _socket_echo_server(family, reply):
    srv = socket.socket(family)
    if family == socket.AF_UNIX:
        import tempfile
        d = tempfile.mkdtemp(prefix="bench-")
        addr = os.path.join(d, "sock")
    else:
        addr = ("127.0.0.1", 0)
    srv.bind(addr)
    srv.listen(1)
    reply.send(srv.getsockname())
    reply.close()
    conn, _ = srv.accept()
    srv.close()
    if family == socket.AF_UNIX:
        os.unlink(addr)
        os.rmdir(os.path.dirname(addr))
    buf = bytearray()
    hdr = bytearray(_LEN.size)
    try:
        while True:
            _recv_exact_into(conn, memoryview(hdr))
            n, = _LEN.unpack(hdr)
            if len(buf) < n:
                buf = bytearray(n)
            view = memoryview(buf)[:n]
            _recv_exact_into(conn, view)
            conn.sendall(view)
    except (EOFError, OSError):
        pass
    finally:
        conn.close()


class SocketEcho:
    """A child process echoing length-prefixed blobs over a plain socket."""

    def __init__(self, family=socket.AF_INET):
        r, w = FORK.Pipe(duplex=False)
        self.proc = FORK.Process(target=_socket_echo_server, args=(family, w), daemon=True)
        self.proc.start()
        w.close()
        addr = r.recv()
        r.close()
        self.sock = socket.socket(family)
        self.sock.connect(addr)
        if family == socket.AF_INET:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.back = bytearray()

    def echo(self, data) -> int:
        if len(self.back) < len(data):
            self.back = bytearray(len(data))
        self.sock.sendall(_LEN.pack(len(data)))
        self.sock.sendall(data)
        _recv_exact_into(self.sock, memoryview(self.back)[:len(data)])
        return len(data)

    def close(self):
        _hang_up(self.sock.fileno())
        self.sock.close()
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


# -- process start baseline (case 4) -------------------------------------------------------

def _ping_back(w):
    w.send_bytes(b"!")
    w.close()


def fork_and_ping(n: int) -> float:
    """Seconds to start ``n`` fork-context processes and hear from each over a pipe."""
    t0 = time.perf_counter()
    procs, readers = [], []
    for _ in range(n):
        r, w = FORK.Pipe(duplex=False)
        p = FORK.Process(target=_ping_back, args=(w,))
        p.start()
        w.close()
        procs.append(p)
        readers.append(r)
    for r in readers:
        r.recv_bytes()
    elapsed = time.perf_counter() - t0
    for r in readers:
        r.close()
    for p in procs:
        p.join()
    return elapsed


# -- optional peers (case 6): only if already installed -----------------------------------

def _pyro_server(reply, cpus):
    import Pyro5.api
    if cpus:
        pin(os.getpid(), cpus)
    daemon = Pyro5.api.Daemon(host="127.0.0.1")
    uri = daemon.register(Pyro5.api.expose(Echo))
    reply.send(str(uri))
    reply.close()
    daemon.requestLoop()


def _rpyc_server(reply, cpus):
    import rpyc
    from rpyc.utils.server import OneShotServer
    if cpus:
        pin(os.getpid(), cpus)

    class EchoService(rpyc.Service):
        def exposed_echo(self, x):
            return x

    server = OneShotServer(EchoService, hostname="127.0.0.1", port=0)
    reply.send(server.port)
    reply.close()
    server.start()


def peer_callers(cpus):
    """Yield (name, call(x), close()) for each installed peer; skip the rest silently."""
    import importlib.util
    if importlib.util.find_spec("Pyro5") is not None:
        import Pyro5.api
        r, w = FORK.Pipe(duplex=False)
        p = FORK.Process(target=_pyro_server, args=(w, cpus), daemon=True)
        p.start()
        w.close()
        proxy = Pyro5.api.Proxy(r.recv())
        yield "Pyro5 proxy", proxy.echo, lambda: (proxy._pyroRelease(), p.kill(), p.join())
    if importlib.util.find_spec("rpyc") is not None:
        import rpyc
        r, w = FORK.Pipe(duplex=False)
        p = FORK.Process(target=_rpyc_server, args=(w, cpus), daemon=True)
        p.start()
        w.close()
        conn = rpyc.connect("127.0.0.1", r.recv())
        yield "RPyC root.echo", conn.root.echo, lambda: (conn.close(), p.kill(), p.join())


def ray_caller():
    """(call, close) for a Ray actor echo, or None when ray is not installed."""
    import importlib.util
    if importlib.util.find_spec("ray") is None:
        return None
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    actor = ray.remote(Echo).remote()
    return (lambda x: ray.get(actor.echo.remote(x))), ray.shutdown
