"""Test-only failure injection for Ray Train workers, driven by the `OOTD_TRAIN_FAULTS` environment variable.

A test that must kill a real worker process needs two things from inside the worker: its pid, and a moment when
a checkpoint exists and the worker is known to be mid-run. Production code carries no parameter for this: the
worker calls `fault_point` at its start and after each epoch, which does nothing unless `OOTD_TRAIN_FAULTS` holds
a JSON object such as `{"pid_dir": "/tmp/pids", "hold_after_epoch": 1, "hold_timeout_s": 300}`.

Ray starts worker processes from the raylet, not from the driver, so the variable must reach them through a
runtime environment: `ray.init(runtime_env={"env_vars": {FAULTS_ENV: ...}})` in the driver (Train workers inherit
the job's env vars).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

FAULTS_ENV = "OOTD_TRAIN_FAULTS"


@dataclass(frozen=True)
class FaultPlan:
    """What a test asked the workers to do.

    Attributes:
        pid_dir: each worker writes `rank<r>-<pid>.pid` here at start, and `held-rank<r>-<pid>` while it holds.
        hold_after_epoch: after reporting this epoch, every worker waits for `<pid_dir>/release` (None: never).
        hold_timeout_s: the longest a worker holds, so a test that never releases cannot hang the run.
    """

    pid_dir: str
    hold_after_epoch: int | None = None
    hold_timeout_s: float = 300.0


def fault_plan() -> FaultPlan | None:
    """The plan in `OOTD_TRAIN_FAULTS`, or None when it is unset or empty (always, outside tests).

    Raises:
        TypeError: on an unknown key, so a misspelt plan fails loudly instead of silently doing nothing.
    """
    raw = os.environ.get(FAULTS_ENV, "").strip()
    return FaultPlan(**json.loads(raw)) if raw else None


def fault_point(stage: Literal["start", "epoch_end"], *, rank: int, epoch: int = 0) -> None:
    """The worker's one fault hook: records its pid at "start", holds at "epoch_end" of `hold_after_epoch`."""
    plan = fault_plan()
    if plan is None:
        return
    pid = os.getpid()
    if stage == "start":
        Path(plan.pid_dir, f"rank{rank}-{pid}.pid").write_text(str(pid))
    elif stage == "epoch_end" and plan.hold_after_epoch == epoch:
        Path(plan.pid_dir, f"held-rank{rank}-{pid}").write_text(str(epoch))
        release = Path(plan.pid_dir, "release")
        deadline = time.monotonic() + plan.hold_timeout_s
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
