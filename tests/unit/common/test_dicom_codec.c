/*
 * test_dicom_codec.c - cmn_dicom_to_jpegls() (common/cmn_dicom_codec.cc).
 *
 * Every encoded file is decoded by DCMTK's dcmdjpls (the independent decoder)
 * and compared with pydicom: the decoded Pixel Data value must equal the
 * original byte for byte, every other top-level attribute must be unchanged
 * (SOP Instance UID included), the transfer syntax must be JPEG-LS Lossless,
 * and the encapsulation must hold one fragment per frame with a Basic Offset
 * Table pointing at them. Skipped files and errors must leave no output file;
 * an error is accepted only for a file that dcmdump cannot read either.
 *
 * The group setup writes into a fresh temporary directory (YY_KEEP_TESTDATA=1
 * keeps it):
 *   syn/        synthetic edge cases made by the pydicom script below
 *   gen/, gen12/ tests/data/gen_studies.py output: CT (5 slices, int16), MR,
 *               DR 3000x3000, MG, XA (30 frames), pydicom's corpus; CT with
 *               --ct-bits 12 (2 slices)
 * Needs /usr/bin/python3 (or $YY_PYTHON) with pydicom + numpy, and dcmdjpls
 * and dcmdump on PATH. gen_studies.py is found through $YY_SRC_DIR, else
 * relative to this binary (build/<cfg>/tests/unit/common/), else the cwd.
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
#include <limits.h>
#include <pthread.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cmn/dicom.h"
#include "cmn/dicom_codec.h"
#include "cmn/errors.h"

extern char **environ;

static char g_dir[256];
static char g_src[PATH_MAX];
static const char *g_py;
static int g_seq;  /* numbers output files */

/* Synthetic cases: argv[1] = output directory. */
static const char *k_make_script =
    "import os, sys, zlib, numpy as np, pydicom\n"
    "from pydicom.dataset import FileDataset, FileMetaDataset\n"
    "from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian\n"
    "d = sys.argv[1]\n"
    "def img(rows, cols, lo, hi, seed, frames=1):\n"
    "    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float64)\n"
    "    rng = np.random.default_rng(seed)\n"
    "    out = []\n"
    "    for f in range(frames):\n"
    "        v = 0.5 + 0.5 * np.sin(xx / (13.0 + f)) * np.cos(yy / 19.0)\n"
    "        v = lo + (hi - lo) * v + rng.normal(0, (hi - lo) / 200.0, (rows, cols))\n"
    "        out.append(np.clip(np.rint(v), lo, hi).astype(np.int64))\n"
    "    return np.stack(out) if frames > 1 else out[0]\n"
    "def make(name, data, rows, cols, ba, bs, pr, photo='MONOCHROME2', spp=1, planar=None,\n"
    "         frames=None, implicit=False, hb=None, extra=None):\n"
    "    uid = '2.25.%d' % int.from_bytes(name.encode()[:12], 'big')\n"
    "    m = FileMetaDataset()\n"
    "    m.MediaStorageSOPClassUID = '1.2.840.10008.5.1.4.1.1.7'\n"
    "    m.MediaStorageSOPInstanceUID = uid\n"
    "    m.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian\n"
    "    ds = FileDataset(None, {}, file_meta=m, preamble=b'\\0' * 128)\n"
    "    ds.is_little_endian = True; ds.is_implicit_VR = implicit\n"
    "    ds.SOPClassUID = m.MediaStorageSOPClassUID; ds.SOPInstanceUID = uid\n"
    "    ds.StudyInstanceUID = '2.25.77'; ds.SeriesInstanceUID = '2.25.78'\n"
    "    ds.Modality = 'OT'; ds.PatientName = 'Syn^' + name; ds.PatientID = 'SYN'\n"
    "    ds.ImageComments = 'synthetic ' + name\n"
    "    if data is not None:\n"
    "        ds.SamplesPerPixel = spp; ds.PhotometricInterpretation = photo\n"
    "        ds.Rows = rows; ds.Columns = cols\n"
    "        ds.BitsAllocated = ba; ds.BitsStored = bs\n"
    "        ds.HighBit = bs - 1 if hb is None else hb; ds.PixelRepresentation = pr\n"
    "        if planar is not None: ds.PlanarConfiguration = planar\n"
    "        if frames is not None: ds.NumberOfFrames = frames\n"
    "        ds.PixelData = data; ds['PixelData'].VR = 'OW' if ba > 8 else 'OB'\n"
    "    if extra: extra(ds)\n"
    "    ds.save_as(os.path.join(d, name + '.dcm'), write_like_original=False)\n"
    "def le16(a): return np.ascontiguousarray(a).astype('<i2' if a.min() < 0 else '<u2').tobytes()\n"
    "def u8(a): return np.ascontiguousarray(a).astype(np.uint8).tobytes()\n"
    "s = img(200, 180, -2048, 2047, 1)\n"
    "make('s12_signext', le16(s), 200, 180, 16, 12, 1)\n"
    "make('s12_masked', le16(s & 0x0FFF), 200, 180, 16, 12, 1)\n"
    "make('s12_positive', le16(np.abs(s)), 200, 180, 16, 12, 1)\n"
    "u = img(200, 180, 0, 4095, 2)\n"
    "g = u.copy(); g[50, 60] |= 0x4000\n"
    "make('u12_garbage', le16(g), 200, 180, 16, 12, 0)\n"
    "g = s.copy() & 0xFFFF; g[10, 10] = (g[10, 10] & 0x0FFF) | 0x5000\n"
    "make('s12_garbage', g.astype('<u2').tobytes(), 200, 180, 16, 12, 1)\n"
    "make('u16_mono1_implicit', le16(img(128, 256, 0, 65535, 3)), 128, 256, 16, 16, 0,\n"
    "     photo='MONOCHROME1', implicit=True)\n"
    "make('s16', le16(img(128, 128, -32768, 32767, 4)), 128, 128, 16, 16, 1)\n"
    "make('u14_3frames', le16(img(96, 112, 0, 16383, 5, frames=3)), 96, 112, 16, 14, 0, frames=3)\n"
    "o = img(101, 101, 0, 255, 6)\n"
    "make('u8_odd', u8(o), 101, 101, 8, 8, 0)\n"
    "make('u8_oddpad', u8(o) + b'\\x55', 101, 101, 8, 8, 0)\n"
    "make('u8_bs7', u8(img(64, 64, 0, 127, 7)), 64, 64, 8, 7, 0)\n"
    "make('u8_bs6_high', u8(img(64, 64, 0, 255, 15)), 64, 64, 8, 6, 0)\n"
    "make('u16_bs8', le16(img(64, 64, 0, 255, 8)), 64, 64, 16, 8, 0)\n"
    "make('u12_hb15', le16(img(64, 64, 0, 4095, 9)), 64, 64, 16, 12, 0, hb=15)\n"
    "rgb = np.stack([img(120, 160, 0, 255, 10 + c) for c in range(3)], axis=-1)\n"
    "make('rgb_pc0', u8(rgb), 120, 160, 8, 8, 0, photo='RGB', spp=3, planar=0)\n"
    "make('rgb_pc1', u8(np.moveaxis(rgb, -1, 0)), 120, 160, 8, 8, 0, photo='RGB', spp=3, planar=1)\n"
    "mf = np.stack([np.moveaxis(np.roll(rgb, 7 * f, axis=1), -1, 0) for f in range(3)])\n"
    "make('rgb_pc1_3frames', u8(mf), 120, 160, 8, 8, 0, photo='RGB', spp=3, planar=1, frames=3)\n"
    "make('ybr_full', u8(rgb), 120, 160, 8, 8, 0, photo='YBR_FULL', spp=3, planar=0)\n"
    "def pal(ds):\n"
    "    for c, k in (('Red', 1), ('Green', 2), ('Blue', 3)):\n"
    "        setattr(ds, c + 'PaletteColorLookupTableDescriptor', [256, 0, 16])\n"
    "        setattr(ds, c + 'PaletteColorLookupTableData', (np.arange(256) * 257 * k % 65536).astype('<u2').tobytes())\n"
    "make('palette', u8(img(100, 100, 0, 255, 11)), 100, 100, 8, 8, 0, photo='PALETTE COLOR', extra=pal)\n"
    "make('u8_5frames', u8(img(128, 128, 0, 255, 12, frames=5)), 128, 128, 8, 8, 0, frames=5)\n"
    "make('short', le16(img(64, 64, 0, 4095, 13))[:-200], 64, 64, 16, 12, 0)\n"
    "make('ybr_422', u8(img(64, 128, 0, 255, 14)), 64, 64, 8, 8, 0, photo='YBR_FULL_422', spp=3, planar=0)\n"
    "make('ba32', np.ones(64 * 64, '<u4').tobytes(), 64, 64, 32, 32, 0)\n"
    "make('tiny', u8(np.arange(4)), 2, 2, 8, 8, 0)\n"
    "def flt(ds):\n"
    "    ds.SamplesPerPixel = 1; ds.PhotometricInterpretation = 'MONOCHROME2'\n"
    "    ds.Rows = 16; ds.Columns = 16; ds.BitsAllocated = 32\n"
    "    ds.FloatPixelData = np.linspace(0, 1, 256, dtype='<f4').tobytes()\n"
    "make('float', None, 0, 0, 0, 0, 0, extra=flt)\n"
    "make('nopixels', None, 0, 0, 0, 0, 0)\n"
    "ct = open(sys.argv[2], 'rb').read()\n"
    "open(os.path.join(d, 'trunc_px.dcm'), 'wb').write(ct[:-1000])\n"
    "open(os.path.join(d, 'trunc_hdr.dcm'), 'wb').write(ct[:300])\n"
    "open(os.path.join(d, 'garbage.dcm'), 'wb').write(np.random.default_rng(5).integers(0, 256, 4096, dtype=np.uint8).tobytes())\n"
    "open(os.path.join(d, 'empty.dcm'), 'wb').close()\n";

/*
 * Verifier: argv[1] = a list of lines "kind<TAB>orig<TAB>enc<TAB>dec", kind E
 * (our error: dcmdump must reject orig too) or D (decode enc with dcmdjpls to
 * dec and compare). Prints one "OK ..." or "BAD ..." line per entry.
 */
static const char *k_verify_script =
    "import sys, subprocess, pydicom, warnings\n"
    "from pydicom.encaps import get_frame_offsets, generate_pixel_data_fragment\n"
    "from pydicom.filebase import DicomBytesIO\n"
    "warnings.simplefilter('ignore')\n"
    "def check(orig, enc, dec):\n"
    "    r = subprocess.run(['dcmdjpls', enc, dec], capture_output=True, text=True)\n"
    "    if r.returncode != 0: return 'dcmdjpls failed: ' + r.stderr.strip()[:200]\n"
    "    a = pydicom.dcmread(orig, force=True); e = pydicom.dcmread(enc); b = pydicom.dcmread(dec)\n"
    "    if e.file_meta.TransferSyntaxUID != '1.2.840.10008.1.2.4.80': return 'transfer syntax ' + e.file_meta.TransferSyntaxUID\n"
    "    if e.file_meta.MediaStorageSOPInstanceUID != a.SOPInstanceUID: return 'meta SOP Instance UID'\n"
    "    pa, pb = a.PixelData, b.PixelData\n"
    "    if pa != pb:\n"
    "        n = min(len(pa), len(pb)); i = next((k for k in range(n) if pa[k] != pb[k]), n)\n"
    "        return 'pixel data differ: %d vs %d bytes, first difference at %d' % (len(pa), len(pb), i)\n"
    "    for el in a:\n"
    "        if el.tag == 0x7FE00010: continue\n"
    "        if el.tag not in e: return 'attribute %s lost' % el.tag\n"
    "        if el.VR not in ('SQ', 'UN') and e[el.tag].value != el.value: return 'attribute %s changed' % el.tag\n"
    "    frames = int(getattr(e, 'NumberOfFrames', 1) or 1)\n"
    "    fp = DicomBytesIO(e.PixelData); fp.is_little_endian = True\n"
    "    has_bot, bot = get_frame_offsets(fp)\n"
    "    pos, starts = 0, []\n"
    "    for frag in generate_pixel_data_fragment(fp):\n"
    "        starts.append(pos); pos += len(frag) + 8\n"
    "    if len(starts) != frames: return '%d fragments for %d frames' % (len(starts), frames)\n"
    "    if list(bot) != starts: return 'offset table %s != %s' % (list(bot)[:4], starts[:4])\n"
    "    return None\n"
    "for line in open(sys.argv[1]):\n"
    "    kind, orig, enc, dec = line.rstrip('\\n').split('\\t')\n"
    "    if kind == 'E':\n"
    "        r = subprocess.run(['dcmdump', '-q', orig], capture_output=True)\n"
    "        print(('OK' if r.returncode != 0 else 'BAD error on a file dcmdump reads:'), orig)\n"
    "        continue\n"
    "    try: why = check(orig, enc, dec)\n"
    "    except Exception as ex: why = 'exception %r' % ex\n"
    "    print('OK ' + orig if why is None else 'BAD ' + orig + ': ' + why)\n";

static int rm_cb(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(p);
}

/* Runs argv (argv[0] a path), stdout to out_path if not NULL. Exit status or -1. */
static int run(char *const argv[], const char *out_path)
{
    posix_spawn_file_actions_t fa;
    pid_t pid;
    int st, rc;

    posix_spawn_file_actions_init(&fa);
    if (out_path != NULL)
        posix_spawn_file_actions_addopen(&fa, 1, out_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    rc = posix_spawn(&pid, argv[0], &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    if (rc != 0)
        return -1;
    if (waitpid(pid, &st, 0) != pid || !WIFEXITED(st))
        return -1;
    return WEXITSTATUS(st);
}

static const char *path_of(const char *sub)
{
    static __thread char p[4][PATH_MAX];
    static __thread int k;
    k = (k + 1) % 4;
    snprintf(p[k], sizeof p[k], "%s/%s", g_dir, sub);
    return p[k];
}

static bool file_exists(const char *p)
{
    struct stat sb;
    return stat(p, &sb) == 0;
}

static uint64_t file_size(const char *p)
{
    struct stat sb;
    return stat(p, &sb) == 0 ? (uint64_t)sb.st_size : 0;
}

/* Finds the repository root (the directory holding tests/data/gen_studies.py). */
static int find_src(void)
{
    const char *env = getenv("YY_SRC_DIR");
    char exe[PATH_MAX], cand[PATH_MAX + 64];
    ssize_t n;

    if (env != NULL && env[0] != '\0') {
        snprintf(g_src, sizeof g_src, "%s", env);
        return 0;
    }
    n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n > 0) {
        exe[n] = '\0';
        /* build/<cfg>/tests/unit/common/test_dicom_codec: six components up */
        for (int up = 0; up < 6; up++) {
            char *s = strrchr(exe, '/');
            if (s == NULL)
                break;
            *s = '\0';
        }
        snprintf(cand, sizeof cand, "%s/tests/data/gen_studies.py", exe);
        if (file_exists(cand)) {
            snprintf(g_src, sizeof g_src, "%s", exe);
            return 0;
        }
    }
    if (getcwd(g_src, sizeof g_src) == NULL)
        return -1;
    snprintf(cand, sizeof cand, "%s/tests/data/gen_studies.py", g_src);
    return file_exists(cand) ? 0 : -1;
}

/* Entries of g_dir/sub whose names start with prefix, sorted, as "sub/name"; returns the count. */
static int list_dcm(const char *sub, const char *prefix, char names[][PATH_MAX], int max)
{
    struct dirent **ents;
    int n = scandir(path_of(sub), &ents, NULL, alphasort), k = 0;

    for (int i = 0; i < n; i++) {
        const char *nm = ents[i]->d_name;
        if (k < max && strncmp(nm, prefix, strlen(prefix)) == 0 && nm[0] != '.')
            snprintf(names[k++], PATH_MAX, "%s/%s", sub, nm);
        free(ents[i]);
    }
    free(ents);
    return k;
}

static int setup(void **state)
{
    char gen[PATH_MAX + 64], ct[PATH_MAX];
    char names[1][PATH_MAX];
    (void)state;

    g_py = getenv("YY_PYTHON");
    if (g_py == NULL || g_py[0] == '\0')
        g_py = "/usr/bin/python3";
    if (find_src() != 0) {
        fprintf(stderr, "test_dicom_codec: cannot find tests/data/gen_studies.py (set YY_SRC_DIR)\n");
        return -1;
    }
    snprintf(g_dir, sizeof g_dir, "%s/yy-test-codec-XXXXXX",
             getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (mkdtemp(g_dir) == NULL)
        return -1;
    if (mkdir(path_of("syn"), 0755) != 0 || mkdir(path_of("enc"), 0755) != 0 ||
        mkdir(path_of("dec"), 0755) != 0)
        return -1;
    snprintf(gen, sizeof gen, "%s/tests/data/gen_studies.py", g_src);
    {
        char *argv[] = {(char *)g_py, gen, (char *)path_of("gen"), (char *)"--ct-slices",
                        (char *)"5", (char *)"--mr-slices", (char *)"3", (char *)"--quiet", NULL};
        if (run(argv, NULL) != 0) {
            fprintf(stderr, "test_dicom_codec: gen_studies.py failed\n");
            return -1;
        }
    }
    {
        char *argv[] = {(char *)g_py, gen, (char *)path_of("gen12"), (char *)"--only",
                        (char *)"ct", (char *)"--ct-bits", (char *)"12", (char *)"--ct-slices",
                        (char *)"2", (char *)"--quiet", NULL};
        if (run(argv, NULL) != 0) {
            fprintf(stderr, "test_dicom_codec: gen_studies.py --ct-bits 12 failed\n");
            return -1;
        }
    }
    /* The CT directory name derives from the accession: find it. */
    if (list_dcm("gen", "ct_", names, 1) != 1)
        return -1;
    snprintf(ct, sizeof ct, "%s/CT0001.dcm", path_of(names[0]));
    {
        char *argv[] = {(char *)g_py, (char *)"-c", (char *)k_make_script, (char *)path_of("syn"),
                        ct, NULL};
        if (run(argv, NULL) != 0) {
            fprintf(stderr, "test_dicom_codec: the pydicom setup script failed (%s)\n", g_py);
            return -1;
        }
    }
    return cmn_dicom_global_init() == 0 ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    if (g_dir[0] != '\0' && getenv("YY_KEEP_TESTDATA") == NULL)
        nftw(g_dir, rm_cb, 16, FTW_DEPTH | FTW_PHYS);
    return 0;
}

/* A batch of files to check with the verifier. */
typedef struct {
    FILE *list;
    char list_path[PATH_MAX];
    int n;
} batch_t;

static void batch_open(batch_t *b, const char *name)
{
    snprintf(b->list_path, sizeof b->list_path, "%s/%s.list", g_dir, name);
    b->list = fopen(b->list_path, "w");
    assert_non_null(b->list);
    b->n = 0;
}

/*
 * Transcodes g_dir/rel; checks the rc class against expect (0, SKIPPED, or
 * any negative when expect < 0; INT_MIN = anything) and that skips and errors
 * leave no file. Successes (and errors) are queued for the verifier.
 */
static int transcode(batch_t *b, const char *rel, int expect, cmn_jpegls_stats_t *st)
{
    char in[PATH_MAX], out[PATH_MAX], dec[PATH_MAX], err[512];
    cmn_jpegls_stats_t local;
    int rc, k = __atomic_fetch_add(&g_seq, 1, __ATOMIC_RELAXED);

    if (st == NULL)
        st = &local;
    snprintf(in, sizeof in, "%s/%s", g_dir, rel);
    snprintf(out, sizeof out, "%s/enc/%04d.dcm", g_dir, k);
    snprintf(dec, sizeof dec, "%s/dec/%04d.dcm", g_dir, k);
    rc = cmn_dicom_to_jpegls(in, out, st, err, sizeof err);
    if (expect != INT_MIN && !(expect < 0 ? rc < 0 : rc == expect))
        fail_msg("%s: rc %d (%s), expected %d", rel, rc, err, expect);
    if (rc == 0) {
        assert_true(file_exists(out));
        assert_int_equal(st->file_bytes_out, file_size(out));
        assert_int_equal(st->file_bytes_in, file_size(in));
        assert_true(st->pixel_bytes_out > 0 && st->pixel_bytes_out < st->pixel_bytes_in);
        assert_true(st->frames >= 1);
        fprintf(b->list, "D\t%s\t%s\t%s\n", in, out, dec);
        b->n++;
    } else {
        if (file_exists(out))
            fail_msg("%s: rc %d but %s exists", rel, rc, out);
        assert_true(err[0] != '\0');
        assert_int_equal(st->file_bytes_out, 0);
        if (rc < 0) {
            fprintf(b->list, "E\t%s\t-\t-\n", in);
            b->n++;
        }
    }
    return rc;
}

/* Runs the verifier over the batch; every line must be OK. */
static void batch_verify(batch_t *b)
{
    char out_path[PATH_MAX + 8], line[2048];
    int ok = 0, bad = 0;
    FILE *f;

    fclose(b->list);
    b->list = NULL;
    if (b->n == 0)
        return;
    snprintf(out_path, sizeof out_path, "%s.out", b->list_path);
    char *argv[] = {(char *)g_py, (char *)"-c", (char *)k_verify_script, b->list_path, NULL};
    assert_int_equal(run(argv, out_path), 0);
    f = fopen(out_path, "r");
    assert_non_null(f);
    while (fgets(line, sizeof line, f) != NULL) {
        if (strncmp(line, "OK ", 3) == 0) {
            ok++;
        } else {
            bad++;
            fprintf(stderr, "verify: %s", line);
        }
    }
    fclose(f);
    assert_int_equal(bad, 0);
    assert_int_equal(ok, b->n);
}

typedef struct {
    const char *file;
    int expect;          /* 0, CMN_DICOM_CODEC_SKIPPED, or -1 for any error */
    unsigned bits;       /* expected JPEG-LS P when encoded */
    unsigned frames;
} syn_case_t;

static const syn_case_t k_syn[] = {
    {"s12_signext.dcm", 0, 16, 1},        /* sign-extended negatives: whole words */
    {"s12_masked.dcm", 0, 12, 1},         /* two's complement in 12 bits, high bits 0 */
    {"s12_positive.dcm", 0, 12, 1},
    {"u12_garbage.dcm", CMN_DICOM_CODEC_SKIPPED, 0, 0},
    {"s12_garbage.dcm", CMN_DICOM_CODEC_SKIPPED, 0, 0},
    {"u16_mono1_implicit.dcm", 0, 16, 1},
    {"s16.dcm", 0, 16, 1},
    {"u14_3frames.dcm", 0, 14, 3},
    {"u8_odd.dcm", 0, 8, 1},               /* odd length, zero padding byte */
    {"u8_oddpad.dcm", CMN_DICOM_CODEC_SKIPPED, 0, 0},
    {"u8_bs7.dcm", 0, 8, 1},              /* 8-bit samples: always P = 8 */
    {"u8_bs6_high.dcm", 0, 8, 1},         /* bits above High Bit carried by P = 8 */
    {"u16_bs8.dcm", CMN_DICOM_CODEC_SKIPPED, 0, 0},
    {"u12_hb15.dcm", CMN_DICOM_CODEC_SKIPPED, 0, 0},
    {"rgb_pc0.dcm", 0, 8, 1},
    {"rgb_pc1.dcm", 0, 8, 1},
    {"rgb_pc1_3frames.dcm", 0, 8, 3},
    {"ybr_full.dcm", 0, 8, 1},
    {"palette.dcm", 0, 8, 1},
    {"u8_5frames.dcm", 0, 8, 5},
    {"short.dcm", CMN_DICOM_CODEC_SKIPPED, 0, 0},
    {"ybr_422.dcm", CMN_DICOM_CODEC_SKIPPED, 0, 0},
    {"ba32.dcm", CMN_DICOM_CODEC_SKIPPED, 0, 0},
    {"tiny.dcm", CMN_DICOM_CODEC_SKIPPED, 0, 0},
    {"float.dcm", CMN_DICOM_CODEC_SKIPPED, 0, 0},
    {"nopixels.dcm", CMN_DICOM_CODEC_SKIPPED, 0, 0},
    {"trunc_px.dcm", -1, 0, 0},
    {"trunc_hdr.dcm", -1, 0, 0},
    {"garbage.dcm", -1, 0, 0},
    {"empty.dcm", -1, 0, 0},
    {"does_not_exist.dcm", -1, 0, 0},
};

static void test_synthetic(void **state)
{
    batch_t b;
    (void)state;

    batch_open(&b, "syn");
    for (size_t i = 0; i < CMN_ARRAY_SIZE(k_syn); i++) {
        const syn_case_t *c = &k_syn[i];
        char rel[PATH_MAX];
        cmn_jpegls_stats_t st;
        int rc;

        snprintf(rel, sizeof rel, "syn/%s", c->file);
        rc = transcode(&b, rel, c->expect, &st);
        if (rc == 0) {
            if (st.bits_per_sample != c->bits || st.frames != c->frames)
                fail_msg("%s: P %u frames %u, expected P %u frames %u", c->file,
                         st.bits_per_sample, st.frames, c->bits, c->frames);
        }
    }
    batch_verify(&b);
}

/* Every file of every generated study encodes and round-trips. */
static void test_generated(void **state)
{
    static char names[16][PATH_MAX], files[64][PATH_MAX];
    const char *kinds[] = {"ct_", "mr_", "dr_", "mg_", "xa_"};
    batch_t b;
    (void)state;

    batch_open(&b, "gen");
    for (size_t k = 0; k < CMN_ARRAY_SIZE(kinds); k++) {
        uint64_t in = 0, out = 0;
        assert_int_equal(list_dcm("gen", kinds[k], names, 16), 1);
        int n = list_dcm(names[0], "", files, 64);
        int ndcm = 0;
        for (int i = 0; i < n; i++) {
            cmn_jpegls_stats_t st;
            if (strstr(files[i], ".dcm") == NULL)
                continue;
            ndcm++;
            transcode(&b, files[i], 0, &st);
            in += st.pixel_bytes_in;
            out += st.pixel_bytes_out;
            if (strcmp(kinds[k], "xa_") == 0)
                assert_int_equal(st.frames, 30);
            else
                assert_int_equal(st.frames, 1);
            assert_true(st.usec >= st.encode_usec && st.encode_usec > 0);
        }
        assert_true(ndcm >= 1);
        print_message("%s %d files, pixel ratio %.3f\n", kinds[k], ndcm, (double)in / out);
        if (strcmp(kinds[k], "ct_") == 0) {
            assert_int_equal(ndcm, 5);
            assert_true((double)in / out > 1.5);
        }
    }
    /* 12-bit unsigned CT */
    assert_int_equal(list_dcm("gen12", "ct_", names, 16), 1);
    {
        int n = list_dcm(names[0], "CT", files, 64);
        uint64_t in = 0, out = 0;
        assert_int_equal(n, 2);
        for (int i = 0; i < n; i++) {
            cmn_jpegls_stats_t st;
            transcode(&b, files[i], 0, &st);
            assert_int_equal(st.bits_per_sample, 12);
            in += st.pixel_bytes_in;
            out += st.pixel_bytes_out;
        }
        assert_true((double)in / out > 1.5);
    }
    batch_verify(&b);
}

/*
 * pydicom's bundled files: each one round-trips, is skipped, or fails on a
 * file dcmdump cannot read either (non-DICOM files of the corpus included).
 */
static void test_corpus(void **state)
{
    static char files[400][PATH_MAX];
    int n, enc = 0, skip = 0, errs = 0;
    batch_t b;
    (void)state;

    n = list_dcm("gen/corpus", "", files, 400);
    assert_true(n > 50);
    batch_open(&b, "corpus");
    for (int i = 0; i < n; i++) {
        int rc = transcode(&b, files[i], INT_MIN, NULL);
        if (rc == 0)
            enc++;
        else if (rc == CMN_DICOM_CODEC_SKIPPED)
            skip++;
        else
            errs++;
    }
    print_message("corpus: %d files, %d encoded, %d skipped, %d errors\n", n, enc, skip, errs);
    assert_true(enc >= 20);
    batch_verify(&b);
}

typedef struct {
    char rel[PATH_MAX];
    char out[PATH_MAX];
    int rc;
} thread_job_t;

static void *thread_main(void *arg)
{
    thread_job_t *j = arg;
    char err[256];
    for (int r = 0; r < 3 && j->rc == 0; r++)
        j->rc = cmn_dicom_to_jpegls(path_of(j->rel), j->out, NULL, err, sizeof err);
    return NULL;
}

static bool same_file(const char *a, const char *b)
{
    FILE *fa = fopen(a, "rb"), *fb = fopen(b, "rb");
    bool same = fa != NULL && fb != NULL;
    int ca, cb;
    while (same) {
        ca = fgetc(fa);
        cb = fgetc(fb);
        if (ca != cb)
            same = false;
        if (ca == EOF || cb == EOF)
            break;
    }
    if (fa)
        fclose(fa);
    if (fb)
        fclose(fb);
    return same;
}

/* Concurrent calls give the same bytes as a sequential call. */
static void test_threads(void **state)
{
    static char names[1][PATH_MAX], files[8][PATH_MAX];
    thread_job_t jobs[6];
    pthread_t th[6];
    char ref[PATH_MAX], err[256];
    (void)state;

    assert_int_equal(list_dcm("gen", "ct_", names, 1), 1);
    assert_int_equal(list_dcm(names[0], "CT", files, 8), 5);
    for (int i = 0; i < 6; i++) {
        snprintf(jobs[i].rel, sizeof jobs[i].rel, "%s", files[i % 3]);
        snprintf(jobs[i].out, sizeof jobs[i].out, "%s/enc/thread%d.dcm", g_dir, i);
        jobs[i].rc = 0;
        assert_int_equal(pthread_create(&th[i], NULL, thread_main, &jobs[i]), 0);
    }
    for (int i = 0; i < 6; i++) {
        assert_int_equal(pthread_join(th[i], NULL), 0);
        assert_int_equal(jobs[i].rc, 0);
    }
    for (int i = 0; i < 6; i++) {
        snprintf(ref, sizeof ref, "%s/enc/threadref%d.dcm", g_dir, i % 3);
        if (i < 3)
            assert_int_equal(cmn_dicom_to_jpegls(path_of(jobs[i].rel), ref, NULL, err, sizeof err), 0);
        assert_true(same_file(ref, jobs[i].out));
    }
}

static void test_bad_args(void **state)
{
    char err[256];
    cmn_jpegls_stats_t st;
    char in[PATH_MAX], out[PATH_MAX];
    (void)state;

    snprintf(in, sizeof in, "%s", path_of("syn/s16.dcm"));
    assert_int_equal(cmn_dicom_to_jpegls(NULL, "/tmp/x", &st, err, sizeof err), CMN_EINTERNAL);
    assert_int_equal(cmn_dicom_to_jpegls(in, NULL, &st, err, sizeof err), CMN_EINTERNAL);
    assert_int_equal(cmn_dicom_to_jpegls(in, in, &st, err, sizeof err), CMN_EINTERNAL);
    /* unwritable destination: an error, and nothing left behind */
    snprintf(out, sizeof out, "%s/no/such/dir/x.dcm", g_dir);
    assert_true(cmn_dicom_to_jpegls(in, out, &st, err, sizeof err) < 0);
    assert_false(file_exists(out));
    /* NULL stats and err are allowed */
    snprintf(out, sizeof out, "%s/enc/nullstats.dcm", g_dir);
    assert_int_equal(cmn_dicom_to_jpegls(in, out, NULL, NULL, 0), 0);
    assert_int_equal(cmn_dicom_to_jpegls(path_of("syn/tiny.dcm"), out, NULL, NULL, 0),
                     CMN_DICOM_CODEC_SKIPPED);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_synthetic),
        cmocka_unit_test(test_generated),
        cmocka_unit_test(test_corpus),
        cmocka_unit_test(test_threads),
        cmocka_unit_test(test_bad_args),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
