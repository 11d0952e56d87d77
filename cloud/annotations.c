/*
 * annotations.c - the viewer's measurements and annotations, per user and
 * study (issue 5):
 *
 *   GET    /api/v1/studies/{studyUID}/annotations  -> {"v":1,"annotations":[...]}
 *                                                     (empty list when none)
 *   PUT    /api/v1/studies/{studyUID}/annotations  body {"v":1,"annotations":[...]}
 *                                                  -> {"v":1,"saved":N}
 *   DELETE /api/v1/studies/{studyUID}/annotations  -> 204
 *
 * The annotation objects are the viewer's (Cornerstone3D's) JSON and opaque
 * here; only the envelope is checked. Each user sees and changes only their
 * own document (the session decides who). The study must be in the index.
 * Documents are capped at ANNOTATIONS_MAX bytes (the route's body limit is
 * a little larger so the handler can answer 413 with a JSON error). Every
 * access is audited.
 */
#include <string.h>

#include <jansson.h>

#include "cmn/sql.h"
#include "cmn/errors.h"
#include "cmn/log.h"
#include "internal.h"

#define PREFIX "/api/v1/studies/"
#define SUFFIX "/annotations"
#define UID_MAX 64
#define CLOUD_ANNOTATIONS_MAX (1u << 20)

static bool valid_uid(const char *s, size_t n)
{
    if (n == 0 || n > UID_MAX || s[0] == '.' || s[n - 1] == '.')
        return false;
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || s[i] == '.'))
            return false;
    return true;
}

/* Extracts {studyUID} from the path; false when the path is not ours. */
static bool parse_path(const char *path, char uid[UID_MAX + 1])
{
    size_t plen = strlen(PREFIX), n;
    const char *p, *slash;

    if (strncmp(path, PREFIX, plen) != 0)
        return false;
    p = path + plen;
    slash = strchr(p, '/');
    if (!slash || strcmp(slash, SUFFIX) != 0)
        return false;
    n = (size_t)(slash - p);
    if (!valid_uid(p, n))
        return false;
    memcpy(uid, p, n);
    uid[n] = '\0';
    return true;
}

static int study_exists(cmn_sql_t *db, const char *uid)
{
    cmn_sql_stmt_t *st;
    int rc;

    if (cmn_sql_prepare(db, "SELECT 1 FROM studies WHERE study_uid = ?", &st) < 0)
        return CMN_EDB;
    cmn_sql_bind_text(st, 1, uid);
    rc = cmn_sql_step(st);
    cmn_sql_finalize(st);
    if (rc == CMN_SQL_ROW)
        return 1;
    return rc == CMN_SQL_DONE ? 0 : CMN_EDB;
}

static void handle_get(cmn_sql_t *db, const cloud_user_t *u, const char *uid,
                       const cmn_http_req_t *req, cmn_http_resp_t *resp)
{
    cmn_sql_stmt_t *st;
    char *text = NULL;
    int rc;

    if (cmn_sql_prepare(db, "SELECT doc FROM annotations WHERE username = ? AND study_uid = ?",
                       &st) < 0) {
        cloud_resp_error(resp, 503, "unavailable", "index unavailable");
        return;
    }
    cmn_sql_bind_text(st, 1, u->username);
    cmn_sql_bind_text(st, 2, uid);
    rc = cmn_sql_step(st);
    if (rc == CMN_SQL_ROW)
        text = cmn_xstrdup(cmn_sql_column_text(st, 0));
    else if (rc == CMN_SQL_DONE)
        text = cmn_xstrdup("{\"v\":1,\"annotations\":[]}");
    cmn_sql_finalize(st);
    if (!text) {
        cloud_resp_error(resp, 503, "unavailable", "index unavailable");
        return;
    }
    cloud_index_audit_commit(db, u->username, "annotations_read", uid, req->peer);
    cmn_http_resp_header(resp, "Cache-Control", "no-store");
    cloud_resp_json_take(resp, 200, "application/json", text);
}

static void handle_put(cmn_sql_t *db, const cloud_user_t *u, const char *uid,
                       const cmn_http_req_t *req, cmn_http_resp_t *resp)
{
    json_error_t jerr;
    json_t *body, *list, *v, *doc;
    cmn_sql_stmt_t *st;
    char *text, out[64];
    size_t n;
    int rc;

    if (req->body_len > CLOUD_ANNOTATIONS_MAX || !req->body) {
        cloud_resp_error(resp, 413, "too_large", "annotations are limited to 1 MiB per study");
        return;
    }
    body = json_loadb(req->body, req->body_len, JSON_REJECT_DUPLICATES, &jerr);
    list = body ? json_object_get(body, "annotations") : NULL;
    v = body ? json_object_get(body, "v") : NULL;
    if (!json_is_object(body) || !json_is_array(list) || (v && json_integer_value(v) != 1)) {
        json_decref(body);
        cloud_resp_error(resp, 400, "bad_request", "expected {\"v\":1,\"annotations\":[...]}");
        return;
    }
    n = json_array_size(list);
    for (size_t i = 0; i < n; i++) {
        if (!json_is_object(json_array_get(list, i))) {
            json_decref(body);
            cloud_resp_error(resp, 400, "bad_request", "each annotation is a JSON object");
            return;
        }
    }
    doc = json_pack("{s:i, s:O}", "v", 1, "annotations", list);
    text = doc ? json_dumps(doc, JSON_COMPACT) : NULL;
    json_decref(doc);
    json_decref(body);
    if (!text) {
        cloud_resp_error(resp, 500, "internal", "out of memory");
        return;
    }
    if (cmn_sql_prepare(db,
                       "INSERT INTO annotations(username, study_uid, doc, updated) VALUES(?,?,?,?)"
                       " ON CONFLICT(username, study_uid) DO UPDATE SET doc = excluded.doc,"
                       " updated = excluded.updated",
                       &st) < 0) {
        free(text);
        cloud_resp_error(resp, 503, "unavailable", "index unavailable");
        return;
    }
    cmn_sql_bind_text(st, 1, u->username);
    cmn_sql_bind_text(st, 2, uid);
    cmn_sql_bind_text(st, 3, text);
    cmn_sql_bind_int64(st, 4, cloud_now());
    rc = cmn_sql_step(st);
    cmn_sql_finalize(st);
    free(text);
    if (rc != CMN_SQL_DONE) {
        CMN_LOG_E("annotations", "save: %s", cmn_sql_errmsg(db));
        cloud_resp_error(resp, 503, "unavailable", "index unavailable");
        return;
    }
    cloud_index_audit(db, u->username, "annotations_write", uid, req->peer);
    snprintf(out, sizeof(out), "{\"v\":1,\"saved\":%zu}", n);
    cmn_http_resp_header(resp, "Cache-Control", "no-store");
    cloud_resp_json_take(resp, 200, "application/json", cmn_xstrdup(out));
}

static void handle_delete(cmn_sql_t *db, const cloud_user_t *u, const char *uid,
                          const cmn_http_req_t *req, cmn_http_resp_t *resp)
{
    cmn_sql_stmt_t *st;
    int rc;

    if (cmn_sql_prepare(db, "DELETE FROM annotations WHERE username = ? AND study_uid = ?",
                       &st) < 0) {
        cloud_resp_error(resp, 503, "unavailable", "index unavailable");
        return;
    }
    cmn_sql_bind_text(st, 1, u->username);
    cmn_sql_bind_text(st, 2, uid);
    rc = cmn_sql_step(st);
    cmn_sql_finalize(st);
    if (rc != CMN_SQL_DONE) {
        cloud_resp_error(resp, 503, "unavailable", "index unavailable");
        return;
    }
    cloud_index_audit(db, u->username, "annotations_delete", uid, req->peer);
    cmn_http_resp_status(resp, 204);
}

void cloud_annotations_handle(const cmn_http_req_t *req, cmn_http_resp_t *resp)
{
    cmn_sql_t *db = cloud_index_get();
    char uid[UID_MAX + 1];
    cloud_user_t user;
    int ex;

    if (!db) {
        cloud_resp_error(resp, 503, "unavailable", "index unavailable");
        return;
    }
    if (!cloud_auth_require(db, req, resp, &user))
        goto out;
    if (!parse_path(req->path, uid)) {
        cloud_resp_error(resp, 404, "not_found", "no such endpoint");
        goto out;
    }
    ex = study_exists(db, uid);
    if (ex < 0) {
        cloud_resp_error(resp, 503, "unavailable", "index unavailable");
        goto out;
    }
    if (ex == 0) {
        cloud_resp_error(resp, 404, "not_found", "no such study");
        goto out;
    }
    if (strcmp(req->method, "GET") == 0)
        handle_get(db, &user, uid, req, resp);
    else if (strcmp(req->method, "PUT") == 0)
        handle_put(db, &user, uid, req, resp);
    else if (strcmp(req->method, "DELETE") == 0)
        handle_delete(db, &user, uid, req, resp);
    else
        cloud_resp_error(resp, 405, "method_not_allowed", "use GET, PUT or DELETE");
out:
    cloud_index_put(db);
}
