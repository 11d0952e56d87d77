/*
 * upload.h - the edge's upload worker: sends spooled instances to the cloud
 * over the signed, chunked, resumable protocol (proto/proto.h) and marks a
 * spool row DONE only after the cloud confirms the commit.
 *
 * Runs on the libuv loop; file reads, hashing and SQLite go to the
 * threadpool. upload.parallel instances are in flight at once.
 */
#ifndef EDGE_UPLOAD_H
#define EDGE_UPLOAD_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "internal.h"
#include "spool.h"

typedef struct edge_upload edge_upload_t;

/**
 * Creates the worker on loop (loop thread only) and starts it: it claims
 * due rows immediately. conf must outlive the worker. 0 with *out set, or
 * a negative error with a message in err (secret file unreadable, ...).
 */
int edge_upload_create(uv_loop_t *loop, const edge_conf_upload_t *conf, edge_spool_t *spool,
                       edge_upload_t **out, char *err, size_t errlen);

/** Tells the worker new rows may be due. Thread-safe (uv_async_send). */
void edge_upload_wake(void *up);

/**
 * Cancels requests in flight (their rows stay UPLOADING and are retried at
 * the next start), waits for threadpool work to finish, closes the handles
 * and frees the worker; then done(ud) runs on the loop. Loop thread only.
 */
void edge_upload_close(edge_upload_t *up, void (*done)(void *ud), void *ud);

/**
 * Reads a hex secret from path (surrounding whitespace ignored; 32 to 256
 * hex digits). 0, or CMN_ECONFIG with a reason in err.
 */
int edge__upload_load_secret(const char *path, uint8_t *out, size_t outmax, size_t *len,
                             char *err, size_t errlen);

#endif /* EDGE_UPLOAD_H */
