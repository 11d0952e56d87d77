/*
 * archive.c - the local directory archive (embedded default; S3 later).
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
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cmn/crypto.h"
#include "cmn/errors.h"
#include "cmn/log.h"
#include "internal.h"

const cmn_conf_opt_t cloud__archive_opts[] = {
    CMN_CONF_OPT_STR(cloud_archive_conf_t, dir, "var/cloud/archive",
                     "archive root directory for DICOM instances"),
};
const size_t cloud__archive_nopts = CMN_ARRAY_SIZE(cloud__archive_opts);

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
    int rc;

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
