#!/usr/bin/python3
"""Browser end to end: a CT study sent through the edge over DICOM is opened
in Debian's Chromium (driven by playwright-core) from the real cloud.

Sets up cloud + edge + data, then runs tests/e2e/viewer.spec.mjs, whose
"N passed, N failed" line becomes this script's own closing line.
"""
import os
import subprocess
import sys

from yyharness import manifest_files, TOP, Cloud, Edge, generate, storescu, tag_value, tempdir, wait_until, _cleanup_all


def main():
    try:
        data = tempdir("yy-e2e-data-")
        m = list(generate(data, "--only", "ct", "--ct-slices", "30", "--patient-id", "E2E0001",
                          "--patient-name", "王^五", "--study-date", "20260501",
                          "--accession", "E2E-ACC", "--seed", "5").values())[0]
        files = manifest_files(m)
        cloud = Cloud()
        edge = Edge(cloud)
        r = storescu(edge.ae, edge.port, files)
        if r.returncode != 0:
            raise RuntimeError(f"storescu failed: {r.stderr[-1000:]}")
        s = cloud.session()

        def indexed():
            res = s.get_json(f"/dicomweb/studies?StudyInstanceUID={m['study_uid']}&includefield=00201208")
            return res and int(tag_value(res[0], "00201208") or 0) == len(files)
        wait_until(indexed, timeout=120, what="study indexed")
        env = os.environ.copy()
        env.update(YY_CLOUD_URL=cloud.url, YY_USER=cloud.USER, YY_PASSWORD=cloud.PASSWORD,
                   YY_E2E_STUDY_UID=m["study_uid"], YY_PATIENT_ID="E2E0001",
                   YY_IMAGE_COUNT=str(len(files)))
        spec = os.path.join(TOP, "tests", "e2e", "viewer.spec.mjs")
        p = subprocess.run(["node", spec], cwd=os.path.join(TOP, "tests", "e2e"), env=env,
                           capture_output=True, text=True, timeout=900)
        out = p.stdout + p.stderr
        print(out)
        lines = [l for l in p.stdout.splitlines() if l.endswith(" failed") and " passed, " in l]
        if p.returncode != 0 and not lines:
            print("0 passed, 1 failed")
            return 1
        print(lines[-1] if lines else "0 passed, 1 failed")
        return p.returncode
    except Exception as e:  # setup failure counts as one failed test
        import traceback
        traceback.print_exc()
        print("0 passed, 1 failed")
        return 1
    finally:
        _cleanup_all()


if __name__ == "__main__":
    sys.exit(main())
