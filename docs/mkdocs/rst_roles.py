"""Griffe extension for the API pages: read bigmp's reST-flavoured docstrings as Markdown.

bigmp's docstrings use Sphinx roles (``:class:`Machine```) and ``::`` before literal
blocks. Rendered as Markdown these would show the role names, so before rendering each
docstring a role becomes a plain code span (``Machine``) and a literal-block marker ``::``
becomes ``:`` (the indented block after it is a code block in Markdown already). The source
files are not changed.
"""
from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|exc|data|obj|const):`[~!]?([^`]+)`")
_LITERAL = re.compile(r"(?m)(\S)::$")      # "Example::" -> "Example:"
_BARE_LITERAL = re.compile(r"(?m)^(\s*)::$")  # a "::" line of its own goes


def markdownify(text: str) -> str:
    text = _ROLE.sub(lambda m: "`" + m.group(1) + "`", text)
    text = _LITERAL.sub(r"\1:", text)
    return _BARE_LITERAL.sub("", text)


class RstRoles(griffe.Extension):
    def on_instance(self, *args: Any, **kwargs: Any) -> None:
        obj = kwargs.get("obj", args[1] if len(args) > 1 else None)
        docstring = getattr(obj, "docstring", None)
        if docstring is not None and docstring.value:
            docstring.value = markdownify(docstring.value)
