/*
 * archive.c - the archive: a local directory (embedded default) or S3
 * object storage with the local directory as read-through cache.
 *
 * Layout under archive.dir:
 *   <s0s1>/<study hash>/<series hash>/<sop hash>.dcm   archived instances
 *   conflicts/<sop hash>/<sha256>.dcm                   conflicting copies
 * where each hash is the first 32 hex digits of SHA-256(UID): any UID becomes
 * a safe, fixed-length file name and studies spread over 256 directories.
 *
 * Writes are atomic: the content is written to a temporary name in the same
 * file system and fsync'd, renamed into place, and the directory fsync'd, so
 * a crash leaves either no file or the whole file, never a partial one.
 * Every call blocks (file I/O): run them on the threadpool.
 *
 * Backend "s3" (archive.backend): the same layout is the object key space
 * (key = path relative to archive.dir, e.g. "ab/<study>/<series>/<sop>.dcm").
 * cloud_archive_place() uploads first (x-amz-content-sha256 = the file's
 * SHA-256, so the server refuses a corrupted body; an object exists only
 * once complete) and only then renames the file into the local directory,
 * which serves as a cache. Readers call cloud_archive_fetch() before opening
 * a path (downloads a missing file, temp name + rename) or
 * cloud_archive_read_range() for frames (ranged GET when not cached).
 * The S3 client is created once (cloud_archive_open(), or lazily) and is
 * shared by all threadpool workers.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cmn/crypto.h"
#include "cmn/errors.h"
#include "cmn/log.h"
#include "cmn/s3.h"
#include "internal.h"

const cmn_conf_opt_t cloud__archive_opts[] = {
    CMN_CONF_OPT_STR(cloud_archive_conf_t, dir, "var/cloud/archive",
                     "archive root directory for DICOM instances (the cache with backend s3)"),
    CMN_CONF_OPT_STR(cloud_archive_conf_t, backend, "dir",
                     "where instances live: dir (archive.dir) or s3 (object storage)"),
    CMN_CONF_OPT_STR(cloud_archive_conf_t, s3_endpoint, "",
                     "S3 endpoint URL, http(s)://host[:port][/path]"),
    CMN_CONF_OPT_STR(cloud_archive_conf_t, s3_region, "us-east-1", "S3 SigV4 region"),
    CMN_CONF_OPT_STR(cloud_archive_conf_t, s3_bucket, "", "S3 bucket (must exist)"),
    CMN_CONF_OPT_STR(cloud_archive_conf_t, s3_access_key, "", "S3 access key id"),
    CMN_CONF_OPT_STR(cloud_archive_conf_t, s3_secret_file, "",
                     "file holding the S3 secret key (absolute path)"),
    CMN_CONF_OPT_BOOL(cloud_archive_conf_t, s3_path_style, 1,
                      "path-style URLs (ENDPOINT/BUCKET/KEY); false = virtual-host style"),
};
const size_t cloud__archive_nopts = CMN_ARRAY_SIZE(cloud__archive_opts);

/* ------------------------------------------------------------ backend */

static pthread_mutex_t s3_mu = PTHREAD_MUTEX_INITIALIZER;
static cmn_s3_t *archive_s3;       /* shared client once created (guarded by s3_mu) */

bool cloud_archive_is_s3(void)
{
    const char *b = cloud_conf->archive.backend;

    return b && strcmp(b, "s3") == 0;
}

/* The S3 client, created on first use. 0 with *out NULL for backend "dir". */
static int archive_client(cmn_s3_t **out)
{
    const cloud_archive_conf_t *c = &cloud_conf->archive;
    int rc = 0;

    *out = NULL;
    if (!c->backend || !*c->backend || strcmp(c->backend, "dir") == 0)
        return 0;
    if (strcmp(c->backend, "s3") != 0) {
        CMN_LOG_E("archive", "archive.backend: \"%s\" is neither \"dir\" nor \"s3\"", c->backend);
        return CMN_ECONFIG;
    }
    pthread_mutex_lock(&s3_mu);
    if (!archive_s3) {
        cmn_s3_conf_t sc = {
            .endpoint = c->s3_endpoint,
            .region = c->s3_region,
            .bucket = c->s3_bucket,
            .access_key = c->s3_access_key,
            .secret_file = c->s3_secret_file,
            .path_style = c->s3_path_style,
        };
        if (!c->s3_endpoint || !*c->s3_endpoint || !c->s3_bucket || !*c->s3_bucket ||
            !c->s3_access_key || !*c->s3_access_key || !c->s3_secret_file ||
            !*c->s3_secret_file) {
            CMN_LOG_E("archive", "archive.backend s3 needs s3_endpoint, s3_bucket, "
                      "s3_access_key and s3_secret_file");
            rc = CMN_ECONFIG;
        } else {
            rc = cmn_s3_create(&sc, &archive_s3);
            if (rc < 0)
                rc = CMN_ECONFIG;
        }
    }
    *out = archive_s3;
    pthread_mutex_unlock(&s3_mu);
    return rc;
}

int cloud_archive_open(void)
{
    cmn_s3_t *s3;

    return archive_client(&s3);
}

void cloud_archive_shutdown(void)
{
    pthread_mutex_lock(&s3_mu);
    cmn_s3_destroy(archive_s3);
    archive_s3 = NULL;
    pthread_mutex_unlock(&s3_mu);
}

/* The object key of an archive path: the path relative to archive.dir. */
static const char *archive_key(const char *path)
{
    const char *dir = cloud_conf->archive.dir;
    size_t n = strlen(dir);

    while (n > 1 && dir[n - 1] == '/')
        n--;
    if (strncmp(path, dir, n) != 0 || path[n] != '/' || path[n + 1] == '\0')
        return NULL;
    return path + n + 1;
}

static void uid_hash(const char *uid, char out[33])
{
    uint8_t h[CMN_SHA256_LEN];
    char hex[CMN_SHA256_HEX_LEN + 1];

    cmn_sha256(uid, strlen(uid), h);
    cmn_hex(h, sizeof(h), hex);
    memcpy(out, hex, 32);
    out[32] = '\0';
}

int cloud_archive_path(const char *study_uid, const char *series_uid, const char *sop_uid,
                       char *out, size_t outlen)
{
    char st[33], se[33], so[33];
    int n;

    uid_hash(study_uid, st);
    uid_hash(series_uid, se);
    uid_hash(sop_uid, so);
    n = snprintf(out, outlen, "%s/%.2s/%s/%s/%s.dcm", cloud_conf->archive.dir, st, st, se, so);
    return (n < 0 || (size_t)n >= outlen) ? -ENAMETOOLONG : 0;
}

int cloud_archive_conflict_path(const char *sop_uid, const char *sha256, char *out,
                                size_t outlen)
{
    char so[33];
    int n;

    uid_hash(sop_uid, so);
    n = snprintf(out, outlen, "%s/conflicts/%s/%s.dcm", cloud_conf->archive.dir, so, sha256);
    return (n < 0 || (size_t)n >= outlen) ? -ENAMETOOLONG : 0;
}

int cloud_mkdirs(const char *path)
{
    char tmp[4096];
    size_t len = strlen(path);

    if (len == 0 || len >= sizeof(tmp))
        return -ENAMETOOLONG;
    memcpy(tmp, path, len + 1);
    for (char *p = tmp + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(tmp, 0750) < 0 && errno != EEXIST)
            return -errno;
        *p = '/';
    }
    if (mkdir(tmp, 0750) < 0 && errno != EEXIST)
        return -errno;
    return 0;
}

int cloud_fsync_dir(const char *path)
{
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    int rc = 0;

    if (fd < 0)
        return -errno;
    if (fsync(fd) < 0)
        rc = -errno;
    close(fd);
    return rc;
}

static void dir_of(const char *path, char *out, size_t outlen)
{
    const char *slash = strrchr(path, '/');

    if (!slash)
        snprintf(out, outlen, ".");
    else if (slash == path)
        snprintf(out, outlen, "/");
    else
        snprintf(out, outlen, "%.*s", (int)(slash - path), path);
}

int cloud_archive_place(const char *src, const char *dst)
{
    char dir[4096];
    cmn_s3_t *s3;
    int rc;

    rc = archive_client(&s3);
    if (rc < 0)
        return rc;
    if (s3) {
        const char *key = archive_key(dst);
        if (!key)
            return -EINVAL;
        cmn_s3_put_opts_t po = {.content_type = "application/dicom"};
        rc = cmn_s3_put_file(s3, key, src, &po);
        if (rc < 0) {
            CMN_LOG_E("archive", "upload key=%s: %s", key, cmn_strerror(rc));
            return rc;
        }
    }
    dir_of(dst, dir, sizeof(dir));
    rc = cloud_mkdirs(dir);
    if (rc < 0)
        return rc;
    if (rename(src, dst) < 0)
        return -errno;
    return cloud_fsync_dir(dir);
}

int cloud_write_file_atomic(const char *path, const void *p, size_t len)
{
    char tmp[4096], dir[4096];
    const char *c = p;
    int fd, rc = 0;

    if (snprintf(tmp, sizeof(tmp), "%s.tmp.%ld", path, (long)gettid()) >= (int)sizeof(tmp))
        return -ENAMETOOLONG;
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0640);
    if (fd < 0)
        return -errno;
    while (len > 0) {
        ssize_t n = write(fd, c, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            rc = -errno;
            goto out_unlink;
        }
        c += n;
        len -= (size_t)n;
    }
    if (fsync(fd) < 0) {
        rc = -errno;
        goto out_unlink;
    }
    close(fd);
    fd = -1;
    if (rename(tmp, path) < 0) {
        rc = -errno;
        goto out_unlink;
    }
    dir_of(path, dir, sizeof(dir));
    return cloud_fsync_dir(dir);

out_unlink:
    if (fd >= 0)
        close(fd);
    unlink(tmp);
    return rc;
}

int cloud_archive_fetch(const char *path)
{
    char dir[4096];
    cmn_s3_t *s3;
    const char *key;
    int rc;

    rc = archive_client(&s3);
    if (rc < 0)
        return rc;
    if (access(path, F_OK) == 0)
        return 0;
    if (!s3)
        return errno == ENOENT ? CMN_ENOTFOUND : -errno;
    key = archive_key(path);
    if (!key)
        return -EINVAL;
    dir_of(path, dir, sizeof(dir));
    rc = cloud_mkdirs(dir);
    if (rc < 0)
        return rc;
    rc = cmn_s3_get_to_file(s3, key, path, NULL);
    if (rc < 0 && rc != CMN_ENOTFOUND)
        CMN_LOG_E("archive", "fetch key=%s: %s", key, cmn_strerror(rc));
    return rc;
}

int cloud_archive_read_range(const char *path, uint64_t off, size_t len, void *buf,
                             size_t *got)
{
    cmn_s3_t *s3;
    size_t done = 0;
    int fd, rc;

    *got = 0;
    rc = archive_client(&s3);
    if (rc < 0)
        return rc;
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0 && (errno != ENOENT || !s3))
        return errno == ENOENT ? CMN_ENOTFOUND : -errno;
    if (fd < 0) {
        const char *key = archive_key(path);
        if (!key)
            return -EINVAL;
        return cmn_s3_get_range(s3, key, off, len, buf, got, NULL);
    }
    struct stat sb;
    if (fstat(fd, &sb) < 0) {
        rc = -errno;
        goto out_close;
    }
    if (len > 0 && off >= (uint64_t)sb.st_size) {
        rc = -ERANGE;
        goto out_close;
    }
    while (done < len) {
        ssize_t n = pread(fd, (char *)buf + done, len - done, (off_t)(off + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            rc = -errno;
            goto out_close;
        }
        if (n == 0)
            break;
        done += (size_t)n;
    }
    *got = done;
out_close:
    close(fd);
    return rc;
}
