/*
 * transcode.cc - cloud/transcode.h over DCMTK 3.6.7 (dcmdata + dcmjpls).
 *
 * Decoding uses DCMTK's codec registry: dcmjpls' decoder is registered once
 * (std::call_once) with UID creation disabled, so a decoded instance keeps
 * its SOP Instance UID (the decoding is lossless for 1.2.840.10008.1.2.4.80).
 * Every call works on its own DcmFileFormat; DCMTK's codec list is read-only
 * after registration and guarded by DCMTK's own lock, so calls may run on
 * several threadpool threads at once. Every entry point catches everything.
 */
#include <cerrno>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <vector>

#include "dcmtk/config/osconfig.h"
#include "dcmtk/dcmdata/dcdeftag.h"
#include "dcmtk/dcmdata/dcdict.h"
#include "dcmtk/dcmdata/dcfilefo.h"
#include "dcmtk/dcmdata/dcpixel.h"
#include "dcmtk/dcmdata/dcpixseq.h"
#include "dcmtk/dcmdata/dcpxitem.h"
#include "dcmtk/dcmdata/dctag.h"
#include "dcmtk/dcmdata/dcxfer.h"
#include "dcmtk/dcmjpls/djdecode.h"

extern "C" {
#include "cmn/errors.h"
}
#include "transcode.h"

namespace {

std::once_flag codecs_once;

void codecs_init()
{
    std::call_once(codecs_once, [] {
        DJLSDecoderRegistration::registerCodecs(EJLSUC_never, EJLSPC_restore);
    });
}

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

bool xfer_decodable(E_TransferSyntax x)
{
    DcmXfer d(x);
    if (!d.isEncapsulated())
        return true;
    return x == EXS_JPEGLSLossless || x == EXS_JPEGLSLossy;
}

int load(DcmFileFormat &ff, const char *path, char *err, size_t errlen)
{
    OFCondition st = ff.loadFile(OFFilename(path), EXS_Unknown, EGL_noChange,
                                 DCM_MaxReadLength, ERM_autoDetect);
    if (st.bad()) {
        set_err(err, errlen, "cannot read DICOM file: %s", st.text());
        return CMN_EDICOM;
    }
    return 0;
}

/* Bytes of one native frame: Rows x Columns x Samples x Bits Allocated / 8. */
size_t native_frame_len(DcmDataset *ds)
{
    Uint16 rows = 0, cols = 0, spp = 1, bits = 0;
    ds->findAndGetUint16(DCM_Rows, rows);
    ds->findAndGetUint16(DCM_Columns, cols);
    ds->findAndGetUint16(DCM_SamplesPerPixel, spp);
    ds->findAndGetUint16(DCM_BitsAllocated, bits);
    if (bits == 0 || bits % 8 != 0)
        return 0;
    return (size_t)rows * cols * spp * (bits / 8);
}

Uint32 number_of_frames(DcmDataset *ds)
{
    Sint32 n = 1;
    if (ds->findAndGetSint32(DCM_NumberOfFrames, n).bad() || n < 1)
        n = 1;
    return (Uint32)n;
}

uint8_t *copy_out(const void *p, size_t n)
{
    uint8_t *d = (uint8_t *)malloc(n ? n : 1);
    if (d != NULL && n)
        memcpy(d, p, n);
    return d;
}

/*
 * The compressed bytes of frame k (0-based) of an encapsulated Pixel Data:
 * one frame = all fragments; as many fragments as frames = fragment k+1;
 * otherwise the Basic Offset Table decides.
 */
int encapsulated_frame(DcmPixelSequence *seq, Uint32 nframes, Uint32 k, std::vector<Uint8> &out,
                       char *err, size_t errlen)
{
    unsigned long nitems = seq->card();
    if (nitems < 2) {
        set_err(err, errlen, "encapsulated pixel data without fragments");
        return CMN_EDICOM;
    }
    unsigned long nfrag = nitems - 1;
    unsigned long first = 0, last = 0;   /* item indexes, inclusive */
    if (nframes == 1) {
        first = 1;
        last = nfrag;
    } else if (nfrag == nframes) {
        first = last = k + 1;
    } else {
        DcmPixelItem *bot = NULL;
        Uint32 *offs = NULL;
        if (seq->getItem(bot, 0).bad() || bot == NULL || bot->getLength() < 4 * nframes ||
            bot->getUint32Array(offs).bad() || offs == NULL) {
            set_err(err, errlen, "fragments do not map to frames (no offset table)");
            return CMN_EDICOM;
        }
        Uint32 start = offs[k], end = k + 1 < nframes ? offs[k + 1] : 0xFFFFFFFFu;
        Uint32 pos = 0;
        first = 0;
        for (unsigned long i = 1; i < nitems; i++) {
            DcmPixelItem *it = NULL;
            if (seq->getItem(it, i).bad() || it == NULL)
                return CMN_EDICOM;
            if (pos >= start && pos < end) {
                if (!first)
                    first = i;
                last = i;
            }
            pos += 8 + it->getLength();
        }
        if (!first) {
            set_err(err, errlen, "offset table points past the fragments");
            return CMN_EDICOM;
        }
    }
    out.clear();
    for (unsigned long i = first; i <= last; i++) {
        DcmPixelItem *it = NULL;
        Uint8 *p = NULL;
        if (seq->getItem(it, i).bad() || it == NULL)
            return CMN_EDICOM;
        Uint32 len = it->getLength();
        if (len == 0)
            continue;
        if (it->getUint8Array(p).bad() || p == NULL) {
            set_err(err, errlen, "cannot read fragment %lu", i);
            return CMN_EDICOM;
        }
        out.insert(out.end(), p, p + len);
    }
    return 0;
}

int frames_get(const char *path, const uint32_t *frames, int n, bool decode, cloud_frame_t *out,
               uint32_t *nframes_out, char *err, size_t errlen)
{
    DcmFileFormat ff;
    int rc = load(ff, path, err, errlen);
    if (rc < 0)
        return rc;
    DcmDataset *ds = ff.getDataset();
    E_TransferSyntax xfer = ds->getOriginalXfer();
    DcmElement *el = NULL;
    if (ds->findAndGetElement(DCM_PixelData, el).bad() || el == NULL) {
        set_err(err, errlen, "no Pixel Data");
        return CMN_ENOTFOUND;
    }
    DcmPixelData *px = OFstatic_cast(DcmPixelData *, el);
    Uint32 nframes = number_of_frames(ds);
    if (nframes_out)
        *nframes_out = nframes;
    for (int i = 0; i < n; i++) {
        if (frames[i] < 1 || frames[i] > nframes) {
            set_err(err, errlen, "frame %u out of range (1..%u)", frames[i], nframes);
            return CMN_ENOTFOUND;
        }
    }
    DcmXfer dx(xfer);
    size_t flen = native_frame_len(ds);
    if (decode || !dx.isEncapsulated()) {
        if (!xfer_decodable(xfer)) {
            set_err(err, errlen, "no decoder for transfer syntax %s", dx.getXferID());
            return -ENOTSUP;
        }
        if (flen == 0) {
            set_err(err, errlen, "pixel data cannot be split into frames");
            return CMN_EDICOM;
        }
        Uint32 fsize = 0;
        if (px->getUncompressedFrameSize(ds, fsize).bad() || fsize < flen) {
            set_err(err, errlen, "cannot compute the frame size");
            return CMN_EDICOM;
        }
        std::vector<Uint8> buf(fsize);
        Uint32 start_frag = 0;
        for (int i = 0; i < n; i++) {
            OFString cm;
            /* A frame list can jump back: restart the fragment search then. */
            if (i > 0 && frames[i] <= frames[i - 1])
                start_frag = 0;
            OFCondition st = px->getUncompressedFrame(ds, frames[i] - 1, start_frag, buf.data(),
                                                      fsize, cm, NULL);
            if (st.bad()) {
                set_err(err, errlen, "cannot decode frame %u: %s", frames[i], st.text());
                cloud_frames_free(out, i);
                return CMN_EDICOM;
            }
            out[i].data = copy_out(buf.data(), flen);
            out[i].len = flen;
            if (out[i].data == NULL) {
                cloud_frames_free(out, i);
                return CMN_ETOOBIG;
            }
        }
        return 0;
    }
    DcmPixelSequence *seq = NULL;
    if (px->getEncapsulatedRepresentation(xfer, NULL, seq).bad() || seq == NULL) {
        set_err(err, errlen, "no encapsulated pixel data");
        return CMN_EDICOM;
    }
    std::vector<Uint8> frag;
    for (int i = 0; i < n; i++) {
        rc = encapsulated_frame(seq, nframes, frames[i] - 1, frag, err, errlen);
        if (rc < 0) {
            cloud_frames_free(out, i);
            return rc;
        }
        out[i].data = copy_out(frag.data(), frag.size());
        out[i].len = frag.size();
        if (out[i].data == NULL) {
            cloud_frames_free(out, i);
            return CMN_ETOOBIG;
        }
    }
    return 0;
}

int to_native(const char *in_path, const char *out_path, char *err, size_t errlen)
{
    DcmFileFormat ff;
    int rc = load(ff, in_path, err, errlen);
    if (rc < 0)
        return rc;
    DcmDataset *ds = ff.getDataset();
    E_TransferSyntax xfer = ds->getOriginalXfer();
    if (!xfer_decodable(xfer)) {
        set_err(err, errlen, "no decoder for transfer syntax %s", DcmXfer(xfer).getXferID());
        return -ENOTSUP;
    }
    OFCondition st = ds->chooseRepresentation(EXS_LittleEndianExplicit, NULL);
    if (st.bad() || !ds->canWriteXfer(EXS_LittleEndianExplicit)) {
        set_err(err, errlen, "cannot decode: %s", st.bad() ? st.text() : "representation");
        return CMN_EDICOM;
    }
    st = ff.saveFile(OFFilename(out_path), EXS_LittleEndianExplicit, EET_ExplicitLength,
                     EGL_recalcGL, EPD_noChange, 0, 0, EWM_updateMeta);
    if (st.bad()) {
        set_err(err, errlen, "cannot write: %s", st.text());
        return CMN_EDICOM;
    }
    return 0;
}

const char *plain_vr(DcmVR vr)
{
    const char *name = vr.getVRName();
    if (name == NULL || strlen(name) != 2)
        return "UN";
    if (name[0] >= 'A' && name[0] <= 'Z')
        return name;
    if (strcmp(name, "xs") == 0)
        return "US";
    if (strcmp(name, "up") == 0)
        return "UL";
    if (strcmp(name, "ox") == 0 || strcmp(name, "lt") == 0 || strcmp(name, "px") == 0)
        return "OW";
    return "UN";
}

bool is_hex8(const char *s)
{
    if (strlen(s) != 8)
        return false;
    for (int i = 0; i < 8; i++) {
        char c = s[i];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F')))
            return false;
    }
    return true;
}

} // namespace

extern "C" bool cloud_transcode_can_decode(const char *ts)
{
    try {
        DcmXfer x(ts);
        if (x.getXfer() == EXS_Unknown)
            return false;
        return xfer_decodable(x.getXfer());
    } catch (...) {
        return false;
    }
}

extern "C" int cloud_transcode_to_native(const char *in_path, const char *out_path, char *err,
                                         size_t errlen)
{
    try {
        codecs_init();
        return to_native(in_path, out_path, err, errlen);
    } catch (const std::bad_alloc &) {
        set_err(err, errlen, "out of memory");
        return CMN_ETOOBIG;
    } catch (...) {
        set_err(err, errlen, "DCMTK exception");
        return CMN_EDICOM;
    }
}

extern "C" int cloud_frames_get(const char *path, const uint32_t *frames, int n, bool decode,
                                cloud_frame_t *out, uint32_t *nframes_out, char *err,
                                size_t errlen)
{
    memset(out, 0, sizeof(*out) * (size_t)(n > 0 ? n : 0));
    try {
        codecs_init();
        return frames_get(path, frames, n, decode, out, nframes_out, err, errlen);
    } catch (const std::bad_alloc &) {
        cloud_frames_free(out, n);
        set_err(err, errlen, "out of memory");
        return CMN_ETOOBIG;
    } catch (...) {
        cloud_frames_free(out, n);
        set_err(err, errlen, "DCMTK exception");
        return CMN_EDICOM;
    }
}

extern "C" void cloud_frames_free(cloud_frame_t *f, int n)
{
    for (int i = 0; i < n; i++) {
        free(f[i].data);
        f[i].data = NULL;
        f[i].len = 0;
    }
}

extern "C" int cloud_element_get(const char *path, uint32_t tag, uint8_t **out, size_t *len,
                                 char *err, size_t errlen)
{
    *out = NULL;
    *len = 0;
    try {
        DcmFileFormat ff;
        int rc = load(ff, path, err, errlen);
        if (rc < 0)
            return rc;
        DcmElement *el = NULL;
        DcmTagKey key((Uint16)(tag >> 16), (Uint16)(tag & 0xFFFF));
        if (ff.getDataset()->findAndGetElement(key, el).bad() || el == NULL) {
            set_err(err, errlen, "no such attribute");
            return CMN_ENOTFOUND;
        }
        Uint32 n = el->getLength();
        if (n == DCM_UndefinedLength) {
            set_err(err, errlen, "attribute has no plain value");
            return CMN_ENOTFOUND;
        }
        uint8_t *p = (uint8_t *)malloc(n ? n : 1);
        if (p == NULL)
            return CMN_ETOOBIG;
        if (n && el->getPartialValue(p, 0, n, NULL, EBO_LittleEndian).bad()) {
            free(p);
            set_err(err, errlen, "cannot read the value");
            return CMN_EDICOM;
        }
        *out = p;
        *len = n;
        return 0;
    } catch (...) {
        free(*out);
        *out = NULL;
        set_err(err, errlen, "DCMTK exception");
        return CMN_EDICOM;
    }
}

extern "C" bool cloud_dict_lookup(const char *key, uint32_t *tag, char vr[3])
{
    try {
        DcmTag t;
        if (is_hex8(key)) {
            unsigned long v = strtoul(key, NULL, 16);
            t = DcmTag(DcmTagKey((Uint16)(v >> 16), (Uint16)(v & 0xFFFF)));
        } else if (DcmTag::findTagFromName(key, t).bad()) {
            return false;
        }
        *tag = ((uint32_t)t.getGTag() << 16) | t.getETag();
        snprintf(vr, 3, "%s", plain_vr(t.getVR()));
        return true;
    } catch (...) {
        return false;
    }
}
