/*
 * cmn_fs.c - durable-filesystem helpers (see cmn/fs.h).
 */
#include "cmn/fs.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int cmn_mkdirs(const char *path)
{
    char tmp[PATH_MAX];
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

int cmn_fsync_dir(const char *path)
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

/* write() (off < 0: at the file position) or pwrite() all len bytes of
 * wbuf, or - rbuf set - pread() them into rbuf. */
static int io_loop(int fd, const void *wbuf, void *rbuf, size_t len, int64_t off)
{
    size_t done = 0;

    while (done < len) {
        ssize_t n;
        if (rbuf)
            n = pread(fd, (char *)rbuf + done, len - done, (off_t)off);
        else if (off < 0)
            n = write(fd, (const char *)wbuf + done, len - done);
        else
            n = pwrite(fd, (const char *)wbuf + done, len - done, (off_t)off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return n < 0 ? -errno : -EIO;
        done += (size_t)n;
        if (off >= 0)
            off += n;
    }
    return 0;
}

int cmn_write_all(int fd, const void *buf, size_t len)
{
    return io_loop(fd, buf, NULL, len, -1);
}

int cmn_pwrite_all(int fd, const void *buf, size_t len, uint64_t off)
{
    return io_loop(fd, buf, NULL, len, (int64_t)off);
}

int cmn_pread_all(int fd, void *buf, size_t len, uint64_t off)
{
    return io_loop(fd, NULL, buf, len, (int64_t)off);
}

int cmn_file_chunks(const char *path, void (*cb)(void *ud, const void *p, size_t n), void *ud,
                    uint64_t *size)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    int rc;

    if (size)
        *size = 0;
    if (fd < 0)
        return -errno;
    rc = cmn_fd_chunks(fd, cb, ud, size);
    close(fd);
    return rc;
}

int cmn_fd_chunks(int fd, void (*cb)(void *ud, const void *p, size_t n), void *ud,
                  uint64_t *size)
{
    uint64_t total = 0;
    char *buf = malloc(1 << 16);
    int rc = 0;

    if (!buf)
        return -ENOMEM;
    for (;;) {
        ssize_t n = pread(fd, buf, 1 << 16, (off_t)total);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            rc = -errno;
            break;
        }
        if (n == 0)
            break;
        cb(ud, buf, (size_t)n);
        total += (uint64_t)n;
    }
    free(buf);
    if (size)
        *size = total;
    return rc;
}
