"""Helpers shared by the benchmark scripts: the printed and written result table, load-test summaries."""

from __future__ import annotations

import os
from pathlib import Path


def publish(lines: list[str], out: str | Path) -> None:
    """Prints a result table and writes it (markdown) to `out`, creating its folder."""
    table = "\n".join(lines).rstrip("\n") + "\n"
    print(table)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)


def load_summary(latencies_s: list[float], elapsed_s: float, errors: int = 0) -> dict[str, float]:
    """Throughput and p50/p99 latency (ms) of a closed-loop load run."""
    import numpy as np

    lat = np.asarray(latencies_s) * 1000
    return {"rps": len(latencies_s) / elapsed_s, "p50": float(np.percentile(lat, 50)),
            "p99": float(np.percentile(lat, 99)), "n": len(latencies_s), "errors": errors}


def machine_load_line(before: tuple[float, ...], after: tuple[float, ...], remark: str = "") -> str:
    """The sentence every results file ends with: the 1/5/15-min load average around the run, so a reader sees
    whether other processes shared the cores."""

    def fmt(load: tuple[float, ...]) -> str:
        return " / ".join(f"{x:.1f}" for x in load)

    return (f"Machine load average (1/5/15 min, `uptime`) before: {fmt(before)}, after: {fmt(after)} on "
            f"{os.cpu_count()} cores (shared with other processes{remark}).")
