/*
 * dicom_codec.h - lossless transcoding of DICOM files to JPEG-LS
 * (common/cmn_dicom_codec.cc: DCMTK for parsing and encapsulation, CharLS for
 * the encoding).
 *
 * The edge calls cmn_dicom_to_jpegls() on a worker thread before upload. The
 * result is JPEG-LS Lossless (1.2.840.10008.1.2.4.80) whose decoded Pixel Data
 * (by DCMTK's dcmdjpls) equals the input's Pixel Data value byte for byte.
 * Anything that cannot be guaranteed to round-trip exactly is SKIPPED, never
 * encoded approximately: the caller then sends the original file.
 *
 * Encoded: native Little Endian input (Implicit VR, Explicit VR, Deflated);
 *   - one sample per pixel (MONOCHROME1, MONOCHROME2, PALETTE COLOR),
 *     Bits Allocated 8 or 16, 2 <= Bits Stored <= Bits Allocated,
 *     High Bit = Bits Stored - 1, unsigned or signed;
 *   - three samples per pixel (RGB, YBR_FULL), 8 bits, Planar Configuration
 *     0 or 1 (kept as is; no colour transform);
 *   - single or multi-frame: one fragment per frame, Basic Offset Table filled.
 * JPEG-LS sample precision P: 8 for 8-bit samples (dcmdjpls 3.6.7 cannot decode
 * CharLS 2.4 streams with P < 8); for 16-bit samples Bits Stored when every bit
 * above High Bit is 0, and 16 when a signed frame has negative values
 * sign-extended above High Bit, so the full words round-trip (as dcmcjpls' raw
 * mode does; dcmdjpls does not sign-extend a P = Bits Stored stream).
 *
 * Skipped (CMN_DICOM_CODEC_SKIPPED, reason in err): already encapsulated or
 * Big Endian transfer syntaxes, no Pixel Data (Float/Double Float Pixel Data
 * included), Bits Allocated other than 8/16, Bits Stored < 2, Bits Allocated 16
 * with Bits Stored <= 8 (dcmdjpls rejects P <= 8 into 16-bit words),
 * High Bit != Bits Stored - 1, YBR_FULL_422 and other subsampled or unknown
 * colour models, signed colour, 16-bit samples with bits above High Bit that are
 * neither zero nor a sign extension (e.g. embedded overlays), a Pixel Data length that does not
 * match Rows x Columns x Samples x Frames (beyond one zero padding byte), a
 * non-zero padding byte, more than 2^32-1 bytes of encoded data, an encoding
 * that is not smaller than the native data (tiny images), or a dataset DCMTK
 * cannot write in the JPEG-LS transfer syntax.
 *
 * All other attributes are kept, the SOP Instance UID included (lossless);
 * the file meta header gets the new Transfer Syntax UID.
 *
 * Thread safety: calls are independent (own DCMTK objects, own CharLS encoder).
 * cmn_dicom_global_init() (cmn/dicom.h) must have run once first. Blocking:
 * never call on a loop thread.
 */
#ifndef CMN_DICOM_CODEC_H
#define CMN_DICOM_CODEC_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/** Transfer Syntax UID written by cmn_dicom_to_jpegls(). */
#define CMN_JPEGLS_LOSSLESS_UID "1.2.840.10008.1.2.4.80"

/** Positive return of cmn_dicom_to_jpegls(): nothing written, send the original. */
#define CMN_DICOM_CODEC_SKIPPED 1

typedef struct {
    uint64_t file_bytes_in;    /* size of in_path */
    uint64_t file_bytes_out;   /* size of out_path as written; 0 unless 0 is returned */
    uint64_t pixel_bytes_in;   /* native Pixel Data value length */
    uint64_t pixel_bytes_out;  /* sum of the JPEG-LS frame fragments */
    uint32_t frames;           /* number of frames encoded */
    uint32_t bits_per_sample;  /* JPEG-LS sample precision P used */
    uint64_t usec;             /* wall time of the whole call, microseconds */
    uint64_t encode_usec;      /* of which CharLS encoding, microseconds */
} cmn_jpegls_stats_t;

/**
 * Transcodes the DICOM Part 10 file in_path to JPEG-LS Lossless at out_path.
 *
 * Returns 0 when out_path was written; CMN_DICOM_CODEC_SKIPPED when the input
 * is valid but not transcodable (reason in err, out_path not created); or a
 * negative code with a message in err and out_path removed if this call
 * started writing it: CMN_EDICOM (unreadable, truncated or malformed input, encoding
 * or write failure), CMN_EINTERNAL (invalid arguments), CMN_ETOOBIG (memory).
 * stats (may be NULL) is filled in all cases as far as known. err may be NULL.
 * The caller owns the file names; out_path should be a temporary name that the
 * caller renames (no fsync here).
 */
int cmn_dicom_to_jpegls(const char *in_path, const char *out_path, cmn_jpegls_stats_t *stats,
                        char *err, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif /* CMN_DICOM_CODEC_H */
