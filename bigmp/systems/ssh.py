"""SSH: machines on other hosts, launched over paramiko, talking mutual TLS.

Hosts are ``[user@]host[:port][?python=PATH&machines=N]`` or an alias of ``~/.ssh/config``
(HostName, User, Port, IdentityFile honoured). One SSH connection per host carries one
exec channel per machine; the channel's stdin, stdout and stderr are the worker's three
channels (see :mod:`bigmp.worker`), so the machine exits when the SSH session closes.

A launch is one exec: the bootstrap (:mod:`bigmp.systems.ssh_bootstrap`, standard library
only) checks Python and the compiled dependencies, receives the code bundle if the host
does not have it cached yet (see :mod:`bigmp.codeship`), and becomes the worker. Host keys
are checked against known_hosts; an unknown host is an error unless
``ssh_accept_new_hosts`` is set. Machines listen with TLS on the address the SSH
connection reached (see :mod:`bigmp.tls`).
"""
from __future__ import annotations

import getpass
import json
import logging
import os
import shlex
import socket
import threading
import time
from typing import Any, Dict, List, Optional
from urllib.parse import parse_qs

import paramiko

from .. import codeship, tls
from ..errors import StartError
from .base import Launch, System, encode_config

log = logging.getLogger("bigmp.ssh")

__all__ = ["SSHSystem", "HostSpec", "parse_host"]

_BOOTSTRAP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ssh_bootstrap.py")
# Driver variables that describe the driver's own login, not the program: a remote
# machine keeps its own.
_HOST_VARS = {"HOME", "USER", "LOGNAME", "SHELL", "PWD", "OLDPWD", "MAIL", "TERM",
              "HOSTNAME", "DISPLAY", "SSH_CONNECTION", "SSH_CLIENT", "SSH_TTY",
              "SSH_AUTH_SOCK", "TMPDIR", "XDG_RUNTIME_DIR", "XDG_SESSION_ID", "PYTHONPATH",
              "VIRTUAL_ENV", "PATH", "BIGMP_CODE_DIR"}


class HostSpec:
    """One host: where to connect and how to run machines there."""

    def __init__(self, label: str, hostname: str, port: int, user: str,
                 identities: List[str], python: str, machines: int):
        self.label, self.hostname, self.port, self.user = label, hostname, port, user
        self.identities, self.python, self.machines = identities, python, machines

    def __repr__(self) -> str:
        return f"{self.user}@{self.hostname}:{self.port}"


def parse_host(spec: str, options: Dict[str, Any]) -> HostSpec:
    """Parse ``[user@]host[:port][?python=PATH&machines=N]`` or a ssh_config alias."""
    text, _, query = spec.partition("?")
    params = {k: v[-1] for k, v in parse_qs(query).items()}
    user, at, rest = text.rpartition("@")
    if rest.startswith("["):   # [ipv6]:port
        host, _, port = rest[1:].partition("]")
        port = port.lstrip(":")
    else:
        host, _, port = rest.partition(":")
    if not host:
        raise ValueError(f"bad host {spec!r}: expected [user@]host[:port]")
    cfg: Dict[str, Any] = {}
    path = os.path.expanduser(options.get("ssh_config") or "~/.ssh/config")
    if os.path.exists(path):
        cfg = paramiko.SSHConfig.from_path(path).lookup(host)
    hostname = cfg.get("hostname", host)
    try:
        port_n = int(port or cfg.get("port", 22))
    except ValueError:
        raise ValueError(f"bad port in host {spec!r}") from None
    identities = list(options.get("ssh_identity") or []) + \
        [os.path.expanduser(p) for p in cfg.get("identityfile", [])]
    return HostSpec(label=host, hostname=hostname, port=port_n,
                    user=(user if at else "") or cfg.get("user") or options.get("ssh_user")
                    or getpass.getuser(),
                    identities=identities,
                    python=params.get("python") or options.get("ssh_python") or "python3",
                    machines=int(params.get("machines") or options.get("ssh_machines_per_host")
                                 or 0))


_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)   # Linux


class _QuickAckSocket(socket.socket):
    """A TCP socket that acknowledges what it reads at once (TCP_QUICKACK after each read).

    Until its first session starts, OpenSSH's sshd sends with Nagle's algorithm on. After
    authentication it writes two small packets in a row (its host keys notice, then the
    channel-open confirmation): the second waits in sshd's kernel until the first is
    acknowledged, and Linux delays that acknowledgement by 40 ms. Acknowledging at once
    takes those 40 ms out of every first launch on a host (then sshd sets TCP_NODELAY).
    """

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = super().recv(bufsize, flags)
        try:
            self.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
        except OSError:
            pass
        return data


def _tcp_connect(host: str, port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if _TCP_QUICKACK is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            quick = _QuickAckSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
            quick.settimeout(timeout)
            sock = quick
    except BaseException:
        sock.close()
        raise
    return sock


class _Host:
    """A connected host: its SSH client, and whether the code bundle is there yet."""

    def __init__(self, spec: HostSpec, system: "SSHSystem"):
        self.spec = spec
        self.system = system
        self.client: Optional[paramiko.SSHClient] = None
        self.extra: List[paramiko.SSHClient] = []   # more connections, for more channels
        self.channels: Dict[int, int] = {}          # id(client) -> open machine channels
        self.lock = threading.Lock()
        self.code_lock = threading.Lock()
        self.code_ok: Optional[str] = None   # the bundle hash known to be on the host

    def connect(self) -> paramiko.SSHClient:
        with self.lock:
            if self.client is not None and self.client.get_transport() is not None \
                    and self.client.get_transport().is_active():
                return self.client
            self.client = self._connect()
            return self.client

    def _connect(self) -> paramiko.SSHClient:
        spec, opts = self.spec, self.system.options
        t0 = time.monotonic()
        client = paramiko.SSHClient()
        known = os.path.expanduser(opts.get("ssh_known_hosts") or "~/.ssh/known_hosts")
        if os.path.exists(known):
            client.load_host_keys(known)
        if opts.get("ssh_accept_new_hosts"):
            client.set_missing_host_key_policy(_AcceptNew(known))
        else:
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
        timeout = opts["connect_timeout"]
        try:
            sock = _tcp_connect(spec.hostname, spec.port, timeout)
        except OSError as exc:
            raise StartError(f"cannot reach {spec}: {exc.strerror or exc!r}") from exc
        try:
            client.connect(spec.hostname, spec.port, username=spec.user, sock=sock,
                           key_filename=spec.identities or None, timeout=timeout,
                           banner_timeout=timeout, auth_timeout=timeout,
                           allow_agent=True, look_for_keys=not spec.identities)
        except paramiko.BadHostKeyException as exc:
            sock.close()
            raise StartError(f"the host key of {spec} does not match {known}: refusing to "
                             "connect (was the host reinstalled, or is someone in between?)"
                             ) from exc
        except paramiko.AuthenticationException as exc:
            sock.close()
            raise StartError(f"authentication to {spec} was refused: {exc}") from exc
        except paramiko.SSHException as exc:
            sock.close()
            if "known_hosts" in str(exc):
                raise StartError(f"{spec.hostname}:{spec.port} is not in {known}; add its key "
                                 "(ssh-keyscan) or pass ssh_accept_new_hosts=True") from exc
            raise StartError(f"SSH to {spec} failed: {exc}") from exc
        except OSError as exc:
            sock.close()
            raise StartError(f"SSH to {spec} failed: {exc!r}") from exc
        log.info("ssh %s: connected in %.2f s", spec, time.monotonic() - t0)
        return client

    def open_channel(self, timeout: float) -> paramiko.Channel:
        """An exec channel for one machine; at most 8 per connection (sshd's MaxSessions
        is 10 by default), so a 72-CPU host gets its machines over several connections."""
        self.connect()
        with self.lock:
            for client in [self.client] + self.extra:
                t = client.get_transport()
                if t is not None and t.is_active() and self.channels.get(id(client), 0) < 8:
                    break
            else:
                client = self._connect()
                self.extra.append(client)
            self.channels[id(client)] = self.channels.get(id(client), 0) + 1
        chan = client.get_transport().open_session(timeout=timeout)
        chan._bigmp_client = id(client)
        return chan

    def channel_closed(self, chan: paramiko.Channel) -> None:
        with self.lock:
            key = getattr(chan, "_bigmp_client", None)
            if key in self.channels:
                self.channels[key] -= 1

    def run(self, command: str, timeout: float) -> str:
        """Run a short command; return its stdout."""
        client = self.connect()
        _, stdout, _ = client.exec_command(command, timeout=timeout)
        return stdout.read().decode(errors="replace")

    def close(self) -> None:
        with self.lock:
            for client in ([self.client] if self.client else []) + self.extra:
                client.close()
            self.client = None
            self.extra = []
            self.channels.clear()


class _AcceptNew(paramiko.MissingHostKeyPolicy):
    """OpenSSH's StrictHostKeyChecking=accept-new: remember unknown hosts, refuse changed ones."""

    def __init__(self, path: str):
        self.path = path

    def missing_host_key(self, client, hostname, key):
        client.get_host_keys().add(hostname, key.get_name(), key)
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            client.save_host_keys(self.path)
        except OSError as exc:
            log.warning("could not save the host key of %s to %s: %s", hostname, self.path, exc)


class SSHLaunch(Launch):
    """A worker on a remote host: an exec channel, pumped into local pipes."""

    def __init__(self, host: _Host, chan: paramiko.Channel):
        super().__init__()
        self.host = host
        self.chan = chan
        self.control = -1
        hs_r, self._hs_w = os.pipe()
        out_r, self._out_w = os.pipe()
        self.handshake, self.output = hs_r, out_r

    def start_pumps(self, early_stdout: bytes) -> None:
        if early_stdout:
            os.write(self._hs_w, early_stdout)
        threading.Thread(target=self._pump, name=f"bigmp-ssh-{self.host.spec.label}",
                         daemon=True).start()

    def _pump(self) -> None:
        chan = self.chan
        hs, out = self._hs_w, self._out_w
        try:
            while True:
                progressed = False
                if chan.recv_ready():
                    data = chan.recv(65536)
                    if data and hs >= 0:
                        os.write(hs, data)
                    progressed = True
                if chan.recv_stderr_ready():
                    data = chan.recv_stderr(65536)
                    if data:
                        os.write(out, data)
                    progressed = True
                drained = not chan.recv_ready() and not chan.recv_stderr_ready()
                # EOF comes after the last byte of output (exit-status may come before it:
                # sshd reports the exit as soon as the process ends, pipes not yet read).
                if drained and (chan.closed or chan.eof_received):
                    break
                if not progressed:
                    import select
                    select.select([chan], [], [], 0.5)
        except OSError:
            pass
        finally:
            for fd in (hs, out):
                try:
                    os.close(fd)
                except OSError:
                    pass
            code = chan.exit_status if chan.exit_status_ready() else None
            if code is not None and code < 0:
                code = None
            self.host.channel_closed(chan)
            self._exited(code)

    def close_control(self) -> None:
        try:
            self.chan.shutdown_write()   # EOF on the worker's stdin: it exits
        except (OSError, EOFError, paramiko.SSHException):
            pass

    def kill(self) -> None:
        pid = self.pid
        try:
            self.chan.close()
        except Exception:
            pass
        if pid:
            def kill_remote():
                try:
                    self.host.run(f"kill -9 {int(pid)} 2>/dev/null", timeout=10)
                except Exception:
                    pass
            threading.Thread(target=kill_remote, daemon=True).start()


class SSHSystem(System):
    """Machines on hosts reached over SSH."""

    name = "ssh"

    def __init__(self, options: Dict[str, Any]):
        super().__init__(options)
        hosts = options.get("hosts") or []
        if not hosts:
            raise ValueError("the ssh system needs hosts (hosts=[...], BIGMP_HOSTS or "
                             "--bigmp-hosts)")
        self.hosts = [_Host(parse_host(h, options), self) for h in hosts]
        self._placement: Dict[str, _Host] = {}
        # Making the CA's key takes tens of ms: do it while the first hosts connect.
        self._ca_ready = threading.Event()
        self._ca: Optional[tls.SessionCA] = None
        self._authkey: Optional[bytes] = None
        threading.Thread(target=self._make_ca, daemon=True, name="bigmp-ssh-ca").start()
        self.requires = list(codeship.REQUIRED_ON_HOST)
        self._lock = threading.Lock()
        self.python_version = "%d.%d" % tuple(__import__("sys").version_info[:2])

    def _make_ca(self) -> None:
        try:
            self._ca = tls.SessionCA()
        finally:
            self._ca_ready.set()

    def _session_ca(self) -> tls.SessionCA:
        """The session's CA, once made (and the driver's own credentials registered)."""
        self._ca_ready.wait()
        if self._ca is None:
            raise StartError("could not make the session's TLS certificate authority")
        with self._lock:
            if self._authkey is not None:
                tls.register(self._authkey, self._ca.issue("driver"))
                self._authkey = None
        return self._ca

    def attach(self, session: Any) -> None:
        self._authkey = session.authkey

    def machine_name(self, index: int) -> str:
        host = self.hosts[index % len(self.hosts)]
        name = f"{host.spec.label}-{index}"
        self._placement[name] = host
        return name

    def capacity(self) -> int:
        """Machines per host (its CPU count unless set), summed over hosts."""
        total = 0
        for host in self.hosts:
            if host.spec.machines:
                total += host.spec.machines
            else:
                out = host.run(f"{shlex.quote(host.spec.python)} -c "
                               "'import os; print(os.cpu_count())'",
                               timeout=self.options["start_timeout"])
                total += int(out.strip() or 1)
        return total

    def listen_address(self) -> Any:
        return ("tls", "$SSH", 0)

    def launch(self, name: str, config: Dict[str, Any]) -> Launch:
        host = self._placement.get(name) or self.hosts[0]
        deadline = time.monotonic() + self.options["start_timeout"]
        bundle = codeship.bundle()
        config = dict(config)
        config["environ"] = {k: v for k, v in (config.get("environ") or {}).items()
                             if k not in _HOST_VARS}
        config["environ_mode"] = "overlay"
        if bundle.main:
            config["remote_main"] = bundle.main
        header = json.dumps({"hash": bundle.sha256, "python": self.python_version,
                             "requires": self.requires,
                             "cache": self.options.get("ssh_cache_dir") or "~/.cache/bigmp"})
        with open(_BOOTSTRAP) as f:
            boot = f.read()
        command = f"exec {shlex.quote(host.spec.python)} -c {shlex.quote(boot)} " \
                  f"{shlex.quote(header)}"
        # The first launch on a host uploads the bundle; the others wait for it, so it
        # travels once.
        with host.code_lock if host.code_ok != bundle.sha256 else _nolock:
            chan = host.open_channel(self.options["connect_timeout"])
            chan.exec_command(command)
            launch = SSHLaunch(host, chan)
            reply, rest = self._read_reply(chan, host, deadline)
            problem = self._problem(host, reply)
            if problem:
                chan.close()
                raise StartError(f"{name}: {problem}")
            launch.pid = reply.get("pid")
            if reply.get("need_code"):
                t0 = time.monotonic()
                chan.sendall(b"%d\n" % len(bundle.data) + bundle.data)
                log.info("ssh %s: uploaded the code bundle (%d KiB) in %.2f s", host.spec,
                         len(bundle.data) // 1024, time.monotonic() - t0)
            host.code_ok = bundle.sha256
        config["tls"] = self._session_ca().issue(name).as_dict()   # made while connecting
        chan.sendall(encode_config(config))
        launch.start_pumps(rest)
        log.info("ssh %s: launched %s", host.spec, name)
        return launch

    def _read_reply(self, chan: paramiko.Channel, host: _Host, deadline: float):
        buf = b""
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                chan.close()
                raise StartError(f"no answer from the bootstrap on {host.spec} within "
                                 f"{self.options['start_timeout']:g} s")
            chan.settimeout(left)
            try:
                data = chan.recv(4096)
            except socket.timeout:
                continue
            if not data:
                err = b""
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                status = chan.recv_exit_status()
                text = err.decode(errors="replace").strip()
                chan.close()
                if status in (126, 127):
                    raise StartError(f"no Python at {host.spec.python!r} on {host.spec} "
                                     f"(exit status {status}: {text})")
                raise StartError(f"the bootstrap on {host.spec} exited with status {status}"
                                 + (f": {text}" if text else ""))
            buf += data
        chan.settimeout(None)
        line, rest = buf.split(b"\n", 1)
        return json.loads(line), rest

    def _problem(self, host: _Host, reply: Dict[str, Any]) -> Optional[str]:
        theirs = ".".join(str(reply.get("python", "")).split(".")[:2])
        if theirs != self.python_version:
            return (f"{host.spec} runs Python {reply.get('python')} at "
                    f"{reply.get('executable')}, the driver Python {self.python_version}: "
                    f"install Python {self.python_version} there and give its path "
                    "(ssh_python, or ?python=PATH after the host)")
        if reply.get("missing"):
            return (f"{host.spec} lacks {', '.join(reply['missing'])} for "
                    f"{reply.get('executable')}: install it there "
                    f"({reply.get('executable')} -m pip install {' '.join(reply['missing'])})")
        return None

    def shutdown(self) -> None:
        for host in self.hosts:
            host.close()


class _NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_nolock = _NoLock()
