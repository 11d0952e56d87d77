/*
 * test_query.c - the cloud's pure request parsing: QIDO query keys and
 * matching, frame lists, DICOMweb paths, static path safety.
 *
 * Includes the .c files to reach their static functions; everything else
 * they reference comes from libyycloud.a (see the Makefile).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "../../../cloud/dicomweb.c"
#include "../../../cloud/static.c"

/* cloud_conf lives in main.c, which unit tests do not link. */
static cloud_conf_t test_conf;
const cloud_conf_t *cloud_conf = &test_conf;

/* ----------------------------------------------------------------- tests */

static bool parse(const char *qs, level_t level, query_t *q)
{
    cmn_http_req_t req;

    memset(&req, 0, sizeof(req));
    req.query = qs;
    query_init(q);
    return query_parse(&req, level, q);
}

static void test_study_keys(void **state)
{
    static const struct {
        const char *qs;
        const char *where;
        int nparams;
        const char *p0;
    } ok[] = {
        { "", "", 0, NULL },
        { "PatientID=P1", " AND p.patient_id = ?", 1, "P1" },
        { "PatientID=P*", " AND p.patient_id LIKE ? ESCAPE '\\'", 1, "P%" },
        { "PatientName=wang%5E*", " AND p.name LIKE ? ESCAPE '\\'", 1, "wang^%" },
        { "PatientName=a_b%25c?", " AND p.name LIKE ? ESCAPE '\\'", 1, "a\\_b\\%c_" },
        { "StudyDate=20260101", " AND s.study_date = ?", 1, "20260101" },
        { "StudyDate=20260101-", " AND s.study_date != '' AND s.study_date >= ?", 1, "20260101" },
        { "StudyDate=-20260101", " AND s.study_date != '' AND s.study_date <= ?", 1, "20260101" },
        { "StudyDate=20250101-20260101",
          " AND s.study_date != '' AND s.study_date >= ? AND s.study_date != '' AND s.study_date <= ?",
          2, "20250101" },
        { "AccessionNumber=A1", " AND s.accession = ?", 1, "A1" },
        { "StudyInstanceUID=1.2.3,1.2.4", " AND s.study_uid IN (?,?)", 2, "1.2.3" },
        { "0020000D=1.2.3%5C1.2.4", " AND s.study_uid IN (?,?)", 2, "1.2.3" },
        { "ModalitiesInStudy=CT",
          " AND EXISTS (SELECT 1 FROM series m WHERE m.study_uid = s.study_uid AND m.modality IN (?))",
          1, "CT" },
        { "limit=5&offset=10&includefield=all&fuzzymatching=false", "", 0, NULL },
        { "PatientName=", "", 0, NULL },
    };
    (void)state;
    for (size_t i = 0; i < CMN_ARRAY_SIZE(ok); i++) {
        query_t q;
        bool r = parse(ok[i].qs, LEVEL_STUDY, &q);
        if (!r)
            fail_msg("%s: %s", ok[i].qs, q.err);
        assert_string_equal(q.where.data ? q.where.data : "", ok[i].where);
        assert_int_equal(q.nparams, ok[i].nparams);
        if (ok[i].p0)
            assert_string_equal(q.params[0], ok[i].p0);
        query_free(&q);
    }
}

static void test_limits(void **state)
{
    query_t q;
    (void)state;

    assert_true(parse("limit=5&offset=10", LEVEL_STUDY, &q));
    assert_int_equal(q.limit, 5);
    assert_int_equal(q.offset, 10);
    query_free(&q);
    assert_true(parse("", LEVEL_STUDY, &q));
    assert_int_equal(q.limit, QIDO_DEFAULT_LIMIT);
    query_free(&q);
    /* A huge limit is clamped (and answered with a warning), not refused. */
    assert_true(parse("limit=100001", LEVEL_STUDY, &q));
    assert_int_equal(q.limit, QIDO_MAX_LIMIT);
    assert_true(q.clamped);
    query_free(&q);
}

static void test_bad_queries(void **state)
{
    static const struct {
        const char *qs;
        level_t level;
    } bad[] = {
        { "StudyDate=2026", LEVEL_STUDY },
        { "StudyDate=2026010a", LEVEL_STUDY },
        { "StudyDate=20260101-2027", LEVEL_STUDY },
        { "StudyDate=-", LEVEL_STUDY },
        { "StudyDate=20260101-20270101-20280101", LEVEL_STUDY },
        { "limit=-1", LEVEL_STUDY },
        { "offset=x", LEVEL_STUDY },
        { "Foo=1", LEVEL_STUDY },
        { "Modality=CT", LEVEL_STUDY },           /* series key at study level */
        { "SOPInstanceUID=1.2", LEVEL_SERIES },
        { "StudyInstanceUID=1.2.x", LEVEL_STUDY },
        { "StudyInstanceUID=1.2,,1.3", LEVEL_STUDY },
        { "SeriesNumber=abc", LEVEL_SERIES },
    };
    (void)state;
    for (size_t i = 0; i < CMN_ARRAY_SIZE(bad); i++) {
        query_t q;
        if (parse(bad[i].qs, bad[i].level, &q))
            fail_msg("accepted: %s", bad[i].qs);
        assert_true(q.err[0] != '\0');
        query_free(&q);
    }
}

static void test_frames(void **state)
{
    uint32_t f[4];
    (void)state;

    assert_int_equal(parse_frames("1", f, 4), 1);
    assert_int_equal(f[0], 1);
    assert_int_equal(parse_frames("3,1,2", f, 4), 3);
    assert_int_equal(f[0], 3);
    assert_int_equal(f[2], 2);
    assert_int_equal(parse_frames("0", f, 4), -1);
    assert_int_equal(parse_frames("1,", f, 4), -1);
    assert_int_equal(parse_frames(",1", f, 4), -1);
    assert_int_equal(parse_frames("1;2", f, 4), -1);
    assert_int_equal(parse_frames("-1", f, 4), -1);
    assert_int_equal(parse_frames("1,2,3,4,5", f, 4), -1);
    assert_int_equal(parse_frames("99999999999", f, 4), -1);
}

static void test_paths(void **state)
{
    char buf[256], *s[MAX_SEGS];
    (void)state;

    assert_int_equal(split_path("/studies", buf, sizeof(buf), s, MAX_SEGS), 1);
    assert_int_equal(split_path("/studies/1.2/series/1.3/instances/1.4/frames/1", buf,
                                sizeof(buf), s, MAX_SEGS), 8);
    assert_string_equal(s[7], "1");
    assert_true(uids_valid(s, 8));
    assert_int_equal(split_path("/studies/1.2/series/x.y", buf, sizeof(buf), s, MAX_SEGS), 4);
    assert_false(uids_valid(s, 4));
    assert_int_equal(split_path("/a/b/c/d/e/f/g/h/i", buf, sizeof(buf), s, MAX_SEGS), MAX_SEGS);
    assert_int_equal(split_path("/a/b/c/d/e/f/g/h/i/j", buf, sizeof(buf), s, MAX_SEGS), -1);
}

static void test_static_paths(void **state)
{
    static const struct {
        const char *p;
        bool safe;
    } cases[] = {
        { "/", true },
        { "/index.html", true },
        { "/assets/app-1.js", true },
        { "/studies/1.2.3", true },
        { "/..", false },
        { "/../etc/passwd", false },
        { "/assets/../../x", false },
        { "/./x", false },
        { "/.env", false },
        { "/a\\..\\b", false },
        { "relative", false },
    };
    (void)state;
    for (size_t i = 0; i < CMN_ARRAY_SIZE(cases); i++)
        if (path_safe(cases[i].p) != cases[i].safe)
            fail_msg("path_safe(%s) != %d", cases[i].p, cases[i].safe);
    assert_string_equal(content_type("/a/b.JS"), "text/javascript; charset=utf-8");
    assert_string_equal(content_type("/a.b/c"), "application/octet-stream");
    assert_string_equal(content_type("/x.wasm"), "application/wasm");
    /* Client routes ending in a UID get the SPA fallback; files do not. */
    assert_false(has_file_ext("/2.25.1234"));
    assert_false(has_file_ext("/viewer"));
    assert_false(has_file_ext("/1.2.840.10008."));
    assert_true(has_file_ext("/app-1.js"));
    assert_true(has_file_ext("/favicon.svg"));
    assert_true(has_file_ext("/x.mp4"));
}

static void test_accept_gzip(void **state)
{
    static const struct {
        const char *ae;
        bool want;
    } cases[] = {
        { "gzip, deflate, br", true },
        { "br;q=1.0, gzip;q=0.8", true },
        { " GZIP ", true },
        { "*", true },
        { "gzip;q=0", false },
        { "gzip;q=0.000", false },
        { "deflate, br", false },
        { "x-gzip-not", false },
        { "", false },
    };
    (void)state;
    for (size_t i = 0; i < CMN_ARRAY_SIZE(cases); i++) {
        cmn_http_header_t h = { "Accept-Encoding", cases[i].ae };
        cmn_http_req_t req;
        memset(&req, 0, sizeof(req));
        req.headers = &h;
        req.nheaders = 1;
        if (cmn_http_accepts_encoding(&req, "gzip") != cases[i].want)
            fail_msg("cmn_http_accepts_encoding(\"%s\") != %d", cases[i].ae, cases[i].want);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_study_keys),
        cmocka_unit_test(test_limits),
        cmocka_unit_test(test_bad_queries),
        cmocka_unit_test(test_frames),
        cmocka_unit_test(test_paths),
        cmocka_unit_test(test_static_paths),
        cmocka_unit_test(test_accept_gzip),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
