"""Helpers for benchmarks/bench.py: services, pinning, baseline servers and optional peers.

Everything a child process or a bigmp machine has to run lives here at module level, so
it is pickled by reference. Traffic stays on loopback (127.0.0.1) or unix sockets.
"""
from __future__ import annotations

import importlib.util
import json
import multiprocessing as mp
import os
import signal
import socket
import struct
import subprocess
import sys
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
        self.proc, addr = _serve_in_child(_mpc_echo_server, cpus)
        self.conn = mpc.Client(addr)

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


def _socket_echo_server(reply, family):
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
    _echo_until_eof(conn)


def _echo_until_eof(conn):
    """Echo length-prefixed blobs on ``conn`` (a socket or an SSLSocket), one reused
    buffer, until the peer hangs up."""
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
        self.proc, addr = _serve_in_child(_socket_echo_server, family)
        self.sock = socket.socket(family)
        self.sock.connect(addr)
        if family == socket.AF_INET:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.back = bytearray()

    def echo(self, data, fresh: bool = False) -> int:
        """Send ``data``, read it back into a reused buffer (``fresh``: into a new
        bytearray each time, as an API that hands the caller a new object must)."""
        if fresh or len(self.back) < len(data):
            self.back = bytearray(len(data))
        if len(data) < 65536:
            self.sock.sendall(_LEN.pack(len(data)) + data)   # one segment (one TLS record)
        else:
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


# -- raw TLS echo over TCP loopback (context for case 7) ------------------------------------

def _tls_echo_server(reply, creds):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    reply.send(srv.getsockname())
    reply.close()
    raw, _ = srv.accept()
    srv.close()
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _echo_until_eof(creds.server().wrap_socket(raw, server_side=True))


class TLSEcho(SocketEcho):
    """A child process echoing length-prefixed blobs over mutual TLS (the ssl module,
    certificates from a bigmp SessionCA, as bigmp's SSH machines use) on TCP loopback."""

    def __init__(self):
        from bigmp import tls
        ca = tls.SessionCA("bench")
        server, client = ca.issue("server"), ca.issue("client")
        self.proc, addr = _serve_in_child(_tls_echo_server, server)
        raw = socket.create_connection(addr)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = client.client().wrap_socket(raw)
        self.back = bytearray()

    def call(self, x):
        return self.echo(x)


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
#
# Every peer is a real server in a process of its own, on 127.0.0.1 only. None of them is
# imported unless installed (`pip install -e '.[bench]'`); the bench runs without them.

def installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _stop(proc) -> None:
    if proc.is_alive():
        proc.kill()
    proc.join(5)


def _serve_in_child(target, *args, timeout=30.0):
    """Fork ``target(reply, *args)``; return (process, the address it replied with)."""
    r, w = FORK.Pipe(duplex=False)
    proc = FORK.Process(target=target, args=(w,) + args, daemon=True)
    proc.start()
    w.close()
    try:
        if not r.poll(timeout):
            raise TimeoutError(f"{target.__name__} sent no address in {timeout:g} s")
        return proc, r.recv()          # EOFError if the server died first
    except BaseException:
        _stop(proc)
        raise
    finally:
        r.close()


def _pyro_server(reply, cpus):
    import Pyro5.api
    if cpus:
        pin(os.getpid(), cpus)         # before the daemon's threads start: they inherit it
    daemon = Pyro5.api.Daemon(host="127.0.0.1", port=0)
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

    # No registrar (auto_register=False: no UDP broadcast). The constructor only binds;
    # start() would listen, so listen first: the client may connect before start() runs.
    server = OneShotServer(EchoService, hostname="127.0.0.1", port=0, auto_register=False)
    server.listener.listen(1)
    reply.send(server.port)
    reply.close()
    server.start()                     # serves the one connection, returns when it closes


def _pyro_caller(cpus):
    import Pyro5
    import Pyro5.api
    proc, uri = _serve_in_child(_pyro_server, cpus)
    try:
        proxy = Pyro5.api.Proxy(uri)   # serpent serializer (the default)
        proxy._pyroBind()
    except BaseException:
        _stop(proc)
        raise

    def close():
        proxy._pyroRelease()
        _stop(proc)
    return "Pyro5 proxy", Pyro5.__version__, proxy.echo, close


def _rpyc_caller(cpus):
    import rpyc
    proc, port = _serve_in_child(_rpyc_server, cpus)
    try:
        conn = rpyc.connect("127.0.0.1", port)
        echo = conn.root.echo          # the netref is fetched once, off the clock
    except BaseException:
        _stop(proc)
        raise

    def close():
        conn.close()
        proc.join(5)                   # the one-shot server ends with its connection
        _stop(proc)
    return "RPyC root.echo", rpyc.__version__, echo, close


def peer_callers(cpus):
    """Yield (name, version, call(x), close()) for each installed peer; skip the rest."""
    for module, start in (("Pyro5", _pyro_caller), ("rpyc", _rpyc_caller)):
        if installed(module):
            yield start(cpus)


# Ray's node address: with this off, Ray takes the loopback address for its node (as on
# macOS); on Linux it would otherwise pick the address of the outward interface, even when
# given _node_ip_address="127.0.0.1". No usage reports either.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def ray_samples(calls: int, reps: int, timeout: float = 150.0):
    """Ray actor echo round trips, microseconds per call, one sample per repeat (unpinned).

    The driver runs in a fresh interpreter of its own session, so Ray's threads, signal
    handlers and processes never enter the bench process. Returns None when ray is not
    installed, else a dict with ``samples``, ``version``, ``init_s``, ``shutdown_s``.
    Raises if the driver fails or if any Ray process outlived ``ray.shutdown()``.
    """
    if not installed("ray"):
        return None
    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys; sys.path.insert(0, {here!r}); import _baselines; "
            f"_baselines._ray_driver({int(calls)}, {int(reps)})")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, **RAY_ENV})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)   # the driver and any Ray process in its group
        proc.communicate()
        raise RuntimeError(f"the Ray driver took more than {timeout:g} s") from None
    last = out.strip().splitlines()[-1:] if out else []
    if proc.returncode != 0 or not last:
        raise RuntimeError(f"the Ray driver failed (exit {proc.returncode}):\n{err[-4000:]}")
    result = json.loads(last[0])
    if result["leftover"]:
        raise RuntimeError(f"Ray processes outlived ray.shutdown(): {result['leftover']}")
    return result


def _ray_driver(calls: int, reps: int) -> None:
    """Runs in the child of ray_samples(): a local-only Ray on 2 CPUs, one actor, a JSON line."""
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    import gc

    import psutil
    import ray
    from ray._private import ray_constants
    ray_constants.ENABLE_RAY_CLUSTER = False     # in case ray was imported before the env

    class RayEcho:                     # local, so pickled by value: workers need no sys.path
        def echo(self, x):
            return x

    samples, leftover, node_ip = [], [], None
    try:
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        init_s = time.perf_counter() - t0
        node_ip = ray.util.get_node_ip_address()
        if node_ip != "127.0.0.1":
            raise RuntimeError(f"Ray chose node address {node_ip}, not 127.0.0.1")
        actor = ray.remote(RayEcho).remote()
        ray.get(actor.echo.remote(1))              # waits for the worker process to start
        for _ in range(min(calls, 100)):           # warm up
            ray.get(actor.echo.remote(1))
        for _ in range(reps):
            gc.collect()
            t = time.perf_counter()
            for _ in range(calls):
                ray.get(actor.echo.remote(1))
            samples.append((time.perf_counter() - t) / calls * 1e6)
    finally:
        kids = psutil.Process().children(recursive=True)
        t = time.perf_counter()
        ray.shutdown()
        shutdown_s = time.perf_counter() - t
        _, alive = psutil.wait_procs(kids, timeout=10)
        for k in alive:
            try:
                leftover.append(f"{k.pid} {' '.join(k.cmdline()[:2])}")
                k.kill()
            except psutil.Error:
                pass
    print(json.dumps({"samples": samples, "version": ray.__version__, "init_s": init_s,
                      "shutdown_s": shutdown_s, "node_ip": node_ip, "leftover": leftover}),
          flush=True)
