"""Backends that start machines, one per module, behind :class:`bigmp.systems.base.System`."""
from __future__ import annotations

from typing import Any, Dict

from .base import Launch, System

__all__ = ["System", "Launch", "get_system"]


def get_system(name: str, options: Dict[str, Any]) -> System:
    """The System called ``name`` (``local``, ``ssh`` or ``testing``)."""
    if name == "local":
        from .local import LocalSystem
        return LocalSystem(options)
    if name == "ssh":
        from .ssh import SSHSystem
        return SSHSystem(options)
    if name == "testing":
        from .testing import TestingSystem
        return TestingSystem(options)
    raise ValueError(f"unknown bigmp system {name!r}; available: local, ssh, testing")
