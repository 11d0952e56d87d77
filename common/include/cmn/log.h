/*
 * log.h - levelled, thread-safe logging with key=value context.
 *
 * The macros test the level before evaluating their arguments (redis'
 * serverLog). Each line is written with one write(2) so lines from the SCP
 * threads and the loop thread never interleave.
 *
 * Never log tokens, signatures, signed URLs or patient-identifying DICOM
 * attributes (names, IDs, birth dates). Log UIDs or hashes instead.
 */
#ifndef CMN_LOG_H
#define CMN_LOG_H

#include <stdarg.h>

typedef enum {
    CMN_LOG_ERROR = 0,
    CMN_LOG_WARN = 1,
    CMN_LOG_INFO = 2,
    CMN_LOG_DEBUG = 3,
} cmn_log_level_t;

extern int cmn_log_level;

/** Sets the level from a name ("error", "warn", "info", "debug"). 0 or CMN_ECONFIG. */
int cmn_log_set_level_name(const char *name);
void cmn_log_set_level(int level);
/** Redirects output to fd (default 2, stderr). */
void cmn_log_set_fd(int fd);

void cmn_log_write(int level, const char *subsys, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define cmn_log(level, subsys, ...)                                         \
    do {                                                                    \
        if ((level) <= cmn_log_level)                                       \
            cmn_log_write((level), (subsys), __VA_ARGS__);                  \
    } while (0)

#define CMN_LOG_E(subsys, ...) cmn_log(CMN_LOG_ERROR, subsys, __VA_ARGS__)
#define CMN_LOG_W(subsys, ...) cmn_log(CMN_LOG_WARN, subsys, __VA_ARGS__)
#define CMN_LOG_I(subsys, ...) cmn_log(CMN_LOG_INFO, subsys, __VA_ARGS__)
#define CMN_LOG_D(subsys, ...) cmn_log(CMN_LOG_DEBUG, subsys, __VA_ARGS__)

#endif /* CMN_LOG_H */
