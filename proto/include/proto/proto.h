/*
 * proto.h - the edge <-> cloud protocol, version 1 (see proto/PROTOCOL.md).
 *
 * Pure functions: bytes to structs and back, canonical-request signing. No
 * I/O, no libuv, so both daemons and the fuzzers can call everything here.
 */
#ifndef PROTO_PROTO_H
#define PROTO_PROTO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {   /* the edge's DCMTK shim checks peer addresses with proto_cidr_* */
#endif

#define PROTO_VERSION 1
#define PROTO_UID_MAX 64
#define PROTO_HEX256 64                       /* hex chars of a SHA-256 */
#define PROTO_MAX_OBJECT_SIZE (4ULL << 30)    /* 4 GiB: larger objects are refused */
#define PROTO_MIN_CHUNK (64u << 10)
#define PROTO_MAX_CHUNK (64u << 20)
#define PROTO_MAX_CHUNKS 65536u

/* Header names carried by every signed request. */
#define PROTO_H_VERSION   "X-YY-Version"
#define PROTO_H_EDGE      "X-YY-Edge"
#define PROTO_H_TIMESTAMP "X-YY-Timestamp"
#define PROTO_H_NONCE     "X-YY-Nonce"
#define PROTO_H_BODY_HASH "X-YY-Content-SHA256"
#define PROTO_H_SIGNATURE "X-YY-Signature"
#define PROTO_H_CHUNK_HASH "X-YY-Chunk-SHA256"
#define PROTO_H_TOKEN     "X-YY-Token"        /* token id; absent only on the token request */

#define PROTO_EDGE_ID_MAX 64
#define PROTO_NONCE_HEX 32
#define PROTO_TOKEN_ID_HEX 32                 /* 16 random bytes */
#define PROTO_TOKEN_KEY_LEN 32                /* HMAC key bytes (64 hex digits on the wire) */
#define PROTO_TOKEN_PATH "/api/v1/token"      /* the one request signed with the edge secret */

/* ------------------------------------------------------------- objects */

typedef enum {
    PROTO_KIND_INSTANCE = 1,  /* one DICOM Part 10 file */
    PROTO_KIND_BUNDLE = 2,    /* several instances of one study (proto_bundle_*, PROTOCOL.md) */
} proto_kind_t;

/** Declaration of an object the edge is about to upload. */
typedef struct {
    proto_kind_t kind;
    char sha256[PROTO_HEX256 + 1];      /* of the whole object, lower-case hex */
    uint64_t size;                      /* bytes, 1..PROTO_MAX_OBJECT_SIZE */
    uint32_t chunk_size;                /* proposed; PROTO_MIN_CHUNK..PROTO_MAX_CHUNK */
    char study_uid[PROTO_UID_MAX + 1];
    char series_uid[PROTO_UID_MAX + 1];
    char sop_uid[PROTO_UID_MAX + 1];   /* "" for a bundle */
    uint32_t members;                   /* bundle: member count (1..PROTO_BUNDLE_MAX_MEMBERS); instance: 0 */
} proto_object_decl_t;

typedef enum {
    PROTO_OBJ_OPEN = 1,       /* accepting chunks */
    PROTO_OBJ_COMMITTED = 2,  /* verified and archived */
} proto_obj_state_t;

/*
 * A declaration of kind "bundle" carries study_uid and members; series_uid
 * and sop_uid are "" (encode omits them, decode leaves them empty).
 */

/** The cloud's view of an upload: which chunks it holds. */
typedef struct {
    char object_id[PROTO_HEX256 + 1];
    uint32_t chunk_size;                /* as accepted by the cloud */
    uint32_t nchunks;
    proto_obj_state_t state;
    uint8_t *have;                      /* nchunks bytes, 1 = held; owned, proto_object_status_free */
} proto_object_status_t;

typedef enum {
    PROTO_COMMIT_STORED = 1,      /* new instance archived */
    PROTO_COMMIT_DUPLICATE = 2,   /* identical bytes already archived: stored once */
    PROTO_COMMIT_CONFLICT = 3,    /* same SOP Instance UID, different bytes: kept aside, flagged */
    PROTO_COMMIT_REJECTED = 4,    /* bundle members only: not DICOM, or not what the header says */
} proto_commit_result_t;

typedef struct {
    proto_commit_result_t result;
    char sop_uid[PROTO_UID_MAX + 1];
} proto_commit_t;

typedef struct {
    char code[32];                     /* machine-readable, e.g. "bad_signature" */
    char message[256];
    int64_t server_time;               /* "clock_skew": the cloud's Unix time; else 0 */
} proto_error_t;

/*
 * Encoders return a malloc'd NUL-terminated JSON text (caller frees) or NULL
 * on allocation failure. Decoders validate everything (versions, lengths, hex,
 * UID syntax, bounds) and return 0 or CMN_EPARSE with a reason in err.
 */
char *proto_object_decl_encode(const proto_object_decl_t *d);
int proto_object_decl_decode(const char *json, size_t len, proto_object_decl_t *d,
                             char *err, size_t errlen);

char *proto_object_status_encode(const proto_object_status_t *s);
int proto_object_status_decode(const char *json, size_t len, proto_object_status_t *s,
                               char *err, size_t errlen);
void proto_object_status_free(proto_object_status_t *s);

/** "stored", "duplicate", "conflict", "rejected"; NULL for another value. */
const char *proto_commit_name(proto_commit_result_t r);

/** Encodes a single-instance commit answer (result "rejected" is for bundle members: NULL). */
char *proto_commit_encode(const proto_commit_t *c);
int proto_commit_decode(const char *json, size_t len, proto_commit_t *c, char *err, size_t errlen);

char *proto_error_encode(const char *code, const char *message);
/* 401 clock_skew: a correctly signed request whose timestamp is outside the
 * window; server_time is the cloud's Unix time, for the edge to sign with. */
char *proto_clock_skew_encode(int64_t server_time, const char *message);
int proto_error_decode(const char *json, size_t len, proto_error_t *e);

/* ------------------------------------------------------------- bundles */

/*
 * A bundle (kind "bundle") is one object holding several DICOM Part 10
 * files of one study, so that a CT series is a few round trips, not one per
 * slice. Layout (all of it covered by the object's SHA-256 and chunking):
 *
 *   "YYBNDL01"            8 bytes, magic and format version
 *   json_len              4 bytes, big-endian, 2..PROTO_BUNDLE_MAX_HEADER
 *   header JSON           json_len bytes: {"v":1,"study_uid":..,"members":[
 *                           {"sop_uid":..,"series_uid":..,"sha256":..,"size":N},...]}
 *   member data           the members' files, concatenated in header order
 *
 * A member's offset is PROTO_BUNDLE_PREFIX + json_len + the sizes of the
 * members before it; the bundle's size is exactly the header plus all member
 * sizes. The header comes first so a reader can stream the bundle.
 */
#define PROTO_BUNDLE_MAGIC "YYBNDL01"
#define PROTO_BUNDLE_PREFIX 12u                  /* magic + json_len */
#define PROTO_BUNDLE_MAX_MEMBERS 1024u
#define PROTO_BUNDLE_MAX_HEADER (1u << 20)

typedef struct {
    char sop_uid[PROTO_UID_MAX + 1];
    char series_uid[PROTO_UID_MAX + 1];
    char sha256[PROTO_HEX256 + 1];       /* of the member's bytes */
    uint64_t size;                       /* 1..PROTO_MAX_OBJECT_SIZE */
    uint64_t offset;                     /* from the start of the bundle (set by decode/layout) */
} proto_bundle_member_t;

typedef struct {
    char study_uid[PROTO_UID_MAX + 1];
    uint32_t n;
    proto_bundle_member_t *m;            /* n entries; owned, proto_bundle_free */
    uint64_t header_len;                 /* PROTO_BUNDLE_PREFIX + json_len */
    uint64_t size;                       /* header_len + sum of member sizes */
} proto_bundle_t;

/**
 * Encodes the header (prefix + JSON) of a bundle of b->n members (b->m:
 * uids, sha256, size) and sets b->header_len, b->size and every member's
 * offset. Returns the malloc'd header bytes (b->header_len of them), or NULL
 * when a field is invalid or memory runs out. Deterministic: the same
 * members in the same order give the same bytes.
 */
uint8_t *proto_bundle_header_encode(proto_bundle_t *b);

/** Reads json_len from the first PROTO_BUNDLE_PREFIX bytes. 0 or CMN_EPARSE. */
int proto_bundle_prefix_decode(const uint8_t *p, size_t len, uint32_t *json_len, char *err,
                               size_t errlen);

/**
 * Decodes a whole header (prefix + JSON, len bytes) into b (offsets, sizes
 * set). total is the bundle's declared size: the members must fill it
 * exactly. 0 or CMN_EPARSE (err says why; nothing allocated).
 */
int proto_bundle_header_decode(const uint8_t *p, size_t len, uint64_t total, proto_bundle_t *b,
                               char *err, size_t errlen);
void proto_bundle_free(proto_bundle_t *b);

/** One member's outcome in a bundle commit. */
typedef struct {
    char sop_uid[PROTO_UID_MAX + 1];
    proto_commit_result_t result;
} proto_member_result_t;

/**
 * The commit answer for a bundle: {"v":1,"result":"bundle","members":[
 * {"sop_uid":..,"result":"stored"|"duplicate"|"conflict"|"rejected"},...]}
 * in header order.
 */
typedef struct {
    uint32_t n;
    proto_member_result_t *m;            /* owned, proto_bundle_commit_free */
} proto_bundle_commit_t;

char *proto_bundle_commit_encode(const proto_bundle_commit_t *c);
int proto_bundle_commit_decode(const char *json, size_t len, proto_bundle_commit_t *c, char *err,
                               size_t errlen);
void proto_bundle_commit_free(proto_bundle_commit_t *c);

/* ------------------------------------------------------------ manifest */

/*
 * The study manifest: what the edge holds of a study once all of it is
 * uploaded (POST /api/v1/studies/{study}/manifest). sha256 is the hash of
 * the bytes the edge uploaded for the instance (as archived by the cloud).
 */
#define PROTO_MANIFEST_MAX 20000u

typedef struct {
    char series_uid[PROTO_UID_MAX + 1];
    char sop_uid[PROTO_UID_MAX + 1];
    char sha256[PROTO_HEX256 + 1];
} proto_manifest_entry_t;

typedef struct {
    char study_uid[PROTO_UID_MAX + 1];
    uint32_t n;                          /* 1..PROTO_MANIFEST_MAX */
    proto_manifest_entry_t *e;           /* owned, proto_manifest_free */
} proto_manifest_t;

char *proto_manifest_encode(const proto_manifest_t *m);
int proto_manifest_decode(const char *json, size_t len, proto_manifest_t *m, char *err,
                          size_t errlen);
void proto_manifest_free(proto_manifest_t *m);

/** The cloud's completeness answer for a study with a manifest. */
typedef struct {
    char study_uid[PROTO_UID_MAX + 1];
    uint32_t expected;                   /* instances in the manifest */
    uint32_t received;                   /* of which archived with the same SHA-256 */
    uint32_t missing;                    /* of which not archived at all */
    uint32_t mismatched;                 /* of which archived with other bytes (conflicts) */
    bool complete;                       /* received == expected */
} proto_manifest_status_t;

char *proto_manifest_status_encode(const proto_manifest_status_t *s);
int proto_manifest_status_decode(const char *json, size_t len, proto_manifest_status_t *s,
                                 char *err, size_t errlen);

/* -------------------------------------------------------------- tokens */

/**
 * A short-lived signing key issued by the cloud (POST /api/v1/token, signed
 * with the edge secret). Every other request names the token in X-YY-Token
 * and is signed with its key. Keep keys in memory only; wipe after use.
 */
typedef struct {
    char token_id[PROTO_TOKEN_ID_HEX + 1];   /* lower-case hex */
    uint8_t key[PROTO_TOKEN_KEY_LEN];        /* the HMAC key */
    int64_t expires_at;                      /* unix seconds, cloud clock */
    int64_t ttl_s;                           /* lifetime when issued, seconds (>= 1) */
} proto_token_t;

/** {"v":1,"token_id":..,"key":"<64 hex>","expires_at":N,"ttl_s":N}; malloc'd or NULL. */
char *proto_token_encode(const proto_token_t *t);
/** Decodes a token answer; 0 or CMN_EPARSE (err says why). On failure *t is zeroed. */
int proto_token_decode(const char *json, size_t len, proto_token_t *t, char *err, size_t errlen);
/** The token request body: {"v":1}. malloc'd or NULL. */
char *proto_token_request_encode(void);
/** Checks a token request body (an object with "v":1). 0 or CMN_EPARSE. */
int proto_token_request_decode(const char *json, size_t len, char *err, size_t errlen);

/* ------------------------------------------------------ address lists */

/**
 * Checks a comma-separated list of IPv4/IPv6 CIDR blocks ("10.0.0.0/8,
 * 127.0.0.1, ::1/128"; an address without "/n" is a single host; spaces
 * around items are ignored). NULL or "" is a valid, empty list. 0, or
 * CMN_EPARSE with the offending item in err.
 */
int proto_cidr_list_check(const char *list, char *err, size_t errlen);

/**
 * True when list is empty (everything allowed) or addr (a numeric IPv4 or
 * IPv6 address; IPv4-mapped IPv6 counts as IPv4) is inside one of its
 * blocks. A malformed list or address matches nothing.
 */
bool proto_cidr_list_allows(const char *list, const char *addr);

/** True when addr is a loopback address (127.0.0.0/8, ::1, ::ffff:127.x). */
bool proto_addr_is_loopback(const char *addr);

/** Number of chunks for size bytes at chunk_size (size > 0). */
uint32_t proto_chunk_count(uint64_t size, uint32_t chunk_size);
/** Byte length of chunk i. */
uint32_t proto_chunk_len(uint64_t size, uint32_t chunk_size, uint32_t i);

/** True for a syntactically valid DICOM UID (digits and dots, <= 64 chars). */
bool proto_uid_valid(const char *uid);
/** True for exactly 64 lower-case hex characters. */
bool proto_hex256_valid(const char *s);

/* ------------------------------------------------------------- signing */

/** The signed parts of one request. */
typedef struct {
    const char *method;                 /* "PUT" */
    const char *path;                   /* "/api/v1/objects/ab../chunks/0" */
    const char *query;                  /* raw query without '?', "" or NULL if none */
    const char *edge_id;
    int64_t timestamp;                  /* unix seconds */
    const char *nonce;                  /* PROTO_NONCE_HEX hex chars */
    const char *body_sha256;            /* hex of the body's SHA-256 (of "" when empty) */
} proto_req_t;

/**
 * Builds the canonical request: method, path, query with parameters sorted
 * by name then value, edge id, timestamp, nonce and body hash, one per line.
 * Returns malloc'd text or NULL.
 */
char *proto_canonical_request(const proto_req_t *r);

/** Signature = lower-case hex HMAC-SHA256(secret, canonical request). out: 65 bytes. 0 or error. */
int proto_sign(const uint8_t *secret, size_t secretlen, const proto_req_t *r,
               char out[PROTO_HEX256 + 1]);

typedef enum {
    PROTO_SIG_OK = 0,
    PROTO_SIG_MALFORMED = 1,            /* missing or malformed header values */
    PROTO_SIG_STALE = 2,                /* correctly signed, timestamp outside now +/- max_skew */
    PROTO_SIG_BAD = 3,                  /* signature does not match */
} proto_sig_check_t;

/**
 * Checks a signature (constant-time compare), then the timestamp against
 * now: PROTO_SIG_STALE only for a signature that matches, so that only the
 * holder of the key learns its clock is off. Nonce reuse is the caller's to
 * check (it needs shared storage).
 */
proto_sig_check_t proto_verify(const uint8_t *secret, size_t secretlen, const proto_req_t *r,
                               const char *signature, int64_t now, int64_t max_skew);

#ifdef __cplusplus
}
#endif

#endif /* PROTO_PROTO_H */
