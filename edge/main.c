/*
 * main.c - yunying-edge: command line, configuration, start and stop.
 *
 *   yunying-edge --config FILE [--check-config] [--dump-config]
 *   yunying-edge status --config FILE      (queue, throughput, alarms; read-only)
 *
 * Start: config (every module's table) -> DCMTK init -> spool (recovery)
 * -> SCP bound -> upload worker (schedule) -> status page -> SCP listening
 * -> ready line on stdout:
 *     yunying-edge: listening ae=<AE> port=<port>
 *
 * Stop (SIGTERM/SIGINT), edge state:
 *     RUNNING --signal--> STOPPING_SCP (threadpool: refuse new associations,
 *     wait for running ones) --> STOPPING_UPLOAD (status page closed, cancel
 *     requests, finish threadpool work) --> STOPPED (loop ends, spool closed,
 *     exit 0)
 */
#include <errno.h>
#include <pthread.h>
#include <arpa/inet.h>
#include <getopt.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "cmn/conf.h"
#include "cmn/dicom.h"
#include "cmn/errors.h"
#include "cmn/log.h"

#include "internal.h"
#include "scp.h"
#include "schedule.h"
#include "scp_dcmtk.h"
#include "spool.h"
#include "status.h"
#include "upload.h"

#define SCP_STOP_WAIT_MS 10000

const cmn_conf_opt_t edge__log_opts[] = {
    CMN_CONF_OPT_STR(edge_conf_log_t, level, "info", "error, warn, info or debug"),
};
const size_t edge__log_nopts = CMN_ARRAY_SIZE(edge__log_opts);

static const cmn_conf_section_t *sections(size_t *n)
{
    static cmn_conf_section_t secs[5];
    secs[0] = (cmn_conf_section_t){"log", edge__log_opts, 0, offsetof(edge_conf_t, log)};
    secs[0].nopts = edge__log_nopts;
    secs[1] = (cmn_conf_section_t){"scp", edge__scp_opts, 0, offsetof(edge_conf_t, scp)};
    secs[1].nopts = edge__scp_nopts;
    secs[2] = (cmn_conf_section_t){"spool", edge__spool_opts, 0, offsetof(edge_conf_t, spool)};
    secs[2].nopts = edge__spool_nopts;
    secs[3] = (cmn_conf_section_t){"upload", edge__upload_opts, 0, offsetof(edge_conf_t, upload)};
    secs[3].nopts = edge__upload_nopts;
    secs[4] = (cmn_conf_section_t){"status", edge__status_opts, 0, offsetof(edge_conf_t, status)};
    secs[4].nopts = edge__status_nopts;
    *n = CMN_ARRAY_SIZE(secs);
    return secs;
}

typedef enum {
    EDGE_RUNNING,
    EDGE_STOPPING_SCP,
    EDGE_STOPPING_UPLOAD,
    EDGE_STOPPED,
} edge_state_t;

typedef struct {
    uv_loop_t *loop;
    edge_state_t state;
    edge_conf_t conf;
    edge_spool_t *spool;
    edge_scp_t *scp;
    edge_upload_t *upload;           /* NULL when uploading is disabled */
    edge_schedule_t sched;           /* "schedule" of the config */
    edge_status_t *status;           /* NULL when the status page is off */
    edge_store_ctx_t store;
    uv_signal_t sigterm, sigint;
    uv_work_t stop_work;
    int scp_left;                    /* associations still running at the stop deadline */
    pthread_mutex_t notify_mu;       /* SCP threads vs. closing the uploader */
    bool notify_open;                /* guarded by notify_mu: upload may be woken */
} edge_t;

static void usage(FILE *out)
{
    fprintf(out,
            "usage: yunying-edge --config FILE [--check-config] [--dump-config]\n"
            "       yunying-edge status --config FILE\n"
            "       yunying-edge prepare-spool --config FILE\n"
            "  --config FILE    configuration file (JSON; see docs/edge.md)\n"
            "  --check-config   validate the configuration and exit\n"
            "  --dump-config    print the effective configuration (defaults filled in) and exit\n"
            "  status           print the upload queue, throughput, errors and alarms (reads\n"
            "                   the spool read-only; works while the daemon runs)\n"
            "  prepare-spool    write the spool's journal rings once, so the first images\n"
            "                   after installing are stored as fast as later ones (the\n"
            "                   service runs it before each start; seconds the first time,\n"
            "                   nothing after; refused while the daemon runs)\n");
}

/*
 * The "schedule" member is a list, which the option tables cannot express:
 * it is taken out of the file here (schedule.c parses it) and the rest goes
 * through the tables. 0, or CMN_ECONFIG with the message in err.
 */
static int load_sections(edge_conf_t *c, edge_schedule_t *sched, const char *path, char *err,
                         size_t errlen)
{
    size_t nsecs;
    const cmn_conf_section_t *secs = sections(&nsecs);
    json_error_t jerr;
    json_t *root, *js;
    char *text;
    int rc;

    edge_schedule_init(sched);
    root = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        snprintf(err, errlen, "%s:%d:%d: %s", path, jerr.line, jerr.column, jerr.text);
        return CMN_ECONFIG;
    }
    js = json_is_object(root) ? json_object_get(root, "schedule") : NULL;
    if (js) {
        char *stext = json_dumps(js, JSON_ENCODE_ANY | JSON_COMPACT);
        char serr[256];
        rc = stext ? edge_schedule_parse(stext, sched, serr, sizeof(serr)) : CMN_ECONFIG;
        free(stext);
        if (rc < 0) {
            snprintf(err, errlen, "%s: %s", path, stext ? serr : "schedule: out of memory");
            json_decref(root);
            return rc;
        }
        json_object_del(root, "schedule");
    }
    text = json_dumps(root, JSON_COMPACT);
    json_decref(root);
    if (!text) {
        snprintf(err, errlen, "%s: out of memory", path);
        return CMN_ECONFIG;
    }
    rc = cmn_conf_load_string(secs, nsecs, c, text, err, errlen);
    free(text);
    if (rc < 0 && strncmp(err, "<string>", 8) == 0) {
        char tail[512];
        snprintf(tail, sizeof(tail), "%s", err + 8);
        snprintf(err, errlen, "%s%s", path, tail);
    }
    return rc;
}

static int status_conf_check(const edge_conf_status_t *c, char *err, size_t errlen)
{
    struct in_addr a;

    if (c->port > 0 && (!c->bind || inet_pton(AF_INET, c->bind, &a) != 1)) {
        snprintf(err, errlen, "status.bind: '%s' is not an IPv4 address", c->bind ? c->bind : "");
        return CMN_ECONFIG;
    }
    return 0;
}

/* Loads and validates; prints "config: <file>: <section.key>: reason" on error. */
static int load_config(edge_conf_t *c, edge_schedule_t *sched, const char *path)
{
    size_t nsecs;
    const cmn_conf_section_t *secs = sections(&nsecs);
    char err[512];
    int rc;

    cmn_conf_defaults(secs, nsecs, c);
    err[0] = '\0';
    rc = load_sections(c, sched, path, err, sizeof(err));
    if (rc < 0) {
        if (strncmp(err, "config:", 7) == 0)
            fprintf(stderr, "%s\n", err);
        else if (strstr(err, path))
            fprintf(stderr, "config: %s\n", err);
        else
            fprintf(stderr, "config: %s: %s\n", path, err[0] ? err : cmn_strerror(rc));
        return rc;
    }
    if (cmn_log_set_level_name(c->log.level) < 0) {
        fprintf(stderr, "config: %s: log.level: '%s' is not error, warn, info or debug\n", path,
                c->log.level ? c->log.level : "");
        return CMN_ECONFIG;
    }
    if ((rc = edge__scp_conf_check(&c->scp, err, sizeof(err))) < 0 ||
        (rc = edge__spool_conf_check(&c->spool, err, sizeof(err))) < 0 ||
        (rc = edge__upload_conf_check(&c->upload, err, sizeof(err))) < 0 ||
        (rc = status_conf_check(&c->status, err, sizeof(err))) < 0) {
        fprintf(stderr, "config: %s: %s\n", path, err);
        return rc;
    }
    return 0;
}

/* Prints the effective configuration, the schedule included. */
static void dump_config(const edge_conf_t *c, const edge_schedule_t *sched)
{
    size_t nsecs, len = 0;
    const cmn_conf_section_t *secs = sections(&nsecs);
    char *text = NULL, stext[2048];
    FILE *mf = open_memstream(&text, &len);
    json_t *root = NULL, *js = NULL;

    if (mf) {
        cmn_conf_dump(secs, nsecs, c, mf);
        fclose(mf);
        root = json_loads(text, 0, NULL);
    }
    edge_schedule_format(sched, stext, sizeof(stext));
    js = json_loads(stext, JSON_DECODE_ANY, NULL);
    if (root && js) {
        json_object_set_new(root, "schedule", js);
        json_dumpf(root, stdout, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
        fputc('\n', stdout);
    } else {
        json_decref(js);
        fputs(text ? text : "", stdout);
    }
    json_decref(root);
    free(text);
}

/* ------------------------------------------------------------ stop */

static void on_handle_closed(uv_handle_t *h)
{
    (void)h;
}

static void finish_stop(void *ud)
{
    edge_t *e = ud;
    e->upload = NULL;
    e->status = NULL;
    e->state = EDGE_STOPPED;
    uv_close((uv_handle_t *)&e->sigterm, on_handle_closed);
    uv_close((uv_handle_t *)&e->sigint, on_handle_closed);
}

static void stop_upload(void *ud)
{
    edge_t *e = ud;

    e->status = NULL;
    if (e->upload)
        edge_upload_close(e->upload, finish_stop, e);
    else
        finish_stop(e);
}

static void stop_scp_work(uv_work_t *w)
{
    edge_t *e = container_of(w, edge_t, stop_work);
    e->scp_left = edge_scp_stop(e->scp, SCP_STOP_WAIT_MS);
}

static void stop_scp_done(uv_work_t *w, int status)
{
    edge_t *e = container_of(w, edge_t, stop_work);
    (void)status;
    if (e->scp_left > 0)
        CMN_LOG_W("edge", "%d association(s) still running at stop; their unfinished instances "
                  "were not acknowledged", e->scp_left);
    e->state = EDGE_STOPPING_UPLOAD;
    /* Associations that outlived the deadline must not wake a freed uploader. */
    pthread_mutex_lock(&e->notify_mu);
    e->notify_open = false;
    pthread_mutex_unlock(&e->notify_mu);
    if (e->status)
        edge_status_close(e->status, stop_upload, e);   /* its handlers read the uploader */
    else
        stop_upload(e);
}

static void on_signal(uv_signal_t *s, int signum)
{
    edge_t *e = s->data;

    if (e->state != EDGE_RUNNING) {
        CMN_LOG_I("edge", "signal %d: already stopping", signum);
        return;
    }
    CMN_LOG_I("edge", "signal %d: stopping", signum);
    e->state = EDGE_STOPPING_SCP;
    /* edge_scp_stop blocks (joins the listener, waits for associations). */
    if (uv_queue_work(e->loop, &e->stop_work, stop_scp_work, stop_scp_done) < 0) {
        e->scp_left = edge_scp_stop(e->scp, SCP_STOP_WAIT_MS);
        stop_scp_done(&e->stop_work, 0);
    }
}

/* ------------------------------------------------------------ main */

static void stored_notify(void *ud)
{
    edge_t *e = ud;

    pthread_mutex_lock(&e->notify_mu);
    if (e->notify_open && e->upload)
        edge_upload_wake(e->upload);
    pthread_mutex_unlock(&e->notify_mu);
}

static void set_threadpool_size(long long parallel)
{
    char buf[16];
    long long n = parallel + 3;
    if (n < 4)
        n = 4;
    if (n > 32)
        n = 32;
    snprintf(buf, sizeof(buf), "%lld", n);
    setenv("UV_THREADPOOL_SIZE", buf, 0);   /* an operator's setting wins */
}

/* yunying-edge prepare-spool: opens the spool (replaying what a crash
 * left), writes its journal rings once, closes it. 0 or negative. */
static int prepare_spool(const edge_conf_t *c)
{
    edge_spool_t *sp;
    uint64_t written = 0;
    int rings = 0;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int rc = edge_spool_open(c->spool.dir, 0, &sp);

    if (rc < 0) {
        fprintf(stderr, "yunying-edge: spool %s: %s%s\n", c->spool.dir, cmn_strerror(rc),
                rc == -EBUSY ? " (stop the running yunying-edge first)" : "");
        return rc;
    }
    rc = edge_spool_prepare(sp, &written, &rings);
    edge_spool_close(sp);
    if (rc < 0) {
        fprintf(stderr, "yunying-edge: preparing spool %s: %s\n", c->spool.dir, cmn_strerror(rc));
        return rc;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    if (written > 0)
        printf("spool %s: %d journal ring(s), %llu MiB written once in %.1f s\n", c->spool.dir,
               rings, (unsigned long long)(written >> 20),
               (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9);
    else
        printf("spool %s: %d journal ring(s), already prepared\n", c->spool.dir, rings);
    return 0;
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"config", required_argument, NULL, 'c'},
        {"check-config", no_argument, NULL, 'k'},
        {"dump-config", no_argument, NULL, 'd'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *config_path = NULL;
    bool check_only = false, dump = false;
    edge_t e;
    size_t nsecs;
    const cmn_conf_section_t *secs = sections(&nsecs);
    char err[512];
    int opt, rc, exit_code = 1;

    bool status_cmd = false, prepare_cmd = false;
    if (argc > 1 && (strcmp(argv[1], "status") == 0 || strcmp(argv[1], "prepare-spool") == 0)) {
        status_cmd = argv[1][0] == 's';
        prepare_cmd = !status_cmd;
        argv[1] = argv[0];
        argc--;
        argv++;
    }
    while ((opt = getopt_long(argc, argv, "c:h", longopts, NULL)) != -1) {
        switch (opt) {
        case 'c': config_path = optarg; break;
        case 'k': check_only = true; break;
        case 'd': dump = true; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (!config_path || optind != argc) {
        usage(stderr);
        return 2;
    }

    memset(&e, 0, sizeof(e));
    pthread_mutex_init(&e.notify_mu, NULL);
    if (load_config(&e.conf, &e.sched, config_path) < 0)
        goto out_conf;
    if (status_cmd) {
        cmn_log_set_level(CMN_LOG_ERROR);
        (void)edge__clock_init_from_env();   /* the schedule at the daemon's test time */
        exit_code = edge_status_print(&e.conf, &e.sched, stdout) < 0 ? 1 : 0;
        goto out_conf;
    }
    if (prepare_cmd) {
        exit_code = prepare_spool(&e.conf) < 0 ? 1 : 0;
        goto out_conf;
    }
    if (dump) {
        dump_config(&e.conf, &e.sched);
        fflush(stdout);
        exit_code = 0;
        goto out_conf;
    }
    if (check_only) {
        printf("config: %s: OK\n", config_path);
        exit_code = 0;
        goto out_conf;
    }

    signal(SIGPIPE, SIG_IGN);
    if (edge__clock_init_from_env())
        CMN_LOG_W("edge", "TEST CLOCK in use (YY_EDGE_TEST_CLOCK): time stands still except via "
                  "POST /debug/clock; never set this in production");
    set_threadpool_size(e.conf.upload.parallel + e.conf.upload.compress_parallel);
    e.loop = uv_default_loop();

    if (cmn_dicom_global_init() < 0) {
        fprintf(stderr, "yunying-edge: cannot initialise DCMTK (data dictionary missing?)\n");
        goto out_conf;
    }
    rc = edge_spool_open(e.conf.spool.dir, (uint64_t)e.conf.spool.min_free_mb << 20, &e.spool);
    if (rc < 0) {
        fprintf(stderr, "yunying-edge: spool %s: %s\n", e.conf.spool.dir, cmn_strerror(rc));
        goto out_conf;
    }
    edge_spool_set_quota(e.spool, e.conf.spool.max_mb > 0
                                      ? (uint64_t)e.conf.spool.max_mb << 20
                                      : (uint64_t)e.conf.spool.max_gb << 30);
    edge_spool_set_urgent(e.spool, e.conf.upload.urgent_calling_aes);
    edge_spool_set_cache(e.spool, (int64_t)e.conf.spool.keep_days * 86400000,
                         e.conf.spool.evict_headroom_mb > 0
                             ? (uint64_t)(e.conf.spool.min_free_mb + e.conf.spool.evict_headroom_mb)
                                   << 20
                             : 0);

    e.store.spool = e.spool;
    e.store.stored = stored_notify;
    e.store.stored_ud = &e;
    edge_spool_set_notify(e.spool, stored_notify, &e);   /* object files written again */
    edge_scp_opts_t so = {
        .ae_title = e.conf.scp.ae_title,
        .allowed_calling_aes = e.conf.scp.allowed_calling_aes,
        .allowed_peers = e.conf.scp.allowed_peers,
        .bind = e.conf.scp.bind,
        .port = (int)e.conf.scp.port,
        .max_associations = (int)e.conf.scp.max_associations,
        .acse_timeout_s = 30,
        .dimse_timeout_s = (int)e.conf.scp.dimse_timeout_s,
        .store_begin = edge__store_begin,
        .store_end = edge__store_end,
        .stream_open = edge__stream_open,
        .stream_begin = edge__stream_begin,
        .stream_data = edge__stream_data,
        .stream_spill = edge__stream_spill,
        .stream_close = edge__stream_close,
        .ud = &e.store,
    };
    rc = edge_scp_create(&so, &e.scp, err, sizeof(err));
    if (rc < 0) {
        fprintf(stderr, "yunying-edge: scp: %s\n", err);
        goto out_spool;
    }

    if (e.conf.upload.cloud_url && e.conf.upload.cloud_url[0]) {
        rc = edge_upload_create(e.loop, &e.conf.upload, e.spool, &e.upload, err, sizeof(err));
        if (rc < 0) {
            fprintf(stderr, "yunying-edge: upload: %s\n", err);
            goto out_scp;
        }
        edge_upload_set_schedule(e.upload, &e.sched);
    } else {
        CMN_LOG_W("edge", "upload.cloud_url is empty: instances are spooled but not uploaded");
    }

    uv_signal_init(e.loop, &e.sigterm);
    uv_signal_init(e.loop, &e.sigint);
    e.sigterm.data = e.sigint.data = &e;
    uv_signal_start(&e.sigterm, on_signal, SIGTERM);
    uv_signal_start(&e.sigint, on_signal, SIGINT);

    if (e.conf.status.port > 0) {
        edge_status_src_t ss = {
            .conf = &e.conf,
            .sched = &e.sched,
            .spool = e.spool,
            .upload = e.upload,
        };
        rc = edge_status_create(e.loop, &ss, &e.status, err, sizeof(err));
        if (rc < 0) {
            fprintf(stderr, "yunying-edge: %s\n", err);
            e.state = EDGE_STOPPING_SCP;
            stop_scp_done(&e.stop_work, 0);
            uv_run(e.loop, UV_RUN_DEFAULT);
            goto out_scp;
        }
        CMN_LOG_I("edge", "status page http://%s:%d/ (metrics at /metrics)",
                  e.conf.status.bind, edge_status_port(e.status));
    }

    rc = edge_scp_start(e.scp);
    if (rc < 0) {
        fprintf(stderr, "yunying-edge: scp: cannot start listener: %s\n", cmn_strerror(rc));
        e.state = EDGE_STOPPING_SCP;
        stop_scp_done(&e.stop_work, 0);
        uv_run(e.loop, UV_RUN_DEFAULT);
        goto out_scp;
    }
    e.state = EDGE_RUNNING;
    pthread_mutex_lock(&e.notify_mu);
    e.notify_open = true;
    pthread_mutex_unlock(&e.notify_mu);
    CMN_LOG_I("edge", "scp ae=%s bind=%s port=%d sop_classes=%d max_associations=%lld",
              e.conf.scp.ae_title, e.conf.scp.bind, edge_scp_port(e.scp),
              edge_scp_num_sop_classes(), e.conf.scp.max_associations);
    printf("yunying-edge: listening ae=%s port=%d\n", e.conf.scp.ae_title, edge_scp_port(e.scp));
    fflush(stdout);

    uv_run(e.loop, UV_RUN_DEFAULT);
    exit_code = 0;
    {
        edge_spool_counts_t c;
        if (edge_spool_counts(e.spool, &c) == 0)
            CMN_LOG_I("edge", "stopped: pending=%lld uploading=%lld done=%lld failed=%lld",
                      (long long)c.pending, (long long)c.uploading, (long long)c.done,
                      (long long)c.failed);
    }

out_scp:
    if (edge_scp_stop(e.scp, SCP_STOP_WAIT_MS) > 0 || e.scp_left > 0) {
        /* Worker threads still use the SCP and the spool: leave both to
         * the process exit rather than free them under the threads. */
        goto out_loop;
    }
    edge_scp_destroy(e.scp);
out_spool:
    edge_spool_close(e.spool);
out_loop:
    if (e.loop)
        uv_loop_close(e.loop);
out_conf:
    cmn_conf_free(secs, nsecs, &e.conf);
    return exit_code;
}
