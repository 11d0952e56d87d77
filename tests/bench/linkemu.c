/*
 * linkemu.c - a userspace link emulator for the benchmarks (a stand-in for
 * tc netem on kernels without sch_netem).
 *
 *   linkemu --a NETNS:IFNAME --b NETNS:IFNAME [--rate 100mbit] [--delay 10ms]
 *           [--loss 0.25%] [--limit PACKETS] [--seed N] [--rt PRIO]
 *
 * Creates one TAP device in each of two network namespaces (NETNS is a name
 * under /run/netns, as made by `ip netns add`, or a path to a netns file; ""
 * is this process's own namespace) and forwards Ethernet frames between them
 * in both directions. The caller sets addresses and brings the devices up;
 * they disappear when linkemu exits. Each direction is one link with the
 * same parameters (as netem on both ends of a veth):
 *
 *   loss    a frame is dropped with probability p on arrival (before it is
 *           queued, as netem does); xorshift64* seeded with --seed (default:
 *           from the clock), the seed is printed. One sequence serves both
 *           directions in arrival order, so a seed repeats the coin flips,
 *           not which frames of a run they hit
 *   queue   a FIFO of frames waiting to be serialised; one arriving when
 *           --limit frames wait (the one on the wire included) is tail-dropped,
 *           like a router's buffer. Default: 1.5 x the bandwidth-delay product
 *           of the round trip (2 x delay) in 1514-byte frames, at least 16
 *   rate    serialisation at --rate bit/s of the frame bytes as read from the
 *           TAP (Ethernet header included, no preamble/FCS/gap; as netem and
 *           tbf count them)
 *   delay   a frame is written out --delay after its last bit was serialised
 *
 * Frames leave each direction in order. One thread: epoll over both TAPs, a
 * timerfd armed (absolute, CLOCK_MONOTONIC) for the next frame due out, and
 * a signalfd; nothing polls. A frame is timestamped when it is read, so time
 * this process is not scheduled is lost link time: on a busy machine give it
 * --rt PRIO (SCHED_FIFO; it sleeps in epoll_wait between frames). late_* in
 * the counters shows the delay.
 *
 * Signals:
 *   SIGUSR1  link down: frames queued or on the way are lost, frames arriving
 *            are dropped (counted as "cut") until
 *   SIGUSR2  link up again
 *   SIGHUP   prints the counters (one "stats" line), keeps running
 *   SIGTERM, SIGINT  prints the counters and exits 0
 *
 * Output (stdout, one line each, key=value): "linkemu: ready ..." once both
 * devices exist; "stats seq=N t=UNIX_SECONDS" (wall clock, ms, to line up
 * with logs) and per direction (prefix ab_ for a -> b, ba_ for b -> a): in
 * (frames read), fwd (written), bytes (written), loss, queue (tail drops),
 * cut, big (frames above the slot size, dropped), werr (write errors), maxq
 * (longest queue seen, frames), late_sum_us and late_max_us (how late frames
 * were written out, summed and at worst: this process's own scheduling
 * delay, e.g. on a busy machine).
 *
 * Limits: no jitter, reordering, duplication or corruption; one delay and
 * rate for both directions; frames up to FRAME_MAX bytes (keep the MTU at
 * 1500; a TAP without IFF_VNET_HDR gets no TSO/GSO super-frames). Timers have
 * the kernel's resolution (timer slack set to 1 us); frames due within
 * SLACK_NS of each other leave together. A read and a write per frame: about
 * 15% of one core for an upload at 100 Mbit/s (12k frames/s both ways). Needs
 * root (setns, /dev/net/tun). Built by tests/bench/bench_upload.sh; not part
 * of make.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <sched.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define FRAME_MAX 2048                 /* slot size: MTU 1500 + Ethernet header fits */
#define READ_MAX 65536                 /* read buffer: anything a TAP can hand us */
#define READ_BATCH 64                  /* frames read per readiness event and device */
#define SLACK_NS 20000ULL              /* frames due this close together leave together */

typedef struct {
    uint64_t tx_done_ns;               /* last bit serialised */
    uint64_t due_ns;                   /* written out at */
    uint16_t len;
    uint8_t data[FRAME_MAX];
} frame_t;

typedef struct {
    uint64_t in, fwd, bytes, loss, queue, cut, big, werr, maxq;
    uint64_t late_sum_ns, late_max_ns;   /* written out after their due time */
} counters_t;

typedef struct {
    const char *name;                  /* "ab" or "ba" */
    int in_fd, out_fd;
    frame_t *ring;                     /* cap slots */
    uint64_t cap;
    uint64_t head, txcur, tail;        /* running counts: head <= txcur <= tail */
    uint64_t busy_until_ns;            /* the wire is busy until then */
    counters_t c;
} dir_t;

typedef struct {
    uint64_t rate_bps;
    uint64_t delay_ns;
    double loss;                       /* probability 0..1 */
    uint64_t limit;                    /* frames */
    uint64_t seed, rng;
    bool down;
    unsigned seq;
} link_t;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* xorshift64*: plenty for a loss coin, and reproducible from the seed. */
static double rng_unit(link_t *l)
{
    l->rng ^= l->rng >> 12;
    l->rng ^= l->rng << 25;
    l->rng ^= l->rng >> 27;
    return (double)((l->rng * 2685821657736338717ULL) >> 11) / 9007199254740992.0;
}

/* "100mbit", "1.5gbit", "800kbit", "64000bit" or bits per second. 0 or -1. */
static int parse_rate(const char *s, uint64_t *out)
{
    char *end;
    double v = strtod(s, &end);
    double mul = 1;

    if (end == s || v <= 0)
        return -1;
    if (strcmp(end, "") == 0 || strcmp(end, "bit") == 0)
        mul = 1;
    else if (strcmp(end, "kbit") == 0)
        mul = 1e3;
    else if (strcmp(end, "mbit") == 0)
        mul = 1e6;
    else if (strcmp(end, "gbit") == 0)
        mul = 1e9;
    else
        return -1;
    *out = (uint64_t)(v * mul);
    return *out > 0 ? 0 : -1;
}

/* "10ms", "250us", "0.01s"; a bare number is milliseconds. 0 or -1. */
static int parse_delay(const char *s, uint64_t *out)
{
    char *end;
    double v = strtod(s, &end);
    double mul = 1e6;

    if (end == s || v < 0)
        return -1;
    if (strcmp(end, "") == 0 || strcmp(end, "ms") == 0)
        mul = 1e6;
    else if (strcmp(end, "us") == 0)
        mul = 1e3;
    else if (strcmp(end, "s") == 0)
        mul = 1e9;
    else
        return -1;
    *out = (uint64_t)(v * mul);
    return 0;
}

/* "0.25%" or "0.25" (percent, as tc netem). 0 or -1. */
static int parse_loss(const char *s, double *out)
{
    char *end;
    double v = strtod(s, &end);

    if (end == s || (strcmp(end, "") != 0 && strcmp(end, "%") != 0) || v < 0 || v > 100)
        return -1;
    *out = v / 100.0;
    return 0;
}

/* Creates TAP ifname inside netns (a name under /run/netns, a path, or ""
 * for our own) and returns its non-blocking fd, or -1 with a message. */
static int tap_open(const char *spec)
{
    char ns[256], path[300];
    const char *colon = strrchr(spec, ':');
    struct ifreq ifr;
    int self = -1, nsfd = -1, fd = -1;

    if (!colon || (size_t)(colon - spec) >= sizeof(ns) || strlen(colon + 1) == 0 ||
        strlen(colon + 1) >= IFNAMSIZ) {
        fprintf(stderr, "linkemu: '%s': want NETNS:IFNAME\n", spec);
        return -1;
    }
    memcpy(ns, spec, (size_t)(colon - spec));
    ns[colon - spec] = '\0';
    if (ns[0]) {
        snprintf(path, sizeof(path), "%s%s", strchr(ns, '/') ? "" : "/run/netns/", ns);
        self = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
        nsfd = open(path, O_RDONLY | O_CLOEXEC);
        if (self < 0 || nsfd < 0 || setns(nsfd, CLONE_NEWNET) < 0) {
            fprintf(stderr, "linkemu: entering netns %s: %s\n", path, strerror(errno));
            goto out;
        }
    }
    fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        fprintf(stderr, "linkemu: /dev/net/tun: %s\n", strerror(errno));
        goto out;
    }
    memset(&ifr, 0, sizeof(ifr));
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI;
    snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", colon + 1);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
        fprintf(stderr, "linkemu: TUNSETIFF %s: %s\n", colon + 1, strerror(errno));
        close(fd);
        fd = -1;
    }
out:
    if (self >= 0 && setns(self, CLONE_NEWNET) < 0) {
        fprintf(stderr, "linkemu: back to our netns: %s\n", strerror(errno));
        if (fd >= 0)
            close(fd);
        fd = -1;
    }
    if (nsfd >= 0)
        close(nsfd);
    if (self >= 0)
        close(self);
    return fd;
}

/* Frames whose last bit has left are no longer in the queue. */
static void advance_tx(dir_t *d, uint64_t now)
{
    while (d->txcur < d->tail && d->ring[d->txcur % d->cap].tx_done_ns <= now)
        d->txcur++;
}

/* A frame read from d's input at now: lost, dropped or queued. */
static void arrive(link_t *l, dir_t *d, const uint8_t *buf, size_t len, uint64_t now)
{
    frame_t *f;
    uint64_t start, qlen;

    d->c.in++;
    if (l->down) {
        d->c.cut++;
        return;
    }
    if (len > FRAME_MAX) {
        d->c.big++;
        return;
    }
    if (l->loss > 0 && rng_unit(l) < l->loss) {
        d->c.loss++;
        return;
    }
    advance_tx(d, now);
    qlen = d->tail - d->txcur;
    if (qlen >= l->limit || d->tail - d->head >= d->cap) {
        d->c.queue++;
        return;
    }
    start = d->busy_until_ns > now ? d->busy_until_ns : now;
    f = &d->ring[d->tail % d->cap];
    f->tx_done_ns = start + (uint64_t)len * 8ULL * 1000000000ULL / l->rate_bps;
    f->due_ns = f->tx_done_ns + l->delay_ns;
    f->len = (uint16_t)len;
    memcpy(f->data, buf, len);
    d->busy_until_ns = f->tx_done_ns;
    d->tail++;
    if (qlen + 1 > d->c.maxq)
        d->c.maxq = qlen + 1;
}

/* Writes out every frame due by now (+ slack). */
static void deliver(dir_t *d, uint64_t now)
{
    while (d->head < d->tail) {
        frame_t *f = &d->ring[d->head % d->cap];
        if (f->due_ns > now + SLACK_NS)
            break;
        ssize_t n = write(d->out_fd, f->data, f->len);
        if (n == (ssize_t)f->len) {
            uint64_t late = now > f->due_ns ? now - f->due_ns : 0;
            d->c.fwd++;
            d->c.bytes += f->len;
            d->c.late_sum_ns += late;
            if (late > d->c.late_max_ns)
                d->c.late_max_ns = late;
        } else {
            d->c.werr++;   /* device down or full: the frame is lost */
        }
        d->head++;
        if (d->txcur < d->head)
            d->txcur = d->head;
    }
}

/* Reads up to READ_BATCH frames from d's input. */
static void read_some(link_t *l, dir_t *d, uint8_t *buf)
{
    for (int i = 0; i < READ_BATCH; i++) {
        ssize_t n = read(d->in_fd, buf, READ_MAX);
        if (n < 0) {
            if (errno != EAGAIN && errno != EINTR && errno != EIO)
                fprintf(stderr, "linkemu: read %s: %s\n", d->name, strerror(errno));
            return;
        }
        if (n == 0)
            return;
        arrive(l, d, buf, (size_t)n, now_ns());
    }
}

/* Link down: everything queued or on the wire is lost. */
static void flush(dir_t *d)
{
    d->c.cut += d->tail - d->head;
    d->head = d->txcur = d->tail;
    d->busy_until_ns = 0;
}

static void print_stats(link_t *l, const dir_t *dirs)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    printf("stats seq=%u t=%lld.%03ld", ++l->seq, (long long)ts.tv_sec, ts.tv_nsec / 1000000L);
    for (int i = 0; i < 2; i++) {
        const dir_t *d = &dirs[i];
        const counters_t *c = &d->c;
        printf(" %s_in=%" PRIu64 " %s_fwd=%" PRIu64 " %s_bytes=%" PRIu64 " %s_loss=%" PRIu64
               " %s_queue=%" PRIu64 " %s_cut=%" PRIu64 " %s_big=%" PRIu64 " %s_werr=%" PRIu64
               " %s_maxq=%" PRIu64 " %s_late_sum_us=%" PRIu64 " %s_late_max_us=%" PRIu64,
               d->name, c->in, d->name, c->fwd, d->name, c->bytes, d->name, c->loss, d->name,
               c->queue, d->name, c->cut, d->name, c->big, d->name, c->werr, d->name, c->maxq,
               d->name, c->late_sum_ns / 1000, d->name, c->late_max_ns / 1000);
    }
    printf("\n");
    fflush(stdout);
}

static void usage(void)
{
    fprintf(stderr, "usage: linkemu --a NETNS:IFNAME --b NETNS:IFNAME [--rate 100mbit] "
                    "[--delay 10ms] [--loss 0.25%%] [--limit PACKETS] [--seed N] [--rt PRIO]\n");
}

int main(int argc, char **argv)
{
    const char *spec_a = NULL, *spec_b = NULL;
    link_t l = { .rate_bps = 100000000ULL, .delay_ns = 10000000ULL };
    bool have_seed = false;
    int rt = 0;
    dir_t dirs[2];
    uint8_t *buf;
    sigset_t mask;
    int fa, fb, tfd, sfd, ep;

    for (int i = 1; i < argc; i++) {
        const char *o = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) {
            usage();
            return 2;
        }
        if (strcmp(o, "--a") == 0) {
            spec_a = v;
        } else if (strcmp(o, "--b") == 0) {
            spec_b = v;
        } else if (strcmp(o, "--rate") == 0) {
            if (parse_rate(v, &l.rate_bps) < 0) {
                fprintf(stderr, "linkemu: bad --rate '%s'\n", v);
                return 2;
            }
        } else if (strcmp(o, "--delay") == 0) {
            if (parse_delay(v, &l.delay_ns) < 0) {
                fprintf(stderr, "linkemu: bad --delay '%s'\n", v);
                return 2;
            }
        } else if (strcmp(o, "--loss") == 0) {
            if (parse_loss(v, &l.loss) < 0) {
                fprintf(stderr, "linkemu: bad --loss '%s'\n", v);
                return 2;
            }
        } else if (strcmp(o, "--limit") == 0) {
            l.limit = strtoull(v, NULL, 10);
            if (l.limit == 0) {
                fprintf(stderr, "linkemu: bad --limit '%s'\n", v);
                return 2;
            }
        } else if (strcmp(o, "--seed") == 0) {
            l.seed = strtoull(v, NULL, 0);
            have_seed = true;
        } else if (strcmp(o, "--rt") == 0) {
            rt = atoi(v);
            if (rt < 1 || rt > 99) {
                fprintf(stderr, "linkemu: bad --rt '%s' (1..99)\n", v);
                return 2;
            }
        } else {
            usage();
            return 2;
        }
        i++;
    }
    if (!spec_a || !spec_b) {
        usage();
        return 2;
    }
    if (l.limit == 0) {
        /* 1.5 x the round trip's bandwidth-delay product, in full frames. */
        double bdp = (double)l.rate_bps / 8.0 * 2.0 * (double)l.delay_ns / 1e9;
        l.limit = (uint64_t)(1.5 * bdp / 1514.0);
        if (l.limit < 16)
            l.limit = 16;
    }
    if (!have_seed)
        l.seed = now_ns() ^ ((uint64_t)getpid() << 32);
    l.rng = l.seed ? l.seed : 0x9e3779b97f4a7c15ULL;

    /* Signals arrive through the signalfd only. */
    sigemptyset(&mask);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGHUP);
    sigaddset(&mask, SIGUSR1);
    sigaddset(&mask, SIGUSR2);
    if (sigprocmask(SIG_BLOCK, &mask, NULL) < 0) {
        perror("linkemu: sigprocmask");
        return 1;
    }
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
    if (rt > 0) {
        struct sched_param sp = { .sched_priority = rt };
        if (sched_setscheduler(0, SCHED_FIFO, &sp) < 0) {
            fprintf(stderr, "linkemu: SCHED_FIFO %d: %s (running without)\n", rt, strerror(errno));
            rt = 0;
        }
    }

    fa = tap_open(spec_a);
    if (fa < 0)
        return 1;
    fb = tap_open(spec_b);
    if (fb < 0)
        return 1;

    /* Ring: the queue plus what the delay line holds at full rate in
     * minimum-size (60-byte) frames. */
    uint64_t cap = l.limit + (uint64_t)((double)l.rate_bps / 8.0 / 60.0 * (double)l.delay_ns / 1e9) + 64;
    memset(dirs, 0, sizeof(dirs));
    dirs[0].name = "ab";
    dirs[0].in_fd = fa;
    dirs[0].out_fd = fb;
    dirs[1].name = "ba";
    dirs[1].in_fd = fb;
    dirs[1].out_fd = fa;
    for (int i = 0; i < 2; i++) {
        dirs[i].cap = cap;
        dirs[i].ring = calloc((size_t)cap, sizeof(frame_t));
        if (!dirs[i].ring) {
            fprintf(stderr, "linkemu: out of memory for %" PRIu64 " frames\n", cap);
            return 1;
        }
    }
    buf = malloc(READ_MAX);
    tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (!buf || tfd < 0 || sfd < 0 || ep < 0) {
        perror("linkemu: setup");
        return 1;
    }
    int fds[4] = { fa, fb, tfd, sfd };
    for (int i = 0; i < 4; i++) {
        struct epoll_event ev = { .events = EPOLLIN, .data.u32 = (uint32_t)i };
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev) < 0) {
            perror("linkemu: epoll_ctl");
            return 1;
        }
    }
    printf("linkemu: ready a=%s b=%s rate_bps=%" PRIu64 " delay_us=%" PRIu64
           " loss_pct=%.4f limit=%" PRIu64 " seed=%" PRIu64 " rt=%d\n",
           spec_a, spec_b, l.rate_bps, l.delay_ns / 1000, l.loss * 100.0, l.limit, l.seed, rt);
    fflush(stdout);

    uint64_t armed = 0;   /* absolute due time the timer is set to; 0 = disarmed */
    for (;;) {
        struct epoll_event evs[8];
        int n = epoll_wait(ep, evs, 8, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("linkemu: epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            switch (evs[i].data.u32) {
            case 0: read_some(&l, &dirs[0], buf); break;
            case 1: read_some(&l, &dirs[1], buf); break;
            case 2: {
                uint64_t x;
                if (read(tfd, &x, sizeof(x)) < 0 && errno != EAGAIN)
                    perror("linkemu: timerfd");
                armed = 0;
                break;
            }
            case 3: {
                struct signalfd_siginfo si;
                while (read(sfd, &si, sizeof(si)) == (ssize_t)sizeof(si)) {
                    switch (si.ssi_signo) {
                    case SIGUSR1:
                        if (!l.down) {
                            l.down = true;
                            flush(&dirs[0]);
                            flush(&dirs[1]);
                        }
                        break;
                    case SIGUSR2: l.down = false; break;
                    case SIGHUP: print_stats(&l, dirs); break;
                    default:
                        print_stats(&l, dirs);
                        return 0;
                    }
                }
                break;
            }
            }
        }
        uint64_t now = now_ns(), next = 0;
        for (int i = 0; i < 2; i++) {
            deliver(&dirs[i], now);
            if (dirs[i].head < dirs[i].tail) {
                uint64_t due = dirs[i].ring[dirs[i].head % dirs[i].cap].due_ns;
                if (next == 0 || due < next)
                    next = due;
            }
        }
        if (next != armed) {
            struct itimerspec its;
            memset(&its, 0, sizeof(its));
            its.it_value.tv_sec = (time_t)(next / 1000000000ULL);
            its.it_value.tv_nsec = (long)(next % 1000000000ULL);
            if (timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL) < 0)
                perror("linkemu: timerfd_settime");
            armed = next;
        }
    }
}
