"""SSH: machines on other hosts, launched over paramiko, talking mutual TLS.

Hosts are ``[user@]host[:port][?python=PATH&machines=N]`` or an alias of ``~/.ssh/config``
(HostName, User, Port, IdentityFile honoured). One SSH connection per host carries one
exec channel per machine; the channel's stdin, stdout and stderr are the worker's three
channels (see :mod:`bigmp.worker`), so the machine exits when the SSH session closes.

A launch is one exec: the bootstrap (:mod:`bigmp.systems.ssh_bootstrap`, standard library
only) checks Python and the compiled dependencies, receives the code bundle if the host
does not have it cached yet (see :mod:`bigmp.codeship`), and becomes the worker; the
driver's side of that exchange is :mod:`bigmp.systems.bootstrap`, shared with the other
backends whose launch channel is a byte stream. Host keys
are checked against known_hosts; an unknown host is an error unless
``ssh_accept_new_hosts`` is set. Machines listen with TLS on the address the SSH
connection reached (see :mod:`bigmp.tls`).
"""
from __future__ import annotations

import getpass
import logging
import os
import select
import shlex
import socket
import threading
import time
from typing import Any, Dict, List, Optional
from urllib.parse import parse_qs

import paramiko

from .. import tls
from ..errors import StartError
from .base import Launch, System
from .bootstrap import BootChannel, Bootstrap, HostCache

log = logging.getLogger("bigmp.ssh")

__all__ = ["SSHSystem", "HostSpec", "parse_host"]

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
        self.cache = HostCache()   # what the host's cache holds, as far as we know

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


class ParamikoChannel(BootChannel):
    """A paramiko exec channel as a :class:`~bigmp.systems.bootstrap.BootChannel`."""

    def __init__(self, host: "_Host", chan: paramiko.Channel):
        self.host, self.chan = host, chan
        self.where = repr(host.spec)
        self._released = False

    def _release(self) -> None:
        """Count the channel off its connection (once)."""
        if not self._released:
            self._released = True
            self.host.channel_closed(self.chan)

    def sendall(self, data: bytes) -> None:
        self.chan.sendall(data)

    def _recv(self, read: Any, n: int, timeout: Optional[float]) -> bytes:
        self.chan.settimeout(timeout)
        try:
            return read(n)
        except socket.timeout:
            raise TimeoutError(f"nothing from {self.where} within {timeout:g} s") from None

    def recv(self, n: int, timeout: Optional[float]) -> bytes:
        return self._recv(self.chan.recv, n, timeout)

    def recv_stderr(self, n: int, timeout: Optional[float]) -> bytes:
        return self._recv(self.chan.recv_stderr, n, timeout)

    def exit_status(self, timeout: Optional[float]) -> Optional[int]:
        chan = self.chan
        if not chan.status_event.wait(timeout):
            return None
        return chan.exit_status

    def shutdown_write(self) -> None:
        try:
            self.chan.shutdown_write()
        except (OSError, EOFError, paramiko.SSHException):
            pass

    def close(self) -> None:
        try:
            self.chan.close()
        except Exception:
            pass
        self._release()

    def kill(self, pid: Optional[int]) -> None:
        self.close()
        if pid:
            def kill_remote():
                try:
                    self.host.run(f"kill -9 {int(pid)} 2>/dev/null", timeout=10)
                except Exception:
                    pass
            threading.Thread(target=kill_remote, daemon=True).start()

    def pump(self, stdout_fd: int, stderr_fd: int) -> None:
        # One thread for both streams: paramiko buffers them, select says when either has
        # something (or the channel closed).
        chan = self.chan
        chan.settimeout(None)
        try:
            self._pump_loop(chan, stdout_fd, stderr_fd)
        finally:
            self._release()

    @staticmethod
    def _pump_loop(chan: paramiko.Channel, stdout_fd: int, stderr_fd: int) -> None:
        while True:
            progressed = False
            if chan.recv_ready():
                data = chan.recv(65536)
                if data:
                    os.write(stdout_fd, data)
                progressed = True
            if chan.recv_stderr_ready():
                data = chan.recv_stderr(65536)
                if data:
                    os.write(stderr_fd, data)
                progressed = True
            drained = not chan.recv_ready() and not chan.recv_stderr_ready()
            # EOF comes after the last byte of output (exit-status may come before it:
            # sshd reports the exit as soon as the process ends, pipes not yet read).
            if drained and (chan.closed or chan.eof_received):
                return
            if not progressed:
                select.select([chan], [], [], 0.5)


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
        self.bootstrap = Bootstrap(options.get("ssh_cache_dir") or "~/.cache/bigmp")
        self._lock = threading.Lock()

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

        def open_channel(argv: List[str]) -> BootChannel:
            chan = host.open_channel(self.options["connect_timeout"])
            try:
                chan.exec_command(Bootstrap.shell_command(argv))
            except BaseException:
                chan.close()
                host.channel_closed(chan)
                raise
            return ParamikoChannel(host, chan)

        # The CA was made while the host connected.
        return self.bootstrap.launch(
            name, config, open_channel, python=host.spec.python, cache=host.cache,
            timeout=self.options["start_timeout"],
            credentials=lambda n: self._session_ca().issue(n).as_dict())

    @property
    def python_version(self) -> str:
        """The Python ``major.minor`` hosts must run (the driver's)."""
        return self.bootstrap.python_version

    @python_version.setter
    def python_version(self, value: str) -> None:
        self.bootstrap.python_version = value

    def shutdown(self) -> None:
        for host in self.hosts:
            host.close()
