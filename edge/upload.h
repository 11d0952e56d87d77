/*
 * upload.h - the edge's upload worker: sends spooled instances to the cloud
 * over the signed, chunked, resumable protocol (proto/proto.h) and marks a
 * spool row DONE only after the cloud confirms the commit.
 *
 * Runs on the libuv loop; file reads, hashing and SQLite go to the
 * threadpool. upload.parallel objects are in flight at once; an object is
 * one instance or a bundle of small instances of one study. Once a study
 * is uploaded and quiet, its manifest is sent (PROTOCOL.md).
 */
#ifndef EDGE_UPLOAD_H
#define EDGE_UPLOAD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "internal.h"
#include "schedule.h"
#include "spool.h"

typedef struct edge_upload edge_upload_t;

/** Live figures of the running worker, for the status page and /metrics. */
typedef struct {
    bool schedule_open;              /* an upload window is open now */
    int window;                      /* index of the open window, -1 = none/immediate */
    int64_t rate_limit_bps;          /* byte/s cap now; 0 = unlimited */
    int jobs;                        /* objects (instances or bundles) being uploaded */
    int pacing;                      /* of which waiting for bandwidth tokens */
    int preparing;                   /* instances being transcoded */
    int64_t tokens;                  /* bucket level, bytes (negative = debt) */
    uint64_t bytes_sent;             /* chunk payload sent since start, retries included */
    uint64_t jpegls_files;           /* transcoded since start */
    uint64_t jpegls_bytes_in;        /* their original file bytes */
    uint64_t jpegls_bytes_out;       /* their JPEG-LS file bytes */
    uint64_t jpegls_usec;            /* time spent transcoding */
    uint64_t originals;              /* prepared as the original (skipped or compress off) */
    int64_t clock_offset_s;          /* the cloud's clock minus the edge's (edge_token_clock_diff) */
    int64_t cache_pass_ms;           /* unix ms (edge clock) of the hot cache's last pass; 0 = none */
} edge_upload_live_t;

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
 * Sets the upload schedule (schedule.h; copied). Loop thread only; call
 * right after create (the first claim waits for the next loop turn).
 */
void edge_upload_set_schedule(edge_upload_t *up, const edge_schedule_t *s);

/** Copies the live figures. Thread-safe (a mutex). */
void edge_upload_live(edge_upload_t *up, edge_upload_live_t *out);

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
