"""The machine side: ``python -m bigmp.worker`` (or a forked child) becomes a machine.

The launcher gives every worker the same three channels, whatever the backend:

* fd 0, *control*: one line (a base64 pickle of the launch configuration), then nothing;
  its EOF means the driver is gone and the machine exits;
* fd 1, *handshake*: exactly one JSON line back (address, pid, versions), never scraped
  from logs; afterwards fd 1 is pointed at fd 2;
* fd 2, *output*: everything the machine prints, forwarded by the driver with a prefix.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import os
import pickle
import platform
import signal
import socket
import sys
from typing import Any, Dict, Optional

from . import __version__
from .server import BigServer
from .supervisor import Supervisor, flush_all

log = logging.getLogger("bigmp.worker")

HANDSHAKE_VERSION = 1
# True while a machine imports the driver's main module (see bigmp.start's guard).
importing_main = False


def _read_line(fd: int) -> bytes:
    chunks = []
    while True:
        b = os.read(fd, 65536)
        if not b:
            break
        chunks.append(b)
        if b.endswith(b"\n"):
            break
    return b"".join(chunks)


def _fresh_stdio() -> None:
    # New line-buffered text files on fds 1 and 2: a forked child must not inherit a
    # buffer lock some driver thread held at fork time, and lines should leave promptly.
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True,
                                  errors="backslashreplace")
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True,
                                  errors="backslashreplace")
    sys.__stdout__, sys.__stderr__ = sys.stdout, sys.stderr


def _apply_environment(config: Dict[str, Any]) -> None:
    environ = config.get("environ")
    if environ is not None:
        if config.get("environ_mode") != "overlay":
            os.environ.clear()   # a local machine sees exactly the driver's environment
        os.environ.update(environ)
    for p in reversed(config.get("sys_path") or []):
        if p not in sys.path:
            sys.path.insert(0, p)
    prep = config.get("main")
    if config.get("remote_main") and os.environ.get("BIGMP_CODE_DIR"):
        # The driver's main script travelled in the code bundle.
        prep = {"init_main_from_path": os.path.join(os.environ["BIGMP_CODE_DIR"],
                                                    config["remote_main"])}
    if prep:
        # As multiprocessing's spawn does: load the driver's main module as __mp_main__
        # so that functions and classes pickled by reference from __main__ resolve.
        from multiprocessing import spawn
        global importing_main
        importing_main = True
        try:
            spawn.prepare(prep)
        except Exception as exc:
            print(f"bigmp: could not import the driver's main module here: {exc!r}",
                  file=sys.stderr)
        finally:
            importing_main = False
    if config.get("argv") is not None:
        sys.argv[:] = list(config["argv"])


def serve(config: Dict[str, Any], handshake_fd: int, lifeline_fd: Optional[int]) -> str:
    """Run a machine until it is told to exit; returns the reason."""
    from .cluster import B

    name = config["name"]
    os.environ["BIGMP_MACHINE"] = name
    from . import config as _config
    _config.override(**(config.get("options") or {}))
    authkey = config["authkey"]
    listen = config.get("listen")
    if config.get("tls"):
        from . import tls
        tls.register(authkey, tls.Credentials(**config["tls"]), serve=True)
    if isinstance(listen, (tuple, list)) and len(listen) == 3 and listen[1] == "$SSH":
        # Listen on the address the driver's SSH connection reached this host at.
        server_ip = (os.environ.get("SSH_CONNECTION") or "").split()[2:3]
        listen = ("tls", server_ip[0] if server_ip else "127.0.0.1", listen[2])
    server = BigServer({}, listen, authkey, "bigmp", name=name)
    session = B.remote(authkey, config=config.get("options") or {})
    supervisor = Supervisor(server, session, lease=config["lease"], grace=config["grace"])
    server.install("Supervisor", supervisor)
    hello = {"v": HANDSHAKE_VERSION, "addr": server.address, "pid": os.getpid(),
             "hostname": socket.gethostname(), "python": platform.python_version(),
             "bigmp": __version__, "name": name}
    os.write(handshake_fd, (json.dumps(hello) + "\n").encode())
    os.close(handshake_fd)
    supervisor._watch(lifeline_fd)
    server.serve_until_stopped()
    reason = supervisor.exit_reason or "server stopped"
    server.stop()
    return reason


def main() -> None:
    """Entry point of every machine process (fds 0, 1, 2 set up as the module doc says)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the driver's to handle
    code = 0
    try:
        # Keep the handshake channel aside and point fd 1 at the output at once, so that
        # nothing printed while starting (imports of the driver's main module, say) can
        # get mixed into the handshake line.
        handshake_fd = os.dup(1)
        os.dup2(2, 1)
        _fresh_stdio()
        line = _read_line(0)
        if not line.strip():
            raise SystemExit("bigmp.worker: no launch configuration on stdin")
        config = pickle.loads(base64.b64decode(line))
        _apply_environment(config)
        reason = serve(config, handshake_fd, 0)
        if not reason.startswith("shut down by"):
            print(f"bigmp: machine exiting: {reason}", file=sys.stderr)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
        if not isinstance(exc.code, int) and exc.code is not None:
            print(exc.code, file=sys.stderr)
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    finally:
        flush_all()
        os._exit(code)


if __name__ == "__main__":
    main()
