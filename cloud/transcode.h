/*
 * transcode.h - the cloud's DCMTK shim for DICOMweb (cloud/transcode.cc, C++17).
 *
 * What WADO-RS and QIDO-RS need from DCMTK beyond cmn/dicom.h:
 *   - rewriting an archived instance in another transfer syntax (decoding
 *     JPEG-LS with DCMTK's dcmjpls, or just re-encoding native data);
 *   - the frames of an instance, either as stored (the compressed fragment
 *     bytes of each frame) or decoded to native little-endian pixel data;
 *   - the value of one attribute (bulk data other than Pixel Data);
 *   - the data dictionary (keyword -> tag and VR) for QIDO query keys and
 *     includefield.
 *
 * No C++ exception crosses this API: every entry point catches everything and
 * returns CMN_EDICOM (or another negative code) with a message in err.
 * All calls block (file I/O, decoding): call them from blocking handlers only.
 * cmn_dicom_global_init() must have run first (the dictionary).
 */
#ifndef CLOUD_TRANSCODE_H
#define CLOUD_TRANSCODE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CLOUD_TS_IMPLICIT_LE "1.2.840.10008.1.2"
#define CLOUD_TS_EXPLICIT_LE "1.2.840.10008.1.2.1"
#define CLOUD_TS_DEFLATED_LE "1.2.840.10008.1.2.1.99"
#define CLOUD_TS_EXPLICIT_BE "1.2.840.10008.1.2.2"
#define CLOUD_TS_JPEGLS_LOSSLESS "1.2.840.10008.1.2.4.80"
#define CLOUD_TS_JPEGLS_NEAR "1.2.840.10008.1.2.4.81"

/**
 * True when a file stored in transfer syntax ts can be decoded by
 * cloud_transcode_to_native() / cloud_frames_get(decode = true): native
 * syntaxes and JPEG-LS (lossless and near-lossless).
 */
bool cloud_transcode_can_decode(const char *ts);

/**
 * Writes in_path (a Part 10 file) to out_path in Explicit VR Little Endian,
 * decoding compressed pixel data. All attributes and the SOP Instance UID are
 * kept; the meta header gets the new transfer syntax. out_path is written
 * directly (the caller uses a temporary name and renames it).
 * 0, -ENOTSUP (transfer syntax without a decoder), or CMN_EDICOM.
 */
int cloud_transcode_to_native(const char *in_path, const char *out_path, char *err,
                              size_t errlen);

/** One frame returned by cloud_frames_get(). */
typedef struct {
    uint8_t *data;               /* malloc'd; free with cloud_frames_free() */
    size_t len;
} cloud_frame_t;

/**
 * Reads frames (1-based numbers, n of them) of the instance at path.
 * decode = false: the frames as stored - for an encapsulated transfer syntax
 * the compressed bytes of each frame (its fragments joined), for a native one
 * the frame's bytes. decode = true: native pixel data (little endian, the
 * stored photometric interpretation kept for lossless codecs).
 * out[n] is filled; *nframes_out (may be NULL) gets the Number of Frames.
 * 0, CMN_ENOTFOUND (a frame number beyond Number of Frames, or no Pixel
 * Data), -ENOTSUP (no decoder), CMN_EDICOM. On error nothing is left
 * allocated.
 */
int cloud_frames_get(const char *path, const uint32_t *frames, int n, bool decode,
                     cloud_frame_t *out, uint32_t *nframes_out, char *err, size_t errlen);

/** Frees the data of n frames (safe on zeroed entries). */
void cloud_frames_free(cloud_frame_t *f, int n);

/**
 * The value bytes of attribute tag (group << 16 | element) in the dataset
 * at path, as stored in little endian (for bulk data URIs). *out is malloc'd.
 * 0, CMN_ENOTFOUND, CMN_EDICOM.
 */
int cloud_element_get(const char *path, uint32_t tag, uint8_t **out, size_t *len, char *err,
                      size_t errlen);

/**
 * Looks a query key up in the data dictionary: a keyword ("StudyDate") or 8
 * hex digits ("00080020"). true and *tag, vr (2 letters + NUL) filled; false
 * when unknown (or a repeating-group / private tag unknown to the dictionary:
 * its VR is then reported as "UN" and true is returned for hex keys).
 */
bool cloud_dict_lookup(const char *key, uint32_t *tag, char vr[3]);

#ifdef __cplusplus
}
#endif

#endif /* CLOUD_TRANSCODE_H */
