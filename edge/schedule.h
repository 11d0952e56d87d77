/*
 * schedule.h - when the edge may upload, and how fast.
 *
 * Configured by the top-level "schedule" member of the edge's config file:
 *
 *     "schedule": "immediate"                       (the default: always, no cap)
 *     "schedule": [ {"start": "22:00", "end": "06:00", "max_kbps": 0},
 *                   {"start": "12:00", "end": "13:30", "max_kbps": 20000} ]
 *
 * Times are local wall-clock "HH:MM" (end may be "24:00"); a window whose
 * end is before its start runs over midnight; start == end is the whole
 * day. Uploads run only inside a window; max_kbps (kilobits per second,
 * 0 = unlimited) caps the edge's total upload rate while that window is
 * open. Overlapping windows: the first listed that is open wins.
 *
 * Pure functions, no I/O: time comes in as an argument (the edge's
 * injectable clock, internal.h).
 */
#ifndef EDGE_SCHEDULE_H
#define EDGE_SCHEDULE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define EDGE_SCHEDULE_MAX_WINDOWS 16

typedef struct {
    int start_min;               /* minute of the day, 0..1439 */
    int end_min;                 /* minute of the day, 0..1440 */
    int64_t max_kbps;            /* 0 = unlimited */
} edge_window_t;

typedef struct {
    bool immediate;              /* no windows: always open, no cap */
    int nwin;
    edge_window_t win[EDGE_SCHEDULE_MAX_WINDOWS];
} edge_schedule_t;

typedef struct {
    bool open;                   /* uploads allowed now */
    int window;                  /* index of the open window, -1 when closed or immediate */
    int64_t rate_bps;            /* byte/s cap now; 0 = unlimited */
    int64_t change_in_ms;        /* ms until open/closed or the cap may change; -1 = never */
} edge_sched_state_t;

/** The default: immediate, uncapped. */
void edge_schedule_init(edge_schedule_t *s);

/**
 * Parses the JSON text of the "schedule" member (a string or an array, see
 * above). 0, or CMN_ECONFIG with "schedule...: reason" in err.
 */
int edge_schedule_parse(const char *json, edge_schedule_t *out, char *err, size_t errlen);

/** Writes the schedule back as compact JSON into buf (for --dump-config). */
void edge_schedule_format(const edge_schedule_t *s, char *buf, size_t len);

/**
 * The schedule's state at wall_ms (unix ms), using the local time zone
 * (localtime_r; set TZ for another).
 */
void edge_schedule_eval(const edge_schedule_t *s, int64_t wall_ms, edge_sched_state_t *out);

/** Same, from a minute of the day and the ms already elapsed in that minute (tests). */
void edge_schedule_eval_min(const edge_schedule_t *s, int minute, int64_t ms_into_minute,
                            edge_sched_state_t *out);

#endif /* EDGE_SCHEDULE_H */
