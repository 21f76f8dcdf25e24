"""python make_teacher.py SHAPE DIR: a random Llama of a real model's shape (Llama-3.2-1B's, or a tiny one for a dry
run on CPU) in bfloat16, with the SmolLM2 tokenizer (its ids fit any of these vocabularies)."""
import sys
import time

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=49152, max_position_embeddings=131072),
}
shape, out = sys.argv[1], sys.argv[2]
t0 = time.time()
tok = AutoTokenizer.from_pretrained(sys.argv[3] if len(sys.argv) > 3 else ".gpu/tok")
config = LlamaConfig(**SHAPES[shape], tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id,
                     rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
torch.manual_seed(0)
device = "cuda" if torch.cuda.is_available() else "cpu"
with torch.device(device):
    model = LlamaForCausalLM(config).to(torch.bfloat16)
model.save_pretrained(out)
tok.save_pretrained(out)
print(f"teacher {shape}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, {time.time() - t0:.0f} s")
