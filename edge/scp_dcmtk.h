/*
 * scp_dcmtk.h - the edge's DICOM SCP on DCMTK (scp_dcmtk.cc, the only C++
 * in edge/). Plain C API; no C++ exception crosses it.
 *
 * The shim owns the network side: a listening socket bound to opts.bind,
 * a listener thread that accepts connections and hands each association to
 * a DcmSCPPool worker thread (at most opts.max_associations at once; more
 * are rejected "local limit exceeded"), association negotiation (called AE
 * title check, curated storage SOP classes and transfer syntaxes, plus
 * Verification), C-ECHO, and receiving a C-STORE data set into a file
 * exactly as received (Part 10 meta header + data set).
 *
 * What happens with a received file is the C side's business: store_cb runs
 * on the worker thread and returns the DIMSE status to answer with.
 */
#ifndef EDGE_SCP_DCMTK_H
#define EDGE_SCP_DCMTK_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* DIMSE C-STORE status codes (PS3.4 B.2.3). */
#define EDGE_STATUS_SUCCESS            0x0000
#define EDGE_STATUS_OUT_OF_RESOURCES   0xA700
#define EDGE_STATUS_DATASET_MISMATCH   0xA900
#define EDGE_STATUS_CANNOT_UNDERSTAND  0xC000

/** One received C-STORE request, as handed to the C side. */
typedef struct {
    const char *tmp_path;        /* the received file (Part 10); the callee removes or keeps it.
                                    When kept is set, no such file exists (yet) */
    uint64_t dataset_bytes;      /* data set bytes received over the network */
    int receive_failed;          /* nonzero: receiving failed (tmp_path may be partial) */
    int out_of_resources;        /* nonzero: writing the file failed (disk full, I/O) */
    const char *sop_class_uid;   /* Affected SOP Class UID from the request */
    const char *sop_instance_uid;/* Affected SOP Instance UID from the request */
    const char *calling_ae;      /* the peer's AE title */
    const char *peer_ip;
    /* Set when receiving succeeded: the file was checksummed while it was written. */
    const char *xxh128;          /* hex XXH3-128 of the whole file (cmn/crypto.h), or NULL */
    uint64_t file_bytes;         /* size of the file */
    void *stream;                /* the association's stream handle (opts.stream_open), or NULL */
    int kept;                    /* nonzero: the file's bytes are only in the stream handle's
                                    memory (stream_begin returned 1 and stream_data kept them) */
} edge_scp_store_t;

typedef struct {
    const char *ae_title;        /* our AE title; other called titles are rejected */
    const char *bind;            /* IPv4 address, "0.0.0.0" for all */
    const char *allowed_calling_aes; /* "A,B": only these calling AE titles; NULL/"" = any */
    const char *allowed_peers;   /* CIDR list (proto_cidr_list_allows); NULL/"" = any */
    int port;                    /* 0 = any free port (see edge_scp_port) */
    int max_associations;
    int acse_timeout_s;          /* association negotiation */
    int dimse_timeout_s;         /* idle inside an association */

    /**
     * Called on a worker thread before each C-STORE data set is received:
     * writes a unique temporary file name into path (len bytes) and returns
     * 0, or returns EDGE_STATUS_OUT_OF_RESOURCES to refuse the instance (the
     * data set is then read and discarded, and the SCU gets A700).
     */
    int (*store_begin)(void *ud, char *path, size_t len);
    /**
     * Called on a worker thread after the data set was received (or
     * receiving failed); returns the DIMSE status for the C-STORE response.
     * Must be thread-safe.
     */
    unsigned (*store_end)(void *ud, const edge_scp_store_t *st);
    /**
     * Optional: a sink that sees every byte of each received file as it is
     * written (the spool's streaming journal lanes). stream_open runs on the
     * worker at an association's first C-STORE and returns a handle (NULL =
     * none for this association); stream_begin(h) before each data set;
     * stream_data(h, buf, len) for the file's bytes in order; store_end gets
     * the handle as st->stream; stream_close(h) when the association ends.
     * A handle may keep the file's bytes in memory: stream_begin returns 1
     * and no temporary file is written, for as long as stream_data returns
     * 1; when it returns 0 the file is created, stream_spill(h, fd) writes
     * what was kept (the bytes before that call's) and the rest is written
     * as usual. stream_spill must be set where stream_begin may return 1.
     */
    void *(*stream_open)(void *ud);
    int (*stream_begin)(void *h);
    int (*stream_data)(void *h, const void *buf, size_t len);
    int (*stream_spill)(void *h, int fd);
    void (*stream_close)(void *h);
    void *ud;
} edge_scp_opts_t;

typedef struct edge_scp edge_scp_t;

/**
 * Loads DCMTK's dictionary check, configures the SCP and binds the
 * listening socket (so the port is known and clashes fail here).
 * 0 with *out set, or a negative error with a message in err.
 */
int edge_scp_create(const edge_scp_opts_t *opts, edge_scp_t **out, char *err, size_t errlen);

/** The bound TCP port. */
int edge_scp_port(const edge_scp_t *scp);

/** Starts the listener thread. 0 or a negative error. */
int edge_scp_start(edge_scp_t *scp);

/**
 * Stops accepting, refuses new associations and waits up to wait_ms for the
 * associations in progress to end. Blocking; not from a signal handler.
 * Returns the number of associations still running at the deadline.
 * Safe to call twice.
 */
int edge_scp_stop(edge_scp_t *scp, int wait_ms);

/** Frees the SCP (call edge_scp_stop first). */
void edge_scp_destroy(edge_scp_t *scp);

/** Number of storage SOP classes offered (for logs and tests). */
int edge_scp_num_sop_classes(void);

#ifdef __cplusplus
}
#endif

#endif /* EDGE_SCP_DCMTK_H */
