#!/usr/bin/env python3
"""Differential check of the two readers: files the real writer produces from random recipes
(geometry, scheme, segment size, commit pattern, append batches, format version, metadata notes)
are read by the Swift reader (`kvpack export --format npy`, `kvpack info --json`) and by the
second reader written from the Spec alone (Spec/reader/spec_reader.py); token ids, positions,
every decoded value (bit for bit) and the file's metadata (manifest + notes) must agree; and
attention over the codes (`kvpack attend --check --exact`: each scheme's kernels in f32) must
agree with a dense softmax over the decoded rows (1e-4 of the output's magnitude) for a random
layer, KV head and token range, and the fast arithmetic (integer dot products) must give finite
outputs wherever the exact ones are. (Its accuracy is held to the schemes' own errors by the
tests, on real tensors; on random data it has no tight bound.) Any disagreement is a finding: the recipe is printed and the file kept.

    python3 scripts/differential.py [--files 200] [--seed 1] [--kvpack .build/release/kvpack] [--keep DIR]
"""
import argparse, json, os, random, shutil, subprocess, sys, tempfile, time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "Spec/reader"))
import spec_reader  # noqa: E402

SCHEMES = ["raw:f32", "raw:f16", "raw:bf16", "raw:f16:zstd", "raw:bf16:zstd=9", "int:k4v2", "int:k2v2:kc8", "int:k3v1:kc8:vc8",
           "int:k8v4:g8", "int:auto:3.0:kc8", "polar:r4a4+v:int:k4v2", "k:polar:r2a3:g4:half+v:polar:r8a8:adjacent", "svdq:2",
           "k:svdq:8-4-0-2:shared+v:svdq:1.25", "nsn:1", "nsn:2", "k:nsn:2:seed9+v:nsn:1", "k:int:k4v4:kc8+v:nsn:2",
           "raw:f32+v:raw:bf16:zstd=9", "raw:f16:planes", "raw:f32:zstd=5:planes", "int:k4v2:kc8+window:6+sinks:2",
           "nsn:1+sinks:1", "k:polar:r3a4:half+v:int:k4v2+window:11", "raw:bf16:planes+window:3+sinks:1",
           "int:k2.5v2:kc8", "int:k3.25v2.5:kc4:vc8+sinks:1"]
MODELS = [("stories260k", [1, 2, 5]), ("smollm2-135m", [1, 2]), ("llama-3-8b", [1])]


def recipe(rng):
    model, layer_choices = rng.choice(MODELS)
    return dict(model=model, layers=rng.choice(layer_choices), tokens=rng.choice([1, 2, 7, 31, 64, 65, 130, rng.randrange(1, 300)]),
                segment=rng.choice([1, 2, 3, 8, 16, 32, 64]), commit_every=rng.choice([0, 1, 3, 5, 16]),
                batch=rng.choice([1, 3, 7, 64]), scheme=rng.choice(SCHEMES), version=rng.choice([1, 2]),
                notes=rng.choice([[], ["a=1"], ["a=1", "b=2", "a=3"]]), seed=rng.randrange(1, 1 << 31))


def run(kvpack, args):
    out = subprocess.run([kvpack] + args, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"kvpack {' '.join(args[:2])} failed: {out.stderr[-800:]}")
    return out.stdout


def check(kvpack, r, work):
    path = os.path.join(work, "f.kvpack")
    npy = os.path.join(work, "npy")
    args = ["synth", path, "--model", r["model"], "--layers", str(r["layers"]), "--tokens", str(r["tokens"]),
            "--segment-tokens", str(r["segment"]), "--commit-every", str(r["commit_every"]), "--batch", str(r["batch"]),
            "--scheme", r["scheme"], "--format-version", str(r["version"]), "--seed", str(r["seed"]), "--overwrite"]
    for n in r["notes"]:
        args += ["--note", n]
    made = subprocess.run([kvpack] + args, capture_output=True, text=True)
    if made.returncode != 0:
        # A recipe the writer refuses with an error (a per-channel group that does not divide the
        # segment, a planner without enough tokens) is skipped; a crash is a finding.
        if made.returncode < 0 or "Error:" not in made.stderr:
            return [f"synth crashed ({made.returncode}): {made.stderr[-500:]}"]
        return None
    run(kvpack, ["export", path, npy, "--format", "npy", "--overwrite"])
    info = json.loads(run(kvpack, ["info", path, "--json"]))
    meta = json.load(open(os.path.join(npy, "meta.json")))
    m, state = spec_reader.load(path)
    problems = []
    if state["tokens"] != meta["tokens"] or list(state["ids"]) != meta["token_ids"] or list(state["positions"]) != meta["positions"]:
        problems.append("token ids or positions differ")
    swift_meta = {e["key"]: e["value"] for e in info["userMetadata"]}
    if state["metadata"] != swift_meta or state["note_errors"]:
        problems.append(f"metadata differs: python {state['metadata']} swift {swift_meta} {state['note_errors']}")
    kvh, d = m["kv_heads"], m["head_dim"]
    for layer in range(m["layers"]):
        for kind, prefix in ((0, "k"), (1, "v")):
            swift = np.load(os.path.join(npy, f"{prefix}_layer{layer:02d}.npy")).astype("<f4")
            for head in range(kvh):
                s = (layer * kvh + head) * 2 + kind
                py = state["streams"][s].astype("<f4").reshape(-1)
                sw = swift[head].reshape(-1) if swift.size else np.zeros(0, "<f4")
                if py.size != sw.size or not np.array_equal(py.view("<u4"), sw.view("<u4")):
                    problems.append(f"layer {layer} head {head} {'KV'[kind]} values differ")
    # The fast path against the exact one: attention over the codes (each scheme's kernels)
    # against a dense softmax over the decoded rows, for one random (layer, head, range).
    if state["tokens"] > 0:
        pick = random.Random(r["seed"])
        n = state["tokens"]
        a, b = sorted((pick.randrange(n), pick.randrange(n)))
        layer, head = pick.randrange(m["layers"]), pick.randrange(kvh)
        args = ["attend", path, "--layer", str(layer), "--head", str(head), "--tokens", f"{a}..<{b + 1}",
                "--query-seed", str(r["seed"]), "--json"]
        att = json.loads(run(kvpack, args + ["--check", "--exact"]))
        if not att["maxRelativeError"] < 1e-4:
            problems.append(f"attention over codes differs from attention over decoded rows by {att['maxRelativeError']} "
                            f"(layer {layer}, head {head}, tokens {a}..<{b + 1})")
        fast = json.loads(run(kvpack, args))
        exact_finite = all(np.isfinite(x) for row in att["output"] for x in row)
        if exact_finite and not all(np.isfinite(x) for row in fast["output"] for x in row):
            problems.append(f"fast attention is not finite where exact attention is (layer {layer}, head {head}, tokens {a}..<{b + 1})")
    return problems


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--kvpack", default=os.path.join(ROOT, ".build/release/kvpack"))
    ap.add_argument("--keep", default="differential-findings", help="where files that disagree are kept")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    findings = skipped = 0
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="kvpack-diff-") as work:
        for i in range(args.files):
            r = recipe(rng)
            problems = check(args.kvpack, r, work)
            if problems is None:
                skipped += 1
                continue
            if problems:
                findings += 1
                os.makedirs(args.keep, exist_ok=True)
                kept = os.path.join(args.keep, f"finding-{args.seed}-{i}.kvpack")
                shutil.copyfile(os.path.join(work, "f.kvpack"), kept)
                print(f"FINDING {i}: {json.dumps(r)}: {'; '.join(problems)} (file: {kept})")
            if (i + 1) % 50 == 0:
                print(f"{i + 1}/{args.files} files, {findings} disagreements, {time.time() - started:.0f} s", file=sys.stderr)
    print(f"differential: {args.files - skipped} generated files compared (seed {args.seed}; {skipped} recipes the writer refused "
          f"with an error were skipped), {findings} disagreements, {time.time() - started:.0f} s")
    sys.exit(1 if findings else 0)


if __name__ == "__main__":
    main()
