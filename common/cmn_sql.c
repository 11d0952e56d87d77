/*
 * cmn_sql.c - the portable statement API (sql.h) over SQLite and libpq.
 *
 * SQLite: a thin wrapper over sqlite3_stmt. Finalized statements are kept
 * (reset, bindings cleared) in a small per-connection cache keyed by their
 * SQL text, and handed out again by the next prepare of the same text: a
 * WADO-RS retrieval runs the same handful of statements every time, and
 * parsing them was a tenth of the cloud's CPU with 8 connections
 * (tests/bench/bench_dicomweb.sh). Single statements given to exec (BEGIN,
 * COMMIT, PRAGMA) go through the cache too.
 *
 * PostgreSQL: a statement keeps its SQL with placeholders rewritten to $N
 * and its bound values as text (integers are sent typed int8, text as
 * "unknown" so the server infers the type from the context). The first
 * step sends everything with PQexecParams; the whole result is then held
 * and stepped through row by row, so other statements can run on the
 * connection while a result is being read (as with SQLite).
 */
#include "cmn/sql.h"

#include <inttypes.h>
#include <libpq-fe.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cmn/buf.h"
#include "cmn/db.h"
#include "cmn/errors.h"
#include "cmn/log.h"

/* Key of the advisory lock that serialises PostgreSQL writers ("Yuny"). */
#define WRITER_LOCK_KEY 0x59756e79LL
#define OID_INT8 20

#define STMT_CACHE 32           /* SQLite statements kept per connection */

struct cmn_sql {
    cmn_sql_engine_t engine;
    sqlite3 *lite;               /* CMN_SQL_SQLITE; owned */
    cmn_sql_stmt_t *cache[STMT_CACHE]; /* SQLite, most recently finalized first; owned */
    int ncache;
    PGconn *pg;                  /* CMN_SQL_PG; owned */
    int64_t changes;             /* PG: rows changed by the last DML */
    char err[512];               /* PG: last error message */
};

struct cmn_sql_stmt {
    cmn_sql_t *db;
    sqlite3_stmt *lite;          /* SQLite; owned */
    uint32_t hash;               /* SQLite: of the SQL text, for the cache */
    /* PostgreSQL */
    char *sql;                   /* with $N placeholders; owned */
    int nparams;
    char **vals;                 /* [nparams], NULL = SQL NULL; owned */
    Oid *types;                  /* [nparams] */
    PGresult *res;               /* result of the current run; owned */
    int row;                     /* current row, -1 before the first */
    bool ran;                    /* executed since prepare/reset */
};

bool cmn_sql_is_pg_target(const char *target)
{
    return target && (strncmp(target, "postgresql://", 13) == 0 ||
                      strncmp(target, "postgres://", 11) == 0);
}

static void pg_notice(void *arg, const char *msg)
{
    (void)arg;
    CMN_LOG_D("db", "postgres: %s", msg);
}

/* Copies a libpq message without its trailing newline. */
static void set_err(cmn_sql_t *db, const char *msg)
{
    size_t n;

    snprintf(db->err, sizeof(db->err), "%s", msg ? msg : "unknown error");
    n = strlen(db->err);
    while (n > 0 && (db->err[n - 1] == '\n' || db->err[n - 1] == ' '))
        db->err[--n] = '\0';
}

int cmn_sql_open(const char *target, cmn_sql_t **out)
{
    cmn_sql_t *db = cmn_xmalloc(sizeof(*db));

    memset(db, 0, sizeof(*db));
    *out = NULL;
    if (!cmn_sql_is_pg_target(target)) {
        db->engine = CMN_SQL_SQLITE;
        if (cmn_db_open(target, CMN_DB_SYNC_FULL, &db->lite) < 0) {
            free(db);
            return CMN_EDB;
        }
        /* Reads straight from a shared mapping: every write (an audit row
         * per request) discards the page cache of each other connection,
         * which then re-read hundreds of pages per query through pread(2)
         * (bench_dicomweb.sh, 8 connections). Best effort. */
        (void)cmn_db_exec(db->lite, "PRAGMA mmap_size=1073741824");
        *out = db;
        return 0;
    }
    db->engine = CMN_SQL_PG;
    db->pg = PQconnectdb(target);
    if (!db->pg || PQstatus(db->pg) != CONNECTION_OK) {
        /* The URI may hold a password: log libpq's message only. */
        CMN_LOG_E("db", "postgres connect: %s",
                  db->pg ? PQerrorMessage(db->pg) : "out of memory");
        PQfinish(db->pg);
        free(db);
        return CMN_EDB;
    }
    PQsetNoticeProcessor(db->pg, pg_notice, NULL);
    /* Like SQLite's busy timeout: a writer waits for the writer lock, not forever. */
    if (cmn_sql_exec(db, "SET client_min_messages = warning; SET lock_timeout = '30s'") < 0) {
        cmn_sql_close(db);
        return CMN_EDB;
    }
    *out = db;
    return 0;
}

static void stmt_free(cmn_sql_stmt_t *st);

void cmn_sql_close(cmn_sql_t *db)
{
    if (!db)
        return;
    for (int i = 0; i < db->ncache; i++)
        stmt_free(db->cache[i]);
    if (db->lite)
        cmn_db_close(db->lite);
    if (db->pg)
        PQfinish(db->pg);
    free(db);
}

cmn_sql_engine_t cmn_sql_engine(const cmn_sql_t *db)
{
    return db->engine;
}

bool cmn_sql_is_usable(cmn_sql_t *db)
{
    return db->engine == CMN_SQL_SQLITE || PQstatus(db->pg) == CONNECTION_OK;
}

const char *cmn_sql_errmsg(cmn_sql_t *db)
{
    if (db->engine == CMN_SQL_SQLITE)
        return sqlite3_errmsg(db->lite);
    return db->err;
}

int64_t cmn_sql_changes(cmn_sql_t *db)
{
    if (db->engine == CMN_SQL_SQLITE)
        return sqlite3_changes(db->lite);
    return db->changes;
}

/* A PGresult that failed: keeps the message, maps the SQLSTATE. */
static int pg_fail(cmn_sql_t *db, PGresult *res, const char *what)
{
    const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;

    set_err(db, res ? PQresultErrorMessage(res) : PQerrorMessage(db->pg));
    if (state && strncmp(state, "23", 2) == 0) {   /* integrity constraint violation */
        CMN_LOG_D("db", "%s: %s", what, db->err);
        return CMN_ECONFLICT;
    }
    CMN_LOG_E("db", "%s failed: %s", what, db->err);
    return CMN_EDB;
}

/* SQLite: one statement through the cache, several through sqlite3_exec. */
static int lite_exec(cmn_sql_t *db, const char *sql)
{
    const char *semi = strchr(sql, ';');
    cmn_sql_stmt_t *st;
    int rc;

    if (semi && semi[strspn(semi, "; \t\n")] != '\0')
        return cmn_db_exec(db->lite, sql);
    if (cmn_sql_prepare(db, sql, &st) < 0)
        return CMN_EDB;
    while ((rc = cmn_sql_step(st)) == CMN_SQL_ROW)
        ;
    cmn_sql_finalize(st);
    return rc == CMN_SQL_DONE ? 0 : CMN_EDB;
}

int cmn_sql_exec(cmn_sql_t *db, const char *sql)
{
    PGresult *res;
    int rc = 0;

    if (db->engine == CMN_SQL_SQLITE)
        return lite_exec(db, sql);
    res = PQexec(db->pg, sql);
    switch (res ? PQresultStatus(res) : PGRES_FATAL_ERROR) {
    case PGRES_COMMAND_OK:
    case PGRES_TUPLES_OK:
        break;
    default:
        rc = pg_fail(db, res, "exec");
        if (rc != CMN_EDB)
            rc = CMN_EDB;
    }
    PQclear(res);
    return rc;
}

/* ----------------------------------------------------------- SQL rewrite */

static bool is_ident(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '_' || c == '$';
}

/*
 * Rewrites portable SQL for PostgreSQL: "?" -> $k (k counting up), "?N" ->
 * $N, the keyword LIKE -> ILIKE; quoted text and comments are copied as
 * they are. *nparams gets the highest parameter number. NULL on bad SQL.
 */
static char *pg_rewrite(const char *sql, int *nparams)
{
    cmn_buf_t b;
    int seq = 0, max = 0;
    const char *p = sql;

    cmn_buf_init(&b, 1 << 20);
    while (*p) {
        if (*p == '\'' || *p == '"') {
            char q = *p;
            const char *e = p + 1;
            while (*e && !(*e == q && e[1] != q)) {
                if (*e == q)     /* doubled quote */
                    e++;
                e++;
            }
            if (!*e)
                goto bad;
            cmn_buf_append(&b, p, (size_t)(e + 1 - p));
            p = e + 1;
        } else if (p[0] == '-' && p[1] == '-') {
            size_t n = strcspn(p, "\n");
            cmn_buf_append(&b, p, n);
            p += n;
        } else if (*p == '?') {
            int k;
            p++;
            if (*p >= '0' && *p <= '9') {
                k = 0;
                while (*p >= '0' && *p <= '9' && k < 100000)
                    k = k * 10 + (*p++ - '0');
                if (k < 1 || k > 65535)
                    goto bad;
            } else {
                k = ++seq;
            }
            if (k > max)
                max = k;
            cmn_buf_appendf(&b, "$%d", k);
        } else if ((*p == 'L' || *p == 'l') && (p == sql || !is_ident(p[-1])) &&
                   strncasecmp(p, "LIKE", 4) == 0 && !is_ident(p[4])) {
            cmn_buf_appends(&b, "ILIKE");
            p += 4;
        } else {
            size_t n = 1;
            while (p[n] && !strchr("'\"-?lL", p[n]))
                n++;
            cmn_buf_append(&b, p, n);
            p += n;
        }
    }
    if (!b.data)
        return NULL;
    *nparams = max;
    return b.data;   /* ownership passes to the caller */
bad:
    cmn_buf_free(&b);
    return NULL;
}

/* ------------------------------------------------------------ statements */

static uint32_t sql_hash(const char *s)
{
    uint32_t h = 2166136261u;   /* FNV-1a */

    for (; *s; s++)
        h = (h ^ (uint8_t)*s) * 16777619u;
    return h;
}

int cmn_sql_prepare(cmn_sql_t *db, const char *sql, cmn_sql_stmt_t **out)
{
    cmn_sql_stmt_t *st;

    *out = NULL;
    st = cmn_xmalloc(sizeof(*st));
    memset(st, 0, sizeof(*st));
    st->db = db;
    st->row = -1;
    if (db->engine == CMN_SQL_SQLITE) {
        uint32_t h = sql_hash(sql);
        for (int i = 0; i < db->ncache; i++) {
            cmn_sql_stmt_t *c = db->cache[i];
            if (c->hash == h && strcmp(sqlite3_sql(c->lite), sql) == 0) {
                memmove(&db->cache[i], &db->cache[i + 1],
                        sizeof(db->cache[0]) * (size_t)(db->ncache - i - 1));
                db->ncache--;
                free(st);
                *out = c;
                return 0;
            }
        }
        st->hash = h;
        if (cmn_db_prepare(db->lite, sql, &st->lite) < 0) {
            free(st);
            return CMN_EDB;
        }
        *out = st;
        return 0;
    }
    st->sql = pg_rewrite(sql, &st->nparams);
    if (!st->sql) {
        set_err(db, "malformed SQL (quotes or placeholders)");
        CMN_LOG_E("db", "prepare failed: %s", db->err);
        free(st);
        return CMN_EDB;
    }
    if (st->nparams > 0) {
        st->vals = cmn_xmalloc(sizeof(*st->vals) * (size_t)st->nparams);
        st->types = cmn_xmalloc(sizeof(*st->types) * (size_t)st->nparams);
        memset(st->vals, 0, sizeof(*st->vals) * (size_t)st->nparams);
        memset(st->types, 0, sizeof(*st->types) * (size_t)st->nparams);
    }
    *out = st;
    return 0;
}

int cmn_sql_param_count(const cmn_sql_stmt_t *st)
{
    if (st->lite)
        return sqlite3_bind_parameter_count(st->lite);
    return st->nparams;
}

/* PG: replaces parameter i's value (taking ownership of v). */
static void pg_set(cmn_sql_stmt_t *st, int i, char *v, Oid type)
{
    if (!CMN_ALWAYS(i >= 1 && i <= st->nparams)) {
        free(v);
        return;
    }
    free(st->vals[i - 1]);
    st->vals[i - 1] = v;
    st->types[i - 1] = type;
}

void cmn_sql_bind_text(cmn_sql_stmt_t *st, int i, const char *s)
{
    if (st->lite) {
        if (s)
            sqlite3_bind_text(st->lite, i, s, -1, SQLITE_TRANSIENT);
        else
            sqlite3_bind_null(st->lite, i);
        return;
    }
    pg_set(st, i, s ? cmn_xstrdup(s) : NULL, 0);
}

void cmn_sql_bind_textn(cmn_sql_stmt_t *st, int i, const char *s, size_t n)
{
    char *v;

    if (!s) {
        cmn_sql_bind_null(st, i);
        return;
    }
    if (st->lite) {
        sqlite3_bind_text64(st->lite, i, s, n, SQLITE_TRANSIENT, SQLITE_UTF8);
        return;
    }
    v = cmn_xmalloc(n + 1);
    memcpy(v, s, n);
    v[n] = '\0';
    pg_set(st, i, v, 0);
}

void cmn_sql_bind_int64(cmn_sql_stmt_t *st, int i, int64_t v)
{
    char tmp[32];

    if (st->lite) {
        sqlite3_bind_int64(st->lite, i, v);
        return;
    }
    snprintf(tmp, sizeof(tmp), "%" PRId64, v);
    pg_set(st, i, cmn_xstrdup(tmp), OID_INT8);
}

void cmn_sql_bind_null(cmn_sql_stmt_t *st, int i)
{
    if (st->lite)
        sqlite3_bind_null(st->lite, i);
    else
        pg_set(st, i, NULL, 0);
}

static int pg_step(cmn_sql_stmt_t *st)
{
    cmn_sql_t *db = st->db;

    if (!st->ran) {
        PGresult *res;
        ExecStatusType s;

        st->ran = true;
        st->row = -1;
        res = PQexecParams(db->pg, st->sql, st->nparams, st->types,
                           (const char *const *)st->vals, NULL, NULL, 0);
        s = res ? PQresultStatus(res) : PGRES_FATAL_ERROR;
        if (s != PGRES_COMMAND_OK && s != PGRES_TUPLES_OK) {
            int rc = pg_fail(db, res, "statement");
            PQclear(res);
            return rc;
        }
        {
            const char *cmd = PQcmdStatus(res);
            if (strncmp(cmd, "INSERT", 6) == 0 || strncmp(cmd, "UPDATE", 6) == 0 ||
                strncmp(cmd, "DELETE", 6) == 0)
                db->changes = strtoll(PQcmdTuples(res), NULL, 10);
        }
        st->res = res;
    }
    if (!st->res)
        return CMN_SQL_DONE;
    if (st->row + 1 < PQntuples(st->res)) {
        st->row++;
        return CMN_SQL_ROW;
    }
    st->row = PQntuples(st->res);
    return CMN_SQL_DONE;
}

int cmn_sql_step(cmn_sql_stmt_t *st)
{
    int rc;

    if (!st->lite)
        return pg_step(st);
    rc = sqlite3_step(st->lite);
    if (rc == SQLITE_ROW)
        return CMN_SQL_ROW;
    if (rc == SQLITE_DONE)
        return CMN_SQL_DONE;
    if ((rc & 0xff) == SQLITE_CONSTRAINT) {
        CMN_LOG_D("db", "statement: %s", sqlite3_errmsg(st->db->lite));
        return CMN_ECONFLICT;
    }
    CMN_LOG_E("db", "statement failed: %s", sqlite3_errmsg(st->db->lite));
    return CMN_EDB;
}

void cmn_sql_reset(cmn_sql_stmt_t *st)
{
    if (st->lite) {
        sqlite3_reset(st->lite);
        return;
    }
    PQclear(st->res);
    st->res = NULL;
    st->ran = false;
    st->row = -1;
}

void cmn_sql_finalize(cmn_sql_stmt_t *st)
{
    cmn_sql_t *db;

    if (!st)
        return;
    db = st->db;
    if (st->lite) {
        /* Back into the cache, the oldest entry making room. */
        sqlite3_reset(st->lite);
        sqlite3_clear_bindings(st->lite);
        if (db->ncache == STMT_CACHE)
            stmt_free(db->cache[--db->ncache]);
        memmove(&db->cache[1], &db->cache[0], sizeof(db->cache[0]) * (size_t)db->ncache);
        db->cache[0] = st;
        db->ncache++;
        return;
    }
    stmt_free(st);
}

static void stmt_free(cmn_sql_stmt_t *st)
{
    if (st->lite) {
        sqlite3_finalize(st->lite);
    } else {
        PQclear(st->res);
        for (int i = 0; i < st->nparams; i++)
            free(st->vals[i]);
        free(st->vals);
        free(st->types);
        free(st->sql);
    }
    free(st);
}

/* PG: is (row, col) a readable cell of the current row? */
static bool pg_cell(cmn_sql_stmt_t *st, int i)
{
    return st->res && st->row >= 0 && st->row < PQntuples(st->res) && i >= 0 &&
           i < PQnfields(st->res) && !PQgetisnull(st->res, st->row, i);
}

const char *cmn_sql_column_text(cmn_sql_stmt_t *st, int i)
{
    if (st->lite)
        return (const char *)sqlite3_column_text(st->lite, i);
    return pg_cell(st, i) ? PQgetvalue(st->res, st->row, i) : NULL;
}

size_t cmn_sql_column_bytes(cmn_sql_stmt_t *st, int i)
{
    if (st->lite)
        return (size_t)sqlite3_column_bytes(st->lite, i);
    return pg_cell(st, i) ? (size_t)PQgetlength(st->res, st->row, i) : 0;
}

int64_t cmn_sql_column_int64(cmn_sql_stmt_t *st, int i)
{
    const char *v;

    if (st->lite)
        return sqlite3_column_int64(st->lite, i);
    v = pg_cell(st, i) ? PQgetvalue(st->res, st->row, i) : NULL;
    if (!v)
        return 0;
    if (strcmp(v, "t") == 0)   /* a boolean (avoid them; read as SQLite would) */
        return 1;
    return strtoll(v, NULL, 10);
}

int cmn_sql_column_int(cmn_sql_stmt_t *st, int i)
{
    return (int)cmn_sql_column_int64(st, i);
}

bool cmn_sql_column_is_null(cmn_sql_stmt_t *st, int i)
{
    if (st->lite)
        return sqlite3_column_type(st->lite, i) == SQLITE_NULL;
    return !pg_cell(st, i);
}

/* ---------------------------------------------------------- transactions */

int cmn_sql_begin(cmn_sql_t *db)
{
    char sql[96];

    if (db->engine == CMN_SQL_SQLITE)
        return lite_exec(db, "BEGIN IMMEDIATE");
    snprintf(sql, sizeof(sql), "BEGIN; SELECT pg_advisory_xact_lock(%lld)", WRITER_LOCK_KEY);
    if (cmn_sql_exec(db, sql) < 0) {
        cmn_sql_rollback(db);
        return CMN_EDB;
    }
    return 0;
}

int cmn_sql_commit(cmn_sql_t *db)
{
    PGresult *res;
    int rc = 0;

    if (db->engine == CMN_SQL_SQLITE)
        return lite_exec(db, "COMMIT");
    /* COMMIT of a failed transaction "succeeds" as a ROLLBACK: report it. */
    if (PQtransactionStatus(db->pg) == PQTRANS_INERROR) {
        set_err(db, "commit of a failed transaction");
        CMN_LOG_E("db", "%s", db->err);
        cmn_sql_rollback(db);
        return CMN_EDB;
    }
    res = PQexec(db->pg, "COMMIT");
    if (!res || PQresultStatus(res) != PGRES_COMMAND_OK)
        rc = pg_fail(db, res, "commit") < 0 ? CMN_EDB : 0;
    PQclear(res);
    return rc;
}

bool cmn_sql_in_tx(cmn_sql_t *db)
{
    if (db->engine == CMN_SQL_SQLITE)
        return !sqlite3_get_autocommit(db->lite);
    return PQtransactionStatus(db->pg) != PQTRANS_IDLE;
}

void cmn_sql_rollback(cmn_sql_t *db)
{
    if (cmn_sql_in_tx(db))
        (void)cmn_sql_exec(db, "ROLLBACK");
}

/* ------------------------------------------------------------ migrations */

/* The schema version, inside the migration's transaction. */
static int schema_version(cmn_sql_t *db, int64_t *v)
{
    cmn_sql_stmt_t *st;
    int rc;

    if (db->engine == CMN_SQL_PG &&
        cmn_sql_exec(db, "CREATE TABLE IF NOT EXISTS yy_schema_version (version BIGINT NOT NULL);"
                         "INSERT INTO yy_schema_version SELECT 0"
                         " WHERE NOT EXISTS (SELECT 1 FROM yy_schema_version)") < 0)
        return CMN_EDB;
    if (cmn_sql_prepare(db, db->engine == CMN_SQL_PG ? "SELECT version FROM yy_schema_version"
                                                     : "PRAGMA user_version",
                        &st) < 0)
        return CMN_EDB;
    rc = cmn_sql_step(st);
    if (rc == CMN_SQL_ROW)
        *v = cmn_sql_column_int64(st, 0);
    cmn_sql_finalize(st);
    return rc == CMN_SQL_ROW ? 0 : CMN_EDB;
}

int cmn_sql_migrate(cmn_sql_t *db, const cmn_sql_migration_t *migrations, int n)
{
    for (;;) {
        const char *ddl;
        char bump[96];
        int64_t v;

        if (cmn_sql_begin(db) < 0)
            return CMN_EDB;
        /* Read under the writer lock: another process may have migrated meanwhile. */
        if (schema_version(db, &v) < 0)
            goto fail;
        if (v > n) {
            CMN_LOG_E("db", "database schema version %" PRId64 " is newer than this program (%d)",
                      v, n);
            goto fail;
        }
        if (v == n)
            return cmn_sql_commit(db);
        ddl = db->engine == CMN_SQL_PG && migrations[v].pg ? migrations[v].pg
                                                            : migrations[v].sqlite;
        if (db->engine == CMN_SQL_PG)
            snprintf(bump, sizeof(bump), "UPDATE yy_schema_version SET version = %" PRId64, v + 1);
        else
            snprintf(bump, sizeof(bump), "PRAGMA user_version=%" PRId64, v + 1);
        if (cmn_sql_exec(db, ddl) < 0 || cmn_sql_exec(db, bump) < 0) {
            CMN_LOG_E("db", "migration %" PRId64 " failed", v + 1);
            goto fail;
        }
        if (cmn_sql_commit(db) < 0)
            return CMN_EDB;
    }
fail:
    cmn_sql_rollback(db);
    return CMN_EDB;
}
