/*
 * respond.c - small response helpers shared by the cloud's handlers.
 */
#include <string.h>

#include "cmn/errors.h"
#include "proto/proto.h"
#include "internal.h"

void cloud_resp_error(cmn_http_resp_t *resp, int status, const char *code, const char *msg)
{
    char *json = proto_error_encode(code, msg);

    cmn_http_resp_header(resp, "Cache-Control", "no-store");
    cloud_resp_json_take(resp, status, "application/json", json);
}

void cloud_resp_json_take(cmn_http_resp_t *resp, int status, const char *content_type,
                          char *json)
{
    static const char fallback[] = "{\"v\":1,\"error\":\"internal\",\"message\":\"out of memory\"}";

    if (!json) {
        cmn_http_resp_simple(resp, 500, "application/json", fallback, sizeof(fallback) - 1);
        return;
    }
    cmn_http_resp_status(resp, status);
    cmn_http_resp_header(resp, "Content-Type", content_type);
    cmn_http_resp_body_take(resp, json, strlen(json));
}
