/*
 * cmn_http_client.c - HTTP client: libcurl multi driven by the libuv loop.
 *
 * curl tells us which sockets to watch (CURLMOPT_SOCKETFUNCTION) and when to
 * time out (CURLMOPT_TIMERFUNCTION); we watch them with one uv_poll_t per
 * socket and one uv_timer_t, and hand events back with
 * curl_multi_socket_action(). Finished transfers are collected from
 * curl_multi_info_read() and reported to their callbacks. The multi handle
 * lives as long as the client, so connections are kept alive and reused.
 *
 * Lifetime: the client is freed when it is destroyed and every handle it
 * owns (timer, poll handles) has delivered its close callback. A destroy
 * requested from inside a result callback is carried out when that callback
 * returns (never free inside our own callback).
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <curl/curl.h>

#include "cmn/errors.h"
#include "cmn/http.h"
#include "cmn/log.h"

#define SUBSYS "http"

#define DEFAULT_TIMEOUT_MS  60000L
#define DEFAULT_CONNECT_MS  10000L
#define DEFAULT_MAX_RESP    (16u * 1024 * 1024)
#define DEFAULT_MAX_CONNS   16

typedef struct sock_ctx sock_ctx_t;
typedef struct creq creq_t;

struct sock_ctx {
    uv_poll_t poll;
    curl_socket_t fd;
    cmn_http_client_t *cl;
    sock_ctx_t *prev, *next;   /* cl->socks */
};

struct creq {
    CURL *easy;
    cmn_http_client_t *cl;
    creq_t *prev, *next;       /* cl->reqs */
    struct curl_slist *hdrs;   /* owned */
    cmn_http_client_cb cb;
    void *ud;
    cmn_buf_t body;            /* response body, capped */
    bool overflow;             /* the cap was hit */
    char errbuf[CURL_ERROR_SIZE];
};

struct cmn_http_client {
    uv_loop_t *loop;
    CURLM *multi;
    uv_timer_t timer;
    creq_t *reqs;              /* requests in flight */
    int npending;
    sock_ctx_t *socks;         /* live poll contexts */
    int open_handles;          /* handles not yet closed (timer + polls) */
    int cb_depth;              /* > 0 while result callbacks run */
    bool destroying;
    bool freed_multi;
};

static void client_check_done(cmn_http_client_t *cl);
static void client_teardown(cmn_http_client_t *cl);

/* ------------------------------------------------------------ results */

static int map_curl_error(CURLcode rc, bool overflow)
{
    switch (rc) {
    case CURLE_OK: return 0;
    case CURLE_WRITE_ERROR: return overflow ? CMN_ETOOBIG : CMN_EHTTP;
    case CURLE_FILESIZE_EXCEEDED: return CMN_ETOOBIG;
    case CURLE_OPERATION_TIMEDOUT: return CMN_ETIMEOUT;
    case CURLE_COULDNT_CONNECT:
    case CURLE_PROXY: return -ECONNREFUSED;      /* the proxy refused the tunnel */
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY: return -EHOSTUNREACH;
    case CURLE_OUT_OF_MEMORY: return -ENOMEM;
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
    case CURLE_GOT_NOTHING: return -ECONNRESET;
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CIPHER:
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_SSL_ISSUER_ERROR:
    case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
    case CURLE_SSL_ENGINE_INITFAILED:
    case CURLE_SSL_ENGINE_NOTFOUND:
    case CURLE_SSL_ENGINE_SETFAILED:
    case CURLE_SSL_CRL_BADFILE:
    case CURLE_SSL_SHUTDOWN_FAILED:
    case CURLE_SSL_INVALIDCERTSTATUS:
    case CURLE_SSL_CLIENTCERT:
    case CURLE_USE_SSL_FAILED: return CMN_ECRYPTO;
    case CURLE_UNSUPPORTED_PROTOCOL:
    case CURLE_URL_MALFORMAT: return -EINVAL;
    default: return CMN_EHTTP;
    }
}

static void creq_unlink(creq_t *r)
{
    cmn_http_client_t *cl = r->cl;

    if (r->prev)
        r->prev->next = r->next;
    else
        cl->reqs = r->next;
    if (r->next)
        r->next->prev = r->prev;
    cl->npending--;
}

static void creq_free(creq_t *r)
{
    curl_easy_cleanup(r->easy);
    curl_slist_free_all(r->hdrs);
    cmn_buf_free(&r->body);
    free(r);
}

/* Unlinks r, reports res to its callback and frees it. */
static void creq_finish(creq_t *r, cmn_http_result_t *res)
{
    cmn_http_client_t *cl = r->cl;

    curl_multi_remove_handle(cl->multi, r->easy);
    creq_unlink(r);
    res->body = r->body;
    if (res->body.data == NULL) {
        /* Give callers an empty string rather than NULL. */
        res->body.data = (char *)"";
        res->body.len = 0;
    }
    cl->cb_depth++;
    r->cb(res, r->ud);
    cl->cb_depth--;
    creq_free(r);
}

static void check_multi_info(cmn_http_client_t *cl)
{
    CURLMsg *msg;
    int left;

    while (!cl->destroying && (msg = curl_multi_info_read(cl->multi, &left)) != NULL) {
        if (msg->msg != CURLMSG_DONE)
            continue;
        char *priv = NULL;
        CURLcode rc = msg->data.result;
        cmn_http_result_t res = {0};
        char *ctype = NULL;

        curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, &priv);
        creq_t *r = (creq_t *)priv;
        res.err = map_curl_error(rc, r->overflow);
        if (rc != CURLE_OK)
            res.errmsg = r->errbuf[0] ? r->errbuf : curl_easy_strerror(rc);
        if (r->overflow || rc == CURLE_FILESIZE_EXCEEDED)
            res.errmsg = "response body exceeds max_response";
        if (rc == CURLE_OK) {
            curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &res.status);
            curl_easy_getinfo(r->easy, CURLINFO_CONTENT_TYPE, &ctype);
            res.content_type = ctype;
            struct curl_header *d;
            if (curl_easy_header(r->easy, "Date", 0, CURLH_HEADER, -1, &d) == CURLHE_OK) {
                time_t t = curl_getdate(d->value, NULL);
                res.date = t > 0 ? (int64_t)t : 0;
            }
        }
        if (res.err)
            CMN_LOG_D(SUBSYS, "client request failed: %s", res.errmsg);
        creq_finish(r, &res);
    }
    if (cl->destroying && cl->cb_depth == 0)
        client_teardown(cl);
}

/* ------------------------------------------------------------ curl <-> uv */

static void on_poll_close(uv_handle_t *h)
{
    sock_ctx_t *s = container_of((uv_poll_t *)h, sock_ctx_t, poll);
    cmn_http_client_t *cl = s->cl;

    free(s);
    cl->open_handles--;
    client_check_done(cl);
}

static void sock_ctx_close(sock_ctx_t *s)
{
    cmn_http_client_t *cl = s->cl;

    if (s->prev)
        s->prev->next = s->next;
    else
        cl->socks = s->next;
    if (s->next)
        s->next->prev = s->prev;
    s->prev = s->next = NULL;
    uv_poll_stop(&s->poll);
    uv_close((uv_handle_t *)&s->poll, on_poll_close);
}

static void on_poll(uv_poll_t *p, int status, int events)
{
    sock_ctx_t *s = container_of(p, sock_ctx_t, poll);
    cmn_http_client_t *cl = s->cl;
    int flags = 0;
    int running;

    if (status < 0)
        flags = CURL_CSELECT_ERR;
    if (events & UV_READABLE)
        flags |= CURL_CSELECT_IN;
    if (events & UV_WRITABLE)
        flags |= CURL_CSELECT_OUT;
    curl_multi_socket_action(cl->multi, s->fd, flags, &running);
    check_multi_info(cl);
}

static int socket_cb(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp)
{
    cmn_http_client_t *cl = userp;
    sock_ctx_t *s = socketp;

    (void)easy;
    if (what == CURL_POLL_REMOVE) {
        if (s) {
            if (!cl->freed_multi)
                curl_multi_assign(cl->multi, fd, NULL);
            sock_ctx_close(s);
        }
        return 0;
    }
    if (s == NULL) {
        s = cmn_xcalloc(1, sizeof(*s));
        s->fd = fd;
        s->cl = cl;
        if (uv_poll_init_socket(cl->loop, &s->poll, fd) < 0) {
            free(s);
            return -1;
        }
        cl->open_handles++;
        s->next = cl->socks;
        if (cl->socks)
            cl->socks->prev = s;
        cl->socks = s;
        curl_multi_assign(cl->multi, fd, s);
    }
    int events = 0;
    if (what == CURL_POLL_IN || what == CURL_POLL_INOUT)
        events |= UV_READABLE;
    if (what == CURL_POLL_OUT || what == CURL_POLL_INOUT)
        events |= UV_WRITABLE;
    uv_poll_start(&s->poll, events, on_poll);
    return 0;
}

static void on_timeout(uv_timer_t *t)
{
    cmn_http_client_t *cl = container_of(t, cmn_http_client_t, timer);
    int running;

    curl_multi_socket_action(cl->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    check_multi_info(cl);
}

static int timer_cb(CURLM *multi, long timeout_ms, void *userp)
{
    cmn_http_client_t *cl = userp;

    (void)multi;
    if (timeout_ms < 0)
        uv_timer_stop(&cl->timer);
    else
        uv_timer_start(&cl->timer, on_timeout, (uint64_t)timeout_ms, 0);
    return 0;
}

static size_t write_cb(char *ptr, size_t size, size_t nmemb, void *ud)
{
    creq_t *r = ud;
    size_t n = size * nmemb;

    if (cmn_buf_append(&r->body, ptr, n) < 0) {
        r->overflow = true;
        return 0; /* CURLE_WRITE_ERROR */
    }
    return n;
}

/* ------------------------------------------------------------ public */

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static CURLcode curl_init_rc;

static void curl_init_once(void)
{
    curl_init_rc = curl_global_init(CURL_GLOBAL_DEFAULT);
}

int cmn_http_client_create(uv_loop_t *loop, int max_connections, cmn_http_client_t **out)
{
    pthread_once(&curl_once, curl_init_once);
    if (curl_init_rc != CURLE_OK)
        return CMN_EHTTP;

    cmn_http_client_t *cl = cmn_xcalloc(1, sizeof(*cl));
    cl->loop = loop;
    cl->multi = curl_multi_init();
    if (cl->multi == NULL) {
        free(cl);
        return -ENOMEM;
    }
    if (max_connections <= 0)
        max_connections = DEFAULT_MAX_CONNS;
    curl_multi_setopt(cl->multi, CURLMOPT_SOCKETFUNCTION, socket_cb);
    curl_multi_setopt(cl->multi, CURLMOPT_SOCKETDATA, cl);
    curl_multi_setopt(cl->multi, CURLMOPT_TIMERFUNCTION, timer_cb);
    curl_multi_setopt(cl->multi, CURLMOPT_TIMERDATA, cl);
    curl_multi_setopt(cl->multi, CURLMOPT_MAX_TOTAL_CONNECTIONS, (long)max_connections);
    curl_multi_setopt(cl->multi, CURLMOPT_MAXCONNECTS, (long)max_connections);
    uv_timer_init(loop, &cl->timer);
    cl->open_handles = 1;
    *out = cl;
    return 0;
}

static bool has_header(const char *const *headers, const char *name)
{
    size_t n = strlen(name);

    for (; headers && *headers; headers++) {
        if (strncasecmp(*headers, name, n) == 0 && (*headers)[n] == ':')
            return true;
    }
    return false;
}

static int add_header(creq_t *r, const char *h)
{
    struct curl_slist *n = curl_slist_append(r->hdrs, h);

    if (n == NULL)
        return -ENOMEM;
    r->hdrs = n;
    return 0;
}

int cmn_http_client_send(cmn_http_client_t *cl, const cmn_http_client_req_t *req,
                         cmn_http_client_cb cb, void *ud)
{
    const char *method = req->method ? req->method : "GET";
    int err = -ENOMEM;

    if (cl->destroying)
        return -ECANCELED;
    if (req->url == NULL || cb == NULL)
        return -EINVAL;

    creq_t *r = cmn_xcalloc(1, sizeof(*r));
    r->cl = cl;
    r->cb = cb;
    r->ud = ud;
    cmn_buf_init(&r->body, req->max_response ? req->max_response : DEFAULT_MAX_RESP);
    r->easy = curl_easy_init();
    if (r->easy == NULL)
        goto out_free;

    for (const char *const *h = req->headers; h && *h; h++) {
        if (add_header(r, *h) < 0)
            goto out_free;
    }
    /* No 100-continue round trip; no form content type for raw bodies. */
    if (add_header(r, "Expect:") < 0)
        goto out_free;
    if (!has_header(req->headers, "Content-Type") && add_header(r, "Content-Type:") < 0)
        goto out_free;

    CURL *e = r->easy;
    curl_easy_setopt(e, CURLOPT_URL, req->url);
    curl_easy_setopt(e, CURLOPT_PRIVATE, r);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, r->errbuf);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, write_cb);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, r->hdrs);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, req->timeout_ms > 0 ? req->timeout_ms
                                                                : DEFAULT_TIMEOUT_MS);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS,
                     req->connect_timeout_ms > 0 ? req->connect_timeout_ms : DEFAULT_CONNECT_MS);
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(e, CURLOPT_TCP_NODELAY, 1L);
    /* TLS: verification is never optional; TLS 1.2 at least. */
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, 1L);
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, 2L);
    curl_easy_setopt(e, CURLOPT_SSLVERSION, (long)CURL_SSLVERSION_TLSv1_2);
    if (req->ca_file)
        curl_easy_setopt(e, CURLOPT_CAINFO, req->ca_file);
    if (req->proxy) {
        curl_easy_setopt(e, CURLOPT_PROXY, req->proxy);
        curl_easy_setopt(e, CURLOPT_NOPROXY, "");      /* no exceptions, not even loopback */
    }
    if (req->pinned_pubkey &&
        curl_easy_setopt(e, CURLOPT_PINNEDPUBLICKEY, req->pinned_pubkey) != CURLE_OK) {
        err = CMN_ECRYPTO;
        goto out_free;
    }
    if (req->client_cert_file) {
        curl_easy_setopt(e, CURLOPT_SSLCERT, req->client_cert_file);
        curl_easy_setopt(e, CURLOPT_SSLCERTTYPE, "PEM");
        curl_easy_setopt(e, CURLOPT_SSLKEY, req->client_key_file ? req->client_key_file
                                                                 : req->client_cert_file);
        curl_easy_setopt(e, CURLOPT_SSLKEYTYPE, "PEM");
    } else if (req->client_key_file) {
        err = -EINVAL;
        goto out_free;
    }
    if (req->max_response)
        curl_easy_setopt(e, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)req->max_response);

    if (strcmp(method, "GET") == 0 && req->body == NULL) {
        curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
    } else if (strcmp(method, "HEAD") == 0) {
        curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
    } else {
        /* The body is sent from the caller's memory (not copied). */
        curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)req->body_len);
        curl_easy_setopt(e, CURLOPT_POSTFIELDS, req->body ? req->body : "");
        if (strcmp(method, "POST") != 0)
            curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, method);
    }

    if (curl_multi_add_handle(cl->multi, e) != CURLM_OK) {
        err = CMN_EHTTP;
        goto out_free;
    }
    r->next = cl->reqs;
    if (cl->reqs)
        cl->reqs->prev = r;
    cl->reqs = r;
    cl->npending++;
    return 0;

out_free:
    creq_free(r);
    return err;
}

int cmn_http_client_pending(const cmn_http_client_t *cl)
{
    return cl->npending;
}

static void client_check_done(cmn_http_client_t *cl)
{
    if (cl->destroying && cl->freed_multi && cl->open_handles == 0)
        free(cl);
}

static void on_timer_close(uv_handle_t *h)
{
    cmn_http_client_t *cl = container_of((uv_timer_t *)h, cmn_http_client_t, timer);

    cl->open_handles--;
    client_check_done(cl);
}

/* Cancels what is left, frees curl, closes our handles. Not re-entrant:
 * only called with cb_depth == 0. */
static void client_teardown(cmn_http_client_t *cl)
{
    if (cl->freed_multi)
        return;
    while (cl->reqs) {
        creq_t *r = cl->reqs;
        cmn_http_result_t res = {0};

        res.err = -ECANCELED;
        res.errmsg = "cancelled";
        creq_finish(r, &res); /* callbacks may not send: destroying is set */
    }
    cl->freed_multi = true;
    /* May call socket_cb with CURL_POLL_REMOVE for cached connections. */
    curl_multi_cleanup(cl->multi);
    cl->multi = NULL;
    while (cl->socks)
        sock_ctx_close(cl->socks);
    uv_timer_stop(&cl->timer);
    uv_close((uv_handle_t *)&cl->timer, on_timer_close);
}

void cmn_http_client_destroy(cmn_http_client_t *cl)
{
    if (cl == NULL || cl->destroying)
        return;
    cl->destroying = true;
    if (cl->cb_depth == 0)
        client_teardown(cl);
    /* else check_multi_info tears down when the callback returns */
}
