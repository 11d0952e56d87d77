"""benchload.py - loads a series into yunying-cloud (STOW-RS) and Orthanc (its
REST API) for the benchmarks that compare the two (bench_dicomweb.sh,
bench_viewer.sh). Imported by their inline Python."""
import http.client
import json
import os


def stow(files, port, token, work):
    """One STOW-RS request with every file, streamed from a temp body file."""
    b = "yy-bench-boundary"
    path = os.path.join(work, "stow.body")
    with open(path, "wb") as out:
        for f in files:
            out.write(f"--{b}\r\nContent-Type: application/dicom\r\n\r\n".encode())
            with open(f, "rb") as src:
                out.write(src.read())
            out.write(b"\r\n")
        out.write(f"--{b}--\r\n".encode())
    c = http.client.HTTPConnection("127.0.0.1", int(port), timeout=600)
    with open(path, "rb") as body:
        c.request("POST", "/dicomweb/studies", body=body, headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={b}',
            "Content-Length": str(os.path.getsize(path)),
            "Authorization": "Bearer " + token})
    r = c.getresponse()
    ans = r.read()
    assert r.status == 200, (r.status, ans[:300])
    os.unlink(path)


def orthanc_post(files, port):
    """POST /instances per file; returns Orthanc's instance ids and the connection."""
    o = http.client.HTTPConnection("127.0.0.1", int(port), timeout=600)
    ids = []
    for f in files:
        with open(f, "rb") as src:
            o.request("POST", "/instances", body=src.read(),
                      headers={"Content-Type": "application/dicom"})
        r = o.getresponse()
        ans = r.read()
        assert r.status == 200, r.status
        ids.append(json.loads(ans)["ID"])
    return ids, o
