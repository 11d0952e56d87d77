/*
 * scrub.c - re-hashes archived instances against the index.
 *
 *   yunying-cloud scrub --config F [--limit N] [--json]
 *   and, with scrub.interval_h > 0, periodically inside the daemon.
 *
 * A run checks instances least recently verified first (instances.scrubbed
 * = id of the last run that checked it; 0 = never), so runs with a --limit
 * rotate through the whole archive. For each instance it hashes the archived bytes and compares size
 * and SHA-256 with the index:
 *   directory archive: the file under archive.dir;
 *   S3 archive:        the object (ranged GETs, nothing is cached), and the
 *                      locally cached copy if there is one; a bad cached copy
 *                      is reported ("cache-mismatch") and unlinked, since the
 *                      next read fetches the verified object again.
 * Findings: "missing" (no file / no object), "mismatch" (size or hash
 * differs), "error" (could not be read, e.g. S3 unreachable; the instance is
 * retried next run), "cache-mismatch".
 *
 * Each run is a row in scrub_runs (origin cli|daemon, state running ->
 * done|failed|stopped, counters, heartbeat) with its findings in
 * scrub_findings: the record survives the process and is shared by every
 * node on the same database.
 *
 * Daemon state machine (one per process, loop thread only except `stop`):
 *
 *   IDLE --timer tick--> CLAIMING (work item: claim a due run in the DB)
 *        <--not due---   |  claimed
 *                        v
 *                      RUNNING (same work item) --done/stopped--> IDLE
 *
 * A run is due when no daemon run started within scrub.interval_h hours and
 * none is running (a "running" row whose heartbeat is older than 10 minutes
 * belongs to a dead node and is marked failed). The claim is one BEGIN
 * IMMEDIATE transaction, so two nodes never scrub at once.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "cmn/sql.h"
#include "cmn/errors.h"
#include "cmn/log.h"
#include "internal.h"

#define PAGE 128
#define STALE_S 600              /* a running row without heartbeat this long is dead */
#define TICK_FIRST_MS 1000
#define TICK_MS 60000

const cmn_conf_opt_t cloud__scrub_opts[] = {
    CMN_CONF_OPT_INT(cloud_scrub_conf_t, interval_h, 0, 0, 8760,
                     "the daemon re-hashes the whole archive every this many hours; 0 = off"),
    CMN_CONF_OPT_INT(cloud_scrub_conf_t, rate_mb_s, 0, 0, 100000,
                     "read rate cap of a scrub, MiB/s (spares disks and the bucket); 0 = none"),
};
const size_t cloud__scrub_nopts = CMN_ARRAY_SIZE(cloud__scrub_opts);

typedef struct {
    int64_t checked, bytes, mismatches, missing, errors;
} scrub_stats_t;

typedef struct {
    char *sop_uid;
    char *path;
    char *sha256;
    uint64_t size;
} item_t;

/* Called for each finding (CLI printing); may be NULL. */
typedef void (*finding_cb)(const char *kind, const item_t *it, const char *detail, void *arg);

static atomic_bool stop_flag;

/* ------------------------------------------------------------------- DB */

static int run_begin(cmn_sql_t *db, const char *origin, int64_t *id)
{
    cmn_sql_stmt_t *st;
    int64_t now = cloud_now();

    if (cmn_sql_prepare(db, "INSERT INTO scrub_runs(origin, state, started, heartbeat)"
                           " VALUES (?, 'running', ?, ?) RETURNING id", &st) < 0)
        return CMN_EDB;
    cmn_sql_bind_text(st, 1, origin);
    cmn_sql_bind_int64(st, 2, now);
    cmn_sql_bind_int64(st, 3, now);
    int rc = cmn_sql_step(st);
    if (rc == CMN_SQL_ROW)
        *id = cmn_sql_column_int64(st, 0);
    cmn_sql_finalize(st);
    return rc == CMN_SQL_ROW ? 0 : CMN_EDB;
}

static void run_update(cmn_sql_t *db, int64_t id, const scrub_stats_t *s, const char *state)
{
    cmn_sql_stmt_t *st;
    int64_t now = cloud_now();

    if (cmn_sql_prepare(db, "UPDATE scrub_runs SET heartbeat = ?, checked = ?, bytes = ?,"
                           " mismatches = ?, missing = ?, errors = ?, state = ?,"
                           " finished = CASE WHEN ? = 'running' THEN NULL ELSE ? END"
                           " WHERE id = ?", &st) < 0)
        return;
    cmn_sql_bind_int64(st, 1, now);
    cmn_sql_bind_int64(st, 2, s->checked);
    cmn_sql_bind_int64(st, 3, s->bytes);
    cmn_sql_bind_int64(st, 4, s->mismatches);
    cmn_sql_bind_int64(st, 5, s->missing);
    cmn_sql_bind_int64(st, 6, s->errors);
    cmn_sql_bind_text(st, 7, state);
    cmn_sql_bind_text(st, 8, state);
    cmn_sql_bind_int64(st, 9, now);
    cmn_sql_bind_int64(st, 10, id);
    if (cmn_sql_step(st) != CMN_SQL_DONE)
        CMN_LOG_W("scrub", "run update: %s", cmn_sql_errmsg(db));
    cmn_sql_finalize(st);
}

static void finding_add(cmn_sql_t *db, int64_t run, const item_t *it, const char *kind,
                        const char *detail)
{
    cmn_sql_stmt_t *st;

    if (cmn_sql_prepare(db, "INSERT INTO scrub_findings(run_id, sop_uid, path, kind, detail, ts)"
                           " VALUES (?, ?, ?, ?, ?, ?)", &st) < 0)
        return;
    cmn_sql_bind_int64(st, 1, run);
    cmn_sql_bind_text(st, 2, it->sop_uid);
    cmn_sql_bind_text(st, 3, it->path);
    cmn_sql_bind_text(st, 4, kind);
    cmn_sql_bind_text(st, 5, detail);
    cmn_sql_bind_int64(st, 6, cloud_now());
    if (cmn_sql_step(st) != CMN_SQL_DONE)
        CMN_LOG_W("scrub", "finding insert: %s", cmn_sql_errmsg(db));
    cmn_sql_finalize(st);
}

static void items_free(item_t *it, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(it[i].sop_uid);
        free(it[i].path);
        free(it[i].sha256);
    }
}

/* The next page of instances this run has not checked, least recently verified first. */
static int page_load(cmn_sql_t *db, int64_t run, size_t max, item_t *out, size_t *n)
{
    cmn_sql_stmt_t *st;
    int rc;

    *n = 0;
    if (cmn_sql_prepare(db, "SELECT sop_uid, path, sha256, size FROM instances"
                           " WHERE scrubbed < ? ORDER BY scrubbed, sop_uid LIMIT ?", &st) < 0)
        return CMN_EDB;
    cmn_sql_bind_int64(st, 1, run);
    cmn_sql_bind_int64(st, 2, (int64_t)max);
    while ((rc = cmn_sql_step(st)) == CMN_SQL_ROW) {
        out[*n].sop_uid = cmn_xstrdup(cmn_sql_column_text(st, 0));
        out[*n].path = cmn_xstrdup(cmn_sql_column_text(st, 1));
        out[*n].sha256 = cmn_xstrdup(cmn_sql_column_text(st, 2));
        out[*n].size = (uint64_t)cmn_sql_column_int64(st, 3);
        (*n)++;
    }
    cmn_sql_finalize(st);
    if (rc != CMN_SQL_DONE) {
        items_free(out, *n);
        *n = 0;
        return CMN_EDB;
    }
    return 0;
}

static void mark_scrubbed(cmn_sql_t *db, int64_t run, const item_t *it, size_t n)
{
    cmn_sql_stmt_t *st;
    bool tx = cloud_index_begin(db) == 0;

    if (cmn_sql_prepare(db, "UPDATE instances SET scrubbed = ? WHERE sop_uid = ?", &st) == 0) {
        for (size_t i = 0; i < n; i++) {
            cmn_sql_bind_int64(st, 1, run);
            cmn_sql_bind_text(st, 2, it[i].sop_uid);
            cmn_sql_step(st);
            cmn_sql_reset(st);
        }
        cmn_sql_finalize(st);
    }
    if (tx && cloud_index_commit(db) < 0)
        cloud_index_rollback(db);
}

/* ---------------------------------------------------------------- check */

static double mono_s(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Sleeps so that bytes over the run stay under scrub.rate_mb_s (in steps, to notice stop). */
static void throttle(double t0, int64_t bytes)
{
    long long rate = cloud_conf->scrub.rate_mb_s;

    if (rate <= 0)
        return;
    double due = (double)bytes / (double)(rate << 20);
    while (!atomic_load(&stop_flag)) {
        double ahead = due - (mono_s() - t0);
        if (ahead <= 0)
            break;
        struct timespec ts = { 0, (long)((ahead > 0.2 ? 0.2 : ahead) * 1e9) };
        nanosleep(&ts, NULL);
    }
}

typedef struct {
    cmn_sql_t *db;
    int64_t run;
    scrub_stats_t *s;
    finding_cb cb;
    void *arg;
} ctx_t;

static void report(ctx_t *c, const item_t *it, const char *kind, const char *detail)
{
    if (strcmp(kind, "missing") == 0)
        c->s->missing++;
    else if (strcmp(kind, "error") == 0)
        c->s->errors++;
    else
        c->s->mismatches++;
    finding_add(c->db, c->run, it, kind, detail);
    CMN_LOG_W("scrub", "%s sop=%s detail=%s", kind, it->sop_uid, detail);
    if (c->cb)
        c->cb(kind, it, detail, c->arg);
}

static void check_one(ctx_t *c, const item_t *it)
{
    bool s3 = cloud_archive_is_s3();
    char hex[65], detail[256];
    uint64_t size = 0;
    int rc;

    rc = cloud_archive_hash(it->path, s3, hex, &size);
    c->s->checked++;
    c->s->bytes += (int64_t)size;
    if (rc == CMN_ENOTFOUND) {
        snprintf(detail, sizeof(detail), "%s",
                 s3 ? (cloud_archive_is_local(it->path) ? "object missing from the bucket"
                                                        " (a cached copy exists)"
                                                        : "object missing from the bucket")
                    : "file missing");
        report(c, it, "missing", detail);
        return;
    }
    if (rc < 0) {
        snprintf(detail, sizeof(detail), "cannot read: %s", cmn_strerror(rc));
        report(c, it, "error", detail);
        return;
    }
    if (size != it->size || strcmp(hex, it->sha256) != 0) {
        snprintf(detail, sizeof(detail), "expected size=%" PRIu64 " sha256=%.16s got size=%"
                 PRIu64 " sha256=%.16s", it->size, it->sha256, size, hex);
        report(c, it, "mismatch", detail);
        return;
    }
    if (s3 && cloud_archive_is_local(it->path)) {
        rc = cloud_archive_hash(it->path, false, hex, &size);
        if (rc == 0 && (size != it->size || strcmp(hex, it->sha256) != 0)) {
            snprintf(detail, sizeof(detail), "cached copy differs (size=%" PRIu64
                     " sha256=%.16s); removed, the object is intact", size, hex);
            unlink(it->path);
            report(c, it, "cache-mismatch", detail);
        }
    }
}

/*
 * One scrub run on db: up to limit instances (0 = all). *run_out > 0 is a
 * run row already claimed, else one is inserted. Returns 0 with *s filled
 * (the run finished, findings or not), or CMN_EDB.
 */
static int scrub_run(cmn_sql_t *db, const char *origin, long long limit, finding_cb cb, void *arg,
                     int64_t *run_out, scrub_stats_t *s)
{
    item_t page[PAGE];
    int64_t run;
    double m0 = mono_s();
    long long left = limit > 0 ? limit : -1;
    ctx_t c;
    int rc = 0;

    memset(s, 0, sizeof(*s));
    if (*run_out > 0)
        run = *run_out;
    else if ((rc = run_begin(db, origin, &run)) < 0)
        return rc;
    *run_out = run;
    c = (ctx_t){ db, run, s, cb, arg };
    CMN_LOG_I("scrub", "run=%" PRId64 " origin=%s started limit=%lld", run, origin, limit);
    while (left != 0 && !atomic_load(&stop_flag)) {
        size_t want = left > 0 && left < PAGE ? (size_t)left : PAGE, n;
        if ((rc = page_load(db, run, want, page, &n)) < 0)
            break;
        if (n == 0)
            break;
        size_t done = 0;
        for (; done < n && !atomic_load(&stop_flag); done++) {
            check_one(&c, &page[done]);
            throttle(m0, s->bytes);
        }
        mark_scrubbed(db, run, page, done);
        items_free(page, n);
        if (left > 0)
            left -= (long long)done;
        run_update(db, run, s, "running");
    }
    const char *state = rc < 0 ? "failed" : atomic_load(&stop_flag) ? "stopped" : "done";
    run_update(db, run, s, state);
    CMN_LOG_I("scrub", "run=%" PRId64 " %s checked=%" PRId64 " bytes=%" PRId64
              " mismatches=%" PRId64 " missing=%" PRId64 " errors=%" PRId64 " seconds=%.1f",
              run, state, s->checked, s->bytes, s->mismatches, s->missing, s->errors,
              mono_s() - m0);
    return rc;
}

/* ------------------------------------------------------------------ CLI */

static void cli_finding(const char *kind, const item_t *it, const char *detail, void *arg)
{
    json_t *list = arg;

    if (list)
        json_array_append_new(list, json_pack("{s:s, s:s, s:s, s:s}", "kind", kind, "sop_uid",
                                              it->sop_uid, "path", it->path, "detail", detail));
    else
        printf("%-14s sop=%s path=%s %s\n", kind, it->sop_uid, it->path, detail);
}

int cloud_scrub_cmd(long long limit, bool json)
{
    json_t *list = json ? json_array() : NULL;
    scrub_stats_t s;
    int64_t run = 0;   /* inserted by scrub_run */
    cmn_sql_t *db;
    int rc;

    db = cloud_index_get();
    if (!db) {
        fprintf(stderr, "yunying-cloud: cannot open the index\n");
        json_decref(list);
        return 2;
    }
    rc = scrub_run(db, "cli", limit, cli_finding, list, &run, &s);
    cloud_index_put(db);
    if (rc < 0) {
        fprintf(stderr, "yunying-cloud: scrub failed: %s\n", cmn_strerror(rc));
        json_decref(list);
        return 2;
    }
    if (json) {
        json_t *o = json_pack("{s:i, s:I, s:I, s:I, s:I, s:I, s:I, s:o}", "v", 1, "run",
                              (json_int_t)run, "checked", (json_int_t)s.checked, "bytes",
                              (json_int_t)s.bytes, "mismatches", (json_int_t)s.mismatches,
                              "missing", (json_int_t)s.missing, "errors", (json_int_t)s.errors,
                              "findings", list);
        char *text = json_dumps(o, JSON_INDENT(1));
        if (text)
            printf("%s\n", text);
        free(text);
        json_decref(o);
    } else {
        printf("scrub run %" PRId64 ": %" PRId64 " checked, %" PRId64 " bytes, %" PRId64
               " mismatches, %" PRId64 " missing, %" PRId64 " errors\n", run, s.checked,
               s.bytes, s.mismatches, s.missing, s.errors);
    }
    return s.mismatches || s.missing || s.errors ? 1 : 0;
}

/* --------------------------------------------------------------- daemon */

typedef enum { SCRUB_IDLE, SCRUB_WORKING, SCRUB_CLOSING } scrub_state_t;

static struct {
    uv_timer_t timer;
    uv_work_t work;
    scrub_state_t state;
    bool started;
} dm;

/* Claims a due daemon run (inserts its row): true with *run set when this node scrubs now. */
static bool claim_due(cmn_sql_t *db, int64_t *run)
{
    int64_t now = cloud_now(), last = 0;
    bool running = false;
    cmn_sql_stmt_t *st;

    if (cloud_index_begin(db) < 0)
        return false;
    if (cmn_sql_prepare(db, "UPDATE scrub_runs SET state = 'failed', finished = ?1"
                           " WHERE state = 'running' AND heartbeat < ?2", &st) == 0) {
        cmn_sql_bind_int64(st, 1, now);
        cmn_sql_bind_int64(st, 2, now - STALE_S);
        cmn_sql_step(st);
        cmn_sql_finalize(st);
    }
    if (cmn_sql_prepare(db, "SELECT coalesce(max(started), 0),"
                           " coalesce(max(CASE WHEN state = 'running' THEN 1 ELSE 0 END), 0)"
                           " FROM scrub_runs WHERE origin = 'daemon'", &st) == 0) {
        if (cmn_sql_step(st) == CMN_SQL_ROW) {
            last = cmn_sql_column_int64(st, 0);
            running = cmn_sql_column_int(st, 1) != 0;
        }
        cmn_sql_finalize(st);
    }
    if (running || now - last < cloud_conf->scrub.interval_h * 3600) {
        cloud_index_rollback(db);
        return false;
    }
    if (run_begin(db, "daemon", run) < 0) {
        cloud_index_rollback(db);
        return false;
    }
    if (cloud_index_commit(db) < 0) {
        cloud_index_rollback(db);
        return false;
    }
    return true;
}

static void work_cb(uv_work_t *req)
{
    scrub_stats_t s;
    int64_t run = 0;
    cmn_sql_t *db;

    (void)req;
    db = cloud_index_get();
    if (!db)
        return;
    if (claim_due(db, &run))
        (void)scrub_run(db, "daemon", 0, NULL, NULL, &run, &s);
    cloud_index_put(db);
}

static void after_work_cb(uv_work_t *req, int status)
{
    (void)req;
    (void)status;
    if (dm.state == SCRUB_WORKING)
        dm.state = SCRUB_IDLE;
}

static void on_tick(uv_timer_t *t)
{
    (void)t;
    if (dm.state != SCRUB_IDLE)
        return;
    if (uv_queue_work(t->loop, &dm.work, work_cb, after_work_cb) == 0)
        dm.state = SCRUB_WORKING;
}

int cloud_scrub_daemon_start(uv_loop_t *loop)
{
    int rc;

    if (cloud_conf->scrub.interval_h <= 0)
        return 0;
    atomic_store(&stop_flag, false);
    memset(&dm, 0, sizeof(dm));
    if ((rc = uv_timer_init(loop, &dm.timer)) < 0)
        return rc;
    dm.started = true;
    dm.state = SCRUB_IDLE;
    CMN_LOG_I("scrub", "periodic scrub every %lld h", cloud_conf->scrub.interval_h);
    return uv_timer_start(&dm.timer, on_tick, TICK_FIRST_MS, TICK_MS);
}

void cloud_scrub_daemon_stop(void)
{
    atomic_store(&stop_flag, true);
    if (!dm.started)
        return;
    dm.started = false;
    dm.state = SCRUB_CLOSING;
    uv_timer_stop(&dm.timer);
    uv_close((uv_handle_t *)&dm.timer, NULL);
}
