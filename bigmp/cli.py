"""The ``bigmp`` command: talk to a driver's debug server (see :mod:`bigmp.debug`).

    bigmp status URL [--json]                 machines, health and load of a running driver
    bigmp profile URL --seconds N -o FILE     profile it and its machines; FILE.prof/.pstats gives
                                              pstats, .json JSON, .pb.gz pprof, anything else (or -)
                                              collapsed stacks for flamegraph.pl/speedscope
    bigmp stats URL                           per-method call statistics (JSON)

URL is the driver's debug address as ``http://host:port``, ``host:port`` or ``:port``
(loopback), with or without the ``/debug/bigmp/...`` path. Exit status: 0 on success,
1 when a machine is unhealthy (status) or the driver refused the request, 2 when the
driver cannot be reached. Further commands (``bigmp gc`` for cloud backends) plug in as
subcommands: see :func:`build_parser`.
"""
from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Dict, List, Optional, Sequence

from .debug import PREFIX
from .profiling import Profile, guess_format

__all__ = ["main", "build_parser", "base_url"]


class CommandError(Exception):
    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def base_url(url: str) -> str:
    """``http://host:port`` from any of the accepted forms of URL."""
    text = url.strip()
    if text.isdigit():
        text = ":" + text
    if "://" not in text:
        text = "http://" + (("127.0.0.1" + text) if text.startswith(":") else text)
    parts = urllib.parse.urlsplit(text)
    if not parts.netloc:
        raise CommandError(f"not a debug server URL: {url!r}", 2)
    return f"{parts.scheme}://{parts.netloc}"


def fetch(url: str, path: str, params: Optional[Dict[str, Any]] = None,
          timeout: float = 30.0) -> bytes:
    query = urllib.parse.urlencode(params or {}, doseq=True)
    full = base_url(url) + PREFIX + path + (f"?{query}" if query else "")
    try:
        with urllib.request.urlopen(full, timeout=timeout) as resp:
            return resp.read()
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace").strip()
        raise CommandError(f"{full}: HTTP {exc.code}: {body}", 1) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CommandError(f"cannot reach the bigmp driver at {full}: {reason}", 2) from None


def _dur(s: Optional[float]) -> str:
    if s is None:
        return "-"
    if s < 1:
        return f"{s * 1000:.1f}ms"
    if s < 60:
        return f"{s:.1f}s"
    m, s = divmod(int(s), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.0f}%"


def format_status(st: Dict[str, Any]) -> str:
    """A plain-text table of a status dict (what ``bigmp status`` prints)."""
    head = ["MACHINE", "STATE", "HEALTH", "UPTIME", "KEEPALIVE", "CPU", "MEM", "DISK",
            "LOAD", "CALLS", "ERRORS"]
    rows: List[List[str]] = [head]
    notes: List[str] = []
    for r in st["machines"]:
        health = "-" if r["state"] != "RUNNING" else ("ok" if r["healthy"] else "UNHEALTHY")
        ka = r.get("keepalive") or {}
        load = r.get("load") or []
        rows.append([r["name"], r["state"], health, _dur(r.get("uptime")), _dur(ka.get("latency")),
                     _pct(r.get("cpu_percent")), _pct((r.get("memory") or {}).get("percent")),
                     _pct((r.get("disk") or {}).get("percent")),
                     "/".join(f"{x:.2f}" for x in load[:3]) or "-",
                     str(r.get("calls", 0)), str(r.get("errors", 0))])
        for why in (r.get("reasons") or []) + (r.get("notes") or []):
            notes.append(f"{r['name']}: {why}")
        if r.get("error"):
            notes.append(f"{r['name']}: {r['error']}")
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    drv = st.get("driver") or {}
    summ = st["summary"]
    states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(summ["states"].items()))
    top = (f"driver {drv.get('hostname')} pid {drv.get('pid')}, system {st.get('system')}: "
           f"{summ['machines']} machines ({states or 'none'}), "
           f"{len(summ['unhealthy'])} unhealthy")
    return "\n".join([top, ""] + lines + ([""] + notes if notes else [])) + "\n"


# -- commands --------------------------------------------------------------------------------

def cmd_status(args: argparse.Namespace) -> int:
    st = json.loads(fetch(args.url, "/status.json", timeout=args.timeout))
    if args.json:
        json.dump(st, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_status(st))
    return 1 if st["summary"]["unhealthy"] else 0


def cmd_profile(args: argparse.Namespace) -> int:
    params: Dict[str, Any] = {"seconds": args.seconds, "format": "json", "mode": args.mode,
                              "interval": args.interval}
    if args.machine:
        params["machine"] = args.machine
    print(f"profiling for {args.seconds:g} s ...", file=sys.stderr)
    data = json.loads(fetch(args.url, "/profile", params, timeout=args.seconds + args.timeout))
    prof = Profile.from_json(data)
    fmt = args.format or ("collapsed" if args.output == "-" else guess_format(args.output))
    if args.output == "-":
        if fmt != "collapsed":
            raise CommandError("only collapsed stacks can be written to stdout (-o -)")
        sys.stdout.write(prof.collapsed(by_machine=args.by_machine))
    elif fmt == "collapsed" and args.by_machine:
        with open(args.output, "w") as f:
            f.write(prof.collapsed(by_machine=True))
    else:
        prof.write(args.output, fmt)
    sys.stderr.write(prof.summary(args.top))
    if args.output != "-":
        print(f"wrote {fmt} profile to {args.output}", file=sys.stderr)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    data = json.loads(fetch(args.url, "/stats", timeout=args.timeout))
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


# Subcommands: name -> (function, help, add_arguments). Later commands (``gc`` for the
# EC2 backend) add an entry here.
COMMANDS: Dict[str, tuple] = {}


def _status_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="the driver's debug address (http://host:port or :port)")
    p.add_argument("--json", action="store_true", help="print the raw JSON status")


def _profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="the driver's debug address (http://host:port or :port)")
    p.add_argument("--seconds", "-s", type=float, default=10.0, help="how long to sample (default 10)")
    p.add_argument("-o", "--output", required=True,
                   help="file to write: .prof/.pstats = pstats, .json = JSON, .pb.gz/.pprof = "
                        "pprof, else collapsed; - = stdout")
    p.add_argument("--format", choices=("collapsed", "pstats", "json", "pprof"),
                   help="override the file suffix")
    p.add_argument("--machine", "-m", action="append", help="profile only this machine (repeatable)")
    p.add_argument("--mode", choices=("cpu", "wall"), default="cpu",
                   help="cpu: threads that ran (default); wall: every thread, waiting or not")
    p.add_argument("--interval", type=float, default=0.01, help="seconds between samples (default 0.01)")
    p.add_argument("--by-machine", action="store_true", help="collapsed stacks start with the machine's name")
    p.add_argument("--top", type=int, default=10, help="functions in the summary on stderr (default 10)")


def _stats_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="the driver's debug address (http://host:port or :port)")


COMMANDS["status"] = (cmd_status, "machines, health and load of a running driver", _status_args)
COMMANDS["profile"] = (cmd_profile, "profile a running driver and its machines", _profile_args)
COMMANDS["stats"] = (cmd_stats, "per-method call statistics of a running driver", _stats_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bigmp", description="Inspect a running bigmp driver "
                                     "through its debug server (BIGMP_DEBUG_ADDR).")
    sub = parser.add_subparsers(dest="command", metavar="command")
    sub.required = True
    for name, (fn, help_, add) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add(p)
        p.add_argument("--timeout", type=float, default=30.0,
                       help="seconds to wait for the driver (added to --seconds for profile)")
        p.set_defaults(func=fn)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except CommandError as exc:
        print(f"bigmp {args.command}: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
