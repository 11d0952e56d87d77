/*
 * cmn_errors.c - error names and messages, checked allocation.
 */
#include "cmn/errors.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "cmn/log.h"

const char *cmn_strerror(int err)
{
    switch (err) {
#define CMN_ERR_MSG(name, val, msg) case CMN_E##name: return msg;
        CMN_ERRNO_MAP(CMN_ERR_MSG)
#undef CMN_ERR_MSG
    case 0:
        return "success";
    default:
        break;
    }
    if (err < 0 && err > -4096)
        return strerror(-err);   /* glibc's table: static, thread-safe for valid codes */
    return "unknown error";
}

const char *cmn_err_name(int err)
{
    switch (err) {
#define CMN_ERR_NAME(name, val, msg) case CMN_E##name: return "CMN_E" #name;
        CMN_ERRNO_MAP(CMN_ERR_NAME)
#undef CMN_ERR_NAME
    case 0: return "OK";
    case -ENOENT: return "ENOENT";
    case -ENOMEM: return "ENOMEM";
    case -EINVAL: return "EINVAL";
    case -EIO: return "EIO";
    case -ENOSPC: return "ENOSPC";
    case -EACCES: return "EACCES";
    case -EEXIST: return "EEXIST";
    case -ECANCELED: return "ECANCELED";
    case -ETIMEDOUT: return "ETIMEDOUT";
    case -ECONNREFUSED: return "ECONNREFUSED";
    default: return "EUNKNOWN";
    }
}

void cmn_assert_failed(const char *expr, const char *file, int line)
{
    cmn_log_write(CMN_LOG_ERROR, "assert", "%s:%d: check failed: %s", file, line, expr);
    abort();
}

static void oom(size_t n)
{
    cmn_log_write(CMN_LOG_ERROR, "alloc", "out of memory allocating %zu bytes", n);
    abort();
}

void *cmn_xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        oom(n);
    return p;
}

void *cmn_xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p)
        oom(n * size);
    return p;
}

void *cmn_xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (!q)
        oom(n);
    return q;
}

char *cmn_xstrdup(const char *s)
{
    size_t n = strlen(s) + 1;
    char *p = cmn_xmalloc(n);
    memcpy(p, s, n);
    return p;
}

void *cmn_try_malloc(size_t n)
{
    return malloc(n ? n : 1);
}
