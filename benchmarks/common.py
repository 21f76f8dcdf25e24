"""What several benchmark scripts share: paths, atomic result files, plotting, GPU timing.

Scripts import it as `from common import ...`: Python puts a script's own directory on sys.path
(`python benchmarks/NAME.py`), and ecomla comes from the installed package.
"""

from __future__ import annotations

import json
import time
from io import BytesIO
from pathlib import Path

import torch

from ecomla.io import atomic_write

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT.parent / "shared" / "data"  # evaluation and training data beside the repository, not shipped in it


def write_json(path, obj) -> None:
    """`obj` as JSON, through a temporary file and a rename: an interrupted run leaves no half-written results."""
    atomic_write(path, json.dumps(obj, indent=1))


def resumed_rows(path: Path, scored: dict, resume: bool) -> list[dict]:
    """The rows of result file `path` that a --resume run keeps: all of them, when each was scored
    with `scored` (the settings every row of one file must share: tokens, items...); otherwise
    refuse, since one table would mix rows measured on other data. Without --resume: none."""
    if not resume or not path.is_file():
        return []
    rows = json.loads(path.read_text())
    other = [r for r in rows if r.get("scored") != scored]
    if other:
        raise SystemExit(f"{path}: {len(other)} of its rows were scored with other settings "
                         f"({other[0].get('scored')}; this run: {scored}); run with those, or give another --out-dir")
    return rows


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (benchmarks run on machines without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, dpi: int = 110) -> None:
    """Write `fig` as a PNG atomically, then close it."""
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write(path, buf.getvalue())
    pyplot().close(fig)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """The machine's device-memory copy bandwidth, bytes/s (read + write), best of 10 copies."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(10):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def graph_seconds(fn, device, repeats: int = 20) -> tuple[float, str]:
    """(seconds per call of `fn`, how timed): `fn` captured as a CUDA graph and replayed, so the time
    is the GPU's and not Python's launch rate; timed eagerly (launch-bound) if capture fails."""
    fn()  # compiles kernels, settles the allocator
    how, run = "CUDA graph", fn
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run = graph.replay
    except Exception as exc:  # noqa: BLE001  (report launch-bound eager timing rather than nothing)
        how = f"eager ({type(exc).__name__})"
    run()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        run()
    sync(device)
    return (time.perf_counter() - t0) / repeats, how


def measured_child(cmd: list[str], timeout: int) -> dict:
    """Run `cmd` under `/usr/bin/time -v` in a child process: {ok, exit, wall_seconds, peak_rss_gib, error, text}
    (a run past `timeout` seconds is exit "timeout"; error is the output's last line)."""
    import re
    import subprocess

    t0 = time.time()
    try:
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, timeout=timeout)
        text, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        text, code = (err.stdout or b"").decode() + (err.stderr or b"").decode(), "timeout"
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return dict(ok=code == 0, exit=code, wall_seconds=round(time.time() - t0, 1),
                peak_rss_gib=round(int(peak.group(1)) / 2**20, 2) if peak else None,
                error=None if code == 0 else text.strip().splitlines()[-1][-300:] if text.strip() else str(code), text=text)
