"""`--resume`: which results of an existing output file still answer the current input.

A result is reused only when the job would give the same answer now: same custom_id, the same
request line (`request_hash`) and the same answer hash (`answer_hash`: the request after the
config's sampling defaults, and the model's identity; contracts.answer_key), all written with every
result. Results whose request, settings or model changed, or whose request left the input, are
moved out of the output into OUTPUT.stale.jsonl (never deleted) and their requests run again;
results of requests that failed on a rank (`engine_error`) are retried. No torch here.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from contracts.batch_io import RequestSpec

RETRIED_ERRORS = {"engine_error"}  # a failure of the run, not of the request: run it again


@dataclass
class ResumeState:
    reused: set[str] = field(default_factory=set)  # custom_ids whose result stays
    changed: int = 0      # result of a request whose content changed since
    model_changed: int = 0     # result of another model (files, dtype, max_model_len, chat template)
    settings_changed: int = 0  # result under other config defaults (sampling)
    vanished: int = 0     # result of a request no longer in the input
    retried: int = 0      # engine errors dropped to run again
    unverified: int = 0   # results without the hashes (older pdlaunch), reused by custom_id
    torn: int = 0         # unreadable lines (a crash mid-write)

    def message(self, output: str, pending: int, dry_run: bool = False) -> str:
        parts = [f"{'would reuse' if dry_run else 'reused'} {len(self.reused)} result(s) in {output}"]
        moved = []
        if self.changed:
            moved.append(f"{self.changed} whose request changed")
        if self.model_changed:
            moved.append(f"{self.model_changed} of another model (its files, dtype, max_model_len or chat template)")
        if self.settings_changed:
            moved.append(f"{self.settings_changed} made with other sampling defaults")
        if self.vanished:
            moved.append(f"{self.vanished} whose request is no longer in the input")
        if moved:
            fate = "would be moved to" if dry_run else "moved to"
            parts.append(f"{', '.join(moved)} {fate} {stale_path(output)}, their requests to run again")
        if self.retried:
            parts.append(f"{self.retried} engine error(s) retried")
        if self.unverified:
            parts.append(f"{self.unverified} without request or answer hashes (an older pdlaunch) matched by custom_id "
                         "only (--overwrite runs everything again)")
        if self.torn:
            parts.append(f"{self.torn} unreadable line(s) dropped")
        return ("pdlaunch: resume (dry run, nothing changed): " if dry_run else "pdlaunch: resume: ") + \
            "; ".join(parts) + f"; {pending} request(s) to run"


def stale_path(output: str) -> str:
    return output + ".stale.jsonl"


def _error_code(record: dict) -> str | None:
    error = record.get("error")
    return error.get("code") if isinstance(error, dict) else None


def reconcile(output: str, specs: list[RequestSpec], apply: bool, answers: dict[str, str] | None = None,
              model: str = "") -> ResumeState:
    """Matches the output's results to the input's requests (and, given `answers` = each custom_id's
    answer hash now and `model` = the model hash now, to the answers the job would give). With
    `apply`, rewrites the output to the reused results (in place: the caller holds a lock on it)
    and appends the moved ones to the stale file; without, only counts (for --dry-run)."""
    state = ResumeState()
    if not os.path.exists(output):
        return state
    digests = {s.custom_id: s.digest for s in specs}
    with open(output, encoding="utf-8", errors="surrogateescape") as f:
        lines = f.read().splitlines()
    kept, stale = [], []
    for line in lines:
        try:
            record = json.loads(line)
            cid = record["custom_id"]
        except (json.JSONDecodeError, KeyError, TypeError):
            state.torn += line.strip() != ""
            continue
        digest = record.get("request_hash")
        if cid not in digests:
            state.vanished += 1
            stale.append(line)
        elif cid in state.reused:
            continue  # a duplicate of a result already kept
        elif digest is not None and digest != digests[cid]:
            state.changed += 1
            stale.append(line)
        elif answers is not None and record.get("model_hash") not in (None, model):
            state.model_changed += 1
            stale.append(line)
        elif answers is not None and record.get("answer_hash") not in (None, answers[cid]):
            state.settings_changed += 1
            stale.append(line)
        elif _error_code(record) in RETRIED_ERRORS:
            state.retried += 1
        else:
            state.unverified += digest is None or (answers is not None and "answer_hash" not in record)
            state.reused.add(cid)
            kept.append(line)
    if apply and len(kept) != len(lines):
        _rewrite(output, kept, stale)
    return state


def _rewrite(output: str, kept: list[str], stale: list[str]) -> None:
    """Stale results go to their own file first; the output is then rewritten in place (a backup
    copy exists until the rewrite is on disk), so the caller's lock on it stays valid."""
    if stale:
        with open(stale_path(output), "a", encoding="utf-8", errors="surrogateescape") as f:
            f.writelines(line + "\n" for line in stale)
    backup = output + ".resume-backup"
    with open(output, encoding="utf-8", errors="surrogateescape") as f, \
            open(backup, "w", encoding="utf-8", errors="surrogateescape") as b:
        b.write(f.read())
        b.flush()
        os.fsync(b.fileno())
    with open(output, "r+", encoding="utf-8", errors="surrogateescape") as f:
        f.truncate(0)
        f.writelines(line + "\n" for line in kept)
        f.flush()
        os.fsync(f.fileno())
    os.remove(backup)
