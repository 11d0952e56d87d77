/*
 * test_core.c - errors, buffers, configuration, crypto and SQLite helpers.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <mbedtls/sha256.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>

#include "cmn/buf.h"
#include "cmn/conf.h"
#include "cmn/crypto.h"
#include "cmn/db.h"
#include "cmn/errors.h"
#include "cmn/log.h"

static void test_errors(void **state)
{
    (void)state;
    assert_string_equal(cmn_strerror(CMN_EPARSE), "malformed input");
    assert_string_equal(cmn_err_name(CMN_EHASH), "CMN_EHASH");
    assert_string_equal(cmn_err_name(-ENOENT), "ENOENT");
    assert_string_equal(cmn_strerror(0), "success");
    assert_true(strlen(cmn_strerror(-ENOSPC)) > 0);
}

static void test_buf(void **state)
{
    cmn_buf_t b;
    char *s;
    size_t n;
    (void)state;

    cmn_buf_init(&b, 16);
    assert_int_equal(cmn_buf_appends(&b, "hello"), 0);
    assert_int_equal(cmn_buf_appendf(&b, " %d", 42), 0);
    assert_string_equal(b.data, "hello 42");
    assert_int_equal(b.len, 8);
    /* Over the cap: error, and the buffer is freed. */
    assert_int_equal(cmn_buf_appends(&b, "0123456789"), CMN_ETOOBIG);
    assert_null(b.data);
    assert_int_equal(b.len, 0);
    assert_int_equal(cmn_buf_appends(&b, "abc"), 0);
    s = cmn_buf_steal(&b, &n);
    assert_string_equal(s, "abc");
    assert_int_equal(n, 3);
    assert_null(b.data);
    free(s);
}

typedef struct {
    char *name;
    long long port;
    bool enabled;
} sec_a_t;

typedef struct {
    sec_a_t a;
    struct {
        char *dir;
    } b;
} conf_t;

static const cmn_conf_opt_t a_opts[] = {
    CMN_CONF_OPT_STR(sec_a_t, name, "YUNYING", "AE title"),
    CMN_CONF_OPT_INT(sec_a_t, port, 11112, 1, 65535, "port"),
    CMN_CONF_OPT_BOOL(sec_a_t, enabled, 1, "on"),
};
typedef struct { char *dir; } sec_b_t;
static const cmn_conf_opt_t b_opts[] = {
    CMN_CONF_OPT_STR(sec_b_t, dir, NULL, "directory"),
};
static const cmn_conf_section_t secs[] = {
    { "a", a_opts, CMN_ARRAY_SIZE(a_opts), offsetof(conf_t, a) },
    { "b", b_opts, CMN_ARRAY_SIZE(b_opts), offsetof(conf_t, b) },
};

static void test_conf(void **state)
{
    conf_t c;
    char err[256];
    static const struct {
        const char *json;
        const char *want_err;   /* substring, NULL = success */
    } cases[] = {
        { "{}", NULL },
        { "{\"a\":{\"port\":104,\"name\":\"PACS\"},\"b\":{\"dir\":\"/x\"}}", NULL },
        { "{\"a\":{\"prot\":104}}", "a.prot: unknown key" },
        { "{\"c\":{}}", "c: unknown section" },
        { "{\"a\":{\"port\":70000}}", "a.port: 70000 is above the maximum 65535" },
        { "{\"a\":{\"port\":0}}", "a.port: 0 is below the minimum 1" },
        { "{\"a\":{\"port\":\"x\"}}", "a.port: expected an integer" },
        { "{\"a\":{\"enabled\":1}}", "a.enabled: expected true or false" },
        { "{\"a\":{\"name\":5}}", "a.name: expected a string" },
        { "{\"a\":[]}", "a: a section must be a JSON object" },
        { "[1]", "top level must be a JSON object" },
        { "{\"a\":{\"port\":1,\"port\":2}}", "duplicate" },
        { "{", "<string>:" },
    };
    (void)state;

    for (size_t i = 0; i < CMN_ARRAY_SIZE(cases); i++) {
        int r;
        memset(&c, 0, sizeof(c));
        cmn_conf_defaults(secs, 2, &c);
        err[0] = '\0';
        r = cmn_conf_load_string(secs, 2, &c, cases[i].json, err, sizeof(err));
        if (cases[i].want_err) {
            if (r != CMN_ECONFIG || !strstr(err, cases[i].want_err))
                fail_msg("case %zu: r=%d err=\"%s\" want \"%s\"", i, r, err, cases[i].want_err);
        } else {
            assert_int_equal(r, 0);
        }
        if (i == 0) {
            assert_string_equal(c.a.name, "YUNYING");
            assert_int_equal(c.a.port, 11112);
            assert_true(c.a.enabled);
            assert_null(c.b.dir);
        }
        if (i == 1) {
            assert_string_equal(c.a.name, "PACS");
            assert_int_equal(c.a.port, 104);
            assert_string_equal(c.b.dir, "/x");
        }
        cmn_conf_free(secs, 2, &c);
        cmn_conf_free(secs, 2, &c); /* twice is safe */
    }
}

static void test_conf_file(void **state)
{
    char path[] = "/tmp/yy-conf-XXXXXX";
    char err[256];
    conf_t c;
    int fd;
    FILE *f;
    (void)state;

    fd = mkstemp(path);
    assert_true(fd >= 0);
    f = fdopen(fd, "w");
    fputs("{\"a\": {\"bogus\": true}}", f);
    fclose(f);
    memset(&c, 0, sizeof(c));
    cmn_conf_defaults(secs, 2, &c);
    assert_int_equal(cmn_conf_load(secs, 2, &c, path, err, sizeof(err)), CMN_ECONFIG);
    assert_non_null(strstr(err, path));
    assert_non_null(strstr(err, "a.bogus"));
    cmn_conf_free(secs, 2, &c);
    unlink(path);
    assert_int_equal(cmn_conf_load(secs, 2, &c, path, err, sizeof(err)), CMN_ECONFIG);
}

static void test_sha256_hmac(void **state)
{
    uint8_t d[32];
    char hex[65];
    cmn_sha256_ctx_t c;
    (void)state;

    /* FIPS 180-2 "abc" and RFC 4231 test case 2. */
    cmn_sha256("abc", 3, d);
    cmn_hex(d, 32, hex);
    assert_string_equal(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    cmn_sha256_init(&c);
    cmn_sha256_update(&c, "a", 1);
    cmn_sha256_update(&c, "bc", 2);
    cmn_sha256_final(&c, d);
    cmn_hex(d, 32, hex);
    assert_string_equal(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    cmn_hmac_sha256("Jefe", 4, "what do ya want for nothing?", 28, d);
    cmn_hex(d, 32, hex);
    assert_string_equal(hex, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
}

/* XXH3-128 in canonical hex, against python's xxhash: the empty input,
 * "abc", and 100000 patterned bytes fed in three uneven pieces. */
static void test_xxh128(void **state)
{
    enum { N = 100000 };
    uint8_t *data = malloc(N);
    char hex[CMN_XXH128_HEX_LEN + 1];
    cmn_xxh128_ctx_t c;
    (void)state;

    assert_non_null(data);
    for (size_t i = 0; i < N; i++)
        data[i] = (uint8_t)((i * 7 + 3) & 255);
    cmn_xxh128_init(&c);
    cmn_xxh128_final_hex(&c, hex);
    assert_string_equal(hex, "99aa06d3014798d86001c324468d497f");
    cmn_xxh128_init(&c);
    cmn_xxh128_update(&c, "abc", 3);
    cmn_xxh128_final_hex(&c, hex);
    assert_string_equal(hex, "06b05ab6733a618578af5f94892f3950");
    cmn_xxh128_init(&c);
    cmn_xxh128_update(&c, data, 1);
    cmn_xxh128_update(&c, data + 1, 776);
    cmn_xxh128_update(&c, data + 777, N - 777);
    cmn_xxh128_final_hex(&c, hex);
    assert_string_equal(hex, "d9e155dd16e141d00c056f6fcc340974");
    free(data);
}

/* The SHA-NI code against mbedTLS's on every length up to a few blocks,
 * fed in uneven pieces, and on 1 MiB; and the hex form. */
static void test_sha256_ni_matches_mbedtls(void **state)
{
    enum { N = 1 << 20 };
    uint8_t *data = malloc(N), a[32], b[32];
    char hex[65], want[65];
    cmn_sha256_ctx_t c;
    (void)state;

    assert_non_null(data);
    assert_int_equal(cmn_random(data, N), 0);
    for (size_t len = 0; len <= 300; len++) {
        size_t step = len % 7 + 1;
        cmn_sha256_init(&c);
        for (size_t off = 0; off < len; off += step)
            cmn_sha256_update(&c, data + off, len - off < step ? len - off : step);
        cmn_sha256_final(&c, a);
        mbedtls_sha256_ret(data, len, b, 0);
        assert_memory_equal(a, b, 32);
    }
    cmn_sha256_init(&c);
    cmn_sha256_update(&c, data, 1000);
    cmn_sha256_update(&c, data + 1000, N - 1000);
    cmn_sha256_final_hex(&c, hex);
    mbedtls_sha256_ret(data, N, b, 0);
    cmn_hex(b, 32, want);
    assert_string_equal(hex, want);
    print_message("sha256: SHA-NI %s\n", cmn_sha256_has_ni() ? "used" : "not available");
    free(data);
}

static void test_random_hex(void **state)
{
    uint8_t a[32], b[32], back[32];
    char hex[65];
    (void)state;

    assert_int_equal(cmn_random(a, sizeof(a)), 0);
    assert_int_equal(cmn_random(b, sizeof(b)), 0);
    assert_memory_not_equal(a, b, sizeof(a));
    cmn_hex(a, sizeof(a), hex);
    assert_int_equal(cmn_unhex(hex, back, sizeof(back)), 0);
    assert_memory_equal(a, back, sizeof(a));
    assert_int_equal(cmn_unhex("zz", back, 1), CMN_EPARSE);
    assert_int_equal(cmn_unhex("abc", back, 1), CMN_EPARSE);
    assert_int_equal(cmn_memeq_ct("abc", "abc", 3), 0);
    assert_int_not_equal(cmn_memeq_ct("abc", "abd", 3), 0);
}

static void test_sha256_file(void **state)
{
    char path[] = "/tmp/yy-sha-XXXXXX";
    uint8_t d[32];
    char hex[65];
    uint64_t size = 0;
    int fd;
    (void)state;

    fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, "abc", 3), 3);
    close(fd);
    assert_int_equal(cmn_sha256_file(path, d, &size), 0);
    cmn_hex(d, 32, hex);
    assert_string_equal(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    assert_int_equal(size, 3);
    unlink(path);
    assert_int_equal(cmn_sha256_file(path, d, &size), -ENOENT);
}

static void test_db(void **state)
{
    char dir[] = "/tmp/yy-db-XXXXXX";
    char path[256];
    static const char *const migs[] = {
        "CREATE TABLE t(x INTEGER)",
        "ALTER TABLE t ADD COLUMN y TEXT",
    };
    static const char *const bad[] = {
        "CREATE TABLE t(x INTEGER)",
        "ALTER TABLE t ADD COLUMN y TEXT",
        "THIS IS NOT SQL",
    };
    sqlite3 *db;
    sqlite3_stmt *st;
    (void)state;

    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof(path), "%s/t.db", dir);
    assert_int_equal(cmn_db_open(path, CMN_DB_SYNC_FULL, &db), 0);
    assert_int_equal(cmn_db_migrate(db, migs, 2), 0);
    assert_int_equal(cmn_db_migrate(db, migs, 2), 0); /* idempotent */
    assert_int_equal(cmn_db_exec(db, "INSERT INTO t VALUES (1, 'a')"), 0);
    /* A failing migration rolls back and leaves the version alone. */
    assert_int_equal(cmn_db_migrate(db, bad, 3), CMN_EDB);
    assert_int_equal(cmn_db_prepare(db, "PRAGMA user_version", &st), 0);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    assert_int_equal(sqlite3_column_int(st, 0), 2);
    sqlite3_finalize(st);
    assert_int_equal(cmn_db_prepare(db, "PRAGMA journal_mode", &st), 0);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    assert_string_equal((const char *)sqlite3_column_text(st, 0), "wal");
    sqlite3_finalize(st);
    /* A newer schema than the program knows is refused. */
    assert_int_equal(cmn_db_migrate(db, migs, 1), CMN_EDB);
    cmn_db_close(db);
    snprintf(path, sizeof(path), "rm -rf %s", dir);
    assert_int_equal(system(path), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_errors),      cmocka_unit_test(test_buf),
        cmocka_unit_test(test_conf),        cmocka_unit_test(test_conf_file),
        cmocka_unit_test(test_sha256_hmac), cmocka_unit_test(test_random_hex),
        cmocka_unit_test(test_sha256_ni_matches_mbedtls), cmocka_unit_test(test_xxh128),
        cmocka_unit_test(test_sha256_file), cmocka_unit_test(test_db),
    };
    cmn_log_set_level(CMN_LOG_ERROR + 0);
    cmn_log_set_fd(open("/dev/null", 1));
    return cmocka_run_group_tests(tests, NULL, NULL);
}
