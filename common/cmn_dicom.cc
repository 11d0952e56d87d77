/*
 * cmn_dicom.cc - the C API of cmn/dicom.h over DCMTK 3.6.7 (the only C++ in common/).
 *
 * Every entry point catches every C++ exception and turns it into CMN_EDICOM:
 * nothing C++ crosses the extern "C" boundary.
 *
 * Reading: DcmFileFormat::loadFile() with meta header auto-detection, so a raw
 * dataset without preamble is accepted too (DCMTK guesses its transfer syntax).
 * Values longer than a few KiB are not read into memory: DCMTK keeps a stream
 * factory holding the value's absolute file offset, which is exactly what
 * pixel_offset needs. Character strings are converted to UTF-8 with
 * DcmItem::convertToUTF8() (Debian builds DCMTK with glibc iconv); when that
 * fails the strings are kept as read and any byte that is not valid UTF-8 is
 * replaced by '?', so callers always get valid UTF-8.
 *
 * Thread safety: every call works on its own DcmFileFormat; the data
 * dictionary is global but locked by DCMTK; iconv descriptors are per call.
 * cmn_dicom_global_init() must run once before other threads call in.
 */
#include <sys/stat.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <cstring>
#include <mutex>
#include <set>
#include <sstream>
#include <string>

#include "dcmtk/config/osconfig.h"
#include "dcmtk/dcmdata/dcdeftag.h"
#include "dcmtk/dcmdata/dcdict.h"
#include "dcmtk/dcmdata/dcfilefo.h"
#include "dcmtk/dcmdata/dcistrmf.h"
#include "dcmtk/dcmdata/dcjson.h"
#include "dcmtk/dcmdata/dcmetinf.h"
#include "dcmtk/dcmdata/dcstack.h"
#include "dcmtk/dcmdata/dcxfer.h"
#include "dcmtk/oflog/oflog.h"

#include <jansson.h>

extern "C" {
#include "cmn/dicom.h"
#include "cmn/errors.h"
#include "cmn/log.h"
}

namespace {

/* Values longer than this stay in the file until accessed (DCMTK's default). */
const Uint32 kMaxReadLength = 4096;
/* Binary values longer than this become a BulkDataURI in DICOM JSON. */
const Uint32 kBulkThreshold = 1024;

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

/* Length of the valid UTF-8 sequence starting at s[i], or 0 if invalid. */
size_t utf8_seq_len(const unsigned char *s, size_t i, size_t n)
{
    unsigned char c = s[i];
    size_t len;
    unsigned cp;
    if (c < 0x80)
        return 1;
    if (c >= 0xC2 && c <= 0xDF) {
        len = 2;
        cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        cp = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        cp = c & 0x07;
    } else {
        return 0;
    }
    if (i + len > n)
        return 0;
    for (size_t k = 1; k < len; k++) {
        if ((s[i + k] & 0xC0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[i + k] & 0x3F);
    }
    if ((len == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) ||
        (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)))
        return 0;
    return len;
}

/*
 * Copies src into dst[cap] as valid UTF-8: invalid bytes and control characters
 * become '?', and the copy is cut on a character boundary.
 */
void copy_utf8(char *dst, size_t cap, const OFString &src)
{
    const unsigned char *s = reinterpret_cast<const unsigned char *>(src.c_str());
    size_t n = src.length(), o = 0;
    for (size_t i = 0; i < n;) {
        size_t len = utf8_seq_len(s, i, n);
        if (len == 0 || (len == 1 && (s[i] < 0x20 || s[i] == 0x7F))) {
            if (o + 1 >= cap)
                break;
            dst[o++] = '?';
            i++;
            continue;
        }
        if (o + len >= cap)
            break;
        memcpy(dst + o, s + i, len);
        o += len;
        i += len;
    }
    dst[o] = '\0';
}

void get_str(DcmItem *item, const DcmTagKey &tag, char *dst, size_t cap)
{
    OFString v;
    dst[0] = '\0';
    if (item->findAndGetOFStringArray(tag, v).good())
        copy_utf8(dst, cap, v);
}

int get_int(DcmItem *item, const DcmTagKey &tag, int dflt)
{
    Sint32 v;
    if (item->findAndGetSint32(tag, v).good())
        return (int)v;
    return dflt;
}

int get_us(DcmItem *item, const DcmTagKey &tag)
{
    Uint16 v;
    if (item->findAndGetUint16(tag, v).good())
        return (int)v;
    return 0;
}

/* Native little-endian pixel data that can be served straight from the file. */
bool is_native_le(E_TransferSyntax xfer)
{
    DcmXfer x(xfer);
    return !x.isEncapsulated() && x.getByteOrder() == EBO_LittleEndian &&
           x.getStreamCompression() == ESC_none;
}

/* 0 with *off set, or -1 when the element's value was loaded into memory. */
int deferred_offset(DcmElement *elem, uint64_t *off)
{
    const DcmInputStreamFactory *f = elem->getInputStream();
    if (f == NULL || f->ident() != DFT_DcmInputFileStreamFactory)
        return -1;
    const DcmInputFileStreamFactory *ff = static_cast<const DcmInputFileStreamFactory *>(f);
    *off = (uint64_t)ff->getOffset();
    return 0;
}

/*
 * Loads path into ff. 0, or CMN_EDICOM with a message. DCMTK reports most
 * truncations itself; the caller checks deferred values against the file size.
 */
int load(DcmFileFormat &ff, const char *path, Uint32 max_read, char *err, size_t errlen)
{
    OFCondition st = ff.loadFile(OFFilename(path), EXS_Unknown, EGL_noChange, max_read,
                                 ERM_autoDetect);
    if (st.bad()) {
        set_err(err, errlen, "cannot read DICOM file: %s", st.text());
        return CMN_EDICOM;
    }
    return 0;
}

/* Pixel data offset/length; 0 with zeroes when not applicable, CMN_EDICOM if truncated. */
int pixel_location(DcmDataset *ds, const char *path, cmn_dicom_info_t *out, char *err,
                   size_t errlen)
{
    DcmElement *px = NULL;
    out->pixel_offset = 0;
    out->pixel_length = 0;
    if (ds->findAndGetElement(DCM_PixelData, px, OFFalse).bad() || px == NULL)
        return 0;
    Uint32 len = px->getLengthField();
    if (len == DCM_UndefinedLength || len == 0)
        return 0;

    struct stat sb;
    if (stat(path, &sb) != 0) {
        set_err(err, errlen, "cannot stat file");
        return CMN_EDICOM;
    }
    uint64_t off = 0;
    if (deferred_offset(px, &off) != 0) {
        /* Small image, value already in memory: reload with nothing in memory. */
        DcmFileFormat ff2;
        if (load(ff2, path, 0, err, errlen) != 0)
            return CMN_EDICOM;
        DcmElement *px2 = NULL;
        if (ff2.getDataset()->findAndGetElement(DCM_PixelData, px2, OFFalse).bad() ||
            px2 == NULL || deferred_offset(px2, &off) != 0)
            return 0;
    }
    if (off + (uint64_t)len > (uint64_t)sb.st_size) {
        set_err(err, errlen, "truncated: pixel data needs %llu bytes at offset %llu, file has %llu",
                (unsigned long long)len, (unsigned long long)off,
                (unsigned long long)sb.st_size);
        return CMN_EDICOM;
    }
    if (is_native_le(ds->getOriginalXfer())) {
        out->pixel_offset = off;
        out->pixel_length = len;
    }
    return 0;
}

int read_info(const char *path, cmn_dicom_info_t *out, char *err, size_t errlen)
{
    DcmFileFormat ff;
    int rc = load(ff, path, kMaxReadLength, err, errlen);
    if (rc != 0)
        return rc;
    DcmDataset *ds = ff.getDataset();
    DcmMetaInfo *meta = ff.getMetaInfo();

    if (ds->convertToUTF8().bad()) {
        /* Unknown or broken character set: keep the bytes, copy_utf8() sanitises. */
        OFString uid;
        ds->findAndGetOFString(DCM_SOPInstanceUID, uid);
        CMN_LOG_W("dicom", "charset conversion failed sop_uid=%s", uid.c_str());
    }

    get_str(ds, DCM_PatientID, out->patient_id, sizeof out->patient_id);
    get_str(ds, DCM_PatientName, out->patient_name, sizeof out->patient_name);
    get_str(ds, DCM_PatientBirthDate, out->patient_birth_date, sizeof out->patient_birth_date);
    get_str(ds, DCM_PatientSex, out->patient_sex, sizeof out->patient_sex);
    get_str(ds, DCM_StudyInstanceUID, out->study_uid, sizeof out->study_uid);
    get_str(ds, DCM_StudyDate, out->study_date, sizeof out->study_date);
    get_str(ds, DCM_StudyTime, out->study_time, sizeof out->study_time);
    get_str(ds, DCM_AccessionNumber, out->accession, sizeof out->accession);
    get_str(ds, DCM_StudyID, out->study_id, sizeof out->study_id);
    get_str(ds, DCM_StudyDescription, out->study_description, sizeof out->study_description);
    get_str(ds, DCM_ReferringPhysicianName, out->referring_physician,
            sizeof out->referring_physician);
    get_str(ds, DCM_SeriesInstanceUID, out->series_uid, sizeof out->series_uid);
    get_str(ds, DCM_Modality, out->modality, sizeof out->modality);
    out->series_number = get_int(ds, DCM_SeriesNumber, -1);
    get_str(ds, DCM_SeriesDescription, out->series_description, sizeof out->series_description);
    get_str(ds, DCM_BodyPartExamined, out->body_part, sizeof out->body_part);
    get_str(ds, DCM_SOPClassUID, out->sop_class_uid, sizeof out->sop_class_uid);
    if (out->sop_class_uid[0] == '\0' && meta != NULL)
        get_str(meta, DCM_MediaStorageSOPClassUID, out->sop_class_uid, sizeof out->sop_class_uid);
    get_str(ds, DCM_SOPInstanceUID, out->sop_uid, sizeof out->sop_uid);
    out->instance_number = get_int(ds, DCM_InstanceNumber, -1);

    out->transfer_syntax[0] = '\0';
    if (meta != NULL)
        get_str(meta, DCM_TransferSyntaxUID, out->transfer_syntax, sizeof out->transfer_syntax);
    if (out->transfer_syntax[0] == '\0') {
        DcmXfer x(ds->getOriginalXfer());
        snprintf(out->transfer_syntax, sizeof out->transfer_syntax, "%s", x.getXferID());
    }

    out->rows = get_us(ds, DCM_Rows);
    out->columns = get_us(ds, DCM_Columns);
    out->number_of_frames = get_int(ds, DCM_NumberOfFrames, 1);
    if (out->number_of_frames < 1)
        out->number_of_frames = 1;
    out->bits_allocated = get_us(ds, DCM_BitsAllocated);
    out->bits_stored = get_us(ds, DCM_BitsStored);
    out->pixel_representation = get_us(ds, DCM_PixelRepresentation);
    out->samples_per_pixel = get_us(ds, DCM_SamplesPerPixel);
    get_str(ds, DCM_PhotometricInterpretation, out->photometric, sizeof out->photometric);

    if (out->sop_uid[0] == '\0' || out->study_uid[0] == '\0' || out->series_uid[0] == '\0') {
        set_err(err, errlen, "missing %s",
                out->sop_uid[0] == '\0'     ? "SOP Instance UID"
                : out->study_uid[0] == '\0' ? "Study Instance UID"
                                            : "Series Instance UID");
        return CMN_EDICOM;
    }
    return pixel_location(ds, path, out, err, errlen);
}

/*
 * JSON format: Pixel Data becomes bulk_uri_prefix, other binary values over
 * kBulkThreshold become prefix + "/" + tag (tags collected beforehand, since
 * DCMTK asks by tag only).
 */
class BulkJsonFormat : public DcmJsonFormatCompact {
public:
    BulkJsonFormat(const std::string &prefix, const std::set<DcmTagKey> &bulk)
        : DcmJsonFormatCompact(OFFalse), prefix_(prefix), bulk_(bulk)
    {
    }

    virtual OFBool asBulkDataURI(const DcmTagKey &tag, OFString &uri)
    {
        if (tag == DCM_PixelData || tag == DCM_FloatPixelData || tag == DCM_DoubleFloatPixelData) {
            uri = prefix_.c_str();
            return OFTrue;
        }
        if (bulk_.count(tag) != 0) {
            char t[16];
            snprintf(t, sizeof t, "/%04X%04X", tag.getGroup(), tag.getElement());
            uri = (prefix_ + t).c_str();
            return OFTrue;
        }
        return OFFalse;
    }

private:
    std::string prefix_;
    const std::set<DcmTagKey> &bulk_;
};

bool is_bulk_vr(DcmEVR vr)
{
    switch (vr) {
    case EVR_OB: case EVR_OW: case EVR_OF: case EVR_OD: case EVR_OL: case EVR_OV:
    case EVR_UN: case EVR_ox: case EVR_px: case EVR_xs: case EVR_lt:
    case EVR_US: case EVR_SS: case EVR_UL: case EVR_SL: case EVR_FL: case EVR_FD:
    case EVR_UV: case EVR_SV:
        return true;
    default:
        return false;
    }
}

/* Collects bulk tags; loads every other value so DCMTK prints it (IS/DS print only loaded values). */
int prepare_json(DcmDataset *ds, std::set<DcmTagKey> &bulk, char *err, size_t errlen)
{
    DcmStack stack;
    while (ds->nextObject(stack, OFTrue).good()) {
        DcmObject *obj = stack.top();
        if (obj == NULL || !obj->isLeaf())
            continue;
        DcmElement *e = static_cast<DcmElement *>(obj);
        const DcmTagKey key = e->getTag();
        if (key == DCM_PixelData || key == DCM_FloatPixelData || key == DCM_DoubleFloatPixelData)
            continue;
        Uint32 len = e->getLengthField();
        if (is_bulk_vr(e->getVR()) && len != DCM_UndefinedLength && len > kBulkThreshold) {
            bulk.insert(key);
            continue;
        }
        if (e->loadAllDataIntoMemory().bad()) {
            set_err(err, errlen, "cannot load value of (%04X,%04X)", key.getGroup(),
                    key.getElement());
            return CMN_EDICOM;
        }
    }
    return 0;
}

int to_json(const char *path, const char *prefix, char **out, size_t *outlen, char *err,
            size_t errlen)
{
    std::unique_ptr<DcmFileFormat> ff(new DcmFileFormat());
    int rc = load(*ff, path, kMaxReadLength, err, errlen);
    if (rc != 0)
        return rc;
    DcmDataset *ds = ff->getDataset();
    if (ds->convertToUTF8().bad()) {
        /* Fall back to ISO 8859-1, which maps every byte: the JSON stays valid. */
        OFString uid;
        ds->findAndGetOFString(DCM_SOPInstanceUID, uid);
        CMN_LOG_W("dicom", "charset conversion failed, using ISO_IR 100 sop_uid=%s",
                  uid.c_str());
        ff.reset(new DcmFileFormat());
        if (load(*ff, path, kMaxReadLength, err, errlen) != 0)
            return CMN_EDICOM;
        ds = ff->getDataset();
        ds->putAndInsertString(DCM_SpecificCharacterSet, "ISO_IR 100");
        if (ds->convertToUTF8().bad()) {
            set_err(err, errlen, "character set conversion failed");
            return CMN_EDICOM;
        }
    }
    std::set<DcmTagKey> bulk;
    rc = prepare_json(ds, bulk, err, errlen);
    if (rc != 0)
        return rc;

    BulkJsonFormat fmt(prefix != NULL ? prefix : "", bulk);
    std::ostringstream os;
    OFCondition st = ds->writeJsonExt(os, fmt, OFTrue, OFFalse);
    if (st.bad()) {
        set_err(err, errlen, "cannot write JSON: %s", st.text());
        return CMN_EDICOM;
    }
    std::string s = os.str();

    /* DCMTK prints some invalid values (a DS "abc", NaN) as bare JSON tokens: validate. */
    json_error_t jerr;
    json_t *chk = json_loadb(s.data(), s.size(), JSON_DISABLE_EOF_CHECK, &jerr);
    if (chk == NULL || !json_is_object(chk)) {
        json_decref(chk);
        set_err(err, errlen, "DICOM JSON output is not valid JSON: %s (col %d)", jerr.text,
                jerr.column);
        return CMN_EDICOM;
    }
    json_decref(chk);

    char *buf = static_cast<char *>(malloc(s.size() + 1));
    if (buf == NULL) {
        set_err(err, errlen, "out of memory");
        return CMN_EDICOM;
    }
    memcpy(buf, s.data(), s.size());
    buf[s.size()] = '\0';
    *out = buf;
    if (outlen != NULL)
        *outlen = s.size();
    return 0;
}

std::mutex g_init_mu;
bool g_init_done;

} /* namespace */

extern "C" int cmn_dicom_read_info(const char *path, cmn_dicom_info_t *out, char *err,
                                   size_t errlen)
{
    if (err != NULL && errlen > 0)
        err[0] = '\0';
    if (path == NULL || out == NULL) {
        set_err(err, errlen, "invalid argument");
        return CMN_EDICOM;
    }
    memset(out, 0, sizeof *out);
    out->series_number = -1;
    out->instance_number = -1;
    out->number_of_frames = 1;
    try {
        int rc = read_info(path, out, err, errlen);
        if (rc != 0) {
            memset(out, 0, sizeof *out);
            out->series_number = -1;
            out->instance_number = -1;
            out->number_of_frames = 1;
        }
        return rc;
    } catch (const std::exception &e) {
        set_err(err, errlen, "DCMTK exception: %s", e.what());
    } catch (...) {
        set_err(err, errlen, "DCMTK exception");
    }
    return CMN_EDICOM;
}

extern "C" int cmn_dicom_to_json(const char *path, const char *bulk_uri_prefix, char **out,
                                 size_t *outlen, char *err, size_t errlen)
{
    if (err != NULL && errlen > 0)
        err[0] = '\0';
    if (out == NULL || path == NULL) {
        set_err(err, errlen, "invalid argument");
        return CMN_EDICOM;
    }
    *out = NULL;
    if (outlen != NULL)
        *outlen = 0;
    try {
        return to_json(path, bulk_uri_prefix, out, outlen, err, errlen);
    } catch (const std::exception &e) {
        set_err(err, errlen, "DCMTK exception: %s", e.what());
    } catch (...) {
        set_err(err, errlen, "DCMTK exception");
    }
    return CMN_EDICOM;
}

extern "C" int cmn_dicom_global_init(void)
{
    try {
        std::lock_guard<std::mutex> lk(g_init_mu);
        if (!g_init_done) {
            OFLog::configure(OFLogger::ERROR_LOG_LEVEL);
            g_init_done = true;
        }
        if (!dcmDataDict.isDictionaryLoaded()) {
            CMN_LOG_E("dicom", "DCMTK data dictionary not loaded (DCMDICTPATH, "
                               "/usr/share/libdcmtk17/dicom.dic)");
            return CMN_EDICOM;
        }
        return 0;
    } catch (...) {
        return CMN_EDICOM;
    }
}
