/*
 * proto_internal.h - JSON helpers shared by the files of proto/ (not part of
 * the public API). Each decode helper sets err and returns CMN_EPARSE on
 * failure.
 */
#ifndef PROTO_PROTO_INTERNAL_H
#define PROTO_PROTO_INTERNAL_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

/** Compact, key-sorted dump; takes (decrefs) o; malloc'd text or NULL. */
char *proto__dump(json_t *o);
json_t *proto__parse_obj(const char *json, size_t len, char *err, size_t errlen);
int proto__check_version(json_t *root, char *err, size_t errlen);
int proto__get_str(json_t *root, const char *key, char *out, size_t outlen, char *err,
                   size_t errlen);
int proto__get_uint(json_t *root, const char *key, uint64_t min, uint64_t max, uint64_t *out,
                    char *err, size_t errlen);
int proto__get_uid(json_t *root, const char *key, char *out, char *err, size_t errlen);
int proto__get_hex256(json_t *root, const char *key, char *out, char *err, size_t errlen);

#endif /* PROTO_PROTO_INTERNAL_H */
