"""Wall time and peak memory of a long job's stages, one log line each (what benchmarks/convert_scale.py reads)."""

from __future__ import annotations

import resource
import sys
import time


def peak_rss_gib() -> float:
    """This process's peak resident memory so far, GiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


class StageLog:
    """`stages = StageLog(log, "convert")`, then `stages("loading")` at the end of each stage logs
    `[ecomla convert] stage loading: 12.3 s, peak RSS 4.21 GiB` (seconds since the previous stage ended)."""

    def __init__(self, log, job: str):
        self.log, self.job, self.start = log, job, time.time()

    def __call__(self, stage: str) -> None:
        now = time.time()
        self.log(f"[ecomla {self.job}] stage {stage}: {now - self.start:.1f} s, peak RSS {peak_rss_gib():.2f} GiB")
        self.start = now
