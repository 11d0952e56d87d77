/*
 * dicomweb.c - DICOMweb (PS3.18) over the index and the archive.
 *
 *   QIDO-RS  GET /dicomweb/studies
 *            GET /dicomweb/studies/{s}/series
 *            GET /dicomweb/studies/{s}/series/{se}/instances
 *   WADO-RS  GET /dicomweb/studies/{s}[/series/{se}[/instances/{i}]]
 *                  multipart/related; type="application/dicom"
 *            GET .../metadata                 application/dicom+json
 *            GET .../instances/{i}/frames/{n[,m...]}   native pixel data
 *            GET .../instances/{i}/bulk       the whole Pixel Data value
 *   WADO-URI GET /wado?requestType=WADO&studyUID=&seriesUID=&objectUID=
 *                  [&contentType=application/dicom]
 *
 * Every request needs a session (auth.c) and leaves an audit row. Files are
 * answered as file segments of the response, so the server streams them
 * from disk; only metadata is assembled in memory.
 *
 * QIDO matching: PatientName, PatientID and AccessionNumber accept the
 * wildcards '*' and '?' (PatientName case-insensitively); StudyDate is exact
 * or a range A-B, A- or -B; UIDs may be lists (comma or backslash).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#include <jansson.h>

#include "cmn/buf.h"
#include "cmn/crypto.h"
#include "cmn/db.h"
#include "cmn/errors.h"
#include "cmn/log.h"
#include "proto/proto.h"
#include "internal.h"

#define ROOT "/dicomweb"
#define QIDO_DEFAULT_LIMIT 1000
#define QIDO_MAX_LIMIT 10000
#define MAX_PARAMS 96
#define MAX_SEGS 8
#define MAX_FRAMES 256

typedef enum { LEVEL_STUDY, LEVEL_SERIES, LEVEL_INSTANCE } level_t;

/* ------------------------------------------------------------ SQL builder */

typedef struct {
    cmn_buf_t where;             /* " AND ..." clauses */
    char *params[MAX_PARAMS];    /* owned text parameters, bound in order */
    int nparams;
    long long limit, offset;
    char err[160];               /* first query error, for the 400 */
} query_t;

static void query_init(query_t *q)
{
    memset(q, 0, sizeof(*q));
    cmn_buf_init(&q->where, 0);
    q->limit = QIDO_DEFAULT_LIMIT;
}

static void query_free(query_t *q)
{
    cmn_buf_free(&q->where);
    for (int i = 0; i < q->nparams; i++)
        free(q->params[i]);
}

static bool query_fail(query_t *q, const char *fmt, const char *arg)
{
    if (!q->err[0])
        snprintf(q->err, sizeof(q->err), fmt, arg);
    return false;
}

static bool add_param(query_t *q, const char *v, size_t n)
{
    char *p;

    if (q->nparams >= MAX_PARAMS)
        return query_fail(q, "too many query values%s", "");
    p = cmn_xmalloc(n + 1);
    memcpy(p, v, n);
    p[n] = '\0';
    q->params[q->nparams++] = p;
    return true;
}

static bool has_wildcard(const char *v)
{
    return strpbrk(v, "*?") != NULL;
}

/* Translates a DICOM wildcard pattern to a LIKE pattern with '\' escapes. */
static bool add_like_param(query_t *q, const char *v)
{
    char out[2048];
    size_t n = 0;

    for (const char *p = v; *p; p++) {
        if (n + 3 >= sizeof(out))
            return query_fail(q, "query value too long%s", "");
        switch (*p) {
        case '*': out[n++] = '%'; break;
        case '?': out[n++] = '_'; break;
        case '%':
        case '_':
        case '\\':
            out[n++] = '\\';
            out[n++] = *p;
            break;
        default: out[n++] = *p;
        }
    }
    return add_param(q, out, n);
}

/* col = v, or col LIKE v when wildcards are present (or always when ci). */
static bool add_match(query_t *q, const char *col, const char *v, bool ci)
{
    if (!*v)
        return true;  /* universal matching */
    if (ci || has_wildcard(v)) {
        cmn_buf_appendf(&q->where, " AND %s LIKE ? ESCAPE '\\'", col);
        return add_like_param(q, v);
    }
    cmn_buf_appendf(&q->where, " AND %s = ?", col);
    return add_param(q, v, strlen(v));
}

/* col IN (list), for UID lists separated by ',' or '\'; checked as UIDs when uid. */
static bool add_list(query_t *q, const char *col, const char *v, bool uid)
{
    const char *p = v;
    bool first = true;

    if (!*v)
        return true;
    cmn_buf_appendf(&q->where, " AND %s IN (", col);
    while (*p) {
        size_t n = strcspn(p, ",\\");
        char one[128];

        if (n == 0 || n >= sizeof(one))
            return query_fail(q, "bad list value for %s", col);
        memcpy(one, p, n);
        one[n] = '\0';
        if (uid && !proto_uid_valid(one))
            return query_fail(q, "invalid UID in %s", col);
        cmn_buf_appends(&q->where, first ? "?" : ",?");
        first = false;
        if (!add_param(q, one, n))
            return false;
        p += n;
        if (*p)
            p++;
    }
    cmn_buf_appends(&q->where, ")");
    return true;
}

static bool is_date(const char *s, size_t n)
{
    if (n != 8)
        return false;
    for (size_t i = 0; i < 8; i++)
        if (s[i] < '0' || s[i] > '9')
            return false;
    return true;
}

static bool add_date_range(query_t *q, const char *col, const char *v)
{
    const char *dash = strchr(v, '-');
    size_t len = strlen(v);

    if (!*v)
        return true;
    if (!dash) {
        if (!is_date(v, len))
            return query_fail(q, "StudyDate must be YYYYMMDD or a range, got '%.20s'", v);
        cmn_buf_appendf(&q->where, " AND %s = ?", col);
        return add_param(q, v, len);
    }
    if (strchr(dash + 1, '-'))
        return query_fail(q, "StudyDate: bad range '%.20s'", v);
    if (dash > v) {
        if (!is_date(v, (size_t)(dash - v)))
            return query_fail(q, "StudyDate: bad range start '%.20s'", v);
        cmn_buf_appendf(&q->where, " AND %s >= ? AND %s != ''", col, col);
        if (!add_param(q, v, 8))
            return false;
    }
    if (dash[1]) {
        if (!is_date(dash + 1, strlen(dash + 1)))
            return query_fail(q, "StudyDate: bad range end '%.20s'", v);
        cmn_buf_appendf(&q->where, " AND %s <= ? AND %s != ''", col, col);
        if (!add_param(q, dash + 1, 8))
            return false;
    }
    if (dash == v && !dash[1])
        return query_fail(q, "StudyDate: empty range%s", "");
    return true;
}

static bool parse_count(query_t *q, const char *name, const char *v, long long max,
                        long long *out)
{
    char *end;
    long long n;

    errno = 0;
    n = strtoll(v, &end, 10);
    if (errno || end == v || *end || n < 0 || n > max)
        return query_fail(q, "bad value for %s", name);
    *out = n;
    return true;
}

/* Query keys: keyword and tag forms. */
typedef enum {
    K_PATIENT_ID, K_PATIENT_NAME, K_STUDY_DATE, K_ACCESSION, K_MODALITIES, K_STUDY_UID,
    K_MODALITY, K_SERIES_UID, K_SERIES_NUMBER, K_SOP_UID, K_SOP_CLASS, K_INSTANCE_NUMBER,
    K_LIMIT, K_OFFSET, K_IGNORED, K_UNKNOWN
} qkey_t;

static const struct {
    const char *kw;
    const char *tag;
    qkey_t key;
} qkeys[] = {
    { "PatientID", "00100020", K_PATIENT_ID },
    { "PatientName", "00100010", K_PATIENT_NAME },
    { "StudyDate", "00080020", K_STUDY_DATE },
    { "AccessionNumber", "00080050", K_ACCESSION },
    { "ModalitiesInStudy", "00080061", K_MODALITIES },
    { "StudyInstanceUID", "0020000D", K_STUDY_UID },
    { "Modality", "00080060", K_MODALITY },
    { "SeriesInstanceUID", "0020000E", K_SERIES_UID },
    { "SeriesNumber", "00200011", K_SERIES_NUMBER },
    { "SOPInstanceUID", "00080018", K_SOP_UID },
    { "SOPClassUID", "00080016", K_SOP_CLASS },
    { "InstanceNumber", "00200013", K_INSTANCE_NUMBER },
    { "limit", NULL, K_LIMIT },
    { "offset", NULL, K_OFFSET },
    { "includefield", NULL, K_IGNORED },
    { "fuzzymatching", NULL, K_IGNORED },
    { "_", NULL, K_IGNORED },   /* cache-busting parameter some clients add */
};

static qkey_t lookup_key(const char *k)
{
    for (size_t i = 0; i < CMN_ARRAY_SIZE(qkeys); i++)
        if (strcmp(k, qkeys[i].kw) == 0 || (qkeys[i].tag && strcasecmp(k, qkeys[i].tag) == 0))
            return qkeys[i].key;
    return K_UNKNOWN;
}

static bool key_allowed(qkey_t k, level_t level)
{
    switch (k) {
    case K_MODALITY:
    case K_SERIES_UID:
    case K_SERIES_NUMBER:
        return level >= LEVEL_SERIES;
    case K_SOP_UID:
    case K_SOP_CLASS:
    case K_INSTANCE_NUMBER:
        return level == LEVEL_INSTANCE;
    default:
        return true;
    }
}

static bool parse_int_value(query_t *q, const char *col, const char *v)
{
    long long n;

    if (!*v)
        return true;
    if (!parse_count(q, col, v, INT32_MAX, &n))
        return false;
    cmn_buf_appendf(&q->where, " AND %s = %lld", col, n);
    return true;
}

/* Parses req->query into q for a level. false with q->err on bad input. */
static bool query_parse(const cmn_http_req_t *req, level_t level, query_t *q)
{
    const char *cur = req->query;
    char k[64], v[1024];
    int rc;

    while ((rc = cmn_http_query_next(&cur, k, sizeof(k), v, sizeof(v))) == 1) {
        qkey_t key = lookup_key(k);
        bool ok = true;

        if (key == K_UNKNOWN || !key_allowed(key, level))
            return query_fail(q, "unsupported query key '%.40s'", k);
        switch (key) {
        case K_PATIENT_ID: ok = add_match(q, "p.patient_id", v, false); break;
        case K_PATIENT_NAME: ok = add_match(q, "p.name", v, true); break;
        case K_STUDY_DATE: ok = add_date_range(q, "s.study_date", v); break;
        case K_ACCESSION: ok = add_match(q, "s.accession", v, false); break;
        case K_STUDY_UID: ok = add_list(q, "s.study_uid", v, true); break;
        case K_MODALITIES:
            if (*v) {
                cmn_buf_appends(&q->where, " AND EXISTS (SELECT 1 FROM series m WHERE"
                                           " m.study_uid = s.study_uid");
                ok = add_list(q, "m.modality", v, false);
                cmn_buf_appends(&q->where, ")");
            }
            break;
        case K_MODALITY: ok = add_list(q, "se.modality", v, false); break;
        case K_SERIES_UID: ok = add_list(q, "se.series_uid", v, true); break;
        case K_SERIES_NUMBER: ok = parse_int_value(q, "se.series_number", v); break;
        case K_SOP_UID: ok = add_list(q, "i.sop_uid", v, true); break;
        case K_SOP_CLASS: ok = add_list(q, "i.sop_class_uid", v, true); break;
        case K_INSTANCE_NUMBER: ok = parse_int_value(q, "i.instance_number", v); break;
        case K_LIMIT: ok = parse_count(q, "limit", v, QIDO_MAX_LIMIT, &q->limit); break;
        case K_OFFSET: ok = parse_count(q, "offset", v, INT32_MAX, &q->offset); break;
        default: break;
        }
        if (!ok)
            return false;
    }
    if (rc < 0)
        return query_fail(q, "malformed query string%s", "");
    return true;
}

/* ------------------------------------------------------------ DICOM JSON */

static const char *col_str(sqlite3_stmt *st, int i)
{
    const unsigned char *s = sqlite3_column_text(st, i);
    return s ? (const char *)s : "";
}

static void put_str(json_t *o, const char *tag, const char *vr, const char *v)
{
    json_t *a = json_pack("{s:s}", "vr", vr);

    if (v && *v)
        json_object_set_new(a, "Value", json_pack("[s]", v));
    json_object_set_new(o, tag, a);
}

static void put_pn(json_t *o, const char *tag, const char *v)
{
    json_t *a = json_pack("{s:s}", "vr", "PN");

    if (v && *v)
        json_object_set_new(a, "Value", json_pack("[{s:s}]", "Alphabetic", v));
    json_object_set_new(o, tag, a);
}

static void put_int_col(json_t *o, const char *tag, const char *vr, sqlite3_stmt *st, int i)
{
    json_t *a = json_pack("{s:s}", "vr", vr);

    if (sqlite3_column_type(st, i) != SQLITE_NULL)
        json_object_set_new(a, "Value", json_pack("[I]", (json_int_t)sqlite3_column_int64(st, i)));
    json_object_set_new(o, tag, a);
}

/* A comma-separated list (group_concat) as a multi-valued attribute. */
static void put_list(json_t *o, const char *tag, const char *vr, const char *csv)
{
    json_t *a = json_pack("{s:s}", "vr", vr), *vals = json_array();
    const char *p = csv;

    while (p && *p) {
        size_t n = strcspn(p, ",");
        if (n)
            json_array_append_new(vals, json_stringn(p, n));
        p += n;
        if (*p)
            p++;
    }
    if (json_array_size(vals))
        json_object_set_new(a, "Value", vals);
    else
        json_decref(vals);
    json_object_set_new(o, tag, a);
}

static void put_url(json_t *o, const cmn_http_req_t *req, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void put_url(json_t *o, const cmn_http_req_t *req, const char *fmt, ...)
{
    const char *host = cmn_http_req_header(req, "Host");
    char path[512], url[800];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(path, sizeof(path), fmt, ap);
    va_end(ap);
    if (host && strlen(host) < 256 && !strpbrk(host, "\"<> \\"))
        snprintf(url, sizeof(url), "http://%s%s", host, path);
    else
        snprintf(url, sizeof(url), "%s", path);
    put_str(o, "00081190", "UR", url);
}

/* ------------------------------------------------------------------ QIDO */

static const char study_cols[] =
    "s.study_uid, s.study_date, s.study_time, s.accession, s.study_id, s.description,"
    " s.referring, p.patient_id, p.name, p.birth_date, p.sex";

static void study_attrs(json_t *o, sqlite3_stmt *st)
{
    put_str(o, "0020000D", "UI", col_str(st, 0));
    put_str(o, "00080020", "DA", col_str(st, 1));
    put_str(o, "00080030", "TM", col_str(st, 2));
    put_str(o, "00080050", "SH", col_str(st, 3));
    put_str(o, "00200010", "SH", col_str(st, 4));
    put_str(o, "00081030", "LO", col_str(st, 5));
    put_pn(o, "00080090", col_str(st, 6));
    put_str(o, "00100020", "LO", col_str(st, 7));
    put_pn(o, "00100010", col_str(st, 8));
    put_str(o, "00100030", "DA", col_str(st, 9));
    put_str(o, "00100040", "CS", col_str(st, 10));
}

static int run_qido(sqlite3 *db, const cmn_http_req_t *req, level_t level, const char *study,
                    const char *series, query_t *q, json_t *out)
{
    cmn_buf_t sql;
    sqlite3_stmt *st;
    int rc, p = 1;

    cmn_buf_init(&sql, 128 << 10);
    switch (level) {
    case LEVEL_STUDY:
        cmn_buf_appendf(&sql,
                        "SELECT %s,"
                        " (SELECT group_concat(DISTINCT x.modality) FROM series x"
                        "   WHERE x.study_uid = s.study_uid AND x.modality != ''),"
                        " (SELECT count(*) FROM series x WHERE x.study_uid = s.study_uid),"
                        " (SELECT count(*) FROM instances x WHERE x.study_uid = s.study_uid)"
                        " FROM studies s JOIN patients p ON p.pk = s.patient_pk WHERE 1%s"
                        " ORDER BY s.study_date DESC, s.study_time DESC, s.study_uid"
                        " LIMIT %lld OFFSET %lld",
                        study_cols, q->where.data ? q->where.data : "", q->limit, q->offset);
        break;
    case LEVEL_SERIES:
        cmn_buf_appendf(&sql,
                        "SELECT %s, se.series_uid, se.modality, se.series_number,"
                        " se.description, se.body_part,"
                        " (SELECT count(*) FROM instances x WHERE x.series_uid = se.series_uid)"
                        " FROM series se JOIN studies s ON s.study_uid = se.study_uid"
                        " JOIN patients p ON p.pk = s.patient_pk WHERE se.study_uid = ?%s"
                        " ORDER BY se.series_number, se.series_uid LIMIT %lld OFFSET %lld",
                        study_cols, q->where.data ? q->where.data : "", q->limit, q->offset);
        break;
    case LEVEL_INSTANCE:
        cmn_buf_appendf(&sql,
                        "SELECT %s, se.series_uid, se.modality, se.series_number,"
                        " i.sop_uid, i.sop_class_uid, i.instance_number, i.rows, i.columns,"
                        " i.frames, i.transfer_syntax"
                        " FROM instances i JOIN series se ON se.series_uid = i.series_uid"
                        " JOIN studies s ON s.study_uid = se.study_uid"
                        " JOIN patients p ON p.pk = s.patient_pk"
                        " WHERE i.study_uid = ? AND i.series_uid = ?%s"
                        " ORDER BY i.instance_number, i.sop_uid LIMIT %lld OFFSET %lld",
                        study_cols, q->where.data ? q->where.data : "", q->limit, q->offset);
        break;
    }
    if (!sql.data)
        return -ENOMEM;
    rc = cmn_db_prepare(db, sql.data, &st);
    cmn_buf_free(&sql);
    if (rc < 0)
        return rc;
    if (level >= LEVEL_SERIES)
        sqlite3_bind_text(st, p++, study, -1, SQLITE_STATIC);
    if (level == LEVEL_INSTANCE)
        sqlite3_bind_text(st, p++, series, -1, SQLITE_STATIC);
    for (int i = 0; i < q->nparams; i++)
        sqlite3_bind_text(st, p++, q->params[i], -1, SQLITE_STATIC);

    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        json_t *o = json_object();
        const char *suid = col_str(st, 0);

        study_attrs(o, st);
        if (level == LEVEL_STUDY) {
            put_list(o, "00080061", "CS", col_str(st, 11));
            put_int_col(o, "00201206", "IS", st, 12);
            put_int_col(o, "00201208", "IS", st, 13);
            put_url(o, req, ROOT "/studies/%s", suid);
        } else {
            const char *seuid = col_str(st, 11);
            put_str(o, "0020000E", "UI", seuid);
            put_str(o, "00080060", "CS", col_str(st, 12));
            put_int_col(o, "00200011", "IS", st, 13);
            if (level == LEVEL_SERIES) {
                put_str(o, "0008103E", "LO", col_str(st, 14));
                put_str(o, "00180015", "CS", col_str(st, 15));
                put_int_col(o, "00201209", "IS", st, 16);
                put_url(o, req, ROOT "/studies/%s/series/%s", suid, seuid);
            } else {
                const char *iuid = col_str(st, 14);
                put_str(o, "00080018", "UI", iuid);
                put_str(o, "00080016", "UI", col_str(st, 15));
                put_int_col(o, "00200013", "IS", st, 16);
                put_int_col(o, "00280010", "US", st, 17);
                put_int_col(o, "00280011", "US", st, 18);
                put_int_col(o, "00280008", "IS", st, 19);
                put_str(o, "00020010", "UI", col_str(st, 20));
                put_url(o, req, ROOT "/studies/%s/series/%s/instances/%s", suid, seuid, iuid);
            }
        }
        json_array_append_new(out, o);
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE) {
        CMN_LOG_E("dicomweb", "qido: %s", sqlite3_errmsg(db));
        return CMN_EDB;
    }
    return 0;
}

static void handle_qido(sqlite3 *db, const cmn_http_req_t *req, cmn_http_resp_t *resp,
                        level_t level, const char *study, const char *series)
{
    json_t *arr;
    query_t q;
    char *text;

    query_init(&q);
    if (!query_parse(req, level, &q)) {
        cloud_resp_error(resp, 400, "bad_query", q.err);
        query_free(&q);
        return;
    }
    arr = json_array();
    if (run_qido(db, req, level, study, series, &q, arr) < 0) {
        json_decref(arr);
        query_free(&q);
        cloud_resp_error(resp, 500, "internal", "query failed");
        return;
    }
    text = json_dumps(arr, JSON_COMPACT | JSON_SORT_KEYS);
    json_decref(arr);
    query_free(&q);
    cmn_http_resp_header(resp, "Cache-Control", "no-store");
    cloud_resp_json_take(resp, 200, "application/dicom+json", text);
}

/* ------------------------------------------------------------------ WADO */

typedef struct {
    char *path;                  /* owned */
    uint64_t size;
} part_t;

/* Selects the instances of a study/series/instance, ordered for viewing. */
static int select_instances(sqlite3 *db, const char *cols, const char *study, const char *series,
                            const char *sop, sqlite3_stmt **out)
{
    char sql[512];

    snprintf(sql, sizeof(sql),
             "SELECT %s FROM instances WHERE study_uid = ?1"
             " AND (?2 IS NULL OR series_uid = ?2) AND (?3 IS NULL OR sop_uid = ?3)"
             " ORDER BY series_uid, instance_number, sop_uid",
             cols);
    if (cmn_db_prepare(db, sql, out) < 0)
        return CMN_EDB;
    sqlite3_bind_text(*out, 1, study, -1, SQLITE_STATIC);
    if (series)
        sqlite3_bind_text(*out, 2, series, -1, SQLITE_STATIC);
    if (sop)
        sqlite3_bind_text(*out, 3, sop, -1, SQLITE_STATIC);
    return 0;
}

static void make_boundary(char out[41])
{
    uint8_t r[16];
    char hex[33];

    if (cmn_random(r, sizeof(r)) < 0)
        memset(r, 0x5a, sizeof(r));
    cmn_hex(r, sizeof(r), hex);
    snprintf(out, 41, "yy-%s", hex);
}

static void handle_retrieve(sqlite3 *db, cmn_http_resp_t *resp, const char *study,
                            const char *series, const char *sop)
{
    part_t *parts = NULL;
    size_t n = 0, cap = 0;
    char boundary[41], head[256], ctype[160];
    sqlite3_stmt *st;
    struct stat sb;
    int rc;

    if (select_instances(db, "path, size", study, series, sop, &st) < 0) {
        cloud_resp_error(resp, 500, "internal", "query failed");
        return;
    }
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (n == cap) {
            cap = cap ? cap * 2 : 16;
            parts = cmn_xrealloc(parts, cap * sizeof(*parts));
        }
        parts[n].path = cmn_xstrdup(col_str(st, 0));
        parts[n].size = (uint64_t)sqlite3_column_int64(st, 1);
        n++;
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE) {
        cloud_resp_error(resp, 500, "internal", "query failed");
        goto out;
    }
    if (n == 0) {
        cloud_resp_error(resp, 404, "not_found", "no matching instances");
        goto out;
    }
    /* Check every file first: once parts are appended the answer is committed. */
    for (size_t i = 0; i < n; i++) {
        if (stat(parts[i].path, &sb) < 0 || (uint64_t)sb.st_size != parts[i].size) {
            CMN_LOG_E("dicomweb", "archive file missing or changed: %s", parts[i].path);
            cloud_resp_error(resp, 500, "archive", "archived file unavailable");
            goto out;
        }
    }
    make_boundary(boundary);
    snprintf(ctype, sizeof(ctype), "multipart/related; type=\"application/dicom\"; boundary=%s",
             boundary);
    cmn_http_resp_status(resp, 200);
    cmn_http_resp_header(resp, "Content-Type", ctype);
    cmn_http_resp_header(resp, "Cache-Control", "private, max-age=3600");
    for (size_t i = 0; i < n; i++) {
        int hn = snprintf(head, sizeof(head),
                          "--%s\r\nContent-Type: application/dicom\r\nContent-Length: %" PRIu64
                          "\r\n\r\n",
                          boundary, parts[i].size);
        cmn_http_resp_body(resp, head, (size_t)hn);
        cmn_http_resp_file(resp, parts[i].path, 0, parts[i].size);
        cmn_http_resp_body(resp, "\r\n", 2);
    }
    snprintf(head, sizeof(head), "--%s--\r\n", boundary);
    cmn_http_resp_body(resp, head, strlen(head));
out:
    for (size_t i = 0; i < n; i++)
        free(parts[i].path);
    free(parts);
}

static void handle_metadata(sqlite3 *db, cmn_http_resp_t *resp, const char *study,
                            const char *series, const char *sop)
{
    cmn_buf_t b;
    sqlite3_stmt *st;
    bool first = true;
    char *text;
    size_t len;
    int rc;

    if (select_instances(db, "json", study, series, sop, &st) < 0) {
        cloud_resp_error(resp, 500, "internal", "query failed");
        return;
    }
    cmn_buf_init(&b, 0);
    cmn_buf_appends(&b, "[");
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (!first)
            cmn_buf_appends(&b, ",");
        first = false;
        cmn_buf_append(&b, sqlite3_column_text(st, 0), (size_t)sqlite3_column_bytes(st, 0));
    }
    sqlite3_finalize(st);
    if (cmn_buf_appends(&b, "]") < 0 || rc != SQLITE_DONE) {
        cmn_buf_free(&b);
        cloud_resp_error(resp, 500, "internal", "metadata failed");
        return;
    }
    if (first) {
        cmn_buf_free(&b);
        cloud_resp_error(resp, 404, "not_found", "no matching instances");
        return;
    }
    text = cmn_buf_steal(&b, &len);
    cmn_http_resp_status(resp, 200);
    cmn_http_resp_header(resp, "Content-Type", "application/dicom+json");
    cmn_http_resp_header(resp, "Cache-Control", "private, max-age=3600");
    cmn_http_resp_body_take(resp, text, len);
}

/* Parses "1,3,5" into 1-based frame numbers. Count, or -1 on bad input. */
static int parse_frames(const char *s, uint32_t *out, int max)
{
    int n = 0;

    while (*s) {
        char *end;
        unsigned long v;

        if (*s < '0' || *s > '9' || n == max)
            return -1;
        errno = 0;
        v = strtoul(s, &end, 10);
        if (errno || v == 0 || v > UINT32_MAX)
            return -1;
        out[n++] = (uint32_t)v;
        s = end;
        if (*s == ',' && s[1])
            s++;
        else if (*s)
            return -1;
    }
    return n;
}

/* frames: NULL = the whole Pixel Data value as one part (bulk data). */
static void handle_frames(sqlite3 *db, cmn_http_resp_t *resp, const char *study,
                          const char *series, const char *sop, const char *frames)
{
    uint32_t list[MAX_FRAMES];
    char boundary[41], head[256], ctype[200], path[1024], ts[65];
    uint64_t off, len, frame_len;
    int64_t rows, cols, nframes, bits, spp;
    sqlite3_stmt *st;
    int n = 1;

    if (frames) {
        n = parse_frames(frames, list, MAX_FRAMES);
        if (n <= 0) {
            cloud_resp_error(resp, 400, "bad_request", "bad frame list");
            return;
        }
    }
    if (select_instances(db,
                         "path, pixel_offset, pixel_length, rows, columns, frames,"
                         " bits_allocated, samples_per_pixel, transfer_syntax",
                         study, series, sop, &st) < 0) {
        cloud_resp_error(resp, 500, "internal", "query failed");
        return;
    }
    if (sqlite3_step(st) != SQLITE_ROW) {
        sqlite3_finalize(st);
        cloud_resp_error(resp, 404, "not_found", "no such instance");
        return;
    }
    snprintf(path, sizeof(path), "%s", col_str(st, 0));
    off = (uint64_t)sqlite3_column_int64(st, 1);
    len = (uint64_t)sqlite3_column_int64(st, 2);
    rows = sqlite3_column_int64(st, 3);
    cols = sqlite3_column_int64(st, 4);
    nframes = sqlite3_column_int64(st, 5);
    bits = sqlite3_column_int64(st, 6);
    spp = sqlite3_column_int64(st, 7);
    snprintf(ts, sizeof(ts), "%s", col_str(st, 8));
    sqlite3_finalize(st);

    if (len == 0 || strcmp(ts, "1.2.840.10008.1.2.2") == 0) {   /* big endian: not as stored */
        cloud_resp_error(resp, 406, "not_native",
                         "pixel data is not stored natively (or absent); retrieve the instance");
        return;
    }
    if (nframes < 1)
        nframes = 1;
    frame_len = (uint64_t)(rows * cols * spp * bits / 8);
    if (frames) {
        if (bits % 8 != 0 || frame_len == 0 || frame_len * (uint64_t)nframes > len) {
            cloud_resp_error(resp, 406, "unsupported", "cannot split this pixel data into frames");
            return;
        }
        for (int i = 0; i < n; i++) {
            if (list[i] > (uint64_t)nframes) {
                cloud_resp_error(resp, 404, "not_found", "frame number out of range");
                return;
            }
        }
    }
    make_boundary(boundary);
    /* Native data is served as stored: little endian (big endian was
     * refused above), so Explicit VR Little Endian describes it. */
    snprintf(ctype, sizeof(ctype),
             "multipart/related; type=\"application/octet-stream\";"
             " transfer-syntax=1.2.840.10008.1.2.1; boundary=%s",
             boundary);
    cmn_http_resp_status(resp, 200);
    cmn_http_resp_header(resp, "Content-Type", ctype);
    cmn_http_resp_header(resp, "Cache-Control", "private, max-age=3600");
    for (int i = 0; i < n; i++) {
        uint64_t fo = frames ? off + (uint64_t)(list[i] - 1) * frame_len : off;
        uint64_t fl = frames ? frame_len : len;
        int hn = snprintf(head, sizeof(head),
                          "--%s\r\nContent-Type: application/octet-stream;"
                          " transfer-syntax=1.2.840.10008.1.2.1\r\nContent-Length: %" PRIu64
                          "\r\n\r\n",
                          boundary, fl);
        cmn_http_resp_body(resp, head, (size_t)hn);
        if (cmn_http_resp_file(resp, path, fo, fl) < 0)
            CMN_LOG_E("dicomweb", "frame file unavailable: %s", path);
        cmn_http_resp_body(resp, "\r\n", 2);
    }
    snprintf(head, sizeof(head), "--%s--\r\n", boundary);
    cmn_http_resp_body(resp, head, strlen(head));
}

/* ----------------------------------------------------------------- routing */

/* Splits path after ROOT into segments (in buf). Count or -1. */
static int split_path(const char *path, char *buf, size_t buflen, char **segs, int max)
{
    int n = 0;
    char *p;

    if (snprintf(buf, buflen, "%s", path) >= (int)buflen)
        return -1;
    for (p = buf; *p;) {
        while (*p == '/')
            p++;
        if (!*p)
            break;
        if (n == max)
            return -1;
        segs[n++] = p;
        p += strcspn(p, "/");
        if (*p)
            *p++ = '\0';
    }
    return n;
}

static bool uids_valid(char **segs, int n)
{
    /* Odd positions after "studies" (1, 3, 5) are UIDs. */
    for (int i = 1; i < n && i <= 5; i += 2)
        if (!proto_uid_valid(segs[i]))
            return false;
    return true;
}

void cloud_dicomweb_handle(const cmn_http_req_t *req, cmn_http_resp_t *resp)
{
    char buf[1024], action[32] = "";
    char *s[MAX_SEGS];
    const char *study = NULL;
    cloud_user_t user;
    sqlite3 *db;
    int n;

    if (strncmp(req->path, ROOT, strlen(ROOT)) != 0 ||
        (req->path[strlen(ROOT)] && req->path[strlen(ROOT)] != '/')) {
        cloud_resp_error(resp, 404, "not_found", "no such resource");
        return;
    }
    db = cloud_index_get();
    if (!db) {
        cloud_resp_error(resp, 503, "unavailable", "index unavailable");
        return;
    }
    if (!cloud_auth_require(db, req, resp, &user))
        goto out;
    if (strcmp(req->method, "GET") != 0 && strcmp(req->method, "HEAD") != 0) {
        cloud_resp_error(resp, 405, "method_not_allowed", "read-only");
        goto out;
    }
    n = split_path(req->path + strlen(ROOT), buf, sizeof(buf), s, MAX_SEGS);
    if (n < 1 || strcmp(s[0], "studies") != 0 || !uids_valid(s, n) ||
        (n >= 3 && strcmp(s[2], "series") != 0 && strcmp(s[2], "metadata") != 0) ||
        (n >= 5 && strcmp(s[4], "instances") != 0 && strcmp(s[4], "metadata") != 0)) {
        cloud_resp_error(resp, 404, "not_found", "no such resource");
        goto out;
    }
    study = n >= 2 ? s[1] : "";
    switch (n) {
    case 1:
        snprintf(action, sizeof(action), "qido-studies");
        handle_qido(db, req, resp, LEVEL_STUDY, NULL, NULL);
        break;
    case 2:
        snprintf(action, sizeof(action), "wado-study");
        handle_retrieve(db, resp, s[1], NULL, NULL);
        break;
    case 3:
        if (strcmp(s[2], "series") == 0) {
            snprintf(action, sizeof(action), "qido-series");
            handle_qido(db, req, resp, LEVEL_SERIES, s[1], NULL);
        } else {
            snprintf(action, sizeof(action), "metadata-study");
            handle_metadata(db, resp, s[1], NULL, NULL);
        }
        break;
    case 4:
        snprintf(action, sizeof(action), "wado-series");
        handle_retrieve(db, resp, s[1], s[3], NULL);
        break;
    case 5:
        if (strcmp(s[4], "instances") == 0) {
            snprintf(action, sizeof(action), "qido-instances");
            handle_qido(db, req, resp, LEVEL_INSTANCE, s[1], s[3]);
        } else {
            snprintf(action, sizeof(action), "metadata-series");
            handle_metadata(db, resp, s[1], s[3], NULL);
        }
        break;
    case 6:
        snprintf(action, sizeof(action), "wado-instance");
        handle_retrieve(db, resp, s[1], s[3], s[5]);
        break;
    case 7:
        if (strcmp(s[6], "metadata") == 0) {
            snprintf(action, sizeof(action), "metadata-instance");
            handle_metadata(db, resp, s[1], s[3], s[5]);
        } else if (strcmp(s[6], "bulk") == 0) {
            snprintf(action, sizeof(action), "wado-bulk");
            handle_frames(db, resp, s[1], s[3], s[5], NULL);
        } else {
            cloud_resp_error(resp, 404, "not_found", "no such resource");
        }
        break;
    case 8:
        if (strcmp(s[6], "frames") == 0) {
            snprintf(action, sizeof(action), "wado-frames");
            handle_frames(db, resp, s[1], s[3], s[5], s[7]);
        } else {
            cloud_resp_error(resp, 404, "not_found", "no such resource");
        }
        break;
    default:
        cloud_resp_error(resp, 404, "not_found", "no such resource");
    }
    if (action[0])
        cloud_index_audit(db, user.username, action, study, req->peer);
out:
    cloud_index_put(db);
}

void cloud_wado_uri_handle(const cmn_http_req_t *req, cmn_http_resp_t *resp)
{
    char k[64], v[128], study[128] = "", series[128] = "", sop[128] = "", rt[128] = "",
                        ctype[128] = "";
    const char *cur = req->query;
    cloud_user_t user;
    sqlite3_stmt *st;
    char path[1024];
    uint64_t size;
    sqlite3 *db;
    int rc;

    if (strcmp(req->path, "/wado") != 0) {
        cloud_resp_error(resp, 404, "not_found", "no such resource");
        return;
    }
    db = cloud_index_get();
    if (!db) {
        cloud_resp_error(resp, 503, "unavailable", "index unavailable");
        return;
    }
    if (!cloud_auth_require(db, req, resp, &user))
        goto out;
    while ((rc = cmn_http_query_next(&cur, k, sizeof(k), v, sizeof(v))) == 1) {
        if (strcmp(k, "requestType") == 0)
            snprintf(rt, sizeof(rt), "%s", v);
        else if (strcmp(k, "studyUID") == 0)
            snprintf(study, sizeof(study), "%s", v);
        else if (strcmp(k, "seriesUID") == 0)
            snprintf(series, sizeof(series), "%s", v);
        else if (strcmp(k, "objectUID") == 0)
            snprintf(sop, sizeof(sop), "%s", v);
        else if (strcmp(k, "contentType") == 0)
            snprintf(ctype, sizeof(ctype), "%s", v);
        /* other WADO-URI parameters (transferSyntax, anonymize...) are ignored */
    }
    if (rc < 0 || strcmp(rt, "WADO") != 0 || !proto_uid_valid(study) ||
        !proto_uid_valid(series) || !proto_uid_valid(sop)) {
        cloud_resp_error(resp, 400, "bad_request",
                         "requestType=WADO, studyUID, seriesUID and objectUID are required");
        goto out;
    }
    if (ctype[0] && strcmp(ctype, "application/dicom") != 0) {
        cloud_resp_error(resp, 406, "not_acceptable", "only contentType=application/dicom");
        goto out;
    }
    if (select_instances(db, "path, size", study, series, sop, &st) < 0) {
        cloud_resp_error(resp, 500, "internal", "query failed");
        goto out;
    }
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        snprintf(path, sizeof(path), "%s", col_str(st, 0));
        size = (uint64_t)sqlite3_column_int64(st, 1);
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_ROW) {
        cloud_resp_error(resp, 404, "not_found", "no such instance");
        goto out;
    }
    cmn_http_resp_status(resp, 200);
    cmn_http_resp_header(resp, "Content-Type", "application/dicom");
    cmn_http_resp_header(resp, "Cache-Control", "private, max-age=3600");
    if (cmn_http_resp_file(resp, path, 0, size) < 0) {
        CMN_LOG_E("dicomweb", "archive file unavailable: %s", path);
        cloud_resp_error(resp, 500, "archive", "archived file unavailable");
        goto out;
    }
    cloud_index_audit(db, user.username, "wado-uri", study, req->peer);
out:
    cloud_index_put(db);
}
