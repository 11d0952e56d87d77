/*
 * buf.h - a growable byte buffer with a hard cap (curl's dynbuf).
 *
 * A failed append frees the buffer's contents and returns an error, so
 * callers only need to check the result. The data is always NUL-terminated
 * (the terminator is not counted in len), so text can be used as a C string.
 */
#ifndef CMN_BUF_H
#define CMN_BUF_H

#include <stddef.h>
#include <stdarg.h>

typedef struct {
    char *data;      /* owned; NULL until the first append */
    size_t len;      /* bytes used, excluding the NUL */
    size_t cap;      /* bytes allocated */
    size_t max;      /* hard cap on len; 0 means 1 GiB */
} cmn_buf_t;

void cmn_buf_init(cmn_buf_t *b, size_t max);
/** Appends n bytes. 0, or CMN_ETOOBIG / -ENOMEM after freeing the buffer. */
int cmn_buf_append(cmn_buf_t *b, const void *p, size_t n);
int cmn_buf_appends(cmn_buf_t *b, const char *s);
int cmn_buf_appendf(cmn_buf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int cmn_buf_vappendf(cmn_buf_t *b, const char *fmt, va_list ap);
void cmn_buf_reset(cmn_buf_t *b);  /* len = 0, keeps memory */
void cmn_buf_free(cmn_buf_t *b);
/** Hands the data to the caller (free() it) and reinitialises the buffer. */
char *cmn_buf_steal(cmn_buf_t *b, size_t *len);

#endif /* CMN_BUF_H */
