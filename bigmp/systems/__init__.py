"""Backends that start machines, one per module, behind :class:`bigmp.systems.base.System`."""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional

from .base import Launch, System

__all__ = ["System", "Launch", "get_system"]


def get_system(name: str, options: Dict[str, Any],
               explicit: Optional[Iterable[str]] = None) -> System:
    """The System called ``name`` (``local``, ``ssh`` or ``testing``); ``explicit``: the
    options the program gave itself (the testing system shortens only the others)."""
    if name == "local":
        from .local import LocalSystem
        return LocalSystem(options)
    if name == "ssh":
        from .ssh import SSHSystem
        return SSHSystem(options)
    if name == "testing":
        from .testing import TestingSystem
        return TestingSystem(options, explicit)
    raise ValueError(f"unknown bigmp system {name!r}; available: local, ssh, testing")
