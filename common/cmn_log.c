/*
 * cmn_log.c - levelled logging, one write(2) per line.
 */
#include "cmn/log.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "cmn/errors.h"

int cmn_log_level = CMN_LOG_INFO;
static int log_fd = 2;

static const char *const level_names[] = { "error", "warn", "info", "debug" };

void cmn_log_set_level(int level)
{
    if (level < CMN_LOG_ERROR)
        level = CMN_LOG_ERROR;
    if (level > CMN_LOG_DEBUG)
        level = CMN_LOG_DEBUG;
    cmn_log_level = level;
}

int cmn_log_set_level_name(const char *name)
{
    for (size_t i = 0; i < CMN_ARRAY_SIZE(level_names); i++) {
        if (strcasecmp(name, level_names[i]) == 0) {
            cmn_log_level = (int)i;
            return 0;
        }
    }
    return CMN_ECONFIG;
}

void cmn_log_set_fd(int fd)
{
    log_fd = fd;
}

void cmn_log_write(int level, const char *subsys, const char *fmt, ...)
{
    char line[2048];
    struct timespec ts;
    struct tm tm;
    size_t n;
    int r;
    va_list ap;

    if (level < CMN_LOG_ERROR || level > CMN_LOG_DEBUG)
        level = CMN_LOG_ERROR;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    n = strftime(line, sizeof(line), "%Y-%m-%dT%H:%M:%S", &tm);
    r = snprintf(line + n, sizeof(line) - n, ".%03ldZ %-5s [%s] ", ts.tv_nsec / 1000000L,
                 level_names[level], subsys ? subsys : "-");
    if (r > 0)
        n += (size_t)r < sizeof(line) - n ? (size_t)r : sizeof(line) - n - 1;
    va_start(ap, fmt);
    r = vsnprintf(line + n, sizeof(line) - n, fmt, ap);
    va_end(ap);
    if (r > 0)
        n += (size_t)r < sizeof(line) - n ? (size_t)r : sizeof(line) - n - 1;
    /* Keep one record per line: control characters from input are masked. */
    for (size_t i = 0; i < n; i++) {
        if ((unsigned char)line[i] < 0x20)
            line[i] = ' ';
    }
    if (n >= sizeof(line) - 1)
        n = sizeof(line) - 2;
    line[n++] = '\n';
    {
        size_t off = 0;
        while (off < n) {
            ssize_t w = write(log_fd, line + off, n - off);
            if (w < 0 && errno == EINTR)
                continue;
            if (w <= 0)
                break;
            off += (size_t)w;
        }
    }
}
