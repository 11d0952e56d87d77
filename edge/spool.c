/*
 * spool.c - the edge's durable spool (see spool.h for the state diagram).
 *
 * Layout under spool.dir:
 *     spool.db          SQLite (WAL, synchronous=FULL), table instances
 *     objects/<sha256>.dcm   received files, exactly as received (content-addressed)
 *     objects/<sha256>.jls.dcm  JPEG-LS transcode of that file, when smaller
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
    CMN_CONF_OPT_INT(edge_conf_spool_t, max_gb, 0, 0, 1LL << 20,
                     "quota on images waiting for upload, GiB; when reached, new images get A700 "
                     "and the quota alarm is raised (0 = no quota)"),
    CMN_CONF_OPT_INT(edge_conf_spool_t, max_mb, 0, 0, 1LL << 30,
                     "the same quota in MiB; wins over max_gb when not 0"),
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

#define URGENT_MAX 32

struct edge_spool {
    char dir[PATH_MAX];              /* absolute spool directory */
    uint64_t min_free_bytes;
    sqlite3 *db;                     /* owned; guarded by mu */
    pthread_mutex_t mu;
    bool readonly;                   /* opened by edge_spool_open_readonly */
    /* guarded by mu */
    uint64_t max_bytes;              /* quota on pending_bytes; 0 = none */
    uint64_t pending_bytes;          /* sum(size) of rows not DONE */
    bool quota_full, disk_low;       /* alarms, as of the last has_space */
    int64_t last_alarm_log_ms;       /* rate limit of the alarm log line */
    int nurgent;
    char urgent[URGENT_MAX][17];     /* calling AE titles with priority 1 */
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

    /* 2: priorities, the prepared upload file, counters for the status page. */
    "ALTER TABLE instances ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;"
    "ALTER TABLE instances ADD COLUMN calling_ae TEXT NOT NULL DEFAULT '';"
    "ALTER TABLE instances ADD COLUMN up_path TEXT;"
    "ALTER TABLE instances ADD COLUMN up_sha256 TEXT;"
    "ALTER TABLE instances ADD COLUMN up_size INTEGER;"
    "ALTER TABLE instances ADD COLUMN up_kind TEXT;"
    "ALTER TABLE instances ADD COLUMN done_at INTEGER;"        /* unix ms */
    "DROP INDEX instances_due;"
    "CREATE INDEX instances_due ON instances(state, priority DESC, next_attempt_at, id);"
    "CREATE INDEX instances_done ON instances(state, done_at);"
    "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;",
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
        rc = cmn_db_prepare(sp->db, "SELECT COALESCE(SUM(size),0) FROM instances"
                            " WHERE state <> 'DONE'", &st);
        if (rc < 0)
            goto out_close_db;
        if (sqlite3_step(st) == SQLITE_ROW)
            sp->pending_bytes = (uint64_t)sqlite3_column_int64(st, 0);
        sqlite3_finalize(st);
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

int edge_spool_open_readonly(const char *dir, edge_spool_t **out)
{
    edge_spool_t *sp;
    char path[PATH_MAX + 32];
    int rc;

    *out = NULL;
    sp = cmn_xcalloc(1, sizeof(*sp));
    if (!realpath(dir, sp->dir)) {
        rc = -errno;
        free(sp);
        return rc;
    }
    snprintf(path, sizeof(path), "%s/spool.db", sp->dir);
    if (sqlite3_open_v2(path, &sp->db, SQLITE_OPEN_READONLY, NULL) != SQLITE_OK) {
        CMN_LOG_E("spool", "cannot open %s read-only: %s", path,
                  sp->db ? sqlite3_errmsg(sp->db) : "out of memory");
        sqlite3_close(sp->db);
        free(sp);
        return CMN_EDB;
    }
    sqlite3_busy_timeout(sp->db, 5000);
    sp->readonly = true;
    pthread_mutex_init(&sp->mu, NULL);
    *out = sp;
    return 0;
}

void edge_spool_set_quota(edge_spool_t *sp, uint64_t max_bytes)
{
    pthread_mutex_lock(&sp->mu);
    sp->max_bytes = max_bytes;
    pthread_mutex_unlock(&sp->mu);
}

void edge_spool_set_urgent(edge_spool_t *sp, const char *aes)
{
    const char *p = aes ? aes : "";

    pthread_mutex_lock(&sp->mu);
    sp->nurgent = 0;
    while (*p && sp->nurgent < URGENT_MAX) {
        while (*p == ',' || *p == ' ')
            p++;
        size_t n = strcspn(p, ",");
        size_t m = n;
        while (m > 0 && p[m - 1] == ' ')
            m--;
        if (m > 0 && m <= 16) {
            memcpy(sp->urgent[sp->nurgent], p, m);
            sp->urgent[sp->nurgent][m] = '\0';
            sp->nurgent++;
        }
        p += n;
    }
    pthread_mutex_unlock(&sp->mu);
}

/* Caller holds mu. */
static int priority_of(edge_spool_t *sp, const char *calling_ae)
{
    if (!calling_ae)
        return 0;
    for (int i = 0; i < sp->nurgent; i++)
        if (strcmp(sp->urgent[i], calling_ae) == 0)
            return 1;
    return 0;
}

void edge_spool_close(edge_spool_t *sp)
{
    if (!sp)
        return;
    if (sp->readonly)
        sqlite3_close(sp->db);
    else
        cmn_db_close(sp->db);
    pthread_mutex_destroy(&sp->mu);
    free(sp);
}

bool edge_spool_has_space(edge_spool_t *sp)
{
    struct statvfs vfs;
    bool disk_low, quota_full;
    uint64_t pending, max;

    disk_low = statvfs(sp->dir, &vfs) < 0 ||
               (uint64_t)vfs.f_bavail * (uint64_t)vfs.f_frsize < sp->min_free_bytes;
    pthread_mutex_lock(&sp->mu);
    pending = sp->pending_bytes;
    max = sp->max_bytes;
    quota_full = max > 0 && pending >= max;
    bool raised = (quota_full && !sp->quota_full) || (disk_low && !sp->disk_low);
    bool cleared = (!quota_full && sp->quota_full) || (!disk_low && sp->disk_low);
    int64_t now = edge__wall_ms();
    bool log_now = raised || ((quota_full || disk_low) && now - sp->last_alarm_log_ms >= 10000);
    if (log_now)
        sp->last_alarm_log_ms = now;
    sp->quota_full = quota_full;
    sp->disk_low = disk_low;
    pthread_mutex_unlock(&sp->mu);

    if (log_now && quota_full)
        CMN_LOG_E("spool", "ALARM spool quota full: pending=%llu bytes quota=%llu bytes; new "
                  "images are refused with A700 until uploads drain the spool",
                  (unsigned long long)pending, (unsigned long long)max);
    if (log_now && disk_low)
        CMN_LOG_E("spool", "ALARM spool disk below spool.min_free_mb=%llu MiB; new images are "
                  "refused with A700", (unsigned long long)(sp->min_free_bytes >> 20));
    if (cleared && !quota_full && !disk_low)
        CMN_LOG_W("spool", "spool alarm cleared: accepting images again (pending=%llu bytes)",
                  (unsigned long long)pending);
    return !disk_low && !quota_full;
}

void edge_spool_alarms(edge_spool_t *sp, bool *quota_full, bool *disk_low)
{
    pthread_mutex_lock(&sp->mu);
    /* Re-check the quota (it clears as uploads drain, without a new C-STORE). */
    if (sp->max_bytes > 0)
        sp->quota_full = sp->pending_bytes >= sp->max_bytes;
    *quota_full = sp->quota_full;
    *disk_low = sp->disk_low;
    pthread_mutex_unlock(&sp->mu);
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
                        " state, attempts, next_attempt_at, created_at, updated_at, priority,"
                        " calling_ae)"
                        " VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'PENDING', 0, 0, ?7, ?7, ?8, ?9)", &st);
    if (rc == 0) {
        int64_t now = now_wall_ms();
        sqlite3_bind_text(st, 1, uids->sop_uid, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, uids->study_uid, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 3, uids->series_uid, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 4, sha, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 5, (sqlite3_int64)size);
        sqlite3_bind_text(st, 6, final, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 7, now);
        sqlite3_bind_int(st, 8, priority_of(sp, uids->calling_ae));
        sqlite3_bind_text(st, 9, uids->calling_ae ? uids->calling_ae : "", -1, SQLITE_STATIC);
        int s = sqlite3_step(st);
        if (s != SQLITE_DONE) {
            CMN_LOG_E("spool", "insert failed sop=%s: %s", uids->sop_uid, sqlite3_errmsg(sp->db));
            rc = (s == SQLITE_FULL) ? -ENOSPC : (s == SQLITE_IOERR ? -EIO : CMN_EDB);
        } else {
            sp->pending_bytes += size;
            if (id_out)
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

#define ITEM_COLS                                                                               \
    "id, sop_uid, study_uid, series_uid, sha256, size, path, attempts, priority, up_path,"     \
    " up_sha256, up_size, up_kind"

static void read_item(sqlite3_stmt *sel, edge_spool_item_t *it)
{
    memset(it, 0, sizeof(*it));
    it->id = sqlite3_column_int64(sel, 0);
    copy_col(it->sop_uid, sizeof(it->sop_uid), sel, 1);
    copy_col(it->study_uid, sizeof(it->study_uid), sel, 2);
    copy_col(it->series_uid, sizeof(it->series_uid), sel, 3);
    copy_col(it->sha256, sizeof(it->sha256), sel, 4);
    it->size = (uint64_t)sqlite3_column_int64(sel, 5);
    copy_col(it->path, sizeof(it->path), sel, 6);
    it->attempts = sqlite3_column_int(sel, 7);
    it->priority = sqlite3_column_int(sel, 8);
    copy_col(it->up_path, sizeof(it->up_path), sel, 9);
    copy_col(it->up_sha256, sizeof(it->up_sha256), sel, 10);
    it->up_size = (uint64_t)sqlite3_column_int64(sel, 11);
    copy_col(it->up_kind, sizeof(it->up_kind), sel, 12);
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
                        "SELECT " ITEM_COLS
                        " FROM instances WHERE state='PENDING' AND next_attempt_at <= ?1"
                        " AND up_path IS NOT NULL"
                        " ORDER BY priority DESC, next_attempt_at, id LIMIT ?2", &sel);
    if (rc < 0)
        goto out_rollback;
    rc = cmn_db_prepare(sp->db,
                        "UPDATE instances SET state='UPLOADING', updated_at=?2 WHERE id=?1", &upd);
    if (rc < 0)
        goto out_rollback;
    sqlite3_bind_int64(sel, 1, now_ms);
    sqlite3_bind_int(sel, 2, max);
    while (count < max && sqlite3_step(sel) == SQLITE_ROW) {
        read_item(sel, &items[count]);
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
                        "SELECT MIN(next_attempt_at) FROM instances WHERE state='PENDING'"
                        " AND up_path IS NOT NULL", &due);
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

int edge_spool_list_unprepared(edge_spool_t *sp, edge_spool_item_t *items, int max, int *n)
{
    sqlite3_stmt *sel;
    int rc, count = 0;

    *n = 0;
    pthread_mutex_lock(&sp->mu);
    rc = cmn_db_prepare(sp->db,
                        "SELECT " ITEM_COLS " FROM instances WHERE state='PENDING'"
                        " AND up_path IS NULL ORDER BY priority DESC, id LIMIT ?1", &sel);
    if (rc == 0) {
        sqlite3_bind_int(sel, 1, max);
        while (count < max && sqlite3_step(sel) == SQLITE_ROW)
            read_item(sel, &items[count++]);
        sqlite3_finalize(sel);
        *n = count;
    }
    pthread_mutex_unlock(&sp->mu);
    return rc;
}

/* Runs one statement with text/int64 parameters; caller holds mu. */
static int step_done(edge_spool_t *sp, sqlite3_stmt *st, int64_t id)
{
    if (sqlite3_step(st) != SQLITE_DONE) {
        CMN_LOG_E("spool", "update of id=%lld failed: %s", (long long)id, sqlite3_errmsg(sp->db));
        return CMN_EDB;
    }
    return 0;
}

int edge_spool_set_upload_file(edge_spool_t *sp, int64_t id, const char *path,
                               const char *sha256, uint64_t size, const char *kind)
{
    sqlite3_stmt *st;
    int rc;

    pthread_mutex_lock(&sp->mu);
    rc = cmn_db_prepare(sp->db,
                        "UPDATE instances SET up_path=?2, up_sha256=?3, up_size=?4, up_kind=?5,"
                        " updated_at=?6 WHERE id=?1 AND up_path IS NULL", &st);
    if (rc == 0) {
        sqlite3_bind_int64(st, 1, id);
        sqlite3_bind_text(st, 2, path, -1, SQLITE_TRANSIENT);
        sqlite3_bind_text(st, 3, sha256, -1, SQLITE_TRANSIENT);
        sqlite3_bind_int64(st, 4, (sqlite3_int64)size);
        sqlite3_bind_text(st, 5, kind, -1, SQLITE_TRANSIENT);
        sqlite3_bind_int64(st, 6, now_wall_ms());
        rc = step_done(sp, st, id);
        sqlite3_finalize(st);
    }
    pthread_mutex_unlock(&sp->mu);
    return rc;
}

int edge_spool_clear_upload_file(edge_spool_t *sp, int64_t id)
{
    sqlite3_stmt *st;
    int rc;

    pthread_mutex_lock(&sp->mu);
    rc = cmn_db_prepare(sp->db,
                        "UPDATE instances SET up_path=NULL, up_sha256=NULL, up_size=NULL,"
                        " up_kind=NULL WHERE id=?1", &st);
    if (rc == 0) {
        sqlite3_bind_int64(st, 1, id);
        rc = step_done(sp, st, id);
        sqlite3_finalize(st);
    }
    pthread_mutex_unlock(&sp->mu);
    return rc;
}

/* Caller holds mu, inside a transaction. */
static int counter_add(edge_spool_t *sp, const char *name, int64_t delta, bool set)
{
    sqlite3_stmt *st;
    int rc = cmn_db_prepare(sp->db,
                            set ? "INSERT INTO counters(name, value) VALUES(?1, ?2)"
                                  " ON CONFLICT(name) DO UPDATE SET value=excluded.value"
                                : "INSERT INTO counters(name, value) VALUES(?1, ?2)"
                                  " ON CONFLICT(name) DO UPDATE SET value=value+excluded.value",
                            &st);
    if (rc < 0)
        return rc;
    sqlite3_bind_text(st, 1, name, -1, SQLITE_TRANSIENT);
    sqlite3_bind_int64(st, 2, delta);
    rc = step_done(sp, st, 0);
    sqlite3_finalize(st);
    return rc;
}

typedef enum { MARK_DONE, MARK_RETRY, MARK_RELEASE, MARK_FAILED } mark_t;

static int mark(edge_spool_t *sp, mark_t how, int64_t id, int64_t next_at_ms, const char *err,
                const char *kind, uint64_t bytes_sent)
{
    static const char *const sql[] = {
        [MARK_DONE] = "UPDATE instances SET state='DONE', updated_at=?2, done_at=?2,"
                      " last_error=NULL WHERE id=?1 AND state <> 'DONE'"
                      " RETURNING size, COALESCE(up_size, size)",
        [MARK_RETRY] = "UPDATE instances SET state='PENDING', attempts=attempts+1, updated_at=?2,"
                       " next_attempt_at=?3, last_error=?4 WHERE id=?1 RETURNING 0, 0",
        [MARK_RELEASE] = "UPDATE instances SET state='PENDING', updated_at=?2,"
                         " next_attempt_at=0 WHERE id=?1 RETURNING 0, 0",
        [MARK_FAILED] = "UPDATE instances SET state='FAILED', attempts=attempts+1, updated_at=?2,"
                        " last_error=?4 WHERE id=?1 RETURNING 0, 0",
    };
    sqlite3_stmt *st = NULL;
    int64_t now = now_wall_ms(), orig = 0, up = 0;
    bool changed = false;
    char name[48];
    int rc;

    pthread_mutex_lock(&sp->mu);
    rc = cmn_db_exec(sp->db, "BEGIN IMMEDIATE");
    if (rc < 0)
        goto out_unlock;
    rc = cmn_db_prepare(sp->db, sql[how], &st);
    if (rc < 0)
        goto out_rollback;
    sqlite3_bind_int64(st, 1, id);
    sqlite3_bind_int64(st, 2, now);
    if (how == MARK_RETRY)
        sqlite3_bind_int64(st, 3, next_at_ms);
    if (how == MARK_RETRY || how == MARK_FAILED)
        sqlite3_bind_text(st, 4, err ? err : "", -1, SQLITE_TRANSIENT);
    int s = sqlite3_step(st);
    if (s == SQLITE_ROW) {
        changed = true;
        orig = sqlite3_column_int64(st, 0);
        up = sqlite3_column_int64(st, 1);
        s = sqlite3_step(st);
    }
    sqlite3_finalize(st);
    if (s != SQLITE_DONE) {
        CMN_LOG_E("spool", "update of id=%lld failed: %s", (long long)id, sqlite3_errmsg(sp->db));
        rc = CMN_EDB;
        goto out_rollback;
    }
    if (bytes_sent && (rc = counter_add(sp, "bytes_sent", (int64_t)bytes_sent, false)) < 0)
        goto out_rollback;
    if (how == MARK_DONE && changed) {
        if ((rc = counter_add(sp, "last_success_ms", now, true)) < 0 ||
            (rc = counter_add(sp, "uploaded_instances", 1, false)) < 0 ||
            (rc = counter_add(sp, "uploaded_bytes", up, false)) < 0 ||
            (rc = counter_add(sp, "original_bytes_done", orig, false)) < 0)
            goto out_rollback;
    }
    if (how == MARK_RETRY && kind && kind[0]) {
        snprintf(name, sizeof(name), "err.%s", kind);
        if ((rc = counter_add(sp, name, 1, false)) < 0)
            goto out_rollback;
    }
    if (how == MARK_FAILED && (rc = counter_add(sp, "err.failed", 1, false)) < 0)
        goto out_rollback;
    rc = cmn_db_exec(sp->db, "COMMIT");
    if (rc < 0)
        goto out_rollback;
    if (how == MARK_DONE && changed)
        sp->pending_bytes = sp->pending_bytes >= (uint64_t)orig ? sp->pending_bytes - (uint64_t)orig
                                                                : 0;
    goto out_unlock;

out_rollback:
    cmn_db_exec(sp->db, "ROLLBACK");
out_unlock:
    pthread_mutex_unlock(&sp->mu);
    return rc;
}

int edge_spool_mark_done(edge_spool_t *sp, int64_t id, uint64_t bytes_sent)
{
    return mark(sp, MARK_DONE, id, 0, NULL, NULL, bytes_sent);
}

int edge_spool_mark_retry(edge_spool_t *sp, int64_t id, int64_t next_at_ms, const char *err,
                          const char *kind, uint64_t bytes_sent)
{
    return mark(sp, MARK_RETRY, id, next_at_ms, err, kind, bytes_sent);
}

int edge_spool_release(edge_spool_t *sp, int64_t id, uint64_t bytes_sent)
{
    return mark(sp, MARK_RELEASE, id, 0, NULL, NULL, bytes_sent);
}

int edge_spool_mark_failed(edge_spool_t *sp, int64_t id, const char *err)
{
    return mark(sp, MARK_FAILED, id, 0, err, NULL, 0);
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

/* One-row aggregate query into up to 6 int64 outputs; caller holds mu. */
static int query_i64(edge_spool_t *sp, const char *sql, int64_t p1, int64_t *o, int n)
{
    sqlite3_stmt *st;
    int rc = cmn_db_prepare(sp->db, sql, &st);
    if (rc < 0)
        return rc;
    sqlite3_bind_int64(st, 1, p1);
    if (sqlite3_step(st) == SQLITE_ROW) {
        for (int i = 0; i < n; i++)
            o[i] = sqlite3_column_int64(st, i);
    }
    sqlite3_finalize(st);
    return 0;
}

int edge_spool_stats(edge_spool_t *sp, int64_t now_ms, edge_spool_stats_t *st)
{
    sqlite3_stmt *q;
    int64_t v[6];
    int rc;

    memset(st, 0, sizeof(*st));
    rc = edge_spool_counts(sp, &st->counts);
    if (rc < 0)
        return rc;
    pthread_mutex_lock(&sp->mu);
    /* A read transaction: one consistent snapshot, also against the daemon. */
    if ((rc = cmn_db_exec(sp->db, "BEGIN")) < 0)
        goto out_unlock;
    memset(v, 0, sizeof(v));
    rc = query_i64(sp, "SELECT COALESCE(SUM(size),0), COALESCE(SUM(COALESCE(up_size,size)),0),"
                   " COALESCE(SUM(up_path IS NULL AND state='PENDING'),0),"
                   " COALESCE(SUM(priority > 0),0), COALESCE(MIN(created_at),0)"
                   " FROM instances WHERE state <> 'DONE' AND ?1 = ?1", 0, v, 5);
    if (rc < 0)
        goto out_rollback;
    st->pending_bytes = v[0];
    st->upload_pending_bytes = v[1];
    st->unprepared = v[2];
    st->urgent_pending = v[3];
    st->oldest_pending_ms = v[4];
    memset(v, 0, sizeof(v));
    rc = query_i64(sp, "SELECT COALESCE(SUM(CASE WHEN done_at >= ?1 - 60000 THEN"
                   " COALESCE(up_size,size) END),0),"
                   " COALESCE(SUM(COALESCE(up_size,size)),0),"
                   " COALESCE(SUM(CASE WHEN done_at >= ?1 - 60000 THEN size END),0)"
                   " FROM instances WHERE state='DONE' AND done_at >= ?1 - 300000", now_ms, v, 3);
    if (rc < 0)
        goto out_rollback;
    st->done_bytes_60s = v[0];
    st->done_bytes_300s = v[1];
    st->done_orig_bytes_60s = v[2];
    rc = cmn_db_prepare(sp->db, "SELECT name, value FROM counters ORDER BY name", &q);
    if (rc < 0)
        goto out_rollback;
    while (sqlite3_step(q) == SQLITE_ROW) {
        const char *name = (const char *)sqlite3_column_text(q, 0);
        int64_t val = sqlite3_column_int64(q, 1);
        if (!name)
            continue;
        if (!strcmp(name, "last_success_ms")) st->last_success_ms = val;
        else if (!strcmp(name, "uploaded_instances")) st->uploaded_instances = val;
        else if (!strcmp(name, "uploaded_bytes")) st->uploaded_bytes = val;
        else if (!strcmp(name, "original_bytes_done")) st->original_bytes_done = val;
        else if (!strcmp(name, "bytes_sent")) st->bytes_sent = val;
        else if (!strncmp(name, "err.", 4) && st->nerr < EDGE_SPOOL_MAX_ERR_KINDS) {
            snprintf(st->err[st->nerr].kind, sizeof(st->err[0].kind), "%s", name + 4);
            st->err[st->nerr].count = val;
            st->nerr++;
        }
    }
    sqlite3_finalize(q);
out_rollback:
    cmn_db_exec(sp->db, "COMMIT");
out_unlock:
    pthread_mutex_unlock(&sp->mu);
    return rc;
}
