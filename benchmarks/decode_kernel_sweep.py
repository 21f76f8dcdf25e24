"""Tune the Triton latent-decode kernel: bandwidth over launch settings, on a GPU.

    python benchmarks/decode_kernel_sweep.py                                   # SmolLM2 MLA 4x shapes, 16K, batch 8
    python benchmarks/decode_kernel_sweep.py --batch 1 --context 32768 --rank 16 --rope-dim 32

One decode step's attention over `--layers` separate layer caches (so that no cache sits in L2,
as in a real model), captured as a CUDA graph and replayed; for every (num_splits, block_n,
num_warps, num_stages) it prints the time, the bandwidth over the cache bytes read, its fraction of
the measured copy bandwidth, and the error against a single-chunk reference. The first row is the
kernel's default (num_splits=None: ~4 programs per SM; block_n 64, 4 warps, 3 stages). Writes
benchmarks/results/decode_kernel_sweep_<device>.json. On CPU (`--device cpu`, TRITON_INTERPRET=1,
tiny sizes) it only checks that every setting computes the same thing.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

import torch

from common import RESULTS, copy_bandwidth, graph_seconds, write_json


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=16384)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--rope-dim", type=int, default=32)
    p.add_argument("--rope-key-heads", type=int, default=1)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--splits", default="None,16,32,64,128,256")
    p.add_argument("--block-n", default="32,64,128")
    p.add_argument("--warps", default="2,4,8")
    p.add_argument("--stages", default="2,3")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("on CPU the kernel runs only in Triton's interpreter: set TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    from ecomla.kernels.mla_decode import mla_decode

    B, S, H, R, DR, NR = args.batch, args.context, args.heads, args.rank, args.rope_dim, args.rope_key_heads
    dtype = torch.bfloat16
    caches = [(torch.randn(B, S, R, device=dev, dtype=dtype), torch.randn(B, S, NR * DR, device=dev, dtype=dtype))
              for _ in range(args.layers)]  # (B, S, r), (B, S, n_r * d_rope) per layer
    q_lat = torch.randn(B, H, R, device=dev, dtype=dtype)  # (B, H, r)
    q_pe = torch.randn(B, H, DR, device=dev, dtype=dtype)  # (B, H, d_rope)
    scale = (R + DR) ** -0.5
    nbytes = sum(c.numel() * c.element_size() + k.numel() * k.element_size() for c, k in caches)
    ref = mla_decode(q_lat, q_pe, *caches[0], scale, None, NR, num_splits=1)  # (B, H, r)
    copy_bw = copy_bandwidth(dev) if dev.type == "cuda" else None

    rows = []
    default = (None, 64, 4, 3)  # mla_decode's own settings: measured first, whatever the grid
    grid = itertools.product([None if s == "None" else int(s) for s in args.splits.split(",")],
                             [int(x) for x in args.block_n.split(",")], [int(x) for x in args.warps.split(",")],
                             [int(x) for x in args.stages.split(",")])
    for splits, block_n, warps, stages in [default] + [g for g in grid if g != default]:
        kw = dict(num_splits=splits, block_n=block_n, num_warps=warps, num_stages=stages)
        try:
            out = mla_decode(q_lat, q_pe, *caches[0], scale, None, NR, **kw)
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            seconds = how = None
            if dev.type == "cuda":
                def step(kw=kw):
                    for c, k in caches:
                        mla_decode(q_lat, q_pe, c, k, scale, None, NR, **kw)

                seconds, how = graph_seconds(step, dev, args.repeats)
        except Exception as exc:  # noqa: BLE001  (a setting the compiler refuses, e.g. too much shared memory)
            print(f"splits={splits} block_n={block_n} warps={warps} stages={stages}: {type(exc).__name__}: {exc}"[:200])
            continue
        row = dict(device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (interpreter)", batch=B, context=S,
                   heads=H, rank=R, rope_dim=DR, rope_key_heads=NR, layers=args.layers, num_splits=splits, block_n=block_n,
                   num_warps=warps, num_stages=stages, rel_err_vs_one_chunk=err, cache_bytes=nbytes)
        if seconds is not None:
            bw = nbytes / seconds
            row.update(step_us=round(1e6 * seconds, 2), timing=how, bandwidth_gbs=round(bw / 1e9, 1),
                       copy_bandwidth_gbs=round(copy_bw / 1e9, 1), fraction_of_copy=round(bw / copy_bw, 3))
        rows.append(row)
        write_json(Path(args.out_dir) / f"decode_kernel_sweep_{dev.type}.json", rows)  # each row: a time limit keeps them
        print(f"splits={str(splits):>4} block_n={block_n:3d} warps={warps} stages={stages}: "
              + (f"{row['step_us']:8.1f} us  {row['bandwidth_gbs']:7.1f} GB/s  {100 * row['fraction_of_copy']:5.1f}% of copy  "
                 if seconds is not None else "") + f"err {err:.1e}", flush=True)
    if not rows:
        return 1
    if dev.type == "cuda":
        best = max(rows, key=lambda r: r["bandwidth_gbs"])
        print(f"best: splits={best['num_splits']} block_n={best['block_n']} warps={best['num_warps']} "
              f"stages={best['num_stages']}: {best['bandwidth_gbs']} GB/s ({100 * best['fraction_of_copy']:.1f}% of copy "
              f"{best['copy_bandwidth_gbs']} GB/s); default: {rows[0]['bandwidth_gbs']} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
