"""A real OpenSSH server on loopback for the SSH tests (keys generated per test session).

One sshd listens on 127.0.0.1 ... 127.0.0.4 (all loopback), so the tests have four hosts.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, List

import psutil

SSHD_BIN = "/usr/sbin/sshd"
HOSTS = ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"]


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _keygen(path: str) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", path], check=True)


class SSHD:
    """A running sshd: its port, client key, known_hosts and process."""

    def __init__(self, root: str):
        self.root = root
        os.makedirs(root, exist_ok=True)
        self.port = _free_port()
        self.host_key = os.path.join(root, "host_key")
        self.client_key = os.path.join(root, "client_key")
        _keygen(self.host_key)
        _keygen(self.client_key)
        shutil.copy(self.client_key + ".pub", os.path.join(root, "authorized_keys"))
        self.known_hosts = os.path.join(root, "known_hosts")
        with open(self.host_key + ".pub") as f:
            pub = " ".join(f.read().split()[:2])
        with open(self.known_hosts, "w") as f:
            for h in HOSTS:
                f.write(f"[{h}]:{self.port} {pub}\n")
        self.config = os.path.join(root, "sshd_config")
        listen = "".join(f"ListenAddress {h}:{self.port}\n" for h in HOSTS)
        with open(self.config, "w") as f:
            f.write(listen + f"""HostKey {self.host_key}
AuthorizedKeysFile {root}/authorized_keys
PidFile {root}/sshd.pid
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
UseDNS no
MaxSessions 64
MaxStartups 64
""")
        os.makedirs("/run/sshd", exist_ok=True)
        subprocess.run([SSHD_BIN, "-t", "-f", self.config], check=True)
        self.proc = subprocess.Popen([SSHD_BIN, "-D", "-e", "-f", self.config],
                                     stdout=subprocess.DEVNULL, stderr=open(
                                         os.path.join(root, "sshd.log"), "wb"))
        deadline = time.monotonic() + 15
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(64).startswith(b"SSH-"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("sshd did not start: " + open(
                    os.path.join(root, "sshd.log")).read())
            time.sleep(0.02)

    def hosts(self, n: int = 4, **params) -> List[str]:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return [f"{h}:{self.port}" + (f"?{query}" if query else "") for h in HOSTS[:n]]

    def options(self, n_hosts: int = 4, cache_dir: str = "") -> Dict:
        """bigmp.start keywords for machines on this sshd's hosts."""
        return {"system": "ssh", "hosts": self.hosts(n_hosts),
                "ssh_identity": [self.client_key], "ssh_known_hosts": self.known_hosts,
                "ssh_python": sys.executable,
                "ssh_cache_dir": cache_dir or os.path.join(self.root, "cache")}

    def kill_all(self) -> None:
        """Kill sshd and every session process it started (a crashed SSH server)."""
        try:
            procs = [psutil.Process(self.proc.pid)]
            procs += procs[0].children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            if p.name().startswith("sshd"):
                try:
                    p.send_signal(signal.SIGKILL)
                except psutil.NoSuchProcess:
                    pass
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
