#!/usr/bin/python3
"""test_security.py - the edge <-> cloud security rules (issue 3, R-2.8, R-3.6).

Cloud side: every forged, altered, stale, replayed, token-less, expired- or
revoked-token, unknown-edge, disabled-edge and non-whitelisted request is
refused with the documented status and error code, logged as one "rejected"
line without secrets, tokens or signatures, and changes nothing (no upload,
chunk, instance or nonce row appears). The requests are built here in Python
from proto/PROTOCOL.md, over HTTPS with the run's test CA.

Edge side: associations from calling AE titles or peer addresses outside
scp.allowed_calling_aes / scp.allowed_peers are rejected with the proper
reason; plain http:// to a non-loopback cloud is refused at config load; a
revoked token is replaced automatically and the upload carries on.
"""
import hashlib
import hmac
import io
import json
import os
import re
import secrets
import sqlite3
import subprocess
import sys
import time

import pydicom

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import yyharness as h  # noqa: E402
from yyharness import check, eq, test  # noqa: E402

CHUNK = 64 * 1024
_env = {}


# ------------------------------------------------------------------ client

class Client:
    """One edge identity talking the protocol by hand."""

    def __init__(self, cloud, edge_id, secret_hex):
        self.cloud = cloud
        self.edge_id = edge_id
        self.secret = bytes.fromhex(secret_hex)
        self.token = None                  # (token_id, key)

    def signed(self, method, path, body=b"", key=None, token=None, edge_id=None, ts=None,
               nonce=None, sign_body=None, send_hash=None, headers=None, sig=None):
        """Builds the headers of a signed request (token: None = current, False = none)."""
        if token is None:
            token = self.token
        ts = int(time.time()) if ts is None else ts
        nonce = nonce or secrets.token_hex(16)
        edge = edge_id or self.edge_id
        bh = hashlib.sha256(body if sign_body is None else sign_body).hexdigest()
        canon = "\n".join([method, path, "", edge, str(ts), nonce, bh])
        k = key or (token[1] if token else self.secret)
        hd = {"X-YY-Version": "1", "X-YY-Edge": edge, "X-YY-Timestamp": str(ts),
              "X-YY-Nonce": nonce, "X-YY-Content-SHA256": send_hash or bh,
              "X-YY-Signature": sig or hmac.new(k, canon.encode(), hashlib.sha256).hexdigest(),
              "Content-Type": "application/json"}
        if token:
            hd["X-YY-Token"] = token[0]
        hd.update(headers or {})
        return hd

    def send(self, method, path, body=b"", hd=None, **kw):
        hd = hd or self.signed(method, path, body, **kw)
        conn = h.http_conn(self.cloud, timeout=60)
        try:
            conn.request(method, path, body=body, headers=hd)
            r = conn.getresponse()
            data = r.read()
        finally:
            conn.close()
        err = None
        if r.status >= 400 and data:
            try:
                err = json.loads(data).get("error")
            except ValueError:
                err = None
        return r.status, err, data, hd

    def get_token(self, expect=200):
        st, err, data, _ = self.send("POST", "/api/v1/token", b'{"v":1}', token=False)
        if expect == 200:
            eq(st, 200, f"token request: {data!r}")
            t = json.loads(data)
            check(re.fullmatch(r"[0-9a-f]{32}", t["token_id"]), t["token_id"])
            check(re.fullmatch(r"[0-9a-f]{64}", t["key"]), "key is 64 hex")
            check(t["ttl_s"] >= 1 and t["expires_at"] > time.time() - 5, f"{t}")
            self.token = (t["token_id"], bytes.fromhex(t["key"]))
            return t
        return st, err

    def declare_body(self, data):
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        return json.dumps({"v": 1, "kind": "instance", "sha256": hashlib.sha256(data).hexdigest(),
                           "size": len(data), "chunk_size": CHUNK,
                           "study_uid": ds.StudyInstanceUID, "series_uid": ds.SeriesInstanceUID,
                           "sop_uid": ds.SOPInstanceUID}).encode()


# ------------------------------------------------------------------ fixture

def env():
    if _env:
        return _env
    d = h.tempdir("yy-sec-data-")
    m = list(h.generate(d, "--only", "ct", "--ct-slices", "4", "--quiet").values())[0]
    files = h.manifest_files(m)
    cloud = h.Cloud()
    _env.update(cloud=cloud, files=files, n=0,
                main=Client(cloud, cloud.edge_id, cloud.secret))
    _env["main"].get_token()
    return _env


def fresh_object():
    """A new, never uploaded DICOM object (bytes) derived from the test CT."""
    e = env()
    e["n"] += 1
    ds = pydicom.dcmread(e["files"][0])
    suffix = f".9{e['n']}"
    ds.SOPInstanceUID += suffix
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, write_like_original=True)
    return buf.getvalue()


def add_edge(cloud, edge_id, allow=None):
    out = cloud.admin("edge-add", "--id", edge_id, *(("--allow", allow) if allow else ()))
    return Client(cloud, edge_id, out.strip().splitlines()[-1])


def db_state(cloud):
    con = cloud.db()
    try:
        return {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                for t in ("uploads", "chunks", "instances", "nonces", "tokens")}
    finally:
        con.close()


def token_keys(cloud):
    con = cloud.db()
    try:
        return [r[0] for r in con.execute("SELECT key FROM tokens")]
    finally:
        con.close()


def rejected(cloud, fn, status, code, what):
    """Runs fn() -> (status, error code, headers sent); checks the answer, the
    log line, that no secret reached the log, and that no row changed."""
    before = db_state(cloud)
    nlog = len(cloud.log_text().splitlines())
    st, err, hd = fn()
    eq((st, err), (status, code), what)
    # The rejection is logged (one line, written before the answer was sent).
    new = cloud.log_text().splitlines()[nlog:]
    lines = [ln for ln in new if f"rejected status={status} code={code}" in ln]
    check(lines, f"{what}: no rejection line in the log; new lines: {new!r}")
    check("peer=127.0.0.1" in lines[0], f"{what}: peer not logged: {lines[0]}")
    text = "\n".join(new)
    for secret in [cloud.secret, hd.get("X-YY-Signature"), *token_keys(cloud)]:
        check(not secret or secret not in text, f"{what}: secret material in the log")
    eq(db_state(cloud), before, f"{what}: state changed")


def declare_fn(client, data=None, **kw):
    body = client.declare_body(data or fresh_object())

    def fn():
        st, err, _, hd = client.send("POST", "/api/v1/objects", body, **kw)
        return st, err, hd
    return fn


# ------------------------------------------------------------------ cloud

@test
def valid_token_request_and_upload_work():
    e = env()
    c = e["main"]
    data = fresh_object()
    st, err, body, _ = c.send("POST", "/api/v1/objects", c.declare_body(data))
    eq(st, 200, f"declare with a token: {body!r}")
    oid = json.loads(body)["object_id"]
    chunk = data[:CHUNK]
    st, err, body, _ = c.send("PUT", f"/api/v1/objects/{oid}/chunks/0", chunk,
                              headers={"X-YY-Chunk-SHA256": hashlib.sha256(chunk).hexdigest(),
                                       "Content-Type": "application/octet-stream"})
    eq(st, 204, f"chunk: {body!r}")
    log = e["cloud"].log_text()
    check("token issued edge=edge-test" in log, "token issuance logged")
    check(c.token[1].hex() not in log and e["cloud"].secret not in log, "no keys in the log")


@test
def forged_signature_is_401():
    e = env()
    rejected(e["cloud"], declare_fn(e["main"], sig="ab" * 32), 401, "unauthorized",
             "forged signature")
    rejected(e["cloud"], declare_fn(e["main"], key=b"\x02" * 32), 401, "unauthorized",
             "signed with a wrong key")


@test
def altered_body_is_401():
    e = env()
    c = e["main"]
    data = fresh_object()
    body = c.declare_body(data)
    altered = body.replace(b'"kind"', b'"kind" ')
    # Body changed after signing, hash header still the signed one.
    hd = c.signed("POST", "/api/v1/objects", body)

    def sent_altered():
        st, err, _, _ = c.send("POST", "/api/v1/objects", altered, hd=hd)
        return st, err, hd
    rejected(e["cloud"], sent_altered, 401, "unauthorized", "altered body, old hash")
    # Hash header recomputed for the altered body, signature still over the original.
    rejected(e["cloud"], declare_fn(c, data, sign_body=body + b" "), 401, "unauthorized",
             "altered body, new hash")


@test
def stale_timestamp_is_401():
    """A correctly signed request with a timestamp outside the window is
    refused 401 clock_skew and told the cloud's time (which is what lets an
    edge with a wrong clock sign with the cloud's); a badly signed one is
    told nothing but 401 unauthorized. Neither changes anything."""
    e = env()
    for off, what in ((-3600, "stale timestamp"), (3600, "future timestamp")):
        answers = []

        def fn(off=off):
            st, err, data, hd = e["main"].send("POST", "/api/v1/objects",
                                               e["main"].declare_body(fresh_object()),
                                               ts=int(time.time()) + off)
            answers.append(json.loads(data))
            return st, err, hd
        t0 = int(time.time())
        rejected(e["cloud"], fn, 401, "clock_skew", what)
        check(t0 - 5 <= answers[0].get("server_time", 0) <= int(time.time()) + 5,
              f"{what}: the cloud's time in the answer: {answers[0]}")
        rejected(e["cloud"], declare_fn(e["main"], ts=int(time.time()) + off, sig="ab" * 32),
                 401, "unauthorized", f"{what}, bad signature")
    # The token request (signed with the edge secret) is answered the same way.
    st, err, data, _ = e["main"].send("POST", "/api/v1/token", b'{"v":1}', token=False,
                                      ts=int(time.time()) - 3600)
    eq((st, err), (401, "clock_skew"), "stale token request")
    check(abs(json.loads(data)["server_time"] - time.time()) < 5, f"server_time: {data!r}")


@test
def replayed_nonce_is_401():
    e = env()
    c = e["main"]
    body = c.declare_body(fresh_object())
    st, err, data, hd = c.send("POST", "/api/v1/objects", body)
    eq(st, 200, f"original request: {data!r}")

    def replay():
        st2, err2, _, _ = c.send("POST", "/api/v1/objects", body, hd=hd)
        return st2, err2, hd
    rejected(e["cloud"], replay, 401, "unauthorized", "replayed request")
    # A token request cannot be replayed either.
    hd_t = c.signed("POST", "/api/v1/token", b'{"v":1}', token=False)
    st, _, _, _ = c.send("POST", "/api/v1/token", b'{"v":1}', hd=hd_t)
    eq(st, 200, "token request")
    c2 = Client(e["cloud"], c.edge_id, e["cloud"].secret)

    def replay_token():
        st2, err2, _, _ = c2.send("POST", "/api/v1/token", b'{"v":1}', hd=hd_t)
        return st2, err2, hd_t
    rejected(e["cloud"], replay_token, 401, "unauthorized", "replayed token request")


@test
def upload_without_token_is_401():
    e = env()
    c = e["main"]
    # Version 1 without tokens: the secret signs an upload request directly.
    rejected(e["cloud"], declare_fn(c, token=False), 401, "token_required",
             "secret-signed upload request")
    # A made-up token id.
    rejected(e["cloud"], declare_fn(c, token=(secrets.token_hex(16), b"\x03" * 32)), 401,
             "token_unknown", "unknown token")
    # The token request with a token header is refused (it must use the secret).
    def token_with_token():
        st, err, _, hd = c.send("POST", "/api/v1/token", b'{"v":1}', key=c.secret)
        return st, err, hd
    rejected(e["cloud"], token_with_token, 401, "unauthorized", "token request with a token")


@test
def token_of_another_edge_is_401():
    e = env()
    other = add_edge(e["cloud"], "edge-other")
    other.get_token()
    thief = Client(e["cloud"], e["main"].edge_id, e["cloud"].secret)
    rejected(e["cloud"], declare_fn(thief, token=other.token), 401, "token_unknown",
             "another edge's token")


@test
def expired_token_is_401():
    cloud = h.Cloud(extra={"ingest": {"token_ttl_s": 1}})
    c = Client(cloud, cloud.edge_id, cloud.secret)
    t = c.get_token()
    eq(t["ttl_s"], 1, "configured ttl")
    probe = "/api/v1/objects/" + "0" * 64

    # Poll a harmless signed read until the cloud says the token expired.
    def expired():
        st, err, _, _ = c.send("GET", probe)
        check((st, err) in ((404, "not_found"), (401, "token_expired")), f"probe: {st} {err}")
        return err == "token_expired"
    h.wait_until(expired, timeout=20, interval=0.2, what="token expiry")
    data = fresh_object()
    rejected(cloud, declare_fn(c, data), 401, "token_expired", "expired token")
    c.get_token()
    st, _, body, _ = c.send("POST", "/api/v1/objects", c.declare_body(data))
    eq(st, 200, f"fresh token after expiry: {body!r}")
    cloud.stop()


@test
def revoked_token_is_401():
    e = env()
    cloud = e["cloud"]
    c = add_edge(cloud, "edge-rev")
    c.get_token()
    st, _, _, _ = c.send("GET", "/api/v1/objects/" + "0" * 64)
    eq(st, 404, "token works before revocation")
    out = cloud.admin("edge-revoke-tokens", "--id", "edge-rev")
    check("1 token(s) revoked" in out, out)
    rejected(cloud, declare_fn(c), 401, "token_revoked", "revoked token")
    c.get_token()
    st, _, _, _ = c.send("GET", "/api/v1/objects/" + "0" * 64)
    eq(st, 404, "a new token works after revocation")


@test
def unknown_edge_is_401():
    e = env()
    stranger = Client(e["cloud"], "edge-nobody", secrets.token_hex(32))
    rejected(e["cloud"], lambda: stranger.get_token(expect=401) + ({},), 401, "unauthorized",
             "token request from an unknown edge")
    rejected(e["cloud"], declare_fn(stranger, token=e["main"].token), 401, "unauthorized",
             "upload from an unknown edge")


@test
def disabled_edge_is_403():
    e = env()
    cloud = e["cloud"]
    c = add_edge(cloud, "edge-dis")
    c.get_token()
    out = cloud.admin("edge-disable", "--id", "edge-dis")
    check("disabled" in out, out)
    rejected(cloud, lambda: c.get_token(expect=403) + ({},), 403, "edge_disabled",
             "token request from a disabled edge")
    rejected(cloud, declare_fn(c), 403, "edge_disabled", "upload from a disabled edge")
    # A wrong signature from a disabled edge learns nothing more than 401.
    rejected(cloud, declare_fn(c, sig="cd" * 32), 401, "unauthorized",
             "forged request for a disabled edge")
    cloud.admin("edge-enable", "--id", "edge-dis")
    c.get_token()   # its old token stays revoked; a new one works
    st, _, _, _ = c.send("GET", "/api/v1/objects/" + "0" * 64)
    eq(st, 404, "re-enabled edge")


@test
def non_whitelisted_address_is_403():
    e = env()
    cloud = e["cloud"]
    c = add_edge(cloud, "edge-far", allow="10.0.0.0/8")
    rejected(cloud, lambda: c.get_token(expect=403) + ({},), 403, "forbidden",
             "token request from 127.0.0.1, allow list 10.0.0.0/8")
    cloud.admin("edge-allow", "--id", "edge-far", "--allow", "::1/128, 192.168.0.0/16")
    rejected(cloud, lambda: c.get_token(expect=403) + ({},), 403, "forbidden",
             "IPv6/other IPv4 allow list")
    cloud.admin("edge-allow", "--id", "edge-far", "--allow", "10.0.0.0/8,127.0.0.1/32")
    c.get_token()
    st, _, _, _ = c.send("GET", "/api/v1/objects/" + "0" * 64)
    eq(st, 404, "allowed address")
    # A token obtained while allowed stops working when the address is removed.
    cloud.admin("edge-allow", "--id", "edge-far", "--allow", "10.0.0.0/8")
    rejected(cloud, declare_fn(c), 403, "forbidden", "upload after the allow list shrank")
    # Bad lists are refused by the admin command.
    r = subprocess.run([h.CLOUD_BIN, "edge-allow", "--config", cloud.config, "--id", "edge-far",
                        "--allow", "10.0.0.0/33"], capture_output=True, text=True, timeout=30)
    check(r.returncode != 0 and "--allow" in r.stderr, f"bad CIDR accepted: {r.stderr}")


@test
def forwarded_for_is_believed_only_from_trusted_proxies():
    # Behind nginx (deploy/nginx) the TCP peer is the proxy; with
    # http.trusted_proxies the client is the proxy's last X-Forwarded-For
    # entry, for allow lists, logs and the audit trail alike.
    def token(c, xff):
        body = b'{"v":1}'
        hd = c.signed("POST", "/api/v1/token", body, token=False)
        if xff is not None:
            hd["X-Forwarded-For"] = xff
        st, err, _, _ = c.send("POST", "/api/v1/token", body, hd=hd)
        return st, err

    plain = h.Cloud()
    c = add_edge(plain, "edge-behind", allow="10.9.8.0/24")
    eq(token(c, "10.9.8.7"), (403, "forbidden"), "X-Forwarded-For from an untrusted peer ignored")
    check("peer=127.0.0.1" in plain.log_text(), "untrusted: the TCP peer is logged")

    cloud = h.Cloud(extra={"http": {"trusted_proxies": "127.0.0.1/32"}})
    c = add_edge(cloud, "edge-behind", allow="10.9.8.0/24")
    nlog = len(cloud.log_text().splitlines())
    eq(token(c, "203.0.113.9"), (403, "forbidden"), "forwarded client outside the allow list")
    new = "\n".join(cloud.log_text().splitlines()[nlog:])
    check("peer=203.0.113.9" in new, f"the forwarded client is logged: {new}")
    eq(token(c, None)[0], 403, "trusted proxy without X-Forwarded-For: the proxy's address")
    eq(token(c, "garbage")[0], 403, "malformed X-Forwarded-For: the proxy's address")
    # Only the last entry counts: the ones before it came from the client.
    eq(token(c, "10.9.8.7, 203.0.113.9")[0], 403, "spoofed first entry ignored")
    eq(token(c, "203.0.113.9, 10.9.8.7")[0], 200, "last entry inside the allow list")
    # X-Forwarded-Proto (nginx terminating TLS for a plain-HTTP node) sets the
    # scheme of the URLs in answers, from a trusted proxy only.
    with open(env()["files"][0], "rb") as f:
        dcm = f.read()

    def stow_url(cl, proto):
        s = cl.session()
        b = "yy-sec-boundary"
        body = (f"--{b}\r\nContent-Type: application/dicom\r\n\r\n".encode() + dcm +
                f"\r\n--{b}--\r\n".encode())
        hd = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={b}',
              "Accept": "application/dicom+json"}
        if proto:
            hd["X-Forwarded-Proto"] = proto
        st, _, out = s.request("POST", "/dicomweb/studies", body, hd)
        eq(st, 200, f"STOW: {out[:200]}")
        return h.tag_value(json.loads(out), "00081190")

    check(stow_url(cloud, None).startswith("https://"), "own scheme without the header")
    check(stow_url(cloud, "http").startswith("http://"), "trusted proxy's X-Forwarded-Proto: http")
    check(stow_url(cloud, "https").startswith("https://"), "trusted proxy's X-Forwarded-Proto: https")
    check(stow_url(plain, "http").startswith("https://"), "X-Forwarded-Proto from anyone else ignored")
    # A bad list is refused at start, naming the key.
    bad = os.path.join(h.tempdir("yy-sec-conf-"), "cloud.json")
    with open(bad, "w") as f:
        json.dump({"http": {"trusted_proxies": "10.0.0.0/33"}}, f)
    r = subprocess.run([h.CLOUD_BIN, "--check-config", "--config", bad],
                       capture_output=True, text=True, timeout=30)
    check(r.returncode != 0 and "http.trusted_proxies" in r.stderr, r.stderr)


@test
def mutual_tls_binds_the_certificate_to_the_edge():
    cloud = h.Cloud(mtls=True)              # client certificate CN = edge-test
    c = Client(cloud, cloud.edge_id, cloud.secret)
    # Without a client certificate the handshake fails.
    import ssl
    conn = h.http_conn(cloud, timeout=20)
    try:
        conn.request("POST", "/api/v1/token", body=b'{"v":1}',
                     headers=c.signed("POST", "/api/v1/token", b'{"v":1}', token=False))
        conn.getresponse().read()
        raise AssertionError("request without a client certificate was answered")
    except (ssl.SSLError, ConnectionError, OSError):
        pass
    finally:
        conn.close()

    def send_cert(client, path, body, **kw):
        conn2 = h.http_conn(cloud, timeout=20, client_cert=True)
        try:
            hd = client.signed("POST", path, body, **kw)
            conn2.request("POST", path, body=body, headers=hd)
            r = conn2.getresponse()
            data = r.read()
            return r.status, data, hd
        finally:
            conn2.close()
    st, data, _ = send_cert(c, "/api/v1/token", b'{"v":1}', token=False)
    eq(st, 200, f"token over mTLS: {data!r}")
    other = add_edge(cloud, "edge-notcn")
    before = db_state(cloud)
    st, data, _ = send_cert(other, "/api/v1/token", b'{"v":1}', token=False)
    eq((st, json.loads(data)["error"]), (403, "forbidden"), "certificate of another edge")
    eq(db_state(cloud), before, "nothing changed")
    cloud.stop()


# ------------------------------------------------------------------ edge

def edge_rows(edge):
    con = sqlite3.connect(os.path.join(edge.dir, "spool", "spool.db"), timeout=10)
    try:
        return con.execute("SELECT sop_uid, state FROM instances ORDER BY id").fetchall()
    finally:
        con.close()


@test
def edge_rejects_unlisted_calling_ae_and_peer():
    e = h.Edge(cloud_url=f"http://127.0.0.1:{h.free_port()}", secret="ab" * 32,
               edge_id="edge-acl", ae="YY_EDGE",
               extra={"scp": {"allowed_calling_aes": "MODALITY1, PACS_A"}})
    env_ = h.dcmtk_env()

    def echo(aet):
        return subprocess.run(["echoscu", "-to", "10", "-aet", aet, "-aec", "YY_EDGE",
                               "127.0.0.1", str(e.port)], capture_output=True, text=True,
                              env=env_, timeout=60)
    r = echo("PACS_A")
    eq(r.returncode, 0, f"allowed calling AE: {r.stderr}")
    r = echo("INTRUDER")
    check(r.returncode != 0, "unlisted calling AE accepted")
    check("Calling AE Title Not Recognized" in r.stderr, r.stderr)
    r = h.storescu("YY_EDGE", e.port, env()["files"][:1], extra=("-aet", "INTRUDER"))
    check(r.returncode != 0, "storescu from an unlisted AE accepted")
    eq(edge_rows(e), [], "nothing spooled from a rejected association")
    log = e.daemon.tail(200)
    check("reason=calling_ae_not_allowed calling_ae=INTRUDER" in log, log)
    eq(e.stop(), 0, "edge exit code")

    e2 = h.Edge(cloud_url=f"http://127.0.0.1:{h.free_port()}", secret="ab" * 32,
                edge_id="edge-acl", ae="YY_EDGE",
                extra={"scp": {"allowed_peers": "10.0.0.0/8,::1/128"}})
    r = h.echoscu("YY_EDGE", e2.port)
    check(r.returncode != 0, "unlisted peer accepted")
    check("Association Rejected" in r.stderr, r.stderr)
    check("reason=peer_not_allowed peer=127.0.0.1" in e2.daemon.tail(200), e2.daemon.tail(50))
    eq(e2.stop(), 0, "edge exit code")
    e3 = h.Edge(cloud_url=f"http://127.0.0.1:{h.free_port()}", secret="ab" * 32,
                edge_id="edge-acl", ae="YY_EDGE",
                extra={"scp": {"allowed_peers": "127.0.0.0/8"}})
    r = h.echoscu("YY_EDGE", e3.port)
    eq(r.returncode, 0, f"listed peer: {r.stderr}")
    eq(e3.stop(), 0, "edge exit code")


@test
def edge_config_refuses_plain_http_off_loopback():
    d = h.tempdir()
    sec = os.path.join(d, "s")
    with open(sec, "w") as f:
        f.write("ab" * 32)
    cases = [
        ("http://10.1.2.3:8080", False), ("http://cloud.example:80/x", False),
        ("http://127.0.0.1:8080", True), ("http://127.1.2.3:1", True), ("http://[::1]:8080", True),
        ("https://cloud.example:443", True), ("https://10.1.2.3", True),
        ("http://127.0.0.1@evil.example/", False),
    ]
    for url, ok in cases:
        cfg = h.write_json(os.path.join(d, "e.json"), {
            "spool": {"dir": os.path.join(d, "sp")},
            "upload": {"cloud_url": url, "edge_id": "e1", "secret_file": sec}})
        r = subprocess.run([h.EDGE_BIN, "--config", cfg, "--check-config"], capture_output=True,
                           text=True, timeout=30)
        if ok:
            eq(r.returncode, 0, f"{url}: {r.stderr}")
        else:
            check(r.returncode != 0 and "upload.cloud_url" in r.stderr, f"{url}: {r.stderr!r}")
    bad = h.write_json(os.path.join(d, "e.json"), {
        "spool": {"dir": os.path.join(d, "sp")},
        "scp": {"allowed_peers": "10.0.0.0/8,nonsense"}})
    r = subprocess.run([h.EDGE_BIN, "--config", bad, "--check-config"], capture_output=True,
                       text=True, timeout=30)
    check(r.returncode != 0 and "scp.allowed_peers" in r.stderr, r.stderr)


@test
def edge_recovers_from_a_revoked_token():
    files = env()["files"]
    cloud = h.Cloud()
    edge = h.Edge(cloud)
    r = h.storescu(edge.ae, edge.port, files[:2])
    eq(r.returncode, 0, r.stderr)
    h.wait_until(lambda: [s for _, s in edge_rows(edge)] == ["DONE"] * 2, timeout=60,
                 what="first uploads DONE")
    check(cloud.log_text().count("token issued edge=edge-test") == 1, "one token so far")
    out = cloud.admin("edge-revoke-tokens", "--id", cloud.edge_id)
    check("1 token(s) revoked" in out, out)
    r = h.storescu(edge.ae, edge.port, files[2:])
    eq(r.returncode, 0, r.stderr)
    h.wait_until(lambda: [s for _, s in edge_rows(edge)] == ["DONE"] * len(files), timeout=60,
                 what="uploads after revocation DONE")
    log = cloud.log_text()
    check("code=token_revoked" in log, "the old token was refused")
    check(log.count("token issued edge=edge-test") >= 2, "a new token was issued")
    s = cloud.session()
    m_uid = pydicom.dcmread(files[0]).StudyInstanceUID
    inst = s.get_json(f"/dicomweb/studies/{m_uid}/series/"
                      f"{pydicom.dcmread(files[0]).SeriesInstanceUID}/instances")
    eq(len(inst), len(files), "every instance arrived")
    elog = edge.daemon.tail(2000)
    check("getting a new one" in elog, "edge logged the token renewal")
    for k in token_keys(cloud) + [cloud.secret]:
        check(k not in elog and k not in log, "key material in a log")
    eq(edge.stop(), 0, "edge exit code (ASan clean)")
    eq(cloud.stop(), 0, "cloud exit code (ASan clean)")


if __name__ == "__main__":
    h.run()
