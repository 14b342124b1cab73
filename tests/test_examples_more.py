"""The Pool, manager and machine-to-machine examples run as a user would run them."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(120)


def run_example(name, *args):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", name), *args],
                         capture_output=True, text=True, timeout=100, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out


def test_wordcount_on_generated_samples():
    out = run_example("wordcount.py", "--processes", "2", "--top", "3")
    lines = out.stdout.splitlines()
    assert sorted(l for l in lines if l.endswith(" words")) == \
        ["bigmp.txt: 18 words", "fox.txt: 12 words", "sea.txt: 39 words"]
    assert "total: 69 words, 28 distinct, in 3 files" in lines
    assert re.match(r"\s+18 the$", lines[lines.index("total: 69 words, 28 distinct, in 3 files") + 1])
    assert out.stderr == ""     # no progress bar: stderr is not a terminal


def test_wordcount_on_given_files(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("one two two\n")
    b.write_text("Two THREE three three\n")
    out = run_example("wordcount.py", str(a), str(b), "--processes", "2",
                      "--bigmp-local-mode", "spawn")
    assert "total: 7 words, 3 distinct, in 2 files" in out.stdout
    assert re.search(r"^\s+3 two$", out.stdout, re.M)
    assert re.search(r"^\s+3 three$", out.stdout, re.M)
    assert re.search(r"^\s+1 one$", out.stdout, re.M)


def test_manager_switch():
    out = run_example("manager_switch.py")
    assert "count: 1000" in out.stdout
    assert "remote error came back as ValueError: counters cannot fail" in out.stdout
    assert "manager class: bigmp.managers.BigManager" in out.stdout
    with open(os.path.join(ROOT, "examples", "manager_switch.py")) as f:
        source = f.read()
    assert "#     from multiprocessing.managers import BaseManager" in source
    assert "\nfrom bigmp import BigManager as BaseManager\n" in source


def test_manager_switch_back_to_the_standard_library(tmp_path):
    """Undoing the one line gives the stdlib program, with the same output."""
    with open(os.path.join(ROOT, "examples", "manager_switch.py")) as f:
        source = f.read()
    stdlib = source.replace("\nfrom bigmp import BigManager as BaseManager\n",
                            "\nfrom multiprocessing.managers import BaseManager\n")
    assert stdlib != source
    path = tmp_path / "manager_stdlib.py"
    path.write_text(stdlib)
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                         timeout=100)
    assert out.returncode == 0, out.stderr
    assert "manager class: multiprocessing.managers.BaseManager" in out.stdout
    assert "count: 1000" in out.stdout
    assert "remote error came back as ValueError: counters cannot fail" in out.stdout


def test_machine_to_machine():
    out = run_example("machine_to_machine.py", "--machines", "3")
    fetched = re.findall(r"pid (\d+) fetched greeting='hello from machine 0'", out.stdout)
    assert len(fetched) == 2 and len(set(fetched)) == 2
    assert str(os.getpid()) not in fetched
    assert "ring closed: True" in out.stdout
    m = re.search(r"relay visited pids \[([\d, ]+)\]", out.stdout)
    assert m and len(m.group(1).split(",")) == 4
