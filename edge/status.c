/*
 * status.c - `yunying-edge status`, the status page and /metrics (status.h).
 *
 * Every figure comes from one snapshot (snap_t): the spool's statistics
 * (SQLite, the source of truth, so the command line and the page agree and
 * survive restarts) plus, in the daemon, the upload worker's live figures.
 * Handlers are blocking routes: they run on the threadpool and may query
 * SQLite.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cmn/buf.h"
#include "cmn/conf.h"
#include "cmn/errors.h"
#include "cmn/http.h"
#include "cmn/log.h"

#include "internal.h"
#include "status.h"
#include "token.h"

const cmn_conf_opt_t edge__status_opts[] = {
    CMN_CONF_OPT_STR(edge_conf_status_t, bind, "127.0.0.1",
                     "address of the status page and /metrics (keep it on loopback or the LAN)"),
    CMN_CONF_OPT_INT(edge_conf_status_t, port, 0, 0, 65535,
                     "TCP port of the status page and /metrics; 0 = disabled"),
};
const size_t edge__status_nopts = CMN_ARRAY_SIZE(edge__status_opts);

struct edge_status {
    edge_status_src_t src;
    cmn_http_server_t *srv;
    cmn_http_route_t routes[4];
    void (*done)(void *ud);
    void *done_ud;
};

typedef struct {
    int64_t now_ms;
    edge_spool_stats_t sp;
    edge_sched_state_t sched;
    bool have_live;
    edge_upload_live_t live;
    uint64_t quota_bytes;
    bool quota_full, disk_low;
    int objects_unwritten;           /* kept instances whose object file is not written yet */
    bool object_write_failing;       /* ... because writing failed: an alarm */
    bool clock_off;                  /* the edge's clock is off by > EDGE_CLOCK_ALARM_S */
} snap_t;

static uint64_t quota_of(const edge_conf_t *c)
{
    if (c->spool.max_mb > 0)
        return (uint64_t)c->spool.max_mb << 20;
    return (uint64_t)c->spool.max_gb << 30;
}

static int collect(const edge_status_src_t *src, edge_spool_t *sp, snap_t *s)
{
    int rc;

    memset(s, 0, sizeof(*s));
    s->now_ms = edge__wall_ms();
    rc = edge_spool_stats(sp, s->now_ms, &s->sp);
    if (rc < 0)
        return rc;
    edge_schedule_eval(src->sched, s->now_ms, &s->sched);
    s->quota_bytes = quota_of(src->conf);
    if (src->upload) {
        edge_upload_live(src->upload, &s->live);
        s->have_live = true;
        s->clock_off = s->live.clock_offset_s > EDGE_CLOCK_ALARM_S ||
                       s->live.clock_offset_s < -EDGE_CLOCK_ALARM_S;
    }
    if (src->spool) {
        edge_spool_alarms(src->spool, &s->quota_full, &s->disk_low);
        edge_spool_writer_state(src->spool, &s->objects_unwritten, &s->object_write_failing);
    } else {
        s->quota_full = s->quota_bytes > 0 && (uint64_t)s->sp.pending_bytes >= s->quota_bytes;
    }
    return 0;
}

static const char *fmt_age(int64_t ms, char *buf, size_t len)
{
    int64_t s = ms / 1000;
    if (s < 120)
        snprintf(buf, len, "%llds", (long long)s);
    else if (s < 7200)
        snprintf(buf, len, "%lldm%02llds", (long long)(s / 60), (long long)(s % 60));
    else if (s < 172800)
        snprintf(buf, len, "%lldh%02lldm", (long long)(s / 3600), (long long)(s % 3600 / 60));
    else
        snprintf(buf, len, "%lldd%02lldh", (long long)(s / 86400), (long long)(s % 86400 / 3600));
    return buf;
}

static const char *fmt_time(int64_t ms, char *buf, size_t len)
{
    time_t t = (time_t)(ms / 1000);
    struct tm tm;
    localtime_r(&t, &tm);
    strftime(buf, len, "%Y-%m-%d %H:%M:%S", &tm);
    return buf;
}

static double mib(int64_t b)
{
    return (double)b / 1048576.0;
}

/* The human report, for the command line and the HTML page. */
static void report(const edge_conf_t *conf, const edge_schedule_t *sched, const snap_t *s,
                   cmn_buf_t *b)
{
    char t1[64], t2[64], sch[600];
    const edge_spool_stats_t *sp = &s->sp;

    cmn_buf_appendf(b, "edge:             %s (AE %s)\n",
                   conf->upload.edge_id && conf->upload.edge_id[0] ? conf->upload.edge_id : "-",
                   conf->scp.ae_title);
    cmn_buf_appendf(b, "queue:            pending=%" PRId64 " uploading=%" PRId64
                   " failed=%" PRId64 " done=%" PRId64 "\n",
                   sp->counts.pending, sp->counts.uploading, sp->counts.failed, sp->counts.done);
    cmn_buf_appendf(b, "                  waiting for transcoding=%" PRId64 " urgent=%" PRId64 "\n",
                   sp->unprepared, sp->urgent_pending);
    cmn_buf_appendf(b, "bytes pending:    %.1f MiB to upload (%.1f MiB as received)\n",
                   mib(sp->upload_pending_bytes), mib(sp->pending_bytes));
    if (sp->oldest_pending_ms > 0)
        cmn_buf_appendf(b, "oldest pending:   %s old (received %s)\n",
                       fmt_age(s->now_ms - sp->oldest_pending_ms, t1, sizeof(t1)),
                       fmt_time(sp->oldest_pending_ms, t2, sizeof(t2)));
    else
        cmn_buf_appendf(b, "oldest pending:   - (queue empty)\n");
    if (sp->last_success_ms > 0)
        cmn_buf_appendf(b, "last success:     %s (%s ago)\n",
                       fmt_time(sp->last_success_ms, t1, sizeof(t1)),
                       fmt_age(s->now_ms - sp->last_success_ms, t2, sizeof(t2)));
    else
        cmn_buf_appendf(b, "last success:     never\n");
    cmn_buf_appendf(b, "throughput:       %.2f MB/s last 60 s, %.2f MB/s last 5 min"
                   " (DICOM as received: %.2f MB/s)\n",
                   (double)sp->done_bytes_60s / 60e6, (double)sp->done_bytes_300s / 300e6,
                   (double)sp->done_orig_bytes_60s / 60e6);
    cmn_buf_appendf(b, "uploaded:         %" PRId64 " instances, %.1f MiB sent as %.1f MiB"
                   " (%.1f MiB on the wire incl. retries)\n",
                   sp->uploaded_instances, mib(sp->original_bytes_done), mib(sp->uploaded_bytes),
                   mib(sp->bytes_sent));
    if (sp->last_received_ms > 0)
        cmn_buf_appendf(b, "received:         %" PRId64 " instances, the last %s (%s ago)\n",
                       sp->counts.pending + sp->counts.uploading + sp->counts.failed +
                           sp->counts.done,
                       fmt_time(sp->last_received_ms, t1, sizeof(t1)),
                       fmt_age(s->now_ms - sp->last_received_ms, t2, sizeof(t2)));
    else
        cmn_buf_appendf(b, "received:         none yet\n");
    cmn_buf_appendf(b, "refused (C-STORE):");
    if (sp->nrefused == 0)
        cmn_buf_appendf(b, " none");
    for (int i = 0; i < sp->nrefused; i++)
        cmn_buf_appendf(b, " %s=%" PRId64, sp->refused[i].status, sp->refused[i].count);
    cmn_buf_appendf(b, "%s\n", sp->nrefused ? "  (A700 no space, A900 UID mismatch, C000 bad"
                                               " data set; details in the log)" : "");
    cmn_buf_appendf(b, "errors by kind:  ");
    if (sp->nerr == 0)
        cmn_buf_appendf(b, " none");
    for (int i = 0; i < sp->nerr; i++)
        cmn_buf_appendf(b, " %s=%" PRId64, sp->err[i].kind, sp->err[i].count);
    cmn_buf_appendf(b, "\n");
    edge_schedule_format(sched, sch, sizeof(sch));
    cmn_buf_appendf(b, "schedule:         %s, %s", s->sched.open ? "OPEN" : "CLOSED", sch);
    if (s->sched.open && s->sched.rate_bps > 0)
        cmn_buf_appendf(b, ", cap %lld kbit/s", (long long)(s->sched.rate_bps * 8 / 1000));
    if (s->sched.change_in_ms >= 0)
        cmn_buf_appendf(b, ", changes in %s", fmt_age(s->sched.change_in_ms, t1, sizeof(t1)));
    cmn_buf_appendf(b, "\n");
    cmn_buf_appendf(b, "hot cache:        %" PRId64 " uploaded instance(s) kept, %.1f MiB",
                    sp->cached_instances, mib(sp->cached_bytes));
    if (sp->oldest_cached_ms > 0)
        cmn_buf_appendf(b, ", the oldest uploaded %s",
                        fmt_time(sp->oldest_cached_ms, t1, sizeof(t1)));
    cmn_buf_appendf(b, "; %" PRId64 " left the spool\n", sp->evicted_instances);
    if (s->quota_bytes > 0)
        cmn_buf_appendf(b, "spool quota:      %.1f of %.1f MiB used (%.0f%%)\n",
                       mib(sp->pending_bytes), mib((int64_t)s->quota_bytes),
                       100.0 * (double)sp->pending_bytes / (double)s->quota_bytes);
    else
        cmn_buf_appendf(b, "spool quota:      none (%.1f MiB waiting)\n", mib(sp->pending_bytes));
    if (s->have_live) {
        cmn_buf_appendf(b, "now:              %d uploading (%d waiting for bandwidth), "
                       "%d transcoding\n", s->live.jobs, s->live.pacing, s->live.preparing);
        if (s->live.jpegls_files > 0)
            cmn_buf_appendf(b, "compression:      %" PRIu64 " JPEG-LS, ratio %.2f, %.1f MB/s;"
                           " %" PRIu64 " sent as received\n", s->live.jpegls_files,
                           (double)s->live.jpegls_bytes_in /
                               (double)(s->live.jpegls_bytes_out ? s->live.jpegls_bytes_out : 1),
                           s->live.jpegls_usec ? (double)s->live.jpegls_bytes_in /
                                                     (double)s->live.jpegls_usec : 0.0,
                           s->live.originals);
        if (s->live.clock_offset_s > 2 || s->live.clock_offset_s < -2)
            cmn_buf_appendf(b, "cloud clock:      %+" PRId64 " s from the edge's clock (beyond"
                           " the cloud's window, requests are signed with the cloud's time)\n",
                           s->live.clock_offset_s);
    }
    if (s->quota_full)
        cmn_buf_appendf(b, "ALARM:            spool quota full - new images are refused (A700)\n");
    if (s->disk_low)
        cmn_buf_appendf(b, "ALARM:            spool disk below spool.min_free_mb - new images are "
                       "refused (A700)\n");
    if (s->object_write_failing)
        cmn_buf_appendf(b, "ALARM:            object files cannot be written to the spool (%d "
                       "waiting; safe in the journal; retried every second) - check the spool's "
                       "disk and the log\n", s->objects_unwritten);
    if (s->clock_off)
        cmn_buf_appendf(b, "ALARM:            the edge's clock is %" PRId64 " s %s the cloud's - fix"
                       " its time synchronisation (NTP); uploads carry on meanwhile\n",
                       s->live.clock_offset_s > 0 ? s->live.clock_offset_s
                                                  : -s->live.clock_offset_s,
                       s->live.clock_offset_s > 0 ? "behind" : "ahead of");
    if (sp->counts.failed > 0)
        cmn_buf_appendf(b, "WARNING:          %" PRId64 " instance(s) FAILED (spooled file lost or "
                       "corrupt); see last_error in spool.db\n", sp->counts.failed);
}

int edge_status_print(const edge_conf_t *conf, const edge_schedule_t *sched, FILE *out)
{
    edge_status_src_t src = {.conf = conf, .sched = sched};
    edge_spool_t *sp;
    cmn_buf_t b;
    snap_t s;
    int rc;

    rc = edge_spool_open_readonly(conf->spool.dir, &sp);
    if (rc < 0) {
        fprintf(stderr, "yunying-edge status: cannot open the spool in %s: %s\n", conf->spool.dir,
                cmn_strerror(rc));
        return rc;
    }
    rc = collect(&src, sp, &s);
    edge_spool_close(sp);
    if (rc < 0) {
        fprintf(stderr, "yunying-edge status: cannot read the spool: %s\n", cmn_strerror(rc));
        return rc;
    }
    cmn_buf_init(&b, 1 << 20);
    report(conf, sched, &s, &b);
    fwrite(b.data, 1, b.len, out);
    cmn_buf_free(&b);
    return 0;
}

/* ------------------------------------------------------------ HTTP */

static void metric(cmn_buf_t *b, const char *name, const char *type, const char *help,
                   const char *labels, double v)
{
    if (help)
        cmn_buf_appendf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
    cmn_buf_appendf(b, "%s%s %.17g\n", name, labels ? labels : "", v);
}

static void metrics_text(const snap_t *s, cmn_buf_t *b)
{
    const edge_spool_stats_t *sp = &s->sp;
    char lab[96];

    metric(b, "yy_edge_queue_depth", "gauge", "Spooled instances by state.",
           "{state=\"pending\"}", (double)sp->counts.pending);
    metric(b, "yy_edge_queue_depth", NULL, NULL, "{state=\"uploading\"}",
           (double)sp->counts.uploading);
    metric(b, "yy_edge_queue_depth", NULL, NULL, "{state=\"failed\"}", (double)sp->counts.failed);
    metric(b, "yy_edge_queue_depth", NULL, NULL, "{state=\"done\"}", (double)sp->counts.done);
    metric(b, "yy_edge_unprepared", "gauge", "Pending instances waiting for transcoding.", NULL,
           (double)sp->unprepared);
    metric(b, "yy_edge_urgent_pending", "gauge", "Urgent instances not uploaded yet.", NULL,
           (double)sp->urgent_pending);
    metric(b, "yy_edge_bytes_pending", "gauge", "Bytes still to upload.", NULL,
           (double)sp->upload_pending_bytes);
    metric(b, "yy_edge_spool_pending_bytes", "gauge",
           "Bytes of received instances not uploaded yet (counted against the quota).", NULL,
           (double)sp->pending_bytes);
    metric(b, "yy_edge_spool_quota_bytes", "gauge", "Spool quota; 0 = none.", NULL,
           (double)s->quota_bytes);
    metric(b, "yy_edge_oldest_pending_age_seconds", "gauge",
           "Age of the oldest instance not uploaded yet; 0 = none.", NULL,
           sp->oldest_pending_ms ? (double)(s->now_ms - sp->oldest_pending_ms) / 1000.0 : 0.0);
    metric(b, "yy_edge_last_success_timestamp_seconds", "gauge",
           "Unix time of the last confirmed upload; 0 = never.", NULL,
           (double)sp->last_success_ms / 1000.0);
    metric(b, "yy_edge_uploaded_instances_total", "counter", "Instances confirmed by the cloud.",
           NULL, (double)sp->uploaded_instances);
    metric(b, "yy_edge_uploaded_bytes_total", "counter", "Bytes of uploaded files.", NULL,
           (double)sp->uploaded_bytes);
    metric(b, "yy_edge_uploaded_original_bytes_total", "counter",
           "Bytes of the uploaded instances as received.", NULL, (double)sp->original_bytes_done);
    metric(b, "yy_edge_upload_sent_bytes_total", "counter",
           "Chunk bytes sent, retries included (recorded per attempt).", NULL,
           (double)sp->bytes_sent);
    metric(b, "yy_edge_upload_throughput_bytes_per_second", "gauge",
           "Uploaded file bytes per second over the last 60 s.", NULL,
           (double)sp->done_bytes_60s / 60.0);
    metric(b, "yy_edge_received_instances_total", "counter",
           "Instances received and spooled (rows in the spool).", NULL,
           (double)(sp->counts.pending + sp->counts.uploading + sp->counts.failed +
                    sp->counts.done));
    metric(b, "yy_edge_last_received_timestamp_seconds", "gauge",
           "When the newest instance was received (unix time; 0 = never).", NULL,
           (double)sp->last_received_ms / 1000.0);
    cmn_buf_appendf(b, "# HELP yy_edge_scp_refused_total C-STORE requests refused, by the"
                    " DIMSE status answered.\n# TYPE yy_edge_scp_refused_total counter\n");
    for (int i = 0; i < sp->nrefused; i++) {
        char rl[48];
        snprintf(rl, sizeof(rl), "{status=\"%s\"}", sp->refused[i].status);
        metric(b, "yy_edge_scp_refused_total", NULL, NULL, rl, (double)sp->refused[i].count);
    }
    cmn_buf_appendf(b, "# HELP yy_edge_upload_errors_total Upload errors by kind.\n"
                    "# TYPE yy_edge_upload_errors_total counter\n");
    for (int i = 0; i < sp->nerr; i++) {
        snprintf(lab, sizeof(lab), "{kind=\"%s\"}", sp->err[i].kind);
        metric(b, "yy_edge_upload_errors_total", NULL, NULL, lab, (double)sp->err[i].count);
    }
    metric(b, "yy_edge_alarm", "gauge", "1 while an alarm is raised.", "{kind=\"quota_full\"}",
           s->quota_full ? 1 : 0);
    metric(b, "yy_edge_alarm", NULL, NULL, "{kind=\"disk_low\"}", s->disk_low ? 1 : 0);
    metric(b, "yy_edge_alarm", NULL, NULL, "{kind=\"object_write\"}",
           s->object_write_failing ? 1 : 0);
    metric(b, "yy_edge_alarm", NULL, NULL, "{kind=\"clock\"}", s->clock_off ? 1 : 0);
    metric(b, "yy_edge_cache_instances", "gauge",
           "Uploaded instances whose files are still in the spool (the hot cache).", NULL,
           (double)sp->cached_instances);
    metric(b, "yy_edge_cache_bytes", "gauge", "Their files' bytes.", NULL,
           (double)sp->cached_bytes);
    metric(b, "yy_edge_evicted_instances_total", "counter",
           "Uploaded instances whose files left the spool (spool.keep_days, disk space).", NULL,
           (double)sp->evicted_instances);
    metric(b, "yy_edge_objects_unwritten", "gauge",
           "Acknowledged instances whose object file is not written yet (kept in memory,"
           " written just after the acknowledgement).", NULL, (double)s->objects_unwritten);
    metric(b, "yy_edge_schedule_open", "gauge", "1 while an upload window is open.", NULL,
           s->sched.open ? 1 : 0);
    metric(b, "yy_edge_upload_rate_limit_bytes_per_second", "gauge",
           "Bandwidth cap of the open window; 0 = none.", NULL,
           s->sched.open ? (double)s->sched.rate_bps : 0.0);
    if (s->have_live) {
        metric(b, "yy_edge_upload_jobs", "gauge", "Instances being uploaded.", NULL,
               s->live.jobs);
        metric(b, "yy_edge_upload_pacing", "gauge",
               "Uploads waiting for bandwidth (token bucket).", NULL, s->live.pacing);
        metric(b, "yy_edge_upload_bucket_bytes", "gauge", "Token bucket level (negative = debt).",
               NULL, (double)s->live.tokens);
        metric(b, "yy_edge_upload_process_sent_bytes_total", "counter",
               "Chunk bytes sent by this process since it started.", NULL,
               (double)s->live.bytes_sent);
        metric(b, "yy_edge_transcoding", "gauge", "Instances being transcoded.", NULL,
               s->live.preparing);
        metric(b, "yy_edge_jpegls_files_total", "counter", "Instances transcoded to JPEG-LS.",
               NULL, (double)s->live.jpegls_files);
        metric(b, "yy_edge_jpegls_bytes_in_total", "counter", "Their bytes as received.", NULL,
               (double)s->live.jpegls_bytes_in);
        metric(b, "yy_edge_jpegls_bytes_out_total", "counter", "Their bytes as JPEG-LS.", NULL,
               (double)s->live.jpegls_bytes_out);
        metric(b, "yy_edge_prepared_original_total", "counter",
               "Instances sent as received (not transcodable or compression off).", NULL,
               (double)s->live.originals);
        metric(b, "yy_edge_cloud_clock_offset_seconds", "gauge",
               "The cloud's clock minus the edge's, from its last answer (0 = none yet).",
               NULL, (double)s->live.clock_offset_s);
    }
}

static void json_text(const snap_t *s, cmn_buf_t *b)
{
    const edge_spool_stats_t *sp = &s->sp;

    cmn_buf_appendf(b, "{\"now_ms\":%" PRId64 ",\"pending\":%" PRId64 ",\"uploading\":%" PRId64
                   ",\"failed\":%" PRId64 ",\"done\":%" PRId64 ",\"unprepared\":%" PRId64
                   ",\"urgent_pending\":%" PRId64 ",\"bytes_pending\":%" PRId64
                   ",\"spool_pending_bytes\":%" PRId64 ",\"quota_bytes\":%" PRIu64
                   ",\"oldest_pending_ms\":%" PRId64 ",\"last_success_ms\":%" PRId64
                   ",\"uploaded_instances\":%" PRId64 ",\"uploaded_bytes\":%" PRId64
                   ",\"bytes_sent\":%" PRId64 ",\"throughput_bps_60s\":%.1f"
                   ",\"quota_full\":%s,\"disk_low\":%s,\"object_write_failing\":%s"
                   ",\"clock_alarm\":%s"
                   ",\"objects_unwritten\":%d,\"cached_instances\":%" PRId64
                   ",\"cached_bytes\":%" PRId64 ",\"evicted_instances\":%" PRId64
                   ",\"schedule_open\":%s"
                   ",\"rate_limit_bps\":%" PRId64 ",\"errors\":{",
                   s->now_ms, sp->counts.pending, sp->counts.uploading, sp->counts.failed,
                   sp->counts.done, sp->unprepared, sp->urgent_pending, sp->upload_pending_bytes,
                   sp->pending_bytes, s->quota_bytes, sp->oldest_pending_ms, sp->last_success_ms,
                   sp->uploaded_instances, sp->uploaded_bytes, sp->bytes_sent,
                   (double)sp->done_bytes_60s / 60.0, s->quota_full ? "true" : "false",
                   s->disk_low ? "true" : "false", s->object_write_failing ? "true" : "false",
                   s->clock_off ? "true" : "false", s->objects_unwritten, sp->cached_instances,
                   sp->cached_bytes, sp->evicted_instances, s->sched.open ? "true" : "false",
                   s->sched.open ? s->sched.rate_bps : 0);
    for (int i = 0; i < sp->nerr; i++)
        cmn_buf_appendf(b, "%s\"%s\":%" PRId64, i ? "," : "", sp->err[i].kind, sp->err[i].count);
    cmn_buf_appendf(b, "},\"last_received_ms\":%" PRId64 ",\"refused\":{", sp->last_received_ms);
    for (int i = 0; i < sp->nrefused; i++)
        cmn_buf_appendf(b, "%s\"%s\":%" PRId64, i ? "," : "", sp->refused[i].status,
                        sp->refused[i].count);
    cmn_buf_appendf(b, "}");
    if (s->have_live)
        cmn_buf_appendf(b, ",\"live\":{\"jobs\":%d,\"pacing\":%d,\"preparing\":%d,\"tokens\":%"
                       PRId64 ",\"bytes_sent\":%" PRIu64 ",\"jpegls_files\":%" PRIu64
                       ",\"jpegls_bytes_in\":%" PRIu64 ",\"jpegls_bytes_out\":%" PRIu64
                       ",\"originals\":%" PRIu64 ",\"clock_offset_s\":%" PRId64
                       ",\"cache_pass_ms\":%" PRId64 "}",
                       s->live.jobs, s->live.pacing, s->live.preparing, s->live.tokens,
                       s->live.bytes_sent, s->live.jpegls_files, s->live.jpegls_bytes_in,
                       s->live.jpegls_bytes_out, s->live.originals, s->live.clock_offset_s,
                       s->live.cache_pass_ms);
    cmn_buf_appendf(b, "}\n");
}

static void html_escape_into(cmn_buf_t *b, const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        switch (p[i]) {
        case '<': cmn_buf_appendf(b, "&lt;"); break;
        case '>': cmn_buf_appendf(b, "&gt;"); break;
        case '&': cmn_buf_appendf(b, "&amp;"); break;
        default: cmn_buf_append(b, &p[i], 1); break;
        }
    }
}

static void on_request(const cmn_http_req_t *req, cmn_http_resp_t *resp)
{
    edge_status_t *st = req->route_ud;
    cmn_buf_t b, txt;
    snap_t s;

    if (strcmp(req->method, "GET") != 0 && strcmp(req->method, "HEAD") != 0) {
        cmn_http_resp_simple(resp, 405, "text/plain", "GET only\n", 9);
        return;
    }
    if (strcmp(req->path, "/") && strcmp(req->path, "/metrics") &&
        strcmp(req->path, "/status.json")) {
        cmn_http_resp_simple(resp, 404, "text/plain", "not found\n", 10);
        return;
    }
    if (collect(&st->src, st->src.spool, &s) < 0) {
        cmn_http_resp_simple(resp, 503, "text/plain", "spool unavailable\n", 18);
        return;
    }
    cmn_buf_init(&b, 1 << 20);
    if (!strcmp(req->path, "/metrics")) {
        metrics_text(&s, &b);
        cmn_http_resp_simple(resp, 200, "text/plain; version=0.0.4", b.data, b.len);
    } else if (!strcmp(req->path, "/status.json")) {
        json_text(&s, &b);
        cmn_http_resp_simple(resp, 200, "application/json", b.data, b.len);
    } else {
        cmn_buf_init(&txt, 1 << 20);
        report(st->src.conf, st->src.sched, &s, &txt);
        cmn_buf_appendf(&b, "<!doctype html><html><head><meta charset=\"utf-8\">"
                       "<meta http-equiv=\"refresh\" content=\"5\">"
                       "<title>yunying-edge status</title></head><body>"
                       "<h1>yunying-edge %s</h1>%s<pre>",
                       s.quota_full || s.disk_low || s.object_write_failing || s.clock_off
                           ? "- ALARM" : "",
                       s.sched.open ? "" : "<p>Upload window closed.</p>");
        html_escape_into(&b, txt.data ? txt.data : "", txt.len);
        cmn_buf_appendf(&b, "</pre><p><a href=\"/metrics\">/metrics</a> "
                       "<a href=\"/status.json\">/status.json</a></p></body></html>\n");
        cmn_buf_free(&txt);
        cmn_http_resp_simple(resp, 200, "text/html; charset=utf-8", b.data, b.len);
    }
    cmn_buf_free(&b);
}

/* POST /debug/clock?ms=N - only routed with the fake clock (tests). */
static void on_debug_clock(const cmn_http_req_t *req, cmn_http_resp_t *resp)
{
    edge_status_t *st = req->route_ud;
    const char *cur = req->query;
    char k[16], v[32];
    long long ms = -1;

    while (cmn_http_query_next(&cur, k, sizeof(k), v, sizeof(v)) == 1) {
        if (!strcmp(k, "ms")) {
            char *end;
            ms = strtoll(v, &end, 10);
            if (*end)
                ms = -1;
        }
    }
    if (ms <= 0) {
        cmn_http_resp_simple(resp, 400, "text/plain", "ms=<unix ms> expected\n", 22);
        return;
    }
    edge__clock_set(ms);
    CMN_LOG_I("edge", "test clock set to %lld", ms);
    if (st->src.upload)
        edge_upload_wake(st->src.upload);
    cmn_http_resp_simple(resp, 204, "text/plain", "", 0);
}

int edge_status_create(uv_loop_t *loop, const edge_status_src_t *src, edge_status_t **out,
                       char *err, size_t errlen)
{
    edge_status_t *st = cmn_xcalloc(1, sizeof(*st));
    size_t nr = 0;
    int rc;

    st->src = *src;
    if (edge__clock_is_fake())
        st->routes[nr++] = (cmn_http_route_t){"POST", "/debug/clock", on_debug_clock, st, 0,
                                              false};
    st->routes[nr++] = (cmn_http_route_t){NULL, "/", on_request, st, 0, true};
    cmn_http_server_opts_t so = {
        .host = src->conf->status.bind,
        .port = (int)src->conf->status.port,
        .max_connections = 32,
    };
    rc = cmn_http_server_create(loop, &so, st->routes, nr, &st->srv);
    if (rc < 0) {
        snprintf(err, errlen, "status.port: cannot listen on %s:%lld: %s", src->conf->status.bind,
                 src->conf->status.port, cmn_strerror(rc));
        free(st);
        return rc;
    }
    *out = st;
    return 0;
}

int edge_status_port(const edge_status_t *st)
{
    return cmn_http_server_port(st->srv);
}

static void on_server_closed(void *ud)
{
    edge_status_t *st = ud;
    void (*done)(void *) = st->done;
    void *dud = st->done_ud;

    free(st);
    if (done)
        done(dud);
}

void edge_status_close(edge_status_t *st, void (*done)(void *ud), void *ud)
{
    st->done = done;
    st->done_ud = ud;
    cmn_http_server_close(st->srv, on_server_closed, st);
}
