/*
 * index.c - the cloud's index: SQLite (embedded default) or PostgreSQL, through
 * the portable statement API of cmn/sql.h.
 *
 * Tables:
 *   patients   one row per Patient ID (issuer not modelled yet)
 *   studies    study attributes, and NumberOfStudyRelatedSeries/Instances and
 *              ModalitiesInStudy kept by triggers (migration 8)
 *   series     series attributes, NumberOfSeriesRelatedInstances (triggers)
 *   instances  instance attributes, archive file (path, size, sha256), the
 *              native pixel data byte range and the instance's DICOM JSON
 *              (PS3.18 F) so series metadata is a concatenation of rows
 *   conflicts  same SOP Instance UID with different bytes, kept aside
 *   edges      edge identities, their secrets (stored plainly for now;
 *              encryption at rest is a later issue), enabled flag and
 *              address allow list (CIDR blocks, '' = any address)
 *   tokens     short-lived signing keys issued to edges (the key is kept:
 *              the cloud needs it to verify HMACs; same TODO as secrets),
 *              expiry and revocation checked on every request
 *   nonces     (edge, nonce) seen within the skew window: replay protection
 *   uploads    one row per declared object; chunks: the chunks held
 *   users, sessions (hash of the token only), audit (append-only)
 *
 * Connections are not shared between threads at the same time (SQLite and
 * libpq alike). A small pool hands a connection to one handler thread at a
 * time; each is opened on first use and closed at shutdown. Write
 * transactions serialise writers on both engines (cmn_sql_begin()).
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "cmn/crypto.h"
#include "cmn/sql.h"
#include "cmn/errors.h"
#include "cmn/log.h"
#include "internal.h"

const cmn_conf_opt_t cloud__index_opts[] = {
    CMN_CONF_OPT_STR(cloud_index_conf_t, path, "var/cloud/index.db",
                     "SQLite index database file (created if missing); used when url is empty"),
    CMN_CONF_OPT_STR(cloud_index_conf_t, url, "",
                     "PostgreSQL connection URI (postgresql://user@host:port/db); empty = SQLite"
                     " at path. Keep passwords out of it: use a passfile"),
};
const size_t cloud__index_nopts = CMN_ARRAY_SIZE(cloud__index_opts);

/*
 * Schema versions, each with its SQLite and its PostgreSQL text (same tables,
 * columns and meaning; PostgreSQL integers are BIGINT, rowid keys are
 * identity columns, triggers are plpgsql functions). Append only: a
 * released version never changes.
 */
/* The SQLite audit table's columns: migration 1 made it in index.db,
 * audit_move() makes it in the audit file (index-audit.db). */
#define SQLITE_AUDIT_COLUMNS                       \
    "  id INTEGER PRIMARY KEY,"                    \
    "  ts INTEGER NOT NULL,"                       \
    "  username TEXT NOT NULL,"                    \
    "  action TEXT NOT NULL,"                      \
    "  study_uid TEXT NOT NULL DEFAULT '',"        \
    "  peer TEXT NOT NULL DEFAULT '');"

static const cmn_sql_migration_t migrations[] = {
    /* 1: initial schema */
    { .sqlite =
        "CREATE TABLE patients ("
        "  pk INTEGER PRIMARY KEY,"
        "  patient_id TEXT NOT NULL UNIQUE,"
        "  name TEXT NOT NULL DEFAULT '',"
        "  birth_date TEXT NOT NULL DEFAULT '',"
        "  sex TEXT NOT NULL DEFAULT '');"
        "CREATE INDEX patients_name ON patients(name COLLATE NOCASE);"
        "CREATE TABLE studies ("
        "  study_uid TEXT PRIMARY KEY,"
        "  patient_pk INTEGER NOT NULL REFERENCES patients(pk),"
        "  study_date TEXT NOT NULL DEFAULT '',"
        "  study_time TEXT NOT NULL DEFAULT '',"
        "  accession TEXT NOT NULL DEFAULT '',"
        "  study_id TEXT NOT NULL DEFAULT '',"
        "  description TEXT NOT NULL DEFAULT '',"
        "  referring TEXT NOT NULL DEFAULT '',"
        "  created INTEGER NOT NULL);"
        "CREATE INDEX studies_patient ON studies(patient_pk);"
        "CREATE INDEX studies_date ON studies(study_date);"
        "CREATE INDEX studies_accession ON studies(accession);"
        "CREATE TABLE series ("
        "  series_uid TEXT PRIMARY KEY,"
        "  study_uid TEXT NOT NULL REFERENCES studies(study_uid),"
        "  modality TEXT NOT NULL DEFAULT '',"
        "  series_number INTEGER,"
        "  description TEXT NOT NULL DEFAULT '',"
        "  body_part TEXT NOT NULL DEFAULT '');"
        "CREATE INDEX series_study ON series(study_uid);"
        "CREATE INDEX series_modality ON series(modality);"
        "CREATE TABLE instances ("
        "  sop_uid TEXT PRIMARY KEY,"
        "  series_uid TEXT NOT NULL REFERENCES series(series_uid),"
        "  study_uid TEXT NOT NULL,"
        "  sop_class_uid TEXT NOT NULL DEFAULT '',"
        "  instance_number INTEGER,"
        "  transfer_syntax TEXT NOT NULL DEFAULT '',"
        "  rows INTEGER, columns INTEGER, frames INTEGER,"
        "  bits_allocated INTEGER, samples_per_pixel INTEGER,"
        "  path TEXT NOT NULL,"
        "  size INTEGER NOT NULL,"
        "  sha256 TEXT NOT NULL,"
        "  pixel_offset INTEGER NOT NULL DEFAULT 0,"
        "  pixel_length INTEGER NOT NULL DEFAULT 0,"
        "  json TEXT NOT NULL,"
        "  created INTEGER NOT NULL);"
        "CREATE INDEX instances_series ON instances(series_uid, instance_number);"
        "CREATE INDEX instances_study ON instances(study_uid);"
        "CREATE TABLE conflicts ("
        "  id INTEGER PRIMARY KEY,"
        "  sop_uid TEXT NOT NULL,"
        "  sha256 TEXT NOT NULL,"
        "  path TEXT NOT NULL,"
        "  edge_id TEXT NOT NULL,"
        "  created INTEGER NOT NULL,"
        "  UNIQUE(sop_uid, sha256));"
        "CREATE TABLE edges ("
        "  id TEXT PRIMARY KEY,"
        "  secret TEXT NOT NULL,"        /* hex; TODO: encrypt at rest */
        "  enabled INTEGER NOT NULL DEFAULT 1,"
        "  created INTEGER NOT NULL);"
        "CREATE TABLE nonces ("
        "  edge_id TEXT NOT NULL,"
        "  nonce TEXT NOT NULL,"
        "  ts INTEGER NOT NULL,"
        "  PRIMARY KEY(edge_id, nonce)) WITHOUT ROWID;"
        "CREATE INDEX nonces_ts ON nonces(ts);"
        "CREATE TABLE uploads ("
        "  object_id TEXT PRIMARY KEY,"
        "  edge_id TEXT NOT NULL,"
        "  decl TEXT NOT NULL,"
        "  sha256 TEXT NOT NULL,"
        "  size INTEGER NOT NULL,"
        "  chunk_size INTEGER NOT NULL,"
        "  nchunks INTEGER NOT NULL,"
        "  state TEXT NOT NULL,"          /* open | committed | rejected */
        "  result TEXT,"                  /* stored | duplicate | conflict */
        "  sop_uid TEXT NOT NULL,"
        "  created INTEGER NOT NULL,"
        "  updated INTEGER NOT NULL);"
        "CREATE TABLE chunks ("
        "  object_id TEXT NOT NULL REFERENCES uploads(object_id) ON DELETE CASCADE,"
        "  idx INTEGER NOT NULL,"
        "  sha256 TEXT NOT NULL,"
        "  PRIMARY KEY(object_id, idx)) WITHOUT ROWID;"
        "CREATE TABLE users ("
        "  username TEXT PRIMARY KEY,"
        "  pwhash TEXT NOT NULL,"
        "  role TEXT NOT NULL,"
        "  created INTEGER NOT NULL);"
        "CREATE TABLE sessions ("
        "  token_hash TEXT PRIMARY KEY,"
        "  username TEXT NOT NULL REFERENCES users(username) ON DELETE CASCADE,"
        "  created INTEGER NOT NULL,"
        "  expires INTEGER NOT NULL);"
        "CREATE INDEX sessions_expires ON sessions(expires);"
        "CREATE TABLE audit (" SQLITE_AUDIT_COLUMNS
        "CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit"
        "  BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;"
        "CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit"
        "  BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;",
      .pg =
        "CREATE TABLE patients ("
        "  pk BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,"
        "  patient_id TEXT NOT NULL UNIQUE,"
        "  name TEXT NOT NULL DEFAULT '',"
        "  birth_date TEXT NOT NULL DEFAULT '',"
        "  sex TEXT NOT NULL DEFAULT '');"
        "CREATE INDEX patients_name ON patients(lower(name));"
        "CREATE TABLE studies ("
        "  study_uid TEXT PRIMARY KEY,"
        "  patient_pk BIGINT NOT NULL REFERENCES patients(pk),"
        "  study_date TEXT NOT NULL DEFAULT '',"
        "  study_time TEXT NOT NULL DEFAULT '',"
        "  accession TEXT NOT NULL DEFAULT '',"
        "  study_id TEXT NOT NULL DEFAULT '',"
        "  description TEXT NOT NULL DEFAULT '',"
        "  referring TEXT NOT NULL DEFAULT '',"
        "  created BIGINT NOT NULL);"
        "CREATE INDEX studies_patient ON studies(patient_pk);"
        "CREATE INDEX studies_date ON studies(study_date);"
        "CREATE INDEX studies_accession ON studies(accession);"
        "CREATE TABLE series ("
        "  series_uid TEXT PRIMARY KEY,"
        "  study_uid TEXT NOT NULL REFERENCES studies(study_uid),"
        "  modality TEXT NOT NULL DEFAULT '',"
        "  series_number BIGINT,"
        "  description TEXT NOT NULL DEFAULT '',"
        "  body_part TEXT NOT NULL DEFAULT '');"
        "CREATE INDEX series_study ON series(study_uid);"
        "CREATE INDEX series_modality ON series(modality);"
        "CREATE TABLE instances ("
        "  sop_uid TEXT PRIMARY KEY,"
        "  series_uid TEXT NOT NULL REFERENCES series(series_uid),"
        "  study_uid TEXT NOT NULL,"
        "  sop_class_uid TEXT NOT NULL DEFAULT '',"
        "  instance_number BIGINT,"
        "  transfer_syntax TEXT NOT NULL DEFAULT '',"
        "  rows BIGINT, columns BIGINT, frames BIGINT,"
        "  bits_allocated BIGINT, samples_per_pixel BIGINT,"
        "  path TEXT NOT NULL,"
        "  size BIGINT NOT NULL,"
        "  sha256 TEXT NOT NULL,"
        "  pixel_offset BIGINT NOT NULL DEFAULT 0,"
        "  pixel_length BIGINT NOT NULL DEFAULT 0,"
        "  json TEXT NOT NULL,"
        "  created BIGINT NOT NULL);"
        "CREATE INDEX instances_series ON instances(series_uid, instance_number);"
        "CREATE INDEX instances_study ON instances(study_uid);"
        "CREATE TABLE conflicts ("
        "  id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,"
        "  sop_uid TEXT NOT NULL,"
        "  sha256 TEXT NOT NULL,"
        "  path TEXT NOT NULL,"
        "  edge_id TEXT NOT NULL,"
        "  created BIGINT NOT NULL,"
        "  UNIQUE(sop_uid, sha256));"
        "CREATE TABLE edges ("
        "  id TEXT PRIMARY KEY,"
        "  secret TEXT NOT NULL,"
        "  enabled BIGINT NOT NULL DEFAULT 1,"
        "  created BIGINT NOT NULL);"
        "CREATE TABLE nonces ("
        "  edge_id TEXT NOT NULL,"
        "  nonce TEXT NOT NULL,"
        "  ts BIGINT NOT NULL,"
        "  PRIMARY KEY(edge_id, nonce));"
        "CREATE INDEX nonces_ts ON nonces(ts);"
        "CREATE TABLE uploads ("
        "  object_id TEXT PRIMARY KEY,"
        "  edge_id TEXT NOT NULL,"
        "  decl TEXT NOT NULL,"
        "  sha256 TEXT NOT NULL,"
        "  size BIGINT NOT NULL,"
        "  chunk_size BIGINT NOT NULL,"
        "  nchunks BIGINT NOT NULL,"
        "  state TEXT NOT NULL,"
        "  result TEXT,"
        "  sop_uid TEXT NOT NULL,"
        "  created BIGINT NOT NULL,"
        "  updated BIGINT NOT NULL);"
        "CREATE TABLE chunks ("
        "  object_id TEXT NOT NULL REFERENCES uploads(object_id) ON DELETE CASCADE,"
        "  idx BIGINT NOT NULL,"
        "  sha256 TEXT NOT NULL,"
        "  PRIMARY KEY(object_id, idx));"
        "CREATE TABLE users ("
        "  username TEXT PRIMARY KEY,"
        "  pwhash TEXT NOT NULL,"
        "  role TEXT NOT NULL,"
        "  created BIGINT NOT NULL);"
        "CREATE TABLE sessions ("
        "  token_hash TEXT PRIMARY KEY,"
        "  username TEXT NOT NULL REFERENCES users(username) ON DELETE CASCADE,"
        "  created BIGINT NOT NULL,"
        "  expires BIGINT NOT NULL);"
        "CREATE INDEX sessions_expires ON sessions(expires);"
        "CREATE TABLE audit ("
        "  id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,"
        "  ts BIGINT NOT NULL,"
        "  username TEXT NOT NULL,"
        "  action TEXT NOT NULL,"
        "  study_uid TEXT NOT NULL DEFAULT '',"
        "  peer TEXT NOT NULL DEFAULT '');"
        "CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS"
        "  $$ BEGIN RAISE EXCEPTION 'audit is append-only'; END $$;"
        "CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit"
        "  FOR EACH ROW EXECUTE FUNCTION audit_append_only();"
        "CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit"
        "  FOR EACH ROW EXECUTE FUNCTION audit_append_only();"
        /* SQLite's group_concat(x): values joined with ',' (NULLs skipped). */
        "CREATE FUNCTION yy_group_concat_step(acc TEXT, v TEXT) RETURNS TEXT"
        "  LANGUAGE sql IMMUTABLE AS $$ SELECT CASE WHEN v IS NULL THEN acc"
        "  WHEN acc IS NULL THEN v ELSE acc || ',' || v END $$;"
        "CREATE AGGREGATE group_concat(TEXT) (SFUNC = yy_group_concat_step, STYPE = TEXT);" },

    /* 2: dynamic tokens and per-edge address allow lists (issue 3) */
    { .sqlite =
        "ALTER TABLE edges ADD COLUMN allow TEXT NOT NULL DEFAULT '';"  /* CIDR list, '' = any */
        "CREATE TABLE tokens ("
        "  token_id TEXT PRIMARY KEY,"
        "  edge_id TEXT NOT NULL REFERENCES edges(id) ON DELETE CASCADE,"
        "  key TEXT NOT NULL,"            /* hex HMAC key; TODO: encrypt at rest with the secrets */
        "  created INTEGER NOT NULL,"
        "  expires INTEGER NOT NULL,"
        "  revoked INTEGER NOT NULL DEFAULT 0);"
        "CREATE INDEX tokens_edge ON tokens(edge_id);"
        "CREATE INDEX tokens_expires ON tokens(expires);",
      .pg =
        "ALTER TABLE edges ADD COLUMN allow TEXT NOT NULL DEFAULT '';"
        "CREATE TABLE tokens ("
        "  token_id TEXT PRIMARY KEY,"
        "  edge_id TEXT NOT NULL REFERENCES edges(id) ON DELETE CASCADE,"
        "  key TEXT NOT NULL,"
        "  created BIGINT NOT NULL,"
        "  expires BIGINT NOT NULL,"
        "  revoked BIGINT NOT NULL DEFAULT 0);"
        "CREATE INDEX tokens_edge ON tokens(edge_id);"
        "CREATE INDEX tokens_expires ON tokens(expires);" },

    /* 3: SeriesDate/SeriesTime for QIDO, filled from each instance's DICOM JSON by a
     * trigger (so the insert path stays as it is) and back-filled once here. */
    { .sqlite =
        "ALTER TABLE series ADD COLUMN series_date TEXT NOT NULL DEFAULT '';"
        "ALTER TABLE series ADD COLUMN series_time TEXT NOT NULL DEFAULT '';"
        "UPDATE series SET"
        "  series_date = coalesce((SELECT json_extract(i.json, '$.\"00080021\".Value[0]')"
        "    FROM instances i WHERE i.series_uid = series.series_uid LIMIT 1), ''),"
        "  series_time = coalesce((SELECT json_extract(i.json, '$.\"00080031\".Value[0]')"
        "    FROM instances i WHERE i.series_uid = series.series_uid LIMIT 1), '');"
        "CREATE TRIGGER instances_series_dt AFTER INSERT ON instances BEGIN"
        "  UPDATE series SET"
        "    series_date = coalesce(json_extract(NEW.json, '$.\"00080021\".Value[0]'), ''),"
        "    series_time = coalesce(json_extract(NEW.json, '$.\"00080031\".Value[0]'), '')"
        "  WHERE series_uid = NEW.series_uid; END;",
      .pg =
        "ALTER TABLE series ADD COLUMN series_date TEXT NOT NULL DEFAULT '';"
        "ALTER TABLE series ADD COLUMN series_time TEXT NOT NULL DEFAULT '';"
        "UPDATE series SET"
        "  series_date = coalesce((SELECT i.json::jsonb #>> '{00080021,Value,0}'"
        "    FROM instances i WHERE i.series_uid = series.series_uid LIMIT 1), ''),"
        "  series_time = coalesce((SELECT i.json::jsonb #>> '{00080031,Value,0}'"
        "    FROM instances i WHERE i.series_uid = series.series_uid LIMIT 1), '');"
        "CREATE FUNCTION instances_series_dt() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        "  UPDATE series SET"
        "    series_date = coalesce(NEW.json::jsonb #>> '{00080021,Value,0}', ''),"
        "    series_time = coalesce(NEW.json::jsonb #>> '{00080031,Value,0}', '')"
        "  WHERE series_uid = NEW.series_uid; RETURN NULL; END $$;"
        "CREATE TRIGGER instances_series_dt AFTER INSERT ON instances"
        "  FOR EACH ROW EXECUTE FUNCTION instances_series_dt();" },

    /* 4: the viewer's annotations, one JSON document per user and study (issue 5) */
    { .sqlite =
        "CREATE TABLE annotations ("
        "  username TEXT NOT NULL REFERENCES users(username) ON DELETE CASCADE,"
        "  study_uid TEXT NOT NULL,"
        "  doc TEXT NOT NULL,"
        "  updated INTEGER NOT NULL,"
        "  PRIMARY KEY(username, study_uid));",
      .pg =
        "CREATE TABLE annotations ("
        "  username TEXT NOT NULL REFERENCES users(username) ON DELETE CASCADE,"
        "  study_uid TEXT NOT NULL,"
        "  doc TEXT NOT NULL,"
        "  updated BIGINT NOT NULL,"
        "  PRIMARY KEY(username, study_uid));" },

    /* 5: bundles (several instances per upload object) and study manifests (issue 3) */
    { .sqlite =
        "ALTER TABLE uploads ADD COLUMN kind TEXT NOT NULL DEFAULT 'instance';"  /* instance | bundle */
        "ALTER TABLE uploads ADD COLUMN members TEXT;"   /* a committed bundle's answer (JSON) */
        "CREATE TABLE manifests ("
        "  study_uid TEXT PRIMARY KEY,"
        "  edge_id TEXT NOT NULL,"
        "  expected INTEGER NOT NULL,"
        "  received INTEGER NOT NULL);"                    /* unix seconds */
        "CREATE TABLE manifest_entries ("
        "  study_uid TEXT NOT NULL,"
        "  sop_uid TEXT NOT NULL,"
        "  series_uid TEXT NOT NULL,"
        "  sha256 TEXT NOT NULL,"
        "  PRIMARY KEY(study_uid, sop_uid)) WITHOUT ROWID;",
      .pg =
        "ALTER TABLE uploads ADD COLUMN kind TEXT NOT NULL DEFAULT 'instance';"
        "ALTER TABLE uploads ADD COLUMN members TEXT;"
        "CREATE TABLE manifests ("
        "  study_uid TEXT PRIMARY KEY,"
        "  edge_id TEXT NOT NULL,"
        "  expected BIGINT NOT NULL,"
        "  received BIGINT NOT NULL);"
        "CREATE TABLE manifest_entries ("
        "  study_uid TEXT NOT NULL,"
        "  sop_uid TEXT NOT NULL,"
        "  series_uid TEXT NOT NULL,"
        "  sha256 TEXT NOT NULL,"
        "  PRIMARY KEY(study_uid, sop_uid));" },

    /* 6: retention, scrub and storage report (issue 4, R-1.10). instances.source
     * names who sent an instance (edge id, "stow:<user>"): the storage report's
     * hospital. Filled by cloud_index_set_source() and, for single-instance edge
     * uploads, by a trigger when the upload commits as "stored"; back-filled here. */
    { .sqlite =
        "ALTER TABLE instances ADD COLUMN source TEXT NOT NULL DEFAULT '';"
        "UPDATE instances SET source = coalesce((SELECT u.edge_id FROM uploads u"
        "  WHERE u.sop_uid = instances.sop_uid AND u.state = 'committed'"
        "  AND u.result = 'stored' LIMIT 1), '');"
        "CREATE TRIGGER uploads_instance_source AFTER UPDATE OF state ON uploads"
        "  WHEN NEW.state = 'committed' AND NEW.result = 'stored' BEGIN"
        "  UPDATE instances SET source = NEW.edge_id"
        "    WHERE sop_uid = NEW.sop_uid AND source = ''; END;"
        "CREATE INDEX instances_created ON instances(created);"
        "ALTER TABLE instances ADD COLUMN scrubbed INTEGER NOT NULL DEFAULT 0;"  /* last scrub run id */
        "CREATE INDEX instances_scrubbed ON instances(scrubbed, sop_uid);"
        "CREATE TABLE scrub_runs ("
        "  id INTEGER PRIMARY KEY,"
        "  origin TEXT NOT NULL,"          /* cli | daemon */
        "  state TEXT NOT NULL,"           /* running | done | failed | stopped */
        "  started INTEGER NOT NULL,"
        "  heartbeat INTEGER NOT NULL,"    /* unix seconds, updated while running */
        "  finished INTEGER,"
        "  checked INTEGER NOT NULL DEFAULT 0,"
        "  bytes INTEGER NOT NULL DEFAULT 0,"
        "  mismatches INTEGER NOT NULL DEFAULT 0,"
        "  missing INTEGER NOT NULL DEFAULT 0,"
        "  errors INTEGER NOT NULL DEFAULT 0);"
        "CREATE INDEX scrub_runs_started ON scrub_runs(started);"
        "CREATE TABLE scrub_findings ("
        "  run_id INTEGER NOT NULL REFERENCES scrub_runs(id) ON DELETE CASCADE,"
        "  sop_uid TEXT NOT NULL,"
        "  path TEXT NOT NULL,"
        "  kind TEXT NOT NULL,"            /* mismatch | missing | error | cache-mismatch */
        "  detail TEXT NOT NULL DEFAULT '',"
        "  ts INTEGER NOT NULL);"
        "CREATE INDEX scrub_findings_run ON scrub_findings(run_id);",
      .pg =
        "ALTER TABLE instances ADD COLUMN source TEXT NOT NULL DEFAULT '';"
        "UPDATE instances SET source = coalesce((SELECT u.edge_id FROM uploads u"
        "  WHERE u.sop_uid = instances.sop_uid AND u.state = 'committed'"
        "  AND u.result = 'stored' LIMIT 1), '');"
        "CREATE FUNCTION uploads_instance_source() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        "  UPDATE instances SET source = NEW.edge_id"
        "    WHERE sop_uid = NEW.sop_uid AND source = ''; RETURN NULL; END $$;"
        "CREATE TRIGGER uploads_instance_source AFTER UPDATE OF state ON uploads FOR EACH ROW"
        "  WHEN (NEW.state = 'committed' AND NEW.result = 'stored')"
        "  EXECUTE FUNCTION uploads_instance_source();"
        "CREATE INDEX instances_created ON instances(created);"
        "ALTER TABLE instances ADD COLUMN scrubbed BIGINT NOT NULL DEFAULT 0;"
        "CREATE INDEX instances_scrubbed ON instances(scrubbed, sop_uid);"
        "CREATE TABLE scrub_runs ("
        "  id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,"
        "  origin TEXT NOT NULL,"
        "  state TEXT NOT NULL,"
        "  started BIGINT NOT NULL,"
        "  heartbeat BIGINT NOT NULL,"
        "  finished BIGINT,"
        "  checked BIGINT NOT NULL DEFAULT 0,"
        "  bytes BIGINT NOT NULL DEFAULT 0,"
        "  mismatches BIGINT NOT NULL DEFAULT 0,"
        "  missing BIGINT NOT NULL DEFAULT 0,"
        "  errors BIGINT NOT NULL DEFAULT 0);"
        "CREATE INDEX scrub_runs_started ON scrub_runs(started);"
        "CREATE TABLE scrub_findings ("
        "  run_id BIGINT NOT NULL REFERENCES scrub_runs(id) ON DELETE CASCADE,"
        "  sop_uid TEXT NOT NULL,"
        "  path TEXT NOT NULL,"
        "  kind TEXT NOT NULL,"
        "  detail TEXT NOT NULL DEFAULT '',"
        "  ts BIGINT NOT NULL);"
        "CREATE INDEX scrub_findings_run ON scrub_findings(run_id);" },

    /* 7: the storage report's rows as a view (month archived, UTC: engine functions) */
    { .sqlite =
        "CREATE VIEW storage_report_rows AS SELECT"
        "  CASE WHEN i.source = '' THEN '(unknown)' ELSE i.source END AS hospital,"
        "  CASE WHEN coalesce(se.modality, '') = '' THEN '(none)' ELSE se.modality END"
        "    AS modality,"
        "  strftime('%Y-%m', i.created, 'unixepoch') AS month, i.size AS size"
        " FROM instances i LEFT JOIN series se ON se.series_uid = i.series_uid;",
      .pg =
        "CREATE VIEW storage_report_rows AS SELECT"
        "  CASE WHEN i.source = '' THEN '(unknown)' ELSE i.source END AS hospital,"
        "  CASE WHEN coalesce(se.modality, '') = '' THEN '(none)' ELSE se.modality END"
        "    AS modality,"
        "  to_char(to_timestamp(i.created) AT TIME ZONE 'UTC', 'YYYY-MM') AS month,"
        "  i.size AS size"
        " FROM instances i LEFT JOIN series se ON se.series_uid = i.series_uid;" },

    /* 8: QIDO's derived attributes kept as columns (issue 4: QIDO at a million
     * instances): NumberOfStudyRelatedSeries/Instances, ModalitiesInStudy
     * (distinct non-empty series modalities, sorted, ',' between) and
     * NumberOfSeriesRelatedInstances. Triggers keep them in the transaction
     * that inserts, deletes or moves instances and series (STOW, edge uploads,
     * bundles, retention), with the same definitions as the subqueries they
     * replace (instances count by their own study_uid, series by theirs).
     * instances_series_dt is folded into the insert trigger (one UPDATE of the
     * series per instance). PostgreSQL: the patient name index becomes
     * text_pattern_ops, so prefix matching on lower(name) uses it whatever the
     * database's collation. */
    { .sqlite =
        "ALTER TABLE studies ADD COLUMN num_series INTEGER NOT NULL DEFAULT 0;"
        "ALTER TABLE studies ADD COLUMN num_instances INTEGER NOT NULL DEFAULT 0;"
        "ALTER TABLE studies ADD COLUMN modalities TEXT NOT NULL DEFAULT '';"
        "ALTER TABLE series ADD COLUMN num_instances INTEGER NOT NULL DEFAULT 0;"
        "UPDATE series SET num_instances ="
        "  (SELECT count(*) FROM instances i WHERE i.series_uid = series.series_uid);"
        "UPDATE studies SET"
        "  num_series = (SELECT count(*) FROM series x WHERE x.study_uid = studies.study_uid),"
        "  num_instances = (SELECT count(*) FROM instances x WHERE x.study_uid = studies.study_uid),"
        "  modalities = coalesce((SELECT group_concat(m) FROM (SELECT DISTINCT x.modality AS m"
        "    FROM series x WHERE x.study_uid = studies.study_uid AND x.modality != ''"
        "    ORDER BY m)), '');"
        "DROP TRIGGER instances_series_dt;"
        "CREATE TRIGGER instances_insert AFTER INSERT ON instances BEGIN"
        "  UPDATE series SET"
        "    series_date = coalesce(json_extract(NEW.json, '$.\"00080021\".Value[0]'), ''),"
        "    series_time = coalesce(json_extract(NEW.json, '$.\"00080031\".Value[0]'), ''),"
        "    num_instances = num_instances + 1"
        "  WHERE series_uid = NEW.series_uid;"
        "  UPDATE studies SET num_instances = num_instances + 1 WHERE study_uid = NEW.study_uid;"
        "  END;"
        "CREATE TRIGGER instances_delete AFTER DELETE ON instances BEGIN"
        "  UPDATE series SET num_instances = num_instances - 1 WHERE series_uid = OLD.series_uid;"
        "  UPDATE studies SET num_instances = num_instances - 1 WHERE study_uid = OLD.study_uid;"
        "  END;"
        "CREATE TRIGGER instances_move AFTER UPDATE OF series_uid, study_uid ON instances"
        "  WHEN OLD.series_uid IS NOT NEW.series_uid OR OLD.study_uid IS NOT NEW.study_uid BEGIN"
        "  UPDATE series SET num_instances = num_instances - 1 WHERE series_uid = OLD.series_uid;"
        "  UPDATE studies SET num_instances = num_instances - 1 WHERE study_uid = OLD.study_uid;"
        "  UPDATE series SET num_instances = num_instances + 1 WHERE series_uid = NEW.series_uid;"
        "  UPDATE studies SET num_instances = num_instances + 1 WHERE study_uid = NEW.study_uid;"
        "  END;"
        /* Series inserts are rare (one per series): recount the study outright. */
        "CREATE TRIGGER series_insert AFTER INSERT ON series BEGIN"
        "  UPDATE studies SET num_series = num_series + 1,"
        "    modalities = coalesce((SELECT group_concat(m) FROM (SELECT DISTINCT x.modality AS m"
        "      FROM series x WHERE x.study_uid = NEW.study_uid AND x.modality != ''"
        "      ORDER BY m)), '')"
        "  WHERE study_uid = NEW.study_uid; END;"
        "CREATE TRIGGER series_delete AFTER DELETE ON series BEGIN"
        "  UPDATE studies SET num_series = num_series - 1,"
        "    modalities = coalesce((SELECT group_concat(m) FROM (SELECT DISTINCT x.modality AS m"
        "      FROM series x WHERE x.study_uid = OLD.study_uid AND x.modality != ''"
        "      ORDER BY m)), '')"
        "  WHERE study_uid = OLD.study_uid; END;"
        /* Every instance upserts its series: fires only when something changed. */
        "CREATE TRIGGER series_update AFTER UPDATE OF study_uid, modality ON series"
        "  WHEN OLD.study_uid IS NOT NEW.study_uid OR OLD.modality IS NOT NEW.modality BEGIN"
        "  UPDATE studies SET"
        "    num_series = (SELECT count(*) FROM series x WHERE x.study_uid = studies.study_uid),"
        "    modalities = coalesce((SELECT group_concat(m) FROM (SELECT DISTINCT x.modality AS m"
        "      FROM series x WHERE x.study_uid = studies.study_uid AND x.modality != ''"
        "      ORDER BY m)), '')"
        "  WHERE study_uid IN (OLD.study_uid, NEW.study_uid); END;",
      .pg =
        "ALTER TABLE studies ADD COLUMN num_series BIGINT NOT NULL DEFAULT 0,"
        "  ADD COLUMN num_instances BIGINT NOT NULL DEFAULT 0,"
        "  ADD COLUMN modalities TEXT NOT NULL DEFAULT '';"
        "ALTER TABLE series ADD COLUMN num_instances BIGINT NOT NULL DEFAULT 0;"
        "CREATE FUNCTION yy_study_modalities(uid TEXT) RETURNS TEXT LANGUAGE sql STABLE AS"
        "  $$ SELECT coalesce(string_agg(DISTINCT x.modality, ',' ORDER BY x.modality), '')"
        "  FROM series x WHERE x.study_uid = uid AND x.modality != '' $$;"
        "UPDATE series se SET num_instances = c.n FROM (SELECT series_uid, count(*) AS n"
        "  FROM instances GROUP BY series_uid) c WHERE c.series_uid = se.series_uid;"
        "UPDATE studies s SET num_instances = c.n FROM (SELECT study_uid, count(*) AS n"
        "  FROM instances GROUP BY study_uid) c WHERE c.study_uid = s.study_uid;"
        "UPDATE studies s SET num_series = c.n, modalities = c.m FROM (SELECT study_uid,"
        "  count(*) AS n, coalesce(string_agg(DISTINCT CASE WHEN modality != '' THEN modality"
        "  END, ',' ORDER BY CASE WHEN modality != '' THEN modality END), '') AS m"
        "  FROM series GROUP BY study_uid) c WHERE c.study_uid = s.study_uid;"
        "DROP TRIGGER instances_series_dt ON instances;"
        "DROP FUNCTION instances_series_dt();"
        "CREATE FUNCTION instances_insert() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        "  UPDATE series SET"
        "    series_date = coalesce(NEW.json::jsonb #>> '{00080021,Value,0}', ''),"
        "    series_time = coalesce(NEW.json::jsonb #>> '{00080031,Value,0}', ''),"
        "    num_instances = num_instances + 1"
        "  WHERE series_uid = NEW.series_uid;"
        "  UPDATE studies SET num_instances = num_instances + 1 WHERE study_uid = NEW.study_uid;"
        "  RETURN NULL; END $$;"
        "CREATE TRIGGER instances_insert AFTER INSERT ON instances"
        "  FOR EACH ROW EXECUTE FUNCTION instances_insert();"
        "CREATE FUNCTION instances_delete() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        "  UPDATE series SET num_instances = num_instances - 1 WHERE series_uid = OLD.series_uid;"
        "  UPDATE studies SET num_instances = num_instances - 1 WHERE study_uid = OLD.study_uid;"
        "  RETURN NULL; END $$;"
        "CREATE TRIGGER instances_delete AFTER DELETE ON instances"
        "  FOR EACH ROW EXECUTE FUNCTION instances_delete();"
        "CREATE FUNCTION instances_move() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        "  UPDATE series SET num_instances = num_instances - 1 WHERE series_uid = OLD.series_uid;"
        "  UPDATE studies SET num_instances = num_instances - 1 WHERE study_uid = OLD.study_uid;"
        "  UPDATE series SET num_instances = num_instances + 1 WHERE series_uid = NEW.series_uid;"
        "  UPDATE studies SET num_instances = num_instances + 1 WHERE study_uid = NEW.study_uid;"
        "  RETURN NULL; END $$;"
        "CREATE TRIGGER instances_move AFTER UPDATE OF series_uid, study_uid ON instances"
        "  FOR EACH ROW WHEN (OLD.series_uid IS DISTINCT FROM NEW.series_uid"
        "  OR OLD.study_uid IS DISTINCT FROM NEW.study_uid)"
        "  EXECUTE FUNCTION instances_move();"
        "CREATE FUNCTION series_insert() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        "  UPDATE studies SET num_series = num_series + 1,"
        "    modalities = yy_study_modalities(NEW.study_uid) WHERE study_uid = NEW.study_uid;"
        "  RETURN NULL; END $$;"
        "CREATE TRIGGER series_insert AFTER INSERT ON series"
        "  FOR EACH ROW EXECUTE FUNCTION series_insert();"
        "CREATE FUNCTION series_delete() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        "  UPDATE studies SET num_series = num_series - 1,"
        "    modalities = yy_study_modalities(OLD.study_uid) WHERE study_uid = OLD.study_uid;"
        "  RETURN NULL; END $$;"
        "CREATE TRIGGER series_delete AFTER DELETE ON series"
        "  FOR EACH ROW EXECUTE FUNCTION series_delete();"
        "CREATE FUNCTION series_update() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        "  UPDATE studies SET"
        "    num_series = (SELECT count(*) FROM series x WHERE x.study_uid = studies.study_uid),"
        "    modalities = yy_study_modalities(studies.study_uid)"
        "  WHERE study_uid IN (OLD.study_uid, NEW.study_uid);"
        "  RETURN NULL; END $$;"
        "CREATE TRIGGER series_update AFTER UPDATE OF study_uid, modality ON series"
        "  FOR EACH ROW WHEN (OLD.study_uid IS DISTINCT FROM NEW.study_uid"
        "  OR OLD.modality IS DISTINCT FROM NEW.modality)"
        "  EXECUTE FUNCTION series_update();"
        "DROP INDEX patients_name;"
        "CREATE INDEX patients_name ON patients(lower(name) text_pattern_ops);" },
};

/* ------------------------------------------------------------------- pool */

#define POOL_MAX 32

static struct {
    pthread_mutex_t lock;
    char *target;                /* SQLite file or PostgreSQL URI; owned */
    char *audit_path;            /* SQLite: the audit file, attached as "aud"; owned */
    cmn_sql_t *idle[POOL_MAX];   /* connections not in use */
    int nidle;
    int nopen;                   /* total opened, idle or borrowed */
} pool = { .lock = PTHREAD_MUTEX_INITIALIZER };

int64_t cloud_now(void)
{
    return (int64_t)time(NULL);
}

const char *cloud_index_target(const cloud_index_conf_t *c)
{
    return c->url && *c->url ? c->url : c->path;
}

/*
 * SQLite: the audit table lives in a file of its own ("index-audit.db" next
 * to "index.db"), attached to every connection as "aud"; unqualified
 * "audit" in SQL finds it there, so no statement names the schema. Every
 * retrieval adds an audit row, and SQLite makes each reader drop its page
 * cache and unmap the file whenever the WAL of a database it reads has
 * changed: with the audit in the index file, every retrieval made every
 * other connection fault the index back in (about 11 page faults and a TLB
 * shootdown per request), the cap of WADO-RS with 8 connections
 * (tests/bench/bench_dicomweb.sh). PostgreSQL keeps audit in its one database.
 */
static char *audit_path_of(const char *target)
{
    size_t n = strlen(target);

    if (strcmp(target, ":memory:") == 0)
        return cmn_xstrdup(target);
    if (n > 3 && strcmp(target + n - 3, ".db") == 0)
        n -= 3;
    char *p = cmn_xmalloc(n + sizeof("-audit.db"));
    memcpy(p, target, n);
    memcpy(p + n, "-audit.db", sizeof("-audit.db"));
    return p;
}

static int index_open(const char *target, const char *audit_path, cmn_sql_t **out)
{
    cmn_sql_stmt_t *st;
    int rc;

    rc = cmn_sql_open(target, out);
    if (rc < 0 || cmn_sql_engine(*out) != CMN_SQL_SQLITE)
        return rc;
    rc = cmn_sql_prepare(*out, "ATTACH DATABASE ? AS aud", &st);
    if (rc == 0) {
        cmn_sql_bind_text(st, 1, audit_path);
        rc = cmn_sql_step(st) == CMN_SQL_DONE ? 0 : CMN_EDB;
        cmn_sql_finalize(st);
    }
    /* WAL as the index (a property of the file; a no-op once set). */
    if (rc == 0)
        rc = cmn_sql_exec(*out, "PRAGMA aud.journal_mode=WAL");
    if (rc < 0) {
        CMN_LOG_E("index", "cannot attach the audit database");
        cmn_sql_close(*out);
        *out = NULL;
        return CMN_EDB;
    }
    return 0;
}

/* Does schema.table exist? SQLite only. */
static bool lite_has_table(cmn_sql_t *db, const char *schema_table_sql)
{
    cmn_sql_stmt_t *st;
    bool yes = false;

    if (cmn_sql_prepare(db, schema_table_sql, &st) == 0) {
        yes = cmn_sql_step(st) == CMN_SQL_ROW;
        cmn_sql_finalize(st);
    }
    return yes;
}

/*
 * Moves the audit rows of an index made before the audit file existed (or
 * made by migration 1 just now) into aud.audit. SQLite commits a transaction
 * over two WAL databases one file at a time, so the copy and the drop never
 * share one: first the rows are copied in a transaction that writes only the
 * audit file; then, holding both write locks, main.audit is dropped only if
 * no row was added to it meanwhile (else the copy runs again). A crash
 * anywhere leaves every row in at least one of the two tables, and the next
 * start finishes the move.
 */
static int audit_move(cmn_sql_t *db)
{
    static const char *const create =
        "CREATE TABLE IF NOT EXISTS aud.audit (" SQLITE_AUDIT_COLUMNS
        "CREATE TRIGGER IF NOT EXISTS aud.audit_no_update BEFORE UPDATE ON audit"
        "  BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;"
        "CREATE TRIGGER IF NOT EXISTS aud.audit_no_delete BEFORE DELETE ON audit"
        "  BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;";
    static const char *const copy =
        "INSERT INTO aud.audit SELECT * FROM main.audit"
        " WHERE id > (SELECT coalesce(max(id), 0) FROM aud.audit)";
    static const char *const pending =
        "SELECT 1 FROM main.audit WHERE id > (SELECT coalesce(max(id), 0) FROM aud.audit)";

    if (cmn_sql_exec(db, create) < 0)
        return CMN_EDB;
    for (int tries = 0; tries < 10; tries++) {
        if (!lite_has_table(db, "SELECT 1 FROM main.sqlite_master"
                                " WHERE type = 'table' AND name = 'audit'"))
            return 0;
        if (cmn_sql_exec(db, "BEGIN") < 0 || cmn_sql_exec(db, copy) < 0 ||
            cmn_sql_exec(db, "COMMIT") < 0)
            goto fail;
        if (cmn_sql_begin(db) < 0)
            goto fail;
        if (lite_has_table(db, pending)) {
            cmn_sql_rollback(db);
            continue;
        }
        if (cmn_sql_exec(db, "DROP TABLE main.audit") < 0 || cmn_sql_commit(db) < 0)
            goto fail;
        CMN_LOG_I("index", "audit rows moved to the audit database");
        return 0;
    }
fail:
    cmn_sql_rollback(db);
    CMN_LOG_E("index", "cannot move the audit table to the audit database");
    return CMN_EDB;
}

int cloud_index_init(const char *target)
{
    char *audit_path = cmn_sql_is_pg_target(target) ? NULL : audit_path_of(target);
    cmn_sql_t *db;
    int rc;

    rc = index_open(target, audit_path, &db);
    if (rc < 0) {
        free(audit_path);
        return rc;
    }
    rc = cmn_sql_migrate(db, migrations, (int)CMN_ARRAY_SIZE(migrations));
    if (rc == 0 && audit_path)
        rc = audit_move(db);
    if (rc < 0) {
        cmn_sql_close(db);
        free(audit_path);
        return rc;
    }
    pthread_mutex_lock(&pool.lock);
    free(pool.target);
    free(pool.audit_path);
    pool.target = cmn_xstrdup(target);
    pool.audit_path = audit_path;
    pool.idle[pool.nidle++] = db;
    pool.nopen++;
    pthread_mutex_unlock(&pool.lock);
    return 0;
}

void cloud_index_shutdown(void)
{
    pthread_mutex_lock(&pool.lock);
    while (pool.nidle > 0) {
        cmn_sql_close(pool.idle[--pool.nidle]);
        pool.nopen--;
    }
    if (pool.nopen != 0)
        CMN_LOG_W("index", "shutdown with borrowed connections n=%d", pool.nopen);
    pool.nopen = 0;
    free(pool.target);
    free(pool.audit_path);
    pool.target = NULL;
    pool.audit_path = NULL;
    pthread_mutex_unlock(&pool.lock);
}

cmn_sql_t *cloud_index_get(void)
{
    cmn_sql_t *db = NULL;
    char *target, *audit_path;

    pthread_mutex_lock(&pool.lock);
    if (pool.nidle > 0) {
        db = pool.idle[--pool.nidle];
        pthread_mutex_unlock(&pool.lock);
        return db;
    }
    target = pool.target ? cmn_xstrdup(pool.target) : NULL;
    audit_path = pool.audit_path ? cmn_xstrdup(pool.audit_path) : NULL;
    pthread_mutex_unlock(&pool.lock);
    if (!target)
        return NULL;
    if (index_open(target, audit_path, &db) < 0)
        db = NULL;
    free(target);
    free(audit_path);
    if (db) {
        pthread_mutex_lock(&pool.lock);
        pool.nopen++;
        pthread_mutex_unlock(&pool.lock);
    }
    return db;
}

void cloud_index_put(cmn_sql_t *db)
{
    if (!db)
        return;
    /* A handler that failed mid-transaction must not leak it to the next user. */
    if (cmn_sql_is_usable(db))
        cmn_sql_rollback(db);
    pthread_mutex_lock(&pool.lock);
    /* A lost connection (database restarted) is closed; the next get opens one. */
    if (pool.nidle < POOL_MAX && cmn_sql_is_usable(db)) {
        pool.idle[pool.nidle++] = db;
        db = NULL;
    } else {
        pool.nopen--;
    }
    pthread_mutex_unlock(&pool.lock);
    if (db)
        cmn_sql_close(db);
}

int cloud_index_begin(cmn_sql_t *db)
{
    return cmn_sql_begin(db);
}

int cloud_index_commit(cmn_sql_t *db)
{
    return cmn_sql_commit(db);
}

void cloud_index_rollback(cmn_sql_t *db)
{
    cmn_sql_rollback(db);
}

/* ---------------------------------------------------------------- queries */

static void bind_text(cmn_sql_stmt_t *st, int i, const char *s)
{
    cmn_sql_bind_text(st, i, s ? s : "");
}

static void bind_opt_int(cmn_sql_stmt_t *st, int i, int v)
{
    if (v < 0)
        cmn_sql_bind_null(st, i);
    else
        cmn_sql_bind_int64(st, i, v);
}

static int step_done(cmn_sql_t *db, cmn_sql_stmt_t *st, const char *what)
{
    int rc = cmn_sql_step(st);

    if (rc != CMN_SQL_DONE && rc != CMN_SQL_ROW) {
        CMN_LOG_E("index", "%s: %s", what, cmn_sql_errmsg(db));
        return CMN_EDB;
    }
    return 0;
}

int cloud_index_find_instance(cmn_sql_t *db, const char *sop_uid, cloud_instance_ref_t *out)
{
    cmn_sql_stmt_t *st;
    int rc;

    if (cmn_sql_prepare(db, "SELECT sha256, path, size FROM instances WHERE sop_uid = ?", &st) < 0)
        return CMN_EDB;
    bind_text(st, 1, sop_uid);
    rc = cmn_sql_step(st);
    if (rc == CMN_SQL_ROW) {
        snprintf(out->sha256, sizeof(out->sha256), "%s", cmn_sql_column_text(st, 0));
        snprintf(out->path, sizeof(out->path), "%s", cmn_sql_column_text(st, 1));
        out->size = (uint64_t)cmn_sql_column_int64(st, 2);
        rc = 0;
    } else if (rc == CMN_SQL_DONE) {
        rc = CMN_ENOTFOUND;
    } else {
        CMN_LOG_E("index", "find instance: %s", cmn_sql_errmsg(db));
        rc = CMN_EDB;
    }
    cmn_sql_finalize(st);
    return rc;
}

static int upsert_patient(cmn_sql_t *db, const cmn_dicom_info_t *in, int64_t *pk)
{
    cmn_sql_stmt_t *st;
    int rc;

    /* The latest instance's demographics win (corrections arrive later). */
    if (cmn_sql_prepare(db,
                       "INSERT INTO patients(patient_id, name, birth_date, sex) VALUES(?,?,?,?)"
                       " ON CONFLICT(patient_id) DO UPDATE SET name = excluded.name,"
                       " birth_date = excluded.birth_date, sex = excluded.sex"
                       " RETURNING pk",
                       &st) < 0)
        return CMN_EDB;
    bind_text(st, 1, in->patient_id);
    bind_text(st, 2, in->patient_name);
    bind_text(st, 3, in->patient_birth_date);
    bind_text(st, 4, in->patient_sex);
    rc = cmn_sql_step(st);
    if (rc == CMN_SQL_ROW) {
        *pk = cmn_sql_column_int64(st, 0);
        rc = 0;
    } else {
        CMN_LOG_E("index", "patient upsert: %s", cmn_sql_errmsg(db));
        rc = CMN_EDB;
    }
    cmn_sql_finalize(st);
    return rc;
}

int cloud_index_add_instance(cmn_sql_t *db, const cmn_dicom_info_t *in, const char *path,
                             uint64_t size, const char *sha256, const char *json)
{
    cmn_sql_stmt_t *st = NULL;
    int64_t ppk;
    int rc;

    rc = upsert_patient(db, in, &ppk);
    if (rc < 0)
        return rc;

    rc = CMN_EDB;
    if (cmn_sql_prepare(db,
                       "INSERT INTO studies(study_uid, patient_pk, study_date, study_time,"
                       " accession, study_id, description, referring, created)"
                       " VALUES(?,?,?,?,?,?,?,?,?) ON CONFLICT(study_uid) DO UPDATE SET"
                       " patient_pk = excluded.patient_pk, study_date = excluded.study_date,"
                       " study_time = excluded.study_time, accession = excluded.accession,"
                       " study_id = excluded.study_id, description = excluded.description,"
                       " referring = excluded.referring",
                       &st) < 0)
        return CMN_EDB;
    bind_text(st, 1, in->study_uid);
    cmn_sql_bind_int64(st, 2, ppk);
    bind_text(st, 3, in->study_date);
    bind_text(st, 4, in->study_time);
    bind_text(st, 5, in->accession);
    bind_text(st, 6, in->study_id);
    bind_text(st, 7, in->study_description);
    bind_text(st, 8, in->referring_physician);
    cmn_sql_bind_int64(st, 9, cloud_now());
    if (step_done(db, st, "study upsert") < 0)
        goto out;
    cmn_sql_finalize(st);
    st = NULL;

    if (cmn_sql_prepare(db,
                       "INSERT INTO series(series_uid, study_uid, modality, series_number,"
                       " description, body_part) VALUES(?,?,?,?,?,?)"
                       " ON CONFLICT(series_uid) DO UPDATE SET modality = excluded.modality,"
                       " series_number = excluded.series_number,"
                       " description = excluded.description, body_part = excluded.body_part",
                       &st) < 0)
        goto out;
    bind_text(st, 1, in->series_uid);
    bind_text(st, 2, in->study_uid);
    bind_text(st, 3, in->modality);
    bind_opt_int(st, 4, in->series_number);
    bind_text(st, 5, in->series_description);
    bind_text(st, 6, in->body_part);
    if (step_done(db, st, "series upsert") < 0)
        goto out;
    cmn_sql_finalize(st);
    st = NULL;

    if (cmn_sql_prepare(db,
                       "INSERT INTO instances(sop_uid, series_uid, study_uid, sop_class_uid,"
                       " instance_number, transfer_syntax, rows, columns, frames,"
                       " bits_allocated, samples_per_pixel, path, size, sha256,"
                       " pixel_offset, pixel_length, json, created)"
                       " VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                       &st) < 0)
        goto out;
    bind_text(st, 1, in->sop_uid);
    bind_text(st, 2, in->series_uid);
    bind_text(st, 3, in->study_uid);
    bind_text(st, 4, in->sop_class_uid);
    bind_opt_int(st, 5, in->instance_number);
    bind_text(st, 6, in->transfer_syntax);
    cmn_sql_bind_int64(st, 7, in->rows);
    cmn_sql_bind_int64(st, 8, in->columns);
    cmn_sql_bind_int64(st, 9, in->number_of_frames > 0 ? in->number_of_frames : 1);
    cmn_sql_bind_int64(st, 10, in->bits_allocated);
    cmn_sql_bind_int64(st, 11, in->samples_per_pixel);
    bind_text(st, 12, path);
    cmn_sql_bind_int64(st, 13, (int64_t)size);
    bind_text(st, 14, sha256);
    cmn_sql_bind_int64(st, 15, (int64_t)in->pixel_offset);
    cmn_sql_bind_int64(st, 16, (int64_t)in->pixel_length);
    bind_text(st, 17, json);
    cmn_sql_bind_int64(st, 18, cloud_now());
    if (step_done(db, st, "instance insert") < 0)
        goto out;
    rc = 0;
out:
    cmn_sql_finalize(st);
    return rc;
}

int cloud_index_add_conflict(cmn_sql_t *db, const char *sop_uid, const char *sha256,
                             const char *path, const char *edge_id)
{
    cmn_sql_stmt_t *st;
    int rc;

    if (cmn_sql_prepare(db,
                       "INSERT INTO conflicts(sop_uid, sha256, path, edge_id, created)"
                       " VALUES(?,?,?,?,?) ON CONFLICT(sop_uid, sha256) DO NOTHING",
                       &st) < 0)
        return CMN_EDB;
    bind_text(st, 1, sop_uid);
    bind_text(st, 2, sha256);
    bind_text(st, 3, path);
    bind_text(st, 4, edge_id);
    cmn_sql_bind_int64(st, 5, cloud_now());
    rc = step_done(db, st, "conflict insert");
    cmn_sql_finalize(st);
    return rc;
}

void cloud_index_audit(cmn_sql_t *db, const char *user, const char *action,
                       const char *study_uid, const char *peer)
{
    cmn_sql_stmt_t *st;

    if (cmn_sql_prepare(db,
                       "INSERT INTO audit(ts, username, action, study_uid, peer)"
                       " VALUES(?,?,?,?,?)",
                       &st) < 0)
        return;
    cmn_sql_bind_int64(st, 1, cloud_now());
    bind_text(st, 2, user);
    bind_text(st, 3, action);
    bind_text(st, 4, study_uid);
    bind_text(st, 5, peer);
    (void)step_done(db, st, "audit insert");
    cmn_sql_finalize(st);
}

/*
 * Group commit of audit rows. Every request still returns only after its row
 * is committed, but concurrent requests share one transaction (one WAL fsync)
 * instead of queueing for SQLite's write lock one by one (whose busy handler
 * sleeps in millisecond steps): with 8 connections this was the bottleneck.
 * The first waiting handler becomes the leader and writes everything queued
 * with its own connection; the others wait for the commit.
 */
#define AUDIT_BATCH 256

typedef struct {
    char user[CLOUD_USER_MAX + 1];
    char action[32];
    char study[65];
    char peer[64];
} audit_row_t;

static struct {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    audit_row_t q[AUDIT_BATCH];  /* queued, not yet taken by a leader */
    int n;
    uint64_t queued;             /* rows ever queued */
    uint64_t done;               /* rows ever written (or given up on) */
    bool flushing;               /* a leader is writing */
} aud = { .lock = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER };

/*
 * Durability of audit rows. Each request still returns only after its row is
 * committed (a crash of the process loses none), but a commit is flushed to
 * disk at most once per AUDIT_SYNC_MS: the other batches commit without an
 * fsync (SQLite WAL with synchronous=NORMAL; PostgreSQL synchronous_commit
 * off, which its WAL writer flushes within a fraction of a second). A power
 * failure may lose the audit rows of the last AUDIT_SYNC_MS, the window
 * syslog-based audit (IHE ATNA) accepts as well; an fsync per retrieval was
 * what capped WADO-RS with 8 connections (tests/bench/bench_dicomweb.sh).
 */
#define AUDIT_SYNC_MS 1000

static uint64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static void audit_write(cmn_sql_t *db, const audit_row_t *rows, int n)
{
    static uint64_t last_sync_ms;           /* under aud.flushing: one writer at a time */
    uint64_t now = mono_ms();
    bool sync = last_sync_ms == 0 || now - last_sync_ms >= AUDIT_SYNC_MS;
    bool lite = cmn_sql_engine(db) == CMN_SQL_SQLITE;

    if (!sync && lite)
        cmn_sql_exec(db, "PRAGMA aud.synchronous=NORMAL");
    bool tx = cloud_index_begin(db) == 0;
    if (tx && !sync && !lite)
        cmn_sql_exec(db, "SET LOCAL synchronous_commit TO OFF");
    for (int i = 0; i < n; i++)
        cloud_index_audit(db, rows[i].user, rows[i].action, rows[i].study, rows[i].peer);
    if (tx && cloud_index_commit(db) < 0) {
        /* Rows of a failed batch are written one by one (best effort, as before). */
        cloud_index_rollback(db);
        for (int i = 0; i < n; i++)
            cloud_index_audit(db, rows[i].user, rows[i].action, rows[i].study, rows[i].peer);
    }
    if (!sync && lite)
        cmn_sql_exec(db, "PRAGMA aud.synchronous=FULL");
    if (sync)
        last_sync_ms = now;
}

void cloud_index_audit_commit(cmn_sql_t *db, const char *user, const char *action,
                              const char *study, const char *peer)
{
    audit_row_t *batch = NULL;
    uint64_t mine;

    pthread_mutex_lock(&aud.lock);
    while (aud.n == AUDIT_BATCH)
        pthread_cond_wait(&aud.cond, &aud.lock);
    audit_row_t *r = &aud.q[aud.n++];
    snprintf(r->user, sizeof(r->user), "%s", user);
    snprintf(r->action, sizeof(r->action), "%s", action);
    snprintf(r->study, sizeof(r->study), "%s", study ? study : "");
    snprintf(r->peer, sizeof(r->peer), "%s", peer);
    mine = ++aud.queued;
    while (aud.done < mine) {
        if (aud.flushing) {
            pthread_cond_wait(&aud.cond, &aud.lock);
            continue;
        }
        int n = aud.n;
        uint64_t last = aud.queued;
        if (!batch)
            batch = cmn_xmalloc(sizeof(*batch) * AUDIT_BATCH);
        memcpy(batch, aud.q, sizeof(*batch) * (size_t)n);
        aud.n = 0;
        aud.flushing = true;
        pthread_cond_broadcast(&aud.cond);   /* room in the queue again */
        pthread_mutex_unlock(&aud.lock);
        audit_write(db, batch, n);
        pthread_mutex_lock(&aud.lock);
        aud.done = last;
        aud.flushing = false;
        pthread_cond_broadcast(&aud.cond);
    }
    pthread_mutex_unlock(&aud.lock);
    free(batch);
}

int cloud_index_edge_add(cmn_sql_t *db, const char *edge_id, const char *allow,
                         char secret_hex[65])
{
    uint8_t secret[32];
    cmn_sql_stmt_t *st;
    int rc;

    if (cmn_random(secret, sizeof(secret)) < 0)
        return CMN_ECRYPTO;
    cmn_hex(secret, sizeof(secret), secret_hex);
    if (cmn_sql_prepare(db, "INSERT INTO edges(id, secret, allow, created) VALUES(?,?,?,?)",
                       &st) < 0)
        return CMN_EDB;
    bind_text(st, 1, edge_id);
    bind_text(st, 2, secret_hex);
    bind_text(st, 3, allow);
    cmn_sql_bind_int64(st, 4, cloud_now());
    rc = cmn_sql_step(st);
    if (rc == CMN_SQL_DONE)
        rc = 0;
    else if (rc == CMN_ECONFLICT)
        rc = CMN_ECONFLICT;
    else {
        CMN_LOG_E("index", "edge insert: %s", cmn_sql_errmsg(db));
        rc = CMN_EDB;
    }
    cmn_sql_finalize(st);
    memset(secret, 0, sizeof(secret));
    return rc;
}

int cloud_index_edge_get(cmn_sql_t *db, const char *edge_id, cloud_edge_t *out)
{
    cmn_sql_stmt_t *st;
    int rc;

    memset(out, 0, sizeof(*out));
    if (cmn_sql_prepare(db, "SELECT secret, enabled, allow FROM edges WHERE id = ?", &st) < 0)
        return CMN_EDB;
    bind_text(st, 1, edge_id);
    rc = cmn_sql_step(st);
    if (rc == CMN_SQL_ROW) {
        const char *sec = cmn_sql_column_text(st, 0);
        const char *allow = cmn_sql_column_text(st, 2);
        snprintf(out->secret_hex, sizeof(out->secret_hex), "%s", sec ? sec : "");
        out->enabled = cmn_sql_column_int(st, 1) != 0;
        out->allow = cmn_xstrdup(allow ? allow : "");
        rc = 0;
    } else if (rc == CMN_SQL_DONE) {
        rc = CMN_ENOTFOUND;
    } else {
        CMN_LOG_E("index", "edge lookup: %s", cmn_sql_errmsg(db));
        rc = CMN_EDB;
    }
    cmn_sql_finalize(st);
    return rc;
}

void cloud_edge_clear(cloud_edge_t *e)
{
    free(e->allow);
    memset(e, 0, sizeof(*e));
}

/* Runs an UPDATE bound to (value?, edge id); 0, CMN_ENOTFOUND, CMN_EDB. */
static int edge_update(cmn_sql_t *db, const char *sql, const char *text, const char *edge_id,
                       int *changed)
{
    cmn_sql_stmt_t *st;
    int rc, i = 1;

    if (cmn_sql_prepare(db, sql, &st) < 0)
        return CMN_EDB;
    if (text)
        bind_text(st, i++, text);
    bind_text(st, i, edge_id);
    rc = cmn_sql_step(st);
    cmn_sql_finalize(st);
    if (rc != CMN_SQL_DONE) {
        CMN_LOG_E("index", "edge update: %s", cmn_sql_errmsg(db));
        return CMN_EDB;
    }
    if (changed)
        *changed = cmn_sql_changes(db);
    return 0;
}

static int edge_exists(cmn_sql_t *db, const char *edge_id)
{
    cloud_edge_t e;
    int rc = cloud_index_edge_get(db, edge_id, &e);
    cloud_edge_clear(&e);
    return rc;
}

int cloud_index_edge_set_enabled(cmn_sql_t *db, const char *edge_id, bool enabled, int *revoked)
{
    int rc = edge_exists(db, edge_id);

    if (revoked)
        *revoked = 0;
    if (rc < 0)
        return rc;
    if (cloud_index_begin(db) < 0)
        return CMN_EDB;
    rc = edge_update(db, enabled ? "UPDATE edges SET enabled = 1 WHERE id = ?"
                                 : "UPDATE edges SET enabled = 0 WHERE id = ?",
                     NULL, edge_id, NULL);
    if (rc == 0 && !enabled)
        rc = edge_update(db, "UPDATE tokens SET revoked = 1 WHERE edge_id = ? AND revoked = 0",
                         NULL, edge_id, revoked);
    if (rc < 0 || cloud_index_commit(db) < 0) {
        cloud_index_rollback(db);
        return CMN_EDB;
    }
    return 0;
}

int cloud_index_edge_set_allow(cmn_sql_t *db, const char *edge_id, const char *allow)
{
    int rc = edge_exists(db, edge_id);

    if (rc < 0)
        return rc;
    return edge_update(db, "UPDATE edges SET allow = ? WHERE id = ?", allow, edge_id, NULL);
}

/* ----------------------------------------------------------------- tokens */

int cloud_index_token_add(cmn_sql_t *db, const char *edge_id, const char *token_id,
                          const char *key_hex, int64_t expires)
{
    cmn_sql_stmt_t *st;
    int rc;

    if (cmn_sql_prepare(db,
                       "INSERT INTO tokens(token_id, edge_id, key, created, expires)"
                       " VALUES(?,?,?,?,?)",
                       &st) < 0)
        return CMN_EDB;
    bind_text(st, 1, token_id);
    bind_text(st, 2, edge_id);
    bind_text(st, 3, key_hex);
    cmn_sql_bind_int64(st, 4, cloud_now());
    cmn_sql_bind_int64(st, 5, expires);
    rc = step_done(db, st, "token insert");
    cmn_sql_finalize(st);
    return rc;
}

int cloud_index_token_get(cmn_sql_t *db, const char *token_id, cloud_token_t *out)
{
    cmn_sql_stmt_t *st;
    int rc;

    memset(out, 0, sizeof(*out));
    if (cmn_sql_prepare(db, "SELECT edge_id, key, expires, revoked FROM tokens WHERE token_id = ?",
                       &st) < 0)
        return CMN_EDB;
    bind_text(st, 1, token_id);
    rc = cmn_sql_step(st);
    if (rc == CMN_SQL_ROW) {
        const char *e = cmn_sql_column_text(st, 0);
        const char *k = cmn_sql_column_text(st, 1);
        snprintf(out->edge_id, sizeof(out->edge_id), "%s", e ? e : "");
        snprintf(out->key_hex, sizeof(out->key_hex), "%s", k ? k : "");
        out->expires = cmn_sql_column_int64(st, 2);
        out->revoked = cmn_sql_column_int(st, 3) != 0;
        rc = 0;
    } else if (rc == CMN_SQL_DONE) {
        rc = CMN_ENOTFOUND;
    } else {
        CMN_LOG_E("index", "token lookup: %s", cmn_sql_errmsg(db));
        rc = CMN_EDB;
    }
    cmn_sql_finalize(st);
    return rc;
}

int cloud_index_tokens_revoke(cmn_sql_t *db, const char *edge_id, int *n)
{
    int rc = edge_exists(db, edge_id);

    *n = 0;
    if (rc < 0)
        return rc;
    return edge_update(db, "UPDATE tokens SET revoked = 1 WHERE edge_id = ? AND revoked = 0",
                       NULL, edge_id, n);
}

void cloud_index_tokens_cleanup(cmn_sql_t *db, int64_t before)
{
    cmn_sql_stmt_t *st;

    if (cmn_sql_prepare(db, "DELETE FROM tokens WHERE expires < ?", &st) < 0)
        return;
    cmn_sql_bind_int64(st, 1, before);
    (void)step_done(db, st, "token cleanup");
    cmn_sql_finalize(st);
}

/* ------------------------------------------------ retention, scrub, report */

int cloud_index_set_source(cmn_sql_t *db, const char *sop_uid, const char *source)
{
    cmn_sql_stmt_t *st;

    if (cmn_sql_prepare(db, "UPDATE instances SET source = ? WHERE sop_uid = ?", &st) < 0)
        return CMN_EDB;
    bind_text(st, 1, source ? source : "");
    bind_text(st, 2, sop_uid);
    int rc = step_done(db, st, "instance source");
    cmn_sql_finalize(st);
    return rc;
}
