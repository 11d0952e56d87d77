/*
 * upload.c - the upload worker (see upload.h).
 *
 * The worker claims up to upload.parallel due rows from the spool (PENDING
 * -> UPLOADING, in the threadpool) and runs one job per row. Worker state:
 *
 *     IDLE --pump: free slots--> CLAIMING --claimed--> IDLE
 *       \______________________________________________\--close--> CLOSING
 *
 * Job state (one spooled instance):
 *
 *     HASHING --file ok--> DECLARING --status--> READING <--> SENDING (each missing chunk)
 *        |                     |  committed already  |            |
 *        |                     +----------------> COMMITTING <----+
 *        |                                            |
 *        +-- file lost/corrupt --+      any error ----+---+
 *                                v                        v
 *                            RECORDING (FAILED)   RECORDING (DONE | retry with backoff)
 *                                \________________________/
 *                                            v
 *                                         FINISHED (freed)
 *
 * The spool row stays UPLOADING until RECORDING commits its new state; a
 * crash in between recovers it as PENDING at the next start, and the
 * cloud's idempotent declare/commit make the retry safe.
 *
 * Every request is signed (proto_sign) with the edge secret; network waits
 * are bounded by the HTTP client's per-request timeout (upload.timeout_ms).
 */
#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cmn/crypto.h"
#include "cmn/errors.h"
#include "cmn/http.h"
#include "cmn/log.h"
#include "proto/proto.h"

#include "internal.h"
#include "upload.h"

/* ------------------------------------------------------------ config */

const cmn_conf_opt_t edge__upload_opts[] = {
    CMN_CONF_OPT_STR(edge_conf_upload_t, cloud_url, "",
                     "cloud base URL, http(s)://host:port[/prefix]; empty disables uploading"),
    CMN_CONF_OPT_STR(edge_conf_upload_t, edge_id, "",
                     "this edge's id, as registered with yunying-cloud edge-add"),
    CMN_CONF_OPT_STR(edge_conf_upload_t, secret_file, "",
                     "file holding the edge secret (hex) printed by yunying-cloud edge-add"),
    CMN_CONF_OPT_INT(edge_conf_upload_t, parallel, 4, 1, 64, "instances uploaded at once"),
    CMN_CONF_OPT_INT(edge_conf_upload_t, chunk_size, 4 << 20, PROTO_MIN_CHUNK, PROTO_MAX_CHUNK,
                     "bytes per chunk PUT (proposed; the cloud may choose another)"),
    CMN_CONF_OPT_INT(edge_conf_upload_t, retry_min_ms, 1000, 10, 3600000,
                     "first retry delay after a failed upload"),
    CMN_CONF_OPT_INT(edge_conf_upload_t, retry_max_ms, 300000, 100, 86400000,
                     "longest retry delay (exponential backoff with jitter)"),
    CMN_CONF_OPT_INT(edge_conf_upload_t, timeout_ms, 60000, 1000, 3600000,
                     "timeout of one HTTP request"),
};
const size_t edge__upload_nopts = CMN_ARRAY_SIZE(edge__upload_opts);

int edge__upload_load_secret(const char *path, uint8_t *out, size_t outmax, size_t *len,
                             char *err, size_t errlen)
{
    char buf[1024];
    size_t n = 0, a = 0, b;
    FILE *f = fopen(path, "re");

    if (!f) {
        snprintf(err, errlen, "upload.secret_file: cannot read '%s': %s", path, strerror(errno));
        return CMN_ECONFIG;
    }
    n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    while (a < n && isspace((unsigned char)buf[a]))
        a++;
    b = n;
    while (b > a && isspace((unsigned char)buf[b - 1]))
        b--;
    buf[b] = '\0';
    size_t hexlen = b - a;
    if (hexlen < 32 || hexlen > 256 || hexlen % 2 != 0 || hexlen / 2 > outmax ||
        cmn_unhex(buf + a, out, hexlen / 2) != 0) {
        memset(buf, 0, sizeof(buf));
        snprintf(err, errlen, "upload.secret_file: '%s' must hold 32 to 256 hex digits", path);
        return CMN_ECONFIG;
    }
    memset(buf, 0, sizeof(buf));
    *len = hexlen / 2;
    return 0;
}

int edge__upload_conf_check(const edge_conf_upload_t *c, char *err, size_t errlen)
{
    uint8_t secret[128];
    size_t slen;

    if (c->retry_min_ms > c->retry_max_ms) {
        snprintf(err, errlen, "upload.retry_min_ms: %lld is above upload.retry_max_ms %lld",
                 c->retry_min_ms, c->retry_max_ms);
        return CMN_ECONFIG;
    }
    if (!c->cloud_url || !c->cloud_url[0])
        return 0;   /* uploading disabled: the rest is not used */
    if (strncmp(c->cloud_url, "http://", 7) != 0 && strncmp(c->cloud_url, "https://", 8) != 0) {
        snprintf(err, errlen, "upload.cloud_url: must start with http:// or https://");
        return CMN_ECONFIG;
    }
    if (strlen(c->cloud_url) > 1024) {
        snprintf(err, errlen, "upload.cloud_url: too long");
        return CMN_ECONFIG;
    }
    size_t n = c->edge_id ? strlen(c->edge_id) : 0;
    if (n == 0 || n > PROTO_EDGE_ID_MAX) {
        snprintf(err, errlen, "upload.edge_id: must be 1 to %d characters when cloud_url is set",
                 PROTO_EDGE_ID_MAX);
        return CMN_ECONFIG;
    }
    for (size_t i = 0; i < n; i++) {
        char ch = c->edge_id[i];
        if (!isalnum((unsigned char)ch) && ch != '-' && ch != '_' && ch != '.') {
            snprintf(err, errlen, "upload.edge_id: only letters, digits, '-', '_' and '.'");
            return CMN_ECONFIG;
        }
    }
    if (!c->secret_file || !c->secret_file[0]) {
        snprintf(err, errlen, "upload.secret_file: required when cloud_url is set");
        return CMN_ECONFIG;
    }
    int rc = edge__upload_load_secret(c->secret_file, secret, sizeof(secret), &slen, err, errlen);
    memset(secret, 0, sizeof(secret));
    return rc;
}

/* ------------------------------------------------------------ types */

typedef enum {
    EDGE_UPLOAD_IDLE,
    EDGE_UPLOAD_CLAIMING,
    EDGE_UPLOAD_CLOSING,
} edge_upload_state_t;

typedef enum {
    EDGE_JOB_HASHING,
    EDGE_JOB_DECLARING,
    EDGE_JOB_READING,
    EDGE_JOB_SENDING,
    EDGE_JOB_COMMITTING,
    EDGE_JOB_RECORDING,
    EDGE_JOB_FINISHED,
} edge_job_state_t;

typedef enum {
    JOB_OUT_DONE,
    JOB_OUT_RETRY,
    JOB_OUT_FAILED,
} job_outcome_t;

typedef struct edge_job edge_job_t;

struct edge_job {
    edge_upload_t *up;
    edge_job_state_t state;
    edge_spool_item_t item;          /* the claimed row */
    uv_work_t work;                  /* threadpool step in flight (HASHING/READING/RECORDING) */
    int work_rc;
    bool busy;                       /* a work item or HTTP request is in flight */
    /* cloud's view of the object */
    char object_id[PROTO_HEX256 + 1];
    uint32_t chunk_size;
    uint32_t nchunks;
    uint8_t *have;                   /* nchunks bytes; owned (proto_object_status_t.have) */
    uint32_t next_chunk;             /* next index to consider sending */
    /* request body held until the HTTP callback */
    uint8_t *chunk;                  /* from cmn_try_malloc; chunk_len bytes */
    uint32_t chunk_len;
    char chunk_sha[PROTO_HEX256 + 1];
    char *json;                      /* malloc'd JSON body */
    /* outcome, for RECORDING */
    job_outcome_t outcome;
    char errmsg[200];
    int64_t next_at_ms;
    edge_job_t *next;                /* in up->jobs */
};

struct edge_upload {
    uv_loop_t *loop;
    const edge_conf_upload_t *conf;
    edge_spool_t *spool;
    edge_upload_state_t state;
    cmn_http_client_t *http;         /* owned */
    uint8_t secret[128];
    size_t secret_len;
    char base_url[1100];             /* cloud_url without trailing '/' */
    char path_prefix[1100];          /* path part of cloud_url ("" or "/prefix") */
    uv_async_t wake;                 /* SCP threads -> pump */
    uv_timer_t timer;                /* next retry due */
    uv_work_t claim_work;
    edge_spool_item_t *claimed;      /* claim_max items; owned */
    int claim_max, claim_n, claim_rc;
    int64_t claim_next_due;
    bool pump_again;                 /* woken while CLAIMING */
    bool claiming;                   /* claim_work in flight (also while CLOSING) */
    edge_job_t *jobs;                /* in flight */
    int njobs;
    int handles_open;                /* wake + timer, until their close callbacks */
    void (*done)(void *ud);
    void *done_ud;
};

static void pump(edge_upload_t *up);
static void job_step(edge_job_t *job);
static void job_finish(edge_job_t *job, job_outcome_t out, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void maybe_closed(edge_upload_t *up);
static void on_timer(uv_timer_t *t);

static const char *job_state_name(edge_job_state_t s)
{
    static const char *const names[] = {"HASHING", "DECLARING", "READING", "SENDING",
                                        "COMMITTING", "RECORDING", "FINISHED"};
    return (unsigned)s < CMN_ARRAY_SIZE(names) ? names[s] : "?";
}

/* Legal moves (see the diagram in the file header). */
static void job_set_state(edge_job_t *job, edge_job_state_t to)
{
    edge_job_state_t from = job->state;
    bool ok;

    switch (to) {
    case EDGE_JOB_DECLARING: ok = from == EDGE_JOB_HASHING; break;
    case EDGE_JOB_READING: ok = from == EDGE_JOB_DECLARING || from == EDGE_JOB_SENDING; break;
    case EDGE_JOB_SENDING: ok = from == EDGE_JOB_READING; break;
    case EDGE_JOB_COMMITTING:
        ok = from == EDGE_JOB_DECLARING || from == EDGE_JOB_SENDING || from == EDGE_JOB_READING;
        break;
    case EDGE_JOB_RECORDING: ok = from != EDGE_JOB_RECORDING && from != EDGE_JOB_FINISHED; break;
    case EDGE_JOB_FINISHED: ok = true; break;
    default: ok = false; break;
    }
    if (CMN_NEVER(!ok)) {
        CMN_LOG_E("upload", "illegal job move %s -> %s id=%lld", job_state_name(from),
                  job_state_name(to), (long long)job->item.id);
    }
    CMN_LOG_D("upload", "id=%lld sop=%s %s -> %s", (long long)job->item.id, job->item.sop_uid,
              job_state_name(from), job_state_name(to));
    job->state = to;
}

/* ------------------------------------------------------------ signing */

typedef void (*job_http_cb)(edge_job_t *job, const cmn_http_result_t *res);

typedef struct {
    edge_job_t *job;
    job_http_cb cb;
} http_ctx_t;

static void on_http(const cmn_http_result_t *res, void *ud)
{
    http_ctx_t *ctx = ud;
    edge_job_t *job = ctx->job;
    job_http_cb cb = ctx->cb;

    free(ctx);
    job->busy = false;
    if (job->up->state == EDGE_UPLOAD_CLOSING) {
        /* Cancelled by close: the row stays UPLOADING, recovered at start. */
        job_set_state(job, EDGE_JOB_FINISHED);
        job_step(job);
        return;
    }
    cb(job, res);
}

/* Sends a signed request for job. body_sha is the hex SHA-256 of body. */
static int send_signed(edge_job_t *job, const char *method, const char *rel_path,
                       const void *body, size_t body_len, const char *body_sha,
                       const char *content_type, const char *extra_header, job_http_cb cb)
{
    edge_upload_t *up = job->up;
    char path[1300], url[2500], nonce[PROTO_NONCE_HEX + 1], sig[PROTO_HEX256 + 1];
    char h_ver[64], h_edge[128], h_ts[64], h_nonce[96], h_body[128], h_sig[128], h_ct[96];
    uint8_t rnd[PROTO_NONCE_HEX / 2];
    const char *headers[10];
    int nh = 0, rc;

    snprintf(path, sizeof(path), "%s%s", up->path_prefix, rel_path);
    snprintf(url, sizeof(url), "%s%s", up->base_url, rel_path);
    if (cmn_random(rnd, sizeof(rnd)) < 0)
        return CMN_ECRYPTO;
    cmn_hex(rnd, sizeof(rnd), nonce);

    proto_req_t r = {
        .method = method,
        .path = path,
        .query = "",
        .edge_id = up->conf->edge_id,
        .timestamp = (int64_t)time(NULL),
        .nonce = nonce,
        .body_sha256 = body_sha,
    };
    rc = proto_sign(up->secret, up->secret_len, &r, sig);
    if (rc < 0)
        return rc;

    snprintf(h_ver, sizeof(h_ver), "%s: %d", PROTO_H_VERSION, PROTO_VERSION);
    snprintf(h_edge, sizeof(h_edge), "%s: %s", PROTO_H_EDGE, up->conf->edge_id);
    snprintf(h_ts, sizeof(h_ts), "%s: %lld", PROTO_H_TIMESTAMP, (long long)r.timestamp);
    snprintf(h_nonce, sizeof(h_nonce), "%s: %s", PROTO_H_NONCE, nonce);
    snprintf(h_body, sizeof(h_body), "%s: %s", PROTO_H_BODY_HASH, body_sha);
    snprintf(h_sig, sizeof(h_sig), "%s: %s", PROTO_H_SIGNATURE, sig);
    snprintf(h_ct, sizeof(h_ct), "Content-Type: %s", content_type);
    headers[nh++] = h_ver;
    headers[nh++] = h_edge;
    headers[nh++] = h_ts;
    headers[nh++] = h_nonce;
    headers[nh++] = h_body;
    headers[nh++] = h_sig;
    headers[nh++] = h_ct;
    headers[nh++] = "Expect:";      /* no 100-continue round trip */
    if (extra_header)
        headers[nh++] = extra_header;
    headers[nh] = NULL;

    cmn_http_client_req_t req = {
        .method = method,
        .url = url,
        .headers = headers,
        .body = body,
        .body_len = body_len,
        .timeout_ms = (long)up->conf->timeout_ms,
        .max_response = 1 << 20,
    };
    http_ctx_t *ctx = cmn_xmalloc(sizeof(*ctx));
    ctx->job = job;
    ctx->cb = cb;
    rc = cmn_http_client_send(up->http, &req, on_http, ctx);
    if (rc < 0) {
        free(ctx);
        return rc;
    }
    job->busy = true;
    return 0;
}

static int send_json(edge_job_t *job, const char *method, const char *rel_path, char *json,
                     job_http_cb cb)
{
    uint8_t d[CMN_SHA256_LEN];
    char sha[PROTO_HEX256 + 1];
    size_t n = json ? strlen(json) : 0;

    free(job->json);
    job->json = json;   /* held until the callback */
    cmn_sha256(json ? json : "", n, d);
    cmn_hex(d, sizeof(d), sha);
    return send_signed(job, method, rel_path, json ? json : "", n, sha, "application/json", NULL,
                       cb);
}

/* Describes a failed HTTP result for logs and last_error (no secrets). */
static void describe_failure(const cmn_http_result_t *res, char *buf, size_t len)
{
    proto_error_t e;

    if (res->err < 0) {
        snprintf(buf, len, "transport: %s", res->errmsg ? res->errmsg : cmn_strerror(res->err));
        return;
    }
    if (res->body.data && proto_error_decode(res->body.data, res->body.len, &e) == 0)
        snprintf(buf, len, "HTTP %ld %.31s: %.120s", res->status, e.code, e.message);
    else
        snprintf(buf, len, "HTTP %ld", res->status);
}

/* ------------------------------------------------------------ job steps */

static void job_free(edge_job_t *job)
{
    free(job->have);
    free(job->chunk);
    free(job->json);
    free(job);
}

static void job_unlink(edge_job_t *job)
{
    edge_upload_t *up = job->up;
    for (edge_job_t **pp = &up->jobs; *pp; pp = &(*pp)->next) {
        if (*pp == job) {
            *pp = job->next;
            up->njobs--;
            break;
        }
    }
}

/* HASHING: the spooled file must still be what was received. */
static void hash_work(uv_work_t *w)
{
    edge_job_t *job = container_of(w, edge_job_t, work);
    uint8_t d[CMN_SHA256_LEN];
    char hex[PROTO_HEX256 + 1];
    uint64_t size = 0;

    job->work_rc = cmn_sha256_file(job->item.path, d, &size);
    if (job->work_rc < 0)
        return;
    cmn_hex(d, sizeof(d), hex);
    if (size != job->item.size || strcmp(hex, job->item.sha256) != 0)
        job->work_rc = CMN_EHASH;
}

static void read_work(uv_work_t *w)
{
    edge_job_t *job = container_of(w, edge_job_t, work);
    uint64_t off = (uint64_t)job->next_chunk * job->chunk_size;
    uint8_t d[CMN_SHA256_LEN];
    size_t got = 0;
    int fd;

    job->work_rc = 0;
    fd = open(job->item.path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        job->work_rc = -errno;
        return;
    }
    while (got < job->chunk_len) {
        ssize_t n = pread(fd, job->chunk + got, job->chunk_len - got, (off_t)(off + got));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            job->work_rc = n < 0 ? -errno : -EIO;
            break;
        }
        got += (size_t)n;
    }
    close(fd);
    if (job->work_rc == 0) {
        cmn_sha256(job->chunk, job->chunk_len, d);
        cmn_hex(d, sizeof(d), job->chunk_sha);
    }
}

static void record_work(uv_work_t *w)
{
    edge_job_t *job = container_of(w, edge_job_t, work);
    edge_spool_t *sp = job->up->spool;

    switch (job->outcome) {
    case JOB_OUT_DONE: job->work_rc = edge_spool_mark_done(sp, job->item.id); break;
    case JOB_OUT_RETRY:
        job->work_rc = edge_spool_mark_retry(sp, job->item.id, job->next_at_ms, job->errmsg);
        break;
    case JOB_OUT_FAILED:
        job->work_rc = edge_spool_mark_failed(sp, job->item.id, job->errmsg);
        break;
    }
}

static void after_work(uv_work_t *w, int status)
{
    edge_job_t *job = container_of(w, edge_job_t, work);

    job->busy = false;
    if (status == UV_ECANCELED)
        job->work_rc = -ECANCELED;
    if (job->state == EDGE_JOB_RECORDING) {
        if (job->work_rc < 0)
            CMN_LOG_E("upload", "cannot record outcome id=%lld sop=%s: %s", (long long)job->item.id,
                      job->item.sop_uid, cmn_strerror(job->work_rc));
        job_set_state(job, EDGE_JOB_FINISHED);
        job_step(job);
        return;
    }
    if (job->up->state == EDGE_UPLOAD_CLOSING) {
        job_set_state(job, EDGE_JOB_FINISHED);
        job_step(job);
        return;
    }
    switch (job->state) {
    case EDGE_JOB_HASHING:
        if (job->work_rc < 0) {
            job_finish(job, JOB_OUT_FAILED, "spooled file unusable: %s",
                       cmn_strerror(job->work_rc));
            return;
        }
        job_set_state(job, EDGE_JOB_DECLARING);
        job_step(job);
        break;
    case EDGE_JOB_READING:
        if (job->work_rc < 0) {
            job_finish(job, JOB_OUT_RETRY, "reading chunk %u: %s", job->next_chunk,
                       cmn_strerror(job->work_rc));
            return;
        }
        job_set_state(job, EDGE_JOB_SENDING);
        job_step(job);
        break;
    default:
        (void)CMN_NEVER(1);
        break;
    }
}

static void queue(edge_job_t *job, uv_work_cb fn)
{
    int rc = uv_queue_work(job->up->loop, &job->work, fn, after_work);
    if (rc < 0) {
        /* Only fails on invalid arguments. */
        CMN_LOG_E("upload", "uv_queue_work: %s", uv_strerror(rc));
        abort();
    }
    job->busy = true;
}

static void on_declared(edge_job_t *job, const cmn_http_result_t *res)
{
    proto_object_status_t st;
    char err[200];

    if (res->err < 0 || res->status != 200) {
        describe_failure(res, err, sizeof(err));
        job_finish(job, JOB_OUT_RETRY, "declare: %s", err);
        return;
    }
    memset(&st, 0, sizeof(st));
    if (proto_object_status_decode(res->body.data ? res->body.data : "", res->body.len, &st, err,
                                   sizeof(err)) < 0) {
        job_finish(job, JOB_OUT_RETRY, "declare: bad status from cloud: %s", err);
        return;
    }
    if (st.nchunks != proto_chunk_count(job->item.size, st.chunk_size)) {
        proto_object_status_free(&st);
        job_finish(job, JOB_OUT_RETRY, "declare: cloud chunk layout does not match the object");
        return;
    }
    snprintf(job->object_id, sizeof(job->object_id), "%s", st.object_id);
    job->chunk_size = st.chunk_size;
    job->nchunks = st.nchunks;
    free(job->have);
    job->have = st.have;
    st.have = NULL;
    job->next_chunk = 0;
    bool committed = st.state == PROTO_OBJ_COMMITTED;
    proto_object_status_free(&st);

    if (committed) {
        job_set_state(job, EDGE_JOB_COMMITTING);
    } else {
        job_set_state(job, EDGE_JOB_READING);
    }
    job_step(job);
}

static void on_chunk(edge_job_t *job, const cmn_http_result_t *res)
{
    char err[200];

    if (res->err < 0 || (res->status != 204 && res->status != 200)) {
        describe_failure(res, err, sizeof(err));
        job_finish(job, JOB_OUT_RETRY, "chunk %u: %s", job->next_chunk, err);
        return;
    }
    job->have[job->next_chunk] = 1;
    job->next_chunk++;
    job_set_state(job, EDGE_JOB_READING);
    job_step(job);
}

static void on_committed(edge_job_t *job, const cmn_http_result_t *res)
{
    proto_commit_t c;
    char err[200];

    if (res->err < 0 || res->status != 200) {
        describe_failure(res, err, sizeof(err));
        job_finish(job, JOB_OUT_RETRY, "commit: %s", err);
        return;
    }
    if (proto_commit_decode(res->body.data ? res->body.data : "", res->body.len, &c, err,
                            sizeof(err)) < 0) {
        job_finish(job, JOB_OUT_RETRY, "commit: bad answer from cloud: %s", err);
        return;
    }
    switch (c.result) {
    case PROTO_COMMIT_STORED:
        CMN_LOG_I("upload", "stored sop=%s sha256=%s size=%llu id=%lld", job->item.sop_uid,
                  job->item.sha256, (unsigned long long)job->item.size, (long long)job->item.id);
        break;
    case PROTO_COMMIT_DUPLICATE:
        CMN_LOG_I("upload", "duplicate sop=%s sha256=%s (already archived) id=%lld",
                  job->item.sop_uid, job->item.sha256, (long long)job->item.id);
        break;
    case PROTO_COMMIT_CONFLICT:
        CMN_LOG_W("upload", "conflict sop=%s sha256=%s: the cloud holds different bytes for this "
                  "SOP Instance UID; kept aside there id=%lld", job->item.sop_uid,
                  job->item.sha256, (long long)job->item.id);
        break;
    }
    job_finish(job, JOB_OUT_DONE, NULL);
}

/* Runs the current state's action. */
static void job_step(edge_job_t *job)
{
    edge_upload_t *up = job->up;
    char rel[300], extra[128];
    int rc = 0;

    switch (job->state) {
    case EDGE_JOB_HASHING:
        queue(job, hash_work);
        return;

    case EDGE_JOB_DECLARING: {
        proto_object_decl_t d;
        memset(&d, 0, sizeof(d));
        d.kind = PROTO_KIND_INSTANCE;
        snprintf(d.sha256, sizeof(d.sha256), "%s", job->item.sha256);
        d.size = job->item.size;
        d.chunk_size = (uint32_t)up->conf->chunk_size;
        snprintf(d.study_uid, sizeof(d.study_uid), "%s", job->item.study_uid);
        snprintf(d.series_uid, sizeof(d.series_uid), "%s", job->item.series_uid);
        snprintf(d.sop_uid, sizeof(d.sop_uid), "%s", job->item.sop_uid);
        char *json = proto_object_decl_encode(&d);
        if (!json) {
            job_finish(job, JOB_OUT_RETRY, "declare: out of memory");
            return;
        }
        rc = send_json(job, "POST", "/api/v1/objects", json, on_declared);
        break;
    }

    case EDGE_JOB_READING:
        while (job->next_chunk < job->nchunks && job->have[job->next_chunk])
            job->next_chunk++;
        if (job->next_chunk >= job->nchunks) {
            free(job->chunk);
            job->chunk = NULL;
            job_set_state(job, EDGE_JOB_COMMITTING);
            job_step(job);
            return;
        }
        job->chunk_len = proto_chunk_len(job->item.size, job->chunk_size, job->next_chunk);
        if (!job->chunk) {
            job->chunk = cmn_try_malloc(job->chunk_size);
            if (!job->chunk) {
                job_finish(job, JOB_OUT_RETRY, "out of memory for a %u-byte chunk",
                           job->chunk_size);
                return;
            }
        }
        queue(job, read_work);
        return;

    case EDGE_JOB_SENDING:
        snprintf(rel, sizeof(rel), "/api/v1/objects/%s/chunks/%u", job->object_id,
                 job->next_chunk);
        snprintf(extra, sizeof(extra), "%s: %s", PROTO_H_CHUNK_HASH, job->chunk_sha);
        rc = send_signed(job, "PUT", rel, job->chunk, job->chunk_len, job->chunk_sha,
                         "application/octet-stream", extra, on_chunk);
        break;

    case EDGE_JOB_COMMITTING:
        snprintf(rel, sizeof(rel), "/api/v1/objects/%s/commit", job->object_id);
        rc = send_json(job, "POST", rel, NULL, on_committed);
        break;

    case EDGE_JOB_RECORDING:
        queue(job, record_work);
        return;

    case EDGE_JOB_FINISHED:
        job_unlink(job);
        job_free(job);
        if (up->state == EDGE_UPLOAD_CLOSING)
            maybe_closed(up);
        else
            pump(up);
        return;
    }
    if (rc < 0)
        job_finish(job, JOB_OUT_RETRY, "cannot send request: %s", cmn_strerror(rc));
}

static int64_t backoff_ms(const edge_conf_upload_t *c, int attempts)
{
    int64_t d = c->retry_min_ms;
    for (int i = 1; i < attempts && d < c->retry_max_ms; i++)
        d *= 2;
    if (d > c->retry_max_ms)
        d = c->retry_max_ms;
    uint32_t r = 0;
    cmn_random(&r, sizeof(r));
    /* "Equal jitter": half fixed, half random, so retries spread out. */
    return d / 2 + (int64_t)(r % (uint64_t)(d / 2 + 1));
}

static void job_finish(edge_job_t *job, job_outcome_t out, const char *fmt, ...)
{
    job->outcome = out;
    job->errmsg[0] = '\0';
    if (fmt) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(job->errmsg, sizeof(job->errmsg), fmt, ap);
        va_end(ap);
    }
    if (out == JOB_OUT_RETRY) {
        int64_t d = backoff_ms(job->up->conf, job->item.attempts + 1);
        job->next_at_ms = edge__wall_ms() + d;
        CMN_LOG_W("upload", "retry in %lld ms sop=%s id=%lld attempt=%d: %s", (long long)d,
                  job->item.sop_uid, (long long)job->item.id, job->item.attempts + 1,
                  job->errmsg);
    } else if (out == JOB_OUT_FAILED) {
        CMN_LOG_E("upload", "giving up sop=%s id=%lld: %s", job->item.sop_uid,
                  (long long)job->item.id, job->errmsg);
    }
    job_set_state(job, EDGE_JOB_RECORDING);
    job_step(job);
}

/* ------------------------------------------------------------ worker */

static void claim_work(uv_work_t *w)
{
    edge_upload_t *up = container_of(w, edge_upload_t, claim_work);
    up->claim_rc = edge_spool_claim(up->spool, edge__wall_ms(), up->claimed, up->claim_max,
                                    &up->claim_n, &up->claim_next_due);
}

static void claim_done(uv_work_t *w, int status)
{
    edge_upload_t *up = container_of(w, edge_upload_t, claim_work);

    up->claiming = false;
    if (up->state == EDGE_UPLOAD_CLOSING) {
        /* Claimed rows stay UPLOADING; the next start recovers them. */
        maybe_closed(up);
        return;
    }
    up->state = EDGE_UPLOAD_IDLE;
    if (status < 0 || up->claim_rc < 0)
        CMN_LOG_E("upload", "claiming from the spool failed; retrying in 1 s");
    for (int i = 0; i < up->claim_n; i++) {
        edge_job_t *job = cmn_xcalloc(1, sizeof(*job));
        job->up = up;
        job->state = EDGE_JOB_HASHING;
        job->item = up->claimed[i];
        job->next = up->jobs;
        up->jobs = job;
        up->njobs++;
        CMN_LOG_D("upload", "claimed id=%lld sop=%s attempts=%d", (long long)job->item.id,
                  job->item.sop_uid, job->item.attempts);
        job_step(job);
    }
    int free_slots = (int)up->conf->parallel - up->njobs;
    if (up->pump_again && free_slots > 0) {
        up->pump_again = false;
        pump(up);
        return;
    }
    up->pump_again = false;
    if (status < 0 || up->claim_rc < 0) {
        uv_timer_start(&up->timer, on_timer, 1000, 0);
    } else if (up->claim_next_due >= 0 && free_slots > 0) {
        int64_t d = up->claim_next_due - edge__wall_ms();
        uv_timer_start(&up->timer, on_timer, d > 0 ? (uint64_t)d : 0, 0);
    }
}

static void pump(edge_upload_t *up)
{
    switch (up->state) {
    case EDGE_UPLOAD_CLOSING:
        return;
    case EDGE_UPLOAD_CLAIMING:
        up->pump_again = true;
        return;
    case EDGE_UPLOAD_IDLE:
        break;
    }
    int free_slots = (int)up->conf->parallel - up->njobs;
    if (free_slots <= 0)
        return;
    up->state = EDGE_UPLOAD_CLAIMING;
    up->claim_max = free_slots;
    up->claim_n = 0;
    up->claiming = true;
    if (uv_queue_work(up->loop, &up->claim_work, claim_work, claim_done) < 0) {
        up->claiming = false;
        up->state = EDGE_UPLOAD_IDLE;
    }
}

static void on_wake(uv_async_t *a)
{
    edge_upload_t *up = container_of(a, edge_upload_t, wake);
    pump(up);
}

static void on_timer(uv_timer_t *t)
{
    edge_upload_t *up = container_of(t, edge_upload_t, timer);
    pump(up);
}

void edge_upload_wake(void *ud)
{
    edge_upload_t *up = ud;
    uv_async_send(&up->wake);
}

static int split_url(edge_upload_t *up, const char *url)
{
    size_t n = strlen(url);
    while (n > 0 && url[n - 1] == '/')
        n--;
    if (n >= sizeof(up->base_url))
        return CMN_ECONFIG;
    memcpy(up->base_url, url, n);
    up->base_url[n] = '\0';
    const char *host = strstr(up->base_url, "://");
    const char *slash = host ? strchr(host + 3, '/') : NULL;
    snprintf(up->path_prefix, sizeof(up->path_prefix), "%s", slash ? slash : "");
    return 0;
}

int edge_upload_create(uv_loop_t *loop, const edge_conf_upload_t *conf, edge_spool_t *spool,
                       edge_upload_t **out, char *err, size_t errlen)
{
    edge_upload_t *up = cmn_xcalloc(1, sizeof(*up));
    int rc;

    *out = NULL;
    up->loop = loop;
    up->conf = conf;
    up->spool = spool;
    up->state = EDGE_UPLOAD_IDLE;
    rc = edge__upload_load_secret(conf->secret_file, up->secret, sizeof(up->secret),
                                  &up->secret_len, err, errlen);
    if (rc < 0)
        goto out_free;
    rc = split_url(up, conf->cloud_url);
    if (rc < 0) {
        snprintf(err, errlen, "upload.cloud_url: too long");
        goto out_free;
    }
    up->claimed = cmn_xcalloc((size_t)conf->parallel, sizeof(*up->claimed));
    rc = cmn_http_client_create(loop, (int)conf->parallel, &up->http);
    if (rc < 0) {
        snprintf(err, errlen, "HTTP client: %s", cmn_strerror(rc));
        goto out_free_claimed;
    }
    uv_async_init(loop, &up->wake, on_wake);
    uv_timer_init(loop, &up->timer);
    up->handles_open = 2;
    *out = up;
    pump(up);
    return 0;

out_free_claimed:
    free(up->claimed);
out_free:
    memset(up->secret, 0, sizeof(up->secret));
    free(up);
    return rc;
}

static void on_handle_closed(uv_handle_t *h)
{
    edge_upload_t *up = h->data;
    up->handles_open--;
    maybe_closed(up);
}

/* Frees the worker once nothing refers to it any more. */
static void maybe_closed(edge_upload_t *up)
{
    if (up->handles_open > 0 || up->claiming || up->njobs > 0)
        return;
    /* Jobs can only be waiting on the threadpool now; none are left. */
    void (*done)(void *) = up->done;
    void *ud = up->done_ud;
    free(up->claimed);
    memset(up->secret, 0, sizeof(up->secret));
    free(up);
    if (done)
        done(ud);
}

void edge_upload_close(edge_upload_t *up, void (*done)(void *ud), void *ud)
{
    if (!up || up->state == EDGE_UPLOAD_CLOSING)
        return;
    up->state = EDGE_UPLOAD_CLOSING;
    up->done = done;
    up->done_ud = ud;
    uv_timer_stop(&up->timer);
    up->wake.data = up;
    up->timer.data = up;
    uv_close((uv_handle_t *)&up->wake, on_handle_closed);
    uv_close((uv_handle_t *)&up->timer, on_handle_closed);
    /* Cancels HTTP requests: their callbacks finish the jobs (rows stay
     * UPLOADING). Jobs in the threadpool finish in after_work. */
    cmn_http_client_destroy(up->http);
    up->http = NULL;
}
