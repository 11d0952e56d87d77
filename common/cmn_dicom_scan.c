/*
 * cmn_dicom_scan.c - a structural walk of a Part 10 file in memory (see
 * cmn_dicom_scan in cmn/dicom.h): the SCP's check of every received
 * instance, at a small fraction of a DCMTK parse (0.2-0.3 ms per CT image).
 *
 * It decodes no value. It follows the element headers of the meta group
 * and of the data set from first to last byte - into sequences and items
 * of undefined length and through encapsulated pixel data - and keeps the
 * four UIDs that identify the instance (top level only). Every length must
 * stay inside its container, and the data set must end exactly at an
 * element's end: a truncated or garbled data set fails the walk.
 *
 * A failed walk is not a verdict: the caller asks DCMTK (cmn_dicom_read_info),
 * which is more lenient in places (trailing padding, odd encodings). Only
 * an "ok" must never be wrong.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "cmn/dicom.h"
#include "cmn/errors.h"

#define MAX_DEPTH 16
#define UNDEFINED 0xffffffffu

#define TAG(g, e) (((uint32_t)(g) << 16) | (uint32_t)(e))
#define T_ITEM TAG(0xfffe, 0xe000)
#define T_ITEM_END TAG(0xfffe, 0xe00d)
#define T_SEQ_END TAG(0xfffe, 0xe0dd)

typedef struct {
    const uint8_t *p;
    size_t len;
    cmn_dicom_ids_t *ids;
    char *err;
    size_t errlen;
    bool odd_uid;                     /* a UID element not of VR UI: DCMTK decides */
} scan_t;

typedef struct {
    uint32_t tag;
    char vr[3];                       /* "" for implicit VR and item tags */
    uint32_t len;
    size_t value;                     /* offset of the value */
} elem_t;

static int fail(scan_t *s, const char *fmt, ...)
{
    va_list ap;

    if (s->err && s->errlen) {
        va_start(ap, fmt);
        vsnprintf(s->err, s->errlen, fmt, ap);
        va_end(ap);
    }
    return CMN_EDICOM;
}

static uint16_t u16(const uint8_t *p)
{
    return (uint16_t)(p[0] | p[1] << 8);
}

static uint32_t u32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2). */
static bool long_vr(const char *vr)
{
    static const char *const k[] = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ",
                                    "UC", "UN", "UR", "UT", "SV", "UV"};
    for (size_t i = 0; i < sizeof(k) / sizeof(k[0]); i++) {
        if (vr[0] == k[i][0] && vr[1] == k[i][1])
            return true;
    }
    return false;
}

/* Reads the element header at off (before end). 0 or CMN_EDICOM. */
static int header(scan_t *s, size_t off, size_t end, bool explicit_vr, elem_t *e)
{
    const uint8_t *p = s->p + off;

    if (end - off < 8)
        return fail(s, "truncated element header at %zu", off);
    e->tag = TAG(u16(p), u16(p + 2));
    e->vr[0] = '\0';
    if ((e->tag >> 16) == 0xfffe || !explicit_vr) {
        e->len = u32(p + 4);
        e->value = off + 8;
        return 0;
    }
    if (p[4] < 'A' || p[4] > 'Z' || p[5] < 'A' || p[5] > 'Z')
        return fail(s, "bad VR at %zu", off);
    e->vr[0] = (char)p[4];
    e->vr[1] = (char)p[5];
    e->vr[2] = '\0';
    if (long_vr(e->vr)) {
        if (end - off < 12)
            return fail(s, "truncated element header at %zu", off);
        e->len = u32(p + 8);
        e->value = off + 12;
    } else {
        e->len = u16(p + 6);
        e->value = off + 8;
    }
    return 0;
}

/* A UI value into out (first value; trailing NUL/space padding dropped). */
static void take_uid(scan_t *s, const elem_t *e, char out[65])
{
    size_t n = e->len;
    const char *v = (const char *)s->p + e->value;

    for (size_t i = 0; i < n; i++) {
        if (v[i] == '\\') {
            n = i;
            break;
        }
    }
    while (n > 0 && (v[n - 1] == '\0' || v[n - 1] == ' '))
        n--;
    while (n > 0 && *v == ' ') {
        v++;
        n--;
    }
    if (n > 64)
        n = 64;
    memcpy(out, v, n);
    out[n] = '\0';
}

static int walk(scan_t *s, size_t off, size_t end, bool explicit_vr, int depth, bool top,
                bool until_item_end, size_t *stop);

/* The items of a sequence (or the fragments of encapsulated pixel data,
 * fragments = true) of undefined length starting at off; *stop after its
 * delimiter. Items of undefined length hold a data set (implicit VR inside
 * an UN sequence: inner_explicit). */
static int items(scan_t *s, size_t off, size_t end, bool inner_explicit, bool fragments,
                 int depth, size_t *stop)
{
    elem_t e;
    int rc;

    if (depth > MAX_DEPTH)
        return fail(s, "sequences nested too deep");
    for (;;) {
        if ((rc = header(s, off, end, false, &e)) < 0)
            return rc;
        if (e.tag == T_SEQ_END) {
            *stop = e.value;
            return 0;
        }
        if (e.tag != T_ITEM)
            return fail(s, "expected an item at %zu", off);
        if (e.len == UNDEFINED) {
            if (fragments)
                return fail(s, "pixel data fragment of undefined length at %zu", off);
            if ((rc = walk(s, e.value, end, inner_explicit, depth + 1, false, true, &off)) < 0)
                return rc;
            continue;
        }
        if (e.len > end - e.value)
            return fail(s, "item at %zu runs past the end", off);
        off = e.value + e.len;
    }
}

/* Walks elements from off: to end exactly (until_item_end = false), or to
 * an item delimiter; *stop is where the walk ended. */
static int walk(scan_t *s, size_t off, size_t end, bool explicit_vr, int depth, bool top,
                bool until_item_end, size_t *stop)
{
    elem_t e;
    int rc;

    if (depth > MAX_DEPTH)
        return fail(s, "items nested too deep");
    while (off < end) {
        if ((rc = header(s, off, end, explicit_vr, &e)) < 0)
            return rc;
        if (e.tag == T_ITEM_END) {
            if (!until_item_end)
                return fail(s, "item delimiter outside an item at %zu", off);
            *stop = e.value;
            return 0;
        }
        if ((e.tag >> 16) == 0xfffe)
            return fail(s, "stray item tag at %zu", off);
        if (e.len == UNDEFINED) {
            bool sq = !explicit_vr || strcmp(e.vr, "SQ") == 0;
            bool un = strcmp(e.vr, "UN") == 0;          /* implicit VR inside (CP-246) */
            bool px = strcmp(e.vr, "OB") == 0 || strcmp(e.vr, "OW") == 0;
            if (!sq && !un && !px)
                return fail(s, "undefined length on VR %s at %zu", e.vr, off);
            if ((rc = items(s, e.value, end, sq ? explicit_vr : false, px, depth + 1, &off)) < 0)
                return rc;
            continue;
        }
        if (e.len > end - e.value)
            return fail(s, "element (%04x,%04x) runs past the end", e.tag >> 16, e.tag & 0xffff);
        if (top && e.len <= 64 + 1 && (e.vr[0] == '\0' || strcmp(e.vr, "UI") == 0)) {
            switch (e.tag) {
            case TAG(0x0008, 0x0016): take_uid(s, &e, s->ids->sop_class_uid); break;
            case TAG(0x0008, 0x0018): take_uid(s, &e, s->ids->sop_uid); break;
            case TAG(0x0020, 0x000d): take_uid(s, &e, s->ids->study_uid); break;
            case TAG(0x0020, 0x000e): take_uid(s, &e, s->ids->series_uid); break;
            default: break;
            }
        } else if (top && (e.tag == TAG(0x0008, 0x0016) || e.tag == TAG(0x0008, 0x0018) ||
                           e.tag == TAG(0x0020, 0x000d) || e.tag == TAG(0x0020, 0x000e))) {
            s->odd_uid = true;
        }
        off = e.value + e.len;
    }
    if (until_item_end)
        return fail(s, "item without its delimiter");
    *stop = off;
    return 0;
}

int cmn_dicom_scan(const void *buf, size_t len, cmn_dicom_ids_t *out, char *err, size_t errlen)
{
    scan_t s = {.p = buf, .len = len, .ids = out, .err = err, .errlen = errlen};
    char meta_class[65] = "";
    size_t off = 132, stop;
    elem_t e;
    int rc;

    memset(out, 0, sizeof(*out));
    if (err && errlen)
        err[0] = '\0';
    if (len < 132 || memcmp(s.p + 128, "DICM", 4) != 0) {
        fail(&s, "no Part 10 preamble");
        return -ENOTSUP;
    }
    /* The meta group: explicit VR little endian, group 0002 only. */
    while (off + 8 <= len && u16(s.p + off) == 0x0002) {
        if ((rc = header(&s, off, len, true, &e)) < 0)
            return rc;
        if (e.len == UNDEFINED || e.len > len - e.value)
            return fail(&s, "meta element (0002,%04x) runs past the end", e.tag & 0xffff);
        if (e.tag == TAG(0x0002, 0x0010) && e.len <= 65)
            take_uid(&s, &e, out->transfer_syntax);
        else if (e.tag == TAG(0x0002, 0x0002) && e.len <= 65)
            take_uid(&s, &e, meta_class);
        off = e.value + e.len;
    }
    const char *ts = out->transfer_syntax;
    bool explicit_vr;
    if (strcmp(ts, "1.2.840.10008.1.2") == 0) {
        explicit_vr = false;
    } else if (strncmp(ts, "1.2.840.10008.1.2.", 18) == 0 &&
               strcmp(ts, "1.2.840.10008.1.2.1.99") != 0 &&   /* deflated */
               strcmp(ts, "1.2.840.10008.1.2.2") != 0) {      /* big endian */
        explicit_vr = true;
    } else {
        fail(&s, "transfer syntax '%s' not walked here", ts);
        return -ENOTSUP;
    }
    if ((rc = walk(&s, off, len, explicit_vr, 0, true, false, &stop)) < 0)
        return rc;
    if (s.odd_uid)
        return fail(&s, "a UID of another VR than UI, or too long");
    if (!out->sop_class_uid[0])
        memcpy(out->sop_class_uid, meta_class, sizeof(meta_class));
    if (!out->sop_uid[0] || !out->study_uid[0] || !out->series_uid[0])
        return fail(&s, "missing %s", !out->sop_uid[0]     ? "SOP Instance UID"
                                      : !out->study_uid[0] ? "Study Instance UID"
                                                           : "Series Instance UID");
    return 0;
}
