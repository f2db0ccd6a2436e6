"""DeepSpeed/MPI hostfiles: one `HOST slots=N` per line, `#` comments.

Parsed here rather than with deepspeed.launcher.runner.fetch_hostfile because importing that
imports torch and deepspeed (~4 s), and the launcher must plan on a login node without torch.
The accepted grammar is the same as DeepSpeed's.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from contracts.errors import UserError, read_text

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
    names = slurm_hostnames(nodelist)
    counts: list[int] = []
    for part in tasks.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part)
        if not m:
            raise UserError(f"SLURM_TASKS_PER_NODE={tasks!r} is not understood")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if len(counts) != len(names):
        raise UserError(f"SLURM_TASKS_PER_NODE={tasks!r} does not match nodelist {nodelist!r}")
    return [Host(n, c) for n, c in zip(names, counts)]


def slurm_hostnames(nodelist: str) -> list[str]:
    """Slurm's own expansion (`scontrol show hostnames`) where scontrol exists, else expand_nodelist."""
    import shutil
    import subprocess

    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=10)
            if out.returncode == 0 and out.stdout.split():
                return out.stdout.split()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return expand_nodelist(nodelist)


def _split_top_level(text: str) -> list[str]:
    """Comma-separated items, commas inside brackets kept."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth < 0 or depth > 1:
            raise UserError(f"Slurm nodelist {text!r} has unbalanced or nested brackets")
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise UserError(f"Slurm nodelist {text!r} has an unclosed '['")
    return items + [text[start:]]


def _range_values(group: str, nodelist: str) -> list[str]:
    """'1-3,07' -> ['1', '2', '3', '07']: each range keeps its low bound's zero padding."""
    out = []
    for item in group.split(","):
        lo, _, hi = item.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or (hi and int(hi) < int(lo)):
            raise UserError(f"Slurm nodelist {nodelist!r}: '[{group}]' is not a list of numbers and ranges")
        out += [f"{i:0{len(lo)}d}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Expands Slurm's compressed node lists: comma lists, several bracket groups per name (the
    first varies slowest), text after brackets, zero padding, e.g. 'n[1-2]-ib,gpu[01-02]x[1,3]'
    -> n1-ib n2-ib gpu01x1 gpu01x3 gpu02x1 gpu02x3."""
    names: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        if not item:
            raise UserError(f"Slurm nodelist {nodelist!r} has an empty name")
        expanded = [""]
        for literal, group in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", item):
            expanded = [e + literal for e in expanded]
            if group:
                expanded = [e + v for e in expanded for v in _range_values(group, nodelist)]
        names += expanded
    return names
