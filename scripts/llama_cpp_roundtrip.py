#!/usr/bin/env python3
"""Round trips of a conversation's KV cache between the real llama.cpp and KVPack, with SmolLM2
(`make llama-cpp-roundtrip`; run inside scripts/llama-cpp.sh so llama.cpp's binding loads).

For each ChatML prompt, both directions:

  llama.cpp -> KVPack   llama.cpp evaluates the prompt (system, user message, assistant header)
                        and saves a session file; `kvpack import` makes a .kvpack of it;
                        llama.cpp (from its file) and KVPack (from the .kvpack) each continue the
                        assistant's reply greedily. `kvpack chat --resume` on the imported file
                        finishes that reply: its tokens must be KVPack's continuation.
  KVPack -> llama.cpp   `kvpack chat --save` answers the prompt (a whole turn, closed with
                        <|im_end|>); `kvpack export` writes a llama.cpp session file; llama.cpp
                        (from it) and KVPack (from the .kvpack) each take the same next user
                        message and continue.

KVPack's continuations run `kvpack generate --resume` (the runner chat uses, with --follow for
teacher forcing and the logit margins in its --json).

Free-running continuations diverge at their first disagreement, after which they read different
contexts. So each engine is also teacher-forced along the other's continuation, reporting its own
greedy choice and logit margin at every step: agreement is counted over every position, and every
disagreement is listed with both engines' top-2 margins (a near tie is a margin under 0.5 in one
engine). Prints a Markdown report; --json writes the raw results.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Write a short poem about the ocean.",
    "Explain what a computer is in one sentence.",
]
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
FOLLOW_UP = "Thank you! Can you tell me more?"
NEAR_TIE = 0.5


def chatml(message):
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{message}<|im_end|>\n"
            f"<|im_start|>assistant\n")


def next_message(message):
    return f"<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n"


def run(cmd, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, **kw)
    if p.returncode != 0:
        sys.exit(f"llama_cpp_roundtrip: {' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    return p.stdout


class Engines:
    def __init__(self, args, work):
        self.args, self.work = args, work
        self.driver = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama_cpp_driver.py")]

    def llama(self, *extra):
        return json.loads(run(self.driver + list(extra) + ["--model", self.args.model]))

    def kvpack(self, *extra):
        return run([self.args.kvpack] + list(extra))

    def kv_continue(self, kvfile, steps=None, follow=None, prompt=None):
        copy = kvfile + ".run.kvpack"
        shutil.copyfile(kvfile, copy)
        cmd = ["generate", "--resume", copy, "--model", self.args.model, "--json", "--no-fsync"]
        cmd += ["--prompt-tokens", ",".join(map(str, prompt))] if prompt else []
        cmd += ["--follow", ",".join(map(str, follow))] if follow else ["--steps", str(steps)]
        out = json.loads(self.kvpack(*cmd))
        os.remove(copy)
        return {"tokens": out["generated"], "margins": out["margins"], "second": out["runnersUp"]}


def compare(reference, forced, ref_name, forced_name):
    """`reference` ran free; `forced` was fed its tokens. Position i compares the reference's token
    with the forced engine's own choice on the same context."""
    rows = []
    for i, token in enumerate(reference["tokens"]):
        if forced["tokens"][i] != token:
            rows.append({"step": i, ref_name: token, f"{ref_name}_margin": reference["margins"][i],
                         forced_name: forced["tokens"][i], f"{forced_name}_margin": forced["margins"][i]})
    agree = len(reference["tokens"]) - len(rows)
    return agree, rows


def prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kvpack", required=True)
    p.add_argument("--model", required=True, help="the SmolLM2 GGUF")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--prompts", type=int, default=len(PROMPTS), help="run the first N prompts (default: all)")
    p.add_argument("--json")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="kvpack-llama-roundtrip-")
    e = Engines(args, work)
    results = []
    for n, message in enumerate(PROMPTS[:args.prompts]):
        prompt_file = os.path.join(work, f"prompt{n}.txt")
        open(prompt_file, "w", encoding="utf-8").write(chatml(message))
        # llama.cpp -> KVPack
        a_bin, a_kv = os.path.join(work, f"a{n}.bin"), os.path.join(work, f"a{n}.kvpack")
        saved = e.llama("save", "--prompt-file", prompt_file, "--out", a_bin)
        llama_free = e.llama("continue", "--state", a_bin, "--steps", str(args.steps))
        e.kvpack("import", a_bin, a_kv, "--model", args.model, "--scheme", "raw:f16", "--no-fsync")
        kv_free = e.kv_continue(a_kv, steps=args.steps)
        kv_forced = e.kv_continue(a_kv, follow=llama_free["tokens"])
        chat_copy = a_kv + ".chat.kvpack"
        shutil.copyfile(a_kv, chat_copy)
        chat = json.loads(e.kvpack("chat", "--resume", chat_copy, "--model", args.model, "--max-tokens", str(args.steps),
                                   "--temperature", "0", "--json", "--no-fsync"))
        chat_reply = chat["turns"][0]["replyTokens"]
        chat_matches = chat_reply == kv_free["tokens"][:len(chat_reply)]
        llama_forced = e.llama("continue", "--state", a_bin, "--follow", ",".join(map(str, kv_free["tokens"])))
        agree_a, rows_a = compare(llama_free, kv_forced, "llama.cpp", "kvpack")
        agree_a2, rows_a2 = compare(kv_free, llama_forced, "kvpack", "llama.cpp")
        # KVPack -> llama.cpp
        b_kv, b_bin = os.path.join(work, f"b{n}.kvpack"), os.path.join(work, f"b{n}.bin")
        first = json.loads(e.kvpack("chat", "--save", b_kv, "--model", args.model, "--message", message, "--max-tokens", "64",
                                    "--temperature", "0", "--scheme", "raw:f16", "--json", "--no-fsync"))
        e.kvpack("export", b_kv, b_bin, "--format", "llama.cpp-session")
        then = ["--then-text", next_message(FOLLOW_UP)]
        llama_free_b = e.llama("continue", "--state", b_bin, "--steps", str(args.steps), *then)
        fed = llama_free_b["fed"]
        kv_free_b = e.kv_continue(b_kv, steps=args.steps, prompt=fed)
        llama_forced_b = e.llama("continue", "--state", b_bin, "--follow", ",".join(map(str, kv_free_b["tokens"])), *then)
        kv_forced_b = e.kv_continue(b_kv, follow=llama_free_b["tokens"], prompt=fed)
        agree_b, rows_b = compare(kv_free_b, llama_forced_b, "kvpack", "llama.cpp")
        agree_b2, rows_b2 = compare(llama_free_b, kv_forced_b, "llama.cpp", "kvpack")
        results.append({
            "prompt": message, "prompt_tokens": len(saved["tokens"]),
            "chat_reply_matches": chat_matches, "chat_reply_tokens": len(chat_reply),
            "kvpack_chat_turn": first["turns"][0]["reply"], "exported_tokens": first["totalTokens"],
            "llama_to_kvpack": {"free_prefix": prefix(llama_free["tokens"], kv_free["tokens"]),
                                "kvpack_on_llama_path": [agree_a, rows_a], "llama_on_kvpack_path": [agree_a2, rows_a2],
                                "llama_tokens": llama_free["tokens"], "kvpack_tokens": kv_free["tokens"]},
            "kvpack_to_llama": {"free_prefix": prefix(llama_free_b["tokens"], kv_free_b["tokens"]),
                                "llama_on_kvpack_path": [agree_b, rows_b], "kvpack_on_llama_path": [agree_b2, rows_b2],
                                "llama_tokens": llama_free_b["tokens"], "kvpack_tokens": kv_free_b["tokens"]},
        })
    shutil.rmtree(work)
    if args.json:
        json.dump(results, open(args.json, "w"), indent=1)
    steps = args.steps
    print(f"| prompt | direction | same free-running tokens | KVPack on llama.cpp's path | llama.cpp on KVPack's path |")
    print("|---|---|---|---|---|")
    chat_ok = all(r["chat_reply_matches"] for r in results)
    all_rows, near_ties, total, agreed = [], 0, 0, 0
    for r in results:
        for name, label, x, y in [("llama_to_kvpack", "llama.cpp -> KVPack", "kvpack_on_llama_path", "llama_on_kvpack_path"),
                                  ("kvpack_to_llama", "KVPack -> llama.cpp", "kvpack_on_llama_path", "llama_on_kvpack_path")]:
            d = r[name]
            print(f"| {r['prompt']} | {label} | {d['free_prefix']}/{steps} | {d[x][0]}/{steps} | {d[y][0]}/{steps} |")
            for key in (x, y):
                total += steps
                agreed += d[key][0]
                for row in d[key][1]:
                    all_rows.append((r["prompt"], label, key, row))
    print()
    for r in results:
        print(f"- {r['prompt']}: `kvpack chat --resume` on the import finished llama.cpp's open reply with "
              f"{r['chat_reply_tokens']} tokens, {'the same as' if r['chat_reply_matches'] else 'DIFFERENT from'} KVPack's continuation; "
              f"`kvpack chat --save` answered \"{r['kvpack_chat_turn'][:60]}{'...' if len(r['kvpack_chat_turn']) > 60 else ''}\" "
              f"and its {r['exported_tokens']} tokens were exported to llama.cpp, both engines then taking \"{FOLLOW_UP}\".")
    print()
    print(f"Teacher-forced agreement: {agreed} of {total} positions ({100 * agreed / max(total, 1):.1f}%).")
    if all_rows:
        print()
        print("| prompt | direction | path | step | tokens (llama.cpp / KVPack) | margins (llama.cpp / KVPack) | near tie |")
        print("|---|---|---|---|---|---|---|")
        for prompt, label, key, row in all_rows:
            lt, kt = row["llama.cpp"], row["kvpack"]
            lm, km = row["llama.cpp_margin"], row["kvpack_margin"]
            tie = min(lm, km) < NEAR_TIE
            near_ties += tie
            print(f"| {prompt} | {label} | {key.replace('_', ' ')} | {row['step']} | {lt} / {kt} | {lm:.3f} / {km:.3f} | {'yes' if tie else 'NO'} |")
        print()
    print(f"Disagreements: {len(all_rows)}, of which near ties (margin < {NEAR_TIE} in one engine): {near_ties}.")
    return 0 if near_ties == len(all_rows) and chat_ok else 1


if __name__ == "__main__":
    sys.exit(main())
