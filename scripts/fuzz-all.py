#!/usr/bin/env python3
"""make fuzz-all: runs every fuzz target in turn for --seconds each, merges what each found into
its minimised corpus under Fuzz/corpus/<target> (committed: its smallest inputs, up to 512 KiB;
the whole merged corpus stays in fuzz-out/<target>-corpus), and adds a row per target to
FUZZING.md (date, command, seconds, executions, executions per second, coverage, corpus,
crashes).

A target that crashes stops early (libFuzzer stops at the first crash); its input is kept as
fuzz-out/<target>-crash-*, the row says so, the other targets still run, and the exit status is 1.
Reproduce a crash with `Fuzz/<binary> fuzz-out/<target>-crash-...`.
"""
import argparse
import datetime
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

# name: (binary, -max_len, dictionary or None, seed directories); `make fuzz-<name>` runs one alone.
TARGETS = {
    "parser": ("Fuzz/kvpack-parser-fuzz", 65536, "Fuzz/kvpack.dict", ["corpus"]),
    "decode": ("Fuzz/kvpack-decode-fuzz", 65536, "Fuzz/kvpack.dict", ["corpus"]),
    "generated": ("Fuzz/kvpack-generated-fuzz", 4096, None, ["Fuzz/gen-seeds"]),
    "tensors": ("Fuzz/tensors-fuzz", 16384, None, ["Fuzz/tensors-seeds"]),
    "gguf": ("Fuzz/gguf-fuzz", 131072, "Fuzz/gguf.dict", ["Fuzz/gguf-seeds"]),
    "llama-cpp": ("Fuzz/llama-cpp-fuzz", 65536, "Fuzz/llama-cpp.dict", ["corpus/llama.cpp"]),
}
# What each target exercises, for the table.
WHAT = {
    "parser": "kvpack reader: open, index chain, segment tables, tail, tokens, selection, notes",
    "decode": "kvpack reader: validate, decode, attention (+ attention vs decode)",
    "generated": "kvpack writer + reader on generated files of every scheme (+ attention vs decode)",
    "tensors": "safetensors / .npy parse, cache view, import",
    "gguf": "GGUF model reader, tokenizer, one forward pass",
    "llama-cpp": "llama.cpp state files: parse, fit, decode every row",
}
MARKER = "<!-- fuzz-all rows: scripts/fuzz-all.py adds one per target below this line -->"


def run(cmd, **kw):
    return subprocess.run(cmd, cwd=ROOT, **kw)


def corpus_size(directory):
    files = [os.path.join(directory, f) for f in os.listdir(directory)] if os.path.isdir(directory) else []
    return len(files), sum(os.path.getsize(f) for f in files)


def fuzz(name, seconds, log):
    binary, max_len, dictionary, seeds = TARGETS[name]
    built = run(["make", "--no-print-directory", binary], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if built.returncode != 0:
        print(built.stdout[-3000:], file=sys.stderr)
        raise SystemExit(f"fuzz-all: building {binary} failed")
    work = os.path.join(ROOT, "fuzz-out", f"{name}-corpus")
    kept = os.path.join(ROOT, "Fuzz", "corpus", name)
    os.makedirs(work, exist_ok=True)
    os.makedirs(kept, exist_ok=True)
    before = set(os.listdir(os.path.join(ROOT, "fuzz-out")))
    args = [binary, f"-max_total_time={seconds}", f"-max_len={max_len}", "-rss_limit_mb=2048", "-print_final_stats=1",
            f"-artifact_prefix=fuzz-out/{name}-"]
    if dictionary:
        args.append(f"-dict={dictionary}")
    args += [os.path.relpath(work, ROOT), os.path.relpath(kept, ROOT)] + seeds
    print(f"fuzz-all: {name}: {' '.join(args)}", flush=True)
    start = time.time()
    with open(log, "w") as out:
        status = run(args, stdout=out, stderr=subprocess.STDOUT).returncode
    elapsed = time.time() - start
    text = open(log, errors="replace").read()
    execs = int(m.group(1)) if (m := re.search(r"stat::number_of_executed_units:\s*(\d+)", text)) else 0
    rate = int(m.group(1)) if (m := re.search(r"stat::average_exec_per_sec:\s*(\d+)", text)) else 0
    cov = re.findall(r"cov: (\d+) ft: (\d+)", text)
    edges, features = (int(cov[-1][0]), int(cov[-1][1])) if cov else (0, 0)
    artifacts = sorted(f for f in set(os.listdir(os.path.join(ROOT, "fuzz-out"))) - before
                       if f.startswith(f"{name}-") and re.match(r".*-(crash|leak|timeout|oom|slow-unit)-", f))
    crashes = [a for a in artifacts if "slow-unit" not in a]
    if status != 0 and not crashes:
        crashes = [f"exit status {status}, see {os.path.relpath(log, ROOT)}"]

    # Merge: the kept corpus becomes the minimal set of inputs covering everything seen so far.
    merged = kept + ".merging"
    shutil.rmtree(merged, ignore_errors=True)
    os.makedirs(merged)
    m = run([binary, "-merge=1", f"-max_len={max_len}", "-rss_limit_mb=2048", os.path.relpath(merged, ROOT),
             os.path.relpath(kept, ROOT), os.path.relpath(work, ROOT)] + seeds,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if m.returncode == 0:
        # Seed files are committed elsewhere: the kept corpus holds only what fuzzing added
        # (merge names its files by the SHA-1 of their contents).
        for d in seeds:
            for root, _, files in os.walk(os.path.join(ROOT, d)):
                for f in files:
                    digest = hashlib.sha1(open(os.path.join(root, f), "rb").read()).hexdigest()
                    if os.path.exists(os.path.join(merged, digest)):
                        os.remove(os.path.join(merged, digest))
        shutil.rmtree(kept)
        os.rename(merged, kept)
    else:
        shutil.rmtree(merged, ignore_errors=True)
        print(f"fuzz-all: {name}: merge failed (status {m.returncode}); {kept} unchanged", file=sys.stderr)
    units, size = corpus_size(kept)
    trim(kept, CORPUS_BUDGET)
    committed, committed_bytes = corpus_size(kept)
    return dict(name=name, seconds=elapsed, execs=execs, rate=rate, edges=edges, features=features,
                units=units, bytes=size, committed=committed, committed_bytes=committed_bytes, crashes=crashes)


# The committed corpus of a target: at most this many bytes, the smallest inputs first (the whole
# merged corpus stays in fuzz-out/<target>-corpus, which libFuzzer keeps adding to).
CORPUS_BUDGET = 512 * 1024


def trim(directory, budget):
    files = sorted((os.path.getsize(os.path.join(directory, f)), f) for f in os.listdir(directory))
    total = 0
    for size, name in files:
        total += size
        if total > budget:
            os.remove(os.path.join(directory, name))


def add_rows(rows, seconds):
    path = os.path.join(ROOT, "FUZZING.md")
    text = open(path).read()
    if MARKER not in text:
        raise SystemExit(f"fuzz-all: FUZZING.md has no line {MARKER!r}; rows not added")
    date = datetime.date.today().isoformat()
    lines = []
    for r in rows:
        crash = "0" if not r["crashes"] else f"**{len(r['crashes'])}**: " + ", ".join(r["crashes"])
        lines.append(f"| {date} | {r['name']} | `make fuzz-all FUZZ_SECONDS={seconds}` | {r['seconds']:.0f} s | {r['execs']:,} | "
                     f"{r['rate']:,} | {r['edges']:,} edges, {r['features']:,} features | {r['units']:,} units, "
                     f"{r['bytes'] / 1024:,.0f} KiB; {r['committed']:,} committed, {r['committed_bytes'] / 1024:,.0f} KiB | {crash} |")
    text = text.replace(MARKER, MARKER + "\n" + "\n".join(lines), 1)
    open(path, "w").write(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=60, help="seconds per target (default 60)")
    ap.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, of {', '.join(TARGETS)}")
    ap.add_argument("--no-table", action="store_true", help="do not add rows to FUZZING.md")
    ap.add_argument("--trim-only", action="store_true", help=f"only trim every Fuzz/corpus/<target> to {CORPUS_BUDGET // 1024} KiB")
    a = ap.parse_args()
    if a.trim_only:
        for name in TARGETS:
            directory = os.path.join(ROOT, "Fuzz", "corpus", name)
            if os.path.isdir(directory):
                trim(directory, CORPUS_BUDGET)
                print(f"fuzz-all: Fuzz/corpus/{name}: {corpus_size(directory)[0]} units, {corpus_size(directory)[1] // 1024} KiB")
        return 0
    names = [t for t in a.targets.split(",") if t]
    unknown = [t for t in names if t not in TARGETS]
    if unknown:
        raise SystemExit(f"fuzz-all: unknown targets {unknown}; known: {', '.join(TARGETS)}")
    os.makedirs(os.path.join(ROOT, "fuzz-out"), exist_ok=True)
    rows = []
    for name in names:
        r = fuzz(name, a.seconds, os.path.join(ROOT, "fuzz-out", f"{name}.log"))
        rows.append(r)
        print(f"fuzz-all: {name}: {r['execs']:,} executions in {r['seconds']:.0f} s ({r['rate']:,}/s), {r['edges']:,} edges, "
              f"corpus {r['units']:,} units ({r['bytes'] / 1024:,.0f} KiB; {r['committed']:,} committed), crashes: {len(r['crashes'])}", flush=True)
    if not a.no_table:
        add_rows(rows, a.seconds)
        print("fuzz-all: rows added to FUZZING.md")
    total = sum(r["execs"] for r in rows)
    print(f"fuzz-all: {total:,} executions over {len(rows)} targets; crashes: {sum(len(r['crashes']) for r in rows)}")
    return 1 if any(r["crashes"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
