/*
 * main.c - yunying-cloud: command line, configuration, start and stop.
 *
 *   yunying-cloud [run] --config FILE [--check-config] [--dump-config]
 *   yunying-cloud edge-add --config FILE --id EDGE_ID [--allow CIDRS]
 *                                                         prints the secret
 *   yunying-cloud edge-allow --config FILE --id EDGE_ID --allow CIDRS  ("" = any)
 *   yunying-cloud edge-revoke-tokens --config FILE --id EDGE_ID
 *   yunying-cloud edge-disable --config FILE --id EDGE_ID (also revokes tokens)
 *   yunying-cloud edge-enable --config FILE --id EDGE_ID
 *   yunying-cloud user-add --config FILE --user NAME --password PASS
 *                          [--role doctor|admin]
 *   yunying-cloud retention-plan --config FILE [--json] [--limit N]
 *   yunying-cloud retention-apply --config FILE --confirm [--json] [--limit N]
 *   yunying-cloud scrub --config FILE [--limit N] [--json]   exit 1 on findings
 *   yunying-cloud storage-report --config FILE [--json]
 *
 * The archive (archive.c) is opened right after the configuration is
 * loaded, so --check-config also validates the S3 settings (and makes one
 * listing request to prove endpoint, bucket and credentials); the daemon
 * does the same before it listens.
 *
 * Running: one libuv loop serves HTTP; every route handler runs on the libuv
 * threadpool (SQLite, files, DCMTK), whose size is set here before the loop
 * starts. When listening, one line goes to stdout:
 *   yunying-cloud: listening http[s]://<bind>:<port>
 * (https when http.tls_cert_file and http.tls_key_file are set).
 * SIGTERM/SIGINT stop accepting, wait for handlers in flight, close the
 * index and exit 0.
 */
#include <errno.h>
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

#include "cmn/conf.h"
#include "cmn/dicom.h"
#include "cmn/errors.h"
#include "cmn/http.h"
#include "cmn/log.h"
#include "proto/proto.h"
#include "internal.h"
#include "manifest.h"

#define THREADPOOL_SIZE "8"   /* handlers are short; 8 keeps 2 cores busy across I/O waits */

static const cmn_conf_opt_t log_opts[] = {
    CMN_CONF_OPT_STR(cloud_log_conf_t, level, "info", "log level: error, warn, info or debug"),
};

static const cmn_conf_opt_t http_opts[] = {
    CMN_CONF_OPT_STR(cloud_http_conf_t, bind, "127.0.0.1", "listen address"),
    CMN_CONF_OPT_INT(cloud_http_conf_t, port, 8080, 0, 65535,
                     "listen port (0 = any free port, printed on the ready line)"),
    CMN_CONF_OPT_STR(cloud_http_conf_t, web_root, "cloud/web/dist",
                     "directory of the built web application"),
    CMN_CONF_OPT_INT(cloud_http_conf_t, max_body_mb, 80, 1, 1024,
                     "largest accepted request body (an upload chunk), MiB"),
    CMN_CONF_OPT_STR(cloud_http_conf_t, tls_cert_file, "",
                     "server certificate chain (PEM); with tls_key_file the listener is HTTPS"
                     " only; empty = plain HTTP"),
    CMN_CONF_OPT_STR(cloud_http_conf_t, tls_key_file, "", "private key of tls_cert_file (PEM)"),
    CMN_CONF_OPT_STR(cloud_http_conf_t, tls_client_ca_file, "",
                     "CA bundle (PEM) for client certificates: when set, every client must"
                     " present one (mutual TLS); an edge's certificate CN must be its id"),
    CMN_CONF_OPT_STR(cloud_http_conf_t, trusted_proxies, "",
                     "addresses of reverse proxies in front of this node (CIDR list, e.g."
                     " \"10.0.0.5/32,10.0.0.6/32\"): their X-Forwarded-For names the client"
                     " (edge allow lists, audit, logs); empty = none"),
};

static cmn_conf_section_t sections[] = {
    { "log", log_opts, CMN_ARRAY_SIZE(log_opts), offsetof(cloud_conf_t, log) },
    { "http", http_opts, CMN_ARRAY_SIZE(http_opts), offsetof(cloud_conf_t, http) },
    { "index", NULL, 0, offsetof(cloud_conf_t, index) },
    { "archive", NULL, 0, offsetof(cloud_conf_t, archive) },
    { "ingest", NULL, 0, offsetof(cloud_conf_t, ingest) },
    { "retention", NULL, 0, offsetof(cloud_conf_t, retention) },
    { "scrub", NULL, 0, offsetof(cloud_conf_t, scrub) },
};

static cloud_conf_t conf;
const cloud_conf_t *cloud_conf = &conf;

typedef struct {
    const char *cmd;             /* "run", "edge-add", "user-add" */
    const char *config;
    const char *id, *user, *password, *role, *allow, *limit;
    bool check, dump, confirm, json;
} args_t;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: yunying-cloud [run] --config FILE [--check-config] [--dump-config]\n"
            "       yunying-cloud edge-add --config FILE --id EDGE_ID [--allow CIDR,...]\n"
            "       yunying-cloud edge-allow --config FILE --id EDGE_ID --allow CIDR,...\n"
            "       yunying-cloud edge-revoke-tokens --config FILE --id EDGE_ID\n"
            "       yunying-cloud edge-disable --config FILE --id EDGE_ID\n"
            "       yunying-cloud edge-enable --config FILE --id EDGE_ID\n"
            "       yunying-cloud user-add --config FILE --user NAME --password PASS"
            " [--role doctor|admin]\n"
            "       yunying-cloud retention-plan --config FILE [--json] [--limit N]\n"
            "       yunying-cloud retention-apply --config FILE --confirm [--json] [--limit N]\n"
            "       yunying-cloud scrub --config FILE [--limit N] [--json]\n"
            "       yunying-cloud storage-report --config FILE [--json]\n"
            "       yunying-cloud uploads-gc --config FILE [--limit HOURS]\n");
}

static int parse_args(int argc, char **argv, args_t *a)
{
    int i = 1;

    memset(a, 0, sizeof(*a));
    a->cmd = "run";
    a->role = "doctor";
    if (i < argc && argv[i][0] != '-')
        a->cmd = argv[i++];
    if (strcmp(a->cmd, "run") != 0 && strcmp(a->cmd, "edge-add") != 0 &&
        strcmp(a->cmd, "edge-allow") != 0 && strcmp(a->cmd, "edge-revoke-tokens") != 0 &&
        strcmp(a->cmd, "edge-disable") != 0 && strcmp(a->cmd, "edge-enable") != 0 &&
        strcmp(a->cmd, "user-add") != 0 && strcmp(a->cmd, "retention-plan") != 0 &&
        strcmp(a->cmd, "retention-apply") != 0 && strcmp(a->cmd, "scrub") != 0 &&
        strcmp(a->cmd, "storage-report") != 0 && strcmp(a->cmd, "uploads-gc") != 0) {
        fprintf(stderr, "yunying-cloud: unknown command '%s'\n", a->cmd);
        return -1;
    }
    for (; i < argc; i++) {
        const char *o = argv[i];
        const char **dst = NULL;

        if (strcmp(o, "--check-config") == 0) {
            a->check = true;
            continue;
        }
        if (strcmp(o, "--dump-config") == 0) {
            a->dump = true;
            continue;
        }
        if (strcmp(o, "--confirm") == 0) {
            a->confirm = true;
            continue;
        }
        if (strcmp(o, "--json") == 0) {
            a->json = true;
            continue;
        }
        if (strcmp(o, "-h") == 0 || strcmp(o, "--help") == 0) {
            usage(stdout);
            exit(0);
        }
        if (strcmp(o, "--config") == 0)
            dst = &a->config;
        else if (strcmp(o, "--id") == 0)
            dst = &a->id;
        else if (strcmp(o, "--user") == 0)
            dst = &a->user;
        else if (strcmp(o, "--password") == 0)
            dst = &a->password;
        else if (strcmp(o, "--role") == 0)
            dst = &a->role;
        else if (strcmp(o, "--allow") == 0)
            dst = &a->allow;
        else if (strcmp(o, "--limit") == 0)
            dst = &a->limit;
        if (!dst || i + 1 >= argc) {
            fprintf(stderr, "yunying-cloud: %s '%s'\n", dst ? "missing value for" : "unknown option", o);
            return -1;
        }
        *dst = argv[++i];
    }
    return 0;
}

static int load_config(const args_t *a)
{
    char err[512];

    sections[2].opts = cloud__index_opts;
    sections[2].nopts = cloud__index_nopts;
    sections[3].opts = cloud__archive_opts;
    sections[3].nopts = cloud__archive_nopts;
    sections[4].opts = cloud__ingest_opts;
    sections[4].nopts = cloud__ingest_nopts;
    sections[5].opts = cloud__retention_opts;
    sections[5].nopts = cloud__retention_nopts;
    sections[6].opts = cloud__scrub_opts;
    sections[6].nopts = cloud__scrub_nopts;
    cmn_conf_defaults(sections, CMN_ARRAY_SIZE(sections), &conf);
    if (a->config &&
        cmn_conf_load(sections, CMN_ARRAY_SIZE(sections), &conf, a->config, err, sizeof(err)) < 0) {
        fprintf(stderr, "yunying-cloud: config: %s\n", err);
        return -1;
    }
    if (cmn_log_set_level_name(conf.log.level) < 0) {
        fprintf(stderr, "yunying-cloud: config: %s: log.level: '%s' is not one of error, warn,"
                        " info, debug\n", a->config ? a->config : "(defaults)", conf.log.level);
        return -1;
    }
    static const struct {
        const char *key;
        size_t off;
    } required[] = {
        { "http.bind", offsetof(cloud_conf_t, http.bind) },
        { "http.web_root", offsetof(cloud_conf_t, http.web_root) },
        { "index.path", offsetof(cloud_conf_t, index.path) },
        { "archive.dir", offsetof(cloud_conf_t, archive.dir) },
        { "ingest.staging_dir", offsetof(cloud_conf_t, ingest.staging_dir) },
    };
    for (size_t i = 0; i < CMN_ARRAY_SIZE(required); i++) {
        const char *v = *(char **)((char *)&conf + required[i].off);
        if (!v || !*v) {
            fprintf(stderr, "yunying-cloud: config: %s: %s: must not be empty\n",
                    a->config ? a->config : "(defaults)", required[i].key);
            return -1;
        }
    }
    if (conf.index.url && *conf.index.url && !cmn_sql_is_pg_target(conf.index.url)) {
        fprintf(stderr, "yunying-cloud: config: %s: index.url: must start with postgresql://"
                        " (or be empty for SQLite at index.path)\n",
                a->config ? a->config : "(defaults)");
        return -1;
    }
    char why[160];
    if (conf.http.trusted_proxies[0] &&
        proto_cidr_list_check(conf.http.trusted_proxies, why, sizeof(why)) < 0) {
        fprintf(stderr, "yunying-cloud: config: %s: http.trusted_proxies: %s\n",
                a->config ? a->config : "(defaults)", why);
        return -1;
    }
    bool has_cert = conf.http.tls_cert_file && *conf.http.tls_cert_file;
    bool has_key = conf.http.tls_key_file && *conf.http.tls_key_file;
    bool has_ca = conf.http.tls_client_ca_file && *conf.http.tls_client_ca_file;
    if (has_cert != has_key || (has_ca && !has_cert)) {
        fprintf(stderr, "yunying-cloud: config: %s: %s: set http.tls_cert_file and"
                        " http.tls_key_file together (tls_client_ca_file needs both)\n",
                a->config ? a->config : "(defaults)",
                has_cert ? "http.tls_key_file" : "http.tls_cert_file");
        return -1;
    }
    return 0;
}

static bool trusted_proxy(const char *addr, void *ud)
{
    return proto_cidr_list_allows(ud, addr);
}

static int dirname_mkdirs(const char *file)
{
    char dir[4096];
    const char *slash = strrchr(file, '/');

    if (!slash || slash == file)
        return 0;
    snprintf(dir, sizeof(dir), "%.*s", (int)(slash - file), file);
    return cmn_mkdirs(dir);
}

static int prepare_storage(void)
{
    char tmp[4096];
    int rc;

    snprintf(tmp, sizeof(tmp), "%s/.tmp", conf.ingest.staging_dir);
    if ((!cmn_sql_is_pg_target(cloud_index_target(&conf.index)) &&
         (rc = dirname_mkdirs(conf.index.path)) < 0) ||
        (rc = cmn_mkdirs(conf.archive.dir)) < 0 ||
        (rc = cmn_mkdirs(conf.ingest.staging_dir)) < 0 || (rc = cmn_mkdirs(tmp)) < 0) {
        fprintf(stderr, "yunying-cloud: cannot create data directories: %s\n", cmn_strerror(rc));
        return -1;
    }
    if (cloud_index_init(cloud_index_target(&conf.index)) < 0) {
        /* Never print the URI: it may hold a password. */
        fprintf(stderr, "yunying-cloud: cannot open the index %s\n",
                cmn_sql_is_pg_target(cloud_index_target(&conf.index)) ? "(index.url)"
                                                                       : conf.index.path);
        return -1;
    }
    return 0;
}

/* ---------------------------------------------------------- subcommands */

static bool edge_id_valid(const char *id)
{
    size_t n = id ? strlen(id) : 0;

    if (n == 0 || n > 64)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = id[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '-' || c == '_' || c == '.'))
            return false;
    }
    return true;
}

static bool check_edge_id(const args_t *a)
{
    if (!edge_id_valid(a->id)) {
        fprintf(stderr, "yunying-cloud: --id must be 1-64 characters of A-Z a-z 0-9 . _ -\n");
        return false;
    }
    return true;
}

static bool check_allow(const char *allow)
{
    char err[200];

    if (allow && strlen(allow) > 4096) {
        fprintf(stderr, "yunying-cloud: --allow: list too long\n");
        return false;
    }
    if (proto_cidr_list_check(allow, err, sizeof(err)) < 0) {
        fprintf(stderr, "yunying-cloud: --allow: %s\n", err);
        return false;
    }
    return true;
}

static int cmd_edge_add(const args_t *a)
{
    char secret[65];
    cmn_sql_t *db;
    int rc;

    if (!check_edge_id(a) || !check_allow(a->allow))
        return 2;
    db = cloud_index_get();
    rc = db ? cloud_index_edge_add(db, a->id, a->allow ? a->allow : "", secret) : CMN_EDB;
    cloud_index_put(db);
    if (rc == CMN_ECONFLICT) {
        fprintf(stderr, "yunying-cloud: edge '%s' already exists\n", a->id);
        return 1;
    }
    if (rc < 0) {
        fprintf(stderr, "yunying-cloud: edge-add failed: %s\n", cmn_strerror(rc));
        return 1;
    }
    printf("%s\n", secret);
    memset(secret, 0, sizeof(secret));
    return 0;
}

/* edge-allow, edge-revoke-tokens, edge-disable, edge-enable. */
static int cmd_edge_admin(const args_t *a)
{
    cmn_sql_t *db;
    int rc, n = 0;

    if (!check_edge_id(a))
        return 2;
    if (strcmp(a->cmd, "edge-allow") == 0 && (!a->allow || !check_allow(a->allow))) {
        if (!a->allow)
            fprintf(stderr, "yunying-cloud: edge-allow needs --allow CIDR,... (\"\" = any)\n");
        return 2;
    }
    db = cloud_index_get();
    if (!db) {
        rc = CMN_EDB;
    } else if (strcmp(a->cmd, "edge-allow") == 0) {
        rc = cloud_index_edge_set_allow(db, a->id, a->allow);
    } else if (strcmp(a->cmd, "edge-revoke-tokens") == 0) {
        rc = cloud_index_tokens_revoke(db, a->id, &n);
    } else {
        rc = cloud_index_edge_set_enabled(db, a->id, strcmp(a->cmd, "edge-enable") == 0, &n);
    }
    cloud_index_put(db);
    if (rc == CMN_ENOTFOUND) {
        fprintf(stderr, "yunying-cloud: no edge '%s'\n", a->id);
        return 1;
    }
    if (rc < 0) {
        fprintf(stderr, "yunying-cloud: %s failed: %s\n", a->cmd, cmn_strerror(rc));
        return 1;
    }
    if (strcmp(a->cmd, "edge-allow") == 0)
        printf("edge %s: allow list %s\n", a->id, *a->allow ? a->allow : "(any address)");
    else if (strcmp(a->cmd, "edge-revoke-tokens") == 0)
        printf("edge %s: %d token(s) revoked\n", a->id, n);
    else if (strcmp(a->cmd, "edge-disable") == 0)
        printf("edge %s: disabled, %d token(s) revoked\n", a->id, n);
    else
        printf("edge %s: enabled\n", a->id);
    CMN_LOG_I("cloud", "admin %s edge=%s", a->cmd, a->id);
    return 0;
}

static int cmd_user_add(const args_t *a)
{
    cmn_sql_t *db;
    int rc;

    if (!a->user || !*a->user || strlen(a->user) > CLOUD_USER_MAX || !a->password ||
        strlen(a->password) < 4) {
        fprintf(stderr, "yunying-cloud: user-add needs --user NAME and --password (4+ chars)\n");
        return 2;
    }
    if (strcmp(a->role, "doctor") != 0 && strcmp(a->role, "admin") != 0) {
        fprintf(stderr, "yunying-cloud: --role must be doctor or admin\n");
        return 2;
    }
    db = cloud_index_get();
    rc = db ? cloud_auth_user_add(db, a->user, a->password, a->role) : CMN_EDB;
    cloud_index_put(db);
    if (rc < 0) {
        fprintf(stderr, "yunying-cloud: user-add failed: %s\n", cmn_strerror(rc));
        return 1;
    }
    printf("user %s (%s) saved\n", a->user, a->role);
    return 0;
}

/* --limit N: 0 when absent; -1 when not a positive number. */
static long long parse_limit(const char *v)
{
    char *end;
    long long n;

    if (!v)
        return 0;
    errno = 0;
    n = strtoll(v, &end, 10);
    if (errno || *end || end == v || n <= 0)
        return -1;
    return n;
}

/* uploads-gc: open uploads older than --limit hours (default
 * ingest.abandon_after_h; "0h" is not a number --limit takes, so the tests
 * pass the env YY_GC_OLDER_THAN_S). */
static int cmd_uploads_gc(const args_t *a)
{
    long long hours = a->limit ? parse_limit(a->limit) : cloud_conf->ingest.abandon_after_h;
    const char *env = getenv("YY_GC_OLDER_THAN_S");
    int64_t secs = env && *env ? strtoll(env, NULL, 10) : hours * 3600;
    int total = 0, removed = 0;
    cmn_sql_t *db;

    if (hours < 0 || (!env && hours == 0)) {
        fprintf(stderr, "yunying-cloud: --limit must be a positive number of hours\n");
        return 2;
    }
    if (!(db = cloud_index_get()))
        return 1;
    do {
        if (cloud_ingest_gc(db, secs, 200, &removed) < 0) {
            cloud_index_put(db);
            fprintf(stderr, "yunying-cloud: uploads-gc failed (see the log)\n");
            return 1;
        }
        total += removed;
    } while (removed == 200);
    cloud_index_put(db);
    printf("removed %d abandoned upload(s) open for more than %lld s\n", total, (long long)secs);
    return 0;
}

static int cmd_maintenance(const args_t *a)
{
    long long limit = parse_limit(a->limit);

    if (limit < 0) {
        fprintf(stderr, "yunying-cloud: --limit must be a positive number\n");
        return 2;
    }
    if (strcmp(a->cmd, "storage-report") == 0)
        return cloud_storage_report_cmd(a->json);
    if (strcmp(a->cmd, "uploads-gc") == 0)
        return cmd_uploads_gc(a);
    if (cloud_archive_probe() < 0) {
        fprintf(stderr, "yunying-cloud: the archive is not reachable (see the log)\n");
        return 2;
    }
    if (strcmp(a->cmd, "scrub") == 0)
        return cloud_scrub_cmd(limit, a->json);
    return cloud_retention_cmd(strcmp(a->cmd, "retention-apply") == 0, a->confirm, a->json,
                               limit);
}

/* ------------------------------------------------------------------ run */

static struct {
    uv_loop_t loop;
    uv_signal_t sigterm;
    uv_signal_t sigint;
    cmn_http_server_t *srv;      /* owned; freed by cmn_http_server_close */
    bool stopping;
} app;

static void on_server_closed(void *ud)
{
    (void)ud;
    app.srv = NULL;
    uv_close((uv_handle_t *)&app.sigterm, NULL);
    uv_close((uv_handle_t *)&app.sigint, NULL);
}

static void on_signal(uv_signal_t *h, int signum)
{
    (void)h;
    if (app.stopping)
        return;
    app.stopping = true;
    CMN_LOG_I("cloud", "signal=%d stopping", signum);
    cloud_scrub_daemon_stop();
    uv_signal_stop(&app.sigterm);
    uv_signal_stop(&app.sigint);
    cmn_http_server_close(app.srv, on_server_closed, NULL);
}

static int cmd_run(void)
{
    char tmp_dir[4096];
    size_t big = (size_t)conf.http.max_body_mb << 20;
    const cmn_http_route_t routes[] = {
        { NULL, "/api/v1/objects", cloud_ingest_handle, NULL, big, true },
        { NULL, PROTO_TOKEN_PATH, cloud_ingest_handle, NULL, 4 << 10, true },
        /* manifests (manifest.c) and annotations: cloud_studies_handle dispatches */
        { NULL, "/api/v1/studies/", cloud_studies_handle, NULL, 6 << 20, true },
        { NULL, "/api/v1/", cloud_auth_handle, NULL, 64 << 10, true },
        { "POST", "/dicomweb/studies", cloud_stow_handle, NULL, CLOUD_STOW_MAX_BODY, true },
        { NULL, "/dicomweb", cloud_dicomweb_handle, NULL, 64 << 10, true },
        { NULL, "/wado", cloud_wado_uri_handle, NULL, 64 << 10, true },
        { NULL, "/", cloud_static_handle, NULL, 64 << 10, true },
    };
    cmn_http_server_opts_t opts;
    int rc;

    if (cmn_dicom_global_init() < 0) {
        fprintf(stderr, "yunying-cloud: DICOM dictionary not available\n");
        return 1;
    }
    if (cloud_archive_probe() < 0) {
        fprintf(stderr, "yunying-cloud: archive: S3 bucket %s not usable (see the log)\n",
                conf.archive.s3_bucket);
        return 1;
    }
    snprintf(tmp_dir, sizeof(tmp_dir), "%s/.tmp", conf.ingest.staging_dir);
    memset(&opts, 0, sizeof(opts));
    opts.host = conf.http.bind;
    opts.port = (int)conf.http.port;
    opts.tmp_dir = tmp_dir;   /* same file system as staging: chunks are linked, not copied */
    bool tls = conf.http.tls_cert_file[0] != '\0';
    if (tls) {
        opts.tls_cert_file = conf.http.tls_cert_file;
        opts.tls_key_file = conf.http.tls_key_file;
        if (conf.http.tls_client_ca_file[0])
            opts.tls_client_ca_file = conf.http.tls_client_ca_file;
    }
    if (conf.http.trusted_proxies[0]) {
        opts.trust_proxy = trusted_proxy;
        opts.trust_proxy_ud = conf.http.trusted_proxies;
    }

    rc = uv_loop_init(&app.loop);
    if (rc < 0) {
        fprintf(stderr, "yunying-cloud: loop: %s\n", uv_strerror(rc));
        return 1;
    }
    rc = cmn_http_server_create(&app.loop, &opts, routes, CMN_ARRAY_SIZE(routes), &app.srv);
    if (rc < 0) {
        fprintf(stderr, "yunying-cloud: cannot listen on %s:%lld: %s\n", conf.http.bind,
                conf.http.port, cmn_strerror(rc));
        uv_loop_close(&app.loop);
        return 1;
    }
    uv_signal_init(&app.loop, &app.sigterm);
    uv_signal_init(&app.loop, &app.sigint);
    uv_signal_start(&app.sigterm, on_signal, SIGTERM);
    uv_signal_start(&app.sigint, on_signal, SIGINT);
    if ((rc = cloud_scrub_daemon_start(&app.loop)) < 0)
        CMN_LOG_W("cloud", "periodic scrub not started: %s", uv_strerror(rc));

    CMN_LOG_I("cloud", "started port=%d tls=%s mtls=%s web_root=%s archive=%s backend=%s"
              " threadpool=%s", cmn_http_server_port(app.srv), tls ? "on" : "off",
              opts.tls_client_ca_file ? "on" : "off", conf.http.web_root, conf.archive.dir,
              conf.archive.backend, getenv("UV_THREADPOOL_SIZE"));
    printf("yunying-cloud: listening %s://%s:%d\n", tls ? "https" : "http", conf.http.bind,
           cmn_http_server_port(app.srv));
    fflush(stdout);

    uv_run(&app.loop, UV_RUN_DEFAULT);
    rc = uv_loop_close(&app.loop);
    if (rc < 0)
        CMN_LOG_W("cloud", "loop close: %s", uv_strerror(rc));
    CMN_LOG_I("cloud", "stopped");
    return 0;
}

int main(int argc, char **argv)
{
    args_t a;
    int rc;

    /* Before anything can start the threadpool; an operator's value wins. */
    setenv("UV_THREADPOOL_SIZE", THREADPOOL_SIZE, 0);
    signal(SIGPIPE, SIG_IGN);
    /* Response bodies of a few hundred KiB (a DICOM instance read by its
     * handler) are allocated on one thread and freed on the loop's. With
     * glibc's defaults each came from fresh pages (mmap, or an arena trimmed
     * after every free) and was faulted in again: 15% of a WADO-RS profile.
     * Fixed thresholds keep up to 8 MiB free per arena for reuse. */
    mallopt(M_MMAP_THRESHOLD, 4 << 20);
    mallopt(M_TRIM_THRESHOLD, 8 << 20);

    if (parse_args(argc, argv, &a) < 0) {
        usage(stderr);
        return 2;
    }
    if (load_config(&a) < 0) {
        cmn_conf_free(sections, CMN_ARRAY_SIZE(sections), &conf);
        return 1;
    }
    if (a.dump)
        cmn_conf_dump(sections, CMN_ARRAY_SIZE(sections), &conf, stdout);
    if (a.check) {
        /* The archive settings too: S3 configuration, secret file, bucket access. */
        rc = cloud_archive_open() < 0 || cloud_archive_probe() < 0;
        cloud_archive_shutdown();
        if (rc) {
            fprintf(stderr, "yunying-cloud: config: %s: archive: S3 settings not usable"
                            " (see the log)\n", a.config ? a.config : "(defaults)");
        } else if (!a.dump) {
            printf("yunying-cloud: config OK\n");
        }
        cmn_conf_free(sections, CMN_ARRAY_SIZE(sections), &conf);
        return rc ? 1 : 0;
    }
    if (a.dump) {
        cmn_conf_free(sections, CMN_ARRAY_SIZE(sections), &conf);
        return 0;
    }
    if (cloud_archive_open() < 0) {
        fprintf(stderr, "yunying-cloud: config: %s: archive: bad S3 settings (see the log)\n",
                a.config ? a.config : "(defaults)");
        cmn_conf_free(sections, CMN_ARRAY_SIZE(sections), &conf);
        return 1;
    }
    if (prepare_storage() < 0) {
        cloud_archive_shutdown();
        cmn_conf_free(sections, CMN_ARRAY_SIZE(sections), &conf);
        return 1;
    }
    if (strcmp(a.cmd, "edge-add") == 0)
        rc = cmd_edge_add(&a);
    else if (strncmp(a.cmd, "edge-", 5) == 0)
        rc = cmd_edge_admin(&a);
    else if (strcmp(a.cmd, "user-add") == 0)
        rc = cmd_user_add(&a);
    else if (strcmp(a.cmd, "run") != 0)
        rc = cmd_maintenance(&a);
    else
        rc = cmd_run();
    cloud_index_shutdown();
    cloud_archive_shutdown();
    cmn_conf_free(sections, CMN_ARRAY_SIZE(sections), &conf);
    return rc;
}
