/*
 * cmn_buf.c - growable byte buffer with a hard cap.
 */
#include "cmn/buf.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cmn/errors.h"

#define BUF_DEFAULT_MAX ((size_t)1 << 30)

void cmn_buf_init(cmn_buf_t *b, size_t max)
{
    b->data = NULL;
    b->len = 0;
    b->cap = 0;
    b->max = max ? max : BUF_DEFAULT_MAX;
}

void cmn_buf_free(cmn_buf_t *b)
{
    free(b->data);
    b->data = NULL;
    b->len = 0;
    b->cap = 0;
}

void cmn_buf_reset(cmn_buf_t *b)
{
    b->len = 0;
    if (b->data)
        b->data[0] = '\0';
}

static int buf_reserve(cmn_buf_t *b, size_t extra)
{
    size_t need, cap;
    char *p;

    if (b->max == 0)
        b->max = BUF_DEFAULT_MAX;
    if (extra > b->max || b->len > b->max - extra) {
        cmn_buf_free(b);
        return CMN_ETOOBIG;
    }
    need = b->len + extra + 1;
    if (need <= b->cap)
        return 0;
    cap = b->cap ? b->cap : 256;
    while (cap < need)
        cap *= 2;
    if (cap > b->max + 1)
        cap = b->max + 1;
    p = realloc(b->data, cap);
    if (!p) {
        cmn_buf_free(b);
        return -ENOMEM;
    }
    b->data = p;
    b->cap = cap;
    return 0;
}

int cmn_buf_append(cmn_buf_t *b, const void *p, size_t n)
{
    int r = buf_reserve(b, n);
    if (r < 0)
        return r;
    if (n)
        memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = '\0';
    return 0;
}

int cmn_buf_appends(cmn_buf_t *b, const char *s)
{
    return cmn_buf_append(b, s, strlen(s));
}

int cmn_buf_vappendf(cmn_buf_t *b, const char *fmt, va_list ap)
{
    va_list ap2;
    int n, r;

    va_copy(ap2, ap);
    n = vsnprintf(NULL, 0, fmt, ap2);
    va_end(ap2);
    if (n < 0) {
        cmn_buf_free(b);
        return CMN_EINTERNAL;
    }
    r = buf_reserve(b, (size_t)n);
    if (r < 0)
        return r;
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    b->len += (size_t)n;
    return 0;
}

int cmn_buf_appendf(cmn_buf_t *b, const char *fmt, ...)
{
    va_list ap;
    int r;

    va_start(ap, fmt);
    r = cmn_buf_vappendf(b, fmt, ap);
    va_end(ap);
    return r;
}

char *cmn_buf_steal(cmn_buf_t *b, size_t *len)
{
    char *p = b->data;

    if (len)
        *len = b->len;
    if (!p)
        p = calloc(1, 1);
    b->data = NULL;
    b->len = 0;
    b->cap = 0;
    return p;
}
