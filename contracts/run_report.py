"""RUN_DIR/report.json, one writer for both ends of a run: rank 0 writes a finished run's summary
(engine/progress.py), the launcher a failed or interrupted run's state (launcher/commands/generate.py), so a
report always says its `status` first and never shows an earlier run's figures. No torch."""
from __future__ import annotations

import json

STATUSES = ("finished", "failed", "interrupted")


def write_report(path: str, status: str, fields: dict) -> None:
    if status not in STATUSES:
        raise ValueError(f"report status must be one of {', '.join(STATUSES)}, got {status!r}")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"status": status} | fields, f, indent=2)
