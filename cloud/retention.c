/*
 * retention.c - the retention policy engine and the storage report.
 *
 *   yunying-cloud retention-plan  --config F [--json] [--limit N]
 *   yunying-cloud retention-apply --config F --confirm [--json] [--limit N]
 *   yunying-cloud storage-report  --config F [--json]
 *
 * Policy: a study stays online at least retention.min_days (>= 1095 days,
 * three years; the option cannot be set lower). Nothing is ever deleted
 * implicitly: the daemon never deletes, and only retention-apply --confirm
 * does, for the studies the configured policy makes eligible at that moment.
 * The policy today is one rule: retention.delete_after_days (0 = never)
 * makes a study eligible once it is older than
 * max(delete_after_days, min_days) days.
 *
 * A study's age counts from the NEWEST of: its first archiving
 * (studies.created), its most recently archived instance, and its Study
 * Date. A study that keeps receiving instances, or an old exam sent today,
 * therefore stays its full time; a future or unparsable Study Date never
 * makes a study older.
 *
 * Apply, per study: delete every archived file (S3 object + local cached
 * copy, or the directory file), the conflicting copies kept aside for its
 * instances and the transcoding cache entries; only when all of them are
 * gone, delete the index rows (instances, conflicts, series, study, a
 * patient left without studies, viewer annotations) in one transaction with
 * an audit row (user "system:retention", action "retention-delete"). A
 * failed file deletion leaves the study indexed and is retried by the next
 * apply (deleting is idempotent). Instances archived after the plan was
 * computed are not deleted (the study then stays).
 *
 * Storage report: archived instances and bytes (as indexed, i.e. the sizes
 * whose SHA-256 the scrub verifies) by hospital, modality and month. The
 * hospital is the sending edge's id (instances.source; "stow:<user>" for
 * STOW-RS, "(unknown)" for instances archived before it was recorded) until
 * edges are mapped to hospitals. The month is the month of archiving (UTC).
 */
#include <dirent.h>
#include <inttypes.h>
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

#define DAY 86400
#define MIN_DAYS_FLOOR 1095      /* three years */

const cmn_conf_opt_t cloud__retention_opts[] = {
    CMN_CONF_OPT_INT(cloud_retention_conf_t, min_days, MIN_DAYS_FLOOR, MIN_DAYS_FLOOR, 36500,
                     "a study stays online at least this many days (three years minimum)"),
    CMN_CONF_OPT_INT(cloud_retention_conf_t, delete_after_days, 0, 0, 36500,
                     "policy: retention-apply may delete studies older than this many days"
                     " (never below min_days); 0 = no study is ever eligible"),
};
const size_t cloud__retention_nopts = CMN_ARRAY_SIZE(cloud__retention_opts);

typedef struct {
    char *study_uid;             /* malloc'd */
    int64_t newest;              /* age reference, unix seconds */
    int64_t instances;
    int64_t bytes;
    char *sources;               /* malloc'd, comma-separated */
} plan_row_t;

/* YYYYMMDD -> unix seconds (UTC midnight); -1 when not a date. */
static int64_t date_epoch(const char *d)
{
    struct tm tm;

    if (strlen(d) != 8 || strspn(d, "0123456789") != 8)
        return -1;
    memset(&tm, 0, sizeof(tm));
    tm.tm_year = (d[0] - '0') * 1000 + (d[1] - '0') * 100 + (d[2] - '0') * 10 + (d[3] - '0') - 1900;
    tm.tm_mon = (d[4] - '0') * 10 + (d[5] - '0') - 1;
    tm.tm_mday = (d[6] - '0') * 10 + (d[7] - '0');
    if (tm.tm_mon < 0 || tm.tm_mon > 11 || tm.tm_mday < 1 || tm.tm_mday > 31)
        return -1;
    return (int64_t)timegm(&tm);
}

/* The effective deletion age in days, 0 when the policy deletes nothing. */
static long long effective_days(void)
{
    const cloud_retention_conf_t *r = &cloud_conf->retention;

    if (r->delete_after_days <= 0)
        return 0;
    return r->delete_after_days > r->min_days ? r->delete_after_days : r->min_days;
}

static void plan_free(plan_row_t *rows, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(rows[i].study_uid);
        free(rows[i].sources);
    }
    free(rows);
}

/*
 * The studies eligible now (cutoff = now - effective days), oldest first.
 * The SQL filter uses the archive times; the Study Date is checked here.
 */
static int plan_compute(cmn_sql_t *db, int64_t cutoff, long long limit, plan_row_t **out,
                        size_t *nout)
{
    /* The sources of a study joined with ','; PostgreSQL's built-in
     * string_agg rather than the schema's SQL-language group_concat, which
     * runs a function call per value. */
    static const char sql_fmt[] =
        "SELECT s.study_uid, s.study_date, s.created,"
        "  coalesce(max(i.created), 0), count(i.sop_uid), coalesce(sum(i.size), 0),"
        "  coalesce(%s(DISTINCT CASE WHEN i.source = '' THEN '(unknown)'"
        "    ELSE i.source END%s), '')"
        " FROM studies s LEFT JOIN instances i ON i.study_uid = s.study_uid"
        " WHERE s.created <= ?1"
        " GROUP BY s.study_uid"
        " HAVING coalesce(max(i.created), 0) <= ?1"
        " ORDER BY CASE WHEN s.created > coalesce(max(i.created), 0) THEN s.created"
        "   ELSE coalesce(max(i.created), 0) END, s.study_uid";
    plan_row_t *rows = NULL;
    size_t n = 0, cap = 0;
    cmn_sql_stmt_t *st;
    int rc;

    char sql[sizeof(sql_fmt) + 32];
    bool pg = cmn_sql_engine(db) == CMN_SQL_PG;

    *out = NULL;
    *nout = 0;
    snprintf(sql, sizeof(sql), sql_fmt, pg ? "string_agg" : "group_concat", pg ? ", ','" : "");
    if (cmn_sql_prepare(db, sql, &st) < 0)
        return CMN_EDB;
    cmn_sql_bind_int64(st, 1, cutoff);
    while ((rc = cmn_sql_step(st)) == CMN_SQL_ROW) {
        const char *date = cmn_sql_column_text(st, 1);
        int64_t created = cmn_sql_column_int64(st, 2);
        int64_t inst = cmn_sql_column_int64(st, 3);
        int64_t d = date_epoch(date ? date : "");
        int64_t newest = created > inst ? created : inst;

        if (d > newest)
            newest = d;
        if (newest > cutoff)
            continue;
        if (limit > 0 && (long long)n >= limit)
            break;
        if (n == cap) {
            cap = cap ? cap * 2 : 64;
            rows = cmn_xrealloc(rows, cap * sizeof(*rows));
        }
        rows[n].study_uid = cmn_xstrdup(cmn_sql_column_text(st, 0));
        rows[n].newest = newest;
        rows[n].instances = cmn_sql_column_int64(st, 4);
        rows[n].bytes = cmn_sql_column_int64(st, 5);
        rows[n].sources = cmn_xstrdup(cmn_sql_column_text(st, 6));
        n++;
    }
    if (rc != CMN_SQL_ROW && rc != CMN_SQL_DONE) {
        CMN_LOG_E("retention", "plan query: %s", cmn_sql_errmsg(db));
        cmn_sql_finalize(st);
        plan_free(rows, n);
        return CMN_EDB;
    }
    cmn_sql_finalize(st);
    *out = rows;
    *nout = n;
    return 0;
}

static void fmt_date(int64_t t, char out[11])
{
    time_t tt = (time_t)t;
    struct tm tm;

    gmtime_r(&tt, &tm);
    strftime(out, 11, "%Y-%m-%d", &tm);
}

/* ------------------------------------------------------------ deletion */

/* Unlinks the transcoding cache entries of one archived file (<staging>/.cache/<sha>.*). */
static void drop_transcodes(const char *sha)
{
    char dir[4096], path[4400];
    struct dirent *de;
    DIR *d;

    if (strlen(sha) != 64)
        return;
    snprintf(dir, sizeof(dir), "%s/.cache/%.2s", cloud_conf->ingest.staging_dir, sha);
    d = opendir(dir);
    if (!d)
        return;
    while ((de = readdir(d)) != NULL) {
        if (strncmp(de->d_name, sha, 64) == 0 && de->d_name[64] == '.') {
            snprintf(path, sizeof(path), "%s/%s", dir, de->d_name);
            unlink(path);
        }
    }
    closedir(d);
}

typedef struct {
    char *sop_uid;
    char *path;
    char *sha256;
} victim_t;

static void victims_free(victim_t *v, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(v[i].sop_uid);
        free(v[i].path);
        free(v[i].sha256);
    }
    free(v);
}

/* The instances of a study archived at or before cutoff, plus their conflicting copies. */
static int study_victims(cmn_sql_t *db, const char *study, int64_t cutoff, victim_t **out,
                         size_t *nout)
{
    static const char sql[] =
        "SELECT sop_uid, path, sha256 FROM instances WHERE study_uid = ?1 AND created <= ?2"
        " UNION ALL"
        " SELECT c.sop_uid, c.path, c.sha256 FROM conflicts c JOIN instances i"
        "   ON i.sop_uid = c.sop_uid WHERE i.study_uid = ?1 AND i.created <= ?2";
    victim_t *v = NULL;
    size_t n = 0, cap = 0;
    cmn_sql_stmt_t *st;
    int rc;

    if (cmn_sql_prepare(db, sql, &st) < 0)
        return CMN_EDB;
    cmn_sql_bind_text(st, 1, study);
    cmn_sql_bind_int64(st, 2, cutoff);
    while ((rc = cmn_sql_step(st)) == CMN_SQL_ROW) {
        if (n == cap) {
            cap = cap ? cap * 2 : 64;
            v = cmn_xrealloc(v, cap * sizeof(*v));
        }
        v[n].sop_uid = cmn_xstrdup(cmn_sql_column_text(st, 0));
        v[n].path = cmn_xstrdup(cmn_sql_column_text(st, 1));
        v[n].sha256 = cmn_xstrdup(cmn_sql_column_text(st, 2));
        n++;
    }
    cmn_sql_finalize(st);
    if (rc != CMN_SQL_DONE) {
        victims_free(v, n);
        return CMN_EDB;
    }
    *out = v;
    *nout = n;
    return 0;
}

static int exec_bound(cmn_sql_t *db, const char *sql, const char *study, int64_t cutoff)
{
    cmn_sql_stmt_t *st;
    int rc;

    if (cmn_sql_prepare(db, sql, &st) < 0)
        return CMN_EDB;
    cmn_sql_bind_text(st, 1, study);
    if (cmn_sql_param_count(st) >= 2)
        cmn_sql_bind_int64(st, 2, cutoff);
    rc = cmn_sql_step(st);
    cmn_sql_finalize(st);
    if (rc != CMN_SQL_DONE) {
        CMN_LOG_E("retention", "delete: %s", cmn_sql_errmsg(db));
        return CMN_EDB;
    }
    return 0;
}

/* Index rows of the deleted instances and what they leave empty; one transaction. */
static int study_unindex(cmn_sql_t *db, const char *study, int64_t cutoff)
{
    static const char *const sqls[] = {
        "DELETE FROM conflicts WHERE sop_uid IN (SELECT sop_uid FROM instances"
        "  WHERE study_uid = ?1 AND created <= ?2)",
        "DELETE FROM instances WHERE study_uid = ?1 AND created <= ?2",
        "DELETE FROM series WHERE study_uid = ?1 AND NOT EXISTS"
        "  (SELECT 1 FROM instances i WHERE i.series_uid = series.series_uid)",
        "DELETE FROM annotations WHERE study_uid = ?1 AND NOT EXISTS"
        "  (SELECT 1 FROM instances WHERE study_uid = ?1)",
        "DELETE FROM studies WHERE study_uid = ?1 AND NOT EXISTS"
        "  (SELECT 1 FROM instances WHERE study_uid = ?1)",
    };
    cmn_sql_stmt_t *st;
    int64_t ppk = -1;
    int rc;

    if (cloud_index_begin(db) < 0)
        return CMN_EDB;
    /* The study's patient, removed after the study if no other study is left. */
    rc = CMN_EDB;
    if (cmn_sql_prepare(db, "SELECT patient_pk FROM studies WHERE study_uid = ?", &st) < 0)
        goto out_rollback;
    cmn_sql_bind_text(st, 1, study);
    rc = cmn_sql_step(st);
    if (rc == CMN_SQL_ROW)
        ppk = cmn_sql_column_int64(st, 0);
    cmn_sql_finalize(st);
    if (rc < 0)
        goto out_rollback;
    for (size_t i = 0; i < CMN_ARRAY_SIZE(sqls); i++)
        if ((rc = exec_bound(db, sqls[i], study, cutoff)) < 0)
            goto out_rollback;
    if (ppk >= 0) {
        rc = CMN_EDB;
        if (cmn_sql_prepare(db, "DELETE FROM patients WHERE pk = ? AND NOT EXISTS"
                                " (SELECT 1 FROM studies s WHERE s.patient_pk = patients.pk)",
                            &st) < 0)
            goto out_rollback;
        cmn_sql_bind_int64(st, 1, ppk);
        rc = cmn_sql_step(st);
        cmn_sql_finalize(st);
        if (rc < 0) {
            CMN_LOG_E("retention", "delete patient: %s", cmn_sql_errmsg(db));
            goto out_rollback;
        }
    }
    cloud_index_audit(db, "system:retention", "retention-delete", study, "cli");
    if ((rc = cloud_index_commit(db)) < 0)
        goto out_rollback;
    return 0;

out_rollback:
    cloud_index_rollback(db);
    return rc;
}

/* Deletes one planned study. 0, or < 0 with the study left indexed. */
static int study_delete(cmn_sql_t *db, const char *study, int64_t cutoff, int64_t *files)
{
    victim_t *v = NULL;
    size_t n = 0;
    int rc, failed = 0;

    *files = 0;
    if ((rc = study_victims(db, study, cutoff, &v, &n)) < 0)
        return rc;
    for (size_t i = 0; i < n; i++) {
        rc = cloud_archive_delete(v[i].path);
        if (rc < 0) {
            CMN_LOG_E("retention", "delete study=%s sop=%s: %s", study, v[i].sop_uid,
                      cmn_strerror(rc));
            failed = rc;
            continue;
        }
        drop_transcodes(v[i].sha256);
        (*files)++;
    }
    victims_free(v, n);
    if (failed)
        return failed;
    return study_unindex(db, study, cutoff);
}

/* -------------------------------------------------------------- command */

int cloud_retention_cmd(bool apply, bool confirm, bool json, long long limit)
{
    long long days = effective_days();
    int64_t now = cloud_now();
    int64_t cutoff = now - (int64_t)days * DAY;
    plan_row_t *rows = NULL;
    size_t n = 0, deleted = 0, failed = 0;
    int64_t bytes = 0;
    json_t *jout = NULL, *jlist = NULL;
    cmn_sql_t *db;
    int rc, code = 0;

    if (apply && !confirm) {
        fprintf(stderr, "yunying-cloud: retention-apply deletes archived studies for good;"
                        " run retention-plan to see which, then add --confirm\n");
        return 2;
    }
    db = cloud_index_get();
    if (!db) {
        fprintf(stderr, "yunying-cloud: cannot open the index\n");
        return 2;
    }
    if (days > 0 && (rc = plan_compute(db, cutoff, limit, &rows, &n)) < 0) {
        fprintf(stderr, "yunying-cloud: retention plan failed: %s\n", cmn_strerror(rc));
        cloud_index_put(db);
        return 2;
    }
    if (json) {
        jout = json_pack("{s:i, s:I, s:I, s:I, s:b}", "v", 1, "min_days",
                         (json_int_t)cloud_conf->retention.min_days, "delete_after_days",
                         (json_int_t)cloud_conf->retention.delete_after_days, "effective_days",
                         (json_int_t)days, "apply", apply);
        jlist = json_array();
    } else {
        if (days == 0)
            printf("retention: no deletion policy (retention.delete_after_days = 0):"
                   " no study is eligible\n");
        else if (cloud_conf->retention.delete_after_days < cloud_conf->retention.min_days)
            printf("retention: delete_after_days %lld is below min_days %lld; using %lld\n",
                   cloud_conf->retention.delete_after_days, cloud_conf->retention.min_days, days);
        if (days > 0)
            printf("retention: studies whose newest activity is older than %lld days\n", days);
    }
    for (size_t i = 0; i < n; i++) {
        char date[11];
        const char *status = "eligible";
        int64_t files = 0;

        fmt_date(rows[i].newest, date);
        if (apply) {
            rc = study_delete(db, rows[i].study_uid, cutoff, &files);
            if (rc < 0) {
                status = "failed";
                failed++;
            } else {
                status = "deleted";
                deleted++;
                bytes += rows[i].bytes;
                CMN_LOG_I("retention", "deleted study=%s instances=%" PRId64 " files=%" PRId64,
                          rows[i].study_uid, rows[i].instances, files);
            }
        }
        if (json) {
            json_array_append_new(
                jlist, json_pack("{s:s, s:s, s:I, s:I, s:I, s:s, s:s}", "study_uid",
                                 rows[i].study_uid, "newest", date, "age_days",
                                 (json_int_t)((now - rows[i].newest) / DAY), "instances",
                                 (json_int_t)rows[i].instances, "bytes",
                                 (json_int_t)rows[i].bytes, "sources", rows[i].sources,
                                 "status", status));
        } else {
            printf("%-8s %s newest=%s age_days=%" PRId64 " instances=%" PRId64
                   " bytes=%" PRId64 " sources=%s\n",
                   status, rows[i].study_uid, date, (now - rows[i].newest) / DAY,
                   rows[i].instances, rows[i].bytes, rows[i].sources);
        }
    }
    if (json) {
        json_object_set_new(jout, "studies", jlist);
        if (apply) {
            json_object_set_new(jout, "deleted", json_integer((json_int_t)deleted));
            json_object_set_new(jout, "failed", json_integer((json_int_t)failed));
        }
        char *text = json_dumps(jout, JSON_INDENT(1));
        if (text)
            printf("%s\n", text);
        free(text);
        json_decref(jout);
    } else if (apply) {
        printf("retention: %zu studies deleted (%" PRId64 " bytes), %zu failed\n", deleted,
               bytes, failed);
    } else {
        printf("retention: %zu studies eligible\n", n);
    }
    if (apply)
        CMN_LOG_I("retention", "apply eligible=%zu deleted=%zu failed=%zu", n, deleted, failed);
    if (failed)
        code = 1;
    plan_free(rows, n);
    cloud_index_put(db);
    return code;
}

/* ------------------------------------------------------- storage report */

typedef struct {
    char key[160];
    int64_t instances;
    int64_t bytes;
} agg_t;

static void agg_add(agg_t **a, size_t *n, const char *key, int64_t inst, int64_t bytes)
{
    for (size_t i = 0; i < *n; i++) {
        if (strcmp((*a)[i].key, key) == 0) {
            (*a)[i].instances += inst;
            (*a)[i].bytes += bytes;
            return;
        }
    }
    *a = cmn_xrealloc(*a, (*n + 1) * sizeof(**a));
    snprintf((*a)[*n].key, sizeof((*a)[*n].key), "%s", key);
    (*a)[*n].instances = inst;
    (*a)[*n].bytes = bytes;
    (*n)++;
}

static int agg_cmp(const void *x, const void *y)
{
    return strcmp(((const agg_t *)x)->key, ((const agg_t *)y)->key);
}

static json_t *agg_json(agg_t *a, size_t n, const char *name)
{
    json_t *arr = json_array();

    qsort(a, n, sizeof(*a), agg_cmp);
    for (size_t i = 0; i < n; i++)
        json_array_append_new(arr, json_pack("{s:s, s:I, s:I}", name, a[i].key, "instances",
                                             (json_int_t)a[i].instances, "bytes",
                                             (json_int_t)a[i].bytes));
    return arr;
}

static void agg_print(agg_t *a, size_t n, const char *title)
{
    qsort(a, n, sizeof(*a), agg_cmp);
    printf("\nby %s:\n", title);
    for (size_t i = 0; i < n; i++)
        printf("  %-32s %10" PRId64 " instances %16" PRId64 " bytes\n", a[i].key,
               a[i].instances, a[i].bytes);
}

int cloud_storage_report_cmd(bool json)
{
    static const char sql[] =
        "SELECT hospital, modality, month, count(*), coalesce(sum(size), 0)"
        " FROM storage_report_rows GROUP BY 1, 2, 3 ORDER BY 1, 2, 3";
    agg_t *hosp = NULL, *mod = NULL, *month = NULL;
    size_t nh = 0, nm = 0, nmo = 0;
    int64_t total_i = 0, total_b = 0, conf_i = 0, conf_b = 0;
    json_t *jrows = json ? json_array() : NULL;
    cmn_sql_stmt_t *st;
    cmn_sql_t *db;
    int rc, code = 0;

    db = cloud_index_get();
    if (!db) {
        fprintf(stderr, "yunying-cloud: cannot open the index\n");
        json_decref(jrows);
        return 2;
    }
    if (cmn_sql_prepare(db, sql, &st) < 0) {
        code = 2;
        goto out;
    }
    if (!json)
        printf("%-24s %-8s %-7s %10s %16s\n", "hospital (edge id)", "modality", "month",
               "instances", "bytes");
    while ((rc = cmn_sql_step(st)) == CMN_SQL_ROW) {
        const char *h = cmn_sql_column_text(st, 0);
        const char *m = cmn_sql_column_text(st, 1);
        const char *mo = cmn_sql_column_text(st, 2);
        int64_t ni = cmn_sql_column_int64(st, 3), nb = cmn_sql_column_int64(st, 4);

        mo = mo ? mo : "";
        agg_add(&hosp, &nh, h, ni, nb);
        agg_add(&mod, &nm, m, ni, nb);
        agg_add(&month, &nmo, mo, ni, nb);
        total_i += ni;
        total_b += nb;
        if (json)
            json_array_append_new(jrows, json_pack("{s:s, s:s, s:s, s:I, s:I}", "hospital", h,
                                                   "modality", m, "month", mo, "instances",
                                                   (json_int_t)ni, "bytes", (json_int_t)nb));
        else
            printf("%-24s %-8s %-7s %10" PRId64 " %16" PRId64 "\n", h, m, mo, ni, nb);
    }
    cmn_sql_finalize(st);
    if (rc != CMN_SQL_DONE) {
        CMN_LOG_E("report", "query: %s", cmn_sql_errmsg(db));
        code = 2;
        goto out;
    }
    if (cmn_sql_prepare(db, "SELECT count(*) FROM conflicts", &st) == 0) {
        if (cmn_sql_step(st) == CMN_SQL_ROW)
            conf_i = cmn_sql_column_int64(st, 0);
        cmn_sql_finalize(st);
    }
    (void)conf_b;   /* conflicting copies' sizes are not indexed; counted only */
    if (json) {
        json_t *o = json_pack("{s:i, s:I, s:{s:I, s:I}, s:{s:I}, s:s}", "v", 1, "generated",
                              (json_int_t)cloud_now(), "total", "instances",
                              (json_int_t)total_i, "bytes", (json_int_t)total_b, "conflicts",
                              "instances", (json_int_t)conf_i, "hospital_is", "edge_id");
        json_object_set_new(o, "by_hospital", agg_json(hosp, nh, "hospital"));
        json_object_set_new(o, "by_modality", agg_json(mod, nm, "modality"));
        json_object_set_new(o, "by_month", agg_json(month, nmo, "month"));
        json_object_set(o, "rows", jrows);
        char *text = json_dumps(o, JSON_INDENT(1));
        if (text)
            printf("%s\n", text);
        free(text);
        json_decref(o);
    } else {
        agg_print(hosp, nh, "hospital (edge id)");
        agg_print(mod, nm, "modality");
        agg_print(month, nmo, "month archived (UTC)");
        printf("\ntotal: %" PRId64 " instances, %" PRId64 " bytes; conflicting copies kept"
               " aside: %" PRId64 "\n", total_i, total_b, conf_i);
    }
out:
    json_decref(jrows);
    free(hosp);
    free(mod);
    free(month);
    cloud_index_put(db);
    if (code)
        fprintf(stderr, "yunying-cloud: storage-report failed\n");
    return code;
}
