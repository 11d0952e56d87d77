/*
 * dcmtk_jpls_bench.cc - the anchor: DCMTK's own JPEG-LS encoder (dcmjpls, its
 * CharLS fork) in process, on the same files as jpegls_bench.c.
 *
 *   dcmtk_jpls_bench [-r REPEAT] -o OUTDIR FILE...
 *
 * Per file: load, chooseRepresentation(JPEG-LS Lossless) with dcmcjpls'
 * defaults (raw mode, one fragment per frame, offset table), save. Prints one
 * line: files pixel_mb ratio sec mb_s cpu_mb_s (best of REPEAT runs); ratio = native
 * Pixel Data bytes / encapsulated Pixel Data bytes. Built by bench_jpegls.sh.
 */
#include <sys/resource.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "dcmtk/config/osconfig.h"
#include "dcmtk/dcmdata/dcdeftag.h"
#include "dcmtk/dcmdata/dcfilefo.h"
#include "dcmtk/dcmdata/dcpixel.h"
#include "dcmtk/dcmdata/dcpixseq.h"
#include "dcmtk/dcmdata/dcpxitem.h"
#include "dcmtk/dcmjpls/djencode.h"
#include "dcmtk/dcmjpls/djrparam.h"
#include "dcmtk/oflog/oflog.h"

static double cpu_sec(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

int main(int argc, char **argv)
{
    const char *outdir = NULL;
    int repeat = 1, opt;
    while ((opt = getopt(argc, argv, "r:o:")) != -1) {
        if (opt == 'r')
            repeat = atoi(optarg);
        else if (opt == 'o')
            outdir = optarg;
        else
            return 2;
    }
    if (outdir == NULL || optind >= argc || repeat < 1) {
        fprintf(stderr, "usage: %s [-r REPEAT] -o OUTDIR FILE...\n", argv[0]);
        return 2;
    }
    OFLog::configure(OFLogger::ERROR_LOG_LEVEL);
    DJLSEncoderRegistration::registerCodecs();
    DJLSRepresentationParameter rp(2, OFTrue);  /* lossless */
    double best = -1;
    int failed = 0;
    for (int r = 0; r < repeat; r++) {
        double in = 0, out = 0;
        failed = 0;
        auto t0 = std::chrono::steady_clock::now();
        double c0 = cpu_sec();
        for (int i = optind; i < argc; i++) {
            DcmFileFormat ff;
            const char *base = strrchr(argv[i], '/');
            std::string dst = std::string(outdir) + "/" + (base ? base + 1 : argv[i]);
            if (ff.loadFile(argv[i]).bad()) {
                failed++;
                continue;
            }
            DcmDataset *ds = ff.getDataset();
            DcmElement *px = NULL;
            if (ds->findAndGetElement(DCM_PixelData, px).good() && px != NULL)
                in += px->getLengthField();
            if (ds->chooseRepresentation(EXS_JPEGLSLossless, &rp).bad() ||
                !ds->canWriteXfer(EXS_JPEGLSLossless) ||
                ff.saveFile(dst.c_str(), EXS_JPEGLSLossless).bad()) {
                failed++;
                continue;
            }
            DcmPixelData *pd = static_cast<DcmPixelData *>(px);
            DcmPixelSequence *seq = NULL;
            if (pd->getEncapsulatedRepresentation(EXS_JPEGLSLossless, &rp, seq).good() &&
                seq != NULL) {
                for (unsigned long k = 1; k < seq->card(); k++) {
                    DcmPixelItem *it = NULL;
                    if (seq->getItem(it, k).good())
                        out += it->getLength();
                }
            }
        }
        double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        double cpu = cpu_sec() - c0;
        if (best < 0 || sec < best) {
            best = sec;
            printf("files=%d failed=%d pixel_mb=%.1f ratio=%.3f sec=%.3f mb_s=%.1f cpu_mb_s=%.1f run=%d\n",
                   argc - optind, failed, in / 1e6, out > 0 ? in / out : 0.0, sec,
                   in / 1e6 / sec, in / 1e6 / cpu, r + 1);
            fflush(stdout);
        }
    }
    DJLSEncoderRegistration::cleanup();
    return failed ? 1 : 0;
}
