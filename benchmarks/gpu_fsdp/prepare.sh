#!/bin/bash
# Makes .gpu/ (git-ignored, carried to the device): the SmolLM2 tokenizer (its ids fit the random teachers'
# vocabularies), training text and calibration text from ../shared/data (not in the repository).
set -eu
mkdir -p .gpu
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
cp ../shared/data/train/c4_demo.jsonl .gpu/train.jsonl
head -c 120000 ../shared/data/train/wiki_demo.txt > .gpu/calib.txt
.venv/bin/python -c "from ecomla.sources import load_tokenizer; load_tokenizer('smollm2-135m').save_pretrained('.gpu/tok')"
du -sh .gpu
