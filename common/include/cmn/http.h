/*
 * http.h - HTTP/1.1 server on libuv + llhttp, and HTTP client on libcurl
 * multi driven by the same libuv loop.
 *
 * SERVER
 *
 * Routes are matched in declaration order: the first whose method matches
 * (NULL = any) and whose prefix is a prefix of the request path wins; no
 * match answers 404. The request body is read in full before the handler
 * runs, within the route's max_body (413 beyond it); bodies larger than
 * opts.body_mem_limit are streamed to a temporary file under opts.tmp_dir
 * instead of memory (req->body_file), and the file is removed after the
 * response. Keep-alive, pipelined requests answered in order, header size
 * limit (431), idle/request timeouts (408), "Connection: close" honoured.
 *
 * A handler fills a cmn_http_resp_t: status, headers, and a body made of
 * segments - memory copies, owned memory, or file ranges - which the server
 * streams with backpressure (a file segment is read 256 KiB at a time, the
 * next read waits for the write). Content-Length is computed from the
 * segments. Routes with blocking = true run their handler on the libuv
 * threadpool (uv_queue_work), so the handler may use SQLite and files; other
 * handlers run on the loop thread and must not block. Either way the handler
 * returns with the response complete; the server sends it from the loop.
 *
 * All functions except the cmn_http_req_xxx and cmn_http_resp_xxx accessors must be
 * called on the loop thread.
 *
 * TLS: with opts.tls_cert_file and opts.tls_key_file set, the listener
 * speaks HTTPS only (TLS 1.2, ECDHE with AES-GCM or ChaCha20-Poly1305, via
 * mbedTLS; the certificate and key are parsed once, at create). With
 * opts.tls_client_ca_file set as well, every client must present a
 * certificate issued by that CA (mutual TLS); the handler sees its subject CN
 * and public-key hash in req->tls_client_cn / req->tls_client_pubkey_sha256.
 * A connection that does not complete its handshake within
 * opts.tls_handshake_timeout_ms, or sends anything that is not TLS, is
 * closed. Responses are encrypted in steps of at most 256 KiB of plaintext,
 * each sent before the next is produced, so backpressure works as on plain
 * connections; connections end with a close_notify alert. Without TLS the
 * server behaves exactly as before (no extra copies).
 *
 * CLIENT
 *
 * cmn_http_client_send() starts a request on the loop and calls cb once, on
 * the loop thread, with the result. If it returns an error, cb is never called.
 */
#ifndef CMN_HTTP_H
#define CMN_HTTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "cmn/buf.h"

/* ------------------------------------------------------------------ server */

typedef struct cmn_http_server cmn_http_server_t;
typedef struct cmn_http_resp cmn_http_resp_t;

typedef struct {
    const char *name;
    const char *value;
} cmn_http_header_t;

typedef struct {
    const char *method;          /* "GET", "POST", ... */
    const char *path;            /* raw path, without the query ("/dicomweb/studies") */
    const char *query;           /* raw query without '?', "" when absent */
    const cmn_http_header_t *headers;
    size_t nheaders;
    const char *body;            /* NUL-terminated; NULL when body_file is set */
    size_t body_len;             /* bytes of body (memory or file) */
    const char *body_file;       /* temp file holding a large body, else NULL */
    char peer[64];               /* client address, "127.0.0.1": the TCP peer, or the
                                  * last X-Forwarded-For entry when the TCP peer is a
                                  * trusted proxy (opts.trust_proxy) */
    char via[64];                /* that proxy's address, else "" */
    void *route_ud;              /* the route's ud */
    bool tls;                    /* the request arrived over TLS */
    bool client_https;           /* the client's own scheme is https: tls, or a
                                  * trusted proxy's X-Forwarded-Proto (for URLs
                                  * written into answers, never for security) */
    /* Mutual TLS only (opts.tls_client_ca_file), else NULL. Both describe the
     * client certificate verified during the handshake; they point into the
     * connection and stay valid until the handler returns. */
    const char *tls_client_cn;   /* subject CN, printable ASCII ("edge-7") */
    const char *tls_client_pubkey_sha256; /* lower-case hex SHA-256 of the DER
                                  * SubjectPublicKeyInfo: what `openssl x509 -pubkey
                                  * | openssl pkey -pubin -outform der | sha256sum`
                                  * prints; stable across re-issues with the same key */
} cmn_http_req_t;

typedef void (*cmn_http_handler_fn)(const cmn_http_req_t *req, cmn_http_resp_t *resp);

typedef struct {
    const char *method;          /* NULL matches any method */
    const char *prefix;          /* path prefix, e.g. "/dicomweb/" */
    cmn_http_handler_fn fn;
    void *ud;                    /* passed as req->route_ud */
    size_t max_body;             /* 0 = the server's default */
    bool blocking;               /* run fn on the threadpool */
} cmn_http_route_t;

typedef struct {
    const char *host;            /* bind address, "127.0.0.1" */
    int port;                    /* 0 = pick a free port (see cmn_http_server_port) */
    size_t max_header_bytes;     /* 0 = 16 KiB */
    size_t max_body;             /* default per-route body cap; 0 = 1 MiB */
    size_t body_mem_limit;       /* larger bodies go to tmp_dir; 0 = 8 MiB */
    const char *tmp_dir;         /* for large bodies; NULL = "/tmp" */
    unsigned idle_timeout_ms;    /* keep-alive idle; 0 = 60 s */
    unsigned request_timeout_ms; /* headers+body; 0 = 300 s */
    int max_connections;         /* 0 = 1024; beyond it new connections are closed */
    /* TLS: both NULL = plain HTTP. PEM files, read once by cmn_http_server_create. */
    const char *tls_cert_file;   /* server certificate chain, leaf first */
    const char *tls_key_file;    /* its private key (unencrypted PEM) */
    const char *tls_client_ca_file; /* NULL = no client certificates; else required and
                                  * verified against this CA bundle */
    unsigned tls_handshake_timeout_ms; /* 0 = 10 s */
    /* Reverse proxies: NULL = none. Called on the loop thread with the TCP
     * peer's address; true = a proxy of ours, whose X-Forwarded-For (its last
     * entry, which it wrote itself) names the client. */
    bool (*trust_proxy)(const char *addr, void *ud);
    void *trust_proxy_ud;
} cmn_http_server_opts_t;

/**
 * Binds, listens and starts serving on loop. routes must outlive the server.
 * 0 and *out set (destroy with cmn_http_server_close), or a negative error:
 * CMN_ECONFIG when only one of tls_cert_file/tls_key_file is set (or a
 * client CA without them), CMN_ECRYPTO when a TLS file cannot be used (the
 * reason is logged), -errno from bind/listen.
 */
int cmn_http_server_create(uv_loop_t *loop, const cmn_http_server_opts_t *opts,
                           const cmn_http_route_t *routes, size_t nroutes,
                           cmn_http_server_t **out);

/** The bound port (useful with opts.port = 0). */
int cmn_http_server_port(const cmn_http_server_t *srv);

/**
 * Stops listening, closes every connection (waiting for blocking handlers
 * in flight) and frees the server; done(ud) runs when all handles are closed.
 */
void cmn_http_server_close(cmn_http_server_t *srv, void (*done)(void *ud), void *ud);

/** Case-insensitive header lookup; NULL when absent. */
const char *cmn_http_req_header(const cmn_http_req_t *req, const char *name);

/**
 * Iterates the query string: *cursor starts at req->query. Each call decodes
 * the next key and value (percent- and '+'-decoded, NUL-terminated, truncated
 * to their buffers' sizes) and returns 1, or 0 at the end, or CMN_EPARSE.
 */
int cmn_http_query_next(const char **cursor, char *key, size_t keylen, char *val, size_t vallen);

/**
 * True when the request's Accept-Encoding admits coding (e.g. "gzip") by
 * name or by "*", with a quality above zero.
 */
bool cmn_http_accepts_encoding(const cmn_http_req_t *req, const char *coding);

/** Percent-decodes src into dst (dstlen incl. NUL). 0 or CMN_EPARSE. */
int cmn_http_urldecode(const char *src, size_t srclen, char *dst, size_t dstlen);

void cmn_http_resp_status(cmn_http_resp_t *resp, int status);
/** Adds a response header (copied). 0 or -ENOMEM. */
int cmn_http_resp_header(cmn_http_resp_t *resp, const char *name, const char *value);
/** Appends a copy of n bytes to the body. */
int cmn_http_resp_body(cmn_http_resp_t *resp, const void *p, size_t n);
/** Appends p (malloc'd) to the body, taking ownership (freed after sending, or on error). */
int cmn_http_resp_body_take(cmn_http_resp_t *resp, void *p, size_t n);
/**
 * Appends the byte range [off, off+len) of a file; len = UINT64_MAX means to
 * the end. Stats the file (and under TLS reads it when small, up to 4 MiB per
 * response): call from blocking handlers. 0 or -errno.
 */
int cmn_http_resp_file(cmn_http_resp_t *resp, const char *path, uint64_t off, uint64_t len);
/** Convenience: status + Content-Type + a copied body. */
int cmn_http_resp_simple(cmn_http_resp_t *resp, int status, const char *content_type,
                         const void *body, size_t n);

/* ------------------------------------------------------------------ client */

typedef struct cmn_http_client cmn_http_client_t;

typedef struct {
    const char *method;          /* "GET", "PUT", "POST" */
    const char *url;
    const char *const *headers;  /* "Name: value" strings, NULL-terminated; copied */
    const void *body;            /* NOT copied: must stay valid until cb runs */
    size_t body_len;
    long timeout_ms;             /* whole request; 0 = 60 s */
    long connect_timeout_ms;     /* 0 = 10 s */
    size_t max_response;         /* cap on the response body; 0 = 16 MiB */
    /* TLS (https:// URLs). The server certificate and host name are always
     * verified, and TLS 1.2 is the minimum. Failures give err = CMN_ECRYPTO. */
    const char *ca_file;         /* CA bundle (PEM) to verify the server; NULL = system store */
    const char *pinned_pubkey;   /* NULL, or "sha256//<base64>" (several joined by ';'): the
                                  * server's public key must also match one of them */
    const char *client_cert_file; /* client certificate (PEM) for mutual TLS, or NULL */
    const char *client_key_file; /* its private key (PEM); NULL = in client_cert_file */
    /* NULL = direct (libcurl's https_proxy etc. environment variables still
     * apply); else the proxy URL, e.g. "http://proxy.example:3128": https://
     * requests go through it in a CONNECT tunnel, TLS still end to end. */
    const char *proxy;
} cmn_http_client_req_t;

typedef struct {
    int err;                     /* 0, or negative (transport failure, cap exceeded, cancelled) */
    const char *errmsg;          /* curl's message when err != 0 */
    long status;                 /* HTTP status, 0 on transport failure */
    cmn_buf_t body;              /* response body; owned by the client, valid during cb */
    const char *content_type;    /* NULL when absent */
    int64_t date;                /* the response's Date header, Unix seconds; 0 when absent */
} cmn_http_result_t;

typedef void (*cmn_http_client_cb)(const cmn_http_result_t *res, void *ud);

int cmn_http_client_create(uv_loop_t *loop, int max_connections, cmn_http_client_t **out);
int cmn_http_client_send(cmn_http_client_t *c, const cmn_http_client_req_t *req,
                         cmn_http_client_cb cb, void *ud);
/** Number of requests in flight. */
int cmn_http_client_pending(const cmn_http_client_t *c);
/**
 * Cancels requests in flight (their cb runs with err = -ECANCELED), closes
 * the handles and frees the client once they are closed. Safe to call twice.
 */
void cmn_http_client_destroy(cmn_http_client_t *c);

#endif /* CMN_HTTP_H */
