/*
 * test_proto.c - message round trips, hostile decodes, signatures.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cmn/crypto.h"
#include "cmn/errors.h"
#include "proto/proto.h"

#define HEXA "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"

static void test_decl_roundtrip(void **state)
{
    proto_object_decl_t d = { 0 }, e;
    char err[128];
    char *json;
    (void)state;

    d.kind = PROTO_KIND_INSTANCE;
    strcpy(d.sha256, HEXA);
    d.size = 525000;
    d.chunk_size = 4u << 20;
    strcpy(d.study_uid, "1.2.3");
    strcpy(d.series_uid, "1.2.3.4");
    strcpy(d.sop_uid, "1.2.3.4.5");
    json = proto_object_decl_encode(&d);
    assert_non_null(json);
    assert_int_equal(proto_object_decl_decode(json, strlen(json), &e, err, sizeof(err)), 0);
    assert_memory_equal(&d, &e, sizeof(d));
    free(json);
}

static void test_decl_rejects(void **state)
{
    static const struct {
        const char *json;
        const char *why;
    } bad[] = {
        { "", "invalid JSON" },
        { "[]", "expected a JSON object" },
        { "{\"v\":2}", "version" },
        { "{\"v\":1,\"kind\":\"zip\"}", "kind" },
        { "{\"v\":1,\"kind\":\"instance\",\"sha256\":\"ABC\"}", "sha256" },
        { "{\"v\":1,\"kind\":\"instance\",\"sha256\":\"" HEXA "\",\"size\":0}", "size" },
        { "{\"v\":1,\"kind\":\"instance\",\"sha256\":\"" HEXA "\",\"size\":10,\"chunk_size\":1}",
          "chunk_size" },
        { "{\"v\":1,\"kind\":\"instance\",\"sha256\":\"" HEXA
          "\",\"size\":10,\"chunk_size\":65536,\"study_uid\":\"1..2\"}",
          "study_uid" },
        { "{\"v\":1,\"kind\":\"instance\",\"sha256\":\"" HEXA
          "\",\"size\":10,\"chunk_size\":65536,\"study_uid\":\"1.2\",\"series_uid\":\"1.2\","
          "\"sop_uid\":\"1.2.x\"}",
          "sop_uid" },
    };
    proto_object_decl_t d;
    char err[128];
    (void)state;

    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        err[0] = 0;
        if (proto_object_decl_decode(bad[i].json, strlen(bad[i].json), &d, err, sizeof(err)) !=
                CMN_EPARSE ||
            !strstr(err, bad[i].why))
            fail_msg("case %zu: err=\"%s\", want \"%s\"", i, err, bad[i].why);
    }
}

static void test_status_roundtrip(void **state)
{
    proto_object_status_t s = { 0 }, t;
    uint8_t have[5] = { 1, 0, 1, 1, 0 };
    char err[128];
    char *json;
    (void)state;

    strcpy(s.object_id, HEXA);
    s.chunk_size = 1u << 20;
    s.nchunks = 5;
    s.state = PROTO_OBJ_OPEN;
    s.have = have;
    json = proto_object_status_encode(&s);
    assert_non_null(json);
    assert_int_equal(proto_object_status_decode(json, strlen(json), &t, err, sizeof(err)), 0);
    assert_string_equal(t.object_id, HEXA);
    assert_int_equal(t.nchunks, 5);
    assert_int_equal(t.state, PROTO_OBJ_OPEN);
    assert_memory_equal(t.have, have, 5);
    proto_object_status_free(&t);
    proto_object_status_free(&t);
    free(json);

    /* A chunk index past nchunks is refused and nothing leaks. */
    json = "{\"v\":1,\"object_id\":\"" HEXA "\",\"chunk_size\":65536,\"nchunks\":2,"
           "\"state\":\"open\",\"have\":[0,2]}";
    assert_int_equal(proto_object_status_decode(json, strlen(json), &t, err, sizeof(err)),
                     CMN_EPARSE);
    assert_null(t.have);
}

static void test_commit_error(void **state)
{
    proto_commit_t c = { PROTO_COMMIT_CONFLICT, "1.2.840.1" }, d;
    proto_error_t e;
    char err[128];
    char *json;
    (void)state;

    json = proto_commit_encode(&c);
    assert_int_equal(proto_commit_decode(json, strlen(json), &d, err, sizeof(err)), 0);
    assert_int_equal(d.result, PROTO_COMMIT_CONFLICT);
    assert_string_equal(d.sop_uid, "1.2.840.1");
    free(json);
    json = proto_error_encode("bad_signature", "signature mismatch");
    assert_int_equal(proto_error_decode(json, strlen(json), &e), 0);
    assert_string_equal(e.code, "bad_signature");
    assert_string_equal(e.message, "signature mismatch");
    assert_true(e.server_time == 0);
    free(json);
    json = proto_clock_skew_encode(1764340000, "sign with server_time");
    assert_int_equal(proto_error_decode(json, strlen(json), &e), 0);
    assert_string_equal(e.code, "clock_skew");
    assert_true(e.server_time == 1764340000);
    free(json);
}

static void test_chunks(void **state)
{
    (void)state;
    assert_int_equal(proto_chunk_count(1, 65536), 1);
    assert_int_equal(proto_chunk_count(65536, 65536), 1);
    assert_int_equal(proto_chunk_count(65537, 65536), 2);
    assert_int_equal(proto_chunk_len(65537, 65536, 0), 65536);
    assert_int_equal(proto_chunk_len(65537, 65536, 1), 1);
    assert_int_equal(proto_chunk_len(65537, 65536, 2), 0);
    assert_true(proto_uid_valid("1.2.840.10008.1.2"));
    assert_false(proto_uid_valid("1.2."));
    assert_false(proto_uid_valid(".1"));
    assert_false(proto_uid_valid(""));
}

static proto_req_t sample_req(void)
{
    proto_req_t r = {
        .method = "PUT",
        .path = "/api/v1/objects/" HEXA "/chunks/0",
        .query = "z=1&a=2&a=1",
        .edge_id = "edge-01",
        .timestamp = 1700000000,
        .nonce = "00112233445566778899aabbccddeeff",
        .body_sha256 = HEXA,
    };
    return r;
}

static void test_canonical(void **state)
{
    proto_req_t r = sample_req();
    char *c = proto_canonical_request(&r);
    (void)state;

    assert_string_equal(c, "PUT\n/api/v1/objects/" HEXA "/chunks/0\na=1&a=2&z=1\nedge-01\n"
                           "1700000000\n00112233445566778899aabbccddeeff\n" HEXA);
    free(c);
    r.edge_id = "evil\nedge";
    assert_null(proto_canonical_request(&r));
}

static void test_sign_verify(void **state)
{
    static const uint8_t secret[] = "0123456789abcdef0123456789abcdef";
    proto_req_t r = sample_req();
    char sig[65], bad[65];
    (void)state;

    assert_int_equal(proto_sign(secret, 32, &r, sig), 0);
    assert_int_equal(proto_verify(secret, 32, &r, sig, 1700000000, 300), PROTO_SIG_OK);
    /* Query order does not matter. */
    r.query = "a=1&z=1&a=2";
    assert_int_equal(proto_verify(secret, 32, &r, sig, 1700000000, 300), PROTO_SIG_OK);
    r = sample_req();
    /* Stale and future timestamps. */
    assert_int_equal(proto_verify(secret, 32, &r, sig, 1700000301, 300), PROTO_SIG_STALE);
    assert_int_equal(proto_verify(secret, 32, &r, sig, 1699999699, 300), PROTO_SIG_STALE);
    /* Any single changed signature byte fails, stale or not: only the key's
     * holder learns that its clock is off. */
    for (int i = 0; i < 64; i++) {
        memcpy(bad, sig, sizeof(bad));
        bad[i] = bad[i] == 'a' ? 'b' : 'a';
        assert_int_equal(proto_verify(secret, 32, &r, bad, 1700000000, 300), PROTO_SIG_BAD);
        assert_int_equal(proto_verify(secret, 32, &r, bad, 1700000301, 300), PROTO_SIG_BAD);
    }
    /* Every signed field matters. */
    r.method = "GET";
    assert_int_equal(proto_verify(secret, 32, &r, sig, 1700000000, 300), PROTO_SIG_BAD);
    r = sample_req();
    r.path = "/api/v1/objects/x";
    assert_int_equal(proto_verify(secret, 32, &r, sig, 1700000000, 300), PROTO_SIG_BAD);
    r = sample_req();
    r.nonce = "00112233445566778899aabbccddeefe";
    assert_int_equal(proto_verify(secret, 32, &r, sig, 1700000000, 300), PROTO_SIG_BAD);
    r = sample_req();
    r.body_sha256 = "ca7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    assert_int_equal(proto_verify(secret, 32, &r, sig, 1700000000, 300), PROTO_SIG_BAD);
    r = sample_req();
    r.edge_id = "edge-02";
    assert_int_equal(proto_verify(secret, 32, &r, sig, 1700000000, 300), PROTO_SIG_BAD);
    r = sample_req();
    assert_int_equal(proto_verify((const uint8_t *)"other", 5, &r, sig, 1700000000, 300),
                     PROTO_SIG_BAD);
    /* Malformed values. */
    r.nonce = "xyz";
    assert_int_equal(proto_verify(secret, 32, &r, sig, 1700000000, 300), PROTO_SIG_MALFORMED);
    r = sample_req();
    assert_int_equal(proto_verify(secret, 32, &r, "abc", 1700000000, 300), PROTO_SIG_MALFORMED);
}

static void test_token_roundtrip(void **state)
{
    (void)state;
    proto_token_t t, u;
    char err[128];

    memset(&t, 0, sizeof(t));
    snprintf(t.token_id, sizeof(t.token_id), "%s", "00112233445566778899aabbccddeeff");
    for (int i = 0; i < PROTO_TOKEN_KEY_LEN; i++)
        t.key[i] = (uint8_t)(i * 7 + 1);
    t.expires_at = 1700000900;
    t.ttl_s = 900;
    char *json = proto_token_encode(&t);
    assert_non_null(json);
    assert_int_equal(proto_token_decode(json, strlen(json), &u, err, sizeof(err)), 0);
    assert_string_equal(u.token_id, t.token_id);
    assert_memory_equal(u.key, t.key, sizeof(t.key));
    assert_int_equal(u.expires_at, t.expires_at);
    assert_int_equal(u.ttl_s, t.ttl_s);
    free(json);

    static const char *const bad[] = {
        "{\"v\":1,\"token_id\":\"0011\",\"key\":\"" HEXA "\",\"expires_at\":5,\"ttl_s\":9}",
        "{\"v\":1,\"token_id\":\"00112233445566778899AABBCCDDEEFF\",\"key\":\"" HEXA
        "\",\"expires_at\":5,\"ttl_s\":9}",
        "{\"v\":1,\"token_id\":\"00112233445566778899aabbccddeeff\",\"key\":\"abc\","
        "\"expires_at\":5,\"ttl_s\":9}",
        "{\"v\":1,\"token_id\":\"00112233445566778899aabbccddeeff\",\"key\":\"" HEXA
        "\",\"expires_at\":5,\"ttl_s\":0}",
        "{\"v\":2,\"token_id\":\"00112233445566778899aabbccddeeff\",\"key\":\"" HEXA
        "\",\"expires_at\":5,\"ttl_s\":9}",
        "[]", "",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        assert_int_equal(proto_token_decode(bad[i], strlen(bad[i]), &u, err, sizeof(err)),
                         CMN_EPARSE);
        assert_int_equal(u.token_id[0], 0);
    }
    json = proto_token_request_encode();
    assert_string_equal(json, "{\"v\":1}");
    assert_int_equal(proto_token_request_decode(json, strlen(json), err, sizeof(err)), 0);
    free(json);
    assert_int_equal(proto_token_request_decode("{\"v\":7}", 7, err, sizeof(err)), CMN_EPARSE);
}

static void test_cidr(void **state)
{
    (void)state;
    static const struct {
        const char *list, *addr;
        bool allowed;
    } cases[] = {
        {"", "203.0.113.9", true},
        {NULL, "203.0.113.9", true},
        {"10.0.0.0/8", "10.200.3.4", true},
        {"10.0.0.0/8", "11.0.0.1", false},
        {"10.0.0.0/8", "127.0.0.1", false},
        {"10.0.0.0/8, 127.0.0.1/32", "127.0.0.1", true},
        {"127.0.0.1", "127.0.0.2", false},
        {"192.168.1.128/25", "192.168.1.200", true},
        {"192.168.1.128/25", "192.168.1.127", false},
        {"0.0.0.0/0", "8.8.8.8", true},
        {"0.0.0.0/0", "::1", false},
        {"::1/128", "::1", true},
        {"::1/128", "127.0.0.1", false},
        {"2001:db8::/32", "2001:db8:1::5", true},
        {"2001:db8::/32", "2001:db9::5", false},
        {"10.0.0.0/8", "::ffff:10.1.2.3", true},
        {"::ffff:10.0.0.0/104", "10.9.9.9", true},
        {"10.0.0.0/8,garbage", "10.1.1.1", false},     /* malformed list: fail closed */
        {"10.0.0.0/8", "not-an-ip", false},
        {"10.0.0.0/8", "", false},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        bool got = proto_cidr_list_allows(cases[i].list, cases[i].addr);
        if (got != cases[i].allowed)
            fail_msg("list \"%s\" addr \"%s\": got %d want %d",
                     cases[i].list ? cases[i].list : "(null)", cases[i].addr, got,
                     cases[i].allowed);
    }
    static const char *const bad_lists[] = {"10.0.0.0/33", "10.0.0.0/", "10.0.0/8", "::1/129",
                                            "a,b", "10.0.0.0/8,", "1.2.3.4/-1", "/8"};
    char err[128];
    for (size_t i = 0; i < sizeof(bad_lists) / sizeof(bad_lists[0]); i++) {
        if (proto_cidr_list_check(bad_lists[i], err, sizeof(err)) != CMN_EPARSE)
            fail_msg("accepted bad list \"%s\"", bad_lists[i]);
    }
    assert_int_equal(proto_cidr_list_check(" 10.0.0.0/8 , ::1 ,127.0.0.1/32", err, sizeof(err)), 0);
    assert_true(proto_addr_is_loopback("127.0.0.1"));
    assert_true(proto_addr_is_loopback("127.9.9.9"));
    assert_true(proto_addr_is_loopback("::1"));
    assert_false(proto_addr_is_loopback("10.0.0.1"));
    assert_false(proto_addr_is_loopback("cloud.example"));
    assert_false(proto_addr_is_loopback(""));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_decl_roundtrip),   cmocka_unit_test(test_decl_rejects),
        cmocka_unit_test(test_status_roundtrip), cmocka_unit_test(test_commit_error),
        cmocka_unit_test(test_chunks),           cmocka_unit_test(test_canonical),
        cmocka_unit_test(test_sign_verify),      cmocka_unit_test(test_token_roundtrip),
        cmocka_unit_test(test_cidr),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
