/*
 * conf.h - table-driven JSON configuration (redis' static_configs[]).
 *
 * A configuration file is a JSON object with one member per section, each a
 * JSON object of options:
 *
 *     { "scp": { "port": 11112, "ae_title": "YUNYING" }, "log": { "level": "info" } }
 *
 * Each module declares one table of cmn_conf_opt_t for its section. The loader
 * applies defaults, then the file; it rejects unknown sections and keys, wrong
 * types and out-of-range values with a message naming the offending key
 * ("scp.port: 70000 is above the maximum 65535"). The same tables drive
 * --dump-config.
 */
#ifndef CMN_CONF_H
#define CMN_CONF_H

#include <stddef.h>
#include <stdbool.h>
#include <stdio.h>

typedef enum {
    CMN_CONF_STR,    /* char * (owned by the config, freed by cmn_conf_free) */
    CMN_CONF_INT,    /* long long */
    CMN_CONF_BOOL,   /* bool */
} cmn_conf_type_t;

typedef struct {
    const char *name;        /* key inside the section */
    cmn_conf_type_t type;
    size_t offset;           /* offsetof() the field in the module's struct */
    const char *def_str;     /* default for STR (NULL allowed) */
    long long def_int;       /* default for INT and BOOL */
    long long min, max;      /* bounds for INT */
    const char *help;        /* one line, for --dump-config and the docs */
} cmn_conf_opt_t;

typedef struct {
    const char *name;              /* section name in the file */
    const cmn_conf_opt_t *opts;
    size_t nopts;
    size_t offset;                 /* offsetof() the section struct in the base */
} cmn_conf_section_t;

#define CMN_CONF_OPT_STR(st, field, def, help) \
    { #field, CMN_CONF_STR, offsetof(st, field), (def), 0, 0, 0, (help) }
#define CMN_CONF_OPT_INT(st, field, def, mn, mx, help) \
    { #field, CMN_CONF_INT, offsetof(st, field), NULL, (def), (mn), (mx), (help) }
#define CMN_CONF_OPT_BOOL(st, field, def, help) \
    { #field, CMN_CONF_BOOL, offsetof(st, field), NULL, (def), 0, 1, (help) }

/** Fills every option of every section with its default. */
void cmn_conf_defaults(const cmn_conf_section_t *secs, size_t nsecs, void *base);

/**
 * Loads path on top of the current values (call cmn_conf_defaults first).
 * Returns 0, or CMN_ECONFIG with a message naming the file and key in err.
 */
int cmn_conf_load(const cmn_conf_section_t *secs, size_t nsecs, void *base,
                  const char *path, char *err, size_t errlen);

/** Same as cmn_conf_load, from a JSON text in memory (used by tests). */
int cmn_conf_load_string(const cmn_conf_section_t *secs, size_t nsecs, void *base,
                         const char *json, char *err, size_t errlen);

/** Writes the effective configuration as JSON, with help text as "_help" keys omitted. */
void cmn_conf_dump(const cmn_conf_section_t *secs, size_t nsecs, const void *base, FILE *out);

/** Frees every string option. Safe to call twice. */
void cmn_conf_free(const cmn_conf_section_t *secs, size_t nsecs, void *base);

#endif /* CMN_CONF_H */
