"""The launcher's files on disk: the output (checked writable, locked, emptied or backed up) and the
run directory (created, owned by a lock). No torch."""
from __future__ import annotations

import os
import sys
import tempfile

from contracts.errors import UserError
from launcher import locks
from launcher.supervise import end_ranks


def writable_output(path: str, dry_run: bool) -> None:
    """Opens the output for appending (as the controller will) and removes it again if it is new:
    permission bits alone miss /sys, read-only mounts and root's exemptions. A dry run writes
    nothing: it checks the permission bits of what exists."""
    folder = os.path.dirname(os.path.abspath(path))
    if dry_run:
        existing = path if os.path.exists(path) else folder
        if os.path.exists(existing) and not os.access(existing, os.W_OK):
            raise UserError(f"output: cannot write '{path}'; pass a writable --output path")
        return
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"output: cannot create directory '{folder}' ({e.strerror}); pass another --output") from None
    existed = os.path.exists(path)
    try:
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as e:
        raise UserError(f"output: cannot write '{path}' ({e.strerror}); pass a writable --output path") from None
    if not existed:
        os.remove(path)


def hold_output(output: str) -> None:
    """Takes an exclusive lock on the output file for this launcher's lifetime: a second run with
    the same --output is refused instead of deleting the file under the first one."""
    locks.hold(output, f"output: another pdlaunch run is writing '{output}'; wait for it or pass another --output")


def holds_results(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return any(line.strip() for line in f)
    except FileNotFoundError:
        return False


def backup_path(output: str) -> str:
    return output + ".bak"


def start_over(output: str) -> None:
    """--overwrite: the output's results are copied to OUTPUT.bak, then the output is emptied in
    place (the locked file stays the one the ranks append to)."""
    import shutil

    if holds_results(output):
        shutil.copyfile(output, backup_path(output))
    with open(output, "w", encoding="utf-8"):
        pass


def count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_run_dir(run_dir: str) -> None:
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise UserError(f"run_dir: '{run_dir}' is a file, not a directory; pass another --run-dir (or move the file)")


def writable_run_dir(path: str) -> str:
    """The run directory, created, checked writable and owned by this launcher for its whole life:
    its lock (RUN_DIR/run.lock) is taken before anything else is written there, so a second run on
    the same directory fails at once, before touching any file of the first one. Processes that an
    earlier, killed launcher left running on it are ended first."""
    run_dir = os.path.abspath(path)
    lock = os.path.join(run_dir, "run.lock")
    if locks.holds(lock):
        return run_dir
    check_run_dir(run_dir)
    try:
        os.makedirs(run_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=run_dir).close()
    except OSError as e:
        raise UserError(f"run_dir: cannot write in '{run_dir}' ({e.strerror}); pass a writable --run-dir") from None
    locks.hold(lock, f"run_dir: another pdlaunch run is using '{run_dir}'; wait for it to end or pass another "
                     "--run-dir")
    left = end_ranks(os.path.join(run_dir, "job.json"))
    if left:
        print(f"pdlaunch: ended {len(left)} process(es) an earlier run in {run_dir} left behind", file=sys.stderr)
    return run_dir
