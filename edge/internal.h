/*
 * internal.h - yunying-edge: configuration and the pieces shared between
 * the edge's modules (main.c, scp.c, spool.c, upload.c).
 *
 * Each module declares one configuration table for its own section; main.c
 * strings them together into the file layout
 *
 *     { "log": {...}, "scp": {...}, "spool": {...}, "upload": {...} }
 *
 * Strings in the config structs are owned by the config (cmn_conf_free).
 */
#ifndef EDGE_INTERNAL_H
#define EDGE_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cmn/conf.h"

typedef struct {
    char *level;                 /* "error" | "warn" | "info" | "debug" */
} edge_conf_log_t;

typedef struct {
    char *ae_title;              /* our AE title; associations calling another are rejected */
    char *bind;                  /* IPv4 address to listen on, "0.0.0.0" = all */
    long long port;              /* TCP port; 0 = pick a free one (tests) */
    long long max_associations;  /* concurrent associations (worker threads) */
    long long dimse_timeout_s;   /* idle time inside an association before it is aborted */
    char *allowed_calling_aes;   /* comma-separated calling AE titles accepted; "" = any */
    char *allowed_peers;         /* comma-separated CIDR blocks of accepted peers; "" = any */
} edge_conf_scp_t;

typedef struct {
    char *dir;                   /* spool directory: spool.db, objects/, tmp/ */
    long long min_free_mb;       /* refuse new instances (A700) below this much free space */
    long long max_gb;            /* quota on bytes waiting for upload, GiB; 0 = none */
    long long max_mb;            /* the same in MiB (wins over max_gb when set); 0 = none */
    long long keep_days;         /* uploaded images kept this long (the hot cache) */
    long long evict_headroom_mb; /* evicted early below min_free_mb + this; 0 = never */
} edge_conf_spool_t;

typedef struct {
    char *cloud_url;             /* "http(s)://host:port[/prefix]"; "" = upload disabled */
    char *edge_id;               /* this edge's identity at the cloud */
    char *secret_file;           /* file holding the shared secret, hex */
    char *ca_file;               /* PEM CA bundle for the cloud's certificate; "" = system */
    char *pinned_pubkey;         /* "" or "sha256//<base64>[;...]" */
    char *proxy;                 /* "" or the hospital's proxy, "http://host:port" */
    char *client_cert_file;      /* "" or PEM client certificate (mutual TLS) */
    char *client_key_file;       /* "" or its PEM key ("" = inside client_cert_file) */
    long long parallel;          /* instances in flight */
    long long chunk_size;        /* bytes per PUT, proposed to the cloud */
    long long retry_min_ms;      /* first retry delay */
    long long retry_max_ms;      /* cap on the retry delay */
    long long timeout_ms;        /* per HTTP request */
    bool compress;               /* transcode to JPEG-LS lossless before upload */
    long long compress_parallel; /* instances transcoded at once (threadpool) */
    char *urgent_calling_aes;    /* comma-separated calling AE titles whose images go first */
    long long bundle_max_bytes;  /* bundles of small instances up to this size; 0 = no bundles */
    long long bundle_max_count;  /* instances per bundle */
    long long manifest_quiet_ms; /* study manifest once a study is uploaded and quiet this long; -1 = off */
} edge_conf_upload_t;

typedef struct {
    char *bind;                  /* status page / metrics listen address (loopback) */
    long long port;              /* 0 = status page disabled */
} edge_conf_status_t;

typedef struct {
    edge_conf_log_t log;
    edge_conf_scp_t scp;
    edge_conf_spool_t spool;
    edge_conf_upload_t upload;
    edge_conf_status_t status;
} edge_conf_t;

/* Option tables, one per module (defined in the module's .c file). */
extern const cmn_conf_opt_t edge__log_opts[];
extern const size_t edge__log_nopts;
extern const cmn_conf_opt_t edge__scp_opts[];
extern const size_t edge__scp_nopts;
extern const cmn_conf_opt_t edge__spool_opts[];
extern const size_t edge__spool_nopts;
extern const cmn_conf_opt_t edge__upload_opts[];
extern const size_t edge__upload_nopts;
extern const cmn_conf_opt_t edge__status_opts[];
extern const size_t edge__status_nopts;

/*
 * Checks that the tables cannot express (AE title syntax, URL shape,
 * readable secret, ...). Each returns 0, or CMN_ECONFIG with
 * "<section.key>: reason" in err.
 */
int edge__scp_conf_check(const edge_conf_scp_t *c, char *err, size_t errlen);
int edge__spool_conf_check(const edge_conf_spool_t *c, char *err, size_t errlen);
int edge__upload_conf_check(const edge_conf_upload_t *c, char *err, size_t errlen);

/*
 * The edge's clock (clock.c). Every time the upload engine, the schedule
 * and the bandwidth pacing look at goes through these two functions, so a
 * test can replace time: with YY_EDGE_TEST_CLOCK=<unix ms> in the
 * environment the clock is frozen at that instant and only moves when
 * edge__clock_set() is called (from the status server's POST /debug/clock).
 * Real timers (uv_timer) still run in real time; with a fake clock they are
 * only polls that re-read it.
 */
/** Monotonic milliseconds (CLOCK_MONOTONIC), or the fake clock. */
uint64_t edge__now_ms(void);
/** Wall-clock milliseconds since the epoch (stored in the spool), or the fake clock. */
int64_t edge__wall_ms(void);
/** Reads YY_EDGE_TEST_CLOCK; true when the fake clock is on. Call once at start. */
bool edge__clock_init_from_env(void);
bool edge__clock_is_fake(void);
/** Sets the fake clock (ignored when it is off). Thread-safe. */
void edge__clock_set(int64_t wall_ms);

#endif /* EDGE_INTERNAL_H */
