/*
 * stow.c - STOW-RS (PS3.18 10.5): a PACS or a viewer pushes instances.
 *
 *   POST /dicomweb/studies            multipart/related; type="application/dicom"
 *   POST /dicomweb/studies/{study}    same; every instance must belong to {study}
 *
 * The request body (up to CLOUD_STOW_MAX_BODY; large bodies arrive in a
 * temporary file, req->body_file, which is mapped) is split at the boundary.
 * Each part is written to a temporary file on the staging file system,
 * fsync'd, hashed, parsed (cmn_dicom_read_info, cmn_dicom_to_json) and then
 * archived and indexed by cloud_store_place() - the same placement rules as
 * the edge ingest: new -> stored; same SOP Instance UID and bytes -> stored
 * once (reported as success); same UID, other bytes -> kept aside as a
 * conflict (reported as a failure, reason 0x0111). One index transaction per
 * instance: a failure never loses the instances before it.
 *
 * The answer is DICOM JSON (application/dicom+json): RetrieveURL of the
 * study when there is one, ReferencedSOPSequence (stored) and
 * FailedSOPSequence (with FailureReason). Status 200 when everything was
 * stored, 202 when some failed, 409 when all failed, 400 for a malformed or
 * empty multipart body, 415 for another media type, 403 for a role other
 * than doctor/admin. Each study touched gets an audit row "stow".
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "cmn/crypto.h"
#include "cmn/errors.h"
#include "cmn/log.h"
#include "proto/proto.h"
#include "internal.h"

/* Failure reasons (PS3.18 Table 10.5.3-2 / PS3.4 status codes). */
#define FAIL_PROCESSING 0x0110       /* processing failure (storage, index) */
#define FAIL_DUPLICATE 0x0111        /* same SOP Instance UID with other content */
#define FAIL_MISMATCH 0xA900         /* not of the target study */
#define FAIL_UNDERSTAND 0xC000       /* not a readable DICOM instance / not application/dicom */
#define FAIL_NO_SPACE 0xA700         /* out of resources */

#define MAX_STUDIES 64

/* ------------------------------------------------------------- placement */

int cloud_store_place(cmn_sql_t *db, const char *tmp, const cmn_dicom_info_t *info,
                      const char *sha256, uint64_t size, const char *json, const char *source,
                      cloud_store_result_t *result)
{
    char dst[4096];
    cloud_instance_ref_t have;
    int rc;

    rc = cloud_index_find_instance(db, info->sop_uid, &have);
    if (rc == 0 && strcmp(have.sha256, sha256) == 0) {
        *result = CLOUD_STORE_DUPLICATE;
        unlink(tmp);
        return 0;
    }
    if (rc == 0) {
        if ((rc = cloud_archive_conflict_path(info->sop_uid, sha256, dst, sizeof(dst))) < 0 ||
            (rc = cloud_archive_place_sha(tmp, dst, sha256)) < 0 ||
            (rc = cloud_index_add_conflict(db, info->sop_uid, sha256, dst, source)) < 0)
            return rc;
        CMN_LOG_W("store", "conflict sop=%s sha=%.16s kept=%.16s source=%s", info->sop_uid,
                  sha256, have.sha256, source);
        *result = CLOUD_STORE_CONFLICT;
        return 0;
    }
    if (rc != CMN_ENOTFOUND)
        return rc;
    if ((rc = cloud_archive_path(info->study_uid, info->series_uid, info->sop_uid, dst,
                                 sizeof(dst))) < 0 ||
        (rc = cloud_archive_place_sha(tmp, dst, sha256)) < 0 ||
        (rc = cloud_index_add_instance(db, info, dst, size, sha256, json)) < 0 ||
        (rc = cloud_index_set_source(db, info->sop_uid, source)) < 0)
        return rc;
    *result = CLOUD_STORE_STORED;
    return 0;
}

/* ------------------------------------------------------------- multipart */

/* The boundary parameter of a multipart Content-Type; false if absent. */
static bool get_param(const char *ctype, const char *name, char *out, size_t outlen)
{
    size_t nl = strlen(name);
    const char *p = ctype;

    while ((p = strchr(p, ';')) != NULL) {
        p++;
        while (*p == ' ' || *p == '\t')
            p++;
        if (strncasecmp(p, name, nl) == 0 && p[nl] == '=') {
            const char *v = p + nl + 1;
            size_t n;
            if (*v == '"') {
                v++;
                n = strcspn(v, "\"");
            } else {
                n = strcspn(v, "; \t");
            }
            if (n == 0 || n >= outlen)
                return false;
            memcpy(out, v, n);
            out[n] = '\0';
            return true;
        }
    }
    return false;
}

typedef struct {
    const uint8_t *data;
    size_t len;
    char ctype[128];             /* the part's Content-Type ("" when absent) */
} part_t;

/*
 * Next part of body after *pos (which starts at 0). 1 and *part set, 0 at the
 * closing delimiter, CMN_EPARSE when the framing is broken.
 */
static int next_part(const uint8_t *body, size_t len, const char *boundary, size_t *pos,
                     part_t *part)
{
    char delim[128];
    size_t dl = (size_t)snprintf(delim, sizeof(delim), "--%s", boundary);
    const uint8_t *p, *end = body + len, *hend, *next;

    p = body + *pos;
    if (*pos == 0) {   /* preamble, then the first delimiter */
        p = memmem(body, len, delim, dl);
        if (!p)
            return CMN_EPARSE;
    } else if ((size_t)(end - p) < dl || memcmp(p, delim, dl) != 0) {
        return CMN_EPARSE;
    }
    p += dl;
    if (end - p >= 2 && p[0] == '-' && p[1] == '-')
        return 0;
    while (p < end && (*p == ' ' || *p == '\t'))
        p++;
    if (end - p < 2 || p[0] != '\r' || p[1] != '\n')
        return CMN_EPARSE;
    p += 2;
    hend = memmem(p, (size_t)(end - p), "\r\n\r\n", 4);
    if (!hend) {
        /* a part without headers starts right after the delimiter's CRLF */
        if (end - p >= 2 && p[0] == '\r' && p[1] == '\n')
            hend = p - 2;
        else
            return CMN_EPARSE;
    }
    part->ctype[0] = '\0';
    for (const uint8_t *l = p; l < hend;) {
        const uint8_t *le = memmem(l, (size_t)(hend - l), "\r\n", 2);
        size_t ln = le ? (size_t)(le - l) : (size_t)(hend - l);
        if (ln > 13 && strncasecmp((const char *)l, "Content-Type:", 13) == 0) {
            const uint8_t *v = l + 13;
            while (v < l + ln && (*v == ' ' || *v == '\t'))
                v++;
            snprintf(part->ctype, sizeof(part->ctype), "%.*s", (int)(l + ln - v),
                     (const char *)v);
        }
        l += ln + 2;
    }
    p = hend + 4;
    /* The part ends at CRLF + delimiter. */
    {
        char cd[132];
        size_t cl = (size_t)snprintf(cd, sizeof(cd), "\r\n%s", delim);
        next = memmem(p, (size_t)(end - p), cd, cl);
        if (!next)
            return CMN_EPARSE;
        part->data = p;
        part->len = (size_t)(next - p);
        *pos = (size_t)(next + 2 - body);
    }
    return 1;
}

/* ------------------------------------------------------------- response */

static json_t *ds_str(const char *vr, const char *v)
{
    json_t *a = json_pack("{s:s}", "vr", vr);
    if (v && *v)
        json_object_set_new(a, "Value", json_pack("[s]", v));
    return a;
}

static void add_item(json_t *seq, const char *cls, const char *sop, const char *url, int reason)
{
    json_t *it = json_object();

    json_object_set_new(it, "00081150", ds_str("UI", cls));
    json_object_set_new(it, "00081155", ds_str("UI", sop));
    if (url)
        json_object_set_new(it, "00081190", ds_str("UR", url));
    if (reason >= 0)
        json_object_set_new(it, "00081197", json_pack("{s:s,s:[i]}", "vr", "US", "Value", reason));
    json_array_append_new(seq, it);
}

/* --------------------------------------------------------------- storage */

/* Writes p to a new file at path and fsyncs it. 0 or -errno. */
static int write_tmp(const char *path, const uint8_t *p, size_t n)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0640);
    int rc = 0;

    if (fd < 0)
        return -errno;
    while (n > 0) {
        ssize_t w = write(fd, p, n > (1u << 30) ? (1u << 30) : n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            rc = -errno;
            break;
        }
        p += w;
        n -= (size_t)w;
    }
    if (rc == 0 && fsync(fd) < 0)
        rc = -errno;
    if (close(fd) < 0 && rc == 0)
        rc = -errno;
    if (rc < 0)
        unlink(path);
    return rc;
}

typedef struct {
    cmn_sql_t *db;
    const char *target_study;    /* NULL for POST /studies */
    const char *base;            /* Retrieve URL base */
    const char *source;          /* "stow:<user>" */
    json_t *ok, *failed;         /* sequences */
    char studies[MAX_STUDIES][65];
    int nstudies;
    int nok, nfail;
} stow_t;

static void note_study(stow_t *s, const char *uid)
{
    for (int i = 0; i < s->nstudies; i++)
        if (strcmp(s->studies[i], uid) == 0)
            return;
    if (s->nstudies < MAX_STUDIES)
        snprintf(s->studies[s->nstudies++], 65, "%s", uid);
}

static void fail(stow_t *s, const char *cls, const char *sop, int reason, const char *why)
{
    add_item(s->failed, cls, sop, NULL, reason);
    s->nfail++;
    CMN_LOG_W("stow", "instance failed sop=%s reason=0x%04X: %s", sop && *sop ? sop : "-",
              (unsigned)reason, why);
}

static void store_one(stow_t *s, const part_t *part)
{
    char tmp[4200], err[256], prefix[512], url[1024];
    uint8_t digest[CMN_SHA256_LEN], rnd[8];
    char sha[65], rhex[17];
    cmn_dicom_info_t *info = NULL;
    cloud_store_result_t result;
    char *json = NULL;
    size_t jsonlen;
    int rc;

    if (part->ctype[0] && strncasecmp(part->ctype, "application/dicom", 17) != 0) {
        fail(s, "", "", FAIL_UNDERSTAND, "part is not application/dicom");
        return;
    }
    if (cmn_random(rnd, sizeof(rnd)) < 0) {
        fail(s, "", "", FAIL_PROCESSING, "no randomness");
        return;
    }
    cmn_hex(rnd, sizeof(rnd), rhex);
    snprintf(tmp, sizeof(tmp), "%s/.tmp/stow-%s.dcm", cloud_conf->ingest.staging_dir, rhex);
    rc = write_tmp(tmp, part->data, part->len);
    if (rc < 0) {
        fail(s, "", "", rc == -ENOSPC ? FAIL_NO_SPACE : FAIL_PROCESSING, cmn_strerror(rc));
        return;
    }
    cmn_sha256(part->data, part->len, digest);
    cmn_hex(digest, sizeof(digest), sha);

    info = cmn_xmalloc(sizeof(*info));
    if (cmn_dicom_read_info(tmp, info, err, sizeof(err)) < 0) {
        fail(s, "", "", FAIL_UNDERSTAND, err);
        goto out_unlink;
    }
    if (!info->sop_class_uid[0] || !proto_uid_valid(info->sop_uid) ||
        !proto_uid_valid(info->study_uid) || !proto_uid_valid(info->series_uid)) {
        fail(s, info->sop_class_uid, info->sop_uid, FAIL_UNDERSTAND, "missing or invalid UIDs");
        goto out_unlink;
    }
    if (s->target_study && strcmp(s->target_study, info->study_uid) != 0) {
        fail(s, info->sop_class_uid, info->sop_uid, FAIL_MISMATCH, "not of the target study");
        goto out_unlink;
    }
    snprintf(prefix, sizeof(prefix), "/dicomweb/studies/%s/series/%s/instances/%s/bulk",
             info->study_uid, info->series_uid, info->sop_uid);
    if (cmn_dicom_to_json(tmp, prefix, &json, &jsonlen, err, sizeof(err)) < 0) {
        fail(s, info->sop_class_uid, info->sop_uid, FAIL_UNDERSTAND, err);
        goto out_unlink;
    }
    if (cloud_index_begin(s->db) < 0) {
        fail(s, info->sop_class_uid, info->sop_uid, FAIL_PROCESSING, "index busy");
        goto out_unlink;
    }
    rc = cloud_store_place(s->db, tmp, info, sha, part->len, json, s->source, &result);
    if (rc < 0 || cloud_index_commit(s->db) < 0) {
        cloud_index_rollback(s->db);
        fail(s, info->sop_class_uid, info->sop_uid,
             rc == -ENOSPC ? FAIL_NO_SPACE : FAIL_PROCESSING, "archive/index failed");
        goto out_unlink;
    }
    note_study(s, info->study_uid);
    if (result == CLOUD_STORE_CONFLICT) {
        fail(s, info->sop_class_uid, info->sop_uid, FAIL_DUPLICATE,
             "SOP Instance UID exists with other content (kept aside)");
        goto out;
    }
    snprintf(url, sizeof(url), "%s/studies/%s/series/%s/instances/%s", s->base,
             info->study_uid, info->series_uid, info->sop_uid);
    add_item(s->ok, info->sop_class_uid, info->sop_uid, url, -1);
    s->nok++;
    CMN_LOG_I("stow", "sop=%s result=%s size=%zu source=%s", info->sop_uid,
              result == CLOUD_STORE_STORED ? "stored" : "duplicate", part->len, s->source);
    goto out;

out_unlink:
    unlink(tmp);
out:
    free(json);
    free(info);
}

/* ----------------------------------------------------------------- route */

void cloud_stow_handle(const cmn_http_req_t *req, cmn_http_resp_t *resp)
{
    const char *ctype = cmn_http_req_header(req, "Content-Type");
    char boundary[100], type[100], base[400], source[100], study[80] = "", url[600];
    const uint8_t *body = NULL;
    void *map = NULL;
    size_t maplen = 0, pos = 0;
    cloud_user_t user;
    stow_t s;
    json_t *out;
    part_t part;
    cmn_sql_t *db;
    int rc, status;

    /* Anything but POST /dicomweb/studies[/{uid}] belongs to the read-only handler. */
    if (strcmp(req->method, "POST") != 0 || strncmp(req->path, "/dicomweb/studies", 17) != 0 ||
        (req->path[17] && req->path[17] != '/')) {
        cloud_dicomweb_handle(req, resp);
        return;
    }
    if (req->path[17] == '/' && req->path[18]) {
        snprintf(study, sizeof(study), "%s", req->path + 18);
        study[strcspn(study, "/")] = '\0';
        if (!proto_uid_valid(study) || strchr(req->path + 18, '/')) {
            cloud_resp_error(resp, 404, "not_found", "no such resource");
            return;
        }
    }
    db = cloud_index_get();
    if (!db) {
        cloud_resp_error(resp, 503, "unavailable", "index unavailable");
        return;
    }
    if (!cloud_auth_require(db, req, resp, &user))
        goto out;
    if (strcmp(user.role, "doctor") != 0 && strcmp(user.role, "admin") != 0) {
        cloud_resp_error(resp, 403, "forbidden", "storing needs the doctor or admin role");
        goto out;
    }
    if (!ctype || strncasecmp(ctype, "multipart/related", 17) != 0) {
        cloud_resp_error(resp, 415, "unsupported_media_type",
                         "use multipart/related; type=\"application/dicom\"");
        goto out;
    }
    if (get_param(ctype, "type", type, sizeof(type)) && strcasecmp(type, "application/dicom") != 0) {
        cloud_resp_error(resp, 415, "unsupported_media_type",
                         "only application/dicom parts are accepted (no JSON/XML + bulk data)");
        goto out;
    }
    if (!get_param(ctype, "boundary", boundary, sizeof(boundary)) || strlen(boundary) > 70) {
        cloud_resp_error(resp, 400, "bad_request", "multipart boundary missing or too long");
        goto out;
    }
    if (req->body_file) {
        int fd = open(req->body_file, O_RDONLY | O_CLOEXEC);
        struct stat sb;
        if (fd < 0 || fstat(fd, &sb) < 0) {
            if (fd >= 0)
                close(fd);
            cloud_resp_error(resp, 500, "internal", "request body unavailable");
            goto out;
        }
        maplen = (size_t)sb.st_size;
        map = maplen ? mmap(NULL, maplen, PROT_READ, MAP_PRIVATE, fd, 0) : NULL;
        close(fd);
        if (maplen && map == MAP_FAILED) {
            map = NULL;
            cloud_resp_error(resp, 500, "internal", "request body unavailable");
            goto out;
        }
        body = map;
    } else {
        body = (const uint8_t *)req->body;
        maplen = 0;
    }
    size_t blen = req->body_file ? maplen : req->body_len;

    cloud__dicomweb_base_url(req, base, sizeof(base));
    snprintf(source, sizeof(source), "stow:%s", user.username);
    memset(&s, 0, sizeof(s));
    s.db = db;
    s.target_study = study[0] ? study : NULL;
    s.base = base;
    s.source = source;
    s.ok = json_array();
    s.failed = json_array();
    while (body && (rc = next_part(body, blen, boundary, &pos, &part)) == 1)
        store_one(&s, &part);
    if (!body || rc < 0 || s.nok + s.nfail == 0) {
        json_decref(s.ok);
        json_decref(s.failed);
        cloud_resp_error(resp, 400, "bad_request",
                         !body || s.nok + s.nfail == 0 ? "no instances in the request"
                                                       : "malformed multipart body");
        /* Instances before a broken delimiter are stored: audit them too. */
        for (int i = 0; i < s.nstudies; i++)
            cloud_index_audit(db, user.username, "stow", s.studies[i], req->peer);
        goto out;
    }
    out = json_object();
    if (s.target_study || s.nstudies == 1) {
        snprintf(url, sizeof(url), "%s/studies/%s", base,
                 s.target_study ? s.target_study : s.studies[0]);
        json_object_set_new(out, "00081190", ds_str("UR", url));
    }
    if (s.nok)
        json_object_set_new(out, "00081199", json_pack("{s:s,s:o}", "vr", "SQ", "Value", s.ok));
    else
        json_decref(s.ok);
    if (s.nfail)
        json_object_set_new(out, "00081198",
                            json_pack("{s:s,s:o}", "vr", "SQ", "Value", s.failed));
    else
        json_decref(s.failed);
    status = s.nfail == 0 ? 200 : s.nok ? 202 : 409;
    for (int i = 0; i < s.nstudies; i++)
        cloud_index_audit(db, user.username, "stow", s.studies[i], req->peer);
    CMN_LOG_I("stow", "user=%s stored=%d failed=%d studies=%d", user.username, s.nok, s.nfail,
              s.nstudies);
    cmn_http_resp_header(resp, "Cache-Control", "no-store");
    cloud_resp_json_take(resp, status, "application/dicom+json",
                         json_dumps(out, JSON_COMPACT | JSON_SORT_KEYS));
    json_decref(out);
out:
    if (map)
        munmap(map, maplen);
    cloud_index_put(db);
}
