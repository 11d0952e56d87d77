/*
 * token.h - the edge's dynamic token (proto/PROTOCOL.md, "Tokens").
 *
 * The edge secret signs exactly one kind of request: POST /api/v1/token. The
 * answer is a short-lived token (id + 32-byte HMAC key + lifetime) kept in
 * memory only; every upload request names it in X-YY-Token and is signed
 * with its key. This module owns the secret and the current token, fetches
 * a token when none is usable, and makes concurrent callers share one fetch.
 *
 * Rotation: a token counts as usable until 80% of its lifetime has passed
 * (measured on the edge's monotonic clock from the moment it arrived, so
 * clock skew does not matter); after that the next caller fetches a fresh
 * one, well before the cloud would refuse the old one. A token the cloud
 * refuses (401 token_expired / token_revoked / token_unknown) is dropped
 * with edge_token_invalidate() and the next caller fetches another.
 *
 * Clock: requests carry a timestamp the cloud accepts within a window
 * (ingest.max_skew_s, 300 s by default) of its own clock. Edges in hospitals
 * often have no working time sync: when the cloud answers a correctly
 * signed request with 401 clock_skew and its time, the edge signs from then
 * on with its own clock plus the difference (edge_token_time), re-sends that
 * request once, and reports the difference on the status page (an alarm
 * beyond EDGE_CLOCK_ALARM_S). The difference is learnt again whenever the
 * cloud answers clock_skew (the edge's clock was corrected, say).
 *
 * State: IDLE (no usable token) --wait--> FETCHING --ok--> READY
 *        READY --80% of ttl or invalidate--> IDLE;  FETCHING --error--> IDLE
 *        any --close--> CLOSED (freed now, or when the fetch in flight ends)
 *
 * Loop thread only.
 */
#ifndef EDGE_TOKEN_H
#define EDGE_TOKEN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cmn/http.h"
#include "proto/proto.h"

typedef struct edge_token edge_token_t;

typedef struct {
    const char *base_url;        /* cloud URL without trailing '/' (copied) */
    const char *path_prefix;     /* path part of the URL, "" or "/prefix" (copied) */
    const char *edge_id;         /* copied */
    const uint8_t *secret;       /* the edge secret (copied; wiped at close) */
    size_t secret_len;
    long timeout_ms;             /* per token request */
    /* TLS and proxy settings for the token request, as in
     * cmn_http_client_req_t; the strings must outlive the token object (they
     * live in the config). */
    const char *ca_file;
    const char *pinned_pubkey;
    const char *proxy;
    const char *client_cert_file;
    const char *client_key_file;
} edge_token_opts_t;

/**
 * Creates the token keeper; requests go through http (which must outlive
 * it, or be destroyed after edge_token_close). 0 and *out, or -EINVAL.
 */
int edge_token_create(cmn_http_client_t *http, const edge_token_opts_t *opts,
                      edge_token_t **out);

/**
 * Copies the current token into *out when one is usable: 0, or CMN_ENOTFOUND
 * (call edge_token_wait). Wipe *out after use.
 */
int edge_token_current(edge_token_t *t, proto_token_t *out);

/**
 * Calls cb(status, why, ud) on the loop once a token is usable (status 0:
 * call edge_token_current) or fetching failed (status < 0, why = a short
 * reason without secrets, valid during cb). Starts a fetch unless one is in
 * flight. cb is never called from inside this function. 0, or an error (cb
 * will not be called).
 */
int edge_token_wait(edge_token_t *t, void (*cb)(int status, const char *why, void *ud),
                    void *ud);

/** The Unix time to sign a request with: the edge's clock plus what the
 * cloud said it is off by (0 until it said so). */
int64_t edge_token_time(const edge_token_t *t);

/**
 * The cloud answered 401 clock_skew with its time server_time to a request
 * signed at signed_at (edge_token_time) while the difference was
 * offset_at (edge_token_clock_offset): learns the difference anew. false
 * when server_time is missing (the request is not worth re-sending).
 */
bool edge_token_clock_skew(edge_token_t *t, int64_t signed_at, int64_t offset_at,
                           int64_t server_time);

/** The difference learnt (cloud minus edge clock, seconds; 0 = none): what
 * edge_token_time adds. */
int64_t edge_token_clock_offset(const edge_token_t *t);

/** A response from the cloud carried its clock (the Date header, Unix s). */
void edge_token_clock_seen(edge_token_t *t, int64_t cloud_date);

/**
 * The cloud's clock minus the edge's as last seen, seconds: from the last
 * response's Date header (to a second or two), else the learnt difference.
 * For the status page; a difference under the cloud's window shows here
 * before any request is refused.
 */
int64_t edge_token_clock_diff(const edge_token_t *t);

/** Beyond this difference (seconds) the status page raises a clock alarm. */
#define EDGE_CLOCK_ALARM_S 60

/** Drops the current token if its id is token_id (NULL: whatever is current). */
void edge_token_invalidate(edge_token_t *t, const char *token_id);

/**
 * Fails every waiter with -ECANCELED (their callbacks run now), wipes the
 * secret and the token and frees the object, at once or when the fetch in
 * flight completes (destroying the HTTP client cancels it). NULL is fine.
 */
void edge_token_close(edge_token_t *t);

#endif /* EDGE_TOKEN_H */
