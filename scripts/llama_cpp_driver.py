#!/usr/bin/env python3
"""Drives a real llama.cpp (the one `make llama.cpp` builds) through its C API, via the
llama-cpp-python binding of the same sdist, for KVPack's interop tests and fixtures.

    save      evaluate a prompt and save llama.cpp's state: a session file (ggsn,
              llama_state_save_file) or a sequence file (ggsq, llama_state_seq_save_file)
    continue  load such a file and continue greedily, as llama.cpp resumes one: the last token
              is removed from the cache and evaluated again for its logits (or, with
              --then-text, the text is tokenized and evaluated after the loaded tokens: the next
              message of a conversation); prints each generated token with its top-2 logit margin
    perplexity  evaluate a text in one batch through the cache (its rows are written in the
              cache type, then attended) and print the perplexity of each next token and the
              greedy choice at every position: what a cache type costs, measured in llama.cpp

Both print JSON on stdout. The cache types (--type-k, --type-v) and flash attention (--flash-attn
on: V stored by rows, v_trans 0; off: V transposed, v_trans 1) must match between save and
continue, as llama.cpp requires. Quantized caches are Hadamard-rotated unless
LLAMA_ATTN_ROT_DISABLE=1 is set in the environment.

Run with the virtualenv `make llama.cpp` makes, LLAMA_CPP_LIB_PATH pointing at its build/bin:
    scripts/llama-cpp.sh python scripts/llama_cpp_driver.py save --model M --prompt-file P --out F
"""
import argparse
import ctypes
import json
import sys

import llama_cpp as L

TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30}


def make_context(args):
    L.llama_backend_init()
    mparams = L.llama_model_default_params()
    model = L.llama_model_load_from_file(args.model.encode(), mparams)
    if not model:
        sys.exit(f"llama_cpp_driver: cannot load {args.model}")
    cparams = L.llama_context_default_params()
    cparams.n_ctx = args.ctx
    cparams.n_batch = args.ctx
    cparams.n_ubatch = args.ctx
    cparams.n_threads = args.threads
    cparams.n_threads_batch = args.threads
    cparams.type_k = TYPES[args.type_k]
    cparams.type_v = TYPES[args.type_v]
    cparams.flash_attn_type = 1 if args.flash_attn == "on" else 0
    ctx = L.llama_init_from_model(model, cparams)
    if not ctx:
        sys.exit("llama_cpp_driver: cannot create the context (cache types and flash attention must be compatible)")
    return model, ctx


def tokenize(model, text):
    vocab = L.llama_model_get_vocab(model)
    raw = text.encode("utf-8")
    buf = (L.llama_token * (len(raw) + 16))()
    n = L.llama_tokenize(vocab, raw, len(raw), buf, len(buf), False, True)
    if n < 0:
        sys.exit("llama_cpp_driver: tokenization overflow")
    return [buf[i] for i in range(n)]


def decode(ctx, tokens, first_pos, logits_last=True):
    batch = L.llama_batch_init(len(tokens), 0, 1)
    batch.n_tokens = len(tokens)
    for i, t in enumerate(tokens):
        batch.token[i] = t
        batch.pos[i] = first_pos + i
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = 1 if (logits_last and i == len(tokens) - 1) else 0
    rc = L.llama_decode(ctx, batch)
    L.llama_batch_free(batch)
    if rc != 0:
        sys.exit(f"llama_cpp_driver: llama_decode returned {rc}")


def top2(ctx, n_vocab):
    logits = L.llama_get_logits_ith(ctx, -1)
    values = [logits[i] for i in range(n_vocab)]
    order = sorted(range(n_vocab), key=lambda i: -values[i])[:2]
    return order[0], order[1], values[order[0]] - values[order[1]]


def cmd_save(args):
    model, ctx = make_context(args)
    text = open(args.prompt_file, encoding="utf-8").read() if args.prompt_file else args.prompt
    tokens = tokenize(model, text)
    decode(ctx, tokens, 0)
    arr = (L.llama_token * len(tokens))(*tokens)
    if args.kind == "session":
        ok = L.llama_state_save_file(ctx, args.out.encode(), arr, len(tokens))
        if not ok:
            sys.exit("llama_cpp_driver: llama_state_save_file failed")
    else:
        n = L.llama_state_seq_save_file(ctx, args.out.encode(), 0, arr, len(tokens))
        if n == 0:
            sys.exit("llama_cpp_driver: llama_state_seq_save_file failed")
    print(json.dumps({"tokens": tokens, "count": len(tokens), "file": args.out}))


def cmd_continue(args):
    model, ctx = make_context(args)
    capacity = args.ctx
    out = (L.llama_token * capacity)()
    count = ctypes.c_size_t(0)
    if args.kind == "session":
        ok = L.llama_state_load_file(ctx, args.state.encode(), out, capacity, ctypes.byref(count))
        if not ok:
            sys.exit(f"llama_cpp_driver: llama_state_load_file refused {args.state}")
    else:
        n = L.llama_state_seq_load_file(ctx, args.state.encode(), 0, out, capacity, ctypes.byref(count))
        if n == 0:
            sys.exit(f"llama_cpp_driver: llama_state_seq_load_file refused {args.state}")
    tokens = [out[i] for i in range(count.value)]
    if not tokens:
        sys.exit("llama_cpp_driver: the state holds no tokens")
    fed = []
    if args.then_text:
        # The conversation's next message, evaluated after the loaded cache.
        fed = tokenize(model, args.then_text)
        decode(ctx, fed, len(tokens))
    else:
        # As llama.cpp's own tools resume a saved prompt: drop the last token and evaluate it
        # again, since the state holds no logits.
        mem = L.llama_get_memory(ctx)
        L.llama_memory_seq_rm(mem, 0, len(tokens) - 1, -1)
        decode(ctx, [tokens[-1]], len(tokens) - 1)
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    follow = [int(t) for t in args.follow.split(",")] if args.follow else None
    generated, margins, seconds = [], [], []
    pos = len(tokens) + len(fed)
    for step in range(len(follow) if follow else args.steps):
        best, second, margin = top2(ctx, n_vocab)
        generated.append(best)
        margins.append(margin)
        seconds.append(second)
        # --follow: feed the other engine's token, so every position is compared on the same context.
        decode(ctx, [follow[step] if follow else best], pos)
        pos += 1
    print(json.dumps({"context": len(tokens), "fed": fed, "tokens": generated, "margins": margins, "second": seconds}))


def cmd_perplexity(args):
    import numpy as np
    model, ctx = make_context(args)
    text = open(args.prompt_file, encoding="utf-8").read() if args.prompt_file else args.prompt
    tokens = tokenize(model, text)
    batch = L.llama_batch_init(len(tokens), 0, 1)
    batch.n_tokens = len(tokens)
    for i, t in enumerate(tokens):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, 1
        batch.seq_id[i][0] = 0
    if L.llama_decode(ctx, batch) != 0:
        sys.exit("llama_cpp_driver: llama_decode failed")
    L.llama_batch_free(batch)
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    logits = np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(len(tokens), n_vocab)).astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    nll = -logp[np.arange(len(tokens) - 1), tokens[1:]]
    print(json.dumps({"tokens": len(tokens), "perplexity": float(np.exp(nll.mean())),
                      "greedy": [int(g) for g in logits.argmax(axis=1)]}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["save", "continue", "perplexity"])
    p.add_argument("--model", required=True)
    p.add_argument("--kind", choices=["session", "seq"], default="session")
    p.add_argument("--prompt", default="")
    p.add_argument("--prompt-file")
    p.add_argument("--out")
    p.add_argument("--state")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--then-text", help="continue: evaluate this text (special tokens parsed) after the loaded tokens, then generate")
    p.add_argument("--follow", help="continue: feed these comma-separated tokens instead of the greedy ones (teacher forcing); still report llama.cpp's own choice and margin at each step")
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--type-k", choices=sorted(TYPES), default="f16")
    p.add_argument("--type-v", choices=sorted(TYPES), default="f16")
    p.add_argument("--flash-attn", choices=["on", "off"], default="on")
    args = p.parse_args()
    {"save": cmd_save, "continue": cmd_continue, "perplexity": cmd_perplexity}[args.command](args)


if __name__ == "__main__":
    main()
