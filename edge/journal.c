/*
 * journal.c - the ingest journal: a preallocated ring with group commit
 * (see journal.h for the record format, replay and checkpoints).
 *
 * Locking: j->mu guards everything below it in the struct. Appends copy
 * their data into the ring while holding it, so records reach the page
 * cache in sequence order and an fdatasync that starts after record N was
 * written covers every record up to N. The fdatasync itself runs without
 * the lock, by whichever waiter finds none in progress (the others wait
 * for it and then, if their record was written after it started, for the
 * next one).
 *
 * Streamed records go around the page cache: their bytes are gathered in
 * aligned buffers and written with O_DIRECT (a second descriptor) by
 * kernel AIO, S_NBUF writes in flight while the rest of the instance
 * arrives. At commit only the last buffer and the header are left to
 * write, and the fdatasync has no writeback to wait for - only the disk's
 * cache to flush. Buffered (the page cache, writeback kicked every 256 KiB)
 * the commit waited ~0.5-1 ms per CT image; synchronous O_DIRECT writes
 * moved that wait into the receive. Where O_DIRECT or AIO is refused
 * (tmpfs), the buffered path is used.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <linux/aio_abi.h>
#include <linux/fiemap.h>
#include <linux/fs.h>
#include <sys/syscall.h>
#include <zlib.h>

#include "cmn/errors.h"
#include "cmn/fs.h"
#include "cmn/log.h"

#include "journal.h"

#define J_MAGIC 0x314a5959u           /* "YYJ1" little endian */
#define J_VERSION 1u
#define J_ALIGN 4096u
#define J_HDR 48u
#define J_MAX_META 4096u
#define J_ZEROFILL_MAX (64ull << 20)
/* edge_journal_prepare writes in pieces of this size. */
#define PREP_CHUNK (1u << 20)

/* A checkpoint starts when live records hold this much of the ring: with
 * the spool's large lanes, a whole CT series streams in before one
 * starts, so its syncfs does not compete with the acknowledgements. */
#define CHECKPOINT_AT(j) ((j)->size / 2)

typedef struct {
    uint32_t magic;
    uint32_t version;
    uint64_t seq;
    uint32_t meta_len;
    uint32_t crc;                     /* crc32 of this header (crc = 0) and the meta */
    uint64_t data_len;
    uint64_t reserved[2];
} j_hdr_t;
_Static_assert(sizeof(j_hdr_t) == J_HDR, "journal header size");

/* O_DIRECT streaming: S_NBUF aligned buffers of S_BUF bytes, each one AIO
 * write when full. */
#define S_NBUF 8
#define S_BUF (128u << 10)

typedef struct {
    uint64_t seq;
    uint64_t off;                     /* start in the ring */
    uint64_t len;                     /* bytes taken (aligned) */
    bool done;
} j_rec_t;

struct edge_journal {
    int fd;                           /* owned */
    char *path;                       /* owned (for the O_DIRECT descriptor) */
    uint64_t size;                    /* ring bytes */
    edge_journal_checkpoint_cb cp_cb;
    void *cp_ud;
    pthread_t cp_thread;
    bool started;

    pthread_mutex_t mu;
    pthread_cond_t cond;              /* space freed, sync finished, records done */
    pthread_cond_t cp_cond;           /* wakes the checkpoint thread */
    uint64_t head;                    /* next append offset */
    uint64_t next_seq;
    j_rec_t *recs;                    /* FIFO of live records (from xmalloc), cap entries */
    size_t cap, first, count;
    uint64_t used;                    /* ring bytes held by live records (incl. skipped tails) */
    uint64_t written_seq;             /* last record fully in the page cache */
    uint64_t synced_seq;              /* last record on stable storage */
    bool syncing;
    int sync_err;                     /* sticky fdatasync error (-errno) */
    bool stopping;
    bool full_waiters;
    int64_t last_append_ms;
    int64_t idle_ms;                  /* checkpoint after this long without appends */
    edge_journal_stats_t stats;

    /* The record being streamed (edge_journal_stream_*): not in recs yet;
     * its bytes go at s_off, past head. One streaming writer at a time. */
    bool s_open;
    int s_err;                        /* sticky for this record: 0, -EFBIG, -errno */
    uint64_t s_off;                   /* record start (head, or 0 after a wrap) */
    uint64_t s_skip;                  /* ring tail skipped by a wrap */
    uint64_t s_written;               /* data bytes written (or gathered in s_bufs) */
    uint64_t s_kicked;                /* data bytes handed to writeback (buffered) */
    /* O_DIRECT streaming (direct_open). Used by the streaming writer only. */
    int dfd;                          /* owned; -1 = not tried, -2 = refused: buffered */
    aio_context_t aio;                /* owned */
    char *s_bufs;                     /* S_NBUF buffers of S_BUF bytes, aligned; owned */
    struct iocb s_cb[S_NBUF];
    bool s_busy[S_NBUF];              /* a write from this buffer is in flight */
    int s_inflight;                   /* writes and the flush in flight */
    int s_cur;                        /* the buffer being filled: data from s_flushed on */
    uint64_t s_flushed;               /* data bytes submitted (a multiple of S_BUF) */
    /* The last committed record: its commit only submits its last writes,
     * so that the spool's row insert runs while they and then its flush
     * run (edge_journal_sync waits for the writes, starts the flush and
     * reaps it). */
    struct iocb s_sync_cb;
    bool s_sync_writes;               /* its writes may be in flight; the flush is not started */
    bool s_sync_busy;                 /* its flush is in flight */
    int s_sync_rc;
    uint64_t s_sync_seq;              /* the record; 0 = none */
    bool direct_refused;              /* an O_DIRECT write got EINVAL: buffered from the next record */
    bool direct_proven;               /* an O_DIRECT record was written whole on this descriptor */
};

/* A streamed record's meta is padded to S_META, so its data starts at a
 * fixed, aligned offset before the meta is known. */
#define S_META (J_ALIGN - J_HDR)
#define S_DATA J_ALIGN

/* Writeback of a buffered streamed record starts every S_KICK bytes. */
#define S_KICK (256u << 10)

static uint64_t align_up(uint64_t v, uint64_t a)
{
    return (v + a - 1) / a * a;
}

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}


/* Copies len bytes of src (from 0) to the ring at off: copy_file_range
 * stays in the kernel; plain read/write when the file system refuses. */
static int copy_data(int src, int dst, uint64_t len, uint64_t off)
{
    loff_t in = 0, out = (loff_t)off;
    uint64_t left = len;

    while (left > 0) {
        ssize_t n = copy_file_range(src, &in, dst, &out, left, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EXDEV || errno == ENOSYS || errno == EINVAL || errno == EOPNOTSUPP))
            break;
        if (n < 0)
            return -errno;
        if (n == 0)
            return -EIO;              /* source shorter than len */
        left -= (uint64_t)n;
    }
    if (left > 0) {
        char *buf = malloc(1 << 16);
        if (!buf)
            return -ENOMEM;
        while (left > 0) {
            size_t chunk = left < (1 << 16) ? (size_t)left : (1 << 16);
            int rc = cmn_pread_all(src, buf, chunk, (uint64_t)in);
            if (rc == 0)
                rc = cmn_pwrite_all(dst, buf, chunk, (uint64_t)out);
            if (rc < 0) {
                free(buf);
                return rc;
            }
            in += (loff_t)chunk;
            out += (loff_t)chunk;
            left -= chunk;
        }
        free(buf);
    }
    return 0;
}

/* Copies len bytes inside the journal file, from src to dst (not overlapping). */
static int copy_within(int fd, uint64_t src, uint64_t dst, uint64_t len)
{
    char *buf = malloc(1 << 16);

    if (!buf)
        return -ENOMEM;
    for (uint64_t done = 0; done < len;) {
        size_t chunk = len - done < (1 << 16) ? (size_t)(len - done) : (1 << 16);
        int rc = cmn_pread_all(fd, buf, chunk, src + done);
        if (rc == 0)
            rc = cmn_pwrite_all(fd, buf, chunk, dst + done);
        if (rc < 0) {
            free(buf);
            return rc;
        }
        done += chunk;
    }
    free(buf);
    return 0;
}

static uint32_t hdr_crc(j_hdr_t h, const void *meta, size_t meta_len)
{
    h.crc = 0;
    uLong c = crc32(0L, (const Bytef *)&h, sizeof(h));
    return (uint32_t)crc32(c, (const Bytef *)meta, (uInt)meta_len);
}

static uint64_t rec_bytes(size_t meta_len, uint64_t data_len)
{
    return align_up(J_HDR + align_up(meta_len, 8) + data_len, J_ALIGN);
}

int edge_journal_open(const char *path, uint64_t size, edge_journal_t **out)
{
    edge_journal_t *j;
    struct stat st;
    int fd, rc;

    *out = NULL;
    size = align_up(size < (4u << 20) ? (4u << 20) : size, 1u << 20);
    fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0640);
    if (fd < 0)
        return -errno;
    if (fstat(fd, &st) < 0) {
        rc = -errno;
        goto out_close;
    }
    if ((uint64_t)st.st_size != size) {
        /* Allocated blocks, so that an fdatasync writes data, not the
         * allocation. fallocate makes them at once, as "unwritten" extents:
         * the first write of each costs one extent update in that
         * fdatasync, and every later pass through the ring none. Where
         * fallocate is not supported the ring is written with zeros, and
         * then kept to J_ZEROFILL_MAX. */
        rc = ftruncate(fd, 0) < 0 ? -errno : 0;
        if (rc == 0 && fallocate(fd, 0, 0, (off_t)size) < 0) {
            /* No space is an answer (the lane is not made); any other
             * refusal means zeros. */
            rc = errno == ENOSPC || errno == EDQUOT ? -errno : 1;
            if (rc < 0)
                goto out_close;
        }
        if (rc == 1) {
            char *z = calloc(1, 1 << 20);
            if (!z) {
                rc = -ENOMEM;
                goto out_close;
            }
            if (size > J_ZEROFILL_MAX)
                size = J_ZEROFILL_MAX;
            rc = 0;
            for (uint64_t off = 0; rc == 0 && off < size; off += 1 << 20)
                rc = cmn_pwrite_all(fd, z, 1 << 20, off);
            free(z);
        }
        if (rc == 0 && fsync(fd) < 0)
            rc = -errno;
        if (rc < 0)
            goto out_close;
        /* the directory entry: the spool fsyncs its directory after open */
        CMN_LOG_I("spool", "journal created path=%s size_mb=%llu", path,
                  (unsigned long long)(size >> 20));
    }
    j = calloc(1, sizeof(*j));
    if (!j) {
        rc = -ENOMEM;
        goto out_close;
    }
    j->fd = fd;
    j->dfd = -1;
    j->path = strdup(path);
    j->size = size;
    j->idle_ms = 2000;
    j->cap = (size_t)(size / J_ALIGN) + 1;
    j->recs = calloc(j->cap, sizeof(*j->recs));
    if (!j->recs || !j->path) {
        free(j->recs);
        free(j->path);
        free(j);
        rc = -ENOMEM;
        goto out_close;
    }
    pthread_mutex_init(&j->mu, NULL);
    pthread_cond_init(&j->cond, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&j->cp_cond, &ca);
    pthread_condattr_destroy(&ca);
    *out = j;
    return 0;

out_close:
    close(fd);
    return rc;
}

/* Writes zeros over [off, end) of the ring, through fd (O_DIRECT when
 * dfd >= 0). 0 or -errno. */
static int zero_range(int fd, const char *z, uint64_t off, uint64_t end, uint64_t *written)
{
    while (off < end) {
        size_t n = end - off < PREP_CHUNK ? (size_t)(end - off) : PREP_CHUNK;
        int rc = cmn_pwrite_all(fd, z, n, off);
        if (rc < 0)
            return rc;
        off += n;
        *written += n;
    }
    return 0;
}

int edge_journal_prepare(edge_journal_t *j, uint64_t *written)
{
    struct {
        struct fiemap fm;
        struct fiemap_extent ex[64];
    } f;
    uint64_t pos = 0;
    void *z = NULL;
    int rc = 0;

    *written = 0;
    /* O_DIRECT where the file system takes it: gigabytes of zeros need not
     * pass through (and evict) the page cache. */
    int fd = open(j->path, O_WRONLY | O_DIRECT | O_CLOEXEC);
    if (fd < 0)
        fd = dup(j->fd);
    if (fd < 0)
        return -errno;
    if (posix_memalign(&z, J_ALIGN, PREP_CHUNK) != 0) {
        close(fd);
        return -ENOMEM;
    }
    memset(z, 0, PREP_CHUNK);
    while (rc == 0 && pos < j->size) {
        memset(&f, 0, sizeof(f));
        f.fm.fm_start = pos;
        f.fm.fm_length = j->size - pos;
        f.fm.fm_extent_count = 64;
        f.fm.fm_flags = FIEMAP_FLAG_SYNC;   /* dirty pages written first: their extents show */
        if (ioctl(j->fd, FS_IOC_FIEMAP, &f.fm) < 0) {
            /* No extent map here (tmpfs, some network file systems): no
             * unwritten extents either, nothing to do. */
            if (errno != EOPNOTSUPP && errno != ENOTTY)
                rc = -errno;
            break;
        }
        if (f.fm.fm_mapped_extents == 0) {          /* a hole up to the end */
            rc = zero_range(fd, z, pos, j->size, written);
            break;
        }
        for (uint32_t i = 0; rc == 0 && i < f.fm.fm_mapped_extents; i++) {
            const struct fiemap_extent *e = &f.ex[i];
            uint64_t a = e->fe_logical, b = e->fe_logical + e->fe_length;
            if (a > pos)                             /* a hole before it */
                rc = zero_range(fd, z, pos, a < j->size ? a : j->size, written);
            if (rc == 0 && (e->fe_flags & FIEMAP_EXTENT_UNWRITTEN))
                rc = zero_range(fd, z, a > pos ? a : pos, b < j->size ? b : j->size, written);
            if (b > pos)
                pos = b;
            if (e->fe_flags & FIEMAP_EXTENT_LAST) {
                if (rc == 0 && pos < j->size)
                    rc = zero_range(fd, z, pos, j->size, written);
                pos = j->size;
            }
        }
    }
    if (rc == 0 && *written > 0 && fdatasync(fd) < 0)
        rc = -errno;
    free(z);
    close(fd);
    return rc;
}

uint64_t edge_journal_max_data(const edge_journal_t *j)
{
    return j->size / 4 - J_ALIGN - J_MAX_META;
}

/* ------------------------------------------------------------ replay */

/* Reads and checks the header + meta at off; 1 valid, 0 not. */
static int read_rec(edge_journal_t *j, uint64_t off, uint64_t seq, j_hdr_t *h, char *meta)
{
    if (off + J_HDR > j->size || cmn_pread_all(j->fd, h, sizeof(*h), off) < 0)
        return 0;
    if (h->magic != J_MAGIC || h->version != J_VERSION || h->seq != seq ||
        h->meta_len > J_MAX_META || h->data_len > j->size ||
        off + rec_bytes(h->meta_len, h->data_len) > j->size)
        return 0;
    if (cmn_pread_all(j->fd, meta, h->meta_len, off + J_HDR) < 0)
        return 0;
    meta[h->meta_len] = '\0';
    return hdr_crc(*h, meta, h->meta_len) == h->crc;
}

int edge_journal_replay(edge_journal_t *j, edge_journal_pos_t from, edge_journal_record_cb cb,
                        void *ud, edge_journal_pos_t *end)
{
    char *meta = malloc(J_MAX_META + 1);
    edge_journal_pos_t pos = from;
    int rc = 0, n = 0;
    j_hdr_t h;

    if (!meta)
        return -ENOMEM;
    if (pos.off >= j->size || pos.off % J_ALIGN)
        pos.off = 0;
    if (pos.seq == 0)
        pos.seq = 1;
    for (;;) {
        uint64_t off = pos.off;
        if (!read_rec(j, off, pos.seq, &h, meta)) {
            off = 0;                  /* the record may have wrapped */
            if (pos.off == 0 || !read_rec(j, 0, pos.seq, &h, meta))
                break;
        }
        rc = cb(ud, h.seq, meta, h.meta_len, j->fd, off + J_HDR + align_up(h.meta_len, 8),
                h.data_len);
        if (rc == 1) {                /* torn data: the log ends before it */
            rc = 0;
            break;
        }
        if (rc < 0)
            break;
        n++;
        pos.off = off + rec_bytes(h.meta_len, h.data_len);
        if (pos.off >= j->size)
            pos.off = 0;
        pos.seq++;
    }
    free(meta);
    if (n > 0)
        CMN_LOG_I("spool", "journal replayed records=%d", n);
    *end = pos;
    return rc;
}

/* ------------------------------------------------------------ checkpoint */

/* Caller holds mu. Covers the oldest run of done records: 0 when none. */
static size_t done_prefix(edge_journal_t *j, edge_journal_pos_t *tail)
{
    size_t k = 0;
    while (k < j->count && j->recs[(j->first + k) % j->cap].done)
        k++;
    if (k == 0)
        return 0;
    const j_rec_t *last = &j->recs[(j->first + k - 1) % j->cap];
    if (k < j->count) {
        const j_rec_t *next = &j->recs[(j->first + k) % j->cap];
        tail->off = next->off;
        tail->seq = next->seq;
    } else {
        tail->off = j->head;
        tail->seq = last->seq + 1;
    }
    return k;
}

/* Runs one checkpoint; called with mu held, returns with it held. */
static int checkpoint_locked(edge_journal_t *j)
{
    edge_journal_pos_t tail;
    size_t k = done_prefix(j, &tail);
    if (k == 0)
        return 0;
    pthread_mutex_unlock(&j->mu);
    int rc = j->cp_cb(j->cp_ud, tail);
    pthread_mutex_lock(&j->mu);
    if (rc < 0) {
        CMN_LOG_E("spool", "journal checkpoint failed: %s", cmn_strerror(rc));
        return rc;
    }
    for (size_t i = 0; i < k; i++) {
        j_rec_t *r = &j->recs[j->first];
        j->used -= r->len;
        j->first = (j->first + 1) % j->cap;
        j->count--;
    }
    if (j->count == 0)
        j->used = 0;              /* skipped tails belonged to freed records */
    j->stats.checkpoints++;
    pthread_cond_broadcast(&j->cond);
    return 0;
}

/* Caller holds mu: waits up to ms on cp_cond. */
static void cp_wait(edge_journal_t *j, long ms)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += ms / 1000;
    ts.tv_nsec += (ms % 1000) * 1000000;
    if (ts.tv_nsec >= 1000000000) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000;
    }
    pthread_cond_timedwait(&j->cp_cond, &j->mu, &ts);
}

static void *cp_main(void *arg)
{
    edge_journal_t *j = arg;

    pthread_mutex_lock(&j->mu);
    while (!j->stopping) {
        bool half = j->used >= CHECKPOINT_AT(j);
        bool idle = j->count > 0 && mono_ms() - j->last_append_ms >= j->idle_ms;
        if (half || j->full_waiters || idle) {
            size_t before = j->count;
            if (checkpoint_locked(j) < 0)
                cp_wait(j, 1000);            /* e.g. syncfs failed: retry, not spin */
            else if (j->count == before)
                cp_wait(j, 20);              /* oldest record not done yet */
            continue;
        }
        cp_wait(j, 1000);
    }
    pthread_mutex_unlock(&j->mu);
    return NULL;
}

void edge_journal_set_idle_ms(edge_journal_t *j, int64_t ms)
{
    j->idle_ms = ms > 0 ? ms : 2000;
}

int edge_journal_start(edge_journal_t *j, edge_journal_pos_t head, edge_journal_checkpoint_cb cb,
                       void *ud)
{
    j->head = head.off < j->size && head.off % J_ALIGN == 0 ? head.off : 0;
    j->next_seq = head.seq ? head.seq : 1;
    j->written_seq = j->synced_seq = j->next_seq - 1;
    j->cp_cb = cb;
    j->cp_ud = ud;
    j->last_append_ms = mono_ms();
    int rc = pthread_create(&j->cp_thread, NULL, cp_main, j);
    if (rc != 0)
        return -rc;
    j->started = true;
    return 0;
}

/* ------------------------------------------------------------ append, sync */

/* Caller holds mu: where a record of len bytes can go now, or -1 (full). */
static int64_t place(edge_journal_t *j, uint64_t len, uint64_t *skip)
{
    *skip = 0;
    if (j->count == 0) {
        if (j->head + len <= j->size)
            return (int64_t)j->head;
        *skip = j->size - j->head;
        return 0;
    }
    uint64_t first = j->recs[j->first].off;
    if (j->head > first) {
        if (j->head + len <= j->size)
            return (int64_t)j->head;
        if (len <= first) {
            *skip = j->size - j->head;
            return 0;
        }
        return -1;
    }
    /* wrapped: live records run from first to the end and from 0 to head */
    if (j->head + len <= first)
        return (int64_t)j->head;
    return -1;
}

/* Caller holds mu: place(), waiting for checkpoints while the ring is full.
 * The offset, or a negative errno (the journal failed or is closing). */
static int64_t place_wait(edge_journal_t *j, uint64_t len, uint64_t *skip)
{
    int64_t off;

    while ((off = place(j, len, skip)) < 0 && !j->stopping && j->sync_err == 0) {
        j->full_waiters = true;
        j->stats.waits_full++;
        pthread_cond_signal(&j->cp_cond);
        pthread_cond_wait(&j->cond, &j->mu);
    }
    j->full_waiters = false;
    if (off < 0)
        return j->sync_err ? j->sync_err : -ECANCELED;
    return off;
}

/* Caller holds mu: a record of total bytes at off, its header written, joins
 * the log (skip: the ring tail its wrap left unused). Its sequence number. */
static uint64_t add_record(edge_journal_t *j, uint64_t off, uint64_t total, uint64_t skip)
{
    j_rec_t *r = &j->recs[(j->first + j->count) % j->cap];
    r->seq = j->next_seq;
    r->off = off;
    r->len = total + skip;
    r->done = false;
    j->count++;
    j->used += total + skip;
    j->head = off + total;
    if (j->head >= j->size)
        j->head = 0;
    j->written_seq = j->next_seq;
    j->last_append_ms = mono_ms();
    j->stats.appends++;
    if (j->used >= CHECKPOINT_AT(j))
        pthread_cond_signal(&j->cp_cond);
    return j->next_seq++;
}

int edge_journal_append(edge_journal_t *j, const void *meta, size_t meta_len, int src_fd,
                        uint64_t len, uint64_t *seq)
{
    uint64_t total = rec_bytes(meta_len, len), skip = 0;
    char hbuf[J_HDR + J_MAX_META + 8];
    int64_t off;
    int rc;

    if (meta_len > J_MAX_META || len > edge_journal_max_data(j))
        return -EFBIG;
    pthread_mutex_lock(&j->mu);
    if ((off = place_wait(j, total, &skip)) < 0) {
        rc = (int)off;
        goto out_unlock;
    }
    j_hdr_t h = {.magic = J_MAGIC, .version = J_VERSION, .seq = j->next_seq,
                 .meta_len = (uint32_t)meta_len, .data_len = len};
    h.crc = hdr_crc(h, meta, meta_len);
    memcpy(hbuf, &h, J_HDR);
    memcpy(hbuf + J_HDR, meta, meta_len);
    memset(hbuf + J_HDR + meta_len, 0, align_up(meta_len, 8) - meta_len);
    /* Data first, header last: a header never describes data not yet written. */
    rc = copy_data(src_fd, j->fd, len, (uint64_t)off + J_HDR + align_up(meta_len, 8));
    if (rc == 0)
        rc = cmn_pwrite_all(j->fd, hbuf, J_HDR + align_up(meta_len, 8), (uint64_t)off);
    if (rc < 0)
        goto out_unlock;   /* nothing claimed: the next append overwrites it */
    *seq = add_record(j, (uint64_t)off, total, skip);
out_unlock:
    pthread_mutex_unlock(&j->mu);
    return rc;
}

/* ------------------------------------------------------------ streaming */

/* Caller holds mu: can a record of len bytes stay at off? */
static bool fits_at(const edge_journal_t *j, uint64_t off, uint64_t len)
{
    if (j->count == 0)
        return off + len <= j->size;
    uint64_t first = j->recs[j->first].off;
    if (j->head > first)              /* live records run from first to head */
        return off >= j->head ? off + len <= j->size : off + len <= first;
    return off >= j->head && off + len <= first;
}

/* The O_DIRECT descriptor, AIO context and buffers, set up at the first
 * streamed record; where any is refused, dfd = -2 (buffered). */
static void direct_open(edge_journal_t *j)
{
    void *buf = NULL;
    /* YY_SPOOL_LANE_BUFFERED=1: the page cache path anyway (the ingest
     * benchmark's cost table, not a configuration knob). */
    const char *b = getenv("YY_SPOOL_LANE_BUFFERED");
    int fd = b && *b == '1' ? -1 : open(j->path, O_RDWR | O_DIRECT | O_CLOEXEC);
    int err = fd < 0 ? (b && *b == '1' ? EPERM : errno) : 0;

    j->aio = 0;
    if (fd >= 0 && syscall(SYS_io_setup, S_NBUF + 1, &j->aio) < 0) {
        err = errno;
        j->aio = 0;
    }
    if (j->aio && posix_memalign(&buf, J_ALIGN, (size_t)S_NBUF * S_BUF) == 0) {
        j->dfd = fd;
        j->s_bufs = buf;
        return;
    }
    if (j->aio)
        syscall(SYS_io_destroy, j->aio);
    j->aio = 0;
    if (fd >= 0)
        close(fd);
    j->dfd = -2;
    CMN_LOG_I("spool", "journal %s: no O_DIRECT/AIO here (%s): streaming through the page cache",
              j->path, cmn_strerror(err ? -err : -ENOMEM));
}

static bool direct(const edge_journal_t *j)
{
    return j->dfd >= 0;
}

static char *sbuf(edge_journal_t *j, int i)
{
    return j->s_bufs + (size_t)i * S_BUF;
}

/* Waits for at least min writes in flight to finish. 0, or the first
 * failed write's -errno (-EIO when short). */
static int aio_reap(edge_journal_t *j, int min)
{
    struct io_event ev[S_NBUF + 1];
    int rc = 0;

    while (min > 0 && j->s_inflight > 0) {
        long n = syscall(SYS_io_getevents, j->aio, 1, S_NBUF + 1, ev, NULL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -errno;
        for (long k = 0; k < n; k++) {
            int i = (int)ev[k].data;
            if (i == S_NBUF) {        /* the flush: its result is for edge_journal_sync */
                j->s_sync_busy = false;
                j->s_sync_rc = ev[k].res < 0 ? (int)ev[k].res : 0;
                j->s_inflight--;
                min--;
                continue;
            }
            if (rc == 0 && (ev[k].res < 0 || (uint64_t)ev[k].res != j->s_cb[i].aio_nbytes))
                rc = ev[k].res < 0 ? (int)ev[k].res : -EIO;
            j->s_busy[i] = false;
            j->s_inflight--;
            min--;
        }
    }
    return rc;
}

/* Every write in flight finished (0) or the first error. */
static int aio_drain(edge_journal_t *j)
{
    int rc = 0;
    while (j->s_inflight > 0) {
        int r = aio_reap(j, j->s_inflight);
        if (rc == 0)
            rc = r;
    }
    return rc;
}

/* Starts writing len bytes of buffer i at off. 0 or -errno. */
static int aio_write(edge_journal_t *j, int i, size_t len, uint64_t off)
{
    struct iocb *cb = &j->s_cb[i];
    struct iocb *cbs[1] = {cb};

    memset(cb, 0, sizeof(*cb));
    cb->aio_data = (uint64_t)i;
    cb->aio_lio_opcode = IOCB_CMD_PWRITE;
    cb->aio_fildes = (uint32_t)j->dfd;
    cb->aio_buf = (uint64_t)(uintptr_t)sbuf(j, i);
    cb->aio_nbytes = len;
    cb->aio_offset = (int64_t)off;
    for (;;) {
        long n = syscall(SYS_io_submit, j->aio, 1, cbs);
        if (n == 1)
            break;
        if (n < 0 && errno == EINTR)
            continue;
        return n < 0 ? -errno : -EIO;
    }
    j->s_busy[i] = true;
    j->s_inflight++;
    return 0;
}

/* Starts the flush of what was written (IOCB_CMD_FDSYNC: an fdatasync in
 * the kernel's workqueue). false when AIO cannot (then edge_journal_sync
 * calls fdatasync itself). */
static bool aio_flush(edge_journal_t *j, uint64_t seq)
{
    struct iocb *cb = &j->s_sync_cb;
    struct iocb *cbs[1] = {cb};
    long n;

    memset(cb, 0, sizeof(*cb));
    cb->aio_data = S_NBUF;
    cb->aio_lio_opcode = IOCB_CMD_FDSYNC;
    cb->aio_fildes = (uint32_t)j->dfd;
    while ((n = syscall(SYS_io_submit, j->aio, 1, cbs)) < 0 && errno == EINTR)
        ;
    if (n != 1)
        return false;
    j->s_sync_busy = true;
    j->s_sync_rc = 0;
    j->s_sync_seq = seq;
    j->s_inflight++;
    return true;
}

/* Makes buffer i free (its write finished). 0 or -errno. */
static int aio_free(edge_journal_t *j, int i)
{
    while (j->s_busy[i]) {
        int rc = aio_reap(j, 1);
        if (rc < 0)
            return rc;
    }
    return 0;
}

int edge_journal_stream_begin(edge_journal_t *j)
{
    pthread_mutex_lock(&j->mu);
    if (j->dfd == -1)
        direct_open(j);
    if (direct(j) && j->direct_refused) {
        /* The file system took the O_DIRECT descriptor but not its writes. */
        (void)aio_drain(j);
        syscall(SYS_io_destroy, j->aio);
        close(j->dfd);
        j->dfd = -2;
        CMN_LOG_W("spool", "journal %s: O_DIRECT writes refused: streaming through the page"
                  " cache", j->path);
    }
    if (direct(j))
        (void)aio_drain(j);           /* an aborted record's writes */
    j->s_open = true;
    j->s_err = j->sync_err;
    j->s_off = j->head;
    j->s_skip = 0;
    j->s_written = j->s_kicked = j->s_flushed = 0;
    j->s_cur = 0;
    pthread_mutex_unlock(&j->mu);
    return j->s_err;
}

/* Caller holds mu: makes room for the streamed record to grow to len data
 * bytes, moving what was written when it must wrap to offset 0. */
static int stream_room(edge_journal_t *j, uint64_t len)
{
    uint64_t total = rec_bytes(S_META, len), skip = 0;
    int64_t off;

    if (len > edge_journal_max_data(j))
        return -EFBIG;
    if (fits_at(j, j->s_off, total))
        return 0;
    if ((off = place_wait(j, total, &skip)) < 0)
        return (int)off;
    uint64_t on_disk = direct(j) ? j->s_flushed : j->s_written;
    if ((uint64_t)off != j->s_off && on_disk > 0) {
        /* Only the wrap moves a record (from head to 0), and a record is at
         * most a quarter of the ring: the two places never overlap. The
         * copy goes through the page cache; the commit's fdatasync covers it. */
        int rc = direct(j) ? aio_drain(j) : 0;
        if (rc == 0)
            rc = copy_within(j->fd, j->s_off + S_DATA, (uint64_t)off + S_DATA, on_disk);
        if (rc < 0)
            return rc;
        j->s_kicked = 0;
    }
    j->s_off = (uint64_t)off;
    j->s_skip = skip;
    return 0;
}

/* O_DIRECT: gathers buf into the current buffer and starts its write when
 * it is full. The region past head and the buffers are this writer's
 * alone: no lock held. 0 or -errno. */
static int direct_write(edge_journal_t *j, uint64_t data_at, const char *buf, size_t len,
                        uint64_t *written, uint64_t *flushed)
{
    while (len > 0) {
        size_t fill = (size_t)(*written - *flushed);
        size_t n = len < S_BUF - fill ? len : S_BUF - fill;
        memcpy(sbuf(j, j->s_cur) + fill, buf, n);
        *written += n;
        buf += n;
        len -= n;
        if (fill + n == S_BUF) {
            int rc = aio_write(j, j->s_cur, S_BUF, data_at + *flushed);
            if (rc == 0) {
                *flushed += S_BUF;
                j->s_cur = (j->s_cur + 1) % S_NBUF;
                rc = aio_free(j, j->s_cur);
            }
            if (rc < 0)
                return rc;
        }
    }
    return 0;
}

int edge_journal_stream_write(edge_journal_t *j, const void *buf, size_t len)
{
    int rc;

    pthread_mutex_lock(&j->mu);
    rc = !j->s_open ? -EINVAL : j->s_err;
    if (rc == 0)
        rc = stream_room(j, j->s_written + len);
    uint64_t at = j->s_off + S_DATA + j->s_written;
    if (rc == 0 && direct(j)) {
        uint64_t data_at = j->s_off + S_DATA, written = j->s_written, flushed = j->s_flushed;
        pthread_mutex_unlock(&j->mu);
        rc = direct_write(j, data_at, buf, len, &written, &flushed);
        pthread_mutex_lock(&j->mu);
        if (rc < 0) {
            j->s_err = rc;
            j->direct_refused = rc == -EINVAL;
        } else {
            j->s_written = written;
            j->s_flushed = flushed;
        }
        pthread_mutex_unlock(&j->mu);
        return rc;
    }
    pthread_mutex_unlock(&j->mu);
    /* The region past head is this writer's alone: written without the lock. */
    if (rc == 0)
        rc = cmn_pwrite_all(j->fd, buf, len, at);
    pthread_mutex_lock(&j->mu);
    if (rc < 0) {
        j->s_err = rc;
    } else {
        j->s_written += len;
        if (j->s_written - j->s_kicked >= S_KICK) {
            /* Start writeback now, so the fdatasync at commit finds the
             * record mostly on disk already. */
            (void)sync_file_range(j->fd, (off_t)(j->s_off + S_DATA + j->s_kicked),
                                  (off_t)(j->s_written - j->s_kicked), SYNC_FILE_RANGE_WRITE);
            j->s_kicked = j->s_written;
        }
    }
    pthread_mutex_unlock(&j->mu);
    return rc;
}

uint64_t edge_journal_stream_bytes(edge_journal_t *j)
{
    pthread_mutex_lock(&j->mu);
    uint64_t n = j->s_open && j->s_err == 0 ? j->s_written : 0;
    pthread_mutex_unlock(&j->mu);
    return n;
}

int edge_journal_stream_commit(edge_journal_t *j, const void *meta, size_t meta_len,
                               uint64_t *seq)
{
    char *hbuf;
    int rc;

    if (meta_len > S_META)
        return -EFBIG;
    hbuf = calloc(1, S_DATA);
    if (!hbuf)
        return -ENOMEM;
    pthread_mutex_lock(&j->mu);
    rc = !j->s_open ? -EINVAL : j->s_err;
    if (rc == 0)
        rc = stream_room(j, j->s_written);
    if (rc < 0)
        goto out;
    uint64_t total = rec_bytes(S_META, j->s_written);
    j_hdr_t h = {.magic = J_MAGIC, .version = J_VERSION, .seq = j->next_seq,
                 .meta_len = S_META, .data_len = j->s_written};
    memcpy(hbuf + J_HDR, meta, meta_len);     /* zero-padded to S_META */
    h.crc = hdr_crc(h, hbuf + J_HDR, S_META);
    memcpy(hbuf, &h, J_HDR);
    if (direct(j)) {
        /* The data's last blocks, zero-padded (inside the record's aligned
         * size), and the header block go together; then every write must
         * have finished. The header may reach the disk before data: the
         * record is not acknowledged before the fdatasync, and a replay
         * checks the data's checksum (a torn record ends the log there). */
        size_t tail = (size_t)(j->s_written - j->s_flushed);
        size_t padded = (size_t)align_up(tail, J_ALIGN);
        int cur = j->s_cur, next = (cur + 1) % S_NBUF;
        memset(sbuf(j, cur) + tail, 0, padded - tail);
        rc = padded ? aio_write(j, cur, padded, j->s_off + S_DATA + j->s_flushed) : 0;
        if (rc == 0 && (rc = aio_free(j, next)) == 0) {
            memcpy(sbuf(j, next), hbuf, S_DATA);
            rc = aio_write(j, next, S_DATA, j->s_off);
        }
        /* Until one record went through whole, a file system that takes
         * O_DIRECT descriptors but refuses their writes (EINVAL) must be
         * told here, while the record can still be dropped. After that the
         * writes finish in edge_journal_sync, while the row goes in; an
         * error there is the journal's, as a failed flush is. */
        if (rc < 0 || !j->direct_proven) {
            int r = aio_drain(j);
            if (rc == 0)
                rc = r;
            j->direct_refused = rc == -EINVAL;
            j->direct_proven = rc == 0;
        }
        j->s_cur = 0;
        if (rc < 0)
            goto out;
    } else if ((rc = cmn_pwrite_all(j->fd, hbuf, S_DATA, j->s_off)) < 0) {
        /* The header last, as in append: it never describes data not yet written. */
        goto out;
    }
    *seq = add_record(j, j->s_off, total, j->s_skip);
    j->stats.streamed++;
    if (direct(j)) {
        j->s_sync_seq = *seq;
        j->s_sync_writes = true;
        j->s_sync_busy = false;
    }
out:
    j->s_open = false;
    pthread_mutex_unlock(&j->mu);
    free(hbuf);
    return rc;
}

void edge_journal_stream_abort(edge_journal_t *j)
{
    pthread_mutex_lock(&j->mu);
    j->s_open = false;                /* head did not move: the next record overwrites it */
    if (direct(j)) {
        (void)aio_drain(j);           /* none may land after the next record's bytes */
        j->s_cur = 0;
    }
    pthread_mutex_unlock(&j->mu);
}

int edge_journal_sync(edge_journal_t *j, uint64_t seq)
{
    int rc = 0;

    pthread_mutex_lock(&j->mu);
    if (j->s_sync_seq == seq && seq > j->synced_seq && j->sync_err == 0) {
        /* The record its commit left in flight (a lane has one writer:
         * nothing else is): its writes, then its flush. Where AIO refuses
         * the flush (-EINVAL), the fdatasync below does it. */
        int r = 0;
        if (j->s_sync_writes) {
            j->s_sync_writes = false;
            if ((r = aio_drain(j)) < 0)
                r = r == -EINVAL ? -EIO : r;     /* a write's EINVAL is no refused flush */
            else if (!aio_flush(j, seq))
                j->s_sync_rc = -EINVAL;
        }
        while (j->s_sync_busy && r == 0)
            r = aio_reap(j, 1);
        if (r == 0)
            r = j->s_sync_rc;
        j->s_sync_seq = 0;
        if (r == 0) {
            j->synced_seq = seq;
            j->stats.syncs++;
        } else if (r != -EINVAL) {
            j->sync_err = r;
            CMN_LOG_E("spool", "journal write or flush failed: %s", cmn_strerror(r));
        }
    }
    while (j->synced_seq < seq && j->sync_err == 0) {
        if (j->syncing) {
            pthread_cond_wait(&j->cond, &j->mu);
            continue;
        }
        uint64_t target = j->written_seq;
        j->syncing = true;
        pthread_mutex_unlock(&j->mu);
        int r = fdatasync(j->fd) < 0 ? -errno : 0;
        pthread_mutex_lock(&j->mu);
        j->syncing = false;
        if (r < 0) {
            /* After a failed fdatasync the page state is unknown: stop
             * using the journal (every later append fails -> A700). */
            j->sync_err = r;
            CMN_LOG_E("spool", "journal fdatasync failed: %s", cmn_strerror(r));
        } else if (target > j->synced_seq) {
            j->synced_seq = target;
        }
        j->stats.syncs++;
        pthread_cond_broadcast(&j->cond);
    }
    if (j->synced_seq < seq)
        rc = j->sync_err ? j->sync_err : -EIO;
    pthread_mutex_unlock(&j->mu);
    return rc;
}

void edge_journal_done(edge_journal_t *j, uint64_t seq)
{
    pthread_mutex_lock(&j->mu);
    for (size_t i = 0; i < j->count; i++) {
        j_rec_t *r = &j->recs[(j->first + i) % j->cap];
        if (r->seq == seq) {
            r->done = true;
            break;
        }
    }
    if (j->full_waiters || j->used >= CHECKPOINT_AT(j))
        pthread_cond_signal(&j->cp_cond);
    pthread_mutex_unlock(&j->mu);
}

void edge_journal_get_stats(edge_journal_t *j, edge_journal_stats_t *st)
{
    pthread_mutex_lock(&j->mu);
    *st = j->stats;
    pthread_mutex_unlock(&j->mu);
}

void edge_journal_close(edge_journal_t *j)
{
    if (!j)
        return;
    pthread_mutex_lock(&j->mu);
    j->stopping = true;
    pthread_cond_broadcast(&j->cp_cond);
    pthread_cond_broadcast(&j->cond);
    pthread_mutex_unlock(&j->mu);
    if (j->started) {
        pthread_join(j->cp_thread, NULL);
        pthread_mutex_lock(&j->mu);
        checkpoint_locked(j);
        pthread_mutex_unlock(&j->mu);
        CMN_LOG_I("spool", "journal closed appends=%llu fdatasyncs=%llu checkpoints=%llu"
                  " waits_full=%llu", (unsigned long long)j->stats.appends,
                  (unsigned long long)j->stats.syncs, (unsigned long long)j->stats.checkpoints,
                  (unsigned long long)j->stats.waits_full);
    }
    close(j->fd);
    if (j->dfd >= 0) {
        (void)aio_drain(j);
        syscall(SYS_io_destroy, j->aio);
        close(j->dfd);
    }
    free(j->s_bufs);
    free(j->path);
    pthread_cond_destroy(&j->cp_cond);
    pthread_cond_destroy(&j->cond);
    pthread_mutex_destroy(&j->mu);
    free(j->recs);
    free(j);
}
