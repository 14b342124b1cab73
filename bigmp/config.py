"""One configuration scheme: keyword arguments > ``BIGMP_*`` environment variables > defaults.

Every option has one name. As a keyword argument it is ``keepalive_lease=10``, in the
environment ``BIGMP_KEEPALIVE_LEASE=10``, and as a driver flag ``--bigmp-keepalive-lease 10``
(added to the driver's own parser by :func:`add_arguments`).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Dict, List, NamedTuple

__all__ = ["OPTIONS", "resolve", "add_arguments", "options_from_args"]


class Option(NamedTuple):   # not a dataclass: dataclasses costs every machine ~5 ms of imports
    name: str
    type: Callable[[str], Any]
    default: Any
    help: str

    @property
    def env(self) -> str:
        return "BIGMP_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--bigmp-" + self.name.replace("_", "-")


def _bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _list(text: str) -> List[str]:
    return [part for part in str(text).replace(",", " ").split() if part]


OPTIONS: Dict[str, Option] = {o.name: o for o in [
    Option("system", str, "local", "backend that starts machines: local, ssh or testing"),
    Option("local_mode", str, "fork", "local machines: fork (from a fork server) or spawn (fresh interpreter)"),
    Option("python", str, sys.executable, "interpreter for spawned machines"),
    Option("keepalive_lease", float, 30.0, "a machine exits when the driver has not renewed its lease for this many seconds"),
    Option("keepalive_interval", float, 2.0, "seconds between the driver's keepalives"),
    Option("keepalive_timeout", float, 30.0, "the driver marks a machine STOPPED after it has not answered keepalives for this long"),
    Option("driver_grace", float, 2.0, "a machine exits this many seconds after its driver connection closed, unless the driver reconnects"),
    Option("connect_timeout", float, 10.0, "timeout for a TCP connect"),
    Option("handshake_timeout", float, 10.0, "timeout for each step of the authentication handshake"),
    Option("start_timeout", float, 60.0, "seconds a machine may take from launch to its handshake"),
    Option("shutdown_timeout", float, 10.0, "seconds shutdown waits for a machine's output to drain"),
    Option("max_frame", int, 1 << 30, "largest frame (bytes) a connection accepts"),
    Option("stats", _bool, True, "keep per-method call statistics on the driver and the machines (~2 us of a small call; off: b.stats is None)"),
    Option("hosts", _list, [], "hosts for remote systems: [user@]host[:port][?python=PATH&machines=N] or ~/.ssh/config aliases"),
    Option("ssh_identity", _list, [], "SSH private key files (default: ssh-agent and ~/.ssh keys)"),
    Option("ssh_known_hosts", str, "~/.ssh/known_hosts", "known_hosts file that host keys are checked against"),
    Option("ssh_accept_new_hosts", _bool, False, "accept and remember hosts missing from known_hosts (a changed key is still refused)"),
    Option("ssh_config", str, "~/.ssh/config", "OpenSSH client configuration for host aliases"),
    Option("ssh_user", str, "", "SSH user when a host names none (default: yours)"),
    Option("ssh_python", str, "python3", "Python interpreter on the hosts"),
    Option("ssh_machines_per_host", int, 0, "machines per host when b.start() gets no count (0: the host's CPU count)"),
    Option("ssh_cache_dir", str, "~/.cache/bigmp", "where hosts cache the code bundle"),
    Option("debug_addr", str, "", "serve the driver's debug pages (/debug/bigmp/status, profile, stats) at host:port; a bare port or :port means loopback; empty: off"),
]}


def _from_env(opt: Option) -> Any:
    raw = os.environ.get(opt.env)
    if raw is None:
        return opt.default
    try:
        return opt.type(raw)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{opt.env}={raw!r}: {exc}") from None


def resolve(**kwargs: Any) -> Dict[str, Any]:
    """All options: explicit (non-None) keyword arguments, then environment, then defaults."""
    unknown = set(kwargs) - set(OPTIONS)
    if unknown:
        raise TypeError(f"unknown bigmp option(s) {sorted(unknown)}; known: {sorted(OPTIONS)}")
    out = {}
    for name, opt in OPTIONS.items():
        value = kwargs.get(name)
        out[name] = _from_env(opt) if value is None else value
    return out


# Process-wide values set by a machine's launch configuration (see worker.py); they win
# over the environment, since the driver's explicit options are meant to reach machines.
_overrides: Dict[str, Any] = {}
_parsed: Dict[str, tuple] = {}


def override(**values: Any) -> None:
    """Set process-wide option values (used on machines for the driver's options)."""
    unknown = set(values) - set(OPTIONS)
    if unknown:
        raise TypeError(f"unknown bigmp option(s) {sorted(unknown)}")
    _overrides.update({k: v for k, v in values.items() if v is not None})


def get(name: str) -> Any:
    """One option's current value: process override, then environment, then default."""
    if name in _overrides:
        return _overrides[name]
    opt = OPTIONS[name]
    raw = os.environ.get(opt.env)
    cached = _parsed.get(name)
    if cached is not None and cached[0] == raw:   # hot path: parse each env value once
        return cached[1]
    value = _from_env(opt)
    _parsed[name] = (raw, value)
    return value


def connect_timeout() -> float:
    return get("connect_timeout")


def handshake_timeout() -> float:
    return get("handshake_timeout")


def max_frame() -> int:
    return get("max_frame")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every bigmp option to the driver's own parser as ``--bigmp-<name>``."""
    group = parser.add_argument_group("bigmp")
    for opt in OPTIONS.values():
        group.add_argument(opt.flag, dest="bigmp_" + opt.name, type=opt.type, default=None,
                           help=f"{opt.help} (env {opt.env}, default {opt.default!r})")
    return parser


def options_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    """The bigmp options the user gave on the command line, as keywords for :func:`bigmp.start`."""
    out = {}
    for name in OPTIONS:
        value = getattr(args, "bigmp_" + name, None)
        if value is not None:
            out[name] = value
    return out
