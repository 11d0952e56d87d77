/*
 * internal.h - declarations shared by the files of yunying-cloud.
 *
 * The cloud daemon is one libuv loop running the HTTP server (common/http)
 * plus the libuv threadpool, on which every route handler runs (they all
 * touch SQLite or files). Modules:
 *
 *   main.c      CLI, configuration, start/stop
 *   index.c     SQLite index: schema, connection pool, queries used by others
 *   archive.c   the local directory archive (atomic file placement)
 *   ingest.c    the signed edge upload protocol (/api/v1/objects...)
 *   auth.c      users, sessions, login/logout/me, the request guard, audit
 *   dicomweb.c  QIDO-RS, WADO-RS, WADO-URI
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
#include <sqlite3.h>

#include "cmn/conf.h"
#include "cmn/dicom.h"
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
} cloud_http_conf_t;

typedef struct {
    char *path;                  /* SQLite database file */
} cloud_index_conf_t;

typedef struct {
    char *dir;                   /* archive root directory */
} cloud_archive_conf_t;

typedef struct {
    char *staging_dir;           /* partial uploads, one directory per object */
    long long max_skew_s;        /* accepted clock difference for signed requests, s */
} cloud_ingest_conf_t;

typedef struct {
    cloud_log_conf_t log;
    cloud_http_conf_t http;
    cloud_index_conf_t index;
    cloud_archive_conf_t archive;
    cloud_ingest_conf_t ingest;
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

/* -------------------------------------------------------------------- index */

/**
 * Opens the database at path once on the calling thread, applies the
 * migrations and sets up the connection pool used by cloud_index_get().
 * 0 or CMN_EDB. Blocking.
 */
int cloud_index_init(const char *path);
/** Closes every pooled connection. Call after all handlers have finished. */
void cloud_index_shutdown(void);

/**
 * Borrows a connection for the calling thread (opened on first use). Each
 * connection is used by one thread at a time; give it back with
 * cloud_index_put(). NULL when the database cannot be opened.
 */
sqlite3 *cloud_index_get(void);
void cloud_index_put(sqlite3 *db);

/** Seconds since the epoch. */
int64_t cloud_now(void);

/** Runs BEGIN IMMEDIATE / COMMIT / ROLLBACK. 0 or CMN_EDB. */
int cloud_index_begin(sqlite3 *db);
int cloud_index_commit(sqlite3 *db);
void cloud_index_rollback(sqlite3 *db);

typedef struct {
    char sha256[65];             /* of the archived file */
    char path[1024];             /* archive path */
    uint64_t size;
} cloud_instance_ref_t;

/**
 * Looks an instance up by SOP Instance UID. 0 and *out filled, CMN_ENOTFOUND,
 * or CMN_EDB.
 */
int cloud_index_find_instance(sqlite3 *db, const char *sop_uid, cloud_instance_ref_t *out);

/**
 * Inserts (or updates) the patient, study and series rows and inserts the
 * instance row. The caller holds a transaction. 0 or CMN_EDB.
 */
int cloud_index_add_instance(sqlite3 *db, const cmn_dicom_info_t *info, const char *path,
                             uint64_t size, const char *sha256, const char *json);

/** Records a conflicting copy kept aside. The caller holds a transaction. */
int cloud_index_add_conflict(sqlite3 *db, const char *sop_uid, const char *sha256,
                             const char *path, const char *edge_id);

/** Appends an audit row (best effort, logs failures). */
void cloud_index_audit(sqlite3 *db, const char *user, const char *action,
                       const char *study_uid, const char *peer);

/** Adds an edge with a fresh secret (hex, 65 bytes incl. NUL, filled). 0, CMN_ECONFLICT, CMN_EDB. */
int cloud_index_edge_add(sqlite3 *db, const char *edge_id, char secret_hex[65]);
/** Fetches an edge's secret hex. 0, CMN_ENOTFOUND, CMN_EDB. */
int cloud_index_edge_secret(sqlite3 *db, const char *edge_id, char secret_hex[65]);

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
 * system), creating directories and fsyncing them. 0 or -errno.
 */
int cloud_archive_place(const char *src, const char *dst);
/** mkdir -p with mode 0750. 0 or -errno. */
int cloud_mkdirs(const char *path);
/** fsync a directory. 0 or -errno. */
int cloud_fsync_dir(const char *path);
/** Writes len bytes to path via a temp file + fsync + rename + dir fsync. 0 or -errno. */
int cloud_write_file_atomic(const char *path, const void *p, size_t len);

/* ------------------------------------------------------------------- ingest */

/** Handler for /api/v1/objects... (blocking route). */
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
bool cloud_auth_require(sqlite3 *db, const cmn_http_req_t *req, cmn_http_resp_t *resp,
                        cloud_user_t *user);

/** Creates or replaces a user (password hashed with PBKDF2). 0 or CMN_EDB/CMN_ECRYPTO. */
int cloud_auth_user_add(sqlite3 *db, const char *user, const char *password, const char *role);

/* ----------------------------------------------------------------- dicomweb */

/** Handler for /dicomweb/... (blocking route). */
void cloud_dicomweb_handle(const cmn_http_req_t *req, cmn_http_resp_t *resp);
/** Handler for /wado (WADO-URI, blocking route). */
void cloud_wado_uri_handle(const cmn_http_req_t *req, cmn_http_resp_t *resp);

/* ------------------------------------------------------------------- static */

/** Handler for everything else: files under http.web_root (blocking route). */
void cloud_static_handle(const cmn_http_req_t *req, cmn_http_resp_t *resp);

/* ------------------------------------------------------------------ respond */

/** Writes {"v":1,"error":code,"message":msg} with status. */
void cloud_resp_error(cmn_http_resp_t *resp, int status, const char *code, const char *msg);
/** Writes a JSON body (takes ownership of the malloc'd text, NULL = 500). */
void cloud_resp_json_take(cmn_http_resp_t *resp, int status, const char *content_type,
                          char *json);

#endif /* CLOUD_INTERNAL_H */
