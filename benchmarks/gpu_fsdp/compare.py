"""python compare.py A B OUT.json: two distillation runs' weights and held-out metrics side by side."""
import json
import sys

from safetensors.torch import load_file

a_dir, b_dir, out = sys.argv[1:4]
a, b = load_file(f"{a_dir}/model.safetensors"), load_file(f"{b_dir}/model.safetensors")
rel = {k: float((a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp_min(1e-30)) for k in b}
worst = max(rel, key=rel.get)
summaries = [json.load(open(f"{d}/training/summary.json")) for d in (a_dir, b_dir)]
result = {"same_tensors": sorted(a) == sorted(b), "max_relative_difference": rel[worst], "worst_tensor": worst,
          "median_relative_difference": sorted(rel.values())[len(rel) // 2],
          "runs": {d: {k: s.get(k) for k in ("before", "after", "train_tokens_per_s", "train_seconds", "rank_param_checksums")}
                   for d, s in zip((a_dir, b_dir), summaries)}}
json.dump(result, open(out, "w"), indent=1)
print(json.dumps(result, indent=1))
