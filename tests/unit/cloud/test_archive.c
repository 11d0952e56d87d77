/*
 * test_archive.c - cloud/archive.c with both backends: "dir" and "s3"
 * (OpenStack Swift + s3api via tests/infra/swift.sh; see swift_fixture.h).
 *
 * Includes archive.c to reach archive_rel()/archive_key(); cloud_conf is ours.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "../../../cloud/archive.c"
#include "../common/swift_fixture.h"

static cloud_conf_t test_conf;
const cloud_conf_t *cloud_conf = &test_conf;

static struct {
    swift_fixture_t fx;
    char tmp[64];                  /* scratch: staging files and archive dirs */
    char dir[128];                 /* archive.dir */
} g;

static int group_setup(void **state)
{
    (void)state;
    unsetenv("http_proxy");
    unsetenv("HTTP_PROXY");
    snprintf(g.tmp, sizeof(g.tmp), "/tmp/yy-arch-XXXXXX");
    if (!mkdtemp(g.tmp))
        return -1;
    cmn_log_set_level(CMN_LOG_WARN);
    return swift_fixture_start(&g.fx);
}

static int group_teardown(void **state)
{
    (void)state;
    cloud_archive_shutdown();
    swift_fixture_stop(&g.fx);
    sfx_rm_rf(g.tmp);
    return 0;
}

static void use_conf(const char *backend, const char *sub)
{
    cloud_archive_shutdown();
    snprintf(g.dir, sizeof(g.dir), "%s/%s", g.tmp, sub);
    memset(&test_conf, 0, sizeof(test_conf));
    test_conf.archive.dir = g.dir;
    test_conf.archive.backend = (char *)backend;
    test_conf.archive.s3_endpoint = g.fx.endpoint;
    test_conf.archive.s3_region = g.fx.region;
    test_conf.archive.s3_bucket = g.fx.bucket;
    test_conf.archive.s3_access_key = g.fx.access_key;
    test_conf.archive.s3_secret_file = g.fx.secret_file;
    test_conf.archive.s3_path_style = true;
    assert_int_equal(cmn_mkdirs(g.dir), 0);
}

/* A staged file of n deterministic bytes; returns its path in out. */
static void stage(const char *name, size_t n, uint8_t seed, char *out, size_t outlen)
{
    snprintf(out, outlen, "%s/%s", g.tmp, name);
    FILE *f = fopen(out, "wb");
    assert_non_null(f);
    for (size_t i = 0; i < n; i++)
        fputc((int)(uint8_t)(i * 31 + seed), f);
    assert_int_equal(fclose(f), 0);
}

/* The directory part of path (static buffer). */
static const char *dirname_of(const char *path)
{
    static char d[1200];
    snprintf(d, sizeof(d), "%.*s", (int)(strrchr(path, '/') - path), path);
    return d;
}

static void check_content(const char *path, size_t n, uint8_t seed)
{
    FILE *f = fopen(path, "rb");
    size_t i = 0;
    int c;

    assert_non_null(f);
    while ((c = fgetc(f)) != EOF) {
        assert_int_equal(c, (uint8_t)(i * 31 + seed));
        i++;
    }
    fclose(f);
    assert_int_equal(i, n);
}

static void test_key(void **state)
{
    (void)state;
    memset(&test_conf, 0, sizeof(test_conf));
    test_conf.archive.dir = "/srv/archive/";
    char key[64];
    assert_string_equal(archive_rel("/srv/archive/ab/cd/ef.dcm"), "ab/cd/ef.dcm");
    assert_null(archive_rel("/srv/archive"));
    assert_null(archive_rel("/srv/archive/"));
    assert_null(archive_rel("/srv/archived/x"));
    assert_null(archive_rel("/elsewhere/x"));
    assert_int_equal(archive_key("/srv/archive/ab/cd/ef.dcm", key, sizeof(key)), 0);
    assert_string_equal(key, "ab/cd/ef.dcm");
    test_conf.archive.s3_prefix = "site1/";
    assert_int_equal(archive_key("/srv/archive/ab/cd/ef.dcm", key, sizeof(key)), 0);
    assert_string_equal(key, "site1/ab/cd/ef.dcm");
    assert_int_equal(archive_key("/elsewhere/x", key, sizeof(key)), -EINVAL);
    assert_int_equal(archive_key("/srv/archive/ab/cd/ef.dcm", key, 8), -ENAMETOOLONG);
}

static void test_dir_backend(void **state)
{
    char src[256], dst[1024];
    uint8_t buf[16];
    size_t got;
    (void)state;

    use_conf("dir", "dirbk");
    assert_false(cloud_archive_is_s3());
    assert_int_equal(cloud_archive_open(), 0);
    stage("d1", 1000, 1, src, sizeof(src));
    assert_int_equal(cloud_archive_path("1.2.3", "1.2.3.4", "1.2.3.4.5", dst, sizeof(dst)), 0);
    assert_int_equal(cloud_archive_place(src, dst), 0);
    assert_int_equal(access(src, F_OK), -1);
    check_content(dst, 1000, 1);
    assert_int_equal(cloud_archive_fetch(dst), 0);
    assert_int_equal(cloud_archive_read_range(dst, 10, sizeof(buf), buf, &got), 0);
    assert_int_equal(got, sizeof(buf));
    assert_int_equal(buf[0], (uint8_t)(10 * 31 + 1));
    assert_int_equal(cloud_archive_read_range(dst, 1000, 4, buf, &got), -ERANGE);
    unlink(dst);
    assert_int_equal(cloud_archive_fetch(dst), CMN_ENOTFOUND);
    assert_int_equal(cloud_archive_read_range(dst, 0, 4, buf, &got), CMN_ENOTFOUND);

    cmn_log_set_level(CMN_LOG_ERROR);   /* the expected errors still print */
    test_conf.archive.backend = "tape";
    assert_int_equal(cloud_archive_open(), CMN_ECONFIG);
    test_conf.archive.backend = "s3";
    test_conf.archive.s3_bucket = "";
    assert_int_equal(cloud_archive_open(), CMN_ECONFIG);
    cmn_log_set_level(CMN_LOG_WARN);
}

static void test_s3_backend(void **state)
{
    char src[256], dst[1024], conflict[1024];
    uint8_t buf[64];
    size_t got;
    cmn_s3_stat_t st;
    (void)state;

    if (g.fx.skip)
        skip();
    assert_true(g.fx.have);
    use_conf("s3", "s3cache");
    assert_true(cloud_archive_is_s3());
    assert_int_equal(cloud_archive_open(), 0);

    /* place = verified PUT, then the local copy stays as cache. */
    const size_t n = 300000;
    stage("s1", n, 7, src, sizeof(src));
    assert_int_equal(cloud_archive_path("1.2.840.1", "1.2.840.1.2", "1.2.840.1.2.3", dst,
                                        sizeof(dst)), 0);
    assert_int_equal(cloud_archive_place(src, dst), 0);
    check_content(dst, n, 7);
    cmn_s3_t *s3;
    assert_int_equal(archive_client(&s3), 0);
    assert_non_null(s3);
    char key[CMN_S3_MAX_KEY + 1];
    assert_int_equal(archive_key(dst, key, sizeof(key)), 0);
    assert_int_equal(cmn_s3_head(s3, key, &st), 0);
    assert_int_equal(st.size, n);

    /* Another node (empty cache): ranged read from S3, then fetch. */
    assert_int_equal(unlink(dst), 0);
    assert_int_equal(cloud_archive_read_range(dst, 1000, sizeof(buf), buf, &got), 0);
    assert_int_equal(got, sizeof(buf));
    for (size_t i = 0; i < got; i++)
        assert_int_equal(buf[i], (uint8_t)((1000 + i) * 31 + 7));
    assert_int_equal(access(dst, F_OK), -1);   /* a range read does not cache */
    assert_int_equal(cloud_archive_fetch(dst), 0);
    check_content(dst, n, 7);

    /* Conflicting copies go to S3 too. */
    stage("s2", 1234, 9, src, sizeof(src));
    assert_int_equal(cloud_archive_conflict_path("1.2.840.1.2.3", "ab12", conflict,
                                                 sizeof(conflict)), 0);
    assert_int_equal(cloud_archive_place(src, conflict), 0);
    assert_int_equal(archive_key(conflict, key, sizeof(key)), 0);
    assert_int_equal(cmn_s3_head(s3, key, &st), 0);
    assert_int_equal(st.size, 1234);

    /* Missing everywhere. */
    char missing[1024];
    assert_int_equal(cloud_archive_path("9", "9.9", "9.9.9", missing, sizeof(missing)), 0);
    assert_int_equal(cloud_archive_fetch(missing), CMN_ENOTFOUND);
    assert_int_equal(cloud_archive_read_range(missing, 0, 4, buf, &got), CMN_ENOTFOUND);

    /* A failed upload leaves src in place and nothing at dst. */
    cloud_archive_shutdown();
    char badsecret[256];
    snprintf(badsecret, sizeof(badsecret), "%s/badsecret", g.tmp);
    FILE *f = fopen(badsecret, "w");
    assert_non_null(f);
    fputs("wrong\n", f);
    fclose(f);
    test_conf.archive.s3_secret_file = badsecret;
    stage("s3", 100, 3, src, sizeof(src));
    assert_int_equal(cloud_archive_path("8", "8.8", "8.8.8", dst, sizeof(dst)), 0);
    cmn_log_set_level(CMN_LOG_ERROR);   /* the expected errors still print */
    assert_int_equal(cloud_archive_place(src, dst), CMN_EAUTH);
    cmn_log_set_level(CMN_LOG_WARN);
    assert_int_equal(access(src, F_OK), 0);
    assert_int_equal(access(dst, F_OK), -1);
    cloud_archive_shutdown();
}


/* File hash as hex, for comparing with cloud_archive_hash(). */
static void file_sha(const char *path, char hex[65])
{
    uint8_t d[CMN_SHA256_LEN];
    uint64_t n;

    assert_int_equal(cmn_sha256_file(path, d, &n), 0);
    cmn_hex(d, sizeof(d), hex);
}

static void test_s3_hash_delete_cache(void **state)
{
    char src[256], dst[1024], hex[65], want[65], key[CMN_S3_MAX_KEY + 1];
    char paths[6][1024];
    uint64_t size;
    cmn_s3_stat_t st;
    cmn_s3_t *s3;
    (void)state;

    if (g.fx.skip)
        skip();
    use_conf("s3", "s3cache");
    test_conf.archive.s3_prefix = "unit-cache/";
    assert_int_equal(cloud_archive_probe(), 0);

    /* place_sha with the right hash; a wrong one is refused by the server. */
    stage("h1", 3 << 20, 5, src, sizeof(src));
    file_sha(src, want);
    assert_int_equal(cloud_archive_path("7", "7.1", "7.1.1", dst, sizeof(dst)), 0);
    assert_int_equal(cloud_archive_place_sha(src, dst, want), 0);
    assert_int_equal(cloud_archive_hash(dst, true, hex, &size), 0);   /* the object */
    assert_string_equal(hex, want);
    assert_int_equal(size, 3 << 20);
    assert_int_equal(cloud_archive_hash(dst, false, hex, &size), 0);  /* the cached copy */
    assert_string_equal(hex, want);
    stage("h2", 1000, 6, src, sizeof(src));
    assert_int_equal(cloud_archive_path("7", "7.1", "7.1.2", paths[0], sizeof(paths[0])), 0);
    cmn_log_set_level(CMN_LOG_ERROR);
    assert_int_equal(cloud_archive_place_sha(src, paths[0], want), CMN_EHASH);
    cmn_log_set_level(CMN_LOG_WARN);
    assert_int_equal(access(src, F_OK), 0);

    /* Delete: object and cached copy; deleting again is fine. */
    assert_int_equal(cloud_archive_delete(dst), 0);
    assert_int_equal(access(dst, F_OK), -1);
    assert_int_equal(archive_client(&s3), 0);
    assert_int_equal(archive_key(dst, key, sizeof(key)), 0);
    assert_int_equal(cmn_s3_head(s3, key, &st), CMN_ENOTFOUND);
    assert_int_equal(cloud_archive_hash(dst, true, hex, &size), CMN_ENOTFOUND);
    assert_int_equal(cloud_archive_delete(dst), 0);
    assert_int_equal(cloud_archive_delete("/not/under/the/archive.dcm"), -EINVAL);

    /* Cache cap 1 MiB, files of 400 KiB: old files in the bucket are evicted,
     * a file that is not in the bucket never is. */
    test_conf.archive.cache_max_mb = 1;
    test_conf.archive.cache_min_age_s = 0;
    char orphan[1200];
    snprintf(orphan, sizeof(orphan), "%s/zz/orphan.dcm", g.dir);
    assert_int_equal(cmn_mkdirs(dirname_of(orphan)), 0);
    stage("orphan", 400 << 10, 1, src, sizeof(src));
    assert_int_equal(rename(src, orphan), 0);
    struct timespec old[2] = { { time(NULL) - 3600, 0 }, { time(NULL) - 3600, 0 } };
    assert_int_equal(utimensat(AT_FDCWD, orphan, old, 0), 0);
    for (int i = 0; i < 5; i++) {
        char sop[32];
        snprintf(sop, sizeof(sop), "7.2.%d", i);
        stage("c", 400 << 10, (uint8_t)i, src, sizeof(src));
        assert_int_equal(cloud_archive_path("7", "7.2", sop, paths[i], sizeof(paths[i])), 0);
        assert_int_equal(cloud_archive_place(src, paths[i]), 0);
        assert_int_equal(access(paths[i], F_OK), 0);   /* the newest file stays */
        assert_int_equal(utimensat(AT_FDCWD, paths[i], old, 0), 0);
    }
    int cached = 0;
    for (int i = 0; i < 5; i++)
        cached += access(paths[i], F_OK) == 0;
    assert_true(cached <= 2);
    assert_int_equal(access(orphan, F_OK), 0);
    /* Evicted files come back from the bucket. */
    for (int i = 0; i < 5; i++) {
        assert_int_equal(cloud_archive_fetch(paths[i]), 0);
        check_content(paths[i], 400 << 10, (uint8_t)i);
    }
    test_conf.archive.cache_max_mb = 0;
    for (int i = 0; i < 5; i++)
        assert_int_equal(cloud_archive_delete(paths[i]), 0);
    cloud_archive_shutdown();
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_key),
        cmocka_unit_test(test_dir_backend),
        cmocka_unit_test(test_s3_backend),
        cmocka_unit_test(test_s3_hash_delete_cache),
    };

    return cmocka_run_group_tests_name("archive", tests, group_setup, group_teardown);
}
