/*
 * status.h - what the edge tells its operators: `yunying-edge status`
 * (reads the spool read-only, works while the daemon runs) and a local
 * HTTP status page with Prometheus metrics (config "status": {"bind",
 * "port"}; port 0 = off).
 *
 *   GET /             HTML page (refreshes itself every 5 s)
 *   GET /status.json  the same figures as JSON
 *   GET /metrics      Prometheus text format 0.0.4
 *   POST /debug/clock?ms=<unix ms>   sets the fake clock; exists only when
 *                     the edge runs with YY_EDGE_TEST_CLOCK (tests)
 *
 * Figures: queue depth by state, bytes pending, oldest pending age, last
 * success, errors by kind, throughput, schedule and bandwidth cap, spool
 * quota and alarms, compression; instances received (and when the last
 * one came) and C-STORE refusals by status. Nothing patient-identifying is shown: no
 * names, IDs or UIDs, only counts, sizes and times.
 */
#ifndef EDGE_STATUS_H
#define EDGE_STATUS_H

#include <stdio.h>
#include <uv.h>

#include "internal.h"
#include "schedule.h"
#include "spool.h"
#include "upload.h"

typedef struct edge_status edge_status_t;

/** Where the status server gets its figures; must outlive the server. */
typedef struct {
    const edge_conf_t *conf;
    const edge_schedule_t *sched;
    edge_spool_t *spool;
    edge_upload_t *upload;           /* NULL when uploading is disabled */
} edge_status_src_t;

/**
 * Starts the status server on loop (conf->status.port must not be 0).
 * 0 with *out set, or a negative error with a message in err.
 */
int edge_status_create(uv_loop_t *loop, const edge_status_src_t *src, edge_status_t **out,
                       char *err, size_t errlen);
int edge_status_port(const edge_status_t *st);
/** Stops serving (waits for handlers in flight); done(ud) runs on the loop. */
void edge_status_close(edge_status_t *st, void (*done)(void *ud), void *ud);

/**
 * `yunying-edge status`: opens conf's spool read-only and prints the report
 * to out. 0, or a negative error (message on stderr).
 */
int edge_status_print(const edge_conf_t *conf, const edge_schedule_t *sched, FILE *out);

#endif /* EDGE_STATUS_H */
