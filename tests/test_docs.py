"""The documentation site: ``mkdocs build --strict`` of docs/mkdocs/mkdocs.yml, offline.

The build runs once per module (about 2 s) as a subprocess, the way a person or CI runs it.
It is strict, so a broken link or anchor, a page missing from the nav, or a docstring the
API pages cannot render fails it. No network is used: proxies point at a closed port, so a
plugin that tried to download fonts or inventories would fail the build.
"""
from __future__ import annotations

import html
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CONFIG = DOCS / "mkdocs" / "mkdocs.yml"

_MISSING = [name for name in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers")
            if importlib.util.find_spec(name) is None]
needs_mkdocs = pytest.mark.skipif(
    bool(_MISSING),
    reason=f"documentation tools not installed ({', '.join(_MISSING)}): "
           "python3 -m pip install -e '.[docs]'")


def _text(page: Path) -> str:
    """A built page's article as plain text, without whitespace (markup adds some)."""
    doc = page.read_text(encoding="utf-8")
    start, end = doc.find("<article"), doc.find("</article>")
    body = re.sub(r"<[^>]+>", " ", doc[start:end])
    return "".join(html.unescape(body).split())


def _plain(docstring: str) -> str:
    """A docstring's first paragraph as the site shows it: no roles, no backticks."""
    first = inspect.cleandoc(docstring).split("\n\n")[0]
    first = re.sub(r":(?:class|func|meth|mod|attr|exc):`[~!]?([^`]+)`", r"\1", first)
    return "".join(first.replace("`", "").split())


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", PYTHONUNBUFFERED="1",
               http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
               HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9",
               no_proxy="", NO_PROXY="")
    began = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(CONFIG), "-d", str(out)],
        cwd=str(out.parent), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=120)
    took = time.monotonic() - began
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}"
    print(f"docs site built in {took:.1f} s")
    return out


@needs_mkdocs
def test_site_builds_strict_with_every_page(site):
    assert (site / "index.html").is_file()              # docs/README.md is the home page
    for page in DOCS.glob("*.md"):
        name = "index.html" if page.name == "README.md" else f"{page.stem}/index.html"
        assert (site / name).is_file(), f"{page.name} is not in the built site"


@needs_mkdocs
def test_api_pages_carry_the_docstrings(site):
    import bigmp
    import bigmp.config
    from bigmp.executor import Executor
    from bigmp.pool import Pool

    expected = {
        "api/session": [bigmp.Machine.call, bigmp.B.start, bigmp.start],
        "api/managers": [bigmp.BigManager],
        "api/pool": [Pool, Executor],           # Pool's first line has a :class: role
        "api/config": [bigmp.config.resolve],
        "api/errors": [bigmp.MachineLost],
    }
    for page, objects in expected.items():
        text = _text(site / page / "index.html")
        for obj in objects:
            assert _plain(obj.__doc__) in text, f"{page}: docstring of {obj.__qualname__} missing"
    for page in (site / "api").glob("*/index.html"):
        left = re.findall(r":(?:class|func|meth|mod|attr|exc):", _text(page))
        assert not left, f"{page}: Sphinx roles left in the rendered docstrings: {left}"


@needs_mkdocs
def test_links_to_repository_files_work_in_the_site(site):
    # getting-started.md links ../examples/bigpi.py: the hook copies it into the site.
    assert (site / "_repo" / "examples" / "bigpi.py").is_file()
    page = (site / "getting-started" / "index.html").read_text(encoding="utf-8")
    assert 'href="../_repo/examples/bigpi.py"' in page


def test_readme_links_to_docs_exist():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\((docs/[^)#\s]*)", readme)
    assert links, "README.md links no page under docs/"
    for link in links:
        assert (ROOT / link).exists(), f"README.md links {link}, which does not exist"


def test_backends_page_lists_every_option():
    from bigmp.config import OPTIONS

    text = (DOCS / "backends.md").read_text(encoding="utf-8")
    table = text[text.index("## Options"):]
    for opt in OPTIONS.values():
        assert f"| `{opt.name}` | `{opt.env}` |" in table, \
            f"option {opt.name} is missing from the table in docs/backends.md#options"
