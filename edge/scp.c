/*
 * scp.c - the C side of the SCP: config table for "scp" and the handling of
 * each received instance (see scp.h for the sequence and status codes).
 * Runs on DCMTK worker threads; everything it touches is thread-safe.
 */
#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>

#include "cmn/dicom.h"
#include "cmn/errors.h"
#include "cmn/log.h"
#include "proto/proto.h"

#include "internal.h"
#include "scp.h"

/* ------------------------------------------------------------ config */

const cmn_conf_opt_t edge__scp_opts[] = {
    CMN_CONF_OPT_STR(edge_conf_scp_t, ae_title, "YUNYING",
                     "our AE title (1-16 characters); associations calling another title are rejected"),
    CMN_CONF_OPT_STR(edge_conf_scp_t, bind, "0.0.0.0", "IPv4 address to listen on"),
    CMN_CONF_OPT_INT(edge_conf_scp_t, port, 11112, 0, 65535, "DICOM TCP port (0 = any free port)"),
    CMN_CONF_OPT_INT(edge_conf_scp_t, max_associations, 16, 1, 200,
                     "concurrent associations; more are rejected (local limit exceeded)"),
    CMN_CONF_OPT_INT(edge_conf_scp_t, dimse_timeout_s, 120, 5, 3600,
                     "seconds an association may stay silent before it is closed"),
    CMN_CONF_OPT_STR(edge_conf_scp_t, allowed_calling_aes, "",
                     "calling AE titles allowed to associate, comma-separated (empty = any);"
                     " others are rejected: calling AE title not recognized"),
    CMN_CONF_OPT_STR(edge_conf_scp_t, allowed_peers, "",
                     "peer addresses allowed to associate, comma-separated CIDR blocks such as"
                     " 10.1.0.0/16,192.168.5.7 (empty = any); others are rejected"),
};
const size_t edge__scp_nopts = CMN_ARRAY_SIZE(edge__scp_opts);

int edge__scp_conf_check(const edge_conf_scp_t *c, char *err, size_t errlen)
{
    size_t n = c->ae_title ? strlen(c->ae_title) : 0;
    struct in_addr a;

    if (n == 0 || n > 16) {
        snprintf(err, errlen, "scp.ae_title: must be 1 to 16 characters");
        return CMN_ECONFIG;
    }
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)c->ae_title[i];
        if (ch < 0x20 || ch > 0x7e || ch == '\\') {
            snprintf(err, errlen, "scp.ae_title: only printable ASCII without '\\' is allowed");
            return CMN_ECONFIG;
        }
    }
    if (c->ae_title[0] == ' ' || c->ae_title[n - 1] == ' ') {
        snprintf(err, errlen, "scp.ae_title: no leading or trailing spaces");
        return CMN_ECONFIG;
    }
    if (!c->bind || inet_pton(AF_INET, c->bind, &a) != 1) {
        snprintf(err, errlen, "scp.bind: '%s' is not an IPv4 address", c->bind ? c->bind : "");
        return CMN_ECONFIG;
    }
    if (c->allowed_calling_aes) {
        const char *s = c->allowed_calling_aes;
        while (*s) {
            size_t len = strcspn(s, ",");
            const char *p = s, *q = s + len;
            while (p < q && *p == ' ')
                p++;
            while (q > p && q[-1] == ' ')
                q--;
            if (q - p > 16) {
                snprintf(err, errlen, "scp.allowed_calling_aes: '%.*s' is longer than 16"
                         " characters", (int)(q - p > 40 ? 40 : q - p), p);
                return CMN_ECONFIG;
            }
            for (const char *x = p; x < q; x++) {
                if ((unsigned char)*x < 0x20 || (unsigned char)*x > 0x7e || *x == '\\') {
                    snprintf(err, errlen, "scp.allowed_calling_aes: only printable ASCII"
                             " without '\\'");
                    return CMN_ECONFIG;
                }
            }
            s += len + (s[len] == ',');
        }
    }
    char cerr[160];
    if (proto_cidr_list_check(c->allowed_peers, cerr, sizeof(cerr)) < 0) {
        snprintf(err, errlen, "scp.allowed_peers: %s", cerr);
        return CMN_ECONFIG;
    }
    return 0;
}

/* ------------------------------------------------------------ store */

/* Rate limit for the "disk full" warning: a modality sends hundreds of
 * instances per minute, one line per 10 s is enough. */
static _Atomic long long last_space_warn;

int edge__store_begin(void *ud, char *path, size_t len)
{
    edge_store_ctx_t *ctx = ud;

    if (!edge_spool_has_space(ctx->spool)) {
        edge_spool_count_refused(ctx->spool, EDGE_STATUS_OUT_OF_RESOURCES);
        long long now = (long long)(edge__now_ms() / 1000);
        long long prev = atomic_load(&last_space_warn);
        if (now - prev >= 10 && atomic_compare_exchange_strong(&last_space_warn, &prev, now))
            CMN_LOG_W("scp", "spool below spool.min_free_mb: refusing instances with A700");
        return EDGE_STATUS_OUT_OF_RESOURCES;
    }
    if (edge_spool_tmp_path(ctx->spool, path, len) < 0)
        return EDGE_STATUS_OUT_OF_RESOURCES;
    return 0;
}

void *edge__stream_open(void *ud)
{
    edge_store_ctx_t *ctx = ud;
    return edge_spool_stream_get(ctx->spool);
}

int edge__stream_begin(void *h)
{
    return edge_spool_stream_begin(h);
}

int edge__stream_data(void *h, const void *buf, size_t len)
{
    return edge_spool_stream_write(h, buf, len);
}

int edge__stream_spill(void *h, int fd)
{
    return edge_spool_stream_spill(h, fd);
}

void edge__stream_close(void *h)
{
    edge_spool_stream_put(h);
}

/* Part 10: 128-byte preamble + "DICM" precede the meta header. */
#define PART10_PREFIX 132

/*
 * What the received file is: the structural walk over the file mapped from
 * the page cache (cmn_dicom_scan, a few microseconds), and DCMTK's parse
 * only when the walk has no verdict (deflated, malformed, truncated: it
 * decides). 0 or CMN_EDICOM with err set.
 */
static int identify(const char *path, uint64_t size, edge_spool_stream_t *kept,
                    cmn_dicom_ids_t *ids, char *err, size_t errlen)
{
    const void *data;
    size_t len;
    int fd, rc = -ENOTSUP;

    if (kept && edge_spool_stream_kept(kept, &data, &len)) {
        /* In memory: the walk, else the file DCMTK needs, written now. */
        if (cmn_dicom_scan(data, len, ids, err, errlen) == 0)
            return 0;
        fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0640);
        rc = fd < 0 ? -errno : edge_spool_stream_spill(kept, fd);
        if (fd >= 0 && close(fd) < 0 && rc == 0)
            rc = -errno;
        if (rc < 0) {
            snprintf(err, errlen, "cannot write the received file: %s", cmn_strerror(rc));
            return rc;
        }
        rc = -ENOTSUP;
    }
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd >= 0 && size > 0) {
        void *m = mmap(NULL, (size_t)size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (m != MAP_FAILED) {
            rc = cmn_dicom_scan(m, (size_t)size, ids, err, errlen);
            munmap(m, (size_t)size);
        }
    }
    if (fd >= 0)
        close(fd);
    if (rc == 0)
        return 0;
    cmn_dicom_info_t *info = cmn_xmalloc(sizeof(*info));
    rc = cmn_dicom_read_info(path, info, err, errlen);
    if (rc == 0) {
        memcpy(ids->sop_class_uid, info->sop_class_uid, sizeof(ids->sop_class_uid));
        memcpy(ids->sop_uid, info->sop_uid, sizeof(ids->sop_uid));
        memcpy(ids->study_uid, info->study_uid, sizeof(ids->study_uid));
        memcpy(ids->series_uid, info->series_uid, sizeof(ids->series_uid));
        memcpy(ids->transfer_syntax, info->transfer_syntax, sizeof(ids->transfer_syntax));
    }
    free(info);
    return rc;
}

static unsigned store_end(edge_store_ctx_t *ctx, const edge_scp_store_t *st);

unsigned edge__store_end(void *ud, const edge_scp_store_t *st)
{
    edge_store_ctx_t *ctx = ud;
    unsigned status = store_end(ctx, st);

    if (status != EDGE_STATUS_SUCCESS)
        edge_spool_count_refused(ctx->spool, status);   /* for the status page */
    return status;
}

static unsigned store_end(edge_store_ctx_t *ctx, const edge_scp_store_t *st)
{
    cmn_dicom_ids_t ids;
    char err[256];
    char sum[CMN_XXH128_HEX_LEN + 1];
    struct stat sb;
    int64_t id = 0;
    unsigned status;
    int rc;
    const char *req_sop = st->sop_instance_uid ? st->sop_instance_uid : "";

    if (st->receive_failed) {
        unlink(st->tmp_path);
        if (st->out_of_resources) {
            CMN_LOG_W("scp", "write of received instance failed sop=%s: A700", req_sop);
            return EDGE_STATUS_OUT_OF_RESOURCES;
        }
        CMN_LOG_W("scp", "receive failed sop=%s calling_ae=%s peer=%s", req_sop,
                  st->calling_ae, st->peer_ip);
        return EDGE_STATUS_CANNOT_UNDERSTAND;
    }

    /* A file shorter than what arrived means a write was lost (buffered
     * data dropped at close on a full disk). */
    if (st->xxh128) {
        sb.st_size = (off_t)st->file_bytes;
    } else if (stat(st->tmp_path, &sb) < 0) {
        sb.st_size = 0;
    }
    if ((uint64_t)sb.st_size < st->dataset_bytes + PART10_PREFIX) {
        CMN_LOG_W("scp", "received file incomplete sop=%s (disk full?): A700", req_sop);
        status = EDGE_STATUS_OUT_OF_RESOURCES;
        goto out_unlink;
    }

    rc = identify(st->tmp_path, (uint64_t)sb.st_size, st->kept ? st->stream : NULL, &ids, err,
                  sizeof(err));
    if (rc < 0) {
        CMN_LOG_W("scp", "invalid instance sop=%s calling_ae=%s: %s: C000", req_sop,
                  st->calling_ae, err);
        status = EDGE_STATUS_CANNOT_UNDERSTAND;
        goto out_unlink;
    }
    if (!proto_uid_valid(ids.sop_uid) || !proto_uid_valid(ids.study_uid) ||
        !proto_uid_valid(ids.series_uid)) {
        CMN_LOG_W("scp", "invalid UID in instance sop=%s: C000", req_sop);
        status = EDGE_STATUS_CANNOT_UNDERSTAND;
        goto out_unlink;
    }
    if (strcmp(ids.sop_uid, req_sop) != 0 ||
        (st->sop_class_uid && ids.sop_class_uid[0] &&
         strcmp(ids.sop_class_uid, st->sop_class_uid) != 0)) {
        CMN_LOG_W("scp", "data set does not match request sop=%s dataset_sop=%s: A900", req_sop,
                  ids.sop_uid);
        status = EDGE_STATUS_DATASET_MISMATCH;
        goto out_unlink;
    }

    edge_spool_uids_t uids = {
        .sop_uid = ids.sop_uid,
        .study_uid = ids.study_uid,
        .series_uid = ids.series_uid,
        .calling_ae = st->calling_ae,
    };
    if (st->xxh128) {
        snprintf(sum, sizeof(sum), "%s", st->xxh128);
        rc = edge_spool_add_received(ctx->spool, st->tmp_path, &uids, sum, st->file_bytes,
                                     st->stream, &id);
    } else {
        rc = edge_spool_add(ctx->spool, st->tmp_path, &uids, &id, sum);
    }
    if (rc < 0) {
        CMN_LOG_W("scp", "spooling failed sop=%s: %s: A700", req_sop, cmn_strerror(rc));
        return EDGE_STATUS_OUT_OF_RESOURCES;   /* edge_spool_add removed the temp file */
    }
    CMN_LOG_I("scp", "stored sop=%s series=%s xxh128=%s size=%lld calling_ae=%s id=%lld",
              ids.sop_uid, ids.series_uid, sum, (long long)sb.st_size, st->calling_ae,
              (long long)id);
    if (ctx->stored)
        ctx->stored(ctx->stored_ud);
    return EDGE_STATUS_SUCCESS;

out_unlink:
    unlink(st->tmp_path);
    return status;
}
