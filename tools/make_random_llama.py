# Copied from the team notes (shared/device/make_random_llama.py): builds random-weight Llama
# models on a GPU for speed and memory measurements; random weights give no real text.
# usage: python mk_model.py tiny|7b OUTDIR TOKDIR
import os
import shutil
import sys
import time

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

size, out, tokdir = sys.argv[1], sys.argv[2], sys.argv[3]
common = dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1,
              eos_token_id=2,
              pad_token_id=0, tie_word_embeddings=False, initializer_range=0.02, rope_theta=10000.0)
if size == 'tiny':
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=4, **common)
else:  # Llama-2-7B shapes
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, **common)
dev = 'cuda' if torch.cuda.is_available() else 'cpu'
t0 = time.time()
torch.manual_seed(0)
torch.set_default_dtype(torch.float16)
with torch.device(dev):
    model = LlamaForCausalLM(cfg)
model = model.half()
n = sum(p.numel() for p in model.parameters())
print(f'[mk_model] {size}: {n/1e6:.1f}M params, init {time.time()-t0:.1f}s', flush=True)

try:
    model.config.dtype = 'float16'
except Exception:
    pass
model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
model.save_pretrained(out, safe_serialization=True, max_shard_size='4GB')
for f in os.listdir(tokdir):
    shutil.copy(os.path.join(tokdir, f), out)
print(f'[mk_model] saved to {out} in {time.time()-t0:.1f}s: {sorted(os.listdir(out))}', flush=True)
print(open(os.path.join(out, 'config.json')).read())
