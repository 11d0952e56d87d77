/*
 * s3.h - a blocking S3 client on libcurl (CURLOPT_AWS_SIGV4).
 *
 * Meant for threadpool workers: every call blocks until the operation is
 * finished. One cmn_s3_t may be shared by any number of threads; each call
 * borrows a curl easy handle from a small mutex-protected pool, so
 * connections are kept alive between calls of the same worker.
 *
 * Requests are signed with AWS Signature V4 by libcurl. Every request carries
 * x-amz-content-sha256 with the real SHA-256 of its body (the server rejects
 * a body that does not match it, so a completed PUT means the bytes arrived
 * intact). Object keys are percent-encoded here (RFC 3986 unreserved
 * characters and '/' stay as they are); query strings are written sorted.
 *
 * Idempotent operations (GET, HEAD, PUT of a whole object or one part,
 * DELETE, list, complete/abort multipart) are retried on transport errors
 * and on 408/429/5xx, with exponential backoff and full jitter. Initiating a
 * multipart upload (POST ?uploads) is not retried.
 *
 * Error codes (negative): CMN_ENOTFOUND (404: no such key, bucket or upload),
 * CMN_EAUTH (401/403: unknown key, bad signature, access denied), CMN_EHASH
 * (BadDigest: the body did not match its hash), CMN_ECONFLICT (409/412),
 * CMN_ETOOBIG (EntityTooLarge, 413), CMN_ENOSPACE (507), -ERANGE (416),
 * CMN_ETIMEOUT (transport timeout), CMN_EHTTP (other HTTP status or transport
 * error, after retries), CMN_EPARSE (unparsable response), -EINVAL (bad key
 * or argument), -errno (local files).
 *
 * Logs never contain the secret key, signatures or Authorization headers.
 * Keys appear in logs: use UIDs or hashes as keys, never patient data.
 */
#ifndef CMN_S3_H
#define CMN_S3_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CMN_S3_MIN_PART (5u << 20)          /* S3's minimum part size (bytes), except the last */
#define CMN_S3_MAX_PARTS 10000
#define CMN_S3_MAX_KEY 1024                 /* bytes, UTF-8 */
#define CMN_S3_ETAG_MAX 128
#define CMN_S3_MAX_PARALLEL 16

/** Configuration; strings are copied by cmn_s3_create. Zero fields take the defaults. */
typedef struct {
    const char *endpoint;         /* "http://127.0.0.1:9000", "https://oss-cn-hangzhou.aliyuncs.com";
                                     may end in a path prefix ("https://h/s3") */
    const char *region;           /* SigV4 region, default "us-east-1" */
    const char *bucket;           /* required */
    const char *access_key;       /* required (may contain ':', e.g. Swift's "acct:user") */
    const char *secret_key;       /* the secret itself, or NULL to read secret_file */
    const char *secret_file;      /* file holding the secret (trailing whitespace ignored) */
    bool path_style;              /* true: ENDPOINT/BUCKET/KEY; false: BUCKET.HOST/KEY */
    uint64_t multipart_threshold; /* bytes; files larger than this use multipart. Default 64 MiB */
    uint64_t part_size;           /* bytes, >= 5 MiB; default 16 MiB (raised to fit 10000 parts) */
    int max_retries;              /* retries after the first attempt; default 4; -1 = none */
    int retry_base_ms;            /* first backoff; default 100 */
    int retry_max_ms;             /* backoff cap; default 5000 */
    int connect_timeout_ms;       /* default 5000 */
    int stall_timeout_s;          /* abort when no byte moves for this long; default 60 */
    int list_page;                /* max-keys per ListObjectsV2 page; default 1000 */
    int parallel_parts;           /* multipart: parts hashed+sent concurrently (threads); default 2 */
    const char *ca_file;          /* CA bundle for https, NULL = system default */
} cmn_s3_conf_t;

/** Opaque client; thread-safe. */
typedef struct cmn_s3 cmn_s3_t;

/** What HEAD reports. */
typedef struct {
    uint64_t size;                /* bytes */
    char etag[CMN_S3_ETAG_MAX];   /* as sent by the server, quotes included */
} cmn_s3_stat_t;

/** One entry of a listing; pointers are valid during the callback only. */
typedef struct {
    const char *key;              /* decoded key */
    uint64_t size;                /* bytes */
    const char *etag;             /* quotes included */
} cmn_s3_obj_t;

/** Listing callback: return 0 to continue, anything else stops the listing and is returned. */
typedef int (*cmn_s3_list_cb)(const cmn_s3_obj_t *obj, void *arg);

/** Options of a PUT; all optional. */
typedef struct {
    const char *content_type;     /* default application/octet-stream */
    const char *sha256_hex;       /* known SHA-256 of the whole body (single PUT only), saves a pass */
} cmn_s3_put_opts_t;

/**
 * Creates a client. Validates the configuration (endpoint scheme, bucket name,
 * sizes) and reads the secret file. 0, CMN_ECONFIG (message logged, secrets
 * never) or -errno (secret file). *out is owned by the caller: cmn_s3_destroy.
 */
int cmn_s3_create(const cmn_s3_conf_t *conf, cmn_s3_t **out);

/** Frees the client and its pooled handles; wipes the secret. NULL is fine. */
void cmn_s3_destroy(cmn_s3_t *s3);

/** Creates the bucket; an existing bucket we own (409) counts as success. */
int cmn_s3_bucket_create(cmn_s3_t *s3);

/**
 * Uploads a file: one PUT up to multipart_threshold, a multipart upload above
 * it (parallel_parts parts in flight, each hashed and retried on its own;
 * the upload is aborted on failure). opts may be NULL.
 */
int cmn_s3_put_file(cmn_s3_t *s3, const char *key, const char *path,
                    const cmn_s3_put_opts_t *opts);

/** Uploads a memory buffer with one PUT (S3 caps this at 5 GiB). opts may be NULL. */
int cmn_s3_put_buffer(cmn_s3_t *s3, const char *key, const void *data, size_t len,
                      const cmn_s3_put_opts_t *opts);

/**
 * Downloads an object to path: written to a temporary file in the same
 * directory, then renamed, so path never holds a partial object. If st is
 * not NULL it receives the size and ETag.
 */
int cmn_s3_get_to_file(cmn_s3_t *s3, const char *key, const char *path, cmn_s3_stat_t *st);

/**
 * Reads len bytes at offset off into buf (a ranged GET). *got receives the
 * number of bytes read, less than len only at the end of the object; an
 * offset at or past the end gives -ERANGE. total, if not NULL, receives the
 * object size when the server reports it (else UINT64_MAX).
 */
int cmn_s3_get_range(cmn_s3_t *s3, const char *key, uint64_t off, size_t len, void *buf,
                     size_t *got, uint64_t *total);

/** HEAD: size and ETag. CMN_ENOTFOUND if absent. */
int cmn_s3_head(cmn_s3_t *s3, const char *key, cmn_s3_stat_t *st);

/** Deletes an object; deleting a missing key succeeds (S3 semantics). */
int cmn_s3_delete(cmn_s3_t *s3, const char *key);

/**
 * Lists the keys under prefix (ListObjectsV2, following continuation tokens),
 * calling cb for each in key order. Returns 0, an error, or cb's non-zero value.
 */
int cmn_s3_list(cmn_s3_t *s3, const char *prefix, cmn_s3_list_cb cb, void *arg);

/**
 * Writes the URL of key (already percent-encoded) plus an optional query
 * ("uploads=", written as given) into out. Path-style or virtual-host style
 * per the configuration. 0, -EINVAL (bad key) or CMN_ETOOBIG (out too small).
 */
int cmn_s3_url(const cmn_s3_t *s3, const char *key, const char *query, char *out, size_t outlen);

/**
 * Percent-encodes src for an S3 path (keep_slash) or a query value (!keep_slash):
 * everything but A-Z a-z 0-9 - . _ ~ (and '/' if keep_slash) becomes %XX.
 * Returns the length written (excluding the NUL) or CMN_ETOOBIG.
 */
int cmn_s3_encode(const char *src, bool keep_slash, char *out, size_t outlen);

#endif /* CMN_S3_H */
