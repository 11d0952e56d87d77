/*
 * test_s3.c - the S3 client (common/cmn_s3.c) against a real S3 server:
 * OpenStack Swift with s3api, started by tests/infra/swift.sh in a temp
 * directory for the duration of this binary and stopped at the end.
 *
 * Without a server: key encoding, URL building (path-style and virtual-host),
 * configuration checks, XML helpers, and retries against a tiny in-process
 * HTTP stub (503 once, then 200; non-idempotent initiate never retried).
 *
 * The Swift-backed tests are skipped only when we are not root AND Swift is
 * not installed (root installs it through the script, as CI does).
 *
 * YY_SWIFT_DIR=DIR uses (or starts) the instance in DIR and leaves it running,
 * for a fast edit loop. YY_S3_BENCH=1 adds a 100 MB PUT/GET throughput run (build it in release:
 * make build/release/tests/unit/common/test_s3).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/socket.h>
#include <sys/time.h>

/* Reach the static helpers (xml_text, url_decode_inplace). */
#include "../../../common/cmn_s3.c"

/* ------------------------------------------------------------ fixtures */

#include "swift_fixture.h"

static struct {
    swift_fixture_t fx;            /* the Swift instance */
    char tmp[64];                  /* scratch files */
    cmn_s3_t *s3;                  /* path-style client on the bucket */
} g;

#define now_s sfx_now

static cmn_s3_t *client(bool path_style, const char *secret, int list_page)
{
    cmn_s3_conf_t c = {
        .endpoint = g.fx.endpoint,
        .region = g.fx.region,
        .bucket = g.fx.bucket,
        .access_key = g.fx.access_key,
        .secret_key = secret,
        .secret_file = secret ? NULL : g.fx.secret_file,
        .path_style = path_style,
        .multipart_threshold = 8u << 20,
        .part_size = 5u << 20,
        .max_retries = 2,
        .retry_base_ms = 50,
        .list_page = list_page,
    };
    cmn_s3_t *s3 = NULL;

    if (!path_style) {
        /* Virtual-host style: curl resolves BUCKET.localhost to loopback. */
        static char ep[128];
        const char *port = strrchr(g.fx.endpoint, ':');
        snprintf(ep, sizeof(ep), "http://localhost%s", port ? port : "");
        c.endpoint = ep;
    }
    assert_int_equal(cmn_s3_create(&c, &s3), 0);
    return s3;
}

static int group_setup(void **state)
{
    (void)state;

    unsetenv("http_proxy");
    unsetenv("HTTP_PROXY");
    unsetenv("all_proxy");
    unsetenv("ALL_PROXY");
    snprintf(g.tmp, sizeof(g.tmp), "/tmp/yy-s3t-XXXXXX");
    if (!mkdtemp(g.tmp))
        return -1;
    if (swift_fixture_start(&g.fx) < 0)
        return -1;
    if (g.fx.have)
        g.s3 = client(true, NULL, 0);
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;

    cmn_s3_destroy(g.s3);
    swift_fixture_stop(&g.fx);
    sfx_rm_rf(g.tmp);
    return 0;
}

/* Server tests: skip only when Swift cannot be had; fail if its start failed. */
static void need_server(void)
{
    if (g.fx.skip)
        skip();
    assert_true(g.fx.have);
}

/* Deterministic pseudo-random bytes. */
static void fill(uint8_t *p, size_t n, uint64_t seed)
{
    uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        p[i] = (uint8_t)(x >> 24);
    }
}

static void write_file(const char *path, const void *p, size_t n)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(p, 1, n, f), n);
    assert_int_equal(fclose(f), 0);
}

static uint8_t *read_file(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    struct stat sb;
    uint8_t *p;

    assert_non_null(f);
    assert_int_equal(fstat(fileno(f), &sb), 0);
    p = malloc((size_t)sb.st_size + 1);
    assert_int_equal(fread(p, 1, (size_t)sb.st_size, f), (size_t)sb.st_size);
    fclose(f);
    *n = (size_t)sb.st_size;
    return p;
}

/* ------------------------------------------------------------ no server */

static void test_encode(void **state)
{
    static const struct { const char *in; bool slash; const char *out; } cases[] = {
        {"a/b/c.dcm", true, "a/b/c.dcm"},
        {"a/b", false, "a%2Fb"},
        {"A-Z_a.z~0", true, "A-Z_a.z~0"},
        {"sp ace+plus", true, "sp%20ace%2Bplus"},
        {"q?&=#%", true, "q%3F%26%3D%23%25"},
        {"中", true, "%E4%B8%AD"},
        {"a//b/./c", true, "a//b/./c"},
        {"\x01\x7f", true, "%01%7F"},
    };
    char out[64];
    (void)state;

    for (size_t i = 0; i < CMN_ARRAY_SIZE(cases); i++) {
        int n = cmn_s3_encode(cases[i].in, cases[i].slash, out, sizeof(out));
        assert_int_equal(n, (int)strlen(cases[i].out));
        assert_string_equal(out, cases[i].out);
    }
    assert_int_equal(cmn_s3_encode("abc", true, out, 3), CMN_ETOOBIG);
    assert_int_equal(cmn_s3_encode("a b", true, out, 5), CMN_ETOOBIG);
    assert_int_equal(cmn_s3_encode("a b", true, out, 6), 5);
}

static void test_url(void **state)
{
    static const struct {
        const char *endpoint;
        bool path_style;
        const char *key, *query, *url;
    } cases[] = {
        {"http://127.0.0.1:9000", true, "a b/c", NULL, "http://127.0.0.1:9000/yy-bkt/a%20b/c"},
        {"http://127.0.0.1:9000/", true, "k", "uploads=", "http://127.0.0.1:9000/yy-bkt/k?uploads="},
        {"https://s3.example.com/base/", true, "k", NULL, "https://s3.example.com/base/yy-bkt/k"},
        {"https://oss-cn-hangzhou.aliyuncs.com", false, "1.2.840/x y", NULL,
         "https://yy-bkt.oss-cn-hangzhou.aliyuncs.com/1.2.840/x%20y"},
        {"https://cos.ap-shanghai.myqcloud.com:8443/p", false, "k", "partNumber=1&uploadId=x",
         "https://yy-bkt.cos.ap-shanghai.myqcloud.com:8443/p/k?partNumber=1&uploadId=x"},
        {"http://localhost:1234", false, NULL, "list-type=2", "http://yy-bkt.localhost:1234/?list-type=2"},
        {"http://h", true, NULL, NULL, "http://h/yy-bkt"},
    };
    char url[256];
    (void)state;

    for (size_t i = 0; i < CMN_ARRAY_SIZE(cases); i++) {
        cmn_s3_conf_t c = {.endpoint = cases[i].endpoint, .bucket = "yy-bkt", .access_key = "ak",
                           .secret_key = "sk", .path_style = cases[i].path_style};
        cmn_s3_t *s3;
        assert_int_equal(cmn_s3_create(&c, &s3), 0);
        assert_int_equal(cmn_s3_url(s3, cases[i].key, cases[i].query, url, sizeof(url)), 0);
        assert_string_equal(url, cases[i].url);
        assert_int_equal(cmn_s3_url(s3, "k", NULL, url, 8), CMN_ETOOBIG);
        assert_int_equal(cmn_s3_url(s3, "", NULL, url, sizeof(url)), -EINVAL);
        cmn_s3_destroy(s3);
    }
}

static void test_conf(void **state)
{
    cmn_s3_t *s3 = NULL;
    char secret_path[128];
    (void)state;

    cmn_log_set_level(CMN_LOG_ERROR);
    cmn_s3_conf_t bad[] = {
        {.endpoint = "ftp://h", .bucket = "bkt", .access_key = "a", .secret_key = "s"},
        {.endpoint = "http://u:p@h", .bucket = "bkt", .access_key = "a", .secret_key = "s"},
        {.endpoint = "http://h", .bucket = "Bad_Bucket", .access_key = "a", .secret_key = "s"},
        {.endpoint = "http://h", .bucket = "ab", .access_key = "a", .secret_key = "s"},
        {.endpoint = "http://h", .bucket = "bkt", .access_key = "", .secret_key = "s"},
        {.endpoint = "http://h", .bucket = "bkt", .access_key = "a"},
        {.endpoint = "http://h", .bucket = "bkt", .access_key = "a", .secret_key = "s",
         .part_size = 1u << 20},
    };
    for (size_t i = 0; i < CMN_ARRAY_SIZE(bad); i++) {
        assert_int_equal(cmn_s3_create(&bad[i], &s3), CMN_ECONFIG);
        assert_null(s3);
    }
    cmn_s3_conf_t c = {.endpoint = "http://h", .bucket = "bkt", .access_key = "a",
                       .secret_file = "/nonexistent/yy-secret"};
    assert_int_equal(cmn_s3_create(&c, &s3), -ENOENT);

    /* The secret file: trailing newline stripped, value reaches the handle only. */
    snprintf(secret_path, sizeof(secret_path), "%s/secret", g.tmp);
    write_file(secret_path, "s3cr3t\n", 7);
    c.secret_file = secret_path;
    assert_int_equal(cmn_s3_create(&c, &s3), 0);
    assert_string_equal(s3->secret, "s3cr3t");
    assert_string_equal(s3->sigv4, "aws:amz:us-east-1:s3");
    assert_int_equal(s3->part_size, 16u << 20);
    cmn_s3_destroy(s3);
    cmn_log_set_level(CMN_LOG_WARN);
}

static void test_xml(void **state)
{
    const char *x = "<R><Key>a&amp;b&lt;c&gt;&quot;&apos;&#65;&#x42;</Key><Size>12</Size>"
                    "<Empty></Empty></R>";
    char *v;
    (void)state;

    v = xml_text(x, x + strlen(x), "Key");
    assert_string_equal(v, "a&b<c>\"'AB");
    free(v);
    v = xml_text(x, x + strlen(x), "Size");
    assert_string_equal(v, "12");
    free(v);
    v = xml_text(x, x + strlen(x), "Empty");
    assert_string_equal(v, "");
    free(v);
    assert_null(xml_text(x, x + strlen(x), "Missing"));
    assert_null(xml_text(x, x + 10, "Size"));   /* outside the window */

    char k[] = "a%20b%2Fc+d%2B%E4%B8%AD%zz";
    url_decode_inplace(k);
    assert_string_equal(k, "a b/c d+中%zz");

    assert_int_equal(status_to_err(404, "NoSuchKey"), CMN_ENOTFOUND);
    assert_int_equal(status_to_err(403, "SignatureDoesNotMatch"), CMN_EAUTH);
    assert_int_equal(status_to_err(400, "BadDigest"), CMN_EHASH);
    assert_int_equal(status_to_err(400, "InvalidArgument"), CMN_EPROTO);
    assert_int_equal(status_to_err(416, NULL), -ERANGE);
    assert_int_equal(status_to_err(503, "SlowDown"), CMN_EHTTP);
    assert_true(status_is_retryable(503));
    assert_true(status_is_retryable(500));
    assert_false(status_is_retryable(501));
    assert_false(status_is_retryable(404));
    for (int a = 0; a < 10; a++) {
        cmn_s3_t fake = {.retry_base_ms = 100, .retry_max_ms = 1000};
        long ms = backoff_ms(&fake, a);
        assert_true(ms >= 1 && ms <= (a < 4 ? 100L << a : 1000L) + 1);
    }
}

/* ------------------------------------------------------------ HTTP stub */

typedef struct {
    int fd;                        /* listening socket */
    int port;
    pthread_t thr;
    const int *statuses;           /* answer i gets statuses[min(i, n-1)] */
    int nstatuses;
    atomic_int requests;
    char last_req[4096];           /* head of the last request */
    bool honor_range;              /* answer 206 to "Range: bytes=0-4" */
    const char *body200;           /* body of 200 answers, default "hello" */
    size_t last_body;              /* body bytes read from the last request */
    atomic_bool stop;
} stub_t;

#define STUB_ERR "<Error><Code>SlowDown</Code><Message>x</Message></Error>"

static void *stub_main(void *arg)
{
    stub_t *st = arg;

    while (!atomic_load(&st->stop)) {
        int c = accept(st->fd, NULL, NULL);
        if (c < 0)
            continue;
        if (atomic_load(&st->stop)) {
            close(c);
            break;
        }
        struct timeval tv = {.tv_sec = 5};
        setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
        char buf[8192];
        size_t used = 0;
        char *eoh = NULL;
        while (!eoh && used < sizeof(buf) - 1) {
            ssize_t r = recv(c, buf + used, sizeof(buf) - 1 - used, 0);
            if (r <= 0)
                break;
            used += (size_t)r;
            buf[used] = '\0';
            eoh = strstr(buf, "\r\n\r\n");
        }
        if (!eoh) {
            close(c);
            continue;
        }
        int i = atomic_fetch_add(&st->requests, 1);
        snprintf(st->last_req, sizeof(st->last_req), "%.*s", (int)(eoh - buf), buf);
        int status = st->statuses[i < st->nstatuses ? i : st->nstatuses - 1];
        /* Drain a small body (tests send none or a few bytes). */
        const char *cl = strcasestr(buf, "\r\nContent-Length:");
        st->last_body = 0;
        bool expect = strcasestr(buf, "Expect: 100-continue") != NULL;
        if (cl && expect && status == 200) {   /* curl 7.88 sends Expect on every PUT */
            (void)!send(c, "HTTP/1.1 100 Continue\r\n\r\n", 25, MSG_NOSIGNAL);
            expect = false;
        }
        if (cl && !expect) {
            size_t want = strtoul(cl + 17, NULL, 10);
            size_t have = used - (size_t)(eoh + 4 - buf);
            while (have < want) {
                ssize_t r = recv(c, buf, sizeof(buf), 0);
                if (r <= 0)
                    break;
                have += (size_t)r;
            }
            st->last_body = have;
        }
        char resp[1024];
        int n;
        if (status == 200 && st->honor_range && strstr(buf, "Range: bytes=0-4"))
            n = snprintf(resp, sizeof(resp),
                         "HTTP/1.1 206 Partial\r\nContent-Length: 5\r\nContent-Range: bytes 0-4/11\r\n"
                         "Connection: close\r\n\r\nhello");
        else if (status == 200)
            n = snprintf(resp, sizeof(resp),
                         "HTTP/1.1 200 OK\r\nContent-Length: %zu\r\nETag: \"abc\"\r\n"
                         "Connection: close\r\n\r\n%s",
                         strlen(st->body200 ? st->body200 : "hello"),
                         st->body200 ? st->body200 : "hello");
        else if (status == 204)
            n = snprintf(resp, sizeof(resp), "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
        else
            n = snprintf(resp, sizeof(resp),
                         "HTTP/1.1 %d Oops\r\nContent-Type: application/xml\r\nContent-Length: %zu\r\n"
                         "Connection: close\r\n\r\n%s",
                         status, strlen(STUB_ERR), STUB_ERR);
        (void)!send(c, resp, (size_t)n, MSG_NOSIGNAL);
        shutdown(c, SHUT_WR);
        while (recv(c, buf, sizeof(buf), 0) > 0)
            ;
        close(c);
    }
    return NULL;
}

static void stub_start(stub_t *st, const int *statuses, int n)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof(sa);

    memset(st, 0, sizeof(*st));
    st->statuses = statuses;
    st->nstatuses = n;
    st->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(st->fd >= 0);
    assert_int_equal(bind(st->fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    assert_int_equal(listen(st->fd, 16), 0);
    assert_int_equal(getsockname(st->fd, (struct sockaddr *)&sa, &sl), 0);
    st->port = ntohs(sa.sin_port);
    assert_int_equal(pthread_create(&st->thr, NULL, stub_main, st), 0);
}

static void stub_stop(stub_t *st)
{
    atomic_store(&st->stop, true);
    /* Wake accept() with a connection of our own. */
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)st->port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    int c = socket(AF_INET, SOCK_STREAM, 0);
    (void)!connect(c, (struct sockaddr *)&sa, sizeof(sa));
    close(c);
    pthread_join(st->thr, NULL);
    close(st->fd);
}

static cmn_s3_t *stub_client(const stub_t *st, int max_retries)
{
    char ep[64];
    cmn_s3_conf_t c = {.endpoint = ep, .bucket = "yy-bkt", .access_key = "acct:user",
                       .secret_key = "stub-secret-value", .path_style = true,
                       .max_retries = max_retries, .retry_base_ms = 5, .retry_max_ms = 20,
                       .multipart_threshold = 5u << 20, .part_size = 5u << 20,
                       .parallel_parts = 1};
    cmn_s3_t *s3;

    snprintf(ep, sizeof(ep), "http://127.0.0.1:%d", st->port);
    assert_int_equal(cmn_s3_create(&c, &s3), 0);
    return s3;
}

static void test_retry_503_once(void **state)
{
    static const int script[] = {503, 200};
    stub_t st;
    char buf[16];
    size_t got = 0;
    (void)state;

    cmn_log_set_level(CMN_LOG_ERROR);
    uint64_t total = 0;
    stub_start(&st, script, 2);
    st.honor_range = true;
    cmn_s3_t *s3 = stub_client(&st, 3);
    assert_int_equal(cmn_s3_get_range(s3, "dir/obj 1", 0, 5, buf, &got, &total), 0);
    assert_int_equal(got, 5);
    assert_int_equal(total, 11);
    assert_memory_equal(buf, "hello", 5);
    assert_int_equal(atomic_load(&st.requests), 2);
    /* What went on the wire: signed, hashed, key encoded, no secret. */
    assert_non_null(strstr(st.last_req, "GET /yy-bkt/dir/obj%201 HTTP/1.1"));
    assert_non_null(strstr(st.last_req, "Authorization: AWS4-HMAC-SHA256 Credential=acct:user/"));
    assert_non_null(strcasestr(st.last_req, "x-amz-content-sha256: " S3_EMPTY_SHA256));
    assert_non_null(strstr(st.last_req, "Range: bytes=0-4"));
    assert_null(strstr(st.last_req, "stub-secret-value"));

    /* A server that ignores Range (200 + whole body): the client skips to the offset. */
    st.honor_range = false;
    atomic_store(&st.requests, 1);   /* past the 503: every answer is 200 now */
    memset(buf, 0, sizeof(buf));
    assert_int_equal(cmn_s3_get_range(s3, "k", 1, 3, buf, &got, NULL), 0);
    assert_int_equal(got, 3);
    assert_memory_equal(buf, "ell", 3);
    cmn_s3_destroy(s3);
    stub_stop(&st);
    cmn_log_set_level(CMN_LOG_WARN);
}

static void test_retry_put_and_abort(void **state)
{
    static const int put_script[] = {503, 200};
    static const int mpu_script[] = {200, 400, 204};
    stub_t st;
    char path[128];
    (void)state;

    cmn_log_set_level(CMN_LOG_ERROR);
    /* A PUT from a file after a 503: the body is sent again from its start. */
    snprintf(path, sizeof(path), "%s/put-retry", g.tmp);
    uint8_t *body = malloc(300000);
    fill(body, 300000, 3);
    write_file(path, body, 300000);
    free(body);
    stub_start(&st, put_script, 2);
    cmn_s3_t *s3 = stub_client(&st, 3);
    assert_int_equal(cmn_s3_put_file(s3, "p", path, NULL), 0);
    assert_int_equal(atomic_load(&st.requests), 2);
    assert_int_equal(st.last_body, 300000);
    assert_non_null(strstr(st.last_req, "PUT /yy-bkt/p HTTP/1.1"));
    cmn_s3_destroy(s3);
    stub_stop(&st);

    /* A part that fails for good aborts the multipart upload. */
    snprintf(path, sizeof(path), "%s/six-mib-2", g.tmp);
    uint8_t *six = malloc(6u << 20);
    fill(six, 6u << 20, 7);
    write_file(path, six, 6u << 20);
    free(six);
    stub_start(&st, mpu_script, 3);
    st.body200 = "<InitiateMultipartUploadResult><UploadId>u/1+x</UploadId>"
                 "</InitiateMultipartUploadResult>";
    s3 = stub_client(&st, 3);
    assert_int_equal(cmn_s3_put_file(s3, "big", path, NULL), CMN_EPROTO);
    assert_int_equal(atomic_load(&st.requests), 3);
    assert_non_null(strstr(st.last_req, "DELETE /yy-bkt/big?uploadId=u%2F1%2Bx HTTP/1.1"));
    cmn_s3_destroy(s3);
    stub_stop(&st);
    cmn_log_set_level(CMN_LOG_WARN);
}

static void test_retry_exhausted_and_not_idempotent(void **state)
{
    static const int always503[] = {503};
    stub_t st;
    cmn_s3_stat_t sst;
    char path[128];
    (void)state;

    cmn_log_set_level(CMN_LOG_ERROR);
    stub_start(&st, always503, 1);
    cmn_s3_t *s3 = stub_client(&st, 2);
    assert_int_equal(cmn_s3_head(s3, "k", &sst), CMN_EHTTP);
    assert_int_equal(atomic_load(&st.requests), 3);   /* 1 + 2 retries */

    /* A multipart initiate (POST ?uploads=) is not idempotent: one attempt only. */
    atomic_store(&st.requests, 0);
    snprintf(path, sizeof(path), "%s/six-mib", g.tmp);
    uint8_t *six = malloc(6u << 20);
    fill(six, 6u << 20, 6);
    write_file(path, six, 6u << 20);
    free(six);
    assert_int_equal(cmn_s3_put_file(s3, "big", path, NULL), CMN_EHTTP);
    assert_int_equal(atomic_load(&st.requests), 1);
    assert_non_null(strstr(st.last_req, "POST /yy-bkt/big?uploads= HTTP/1.1"));
    cmn_s3_destroy(s3);
    stub_stop(&st);

    /* Nobody listening: transport errors are retried, then CMN_EHTTP. */
    stub_t dead = {.port = st.port};
    s3 = stub_client(&dead, 1);
    assert_int_equal(cmn_s3_head(s3, "k", &sst), CMN_EHTTP);
    cmn_s3_destroy(s3);
    cmn_log_set_level(CMN_LOG_WARN);
}

/* ------------------------------------------------------------ Swift */

static void test_put_get_head_delete(void **state)
{
    const char *text = "hello, yunying";
    cmn_s3_stat_t st;
    char path[128];
    size_t n;
    (void)state;

    need_server();
    assert_int_equal(cmn_s3_put_buffer(g.s3, "small/hello.txt", text, strlen(text), NULL), 0);
    assert_int_equal(cmn_s3_head(g.s3, "small/hello.txt", &st), 0);
    assert_int_equal(st.size, strlen(text));
    assert_true(st.etag[0] == '"');

    snprintf(path, sizeof(path), "%s/hello.out", g.tmp);
    memset(&st, 0, sizeof(st));
    assert_int_equal(cmn_s3_get_to_file(g.s3, "small/hello.txt", path, &st), 0);
    assert_int_equal(st.size, strlen(text));
    uint8_t *back = read_file(path, &n);
    assert_int_equal(n, strlen(text));
    assert_memory_equal(back, text, n);
    free(back);

    /* Empty object. */
    assert_int_equal(cmn_s3_put_buffer(g.s3, "small/empty", NULL, 0, NULL), 0);
    assert_int_equal(cmn_s3_head(g.s3, "small/empty", &st), 0);
    assert_int_equal(st.size, 0);

    /* put_file below the threshold: a single PUT, with a known hash. */
    char src[128];
    uint8_t data[100000];
    uint8_t md[CMN_SHA256_LEN];
    char hex[CMN_SHA256_HEX_LEN + 1];
    fill(data, sizeof(data), 1);
    snprintf(src, sizeof(src), "%s/100k", g.tmp);
    write_file(src, data, sizeof(data));
    cmn_sha256(data, sizeof(data), md);
    cmn_hex(md, sizeof(md), hex);
    cmn_s3_put_opts_t opts = {.content_type = "application/dicom", .sha256_hex = hex};
    assert_int_equal(cmn_s3_put_file(g.s3, "small/100k", src, &opts), 0);
    assert_int_equal(cmn_s3_head(g.s3, "small/100k", &st), 0);
    assert_int_equal(st.size, sizeof(data));

    /* A wrong content hash is refused by the server: nothing stored. */
    hex[0] = hex[0] == '0' ? '1' : '0';
    cmn_log_set_level(CMN_LOG_ERROR);
    assert_int_equal(cmn_s3_put_file(g.s3, "small/badhash", src, &opts), CMN_EHASH);
    cmn_log_set_level(CMN_LOG_WARN);
    assert_int_equal(cmn_s3_head(g.s3, "small/badhash", &st), CMN_ENOTFOUND);

    assert_int_equal(cmn_s3_delete(g.s3, "small/hello.txt"), 0);
    assert_int_equal(cmn_s3_head(g.s3, "small/hello.txt", &st), CMN_ENOTFOUND);
    assert_int_equal(cmn_s3_delete(g.s3, "small/hello.txt"), 0);   /* already gone: fine */
}

static void test_multipart_20mib(void **state)
{
    const size_t size = 20u << 20;
    uint8_t *data = malloc(size);
    char src[128], dst[128];
    cmn_s3_stat_t st;
    size_t n;
    (void)state;

    need_server();
    fill(data, size, 20);
    snprintf(src, sizeof(src), "%s/20mib", g.tmp);
    snprintf(dst, sizeof(dst), "%s/20mib.out", g.tmp);
    write_file(src, data, size);

    double t0 = now_s();
    assert_int_equal(cmn_s3_put_file(g.s3, "big/20mib.bin", src, NULL), 0);
    double t1 = now_s();
    assert_int_equal(cmn_s3_head(g.s3, "big/20mib.bin", &st), 0);
    assert_int_equal(st.size, size);
    /* A multipart object's ETag ends in "-<parts>": 20 MiB / 5 MiB = 4 parts. */
    assert_non_null(strstr(st.etag, "-4"));

    assert_int_equal(cmn_s3_get_to_file(g.s3, "big/20mib.bin", dst, NULL), 0);
    double t2 = now_s();
    uint8_t *back = read_file(dst, &n);
    assert_int_equal(n, size);
    assert_memory_equal(back, data, size);
    fprintf(stderr, "test_s3: 20 MiB multipart put %.2f s, get %.2f s\n", t1 - t0, t2 - t1);

    /* Ranged reads: inside a part, across the 5 MiB part boundary, the tail. */
    static const struct { uint64_t off; size_t len; size_t want; } rg[] = {
        {0, 1, 1}, {12345, 4096, 4096}, {(5u << 20) - 100, 300, 300},
        {(20u << 20) - 10, 100, 10}, {7u << 20, 1u << 20, 1u << 20},
    };
    uint8_t *buf = malloc(1u << 20);
    for (size_t i = 0; i < CMN_ARRAY_SIZE(rg); i++) {
        size_t got = 0;
        uint64_t total = 0;
        assert_int_equal(cmn_s3_get_range(g.s3, "big/20mib.bin", rg[i].off, rg[i].len, buf, &got,
                                          &total), 0);
        assert_int_equal(got, rg[i].want);
        assert_int_equal(total, size);
        assert_memory_equal(buf, data + rg[i].off, got);
    }
    size_t got = 99;
    cmn_log_set_level(CMN_LOG_ERROR);
    assert_int_equal(cmn_s3_get_range(g.s3, "big/20mib.bin", size, 10, buf, &got, NULL), -ERANGE);
    cmn_log_set_level(CMN_LOG_WARN);
    assert_int_equal(got, 0);

    free(buf);
    free(back);
    free(data);
    unlink(src);
    unlink(dst);
}

static void test_not_found(void **state)
{
    cmn_s3_stat_t st;
    char path[256];
    char buf[8];
    size_t got;
    (void)state;

    need_server();
    assert_int_equal(cmn_s3_head(g.s3, "no/such/key", &st), CMN_ENOTFOUND);
    char dir[128];
    snprintf(dir, sizeof(dir), "%s/nf", g.tmp);
    assert_int_equal(mkdir(dir, 0700), 0);
    snprintf(path, sizeof(path), "%s/none.out", dir);
    assert_int_equal(cmn_s3_get_to_file(g.s3, "no/such/key", path, NULL), CMN_ENOTFOUND);
    assert_int_equal(access(path, F_OK), -1);
    /* No temporary file left behind either. */
    DIR *d = opendir(dir);
    struct dirent *de;
    int entries = 0;
    while ((de = readdir(d)))
        entries += de->d_name[0] != '.';
    closedir(d);
    assert_int_equal(entries, 0);
    assert_int_equal(cmn_s3_get_range(g.s3, "no/such/key", 0, 4, buf, &got, NULL), CMN_ENOTFOUND);

    /* Another bucket that does not exist. */
    cmn_s3_conf_t c = {.endpoint = g.fx.endpoint, .bucket = "no-such-bucket-yy",
                       .access_key = g.fx.access_key, .secret_file = g.fx.secret_file,
                       .path_style = true, .max_retries = -1};
    cmn_s3_t *s3;
    assert_int_equal(cmn_s3_create(&c, &s3), 0);
    assert_int_equal(cmn_s3_head(s3, "k", &st), CMN_ENOTFOUND);
    cmn_log_set_level(CMN_LOG_ERROR);
    assert_int_equal(cmn_s3_delete(s3, "k"), CMN_ENOTFOUND);
    cmn_log_set_level(CMN_LOG_WARN);
    cmn_s3_destroy(s3);
}

static void test_wrong_credentials(void **state)
{
    cmn_s3_stat_t st;
    size_t got;
    char buf[4];
    (void)state;

    need_server();
    cmn_log_set_level(CMN_LOG_ERROR);
    cmn_s3_t *bad = client(true, "not-the-secret", 0);
    assert_int_equal(cmn_s3_put_buffer(bad, "auth/x", "x", 1, NULL), CMN_EAUTH);
    assert_int_equal(cmn_s3_get_range(bad, "small/100k", 0, 4, buf, &got, NULL), CMN_EAUTH);
    cmn_s3_destroy(bad);

    cmn_s3_conf_t c = {.endpoint = g.fx.endpoint, .bucket = g.fx.bucket, .access_key = "nobody:none",
                       .secret_key = "x", .path_style = true};
    assert_int_equal(cmn_s3_create(&c, &bad), 0);
    assert_int_equal(cmn_s3_head(bad, "small/100k", &st), CMN_EAUTH);
    cmn_s3_destroy(bad);
    cmn_log_set_level(CMN_LOG_WARN);
}

typedef struct {
    int n;
    char keys[16][128];
    uint64_t sizes[16];
    int stop_after;
} list_acc_t;

static int list_cb(const cmn_s3_obj_t *o, void *arg)
{
    list_acc_t *acc = arg;

    if (acc->n < 16) {
        snprintf(acc->keys[acc->n], sizeof(acc->keys[0]), "%s", o->key);
        acc->sizes[acc->n] = o->size;
    }
    acc->n++;
    if (acc->stop_after && acc->n == acc->stop_after)
        return 42;
    return 0;
}

static void test_keys_and_list(void **state)
{
    /* Sorted by their UTF-8 bytes, as S3 lists them. */
    static const char *keys[] = {
        "list/a b+c=d&e",
        "list/p%25q#r?s",
        "list/tilde~dots/./x",
        "list/x//y",
        "list/z",
        "list/\xe4\xb8\xad\xe6\x96\x87.dcm",
    };
    list_acc_t acc;
    char out[128];
    (void)state;

    need_server();
    for (size_t i = 0; i < CMN_ARRAY_SIZE(keys); i++)
        assert_int_equal(cmn_s3_put_buffer(g.s3, keys[i], keys[i], strlen(keys[i]), NULL), 0);
    for (size_t i = 0; i < CMN_ARRAY_SIZE(keys); i++) {
        size_t got;
        assert_int_equal(cmn_s3_get_range(g.s3, keys[i], 0, sizeof(out), out, &got, NULL), 0);
        assert_int_equal(got, strlen(keys[i]));
        assert_memory_equal(out, keys[i], got);
    }
    /* Paging: 2 keys per page -> 3 pages. */
    cmn_s3_t *paged = client(true, NULL, 2);
    memset(&acc, 0, sizeof(acc));
    assert_int_equal(cmn_s3_list(paged, "list/", list_cb, &acc), 0);
    assert_int_equal(acc.n, (int)CMN_ARRAY_SIZE(keys));
    for (size_t i = 0; i < CMN_ARRAY_SIZE(keys); i++) {
        assert_string_equal(acc.keys[i], keys[i]);
        assert_int_equal(acc.sizes[i], strlen(keys[i]));
    }
    /* The callback stops the listing; its value comes back. */
    memset(&acc, 0, sizeof(acc));
    acc.stop_after = 3;
    assert_int_equal(cmn_s3_list(paged, "list/", list_cb, &acc), 42);
    assert_int_equal(acc.n, 3);
    /* Empty prefix match. */
    memset(&acc, 0, sizeof(acc));
    assert_int_equal(cmn_s3_list(paged, "nothing-here/", list_cb, &acc), 0);
    assert_int_equal(acc.n, 0);
    cmn_s3_destroy(paged);
    for (size_t i = 0; i < CMN_ARRAY_SIZE(keys); i++)
        assert_int_equal(cmn_s3_delete(g.s3, keys[i]), 0);
    memset(&acc, 0, sizeof(acc));
    assert_int_equal(cmn_s3_list(g.s3, "list/", list_cb, &acc), 0);
    assert_int_equal(acc.n, 0);
}

static void test_virtual_host_and_bucket(void **state)
{
    cmn_s3_stat_t st;
    char buf[8];
    size_t got;
    (void)state;

    need_server();
    /* The proxy serves BUCKET.localhost (storage_domain = localhost). */
    cmn_s3_t *vh = client(false, NULL, 0);
    char url[256];
    assert_int_equal(cmn_s3_url(vh, "vh/k", NULL, url, sizeof(url)), 0);
    assert_non_null(strstr(url, "://yunying-test.localhost:"));
    assert_int_equal(cmn_s3_put_buffer(vh, "vh/k", "vhost", 5, NULL), 0);
    assert_int_equal(cmn_s3_get_range(g.s3, "vh/k", 0, 5, buf, &got, NULL), 0);
    assert_memory_equal(buf, "vhost", 5);
    assert_int_equal(cmn_s3_head(vh, "vh/k", &st), 0);
    assert_int_equal(cmn_s3_delete(vh, "vh/k"), 0);
    cmn_s3_destroy(vh);

    /* Creating a bucket, twice (409 "already owned" is success). */
    cmn_s3_conf_t c = {.endpoint = g.fx.endpoint, .bucket = "yy-second", .access_key = g.fx.access_key,
                       .secret_file = g.fx.secret_file, .path_style = true};
    cmn_s3_t *s3;
    assert_int_equal(cmn_s3_create(&c, &s3), 0);
    assert_int_equal(cmn_s3_bucket_create(s3), 0);
    assert_int_equal(cmn_s3_bucket_create(s3), 0);
    assert_int_equal(cmn_s3_put_buffer(s3, "k", "2", 1, NULL), 0);
    assert_int_equal(cmn_s3_head(s3, "k", &st), 0);
    assert_int_equal(st.size, 1);
    cmn_s3_destroy(s3);
}

typedef struct {
    int id;
    int err;
} worker_t;

static void *worker(void *arg)
{
    worker_t *w = arg;
    char key[64], buf[4096], back[4096];
    size_t got;

    for (int i = 0; i < 10 && !w->err; i++) {
        snprintf(key, sizeof(key), "mt/%d/%d", w->id, i);
        fill((uint8_t *)buf, sizeof(buf), (uint64_t)(w->id * 100 + i));
        w->err = cmn_s3_put_buffer(g.s3, key, buf, sizeof(buf), NULL);
        if (!w->err)
            w->err = cmn_s3_get_range(g.s3, key, 0, sizeof(back), back, &got, NULL);
        if (!w->err && (got != sizeof(buf) || memcmp(buf, back, got) != 0))
            w->err = CMN_EHASH;
        if (!w->err)
            w->err = cmn_s3_delete(g.s3, key);
    }
    return NULL;
}

static void test_threads(void **state)
{
    pthread_t t[4];
    worker_t w[4];
    (void)state;

    need_server();
    for (int i = 0; i < 4; i++) {
        w[i] = (worker_t){.id = i};
        assert_int_equal(pthread_create(&t[i], NULL, worker, &w[i]), 0);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(t[i], NULL);
        assert_int_equal(w[i].err, 0);
    }
}

/* YY_S3_BENCH=1: 100 MB PUT (multipart, 16 MiB parts) and GET, MB/s. */
static void test_bench_100mb(void **state)
{
    const size_t size = 100u * 1000 * 1000;
    char src[128], dst[128];
    (void)state;

    need_server();
    if (!getenv("YY_S3_BENCH"))
        skip();
    uint8_t *data = malloc(size);
    fill(data, size, 100);
    snprintf(src, sizeof(src), "%s/100mb", g.tmp);
    snprintf(dst, sizeof(dst), "%s/100mb.out", g.tmp);
    write_file(src, data, size);
    free(data);

    cmn_s3_conf_t c = {.endpoint = g.fx.endpoint, .region = g.fx.region, .bucket = g.fx.bucket,
                       .access_key = g.fx.access_key, .secret_file = g.fx.secret_file,
                       .path_style = true};
    cmn_s3_t *s3;
    assert_int_equal(cmn_s3_create(&c, &s3), 0);
    for (int rep = 0; rep < 3; rep++) {
        double t0 = now_s();
        assert_int_equal(cmn_s3_put_file(s3, "bench/100mb", src, NULL), 0);
        double t1 = now_s();
        assert_int_equal(cmn_s3_get_to_file(s3, "bench/100mb", dst, NULL), 0);
        double t2 = now_s();
        c.multipart_threshold = 0;
        fprintf(stderr, "test_s3: bench 100 MB multipart PUT %.0f MB/s, GET %.0f MB/s\n",
                size / 1e6 / (t1 - t0), size / 1e6 / (t2 - t1));
    }
    cmn_s3_destroy(s3);
    /* Single PUT (threshold above the size). */
    c.multipart_threshold = 200u << 20;
    assert_int_equal(cmn_s3_create(&c, &s3), 0);
    for (int rep = 0; rep < 3; rep++) {
        double t0 = now_s();
        assert_int_equal(cmn_s3_put_file(s3, "bench/100mb-single", src, NULL), 0);
        double t1 = now_s();
        fprintf(stderr, "test_s3: bench 100 MB single PUT %.0f MB/s\n", size / 1e6 / (t1 - t0));
    }
    cmn_s3_destroy(s3);
    unlink(dst);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_encode),
        cmocka_unit_test(test_url),
        cmocka_unit_test(test_conf),
        cmocka_unit_test(test_xml),
        cmocka_unit_test(test_retry_503_once),
        cmocka_unit_test(test_retry_exhausted_and_not_idempotent),
        cmocka_unit_test(test_retry_put_and_abort),
        cmocka_unit_test(test_put_get_head_delete),
        cmocka_unit_test(test_multipart_20mib),
        cmocka_unit_test(test_not_found),
        cmocka_unit_test(test_wrong_credentials),
        cmocka_unit_test(test_keys_and_list),
        cmocka_unit_test(test_virtual_host_and_bucket),
        cmocka_unit_test(test_threads),
        cmocka_unit_test(test_bench_100mb),
    };

    cmn_log_set_level(CMN_LOG_WARN);
    return cmocka_run_group_tests_name("s3", tests, group_setup, group_teardown);
}
