/*
 * errors.h - Yunying's error codes.
 *
 * Every int-returning function returns 0 on success and a negative value on
 * error. System errors are -errno; our own codes are the CMN_E* values below,
 * generated from one X-macro list (libuv's UV_ERRNO_MAP pattern) so that
 * cmn_strerror() and cmn_err_name() never drift from the list.
 */
#ifndef CMN_ERRORS_H
#define CMN_ERRORS_H

#include <stdbool.h>
#include <stdlib.h>

#define CMN_ERRNO_MAP(X)                                                    \
    X(CONFIG,    -10001, "invalid configuration")                           \
    X(PARSE,     -10002, "malformed input")                                 \
    X(TOOBIG,    -10003, "input exceeds a size limit")                      \
    X(DB,        -10004, "database error")                                  \
    X(DICOM,     -10005, "DICOM error")                                     \
    X(HASH,      -10006, "hash mismatch")                                   \
    X(AUTH,      -10007, "authentication failed")                           \
    X(NOTFOUND,  -10008, "not found")                                       \
    X(CONFLICT,  -10009, "conflicting object")                              \
    X(HTTP,      -10010, "HTTP error")                                      \
    X(PROTO,     -10011, "protocol error")                                  \
    X(NOSPACE,   -10012, "out of storage space")                            \
    X(CRYPTO,    -10013, "cryptography error")                              \
    X(TIMEOUT,   -10014, "timed out")                                       \
    X(INTERNAL,  -10015, "internal error")

enum {
#define CMN_ERR_ENUM(name, val, msg) CMN_E##name = (val),
    CMN_ERRNO_MAP(CMN_ERR_ENUM)
#undef CMN_ERR_ENUM
};

/** Human-readable message for an error code (ours or -errno). Static storage. */
const char *cmn_strerror(int err);

/** Symbolic name ("CMN_EPARSE", "ENOENT") for an error code. Static storage. */
const char *cmn_err_name(int err);

/*
 * "Cannot happen" checks that must not take a daemon down (SQLite's
 * ALWAYS/NEVER): abort in debug builds, evaluate to the condition in release
 * builds so the caller can take its error path.
 */
#ifdef NDEBUG
#define CMN_ALWAYS(x) (!!(x))
#define CMN_NEVER(x)  (!!(x))
#else
#define CMN_ALWAYS(x) ((x) ? 1 : (cmn_assert_failed(#x, __FILE__, __LINE__), 0))
#define CMN_NEVER(x)  ((x) ? (cmn_assert_failed("!(" #x ")", __FILE__, __LINE__), 1) : 0)
#endif
void cmn_assert_failed(const char *expr, const char *file, int line);

/** malloc that logs and aborts on failure: for small, fixed sizes only. */
void *cmn_xmalloc(size_t n);
void *cmn_xcalloc(size_t n, size_t size);
void *cmn_xrealloc(void *p, size_t n);
char *cmn_xstrdup(const char *s);
/** malloc for sizes derived from input: returns NULL on failure. */
void *cmn_try_malloc(size_t n);

#ifndef container_of
#include <stddef.h>
#define container_of(ptr, type, member) \
    ((type *)((char *)(ptr) - offsetof(type, member)))
#endif

#define CMN_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

#endif /* CMN_ERRORS_H */
