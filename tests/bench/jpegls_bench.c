/*
 * jpegls_bench.c - drives cmn_dicom_to_jpegls() over files, in process.
 *
 *   jpegls_bench [-v] [-r REPEAT] -o OUTDIR FILE...
 *
 * Transcodes every FILE to OUTDIR/<basename> (REPEAT times, keeping the best
 * run) and prints one summary line of key=value pairs:
 *   files encoded skipped errors pixel_mb ratio file_ratio sec mb_s cpu_mb_s enc_mb_s
 * pixel_mb counts the native Pixel Data of encoded files; ratio is pixel bytes
 * in / JPEG-LS bytes out; mb_s is pixel MB per wall second of the whole call
 * (parse + encode + write), cpu_mb_s per CPU second of this process (less
 * sensitive to a busy machine); enc_mb_s counts CharLS time only. -v prints a line
 * per file (rc, reason). Exit status 1 if any file failed with an error.
 * Built by tests/bench/bench_jpegls.sh; not part of make.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "cmn/dicom.h"
#include "cmn/dicom_codec.h"
#include "cmn/errors.h"

static double cpu_sec(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

static double now_sec(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    const char *outdir = NULL;
    int verbose = 0, repeat = 1, opt;
    double best = 0;
    int errors = 0;

    while ((opt = getopt(argc, argv, "vr:o:")) != -1) {
        switch (opt) {
        case 'v': verbose = 1; break;
        case 'r': repeat = (int)strtol(optarg, NULL, 10); break;
        case 'o': outdir = optarg; break;
        default:
            fprintf(stderr, "usage: %s [-v] [-r REPEAT] -o OUTDIR FILE...\n", argv[0]);
            return 2;
        }
    }
    if (outdir == NULL || optind >= argc || repeat < 1) {
        fprintf(stderr, "usage: %s [-v] [-r REPEAT] -o OUTDIR FILE...\n", argv[0]);
        return 2;
    }
    if (cmn_dicom_global_init() != 0) {
        fprintf(stderr, "jpegls_bench: DCMTK init failed\n");
        return 2;
    }
    for (int r = 0; r < repeat; r++) {
        uint64_t px_in = 0, px_out = 0, f_in = 0, f_out = 0, enc_us = 0;
        int encoded = 0, skipped = 0;
        double t0 = now_sec(), c0 = cpu_sec();
        errors = 0;
        for (int i = optind; i < argc; i++) {
            char out[4096], err[512];
            const char *base = strrchr(argv[i], '/');
            cmn_jpegls_stats_t st;
            int rc;

            snprintf(out, sizeof out, "%s/%s", outdir, base ? base + 1 : argv[i]);
            rc = cmn_dicom_to_jpegls(argv[i], out, &st, err, sizeof err);
            if (rc == 0) {
                encoded++;
                px_in += st.pixel_bytes_in;
                px_out += st.pixel_bytes_out;
                f_in += st.file_bytes_in;
                f_out += st.file_bytes_out;
                enc_us += st.encode_usec;
            } else if (rc == CMN_DICOM_CODEC_SKIPPED) {
                skipped++;
            } else {
                errors++;
            }
            if (verbose && r == 0)
                printf("%s rc=%d frames=%u bits=%u ratio=%.3f usec=%llu %s\n", argv[i], rc,
                       st.frames, st.bits_per_sample,
                       st.pixel_bytes_out ? (double)st.pixel_bytes_in / st.pixel_bytes_out : 0.0,
                       (unsigned long long)st.usec, err);
        }
        double sec = now_sec() - t0, cpu = cpu_sec() - c0;
        if (r == 0 || sec < best) {
            best = sec;
            printf("files=%d encoded=%d skipped=%d errors=%d pixel_mb=%.1f ratio=%.3f "
                   "file_ratio=%.3f sec=%.3f mb_s=%.1f cpu_mb_s=%.1f enc_mb_s=%.1f run=%d\n",
                   argc - optind, encoded, skipped, errors, px_in / 1e6,
                   px_out ? (double)px_in / px_out : 0.0, f_out ? (double)f_in / f_out : 0.0, sec,
                   px_in / 1e6 / sec, px_in / 1e6 / cpu, enc_us ? px_in / (double)enc_us : 0.0, r + 1);
            fflush(stdout);
        }
    }
    return errors ? 1 : 0;
}
