/*
 * index.c - the cloud's SQLite index (embedded default; PostgreSQL later).
 *
 * Tables:
 *   patients   one row per Patient ID (issuer not modelled yet)
 *   studies    study attributes; ModalitiesInStudy is derived from series
 *   series     series attributes
 *   instances  instance attributes, archive file (path, size, sha256), the
 *              native pixel data byte range and the instance's DICOM JSON
 *              (PS3.18 F) so series metadata is a concatenation of rows
 *   conflicts  same SOP Instance UID with different bytes, kept aside
 *   edges      edge identities, their secrets (stored plainly for now;
 *              encryption at rest is a later issue), enabled flag and
 *              address allow list (CIDR blocks, '' = any address)
 *   tokens     short-lived signing keys issued to edges (the key is kept:
 *              the cloud needs it to verify HMACs; same TODO as secrets),
 *              expiry and revocation checked on every request
 *   nonces     (edge, nonce) seen within the skew window: replay protection
 *   uploads    one row per declared object; chunks: the chunks held
 *   users, sessions (hash of the token only), audit (append-only)
 *
 * Connections: SQLite connections are not shared between threads at the
 * same time. A small pool hands a connection to one handler thread at a time;
 * each is opened on first use and closed at shutdown.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "cmn/crypto.h"
#include "cmn/db.h"
#include "cmn/errors.h"
#include "cmn/log.h"
#include "internal.h"

const cmn_conf_opt_t cloud__index_opts[] = {
    CMN_CONF_OPT_STR(cloud_index_conf_t, path, "var/cloud/index.db",
                     "SQLite index database file (created if missing)"),
};
const size_t cloud__index_nopts = CMN_ARRAY_SIZE(cloud__index_opts);

static const char *const migrations[] = {
    /* 1: initial schema */
    "CREATE TABLE patients ("
    "  pk INTEGER PRIMARY KEY,"
    "  patient_id TEXT NOT NULL UNIQUE,"
    "  name TEXT NOT NULL DEFAULT '',"
    "  birth_date TEXT NOT NULL DEFAULT '',"
    "  sex TEXT NOT NULL DEFAULT '');"
    "CREATE INDEX patients_name ON patients(name COLLATE NOCASE);"
    "CREATE TABLE studies ("
    "  study_uid TEXT PRIMARY KEY,"
    "  patient_pk INTEGER NOT NULL REFERENCES patients(pk),"
    "  study_date TEXT NOT NULL DEFAULT '',"
    "  study_time TEXT NOT NULL DEFAULT '',"
    "  accession TEXT NOT NULL DEFAULT '',"
    "  study_id TEXT NOT NULL DEFAULT '',"
    "  description TEXT NOT NULL DEFAULT '',"
    "  referring TEXT NOT NULL DEFAULT '',"
    "  created INTEGER NOT NULL);"
    "CREATE INDEX studies_patient ON studies(patient_pk);"
    "CREATE INDEX studies_date ON studies(study_date);"
    "CREATE INDEX studies_accession ON studies(accession);"
    "CREATE TABLE series ("
    "  series_uid TEXT PRIMARY KEY,"
    "  study_uid TEXT NOT NULL REFERENCES studies(study_uid),"
    "  modality TEXT NOT NULL DEFAULT '',"
    "  series_number INTEGER,"
    "  description TEXT NOT NULL DEFAULT '',"
    "  body_part TEXT NOT NULL DEFAULT '');"
    "CREATE INDEX series_study ON series(study_uid);"
    "CREATE INDEX series_modality ON series(modality);"
    "CREATE TABLE instances ("
    "  sop_uid TEXT PRIMARY KEY,"
    "  series_uid TEXT NOT NULL REFERENCES series(series_uid),"
    "  study_uid TEXT NOT NULL,"
    "  sop_class_uid TEXT NOT NULL DEFAULT '',"
    "  instance_number INTEGER,"
    "  transfer_syntax TEXT NOT NULL DEFAULT '',"
    "  rows INTEGER, columns INTEGER, frames INTEGER,"
    "  bits_allocated INTEGER, samples_per_pixel INTEGER,"
    "  path TEXT NOT NULL,"
    "  size INTEGER NOT NULL,"
    "  sha256 TEXT NOT NULL,"
    "  pixel_offset INTEGER NOT NULL DEFAULT 0,"
    "  pixel_length INTEGER NOT NULL DEFAULT 0,"
    "  json TEXT NOT NULL,"
    "  created INTEGER NOT NULL);"
    "CREATE INDEX instances_series ON instances(series_uid, instance_number);"
    "CREATE INDEX instances_study ON instances(study_uid);"
    "CREATE TABLE conflicts ("
    "  id INTEGER PRIMARY KEY,"
    "  sop_uid TEXT NOT NULL,"
    "  sha256 TEXT NOT NULL,"
    "  path TEXT NOT NULL,"
    "  edge_id TEXT NOT NULL,"
    "  created INTEGER NOT NULL,"
    "  UNIQUE(sop_uid, sha256));"
    "CREATE TABLE edges ("
    "  id TEXT PRIMARY KEY,"
    "  secret TEXT NOT NULL,"        /* hex; TODO: encrypt at rest */
    "  enabled INTEGER NOT NULL DEFAULT 1,"
    "  created INTEGER NOT NULL);"
    "CREATE TABLE nonces ("
    "  edge_id TEXT NOT NULL,"
    "  nonce TEXT NOT NULL,"
    "  ts INTEGER NOT NULL,"
    "  PRIMARY KEY(edge_id, nonce)) WITHOUT ROWID;"
    "CREATE INDEX nonces_ts ON nonces(ts);"
    "CREATE TABLE uploads ("
    "  object_id TEXT PRIMARY KEY,"
    "  edge_id TEXT NOT NULL,"
    "  decl TEXT NOT NULL,"
    "  sha256 TEXT NOT NULL,"
    "  size INTEGER NOT NULL,"
    "  chunk_size INTEGER NOT NULL,"
    "  nchunks INTEGER NOT NULL,"
    "  state TEXT NOT NULL,"          /* open | committed | rejected */
    "  result TEXT,"                  /* stored | duplicate | conflict */
    "  sop_uid TEXT NOT NULL,"
    "  created INTEGER NOT NULL,"
    "  updated INTEGER NOT NULL);"
    "CREATE TABLE chunks ("
    "  object_id TEXT NOT NULL REFERENCES uploads(object_id) ON DELETE CASCADE,"
    "  idx INTEGER NOT NULL,"
    "  sha256 TEXT NOT NULL,"
    "  PRIMARY KEY(object_id, idx)) WITHOUT ROWID;"
    "CREATE TABLE users ("
    "  username TEXT PRIMARY KEY,"
    "  pwhash TEXT NOT NULL,"
    "  role TEXT NOT NULL,"
    "  created INTEGER NOT NULL);"
    "CREATE TABLE sessions ("
    "  token_hash TEXT PRIMARY KEY,"
    "  username TEXT NOT NULL REFERENCES users(username) ON DELETE CASCADE,"
    "  created INTEGER NOT NULL,"
    "  expires INTEGER NOT NULL);"
    "CREATE INDEX sessions_expires ON sessions(expires);"
    "CREATE TABLE audit ("
    "  id INTEGER PRIMARY KEY,"
    "  ts INTEGER NOT NULL,"
    "  username TEXT NOT NULL,"
    "  action TEXT NOT NULL,"
    "  study_uid TEXT NOT NULL DEFAULT '',"
    "  peer TEXT NOT NULL DEFAULT '');"
    "CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit"
    "  BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;"
    "CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit"
    "  BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;",

    /* 2: dynamic tokens and per-edge address allow lists (issue 3) */
    "ALTER TABLE edges ADD COLUMN allow TEXT NOT NULL DEFAULT '';"  /* CIDR list, '' = any */
    "CREATE TABLE tokens ("
    "  token_id TEXT PRIMARY KEY,"
    "  edge_id TEXT NOT NULL REFERENCES edges(id) ON DELETE CASCADE,"
    "  key TEXT NOT NULL,"            /* hex HMAC key; TODO: encrypt at rest with the secrets */
    "  created INTEGER NOT NULL,"
    "  expires INTEGER NOT NULL,"
    "  revoked INTEGER NOT NULL DEFAULT 0);"
    "CREATE INDEX tokens_edge ON tokens(edge_id);"
    "CREATE INDEX tokens_expires ON tokens(expires);",

    /* 3: SeriesDate/SeriesTime for QIDO, filled from each instance's DICOM JSON by a
     * trigger (so the insert path stays as it is) and back-filled once here. */
    "ALTER TABLE series ADD COLUMN series_date TEXT NOT NULL DEFAULT '';"
    "ALTER TABLE series ADD COLUMN series_time TEXT NOT NULL DEFAULT '';"
    "UPDATE series SET"
    "  series_date = coalesce((SELECT json_extract(i.json, '$.\"00080021\".Value[0]')"
    "    FROM instances i WHERE i.series_uid = series.series_uid LIMIT 1), ''),"
    "  series_time = coalesce((SELECT json_extract(i.json, '$.\"00080031\".Value[0]')"
    "    FROM instances i WHERE i.series_uid = series.series_uid LIMIT 1), '');"
    "CREATE TRIGGER instances_series_dt AFTER INSERT ON instances BEGIN"
    "  UPDATE series SET"
    "    series_date = coalesce(json_extract(NEW.json, '$.\"00080021\".Value[0]'), ''),"
    "    series_time = coalesce(json_extract(NEW.json, '$.\"00080031\".Value[0]'), '')"
    "  WHERE series_uid = NEW.series_uid; END;",

    /* 4: the viewer's annotations, one JSON document per user and study (issue 5) */
    "CREATE TABLE annotations ("
    "  username TEXT NOT NULL REFERENCES users(username) ON DELETE CASCADE,"
    "  study_uid TEXT NOT NULL,"
    "  doc TEXT NOT NULL,"
    "  updated INTEGER NOT NULL,"
    "  PRIMARY KEY(username, study_uid));",

    /* 5: bundles (several instances per upload object) and study manifests (issue 3) */
    "ALTER TABLE uploads ADD COLUMN kind TEXT NOT NULL DEFAULT 'instance';"  /* instance | bundle */
    "ALTER TABLE uploads ADD COLUMN members TEXT;"   /* a committed bundle's answer (JSON) */
    "CREATE TABLE manifests ("
    "  study_uid TEXT PRIMARY KEY,"
    "  edge_id TEXT NOT NULL,"
    "  expected INTEGER NOT NULL,"
    "  received INTEGER NOT NULL);"                    /* unix seconds */
    "CREATE TABLE manifest_entries ("
    "  study_uid TEXT NOT NULL,"
    "  sop_uid TEXT NOT NULL,"
    "  series_uid TEXT NOT NULL,"
    "  sha256 TEXT NOT NULL,"
    "  PRIMARY KEY(study_uid, sop_uid)) WITHOUT ROWID;",

    /* 6: retention, scrub and storage report (issue 4, R-1.10). instances.source
     * names who sent an instance (edge id, "stow:<user>"): the storage report's
     * hospital. Filled by cloud_index_set_source() and, for single-instance edge
     * uploads, by a trigger when the upload commits as "stored"; back-filled here. */
    "ALTER TABLE instances ADD COLUMN source TEXT NOT NULL DEFAULT '';"
    "UPDATE instances SET source = coalesce((SELECT u.edge_id FROM uploads u"
    "  WHERE u.sop_uid = instances.sop_uid AND u.state = 'committed'"
    "  AND u.result = 'stored' LIMIT 1), '');"
    "CREATE TRIGGER uploads_instance_source AFTER UPDATE OF state ON uploads"
    "  WHEN NEW.state = 'committed' AND NEW.result = 'stored' BEGIN"
    "  UPDATE instances SET source = NEW.edge_id"
    "    WHERE sop_uid = NEW.sop_uid AND source = ''; END;"
    "CREATE INDEX instances_created ON instances(created);"
    "ALTER TABLE instances ADD COLUMN scrubbed INTEGER NOT NULL DEFAULT 0;"  /* last scrub run id */
    "CREATE INDEX instances_scrubbed ON instances(scrubbed, sop_uid);"
    "CREATE TABLE scrub_runs ("
    "  id INTEGER PRIMARY KEY,"
    "  origin TEXT NOT NULL,"          /* cli | daemon */
    "  state TEXT NOT NULL,"           /* running | done | failed | stopped */
    "  started INTEGER NOT NULL,"
    "  heartbeat INTEGER NOT NULL,"    /* unix seconds, updated while running */
    "  finished INTEGER,"
    "  checked INTEGER NOT NULL DEFAULT 0,"
    "  bytes INTEGER NOT NULL DEFAULT 0,"
    "  mismatches INTEGER NOT NULL DEFAULT 0,"
    "  missing INTEGER NOT NULL DEFAULT 0,"
    "  errors INTEGER NOT NULL DEFAULT 0);"
    "CREATE INDEX scrub_runs_started ON scrub_runs(started);"
    "CREATE TABLE scrub_findings ("
    "  run_id INTEGER NOT NULL REFERENCES scrub_runs(id) ON DELETE CASCADE,"
    "  sop_uid TEXT NOT NULL,"
    "  path TEXT NOT NULL,"
    "  kind TEXT NOT NULL,"            /* mismatch | missing | error | cache-mismatch */
    "  detail TEXT NOT NULL DEFAULT '',"
    "  ts INTEGER NOT NULL);"
    "CREATE INDEX scrub_findings_run ON scrub_findings(run_id);",
};

/* ------------------------------------------------------------------- pool */

#define POOL_MAX 32

static struct {
    pthread_mutex_t lock;
    char *path;                  /* owned */
    sqlite3 *idle[POOL_MAX];     /* connections not in use */
    int nidle;
    int nopen;                   /* total opened, idle or borrowed */
} pool = { .lock = PTHREAD_MUTEX_INITIALIZER };

int64_t cloud_now(void)
{
    return (int64_t)time(NULL);
}

int cloud_index_init(const char *path)
{
    sqlite3 *db;
    int rc;

    rc = cmn_db_open(path, CMN_DB_SYNC_FULL, &db);
    if (rc < 0)
        return rc;
    rc = cmn_db_migrate(db, migrations, (int)CMN_ARRAY_SIZE(migrations));
    if (rc < 0) {
        cmn_db_close(db);
        return rc;
    }
    pthread_mutex_lock(&pool.lock);
    free(pool.path);
    pool.path = cmn_xstrdup(path);
    pool.idle[pool.nidle++] = db;
    pool.nopen++;
    pthread_mutex_unlock(&pool.lock);
    return 0;
}

void cloud_index_shutdown(void)
{
    pthread_mutex_lock(&pool.lock);
    while (pool.nidle > 0) {
        cmn_db_close(pool.idle[--pool.nidle]);
        pool.nopen--;
    }
    if (pool.nopen != 0)
        CMN_LOG_W("index", "shutdown with borrowed connections n=%d", pool.nopen);
    pool.nopen = 0;
    free(pool.path);
    pool.path = NULL;
    pthread_mutex_unlock(&pool.lock);
}

sqlite3 *cloud_index_get(void)
{
    sqlite3 *db = NULL;
    char *path;

    pthread_mutex_lock(&pool.lock);
    if (pool.nidle > 0) {
        db = pool.idle[--pool.nidle];
        pthread_mutex_unlock(&pool.lock);
        return db;
    }
    path = pool.path ? cmn_xstrdup(pool.path) : NULL;
    pthread_mutex_unlock(&pool.lock);
    if (!path)
        return NULL;
    if (cmn_db_open(path, CMN_DB_SYNC_FULL, &db) < 0)
        db = NULL;
    free(path);
    if (db) {
        pthread_mutex_lock(&pool.lock);
        pool.nopen++;
        pthread_mutex_unlock(&pool.lock);
    }
    return db;
}

void cloud_index_put(sqlite3 *db)
{
    if (!db)
        return;
    /* A handler that failed mid-transaction must not leak it to the next user. */
    if (!sqlite3_get_autocommit(db))
        cloud_index_rollback(db);
    pthread_mutex_lock(&pool.lock);
    if (pool.nidle < POOL_MAX) {
        pool.idle[pool.nidle++] = db;
        db = NULL;
    } else {
        pool.nopen--;
    }
    pthread_mutex_unlock(&pool.lock);
    if (db)
        cmn_db_close(db);
}

int cloud_index_begin(sqlite3 *db)
{
    return cmn_db_exec(db, "BEGIN IMMEDIATE");
}

int cloud_index_commit(sqlite3 *db)
{
    return cmn_db_exec(db, "COMMIT");
}

void cloud_index_rollback(sqlite3 *db)
{
    if (!sqlite3_get_autocommit(db))
        (void)cmn_db_exec(db, "ROLLBACK");
}

/* ---------------------------------------------------------------- queries */

static void bind_text(sqlite3_stmt *st, int i, const char *s)
{
    sqlite3_bind_text(st, i, s ? s : "", -1, SQLITE_TRANSIENT);
}

static void bind_opt_int(sqlite3_stmt *st, int i, int v)
{
    if (v < 0)
        sqlite3_bind_null(st, i);
    else
        sqlite3_bind_int(st, i, v);
}

static int step_done(sqlite3 *db, sqlite3_stmt *st, const char *what)
{
    int rc = sqlite3_step(st);

    if (rc != SQLITE_DONE && rc != SQLITE_ROW) {
        CMN_LOG_E("index", "%s: %s", what, sqlite3_errmsg(db));
        return CMN_EDB;
    }
    return 0;
}

int cloud_index_find_instance(sqlite3 *db, const char *sop_uid, cloud_instance_ref_t *out)
{
    sqlite3_stmt *st;
    int rc;

    if (cmn_db_prepare(db, "SELECT sha256, path, size FROM instances WHERE sop_uid = ?", &st) < 0)
        return CMN_EDB;
    bind_text(st, 1, sop_uid);
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        snprintf(out->sha256, sizeof(out->sha256), "%s", (const char *)sqlite3_column_text(st, 0));
        snprintf(out->path, sizeof(out->path), "%s", (const char *)sqlite3_column_text(st, 1));
        out->size = (uint64_t)sqlite3_column_int64(st, 2);
        rc = 0;
    } else if (rc == SQLITE_DONE) {
        rc = CMN_ENOTFOUND;
    } else {
        CMN_LOG_E("index", "find instance: %s", sqlite3_errmsg(db));
        rc = CMN_EDB;
    }
    sqlite3_finalize(st);
    return rc;
}

static int upsert_patient(sqlite3 *db, const cmn_dicom_info_t *in, sqlite3_int64 *pk)
{
    sqlite3_stmt *st;
    int rc;

    /* The latest instance's demographics win (corrections arrive later). */
    if (cmn_db_prepare(db,
                       "INSERT INTO patients(patient_id, name, birth_date, sex) VALUES(?,?,?,?)"
                       " ON CONFLICT(patient_id) DO UPDATE SET name = excluded.name,"
                       " birth_date = excluded.birth_date, sex = excluded.sex"
                       " RETURNING pk",
                       &st) < 0)
        return CMN_EDB;
    bind_text(st, 1, in->patient_id);
    bind_text(st, 2, in->patient_name);
    bind_text(st, 3, in->patient_birth_date);
    bind_text(st, 4, in->patient_sex);
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        *pk = sqlite3_column_int64(st, 0);
        rc = 0;
    } else {
        CMN_LOG_E("index", "patient upsert: %s", sqlite3_errmsg(db));
        rc = CMN_EDB;
    }
    sqlite3_finalize(st);
    return rc;
}

int cloud_index_add_instance(sqlite3 *db, const cmn_dicom_info_t *in, const char *path,
                             uint64_t size, const char *sha256, const char *json)
{
    sqlite3_stmt *st = NULL;
    sqlite3_int64 ppk;
    int rc;

    rc = upsert_patient(db, in, &ppk);
    if (rc < 0)
        return rc;

    rc = CMN_EDB;
    if (cmn_db_prepare(db,
                       "INSERT INTO studies(study_uid, patient_pk, study_date, study_time,"
                       " accession, study_id, description, referring, created)"
                       " VALUES(?,?,?,?,?,?,?,?,?) ON CONFLICT(study_uid) DO UPDATE SET"
                       " patient_pk = excluded.patient_pk, study_date = excluded.study_date,"
                       " study_time = excluded.study_time, accession = excluded.accession,"
                       " study_id = excluded.study_id, description = excluded.description,"
                       " referring = excluded.referring",
                       &st) < 0)
        return CMN_EDB;
    bind_text(st, 1, in->study_uid);
    sqlite3_bind_int64(st, 2, ppk);
    bind_text(st, 3, in->study_date);
    bind_text(st, 4, in->study_time);
    bind_text(st, 5, in->accession);
    bind_text(st, 6, in->study_id);
    bind_text(st, 7, in->study_description);
    bind_text(st, 8, in->referring_physician);
    sqlite3_bind_int64(st, 9, cloud_now());
    if (step_done(db, st, "study upsert") < 0)
        goto out;
    sqlite3_finalize(st);
    st = NULL;

    if (cmn_db_prepare(db,
                       "INSERT INTO series(series_uid, study_uid, modality, series_number,"
                       " description, body_part) VALUES(?,?,?,?,?,?)"
                       " ON CONFLICT(series_uid) DO UPDATE SET modality = excluded.modality,"
                       " series_number = excluded.series_number,"
                       " description = excluded.description, body_part = excluded.body_part",
                       &st) < 0)
        goto out;
    bind_text(st, 1, in->series_uid);
    bind_text(st, 2, in->study_uid);
    bind_text(st, 3, in->modality);
    bind_opt_int(st, 4, in->series_number);
    bind_text(st, 5, in->series_description);
    bind_text(st, 6, in->body_part);
    if (step_done(db, st, "series upsert") < 0)
        goto out;
    sqlite3_finalize(st);
    st = NULL;

    if (cmn_db_prepare(db,
                       "INSERT INTO instances(sop_uid, series_uid, study_uid, sop_class_uid,"
                       " instance_number, transfer_syntax, rows, columns, frames,"
                       " bits_allocated, samples_per_pixel, path, size, sha256,"
                       " pixel_offset, pixel_length, json, created)"
                       " VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                       &st) < 0)
        goto out;
    bind_text(st, 1, in->sop_uid);
    bind_text(st, 2, in->series_uid);
    bind_text(st, 3, in->study_uid);
    bind_text(st, 4, in->sop_class_uid);
    bind_opt_int(st, 5, in->instance_number);
    bind_text(st, 6, in->transfer_syntax);
    sqlite3_bind_int(st, 7, in->rows);
    sqlite3_bind_int(st, 8, in->columns);
    sqlite3_bind_int(st, 9, in->number_of_frames > 0 ? in->number_of_frames : 1);
    sqlite3_bind_int(st, 10, in->bits_allocated);
    sqlite3_bind_int(st, 11, in->samples_per_pixel);
    bind_text(st, 12, path);
    sqlite3_bind_int64(st, 13, (sqlite3_int64)size);
    bind_text(st, 14, sha256);
    sqlite3_bind_int64(st, 15, (sqlite3_int64)in->pixel_offset);
    sqlite3_bind_int64(st, 16, (sqlite3_int64)in->pixel_length);
    bind_text(st, 17, json);
    sqlite3_bind_int64(st, 18, cloud_now());
    if (step_done(db, st, "instance insert") < 0)
        goto out;
    rc = 0;
out:
    sqlite3_finalize(st);
    return rc;
}

int cloud_index_add_conflict(sqlite3 *db, const char *sop_uid, const char *sha256,
                             const char *path, const char *edge_id)
{
    sqlite3_stmt *st;
    int rc;

    if (cmn_db_prepare(db,
                       "INSERT OR IGNORE INTO conflicts(sop_uid, sha256, path, edge_id, created)"
                       " VALUES(?,?,?,?,?)",
                       &st) < 0)
        return CMN_EDB;
    bind_text(st, 1, sop_uid);
    bind_text(st, 2, sha256);
    bind_text(st, 3, path);
    bind_text(st, 4, edge_id);
    sqlite3_bind_int64(st, 5, cloud_now());
    rc = step_done(db, st, "conflict insert");
    sqlite3_finalize(st);
    return rc;
}

void cloud_index_audit(sqlite3 *db, const char *user, const char *action,
                       const char *study_uid, const char *peer)
{
    sqlite3_stmt *st;

    if (cmn_db_prepare(db,
                       "INSERT INTO audit(ts, username, action, study_uid, peer)"
                       " VALUES(?,?,?,?,?)",
                       &st) < 0)
        return;
    sqlite3_bind_int64(st, 1, cloud_now());
    bind_text(st, 2, user);
    bind_text(st, 3, action);
    bind_text(st, 4, study_uid);
    bind_text(st, 5, peer);
    (void)step_done(db, st, "audit insert");
    sqlite3_finalize(st);
}

int cloud_index_edge_add(sqlite3 *db, const char *edge_id, const char *allow,
                         char secret_hex[65])
{
    uint8_t secret[32];
    sqlite3_stmt *st;
    int rc;

    if (cmn_random(secret, sizeof(secret)) < 0)
        return CMN_ECRYPTO;
    cmn_hex(secret, sizeof(secret), secret_hex);
    if (cmn_db_prepare(db, "INSERT INTO edges(id, secret, allow, created) VALUES(?,?,?,?)",
                       &st) < 0)
        return CMN_EDB;
    bind_text(st, 1, edge_id);
    bind_text(st, 2, secret_hex);
    bind_text(st, 3, allow);
    sqlite3_bind_int64(st, 4, cloud_now());
    rc = sqlite3_step(st);
    if (rc == SQLITE_DONE)
        rc = 0;
    else if ((rc & 0xff) == SQLITE_CONSTRAINT)
        rc = CMN_ECONFLICT;
    else {
        CMN_LOG_E("index", "edge insert: %s", sqlite3_errmsg(db));
        rc = CMN_EDB;
    }
    sqlite3_finalize(st);
    memset(secret, 0, sizeof(secret));
    return rc;
}

int cloud_index_edge_get(sqlite3 *db, const char *edge_id, cloud_edge_t *out)
{
    sqlite3_stmt *st;
    int rc;

    memset(out, 0, sizeof(*out));
    if (cmn_db_prepare(db, "SELECT secret, enabled, allow FROM edges WHERE id = ?", &st) < 0)
        return CMN_EDB;
    bind_text(st, 1, edge_id);
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        const char *sec = (const char *)sqlite3_column_text(st, 0);
        const char *allow = (const char *)sqlite3_column_text(st, 2);
        snprintf(out->secret_hex, sizeof(out->secret_hex), "%s", sec ? sec : "");
        out->enabled = sqlite3_column_int(st, 1) != 0;
        out->allow = cmn_xstrdup(allow ? allow : "");
        rc = 0;
    } else if (rc == SQLITE_DONE) {
        rc = CMN_ENOTFOUND;
    } else {
        CMN_LOG_E("index", "edge lookup: %s", sqlite3_errmsg(db));
        rc = CMN_EDB;
    }
    sqlite3_finalize(st);
    return rc;
}

void cloud_edge_clear(cloud_edge_t *e)
{
    free(e->allow);
    memset(e, 0, sizeof(*e));
}

/* Runs an UPDATE bound to (value?, edge id); 0, CMN_ENOTFOUND, CMN_EDB. */
static int edge_update(sqlite3 *db, const char *sql, const char *text, const char *edge_id,
                       int *changed)
{
    sqlite3_stmt *st;
    int rc, i = 1;

    if (cmn_db_prepare(db, sql, &st) < 0)
        return CMN_EDB;
    if (text)
        bind_text(st, i++, text);
    bind_text(st, i, edge_id);
    rc = sqlite3_step(st);
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE) {
        CMN_LOG_E("index", "edge update: %s", sqlite3_errmsg(db));
        return CMN_EDB;
    }
    if (changed)
        *changed = sqlite3_changes(db);
    return 0;
}

static int edge_exists(sqlite3 *db, const char *edge_id)
{
    cloud_edge_t e;
    int rc = cloud_index_edge_get(db, edge_id, &e);
    cloud_edge_clear(&e);
    return rc;
}

int cloud_index_edge_set_enabled(sqlite3 *db, const char *edge_id, bool enabled, int *revoked)
{
    int rc = edge_exists(db, edge_id);

    if (revoked)
        *revoked = 0;
    if (rc < 0)
        return rc;
    if (cloud_index_begin(db) < 0)
        return CMN_EDB;
    rc = edge_update(db, enabled ? "UPDATE edges SET enabled = 1 WHERE id = ?"
                                 : "UPDATE edges SET enabled = 0 WHERE id = ?",
                     NULL, edge_id, NULL);
    if (rc == 0 && !enabled)
        rc = edge_update(db, "UPDATE tokens SET revoked = 1 WHERE edge_id = ? AND revoked = 0",
                         NULL, edge_id, revoked);
    if (rc < 0 || cloud_index_commit(db) < 0) {
        cloud_index_rollback(db);
        return CMN_EDB;
    }
    return 0;
}

int cloud_index_edge_set_allow(sqlite3 *db, const char *edge_id, const char *allow)
{
    int rc = edge_exists(db, edge_id);

    if (rc < 0)
        return rc;
    return edge_update(db, "UPDATE edges SET allow = ? WHERE id = ?", allow, edge_id, NULL);
}

/* ----------------------------------------------------------------- tokens */

int cloud_index_token_add(sqlite3 *db, const char *edge_id, const char *token_id,
                          const char *key_hex, int64_t expires)
{
    sqlite3_stmt *st;
    int rc;

    if (cmn_db_prepare(db,
                       "INSERT INTO tokens(token_id, edge_id, key, created, expires)"
                       " VALUES(?,?,?,?,?)",
                       &st) < 0)
        return CMN_EDB;
    bind_text(st, 1, token_id);
    bind_text(st, 2, edge_id);
    bind_text(st, 3, key_hex);
    sqlite3_bind_int64(st, 4, cloud_now());
    sqlite3_bind_int64(st, 5, expires);
    rc = step_done(db, st, "token insert");
    sqlite3_finalize(st);
    return rc;
}

int cloud_index_token_get(sqlite3 *db, const char *token_id, cloud_token_t *out)
{
    sqlite3_stmt *st;
    int rc;

    memset(out, 0, sizeof(*out));
    if (cmn_db_prepare(db, "SELECT edge_id, key, expires, revoked FROM tokens WHERE token_id = ?",
                       &st) < 0)
        return CMN_EDB;
    bind_text(st, 1, token_id);
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        const char *e = (const char *)sqlite3_column_text(st, 0);
        const char *k = (const char *)sqlite3_column_text(st, 1);
        snprintf(out->edge_id, sizeof(out->edge_id), "%s", e ? e : "");
        snprintf(out->key_hex, sizeof(out->key_hex), "%s", k ? k : "");
        out->expires = sqlite3_column_int64(st, 2);
        out->revoked = sqlite3_column_int(st, 3) != 0;
        rc = 0;
    } else if (rc == SQLITE_DONE) {
        rc = CMN_ENOTFOUND;
    } else {
        CMN_LOG_E("index", "token lookup: %s", sqlite3_errmsg(db));
        rc = CMN_EDB;
    }
    sqlite3_finalize(st);
    return rc;
}

int cloud_index_tokens_revoke(sqlite3 *db, const char *edge_id, int *n)
{
    int rc = edge_exists(db, edge_id);

    *n = 0;
    if (rc < 0)
        return rc;
    return edge_update(db, "UPDATE tokens SET revoked = 1 WHERE edge_id = ? AND revoked = 0",
                       NULL, edge_id, n);
}

void cloud_index_tokens_cleanup(sqlite3 *db, int64_t before)
{
    sqlite3_stmt *st;

    if (cmn_db_prepare(db, "DELETE FROM tokens WHERE expires < ?", &st) < 0)
        return;
    sqlite3_bind_int64(st, 1, before);
    (void)step_done(db, st, "token cleanup");
    sqlite3_finalize(st);
}

/* ------------------------------------------------ retention, scrub, report */

int cloud_index_set_source(sqlite3 *db, const char *sop_uid, const char *source)
{
    sqlite3_stmt *st;

    if (cmn_db_prepare(db, "UPDATE instances SET source = ? WHERE sop_uid = ?", &st) < 0)
        return CMN_EDB;
    bind_text(st, 1, source ? source : "");
    bind_text(st, 2, sop_uid);
    int rc = step_done(db, st, "instance source");
    sqlite3_finalize(st);
    return rc;
}
