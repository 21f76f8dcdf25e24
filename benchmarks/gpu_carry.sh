#!/usr/bin/env bash
# GPU measurements on a lent machine that cannot reach the network and takes at most 64 MiB per call.
# Any CUDA machine with ecomla installed needs none of this: run the python commands of `run` directly.
#
#   benchmarks/gpu_carry.sh prepare   # here: split the 98 MB GGUF into .carry/a and .carry/b, fetch the gguf wheel
#   then two back-to-back device calls from the repository root (the machine keeps ignored paths while warm):
#     carry [".carry/a", ".whl"]:  true
#     carry [".carry/b"]:          benchmarks/gpu_carry.sh run [extra decode_speed.py arguments]
#
# `run` joins the parts (checking the SHA-256), installs the wheel beside the machine's own packages,
# runs the kernel tests on CUDA tensors (compiled kernel), the kernel's launch-setting sweep, then the
# decode benchmark; logs and results in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
prepare)
    gguf=$(.venv/bin/python -c "from ecomla.sources import builtin_gguf; print(builtin_gguf('smollm2-135m'))")
    rm -rf .carry .whl && mkdir -p .carry/a .carry/b .whl
    half=$(( ($(stat -c %s "$gguf") + 1) / 2 ))
    head -c "$half" "$gguf" > .carry/a/part
    tail -c +"$((half + 1))" "$gguf" > .carry/b/part
    sha256sum < "$gguf" | cut -d' ' -f1 > .carry/b/sha256
    version=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('gguf'))")
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .whl "gguf==$version"  # pure Python; its needs are on the machine
    du -sh .carry/a .carry/b .whl
    ;;
run)
    shift
    out=${OUT:-/tmp/ecomla_gpu}
    mkdir -p "$out"
    cat .carry/a/part .carry/b/part > /tmp/smollm2.gguf
    [ "$(sha256sum < /tmp/smollm2.gguf | cut -d' ' -f1)" = "$(cat .carry/b/sha256)" ] || { echo "GGUF parts do not match: run prepare again" >&2; exit 1; }
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD/src" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
    TRITON_INTERPRET=0 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tee "$out/test_kernels_cuda.log" \
        || echo "KERNEL TESTS FAILED on CUDA (see test_kernels_cuda.log); timing anyway" >&2
    # 24 launch settings around the kernel's defaults, at most 4 minutes (the whole grid, 108 settings each compiled
    # once, could take most of a 15-minute device loan before the decode benchmark started)
    timeout 240 python3 benchmarks/decode_kernel_sweep.py --splits None,32,128 --block-n 64,128 --warps 4,8 --stages 2,3 \
        --out-dir "$out" 2>&1 | tee "$out/decode_kernel_sweep.log" || true
    python3 benchmarks/decode_speed.py --device cuda --model /tmp/smollm2.gguf --contexts 1024,4096,16384,32768 \
        --batches 1,8,32 --out-dir "$out" "$@" 2>&1 | tee "$out/decode_speed_cuda.log"
    ;;
*)
    echo "usage: $0 prepare | run [decode_speed.py arguments]" >&2
    exit 2
    ;;
esac
