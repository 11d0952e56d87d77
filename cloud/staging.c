/*
 * staging.c - the chunks of uploads in progress (see staging.h): a shared
 * directory (archive.backend "dir") or the archive bucket ("s3").
 *
 * ingest.c adds a chunks row only after cloud__staging_put returned, so the
 * index never lists a chunk that is not durable in staging. The reverse can
 * happen (a staging directory that is not shared after all, an operator or
 * lifecycle rule deleting keys): the reader then reports which chunk is
 * gone and ingest.c forgets it, so the edge sends it again.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cmn/errors.h"
#include "cmn/log.h"
#include "cmn/s3.h"
#include "internal.h"
#include "staging.h"

#define BUF_LEN (1u << 16)

/* The S3 client for backend "s3", NULL for "dir" (or when misconfigured:
 * the daemon refused to start then, so "dir" is a safe reading). */
static cmn_s3_t *staging_s3(void)
{
    cmn_s3_t *s3 = NULL;

    if (cloud__archive_s3(&s3) < 0)
        return NULL;
    return s3;
}

static int chunk_key(const char *object_id, uint32_t i, char *out, size_t outlen)
{
    int n = snprintf(out, outlen, "%sstaging/%s/%" PRIu32, cloud__archive_prefix(), object_id,
                     i);
    return (n < 0 || (size_t)n >= outlen) ? -ENAMETOOLONG : 0;
}

static int object_dir(const char *object_id, char *out, size_t outlen)
{
    int n = snprintf(out, outlen, "%s/%s", cloud_conf->ingest.staging_dir, object_id);
    return (n < 0 || (size_t)n >= outlen) ? -ENAMETOOLONG : 0;
}

static int chunk_path(const char *object_id, uint32_t i, char *out, size_t outlen)
{
    int n = snprintf(out, outlen, "%s/%s/%" PRIu32, cloud_conf->ingest.staging_dir, object_id,
                     i);
    return (n < 0 || (size_t)n >= outlen) ? -ENAMETOOLONG : 0;
}

int cloud__staging_tmpfile(const char *stem, char *path, size_t pathlen)
{
    int n = snprintf(path, pathlen, "%s/.tmp/%s-XXXXXX", cloud_conf->ingest.staging_dir, stem);
    int fd;

    if (n < 0 || (size_t)n >= pathlen)
        return -ENAMETOOLONG;
    fd = mkostemp(path, O_CLOEXEC);
    if (fd < 0 && errno == ENOENT) {   /* .tmp removed behind our back */
        char dir[4096];
        snprintf(dir, sizeof(dir), "%s/.tmp", cloud_conf->ingest.staging_dir);
        if (cmn_mkdirs(dir) == 0) {
            snprintf(path, pathlen, "%s/.tmp/%s-XXXXXX", cloud_conf->ingest.staging_dir, stem);
            fd = mkostemp(path, O_CLOEXEC);
        }
    }
    if (fd < 0)
        return -errno;
    (void)fchmod(fd, 0640);
    return fd;
}

/* ------------------------------------------------------------------ write */

/* A name next to dst that no other process or machine uses: dst.tmp-<random>. */
static int unique_sibling(const char *dst, char *out, size_t outlen)
{
    uint8_t r[8];
    char hex[17];
    int n;

    if (cmn_random(r, sizeof(r)) < 0)
        return -EIO;
    cmn_hex(r, sizeof(r), hex);
    n = snprintf(out, outlen, "%s.tmp-%s", dst, hex);
    return (n < 0 || (size_t)n >= outlen) ? -ENAMETOOLONG : 0;
}

/* Copies file src to a new file tmp (O_EXCL). */
static int copy_new(const char *src, const char *tmp)
{
    char *buf;
    int in, out, rc = 0;
    ssize_t n;

    in = open(src, O_RDONLY | O_CLOEXEC);
    if (in < 0)
        return -errno;
    out = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0640);
    if (out < 0) {
        rc = -errno;
        close(in);
        return rc;
    }
    buf = cmn_xmalloc(BUF_LEN);
    while ((n = read(in, buf, BUF_LEN)) != 0) {
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 || write(out, buf, (size_t)n) != n) {
            rc = errno ? -errno : -EIO;
            break;
        }
    }
    free(buf);
    close(in);
    if (close(out) < 0 && rc == 0)
        rc = -errno;
    if (rc < 0)
        unlink(tmp);
    return rc;
}

/* Makes the received body durable at dst (temp + fsync + rename). */
static int put_dir(const cmn_http_req_t *req, const char *dst)
{
    char tmp[4300], dir[4096];
    const char *slash;
    int fd, rc;

    if (!req->body_file)
        return cloud_write_file_atomic(dst, req->body, req->body_len);

    /* A large body is already in a temp file: link it (same file system) so
     * the server's removal of its name does not touch ours. */
    if ((rc = unique_sibling(dst, tmp, sizeof(tmp))) < 0)
        return rc;
    if (link(req->body_file, tmp) < 0) {
        int e = errno;
        if (e != EXDEV && e != EPERM && e != EMLINK)
            return -e;
        if ((rc = copy_new(req->body_file, tmp)) < 0)
            return rc;
    }
    fd = open(tmp, O_RDONLY | O_CLOEXEC);
    if (fd < 0 || fsync(fd) < 0) {
        rc = -errno;
        if (fd >= 0)
            close(fd);
        unlink(tmp);
        return rc;
    }
    close(fd);
    if (rename(tmp, dst) < 0) {
        rc = -errno;
        unlink(tmp);
        return rc;
    }
    slash = strrchr(dst, '/');
    snprintf(dir, sizeof(dir), "%.*s", slash ? (int)(slash - dst) : 1, slash ? dst : ".");
    return cmn_fsync_dir(dir);
}

int cloud__staging_put(const char *object_id, uint32_t i, const cmn_http_req_t *req,
                       const char *sha256_hex)
{
    char path[4200], dir[4096];
    cmn_s3_t *s3 = staging_s3();
    int rc;

    if (s3) {
        cmn_s3_put_opts_t po = { .sha256_hex = sha256_hex };
        if ((rc = chunk_key(object_id, i, path, sizeof(path))) < 0)
            return rc;
        if (req->body_file)
            rc = cmn_s3_put_file(s3, path, req->body_file, &po);
        else
            rc = cmn_s3_put_buffer(s3, path, req->body ? req->body : "", req->body_len, &po);
        if (rc < 0)
            CMN_LOG_E("staging", "put key=%s: %s", path, cmn_strerror(rc));
        return rc;
    }
    if ((rc = object_dir(object_id, dir, sizeof(dir))) < 0 || (rc = cmn_mkdirs(dir)) < 0)
        return rc;
    if ((rc = chunk_path(object_id, i, path, sizeof(path))) < 0)
        return rc;
    return put_dir(req, path);
}

/* ---------------------------------------------------------------- queries */

int cloud__staging_has(const char *object_id, uint32_t i)
{
    char path[4200];
    cmn_s3_t *s3 = staging_s3();
    cmn_s3_stat_t st;
    int rc;

    if (s3) {
        if ((rc = chunk_key(object_id, i, path, sizeof(path))) < 0)
            return rc;
        rc = cmn_s3_head(s3, path, &st);
        return rc == 0 ? 1 : rc == CMN_ENOTFOUND ? 0 : rc;
    }
    if ((rc = chunk_path(object_id, i, path, sizeof(path))) < 0)
        return rc;
    if (access(path, F_OK) == 0)
        return 1;
    return errno == ENOENT ? 0 : -errno;
}

void cloud__staging_drop(const char *object_id, uint32_t i)
{
    char path[4200];
    cmn_s3_t *s3 = staging_s3();

    if (s3) {
        if (chunk_key(object_id, i, path, sizeof(path)) == 0)
            (void)cmn_s3_delete(s3, path);
    } else if (chunk_path(object_id, i, path, sizeof(path)) == 0) {
        unlink(path);
    }
}

void cloud__staging_remove(const char *object_id, uint32_t nchunks)
{
    char dir[4096];
    cmn_s3_t *s3 = staging_s3();

    for (uint32_t i = 0; i < nchunks; i++)
        cloud__staging_drop(object_id, i);
    if (!s3 && object_dir(object_id, dir, sizeof(dir)) == 0)
        rmdir(dir);
}

/* ----------------------------------------------------------------- reader */

void cloud__staging_reader_init(cloud_staging_reader_t *r)
{
    r->cur = 0;
    r->fd = -1;
    r->got = 0;
    r->bad = 0;
    cmn_sha256_init(&r->sha);
}

/* Opens chunk r->cur: the staged file, or (s3) a scratch copy downloaded
 * and unlinked at once, so only the descriptor holds it. */
static int open_chunk(cloud_staging_reader_t *r)
{
    char path[4200], tmp[4200];
    cmn_s3_t *s3 = staging_s3();
    int rc, fd;

    if (!s3) {
        if ((rc = chunk_path(r->object_id, r->cur, path, sizeof(path))) < 0)
            return rc;
        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            return errno == ENOENT ? CMN_ENOTFOUND : -errno;
        return fd;
    }
    if ((rc = chunk_key(r->object_id, r->cur, path, sizeof(path))) < 0)
        return rc;
    fd = cloud__staging_tmpfile("chunk", tmp, sizeof(tmp));
    if (fd < 0)
        return fd;
    close(fd);
    rc = cmn_s3_get_to_file(s3, path, tmp, NULL);   /* replaces tmp atomically */
    if (rc < 0) {
        unlink(tmp);
        if (rc != CMN_ENOTFOUND)
            CMN_LOG_E("staging", "get key=%s: %s", path, cmn_strerror(rc));
        return rc;
    }
    fd = open(tmp, O_RDONLY | O_CLOEXEC);
    rc = fd < 0 ? -errno : fd;
    unlink(tmp);
    return rc;
}

/* The current chunk ended: its length and hash must be what was recorded. */
static int end_chunk(cloud_staging_reader_t *r)
{
    uint8_t h[CMN_SHA256_LEN];
    char hex[PROTO_HEX256 + 1];

    cmn_sha256_final(&r->sha, h);
    cmn_hex(h, sizeof(h), hex);
    close(r->fd);
    r->fd = -1;
    if (r->got != proto_chunk_len(r->size, r->chunk_size, r->cur) ||
        strcmp(hex, r->want[r->cur]) != 0) {
        r->bad = r->cur;
        return CMN_EHASH;
    }
    r->cur++;
    r->got = 0;
    cmn_sha256_init(&r->sha);
    return 0;
}

ssize_t cloud__staging_read(cloud_staging_reader_t *r, void *buf, size_t len)
{
    for (;;) {
        ssize_t n;
        int rc;

        if (r->fd < 0) {
            if (r->cur >= r->nchunks)
                return 0;
            rc = open_chunk(r);
            if (rc < 0) {
                r->bad = r->cur;
                return rc;
            }
            r->fd = rc;
        }
        n = read(r->fd, buf, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -errno;
        if (n == 0) {
            if ((rc = end_chunk(r)) < 0)
                return rc;
            continue;
        }
        cmn_sha256_update(&r->sha, buf, (size_t)n);
        r->got += (uint64_t)n;
        return n;
    }
}

void cloud__staging_reader_close(cloud_staging_reader_t *r)
{
    if (r->fd >= 0)
        close(r->fd);
    r->fd = -1;
}
