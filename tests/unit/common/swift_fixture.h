/*
 * swift_fixture.h - starts and stops the test S3 server (OpenStack Swift +
 * s3api, tests/infra/swift.sh) from a cmocka group setup/teardown. Static
 * functions: include once per test binary.
 *
 *   swift_fixture_t fx;
 *   swift_fixture_start(&fx);   // 0; fx.skip or fx.have tell what happened
 *   ...
 *   swift_fixture_stop(&fx);
 *
 * fx.skip is set only when we are not root AND Swift is not installed (root
 * installs it through the script, as CI does); a failed start leaves
 * fx.have false so the server tests fail rather than skip.
 * YY_SWIFT_DIR=DIR reuses (or starts) the instance in DIR and leaves it
 * running at the end: a fast edit loop.
 */
#ifndef YY_TEST_SWIFT_FIXTURE_H
#define YY_TEST_SWIFT_FIXTURE_H

#include <errno.h>
#include <ftw.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    bool skip;                     /* no Swift and no way to install it */
    bool have;                     /* the server answered; fields below are set */
    bool keep;                     /* YY_SWIFT_DIR given: do not stop */
    char dir[512];                 /* the instance directory */
    char top[4096];                /* repository root */
    char endpoint[128];
    char region[32];
    char bucket[64];
    char access_key[64];
    char secret_file[600];
} swift_fixture_t;

static double sfx_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Repository root: $YY_TOP, else derived from build/<cfg>/tests/unit/<dir>/<test>. */
static void sfx_find_top(char *top, size_t toplen)
{
    const char *env = getenv("YY_TOP");
    char exe[4096];
    ssize_t n;

    if (env && *env) {
        snprintf(top, toplen, "%s", env);
        return;
    }
    n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    if (n > 0) {
        exe[n] = '\0';
        char *b = strstr(exe, "/build/");
        if (b) {
            *b = '\0';
            snprintf(top, toplen, "%s", exe);
            return;
        }
    }
    snprintf(top, toplen, ".");
}

/* Runs argv (no shell), capturing stdout into out. Returns the exit status. */
static int sfx_run_capture(char *const argv[], char *out, size_t outlen)
{
    int pfd[2];
    pid_t pid;
    size_t used = 0;
    int st = 0;

    if (pipe(pfd) < 0)
        return -1;
    pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        dup2(pfd[1], 1);
        close(pfd[0]);
        close(pfd[1]);
        execv(argv[0], argv);
        _exit(127);
    }
    close(pfd[1]);
    for (;;) {
        char tmp[512];
        ssize_t r = read(pfd[0], tmp, sizeof(tmp));
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        size_t c = (size_t)r < outlen - 1 - used ? (size_t)r : outlen - 1 - used;
        memcpy(out + used, tmp, c);
        used += c;
    }
    out[used] = '\0';
    close(pfd[0]);
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
        ;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}

static int sfx_rm_cb(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    remove(p);
    return 0;
}

static __attribute__((unused)) void sfx_rm_rf(const char *dir)
{
    nftw(dir, sfx_rm_cb, 16, FTW_DEPTH | FTW_PHYS);
}

static void sfx_env_value(const char *text, const char *name, char *out, size_t outlen)
{
    size_t nl = strlen(name);
    const char *p = text;

    out[0] = '\0';
    while (p && *p) {
        if (strncmp(p, name, nl) == 0 && p[nl] == '=') {
            const char *v = p + nl + 1;
            size_t n = strcspn(v, "\n");
            snprintf(out, outlen, "%.*s", (int)n, v);
            return;
        }
        p = strchr(p, '\n');
        if (p)
            p++;
    }
}

static int swift_fixture_start(swift_fixture_t *fx)
{
    char out[4096], script[4200];
    const char *keep = getenv("YY_SWIFT_DIR");

    memset(fx, 0, sizeof(*fx));
    sfx_find_top(fx->top, sizeof(fx->top));
    if (geteuid() != 0 && access("/usr/bin/swift-proxy-server", X_OK) != 0) {
        fprintf(stderr, "SKIP S3 server tests: OpenStack Swift is not installed and we are not "
                        "root (run deploy/install-deps.sh or tests/infra/swift.sh install)\n");
        fx->skip = true;
        return 0;
    }
    if (keep && *keep) {
        fx->keep = true;
        snprintf(fx->dir, sizeof(fx->dir), "%s", keep);
    } else {
        snprintf(fx->dir, sizeof(fx->dir), "/tmp/yy-swift-XXXXXX");
        if (!mkdtemp(fx->dir))
            return -errno;
    }
    snprintf(script, sizeof(script), "%s/tests/infra/swift.sh", fx->top);
    char *argv[] = {script, "start", fx->dir, NULL};
    double t0 = sfx_now();
    int rc = sfx_run_capture(argv, out, sizeof(out));
    if (rc != 0) {
        fprintf(stderr, "tests/infra/swift.sh start failed (exit %d)\n", rc);
        return 0;
    }
    fprintf(stderr, "swift ready in %.1f s (%s)\n", sfx_now() - t0, fx->dir);
    sfx_env_value(out, "YY_S3_ENDPOINT", fx->endpoint, sizeof(fx->endpoint));
    sfx_env_value(out, "YY_S3_REGION", fx->region, sizeof(fx->region));
    sfx_env_value(out, "YY_S3_BUCKET", fx->bucket, sizeof(fx->bucket));
    sfx_env_value(out, "YY_S3_ACCESS_KEY", fx->access_key, sizeof(fx->access_key));
    sfx_env_value(out, "YY_S3_SECRET_FILE", fx->secret_file, sizeof(fx->secret_file));
    fx->have = fx->endpoint[0] && fx->bucket[0] && fx->access_key[0] && fx->secret_file[0];
    return 0;
}

static void swift_fixture_stop(swift_fixture_t *fx)
{
    char out[1024], script[4200];

    if (!fx->dir[0] || fx->keep)
        return;
    snprintf(script, sizeof(script), "%s/tests/infra/swift.sh", fx->top);
    char *argv[] = {script, "stop", fx->dir, NULL};
    sfx_run_capture(argv, out, sizeof(out));
    sfx_rm_rf(fx->dir);
    fx->dir[0] = '\0';
}

#endif /* YY_TEST_SWIFT_FIXTURE_H */
