/*
 * proto_bundle.c - bundles (several instances in one object), bundle commit
 * answers and study manifests (see proto.h and PROTOCOL.md).
 *
 * Like proto_msg.c: pure functions, hostile input, nothing left allocated
 * by a failed decode.
 */
#include "proto/proto.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cmn/errors.h"
#include "proto_internal.h"

/* ------------------------------------------------------------- bundle */

static bool member_valid(const proto_bundle_member_t *m)
{
    return proto_uid_valid(m->sop_uid) && proto_uid_valid(m->series_uid) &&
           proto_hex256_valid(m->sha256) && m->size >= 1 && m->size <= PROTO_MAX_OBJECT_SIZE;
}

uint8_t *proto_bundle_header_encode(proto_bundle_t *b)
{
    json_t *arr, *root;
    char *json;
    uint8_t *out;
    size_t jl;
    uint64_t off;

    if (b->n < 1 || b->n > PROTO_BUNDLE_MAX_MEMBERS || !proto_uid_valid(b->study_uid))
        return NULL;
    arr = json_array();
    if (!arr)
        return NULL;
    for (uint32_t i = 0; i < b->n; i++) {
        const proto_bundle_member_t *m = &b->m[i];
        if (!member_valid(m)) {
            json_decref(arr);
            return NULL;
        }
        json_array_append_new(arr, json_pack("{s:s, s:s, s:s, s:I}", "sop_uid", m->sop_uid,
                                             "series_uid", m->series_uid, "sha256", m->sha256,
                                             "size", (json_int_t)m->size));
    }
    root = json_pack("{s:i, s:s, s:o}", "v", PROTO_VERSION, "study_uid", b->study_uid,
                     "members", arr);
    json = proto__dump(root);
    if (!json)
        return NULL;
    jl = strlen(json);
    if (jl > PROTO_BUNDLE_MAX_HEADER) {
        free(json);
        return NULL;
    }
    out = malloc(PROTO_BUNDLE_PREFIX + jl);
    if (!out) {
        free(json);
        return NULL;
    }
    memcpy(out, PROTO_BUNDLE_MAGIC, 8);
    out[8] = (uint8_t)(jl >> 24);
    out[9] = (uint8_t)(jl >> 16);
    out[10] = (uint8_t)(jl >> 8);
    out[11] = (uint8_t)jl;
    memcpy(out + PROTO_BUNDLE_PREFIX, json, jl);
    free(json);
    b->header_len = PROTO_BUNDLE_PREFIX + jl;
    off = b->header_len;
    for (uint32_t i = 0; i < b->n; i++) {
        b->m[i].offset = off;
        off += b->m[i].size;
    }
    b->size = off;
    return out;
}

int proto_bundle_prefix_decode(const uint8_t *p, size_t len, uint32_t *json_len, char *err,
                               size_t errlen)
{
    uint32_t jl;

    if (len < PROTO_BUNDLE_PREFIX || memcmp(p, PROTO_BUNDLE_MAGIC, 8) != 0) {
        snprintf(err, errlen, "not a bundle (magic)");
        return CMN_EPARSE;
    }
    jl = (uint32_t)p[8] << 24 | (uint32_t)p[9] << 16 | (uint32_t)p[10] << 8 | p[11];
    if (jl < 2 || jl > PROTO_BUNDLE_MAX_HEADER) {
        snprintf(err, errlen, "bundle header length out of range");
        return CMN_EPARSE;
    }
    *json_len = jl;
    return 0;
}

int proto_bundle_header_decode(const uint8_t *p, size_t len, uint64_t total, proto_bundle_t *b,
                               char *err, size_t errlen)
{
    json_t *root = NULL, *arr, *v;
    uint32_t jl;
    uint64_t off, x;
    size_t i;

    memset(b, 0, sizeof(*b));
    if (proto_bundle_prefix_decode(p, len, &jl, err, errlen) < 0)
        return CMN_EPARSE;
    if (len != PROTO_BUNDLE_PREFIX + (size_t)jl) {
        snprintf(err, errlen, "bundle header length does not match");
        return CMN_EPARSE;
    }
    root = proto__parse_obj((const char *)p + PROTO_BUNDLE_PREFIX, jl, err, errlen);
    if (!root)
        return CMN_EPARSE;
    if (proto__check_version(root, err, errlen) < 0 ||
        proto__get_uid(root, "study_uid", b->study_uid, err, errlen) < 0)
        goto fail;
    arr = json_object_get(root, "members");
    if (!json_is_array(arr) || json_array_size(arr) < 1 ||
        json_array_size(arr) > PROTO_BUNDLE_MAX_MEMBERS) {
        snprintf(err, errlen, "field \"members\": expected 1..%u members",
                 PROTO_BUNDLE_MAX_MEMBERS);
        goto fail;
    }
    b->n = (uint32_t)json_array_size(arr);
    b->m = calloc(b->n, sizeof(*b->m));
    if (!b->m) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    b->header_len = PROTO_BUNDLE_PREFIX + jl;
    off = b->header_len;
    json_array_foreach(arr, i, v) {
        proto_bundle_member_t *m = &b->m[i];
        if (!json_is_object(v) ||
            proto__get_uid(v, "sop_uid", m->sop_uid, err, errlen) < 0 ||
            proto__get_uid(v, "series_uid", m->series_uid, err, errlen) < 0 ||
            proto__get_hex256(v, "sha256", m->sha256, err, errlen) < 0 ||
            proto__get_uint(v, "size", 1, PROTO_MAX_OBJECT_SIZE, &x, err, errlen) < 0) {
            if (!json_is_object(v))
                snprintf(err, errlen, "field \"members\": expected objects");
            goto fail;
        }
        m->size = x;
        m->offset = off;
        off += x;
        if (off > total) {
            snprintf(err, errlen, "bundle members exceed the object size");
            goto fail;
        }
    }
    if (off != total) {
        snprintf(err, errlen, "bundle members do not fill the object");
        goto fail;
    }
    b->size = off;
    json_decref(root);
    return 0;
fail:
    json_decref(root);
    proto_bundle_free(b);
    return CMN_EPARSE;
}

void proto_bundle_free(proto_bundle_t *b)
{
    free(b->m);
    b->m = NULL;
    b->n = 0;
}

/* ------------------------------------------------------- bundle commit */

char *proto_bundle_commit_encode(const proto_bundle_commit_t *c)
{
    json_t *arr = json_array();

    if (!arr)
        return NULL;
    for (uint32_t i = 0; i < c->n; i++) {
        const char *name = proto_commit_name(c->m[i].result);
        if (!name || !proto_uid_valid(c->m[i].sop_uid)) {
            json_decref(arr);
            return NULL;
        }
        json_array_append_new(arr, json_pack("{s:s, s:s}", "sop_uid", c->m[i].sop_uid, "result",
                                             name));
    }
    return proto__dump(json_pack("{s:i, s:s, s:o}", "v", PROTO_VERSION, "result", "bundle",
                                 "members", arr));
}

int proto_bundle_commit_decode(const char *json, size_t len, proto_bundle_commit_t *c, char *err,
                               size_t errlen)
{
    json_t *root = proto__parse_obj(json, len, err, errlen), *arr, *v;
    char result[16];
    size_t i;

    memset(c, 0, sizeof(*c));
    if (!root)
        return CMN_EPARSE;
    if (proto__check_version(root, err, errlen) < 0 ||
        proto__get_str(root, "result", result, sizeof(result), err, errlen) < 0)
        goto fail;
    if (strcmp(result, "bundle") != 0) {
        snprintf(err, errlen, "field \"result\": expected \"bundle\"");
        goto fail;
    }
    arr = json_object_get(root, "members");
    if (!json_is_array(arr) || json_array_size(arr) < 1 ||
        json_array_size(arr) > PROTO_BUNDLE_MAX_MEMBERS) {
        snprintf(err, errlen, "field \"members\": expected 1..%u results",
                 PROTO_BUNDLE_MAX_MEMBERS);
        goto fail;
    }
    c->n = (uint32_t)json_array_size(arr);
    c->m = calloc(c->n, sizeof(*c->m));
    if (!c->m) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    json_array_foreach(arr, i, v) {
        if (!json_is_object(v) ||
            proto__get_uid(v, "sop_uid", c->m[i].sop_uid, err, errlen) < 0 ||
            proto__get_str(v, "result", result, sizeof(result), err, errlen) < 0) {
            if (!json_is_object(v))
                snprintf(err, errlen, "field \"members\": expected objects");
            goto fail;
        }
        for (int k = PROTO_COMMIT_STORED; k <= PROTO_COMMIT_REJECTED; k++) {
            if (strcmp(result, proto_commit_name((proto_commit_result_t)k)) == 0)
                c->m[i].result = (proto_commit_result_t)k;
        }
        if (c->m[i].result == 0) {
            snprintf(err, errlen, "field \"result\": unknown member result");
            goto fail;
        }
    }
    json_decref(root);
    return 0;
fail:
    json_decref(root);
    proto_bundle_commit_free(c);
    return CMN_EPARSE;
}

void proto_bundle_commit_free(proto_bundle_commit_t *c)
{
    free(c->m);
    c->m = NULL;
    c->n = 0;
}

/* ------------------------------------------------------------ manifest */

char *proto_manifest_encode(const proto_manifest_t *m)
{
    json_t *arr;

    if (m->n < 1 || m->n > PROTO_MANIFEST_MAX || !proto_uid_valid(m->study_uid))
        return NULL;
    arr = json_array();
    if (!arr)
        return NULL;
    for (uint32_t i = 0; i < m->n; i++) {
        const proto_manifest_entry_t *e = &m->e[i];
        if (!proto_uid_valid(e->series_uid) || !proto_uid_valid(e->sop_uid) ||
            !proto_hex256_valid(e->sha256)) {
            json_decref(arr);
            return NULL;
        }
        json_array_append_new(arr, json_pack("{s:s, s:s, s:s}", "series_uid", e->series_uid,
                                             "sop_uid", e->sop_uid, "sha256", e->sha256));
    }
    return proto__dump(json_pack("{s:i, s:s, s:o}", "v", PROTO_VERSION, "study_uid",
                                 m->study_uid, "instances", arr));
}

int proto_manifest_decode(const char *json, size_t len, proto_manifest_t *m, char *err,
                          size_t errlen)
{
    json_t *root = proto__parse_obj(json, len, err, errlen), *arr, *v;
    size_t i;

    memset(m, 0, sizeof(*m));
    if (!root)
        return CMN_EPARSE;
    if (proto__check_version(root, err, errlen) < 0 ||
        proto__get_uid(root, "study_uid", m->study_uid, err, errlen) < 0)
        goto fail;
    arr = json_object_get(root, "instances");
    if (!json_is_array(arr) || json_array_size(arr) < 1 ||
        json_array_size(arr) > PROTO_MANIFEST_MAX) {
        snprintf(err, errlen, "field \"instances\": expected 1..%u entries", PROTO_MANIFEST_MAX);
        goto fail;
    }
    m->n = (uint32_t)json_array_size(arr);
    m->e = calloc(m->n, sizeof(*m->e));
    if (!m->e) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    json_array_foreach(arr, i, v) {
        proto_manifest_entry_t *e = &m->e[i];
        if (!json_is_object(v) ||
            proto__get_uid(v, "series_uid", e->series_uid, err, errlen) < 0 ||
            proto__get_uid(v, "sop_uid", e->sop_uid, err, errlen) < 0 ||
            proto__get_hex256(v, "sha256", e->sha256, err, errlen) < 0) {
            if (!json_is_object(v))
                snprintf(err, errlen, "field \"instances\": expected objects");
            goto fail;
        }
    }
    json_decref(root);
    return 0;
fail:
    json_decref(root);
    proto_manifest_free(m);
    return CMN_EPARSE;
}

void proto_manifest_free(proto_manifest_t *m)
{
    free(m->e);
    m->e = NULL;
    m->n = 0;
}

char *proto_manifest_status_encode(const proto_manifest_status_t *s)
{
    if (!proto_uid_valid(s->study_uid))
        return NULL;
    return proto__dump(json_pack("{s:i, s:s, s:I, s:I, s:I, s:I, s:b}", "v", PROTO_VERSION,
                                 "study_uid", s->study_uid, "expected", (json_int_t)s->expected,
                                 "received", (json_int_t)s->received, "missing",
                                 (json_int_t)s->missing, "mismatched",
                                 (json_int_t)s->mismatched, "complete", s->complete));
}

int proto_manifest_status_decode(const char *json, size_t len, proto_manifest_status_t *s,
                                 char *err, size_t errlen)
{
    json_t *root = proto__parse_obj(json, len, err, errlen), *c;
    uint64_t a, b, m, x;
    int r = CMN_EPARSE;

    memset(s, 0, sizeof(*s));
    if (!root)
        return CMN_EPARSE;
    if (proto__check_version(root, err, errlen) < 0 ||
        proto__get_uid(root, "study_uid", s->study_uid, err, errlen) < 0 ||
        proto__get_uint(root, "expected", 0, PROTO_MANIFEST_MAX, &a, err, errlen) < 0 ||
        proto__get_uint(root, "received", 0, a, &b, err, errlen) < 0 ||
        proto__get_uint(root, "missing", 0, a, &m, err, errlen) < 0 ||
        proto__get_uint(root, "mismatched", 0, a, &x, err, errlen) < 0)
        goto out;
    c = json_object_get(root, "complete");
    if (!json_is_boolean(c)) {
        snprintf(err, errlen, "field \"complete\": expected a boolean");
        goto out;
    }
    s->expected = (uint32_t)a;
    s->received = (uint32_t)b;
    s->missing = (uint32_t)m;
    s->mismatched = (uint32_t)x;
    s->complete = json_is_true(c);
    r = 0;
out:
    json_decref(root);
    return r;
}
