"""Case 7 of bench.py: the SSH backend against a real OpenSSH sshd on loopback.

Started here with tests/sshd.py (generated keys, 127.0.0.1-4); skipped when
/usr/sbin/sshd is missing. Baseline for launch: paramiko connecting to the same sshd and
running ``python -c pass``; for calls and bulk: local machines measured in the same run.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

import bigmp


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
now = time.perf_counter


def _paramiko_exec(sshd) -> float:
    # Imported here, not at the top: every SSH machine imports this program's main module
    # (bench.py, which imports this file), and paramiko would cost each of them ~80 ms of
    # imports that belong to the harness, not to the launch being measured.
    import paramiko
    t0 = now()
    client = paramiko.SSHClient()
    client.load_host_keys(sshd.known_hosts)
    client.connect("127.0.0.1", sshd.port, username=os.environ.get("USER") or "root",
                   key_filename=sshd.client_key, look_for_keys=False, allow_agent=False)
    _, out, _ = client.exec_command(f"{sys.executable} -c pass")
    out.channel.recv_exit_status()
    client.close()
    return now() - t0


def _launch(opts, n, echo) -> float:
    t0 = now()
    with bigmp.start(**opts) as b:
        ms = b.start(n, services={"Echo": echo})
        for m in ms:
            m.call("Echo.noop")
        t = now() - t0
    return t


def case_ssh(cfg, row, start_machines, per_call, echo_cls):
    if not os.path.exists("/usr/sbin/sshd"):
        print("# case 7 skipped: no /usr/sbin/sshd (tests/system-deps.sh installs it)",
              file=sys.stderr)
        return
    from tests.sshd import SSHD
    root = tempfile.mkdtemp(prefix="bench-sshd-")
    sshd = SSHD(root)
    try:
        opts = sshd.options()
        one = dict(opts, hosts=opts["hosts"][:1])
        cold = _launch(dict(one, ssh_cache_dir=os.path.join(root, "cold")), 1, echo_cls())
        _paramiko_exec(sshd)
        base1, big1, big8 = [], [], []
        for _ in range(cfg["repeat"]):
            base1.append(_paramiko_exec(sshd))
            big1.append(_launch(one, 1, echo_cls()))
            big8.append(_launch(opts, 8, echo_cls()))
        row("7a", "ssh: launch to first call, 1 machine", "s", big1, base1,
            "paramiko exec `python -c pass`", ("abs<=", 0.3), {"cold_cache_s": cold})
        row("7b", "ssh: launch to first call, 8 machines on 4 hosts", "s", big8, base1,
            "paramiko exec `python -c pass`")
        from _baselines import TLSEcho
        local = bigmp.start(system="local")
        remote = bigmp.start(**one)
        raw = TLSEcho()
        try:
            lm = start_machines(local, 1)[0]
            rm = start_machines(remote, 1)[0]
            n = cfg["calls"]
            per_call(lambda a: rm.call("Echo.echo", a), 200)
            per_call(lambda a: lm.call("Echo.echo", a), 200)
            small = b"x" * 60
            per_call(raw.call, 200, small)
            ssh_us, loc_us, raw_us = [], [], []
            for _ in range(cfg["repeat"]):
                ssh_us.append(per_call(lambda a: rm.call("Echo.echo", a), n) * 1e6)
                loc_us.append(per_call(lambda a: lm.call("Echo.echo", a), n) * 1e6)
                raw_us.append(per_call(raw.call, n, small) * 1e6)
            row("7c", "ssh: small call round trip (TLS)", "us", ssh_us, loc_us,
                "local m.call (unix socket)")
            row("7c'", "ssh: small call round trip (TLS)", "us", ssh_us, raw_us,
                "raw TLS echo, TCP loopback (ssl module)")
            data = os.urandom(cfg["bulk"])
            rm.call("Echo.echo", data)
            lm.call("Echo.echo", data)
            raw.echo(data)
            ssh_mb, loc_mb, raw_mb = [], [], []
            for _ in range(cfg["repeat"]):
                for fn, out in ((lambda: rm.call("Echo.echo", data), ssh_mb),
                                (lambda: lm.call("Echo.echo", data), loc_mb),
                                (lambda: raw.echo(data), raw_mb)):
                    t0 = now()
                    fn()
                    out.append(len(data) / (now() - t0) / 1e6)
            label = f"ssh: {cfg['bulk'] >> 20} MiB echo (TLS)"
            row("7d", label, "MB/s", ssh_mb, loc_mb, "local m.call (unix socket)")
            row("7d'", label, "MB/s", ssh_mb, raw_mb, "raw TLS echo, TCP loopback (ssl module)")
        finally:
            raw.close()
            remote.shutdown()
            local.shutdown()
    finally:
        sshd.stop()
