/*
 * bundle.h - splitting a received bundle into checked member files
 * (bundle.c). Blocking: threadpool only.
 */
#ifndef CLOUD_BUNDLE_H
#define CLOUD_BUNDLE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cmn/dicom.h"
#include "proto/proto.h"
#include "staging.h"

/** One member of a split bundle. */
typedef struct {
    proto_bundle_member_t m;         /* as the header declares it */
    char tmp[4200];                  /* its bytes, a scratch file (staging.h; "" = none) */
    char sha256[PROTO_HEX256 + 1];   /* of those bytes */
    bool ok;                         /* verified, DICOM, UIDs as declared, fsync'd */
    char why[96];                    /* when !ok: the reason (no PHI) */
    cmn_dicom_info_t *info;          /* malloc'd when parsed */
    char *json;                      /* DICOM JSON when ok; malloc'd */
    size_t jsonlen;
} cloud_bundle_item_t;

/**
 * Reads the bundle from its staged chunks (r, initialised by the caller,
 * who also closes it) in one pass: checks the header against size, writes
 * each member to its own scratch file, checks the whole object's SHA-256
 * (want_sha) and size, then each member (hash, DICOM, SOP Instance UID and
 * study as declared). 0 with *out (n entries, free with
 * cloud__bundle_items_free) when the bundle as a whole is sound - members
 * may still be !ok; CMN_EPARSE with err when it is not (bad layout or
 * hash); CMN_ENOTFOUND / CMN_EHASH when chunk r->bad is missing from
 * staging or differs from its record; -errno or an S3 error otherwise.
 */
int cloud__bundle_split(cloud_staging_reader_t *r, uint64_t size, const char *want_sha,
                        cloud_bundle_item_t **out, uint32_t *n, char *err, size_t errlen);

/** Frees the items, removing member files still in staging. NULL is fine. */
void cloud__bundle_items_free(cloud_bundle_item_t *items, uint32_t n);

#endif /* CLOUD_BUNDLE_H */
