#!/bin/bash
# ecomla's training under accelerate's FSDP on one GPU, as the device tool runs it (/work/.library/device):
#   bash benchmarks/gpu_fsdp/prepare.sh        # here, once: .gpu/ (git-ignored) with the tokenizer and the data
#   run(command="LIMIT=240 bash benchmarks/gpu_fsdp/check.sh 1b", carry=[".gpu"], timeout_s=480)
# CPU dry run of the same script (accelerate's FSDP path forced on a CPU process: tests/fsdp_on_cpu.py):
#   PY=.venv/bin/python OUT=/tmp/gpu-dry bash benchmarks/gpu_fsdp/check.sh tiny
# What it does: a 1B recipe's path under recipes/accelerate/fsdp.yaml on 1 process (conversion on the GPU, align,
# distill) on a random Llama-3.2-1B-shaped model, then a distillation stopped after step 2 and resumed from
# accelerate's FSDP checkpoint, against the same 4 steps without FSDP (compare.py). Writes summary.txt,
# compare.json, report.md, gpu_memory.csv and logs.tar.gz to $OUT.
set -u
SHAPE=$1
OUT=${OUT:-/tmp/gpu-out}
W=/tmp/ecomla-gpu
mkdir -p $OUT && rm -rf $W && mkdir -p $W
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
if [ "$SHAPE" = tiny ]; then LAUNCHED=tests/fsdp_on_cpu.py; DEVICE=cpu; SEQ=64; ACC=1; CPU=true
else LAUNCHED="-m ecomla.cli"; DEVICE=cuda; SEQ=1024; ACC=4; CPU=false; fi
PER_STEP=$((2 * ACC * SEQ))
S=$OUT/summary.txt
log() { echo "$*" | tee -a $S; }
step() {
  local name=$1; shift; local t=$(date +%s)
  timeout ${LIMIT:-300} "$@" > $OUT/$name.log 2>&1; local rc=$?
  log "$name: rc=$rc, $(( $(date +%s) - t )) s"; [ $rc = 0 ] || tail -25 $OUT/$name.log; return $rc
}
log "$(date -u) shape $SHAPE"
$PY -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" | tee -a $S
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader -lms 500 > $OUT/gpu_memory.csv &
  MEMPID=$!
fi
$PY - <<EOF
import yaml
c = yaml.safe_load(open("recipes/accelerate/fsdp.yaml"))
c.update(num_processes=1, use_cpu=$( [ $CPU = true ] && echo True || echo False ))
yaml.safe_dump(c, open("$W/fsdp.yaml", "w"))
EOF
cat > $W/recipe.yaml <<EOF
name: Llama-3.2-1B-shaped (random weights) to full MLA, 4x, on one GPU under FSDP
model: $W/teacher
out: $W/run
convert:
  kv_ratio: 4
  calib: .gpu/calib.txt
  calib_tokens: 8192
  dtype: bfloat16
  device: $DEVICE
train:
  data: [.gpu/train.jsonl]
  seq_len: $SEQ
  batch_size: 2
  grad_accum: $ACC
  precision: bf16
  teacher_dtype: bfloat16
  gradient_checkpointing: true
  save_every: 0
  eval_every: 5
align:
  tokens: $((10 * PER_STEP))
  lr: 0.001
distill:
  tokens: $((10 * PER_STEP))
  lr: 0.00008
EOF
step teacher $PY benchmarks/gpu_fsdp/make_teacher.py $SHAPE $W/teacher || exit 1
step recipe $PY -m accelerate.commands.launch --config_file $W/fsdp.yaml $LAUNCHED run $W/recipe.yaml
grep -h "before:\|after\|resuming\|warning" $OUT/recipe.log | tee -a $S
rm -rf $W/run/aligned $W/run/distilled  # room on the disk: the runs below train run/converted
D="distill $W/run/converted --teacher $W/teacher --data .gpu/train.jsonl --seq-len $SEQ --batch-size 2 --grad-accum $ACC
   --tokens $((4 * PER_STEP)) --precision bf16 --teacher-dtype bfloat16 --gradient-checkpointing --eval-every 2
   --save-every 2 --keep-checkpoints 1 --lr 8e-5 --warmup 0"
if [ -f $W/run/converted/config.json ]; then
  step stop $PY -m accelerate.commands.launch --config_file $W/fsdp.yaml $LAUNCHED $D --out $W/fsdp --stop-after 2
  ls $W/fsdp/training/checkpoints/* | tee -a $S
  step resume $PY -m accelerate.commands.launch --config_file $W/fsdp.yaml $LAUNCHED $D --out $W/fsdp --resume
  grep -h "resuming\|before:\|after" $OUT/stop.log $OUT/resume.log | tee -a $S
  rm -rf $W/fsdp/training/checkpoints
  step plain $PY -m ecomla.cli $D --out $W/plain
  $PY benchmarks/gpu_fsdp/compare.py $W/fsdp $W/plain $OUT/compare.json | tee -a $S
fi
cp $W/run/report/report.md $OUT/ 2>/dev/null
du -sh $W/* | tee -a $S
[ -n "${MEMPID:-}" ] && kill $MEMPID && sort -t, -k2 -n $OUT/gpu_memory.csv | tail -1 | sed 's/^/GPU memory peak (nvidia-smi, every 0.5 s): /' | tee -a $S
tar czf $OUT/logs.tar.gz -C $OUT $(cd $OUT && ls *.log) && rm $OUT/*.log
log "$(date -u) done"
