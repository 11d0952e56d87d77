/*
 * manifest.c - the study manifest: how the cloud knows a study is complete.
 *
 *   POST /api/v1/studies/{uid}/manifest   (edge, signed like every upload request)
 *        body proto_manifest_t JSON; replaces the study's previous manifest;
 *        answers proto_manifest_status_t JSON
 *   GET  /api/v1/studies/{uid}/manifest   (user session) the same status; 404 without one
 *
 * Completeness is computed when asked, from the manifest's entries and the
 * instances table: an entry counts as received when an instance with its
 * SOP Instance UID is archived with the same SHA-256; "mismatched" when one
 * is archived with other bytes (a conflict), "missing" when none is. The
 * study is complete when every entry is received.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cmn/sql.h"
#include "cmn/errors.h"
#include "cmn/log.h"
#include "proto/proto.h"
#include "internal.h"
#include "manifest.h"

#define PREFIX "/api/v1/studies/"
#define SUFFIX "/manifest"
#define ANNOTATIONS_MAX_BODY ((size_t)(1 << 20) + (4 << 10))   /* as annotations.c had */

/* {uid} of /api/v1/studies/{uid}/manifest; false when the path is not that. */
static bool parse_path(const char *path, char uid[PROTO_UID_MAX + 1])
{
    size_t pl = strlen(PREFIX), sl = strlen(SUFFIX), n = strlen(path);

    if (n <= pl + sl || strncmp(path, PREFIX, pl) != 0 || strcmp(path + n - sl, SUFFIX) != 0)
        return false;
    n -= pl + sl;
    if (n > PROTO_UID_MAX)
        return false;
    memcpy(uid, path + pl, n);
    uid[n] = '\0';
    return proto_uid_valid(uid);
}

/* 0 with s filled, CMN_ENOTFOUND without a manifest, CMN_EDB. */
static int status_get(cmn_sql_t *db, const char *uid, proto_manifest_status_t *s)
{
    cmn_sql_stmt_t *st;
    int rc;

    memset(s, 0, sizeof(*s));
    snprintf(s->study_uid, sizeof(s->study_uid), "%s", uid);
    if (cmn_sql_prepare(db, "SELECT expected FROM manifests WHERE study_uid = ?", &st) < 0)
        return CMN_EDB;
    cmn_sql_bind_text(st, 1, uid);
    rc = cmn_sql_step(st);
    if (rc == CMN_SQL_ROW)
        s->expected = (uint32_t)cmn_sql_column_int64(st, 0);
    cmn_sql_finalize(st);
    if (rc == CMN_SQL_DONE)
        return CMN_ENOTFOUND;
    if (rc != CMN_SQL_ROW)
        return CMN_EDB;
    if (cmn_sql_prepare(db,
                       "SELECT coalesce(sum(CASE WHEN i.sop_uid IS NOT NULL AND i.sha256 = e.sha256"
                       "   THEN 1 ELSE 0 END), 0),"
                       " coalesce(sum(CASE WHEN i.sop_uid IS NULL THEN 1 ELSE 0 END), 0),"
                       " coalesce(sum(CASE WHEN i.sop_uid IS NOT NULL AND i.sha256 <> e.sha256"
                       "   THEN 1 ELSE 0 END), 0)"
                       " FROM manifest_entries e LEFT JOIN instances i ON i.sop_uid = e.sop_uid"
                       " WHERE e.study_uid = ?", &st) < 0)
        return CMN_EDB;
    cmn_sql_bind_text(st, 1, uid);
    rc = cmn_sql_step(st);
    if (rc == CMN_SQL_ROW) {
        s->received = (uint32_t)cmn_sql_column_int64(st, 0);
        s->missing = (uint32_t)cmn_sql_column_int64(st, 1);
        s->mismatched = (uint32_t)cmn_sql_column_int64(st, 2);
    }
    cmn_sql_finalize(st);
    if (rc != CMN_SQL_ROW)
        return CMN_EDB;
    s->complete = s->expected > 0 && s->received == s->expected;
    return 0;
}

static void status_respond(cmn_sql_t *db, cmn_http_resp_t *resp, const char *uid)
{
    proto_manifest_status_t s;
    int rc = status_get(db, uid, &s);

    if (rc == CMN_ENOTFOUND) {
        cloud_resp_error(resp, 404, "not_found", "no manifest for this study");
        return;
    }
    if (rc < 0) {
        cloud_resp_error(resp, 503, "unavailable", "index unavailable");
        return;
    }
    cloud_resp_json_take(resp, 200, "application/json", proto_manifest_status_encode(&s));
}

/* Replaces the study's manifest in one transaction. 0 or CMN_EDB. */
static int manifest_store(cmn_sql_t *db, const proto_manifest_t *m, const char *edge_id)
{
    cmn_sql_stmt_t *st = NULL;
    int rc = CMN_EDB;

    if (cloud_index_begin(db) < 0)
        return CMN_EDB;
    if (cmn_sql_prepare(db, "DELETE FROM manifest_entries WHERE study_uid = ?", &st) < 0)
        goto out_rollback;
    cmn_sql_bind_text(st, 1, m->study_uid);
    if (cmn_sql_step(st) != CMN_SQL_DONE)
        goto out_rollback;
    cmn_sql_finalize(st);
    if (cmn_sql_prepare(db,
                       "INSERT INTO manifests(study_uid, edge_id, expected, received)"
                       " VALUES(?,?,?,?) ON CONFLICT(study_uid) DO UPDATE SET"
                       " edge_id = excluded.edge_id, expected = excluded.expected,"
                       " received = excluded.received", &st) < 0)
        goto out_rollback;
    cmn_sql_bind_text(st, 1, m->study_uid);
    cmn_sql_bind_text(st, 2, edge_id);
    cmn_sql_bind_int64(st, 3, 0);
    cmn_sql_bind_int64(st, 4, cloud_now());
    if (cmn_sql_step(st) != CMN_SQL_DONE)
        goto out_rollback;
    cmn_sql_finalize(st);
    if (cmn_sql_prepare(db,
                       "INSERT INTO manifest_entries(study_uid, sop_uid, series_uid,"
                       " sha256) VALUES(?,?,?,?) ON CONFLICT(study_uid, sop_uid) DO NOTHING",
                       &st) < 0)
        goto out_rollback;
    for (uint32_t i = 0; i < m->n; i++) {
        cmn_sql_reset(st);
        cmn_sql_bind_text(st, 1, m->study_uid);
        cmn_sql_bind_text(st, 2, m->e[i].sop_uid);
        cmn_sql_bind_text(st, 3, m->e[i].series_uid);
        cmn_sql_bind_text(st, 4, m->e[i].sha256);
        if (cmn_sql_step(st) != CMN_SQL_DONE)
            goto out_rollback;
    }
    cmn_sql_finalize(st);
    st = NULL;
    /* expected = distinct SOP Instance UIDs (a UID listed twice counts once). */
    if (cmn_sql_exec(db, "UPDATE manifests SET expected = (SELECT count(*) FROM manifest_entries e"
                        " WHERE e.study_uid = manifests.study_uid)"
                        " WHERE expected = 0") < 0)
        goto out_rollback;
    if (cloud_index_commit(db) < 0)
        goto out_rollback;
    return 0;

out_rollback:
    CMN_LOG_E("manifest", "store: %s", cmn_sql_errmsg(db));
    cmn_sql_finalize(st);
    cloud_index_rollback(db);
    return rc;
}

static void handle_post(cmn_sql_t *db, const cmn_http_req_t *req, cmn_http_resp_t *resp,
                        const char *uid)
{
    char edge_id[PROTO_EDGE_ID_MAX + 1], err[256];
    proto_manifest_t m;

    if (!cloud__ingest_verify(db, req, resp, edge_id))
        return;
    if (!req->body || proto_manifest_decode(req->body, req->body_len, &m, err, sizeof(err)) < 0) {
        CMN_LOG_W("manifest", "rejected status=400 edge=%s: %s", edge_id,
                  req->body ? err : "no body");
        cloud_resp_error(resp, 400, "bad_request", req->body ? err : "manifest expected");
        return;
    }
    if (strcmp(m.study_uid, uid) != 0) {
        proto_manifest_free(&m);
        cloud_resp_error(resp, 400, "bad_request", "study_uid differs from the path");
        return;
    }
    if (manifest_store(db, &m, edge_id) < 0) {
        proto_manifest_free(&m);
        cloud_resp_error(resp, 503, "unavailable", "index unavailable");
        return;
    }
    proto_manifest_status_t s;
    if (status_get(db, uid, &s) == 0)
        CMN_LOG_I("manifest", "study=%s edge=%s expected=%u received=%u missing=%u"
                  " mismatched=%u complete=%s", uid, edge_id, s.expected, s.received, s.missing,
                  s.mismatched, s.complete ? "yes" : "no");
    proto_manifest_free(&m);
    status_respond(db, resp, uid);
}

void cloud_studies_handle(const cmn_http_req_t *req, cmn_http_resp_t *resp)
{
    char uid[PROTO_UID_MAX + 1];
    cloud_user_t user;
    cmn_sql_t *db;

    if (!parse_path(req->path, uid)) {
        if (req->body_len > ANNOTATIONS_MAX_BODY) {
            cloud_resp_error(resp, 413, "too_large", "request body too large");
            return;
        }
        cloud_annotations_handle(req, resp);
        return;
    }
    db = cloud_index_get();
    if (!db) {
        cloud_resp_error(resp, 503, "unavailable", "index unavailable");
        return;
    }
    if (strcmp(req->method, "POST") == 0) {
        handle_post(db, req, resp, uid);
    } else if (strcmp(req->method, "GET") == 0) {
        if (cloud_auth_require(db, req, resp, &user)) {
            cloud_index_audit(db, user.username, "manifest", uid, req->peer);
            status_respond(db, resp, uid);
        }
    } else {
        cloud_resp_error(resp, 405, "method_not_allowed", "use POST (edge) or GET");
    }
    cloud_index_put(db);
}
