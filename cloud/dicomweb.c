/*
 * dicomweb.c - DICOMweb (PS3.18) over the index and the archive.
 *
 *   QIDO-RS  GET /dicomweb/studies
 *            GET /dicomweb/series                       (all studies)
 *            GET /dicomweb/instances                    (all studies)
 *            GET /dicomweb/studies/{s}/series
 *            GET /dicomweb/studies/{s}/instances
 *            GET /dicomweb/studies/{s}/series/{se}/instances
 *   WADO-RS  GET /dicomweb/studies/{s}[/series/{se}[/instances/{i}]]
 *                  multipart/related; type="application/dicom"[; transfer-syntax=]
 *            GET .../metadata                 application/dicom+json
 *            GET .../instances/{i}/frames/{n[,m...]}
 *            GET .../instances/{i}/bulk       the Pixel Data value (BulkDataURI)
 *            GET .../instances/{i}/bulk/{tag} another bulk attribute
 *   STOW-RS  POST /dicomweb/studies[/{s}] is stow.c (its own route: large bodies)
 *   WADO-URI GET /wado?requestType=WADO&studyUID=&seriesUID=&objectUID=
 *                  [&contentType=application/dicom]
 *
 * Every request needs a session (auth.c) and leaves an audit row. Files are
 * answered as file segments of the response, so the server streams them from
 * disk; only metadata, QIDO results, transcoded frames are built in memory.
 *
 * QIDO matching (docs/conformance.md section 3 is the user-facing version):
 *   - keys by keyword or by 8 hex digits; unknown to the dictionary -> 400;
 *     known but not indexed -> ignored, with a "Warning: 299" header;
 *   - string keys: exact, or '*'/'?' wildcards (PN case-insensitively);
 *   - UI keys: a list separated by ',' or '\';
 *   - DA/TM keys: a value or a range A-B, A-, -B (each attribute on its own;
 *     combined date-time range matching is not done);
 *   - includefield=tag|keyword|all (repeatable or comma-separated);
 *     fuzzymatching=false (true is answered with a warning: not supported);
 *   - limit (default 1000, larger values are clamped to 10000, with a
 *     warning when more results exist), offset.
 *
 * WADO-RS transfer syntaxes: the Accept header lists what the client takes.
 * No transfer-syntax parameter or "*" means as stored. Explicit VR Little
 * Endian is produced by decoding (cloud/transcode.cc, DCMTK dcmjpls for
 * JPEG-LS) and JPEG-LS Lossless by encoding (cmn_dicom_to_jpegls); both are
 * cached under <staging_dir>/.cache/ keyed by the archived file's SHA-256.
 * Nothing acceptable -> 406. Frames of JPEG-LS instances are served as stored
 * (image/jls) or decoded (application/octet-stream), as the Accept says.
 *
 * Caching: retrieve and metadata answers carry a strong ETag (a hash of the
 * instances' SHA-256s and the representation) and honour If-None-Match
 * (304). JSON answers over 1 KiB are gzip'ed when Accept-Encoding allows.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>
#include <zlib.h>

#include "cmn/buf.h"
#include "cmn/crypto.h"
#include "cmn/sql.h"
#include "cmn/dicom_codec.h"
#include "cmn/errors.h"
#include "cmn/log.h"
#include "proto/proto.h"
#include "internal.h"
#include "transcode.h"

#define ROOT "/dicomweb"
#define QIDO_DEFAULT_LIMIT 1000
#define QIDO_MAX_LIMIT 10000
#define MAX_PARAMS 96
#define MAX_SEGS 9
#define MAX_FRAMES 256
#define MAX_INCLUDE 64
#define MAX_ACCEPT 16
#define GZIP_MIN 1024
#define FRAME_RANGE_MAX ((uint64_t)64 << 20)  /* frames read by ranged GETs at most, bytes */

typedef enum { LEVEL_STUDY, LEVEL_SERIES, LEVEL_INSTANCE } level_t;

/* --------------------------------------------------------------- helpers */

static const char *col_str(cmn_sql_stmt_t *st, int i)
{
    const char *s = cmn_sql_column_text(st, i);
    return s ? s : "";
}

/*
 * Makes an archived file readable at its path before it is opened: a no-op
 * for the directory archive; with S3 a cache miss downloads the object into
 * the local cache. 0, or < 0 with the error logged.
 */
static int archive_ready(const char *path)
{
    int rc = cloud_archive_fetch(path);

    if (rc < 0)
        CMN_LOG_E("dicomweb", "archive file unavailable: %s: %s", path, cmn_strerror(rc));
    return rc;
}

void cloud__dicomweb_base_url(const cmn_http_req_t *req, char *out, size_t outlen)
{
    const char *host = cmn_http_req_header(req, "Host");

    if (host && strlen(host) < 256 && !strpbrk(host, "\"<> \\"))
        snprintf(out, outlen, "%s://%s" ROOT, req->client_https ? "https" : "http", host);
    else
        snprintf(out, outlen, ROOT);
}

/* gzip of in (level 1: JSON shrinks 5-10x even so, at a small CPU cost). NULL on failure. */
static char *gzip_buf(const char *in, size_t len, size_t *outlen)
{
    z_stream z;
    uLong cap = compressBound((uLong)len) + 32;
    char *out = cmn_try_malloc(cap);

    if (!out)
        return NULL;
    memset(&z, 0, sizeof(z));
    if (deflateInit2(&z, 1, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) != Z_OK) {
        free(out);
        return NULL;
    }
    z.next_in = (Bytef *)in;
    z.avail_in = (uInt)len;
    z.next_out = (Bytef *)out;
    z.avail_out = (uInt)cap;
    if (deflate(&z, Z_FINISH) != Z_STREAM_END) {
        deflateEnd(&z);
        free(out);
        return NULL;
    }
    *outlen = z.total_out;
    deflateEnd(&z);
    return out;
}

/* True when If-None-Match lists etag (or "*"). */
static bool etag_matches(const cmn_http_req_t *req, const char *etag)
{
    const char *inm = cmn_http_req_header(req, "If-None-Match");

    if (!inm)
        return false;
    return strcmp(inm, "*") == 0 || strstr(inm, etag) != NULL;
}

/* "\"<hex>\"" of a finished SHA-256 context, with a suffix for the variant. */
static void etag_final(cmn_sha256_ctx_t *c, const char *suffix, char out[80])
{
    uint8_t d[CMN_SHA256_LEN];
    char hex[65];

    cmn_sha256_final(c, d);
    cmn_hex(d, 16, hex);
    snprintf(out, 80, "\"%s%s\"", hex, suffix);
}

static void not_modified(cmn_http_resp_t *resp, const char *etag, const char *cache)
{
    cmn_http_resp_status(resp, 304);
    cmn_http_resp_header(resp, "ETag", etag);
    cmn_http_resp_header(resp, "Cache-Control", cache);
}

/*
 * Sends a DICOM JSON text (takes ownership): gzip'ed when allowed and worth
 * it, with an ETag (base, may be NULL) that names the encoding, and warning
 * (may be NULL) as a Warning header.
 */
static void send_json(const cmn_http_req_t *req, cmn_http_resp_t *resp, char *text, size_t len,
                      const char *cache, const char *base_etag, const char *warning)
{
    bool gz = len >= GZIP_MIN && cmn_http_accepts_encoding(req, "gzip");
    char etag[96];

    cmn_http_resp_status(resp, 200);
    cmn_http_resp_header(resp, "Content-Type", "application/dicom+json");
    cmn_http_resp_header(resp, "Cache-Control", cache);
    cmn_http_resp_header(resp, "Vary", "Accept-Encoding");
    if (warning)
        cmn_http_resp_header(resp, "Warning", warning);
    if (gz) {
        size_t zlen;
        char *z = gzip_buf(text, len, &zlen);
        if (z) {
            free(text);
            text = z;
            len = zlen;
            cmn_http_resp_header(resp, "Content-Encoding", "gzip");
        } else {
            gz = false;
        }
    }
    if (base_etag) {
        /* base_etag is "\"hex\"": the gzip variant gets its own strong tag. */
        snprintf(etag, sizeof(etag), "%.*s%s\"", (int)strlen(base_etag) - 1, base_etag,
                 gz ? "-gz" : "");
        cmn_http_resp_header(resp, "ETag", etag);
    }
    cmn_http_resp_body_take(resp, text, len);
}

/* ------------------------------------------------------------ SQL builder */

typedef enum {
    M_STR,       /* exact or wildcards */
    M_PN,        /* wildcards, case-insensitive */
    M_UID,       /* list */
    M_CS_LIST,   /* list of code strings (Modality, ModalitiesInStudy) */
    M_DATE,      /* DA, range */
    M_TIME,      /* TM, range */
    M_INT,       /* IS/US, exact */
    M_MODALITIES /* ModalitiesInStudy: EXISTS over series */
} match_t;

/* Attributes the index can match on (and returns by default). */
static const struct {
    uint32_t tag;
    level_t level;               /* the level the attribute belongs to */
    const char *col;
    match_t match;
} attrs[] = {
    { 0x00100010, LEVEL_STUDY, "p.name", M_PN },
    { 0x00100020, LEVEL_STUDY, "p.patient_id", M_STR },
    { 0x00100030, LEVEL_STUDY, "p.birth_date", M_DATE },
    { 0x00100040, LEVEL_STUDY, "p.sex", M_STR },
    { 0x0020000D, LEVEL_STUDY, "s.study_uid", M_UID },
    { 0x00080020, LEVEL_STUDY, "s.study_date", M_DATE },
    { 0x00080030, LEVEL_STUDY, "s.study_time", M_TIME },
    { 0x00080050, LEVEL_STUDY, "s.accession", M_STR },
    { 0x00200010, LEVEL_STUDY, "s.study_id", M_STR },
    { 0x00081030, LEVEL_STUDY, "s.description", M_PN },
    { 0x00080090, LEVEL_STUDY, "s.referring", M_PN },
    { 0x00080061, LEVEL_STUDY, NULL, M_MODALITIES },
    { 0x0020000E, LEVEL_SERIES, "se.series_uid", M_UID },
    { 0x00080060, LEVEL_SERIES, "se.modality", M_CS_LIST },
    { 0x00200011, LEVEL_SERIES, "se.series_number", M_INT },
    { 0x0008103E, LEVEL_SERIES, "se.description", M_PN },
    { 0x00180015, LEVEL_SERIES, "se.body_part", M_STR },
    { 0x00080021, LEVEL_SERIES, "se.series_date", M_DATE },
    { 0x00080031, LEVEL_SERIES, "se.series_time", M_TIME },
    { 0x00080018, LEVEL_INSTANCE, "i.sop_uid", M_UID },
    { 0x00080016, LEVEL_INSTANCE, "i.sop_class_uid", M_UID },
    { 0x00200013, LEVEL_INSTANCE, "i.instance_number", M_INT },
    { 0x00280010, LEVEL_INSTANCE, "i.rows", M_INT },
    { 0x00280011, LEVEL_INSTANCE, "i.columns", M_INT },
    { 0x00280008, LEVEL_INSTANCE, "i.frames", M_INT },
};

/* includefield=all at study and series level: these, from a representative instance. */
static const uint32_t all_study[] = {
    0x00080020, 0x00080030, 0x00080050, 0x00080051, 0x00080090, 0x00081030, 0x00081032,
    0x00081060, 0x00100010, 0x00100020, 0x00100021, 0x00100030, 0x00100040, 0x00101010,
    0x00101020, 0x00101030, 0x00102160, 0x00104000, 0x0020000D, 0x00200010, 0x00321060,
};
static const uint32_t all_series[] = {
    0x00080021, 0x00080031, 0x00080060, 0x00080070, 0x00081010, 0x0008103E, 0x00081070,
    0x00081090, 0x00180015, 0x00181030, 0x00185100, 0x0020000E, 0x00200011, 0x00200052,
    0x00200060, 0x00400244, 0x00400245, 0x00400254,
};

typedef struct {
    cmn_buf_t where;             /* " AND ..." clauses */
    char *params[MAX_PARAMS];    /* owned text parameters, bound in order */
    int nparams;
    long long limit, offset;
    bool clamped;                /* limit was above QIDO_MAX_LIMIT */
    bool pg;                     /* the index is PostgreSQL (matching SQL differs) */
    uint32_t incl[MAX_INCLUDE];  /* includefield tags */
    int nincl;
    bool incl_all;
    cmn_buf_t warn;              /* unsupported keys, for the Warning header */
    bool fuzzy;                  /* fuzzymatching=true asked (not supported) */
    char err[200];               /* first query error, for the 400 */
} query_t;

static void query_init(query_t *q)
{
    memset(q, 0, sizeof(*q));
    cmn_buf_init(&q->where, 0);
    cmn_buf_init(&q->warn, 4096);
    q->limit = QIDO_DEFAULT_LIMIT;
}

static void query_free(query_t *q)
{
    cmn_buf_free(&q->where);
    cmn_buf_free(&q->warn);
    for (int i = 0; i < q->nparams; i++)
        free(q->params[i]);
}

static bool query_fail(query_t *q, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static bool query_fail(query_t *q, const char *fmt, ...)
{
    va_list ap;

    if (!q->err[0]) {
        va_start(ap, fmt);
        vsnprintf(q->err, sizeof(q->err), fmt, ap);
        va_end(ap);
    }
    return false;
}

static bool add_param(query_t *q, const char *v, size_t n)
{
    char *p;

    if (q->nparams >= MAX_PARAMS)
        return query_fail(q, "too many query values");
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
            return query_fail(q, "query value too long");
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

/*
 * col = v, or col LIKE v when wildcards are present (or always when ci).
 * LIKE is case-insensitive for ASCII on both engines (cmn/sql.h). SQLite
 * turns a prefix into a range on patients_name (COLLATE NOCASE). PostgreSQL
 * would run ILIKE, which no index serves; lower(col) ~~ lower(v) (~~ is
 * LIKE, '\' its default escape) matches the same rows and uses the
 * lower(name) index (text_pattern_ops) for a literal prefix.
 */
static bool add_match(query_t *q, const char *col, const char *v, bool ci)
{
    if (!*v || strcmp(v, "*") == 0)
        return true;  /* universal matching */
    if (ci || has_wildcard(v)) {
        if (q->pg)
            cmn_buf_appendf(&q->where, " AND lower(%s) ~~ lower(?)", col);
        else
            cmn_buf_appendf(&q->where, " AND %s LIKE ? ESCAPE '\\'", col);
        return add_like_param(q, v);
    }
    cmn_buf_appendf(&q->where, " AND %s = ?", col);
    return add_param(q, v, strlen(v));
}

/* col IN (list), for lists separated by ',' or '\'; checked as UIDs when uid. */
static bool add_list(query_t *q, const char *col, const char *v, bool uid, const char *name)
{
    const char *p = v;
    bool first = true;

    if (!*v || (!uid && strcmp(v, "*") == 0))
        return true;
    cmn_buf_appendf(&q->where, " AND %s IN (", col);
    while (*p) {
        size_t n = strcspn(p, ",\\");
        char one[128];

        if (n == 0 || n >= sizeof(one))
            return query_fail(q, "bad list value for %s", name);
        memcpy(one, p, n);
        one[n] = '\0';
        if (uid && !proto_uid_valid(one))
            return query_fail(q, "invalid UID in %s", name);
        if (!uid && has_wildcard(one))
            return query_fail(q, "wildcards are not allowed in a list (%s)", name);
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

static bool all_digits(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (s[i] < '0' || s[i] > '9')
            return false;
    return n > 0;
}

static bool is_date(const char *s, size_t n)
{
    int m, d;

    if (n != 8 || !all_digits(s, 8))
        return false;
    m = (s[4] - '0') * 10 + (s[5] - '0');
    d = (s[6] - '0') * 10 + (s[7] - '0');
    return m >= 1 && m <= 12 && d >= 1 && d <= 31;
}

/* HH, HHMM, HHMMSS or HHMMSS.F{1,6}: copies the digits (no '.') to out. */
static bool is_time(const char *s, size_t n, char *out, size_t outlen)
{
    size_t k = 0;

    if (n < 2 || n > 13 || (n != 2 && n != 4 && n < 6) || n == 7 || outlen < 14)
        return false;
    if (!all_digits(s, n < 6 ? n : 6))
        return false;
    if (s[0] > '2' || (s[0] == '2' && s[1] > '3') || (n >= 4 && s[2] > '5') ||
        (n >= 6 && s[4] > '6'))
        return false;
    if (n > 6 && (s[6] != '.' || !all_digits(s + 7, n - 7)))
        return false;
    for (size_t i = 0; i < n; i++)
        if (s[i] != '.')
            out[k++] = s[i];
    out[k] = '\0';
    return true;
}

/*
 * DA/TM value or range. Dates compare as text (always 8 digits). Times are
 * compared on their digits, the stored value padded with zeros and cut to
 * the bound's length: "1015" as an upper bound includes 10:15:59.
 */
static bool add_range(query_t *q, const char *col, const char *v, bool time, const char *name)
{
    const char *dash = strchr(v, '-');
    char lo[16] = "", hi[16] = "";
    char expr[200];
    size_t llen, hlen;

    if (!*v)
        return true;
    llen = dash ? (size_t)(dash - v) : strlen(v);
    hlen = dash ? strlen(dash + 1) : 0;
    if (dash && strchr(dash + 1, '-'))
        return query_fail(q, "%s: bad range '%.40s'", name, v);
    if (dash && llen == 0 && hlen == 0)
        return query_fail(q, "%s: empty range", name);
    if (llen) {
        if (time ? !is_time(v, llen, lo, sizeof(lo)) : !is_date(v, llen))
            return query_fail(q, "%s must be %s or a range, got '%.40s'", name,
                              time ? "HH[MM[SS[.F]]]" : "YYYYMMDD", v);
        if (!time)
            snprintf(lo, sizeof(lo), "%.8s", v);
    }
    if (hlen) {
        if (time ? !is_time(dash + 1, hlen, hi, sizeof(hi)) : !is_date(dash + 1, hlen))
            return query_fail(q, "%s must be %s or a range, got '%.40s'", name,
                              time ? "HH[MM[SS[.F]]]" : "YYYYMMDD", v);
        if (!time)
            snprintf(hi, sizeof(hi), "%.8s", dash + 1);
    }
    if (lo[0] && hi[0] && strcmp(lo, hi) > 0 && !time)
        return query_fail(q, "%s: range start after its end", name);
    if (time)
        snprintf(expr, sizeof(expr), "substr(replace(%s, '.', '') || '0000000000000', 1, %%d)",
                 col);
    if (!dash) {   /* single value */
        if (time) {
            cmn_buf_appendf(&q->where, " AND %s != '' AND ", col);
            cmn_buf_appendf(&q->where, expr, (int)strlen(lo));
            cmn_buf_appends(&q->where, " = ?");
        } else {
            cmn_buf_appendf(&q->where, " AND %s = ?", col);
        }
        return add_param(q, lo, strlen(lo));
    }
    if (lo[0]) {
        cmn_buf_appendf(&q->where, " AND %s != '' AND ", col);
        if (time)
            cmn_buf_appendf(&q->where, expr, (int)strlen(lo));
        else
            cmn_buf_appends(&q->where, col);
        cmn_buf_appends(&q->where, " >= ?");
        if (!add_param(q, lo, strlen(lo)))
            return false;
    }
    if (hi[0]) {
        cmn_buf_appendf(&q->where, " AND %s != '' AND ", col);
        if (time)
            cmn_buf_appendf(&q->where, expr, (int)strlen(hi));
        else
            cmn_buf_appends(&q->where, col);
        cmn_buf_appends(&q->where, " <= ?");
        if (!add_param(q, hi, strlen(hi)))
            return false;
    }
    return true;
}

static bool parse_count(query_t *q, const char *name, const char *v, long long max,
                        long long *out)
{
    char *end;
    long long n;

    errno = 0;
    n = strtoll(v, &end, 10);
    if (end == v || *end || n < 0 || (errno && errno != ERANGE))
        return query_fail(q, "bad value for %s", name);
    if (errno == ERANGE || n > max)
        return query_fail(q, "%s too large", name);
    *out = n;
    return true;
}

static bool add_int(query_t *q, const char *col, const char *v, const char *name)
{
    long long n;

    if (!*v || strcmp(v, "*") == 0)
        return true;
    if (!parse_count(q, name, v, INT32_MAX, &n))
        return false;
    cmn_buf_appendf(&q->where, " AND %s = %lld", col, n);
    return true;
}

static int attr_index(uint32_t tag)
{
    for (size_t i = 0; i < CMN_ARRAY_SIZE(attrs); i++)
        if (attrs[i].tag == tag)
            return (int)i;
    return -1;
}

static bool add_include(query_t *q, const char *v)
{
    const char *p = v;

    while (*p) {
        size_t n = strcspn(p, ",");
        char one[80], vr[3];
        uint32_t tag;

        if (n == 0 || n >= sizeof(one))
            return query_fail(q, "bad includefield value");
        memcpy(one, p, n);
        one[n] = '\0';
        if (strcmp(one, "all") == 0) {
            q->incl_all = true;
        } else if (strchr(one, '.')) {
            /* Sequence paths: not supported; the whole sequence can be asked for. */
            cmn_buf_appendf(&q->warn, "%sincludefield %s", q->warn.len ? ", " : "", one);
        } else if (!cloud_dict_lookup(one, &tag, vr)) {
            return query_fail(q, "unknown attribute '%.40s' in includefield", one);
        } else if (q->nincl < MAX_INCLUDE) {
            q->incl[q->nincl++] = tag;
        } else {
            return query_fail(q, "too many includefield values");
        }
        p += n;
        if (*p)
            p++;
    }
    return true;
}

static bool key_is(const char *k, const char *name)
{
    return strcmp(k, name) == 0;
}

/* Parses req->query into q for a level. false with q->err on bad input. */
static bool query_parse(const cmn_http_req_t *req, level_t level, query_t *q)
{
    const char *cur = req->query;
    char k[80], v[1024];
    int rc;

    while ((rc = cmn_http_query_next(&cur, k, sizeof(k), v, sizeof(v))) == 1) {
        uint32_t tag;
        char vr[3];
        int ai;
        bool ok = true;

        /* cmn_http_query_next truncates: a full buffer means a value too long. */
        if (strlen(k) >= sizeof(k) - 1 || strlen(v) >= sizeof(v) - 1)
            return query_fail(q, "query key or value too long");
        if (key_is(k, "limit")) {
            ok = parse_count(q, "limit", v, INT64_MAX / 4, &q->limit);
            if (ok && q->limit > QIDO_MAX_LIMIT) {
                q->limit = QIDO_MAX_LIMIT;
                q->clamped = true;
            }
            if (ok && q->limit == 0)
                q->limit = QIDO_DEFAULT_LIMIT;
        } else if (key_is(k, "offset")) {
            ok = parse_count(q, "offset", v, INT32_MAX, &q->offset);
        } else if (key_is(k, "includefield")) {
            ok = add_include(q, v);
        } else if (key_is(k, "fuzzymatching")) {
            if (strcmp(v, "true") == 0)
                q->fuzzy = true;
            else if (strcmp(v, "false") != 0)
                ok = query_fail(q, "fuzzymatching must be true or false");
        } else if (key_is(k, "_")) {
            /* cache-busting parameter some clients add */
        } else if (strchr(k, '.')) {
            /* Sequence matching (Seq.Attr): known keys are ignored with a warning. */
            for (const char *part = k; *part;) {
                char one[80];
                size_t pn = strcspn(part, ".");
                snprintf(one, sizeof(one), "%.*s", (int)pn, part);
                if (!cloud_dict_lookup(one, &tag, vr))
                    return query_fail(q, "unknown attribute '%.40s'", k);
                part += pn;
                if (*part)
                    part++;
            }
            cmn_buf_appendf(&q->warn, "%s%s", q->warn.len ? ", " : "", k);
        } else if (!cloud_dict_lookup(k, &tag, vr)) {
            return query_fail(q, "unknown query key '%.40s'", k);
        } else if ((ai = attr_index(tag)) < 0) {
            cmn_buf_appendf(&q->warn, "%s%s", q->warn.len ? ", " : "", k);
        } else if (attrs[ai].level > level) {
            return query_fail(q, "'%.40s' is not a key at this query level", k);
        } else {
            const char *col = attrs[ai].col;
            switch (attrs[ai].match) {
            case M_STR: ok = add_match(q, col, v, false); break;
            case M_PN: ok = add_match(q, col, v, true); break;
            case M_UID: ok = add_list(q, col, v, true, k); break;
            case M_CS_LIST: ok = add_list(q, col, v, false, k); break;
            case M_DATE: ok = add_range(q, col, v, false, k); break;
            case M_TIME: ok = add_range(q, col, v, true, k); break;
            case M_INT: ok = add_int(q, col, v, k); break;
            case M_MODALITIES:
                if (*v && strcmp(v, "*") != 0) {
                    cmn_buf_appends(&q->where, " AND EXISTS (SELECT 1 FROM series m WHERE"
                                               " m.study_uid = s.study_uid");
                    ok = add_list(q, "m.modality", v, false, k);
                    cmn_buf_appends(&q->where, ")");
                }
                break;
            }
        }
        if (!ok)
            return false;
    }
    if (rc < 0)
        return query_fail(q, "malformed query string");
    return true;
}

/* ------------------------------------------------------------ DICOM JSON */

/*
 * QIDO rows are written as text straight from the SQLite columns (jansson
 * objects for 300 rows cost more than the query): each row collects its
 * attributes, sorts them by tag and renders PS3.18 F JSON. Values point into
 * the current statement row and are used before the next step.
 */
typedef enum { EL_STR, EL_PN, EL_INT, EL_LIST } el_kind_t;

typedef struct {
    uint32_t tag;
    const char *vr;
    el_kind_t kind;
    const char *s;               /* EL_STR/EL_PN/EL_LIST ("" = empty) */
    bool has_int;                /* EL_INT: false = empty */
    int64_t i;
} el_t;

typedef struct {
    el_t el[40];
    int n;
    char url[1024];              /* RetrieveURL storage */
} row_t;

static void put_str(row_t *r, uint32_t tag, const char *vr, const char *v)
{
    if (r->n < (int)CMN_ARRAY_SIZE(r->el))
        r->el[r->n++] = (el_t){ .tag = tag, .vr = vr, .kind = EL_STR, .s = v ? v : "" };
}

static void put_pn(row_t *r, uint32_t tag, const char *v)
{
    if (r->n < (int)CMN_ARRAY_SIZE(r->el))
        r->el[r->n++] = (el_t){ .tag = tag, .vr = "PN", .kind = EL_PN, .s = v ? v : "" };
}

static void put_int_col(row_t *r, uint32_t tag, const char *vr, cmn_sql_stmt_t *st, int i)
{
    if (r->n < (int)CMN_ARRAY_SIZE(r->el))
        r->el[r->n++] = (el_t){ .tag = tag, .vr = vr, .kind = EL_INT,
                                .has_int = !cmn_sql_column_is_null(st, i),
                                .i = cmn_sql_column_int64(st, i) };
}

/* A comma-separated list (studies.modalities) as a multi-valued attribute. */
static void put_list(row_t *r, uint32_t tag, const char *vr, const char *csv)
{
    if (r->n < (int)CMN_ARRAY_SIZE(r->el))
        r->el[r->n++] = (el_t){ .tag = tag, .vr = vr, .kind = EL_LIST, .s = csv ? csv : "" };
}

static void put_url(row_t *r, const char *base, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void put_url(row_t *r, const char *base, const char *fmt, ...)
{
    size_t n = (size_t)snprintf(r->url, sizeof(r->url), "%s", base);
    va_list ap;

    if (n < sizeof(r->url)) {
        va_start(ap, fmt);
        vsnprintf(r->url + n, sizeof(r->url) - n, fmt, ap);
        va_end(ap);
    }
    put_str(r, 0x00081190, "UR", r->url);
}

/* Appends s (n bytes) as a JSON string. */
static void json_esc(cmn_buf_t *b, const char *s, size_t n)
{
    size_t run = 0;

    cmn_buf_append(b, "\"", 1);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\')
            continue;
        cmn_buf_append(b, s + run, i - run);
        if (c == '"' || c == '\\') {
            char e[2] = { '\\', (char)c };
            cmn_buf_append(b, e, 2);
        } else {
            cmn_buf_appendf(b, "\\u%04x", c);
        }
        run = i + 1;
    }
    cmn_buf_append(b, s + run, n - run);
    cmn_buf_append(b, "\"", 1);
}

static int el_cmp(const void *a, const void *b)
{
    uint32_t x = ((const el_t *)a)->tag, y = ((const el_t *)b)->tag;
    return x < y ? -1 : x > y;
}

/* Renders a row as one DICOM JSON object, tags ascending. */
static void row_render(row_t *r, cmn_buf_t *b)
{
    qsort(r->el, (size_t)r->n, sizeof(r->el[0]), el_cmp);
    cmn_buf_append(b, "{", 1);
    for (int k = 0; k < r->n; k++) {
        const el_t *e = &r->el[k];
        char head[32];
        size_t hn = 0;

        if (k)
            head[hn++] = ',';
        head[hn++] = '"';
        for (int sh = 28; sh >= 0; sh -= 4)
            head[hn++] = "0123456789ABCDEF"[(e->tag >> sh) & 0xF];
        memcpy(head + hn, "\":{\"vr\":\"", 9);
        hn += 9;
        head[hn++] = e->vr[0];
        head[hn++] = e->vr[1];
        head[hn++] = '"';
        cmn_buf_append(b, head, hn);
        switch (e->kind) {
        case EL_STR:
            if (*e->s) {
                cmn_buf_appends(b, ",\"Value\":[");
                json_esc(b, e->s, strlen(e->s));
                cmn_buf_appends(b, "]");
            }
            break;
        case EL_PN:
            if (*e->s) {
                cmn_buf_appends(b, ",\"Value\":[{\"Alphabetic\":");
                json_esc(b, e->s, strlen(e->s));
                cmn_buf_appends(b, "}]");
            }
            break;
        case EL_INT:
            if (e->has_int)
                cmn_buf_appendf(b, ",\"Value\":[%" PRId64 "]", e->i);
            break;
        case EL_LIST:
            if (*e->s) {
                const char *p = e->s;
                bool first = true;
                cmn_buf_appends(b, ",\"Value\":[");
                while (*p) {
                    size_t n = strcspn(p, ",");
                    if (n) {
                        if (!first)
                            cmn_buf_append(b, ",", 1);
                        json_esc(b, p, n);
                        first = false;
                    }
                    p += n;
                    if (*p)
                        p++;
                }
                cmn_buf_appends(b, "]");
            }
            break;
        }
        cmn_buf_append(b, "}", 1);
    }
    cmn_buf_append(b, "}", 1);
}

/* Adds includefield attributes that are not already in o (from rep, else empty). */
static void put_included(json_t *o, const query_t *q, level_t level, json_t *rep)
{
    char key[9], vr[3];
    uint32_t tag;

    for (int i = 0; i < q->nincl; i++) {
        json_t *v;
        snprintf(key, sizeof(key), "%08X", q->incl[i]);
        if (json_object_get(o, key))
            continue;
        v = rep ? json_object_get(rep, key) : NULL;
        if (v)
            json_object_set(o, key, v);
        else if (cloud_dict_lookup(key, &tag, vr))
            json_object_set_new(o, key, json_pack("{s:s}", "vr", vr));
    }
    if (q->incl_all && rep) {
        const uint32_t *list = level == LEVEL_STUDY ? all_study : all_series;
        size_t n = level == LEVEL_STUDY ? CMN_ARRAY_SIZE(all_study) : CMN_ARRAY_SIZE(all_series);
        const char *k;
        json_t *v;

        if (level == LEVEL_INSTANCE) {
            json_object_foreach(rep, k, v)
                if (!json_object_get(o, k))
                    json_object_set(o, k, v);
            return;
        }
        for (int pass = 0; pass < (level == LEVEL_SERIES ? 2 : 1); pass++) {
            if (pass == 1) {   /* series level also gets the study attributes */
                list = all_study;
                n = CMN_ARRAY_SIZE(all_study);
            }
            for (size_t i = 0; i < n; i++) {
                snprintf(key, sizeof(key), "%08X", list[i]);
                if (!json_object_get(o, key) && (v = json_object_get(rep, key)))
                    json_object_set(o, key, v);
            }
        }
    }
}

/* ------------------------------------------------------------------ QIDO */

static const char study_cols[] =
    "s.study_uid, s.study_date, s.study_time, s.accession, s.study_id, s.description,"
    " s.referring, p.patient_id, p.name, p.birth_date, p.sex";

static void study_attrs(row_t *o, cmn_sql_stmt_t *st)
{
    put_str(o, 0x0020000D, "UI", col_str(st, 0));
    put_str(o, 0x00080020, "DA", col_str(st, 1));
    put_str(o, 0x00080030, "TM", col_str(st, 2));
    put_str(o, 0x00080050, "SH", col_str(st, 3));
    put_str(o, 0x00200010, "SH", col_str(st, 4));
    put_str(o, 0x00081030, "LO", col_str(st, 5));
    put_pn(o, 0x00080090, col_str(st, 6));
    put_str(o, 0x00100020, "LO", col_str(st, 7));
    put_pn(o, 0x00100010, col_str(st, 8));
    put_str(o, 0x00100030, "DA", col_str(st, 9));
    put_str(o, 0x00100040, "CS", col_str(st, 10));
    put_str(o, 0x00080056, "CS", "ONLINE");
}

/*
 * The attributes every row of a level carries (what run_qido puts; keep in
 * step). includefield naming only these changes nothing: the web app's
 * study list asks for NumberOfStudyRelated* and ModalitiesInStudy, which
 * must not cost a representative instance per row.
 */
static const uint32_t rows_common[] = {
    0x0020000D, 0x00080020, 0x00080030, 0x00080050, 0x00200010, 0x00081030, 0x00080090,
    0x00100020, 0x00100010, 0x00100030, 0x00100040, 0x00080056, 0x00081190,
};
static const uint32_t rows_study[] = { 0x00080061, 0x00201206, 0x00201208 };
static const uint32_t rows_series[] = {
    0x0020000E, 0x00080060, 0x00200011, 0x0008103E, 0x00180015, 0x00080021, 0x00080031,
    0x00201209,
};
static const uint32_t rows_instance[] = {
    0x0020000E, 0x00080060, 0x00200011, 0x00080018, 0x00080016, 0x00200013, 0x00280010,
    0x00280011, 0x00280008, 0x00083002, 0x00280100,
};

static bool in_list(const uint32_t *list, size_t n, uint32_t tag)
{
    for (size_t i = 0; i < n; i++)
        if (list[i] == tag)
            return true;
    return false;
}

static bool in_rows(level_t level, uint32_t tag)
{
    if (in_list(rows_common, CMN_ARRAY_SIZE(rows_common), tag))
        return true;
    switch (level) {
    case LEVEL_STUDY: return in_list(rows_study, CMN_ARRAY_SIZE(rows_study), tag);
    case LEVEL_SERIES: return in_list(rows_series, CMN_ARRAY_SIZE(rows_series), tag);
    case LEVEL_INSTANCE: return in_list(rows_instance, CMN_ARRAY_SIZE(rows_instance), tag);
    }
    return false;
}

/* Whether includefield asks for anything beyond the level's rows. */
static bool has_extra_fields(const query_t *q, level_t level)
{
    if (q->incl_all)
        return true;
    for (int i = 0; i < q->nincl; i++)
        if (!in_rows(level, q->incl[i]))
            return true;
    return false;
}

/* Whether the answer needs a representative instance's JSON. */
static bool needs_rep(const query_t *q, level_t level)
{
    if (q->incl_all)
        return true;
    for (int i = 0; i < q->nincl; i++) {
        int ai = attr_index(q->incl[i]);
        if (!in_rows(level, q->incl[i]) && (ai < 0 || attrs[ai].level > level))
            return true;
    }
    return false;
}

/* Runs the query; *more = a row beyond the limit exists. */
static int run_qido(cmn_sql_t *db, const char *base, level_t level, query_t *q, cmn_buf_t *out,
                    bool *more)
{
    static __thread row_t row;   /* 40 KiB: off the handler's stack */
    bool rep = needs_rep(q, level);
    bool extra = has_extra_fields(q, level);
    const char *where = q->where.data ? q->where.data : "";
    cmn_buf_t sql;
    cmn_sql_stmt_t *st;
    long long count = 0;
    int rc;

    *more = false;
    cmn_buf_init(&sql, 128 << 10);
    switch (level) {
    /*
     * Study and series rows carry their counts and modalities as columns
     * (migration 8). A representative instance (includefield beyond the
     * rows) is looked up for the page only: the page is sorted and cut
     * first (a MATERIALIZED CTE on both engines), then joined.
     */
    case LEVEL_STUDY:
        cmn_buf_appendf(&sql,
                        "%sSELECT %s, s.modalities, s.num_series, s.num_instances%s"
                        " FROM studies s JOIN patients p ON p.pk = s.patient_pk WHERE 1 = 1%s"
                        " ORDER BY s.study_date DESC, s.study_time DESC, s.study_uid"
                        " LIMIT %lld OFFSET %lld%s",
                        rep ? "WITH page AS MATERIALIZED (" : "", study_cols, rep ? "" : ", NULL",
                        where, q->limit + 1, q->offset,
                        rep ? ") SELECT page.*, (SELECT r.json FROM instances r"
                              " WHERE r.study_uid = page.study_uid LIMIT 1) FROM page"
                              " ORDER BY page.study_date DESC, page.study_time DESC,"
                              " page.study_uid" : "");
        break;
    case LEVEL_SERIES:
        cmn_buf_appendf(&sql,
                        "%sSELECT %s, se.series_uid, se.modality, se.series_number,"
                        " se.description AS series_description, se.body_part, se.series_date,"
                        " se.series_time, se.num_instances%s"
                        " FROM series se JOIN studies s ON s.study_uid = se.study_uid"
                        " JOIN patients p ON p.pk = s.patient_pk WHERE 1 = 1%s"
                        " ORDER BY s.study_uid, se.series_number NULLS FIRST, se.series_uid"
                        " LIMIT %lld OFFSET %lld%s",
                        rep ? "WITH page AS MATERIALIZED (" : "", study_cols, rep ? "" : ", NULL",
                        where, q->limit + 1, q->offset,
                        rep ? ") SELECT page.*, (SELECT r.json FROM instances r"
                              " WHERE r.series_uid = page.series_uid LIMIT 1) FROM page"
                              " ORDER BY page.study_uid, page.series_number NULLS FIRST,"
                              " page.series_uid" : "");
        break;
    case LEVEL_INSTANCE:
        cmn_buf_appendf(&sql,
                        "SELECT %s, se.series_uid, se.modality, se.series_number,"
                        " i.sop_uid, i.sop_class_uid, i.instance_number, i.rows, i.columns,"
                        " i.frames, i.transfer_syntax, i.bits_allocated, %s"
                        " FROM instances i JOIN series se ON se.series_uid = i.series_uid"
                        " JOIN studies s ON s.study_uid = se.study_uid"
                        " JOIN patients p ON p.pk = s.patient_pk WHERE 1 = 1%s"
                        " ORDER BY i.study_uid, i.series_uid, i.instance_number NULLS FIRST,"
                        " i.sop_uid"
                        " LIMIT %lld OFFSET %lld",
                        study_cols, rep ? "i.json" : "NULL", where, q->limit + 1, q->offset);
        break;
    }
    if (!sql.data)
        return -ENOMEM;
    rc = cmn_sql_prepare(db, sql.data, &st);
    cmn_buf_free(&sql);
    if (rc < 0)
        return rc;
    for (int i = 0; i < q->nparams; i++)
        cmn_sql_bind_text(st, i + 1, q->params[i]);

    cmn_buf_append(out, "[", 1);
    while ((rc = cmn_sql_step(st)) == CMN_SQL_ROW) {
        const char *suid = col_str(st, 0);
        row_t *o = &row;
        int repcol;

        if (++count > q->limit) {
            *more = true;
            rc = CMN_SQL_DONE;
            break;
        }
        o->n = 0;
        study_attrs(o, st);
        if (level == LEVEL_STUDY) {
            put_list(o, 0x00080061, "CS", col_str(st, 11));
            put_int_col(o, 0x00201206, "IS", st, 12);
            put_int_col(o, 0x00201208, "IS", st, 13);
            put_url(o, base, "/studies/%s", suid);
            repcol = 14;
        } else {
            const char *seuid = col_str(st, 11);
            put_str(o, 0x0020000E, "UI", seuid);
            put_str(o, 0x00080060, "CS", col_str(st, 12));
            put_int_col(o, 0x00200011, "IS", st, 13);
            if (level == LEVEL_SERIES) {
                put_str(o, 0x0008103E, "LO", col_str(st, 14));
                put_str(o, 0x00180015, "CS", col_str(st, 15));
                put_str(o, 0x00080021, "DA", col_str(st, 16));
                put_str(o, 0x00080031, "TM", col_str(st, 17));
                put_int_col(o, 0x00201209, "IS", st, 18);
                put_url(o, base, "/studies/%s/series/%s", suid, seuid);
                repcol = 19;
            } else {
                const char *iuid = col_str(st, 14);
                put_str(o, 0x00080018, "UI", iuid);
                put_str(o, 0x00080016, "UI", col_str(st, 15));
                put_int_col(o, 0x00200013, "IS", st, 16);
                put_int_col(o, 0x00280010, "US", st, 17);
                put_int_col(o, 0x00280011, "US", st, 18);
                put_int_col(o, 0x00280008, "IS", st, 19);
                put_str(o, 0x00083002, "UI", col_str(st, 20));
                put_int_col(o, 0x00280100, "US", st, 21);
                put_url(o, base, "/studies/%s/series/%s/instances/%s", suid, seuid, iuid);
                repcol = 22;
            }
        }
        if (count > 1)
            cmn_buf_append(out, ",", 1);
        if (extra) {
            /* Rare path: merge with the representative instance in jansson. */
            cmn_buf_t one;
            json_t *obj, *rj = NULL;
            char *text;

            cmn_buf_init(&one, 0);
            row_render(o, &one);
            obj = one.data ? json_loads(one.data, 0, NULL) : NULL;
            cmn_buf_free(&one);
            if (!obj) {
                rc = -ENOMEM;
                break;
            }
            if (!cmn_sql_column_is_null(st, repcol))
                rj = json_loads(col_str(st, repcol), 0, NULL);
            put_included(obj, q, level, rj);
            json_decref(rj);
            text = json_dumps(obj, JSON_COMPACT | JSON_SORT_KEYS);
            json_decref(obj);
            if (text)
                cmn_buf_appends(out, text);
            free(text);
        } else {
            row_render(o, out);
        }
    }
    cmn_buf_append(out, "]", 1);
    if (!out->data)
        rc = -ENOMEM;
    cmn_sql_finalize(st);
    if (rc != CMN_SQL_DONE) {
        CMN_LOG_E("dicomweb", "qido: %s", cmn_sql_errmsg(db));
        return CMN_EDB;
    }
    return 0;
}

static void handle_qido(cmn_sql_t *db, const cmn_http_req_t *req, cmn_http_resp_t *resp,
                        level_t level, const char *study, const char *series)
{
    char base[400], *warning = NULL;
    cmn_buf_t w, arr;
    query_t q;
    char *text;
    size_t tlen = 0;
    bool more;

    query_init(&q);
    q.pg = cmn_sql_engine(db) == CMN_SQL_PG;
    /* Path constraints first: their parameters bind before the query's. */
    if (study) {
        cmn_buf_appends(&q.where, " AND s.study_uid = ?");
        add_param(&q, study, strlen(study));
    }
    if (series) {
        cmn_buf_appends(&q.where, " AND se.series_uid = ?");
        add_param(&q, series, strlen(series));
    }
    if (!query_parse(req, level, &q)) {
        cloud_resp_error(resp, 400, "bad_query", q.err);
        query_free(&q);
        return;
    }
    cloud__dicomweb_base_url(req, base, sizeof(base));
    cmn_buf_init(&arr, 0);
    if (run_qido(db, base, level, &q, &arr, &more) < 0) {
        cmn_buf_free(&arr);
        query_free(&q);
        cloud_resp_error(resp, 500, "internal", "query failed");
        return;
    }
    text = cmn_buf_steal(&arr, &tlen);
    cmn_buf_init(&w, 8192);
    if (more)
        cmn_buf_appendf(&w, "299 yunying \"The number of results exceeded the maximum supported"
                            " by the server (%lld). Additional results can be requested.\"",
                        q.limit);
    if (q.warn.len)
        cmn_buf_appendf(&w, "%s299 yunying \"The following query keys are not supported and"
                            " were ignored: %.1000s\"",
                        w.len ? ", " : "", q.warn.data);
    if (q.fuzzy)
        cmn_buf_appendf(&w, "%s299 yunying \"The fuzzymatching parameter is not supported."
                            " Only literal matching has been performed.\"",
                        w.len ? ", " : "");
    if (w.len)
        warning = w.data;
    if (!text) {
        cloud_resp_error(resp, 500, "internal", "out of memory");
    } else {
        send_json(req, resp, text, tlen, "no-store", NULL, warning);
    }
    cmn_buf_free(&w);
    query_free(&q);
}

/* -------------------------------------------------------- Accept parsing */

typedef struct {
    char type[64];               /* "multipart/related", "*\/\*", "application/dicom" ... */
    char part[64];               /* type= parameter, "" when absent */
    char ts[80];                 /* transfer-syntax= parameter, "" when absent */
    double q;
} accept_t;

static void trim(char **s, char **e)
{
    while (*s < *e && (**s == ' ' || **s == '\t'))
        (*s)++;
    while (*e > *s && ((*e)[-1] == ' ' || (*e)[-1] == '\t'))
        (*e)--;
}

static void copy_lower(char *dst, size_t cap, const char *s, size_t n, bool lower)
{
    size_t k = 0;

    if (n >= 2 && s[0] == '"' && s[n - 1] == '"') {
        s++;
        n -= 2;
    }
    for (size_t i = 0; i < n && k + 1 < cap; i++)
        dst[k++] = lower && s[i] >= 'A' && s[i] <= 'Z' ? (char)(s[i] - 'A' + 'a') : s[i];
    dst[k] = '\0';
}

/* Splits an Accept header into media ranges (sorted by q, stable). Count. */
static int parse_accept(const char *h, accept_t *out, int max)
{
    int n = 0;

    if (!h || !*h)
        return 0;
    while (*h && n < max) {
        const char *end = h;
        bool quoted = false;
        accept_t *a = &out[n];
        char seg[512];
        char *p, *se, *tok;

        while (*end && (quoted || *end != ',')) {
            if (*end == '"')
                quoted = !quoted;
            end++;
        }
        copy_lower(seg, sizeof(seg), h, (size_t)(end - h), false);
        h = *end ? end + 1 : end;
        memset(a, 0, sizeof(*a));
        a->q = 1.0;
        /* media type, then ;name=value parameters (quotes respected) */
        p = seg;
        for (int first = 1; p && *p; first = 0) {
            char *semi = p;
            bool q2 = false;
            while (*semi && (q2 || *semi != ';')) {
                if (*semi == '"')
                    q2 = !q2;
                semi++;
            }
            tok = p;
            se = semi;
            p = *semi ? semi + 1 : NULL;
            trim(&tok, &se);
            if (first) {
                copy_lower(a->type, sizeof(a->type), tok, (size_t)(se - tok), true);
                continue;
            }
            char *eq = memchr(tok, '=', (size_t)(se - tok));
            if (!eq)
                continue;
            char *ks = tok, *ke = eq, *vs = eq + 1, *ve = se;
            char key[32];
            trim(&ks, &ke);
            trim(&vs, &ve);
            copy_lower(key, sizeof(key), ks, (size_t)(ke - ks), true);
            if (strcmp(key, "type") == 0)
                copy_lower(a->part, sizeof(a->part), vs, (size_t)(ve - vs), true);
            else if (strcmp(key, "transfer-syntax") == 0)
                copy_lower(a->ts, sizeof(a->ts), vs, (size_t)(ve - vs), false);
            else if (strcmp(key, "q") == 0)
                a->q = strtod(vs, NULL);
        }
        if (a->type[0] && a->q > 0)
            n++;
    }
    /* stable insertion sort by q, highest first */
    for (int i = 1; i < n; i++) {
        accept_t t = out[i];
        int j = i;
        while (j > 0 && out[j - 1].q < t.q) {
            out[j] = out[j - 1];
            j--;
        }
        out[j] = t;
    }
    return n;
}

/* ------------------------------------------------------------------ WADO */

/*
 * What the client accepts for instances: a list of transfer syntaxes in
 * order of preference; "*" = as stored. Count, 0 = nothing acceptable.
 */
static int instance_accept(const cmn_http_req_t *req, char ts[][80], int max)
{
    accept_t a[MAX_ACCEPT];
    int n = parse_accept(cmn_http_req_header(req, "Accept"), a, MAX_ACCEPT), k = 0;

    if (n == 0) {
        snprintf(ts[0], 80, "*");
        return 1;
    }
    for (int i = 0; i < n && k < max; i++) {
        bool ok = strcmp(a[i].type, "*/*") == 0 || strcmp(a[i].type, "multipart/*") == 0 ||
                  strcmp(a[i].type, "application/dicom") == 0 ||
                  (strcmp(a[i].type, "multipart/related") == 0 &&
                   (!a[i].part[0] || strcmp(a[i].part, "application/dicom") == 0));
        if (ok)
            snprintf(ts[k++], 80, "%s", a[i].ts[0] ? a[i].ts : "*");
    }
    return k;
}

typedef struct {
    char *path;                  /* owned: the file to send */
    uint64_t size;
    char ts[65];                 /* its transfer syntax */
} part_t;

/* Selects the instances of a study/series/instance, ordered for viewing. */
static int select_instances(cmn_sql_t *db, const char *cols, const char *study, const char *series,
                            const char *sop, cmn_sql_stmt_t **out)
{
    char sql[512];

    /* One statement per level, not "?3 IS NULL OR sop_uid = ?3": that form
     * kept SQLite on the study index, scanning and sorting every instance of
     * the study to answer one (bench_dicomweb.sh, instances). */
    snprintf(sql, sizeof(sql),
             "SELECT %s FROM instances WHERE study_uid = ?%s%s"
             " ORDER BY series_uid, instance_number NULLS FIRST, sop_uid",
             cols, series ? " AND series_uid = ?" : "", sop ? " AND sop_uid = ?" : "");
    if (cmn_sql_prepare(db, sql, out) < 0)
        return CMN_EDB;
    int i = 1;
    cmn_sql_bind_text(*out, i++, study);
    if (series)
        cmn_sql_bind_text(*out, i++, series);
    if (sop)
        cmn_sql_bind_text(*out, i, sop);
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

static bool is_native(const char *ts)
{
    return strcmp(ts, CLOUD_TS_IMPLICIT_LE) == 0 || strcmp(ts, CLOUD_TS_EXPLICIT_LE) == 0;
}

/*
 * The instance at src (SHA-256 sha) in transfer syntax ts, from the cache
 * or made now: 0 with out (PATH_MAX) set; 1 when that conversion is not
 * possible for this instance; negative on failure.
 */
static int transcoded(const char *src, const char *sha, const char *stored_ts, const char *ts,
                      char *out, size_t outlen, uint64_t *size)
{
    char dir[4096], tmp[4200], err[256];
    struct stat sb;
    int rc;

    if (strcmp(ts, CLOUD_TS_EXPLICIT_LE) == 0) {
        if (!cloud_transcode_can_decode(stored_ts))
            return 1;
    } else if (strcmp(ts, CLOUD_TS_JPEGLS_LOSSLESS) == 0) {
        if (!is_native(stored_ts) && strcmp(stored_ts, CLOUD_TS_DEFLATED_LE) != 0)
            return 1;
    } else {
        return 1;
    }
    snprintf(dir, sizeof(dir), "%s/.cache/%.2s", cloud_conf->ingest.staging_dir, sha);
    if (snprintf(out, outlen, "%s/%s.%s.dcm", dir, sha, ts) >= (int)outlen)
        return CMN_EINTERNAL;
    if (stat(out, &sb) == 0) {
        *size = (uint64_t)sb.st_size;
        return 0;
    }
    if ((rc = cmn_mkdirs(dir)) < 0)
        return rc;
    snprintf(tmp, sizeof(tmp), "%s.%ld.tmp", out, (long)gettid());
    if (strcmp(ts, CLOUD_TS_EXPLICIT_LE) == 0) {
        rc = cloud_transcode_to_native(src, tmp, err, sizeof(err));
        if (rc == -ENOTSUP)
            rc = 1;
    } else {
        rc = cmn_dicom_to_jpegls(src, tmp, NULL, err, sizeof(err));
        if (rc == CMN_DICOM_CODEC_SKIPPED)
            rc = 1;
    }
    if (rc != 0) {
        unlink(tmp);
        if (rc < 0)
            CMN_LOG_W("dicomweb", "transcode to %s failed sha=%.16s: %s", ts, sha, err);
        return rc;
    }
    if (rename(tmp, out) < 0 || stat(out, &sb) < 0) {
        rc = -errno;
        unlink(tmp);
        return rc;
    }
    *size = (uint64_t)sb.st_size;
    CMN_LOG_D("dicomweb", "transcoded sha=%.16s ts=%s bytes=%" PRIu64, sha, ts, *size);
    return 0;
}

/* Chooses the representation of one instance; 0, 1 = none acceptable, or < 0. */
static int choose(part_t *p, const char *sha, char accept[][80], int nacc)
{
    for (int i = 0; i < nacc; i++) {
        char out[4096];
        uint64_t size = 0;
        int rc;

        if (strlen(accept[i]) >= sizeof(p->ts))
            continue;
        if (strcmp(accept[i], "*") == 0 || strcmp(accept[i], p->ts) == 0)
            return 0;
        rc = transcoded(p->path, sha, p->ts, accept[i], out, sizeof(out), &size);
        if (rc < 0)
            return rc;
        if (rc == 0) {
            free(p->path);
            p->path = cmn_xstrdup(out);
            p->size = size;
            snprintf(p->ts, sizeof(p->ts), "%.64s", accept[i]);
            return 0;
        }
    }
    return 1;
}

static void handle_retrieve(cmn_sql_t *db, const cmn_http_req_t *req, cmn_http_resp_t *resp,
                            const char *study, const char *series, const char *sop)
{
    char accept[8][80];
    int nacc = instance_accept(req, accept, 8);
    part_t *parts = NULL;
    char **shas = NULL;
    size_t n = 0, cap = 0;
    char boundary[41], head[320], ctype[160], etag[80];
    cmn_sha256_ctx_t hc;
    cmn_sql_stmt_t *st;
    struct stat sb;
    int rc;

    if (nacc == 0) {
        cloud_resp_error(resp, 406, "not_acceptable",
                         "retrieve answers multipart/related; type=\"application/dicom\"");
        return;
    }
    if (select_instances(db, "path, size, sha256, transfer_syntax", study, series, sop, &st) < 0) {
        cloud_resp_error(resp, 500, "internal", "query failed");
        return;
    }
    cmn_sha256_init(&hc);
    for (int i = 0; i < nacc; i++)
        cmn_sha256_update(&hc, accept[i], strlen(accept[i]) + 1);
    while ((rc = cmn_sql_step(st)) == CMN_SQL_ROW) {
        if (n == cap) {
            cap = cap ? cap * 2 : 16;
            parts = cmn_xrealloc(parts, cap * sizeof(*parts));
            shas = cmn_xrealloc(shas, cap * sizeof(*shas));
        }
        parts[n].path = cmn_xstrdup(col_str(st, 0));
        parts[n].size = (uint64_t)cmn_sql_column_int64(st, 1);
        shas[n] = cmn_xstrdup(col_str(st, 2));
        snprintf(parts[n].ts, sizeof(parts[n].ts), "%s", col_str(st, 3));
        cmn_sha256_update(&hc, shas[n], strlen(shas[n]));
        n++;
    }
    cmn_sql_finalize(st);
    if (rc != CMN_SQL_DONE) {
        cloud_resp_error(resp, 500, "internal", "query failed");
        goto out;
    }
    if (n == 0) {
        cloud_resp_error(resp, 404, "not_found", "no matching instances");
        goto out;
    }
    etag_final(&hc, "", etag);
    if (etag_matches(req, etag)) {
        not_modified(resp, etag, "private, max-age=3600");
        goto out;
    }
    /* Choose every representation and check every file first: once parts
     * are appended the answer is committed. */
    for (size_t i = 0; i < n; i++) {
        if (archive_ready(parts[i].path) < 0) {
            cloud_resp_error(resp, 500, "archive", "archived file unavailable");
            goto out;
        }
        if (stat(parts[i].path, &sb) < 0 || (uint64_t)sb.st_size != parts[i].size) {
            CMN_LOG_E("dicomweb", "archive file missing or changed: %s", parts[i].path);
            cloud_resp_error(resp, 500, "archive", "archived file unavailable");
            goto out;
        }
        rc = choose(&parts[i], shas[i], accept, nacc);
        if (rc == 1) {
            cloud_resp_error(resp, 406, "not_acceptable",
                             "an instance cannot be provided in the requested transfer syntax");
            goto out;
        }
        if (rc < 0) {
            cloud_resp_error(resp, 500, "transcode", "cannot convert an instance");
            goto out;
        }
    }
    make_boundary(boundary);
    snprintf(ctype, sizeof(ctype), "multipart/related; type=\"application/dicom\"; boundary=%s",
             boundary);
    cmn_http_resp_status(resp, 200);
    cmn_http_resp_header(resp, "Content-Type", ctype);
    cmn_http_resp_header(resp, "Cache-Control", "private, max-age=3600");
    cmn_http_resp_header(resp, "ETag", etag);
    for (size_t i = 0; i < n; i++) {
        int hn = snprintf(head, sizeof(head),
                          "--%s\r\nContent-Type: application/dicom; transfer-syntax=%s\r\n"
                          "Content-Length: %" PRIu64 "\r\n\r\n",
                          boundary, parts[i].ts, parts[i].size);
        cmn_http_resp_body(resp, head, (size_t)hn);
        cmn_http_resp_file(resp, parts[i].path, 0, parts[i].size);
        cmn_http_resp_body(resp, "\r\n", 2);
    }
    snprintf(head, sizeof(head), "--%s--\r\n", boundary);
    cmn_http_resp_body(resp, head, strlen(head));
out:
    for (size_t i = 0; i < n; i++) {
        free(parts[i].path);
        free(shas[i]);
    }
    free(parts);
    free(shas);
}

static void handle_metadata(cmn_sql_t *db, const cmn_http_req_t *req, cmn_http_resp_t *resp,
                            const char *study, const char *series, const char *sop)
{
    cmn_sha256_ctx_t hc;
    cmn_buf_t b;
    cmn_sql_stmt_t *st;
    bool first = true;
    char etag[80];
    char *text;
    size_t len;
    int rc;

    /* The ETag comes from the SHA-256s alone, so a 304 costs no JSON. */
    if (select_instances(db, "sha256", study, series, sop, &st) < 0) {
        cloud_resp_error(resp, 500, "internal", "query failed");
        return;
    }
    cmn_sha256_init(&hc);
    cmn_sha256_update(&hc, "metadata", 8);
    while ((rc = cmn_sql_step(st)) == CMN_SQL_ROW) {
        cmn_sha256_update(&hc, cmn_sql_column_text(st, 0), (size_t)cmn_sql_column_bytes(st, 0));
        first = false;
    }
    cmn_sql_finalize(st);
    if (rc != CMN_SQL_DONE) {
        cloud_resp_error(resp, 500, "internal", "query failed");
        return;
    }
    if (first) {
        cloud_resp_error(resp, 404, "not_found", "no matching instances");
        return;
    }
    etag_final(&hc, "", etag);
    if (etag_matches(req, etag)) {
        not_modified(resp, etag, "private, max-age=3600");
        return;
    }
    {
        /* The gzip variant's tag ("...-gz") also validates. */
        char gz[96];
        snprintf(gz, sizeof(gz), "%.*s-gz\"", (int)strlen(etag) - 1, etag);
        if (etag_matches(req, gz)) {
            not_modified(resp, gz, "private, max-age=3600");
            return;
        }
    }
    if (select_instances(db, "json", study, series, sop, &st) < 0) {
        cloud_resp_error(resp, 500, "internal", "query failed");
        return;
    }
    cmn_buf_init(&b, 0);
    cmn_buf_appends(&b, "[");
    first = true;
    while ((rc = cmn_sql_step(st)) == CMN_SQL_ROW) {
        if (!first)
            cmn_buf_appends(&b, ",");
        first = false;
        cmn_buf_append(&b, cmn_sql_column_text(st, 0), (size_t)cmn_sql_column_bytes(st, 0));
    }
    cmn_sql_finalize(st);
    if (cmn_buf_appends(&b, "]") < 0 || rc != CMN_SQL_DONE) {
        cmn_buf_free(&b);
        cloud_resp_error(resp, 500, "internal", "metadata failed");
        return;
    }
    text = cmn_buf_steal(&b, &len);
    send_json(req, resp, text, len, "private, max-age=3600", etag, NULL);
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

typedef enum { FR_NATIVE, FR_AS_STORED, FR_NONE } frame_rep_t;

/*
 * Frame representation from the Accept header: FR_NATIVE (decoded,
 * application/octet-stream, Explicit VR Little Endian) or FR_AS_STORED (the
 * stored bytes with their own content type). Stored native data is both.
 */
static frame_rep_t frame_accept(const cmn_http_req_t *req, bool encapsulated, const char *mtype)
{
    accept_t a[MAX_ACCEPT];
    int n = parse_accept(cmn_http_req_header(req, "Accept"), a, MAX_ACCEPT);

    if (n == 0)
        return FR_NATIVE;
    for (int i = 0; i < n; i++) {
        const char *t = a[i].type, *part = a[i].part, *ts = a[i].ts;
        bool any = strcmp(t, "*/*") == 0 || strcmp(t, "multipart/*") == 0 ||
                   (strcmp(t, "multipart/related") == 0 && (!part[0] || strcmp(part, "*/*") == 0));
        bool octet = strcmp(t, "application/octet-stream") == 0 ||
                     (strcmp(t, "multipart/related") == 0 &&
                      strcmp(part, "application/octet-stream") == 0);
        bool stored_type = encapsulated && (strcmp(t, mtype) == 0 ||
                                            (strcmp(t, "multipart/related") == 0 &&
                                             strcmp(part, mtype) == 0));

        if (any || octet) {
            if (!ts[0] || strcmp(ts, CLOUD_TS_EXPLICIT_LE) == 0)
                return FR_NATIVE;
            if (strcmp(ts, "*") == 0)
                return encapsulated ? FR_AS_STORED : FR_NATIVE;
            continue;
        }
        if (stored_type)
            return FR_AS_STORED;
    }
    return FR_NONE;
}

/* Media type of a stored encapsulated frame. */
static const char *frame_media_type(const char *ts)
{
    if (strncmp(ts, "1.2.840.10008.1.2.4.8", 21) == 0)
        return "image/jls";
    if (strncmp(ts, "1.2.840.10008.1.2.4.9", 21) == 0)
        return "image/jp2";
    if (strcmp(ts, "1.2.840.10008.1.2.5") == 0)
        return "image/dicom-rle";
    if (strncmp(ts, "1.2.840.10008.1.2.4.", 20) == 0)
        return "image/jpeg";
    return "application/octet-stream";
}

/* frames: NULL = the whole Pixel Data value (bulk data). */
static void handle_frames(cmn_sql_t *db, const cmn_http_req_t *req, cmn_http_resp_t *resp,
                          const char *study, const char *series, const char *sop,
                          const char *frames)
{
    uint32_t list[MAX_FRAMES];
    char boundary[41], head[320], ctype[240], path[1024], ts[65], sha[65], etag[80], err[256];
    char part_type[160];
    uint64_t off, len, frame_len;
    int64_t rows, cols, nframes, bits, spp;
    cloud_frame_t *fr = NULL;
    cmn_sha256_ctx_t hc;
    frame_rep_t rep;
    bool encapsulated;
    cmn_sql_stmt_t *st;
    int n = 1, rc;

    if (frames) {
        n = parse_frames(frames, list, MAX_FRAMES);
        if (n <= 0) {
            cloud_resp_error(resp, 400, "bad_request", "bad frame list");
            return;
        }
    }
    if (select_instances(db,
                         "path, pixel_offset, pixel_length, rows, columns, frames,"
                         " bits_allocated, samples_per_pixel, transfer_syntax, sha256",
                         study, series, sop, &st) < 0) {
        cloud_resp_error(resp, 500, "internal", "query failed");
        return;
    }
    if (cmn_sql_step(st) != CMN_SQL_ROW) {
        cmn_sql_finalize(st);
        cloud_resp_error(resp, 404, "not_found", "no such instance");
        return;
    }
    snprintf(path, sizeof(path), "%s", col_str(st, 0));
    off = (uint64_t)cmn_sql_column_int64(st, 1);
    len = (uint64_t)cmn_sql_column_int64(st, 2);
    rows = cmn_sql_column_int64(st, 3);
    cols = cmn_sql_column_int64(st, 4);
    nframes = cmn_sql_column_int64(st, 5);
    bits = cmn_sql_column_int64(st, 6);
    spp = cmn_sql_column_int64(st, 7);
    snprintf(ts, sizeof(ts), "%s", col_str(st, 8));
    snprintf(sha, sizeof(sha), "%s", col_str(st, 9));
    cmn_sql_finalize(st);

    if (nframes < 1)
        nframes = 1;
    if (rows <= 0 || cols <= 0 || bits <= 0) {
        cloud_resp_error(resp, 404, "not_found", "the instance has no pixel data");
        return;
    }
    for (int i = 0; frames && i < n; i++) {
        if (list[i] > (uint64_t)nframes) {
            cloud_resp_error(resp, 404, "not_found", "frame number out of range");
            return;
        }
    }
    if (!frames && len == 0) {   /* bulk of encapsulated pixel data: every frame */
        n = nframes > MAX_FRAMES ? MAX_FRAMES : (int)nframes;
        for (int i = 0; i < n; i++)
            list[i] = (uint32_t)i + 1;
        frames = "";
    }
    /* len == 0: not stored as native little endian (encapsulated, big endian...) */
    encapsulated = len == 0;
    rep = frame_accept(req, encapsulated && !is_native(ts) &&
                                strcmp(ts, CLOUD_TS_EXPLICIT_BE) != 0 &&
                                strcmp(ts, CLOUD_TS_DEFLATED_LE) != 0,
                       frame_media_type(ts));
    if (rep == FR_NONE) {
        cloud_resp_error(resp, 406, "not_acceptable",
                         "frames are available as application/octet-stream or as stored");
        return;
    }
    cmn_sha256_init(&hc);
    cmn_sha256_update(&hc, sha, strlen(sha));
    cmn_sha256_update(&hc, rep == FR_NATIVE ? "native" : "stored", 6);
    for (int i = 0; frames && i < n; i++)
        cmn_sha256_update(&hc, &list[i], sizeof(list[i]));
    etag_final(&hc, "", etag);
    if (etag_matches(req, etag)) {
        not_modified(resp, etag, "private, max-age=3600");
        return;
    }

    frame_len = (uint64_t)(rows * cols * spp * bits / 8);
    if (!encapsulated && frames &&
        (bits % 8 != 0 || frame_len == 0 || frame_len * (uint64_t)nframes > len)) {
        cloud_resp_error(resp, 406, "unsupported", "cannot split this pixel data into frames");
        return;
    }
    if (encapsulated) {
        if (rep == FR_NATIVE && !cloud_transcode_can_decode(ts)) {
            cloud_resp_error(resp, 406, "not_acceptable",
                             "no decoder for the stored transfer syntax; ask for it as stored");
            return;
        }
        if (archive_ready(path) < 0) {
            cloud_resp_error(resp, 500, "archive", "archived file unavailable");
            return;
        }
        fr = cmn_xmalloc(sizeof(*fr) * (size_t)n);
        rc = cloud_frames_get(path, list, n, rep == FR_NATIVE, fr, NULL, err, sizeof(err));
        if (rc < 0) {
            free(fr);
            CMN_LOG_W("dicomweb", "frames sop=%s: %s", sop, err);
            if (rc == CMN_ENOTFOUND)
                cloud_resp_error(resp, 404, "not_found", "no such frame");
            else
                cloud_resp_error(resp, 500, "decode", "cannot read the frames");
            return;
        }
    } else if (!cloud_archive_is_local(path)) {
        /* Native pixel data not in the local cache (backend s3): ranged GETs
         * of just the frames asked for; the whole value (bulk) or a large
         * request downloads the file into the cache instead. */
        if (!frames || frame_len * (uint64_t)n > FRAME_RANGE_MAX) {
            if (archive_ready(path) < 0) {
                cloud_resp_error(resp, 500, "archive", "archived file unavailable");
                return;
            }
        } else {
            fr = cmn_xcalloc((size_t)n, sizeof(*fr));
            for (int i = 0; i < n; i++) {
                size_t got = 0;
                fr[i].data = cmn_xmalloc((size_t)frame_len);
                rc = cloud_archive_read_range(path, off + (uint64_t)(list[i] - 1) * frame_len,
                                              (size_t)frame_len, fr[i].data, &got);
                fr[i].len = got;
                if (rc < 0 || got != frame_len) {
                    CMN_LOG_E("dicomweb", "frame read sop=%s frame=%u: %s", sop, list[i],
                              rc < 0 ? cmn_strerror(rc) : "short read");
                    cloud_frames_free(fr, n);
                    free(fr);
                    cloud_resp_error(resp, 500, "archive", "archived file unavailable");
                    return;
                }
            }
        }
    }
    if (rep == FR_NATIVE)
        snprintf(part_type, sizeof(part_type),
                 "application/octet-stream; transfer-syntax=" CLOUD_TS_EXPLICIT_LE);
    else
        snprintf(part_type, sizeof(part_type), "%s; transfer-syntax=%s", frame_media_type(ts), ts);
    make_boundary(boundary);
    snprintf(ctype, sizeof(ctype), "multipart/related; type=\"%.*s\"; boundary=%s",
             (int)strcspn(part_type, ";"), part_type, boundary);
    cmn_http_resp_status(resp, 200);
    cmn_http_resp_header(resp, "Content-Type", ctype);
    cmn_http_resp_header(resp, "Cache-Control", "private, max-age=3600");
    cmn_http_resp_header(resp, "ETag", etag);
    for (int i = 0; i < n; i++) {
        uint64_t fo = frames ? off + (uint64_t)(list[i] - 1) * frame_len : off;
        uint64_t fl = fr ? fr[i].len : frames ? frame_len : len;
        int hn = snprintf(head, sizeof(head),
                          "--%s\r\nContent-Type: %s\r\nContent-Length: %" PRIu64 "\r\n\r\n",
                          boundary, part_type, fl);
        cmn_http_resp_body(resp, head, (size_t)hn);
        if (fr) {
            cmn_http_resp_body_take(resp, fr[i].data, fr[i].len);
            fr[i].data = NULL;
        } else if (cmn_http_resp_file(resp, path, fo, fl) < 0) {
            CMN_LOG_E("dicomweb", "frame file unavailable: %s", path);
        }
        cmn_http_resp_body(resp, "\r\n", 2);
    }
    snprintf(head, sizeof(head), "--%s--\r\n", boundary);
    cmn_http_resp_body(resp, head, strlen(head));
    if (fr) {
        cloud_frames_free(fr, n);
        free(fr);
    }
}

/* GET .../bulk/{tag}: the value of another bulk attribute. */
static void handle_bulk_tag(cmn_sql_t *db, cmn_http_resp_t *resp, const char *study,
                            const char *series, const char *sop, const char *tagstr)
{
    char path[1024], boundary[41], head[256], ctype[160], err[256], vr[3];
    uint8_t *val;
    uint32_t tag;
    size_t len;
    cmn_sql_stmt_t *st;
    int rc;

    if (strlen(tagstr) != 8 || strspn(tagstr, "0123456789abcdefABCDEF") != 8 ||
        !cloud_dict_lookup(tagstr, &tag, vr)) {
        cloud_resp_error(resp, 404, "not_found", "no such bulk data");
        return;
    }
    if (select_instances(db, "path", study, series, sop, &st) < 0) {
        cloud_resp_error(resp, 500, "internal", "query failed");
        return;
    }
    rc = cmn_sql_step(st);
    if (rc == CMN_SQL_ROW)
        snprintf(path, sizeof(path), "%s", col_str(st, 0));
    cmn_sql_finalize(st);
    if (rc != CMN_SQL_ROW) {
        cloud_resp_error(resp, 404, "not_found", "no such instance");
        return;
    }
    if (archive_ready(path) < 0) {
        cloud_resp_error(resp, 500, "archive", "archived file unavailable");
        return;
    }
    rc = cloud_element_get(path, tag, &val, &len, err, sizeof(err));
    if (rc < 0) {
        cloud_resp_error(resp, rc == CMN_ENOTFOUND ? 404 : 500, "not_found", "no such bulk data");
        return;
    }
    make_boundary(boundary);
    snprintf(ctype, sizeof(ctype),
             "multipart/related; type=\"application/octet-stream\"; boundary=%s", boundary);
    cmn_http_resp_status(resp, 200);
    cmn_http_resp_header(resp, "Content-Type", ctype);
    cmn_http_resp_header(resp, "Cache-Control", "private, max-age=3600");
    snprintf(head, sizeof(head),
             "--%s\r\nContent-Type: application/octet-stream\r\nContent-Length: %zu\r\n\r\n",
             boundary, len);
    cmn_http_resp_body(resp, head, strlen(head));
    cmn_http_resp_body_take(resp, val, len);
    snprintf(head, sizeof(head), "\r\n--%s--\r\n", boundary);
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
    cmn_sql_t *db;
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
        cmn_http_resp_header(resp, "Allow", "GET, HEAD");
        cloud_resp_error(resp, 405, "method_not_allowed",
                         "only GET here (STOW-RS: POST /dicomweb/studies)");
        goto out;
    }
    n = split_path(req->path + strlen(ROOT), buf, sizeof(buf), s, MAX_SEGS);
    if (n == 1 && strcmp(s[0], "series") == 0) {
        snprintf(action, sizeof(action), "qido-series");
        handle_qido(db, req, resp, LEVEL_SERIES, NULL, NULL);
        goto audit;
    }
    if (n == 1 && strcmp(s[0], "instances") == 0) {
        snprintf(action, sizeof(action), "qido-instances");
        handle_qido(db, req, resp, LEVEL_INSTANCE, NULL, NULL);
        goto audit;
    }
    if (n < 1 || strcmp(s[0], "studies") != 0 || !uids_valid(s, n) ||
        (n >= 3 && strcmp(s[2], "series") != 0 && strcmp(s[2], "metadata") != 0 &&
         strcmp(s[2], "instances") != 0) ||
        (n >= 4 && strcmp(s[2], "series") != 0) ||
        (n >= 5 && strcmp(s[4], "instances") != 0 && strcmp(s[4], "metadata") != 0) ||
        (n >= 6 && strcmp(s[4], "instances") != 0)) {
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
        handle_retrieve(db, req, resp, s[1], NULL, NULL);
        break;
    case 3:
        if (strcmp(s[2], "series") == 0) {
            snprintf(action, sizeof(action), "qido-series");
            handle_qido(db, req, resp, LEVEL_SERIES, s[1], NULL);
        } else if (strcmp(s[2], "instances") == 0) {
            snprintf(action, sizeof(action), "qido-instances");
            handle_qido(db, req, resp, LEVEL_INSTANCE, s[1], NULL);
        } else {
            snprintf(action, sizeof(action), "metadata-study");
            handle_metadata(db, req, resp, s[1], NULL, NULL);
        }
        break;
    case 4:
        snprintf(action, sizeof(action), "wado-series");
        handle_retrieve(db, req, resp, s[1], s[3], NULL);
        break;
    case 5:
        if (strcmp(s[4], "instances") == 0) {
            snprintf(action, sizeof(action), "qido-instances");
            handle_qido(db, req, resp, LEVEL_INSTANCE, s[1], s[3]);
        } else {
            snprintf(action, sizeof(action), "metadata-series");
            handle_metadata(db, req, resp, s[1], s[3], NULL);
        }
        break;
    case 6:
        snprintf(action, sizeof(action), "wado-instance");
        handle_retrieve(db, req, resp, s[1], s[3], s[5]);
        break;
    case 7:
        if (strcmp(s[6], "metadata") == 0) {
            snprintf(action, sizeof(action), "metadata-instance");
            handle_metadata(db, req, resp, s[1], s[3], s[5]);
        } else if (strcmp(s[6], "bulk") == 0) {
            snprintf(action, sizeof(action), "wado-bulk");
            handle_frames(db, req, resp, s[1], s[3], s[5], NULL);
        } else {
            cloud_resp_error(resp, 404, "not_found", "no such resource");
        }
        break;
    case 8:
        if (strcmp(s[6], "frames") == 0) {
            snprintf(action, sizeof(action), "wado-frames");
            handle_frames(db, req, resp, s[1], s[3], s[5], s[7]);
        } else if (strcmp(s[6], "bulk") == 0) {
            snprintf(action, sizeof(action), "wado-bulk");
            handle_bulk_tag(db, resp, s[1], s[3], s[5], s[7]);
        } else {
            cloud_resp_error(resp, 404, "not_found", "no such resource");
        }
        break;
    default:
        cloud_resp_error(resp, 404, "not_found", "no such resource");
    }
audit:
    if (action[0])
        cloud_index_audit_commit(db, user.username, action, study ? study : "", req->peer);
out:
    cloud_index_put(db);
}

void cloud_wado_uri_handle(const cmn_http_req_t *req, cmn_http_resp_t *resp)
{
    char k[64], v[128], study[128] = "", series[128] = "", sop[128] = "", rt[128] = "",
                        ctype[128] = "";
    const char *cur = req->query;
    cloud_user_t user;
    cmn_sql_stmt_t *st;
    char path[1024];
    uint64_t size;
    cmn_sql_t *db;
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
    rc = cmn_sql_step(st);
    if (rc == CMN_SQL_ROW) {
        snprintf(path, sizeof(path), "%s", col_str(st, 0));
        size = (uint64_t)cmn_sql_column_int64(st, 1);
    }
    cmn_sql_finalize(st);
    if (rc != CMN_SQL_ROW) {
        cloud_resp_error(resp, 404, "not_found", "no such instance");
        goto out;
    }
    if (archive_ready(path) < 0) {
        cloud_resp_error(resp, 500, "archive", "archived file unavailable");
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
    cloud_index_audit_commit(db, user.username, "wado-uri", study, req->peer);
out:
    cloud_index_put(db);
}
