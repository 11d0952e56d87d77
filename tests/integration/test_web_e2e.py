#!/usr/bin/python3
"""Browser end to end: a CT study and the viewer's calibration phantom, sent
through the edge over DICOM, are opened in Debian's Chromium (driven by
playwright-core) from the real cloud.

Sets up cloud + edge + data, then runs every tests/e2e/*.spec.mjs (or those
named in YY_E2E_SPECS, comma-separated) one after the other; their
"N passed, N failed" lines are summed into this script's closing line.
"""
import base64
import glob
import json
import os
import re
import subprocess
import sys

from yyharness import manifest_files, TOP, Cloud, Edge, generate, storescu, tag_value, tempdir, wait_until, _cleanup_all


def preview_reference(files, out):
    """The first image (lowest InstanceNumber) as the viewer's preview must
    draw it: modality LUT, first VOI window (PS3.3 C.11.2.1.2.1), 8 bits,
    computed here from the original (uncompressed) file with pydicom."""
    import numpy as np
    import pydicom
    dss = [pydicom.dcmread(f) for f in files]
    ds = min(dss, key=lambda d: (int(d.get("InstanceNumber", 1 << 30)), str(d.SOPInstanceUID)))
    x = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    first = lambda v: float(v[0] if isinstance(v, pydicom.multival.MultiValue) else v)
    c, w = first(ds.WindowCenter) - 0.5, first(ds.WindowWidth) - 1
    y = np.where(x <= c - w / 2, 0.0, np.where(x > c + w / 2, 255.0, ((x - c) / w + 0.5) * 255))
    if ds.PhotometricInterpretation == "MONOCHROME1":
        y = 255 - y
    grey = np.clip(np.rint(y), 0, 255).astype(np.uint8)
    with open(out, "w") as f:
        json.dump({"width": int(ds.Columns), "height": int(ds.Rows),
                   "grey": base64.b64encode(grey.tobytes()).decode()}, f)


def main():
    try:
        data = tempdir("yy-e2e-data-")
        m = list(generate(data, "--only", "ct", "--ct-slices", "30", "--patient-id", "E2E0001",
                          "--patient-name", "王^五", "--study-date", "20260501",
                          "--accession", "E2E-ACC", "--seed", "5").values())[0]
        cal = list(generate(os.path.join(data, "cal"), "--only", "cal", "--patient-id", "E2ECAL1",
                            "--patient-name", "标定^体模", "--study-date", "20260502",
                            "--accession", "E2E-CAL", "--seed", "5").values())[0]
        files = manifest_files(m)
        cal_files = manifest_files(cal)
        cloud = Cloud(tls=False)   # the browser does not trust the run's test CA
        # JPEG-LS lossless uploads, as in production: the browser decodes them (CharLS WASM).
        edge = Edge(cloud, extra={"upload": {"compress": True}})
        r = storescu(edge.ae, edge.port, files + cal_files)
        if r.returncode != 0:
            raise RuntimeError(f"storescu failed: {r.stderr[-1000:]}")
        s = cloud.session()

        def indexed(uid, n):
            res = s.get_json(f"/dicomweb/studies?StudyInstanceUID={uid}&includefield=00201208")
            return res and int(tag_value(res[0], "00201208") or 0) == n
        wait_until(lambda: indexed(m["study_uid"], len(files)) and indexed(cal["study_uid"], len(cal_files)),
                   timeout=120, what="studies indexed")
        ref = os.path.join(data, "preview-ref.json")
        preview_reference(files, ref)
        env = os.environ.copy()
        env.update(YY_CLOUD_URL=cloud.url, YY_USER=cloud.USER, YY_PASSWORD=cloud.PASSWORD,
                   YY_E2E_STUDY_UID=m["study_uid"], YY_PATIENT_ID="E2E0001",
                   YY_IMAGE_COUNT=str(len(files)), YY_E2E_CAL_STUDY_UID=cal["study_uid"],
                   YY_E2E_PREVIEW_REF=ref)
        specs = sorted(glob.glob(os.path.join(TOP, "tests", "e2e", "*.spec.mjs")))
        want = [w.strip() for w in os.environ.get("YY_E2E_SPECS", "").split(",") if w.strip()]
        if want:
            specs = [p for p in specs if os.path.basename(p).split(".")[0] in want]
        npass = nfail = 0
        for spec in specs:
            # Headless Chromium's WebGL is a software rasteriser, on which the
            # app picks CPU rendering (viewer.spec runs that); the tools run
            # on WebGL, so both back ends are tested.
            spec_env = dict(env)
            if os.path.basename(spec).startswith("tools.") and "YY_E2E_RENDER" not in os.environ:
                spec_env["YY_E2E_RENDER"] = "gpu"
            p = subprocess.run(["node", spec], cwd=os.path.join(TOP, "tests", "e2e"), env=spec_env,
                               capture_output=True, text=True, timeout=900)
            print(f"== {os.path.basename(spec)}")
            print(p.stdout + p.stderr)
            lines = [l for l in p.stdout.splitlines() if re.fullmatch(r"\d+ passed, \d+ failed", l)]
            if lines:
                a, b = map(int, re.findall(r"\d+", lines[-1]))
                npass += a
                nfail += b
                if p.returncode != 0 and b == 0:
                    nfail += 1
            else:
                nfail += 1
        print(f"{npass} passed, {nfail} failed")
        return 1 if nfail else 0
    except Exception as e:  # setup failure counts as one failed test
        import traceback
        traceback.print_exc()
        print("0 passed, 1 failed")
        return 1
    finally:
        _cleanup_all()


if __name__ == "__main__":
    sys.exit(main())
