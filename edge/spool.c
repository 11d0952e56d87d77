/*
 * spool.c - the edge's durable spool (see spool.h for the state diagram).
 *
 * Layout under spool.dir:
 *     spool.db          SQLite (WAL, synchronous=FULL), table instances
 *     objects/<sha256>.dcm   received files, exactly as received (content-addressed)
 *     tmp/<random>.part      files being received; removed at start
 *
 * Invariant: a row exists only for a file that was fsync'd and renamed into
 * objects/ with its directory fsync'd, so a row never points at a missing or
 * partial file unless the disk itself lost it (then the upload marks FAILED).
 *
 * One connection, guarded by sp->mu: SCP threads insert, the threadpool
 * claims and marks. Writes are short, so a single writer costs little.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <dirent.h>
#include <unistd.h>

#include "cmn/conf.h"
#include "cmn/crypto.h"
#include "cmn/db.h"
#include "cmn/errors.h"
#include "cmn/log.h"

#include "internal.h"
#include "spool.h"

/* ------------------------------------------------------------ config */

const cmn_conf_opt_t edge__spool_opts[] = {
    CMN_CONF_OPT_STR(edge_conf_spool_t, dir, "/var/lib/yunying-edge/spool",
                     "spool directory (received files and spool.db)"),
    CMN_CONF_OPT_INT(edge_conf_spool_t, min_free_mb, 1024, 0, 1LL << 30,
                     "refuse new instances with A700 when less than this many MiB are free"),
};
const size_t edge__spool_nopts = CMN_ARRAY_SIZE(edge__spool_opts);

int edge__spool_conf_check(const edge_conf_spool_t *c, char *err, size_t errlen)
{
    if (!c->dir || !c->dir[0]) {
        snprintf(err, errlen, "spool.dir: must not be empty");
        return CMN_ECONFIG;
    }
    if (strlen(c->dir) > 3000) {
        snprintf(err, errlen, "spool.dir: path too long");
        return CMN_ECONFIG;
    }
    return 0;
}

/* ------------------------------------------------------------ spool */

struct edge_spool {
    char dir[PATH_MAX];              /* absolute spool directory */
    uint64_t min_free_bytes;
    sqlite3 *db;                     /* owned; guarded by mu */
    pthread_mutex_t mu;
};

static const char *const migrations[] = {
    "CREATE TABLE instances ("
    "  id INTEGER PRIMARY KEY AUTOINCREMENT,"
    "  sop_uid TEXT NOT NULL,"
    "  study_uid TEXT NOT NULL,"
    "  series_uid TEXT NOT NULL,"
    "  sha256 TEXT NOT NULL,"
    "  size INTEGER NOT NULL,"
    "  path TEXT NOT NULL,"
    "  state TEXT NOT NULL DEFAULT 'PENDING'"
    "    CHECK (state IN ('PENDING','UPLOADING','DONE','FAILED')),"
    "  attempts INTEGER NOT NULL DEFAULT 0,"
    "  next_attempt_at INTEGER NOT NULL DEFAULT 0,"   /* unix ms */
    "  created_at INTEGER NOT NULL,"                  /* unix ms */
    "  updated_at INTEGER NOT NULL,"                  /* unix ms */
    "  last_error TEXT"
    ");"
    "CREATE INDEX instances_due ON instances(state, next_attempt_at, id);"
    "CREATE INDEX instances_sop ON instances(sop_uid);",
};

const char *edge_spool_state_name(edge_spool_state_t s)
{
    switch (s) {
    case EDGE_SPOOL_PENDING: return "PENDING";
    case EDGE_SPOOL_UPLOADING: return "UPLOADING";
    case EDGE_SPOOL_DONE: return "DONE";
    case EDGE_SPOOL_FAILED: return "FAILED";
    }
    return "?";
}

static int mkdir_p(const char *path)
{
    char tmp[PATH_MAX];
    size_t n = strlen(path);

    if (n == 0 || n >= sizeof(tmp))
        return -ENAMETOOLONG;
    memcpy(tmp, path, n + 1);
    for (char *p = tmp + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(tmp, 0750) < 0 && errno != EEXIST)
            return -errno;
        *p = '/';
    }
    if (mkdir(tmp, 0750) < 0 && errno != EEXIST)
        return -errno;
    return 0;
}

static int fsync_dir(const char *path)
{
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    int rc = 0;

    if (fd < 0)
        return -errno;
    if (fsync(fd) < 0)
        rc = -errno;
    close(fd);
    return rc;
}

static void clean_tmp(const char *tmpdir)
{
    DIR *d = opendir(tmpdir);
    struct dirent *e;
    char path[PATH_MAX];
    int removed = 0;

    if (!d)
        return;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        if (snprintf(path, sizeof(path), "%s/%s", tmpdir, e->d_name) >= (int)sizeof(path))
            continue;
        if (unlink(path) == 0)
            removed++;
    }
    closedir(d);
    if (removed)
        CMN_LOG_I("spool", "removed %d partial file(s) left in %s", removed, tmpdir);
}

int edge_spool_open(const char *dir, uint64_t min_free_bytes, edge_spool_t **out)
{
    edge_spool_t *sp;
    char path[PATH_MAX + 32];
    int rc;

    *out = NULL;
    rc = mkdir_p(dir);
    if (rc < 0) {
        CMN_LOG_E("spool", "cannot create dir=%s: %s", dir, cmn_strerror(rc));
        return rc;
    }
    sp = cmn_xcalloc(1, sizeof(*sp));
    if (!realpath(dir, sp->dir)) {
        rc = -errno;
        goto out_free;
    }
    sp->min_free_bytes = min_free_bytes;
    pthread_mutex_init(&sp->mu, NULL);

    snprintf(path, sizeof(path), "%s/objects", sp->dir);
    if ((rc = mkdir_p(path)) < 0)
        goto out_mutex;
    snprintf(path, sizeof(path), "%s/tmp", sp->dir);
    if ((rc = mkdir_p(path)) < 0)
        goto out_mutex;
    clean_tmp(path);

    snprintf(path, sizeof(path), "%s/spool.db", sp->dir);
    rc = cmn_db_open(path, CMN_DB_SYNC_FULL, &sp->db);
    if (rc < 0)
        goto out_mutex;
    rc = cmn_db_migrate(sp->db, migrations, (int)CMN_ARRAY_SIZE(migrations));
    if (rc < 0)
        goto out_close_db;

    /* Crash recovery: an upload in flight when we died starts over (the
     * cloud's declare is idempotent and reports the chunks it holds). */
    {
        sqlite3_stmt *st;
        rc = cmn_db_prepare(sp->db,
                            "UPDATE instances SET state='PENDING', next_attempt_at=0 "
                            "WHERE state='UPLOADING'", &st);
        if (rc < 0)
            goto out_close_db;
        if (sqlite3_step(st) != SQLITE_DONE) {
            CMN_LOG_E("spool", "recovery failed: %s", sqlite3_errmsg(sp->db));
            sqlite3_finalize(st);
            rc = CMN_EDB;
            goto out_close_db;
        }
        int n = sqlite3_changes(sp->db);
        sqlite3_finalize(st);
        if (n > 0)
            CMN_LOG_I("spool", "recovered %d interrupted upload(s) as PENDING", n);
    }
    *out = sp;
    return 0;

out_close_db:
    cmn_db_close(sp->db);
out_mutex:
    pthread_mutex_destroy(&sp->mu);
out_free:
    CMN_LOG_E("spool", "cannot open spool dir=%s: %s", dir, cmn_strerror(rc));
    free(sp);
    return rc;
}

void edge_spool_close(edge_spool_t *sp)
{
    if (!sp)
        return;
    cmn_db_close(sp->db);
    pthread_mutex_destroy(&sp->mu);
    free(sp);
}

bool edge_spool_has_space(edge_spool_t *sp)
{
    struct statvfs vfs;

    if (statvfs(sp->dir, &vfs) < 0)
        return false;
    return (uint64_t)vfs.f_bavail * (uint64_t)vfs.f_frsize >= sp->min_free_bytes;
}

int edge_spool_tmp_path(edge_spool_t *sp, char *buf, size_t len)
{
    uint8_t rnd[16];
    char hex[33];

    if (cmn_random(rnd, sizeof(rnd)) < 0)
        return CMN_ECRYPTO;
    cmn_hex(rnd, sizeof(rnd), hex);
    if ((size_t)snprintf(buf, len, "%s/tmp/%s.part", sp->dir, hex) >= len)
        return -ENAMETOOLONG;
    return 0;
}

/* Hashes and fsyncs the file through one descriptor. */
static int hash_and_sync(const char *path, char sha_hex[PROTO_HEX256 + 1], uint64_t *size)
{
    cmn_sha256_ctx_t ctx;
    uint8_t digest[CMN_SHA256_LEN];
    uint8_t *buf;
    int fd, rc = 0;
    uint64_t total = 0;

    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    buf = cmn_xmalloc(1 << 20);
    cmn_sha256_init(&ctx);
    for (;;) {
        ssize_t n = read(fd, buf, 1 << 20);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            rc = -errno;
            goto out;
        }
        if (n == 0)
            break;
        cmn_sha256_update(&ctx, buf, (size_t)n);
        total += (uint64_t)n;
    }
    /* fsync on a read-only descriptor flushes the file's dirty pages too. */
    if (fsync(fd) < 0) {
        rc = -errno;
        goto out;
    }
    cmn_sha256_final(&ctx, digest);
    cmn_hex(digest, sizeof(digest), sha_hex);
    *size = total;
out:
    free(buf);
    close(fd);
    return rc;
}

static int64_t now_wall_ms(void)
{
    return edge__wall_ms();
}

int edge_spool_add(edge_spool_t *sp, const char *tmp_path, const edge_spool_uids_t *uids,
                   int64_t *id_out, char sha_out[PROTO_HEX256 + 1])
{
    char sha[PROTO_HEX256 + 1];
    char final[PATH_MAX + 128];
    char objdir[PATH_MAX + 16];
    uint64_t size = 0;
    sqlite3_stmt *st = NULL;
    int rc;

    rc = hash_and_sync(tmp_path, sha, &size);
    if (rc < 0) {
        CMN_LOG_E("spool", "fsync of received file failed sop=%s: %s", uids->sop_uid,
                  cmn_strerror(rc));
        goto out_unlink;
    }
    snprintf(objdir, sizeof(objdir), "%s/objects", sp->dir);
    snprintf(final, sizeof(final), "%s/%s.dcm", objdir, sha);
    if (rename(tmp_path, final) < 0) {
        rc = -errno;
        CMN_LOG_E("spool", "rename failed sop=%s: %s", uids->sop_uid, cmn_strerror(rc));
        goto out_unlink;
    }
    rc = fsync_dir(objdir);
    if (rc < 0) {
        CMN_LOG_E("spool", "fsync of %s failed: %s", objdir, cmn_strerror(rc));
        /* The file is in place but maybe not durable: no row, so it is an
         * orphan at worst; the SCU is told to resend. */
        return rc;
    }

    pthread_mutex_lock(&sp->mu);
    rc = cmn_db_prepare(sp->db,
                        "INSERT INTO instances (sop_uid, study_uid, series_uid, sha256, size, path,"
                        " state, attempts, next_attempt_at, created_at, updated_at)"
                        " VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'PENDING', 0, 0, ?7, ?7)", &st);
    if (rc == 0) {
        int64_t now = now_wall_ms();
        sqlite3_bind_text(st, 1, uids->sop_uid, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, uids->study_uid, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 3, uids->series_uid, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 4, sha, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 5, (sqlite3_int64)size);
        sqlite3_bind_text(st, 6, final, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 7, now);
        int s = sqlite3_step(st);
        if (s != SQLITE_DONE) {
            CMN_LOG_E("spool", "insert failed sop=%s: %s", uids->sop_uid, sqlite3_errmsg(sp->db));
            rc = (s == SQLITE_FULL) ? -ENOSPC : (s == SQLITE_IOERR ? -EIO : CMN_EDB);
        } else if (id_out) {
            *id_out = sqlite3_last_insert_rowid(sp->db);
        }
        sqlite3_finalize(st);
    }
    pthread_mutex_unlock(&sp->mu);
    if (rc == 0 && sha_out)
        memcpy(sha_out, sha, sizeof(sha));
    /* On a failed insert the object file stays: another row may share it
     * (identical bytes), and an orphan only costs space. */
    return rc;

out_unlink:
    unlink(tmp_path);
    return rc;
}

static void copy_col(char *dst, size_t len, sqlite3_stmt *st, int col)
{
    const unsigned char *s = sqlite3_column_text(st, col);
    snprintf(dst, len, "%s", s ? (const char *)s : "");
}

int edge_spool_claim(edge_spool_t *sp, int64_t now_ms, edge_spool_item_t *items, int max, int *n,
                     int64_t *next_due_ms)
{
    sqlite3_stmt *sel = NULL, *upd = NULL, *due = NULL;
    int rc, count = 0;

    *n = 0;
    *next_due_ms = -1;
    pthread_mutex_lock(&sp->mu);
    rc = cmn_db_exec(sp->db, "BEGIN IMMEDIATE");
    if (rc < 0)
        goto out_unlock;
    rc = cmn_db_prepare(sp->db,
                        "SELECT id, sop_uid, study_uid, series_uid, sha256, size, path, attempts"
                        " FROM instances WHERE state='PENDING' AND next_attempt_at <= ?1"
                        " ORDER BY next_attempt_at, id LIMIT ?2", &sel);
    if (rc < 0)
        goto out_rollback;
    rc = cmn_db_prepare(sp->db,
                        "UPDATE instances SET state='UPLOADING', updated_at=?2 WHERE id=?1", &upd);
    if (rc < 0)
        goto out_rollback;
    sqlite3_bind_int64(sel, 1, now_ms);
    sqlite3_bind_int(sel, 2, max);
    int s;
    while (count < max && (s = sqlite3_step(sel)) == SQLITE_ROW) {
        edge_spool_item_t *it = &items[count];
        memset(it, 0, sizeof(*it));
        it->id = sqlite3_column_int64(sel, 0);
        copy_col(it->sop_uid, sizeof(it->sop_uid), sel, 1);
        copy_col(it->study_uid, sizeof(it->study_uid), sel, 2);
        copy_col(it->series_uid, sizeof(it->series_uid), sel, 3);
        copy_col(it->sha256, sizeof(it->sha256), sel, 4);
        it->size = (uint64_t)sqlite3_column_int64(sel, 5);
        copy_col(it->path, sizeof(it->path), sel, 6);
        it->attempts = sqlite3_column_int(sel, 7);
        count++;
    }
    sqlite3_finalize(sel);
    sel = NULL;
    for (int i = 0; i < count; i++) {
        sqlite3_reset(upd);
        sqlite3_bind_int64(upd, 1, items[i].id);
        sqlite3_bind_int64(upd, 2, now_wall_ms());
        if (sqlite3_step(upd) != SQLITE_DONE) {
            CMN_LOG_E("spool", "claim update failed: %s", sqlite3_errmsg(sp->db));
            rc = CMN_EDB;
            goto out_rollback;
        }
    }
    rc = cmn_db_prepare(sp->db,
                        "SELECT MIN(next_attempt_at) FROM instances WHERE state='PENDING'", &due);
    if (rc < 0)
        goto out_rollback;
    if (sqlite3_step(due) == SQLITE_ROW && sqlite3_column_type(due, 0) != SQLITE_NULL)
        *next_due_ms = sqlite3_column_int64(due, 0);
    rc = cmn_db_exec(sp->db, "COMMIT");
    if (rc < 0)
        goto out_rollback;
    *n = count;
    goto out_finalize;

out_rollback:
    cmn_db_exec(sp->db, "ROLLBACK");
    *next_due_ms = -1;
out_finalize:
    sqlite3_finalize(sel);
    sqlite3_finalize(upd);
    sqlite3_finalize(due);
out_unlock:
    pthread_mutex_unlock(&sp->mu);
    return rc;
}

static int update_row(edge_spool_t *sp, const char *sql, int64_t id, int64_t when, const char *err)
{
    sqlite3_stmt *st;
    int rc;

    pthread_mutex_lock(&sp->mu);
    rc = cmn_db_prepare(sp->db, sql, &st);
    if (rc == 0) {
        sqlite3_bind_int64(st, 1, id);
        sqlite3_bind_int64(st, 2, now_wall_ms());
        sqlite3_bind_int64(st, 3, when);
        if (err)
            sqlite3_bind_text(st, 4, err, -1, SQLITE_TRANSIENT);
        else
            sqlite3_bind_null(st, 4);
        if (sqlite3_step(st) != SQLITE_DONE) {
            CMN_LOG_E("spool", "update of id=%lld failed: %s", (long long)id,
                      sqlite3_errmsg(sp->db));
            rc = CMN_EDB;
        }
        sqlite3_finalize(st);
    }
    pthread_mutex_unlock(&sp->mu);
    return rc;
}

int edge_spool_mark_done(edge_spool_t *sp, int64_t id)
{
    return update_row(sp,
                      "UPDATE instances SET state='DONE', updated_at=?2, last_error=?4"
                      " WHERE id=?1 AND ?3 = ?3", id, 0, NULL);
}

int edge_spool_mark_retry(edge_spool_t *sp, int64_t id, int64_t next_at_ms, const char *err)
{
    return update_row(sp,
                      "UPDATE instances SET state='PENDING', attempts=attempts+1, updated_at=?2,"
                      " next_attempt_at=?3, last_error=?4 WHERE id=?1", id, next_at_ms, err);
}

int edge_spool_mark_failed(edge_spool_t *sp, int64_t id, const char *err)
{
    return update_row(sp,
                      "UPDATE instances SET state='FAILED', attempts=attempts+1, updated_at=?2,"
                      " last_error=?4 WHERE id=?1 AND ?3 = ?3", id, 0, err);
}

int edge_spool_counts(edge_spool_t *sp, edge_spool_counts_t *out)
{
    sqlite3_stmt *st;
    int rc;

    memset(out, 0, sizeof(*out));
    pthread_mutex_lock(&sp->mu);
    rc = cmn_db_prepare(sp->db, "SELECT state, COUNT(*) FROM instances GROUP BY state", &st);
    if (rc == 0) {
        while (sqlite3_step(st) == SQLITE_ROW) {
            const char *s = (const char *)sqlite3_column_text(st, 0);
            int64_t c = sqlite3_column_int64(st, 1);
            if (!s)
                continue;
            if (!strcmp(s, "PENDING")) out->pending = c;
            else if (!strcmp(s, "UPLOADING")) out->uploading = c;
            else if (!strcmp(s, "DONE")) out->done = c;
            else if (!strcmp(s, "FAILED")) out->failed = c;
        }
        sqlite3_finalize(st);
    }
    pthread_mutex_unlock(&sp->mu);
    return rc;
}
