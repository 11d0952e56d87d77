/*
 * cmn_http_util.c - pure HTTP helpers shared by the server and its users:
 * percent-decoding and query-string iteration. No I/O, no allocation.
 */
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "cmn/errors.h"
#include "cmn/http.h"

static int hexval(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/*
 * Decodes src[0..srclen) into dst (at most dstlen-1 bytes, then NUL).
 * plus_is_space: '+' means ' ' (query strings only). Output that does not
 * fit is dropped (truncation), malformed escapes are CMN_EPARSE.
 */
static int decode(const char *src, size_t srclen, char *dst, size_t dstlen, int plus_is_space)
{
    size_t o = 0;

    if (dstlen == 0)
        return CMN_EPARSE;
    for (size_t i = 0; i < srclen; i++) {
        unsigned char c = (unsigned char)src[i];

        if (c == '%') {
            int hi, lo;

            if (i + 2 >= srclen)
                return CMN_EPARSE;
            hi = hexval((unsigned char)src[i + 1]);
            lo = hexval((unsigned char)src[i + 2]);
            if (hi < 0 || lo < 0)
                return CMN_EPARSE;
            c = (unsigned char)(hi << 4 | lo);
            i += 2;
        } else if (c == '+' && plus_is_space) {
            c = ' ';
        }
        if (o + 1 < dstlen)
            dst[o++] = (char)c;
    }
    dst[o] = '\0';
    return 0;
}

int cmn_http_urldecode(const char *src, size_t srclen, char *dst, size_t dstlen)
{
    return decode(src, srclen, dst, dstlen, 0);
}

int cmn_http_query_next(const char **cursor, char *key, size_t keylen, char *val, size_t vallen)
{
    const char *p = *cursor;

    if (p == NULL)
        return 0;
    /* Skip empty pairs ("a=1&&b=2", a leading '&'). */
    while (*p == '&')
        p++;
    if (*p == '\0') {
        *cursor = p;
        return 0;
    }

    const char *end = strchr(p, '&');
    if (end == NULL)
        end = p + strlen(p);
    const char *eq = memchr(p, '=', (size_t)(end - p));
    const char *kend = eq ? eq : end;
    const char *vbeg = eq ? eq + 1 : end;
    int err;

    err = decode(p, (size_t)(kend - p), key, keylen, 1);
    if (err == 0)
        err = decode(vbeg, (size_t)(end - vbeg), val, vallen, 1);
    if (err < 0)
        return err;
    *cursor = end;
    return 1;
}

bool cmn_http_accepts_encoding(const cmn_http_req_t *req, const char *coding)
{
    const char *p = cmn_http_req_header(req, "Accept-Encoding");
    size_t clen = strlen(coding);

    while (p && *p) {
        size_t len = strcspn(p, ",");
        const char *semi = memchr(p, ';', len);
        size_t name = semi ? (size_t)(semi - p) : len;
        double q = 1.0;

        while (name && (*p == ' ' || *p == '\t')) {
            p++;
            len--;
            name--;
        }
        while (name && (p[name - 1] == ' ' || p[name - 1] == '\t'))
            name--;
        if (semi) {
            const char *qs = strstr(semi, "q=");
            if (qs && qs < p + len)
                q = strtod(qs + 2, NULL);
        }
        if (((name == clen && strncasecmp(p, coding, clen) == 0) || (name == 1 && *p == '*')) &&
            q > 0)
            return true;
        p += len;
        if (*p == ',')
            p++;
    }
    return false;
}
