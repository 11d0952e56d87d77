/*
 * sha256.h - SHA-256 for the ingest path (sha256.c): the x86 SHA
 * extensions when the CPU has them, else cmn_sha256 (mbedTLS).
 *
 * Why not cmn_sha256: mbedTLS 2.28 has no SHA-NI code and hashes ~125 MB/s
 * here, 4.2 ms per 512 KiB CT slice - more than receiving it. With SHA-NI
 * the same slice takes ~0.4 ms. (A candidate to move into common/cmn_crypto.c.)
 * Thread-safe; no allocation.
 */
#ifndef EDGE_SHA256_H
#define EDGE_SHA256_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cmn/crypto.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    uint32_t h[8];                   /* chaining state (SHA-NI path) */
    uint8_t buf[64];                 /* partial block */
    size_t nbuf;                     /* bytes in buf */
    uint64_t total;                  /* bytes hashed */
    bool ni;                         /* SHA-NI in use; else mb is */
    cmn_sha256_ctx_t mb;             /* fallback */
} edge_sha256_t;

void edge_sha256_init(edge_sha256_t *c);
void edge_sha256_update(edge_sha256_t *c, const void *p, size_t n);
/** Writes the lowercase hex digest (64 characters + NUL). */
void edge_sha256_final_hex(edge_sha256_t *c, char hex[65]);
/** True when the SHA-NI path is used (for logs and the benchmark). */
bool edge_sha256_has_ni(void);

#ifdef __cplusplus
}
#endif

#endif /* EDGE_SHA256_H */
