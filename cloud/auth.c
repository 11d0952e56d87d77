/*
 * auth.c - users, sessions and the guard in front of patient data.
 *
 *   POST /api/v1/login   {"username","password"} -> {"username","role"} + cookie
 *   POST /api/v1/logout  ends the session
 *   GET  /api/v1/me      {"username","role"} or 401
 *
 * Passwords: PBKDF2-HMAC-SHA256 (mbedTLS), random 16-byte salt, stored as
 * "pbkdf2-sha256$<iterations>$<salt hex>$<hash hex>".
 * Sessions: a random 32-byte token given to the browser as the HttpOnly
 * cookie yy_session (or sent as "Authorization: Bearer <token>"); only its
 * SHA-256 is stored, so a copy of the database cannot be used to log in.
 * Sessions live in the database (not process memory) so any cloud process
 * can check them.
 */
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include <jansson.h>
#include <mbedtls/md.h>
#include <mbedtls/pkcs5.h>

#include "cmn/crypto.h"
#include "cmn/sql.h"
#include "cmn/errors.h"
#include "cmn/log.h"
#include "internal.h"

#define PBKDF2_ITER 100000
#define SESSION_TTL_S (12 * 3600)
#define COOKIE_NAME "yy_session"

/* -------------------------------------------------------------- passwords */

static int pbkdf2(const char *password, const uint8_t *salt, size_t saltlen, unsigned iter,
                  uint8_t out[32])
{
    mbedtls_md_context_t md;
    int rc;

    mbedtls_md_init(&md);
    rc = mbedtls_md_setup(&md, mbedtls_md_info_from_type(MBEDTLS_MD_SHA256), 1);
    if (rc == 0)
        rc = mbedtls_pkcs5_pbkdf2_hmac(&md, (const unsigned char *)password, strlen(password),
                                       salt, saltlen, iter, 32, out);
    mbedtls_md_free(&md);
    return rc == 0 ? 0 : CMN_ECRYPTO;
}

static int password_hash(const char *password, char *out, size_t outlen)
{
    uint8_t salt[16], h[32];
    char salt_hex[33], h_hex[65];

    if (cmn_random(salt, sizeof(salt)) < 0 || pbkdf2(password, salt, sizeof(salt), PBKDF2_ITER, h) < 0)
        return CMN_ECRYPTO;
    cmn_hex(salt, sizeof(salt), salt_hex);
    cmn_hex(h, sizeof(h), h_hex);
    snprintf(out, outlen, "pbkdf2-sha256$%u$%s$%s", PBKDF2_ITER, salt_hex, h_hex);
    return 0;
}

static bool password_check(const char *password, const char *stored)
{
    char salt_hex[33], h_hex[65];
    uint8_t salt[16], want[32], got[32];
    unsigned iter;

    if (sscanf(stored, "pbkdf2-sha256$%u$%32[0-9a-f]$%64[0-9a-f]", &iter, salt_hex, h_hex) != 3 ||
        iter < 1000 || iter > 10000000 || cmn_unhex(salt_hex, salt, sizeof(salt)) < 0 ||
        cmn_unhex(h_hex, want, sizeof(want)) < 0)
        return false;
    if (pbkdf2(password, salt, sizeof(salt), iter, got) < 0)
        return false;
    return cmn_memeq_ct(want, got, sizeof(got)) == 0;
}

int cloud_auth_user_add(cmn_sql_t *db, const char *user, const char *password, const char *role)
{
    char hash[160];
    cmn_sql_stmt_t *st;
    int rc;

    rc = password_hash(password, hash, sizeof(hash));
    if (rc < 0)
        return rc;
    if (cmn_sql_prepare(db,
                       "INSERT INTO users(username, pwhash, role, created) VALUES(?,?,?,?)"
                       " ON CONFLICT(username) DO UPDATE SET pwhash = excluded.pwhash,"
                       " role = excluded.role",
                       &st) < 0)
        return CMN_EDB;
    cmn_sql_bind_text(st, 1, user);
    cmn_sql_bind_text(st, 2, hash);
    cmn_sql_bind_text(st, 3, role);
    cmn_sql_bind_int64(st, 4, cloud_now());
    rc = cmn_sql_step(st) == CMN_SQL_DONE ? 0 : CMN_EDB;
    if (rc < 0)
        CMN_LOG_E("auth", "user insert: %s", cmn_sql_errmsg(db));
    cmn_sql_finalize(st);
    return rc;
}

/* --------------------------------------------------------------- sessions */

static void token_hash(const char *token, char out[65])
{
    uint8_t h[CMN_SHA256_LEN];

    cmn_sha256(token, strlen(token), h);
    cmn_hex(h, sizeof(h), out);
}

/* Finds the session token of a request: cookie first, then Bearer. */
static bool request_token(const cmn_http_req_t *req, char token[65])
{
    const char *auth = cmn_http_req_header(req, "Authorization");
    const char *cookie = cmn_http_req_header(req, "Cookie");
    const char *p;

    for (p = cookie; p && *p;) {
        while (*p == ' ' || *p == ';')
            p++;
        if (strncmp(p, COOKIE_NAME "=", sizeof(COOKIE_NAME)) == 0) {
            const char *v = p + sizeof(COOKIE_NAME);
            size_t n = strcspn(v, "; ");
            if (n == 64) {
                memcpy(token, v, 64);
                token[64] = '\0';
                return true;
            }
        }
        p = strchr(p, ';');
    }
    if (auth && strncasecmp(auth, "Bearer ", 7) == 0) {
        const char *v = auth + 7;
        while (*v == ' ')
            v++;
        if (strlen(v) == 64) {
            memcpy(token, v, 65);
            return true;
        }
    }
    return false;
}

static bool session_lookup(cmn_sql_t *db, const char *token, cloud_user_t *user)
{
    char th[65];
    cmn_sql_stmt_t *st;
    bool ok = false;

    token_hash(token, th);
    if (cmn_sql_prepare(db,
                       "SELECT u.username, u.role FROM sessions s JOIN users u"
                       " ON u.username = s.username WHERE s.token_hash = ? AND s.expires > ?",
                       &st) < 0)
        return false;
    cmn_sql_bind_text(st, 1, th);
    cmn_sql_bind_int64(st, 2, cloud_now());
    if (cmn_sql_step(st) == CMN_SQL_ROW) {
        snprintf(user->username, sizeof(user->username), "%s",
                 cmn_sql_column_text(st, 0));
        snprintf(user->role, sizeof(user->role), "%s", cmn_sql_column_text(st, 1));
        ok = true;
    }
    cmn_sql_finalize(st);
    return ok;
}

bool cloud_auth_require(cmn_sql_t *db, const cmn_http_req_t *req, cmn_http_resp_t *resp,
                        cloud_user_t *user)
{
    char token[65];

    if (request_token(req, token) && session_lookup(db, token, user))
        return true;
    cmn_http_resp_header(resp, "WWW-Authenticate", "Bearer realm=\"yunying\"");
    cloud_resp_error(resp, 401, "unauthenticated", "login required");
    return false;
}

/* --------------------------------------------------------------- handlers */

static void respond_user(cmn_http_resp_t *resp, const char *username, const char *role)
{
    json_t *o = json_pack("{s:s, s:s}", "username", username, "role", role);
    char *text = o ? json_dumps(o, JSON_COMPACT) : NULL;

    json_decref(o);
    cmn_http_resp_header(resp, "Cache-Control", "no-store");
    cloud_resp_json_take(resp, 200, "application/json", text);
}

static void handle_login(cmn_sql_t *db, const cmn_http_req_t *req, cmn_http_resp_t *resp)
{
    static const char dummy[] =
        "pbkdf2-sha256$100000$00000000000000000000000000000000$"
        "0000000000000000000000000000000000000000000000000000000000000000";
    const char *username = NULL, *password = NULL;
    char stored[160] = "", role[16] = "", token[65], th[65], cookie[160];
    uint8_t raw[32];
    json_error_t jerr;
    json_t *body = NULL;
    cmn_sql_stmt_t *st;
    bool found = false;

    if (req->body)
        body = json_loadb(req->body, req->body_len, 0, &jerr);
    if (!body || json_unpack(body, "{s:s, s:s}", "username", &username, "password", &password) < 0 ||
        strlen(username) > CLOUD_USER_MAX) {
        json_decref(body);
        cloud_resp_error(resp, 400, "bad_request", "expected {\"username\",\"password\"}");
        return;
    }
    if (cmn_sql_prepare(db, "SELECT pwhash, role FROM users WHERE username = ?", &st) < 0) {
        json_decref(body);
        cloud_resp_error(resp, 503, "unavailable", "index unavailable");
        return;
    }
    cmn_sql_bind_text(st, 1, username);
    if (cmn_sql_step(st) == CMN_SQL_ROW) {
        snprintf(stored, sizeof(stored), "%s", cmn_sql_column_text(st, 0));
        snprintf(role, sizeof(role), "%s", cmn_sql_column_text(st, 1));
        found = true;
    }
    cmn_sql_finalize(st);
    /* Unknown users cost the same time as wrong passwords. */
    if (!password_check(password, found ? stored : dummy) || !found) {
        CMN_LOG_W("auth", "login failed peer=%s", req->peer);
        json_decref(body);
        cloud_resp_error(resp, 401, "bad_credentials", "wrong user name or password");
        return;
    }

    if (cmn_random(raw, sizeof(raw)) < 0) {
        json_decref(body);
        cloud_resp_error(resp, 500, "internal", "no randomness");
        return;
    }
    cmn_hex(raw, sizeof(raw), token);
    token_hash(token, th);
    if (cmn_sql_prepare(db,
                       "INSERT INTO sessions(token_hash, username, created, expires) VALUES(?,?,?,?)",
                       &st) < 0) {
        json_decref(body);
        cloud_resp_error(resp, 503, "unavailable", "index unavailable");
        return;
    }
    cmn_sql_bind_text(st, 1, th);
    cmn_sql_bind_text(st, 2, username);
    cmn_sql_bind_int64(st, 3, cloud_now());
    cmn_sql_bind_int64(st, 4, cloud_now() + SESSION_TTL_S);
    if (cmn_sql_step(st) != CMN_SQL_DONE) {
        cmn_sql_finalize(st);
        json_decref(body);
        cloud_resp_error(resp, 503, "unavailable", "index unavailable");
        return;
    }
    cmn_sql_finalize(st);
    /* Housekeeping: expired sessions go. */
    if (cmn_sql_prepare(db, "DELETE FROM sessions WHERE expires <= ?", &st) == 0) {
        cmn_sql_bind_int64(st, 1, cloud_now());
        (void)cmn_sql_step(st);
        cmn_sql_finalize(st);
    }
    snprintf(cookie, sizeof(cookie), COOKIE_NAME "=%s; Path=/; HttpOnly; SameSite=Strict; Max-Age=%d",
             token, SESSION_TTL_S);
    cmn_http_resp_header(resp, "Set-Cookie", cookie);
    cloud_index_audit(db, username, "login", "", req->peer);
    CMN_LOG_I("auth", "login user=%s peer=%s", username, req->peer);
    respond_user(resp, username, role);
    json_decref(body);
}

static void handle_logout(cmn_sql_t *db, const cmn_http_req_t *req, cmn_http_resp_t *resp)
{
    char token[65], th[65];
    cmn_sql_stmt_t *st;

    if (request_token(req, token)) {
        token_hash(token, th);
        if (cmn_sql_prepare(db, "DELETE FROM sessions WHERE token_hash = ?", &st) == 0) {
            cmn_sql_bind_text(st, 1, th);
            (void)cmn_sql_step(st);
            cmn_sql_finalize(st);
        }
    }
    cmn_http_resp_header(resp, "Set-Cookie",
                         COOKIE_NAME "=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    cmn_http_resp_status(resp, 204);
}

void cloud_auth_handle(const cmn_http_req_t *req, cmn_http_resp_t *resp)
{
    cmn_sql_t *db = cloud_index_get();
    cloud_user_t user;

    if (!db) {
        cloud_resp_error(resp, 503, "unavailable", "index unavailable");
        return;
    }
    if (strcmp(req->path, "/api/v1/login") == 0) {
        if (strcmp(req->method, "POST") == 0)
            handle_login(db, req, resp);
        else
            cloud_resp_error(resp, 405, "method_not_allowed", "use POST");
    } else if (strcmp(req->path, "/api/v1/logout") == 0) {
        if (strcmp(req->method, "POST") == 0)
            handle_logout(db, req, resp);
        else
            cloud_resp_error(resp, 405, "method_not_allowed", "use POST");
    } else if (cloud_auth_require(db, req, resp, &user)) {
        if (strcmp(req->path, "/api/v1/me") == 0 && strcmp(req->method, "GET") == 0)
            respond_user(resp, user.username, user.role);
        else
            cloud_resp_error(resp, 404, "not_found", "no such endpoint");
    }
    cloud_index_put(db);
}
