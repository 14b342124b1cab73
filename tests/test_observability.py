"""Observability: cluster profiles, per-method statistics, the debug server and the CLI."""
from __future__ import annotations

import gzip
import json
import pstats
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from html.parser import HTMLParser

import pytest

import bigmp
from bigmp import State, cli, config, debug
from tests.conftest import ROOT, wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
COLLAPSED_LINE = re.compile(r"^\S.* \d+$")


class Busy:
    """Burns CPU in one recognisable function until told to stop."""

    def __init__(self):
        self.stop_flag = False
        self.running = False

    def spin(self):
        self.stop_flag = False
        self.running = True
        n = 0
        while not self.stop_flag:       # plain bytecode: this frame is the leaf of the stack
            n += 1
        self.running = False
        return n

    def spinning(self):
        return self.running

    def stop(self):
        self.stop_flag = True


class Counted:
    def ok(self, payload):
        return payload * 2

    def bad(self, message):
        raise KeyError(message)


class MemoryPressure:
    def fake(self, percent):
        """Make this machine's psutil report ``percent`` of memory in use (None: the truth)."""
        import psutil
        real = getattr(psutil, "_real_virtual_memory", psutil.virtual_memory)
        psutil._real_virtual_memory = real
        psutil.virtual_memory = real if percent is None else \
            (lambda: real()._replace(percent=float(percent)))
        return True


@pytest.fixture(scope="module")
def cluster():
    b = bigmp.start(system="local", local_mode="fork", keepalive_interval=0.5)
    machines = b.start(2, services={"Busy": Busy(), "Counted": Counted()})
    for m in machines:
        assert m.wait(State.RUNNING, timeout=30) == State.RUNNING, m.err
    wait_until(lambda: all(m.keepalive.latency is not None for m in machines),
               what="a first keepalive answer from every machine")
    server = b.serve_debug()
    yield b, machines, server
    b.shutdown()


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as resp:
        return resp.read()


def get_json(url: str):
    return json.loads(get(url))


def run_cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "bigmp.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


# -- statistics ------------------------------------------------------------------------------

def test_statistics_can_be_turned_off(monkeypatch):
    for how in ("keyword", "environment"):
        kwargs = {"stats": False} if how == "keyword" else {}
        if how == "environment":
            monkeypatch.setenv("BIGMP_STATS", "0")
        with bigmp.start(system="local", **kwargs) as b:
            m = b.start(1, services={"Counted": Counted()})[0]
            assert m.call("Counted.ok", "x") == "xx"
            assert m.call_async("Counted.ok", "y").result(timeout=30) == "yy"
            assert b.stats is None
            data = b.collect_stats()
            assert data["driver"] is None
            assert data["machines"][m.name] == {"served": None, "called": None}
            server = b.serve_debug("127.0.0.1:0")
            assert get_json(server.url + "status.json")["summary"]["machines"] == 1
            assert get_json(server.url + "stats")["driver"] is None


def test_stats_match_the_calls_made(cluster):
    b, (m0, m1), server = cluster
    for i in range(7):
        assert m0.call("Counted.ok", "x" * (100 + i)) == "x" * (100 + i) * 2
    for _ in range(3):
        with pytest.raises(KeyError):
            m0.call("Counted.bad", "nope")
    m1.call("Counted.ok", "y")
    m1.call("Counted.ok", "y")

    rows = {(r["machine"], r["method"]): r for r in b.stats.rows()}
    ok, bad = rows[(m0.name, "Counted.ok")], rows[(m0.name, "Counted.bad")]
    assert (ok["count"], ok["errors"]) == (7, 0)
    assert (bad["count"], bad["errors"]) == (3, 3)
    assert rows[(m1.name, "Counted.ok")]["count"] == 2
    for r in (ok, bad):
        assert r["request_bytes"] > 0 and r["reply_bytes"] > 0
        assert 0 < r["max"] <= r["total"]
    assert ok["request_bytes"] > 7 * 100 and ok["reply_bytes"] > 7 * 200   # the payloads

    served = {r["method"]: r for r in m0.call("Supervisor.stats")["served"]["rows"]}
    assert (served["Counted.ok"]["count"], served["Counted.ok"]["errors"]) == (7, 0)
    assert (served["Counted.bad"]["count"], served["Counted.bad"]["errors"]) == (3, 3)
    for name, r in (("Counted.ok", ok), ("Counted.bad", bad)):
        # Both ends count the same pickled payloads: what one sent, the other received.
        assert served[name]["request_bytes"] == r["request_bytes"]
        assert served[name]["reply_bytes"] == r["reply_bytes"]

    # The same numbers through the session and through the debug server.
    for data in (b.collect_stats(), get_json(server.url + "stats")):
        assert data["driver"]["methods"]["Counted.ok"]["count"] == 9
        assert data["driver"]["methods"]["Counted.bad"]["errors"] == 3
        assert set(data["machines"]) == {m0.name, m1.name}
        m1_served = data["machines"][m1.name]["served"]["methods"]
        assert m1_served["Counted.ok"]["count"] == 2


def test_stats_table_is_bounded():
    from bigmp.stats import OTHER, Stats
    s = Stats(limit=3)
    for i in range(10):
        s.record("m", f"S.f{i}", 0.001, False, 1, 1)
    methods = {r["method"]: r["count"] for r in s.rows()}
    assert len(methods) <= 4 and methods[OTHER] >= 7


# -- profiles --------------------------------------------------------------------------------

def _spinning(machines):
    futures = [m.call_async("Busy.spin", timeout=120) for m in machines]
    wait_until(lambda: all(m.call("Busy.spinning") for m in machines), timeout=30,
               what="Busy.spin running on every machine")
    return futures


def test_profile_of_two_busy_machines(cluster, tmp_path):
    b, machines, _ = cluster
    futures = _spinning(machines)
    try:
        prof = b.profile(seconds=1.0)
        one = b.profile(seconds=0.3, machine=machines[1].name)
    finally:
        for m in machines:
            m.call("Busy.stop")
        assert all(f.result(timeout=60) > 0 for f in futures)

    # The whole program: both machines and the driver itself.
    assert set(prof.machines) == {m.name for m in machines} | {"driver"} and not prof.errors
    top, self_us, _ = prof.top(1)[0]
    assert top.startswith("Busy.spin (") and "test_observability.py" in top, prof.summary()
    spin = prof.functions()[top]
    assert set(spin["machines"]) == {m.name for m in machines}
    assert all(us > 0 for us in spin["machines"].values())
    assert self_us > prof.total / 2, prof.summary()

    # One machine only.
    assert set(one.machines) == {machines[1].name}
    assert one.top(1)[0][0] == top

    # Collapsed stacks: one "frame;frame count" line per stack, the spin frame as a leaf.
    text = prof.collapsed()
    assert text and all(COLLAPSED_LINE.match(line) for line in text.splitlines())
    assert any(line.rsplit(" ", 1)[0].endswith(top) for line in text.splitlines())
    by_machine = prof.collapsed(by_machine=True)
    assert {line.split(";", 1)[0] for line in by_machine.splitlines()} <= \
        {f"machine {m.name}" for m in machines} | {"driver"}
    assert {f"machine {m.name}" for m in machines} <= \
        {line.split(";", 1)[0] for line in by_machine.splitlines()}

    # pstats: loadable by the standard library, spin on top by own time.
    path = str(tmp_path / "cluster.prof")
    prof.write(path)
    st = pstats.Stats(path)
    st.sort_stats("tottime")
    first = st.fcn_list[0]
    assert first[2] == "Busy.spin" and first[0].endswith("test_observability.py")
    assert st.stats[first][2] > 0

    # JSON round trip.
    again = bigmp.profiling.Profile.from_json(json.loads(json.dumps(prof.to_json())))
    assert again.collapsed() == text


def _driver_spin(stop):
    while not stop.is_set():
        sum(range(1000))


def test_profile_includes_the_driver_when_it_profiles_the_whole_program(cluster):
    b, machines, _ = cluster
    stop = threading.Event()
    t = threading.Thread(target=_driver_spin, args=(stop,), name="busy-driver-thread")
    t.start()
    try:
        whole = b.profile(seconds=0.5)
        only = b.profile(seconds=0.2, machine=machines[0])
        asked = b.profile(seconds=0.2, machine=machines[0], driver=True)
    finally:
        stop.set()
        t.join(10)
    spin = [v for k, v in whole.functions().items() if k.startswith("_driver_spin (")]
    assert spin and set(spin[0]["machines"]) == {"driver"}
    threads = {thread for (name, thread, _s) in whole.values if name == "driver"}
    assert "busy-driver-thread" in threads
    assert not any(th.startswith("bigmp-profile-") for th in threads)   # its own waiters
    assert "driver" not in only.machines and "driver" in asked.machines


def test_profile_samples_every_thread(cluster):
    b, machines, _ = cluster
    prof = b.profile(seconds=0.3, machine=machines[0], mode="wall")
    names = {lab.split(" (")[0] for lab in prof.functions()}
    # The main thread, the lease watchdog and the connection threads, not only the caller.
    assert {"BigServer.serve_until_stopped", "Supervisor._watch_lease",
            "BigServer.serve_client"} <= names, sorted(names)
    threads = {thread for (_m, thread, _s) in prof.values}
    assert "MainThread" in threads and "bigmp-lease" in threads


def test_profile_errors(cluster):
    b, _, _ = cluster
    with pytest.raises(LookupError):
        b.profile(0.1, machine="no-such-machine")
    with pytest.raises(ValueError):
        b.profile(0.1, mode="nonsense")


# -- the debug server ------------------------------------------------------------------------

def test_status_json(cluster):
    b, machines, server = cluster
    st = get_json(server.url + "status.json")
    assert get_json(server.url + "status?format=json")["summary"]["machines"] == len(machines)
    rows = {r["name"]: r for r in st["machines"]}
    assert set(rows) == {m.name for m in machines}
    assert st["summary"]["unhealthy"] == []
    for m in machines:
        r = rows[m.name]
        assert r["state"] == "RUNNING" and r["healthy"] is True
        assert r["uptime"] > 0 and r["keepalive"]["latency"] > 0
        assert r["pid"] == m.pid and r["cpus"] >= 1 and r["cpu_percent"] >= 0
        assert 0 < r["memory"]["percent"] < 100 and r["memory"]["rss"] > 0
        assert r["disk"]["total"] > 0 and len(r["load"]) == 3
        assert isinstance(r["calls"], int) and isinstance(r["errors"], int)


class _Rows(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "data-machine" in a:
            self.rows[a["data-machine"]] = a


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                    "(apt-get install -y chromium) to render the status page in a browser")
def test_status_page_in_a_headless_browser(cluster, tmp_path):
    b, machines, server = cluster
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'chromium'}", "--dump-dom",
         server.url + "status?refresh=0"],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    parser = _Rows()
    parser.feed(out.stdout)
    assert set(parser.rows) == {m.name for m in machines}, out.stdout[:2000]
    for m in machines:
        assert parser.rows[m.name]["data-state"] == "RUNNING"
        assert parser.rows[m.name]["data-healthy"] == "true"
    assert "<title>bigmp status" in out.stdout


def test_profile_and_index_endpoints(cluster, tmp_path):
    b, machines, server = cluster
    text = get(server.url + f"profile?seconds=0.3&mode=wall&machine={machines[0].name}").decode()
    lines = text.splitlines()
    assert lines and all(COLLAPSED_LINE.match(line) for line in lines)
    path = tmp_path / "p.prof"
    path.write_bytes(get(server.url + "profile?seconds=0.2&mode=wall&format=pstats"))
    assert pstats.Stats(str(path)).total_tt > 0
    assert get(server.url + "profile?seconds=0.2&format=pprof")[:2] == b"\x1f\x8b"   # gzip
    data = get_json(server.url + "profile?seconds=0.2&mode=wall&format=json")
    assert set(data["machines"]) == {m.name for m in machines} | {"driver"}
    for bad, code in (("profile?seconds=0.1&machine=nope", 404), ("profile?seconds=x", 400),
                      ("profile?seconds=0.1&format=svg", 400), ("nothing-here", 404)):
        with pytest.raises(urllib.error.HTTPError) as err:
            get(server.url + bad)
        assert err.value.code == code, bad
    assert b"/debug/bigmp/status" in get(server.url)


def test_status_page_html(cluster):
    b, machines, server = cluster
    page = get(server.url + "status").decode()
    assert '<meta http-equiv="refresh" content="10">' in page
    for m in machines:
        assert f"data-machine='{m.name}'" in page


def test_unhealthy_machine_is_shown_and_logged(caplog, capsys):
    with bigmp.start(system="local", keepalive_interval=0.1) as b:
        sick, well = b.start(2, services={"Mem": MemoryPressure()})
        for m in (sick, well):
            m.wait(State.RUNNING, timeout=30)
        server = b.serve_debug("127.0.0.1:0")
        with caplog.at_level("WARNING", logger="bigmp.keepalive"):
            sick.call("Mem.fake", 97.5)
            wait_until(lambda: sick.keepalive.reply.get("healthy") is False,
                       what="an unhealthy keepalive answer")
            wait_until(lambda: any("unhealthy" in r.getMessage() and sick.name in r.getMessage()
                                   for r in caplog.records), what="the driver's warning")
        wait_until(lambda: well.keepalive.latency is not None, what="keepalive of the other")
        st = get_json(server.url + "status.json")
        rows = {r["name"]: r for r in st["machines"]}
        assert st["summary"]["unhealthy"] == [sick.name]
        assert rows[sick.name]["healthy"] is False
        assert any("memory nearly exhausted" in why for why in rows[sick.name]["reasons"])
        assert rows[well.name]["healthy"] is True
        page = get(server.url + "status?refresh=0").decode()
        assert f"class='machine unhealthy' data-machine='{sick.name}'" in page
        assert "memory nearly exhausted (98% used)" in page
        # The command line says so too, and exits with 1.
        assert cli.main(["status", server.url]) == 1
        out = capsys.readouterr().out
        assert "UNHEALTHY" in out and "memory nearly exhausted" in out
        # Said once while it lasts (not at every keepalive), and again when it is over.
        with caplog.at_level("INFO", logger="bigmp.keepalive"):
            ticks = sick.keepalive.last_ok
            wait_until(lambda: sick.keepalive.last_ok > ticks + 0.3, what="more keepalives")
            sick.call("Mem.fake", None)
            wait_until(lambda: any("healthy again" in r.getMessage() for r in caplog.records),
                       what="the all-clear")
        said = [r for r in caplog.records if sick.name in r.getMessage()]
        assert [("again" in r.getMessage()) for r in said] == [False, True]


# -- the command line ------------------------------------------------------------------------

def test_cli_status(cluster):
    b, machines, server = cluster
    host, port = server.address
    for url in (server.url, f"http://{host}:{port}", f":{port}"):
        out = run_cli("status", url)
        assert out.returncode == 0, out.stderr
        for m in machines:
            assert re.search(rf"^{re.escape(m.name)}\s+RUNNING\s+ok\s", out.stdout, re.M), out.stdout
    out = run_cli("status", "--json", f":{port}")
    assert {r["name"] for r in json.loads(out.stdout)["machines"]} == {m.name for m in machines}


def test_cli_profile(cluster, tmp_path):
    b, machines, server = cluster
    folded = tmp_path / "cluster.folded"
    out = run_cli("profile", server.url, "--seconds", "0.3", "--mode", "wall", "-o", str(folded))
    assert out.returncode == 0, out.stderr
    lines = folded.read_text().splitlines()
    assert lines and all(COLLAPSED_LINE.match(line) for line in lines)
    assert "self%" in out.stderr and "wrote collapsed profile" in out.stderr
    prof = tmp_path / "cluster.prof"
    out = run_cli("profile", server.url, "-s", "0.2", "--mode", "wall", "-m", machines[0].name,
                  "-o", str(prof))
    assert out.returncode == 0, out.stderr
    assert pstats.Stats(str(prof)).total_tt > 0
    pb = tmp_path / "cluster.pb.gz"
    out = run_cli("profile", server.url, "-s", "0.2", "--mode", "wall", "-o", str(pb))
    assert out.returncode == 0 and "wrote pprof profile" in out.stderr, out.stderr
    assert gzip.decompress(pb.read_bytes())[:1] == b"\x0a"   # field 1 (sample_type) first
    out = run_cli("stats", server.url)
    assert out.returncode == 0 and set(json.loads(out.stdout)["machines"]) == \
        {m.name for m in machines}


def test_cli_unreachable_and_entry_point():
    out = run_cli("status", "http://127.0.0.1:9")
    assert out.returncode == 2 and "cannot reach" in out.stderr
    from importlib.metadata import entry_points
    eps = entry_points()
    scripts = eps.select(group="console_scripts") if hasattr(eps, "select") \
        else eps.get("console_scripts", [])
    ours = [ep for ep in scripts if ep.name == "bigmp"]
    assert ours and ours[0].value == "bigmp.cli:main"


# -- turning it on ---------------------------------------------------------------------------

def test_debug_server_is_off_by_default_and_loopback(monkeypatch):
    monkeypatch.delenv("BIGMP_DEBUG_ADDR", raising=False)
    assert config.resolve()["debug_addr"] == ""
    with bigmp.start(system="local") as b:
        assert b.debug is None
        server = b.serve_debug()
        assert server.address[0] == "127.0.0.1" and b.serve_debug() is server
    assert debug.parse_address(":8080") == ("127.0.0.1", 8080)
    assert debug.parse_address("8080") == ("127.0.0.1", 8080)
    assert debug.parse_address("0.0.0.0:80") == ("0.0.0.0", 80)
    assert debug.parse_address("[::1]:81") == ("::1", 81)
    with pytest.raises(ValueError):
        debug.parse_address("nonsense")


def test_debug_addr_from_the_environment_and_flags(monkeypatch):
    monkeypatch.setenv("BIGMP_DEBUG_ADDR", ":0")
    b = bigmp.start(system="local")
    try:
        assert b.debug is not None and b.debug.address[0] == "127.0.0.1"
        url = b.debug.url
        assert get_json(url + "status.json")["summary"]["machines"] == 0
    finally:
        b.shutdown()
    with pytest.raises(OSError):      # shut down with its session
        get(url + "status.json")
    import argparse
    parser = bigmp.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--bigmp-debug-addr", "127.0.0.1:0"])
    assert bigmp.options_from_args(args) == {"debug_addr": "127.0.0.1:0"}
