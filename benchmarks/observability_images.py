#!/usr/bin/env python3
"""Make the images of docs/observability.md from a real run of examples/bigpi.py.

    python3 benchmarks/observability_images.py [--seconds 4] [--machines 4]

It starts ``examples/bigpi.py`` with ``BIGMP_DEBUG_ADDR`` set, waits until its machines are
working, screenshots ``/debug/bigmp/status`` with headless Chromium
(docs/img/status.png), profiles the machines with ``bigmp profile``
(docs/img/bigpi.folded) and draws the flame graph (docs/img/bigpi-flame.svg) with
benchmarks/flamegraph.py. Then it interrupts bigpi, as Ctrl-C would.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
IMG = os.path.join(ROOT, "docs", "img")
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import flamegraph  # noqa: E402
from bigmp import cli  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(url: str):
    with urllib.request.urlopen(url + "status.json", timeout=10) as r:
        return json.loads(r.read())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--machines", type=int, default=4)
    args = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium is needed for the screenshot (apt-get install -y chromium)")
    os.makedirs(IMG, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}/debug/bigmp/"
    env = dict(os.environ, BIGMP_DEBUG_ADDR=f"127.0.0.1:{port}", PYTHONPATH=ROOT)
    bigpi = subprocess.Popen([sys.executable, os.path.join(ROOT, "examples", "bigpi.py"),
                              "--machines", str(args.machines), "--samples", "2000000000"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:          # until every machine has finished a batch
            try:
                st = status(url)
                if len(st["machines"]) == args.machines and all(
                        m["state"] == "RUNNING" and m["calls"] > 0 for m in st["machines"]):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or bigpi.poll() is not None:
                sys.exit("bigpi did not get going")
            time.sleep(0.5)
        time.sleep(1.0)      # let CPU% cover a second of work, not the last poll
        png = os.path.join(IMG, "status.png")
        with tempfile.TemporaryDirectory() as profile_dir:
            subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                            "--disable-quic", "--no-first-run", "--disable-background-networking",
                            "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                            f"--user-data-dir={profile_dir}", "--window-size=1280,800",
                            f"--screenshot={png}", url + "status?refresh=0"],
                           check=True, capture_output=True, timeout=120)
        print("wrote", png)
        folded = os.path.join(IMG, "bigpi.folded")
        if cli.main(["profile", url, "--seconds", str(args.seconds), "-o", folded]) != 0:
            sys.exit("bigmp profile failed")
        svg = os.path.join(IMG, "bigpi-flame.svg")
        with open(folded) as f:
            root = flamegraph.parse(f)
        with open(svg, "w") as f:
            f.write(flamegraph.render(root, f"examples/bigpi.py --machines {args.machines}: "
                                            f"CPU profile of every machine, {args.seconds:g} s"))
        print("wrote", svg)
    finally:
        bigpi.send_signal(signal.SIGINT)
        try:
            bigpi.wait(30)
        except subprocess.TimeoutExpired:
            bigpi.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
