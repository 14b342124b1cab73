"""Fixtures for the BaseManager / SyncManager compatibility suite.

Every test runs twice: once against the stdlib class (which proves the test
itself is right) and once against the bigmp class.  bigmp is imported lazily
so the stdlib half runs even before bigmp exists; set
BIGMP_COMPAT_REQUIRE=1 to turn "bigmp missing" skips into failures.
"""

import multiprocessing
import os
from multiprocessing.managers import BaseManager, SyncManager

import pytest

from . import _compat_helpers as H

FLAVOURS = ["stdlib", "bigmp"]


def pytest_configure(config):
    if not config.pluginmanager.hasplugin("timeout"):
        config.addinivalue_line("markers", "timeout(seconds): per-test timeout (pytest-timeout)")


@pytest.fixture(scope="package", autouse=True)
def _loopback_tcp_nodelay():
    """Set TCP_NODELAY on multiprocessing.connection's TCP client sockets.

    The stdlib manager protocol ends the client's authentication handshake
    with a write immediately followed by the request write; with Nagle's
    algorithm and the peer's delayed ACK every new connection then stalls
    ~40 ms on loopback, which would make the stdlib half of this suite several
    times slower.  The option changes timing only, never the protocol or the
    semantics under test.  Package-scoped, so tests outside tests/compat never
    see the patch.  Set BIGMP_COMPAT_KEEP_NAGLE=1 to disable.
    """
    import socket
    import multiprocessing.connection as mpc

    if os.environ.get("BIGMP_COMPAT_KEEP_NAGLE"):
        yield
        return
    original = mpc.SocketClient

    def SocketClient(address):
        family = mpc.address_type(address)
        if family != "AF_INET":
            return original(address)
        with socket.socket(socket.AF_INET) as s:
            s.setblocking(True)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.connect(address)
            return mpc.Connection(s.detach())

    mpc.SocketClient = SocketClient
    try:
        yield
    finally:
        mpc.SocketClient = original


def _bigmp_attr(name):
    bigmp = pytest.importorskip("bigmp")
    cls = getattr(bigmp, name, None)
    if cls is None:
        msg = "bigmp.%s is not available (yet)" % name
        if os.environ.get("BIGMP_COMPAT_REQUIRE"):
            pytest.fail(msg)
        pytest.skip(msg)
    return cls


@pytest.fixture(params=FLAVOURS)
def flavour(request):
    """'stdlib' or 'bigmp' (skipped while bigmp is not importable)."""
    if request.param == "bigmp":
        _bigmp_attr("BigManager")
        _bigmp_attr("BigSyncManager")
    return request.param


@pytest.fixture
def base_cls(flavour):
    """multiprocessing.managers.BaseManager or bigmp.BigManager."""
    return BaseManager if flavour == "stdlib" else _bigmp_attr("BigManager")


@pytest.fixture
def sync_cls(flavour):
    """multiprocessing.managers.SyncManager or bigmp.BigSyncManager."""
    return SyncManager if flavour == "stdlib" else _bigmp_attr("BigSyncManager")


@pytest.fixture
def compat_cls(flavour):
    """Module-level subclass of base_cls with every compat typeid registered."""
    return H.compat_manager_class(flavour)


@pytest.fixture
def client_cls(flavour):
    """Module-level subclass of base_cls registering typeids without callables."""
    return H.queue_client_class(flavour)


@pytest.fixture
def make_manager():
    """Factory creating (and by default starting) managers; all are shut down."""
    made = []

    def make(cls, *, start=True, address=H.LOOPBACK, authkey=H.AUTHKEY, **kwargs):
        manager = cls(address=address, authkey=authkey, **kwargs)
        made.append(manager)
        if start:
            manager.start()
        return manager

    yield make
    for manager in reversed(made):
        shutdown = getattr(manager, "shutdown", None)
        if shutdown is not None:
            try:
                shutdown()
            except Exception:
                pass


@pytest.fixture
def manager(make_manager, compat_cls):
    """A started compat BaseManager (loopback, explicit authkey)."""
    return make_manager(compat_cls)


@pytest.fixture
def sm(make_manager, sync_cls):
    """A started SyncManager / BigSyncManager (loopback, explicit authkey)."""
    return make_manager(sync_cls)


@pytest.fixture
def sm_default(make_manager, sync_cls):
    """A started SyncManager with the default (process) authkey.

    The stdlib only supports proxies nested inside managed objects (and
    proxies handed to the server, e.g. Condition(lock_proxy)) when the manager
    uses the process authkey: proxies rebuilt from the server's replies do
    not carry the manager's authkey.
    """
    return make_manager(sync_cls, authkey=None)


@pytest.fixture(params=["fork", "spawn"])
def child_ctx(request):
    """Start-method context for child processes that receive proxies."""
    return multiprocessing.get_context(request.param)


@pytest.fixture
def fork_ctx():
    return multiprocessing.get_context("fork")


@pytest.fixture
def closed_port():
    """A loopback port that was bound and closed again (nothing listens)."""
    import socket

    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
