/*
 * test_http_client.c - cmn_http client (libcurl multi on libuv) against the
 * cmn_http server and against a listener that never answers.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "http_test_util.h"

typedef struct {
    testsrv_t ts;
    char *spool_dir;
    uv_loop_t loop;
    cmn_http_client_t *client;
    char base[64];
    int silent_fd;         /* listening socket that never accepts */
    int silent_port;
} fx_t;

static void h_big(const cmn_http_req_t *req, cmn_http_resp_t *resp)
{
    size_t n = 100 * 1024;
    char *p = cmn_xmalloc(n);

    (void)req;
    memset(p, 'b', n);
    cmn_http_resp_header(resp, "Content-Type", "application/x-test");
    cmn_http_resp_body_take(resp, p, n);
}

static void h_echo(const cmn_http_req_t *req, cmn_http_resp_t *resp)
{
    char head[256];
    const char *ct = cmn_http_req_header(req, "Content-Type");
    const char *ex = cmn_http_req_header(req, "Expect");
    int n = snprintf(head, sizeof(head), "%s ct=%s expect=%s len=%zu\n", req->method,
                     ct ? ct : "-", ex ? ex : "-", req->body_len);

    cmn_http_resp_body(resp, head, (size_t)n);
    if (req->body)
        cmn_http_resp_body(resp, req->body, req->body_len);
}

static void h_status(const cmn_http_req_t *req, cmn_http_resp_t *resp)
{
    int st = (int)strtol(req->query, NULL, 10);

    cmn_http_resp_simple(resp, st, "application/json", "{\"v\":1}", 7);
}

static const cmn_http_route_t routes[] = {
    {"GET", "/big", h_big, NULL, 0, false},
    {NULL, "/echo", h_echo, NULL, 32u << 20, false},
    {"GET", "/status", h_status, NULL, 0, false},
};

static int setup(void **state)
{
    fx_t *fx = calloc(1, sizeof(*fx));

    unsetenv("http_proxy");
    unsetenv("HTTP_PROXY");
    unsetenv("all_proxy");
    unsetenv("ALL_PROXY");
    fx->spool_dir = make_tmpdir();
    cmn_http_server_opts_t opts = {
        .host = "127.0.0.1",
        .tmp_dir = fx->spool_dir,
        .max_body = 32u << 20,
        .body_mem_limit = 32u << 20,
    };
    assert_int_equal(testsrv_start(&fx->ts, &opts, routes, CMN_ARRAY_SIZE(routes)), 0);
    snprintf(fx->base, sizeof(fx->base), "http://127.0.0.1:%d", fx->ts.port);

    /* A listener with a backlog: connects succeed, nobody ever answers. */
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof(sa);
    fx->silent_fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_int_equal(bind(fx->silent_fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    assert_int_equal(listen(fx->silent_fd, 16), 0);
    getsockname(fx->silent_fd, (struct sockaddr *)&sa, &sl);
    fx->silent_port = ntohs(sa.sin_port);

    uv_loop_init(&fx->loop);
    assert_int_equal(cmn_http_client_create(&fx->loop, 4, &fx->client), 0);
    *state = fx;
    return 0;
}

static int teardown(void **state)
{
    fx_t *fx = *state;

    if (fx->client)
        client_destroy_and_drain(&fx->loop, fx->client);
    assert_int_equal(uv_loop_close(&fx->loop), 0);
    testsrv_stop(&fx->ts);
    close(fx->silent_fd);
    rmdir(fx->spool_dir);
    free(fx->spool_dir);
    free(fx);
    return 0;
}

static void test_methods_and_headers(void **state)
{
    fx_t *fx = *state;
    char url[256];
    client_res_t res;
    size_t n = 3u << 20; /* big enough that curl would use Expect: 100-continue */
    char *body = malloc(n);

    memset(body, 'z', n);
    snprintf(url, sizeof(url), "%s/echo", fx->base);
    const char *methods[] = {"GET", "POST", "PUT", "DELETE"};
    for (size_t i = 0; i < CMN_ARRAY_SIZE(methods); i++) {
        bool with_body = i == 1 || i == 2;
        cmn_http_client_req_t req = {
            .method = methods[i], .url = url, .body = with_body ? body : NULL,
            .body_len = with_body ? n : 0, .max_response = 8u << 20};
        char expect[128];

        assert_int_equal(run_request(&fx->loop, fx->client, &req, &res), 0);
        assert_int_equal(res.err, 0);
        assert_int_equal(res.status, 200);
        snprintf(expect, sizeof(expect), "%s ct=- expect=- len=%zu\n", methods[i],
                 with_body ? n : 0);
        assert_true(res.body_len >= strlen(expect));
        assert_memory_equal(res.body, expect, strlen(expect));
        if (with_body) {
            assert_int_equal(res.body_len, strlen(expect) + n);
            assert_memory_equal(res.body + strlen(expect), body, n);
        }
        client_res_free(&res);
    }

    /* Caller's Content-Type is kept. */
    const char *hdrs[] = {"Content-Type: application/json", NULL};
    cmn_http_client_req_t req = {
        .method = "POST", .url = url, .headers = hdrs, .body = "{}", .body_len = 2};
    assert_int_equal(run_request(&fx->loop, fx->client, &req, &res), 0);
    assert_string_equal(res.body, "POST ct=application/json expect=- len=2\n{}");
    client_res_free(&res);
    free(body);
}

static void test_status_and_content_type(void **state)
{
    fx_t *fx = *state;
    char url[256];
    client_res_t res;

    snprintf(url, sizeof(url), "%s/status?409", fx->base);
    cmn_http_client_req_t req = {.url = url};
    assert_int_equal(run_request(&fx->loop, fx->client, &req, &res), 0);
    assert_int_equal(res.err, 0); /* an HTTP error status is not a transport error */
    assert_int_equal(res.status, 409);
    assert_string_equal(res.content_type, "application/json");
    assert_string_equal(res.body, "{\"v\":1}");
    client_res_free(&res);
}

static void test_timeout(void **state)
{
    fx_t *fx = *state;
    char url[256];
    client_res_t res;

    snprintf(url, sizeof(url), "http://127.0.0.1:%d/x", fx->silent_port);
    cmn_http_client_req_t req = {.url = url, .timeout_ms = 300};
    uint64_t t0 = now_ms();
    assert_int_equal(run_request(&fx->loop, fx->client, &req, &res), 0);
    assert_int_equal(res.err, CMN_ETIMEOUT);
    assert_int_equal(res.status, 0);
    assert_true(now_ms() - t0 >= 250);
    assert_true(now_ms() - t0 < 5000);
    client_res_free(&res);
}

static void test_cap_exceeded(void **state)
{
    fx_t *fx = *state;
    char url[256];
    client_res_t res;

    snprintf(url, sizeof(url), "%s/big", fx->base);
    cmn_http_client_req_t req = {.url = url, .max_response = 1000};
    assert_int_equal(run_request(&fx->loop, fx->client, &req, &res), 0);
    assert_int_equal(res.err, CMN_ETOOBIG);
    client_res_free(&res);

    req.max_response = 100 * 1024;
    assert_int_equal(run_request(&fx->loop, fx->client, &req, &res), 0);
    assert_int_equal(res.err, 0);
    assert_int_equal(res.body_len, 100 * 1024);
    assert_string_equal(res.content_type, "application/x-test");
    client_res_free(&res);
}

static void test_connect_refused(void **state)
{
    fx_t *fx = *state;
    client_res_t res;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof(sa);
    char url[128];

    /* A port that was free a moment ago. */
    bind(fd, (struct sockaddr *)&sa, sizeof(sa));
    getsockname(fd, (struct sockaddr *)&sa, &sl);
    close(fd);
    snprintf(url, sizeof(url), "http://127.0.0.1:%d/", ntohs(sa.sin_port));
    cmn_http_client_req_t req = {.url = url};
    assert_int_equal(run_request(&fx->loop, fx->client, &req, &res), 0);
    assert_int_equal(res.err, -ECONNREFUSED);
    client_res_free(&res);

    cmn_http_client_req_t bad = {.url = "ftp://127.0.0.1/"};
    assert_int_equal(run_request(&fx->loop, fx->client, &bad, &res), 0);
    assert_true(res.err < 0);
    client_res_free(&res);
}

static void test_many_parallel(void **state)
{
    fx_t *fx = *state;
    char url[256];
    client_res_t res[20];

    snprintf(url, sizeof(url), "%s/status?201", fx->base);
    cmn_http_client_req_t req = {.url = url};
    memset(res, 0, sizeof(res));
    for (int i = 0; i < 20; i++)
        assert_int_equal(cmn_http_client_send(fx->client, &req, run_request_cb, &res[i]), 0);
    assert_int_equal(cmn_http_client_pending(fx->client), 20);
    for (int i = 0; i < 20; i++) {
        while (!res[i].done)
            uv_run(&fx->loop, UV_RUN_ONCE);
        assert_int_equal(res[i].status, 201);
        client_res_free(&res[i]);
    }
    assert_int_equal(cmn_http_client_pending(fx->client), 0);
}

typedef struct {
    int calls;
    int err;
    cmn_http_client_t *destroy_me;
} cancel_t;

static void cancel_cb(const cmn_http_result_t *res, void *ud)
{
    cancel_t *c = ud;

    c->calls++;
    c->err = res->err;
    if (c->destroy_me)
        cmn_http_client_destroy(c->destroy_me);
}

static void test_destroy_cancels(void **state)
{
    fx_t *fx = *state;
    char url[256];
    cancel_t a = {0}, b = {0};

    snprintf(url, sizeof(url), "http://127.0.0.1:%d/x", fx->silent_port);
    cmn_http_client_req_t req = {.url = url};
    assert_int_equal(cmn_http_client_send(fx->client, &req, cancel_cb, &a), 0);
    assert_int_equal(cmn_http_client_send(fx->client, &req, cancel_cb, &b), 0);
    /* Let them connect and send. */
    for (int i = 0; i < 20; i++)
        uv_run(&fx->loop, UV_RUN_NOWAIT);
    client_destroy_and_drain(&fx->loop, fx->client);
    cmn_http_client_destroy(NULL);
    fx->client = NULL;
    assert_int_equal(a.calls, 1);
    assert_int_equal(b.calls, 1);
    assert_int_equal(a.err, -ECANCELED);
    assert_int_equal(b.err, -ECANCELED);
}

static void test_destroy_from_callback(void **state)
{
    fx_t *fx = *state;
    char url[256], slow[256];
    cancel_t a = {0}, b = {0};

    snprintf(url, sizeof(url), "%s/status?200", fx->base);
    snprintf(slow, sizeof(slow), "http://127.0.0.1:%d/x", fx->silent_port);
    a.destroy_me = fx->client;
    cmn_http_client_req_t ra = {.url = url}, rb = {.url = slow};
    assert_int_equal(cmn_http_client_send(fx->client, &ra, cancel_cb, &a), 0);
    assert_int_equal(cmn_http_client_send(fx->client, &rb, cancel_cb, &b), 0);
    uv_run(&fx->loop, UV_RUN_DEFAULT); /* ends once the client is gone */
    fx->client = NULL;
    assert_int_equal(a.calls, 1);
    assert_int_equal(a.err, 0);
    assert_int_equal(b.calls, 1);
    assert_int_equal(b.err, -ECANCELED);
}

static void test_keepalive_reuse(void **state)
{
    fx_t *fx = *state;
    char url[256];
    client_res_t res;

    /* Sequential requests succeed on the cached connection (the server
     * side of reuse is checked with raw sockets in test_http_server). */
    snprintf(url, sizeof(url), "%s/status?200", fx->base);
    cmn_http_client_req_t req = {.url = url};
    for (int i = 0; i < 50; i++) {
        assert_int_equal(run_request(&fx->loop, fx->client, &req, &res), 0);
        assert_int_equal(res.status, 200);
        client_res_free(&res);
    }
    assert_int_equal(cmn_http_client_send(fx->client, &(cmn_http_client_req_t){0}, run_request_cb,
                                          &res),
                     -EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_methods_and_headers, setup, teardown),
        cmocka_unit_test_setup_teardown(test_status_and_content_type, setup, teardown),
        cmocka_unit_test_setup_teardown(test_timeout, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cap_exceeded, setup, teardown),
        cmocka_unit_test_setup_teardown(test_connect_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_many_parallel, setup, teardown),
        cmocka_unit_test_setup_teardown(test_destroy_cancels, setup, teardown),
        cmocka_unit_test_setup_teardown(test_destroy_from_callback, setup, teardown),
        cmocka_unit_test_setup_teardown(test_keepalive_reuse, setup, teardown),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
