/*
 * bundle.c - splits a received bundle (proto.h, PROTOCOL.md "Bundles") into
 * its member files and checks each one; ingest.c then archives and indexes
 * the good members in one transaction.
 *
 * One pass over the staged chunks (staging.h: each verified against its
 * recorded hash as it ends): the bytes are hashed for the bundle's SHA-256
 * while the header is parsed and every member is written to its own
 * uniquely named scratch file (hashed too). Nothing is assembled twice.
 * A member whose bytes do not match the header, or that is not DICOM, or
 * whose SOP Instance UID or study differs from the header, is "rejected";
 * the others go on. A bundle whose whole hash or layout is wrong is refused
 * as a whole (422 bad_object, like an instance).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cmn/crypto.h"
#include "cmn/errors.h"
#include "cmn/log.h"
#include "proto/proto.h"
#include "bundle.h"
#include "internal.h"
#include "staging.h"

#define BUF_LEN (1u << 16)

/* The staged chunks as one stream, hashing everything read. */
typedef struct {
    cloud_staging_reader_t *r;
    cmn_sha256_ctx_t sha;
    uint64_t total;
} stream_t;

/* Reads up to len bytes; 0 at the end. Errors as cloud__staging_read. */
static ssize_t stream_read(stream_t *s, void *buf, size_t len)
{
    ssize_t n = cloud__staging_read(s->r, buf, len);

    if (n > 0) {
        cmn_sha256_update(&s->sha, buf, (size_t)n);
        s->total += (uint64_t)n;
    }
    return n;
}

/* Reads exactly len bytes. 0, -EPROTO when the stream ends early, -errno. */
static int stream_exact(stream_t *s, void *buf, size_t len)
{
    size_t got = 0;
    while (got < len) {
        ssize_t n = stream_read(s, (uint8_t *)buf + got, len - got);
        if (n < 0)
            return (int)n;
        if (n == 0)
            return -EPROTO;
        got += (size_t)n;
    }
    return 0;
}

/* Copies len bytes of the stream to the new file path (open as fd, which
 * is closed), hashing them; the file is unlinked on error. */
static int stream_to_file(stream_t *s, uint64_t len, int fd, const char *path,
                          char sha_hex[65], uint8_t *buf)
{
    cmn_sha256_ctx_t c;
    uint8_t h[CMN_SHA256_LEN];
    int rc = 0;

    cmn_sha256_init(&c);
    while (len > 0) {
        size_t want = len < BUF_LEN ? (size_t)len : BUF_LEN;
        if ((rc = stream_exact(s, buf, want)) < 0)
            break;
        cmn_sha256_update(&c, buf, want);
        if (write(fd, buf, want) != (ssize_t)want) {
            rc = errno ? -errno : -EIO;
            break;
        }
        len -= want;
    }
    cmn_sha256_final(&c, h);
    cmn_hex(h, sizeof(h), sha_hex);
    if (close(fd) < 0 && rc == 0)
        rc = -errno;
    if (rc < 0)
        unlink(path);
    return rc;
}

static int fsync_path(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC), rc = 0;
    if (fd < 0)
        return -errno;
    if (fsync(fd) < 0)
        rc = -errno;
    close(fd);
    return rc;
}

/* Starts writeback of a file without waiting (best effort). */
static void start_writeback(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        (void)sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE);
        close(fd);
    }
}

void cloud__bundle_items_free(cloud_bundle_item_t *items, uint32_t n)
{
    if (!items)
        return;
    for (uint32_t i = 0; i < n; i++) {
        if (items[i].tmp[0])
            unlink(items[i].tmp);
        free(items[i].json);
        free(items[i].info);
    }
    free(items);
}

int cloud__bundle_split(cloud_staging_reader_t *r, uint64_t size, const char *want_sha,
                        cloud_bundle_item_t **out, uint32_t *nout, char *err, size_t errlen)
{
    stream_t s = { .r = r };
    uint8_t prefix[PROTO_BUNDLE_PREFIX], h[CMN_SHA256_LEN], *hdr = NULL, *buf = NULL;
    char sha[PROTO_HEX256 + 1], prefix_uri[512], derr[256];
    cloud_bundle_item_t *items = NULL;
    proto_bundle_t b;
    uint32_t jl;
    int rc;

    *out = NULL;
    *nout = 0;
    err[0] = '\0';
    memset(&b, 0, sizeof(b));
    cmn_sha256_init(&s.sha);
    if ((rc = stream_exact(&s, prefix, sizeof(prefix))) < 0 ||
        proto_bundle_prefix_decode(prefix, sizeof(prefix), &jl, err, errlen) < 0 ||
        (uint64_t)PROTO_BUNDLE_PREFIX + jl > size) {
        if (rc == 0 && !err[0])
            snprintf(err, errlen, "bundle header larger than the object");
        if (rc == -EPROTO || rc == 0)
            rc = CMN_EPARSE;
        if (rc == CMN_EPARSE && !err[0])
            snprintf(err, errlen, "bundle shorter than its header");
        goto out;
    }
    hdr = cmn_xmalloc(PROTO_BUNDLE_PREFIX + jl);
    memcpy(hdr, prefix, PROTO_BUNDLE_PREFIX);
    if ((rc = stream_exact(&s, hdr + PROTO_BUNDLE_PREFIX, jl)) < 0) {
        if (rc == -EPROTO) {
            rc = CMN_EPARSE;
            snprintf(err, errlen, "bundle shorter than its header");
        }
        goto out;
    }
    if (proto_bundle_header_decode(hdr, PROTO_BUNDLE_PREFIX + jl, size, &b, err, errlen) < 0) {
        rc = CMN_EPARSE;
        goto out;
    }
    items = cmn_xcalloc(b.n, sizeof(*items));
    buf = cmn_xmalloc(BUF_LEN);
    for (uint32_t i = 0; i < b.n; i++) {
        cloud_bundle_item_t *it = &items[i];
        it->m = b.m[i];
        int fd = cloud__staging_tmpfile("member", it->tmp, sizeof(it->tmp));
        if (fd < 0) {
            rc = fd;
            it->tmp[0] = '\0';
            goto out;
        }
        rc = stream_to_file(&s, it->m.size, fd, it->tmp, it->sha256, buf);
        if (rc < 0) {
            it->tmp[0] = '\0';
            if (rc == -EPROTO) {
                rc = CMN_EPARSE;
                snprintf(err, errlen, "bundle shorter than its members");
            }
            goto out;
        }
    }
    /* Anything after the last member? (decode made the sizes add up, so
     * only a chunk longer than declared could carry more.) */
    ssize_t extra = stream_read(&s, prefix, 1);   /* also ends (checks) the last chunk */
    if (extra < 0) {
        rc = (int)extra;
        goto out;
    }
    if (extra > 0) {
        rc = CMN_EPARSE;
        snprintf(err, errlen, "bytes after the last member");
        goto out;
    }
    cmn_sha256_final(&s.sha, h);
    cmn_hex(h, sizeof(h), sha);
    if (s.total != size || strcmp(sha, want_sha) != 0) {
        rc = CMN_EPARSE;
        snprintf(err, errlen, "object SHA-256 or size does not match");
        goto out;
    }
    /* Per member: its bytes, then DICOM, then what it claims to be. */
    for (uint32_t i = 0; i < b.n; i++) {
        cloud_bundle_item_t *it = &items[i];
        if (strcmp(it->sha256, it->m.sha256) != 0) {
            snprintf(it->why, sizeof(it->why), "member SHA-256 does not match the header");
            continue;
        }
        it->info = cmn_xmalloc(sizeof(*it->info));
        if (cmn_dicom_read_info(it->tmp, it->info, derr, sizeof(derr)) < 0) {
            snprintf(it->why, sizeof(it->why), "not a readable DICOM instance");
            continue;
        }
        if (strcmp(it->info->sop_uid, it->m.sop_uid) != 0 ||
            strcmp(it->info->study_uid, b.study_uid) != 0) {
            snprintf(it->why, sizeof(it->why), "UIDs differ from the bundle header");
            continue;
        }
        snprintf(prefix_uri, sizeof(prefix_uri),
                 "/dicomweb/studies/%s/series/%s/instances/%s/bulk", it->info->study_uid,
                 it->info->series_uid, it->info->sop_uid);
        if (cmn_dicom_to_json(it->tmp, prefix_uri, &it->json, &it->jsonlen, derr,
                              sizeof(derr)) < 0) {
            it->json = NULL;
            snprintf(it->why, sizeof(it->why), "cannot be converted to DICOM JSON");
            continue;
        }
        it->ok = true;
    }
    /* Durable before the index names them (archive placement renames).
     * Writeback of every member starts first, so the fsyncs that follow
     * wait for I/O already under way (and one file system commit covers
     * most of them) instead of one full round each. */
    for (uint32_t i = 0; i < b.n; i++)
        if (items[i].ok)
            start_writeback(items[i].tmp);
    for (uint32_t i = 0; i < b.n; i++)
        if (items[i].ok && (rc = fsync_path(items[i].tmp)) < 0)
            goto out;
    *out = items;
    *nout = b.n;
    items = NULL;
    rc = 0;
out:
    cloud__bundle_items_free(items, b.n);
    proto_bundle_free(&b);
    free(hdr);
    free(buf);
    return rc;
}
