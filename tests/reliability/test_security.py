"""Security: per-session keys, private sockets, no secret on disk, nothing unpickled from a
peer that has not authenticated."""
from __future__ import annotations

import base64
import multiprocessing
import os
import pickle
import socket
import stat
import struct
import tempfile
import threading

import psutil
import pytest

import bigmp
from bigmp import State, connection
from tests.reliability._services import Payloads
from tests.reliability.conftest import ssh_available

PEM_KEY = ("-" * 5 + "BEGIN").encode()   # a PEM block (spelled so as not to be one here)
SYSTEMS = {"testing": {"system": "testing"}, "local": {"system": "local"}}


@pytest.fixture(params=sorted(SYSTEMS))
def options(request):
    return dict(SYSTEMS[request.param])


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """A temporary directory of its own for everything the session creates there."""
    d = tmp_path / "tmp"
    d.mkdir(mode=0o700)
    monkeypatch.setenv("TMPDIR", str(d))
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def _listen_paths(b, m):
    """The unix socket paths that reach machine ``m``: its own, and its relay's if any."""
    sys_ = b.system
    own = sys_.machine_address(m) if hasattr(sys_, "machine_address") else m.addr
    return [own] + ([m.addr] if m.addr != own else [])


def test_random_authkey_per_session(options, figures):
    with bigmp.start(**options) as one, bigmp.start(**options) as two:
        keys = [one.authkey, two.authkey]
        assert keys[0] != keys[1]
        assert all(isinstance(k, bytes) and len(k) == 32 for k in keys)
        assert multiprocessing.current_process().authkey not in keys
        m = one.start(1, services={"P": Payloads()})[0]
        assert m.call("P.echo", 1) == 1
        # The other session's key does not open this session's machine.
        with pytest.raises(multiprocessing.AuthenticationError):
            connection.Client(m.addr, authkey=two.authkey)
    figures.add(f"security: authkey [{options['system']}]",
                "32 random bytes per session; two sessions differ; neither is the process "
                "default key; one session's key is refused by the other's machines")


def test_machines_listen_only_on_private_unix_sockets(options, figures):
    with bigmp.start(**options) as b:
        machines = b.start(2, services={"P": Payloads()})
        checked = []
        for m in machines:
            assert m.wait(State.RUNNING, timeout=30) == State.RUNNING
            for path in _listen_paths(b, m):
                assert isinstance(path, str), f"{m.name} listens on {path!r}, not a unix socket"
                st, dst = os.stat(path), os.stat(os.path.dirname(path))
                assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, \
                    f"{path}: {oct(st.st_mode)}"
                assert stat.S_IMODE(dst.st_mode) == 0o700, f"{path}: dir {oct(dst.st_mode)}"
                assert st.st_uid == dst.st_uid == os.getuid()
                checked.append(path)
            proc = psutil.Process(m.pid)
            inet = [c for c in proc.net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN]
            assert inet == [], f"{m.name} listens on TCP/UDP: {inet}"
    figures.add(f"security: listeners [{options['system']}]",
                f"{len(checked)} sockets for 2 machines: unix only, 0600 in 0700 directories "
                "owned by the user; no TCP/UDP listener on the machines")


def _secret_forms(key: bytes):
    return [key, key.hex().encode(), base64.b64encode(key), base64.urlsafe_b64encode(key)]


def test_no_secret_written_where_others_can_read(options, private_tmp, figures):
    with bigmp.start(**options) as b:
        key = b.authkey
        machines = b.start(2, services={"P": Payloads()})
        for m in machines:
            assert m.call("P.echo", 1) == 1
        created = []
        for root, dirs, files in os.walk(private_tmp):
            for name in dirs + files:
                path = os.path.join(root, name)
                mode = stat.S_IMODE(os.lstat(path).st_mode)
                assert mode & 0o077 == 0, f"{path} is open to others: {oct(mode)}"
                created.append(path)
                if os.path.isfile(path):
                    with open(path, "rb") as f:
                        data = f.read()
                    assert not any(s in data for s in _secret_forms(key)), path
        # Nor in what any user can read about the processes: command lines.
        for pid in [os.getpid()] + [m.pid for m in machines]:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            assert not any(s in cmdline for s in _secret_forms(key))
    left = [os.path.join(r, n) for r, ds, fs in os.walk(private_tmp) for n in ds + fs]
    assert left == [], f"left behind after shutdown: {left}"
    figures.add(f"security: files [{options['system']}]",
                f"{len(created)} entries created in TMPDIR, all mode & 077 == 0, none "
                "holding the authkey; no key in any command line; nothing left after shutdown")


@pytest.mark.skipif(not ssh_available(), reason="openssh-server is not installed")
def test_ssh_writes_no_secret_in_its_cache(sshd, tmp_path, figures):
    cache = tmp_path / "cache"
    with bigmp.start(**sshd.options(n_hosts=1, cache_dir=str(cache))) as b:
        m = b.start(1, services={"P": Payloads()})[0]
        assert m.call("P.echo", 1, timeout=60) == 1
        files = [os.path.join(r, n) for r, _, fs in os.walk(cache) for n in fs]
        assert files, "the code bundle should be cached"
        for path in files:
            with open(path, "rb") as f:
                data = f.read()
            assert not any(s in data for s in _secret_forms(b.authkey)), path
            assert PEM_KEY not in data, path
        with open(f"/proc/{m.pid}/cmdline", "rb") as f:
            assert not any(s in f.read() for s in _secret_forms(b.authkey))
    figures.add("security: files [ssh]",
                f"{len(files)} cached files hold no authkey and no private key; no key in the "
                "machine's command line")


# -- nothing from an unauthenticated peer is unpickled -----------------------------------

class _Mkdir:
    """Unpickling this creates a directory: the proof that something was unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _frames(payload):
    return {
        "a framed pickle at once": struct.pack("!i", len(payload)) + payload,
        "a bare pickle at once": payload,
        "a framed pickle, 8-byte length": struct.pack("!iQ", -1, len(payload)) + payload,
    }


def _attack(path, data, after_challenge=False):
    """Send ``data`` to the listener at ``path`` without authenticating; return once the
    server has hung up (so it has done whatever it was going to do with it)."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(path)
    try:
        if after_challenge:
            s.recv(4096)           # the server's challenge; answer it with the pickle
        s.sendall(data)
        while s.recv(4096):
            pass
    except OSError:
        pass
    finally:
        s.close()


def test_nothing_from_an_unauthenticated_peer_is_unpickled(options, tmp_path, figures):
    control = str(tmp_path / "control")
    pickle.loads(pickle.dumps(_Mkdir(control)))
    assert os.path.isdir(control), "the payload must work when it is unpickled"
    attempts = 0
    with bigmp.start(**options) as b:
        m = b.start(1, services={"P": Payloads()})[0]
        assert m.wait(State.RUNNING, timeout=30) == State.RUNNING
        for target in _listen_paths(b, m):
            for i, after in enumerate((False, True)):
                marker = str(tmp_path / f"pwned-{attempts}")
                for how, data in _frames(pickle.dumps(_Mkdir(marker))).items():
                    _attack(target, data, after_challenge=after)
                    attempts += 1
                assert m.call("P.echo", "still serving") == "still serving"
                assert not os.path.exists(marker), f"unpickled from {target} ({how})"
    assert not [p for p in os.listdir(tmp_path) if p.startswith("pwned")]
    figures.add(f"security: unauthenticated pickles [{options['system']}]",
                f"{attempts} pickles that create a directory when loaded, sent before and in "
                "place of the handshake to the machine (and its relay): none was loaded, the "
                "machine kept serving")


@pytest.mark.parametrize("system", ["testing", "local"])
def test_driver_does_not_unpickle_from_an_impostor(system, tmp_path, figures):
    """A rogue listener at a machine's address cannot get a pickle loaded by the driver."""
    path = str(tmp_path / "impostor.sock")
    marker = str(tmp_path / "pwned-driver")
    payload = pickle.dumps(_Mkdir(marker))
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(8)
    listener.settimeout(30)

    def serve():   # the driver dials once: its call fails at the first message
        conn, _ = listener.accept()
        with conn:
            conn.sendall(struct.pack("!i", len(payload)) + payload)   # as the challenge
            try:
                while conn.recv(4096):
                    pass
            except OSError:
                pass
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    with bigmp.start(system=system) as b:
        fake = b.dial(path)
        with pytest.raises(multiprocessing.AuthenticationError, match="challenge"):
            fake.call("P.echo", 1, timeout=10)
    t.join(30)
    assert not t.is_alive()
    listener.close()
    assert not os.path.exists(marker)
    figures.add(f"security: impostor server [{system}]",
                "a listener answering the driver with a pickle instead of a challenge: the "
                "call fails with an authentication error; nothing was unpickled")
