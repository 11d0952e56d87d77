/*
 * dicom.h - a small C API over DCMTK (common/cmn_dicom.cc, the C++ shim).
 *
 * No C++ exception crosses this API: the shim catches everything and
 * returns CMN_EDICOM with a message. Strings are converted to UTF-8 using
 * the file's SpecificCharacterSet (GB18030, ISO_IR 100, ISO_IR 192, ...).
 * All calls block (file I/O, parsing): never call them on a loop thread.
 */
#ifndef CMN_DICOM_H
#define CMN_DICOM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    /* patient */
    char patient_id[65];
    char patient_name[325];      /* UTF-8, "^" component separators kept */
    char patient_birth_date[9];  /* YYYYMMDD or "" */
    char patient_sex[17];
    /* study */
    char study_uid[65];
    char study_date[9];
    char study_time[17];
    char accession[17];
    char study_id[17];
    char study_description[129];
    char referring_physician[325];
    /* series */
    char series_uid[65];
    char modality[17];
    int series_number;           /* -1 when absent */
    char series_description[129];
    char body_part[17];
    /* instance */
    char sop_class_uid[65];
    char sop_uid[65];
    int instance_number;         /* -1 when absent */
    char transfer_syntax[65];    /* of the file as stored */
    int rows, columns;
    int number_of_frames;        /* 1 when absent */
    int bits_allocated, bits_stored, pixel_representation, samples_per_pixel;
    char photometric[17];
    /* where the pixel data value sits in the file, for native little-endian
     * transfer syntaxes (Implicit/Explicit VR LE); both 0 when absent,
     * encapsulated, deflated or big endian (bytes would need swapping) */
    uint64_t pixel_offset;
    uint64_t pixel_length;
} cmn_dicom_info_t;

/**
 * Reads the key attributes of a DICOM Part 10 file (or a raw dataset with
 * an Implicit VR Little Endian guess). 0, or CMN_EDICOM with a message in err
 * (not a DICOM file, truncated, missing SOP Instance UID / Study UID / Series UID).
 */
int cmn_dicom_read_info(const char *path, cmn_dicom_info_t *out, char *err, size_t errlen);

/** What identifies an instance (cmn_dicom_scan). */
typedef struct {
    char sop_class_uid[65];      /* the data set's, else the meta header's */
    char sop_uid[65];
    char study_uid[65];
    char series_uid[65];
    char transfer_syntax[65];    /* of the data set (meta header) */
} cmn_dicom_ids_t;

/**
 * A structural walk of a whole Part 10 file in memory (cmn_dicom_scan.c):
 * every element header of the meta group and of the data set, into
 * sequences and encapsulated pixel data, without decoding values; the UIDs
 * of the instance on the way. Pure C, no DCMTK, no allocation: ~1000x
 * cheaper than cmn_dicom_read_info on a CT image.
 * 0: the data set is whole and well formed, and *out holds its UIDs.
 * -ENOTSUP: not walked here (no Part 10 header, deflated or big endian).
 * CMN_EDICOM: malformed, truncated or missing a UID, with err set.
 * Either error is no verdict: ask cmn_dicom_read_info, which is more
 * lenient (e.g. trailing padding).
 */
int cmn_dicom_scan(const void *buf, size_t len, cmn_dicom_ids_t *out, char *err, size_t errlen);

/**
 * The instance as a DICOM JSON object (PS3.18 Annex F), UTF-8. Pixel Data
 * and other bulk values over 1 KiB are replaced by {"vr":..,"BulkDataURI":
 * bulk_uri_prefix + "/<tag>"} (Pixel Data: bulk_uri_prefix itself).
 * *out is malloc'd (caller frees). 0 or CMN_EDICOM.
 */
int cmn_dicom_to_json(const char *path, const char *bulk_uri_prefix, char **out, size_t *outlen,
                      char *err, size_t errlen);

/** Loads the data dictionary and silences DCMTK's INFO logging. Call once at start. 0 or CMN_EDICOM. */
int cmn_dicom_global_init(void);

#ifdef __cplusplus
}
#endif

#endif /* CMN_DICOM_H */
