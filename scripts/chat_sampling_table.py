#!/usr/bin/env python3
"""Runs every prompt of Tests/Fixtures/chat/everyday-prompts.txt through `kvpack chat`, one new
chat per prompt, under several sampler settings, and prints a Markdown table per setting:
the share of replies that loop, that switch language, and that stop by themselves.

    python3 scripts/chat_sampling_table.py [--kvpack .build/release/kvpack] [--max-tokens 512]
        [--seeds 1,2,3] [--config NAME=ARGS ...] [--only PREFIX ...] [--json out.json]

Each sampled setting runs once per seed (greedy once: it has no draw), and the shares are over
all its replies.

Definitions (applied to the reply text and its token ids, as `kvpack chat --json` gives them):
  loops            some run of n tokens (n = 1..8) repeats 4 or more times back to back
                   ("1.1.1.1."), or some 8-token sequence occurs 4 or more times anywhere
                   (a paragraph said again and again);
  switches language  a line of the reply has at least 3 function words of French, Spanish,
                   German, Italian or Portuguese and more of them than English ones, or any
                   letter outside the Latin script (the prompts are English, so a reply should be);
  stops            the reply ended with <|im_end|> before --max-tokens.
"""
import argparse, json, os, re, subprocess, sys, tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = os.path.join(ROOT, "Tests/Fixtures/chat/everyday-prompts.txt")

CONFIGS = [
    ("greedy (the old default)", ["--temperature", "0"]),
    ("temperature 0.7 alone", ["--temperature", "0.7", "--top-k", "0", "--top-p", "1", "--min-p", "0", "--repeat-penalty", "1",
                               "--dry-multiplier", "0"]),
    ("llama.cpp defaults", ["--temperature", "0.8", "--top-k", "40", "--top-p", "0.95", "--min-p", "0.05", "--repeat-penalty", "1",
                            "--dry-multiplier", "0"]),
    ("SmolLM2 card alone (t 0.2, top-p 0.9)", ["--repeat-penalty", "1", "--dry-multiplier", "0"]),
    ("card + repeat-penalty 1.1", ["--dry-multiplier", "0"]),
    ("new default (card + repeat-penalty 1.1 + DRY 0.8)", []),
]

STOPWORDS = {
    "english": "the and is are of to in that it for with you this on be as your can".split(),
    "french": "le la les et est des une du que qui pour dans pas vous sur avec ce sont".split(),
    "spanish": "el los las es una del que por con para como pero sus muy está son".split(),
    "german": "der die das und ist nicht ein eine zu mit den sich auf für ich sie".split(),
    "italian": "il lo gli della che è per una con non sono come questo anche".split(),
    "portuguese": "o os um uma não que para com por mais como são está você".split(),
}


def loops(ids):
    n = len(ids)
    for size in range(1, 9):
        for start in range(0, n - 4 * size + 1):
            unit = ids[start:start + size]
            if all(ids[start + k * size:start + (k + 1) * size] == unit for k in range(1, 4)):
                return True
    seen = {}
    for i in range(0, n - 7):
        key = tuple(ids[i:i + 8])
        seen[key] = seen.get(key, 0) + 1
        if seen[key] >= 4:
            return True
    return False


def switches_language(text):
    if re.search(r"[\u0370-\u03ff\u0400-\u04ff\u0590-\u06ff\u0900-\u097f\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]", text):
        return True
    for line in text.splitlines():
        words = re.findall(r"[a-zA-ZÀ-ÿ]+", line.lower())
        english = sum(w in STOPWORDS["english"] for w in words)
        for lang, stop in STOPWORDS.items():
            if lang == "english":
                continue
            # Words shared with English (a, in, ...) are not in these lists; "o", "il" etc. are rare in English.
            foreign = sum(w in stop for w in words)
            if foreign >= 3 and foreign > english:
                return True
    return False


def run(kvpack, prompt, args, max_tokens, directory):
    path = os.path.join(directory, "chat.kvpack")
    if os.path.exists(path):
        os.unlink(path)
    out = subprocess.run([kvpack, "chat", "--save", path, "--message", prompt, "--max-tokens", str(max_tokens),
                          "--no-fsync", "--json"] + args, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"kvpack chat failed ({out.returncode}) on {prompt!r}: {out.stderr[-2000:]}")
    turn = json.loads(out.stdout)["turns"][0]
    return turn, json.loads(out.stdout)["sampling"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kvpack", default=os.path.join(ROOT, ".build/release/kvpack"))
    ap.add_argument("--max-tokens", type=int, default=512, help="kvpack chat's default")
    ap.add_argument("--seeds", default="1,2,3", help="seeds each sampled setting runs with")
    ap.add_argument("--config", action="append", default=[], help="NAME=ARGS (extra settings to compare, e.g. 't1=--temperature 1')")
    ap.add_argument("--only", action="append", default=[], help="run only the configs whose name starts with this")
    ap.add_argument("--json", help="write every reply here")
    args = ap.parse_args()
    prompts = [p.strip() for p in open(PROMPTS) if p.strip()]
    configs = CONFIGS + [(c.split("=", 1)[0], c.split("=", 1)[1].split()) for c in args.config]
    if args.only:
        configs = [c for c in configs if any(c[0].startswith(o) for o in args.only)]
    record = {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvpack-sampling-") as directory:
        for name, extra in configs:
            looped = switched = stopped = 0
            replies = []
            settings = None
            greedy = extra[:2] == ["--temperature", "0"]
            seeds = [None] if greedy else [int(x) for x in args.seeds.split(",")]
            for i, (prompt, seed) in enumerate([(p, sd) for sd in seeds for p in prompts]):
                turn, settings = run(args.kvpack, prompt, extra + ([] if seed is None else ["--seed", str(seed)]), args.max_tokens, directory)
                l, s, e = loops(turn["replyTokens"]), switches_language(turn["reply"]), not turn["truncated"]
                looped += l
                switched += s
                stopped += e
                replies.append({"prompt": prompt, "seed": seed, "reply": turn["reply"], "tokens": len(turn["replyTokens"]),
                                "loops": l, "switchesLanguage": s, "stops": e})
                print(f"[{name}] {i + 1}/{len(prompts) * len(seeds)} loops={l} switch={s} stops={e} ({len(turn['replyTokens'])} tokens): {prompt}",
                      file=sys.stderr)
            n = len(replies)
            rows.append((name, " ".join(extra) or "(none)", looped / n, switched / n, stopped / n,
                         sum(r["tokens"] for r in replies) / n, n))
            record[name] = {"args": extra, "sampling": settings, "replies": replies}
    print(f"| settings | options | replies | loop | switch language | stop by itself | mean reply tokens |")
    print(f"|---|---|---|---|---|---|---|")
    for name, extra, l, s, e, mean, n in rows:
        print(f"| {name} | `{extra}` | {n} | {l:.0%} | {s:.0%} | {e:.0%} | {mean:.0f} |")
    print(f"\n{len(prompts)} prompts from Tests/Fixtures/chat/everyday-prompts.txt, --max-tokens {args.max_tokens}, seeds {args.seeds}"
          f" (greedy: once), SmolLM2-135M-Instruct Q4_1.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
