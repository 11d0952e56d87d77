/*
 * cmn_conf.c - table-driven JSON configuration loader.
 *
 * Defaults come from the tables; a file may set any subset of keys. Every
 * rejection names the file and the "section.key" so hospital IT can fix the
 * file without reading code.
 */
#include "cmn/conf.h"

#include <errno.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "cmn/errors.h"

#define FIELD(base, sec, opt) ((char *)(base) + (sec)->offset + (opt)->offset)

void cmn_conf_defaults(const cmn_conf_section_t *secs, size_t nsecs, void *base)
{
    for (size_t s = 0; s < nsecs; s++) {
        for (size_t i = 0; i < secs[s].nopts; i++) {
            const cmn_conf_opt_t *o = &secs[s].opts[i];
            void *f = FIELD(base, &secs[s], o);
            switch (o->type) {
            case CMN_CONF_STR: {
                char **sp = f;
                free(*sp);
                *sp = o->def_str ? cmn_xstrdup(o->def_str) : NULL;
                break;
            }
            case CMN_CONF_INT:
                *(long long *)f = o->def_int;
                break;
            case CMN_CONF_BOOL:
                *(bool *)f = o->def_int != 0;
                break;
            }
        }
    }
}

static int set_option(const cmn_conf_section_t *sec, const cmn_conf_opt_t *o, void *base,
                      json_t *v, const char *src, char *err, size_t errlen)
{
    void *f = FIELD(base, sec, o);

    switch (o->type) {
    case CMN_CONF_STR: {
        char **sp = f;
        if (json_is_null(v)) {
            free(*sp);
            *sp = NULL;
            return 0;
        }
        if (!json_is_string(v)) {
            snprintf(err, errlen, "%s: %s.%s: expected a string", src, sec->name, o->name);
            return CMN_ECONFIG;
        }
        if (strlen(json_string_value(v)) != json_string_length(v)) {
            snprintf(err, errlen, "%s: %s.%s: string contains a NUL byte", src, sec->name,
                     o->name);
            return CMN_ECONFIG;
        }
        free(*sp);
        *sp = cmn_xstrdup(json_string_value(v));
        return 0;
    }
    case CMN_CONF_INT: {
        long long x;
        if (!json_is_integer(v)) {
            snprintf(err, errlen, "%s: %s.%s: expected an integer", src, sec->name, o->name);
            return CMN_ECONFIG;
        }
        x = json_integer_value(v);
        if (x < o->min) {
            snprintf(err, errlen, "%s: %s.%s: %lld is below the minimum %lld", src, sec->name,
                     o->name, x, o->min);
            return CMN_ECONFIG;
        }
        if (x > o->max) {
            snprintf(err, errlen, "%s: %s.%s: %lld is above the maximum %lld", src, sec->name,
                     o->name, x, o->max);
            return CMN_ECONFIG;
        }
        *(long long *)f = x;
        return 0;
    }
    case CMN_CONF_BOOL:
        if (!json_is_boolean(v)) {
            snprintf(err, errlen, "%s: %s.%s: expected true or false", src, sec->name, o->name);
            return CMN_ECONFIG;
        }
        *(bool *)f = json_is_true(v);
        return 0;
    }
    snprintf(err, errlen, "%s: %s.%s: unsupported option type", src, sec->name, o->name);
    return CMN_ECONFIG;
}

static int load_json(const cmn_conf_section_t *secs, size_t nsecs, void *base, json_t *root,
                     const char *src, char *err, size_t errlen)
{
    const char *skey;
    json_t *sval;

    if (!json_is_object(root)) {
        snprintf(err, errlen, "%s: the top level must be a JSON object of sections", src);
        return CMN_ECONFIG;
    }
    json_object_foreach(root, skey, sval) {
        const cmn_conf_section_t *sec = NULL;
        const char *okey;
        json_t *oval;

        for (size_t s = 0; s < nsecs; s++) {
            if (strcmp(secs[s].name, skey) == 0) {
                sec = &secs[s];
                break;
            }
        }
        if (!sec) {
            snprintf(err, errlen, "%s: %s: unknown section", src, skey);
            return CMN_ECONFIG;
        }
        if (!json_is_object(sval)) {
            snprintf(err, errlen, "%s: %s: a section must be a JSON object", src, skey);
            return CMN_ECONFIG;
        }
        json_object_foreach(sval, okey, oval) {
            const cmn_conf_opt_t *opt = NULL;
            int r;

            for (size_t i = 0; i < sec->nopts; i++) {
                if (strcmp(sec->opts[i].name, okey) == 0) {
                    opt = &sec->opts[i];
                    break;
                }
            }
            if (!opt) {
                snprintf(err, errlen, "%s: %s.%s: unknown key", src, skey, okey);
                return CMN_ECONFIG;
            }
            r = set_option(sec, opt, base, oval, src, err, errlen);
            if (r < 0)
                return r;
        }
    }
    return 0;
}

int cmn_conf_load(const cmn_conf_section_t *secs, size_t nsecs, void *base, const char *path,
                  char *err, size_t errlen)
{
    json_error_t jerr;
    json_t *root;
    int r;

    root = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        snprintf(err, errlen, "%s:%d:%d: %s", path, jerr.line, jerr.column, jerr.text);
        return CMN_ECONFIG;
    }
    r = load_json(secs, nsecs, base, root, path, err, errlen);
    json_decref(root);
    return r;
}

int cmn_conf_load_string(const cmn_conf_section_t *secs, size_t nsecs, void *base,
                         const char *json, char *err, size_t errlen)
{
    json_error_t jerr;
    json_t *root;
    int r;

    root = json_loads(json, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        snprintf(err, errlen, "<string>:%d:%d: %s", jerr.line, jerr.column, jerr.text);
        return CMN_ECONFIG;
    }
    r = load_json(secs, nsecs, base, root, "<string>", err, errlen);
    json_decref(root);
    return r;
}

void cmn_conf_dump(const cmn_conf_section_t *secs, size_t nsecs, const void *base, FILE *out)
{
    json_t *root = json_object();

    for (size_t s = 0; s < nsecs; s++) {
        json_t *sec = json_object();
        for (size_t i = 0; i < secs[s].nopts; i++) {
            const cmn_conf_opt_t *o = &secs[s].opts[i];
            const void *f = (const char *)base + secs[s].offset + o->offset;
            switch (o->type) {
            case CMN_CONF_STR: {
                const char *v = *(char *const *)f;
                json_object_set_new(sec, o->name, v ? json_string(v) : json_null());
                break;
            }
            case CMN_CONF_INT:
                json_object_set_new(sec, o->name, json_integer(*(const long long *)f));
                break;
            case CMN_CONF_BOOL:
                json_object_set_new(sec, o->name, json_boolean(*(const bool *)f));
                break;
            }
        }
        json_object_set_new(root, secs[s].name, sec);
    }
    json_dumpf(root, out, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    fputc('\n', out);
    json_decref(root);
}

void cmn_conf_free(const cmn_conf_section_t *secs, size_t nsecs, void *base)
{
    for (size_t s = 0; s < nsecs; s++) {
        for (size_t i = 0; i < secs[s].nopts; i++) {
            const cmn_conf_opt_t *o = &secs[s].opts[i];
            if (o->type == CMN_CONF_STR) {
                char **sp = (char **)FIELD(base, &secs[s], o);
                free(*sp);
                *sp = NULL;
            }
        }
    }
}
