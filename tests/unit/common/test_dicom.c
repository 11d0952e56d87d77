/*
 * test_dicom.c - the DCMTK shim (common/cmn_dicom.cc) on files made at test time.
 *
 * The group setup runs a short pydicom script (Debian's /usr/bin/python3, or
 * $YY_PYTHON) that writes small DICOM files into a fresh temporary directory,
 * together with the raw bytes each Pixel Data value must have:
 *
 *   utf8.dcm      16x16 int16, ISO_IR 192, "张^三" (pixel value kept in memory)
 *   gb.dcm        64x64 uint16, GB18030, "李^四" (pixel value deferred by DCMTK)
 *   raw.dcm       a dataset without preamble or meta header (Implicit VR LE)
 *   bulk.dcm      a private OB value of 2000 bytes (BulkDataURI in JSON)
 *   enc.dcm       pydicom's JPEG 2000 test file (encapsulated: no offset)
 *   trunc.dcm     gb.dcm cut 100 bytes short; trunc_hdr.dcm cut at 300 bytes
 *   garbage.dcm   4 KiB of pseudo-random bytes; empty.dcm 0 bytes
 *   nouid.dcm     no Series Instance UID
 *   *.px          expected Pixel Data bytes
 *   corpus.txt    the directory of pydicom's bundled test files
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <pthread.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <jansson.h>

#include "cmn/dicom.h"
#include "cmn/errors.h"
#include "cmn/log.h"

extern char **environ;

static char g_dir[256];

static const char *k_script =
    "import os, sys, shutil, numpy as np, pydicom\n"
    "from pydicom.dataset import Dataset, FileDataset, FileMetaDataset\n"
    "from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian\n"
    "from pydicom.data import get_testdata_file\n"
    "d = sys.argv[1]\n"
    "def make(name, cs, pn, rows, dtype, signed, series=True, raw=False):\n"
    "    m = FileMetaDataset()\n"
    "    m.MediaStorageSOPClassUID = '1.2.840.10008.5.1.4.1.1.2'\n"
    "    m.MediaStorageSOPInstanceUID = '2.25.1000' + str(rows) + str(ord(name[0]))\n"
    "    m.TransferSyntaxUID = ImplicitVRLittleEndian if raw else ExplicitVRLittleEndian\n"
    "    ds = FileDataset(None, {}, file_meta=m, preamble=b'\\0' * 128)\n"
    "    ds.is_little_endian = True\n"
    "    ds.is_implicit_VR = raw\n"
    "    ds.SpecificCharacterSet = cs\n"
    "    ds.SOPClassUID = m.MediaStorageSOPClassUID\n"
    "    ds.SOPInstanceUID = m.MediaStorageSOPInstanceUID\n"
    "    ds.StudyDate = '20261127'; ds.StudyTime = '083015'\n"
    "    ds.AccessionNumber = 'ACC' + str(rows); ds.Modality = 'CT'\n"
    "    ds.StudyDescription = '胸部CT'; ds.SeriesDescription = 'axial'\n"
    "    ds.PatientName = pn; ds.PatientID = 'PID-' + name\n"
    "    ds.PatientBirthDate = '19650312'; ds.PatientSex = 'F'\n"
    "    ds.ReferringPhysicianName = '王^医生'\n"
    "    ds.StudyInstanceUID = '2.25.42'\n"
    "    if series: ds.SeriesInstanceUID = '2.25.43'\n"
    "    ds.StudyID = 'S1'; ds.SeriesNumber = 3; ds.InstanceNumber = 7\n"
    "    ds.BodyPartExamined = 'CHEST'\n"
    "    ds.SamplesPerPixel = 1; ds.PhotometricInterpretation = 'MONOCHROME2'\n"
    "    ds.Rows = rows; ds.Columns = rows; ds.BitsAllocated = 16; ds.BitsStored = 12\n"
    "    ds.HighBit = 11; ds.PixelRepresentation = 1 if signed else 0\n"
    "    ds.RescaleIntercept = '-1024'; ds.RescaleSlope = '1'\n"
    "    ds.WindowCenter = '40'; ds.WindowWidth = '400'\n"
    "    a = (np.arange(rows * rows, dtype=np.int64) * 37 % 4000 - (1000 if signed else 0)).astype(dtype)\n"
    "    px = a.astype(a.dtype.newbyteorder('<')).tobytes()\n"
    "    ds.PixelData = px\n"
    "    ds['PixelData'].VR = 'OW'\n"
    "    p = os.path.join(d, name + '.dcm')\n"
    "    if raw:\n"
    "        del ds.file_meta; ds.preamble = None\n"
    "        pydicom.dcmwrite(p, ds, write_like_original=True)\n"
    "    else:\n"
    "        ds.save_as(p, write_like_original=False)\n"
    "    open(os.path.join(d, name + '.px'), 'wb').write(px)\n"
    "    return ds, p\n"
    "make('utf8', 'ISO_IR 192', '张^三', 16, np.int16, True)\n"
    "ds, p = make('gb', 'GB18030', '李^四', 64, np.uint16, False)\n"
    "make('raw', 'ISO_IR 192', 'Raw^Set', 32, np.uint16, False, raw=True)\n"
    "make('nouid', 'ISO_IR 192', 'No^Uid', 8, np.uint16, False, series=False)\n"
    "b, bp = make('bulk', 'ISO_IR 192', 'Bulk^Data', 8, np.uint16, False)\n"
    "b.add_new(0x00090010, 'LO', 'YUNYING')\n"
    "b.add_new(0x00091010, 'OB', bytes(range(250)) * 8)\n"
    "b.save_as(bp, write_like_original=False)\n"
    "data = open(p, 'rb').read()\n"
    "open(os.path.join(d, 'trunc.dcm'), 'wb').write(data[:-100])\n"
    "open(os.path.join(d, 'trunc_hdr.dcm'), 'wb').write(data[:300])\n"
    "open(os.path.join(d, 'garbage.dcm'), 'wb').write(np.random.default_rng(5).integers(0, 256, 4096, dtype=np.uint8).tobytes())\n"
    "open(os.path.join(d, 'empty.dcm'), 'wb').close()\n"
    "shutil.copyfile(get_testdata_file('JPEG2000.dcm'), os.path.join(d, 'enc.dcm'))\n"
    "open(os.path.join(d, 'corpus.txt'), 'w').write(os.path.dirname(get_testdata_file('CT_small.dcm')))\n";

static int rm_cb(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(p);
}

static int setup(void **state)
{
    const char *py = getenv("YY_PYTHON");
    char *argv[5];
    pid_t pid;
    int st;

    (void)state;
    if (py == NULL || py[0] == '\0')
        py = "/usr/bin/python3";
    snprintf(g_dir, sizeof g_dir, "%s/yy-test-dicom-XXXXXX",
             getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (mkdtemp(g_dir) == NULL)
        return -1;
    argv[0] = (char *)py;
    argv[1] = (char *)"-c";
    argv[2] = (char *)k_script;
    argv[3] = g_dir;
    argv[4] = NULL;
    if (posix_spawn(&pid, py, NULL, NULL, argv, environ) != 0)
        return -1;
    if (waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
        fprintf(stderr, "test_dicom: the pydicom setup script failed (%s)\n", py);
        return -1;
    }
    if (cmn_dicom_global_init() != 0)
        return -1;
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    if (g_dir[0] != '\0' && getenv("YY_KEEP_TESTDATA") == NULL)
        nftw(g_dir, rm_cb, 16, FTW_DEPTH | FTW_PHYS);
    return 0;
}

static const char *path_of(const char *name)
{
    static __thread char p[512];
    snprintf(p, sizeof p, "%s/%s", g_dir, name);
    return p;
}

static unsigned char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    unsigned char *buf;
    long n;

    assert_non_null(f);
    assert_int_equal(fseek(f, 0, SEEK_END), 0);
    n = ftell(f);
    assert_true(n >= 0);
    rewind(f);
    buf = malloc((size_t)n + 1);
    assert_non_null(buf);
    assert_int_equal(fread(buf, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    *len = (size_t)n;
    return buf;
}

/* The bytes at info.pixel_offset/length in dcm equal the .px file. */
static void check_pixels(const char *dcm, const char *px, const cmn_dicom_info_t *in)
{
    size_t flen, plen;
    unsigned char *f = slurp(path_of(dcm), &flen);
    unsigned char *p = slurp(path_of(px), &plen);

    assert_int_equal(in->pixel_length, plen);
    assert_true(in->pixel_offset + in->pixel_length <= flen);
    assert_memory_equal(f + in->pixel_offset, p, plen);
    free(f);
    free(p);
}

static void test_read_utf8(void **state)
{
    cmn_dicom_info_t in;
    char err[256];
    (void)state;

    assert_int_equal(cmn_dicom_read_info(path_of("utf8.dcm"), &in, err, sizeof err), 0);
    assert_string_equal(in.patient_name, "张^三");
    assert_string_equal(in.patient_id, "PID-utf8");
    assert_string_equal(in.patient_birth_date, "19650312");
    assert_string_equal(in.patient_sex, "F");
    assert_string_equal(in.study_uid, "2.25.42");
    assert_string_equal(in.series_uid, "2.25.43");
    assert_string_equal(in.study_date, "20261127");
    assert_string_equal(in.study_time, "083015");
    assert_string_equal(in.accession, "ACC16");
    assert_string_equal(in.study_id, "S1");
    assert_string_equal(in.study_description, "胸部CT");
    assert_string_equal(in.referring_physician, "王^医生");
    assert_string_equal(in.modality, "CT");
    assert_string_equal(in.series_description, "axial");
    assert_string_equal(in.body_part, "CHEST");
    assert_string_equal(in.sop_class_uid, "1.2.840.10008.5.1.4.1.1.2");
    assert_true(strncmp(in.sop_uid, "2.25.100016", 11) == 0);
    assert_string_equal(in.transfer_syntax, "1.2.840.10008.1.2.1");
    assert_int_equal(in.series_number, 3);
    assert_int_equal(in.instance_number, 7);
    assert_int_equal(in.rows, 16);
    assert_int_equal(in.columns, 16);
    assert_int_equal(in.number_of_frames, 1);
    assert_int_equal(in.bits_allocated, 16);
    assert_int_equal(in.bits_stored, 12);
    assert_int_equal(in.pixel_representation, 1);
    assert_int_equal(in.samples_per_pixel, 1);
    assert_string_equal(in.photometric, "MONOCHROME2");
    /* 512 bytes: DCMTK holds the value in memory, the shim re-reads for the offset */
    check_pixels("utf8.dcm", "utf8.px", &in);
}

static void test_read_gb18030(void **state)
{
    cmn_dicom_info_t in;
    char err[256];
    (void)state;

    assert_int_equal(cmn_dicom_read_info(path_of("gb.dcm"), &in, err, sizeof err), 0);
    assert_string_equal(in.patient_name, "李^四");
    assert_string_equal(in.study_description, "胸部CT");
    assert_string_equal(in.referring_physician, "王^医生");
    assert_int_equal(in.pixel_representation, 0);
    check_pixels("gb.dcm", "gb.px", &in);
}

static void test_read_raw_dataset(void **state)
{
    cmn_dicom_info_t in;
    char err[256];
    (void)state;

    assert_int_equal(cmn_dicom_read_info(path_of("raw.dcm"), &in, err, sizeof err), 0);
    assert_string_equal(in.patient_name, "Raw^Set");
    assert_string_equal(in.transfer_syntax, "1.2.840.10008.1.2");
    assert_string_equal(in.sop_class_uid, "1.2.840.10008.5.1.4.1.1.2");
    check_pixels("raw.dcm", "raw.px", &in);
}

static void test_read_encapsulated(void **state)
{
    cmn_dicom_info_t in;
    char err[256];
    (void)state;

    assert_int_equal(cmn_dicom_read_info(path_of("enc.dcm"), &in, err, sizeof err), 0);
    assert_string_equal(in.transfer_syntax, "1.2.840.10008.1.2.4.91");
    assert_int_equal(in.pixel_offset, 0);
    assert_int_equal(in.pixel_length, 0);
    assert_true(in.rows > 0);
}

static void test_read_bad(void **state)
{
    static const char *bad[] = {"trunc.dcm", "trunc_hdr.dcm", "garbage.dcm", "empty.dcm",
                                "nouid.dcm", "does-not-exist.dcm"};
    cmn_dicom_info_t in;
    char err[256];
    size_t i;
    (void)state;

    for (i = 0; i < CMN_ARRAY_SIZE(bad); i++) {
        err[0] = '\0';
        int rc = cmn_dicom_read_info(path_of(bad[i]), &in, err, sizeof err);
        if (rc != CMN_EDICOM)
            fail_msg("%s: rc=%d, want CMN_EDICOM", bad[i], rc);
        if (err[0] == '\0')
            fail_msg("%s: no error message", bad[i]);
        assert_string_equal(in.sop_uid, "");
    }
    assert_int_equal(cmn_dicom_read_info(path_of("nouid.dcm"), &in, err, sizeof err), CMN_EDICOM);
    assert_non_null(strstr(err, "Series Instance UID"));
    char *js = NULL;
    size_t jl;
    /* garbage: an error, or (if DCMTK finds elements in it) valid output */
    if (cmn_dicom_to_json(path_of("garbage.dcm"), "/x", &js, &jl, err, sizeof err) == 0)
        assert_non_null(js);
    else
        assert_null(js);
    free(js);
    js = NULL;
    assert_int_equal(cmn_dicom_to_json(path_of("empty.dcm"), "/x", &js, &jl, err, sizeof err),
                     CMN_EDICOM);
    assert_null(js);
}

static json_t *load_json(const char *file, const char *prefix)
{
    char *js = NULL;
    size_t jl = 0;
    char err[256];
    json_error_t je;
    json_t *root;

    int rc = cmn_dicom_to_json(path_of(file), prefix, &js, &jl, err, sizeof err);
    if (rc != 0)
        fail_msg("%s: to_json rc=%d: %s", file, rc, err);
    assert_non_null(js);
    assert_int_equal(strlen(js), jl);
    root = json_loadb(js, jl, 0, &je);
    if (root == NULL)
        fail_msg("%s: invalid JSON: %s", file, je.text);
    free(js);
    return root;
}

static const char *first_string(json_t *root, const char *tag)
{
    json_t *v = json_array_get(json_object_get(json_object_get(root, tag), "Value"), 0);
    return json_string_value(v);
}

static void test_json(void **state)
{
    json_t *root, *e;
    (void)state;

    root = load_json("utf8.dcm", "/dicomweb/studies/2.25.42/series/2.25.43/instances/x/bulk");
    assert_string_equal(first_string(root, "0020000D"), "2.25.42");
    assert_string_equal(json_string_value(json_object_get(json_object_get(root, "0020000D"), "vr")),
                        "UI");
    e = json_object_get(root, "7FE00010");
    assert_non_null(e);
    assert_string_equal(json_string_value(json_object_get(e, "vr")), "OW");
    assert_string_equal(json_string_value(json_object_get(e, "BulkDataURI")),
                        "/dicomweb/studies/2.25.42/series/2.25.43/instances/x/bulk");
    assert_null(json_object_get(e, "InlineBinary"));
    e = json_array_get(json_object_get(json_object_get(root, "00100010"), "Value"), 0);
    assert_string_equal(json_string_value(json_object_get(e, "Alphabetic")), "张^三");
    /* numbers are JSON numbers */
    e = json_array_get(json_object_get(json_object_get(root, "00280010"), "Value"), 0);
    assert_true(json_is_integer(e));
    assert_int_equal(json_integer_value(e), 16);
    e = json_array_get(json_object_get(json_object_get(root, "00281052"), "Value"), 0);
    assert_true(json_is_number(e));
    assert_true(json_number_value(e) == -1024.0);
    json_decref(root);

    /* GB18030 in, UTF-8 out, character set rewritten */
    root = load_json("gb.dcm", "/b");
    e = json_array_get(json_object_get(json_object_get(root, "00100010"), "Value"), 0);
    assert_string_equal(json_string_value(json_object_get(e, "Alphabetic")), "李^四");
    assert_string_equal(first_string(root, "00081030"), "胸部CT");
    assert_string_equal(first_string(root, "00080005"), "ISO_IR 192");
    json_decref(root);

    /* other bulk over 1 KiB: prefix + "/" + tag; small binary stays inline */
    root = load_json("bulk.dcm", "/b");
    e = json_object_get(root, "00091010");
    assert_string_equal(json_string_value(json_object_get(e, "BulkDataURI")), "/b/00091010");
    assert_string_equal(json_string_value(json_object_get(json_object_get(root, "7FE00010"),
                                                          "BulkDataURI")),
                        "/b");
    assert_string_equal(first_string(root, "00090010"), "YUNYING");
    json_decref(root);

    root = load_json("enc.dcm", "/e");
    assert_string_equal(json_string_value(json_object_get(json_object_get(root, "7FE00010"),
                                                          "BulkDataURI")),
                        "/e");
    json_decref(root);
}

/* cmn_dicom_scan against DCMTK as the oracle. Whenever the walk says "ok",
 * DCMTK reads the file too and finds the same UIDs; truncated, garbage and
 * UID-less files are never "ok"; every prefix of a file (in an exact-size
 * buffer, so ASan sees any read past it) is "ok" only where DCMTK also
 * accepts it. Most of pydicom's corpus must be walked without DCMTK. */
static int scan_file(const char *path, cmn_dicom_ids_t *ids, char *err, size_t errlen)
{
    size_t n;
    unsigned char *buf;
    struct stat st;

    if (stat(path, &st) < 0 || !S_ISREG(st.st_mode))
        return -ENOENT;
    buf = slurp(path, &n);
    int rc = cmn_dicom_scan(buf, n, ids, err, errlen);
    free(buf);
    return rc;
}

static void scan_agrees(const char *path, int *walked)
{
    cmn_dicom_ids_t ids;
    cmn_dicom_info_t in;
    char err[256];

    if (scan_file(path, &ids, err, sizeof err) != 0)
        return;
    if (cmn_dicom_read_info(path, &in, err, sizeof err) != 0)
        fail_msg("%s: walked ok, DCMTK says: %s", path, err);
    assert_string_equal(ids.sop_uid, in.sop_uid);
    assert_string_equal(ids.study_uid, in.study_uid);
    assert_string_equal(ids.series_uid, in.series_uid);
    assert_string_equal(ids.sop_class_uid, in.sop_class_uid);
    assert_string_equal(ids.transfer_syntax, in.transfer_syntax);
    (*walked)++;
}

static void test_scan(void **state)
{
    static const char *good[] = {"utf8.dcm", "gb.dcm", "bulk.dcm", "enc.dcm"};
    static const char *bad[] = {"trunc.dcm", "trunc_hdr.dcm", "garbage.dcm", "empty.dcm",
                                "nouid.dcm"};
    cmn_dicom_ids_t ids;
    cmn_dicom_info_t in;
    char err[256], dir[512], tmp[600];
    int walked = 0, files = 0, dcmtk_ok = 0;
    size_t n;
    (void)state;

    for (size_t i = 0; i < CMN_ARRAY_SIZE(good); i++) {
        int before = walked;
        scan_agrees(path_of(good[i]), &walked);
        if (walked == before)
            fail_msg("%s: not walked", good[i]);
    }
    for (size_t i = 0; i < CMN_ARRAY_SIZE(bad); i++) {
        if (scan_file(path_of(bad[i]), &ids, err, sizeof err) == 0)
            fail_msg("%s: walked ok", bad[i]);
    }
    assert_int_equal(scan_file(path_of("raw.dcm"), &ids, err, sizeof err), -ENOTSUP);

    /* Every prefix of a small file. */
    unsigned char *whole = slurp(path_of("utf8.dcm"), &n);
    snprintf(tmp, sizeof tmp, "%s/prefix.dcm", g_dir);
    int accepted = 0;
    for (size_t cut = 0; cut < n; cut++) {
        unsigned char *b = malloc(cut ? cut : 1);
        assert_non_null(b);
        memcpy(b, whole, cut);
        int rc = cmn_dicom_scan(b, cut, &ids, err, sizeof err);
        free(b);
        if (rc != 0)
            continue;
        FILE *f = fopen(tmp, "wb");
        assert_non_null(f);
        assert_int_equal(fwrite(whole, 1, cut, f), cut);
        fclose(f);
        if (cmn_dicom_read_info(tmp, &in, err, sizeof err) != 0)
            fail_msg("prefix of %zu bytes: walked ok, DCMTK says: %s", cut, err);
        accepted++;
    }
    free(whole);
    /* Only prefixes ending at a top-level element boundary after the
     * UIDs can pass: a handful, never the pixel data's insides. */
    assert_true(accepted < 40);

    /* pydicom's corpus. */
    unsigned char *txt = slurp(path_of("corpus.txt"), &n);
    snprintf(dir, sizeof dir, "%.*s", (int)n, (char *)txt);
    free(txt);
    DIR *d = opendir(dir);
    if (d == NULL)
        skip();
    struct dirent *de;
    int corpus_walked = 0;
    while ((de = readdir(d)) != NULL) {
        char p[1024];
        if (de->d_name[0] == '.')
            continue;
        snprintf(p, sizeof p, "%s/%s", dir, de->d_name);
        files++;
        if (cmn_dicom_read_info(p, &in, err, sizeof err) == 0)
            dcmtk_ok++;
        scan_agrees(p, &corpus_walked);
    }
    closedir(d);
    print_message("scan: corpus %d files, DCMTK reads %d, walked %d\n", files, dcmtk_ok,
                  corpus_walked);
    assert_true(corpus_walked > dcmtk_ok / 2);
}

/* Every file of pydicom's test corpus: no crash, and JSON is valid whenever returned. */
static void test_corpus(void **state)
{
    char dir[512];
    size_t n;
    unsigned char *txt = slurp(path_of("corpus.txt"), &n);
    DIR *d;
    struct dirent *de;
    int files = 0, ok_info = 0, ok_json = 0;
    (void)state;

    snprintf(dir, sizeof dir, "%.*s", (int)n, (char *)txt);
    free(txt);
    d = opendir(dir);
    if (d == NULL) {
        skip();
    }
    while ((de = readdir(d)) != NULL) {
        char p[1024], err[256];
        cmn_dicom_info_t in;
        char *js = NULL;
        size_t jl = 0;
        if (de->d_name[0] == '.')
            continue;
        snprintf(p, sizeof p, "%s/%s", dir, de->d_name);
        files++;
        if (cmn_dicom_read_info(p, &in, err, sizeof err) == 0) {
            ok_info++;
            assert_true(in.study_uid[0] && in.series_uid[0] && in.sop_uid[0]);
        }
        if (cmn_dicom_to_json(p, "/c", &js, &jl, err, sizeof err) == 0) {
            json_error_t je;
            json_t *root = json_loadb(js, jl, 0, &je);
            if (root == NULL)
                fail_msg("%s: invalid JSON: %s", de->d_name, je.text);
            json_decref(root);
            free(js);
            ok_json++;
        } else {
            assert_null(js);
        }
    }
    closedir(d);
    print_message("corpus: %d files, read_info ok %d, to_json ok %d\n", files, ok_info, ok_json);
    assert_true(files > 50);
    assert_true(ok_info > files / 3);
}

#define N_THREADS 4
#define N_ROUNDS 40

static void *reader(void *arg)
{
    static const char *names[] = {"utf8.dcm", "gb.dcm", "raw.dcm", "trunc.dcm"};
    long id = (long)arg;
    long failures = 0;
    int i;

    for (i = 0; i < N_ROUNDS; i++) {
        const char *name = names[(i + id) % 4];
        cmn_dicom_info_t in;
        char err[256];
        char *js = NULL;
        size_t jl;
        int rc = cmn_dicom_read_info(path_of(name), &in, err, sizeof err);
        int want = strcmp(name, "trunc.dcm") == 0 ? CMN_EDICOM : 0;
        if (rc != want)
            failures++;
        if (rc == 0 && strcmp(name, "gb.dcm") == 0 && strcmp(in.patient_name, "李^四") != 0)
            failures++;
        if (want == 0) {
            if (cmn_dicom_to_json(path_of(name), "/t", &js, &jl, err, sizeof err) != 0)
                failures++;
            free(js);
        }
    }
    return (void *)failures;
}

static void test_threads(void **state)
{
    pthread_t th[N_THREADS];
    long i;
    (void)state;

    for (i = 0; i < N_THREADS; i++)
        assert_int_equal(pthread_create(&th[i], NULL, reader, (void *)i), 0);
    for (i = 0; i < N_THREADS; i++) {
        void *r;
        assert_int_equal(pthread_join(th[i], &r), 0);
        assert_int_equal((long)r, 0);
    }
}

static void test_bad_args(void **state)
{
    cmn_dicom_info_t in;
    char err[64];
    char *js = (char *)"x";
    (void)state;

    assert_int_equal(cmn_dicom_read_info(NULL, &in, err, sizeof err), CMN_EDICOM);
    assert_int_equal(cmn_dicom_to_json(NULL, "/x", &js, NULL, err, sizeof err), CMN_EDICOM);
    /* a tiny error buffer is truncated, not overrun */
    assert_int_equal(cmn_dicom_read_info(path_of("garbage.dcm"), &in, err, 8), CMN_EDICOM);
    assert_true(strlen(err) < 8);
    assert_int_equal(cmn_dicom_global_init(), 0);   /* idempotent */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_read_utf8),
        cmocka_unit_test(test_read_gb18030),
        cmocka_unit_test(test_read_raw_dataset),
        cmocka_unit_test(test_read_encapsulated),
        cmocka_unit_test(test_read_bad),
        cmocka_unit_test(test_json),
        cmocka_unit_test(test_corpus),
        cmocka_unit_test(test_scan),
        cmocka_unit_test(test_threads),
        cmocka_unit_test(test_bad_args),
    };
    cmn_log_set_level(CMN_LOG_ERROR);
    return cmocka_run_group_tests_name("dicom", tests, setup, teardown);
}
