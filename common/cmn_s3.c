/*
 * cmn_s3.c - blocking S3 client on libcurl's CURLOPT_AWS_SIGV4.
 *
 * Main struct: cmn_s3_t (immutable configuration after create, plus a
 * mutex-protected pool of curl easy handles). Every operation fills an
 * s3_req_t (what to send, where the body comes from, where the response goes)
 * and runs it through s3_perform(), the single place that signs, sends,
 * classifies the outcome and retries.
 *
 * libcurl 7.88 facts this file relies on (../shared/notes/c-stack.md,
 * s3-swift.md):
 * - With a read callback libcurl signs the EMPTY payload hash, so we always
 *   send x-amz-content-sha256 ourselves (the real hash: the server checks it).
 * - The query string is signed as written: we write it sorted, valueless keys
 *   as "uploads=", values encoded like SigV4's canonical form.
 * - Keys are not percent-encoded for us; CURLOPT_PATH_AS_IS keeps "./" and
 *   "../" in keys from being squashed.
 * - A header list entry "Expect:" (to suppress 100-continue) is listed in
 *   SignedHeaders but not sent, which breaks the signature: we keep libcurl's
 *   Expect: 100-continue for bodies above 1 MiB.
 * - The access key goes to CURLOPT_USERNAME, the secret to CURLOPT_PASSWORD
 *   (Swift's access keys contain ':').
 *
 * Invariant: the secret only ever reaches CURLOPT_PASSWORD; nothing here logs
 * headers, URLs with credentials, or curl's verbose output.
 */
#include "cmn/s3.h"

#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cmn/buf.h"
#include "cmn/crypto.h"
#include "cmn/errors.h"
#include "cmn/log.h"

#define S3_POOL_MAX 16
#define S3_ERRBODY_MAX 2048
#define S3_XMLBODY_MAX (16u << 20)     /* a list page or an initiate/complete answer */
#define S3_SECRET_MAX 1024
#define S3_SINGLE_PUT_MAX (5ull << 30) /* S3's limit for one PUT */
#define S3_EMPTY_SHA256 "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

struct cmn_s3 {
    char *scheme;                  /* "http" or "https" (owned) */
    char *host;                    /* host[:port] of the endpoint (owned) */
    char *base_path;               /* "" or "/prefix" without trailing '/' (owned) */
    char *region;                  /* owned */
    char *bucket;                  /* owned */
    char *access_key;              /* owned */
    char *secret;                  /* owned, wiped on destroy */
    char *ca_file;                 /* owned, may be NULL */
    char sigv4[96];                /* "aws:amz:REGION:s3" */
    bool path_style;
    uint64_t threshold;            /* bytes */
    uint64_t part_size;            /* bytes */
    int max_retries;
    int retry_base_ms;
    int retry_max_ms;
    int connect_timeout_ms;
    int stall_timeout_s;
    int list_page;
    int parallel_parts;            /* concurrent part uploads (threads) */
    pthread_mutex_t mu;            /* protects pool/npool */
    CURL *pool[S3_POOL_MAX];       /* idle easy handles (keep their connections) */
    int npool;
};

/* One request: what to send, where the answer goes, what came back. */
typedef struct {
    const char *op;                /* name for logs: "put", "get", ... */
    const char *method;            /* GET PUT POST DELETE HEAD */
    const char *key;               /* NULL = the bucket itself */
    const char *query;             /* sorted and encoded, or NULL */
    const char *content_type;      /* for PUT/POST bodies */
    bool idempotent;               /* may be retried */
    long quiet_status;             /* an expected error status, logged at debug level */

    /* body: memory (src_mem) or a file range (src_fd) or none */
    const uint8_t *src_mem;
    int src_fd;                    /* -1 if none */
    uint64_t src_off;              /* file offset of the body */
    uint64_t src_len;              /* body bytes */
    bool has_body;
    char sha_hex[CMN_SHA256_HEX_LEN + 1]; /* hash of the body */

    /* range request */
    bool range;
    uint64_t range_off, range_len;

    /* response sinks (2xx only): a file, a fixed buffer, or a growing buffer */
    int dst_fd;                    /* -1 if none */
    uint8_t *dst_buf;              /* ranged GET target */
    size_t dst_cap;
    cmn_buf_t *dst_xml;            /* XML answer, NULL to discard */

    /* per attempt */
    uint64_t src_pos;              /* bytes of the body handed to curl */
    uint64_t dst_len;              /* body bytes stored */
    uint64_t skip;                 /* bytes to drop (server ignored Range) */
    bool dst_full;                 /* stopped on purpose: buffer complete */
    long status;                   /* 0 until known */
    int local_err;                 /* -errno from our callbacks */
    char err_body[S3_ERRBODY_MAX]; /* non-2xx body (truncated) */
    size_t err_len;

    /* results */
    char etag[CMN_S3_ETAG_MAX];
    char req_id[64];               /* x-amz-request-id, for logs */
    uint64_t total;                /* from Content-Range, else UINT64_MAX */
    uint64_t clen;                 /* Content-Length of the answer, else UINT64_MAX */
    bool range_hdr;                /* a Content-Range header was seen */
    int attempts;
} s3_req_t;

/* ------------------------------------------------------------ helpers */

static pthread_once_t s3_curl_once = PTHREAD_ONCE_INIT;
static CURLcode s3_curl_init_rc;

static void s3_curl_init(void)
{
    s3_curl_init_rc = curl_global_init(CURL_GLOBAL_DEFAULT);
}

int cmn_s3_encode(const char *src, bool keep_slash, char *out, size_t outlen)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t o = 0;

    for (const unsigned char *p = (const unsigned char *)src; *p; p++) {
        unsigned char c = *p;
        bool keep = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                    c == '-' || c == '.' || c == '_' || c == '~' || (keep_slash && c == '/');
        if (keep) {
            if (o + 1 >= outlen)
                return CMN_ETOOBIG;
            out[o++] = (char)c;
        } else {
            if (o + 3 >= outlen)
                return CMN_ETOOBIG;
            out[o++] = '%';
            out[o++] = hex[c >> 4];
            out[o++] = hex[c & 15];
        }
    }
    if (o >= outlen)
        return CMN_ETOOBIG;
    out[o] = '\0';
    return (int)o;
}

static int hexval(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/*
 * In-place decoding of a listing key (encoding-type=url): AWS writes spaces
 * as '+' and a literal '+' as %2B (botocore decodes with unquote_plus);
 * Swift writes %20 and %2B. Decoding '+' as a space is right for both.
 */
static void url_decode_inplace(char *s)
{
    char *o = s;

    for (char *p = s; *p; p++) {
        int hi, lo;
        if (*p == '%' && (hi = hexval(p[1])) >= 0 && (lo = hexval(p[2])) >= 0) {
            *o++ = (char)(hi << 4 | lo);
            p += 2;
        } else if (*p == '+') {
            *o++ = ' ';
        } else {
            *o++ = *p;
        }
    }
    *o = '\0';
}

static bool key_is_valid(const char *key)
{
    size_t n;

    if (!key)
        return false;
    n = strlen(key);
    return n > 0 && n <= CMN_S3_MAX_KEY;
}

/* S3 bucket naming rules (the DNS-compatible subset every product accepts). */
static bool bucket_is_valid(const char *b)
{
    size_t n = strlen(b);

    if (n < 3 || n > 63)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = b[i];
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '.'))
            return false;
    }
    return b[0] != '-' && b[0] != '.' && b[n - 1] != '-' && b[n - 1] != '.';
}

static char *read_secret(const char *path, int *err)
{
    char buf[S3_SECRET_MAX + 1];
    size_t n = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);

    if (fd < 0) {
        *err = -errno;
        return NULL;
    }
    for (;;) {
        ssize_t r = read(fd, buf + n, sizeof(buf) - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            *err = -errno;
            close(fd);
            return NULL;
        }
        if (r == 0)
            break;
        n += (size_t)r;
        if (n == sizeof(buf)) {
            close(fd);
            *err = CMN_ETOOBIG;
            return NULL;
        }
    }
    close(fd);
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r' || buf[n - 1] == ' ' ||
                     buf[n - 1] == '\t'))
        n--;
    buf[n] = '\0';
    if (n == 0) {
        *err = CMN_ECONFIG;
        return NULL;
    }
    char *s = cmn_xstrdup(buf);
    explicit_bzero(buf, sizeof(buf));
    return s;
}

/* Hex SHA-256 of a file range (pread, so the fd offset does not matter). */
static int hash_range(int fd, uint64_t off, uint64_t len, char hex[CMN_SHA256_HEX_LEN + 1])
{
    enum { CHUNK = 1 << 20 };
    cmn_sha256_ctx_t c;
    uint8_t md[CMN_SHA256_LEN];
    char *buf = cmn_xmalloc(CHUNK);
    int r = 0;

    cmn_sha256_init(&c);
    while (len > 0) {
        size_t want = len < CHUNK ? (size_t)len : CHUNK;
        ssize_t n = pread(fd, buf, want, (off_t)off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            r = n < 0 ? -errno : -EIO;   /* file shrank under us */
            break;
        }
        cmn_sha256_update(&c, buf, (size_t)n);
        off += (uint64_t)n;
        len -= (uint64_t)n;
    }
    cmn_sha256_final(&c, md);
    free(buf);
    if (r == 0)
        cmn_hex(md, sizeof(md), hex);
    return r;
}

/*
 * Text of the first <tag>...</tag> inside [p, end), XML entities decoded,
 * into a new string (free()). NULL if absent.
 */
static char *xml_text(const char *p, const char *end, const char *tag)
{
    char open[64], close_[64];
    const char *a, *b;
    char *out, *o;

    snprintf(open, sizeof(open), "<%s>", tag);
    snprintf(close_, sizeof(close_), "</%s>", tag);
    a = memmem(p, (size_t)(end - p), open, strlen(open));
    if (!a)
        return NULL;
    a += strlen(open);
    b = memmem(a, (size_t)(end - a), close_, strlen(close_));
    if (!b)
        return NULL;
    out = o = cmn_xmalloc((size_t)(b - a) + 1);
    while (a < b) {
        if (*a != '&') {
            *o++ = *a++;
            continue;
        }
        static const struct { const char *ent; char c; } ents[] = {
            {"&amp;", '&'}, {"&lt;", '<'}, {"&gt;", '>'}, {"&quot;", '"'}, {"&apos;", '\''},
        };
        size_t k;
        for (k = 0; k < CMN_ARRAY_SIZE(ents); k++) {
            size_t l = strlen(ents[k].ent);
            if ((size_t)(b - a) >= l && memcmp(a, ents[k].ent, l) == 0) {
                *o++ = ents[k].c;
                a += l;
                break;
            }
        }
        if (k < CMN_ARRAY_SIZE(ents))
            continue;
        if (a + 2 < b && a[1] == '#') {   /* &#NN; or &#xNN; (ASCII only is enough here) */
            const char *semi = memchr(a, ';', (size_t)(b - a));
            if (semi) {
                long v = a[2] == 'x' ? strtol(a + 3, NULL, 16) : strtol(a + 2, NULL, 10);
                if (v > 0 && v < 128) {
                    *o++ = (char)v;
                    a = semi + 1;
                    continue;
                }
            }
        }
        *o++ = *a++;
    }
    *o = '\0';
    return out;
}

/* ------------------------------------------------------------ handle pool */

static CURL *pool_get(cmn_s3_t *s3)
{
    CURL *h = NULL;

    pthread_mutex_lock(&s3->mu);
    if (s3->npool > 0)
        h = s3->pool[--s3->npool];
    pthread_mutex_unlock(&s3->mu);
    if (!h)
        h = curl_easy_init();
    return h;
}

static void pool_put(cmn_s3_t *s3, CURL *h)
{
    pthread_mutex_lock(&s3->mu);
    if (s3->npool < S3_POOL_MAX) {
        s3->pool[s3->npool++] = h;
        h = NULL;
    }
    pthread_mutex_unlock(&s3->mu);
    if (h)
        curl_easy_cleanup(h);
}

/* ------------------------------------------------------------ create/destroy */

static int parse_endpoint(cmn_s3_t *s3, const char *ep)
{
    const char *rest, *slash;
    size_t n;

    if (strncmp(ep, "http://", 7) == 0) {
        s3->scheme = cmn_xstrdup("http");
        rest = ep + 7;
    } else if (strncmp(ep, "https://", 8) == 0) {
        s3->scheme = cmn_xstrdup("https");
        rest = ep + 8;
    } else {
        return CMN_ECONFIG;
    }
    slash = strchr(rest, '/');
    n = slash ? (size_t)(slash - rest) : strlen(rest);
    if (n == 0 || memchr(rest, '?', n) || memchr(rest, '@', n))
        return CMN_ECONFIG;
    s3->host = cmn_xmalloc(n + 1);
    memcpy(s3->host, rest, n);
    s3->host[n] = '\0';
    if (slash) {
        if (strchr(slash, '?') || strchr(slash, '#'))
            return CMN_ECONFIG;
        s3->base_path = cmn_xstrdup(slash);
        n = strlen(s3->base_path);
        while (n > 0 && s3->base_path[n - 1] == '/')
            s3->base_path[--n] = '\0';
    } else {
        s3->base_path = cmn_xstrdup("");
    }
    return 0;
}

int cmn_s3_create(const cmn_s3_conf_t *conf, cmn_s3_t **out)
{
    cmn_s3_t *s3;
    int r;

    *out = NULL;
    pthread_once(&s3_curl_once, s3_curl_init);
    if (s3_curl_init_rc != CURLE_OK) {
        CMN_LOG_E("s3", "curl_global_init failed: %s", curl_easy_strerror(s3_curl_init_rc));
        return CMN_EINTERNAL;
    }
    if (!conf->endpoint || !conf->bucket || !conf->access_key || !*conf->access_key) {
        CMN_LOG_E("s3", "endpoint, bucket and access_key are required");
        return CMN_ECONFIG;
    }
    if (!bucket_is_valid(conf->bucket)) {
        CMN_LOG_E("s3", "bucket=%s is not a valid S3 bucket name", conf->bucket);
        return CMN_ECONFIG;
    }
    if (conf->part_size && conf->part_size < CMN_S3_MIN_PART) {
        CMN_LOG_E("s3", "part_size=%" PRIu64 " is below S3's minimum of 5 MiB", conf->part_size);
        return CMN_ECONFIG;
    }
    if (conf->multipart_threshold > S3_SINGLE_PUT_MAX) {
        CMN_LOG_E("s3", "multipart_threshold above 5 GiB (S3's single PUT limit)");
        return CMN_ECONFIG;
    }
    s3 = cmn_xcalloc(1, sizeof(*s3));
    pthread_mutex_init(&s3->mu, NULL);
    r = parse_endpoint(s3, conf->endpoint);
    if (r < 0) {
        CMN_LOG_E("s3", "endpoint must be http(s)://host[:port][/path], without user info or query");
        goto out_destroy;
    }
    if (!conf->path_style && strchr(conf->bucket, '.') && strcmp(s3->scheme, "https") == 0)
        CMN_LOG_W("s3", "bucket=%s has dots: virtual-host style over https will not match "
                  "a wildcard certificate; consider path_style", conf->bucket);
    s3->region = cmn_xstrdup(conf->region && *conf->region ? conf->region : "us-east-1");
    if (strlen(s3->region) > 40 || strchr(s3->region, ':')) {
        CMN_LOG_E("s3", "region is not valid");
        r = CMN_ECONFIG;
        goto out_destroy;
    }
    s3->bucket = cmn_xstrdup(conf->bucket);
    s3->access_key = cmn_xstrdup(conf->access_key);
    if (conf->secret_key && *conf->secret_key) {
        s3->secret = cmn_xstrdup(conf->secret_key);
    } else if (conf->secret_file && *conf->secret_file) {
        s3->secret = read_secret(conf->secret_file, &r);
        if (!s3->secret) {
            CMN_LOG_E("s3", "secret_file=%s: %s", conf->secret_file, cmn_strerror(r));
            goto out_destroy;
        }
    } else {
        CMN_LOG_E("s3", "secret_key or secret_file is required");
        r = CMN_ECONFIG;
        goto out_destroy;
    }
    s3->ca_file = conf->ca_file ? cmn_xstrdup(conf->ca_file) : NULL;
    snprintf(s3->sigv4, sizeof(s3->sigv4), "aws:amz:%s:s3", s3->region);
    s3->path_style = conf->path_style;
    s3->threshold = conf->multipart_threshold ? conf->multipart_threshold : 64u << 20;
    s3->part_size = conf->part_size ? conf->part_size : 16u << 20;
    s3->max_retries = conf->max_retries < 0 ? 0 : conf->max_retries ? conf->max_retries : 4;
    s3->retry_base_ms = conf->retry_base_ms > 0 ? conf->retry_base_ms : 100;
    s3->retry_max_ms = conf->retry_max_ms > 0 ? conf->retry_max_ms : 5000;
    s3->connect_timeout_ms = conf->connect_timeout_ms > 0 ? conf->connect_timeout_ms : 5000;
    s3->stall_timeout_s = conf->stall_timeout_s > 0 ? conf->stall_timeout_s : 60;
    s3->list_page = conf->list_page > 0 && conf->list_page <= 1000 ? conf->list_page : 1000;
    s3->parallel_parts = conf->parallel_parts > 0 ? conf->parallel_parts : 2;
    if (s3->parallel_parts > CMN_S3_MAX_PARALLEL)
        s3->parallel_parts = CMN_S3_MAX_PARALLEL;
    *out = s3;
    return 0;

out_destroy:
    cmn_s3_destroy(s3);
    return r;
}

void cmn_s3_destroy(cmn_s3_t *s3)
{
    if (!s3)
        return;
    for (int i = 0; i < s3->npool; i++)
        curl_easy_cleanup(s3->pool[i]);
    if (s3->secret) {
        explicit_bzero(s3->secret, strlen(s3->secret));
        free(s3->secret);
    }
    free(s3->scheme);
    free(s3->host);
    free(s3->base_path);
    free(s3->region);
    free(s3->bucket);
    free(s3->access_key);
    free(s3->ca_file);
    pthread_mutex_destroy(&s3->mu);
    free(s3);
}

/* ------------------------------------------------------------ URLs */

int cmn_s3_url(const cmn_s3_t *s3, const char *key, const char *query, char *out, size_t outlen)
{
    char *enc = NULL;
    int n;

    if (key) {
        size_t cap;
        if (!key_is_valid(key))
            return -EINVAL;
        cap = strlen(key) * 3 + 1;
        enc = cmn_xmalloc(cap);
        if (cmn_s3_encode(key, true, enc, cap) < 0) {
            free(enc);
            return CMN_ETOOBIG;
        }
    }
    if (s3->path_style)
        n = snprintf(out, outlen, "%s://%s%s/%s%s%s%s%s", s3->scheme, s3->host, s3->base_path,
                     s3->bucket, enc ? "/" : "", enc ? enc : "", query ? "?" : "",
                     query ? query : "");
    else
        n = snprintf(out, outlen, "%s://%s.%s%s/%s%s%s", s3->scheme, s3->bucket, s3->host,
                     s3->base_path, enc ? enc : "", query ? "?" : "", query ? query : "");
    free(enc);
    if (n < 0 || (size_t)n >= outlen)
        return CMN_ETOOBIG;
    return 0;
}

/* ------------------------------------------------------------ curl callbacks */

static size_t on_read(char *p, size_t size, size_t nmemb, void *ud)
{
    s3_req_t *rq = ud;
    uint64_t left = rq->src_len - rq->src_pos;
    size_t n = size * nmemb;

    if (n > left)
        n = (size_t)left;
    if (n == 0)
        return 0;
    if (rq->src_mem) {
        memcpy(p, rq->src_mem + rq->src_pos, n);
    } else {
        ssize_t got;
        do {
            got = pread(rq->src_fd, p, n, (off_t)(rq->src_off + rq->src_pos));
        } while (got < 0 && errno == EINTR);
        if (got <= 0) {
            rq->local_err = got < 0 ? -errno : -EIO;   /* the file shrank */
            return CURL_READFUNC_ABORT;
        }
        n = (size_t)got;
    }
    rq->src_pos += n;
    return n;
}

static int on_seek(void *ud, curl_off_t offset, int origin)
{
    s3_req_t *rq = ud;

    if (origin != SEEK_SET || offset < 0 || (uint64_t)offset > rq->src_len)
        return CURL_SEEKFUNC_CANTSEEK;
    rq->src_pos = (uint64_t)offset;
    return CURL_SEEKFUNC_OK;
}

/* Holds the handle while curl_easy_perform runs, for the status lookup. */
typedef struct {
    s3_req_t *rq;
    CURL *h;
} s3_cbctx_t;

static size_t on_write(char *p, size_t size, size_t nmemb, void *ud)
{
    s3_cbctx_t *cx = ud;
    s3_req_t *rq = cx->rq;
    size_t n = size * nmemb;

    if (rq->status == 0) {
        curl_easy_getinfo(cx->h, CURLINFO_RESPONSE_CODE, &rq->status);
        if (rq->range && rq->status == 200)
            rq->skip = rq->range_off;   /* the server ignored Range: drop the prefix */
    }
    if (rq->status < 200 || rq->status > 299) {
        size_t room = sizeof(rq->err_body) - 1 - rq->err_len;
        size_t c = n < room ? n : room;
        memcpy(rq->err_body + rq->err_len, p, c);
        rq->err_len += c;
        rq->err_body[rq->err_len] = '\0';
        return n;
    }
    if (rq->dst_fd >= 0) {
        size_t done = 0;
        while (done < n) {
            ssize_t w = pwrite(rq->dst_fd, p + done, n - done, (off_t)rq->dst_len);
            if (w < 0 && errno == EINTR)
                continue;
            if (w < 0) {
                rq->local_err = -errno;
                return 0;
            }
            done += (size_t)w;
            rq->dst_len += (uint64_t)w;
        }
        return n;
    }
    if (rq->dst_buf) {
        size_t off = 0;
        if (rq->skip > 0) {          /* 200 to a ranged request: drop the prefix */
            size_t s = rq->skip < n ? (size_t)rq->skip : n;
            rq->skip -= s;
            off = s;
        }
        size_t room = rq->dst_cap - (size_t)rq->dst_len;
        size_t c = n - off < room ? n - off : room;
        memcpy(rq->dst_buf + rq->dst_len, p + off, c);
        rq->dst_len += c;
        if (off + c < n) {            /* more than asked for: stop here */
            rq->dst_full = true;
            return 0;
        }
        return n;
    }
    if (rq->dst_xml && cmn_buf_append(rq->dst_xml, p, n) < 0) {
        rq->local_err = CMN_ETOOBIG;
        return 0;
    }
    return n;
}

/* Copies a header value (trimmed) if the line is "name: value". */
static bool header_value(const char *line, size_t len, const char *name, char *out, size_t outlen)
{
    size_t nl = strlen(name);

    if (len <= nl + 1 || strncasecmp(line, name, nl) != 0 || line[nl] != ':')
        return false;
    const char *v = line + nl + 1;
    const char *e = line + len;
    while (v < e && (*v == ' ' || *v == '\t'))
        v++;
    while (e > v && (e[-1] == '\r' || e[-1] == '\n' || e[-1] == ' ' || e[-1] == '\t'))
        e--;
    size_t n = (size_t)(e - v);
    if (n >= outlen)
        n = outlen - 1;
    memcpy(out, v, n);
    out[n] = '\0';
    return true;
}

static size_t on_header(char *p, size_t size, size_t nmemb, void *ud)
{
    s3_req_t *rq = ud;
    size_t n = size * nmemb;
    char v[128];

    if (n >= 5 && memcmp(p, "HTTP/", 5) == 0) {   /* a new response (after 100-continue) */
        rq->etag[0] = '\0';
        rq->range_hdr = false;
        rq->total = UINT64_MAX;
        return n;
    }
    if (header_value(p, n, "ETag", rq->etag, sizeof(rq->etag)))
        return n;
    if (header_value(p, n, "x-amz-request-id", rq->req_id, sizeof(rq->req_id)))
        return n;
    if (header_value(p, n, "Content-Range", v, sizeof(v))) {
        const char *slash = strchr(v, '/');
        rq->range_hdr = true;
        if (slash && slash[1] != '*')
            rq->total = strtoull(slash + 1, NULL, 10);
    }
    return n;
}

/* ------------------------------------------------------------ perform */

static bool curl_is_retryable(CURLcode cc)
{
    switch (cc) {
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_CONNECT:
    case CURLE_OPERATION_TIMEDOUT:
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_PARTIAL_FILE:
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_SEND_FAIL_REWIND:
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM:
        return true;
    default:
        return false;
    }
}

static bool status_is_retryable(long st)
{
    return st == 408 || st == 429 || (st >= 500 && st != 501 && st != 505);
}

/* Maps a final non-2xx answer to our error codes. */
static int status_to_err(long st, const char *code)
{
    switch (st) {
    case 401:
    case 403:
        return CMN_EAUTH;
    case 404:
        return CMN_ENOTFOUND;
    case 409:
    case 412:
        return CMN_ECONFLICT;
    case 413:
        return CMN_ETOOBIG;
    case 416:
        return -ERANGE;
    case 507:
        return CMN_ENOSPACE;
    default:
        break;
    }
    if (code) {
        if (strcmp(code, "BadDigest") == 0 || strcmp(code, "XAmzContentSHA256Mismatch") == 0 ||
            strcmp(code, "InvalidDigest") == 0)
            return CMN_EHASH;
        if (strcmp(code, "EntityTooLarge") == 0)
            return CMN_ETOOBIG;
        if (strcmp(code, "InvalidRange") == 0)
            return -ERANGE;
        if (strcmp(code, "InvalidAccessKeyId") == 0 || strcmp(code, "SignatureDoesNotMatch") == 0 ||
            strcmp(code, "AccessDenied") == 0)
            return CMN_EAUTH;
    }
    if (st >= 400 && st < 500)
        return CMN_EPROTO;
    return CMN_EHTTP;
}

/* Thread-local xorshift for backoff jitter, seeded from the CSPRNG. */
static uint64_t jitter_rand(void)
{
    static _Thread_local uint64_t x;

    if (x == 0 && (cmn_random(&x, sizeof(x)) < 0 || x == 0))
        x = (uint64_t)time(NULL) ^ (uint64_t)(uintptr_t)&x ^ 0x9E3779B97F4A7C15ull;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return x;
}

/* Full jitter: a random delay in [0, min(max, base * 2^attempt)] (at least 1 ms). */
static long backoff_ms(const cmn_s3_t *s3, int attempt)
{
    long cap = s3->retry_base_ms;

    for (int i = 0; i < attempt && cap < s3->retry_max_ms; i++)
        cap *= 2;
    if (cap > s3->retry_max_ms)
        cap = s3->retry_max_ms;
    return 1 + (long)(jitter_rand() % (uint64_t)cap);
}

static void sleep_ms(long ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};

    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

static void rq_reset_attempt(s3_req_t *rq)
{
    rq->src_pos = 0;
    rq->dst_len = 0;
    rq->skip = 0;
    rq->dst_full = false;
    rq->status = 0;
    rq->local_err = 0;
    rq->err_len = 0;
    rq->err_body[0] = '\0';
    rq->etag[0] = '\0';
    rq->req_id[0] = '\0';
    rq->total = UINT64_MAX;
    rq->clen = UINT64_MAX;
    rq->range_hdr = false;
    if (rq->dst_xml)
        cmn_buf_reset(rq->dst_xml);
}

static int rq_setup(cmn_s3_t *s3, CURL *h, s3_req_t *rq, s3_cbctx_t *cx, struct curl_slist **hdrs,
                    const char *url, char *range, size_t rangelen)
{
    char line[160];
    struct curl_slist *l = NULL;

    curl_easy_reset(h);
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_PATH_AS_IS, 1L);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(h, CURLOPT_AWS_SIGV4, s3->sigv4);
    curl_easy_setopt(h, CURLOPT_USERNAME, s3->access_key);
    curl_easy_setopt(h, CURLOPT_PASSWORD, s3->secret);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, (long)s3->connect_timeout_ms);
    curl_easy_setopt(h, CURLOPT_LOW_SPEED_LIMIT, 1L);
    curl_easy_setopt(h, CURLOPT_LOW_SPEED_TIME, (long)s3->stall_timeout_s);
    curl_easy_setopt(h, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(h, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(h, CURLOPT_BUFFERSIZE, 256L * 1024);
    curl_easy_setopt(h, CURLOPT_UPLOAD_BUFFERSIZE, 1024L * 1024);
    if (s3->ca_file)
        curl_easy_setopt(h, CURLOPT_CAINFO, s3->ca_file);
    curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(h, CURLOPT_HEADERDATA, rq);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_write);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, cx);

    snprintf(line, sizeof(line), "x-amz-content-sha256: %s", rq->sha_hex);
    l = curl_slist_append(l, line);
    if (rq->has_body || strcmp(rq->method, "POST") == 0) {
        snprintf(line, sizeof(line), "Content-Type: %s",
                 rq->content_type ? rq->content_type : "application/octet-stream");
        l = curl_slist_append(l, line);
    }
    if (!l)
        return -ENOMEM;
    *hdrs = l;
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, l);

    if (strcmp(rq->method, "PUT") == 0) {
        curl_easy_setopt(h, CURLOPT_UPLOAD, 1L);
        curl_easy_setopt(h, CURLOPT_INFILESIZE_LARGE, (curl_off_t)rq->src_len);
        curl_easy_setopt(h, CURLOPT_READFUNCTION, on_read);
        curl_easy_setopt(h, CURLOPT_READDATA, rq);
        curl_easy_setopt(h, CURLOPT_SEEKFUNCTION, on_seek);
        curl_easy_setopt(h, CURLOPT_SEEKDATA, rq);
    } else if (strcmp(rq->method, "POST") == 0) {
        curl_easy_setopt(h, CURLOPT_POST, 1L);
        curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)rq->src_len);
        curl_easy_setopt(h, CURLOPT_READFUNCTION, on_read);
        curl_easy_setopt(h, CURLOPT_READDATA, rq);
        curl_easy_setopt(h, CURLOPT_SEEKFUNCTION, on_seek);
        curl_easy_setopt(h, CURLOPT_SEEKDATA, rq);
    } else if (strcmp(rq->method, "HEAD") == 0) {
        curl_easy_setopt(h, CURLOPT_NOBODY, 1L);
    } else if (strcmp(rq->method, "DELETE") == 0) {
        curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, "DELETE");
    }
    if (rq->range) {
        snprintf(range, rangelen, "%" PRIu64 "-%" PRIu64, rq->range_off,
                 rq->range_off + rq->range_len - 1);
        curl_easy_setopt(h, CURLOPT_RANGE, range);
    }
    return 0;
}

/* The <Code> of an S3 error body, into code (empty if none). */
static void error_code(const char *body, size_t len, char *code, size_t codelen)
{
    char *c = len ? xml_text(body, body + len, "Code") : NULL;

    code[0] = '\0';
    if (c) {
        snprintf(code, codelen, "%s", c);
        free(c);
    }
}

/*
 * Runs rq with retries. Returns 0 for a 2xx answer (rq->status holds it),
 * else a mapped error. *s3code, if not NULL, receives the S3 error code.
 */
static int s3_perform(cmn_s3_t *s3, s3_req_t *rq, char *s3code, size_t s3codelen)
{
    char *url;
    size_t urlcap;
    char range[64];
    char code[64] = "";
    CURL *h;
    int r = 0;

    urlcap = strlen(s3->scheme) + strlen(s3->host) + strlen(s3->base_path) + strlen(s3->bucket) +
             (rq->key ? strlen(rq->key) * 3 : 0) + (rq->query ? strlen(rq->query) : 0) + 16;
    url = cmn_xmalloc(urlcap);
    r = cmn_s3_url(s3, rq->key, rq->query, url, urlcap);
    if (r < 0) {
        free(url);
        return r;
    }
    if (!rq->has_body)
        memcpy(rq->sha_hex, S3_EMPTY_SHA256, sizeof(rq->sha_hex));
    h = pool_get(s3);
    if (!h) {
        free(url);
        return -ENOMEM;
    }

    for (rq->attempts = 1;; rq->attempts++) {
        struct curl_slist *hdrs = NULL;
        s3_cbctx_t cx = {rq, h};
        CURLcode cc;
        bool retry = false;

        rq_reset_attempt(rq);
        if (rq->dst_fd >= 0 && ftruncate(rq->dst_fd, 0) < 0) {
            r = -errno;
            break;
        }
        r = rq_setup(s3, h, rq, &cx, &hdrs, url, range, sizeof(range));
        if (r < 0) {
            curl_slist_free_all(hdrs);
            break;
        }
        cc = curl_easy_perform(h);
        curl_slist_free_all(hdrs);
        curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &rq->status);
        {
            curl_off_t cl = -1;
            if (curl_easy_getinfo(h, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &cl) == CURLE_OK && cl >= 0)
                rq->clen = (uint64_t)cl;
        }

        if (cc == CURLE_WRITE_ERROR && rq->dst_full && rq->local_err == 0)
            cc = CURLE_OK;   /* we stopped a ranged read once the buffer was full */
        if (rq->local_err) {
            r = rq->local_err;
            CMN_LOG_W("s3", "op=%s key=%s local error: %s", rq->op, rq->key ? rq->key : "-",
                      cmn_strerror(r));
            break;
        }
        if (cc != CURLE_OK) {
            r = cc == CURLE_OPERATION_TIMEDOUT ? CMN_ETIMEOUT : CMN_EHTTP;
            retry = curl_is_retryable(cc);
            CMN_LOG_W("s3", "op=%s key=%s attempt=%d transport error: %s", rq->op,
                      rq->key ? rq->key : "-", rq->attempts, curl_easy_strerror(cc));
        } else if (rq->status >= 200 && rq->status <= 299) {
            r = 0;
            break;
        } else {
            error_code(rq->err_body, rq->err_len, code, sizeof(code));
            r = status_to_err(rq->status, code);
            retry = status_is_retryable(rq->status);
            if (rq->status == 404 || rq->status == rq->quiet_status)
                CMN_LOG_D("s3", "op=%s key=%s status=%ld code=%s", rq->op,
                          rq->key ? rq->key : "-", rq->status, code[0] ? code : "-");
            else
                CMN_LOG_W("s3", "op=%s key=%s attempt=%d status=%ld code=%s request_id=%s", rq->op,
                          rq->key ? rq->key : "-", rq->attempts, rq->status,
                          code[0] ? code : "-", rq->req_id[0] ? rq->req_id : "-");
        }
        if (!retry || !rq->idempotent || rq->attempts > s3->max_retries)
            break;
        sleep_ms(backoff_ms(s3, rq->attempts - 1));
    }
    if (s3code)
        snprintf(s3code, s3codelen, "%s", code);
    pool_put(s3, h);
    free(url);
    return r;
}

static void rq_init(s3_req_t *rq, const char *op, const char *method, const char *key)
{
    memset(rq, 0, sizeof(*rq));
    rq->op = op;
    rq->method = method;
    rq->key = key;
    rq->src_fd = -1;
    rq->dst_fd = -1;
    rq->total = UINT64_MAX;
}

/* ------------------------------------------------------------ operations */

int cmn_s3_bucket_create(cmn_s3_t *s3)
{
    s3_req_t rq;
    char body[256];
    char code[64];
    int r;

    rq_init(&rq, "bucket_create", "PUT", NULL);
    rq.idempotent = true;
    rq.quiet_status = 409;
    if (strcmp(s3->region, "us-east-1") != 0) {
        int n = snprintf(body, sizeof(body),
                         "<CreateBucketConfiguration><LocationConstraint>%s</LocationConstraint>"
                         "</CreateBucketConfiguration>", s3->region);
        uint8_t md[CMN_SHA256_LEN];
        rq.src_mem = (const uint8_t *)body;
        rq.src_len = (uint64_t)n;
        rq.has_body = true;
        rq.content_type = "application/xml";
        cmn_sha256(body, (size_t)n, md);
        cmn_hex(md, sizeof(md), rq.sha_hex);
    }
    r = s3_perform(s3, &rq, code, sizeof(code));
    if (r == CMN_ECONFLICT && (strcmp(code, "BucketAlreadyOwnedByYou") == 0 ||
                               strcmp(code, "BucketAlreadyExists") == 0))
        r = 0;
    return r;
}

int cmn_s3_put_buffer(cmn_s3_t *s3, const char *key, const void *data, size_t len,
                      const cmn_s3_put_opts_t *opts)
{
    s3_req_t rq;

    if (!key_is_valid(key) || (!data && len))
        return -EINVAL;
    if (len > S3_SINGLE_PUT_MAX)
        return CMN_ETOOBIG;
    rq_init(&rq, "put", "PUT", key);
    rq.idempotent = true;
    rq.src_mem = data ? data : (const uint8_t *)"";
    rq.src_len = len;
    rq.has_body = true;
    rq.content_type = opts ? opts->content_type : NULL;
    if (opts && opts->sha256_hex && strlen(opts->sha256_hex) == CMN_SHA256_HEX_LEN) {
        memcpy(rq.sha_hex, opts->sha256_hex, sizeof(rq.sha_hex));
    } else {
        uint8_t md[CMN_SHA256_LEN];
        cmn_sha256(rq.src_mem, len, md);
        cmn_hex(md, sizeof(md), rq.sha_hex);
    }
    return s3_perform(s3, &rq, NULL, 0);
}

static int mpu_abort(cmn_s3_t *s3, const char *key, const char *upload_q)
{
    s3_req_t rq;
    int r;

    rq_init(&rq, "mpu_abort", "DELETE", key);
    rq.idempotent = true;
    rq.query = upload_q;
    r = s3_perform(s3, &rq, NULL, 0);
    if (r < 0 && r != CMN_ENOTFOUND)
        CMN_LOG_W("s3", "op=mpu_abort key=%s: %s (the upload is left for lifecycle cleanup)", key,
                  cmn_strerror(r));
    return r;
}

/* A multipart upload's shared state for the part workers. */
typedef struct {
    cmn_s3_t *s3;
    const char *key;
    int fd;
    uint64_t size;                 /* bytes */
    uint64_t part;                 /* part size, bytes */
    uint32_t nparts;
    const char *upload_q;          /* "uploadId=..." (encoded) */
    char (*etags)[CMN_S3_ETAG_MAX]; /* [nparts], filled by the workers */
    pthread_mutex_t mu;            /* protects next and err */
    uint32_t next;                 /* next part index to send */
    int err;                       /* first error; stops the workers */
} mpu_t;

static int mpu_send_part(mpu_t *m, uint32_t i, char *q, size_t qlen)
{
    uint64_t off = (uint64_t)i * m->part;
    uint64_t len = m->size - off < m->part ? m->size - off : m->part;
    s3_req_t rq;
    int r;

    snprintf(q, qlen, "partNumber=%u&%s", i + 1, m->upload_q);
    rq_init(&rq, "mpu_part", "PUT", m->key);
    rq.idempotent = true;
    rq.query = q;
    rq.src_fd = m->fd;
    rq.src_off = off;
    rq.src_len = len;
    rq.has_body = true;
    r = hash_range(m->fd, off, len, rq.sha_hex);
    if (r < 0)
        return r;
    r = s3_perform(m->s3, &rq, NULL, 0);
    if (r < 0)
        return r;
    if (!rq.etag[0]) {
        CMN_LOG_W("s3", "op=mpu_part key=%s part=%u: no ETag in the answer", m->key, i + 1);
        return CMN_EPARSE;
    }
    memcpy(m->etags[i], rq.etag, sizeof(m->etags[i]));
    return 0;
}

static void *mpu_worker(void *arg)
{
    mpu_t *m = arg;
    size_t qlen = strlen(m->upload_q) + 32;
    char *q = cmn_xmalloc(qlen);

    for (;;) {
        uint32_t i;
        int r;

        pthread_mutex_lock(&m->mu);
        if (m->err < 0 || m->next >= m->nparts) {
            pthread_mutex_unlock(&m->mu);
            break;
        }
        i = m->next++;
        pthread_mutex_unlock(&m->mu);
        r = mpu_send_part(m, i, q, qlen);
        if (r < 0) {
            pthread_mutex_lock(&m->mu);
            if (m->err == 0)
                m->err = r;
            pthread_mutex_unlock(&m->mu);
            break;
        }
    }
    free(q);
    return NULL;
}

static int put_multipart(cmn_s3_t *s3, const char *key, int fd, uint64_t size,
                         const cmn_s3_put_opts_t *opts)
{
    uint64_t part = s3->part_size;
    uint32_t nparts;
    cmn_buf_t xml;
    cmn_buf_t done;
    char *upload_id = NULL;
    char *enc_id = NULL;
    char *upload_q = NULL;
    char (*etags)[CMN_S3_ETAG_MAX] = NULL;
    char code[64];
    s3_req_t rq;
    int r;

    while ((size + part - 1) / part > CMN_S3_MAX_PARTS)
        part *= 2;
    nparts = (uint32_t)((size + part - 1) / part);

    /* Initiate: POST ?uploads= (not idempotent: a retry would orphan an upload). */
    cmn_buf_init(&xml, S3_XMLBODY_MAX);
    cmn_buf_init(&done, S3_XMLBODY_MAX);
    rq_init(&rq, "mpu_init", "POST", key);
    rq.query = "uploads=";
    rq.content_type = opts && opts->content_type ? opts->content_type : NULL;
    rq.dst_xml = &xml;
    r = s3_perform(s3, &rq, NULL, 0);
    if (r < 0)
        goto out_free;
    upload_id = xml.data ? xml_text(xml.data, xml.data + xml.len, "UploadId") : NULL;
    if (!upload_id || !*upload_id) {
        CMN_LOG_W("s3", "op=mpu_init key=%s: no UploadId in the answer", key);
        r = CMN_EPARSE;
        goto out_free;
    }
    size_t cap = strlen(upload_id) * 3 + 1;
    enc_id = cmn_xmalloc(cap);
    cmn_s3_encode(upload_id, false, enc_id, cap);
    upload_q = cmn_xmalloc(cap + 16);
    snprintf(upload_q, cap + 16, "uploadId=%s", enc_id);
    etags = cmn_xcalloc(nparts, sizeof(*etags));
    CMN_LOG_D("s3", "op=mpu_init key=%s size=%" PRIu64 " parts=%u part_size=%" PRIu64, key, size,
              nparts, part);

    /*
     * Parts: each is hashed, then sent (and retried) on its own. Up to
     * parallel_parts threads (this one included) take the next part number,
     * so hashing one part overlaps sending another.
     */
    {
        mpu_t m = {
            .s3 = s3, .key = key, .fd = fd, .size = size, .part = part, .nparts = nparts,
            .upload_q = upload_q, .etags = etags,
        };
        pthread_t thr[CMN_S3_MAX_PARALLEL];
        int nthr = 0;

        pthread_mutex_init(&m.mu, NULL);
        for (int t = 1; t < s3->parallel_parts && (uint32_t)t < nparts; t++) {
            if (pthread_create(&thr[nthr], NULL, mpu_worker, &m) != 0)
                break;   /* fewer helpers is fine */
            nthr++;
        }
        mpu_worker(&m);
        for (int t = 0; t < nthr; t++)
            pthread_join(thr[t], NULL);
        pthread_mutex_destroy(&m.mu);
        r = m.err;
        if (r < 0)
            goto out_abort;
    }

    /* Complete: POST ?uploadId=ID with the part list. */
    cmn_buf_reset(&xml);
    r = cmn_buf_appends(&done, "<CompleteMultipartUpload>");
    for (uint32_t i = 0; i < nparts && r == 0; i++) {
        /* ETags are quoted hex; escape the quotes anyway for strict parsers */
        r = cmn_buf_appendf(&done, "<Part><PartNumber>%u</PartNumber><ETag>", i + 1);
        for (const char *e = etags[i]; r == 0 && *e; e++)
            r = *e == '"' ? cmn_buf_appends(&done, "&quot;") : cmn_buf_append(&done, e, 1);
        if (r == 0)
            r = cmn_buf_appends(&done, "</ETag></Part>");
    }
    if (r == 0)
        r = cmn_buf_appends(&done, "</CompleteMultipartUpload>");
    if (r < 0)
        goto out_abort;
    rq_init(&rq, "mpu_complete", "POST", key);
    rq.idempotent = true;
    rq.query = upload_q;
    rq.content_type = "application/xml";
    rq.src_mem = (const uint8_t *)done.data;
    rq.src_len = done.len;
    rq.has_body = true;
    {
        uint8_t md[CMN_SHA256_LEN];
        cmn_sha256(done.data, done.len, md);
        cmn_hex(md, sizeof(md), rq.sha_hex);
    }
    rq.dst_xml = &xml;
    r = s3_perform(s3, &rq, code, sizeof(code));
    if (r == CMN_ENOTFOUND && rq.attempts > 1) {
        /* An earlier attempt may have completed it: the object tells. */
        cmn_s3_stat_t st;
        if (cmn_s3_head(s3, key, &st) == 0 && st.size == size) {
            r = 0;
            goto out_free;
        }
    }
    if (r == 0 && xml.data && memmem(xml.data, xml.len, "<Error>", 7)) {
        /* S3 may answer 200 and report the failure in the body. */
        error_code(xml.data, xml.len, code, sizeof(code));
        CMN_LOG_W("s3", "op=mpu_complete key=%s code=%s", key, code[0] ? code : "-");
        r = status_to_err(500, code);
    }
    if (r < 0)
        goto out_abort;
    goto out_free;

out_abort:
    mpu_abort(s3, key, upload_q);
out_free:
    free(etags);
    free(upload_q);
    free(enc_id);
    free(upload_id);
    cmn_buf_free(&done);
    cmn_buf_free(&xml);
    return r;
}

int cmn_s3_put_file(cmn_s3_t *s3, const char *key, const char *path,
                    const cmn_s3_put_opts_t *opts)
{
    struct stat sb;
    s3_req_t rq;
    int fd, r;

    if (!key_is_valid(key))
        return -EINVAL;
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    if (fstat(fd, &sb) < 0) {
        r = -errno;
        goto out_close;
    }
    if ((uint64_t)sb.st_size > s3->threshold) {
        r = put_multipart(s3, key, fd, (uint64_t)sb.st_size, opts);
        goto out_close;
    }
    rq_init(&rq, "put", "PUT", key);
    rq.idempotent = true;
    rq.src_fd = fd;
    rq.src_len = (uint64_t)sb.st_size;
    rq.has_body = true;
    rq.content_type = opts ? opts->content_type : NULL;
    if (opts && opts->sha256_hex && strlen(opts->sha256_hex) == CMN_SHA256_HEX_LEN) {
        memcpy(rq.sha_hex, opts->sha256_hex, sizeof(rq.sha_hex));
    } else {
        r = hash_range(fd, 0, rq.src_len, rq.sha_hex);
        if (r < 0)
            goto out_close;
    }
    r = s3_perform(s3, &rq, NULL, 0);

out_close:
    close(fd);
    return r;
}

int cmn_s3_get_to_file(cmn_s3_t *s3, const char *key, const char *path, cmn_s3_stat_t *st)
{
    size_t n = strlen(path) + 16;
    char *tmp = cmn_xmalloc(n);
    s3_req_t rq;
    int fd, r;

    if (!key_is_valid(key)) {
        free(tmp);
        return -EINVAL;
    }
    snprintf(tmp, n, "%s.s3tmp-XXXXXX", path);
    fd = mkostemp(tmp, O_CLOEXEC);
    if (fd < 0) {
        r = -errno;
        goto out_free;
    }
    rq_init(&rq, "get", "GET", key);
    rq.idempotent = true;
    rq.dst_fd = fd;
    r = s3_perform(s3, &rq, NULL, 0);
    if (r == 0 && close(fd) < 0)
        r = -errno;
    else if (r < 0)
        close(fd);
    if (r == 0 && rename(tmp, path) < 0)
        r = -errno;
    if (r < 0)
        unlink(tmp);
    else if (st) {
        st->size = rq.dst_len;
        snprintf(st->etag, sizeof(st->etag), "%s", rq.etag);
    }
out_free:
    free(tmp);
    return r;
}

int cmn_s3_get_range(cmn_s3_t *s3, const char *key, uint64_t off, size_t len, void *buf,
                     size_t *got, uint64_t *total)
{
    s3_req_t rq;
    int r;

    *got = 0;
    if (total)
        *total = UINT64_MAX;
    if (!key_is_valid(key) || (!buf && len))
        return -EINVAL;
    if (len == 0)
        return 0;
    rq_init(&rq, "get_range", "GET", key);
    rq.idempotent = true;
    rq.range = true;
    rq.range_off = off;
    rq.range_len = len;
    rq.dst_buf = buf;
    rq.dst_cap = len;
    r = s3_perform(s3, &rq, NULL, 0);
    if (r < 0)
        return r;
    if (rq.status == 200) {
        /* The server ignored Range and sent the object from its start. */
        if (rq.dst_len == 0)
            return -ERANGE;
        if (rq.total == UINT64_MAX && !rq.dst_full)
            rq.total = rq.clen;
    }
    *got = (size_t)rq.dst_len;
    if (total)
        *total = rq.total;
    return 0;
}

int cmn_s3_head(cmn_s3_t *s3, const char *key, cmn_s3_stat_t *st)
{
    s3_req_t rq;
    int r;

    if (!key_is_valid(key))
        return -EINVAL;
    rq_init(&rq, "head", "HEAD", key);
    rq.idempotent = true;
    r = s3_perform(s3, &rq, NULL, 0);
    if (r < 0)
        return r;
    if (st) {
        st->size = rq.clen;
        snprintf(st->etag, sizeof(st->etag), "%s", rq.etag);
    }
    return 0;
}

int cmn_s3_delete(cmn_s3_t *s3, const char *key)
{
    s3_req_t rq;
    char code[64];
    int r;

    if (!key_is_valid(key))
        return -EINVAL;
    rq_init(&rq, "delete", "DELETE", key);
    rq.idempotent = true;
    r = s3_perform(s3, &rq, code, sizeof(code));
    if (r == CMN_ENOTFOUND && strcmp(code, "NoSuchBucket") != 0)
        r = 0;
    return r;
}

int cmn_s3_list(cmn_s3_t *s3, const char *prefix, cmn_s3_list_cb cb, void *arg)
{
    cmn_buf_t xml;
    char *token = NULL;
    char *enc_prefix, *enc_token = NULL;
    size_t pcap;
    int r = 0;

    if (!prefix)
        prefix = "";
    if (strlen(prefix) > CMN_S3_MAX_KEY)
        return -EINVAL;
    pcap = strlen(prefix) * 3 + 1;
    enc_prefix = cmn_xmalloc(pcap);
    cmn_s3_encode(prefix, false, enc_prefix, pcap);
    cmn_buf_init(&xml, S3_XMLBODY_MAX);

    for (;;) {
        cmn_buf_t q;
        s3_req_t rq;

        /* sorted: continuation-token, encoding-type, list-type, max-keys, prefix */
        cmn_buf_init(&q, 0);
        if (enc_token)
            cmn_buf_appendf(&q, "continuation-token=%s&", enc_token);
        r = cmn_buf_appendf(&q, "encoding-type=url&list-type=2&max-keys=%d&prefix=%s",
                            s3->list_page, enc_prefix);
        if (r < 0)
            break;
        rq_init(&rq, "list", "GET", NULL);
        rq.idempotent = true;
        rq.query = q.data;
        rq.dst_xml = &xml;
        r = s3_perform(s3, &rq, NULL, 0);
        cmn_buf_free(&q);
        if (r < 0)
            break;
        if (!xml.data || !memmem(xml.data, xml.len, "<ListBucketResult", 17)) {
            r = CMN_EPARSE;
            break;
        }
        const char *p = xml.data, *end = xml.data + xml.len;
        for (;;) {
            const char *a = memmem(p, (size_t)(end - p), "<Contents>", 10);
            const char *b = a ? memmem(a, (size_t)(end - a), "</Contents>", 11) : NULL;
            if (!b)
                break;
            char *k = xml_text(a, b, "Key");
            char *sz = xml_text(a, b, "Size");
            char *et = xml_text(a, b, "ETag");
            if (!k) {
                r = CMN_EPARSE;
            } else {
                url_decode_inplace(k);
                cmn_s3_obj_t o = {k, sz ? strtoull(sz, NULL, 10) : 0, et ? et : ""};
                r = cb(&o, arg);
            }
            free(k);
            free(sz);
            free(et);
            if (r != 0)
                goto out;
            p = b + 11;
        }
        char *trunc = xml_text(xml.data, end, "IsTruncated");
        bool more = trunc && strcmp(trunc, "true") == 0;
        free(trunc);
        if (!more)
            break;
        free(token);
        free(enc_token);
        enc_token = NULL;
        token = xml_text(xml.data, end, "NextContinuationToken");
        if (!token || !*token) {
            r = CMN_EPARSE;
            break;
        }
        size_t tcap = strlen(token) * 3 + 1;
        enc_token = cmn_xmalloc(tcap);
        cmn_s3_encode(token, false, enc_token, tcap);
    }
out:
    free(token);
    free(enc_token);
    free(enc_prefix);
    cmn_buf_free(&xml);
    return r;
}
