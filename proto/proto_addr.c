/*
 * proto_addr.c - address allow lists (comma-separated IPv4/IPv6 CIDR blocks)
 * shared by the cloud's per-edge whitelist and the edge's DICOM peer list.
 *
 * Pure functions over numeric addresses: inet_pton parses, nothing is
 * resolved. IPv4-mapped IPv6 peers (::ffff:a.b.c.d, as a dual-stack socket
 * reports IPv4 clients) are compared as IPv4, so "10.0.0.0/8" matches them.
 */
#include "proto/proto.h"

#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cmn/errors.h"

#define ITEM_MAX 64                  /* longest "address/prefix" item */

typedef struct {
    int family;                      /* AF_INET or AF_INET6 */
    uint8_t a[16];                   /* network-order bytes: 4 or 16 used */
    int bits;                        /* prefix length */
} cidr_t;

/* Parses a numeric address; IPv4-mapped IPv6 becomes IPv4. 0 or -1. */
static int parse_addr(const char *s, int *family, uint8_t out[16])
{
    static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

    if (inet_pton(AF_INET, s, out) == 1) {
        *family = AF_INET;
        return 0;
    }
    if (inet_pton(AF_INET6, s, out) == 1) {
        if (memcmp(out, mapped, sizeof(mapped)) == 0) {
            memmove(out, out + 12, 4);
            *family = AF_INET;
        } else {
            *family = AF_INET6;
        }
        return 0;
    }
    return -1;
}

/* Parses one trimmed item "addr[/bits]". 0 or -1. */
static int parse_item(const char *p, size_t n, cidr_t *c)
{
    char buf[ITEM_MAX + 1], *slash, *end;
    long bits;
    int max;

    while (n > 0 && (*p == ' ' || *p == '\t')) {
        p++;
        n--;
    }
    while (n > 0 && (p[n - 1] == ' ' || p[n - 1] == '\t'))
        n--;
    if (n == 0 || n > ITEM_MAX)
        return -1;
    memcpy(buf, p, n);
    buf[n] = '\0';
    slash = strchr(buf, '/');
    if (slash)
        *slash = '\0';
    if (parse_addr(buf, &c->family, c->a) < 0)
        return -1;
    max = c->family == AF_INET ? 32 : 128;
    /* A mapped address written with an IPv6 prefix keeps its meaning. */
    if (slash && c->family == AF_INET && strchr(buf, ':')) {
        bits = strtol(slash + 1, &end, 10);
        if (!slash[1] || *end || bits < 96 || bits > 128)
            return -1;
        c->bits = (int)bits - 96;
        return 0;
    }
    if (!slash) {
        c->bits = max;
        return 0;
    }
    if (slash[1] < '0' || slash[1] > '9')
        return -1;
    bits = strtol(slash + 1, &end, 10);
    if (*end || bits < 0 || bits > max)
        return -1;
    c->bits = (int)bits;
    return 0;
}

static bool cidr_match(const cidr_t *c, int family, const uint8_t a[16])
{
    int full = c->bits / 8, rest = c->bits % 8;

    if (family != c->family)
        return false;
    if (memcmp(c->a, a, (size_t)full) != 0)
        return false;
    if (rest == 0)
        return true;
    uint8_t mask = (uint8_t)(0xff << (8 - rest));
    return (c->a[full] & mask) == (a[full] & mask);
}

/* Calls fn for each item; stops at the first that fails to parse. */
static int each_item(const char *list, bool (*fn)(const cidr_t *c, void *ud), void *ud,
                     const char **bad, size_t *badlen)
{
    const char *s = list ? list : "";

    /* Every item, including an empty one after a stray comma, must parse. */
    for (;;) {
        const char *e = strchr(s, ',');
        size_t n = e ? (size_t)(e - s) : strlen(s);
        cidr_t c;

        if (parse_item(s, n, &c) < 0) {
            *bad = s;
            *badlen = n;
            return CMN_EPARSE;
        }
        if (fn(&c, ud))
            return 1;
        if (!e)
            return 0;
        s = e + 1;
    }
}

static bool never(const cidr_t *c, void *ud)
{
    (void)c;
    (void)ud;
    return false;
}

static bool is_blank(const char *list)
{
    if (!list)
        return true;
    for (; *list; list++) {
        if (*list != ' ' && *list != '\t')
            return false;
    }
    return true;
}

int proto_cidr_list_check(const char *list, char *err, size_t errlen)
{
    const char *bad = NULL;
    size_t badlen = 0;

    if (is_blank(list))
        return 0;
    if (each_item(list, never, NULL, &bad, &badlen) < 0) {
        snprintf(err, errlen, "'%.*s' is not an IPv4/IPv6 address or CIDR block",
                 (int)(badlen > 80 ? 80 : badlen), bad);
        return CMN_EPARSE;
    }
    return 0;
}

typedef struct {
    int family;
    uint8_t a[16];
} match_ctx_t;

static bool matches(const cidr_t *c, void *ud)
{
    match_ctx_t *m = ud;
    return cidr_match(c, m->family, m->a);
}

bool proto_cidr_list_allows(const char *list, const char *addr)
{
    const char *bad;
    size_t badlen;
    match_ctx_t m;

    if (is_blank(list))
        return true;
    if (!addr || parse_addr(addr, &m.family, m.a) < 0)
        return false;
    /* A malformed item makes the whole list match nothing: fail closed. */
    if (proto_cidr_list_check(list, NULL, 0) < 0)
        return false;
    return each_item(list, matches, &m, &bad, &badlen) == 1;
}

bool proto_addr_is_loopback(const char *addr)
{
    return proto_cidr_list_allows("127.0.0.0/8,::1/128", addr) && !is_blank(addr);
}
