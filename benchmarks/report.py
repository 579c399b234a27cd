"""Helpers shared by the benchmark scripts: the printed and written result table, load-test summaries."""

from __future__ import annotations

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
