/*
 * spool.h - the edge's durable spool: received DICOM files under
 * <dir>/objects and one SQLite row per received instance (<dir>/spool.db).
 *
 * The row is the source of truth for the upload. Its state moves
 *
 *     PENDING --claim--> UPLOADING --cloud confirmed--> DONE
 *        ^                  |  \
 *        +----retry(backoff)+   +--unrecoverable (file lost/corrupt)--> FAILED
 *        +---- release (window closed, stop) ----+
 *        +---- edge restart (crash recovery) ----+
 *
 * Before a PENDING row can be claimed for upload it is *prepared*: the file
 * to upload is chosen - a JPEG-LS transcode written next to the original, or
 * the original itself - and recorded in the row (up_path, up_sha256,
 * up_size, up_kind). Preparing does not change the state; a row with
 * up_path NULL is waiting for it. The original stays until the row is DONE
 * (and after: it is the hot cache).
 *
 * Priority: a row gets priority 1 (urgent) when its calling AE title is in
 * the urgent list (edge_spool_set_urgent), else 0. Claims take the highest
 * priority first, then the oldest.
 *
 * Quota: the bytes of originals not yet DONE are counted in memory (set at
 * open, kept under the mutex). With a quota set, edge_spool_has_space()
 * refuses new instances while that count is at or above it, and the
 * quota alarm is raised (logged as an error, shown by the status page).
 *
 * Every function here blocks (SQLite, fsync, the journal): call it
 * from an SCP worker thread or the libuv threadpool, never the loop thread.
 * All functions are thread-safe (one connection guarded by a mutex).
 */
#ifndef EDGE_SPOOL_H
#define EDGE_SPOOL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cmn/crypto.h"
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
    char sha256[PROTO_HEX256 + 1];   /* "" on rows that have xxh128 */
    char xxh128[CMN_XXH128_HEX_LEN + 1]; /* checksum taken at receipt ("" on old rows) */
    uint64_t size;                   /* bytes of the original */
    char path[4096];                 /* the original; absolute or relative to the cwd at start */
    int attempts;                    /* failed attempts so far */
    int priority;                    /* 1 urgent, 0 normal */
    /* the file to upload, once prepared (edge_spool_set_upload_file) */
    char up_path[4096];              /* "" when not prepared */
    char up_sha256[PROTO_HEX256 + 1];
    uint64_t up_size;
    char up_kind[16];                /* "original" | "jpegls" */
} edge_spool_item_t;

typedef struct {
    int64_t pending, uploading, done, failed;
} edge_spool_counts_t;

/**
 * Opens (creating) the spool in dir: makes dir, dir/objects, dir/tmp,
 * migrates the database, removes leftover temporary files and moves rows
 * left UPLOADING by a crash back to PENDING. One process at a time (flock
 * on dir/lock). 0 with *out set (free with edge_spool_close), -EBUSY when
 * another process has it open, or a negative error.
 */
int edge_spool_open(const char *dir, uint64_t min_free_bytes, edge_spool_t **out);

/**
 * `yunying-edge prepare-spool`: writes the journal rings' never-written
 * parts once (edge_journal_prepare), so the first images after installing
 * cost what later ones do. Only on a spool nothing is storing into: call it
 * right after edge_spool_open. *written: bytes written; *rings: rings
 * looked at. 0 or -errno.
 */
int edge_spool_prepare(edge_spool_t *sp, uint64_t *written, int *rings);

/**
 * Opens an existing spool read-only (for `yunying-edge status`, also while
 * the daemon runs): no directories made, no recovery, no writes. Only
 * edge_spool_stats/edge_spool_counts may be called on it.
 */
int edge_spool_open_readonly(const char *dir, edge_spool_t **out);
void edge_spool_close(edge_spool_t *sp);

/** Quota on bytes waiting for upload; 0 = none. Call before serving. */
void edge_spool_set_quota(edge_spool_t *sp, uint64_t max_bytes);
/** Comma-separated calling AE titles whose instances get priority 1 (copied). */
void edge_spool_set_urgent(edge_spool_t *sp, const char *aes);

/**
 * True when a new instance may be accepted: the file system has at least
 * min_free_bytes available and the quota (if any) is not reached. A refusal
 * raises the matching alarm and logs it (at most every 10 s).
 */
bool edge_spool_has_space(edge_spool_t *sp);

/** The alarms as of the last edge_spool_has_space() call. */
void edge_spool_alarms(edge_spool_t *sp, bool *quota_full, bool *disk_low);

/** Writes a new unique temporary file name under dir/tmp into buf. 0 or -ENAMETOOLONG. */
int edge_spool_tmp_path(edge_spool_t *sp, char *buf, size_t len);

/** UIDs of an instance being added. */
typedef struct {
    const char *sop_uid;
    const char *study_uid;
    const char *series_uid;
    const char *calling_ae;          /* may be NULL; decides the priority */
} edge_spool_uids_t;

/**
 * Makes a received temporary file durable and records it: fsyncs the file,
 * checksums it (XXH3-128, into sum_out when not NULL), renames
 * dir/tmp/<name>.part to dir/objects/<name>.dcm, fsyncs the directory and
 * inserts a PENDING row (committed with synchronous=FULL). On success the
 * temporary file no longer exists and *id_out (may be NULL) is the row id.
 * On failure the temporary file is removed: 0, -ENOSPC / -EIO / other -errno,
 * or CMN_EDB.
 */
int edge_spool_add(edge_spool_t *sp, const char *tmp_path, const edge_spool_uids_t *uids,
                   int64_t *id_out, char sum_out[CMN_XXH128_HEX_LEN + 1]);

/**
 * A streaming lane of the ingest journal, for one association at a time:
 * the bytes of each instance are written to it as they arrive (stream_begin
 * at each instance, stream_write for every byte of the file, meta header
 * included), so that acknowledging it costs one fdatasync of what is not on
 * disk yet. NULL when every lane is taken (the instance is then copied into
 * the shared journal after receipt). Thread-safe; put it back when the
 * association ends.
 */
typedef struct edge_spool_stream edge_spool_stream_t;
edge_spool_stream_t *edge_spool_stream_get(edge_spool_t *sp);
void edge_spool_stream_put(edge_spool_stream_t *stream);
/**
 * Before each instance. Returns 1 when the lane also keeps the instance's
 * bytes in memory (up to 4 MiB, within an 8 MiB budget for all lanes):
 * then the caller writes no temporary file, edge_spool_add_received has
 * the object file written after the journal record, off the modality's
 * wait. 0: the caller writes the temporary file as the bytes arrive.
 */
int edge_spool_stream_begin(edge_spool_stream_t *stream);
/**
 * The next bytes of the instance (the file's, meta header included).
 * Returns 1 while the lane keeps them; 0 once it stopped (too big, budget
 * spent): the caller then creates the temporary file, has
 * edge_spool_stream_spill write what was kept so far (everything before
 * buf), writes buf and the rest itself.
 */
int edge_spool_stream_write(edge_spool_stream_t *stream, const void *buf, size_t len);
/** The bytes kept so far, while the lane keeps them (false otherwise). */
bool edge_spool_stream_kept(edge_spool_stream_t *stream, const void **data, size_t *len);
/** Writes the kept bytes to fd and keeps nothing more. 0 or -errno. */
int edge_spool_stream_spill(edge_spool_stream_t *stream, int fd);

/**
 * Waits (at most timeout_ms) until the object file at path - of a kept
 * instance, written after its acknowledgement - is written. Readers of an
 * object file call it first. 0, or -EAGAIN on timeout: then the spool's
 * notify callback is called once the writer writes a file again.
 */
int edge_spool_object_wait(edge_spool_t *sp, const char *path, int timeout_ms);
/**
 * fn(ud), on the spool's writer thread, after a write that follows an
 * edge_spool_object_wait timeout (e.g. the disk refused writes for a
 * while): the reader should look again. Set before readers wait.
 */
void edge_spool_set_notify(edge_spool_t *sp, void (*fn)(void *ud), void *ud);
/**
 * For the status page: acknowledged instances whose object file is not
 * written yet, and whether the last write failed (retried every second;
 * the instances are safe in their journal records meanwhile).
 */
void edge_spool_writer_state(edge_spool_t *sp, int *unwritten, bool *failing);

/**
 * Records a received file that was checksummed while it was written
 * (xxh128, cmn/crypto.h; size): through the ingest journal - the lane it was
 * streamed into (stream, when it holds all size bytes), else copied into the
 * shared journal (one group-committed fdatasync) - the file renamed to
 * dir/objects/<name>.dcm, the row inserted; or, for instances too big
 * for the journal, like edge_spool_add. An instance the lane kept in memory
 * has no temporary file: its object file is written by the spool's writer
 * thread after the record (edge_spool_object_wait). Returns once the
 * instance and its row are durable (the caller may acknowledge it). The
 * temporary file no longer exists afterwards. stream may be NULL. 0 or as
 * edge_spool_add.
 */
int edge_spool_add_received(edge_spool_t *sp, const char *tmp_path, const edge_spool_uids_t *uids,
                            const char *xxh128, uint64_t size, edge_spool_stream_t *stream,
                            int64_t *id_out);

/**
 * Claims up to max prepared PENDING rows due at now_ms (wall clock),
 * highest priority first, then oldest, marking them UPLOADING. *n is the
 * number claimed. *next_due_ms is the earliest next_attempt_at among
 * prepared PENDING rows not claimed, or -1 if none. 0 or CMN_EDB.
 */
int edge_spool_claim(edge_spool_t *sp, int64_t now_ms, edge_spool_item_t *items, int max, int *n,
                     int64_t *next_due_ms);

/**
 * Lists up to max PENDING rows that are not prepared yet (highest priority
 * first), without changing them. 0 or CMN_EDB.
 */
int edge_spool_list_unprepared(edge_spool_t *sp, edge_spool_item_t *items, int max, int *n);

/**
 * Records the file to upload for row id (only if not prepared yet). The
 * file must already be durable (fsync'd, renamed, directory fsync'd).
 * kind is "original" or "jpegls". 0 or CMN_EDB.
 */
int edge_spool_set_upload_file(edge_spool_t *sp, int64_t id, const char *path,
                               const char *sha256, uint64_t size, const char *kind);
/** Forgets the prepared file (it was lost or corrupt): the row is prepared again. */
int edge_spool_clear_upload_file(edge_spool_t *sp, int64_t id);

/**
 * DONE: the cloud committed the object. bytes_sent is the chunk payload
 * sent for it in this attempt (counted for the status page). 0 or CMN_EDB.
 */
int edge_spool_mark_done(edge_spool_t *sp, int64_t id, uint64_t bytes_sent);
/**
 * Back to PENDING with attempts+1, due at next_at_ms; err is a short text
 * (no PHI), kind a short error class ("connect", "timeout", "http_5xx",
 * "chunk_hash", ...) counted per kind for the status page (NULL: not counted).
 */
int edge_spool_mark_retry(edge_spool_t *sp, int64_t id, int64_t next_at_ms, const char *err,
                          const char *kind, uint64_t bytes_sent);
/** Back to PENDING, attempts unchanged, due now (upload window closed, stop). */
int edge_spool_release(edge_spool_t *sp, int64_t id, uint64_t bytes_sent);
int edge_spool_mark_failed(edge_spool_t *sp, int64_t id, const char *err);

int edge_spool_counts(edge_spool_t *sp, edge_spool_counts_t *out);

#define EDGE_SPOOL_MAX_ERR_KINDS 16

/** What `yunying-edge status` and the status page show. */
typedef struct {
    edge_spool_counts_t counts;
    int64_t pending_bytes;           /* originals not DONE */
    int64_t upload_pending_bytes;    /* bytes still to upload (prepared size, else original) */
    int64_t unprepared;              /* PENDING rows not prepared (waiting for transcoding) */
    int64_t urgent_pending;          /* not-DONE rows with priority 1 */
    int64_t oldest_pending_ms;       /* created_at (unix ms) of the oldest not-DONE row; 0 = none */
    int64_t last_success_ms;         /* unix ms of the last DONE; 0 = never */
    int64_t uploaded_instances;      /* DONE, ever */
    int64_t uploaded_bytes;          /* bytes of uploaded files, ever */
    int64_t original_bytes_done;     /* bytes of their originals */
    int64_t bytes_sent;              /* chunk payload sent, retries included, ever */
    int64_t done_bytes_60s;          /* uploaded file bytes DONE in the last 60 s */
    int64_t done_bytes_300s;         /* ... in the last 300 s */
    int64_t done_orig_bytes_60s;     /* original bytes DONE in the last 60 s */
    int64_t cached_instances;        /* DONE, files still in the spool (the hot cache) */
    int64_t cached_bytes;            /* their files' bytes */
    int64_t oldest_cached_ms;        /* done_at of the oldest of them; 0 = none */
    int64_t evicted_instances;       /* DONE rows whose files left the spool, ever */
    int nerr;
    struct {
        char kind[32];
        int64_t count;
    } err[EDGE_SPOOL_MAX_ERR_KINDS];  /* errors by kind, ever */
    int64_t last_received_ms;        /* created_at of the newest row; 0 = none */
    int nrefused;
    struct {
        char status[8];              /* "A700", "A900", "C000" */
        int64_t count;
    } refused[EDGE_SPOOL_MAX_ERR_KINDS]; /* C-STORE refusals by status, ever */
} edge_spool_stats_t;

/**
 * Counts a C-STORE the SCP refused (status: the DIMSE status it answered),
 * for the status page. Best effort: a failure is only logged.
 */
void edge_spool_count_refused(edge_spool_t *sp, unsigned status);

/** Fills st as of now_ms (unix ms). 0 or CMN_EDB. */
int edge_spool_stats(edge_spool_t *sp, int64_t now_ms, edge_spool_stats_t *st);

/*
 * The hot cache: uploaded images stay in the spool for in-hospital
 * reading, and leave along the time axis once safely in the cloud - their
 * files are deleted keep_ms after the cloud confirmed them, or earlier,
 * oldest first, while the spool's file system has less than
 * evict_below_free bytes free (never within 10 minutes of the upload).
 * Rows stay (state DONE, evicted_at set): the study's history and manifest.
 */
void edge_spool_set_cache(edge_spool_t *sp, int64_t keep_ms, uint64_t evict_below_free);

typedef struct {
    int aged;                        /* rows evicted for their age */
    int early;                       /* rows evicted early for space */
    uint64_t bytes;                  /* their files' bytes */
    bool still_short;                /* below evict_below_free with nothing left to evict */
} edge_spool_evicted_t;

/** One pass of the hot cache's policy as of now_ms (unix ms). 0 or CMN_EDB. */
int edge_spool_evict(edge_spool_t *sp, int64_t now_ms, edge_spool_evicted_t *out);

const char *edge_spool_state_name(edge_spool_state_t s);


/* ======================================================================
 * Upload groups (bundles) and study manifests - added for the upload
 * engine (issue 3 bundles); implemented in the matching block at the end
 * of spool.c. Blocking, thread-safe, like everything above.
 * ====================================================================== */

/**
 * Claims one upload group: the first due prepared PENDING row (priority,
 * then due time, then id) and, with it, either the rows it was grouped
 * with before (a bundle being resumed: same members, still PENDING and
 * prepared), or - when it is not grouped and its upload file is at most
 * small_max bytes - other due, prepared, ungrouped PENDING rows of the same
 * study and priority with files of at most small_max bytes, lowest id
 * first, up to max_count rows and max_bytes in total; a new group of two
 * or more is recorded. All are marked UPLOADING; items come back ordered
 * by id. *n = 0 when nothing is due. *next_due_ms as edge_spool_claim.
 * 0 or CMN_EDB.
 */
int edge_spool_claim_group(edge_spool_t *sp, int64_t now_ms, uint64_t small_max, int max_count,
                           uint64_t max_bytes, edge_spool_item_t *items, int *n,
                           int64_t *next_due_ms);

/** DONE for n rows in one transaction (and forgets their group). 0 or CMN_EDB. */
int edge_spool_mark_done_many(edge_spool_t *sp, const int64_t *ids, int n, uint64_t bytes_sent);

/** Forgets the group of row id (its rows are grouped afresh at the next claim). */
int edge_spool_group_dissolve(edge_spool_t *sp, int64_t id);

/** A study manifest to send: DONE rows of a study with their uploaded hashes. */
typedef struct {
    char study_uid[PROTO_UID_MAX + 1];
    char sig[48];                    /* "<done count>:<max id>": what this manifest covers */
    int n;
    proto_manifest_entry_t *e;       /* n entries; owned, edge_spool_manifest_free */
} edge_spool_manifest_t;

/**
 * Finds a study whose manifest is due: no PENDING/UPLOADING rows, no row
 * received in the last quiet_ms, and DONE rows other than the last
 * acknowledged manifest covered. out->study_uid is "" when none is due;
 * else up to max entries (by row id). 0 or CMN_EDB.
 */
int edge_spool_manifest_next(edge_spool_t *sp, int64_t quiet_ms, int max,
                             edge_spool_manifest_t *out);
/** Records that the cloud acknowledged the manifest with this sig. */
int edge_spool_manifest_sent(edge_spool_t *sp, const char *study_uid, const char *sig);
void edge_spool_manifest_free(edge_spool_manifest_t *m);

#endif /* EDGE_SPOOL_H */
