/*
 * ingest.c - the edge upload protocol, version 1 (see proto/proto.h).
 *
 *   POST /api/v1/token                    a short-lived signing token (secret-signed)
 *   POST /api/v1/objects                  declare (or resume) an object
 *   PUT  /api/v1/objects/{id}/chunks/{i}  one chunk, with X-YY-Chunk-SHA256
 *   GET  /api/v1/objects/{id}             which chunks the cloud holds
 *   POST /api/v1/objects/{id}/commit      verify, parse, archive, index
 *   POST /api/v1/studies/{uid}/manifest   the edge's list of a study (manifest.c)
 *
 * An object is one instance (kind "instance") or a bundle of instances of
 * one study (kind "bundle", split by bundle.c). A bundle's commit archives
 * and indexes all its good members in one transaction and answers with a
 * result per member; the answer is stored with the upload, so a repeated
 * commit repeats it.
 *
 * Every request is signed by the edge (proto_verify, timestamp within
 * ingest.max_skew_s): the token request with the edge secret, every other
 * request with the key of a token it names in X-YY-Token (issued for
 * ingest.token_ttl_s, revocable; rows in the tokens table, so every cloud
 * process sees expiry and revocation). A nonce can be used once per edge
 * (the PRIMARY KEY of the nonces table decides, so several cloud processes
 * agree). The edge must be enabled and, if it has an address allow list,
 * the peer address must be inside it (403 otherwise).
 *
 * An upload is a row in the uploads table; its state only moves forward:
 *
 *      declare           all chunks + valid DICOM          re-declare
 *   ----------> open ------------------------------> committed (stored |
 *                 |  ^                                          duplicate |
 *      bad DICOM  v  | re-declare                               conflict)
 *              rejected
 *
 * Chunks live in staging (staging.h): ingest.staging_dir/<object_id>/<i>,
 * or with archive.backend "s3" the bucket (<s3_prefix>staging/<object_id>/<i>),
 * so with S3 any node commits chunks that other nodes received. A chunks
 * row (with the chunk's SHA-256) is added only after the chunk is durable,
 * so "have" never lists a chunk that a crash lost. Commit streams the
 * chunks into a scratch file, checking each against its row; a chunk that
 * is gone from staging or differs from its row loses its row and the commit
 * answers 409 incomplete, so the edge re-declares and sends it again.
 * Commit re-checks the state inside a write transaction, which serialises
 * concurrent commits of the same SOP Instance UID: the archive file and the
 * index rows appear together or the commit is retried.
 *
 * The HMAC key of the token request is the 32 bytes whose hex form edge-add
 * printed (the edge decodes its secret file the same way).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cmn/crypto.h"
#include "cmn/sql.h"
#include "cmn/dicom.h"
#include "cmn/errors.h"
#include "cmn/log.h"
#include "proto/proto.h"
#include "bundle.h"
#include "internal.h"
#include "manifest.h"
#include "staging.h"

const cmn_conf_opt_t cloud__ingest_opts[] = {
    CMN_CONF_OPT_STR(cloud_ingest_conf_t, staging_dir, "var/cloud/staging",
                     "chunks of uploads in progress (backend dir; shared by all nodes) and scratch"
                     " files; same file system as archive.dir"),
    CMN_CONF_OPT_INT(cloud_ingest_conf_t, max_skew_s, 300, 5, 86400,
                     "accepted clock difference of signed edge requests, seconds"),
    CMN_CONF_OPT_INT(cloud_ingest_conf_t, token_ttl_s, 900, 1, 86400,
                     "lifetime of an edge token (POST /api/v1/token), seconds"),
    CMN_CONF_OPT_INT(cloud_ingest_conf_t, abandon_after_h, 168, 0, 87600,
                     "an upload left open this long is removed with its staged chunks (an edge"
                     " that comes back declares it anew); 0 = never"),
};
const size_t cloud__ingest_nopts = CMN_ARRAY_SIZE(cloud__ingest_opts);

#define OBJECTS_PATH "/api/v1/objects"

/** What a verified request carries besides its body. */
typedef struct {
    char edge_id[PROTO_EDGE_ID_MAX + 1];
    char body_sha256[PROTO_HEX256 + 1];    /* computed from the received body */
    const char *peer;
} signed_req_t;

typedef struct {
    char object_id[PROTO_HEX256 + 1];
    char edge_id[PROTO_EDGE_ID_MAX + 1];
    char sha256[PROTO_HEX256 + 1];
    char sop_uid[PROTO_UID_MAX + 1];
    char state[16];
    char result[16];
    uint64_t size;
    uint32_t chunk_size;
    uint32_t nchunks;
    char kind[16];                         /* "instance" | "bundle" */
    char *decl;                            /* JSON text; malloc'd */
    char *members;                         /* committed bundle: the answer (JSON); malloc'd or NULL */
} upload_t;

static void reject(cmn_http_resp_t *resp, const signed_req_t *sr, int status, const char *code,
                   const char *msg)
{
    CMN_LOG_W("ingest", "rejected status=%d code=%s reason=\"%s\" edge=%s peer=%s", status, code,
              msg, sr && sr->edge_id[0] ? sr->edge_id : "-", sr ? sr->peer : "-");
    cloud_resp_error(resp, status, code, msg);
}

/* ------------------------------------------------------------ signatures */

static int body_hash(const cmn_http_req_t *req, char out[PROTO_HEX256 + 1])
{
    uint8_t h[CMN_SHA256_LEN];

    if (req->body_file) {
        uint64_t n;
        int rc = cmn_sha256_file(req->body_file, h, &n);
        if (rc < 0)
            return rc;
    } else {
        cmn_sha256(req->body ? req->body : "", req->body ? req->body_len : 0, h);
    }
    cmn_hex(h, sizeof(h), out);
    return 0;
}

static bool parse_i64(const char *s, int64_t *out)
{
    char *end;
    long long v;

    if (!s || !*s)
        return false;
    errno = 0;
    v = strtoll(s, &end, 10);
    if (errno || *end)
        return false;
    *out = v;
    return true;
}

static void nonce_cleanup(cmn_sql_t *db, int64_t now)
{
    static _Atomic int64_t last;
    int64_t prev = atomic_load(&last);
    cmn_sql_stmt_t *st;

    if (now - prev < 60 || !atomic_compare_exchange_strong(&last, &prev, now))
        return;
    if (cmn_sql_prepare(db, "DELETE FROM nonces WHERE ts < ?", &st) < 0)
        return;
    cmn_sql_bind_int64(st, 1, now - 2 * cloud_conf->ingest.max_skew_s - 60);
    (void)cmn_sql_step(st);
    cmn_sql_finalize(st);
}

/* 0 when the nonce is fresh, CMN_EAUTH when seen, CMN_EDB. */
static int nonce_claim(cmn_sql_t *db, const char *edge, const char *nonce, int64_t ts)
{
    cmn_sql_stmt_t *st;
    int rc;

    if (cmn_sql_prepare(db, "INSERT INTO nonces(edge_id, nonce, ts) VALUES(?,?,?)", &st) < 0)
        return CMN_EDB;
    cmn_sql_bind_text(st, 1, edge);
    cmn_sql_bind_text(st, 2, nonce);
    cmn_sql_bind_int64(st, 3, ts);
    rc = cmn_sql_step(st);
    cmn_sql_finalize(st);
    if (rc == CMN_SQL_DONE)
        return 0;
    if (rc == CMN_ECONFLICT)
        return CMN_EAUTH;
    CMN_LOG_E("ingest", "nonce insert: %s", cmn_sql_errmsg(db));
    return CMN_EDB;
}

/* Wipes key material (not optimised away). */
static void wipe(void *p, size_t n)
{
    volatile unsigned char *v = p;
    while (n--)
        *v++ = 0;
}

/* Periodic deletion of long-expired tokens (kept a day so that a late
 * request still hears "token_expired" rather than "token_unknown"). */
static void token_cleanup(cmn_sql_t *db, int64_t now)
{
    static _Atomic int64_t last;
    int64_t prev = atomic_load(&last);

    if (now - prev < 300 || !atomic_compare_exchange_strong(&last, &prev, now))
        return;
    cloud_index_tokens_cleanup(db, now - 86400);
}

/*
 * true when the request is authentic and allowed; else the response is
 * written (and the rejection logged, without secrets or signatures).
 *
 * Order: headers -> body hash -> edge known -> signing key (the token's, or
 * the edge secret for POST /api/v1/token only) -> signature and timestamp
 * -> client certificate CN -> address allow list -> edge enabled -> token
 * expired/revoked -> nonce. Only a correctly signed request learns whether
 * the edge is disabled or its token expired; nothing is written before the
 * nonce is claimed, and nothing at all for a rejected request.
 */
static bool verify_request(cmn_sql_t *db, const cmn_http_req_t *req, cmn_http_resp_t *resp,
                           signed_req_t *sr)
{
    const char *ver = cmn_http_req_header(req, PROTO_H_VERSION);
    const char *edge = cmn_http_req_header(req, PROTO_H_EDGE);
    const char *ts_s = cmn_http_req_header(req, PROTO_H_TIMESTAMP);
    const char *nonce = cmn_http_req_header(req, PROTO_H_NONCE);
    const char *bh = cmn_http_req_header(req, PROTO_H_BODY_HASH);
    const char *sig = cmn_http_req_header(req, PROTO_H_SIGNATURE);
    const char *tok_id = cmn_http_req_header(req, PROTO_H_TOKEN);
    bool is_token_req = strcmp(req->path, PROTO_TOKEN_PATH) == 0;
    cloud_edge_t ed;
    cloud_token_t tok;
    uint8_t key[32];
    int64_t ts, now = cloud_now();
    proto_sig_check_t chk;
    proto_req_t r;
    bool ok = false;
    int rc;

    memset(sr, 0, sizeof(*sr));
    memset(&ed, 0, sizeof(ed));
    memset(&tok, 0, sizeof(tok));
    sr->peer = req->peer;
    if (!ver || strcmp(ver, "1") != 0) {
        reject(resp, sr, 400, "unsupported_version", "X-YY-Version must be 1");
        return false;
    }
    if (!edge || !ts_s || !nonce || !bh || !sig || strlen(edge) == 0 ||
        strlen(edge) > PROTO_EDGE_ID_MAX || !parse_i64(ts_s, &ts)) {
        reject(resp, sr, 401, "unauthorized", "missing or malformed signature headers");
        return false;
    }
    snprintf(sr->edge_id, sizeof(sr->edge_id), "%s", edge);
    if (body_hash(req, sr->body_sha256) < 0) {
        reject(resp, sr, 500, "internal", "cannot hash the request body");
        return false;
    }
    if (strcasecmp(bh, sr->body_sha256) != 0) {
        reject(resp, sr, 401, "unauthorized", "X-YY-Content-SHA256 does not match the body");
        return false;
    }
    rc = cloud_index_edge_get(db, edge, &ed);
    if (rc == CMN_ENOTFOUND) {
        reject(resp, sr, 401, "unauthorized", "unknown edge");
        return false;
    }
    if (rc < 0) {
        reject(resp, sr, 503, "unavailable", "index unavailable");
        return false;
    }

    /* The signing key: the edge secret signs only the token request. */
    if (is_token_req) {
        if (tok_id) {
            reject(resp, sr, 401, "unauthorized", "the token request is signed with the secret");
            goto out;
        }
        if (cmn_unhex(ed.secret_hex, key, sizeof(key)) < 0) {
            reject(resp, sr, 500, "internal", "edge secret unusable");
            goto out;
        }
    } else {
        if (!tok_id) {
            reject(resp, sr, 401, "token_required", "X-YY-Token missing: get a token first");
            goto out;
        }
        if (strlen(tok_id) != PROTO_TOKEN_ID_HEX) {
            reject(resp, sr, 401, "token_unknown", "malformed token id");
            goto out;
        }
        rc = cloud_index_token_get(db, tok_id, &tok);
        if (rc == CMN_ENOTFOUND || (rc == 0 && strcmp(tok.edge_id, edge) != 0)) {
            reject(resp, sr, 401, "token_unknown", "no such token for this edge");
            goto out;
        }
        if (rc < 0) {
            reject(resp, sr, 503, "unavailable", "index unavailable");
            goto out;
        }
        if (cmn_unhex(tok.key_hex, key, sizeof(key)) < 0) {
            reject(resp, sr, 500, "internal", "token key unusable");
            goto out;
        }
    }
    r = (proto_req_t){
        .method = req->method,
        .path = req->path,
        .query = req->query,
        .edge_id = edge,
        .timestamp = ts,
        .nonce = nonce,
        .body_sha256 = sr->body_sha256,
    };
    chk = proto_verify(key, sizeof(key), &r, sig, now, cloud_conf->ingest.max_skew_s);
    switch (chk) {
    case PROTO_SIG_OK:
        break;
    case PROTO_SIG_STALE:
        /* Correctly signed: the edge's clock is off. It learns the cloud's
         * time (not a secret) and signs with it; nothing else changes. */
        CMN_LOG_W("ingest", "rejected status=401 code=clock_skew reason=\"timestamp %+lld s from"
                  " the cloud's clock\" edge=%s peer=%s", (long long)(ts - now), sr->edge_id,
                  sr->peer);
        cmn_http_resp_header(resp, "Cache-Control", "no-store");
        cloud_resp_json_take(resp, 401, "application/json",
                             proto_clock_skew_encode(now, "timestamp outside the accepted window:"
                                                     " sign with server_time"));
        goto out;
    case PROTO_SIG_MALFORMED:
        reject(resp, sr, 401, "unauthorized", "malformed signature headers");
        goto out;
    default:
        reject(resp, sr, 401, "unauthorized", "signature does not match");
        goto out;
    }
    /* Mutual TLS: the certificate must name this edge. */
    if (req->tls_client_cn && strcmp(req->tls_client_cn, edge) != 0) {
        reject(resp, sr, 403, "forbidden", "client certificate does not name this edge");
        goto out;
    }
    if (!proto_cidr_list_allows(ed.allow, req->peer)) {
        reject(resp, sr, 403, "forbidden", "address not allowed for this edge");
        goto out;
    }
    if (!ed.enabled) {
        reject(resp, sr, 403, "edge_disabled", "edge disabled by the cloud administrator");
        goto out;
    }
    if (!is_token_req) {
        if (tok.revoked) {
            reject(resp, sr, 401, "token_revoked", "token revoked: get a new one");
            goto out;
        }
        if (tok.expires <= now) {
            reject(resp, sr, 401, "token_expired", "token expired: get a new one");
            goto out;
        }
    }
    nonce_cleanup(db, now);
    rc = nonce_claim(db, edge, nonce, ts);
    if (rc == CMN_EAUTH) {
        reject(resp, sr, 401, "unauthorized", "nonce already used");
        goto out;
    }
    if (rc < 0) {
        reject(resp, sr, 503, "unavailable", "index unavailable");
        goto out;
    }
    ok = true;
out:
    wipe(key, sizeof(key));
    wipe(&tok, sizeof(tok));
    cloud_edge_clear(&ed);
    return ok;
}

bool cloud__ingest_verify(cmn_sql_t *db, const cmn_http_req_t *req, cmn_http_resp_t *resp,
                          char edge_id[PROTO_EDGE_ID_MAX + 1])
{
    signed_req_t sr;

    if (!verify_request(db, req, resp, &sr))
        return false;
    memcpy(edge_id, sr.edge_id, sizeof(sr.edge_id));
    return true;
}

/* ----------------------------------------------------------------- tokens */

/* POST /api/v1/token: issues a fresh token to an authenticated edge. */
static void handle_token(cmn_sql_t *db, const cmn_http_req_t *req, cmn_http_resp_t *resp,
                         const signed_req_t *sr)
{
    uint8_t id[PROTO_TOKEN_ID_HEX / 2];
    char key_hex[PROTO_TOKEN_KEY_LEN * 2 + 1], err[128];
    proto_token_t t;
    char *json;
    int64_t now = cloud_now();

    if (strcmp(req->method, "POST") != 0) {
        cloud_resp_error(resp, 405, "method_not_allowed", "use POST");
        return;
    }
    if (!req->body ||
        proto_token_request_decode(req->body, req->body_len, err, sizeof(err)) < 0) {
        reject(resp, sr, 400, "bad_request", req->body ? err : "{\"v\":1} expected");
        return;
    }
    memset(&t, 0, sizeof(t));
    if (cmn_random(id, sizeof(id)) < 0 || cmn_random(t.key, sizeof(t.key)) < 0) {
        cloud_resp_error(resp, 500, "internal", "no randomness");
        return;
    }
    cmn_hex(id, sizeof(id), t.token_id);
    cmn_hex(t.key, sizeof(t.key), key_hex);
    t.ttl_s = cloud_conf->ingest.token_ttl_s;
    t.expires_at = now + t.ttl_s;
    token_cleanup(db, now);
    if (cloud_index_token_add(db, sr->edge_id, t.token_id, key_hex, t.expires_at) < 0) {
        wipe(key_hex, sizeof(key_hex));
        wipe(&t, sizeof(t));
        cloud_resp_error(resp, 503, "unavailable", "index unavailable");
        return;
    }
    json = proto_token_encode(&t);
    CMN_LOG_I("ingest", "token issued edge=%s ttl_s=%lld peer=%s", sr->edge_id,
              (long long)t.ttl_s, sr->peer);
    wipe(key_hex, sizeof(key_hex));
    wipe(&t, sizeof(t));
    cloud_resp_json_take(resp, 200, "application/json", json);
    cmn_http_resp_header(resp, "Cache-Control", "no-store");
}

/* --------------------------------------------------------------- uploads */

static void upload_free(upload_t *u)
{
    free(u->decl);
    u->decl = NULL;
    free(u->members);
    u->members = NULL;
}

static void col_copy(cmn_sql_stmt_t *st, int i, char *out, size_t outlen)
{
    const char *s = cmn_sql_column_text(st, i);
    snprintf(out, outlen, "%s", s ? s : "");
}

/* 0, CMN_ENOTFOUND, CMN_EDB. Objects are named by their hash, so any
 * authenticated edge may continue an upload (edge_id is the first declarer). */
static int upload_load(cmn_sql_t *db, const char *object_id, upload_t *u)
{
    cmn_sql_stmt_t *st;
    int rc;

    memset(u, 0, sizeof(*u));
    if (cmn_sql_prepare(db,
                       "SELECT edge_id, sha256, size, chunk_size, nchunks, state,"
                       " coalesce(result, ''), sop_uid, decl, kind, members"
                       " FROM uploads WHERE object_id = ?",
                       &st) < 0)
        return CMN_EDB;
    cmn_sql_bind_text(st, 1, object_id);
    rc = cmn_sql_step(st);
    if (rc == CMN_SQL_ROW) {
        snprintf(u->object_id, sizeof(u->object_id), "%s", object_id);
        col_copy(st, 0, u->edge_id, sizeof(u->edge_id));
        col_copy(st, 1, u->sha256, sizeof(u->sha256));
        u->size = (uint64_t)cmn_sql_column_int64(st, 2);
        u->chunk_size = (uint32_t)cmn_sql_column_int64(st, 3);
        u->nchunks = (uint32_t)cmn_sql_column_int64(st, 4);
        col_copy(st, 5, u->state, sizeof(u->state));
        col_copy(st, 6, u->result, sizeof(u->result));
        col_copy(st, 7, u->sop_uid, sizeof(u->sop_uid));
        u->decl = cmn_xstrdup(cmn_sql_column_text(st, 8));
        col_copy(st, 9, u->kind, sizeof(u->kind));
        if (!cmn_sql_column_is_null(st, 10))
            u->members = cmn_xstrdup(cmn_sql_column_text(st, 10));
        rc = 0;
    } else if (rc == CMN_SQL_DONE) {
        rc = CMN_ENOTFOUND;
    } else {
        CMN_LOG_E("ingest", "upload load: %s", cmn_sql_errmsg(db));
        rc = CMN_EDB;
    }
    cmn_sql_finalize(st);
    if (rc < 0)
        upload_free(u);
    return rc;
}

/* Removes an object's staged chunks (best effort). */
static void staging_remove(const upload_t *u)
{
    cloud__staging_remove(u->object_id, u->nchunks);
}

static void status_respond(cmn_sql_t *db, cmn_http_resp_t *resp, const upload_t *u)
{
    proto_object_status_t s;
    cmn_sql_stmt_t *st;
    char *json;

    memset(&s, 0, sizeof(s));
    snprintf(s.object_id, sizeof(s.object_id), "%s", u->object_id);
    s.chunk_size = u->chunk_size;
    s.nchunks = u->nchunks;
    s.state = strcmp(u->state, "committed") == 0 ? PROTO_OBJ_COMMITTED : PROTO_OBJ_OPEN;
    s.have = cmn_xcalloc(u->nchunks ? u->nchunks : 1, 1);
    if (s.state == PROTO_OBJ_COMMITTED) {
        memset(s.have, 1, u->nchunks);
    } else if (cmn_sql_prepare(db, "SELECT idx FROM chunks WHERE object_id = ?", &st) == 0) {
        cmn_sql_bind_text(st, 1, u->object_id);
        while (cmn_sql_step(st) == CMN_SQL_ROW) {
            int64_t i = cmn_sql_column_int64(st, 0);
            if (i >= 0 && i < (int64_t)u->nchunks)
                s.have[i] = 1;
        }
        cmn_sql_finalize(st);
    }
    json = proto_object_status_encode(&s);
    free(s.have);
    cloud_resp_json_take(resp, 200, "application/json", json);
}

/* ---------------------------------------------------------------- declare */


static void handle_declare(cmn_sql_t *db, const cmn_http_req_t *req, cmn_http_resp_t *resp,
                           const signed_req_t *sr)
{
    proto_object_decl_t d;
    char err[256], id[65];
    cmn_sql_stmt_t *st;
    upload_t u;
    int rc;

    if (!req->body || proto_object_decl_decode(req->body, req->body_len, &d, err, sizeof(err)) < 0) {
        reject(resp, sr, 400, "bad_request", req->body ? err : "declaration expected");
        return;
    }
    /* The object id is the object's SHA-256 (PROTOCOL.md): the same bytes
     * from any edge resume the same upload, with the chunk size accepted
     * first. */
    snprintf(id, sizeof(id), "%s", d.sha256);
    if (cmn_sql_prepare(db,
                       "INSERT INTO uploads(object_id, edge_id, decl, sha256, size, chunk_size,"
                       " nchunks, state, sop_uid, created, updated, kind)"
                       " VALUES(?,?,?,?,?,?,?,'open',?,?,?,?)"
                       " ON CONFLICT(object_id) DO UPDATE SET state = 'open', updated = ?"
                       " WHERE uploads.state = 'rejected'",
                       &st) < 0) {
        cloud_resp_error(resp, 503, "unavailable", "index unavailable");
        return;
    }
    cmn_sql_bind_text(st, 1, id);
    cmn_sql_bind_text(st, 2, sr->edge_id);
    cmn_sql_bind_textn(st, 3, req->body, req->body_len);
    cmn_sql_bind_text(st, 4, d.sha256);
    cmn_sql_bind_int64(st, 5, (int64_t)d.size);
    cmn_sql_bind_int64(st, 6, d.chunk_size);
    cmn_sql_bind_int64(st, 7, proto_chunk_count(d.size, d.chunk_size));
    cmn_sql_bind_text(st, 8, d.sop_uid);
    cmn_sql_bind_int64(st, 9, cloud_now());
    cmn_sql_bind_int64(st, 10, cloud_now());
    cmn_sql_bind_text(st, 11, d.kind == PROTO_KIND_BUNDLE ? "bundle" : "instance");
    cmn_sql_bind_int64(st, 12, cloud_now());   /* the ON CONFLICT update */
    rc = cmn_sql_step(st);
    cmn_sql_finalize(st);
    if (rc != CMN_SQL_DONE) {
        CMN_LOG_E("ingest", "declare: %s", cmn_sql_errmsg(db));
        cloud_resp_error(resp, 503, "unavailable", "index unavailable");
        return;
    }
    rc = upload_load(db, id, &u);
    if (rc < 0) {
        cloud_resp_error(resp, 503, "unavailable", "index unavailable");
        return;
    }
    if (strcmp(u.kind, d.kind == PROTO_KIND_BUNDLE ? "bundle" : "instance") != 0) {
        /* The same bytes declared as the other kind: the first one stands. */
        reject(resp, sr, 400, "bad_request", "object already declared with another kind");
        upload_free(&u);
        return;
    }
    CMN_LOG_D("ingest", "declared object=%.16s edge=%s kind=%s sop=%s size=%" PRIu64 " state=%s",
              id, sr->edge_id, u.kind, d.sop_uid, d.size, u.state);
    status_respond(db, resp, &u);
    upload_free(&u);
}

/* ------------------------------------------------------------------ chunk */

static void handle_chunk(cmn_sql_t *db, const cmn_http_req_t *req, cmn_http_resp_t *resp,
                         const signed_req_t *sr, const char *id, const char *idx_s)
{
    const char *ch = cmn_http_req_header(req, PROTO_H_CHUNK_HASH);
    cmn_sql_stmt_t *st;
    int64_t idx;
    upload_t u;
    int rc;

    rc = upload_load(db, id, &u);
    if (rc == CMN_ENOTFOUND) {
        reject(resp, sr, 404, "not_found", "no such object");
        return;
    }
    if (rc < 0) {
        cloud_resp_error(resp, 503, "unavailable", "index unavailable");
        return;
    }
    if (strcmp(u.state, "committed") == 0) {   /* a late re-send: harmless */
        cmn_http_resp_status(resp, 204);
        goto out;
    }
    if (strcmp(u.state, "open") != 0) {
        reject(resp, sr, 404, "not_found", "object is not accepting chunks; declare it again");
        goto out;
    }
    if (!parse_i64(idx_s, &idx) || idx < 0 || idx >= (int64_t)u.nchunks) {
        reject(resp, sr, 400, "bad_chunk", "chunk index out of range");
        goto out;
    }
    if (req->body_len != proto_chunk_len(u.size, u.chunk_size, (uint32_t)idx)) {
        reject(resp, sr, 400, "bad_chunk", "chunk length does not match the declaration");
        goto out;
    }
    if (!ch || strcasecmp(ch, sr->body_sha256) != 0) {
        reject(resp, sr, 400, "bad_chunk", "X-YY-Chunk-SHA256 does not match the chunk");
        goto out;
    }
    rc = cloud__staging_put(id, (uint32_t)idx, req, sr->body_sha256);
    if (rc < 0) {
        CMN_LOG_E("ingest", "chunk write object=%.16s i=%" PRId64 ": %s", id, idx,
                  cmn_strerror(rc));
        cloud_resp_error(resp, rc == -ENOSPC || rc == CMN_ENOSPACE ? 507 : 500, "storage",
                         "cannot store the chunk");
        goto out;
    }
    /* The row only while the upload is open: a commit (on any node) that
     * finished meanwhile has already removed the staged chunks, so this
     * late one would be left behind. */
    if (cmn_sql_prepare(db, "INSERT INTO chunks(object_id, idx, sha256) SELECT ?,?,?"
                       " WHERE EXISTS (SELECT 1 FROM uploads WHERE object_id = ? AND state = 'open')"
                       " ON CONFLICT(object_id, idx) DO UPDATE SET sha256 = excluded.sha256",
                       &st) < 0) {
        cloud_resp_error(resp, 503, "unavailable", "index unavailable");
        goto out;
    }
    cmn_sql_bind_text(st, 1, id);
    cmn_sql_bind_int64(st, 2, idx);
    cmn_sql_bind_text(st, 3, sr->body_sha256);
    cmn_sql_bind_text(st, 4, id);
    rc = cmn_sql_step(st);
    cmn_sql_finalize(st);
    if (rc != CMN_SQL_DONE) {
        CMN_LOG_E("ingest", "chunk row: %s", cmn_sql_errmsg(db));
        cloud_resp_error(resp, 503, "unavailable", "index unavailable");
        goto out;
    }
    if (cmn_sql_changes(db) == 0) {
        cloud__staging_drop(id, (uint32_t)idx);
        upload_free(&u);
        rc = upload_load(db, id, &u);
        if (rc == 0 && strcmp(u.state, "committed") == 0)
            cmn_http_resp_status(resp, 204);   /* a late re-send: harmless */
        else if (rc == 0 || rc == CMN_ENOTFOUND)
            reject(resp, sr, 404, "not_found", "object is not accepting chunks; declare it again");
        else
            cloud_resp_error(resp, 503, "unavailable", "index unavailable");
        goto out;
    }
    cmn_http_resp_status(resp, 204);
out:
    upload_free(&u);
}

/* ----------------------------------------------------------------- commit */

static void commit_respond(cmn_http_resp_t *resp, const char *result, const char *sop_uid)
{
    proto_commit_t c;

    memset(&c, 0, sizeof(c));
    c.result = strcmp(result, "duplicate") == 0  ? PROTO_COMMIT_DUPLICATE
               : strcmp(result, "conflict") == 0 ? PROTO_COMMIT_CONFLICT
                                                 : PROTO_COMMIT_STORED;
    snprintf(c.sop_uid, sizeof(c.sop_uid), "%s", sop_uid);
    cloud_resp_json_take(resp, 200, "application/json", proto_commit_encode(&c));
}

/* Chunk hashes of an upload, as recorded by its chunks rows. */
typedef char chunk_sha_t[PROTO_HEX256 + 1];

/*
 * Loads the recorded SHA-256 of every chunk into *out (u->nchunks entries,
 * malloc'd; "" for a chunk without a row) and counts the rows in *have.
 * 0 or CMN_EDB.
 */
static int load_chunk_hashes(cmn_sql_t *db, const upload_t *u, chunk_sha_t **out,
                             uint32_t *have)
{
    chunk_sha_t *want = cmn_xcalloc(u->nchunks ? u->nchunks : 1, sizeof(*want));
    cmn_sql_stmt_t *st;
    int rc;

    *out = NULL;
    *have = 0;
    if (cmn_sql_prepare(db, "SELECT idx, sha256 FROM chunks WHERE object_id = ?", &st) < 0) {
        free(want);
        return CMN_EDB;
    }
    cmn_sql_bind_text(st, 1, u->object_id);
    while ((rc = cmn_sql_step(st)) == CMN_SQL_ROW) {
        int64_t i = cmn_sql_column_int64(st, 0);
        const char *h = cmn_sql_column_text(st, 1);
        if (i < 0 || i >= (int64_t)u->nchunks || !h || strlen(h) != PROTO_HEX256 ||
            want[i][0])
            continue;
        memcpy(want[i], h, PROTO_HEX256 + 1);
        (*have)++;
    }
    cmn_sql_finalize(st);
    if (rc != CMN_SQL_DONE) {
        CMN_LOG_E("ingest", "chunk rows: %s", cmn_sql_errmsg(db));
        free(want);
        return CMN_EDB;
    }
    *out = want;
    return 0;
}

static void reader_init(cloud_staging_reader_t *r, const upload_t *u, const chunk_sha_t *want)
{
    r->object_id = u->object_id;
    r->size = u->size;
    r->chunk_size = u->chunk_size;
    r->nchunks = u->nchunks;
    r->want = want;
    cloud__staging_reader_init(r);
}

/*
 * Streams the staged chunks (each checked against its row) into the new
 * scratch file out_path (open as out, which is closed), hashing the whole.
 * 0; CMN_ENOTFOUND / CMN_EHASH with r->bad for a lost or damaged chunk;
 * -errno or an S3 error. out_path is unlinked on error.
 */
static int assemble(cloud_staging_reader_t *r, int out, const char *out_path, char sha_hex[65],
                    uint64_t *size)
{
    cmn_sha256_ctx_t ctx;
    uint8_t h[CMN_SHA256_LEN];
    char *buf;
    ssize_t n;
    int rc = 0;

    buf = cmn_xmalloc(1 << 16);
    cmn_sha256_init(&ctx);
    *size = 0;
    while ((n = cloud__staging_read(r, buf, 1 << 16)) > 0) {
        cmn_sha256_update(&ctx, buf, (size_t)n);
        if (write(out, buf, (size_t)n) != n) {
            rc = errno ? -errno : -EIO;
            break;
        }
        *size += (uint64_t)n;
    }
    if (n < 0)
        rc = (int)n;
    free(buf);
    cmn_sha256_final(&ctx, h);
    cmn_hex(h, sizeof(h), sha_hex);
    if (rc == 0 && fsync(out) < 0)
        rc = -errno;
    close(out);
    if (rc < 0)
        unlink(out_path);
    return rc;
}

static int upload_set(cmn_sql_t *db, const char *id, const char *state, const char *result)
{
    cmn_sql_stmt_t *st;
    int rc;

    if (cmn_sql_prepare(db, "UPDATE uploads SET state = ?, result = ?, updated = ? WHERE object_id = ?",
                       &st) < 0)
        return CMN_EDB;
    cmn_sql_bind_text(st, 1, state);
    if (result)
        cmn_sql_bind_text(st, 2, result);
    else
        cmn_sql_bind_null(st, 2);
    cmn_sql_bind_int64(st, 3, cloud_now());
    cmn_sql_bind_text(st, 4, id);
    rc = cmn_sql_step(st) == CMN_SQL_DONE ? 0 : CMN_EDB;
    cmn_sql_finalize(st);
    if (rc == 0) {
        if (cmn_sql_prepare(db, "DELETE FROM chunks WHERE object_id = ?", &st) < 0)
            return CMN_EDB;
        cmn_sql_bind_text(st, 1, id);
        rc = cmn_sql_step(st) == CMN_SQL_DONE ? 0 : CMN_EDB;
        cmn_sql_finalize(st);
    }
    if (rc < 0)
        CMN_LOG_E("ingest", "upload update: %s", cmn_sql_errmsg(db));
    return rc;
}

/* The answer of a committed upload: stored per-member JSON for bundles. */
static void commit_respond_upload(cmn_http_resp_t *resp, const upload_t *u)
{
    if (strcmp(u->kind, "bundle") == 0) {
        if (u->members)
            cloud_resp_json_take(resp, 200, "application/json", cmn_xstrdup(u->members));
        else
            cloud_resp_error(resp, 500, "internal", "bundle answer lost");
        return;
    }
    commit_respond(resp, u->result, u->sop_uid);
}

static int chunk_forget(cmn_sql_t *db, const char *id, uint32_t i)
{
    cmn_sql_stmt_t *st;
    int rc;

    if (cmn_sql_prepare(db, "DELETE FROM chunks WHERE object_id = ? AND idx = ?", &st) < 0)
        return CMN_EDB;
    cmn_sql_bind_text(st, 1, id);
    cmn_sql_bind_int64(st, 2, i);
    rc = cmn_sql_step(st) == CMN_SQL_DONE ? 0 : CMN_EDB;
    cmn_sql_finalize(st);
    return rc;
}

/*
 * The commit found chunk `bad` gone from staging (lost: CMN_ENOTFOUND) or
 * different from its row (CMN_EHASH). Unless a concurrent commit finished
 * the upload meanwhile (then its answer is repeated), the chunk's row goes,
 * and so do the rows of later chunks that are gone too, and the answer is
 * 409 incomplete: the edge re-declares, sees them missing from "have" and
 * sends them again. Never a 500 that the edge would repeat forever.
 */
static void chunk_lost(cmn_sql_t *db, cmn_http_resp_t *resp, const signed_req_t *sr,
                       upload_t *u, uint32_t bad, int why)
{
    char id[PROTO_HEX256 + 1], msg[160];
    uint32_t nlost = 1;
    upload_t now;

    snprintf(id, sizeof(id), "%s", u->object_id);
    if (upload_load(db, id, &now) == 0 && strcmp(now.state, "committed") == 0) {
        commit_respond_upload(resp, &now);
        upload_free(&now);
        return;
    }
    upload_free(&now);
    if (why == CMN_EHASH)
        cloud__staging_drop(id, bad);
    if (chunk_forget(db, id, bad) < 0) {
        cloud_resp_error(resp, 503, "unavailable", "index unavailable");
        return;
    }
    for (uint32_t i = bad + 1; i < u->nchunks; i++) {
        if (cloud__staging_has(id, i) == 0 && chunk_forget(db, id, i) == 0)
            nlost++;
    }
    CMN_LOG_W("ingest", "commit object=%.16s edge=%s: chunk %" PRIu32 " %s; forgot %" PRIu32
              " chunk(s), the edge re-sends them", id, sr->edge_id, bad,
              why == CMN_EHASH ? "differs from its record" : "is missing from staging", nlost);
    snprintf(msg, sizeof(msg), "chunk %" PRIu32 " is no longer staged: declare again and send "
             "the missing chunks", bad);
    reject(resp, sr, 409, "incomplete", msg);
}

static int upload_set_members(cmn_sql_t *db, const char *id, const char *members)
{
    cmn_sql_stmt_t *st;
    int rc;

    if (cmn_sql_prepare(db, "UPDATE uploads SET members = ? WHERE object_id = ?", &st) < 0)
        return CMN_EDB;
    cmn_sql_bind_text(st, 1, members);
    cmn_sql_bind_text(st, 2, id);
    rc = cmn_sql_step(st) == CMN_SQL_DONE ? 0 : CMN_EDB;
    cmn_sql_finalize(st);
    return rc;
}

static proto_commit_result_t store_result(cloud_store_result_t r)
{
    switch (r) {
    case CLOUD_STORE_STORED: return PROTO_COMMIT_STORED;
    case CLOUD_STORE_DUPLICATE: return PROTO_COMMIT_DUPLICATE;
    case CLOUD_STORE_CONFLICT: return PROTO_COMMIT_CONFLICT;
    }
    return PROTO_COMMIT_REJECTED;
}

/*
 * Commit of a bundle whose chunks are all here: split and check it
 * (bundle.c, outside the write lock), then archive and index every good
 * member in one transaction; the per-member answer is stored with the
 * upload so that a repeated commit repeats it.
 */
static void handle_bundle_commit(cmn_sql_t *db, cmn_http_resp_t *resp, const signed_req_t *sr,
                                 upload_t *u, const chunk_sha_t *want)
{
    char err[256], id[PROTO_HEX256 + 1];
    cloud_staging_reader_t rd;
    cloud_bundle_item_t *items = NULL;
    proto_bundle_commit_t c;
    uint32_t n = 0, nstored = 0, ndup = 0, nconf = 0, nrej = 0;
    char *json = NULL;
    int rc;

    memset(&c, 0, sizeof(c));
    snprintf(id, sizeof(id), "%s", u->object_id);
    reader_init(&rd, u, want);
    rc = cloud__bundle_split(&rd, u->size, u->sha256, &items, &n, err, sizeof(err));
    cloud__staging_reader_close(&rd);
    if (rc == CMN_ENOTFOUND || rc == CMN_EHASH) {
        chunk_lost(db, resp, sr, u, rd.bad, rc);
        return;
    }
    if (rc == CMN_EPARSE) {
        (void)upload_set(db, id, "rejected", NULL);
        staging_remove(u);
        CMN_LOG_W("ingest", "bad bundle object=%.16s edge=%s: %s", id, sr->edge_id, err);
        reject(resp, sr, 422, "bad_object", err);
        return;
    }
    if (rc < 0) {
        CMN_LOG_E("ingest", "bundle split object=%.16s: %s", id, cmn_strerror(rc));
        cloud_resp_error(resp, rc == -ENOSPC || rc == CMN_ENOSPACE ? 507 : 500, "storage",
                         "cannot split the bundle");
        return;
    }
    c.n = n;
    c.m = cmn_xcalloc(n, sizeof(*c.m));
    if (cloud_index_begin(db) < 0) {
        cloud_resp_error(resp, 503, "unavailable", "index busy");
        goto out;
    }
    upload_free(u);
    if (upload_load(db, id, u) < 0)
        goto out_rollback;
    if (strcmp(u->state, "committed") == 0) {   /* a concurrent commit won */
        cloud_index_rollback(db);
        commit_respond_upload(resp, u);
        goto out;
    }
    cloud_archive_defer_dir_sync();
    for (uint32_t i = 0; i < n; i++) {
        cloud_bundle_item_t *it = &items[i];
        cloud_store_result_t r;

        snprintf(c.m[i].sop_uid, sizeof(c.m[i].sop_uid), "%s", it->m.sop_uid);
        if (!it->ok) {
            c.m[i].result = PROTO_COMMIT_REJECTED;
            nrej++;
            CMN_LOG_W("ingest", "bundle member rejected object=%.16s i=%" PRIu32
                      " sop=%s edge=%s: %s", id, i, it->m.sop_uid, sr->edge_id, it->why);
            continue;
        }
        if (cloud_store_place(db, it->tmp, it->info, it->sha256, it->m.size, it->json,
                              sr->edge_id, &r) < 0) {
            (void)cloud_archive_flush_dir_sync();
            goto out_rollback;
        }
        c.m[i].result = store_result(r);
        nstored += r == CLOUD_STORE_STORED;
        ndup += r == CLOUD_STORE_DUPLICATE;
        nconf += r == CLOUD_STORE_CONFLICT;
    }
    json = proto_bundle_commit_encode(&c);
    /* The renames are durable before the index names the files. */
    if (cloud_archive_flush_dir_sync() < 0 || !json || upload_set(db, id, "committed", "bundle") < 0 ||
        upload_set_members(db, id, json) < 0 || cloud_index_commit(db) < 0)
        goto out_rollback;
    cloud__bundle_items_free(items, n);
    items = NULL;
    staging_remove(u);
    CMN_LOG_I("ingest", "commit bundle object=%.16s edge=%s members=%" PRIu32 " stored=%" PRIu32
              " duplicate=%" PRIu32 " conflict=%" PRIu32 " rejected=%" PRIu32 " size=%" PRIu64,
              id, sr->edge_id, n, nstored, ndup, nconf, nrej, u->size);
    cloud_resp_json_take(resp, 200, "application/json", json);
    json = NULL;
    goto out;

out_rollback:
    cloud_index_rollback(db);
    CMN_LOG_E("ingest", "bundle commit failed object=%.16s edge=%s", id, sr->edge_id);
    cloud_resp_error(resp, 500, "internal", "commit failed; retry");
out:
    free(json);
    proto_bundle_commit_free(&c);
    cloud__bundle_items_free(items, n);
}

static void handle_commit(cmn_sql_t *db, const cmn_http_req_t *req, cmn_http_resp_t *resp,
                          const signed_req_t *sr, const char *id)
{
    char tmp[4200], dst[4096], sha[65], err[256], prefix[512];
    cmn_dicom_info_t *info = NULL;
    cloud_staging_reader_t r;
    chunk_sha_t *want = NULL;
    cloud_instance_ref_t have;
    const char *result;
    char *json = NULL;
    size_t jsonlen;
    uint64_t size = 0;
    uint32_t n;
    upload_t u;
    int rc, fd;

    (void)req;
    rc = upload_load(db, id, &u);
    if (rc == CMN_ENOTFOUND) {
        reject(resp, sr, 404, "not_found", "no such object");
        return;
    }
    if (rc < 0) {
        cloud_resp_error(resp, 503, "unavailable", "index unavailable");
        return;
    }
    if (strcmp(u.state, "committed") == 0) {
        commit_respond_upload(resp, &u);
        goto out;
    }
    if (strcmp(u.state, "open") != 0) {
        reject(resp, sr, 404, "not_found", "object was rejected; declare it again");
        goto out;
    }
    if (load_chunk_hashes(db, &u, &want, &n) < 0) {
        cloud_resp_error(resp, 503, "unavailable", "index unavailable");
        goto out;
    }
    if (n != u.nchunks) {
        reject(resp, sr, 409, "incomplete", "not all chunks have been received");
        goto out;
    }
    if (strcmp(u.kind, "bundle") == 0) {
        handle_bundle_commit(db, resp, sr, &u, want);
        goto out;
    }

    fd = cloud__staging_tmpfile("object", tmp, sizeof(tmp));
    if (fd < 0) {
        CMN_LOG_E("ingest", "scratch file object=%.16s: %s", id, cmn_strerror(fd));
        cloud_resp_error(resp, fd == -ENOSPC ? 507 : 500, "storage", "cannot assemble the object");
        goto out;
    }
    reader_init(&r, &u, want);
    rc = assemble(&r, fd, tmp, sha, &size);
    cloud__staging_reader_close(&r);
    if (rc == CMN_ENOTFOUND || rc == CMN_EHASH) {
        chunk_lost(db, resp, sr, &u, r.bad, rc);
        goto out;
    }
    if (rc < 0) {
        CMN_LOG_E("ingest", "assemble object=%.16s: %s", id, cmn_strerror(rc));
        cloud_resp_error(resp, rc == -ENOSPC || rc == CMN_ENOSPACE ? 507 : 500, "storage",
                         "cannot assemble the object");
        goto out;
    }
    if (size != u.size || strcmp(sha, u.sha256) != 0) {
        /* Chunks were verified one by one, so this means the declaration
         * was wrong: start over. */
        (void)upload_set(db, id, "rejected", NULL);
        unlink(tmp);
        staging_remove(&u);
        reject(resp, sr, 422, "bad_object", "object SHA-256 or size does not match");
        goto out;
    }

    info = cmn_xmalloc(sizeof(*info));
    if (cmn_dicom_read_info(tmp, info, err, sizeof(err)) < 0) {
        (void)upload_set(db, id, "rejected", NULL);
        unlink(tmp);
        staging_remove(&u);
        CMN_LOG_W("ingest", "not DICOM object=%.16s edge=%s: %s", id, sr->edge_id, err);
        reject(resp, sr, 422, "bad_object", "the object is not a readable DICOM instance");
        goto out;
    }
    if (strcmp(info->sop_uid, u.sop_uid) != 0) {
        (void)upload_set(db, id, "rejected", NULL);
        unlink(tmp);
        staging_remove(&u);
        reject(resp, sr, 422, "bad_object", "SOP Instance UID differs from the declaration");
        goto out;
    }
    snprintf(prefix, sizeof(prefix), "/dicomweb/studies/%s/series/%s/instances/%s/bulk",
             info->study_uid, info->series_uid, info->sop_uid);
    if (cmn_dicom_to_json(tmp, prefix, &json, &jsonlen, err, sizeof(err)) < 0) {
        (void)upload_set(db, id, "rejected", NULL);
        unlink(tmp);
        staging_remove(&u);
        CMN_LOG_W("ingest", "json failed object=%.16s: %s", id, err);
        reject(resp, sr, 422, "bad_object", "the object cannot be converted to DICOM JSON");
        goto out;
    }

    /* The write lock serialises commits: the check and the placement below
     * see a stable index. */
    if (cloud_index_begin(db) < 0) {
        unlink(tmp);
        cloud_resp_error(resp, 503, "unavailable", "index busy");
        goto out;
    }
    upload_free(&u);
    if (upload_load(db, id, &u) < 0)
        goto out_rollback;
    if (strcmp(u.state, "committed") == 0) {   /* a concurrent commit won */
        cloud_index_rollback(db);
        unlink(tmp);
        commit_respond_upload(resp, &u);
        goto out;
    }
    rc = cloud_index_find_instance(db, info->sop_uid, &have);
    if (rc == 0 && strcmp(have.sha256, sha) == 0) {
        result = "duplicate";
        unlink(tmp);
    } else if (rc == 0) {
        result = "conflict";
        if (cloud_archive_conflict_path(info->sop_uid, sha, dst, sizeof(dst)) < 0 ||
            cloud_archive_place(tmp, dst) < 0 ||
            cloud_index_add_conflict(db, info->sop_uid, sha, dst, sr->edge_id) < 0)
            goto out_rollback;
        CMN_LOG_W("ingest", "conflict sop=%s sha=%.16s kept=%.16s edge=%s", info->sop_uid, sha,
                  have.sha256, sr->edge_id);
    } else if (rc == CMN_ENOTFOUND) {
        result = "stored";
        if (cloud_archive_path(info->study_uid, info->series_uid, info->sop_uid, dst,
                               sizeof(dst)) < 0 ||
            cloud_archive_place(tmp, dst) < 0 ||
            cloud_index_add_instance(db, info, dst, size, sha, json) < 0)
            goto out_rollback;
    } else {
        goto out_rollback;
    }
    if (upload_set(db, id, "committed", result) < 0 || cloud_index_commit(db) < 0)
        goto out_rollback;
    staging_remove(&u);
    CMN_LOG_I("ingest", "commit object=%.16s edge=%s sop=%s result=%s size=%" PRIu64, id,
              sr->edge_id, info->sop_uid, result, size);
    commit_respond(resp, result, info->sop_uid);
    goto out;

out_rollback:
    cloud_index_rollback(db);
    unlink(tmp);
    CMN_LOG_E("ingest", "commit failed object=%.16s edge=%s", id, sr->edge_id);
    cloud_resp_error(resp, 500, "internal", "commit failed; retry");
out:
    free(want);
    free(json);
    free(info);
    upload_free(&u);
}

/* ------------------------------------------------------------------ route */

/*
 * Abandoned uploads: objects declared but never committed (an edge
 * decommissioned or reinstalled mid-upload) would keep their staged chunks
 * forever. Each row is deleted in its own transaction, and only if it is
 * still open and still old (an edge resuming it meanwhile wins); its chunks
 * go after the row. Should an edge declare the same object again at that
 * moment, its commit finds a chunk missing and the edge re-sends it (409).
 */
int cloud_ingest_gc(cmn_sql_t *db, int64_t older_than_s, int max, int *removed)
{
    struct { char id[PROTO_HEX256 + 1]; uint32_t n; } *v = cmn_xcalloc((size_t)max, sizeof(*v));
    int64_t cutoff = cloud_now() - older_than_s;
    cmn_sql_stmt_t *st;
    int n = 0, rc = 0;

    *removed = 0;
    if (cmn_sql_prepare(db, "SELECT object_id, nchunks FROM uploads WHERE state = 'open'"
                            " AND updated <= ? ORDER BY updated LIMIT ?", &st) < 0) {
        free(v);
        return CMN_EDB;
    }
    cmn_sql_bind_int64(st, 1, cutoff);
    cmn_sql_bind_int64(st, 2, max);
    while (n < max && (rc = cmn_sql_step(st)) == CMN_SQL_ROW) {
        snprintf(v[n].id, sizeof(v[n].id), "%s", cmn_sql_column_text(st, 0));
        v[n].n = (uint32_t)cmn_sql_column_int64(st, 1);
        n++;
    }
    cmn_sql_finalize(st);
    rc = rc < 0 ? rc : 0;
    for (int i = 0; rc == 0 && i < n; i++) {
        int changed = 0;
        if (cloud_index_begin(db) < 0) {
            rc = CMN_EDB;
            break;
        }
        if (cmn_sql_prepare(db, "DELETE FROM uploads WHERE object_id = ? AND state = 'open'"
                                " AND updated <= ?", &st) == 0) {
            cmn_sql_bind_text(st, 1, v[i].id);
            cmn_sql_bind_int64(st, 2, cutoff);
            if (cmn_sql_step(st) == CMN_SQL_DONE)
                changed = cmn_sql_changes(db) > 0;
            else
                rc = CMN_EDB;
            cmn_sql_finalize(st);
        } else {
            rc = CMN_EDB;
        }
        if (rc < 0 || cloud_index_commit(db) < 0) {
            cloud_index_rollback(db);
            rc = CMN_EDB;
            break;
        }
        if (changed) {
            cloud__staging_remove(v[i].id, v[i].n);
            (*removed)++;
            CMN_LOG_I("ingest", "abandoned upload removed object=%.16s chunks=%" PRIu32, v[i].id,
                      v[i].n);
        }
    }
    free(v);
    return rc;
}

/* Runs the GC at most once an hour per process, from request handlers. */
static void gc_maybe(cmn_sql_t *db)
{
    static _Atomic int64_t next_s;
    int64_t now = cloud_now(), due = atomic_load(&next_s);
    int removed;

    if (cloud_conf->ingest.abandon_after_h <= 0 || now < due ||
        !atomic_compare_exchange_strong(&next_s, &due, now + 3600))
        return;
    (void)cloud_ingest_gc(db, cloud_conf->ingest.abandon_after_h * 3600, 200, &removed);
}

void cloud_ingest_handle(const cmn_http_req_t *req, cmn_http_resp_t *resp)
{
    const char *rest;
    char id[PROTO_HEX256 + 1];
    signed_req_t sr;
    cmn_sql_t *db;

    bool is_token = strcmp(req->path, PROTO_TOKEN_PATH) == 0;

    if (!is_token && strncmp(req->path, OBJECTS_PATH, strlen(OBJECTS_PATH)) != 0) {
        cloud_resp_error(resp, 404, "not_found", "no such endpoint");
        return;
    }
    rest = req->path + strlen(OBJECTS_PATH);
    if (!is_token && *rest && *rest != '/') {
        cloud_resp_error(resp, 404, "not_found", "no such endpoint");
        return;
    }
    db = cloud_index_get();
    if (!db) {
        cloud_resp_error(resp, 503, "unavailable", "index unavailable");
        return;
    }
    if (!verify_request(db, req, resp, &sr))
        goto out;
    if (is_token) {
        handle_token(db, req, resp, &sr);
        goto out;
    }

    if (*rest == '\0' || strcmp(rest, "/") == 0) {
        if (strcmp(req->method, "POST") == 0) {
            handle_declare(db, req, resp, &sr);
            gc_maybe(db);
        } else
            cloud_resp_error(resp, 405, "method_not_allowed", "use POST");
        goto out;
    }
    rest++;
    if (strlen(rest) < PROTO_HEX256 || (rest[PROTO_HEX256] && rest[PROTO_HEX256] != '/')) {
        cloud_resp_error(resp, 404, "not_found", "no such object");
        goto out;
    }
    memcpy(id, rest, PROTO_HEX256);
    id[PROTO_HEX256] = '\0';
    if (!proto_hex256_valid(id)) {
        cloud_resp_error(resp, 404, "not_found", "no such object");
        goto out;
    }
    rest += PROTO_HEX256;
    if (*rest == '\0') {
        if (strcmp(req->method, "GET") == 0) {
            upload_t u;
            int rc = upload_load(db, id, &u);
            if (rc == 0)
                status_respond(db, resp, &u);
            else if (rc == CMN_ENOTFOUND)
                cloud_resp_error(resp, 404, "not_found", "no such object");
            else
                cloud_resp_error(resp, 503, "unavailable", "index unavailable");
            upload_free(&u);
        } else {
            cloud_resp_error(resp, 405, "method_not_allowed", "use GET");
        }
    } else if (strncmp(rest, "/chunks/", 8) == 0) {
        if (strcmp(req->method, "PUT") == 0)
            handle_chunk(db, req, resp, &sr, id, rest + 8);
        else
            cloud_resp_error(resp, 405, "method_not_allowed", "use PUT");
    } else if (strcmp(rest, "/commit") == 0) {
        if (strcmp(req->method, "POST") == 0)
            handle_commit(db, req, resp, &sr, id);
        else
            cloud_resp_error(resp, 405, "method_not_allowed", "use POST");
    } else {
        cloud_resp_error(resp, 404, "not_found", "no such endpoint");
    }
out:
    cloud_index_put(db);
}
