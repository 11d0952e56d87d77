/*
 * fs.h - small durable-filesystem helpers shared by the edge spool and the
 * cloud archive. Blocking: call them off the loop thread.
 */
#ifndef CMN_FS_H
#define CMN_FS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/** mkdir -p with mode 0750. 0, -ENAMETOOLONG or -errno. */
int cmn_mkdirs(const char *path);

/** fsync()s a directory, making renames and new entries in it durable. 0 or -errno. */
int cmn_fsync_dir(const char *path);

/** write()s all len bytes (again after EINTR and short writes). 0, -errno, or -EIO. */
int cmn_write_all(int fd, const void *buf, size_t len);
/** The same with pwrite() at off (the file position is left alone). */
int cmn_pwrite_all(int fd, const void *buf, size_t len, uint64_t off);
/** pread()s all len bytes at off (again after EINTR and short reads). 0, -errno, or -EIO
 * when the file ends first. */
int cmn_pread_all(int fd, void *buf, size_t len, uint64_t off);

/**
 * Reads path from start to end in 64 KiB pieces, handing each to cb (to
 * hash it, say); *size (may be NULL) is the number of bytes read.
 * 0 or -errno.
 */
int cmn_file_chunks(const char *path, void (*cb)(void *ud, const void *p, size_t n), void *ud,
                    uint64_t *size);
/** The same over an open descriptor, from offset 0 (pread: its offset is left alone). */
int cmn_fd_chunks(int fd, void (*cb)(void *ud, const void *p, size_t n), void *ud,
                  uint64_t *size);

#ifdef __cplusplus
}
#endif

#endif /* CMN_FS_H */
