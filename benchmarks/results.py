"""Write one benchmark's section of benchmarks/RESULTS.md, leaving the other sections alone.

Each script owns the text between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``; a section
that does not exist yet is appended. The file is replaced atomically (temp file, then rename).
"""

from __future__ import annotations

import os
import platform
import re
import tempfile
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = ("# kronfact — measured results\n\n"
          "Every table below was produced by the command above it, on the machine it names.\n")


def machine() -> str:
    """One line naming the machine, threads and torch build, for the top of a section."""
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}")


def write_section(name: str, markdown: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section ``name`` of ``path`` with ``markdown``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    text = path.read_text() if path.exists() else HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".RESULTS.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
