/*
 * manifest.h - study manifests (manifest.c) and the /api/v1/studies/ route.
 */
#ifndef CLOUD_MANIFEST_H
#define CLOUD_MANIFEST_H

#include <stdbool.h>
#include "cmn/sql.h"

#include "cmn/http.h"
#include "proto/proto.h"

/**
 * Handler for /api/v1/studies/... (blocking route): .../{uid}/manifest is
 * ours (POST by an edge, signed; GET by a user session), everything else
 * goes to cloud_annotations_handle (with the annotations' body cap).
 */
void cloud_studies_handle(const cmn_http_req_t *req, cmn_http_resp_t *resp);

/**
 * Verifies a signed edge request exactly like the upload requests
 * (ingest.c). true with edge_id set, or false with the answer written.
 */
bool cloud__ingest_verify(cmn_sql_t *db, const cmn_http_req_t *req, cmn_http_resp_t *resp,
                          char edge_id[PROTO_EDGE_ID_MAX + 1]);

#endif /* CLOUD_MANIFEST_H */
