#!/usr/bin/env python3
"""The size table of README's llama.cpp section (`make llama-cpp-sizes`; run inside
scripts/llama-cpp.sh so llama.cpp's binding loads).

One conversation, the first CHARS characters of data/eval/apache-2.0.txt (about 1,000 SmolLM2
tokens): llama.cpp evaluates it and saves its session file with f16, q8_0 and q4_0 caches;
`kvpack import` makes .kvpack files of the f16 one in several schemes. The quality cost of each
is measured on the same text by the engine that uses the cache: `kvpack eval` for the KVPack
schemes (teacher forcing through a file-backed cache, against lossless f32), and for llama.cpp's
own cache types llama.cpp itself (`llama_cpp_driver.py perplexity`: the text in one batch through
a cache of that type, against its f16 cache): perplexity change and greedy next-token agreement.
Prints a Markdown table.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

SCHEMES = ["raw:f16", "raw:f16:zstd", "int:k4v2", "int:k4v2:kc64", "nsn:2"]


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        sys.exit(f"llama_cpp_sizes: {' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    return p.stdout


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kvpack", required=True)
    p.add_argument("--model", required=True, help="the SmolLM2 GGUF")
    p.add_argument("--text", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "eval", "apache-2.0.txt"))
    p.add_argument("--chars", type=int, default=5100)
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="kvpack-llama-sizes-")
    text = os.path.join(work, "conversation.txt")
    open(text, "w", encoding="utf-8").write(open(args.text, encoding="utf-8").read()[:args.chars])
    driver = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama_cpp_driver.py")]
    rows = []
    tokens = None
    llama_ppl = {}
    for t in ["f16", "q8_0", "q4_0"]:
        out = os.path.join(work, f"session-{t}.bin")
        cache = ["--type-k", t, "--type-v", t, "--ctx", "2048"]
        saved = json.loads(run(driver + ["save", "--model", args.model, "--prompt-file", text, "--out", out] + cache))
        tokens = saved["count"]
        llama_ppl[t] = json.loads(run(driver + ["perplexity", "--model", args.model, "--prompt-file", text] + cache))
        base, this = llama_ppl["f16"], llama_ppl[t]
        agree = sum(a == b for a, b in zip(base["greedy"], this["greedy"])) / len(base["greedy"])
        rows.append((f"llama.cpp session file, {t} cache", os.path.getsize(out),
                     {"spec": t, "perplexityDelta": this["perplexity"] - base["perplexity"], "greedyAgreement": agree}))
    source = os.path.join(work, "session-f16.bin")
    quality = json.loads(run([args.kvpack, "eval", "--model", args.model, "--text", text, "--json"]
                             + [a for s in SCHEMES for a in ("--scheme", s)]))
    by_spec = {s["spec"]: s for s in quality["schemes"]}
    for s in SCHEMES:
        out = os.path.join(work, s.replace(":", "-") + ".kvpack")
        run([args.kvpack, "import", source, out, "--model", args.model, "--scheme", s, "--no-fsync"])
        rows.append((f".kvpack `{s}`", os.path.getsize(out), by_spec.get(s)))
    base = rows[0][1]
    elements = tokens * 30 * 3 * 64 * 2
    print(f"{tokens} tokens (llama.cpp's tokenization; `kvpack eval` read {quality['tokens']}) of SmolLM2-135M-Instruct: "
          f"30 layers x 3 KV heads x 64, keys and values.")
    print()
    print("| file | bytes | compression vs llama.cpp f16 | bits per element | perplexity change | greedy agreement |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, size, q in rows:
        ppl = f"{q['perplexityDelta']:+.3f}" if q else "not measured"
        agree = f"{100 * q['greedyAgreement']:.2f}%" if q else "not measured"
        print(f"| {name} | {size:,} | {base / size:.2f}x | {8 * size / elements:.2f} | {ppl} | {agree} |")
    print()
    print(f"Perplexity of the text: {quality['baseline']['perplexity']:.3f} in KVPack (lossless f32 cache; the .kvpack rows "
          f"are measured against it), {llama_ppl['f16']['perplexity']:.3f} in llama.cpp (f16 cache; its q8_0 and q4_0 rows "
          f"against it). Bits per element: the whole file over {elements:,} cached values.")
    for f in os.listdir(work):
        os.remove(os.path.join(work, f))
    os.rmdir(work)


if __name__ == "__main__":
    main()
