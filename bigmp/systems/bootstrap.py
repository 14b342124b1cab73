"""The driver's side of the bootstrap exchange, over any byte-stream launch channel.

A remote launch runs ``python -c <ssh_bootstrap.py> '<json header>'`` somewhere (an SSH
exec channel, an ``srun`` subprocess's pipes, ...). The exchange is the same whatever
carries it: the bootstrap answers one JSON line (its Python, what it lacks, whether the
code bundle is cached), the driver checks it, uploads what is missing, sends the
launch configuration (TLS credentials included) and then pumps the channel's stdout and
stderr into the pipes a :class:`~bigmp.systems.base.Launch` hands the session.

A backend supplies a :class:`BootChannel` (``sendall``, ``recv``/``recv_stderr`` with a
timeout, exit status, close; :class:`PopenChannel` is the one for a local subprocess with
three pipes) and keeps one :class:`HostCache` per host so uploads travel once per host.
"""
from __future__ import annotations

import abc
import json
import logging
import os
import select
import shlex
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from .. import codeship
from ..errors import StartError
from .base import Launch, encode_config

log = logging.getLogger("bigmp.bootstrap")

__all__ = ["BootChannel", "PopenChannel", "HostCache", "Bootstrap", "BootLaunch",
           "BOOTSTRAP_SOURCE", "HOST_VARS"]

_BOOTSTRAP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ssh_bootstrap.py")
with open(_BOOTSTRAP) as _f:
    BOOTSTRAP_SOURCE = _f.read()
del _f

# Driver variables that describe the driver's own login, not the program: a remote
# machine keeps its own.
HOST_VARS = {"HOME", "USER", "LOGNAME", "SHELL", "PWD", "OLDPWD", "MAIL", "TERM",
             "HOSTNAME", "DISPLAY", "SSH_CONNECTION", "SSH_CLIENT", "SSH_TTY",
             "SSH_AUTH_SOCK", "TMPDIR", "XDG_RUNTIME_DIR", "XDG_SESSION_ID", "PYTHONPATH",
             "VIRTUAL_ENV", "PATH", "BIGMP_CODE_DIR"}


class BootChannel(abc.ABC):
    """A launch channel: the remote process's stdin, stdout and stderr, and its exit."""

    #: How messages name the other end (``root@host:22``, ``srun on node3``, ...).
    where: str = "?"

    @abc.abstractmethod
    def sendall(self, data: bytes) -> None:
        """Write all of ``data`` to the process's stdin (OSError if it is gone)."""

    @abc.abstractmethod
    def recv(self, n: int, timeout: Optional[float]) -> bytes:
        """Up to ``n`` bytes of stdout; b'' at EOF; TimeoutError when none came in time."""

    @abc.abstractmethod
    def recv_stderr(self, n: int, timeout: Optional[float]) -> bytes:
        """As :meth:`recv`, for stderr."""

    @abc.abstractmethod
    def exit_status(self, timeout: Optional[float]) -> Optional[int]:
        """The exit status once the process has ended (None: unknown or not in time)."""

    @abc.abstractmethod
    def shutdown_write(self) -> None:
        """EOF on the process's stdin (the worker exits when it sees it)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Drop the channel (the process loses its stdin and outputs)."""

    def kill(self, pid: Optional[int]) -> None:
        """Kill the process (``pid``: the bootstrap's own, as it reported it)."""
        self.close()

    def pump(self, stdout_fd: int, stderr_fd: int) -> None:
        """Copy stdout and stderr into the two fds until both end (blocking).

        Channels that can wait on both streams at once override this with one loop.
        """
        def copy(read: Callable[[int, Optional[float]], bytes], fd: int) -> None:
            try:
                while True:
                    data = read(65536, None)
                    if not data:
                        return
                    os.write(fd, data)
            except OSError:
                pass
        t = threading.Thread(target=copy, args=(self.recv_stderr, stderr_fd), daemon=True,
                             name=f"bigmp-pump-err-{self.where}")
        t.start()
        copy(self.recv, stdout_fd)
        t.join()


class PopenChannel(BootChannel):
    """A local subprocess started with ``stdin``, ``stdout`` and ``stderr`` all PIPE
    (the bootstrap itself, or ``srun ... python -c BOOT`` for a Slurm step)."""

    def __init__(self, proc: subprocess.Popen, where: str = ""):
        if proc.stdin is None or proc.stdout is None or proc.stderr is None:
            raise ValueError("PopenChannel needs stdin, stdout and stderr as PIPE")
        self.proc = proc
        self.where = where or f"pid {proc.pid}"
        self._fds = {1: proc.stdout.fileno(), 2: proc.stderr.fileno()}

    def sendall(self, data: bytes) -> None:
        try:
            fd = self.proc.stdin.fileno()
        except ValueError:   # closed
            raise BrokenPipeError("the channel's stdin is closed") from None
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]

    def _read(self, which: int, n: int, timeout: Optional[float]) -> bytes:
        fd = self._fds[which]
        r, _, _ = select.select([fd], [], [], timeout)
        if not r:
            raise TimeoutError(f"nothing from {self.where} within {timeout:g} s")
        return os.read(fd, n)

    def recv(self, n: int, timeout: Optional[float]) -> bytes:
        return self._read(1, n, timeout)

    def recv_stderr(self, n: int, timeout: Optional[float]) -> bytes:
        return self._read(2, n, timeout)

    def exit_status(self, timeout: Optional[float]) -> Optional[int]:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def shutdown_write(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass

    def close(self) -> None:
        self.shutdown_write()
        if self.proc.poll() is None:
            try:
                self.proc.kill()
            except OSError:
                pass

    def kill(self, pid: Optional[int]) -> None:
        self.close()

    def pump(self, stdout_fd: int, stderr_fd: int) -> None:
        super().pump(stdout_fd, stderr_fd)
        for f in (self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except OSError:
                pass


class HostCache:
    """What the driver knows to be in one host's cache (hashes uploaded or found there).

    Backends keep one per host; launches on a host that might upload take ``lock`` so the
    first uploads and the others find the cache filled.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.known: set = set()


class BootLaunch(Launch):
    """A worker reached through a :class:`BootChannel`, its outputs pumped into pipes."""

    def __init__(self, chan: BootChannel, on_close: Optional[Callable[[], None]] = None):
        super().__init__()
        self.chan = chan
        self.control = -1
        self._on_close = on_close
        hs_r, self._hs_w = os.pipe()
        out_r, self._out_w = os.pipe()
        self.handshake, self.output = hs_r, out_r

    def start_pumps(self, early_stdout: bytes) -> None:
        """Start copying the channel's outputs (``early_stdout``: read already)."""
        if early_stdout:
            os.write(self._hs_w, early_stdout)
        threading.Thread(target=self._pump, name=f"bigmp-pump-{self.chan.where}",
                         daemon=True).start()

    def _pump(self) -> None:
        try:
            self.chan.pump(self._hs_w, self._out_w)
        except (OSError, EOFError):
            pass
        finally:
            for fd in (self._hs_w, self._out_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
            code = self.chan.exit_status(5.0)
            if code is not None and code < 0:
                code = None
            if self._on_close is not None:
                self._on_close()
            self._exited(code)

    def close_control(self) -> None:
        try:
            self.chan.shutdown_write()
        except (OSError, EOFError):
            pass
        except Exception:   # a backend's own error type (paramiko.SSHException, ...)
            pass

    def kill(self) -> None:
        try:
            self.chan.kill(self.pid)
        except Exception:
            pass


class _NoLock:
    def __enter__(self) -> "_NoLock":
        return self

    def __exit__(self, *exc: Any) -> bool:
        return False


_nolock = _NoLock()


class Bootstrap:
    """The driver's half of the exchange with ``ssh_bootstrap.py`` (one per System).

    ``cache_dir``: where hosts keep uploads (``~`` is the host's home).
    """

    def __init__(self, cache_dir: str = "~/.cache/bigmp"):
        self.cache_dir = cache_dir
        self.python_version = "%d.%d" % sys.version_info[:2]
        self.requires: List[str] = list(codeship.REQUIRED_ON_HOST)

    def header(self, bundle: codeship.Bundle) -> str:
        """The JSON argument the bootstrap reads."""
        return json.dumps({"hash": bundle.sha256, "python": self.python_version,
                           "requires": self.requires, "cache": self.cache_dir})

    def argv(self, python: str, bundle: codeship.Bundle) -> List[str]:
        """The command that starts the bootstrap with interpreter ``python``."""
        return [python, "-c", BOOTSTRAP_SOURCE, self.header(bundle)]

    @staticmethod
    def shell_command(argv: List[str]) -> str:
        """``argv`` as one shell command line that becomes the process (``exec``)."""
        return "exec " + " ".join(shlex.quote(a) for a in argv)

    def remote_config(self, config: Dict[str, Any], bundle: codeship.Bundle
                      ) -> Dict[str, Any]:
        """The launch configuration as a machine on another host needs it."""
        config = dict(config)
        config["environ"] = {k: v for k, v in (config.get("environ") or {}).items()
                             if k not in HOST_VARS}
        config["environ_mode"] = "overlay"
        if bundle.main:
            config["remote_main"] = bundle.main
        return config

    def launch(self, name: str, config: Dict[str, Any],
               open_channel: Callable[[List[str]], BootChannel], *, python: str,
               cache: HostCache, timeout: float,
               credentials: Optional[Callable[[str], Dict[str, Any]]] = None,
               on_close: Optional[Callable[[], None]] = None) -> BootLaunch:
        """Start machine ``name``: open a channel running the bootstrap, answer it, and
        return the launch with its pumps running. ``open_channel(argv)`` starts the
        process; ``credentials(name)`` gives the TLS credentials sent in the config;
        ``on_close()`` is called once the channel has ended."""
        deadline = time.monotonic() + timeout
        bundle = codeship.bundle()
        config = self.remote_config(config, bundle)
        argv = self.argv(python, bundle)
        # The first launch on a host uploads the bundle; the others wait for it, so it
        # travels once.
        with cache.lock if bundle.sha256 not in cache.known else _nolock:
            chan = open_channel(argv)
            try:
                launch = BootLaunch(chan, on_close)
                reply, rest = self._read_reply(chan, python, deadline, timeout)
                problem = self.problem(chan.where, reply)
                if problem:
                    raise StartError(f"{name}: {problem}")
                launch.pid = reply.get("pid")
                if reply.get("need_code"):
                    t0 = time.monotonic()
                    chan.sendall(b"%d\n" % len(bundle.data) + bundle.data)
                    log.info("%s: uploaded the code bundle (%d KiB) in %.2f s", chan.where,
                             len(bundle.data) // 1024, time.monotonic() - t0)
                cache.known.add(bundle.sha256)
                if credentials is not None:
                    config["tls"] = credentials(name)
                chan.sendall(encode_config(config))
            except BaseException:
                chan.close()
                if on_close is not None:
                    on_close()
                raise
        launch.start_pumps(rest)
        log.info("%s: launched %s", chan.where, name)
        return launch

    def _read_reply(self, chan: BootChannel, python: str, deadline: float,
                    timeout: float) -> Tuple[Dict[str, Any], bytes]:
        buf = b""
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StartError(f"no answer from the bootstrap on {chan.where} within "
                                 f"{timeout:g} s")
            try:
                data = chan.recv(4096, left)
            except TimeoutError:
                continue
            if not data:
                text = _drain_stderr(chan).decode(errors="replace").strip()
                status = chan.exit_status(5.0)
                if status in (126, 127):
                    raise StartError(f"no Python at {python!r} on {chan.where} "
                                     f"(exit status {status}: {text})")
                raise StartError(f"the bootstrap on {chan.where} exited with status {status}"
                                 + (f": {text}" if text else ""))
            buf += data
        line, rest = buf.split(b"\n", 1)
        try:
            return json.loads(line), rest
        except ValueError:
            raise StartError(f"the bootstrap on {chan.where} answered {line[:200]!r}, not "
                             "its JSON line (does the login shell print something?)") from None

    def problem(self, where: str, reply: Dict[str, Any]) -> Optional[str]:
        """What the bootstrap's reply says is wrong with the host (None: nothing)."""
        theirs = ".".join(str(reply.get("python", "")).split(".")[:2])
        if theirs != self.python_version:
            return (f"{where} runs Python {reply.get('python')} at "
                    f"{reply.get('executable')}, the driver Python {self.python_version}: "
                    f"install Python {self.python_version} there and give its path "
                    "(ssh_python, or ?python=PATH after the host)")
        if reply.get("missing"):
            return (f"{where} lacks {', '.join(reply['missing'])} for "
                    f"{reply.get('executable')}: install it there "
                    f"({reply.get('executable')} -m pip install {' '.join(reply['missing'])})")
        return None


def _drain_stderr(chan: BootChannel, limit: float = 2.0) -> bytes:
    """What the process wrote to stderr before it ended (waits at most ``limit`` s)."""
    err = b""
    deadline = time.monotonic() + limit
    while len(err) < 1 << 20:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            data = chan.recv_stderr(65536, left)
        except (TimeoutError, OSError):
            break
        if not data:
            break
        err += data
    return err
