/*
 * cmn_dicom_codec.cc - cmn/dicom_codec.h: native DICOM -> JPEG-LS Lossless.
 *
 * DCMTK parses the file and writes the result; CharLS 2.4 (its C API) encodes.
 * The native Pixel Data value is never loaded whole: DCMTK defers values over
 * 4 KiB, and each frame is read with DcmElement::getPartialValue() into one
 * frame buffer, checked, encoded, and stored as one DcmPixelItem. Peak memory
 * is one native frame + one CharLS destination buffer + the encoded frames.
 *
 * Exactness argument (see the header for what is encoded or skipped):
 *   - dcmdjpls writes CharLS' output samples into words/bytes of Bits Allocated
 *     and never sign-extends, so bits above High Bit decode as 0 when
 *     P = Bits Stored. We therefore scan every 16-bit frame: all-zero high
 *     bits -> P = Bits Stored; signed values sign-extended -> P = 16 (the
 *     whole word is coded); anything else -> skipped. 8-bit samples are coded
 *     with P = 8 whatever Bits Stored says (exact by construction; dcmdjpls
 *     3.6.7 fails on CharLS 2.4 streams with P < 8).
 *   - Planar Configuration is kept; colour-by-plane frames are coded
 *     uninterleaved, colour-by-pixel frames sample-interleaved, so dcmdjpls
 *     (planar "restore", its default) rebuilds the original layout.
 *   - A padding byte after an odd-length value must be 0 (dcmdjpls pads with 0).
 *
 * Every entry point catches every C++ exception: nothing C++ crosses the
 * extern "C" boundary.
 */
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#include "dcmtk/config/osconfig.h"
#include "dcmtk/dcmdata/dcdeftag.h"
#include "dcmtk/dcmdata/dcfcache.h"
#include "dcmtk/dcmdata/dcfilefo.h"
#include "dcmtk/dcmdata/dcpixel.h"
#include "dcmtk/dcmdata/dcpixseq.h"
#include "dcmtk/dcmdata/dcpxitem.h"
#include "dcmtk/dcmdata/dcxfer.h"

#include <charls/charls.h>

extern "C" {
#include "cmn/dicom_codec.h"
#include "cmn/errors.h"
#include "cmn/log.h"
}

namespace {

/* Values longer than this stay in the file until accessed. */
const Uint32 kMaxReadLength = 4096;

void set_err(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

void set_err(char *err, size_t errlen, const char *fmt, ...)
{
    if (err == NULL || errlen == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

uint64_t now_usec(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* Image Pixel Module values that decide what can be encoded. */
struct pixel_desc {
    Uint16 rows, cols, spp, bits_alloc, bits_stored, high_bit, pixel_rep, planar;
    Sint32 frames;
    OFString photometric;
    uint64_t frame_bytes;  /* rows * cols * spp * bytes per sample */
};

/* Frame high-bit classes, see the file comment. */
enum high_bits { HB_CLEAN, HB_SIGN_EXTENDED, HB_GARBAGE };

high_bits classify(const Uint16 *p, size_t n, unsigned bits_stored, bool is_signed)
{
    const Uint16 hi = (Uint16)(0xFFFFu << bits_stored);
    Uint16 any = 0;
    for (size_t i = 0; i < n; i++)  /* the common case: one vectorizable pass */
        any |= (Uint16)(p[i] & hi);
    if (any == 0)
        return HB_CLEAN;
    if (!is_signed)
        return HB_GARBAGE;
    const Uint16 sign = (Uint16)(1u << (bits_stored - 1));
    for (size_t i = 0; i < n; i++) {
        Uint16 h = (Uint16)(p[i] & hi);
        if (h != 0 && (h != hi || (p[i] & sign) == 0))
            return HB_GARBAGE;
    }
    return HB_SIGN_EXTENDED;
}

/*
 * Reads and checks the Image Pixel Module. 0 when encodable, CMN_DICOM_CODEC_SKIPPED
 * with a reason otherwise.
 */
int describe(DcmDataset *ds, DcmElement *px, pixel_desc *d, char *err, size_t errlen)
{
    if (ds->findAndGetUint16(DCM_Rows, d->rows).bad() ||
        ds->findAndGetUint16(DCM_Columns, d->cols).bad() ||
        ds->findAndGetUint16(DCM_SamplesPerPixel, d->spp).bad() ||
        ds->findAndGetUint16(DCM_BitsAllocated, d->bits_alloc).bad() ||
        ds->findAndGetUint16(DCM_BitsStored, d->bits_stored).bad() ||
        ds->findAndGetUint16(DCM_HighBit, d->high_bit).bad() ||
        ds->findAndGetUint16(DCM_PixelRepresentation, d->pixel_rep).bad() ||
        ds->findAndGetOFString(DCM_PhotometricInterpretation, d->photometric).bad()) {
        set_err(err, errlen, "incomplete Image Pixel Module");
        return CMN_DICOM_CODEC_SKIPPED;
    }
    d->planar = 0;
    d->frames = 1;
    if (ds->tagExists(DCM_NumberOfFrames, OFFalse) &&
        (ds->findAndGetSint32(DCM_NumberOfFrames, d->frames).bad() || d->frames < 1)) {
        set_err(err, errlen, "invalid Number of Frames");
        return CMN_DICOM_CODEC_SKIPPED;
    }
    if (d->rows == 0 || d->cols == 0) {
        set_err(err, errlen, "empty image (%ux%u)", d->rows, d->cols);
        return CMN_DICOM_CODEC_SKIPPED;
    }
    if (d->bits_alloc != 8 && d->bits_alloc != 16) {
        set_err(err, errlen, "Bits Allocated %u not supported", d->bits_alloc);
        return CMN_DICOM_CODEC_SKIPPED;
    }
    if (d->bits_stored < 2 || d->bits_stored > d->bits_alloc) {
        set_err(err, errlen, "Bits Stored %u not supported with Bits Allocated %u",
                d->bits_stored, d->bits_alloc);
        return CMN_DICOM_CODEC_SKIPPED;
    }
    if (d->bits_alloc == 16 && d->bits_stored <= 8) {
        set_err(err, errlen, "Bits Stored %u in 16-bit words not supported", d->bits_stored);
        return CMN_DICOM_CODEC_SKIPPED;
    }
    if (d->high_bit != d->bits_stored - 1) {
        set_err(err, errlen, "High Bit %u with Bits Stored %u not supported", d->high_bit,
                d->bits_stored);
        return CMN_DICOM_CODEC_SKIPPED;
    }
    if (d->pixel_rep > 1) {
        set_err(err, errlen, "invalid Pixel Representation %u", d->pixel_rep);
        return CMN_DICOM_CODEC_SKIPPED;
    }
    if (d->spp == 1) {
        if (d->photometric != "MONOCHROME1" && d->photometric != "MONOCHROME2" &&
            d->photometric != "PALETTE COLOR") {
            set_err(err, errlen, "photometric interpretation %s not supported with 1 sample",
                    d->photometric.c_str());
            return CMN_DICOM_CODEC_SKIPPED;
        }
    } else if (d->spp == 3) {
        if (d->photometric != "RGB" && d->photometric != "YBR_FULL") {
            set_err(err, errlen, "photometric interpretation %s not supported",
                    d->photometric.c_str());
            return CMN_DICOM_CODEC_SKIPPED;
        }
        if (d->bits_alloc != 8 || d->pixel_rep != 0) {
            set_err(err, errlen, "colour images are supported with 8-bit unsigned samples only");
            return CMN_DICOM_CODEC_SKIPPED;
        }
        if (ds->findAndGetUint16(DCM_PlanarConfiguration, d->planar).bad() || d->planar > 1) {
            set_err(err, errlen, "missing or invalid Planar Configuration");
            return CMN_DICOM_CODEC_SKIPPED;
        }
    } else {
        set_err(err, errlen, "Samples per Pixel %u not supported", d->spp);
        return CMN_DICOM_CODEC_SKIPPED;
    }

    d->frame_bytes = (uint64_t)d->rows * d->cols * d->spp * (d->bits_alloc / 8);
    uint64_t want = d->frame_bytes * (uint64_t)d->frames;
    uint64_t have = px->getLengthField();
    if (have != want && !(want % 2 == 1 && have == want + 1)) {
        set_err(err, errlen, "Pixel Data has %llu bytes, the image needs %llu",
                (unsigned long long)have, (unsigned long long)want);
        return CMN_DICOM_CODEC_SKIPPED;
    }
    return 0;
}

/* RAII for the CharLS encoder (its C API). */
struct encoder_guard {
    charls_jpegls_encoder *enc;
    encoder_guard() : enc(charls_jpegls_encoder_create()) {}
    ~encoder_guard() { charls_jpegls_encoder_destroy(enc); }
};

/*
 * Encodes one frame into *dst (grown as needed). 0, CMN_EDICOM (CharLS error)
 * or CMN_ETOOBIG.
 */
int encode_frame(const pixel_desc &d, const Uint8 *src, unsigned bits, std::vector<Uint8> &dst,
                 size_t *written, char *err, size_t errlen)
{
    encoder_guard g;
    if (g.enc == NULL) {
        set_err(err, errlen, "cannot create a CharLS encoder");
        return CMN_ETOOBIG;
    }
    charls_frame_info fi;
    fi.width = d.cols;
    fi.height = d.rows;
    fi.bits_per_sample = (int32_t)bits;
    fi.component_count = d.spp;
    charls_jpegls_errc ec = charls_jpegls_encoder_set_frame_info(g.enc, &fi);
    if (ec == charls::jpegls_errc::success)
        ec = charls_jpegls_encoder_set_near_lossless(g.enc, 0);
    if (ec == charls::jpegls_errc::success && d.spp == 3)
        ec = charls_jpegls_encoder_set_interleave_mode(
            g.enc, d.planar == 1 ? charls::interleave_mode::none : charls::interleave_mode::sample);
    /* Even length: DICOM items must be, and the fill is a JPEG 0xFF, not a stray 0. */
    if (ec == charls::jpegls_errc::success)
        ec = charls_jpegls_encoder_set_encoding_options(
            g.enc, charls::encoding_options::even_destination_size);
    size_t cap = 0;
    if (ec == charls::jpegls_errc::success)
        ec = charls_jpegls_encoder_get_estimated_destination_size(g.enc, &cap);
    if (ec == charls::jpegls_errc::success) {
        if (dst.size() < cap)
            dst.resize(cap);
        ec = charls_jpegls_encoder_set_destination_buffer(g.enc, dst.data(), dst.size());
    }
    if (ec == charls::jpegls_errc::success)
        ec = charls_jpegls_encoder_encode_from_buffer(g.enc, src, (size_t)d.frame_bytes, 0);
    if (ec == charls::jpegls_errc::success)
        ec = charls_jpegls_encoder_get_bytes_written(g.enc, written);
    if (ec != charls::jpegls_errc::success) {
        set_err(err, errlen, "CharLS: %s", charls_get_error_message(ec));
        return CMN_EDICOM;
    }
    return 0;
}

bool is_transcodable_xfer(E_TransferSyntax x)
{
    return x == EXS_LittleEndianImplicit || x == EXS_LittleEndianExplicit ||
           x == EXS_DeflatedLittleEndianExplicit;
}

/* The body of cmn_dicom_to_jpegls(); *created is set once out_path may exist. */
int to_jpegls(const char *in_path, const char *out_path, cmn_jpegls_stats_t *st, bool *created,
              char *err, size_t errlen)
{
    struct stat sb;
    if (stat(in_path, &sb) != 0) {
        set_err(err, errlen, "cannot stat input: %s", strerror(errno));
        return CMN_EDICOM;
    }
    st->file_bytes_in = (uint64_t)sb.st_size;

    DcmFileFormat ff;
    OFCondition cond = ff.loadFile(OFFilename(in_path), EXS_Unknown, EGL_noChange, kMaxReadLength,
                                   ERM_autoDetect);
    if (cond.bad()) {
        set_err(err, errlen, "cannot read DICOM file: %s", cond.text());
        return CMN_EDICOM;
    }
    DcmDataset *ds = ff.getDataset();
    E_TransferSyntax xfer = ds->getOriginalXfer();
    if (!is_transcodable_xfer(xfer)) {
        DcmXfer x(xfer);
        set_err(err, errlen, "transfer syntax %s (%s) is not native little endian",
                x.getXferID(), x.isEncapsulated() ? "already compressed" : "not supported");
        return CMN_DICOM_CODEC_SKIPPED;
    }
    if (gLocalByteOrder != EBO_LittleEndian) {
        set_err(err, errlen, "big endian host not supported");
        return CMN_DICOM_CODEC_SKIPPED;
    }
    DcmElement *px = NULL;
    if (ds->findAndGetElement(DCM_PixelData, px, OFFalse).bad() || px == NULL ||
        px->ident() != EVR_PixelData) {
        set_err(err, errlen, "no Pixel Data");
        return CMN_DICOM_CODEC_SKIPPED;
    }
    if (px->getLengthField() == DCM_UndefinedLength) {
        set_err(err, errlen, "encapsulated Pixel Data in a native transfer syntax");
        return CMN_EDICOM;
    }

    pixel_desc d;
    int rc = describe(ds, px, &d, err, errlen);
    if (rc != 0)
        return rc;
    st->pixel_bytes_in = px->getLengthField();
    uint64_t want = d.frame_bytes * (uint64_t)d.frames;

    /* The value may sit in the file (deferred) or in memory; both read the same way. */
    DcmFileCache cache;
    if (want < st->pixel_bytes_in) {
        Uint8 pad = 0;
        cond = px->getPartialValue(&pad, (Uint32)want, 1, &cache, EBO_LittleEndian);
        if (cond.bad()) {
            set_err(err, errlen, "cannot read Pixel Data (truncated file?): %s", cond.text());
            return CMN_EDICOM;
        }
        if (pad != 0) {
            set_err(err, errlen, "non-zero padding byte after Pixel Data");
            return CMN_DICOM_CODEC_SKIPPED;
        }
    }

    Uint8 *frame = static_cast<Uint8 *>(cmn_try_malloc((size_t)d.frame_bytes));
    if (frame == NULL) {
        set_err(err, errlen, "out of memory for a %llu-byte frame",
                (unsigned long long)d.frame_bytes);
        return CMN_ETOOBIG;
    }
    DcmPixelSequence *seq = new DcmPixelSequence(DcmTag(DCM_PixelData, EVR_OB));
    DcmPixelItem *bot = new DcmPixelItem(DcmTag(DCM_Item, EVR_OB));
    seq->insert(bot);
    std::vector<Uint32> offsets;
    std::vector<Uint8> dst;
    uint64_t pos = 0;  /* offset of the next item from the first fragment */
    unsigned max_bits = 0;
    rc = 0;
    for (Sint32 f = 0; f < d.frames && rc == 0; f++) {
        cond = px->getPartialValue(frame, (Uint32)(d.frame_bytes * (uint64_t)f),
                                   (Uint32)d.frame_bytes, &cache, EBO_LittleEndian);
        if (cond.bad()) {
            set_err(err, errlen, "cannot read frame %d of Pixel Data (truncated file?): %s",
                    (int)f + 1, cond.text());
            rc = CMN_EDICOM;
            break;
        }
        /* 8-bit samples are always coded whole (P = 8): dcmdjpls 3.6.7 cannot
         * decode CharLS 2.4 streams with P < 8. */
        unsigned bits = d.bits_alloc;
        if (d.bits_alloc == 16 && d.bits_stored < 16) {
            high_bits hb = classify(reinterpret_cast<const Uint16 *>(frame),
                                    (size_t)(d.frame_bytes / 2), d.bits_stored, d.pixel_rep == 1);
            if (hb == HB_GARBAGE) {
                set_err(err, errlen,
                        "frame %d has bits set above High Bit %u (not a sign extension)",
                        (int)f + 1, d.high_bit);
                rc = CMN_DICOM_CODEC_SKIPPED;
                break;
            }
            if (hb == HB_CLEAN)
                bits = d.bits_stored;
        }
        if (bits > max_bits)
            max_bits = bits;

        size_t written = 0;
        uint64_t t0 = now_usec();
        rc = encode_frame(d, frame, bits, dst, &written, err, errlen);
        st->encode_usec += now_usec() - t0;
        if (rc != 0)
            break;
        if (pos > 0xFFFFFFFFu || pos + written + 8 > 0xFFFFFFFEu) {
            set_err(err, errlen, "encoded Pixel Data exceeds 4 GiB");
            rc = CMN_DICOM_CODEC_SKIPPED;
            break;
        }
        offsets.push_back((Uint32)pos);
        DcmPixelItem *item = new DcmPixelItem(DcmTag(DCM_Item, EVR_OB));
        cond = item->putUint8Array(dst.data(), (unsigned long)written);
        seq->insert(item);
        if (cond.bad()) {
            set_err(err, errlen, "cannot store frame %d: %s", (int)f + 1, cond.text());
            rc = CMN_ETOOBIG;
            break;
        }
        pos += written + 8;
        st->pixel_bytes_out += written;
        st->frames++;
    }
    free(frame);
    if (rc == 0) {
        /* Basic Offset Table: little endian Uint32s (host order checked above). */
        cond = bot->putUint8Array(reinterpret_cast<const Uint8 *>(offsets.data()),
                                  (unsigned long)(offsets.size() * sizeof(Uint32)));
        if (cond.bad()) {
            set_err(err, errlen, "cannot store the offset table: %s", cond.text());
            rc = CMN_EDICOM;
        }
    }
    if (rc != 0) {
        delete seq;
        return rc;
    }
    st->bits_per_sample = max_bits;
    if (st->pixel_bytes_out + 8u * st->frames >= st->pixel_bytes_in) {
        set_err(err, errlen, "JPEG-LS would not be smaller (%llu -> %llu bytes)",
                (unsigned long long)st->pixel_bytes_in, (unsigned long long)st->pixel_bytes_out);
        delete seq;
        return CMN_DICOM_CODEC_SKIPPED;
    }

    /* The pixel element now owns seq; its native representation is dropped. */
    DcmPixelData *pd = static_cast<DcmPixelData *>(px);
    pd->putOriginalRepresentation(EXS_JPEGLSLossless, NULL, seq);
    if (!ds->canWriteXfer(EXS_JPEGLSLossless, xfer)) {
        set_err(err, errlen, "DCMTK cannot write this dataset as JPEG-LS (nested pixel data?)");
        return CMN_DICOM_CODEC_SKIPPED;
    }

    *created = true;
    /* EWM_fileformat keeps the meta header and updates its Transfer Syntax UID. */
    cond = ff.saveFile(OFFilename(out_path), EXS_JPEGLSLossless, EET_ExplicitLength,
                       EGL_recalcGL, EPD_noChange, 0, 0, EWM_fileformat);
    if (cond.bad()) {
        set_err(err, errlen, "cannot write %s: %s", out_path, cond.text());
        return CMN_EDICOM;
    }
    if (stat(out_path, &sb) == 0)
        st->file_bytes_out = (uint64_t)sb.st_size;
    return 0;
}

} /* namespace */

extern "C" int cmn_dicom_to_jpegls(const char *in_path, const char *out_path,
                                   cmn_jpegls_stats_t *stats, char *err, size_t errlen)
{
    cmn_jpegls_stats_t local;
    cmn_jpegls_stats_t *st = stats != NULL ? stats : &local;
    uint64_t t0 = now_usec();
    bool created = false;
    int rc;

    memset(st, 0, sizeof *st);
    if (err != NULL && errlen > 0)
        err[0] = '\0';
    if (in_path == NULL || out_path == NULL || strcmp(in_path, out_path) == 0) {
        set_err(err, errlen, "invalid argument");
        return CMN_EINTERNAL;
    }
    try {
        rc = to_jpegls(in_path, out_path, st, &created, err, errlen);
    } catch (const std::bad_alloc &) {
        set_err(err, errlen, "out of memory");
        rc = CMN_ETOOBIG;
    } catch (const std::exception &e) {
        set_err(err, errlen, "exception: %s", e.what());
        rc = CMN_EDICOM;
    } catch (...) {
        set_err(err, errlen, "unknown exception");
        rc = CMN_EDICOM;
    }
    if (rc != 0) {
        if (created)
            unlink(out_path);
        st->file_bytes_out = 0;
        if (rc == CMN_DICOM_CODEC_SKIPPED) {
            st->pixel_bytes_out = 0;
            st->frames = 0;
        }
    }
    st->usec = now_usec() - t0;
    return rc;
}
