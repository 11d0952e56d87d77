/*
 * spool.c - the edge's durable spool (see spool.h for the state diagram).
 *
 * Layout under spool.dir:
 *     spool.db          SQLite (WAL, synchronous=FULL), table instances
 *     objects/<name>.dcm     received files, exactly as received; <name> is the
 *                            random name of their temporary file (rows from
 *                            before 2026-11 are named by their SHA-256)
 *     objects/<name>.jls.dcm JPEG-LS transcode of that file, when smaller
 *     tmp/<random>.part      files being received (images over KEEP_MAX, or
 *                            beyond KEEP_BUDGET: smaller ones are kept in
 *                            memory and written after their record); removed
 *                            at start
 *     lock                   flock'd by the process that has the spool open
 *
 *     journal                the shared ingest journal (journal.h): a 64 MiB preallocated ring
 *     journal.1 .. journal.4 streaming lanes: 512 MiB rings, one per association in progress
 *
 * Invariant: an instance is acknowledged only once it is durable: either
 * its file was fsync'd and renamed into objects/ with the directory fsync'd
 * (the direct path: edge_spool_add, and instances too big for the journal),
 * or its bytes and row are in a journal record that was fdatasync'd
 * (edge_spool_add_received). Journaled rows are inserted with
 * synchronous=NORMAL - while the record's flush runs - and their files are
 * not fsync'd one by one: the journal checkpoint does syncfs() + a
 * synchronous=FULL commit of the new journal tail, and after a crash the
 * replay at open restores any object file or row the crash lost from the
 * records after that tail. So a durable row never points at a missing or
 * partial file unless the disk itself lost it (then the upload marks
 * FAILED); a crash between a row's insert and its record's flush leaves at
 * most a row for an instance the SCU was not told about and sends again
 * (a duplicate, stored once by the cloud).
 *
 * Per received instance (one association; see the cost table in
 * tests/bench/bench_ingest.sh): direct path = fsync file + fsync dir +
 * WAL fsync; journal = one fdatasync of allocated blocks - of a lane the
 * instance was streamed into while it arrived (edge_spool_stream_*; a
 * flush started by AIO, with the row inserted meanwhile), or of the shared
 * ring it was copied into, shared by all associations waiting at that
 * moment. An instance streamed into a lane is also kept in memory (up to
 * KEEP_MAX): no temporary file is written while the modality waits, and
 * the writer thread writes its object file from memory after the record;
 * the record is done (and may be checkpointed) only then.
 *
 * Checksums: a received file is checksummed with XXH3-128 while it arrives
 * (column xxh128, and the journal record), which is what the upload checks
 * the file against. Its SHA-256 is computed only when the upload needs the
 * original's (prepare, kind "original"). Older rows carry sha256 instead of
 * xxh128; both are honoured.
 *
 * One connection, guarded by sp->mu: SCP threads insert, the threadpool
 * claims and marks. Writes are short, so a single writer costs little.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <dirent.h>
#include <unistd.h>

#include "cmn/conf.h"
#include "cmn/crypto.h"
#include "cmn/db.h"
#include "cmn/errors.h"
#include "cmn/fs.h"
#include "cmn/log.h"

#include "internal.h"
#include "journal.h"
#include "spool.h"

/* Ring size of the ingest journal. YY_SPOOL_JOURNAL_MB overrides it (0 =
 * no journal: every instance takes the direct path) - for the ingest
 * benchmark's cost table, not a configuration knob. */
#define JOURNAL_MB_DEFAULT 64

/* Streaming lanes: journals written while an instance arrives (journal.h),
 * one per association in progress; further associations share lane 0.
 * A lane holds a CT series of 300-500 slices before its first checkpoint
 * (at half), so during a series the disk writes each image once; the
 * object files follow at the checkpoint after it. Where free space is
 * short, lanes shrink (never below LANE_MB_MIN) to fit 1/8 of it.
 * YY_SPOOL_LANES (0..LANES) and YY_SPOOL_LANE_MB override count and size of
 * new lanes (the benchmark's cost table, not configuration knobs). */
#define LANES 4
#define LANE_MB 512
#define LANE_MB_MIN 16

/* A journal and its place: lane 0 is "journal", lane n "journal.<n>".
 * Records are told apart across lanes by jseq = lane << 48 | seq. */
struct edge_spool_stream {
    edge_spool_t *sp;
    edge_journal_t *jr;              /* owned; NULL = not in use */
    int idx;
    bool busy;                       /* lanes: checked out (under sp->mu) */
    bool streaming;                  /* the current instance is being streamed */
    /* The current instance's bytes kept in memory as they arrive (see
     * KEEP_MAX): no temporary file while the modality waits; its object
     * file is written after the record, by the writer thread. */
    bool keeping;
    char *keep;                      /* owned (from keep_buf_get) */
    size_t keep_len, keep_cap;
};

/* Instances up to KEEP_MAX bytes streamed into a lane are kept in memory
 * while they arrive, as long as the lanes and the writer's queue hold at
 * most KEEP_BUDGET together (else, and for bigger ones, the temporary file
 * is written while receiving, as before). YY_SPOOL_KEEP=0 turns it off
 * (the benchmark's cost table). */
#define KEEP_MAX (4u << 20)
#define KEEP_BUDGET (8u << 20)
#define KEEP_FIRST (1u << 20)            /* a buffer's first size */
#define KEEP_POOL 2                      /* buffers of KEEP_FIRST kept for reuse */

/* An object file to write from memory, after its journal record. */
typedef struct wr_job {
    struct wr_job *next;
    char path[PATH_MAX + 128];
    char *buf;                       /* owned */
    size_t len, cap;
    edge_journal_t *jr;
    uint64_t seq;
} wr_job_t;

static uint64_t jseq_of(const edge_spool_stream_t *l, uint64_t seq)
{
    return (uint64_t)l->idx << 48 | seq;
}

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
    CMN_CONF_OPT_INT(edge_conf_spool_t, keep_days, 30, 0, 36500,
                     "uploaded images stay in the spool (the hot cache) this many days after"
                     " the cloud confirmed them, then their files are deleted; 0 = as soon as"
                     " it is safe (10 minutes)"),
    CMN_CONF_OPT_INT(edge_conf_spool_t, evict_headroom_mb, 3072, 0, 1LL << 30,
                     "when less than min_free_mb plus this many MiB are free, uploaded images"
                     " leave the spool early, oldest first, so that uploaded data never makes"
                     " the edge refuse new images; 0 = only keep_days"),
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
    int64_t keep_ms;                 /* the hot cache (edge_spool_set_cache) */
    uint64_t evict_below;            /* free bytes under which uploaded files go early; 0 = never */
    int64_t last_alarm_log_ms;       /* rate limit of the alarm log line */
    int nurgent;
    char urgent[URGENT_MAX][17];     /* calling AE titles with priority 1 */
    /* Ingest journals: lane[0] is shared (instances copied in after receipt,
     * group-committed); lane[1..] are streamed into while an association
     * receives, one association per lane (edge_spool_stream_get). */
    struct edge_spool_stream lane[1 + LANES];
    int objdir_fd;                   /* dir/objects, for syncfs and fsync; owned */
    int lock_fd;                     /* dir/lock, flock'd while open (read-write); owned */
    /* Statements of the per-image path, prepared once (guarded by mu; owned). */
    sqlite3_stmt *st_insert, *st_sync_normal, *st_sync_full;
    bool unsafe_nosync;              /* YY_SPOOL_UNSAFE_NOSYNC=1: benchmark reference only */
    bool keep_off;                   /* YY_SPOOL_KEEP=0 */

    /* The writer thread: object files of kept instances, in order. */
    pthread_t wr_thread;
    bool wr_started, wr_stop;
    pthread_mutex_t wr_mu;
    pthread_cond_t wr_cond;          /* a job queued, or stop */
    pthread_cond_t wr_done;          /* a job finished */
    wr_job_t *wr_head, *wr_tail;     /* queued */
    wr_job_t *wr_cur;                /* being written */
    char *wr_pool[KEEP_POOL];        /* free buffers of KEEP_FIRST bytes */
    int wr_npool;
    _Atomic uint64_t kept;           /* bytes kept by lanes and queued */
    int64_t wr_last_err_log;
    bool wr_hold;                    /* YY_SPOOL_WRITER_HOLD=1: tests only */
    bool wr_failing;                 /* the last write failed (retrying): an alarm */
    bool wr_waiter_left;             /* an edge_spool_object_wait timed out */
    void (*notify)(void *ud);        /* edge_spool_set_notify */
    void *notify_ud;
};

static int journal_setup(edge_spool_t *sp);
static void journals_close(edge_spool_t *sp);
static int writer_start(edge_spool_t *sp);
static void writer_stop(edge_spool_t *sp);
static int counter_add(edge_spool_t *sp, const char *name, int64_t delta, bool set);

/* Bytes a DONE row keeps in the hot cache: its upload file, and the original
 * when that is another file (transcoded). */
#define CACHED_BYTES_SQL "COALESCE(up_size, size) + (up_path IS NOT NULL AND up_path <> path) * size"

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

    /* 3: the journal record a row came from (replay looks rows up by it). */
    "ALTER TABLE instances ADD COLUMN jseq INTEGER;"
    "CREATE INDEX instances_jseq ON instances(jseq) WHERE jseq IS NOT NULL;",

    /* 4: the XXH3-128 checksum taken at receipt; sha256 is '' on such rows. */
    "ALTER TABLE instances ADD COLUMN xxh128 TEXT;",

    /* 5: the hot cache - when an uploaded row's files were deleted; what
     * it holds, counted (the status page must not sum a month of rows). */
    "ALTER TABLE instances ADD COLUMN evicted_at INTEGER;"       /* unix ms */
    "CREATE INDEX instances_cached ON instances(done_at, id)"
    " WHERE state='DONE' AND evicted_at IS NULL;"
    "INSERT OR REPLACE INTO counters(name, value)"
    " SELECT 'cached_instances', COUNT(*) FROM instances WHERE state='DONE';"
    "INSERT OR REPLACE INTO counters(name, value)"
    " SELECT 'cached_bytes', COALESCE(SUM(" CACHED_BYTES_SQL "), 0) FROM instances"
    " WHERE state='DONE';",
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
    rc = cmn_mkdirs(dir);
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
    /* One process at a time: two edges streaming into the same journal
     * rings, or prepare-spool beside a running edge, would corrupt them. */
    snprintf(path, sizeof(path), "%s/lock", sp->dir);
    sp->lock_fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0640);
    if (sp->lock_fd < 0) {
        rc = -errno;
        goto out_free;
    }
    if (flock(sp->lock_fd, LOCK_EX | LOCK_NB) < 0) {
        rc = errno == EWOULDBLOCK ? -EBUSY : -errno;
        if (rc == -EBUSY)
            CMN_LOG_E("spool", "spool dir=%s is in use by another process (a running"
                      " yunying-edge?)", sp->dir);
        close(sp->lock_fd);
        goto out_free;
    }
    pthread_mutex_init(&sp->mu, NULL);

    snprintf(path, sizeof(path), "%s/objects", sp->dir);
    if ((rc = cmn_mkdirs(path)) < 0)
        goto out_mutex;
    snprintf(path, sizeof(path), "%s/tmp", sp->dir);
    if ((rc = cmn_mkdirs(path)) < 0)
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
    snprintf(path, sizeof(path), "%s/objects", sp->dir);
    sp->objdir_fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (sp->objdir_fd < 0) {
        rc = -errno;
        goto out_close_db;
    }
    const char *unsafe = getenv("YY_SPOOL_UNSAFE_NOSYNC");
    if (unsafe && !strcmp(unsafe, "1")) {
        sp->unsafe_nosync = true;
        CMN_LOG_E("spool", "YY_SPOOL_UNSAFE_NOSYNC=1: instances are acknowledged BEFORE they are"
                  " durable (benchmark reference only)");
    }
    const char *keep = getenv("YY_SPOOL_KEEP");
    sp->keep_off = keep && !strcmp(keep, "0");
    const char *hold = getenv("YY_SPOOL_WRITER_HOLD");
    if (hold && !strcmp(hold, "1")) {
        sp->wr_hold = true;
        CMN_LOG_W("spool", "YY_SPOOL_WRITER_HOLD=1: object files of kept instances are written"
                  " only at shutdown (tests only)");
    }
    if ((rc = writer_start(sp)) < 0)
        goto out_close_objdir;
    if ((rc = journal_setup(sp)) < 0) {
        writer_stop(sp);
        goto out_close_objdir;
    }
    *out = sp;
    return 0;

out_close_objdir:
    close(sp->objdir_fd);
out_close_db:
    cmn_db_close(sp->db);
out_mutex:
    pthread_mutex_destroy(&sp->mu);
    close(sp->lock_fd);
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
    writer_stop(sp);                  /* the last object files: their records become done */
    journals_close(sp);               /* final checkpoints: need the db */
    sqlite3_finalize(sp->st_insert);
    sqlite3_finalize(sp->st_sync_normal);
    sqlite3_finalize(sp->st_sync_full);
    if (!sp->readonly && sp->objdir_fd > 0)
        close(sp->objdir_fd);
    if (!sp->readonly && sp->lock_fd > 0)
        close(sp->lock_fd);             /* the flock goes with it */
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

static int64_t now_wall_ms(void)
{
    return edge__wall_ms();
}

static int fsync_fd(edge_spool_t *sp, int fd, bool data_only)
{
    if (sp->unsafe_nosync)
        return 0;
    return (data_only ? fdatasync(fd) : fsync(fd)) < 0 ? -errno : 0;
}

/* A statement of the per-image path from *slot, prepared on first use and
 * kept (parsing it for every image showed in the ingest profile); caller
 * holds mu and gives it back with put_cached(). NULL on error (logged). */
static sqlite3_stmt *cached(edge_spool_t *sp, sqlite3_stmt **slot, const char *sql)
{
    if (!*slot && sqlite3_prepare_v3(sp->db, sql, -1, SQLITE_PREPARE_PERSISTENT, slot, NULL) !=
                      SQLITE_OK) {
        CMN_LOG_E("spool", "prepare failed: %s", sqlite3_errmsg(sp->db));
        *slot = NULL;
    }
    return *slot;
}

static void put_cached(sqlite3_stmt *st)
{
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
}

/* Runs a cached statement without parameters or rows (PRAGMA). 0 or CMN_EDB. */
static int exec_cached(edge_spool_t *sp, sqlite3_stmt **slot, const char *sql)
{
    sqlite3_stmt *st = cached(sp, slot, sql);
    int rc = st && sqlite3_step(st) == SQLITE_DONE ? 0 : CMN_EDB;

    if (st)
        put_cached(st);
    return rc;
}

/* Inserts the PENDING row; caller holds mu. jseq 0 = not journaled. */
static int insert_row(edge_spool_t *sp, const edge_spool_uids_t *uids, const char *sum,
                      uint64_t size, const char *path, int64_t created, uint64_t jseq,
                      int64_t *id_out)
{
    int rc = 0;
    sqlite3_stmt *st = cached(sp, &sp->st_insert,
                              "INSERT INTO instances (sop_uid, study_uid, series_uid, sha256, size,"
                              " path, state, attempts, next_attempt_at, created_at, updated_at,"
                              " priority, calling_ae, jseq, xxh128)"
                              " VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'PENDING', 0, 0, ?7, ?7, ?8, ?9,"
                              " ?10, ?11)");
    if (!st)
        return CMN_EDB;
    sqlite3_bind_text(st, 1, uids->sop_uid, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, uids->study_uid, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, uids->series_uid, -1, SQLITE_STATIC);
    /* sum: an XXH3-128 (32 hex digits) or, replayed from an old journal, a SHA-256. */
    bool xxh = strlen(sum) == CMN_XXH128_HEX_LEN;
    sqlite3_bind_text(st, 4, xxh ? "" : sum, -1, SQLITE_STATIC);
    if (xxh)
        sqlite3_bind_text(st, 11, sum, -1, SQLITE_STATIC);
    else
        sqlite3_bind_null(st, 11);
    sqlite3_bind_int64(st, 5, (sqlite3_int64)size);
    sqlite3_bind_text(st, 6, path, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 7, created);
    sqlite3_bind_int(st, 8, priority_of(sp, uids->calling_ae));
    sqlite3_bind_text(st, 9, uids->calling_ae ? uids->calling_ae : "", -1, SQLITE_STATIC);
    if (jseq)
        sqlite3_bind_int64(st, 10, (sqlite3_int64)jseq);
    else
        sqlite3_bind_null(st, 10);
    int s = sqlite3_step(st);
    if (s != SQLITE_DONE) {
        CMN_LOG_E("spool", "insert failed sop=%s: %s", uids->sop_uid, sqlite3_errmsg(sp->db));
        rc = (s == SQLITE_FULL) ? -ENOSPC : (s == SQLITE_IOERR ? -EIO : CMN_EDB);
    } else {
        sp->pending_bytes += size;
        if (id_out)
            *id_out = sqlite3_last_insert_rowid(sp->db);
    }
    put_cached(st);
    return rc;
}

/* objects/<name>.dcm for tmp/<name>.part. */
static int object_path(edge_spool_t *sp, const char *tmp_path, char *final, size_t len)
{
    const char *base = strrchr(tmp_path, '/');
    base = base ? base + 1 : tmp_path;
    size_t n = strcspn(base, ".");

    if (n == 0 || (size_t)snprintf(final, len, "%s/objects/%.*s.dcm", sp->dir, (int)n, base) >= len)
        return -ENAMETOOLONG;
    return 0;
}

/* The direct path: fsync the file, rename it to objects/<name>.dcm, fsync
 * the directory, insert with synchronous=FULL. fd is open on tmp_path
 * (closed by the caller). The temporary file is gone on success. */
static int add_direct(edge_spool_t *sp, const char *tmp_path, int fd,
                      const edge_spool_uids_t *uids, const char *sum, uint64_t size,
                      int64_t *id_out)
{
    char final[PATH_MAX + 128];
    int rc;

    if ((rc = fsync_fd(sp, fd, false)) < 0) {
        CMN_LOG_E("spool", "fsync of received file failed sop=%s: %s", uids->sop_uid,
                  cmn_strerror(rc));
        unlink(tmp_path);
        return rc;
    }
    if ((rc = object_path(sp, tmp_path, final, sizeof(final))) < 0 ||
        (rename(tmp_path, final) < 0 && (rc = -errno))) {
        CMN_LOG_E("spool", "rename failed sop=%s: %s", uids->sop_uid, cmn_strerror(rc));
        unlink(tmp_path);
        return rc;
    }
    if ((rc = fsync_fd(sp, sp->objdir_fd, false)) < 0) {
        CMN_LOG_E("spool", "fsync of %s/objects failed: %s", sp->dir, cmn_strerror(rc));
        /* The file is in place but maybe not durable: no row, so it is an
         * orphan at worst; the SCU is told to resend. */
        return rc;
    }
    pthread_mutex_lock(&sp->mu);
    if (sp->unsafe_nosync)
        cmn_db_exec(sp->db, "PRAGMA synchronous=OFF");
    rc = insert_row(sp, uids, sum, size, final, now_wall_ms(), 0, id_out);
    if (sp->unsafe_nosync)
        cmn_db_exec(sp->db, "PRAGMA synchronous=FULL");
    pthread_mutex_unlock(&sp->mu);
    /* On a failed insert the object file stays: an orphan only costs space. */
    return rc;
}

/* Checksums the file from its start: XXH3-128, or SHA-256 when sha. */
static int sum_file(int fd, bool sha, char hex[PROTO_HEX256 + 1], uint64_t *size)
{
    cmn_sha256_ctx_t ctx;
    cmn_xxh128_ctx_t xctx;
    int rc;

    if (sha) {
        cmn_sha256_init(&ctx);
        rc = cmn_fd_chunks(fd, cmn_sha256_update_cb, &ctx, size);
        cmn_sha256_final_hex(&ctx, hex);
    } else {
        cmn_xxh128_init(&xctx);
        rc = cmn_fd_chunks(fd, cmn_xxh128_update_cb, &xctx, size);
        cmn_xxh128_final_hex(&xctx, hex);
    }
    return rc;
}

int edge_spool_add(edge_spool_t *sp, const char *tmp_path, const edge_spool_uids_t *uids,
                   int64_t *id_out, char sum_out[CMN_XXH128_HEX_LEN + 1])
{
    char sum[PROTO_HEX256 + 1];
    uint64_t size = 0;
    int rc, fd;

    fd = open(tmp_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        rc = -errno;
        unlink(tmp_path);
        return rc;
    }
    rc = sum_file(fd, false, sum, &size);
    if (rc < 0) {
        CMN_LOG_E("spool", "reading received file failed sop=%s: %s", uids->sop_uid,
                  cmn_strerror(rc));
        close(fd);
        unlink(tmp_path);
        return rc;
    }
    rc = add_direct(sp, tmp_path, fd, uids, sum, size, id_out);
    close(fd);
    if (rc == 0 && sum_out)
        memcpy(sum_out, sum, CMN_XXH128_HEX_LEN + 1);
    return rc;
}

/* ------------------------------------------------------------ journal */

/*
 * A record's meta, NUL-terminated fields:
 *   "2" sop study series calling_ae xxh128 created_ms name   (objects/<name>.dcm)
 *   "1" sop study series calling_ae sha256 created_ms        (before 2026-11:
 *                                                             objects/<sha256>.dcm)
 */
#define META_FIELDS 8

static int meta_encode(char *buf, size_t len, const edge_spool_uids_t *u, const char *sum,
                       int64_t created, const char *final)
{
    char ms[24];
    const char *base = strrchr(final, '/');
    char name[128];
    const char *f[META_FIELDS] = {"2", u->sop_uid, u->study_uid, u->series_uid,
                                  u->calling_ae ? u->calling_ae : "", sum, ms, name};
    size_t n = 0;

    base = base ? base + 1 : final;
    snprintf(name, sizeof(name), "%.*s", (int)strcspn(base, "."), base);
    snprintf(ms, sizeof(ms), "%lld", (long long)created);
    for (int i = 0; i < META_FIELDS; i++) {
        size_t l = strlen(f[i]) + 1;
        if (n + l > len)
            return -ENAMETOOLONG;
        memcpy(buf + n, f[i], l);
        n += l;
    }
    return (int)n;
}

/* Version 1 gets f[7] = its SHA-256 (the file's name then). */
static int meta_decode(const char *meta, size_t len, const char *f[META_FIELDS])
{
    size_t n = 0;
    int nf = len > 0 && meta[0] == '1' ? META_FIELDS - 1 : META_FIELDS;

    for (int i = 0; i < nf; i++) {
        const char *z = n < len ? memchr(meta + n, '\0', len - n) : NULL;
        if (!z)
            return -EINVAL;
        f[i] = meta + n;
        n = (size_t)(z - meta) + 1;
    }
    if (strcmp(f[0], "1") == 0) {
        f[7] = f[5];
        return strlen(f[5]) == PROTO_HEX256 ? 0 : -EINVAL;
    }
    size_t nl = strlen(f[7]);
    if (strcmp(f[0], "2") != 0 || strlen(f[5]) != CMN_XXH128_HEX_LEN || nl == 0 || nl > 64 ||
        strspn(f[7], "0123456789abcdef") != nl)
        return -EINVAL;
    return 0;
}

/* ------------------------------------------------------------ kept instances */

/* A buffer for a lane to keep an instance in: a pooled one, or NULL (the
 * lane allocates on the first byte). */
static char *keep_buf_get(edge_spool_t *sp, size_t *cap)
{
    char *b = NULL;

    pthread_mutex_lock(&sp->wr_mu);
    if (sp->wr_npool > 0) {
        b = sp->wr_pool[--sp->wr_npool];
        *cap = KEEP_FIRST;
    }
    pthread_mutex_unlock(&sp->wr_mu);
    return b;
}

/* Back to the pool (buffers of the first size only: a bigger one would
 * keep its pages for good) or freed. */
static void keep_buf_put(edge_spool_t *sp, char *b, size_t cap)
{
    if (!b)
        return;
    pthread_mutex_lock(&sp->wr_mu);
    if (cap == KEEP_FIRST && sp->wr_npool < KEEP_POOL) {
        sp->wr_pool[sp->wr_npool++] = b;
        b = NULL;
    }
    pthread_mutex_unlock(&sp->wr_mu);
    free(b);
}

/* The lane keeps nothing (any more); its buffer stays for the next instance. */
static void keep_reset(edge_spool_stream_t *l)
{
    atomic_fetch_sub(&l->sp->kept, l->keep_len);
    l->keep_len = 0;
    l->keeping = false;
}

/* Appends to the kept bytes; false (keeping nothing more, what was kept
 * stays) past KEEP_MAX or the budget. */
static bool keep_append(edge_spool_stream_t *l, const void *buf, size_t len)
{
    edge_spool_t *sp = l->sp;

    if (l->keep_len + len > KEEP_MAX)
        return false;
    if (atomic_fetch_add(&sp->kept, len) + len > KEEP_BUDGET) {
        atomic_fetch_sub(&sp->kept, len);
        return false;
    }
    if (l->keep_len + len > l->keep_cap) {
        size_t cap = l->keep_cap ? l->keep_cap : KEEP_FIRST;
        while (cap < l->keep_len + len)
            cap *= 2;
        char *b = realloc(l->keep, cap);
        if (!b) {
            atomic_fetch_sub(&sp->kept, len);
            return false;
        }
        l->keep = b;
        l->keep_cap = cap;
    }
    memcpy(l->keep + l->keep_len, buf, len);
    l->keep_len += len;
    return true;
}

static int write_file(const char *path, const char *buf, size_t len)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0640);
    int rc = 0;

    if (fd < 0)
        return -errno;
    rc = cmn_write_all(fd, buf, len);
    if (close(fd) < 0 && rc == 0)
        rc = -errno;
    if (rc < 0)
        unlink(path);
    return rc;
}

/*
 * The writer: writes each kept instance's object file after its journal
 * record, then tells the journal the record is done (so the checkpoint,
 * whose syncfs makes the file durable, never passes a record before its
 * file exists). A write that fails (disk full) is retried every second;
 * its record meanwhile holds the checkpoint back, and a restart's replay
 * writes the file from the journal.
 */
static void *writer_main(void *arg)
{
    edge_spool_t *sp = arg;

    pthread_mutex_lock(&sp->wr_mu);
    for (;;) {
        while (!sp->wr_head && !sp->wr_stop)
            pthread_cond_wait(&sp->wr_cond, &sp->wr_mu);
        wr_job_t *job = sp->wr_head;
        if (!job)
            break;                      /* stopping, queue empty */
        sp->wr_head = job->next;
        if (!sp->wr_head)
            sp->wr_tail = NULL;
        sp->wr_cur = job;
        while (sp->wr_hold && !sp->wr_stop)  /* tests: the window after the ack, held open */
            pthread_cond_wait(&sp->wr_cond, &sp->wr_mu);
        pthread_mutex_unlock(&sp->wr_mu);
        int rc = write_file(job->path, job->buf, job->len);
        if (rc == 0)
            edge_journal_done(job->jr, job->seq);
        pthread_mutex_lock(&sp->wr_mu);
        sp->wr_cur = NULL;
        sp->wr_failing = rc < 0;
        if (rc < 0) {
            int64_t now = edge__wall_ms();
            if (now - sp->wr_last_err_log >= 10000) {
                sp->wr_last_err_log = now;
                CMN_LOG_E("spool", "writing object file %s failed: %s (retrying; the journal"
                          " holds the instance)", job->path, cmn_strerror(rc));
            }
            if (sp->wr_stop) {
                /* The record stays live: the next start's replay writes it. */
                pthread_cond_broadcast(&sp->wr_done);
                free(job->buf);
                atomic_fetch_sub(&sp->kept, job->len);
                free(job);
                continue;
            }
            job->next = sp->wr_head;     /* first again */
            sp->wr_head = job;
            if (!sp->wr_tail)
                sp->wr_tail = job;
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_sec += 1;
            pthread_cond_timedwait(&sp->wr_cond, &sp->wr_mu, &ts);
            continue;
        }
        pthread_cond_broadcast(&sp->wr_done);
        /* A reader that gave up waiting for a file is told files are
         * written again (notify only wakes a loop). */
        void (*tell)(void *) = sp->wr_waiter_left ? sp->notify : NULL;
        void *tell_ud = sp->notify_ud;
        sp->wr_waiter_left = false;
        pthread_mutex_unlock(&sp->wr_mu);
        if (tell)
            tell(tell_ud);
        atomic_fetch_sub(&sp->kept, job->len);
        keep_buf_put(sp, job->buf, job->cap);
        free(job);
        pthread_mutex_lock(&sp->wr_mu);
    }
    pthread_mutex_unlock(&sp->wr_mu);
    return NULL;
}

static int writer_start(edge_spool_t *sp)
{
    pthread_mutex_init(&sp->wr_mu, NULL);
    pthread_cond_init(&sp->wr_cond, NULL);
    pthread_cond_init(&sp->wr_done, NULL);
    int rc = pthread_create(&sp->wr_thread, NULL, writer_main, sp);
    if (rc != 0)
        return -rc;
    sp->wr_started = true;
    return 0;
}

/* Writes what is queued, then stops the thread. */
static void writer_stop(edge_spool_t *sp)
{
    if (!sp->wr_started)
        return;
    pthread_mutex_lock(&sp->wr_mu);
    sp->wr_stop = true;
    pthread_cond_broadcast(&sp->wr_cond);
    pthread_mutex_unlock(&sp->wr_mu);
    pthread_join(sp->wr_thread, NULL);
    for (int i = 0; i < sp->wr_npool; i++)
        free(sp->wr_pool[i]);
    sp->wr_npool = 0;
    pthread_cond_destroy(&sp->wr_done);
    pthread_cond_destroy(&sp->wr_cond);
    pthread_mutex_destroy(&sp->wr_mu);
    sp->wr_started = false;
}

/* Hands the lane's kept bytes to the writer, for final, after record seq. */
static void writer_queue(edge_spool_stream_t *l, const char *final, uint64_t seq)
{
    edge_spool_t *sp = l->sp;
    wr_job_t *job = cmn_xcalloc(1, sizeof(*job));

    snprintf(job->path, sizeof(job->path), "%s", final);
    job->buf = l->keep;
    job->len = l->keep_len;
    job->cap = l->keep_cap;
    job->jr = l->jr;
    job->seq = seq;
    l->keep = NULL;                     /* the budget goes with the job */
    l->keep_len = l->keep_cap = 0;
    l->keeping = false;
    pthread_mutex_lock(&sp->wr_mu);
    if (sp->wr_tail)
        sp->wr_tail->next = job;
    else
        sp->wr_head = job;
    sp->wr_tail = job;
    pthread_cond_signal(&sp->wr_cond);
    pthread_mutex_unlock(&sp->wr_mu);
}

static bool writer_has(edge_spool_t *sp, const char *path)
{
    if (sp->wr_cur && !strcmp(sp->wr_cur->path, path))
        return true;
    for (wr_job_t *j = sp->wr_head; j; j = j->next) {
        if (!strcmp(j->path, path))
            return true;
    }
    return false;
}

void edge_spool_writer_state(edge_spool_t *sp, int *unwritten, bool *failing)
{
    *unwritten = 0;
    *failing = false;
    if (!sp->wr_started)
        return;
    pthread_mutex_lock(&sp->wr_mu);
    for (wr_job_t *j = sp->wr_head; j; j = j->next)
        (*unwritten)++;
    if (sp->wr_cur)
        (*unwritten)++;
    *failing = sp->wr_failing;
    pthread_mutex_unlock(&sp->wr_mu);
}

int edge_spool_object_wait(edge_spool_t *sp, const char *path, int timeout_ms)
{
    struct timespec ts;
    int rc = 0;

    if (!sp->wr_started)
        return 0;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += timeout_ms / 1000;
    ts.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&sp->wr_mu);
    while (writer_has(sp, path)) {
        if (pthread_cond_timedwait(&sp->wr_done, &sp->wr_mu, &ts) == ETIMEDOUT) {
            /* Still pending (checked under the lock the writer takes to
             * finish a job): its next write will notify. */
            if (writer_has(sp, path)) {
                sp->wr_waiter_left = true;
                rc = -EAGAIN;
            }
            break;
        }
    }
    pthread_mutex_unlock(&sp->wr_mu);
    return rc;
}

void edge_spool_set_notify(edge_spool_t *sp, void (*fn)(void *ud), void *ud)
{
    if (!sp->wr_started)
        return;
    pthread_mutex_lock(&sp->wr_mu);
    sp->notify = fn;
    sp->notify_ud = ud;
    pthread_mutex_unlock(&sp->wr_mu);
}

/* ------------------------------------------------------------ streaming */

edge_spool_stream_t *edge_spool_stream_get(edge_spool_t *sp)
{
    edge_spool_stream_t *l = NULL;

    if (sp->unsafe_nosync)
        return NULL;
    pthread_mutex_lock(&sp->mu);
    for (int i = 1; i <= LANES && !l; i++) {
        if (sp->lane[i].jr && !sp->lane[i].busy) {
            l = &sp->lane[i];
            l->busy = true;
        }
    }
    pthread_mutex_unlock(&sp->mu);
    return l;
}

void edge_spool_stream_put(edge_spool_stream_t *l)
{
    if (!l)
        return;
    if (l->streaming)
        edge_journal_stream_abort(l->jr);
    l->streaming = false;
    keep_reset(l);
    keep_buf_put(l->sp, l->keep, l->keep_cap);
    l->keep = NULL;
    l->keep_cap = 0;
    pthread_mutex_lock(&l->sp->mu);
    l->busy = false;
    pthread_mutex_unlock(&l->sp->mu);
}

int edge_spool_stream_begin(edge_spool_stream_t *l)
{
    if (!l)
        return 0;
    l->streaming = edge_journal_stream_begin(l->jr) == 0;
    keep_reset(l);
    if (!l->keep)
        l->keep = keep_buf_get(l->sp, &l->keep_cap);
    l->keeping = l->streaming && !l->sp->keep_off && l->sp->wr_started;
    return l->keeping;
}

int edge_spool_stream_write(edge_spool_stream_t *l, const void *buf, size_t len)
{
    if (!l)
        return 0;
    if (l->streaming && edge_journal_stream_write(l->jr, buf, len) < 0) {
        /* Too big for the lane, or an I/O error: this instance takes
         * another path (add_received), from its temporary file. */
        edge_journal_stream_abort(l->jr);
        l->streaming = false;
    }
    if (l->keeping && !keep_append(l, buf, len))
        l->keeping = false;             /* the caller spills what was kept */
    return l->keeping;
}

bool edge_spool_stream_kept(edge_spool_stream_t *l, const void **data, size_t *len)
{
    if (!l || !l->keeping)
        return false;
    *data = l->keep;
    *len = l->keep_len;
    return true;
}

int edge_spool_stream_spill(edge_spool_stream_t *l, int fd)
{
    int rc = cmn_write_all(fd, l->keep, l->keep_len);

    keep_reset(l);
    return rc;
}

int edge_spool_add_received(edge_spool_t *sp, const char *tmp_path, const edge_spool_uids_t *uids,
                            const char *sum, uint64_t size, edge_spool_stream_t *stream,
                            int64_t *id_out)
{
    char final[PATH_MAX + 128];
    char meta[1024];
    edge_spool_stream_t *l = &sp->lane[0];
    uint64_t seq = 0;
    int64_t created = now_wall_ms();
    int rc, fd = -1, mlen;
    bool streamed = stream && stream->streaming && edge_journal_stream_bytes(stream->jr) == size;
    bool kept = stream && stream->keeping && stream->keep_len == size;

    if (stream && stream->streaming && !streamed) {
        edge_journal_stream_abort(stream->jr);   /* not the whole file: not used */
        stream->streaming = false;
    }
    if (stream && stream->keeping && (!kept || !streamed)) {
        /* Kept, but not streamed whole: the other paths copy the file. */
        rc = kept ? write_file(tmp_path, stream->keep, stream->keep_len) : -EIO;
        keep_reset(stream);
        kept = false;
        if (rc < 0) {
            CMN_LOG_E("spool", "writing received file failed sop=%s: %s", uids->sop_uid,
                      cmn_strerror(rc));
            return rc;
        }
    }
    if ((rc = object_path(sp, tmp_path, final, sizeof(final))) < 0) {
        if (streamed)
            edge_journal_stream_abort(stream->jr);
        if (stream) {
            stream->streaming = false;
            keep_reset(stream);
        }
        unlink(tmp_path);
        return rc;
    }
    mlen = meta_encode(meta, sizeof(meta), uids, sum, created, final);
    if (!streamed) {
        fd = open(tmp_path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            rc = -errno;
            unlink(tmp_path);
            return rc;
        }
        if (!l->jr || sp->unsafe_nosync || mlen < 0 || size > edge_journal_max_data(l->jr)) {
            rc = add_direct(sp, tmp_path, fd, uids, sum, size, id_out);
            close(fd);
            return rc;
        }
    } else {
        l = stream;
    }
    /* Not durable by itself: the journal record is what makes it so. (A
     * kept instance has no file yet: the writer makes it after the record.) */
    if (!kept && rename(tmp_path, final) < 0) {
        rc = -errno;
        CMN_LOG_E("spool", "rename failed sop=%s: %s", uids->sop_uid, cmn_strerror(rc));
        if (fd >= 0)
            close(fd);
        else
            edge_journal_stream_abort(l->jr);
        l->streaming = false;
        unlink(tmp_path);
        return rc;
    }
    if (streamed) {
        rc = mlen < 0 ? mlen : edge_journal_stream_commit(l->jr, meta, (size_t)mlen, &seq);
        l->streaming = false;
        if (kept && rc == 0)
            writer_queue(l, final, seq);     /* written while the row goes in */
        else if (kept)
            keep_reset(l);
    } else {
        rc = edge_journal_append(l->jr, meta, (size_t)mlen, fd, size, &seq);
        close(fd);
    }
    if (rc < 0) {
        CMN_LOG_E("spool", "journal write failed sop=%s: %s", uids->sop_uid, cmn_strerror(rc));
        if (seq)
            edge_journal_done(l->jr, seq);
        return rc;     /* the object file stays: an orphan at worst (see add_direct) */
    }
    /*
     * The row goes in while the record's last writes and flush run (a
     * streamed record's commit only started them), and the instance is
     * acknowledged once both are done. Should the process die in between,
     * the row may outlive an unacknowledged record: the SCU sends the
     * instance again, and the extra copy is a duplicate the cloud stores
     * once. The record is done only once its object file is written (here,
     * or by the writer for a kept instance), so the checkpoint that passes
     * it has synced the file first (syncfs, then the synchronous commit);
     * until then a restart's replay writes the file from the record.
     */
    pthread_mutex_lock(&sp->mu);
    exec_cached(sp, &sp->st_sync_normal, "PRAGMA synchronous=NORMAL");
    rc = insert_row(sp, uids, sum, size, final, created, jseq_of(l, seq), id_out);
    exec_cached(sp, &sp->st_sync_full, "PRAGMA synchronous=FULL");
    pthread_mutex_unlock(&sp->mu);
    int src = edge_journal_sync(l->jr, seq);
    if (src < 0) {
        CMN_LOG_E("spool", "journal sync failed sop=%s: %s", uids->sop_uid, cmn_strerror(src));
        if (rc == 0)
            rc = src;  /* A700: the SCU sends it again (the row is a duplicate) */
    }
    if (!kept)
        edge_journal_done(l->jr, seq);  /* else the writer does, after the file */
    return rc;
}

/* Checkpoint: every object file and row of the records before tail become
 * durable on their own, then the tail is committed (synchronous=FULL). */
/* The counters holding a lane's tail: "journal_off" for lane 0 (as before
 * lanes existed), "journal<n>_off" for lane n. */
static void tail_keys(const edge_spool_stream_t *l, char off[24], char seq[24])
{
    if (l->idx == 0) {
        snprintf(off, 24, "journal_off");
        snprintf(seq, 24, "journal_seq");
    } else {
        snprintf(off, 24, "journal%d_off", l->idx);
        snprintf(seq, 24, "journal%d_seq", l->idx);
    }
}

static int journal_checkpoint(void *ud, edge_journal_pos_t tail)
{
    edge_spool_stream_t *l = ud;
    edge_spool_t *sp = l->sp;
    char koff[24], kseq[24];
    int rc;

    tail_keys(l, koff, kseq);
    if (syncfs(sp->objdir_fd) < 0)
        return -errno;
    pthread_mutex_lock(&sp->mu);
    rc = cmn_db_exec(sp->db, "BEGIN IMMEDIATE");
    if (rc == 0) {
        if ((rc = counter_add(sp, koff, (int64_t)tail.off, true)) < 0 ||
            (rc = counter_add(sp, kseq, (int64_t)tail.seq, true)) < 0 ||
            (rc = cmn_db_exec(sp->db, "COMMIT")) < 0)
            cmn_db_exec(sp->db, "ROLLBACK");
    }
    pthread_mutex_unlock(&sp->mu);
    return rc;
}

/* Replay: restore the object file from the record if it is missing or
 * differs, and the row if the crash lost it. */
static int journal_replay_one(void *ud, uint64_t seq, const char *meta, size_t meta_len, int jfd,
                              uint64_t data_off, uint64_t data_len)
{
    edge_spool_stream_t *l = ud;
    edge_spool_t *sp = l->sp;
    const char *f[META_FIELDS];
    char final[PATH_MAX + 128], tmp[PATH_MAX + 64], sum[PROTO_HEX256 + 1];
    uint64_t size = 0;
    int rc, fd;

    if (meta_decode(meta, meta_len, f) < 0)
        return 1;
    bool sha = f[0][0] == '1';     /* an old record: SHA-256 */
    snprintf(final, sizeof(final), "%s/objects/%s.dcm", sp->dir, f[7]);
    /* Uploaded and evicted since (the hot cache): neither file nor row to restore. */
    sqlite3_stmt *ev;
    bool evicted = false;
    pthread_mutex_lock(&sp->mu);
    if (cmn_db_prepare(sp->db, "SELECT 1 FROM instances WHERE jseq=?1 AND evicted_at IS NOT NULL",
                       &ev) == 0) {
        sqlite3_bind_int64(ev, 1, (sqlite3_int64)jseq_of(l, seq));
        evicted = sqlite3_step(ev) == SQLITE_ROW;
        sqlite3_finalize(ev);
    }
    pthread_mutex_unlock(&sp->mu);
    if (evicted)
        return 0;
    fd = open(final, O_RDONLY | O_CLOEXEC);
    bool intact = false;
    if (fd >= 0) {
        intact = sum_file(fd, sha, sum, &size) == 0 && size == data_len && !strcmp(sum, f[5]);
        close(fd);
    }
    if (!intact) {
        /* Copy the record's data out, checking it is whole on the way. */
        cmn_sha256_ctx_t ctx;
        cmn_xxh128_ctx_t xctx;
        uint8_t *buf = cmn_xmalloc(1 << 16);
        if ((rc = edge_spool_tmp_path(sp, tmp, sizeof(tmp))) < 0) {
            free(buf);
            return rc;
        }
        fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0640);
        if (fd < 0) {
            free(buf);
            return -errno;
        }
        if (sha)
            cmn_sha256_init(&ctx);
        else
            cmn_xxh128_init(&xctx);
        rc = 0;
        for (uint64_t done = 0; rc == 0 && done < data_len;) {
            size_t chunk = data_len - done < (1 << 16) ? (size_t)(data_len - done) : (1 << 16);
            ssize_t n = pread(jfd, buf, chunk, (off_t)(data_off + done));
            if (n <= 0) {
                rc = n < 0 ? -errno : -EIO;
                break;
            }
            if (sha)
                cmn_sha256_update(&ctx, buf, (size_t)n);
            else
                cmn_xxh128_update(&xctx, buf, (size_t)n);
            if (write(fd, buf, (size_t)n) != n)
                rc = -EIO;
            done += (uint64_t)n;
        }
        free(buf);
        if (sha)
            cmn_sha256_final_hex(&ctx, sum);
        else
            cmn_xxh128_final_hex(&xctx, sum);
        if (rc == 0 && strcmp(sum, f[5]) != 0) {
            close(fd);
            unlink(tmp);
            CMN_LOG_W("spool", "journal record seq=%llu torn: the journal ends there",
                      (unsigned long long)seq);
            return 1;
        }
        if (rc == 0 && fsync(fd) < 0)
            rc = -errno;
        close(fd);
        if (rc == 0 && rename(tmp, final) < 0)
            rc = -errno;
        if (rc < 0) {
            unlink(tmp);
            return rc;
        }
        CMN_LOG_W("spool", "journal restored object file %s.dcm seq=%llu", f[7],
                  (unsigned long long)seq);
    }
    /* The row. */
    sqlite3_stmt *st;
    bool have = false;
    pthread_mutex_lock(&sp->mu);
    rc = cmn_db_prepare(sp->db, "SELECT 1 FROM instances WHERE jseq=?1", &st);
    if (rc == 0) {
        sqlite3_bind_int64(st, 1, (sqlite3_int64)jseq_of(l, seq));
        have = sqlite3_step(st) == SQLITE_ROW;
        sqlite3_finalize(st);
        if (!have) {
            edge_spool_uids_t u = {f[1], f[2], f[3], f[4]};
            rc = insert_row(sp, &u, f[5], data_len, final, strtoll(f[6], NULL, 10),
                            jseq_of(l, seq), NULL);
            if (rc == 0)
                CMN_LOG_W("spool", "journal restored row sop=%s seq=%llu", f[1],
                          (unsigned long long)seq);
        }
    }
    pthread_mutex_unlock(&sp->mu);
    return rc;
}

void edge_spool_count_refused(edge_spool_t *sp, unsigned status)
{
    char name[32];
    int rc;

    snprintf(name, sizeof(name), "refused.%04X", status & 0xffffu);
    pthread_mutex_lock(&sp->mu);
    exec_cached(sp, &sp->st_sync_normal, "PRAGMA synchronous=NORMAL");
    rc = counter_add(sp, name, 1, false);
    exec_cached(sp, &sp->st_sync_full, "PRAGMA synchronous=FULL");
    pthread_mutex_unlock(&sp->mu);
    if (rc < 0)
        CMN_LOG_D("spool", "cannot count a refusal: %s", cmn_strerror(rc));
}

/* Caller holds mu. */
static int64_t counter_get(edge_spool_t *sp, const char *name, int64_t dflt)
{
    sqlite3_stmt *st;
    int64_t v = dflt;
    if (cmn_db_prepare(sp->db, "SELECT value FROM counters WHERE name=?1", &st) == 0) {
        sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
        if (sqlite3_step(st) == SQLITE_ROW)
            v = sqlite3_column_int64(st, 0);
        sqlite3_finalize(st);
    }
    return v;
}

/* The ring file of lane idx: "journal" for lane 0, "journal.<idx>" else. */
static void lane_path(const edge_spool_t *sp, int idx, char *buf, size_t len)
{
    if (idx == 0)
        snprintf(buf, len, "%s/journal", sp->dir);
    else
        snprintf(buf, len, "%s/journal.%d", sp->dir, idx);
}

/* Opens (creating it if needed), replays and starts the journal of lane l:
 * mb MiB for a new ring (an existing ring keeps its size). keep=false:
 * replay only, then close. 0, or negative (the spool must not open). */
static int lane_setup(edge_spool_t *sp, edge_spool_stream_t *l, long long mb, bool keep)
{
    char path[PATH_MAX + 32], koff[24], kseq[24];
    edge_journal_pos_t tail, end;
    struct stat sb;
    long long want = mb;
    bool existed = false;
    int rc;

    lane_path(sp, l->idx, path, sizeof(path));
    if (stat(path, &sb) == 0 && sb.st_size > 0) {
        mb = (long long)(sb.st_size >> 20);   /* an existing ring is replayed at its size */
        existed = true;
    } else if (!keep || mb < 4) {
        return 0;                             /* nothing to replay, none wanted */
    }
    rc = edge_journal_open(path, (uint64_t)mb << 20, &l->jr);
    if (rc == -ENOSPC || rc == -EDQUOT) {
        unlink(path);
        l->jr = NULL;
        CMN_LOG_W("spool", "no space for ingest journal %d: instances take another path", l->idx);
        return 0;
    }
    if (rc < 0) {
        CMN_LOG_E("spool", "cannot open journal %s: %s", path, cmn_strerror(rc));
        return rc;
    }
    if ((rc = cmn_fsync_dir(sp->dir)) < 0)
        goto out_close;
    tail_keys(l, koff, kseq);
    pthread_mutex_lock(&sp->mu);
    tail.off = (uint64_t)counter_get(sp, koff, 0);
    tail.seq = (uint64_t)counter_get(sp, kseq, 1);
    pthread_mutex_unlock(&sp->mu);
    rc = edge_journal_replay(l->jr, tail, journal_replay_one, l, &end);
    if (rc < 0)
        goto out_close;
    if ((end.seq != tail.seq || end.off != tail.off) && (rc = journal_checkpoint(l, end)) < 0)
        goto out_close;
    if (!keep) {
        edge_journal_close(l->jr);            /* replayed; not used from now on */
        l->jr = NULL;
        return 0;
    }
    if (existed && want >= 4 && want != mb) {
        /* Everything in it is replayed and checkpointed: it is remade at
         * the size wanted now (the lanes of versions before 2026-11-29
         * were 32 MiB), and appending continues from the same position. */
        edge_journal_close(l->jr);
        l->jr = NULL;
        if (unlink(path) < 0 && errno != ENOENT) {
            rc = -errno;
            CMN_LOG_E("spool", "cannot remove journal %s: %s", path, cmn_strerror(rc));
            return rc;
        }
        rc = edge_journal_open(path, (uint64_t)want << 20, &l->jr);
        if (rc == -ENOSPC || rc == -EDQUOT) {
            unlink(path);
            l->jr = NULL;
            CMN_LOG_W("spool", "no space for ingest journal %d: instances take another path",
                      l->idx);
            return 0;
        }
        if (rc < 0 || (rc = cmn_fsync_dir(sp->dir)) < 0) {
            CMN_LOG_E("spool", "cannot remake journal %s: %s", path, cmn_strerror(rc));
            edge_journal_close(l->jr);
            l->jr = NULL;
            return rc;
        }
        CMN_LOG_I("spool", "journal %s remade: %lld -> %lld MiB", path, mb, want);
    }
    /* Tests keep records un-checkpointed (to replay them) with a long idle time. */
    const char *idle = getenv("YY_SPOOL_CHECKPOINT_IDLE_MS");
    if (idle && *idle)
        edge_journal_set_idle_ms(l->jr, strtoll(idle, NULL, 10));
    return edge_journal_start(l->jr, end, journal_checkpoint, l);

out_close:
    CMN_LOG_E("spool", "journal replay failed: %s", cmn_strerror(rc));
    edge_journal_close(l->jr);
    l->jr = NULL;
    return rc;
}

static int journal_setup(edge_spool_t *sp)
{
    const char *env = getenv("YY_SPOOL_JOURNAL_MB");
    const char *env_lanes = getenv("YY_SPOOL_LANES");
    const char *env_lane_mb = getenv("YY_SPOOL_LANE_MB");
    long long mb = JOURNAL_MB_DEFAULT, lane_mb = LANE_MB;
    int lanes = LANES, rc;

    if (env && *env)
        mb = strtoll(env, NULL, 10);
    if (env_lane_mb && *env_lane_mb)
        lane_mb = strtoll(env_lane_mb, NULL, 10);
    if (env_lanes && *env_lanes)
        lanes = (int)strtol(env_lanes, NULL, 10);
    if (lanes < 0 || lanes > LANES)
        lanes = LANES;
    if (mb <= 0)
        lanes = 0;
    /* New rings take at most 1/8 of the free space together; below 4 MiB
     * the shared one is not made (small test file systems), and lanes come
     * only when they fit beside it, shrunk if need be. */
    struct statvfs vfs;
    if (mb > 0 && statvfs(sp->dir, &vfs) == 0) {
        /* Rings that exist already count as free: they are reused. */
        uint64_t avail = (uint64_t)vfs.f_bavail * vfs.f_frsize;
        for (int i = 0; i <= LANES; i++) {
            char path[PATH_MAX + 32];
            struct stat sb;
            lane_path(sp, i, path, sizeof(path));
            if (stat(path, &sb) == 0)
                avail += (uint64_t)sb.st_blocks * 512;
        }
        long long cap = (long long)((avail / 8) >> 20);
        if (cap < mb)
            mb = cap;
        if (lanes > 0 && cap < mb + (long long)lanes * lane_mb)
            lane_mb = (cap - mb) / lanes;
        if (lane_mb < LANE_MB_MIN)
            lanes = 0;
        if (mb < 4)
            CMN_LOG_W("spool", "too little space for the ingest journal: every instance is"
                      " synced on its own");
    }
    for (int i = 0; i <= LANES; i++) {
        edge_spool_stream_t *l = &sp->lane[i];
        l->sp = sp;
        l->idx = i;
        /* A ring left from before still holds records to replay, wanted or not. */
        rc = lane_setup(sp, l, i == 0 ? mb : lane_mb, i == 0 ? mb > 0 : i <= lanes);
        if (rc < 0) {
            journals_close(sp);
            return rc;
        }
    }
    return 0;
}

int edge_spool_prepare(edge_spool_t *sp, uint64_t *written, int *rings)
{
    *written = 0;
    *rings = 0;
    for (int i = 0; i <= LANES; i++) {
        uint64_t n = 0;
        if (!sp->lane[i].jr)
            continue;
        int rc = edge_journal_prepare(sp->lane[i].jr, &n);
        if (rc < 0) {
            CMN_LOG_E("spool", "preparing journal %d failed: %s", i, cmn_strerror(rc));
            return rc;
        }
        *written += n;
        (*rings)++;
    }
    return 0;
}

static void journals_close(edge_spool_t *sp)
{
    for (int i = 0; i <= LANES; i++) {
        edge_journal_close(sp->lane[i].jr);
        sp->lane[i].jr = NULL;
    }
}

static void copy_col(char *dst, size_t len, sqlite3_stmt *st, int col)
{
    const unsigned char *s = sqlite3_column_text(st, col);
    snprintf(dst, len, "%s", s ? (const char *)s : "");
}

#define ITEM_COLS                                                                               \
    "id, sop_uid, study_uid, series_uid, sha256, size, path, attempts, priority, up_path,"     \
    " up_sha256, up_size, up_kind, xxh128"

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
    copy_col(it->xxh128, sizeof(it->xxh128), sel, 13);
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
                      " RETURNING size, COALESCE(up_size, size), " CACHED_BYTES_SQL,
        [MARK_RETRY] = "UPDATE instances SET state='PENDING', attempts=attempts+1, updated_at=?2,"
                       " next_attempt_at=?3, last_error=?4 WHERE id=?1 RETURNING 0, 0, 0",
        [MARK_RELEASE] = "UPDATE instances SET state='PENDING', updated_at=?2,"
                         " next_attempt_at=0 WHERE id=?1 RETURNING 0, 0, 0",
        [MARK_FAILED] = "UPDATE instances SET state='FAILED', attempts=attempts+1, updated_at=?2,"
                        " last_error=?4 WHERE id=?1 RETURNING 0, 0, 0",
    };
    sqlite3_stmt *st = NULL;
    int64_t now = now_wall_ms(), orig = 0, up = 0, cache = 0;
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
        cache = sqlite3_column_int64(st, 2);
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
            (rc = counter_add(sp, "original_bytes_done", orig, false)) < 0 ||
            (rc = counter_add(sp, "cached_instances", 1, false)) < 0 ||
            (rc = counter_add(sp, "cached_bytes", cache, false)) < 0)
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
    memset(v, 0, sizeof(v));
    rc = query_i64(sp, "SELECT COALESCE(MIN(done_at),0) FROM instances"       /* the index's first */
                   " WHERE state='DONE' AND evicted_at IS NULL AND ?1 = ?1", 0, v, 1);
    if (rc < 0)
        goto out_rollback;
    st->oldest_cached_ms = v[0];
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
        else if (!strcmp(name, "evicted_instances")) st->evicted_instances = val;
        else if (!strcmp(name, "cached_instances")) st->cached_instances = val;
        else if (!strcmp(name, "cached_bytes")) st->cached_bytes = val;
        else if (!strncmp(name, "err.", 4) && st->nerr < EDGE_SPOOL_MAX_ERR_KINDS) {
            snprintf(st->err[st->nerr].kind, sizeof(st->err[0].kind), "%s", name + 4);
            st->err[st->nerr].count = val;
            st->nerr++;
        } else if (!strncmp(name, "refused.", 8) && st->nrefused < EDGE_SPOOL_MAX_ERR_KINDS) {
            snprintf(st->refused[st->nrefused].status, sizeof(st->refused[0].status), "%s",
                     name + 8);
            st->refused[st->nrefused].count = val;
            st->nrefused++;
        }
    }
    sqlite3_finalize(q);
    rc = query_i64(sp, "SELECT COALESCE((SELECT created_at FROM instances ORDER BY id DESC"
                   " LIMIT 1), 0)", 0, &st->last_received_ms, 1);
out_rollback:
    cmn_db_exec(sp->db, "COMMIT");
out_unlock:
    pthread_mutex_unlock(&sp->mu);
    return rc;
}

/* ------------------------------------------------------------ hot cache */

/* Uploaded files younger than this stay whatever the disk says: their
 * journal records are long checkpointed by then (a replay never brings an
 * evicted file back), and a study being read right after its upload is not
 * pulled from under the reader. */
#define EVICT_GRACE_MS (10 * 60 * 1000)
#define EVICT_BATCH 256

void edge_spool_set_cache(edge_spool_t *sp, int64_t keep_ms, uint64_t evict_below_free)
{
    pthread_mutex_lock(&sp->mu);
    sp->keep_ms = keep_ms > EVICT_GRACE_MS ? keep_ms : EVICT_GRACE_MS;
    sp->evict_below = evict_below_free;
    pthread_mutex_unlock(&sp->mu);
}

static uint64_t free_bytes(const edge_spool_t *sp)
{
    struct statvfs vfs;
    return statvfs(sp->dir, &vfs) < 0 ? UINT64_MAX
                                       : (uint64_t)vfs.f_bavail * (uint64_t)vfs.f_frsize;
}

static int unlink_quiet(const char *path)
{
    return path[0] && unlink(path) < 0 && errno != ENOENT ? -errno : 0;
}

/*
 * Deletes the files of up to EVICT_BATCH uploaded rows done before
 * before_ms, oldest first, and marks them evicted. *n: rows evicted (0 =
 * none left). A row whose file cannot be deleted stays as it is (logged
 * once per pass).
 */
static int evict_batch(edge_spool_t *sp, int64_t now_ms, int64_t before_ms, int *n,
                       uint64_t *bytes, bool *logged)
{
    struct victim {
        int64_t id, size;
        char path[PATH_MAX + 128], up_path[PATH_MAX + 128];
    } *v = cmn_xcalloc(EVICT_BATCH, sizeof(*v));
    int64_t ids[EVICT_BATCH], freed = 0;
    sqlite3_stmt *st;
    int nv = 0, ne = 0, rc;

    *n = 0;
    pthread_mutex_lock(&sp->mu);
    rc = cmn_db_prepare(sp->db, "SELECT id, " CACHED_BYTES_SQL ", path, COALESCE(up_path, '')"
                        " FROM instances WHERE state='DONE' AND evicted_at IS NULL"
                        " AND done_at < ?1 ORDER BY done_at, id LIMIT ?2", &st);
    if (rc == 0) {
        sqlite3_bind_int64(st, 1, before_ms);
        sqlite3_bind_int(st, 2, EVICT_BATCH);
        while (nv < EVICT_BATCH && sqlite3_step(st) == SQLITE_ROW) {
            v[nv].id = sqlite3_column_int64(st, 0);
            v[nv].size = sqlite3_column_int64(st, 1);
            copy_col(v[nv].path, sizeof(v[nv].path), st, 2);
            copy_col(v[nv].up_path, sizeof(v[nv].up_path), st, 3);
            nv++;
        }
        sqlite3_finalize(st);
    }
    pthread_mutex_unlock(&sp->mu);
    if (rc < 0 || nv == 0) {
        free(v);
        return rc;
    }
    for (int i = 0; i < nv; i++) {
        int e = unlink_quiet(v[i].path);
        if (e == 0 && strcmp(v[i].up_path, v[i].path) != 0)
            e = unlink_quiet(v[i].up_path);
        if (e < 0) {
            if (!*logged)
                CMN_LOG_E("spool", "hot cache: cannot delete %s: %s (kept; retried at the next"
                          " pass)", v[i].path, cmn_strerror(e));
            *logged = true;
            continue;
        }
        ids[ne++] = v[i].id;
        freed += v[i].size;
    }
    if (ne > 0) {
        pthread_mutex_lock(&sp->mu);
        rc = cmn_db_exec(sp->db, "BEGIN IMMEDIATE");
        if (rc == 0 && (rc = cmn_db_prepare(sp->db, "UPDATE instances SET evicted_at=?2"
                                            " WHERE id=?1", &st)) == 0) {
            for (int i = 0; i < ne && rc == 0; i++) {
                sqlite3_bind_int64(st, 1, ids[i]);
                sqlite3_bind_int64(st, 2, now_ms);
                rc = step_done(sp, st, 0);
                sqlite3_reset(st);
            }
            sqlite3_finalize(st);
        }
        if (rc == 0 && (rc = counter_add(sp, "evicted_instances", ne, false)) == 0 &&
            (rc = counter_add(sp, "cached_instances", -ne, false)) == 0)
            rc = counter_add(sp, "cached_bytes", -freed, false);
        if (rc == 0)
            rc = cmn_db_exec(sp->db, "COMMIT");
        if (rc < 0)
            cmn_db_exec(sp->db, "ROLLBACK");    /* files gone, rows not: the next pass marks them */
        pthread_mutex_unlock(&sp->mu);
    }
    free(v);
    if (rc == 0)
        *bytes += (uint64_t)freed;
    *n = rc < 0 ? 0 : (ne > 0 ? ne : -1);      /* -1: only undeletable ones left */
    return rc;
}

int edge_spool_evict(edge_spool_t *sp, int64_t now_ms, edge_spool_evicted_t *out)
{
    int64_t keep_ms;
    uint64_t below;
    bool logged = false;
    int n, rc = 0;

    memset(out, 0, sizeof(*out));
    if (sp->readonly)
        return 0;
    pthread_mutex_lock(&sp->mu);
    keep_ms = sp->keep_ms;
    below = sp->evict_below;
    pthread_mutex_unlock(&sp->mu);
    if (keep_ms <= 0)
        return 0;                      /* no policy set */
    /* Past keep_days: all of them. */
    do {
        rc = evict_batch(sp, now_ms, now_ms - keep_ms, &n, &out->bytes, &logged);
        if (n > 0)
            out->aged += n;
    } while (rc == 0 && n > 0);
    /* Short of space: the oldest of the rest, as long as it lasts. */
    while (rc == 0 && below > 0 && free_bytes(sp) < below) {
        rc = evict_batch(sp, now_ms, now_ms - EVICT_GRACE_MS, &n, &out->bytes, &logged);
        if (n <= 0) {
            out->still_short = true;
            break;
        }
        out->early += n;
    }
    return rc;
}

/* ======================================================================
 * Upload groups (bundles) and study manifests - added for the upload
 * engine (edge/upload.c, issue 3 bundles); kept apart from the rest.
 *
 * upload_groups persists which rows travel together in one bundle, so a
 * bundle cut mid-way (or an edge killed) is re-formed with the same
 * members in the same order - the same bytes, hence the same object id,
 * and the cloud's chunks are resumed. study_manifests remembers which
 * manifest (DONE count and highest row id) was last acknowledged per study.
 * The tables are created on first use (no migration number: the block does
 * not touch the numbered schema above).
 * ====================================================================== */

static int group_tables(edge_spool_t *sp)
{
    return cmn_db_exec(sp->db,
                       "CREATE TABLE IF NOT EXISTS upload_groups ("
                       "  id INTEGER PRIMARY KEY,"            /* instances.id */
                       "  grp INTEGER NOT NULL);"             /* lowest member id */
                       "CREATE INDEX IF NOT EXISTS upload_groups_grp ON upload_groups(grp);"
                       "CREATE TABLE IF NOT EXISTS study_manifests ("
                       "  study_uid TEXT PRIMARY KEY,"
                       "  sent_sig TEXT NOT NULL,"            /* '<done count>:<max id>' */
                       "  sent_at INTEGER NOT NULL);");
}

static int cmp_item_id(const void *a, const void *b)
{
    const edge_spool_item_t *x = a, *y = b;
    return x->id < y->id ? -1 : x->id > y->id;
}

int edge_spool_claim_group(edge_spool_t *sp, int64_t now_ms, uint64_t small_max, int max_count,
                           uint64_t max_bytes, edge_spool_item_t *items, int *n,
                           int64_t *next_due_ms)
{
    sqlite3_stmt *st = NULL;
    int rc, count = 0;
    int64_t grp = 0;
    uint64_t bytes;

    *n = 0;
    *next_due_ms = -1;
    if (max_count < 1)
        return 0;
    pthread_mutex_lock(&sp->mu);
    if ((rc = group_tables(sp)) < 0)
        goto out_unlock;
    rc = cmn_db_exec(sp->db, "BEGIN IMMEDIATE");
    if (rc < 0)
        goto out_unlock;
    rc = cmn_db_prepare(sp->db,
                        "SELECT " ITEM_COLS
                        " FROM instances WHERE state='PENDING' AND next_attempt_at <= ?1"
                        " AND up_path IS NOT NULL"
                        " ORDER BY priority DESC, next_attempt_at, id LIMIT 1", &st);
    if (rc < 0)
        goto out_rollback;
    sqlite3_bind_int64(st, 1, now_ms);
    if (sqlite3_step(st) == SQLITE_ROW)
        read_item(st, &items[count++]);
    sqlite3_finalize(st);
    st = NULL;
    if (count == 0)
        goto out_due;

    /* A group formed before (cut, retry, crash) is taken again as it was. */
    rc = cmn_db_prepare(sp->db, "SELECT grp FROM upload_groups WHERE id=?1", &st);
    if (rc < 0)
        goto out_rollback;
    sqlite3_bind_int64(st, 1, items[0].id);
    if (sqlite3_step(st) == SQLITE_ROW)
        grp = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    st = NULL;
    if (grp) {
        rc = cmn_db_prepare(sp->db,
                            "SELECT " ITEM_COLS " FROM instances WHERE state='PENDING'"
                            " AND up_path IS NOT NULL AND id <> ?2"
                            " AND id IN (SELECT id FROM upload_groups WHERE grp=?1)"
                            " ORDER BY id LIMIT ?3", &st);
        if (rc < 0)
            goto out_rollback;
        sqlite3_bind_int64(st, 1, grp);
        sqlite3_bind_int64(st, 2, items[0].id);
        sqlite3_bind_int(st, 3, max_count - 1);
        while (count < max_count && sqlite3_step(st) == SQLITE_ROW)
            read_item(st, &items[count++]);
        sqlite3_finalize(st);
        st = NULL;
    } else if (max_count > 1 && items[0].up_size <= small_max) {
        /* A new group: small due rows of the same study and priority. */
        rc = cmn_db_prepare(sp->db,
                            "SELECT " ITEM_COLS " FROM instances WHERE state='PENDING'"
                            " AND up_path IS NOT NULL AND next_attempt_at <= ?1"
                            " AND study_uid=?2 AND priority=?3 AND up_size <= ?4 AND id <> ?5"
                            " AND id NOT IN (SELECT id FROM upload_groups)"
                            " ORDER BY id LIMIT ?6", &st);
        if (rc < 0)
            goto out_rollback;
        sqlite3_bind_int64(st, 1, now_ms);
        sqlite3_bind_text(st, 2, items[0].study_uid, -1, SQLITE_TRANSIENT);
        sqlite3_bind_int(st, 3, items[0].priority);
        sqlite3_bind_int64(st, 4, (sqlite3_int64)small_max);
        sqlite3_bind_int64(st, 5, items[0].id);
        sqlite3_bind_int(st, 6, max_count - 1);
        bytes = items[0].up_size;
        while (count < max_count && sqlite3_step(st) == SQLITE_ROW) {
            read_item(st, &items[count]);
            if (bytes + items[count].up_size > max_bytes)
                break;
            bytes += items[count].up_size;
            count++;
        }
        sqlite3_finalize(st);
        st = NULL;
        if (count > 1) {
            qsort(items, (size_t)count, sizeof(*items), cmp_item_id);
            rc = cmn_db_prepare(sp->db, "INSERT OR REPLACE INTO upload_groups(id, grp)"
                                        " VALUES(?1, ?2)", &st);
            if (rc < 0)
                goto out_rollback;
            for (int i = 0; i < count; i++) {
                sqlite3_reset(st);
                sqlite3_bind_int64(st, 1, items[i].id);
                sqlite3_bind_int64(st, 2, items[0].id);
                if ((rc = step_done(sp, st, items[i].id)) < 0)
                    goto out_rollback;
            }
            sqlite3_finalize(st);
            st = NULL;
        }
    }
    if (count > 1)
        qsort(items, (size_t)count, sizeof(*items), cmp_item_id);
    rc = cmn_db_prepare(sp->db,
                        "UPDATE instances SET state='UPLOADING', updated_at=?2 WHERE id=?1", &st);
    if (rc < 0)
        goto out_rollback;
    for (int i = 0; i < count; i++) {
        sqlite3_reset(st);
        sqlite3_bind_int64(st, 1, items[i].id);
        sqlite3_bind_int64(st, 2, now_wall_ms());
        if ((rc = step_done(sp, st, items[i].id)) < 0)
            goto out_rollback;
    }
    sqlite3_finalize(st);
    st = NULL;
out_due:
    rc = cmn_db_prepare(sp->db,
                        "SELECT MIN(next_attempt_at) FROM instances WHERE state='PENDING'"
                        " AND up_path IS NOT NULL", &st);
    if (rc < 0)
        goto out_rollback;
    if (sqlite3_step(st) == SQLITE_ROW && sqlite3_column_type(st, 0) != SQLITE_NULL)
        *next_due_ms = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    st = NULL;
    rc = cmn_db_exec(sp->db, "COMMIT");
    if (rc < 0)
        goto out_rollback;
    *n = count;
    goto out_unlock;

out_rollback:
    sqlite3_finalize(st);
    cmn_db_exec(sp->db, "ROLLBACK");
    *next_due_ms = -1;
out_unlock:
    pthread_mutex_unlock(&sp->mu);
    return rc;
}

int edge_spool_mark_done_many(edge_spool_t *sp, const int64_t *ids, int n, uint64_t bytes_sent)
{
    sqlite3_stmt *st = NULL, *del = NULL;
    int64_t now = now_wall_ms(), orig = 0, up = 0, cache = 0, changed = 0;
    int rc;

    pthread_mutex_lock(&sp->mu);
    if ((rc = group_tables(sp)) < 0)
        goto out_unlock;
    rc = cmn_db_exec(sp->db, "BEGIN IMMEDIATE");
    if (rc < 0)
        goto out_unlock;
    if ((rc = cmn_db_prepare(sp->db,
                             "UPDATE instances SET state='DONE', updated_at=?2, done_at=?2,"
                             " last_error=NULL WHERE id=?1 AND state <> 'DONE'"
                             " RETURNING size, COALESCE(up_size, size), " CACHED_BYTES_SQL,
                             &st)) < 0 ||
        (rc = cmn_db_prepare(sp->db, "DELETE FROM upload_groups WHERE id=?1", &del)) < 0)
        goto out_rollback;
    for (int i = 0; i < n; i++) {
        sqlite3_reset(st);
        sqlite3_bind_int64(st, 1, ids[i]);
        sqlite3_bind_int64(st, 2, now);
        int s = sqlite3_step(st);
        if (s == SQLITE_ROW) {
            changed++;
            orig += sqlite3_column_int64(st, 0);
            up += sqlite3_column_int64(st, 1);
            cache += sqlite3_column_int64(st, 2);
            s = sqlite3_step(st);
        }
        if (s != SQLITE_DONE) {
            CMN_LOG_E("spool", "update of id=%lld failed: %s", (long long)ids[i],
                      sqlite3_errmsg(sp->db));
            rc = CMN_EDB;
            goto out_rollback;
        }
        sqlite3_reset(del);
        sqlite3_bind_int64(del, 1, ids[i]);
        if ((rc = step_done(sp, del, ids[i])) < 0)
            goto out_rollback;
    }
    if (bytes_sent && (rc = counter_add(sp, "bytes_sent", (int64_t)bytes_sent, false)) < 0)
        goto out_rollback;
    if (changed && ((rc = counter_add(sp, "last_success_ms", now, true)) < 0 ||
                    (rc = counter_add(sp, "uploaded_instances", changed, false)) < 0 ||
                    (rc = counter_add(sp, "uploaded_bytes", up, false)) < 0 ||
                    (rc = counter_add(sp, "original_bytes_done", orig, false)) < 0 ||
                    (rc = counter_add(sp, "cached_instances", changed, false)) < 0 ||
                    (rc = counter_add(sp, "cached_bytes", cache, false)) < 0))
        goto out_rollback;
    sqlite3_finalize(st);
    sqlite3_finalize(del);
    st = del = NULL;
    rc = cmn_db_exec(sp->db, "COMMIT");
    if (rc < 0)
        goto out_rollback;
    sp->pending_bytes = sp->pending_bytes >= (uint64_t)orig ? sp->pending_bytes - (uint64_t)orig
                                                            : 0;
    goto out_unlock;

out_rollback:
    sqlite3_finalize(st);
    sqlite3_finalize(del);
    cmn_db_exec(sp->db, "ROLLBACK");
out_unlock:
    pthread_mutex_unlock(&sp->mu);
    return rc;
}

int edge_spool_group_dissolve(edge_spool_t *sp, int64_t id)
{
    sqlite3_stmt *st;
    int rc;

    pthread_mutex_lock(&sp->mu);
    if ((rc = group_tables(sp)) == 0 &&
        (rc = cmn_db_prepare(sp->db, "DELETE FROM upload_groups WHERE grp ="
                                     " (SELECT grp FROM upload_groups WHERE id=?1)", &st)) == 0) {
        sqlite3_bind_int64(st, 1, id);
        rc = step_done(sp, st, id);
        sqlite3_finalize(st);
    }
    pthread_mutex_unlock(&sp->mu);
    return rc;
}

int edge_spool_manifest_next(edge_spool_t *sp, int64_t quiet_ms, int max,
                             edge_spool_manifest_t *out)
{
    sqlite3_stmt *st = NULL;
    int rc;

    memset(out, 0, sizeof(*out));
    pthread_mutex_lock(&sp->mu);
    if ((rc = group_tables(sp)) < 0)
        goto out_unlock;
    /* Studies with nothing left to upload, quiet for quiet_ms, whose
     * DONE rows differ from the last acknowledged manifest. */
    rc = cmn_db_prepare(sp->db,
                        "SELECT i.study_uid, COUNT(*) || ':' || MAX(i.id) AS sig"
                        " FROM instances i WHERE i.state='DONE' AND i.up_sha256 IS NOT NULL"
                        " GROUP BY i.study_uid"
                        " HAVING NOT EXISTS (SELECT 1 FROM instances p WHERE"
                        "   p.study_uid=i.study_uid AND p.state IN ('PENDING','UPLOADING'))"
                        " AND (SELECT MAX(created_at) FROM instances q"
                        "   WHERE q.study_uid=i.study_uid) <= ?1"
                        " AND sig IS NOT (SELECT sent_sig FROM study_manifests m"
                        "   WHERE m.study_uid=i.study_uid)"
                        " LIMIT 1", &st);
    if (rc < 0)
        goto out_unlock;
    sqlite3_bind_int64(st, 1, now_wall_ms() - quiet_ms);
    if (sqlite3_step(st) == SQLITE_ROW) {
        copy_col(out->study_uid, sizeof(out->study_uid), st, 0);
        copy_col(out->sig, sizeof(out->sig), st, 1);
    }
    sqlite3_finalize(st);
    st = NULL;
    if (!out->study_uid[0])
        goto out_unlock;
    rc = cmn_db_prepare(sp->db,
                        "SELECT series_uid, sop_uid, up_sha256 FROM instances"
                        " WHERE study_uid=?1 AND state='DONE' AND up_sha256 IS NOT NULL"
                        " ORDER BY id LIMIT ?2", &st);
    if (rc < 0)
        goto out_unlock;
    sqlite3_bind_text(st, 1, out->study_uid, -1, SQLITE_TRANSIENT);
    sqlite3_bind_int(st, 2, max);
    out->e = cmn_xcalloc((size_t)max, sizeof(*out->e));
    while (out->n < max && sqlite3_step(st) == SQLITE_ROW) {
        proto_manifest_entry_t *e = &out->e[out->n++];
        copy_col(e->series_uid, sizeof(e->series_uid), st, 0);
        copy_col(e->sop_uid, sizeof(e->sop_uid), st, 1);
        copy_col(e->sha256, sizeof(e->sha256), st, 2);
    }
    sqlite3_finalize(st);
out_unlock:
    pthread_mutex_unlock(&sp->mu);
    return rc;
}

int edge_spool_manifest_sent(edge_spool_t *sp, const char *study_uid, const char *sig)
{
    sqlite3_stmt *st;
    int rc;

    pthread_mutex_lock(&sp->mu);
    if ((rc = group_tables(sp)) == 0 &&
        (rc = cmn_db_prepare(sp->db, "INSERT OR REPLACE INTO study_manifests(study_uid,"
                                     " sent_sig, sent_at) VALUES(?1, ?2, ?3)", &st)) == 0) {
        sqlite3_bind_text(st, 1, study_uid, -1, SQLITE_TRANSIENT);
        sqlite3_bind_text(st, 2, sig, -1, SQLITE_TRANSIENT);
        sqlite3_bind_int64(st, 3, now_wall_ms());
        rc = step_done(sp, st, 0);
        sqlite3_finalize(st);
    }
    pthread_mutex_unlock(&sp->mu);
    return rc;
}

void edge_spool_manifest_free(edge_spool_manifest_t *m)
{
    free(m->e);
    m->e = NULL;
    m->n = 0;
}
