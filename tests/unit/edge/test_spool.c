/*
 * test_spool.c - the edge's spool (edge/spool.c), upload backoff, pacing and
 * secret loading (edge/upload.c), the schedule (edge/schedule.c) and the
 * clock (edge/clock.c), included to reach their static functions.
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

#include "../../../edge/clock.c"
#include "../../../edge/schedule.c"
#include "../../../edge/spool.c"
/* token.c and upload.c each have a static wipe(). */
#define wipe token_wipe
#include "../../../edge/token.c"
#undef wipe
#include "../../../edge/upload.c"

/* Records the original as the upload file, as the prepare step does. */
static void prepare(edge_spool_t *sp, int64_t id)
{
    edge_spool_item_t items[8];
    int n;
    assert_int_equal(edge_spool_list_unprepared(sp, items, 8, &n), 0);
    for (int i = 0; i < n; i++) {
        if (items[i].id != id)
            continue;
        uint8_t d[CMN_SHA256_LEN];
        char sha[PROTO_HEX256 + 1];
        uint64_t size;
        assert_int_equal(cmn_sha256_file(items[i].path, d, &size), 0);
        cmn_hex(d, sizeof(d), sha);
        assert_int_equal(edge_spool_set_upload_file(sp, id, items[i].path, sha, items[i].size,
                                                    "original"), 0);
        return;
    }
    fail_msg("row %lld is not waiting to be prepared", (long long)id);
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
    char tmp[4096], sum[CMN_XXH128_HEX_LEN + 1];
    edge_spool_item_t items[4];
    int64_t id, next;
    int n;
    (void)state;

    assert_int_equal(edge_spool_open(g_dir, 0, &sp), 0);
    assert_true(edge_spool_has_space(sp));
    write_tmp(sp, "hello", tmp, sizeof(tmp));
    edge_spool_uids_t u = {"1.2.3.1", "1.2.3", "1.2.3.9", NULL};
    assert_int_equal(edge_spool_add(sp, tmp, &u, &id, sum), 0);
    assert_int_equal(access(tmp, F_OK), -1);               /* temp file renamed */
    assert_string_equal(sum, "b5e9c1ad071b3e7fc779cfaa5e523818");   /* XXH3-128("hello") */

    /* Not prepared yet: not claimable. */
    assert_int_equal(edge_spool_claim(sp, edge__wall_ms(), items, 4, &n, &next), 0);
    assert_int_equal(n, 0);
    prepare(sp, id);
    assert_int_equal(edge_spool_claim(sp, edge__wall_ms(), items, 4, &n, &next), 0);
    assert_int_equal(n, 1);
    assert_int_equal(next, -1);
    assert_int_equal(items[0].id, id);
    assert_string_equal(items[0].sop_uid, "1.2.3.1");
    assert_string_equal(items[0].study_uid, "1.2.3");
    assert_string_equal(items[0].series_uid, "1.2.3.9");
    assert_int_equal(items[0].size, 5);
    assert_string_equal(items[0].xxh128, sum);
    assert_string_equal(items[0].sha256, "");   /* computed when prepared, not at receipt */
    const char *base = strrchr(tmp, '/') + 1;   /* tmp/<name>.part -> objects/<name>.dcm */
    assert_non_null(strstr(items[0].path, "/objects/"));
    assert_int_equal(strncmp(strrchr(items[0].path, '/') + 1, base, strcspn(base, ".")), 0);
    assert_int_equal(access(items[0].path, R_OK), 0);

    /* Claimed rows are not handed out twice. */
    assert_int_equal(edge_spool_claim(sp, edge__wall_ms(), items, 4, &n, &next), 0);
    assert_int_equal(n, 0);

    assert_string_equal(items[0].up_kind, "original");
    assert_int_equal(items[0].up_size, 5);

    assert_int_equal(edge_spool_mark_done(sp, id, 5), 0);
    edge_spool_counts_t c;
    assert_int_equal(edge_spool_counts(sp, &c), 0);
    assert_int_equal(c.done, 1);
    assert_int_equal(c.pending + c.uploading + c.failed, 0);
    edge_spool_stats_t st;
    assert_int_equal(edge_spool_stats(sp, edge__wall_ms(), &st), 0);
    assert_int_equal(st.uploaded_instances, 1);
    assert_int_equal(st.uploaded_bytes, 5);
    assert_int_equal(st.bytes_sent, 5);
    assert_int_equal(st.pending_bytes, 0);
    assert_true(st.last_success_ms > 0);
    assert_int_equal(st.done_bytes_60s, 5);
    /* DONE twice does not count twice. */
    assert_int_equal(edge_spool_mark_done(sp, id, 0), 0);
    assert_int_equal(edge_spool_stats(sp, edge__wall_ms(), &st), 0);
    assert_int_equal(st.uploaded_instances, 1);
    edge_spool_close(sp);
}

static void put_file(const char *path, const char *content)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    fputs(content, f);
    fclose(f);
}

/* The upload checks an original against the checksum taken at receipt
 * (XXH3-128), or against its SHA-256 on a row from before that column;
 * journal metadata of both versions decodes, and a record naming a file
 * outside objects/ does not. */
static void test_checksums(void **state)
{
    edge_spool_t *sp;
    edge_spool_item_t items[2];
    char tmp[4096], sum[CMN_XXH128_HEX_LEN + 1], meta[1024];
    const char *f[META_FIELDS];
    int64_t id;
    int n;
    (void)state;

    assert_int_equal(edge_spool_open(g_dir, 0, &sp), 0);
    write_tmp(sp, "hello", tmp, sizeof(tmp));
    edge_spool_uids_t u = {"1.2.3.1", "1.2.3", "1.2.3.9", "CT1"};
    assert_int_equal(edge_spool_add(sp, tmp, &u, &id, sum), 0);
    assert_int_equal(edge_spool_list_unprepared(sp, items, 2, &n), 0);
    assert_int_equal(n, 1);
    assert_int_equal(check_original(&items[0]), 0);
    put_file(items[0].path, "hellO");
    assert_int_equal(check_original(&items[0]), CMN_EHASH);

    /* A row of the previous layout: SHA-256, no XXH3-128. */
    put_file(items[0].path, "hello");
    assert_int_equal(cmn_db_exec(sp->db, "UPDATE instances SET xxh128=NULL, sha256="
                                         "'2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e730433"
                                         "62938b9824'"), 0);
    assert_int_equal(edge_spool_list_unprepared(sp, items, 2, &n), 0);
    assert_string_equal(items[0].xxh128, "");
    assert_int_equal(check_original(&items[0]), 0);
    put_file(items[0].path, "hellO");
    assert_int_equal(check_original(&items[0]), CMN_EHASH);
    unlink(items[0].path);
    assert_int_equal(check_original(&items[0]), -ENOENT);

    /* Journal metadata: this version's, and the previous one's. */
    int len = meta_encode(meta, sizeof(meta), &u, sum, 1234, "/s/objects/0a1b2c.dcm");
    assert_true(len > 0);
    assert_int_equal(meta_decode(meta, (size_t)len, f), 0);
    assert_string_equal(f[0], "2");
    assert_string_equal(f[4], "CT1");
    assert_string_equal(f[5], sum);
    assert_string_equal(f[6], "1234");
    assert_string_equal(f[7], "0a1b2c");
    static const char v1[] = "1\0" "1.2.3.1\0" "1.2.3\0" "1.2.3.9\0" "CT1\0"
                             "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824\0"
                             "99\0";
    assert_int_equal(meta_decode(v1, sizeof(v1) - 1, f), 0);
    assert_string_equal(f[7], f[5]);   /* then named by its SHA-256 */
    assert_string_equal(f[6], "99");
    len = meta_encode(meta, sizeof(meta), &u, sum, 1234, "/s/objects/../x.dcm");
    assert_int_equal(meta_decode(meta, (size_t)len, f), -EINVAL);
    assert_int_equal(meta_decode(meta, 10, f), -EINVAL);   /* cut short */
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
    edge_spool_uids_t u = {"1.2.4.1", "1.2.4", "1.2.4.9", NULL};
    assert_int_equal(edge_spool_add(sp, tmp, &u, &id, NULL), 0);
    prepare(sp, id);
    assert_int_equal(edge_spool_claim(sp, now, items, 4, &n, &next), 0);
    assert_int_equal(n, 1);
    assert_int_equal(edge_spool_mark_retry(sp, id, now + 60000, "HTTP 503", "http_5xx", 3), 0);

    /* Not due yet: nothing claimed, next due reported. */
    assert_int_equal(edge_spool_claim(sp, now, items, 4, &n, &next), 0);
    assert_int_equal(n, 0);
    assert_int_equal(next, now + 60000);
    /* Due later. */
    assert_int_equal(edge_spool_claim(sp, now + 60000, items, 4, &n, &next), 0);
    assert_int_equal(n, 1);
    assert_int_equal(items[0].attempts, 1);

    /* Released (window closed): due now, attempts unchanged. */
    assert_int_equal(edge_spool_release(sp, id, 0), 0);
    assert_int_equal(edge_spool_claim(sp, now, items, 4, &n, &next), 0);
    assert_int_equal(n, 1);
    assert_int_equal(items[0].attempts, 1);

    assert_int_equal(edge_spool_mark_failed(sp, id, "hash mismatch"), 0);
    edge_spool_counts_t c;
    assert_int_equal(edge_spool_counts(sp, &c), 0);
    assert_int_equal(c.failed, 1);
    edge_spool_stats_t st;
    assert_int_equal(edge_spool_stats(sp, now, &st), 0);
    assert_int_equal(st.nerr, 2);
    assert_string_equal(st.err[0].kind, "failed");
    assert_string_equal(st.err[1].kind, "http_5xx");
    assert_int_equal(st.err[1].count, 1);
    assert_int_equal(st.bytes_sent, 3);
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
    edge_spool_uids_t u = {"1.2.5.1", "1.2.5", "1.2.5.9", NULL};
    assert_int_equal(edge_spool_add(sp, tmp, &u, &id, NULL), 0);
    prepare(sp, id);
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

/* One process at a time on a spool (its flock; here two opens in one
 * process conflict the same way), and prepare writes a ring's never
 * written parts once: a second pass has nothing to write. */
static void test_lock_and_prepare(void **state)
{
    edge_spool_t *sp, *other;
    uint64_t written;
    int rings;
    (void)state;

    setenv("YY_SPOOL_LANE_MB", "16", 1);      /* small rings: this test writes them */
    assert_int_equal(edge_spool_open(g_dir, 0, &sp), 0);
    assert_int_equal(edge_spool_open(g_dir, 0, &other), -EBUSY);
    assert_null(other);
    assert_int_equal(edge_spool_prepare(sp, &written, &rings), 0);
    assert_true(rings >= 1);                  /* the shared ring, and lanes where they fit */
    assert_int_equal(edge_spool_prepare(sp, &written, &rings), 0);
    assert_int_equal(written, 0);
    edge_spool_close(sp);
    assert_int_equal(edge_spool_open(g_dir, 0, &sp), 0);   /* released at close */
    edge_spool_close(sp);
    unsetenv("YY_SPOOL_LANE_MB");
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
    edge_spool_uids_t u = {"1.2.6.1", "1.2.6", "1.2.6.9", NULL};
    assert_int_equal(edge_spool_add(sp, "/nonexistent/x.part", &u, NULL, NULL), -ENOENT);
    assert_int_equal(edge_spool_counts(sp, &c), 0);
    assert_int_equal(c.pending, 0);
    edge_spool_close(sp);
}

static void test_quota_and_priority(void **state)
{
    edge_spool_t *sp, *ro;
    char tmp[4096];
    edge_spool_item_t items[4];
    int64_t id1, id2, id3, next;
    bool full, low;
    int n;
    (void)state;

    assert_int_equal(edge_spool_open(g_dir, 0, &sp), 0);
    edge_spool_set_quota(sp, 10);
    edge_spool_set_urgent(sp, " ER_CT , ER_DR");
    assert_true(edge_spool_has_space(sp));
    write_tmp(sp, "123456", tmp, sizeof(tmp));
    edge_spool_uids_t u1 = {"1.2.7.1", "1.2.7", "1.2.7.9", "WARD_MR"};
    assert_int_equal(edge_spool_add(sp, tmp, &u1, &id1, NULL), 0);
    assert_true(edge_spool_has_space(sp));              /* 6 of 10 */
    write_tmp(sp, "abcdef", tmp, sizeof(tmp));
    edge_spool_uids_t u2 = {"1.2.8.1", "1.2.8", "1.2.8.9", "ER_DR"};
    assert_int_equal(edge_spool_add(sp, tmp, &u2, &id2, NULL), 0);
    assert_false(edge_spool_has_space(sp));             /* 12 of 10: quota full */
    edge_spool_alarms(sp, &full, &low);
    assert_true(full);
    assert_false(low);

    /* Read-only view agrees (what `yunying-edge status` sees). */
    edge_spool_stats_t st;
    assert_int_equal(edge_spool_open_readonly(g_dir, &ro), 0);
    assert_int_equal(edge_spool_stats(ro, edge__wall_ms(), &st), 0);
    assert_int_equal(st.counts.pending, 2);
    assert_int_equal(st.pending_bytes, 12);
    assert_int_equal(st.unprepared, 2);
    assert_int_equal(st.urgent_pending, 1);
    edge_spool_close(ro);

    /* Urgent first, although newer. */
    prepare(sp, id1);
    prepare(sp, id2);
    assert_int_equal(edge_spool_claim(sp, edge__wall_ms(), items, 1, &n, &next), 0);
    assert_int_equal(n, 1);
    assert_int_equal(items[0].id, id2);
    assert_int_equal(items[0].priority, 1);
    assert_int_equal(edge_spool_mark_done(sp, id2, 6), 0);
    assert_true(edge_spool_has_space(sp));              /* 6 of 10 again: cleared */
    edge_spool_alarms(sp, &full, &low);
    assert_false(full);
    write_tmp(sp, "xy", tmp, sizeof(tmp));
    edge_spool_uids_t u3 = {"1.2.9.1", "1.2.9", "1.2.9.9", NULL};
    assert_int_equal(edge_spool_add(sp, tmp, &u3, &id3, NULL), 0);
    edge_spool_close(sp);

    /* The count survives a restart. */
    assert_int_equal(edge_spool_open(g_dir, 0, &sp), 0);
    edge_spool_set_quota(sp, 8);
    assert_false(edge_spool_has_space(sp));             /* 6 + 2 of 8 */
    edge_spool_close(sp);
}

static void test_schedule(void **state)
{
    edge_schedule_t s;
    edge_sched_state_t st;
    char err[200], buf[512];
    (void)state;

    assert_int_equal(edge_schedule_parse("\"immediate\"", &s, err, sizeof(err)), 0);
    assert_true(s.immediate);
    edge_schedule_eval_min(&s, 600, 0, &st);
    assert_true(st.open);
    assert_int_equal(st.rate_bps, 0);
    assert_int_equal(st.change_in_ms, -1);

    assert_int_equal(edge_schedule_parse("[{\"start\":\"22:00\",\"end\":\"06:00\"},"
                                         "{\"start\":\"12:00\",\"end\":\"13:30\","
                                         "\"max_kbps\":8000}]", &s, err, sizeof(err)), 0);
    assert_int_equal(s.nwin, 2);
    edge_schedule_eval_min(&s, 21 * 60 + 59, 30000, &st);   /* 21:59:30 */
    assert_false(st.open);
    assert_int_equal(st.change_in_ms, 30000);
    edge_schedule_eval_min(&s, 23 * 60, 0, &st);
    assert_true(st.open);
    assert_int_equal(st.window, 0);
    assert_int_equal(st.rate_bps, 0);
    assert_int_equal(st.change_in_ms, 7 * 3600000);          /* until 06:00 */
    edge_schedule_eval_min(&s, 3 * 60, 0, &st);              /* over midnight */
    assert_true(st.open);
    edge_schedule_eval_min(&s, 12 * 60 + 15, 0, &st);
    assert_true(st.open);
    assert_int_equal(st.rate_bps, 1000000);                  /* 8000 kbit/s */
    assert_int_equal(st.change_in_ms, 75 * 60000);
    edge_schedule_eval_min(&s, 13 * 60 + 30, 0, &st);
    assert_false(st.open);
    edge_schedule_format(&s, buf, sizeof(buf));
    assert_string_equal(buf, "[{\"start\":\"22:00\",\"end\":\"06:00\",\"max_kbps\":0},"
                             "{\"start\":\"12:00\",\"end\":\"13:30\",\"max_kbps\":8000}]");

    assert_int_equal(edge_schedule_parse("[{\"start\":\"00:00\",\"end\":\"24:00\","
                                         "\"max_kbps\":800}]", &s, err, sizeof(err)), 0);
    edge_schedule_eval_min(&s, 5, 0, &st);
    assert_true(st.open);
    assert_int_equal(st.rate_bps, 100000);

    assert_int_equal(edge_schedule_parse("[{\"start\":\"25:00\",\"end\":\"06:00\"}]", &s,
                                         err, sizeof(err)), CMN_ECONFIG);
    assert_non_null(strstr(err, "schedule[0].start"));
    assert_int_equal(edge_schedule_parse("[{\"start\":\"22:00\",\"end\":\"6:00\"}]", &s,
                                         err, sizeof(err)), CMN_ECONFIG);
    assert_non_null(strstr(err, "schedule[0].end"));
    assert_int_equal(edge_schedule_parse("[{\"start\":\"22:00\",\"end\":\"06:00\","
                                         "\"kbps\":1}]", &s, err, sizeof(err)), CMN_ECONFIG);
    assert_non_null(strstr(err, "unknown key"));
    assert_int_equal(edge_schedule_parse("\"night\"", &s, err, sizeof(err)), CMN_ECONFIG);
    assert_int_equal(edge_schedule_parse("[]", &s, err, sizeof(err)), CMN_ECONFIG);
}

static void test_fake_clock_and_bucket(void **state)
{
    edge_upload_t up;
    edge_conf_upload_t c = {.chunk_size = 4 << 20};
    (void)state;

    setenv("YY_EDGE_TEST_CLOCK", "1000000", 1);
    assert_true(edge__clock_init_from_env());
    assert_int_equal(edge__wall_ms(), 1000000);
    assert_int_equal(edge__now_ms(), 1000000);

    memset(&up, 0, sizeof(up));
    up.conf = &c;
    up.sched_now.open = true;
    up.sched_now.rate_bps = 200000;                     /* 1.6 Mbit/s */
    assert_int_equal(chunk_size_for(&up), 196608);      /* 3 x 64 KiB, about one second */
    bucket_refill(&up);
    assert_true(up.tokens == 200000.0);                 /* a full first second */
    up.tokens -= 450000;                                /* two big chunks in debt */
    edge__clock_set(1000000 + 1000);
    bucket_refill(&up);
    assert_true(up.tokens == -50000.0);
    edge__clock_set(1000000 + 5000);
    bucket_refill(&up);
    assert_true(up.tokens == 200000.0);                 /* capped at the burst */
    up.sched_now.rate_bps = 0;
    assert_int_equal(chunk_size_for(&up), 4 << 20);
    up.sched_now.rate_bps = 1000;                       /* below the minimum chunk */
    assert_int_equal(chunk_size_for(&up), PROTO_MIN_CHUNK);
    edge__clock_set(1000000);
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
        cmocka_unit_test_setup_teardown(test_checksums, setup, teardown),
        cmocka_unit_test_setup_teardown(test_retry_and_due, setup, teardown),
        cmocka_unit_test_setup_teardown(test_crash_recovery, setup, teardown),
        cmocka_unit_test_setup_teardown(test_no_space, setup, teardown),
        cmocka_unit_test_setup_teardown(test_lock_and_prepare, setup, teardown),
        cmocka_unit_test_setup_teardown(test_add_missing_file, setup, teardown),
        cmocka_unit_test_setup_teardown(test_quota_and_priority, setup, teardown),
        cmocka_unit_test(test_schedule),
        cmocka_unit_test(test_fake_clock_and_bucket),
        cmocka_unit_test(test_backoff),
        cmocka_unit_test_setup_teardown(test_secret, setup, teardown),
        cmocka_unit_test(test_upload_conf_check),
        cmocka_unit_test(test_split_url),
    };
    return cmocka_run_group_tests_name("edge_spool", tests, NULL, NULL);
}
