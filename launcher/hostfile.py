"""DeepSpeed/MPI hostfiles: one `HOST slots=N` per line, `#` comments.

Parsed here rather than with deepspeed.launcher.runner.fetch_hostfile because importing that
imports torch and deepspeed (~4 s), and the launcher must plan on a login node without torch.
The accepted grammar is the same as DeepSpeed's.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from launcher.errors import UserError, read_text

_LINE = re.compile(r"^(?P<host>[A-Za-z0-9_.\-\[\]:]+)\s+slots\s*=\s*(?P<slots>\S+)$")


@dataclass(frozen=True)
class Host:
    name: str
    slots: int


def parse_hostfile(text: str, source: str = "hostfile") -> list[Host]:
    hosts: list[Host] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _LINE.match(line)
        if not match:
            raise UserError(f"{source} line {number}: expected 'HOST slots=N', got {raw.strip()!r}")
        name, slots = match.group("host"), match.group("slots")
        if not slots.isdigit() or int(slots) < 1:
            raise UserError(f"{source} line {number}: slots must be a positive integer, got {slots!r}")
        if name in seen:
            raise UserError(f"{source} line {number}: host '{name}' is listed twice; "
                            "keep one line per host and add up its slots")
        seen.add(name)
        hosts.append(Host(name, int(slots)))
    if not hosts:
        raise UserError(f"{source}: no hosts; add lines like 'localhost slots=4'")
    return hosts


def read_hostfile(path: str) -> list[Host]:
    text = read_text(path, f"hostfile '{path}' not found; set cluster.hostfile to a file with 'HOST slots=N' "
                           "lines (see hostfiles/)", f"hostfile '{path}' is not a text file of 'HOST slots=N' lines")
    return parse_hostfile(text, f"hostfile {os.path.basename(path)}")


def hosts_from_slurm(env: dict) -> list[Host] | None:
    """Hosts of the current Slurm allocation (SLURM_JOB_NODELIST + tasks per node), if inside one."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    tasks = env.get("SLURM_TASKS_PER_NODE")
    if not nodelist or not tasks:
        return None
    names = expand_nodelist(nodelist)
    counts: list[int] = []
    for part in tasks.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part)
        if not m:
            raise UserError(f"SLURM_TASKS_PER_NODE={tasks!r} is not understood")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if len(counts) != len(names):
        raise UserError(f"SLURM_TASKS_PER_NODE={tasks!r} does not match nodelist {nodelist!r}")
    return [Host(n, c) for n, c in zip(names, counts)]


def expand_nodelist(nodelist: str) -> list[str]:
    """Expands Slurm's compressed node lists, e.g. 'n[1-3,5],gpu7' -> n1 n2 n3 n5 gpu7."""
    names: list[str] = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist):
        prefix, ranges = m.group(1), m.group(2)
        if not ranges:
            names.append(prefix)
            continue
        for item in ranges.split(","):
            lo, _, hi = item.partition("-")
            width = len(lo)
            for i in range(int(lo), int(hi or lo) + 1):
                names.append(f"{prefix}{i:0{width}d}")
    return names
