/*
 * static.c - serves the web bundle from http.web_root.
 *
 * GET/HEAD only. The URL path is percent-decoded and refused (404) when any
 * segment is empty of meaning or dangerous (".", "..", hidden names, NUL,
 * backslash); the resolved file must also lie inside the root after symlinks
 * are followed. Paths without a file extension that name no file get
 * index.html (the single-page app routes on the client). Vite's hashed
 * assets (/assets/...) are cached for a year; everything else is revalidated.
 */
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#include "cmn/errors.h"
#include "cmn/log.h"
#include "internal.h"

static const struct {
    const char *ext;
    const char *type;
} types[] = {
    { "html", "text/html; charset=utf-8" },
    { "js", "text/javascript; charset=utf-8" },
    { "mjs", "text/javascript; charset=utf-8" },
    { "css", "text/css; charset=utf-8" },
    { "json", "application/json" },
    { "map", "application/json" },
    { "webmanifest", "application/manifest+json" },
    { "svg", "image/svg+xml" },
    { "png", "image/png" },
    { "jpg", "image/jpeg" },
    { "jpeg", "image/jpeg" },
    { "gif", "image/gif" },
    { "webp", "image/webp" },
    { "ico", "image/x-icon" },
    { "wasm", "application/wasm" },
    { "woff", "font/woff" },
    { "woff2", "font/woff2" },
    { "ttf", "font/ttf" },
    { "txt", "text/plain; charset=utf-8" },
};

static const char *content_type(const char *path)
{
    const char *slash = strrchr(path, '/');
    const char *dot = strrchr(slash ? slash : path, '.');

    if (dot)
        for (size_t i = 0; i < CMN_ARRAY_SIZE(types); i++)
            if (strcasecmp(dot + 1, types[i].ext) == 0)
                return types[i].type;
    return "application/octet-stream";
}

static bool path_safe(const char *p)
{
    if (*p != '/' || strchr(p, '\\'))
        return false;
    for (const char *s = p; *s;) {
        size_t n;

        while (*s == '/')
            s++;
        n = strcspn(s, "/");
        if (n > 0 && s[0] == '.')
            return false;   /* ".", "..", and hidden files */
        s += n;
    }
    return true;
}

static void not_found(cmn_http_resp_t *resp)
{
    static const char msg[] = "not found\n";
    cmn_http_resp_simple(resp, 404, "text/plain; charset=utf-8", msg, sizeof(msg) - 1);
}

/*
 * Serves root+rel if it is a regular file inside root. When gzip is true and
 * the build wrote a gzip twin (rel + ".gz", see cloud/web/scripts/
 * precompress.mjs) that is not older than the file, the twin is sent with
 * Content-Encoding: gzip. 0, or CMN_ENOTFOUND.
 */
static int serve(cmn_http_resp_t *resp, const char *root_real, const char *rel, bool immutable,
                 bool gzip)
{
    char full[PATH_MAX + 64], real[PATH_MAX], twin[PATH_MAX + 4];
    size_t rl = strlen(root_real);
    struct stat sb, zb;
    const char *send = NULL;

    if (snprintf(full, sizeof(full), "%s%s", root_real, rel) >= (int)sizeof(full))
        return CMN_ENOTFOUND;
    if (!realpath(full, real) || strncmp(real, root_real, rl) != 0 || real[rl] != '/')
        return CMN_ENOTFOUND;
    if (stat(real, &sb) < 0 || !S_ISREG(sb.st_mode))
        return CMN_ENOTFOUND;
    if (snprintf(twin, sizeof(twin), "%s.gz", real) < (int)sizeof(twin) &&
        stat(twin, &zb) == 0 && S_ISREG(zb.st_mode) && zb.st_mtime >= sb.st_mtime)
        send = twin;
    cmn_http_resp_status(resp, 200);
    cmn_http_resp_header(resp, "Content-Type", content_type(real));
    cmn_http_resp_header(resp, "Cache-Control",
                         immutable ? "public, max-age=31536000, immutable" : "no-cache");
    cmn_http_resp_header(resp, "X-Content-Type-Options", "nosniff");
    if (send) {
        /* Caches must keep both variants apart, whichever is sent. */
        cmn_http_resp_header(resp, "Vary", "Accept-Encoding");
        if (gzip)
            cmn_http_resp_header(resp, "Content-Encoding", "gzip");
        else
            send = real;
    } else {
        send = real;
    }
    if (cmn_http_resp_file(resp, send, 0, UINT64_MAX) < 0)
        return CMN_ENOTFOUND;
    return 0;
}

/*
 * True when the last path segment ends in a file extension ("app.js",
 * "logo.svg"): letters after the last dot. Client-side routes may end in a
 * DICOM UID ("/studies/1.2.840.113619/viewer" or ".../2.25.1234"), whose
 * dotted parts are digits only, so they still get the SPA fallback.
 */
static bool has_file_ext(const char *segment)
{
    const char *dot = strrchr(segment, '.');
    bool letter = false;

    if (!dot || !dot[1])
        return false;
    for (const char *p = dot + 1; *p; p++) {
        if (isalpha((unsigned char)*p))
            letter = true;
        else if (!isdigit((unsigned char)*p))
            return false;
    }
    return letter;
}

void cloud_static_handle(const cmn_http_req_t *req, cmn_http_resp_t *resp)
{
    char path[2048], root_real[PATH_MAX];
    const char *last;
    size_t n;
    bool gzip;

    if (strcmp(req->method, "GET") != 0 && strcmp(req->method, "HEAD") != 0) {
        cmn_http_resp_header(resp, "Allow", "GET, HEAD");
        cmn_http_resp_simple(resp, 405, "text/plain; charset=utf-8", "method not allowed\n", 19);
        return;
    }
    if (strcasestr(req->path, "%00") ||
        cmn_http_urldecode(req->path, strlen(req->path), path, sizeof(path)) < 0 ||
        !path_safe(path) || !realpath(cloud_conf->http.web_root, root_real)) {
        not_found(resp);
        return;
    }
    n = strlen(path);
    if (path[n - 1] == '/') {
        if (n + sizeof("index.html") >= sizeof(path)) {
            not_found(resp);
            return;
        }
        memcpy(path + n, "index.html", sizeof("index.html"));
    }
    gzip = cmn_http_accepts_encoding(req, "gzip");
    if (serve(resp, root_real, path, strncmp(path, "/assets/", 8) == 0, gzip) == 0)
        return;
    /* SPA fallback: client-side routes have no file extension; never for the
     * API or for missing assets. */
    last = strrchr(path, '/');
    if (!has_file_ext(last) && strncmp(path, "/api/", 5) != 0 &&
        strncmp(path, "/assets/", 8) != 0 &&
        serve(resp, root_real, "/index.html", false, gzip) == 0)
        return;
    not_found(resp);
}
