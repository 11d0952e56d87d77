/*
 * cmn_tls.h - private to common/: server-side TLS 1.2 (mbedTLS 2.28) as a
 * memory BIO, for cmn_http_server.c. No sockets, no libuv: the caller moves
 * ciphertext between the socket and the session.
 *
 *   socket bytes -> cmn_tls_in_space()/cmn_tls_in_commit()
 *                -> cmn_tls_handshake() until 0, then cmn_tls_read() -> plaintext
 *   plaintext    -> cmn_tls_write() -> cmn_tls_out() (ciphertext to send)
 *
 * Every call that can produce records (handshake, read: alerts, write,
 * close_notify) appends them to the session's output buffer; the caller
 * takes them with cmn_tls_out_take() and writes them in order.
 *
 * A cmn_tls_conf_t (certificate, key, CA, RNG, ciphersuites) is parsed once
 * and shared by every session created from it; it must outlive them. Both
 * are used on one thread (the loop's).
 */
#ifndef CMN_TLS_H
#define CMN_TLS_H

#include <stdbool.h>
#include <stddef.h>

#include "cmn/buf.h"

typedef struct cmn_tls_conf cmn_tls_conf_t;
typedef struct cmn_tls cmn_tls_t;

/* Results besides 0, byte counts and CMN_ECRYPTO: negative, outside the
 * errno and CMN_E* ranges, never returned to callers of the public API. */
#define CMN_TLS_AGAIN  (-20001) /* needs more input (cmn_tls_handshake, cmn_tls_read) */
#define CMN_TLS_CLOSED (-20002) /* the peer sent close_notify (cmn_tls_read) */

/**
 * Parses cert_file (PEM chain, leaf first) and key_file (PEM) and, when
 * client_ca_file is not NULL, requires and verifies client certificates
 * against it. Checks that the key matches the certificate.
 * 0 and *out set (free with cmn_tls_conf_destroy), or CMN_ECRYPTO / -ENOMEM
 * (the reason is logged).
 */
int cmn_tls_conf_create(const char *cert_file, const char *key_file, const char *client_ca_file,
                        cmn_tls_conf_t **out);
void cmn_tls_conf_destroy(cmn_tls_conf_t *conf);

/** A new server session. 0 and *out (free with cmn_tls_destroy), or -ENOMEM/CMN_ECRYPTO. */
int cmn_tls_create(cmn_tls_conf_t *conf, cmn_tls_t **out);
void cmn_tls_destroy(cmn_tls_t *t);

/** Free space for received ciphertext; *room is 0 when the input buffer is full. */
void cmn_tls_in_space(cmn_tls_t *t, char **p, size_t *room);
/** n bytes were stored at the pointer cmn_tls_in_space returned. */
void cmn_tls_in_commit(cmn_tls_t *t, size_t n);
/** Bytes received but not yet consumed by mbedTLS. */
size_t cmn_tls_in_pending(const cmn_tls_t *t);
/**
 * The peer's first byte started a plain HTTP request instead of a TLS record
 * (a client configured with http:// for an https server): for a clear log
 * line when the handshake then fails.
 */
bool cmn_tls_is_plain_http(const cmn_tls_t *t);

/** Runs the handshake: 0 done, CMN_TLS_AGAIN, or CMN_ECRYPTO (failed; an alert may be queued). */
int cmn_tls_handshake(cmn_tls_t *t);
bool cmn_tls_is_established(const cmn_tls_t *t);

/**
 * Decrypts into buf: > 0 bytes, CMN_TLS_AGAIN (no complete record buffered),
 * CMN_TLS_CLOSED, or CMN_ECRYPTO (bad record; an alert may be queued).
 */
int cmn_tls_read(cmn_tls_t *t, char *buf, size_t len);

/** Encrypts all n bytes into records in the output buffer. 0, -ENOMEM or CMN_ECRYPTO. */
int cmn_tls_write(cmn_tls_t *t, const void *p, size_t n);

/** Queues a close_notify alert (once). */
void cmn_tls_close_notify(cmn_tls_t *t);

/** Ciphertext waiting to be sent. */
size_t cmn_tls_out_len(const cmn_tls_t *t);
/**
 * Moves the waiting ciphertext into *dst (which must be empty; its memory is
 * swapped with the session's, so buffers are reused instead of reallocated).
 */
void cmn_tls_out_take(cmn_tls_t *t, cmn_buf_t *dst);

/** After the handshake: the verified client certificate's subject CN, or NULL. */
const char *cmn_tls_peer_cn(const cmn_tls_t *t);
/** Releases the output buffer's memory when it is empty (idle connections stay small). */
void cmn_tls_out_trim(cmn_tls_t *t);

/** Lower-case hex SHA-256 of the client certificate's DER SubjectPublicKeyInfo, or NULL. */
const char *cmn_tls_peer_pubkey_sha256(const cmn_tls_t *t);
/** Negotiated ciphersuite name ("" before the handshake). */
const char *cmn_tls_ciphersuite(const cmn_tls_t *t);
/** The last mbedTLS error as text, for logs ("" when none). */
const char *cmn_tls_last_error(const cmn_tls_t *t);

#endif /* CMN_TLS_H */
