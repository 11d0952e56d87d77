/*
 * crypto.h - hashing (SHA-256 with SHA-NI where available), MACs and
 * randomness via mbedTLS; the XXH3-128 checksum (libxxhash).
 */
#ifndef CMN_CRYPTO_H
#define CMN_CRYPTO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define XXH_STATIC_LINKING_ONLY   /* XXH3_state_t on the stack */
#include <xxhash.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CMN_SHA256_LEN 32
#define CMN_SHA256_HEX_LEN 64

/**
 * Incremental SHA-256: the x86 SHA extensions when the CPU has them, else
 * mbedTLS. The state is opaque storage. Thread-safe; no allocation.
 */
typedef struct {
    unsigned char state[256];
} __attribute__((aligned(8))) cmn_sha256_ctx_t;

void cmn_sha256_init(cmn_sha256_ctx_t *c);
void cmn_sha256_update(cmn_sha256_ctx_t *c, const void *p, size_t n);
void cmn_sha256_final(cmn_sha256_ctx_t *c, uint8_t out[CMN_SHA256_LEN]);
/** cmn_sha256_final as lower-case hex (64 characters + NUL). */
void cmn_sha256_final_hex(cmn_sha256_ctx_t *c, char hex[CMN_SHA256_HEX_LEN + 1]);
/** True when the SHA-NI code is used (for logs and benchmarks). */
bool cmn_sha256_has_ni(void);

void cmn_sha256(const void *p, size_t n, uint8_t out[CMN_SHA256_LEN]);
/** Hashes a file's whole content. 0 or -errno. Blocking: not on a loop thread. */
int cmn_sha256_file(const char *path, uint8_t out[CMN_SHA256_LEN], uint64_t *size);

/**
 * XXH3-128 (libxxhash), about 15 GB/s against SHA-256's 1.3 GB/s with
 * SHA-NI: a checksum that detects corruption of bytes at rest. Not
 * collision resistant, so it never names, deduplicates or authenticates
 * anything an outsider supplies. Hex is the canonical (big-endian) form
 * that xxhsum -H2 and python's xxhash print.
 */
#define CMN_XXH128_HEX_LEN 32
typedef struct {
    XXH3_state_t st;
} cmn_xxh128_ctx_t;

void cmn_xxh128_init(cmn_xxh128_ctx_t *c);
void cmn_xxh128_update(cmn_xxh128_ctx_t *c, const void *p, size_t n);
void cmn_xxh128_final_hex(const cmn_xxh128_ctx_t *c, char hex[CMN_XXH128_HEX_LEN + 1]);

/* The updates as callbacks (ctx: the context), for cmn_file_chunks/cmn_fd_chunks. */
void cmn_sha256_update_cb(void *ctx, const void *p, size_t n);
void cmn_xxh128_update_cb(void *ctx, const void *p, size_t n);

void cmn_hmac_sha256(const void *key, size_t keylen, const void *msg, size_t msglen,
                     uint8_t out[CMN_SHA256_LEN]);

/** Fills buf with cryptographically secure random bytes. 0 or CMN_ECRYPTO. */
int cmn_random(void *buf, size_t n);

/** Lower-case hex; out must hold 2*n+1 bytes. */
void cmn_hex(const uint8_t *in, size_t n, char *out);
/** Parses exactly 2*n hex digits. 0 or CMN_EPARSE. */
int cmn_unhex(const char *hex, uint8_t *out, size_t n);

/** Constant-time comparison; returns 0 when equal. */
int cmn_memeq_ct(const void *a, const void *b, size_t n);

#ifdef __cplusplus
}
#endif

#endif /* CMN_CRYPTO_H */
