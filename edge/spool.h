/*
 * spool.h - the edge's durable spool: received DICOM files under
 * <dir>/objects and one SQLite row per received instance (<dir>/spool.db).
 *
 * The row is the source of truth for the upload. Its state moves
 *
 *     PENDING --claim--> UPLOADING --cloud confirmed--> DONE
 *        ^                  |  \
 *        +----retry(backoff)+   +--unrecoverable (file lost/corrupt)--> FAILED
 *        +---- edge restart (crash recovery) ----+
 *
 * Every function here blocks (SQLite with synchronous=FULL, fsync): call it
 * from an SCP worker thread or the libuv threadpool, never the loop thread.
 * All functions are thread-safe (one connection guarded by a mutex).
 */
#ifndef EDGE_SPOOL_H
#define EDGE_SPOOL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "proto/proto.h"

typedef enum {
    EDGE_SPOOL_PENDING = 0,
    EDGE_SPOOL_UPLOADING = 1,
    EDGE_SPOOL_DONE = 2,
    EDGE_SPOOL_FAILED = 3,
} edge_spool_state_t;

typedef struct edge_spool edge_spool_t;

/** One spooled instance, as claimed for upload. */
typedef struct {
    int64_t id;
    char sop_uid[PROTO_UID_MAX + 1];
    char study_uid[PROTO_UID_MAX + 1];
    char series_uid[PROTO_UID_MAX + 1];
    char sha256[PROTO_HEX256 + 1];
    uint64_t size;                   /* bytes */
    char path[4096];                 /* absolute or relative to the cwd at start */
    int attempts;                    /* failed attempts so far */
} edge_spool_item_t;

typedef struct {
    int64_t pending, uploading, done, failed;
} edge_spool_counts_t;

/**
 * Opens (creating) the spool in dir: makes dir, dir/objects, dir/tmp,
 * migrates the database, removes leftover temporary files and moves rows
 * left UPLOADING by a crash back to PENDING. 0 with *out set (free with
 * edge_spool_close), or a negative error.
 */
int edge_spool_open(const char *dir, uint64_t min_free_bytes, edge_spool_t **out);
void edge_spool_close(edge_spool_t *sp);

/** True when the spool's file system has at least min_free_bytes available. */
bool edge_spool_has_space(edge_spool_t *sp);

/** Writes a new unique temporary file name under dir/tmp into buf. 0 or -ENAMETOOLONG. */
int edge_spool_tmp_path(edge_spool_t *sp, char *buf, size_t len);

/** UIDs of an instance being added. */
typedef struct {
    const char *sop_uid;
    const char *study_uid;
    const char *series_uid;
} edge_spool_uids_t;

/**
 * Makes a received temporary file durable and records it: fsyncs the file,
 * hashes it, renames it to dir/objects/<sha256>.dcm, fsyncs the directory and
 * inserts a PENDING row (committed with synchronous=FULL). On success the
 * temporary file no longer exists and *id_out (may be NULL) is the row id.
 * On failure the temporary file is removed: 0, -ENOSPC / -EIO / other -errno,
 * or CMN_EDB.
 */
int edge_spool_add(edge_spool_t *sp, const char *tmp_path, const edge_spool_uids_t *uids,
                   int64_t *id_out, char sha_out[PROTO_HEX256 + 1]);

/**
 * Claims up to max PENDING rows due at now_ms (wall clock), oldest first,
 * marking them UPLOADING. *n is the number claimed. *next_due_ms is the
 * earliest next_attempt_at among PENDING rows not claimed, or -1 if none.
 * 0 or CMN_EDB.
 */
int edge_spool_claim(edge_spool_t *sp, int64_t now_ms, edge_spool_item_t *items, int max, int *n,
                     int64_t *next_due_ms);

int edge_spool_mark_done(edge_spool_t *sp, int64_t id);
/** Back to PENDING with attempts+1, due at next_at_ms; err is a short text (no PHI). */
int edge_spool_mark_retry(edge_spool_t *sp, int64_t id, int64_t next_at_ms, const char *err);
int edge_spool_mark_failed(edge_spool_t *sp, int64_t id, const char *err);

int edge_spool_counts(edge_spool_t *sp, edge_spool_counts_t *out);

const char *edge_spool_state_name(edge_spool_state_t s);

#endif /* EDGE_SPOOL_H */
