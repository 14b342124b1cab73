"""Code shipping: the zip a remote host needs to run the driver's program.

It holds bigmp itself, the pure-Python dependencies (cloudpickle, tblib), the driver's own
local modules (imported from outside the standard library and site-packages) and its main
script. The zip is deterministic, so its SHA-256 names it: hosts keep it in a cache
directory and a second start uploads nothing. Compiled dependencies (psutil) must be
installed on the host; the bootstrap says so when they are not.
"""
from __future__ import annotations

import hashlib
import io
import os
import site
import sys
import sysconfig
import threading
import zipfile
from typing import Dict, Iterable, List, Optional, Tuple

__all__ = ["Bundle", "bundle", "REQUIRED_ON_HOST"]

# Compiled dependencies that cannot travel in the zip.
REQUIRED_ON_HOST = ["psutil"]
SHIPPED_PACKAGES = ["bigmp", "cloudpickle", "tblib"]
MAIN_DIR = "_bigmp_main"


class Bundle:
    """The zip's bytes, its hash, and where the main script sits in it (if shipped)."""

    def __init__(self, data: bytes, main: Optional[str]):
        self.data = data
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.main = main

    def __len__(self) -> int:
        return len(self.data)


_system_dirs_cache: Optional[List[str]] = None


def _system_dirs() -> List[str]:
    """The standard library's and site-packages' directories (fixed for the process)."""
    global _system_dirs_cache
    if _system_dirs_cache is not None:
        return _system_dirs_cache
    dirs = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            dirs.add(os.path.realpath(path))
    for path in list(getattr(site, "getsitepackages", lambda: [])()) + \
            [getattr(site, "getusersitepackages", lambda: "")()]:
        if path:
            dirs.add(os.path.realpath(path))
    dirs.add(os.path.realpath(sys.base_prefix))
    dirs.add(os.path.realpath(sys.prefix))
    _system_dirs_cache = sorted(dirs)
    return _system_dirs_cache


def _under(path: str, dirs: Iterable[str]) -> bool:
    return any(path == d or path.startswith(d + os.sep) for d in dirs)


def _package_files(pkg_dir: str, arc_root: str) -> Iterable[Tuple[str, str]]:
    for root, subdirs, files in os.walk(pkg_dir):
        subdirs[:] = sorted(d for d in subdirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                yield path, os.path.join(arc_root, os.path.relpath(path, pkg_dir))


# What _local_modules found for each (module name, __file__): (arcname, real path) or None.
# A bundle is looked for at every launch; only modules imported since the last look cost
# a realpath (about 10 us each, thousands of modules in a big driver).
_seen: Dict[Tuple[str, str], Optional[Tuple[str, str]]] = {}
_seen_path: Tuple[str, ...] = ()


def _local_modules(skip: Iterable[str]) -> Dict[str, str]:
    """arcname -> path for the driver's own modules (not stdlib, not site-packages)."""
    global _seen_path
    if tuple(sys.path) != _seen_path:   # another sys.path may place modules elsewhere
        _seen.clear()
        _seen_path = tuple(sys.path)
    skip = set(skip)
    roots: Optional[List[str]] = None
    out: Dict[str, str] = {}
    for name, mod in list(sys.modules.items()):
        path = getattr(mod, "__file__", None)
        if not isinstance(path, str) or name == "__main__" or name.partition(".")[0] in skip:
            continue
        try:
            hit = _seen[name, path]
        except KeyError:
            if roots is None:
                roots = sorted({os.path.realpath(p) for p in sys.path
                                if p and os.path.isdir(p)}, key=len, reverse=True)
            hit = _seen[name, path] = _classify(name, path, roots)
        if hit is not None:
            out[hit[0]] = hit[1]
    return out


def _classify(name: str, path: str, roots: List[str]) -> Optional[Tuple[str, str]]:
    """(arcname, real path) if module ``name`` at ``path`` is one of the driver's own."""
    if not path.endswith(".py"):
        return None
    path = os.path.realpath(path)
    if _under(path, _system_dirs()) or "site-packages" in path or "dist-packages" in path:
        return None
    for root in roots:
        if path.startswith(root + os.sep):
            rel = os.path.relpath(path, root)
            # Only if the module's dotted name matches its place under that root.
            expected = name.replace(".", os.sep)
            if rel in (expected + ".py", os.path.join(expected, "__init__.py")):
                return rel, path
            return None
    return None


def _main_script() -> Optional[str]:
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file and main_file.endswith(".py"):
        real = os.path.realpath(main_file)
        if not _under(real, _system_dirs()) and "site-packages" not in real:
            return real
    return None


def _build(local: Dict[str, str], main_path: Optional[str]) -> Bundle:
    entries: Dict[str, str] = {}
    for pkg in SHIPPED_PACKAGES:
        mod = sys.modules.get(pkg) or __import__(pkg)
        pkg_dir = os.path.dirname(os.path.realpath(mod.__file__))
        for path, arc in _package_files(pkg_dir, pkg):
            entries[arc] = path
    for arc, path in local.items():
        entries.setdefault(arc, path)
    main = None
    if main_path:
        main = f"{MAIN_DIR}/{os.path.basename(main_path)}"
        entries[main] = main_path
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for arc in sorted(entries):
            info = zipfile.ZipInfo(arc, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            with open(entries[arc], "rb") as f:
                zf.writestr(info, f.read())
    return Bundle(buf.getvalue(), main)


_cache: Optional[Tuple[frozenset, Bundle]] = None
_lock = threading.Lock()


def bundle() -> Bundle:
    """The bundle for the program as it is now (rebuilt when the driver has imported a
    local module since the last one; other imports do not change it)."""
    global _cache
    with _lock:
        local = _local_modules(SHIPPED_PACKAGES)
        main = _main_script()
        key = frozenset(local.items()) | {("__main__", main)}
        if _cache is None or _cache[0] != key:
            _cache = (key, _build(local, main))
        return _cache[1]
