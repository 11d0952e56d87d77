/*
 * http_test_util.h - helpers shared by test_http_server.c and
 * test_http_client.c (static functions; include once per test binary).
 *
 * - testsrv_*: runs a cmn_http_server on its own thread and loop, so the
 *   test thread may use blocking sockets or its own client loop.
 * - raw_*: blocking loopback sockets with a receive timeout, and a minimal
 *   response reader (Content-Length framing only).
 * - run_request: runs cmn_http_client_send on a loop until the callback.
 */
#ifndef YY_TEST_HTTP_UTIL_H
#define YY_TEST_HTTP_UTIL_H

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "cmn/errors.h"
#include "cmn/http.h"

/* ------------------------------------------------------------ server thread */

typedef struct {
    uv_thread_t thr;
    uv_loop_t loop;
    uv_async_t stop;
    uv_mutex_t mu;
    uv_cond_t cv;
    bool ready;
    int create_err;
    cmn_http_server_t *srv;
    int port;
    cmn_http_server_opts_t opts;
    const cmn_http_route_t *routes;
    size_t nroutes;
    uv_thread_t loop_thread;   /* for "ran on the threadpool" checks */
} testsrv_t;

static __attribute__((unused)) void testsrv_on_async_close(uv_handle_t *h)
{
    (void)h;
}

static __attribute__((unused)) void testsrv_done(void *ud)
{
    testsrv_t *ts = ud;

    uv_close((uv_handle_t *)&ts->stop, testsrv_on_async_close);
}

static __attribute__((unused)) void testsrv_on_stop(uv_async_t *a)
{
    testsrv_t *ts = a->data;

    cmn_http_server_close(ts->srv, testsrv_done, ts);
}

static __attribute__((unused)) void testsrv_main(void *arg)
{
    testsrv_t *ts = arg;

    uv_loop_init(&ts->loop);
    ts->loop_thread = uv_thread_self();
    uv_async_init(&ts->loop, &ts->stop, testsrv_on_stop);
    ts->stop.data = ts;
    ts->create_err = cmn_http_server_create(&ts->loop, &ts->opts, ts->routes, ts->nroutes,
                                            &ts->srv);
    if (ts->create_err == 0)
        ts->port = cmn_http_server_port(ts->srv);
    else
        uv_close((uv_handle_t *)&ts->stop, testsrv_on_async_close);
    uv_mutex_lock(&ts->mu);
    ts->ready = true;
    uv_cond_signal(&ts->cv);
    uv_mutex_unlock(&ts->mu);
    uv_run(&ts->loop, UV_RUN_DEFAULT);
    int rc = uv_loop_close(&ts->loop);
    if (rc != 0) {
        fprintf(stderr, "server loop not empty at close: %s\n", uv_strerror(rc));
        abort();
    }
}

static __attribute__((unused)) int testsrv_start(testsrv_t *ts, const cmn_http_server_opts_t *opts,
                         const cmn_http_route_t *routes, size_t nroutes)
{
    memset(ts, 0, sizeof(*ts));
    ts->opts = *opts;
    ts->routes = routes;
    ts->nroutes = nroutes;
    uv_mutex_init(&ts->mu);
    uv_cond_init(&ts->cv);
    uv_thread_create(&ts->thr, testsrv_main, ts);
    uv_mutex_lock(&ts->mu);
    while (!ts->ready)
        uv_cond_wait(&ts->cv, &ts->mu);
    uv_mutex_unlock(&ts->mu);
    if (ts->create_err) {
        uv_thread_join(&ts->thr);
        uv_mutex_destroy(&ts->mu);
        uv_cond_destroy(&ts->cv);
    }
    return ts->create_err;
}

static __attribute__((unused)) void testsrv_stop(testsrv_t *ts)
{
    uv_async_send(&ts->stop);
    uv_thread_join(&ts->thr);
    uv_mutex_destroy(&ts->mu);
    uv_cond_destroy(&ts->cv);
}

/* ------------------------------------------------------------ raw sockets */

static __attribute__((unused)) uint64_t now_ms(void)
{
    struct timespec t;

    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000 + (uint64_t)t.tv_nsec / 1000000;
}

static __attribute__((unused)) int raw_connect(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {0};
    struct timeval tv = {.tv_sec = 10};
    int one = 1;

    if (fd < 0)
        return -1;
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static __attribute__((unused)) int raw_send(int fd, const void *p, size_t n)
{
    const char *c = p;

    while (n > 0) {
        ssize_t w = send(fd, c, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        c += w;
        n -= (size_t)w;
    }
    return 0;
}

static __attribute__((unused)) int raw_sends(int fd, const char *s)
{
    return raw_send(fd, s, strlen(s));
}

/* Per-socket read-ahead, so pipelined responses can be split. */
typedef struct {
    int fd;
    char *buf;
    size_t len;
    size_t cap;
} raw_conn_t;

typedef struct {
    int status;
    char head[8192];   /* status line + headers, NUL-terminated */
    char *body;        /* malloc'd, NUL-terminated */
    size_t body_len;
} raw_resp_t;

static __attribute__((unused)) void raw_resp_free(raw_resp_t *r)
{
    free(r->body);
    r->body = NULL;
}

static __attribute__((unused)) int raw_fill(raw_conn_t *rc)
{
    if (rc->cap - rc->len < 65536) {
        rc->cap = rc->cap ? rc->cap * 2 : 131072;
        rc->buf = realloc(rc->buf, rc->cap);
    }
    ssize_t n = recv(rc->fd, rc->buf + rc->len, rc->cap - rc->len, 0);
    if (n <= 0)
        return n == 0 ? 0 : -errno;
    rc->len += (size_t)n;
    return (int)n;
}

/* Returns 0 and fills r, or -1 on EOF/error/timeout before a full response.
 * head_only: a response to HEAD (no body despite Content-Length). */
static __attribute__((unused)) int raw_read_response(raw_conn_t *rc, raw_resp_t *r, bool head_only)
{
    char *end;

    memset(r, 0, sizeof(*r));
    for (;;) {
        if (rc->len > 0 && (end = memmem(rc->buf, rc->len, "\r\n\r\n", 4)) != NULL)
            break;
        if (raw_fill(rc) <= 0)
            return -1;
    }
    size_t hlen = (size_t)(end - rc->buf) + 4;
    if (hlen >= sizeof(r->head))
        return -1;
    memcpy(r->head, rc->buf, hlen);
    r->head[hlen] = '\0';
    if (sscanf(r->head, "HTTP/1.%*d %d", &r->status) != 1)
        return -1;
    size_t clen = 0;
    const char *cl = strcasestr(r->head, "\r\nContent-Length:");
    if (cl)
        clen = strtoull(cl + 17, NULL, 10);
    if (head_only)
        clen = 0;
    while (rc->len < hlen + clen) {
        if (raw_fill(rc) <= 0)
            return -1;
    }
    r->body = malloc(clen + 1);
    memcpy(r->body, rc->buf + hlen, clen);
    r->body[clen] = '\0';
    r->body_len = clen;
    memmove(rc->buf, rc->buf + hlen + clen, rc->len - hlen - clen);
    rc->len -= hlen + clen;
    return 0;
}

/* True when the peer closed (recv returns 0 or a reset) within ms. */
static __attribute__((unused)) bool raw_wait_eof(raw_conn_t *rc, unsigned ms)
{
    uint64_t deadline = now_ms() + ms;

    while (now_ms() < deadline) {
        int n = raw_fill(rc);
        if (n == 0 || n == -ECONNRESET)
            return true;
        if (n < 0 && n != -EAGAIN && n != -EWOULDBLOCK)
            return false;
    }
    return false;
}

static __attribute__((unused)) void raw_conn_close(raw_conn_t *rc)
{
    close(rc->fd);
    free(rc->buf);
    memset(rc, 0, sizeof(*rc));
}

/* ------------------------------------------------------------ client on a loop */

typedef struct {
    bool done;
    int err;
    long status;
    char *body;            /* malloc'd copy */
    size_t body_len;
    char content_type[128];
    char errmsg[256];      /* the client's error text, "" when none */
} client_res_t;

static __attribute__((unused)) void client_res_free(client_res_t *r)
{
    free(r->body);
    r->body = NULL;
}

static __attribute__((unused)) void run_request_cb(const cmn_http_result_t *res, void *ud)
{
    client_res_t *r = ud;

    r->done = true;
    r->err = res->err;
    r->status = res->status;
    r->body = malloc(res->body.len + 1);
    memcpy(r->body, res->body.data, res->body.len);
    r->body[res->body.len] = '\0';
    r->body_len = res->body.len;
    snprintf(r->errmsg, sizeof(r->errmsg), "%s", res->errmsg ? res->errmsg : "");
    snprintf(r->content_type, sizeof(r->content_type), "%s",
             res->content_type ? res->content_type : "");
}

/* Sends req and runs loop until its callback ran. Returns send()'s error. */
static __attribute__((unused)) int run_request(uv_loop_t *loop, cmn_http_client_t *c, const cmn_http_client_req_t *req,
                       client_res_t *out)
{
    memset(out, 0, sizeof(*out));
    int err = cmn_http_client_send(c, req, run_request_cb, out);
    if (err < 0)
        return err;
    while (!out->done)
        uv_run(loop, UV_RUN_ONCE);
    return 0;
}

/* Destroys the client and runs the loop until everything closed. */
static __attribute__((unused)) void client_destroy_and_drain(uv_loop_t *loop, cmn_http_client_t *c)
{
    cmn_http_client_destroy(c);
    uv_run(loop, UV_RUN_DEFAULT);
}

static __attribute__((unused)) char *make_tmpdir(void)
{
    char tpl[] = "/tmp/yy-http-test-XXXXXX";
    char *d = mkdtemp(tpl);

    return d ? strdup(d) : NULL;
}

/* Number of entries in dir (excluding . and ..). */
#include <dirent.h>
static __attribute__((unused)) int dir_count(const char *dir)
{
    DIR *d = opendir(dir);
    struct dirent *e;
    int n = 0;

    if (d == NULL)
        return -1;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
            n++;
    }
    closedir(d);
    return n;
}

static __attribute__((unused)) void fill_pattern(unsigned char *p, size_t n, uint32_t seed)
{
    uint32_t x = seed ? seed : 1;

    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        p[i] = (unsigned char)x;
    }
}

#endif /* YY_TEST_HTTP_UTIL_H */
