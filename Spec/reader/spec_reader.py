#!/usr/bin/env python3
"""A second KVPack reader, written from Spec/kvpack-format.md alone (it shares no code with the
Swift library). Tests run it on the corpus and compare what it decodes with the Swift reader,
which checks that the Spec is enough to read the format.

Usage: spec_reader.py FILE        prints JSON: geometry, token ids, positions, and for every
                                  stream the decoded rows (f32 bit patterns as integers).
Needs: numpy, xxhash, zstandard (pip).
"""
import json
import math
import struct
import sys

import numpy as np
import xxhash
import zstandard

MAGIC = bytes([0x89, 0x4B, 0x56, 0x50, 0x0D, 0x0A, 0x1A, 0x0A])


class FormatError(Exception):
    pass


def u(fmt, b, off):
    return struct.unpack_from("<" + fmt, b, off)[0]


def round_up(x, a=64):
    return (x + a - 1) // a * a


class Frame:
    """Section 4.1: a verified frame header."""

    def __init__(self, data, off, limit, salt):
        if off % 64 or off < 64 or off + 64 > min(limit, len(data)):
            raise FormatError(f"frame at {off} out of bounds")
        h = data[off:off + 64]
        if xxhash.xxh3_64_intdigest(h[:56], seed=salt ^ off) != u("Q", h, 56):
            raise FormatError(f"header checksum at {off}")
        self.off = off
        self.tag = h[:4].decode("latin-1")
        self.flags = u("I", h, 4)
        self.stored = u("Q", h, 8)
        self.raw = u("Q", h, 16)
        self.checksum = u("Q", h, 24)
        self.fields = h[32:56]
        if self.flags & ~1:
            raise FormatError("unknown frame flags")
        if off + 64 + self.stored > min(limit, len(data)):
            raise FormatError("payload out of bounds")
        self.payload = data[off + 64:off + 64 + self.stored]
        if xxhash.xxh3_64_intdigest(self.payload) != self.checksum:
            raise FormatError(f"payload checksum at {off}")

    def f(self, fmt, at):  # a type field by its header offset (32..55)
        return u(fmt, self.fields, at - 32)

    @property
    def next(self):
        return self.off + 64 + round_up(self.stored)


def parse_manifest(p):
    """Section 6."""
    layers, qh, kvh, d, seg, flags = struct.unpack_from("<6I", p, 0)
    theta = u("d", p, 24)
    rope_layout = p[32]
    scheme_count = u("H", p, 34)
    pos = 64
    layer_schemes = []
    for _ in range(layers):
        layer_schemes.append(struct.unpack_from("<HH", p, pos))
        pos += 4
    schemes = []
    for _ in range(scheme_count):
        kind, residual, _r, plen, blobs = struct.unpack_from("<HBBHH", p, pos)
        pos += 8
        params = p[pos:pos + plen]
        pos += plen
        blob_ids = list(struct.unpack_from(f"<{blobs}I", p, pos))
        pos += 4 * blobs
        schemes.append(dict(kind=kind, residual=residual, params=params, blobs=blob_ids))
    n = u("H", p, pos)
    producer = p[pos + 2:pos + 2 + n].decode()
    pos += 2 + n
    metadata, pos = parse_metadata(p, pos + 4, u("I", p, pos))
    if pos != len(p):
        raise FormatError("manifest end")
    # Section 6.1: bit 0 KEYS_POST_ROPE, bit 1 LOSSLESS_TOKENS (6.3: windowTokens and
    # sinkTokens at offsets 56 and 60).
    if flags & ~3:
        raise FormatError("unknown manifest flags")
    window, sinks = (u("I", p, 56), u("I", p, 60)) if flags & 2 else (0, 0)
    if flags & 2 and (window > 65536 or sinks > seg or window + sinks == 0):
        raise FormatError("windowTokens / sinkTokens")
    return dict(layers=layers, query_heads=qh, kv_heads=kvh, head_dim=d, segment=seg, window=window, sinks=sinks,
                keys_post_rope=bool(flags & 1), theta=theta, rope_layout=rope_layout,
                layer_schemes=layer_schemes, schemes=schemes, producer=producer, metadata=metadata)


def parse_metadata(p, pos, count):
    """Section 6.2 item 4 (also the payload of a note frame, 10.4): count entries of
    u16 keyLength, key, u32 valueLength, value; keys unique. Returns (list of pairs, end)."""
    entries, seen = [], set()
    for _ in range(count):
        if pos + 2 > len(p):
            raise FormatError("metadata entry")
        k = u("H", p, pos)
        key = p[pos + 2:pos + 2 + k]
        pos += 2 + k
        if pos + 4 > len(p):
            raise FormatError("metadata entry")
        v = u("I", p, pos)
        value = p[pos + 4:pos + 4 + v]
        pos += 4 + v
        if len(key) != k or len(value) != v or key in seen:
            raise FormatError("metadata entry")
        seen.add(key)
        entries.append((key.decode(), value.decode()))
    return entries, pos


WIDTH = {1: 4, 2: 2, 3: 2}


def widen(raw, etype):
    """Section 5: f32 / f16 / bf16 little-endian to float32."""
    if etype == 1:
        return np.frombuffer(raw, dtype="<f4")
    if etype == 2:
        return np.frombuffer(raw, dtype="<f2").astype(np.float32)
    if etype == 3:
        return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    raise FormatError(f"element type {etype}")


def decode_int(payload, params, C, d, head=0):
    """Scheme 2 (int), section 7.2 of the Spec: codes, then f16 scales, then f16 offsets; with
    per-channel widths (flag bit 1), one such payload per width, narrowest first."""
    b, grouping, size = params[0], params[1], params[2] | params[3] << 8
    if params[4] & 2:
        widths = list(params[8 + head * d:8 + (head + 1) * d])
        out = np.zeros((C, d), np.float32)
        at = 0
        for w in sorted(set(widths)):
            channels = [c for c in range(d) if widths[c] == w]
            n = len(channels)
            if n % 8:
                raise FormatError("int channel widths")
            sub = C * n * w // 8 + 4 * (C // size) * n
            cols = decode_int(payload[at:at + sub], [w, 1, params[2], params[3], params[4] & 1, 0, 0, 0], C, n)
            out[:, channels] = cols.reshape(C, n)
            at += sub
        if at != len(payload):
            raise FormatError("int block size")
        return out.reshape(-1)
    groups = C * d // size
    code_bytes = C * d * b // 8
    if len(payload) != code_bytes + 4 * groups:
        raise FormatError("int block size")
    scales = np.frombuffer(payload[code_bytes:code_bytes + 2 * groups], dtype="<f2").astype(np.float32)
    offsets = np.frombuffer(payload[code_bytes + 2 * groups:], dtype="<f2").astype(np.float32)
    row_bytes = d * b // 8
    out = np.zeros((C, d), np.float32)
    for t in range(C):
        row = int.from_bytes(payload[t * row_bytes:(t + 1) * row_bytes], "little")
        for c in range(d):
            code = (row >> (c * b)) & ((1 << b) - 1)
            g = t * (d // size) + c // size if grouping == 0 else (t // size) * d + c
            out[t, c] = np.float32(scales[g] * np.float32(code) + offsets[g])
    return out.reshape(-1)


def decode_polar(payload, params, C, d, rope_layout):
    """Scheme 3 (polar), section 7.2 of the Spec: angle codes, radius codes, f16 scales, offsets."""
    rb, ab, pairing = params[0], params[1], params[2]
    L = (params[4] | params[5] << 8) or C
    P, R = d // 2, C // L
    pad8 = lambda bits: (bits + 63) // 64 * 8
    A, B = pad8(C * P * ab), pad8(C * P * rb)
    if len(payload) != A + B + 4 * R * P:
        raise FormatError("polar block size")
    angles = int.from_bytes(payload[:A], "little")
    radii = int.from_bytes(payload[A:A + B], "little")
    scales = np.frombuffer(payload[A + B:A + B + 2 * R * P], dtype="<f2").astype(np.float32)
    offsets = np.frombuffer(payload[A + B + 2 * R * P:], dtype="<f2").astype(np.float32)
    half = pairing == 1 or (pairing == 255 and rope_layout == 2)
    table = [(np.float32(math.cos(2 * math.pi * a / (1 << ab))), np.float32(math.sin(2 * math.pi * a / (1 << ab))))
             for a in range(1 << ab)]
    out = np.zeros((C, d), np.float32)
    for t in range(C):
        for j in range(P):
            i = t * P + j
            a = (angles >> (i * ab)) & ((1 << ab) - 1)
            rc = (radii >> (i * rb)) & ((1 << rb) - 1)
            g = (t // L) * P + j
            rhat = np.float32(scales[g] * np.float32(rc) + offsets[g])
            x, y = (j, j + d // 2) if half else (2 * j, 2 * j + 1)
            out[t, x] = np.float32(rhat * table[a][0])
            out[t, y] = np.float32(rhat * table[a][1])
    return out.reshape(-1)


def decode_svdq(payload, params, C, d, basis):
    """Scheme 4 (svdq), section 7.2 of the Spec: ranges, then one code stream per stored channel."""
    rank = params[0] | params[1] << 8
    widths = list(params[4:4 + rank])
    scales = np.frombuffer(payload[:2 * rank], dtype="<f2").astype(np.float32)
    offsets = np.frombuffer(payload[2 * rank:4 * rank], dtype="<f2").astype(np.float32)
    pad8 = lambda bits: (bits + 63) // 64 * 8
    out = np.zeros((C, d), np.float32)
    at = 4 * rank
    for c, w in enumerate(widths):
        if w == 0:
            continue
        size = pad8(C * w)
        if w == 16:
            z = np.frombuffer(payload[at:at + 2 * C], dtype="<f2").astype(np.float32)
        else:
            bits = int.from_bytes(payload[at:at + size], "little")
            codes = np.array([(bits >> (t * w)) & ((1 << w) - 1) for t in range(C)], np.float32)
            z = (scales[c] * codes).astype(np.float32) + offsets[c]
        # f32 products then f32 sums, channel by channel (no fused multiply-add).
        out = out + (z[:, None] * basis[c][None, :]).astype(np.float32)
        at += size
    if at != len(payload):
        raise FormatError("svdq block size")
    return out.reshape(-1)


def splitmix64(seed):
    state = seed
    while True:
        state = (state + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        yield z ^ (z >> 31)


def hadamard(x):
    """Section 7.2, scheme 5: block-diagonal, power-of-two pieces largest first, f32 butterflies."""
    d, a = len(x), 0
    while a < d:
        m = 1
        while m * 2 <= d - a:
            m *= 2
        h = 1
        while h < m:
            for i in range(0, m, 2 * h):
                for j in range(i, i + h):
                    p, q = x[a + j], x[a + j + h]
                    x[a + j], x[a + j + h] = np.float32(p + q), np.float32(p - q)
            h *= 2
        norm = np.float32(1) / np.sqrt(np.float32(m))
        for j in range(m):
            x[a + j] = np.float32(x[a + j] * norm)
        a += m


def decode_nsn(payload, params, C, d, codebook):
    """Scheme 5 (nsn): norms, mean, codes; rotate back; rescale."""
    bits = params[0]
    seed = int.from_bytes(bytes(params[8:16]), "little")
    gen = splitmix64(seed)
    signs = [np.float32(-1 if next(gen) >> 63 else 1) for _ in range(d)]
    P = d // 8
    if len(payload) != 4 * C + 2 * d + C * P * bits:
        raise FormatError("nsn block size")
    n1 = np.frombuffer(payload[:2 * C], dtype="<f2").astype(np.float32)
    n2 = np.frombuffer(payload[2 * C:4 * C], dtype="<f2").astype(np.float32)
    mu = np.frombuffer(payload[4 * C:4 * C + 2 * d], dtype="<f2").astype(np.float32)
    codes = payload[4 * C + 2 * d:]
    inv_root = np.float32(1) / np.sqrt(np.float32(d))
    out = np.zeros((C, d), np.float32)
    for t in range(C):
        y = []
        for s in range(P):
            if bits == 1:
                y += list(codebook[codes[t * P + s]])
            else:
                sign_byte, m = codes[(t * P + s) * 2], codes[(t * P + s) * 2 + 1]
                y += [np.float32(-v) if sign_byte >> j & 1 else v for j, v in enumerate(codebook[m])]
        y = [np.float32(v) for v in y]
        hadamard(y)
        for i in range(d):
            v = np.float32(y[i] * signs[i])
            out[t, i] = np.float32(n1[t] * np.float32(np.float32(n2[t] * np.float32(v * inv_root)) + mu[i]))
    return out.reshape(-1)


def load(path):
    data = open(path, "rb").read()
    if len(data) < 64:
        raise FormatError("shorter than the 64-byte header")
    if data[:8] != MAGIC:
        raise FormatError("bad magic")
    major = u("H", data, 8)
    if major not in (1, 2):
        raise FormatError(f"major {major}")
    if xxhash.xxh3_64_intdigest(data[:56]) != u("Q", data, 56):
        raise FormatError("header checksum")
    salt = u("Q", data, 24)
    mani = Frame(data, 64, len(data), salt)
    if mani.tag != "MANI":
        raise FormatError("first frame is not MANI")
    m = parse_manifest(mani.payload)
    streams = m["layers"] * m["kv_heads"] * 2
    d, C = m["head_dim"], m["segment"]

    # Section 13.2: newest commit whose state loads, scanning back on the 64-byte grid.
    p = (len(data) - 64) // 64 * 64
    while p >= mani.next:
        if data[p:p + 4] == b"CMIT":
            try:
                return m, load_commit(data, salt, m, Frame(data, p, len(data), salt), streams, d, C, mani.next, major)
            except FormatError:
                pass
        p -= 64
    raise FormatError("no valid commit")


def join_planes(payload, C, d, w):
    """Section 7.2, scheme 1, codec 2: w concatenated zstd frames, frame p holding byte p of every
    element, channel-major; returns the token-major block bytes."""
    n = C * d
    planes = []
    rest = bytes(payload)
    for p in range(w):
        obj = zstandard.ZstdDecompressor().decompressobj()
        plane = obj.decompress(rest)
        if len(plane) != n or (p < w - 1) != bool(obj.unused_data):
            raise FormatError("byte plane frames")
        planes.append(np.frombuffer(plane, np.uint8).reshape(d, C).T)  # [t, c]
        rest = obj.unused_data
    return np.stack(planes, axis=-1).reshape(-1).tobytes()  # element (t, c), byte p


def load_commit(data, salt, m, cmit, streams, d, C, manifest_end, major):
    index_off = cmit.f("Q", 32)
    n = cmit.f("I", 40)
    chain = []
    off, limit = index_off, cmit.off
    while True:  # section 10 / 13.1: walk to the FULL frame
        fr = Frame(data, off, limit, salt)
        if fr.tag != "INDX":
            raise FormatError("not an index")
        chain.append(fr)
        if fr.f("I", 52) & 1:
            break
        prev = fr.f("Q", 32)
        if not (manifest_end <= prev < off):
            raise FormatError("bad chain")
        limit, off = off, prev
    ids, positions, blocks, blobs = [0] * n, [0] * n, {}, {}
    selection = None
    sink_frame = None
    notes, note_errors = [], []
    # Sealed segments (13.1; with a lossless window W, 6.3, they seal W tokens late).
    sealed = max(n - m["window"], 0) // C
    # Version 1 frames tile the tokens [0, n); version 2 frames tile the sealed segments.
    end = n if major == 1 else sealed
    for fr in chain:
        b, l, t, e = struct.unpack_from("<4I", fr.payload, 0)
        if 16 + 16 * (b + l + e) + 8 * t != fr.stored or (major == 2 and t != 0):
            raise FormatError("index size")
        first = fr.f("I", 48)
        if first + (t if major == 1 else b) != end:
            raise FormatError("token tiling" if major == 1 else "segment tiling")
        end = first
        pos = 16
        for i in range(b):
            fo, seg, st = struct.unpack_from("<QII", fr.payload, pos)
            pos += 16
            if major == 1:
                blocks[(seg, st)] = fo
                continue
            # Section 8.1: a segment table, its block offsets and tokens.
            if seg != first + i:
                raise FormatError("segment entry order")
            tf = Frame(data, fo, fr.off, salt)
            if (tf.tag != "SEGT" or tf.flags or tf.f("I", 32) != seg or tf.f("I", 36) != streams
                    or tf.f("I", 40) != C or tf.stored != 8 * streams + 8 * C):
                raise FormatError("segment table")
            for st in range(streams):
                bo = u("Q", tf.payload, 8 * st)
                if bo % 64 or bo < manifest_end or bo + 64 > tf.off:
                    raise FormatError("segment table block offset")
                blocks[(seg, st)] = bo
            ids[seg * C:(seg + 1) * C] = struct.unpack_from(f"<{C}I", tf.payload, 8 * streams)
            positions[seg * C:(seg + 1) * C] = struct.unpack_from(f"<{C}I", tf.payload, 8 * streams + 4 * C)
        for _ in range(l):  # section 7.3: BLOB frames, elements row-major
            fo, blob_id = struct.unpack_from("<QI", fr.payload, pos)
            bf = Frame(data, fo, cmit.off, salt)
            if bf.tag != "BLOB" or bf.f("I", 32) != blob_id:
                raise FormatError("blob")
            etype, rank = bf.fields[38 - 32], bf.fields[39 - 32]
            shape = [bf.f("I", 40 + 4 * i) for i in range(rank)]
            blobs[blob_id] = widen(bf.payload, etype).reshape(shape)
            pos += 16
        ids[first:first + t] = struct.unpack_from(f"<{t}I", fr.payload, pos)
        positions[first:first + t] = struct.unpack_from(f"<{t}I", fr.payload, pos + 4 * t)
        pos += 8 * t
        for _ in range(e):  # section 10.1: extension entries; 10.3 and 10.4: the ancillary kinds we know
            fo, tag = struct.unpack_from("<Q4s", fr.payload, pos)
            pos += 16
            if tag == b"tsel":
                if selection is not None:
                    raise FormatError("two tsel frames")
                selection = parse_tsel(Frame(data, fo, cmit.off, salt), n)
            elif tag == b"note":
                if fo in (o for o, _ in notes) or fo >= fr.off:
                    raise FormatError("note reference")
                try:  # section 13.1 rule 6: a damaged note is an error of the note, not of the commit
                    notes.append((fo, parse_note(Frame(data, fo, cmit.off, salt))))
                except FormatError as e:
                    note_errors.append(f"note at {fo}: {e}")
            elif tag == b"SINK":  # section 6.3: the sink rows, laid out as a tail run
                if sink_frame is not None or fo >= fr.off:
                    raise FormatError("SINK reference")
                sink_frame = Frame(data, fo, cmit.off, salt)
            elif not (tag[0] & 0x20):
                raise FormatError(f"unknown critical frame {tag!r}")
    if end != 0 or len(blocks) != sealed * streams:
        raise FormatError("index incomplete")
    K = m["sinks"]
    if (sink_frame is not None) != (K > 0 and sealed > 0):
        raise FormatError("SINK listed or missing")
    if sink_frame is not None and (sink_frame.tag != "SINK" or sink_frame.f("I", 32) != 0 or sink_frame.f("I", 36) != K
                                   or sink_frame.f("I", 48) != streams):
        raise FormatError("SINK frame")

    def run_rows(fr, s):
        """Rows of stream s in a tail run (or SINK frame): sections in stream order, each padded to 64."""
        count = fr.f("I", 36)
        pos = 0 if major == 1 else round_up(8 * count)
        for s2 in range(s):
            pos += round_up(count * d * WIDTH[stream_scheme(s2)["residual"]])
        size = count * d * WIDTH[stream_scheme(s)["residual"]]
        return widen(fr.payload[pos:pos + size], stream_scheme(s)["residual"])

    def stream_scheme(s):
        layer, kind = s // (2 * m["kv_heads"]), s % 2
        return m["schemes"][m["layer_schemes"][layer][kind]]

    # Section 9: tail runs from the newest index frame's tailOffset back to S.
    S = sealed * C
    runs = []
    toff, tend, tlimit = chain[0].f("Q", 40), n, chain[0].off
    while tend > S:
        fr = Frame(data, toff, tlimit, salt)
        start, count = fr.f("I", 32), fr.f("I", 36)
        if fr.tag != "DLTA" or start + count != tend or start < S:
            raise FormatError("tail")
        runs.insert(0, fr)
        if major == 2:  # section 9: version 2 runs start with their token ids and positions
            ids[start:start + count] = struct.unpack_from(f"<{count}I", fr.payload, 0)
            positions[start:start + count] = struct.unpack_from(f"<{count}I", fr.payload, 4 * count)
        tend, tlimit, toff = start, fr.off, fr.f("Q", 40)

    out = {}
    dctx = zstandard.ZstdDecompressor()
    for s in range(streams):
        sch = stream_scheme(s)
        if sch["kind"] not in (1, 2, 3, 4, 5):
            raise FormatError(f"scheme kind {sch['kind']} not implemented here")
        rows = []
        for seg in range(sealed):
            fr = Frame(data, blocks[(seg, s)], cmit.off, salt)
            if fr.tag != "BLCK" or fr.f("I", 32) != s or fr.f("I", 36) != seg:
                raise FormatError("block")
            payload = fr.payload
            if fr.flags & 1 and sch["kind"] == 1 and sch["params"][1] == 2:
                payload = join_planes(payload, C, d, WIDTH[sch["params"][0]])
            elif fr.flags & 1:
                payload = dctx.decompress(payload, max_output_size=fr.raw)
            if sch["kind"] == 1:
                etype = sch["params"][0]
                if len(payload) != C * d * WIDTH[etype]:
                    raise FormatError("block size")
                rows.append(widen(payload, etype))
            elif sch["kind"] == 2:
                rows.append(decode_int(payload, sch["params"], C, d, (s // 2) % m["kv_heads"]))
            elif sch["kind"] == 3:
                rows.append(decode_polar(payload, sch["params"], C, d, m["rope_layout"]))
            elif sch["kind"] == 5:
                book = blobs[sch["blobs"][0]]
                if xxhash.xxh3_64_intdigest(book.astype("<f4").tobytes()) != int.from_bytes(bytes(sch["params"][16:24]), "little"):
                    raise FormatError("nsn codebook hash")
                rows.append(decode_nsn(payload, sch["params"], C, d, book))
            else:
                basis = blobs[sch["blobs"][0]]
                head = (s // 2) % m["kv_heads"]
                rows.append(decode_svdq(payload, sch["params"], C, d, basis[0 if basis.shape[0] == 1 else head]))
        for fr in runs:
            rows.append(run_rows(fr, s))
        out[s] = np.concatenate(rows) if rows else np.zeros(0, np.float32)
        if sink_frame is not None:  # section 6.3: tokens [0, K) from the SINK frame, not the blocks
            out[s] = out[s].copy()
            out[s][:K * d] = run_rows(sink_frame, s)
    # Section 10.4: the manifest's metadata, then the notes in file order; a later value wins.
    metadata = dict(m["metadata"])
    for _, entries in sorted(notes):
        metadata.update(entries)
    return dict(tokens=n, ids=list(ids), positions=list(positions), streams=out, selection=selection, metadata=metadata,
                note_errors=note_errors)


def parse_note(fr):
    # Section 10.4: entryCount at 32, a payload of exactly that many metadata entries.
    count = fr.f("I", 32)
    if fr.tag != "note" or fr.flags != 0 or not 1 <= count <= 1 << 16:
        raise FormatError("note frame")
    entries, end = parse_metadata(fr.payload, 0, count)
    if end != fr.stored:
        raise FormatError("note size")
    return entries


def parse_tsel(fr, n):
    # Section 10.3: type fields, then a payload of exactly 24 + 9k + S + kS bytes.
    if fr.tag != "tsel" or fr.flags != 0:
        raise FormatError("tsel frame")
    k, N, H = fr.f("I", 32), fr.f("I", 36), fr.f("I", 40)
    policy, anchor = fr.fields[44 - 32], fr.fields[45 - 32]
    S = (H + 7) // 8
    if k > n or k > N or H > 1 << 20 or policy not in (1, 2, 3) or anchor not in range(1, 6):
        raise FormatError("tsel fields")
    if fr.stored != 24 + 9 * k + S + k * S:
        raise FormatError("tsel size")
    p = fr.payload
    params = struct.unpack_from("<5I", p, 0)
    index = list(struct.unpack_from(f"<{k}I", p, 24))
    if any(b <= a for a, b in zip(index, index[1:])) or any(i >= N for i in index):
        raise FormatError("tsel sourceIndex")
    importance = list(struct.unpack_from(f"<{k}I", p, 24 + 4 * k))
    reasons = list(p[24 + 8 * k:24 + 9 * k])
    if any(r not in (1, 2, 3, 4) for r in reasons):
        raise FormatError("tsel reason")
    at = 24 + 9 * k
    return dict(kept=k, source_tokens=N, signature_bits=H, policy=policy, anchor=anchor, anchor_seed=fr.f("Q", 48),
                budget=params[0], representatives=params[1], recent=params[2], sink=params[3], window=params[4],
                source_index=index, importance_bits=importance, reasons=reasons,
                anchor_bits=list(p[at:at + S]), signatures=list(p[at + S:at + S + k * S]))


def main():
    m, state = load(sys.argv[1])
    print(json.dumps(dict(
        layers=m["layers"], kv_heads=m["kv_heads"], head_dim=m["head_dim"], producer=m["producer"],
        tokens=state["tokens"], ids=state["ids"], positions=state["positions"], selection=state["selection"],
        metadata=state["metadata"], note_errors=state["note_errors"],
        streams=[state["streams"][s].view(np.uint32).tolist() for s in sorted(state["streams"])])))


if __name__ == "__main__":
    try:
        main()
    except FormatError as e:
        print(json.dumps(dict(error=str(e))))
        sys.exit(1)
