/*
 * test_http_server.c - cmn_http server (and the query helpers), exercised on
 * 127.0.0.1 with raw sockets and the cmn_http client.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <sys/resource.h>

#include "cmn/crypto.h"
#include "http_test_util.h"

#define FILE_SIZE (5u * 1024 * 1024 + 123)

typedef struct {
    testsrv_t ts;
    char *spool_dir;       /* opts.tmp_dir */
    char *data_dir;        /* holds data_file */
    char data_file[256];
    unsigned char *data;   /* FILE_SIZE bytes, content of data_file */
    uv_loop_t loop;        /* client loop */
    cmn_http_client_t *client;
    char base[64];         /* "http://127.0.0.1:PORT" */
} fx_t;

static atomic_int block_runs;
static atomic_int block_done;
static atomic_bool block_on_loop_thread;
static uv_thread_t srv_loop_thread;

/* ------------------------------------------------------------ handlers */

static void h_query(const cmn_http_req_t *req, cmn_http_resp_t *resp)
{
    const char *cur = req->query;
    char k[64], v[64], line[160];
    int rc;

    cmn_http_resp_header(resp, "Content-Type", "text/plain");
    while ((rc = cmn_http_query_next(&cur, k, sizeof(k), v, sizeof(v))) == 1) {
        int n = snprintf(line, sizeof(line), "%s=%s;", k, v);
        cmn_http_resp_body(resp, line, (size_t)n);
    }
    if (rc < 0)
        cmn_http_resp_simple(resp, 400, "text/plain", "bad query", 9);
}

static void h_echo(const cmn_http_req_t *req, cmn_http_resp_t *resp)
{
    const char *x = cmn_http_req_header(req, "x-test");

    if (x)
        cmn_http_resp_header(resp, "X-Echo", x);
    cmn_http_resp_header(resp, "Content-Type", "application/octet-stream");
    if (req->body_file) {
        cmn_http_resp_status(resp, 500);
        return;
    }
    cmn_http_resp_body(resp, req->body, req->body_len);
}

static void h_sha(const cmn_http_req_t *req, cmn_http_resp_t *resp)
{
    uint8_t d[CMN_SHA256_LEN];
    char hex[CMN_SHA256_HEX_LEN + 1];
    char out[160];
    uint64_t size = req->body_len;

    if (req->body_file) {
        if (cmn_sha256_file(req->body_file, d, &size) < 0) {
            cmn_http_resp_status(resp, 500);
            return;
        }
    } else {
        cmn_sha256(req->body, req->body_len, d);
    }
    cmn_hex(d, sizeof(d), hex);
    int n = snprintf(out, sizeof(out), "%s %s %llu %d", hex, req->body_file ? "file" : "mem",
                     (unsigned long long)size,
                     req->body_file ? strncmp(req->body_file, (const char *)req->route_ud,
                                              strlen((const char *)req->route_ud)) == 0
                                    : 1);
    cmn_http_resp_simple(resp, 200, "text/plain", out, (size_t)n);
}

static void h_small(const cmn_http_req_t *req, cmn_http_resp_t *resp)
{
    (void)req;
    cmn_http_resp_simple(resp, 200, "text/plain", "ok", 2);
}

static void h_file(const cmn_http_req_t *req, cmn_http_resp_t *resp)
{
    const char *path = req->route_ud;

    cmn_http_resp_header(resp, "Content-Type", "application/octet-stream");
    cmn_http_resp_body(resp, "BEGIN", 5);
    if (cmn_http_resp_file(resp, path, 7, UINT64_MAX) < 0 ||
        cmn_http_resp_body_take(resp, cmn_xstrdup("END"), 3) < 0 ||
        cmn_http_resp_file(resp, path, 0, 1000) < 0)
        cmn_http_resp_status(resp, 500);
    /* A missing file is an ordinary error for the handler. */
    if (cmn_http_resp_file(resp, "/nonexistent/yy", 0, UINT64_MAX) != -ENOENT)
        cmn_http_resp_status(resp, 500);
}

/* A whole-series style answer: many file segments in one response. */
#define MANY_SEGS 3000
#define MANY_LEN 997
static void h_many(const cmn_http_req_t *req, cmn_http_resp_t *resp)
{
    for (int i = 0; i < MANY_SEGS; i++)
        if (cmn_http_resp_file(resp, req->route_ud, (uint64_t)i * 13, MANY_LEN) < 0) {
            cmn_http_resp_status(resp, 500);
            return;
        }
}

static void h_block(const cmn_http_req_t *req, cmn_http_resp_t *resp)
{
    const char *cur = req->query;
    char k[32], v[32];
    int sleep_ms = 0;

    atomic_fetch_add(&block_runs, 1);
    if (uv_thread_equal(&(uv_thread_t){uv_thread_self()}, &srv_loop_thread))
        atomic_store(&block_on_loop_thread, true);
    while (cmn_http_query_next(&cur, k, sizeof(k), v, sizeof(v)) == 1) {
        if (strcmp(k, "sleep") == 0)
            sleep_ms = (int)strtol(v, NULL, 10);
    }
    if (sleep_ms)
        usleep((useconds_t)sleep_ms * 1000);
    cmn_http_resp_body(resp, "blocked:", 8);
    cmn_http_resp_body(resp, req->query, strlen(req->query));
    atomic_fetch_add(&block_done, 1);
}

static void h_info(const cmn_http_req_t *req, cmn_http_resp_t *resp)
{
    char out[512];
    int n = snprintf(out, sizeof(out), "%s %s ? %s | %zu | %s", req->method, req->path,
                     req->query, req->body_len, req->peer);

    cmn_http_resp_body(resp, out, (size_t)n);
}

static void h_nostatus(const cmn_http_req_t *req, cmn_http_resp_t *resp)
{
    (void)req;
    (void)resp; /* no status, no body: 200, Content-Length 0 */
}

static cmn_http_route_t routes[] = {
    {"GET", "/q", h_query, NULL, 0, false},
    {"POST", "/echo", h_echo, NULL, 0, false},
    {"POST", "/sha", h_sha, NULL, 64u * 1024 * 1024, true},   /* ud = spool dir */
    {"POST", "/small", h_small, NULL, 1024, false},
    {"GET", "/file", h_file, NULL, 0, true},                  /* ud = data file */
    {"GET", "/many", h_many, NULL, 0, true},                  /* ud = data file */
    {NULL, "/block", h_block, NULL, 0, true},
    {NULL, "/info", h_info, NULL, 0, false},
    {"GET", "/nostatus", h_nostatus, NULL, 0, false},
};

/* ------------------------------------------------------------ fixture */

static int fx_start(fx_t *fx, cmn_http_server_opts_t *opts)
{
    if (testsrv_start(&fx->ts, opts, routes, CMN_ARRAY_SIZE(routes)) < 0)
        return -1;
    srv_loop_thread = fx->ts.loop_thread;
    snprintf(fx->base, sizeof(fx->base), "http://127.0.0.1:%d", fx->ts.port);
    return 0;
}

static int setup(void **state)
{
    fx_t *fx = calloc(1, sizeof(*fx));

    unsetenv("http_proxy");
    unsetenv("HTTP_PROXY");
    unsetenv("all_proxy");
    unsetenv("ALL_PROXY");
    fx->spool_dir = make_tmpdir();
    fx->data_dir = make_tmpdir();
    snprintf(fx->data_file, sizeof(fx->data_file), "%s/data.bin", fx->data_dir);
    fx->data = malloc(FILE_SIZE);
    fill_pattern(fx->data, FILE_SIZE, 42);
    FILE *f = fopen(fx->data_file, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(fx->data, 1, FILE_SIZE, f), FILE_SIZE);
    fclose(f);
    routes[2].ud = fx->spool_dir;
    routes[4].ud = fx->data_file;
    routes[5].ud = fx->data_file;

    cmn_http_server_opts_t opts = {
        .host = "127.0.0.1",
        .port = 0,
        .body_mem_limit = 64 * 1024,
        .tmp_dir = fx->spool_dir,
    };
    assert_int_equal(fx_start(fx, &opts), 0);
    uv_loop_init(&fx->loop);
    assert_int_equal(cmn_http_client_create(&fx->loop, 4, &fx->client), 0);
    atomic_store(&block_runs, 0);
    atomic_store(&block_done, 0);
    atomic_store(&block_on_loop_thread, false);
    *state = fx;
    return 0;
}

static int teardown(void **state)
{
    fx_t *fx = *state;

    client_destroy_and_drain(&fx->loop, fx->client);
    assert_int_equal(uv_loop_close(&fx->loop), 0);
    if (fx->ts.srv)
        testsrv_stop(&fx->ts);
    unlink(fx->data_file);
    rmdir(fx->data_dir);
    /* Every spooled body must be gone once the server stopped. */
    assert_int_equal(dir_count(fx->spool_dir), 0);
    rmdir(fx->spool_dir);
    free(fx->spool_dir);
    free(fx->data_dir);
    free(fx->data);
    free(fx);
    return 0;
}

static void get(fx_t *fx, const char *path, client_res_t *res)
{
    char url[512];

    snprintf(url, sizeof(url), "%s%s", fx->base, path);
    cmn_http_client_req_t req = {.method = "GET", .url = url, .max_response = 32u << 20};
    assert_int_equal(run_request(&fx->loop, fx->client, &req, res), 0);
}

static void post(fx_t *fx, const char *path, const void *body, size_t n, client_res_t *res)
{
    char url[512];

    snprintf(url, sizeof(url), "%s%s", fx->base, path);
    cmn_http_client_req_t req = {.method = "POST", .url = url, .body = body, .body_len = n};
    assert_int_equal(run_request(&fx->loop, fx->client, &req, res), 0);
}

/* ------------------------------------------------------------ query helpers */

static void test_urldecode_table(void **state)
{
    static const struct {
        const char *in;
        int rc;
        const char *out;
    } cases[] = {
        {"", 0, ""},
        {"abc", 0, "abc"},
        {"a%20b", 0, "a b"},
        {"a+b", 0, "a+b"},                /* '+' is literal outside queries */
        {"%2F%2f", 0, "//"},
        {"%E4%B8%AD", 0, "\xe4\xb8\xad"},
        {"%", CMN_EPARSE, NULL},
        {"%4", CMN_EPARSE, NULL},
        {"%zz", CMN_EPARSE, NULL},
        {"ab%", CMN_EPARSE, NULL},
        {"%00x", 0, ""},                  /* embedded NUL ends the C string */
    };
    char out[32];

    (void)state;
    for (size_t i = 0; i < CMN_ARRAY_SIZE(cases); i++) {
        int rc = cmn_http_urldecode(cases[i].in, strlen(cases[i].in), out, sizeof(out));
        assert_int_equal(rc, cases[i].rc);
        if (rc == 0)
            assert_string_equal(out, cases[i].out);
    }
    /* Truncation to the buffer. */
    assert_int_equal(cmn_http_urldecode("abcdef", 6, out, 4), 0);
    assert_string_equal(out, "abc");
    assert_int_equal(cmn_http_urldecode("abc", 3, out, 0), CMN_EPARSE);
}

static void test_query_next_table(void **state)
{
    static const struct {
        const char *query;
        const char *expect; /* "k=v;" pairs, or "ERR" at the point of failure */
    } cases[] = {
        {"", ""},
        {"a=1", "a=1;"},
        {"a=1&b=2", "a=1;b=2;"},
        {"&&a=1&&", "a=1;"},
        {"flag", "flag=;"},
        {"k=", "k=;"},
        {"=v", "=v;"},
        {"a=x%3Dy&b=c+d", "a=x=y;b=c d;"},
        {"study=1.2.840&x=%E4%B8%AD", "study=1.2.840;x=\xe4\xb8\xad;"},
        {"a=1&b=%G0&c=3", "a=1;ERR"},
        {"a=b=c", "a=b=c;"},
        {"longkeyxxxxxxxxxxxxx=longvaluexxxxxxxxxxx", "longkey=longval;"}, /* truncated */
    };

    (void)state;
    for (size_t i = 0; i < CMN_ARRAY_SIZE(cases); i++) {
        const char *cur = cases[i].query;
        char k[8], v[8], got[128] = "";
        int rc;

        while ((rc = cmn_http_query_next(&cur, k, sizeof(k), v, sizeof(v))) == 1) {
            strcat(got, k);
            strcat(got, "=");
            strcat(got, v);
            strcat(got, ";");
        }
        if (rc < 0) {
            assert_int_equal(rc, CMN_EPARSE);
            strcat(got, "ERR");
        }
        assert_string_equal(got, cases[i].expect);
    }
}

/* ------------------------------------------------------------ basic requests */

static void test_get_query(void **state)
{
    fx_t *fx = *state;
    client_res_t res;

    get(fx, "/q?a=1&b=hello+world&c=%E4%B8%AD&d=x%26y", &res);
    assert_int_equal(res.err, 0);
    assert_int_equal(res.status, 200);
    assert_string_equal(res.body, "a=1;b=hello world;c=\xe4\xb8\xad;d=x&y;");
    assert_string_equal(res.content_type, "text/plain");
    client_res_free(&res);

    get(fx, "/q?bad=%Z1", &res);
    assert_int_equal(res.status, 400);
    client_res_free(&res);

    get(fx, "/info/a%20b?x=1", &res);
    assert_int_equal(res.status, 200);
    assert_string_equal(res.body, "GET /info/a%20b ? x=1 | 0 | 127.0.0.1");
    client_res_free(&res);
}

static void test_post_echo(void **state)
{
    fx_t *fx = *state;
    unsigned char body[5000];
    client_res_t res;
    char url[256];

    fill_pattern(body, sizeof(body), 7);
    snprintf(url, sizeof(url), "%s/echo", fx->base);
    const char *hdrs[] = {"X-Test: hello", NULL};
    cmn_http_client_req_t req = {
        .method = "POST", .url = url, .headers = hdrs, .body = body, .body_len = sizeof(body)};
    assert_int_equal(run_request(&fx->loop, fx->client, &req, &res), 0);
    assert_int_equal(res.err, 0);
    assert_int_equal(res.status, 200);
    assert_int_equal(res.body_len, sizeof(body));
    assert_memory_equal(res.body, body, sizeof(body));
    assert_string_equal(res.content_type, "application/octet-stream");
    client_res_free(&res);

    /* Empty body. */
    post(fx, "/echo", NULL, 0, &res);
    assert_int_equal(res.status, 200);
    assert_int_equal(res.body_len, 0);
    client_res_free(&res);
}

static void test_not_found_and_defaults(void **state)
{
    fx_t *fx = *state;
    client_res_t res;

    get(fx, "/nope", &res);
    assert_int_equal(res.err, 0);
    assert_int_equal(res.status, 404);
    client_res_free(&res);

    /* Method mismatch is also "no route". */
    post(fx, "/q", "x", 1, &res);
    assert_int_equal(res.status, 404);
    client_res_free(&res);

    /* No status set: 200 and an empty body, no Content-Type. */
    get(fx, "/nostatus", &res);
    assert_int_equal(res.status, 200);
    assert_int_equal(res.body_len, 0);
    assert_string_equal(res.content_type, "");
    client_res_free(&res);
}

/* ------------------------------------------------------------ bodies */

static void test_large_body_spooled(void **state)
{
    fx_t *fx = *state;
    size_t n = 6u * 1024 * 1024 + 17;
    unsigned char *body = malloc(n);
    uint8_t d[CMN_SHA256_LEN];
    char expect[200], hex[CMN_SHA256_HEX_LEN + 1];
    client_res_t res;

    fill_pattern(body, n, 99);
    cmn_sha256(body, n, d);
    cmn_hex(d, sizeof(d), hex);
    snprintf(expect, sizeof(expect), "%s file %zu 1", hex, n);
    post(fx, "/sha", body, n, &res);
    assert_int_equal(res.err, 0);
    assert_int_equal(res.status, 200);
    assert_string_equal(res.body, expect);
    client_res_free(&res);

    /* Below body_mem_limit the body stays in memory. */
    snprintf(expect, sizeof(expect), "%s", "");
    cmn_sha256(body, 1000, d);
    cmn_hex(d, sizeof(d), hex);
    snprintf(expect, sizeof(expect), "%s mem 1000 1", hex);
    post(fx, "/sha", body, 1000, &res);
    assert_string_equal(res.body, expect);
    client_res_free(&res);

    /* The temp file is removed after the response (asynchronously). */
    uint64_t deadline = now_ms() + 5000;
    while (dir_count(fx->spool_dir) != 0 && now_ms() < deadline)
        usleep(5000);
    assert_int_equal(dir_count(fx->spool_dir), 0);
    free(body);
}

static void test_chunked_body_spooled(void **state)
{
    fx_t *fx = *state;
    raw_conn_t rc = {.fd = raw_connect(fx->ts.port)};
    raw_resp_t r;
    size_t n = 300 * 1024;
    unsigned char *body = malloc(n);
    uint8_t d[CMN_SHA256_LEN];
    char hex[CMN_SHA256_HEX_LEN + 1], expect[200], chunkhdr[32];

    assert_true(rc.fd >= 0);
    fill_pattern(body, n, 5);
    cmn_sha256(body, n, d);
    cmn_hex(d, sizeof(d), hex);
    snprintf(expect, sizeof(expect), "%s file %zu 1", hex, n);
    assert_int_equal(raw_sends(rc.fd, "POST /sha HTTP/1.1\r\nHost: x\r\n"
                                      "Transfer-Encoding: chunked\r\n\r\n"), 0);
    for (size_t off = 0; off < n; off += 10000) {
        size_t len = n - off < 10000 ? n - off : 10000;
        snprintf(chunkhdr, sizeof(chunkhdr), "%zx\r\n", len);
        raw_sends(rc.fd, chunkhdr);
        raw_send(rc.fd, body + off, len);
        raw_sends(rc.fd, "\r\n");
    }
    raw_sends(rc.fd, "0\r\n\r\n");
    assert_int_equal(raw_read_response(&rc, &r, false), 0);
    assert_int_equal(r.status, 200);
    assert_string_equal(r.body, expect);
    raw_resp_free(&r);
    raw_conn_close(&rc);
    free(body);
}

static void test_body_too_large(void **state)
{
    fx_t *fx = *state;
    char body[4096];
    client_res_t res;

    memset(body, 'x', sizeof(body));
    post(fx, "/small", body, 1024, &res);
    assert_int_equal(res.status, 200);
    client_res_free(&res);

    post(fx, "/small", body, sizeof(body), &res);
    assert_int_equal(res.err, 0);
    assert_int_equal(res.status, 413);
    client_res_free(&res);

    /* Chunked: detected while reading; the connection is closed after. */
    raw_conn_t rc = {.fd = raw_connect(fx->ts.port)};
    raw_resp_t r;
    assert_true(rc.fd >= 0);
    raw_sends(rc.fd, "POST /small HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n");
    raw_sends(rc.fd, "800\r\n");
    raw_send(rc.fd, body, 0x800);
    raw_sends(rc.fd, "\r\n");
    assert_int_equal(raw_read_response(&rc, &r, false), 0);
    assert_int_equal(r.status, 413);
    assert_non_null(strcasestr(r.head, "Connection: close"));
    raw_resp_free(&r);
    assert_true(raw_wait_eof(&rc, 5000));
    raw_conn_close(&rc);
}

static void test_header_too_large(void **state)
{
    fx_t *fx = *state;
    size_t n = 20000;
    char *big = malloc(n + 32);
    client_res_t res;
    char url[256];

    strcpy(big, "X-Big: ");
    memset(big + 7, 'a', n);
    big[7 + n] = '\0';
    const char *hdrs[] = {big, NULL};
    snprintf(url, sizeof(url), "%s/info", fx->base);
    cmn_http_client_req_t req = {.method = "GET", .url = url, .headers = hdrs};
    assert_int_equal(run_request(&fx->loop, fx->client, &req, &res), 0);
    assert_int_equal(res.err, 0);
    assert_int_equal(res.status, 431);
    client_res_free(&res);

    /* Too many headers is the same answer. */
    raw_conn_t rc = {.fd = raw_connect(fx->ts.port)};
    raw_resp_t r;
    raw_sends(rc.fd, "GET /info HTTP/1.1\r\n");
    for (int i = 0; i < 150; i++) {
        char h[32];
        snprintf(h, sizeof(h), "X-H%d: v\r\n", i);
        raw_sends(rc.fd, h);
    }
    raw_sends(rc.fd, "\r\n");
    assert_int_equal(raw_read_response(&rc, &r, false), 0);
    assert_int_equal(r.status, 431);
    raw_resp_free(&r);
    raw_conn_close(&rc);

    /* Garbage is a 400. */
    rc.fd = raw_connect(fx->ts.port);
    raw_sends(rc.fd, "NOT HTTP AT ALL\r\n\r\n");
    assert_int_equal(raw_read_response(&rc, &r, false), 0);
    assert_int_equal(r.status, 400);
    raw_resp_free(&r);
    raw_conn_close(&rc);
    free(big);
}

/* ------------------------------------------------------------ connections */

static void test_keep_alive_and_close(void **state)
{
    fx_t *fx = *state;
    raw_conn_t rc = {.fd = raw_connect(fx->ts.port)};
    raw_resp_t r;

    assert_true(rc.fd >= 0);
    raw_sends(rc.fd, "GET /info?n=1 HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_int_equal(raw_read_response(&rc, &r, false), 0);
    assert_int_equal(r.status, 200);
    assert_string_equal(r.body, "GET /info ? n=1 | 0 | 127.0.0.1");
    assert_null(strcasestr(r.head, "Connection: close"));
    {
        /* Date (RFC 9110 5.6.7): IMF-fixdate, GMT, this second give or take. */
        const char *d = strstr(r.head, "\r\nDate: ");
        struct tm tm;
        memset(&tm, 0, sizeof(tm));
        assert_non_null(d);
        const char *end = strptime(d + 8, "%a, %d %b %Y %H:%M:%S GMT", &tm);
        assert_non_null(end);
        assert_memory_equal(end, "\r\n", 2);
        time_t t = timegm(&tm);
        assert_true(t >= time(NULL) - 5 && t <= time(NULL) + 1);
    }
    raw_resp_free(&r);

    /* Same socket, second request, with a body. */
    raw_sends(rc.fd, "POST /info?n=2 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc");
    assert_int_equal(raw_read_response(&rc, &r, false), 0);
    assert_int_equal(r.status, 200);
    assert_string_equal(r.body, "POST /info ? n=2 | 3 | 127.0.0.1");
    raw_resp_free(&r);

    /* HEAD: headers with the GET's Content-Length, no body. */
    raw_sends(rc.fd, "HEAD /file HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_int_equal(raw_read_response(&rc, &r, true), 0);
    assert_int_equal(r.status, 200);
    char cl[64];
    snprintf(cl, sizeof(cl), "Content-Length: %u\r\n", 5 + (FILE_SIZE - 7) + 3 + 1000);
    assert_non_null(strstr(r.head, cl));
    raw_resp_free(&r);

    /* Connection: close is honoured. */
    raw_sends(rc.fd, "GET /info?n=3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_int_equal(raw_read_response(&rc, &r, false), 0);
    assert_int_equal(r.status, 200);
    assert_non_null(strcasestr(r.head, "Connection: close"));
    raw_resp_free(&r);
    assert_int_equal(rc.len, 0);
    assert_true(raw_wait_eof(&rc, 5000));
    raw_conn_close(&rc);

    /* An upgrade request is answered, then the connection closes. */
    rc.fd = raw_connect(fx->ts.port);
    raw_sends(rc.fd, "GET /info HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\n"
                     "Upgrade: websocket\r\n\r\nGET /info HTTP/1.1\r\n\r\n");
    assert_int_equal(raw_read_response(&rc, &r, false), 0);
    assert_int_equal(r.status, 200);
    assert_non_null(strcasestr(r.head, "Connection: close"));
    raw_resp_free(&r);
    assert_true(raw_wait_eof(&rc, 5000));
    raw_conn_close(&rc);

    /* HTTP/1.0 without keep-alive closes too. */
    rc.fd = raw_connect(fx->ts.port);
    raw_sends(rc.fd, "GET /info HTTP/1.0\r\n\r\n");
    assert_int_equal(raw_read_response(&rc, &r, false), 0);
    assert_int_equal(r.status, 200);
    raw_resp_free(&r);
    assert_true(raw_wait_eof(&rc, 5000));
    raw_conn_close(&rc);
}

static void test_pipelined(void **state)
{
    fx_t *fx = *state;
    raw_conn_t rc = {.fd = raw_connect(fx->ts.port)};
    raw_resp_t r;

    assert_true(rc.fd >= 0);
    /* A slow blocking request first: the later ones must wait for it. */
    assert_int_equal(raw_sends(rc.fd,
                               "GET /block?sleep=100&i=1 HTTP/1.1\r\nHost: x\r\n\r\n"
                               "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
                               "GET /q?i=3 HTTP/1.1\r\nHost: x\r\n\r\n"
                               "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
                               "GET /info?i=5 HTTP/1.1\r\nHost: x\r\n\r\n"),
                     0);
    assert_int_equal(raw_read_response(&rc, &r, false), 0);
    assert_string_equal(r.body, "blocked:sleep=100&i=1");
    raw_resp_free(&r);
    assert_int_equal(raw_read_response(&rc, &r, false), 0);
    assert_string_equal(r.body, "hello");
    raw_resp_free(&r);
    assert_int_equal(raw_read_response(&rc, &r, false), 0);
    assert_string_equal(r.body, "i=3;");
    raw_resp_free(&r);
    assert_int_equal(raw_read_response(&rc, &r, false), 0);
    assert_int_equal(r.status, 404);
    raw_resp_free(&r);
    assert_int_equal(raw_read_response(&rc, &r, false), 0);
    assert_string_equal(r.body, "GET /info ? i=5 | 0 | 127.0.0.1");
    raw_resp_free(&r);

    /* Many small pipelined requests in one write. */
    char *many = malloc(200 * 64);
    many[0] = '\0';
    for (int i = 0; i < 200; i++) {
        char one[64];
        snprintf(one, sizeof(one), "GET /q?i=%d HTTP/1.1\r\nHost: x\r\n\r\n", i);
        strcat(many, one);
    }
    raw_sends(rc.fd, many);
    for (int i = 0; i < 200; i++) {
        char expect[32];
        snprintf(expect, sizeof(expect), "i=%d;", i);
        assert_int_equal(raw_read_response(&rc, &r, false), 0);
        assert_string_equal(r.body, expect);
        raw_resp_free(&r);
    }
    free(many);
    raw_conn_close(&rc);
}

static void test_file_segments(void **state)
{
    fx_t *fx = *state;
    client_res_t res;
    size_t n = 5 + (FILE_SIZE - 7) + 3 + 1000;

    get(fx, "/file", &res);
    assert_int_equal(res.err, 0);
    assert_int_equal(res.status, 200);
    assert_int_equal(res.body_len, n);
    assert_memory_equal(res.body, "BEGIN", 5);
    assert_memory_equal(res.body + 5, fx->data + 7, FILE_SIZE - 7);
    assert_memory_equal(res.body + 5 + FILE_SIZE - 7, "END", 3);
    assert_memory_equal(res.body + 5 + FILE_SIZE - 7 + 3, fx->data, 1000);
    client_res_free(&res);

    /* Twice in parallel on two connections. */
    char url[256];
    client_res_t r1, r2;
    snprintf(url, sizeof(url), "%s/file", fx->base);
    cmn_http_client_req_t req = {.url = url, .max_response = 32u << 20};
    memset(&r1, 0, sizeof(r1));
    memset(&r2, 0, sizeof(r2));
    assert_int_equal(cmn_http_client_send(fx->client, &req, run_request_cb, &r1), 0);
    assert_int_equal(cmn_http_client_send(fx->client, &req, run_request_cb, &r2), 0);
    assert_int_equal(cmn_http_client_pending(fx->client), 2);
    while (!r1.done || !r2.done)
        uv_run(&fx->loop, UV_RUN_ONCE);
    assert_int_equal(r1.body_len, n);
    assert_int_equal(r2.body_len, n);
    assert_memory_equal(r1.body + 5, fx->data + 7, FILE_SIZE - 7);
    assert_memory_equal(r2.body + 5, fx->data + 7, FILE_SIZE - 7);
    client_res_free(&r1);
    client_res_free(&r2);
}

/* 3000 file segments with a 256-descriptor limit: files are opened one at
 * a time as they are sent, not all by the handler. */
static void test_many_file_segments(void **state)
{
    fx_t *fx = *state;
    client_res_t res;
    struct rlimit old, low;

    assert_int_equal(getrlimit(RLIMIT_NOFILE, &old), 0);
    low = old;
    low.rlim_cur = 256;
    assert_int_equal(setrlimit(RLIMIT_NOFILE, &low), 0);
    get(fx, "/many", &res);
    assert_int_equal(setrlimit(RLIMIT_NOFILE, &old), 0);
    assert_int_equal(res.err, 0);
    assert_int_equal(res.status, 200);
    assert_int_equal(res.body_len, (size_t)MANY_SEGS * MANY_LEN);
    for (int i = 0; i < MANY_SEGS; i += 499)
        assert_memory_equal(res.body + (size_t)i * MANY_LEN, fx->data + (size_t)i * 13, MANY_LEN);
    client_res_free(&res);
}

static void test_blocking_handler(void **state)
{
    fx_t *fx = *state;
    client_res_t res;

    get(fx, "/block?x=1", &res);
    assert_int_equal(res.status, 200);
    assert_string_equal(res.body, "blocked:x=1");
    client_res_free(&res);
    assert_int_equal(atomic_load(&block_runs), 1);
    assert_false(atomic_load(&block_on_loop_thread));

    /* The peer leaves while the handler runs: the response is dropped. */
    raw_conn_t rc = {.fd = raw_connect(fx->ts.port)};
    raw_sends(rc.fd, "GET /block?sleep=200 HTTP/1.1\r\nHost: x\r\n\r\n");
    uint64_t deadline = now_ms() + 5000;
    while (atomic_load(&block_runs) < 2 && now_ms() < deadline)
        usleep(1000);
    raw_conn_close(&rc);
    while (atomic_load(&block_done) < 2 && now_ms() < deadline)
        usleep(1000);
    assert_int_equal(atomic_load(&block_done), 2);

    /* The server still serves. */
    get(fx, "/block?x=2", &res);
    assert_string_equal(res.body, "blocked:x=2");
    client_res_free(&res);

    /* A blocking handler in flight while the server closes: the close waits. */
    rc.fd = raw_connect(fx->ts.port);
    raw_sends(rc.fd, "GET /block?sleep=300 HTTP/1.1\r\nHost: x\r\n\r\n");
    while (atomic_load(&block_runs) < 4 && now_ms() < deadline)
        usleep(1000);
    testsrv_stop(&fx->ts);
    fx->ts.srv = NULL;
    assert_int_equal(atomic_load(&block_done), 4);
    raw_conn_close(&rc);
}

static void test_timeouts(void **state)
{
    fx_t *fx = *state;

    testsrv_stop(&fx->ts);
    cmn_http_server_opts_t opts = {
        .host = "127.0.0.1",
        .tmp_dir = fx->spool_dir,
        .idle_timeout_ms = 150,
        .request_timeout_ms = 300,
        .max_connections = 2,
        .body_mem_limit = 1024,
    };
    assert_int_equal(fx_start(fx, &opts), 0);

    /* Idle: closed without a response. */
    raw_conn_t rc = {.fd = raw_connect(fx->ts.port)};
    uint64_t t0 = now_ms();
    assert_true(raw_wait_eof(&rc, 5000));
    assert_int_equal(rc.len, 0);
    assert_true(now_ms() - t0 >= 100);
    raw_conn_close(&rc);

    /* Incomplete request: 408. Also with a half-spooled body. */
    for (int i = 0; i < 2; i++) {
        raw_resp_t r;
        char big[4000];
        rc.fd = raw_connect(fx->ts.port);
        if (i == 0) {
            raw_sends(rc.fd, "GET /info HTTP/1.1\r\nHost: x\r\n");
        } else {
            memset(big, 'y', sizeof(big));
            raw_sends(rc.fd, "POST /sha HTTP/1.1\r\nHost: x\r\nContent-Length: 9000\r\n\r\n");
            raw_send(rc.fd, big, sizeof(big));
        }
        assert_int_equal(raw_read_response(&rc, &r, false), 0);
        assert_int_equal(r.status, 408);
        raw_resp_free(&r);
        assert_true(raw_wait_eof(&rc, 5000));
        raw_conn_close(&rc);
    }

    /* max_connections = 2: a third connection is closed at once. The
     * connections above may still be closing on the server: retry a and b
     * until both are served. */
    raw_conn_t a = {0}, b = {0};
    raw_conn_t *ab[2] = {&a, &b};
    raw_resp_t r;
    uint64_t deadline = now_ms() + 5000;
    for (int i = 0; i < 2; i++) {
        for (;;) {
            ab[i]->fd = raw_connect(fx->ts.port);
            raw_sends(ab[i]->fd, "GET /info HTTP/1.1\r\nHost: x\r\n\r\n");
            if (raw_read_response(ab[i], &r, false) == 0)
                break;
            raw_conn_close(ab[i]);
            assert_true(now_ms() < deadline);
        }
        raw_resp_free(&r);
    }
    raw_conn_t c = {.fd = raw_connect(fx->ts.port)};
    t0 = now_ms();
    assert_true(raw_wait_eof(&c, 5000));
    assert_true(now_ms() - t0 < 140); /* before the idle timeout */
    raw_conn_close(&c);
    raw_conn_close(&a);
    raw_conn_close(&b);
}

static void test_create_errors(void **state)
{
    fx_t *fx = *state;
    cmn_http_server_opts_t opts = {.host = "127.0.0.1", .port = fx->ts.port};
    testsrv_t ts2;

    /* Port in use, and a bad address: errors, nothing leaked. */
    assert_int_equal(testsrv_start(&ts2, &opts, routes, 1), UV_EADDRINUSE);
    opts.host = "not-an-address";
    opts.port = 0;
    assert_int_equal(testsrv_start(&ts2, &opts, routes, 1), UV_EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_urldecode_table),
        cmocka_unit_test(test_query_next_table),
        cmocka_unit_test_setup_teardown(test_get_query, setup, teardown),
        cmocka_unit_test_setup_teardown(test_post_echo, setup, teardown),
        cmocka_unit_test_setup_teardown(test_not_found_and_defaults, setup, teardown),
        cmocka_unit_test_setup_teardown(test_large_body_spooled, setup, teardown),
        cmocka_unit_test_setup_teardown(test_chunked_body_spooled, setup, teardown),
        cmocka_unit_test_setup_teardown(test_body_too_large, setup, teardown),
        cmocka_unit_test_setup_teardown(test_header_too_large, setup, teardown),
        cmocka_unit_test_setup_teardown(test_keep_alive_and_close, setup, teardown),
        cmocka_unit_test_setup_teardown(test_pipelined, setup, teardown),
        cmocka_unit_test_setup_teardown(test_file_segments, setup, teardown),
        cmocka_unit_test_setup_teardown(test_many_file_segments, setup, teardown),
        cmocka_unit_test_setup_teardown(test_blocking_handler, setup, teardown),
        cmocka_unit_test_setup_teardown(test_timeouts, setup, teardown),
        cmocka_unit_test_setup_teardown(test_create_errors, setup, teardown),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
