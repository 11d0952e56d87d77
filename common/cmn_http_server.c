/*
 * cmn_http_server.c - HTTP/1.1 server on libuv + llhttp.
 *
 * One conn_t per accepted TCP connection. Requests on a connection are
 * handled strictly one at a time: when llhttp completes a message the parser
 * is paused, reading stops, and bytes already received after the message
 * (pipelined requests) stay in rbuf until the response has been written.
 * That answers pipelined requests in order and bounds memory per connection.
 *
 * Connection states (conn_set_state checks every move):
 *
 *          accept
 *            |
 *            v         message begin           message complete
 *   +----> IDLE --------------------> READING -------------------+
 *   |        |                          |   \  (body in tmp file)  |
 *   |        |  parse error / 4xx       |    +-----> SPOOLING ----+
 *   |        +-----------+--------------+              |          |
 *   |                    v                             v          v
 *   |                 WRITING <----------------------------- HANDLING
 *   |  keep-alive        |          (loop or threadpool)
 *   +--------------------+
 *                        | close wanted
 *                        v
 *                    LINGERING  (shutdown(WR), discard input until EOF/timer)
 *                        |
 *   any state ------> CLOSING  (uv_close on tcp + timer; freed at refs == 0)
 *
 * Timers (one uv_timer_t, owned by the state): IDLE = idle timeout (close),
 * READING/SPOOLING = request timeout (408), WRITING = stall timeout (idle
 * timeout, restarted after every completed write), LINGERING = linger time.
 * HANDLING has none: the handler is our own code.
 *
 * Lifetime: c->refs counts the two handles plus every request in flight
 * (uv_work_t, uv_fs_t, uv_write_t, uv_shutdown_t). Each completion drops
 * its reference; the last one frees the connection (never inside a
 * callback that still touches it afterwards). A blocking handler thus keeps
 * the connection alive after the peer went away; its response is dropped.
 *
 * TLS (srv->tls_conf set): c->tls wraps a cmn_tls_t memory BIO between the
 * socket and the code above, which still sees plaintext in rbuf and still
 * calls write_bufs()/read_start()/read_stop():
 *
 *   uv_read -> tls in-buffer -> handshake / cmn_tls_read -> rbuf -> llhttp
 *   write_bufs(pieces) -> cmn_tls_write (<= TLS_FLIGHT plaintext per step)
 *                      -> ciphertext -> uv_write(tls->wreq) -> next step ...
 *                      -> write_done() once every record of the pieces is written
 *
 * c->reading then means "the parser wants input"; tls->sock_reading is the
 * socket's uv_read state. tls_pump_in() decrypts buffered records while the
 * parser wants input and starts socket reads only when the buffer is empty,
 * so the in-buffer never holds more than one read (64 KiB). The handshake
 * runs in IDLE under the handshake timer. Only one ciphertext write is in
 * flight (tls->fly); records produced meanwhile (alerts, close_notify) wait
 * in the session's output buffer. Closing sends close_notify first. A plain
 * HTTP request on the TLS port is closed unanswered, with a (rate-limited)
 * warning naming the cause: the client only sees an empty reply.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "llhttp.h"

#include "cmn/errors.h"
#include "cmn/http.h"
#include "cmn/log.h"
#include "cmn_tls.h"

#define SUBSYS "http"

#define RBUF_SIZE       (64 * 1024)   /* read buffer per connection */
#define FILE_CHUNK      (256 * 1024)  /* file segment read/write step */
#define FILE_INLINE_MAX (4u << 20)    /* per response: file bytes read by the handler itself */
#define SPOOL_CHUNK     (256 * 1024)  /* tmp-file write size while reading */
#define SPOOL_HIGH      (1024 * 1024) /* stop reading above this backlog */
#define MAX_HEADERS     100
#define MAX_WRITE_BUFS  64
#define LINGER_MS       2000
#define RESP_HDR_MAX    (64 * 1024)
#define TLS_FLIGHT      (256 * 1024)  /* plaintext encrypted per ciphertext write */
#define TLS_RECORD      16384         /* max plaintext per TLS record */
#define TLS_HANDSHAKE_MS 10000
#define PLAIN_HTTP_LOG_MS 60000       /* at most one "plain HTTP on the TLS port" warning */

/* ------------------------------------------------------------------ types */

typedef enum {
    SEG_MEM,
    SEG_FILE,
} seg_kind_t;

typedef struct {
    seg_kind_t kind;
    char *data;          /* SEG_MEM: owned (malloc) */
    size_t cap;          /* SEG_MEM: > 0 when cmn_http_resp_body may append */
    char *path;          /* SEG_FILE: owned copy */
    bool sf;             /* SEG_FILE on plain HTTP: sent by sendfile(2) */
    int fd;              /* SEG_FILE: open while it is being sent (sf), else -1 */
    uint64_t off;        /* SEG_FILE: first byte */
    uint64_t len;        /* bytes */
} seg_t;

struct cmn_http_resp {
    int status;          /* 0 = 200 */
    cmn_buf_t headers;   /* "Name: value\r\n" lines, owned */
    seg_t *segs;         /* owned array */
    size_t nsegs;
    size_t capsegs;
    uint64_t body_len;   /* sum of segment lengths */
    uint64_t inlined;    /* file bytes read into memory segments (FILE_INLINE_MAX) */
    bool plain;          /* set by dispatch(): no TLS, so files may go by sendfile(2) */
    bool failed;         /* an append ran out of memory: answer 500 */
    bool close;          /* the handler asked for Connection: close */
};

typedef enum {
    CONN_IDLE,
    CONN_READING,
    CONN_SPOOLING,
    CONN_HANDLING,
    CONN_WRITING,
    CONN_LINGERING,
    CONN_CLOSING,
} conn_state_t;

static const char *const state_names[] = {
    "IDLE", "READING", "SPOOLING", "HANDLING", "WRITING", "LINGERING", "CLOSING",
};

typedef struct conn conn_t;

/* TLS state of one connection (allocated only for TLS connections). */
typedef struct {
    conn_t *c;
    cmn_tls_t *sess;             /* owned */
    bool sock_reading;           /* uv_read_start active */
    bool pumping;                /* inside tls_pump_in */
    bool wbusy;                  /* wreq in flight */
    bool app_write;              /* a write_bufs() is being encrypted and sent (holds a ref) */
    bool want_shutdown;          /* uv_shutdown once the output has been queued */
    uv_write_t wreq;
    cmn_buf_t fly;               /* ciphertext being written (owned) */
    uv_buf_t src[MAX_WRITE_BUFS]; /* plaintext pieces of the app write (not owned) */
    size_t nsrc;
    size_t isrc;                 /* next piece */
    size_t srcoff;               /* bytes of src[isrc] already encrypted */
} conn_tls_t;

struct conn {
    uv_tcp_t tcp;
    uv_timer_t timer;
    cmn_http_server_t *srv;
    conn_t *prev, *next;         /* srv->conns list */
    conn_state_t state;
    int refs;                    /* handles + requests in flight */
    bool reading;                /* uv_read_start active */
    bool in_parser;              /* inside llhttp_execute */

    llhttp_t parser;
    char *rbuf;                  /* RBUF_SIZE bytes, owned */
    size_t lo_off;               /* unparsed bytes in rbuf after a pause */
    size_t lo_len;

    /* The request being parsed or handled. */
    cmn_buf_t head;              /* url \0 name \0 value \0 ... (owned) */
    size_t tok_start;            /* start of the token being accumulated */
    size_t *hoff;                /* name/value offsets into head (owned) */
    size_t nhoff;
    size_t caphoff;
    size_t head_bytes;           /* raw request-line + header bytes seen */
    bool in_body;                /* headers complete: ignore trailers */
    cmn_http_header_t *hdrs;     /* built at headers complete (owned) */
    const cmn_http_route_t *route; /* NULL = 404 */
    size_t max_body;
    uint64_t body_len;
    cmn_buf_t body;              /* in-memory body (owned) */
    int fail_status;             /* set by a parser callback that failed */
    bool keep_alive;
    bool is_head;
    bool http10;
    cmn_http_req_t req;
    cmn_http_resp_t resp;
    uv_work_t work;

    /* Spooling a large body to a temp file. */
    bool to_file;
    bool spool_busy;             /* spool_req in flight */
    int spool_err;
    uv_file spool_fd;            /* -1 when closed */
    char *tmp_path;              /* owned; unlinked after the response */
    uint64_t spool_off;
    cmn_buf_t spool_pending;     /* bytes waiting to be written */
    cmn_buf_t spool_inflight;    /* bytes being written */
    size_t spool_inflight_done;
    uv_fs_t spool_req;

    /* Writing the response. */
    uv_write_t wreq;
    uv_shutdown_t sreq;
    uv_write_t creq;             /* "100 Continue" */
    cmn_buf_t headbuf;           /* status line + headers (owned) */
    bool head_sent;
    bool close_after;
    size_t seg_idx;              /* next segment to send */
    uv_buf_t pend[MAX_WRITE_BUFS]; /* memory pieces waiting for the next write */
    size_t npend;
    uv_fs_t fs_req;              /* file segment open/read/close */
    uv_file file_fd;             /* -1 when closed */
    uint64_t file_pos;
    uint64_t file_rem;
    char *fbuf;                  /* FILE_CHUNK bytes while sending files (owned) */
    bool sf_started;             /* sending the current fd segment (send_file_seg) */
    uint64_t sf_pos;             /* its next byte */
    uint64_t sf_rem;             /* its bytes left */

    conn_tls_t *tls;             /* NULL = plain HTTP (owned) */
    char sock_peer[64];          /* the TCP peer's address */
};

struct cmn_http_server {
    uv_loop_t *loop;
    uv_tcp_t listener;
    const cmn_http_route_t *routes;
    size_t nroutes;
    cmn_http_server_opts_t opts;  /* defaults applied; strings point below */
    char *host;                   /* owned */
    char *tmp_dir;                /* owned */
    int port;
    cmn_tls_conf_t *tls_conf;     /* NULL = plain HTTP (owned, shared by connections) */
    uint64_t plain_http_log_ms;   /* uv_now() of the last plain-HTTP warning */
    unsigned plain_http_quiet;    /* plain-HTTP connections not warned about since */
    bool plain_http_logged;       /* plain_http_log_ms is set */
    time_t date_sec;              /* the second date_hdr was formatted for */
    char date_hdr[48];            /* "Date: <IMF-fixdate>\r\n" */
    conn_t *conns;                /* list of live connections */
    int nconns;
    bool closing;
    bool listener_closed;
    void (*done)(void *ud);
    void *done_ud;
};

typedef struct {
    uv_fs_t req;
    conn_t *c;
} fsop_t;

static llhttp_settings_t parser_settings;

static void conn_close(conn_t *c);
static void conn_unref(conn_t *c);
static void conn_process(conn_t *c, const char *data, size_t len);
static void send_next(conn_t *c);
static void response_done(conn_t *c);
static void tls_read_start(conn_t *c);
static void tls_read_stop(conn_t *c);
static int tls_write_bufs(conn_t *c, uv_buf_t *bufs, unsigned n);
static int tls_flush(conn_t *c);

/* ------------------------------------------------------------ state */

static bool state_move_ok(conn_state_t from, conn_state_t to)
{
    if (to == CONN_CLOSING)
        return from != CONN_CLOSING;
    switch (from) {
    case CONN_IDLE: return to == CONN_READING || to == CONN_WRITING;
    case CONN_READING:
        return to == CONN_SPOOLING || to == CONN_HANDLING || to == CONN_WRITING;
    case CONN_SPOOLING: return to == CONN_HANDLING || to == CONN_WRITING;
    case CONN_HANDLING: return to == CONN_WRITING;
    case CONN_WRITING: return to == CONN_IDLE || to == CONN_LINGERING;
    case CONN_LINGERING: return false;
    case CONN_CLOSING: return false;
    }
    return false;
}

static void conn_set_state(conn_t *c, conn_state_t to)
{
    if (CMN_NEVER(!state_move_ok(c->state, to))) {
        CMN_LOG_E(SUBSYS, "illegal state move %s -> %s", state_names[c->state],
                  state_names[to]);
    }
    CMN_LOG_D(SUBSYS, "conn=%p peer=%s state %s -> %s", (void *)c, c->req.peer,
              state_names[c->state], state_names[to]);
    c->state = to;
}

/* ------------------------------------------------------------ response API */

static void resp_init(cmn_http_resp_t *r)
{
    memset(r, 0, sizeof(*r));
    cmn_buf_init(&r->headers, RESP_HDR_MAX);
}

static void resp_free(cmn_http_resp_t *r)
{
    for (size_t i = 0; i < r->nsegs; i++) {
        free(r->segs[i].data);
        free(r->segs[i].path);
        if (r->segs[i].kind == SEG_FILE && r->segs[i].fd >= 0)
            close(r->segs[i].fd);
    }
    free(r->segs);
    cmn_buf_free(&r->headers);
    resp_init(r);
}

static seg_t *resp_new_seg(cmn_http_resp_t *r)
{
    if (r->nsegs == r->capsegs) {
        size_t ncap = r->capsegs ? r->capsegs * 2 : 8;
        seg_t *ns = realloc(r->segs, ncap * sizeof(*ns));

        if (ns == NULL)
            return NULL;
        r->segs = ns;
        r->capsegs = ncap;
    }
    seg_t *s = &r->segs[r->nsegs++];
    memset(s, 0, sizeof(*s));
    return s;
}

void cmn_http_resp_status(cmn_http_resp_t *resp, int status)
{
    resp->status = status;
}

static bool has_crlf(const char *s)
{
    return strpbrk(s, "\r\n") != NULL;
}

int cmn_http_resp_header(cmn_http_resp_t *resp, const char *name, const char *value)
{
    if (name[0] == '\0' || has_crlf(name) || strchr(name, ':') || has_crlf(value))
        return -EINVAL;
    /* The server owns message framing. */
    if (strcasecmp(name, "Content-Length") == 0 || strcasecmp(name, "Transfer-Encoding") == 0)
        return 0;
    if (strcasecmp(name, "Connection") == 0) {
        if (strcasecmp(value, "close") == 0)
            resp->close = true;
        return 0;
    }
    int err = cmn_buf_appendf(&resp->headers, "%s: %s\r\n", name, value);
    if (err < 0) {
        resp->failed = true;
        return -ENOMEM;
    }
    return 0;
}

int cmn_http_resp_body(cmn_http_resp_t *resp, const void *p, size_t n)
{
    if (n == 0)
        return 0;
    seg_t *s = resp->nsegs ? &resp->segs[resp->nsegs - 1] : NULL;

    if (s == NULL || s->kind != SEG_MEM || s->cap == 0) {
        s = resp_new_seg(resp);
        if (s == NULL)
            goto out_nomem;
        s->kind = SEG_MEM;
    }
    if (s->len + n > s->cap) {
        size_t ncap = s->cap ? s->cap : 4096;

        while (ncap < s->len + n)
            ncap *= 2;
        char *nd = realloc(s->data, ncap);
        if (nd == NULL)
            goto out_nomem;
        s->data = nd;
        s->cap = ncap;
    }
    memcpy(s->data + s->len, p, n);
    s->len += n;
    resp->body_len += n;
    return 0;

out_nomem:
    resp->failed = true;
    return -ENOMEM;
}

int cmn_http_resp_body_take(cmn_http_resp_t *resp, void *p, size_t n)
{
    if (n == 0) {
        free(p);
        return 0;
    }
    seg_t *s = resp_new_seg(resp);
    if (s == NULL) {
        free(p);
        resp->failed = true;
        return -ENOMEM;
    }
    s->kind = SEG_MEM;
    s->data = p;
    s->len = n;
    s->cap = 0;
    resp->body_len += n;
    return 0;
}

int cmn_http_resp_file(cmn_http_resp_t *resp, const char *path, uint64_t off, uint64_t len)
{
    struct stat st;

    if (stat(path, &st) < 0)
        return -errno;
    if (!S_ISREG(st.st_mode))
        return -EINVAL;
    uint64_t size = (uint64_t)st.st_size;
    if (off > size)
        return -EINVAL;
    if (len == UINT64_MAX)
        len = size - off;
    else if (len > size - off)
        return -EINVAL;
    if (len == 0)
        return 0;

    /* Plain HTTP: the loop sends the file with sendfile(2), no copy through
     * user space, opening it only when its turn comes (a whole-series answer
     * of hundreds of files holds one descriptor at a time). Under TLS, small
     * files (a DICOM instance, a web asset) are read here, on the handler's
     * thread, while the page cache is warm: the loop then sends them with
     * one write instead of an open, reads and a close each bounced through
     * the threadpool (which the handlers also occupy). Larger bodies stream
     * from the file in FILE_CHUNK steps. */
    bool sf = resp->plain;
    if (!sf && len <= FILE_INLINE_MAX - resp->inlined) {
        char *buf = cmn_try_malloc((size_t)len);
        int fd = buf ? open(path, O_RDONLY | O_CLOEXEC) : -1;
        uint64_t got = 0;
        int err = buf ? 0 : -ENOMEM;

        if (buf && fd < 0)
            err = -errno;
        while (err == 0 && got < len) {
            ssize_t n = pread(fd, buf + got, (size_t)(len - got), (off_t)(off + got));
            if (n > 0)
                got += (uint64_t)n;
            else if (n == 0)
                err = -EIO;          /* shrank since the stat */
            else if (errno != EINTR)
                err = -errno;
        }
        if (fd >= 0)
            close(fd);
        if (err == 0) {
            resp->inlined += len;
            return cmn_http_resp_body_take(resp, buf, (size_t)len);
        }
        free(buf);
        if (err != -ENOMEM)
            return err;
        /* out of memory: stream it instead */
    }

    char *copy = strdup(path);
    seg_t *s = copy ? resp_new_seg(resp) : NULL;
    if (s == NULL) {
        free(copy);
        resp->failed = true;
        return -ENOMEM;
    }
    s->kind = SEG_FILE;
    s->path = copy;
    s->sf = sf;
    s->fd = -1;
    s->off = off;
    s->len = len;
    resp->body_len += len;
    return 0;
}

int cmn_http_resp_simple(cmn_http_resp_t *resp, int status, const char *content_type,
                         const void *body, size_t n)
{
    int err = 0;

    cmn_http_resp_status(resp, status);
    if (content_type)
        err = cmn_http_resp_header(resp, "Content-Type", content_type);
    if (err == 0)
        err = cmn_http_resp_body(resp, body, n);
    return err;
}

const char *cmn_http_req_header(const cmn_http_req_t *req, const char *name)
{
    for (size_t i = 0; i < req->nheaders; i++) {
        if (strcasecmp(req->headers[i].name, name) == 0)
            return req->headers[i].value;
    }
    return NULL;
}

static const char *reason_phrase(int status)
{
    switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 206: return "Partial Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 303: return "See Other";
    case 304: return "Not Modified";
    case 307: return "Temporary Redirect";
    case 308: return "Permanent Redirect";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 406: return "Not Acceptable";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 410: return "Gone";
    case 411: return "Length Required";
    case 412: return "Precondition Failed";
    case 413: return "Content Too Large";
    case 415: return "Unsupported Media Type";
    case 416: return "Range Not Satisfiable";
    case 422: return "Unprocessable Content";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 507: return "Insufficient Storage";
    default: return "Status";
    }
}

/* ------------------------------------------------------------ connection basics */

static void conn_ref(conn_t *c)
{
    c->refs++;
}

static void read_stop(conn_t *c)
{
    if (c->tls) {
        tls_read_stop(c);
        return;
    }
    if (c->reading) {
        uv_read_stop((uv_stream_t *)&c->tcp);
        c->reading = false;
    }
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf);
static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);

static void read_start(conn_t *c)
{
    if (c->tls) {
        tls_read_start(c);
        return;
    }
    if (!c->reading && c->state != CONN_CLOSING) {
        int err = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);

        if (err < 0) {
            conn_close(c);
            return;
        }
        c->reading = true;
    }
}


static void on_timer(uv_timer_t *t);

static void timer_arm(conn_t *c, unsigned ms)
{
    uv_timer_start(&c->timer, on_timer, ms, 0);
}

static void fsop_done(uv_fs_t *req)
{
    fsop_t *op = container_of(req, fsop_t, req);
    conn_t *c = op->c;

    if (req->result < 0 && req->fs_type == UV_FS_UNLINK)
        CMN_LOG_W(SUBSYS, "unlink %s: %s", req->path, uv_strerror((int)req->result));
    uv_fs_req_cleanup(req);
    free(op);
    conn_unref(c);
}

/* Fire-and-forget close(2) of fd, holding a reference on c. */
static void conn_fs_close(conn_t *c, uv_file fd)
{
    fsop_t *op = cmn_xmalloc(sizeof(*op));

    op->c = c;
    conn_ref(c);
    if (uv_fs_close(c->srv->loop, &op->req, fd, fsop_done) < 0) {
        free(op);
        conn_unref(c);
    }
}

/* Fire-and-forget unlink(2) of path (copied by libuv), holding a reference. */
static void conn_fs_unlink(conn_t *c, const char *path)
{
    fsop_t *op = cmn_xmalloc(sizeof(*op));

    op->c = c;
    conn_ref(c);
    if (uv_fs_unlink(c->srv->loop, &op->req, path, fsop_done) < 0) {
        free(op);
        conn_unref(c);
    }
}

/* Closes and removes the temp file, unless a spool write is in flight (its
 * callback calls this again). */
static void spool_release(conn_t *c)
{
    if (c->spool_busy)
        return;
    if (c->spool_fd >= 0) {
        conn_fs_close(c, c->spool_fd);
        c->spool_fd = -1;
    }
    if (c->tmp_path) {
        conn_fs_unlink(c, c->tmp_path);
        free(c->tmp_path);
        c->tmp_path = NULL;
    }
}

/* Forgets the request just answered; keeps the buffers' memory. */
static void request_reset(conn_t *c)
{
    cmn_buf_reset(&c->head);
    c->tok_start = 0;
    c->nhoff = 0;
    c->head_bytes = 0;
    c->in_body = false;
    free(c->hdrs);
    c->hdrs = NULL;
    c->route = NULL;
    c->max_body = c->srv->opts.max_body;
    c->body_len = 0;
    cmn_buf_free(&c->body);
    cmn_buf_init(&c->body, 0);
    c->fail_status = 0;
    c->keep_alive = false;
    c->is_head = false;
    c->http10 = false;
    c->to_file = false;
    c->spool_err = 0;
    c->spool_off = 0;
    cmn_buf_free(&c->spool_pending);
    if (!c->spool_busy) {
        /* else the write in flight owns it; on_spool_write frees it */
        cmn_buf_free(&c->spool_inflight);
        c->spool_inflight_done = 0;
    }
    resp_free(&c->resp);
    cmn_buf_free(&c->headbuf);
    c->head_sent = false;
    c->close_after = false;
    c->seg_idx = 0;
    c->sf_started = false;
    c->npend = 0;
    free(c->fbuf);
    c->fbuf = NULL;
    memset(&c->req, 0, sizeof(c->req));
    memcpy(c->req.peer, c->sock_peer, sizeof(c->req.peer));
}

/* A trusted proxy's request: the client is the last X-Forwarded-For entry
 * (the one the proxy appended or wrote itself; earlier ones came from the
 * client and prove nothing). An absent or malformed header leaves the
 * proxy's address as the peer. X-Forwarded-Proto "https" or "http" gives
 * the client's scheme (nginx sets it, never appends). */
static void apply_forwarded(conn_t *c)
{
    cmn_http_server_t *srv = c->srv;
    cmn_http_req_t *q = &c->req;

    q->client_https = q->tls;
    if (!srv->opts.trust_proxy || !srv->opts.trust_proxy(c->sock_peer, srv->opts.trust_proxy_ud))
        return;
    const char *proto = cmn_http_req_header(q, "X-Forwarded-Proto");
    if (proto && strcasecmp(proto, "https") == 0)
        q->client_https = true;
    else if (proto && strcasecmp(proto, "http") == 0)
        q->client_https = false;
    const char *xff = cmn_http_req_header(q, "X-Forwarded-For");
    if (!xff)
        return;
    const char *last = strrchr(xff, ',');
    last = last ? last + 1 : xff;
    while (*last == ' ' || *last == '\t')
        last++;
    char addr[64];
    size_t n = strcspn(last, " \t");
    if (n == 0 || n >= sizeof(addr))
        return;
    memcpy(addr, last, n);
    addr[n] = '\0';
    unsigned char bin[16];
    if (inet_pton(AF_INET, addr, bin) != 1 && inet_pton(AF_INET6, addr, bin) != 1)
        return;
    memcpy(q->via, c->sock_peer, sizeof(q->via));
    memcpy(q->peer, addr, n + 1);
}

static void server_maybe_done(cmn_http_server_t *srv)
{
    if (srv->closing && srv->listener_closed && srv->nconns == 0) {
        void (*done)(void *) = srv->done;
        void *ud = srv->done_ud;

        cmn_tls_conf_destroy(srv->tls_conf);
        free(srv->host);
        free(srv->tmp_dir);
        free(srv);
        if (done)
            done(ud);
    }
}

static void conn_free(conn_t *c)
{
    cmn_http_server_t *srv = c->srv;

    CMN_NEVER(c->spool_fd >= 0 || c->tmp_path || c->file_fd >= 0);
    request_reset(c);
    cmn_buf_free(&c->head);
    free(c->hoff);
    free(c->rbuf);
    if (c->tls) {
        cmn_tls_destroy(c->tls->sess);
        cmn_buf_free(&c->tls->fly);
        free(c->tls);
    }
    if (c->prev)
        c->prev->next = c->next;
    else
        srv->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    srv->nconns--;
    free(c);
    server_maybe_done(srv);
}

static void conn_unref(conn_t *c)
{
    if (CMN_NEVER(c->refs <= 0))
        return;
    if (--c->refs == 0)
        conn_free(c);
}

static void on_handle_close(uv_handle_t *h)
{
    conn_unref(h->data);
}

/* Safe to call twice. Requests in flight finish and drop their references. */
static void conn_close(conn_t *c)
{
    if (c->state == CONN_CLOSING)
        return;
    if (c->tls) {
        /* Best effort: libuv tries the write at once, uv_close cancels the rest. */
        c->tls->sock_reading = false;
        if (cmn_tls_is_established(c->tls->sess) && !c->tls->wbusy) {
            cmn_tls_close_notify(c->tls->sess);
            (void)tls_flush(c);
        }
    }
    conn_set_state(c, CONN_CLOSING);
    c->reading = false;
    uv_timer_stop(&c->timer);
    uv_close((uv_handle_t *)&c->timer, on_handle_close);
    uv_close((uv_handle_t *)&c->tcp, on_handle_close);
    /* A response file descriptor is only held while fs_req or wreq is in
     * flight; their callbacks close it. */
    spool_release(c);
}

/* ------------------------------------------------------------ writing */

static void on_write(uv_write_t *req, int status);
static void on_file_open(uv_fs_t *req);
static void on_file_read(uv_fs_t *req);
static void on_file_close(uv_fs_t *req);

static int write_bufs(conn_t *c, uv_buf_t *bufs, unsigned n)
{
    if (c->tls)
        return tls_write_bufs(c, bufs, n);
    int err = uv_write(&c->wreq, (uv_stream_t *)&c->tcp, bufs, n, on_write);

    if (err < 0)
        return err;
    conn_ref(c);
    timer_arm(c, c->srv->opts.idle_timeout_ms);
    return 0;
}

/* "Date: Sun, 06 Nov 1994 08:49:37 GMT\r\n" (RFC 9110 5.6.7, which an origin
 * server with a clock must send), formatted once a second; C names, not the
 * locale's. */
static const char *date_header(cmn_http_server_t *srv)
{
    static const char days[7][4] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
    static const char months[12][4] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                       "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
    time_t now = time(NULL);
    struct tm tm;

    if (now != srv->date_sec && gmtime_r(&now, &tm)) {
        snprintf(srv->date_hdr, sizeof(srv->date_hdr),
                 "Date: %s, %02d %s %04d %02d:%02d:%02d GMT\r\n", days[tm.tm_wday % 7],
                 tm.tm_mday, months[tm.tm_mon % 12], tm.tm_year + 1900, tm.tm_hour, tm.tm_min,
                 tm.tm_sec);
        srv->date_sec = now;
    }
    return srv->date_hdr;
}

static void build_head(conn_t *c)
{
    cmn_http_resp_t *r = &c->resp;
    cmn_buf_t *h = &c->headbuf;
    int status = r->status ? r->status : 200;
    int err;

    cmn_buf_init(h, 0);
    err = cmn_buf_appendf(h, "HTTP/1.1 %d %s\r\n%s", status, reason_phrase(status),
                          date_header(c->srv));
    if (err == 0 && r->headers.len)
        err = cmn_buf_append(h, r->headers.data, r->headers.len);
    if (err == 0)
        err = cmn_buf_appendf(h, "Content-Length: %" PRIu64 "\r\n", r->body_len);
    if (err == 0 && c->close_after)
        err = cmn_buf_appends(h, "Connection: close\r\n");
    else if (err == 0 && c->http10)
        err = cmn_buf_appends(h, "Connection: keep-alive\r\n");
    if (err == 0)
        err = cmn_buf_appends(h, "\r\n");
    if (err < 0) {
        /* Out of memory for a few hundred bytes: give up on the connection. */
        c->close_after = true;
    }
}

/* Replaces whatever the handler produced by a short text answer. */
static void resp_set_error(conn_t *c, int status)
{
    char msg[96];
    int n = snprintf(msg, sizeof(msg), "%d %s\n", status, reason_phrase(status));

    resp_free(&c->resp);
    cmn_http_resp_simple(&c->resp, status, "text/plain; charset=utf-8", msg, (size_t)n);
}

static void start_response(conn_t *c)
{
    if (c->resp.failed)
        resp_set_error(c, 500);
    c->close_after = c->close_after || !c->keep_alive || c->resp.close || c->srv->closing;
    conn_set_state(c, CONN_WRITING);
    build_head(c);
    if (c->headbuf.data == NULL) {
        conn_close(c);
        return;
    }
    c->pend[0] = uv_buf_init(c->headbuf.data, (unsigned)c->headbuf.len);
    c->npend = 1;
    c->head_sent = true;
    c->seg_idx = c->is_head ? c->resp.nsegs : 0;
    c->sf_started = false;
    c->file_fd = -1;
    c->file_rem = 0;
    send_next(c);
}

/* Sends an error response built by the server, then closes. */
static void respond_error(conn_t *c, int status)
{
    read_stop(c);
    c->keep_alive = false;
    c->close_after = true;
    resp_set_error(c, status);
    start_response(c);
}

/*
 * Sends a file segment opened by the handler (plain HTTP) with sendfile(2)
 * on the loop thread, as nginx does: the data is normally in the page cache
 * (the handler just looked the file up), and the socket is non-blocking.
 * When the socket is full, one FILE_CHUNK is read into fbuf and handed to
 * uv_write, which waits for it to drain; its completion calls send_next()
 * again, which resumes sendfile. 1 = segment sent, 0 = a write is under way,
 * or -errno.
 */
static int send_file_seg(conn_t *c, seg_t *s)
{
    uv_os_fd_t sock;
    int err;

    if (!c->sf_started) {
        /* On the loop thread, as nginx does: the handler has just stat'ed
         * the file, so its inode and pages are normally cached. */
        if (s->fd < 0 && (s->fd = open(s->path, O_RDONLY | O_CLOEXEC)) < 0)
            return -errno;
        c->sf_started = true;
        c->sf_pos = s->off;
        c->sf_rem = s->len;
    }
    if ((err = uv_fileno((uv_handle_t *)&c->tcp, &sock)) < 0)
        return err;
    while (c->sf_rem > 0) {
        off_t pos = (off_t)c->sf_pos;
        size_t want = c->sf_rem < (1u << 30) ? (size_t)c->sf_rem : (1u << 30);
        ssize_t n = sendfile(sock, s->fd, &pos, want);

        if (n > 0) {
            c->sf_pos += (uint64_t)n;
            c->sf_rem -= (uint64_t)n;
            continue;
        }
        if (n == 0)
            return -EIO;                     /* the file shrank under us */
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK)
            return -errno;
        /* Socket full: let uv_write wait for room, with one chunk. */
        if (c->fbuf == NULL && (c->fbuf = cmn_try_malloc(FILE_CHUNK)) == NULL)
            return -ENOMEM;
        size_t k = c->sf_rem < FILE_CHUNK ? (size_t)c->sf_rem : FILE_CHUNK;
        ssize_t got = pread(s->fd, c->fbuf, k, (off_t)c->sf_pos);
        if (got <= 0)
            return got == 0 ? -EIO : -errno;
        c->sf_pos += (uint64_t)got;
        c->sf_rem -= (uint64_t)got;
        c->pend[0] = uv_buf_init(c->fbuf, (unsigned)got);
        err = write_bufs(c, c->pend, 1);
        return err < 0 ? err : 0;
    }
    timer_arm(c, c->srv->opts.idle_timeout_ms);
    return 1;
}

/* Writes pending memory pieces; file segments are read into fbuf and sent
 * together with the pieces before them. Called after every completed step. */
static void send_next(conn_t *c)
{
    cmn_http_resp_t *r = &c->resp;
    int err;

    if (c->file_fd >= 0 || c->file_rem > 0) {
        /* In the middle of a file segment. */
        if (c->file_rem > 0) {
            size_t n = c->file_rem < FILE_CHUNK ? (size_t)c->file_rem : FILE_CHUNK;
            uv_buf_t b = uv_buf_init(c->fbuf, (unsigned)n);

            err = uv_fs_read(c->srv->loop, &c->fs_req, c->file_fd, &b, 1, (int64_t)c->file_pos,
                             on_file_read);
            if (err < 0)
                goto out_fail;
            conn_ref(c);
            return;
        }
        err = uv_fs_close(c->srv->loop, &c->fs_req, c->file_fd, on_file_close);
        c->file_fd = -1;
        if (err < 0)
            goto out_fail;
        conn_ref(c);
        return;
    }

    while (c->seg_idx < r->nsegs) {
        seg_t *s = &r->segs[c->seg_idx];

        if (s->kind == SEG_FILE && s->sf) {
            if (c->npend > 0)
                break;                       /* what precedes it goes first */
            int r2 = send_file_seg(c, s);
            if (r2 < 0) {
                err = r2;
                goto out_fail;
            }
            if (r2 == 0)
                return;                      /* a chunk write is under way */
            close(s->fd);
            s->fd = -1;
            c->sf_started = false;
            c->seg_idx++;
            continue;
        }
        if (s->kind == SEG_FILE) {
            if (c->fbuf == NULL) {
                c->fbuf = cmn_try_malloc(FILE_CHUNK);
                if (c->fbuf == NULL) {
                    err = -ENOMEM;
                    goto out_fail;
                }
            }
            c->seg_idx++;
            c->file_pos = s->off;
            c->file_rem = s->len;
            err = uv_fs_open(c->srv->loop, &c->fs_req, s->path, O_RDONLY | O_CLOEXEC, 0,
                             on_file_open);
            if (err < 0)
                goto out_fail;
            conn_ref(c);
            return;
        }
        if (c->npend == MAX_WRITE_BUFS)
            break;
        c->pend[c->npend++] = uv_buf_init(s->data, (unsigned)s->len);
        c->seg_idx++;
    }
    if (c->npend > 0) {
        err = write_bufs(c, c->pend, (unsigned)c->npend);
        c->npend = 0;
        if (err < 0)
            goto out_fail;
        return;
    }
    response_done(c);
    return;

out_fail:
    CMN_LOG_W(SUBSYS, "peer=%s response aborted: %s", c->req.peer, uv_strerror(err));
    conn_close(c);
}

static void on_file_open(uv_fs_t *req)
{
    conn_t *c = container_of(req, conn_t, fs_req);
    ssize_t res = req->result;

    uv_fs_req_cleanup(req);
    if (c->state == CONN_CLOSING) {
        if (res >= 0)
            conn_fs_close(c, (uv_file)res);
        c->file_rem = 0;
        conn_unref(c);
        return;
    }
    if (res < 0) {
        CMN_LOG_W(SUBSYS, "peer=%s response file open: %s", c->req.peer,
                  uv_strerror((int)res));
        c->file_rem = 0;
        conn_close(c);
        conn_unref(c);
        return;
    }
    c->file_fd = (uv_file)res;
    send_next(c);
    conn_unref(c);
}

static void on_file_read(uv_fs_t *req)
{
    conn_t *c = container_of(req, conn_t, fs_req);
    ssize_t res = req->result;

    uv_fs_req_cleanup(req);
    if (c->state == CONN_CLOSING) {
        conn_fs_close(c, c->file_fd);
        c->file_fd = -1;
        c->file_rem = 0;
        conn_unref(c);
        return;
    }
    if (res <= 0) {
        /* The file shrank or failed: Content-Length can no longer be met. */
        CMN_LOG_W(SUBSYS, "peer=%s response file read: %s", c->req.peer,
                  res == 0 ? "short file" : uv_strerror((int)res));
        conn_fs_close(c, c->file_fd);
        c->file_fd = -1;
        c->file_rem = 0;
        conn_close(c);
        conn_unref(c);
        return;
    }
    c->file_pos += (uint64_t)res;
    c->file_rem -= (uint64_t)res;
    /* send_next flushes at MAX_WRITE_BUFS before opening a file. */
    CMN_NEVER(c->npend >= MAX_WRITE_BUFS);
    c->pend[c->npend++] = uv_buf_init(c->fbuf, (unsigned)res);
    int err = write_bufs(c, c->pend, (unsigned)c->npend);
    c->npend = 0;
    if (err < 0) {
        conn_fs_close(c, c->file_fd);
        c->file_fd = -1;
        c->file_rem = 0;
        conn_close(c);
    }
    conn_unref(c);
}

static void on_file_close(uv_fs_t *req)
{
    conn_t *c = container_of(req, conn_t, fs_req);

    uv_fs_req_cleanup(req);
    if (c->state != CONN_CLOSING)
        send_next(c);
    conn_unref(c);
}

/* A write_bufs() finished (plain: its uv_write; TLS: its last record).
 * Drops the reference write_bufs took. */
static void write_done(conn_t *c, int status)
{
    if (c->state == CONN_CLOSING) {
        if (c->file_fd >= 0) {
            conn_fs_close(c, c->file_fd);
            c->file_fd = -1;
        }
        c->file_rem = 0;
        conn_unref(c);
        return;
    }
    if (status < 0) {
        CMN_LOG_D(SUBSYS, "peer=%s write: %s", c->req.peer, uv_strerror(status));
        if (c->file_fd >= 0) {
            conn_fs_close(c, c->file_fd);
            c->file_fd = -1;
        }
        c->file_rem = 0;
        conn_close(c);
        conn_unref(c);
        return;
    }
    switch (c->state) {
    case CONN_WRITING: send_next(c); break;
    default: (void)CMN_NEVER(1); conn_close(c); break;
    }
    conn_unref(c);
}

static void on_write(uv_write_t *req, int status)
{
    write_done(container_of(req, conn_t, wreq), status);
}

static void on_shutdown(uv_shutdown_t *req, int status)
{
    conn_t *c = container_of(req, conn_t, sreq);

    (void)status;
    conn_unref(c);
}

static void response_done(conn_t *c)
{
    if (c->tmp_path)
        spool_release(c);
    if (c->tls && !c->tls->wbusy) {
        /* Up to 2 x 256 KiB of record buffers: not kept while idle. */
        cmn_buf_free(&c->tls->fly);
        cmn_tls_out_trim(c->tls->sess);
    }
    if (c->close_after) {
        /* Lingering close: shutdown our side, drain input so the peer reads
         * the response before any RST caused by unread request bytes. */
        conn_set_state(c, CONN_LINGERING);
        request_reset(c);
        c->lo_len = 0;
        if (c->tls) {
            cmn_tls_close_notify(c->tls->sess);
            if (tls_flush(c) < 0) {
                conn_close(c);
                return;
            }
        }
        if (c->tls && cmn_tls_out_len(c->tls->sess) > 0)
            c->tls->want_shutdown = true; /* on_tls_write shuts down after the flush */
        else if (uv_shutdown(&c->sreq, (uv_stream_t *)&c->tcp, on_shutdown) == 0)
            conn_ref(c);
        unsigned ms = c->srv->opts.idle_timeout_ms < LINGER_MS ? c->srv->opts.idle_timeout_ms
                                                               : LINGER_MS;
        timer_arm(c, ms);
        read_start(c);
        return;
    }
    conn_set_state(c, CONN_IDLE);
    request_reset(c);
    timer_arm(c, c->srv->opts.idle_timeout_ms);
    llhttp_resume(&c->parser);
    if (c->lo_len > 0) {
        size_t off = c->lo_off, len = c->lo_len;

        c->lo_off = c->lo_len = 0;
        conn_process(c, c->rbuf + off, len);
    } else {
        read_start(c);
    }
}

/* ------------------------------------------------------------ handlers */

static void work_cb(uv_work_t *w)
{
    conn_t *c = container_of(w, conn_t, work);

    c->route->fn(&c->req, &c->resp);
}

static void after_work_cb(uv_work_t *w, int status)
{
    conn_t *c = container_of(w, conn_t, work);

    if (c->state == CONN_CLOSING || status < 0) {
        /* Peer or server went away: drop the response. */
        if (c->state != CONN_CLOSING)
            conn_close(c);
        conn_unref(c);
        return;
    }
    start_response(c);
    conn_unref(c);
}

static void dispatch(conn_t *c)
{
    cmn_http_req_t *q = &c->req;

    conn_set_state(c, CONN_HANDLING);
    uv_timer_stop(&c->timer);
    if (c->tmp_path) {
        q->body = NULL;
        q->body_file = c->tmp_path;
    } else {
        q->body = c->body.data ? c->body.data : "";
        q->body_file = NULL;
    }
    q->body_len = (size_t)c->body_len;
    if (c->tls) {
        q->tls = true;
        q->tls_client_cn = cmn_tls_peer_cn(c->tls->sess);
        q->tls_client_pubkey_sha256 = cmn_tls_peer_pubkey_sha256(c->tls->sess);
    }
    if (c->route == NULL) {
        resp_set_error(c, 404);
        start_response(c);
        return;
    }
    q->route_ud = c->route->ud;
    apply_forwarded(c);
    c->resp.plain = c->tls == NULL;
    if (c->route->blocking) {
        int err = uv_queue_work(c->srv->loop, &c->work, work_cb, after_work_cb);

        if (err < 0) {
            resp_set_error(c, 500);
            start_response(c);
            return;
        }
        conn_ref(c);
        return;
    }
    c->route->fn(q, &c->resp);
    start_response(c);
}

/* ------------------------------------------------------------ spooling */

static void spool_kick(conn_t *c);

static void spool_finished(conn_t *c)
{
    if (c->spool_fd >= 0) {
        conn_fs_close(c, c->spool_fd);
        c->spool_fd = -1;
    }
    cmn_buf_free(&c->spool_pending);
    cmn_buf_free(&c->spool_inflight);
    dispatch(c);
}

static void spool_failed(conn_t *c, int err)
{
    CMN_LOG_W(SUBSYS, "peer=%s spooling request body: %s", c->req.peer, uv_strerror(err));
    c->spool_err = err;
    /* Inside llhttp_execute, on_body reports spool_err instead. */
    if (!c->in_parser && (c->state == CONN_READING || c->state == CONN_SPOOLING))
        respond_error(c, err == UV_ENOSPC ? 507 : 500);
}

static void on_spool_write(uv_fs_t *req)
{
    conn_t *c = container_of(req, conn_t, spool_req);
    ssize_t res = req->result;

    uv_fs_req_cleanup(req);
    c->spool_busy = false;
    if (c->state != CONN_READING && c->state != CONN_SPOOLING) {
        /* The request was abandoned (error answer, or closing). */
        cmn_buf_free(&c->spool_inflight);
        spool_release(c);
        conn_unref(c);
        return;
    }
    if (res < 0) {
        spool_failed(c, (int)res);
        conn_unref(c);
        return;
    }
    c->spool_off += (uint64_t)res;
    c->spool_inflight_done += (size_t)res;
    if (c->spool_inflight_done >= c->spool_inflight.len) {
        cmn_buf_reset(&c->spool_inflight);
        c->spool_inflight_done = 0;
    }
    spool_kick(c);
    if (c->state == CONN_READING && c->spool_pending.len < SPOOL_HIGH)
        read_start(c);
    conn_unref(c);
}

static void on_spool_mkstemp(uv_fs_t *req)
{
    conn_t *c = container_of(req, conn_t, spool_req);
    ssize_t res = req->result;

    c->spool_busy = false;
    if (res >= 0) {
        c->spool_fd = (uv_file)res;
        c->tmp_path = cmn_xstrdup(req->path);
    }
    uv_fs_req_cleanup(req);
    if (c->state != CONN_READING && c->state != CONN_SPOOLING) {
        spool_release(c);
        conn_unref(c);
        return;
    }
    if (res < 0) {
        spool_failed(c, (int)res);
        conn_unref(c);
        return;
    }
    spool_kick(c);
    if (c->state == CONN_READING && c->spool_pending.len < SPOOL_HIGH)
        read_start(c);
    conn_unref(c);
}

/* Starts the next tmp-file write if there is enough to write (or the body
 * is complete), or dispatches once everything is on disk. */
static void spool_kick(conn_t *c)
{
    if (c->spool_busy || c->spool_err || c->spool_fd < 0)
        return;
    if (c->state != CONN_READING && c->state != CONN_SPOOLING)
        return;
    if (c->spool_inflight.len == 0) {
        if (c->spool_pending.len == 0 ||
            (c->state == CONN_READING && c->spool_pending.len < SPOOL_CHUNK)) {
            if (c->state == CONN_SPOOLING && c->spool_pending.len == 0)
                spool_finished(c);
            return;
        }
        cmn_buf_t t = c->spool_inflight;
        c->spool_inflight = c->spool_pending;
        c->spool_pending = t;
        c->spool_inflight_done = 0;
    }
    uv_buf_t b = uv_buf_init(c->spool_inflight.data + c->spool_inflight_done,
                             (unsigned)(c->spool_inflight.len - c->spool_inflight_done));
    int err = uv_fs_write(c->srv->loop, &c->spool_req, c->spool_fd, &b, 1, (int64_t)c->spool_off,
                          on_spool_write);
    if (err < 0) {
        spool_failed(c, err);
        return;
    }
    c->spool_busy = true;
    conn_ref(c);
}

static int spool_start(conn_t *c)
{
    char tpl[4096];
    int n = snprintf(tpl, sizeof(tpl), "%s/yyhttp-XXXXXX", c->srv->tmp_dir);

    if (n < 0 || (size_t)n >= sizeof(tpl))
        return -ENAMETOOLONG;
    cmn_buf_init(&c->spool_pending, 0);
    cmn_buf_init(&c->spool_inflight, 0);
    c->to_file = true;
    c->spool_fd = -1;
    int err = uv_fs_mkstemp(c->srv->loop, &c->spool_req, tpl, on_spool_mkstemp);
    if (err < 0)
        return err;
    c->spool_busy = true;
    conn_ref(c);
    return 0;
}

/* ------------------------------------------------------------ parser callbacks */

static conn_t *parser_conn(llhttp_t *p)
{
    return p->data;
}

static int head_add(conn_t *c, const char *at, size_t n)
{
    c->head_bytes += n;
    if (c->head_bytes > c->srv->opts.max_header_bytes) {
        c->fail_status = 431;
        return -1;
    }
    if (c->in_body)
        return 0; /* trailers: counted, not kept */
    if (cmn_buf_append(&c->head, at, n) < 0) {
        c->fail_status = 500;
        return -1;
    }
    return 0;
}

/* Ends the current token with a NUL and records its offset. */
static int head_end_token(conn_t *c, bool record)
{
    if (c->in_body)
        return 0;
    if (record) {
        if (c->nhoff / 2 >= MAX_HEADERS) {
            c->fail_status = 431;
            return -1;
        }
        if (c->nhoff == c->caphoff) {
            size_t ncap = c->caphoff ? c->caphoff * 2 : 32;
            c->hoff = cmn_xrealloc(c->hoff, ncap * sizeof(*c->hoff));
            c->caphoff = ncap;
        }
        c->hoff[c->nhoff++] = c->tok_start;
    }
    if (cmn_buf_append(&c->head, "", 1) < 0) {
        c->fail_status = 500;
        return -1;
    }
    c->tok_start = c->head.len;
    c->head_bytes += 4; /* ": " and CRLF */
    return 0;
}

static int on_message_begin(llhttp_t *p)
{
    conn_t *c = parser_conn(p);

    if (c->state == CONN_IDLE) {
        conn_set_state(c, CONN_READING);
        timer_arm(c, c->srv->opts.request_timeout_ms);
    }
    return 0;
}

static int on_url(llhttp_t *p, const char *at, size_t n)
{
    return head_add(parser_conn(p), at, n);
}

static int on_url_complete(llhttp_t *p)
{
    return head_end_token(parser_conn(p), false);
}

static int on_header_field(llhttp_t *p, const char *at, size_t n)
{
    return head_add(parser_conn(p), at, n);
}

static int on_header_field_complete(llhttp_t *p)
{
    return head_end_token(parser_conn(p), true);
}

static int on_header_value(llhttp_t *p, const char *at, size_t n)
{
    return head_add(parser_conn(p), at, n);
}

static int on_header_value_complete(llhttp_t *p)
{
    return head_end_token(parser_conn(p), true);
}

static bool route_matches(const cmn_http_route_t *r, const char *method, const char *path)
{
    if (r->method && strcmp(r->method, method) != 0 &&
        !(strcmp(method, "HEAD") == 0 && strcmp(r->method, "GET") == 0))
        return false;
    return strncmp(path, r->prefix, strlen(r->prefix)) == 0;
}

static void on_continue_written(uv_write_t *req, int status)
{
    (void)status; /* a failure shows up on the next read or write */
    conn_unref(container_of(req, conn_t, creq));
}

static void send_continue(conn_t *c)
{
    static char msg[] = "HTTP/1.1 100 Continue\r\n\r\n";
    uv_buf_t b = uv_buf_init(msg, sizeof(msg) - 1);

    if (c->tls) {
        /* Queued behind nothing: no response is being written while reading. */
        if (cmn_tls_write(c->tls->sess, msg, sizeof(msg) - 1) == 0)
            (void)tls_flush(c);
        return;
    }
    if (uv_write(&c->creq, (uv_stream_t *)&c->tcp, &b, 1, on_continue_written) == 0)
        conn_ref(c);
}

static int on_headers_complete(llhttp_t *p)
{
    conn_t *c = parser_conn(p);
    cmn_http_server_t *srv = c->srv;
    cmn_http_req_t *q = &c->req;
    char *url = c->head.data;
    size_t nh = c->nhoff / 2;

    if (url == NULL || url[0] != '/') {
        c->fail_status = 400;
        return -1;
    }
    c->in_body = true;
    c->hdrs = cmn_xcalloc(nh ? nh : 1, sizeof(*c->hdrs));
    for (size_t i = 0; i < nh; i++) {
        c->hdrs[i].name = c->head.data + c->hoff[2 * i];
        c->hdrs[i].value = c->head.data + c->hoff[2 * i + 1];
    }
    char *qm = strchr(url, '?');
    if (qm) {
        *qm = '\0';
        q->query = qm + 1;
    } else {
        q->query = "";
    }
    q->path = url;
    q->method = llhttp_method_name((llhttp_method_t)llhttp_get_method(p));
    q->headers = c->hdrs;
    q->nheaders = nh;
    c->is_head = llhttp_get_method(p) == HTTP_HEAD;
    c->http10 = llhttp_get_http_major(p) == 1 && llhttp_get_http_minor(p) == 0;

    c->route = NULL;
    for (size_t i = 0; i < srv->nroutes; i++) {
        if (route_matches(&srv->routes[i], q->method, q->path)) {
            c->route = &srv->routes[i];
            break;
        }
    }
    c->max_body = (c->route && c->route->max_body) ? c->route->max_body : srv->opts.max_body;

    if ((p->flags & F_CONTENT_LENGTH) && p->content_length > c->max_body) {
        c->fail_status = 413;
        return -1;
    }
    if ((p->flags & F_CONTENT_LENGTH) && p->content_length > srv->opts.body_mem_limit) {
        int err = spool_start(c);
        if (err < 0) {
            c->fail_status = 500;
            return -1;
        }
    }
    const char *expect = cmn_http_req_header(q, "Expect");
    if (expect && strcasecmp(expect, "100-continue") == 0 && !c->http10 &&
        ((p->flags & F_CHUNKED) || p->content_length > 0))
        send_continue(c);
    return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t n)
{
    conn_t *c = parser_conn(p);

    c->body_len += n;
    if (c->body_len > c->max_body) {
        c->fail_status = 413;
        return -1;
    }
    if (!c->to_file && c->body.len + n > c->srv->opts.body_mem_limit) {
        /* A chunked body outgrew memory: continue in a temp file. */
        cmn_buf_t mem = c->body;
        if (spool_start(c) < 0) {
            c->fail_status = 500;
            return -1;
        }
        cmn_buf_free(&c->spool_pending);
        c->spool_pending = mem;
        c->spool_pending.max = 0;
        cmn_buf_init(&c->body, 0);
    }
    if (c->to_file) {
        if (c->spool_err) {
            c->fail_status = 500;
            return -1;
        }
        if (cmn_buf_append(&c->spool_pending, at, n) < 0) {
            c->fail_status = 500;
            return -1;
        }
        if (c->spool_pending.len >= SPOOL_CHUNK)
            spool_kick(c);
        return 0;
    }
    if (cmn_buf_append(&c->body, at, n) < 0) {
        c->fail_status = 500;
        return -1;
    }
    return 0;
}

static int on_message_complete(llhttp_t *p)
{
    conn_t *c = parser_conn(p);

    /* No protocol upgrades (or CONNECT): answer, then close. */
    c->keep_alive = llhttp_should_keep_alive(p) && !llhttp_get_upgrade(p);
    return HPE_PAUSED;
}

/* ------------------------------------------------------------ reading */

/* Feeds bytes (in rbuf) to the parser and acts on what it found. */
static void conn_process(conn_t *c, const char *data, size_t len)
{
    c->in_parser = true;
    llhttp_errno_t err = llhttp_execute(&c->parser, data, len);
    c->in_parser = false;

    if (c->state == CONN_CLOSING || c->state == CONN_WRITING)
        return; /* a spool failure answered already */
    if (err == HPE_PAUSED) {
        size_t used = (size_t)(llhttp_get_error_pos(&c->parser) - data);

        read_stop(c);
        c->lo_off = (size_t)(data + used - c->rbuf);
        c->lo_len = len - used;
        if (c->state == CONN_IDLE)
            conn_set_state(c, CONN_READING);
        if (c->to_file && c->spool_err) {
            respond_error(c, 500);
        } else if (c->to_file) {
            conn_set_state(c, CONN_SPOOLING);
            spool_kick(c);
        } else {
            dispatch(c);
        }
        return;
    }
    if (err != HPE_OK) {
        int status = c->fail_status ? c->fail_status : 400;

        CMN_LOG_D(SUBSYS, "peer=%s bad request: %s (%s)", c->req.peer, llhttp_errno_name(err),
                  llhttp_get_error_reason(&c->parser));
        respond_error(c, status);
        return;
    }
    if (c->to_file && c->spool_busy && c->spool_pending.len >= SPOOL_HIGH)
        read_stop(c); /* on_spool_write restarts reading */
    else
        read_start(c);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    conn_t *c = h->data;

    (void)suggested;
    if (c->tls) {
        char *p;
        size_t room;

        cmn_tls_in_space(c->tls->sess, &p, &room);
        *buf = uv_buf_init(p, (unsigned)room); /* room 0: on_read gets UV_ENOBUFS */
        return;
    }
    *buf = uv_buf_init(c->rbuf, RBUF_SIZE);
}

static void tls_pump_in(conn_t *c);

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    conn_t *c = s->data;

    (void)buf;
    if (nread == 0)
        return;
    if (nread < 0) {
        if (nread != UV_EOF)
            CMN_LOG_D(SUBSYS, "peer=%s read: %s", c->req.peer, uv_strerror((int)nread));
        conn_close(c);
        return;
    }
    if (c->tls) {
        cmn_tls_in_commit(c->tls->sess, (size_t)nread);
        tls_pump_in(c);
        return;
    }
    switch (c->state) {
    case CONN_IDLE:
    case CONN_READING: conn_process(c, c->rbuf, (size_t)nread); break;
    case CONN_LINGERING: break; /* discard */
    default: read_stop(c); break;
    }
}

static void on_timer(uv_timer_t *t)
{
    conn_t *c = container_of(t, conn_t, timer);

    switch (c->state) {
    case CONN_READING:
    case CONN_SPOOLING:
        CMN_LOG_D(SUBSYS, "peer=%s request timeout", c->req.peer);
        if (c->spool_busy) {
            conn_close(c);
            break;
        }
        respond_error(c, 408);
        break;
    case CONN_IDLE:
    case CONN_WRITING:
    case CONN_LINGERING: conn_close(c); break;
    default: break;
    }
}

/* ------------------------------------------------------------ TLS */

static void tls_sock_start(conn_t *c)
{
    conn_tls_t *t = c->tls;

    if (t->sock_reading || c->state == CONN_CLOSING)
        return;
    if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) < 0) {
        conn_close(c);
        return;
    }
    t->sock_reading = true;
}

static void tls_read_stop(conn_t *c)
{
    conn_tls_t *t = c->tls;

    c->reading = false;
    if (t->sock_reading) {
        uv_read_stop((uv_stream_t *)&c->tcp);
        t->sock_reading = false;
    }
}

static void tls_read_start(conn_t *c)
{
    if (c->state == CONN_CLOSING)
        return;
    c->reading = true;
    if (!c->tls->pumping)
        tls_pump_in(c); /* else the running pump sees c->reading */
}

/* A plain HTTP request on the TLS port: the client has an http:// URL for an
 * https server and only sees "empty reply" (the connection is closed without
 * an answer), so say so here, at most once a minute. */
static void log_plain_http(conn_t *c)
{
    cmn_http_server_t *srv = c->srv;
    uint64_t now = uv_now(srv->loop);

    if (srv->plain_http_logged && now - srv->plain_http_log_ms < PLAIN_HTTP_LOG_MS) {
        srv->plain_http_quiet++;
        return;
    }
    CMN_LOG_W(SUBSYS,
              "peer=%s sent plain HTTP to the TLS port, closed without an answer (its URL must "
              "be https://); %u more since the last warning",
              c->req.peer, srv->plain_http_quiet);
    srv->plain_http_logged = true;
    srv->plain_http_log_ms = now;
    srv->plain_http_quiet = 0;
}

/* Runs the handshake, then decrypts buffered records into rbuf and feeds
 * them to the parser while it wants input; starts socket reads once the
 * buffer is drained. Never re-entered: read_start() from inside only sets
 * c->reading. */
static void tls_pump_in(conn_t *c)
{
    conn_tls_t *t = c->tls;
    bool want_sock = false;

    if (t->pumping)
        return;
    t->pumping = true;
    while (c->state != CONN_CLOSING) {
        if (!cmn_tls_is_established(t->sess)) {
            int rc = cmn_tls_handshake(t->sess);

            if (tls_flush(c) < 0) {
                conn_close(c);
                break;
            }
            if (rc == CMN_TLS_AGAIN) {
                want_sock = true;
                break;
            }
            if (rc < 0) {
                const char *why = cmn_tls_last_error(t->sess);

                if (cmn_tls_is_plain_http(t->sess))
                    log_plain_http(c);
                else if (strncmp(why, "client certificate", 18) == 0)
                    CMN_LOG_W(SUBSYS, "peer=%s TLS handshake refused: %s", c->req.peer, why);
                else
                    CMN_LOG_D(SUBSYS, "peer=%s TLS handshake failed: %s", c->req.peer, why);
                conn_close(c);
                break;
            }
            CMN_LOG_D(SUBSYS, "peer=%s TLS established suite=%s client=%s", c->req.peer,
                      cmn_tls_ciphersuite(t->sess),
                      cmn_tls_peer_cn(t->sess) ? cmn_tls_peer_cn(t->sess) : "-");
            timer_arm(c, c->srv->opts.idle_timeout_ms);
            continue;
        }
        if (!c->reading)
            break;
        if (c->state != CONN_IDLE && c->state != CONN_READING && c->state != CONN_LINGERING)
            break;
        int n = cmn_tls_read(t->sess, c->rbuf, RBUF_SIZE);
        if (n > 0) {
            if (c->state != CONN_LINGERING)
                conn_process(c, c->rbuf, (size_t)n);
            continue;
        }
        if (tls_flush(c) < 0) {
            conn_close(c);
            break;
        }
        if (n == CMN_TLS_AGAIN) {
            want_sock = true;
            break;
        }
        if (n == CMN_TLS_CLOSED)
            CMN_LOG_D(SUBSYS, "peer=%s TLS close_notify", c->req.peer);
        else
            CMN_LOG_D(SUBSYS, "peer=%s TLS read: %s", c->req.peer, cmn_tls_last_error(t->sess));
        conn_close(c);
        break;
    }
    t->pumping = false;
    if (want_sock && c->state != CONN_CLOSING &&
        (c->reading || !cmn_tls_is_established(t->sess)))
        tls_sock_start(c);
}

static void on_tls_write(uv_write_t *req, int status);

/* Starts writing the session's pending records unless a write is in flight
 * (on_tls_write calls again). 0 or a uv error. */
static int tls_flush(conn_t *c)
{
    conn_tls_t *t = c->tls;

    if (t->wbusy || cmn_tls_out_len(t->sess) == 0)
        return 0;
    cmn_tls_out_take(t->sess, &t->fly);
    uv_buf_t b = uv_buf_init(t->fly.data, (unsigned)t->fly.len);
    int err = uv_write(&t->wreq, (uv_stream_t *)&c->tcp, &b, 1, on_tls_write);
    if (err < 0) {
        cmn_buf_reset(&t->fly);
        return err;
    }
    t->wbusy = true;
    conn_ref(c);
    return 0;
}

/* Encrypts up to TLS_FLIGHT bytes of the app write's pieces. Small pieces
 * (status line and headers, short bodies) share records. */
static int tls_encrypt_some(conn_t *c)
{
    conn_tls_t *t = c->tls;
    size_t budget = TLS_FLIGHT;
    char stage[TLS_RECORD];
    size_t staged = 0;
    int err;

    while (t->isrc < t->nsrc && budget > 0) {
        const uv_buf_t *b = &t->src[t->isrc];
        size_t rem = b->len - t->srcoff;
        size_t n;

        if (rem == 0) {
            t->isrc++;
            t->srcoff = 0;
            continue;
        }
        if (staged == 0 && rem >= sizeof(stage)) {
            n = rem < budget ? rem : budget;
            err = cmn_tls_write(t->sess, b->base + t->srcoff, n);
            if (err < 0)
                return err;
        } else {
            n = sizeof(stage) - staged;
            if (n > rem)
                n = rem;
            if (n > budget)
                n = budget;
            memcpy(stage + staged, b->base + t->srcoff, n);
            staged += n;
            if (staged == sizeof(stage)) {
                err = cmn_tls_write(t->sess, stage, staged);
                if (err < 0)
                    return err;
                staged = 0;
            }
        }
        t->srcoff += n;
        budget -= n;
        if (t->srcoff == b->len) {
            t->isrc++;
            t->srcoff = 0;
        }
    }
    if (staged > 0)
        return cmn_tls_write(t->sess, stage, staged);
    return 0;
}

/* write_bufs() for TLS: the pieces must stay valid until write_done(). */
static int tls_write_bufs(conn_t *c, uv_buf_t *bufs, unsigned n)
{
    conn_tls_t *t = c->tls;
    int err;

    if (CMN_NEVER(t->app_write || n > MAX_WRITE_BUFS))
        return UV_EINVAL;
    memcpy(t->src, bufs, n * sizeof(*bufs));
    t->nsrc = n;
    t->isrc = 0;
    t->srcoff = 0;
    err = tls_encrypt_some(c);
    if (err == 0)
        err = tls_flush(c);
    if (err < 0) {
        t->nsrc = 0;
        return err < -10000 ? UV_EPROTO : err; /* callers log uv_strerror */
    }
    t->app_write = true;
    conn_ref(c);
    timer_arm(c, c->srv->opts.idle_timeout_ms);
    return 0;
}

/* Ends the app write with status (its reference is dropped by write_done). */
static void tls_app_write_done(conn_t *c, int status)
{
    c->tls->app_write = false;
    c->tls->nsrc = 0;
    write_done(c, status);
}

static void on_tls_write(uv_write_t *req, int status)
{
    conn_tls_t *t = container_of(req, conn_tls_t, wreq);
    conn_t *c = t->c;
    int err = 0;

    t->wbusy = false;
    cmn_buf_reset(&t->fly);
    if (status < 0 || c->state == CONN_CLOSING) {
        if (status < 0 && c->state != CONN_CLOSING)
            CMN_LOG_D(SUBSYS, "peer=%s write: %s", c->req.peer, uv_strerror(status));
        if (t->app_write)
            tls_app_write_done(c, status < 0 ? status : UV_ECANCELED);
        else if (c->state != CONN_CLOSING)
            conn_close(c);
        conn_unref(c);
        return;
    }
    if (t->app_write && t->isrc < t->nsrc)
        err = tls_encrypt_some(c);
    if (err == 0 && t->app_write && t->isrc >= t->nsrc && cmn_tls_out_len(t->sess) == 0) {
        /* Every record of the pieces is written: may start the next write. */
        tls_app_write_done(c, 0);
    } else if (err == 0 && c->state == CONN_WRITING) {
        /* Progress restarts the stall timer. Only while WRITING: the other
         * states' records (close_notify, alerts, "100 Continue") must not
         * replace their timers (LINGERING would last the idle timeout). */
        timer_arm(c, c->srv->opts.idle_timeout_ms);
    }
    if (err == 0 && c->state != CONN_CLOSING)
        err = tls_flush(c);
    if (err < 0) {
        CMN_LOG_D(SUBSYS, "peer=%s TLS write failed", c->req.peer);
        if (t->app_write)
            tls_app_write_done(c, UV_EPROTO);
        else
            conn_close(c);
    } else if (t->want_shutdown && cmn_tls_out_len(t->sess) == 0 && c->state != CONN_CLOSING) {
        t->want_shutdown = false;
        if (uv_shutdown(&c->sreq, (uv_stream_t *)&c->tcp, on_shutdown) == 0)
            conn_ref(c);
    }
    conn_unref(c);
}

/* ------------------------------------------------------------ accept */

static void on_connection(uv_stream_t *ls, int status)
{
    cmn_http_server_t *srv = ls->data;

    if (status < 0) {
        CMN_LOG_W(SUBSYS, "accept: %s", uv_strerror(status));
        return;
    }
    conn_t *c = cmn_xcalloc(1, sizeof(*c));
    c->srv = srv;
    c->rbuf = cmn_xmalloc(RBUF_SIZE);
    c->spool_fd = -1;
    c->file_fd = -1;
    c->max_body = srv->opts.max_body;
    cmn_buf_init(&c->head, 0);
    cmn_buf_init(&c->body, 0);
    resp_init(&c->resp);
    c->next = srv->conns;
    if (srv->conns)
        srv->conns->prev = c;
    srv->conns = c;
    srv->nconns++;

    uv_tcp_init(srv->loop, &c->tcp);
    uv_timer_init(srv->loop, &c->timer);
    c->tcp.data = c;
    c->timer.data = c;
    c->refs = 2;
    c->state = CONN_IDLE;
    if (uv_accept(ls, (uv_stream_t *)&c->tcp) < 0) {
        conn_close(c);
        return;
    }
    if (srv->nconns > srv->opts.max_connections || srv->closing) {
        CMN_LOG_W(SUBSYS, "too many connections (%d), refusing one", srv->nconns - 1);
        conn_close(c);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    if (srv->tls_conf) {
        c->tls = cmn_xcalloc(1, sizeof(*c->tls));
        c->tls->c = c;
        cmn_buf_init(&c->tls->fly, 0);
        if (cmn_tls_create(srv->tls_conf, &c->tls->sess) < 0) {
            CMN_LOG_W(SUBSYS, "TLS session setup failed, refusing a connection");
            conn_close(c);
            return;
        }
    }

    struct sockaddr_storage ss;
    int sl = sizeof(ss);
    if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&ss, &sl) == 0) {
        if (ss.ss_family == AF_INET6)
            uv_ip6_name((struct sockaddr_in6 *)&ss, c->req.peer, sizeof(c->req.peer));
        else
            uv_ip4_name((struct sockaddr_in *)&ss, c->req.peer, sizeof(c->req.peer));
    }
    memcpy(c->sock_peer, c->req.peer, sizeof(c->sock_peer));

    llhttp_init(&c->parser, HTTP_REQUEST, &parser_settings);
    c->parser.data = c;
    timer_arm(c, c->tls ? srv->opts.tls_handshake_timeout_ms : srv->opts.idle_timeout_ms);
    read_start(c);
}

/* ------------------------------------------------------------ server */

static void init_settings(void)
{
    llhttp_settings_init(&parser_settings);
    parser_settings.on_message_begin = on_message_begin;
    parser_settings.on_url = on_url;
    parser_settings.on_url_complete = on_url_complete;
    parser_settings.on_header_field = on_header_field;
    parser_settings.on_header_field_complete = on_header_field_complete;
    parser_settings.on_header_value = on_header_value;
    parser_settings.on_header_value_complete = on_header_value_complete;
    parser_settings.on_headers_complete = on_headers_complete;
    parser_settings.on_body = on_body;
    parser_settings.on_message_complete = on_message_complete;
}

static void on_listener_close(uv_handle_t *h);

int cmn_http_server_create(uv_loop_t *loop, const cmn_http_server_opts_t *opts,
                           const cmn_http_route_t *routes, size_t nroutes,
                           cmn_http_server_t **out)
{
    static uv_once_t once = UV_ONCE_INIT;
    struct sockaddr_storage ss;
    int err;

    uv_once(&once, init_settings);
    cmn_http_server_t *srv = cmn_xcalloc(1, sizeof(*srv));
    srv->loop = loop;
    srv->routes = routes;
    srv->nroutes = nroutes;
    srv->opts = *opts;
    srv->host = cmn_xstrdup(opts->host ? opts->host : "127.0.0.1");
    srv->tmp_dir = cmn_xstrdup(opts->tmp_dir ? opts->tmp_dir : "/tmp");
    srv->opts.host = srv->host;
    srv->opts.tmp_dir = srv->tmp_dir;
    if (!srv->opts.max_header_bytes)
        srv->opts.max_header_bytes = 16 * 1024;
    if (!srv->opts.max_body)
        srv->opts.max_body = 1024 * 1024;
    if (!srv->opts.body_mem_limit)
        srv->opts.body_mem_limit = 8 * 1024 * 1024;
    if (!srv->opts.idle_timeout_ms)
        srv->opts.idle_timeout_ms = 60 * 1000;
    if (!srv->opts.request_timeout_ms)
        srv->opts.request_timeout_ms = 300 * 1000;
    if (srv->opts.max_connections <= 0)
        srv->opts.max_connections = 1024;
    if (!srv->opts.tls_handshake_timeout_ms)
        srv->opts.tls_handshake_timeout_ms = TLS_HANDSHAKE_MS;
    if ((opts->tls_cert_file == NULL) != (opts->tls_key_file == NULL) ||
        (opts->tls_client_ca_file && opts->tls_cert_file == NULL)) {
        CMN_LOG_E(SUBSYS, "TLS needs both a certificate and a key file");
        err = CMN_ECONFIG;
        goto out_free;
    }
    if (opts->tls_cert_file) {
        err = cmn_tls_conf_create(opts->tls_cert_file, opts->tls_key_file,
                                  opts->tls_client_ca_file, &srv->tls_conf);
        if (err < 0)
            goto out_free;
    }
    /* Parsed once; the caller's strings are not kept. */
    srv->opts.tls_cert_file = srv->opts.tls_key_file = srv->opts.tls_client_ca_file = NULL;

    if (strchr(srv->host, ':'))
        err = uv_ip6_addr(srv->host, opts->port, (struct sockaddr_in6 *)&ss);
    else
        err = uv_ip4_addr(srv->host, opts->port, (struct sockaddr_in *)&ss);
    if (err < 0)
        goto out_free;
    err = uv_tcp_init(loop, &srv->listener);
    if (err < 0)
        goto out_free;
    srv->listener.data = srv;
    err = uv_tcp_bind(&srv->listener, (struct sockaddr *)&ss, 0);
    if (err == 0)
        err = uv_listen((uv_stream_t *)&srv->listener, 511, on_connection);
    if (err < 0)
        goto out_close;

    int sl = sizeof(ss);
    err = uv_tcp_getsockname(&srv->listener, (struct sockaddr *)&ss, &sl);
    if (err < 0)
        goto out_close;
    srv->port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                                : ((struct sockaddr_in *)&ss)->sin_port);
    CMN_LOG_D(SUBSYS, "listening on %s:%d%s", srv->host, srv->port,
              srv->tls_conf ? " (TLS)" : "");
    *out = srv;
    return 0;

out_close:
    /* The listener memory may only go in its close callback. */
    srv->closing = true;
    uv_close((uv_handle_t *)&srv->listener, on_listener_close);
    return err;
out_free:
    cmn_tls_conf_destroy(srv->tls_conf);
    free(srv->host);
    free(srv->tmp_dir);
    free(srv);
    return err;
}

int cmn_http_server_port(const cmn_http_server_t *srv)
{
    return srv->port;
}

static void on_listener_close(uv_handle_t *h)
{
    cmn_http_server_t *srv = h->data;

    srv->listener_closed = true;
    server_maybe_done(srv);
}

void cmn_http_server_close(cmn_http_server_t *srv, void (*done)(void *ud), void *ud)
{
    if (srv->closing)
        return;
    srv->closing = true;
    srv->done = done;
    srv->done_ud = ud;
    uv_close((uv_handle_t *)&srv->listener, on_listener_close);
    for (conn_t *c = srv->conns, *next; c; c = next) {
        next = c->next;
        if (c->state == CONN_HANDLING && c->route && c->route->blocking)
            uv_cancel((uv_req_t *)&c->work);
        conn_close(c);
    }
}
