/*
 * upload.c - the upload worker (see upload.h).
 *
 * Two pipelines share the worker:
 *
 * PREPARE (always, whatever the schedule): rows not prepared yet are
 * transcoded to JPEG-LS lossless in the threadpool (upload.compress), the
 * result made durable next to the original, and the row records which file
 * (and hash) is uploaded; with compression off, or when the codec skips the
 * instance, the original itself is recorded. upload.compress_parallel rows
 * per batch; a batch is listed, run, and the next listed when it is done.
 *
 * UPLOAD: the worker claims upload groups from the spool (PENDING ->
 * UPLOADING, urgent first, in the threadpool) and runs one job per group -
 * only while the schedule (schedule.h) has a window open. upload.parallel
 * jobs send at once (sending slots); UPLOAD_AHEAD more are hashed, declared
 * and have their first chunk read meanwhile, so a freed slot is used at
 * once; a job whose last chunk is sent gives its slot back and waits for
 * the cloud's commit outside the count (free_slots). Jobs hash in claim
 * order, as many at once as there are CPUs.
 * A group is one instance, or a bundle: small instances of one study
 * (edge_spool_claim_group; upload.bundle_max_bytes/_count) sent as one
 * object of kind "bundle" (PROTOCOL.md "Bundles"). A bundle's bytes are
 * never written out: HASHING builds its header from the spool rows and
 * hashes header + member files in one pass; READING maps a chunk onto the
 * header and the member files. The group is persisted, so a retried or
 * restarted bundle has the same bytes and resumes from the cloud's "have".
 * The commit answer settles each member's row (DONE, or FAILED when the
 * cloud rejected it).
 *
 * MANIFESTS: after rows become DONE the worker looks, every quarter of
 * upload.manifest_quiet_ms for a while, for studies with nothing left to
 * upload and nothing new for manifest_quiet_ms, and POSTs their manifest
 * (one manifest job at a time, outside upload.parallel; it reuses the job
 * states HASHING = list, COMMITTING = POST, RECORDING = remember it).
 * Worker state:
 *
 *     IDLE --pump: window open, free slots--> CLAIMING --claimed--> IDLE
 *       \______________________________________________\--close--> CLOSING
 *
 * Job state (one spooled instance):
 *
 *     HASHING --file ok--> DECLARING --status--> READING --> PACING --> SENDING (each missing chunk)
 *        |                     |  committed already  ^                      |
 *        |                     +----------------> COMMITTING <--------------+
 *        |                                            |
 *        +-- file lost/corrupt --+      any error ----+---+   window closed (PACING)
 *                                v                        v                 v
 *                            RECORDING (FAILED)   RECORDING (DONE | retry)  RECORDING (release)
 *                                \________________________/_________________/
 *                                            v
 *                                         FINISHED (freed)
 *
 * PACING: a job without a sending slot waits until one is free - urgent
 * jobs first, and a free slot is kept for an urgent job still hashing,
 * declaring or reading rather than given to a normal one (so work-ahead
 * never lets a normal instance overtake an urgent one); FIFO otherwise. Then
 * the bandwidth cap: one token bucket (bytes/s of the open window, burst
 * one second) shared by all jobs; a job takes its chunk's bytes when the
 * bucket is not in debt, else it queues (FIFO) until the refill pays the
 * debt. The chunk size proposed to the cloud shrinks to about one second
 * of the cap, so pacing stays smooth on slow links.
 *
 * Failures are never final for network reasons: every transport or HTTP
 * error is a retry with capped exponential backoff and jitter (attempts
 * grow, the delay stops at upload.retry_max_ms), counted by kind for the
 * status page. Only a spooled file that no longer matches its hash is FAILED.
 *
 * The spool row stays UPLOADING until RECORDING commits its new state; a
 * crash in between recovers it as PENDING at the next start, and the
 * cloud's idempotent declare/commit make the retry safe.
 *
 * Every request is signed (proto_sign) with the key of a short-lived token
 * (token.h; the edge secret signs only the token request); a request the
 * cloud refuses for its token is re-sent once with a new token. A token is
 * asked for as soon as jobs are claimed, so the fetch overlaps their
 * hashing. Network waits are bounded by the HTTP client's per-request
 * timeout (upload.timeout_ms).
 */
#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cmn/crypto.h"
#include "cmn/errors.h"
#include "cmn/fs.h"
#include "cmn/http.h"
#include "cmn/log.h"
#include "proto/proto.h"

#include "cmn/dicom_codec.h"

#include "internal.h"
#include "schedule.h"
#include "token.h"
#include "upload.h"

/* ------------------------------------------------------------ config */

const cmn_conf_opt_t edge__upload_opts[] = {
    CMN_CONF_OPT_STR(edge_conf_upload_t, cloud_url, "",
                     "cloud base URL, http(s)://host:port[/prefix]; empty disables uploading"),
    CMN_CONF_OPT_STR(edge_conf_upload_t, edge_id, "",
                     "this edge's id, as registered with yunying-cloud edge-add"),
    CMN_CONF_OPT_STR(edge_conf_upload_t, secret_file, "",
                     "file holding the edge secret (hex) printed by yunying-cloud edge-add"),
    CMN_CONF_OPT_STR(edge_conf_upload_t, ca_file, "",
                     "CA bundle (PEM) that verifies the cloud's certificate; empty = system store"),
    CMN_CONF_OPT_STR(edge_conf_upload_t, pinned_pubkey, "",
                     "optional pin of the cloud's public key: sha256//<base64>[;sha256//...]"),
    CMN_CONF_OPT_STR(edge_conf_upload_t, proxy, "",
                     "the hospital's outbound proxy, http://host:port (https://, socks5h:// too);"
                     " HTTPS to the cloud goes through it in a CONNECT tunnel, verified end to end;"
                     " empty = direct (or the https_proxy environment variable)"),
    CMN_CONF_OPT_STR(edge_conf_upload_t, client_cert_file, "",
                     "client certificate (PEM) for mutual TLS; its CN must be edge_id"),
    CMN_CONF_OPT_STR(edge_conf_upload_t, client_key_file, "",
                     "private key of client_cert_file (PEM); empty = inside client_cert_file"),
    CMN_CONF_OPT_INT(edge_conf_upload_t, parallel, 4, 1, 64,
                     "objects sent at once (one waiting for the cloud's commit does not hold a slot)"),
    CMN_CONF_OPT_INT(edge_conf_upload_t, chunk_size, 2 << 20, PROTO_MIN_CHUNK, PROTO_MAX_CHUNK,
                     "bytes per chunk PUT (proposed; the cloud may choose another)"),
    CMN_CONF_OPT_INT(edge_conf_upload_t, retry_min_ms, 1000, 10, 3600000,
                     "first retry delay after a failed upload"),
    CMN_CONF_OPT_INT(edge_conf_upload_t, retry_max_ms, 300000, 100, 86400000,
                     "longest retry delay (exponential backoff with jitter)"),
    CMN_CONF_OPT_INT(edge_conf_upload_t, timeout_ms, 60000, 1000, 3600000,
                     "timeout of one HTTP request"),
    CMN_CONF_OPT_BOOL(edge_conf_upload_t, compress, true,
                      "transcode to JPEG-LS lossless before upload (pixel-exact; skipped when "
                      "not possible, then the original is sent)"),
    CMN_CONF_OPT_INT(edge_conf_upload_t, compress_parallel, 2, 1, 32,
                     "instances transcoded at once"),
    CMN_CONF_OPT_STR(edge_conf_upload_t, urgent_calling_aes, "",
                     "comma-separated calling AE titles (e.g. the ER's CT) uploaded first"),
    CMN_CONF_OPT_INT(edge_conf_upload_t, bundle_max_bytes, 2 << 20, 0, 256 << 20,
                     "bundle instances of one study (each at most a quarter of this) into one "
                     "upload object of up to this many bytes; 0 = one object per instance"),
    CMN_CONF_OPT_INT(edge_conf_upload_t, bundle_max_count, 100, 2, PROTO_BUNDLE_MAX_MEMBERS,
                     "instances per bundle"),
    CMN_CONF_OPT_INT(edge_conf_upload_t, manifest_quiet_ms, 5000, -1, 86400000,
                     "send a study's manifest once all of it is uploaded and nothing new came "
                     "for this long; -1 = no manifests"),
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

/* Host part of an http(s) URL: "h", "[v6]" without brackets. 0 or -1. */
static int url_host(const char *url, char *out, size_t outlen)
{
    const char *h = strstr(url, "://"), *e;

    if (!h)
        return -1;
    h += 3;
    if (*h == '[') {
        e = strchr(++h, ']');
    } else {
        e = h + strcspn(h, ":/?#");
        if (memchr(h, '@', (size_t)(e - h)))
            return -1;   /* user info: not for us */
    }
    if (!e || e == h || (size_t)(e - h) >= outlen)
        return -1;
    memcpy(out, h, (size_t)(e - h));
    out[e - h] = '\0';
    return 0;
}

static int readable(const char *key, const char *path, char *err, size_t errlen)
{
    if (path && *path && access(path, R_OK) != 0) {
        snprintf(err, errlen, "upload.%s: cannot read '%s': %s", key, path, strerror(errno));
        return CMN_ECONFIG;
    }
    return 0;
}

/* TLS keys, and the rule that plain http:// may only reach this machine
 * (the token key travels in the token answer: only TLS protects it). */
static int upload_tls_check(const edge_conf_upload_t *c, char *err, size_t errlen)
{
    char host[256];
    int rc;

    if ((rc = readable("ca_file", c->ca_file, err, errlen)) < 0 ||
        (rc = readable("client_cert_file", c->client_cert_file, err, errlen)) < 0 ||
        (rc = readable("client_key_file", c->client_key_file, err, errlen)) < 0)
        return rc;
    if (c->client_key_file && *c->client_key_file &&
        !(c->client_cert_file && *c->client_cert_file)) {
        snprintf(err, errlen, "upload.client_key_file: set only with upload.client_cert_file");
        return CMN_ECONFIG;
    }
    if (c->proxy && *c->proxy && strncmp(c->proxy, "http://", 7) != 0 &&
        strncmp(c->proxy, "https://", 8) != 0 && strncmp(c->proxy, "socks5h://", 10) != 0) {
        snprintf(err, errlen, "upload.proxy: must start with http://, https:// or socks5h://");
        return CMN_ECONFIG;
    }
    if (c->pinned_pubkey && *c->pinned_pubkey && strncmp(c->pinned_pubkey, "sha256//", 8) != 0) {
        snprintf(err, errlen, "upload.pinned_pubkey: must be sha256//<base64>[;sha256//...]");
        return CMN_ECONFIG;
    }
    if (url_host(c->cloud_url, host, sizeof(host)) < 0) {
        snprintf(err, errlen, "upload.cloud_url: no host name");
        return CMN_ECONFIG;
    }
    if (strncmp(c->cloud_url, "http://", 7) == 0 && !proto_addr_is_loopback(host)) {
        snprintf(err, errlen, "upload.cloud_url: plain http:// is only allowed to a loopback"
                              " address (127.0.0.0/8, ::1); use https://");
        return CMN_ECONFIG;
    }
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
    if (rc < 0)
        return rc;
    return upload_tls_check(c, err, errlen);
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
    EDGE_JOB_PACING,
    EDGE_JOB_SENDING,
    EDGE_JOB_COMMITTING,
    EDGE_JOB_RECORDING,
    EDGE_JOB_FINISHED,
} edge_job_state_t;

typedef enum {
    JOB_OUT_DONE,
    JOB_OUT_RETRY,
    JOB_OUT_FAILED,
    JOB_OUT_RELEASE,                 /* window closed: back to PENDING, no attempt counted */
    JOB_OUT_REPREPARE,               /* the prepared file is bad: prepare again */
    JOB_OUT_SPLIT,                   /* bundle with a bad member: members settled one by one */
} job_outcome_t;

/* Objects made ready to send (hashed, declared, first chunk read) beyond
 * upload.parallel, so a sending slot never waits for a declare (free_slots). */
#define UPLOAD_AHEAD 2

/* Local hash check result: the original is fine, the prepared file is not. */
#define JOB_E_REPREPARE 1
/* A bundle member's file is unusable: the bundle is dissolved (mstat says who). */
#define JOB_E_SPLIT 2

typedef struct edge_job edge_job_t;

struct edge_job {
    edge_upload_t *up;
    edge_job_state_t state;
    edge_spool_item_t item;          /* the claimed row (a bundle's first member) */
    edge_spool_item_t *members;      /* nmembers claimed rows, members[0] == item; owned */
    int nmembers;
    bool bundle;                     /* nmembers > 1: one object of kind "bundle" */
    uint8_t *bhdr;                   /* bundle header bytes (blayout.header_len); owned */
    proto_bundle_t blayout;          /* member offsets in the bundle; blayout.m owned */
    char obj_sha[PROTO_HEX256 + 1];  /* the uploaded object (instance file or bundle) */
    uint64_t obj_size;
    int *mstat;                      /* HASHING: per member 0, JOB_E_REPREPARE or -errno; owned */
    proto_commit_result_t *mres;     /* commit result per member; owned */
    long next_timeout_ms;            /* > 0: timeout of the next request only */
    bool manifest;                   /* a study-manifest job (not an upload) */
    edge_spool_manifest_t mf;        /* its manifest (owned) */
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
    char errkind[32];                /* error class for the counters ("timeout", ...) */
    int64_t next_at_ms;
    uint64_t bytes_sent;             /* chunk payload sent in this attempt */
    bool sent_all;                   /* reached COMMITTING: counted in up->ncommitting */
    bool has_slot;                   /* holds a sending slot: counted in up->nsending */
    edge_job_t *next;                /* in up->jobs */
    edge_job_t *pace_next;           /* in up->pace_head or up->slot_head while PACING */
    edge_job_t *hash_next;           /* in up->hash_head while waiting to hash */
};

/* One row being prepared (transcoded or not) in the threadpool. */
typedef struct {
    edge_upload_t *up;
    edge_spool_item_t item;
    uv_work_t work;
    int rc;
    bool compressed;                 /* a JPEG-LS file was written and recorded */
    bool unwritten;                  /* its object file is not written yet (rc < 0) */
    char err[160];
    cmn_jpegls_stats_t stats;
} prep_t;

struct edge_upload {
    uv_loop_t *loop;
    const edge_conf_upload_t *conf;
    edge_spool_t *spool;
    edge_upload_state_t state;
    cmn_http_client_t *http;         /* owned */
    edge_token_t *token;             /* owned: holds the secret and the current token */
    char base_url[1100];             /* cloud_url without trailing '/' */
    char path_prefix[1100];          /* path part of cloud_url ("" or "/prefix") */
    uv_async_t wake;                 /* SCP threads -> pump */
    uv_timer_t timer;                /* next retry due */
    uv_work_t claim_work;
    edge_spool_item_t **claimed;     /* claim_max groups (each owned until a job takes it) */
    int *claimed_n;                  /* rows per group */
    int claim_max, claim_n, claim_rc;
    int64_t claim_next_due;
    bool pump_again;                 /* woken while CLAIMING */
    bool claiming;                   /* claim_work in flight (also while CLOSING) */
    edge_job_t *jobs;                /* in flight */
    int njobs;
    int ncommitting;                 /* of which past their last chunk (sent_all) */
    edge_job_t *hash_head, *hash_tail;   /* jobs waiting for a hashing slot, FIFO */
    int nhashing, hash_max;          /* hash_work in flight, at most hash_max */
    bool token_prefetch;             /* a token wait of our own is pending */
    int handles_open;                /* wake + timer + pace_timer + manifest_timer + cache_timer */
    /* the hot cache: uploaded files leave the spool (edge_spool_evict) */
    uv_timer_t cache_timer;
    uv_work_t cache_work;
    bool caching;                    /* cache_work in flight (also while CLOSING) */
    bool cache_again;                /* kicked meanwhile: another pass when it ends */
    int cache_rc;
    int64_t cache_now;               /* the pass's time (edge clock, unix ms) */
    edge_spool_evicted_t cache_res;
    uint64_t cache_short_log_ms;     /* edge__now_ms() of the last "still short" warning */
    uint64_t unwritten_log_ms;       /* edge__now_ms() of the last "waits for its object file" */
    int unwritten_quiet;             /* such waits not logged since */
    /* study manifests */
    uv_timer_t manifest_timer;
    edge_job_t *manifest_job;        /* the one manifest job in flight, not in jobs */
    uint64_t manifest_next_ms;       /* edge__now_ms() of the next check */
    uint64_t manifest_until_ms;      /* keep checking until then (set when rows get DONE) */
    void (*done)(void *ud);
    void *done_ud;
    /* schedule and bandwidth */
    edge_schedule_t sched;
    edge_sched_state_t sched_now;    /* as of the last evaluation */
    double tokens;                   /* bytes; negative = debt */
    uint64_t bucket_ms;              /* edge__now_ms() of the last refill */
    int64_t bucket_rate;             /* byte/s the bucket was last filled at; 0 = unlimited */
    uv_timer_t pace_timer;
    edge_job_t *pace_head, *pace_tail;   /* jobs waiting for tokens, FIFO */
    int npacing;
    edge_job_t *slot_head, *slot_tail;   /* jobs ready to send, waiting for a slot, FIFO */
    int nsending;                    /* jobs holding a sending slot (<= upload.parallel) */
    /* prepare pipeline */
    prep_t *preps;                   /* compress_parallel slots; owned */
    int prep_n, prep_inflight;
    bool prep_listing;               /* list work in flight */
    bool prep_again;                 /* woken during a batch */
    uv_work_t prep_list_work;
    int prep_list_rc;
    /* live figures for the status page (guarded by live_mu) */
    pthread_mutex_t live_mu;
    edge_upload_live_t live;
};

static void pump(edge_upload_t *up);
static void prep_pump(edge_upload_t *up);
static void pace_run(edge_upload_t *up);
static void live_update(edge_upload_t *up);
static void job_step(edge_job_t *job);
static void job_finish(edge_job_t *job, job_outcome_t out, const char *kind, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void maybe_closed(edge_upload_t *up);
static void on_timer(uv_timer_t *t);
static void manifest_poke(edge_upload_t *up);
static void manifest_finished(edge_upload_t *up, edge_job_t *job);
static void hash_run(edge_upload_t *up);
static void on_pace_timer(uv_timer_t *t);
static void cache_kick(edge_upload_t *up);
static void on_cache_timer(uv_timer_t *t);

/* The hot cache's pass: soon after start, then every minute. */
#define CACHE_FIRST_MS 5000
#define CACHE_EVERY_MS 60000

static const char *job_state_name(edge_job_state_t s)
{
    static const char *const names[] = {"HASHING", "DECLARING", "READING", "PACING", "SENDING",
                                        "COMMITTING", "RECORDING", "FINISHED"};
    return (unsigned)s < CMN_ARRAY_SIZE(names) ? names[s] : "?";
}

/*
 * A job gives its sending slot back (its last chunk is sent, or it ends):
 * the next job waiting for one is let go by pace_run on the next loop turn,
 * never from inside the caller's state change.
 */
static void slot_release(edge_job_t *job)
{
    edge_upload_t *up = job->up;

    if (!job->has_slot)
        return;
    job->has_slot = false;
    up->nsending--;
    if (up->slot_head && up->state != EDGE_UPLOAD_CLOSING)
        uv_timer_start(&up->pace_timer, on_pace_timer, 0, 0);
}

/* Legal moves (see the diagram in the file header). */
static void job_set_state(edge_job_t *job, edge_job_state_t to)
{
    edge_job_state_t from = job->state;
    bool ok;

    switch (to) {
    case EDGE_JOB_DECLARING: ok = from == EDGE_JOB_HASHING; break;
    case EDGE_JOB_READING: ok = from == EDGE_JOB_DECLARING || from == EDGE_JOB_SENDING; break;
    case EDGE_JOB_PACING: ok = from == EDGE_JOB_READING; break;
    case EDGE_JOB_SENDING: ok = from == EDGE_JOB_PACING; break;
    case EDGE_JOB_COMMITTING:
        ok = from == EDGE_JOB_DECLARING || from == EDGE_JOB_SENDING || from == EDGE_JOB_READING ||
             (job->manifest && from == EDGE_JOB_HASHING);
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
    if (to == EDGE_JOB_COMMITTING || to == EDGE_JOB_RECORDING || to == EDGE_JOB_FINISHED) {
        slot_release(job);
        /* Leaving before PACING: a slot kept for it goes to the next job. */
        if (from < EDGE_JOB_PACING && job->up->slot_head &&
            job->up->state != EDGE_UPLOAD_CLOSING)
            uv_timer_start(&job->up->pace_timer, on_pace_timer, 0, 0);
    }
    if (to == EDGE_JOB_COMMITTING && !job->manifest && !job->sent_all) {
        job->sent_all = true;   /* no longer counts as being uploaded (free_slots) */
        job->up->ncommitting++;
    }
}

/* ------------------------------------------------------------ signing */

typedef void (*job_http_cb)(edge_job_t *job, const cmn_http_result_t *res);

/* One signed request of a job. The request is kept (the body stays with
 * the job) so that it can wait for a token and be re-sent once with a new
 * token when the cloud refuses the old one. */
typedef struct {
    edge_job_t *job;
    job_http_cb cb;
    char method[8];
    char rel_path[300];
    const void *body;                /* job->chunk or job->json: valid until cb */
    size_t body_len;
    char body_sha[PROTO_HEX256 + 1];
    char content_type[64];
    char extra_header[160];          /* "" = none */
    char token_id[PROTO_TOKEN_ID_HEX + 1];   /* the token the last send used */
    int64_t signed_at;               /* the timestamp the last send was signed with */
    int64_t offset_at;               /* the clock offset then (edge_token_clock_offset) */
    bool resent;                     /* re-sent once after a token or clock rejection */
    long timeout_ms;
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

static void wipe(void *p, size_t n)
{
    volatile unsigned char *v = p;
    while (n--)
        *v++ = 0;
}

/* Fails ctx's request as a transport error (its job callback decides). */
static void signed_fail(http_ctx_t *ctx, int err, const char *why)
{
    cmn_http_result_t res;

    memset(&res, 0, sizeof(res));
    res.err = err < 0 ? err : CMN_EAUTH;
    res.errmsg = why ? why : cmn_strerror(res.err);
    on_http(&res, ctx);
}

static void on_signed_http(const cmn_http_result_t *res, void *ud);
static void on_token_ready(int status, const char *why, void *ud);

/* Signs ctx's request with tok (key) and sends it. */
static int signed_send_now(http_ctx_t *ctx, const proto_token_t *tok)
{
    edge_upload_t *up = ctx->job->up;
    const edge_conf_upload_t *c = up->conf;
    char path[1500], url[2500], nonce[PROTO_NONCE_HEX + 1], sig[PROTO_HEX256 + 1];
    char h_ver[64], h_edge[128], h_ts[64], h_nonce[96], h_body[128], h_sig[128], h_ct[96];
    char h_tok[96];
    uint8_t rnd[PROTO_NONCE_HEX / 2];
    const char *headers[12];
    int nh = 0, rc;

    if (snprintf(path, sizeof(path), "%s%s", up->path_prefix, ctx->rel_path) >= (int)sizeof(path) ||
        snprintf(url, sizeof(url), "%s%s", up->base_url, ctx->rel_path) >= (int)sizeof(url))
        return CMN_ETOOBIG;
    if (cmn_random(rnd, sizeof(rnd)) < 0)
        return CMN_ECRYPTO;
    cmn_hex(rnd, sizeof(rnd), nonce);

    proto_req_t r = {
        .method = ctx->method,
        .path = path,
        .query = "",
        .edge_id = c->edge_id,
        .timestamp = edge_token_time(up->token),
        .nonce = nonce,
        .body_sha256 = ctx->body_sha,
    };
    rc = proto_sign(tok->key, sizeof(tok->key), &r, sig);
    if (rc < 0)
        return rc;
    snprintf(ctx->token_id, sizeof(ctx->token_id), "%s", tok->token_id);
    ctx->signed_at = r.timestamp;
    ctx->offset_at = edge_token_clock_offset(up->token);

    snprintf(h_ver, sizeof(h_ver), "%s: %d", PROTO_H_VERSION, PROTO_VERSION);
    snprintf(h_edge, sizeof(h_edge), "%s: %s", PROTO_H_EDGE, c->edge_id);
    snprintf(h_ts, sizeof(h_ts), "%s: %lld", PROTO_H_TIMESTAMP, (long long)r.timestamp);
    snprintf(h_nonce, sizeof(h_nonce), "%s: %s", PROTO_H_NONCE, nonce);
    snprintf(h_body, sizeof(h_body), "%s: %s", PROTO_H_BODY_HASH, ctx->body_sha);
    snprintf(h_sig, sizeof(h_sig), "%s: %s", PROTO_H_SIGNATURE, sig);
    snprintf(h_tok, sizeof(h_tok), "%s: %s", PROTO_H_TOKEN, tok->token_id);
    snprintf(h_ct, sizeof(h_ct), "Content-Type: %s", ctx->content_type);
    headers[nh++] = h_ver;
    headers[nh++] = h_edge;
    headers[nh++] = h_ts;
    headers[nh++] = h_nonce;
    headers[nh++] = h_body;
    headers[nh++] = h_sig;
    headers[nh++] = h_tok;
    headers[nh++] = h_ct;
    headers[nh++] = "Expect:";      /* no 100-continue round trip */
    if (ctx->extra_header[0])
        headers[nh++] = ctx->extra_header;
    headers[nh] = NULL;

    cmn_http_client_req_t req = {
        .method = ctx->method,
        .url = url,
        .headers = headers,
        .body = ctx->body,
        .body_len = ctx->body_len,
        .timeout_ms = ctx->timeout_ms,
        .max_response = 1 << 20,
        .ca_file = c->ca_file && *c->ca_file ? c->ca_file : NULL,
        .pinned_pubkey = c->pinned_pubkey && *c->pinned_pubkey ? c->pinned_pubkey : NULL,
        .proxy = c->proxy && *c->proxy ? c->proxy : NULL,
        .client_cert_file = c->client_cert_file && *c->client_cert_file ? c->client_cert_file
                                                                          : NULL,
        .client_key_file = c->client_key_file && *c->client_key_file ? c->client_key_file : NULL,
    };
    rc = cmn_http_client_send(up->http, &req, on_signed_http, ctx);
    wipe(sig, sizeof(sig));
    wipe(h_sig, sizeof(h_sig));
    return rc;
}

/* Sends with the current token, or waits for one. 0: a callback will run. */
static int signed_dispatch(http_ctx_t *ctx)
{
    edge_upload_t *up = ctx->job->up;
    proto_token_t tok;
    int rc;

    if (edge_token_current(up->token, &tok) == 0) {
        rc = signed_send_now(ctx, &tok);
        wipe(&tok, sizeof(tok));
        return rc;
    }
    return edge_token_wait(up->token, on_token_ready, ctx);
}

static void on_token_ready(int status, const char *why, void *ud)
{
    http_ctx_t *ctx = ud;
    proto_token_t tok;
    int rc = status;

    if (rc == 0 && ctx->job->up->state != EDGE_UPLOAD_CLOSING) {
        /* Just fetched: use it now (no second wait, so no loop). */
        rc = edge_token_current(ctx->job->up->token, &tok);
        if (rc == 0)
            rc = signed_send_now(ctx, &tok);
        wipe(&tok, sizeof(tok));
        if (rc == 0)
            return;
        why = "cannot send request";
    } else if (rc == 0) {
        rc = -ECANCELED;
    }
    signed_fail(ctx, rc, why);
}

/* A token the cloud refuses is dropped; the request is re-sent once with a
 * new one, so a revoked or expired token costs no backoff. A timestamp it
 * refuses (clock_skew) teaches the edge the cloud's time; the request is
 * re-sent once, signed with it. */
static void on_signed_http(const cmn_http_result_t *res, void *ud)
{
    http_ctx_t *ctx = ud;
    edge_upload_t *up = ctx->job->up;
    proto_error_t e;

    if (res->err == 0)
        edge_token_clock_seen(up->token, res->date);
    if (up->state != EDGE_UPLOAD_CLOSING && res->err == 0 && res->status == 401 &&
        res->body.data && proto_error_decode(res->body.data, res->body.len, &e) == 0) {
        bool again = false;
        if (strncmp(e.code, "token_", 6) == 0) {
            edge_token_invalidate(up->token, ctx->token_id);
            again = true;
            if (!ctx->resent)
                CMN_LOG_I("upload", "cloud refused the token (%s): getting a new one sop=%s",
                          e.code, ctx->job->item.sop_uid);
        } else if (strcmp(e.code, "clock_skew") == 0) {
            again = edge_token_clock_skew(up->token, ctx->signed_at, ctx->offset_at,
                                          e.server_time);
        }
        if (again && !ctx->resent) {
            ctx->resent = true;
            if (signed_dispatch(ctx) == 0)
                return;
        }
    }
    on_http(res, ctx);
}

/*
 * Sends a request for job, signed with the current token's key (fetched
 * first when there is none). body_sha is the hex SHA-256 of body; body must
 * stay valid until cb. extra_header: one more "Name: value" or NULL.
 */
static int send_signed(edge_job_t *job, const char *method, const char *rel_path,
                       const void *body, size_t body_len, const char *body_sha,
                       const char *content_type, const char *extra_header, job_http_cb cb)
{
    http_ctx_t *ctx = cmn_xcalloc(1, sizeof(*ctx));
    int rc;

    ctx->job = job;
    ctx->cb = cb;
    snprintf(ctx->method, sizeof(ctx->method), "%s", method);
    snprintf(ctx->rel_path, sizeof(ctx->rel_path), "%s", rel_path);
    ctx->body = body;
    ctx->body_len = body_len;
    snprintf(ctx->body_sha, sizeof(ctx->body_sha), "%s", body_sha);
    snprintf(ctx->content_type, sizeof(ctx->content_type), "%s", content_type);
    snprintf(ctx->extra_header, sizeof(ctx->extra_header), "%s", extra_header ? extra_header : "");
    ctx->timeout_ms = job->next_timeout_ms > 0 ? job->next_timeout_ms : (long)job->up->conf->timeout_ms;
    job->next_timeout_ms = 0;
    rc = signed_dispatch(ctx);
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

/* The error class counted on the status page: "timeout", "connect",
 * "network", "tls", "chunk_hash", "auth", "http_4xx", "http_5xx", "no_space". */
static const char *classify_failure(const cmn_http_result_t *res)
{
    proto_error_t e;

    if (res->err < 0) {
        if (res->err == CMN_ETIMEOUT)
            return "timeout";
        if (res->err == -ECONNREFUSED || res->err == -EHOSTUNREACH)
            return "connect";
        if (res->err == CMN_ECRYPTO)
            return "tls";
        if (res->err == CMN_EAUTH)
            return "auth";
        return "network";
    }
    if (res->body.data && proto_error_decode(res->body.data, res->body.len, &e) == 0) {
        /* A body corrupted on the way fails the cloud's body hash (checked
         * before the signature, 401) or the chunk hash (400 bad_chunk). */
        if ((res->status == 400 && strcmp(e.code, "bad_chunk") == 0) ||
            (res->status == 401 && strstr(e.message, "does not match the body")))
            return "chunk_hash";
    }
    if (res->status == 401 || res->status == 403)
        return "auth";
    if (res->status == 507)
        return "no_space";
    if (res->status >= 500)
        return "http_5xx";
    return "http_4xx";
}

/* ------------------------------------------------------------ live figures */

static void live_update(edge_upload_t *up)
{
    pthread_mutex_lock(&up->live_mu);
    up->live.schedule_open = up->sched_now.open;
    up->live.window = up->sched_now.window;
    up->live.rate_limit_bps = up->sched_now.open ? up->sched_now.rate_bps : 0;
    up->live.jobs = up->njobs;
    up->live.pacing = up->npacing;
    up->live.preparing = up->prep_inflight;
    up->live.tokens = (int64_t)up->tokens;
    up->live.clock_offset_s = up->token ? edge_token_clock_diff(up->token) : 0;
    pthread_mutex_unlock(&up->live_mu);
}

void edge_upload_live(edge_upload_t *up, edge_upload_live_t *out)
{
    pthread_mutex_lock(&up->live_mu);
    *out = up->live;
    pthread_mutex_unlock(&up->live_mu);
}

static void live_add_sent(edge_upload_t *up, uint64_t n)
{
    pthread_mutex_lock(&up->live_mu);
    up->live.bytes_sent += n;
    pthread_mutex_unlock(&up->live_mu);
}

/* ------------------------------------------------------------ schedule + pacing */

/* Re-evaluates the schedule at the edge's clock; adjusts the bucket. */
static void sched_eval(edge_upload_t *up)
{
    bool was_open = up->sched_now.open;
    int was_window = up->sched_now.window;

    edge_schedule_eval(&up->sched, edge__wall_ms(), &up->sched_now);
    if (up->sched_now.open != was_open || up->sched_now.window != was_window)
        CMN_LOG_I("upload", "schedule: %s window=%d max_kbps=%lld",
                  up->sched_now.open ? "open" : "closed", up->sched_now.window,
                  (long long)(up->sched_now.rate_bps * 8 / 1000));
    live_update(up);
}

/* Burst of the bucket: one second of the cap, at least one minimal chunk. */
static double bucket_burst(int64_t rate)
{
    return rate > (int64_t)PROTO_MIN_CHUNK ? (double)rate : (double)PROTO_MIN_CHUNK;
}

static void bucket_refill(edge_upload_t *up)
{
    uint64_t now = edge__now_ms();
    int64_t rate = up->sched_now.rate_bps;

    if (rate != up->bucket_rate) {
        /* A new cap starts with a full bucket of the new size. */
        up->bucket_rate = rate;
        up->tokens = rate ? bucket_burst(rate) : 0;
        up->bucket_ms = now;
        return;
    }
    if (rate == 0 || now <= up->bucket_ms) {
        up->bucket_ms = now > up->bucket_ms ? now : up->bucket_ms;
        return;
    }
    up->tokens += (double)(now - up->bucket_ms) * (double)rate / 1000.0;
    if (up->tokens > bucket_burst(rate))
        up->tokens = bucket_burst(rate);
    up->bucket_ms = now;
}

/* The chunk size to propose: about a second of the cap, never below the
 * protocol's minimum or above upload.chunk_size. */
static uint32_t chunk_size_for(edge_upload_t *up)
{
    int64_t c = up->conf->chunk_size;
    int64_t rate = up->sched_now.rate_bps;

    if (rate > 0 && rate < c) {
        c = rate - rate % (int64_t)PROTO_MIN_CHUNK;
        if (c < (int64_t)PROTO_MIN_CHUNK)
            c = PROTO_MIN_CHUNK;
    }
    return (uint32_t)c;
}

static void on_pace_timer(uv_timer_t *t)
{
    edge_upload_t *up = container_of(t, edge_upload_t, pace_timer);
    pace_run(up);
}

static void pace_pop(edge_upload_t *up, edge_job_t *job)
{
    up->pace_head = job->pace_next;
    if (!up->pace_head)
        up->pace_tail = NULL;
    job->pace_next = NULL;
    up->npacing--;
}

static void pace_append(edge_upload_t *up, edge_job_t *job)
{
    job->pace_next = NULL;
    if (up->pace_tail)
        up->pace_tail->pace_next = job;
    else
        up->pace_head = job;
    up->pace_tail = job;
    up->npacing++;
}

static void slot_take(edge_job_t *job)
{
    if (!job->has_slot) {
        job->has_slot = true;
        job->up->nsending++;
    }
}

/* A job of higher priority that has not sent yet and holds no slot: it
 * will want one, and gets it before job (at most 2*parallel+AHEAD jobs). */
static bool outranked(const edge_job_t *job)
{
    for (const edge_job_t *k = job->up->jobs; k; k = k->next) {
        if (k != job && !k->manifest && !k->has_slot && k->item.priority > job->item.priority &&
            k->state <= EDGE_JOB_PACING)
            return true;
    }
    return false;
}

static edge_job_t *slot_pop(edge_upload_t *up)
{
    edge_job_t *job = up->slot_head;

    up->slot_head = job->pace_next;
    if (!up->slot_head)
        up->slot_tail = NULL;
    job->pace_next = NULL;
    return job;
}

/*
 * Lets queued jobs send: first jobs waiting for a sending slot get the free
 * ones (upload.parallel jobs send at once and keep their slot from their
 * first chunk to their commit), then the bucket decides (FIFO); arms the
 * timer for the rest.
 */
static void pace_run(edge_upload_t *up)
{
    if (up->state == EDGE_UPLOAD_CLOSING)
        return;
    sched_eval(up);
    bucket_refill(up);
    while (up->slot_head && !up->sched_now.open)
        job_finish(slot_pop(up), JOB_OUT_RELEASE, NULL, "upload window closed");
    while (up->slot_head && up->nsending < (int)up->conf->parallel && !outranked(up->slot_head)) {
        edge_job_t *job = slot_pop(up);
        slot_take(job);
        pace_append(up, job);
    }
    while (up->pace_head) {
        edge_job_t *job = up->pace_head;
        if (!up->sched_now.open) {
            pace_pop(up, job);
            job_finish(job, JOB_OUT_RELEASE, NULL, "upload window closed");
            continue;
        }
        if (up->sched_now.rate_bps > 0 && up->tokens < 0)
            break;
        pace_pop(up, job);
        if (up->sched_now.rate_bps > 0)
            up->tokens -= job->chunk_len;
        job_set_state(job, EDGE_JOB_SENDING);
        job_step(job);
    }
    live_update(up);
    if (up->pace_head) {
        int64_t rate = up->sched_now.rate_bps;
        uint64_t ms = (uint64_t)((-up->tokens) * 1000.0 / (double)rate) + 1;
        if (edge__clock_is_fake() || ms > 1000)
            ms = edge__clock_is_fake() ? 20 : 1000;
        uv_timer_start(&up->pace_timer, on_pace_timer, ms, 0);
    }
}

/* PACING: a job with its chunk read waits for a sending slot (if it has
 * none yet), then for bandwidth tokens. */
static void pace_enqueue(edge_job_t *job)
{
    edge_upload_t *up = job->up;

    if (!job->has_slot &&
        (up->slot_head || up->nsending >= (int)up->conf->parallel || outranked(job))) {
        /* In priority order, FIFO within a priority. */
        edge_job_t **pp = &up->slot_head;
        while (*pp && (*pp)->item.priority >= job->item.priority)
            pp = &(*pp)->pace_next;
        job->pace_next = *pp;
        *pp = job;
        if (!job->pace_next)
            up->slot_tail = job;
        if (up->nsending < (int)up->conf->parallel)
            uv_timer_start(&up->pace_timer, on_pace_timer, 0, 0);
        return;
    }
    slot_take(job);
    pace_append(up, job);
    if (up->pace_head == job)
        pace_run(up);
}

/* ------------------------------------------------------------ job steps */

static void job_free(edge_job_t *job)
{
    free(job->members);
    free(job->bhdr);
    proto_bundle_free(&job->blayout);
    free(job->mstat);
    free(job->mres);
    edge_spool_manifest_free(&job->mf);
    free(job->have);
    free(job->chunk);
    free(job->json);
    free(job);
}

static void job_unlink(edge_job_t *job)
{
    edge_upload_t *up = job->up;
    if (job->sent_all)
        up->ncommitting--;
    for (edge_job_t **pp = &up->jobs; *pp; pp = &(*pp)->next) {
        if (*pp == job) {
            *pp = job->next;
            up->njobs--;
            break;
        }
    }
}

static int hash_into(const char *path, cmn_sha256_ctx_t *outer, char hex[PROTO_HEX256 + 1],
                     uint64_t *size);

static int check_file(const char *path, const char *sha, uint64_t want_size)
{
    char hex[PROTO_HEX256 + 1];
    uint64_t size = 0;
    int rc = hash_into(path, NULL, hex, &size);

    if (rc < 0)
        return rc;
    if (size != want_size || strcmp(hex, sha) != 0)
        return CMN_EHASH;
    return 0;
}

/* The spooled original against the checksum taken at receipt (XXH3-128,
 * ~12x faster than SHA-256), or its SHA-256 on rows from before it. */
static int check_original(const edge_spool_item_t *it)
{
    char hex[CMN_XXH128_HEX_LEN + 1];
    cmn_xxh128_ctx_t c;
    uint64_t size = 0;
    int rc;

    if (!it->xxh128[0])
        return check_file(it->path, it->sha256, it->size);
    cmn_xxh128_init(&c);
    if ((rc = cmn_file_chunks(it->path, cmn_xxh128_update_cb, &c, &size)) < 0)
        return rc;
    cmn_xxh128_final_hex(&c, hex);
    return size == it->size && strcmp(hex, it->xxh128) == 0 ? 0 : CMN_EHASH;
}

/* HASHING: the spooled original must still be what was received, and the
 * prepared file what was recorded (else it is prepared again). */
static void hash_work_one(edge_job_t *job)
{
    const edge_spool_item_t *it = &job->item;

    snprintf(job->obj_sha, sizeof(job->obj_sha), "%s", it->up_sha256);
    job->obj_size = it->up_size;
    job->work_rc = check_original(it);
    if (job->work_rc < 0)
        return;
    if (!it->up_sha256[0]) {
        job->work_rc = JOB_E_REPREPARE;   /* prepare could not read the original then */
        return;
    }
    if (strcmp(it->up_path, it->path) != 0 &&
        check_file(it->up_path, it->up_sha256, it->up_size) < 0)
        job->work_rc = JOB_E_REPREPARE;
}

/*
 * Hashes path into hex (and into outer, when not NULL). 0 or -errno.
 * Every byte uploaded (and every original behind it) goes through here, so
 * it uses cmn_sha256, SHA-NI where the CPU has it (~10x mbedTLS, whose
 * hashing was the edge's largest CPU cost during an upload).
 */
struct hash_into_ctx {
    cmn_sha256_ctx_t c, *outer;
};

static void hash_into_chunk(void *ud, const void *p, size_t n)
{
    struct hash_into_ctx *h = ud;
    cmn_sha256_update(&h->c, p, n);
    if (h->outer)
        cmn_sha256_update(h->outer, p, n);
}

static int hash_into(const char *path, cmn_sha256_ctx_t *outer, char hex[PROTO_HEX256 + 1],
                     uint64_t *size)
{
    struct hash_into_ctx h = {.outer = outer};
    int rc;

    cmn_sha256_init(&h.c);
    rc = cmn_file_chunks(path, hash_into_chunk, &h, size);
    cmn_sha256_final_hex(&h.c, hex);
    return rc;
}

/*
 * HASHING of a bundle: every member's original and prepared file must
 * match the spool (else the bundle is split: JOB_E_SPLIT, per member in
 * mstat); the bundle's header is built from the spool rows and its
 * SHA-256 computed over the header and the prepared files in one pass.
 */
static void hash_work_bundle(edge_job_t *job)
{
    cmn_sha256_ctx_t bctx;
    char hex[PROTO_HEX256 + 1], bhex[PROTO_HEX256 + 1];
    bool bad = false;
    uint64_t size;

    free(job->mstat);
    job->mstat = cmn_xcalloc((size_t)job->nmembers, sizeof(*job->mstat));
    free(job->bhdr);
    proto_bundle_free(&job->blayout);
    memset(&job->blayout, 0, sizeof(job->blayout));
    snprintf(job->blayout.study_uid, sizeof(job->blayout.study_uid), "%s", job->item.study_uid);
    job->blayout.n = (uint32_t)job->nmembers;
    job->blayout.m = cmn_xcalloc((size_t)job->nmembers, sizeof(*job->blayout.m));
    for (int i = 0; i < job->nmembers; i++) {
        const edge_spool_item_t *it = &job->members[i];
        proto_bundle_member_t *m = &job->blayout.m[i];
        snprintf(m->sop_uid, sizeof(m->sop_uid), "%s", it->sop_uid);
        snprintf(m->series_uid, sizeof(m->series_uid), "%s", it->series_uid);
        snprintf(m->sha256, sizeof(m->sha256), "%s", it->up_sha256);
        m->size = it->up_size;
    }
    job->bhdr = proto_bundle_header_encode(&job->blayout);
    if (!job->bhdr) {
        job->work_rc = CMN_EPARSE;   /* a row with a bad UID: retried, logged */
        return;
    }
    cmn_sha256_init(&bctx);
    cmn_sha256_update(&bctx, job->bhdr, job->blayout.header_len);
    for (int i = 0; i < job->nmembers; i++) {
        const edge_spool_item_t *it = &job->members[i];
        bool same = strcmp(it->up_path, it->path) == 0;
        int rc;

        if ((!same || !it->up_sha256[0]) && (rc = check_original(it)) < 0) {
            job->mstat[i] = rc;
            bad = true;
            continue;
        }
        if (!it->up_sha256[0]) {
            job->mstat[i] = JOB_E_REPREPARE;   /* as in hash_work_one */
            bad = true;
            continue;
        }
        rc = hash_into(it->up_path, bad ? NULL : &bctx, hex, &size);
        if (rc < 0 || size != it->up_size || strcmp(hex, it->up_sha256) != 0) {
            job->mstat[i] = same ? (rc < 0 ? rc : CMN_EHASH) : JOB_E_REPREPARE;
            bad = true;
        }
    }
    cmn_sha256_final_hex(&bctx, bhex);
    if (bad) {
        job->work_rc = JOB_E_SPLIT;
        return;
    }
    snprintf(job->obj_sha, sizeof(job->obj_sha), "%s", bhex);
    job->obj_size = job->blayout.size;
    job->work_rc = 0;
}

static void manifest_list_work(uv_work_t *w)
{
    edge_job_t *job = container_of(w, edge_job_t, work);
    edge_spool_manifest_free(&job->mf);
    job->work_rc = edge_spool_manifest_next(job->up->spool, job->up->conf->manifest_quiet_ms,
                                            (int)PROTO_MANIFEST_MAX, &job->mf);
}

static void hash_work(uv_work_t *w)
{
    edge_job_t *job = container_of(w, edge_job_t, work);

    if (job->bundle)
        hash_work_bundle(job);
    else
        hash_work_one(job);
}

/* Reads len bytes at off of path into buf. 0 or -errno (-EIO when short). */
static int read_at(const char *path, uint64_t off, uint8_t *buf, size_t len)
{
    size_t got = 0;
    int fd, rc = 0;

    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    while (got < len) {
        ssize_t n = pread(fd, buf + got, len - got, (off_t)(off + got));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            rc = n < 0 ? -errno : -EIO;
            break;
        }
        got += (size_t)n;
    }
    close(fd);
    return rc;
}

/* The bytes [off, off+len) of the bundle: header, then the members' files. */
static int read_bundle_range(edge_job_t *job, uint64_t off, uint8_t *buf, size_t len)
{
    const proto_bundle_t *b = &job->blayout;
    uint64_t end = off + len;
    int rc;

    if (off < b->header_len) {
        size_t n = (size_t)((end < b->header_len ? end : b->header_len) - off);
        memcpy(buf, job->bhdr + off, n);
    }
    for (uint32_t i = 0; i < b->n; i++) {
        uint64_t ms = b->m[i].offset, me = ms + b->m[i].size;
        if (me <= off || ms >= end)
            continue;
        uint64_t a = off > ms ? off : ms, z = end < me ? end : me;
        rc = read_at(job->members[i].up_path, a - ms, buf + (a - off), (size_t)(z - a));
        if (rc < 0)
            return rc;
    }
    return 0;
}

static void read_work(uv_work_t *w)
{
    edge_job_t *job = container_of(w, edge_job_t, work);
    uint64_t off = (uint64_t)job->next_chunk * job->chunk_size;
    cmn_sha256_ctx_t c;

    if (job->bundle)
        job->work_rc = read_bundle_range(job, off, job->chunk, job->chunk_len);
    else
        job->work_rc = read_at(job->item.up_path, off, job->chunk, job->chunk_len);
    if (job->work_rc == 0 && job->nchunks == 1) {
        /* The chunk is the whole object, hashed in HASHING: not again. Had
         * the file changed since, the cloud refuses the chunk (bad_chunk)
         * and the retry's HASHING finds out. */
        snprintf(job->chunk_sha, sizeof(job->chunk_sha), "%s", job->obj_sha);
    } else if (job->work_rc == 0) {
        cmn_sha256_init(&c);
        cmn_sha256_update(&c, job->chunk, job->chunk_len);
        cmn_sha256_final_hex(&c, job->chunk_sha);
    }
}

/* True when the cloud holds (or may hold) part of this job's object. */
static bool has_cloud_progress(const edge_job_t *job)
{
    if (job->bytes_sent > 0)
        return true;
    for (uint32_t i = 0; job->have && i < job->nchunks; i++) {
        if (job->have[i])
            return true;
    }
    return false;
}

/* RECORDING of a bundle: every member's row, the bytes counted once. */
static void record_bundle(edge_job_t *job)
{
    edge_spool_t *sp = job->up->spool;
    int64_t *ids = cmn_xcalloc((size_t)job->nmembers, sizeof(*ids));
    int n = 0, rc = 0;

    switch (job->outcome) {
    case JOB_OUT_DONE:
        for (int i = 0; i < job->nmembers; i++) {
            if (job->mres && job->mres[i] == PROTO_COMMIT_REJECTED) {
                int r = edge_spool_mark_failed(sp, job->members[i].id,
                                               "rejected by the cloud in a bundle");
                rc = rc < 0 ? rc : r;
            } else {
                ids[n++] = job->members[i].id;
            }
        }
        if (n > 0) {
            int r = edge_spool_mark_done_many(sp, ids, n, job->bytes_sent);
            rc = rc < 0 ? rc : r;
        }
        break;
    case JOB_OUT_SPLIT:
        rc = edge_spool_group_dissolve(sp, job->item.id);
        for (int i = 0; i < job->nmembers; i++) {
            int64_t id = job->members[i].id, st = job->mstat ? job->mstat[i] : 0;
            uint64_t sent = i == 0 ? job->bytes_sent : 0;
            int r;
            if (st < 0) {
                r = edge_spool_mark_failed(sp, id, "spooled file unusable");
            } else if (st == JOB_E_REPREPARE) {
                r = edge_spool_clear_upload_file(sp, id);
                if (r == 0)
                    r = edge_spool_release(sp, id, sent);
            } else {
                r = edge_spool_release(sp, id, sent);
            }
            rc = rc < 0 ? rc : r;
        }
        break;
    default:
        /* Nothing of it reached the cloud yet: let the next claim group
         * afresh (it may form a fuller bundle). With chunks held there, the
         * same members are taken again so that they are resumed. */
        if (!has_cloud_progress(job))
            rc = edge_spool_group_dissolve(sp, job->item.id);
        for (int i = 0; i < job->nmembers; i++) {
            int64_t id = job->members[i].id;
            uint64_t sent = i == 0 ? job->bytes_sent : 0;
            int r = 0;
            if (job->outcome == JOB_OUT_RETRY)
                r = edge_spool_mark_retry(sp, id, job->next_at_ms, job->errmsg,
                                          i == 0 ? job->errkind : NULL, sent);
            else if (job->outcome == JOB_OUT_FAILED)
                r = edge_spool_mark_failed(sp, id, job->errmsg);
            else
                r = edge_spool_release(sp, id, sent);
            rc = rc < 0 ? rc : r;
        }
        break;
    }
    free(ids);
    job->work_rc = rc;
}

static void record_work(uv_work_t *w)
{
    edge_job_t *job = container_of(w, edge_job_t, work);
    edge_spool_t *sp = job->up->spool;
    int64_t id = job->item.id;

    if (job->manifest) {
        job->work_rc = job->outcome == JOB_OUT_DONE
                           ? edge_spool_manifest_sent(sp, job->mf.study_uid, job->mf.sig)
                           : 0;
        return;
    }
    if (job->bundle) {
        record_bundle(job);
        return;
    }
    switch (job->outcome) {
    case JOB_OUT_DONE: job->work_rc = edge_spool_mark_done(sp, id, job->bytes_sent); break;
    case JOB_OUT_RETRY:
        job->work_rc = edge_spool_mark_retry(sp, id, job->next_at_ms, job->errmsg, job->errkind,
                                             job->bytes_sent);
        break;
    case JOB_OUT_FAILED:
        job->work_rc = edge_spool_mark_failed(sp, id, job->errmsg);
        break;
    case JOB_OUT_REPREPARE:
        job->work_rc = edge_spool_clear_upload_file(sp, id);
        /* fall through */
    case JOB_OUT_RELEASE:
        if (job->work_rc == 0 || job->outcome == JOB_OUT_RELEASE)
            job->work_rc = edge_spool_release(sp, id, job->bytes_sent);
        break;
    case JOB_OUT_SPLIT:
        job->work_rc = CMN_EINTERNAL;   /* bundles only */
        break;
    }
}

static void after_work(uv_work_t *w, int status)
{
    edge_job_t *job = container_of(w, edge_job_t, work);

    job->busy = false;
    if (status == UV_ECANCELED)
        job->work_rc = -ECANCELED;
    if (job->state == EDGE_JOB_HASHING && !job->manifest) {
        job->up->nhashing--;
        hash_run(job->up);
    }
    if (job->state == EDGE_JOB_RECORDING) {
        if (job->work_rc < 0)
            CMN_LOG_E("upload", "cannot record outcome id=%lld sop=%s: %s", (long long)job->item.id,
                      job->item.sop_uid, cmn_strerror(job->work_rc));
        if (job->outcome == JOB_OUT_REPREPARE || job->outcome == JOB_OUT_SPLIT)
            prep_pump(job->up);
        if (job->outcome == JOB_OUT_DONE && !job->manifest)
            manifest_poke(job->up);
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
        if (job->manifest) {
            if (job->work_rc < 0 || !job->mf.study_uid[0]) {
                job_set_state(job, EDGE_JOB_FINISHED);
                job_step(job);
                return;
            }
            job_set_state(job, EDGE_JOB_COMMITTING);
            job_step(job);
            return;
        }
        if (job->work_rc == JOB_E_SPLIT) {
            job_finish(job, JOB_OUT_SPLIT, "file", "a bundle member's file does not match its "
                       "hash; members=%d", job->nmembers);
            return;
        }
        if (job->work_rc == JOB_E_REPREPARE) {
            job_finish(job, JOB_OUT_REPREPARE, "file", "prepared file %s does not match its hash",
                       job->item.up_kind);
            return;
        }
        if (job->work_rc < 0) {
            job_finish(job, JOB_OUT_FAILED, "file", "spooled file unusable: %s",
                       cmn_strerror(job->work_rc));
            return;
        }
        job_set_state(job, EDGE_JOB_DECLARING);
        job_step(job);
        break;
    case EDGE_JOB_READING:
        if (job->work_rc < 0) {
            job_finish(job, JOB_OUT_RETRY, "file", "reading chunk %u: %s", job->next_chunk,
                       cmn_strerror(job->work_rc));
            return;
        }
        job_set_state(job, EDGE_JOB_PACING);
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

/*
 * HASHING reads every byte of an object and of its originals, CPU-bound:
 * at most hash_max jobs hash at once, in claim order, so that the first
 * objects are declared and on the wire while the others wait, instead of
 * all of them finishing together late on a busy CPU (at start, and after
 * a burst of commits).
 */
static void hash_run(edge_upload_t *up)
{
    while (up->hash_head && up->nhashing < up->hash_max && up->state != EDGE_UPLOAD_CLOSING) {
        edge_job_t *job = up->hash_head;
        up->hash_head = job->hash_next;
        if (!up->hash_head)
            up->hash_tail = NULL;
        job->hash_next = NULL;
        up->nhashing++;
        queue(job, hash_work);
    }
}

static void hash_enqueue(edge_job_t *job)
{
    edge_upload_t *up = job->up;

    job->hash_next = NULL;
    if (up->hash_tail)
        up->hash_tail->hash_next = job;
    else
        up->hash_head = job;
    up->hash_tail = job;
    hash_run(up);
}

static void on_declared(edge_job_t *job, const cmn_http_result_t *res)
{
    proto_object_status_t st;
    char err[200];

    if (res->err < 0 || res->status != 200) {
        describe_failure(res, err, sizeof(err));
        job_finish(job, JOB_OUT_RETRY, classify_failure(res), "declare: %s", err);
        return;
    }
    memset(&st, 0, sizeof(st));
    if (proto_object_status_decode(res->body.data ? res->body.data : "", res->body.len, &st, err,
                                   sizeof(err)) < 0) {
        job_finish(job, JOB_OUT_RETRY, "protocol", "declare: bad status from cloud: %s", err);
        return;
    }
    if (st.nchunks != proto_chunk_count(job->obj_size, st.chunk_size)) {
        proto_object_status_free(&st);
        job_finish(job, JOB_OUT_RETRY, "protocol",
                   "declare: cloud chunk layout does not match the object");
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

    job->bytes_sent += job->chunk_len;
    live_add_sent(job->up, job->chunk_len);
    if (res->err < 0 || (res->status != 204 && res->status != 200)) {
        describe_failure(res, err, sizeof(err));
        job_finish(job, JOB_OUT_RETRY, classify_failure(res), "chunk %u: %s", job->next_chunk,
                   err);
        return;
    }
    job->have[job->next_chunk] = 1;
    job->next_chunk++;
    job_set_state(job, EDGE_JOB_READING);
    job_step(job);
}

/* The per-member answer of a bundle commit. */
static void on_bundle_committed(edge_job_t *job, const cmn_http_result_t *res)
{
    proto_bundle_commit_t c;
    int counts[PROTO_COMMIT_REJECTED + 1] = { 0 };
    char err[200];

    if (proto_bundle_commit_decode(res->body.data ? res->body.data : "", res->body.len, &c, err,
                                   sizeof(err)) < 0) {
        job_finish(job, JOB_OUT_RETRY, "protocol", "commit: bad bundle answer from cloud: %s",
                   err);
        return;
    }
    if (c.n != (uint32_t)job->nmembers) {
        proto_bundle_commit_free(&c);
        job_finish(job, JOB_OUT_RETRY, "protocol", "commit: bundle answer lists %u of %d members",
                   c.n, job->nmembers);
        return;
    }
    free(job->mres);
    job->mres = cmn_xcalloc((size_t)job->nmembers, sizeof(*job->mres));
    for (int i = 0; i < job->nmembers; i++) {
        if (strcmp(c.m[i].sop_uid, job->members[i].sop_uid) != 0) {
            proto_bundle_commit_free(&c);
            job_finish(job, JOB_OUT_RETRY, "protocol", "commit: bundle answer out of order");
            return;
        }
        const edge_spool_item_t *it = &job->members[i];
        job->mres[i] = c.m[i].result;
        counts[c.m[i].result]++;
        /* One line per instance, as for single uploads (grep a SOP UID). */
        if (c.m[i].result == PROTO_COMMIT_STORED)
            CMN_LOG_I("upload", "stored sop=%s sha256=%s size=%llu kind=%s priority=%d id=%lld "
                      "bundle=%.16s", it->sop_uid, it->up_sha256,
                      (unsigned long long)it->up_size, it->up_kind, it->priority,
                      (long long)it->id, job->obj_sha);
        else if (c.m[i].result == PROTO_COMMIT_DUPLICATE)
            CMN_LOG_I("upload", "duplicate sop=%s sha256=%s (already archived) id=%lld "
                      "bundle=%.16s", it->sop_uid, it->up_sha256, (long long)it->id,
                      job->obj_sha);
        else if (c.m[i].result == PROTO_COMMIT_CONFLICT)
            CMN_LOG_W("upload", "conflict sop=%s sha256=%s: the cloud holds different bytes for "
                      "this SOP Instance UID; kept aside there id=%lld", job->members[i].sop_uid,
                      job->members[i].up_sha256, (long long)job->members[i].id);
        else if (c.m[i].result == PROTO_COMMIT_REJECTED)
            CMN_LOG_E("upload", "giving up sop=%s id=%lld: rejected by the cloud (not DICOM or "
                      "not as declared)", job->members[i].sop_uid, (long long)job->members[i].id);
    }
    proto_bundle_commit_free(&c);
    CMN_LOG_I("upload", "committed bundle sha256=%s size=%llu members=%d stored=%d duplicate=%d "
              "conflict=%d rejected=%d priority=%d first_id=%lld", job->obj_sha,
              (unsigned long long)job->obj_size, job->nmembers, counts[PROTO_COMMIT_STORED],
              counts[PROTO_COMMIT_DUPLICATE], counts[PROTO_COMMIT_CONFLICT],
              counts[PROTO_COMMIT_REJECTED], job->item.priority, (long long)job->item.id);
    job_finish(job, JOB_OUT_DONE, NULL, NULL);
}

static void on_manifest(edge_job_t *job, const cmn_http_result_t *res)
{
    proto_manifest_status_t s;
    char err[200];

    if (res->err < 0 || res->status != 200) {
        describe_failure(res, err, sizeof(err));
        CMN_LOG_W("upload", "manifest study=%s: %s", job->mf.study_uid, err);
        job_finish(job, JOB_OUT_RETRY, NULL, NULL);
        return;
    }
    if (proto_manifest_status_decode(res->body.data ? res->body.data : "", res->body.len, &s,
                                     err, sizeof(err)) < 0) {
        CMN_LOG_W("upload", "manifest study=%s: bad answer: %s", job->mf.study_uid, err);
        job_finish(job, JOB_OUT_RETRY, NULL, NULL);
        return;
    }
    CMN_LOG_I("upload", "manifest study=%s instances=%d: cloud has %u of %u (missing=%u "
              "mismatched=%u) complete=%s", job->mf.study_uid, job->mf.n, s.received,
              s.expected, s.missing, s.mismatched, s.complete ? "yes" : "no");
    job_finish(job, JOB_OUT_DONE, NULL, NULL);
}

static void on_committed(edge_job_t *job, const cmn_http_result_t *res)
{
    proto_commit_t c;
    char err[200];

    if (res->err == 0 && res->status == 200 && job->bundle) {
        on_bundle_committed(job, res);
        return;
    }
    if (res->err < 0 || res->status != 200) {
        describe_failure(res, err, sizeof(err));
        job_finish(job, JOB_OUT_RETRY, classify_failure(res), "commit: %s", err);
        return;
    }
    if (proto_commit_decode(res->body.data ? res->body.data : "", res->body.len, &c, err,
                            sizeof(err)) < 0) {
        job_finish(job, JOB_OUT_RETRY, "protocol", "commit: bad answer from cloud: %s", err);
        return;
    }
    switch (c.result) {
    case PROTO_COMMIT_STORED:
        CMN_LOG_I("upload", "stored sop=%s sha256=%s size=%llu kind=%s priority=%d id=%lld",
                  job->item.sop_uid, job->item.up_sha256, (unsigned long long)job->item.up_size,
                  job->item.up_kind, job->item.priority, (long long)job->item.id);
        break;
    case PROTO_COMMIT_DUPLICATE:
        CMN_LOG_I("upload", "duplicate sop=%s sha256=%s (already archived) id=%lld",
                  job->item.sop_uid, job->item.up_sha256, (long long)job->item.id);
        break;
    case PROTO_COMMIT_CONFLICT:
        CMN_LOG_W("upload", "conflict sop=%s sha256=%s: the cloud holds different bytes for this "
                  "SOP Instance UID; kept aside there id=%lld", job->item.sop_uid,
                  job->item.up_sha256, (long long)job->item.id);
        break;
    case PROTO_COMMIT_REJECTED:   /* not decoded for single instances */
        break;
    }
    job_finish(job, JOB_OUT_DONE, NULL, NULL);
}

/* Runs the current state's action. */
static void job_step(edge_job_t *job)
{
    edge_upload_t *up = job->up;
    char rel[300], extra[128];
    int rc = 0;

    switch (job->state) {
    case EDGE_JOB_HASHING:
        if (job->manifest)
            queue(job, manifest_list_work);
        else
            hash_enqueue(job);
        return;

    case EDGE_JOB_DECLARING: {
        proto_object_decl_t d;
        memset(&d, 0, sizeof(d));
        d.kind = job->bundle ? PROTO_KIND_BUNDLE : PROTO_KIND_INSTANCE;
        snprintf(d.sha256, sizeof(d.sha256), "%s", job->obj_sha);
        d.size = job->obj_size;
        d.chunk_size = chunk_size_for(up);
        snprintf(d.study_uid, sizeof(d.study_uid), "%s", job->item.study_uid);
        if (job->bundle) {
            d.members = (uint32_t)job->nmembers;
        } else {
            snprintf(d.series_uid, sizeof(d.series_uid), "%s", job->item.series_uid);
            snprintf(d.sop_uid, sizeof(d.sop_uid), "%s", job->item.sop_uid);
        }
        char *json = proto_object_decl_encode(&d);
        if (!json) {
            job_finish(job, JOB_OUT_RETRY, "local", "declare: out of memory");
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
        job->chunk_len = proto_chunk_len(job->obj_size, job->chunk_size, job->next_chunk);
        if (!job->chunk) {
            job->chunk = cmn_try_malloc(job->chunk_size);
            if (!job->chunk) {
                job_finish(job, JOB_OUT_RETRY, "local", "out of memory for a %u-byte chunk",
                           job->chunk_size);
                return;
            }
        }
        queue(job, read_work);
        return;

    case EDGE_JOB_PACING:
        pace_enqueue(job);
        return;

    case EDGE_JOB_SENDING:
        snprintf(rel, sizeof(rel), "/api/v1/objects/%s/chunks/%u", job->object_id,
                 job->next_chunk);
        snprintf(extra, sizeof(extra), "%s: %s", PROTO_H_CHUNK_HASH, job->chunk_sha);
        rc = send_signed(job, "PUT", rel, job->chunk, job->chunk_len, job->chunk_sha,
                         "application/octet-stream", extra, on_chunk);
        break;

    case EDGE_JOB_COMMITTING:
        if (job->manifest) {
            proto_manifest_t m = { .n = (uint32_t)job->mf.n, .e = job->mf.e };
            snprintf(m.study_uid, sizeof(m.study_uid), "%s", job->mf.study_uid);
            char *json = proto_manifest_encode(&m);
            if (!json) {
                CMN_LOG_W("upload", "manifest study=%s: cannot encode", job->mf.study_uid);
                job_finish(job, JOB_OUT_RETRY, NULL, NULL);
                return;
            }
            snprintf(rel, sizeof(rel), "/api/v1/studies/%s/manifest", job->mf.study_uid);
            rc = send_json(job, "POST", rel, json, on_manifest);
            break;
        }
        snprintf(rel, sizeof(rel), "/api/v1/objects/%s/commit", job->object_id);
        /* The cloud parses and archives every member before it answers. */
        if (job->bundle)
            job->next_timeout_ms = (long)up->conf->timeout_ms + 30000 + 200L * job->nmembers;
        rc = send_json(job, "POST", rel, NULL, on_committed);
        if (rc == 0)
            pump(up);   /* its sending slot is free: the next object starts now */
        break;

    case EDGE_JOB_RECORDING:
        queue(job, record_work);
        return;

    case EDGE_JOB_FINISHED:
        if (job->manifest)
            manifest_finished(up, job);
        else
            job_unlink(job);
        job_free(job);
        live_update(up);
        if (up->state == EDGE_UPLOAD_CLOSING)
            maybe_closed(up);
        else
            pump(up);
        return;
    }
    if (rc < 0)
        job_finish(job, JOB_OUT_RETRY, "local", "cannot send request: %s", cmn_strerror(rc));
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

/* Rate limit for retry warnings: during an outage every row retries. */
static bool retry_log_allowed(void)
{
    static uint64_t window_ms;
    static int n;
    uint64_t now = edge__now_ms();

    if (now - window_ms >= 10000) {
        if (n > 20)
            CMN_LOG_W("upload", "%d more retry warning(s) suppressed in the last 10 s", n - 20);
        window_ms = now;
        n = 0;
    }
    return ++n <= 20;
}

static void job_finish(edge_job_t *job, job_outcome_t out, const char *kind, const char *fmt, ...)
{
    job->outcome = out;
    job->errmsg[0] = '\0';
    snprintf(job->errkind, sizeof(job->errkind), "%s", kind ? kind : "");
    if (fmt) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(job->errmsg, sizeof(job->errmsg), fmt, ap);
        va_end(ap);
    }
    if (job->manifest) {
        /* manifest_finished decides when to look again */
    } else if (out == JOB_OUT_RETRY) {
        int64_t d = backoff_ms(job->up->conf, job->item.attempts + 1);
        job->next_at_ms = edge__wall_ms() + d;
        if (retry_log_allowed())
            CMN_LOG_W("upload", "retry in %lld ms sop=%s id=%lld attempt=%d kind=%s: %s",
                      (long long)d, job->item.sop_uid, (long long)job->item.id,
                      job->item.attempts + 1, job->errkind, job->errmsg);
    } else if (out == JOB_OUT_FAILED) {
        CMN_LOG_E("upload", "giving up sop=%s id=%lld: %s", job->item.sop_uid,
                  (long long)job->item.id, job->errmsg);
    } else if (out == JOB_OUT_RELEASE || out == JOB_OUT_REPREPARE) {
        CMN_LOG_D("upload", "released sop=%s id=%lld: %s", job->item.sop_uid,
                  (long long)job->item.id, job->errmsg);
    }
    job_set_state(job, EDGE_JOB_RECORDING);
    job_step(job);
}

/* ------------------------------------------------------------ prepare */

/* Makes a transcoded temporary file durable as <original's name>.jls.dcm. */
static int adopt_jpegls(prep_t *p, const char *tmp, char *final, size_t flen, char *sha,
                        uint64_t *size)
{
    char dir[4200];
    int fd, rc = 0;

    fd = open(tmp, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    if (fsync(fd) < 0)
        rc = -errno;
    close(fd);
    if (rc < 0)
        return rc;
    if ((rc = hash_into(tmp, NULL, sha, size)) < 0)
        return rc;
    /* Next to the original: objects/<name>.dcm -> objects/<name>.jls.dcm. */
    snprintf(dir, sizeof(dir), "%s", p->item.path);
    char *slash = strrchr(dir, '/');
    if (!slash)
        return CMN_EINTERNAL;
    *slash = '\0';
    const char *base = slash + 1;
    if ((size_t)snprintf(final, flen, "%s/%.*s.jls.dcm", dir, (int)strcspn(base, "."), base) >=
        flen)
        return -ENAMETOOLONG;
    if (rename(tmp, final) < 0)
        return -errno;
    fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    if (fsync(fd) < 0)
        rc = -errno;
    close(fd);
    return rc;
}

/* How long a preparation waits for an object file the spool is writing. */
#define PREP_OBJECT_WAIT_MS 1000

static void prep_work(uv_work_t *w)
{
    prep_t *p = container_of(w, prep_t, work);
    edge_spool_t *sp = p->up->spool;
    char tmp[4200], final[4200], sha[PROTO_HEX256 + 1];
    uint64_t size = 0;
    int rc;

    p->compressed = false;
    p->unwritten = false;
    p->err[0] = '\0';
    memset(&p->stats, 0, sizeof(p->stats));
    /* An instance kept in memory at receipt has its file written just after
     * its acknowledgement: wait for it, briefly. When the disk refuses the
     * write (retried every second) the row waits: the spool's writer wakes
     * the upload once it writes again, and nothing holds this thread. */
    if ((p->rc = edge_spool_object_wait(sp, p->item.path, PREP_OBJECT_WAIT_MS)) < 0) {
        p->unwritten = true;
        return;
    }
    if (p->up->conf->compress && edge_spool_tmp_path(sp, tmp, sizeof(tmp)) == 0) {
        rc = cmn_dicom_to_jpegls(p->item.path, tmp, &p->stats, p->err, sizeof(p->err));
        if (rc == 0) {
            rc = adopt_jpegls(p, tmp, final, sizeof(final), sha, &size);
            if (rc == 0) {
                p->rc = edge_spool_set_upload_file(sp, p->item.id, final, sha, size, "jpegls");
                p->compressed = p->rc == 0;
                return;
            }
            snprintf(p->err, sizeof(p->err), "cannot keep the transcoded file: %s",
                     cmn_strerror(rc));
            unlink(tmp);
        } else if (rc < 0) {
            unlink(tmp);
        }
        /* Skipped or failed: the original goes up as received. */
    }
    /* Its SHA-256 (the object's name in the protocol) is computed now: at
     * receipt only the cheap checksum is taken. The upload checks the
     * file against that checksum before sending. */
    snprintf(sha, sizeof(sha), "%s", p->item.sha256);
    if (!sha[0] && hash_into(p->item.path, NULL, sha, &size) < 0)
        sha[0] = '\0';   /* unreadable: recorded anyway, so the upload's check settles it */
    p->rc = edge_spool_set_upload_file(sp, p->item.id, p->item.path, sha, p->item.size,
                                       "original");
}

static void prep_done(uv_work_t *w, int status)
{
    prep_t *p = container_of(w, prep_t, work);
    edge_upload_t *up = p->up;

    (void)status;
    up->prep_inflight--;
    if (p->unwritten) {
        /* Every received image may list it again while the disk refuses
         * writes: one line per 10 s says so. */
        if (up->unwritten_log_ms == 0 || edge__now_ms() - up->unwritten_log_ms >= 10000u) {
            CMN_LOG_W("upload", "id=%lld sop=%s waits for its object file (the spool's writer"
                      " retries it; %d more such waits since the last line)",
                      (long long)p->item.id, p->item.sop_uid, up->unwritten_quiet);
            up->unwritten_log_ms = edge__now_ms();
            up->unwritten_quiet = 0;
        } else {
            up->unwritten_quiet++;
        }
    } else if (p->rc < 0)
        CMN_LOG_E("upload", "cannot record the prepared file id=%lld: %s", (long long)p->item.id,
                  cmn_strerror(p->rc));
    else if (p->compressed)
        CMN_LOG_D("upload", "jpegls sop=%s id=%lld %llu -> %llu bytes in %llu us",
                  p->item.sop_uid, (long long)p->item.id,
                  (unsigned long long)p->stats.file_bytes_in,
                  (unsigned long long)p->stats.file_bytes_out, (unsigned long long)p->stats.usec);
    else if (up->conf->compress && p->err[0])
        CMN_LOG_D("upload", "sending original sop=%s id=%lld: %s", p->item.sop_uid,
                  (long long)p->item.id, p->err);
    pthread_mutex_lock(&up->live_mu);
    if (p->compressed) {
        up->live.jpegls_files++;
        up->live.jpegls_bytes_in += p->stats.file_bytes_in;
        up->live.jpegls_bytes_out += p->stats.file_bytes_out;
        up->live.jpegls_usec += p->stats.usec;
    } else if (p->rc == 0) {
        up->live.originals++;
    }
    pthread_mutex_unlock(&up->live_mu);
    if (up->state == EDGE_UPLOAD_CLOSING) {
        maybe_closed(up);
        return;
    }
    pump(up);
    if (up->prep_inflight == 0) {
        /* A failed record would be listed again at once: wait for a wake. */
        bool failed = p->rc < 0;
        if (!failed || up->prep_again) {
            up->prep_again = false;
            prep_pump(up);
        }
    }
    live_update(up);
}

static void prep_list_work(uv_work_t *w)
{
    edge_upload_t *up = container_of(w, edge_upload_t, prep_list_work);
    edge_spool_item_t *items = cmn_xcalloc((size_t)up->conf->compress_parallel, sizeof(*items));

    up->prep_list_rc = edge_spool_list_unprepared(up->spool, items, (int)up->conf->compress_parallel,
                                                  &up->prep_n);
    for (int i = 0; i < up->prep_n; i++)
        up->preps[i].item = items[i];
    free(items);
}

static void prep_list_done(uv_work_t *w, int status)
{
    edge_upload_t *up = container_of(w, edge_upload_t, prep_list_work);

    up->prep_listing = false;
    if (up->state == EDGE_UPLOAD_CLOSING) {
        maybe_closed(up);
        return;
    }
    if (status < 0 || up->prep_list_rc < 0) {
        CMN_LOG_E("upload", "listing rows to prepare failed");
        return;
    }
    up->prep_again = false;
    for (int i = 0; i < up->prep_n; i++) {
        prep_t *p = &up->preps[i];
        p->up = up;
        if (uv_queue_work(up->loop, &p->work, prep_work, prep_done) == 0)
            up->prep_inflight++;
    }
    live_update(up);
}

/* Starts a batch of preparations unless one is running. */
static void prep_pump(edge_upload_t *up)
{
    if (up->state == EDGE_UPLOAD_CLOSING)
        return;
    if (up->prep_listing || up->prep_inflight > 0) {
        up->prep_again = true;
        return;
    }
    up->prep_listing = true;
    up->prep_n = 0;
    if (uv_queue_work(up->loop, &up->prep_list_work, prep_list_work, prep_list_done) < 0)
        up->prep_listing = false;
}

/* ------------------------------------------------------------ worker */

/*
 * Objects the worker may claim now. upload.parallel of them send at once
 * (sending slots, pace_run) and UPLOAD_AHEAD more are hashed, declared and
 * have their first chunk read, so that a freed slot is used at once. One
 * whose last chunk is sent only waits for the cloud's commit (parsing and
 * archiving every member): it gives its slot to the next object, so the
 * link stays busy through commits; up to upload.parallel such jobs (each
 * holds an HTTP connection).
 */
static int free_slots(const edge_upload_t *up)
{
    int par = (int)up->conf->parallel;
    int want = par + UPLOAD_AHEAD - (up->njobs - up->ncommitting);
    int room = 2 * par + UPLOAD_AHEAD - up->njobs;

    return want < room ? want : room;
}

static void on_token_prefetched(int status, const char *why, void *ud)
{
    edge_upload_t *up = ud;

    up->token_prefetch = false;
    if (status < 0 && status != -ECANCELED)
        CMN_LOG_D("upload", "token prefetch: %s", why ? why : cmn_strerror(status));
}

/* Jobs were claimed: get a token now (and so a connection to the cloud),
 * while they hash, rather than when the first of them declares. */
static void token_prefetch(edge_upload_t *up)
{
    proto_token_t tok;

    if (up->token_prefetch || !up->token)
        return;
    if (edge_token_current(up->token, &tok) == 0) {
        wipe(&tok, sizeof(tok));
        return;
    }
    if (edge_token_wait(up->token, on_token_prefetched, up) == 0)
        up->token_prefetch = true;
}

/* Claims up to claim_max upload groups (a bundle, or one instance). */
static void claim_work(uv_work_t *w)
{
    edge_upload_t *up = container_of(w, edge_upload_t, claim_work);
    const edge_conf_upload_t *c = up->conf;
    int maxc = c->bundle_max_bytes > 0 ? (int)c->bundle_max_count : 1;
    uint64_t small = (uint64_t)c->bundle_max_bytes / 4;

    up->claim_rc = 0;
    up->claim_n = 0;
    for (int i = 0; i < up->claim_max; i++) {
        edge_spool_item_t *items = cmn_xcalloc((size_t)maxc, sizeof(*items));
        int n = 0;
        int rc = edge_spool_claim_group(up->spool, edge__wall_ms(), small, maxc,
                                        (uint64_t)c->bundle_max_bytes, items, &n,
                                        &up->claim_next_due);
        if (rc < 0 || n == 0) {
            free(items);
            up->claim_rc = rc;
            break;
        }
        up->claimed[i] = items;
        up->claimed_n[i] = n;
        up->claim_n++;
    }
}

static void manifest_check(edge_upload_t *up);

/* Rows became DONE: look for due study manifests for a while. */
static void manifest_poke(edge_upload_t *up)
{
    const edge_conf_upload_t *c = up->conf;

    if (c->manifest_quiet_ms < 0)
        return;
    up->manifest_until_ms = edge__now_ms() + (uint64_t)c->manifest_quiet_ms + 3000;
    manifest_check(up);
}

static void on_manifest_timer(uv_timer_t *t)
{
    edge_upload_t *up = container_of(t, edge_upload_t, manifest_timer);
    manifest_check(up);
}

/* Starts a manifest job when one is due to look (one at a time). */
static void manifest_check(edge_upload_t *up)
{
    uint64_t now = edge__now_ms();

    if (up->state == EDGE_UPLOAD_CLOSING || up->manifest_job || up->conf->manifest_quiet_ms < 0 ||
        now >= up->manifest_until_ms || !up->sched_now.open)
        return;
    if (now < up->manifest_next_ms) {
        uv_timer_start(&up->manifest_timer, on_manifest_timer, up->manifest_next_ms - now, 0);
        return;
    }
    edge_job_t *job = cmn_xcalloc(1, sizeof(*job));
    job->up = up;
    job->manifest = true;
    job->state = EDGE_JOB_HASHING;
    snprintf(job->item.sop_uid, sizeof(job->item.sop_uid), "manifest");
    up->manifest_job = job;
    job_step(job);
}

/* The manifest job is done: look again at once after a sent manifest,
 * later after nothing was due or a failure. */
static void manifest_finished(edge_upload_t *up, edge_job_t *job)
{
    int64_t q = up->conf->manifest_quiet_ms;
    uint64_t now = edge__now_ms(), d;

    up->manifest_job = NULL;
    if (up->state == EDGE_UPLOAD_CLOSING)
        return;
    if (job->outcome == JOB_OUT_DONE && job->mf.study_uid[0])
        d = 0;
    else if (job->outcome == JOB_OUT_RETRY && job->mf.study_uid[0])
        d = (uint64_t)up->conf->retry_min_ms;
    else
        d = (uint64_t)(q / 4 < 50 ? 50 : q / 4 > 1000 ? 1000 : q / 4);
    if (job->outcome == JOB_OUT_RETRY && job->mf.study_uid[0])
        up->manifest_until_ms = now + (uint64_t)q + 3000 + d;   /* keep trying */
    up->manifest_next_ms = now + d;
    uv_timer_start(&up->manifest_timer, on_manifest_timer, d, 0);
}

/* Re-checks the schedule at the next change (at most a minute away, so a
 * changed wall clock is noticed too). */
static void arm_schedule_timer(edge_upload_t *up)
{
    int64_t d = up->sched_now.change_in_ms;
    if (d < 0 || d > 60000)
        d = 60000;
    uv_timer_start(&up->timer, on_timer, (uint64_t)d + 1, 0);
}

static void claim_done(uv_work_t *w, int status)
{
    edge_upload_t *up = container_of(w, edge_upload_t, claim_work);

    up->claiming = false;
    if (up->state == EDGE_UPLOAD_CLOSING) {
        /* Claimed rows stay UPLOADING; the next start recovers them. */
        for (int i = 0; i < up->claim_n; i++) {
            free(up->claimed[i]);
            up->claimed[i] = NULL;
        }
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
        job->members = up->claimed[i];
        job->nmembers = up->claimed_n[i];
        up->claimed[i] = NULL;
        job->bundle = job->nmembers > 1;
        job->item = job->members[0];
        job->next = up->jobs;
        up->jobs = job;
        up->njobs++;
        CMN_LOG_D("upload", "claimed id=%lld sop=%s members=%d attempts=%d priority=%d",
                  (long long)job->item.id, job->item.sop_uid, job->nmembers, job->item.attempts,
                  job->item.priority);
        job_step(job);
    }
    if (up->claim_n > 0)
        token_prefetch(up);
    live_update(up);
    int nfree = free_slots(up);
    if (up->pump_again && nfree > 0) {
        up->pump_again = false;
        pump(up);
        return;
    }
    up->pump_again = false;
    if (status < 0 || up->claim_rc < 0) {
        uv_timer_start(&up->timer, on_timer, 1000, 0);
    } else if (up->claim_next_due >= 0 && nfree > 0) {
        int64_t d = up->claim_next_due - edge__wall_ms();
        if (edge__clock_is_fake() && d > 50)
            d = 50;   /* the fake clock moves without us: poll it */
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
    sched_eval(up);
    if (!up->sched_now.open) {
        /* Jobs waiting for tokens or a slot go back to the spool too. */
        if (up->pace_head || up->slot_head)
            pace_run(up);
        arm_schedule_timer(up);
        return;
    }
    if (up->pace_head || up->slot_head)
        pace_run(up);
    int nfree = free_slots(up);
    if (nfree <= 0)
        return;
    up->state = EDGE_UPLOAD_CLAIMING;
    up->claim_max = nfree;
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
    prep_pump(up);
    pump(up);
    if (edge__clock_is_fake())
        cache_kick(up);               /* tests move the clock: the cache follows at once */
}

/* ------------------------------------------------------------ hot cache */

static void cache_work_fn(uv_work_t *w)
{
    edge_upload_t *up = container_of(w, edge_upload_t, cache_work);
    up->cache_now = edge__wall_ms();
    up->cache_rc = edge_spool_evict(up->spool, up->cache_now, &up->cache_res);
}

static void cache_done(uv_work_t *w, int status)
{
    edge_upload_t *up = container_of(w, edge_upload_t, cache_work);
    const edge_spool_evicted_t *r = &up->cache_res;

    (void)status;
    up->caching = false;
    pthread_mutex_lock(&up->live_mu);
    up->live.cache_pass_ms = up->cache_now;
    pthread_mutex_unlock(&up->live_mu);
    if (up->cache_rc < 0)
        CMN_LOG_E("upload", "hot cache: pass failed: %s", cmn_strerror(up->cache_rc));
    if (r->aged + r->early > 0)
        CMN_LOG_I("upload", "hot cache: %d uploaded instance(s) left the spool (%d past"
                  " spool.keep_days, %d early for disk space), %.1f MiB freed", r->aged + r->early,
                  r->aged, r->early, (double)r->bytes / 1048576.0);
    if (r->still_short && edge__now_ms() - up->cache_short_log_ms >= 600000u) {
        up->cache_short_log_ms = edge__now_ms();
        CMN_LOG_W("upload", "hot cache: the spool's disk has less than spool.min_free_mb +"
                  " spool.evict_headroom_mb free and no image uploaded over 10 minutes ago is"
                  " left to remove");
    }
    if (up->state == EDGE_UPLOAD_CLOSING) {
        maybe_closed(up);
        return;
    }
    if (up->cache_again)
        cache_kick(up);
}

/* One pass of the hot cache's policy on the threadpool; one more after the
 * running one, if one runs (its time may be older than the caller's). */
static void cache_kick(edge_upload_t *up)
{
    if (up->state == EDGE_UPLOAD_CLOSING)
        return;
    if (up->caching) {
        up->cache_again = true;
        return;
    }
    up->cache_again = false;
    if (uv_queue_work(up->loop, &up->cache_work, cache_work_fn, cache_done) == 0)
        up->caching = true;
}

static void on_cache_timer(uv_timer_t *t)
{
    cache_kick(container_of(t, edge_upload_t, cache_timer));
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

void edge_upload_set_schedule(edge_upload_t *up, const edge_schedule_t *s)
{
    up->sched = *s;
    sched_eval(up);
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
    uint8_t secret[128];
    size_t secret_len = 0;
    int rc;

    *out = NULL;
    up->loop = loop;
    up->conf = conf;
    up->spool = spool;
    up->state = EDGE_UPLOAD_IDLE;
    pthread_mutex_init(&up->live_mu, NULL);
    edge_schedule_init(&up->sched);
    rc = edge__upload_load_secret(conf->secret_file, secret, sizeof(secret), &secret_len, err,
                                  errlen);
    if (rc < 0)
        goto out_free;
    rc = split_url(up, conf->cloud_url);
    if (rc < 0) {
        snprintf(err, errlen, "upload.cloud_url: too long");
        goto out_free;
    }
    up->claimed = cmn_xcalloc((size_t)conf->parallel + UPLOAD_AHEAD, sizeof(*up->claimed));
    up->claimed_n = cmn_xcalloc((size_t)conf->parallel + UPLOAD_AHEAD, sizeof(*up->claimed_n));
    up->hash_max = (int)uv_available_parallelism();
    if (up->hash_max > (int)conf->parallel)
        up->hash_max = (int)conf->parallel;
    if (up->hash_max < 1)
        up->hash_max = 1;
    /* requests at once: declares ahead, sends, commits (free_slots), the token */
    rc = cmn_http_client_create(loop, 2 * (int)conf->parallel + UPLOAD_AHEAD + 1, &up->http);
    if (rc < 0) {
        snprintf(err, errlen, "HTTP client: %s", cmn_strerror(rc));
        goto out_free_claimed;
    }
    /* The secret lives only in the token keeper: it signs token requests. */
    edge_token_opts_t to = {
        .base_url = up->base_url,
        .path_prefix = up->path_prefix,
        .edge_id = conf->edge_id,
        .secret = secret,
        .secret_len = secret_len,
        .timeout_ms = (long)conf->timeout_ms,
        .ca_file = conf->ca_file,
        .pinned_pubkey = conf->pinned_pubkey,
        .proxy = conf->proxy,
        .client_cert_file = conf->client_cert_file,
        .client_key_file = conf->client_key_file,
    };
    rc = edge_token_create(up->http, &to, &up->token);
    wipe(secret, sizeof(secret));
    if (rc < 0) {
        snprintf(err, errlen, "token: %s", cmn_strerror(rc));
        cmn_http_client_destroy(up->http);
        goto out_free_claimed;
    }
    uv_async_init(loop, &up->wake, on_wake);
    uv_timer_init(loop, &up->timer);
    uv_timer_init(loop, &up->pace_timer);
    uv_timer_init(loop, &up->manifest_timer);
    uv_timer_init(loop, &up->cache_timer);
    up->handles_open = 5;
    up->preps = cmn_xcalloc((size_t)conf->compress_parallel, sizeof(*up->preps));
    *out = up;
    /* First pump from the loop, after the caller set the schedule. */
    uv_timer_start(&up->timer, on_timer, 0, 0);
    prep_pump(up);
    /* Studies finished before a restart get their manifest too. */
    if (conf->manifest_quiet_ms >= 0) {
        up->manifest_until_ms = edge__now_ms() + (uint64_t)conf->manifest_quiet_ms + 3000;
        up->manifest_next_ms = edge__now_ms() + 100;
        uv_timer_start(&up->manifest_timer, on_manifest_timer, 100, 0);
    }
    uv_timer_start(&up->cache_timer, on_cache_timer, CACHE_FIRST_MS, CACHE_EVERY_MS);
    return 0;

out_free_claimed:
    free(up->claimed);
    free(up->claimed_n);
out_free:
    wipe(secret, sizeof(secret));
    pthread_mutex_destroy(&up->live_mu);
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
    if (up->handles_open > 0 || up->claiming || up->njobs > 0 || up->prep_listing ||
        up->prep_inflight > 0 || up->manifest_job || up->caching)
        return;
    /* Jobs can only be waiting on the threadpool now; none are left. */
    void (*done)(void *) = up->done;
    void *ud = up->done_ud;
    free(up->claimed);
    free(up->claimed_n);
    free(up->preps);
    pthread_mutex_destroy(&up->live_mu);
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
    uv_timer_stop(&up->pace_timer);
    uv_timer_stop(&up->manifest_timer);
    uv_timer_stop(&up->cache_timer);
    up->wake.data = up;
    up->timer.data = up;
    up->pace_timer.data = up;
    up->manifest_timer.data = up;
    uv_close((uv_handle_t *)&up->wake, on_handle_closed);
    uv_close((uv_handle_t *)&up->timer, on_handle_closed);
    uv_close((uv_handle_t *)&up->pace_timer, on_handle_closed);
    uv_close((uv_handle_t *)&up->manifest_timer, on_handle_closed);
    up->cache_timer.data = up;
    uv_close((uv_handle_t *)&up->cache_timer, on_handle_closed);
    /* Jobs waiting for tokens have nothing in flight: finish them (their
     * rows stay UPLOADING and are recovered at the next start). */
    while (up->pace_head) {
        edge_job_t *job = up->pace_head;
        pace_pop(up, job);
        job_set_state(job, EDGE_JOB_FINISHED);
        job_step(job);
    }
    while (up->slot_head) {
        edge_job_t *job = slot_pop(up);
        job_set_state(job, EDGE_JOB_FINISHED);
        job_step(job);
    }
    /* So have jobs waiting to hash. */
    while (up->hash_head) {
        edge_job_t *job = up->hash_head;
        up->hash_head = job->hash_next;
        if (!up->hash_head)
            up->hash_tail = NULL;
        job_set_state(job, EDGE_JOB_FINISHED);
        job_step(job);
    }
    /* Jobs waiting for a token fail now; the token keeper frees itself
     * (and wipes the secret) once its own request is cancelled below. */
    edge_token_close(up->token);
    up->token = NULL;
    /* Cancels HTTP requests: their callbacks finish the jobs (rows stay
     * UPLOADING). Jobs in the threadpool finish in after_work. */
    cmn_http_client_destroy(up->http);
    up->http = NULL;
}
