/*
 * proto_sign.c - canonical requests and their HMAC-SHA256 signatures.
 *
 * The canonical request is, one item per line, with no trailing newline:
 *
 *     METHOD
 *     /path
 *     a=1&b=2          (query parameters sorted by name, then value, as sent)
 *     edge id
 *     timestamp        (decimal unix seconds)
 *     nonce            (32 hex digits)
 *     body sha256      (64 hex digits)
 *
 * The signature is the lower-case hex HMAC-SHA256 of that text, keyed with
 * the edge secret. Header values never contain newlines (checked), so the
 * encoding is unambiguous.
 */
#include "proto/proto.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cmn/buf.h"
#include "cmn/crypto.h"
#include "cmn/errors.h"

typedef struct {
    const char *p;
    size_t n;
} span_t;

static int span_cmp(const void *a, const void *b)
{
    const span_t *x = a, *y = b;
    size_t n = x->n < y->n ? x->n : y->n;
    int c = memcmp(x->p, y->p, n);
    if (c)
        return c;
    return x->n < y->n ? -1 : x->n > y->n;
}

static bool has_newline(const char *s)
{
    return s && strpbrk(s, "\r\n") != NULL;
}

char *proto_canonical_request(const proto_req_t *r)
{
    cmn_buf_t b;
    span_t *params = NULL;
    size_t nparams = 0;
    const char *q = r->query ? r->query : "";

    if (!r->method || !r->path || !r->edge_id || !r->nonce || !r->body_sha256 ||
        has_newline(r->method) || has_newline(r->path) || has_newline(q) ||
        has_newline(r->edge_id) || has_newline(r->nonce) || has_newline(r->body_sha256))
        return NULL;

    if (*q) {
        size_t cap = 1;
        for (const char *s = q; *s; s++)
            cap += *s == '&';
        params = calloc(cap, sizeof(*params));
        if (!params)
            return NULL;
        for (const char *s = q; *s;) {
            const char *e = strchr(s, '&');
            size_t n = e ? (size_t)(e - s) : strlen(s);
            if (n) {
                params[nparams].p = s;
                params[nparams].n = n;
                nparams++;
            }
            s += n + (e != NULL);
        }
        /* Sorting "name=value" byte-wise sorts by name, then value, except
         * where one name is a prefix of another; that order is still total
         * and both sides compute it the same way. */
        qsort(params, nparams, sizeof(*params), span_cmp);
    }

    cmn_buf_init(&b, 1 << 20);
    if (cmn_buf_appendf(&b, "%s\n%s\n", r->method, r->path) < 0)
        goto fail;
    for (size_t i = 0; i < nparams; i++) {
        if ((i && cmn_buf_append(&b, "&", 1) < 0) ||
            cmn_buf_append(&b, params[i].p, params[i].n) < 0)
            goto fail;
    }
    if (cmn_buf_appendf(&b, "\n%s\n%" PRId64 "\n%s\n%s", r->edge_id, r->timestamp, r->nonce,
                        r->body_sha256) < 0)
        goto fail;
    free(params);
    return cmn_buf_steal(&b, NULL);
fail:
    free(params);
    cmn_buf_free(&b);
    return NULL;
}

int proto_sign(const uint8_t *secret, size_t secretlen, const proto_req_t *r,
               char out[PROTO_HEX256 + 1])
{
    uint8_t mac[CMN_SHA256_LEN];
    char *canon = proto_canonical_request(r);

    if (!canon)
        return CMN_EPROTO;
    cmn_hmac_sha256(secret, secretlen, canon, strlen(canon), mac);
    free(canon);
    cmn_hex(mac, sizeof(mac), out);
    return 0;
}

static bool hex_of_len(const char *s, size_t n)
{
    size_t i;
    if (!s)
        return false;
    for (i = 0; s[i]; i++) {
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return false;
    }
    return i == n;
}

proto_sig_check_t proto_verify(const uint8_t *secret, size_t secretlen, const proto_req_t *r,
                               const char *signature, int64_t now, int64_t max_skew)
{
    char want[PROTO_HEX256 + 1];

    if (!hex_of_len(signature, PROTO_HEX256) || !hex_of_len(r->nonce, PROTO_NONCE_HEX) ||
        !hex_of_len(r->body_sha256, PROTO_HEX256) || !r->edge_id || !*r->edge_id ||
        strlen(r->edge_id) > PROTO_EDGE_ID_MAX)
        return PROTO_SIG_MALFORMED;
    if (proto_sign(secret, secretlen, r, want) < 0)
        return PROTO_SIG_MALFORMED;
    if (cmn_memeq_ct(want, signature, PROTO_HEX256) != 0)
        return PROTO_SIG_BAD;
    if (r->timestamp < now - max_skew || r->timestamp > now + max_skew)
        return PROTO_SIG_STALE;
    return PROTO_SIG_OK;
}
