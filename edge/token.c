/*
 * token.c - obtains, caches and rotates the edge's dynamic token (token.h).
 */
#include "token.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cmn/crypto.h"
#include "cmn/errors.h"
#include "cmn/log.h"


typedef enum {
    TOKEN_IDLE,                  /* nothing usable */
    TOKEN_FETCHING,              /* POST /api/v1/token in flight */
    TOKEN_READY,                 /* tok is usable until use_until_ms */
    TOKEN_CLOSED,                /* freed when the fetch in flight ends */
} token_state_t;

typedef struct waiter {
    void (*cb)(int status, const char *why, void *ud);
    void *ud;
    struct waiter *next;
} waiter_t;

struct edge_token {
    cmn_http_client_t *http;     /* not owned */
    token_state_t state;
    char *base_url;              /* owned */
    char *path;                  /* owned: prefix + PROTO_TOKEN_PATH */
    char *edge_id;               /* owned */
    uint8_t secret[128];         /* wiped at close */
    size_t secret_len;
    long timeout_ms;
    const char *ca_file, *pinned_pubkey, *client_cert_file, *client_key_file, *proxy;
    proto_token_t tok;           /* valid in READY; wiped when dropped */
    uint64_t use_until_ms;       /* monotonic: rotate after this */
    char *body;                  /* owned: token request body, held until the answer */
    int64_t body_ts;             /* the timestamp the token request was signed with */
    int64_t body_offset;         /* offset_s then */
    bool skew_resent;            /* this fetch is the re-sent one after clock_skew */
    int64_t offset_s;            /* cloud clock minus ours, learnt from clock_skew */
    int64_t seen_s;              /* cloud clock minus ours, from the last Date header */
    bool seen;
    char *test_skew_file;        /* YY_EDGE_TEST_SKEW_FILE (tests): seconds our clock is made wrong by */
    waiter_t *waiters;           /* callers waiting for FETCHING to end; order does not matter */
};

/* Token lifetimes are real time whatever the edge's (possibly fake, see
 * internal.h) clock says: the cloud measures them in real seconds. */
static uint64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static void wipe(void *p, size_t n)
{
    volatile unsigned char *v = p;
    while (n--)
        *v++ = 0;
}

static const char *state_name(token_state_t s)
{
    static const char *const names[] = {"IDLE", "FETCHING", "READY", "CLOSED"};
    return (unsigned)s < CMN_ARRAY_SIZE(names) ? names[s] : "?";
}

static void set_state(edge_token_t *t, token_state_t to)
{
    CMN_LOG_D("upload", "token %s -> %s", state_name(t->state), state_name(to));
    if (to != TOKEN_READY) {
        wipe(&t->tok, sizeof(t->tok));
        t->use_until_ms = 0;
    }
    t->state = to;
}

static void token_free(edge_token_t *t)
{
    wipe(t->secret, sizeof(t->secret));
    wipe(&t->tok, sizeof(t->tok));
    free(t->base_url);
    free(t->path);
    free(t->edge_id);
    free(t->body);
    free(t->test_skew_file);
    free(t);
}

int edge_token_create(cmn_http_client_t *http, const edge_token_opts_t *o, edge_token_t **out)
{
    edge_token_t *t;
    size_t n;

    *out = NULL;
    if (!http || !o->base_url || !o->edge_id || !o->secret || o->secret_len == 0 ||
        o->secret_len > sizeof(t->secret))
        return -EINVAL;
    t = cmn_xcalloc(1, sizeof(*t));
    t->http = http;
    t->state = TOKEN_IDLE;
    t->base_url = cmn_xstrdup(o->base_url);
    n = strlen(o->path_prefix ? o->path_prefix : "") + sizeof(PROTO_TOKEN_PATH);
    t->path = cmn_xmalloc(n);
    snprintf(t->path, n, "%s%s", o->path_prefix ? o->path_prefix : "", PROTO_TOKEN_PATH);
    t->edge_id = cmn_xstrdup(o->edge_id);
    memcpy(t->secret, o->secret, o->secret_len);
    t->secret_len = o->secret_len;
    t->timeout_ms = o->timeout_ms;
    t->ca_file = o->ca_file && *o->ca_file ? o->ca_file : NULL;
    t->pinned_pubkey = o->pinned_pubkey && *o->pinned_pubkey ? o->pinned_pubkey : NULL;
    t->proxy = o->proxy && *o->proxy ? o->proxy : NULL;
    t->client_cert_file = o->client_cert_file && *o->client_cert_file ? o->client_cert_file : NULL;
    t->client_key_file = o->client_key_file && *o->client_key_file ? o->client_key_file : NULL;
    const char *skew = getenv("YY_EDGE_TEST_SKEW_FILE");
    if (skew && *skew) {
        t->test_skew_file = cmn_xstrdup(skew);
        CMN_LOG_W("upload", "YY_EDGE_TEST_SKEW_FILE is set: the edge's clock is made wrong by the"
                  " seconds that file holds (tests only)");
    }
    *out = t;
    return 0;
}

/* Tests: the seconds in YY_EDGE_TEST_SKEW_FILE, read at each signature so
 * that a test can move the edge's clock while it runs. */
static int64_t test_skew(const edge_token_t *t)
{
    long long s = 0;
    FILE *f;

    if (!t->test_skew_file || !(f = fopen(t->test_skew_file, "r")))
        return 0;
    if (fscanf(f, "%lld", &s) != 1)
        s = 0;
    fclose(f);
    return (int64_t)s;
}

int64_t edge_token_time(const edge_token_t *t)
{
    return (int64_t)time(NULL) + test_skew(t) + t->offset_s;
}

int64_t edge_token_clock_offset(const edge_token_t *t)
{
    return t->offset_s;
}

void edge_token_clock_seen(edge_token_t *t, int64_t cloud_date)
{
    if (cloud_date <= 0)
        return;
    t->seen_s = cloud_date - ((int64_t)time(NULL) + test_skew(t));
    t->seen = true;
}

int64_t edge_token_clock_diff(const edge_token_t *t)
{
    return t->seen ? t->seen_s : t->offset_s;
}

bool edge_token_clock_skew(edge_token_t *t, int64_t signed_at, int64_t offset_at,
                           int64_t server_time)
{
    /* The answer left the cloud just after the request was signed: the
     * cloud's time minus our clock then is the difference, give or take
     * the round trip (seconds here; the window is minutes). Absolute, so
     * answers to requests signed before the last lesson agree with it. */
    int64_t offset = server_time - (signed_at - offset_at);

    if (server_time <= 0)
        return false;
    if (offset - t->offset_s > 1 || t->offset_s - offset > 1)
        CMN_LOG_W("upload", "the cloud's clock differs from the edge's by %+lld s: signing with"
                  " the cloud's time (check the edge's time synchronisation)", (long long)offset);
    t->offset_s = offset;
    return true;
}

int edge_token_current(edge_token_t *t, proto_token_t *out)
{
    if (t->state == TOKEN_READY && mono_ms() >= t->use_until_ms) {
        CMN_LOG_I("upload", "token near expiry: rotating");
        set_state(t, TOKEN_IDLE);
    }
    if (t->state != TOKEN_READY)
        return CMN_ENOTFOUND;
    *out = t->tok;
    return 0;
}

void edge_token_invalidate(edge_token_t *t, const char *token_id)
{
    if (t->state != TOKEN_READY)
        return;
    if (token_id && strcmp(token_id, t->tok.token_id) != 0)
        return;   /* an older token; the current one is newer */
    set_state(t, TOKEN_IDLE);
}

/* Runs every waiter once with status (the list is detached first, so a
 * callback may wait again). */
static void notify(edge_token_t *t, int status, const char *why)
{
    waiter_t *w = t->waiters;

    t->waiters = NULL;
    while (w) {
        waiter_t *next = w->next;
        w->cb(status, why, w->ud);
        free(w);
        w = next;
    }
}

static int fetch(edge_token_t *t);

static void on_fetched(const cmn_http_result_t *res, void *ud)
{
    edge_token_t *t = ud;
    char why[200], err[128];
    proto_error_t e;
    int status = 0;

    free(t->body);
    t->body = NULL;
    if (t->state == TOKEN_CLOSED) {
        token_free(t);
        return;
    }
    if (res->err == 0)
        edge_token_clock_seen(t, res->date);
    if (res->err < 0) {
        snprintf(why, sizeof(why), "token: transport: %s",
                 res->errmsg ? res->errmsg : cmn_strerror(res->err));
        status = res->err;
    } else if (res->status != 200) {
        bool decoded = res->body.data && proto_error_decode(res->body.data, res->body.len, &e) == 0;
        if (decoded && res->status == 401 && !strcmp(e.code, "clock_skew") && !t->skew_resent &&
            edge_token_clock_skew(t, t->body_ts, t->body_offset, e.server_time)) {
            /* Once per fetch: a second clock_skew is a failure like any. */
            t->skew_resent = true;
            if (fetch(t) == 0)
                return;
        }
        if (decoded)
            snprintf(why, sizeof(why), "token: HTTP %ld %.31s: %.120s", res->status, e.code,
                     e.message);
        else
            snprintf(why, sizeof(why), "token: HTTP %ld", res->status);
        status = CMN_EAUTH;
    } else if (proto_token_decode(res->body.data ? res->body.data : "", res->body.len, &t->tok,
                                  err, sizeof(err)) < 0) {
        snprintf(why, sizeof(why), "token: bad answer from cloud: %s", err);
        status = CMN_EPROTO;
    }
    t->skew_resent = false;
    if (status < 0) {
        CMN_LOG_W("upload", "%s", why);
        set_state(t, TOKEN_IDLE);
        notify(t, status, why);
        return;
    }
    /* Usable for 80% of its life, counted from now on our clock. */
    uint64_t life_ms = (uint64_t)t->tok.ttl_s * 1000u;
    t->use_until_ms = mono_ms() + life_ms - life_ms / 5;
    set_state(t, TOKEN_READY);
    CMN_LOG_I("upload", "token obtained ttl_s=%lld", (long long)t->tok.ttl_s);
    notify(t, 0, NULL);
}

static int fetch(edge_token_t *t)
{
    char url[2500], nonce[PROTO_NONCE_HEX + 1], sig[PROTO_HEX256 + 1], sha[PROTO_HEX256 + 1];
    char h_ver[64], h_edge[128], h_ts[64], h_nonce[96], h_body[128], h_sig[128];
    uint8_t rnd[PROTO_NONCE_HEX / 2], d[CMN_SHA256_LEN];
    const char *headers[10];
    int nh = 0, rc;

    free(t->body);
    t->body = proto_token_request_encode();
    if (!t->body)
        return -ENOMEM;
    cmn_sha256(t->body, strlen(t->body), d);
    cmn_hex(d, sizeof(d), sha);
    if (cmn_random(rnd, sizeof(rnd)) < 0)
        return CMN_ECRYPTO;
    cmn_hex(rnd, sizeof(rnd), nonce);
    proto_req_t r = {
        .method = "POST",
        .path = t->path,
        .query = "",
        .edge_id = t->edge_id,
        .timestamp = edge_token_time(t),
        .nonce = nonce,
        .body_sha256 = sha,
    };
    rc = proto_sign(t->secret, t->secret_len, &r, sig);
    if (rc < 0)
        return rc;
    t->body_ts = r.timestamp;
    t->body_offset = t->offset_s;
    snprintf(url, sizeof(url), "%s%s", t->base_url, PROTO_TOKEN_PATH);
    snprintf(h_ver, sizeof(h_ver), "%s: %d", PROTO_H_VERSION, PROTO_VERSION);
    snprintf(h_edge, sizeof(h_edge), "%s: %s", PROTO_H_EDGE, t->edge_id);
    snprintf(h_ts, sizeof(h_ts), "%s: %lld", PROTO_H_TIMESTAMP, (long long)r.timestamp);
    snprintf(h_nonce, sizeof(h_nonce), "%s: %s", PROTO_H_NONCE, nonce);
    snprintf(h_body, sizeof(h_body), "%s: %s", PROTO_H_BODY_HASH, sha);
    snprintf(h_sig, sizeof(h_sig), "%s: %s", PROTO_H_SIGNATURE, sig);
    headers[nh++] = h_ver;
    headers[nh++] = h_edge;
    headers[nh++] = h_ts;
    headers[nh++] = h_nonce;
    headers[nh++] = h_body;
    headers[nh++] = h_sig;
    headers[nh++] = "Content-Type: application/json";
    headers[nh++] = "Expect:";
    headers[nh] = NULL;

    cmn_http_client_req_t req = {
        .method = "POST",
        .url = url,
        .headers = headers,
        .body = t->body,
        .body_len = strlen(t->body),
        .timeout_ms = t->timeout_ms,
        .max_response = 16 << 10,
        .ca_file = t->ca_file,
        .pinned_pubkey = t->pinned_pubkey,
        .proxy = t->proxy,
        .client_cert_file = t->client_cert_file,
        .client_key_file = t->client_key_file,
    };
    rc = cmn_http_client_send(t->http, &req, on_fetched, t);
    wipe(h_sig, sizeof(h_sig));
    wipe(sig, sizeof(sig));
    return rc;
}

int edge_token_wait(edge_token_t *t, void (*cb)(int status, const char *why, void *ud), void *ud)
{
    waiter_t *w;
    int rc;

    if (t->state == TOKEN_CLOSED)
        return -ECANCELED;
    /* READY: callers check edge_token_current first, so a wait means they
     * want another token; fetch one like from IDLE (cb must run later). */
    if (t->state == TOKEN_IDLE || t->state == TOKEN_READY) {
        rc = fetch(t);
        if (rc < 0) {
            free(t->body);
            t->body = NULL;
            return rc;
        }
        set_state(t, TOKEN_FETCHING);
    }
    w = cmn_xmalloc(sizeof(*w));
    w->cb = cb;
    w->ud = ud;
    w->next = t->waiters;
    t->waiters = w;
    return 0;
}

void edge_token_close(edge_token_t *t)
{
    if (!t || t->state == TOKEN_CLOSED)
        return;
    bool fetching = t->state == TOKEN_FETCHING;
    set_state(t, TOKEN_CLOSED);
    wipe(t->secret, sizeof(t->secret));
    notify(t, -ECANCELED, "cancelled");
    if (!fetching)
        token_free(t);
}
