/*
 * schedule.c - upload windows and bandwidth caps (see schedule.h).
 */
#include <jansson.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "cmn/errors.h"

#include "schedule.h"

void edge_schedule_init(edge_schedule_t *s)
{
    memset(s, 0, sizeof(*s));
    s->immediate = true;
}

/* "HH:MM" -> minutes; allow_24 permits "24:00". -1 when malformed. */
static int parse_hhmm(const char *t, bool allow_24)
{
    int h, m;
    char tail;

    if (!t || strlen(t) != 5 || t[2] != ':')
        return -1;
    if (sscanf(t, "%2d:%2d%c", &h, &m, &tail) != 2)
        return -1;
    if (h < 0 || m < 0 || m > 59)
        return -1;
    if (h == 24 && m == 0 && allow_24)
        return 1440;
    if (h > 23)
        return -1;
    return h * 60 + m;
}

int edge_schedule_parse(const char *json, edge_schedule_t *out, char *err, size_t errlen)
{
    json_error_t jerr;
    json_t *root = json_loads(json, JSON_DECODE_ANY, &jerr);
    int rc = CMN_ECONFIG;
    size_t i;
    json_t *w;

    edge_schedule_init(out);
    if (!root) {
        snprintf(err, errlen, "schedule: %s", jerr.text);
        return CMN_ECONFIG;
    }
    if (json_is_string(root)) {
        if (strcmp(json_string_value(root), "immediate") != 0) {
            snprintf(err, errlen, "schedule: must be \"immediate\" or a list of windows");
            goto out;
        }
        rc = 0;
        goto out;
    }
    if (!json_is_array(root) || json_array_size(root) == 0) {
        snprintf(err, errlen, "schedule: must be \"immediate\" or a non-empty list of windows");
        goto out;
    }
    if (json_array_size(root) > EDGE_SCHEDULE_MAX_WINDOWS) {
        snprintf(err, errlen, "schedule: at most %d windows", EDGE_SCHEDULE_MAX_WINDOWS);
        goto out;
    }
    out->immediate = false;
    json_array_foreach(root, i, w) {
        edge_window_t *win = &out->win[i];
        const char *key;
        json_t *v;

        if (!json_is_object(w)) {
            snprintf(err, errlen, "schedule[%zu]: a window must be an object", i);
            goto out;
        }
        json_object_foreach(w, key, v) {
            if (strcmp(key, "start") && strcmp(key, "end") && strcmp(key, "max_kbps")) {
                snprintf(err, errlen, "schedule[%zu].%s: unknown key", i, key);
                goto out;
            }
        }
        win->start_min = parse_hhmm(json_string_value(json_object_get(w, "start")), false);
        win->end_min = parse_hhmm(json_string_value(json_object_get(w, "end")), true);
        if (win->start_min < 0) {
            snprintf(err, errlen, "schedule[%zu].start: expected \"HH:MM\" (00:00-23:59)", i);
            goto out;
        }
        if (win->end_min < 0) {
            snprintf(err, errlen, "schedule[%zu].end: expected \"HH:MM\" (00:00-24:00)", i);
            goto out;
        }
        v = json_object_get(w, "max_kbps");
        if (v && (!json_is_integer(v) || json_integer_value(v) < 0 ||
                  json_integer_value(v) > 100000000)) {
            snprintf(err, errlen, "schedule[%zu].max_kbps: expected an integer 0..100000000", i);
            goto out;
        }
        win->max_kbps = v ? json_integer_value(v) : 0;
        out->nwin++;
    }
    rc = 0;
out:
    json_decref(root);
    if (rc < 0)
        edge_schedule_init(out);
    return rc;
}

void edge_schedule_format(const edge_schedule_t *s, char *buf, size_t len)
{
    size_t off = 0;

    if (s->immediate) {
        snprintf(buf, len, "\"immediate\"");
        return;
    }
    off += (size_t)snprintf(buf + off, len - off, "[");
    for (int i = 0; i < s->nwin && off < len; i++) {
        const edge_window_t *w = &s->win[i];
        off += (size_t)snprintf(buf + off, len - off,
                                "%s{\"start\":\"%02d:%02d\",\"end\":\"%02d:%02d\",\"max_kbps\":%lld}",
                                i ? "," : "", w->start_min / 60, w->start_min % 60,
                                w->end_min / 60, w->end_min % 60, (long long)w->max_kbps);
    }
    if (off < len)
        snprintf(buf + off, len - off, "]");
}

static bool win_open(const edge_window_t *w, int m)
{
    if (w->start_min == w->end_min || (w->start_min == 0 && w->end_min == 1440))
        return true;
    if (w->start_min < w->end_min)
        return m >= w->start_min && m < w->end_min;
    return m >= w->start_min || m < w->end_min;   /* over midnight */
}

/* Which window is open at minute m (first listed wins), -1 for none. */
static int open_window(const edge_schedule_t *s, int m)
{
    for (int i = 0; i < s->nwin; i++)
        if (win_open(&s->win[i], m))
            return i;
    return -1;
}

static int64_t rate_of(const edge_schedule_t *s, int w)
{
    if (w < 0)
        return 0;
    return s->win[w].max_kbps * 1000 / 8;
}

void edge_schedule_eval_min(const edge_schedule_t *s, int minute, int64_t ms_into_minute,
                            edge_sched_state_t *out)
{
    memset(out, 0, sizeof(*out));
    out->window = -1;
    out->change_in_ms = -1;
    if (s->immediate) {
        out->open = true;
        return;
    }
    int w = open_window(s, minute);
    out->open = w >= 0;
    out->window = w;
    out->rate_bps = rate_of(s, w);
    /* Walk forward minute by minute (one day at most) to the next change. */
    for (int k = 1; k <= 1440; k++) {
        int w2 = open_window(s, (minute + k) % 1440);
        if ((w2 >= 0) != (w >= 0) || rate_of(s, w2) != out->rate_bps) {
            out->change_in_ms = (int64_t)k * 60000 - ms_into_minute;
            break;
        }
    }
}

void edge_schedule_eval(const edge_schedule_t *s, int64_t wall_ms, edge_sched_state_t *out)
{
    time_t t = (time_t)(wall_ms / 1000);
    struct tm tm;

    localtime_r(&t, &tm);
    edge_schedule_eval_min(s, tm.tm_hour * 60 + tm.tm_min,
                           (int64_t)tm.tm_sec * 1000 + wall_ms % 1000, out);
}
