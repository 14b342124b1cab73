"""mkdocs hooks of bigmp's documentation site (see mkdocs.yml beside this file).

The pages link to files of the repository outside docs/, such as ``../examples/bigpi.py``,
with relative links that work when the pages are read on a forge or in a clone. mkdocs only
knows the files under docs/, so this hook adds each such linked file that exists to the site
as ``_repo/<path>`` (a plain copy). The links then work in the built site too, and
``--strict`` still fails on a link to a file that does not exist.
"""
from __future__ import annotations

import os
import posixpath
import re

from mkdocs.structure.files import File, Files, InclusionLevel

# [text](../path) and ![alt](../path): relative targets that climb out of docs/.
_LINK = re.compile(r"\]\((\.\./[^)\s#?]+)")


def on_files(files: Files, config) -> Files:
    docs_dir = os.path.abspath(config["docs_dir"])
    root = os.path.dirname(docs_dir)
    for page in list(files.documentation_pages()):
        with open(page.abs_src_path, encoding="utf-8") as f:
            text = f.read()
        for link in _LINK.findall(text):
            src_uri = posixpath.normpath(posixpath.join(posixpath.dirname(page.src_uri), link))
            if not src_uri.startswith("../") or files.get_file_from_path(src_uri) is not None:
                continue
            path = os.path.normpath(os.path.join(docs_dir, src_uri))
            if not path.startswith(root + os.sep) or not os.path.isfile(path):
                continue          # left alone: the strict build reports the broken link
            repo_path = os.path.relpath(path, root).replace(os.sep, "/")
            copy = File(src_uri, src_dir=None, dest_dir=config["site_dir"],
                        use_directory_urls=config["use_directory_urls"],
                        dest_uri="_repo/" + repo_path, inclusion=InclusionLevel.INCLUDED)
            copy.abs_src_path = path
            files.append(copy)
    return files
