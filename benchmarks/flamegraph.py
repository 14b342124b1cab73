#!/usr/bin/env python3
"""Draw collapsed stacks as a flame graph (a static SVG, in the manner of flamegraph.pl).

    python3 benchmarks/flamegraph.py profile.folded -o flame.svg [--title TEXT]

Input: one ``frame;frame;...;frame value`` line per stack, as written by
``bigmp profile URL -o FILE`` or ``Profile.collapsed()``. Each box is a function; its width
is the share of the value (microseconds) spent in it and its callees; callers are below.
Hover a box for its name and numbers. No JavaScript, so it renders on GitHub too.
"""
from __future__ import annotations

import argparse
import hashlib
import html
import sys
from typing import Dict, List, Optional

WIDTH = 1200
ROW = 17
PAD = 10
FONT = 11
CHAR = 6.6          # average glyph width at FONT px in a sans-serif font


class Node:
    __slots__ = ("name", "value", "children")

    def __init__(self, name: str):
        self.name = name
        self.value = 0
        self.children: Dict[str, "Node"] = {}


def parse(lines) -> Node:
    root = Node("all")
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            continue
        stack, _, value = line.rpartition(" ")
        n = int(float(value))
        root.value += n
        node = root
        for frame in stack.split(";"):
            node = node.children.setdefault(frame, Node(frame))
            node.value += n
    return root


def _color(name: str) -> str:
    h = hashlib.md5(name.split(" (")[0].encode()).digest()
    r, g, b = 205 + h[0] % 50, 80 + h[1] % 150, h[2] % 60
    return f"rgb({r},{g},{b})"


def render(root: Node, title: str = "Flame graph", unit: str = "us",
           min_px: float = 0.6) -> str:
    depth = _depth(root, root.value, WIDTH - 2 * PAD, min_px)
    height = (depth + 1) * ROW + 60
    scale = (WIDTH - 2 * PAD) / max(1, root.value)
    out: List[str] = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="Verdana, DejaVu Sans, sans-serif" '
        f'font-size="{FONT}">',
        '<rect width="100%" height="100%" fill="#fdf8ee"/>',
        f'<text x="{WIDTH / 2}" y="24" text-anchor="middle" font-size="16">{html.escape(title)}</text>',
        f'<text x="{PAD}" y="{height - 10}" fill="#666">width = share of {_fmt(root.value, unit)} '
        f'in that function and its callees; callers below callees. Hover for numbers.</text>',
    ]
    bottom = height - 30 - ROW

    def draw(node: Node, x: float, level: int) -> None:
        w = node.value * scale
        if w < min_px:
            return
        y = bottom - level * ROW
        pct = 100.0 * node.value / max(1, root.value)
        tip = html.escape(f"{node.name} — {_fmt(node.value, unit)} ({pct:.1f}%)")
        out.append(f'<g><title>{tip}</title><rect x="{x:.2f}" y="{y}" width="{w:.2f}" '
                   f'height="{ROW - 1}" rx="2" fill="{_color(node.name)}"/>')
        chars = int((w - 6) / CHAR)
        if chars >= 3:
            text = node.name if len(node.name) <= chars else node.name[:chars - 2] + ".."
            out.append(f'<text x="{x + 3:.2f}" y="{y + ROW - 5}">{html.escape(text)}</text>')
        out.append("</g>")
        cx = x
        for child in sorted(node.children.values(), key=lambda c: c.name):
            draw(child, cx, level + 1)
            cx += child.value * scale

    draw(root, PAD, 0)
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _depth(node: Node, total: int, width: float, min_px: float) -> int:
    if node.value * width / max(1, total) < min_px:
        return 0
    return 1 + max((_depth(c, total, width, min_px) for c in node.children.values()), default=0)


def _fmt(us: int, unit: str) -> str:
    if unit == "us":
        return f"{us / 1e6:.2f} s" if us >= 100_000 else f"{us / 1e3:.1f} ms"
    return f"{us} {unit}"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input", help="collapsed stacks ('-' for stdin)")
    ap.add_argument("-o", "--output", required=True, help="SVG file to write")
    ap.add_argument("--title", default="Flame graph")
    args = ap.parse_args(argv)
    f = sys.stdin if args.input == "-" else open(args.input)
    with f:
        root = parse(f)
    with open(args.output, "w") as out:
        out.write(render(root, args.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
