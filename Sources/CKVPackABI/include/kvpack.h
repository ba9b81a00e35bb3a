/*
 * kvpack.h: the C ABI of KVPack (libKVPackC.so), for Python and any language with a C FFI.
 *
 * A .kvpack file holds a transformer's KV cache: per layer and KV head, blocks of keys and values
 * in a scheme (lossless raw f32/f16/bf16, or a quantized one). Spec/ (in the repository) is the
 * normative description of the bytes; this header is how a program reads, writes, attends over,
 * converts and validates such files without linking Swift itself.
 *
 * Conventions (every function):
 *   - Functions that can fail return an int32_t status: KVPACK_OK (0) or one of kvpack_status.
 *     When `err` is not NULL it is filled: the code again, the absolute file offset and the
 *     Spec field name when the problem is in a file, and a NUL-terminated UTF-8 message that
 *     names the file, field and offset. On success `err->code` is set to KVPACK_OK.
 *   - Nothing aborts: a bad file, a bad argument or a failed system call gives a status, never a
 *     crash, and no Swift error or trap crosses this boundary. Every length and count passed in
 *     is checked against the file and against the buffer sizes passed with it.
 *   - Buffers are the caller's. Functions that produce text (JSON) take `buffer`, `capacity`
 *     and `length`: the text needs *length + 1 bytes; when capacity is smaller the function
 *     returns KVPACK_E_BUFFER_TOO_SMALL and writes nothing but *length (call again with more).
 *   - Layouts are C order (row-major). Float arrays are native-endian IEEE 754.
 *   - "kind" is KVPACK_KEYS or KVPACK_VALUES.
 *
 * Thread safety:
 *   - A kvpack_reader may be used from many threads at once (decode, attend, tokens, rows, info
 *     are all safe to call concurrently on one handle); kvpack_close must not race any of them.
 *   - A kvpack_writer belongs to one thread at a time (callers serialise their own calls).
 *     One process or thread may hold a file's writer at a time (a file lock; a second
 *     kvpack_create/kvpack_resume gets KVPACK_E_LOCKED). Readers may open a file while it is
 *     being written: they see its last commit.
 *   - kvpack_convert and kvpack_validate touch only their own files and are safe to call
 *     concurrently.
 */
#ifndef KVPACK_H
#define KVPACK_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped when a declaration below changes incompatibly; kvpack_abi_version() must equal it. */
#define KVPACK_ABI_VERSION 1

typedef enum kvpack_status {
    KVPACK_OK = 0,
    /* Problems with a file's bytes (Spec/ names the field in err->field). */
    KVPACK_E_TRUNCATED = 1,              /* the file ends before a structure that must be there */
    KVPACK_E_BAD_MAGIC = 2,              /* not a .kvpack file */
    KVPACK_E_UNSUPPORTED_VERSION = 3,    /* a major version this library does not read */
    KVPACK_E_CHECKSUM_MISMATCH = 4,      /* stored XXH3-64 differs from the bytes */
    KVPACK_E_INVALID_FIELD = 5,          /* a field breaks an invariant of Spec/ */
    KVPACK_E_UNKNOWN_CRITICAL_FRAME = 6, /* a critical frame kind this library does not know */
    KVPACK_E_UNKNOWN_SCHEME = 7,         /* a scheme kind this library does not implement */
    KVPACK_E_CORRUPT_PAYLOAD = 8,        /* payload bytes that do not decode */
    KVPACK_E_NO_VALID_COMMIT = 9,        /* no commit in the file could be loaded */
    /* Problems outside the file. */
    KVPACK_E_IO = 10,                    /* an operating-system call failed */
    KVPACK_E_INVALID_ARGUMENT = 11,      /* the caller passed something unusable */
    KVPACK_E_LOCKED = 12,                /* another writer holds the file */
    KVPACK_E_NEEDS_CALIBRATION = 13,     /* an auto scheme needs a calibration cache: use convert */
    KVPACK_E_BUFFER_TOO_SMALL = 14,      /* see *length for the size needed */
    KVPACK_E_INTERNAL = 15               /* anything else (a bug: please report the message) */
} kvpack_status;

typedef struct kvpack_error {
    int32_t code;        /* kvpack_status */
    uint32_t has_offset; /* 1 when `offset` names a byte of the file */
    uint64_t offset;     /* absolute byte offset of the structure or field that is wrong */
    char field[64];      /* Spec/ field name, e.g. "BLCK.segment"; "" when none */
    char message[1024];  /* NUL-terminated; truncated at a UTF-8 boundary if longer */
} kvpack_error;

enum { KVPACK_KEYS = 0, KVPACK_VALUES = 1 };

/* Element types of caller buffers and mapped rows (Spec/ "Element types" numbering). */
enum { KVPACK_F32 = 1, KVPACK_F16 = 2, KVPACK_BF16 = 3 };

/* RoPE pairing of the stored keys (Spec/ manifest.ropeLayout). */
enum { KVPACK_ROPE_NONE = 0, KVPACK_ROPE_INTERLEAVED = 1, KVPACK_ROPE_ROTATE_HALF = 2 };

/* Writer durability: fsync every commit (crash-safe against power loss), or flush only
 * (safe against a process crash, faster). */
enum { KVPACK_DURABLE_FSYNC = 0, KVPACK_DURABLE_FLUSH = 1 };

/* kvpack_open flags. */
enum {
    /* Attend in f32 over the decoded codes (as the tests' reference does) instead of the
     * integer kernels; slower, bit-for-bit what decode + dense attention give. */
    KVPACK_OPEN_EXACT = 1
};

/* Token ranges: count KVPACK_ALL_TOKENS means "from start to the last token". */
#define KVPACK_ALL_TOKENS UINT64_MAX

typedef struct kvpack_reader kvpack_reader;
typedef struct kvpack_writer kvpack_writer;

typedef struct kvpack_geometry {
    uint32_t layers;
    uint32_t query_heads;
    uint32_t kv_heads;
    uint32_t head_dim;
    uint32_t segment_tokens;  /* tokens per sealed block; 0 in kvpack_create = the scheme's default */
    uint32_t rope_layout;     /* KVPACK_ROPE_* */
    double rope_theta;        /* 0 when unknown */
    uint32_t keys_post_rope;  /* 1 when stored keys are already rotated (the usual case) */
    uint32_t max_positions;   /* the model's context length, 0 when unknown */
} kvpack_geometry;

/* ---- Library ---------------------------------------------------------------------------- */

/* KVPACK_ABI_VERSION of the library that is loaded. */
uint32_t kvpack_abi_version(void);
/* The file format major version the library writes (it reads this one and every older one
 * Spec/ lists). */
uint32_t kvpack_format_major(void);

/* ---- Reading ---------------------------------------------------------------------------- */

/* Maps `path` and loads its newest valid commit. flags: 0 or KVPACK_OPEN_EXACT. */
int32_t kvpack_open(const char *path, uint32_t flags, kvpack_reader **reader, kvpack_error *err);
/* Unmaps the file. NULL is ignored. Rows from kvpack_rows are invalid afterwards. */
void kvpack_close(kvpack_reader *reader);

/* Geometry, RoPE and segment size of the file. */
int32_t kvpack_geometry_of(const kvpack_reader *reader, kvpack_geometry *geometry, kvpack_error *err);
/* Tokens in the file's newest commit. */
uint64_t kvpack_token_count(const kvpack_reader *reader);

/* Token ids and positions of tokens [start, start + count): each array NULL or count entries. */
int32_t kvpack_tokens(kvpack_reader *reader, uint64_t start, uint64_t count, uint32_t *ids,
                      uint32_t *positions, kvpack_error *err);

/* Everything `kvpack info --json` prints (schemes per layer, bits per element, metadata, ...),
 * as UTF-8 JSON. */
int32_t kvpack_info_json(kvpack_reader *reader, char *buffer, size_t capacity, size_t *length,
                         kvpack_error *err);

/* Decodes keys or values of `layer`, tokens [start, start + count), into `out`, laid out
 * [heads][tokens][head_dim]: every KV head when kv_head is -1, else one head. dtype KVPACK_F32
 * or KVPACK_F16 (rounded to nearest even); out_bytes is the buffer's size, checked. */
int32_t kvpack_decode(kvpack_reader *reader, uint32_t layer, int32_t kv_head, uint32_t kind,
                      uint64_t start, uint64_t count, uint32_t dtype, void *out, uint64_t out_bytes,
                      kvpack_error *err);

/* Attention of one decode step over `layer`: queries and output are [query_heads][head_dim]
 * f32 (query head h attends with KV head h / (query_heads / kv_heads)), over tokens
 * [start, start + count). scale 0 means 1/sqrt(head_dim). threads 0 or 1: the calling thread;
 * more: KV heads split across that many threads (the result does not depend on it). */
int32_t kvpack_attend(kvpack_reader *reader, uint32_t layer, const float *queries, uint64_t start,
                      uint64_t count, float scale, uint32_t threads, float *output, kvpack_error *err);

/* Where the stored rows around `token` lie in the mapped file, when they are stored as plain
 * rows (raw schemes without zstd, and every scheme's unsealed tail): data points at the row of
 * token_start (token_start <= token < token_start + token_count, consecutive rows row_bytes
 * apart, dtype KVPACK_F32/F16/BF16). data is NULL (status KVPACK_OK) when the rows around
 * `token` are encoded. The memory is read-only and valid until kvpack_close. */
typedef struct kvpack_rows {
    const void *data;
    uint64_t token_start;
    uint64_t token_count;
    uint32_t dtype;
    uint32_t row_bytes;
} kvpack_rows;
int32_t kvpack_rows_at(kvpack_reader *reader, uint32_t layer, uint32_t kv_head, uint32_t kind,
                       uint64_t token, kvpack_rows *rows, kvpack_error *err);

/* ---- Writing ---------------------------------------------------------------------------- */

typedef struct kvpack_create_options {
    kvpack_geometry geometry;
    /* Scheme spec as `kvpack convert --scheme` takes it: "raw:f16", "raw:f32:zstd",
     * "int:k4v2:kc64", "nsn:2", keys and values apart "k:int:k4:kc64+v:raw:f16". Planners that
     * need calibration statistics (int:auto) are refused with KVPACK_E_NEEDS_CALIBRATION:
     * write raw, then kvpack_convert. NULL means "raw:f16". */
    const char *scheme;
    const char *producer;             /* recorded in the manifest; NULL: "libkvpack" */
    uint32_t overwrite;               /* 1: replace an existing file */
    uint32_t durability;              /* KVPACK_DURABLE_* */
    const char *const *metadata_keys; /* metadata_count UTF-8 strings each, or NULL */
    const char *const *metadata_values;
    uint32_t metadata_count;
    uint8_t model_fingerprint[16];    /* all zero when unknown */
} kvpack_create_options;

/* Creates a new file and holds its writer lock. */
int32_t kvpack_create(const char *path, const kvpack_create_options *options, kvpack_writer **writer,
                      kvpack_error *err);
/* Continues an existing file after its newest valid commit. */
int32_t kvpack_resume(const char *path, uint32_t durability, kvpack_writer **writer, kvpack_error *err);

/* Appends `tokens` tokens: their ids (required), positions (NULL: consecutive after the last
 * position), and every layer's keys and values. Element (layer l, token t, KV head h, dim i)
 * is at keys[l * strides[0] + t * strides[1] + h * strides[2] + i] (strides in floats, each
 * >= 0; for [layers][kv_heads][tokens][head_dim] they are {H*T*D, D, T*D}). `floats` is the
 * number of floats in each of `keys` and `values`, checked against what the strides address.
 * Tokens are encoded when their segment fills; kvpack_commit makes them visible to readers. */
int32_t kvpack_append(kvpack_writer *writer, uint64_t tokens, const uint32_t *token_ids,
                      const uint32_t *positions, const float *keys, const float *values,
                      const int64_t strides[3], uint64_t floats, kvpack_error *err);
/* Makes everything appended so far durable and visible (one commit frame). */
int32_t kvpack_commit(kvpack_writer *writer, kvpack_error *err);
/* Tokens appended so far (committed or not). */
uint64_t kvpack_writer_token_count(const kvpack_writer *writer);
/* Commits, releases the lock and frees the handle (always freed, even on error; tokens
 * appended after the last successful commit are then lost, the file stays valid). NULL ok. */
int32_t kvpack_writer_close(kvpack_writer *writer, kvpack_error *err);

/* ---- Whole files ------------------------------------------------------------------------ */

/* Re-encodes `input` into a new file `output` with `scheme` (as `kvpack convert`; auto
 * planners calibrate on the input; NULL keeps every layer's scheme). rope_layout: -1 keeps the
 * input's key layout, KVPACK_ROPE_INTERLEAVED or KVPACK_ROPE_ROTATE_HALF permutes each head's key
 * dimensions into that pair layout (values untouched). The output appears atomically; nothing is
 * left on failure. report: JSON with bits per element before/after and measured errors; when it
 * does not fit, the conversion is still done and KVPACK_E_BUFFER_TOO_SMALL says so (report may
 * be NULL with capacity 0). */
int32_t kvpack_convert(const char *input, const char *output, const char *scheme, int32_t rope_layout,
                       uint32_t overwrite, char *report, size_t capacity, size_t *length, kvpack_error *err);

/* The model fingerprint `kvpack chat` records and checks on resume for a model file (a GGUF or
 * llama2.c checkpoint): XXH3-128 of its bytes, low 64 bits first, each little-endian. */
int32_t kvpack_model_fingerprint(const char *model_path, uint8_t fingerprint[16], kvpack_error *err);

/* Checks a file (deep: every block's checksum and code values too). Returns KVPACK_OK when the
 * check ran; *valid says whether the file passed; report: JSON list of problems, each with
 * severity, code, offset and field (as `kvpack validate --json`). */
int32_t kvpack_validate(const char *path, uint32_t deep, uint32_t *valid, char *report, size_t capacity,
                        size_t *length, kvpack_error *err);

#ifdef __cplusplus
}
#endif

#endif /* KVPACK_H */
