"""kvpack.transformers against the real client: Hugging Face transformers running SmolLM2 (the
Q4_1 GGUF `make models` fetches), and the kvpack CLI's own runner on the same GGUF.

- HF's keys, saved in the interleaved layout, equal the kv-samples keys (llama.cpp's layout).
- HF prefills a ChatML prompt, `save` writes it, `kvpack chat --resume` finishes the reply with
  the same greedy tokens HF generates.
- `kvpack chat` starts a conversation, `load` gives HF a DynamicCache, and HF's greedy reply to
  the next message equals kvpack's.
- HF reading a text through a quantized .kvpack cache (round trip at every segment) has the
  perplexity `kvpack eval` measures for that scheme.

Skipped, with the reason, without torch/transformers (`make hf-env` installs them in
.venv-hf), the GGUF, or the CLI binary (KVPACK_CLI, default .build/release/kvpack).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (make hf-env)")
transformers = pytest.importorskip("transformers", reason="transformers is not installed (make hf-env)")

import kvpack  # noqa: E402
from kvpack import transformers as kvt  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = Path(os.environ.get("KVPACK_MODEL_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvpack")
GGUF = MODEL_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"
CLI = Path(os.environ.get("KVPACK_CLI") or REPO / ".build/release/kvpack")
SAMPLES = Path(os.environ.get("KVPACK_SAMPLES") or REPO.parent / "shared/kv-samples/smollm2-chat")
# Pure greedy in kvpack chat: temperature 0 with the preset's penalties off, as HF's do_sample=False.
GREEDY = ["--temperature", "0", "--repeat-penalty", "1", "--dry-multiplier", "0"]

if not GGUF.exists():
    pytest.skip(f"{GGUF} is missing (make models)", allow_module_level=True)
if not CLI.exists():
    pytest.skip(f"{CLI} is missing (make build)", allow_module_level=True)


@pytest.fixture(scope="module")
def hf():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR, gguf_file=GGUF.name)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, gguf_file=GGUF.name, dtype=torch.float32)
    model.eval()
    return model, tokenizer


def kvpack_cli(*args: str) -> str:
    done = subprocess.run([str(CLI), *args], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    assert done.returncode == 0, f"kvpack {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def greedy(model, ids: torch.Tensor, max_new_tokens: int, cache=None) -> list[int]:
    with torch.no_grad():
        out = model.generate(ids, cache=cache, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def until_end(tokens: list[int], end: int) -> list[int]:
    return tokens[:tokens.index(end)] if end in tokens else tokens


def test_hf_keys_in_the_interleaved_layout_are_llama_cpp_keys(hf, tmp_path):
    model, _ = hf
    if not SAMPLES.exists():
        pytest.skip(f"{SAMPLES} is missing")
    meta = json.loads((SAMPLES / "meta.json").read_text())
    n = meta["prompt_tokens"]
    ids = torch.tensor([meta["token_ids"][:n]])
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
    kvt.save(cache, tmp_path / "i.kvpack", model=model, input_ids=ids, rope_layout="interleaved", scheme="raw:f32")
    kvt.save(cache, tmp_path / "r.kvpack", model=model, input_ids=ids, scheme="raw:f32")
    with kvpack.open(tmp_path / "i.kvpack") as interleaved, kvpack.open(tmp_path / "r.kvpack") as rotate_half:
        assert interleaved.geometry.rope_layout == "interleaved" and rotate_half.geometry.rope_layout == "rotate-half"
        for layer in (0, 1, 15, 29):
            reference = np.load(SAMPLES / f"k_layer{layer:02d}.npy")[:, :n].astype(np.float32)
            keys = interleaved.keys(layer)
            # kv-samples are f16 (llama.cpp's runner wrote them): equal to f16 rounding.
            assert np.linalg.norm(keys - reference) / np.linalg.norm(reference) < 1e-3
            np.testing.assert_array_equal(rotate_half.keys(layer), cache.layers[layer].keys[0].numpy())
            np.testing.assert_array_equal(interleaved.values(layer), rotate_half.values(layer))
    # The CLI's layout move gives the same bytes as saving in that layout.
    kvpack_cli("convert", str(tmp_path / "r.kvpack"), str(tmp_path / "c.kvpack"), "--rope-layout", "interleaved")
    with kvpack.open(tmp_path / "c.kvpack") as converted, kvpack.open(tmp_path / "i.kvpack") as interleaved:
        for layer in range(converted.geometry.layers):
            np.testing.assert_array_equal(converted.keys(layer), interleaved.keys(layer))


def test_kvpack_chat_continues_an_hf_prefill(hf, tmp_path):
    model, tokenizer = hf
    messages = [{"role": "user", "content": "What is the capital of France, and what river runs through it?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
    path = tmp_path / "hf.kvpack"
    kvt.save(cache, path, model=model, input_ids=ids, rope_layout="interleaved", gguf_file=GGUF, scheme="raw:f16")
    expected = until_end(greedy(model, ids, 60), tokenizer.convert_tokens_to_ids("<|im_end|>"))
    kvpack_cli("chat", "--resume", str(path), *GREEDY, "--max-tokens", "60")
    with kvpack.open(path) as f:
        reply = f.token_ids(ids.shape[1]).tolist()
    got = until_end(reply, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    print("HF:     ", repr(tokenizer.decode(expected)))
    print("kvpack: ", repr(tokenizer.decode(got)))
    assert got == expected


def test_hf_continues_a_kvpack_chat(hf, tmp_path):
    model, tokenizer = hf
    path = tmp_path / "chat.kvpack"
    kvpack_cli("chat", "--save", str(path), "--message", "Name three primary colors.", *GREEDY, "--max-tokens", "40")
    first = kvpack.open(path).token_ids().astype(np.int64)
    # The next turn as kvpack writes it (ChatML), tokenized by HF's tokenizer.
    turn = tokenizer("<|im_start|>user\nWhich of them is warmest?<|im_end|>\n<|im_start|>assistant\n",
                     return_tensors="pt")["input_ids"]
    cache = kvt.load(path, model, stop=-1)
    history = torch.from_numpy(first)[None]
    expected = until_end(greedy(model, torch.cat([history, turn], -1), 48, cache=cache),
                         tokenizer.convert_tokens_to_ids("<|im_end|>"))
    kvpack_cli("chat", "--resume", str(path), "--message", "Which of them is warmest?", *GREEDY, "--max-tokens", "48")
    after = kvpack.open(path).token_ids().tolist()
    n = len(first) + turn.shape[1]
    assert after[:n] == first.tolist() + turn[0].tolist(), "kvpack and HF tokenize the turn differently"
    got = until_end(after[n:], tokenizer.convert_tokens_to_ids("<|im_end|>"))
    print("kvpack: ", repr(tokenizer.decode(got)))
    print("HF:     ", repr(tokenizer.decode(expected)))
    assert got == expected


def hf_perplexity_through(model, text: list[int], path: Path, scheme: str, segment: int = 64) -> float:
    """HF reads `text` a segment at a time; after each segment its new K/V go into a .kvpack file
    in `scheme`, and the next segment attends over the file's decoded cache: what `kvpack eval`
    does with its own runner (there, too, batches end where segments seal)."""
    log_probs = []
    with kvpack.create(path, layers=30, query_heads=9, kv_heads=3, head_dim=64, scheme=scheme, segment_tokens=segment,
                       rope_layout="rotate-half", rope_theta=100000.0, overwrite=True, durable=False) as w:
        for start in range(0, len(text), segment):
            chunk = torch.tensor([text[start:start + segment]])
            cache = kvt.load(path, model) if start else None
            with torch.no_grad():
                out = model(chunk, cache=cache, use_cache=True)
            logits = out.logits[0].double().log_softmax(-1)
            for i in range(chunk.shape[1]):
                if start + i + 1 < len(text):
                    log_probs.append(logits[i, text[start + i + 1]].item())
            new = out.cache
            k = np.stack([new.layers[l].keys[0, :, start:].numpy() for l in range(30)])
            v = np.stack([new.layers[l].values[0, :, start:].numpy() for l in range(30)])
            w.append(k, v, text[start:start + segment])
            w.commit()
    return math.exp(-sum(log_probs) / len(log_probs))


def test_perplexity_through_a_kvpack_cache_matches_kvpack_eval(hf, tmp_path):
    model, tokenizer = hf
    text = tokenizer((REPO / "data/eval/apache-2.0.txt").read_text())["input_ids"][:1024]
    # The text as a .kvpack file, so `kvpack eval` reads exactly these tokens.
    with kvpack.create(tmp_path / "text.kvpack", layers=30, query_heads=9, kv_heads=3, head_dim=64, overwrite=True,
                       durable=False) as w:
        w.append(np.zeros((30, 3, len(text), 64), np.float32), np.zeros((30, 3, len(text), 64), np.float32), text)
    schemes = ["int:k4v2", "nsn:2"]
    report = json.loads(kvpack_cli("eval", "--model", str(GGUF), "--text", str(tmp_path / "text.kvpack"),
                                   *[a for s in schemes for a in ("--scheme", s)], "--json"))
    baseline_hf = hf_perplexity_through(model, text, tmp_path / "base.kvpack", "raw:f32")
    rows = [("raw:f32", baseline_hf, report["baseline"]["perplexity"])]
    for scheme, result in zip(schemes, report["schemes"]):
        rows.append((scheme, hf_perplexity_through(model, text, tmp_path / "q.kvpack", scheme), result["perplexity"]))
    for scheme, ours, theirs in rows:
        print(f"{scheme:10s} HF over .kvpack {ours:8.4f}   kvpack eval {theirs:8.4f}   "
              f"delta vs baseline: HF {ours - baseline_hf:+.4f}, kvpack {theirs - rows[0][2]:+.4f}")
    # Two runners (HF f32 over dequantized weights; kvpack's own) agree on the baseline to noise,
    # and each scheme costs about the same perplexity in both.
    assert abs(baseline_hf - rows[0][2]) / rows[0][2] < 0.01
    for scheme, ours, theirs in rows[1:]:
        assert abs(ours - theirs) / theirs < 0.02, (scheme, ours, theirs)
        assert ours > baseline_hf  # the quantized cache costs something: the file was really read
