"""launcher.supervise in this process, with small Python programs in place of mpirun: what it relays
and keeps of the ranks' stderr, the exit code it returns (a launch command killed by a signal
included), that a signal to the launcher ends the job or (a server) starts its drain, and that no
process of the job outlives it. No MPI, no torch."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from contracts.errors import UserError
from contracts.plan import InstancePlan, Plan
from launcher.supervise import end_ranks, launch, rank_pids

PLAN = Plan([InstancePlan(0, "prefill", 1, 1, 1, ["vm"]), InstancePlan(1, "decode", 1, 2, 2, ["vm"])])


def program(source: str, job: str) -> list[str]:
    """A launch command running `source`; like every launcher's, it names the job file after --job."""
    return [sys.executable, "-c", source, "--job", job]


def signal_when(ready, sig: int) -> threading.Thread:
    """Sends `sig` to this process once `ready()` holds and launch's handler for it is installed
    (launch runs in the main thread, which is where Python runs signal handlers)."""

    before = signal.getsignal(sig)

    def send() -> None:
        deadline = time.monotonic() + 120
        while not (ready() and signal.getsignal(sig) is not before):
            assert time.monotonic() < deadline, "the launch command never became ready"
            time.sleep(0.01)
        os.kill(os.getpid(), sig)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_stderr_is_relayed_and_kept_and_a_dead_ranks_banner_gets_its_role(tmp_path, capsys):
    source = ("import sys; w = sys.stderr.write\n"
              "w('rank 1 says hello\\n')\n"
              "w('-' * 60 + '\\n'); w('prterun noticed that process rank 2 with PID 4242 on node vm exited on\\n')\n"
              "w('signal 9 (Killed).\\n'); w('-' * 60 + '\\n')\n"
              "sys.exit(7)\n")
    rc = launch(program(source, str(tmp_path / "job.json")), PLAN, log_path=str(tmp_path / "ranks.log"))
    err = capsys.readouterr().err
    assert rc == 7
    assert "rank 1 says hello" in err and "process rank 2 with PID 4242" in err
    assert "pdlaunch: rank 2 on vm died of SIGKILL: it was decode instance 1 (TP rank 0, PP stage 0)" in err
    assert "rank 1 says hello" in (tmp_path / "ranks.log").read_text()


RANK_1_KILLED = ("w('-' * 60 + '\\n'); w('prterun noticed that process rank 1 with PID 4242 on node vm exited on\\n')\n"
                 "w('signal 9 (Killed).\\n'); w('-' * 60 + '\\n')\n"
                 "sys.exit(137)\n")  # prterun's banner for a killed rank 1, then its exit code
RANK_1_DIED = "pdlaunch: rank 1 on vm died of SIGKILL: it was prefill instance 0 (TP rank 0, PP stage 0)"


def run_to_its_end(source: str, tmp_path, capsys) -> str:
    """Runs a stand-in for mpirun that ends with RANK_1_KILLED under launch(); its relayed stderr."""
    assert launch(program(source, str(tmp_path / "job.json")), PLAN) == 137
    return capsys.readouterr().err


def test_a_banner_glued_to_a_ranks_last_line_is_still_read_as_one(tmp_path, capsys):
    """A rank's diagnosis without its newline and prterun's MPI_ABORT banner arrive as one line (they
    share the pipe); the banner of another rank's death after it must still get its role line."""
    source = ("import sys; w = sys.stderr.write\n"
              "w('pdlaunch: rank 2 on vm (decode instance 1) failed: RuntimeError: reset' + '-' * 60 + '\\n')\n"
              "w('MPI_ABORT was invoked on rank 2 in communicator MPI_COMM_WORLD\\n'); w('-' * 60 + '\\n')\n"
              "w('\\n')\n"
              + RANK_1_KILLED)
    err = run_to_its_end(source, tmp_path, capsys)
    assert "pdlaunch: rank 2 on vm (decode instance 1) failed: RuntimeError: reset\n" in err
    assert "MPI_ABORT" not in err  # the aborting rank said why: its banner is dropped
    assert err.count(RANK_1_DIED) == 1


def test_a_death_is_named_even_when_a_ranks_own_dashes_put_the_banners_out_of_step(tmp_path, capsys):
    """A rank prints a line of dashes of its own: every banner after it is framed wrongly, and the
    death is found in the last lines when the stream ends."""
    source = ("import sys; w = sys.stderr.write\n"
              "w('-' * 60 + '\\n'); w('a table a rank printed\\n')\n"
              + RANK_1_KILLED)
    err = run_to_its_end(source, tmp_path, capsys)
    assert err.count(RANK_1_DIED) == 1


def test_a_launch_command_killed_by_a_signal_exits_128_plus_it_and_says_so(tmp_path, capsys):
    rc = launch(program("import os; os.kill(os.getpid(), 9)", str(tmp_path / "job.json")), PLAN)
    assert rc == 128 + signal.SIGKILL
    err = capsys.readouterr().err
    assert f"pdlaunch: {os.path.basename(sys.executable)} (PID " in err and "died of SIGKILL" in err


def test_a_missing_launcher_is_a_one_line_error_naming_it(tmp_path):
    with pytest.raises(UserError) as missing:
        launch(["no-such-mpirun", "--job", str(tmp_path / "job.json")], PLAN)
    assert "'no-such-mpirun' is not installed here" in str(missing.value) and "\n" not in str(missing.value)


def test_sigterm_to_the_launcher_ends_the_launch_commands_group(tmp_path):
    ready = tmp_path / "ready"
    source = f"import time; open({str(ready)!r}, 'w').close(); time.sleep(600)"
    before = signal.getsignal(signal.SIGTERM)
    signal_when(ready.exists, signal.SIGTERM)
    rc = launch(program(source, str(tmp_path / "job.json")), PLAN)
    assert rc == 128 + signal.SIGTERM  # ended by the signal: the program itself would sleep 600 s and exit 0
    assert signal.getsignal(signal.SIGTERM) is before  # the launcher's handlers are gone with the job


def test_a_servers_first_sigterm_asks_for_a_drain_and_the_jobs_own_exit_code_is_returned(tmp_path):
    """The first signal creates the drain file and leaves the job running; the job (here: once it
    sees the file, as rank 0 does) ends by itself and its exit code is the launcher's."""
    drain_file, ready = tmp_path / "drain", tmp_path / "ready"
    source = (f"import os, sys, time\nopen({str(ready)!r}, 'w').close()\n"
              f"while not os.path.exists({str(drain_file)!r}): time.sleep(0.01)\n"
              "sys.exit(0)\n")
    signal_when(ready.exists, signal.SIGTERM)
    rc = launch(program(source, str(tmp_path / "job.json")), PLAN, drain=(str(drain_file), 60))
    assert rc == 0 and drain_file.exists()


def test_a_drain_that_outlives_its_time_ends_the_job(tmp_path):
    """The job ignores the drain file: once `seconds` (+1) pass, the launcher ends it."""
    drain_file, ready = tmp_path / "drain", tmp_path / "ready"
    source = f"import time; open({str(ready)!r}, 'w').close(); time.sleep(600)"
    signal_when(ready.exists, signal.SIGTERM)
    rc = launch(program(source, str(tmp_path / "job.json")), PLAN, drain=(str(drain_file), 0))
    assert drain_file.exists() and rc == 128 + signal.SIGALRM


def test_no_rank_outlives_the_launcher_even_one_that_ignores_sigterm(tmp_path):
    """end_ranks finds the job's ranks by their command line (engine.main --job FILE), waits its
    grace, then SIGKILLs the rest; another job's ranks are left alone."""
    job, other = str(tmp_path / "job.json"), str(tmp_path / "other.json")
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    rank = subprocess.Popen([sys.executable, "-c", stubborn, "engine.main", "--job", job])
    neighbour = subprocess.Popen([sys.executable, "-c", stubborn, "engine.main", "--job", other])
    try:
        deadline = time.monotonic() + 60
        while rank.pid not in rank_pids(job):  # its command line is readable once it has been exec'd
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert end_ranks(job, grace_s=0.2) == [rank.pid]
        assert rank.wait(timeout=60) == -signal.SIGKILL
        assert rank_pids(job) == [] and rank_pids(other) == [neighbour.pid]
    finally:
        for proc in (rank, neighbour):
            proc.kill()
            proc.wait()
