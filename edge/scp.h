/*
 * scp.h - what the edge does with each received instance (scp.c), between
 * the DCMTK shim (scp_dcmtk.h) and the spool (spool.h).
 *
 * For each C-STORE, on the SCP worker thread:
 *   begin:  refuse with A700 when the spool has less than spool.min_free_mb
 *           free; else hand out a unique temporary file name.
 *   end:    received file -> complete? (A700 if the write fell short)
 *           -> parses as DICOM with SOP/Study/Series UIDs? (C000 if not)
 *           -> UIDs match the request? (A900 if not)
 *           -> edge_spool_add: fsync, rename, fsync dir, row committed
 *              (A700 if that fails) -> wake the uploader -> 0x0000.
 *   Nothing is left in tmp/ after a failure; no row exists without its file.
 */
#ifndef EDGE_SCP_H
#define EDGE_SCP_H

#include <stddef.h>

#include "scp_dcmtk.h"
#include "spool.h"

typedef struct {
    edge_spool_t *spool;
    void (*stored)(void *ud);    /* called after each stored instance (thread-safe, e.g. uv_async_send) */
    void *stored_ud;
} edge_store_ctx_t;

/* Callbacks for edge_scp_opts_t; ud is an edge_store_ctx_t. */
int edge__store_begin(void *ud, char *path, size_t len);
unsigned edge__store_end(void *ud, const edge_scp_store_t *st);
/* The scp's stream callbacks: a streaming lane of the spool's journal. */
void *edge__stream_open(void *ud);
int edge__stream_begin(void *h);
int edge__stream_data(void *h, const void *buf, size_t len);
int edge__stream_spill(void *h, int fd);
void edge__stream_close(void *h);

#endif /* EDGE_SCP_H */
