/*
 * cmn_crypto.c - SHA-256, HMAC-SHA256 and a CSPRNG, on mbedTLS.
 */
#include "cmn/crypto.h"

#include <errno.h>
#include <fcntl.h>
#include <mbedtls/ctr_drbg.h>
#include <mbedtls/entropy.h>
#include <mbedtls/md.h>
#include <mbedtls/sha256.h>
#include <pthread.h>
#include <string.h>
#include <unistd.h>

#include "cmn/errors.h"

_Static_assert(sizeof(mbedtls_sha256_context) <= sizeof(((cmn_sha256_ctx_t *)0)->state),
               "cmn_sha256_ctx_t too small for mbedtls_sha256_context");

void cmn_sha256_init(cmn_sha256_ctx_t *c)
{
    mbedtls_sha256_context *m = (mbedtls_sha256_context *)c->state;
    mbedtls_sha256_init(m);
    mbedtls_sha256_starts_ret(m, 0);
}

void cmn_sha256_update(cmn_sha256_ctx_t *c, const void *p, size_t n)
{
    mbedtls_sha256_update_ret((mbedtls_sha256_context *)c->state, p, n);
}

void cmn_sha256_final(cmn_sha256_ctx_t *c, uint8_t out[CMN_SHA256_LEN])
{
    mbedtls_sha256_context *m = (mbedtls_sha256_context *)c->state;
    mbedtls_sha256_finish_ret(m, out);
    mbedtls_sha256_free(m);
}

void cmn_sha256(const void *p, size_t n, uint8_t out[CMN_SHA256_LEN])
{
    mbedtls_sha256_ret(p, n, out, 0);
}

int cmn_sha256_file(const char *path, uint8_t out[CMN_SHA256_LEN], uint64_t *size)
{
    cmn_sha256_ctx_t c;
    uint64_t total = 0;
    char *buf;
    int fd, r = 0;

    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    buf = cmn_xmalloc(1 << 16);
    cmn_sha256_init(&c);
    for (;;) {
        ssize_t n = read(fd, buf, 1 << 16);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            r = -errno;
            break;
        }
        if (n == 0)
            break;
        cmn_sha256_update(&c, buf, (size_t)n);
        total += (uint64_t)n;
    }
    cmn_sha256_final(&c, out);
    free(buf);
    close(fd);
    if (r == 0 && size)
        *size = total;
    return r;
}

void cmn_hmac_sha256(const void *key, size_t keylen, const void *msg, size_t msglen,
                     uint8_t out[CMN_SHA256_LEN])
{
    mbedtls_md_hmac(mbedtls_md_info_from_type(MBEDTLS_MD_SHA256), key, keylen, msg, msglen,
                    out);
}

/* One DRBG per process, seeded from the kernel's entropy, behind a mutex:
 * random bytes are needed for nonces, salts and session ids, never in bulk. */
static pthread_mutex_t rng_lock = PTHREAD_MUTEX_INITIALIZER;
static mbedtls_entropy_context rng_entropy;
static mbedtls_ctr_drbg_context rng_drbg;
static int rng_ready;

int cmn_random(void *buf, size_t n)
{
    int r = 0;
    unsigned char *p = buf;

    pthread_mutex_lock(&rng_lock);
    if (!rng_ready) {
        static const char pers[] = "yunying";
        mbedtls_entropy_init(&rng_entropy);
        mbedtls_ctr_drbg_init(&rng_drbg);
        if (mbedtls_ctr_drbg_seed(&rng_drbg, mbedtls_entropy_func, &rng_entropy,
                                  (const unsigned char *)pers, sizeof(pers) - 1) != 0) {
            r = CMN_ECRYPTO;
            goto out_unlock;
        }
        rng_ready = 1;
    }
    while (n > 0) {
        size_t step = n > MBEDTLS_CTR_DRBG_MAX_REQUEST ? MBEDTLS_CTR_DRBG_MAX_REQUEST : n;
        if (mbedtls_ctr_drbg_random(&rng_drbg, p, step) != 0) {
            r = CMN_ECRYPTO;
            break;
        }
        p += step;
        n -= step;
    }
out_unlock:
    pthread_mutex_unlock(&rng_lock);
    return r;
}

void cmn_hex(const uint8_t *in, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[in[i] >> 4];
        out[2 * i + 1] = digits[in[i] & 15];
    }
    out[2 * n] = '\0';
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

int cmn_unhex(const char *hex, uint8_t *out, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        int hi = hexval(hex[2 * i]);
        int lo = hi < 0 ? -1 : hexval(hex[2 * i + 1]);
        if (hi < 0 || lo < 0)
            return CMN_EPARSE;
        out[i] = (uint8_t)(hi << 4 | lo);
    }
    return hex[2 * n] == '\0' ? 0 : CMN_EPARSE;
}

int cmn_memeq_ct(const void *a, const void *b, size_t n)
{
    const unsigned char *x = a, *y = b;
    unsigned char d = 0;
    for (size_t i = 0; i < n; i++)
        d |= x[i] ^ y[i];
    return d != 0;
}
