/*
 * proto_msg.c - encode/decode of the version 1 messages (JSON via jansson).
 *
 * Decoders treat their input as hostile: every field is type-checked and
 * bounded, unknown versions are refused, and a failed decode leaves nothing
 * allocated.
 */
#include "proto/proto.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cmn/crypto.h"
#include "cmn/errors.h"
#include "proto_internal.h"

static const char *kind_name(proto_kind_t k)
{
    switch (k) {
    case PROTO_KIND_INSTANCE: return "instance";
    case PROTO_KIND_BUNDLE: return "bundle";
    }
    return NULL;
}

char *proto__dump(json_t *o)
{
    char *s = o ? json_dumps(o, JSON_COMPACT | JSON_SORT_KEYS) : NULL;
    json_decref(o);
    return s;
}

#define dump proto__dump
#define parse_obj proto__parse_obj
#define check_version proto__check_version
#define get_str proto__get_str
#define get_uint proto__get_uint
#define get_uid proto__get_uid
#define get_hex256 proto__get_hex256


bool proto_uid_valid(const char *uid)
{
    size_t n = strlen(uid);
    bool prev_dot = true;

    if (n == 0 || n > PROTO_UID_MAX)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = uid[i];
        if (c == '.') {
            if (prev_dot)
                return false;
            prev_dot = true;
        } else if (c >= '0' && c <= '9') {
            prev_dot = false;
        } else {
            return false;
        }
    }
    return !prev_dot;
}

bool proto_hex256_valid(const char *s)
{
    size_t i;
    for (i = 0; s[i]; i++) {
        if (i >= PROTO_HEX256)
            return false;
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return false;
    }
    return i == PROTO_HEX256;
}

uint32_t proto_chunk_count(uint64_t size, uint32_t chunk_size)
{
    if (chunk_size == 0)
        return 0;
    return (uint32_t)((size + chunk_size - 1) / chunk_size);
}

uint32_t proto_chunk_len(uint64_t size, uint32_t chunk_size, uint32_t i)
{
    uint64_t off = (uint64_t)i * chunk_size;
    if (off >= size)
        return 0;
    return size - off < chunk_size ? (uint32_t)(size - off) : chunk_size;
}

/* ---- decode helpers: each sets err and returns CMN_EPARSE on failure ---- */

json_t *proto__parse_obj(const char *json, size_t len, char *err, size_t errlen)
{
    json_error_t jerr;
    json_t *root = json_loadb(json, len, JSON_REJECT_DUPLICATES, &jerr);

    if (!root) {
        snprintf(err, errlen, "invalid JSON: %s", jerr.text);
        return NULL;
    }
    if (!json_is_object(root)) {
        snprintf(err, errlen, "expected a JSON object");
        json_decref(root);
        return NULL;
    }
    return root;
}

int proto__check_version(json_t *root, char *err, size_t errlen)
{
    json_t *v = json_object_get(root, "v");
    if (!json_is_integer(v) || json_integer_value(v) != PROTO_VERSION) {
        snprintf(err, errlen, "unsupported protocol version");
        return CMN_EPARSE;
    }
    return 0;
}

int proto__get_str(json_t *root, const char *key, char *out, size_t outlen, char *err,
                   size_t errlen)
{
    json_t *v = json_object_get(root, key);
    if (!json_is_string(v) || json_string_length(v) >= outlen ||
        strlen(json_string_value(v)) != json_string_length(v)) {
        snprintf(err, errlen, "field \"%s\": expected a string of at most %zu bytes", key,
                 outlen - 1);
        return CMN_EPARSE;
    }
    memcpy(out, json_string_value(v), json_string_length(v) + 1);
    return 0;
}

int proto__get_uint(json_t *root, const char *key, uint64_t min, uint64_t max, uint64_t *out,
                    char *err, size_t errlen)
{
    json_t *v = json_object_get(root, key);
    if (!json_is_integer(v) || json_integer_value(v) < 0 ||
        (uint64_t)json_integer_value(v) < min || (uint64_t)json_integer_value(v) > max) {
        snprintf(err, errlen, "field \"%s\": expected an integer in %llu..%llu", key,
                 (unsigned long long)min, (unsigned long long)max);
        return CMN_EPARSE;
    }
    *out = (uint64_t)json_integer_value(v);
    return 0;
}

int proto__get_uid(json_t *root, const char *key, char *out, char *err, size_t errlen)
{
    if (get_str(root, key, out, PROTO_UID_MAX + 1, err, errlen) < 0)
        return CMN_EPARSE;
    if (!proto_uid_valid(out)) {
        snprintf(err, errlen, "field \"%s\": not a valid DICOM UID", key);
        return CMN_EPARSE;
    }
    return 0;
}

int proto__get_hex256(json_t *root, const char *key, char *out, char *err, size_t errlen)
{
    if (get_str(root, key, out, PROTO_HEX256 + 1, err, errlen) < 0)
        return CMN_EPARSE;
    if (!proto_hex256_valid(out)) {
        snprintf(err, errlen, "field \"%s\": expected 64 lower-case hex digits", key);
        return CMN_EPARSE;
    }
    return 0;
}

/* ---------------------------------------------------------------- decl */

char *proto_object_decl_encode(const proto_object_decl_t *d)
{
    const char *kind = kind_name(d->kind);
    if (!kind)
        return NULL;
    if (d->kind == PROTO_KIND_BUNDLE)
        return dump(json_pack("{s:i, s:s, s:s, s:I, s:I, s:s, s:I}", "v", PROTO_VERSION, "kind",
                              kind, "sha256", d->sha256, "size", (json_int_t)d->size,
                              "chunk_size", (json_int_t)d->chunk_size, "study_uid", d->study_uid,
                              "members", (json_int_t)d->members));
    return dump(json_pack("{s:i, s:s, s:s, s:I, s:I, s:s, s:s, s:s}", "v", PROTO_VERSION,
                          "kind", kind, "sha256", d->sha256, "size", (json_int_t)d->size,
                          "chunk_size", (json_int_t)d->chunk_size, "study_uid", d->study_uid,
                          "series_uid", d->series_uid, "sop_uid", d->sop_uid));
}

int proto_object_decl_decode(const char *json, size_t len, proto_object_decl_t *d, char *err,
                             size_t errlen)
{
    json_t *root = parse_obj(json, len, err, errlen);
    char kind[16];
    uint64_t x;
    int r = CMN_EPARSE;

    if (!root)
        return CMN_EPARSE;
    memset(d, 0, sizeof(*d));
    if (check_version(root, err, errlen) < 0 ||
        get_str(root, "kind", kind, sizeof(kind), err, errlen) < 0)
        goto out;
    if (strcmp(kind, "instance") == 0) {
        d->kind = PROTO_KIND_INSTANCE;
    } else if (strcmp(kind, "bundle") == 0) {
        d->kind = PROTO_KIND_BUNDLE;
    } else {
        snprintf(err, errlen, "field \"kind\": unknown object kind");
        goto out;
    }
    if (get_hex256(root, "sha256", d->sha256, err, errlen) < 0 ||
        get_uint(root, "size", 1, PROTO_MAX_OBJECT_SIZE, &d->size, err, errlen) < 0)
        goto out;
    if (get_uint(root, "chunk_size", PROTO_MIN_CHUNK, PROTO_MAX_CHUNK, &x, err, errlen) < 0)
        goto out;
    d->chunk_size = (uint32_t)x;
    if (proto_chunk_count(d->size, d->chunk_size) > PROTO_MAX_CHUNKS) {
        snprintf(err, errlen, "too many chunks: raise chunk_size");
        goto out;
    }
    if (d->kind == PROTO_KIND_BUNDLE) {
        if (get_uid(root, "study_uid", d->study_uid, err, errlen) < 0 ||
            get_uint(root, "members", 1, PROTO_BUNDLE_MAX_MEMBERS, &x, err, errlen) < 0)
            goto out;
        d->members = (uint32_t)x;
        if (d->size < PROTO_BUNDLE_PREFIX + 2) {
            snprintf(err, errlen, "field \"size\": too small for a bundle");
            goto out;
        }
        r = 0;
        goto out;
    }
    if (get_uid(root, "study_uid", d->study_uid, err, errlen) < 0 ||
        get_uid(root, "series_uid", d->series_uid, err, errlen) < 0 ||
        get_uid(root, "sop_uid", d->sop_uid, err, errlen) < 0)
        goto out;
    r = 0;
out:
    json_decref(root);
    return r;
}

/* -------------------------------------------------------------- status */

char *proto_object_status_encode(const proto_object_status_t *s)
{
    json_t *have = json_array();
    json_t *o;

    if (!have)
        return NULL;
    for (uint32_t i = 0; i < s->nchunks; i++) {
        if (s->have && s->have[i])
            json_array_append_new(have, json_integer(i));
    }
    o = json_pack("{s:i, s:s, s:I, s:I, s:s, s:o}", "v", PROTO_VERSION, "object_id",
                  s->object_id, "chunk_size", (json_int_t)s->chunk_size, "nchunks",
                  (json_int_t)s->nchunks, "state",
                  s->state == PROTO_OBJ_COMMITTED ? "committed" : "open", "have", have);
    return dump(o);
}

int proto_object_status_decode(const char *json, size_t len, proto_object_status_t *s,
                               char *err, size_t errlen)
{
    json_t *root = parse_obj(json, len, err, errlen);
    json_t *have;
    char state[16];
    uint64_t x;
    size_t i;
    json_t *v;

    memset(s, 0, sizeof(*s));
    if (!root)
        return CMN_EPARSE;
    if (check_version(root, err, errlen) < 0 ||
        get_hex256(root, "object_id", s->object_id, err, errlen) < 0)
        goto fail;
    if (get_uint(root, "chunk_size", PROTO_MIN_CHUNK, PROTO_MAX_CHUNK, &x, err, errlen) < 0)
        goto fail;
    s->chunk_size = (uint32_t)x;
    if (get_uint(root, "nchunks", 1, PROTO_MAX_CHUNKS, &x, err, errlen) < 0)
        goto fail;
    s->nchunks = (uint32_t)x;
    if (get_str(root, "state", state, sizeof(state), err, errlen) < 0)
        goto fail;
    if (strcmp(state, "open") == 0) {
        s->state = PROTO_OBJ_OPEN;
    } else if (strcmp(state, "committed") == 0) {
        s->state = PROTO_OBJ_COMMITTED;
    } else {
        snprintf(err, errlen, "field \"state\": unknown state");
        goto fail;
    }
    have = json_object_get(root, "have");
    if (!json_is_array(have)) {
        snprintf(err, errlen, "field \"have\": expected an array");
        goto fail;
    }
    s->have = calloc(s->nchunks, 1);
    if (!s->have) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    json_array_foreach(have, i, v) {
        if (!json_is_integer(v) || json_integer_value(v) < 0 ||
            json_integer_value(v) >= (json_int_t)s->nchunks) {
            snprintf(err, errlen, "field \"have\": chunk index out of range");
            goto fail;
        }
        s->have[json_integer_value(v)] = 1;
    }
    json_decref(root);
    return 0;
fail:
    proto_object_status_free(s);
    json_decref(root);
    return CMN_EPARSE;
}

void proto_object_status_free(proto_object_status_t *s)
{
    free(s->have);
    s->have = NULL;
}

/* -------------------------------------------------------------- commit */

const char *proto_commit_name(proto_commit_result_t r)
{
    switch (r) {
    case PROTO_COMMIT_STORED: return "stored";
    case PROTO_COMMIT_DUPLICATE: return "duplicate";
    case PROTO_COMMIT_CONFLICT: return "conflict";
    case PROTO_COMMIT_REJECTED: return "rejected";
    }
    return NULL;
}
#define commit_name proto_commit_name

char *proto_commit_encode(const proto_commit_t *c)
{
    const char *name = commit_name(c->result);
    if (!name || c->result == PROTO_COMMIT_REJECTED)
        return NULL;
    return dump(json_pack("{s:i, s:s, s:s}", "v", PROTO_VERSION, "result", name, "sop_uid",
                          c->sop_uid));
}

int proto_commit_decode(const char *json, size_t len, proto_commit_t *c, char *err,
                        size_t errlen)
{
    json_t *root = parse_obj(json, len, err, errlen);
    char result[16];
    int r = CMN_EPARSE;

    memset(c, 0, sizeof(*c));
    if (!root)
        return CMN_EPARSE;
    if (check_version(root, err, errlen) < 0 ||
        get_str(root, "result", result, sizeof(result), err, errlen) < 0 ||
        get_uid(root, "sop_uid", c->sop_uid, err, errlen) < 0)
        goto out;
    for (int k = PROTO_COMMIT_STORED; k <= PROTO_COMMIT_CONFLICT; k++) {
        if (strcmp(result, commit_name((proto_commit_result_t)k)) == 0) {
            c->result = (proto_commit_result_t)k;
            r = 0;
        }
    }
    if (r < 0)
        snprintf(err, errlen, "field \"result\": unknown result");
out:
    json_decref(root);
    return r;
}

/* --------------------------------------------------------------- token */

/* memset that the optimiser may not drop (the buffers held key material). */
static void wipe(void *p, size_t n)
{
    volatile unsigned char *v = p;
    while (n--)
        *v++ = 0;
}

static bool hex_token_id_valid(const char *s)
{
    size_t i;
    for (i = 0; s[i]; i++) {
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return false;
    }
    return i == PROTO_TOKEN_ID_HEX;
}

char *proto_token_encode(const proto_token_t *t)
{
    char key[PROTO_TOKEN_KEY_LEN * 2 + 1];
    char *s;

    if (!hex_token_id_valid(t->token_id) || t->ttl_s < 1)
        return NULL;
    cmn_hex(t->key, sizeof(t->key), key);
    s = dump(json_pack("{s:i, s:s, s:s, s:I, s:I}", "v", PROTO_VERSION, "token_id", t->token_id,
                       "key", key, "expires_at", (json_int_t)t->expires_at, "ttl_s",
                       (json_int_t)t->ttl_s));
    wipe(key, sizeof(key));
    return s;
}

int proto_token_decode(const char *json, size_t len, proto_token_t *t, char *err, size_t errlen)
{
    json_t *root = parse_obj(json, len, err, errlen);
    char key[PROTO_HEX256 + 1];
    uint64_t exp, ttl;
    int r = CMN_EPARSE;

    memset(t, 0, sizeof(*t));
    if (!root)
        return CMN_EPARSE;
    if (check_version(root, err, errlen) < 0 ||
        get_str(root, "token_id", t->token_id, sizeof(t->token_id), err, errlen) < 0 ||
        get_hex256(root, "key", key, err, errlen) < 0 ||
        get_uint(root, "expires_at", 1, INT64_MAX, &exp, err, errlen) < 0 ||
        get_uint(root, "ttl_s", 1, 7 * 86400, &ttl, err, errlen) < 0)
        goto out;
    if (!hex_token_id_valid(t->token_id)) {
        snprintf(err, errlen, "field \"token_id\": expected %d lower-case hex digits",
                 PROTO_TOKEN_ID_HEX);
        goto out;
    }
    if (cmn_unhex(key, t->key, sizeof(t->key)) != 0) {
        snprintf(err, errlen, "field \"key\": bad hex");
        goto out;
    }
    t->expires_at = (int64_t)exp;
    t->ttl_s = (int64_t)ttl;
    r = 0;
out:
    wipe(key, sizeof(key));
    if (r < 0)
        wipe(t, sizeof(*t));
    json_decref(root);
    return r;
}

char *proto_token_request_encode(void)
{
    return dump(json_pack("{s:i}", "v", PROTO_VERSION));
}

int proto_token_request_decode(const char *json, size_t len, char *err, size_t errlen)
{
    json_t *root = parse_obj(json, len, err, errlen);
    int r;

    if (!root)
        return CMN_EPARSE;
    r = check_version(root, err, errlen);
    json_decref(root);
    return r;
}

/* --------------------------------------------------------------- error */

char *proto_error_encode(const char *code, const char *message)
{
    return dump(json_pack("{s:i, s:s, s:s}", "v", PROTO_VERSION, "error", code, "message",
                          message ? message : ""));
}

char *proto_clock_skew_encode(int64_t server_time, const char *message)
{
    return dump(json_pack("{s:i, s:s, s:s, s:I}", "v", PROTO_VERSION, "error", "clock_skew",
                          "message", message ? message : "", "server_time",
                          (json_int_t)server_time));
}

int proto_error_decode(const char *json, size_t len, proto_error_t *e)
{
    char err[64];
    json_t *root = parse_obj(json, len, err, sizeof(err));
    int r = CMN_EPARSE;

    memset(e, 0, sizeof(*e));
    if (!root)
        return CMN_EPARSE;
    if (get_str(root, "error", e->code, sizeof(e->code), err, sizeof(err)) == 0) {
        json_t *m = json_object_get(root, "message");
        if (json_is_string(m))
            snprintf(e->message, sizeof(e->message), "%s", json_string_value(m));
        json_t *t = json_object_get(root, "server_time");
        if (json_is_integer(t) && json_integer_value(t) > 0)
            e->server_time = (int64_t)json_integer_value(t);
        r = 0;
    }
    json_decref(root);
    return r;
}
