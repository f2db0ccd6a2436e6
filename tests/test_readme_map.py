"""The README's "How it works" names every source file, so its map stays the map of the code."""
from __future__ import annotations

import glob
import os

from conftest import ROOT


def test_how_it_works_names_every_source_file():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme[readme.index("## How it works"):readme.index("\n## ", readme.index("## How it works") + 1)]
    files = [os.path.relpath(p, ROOT) for package in ("contracts", "launcher", "engine", "benchmarks")
             for p in glob.glob(os.path.join(ROOT, package, "**", "*.py"), recursive=True)]
    missing = sorted(f for f in files if f"`{f}`" not in section)
    assert len(files) > 90 and not missing, f"README's How it works does not name: {missing}"
