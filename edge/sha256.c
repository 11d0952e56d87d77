/*
 * sha256.c - SHA-256 with the x86 SHA extensions, falling back to
 * cmn_sha256 (see sha256.h). The block function follows the structure of
 * Intel's "SHA extensions" white paper: the state is kept as ABEF/CDGH,
 * sha256rnds2 does two rounds, sha256msg1/msg2 extend the message schedule.
 */
#include <string.h>

#include "cmn/crypto.h"

#include "sha256.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define HAVE_SHA_NI_CODE 1
#include <cpuid.h>
#include <immintrin.h>
#endif

static const uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

#ifdef HAVE_SHA_NI_CODE
__attribute__((target("sha,sse4.1,ssse3"))) static void blocks_ni(uint32_t h[8], const uint8_t *p,
                                                                  size_t nblocks)
{
    const __m128i bswap = _mm_set_epi64x(0x0c0d0e0f08090a0bLL, 0x0405060700010203LL);
    __m128i tmp = _mm_loadu_si128((const __m128i *)&h[0]);
    __m128i s1 = _mm_loadu_si128((const __m128i *)&h[4]);
    __m128i s0;

    tmp = _mm_shuffle_epi32(tmp, 0xB1);           /* CDAB */
    s1 = _mm_shuffle_epi32(s1, 0x1B);             /* EFGH */
    s0 = _mm_alignr_epi8(tmp, s1, 8);             /* ABEF */
    s1 = _mm_blend_epi16(s1, tmp, 0xF0);          /* CDGH */

    while (nblocks--) {
        __m128i abef = s0, cdgh = s1;
        __m128i m[4];

#pragma GCC unroll 16
        for (int g = 0; g < 16; g++) {
            __m128i w;
            if (g < 4) {
                m[g] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(p + 16 * g)), bswap);
            } else {
                /* W[4g..4g+3] from the groups g-4 .. g-1 */
                __m128i t = _mm_sha256msg1_epu32(m[g & 3], m[(g + 1) & 3]);
                t = _mm_add_epi32(t, _mm_alignr_epi8(m[(g + 3) & 3], m[(g + 2) & 3], 4));
                m[g & 3] = _mm_sha256msg2_epu32(t, m[(g + 3) & 3]);
            }
            w = _mm_add_epi32(m[g & 3], _mm_loadu_si128((const __m128i *)&K[4 * g]));
            s1 = _mm_sha256rnds2_epu32(s1, s0, w);
            s0 = _mm_sha256rnds2_epu32(s0, s1, _mm_shuffle_epi32(w, 0x0E));
        }
        s0 = _mm_add_epi32(s0, abef);
        s1 = _mm_add_epi32(s1, cdgh);
        p += 64;
    }

    tmp = _mm_shuffle_epi32(s0, 0x1B);            /* FEBA */
    s1 = _mm_shuffle_epi32(s1, 0xB1);             /* DCHG */
    s0 = _mm_blend_epi16(tmp, s1, 0xF0);          /* DCBA */
    s1 = _mm_alignr_epi8(s1, tmp, 8);             /* HGFE */
    _mm_storeu_si128((__m128i *)&h[0], s0);
    _mm_storeu_si128((__m128i *)&h[4], s1);
}

static int ni_state;   /* 0 unknown, 1 yes, -1 no; benign race: every thread computes the same */

bool edge_sha256_has_ni(void)
{
    int s = __atomic_load_n(&ni_state, __ATOMIC_RELAXED);
    if (s == 0) {
        unsigned a, b, c, d;
        bool ok = false;
        if (__get_cpuid(1, &a, &b, &c, &d) && (c & bit_SSE4_1) && (c & bit_SSSE3) &&
            __get_cpuid_count(7, 0, &a, &b, &c, &d))
            ok = (b & (1u << 29)) != 0;   /* CPUID.7.0:EBX.SHA */
        s = ok ? 1 : -1;
        __atomic_store_n(&ni_state, s, __ATOMIC_RELAXED);
    }
    return s > 0;
}
#else
bool edge_sha256_has_ni(void)
{
    return false;
}
#endif /* HAVE_SHA_NI_CODE */

static const uint32_t H0[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                               0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};

void edge_sha256_init(edge_sha256_t *c)
{
    memset(c, 0, sizeof(*c));
    c->ni = edge_sha256_has_ni();
    if (c->ni)
        memcpy(c->h, H0, sizeof(H0));
    else
        cmn_sha256_init(&c->mb);
}

void edge_sha256_update(edge_sha256_t *c, const void *data, size_t n)
{
    const uint8_t *p = data;

    if (!c->ni) {
        cmn_sha256_update(&c->mb, p, n);
        return;
    }
#ifdef HAVE_SHA_NI_CODE
    c->total += n;
    if (c->nbuf) {
        size_t take = 64 - c->nbuf < n ? 64 - c->nbuf : n;
        memcpy(c->buf + c->nbuf, p, take);
        c->nbuf += take;
        p += take;
        n -= take;
        if (c->nbuf < 64)
            return;
        blocks_ni(c->h, c->buf, 1);
        c->nbuf = 0;
    }
    if (n >= 64) {
        blocks_ni(c->h, p, n / 64);
        p += n / 64 * 64;
        n %= 64;
    }
    memcpy(c->buf, p, n);
    c->nbuf = n;
#endif
}

void edge_sha256_final_hex(edge_sha256_t *c, char hex[65])
{
    uint8_t d[32];

    if (!c->ni) {
        cmn_sha256_final(&c->mb, d);
    } else {
#ifdef HAVE_SHA_NI_CODE
        uint64_t bits = c->total * 8;
        uint8_t pad[72];
        size_t padlen = (c->nbuf < 56 ? 56 : 120) - c->nbuf;
        memset(pad, 0, sizeof(pad));
        pad[0] = 0x80;
        for (int i = 0; i < 8; i++)
            pad[padlen + (size_t)i] = (uint8_t)(bits >> (56 - 8 * i));
        uint64_t keep = c->total;
        edge_sha256_update(c, pad, padlen + 8);
        c->total = keep;
        for (int i = 0; i < 8; i++) {
            d[4 * i] = (uint8_t)(c->h[i] >> 24);
            d[4 * i + 1] = (uint8_t)(c->h[i] >> 16);
            d[4 * i + 2] = (uint8_t)(c->h[i] >> 8);
            d[4 * i + 3] = (uint8_t)c->h[i];
        }
#endif
    }
    cmn_hex(d, sizeof(d), hex);
}
