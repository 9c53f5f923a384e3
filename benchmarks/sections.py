"""Benchmark output kept in a marked section of a hand-written page (e.g. docs/PERFORMANCE.md).

A section is the text between ``<!-- begin NAME -->`` and ``<!-- end NAME -->``; rerunning a
benchmark with ``--write`` replaces only that text, so the prose around it stays.
"""

from __future__ import annotations

from pathlib import Path


def replace_section(path: Path, name: str, text: str) -> None:
    """Puts ``text`` between the ``name`` markers of ``path``, appending them if absent."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    page = path.read_text() if path.exists() else ""
    block = f"{begin}\n{text.strip()}\n{end}"
    if begin in page and end in page:
        head, rest = page.split(begin, 1)
        page = head + block + rest.split(end, 1)[1]
    else:
        page = page.rstrip() + "\n\n" + block + "\n"
    path.write_text(page)
