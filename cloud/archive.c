/*
 * archive.c - the archive: a local directory (embedded default) or S3
 * object storage with the local directory as read-through cache.
 *
 * Layout under archive.dir:
 *   <s0s1>/<study hash>/<series hash>/<sop hash>.dcm   archived instances
 *   conflicts/<sop hash>/<sha256>.dcm                   conflicting copies
 * where each hash is the first 32 hex digits of SHA-256(UID): any UID becomes
 * a safe, fixed-length file name and studies spread over 256 directories.
 *
 * Writes are atomic: the content is written to a temporary name in the same
 * file system and fsync'd, renamed into place, and the directory fsync'd, so
 * a crash leaves either no file or the whole file, never a partial one.
 * Every call blocks (file I/O): run them on the threadpool.
 *
 * Backend "s3" (archive.backend): the same layout is the object key space
 * (key = archive.s3_prefix + path relative to archive.dir, e.g.
 * "ab/<study>/<series>/<sop>.dcm"). cloud_archive_place_sha() uploads first
 * (x-amz-content-sha256 = the file's SHA-256, so the server refuses a
 * corrupted body; an object exists only once complete) and only then renames
 * the file into the local directory, which serves as a cache. Readers call
 * cloud_archive_fetch() before opening a path (downloads a missing file,
 * temp name + rename) or cloud_archive_read_range() for frames (ranged GET
 * when not cached). The S3 client is created once (cloud_archive_open(), or
 * lazily) and is shared by all threadpool workers.
 *
 * Cache (backend "s3", archive.cache_max_mb > 0): every placed or fetched
 * file counts towards the cap; a hit refreshes the file's atime (set
 * explicitly: relatime/noatime mounts do not). When the count passes the
 * cap, the thread that passed it scans the cache and unlinks the least
 * recently used files down to 90 % of the cap. A file is evicted only if
 * (a) its last use is older than archive.cache_min_age_s (a response being
 * streamed from it keeps working: the server opens files after the handler
 * returned), and (b) HEAD shows an object of the same size in the bucket
 * (so a file left from a "dir" archive, or one whose upload never finished,
 * is never the only copy that is deleted). One eviction runs at a time.
 */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cmn/crypto.h"
#include "cmn/errors.h"
#include "cmn/fs.h"
#include "cmn/log.h"
#include "cmn/s3.h"
#include "internal.h"

const cmn_conf_opt_t cloud__archive_opts[] = {
    CMN_CONF_OPT_STR(cloud_archive_conf_t, dir, "var/cloud/archive",
                     "archive root directory for DICOM instances (the cache with backend s3)"),
    CMN_CONF_OPT_STR(cloud_archive_conf_t, backend, "dir",
                     "where instances live: dir (archive.dir) or s3 (object storage)"),
    CMN_CONF_OPT_STR(cloud_archive_conf_t, s3_endpoint, "",
                     "S3 endpoint URL, http(s)://host[:port][/path]"),
    CMN_CONF_OPT_STR(cloud_archive_conf_t, s3_region, "us-east-1", "S3 SigV4 region"),
    CMN_CONF_OPT_STR(cloud_archive_conf_t, s3_bucket, "", "S3 bucket (must exist)"),
    CMN_CONF_OPT_STR(cloud_archive_conf_t, s3_access_key, "", "S3 access key id"),
    CMN_CONF_OPT_STR(cloud_archive_conf_t, s3_secret_file, "",
                     "file holding the S3 secret key (relative paths: to the working directory)"),
    CMN_CONF_OPT_BOOL(cloud_archive_conf_t, s3_path_style, 1,
                      "path-style URLs (ENDPOINT/BUCKET/KEY); false = virtual-host style"),
    CMN_CONF_OPT_STR(cloud_archive_conf_t, s3_prefix, "",
                     "prefix of every object key (e.g. \"site1/\"), so clouds can share a bucket"),
    CMN_CONF_OPT_INT(cloud_archive_conf_t, cache_max_mb, 0, 0, 1LL << 30,
                     "backend s3: cap on the local cache (archive.dir), MiB; least recently used"
                     " files already in the bucket are evicted; 0 = no cap"),
    CMN_CONF_OPT_INT(cloud_archive_conf_t, cache_min_age_s, 300, 0, 86400,
                     "backend s3: a cached file used within this many seconds is not evicted"),
};
const size_t cloud__archive_nopts = CMN_ARRAY_SIZE(cloud__archive_opts);

/* ------------------------------------------------------------ backend */

static pthread_mutex_t s3_mu = PTHREAD_MUTEX_INITIALIZER;
static cmn_s3_t *archive_s3;       /* shared client once created (guarded by s3_mu) */

static const char *key_prefix(void)
{
    return cloud_conf->archive.s3_prefix ? cloud_conf->archive.s3_prefix : "";
}

bool cloud_archive_is_s3(void)
{
    const char *b = cloud_conf->archive.backend;

    return b && strcmp(b, "s3") == 0;
}

/* The S3 client, created on first use. 0 with *out NULL for backend "dir". */
static int archive_client(cmn_s3_t **out)
{
    const cloud_archive_conf_t *c = &cloud_conf->archive;
    int rc = 0;

    *out = NULL;
    if (!c->backend || !*c->backend || strcmp(c->backend, "dir") == 0)
        return 0;
    if (strcmp(c->backend, "s3") != 0) {
        CMN_LOG_E("archive", "archive.backend: \"%s\" is neither \"dir\" nor \"s3\"", c->backend);
        return CMN_ECONFIG;
    }
    pthread_mutex_lock(&s3_mu);
    if (!archive_s3) {
        cmn_s3_conf_t sc = {
            .endpoint = c->s3_endpoint,
            .region = c->s3_region,
            .bucket = c->s3_bucket,
            .access_key = c->s3_access_key,
            .secret_file = c->s3_secret_file,
            .path_style = c->s3_path_style,
        };
        if (!c->s3_endpoint || !*c->s3_endpoint || !c->s3_bucket || !*c->s3_bucket ||
            !c->s3_access_key || !*c->s3_access_key || !c->s3_secret_file ||
            !*c->s3_secret_file) {
            CMN_LOG_E("archive", "archive.backend s3 needs s3_endpoint, s3_bucket, "
                      "s3_access_key and s3_secret_file");
            rc = CMN_ECONFIG;
        } else if (c->s3_prefix && (c->s3_prefix[0] == '/' || strlen(c->s3_prefix) > 256)) {
            CMN_LOG_E("archive", "archive.s3_prefix must not start with '/' (max 256 bytes)");
            rc = CMN_ECONFIG;
        } else {
            rc = cmn_s3_create(&sc, &archive_s3);
            if (rc < 0)
                rc = CMN_ECONFIG;
        }
    }
    *out = archive_s3;
    pthread_mutex_unlock(&s3_mu);
    return rc;
}

int cloud__archive_s3(struct cmn_s3 **out)
{
    return archive_client(out);
}

const char *cloud__archive_prefix(void)
{
    return key_prefix();
}

int cloud_archive_open(void)
{
    cmn_s3_t *s3;

    return archive_client(&s3);
}

/* Lists a prefix that holds nothing: proves endpoint, bucket and credentials. */
static int probe_cb(const cmn_s3_obj_t *obj, void *arg)
{
    (void)obj;
    (void)arg;
    return 1;
}

int cloud_archive_probe(void)
{
    char prefix[512];
    cmn_s3_t *s3;
    int rc;

    rc = archive_client(&s3);
    if (rc < 0 || !s3)
        return rc;
    snprintf(prefix, sizeof(prefix), "%s.yy-probe/", key_prefix());
    rc = cmn_s3_list(s3, prefix, probe_cb, NULL);
    if (rc == 1)
        rc = 0;
    if (rc < 0)
        CMN_LOG_E("archive", "S3 bucket=%s not usable: %s", cloud_conf->archive.s3_bucket,
                  cmn_strerror(rc));
    return rc;
}

void cloud_archive_shutdown(void)
{
    pthread_mutex_lock(&s3_mu);
    cmn_s3_destroy(archive_s3);
    archive_s3 = NULL;
    pthread_mutex_unlock(&s3_mu);
}

/* archive.dir without trailing slashes: its length. */
static size_t dir_len(void)
{
    const char *dir = cloud_conf->archive.dir;
    size_t n = strlen(dir);

    while (n > 1 && dir[n - 1] == '/')
        n--;
    return n;
}

/* The path relative to archive.dir, or NULL when path is not under it. */
static const char *archive_rel(const char *path)
{
    size_t n = dir_len();

    if (strncmp(path, cloud_conf->archive.dir, n) != 0 || path[n] != '/' || path[n + 1] == '\0')
        return NULL;
    return path + n + 1;
}

/* The object key of an archive path: s3_prefix + the path relative to archive.dir. */
static int archive_key(const char *path, char *out, size_t outlen)
{
    const char *rel = archive_rel(path);
    int n;

    if (!rel)
        return -EINVAL;
    n = snprintf(out, outlen, "%s%s", key_prefix(), rel);
    return (n < 0 || (size_t)n >= outlen) ? -ENAMETOOLONG : 0;
}

int cloud_archive_key(const char *path, char *out, size_t outlen)
{
    return archive_key(path, out, outlen);
}

static void uid_hash(const char *uid, char out[33])
{
    uint8_t h[CMN_SHA256_LEN];
    char hex[CMN_SHA256_HEX_LEN + 1];

    cmn_sha256(uid, strlen(uid), h);
    cmn_hex(h, sizeof(h), hex);
    memcpy(out, hex, 32);
    out[32] = '\0';
}

int cloud_archive_path(const char *study_uid, const char *series_uid, const char *sop_uid,
                       char *out, size_t outlen)
{
    char st[33], se[33], so[33];
    int n;

    uid_hash(study_uid, st);
    uid_hash(series_uid, se);
    uid_hash(sop_uid, so);
    n = snprintf(out, outlen, "%s/%.2s/%s/%s/%s.dcm", cloud_conf->archive.dir, st, st, se, so);
    return (n < 0 || (size_t)n >= outlen) ? -ENAMETOOLONG : 0;
}

int cloud_archive_conflict_path(const char *sop_uid, const char *sha256, char *out,
                                size_t outlen)
{
    char so[33];
    int n;

    uid_hash(sop_uid, so);
    n = snprintf(out, outlen, "%s/conflicts/%s/%s.dcm", cloud_conf->archive.dir, so, sha256);
    return (n < 0 || (size_t)n >= outlen) ? -ENAMETOOLONG : 0;
}

static void dir_of(const char *path, char *out, size_t outlen)
{
    const char *slash = strrchr(path, '/');

    if (!slash)
        snprintf(out, outlen, ".");
    else if (slash == path)
        snprintf(out, outlen, "/");
    else
        snprintf(out, outlen, "%.*s", (int)(slash - path), path);
}

/* ------------------------------------------------------------- cache */

static struct {
    pthread_mutex_t mu;
    bool known;                  /* bytes was measured by a scan */
    bool evicting;               /* a thread is evicting (only one at a time) */
    uint64_t bytes;              /* cached bytes (grows on place/fetch; reset by each scan) */
} cache = { .mu = PTHREAD_MUTEX_INITIALIZER };

typedef struct {
    char *path;                  /* malloc'd */
    int64_t used;                /* atime, unix seconds */
    uint64_t size;
} cache_ent_t;

/* nftw has no user argument: one scan at a time (cache.evicting) owns these. */
static cache_ent_t *scan_ents;
static size_t scan_n, scan_cap;
static uint64_t scan_total;

static int scan_cb(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    size_t n = strlen(p);

    (void)ftw;
    if (flag != FTW_F || n < 5 || strcmp(p + n - 4, ".dcm") != 0)
        return 0;
    if (scan_n == scan_cap) {
        scan_cap = scan_cap ? scan_cap * 2 : 1024;
        scan_ents = cmn_xrealloc(scan_ents, scan_cap * sizeof(*scan_ents));
    }
    scan_ents[scan_n].path = cmn_xstrdup(p);
    scan_ents[scan_n].used = (int64_t)sb->st_atime;
    scan_ents[scan_n].size = (uint64_t)sb->st_size;
    scan_n++;
    scan_total += (uint64_t)sb->st_size;
    return 0;
}

static int ent_cmp(const void *a, const void *b)
{
    const cache_ent_t *x = a, *y = b;

    return x->used < y->used ? -1 : x->used > y->used;
}

/* True when the bucket holds an object of the same size as the cached file. */
static bool safely_in_s3(cmn_s3_t *s3, const cache_ent_t *e)
{
    char key[CMN_S3_MAX_KEY + 1];
    cmn_s3_stat_t st;

    if (archive_key(e->path, key, sizeof(key)) < 0)
        return false;
    return cmn_s3_head(s3, key, &st) == 0 && st.size == e->size;
}

/*
 * Scans the cache and evicts LRU files down to 90 % of the cap, never keep
 * (the file the caller is about to serve; may be NULL). The caller set
 * cache.evicting.
 */
static void cache_evict(cmn_s3_t *s3, const char *keep)
{
    uint64_t cap = (uint64_t)cloud_conf->archive.cache_max_mb << 20;
    uint64_t goal = cap / 10 * 9;
    int64_t young = (int64_t)time(NULL) - cloud_conf->archive.cache_min_age_s;
    uint64_t freed = 0;
    size_t evicted = 0;

    scan_n = 0;
    scan_total = 0;
    nftw(cloud_conf->archive.dir, scan_cb, 32, FTW_PHYS);
    uint64_t total = scan_total;
    if (total > cap) {
        qsort(scan_ents, scan_n, sizeof(*scan_ents), ent_cmp);
        for (size_t i = 0; i < scan_n && total > goal; i++) {
            cache_ent_t *e = &scan_ents[i];
            if (e->used > young)
                break;   /* sorted: every later file was used more recently */
            if ((keep && strcmp(e->path, keep) == 0) || !safely_in_s3(s3, e))
                continue;
            if (unlink(e->path) == 0) {
                total -= e->size;
                freed += e->size;
                evicted++;
            }
        }
    }
    for (size_t i = 0; i < scan_n; i++)
        free(scan_ents[i].path);
    free(scan_ents);
    scan_ents = NULL;
    scan_n = scan_cap = 0;
    if (evicted)
        CMN_LOG_I("archive", "cache evicted files=%zu bytes=%" PRIu64 " cached=%" PRIu64
                  " cap=%" PRIu64, evicted, freed, total, cap);
    else if (total > cap)
        CMN_LOG_D("archive", "cache over cap (cached=%" PRIu64 " cap=%" PRIu64 "): nothing"
                  " evictable yet", total, cap);
    pthread_mutex_lock(&cache.mu);
    cache.bytes = total;
    cache.known = true;
    cache.evicting = false;
    pthread_mutex_unlock(&cache.mu);
}

/* Counts bytes newly cached at path and evicts (others) when over the cap (S3 backend only). */
static void cache_added(cmn_s3_t *s3, const char *path, uint64_t bytes)
{
    uint64_t cap = (uint64_t)cloud_conf->archive.cache_max_mb << 20;
    bool run = false;

    if (!s3 || cap == 0)
        return;
    pthread_mutex_lock(&cache.mu);
    cache.bytes += bytes;
    if (!cache.evicting && (!cache.known || cache.bytes > cap)) {
        cache.evicting = true;
        run = true;
    }
    pthread_mutex_unlock(&cache.mu);
    if (run)
        cache_evict(s3, path);
}

int cloud_archive_cache_trim(void)
{
    cmn_s3_t *s3;
    int rc = archive_client(&s3);

    if (rc < 0 || !s3 || cloud_conf->archive.cache_max_mb == 0)
        return rc;
    pthread_mutex_lock(&cache.mu);
    if (cache.evicting) {
        pthread_mutex_unlock(&cache.mu);
        return 0;
    }
    cache.evicting = true;
    pthread_mutex_unlock(&cache.mu);
    cache_evict(s3, NULL);
    return 0;
}

/* Marks a cache hit: atime = now, written only when older than a minute. */
static void cache_touch(const char *path, const struct stat *sb)
{
    struct timespec ts[2] = { { 0, UTIME_NOW }, { 0, UTIME_OMIT } };

    if ((int64_t)sb->st_atime < (int64_t)time(NULL) - 60)
        utimensat(AT_FDCWD, path, ts, 0);
}

/* ------------------------------------------------------------ placement */

/* Directory syncs deferred by cloud_archive_defer_dir_sync(), per thread. */
#define DEFER_DIRS 16
static _Thread_local struct {
    bool on;
    int n;
    bool overflow;                     /* more distinct dirs than fit: synced at once */
    char dirs[DEFER_DIRS][4096];
} defer;

void cloud_archive_defer_dir_sync(void)
{
    defer.on = true;
    defer.n = 0;
    defer.overflow = false;
}

int cloud_archive_flush_dir_sync(void)
{
    int rc = 0;
    for (int i = 0; i < defer.n; i++) {
        int r = cmn_fsync_dir(defer.dirs[i]);
        if (r < 0 && rc == 0)
            rc = r;
    }
    defer.on = false;
    defer.n = 0;
    return rc;
}

/* The rename into dir must be made durable: now, or at the flush. */
static int dir_synced(const char *dir)
{
    if (!defer.on)
        return cmn_fsync_dir(dir);
    for (int i = 0; i < defer.n; i++)
        if (strcmp(defer.dirs[i], dir) == 0)
            return 0;
    if (defer.n == DEFER_DIRS)
        return cmn_fsync_dir(dir);
    snprintf(defer.dirs[defer.n++], sizeof(defer.dirs[0]), "%s", dir);
    return 0;
}

int cloud_archive_place_sha(const char *src, const char *dst, const char *sha256_hex)
{
    char dir[4096], key[CMN_S3_MAX_KEY + 1];
    struct stat sb;
    cmn_s3_t *s3;
    int rc;

    rc = archive_client(&s3);
    if (rc < 0)
        return rc;
    if (s3) {
        if ((rc = archive_key(dst, key, sizeof(key))) < 0)
            return rc;
        cmn_s3_put_opts_t po = {
            .content_type = "application/dicom",
            .sha256_hex = sha256_hex && strlen(sha256_hex) == 64 ? sha256_hex : NULL,
        };
        rc = cmn_s3_put_file(s3, key, src, &po);
        if (rc < 0) {
            CMN_LOG_E("archive", "upload key=%s: %s", key, cmn_strerror(rc));
            return rc;
        }
    }
    dir_of(dst, dir, sizeof(dir));
    rc = cmn_mkdirs(dir);
    if (rc < 0)
        return rc;
    if (rename(src, dst) < 0)
        return -errno;
    rc = dir_synced(dir);
    if (rc == 0 && s3 && stat(dst, &sb) == 0)
        cache_added(s3, dst, (uint64_t)sb.st_size);
    return rc;
}

int cloud_archive_place(const char *src, const char *dst)
{
    return cloud_archive_place_sha(src, dst, NULL);
}

int cloud_write_file_atomic(const char *path, const void *p, size_t len)
{
    char tmp[4096], dir[4096];
    const char *c = p;
    int fd, rc = 0;

    /* A unique name (mkstemp), so writers on several machines sharing the
     * directory never write into each other's temp file. */
    if (snprintf(tmp, sizeof(tmp), "%s.tmp-XXXXXX", path) >= (int)sizeof(tmp))
        return -ENAMETOOLONG;
    fd = mkostemp(tmp, O_CLOEXEC);
    if (fd < 0)
        return -errno;
    (void)fchmod(fd, 0640);
    while (len > 0) {
        ssize_t n = write(fd, c, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            rc = -errno;
            goto out_unlink;
        }
        c += n;
        len -= (size_t)n;
    }
    if (fsync(fd) < 0) {
        rc = -errno;
        goto out_unlink;
    }
    close(fd);
    fd = -1;
    if (rename(tmp, path) < 0) {
        rc = -errno;
        goto out_unlink;
    }
    dir_of(path, dir, sizeof(dir));
    return cmn_fsync_dir(dir);

out_unlink:
    if (fd >= 0)
        close(fd);
    unlink(tmp);
    return rc;
}

/* --------------------------------------------------------------- reading */

int cloud_archive_fetch(const char *path)
{
    char dir[4096], key[CMN_S3_MAX_KEY + 1];
    cmn_s3_stat_t st;
    struct stat sb;
    cmn_s3_t *s3;
    int rc;

    rc = archive_client(&s3);
    if (rc < 0)
        return rc;
    if (stat(path, &sb) == 0) {
        if (s3)
            cache_touch(path, &sb);
        return 0;
    }
    if (errno != ENOENT || !s3)
        return errno == ENOENT ? CMN_ENOTFOUND : -errno;
    if ((rc = archive_key(path, key, sizeof(key))) < 0)
        return rc;
    dir_of(path, dir, sizeof(dir));
    rc = cmn_mkdirs(dir);
    if (rc < 0)
        return rc;
    rc = cmn_s3_get_to_file(s3, key, path, &st);
    if (rc < 0) {
        if (rc != CMN_ENOTFOUND)
            CMN_LOG_E("archive", "fetch key=%s: %s", key, cmn_strerror(rc));
        return rc;
    }
    CMN_LOG_D("archive", "fetched key=%s bytes=%" PRIu64, key, st.size);
    cache_added(s3, path, st.size);
    return 0;
}

int cloud_archive_read_range(const char *path, uint64_t off, size_t len, void *buf,
                             size_t *got)
{
    cmn_s3_t *s3;
    size_t done = 0;
    int fd, rc;

    *got = 0;
    rc = archive_client(&s3);
    if (rc < 0)
        return rc;
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0 && (errno != ENOENT || !s3))
        return errno == ENOENT ? CMN_ENOTFOUND : -errno;
    if (fd < 0) {
        char key[CMN_S3_MAX_KEY + 1];
        if ((rc = archive_key(path, key, sizeof(key))) < 0)
            return rc;
        return cmn_s3_get_range(s3, key, off, len, buf, got, NULL);
    }
    struct stat sb;
    if (fstat(fd, &sb) < 0) {
        rc = -errno;
        goto out_close;
    }
    if (len > 0 && off >= (uint64_t)sb.st_size) {
        rc = -ERANGE;
        goto out_close;
    }
    if (s3)
        cache_touch(path, &sb);
    while (done < len) {
        ssize_t n = pread(fd, (char *)buf + done, len - done, (off_t)(off + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            rc = -errno;
            goto out_close;
        }
        if (n == 0)
            break;
        done += (size_t)n;
    }
    *got = done;
out_close:
    close(fd);
    return rc;
}

bool cloud_archive_is_local(const char *path)
{
    return access(path, F_OK) == 0;
}

/* ------------------------------------------------- integrity and deletion */

#define HASH_STEP (8u << 20)

int cloud_archive_hash(const char *path, bool remote, char hex[65], uint64_t *size)
{
    uint8_t digest[CMN_SHA256_LEN];
    cmn_sha256_ctx_t c;
    uint64_t off = 0;
    cmn_s3_t *s3;
    char *buf = NULL;
    int rc;

    *size = 0;
    hex[0] = '\0';
    rc = archive_client(&s3);
    if (rc < 0)
        return rc;
    if (remote && !s3)
        return -EINVAL;
    cmn_sha256_init(&c);
    if (remote) {
        char key[CMN_S3_MAX_KEY + 1];
        buf = cmn_xmalloc(HASH_STEP);
        if ((rc = archive_key(path, key, sizeof(key))) < 0)
            goto out_free;
        for (;;) {
            size_t got = 0;
            rc = cmn_s3_get_range(s3, key, off, HASH_STEP, buf, &got, NULL);
            if (rc == -ERANGE && off > 0) {   /* the object ends exactly at a step */
                rc = 0;
                break;
            }
            if (rc == -ERANGE) {              /* empty object */
                rc = 0;
                break;
            }
            if (rc < 0)
                goto out_free;
            cmn_sha256_update(&c, buf, got);
            off += got;
            if (got < HASH_STEP)
                break;
        }
    } else {
        rc = cmn_file_chunks(path, cmn_sha256_update_cb, &c, &off);
        if (rc == -ENOENT)
            rc = CMN_ENOTFOUND;
        if (rc < 0)
            goto out_free;
    }
    cmn_sha256_final(&c, digest);
    cmn_hex(digest, sizeof(digest), hex);
    *size = off;
out_free:
    free(buf);
    return rc;
}

/* Removes the now empty parent directories of an archive file (up to archive.dir). */
static void prune_dirs(const char *path)
{
    char dir[4096];
    size_t root = dir_len();

    dir_of(path, dir, sizeof(dir));
    while (strlen(dir) > root && rmdir(dir) == 0) {
        char *slash = strrchr(dir, '/');
        if (!slash)
            break;
        *slash = '\0';
    }
}

int cloud_archive_delete(const char *path)
{
    char key[CMN_S3_MAX_KEY + 1];
    cmn_s3_t *s3;
    int rc;

    rc = archive_client(&s3);
    if (rc < 0)
        return rc;
    if (!archive_rel(path))
        return -EINVAL;
    if (s3) {
        if ((rc = archive_key(path, key, sizeof(key))) < 0)
            return rc;
        rc = cmn_s3_delete(s3, key);
        if (rc < 0 && rc != CMN_ENOTFOUND) {
            CMN_LOG_E("archive", "delete key=%s: %s", key, cmn_strerror(rc));
            return rc;
        }
    }
    if (unlink(path) < 0 && errno != ENOENT)
        return -errno;
    prune_dirs(path);
    return 0;
}
