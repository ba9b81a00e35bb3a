#!/usr/bin/env python3
"""A conversation longer than the model's context, driven through `kvpack chat` one turn per
process (each turn resumes the file), with long user messages: passages of
data/eval/apache-2.0.txt, each asking for a two-sentence summary. It goes on until --tokens
tokens have passed through the conversation (messages, template tokens and replies), so the chat
must shift its context (SmolLM2: 8,192 positions) one or more times.

    python3 scripts/long_chat.py [--kvpack .build/release/kvpack] [--tokens 12000] [--dir DIR]
        [--shrink recent|kvcrush] [-- extra kvpack chat options]

Prints one line per turn and a summary; keeps in DIR: long.kvpack (the conversation) and
pre-shift.kvpack (a copy taken before the first shift: the transcript as long as it got, for
`kvpack eval --text pre-shift.kvpack --prune ...`, which measures what a shift costs).
"""
import argparse, json, os, shutil, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def passages(limit_chars=1500):
    text = open(os.path.join(ROOT, "data/eval/apache-2.0.txt")).read()
    out, cur = [], ""
    for para in text.split("\n\n"):
        if len(cur) + len(para) > limit_chars and cur:
            out.append(cur.strip())
            cur = ""
        cur += para + "\n\n"
    if cur.strip():
        out.append(cur.strip())
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kvpack", default=os.path.join(ROOT, ".build/release/kvpack"))
    ap.add_argument("--tokens", type=int, default=12000)
    ap.add_argument("--dir", default="/tmp/kvpack-long-chat")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--shrink", default="recent")
    ap.add_argument("extra", nargs="*")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    path = os.path.join(args.dir, "long.kvpack")
    snapshot = os.path.join(args.dir, "pre-shift.kvpack")
    for p in (path, snapshot):
        if os.path.exists(p):
            os.unlink(p)
    chunks = passages()
    processed, turn, shifts, total = 0, 0, [], 0
    started = time.time()
    while processed < args.tokens:
        message = "Read this passage and tell me in two sentences what it says:\n\n" + chunks[turn % len(chunks)]
        if total > 0 and not os.path.exists(snapshot) and total + 600 + args.max_tokens > 8192:
            shutil.copyfile(path, snapshot)
        cmd = [args.kvpack, "chat", "--save" if turn == 0 else "--resume", path, "--message", message,
               "--max-tokens", str(args.max_tokens), "--shrink", args.shrink, "--json", "--no-fsync"] + args.extra
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"turn {turn + 1} failed ({out.returncode}): {out.stderr[-3000:]}")
        summary = json.loads(out.stdout)
        t = summary["turns"][0]
        total = summary["totalTokens"]
        processed += t["promptTokens"] + len(t["replyTokens"]) + 2
        shift = t.get("shrink")
        if shift:
            shifts.append(shift)
        turn += 1
        print(f"turn {turn}: {t['promptTokens']} prompt + {len(t['replyTokens'])} reply tokens; file {total} tokens; "
              f"{processed} processed" + (f"; SHIFT kept {shift['kept']} of {shift['before']} ({shift['policy']}, {shift['seconds']:.1f} s)" if shift else ""),
              file=sys.stderr)
    elapsed = time.time() - started
    v = subprocess.run([args.kvpack, "validate", path, "--deep"], capture_output=True, text=True)
    r = subprocess.run([args.kvpack, "chat", "--resume", path, "--message", "Thank you. What was the first passage about?",
                        "--max-tokens", "48", "--json", "--no-fsync"] + args.extra, capture_output=True, text=True)
    info = subprocess.run([args.kvpack, "info", path], capture_output=True, text=True).stdout
    shrink_lines = [l for l in info.splitlines() if "chat.shrink" in l]
    print(f"turns: {turn}; tokens through the conversation: {processed}; wall time {elapsed:.0f} s")
    print(f"context shifts: {len(shifts)}: " + "; ".join(f"kept {s['kept']} of {s['before']} in {s['seconds']:.1f} s" for s in shifts))
    print(f"final file: {total} tokens; validate --deep: {v.stdout.strip().splitlines()[-1] if v.stdout.strip() else v.stderr.strip()}")
    print(f"resume after the shifts: exit {r.returncode}" + (f", reply: {json.loads(r.stdout)['turns'][0]['reply']!r}" if r.returncode == 0 else f": {r.stderr[-500:]}"))
    for l in shrink_lines:
        print(l)
    if os.path.exists(snapshot):
        print(f"pre-shift transcript: {snapshot}")


if __name__ == "__main__":
    main()
