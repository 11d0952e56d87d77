#!/usr/bin/python3
"""gen_studies.py - deterministic, realistic DICOM test studies for Yunying.

Uses Debian's python3-pydicom (2.3) and python3-numpy only. The interpreter is
/usr/bin/python3 on purpose: a python3 earlier in PATH (pyenv, venv) may lack
the Debian packages.

    gen_studies.py OUTDIR [--only ct,dr,mg,mr,xa,cal,corpus] [--ct-slices N]
                   [--seed N] [--patient-id ID] [--patient-name NAME]
                   [--birth-date YYYYMMDD] [--sex M|F|O]
                   [--study-date YYYYMMDD] [--accession ACC]
                   [--charset utf8|gb18030] [--ct-bits 12|16] [--quiet]

Each study goes to OUTDIR/<kind>_<patient id>_<accession>/ as Part 10 files
(Explicit VR Little Endian) plus manifest.json listing every file, its UIDs
and the SHA-256 of its Pixel Data value, so tests need not rescan. The corpus
(pydicom's bundled test files, odd inputs on purpose) goes to OUTDIR/corpus/
with its own manifest.json.

Studies:
  ct  N slices (default 100) 512x512, int16 (signed, BitsStored 16, padding
      -2000 outside the scan circle) or --ct-bits 12 (unsigned, BitsStored 12);
      RescaleIntercept -1024. An anatomical phantom: body with fat layer, lungs
      with vessels, heart, liver, spine and ribs, smooth texture, noise 10 HU.
  dr  one DX chest 3000x3000 uint16 (14 bits stored), ImagerPixelSpacing.
  mg  two MG views 3328x4096 (columns x rows) uint16, 12 bits stored.
  mr  20 slices 256x256 uint16 head phantom, encoded in GB18030 by default.
  xa  one multi-frame XA, 30 frames 512x512 uint8, contrast filling vessels.
  cal calibration phantom for the viewer's measurement tests (not in the
      default set; ask with --only cal). Exact values, no noise:
      series 1, CT, 4 slices 512x512 int16, PixelSpacing 0.5 mm, intercept
        -1024: air -1000 HU; "thorax" ellipse centre (x 256, y 256), semi-axes
        240 x 200 px (inner width 480 px = 240 mm) at -100 HU; "heart" ellipse
        centre (256, 330), semi-axes 120 x 70 px (width 240 px = 120 mm) at 60
        HU; uniform 40 HU rectangle x 120..239, y 110..189; probe square x
        290..369, y 110..189 at 100 + 50*k HU on slice k (k = 0..3).
      series 2, OT secondary capture, slice 0's image without any pixel
        spacing (the viewer must warn that it is not calibrated).
      series 3, XA multi-frame 256x256 uint8, 20 frames, ImagerPixelSpacing
        0.3 mm only, FrameTime 100 ms: frames 1..4 background only, a dark
        vessel (value - 60) grows from frame 5; frames 11.. are shifted by
        (+2, +1) px (patient motion). MaskSubtractionSequence: AVG_SUB, mask
        frames 2 and 3 (averaged), applicable frames 4..20.

Everything derives from --seed and the patient/study options: the same
command line writes byte-identical files. UIDs are 2.25.<decimal of a UUID>
hashed from those inputs, so distinct patients/accessions give distinct UIDs.
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
import uuid

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

IMPL_VERSION = "YY_GEN_1"

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
MG_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
XA_STORAGE = "1.2.840.10008.5.1.4.1.1.12.1"

CHARSETS = {"utf8": "ISO_IR 192", "gb18030": "GB18030"}


def make_uid(*parts):
    """2.25.<UUID as decimal>, the UUID hashed from parts (deterministic)."""
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return "2.25.%d" % uuid.UUID(bytes=h[:16], version=4).int


IMPL_UID = make_uid("yunying", "gen_studies", "implementation", 1)


# ---------------------------------------------------------------- image helpers

def smooth_field(rng, h, w, cells, octaves=3):
    """Smooth random field in about [-1, 1]: bilinear value noise, several octaves."""
    out = np.zeros((h, w), np.float32)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        c = cells * (2 ** o)
        grid = rng.standard_normal((c + 2, c + 2)).astype(np.float32)
        ys = np.linspace(0, c, h, dtype=np.float32)
        xs = np.linspace(0, c, w, dtype=np.float32)
        y0 = ys.astype(np.int32)
        x0 = xs.astype(np.int32)
        fy = (ys - y0)[:, None]
        fx = (xs - x0)[None, :]
        g00 = grid[y0][:, x0]
        g01 = grid[y0][:, x0 + 1]
        g10 = grid[y0 + 1][:, x0]
        g11 = grid[y0 + 1][:, x0 + 1]
        # smoothstep weights hide the grid
        fy = fy * fy * (3 - 2 * fy)
        fx = fx * fx * (3 - 2 * fx)
        out += amp * ((g00 * (1 - fx) + g01 * fx) * (1 - fy) + (g10 * (1 - fx) + g11 * fx) * fy)
        total += amp
        amp *= 0.5
    return out / total


def box_blur3(a):
    """3x3 box blur (partial-volume softening of edges)."""
    p = np.pad(a, 1, mode="edge")
    s = np.zeros_like(a)
    h, w = a.shape
    for dy in range(3):
        for dx in range(3):
            s += p[dy:dy + h, dx:dx + w]
    return s / 9.0


def ellipse(yy, xx, cy, cx, ry, rx):
    """Boolean mask of an axis-aligned ellipse."""
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def sha256_hex(b):
    return hashlib.sha256(b).hexdigest()


# ---------------------------------------------------------------- DICOM helpers

class Study:
    """Patient/study attributes shared by the instances of one study."""

    def __init__(self, args, kind, modality, description, charset, variant=""):
        self.kind = kind
        self.modality = modality
        self.seed = args.seed
        self.patient_id = args.patient_id
        self.patient_name = args.patient_name
        self.birth_date = args.birth_date
        self.sex = args.sex
        self.study_date = args.study_date
        self.charset = charset
        key = (args.seed, args.patient_id, args.study_date, kind)
        self.accession = args.accession or ("A" + hashlib.sha256(
            repr(key).encode()).hexdigest()[:9].upper())
        # variant: the pixel-shaping options (slice count, bits), so that a
        # different volume never reuses the SOP Instance UIDs of another
        self.study_uid = make_uid("study", args.seed, args.patient_id, args.study_date,
                                  self.accession, kind, variant)
        hh = {"ct": "083015", "dr": "091200", "mg": "100500", "mr": "140000", "xa": "153000",
              "cal": "160000"}
        self.study_time = hh.get(kind, "120000")
        self.description = description
        self.dirname = "%s_%s_%s" % (kind, safe_name(args.patient_id), safe_name(self.accession))
        self.series = []  # manifest entries

    def uid(self, *parts):
        return make_uid(self.study_uid, *parts)


def safe_name(s):
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s) or "x"


def base_dataset(st, sop_class, sop_uid, series_uid, series_number, series_desc,
                 instance_number):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPL_UID
    meta.ImplementationVersionName = IMPL_VERSION

    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.is_little_endian = True
    ds.is_implicit_VR = False
    ds.SpecificCharacterSet = CHARSETS[st.charset]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"] if st.modality == "CT" else \
        ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = st.study_date
    ds.SeriesDate = st.study_date
    ds.ContentDate = st.study_date
    ds.StudyTime = st.study_time
    ds.SeriesTime = st.study_time
    ds.ContentTime = st.study_time
    ds.AccessionNumber = st.accession
    ds.Modality = st.modality
    ds.Manufacturer = "Yunying Phantom"
    ds.InstitutionName = "云影示范医院"
    ds.ReferringPhysicianName = "王^医生"
    ds.StationName = "YYGEN"
    ds.StudyDescription = st.description
    ds.SeriesDescription = series_desc
    ds.ManufacturerModelName = "gen_studies"
    ds.PatientName = st.patient_name
    ds.PatientID = st.patient_id
    ds.PatientBirthDate = st.birth_date
    ds.PatientSex = st.sex
    ds.PatientAge = patient_age(st.birth_date, st.study_date)
    ds.StudyInstanceUID = st.study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = st.accession[-8:]
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    return ds


def patient_age(birth, study):
    try:
        years = int(study[:4]) - int(birth[:4]) - (1 if study[4:] < birth[4:] else 0)
        return "%03dY" % max(0, min(years, 999))
    except ValueError:
        return ""


def set_pixels(ds, arr, bits_stored, signed, photometric="MONOCHROME2"):
    frames = arr.shape[0] if arr.ndim == 3 else 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows = arr.shape[-2]
    ds.Columns = arr.shape[-1]
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if frames > 1 or ds.SOPClassUID == XA_STORAGE:
        ds.NumberOfFrames = frames
    data = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
    ds.PixelData = data
    ds["PixelData"].VR = "OW" if ds.BitsAllocated > 8 else "OB"
    return data


def save(st, outdir, ds, pixel_bytes, series_entry, fname):
    path = os.path.join(outdir, st.dirname, fname)
    ds.save_as(path, write_like_original=False)
    series_entry["instances"].append({
        "file": fname,
        "sop_uid": str(ds.SOPInstanceUID),
        "sop_class_uid": str(ds.SOPClassUID),
        "instance_number": int(ds.InstanceNumber),
        "rows": int(ds.Rows),
        "columns": int(ds.Columns),
        "frames": int(getattr(ds, "NumberOfFrames", 1) or 1),
        "bits_allocated": int(ds.BitsAllocated),
        "size": os.path.getsize(path),
        "pixel_sha256": sha256_hex(pixel_bytes),
    })


def new_series(st, series_uid, number, modality, desc):
    entry = {"series_uid": series_uid, "series_number": number, "modality": modality,
             "description": desc, "instances": []}
    st.series.append(entry)
    return entry


def write_manifest(st, outdir):
    m = {
        "generator": "gen_studies.py",
        "version": 1,
        "kind": st.kind,
        "seed": st.seed,
        "patient_id": st.patient_id,
        "patient_name": st.patient_name,
        "patient_birth_date": st.birth_date,
        "patient_sex": st.sex,
        "study_uid": st.study_uid,
        "study_date": st.study_date,
        "study_time": st.study_time,
        "accession": st.accession,
        "study_description": st.description,
        "modality": st.modality,
        "specific_character_set": CHARSETS[st.charset],
        "dir": st.dirname,
        "series": st.series,
    }
    with open(os.path.join(outdir, st.dirname, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(m, f, ensure_ascii=False, indent=1)
        f.write("\n")
    return m


def prepare_dir(outdir, st):
    d = os.path.join(outdir, st.dirname)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)


# ---------------------------------------------------------------- CT

class CtPhantom:
    """Chest/abdomen phantom in HU; slices vary smoothly along z (0 = top)."""

    N = 512

    def __init__(self, rng):
        n = self.N
        self.yy, self.xx = np.mgrid[0:n, 0:n].astype(np.float32)
        self.texture = smooth_field(rng, n, n, 8) * 12.0          # soft tissue texture, HU
        self.lung_tex = smooth_field(rng, n, n, 24, 2) * 25.0     # parenchyma, HU
        self.bias = (self.yy - n / 2) / n * 20.0                  # smooth gradient (beam hardening)
        self.fov = ellipse(self.yy, self.xx, n / 2, n / 2, n / 2 - 2, n / 2 - 2)
        # vessels: per lung, centres and drift per unit z
        self.vessels = []
        for side in (-1, 1):
            for _ in range(70):
                self.vessels.append((
                    side,
                    rng.uniform(-0.8, 0.8), rng.uniform(-0.8, 0.8),   # position in lung units
                    rng.uniform(-0.6, 0.6), rng.uniform(-0.6, 0.6),   # drift over the volume
                    rng.uniform(1.2, 4.0),                            # radius px
                ))

    def slice_hu(self, z):
        """HU image (float32) for z in [0, 1]."""
        n = self.N
        yy, xx = self.yy, self.xx
        cx, cy = n / 2, n / 2 + 10
        img = np.full((n, n), -1000.0, np.float32)

        # body: skin/fat layer, then soft tissue
        bry, brx = 150 + 10 * np.sin(z * 3.1), 215 - 10 * z
        body = ellipse(yy, xx, cy, cx, bry, brx)
        inner = ellipse(yy, xx, cy, cx, bry - 14, brx - 16)
        img[body] = -100.0 + self.texture[body] * 0.5
        img[inner] = 40.0 + self.texture[inner] + self.bias[inner]

        # table under the patient
        table = (yy > cy + bry + 8) & (yy < cy + bry + 16) & (np.abs(xx - cx) < 200)
        img[table] = 300.0

        # lungs (upper part of the volume), liver (lower part)
        lung_size = max(0.0, np.sin(np.clip(z * 1.25, 0, 1) * np.pi * 0.95 + 0.15))
        lry, lrx = 95 * lung_size + 1, 70 * lung_size + 1
        lungs = []
        for side in (-1, 1):
            lcx = cx + side * 88
            m = ellipse(yy, xx, cy - 10, lcx, lry, lrx) & inner
            img[m] = -850.0 + self.lung_tex[m]
            lungs.append((lcx, m))
        # vessels inside the lungs
        if lung_size > 0.05:
            for side, vx, vy, dx, dy, r in self.vessels:
                lcx = cx + side * 88
                px = lcx + (vx + dx * z) * lrx * 0.8
                py = cy - 10 + (vy + dy * z) * lry * 0.8
                y0, y1 = int(max(py - r - 1, 0)), int(min(py + r + 2, n))
                x0, x1 = int(max(px - r - 1, 0)), int(min(px + r + 2, n))
                if y0 >= y1 or x0 >= x1:
                    continue
                sub_y, sub_x = yy[y0:y1, x0:x1], xx[y0:y1, x0:x1]
                d2 = (sub_y - py) ** 2 + (sub_x - px) ** 2
                vm = d2 <= r * r
                lm = lungs[0 if side < 0 else 1][1][y0:y1, x0:x1]
                win = img[y0:y1, x0:x1]
                win[vm & lm] = 40.0
        # heart (mid chest, left of centre), aorta with contrast
        hs = max(0.0, 1.0 - abs(z - 0.45) / 0.25)
        if hs > 0:
            heart = ellipse(yy, xx, cy - 5, cx + 25, 70 * hs + 1, 80 * hs + 1) & inner
            img[heart] = 45.0 + self.texture[heart] * 0.5
        aorta = ellipse(yy, xx, cy + 45, cx + 22, 14, 14)
        img[aorta] = 180.0
        if z > 0.6:
            ls = min(1.0, (z - 0.6) / 0.2)
            liver = ellipse(yy, xx, cy - 5, cx - 60, 100 * ls + 1, 110 * ls + 1) & inner
            img[liver] = 60.0 + self.texture[liver] * 0.7
            kidney_on = z > 0.8
            if kidney_on:
                for side in (-1, 1):
                    k = ellipse(yy, xx, cy + 60, cx + side * 75, 30, 20)
                    img[k] = 30.0
        # ribs: a ring just inside the fat layer, cut into segments that slide with z
        ring = ellipse(yy, xx, cy, cx, bry - 18, brx - 20) & \
            ~ellipse(yy, xx, cy, cx, bry - 30, brx - 32)
        theta = np.arctan2(yy - cy, xx - cx)
        ribs = ring & (np.cos(theta * 14 + z * 40.0) > 0.55) & (yy < cy + bry - 40)
        img[ribs] = 900.0
        # spine: vertebral body (cortex + trabecular), canal, spinous process
        vcy = cy + 95
        vb_out = ellipse(yy, xx, vcy, cx, 28, 30)
        vb_in = ellipse(yy, xx, vcy, cx, 22, 24)
        img[vb_out] = 1150.0
        img[vb_in] = 260.0 + self.texture[vb_in] * 3
        canal = ellipse(yy, xx, vcy + 42, cx, 11, 12)
        arch = ellipse(yy, xx, vcy + 42, cx, 20, 22) & ~canal
        img[arch] = 750.0
        img[canal] = 25.0
        proc = (np.abs(xx - cx) < 5) & (yy > vcy + 55) & (yy < vcy + 80) & inner
        img[proc] = 800.0
        return box_blur3(img)


def gen_ct(args, outdir, rng):
    st = Study(args, "ct", "CT", args.ct_description or "胸腹部CT平扫", args.charset,
               "%d/%d" % (args.ct_slices, args.ct_bits))
    prepare_dir(outdir, st)
    phantom = CtPhantom(rng)
    series_uid = st.uid("series", 1)
    entry = new_series(st, series_uid, 1, "CT", "胸部 5mm")
    n = args.ct_slices
    thickness = 1.25 if n > 200 else (2.5 if n > 120 else 5.0)
    frame_uid = st.uid("for", 1)
    signed = args.ct_bits == 16
    noise_rng = np.random.default_rng([args.seed, 7])
    for i in range(n):
        z = i / max(n - 1, 1)
        hu = phantom.slice_hu(z)
        hu += noise_rng.standard_normal(hu.shape, dtype=np.float32) * 10.0
        stored = np.rint(hu + 1024.0)
        if signed:
            stored = np.clip(stored, -2000, 32767).astype(np.int16)
            stored[~phantom.fov] = -2000
        else:
            stored = np.clip(stored, 0, 4095).astype(np.uint16)
            stored[~phantom.fov] = 0
        sop_uid = st.uid("sop", 1, i + 1)
        ds = base_dataset(st, CT_STORAGE, sop_uid, series_uid, 1, "胸部 5mm", i + 1)
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.BodyPartExamined = "CHEST"
        ds.PatientPosition = "HFS"
        ds.KVP = "120"
        ds.SliceThickness = "%g" % thickness
        ds.SpacingBetweenSlices = "%g" % thickness
        ds.ImagePositionPatient = ["-179.2", "-179.2", "%g" % (-i * thickness)]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.SliceLocation = "%g" % (-i * thickness)
        ds.PixelSpacing = ["0.7", "0.7"]
        ds.AcquisitionNumber = 1
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = ["40", "-600"]
        ds.WindowWidth = ["400", "1500"]
        ds.WindowCenterWidthExplanation = ["MEDIASTINUM", "LUNG"]
        ds.ConvolutionKernel = "STANDARD"
        if signed:
            ds.PixelPaddingValue = -2000
        data = set_pixels(ds, stored, 16 if signed else 12, signed)
        if signed:
            ds["PixelPaddingValue"].VR = "SS"
        save(st, outdir, ds, data, entry, "CT%04d.dcm" % (i + 1))
    return write_manifest(st, outdir)


# ---------------------------------------------------------------- DR

def gen_dr(args, outdir, rng):
    st = Study(args, "dr", "DX", args.dr_description or "胸部正位", args.charset)
    prepare_dir(outdir, st)
    n = 3000
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    # attenuation (arbitrary units): body, lungs transmit more, mediastinum/spine/ribs less
    att = np.zeros((n, n), np.float32)
    body = ellipse(yy, xx, 1650, 1500, 1500, 1150)
    att[body] = 1.0
    for side in (-1, 1):
        lung = ellipse(yy, xx, 1350, 1500 + side * 430, 800, 340)
        att[lung] = 0.35
    medi = ellipse(yy, xx, 1500, 1500, 900, 190)
    att[medi] = 1.15
    heart = ellipse(yy, xx, 1850, 1600, 420, 430)
    att[heart] += 0.25
    spine = (np.abs(xx - 1500) < 80) & (yy > 300)
    att[spine] += 0.5
    theta = np.arctan2(yy - 1500, xx - 1500)
    r = np.hypot((yy - 1500) / 1.1, xx - 1500)
    ribs = (np.cos(r / 70.0 + theta * 2.0) > 0.93) & body & (yy < 2300)
    att[ribs] += 0.3
    clav = (np.abs(yy - 520 - 0.25 * np.abs(xx - 1500)) < 28) & (np.abs(xx - 1500) < 800)
    att[clav] += 0.5
    att = att + smooth_field(rng, n, n, 10) * 0.06
    att = box_blur3(att)
    # detector signal: bright where attenuation is high (For Presentation, MONOCHROME2)
    sig = 600.0 + att * 9000.0
    sig += rng.standard_normal((n, n), dtype=np.float32) * 15.0
    pix = np.clip(np.rint(sig), 0, 16383).astype(np.uint16)
    series_uid = st.uid("series", 1)
    entry = new_series(st, series_uid, 1, "DX", "PA")
    sop_uid = st.uid("sop", 1, 1)
    ds = base_dataset(st, DX_PRESENTATION, sop_uid, series_uid, 1, "PA", 1)
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.ImagerPixelSpacing = ["0.143", "0.143"]
    ds.PixelSpacing = ["0.143", "0.143"]
    ds.KVP = "125"
    ds.DistanceSourceToDetector = "1800"
    ds.BurnedInAnnotation = "NO"
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.WindowCenter = "7000"
    ds.WindowWidth = "12000"
    ds.Laterality = ""
    data = set_pixels(ds, pix, 14, False)
    save(st, outdir, ds, data, entry, "DX0001.dcm")
    return write_manifest(st, outdir)


# ---------------------------------------------------------------- MG

def gen_mg(args, outdir, rng):
    st = Study(args, "mg", "MG", args.mg_description or "双侧乳腺X线摄影", args.charset)
    prepare_dir(outdir, st)
    rows, cols = 4096, 3328
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    series_uid = st.uid("series", 1)
    entry = new_series(st, series_uid, 1, "MG", "筛查")
    tex = smooth_field(rng, rows, cols, 12, 4)
    for k, (lat, view) in enumerate((("R", "CC"), ("L", "CC"))):
        # breast: half ellipse against the chest wall (left edge for R, right for L)
        wall = 0 if lat == "R" else cols - 1
        d = np.abs(xx - wall)
        breast = ((yy - rows / 2) / 1750.0) ** 2 + (d / 2600.0) ** 2 <= 1.0
        thick = np.sqrt(np.clip(1.0 - ((yy - rows / 2) / 1750.0) ** 2 - (d / 2600.0) ** 2, 0, 1))
        gland = np.clip(tex * 1.5 + 0.3, 0, 1) * thick
        sig = np.full((rows, cols), 150.0, np.float32)   # direct exposure: dark
        sig[breast] = (1400.0 + 1100.0 * thick + 1100.0 * gland)[breast]
        sig += rng.standard_normal((rows, cols), dtype=np.float32) * 12.0
        pix = np.clip(np.rint(sig), 0, 4095).astype(np.uint16)
        sop_uid = st.uid("sop", 1, k + 1)
        ds = base_dataset(st, MG_PRESENTATION, sop_uid, series_uid, 1, "筛查", k + 1)
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.BodyPartExamined = "BREAST"
        ds.ImageLaterality = lat
        ds.ViewPosition = view
        ds.PatientOrientation = ["P", "L"] if lat == "R" else ["A", "R"]
        ds.ImagerPixelSpacing = ["0.07", "0.07"]
        ds.PixelSpacing = ["0.065", "0.065"]
        ds.KVP = "29"
        ds.BurnedInAnnotation = "NO"
        ds.BreastImplantPresent = "NO"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.RescaleType = "US"
        ds.WindowCenter = "2600"
        ds.WindowWidth = "2400"
        data = set_pixels(ds, pix, 12, False)
        save(st, outdir, ds, data, entry, "MG%04d.dcm" % (k + 1))
    return write_manifest(st, outdir)


# ---------------------------------------------------------------- MR

def gen_mr(args, outdir, rng):
    charset = args.charset if args.charset_given else "gb18030"
    st = Study(args, "mr", "MR", args.mr_description or "头颅MR平扫", charset,
               str(args.mr_slices))
    prepare_dir(outdir, st)
    n, nz = 256, args.mr_slices
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    tex = smooth_field(rng, n, n, 10) * 40.0
    series_uid = st.uid("series", 1)
    desc = "T2 轴位"
    entry = new_series(st, series_uid, 1, "MR", desc)
    frame_uid = st.uid("for", 1)
    for i in range(nz):
        z = i / max(nz - 1, 1)
        s = np.sqrt(max(0.05, 1.0 - (2 * z - 1) ** 2))
        img = np.zeros((n, n), np.float32)
        head = ellipse(yy, xx, 128, 128, 110 * s + 2, 90 * s + 2)
        skull = head & ~ellipse(yy, xx, 128, 128, 100 * s + 1, 80 * s + 1)
        brain = ellipse(yy, xx, 128, 128, 96 * s + 1, 76 * s + 1)
        img[head] = 900.0
        img[skull] = 80.0
        img[brain] = 600.0 + tex[brain]
        for side in (-1, 1):
            v = ellipse(yy, xx, 120, 128 + side * 14, 30 * s + 1, 8 * s + 1)
            img[v] = 1600.0
        img = box_blur3(img) + rng.standard_normal((n, n), dtype=np.float32) * 12.0
        pix = np.clip(np.rint(img), 0, 4095).astype(np.uint16)
        sop_uid = st.uid("sop", 1, i + 1)
        ds = base_dataset(st, MR_STORAGE, sop_uid, series_uid, 1, desc, i + 1)
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.BodyPartExamined = "HEAD"
        ds.PatientPosition = "HFS"
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = "4000"
        ds.EchoTime = "90"
        ds.EchoTrainLength = 16
        ds.MagneticFieldStrength = "3"
        ds.SliceThickness = "5"
        ds.SpacingBetweenSlices = "6"
        ds.ImagePositionPatient = ["-115", "-115", "%g" % (i * 6.0 - 57)]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.SliceLocation = "%g" % (i * 6.0 - 57)
        ds.PixelSpacing = ["0.9", "0.9"]
        ds.WindowCenter = "800"
        ds.WindowWidth = "1600"
        data = set_pixels(ds, pix, 12, False)
        save(st, outdir, ds, data, entry, "MR%04d.dcm" % (i + 1))
    return write_manifest(st, outdir)


# ---------------------------------------------------------------- XA

def gen_xa(args, outdir, rng):
    st = Study(args, "xa", "XA", args.xa_description or "冠状动脉造影", args.charset,
               str(args.xa_frames))
    prepare_dir(outdir, st)
    n, nf = 512, args.xa_frames
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    bg = 170.0 + smooth_field(rng, n, n, 6) * 25.0 - ellipse(yy, xx, 256, 300, 200, 150) * 30.0
    # vessel tree: random walk branches, each point with its distance along the tree
    pts = []
    def branch(x, y, ang, length, width, dist, depth):
        for _ in range(int(length)):
            ang += rng.normal(0, 0.08)
            x += np.cos(ang) * 2.0
            y += np.sin(ang) * 2.0
            dist += 2.0
            pts.append((x, y, width, dist))
            if depth < 3 and rng.uniform() < 0.012:
                branch(x, y, ang + rng.choice([-0.7, 0.7]), length * 0.5, width * 0.7, dist,
                       depth + 1)
    branch(240.0, 40.0, np.pi / 2 + 0.2, 200, 5.0, 0.0, 0)
    branch(250.0, 45.0, np.pi / 2 - 0.6, 150, 4.0, 0.0, 1)
    max_dist = max(p[3] for p in pts)
    series_uid = st.uid("series", 1)
    entry = new_series(st, series_uid, 1, "XA", "LAO 30")
    frames = np.empty((nf, n, n), np.uint8)
    for f in range(nf):
        front = (f + 1) / nf * max_dist * 1.2          # contrast front advancing
        img = bg.copy()
        for x, y, w, dist in pts:
            if dist > front:
                continue
            r = w
            y0, y1 = int(max(y - r - 1, 0)), int(min(y + r + 2, n))
            x0, x1 = int(max(x - r - 1, 0)), int(min(x + r + 2, n))
            if y0 >= y1 or x0 >= x1:
                continue
            d2 = (yy[y0:y1, x0:x1] - y) ** 2 + (xx[y0:y1, x0:x1] - x) ** 2
            win = img[y0:y1, x0:x1]
            np.minimum(win, np.where(d2 <= r * r, 70.0, 255.0), out=win)
        img = box_blur3(img) + rng.standard_normal((n, n), dtype=np.float32) * 2.0
        frames[f] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    sop_uid = st.uid("sop", 1, 1)
    ds = base_dataset(st, XA_STORAGE, sop_uid, series_uid, 1, "LAO 30", 1)
    ds.BodyPartExamined = "HEART"
    ds.KVP = "80"
    ds.PositionerPrimaryAngle = "30"
    ds.PositionerSecondaryAngle = "0"
    ds.ImagerPixelSpacing = ["0.2", "0.2"]
    ds.FrameTime = "66.7"
    ds.CineRate = 15
    ds.RecommendedDisplayFrameRate = 15
    ds.StartTrim = 1
    ds.StopTrim = nf
    ds.FrameIncrementPointer = pydicom.tag.Tag(0x0018, 0x1063)
    ds.RadiationSetting = "GR"
    ds.PixelIntensityRelationship = "LIN"
    ds.WindowCenter = "128"
    ds.WindowWidth = "256"
    ds.PatientOrientation = ["L", "F"]
    data = set_pixels(ds, frames, 8, False)
    save(st, outdir, ds, data, entry, "XA0001.dcm")
    return write_manifest(st, outdir)


# ---------------------------------------------------------------- calibration phantom

def cal_ct_hu(k):
    """HU image of calibration slice k (exact values, see the module docstring)."""
    n = 512
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    img = np.full((n, n), -1000, np.int16)
    img[ellipse(yy, xx, 256, 256, 200, 240)] = -100
    img[ellipse(yy, xx, 330, 256, 70, 120)] = 60
    img[110:190, 120:240] = 40
    img[110:190, 290:370] = 100 + 50 * k
    return img


def gen_cal(args, outdir, rng):
    st = Study(args, "cal", "CT", args.cal_description or "测量标定体模", args.charset)
    prepare_dir(outdir, st)
    # series 1: calibrated CT stack
    series_uid = st.uid("series", 1)
    entry = new_series(st, series_uid, 1, "CT", "CAL 0.5mm")
    frame_uid = st.uid("for", 1)
    for k in range(4):
        stored = (cal_ct_hu(k).astype(np.int32) + 1024).astype(np.int16)
        ds = base_dataset(st, CT_STORAGE, st.uid("sop", 1, k + 1), series_uid, 1, "CAL 0.5mm", k + 1)
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.PatientPosition = "HFS"
        ds.SliceThickness = "5"
        ds.ImagePositionPatient = ["-128", "-128", "%g" % (-5 * k)]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.SliceLocation = "%g" % (-5 * k)
        ds.PixelSpacing = ["0.5", "0.5"]
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        data = set_pixels(ds, stored, 16, True)
        save(st, outdir, ds, data, entry, "CAL%04d.dcm" % (k + 1))
    # series 2: the same picture without calibration
    series_uid = st.uid("series", 2)
    entry = new_series(st, series_uid, 2, "OT", "NOCAL")
    ds = base_dataset(st, SC_STORAGE, st.uid("sop", 2, 1), series_uid, 2, "NOCAL", 1)
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    data = set_pixels(ds, (cal_ct_hu(0).astype(np.int32) + 1024).astype(np.uint16), 12, False)
    save(st, outdir, ds, data, entry, "NOCAL0001.dcm")
    # series 3: XA multi-frame for cine and subtraction
    n, nf = 256, 20
    yy, xx = np.mgrid[0:n + 8, 0:n + 8].astype(np.float32)
    bg = 140.0 + 40.0 * np.sin(xx / 9.0) * np.cos(yy / 13.0) + (yy - n / 2) * 0.2
    frames = np.empty((nf, n, n), np.uint8)
    for f in range(nf):
        img = bg.copy()
        if f >= 4:
            reach = 20 + (f - 4) * 14                      # vessel grows downwards
            vessel = (np.abs(xx - (128 + 20 * np.sin(yy / 40.0))) < 5) & (yy < reach)
            img[vessel] -= 60.0
        dx, dy = (2, 1) if f >= 10 else (0, 0)
        # shifted content: pixel (x, y) shows the scene at (x - dx, y - dy)
        frames[f] = np.clip(np.rint(img[4 - dy:4 - dy + n, 4 - dx:4 - dx + n]), 0, 255).astype(np.uint8)
    series_uid = st.uid("series", 3)
    entry = new_series(st, series_uid, 3, "XA", "DSA")
    ds = base_dataset(st, XA_STORAGE, st.uid("sop", 3, 1), series_uid, 3, "DSA", 1)
    ds.Modality = "XA"
    ds.ImagerPixelSpacing = ["0.3", "0.3"]
    ds.FrameTime = "100"
    ds.CineRate = 10
    ds.RecommendedDisplayFrameRate = 10
    ds.FrameIncrementPointer = pydicom.tag.Tag(0x0018, 0x1063)
    ds.PixelIntensityRelationship = "LIN"
    ds.WindowCenter = "128"
    ds.WindowWidth = "256"
    mask = Dataset()
    mask.MaskOperation = "AVG_SUB"
    mask.MaskFrameNumbers = [2, 3]
    mask.ApplicableFrameRange = [4, nf]
    ds.MaskSubtractionSequence = [mask]
    ds.RecommendedViewingMode = "SUB"
    data = set_pixels(ds, frames, 8, False)
    save(st, outdir, ds, data, entry, "XA0001.dcm")
    return write_manifest(st, outdir)


# ---------------------------------------------------------------- corpus

def gen_corpus(outdir):
    from pydicom.data import get_testdata_files, get_charset_files
    dst = os.path.join(outdir, "corpus")
    if os.path.isdir(dst):
        shutil.rmtree(dst)
    os.makedirs(dst)
    files = []
    for src in sorted(set(get_testdata_files()) | set(get_charset_files())):
        if not os.path.isfile(src):
            continue
        base = os.path.basename(src)
        if base.endswith((".py", ".pyc", ".json", ".txt", ".dump", ".gz", ".bz2")):
            continue
        sub = "charset" if os.sep + "charset_files" + os.sep in src else "test"
        name = "%s_%s" % (sub, base)
        shutil.copyfile(src, os.path.join(dst, name))
        files.append({"file": name, "size": os.path.getsize(src)})
    with open(os.path.join(dst, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump({"generator": "gen_studies.py", "kind": "corpus", "dir": "corpus",
                   "source": "pydicom %s bundled test files" % pydicom.__version__,
                   "files": files}, f, indent=1)
        f.write("\n")
    return files


# ---------------------------------------------------------------- main

def main(argv=None):
    p = argparse.ArgumentParser(description="Generate deterministic DICOM test studies.")
    p.add_argument("outdir")
    p.add_argument("--only", default="ct,dr,mg,mr,xa,corpus",
                   help="comma-separated kinds: ct,dr,mg,mr,xa,cal,corpus (default all but cal)")
    p.add_argument("--ct-slices", type=int, default=100)
    p.add_argument("--ct-bits", type=int, choices=(12, 16), default=16,
                   help="16: signed int16 (default); 12: unsigned, BitsStored 12")
    p.add_argument("--mr-slices", type=int, default=20)
    p.add_argument("--xa-frames", type=int, default=30)
    p.add_argument("--seed", type=int, default=20261128)
    p.add_argument("--patient-id", default="YY0001")
    p.add_argument("--patient-name", default="张^三")
    p.add_argument("--birth-date", default="19650312")
    p.add_argument("--sex", default="M", choices=("M", "F", "O"))
    p.add_argument("--study-date", default="20261127")
    p.add_argument("--accession", default="",
                   help="AccessionNumber for every generated study (default: derived)")
    p.add_argument("--charset", choices=sorted(CHARSETS), default=None,
                   help="utf8 (ISO_IR 192, default) or gb18030; MR defaults to gb18030")
    for k in ("ct", "dr", "mg", "mr", "xa", "cal"):
        p.add_argument("--%s-description" % k, default="")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    args.charset_given = args.charset is not None
    if args.charset is None:
        args.charset = "utf8"
    kinds = [k.strip() for k in args.only.split(",") if k.strip()]
    known = ("ct", "dr", "mg", "mr", "xa", "cal", "corpus")
    bad = [k for k in kinds if k not in known]
    if bad:
        p.error("unknown kind(s) %s (known: %s)" % (",".join(bad), ",".join(known)))
    if not 1 <= args.ct_slices <= 2000:
        p.error("--ct-slices must be 1..2000")
    if len(args.study_date) != 8 or not args.study_date.isdigit():
        p.error("--study-date must be YYYYMMDD")
    if args.accession and len(args.accession) > 16:
        p.error("--accession is at most 16 characters")
    if len(args.patient_id) > 64:
        p.error("--patient-id is at most 64 characters")

    os.makedirs(args.outdir, exist_ok=True)
    gens = {"ct": gen_ct, "dr": gen_dr, "mg": gen_mg, "mr": gen_mr, "xa": gen_xa, "cal": gen_cal}
    for k in known:
        if k not in kinds:
            continue
        t0 = time.monotonic()
        if k == "corpus":
            files = gen_corpus(args.outdir)
            what = "%d files" % len(files)
            where = "corpus"
        else:
            # one generator per kind, seeded from the seed, the patient and the kind
            rng = np.random.default_rng(
                [args.seed, int(hashlib.sha256((args.patient_id + "/" + k).encode()).hexdigest()[:8], 16)])
            m = gens[k](args, args.outdir, rng)
            what = "%d instances" % sum(len(s["instances"]) for s in m["series"])
            where = m["dir"]
        if not args.quiet:
            print("gen_studies: %-6s %s -> %s (%.1f s)" % (k, what, os.path.join(args.outdir, where),
                                                         time.monotonic() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
