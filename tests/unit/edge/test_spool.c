/*
 * test_spool.c - the edge's spool (edge/spool.c), upload backoff and secret
 * loading (edge/upload.c), included to reach their static functions.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "../../../edge/spool.c"
#include "../../../edge/upload.c"

/* Normally in edge/main.c. */
uint64_t edge__now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

int64_t edge__wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static char g_dir[256];

static int setup(void **state)
{
    (void)state;
    snprintf(g_dir, sizeof(g_dir), "/tmp/yy-test-spool-XXXXXX");
    if (!mkdtemp(g_dir))
        return -1;
    cmn_log_set_level(CMN_LOG_ERROR);
    return 0;
}

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb; (void)flag; (void)ftw;
    return remove(path);
}

static int teardown(void **state)
{
    (void)state;
    return nftw(g_dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

/* Writes a temp file in the spool with the given content; returns its path. */
static void write_tmp(edge_spool_t *sp, const char *content, char *path, size_t len)
{
    assert_int_equal(edge_spool_tmp_path(sp, path, len), 0);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    fputs(content, f);
    fclose(f);
}

static void test_add_claim_done(void **state)
{
    edge_spool_t *sp;
    char tmp[4096], sha[PROTO_HEX256 + 1];
    edge_spool_item_t items[4];
    int64_t id, next;
    int n;
    (void)state;

    assert_int_equal(edge_spool_open(g_dir, 0, &sp), 0);
    assert_true(edge_spool_has_space(sp));
    write_tmp(sp, "hello", tmp, sizeof(tmp));
    edge_spool_uids_t u = {"1.2.3.1", "1.2.3", "1.2.3.9"};
    assert_int_equal(edge_spool_add(sp, tmp, &u, &id, sha), 0);
    assert_int_equal(access(tmp, F_OK), -1);               /* temp file renamed */
    assert_string_equal(sha, "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");

    assert_int_equal(edge_spool_claim(sp, edge__wall_ms(), items, 4, &n, &next), 0);
    assert_int_equal(n, 1);
    assert_int_equal(next, -1);
    assert_int_equal(items[0].id, id);
    assert_string_equal(items[0].sop_uid, "1.2.3.1");
    assert_string_equal(items[0].study_uid, "1.2.3");
    assert_string_equal(items[0].series_uid, "1.2.3.9");
    assert_int_equal(items[0].size, 5);
    assert_string_equal(items[0].sha256, sha);
    assert_non_null(strstr(items[0].path, sha));
    assert_int_equal(access(items[0].path, R_OK), 0);

    /* Claimed rows are not handed out twice. */
    assert_int_equal(edge_spool_claim(sp, edge__wall_ms(), items, 4, &n, &next), 0);
    assert_int_equal(n, 0);

    assert_int_equal(edge_spool_mark_done(sp, id), 0);
    edge_spool_counts_t c;
    assert_int_equal(edge_spool_counts(sp, &c), 0);
    assert_int_equal(c.done, 1);
    assert_int_equal(c.pending + c.uploading + c.failed, 0);
    edge_spool_close(sp);
}

static void test_retry_and_due(void **state)
{
    edge_spool_t *sp;
    char tmp[4096];
    edge_spool_item_t items[4];
    int64_t id, next, now = edge__wall_ms();
    int n;
    (void)state;

    assert_int_equal(edge_spool_open(g_dir, 0, &sp), 0);
    write_tmp(sp, "abc", tmp, sizeof(tmp));
    edge_spool_uids_t u = {"1.2.4.1", "1.2.4", "1.2.4.9"};
    assert_int_equal(edge_spool_add(sp, tmp, &u, &id, NULL), 0);
    assert_int_equal(edge_spool_claim(sp, now, items, 4, &n, &next), 0);
    assert_int_equal(n, 1);
    assert_int_equal(edge_spool_mark_retry(sp, id, now + 60000, "HTTP 503"), 0);

    /* Not due yet: nothing claimed, next due reported. */
    assert_int_equal(edge_spool_claim(sp, now, items, 4, &n, &next), 0);
    assert_int_equal(n, 0);
    assert_int_equal(next, now + 60000);
    /* Due later. */
    assert_int_equal(edge_spool_claim(sp, now + 60000, items, 4, &n, &next), 0);
    assert_int_equal(n, 1);
    assert_int_equal(items[0].attempts, 1);

    assert_int_equal(edge_spool_mark_failed(sp, id, "hash mismatch"), 0);
    edge_spool_counts_t c;
    assert_int_equal(edge_spool_counts(sp, &c), 0);
    assert_int_equal(c.failed, 1);
    edge_spool_close(sp);
}

static void test_crash_recovery(void **state)
{
    edge_spool_t *sp;
    char tmp[4096], leftover[4096];
    edge_spool_item_t items[4];
    int64_t id, next;
    int n;
    (void)state;

    assert_int_equal(edge_spool_open(g_dir, 0, &sp), 0);
    write_tmp(sp, "xyz", tmp, sizeof(tmp));
    edge_spool_uids_t u = {"1.2.5.1", "1.2.5", "1.2.5.9"};
    assert_int_equal(edge_spool_add(sp, tmp, &u, &id, NULL), 0);
    assert_int_equal(edge_spool_claim(sp, edge__wall_ms(), items, 4, &n, &next), 0);
    assert_int_equal(n, 1);
    write_tmp(sp, "partial", leftover, sizeof(leftover));   /* a receive cut short */
    edge_spool_close(sp);                                   /* "crash": row UPLOADING */

    assert_int_equal(edge_spool_open(g_dir, 0, &sp), 0);
    assert_int_equal(access(leftover, F_OK), -1);           /* tmp/ cleaned */
    assert_int_equal(edge_spool_claim(sp, edge__wall_ms(), items, 4, &n, &next), 0);
    assert_int_equal(n, 1);
    assert_int_equal(items[0].id, id);
    edge_spool_close(sp);
}

static void test_no_space(void **state)
{
    edge_spool_t *sp;
    (void)state;
    assert_int_equal(edge_spool_open(g_dir, UINT64_MAX / 2, &sp), 0);
    assert_false(edge_spool_has_space(sp));
    edge_spool_close(sp);
}

static void test_add_missing_file(void **state)
{
    edge_spool_t *sp;
    edge_spool_counts_t c;
    (void)state;
    assert_int_equal(edge_spool_open(g_dir, 0, &sp), 0);
    edge_spool_uids_t u = {"1.2.6.1", "1.2.6", "1.2.6.9"};
    assert_int_equal(edge_spool_add(sp, "/nonexistent/x.part", &u, NULL, NULL), -ENOENT);
    assert_int_equal(edge_spool_counts(sp, &c), 0);
    assert_int_equal(c.pending, 0);
    edge_spool_close(sp);
}

static void test_backoff(void **state)
{
    edge_conf_upload_t c = {.retry_min_ms = 1000, .retry_max_ms = 8000};
    (void)state;
    for (int i = 0; i < 50; i++) {
        int64_t d1 = backoff_ms(&c, 1), d3 = backoff_ms(&c, 3), d9 = backoff_ms(&c, 9);
        assert_in_range(d1, 500, 1000);
        assert_in_range(d3, 2000, 4000);
        assert_in_range(d9, 4000, 8000);   /* capped */
    }
}

static void test_secret(void **state)
{
    char path[300], err[256];
    uint8_t s[128];
    size_t n;
    FILE *f;
    (void)state;

    snprintf(path, sizeof(path), "%s/secret", g_dir);
    f = fopen(path, "w");
    fputs("  00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n", f);
    fclose(f);
    assert_int_equal(edge__upload_load_secret(path, s, sizeof(s), &n, err, sizeof(err)), 0);
    assert_int_equal(n, 32);
    assert_int_equal(s[1], 0x11);

    f = fopen(path, "w");
    fputs("not hex at all, not hex at all, not hex", f);
    fclose(f);
    assert_int_equal(edge__upload_load_secret(path, s, sizeof(s), &n, err, sizeof(err)),
                     CMN_ECONFIG);
    assert_non_null(strstr(err, "upload.secret_file"));
    assert_null(strstr(err, "not hex"));   /* never echo the file's content */
}

static void test_upload_conf_check(void **state)
{
    char err[256];
    edge_conf_upload_t c = {.cloud_url = "", .edge_id = "", .secret_file = "",
                            .retry_min_ms = 10, .retry_max_ms = 100};
    (void)state;
    assert_int_equal(edge__upload_conf_check(&c, err, sizeof(err)), 0);  /* disabled */
    c.cloud_url = "ftp://x";
    assert_int_equal(edge__upload_conf_check(&c, err, sizeof(err)), CMN_ECONFIG);
    assert_non_null(strstr(err, "upload.cloud_url"));
    c.cloud_url = "http://127.0.0.1:1";
    assert_int_equal(edge__upload_conf_check(&c, err, sizeof(err)), CMN_ECONFIG);
    assert_non_null(strstr(err, "upload.edge_id"));
    c.edge_id = "bad id!";
    assert_int_equal(edge__upload_conf_check(&c, err, sizeof(err)), CMN_ECONFIG);
    assert_non_null(strstr(err, "upload.edge_id"));
    c.edge_id = "edge-01";
    assert_int_equal(edge__upload_conf_check(&c, err, sizeof(err)), CMN_ECONFIG);
    assert_non_null(strstr(err, "upload.secret_file"));
    c.retry_min_ms = 1000;
    assert_int_equal(edge__upload_conf_check(&c, err, sizeof(err)), CMN_ECONFIG);
    assert_non_null(strstr(err, "upload.retry_min_ms"));
}

static void test_split_url(void **state)
{
    edge_upload_t up;
    (void)state;
    memset(&up, 0, sizeof(up));
    assert_int_equal(split_url(&up, "https://cloud.example:8443/yy/"), 0);
    assert_string_equal(up.base_url, "https://cloud.example:8443/yy");
    assert_string_equal(up.path_prefix, "/yy");
    assert_int_equal(split_url(&up, "http://127.0.0.1:8080"), 0);
    assert_string_equal(up.base_url, "http://127.0.0.1:8080");
    assert_string_equal(up.path_prefix, "");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_add_claim_done, setup, teardown),
        cmocka_unit_test_setup_teardown(test_retry_and_due, setup, teardown),
        cmocka_unit_test_setup_teardown(test_crash_recovery, setup, teardown),
        cmocka_unit_test_setup_teardown(test_no_space, setup, teardown),
        cmocka_unit_test_setup_teardown(test_add_missing_file, setup, teardown),
        cmocka_unit_test(test_backoff),
        cmocka_unit_test_setup_teardown(test_secret, setup, teardown),
        cmocka_unit_test(test_upload_conf_check),
        cmocka_unit_test(test_split_url),
    };
    return cmocka_run_group_tests_name("edge_spool", tests, NULL, NULL);
}
