/*
 * internal.h - declarations shared by the files of yunying-cloud.
 *
 * The cloud daemon is one libuv loop running the HTTP server (common/http)
 * plus the libuv threadpool, on which every route handler runs (they all
 * touch SQLite or files). Modules:
 *
 *   main.c      CLI, configuration, start/stop
 *   index.c     the index (SQLite or PostgreSQL through cmn/sql.h): schema,
 *               connection pool, queries used by others
 *   archive.c   the local directory archive (atomic file placement)
 *   ingest.c    the signed edge upload protocol (/api/v1/token, /api/v1/objects...)
 *   staging.c   chunks of uploads in progress: staging_dir (dir) or the bucket (s3)
 *   auth.c      users, sessions, login/logout/me, the request guard, audit
 *   dicomweb.c  QIDO-RS, WADO-RS, WADO-URI
 *   stow.c      STOW-RS; cloud_store_place() (archive + index one instance)
 *   transcode.cc DCMTK shim for DICOMweb (transfer syntaxes, frames, dictionary)
 *   static.c    the web bundle (http.web_root) with SPA fallback
 *   respond.c   small response helpers (JSON errors, JSON bodies)
 *
 * No state lives in process memory beyond configuration and the connection
 * pool: uploads, sessions and nonces are rows in the index, so several cloud
 * processes could share one database.
 */
#ifndef CLOUD_INTERNAL_H
#define CLOUD_INTERNAL_H

#include <stdbool.h>
#include <stdint.h>
#include "cmn/sql.h"
#include <uv.h>

#include "cmn/conf.h"
#include "cmn/dicom.h"
#include "cmn/fs.h"
#include "cmn/http.h"

/* ------------------------------------------------------------ configuration */

typedef struct {
    char *level;                 /* "error" | "warn" | "info" | "debug" */
} cloud_log_conf_t;

typedef struct {
    char *bind;                  /* listen address */
    long long port;              /* 0 = any free port (printed on the ready line) */
    char *web_root;              /* directory of the built web bundle */
    long long max_body_mb;       /* cap on one request body (chunk uploads), MiB */
    char *tls_cert_file;         /* PEM certificate chain; "" = plain HTTP */
    char *tls_key_file;          /* its private key (PEM) */
    char *tls_client_ca_file;    /* "" = no client certificates; else required (mutual TLS) */
    char *trusted_proxies;       /* CIDR list of reverse proxies whose X-Forwarded-For is believed */
} cloud_http_conf_t;

typedef struct {
    char *path;                  /* SQLite database file (used when url is "") */
    char *url;                   /* "postgresql://...": PostgreSQL instead of SQLite */
} cloud_index_conf_t;

typedef struct {
    char *dir;                   /* archive root; with backend "s3" the local read-through cache */
    char *backend;               /* "dir" (default) or "s3" */
    char *s3_endpoint;           /* http(s)://host[:port][/path] */
    char *s3_region;             /* SigV4 region */
    char *s3_bucket;
    char *s3_access_key;
    char *s3_secret_file;        /* file holding the secret key */
    bool s3_path_style;          /* true: ENDPOINT/BUCKET/KEY; false: BUCKET.HOST/KEY */
    char *s3_prefix;             /* prefix of every object key ("" = none) */
    long long cache_max_mb;      /* s3: cap on the local cache, MiB; 0 = none */
    long long cache_min_age_s;   /* s3: files used more recently are never evicted, s */
} cloud_archive_conf_t;

typedef struct {
    char *staging_dir;           /* partial uploads, one directory per object */
    long long max_skew_s;        /* accepted clock difference for signed requests, s */
    long long token_ttl_s;       /* lifetime of an issued edge token, s */
    long long abandon_after_h;   /* open uploads older than this are removed; 0 = never */
} cloud_ingest_conf_t;

typedef struct {
    long long min_days;          /* a study stays at least this long (>= 1095) */
    long long delete_after_days; /* policy: studies older than this may be deleted; 0 = never */
} cloud_retention_conf_t;

typedef struct {
    long long interval_h;        /* daemon scrub period, hours; 0 = off */
    long long rate_mb_s;         /* read rate cap of a scrub, MiB/s; 0 = unlimited */
} cloud_scrub_conf_t;

typedef struct {
    cloud_log_conf_t log;
    cloud_http_conf_t http;
    cloud_index_conf_t index;
    cloud_archive_conf_t archive;
    cloud_ingest_conf_t ingest;
    cloud_retention_conf_t retention;
    cloud_scrub_conf_t scrub;
} cloud_conf_t;

/** The loaded configuration; read-only once the server runs. Owned by main.c. */
extern const cloud_conf_t *cloud_conf;

/* Per-module option tables (each module owns its section). */
extern const cmn_conf_opt_t cloud__index_opts[];
extern const size_t cloud__index_nopts;
extern const cmn_conf_opt_t cloud__archive_opts[];
extern const size_t cloud__archive_nopts;
extern const cmn_conf_opt_t cloud__ingest_opts[];
extern const size_t cloud__ingest_nopts;
extern const cmn_conf_opt_t cloud__retention_opts[];
extern const size_t cloud__retention_nopts;
extern const cmn_conf_opt_t cloud__scrub_opts[];
extern const size_t cloud__scrub_nopts;

/* -------------------------------------------------------------------- index */

/** The database the configuration names: index.url if set, else index.path. */
const char *cloud_index_target(const cloud_index_conf_t *c);

/**
 * Opens the database target (a SQLite file or a PostgreSQL URI, see
 * cmn/sql.h) once on the calling thread, applies the migrations and sets up
 * the connection pool used by cloud_index_get(). 0 or CMN_EDB. Blocking.
 */
int cloud_index_init(const char *target);
/** Closes every pooled connection. Call after all handlers have finished. */
void cloud_index_shutdown(void);

/**
 * Borrows a connection for the calling thread (opened on first use). Each
 * connection is used by one thread at a time; give it back with
 * cloud_index_put(). NULL when the database cannot be opened.
 */
cmn_sql_t *cloud_index_get(void);
void cloud_index_put(cmn_sql_t *db);

/** Seconds since the epoch. */
int64_t cloud_now(void);

/** Runs BEGIN IMMEDIATE / COMMIT / ROLLBACK. 0 or CMN_EDB. */
int cloud_index_begin(cmn_sql_t *db);
int cloud_index_commit(cmn_sql_t *db);
void cloud_index_rollback(cmn_sql_t *db);

typedef struct {
    char sha256[65];             /* of the archived file */
    char path[1024];             /* archive path */
    uint64_t size;
} cloud_instance_ref_t;

/**
 * Looks an instance up by SOP Instance UID. 0 and *out filled, CMN_ENOTFOUND,
 * or CMN_EDB.
 */
int cloud_index_find_instance(cmn_sql_t *db, const char *sop_uid, cloud_instance_ref_t *out);

/**
 * Inserts (or updates) the patient, study and series rows and inserts the
 * instance row. The caller holds a transaction. 0 or CMN_EDB.
 */
int cloud_index_add_instance(cmn_sql_t *db, const cmn_dicom_info_t *info, const char *path,
                             uint64_t size, const char *sha256, const char *json);

/** Records a conflicting copy kept aside. The caller holds a transaction. */
int cloud_index_add_conflict(cmn_sql_t *db, const char *sop_uid, const char *sha256,
                             const char *path, const char *edge_id);

/** Records who sent an instance (edge id, "stow:<user>"): the storage report's hospital. */
int cloud_index_set_source(cmn_sql_t *db, const char *sop_uid, const char *source);

/** Appends an audit row (best effort, logs failures). */
void cloud_index_audit(cmn_sql_t *db, const char *user, const char *action,
                       const char *study_uid, const char *peer);
/**
 * Audits one access to patient data outside a transaction: returns once the
 * row is committed, sharing the commit with concurrent callers (group
 * commit; flushed to disk at most once a second, see index.c).
 */
void cloud_index_audit_commit(cmn_sql_t *db, const char *user, const char *action,
                              const char *study, const char *peer);

/**
 * Adds an edge with a fresh secret (hex, 65 bytes incl. NUL, filled) and an
 * address allow list (CIDR list, "" = any; validated by the caller).
 * 0, CMN_ECONFLICT, CMN_EDB.
 */
int cloud_index_edge_add(cmn_sql_t *db, const char *edge_id, const char *allow,
                         char secret_hex[65]);

/** An edge row. allow is malloc'd; release with cloud_edge_clear(). */
typedef struct {
    char secret_hex[65];
    bool enabled;
    char *allow;                 /* CIDR list, "" = any address */
} cloud_edge_t;

/** Looks an edge up (enabled or not). 0, CMN_ENOTFOUND, CMN_EDB. */
int cloud_index_edge_get(cmn_sql_t *db, const char *edge_id, cloud_edge_t *out);
/** Frees and wipes an edge row. Safe on a zeroed or cleared row. */
void cloud_edge_clear(cloud_edge_t *e);
/**
 * Enables or disables an edge; disabling also revokes its tokens (*revoked
 * = how many, may be NULL). 0, CMN_ENOTFOUND, CMN_EDB.
 */
int cloud_index_edge_set_enabled(cmn_sql_t *db, const char *edge_id, bool enabled, int *revoked);
/** Replaces an edge's allow list. 0, CMN_ENOTFOUND, CMN_EDB. */
int cloud_index_edge_set_allow(cmn_sql_t *db, const char *edge_id, const char *allow);

/** A token row. */
typedef struct {
    char edge_id[65];
    char key_hex[65];
    int64_t expires;             /* unix seconds */
    bool revoked;
} cloud_token_t;

/** Stores a newly issued token. 0 or CMN_EDB. */
int cloud_index_token_add(cmn_sql_t *db, const char *edge_id, const char *token_id,
                          const char *key_hex, int64_t expires);
/** Looks a token up. 0, CMN_ENOTFOUND, CMN_EDB. */
int cloud_index_token_get(cmn_sql_t *db, const char *token_id, cloud_token_t *out);
/** Revokes every live token of an edge (*n = how many). 0, CMN_ENOTFOUND, CMN_EDB. */
int cloud_index_tokens_revoke(cmn_sql_t *db, const char *edge_id, int *n);
/** Deletes tokens that expired before `before` (best effort). */
void cloud_index_tokens_cleanup(cmn_sql_t *db, int64_t before);

/* ------------------------------------------------------------------ archive */

/**
 * Archive path for an instance (dir/ab/<study>/<series>/<sop>.dcm, each part
 * a hash of its UID so any UID is a safe file name). out: PATH_MAX bytes.
 */
int cloud_archive_path(const char *study_uid, const char *series_uid, const char *sop_uid,
                       char *out, size_t outlen);
/** Path for a conflicting copy: dir/conflicts/<sop hash>/<sha256>.dcm. */
int cloud_archive_conflict_path(const char *sop_uid, const char *sha256, char *out,
                                size_t outlen);
/**
 * Moves the fully written and fsync'd file src into place at dst (same file
 * system), creating directories and fsyncing them. With backend "s3" the
 * file is first uploaded (PUT verified by its SHA-256) under the key dst
 * relative to archive.dir, then kept at dst as cache. 0, -errno or a cmn
 * S3 error (src is left in place on error).
 */
int cloud_archive_place(const char *src, const char *dst);
/**
 * Defers the directory fsync of each placement on this thread until
 * cloud_archive_flush_dir_sync(), which syncs every directory touched once
 * (a bundle's members share their series directory). Flush before the index
 * commit that names the files. Flush returns 0 or -errno.
 */
void cloud_archive_defer_dir_sync(void);
int cloud_archive_flush_dir_sync(void);
/**
 * cloud_archive_place() with the file's known SHA-256 (hex), which the S3
 * PUT then carries instead of hashing the file again. NULL = compute it.
 */
int cloud_archive_place_sha(const char *src, const char *dst, const char *sha256_hex);
/**
 * Validates the archive configuration and, for "s3", creates the client
 * (otherwise done lazily on first use). 0 or CMN_ECONFIG (logged). Call once
 * at start for fail-fast configuration errors.
 */
int cloud_archive_open(void);
/**
 * Backend "s3": one listing request under the key prefix, which proves that
 * endpoint, credentials and bucket work. 0 (also for "dir") or the S3 error
 * (logged). Blocking.
 */
int cloud_archive_probe(void);
/** Releases the S3 client. Call after all handlers have finished. */
void cloud_archive_shutdown(void);
/** True when archive.backend is "s3". */
bool cloud_archive_is_s3(void);
/**
 * Makes sure the archive file at path (from cloud_archive_path or the index)
 * is present locally: a no-op for "dir"; for "s3" a missing file is
 * downloaded into the cache atomically. 0, CMN_ENOTFOUND, -errno, or a cmn
 * S3 error. Blocking: threadpool only.
 */
int cloud_archive_fetch(const char *path);
/**
 * Reads len bytes at off of the archive file at path (frames): from the
 * local file when present, else (s3) with a ranged GET, without caching.
 * *got < len only at the end. 0, -ERANGE past the end, CMN_ENOTFOUND, -errno.
 */
int cloud_archive_read_range(const char *path, uint64_t off, size_t len, void *buf,
                             size_t *got);
/** True when the archive file at path is on the local disk (dir archive, or cached). */
bool cloud_archive_is_local(const char *path);
/** The S3 object key of an archive path (s3_prefix + path below archive.dir). 0 or -errno. */
int cloud_archive_key(const char *path, char *out, size_t outlen);
/**
 * SHA-256 (hex) and size of the archived bytes at path: the local file
 * (remote false), or the S3 object read with ranged GETs (remote true,
 * backend s3 only). 0, CMN_ENOTFOUND, -errno or an S3 error. Blocking.
 */
int cloud_archive_hash(const char *path, bool remote, char hex[65], uint64_t *size);
/**
 * Deletes an archived file: the S3 object (backend s3; a missing one is
 * fine) and the local file or cached copy, then empty parent directories.
 * 0, -EINVAL (path not under archive.dir), -errno or an S3 error.
 */
int cloud_archive_delete(const char *path);
/** Backend s3 with a cache cap: runs one eviction pass now (tests, scrub). */
int cloud_archive_cache_trim(void);
/**
 * The archive's shared S3 client (created on first use; owned by archive.c,
 * never destroyed by the caller): 0 with *out set for backend "s3", 0 with
 * *out NULL for "dir", CMN_ECONFIG. staging.c keeps upload chunks with it.
 */
struct cmn_s3;
int cloud__archive_s3(struct cmn_s3 **out);
/** archive.s3_prefix, "" when unset (static storage). */
const char *cloud__archive_prefix(void);
/**
 * Writes len bytes to path via a uniquely named temp file (mkstemp) + fsync
 * + rename + dir fsync. 0 or -errno.
 */
int cloud_write_file_atomic(const char *path, const void *p, size_t len);

/* ------------------------------------------------------------------- ingest */

/** Handler for /api/v1/token and /api/v1/objects... (blocking route). */
void cloud_ingest_handle(const cmn_http_req_t *req, cmn_http_resp_t *resp);

/* --------------------------------------------------------------------- auth */

#define CLOUD_USER_MAX 64

typedef struct {
    char username[CLOUD_USER_MAX + 1];
    char role[16];
} cloud_user_t;

/** Handler for /api/v1/login, /logout, /me (blocking route). */
void cloud_auth_handle(const cmn_http_req_t *req, cmn_http_resp_t *resp);

/**
 * Checks the session of a request (cookie yy_session or Authorization:
 * Bearer). true and *user filled, or false with a 401 written to resp.
 */
bool cloud_auth_require(cmn_sql_t *db, const cmn_http_req_t *req, cmn_http_resp_t *resp,
                        cloud_user_t *user);

/** Creates or replaces a user (password hashed with PBKDF2). 0 or CMN_EDB/CMN_ECRYPTO. */
int cloud_auth_user_add(cmn_sql_t *db, const char *user, const char *password, const char *role);

/* ----------------------------------------------------------------- dicomweb */

/** Handler for /dicomweb/... (blocking route). */
void cloud_dicomweb_handle(const cmn_http_req_t *req, cmn_http_resp_t *resp);
/** Handler for /wado (WADO-URI, blocking route). */
void cloud_wado_uri_handle(const cmn_http_req_t *req, cmn_http_resp_t *resp);
/** "http[s]://<Host>/dicomweb" for Retrieve URLs ("/dicomweb" without a usable Host). */
void cloud__dicomweb_base_url(const cmn_http_req_t *req, char *out, size_t outlen);

/* --------------------------------------------------------------------- stow */

/** Largest STOW-RS request body (streamed to a temporary file), bytes. */
#define CLOUD_STOW_MAX_BODY ((size_t)4 << 30)

/** Handler for POST /dicomweb/studies[/{study}] (STOW-RS, blocking route). */
void cloud_stow_handle(const cmn_http_req_t *req, cmn_http_resp_t *resp);

/** What cloud_store_place() did with an instance. */
typedef enum {
    CLOUD_STORE_STORED,          /* new: archived and indexed */
    CLOUD_STORE_DUPLICATE,       /* same SOP Instance UID and same bytes: kept once */
    CLOUD_STORE_CONFLICT,        /* same SOP Instance UID, other bytes: kept aside */
} cloud_store_result_t;

/**
 * Archives and indexes one verified instance: tmp is the fsync'd file (on the
 * archive's file system; moved into place or unlinked), sha256/size describe
 * it, info and json come from cmn_dicom_read_info / cmn_dicom_to_json, source
 * names the sender for conflicts (edge id, "stow:<user>"). The caller holds
 * the index write transaction (cloud_index_begin) and commits it, or rolls
 * back on error. Shared by STOW-RS and (can be by) the edge ingest commit.
 * 0 with *result set, or CMN_EDB / -errno (tmp is left for the caller).
 */
int cloud_store_place(cmn_sql_t *db, const char *tmp, const cmn_dicom_info_t *info,
                      const char *sha256, uint64_t size, const char *json, const char *source,
                      cloud_store_result_t *result);

/* ------------------------------------------------- retention, scrub, report */

/**
 * yunying-cloud retention-plan / retention-apply (retention.c): lists the
 * studies the configured policy allows deleting, or (apply, confirm true)
 * deletes them: archive objects, then index rows, each with an audit row.
 * json: machine-readable output. Returns the process exit code.
 */
int cloud_retention_cmd(bool apply, bool confirm, bool json, long long limit);

/** yunying-cloud storage-report (retention.c). Returns the process exit code. */
int cloud_storage_report_cmd(bool json);

/**
 * yunying-cloud scrub (scrub.c): re-hashes up to limit (0 = all) archived
 * instances against the index. Exit code 0 when everything matched, 1 when
 * something is missing or differs, 2 on an operational error.
 */
int cloud_scrub_cmd(long long limit, bool json);

/**
 * Starts the periodic scrub of the daemon (scrub.interval_h > 0) on loop:
 * a timer checks the scrub_runs table, and one node claims a due run and
 * does it on the threadpool. No-op when scrub.interval_h is 0.
 */
int cloud_scrub_daemon_start(uv_loop_t *loop);
/** Stops the timer and asks a running scrub to finish early (its work item then completes). */
void cloud_scrub_daemon_stop(void);

/* ------------------------------------------------------------------- static */

/** Handler for everything else: files under http.web_root (blocking route). */
void cloud_static_handle(const cmn_http_req_t *req, cmn_http_resp_t *resp);

/* ------------------------------------------------------------------ respond */

/** Writes {"v":1,"error":code,"message":msg} with status. */
void cloud_resp_error(cmn_http_resp_t *resp, int status, const char *code, const char *msg);
/** Writes a JSON body (takes ownership of the malloc'd text, NULL = 500). */
void cloud_resp_json_take(cmn_http_resp_t *resp, int status, const char *content_type,
                          char *json);

/* -------------------------------------------------------------- annotations */

/** Handler for /api/v1/studies/{uid}/annotations (viewer annotations, blocking route). */
void cloud_annotations_handle(const cmn_http_req_t *req, cmn_http_resp_t *resp);

/**
 * Removes up to max uploads still open after older_than_s seconds (rows and
 * staged chunks); *removed says how many. 0 or CMN_EDB. Blocking.
 */
int cloud_ingest_gc(cmn_sql_t *db, int64_t older_than_s, int max, int *removed);

#endif /* CLOUD_INTERNAL_H */
