#!/usr/bin/env python3
"""The layering check of Sources/KVPack (ARCHITECTURE.md), run by `make test`.

Rooms, top to bottom; each may use only the rooms below it (Schemes and Selection are siblings:
neither uses the other):

    Operations -> Writing -> Reading -> Schemes, Selection -> Kernels -> Internals -> Format

How it checks, with the compiler's own name resolution: for every room R, the files of R and of
the rooms below it are type-checked alone (`swiftc -typecheck`, one module, as the real build
compiles them). A reference from R to anything declared in a higher or sibling room does not
resolve there, so the type-check fails and the error names the file, line and symbol; the
check then says which room declares it. (One gap, inherent to name lookup: an upward reference
that a same-named overload in a lower room would also satisfy type-checks; the rules below and
review catch the rest.)

Rules the compiler cannot see, checked on the text:
  - system modules (Glibc, Darwin, Foundation, Dispatch, Synchronization) and the zstd binding
    are imported only in Internals; the xxhash binding only in Format (Checksum.swift);
  - raw allocations (`allocate(`, `deallocate(`, malloc/calloc/free) only in Internals;
  - frame-header type fields (`field64(` ... `field8(`, `FieldPacker`) are read and written only
    in Format, where each frame kind declares them once;
  - every Swift file of Sources/KVPack lies in a room.

    python3 scripts/check-layers.py              # check (exit 1 on any violation)
    python3 scripts/check-layers.py --self-test  # shows that a wrong-way reference fails
"""
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIB = "Sources/KVPack"
# Room -> the rooms it may use (everything below it, siblings excluded).
BELOW = {
    "Format": [],
    "Internals": ["Format"],
    "Kernels": ["Internals", "Format"],
    "Schemes": ["Kernels", "Internals", "Format"],
    "Selection": ["Kernels", "Internals", "Format"],
    "Reading": ["Schemes", "Selection", "Kernels", "Internals", "Format"],
    "Writing": ["Reading", "Schemes", "Selection", "Kernels", "Internals", "Format"],
    "Operations": ["Writing", "Reading", "Schemes", "Selection", "Kernels", "Internals", "Format"],
}
ORDER = ["Format", "Internals", "Kernels", "Schemes", "Selection", "Reading", "Writing", "Operations"]

SYSTEM_IMPORT = re.compile(r"^\s*import\s+(Glibc|Darwin|Foundation|Dispatch|Synchronization|CZstd)\b", re.M)
XXHASH_IMPORT = re.compile(r"^\s*import\s+CXXHash\b", re.M)
RAW_ALLOCATION = re.compile(r"\.allocate\(|\.deallocate\(|\b(malloc|calloc|realloc|free|posix_memalign)\(")
FRAME_FIELDS = re.compile(r"\bfield(64|32|16|8)\(|\bFieldPacker\b")
DECLARATION = r"^\s*(?:@\w+(?:\([^)]*\))?\s+)*(?:(?:public|package|internal|fileprivate|private|final|static|nonisolated(?:\(unsafe\))?|mutating|indirect)\s+)*(?:class|struct|enum|protocol|actor|typealias|func|var|let|case|extension)\s+{name}\b"


def rooms_of(lib):
    """Room -> its Swift files (paths relative to `lib`), and files outside any room."""
    rooms = {r: [] for r in ORDER}
    stray = []
    for dirpath, _, files in os.walk(lib):
        for f in sorted(files):
            if not f.endswith(".swift"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), lib)
            top = rel.split(os.sep)[0]
            (rooms[top] if top in rooms and os.sep in rel else stray).append(rel)
    return rooms, stray


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def text_rules(lib, rooms):
    problems = []
    for room, files in rooms.items():
        for rel in files:
            code = strip_comments(open(os.path.join(lib, rel), encoding="utf-8").read())
            def where(match):
                return f"{LIB}/{rel}:{code.count(chr(10), 0, match.start()) + 1}"
            if room != "Internals":
                for m in SYSTEM_IMPORT.finditer(code):
                    problems.append(f"{where(m)}: imports {m.group(1)}; only Internals makes system calls (add what you need there)")
                for m in RAW_ALLOCATION.finditer(code):
                    problems.append(f"{where(m)}: raw allocation `{m.group(0)}`; only Internals owns raw memory (use GrowableFloats, GrowableBytes or AlignedBuffer)")
            if rel != os.path.join("Format", "Checksum.swift"):
                for m in XXHASH_IMPORT.finditer(code):
                    problems.append(f"{where(m)}: imports CXXHash; checksums go through Format/Checksum.swift")
            if room != "Format":
                for m in FRAME_FIELDS.finditer(code):
                    problems.append(f"{where(m)}: reads or writes frame-header fields by offset (`{m.group(0)}`); use the frame kind's typed fields in Format/")
    return problems


def declared_in(lib, rooms, name):
    """The rooms whose files declare `name` (for the message)."""
    pattern = re.compile(DECLARATION.format(name=re.escape(name)), re.M)
    found = []
    for room, files in rooms.items():
        if any(pattern.search(open(os.path.join(lib, rel), encoding="utf-8").read()) for rel in files):
            found.append(room)
    return found


def typecheck(lib, rooms, room):
    """Type-checks `room` with the rooms below it; returns the compiler's errors as messages."""
    files = [os.path.join(lib, rel) for r in [room] + BELOW[room] for rel in rooms[r]]
    if not rooms[room]:
        return []
    # -wmo: one frontend job, so every error is reported (batch jobs stop at the first failing one).
    cmd = ["swiftc", "-typecheck", "-wmo", "-parse-as-library", "-module-name", "KVPack", "-suppress-warnings",
           "-I", os.path.join(ROOT, "Sources/CZstd"), "-I", os.path.join(ROOT, "Sources/CXXHash"),
           "-I", os.path.join(ROOT, "Sources/CKVKernels/include")] + files
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode == 0:
        return []
    problems = []
    error = re.compile(r"^(?P<file>/[^:]+\.swift):(?P<line>\d+):\d+: error: (?P<message>.*)$")
    for line in run.stderr.splitlines():
        m = error.match(line)
        if not m:
            continue
        rel = os.path.relpath(m["file"], lib)
        owner = rel.split(os.sep)[0]   # the room of the file that holds the reference
        message = m["message"]
        name = re.search(r"'([A-Za-z_][A-Za-z0-9_]*)'", message)
        allowed = [owner] + BELOW.get(owner, [])
        higher = [r for r in declared_in(lib, rooms, name.group(1)) if r not in allowed] if name else []
        note = f" (declared in {', '.join(higher)}; {owner} may use only {', '.join(BELOW.get(owner, [])) or 'nothing else in the library'})" if higher else ""
        problems.append(f"{LIB}/{rel}:{m['line']}: {owner}: {message}{note}")
    if not problems:
        problems.append(f"{room}: type-check with the rooms below failed:\n{run.stderr[-3000:]}")
    return problems


def check(lib):
    rooms, stray = rooms_of(lib)
    problems = [f"{LIB}/{s}: not in a room ({', '.join(ORDER)})" for s in stray]
    problems += text_rules(lib, rooms)
    # Operations with everything below it is the whole module: the real build checks it.
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(os.cpu_count() or 1, 1)) as pool:
        for result in pool.map(lambda r: typecheck(lib, rooms, r), ORDER[:-1]):
            problems += result
    return rooms, sorted(set(problems), key=problems.index)


def self_test():
    """A deliberately wrong-way reference (Format using the writer) must fail the check."""
    with tempfile.TemporaryDirectory() as tmp:
        lib = os.path.join(tmp, "KVPack")
        shutil.copytree(os.path.join(ROOT, LIB), lib)
        with open(os.path.join(lib, "Format", "FileHeader.swift"), "a") as f:
            f.write("\nfunc layeringProbe() -> Any.Type { KVPackWriter.self }\n")
        rooms, _ = rooms_of(lib)
        problems = typecheck(lib, rooms, "Format")
    caught = [p for p in problems if "KVPackWriter" in p and "Writing" in p]
    print("check-layers self-test: Format/FileHeader.swift given `KVPackWriter.self` (a reference to Writing):")
    for p in problems:
        print("  " + p.replace(tmp, "<copy>"))
    if not caught:
        print("check-layers self-test: FAILED, the wrong-way reference was not reported")
        return 1
    print("check-layers self-test: the wrong-way reference is reported, as it must be")
    return 0


def main():
    os.chdir(ROOT)
    if "--self-test" in sys.argv:
        return self_test()
    rooms, problems = check(os.path.join(ROOT, LIB))
    if problems:
        print(f"check-layers: {len(problems)} violation(s) of the room rule (ARCHITECTURE.md):")
        for p in problems:
            print("  " + p)
        return 1
    counts = ", ".join(f"{r} {len(rooms[r])}" for r in ORDER)
    print(f"check-layers: every reference points down ({counts} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
