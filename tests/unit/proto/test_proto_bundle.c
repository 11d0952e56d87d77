/*
 * test_proto_bundle.c - bundle headers, bundle commit answers, manifests:
 * round trips and hostile decodes.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cmn/errors.h"
#include "proto/proto.h"

#define HEXA "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"

static void fill(proto_bundle_t *b, proto_bundle_member_t *m, uint32_t n)
{
    memset(b, 0, sizeof(*b));
    strcpy(b->study_uid, "1.2.3");
    b->n = n;
    b->m = m;
    for (uint32_t i = 0; i < n; i++) {
        memset(&m[i], 0, sizeof(m[i]));
        snprintf(m[i].sop_uid, sizeof(m[i].sop_uid), "1.2.3.4.%u", i + 1);
        strcpy(m[i].series_uid, "1.2.3.4");
        strcpy(m[i].sha256, HEXA);
        m[i].size = 100 + i;
    }
}

static void test_header_roundtrip(void **state)
{
    proto_bundle_member_t m[3];
    proto_bundle_t b, d;
    char err[128];
    uint8_t *hdr, *again;
    (void)state;

    fill(&b, m, 3);
    hdr = proto_bundle_header_encode(&b);
    assert_non_null(hdr);
    assert_memory_equal(hdr, PROTO_BUNDLE_MAGIC, 8);
    assert_int_equal(b.size, b.header_len + 100 + 101 + 102);
    assert_int_equal(m[0].offset, b.header_len);
    assert_int_equal(m[2].offset, b.header_len + 201);
    /* deterministic */
    again = proto_bundle_header_encode(&b);
    assert_memory_equal(hdr, again, b.header_len);
    free(again);
    assert_int_equal(proto_bundle_header_decode(hdr, b.header_len, b.size, &d, err,
                                                sizeof(err)), 0);
    assert_int_equal(d.n, 3);
    assert_string_equal(d.m[1].sop_uid, "1.2.3.4.2");
    assert_int_equal(d.m[2].offset, m[2].offset);
    proto_bundle_free(&d);
    /* the members must fill the declared size exactly */
    assert_int_equal(proto_bundle_header_decode(hdr, b.header_len, b.size + 1, &d, err,
                                                sizeof(err)), CMN_EPARSE);
    assert_int_equal(proto_bundle_header_decode(hdr, b.header_len, b.size - 1, &d, err,
                                                sizeof(err)), CMN_EPARSE);
    /* truncated, bad magic */
    assert_int_equal(proto_bundle_header_decode(hdr, b.header_len - 1, b.size, &d, err,
                                                sizeof(err)), CMN_EPARSE);
    hdr[0] = 'X';
    assert_int_equal(proto_bundle_header_decode(hdr, b.header_len, b.size, &d, err,
                                                sizeof(err)), CMN_EPARSE);
    free(hdr);
    /* invalid member: no header */
    strcpy(m[1].sop_uid, "1..2");
    assert_null(proto_bundle_header_encode(&b));
}

static void test_commit_roundtrip(void **state)
{
    proto_member_result_t r[2] = { { "1.2.3", PROTO_COMMIT_STORED },
                                   { "1.2.4", PROTO_COMMIT_REJECTED } };
    proto_bundle_commit_t c = { 2, r }, d;
    proto_commit_t one = { PROTO_COMMIT_REJECTED, "1.2.3" };
    char err[128], *json;
    (void)state;

    json = proto_bundle_commit_encode(&c);
    assert_non_null(json);
    assert_int_equal(proto_bundle_commit_decode(json, strlen(json), &d, err, sizeof(err)), 0);
    assert_int_equal(d.n, 2);
    assert_int_equal(d.m[1].result, PROTO_COMMIT_REJECTED);
    assert_string_equal(d.m[0].sop_uid, "1.2.3");
    proto_bundle_commit_free(&d);
    free(json);
    /* "rejected" is not an instance answer */
    assert_null(proto_commit_encode(&one));
    const char *bad = "{\"v\":1,\"result\":\"bundle\",\"members\":[{\"sop_uid\":\"1.2\","
                      "\"result\":\"eaten\"}]}";
    assert_int_equal(proto_bundle_commit_decode(bad, strlen(bad), &d, err, sizeof(err)),
                     CMN_EPARSE);
}

static void test_decl_bundle(void **state)
{
    proto_object_decl_t d = { 0 }, e;
    char err[128], *json;
    (void)state;

    d.kind = PROTO_KIND_BUNDLE;
    strcpy(d.sha256, HEXA);
    d.size = 1 << 20;
    d.chunk_size = 4u << 20;
    strcpy(d.study_uid, "1.2.3");
    d.members = 7;
    json = proto_object_decl_encode(&d);
    assert_non_null(json);
    assert_int_equal(proto_object_decl_decode(json, strlen(json), &e, err, sizeof(err)), 0);
    assert_memory_equal(&d, &e, sizeof(d));
    free(json);
    const char *zero = "{\"v\":1,\"kind\":\"bundle\",\"sha256\":\"" HEXA "\",\"size\":100,"
                       "\"chunk_size\":65536,\"study_uid\":\"1.2\",\"members\":0}";
    assert_int_equal(proto_object_decl_decode(zero, strlen(zero), &e, err, sizeof(err)),
                     CMN_EPARSE);
}

static void test_manifest(void **state)
{
    proto_manifest_entry_t e[2] = { { "1.2.3.4", "1.2.3.4.1", HEXA },
                                    { "1.2.3.4", "1.2.3.4.2", HEXA } };
    proto_manifest_t m = { "1.2.3", 2, e }, d;
    proto_manifest_status_t s = { "1.2.3", 2, 1, 1, 0, false }, t;
    char err[128], *json;
    (void)state;

    json = proto_manifest_encode(&m);
    assert_non_null(json);
    assert_int_equal(proto_manifest_decode(json, strlen(json), &d, err, sizeof(err)), 0);
    assert_int_equal(d.n, 2);
    assert_string_equal(d.e[1].sop_uid, "1.2.3.4.2");
    proto_manifest_free(&d);
    free(json);
    json = proto_manifest_status_encode(&s);
    assert_non_null(json);
    assert_int_equal(proto_manifest_status_decode(json, strlen(json), &t, err, sizeof(err)), 0);
    assert_string_equal(t.study_uid, "1.2.3");
    assert_int_equal(t.expected, 2);
    assert_int_equal(t.received, 1);
    assert_int_equal(t.missing, 1);
    assert_int_equal(t.mismatched, 0);
    assert_false(t.complete);
    free(json);
    const char *empty = "{\"v\":1,\"study_uid\":\"1.2\",\"instances\":[]}";
    assert_int_equal(proto_manifest_decode(empty, strlen(empty), &d, err, sizeof(err)),
                     CMN_EPARSE);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_header_roundtrip),
        cmocka_unit_test(test_commit_roundtrip),
        cmocka_unit_test(test_decl_bundle),
        cmocka_unit_test(test_manifest),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
