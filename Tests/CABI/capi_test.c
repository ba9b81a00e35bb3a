// The C ABI (include/kvpack.h) as a C program uses it: write a file, read it back exactly, attend
// over it, convert and validate it; then every kind of bad input (missing file, foreign bytes,
// every truncation, every flipped byte of a small file, bad arguments) must give a status and a
// message, never a crash. Built and run by `make capi-test` (part of `make test`):
//   cc -I include Tests/CABI/capi_test.c -L DIR -lKVPackC -lxxhash -lm && ./a.out SCRATCH_DIR
#include "kvpack.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

static unsigned char *slurp(const char *path, long *size);

static int failures = 0;
#define CHECK(cond, ...)                                                   \
    do {                                                                   \
        if (!(cond)) {                                                     \
            failures++;                                                    \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                  \
            fprintf(stderr, "\n");                                         \
        }                                                                  \
    } while (0)

enum { LAYERS = 2, QHEADS = 4, KVHEADS = 2, DIM = 16, SEGMENT = 8, TOKENS = 21 };
#define PER_TOKEN (LAYERS * KVHEADS * DIM)

static float key_value(int kind, int l, int t, int h, int i) {
    return sinf(0.37f * (float)(t + 1) + 1.3f * (float)i + 0.7f * (float)h + 2.1f * (float)l + (kind ? 0.5f : 0.0f)) *
           (1.0f + 0.1f * (float)i);
}

static void write_file(const char *path, const char *scheme) {
    kvpack_create_options o;
    memset(&o, 0, sizeof o);
    o.geometry = (kvpack_geometry){.layers = LAYERS, .query_heads = QHEADS, .kv_heads = KVHEADS, .head_dim = DIM,
                                   .segment_tokens = SEGMENT, .rope_layout = KVPACK_ROPE_ROTATE_HALF,
                                   .rope_theta = 10000, .keys_post_rope = 1, .max_positions = 2048};
    o.scheme = scheme;
    o.producer = "capi_test";
    o.overwrite = 1;
    o.durability = KVPACK_DURABLE_FLUSH;
    const char *keys[] = {"origin"}, *values[] = {"capi_test.c"};
    o.metadata_keys = keys;
    o.metadata_values = values;
    o.metadata_count = 1;
    kvpack_writer *w = NULL;
    kvpack_error err;
    int32_t s = kvpack_create(path, &o, &w, &err);
    CHECK(s == KVPACK_OK && w != NULL, "create %s: %s", path, err.message);
    if (!w) return;
    // Layout [layers][kv_heads][tokens][dim], appended in two batches (13 + 8 tokens).
    static float k[LAYERS * KVHEADS * TOKENS * DIM], v[LAYERS * KVHEADS * TOKENS * DIM];
    for (int l = 0; l < LAYERS; l++)
        for (int h = 0; h < KVHEADS; h++)
            for (int t = 0; t < TOKENS; t++)
                for (int i = 0; i < DIM; i++) {
                    size_t at = (((size_t)l * KVHEADS + h) * TOKENS + t) * DIM + i;
                    k[at] = key_value(0, l, t, h, i);
                    v[at] = key_value(1, l, t, h, i);
                }
    uint32_t ids[TOKENS];
    for (int t = 0; t < TOKENS; t++) ids[t] = 100 + (uint32_t)t;
    const int64_t strides[3] = {KVHEADS * TOKENS * DIM, DIM, TOKENS * DIM};
    const uint64_t floats = sizeof k / sizeof k[0];
    s = kvpack_append(w, 13, ids, NULL, k, v, strides, floats, &err);
    CHECK(s == KVPACK_OK, "append: %s", err.message);
    s = kvpack_commit(w, &err);
    CHECK(s == KVPACK_OK, "commit: %s", err.message);
    // The second batch starts 13 tokens in: the same strides from an offset base.
    s = kvpack_append(w, 8, ids + 13, NULL, k + 13 * DIM, v + 13 * DIM, strides, floats - 13 * DIM, &err);
    CHECK(s == KVPACK_OK, "append 2: %s", err.message);
    CHECK(kvpack_writer_token_count(w) == TOKENS, "writer token count %llu", (unsigned long long)kvpack_writer_token_count(w));
    // Strides that reach past the buffer are refused, not followed.
    s = kvpack_append(w, 1, ids, NULL, k, v, strides, 10, &err);
    CHECK(s == KVPACK_E_INVALID_ARGUMENT && strstr(err.message, "address"), "short buffer: %d %s", s, err.message);
    const int64_t huge[3] = {INT64_MAX / 2, 1, 1};
    s = kvpack_append(w, 2, ids, NULL, k, v, huge, floats, &err);
    CHECK(s == KVPACK_E_INVALID_ARGUMENT, "overflowing strides: %d %s", s, err.message);
    s = kvpack_writer_close(w, &err);
    CHECK(s == KVPACK_OK, "close: %s", err.message);
}

// Exercises every read entry point on `path`; returns 0 when every call gave a status (the
// values are checked only when `exact`).
static void read_all(const char *path, int exact, int *opened) {
    kvpack_error err;
    kvpack_reader *r = NULL;
    int32_t s = kvpack_open(path, 0, &r, &err);
    *opened = s == KVPACK_OK;
    if (s != KVPACK_OK) {
        CHECK(r == NULL && err.code == s && err.message[0] != 0, "open failed without a message (status %d)", s);
        return;
    }
    kvpack_geometry g;
    s = kvpack_geometry_of(r, &g, &err);
    CHECK(s == KVPACK_OK, "geometry: %s", err.message);
    uint64_t n = kvpack_token_count(r);
    if (exact) {
        CHECK(g.layers == LAYERS && g.query_heads == QHEADS && g.kv_heads == KVHEADS && g.head_dim == DIM &&
                  g.segment_tokens == SEGMENT && g.rope_layout == KVPACK_ROPE_ROTATE_HALF && g.max_positions == 2048,
              "geometry %u %u %u %u %u", g.layers, g.query_heads, g.kv_heads, g.head_dim, g.segment_tokens);
        CHECK(n == TOKENS, "token count %llu", (unsigned long long)n);
    }
    if (n > 64 || g.layers > 4 || g.kv_heads > 4 || g.head_dim > 64 || g.query_heads > 16) {
        kvpack_close(r);
        return;  // a damaged geometry the good file never had: the open itself was the test
    }
    uint32_t ids[64], pos[64];
    s = kvpack_tokens(r, 0, KVPACK_ALL_TOKENS, ids, pos, &err);
    if (exact) CHECK(s == KVPACK_OK && ids[20] == 120 && pos[20] == 20, "tokens: %s", err.message);
    static float out[4 * 64 * 64];
    static uint16_t half[4 * 64 * 64];
    for (uint32_t l = 0; l < g.layers; l++)
        for (uint32_t kind = 0; kind < 2; kind++) {
            s = kvpack_decode(r, l, -1, kind, 0, KVPACK_ALL_TOKENS, KVPACK_F32, out, sizeof out, &err);
            if (exact) {
                CHECK(s == KVPACK_OK, "decode: %s", err.message);
                int bad = 0;
                for (uint32_t h = 0; h < g.kv_heads; h++)
                    for (uint64_t t = 0; t < n; t++)
                        for (int i = 0; i < DIM; i++)
                            bad += out[(h * n + t) * DIM + i] != key_value((int)kind, (int)l, (int)t, (int)h, i);
                CHECK(bad == 0, "layer %u kind %u: %d values differ", l, kind, bad);
            }
            s = kvpack_decode(r, l, 1, kind, 3, 5, KVPACK_F16, half, sizeof half, &err);
            if (exact) CHECK(s == KVPACK_OK, "decode f16: %s", err.message);
            for (uint64_t t = 0; t < n; t += 5) {
                kvpack_rows rows;
                s = kvpack_rows_at(r, l, 0, kind, t, &rows, &err);
                if (exact) {
                    CHECK(s == KVPACK_OK && rows.data != NULL && rows.dtype == KVPACK_F32 && rows.row_bytes == DIM * 4 &&
                              rows.token_start <= t && t < rows.token_start + rows.token_count,
                          "rows at %llu: %s", (unsigned long long)t, err.message);
                    if (rows.data) {
                        const float *row = (const float *)((const char *)rows.data + (t - rows.token_start) * rows.row_bytes);
                        CHECK(row[3] == key_value((int)kind, (int)l, (int)t, 0, 3), "mapped row %llu", (unsigned long long)t);
                    }
                }
            }
        }
    // Attention against a reference computed here from the known rows.
    float q[16 * 64], o[16 * 64];
    for (uint32_t i = 0; i < g.query_heads * g.head_dim; i++) q[i] = cosf(0.1f * (float)i);
    for (uint32_t threads = 1; threads <= 2; threads++) {
        s = kvpack_attend(r, 1, q, 0, KVPACK_ALL_TOKENS, 0, threads, o, &err);
        if (!exact) continue;
        CHECK(s == KVPACK_OK, "attend: %s", err.message);
        double worst = 0;
        for (int qh = 0; qh < QHEADS; qh++) {
            int h = qh / (QHEADS / KVHEADS);
            double w[TOKENS], m = -1e30, sum = 0;
            for (int t = 0; t < TOKENS; t++) {
                double dot = 0;
                for (int i = 0; i < DIM; i++) dot += q[qh * DIM + i] * key_value(0, 1, t, h, i);
                w[t] = dot / sqrt((double)DIM);
                if (w[t] > m) m = w[t];
            }
            for (int t = 0; t < TOKENS; t++) sum += (w[t] = exp(w[t] - m));
            for (int i = 0; i < DIM; i++) {
                double ref = 0;
                for (int t = 0; t < TOKENS; t++) ref += w[t] / sum * key_value(1, 1, t, h, i);
                double e = fabs(ref - o[qh * DIM + i]);
                if (e > worst) worst = e;
            }
        }
        CHECK(worst < 1e-4, "attention differs from the reference by %g", worst);
    }
    char json[1 << 16];
    size_t length = 0;
    s = kvpack_info_json(r, json, sizeof json, &length, &err);
    if (exact) CHECK(s == KVPACK_OK && strstr(json, "\"capi_test.c\"") && length == strlen(json), "info: %s", err.message);
    s = kvpack_info_json(r, json, 4, &length, &err);
    if (exact) CHECK(s == KVPACK_E_BUFFER_TOO_SMALL && length > 4, "small info buffer: %d", s);
    kvpack_close(r);
}

static void bad_arguments(const char *path) {
    kvpack_error err;
    kvpack_reader *r = NULL;
    CHECK(kvpack_open(NULL, 0, &r, &err) == KVPACK_E_INVALID_ARGUMENT, "NULL path");
    CHECK(kvpack_open(path, 0x80, &r, &err) == KVPACK_E_INVALID_ARGUMENT, "unknown flag");
    CHECK(kvpack_open(path, 0, &r, &err) == KVPACK_OK, "open: %s", err.message);
    float out[4096];
    CHECK(kvpack_decode(r, 2, -1, 0, 0, 1, KVPACK_F32, out, sizeof out, &err) == KVPACK_E_INVALID_ARGUMENT, "layer 2");
    CHECK(kvpack_decode(r, 0, 2, 0, 0, 1, KVPACK_F32, out, sizeof out, &err) == KVPACK_E_INVALID_ARGUMENT, "head 2");
    CHECK(kvpack_decode(r, 0, -2, 0, 0, 1, KVPACK_F32, out, sizeof out, &err) == KVPACK_E_INVALID_ARGUMENT, "head -2");
    CHECK(kvpack_decode(r, 0, 0, 2, 0, 1, KVPACK_F32, out, sizeof out, &err) == KVPACK_E_INVALID_ARGUMENT, "kind 2");
    CHECK(kvpack_decode(r, 0, 0, 0, 0, 1, 7, out, sizeof out, &err) == KVPACK_E_INVALID_ARGUMENT, "dtype 7");
    CHECK(kvpack_decode(r, 0, 0, 0, 20, 2, KVPACK_F32, out, sizeof out, &err) == KVPACK_E_INVALID_ARGUMENT, "past the end");
    CHECK(kvpack_decode(r, 0, 0, 0, UINT64_MAX - 1, 5, KVPACK_F32, out, sizeof out, &err) == KVPACK_E_INVALID_ARGUMENT, "wrapping range");
    CHECK(kvpack_decode(r, 0, -1, 0, 0, KVPACK_ALL_TOKENS, KVPACK_F32, out, 100, &err) == KVPACK_E_INVALID_ARGUMENT &&
              strstr(err.message, "bytes"), "short output: %s", err.message);
    CHECK(kvpack_decode(r, 0, 0, 0, 0, 1, KVPACK_F32, NULL, 1 << 20, &err) == KVPACK_E_INVALID_ARGUMENT, "NULL output");
    CHECK(kvpack_attend(r, 0, NULL, 0, KVPACK_ALL_TOKENS, 0, 1, out, &err) == KVPACK_E_INVALID_ARGUMENT, "NULL queries");
    CHECK(kvpack_attend(r, 0, out, 5, 0, 0, 1, out, &err) == KVPACK_E_INVALID_ARGUMENT, "empty range");
    CHECK(kvpack_attend(r, 0, out, 0, 1, NAN, 1, out, &err) == KVPACK_E_INVALID_ARGUMENT, "NaN scale");
    CHECK(kvpack_tokens(r, 30, 1, NULL, NULL, &err) == KVPACK_E_INVALID_ARGUMENT, "tokens past the end");
    CHECK(kvpack_geometry_of(NULL, NULL, &err) == KVPACK_E_INVALID_ARGUMENT, "NULL reader");
    CHECK(kvpack_token_count(NULL) == 0, "NULL reader count");
    kvpack_close(r);
    kvpack_close(NULL);
    CHECK(kvpack_writer_close(NULL, &err) == KVPACK_OK, "NULL writer close");
    // The file is held by one writer at a time.
    kvpack_writer *w = NULL, *w2 = NULL;
    CHECK(kvpack_resume(path, KVPACK_DURABLE_FLUSH, &w, &err) == KVPACK_OK, "resume: %s", err.message);
    CHECK(kvpack_resume(path, KVPACK_DURABLE_FLUSH, &w2, &err) == KVPACK_E_LOCKED && w2 == NULL, "second writer: %s", err.message);
    CHECK(kvpack_writer_close(w, &err) == KVPACK_OK, "close resumed: %s", err.message);
    kvpack_create_options o;
    memset(&o, 0, sizeof o);
    o.geometry = (kvpack_geometry){.layers = 1, .query_heads = 3, .kv_heads = 2, .head_dim = 8};
    CHECK(kvpack_create(path, &o, &w, &err) == KVPACK_E_INVALID_ARGUMENT && strstr(err.message, "multiple"), "3 q heads over 2: %s", err.message);
    o.geometry.query_heads = 2;
    o.scheme = "nosuch:1";
    CHECK(kvpack_create(path, &o, &w, &err) == KVPACK_E_INVALID_ARGUMENT, "unknown scheme");
    o.scheme = "raw:f16";
    CHECK(kvpack_create(path, &o, &w, &err) != KVPACK_OK, "existing file without overwrite");
    o.metadata_count = 2;
    o.overwrite = 1;
    CHECK(kvpack_create(path, &o, &w, &err) == KVPACK_E_INVALID_ARGUMENT, "metadata count without arrays");
    CHECK(kvpack_create(path, NULL, &w, &err) == KVPACK_E_INVALID_ARGUMENT, "NULL options");
}

// Keys moved from rotate-half to interleaved pairs: interleaved dim 2j is rotate-half dim j,
// 2j+1 is j + d/2; values stay; the schemes stay (no scheme given).
static void rope_layout_change(const char *good, const char *scratch) {
    kvpack_error err;
    CHECK(kvpack_convert(good, scratch, NULL, KVPACK_ROPE_INTERLEAVED, 1, NULL, 0, NULL, &err) == KVPACK_OK, "convert layout: %s",
          err.message);
    CHECK(kvpack_convert(good, scratch, NULL, 7, 1, NULL, 0, NULL, &err) == KVPACK_E_INVALID_ARGUMENT, "layout 7");
    kvpack_reader *a = NULL, *b = NULL;
    CHECK(kvpack_open(good, 0, &a, &err) == KVPACK_OK && kvpack_open(scratch, 0, &b, &err) == KVPACK_OK, "open: %s", err.message);
    if (!a || !b) return;
    kvpack_geometry g;
    kvpack_geometry_of(b, &g, &err);
    CHECK(g.rope_layout == KVPACK_ROPE_INTERLEAVED, "recorded layout %u", g.rope_layout);
    static float ka[KVHEADS * TOKENS * DIM], kb[KVHEADS * TOKENS * DIM], va[KVHEADS * TOKENS * DIM], vb[KVHEADS * TOKENS * DIM];
    kvpack_decode(a, 1, -1, KVPACK_KEYS, 0, KVPACK_ALL_TOKENS, KVPACK_F32, ka, sizeof ka, &err);
    kvpack_decode(b, 1, -1, KVPACK_KEYS, 0, KVPACK_ALL_TOKENS, KVPACK_F32, kb, sizeof kb, &err);
    kvpack_decode(a, 1, -1, KVPACK_VALUES, 0, KVPACK_ALL_TOKENS, KVPACK_F32, va, sizeof va, &err);
    kvpack_decode(b, 1, -1, KVPACK_VALUES, 0, KVPACK_ALL_TOKENS, KVPACK_F32, vb, sizeof vb, &err);
    int bad = 0;
    for (int r = 0; r < KVHEADS * TOKENS; r++)
        for (int j = 0; j < DIM / 2; j++)
            bad += kb[r * DIM + 2 * j] != ka[r * DIM + j] || kb[r * DIM + 2 * j + 1] != ka[r * DIM + j + DIM / 2];
    CHECK(bad == 0 && memcmp(va, vb, sizeof va) == 0, "%d permuted keys wrong, values %s", bad, memcmp(va, vb, sizeof va) ? "differ" : "same");
    // Attention does not change when the queries move the same way.
    float q[QHEADS * DIM], qi[QHEADS * DIM], oa[QHEADS * DIM], ob[QHEADS * DIM];
    for (int i = 0; i < QHEADS * DIM; i++) q[i] = sinf(0.3f * (float)i);
    for (int h = 0; h < QHEADS; h++)
        for (int j = 0; j < DIM / 2; j++) {
            qi[h * DIM + 2 * j] = q[h * DIM + j];
            qi[h * DIM + 2 * j + 1] = q[h * DIM + j + DIM / 2];
        }
    kvpack_attend(a, 1, q, 0, KVPACK_ALL_TOKENS, 0, 1, oa, &err);
    kvpack_attend(b, 1, qi, 0, KVPACK_ALL_TOKENS, 0, 1, ob, &err);
    double worst = 0;
    for (int i = 0; i < QHEADS * DIM; i++) worst = fmax(worst, fabs(oa[i] - ob[i]));
    CHECK(worst < 1e-5, "attention after the layout change differs by %g", worst);
    kvpack_close(a);
    kvpack_close(b);
}

// The fingerprint is XXH3-128 of the file's bytes, low half first.
static void fingerprint(const char *path) {
    long size = 0;
    unsigned char *bytes = slurp(path, &size);
    XXH128_hash_t h = XXH3_128bits(bytes, (size_t)size);
    free(bytes);
    uint8_t want[16], got[16];
    for (int i = 0; i < 8; i++) {
        want[i] = (uint8_t)(h.low64 >> (8 * i));
        want[8 + i] = (uint8_t)(h.high64 >> (8 * i));
    }
    kvpack_error err;
    CHECK(kvpack_model_fingerprint(path, got, &err) == KVPACK_OK && memcmp(got, want, 16) == 0, "fingerprint: %s", err.message);
    CHECK(kvpack_model_fingerprint("/nonexistent", got, &err) == KVPACK_E_IO, "missing model: %d", err.code);
}

static unsigned char *slurp(const char *path, long *size) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    *size = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *bytes = malloc((size_t)*size);
    if (fread(bytes, 1, (size_t)*size, f) != (size_t)*size) *size = 0;
    fclose(f);
    return bytes;
}

static void spit(const char *path, const unsigned char *bytes, long size) {
    FILE *f = fopen(path, "wb");
    fwrite(bytes, 1, (size_t)size, f);
    fclose(f);
}

int main(int argc, char **argv) {
    const char *dir = argc > 1 ? argv[1] : "/tmp";
    char good[4096], bad[4096], converted[4096];
    snprintf(good, sizeof good, "%s/capi-good.kvpack", dir);
    snprintf(bad, sizeof bad, "%s/capi-bad.kvpack", dir);
    snprintf(converted, sizeof converted, "%s/capi-int.kvpack", dir);
    CHECK(kvpack_abi_version() == KVPACK_ABI_VERSION, "ABI %u, header %d", kvpack_abi_version(), KVPACK_ABI_VERSION);

    write_file(good, "raw:f32");
    int opened;
    read_all(good, 1, &opened);
    bad_arguments(good);

    kvpack_error err;
    char report[1 << 16];
    size_t length;
    uint32_t valid = 0;
    CHECK(kvpack_convert(good, converted, "int:k4v2", -1, 1, report, sizeof report, &length, &err) == KVPACK_OK &&
              strstr(report, "keyRelativeError"), "convert: %s", err.message);
    CHECK(kvpack_validate(converted, 1, &valid, report, sizeof report, &length, &err) == KVPACK_OK && valid == 1,
          "validate converted: %s %s", err.message, report);

    rope_layout_change(good, converted);
    fingerprint(good);

    // Foreign and missing files.
    kvpack_reader *r = NULL;
    CHECK(kvpack_open("/nonexistent/x.kvpack", 0, &r, &err) == KVPACK_E_IO && strstr(err.message, "/nonexistent/x.kvpack"),
          "missing file: %d %s", err.code, err.message);
    spit(bad, (const unsigned char *)"not a kvpack file at all, just some text that is long enough", 60);
    CHECK(kvpack_open(bad, 0, &r, &err) == KVPACK_E_BAD_MAGIC && err.has_offset, "foreign bytes: %d %s", err.code, err.message);

    // Every truncation and every flipped byte of the good file: a status each time, never a crash.
    long size = 0;
    unsigned char *bytes = slurp(good, &size);
    CHECK(bytes && size > 1000, "read back %s", good);
    int opens = 0, refused = 0;
    for (long n = 0; n < size; n += (n < 256 ? 1 : 7)) {
        spit(bad, bytes, n);
        read_all(bad, 0, &opened);
        opens += opened;
        refused += !opened;
    }
    for (long at = 0; at < size; at++) {
        bytes[at] ^= (unsigned char)(1u << (at % 8));
        spit(bad, bytes, size);
        read_all(bad, 0, &opened);
        opens += opened;
        refused += !opened;
        uint32_t ok = 1;
        CHECK(kvpack_validate(bad, 1, &ok, NULL, 0, NULL, &err) == KVPACK_OK, "validate flipped byte %ld: %s", at, err.message);
        bytes[at] ^= (unsigned char)(1u << (at % 8));
    }
    free(bytes);
    printf("capi_test: %ld-byte file; %d damaged copies opened (older commits or unread bytes), %d refused\n", size, opens, refused);
    if (failures) {
        fprintf(stderr, "capi_test: %d failures\n", failures);
        return 1;
    }
    printf("capi_test: all checks passed\n");
    return 0;
}
