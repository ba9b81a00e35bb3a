"""Save a Hugging Face transformers cache to .kvpack, reopen it, attend over it, load it back.

    make python hf-env          # the package, and torch 2.13.0 (CPU) + transformers in .venv-hf
    PYTHONPATH=python HF_HUB_OFFLINE=1 .venv-hf/bin/python python/examples/hf_chat.py
    kvpack chat --resume hf-chat.kvpack --temperature 0 --repeat-penalty 1 --dry-multiplier 0

SmolLM2-135M-Instruct is the GGUF `make models` downloads (~/.cache/kvpack).
"""
import os
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import kvpack
from kvpack import transformers as kvt

directory = Path(os.environ.get("KVPACK_MODEL_DIR", Path.home() / ".cache/kvpack"))
gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=torch.float32)

# 1. HF prefills a ChatML prompt; its cache goes to a file (keys in llama.cpp's interleaved
#    layout, the model's fingerprint recorded, so `kvpack chat --resume` can continue it).
messages = [{"role": "user", "content": "What is the capital of France?"}]
ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
with torch.no_grad():
    cache = model(ids, use_cache=True).cache
#    Segments of 16 tokens, so that this short prompt seals two of them into 4-bit keys and 2-bit
#    values (the last, unsealed tokens stay f16 rows until their segment fills).
kvt.save(cache, "hf-chat.kvpack", model=model, input_ids=ids, scheme="int:k4v2:kc16", rope_layout="interleaved",
         gguf_file=directory / gguf, segment_tokens=16, overwrite=True)

# 2. Reopen it: geometry, schemes, decoded keys, attention read in place from the mapped file.
with kvpack.open("hf-chat.kvpack") as f:
    print(f)
    print("schemes of layer 0:", f.schemes[0], "| bits per element:", round(f.info()["cacheBitsPerElement"], 2))
    keys = f.keys(0, stop=32)                           # [kv_heads, tokens, head_dim], float32
    exact = kvt.to_interleaved(cache.layers[0].keys[0, :, :32].numpy())
    print("layer 0 keys of the sealed tokens, relative error:", round(float(np.linalg.norm(keys - exact) / np.linalg.norm(exact)), 4))
    queries = np.random.default_rng(0).standard_normal((f.geometry.query_heads, f.geometry.head_dim)).astype(np.float32)
    print("attention output of layer 0, head 0:", f.attend(0, queries)[0, :4])

# 3. Back into a DynamicCache (rotate-half keys, decoded): HF continues from it.
loaded = kvt.load("hf-chat.kvpack", model, stop=-1)    # all but the last token: generate computes that one
with torch.no_grad():
    out = model.generate(ids, cache=loaded, max_new_tokens=40, do_sample=False)
print("HF over the 4-bit/2-bit cache:", repr(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))
