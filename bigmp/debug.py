"""The driver's debug HTTP server: status page, cluster profiles and call statistics.

Off by default. Turn it on with ``b.serve_debug(address)``, the ``--bigmp-debug-addr``
driver flag or ``BIGMP_DEBUG_ADDR``. A bare port (``8080`` or ``:8080``) binds loopback
only; name a host (``0.0.0.0:8080``) to be reachable from elsewhere, and remember that the
pages have no authentication and the profile endpoint costs the machines CPU.

========================================== ==============================================
``/debug/bigmp/status``                    HTML: every machine with its state, uptime,
                                           keepalive latency, CPU, memory, disk, load,
                                           calls and errors; ``?refresh=N`` reloads every
                                           N s (default 10, 0 = never)
``/debug/bigmp/status.json``               the same as JSON (also ``status?format=json``)
``/debug/bigmp/profile?seconds=N``         profile every RUNNING machine and the driver
                                           for N s (default 10); ``&machine=NAME``
                                           (repeatable: those machines only),
                                           ``&mode=cpu|wall``, ``&format=collapsed|pstats|
                                           json|pprof``, ``&by_machine=1``
``/debug/bigmp/stats``                     per-method call statistics (JSON), driver and
                                           machines
========================================== ==============================================

Everything runs on stdlib :mod:`http.server` in one daemon thread (plus one per request).
"""
from __future__ import annotations

import html
import json
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import parse_qs, urlsplit

from . import __version__
from . import stats as _stats

log = logging.getLogger("bigmp.debug")

__all__ = ["DebugServer", "serve", "status", "parse_address", "render_status"]

PREFIX = "/debug/bigmp"
MEMORY_UNHEALTHY = 95.0     # percent of memory in use; the same bound as Supervisor.keepalive
MAX_PROFILE_SECONDS = 600.0
LOOPBACK = "127.0.0.1"


def parse_address(address: Any) -> Tuple[str, int]:
    """``None``/""/``8080``/``":8080"`` -> loopback; ``"host:port"``, ``"[::1]:port"``,
    ``(host, port)`` as given (port 0: any free port)."""
    if address is None or address == "":
        return LOOPBACK, 0
    if isinstance(address, int):
        return LOOPBACK, address
    if isinstance(address, (tuple, list)):
        host, port = address
        return (host or LOOPBACK), int(port)
    text = str(address).strip()
    if text.isdigit():
        return LOOPBACK, int(text)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"debug address must be host:port, :port or port, not {address!r}")
    host = host.strip("[]") or LOOPBACK
    return host, int(port)


# -- status --------------------------------------------------------------------------------

def _driver_info() -> Dict[str, Any]:
    info: Dict[str, Any] = {"pid": os.getpid(), "hostname": socket.gethostname(),
                            "bigmp": __version__}
    try:
        import psutil
        info["uptime"] = time.time() - psutil.Process().create_time()
    except Exception:
        pass
    return info


def _machine_status(m, info: Any, mstats: Any, driver_rows: List[dict]) -> Dict[str, Any]:
    from .machine import State
    kp = m.keepalive
    reply = dict(getattr(kp, "reply", None) or {})
    row: Dict[str, Any] = {
        "name": m.name, "state": m.state.name, "addr": str(m.addr) if m.addr else None,
        "hostname": m.hostname, "pid": m.pid,
        "error": str(m.err) if m.err is not None and m.state == State.STOPPED else None,
        "keepalive": None, "uptime": None, "cpu_percent": None, "memory": None,
        "disk": None, "load": None, "cpus": None, "threads": None,
    }
    if kp is not None and reply:
        age = time.monotonic() - kp.last_ok
        row["keepalive"] = {"latency": kp.latency, "age": age, "lease": reply.get("lease"),
                            "memory_percent": reply.get("memory_percent"),
                            "healthy": reply.get("healthy", True)}
        if reply.get("uptime") is not None:
            row["uptime"] = reply["uptime"] + age
    reasons: List[str] = []      # why it is unhealthy
    notes: List[str] = []        # worth seeing, not unhealthy (a busy machine answers late)
    if isinstance(info, dict):
        row.update({k: info.get(k) for k in ("cpu_percent", "memory", "disk", "load", "cpus",
                                             "threads", "hostname", "pid")})
        row["uptime"] = info.get("uptime", row["uptime"])
    elif isinstance(info, BaseException) and m.state == State.RUNNING:
        notes.append(f"no answer to Supervisor.info: {type(info).__name__}: {info}")
    mem = (row["memory"] or {}).get("percent")
    if mem is None and reply:
        mem = reply.get("memory_percent")
    if (mem is not None and mem >= MEMORY_UNHEALTHY) or (reply and not reply.get("healthy", True)):
        reasons.append(f"memory nearly exhausted ({mem or reply.get('memory_percent', 0):.0f}% used)")
    row["healthy"] = m.state == State.RUNNING and not reasons
    row["reasons"] = reasons
    row["notes"] = notes
    mine = [r for r in driver_rows if r["machine"] == m.name]
    row["driver_calls"], row["driver_errors"] = _stats.user_calls(mine)
    served = (mstats or {}).get("served") if isinstance(mstats, dict) else None
    if served:
        row["calls"], row["errors"] = _stats.user_calls(served["rows"])
        row["served_methods"] = _stats.aggregate(served["rows"])
    else:
        row["calls"], row["errors"] = row["driver_calls"], row["driver_errors"]
    return row


def status(b, timeout: float = 3.0) -> Dict[str, Any]:
    """The status of session ``b`` as a JSON-ready dict (RUNNING machines are asked for
    ``Supervisor.info`` and ``Supervisor.stats`` in parallel, each within ``timeout``)."""
    from .machine import State
    machines = b.machines()
    running = [m for m in machines if m.state == State.RUNNING]
    answers: Dict[Tuple[str, str], Any] = {}
    if running:
        with ThreadPoolExecutor(max_workers=min(32, 2 * len(running)),
                                thread_name_prefix="bigmp-status") as pool:
            futs = {(m.name, what): pool.submit(m.call, f"Supervisor.{what}", timeout=timeout)
                    for m in running for what in ("info", "stats")}
            for key, fut in futs.items():
                try:
                    answers[key] = fut.result()
                except Exception as exc:
                    answers[key] = exc
    driver_rows = b.stats.rows() if b.stats is not None else []
    rows = [_machine_status(m, answers.get((m.name, "info")), answers.get((m.name, "stats")),
                            driver_rows) for m in machines]
    states: Dict[str, int] = {}
    for r in rows:
        states[r["state"]] = states.get(r["state"], 0) + 1
    unhealthy = [r["name"] for r in rows if r["state"] == "RUNNING" and not r["healthy"]]
    return {
        "time": time.time(),
        "system": getattr(b.system, "name", None),
        "driver": _driver_info(),
        "summary": {"machines": len(rows), "states": states, "unhealthy": unhealthy},
        "machines": rows,
        "driver_methods": _stats.aggregate(driver_rows),
    }


# -- HTML ----------------------------------------------------------------------------------

def _bytes(n: Optional[float]) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return str(n)


def _dur(s: Optional[float]) -> str:
    if s is None:
        return "–"
    if s < 1:
        return f"{s * 1000:.1f} ms" if s < 0.1 else f"{s * 1000:.0f} ms"
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(int(s), 60)
    h, m = divmod(m, 60)
    d, h = divmod(h, 24)
    return f"{d}d {h:02d}h" if d else (f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s")


def _bar(pct: Optional[float], text: str, scale: float = 100.0) -> str:
    if pct is None:
        return '<span class="na">–</span>'
    width = max(0.0, min(100.0, 100.0 * pct / scale))
    level = "hot" if width >= 90 else ("warm" if width >= 70 else "ok")
    return (f'<div class="bar {level}"><span style="width:{width:.0f}%"></span></div>'
            f'<div class="sub">{html.escape(text)}</div>')


_E = html.escape

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f4f6f9;color:#1d2433}
header{background:#1d2433;color:#fff;padding:14px 28px;display:flex;align-items:baseline;gap:18px;flex-wrap:wrap}
header h1{font-size:20px;margin:0;font-weight:600} header .meta{color:#aab3c5;font-size:13px}
header a{color:#8fc1ff;margin-left:auto} header a+a{margin-left:0}
main{padding:18px 28px}
.chips{display:flex;gap:10px;margin:0 0 16px;flex-wrap:wrap}
.chip{background:#fff;border-radius:8px;padding:8px 14px;box-shadow:0 1px 2px #0001}
.chip b{font-size:18px;display:block}
table{border-collapse:collapse;width:100%;background:#fff;border-radius:8px;overflow:hidden;box-shadow:0 1px 3px #0002;margin-bottom:22px}
th{background:#e9edf3;text-align:left;font-weight:600;font-size:12px;text-transform:uppercase;letter-spacing:.04em;color:#4a5568;padding:8px 10px}
td{padding:8px 10px;border-top:1px solid #edf0f4;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td .sub{white-space:nowrap} td .addr{white-space:normal;word-break:break-all;max-width:220px}
tr.unhealthy td{background:#fff1f0}
.name{font-weight:600} .sub{color:#6b7385;font-size:12px}
.badge{display:inline-block;border-radius:10px;padding:1px 9px;font-size:12px;font-weight:600}
.RUNNING{background:#d8f5e3;color:#11693a} .STARTING{background:#fff2cc;color:#7a5b00}
.UNSTARTED{background:#e6e9ef;color:#4a5568} .STOPPED{background:#e6e9ef;color:#6b7385}
.bad{background:#ffd9d6;color:#a61b0f} .good{background:#d8f5e3;color:#11693a}
.bar{height:8px;width:110px;background:#e6e9ef;border-radius:4px;overflow:hidden}
.bar span{display:block;height:100%;background:#3b82f6}
.bar.warm span{background:#f59e0b} .bar.hot span{background:#dc2626}
.err{color:#a61b0f;font-size:12px;white-space:pre-wrap} .na{color:#9aa3b5}
h2{font-size:15px;margin:8px 0 8px}
footer{color:#6b7385;font-size:12px;padding:0 28px 20px}
"""


def render_status(st: Dict[str, Any], refresh: int = 10) -> str:
    """The status page (HTML) for a :func:`status` dict."""
    out: List[str] = []
    w = out.append
    summ = st["summary"]
    drv = st["driver"]
    w("<!doctype html><html lang=en><head><meta charset=utf-8>")
    if refresh > 0:
        w(f'<meta http-equiv="refresh" content="{int(refresh)}">')
    w(f"<title>bigmp status — {summ['machines']} machines</title><style>{_CSS}</style></head><body>")
    w(f"<header><h1>bigmp</h1><span class=meta>driver {_E(str(drv.get('hostname')))} pid "
      f"{drv.get('pid')} · system {_E(str(st.get('system')))} · bigmp {_E(drv.get('bigmp', ''))}"
      f" · up {_dur(drv.get('uptime'))} · {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(st['time']))}"
      f"</span><a href='{PREFIX}/status.json'>JSON</a><a href='{PREFIX}/stats'>stats</a>"
      f"<a href='{PREFIX}/profile?seconds=10'>profile 10 s</a></header><main>")
    w("<div class=chips>")
    w(f"<div class=chip><b>{summ['machines']}</b>machines</div>")
    for state in ("RUNNING", "STARTING", "STOPPED"):
        if summ["states"].get(state):
            w(f"<div class=chip><b>{summ['states'][state]}</b>{state.lower()}</div>")
    n_bad = len(summ["unhealthy"])
    w(f"<div class=chip><b class='{'err' if n_bad else ''}'>{n_bad}</b>unhealthy</div></div>")
    w("<table id=machines><thead><tr><th>machine</th><th>state</th><th>health</th><th>uptime</th>"
      "<th>keepalive</th><th>CPU</th><th>memory</th><th>disk</th><th>load</th>"
      "<th title='calls served, without bigmp&#39;s own Supervisor calls'>calls</th>"
      "<th>errors</th></tr></thead><tbody>")
    for r in st["machines"]:
        healthy = r["healthy"]
        cls = "machine" + ("" if healthy or r["state"] != "RUNNING" else " unhealthy")
        w(f"<tr class='{cls}' data-machine='{_E(r['name'])}' data-state='{r['state']}' "
          f"data-healthy='{str(healthy).lower()}'>")
        where = " · ".join(str(x) for x in (r.get("hostname"), r.get("pid") and f"pid {r['pid']}") if x)
        w(f"<td><div class=name>{_E(r['name'])}</div><div class=sub>{_E(where)}</div>"
          f"<div class='sub addr'>{_E(r.get('addr') or '')}</div></td>")
        w(f"<td><span class='badge {r['state']}'>{r['state']}</span></td>")
        if r["state"] != "RUNNING":
            w("<td><span class=na>–</span></td>")
        else:
            badge = ("<span class='badge good'>healthy</span>" if healthy
                     else "<span class='badge bad'>unhealthy</span>")
            w(f"<td>{badge}" + "".join(f"<div class=err>{_E(x)}</div>" for x in r["reasons"])
              + "".join(f"<div class=sub>{_E(x)}</div>" for x in r["notes"]) + "</td>")
        w(f"<td class=num>{_dur(r.get('uptime'))}</td>")
        ka = r.get("keepalive")
        w("<td class=num>" + (f"{_dur(ka['latency'])}<div class=sub>{_dur(ka['age'])} ago</div>"
                              if ka and ka.get("latency") is not None else "–") + "</td>")
        if r["state"] == "RUNNING" and r.get("memory"):
            cpu = r.get("cpu_percent") or 0.0
            cpu_text = f"{cpu:.0f}% · {r.get('cpus') or 1} CPUs"
            w(f"<td>{_bar(cpu, cpu_text)}</td>")   # 100% = one core (one Python thread)
            mem = r["memory"]
            mem_text = f"{mem.get('percent', 0):.0f}% used · rss {_bytes(mem.get('rss'))}"
            w(f"<td>{_bar(mem.get('percent'), mem_text)}</td>")
            disk = r.get("disk") or {}
            disk_text = f"{_bytes(disk.get('free'))} free of {_bytes(disk.get('total'))}"
            w(f"<td>{_bar(disk.get('percent'), disk_text) if disk else '–'}</td>")
            load = r.get("load") or []
            w("<td class=num>" + (" ".join(f"{x:.2f}" for x in load) or "–") + "</td>")
        else:
            w("<td colspan=4>" + (f"<div class=err>{_E(r['error'])}</div>" if r.get("error")
                                  else "<span class=na>–</span>") + "</td>")
        w(f"<td class=num>{r.get('calls', 0)}</td>"
          f"<td class=num>{r.get('errors', 0) or '<span class=na>0</span>'}</td></tr>")
    if not st["machines"]:
        w("<tr><td colspan=11 class=na>no machines yet</td></tr>")
    w("</tbody></table>")
    w(_methods_table("Calls made by the driver", st.get("driver_methods") or {}, "driver-methods"))
    served: Dict[str, Dict[str, Any]] = {}
    for r in st["machines"]:
        for meth, acc in (r.get("served_methods") or {}).items():
            served.setdefault(meth, []).append(acc)
    merged = {meth: _sum(accs) for meth, accs in served.items()}
    w(_methods_table("Calls served by the machines", merged, "served-methods"))
    w("</main><footer>CPU: the machine process's CPU use since the previous status request "
      "(100% = one core). Memory: the host's memory in use; a machine above "
      f"{MEMORY_UNHEALTHY:.0f}% is unhealthy. Disk: the temporary directory's file system."
      "</footer></body></html>")
    return "".join(out)


def _sum(accs: List[Dict[str, Any]]) -> Dict[str, Any]:
    out = {k: 0 for k in ("count", "errors", "total", "request_bytes", "reply_bytes")}
    out["max"] = 0.0
    for a in accs:
        for k in out:
            out[k] = max(out[k], a[k]) if k == "max" else out[k] + a[k]
    out["mean"] = out["total"] / out["count"] if out["count"] else 0.0
    return out


def _methods_table(title: str, methods: Dict[str, Dict[str, Any]], ident: str) -> str:
    rows = sorted(methods.items(), key=lambda kv: (-kv[1]["count"], kv[0]))
    out = [f"<h2>{_E(title)}</h2><table id={ident}><thead><tr><th>method</th><th>calls</th>"
           "<th>errors</th><th>mean</th><th>max</th><th>total</th><th>request bytes</th>"
           "<th>reply bytes</th></tr></thead><tbody>"]
    for meth, a in rows:
        out.append(f"<tr><td>{_E(meth)}</td><td class=num>{a['count']}</td>"
                   f"<td class=num>{a['errors']}</td><td class=num>{_dur(a['mean'])}</td>"
                   f"<td class=num>{_dur(a['max'])}</td><td class=num>{_dur(a['total'])}</td>"
                   f"<td class=num>{_bytes(a['request_bytes'])}</td>"
                   f"<td class=num>{_bytes(a['reply_bytes'])}</td></tr>")
    if not rows:
        out.append("<tr><td colspan=8 class=na>no calls yet</td></tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _index() -> str:
    links = [("status", "machines, health and load (HTML)"), ("status.json", "the same as JSON"),
             ("stats", "per-method call statistics (JSON)"),
             ("profile?seconds=10", "profile all machines and the driver for 10 s (collapsed stacks)"),
             ("profile?seconds=10&format=pstats", "the same as a pstats file")]
    items = "".join(f"<li><a href='{PREFIX}/{p}'>{PREFIX}/{_E(p)}</a>: {_E(d)}</li>"
                    for p, d in links)
    return (f"<!doctype html><html><head><meta charset=utf-8><title>bigmp debug</title>"
            f"<style>{_CSS}</style></head><body><header><h1>bigmp debug</h1></header>"
            f"<main><ul>{items}</ul></main></body></html>")


# -- HTTP ----------------------------------------------------------------------------------

class _HTTPError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class _Handler(BaseHTTPRequestHandler):
    server_version = f"bigmp-debug/{__version__}"

    def log_message(self, fmt, *args):   # not on stderr: the driver's output is the user's
        log.debug("%s " + fmt, self.address_string(), *args)

    def do_GET(self):
        url = urlsplit(self.path)
        q = {k: v for k, v in parse_qs(url.query).items()}
        path = url.path.rstrip("/") or "/"
        try:
            if path in ("/", "/debug", PREFIX):
                return self._reply(200, "text/html; charset=utf-8", _index().encode())
            if path == PREFIX + "/status.json" or (path == PREFIX + "/status"
                                                   and _one(q, "format") == "json"):
                return self._json(status(self.server.session))
            if path == PREFIX + "/status":
                refresh = int(_one(q, "refresh", "10"))
                page = render_status(status(self.server.session), refresh)
                return self._reply(200, "text/html; charset=utf-8", page.encode())
            if path == PREFIX + "/stats":
                return self._json(self.server.session.collect_stats())
            if path == PREFIX + "/profile":
                return self._profile(q)
            raise _HTTPError(404, f"no page {url.path!r}; try {PREFIX}/")
        except _HTTPError as exc:
            self._reply(exc.code, "text/plain; charset=utf-8", f"{exc}\n".encode())
        except LookupError as exc:
            self._reply(404, "text/plain; charset=utf-8", f"{exc}\n".encode())
        except ValueError as exc:
            self._reply(400, "text/plain; charset=utf-8", f"{exc}\n".encode())
        except RuntimeError as exc:
            self._reply(503, "text/plain; charset=utf-8", f"{exc}\n".encode())
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:
            log.exception("debug page %s failed", self.path)
            self._reply(500, "text/plain; charset=utf-8", f"{type(exc).__name__}: {exc}\n".encode())

    def _profile(self, q: Dict[str, List[str]]) -> None:
        seconds = float(_one(q, "seconds", "10"))
        if not 0 < seconds <= MAX_PROFILE_SECONDS:
            raise ValueError(f"seconds must be in (0, {MAX_PROFILE_SECONDS:g}]")
        fmt = _one(q, "format", "collapsed")
        if fmt not in ("collapsed", "pstats", "json", "pprof"):
            raise ValueError("format must be collapsed, pstats, json or pprof")
        machines = q.get("machine") or None
        prof = self.server.session.profile(seconds, machine=machines,
                                           interval=float(_one(q, "interval", "0.01")),
                                           mode=_one(q, "mode", "cpu"))
        if fmt == "pstats":
            self._reply(200, "application/octet-stream", prof.pstats_bytes(),
                        {"Content-Disposition": 'attachment; filename="bigmp.prof"'})
        elif fmt == "pprof":
            self._reply(200, "application/octet-stream", prof.pprof_bytes(),
                        {"Content-Disposition": 'attachment; filename="bigmp.pb.gz"'})
        elif fmt == "json":
            self._json(prof.to_json())
        else:
            body = prof.collapsed(by_machine=_one(q, "by_machine", "0") in ("1", "true", "yes"))
            self._reply(200, "text/plain; charset=utf-8", body.encode())

    def _json(self, obj: Any) -> None:
        self._reply(200, "application/json", json.dumps(obj, default=str).encode())

    def _reply(self, code: int, ctype: str, body: bytes, headers: Optional[dict] = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


def _one(q: Dict[str, List[str]], key: str, default: Optional[str] = None) -> Optional[str]:
    values = q.get(key)
    return values[-1] if values else default


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, session):
        self.address_family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        self.session = session
        super().__init__(addr, _Handler)


class DebugServer:
    """The running debug server of one session: ``url``, ``address``, ``close()``."""

    def __init__(self, session, address: Any = None):
        host, port = parse_address(address)
        self._httpd = _Server((host, port), session)
        self.address = self._httpd.server_address[:2]
        shown = f"[{self.address[0]}]" if ":" in self.address[0] else self.address[0]
        self.url = f"http://{shown}:{self.address[1]}{PREFIX}/"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True,
                                        name="bigmp-debug", kwargs={"poll_interval": 0.2})
        self._thread.start()
        if host not in ("127.0.0.1", "::1", "localhost"):
            log.warning("bigmp debug pages are served on %s without authentication", self.url)
        else:
            log.info("bigmp debug pages at %s", self.url)

    def close(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
        self._httpd.server_close()

    def __repr__(self) -> str:
        return f"<bigmp.DebugServer {self.url}>"


def serve(session, address: Any = None) -> DebugServer:
    """Start (or return the already running) debug server of ``session``."""
    current = getattr(session, "debug", None)
    if current is not None:
        if address is None or parse_address(address)[1] in (0, current.address[1]):
            return current
        raise RuntimeError(f"this session already serves its debug pages at {current.url}")
    server = DebugServer(session, address)
    session.debug = server
    return server
