/*
 * staging.h - where the chunks of uploads in progress live (staging.c).
 * Blocking (file and S3 I/O): threadpool only.
 *
 * Backend "dir" (archive.backend): ingest.staging_dir/<object id>/<i>, so
 * several cloud nodes need that directory shared. Backend "s3": the archive
 * bucket, key <archive.s3_prefix>staging/<object id>/<i>, so any node can
 * commit an upload whose chunks other nodes received. Either way the local
 * ingest.staging_dir/.tmp holds this node's scratch files (downloaded
 * chunks, the assembled object, bundle members), uniquely named, on the
 * file system of archive.dir so that placement is a rename.
 */
#ifndef CLOUD_STAGING_H
#define CLOUD_STAGING_H

#include <stdint.h>
#include <sys/types.h>

#include "cmn/crypto.h"
#include "cmn/http.h"
#include "proto/proto.h"

/**
 * Stores chunk i of object_id from the request body (memory or body_file),
 * durably (dir: temp + fsync + rename; s3: a PUT the server checks against
 * sha256_hex, the body's verified SHA-256). 0, -errno or an S3 error.
 */
int cloud__staging_put(const char *object_id, uint32_t i, const cmn_http_req_t *req,
                       const char *sha256_hex);

/** 1 when chunk i is staged, 0 when not, negative on error (S3 HEAD). */
int cloud__staging_has(const char *object_id, uint32_t i);

/** Deletes chunk i (best effort; a missing one is fine). */
void cloud__staging_drop(const char *object_id, uint32_t i);

/** Deletes the chunks 0..nchunks-1 of an object and its directory (best effort). */
void cloud__staging_remove(const char *object_id, uint32_t nchunks);

/**
 * Creates a uniquely named scratch file ingest.staging_dir/.tmp/<stem>-XXXXXX
 * (mkstemp: unique across processes and machines sharing the directory).
 * Returns the open fd (O_RDWR, O_CLOEXEC) with its name in path, or -errno.
 */
int cloud__staging_tmpfile(const char *stem, char *path, size_t pathlen);

/**
 * Reads the chunks of an object in order as one stream, chunk by chunk
 * (never more than one chunk on local disk, a 64 KiB buffer in memory),
 * verifying each chunk's length and SHA-256 against what its chunks row
 * recorded when the chunk ended. The caller fills the first block, then
 * calls cloud__staging_read until it returns 0 and always
 * cloud__staging_reader_close.
 */
typedef struct {
    /* set by the caller */
    const char *object_id;
    uint64_t size;                           /* declared object size */
    uint32_t chunk_size, nchunks;
    const char (*want)[PROTO_HEX256 + 1];    /* recorded SHA-256 of each chunk (nchunks) */
    /* state, zeroed by cloud__staging_reader_init */
    uint32_t cur;                            /* chunk being read */
    int fd;                                  /* its bytes, or -1 */
    uint64_t got;                            /* bytes read of it */
    cmn_sha256_ctx_t sha;                    /* of it */
    uint32_t bad;                            /* after CMN_ENOTFOUND / CMN_EHASH: which chunk */
} cloud_staging_reader_t;

void cloud__staging_reader_init(cloud_staging_reader_t *r);

/**
 * Reads up to len bytes; 0 at the end of the last chunk. CMN_ENOTFOUND when
 * chunk r->bad is not staged, CMN_EHASH when its length or SHA-256 differs
 * from the record (bytes of it may already have been returned: the caller
 * discards everything on error), else -errno or an S3 error.
 */
ssize_t cloud__staging_read(cloud_staging_reader_t *r, void *buf, size_t len);

/** Releases what the reader holds. Safe to call twice. */
void cloud__staging_reader_close(cloud_staging_reader_t *r);

#endif /* CLOUD_STAGING_H */
