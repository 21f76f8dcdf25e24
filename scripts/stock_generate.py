"""Greedy text from a DeepSeek-V3 checkpoint with stock transformers: no ecomla import, no trust_remote_code.

    python scripts/stock_generate.py DIR PROMPT [MAX_NEW_TOKENS]

`make demo` runs it on the demo model's `ecomla export --format deepseek-v3` output and compares the text
with `ecomla generate` on the ecomla checkpoint (the same greedy tokens give the same text).
"""

import sys

import torch
from transformers import AutoTokenizer, DeepseekV3ForCausalLM


def main() -> int:
    path, prompt = sys.argv[1], sys.argv[2]
    new = int(sys.argv[3]) if len(sys.argv) > 3 else 24
    tok = AutoTokenizer.from_pretrained(path)
    model = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert "ecomla" not in sys.modules, "this check must run without ecomla"
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    print(tok.decode(out[0], skip_special_tokens=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
