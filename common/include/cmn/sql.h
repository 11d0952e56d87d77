/*
 * sql.h - one statement API over two database engines: SQLite (embedded
 * default) and PostgreSQL (libpq, for several processes sharing one index).
 *
 * The calls mirror SQLite's prepare/bind/step/column/reset/finalize, so the
 * code above this layer is written once and never learns which engine it
 * talks to. The target string picks the engine: "postgresql://..." or
 * "postgres://..." (a libpq connection URI) selects PostgreSQL, anything
 * else is a SQLite database file (opened in WAL mode).
 *
 * Portable SQL. Write SQL both engines accept:
 *   - placeholders "?" (numbered in order) or "?N" (may repeat); PostgreSQL
 *     receives them as $N. Never mix the two forms in one statement.
 *   - LIKE is case-insensitive for ASCII on both (SQLite's rule; sent to
 *     PostgreSQL as ILIKE, which is ASCII-only in a database with LC_CTYPE C).
 *   - INSERT ... ON CONFLICT (cols) DO NOTHING | DO UPDATE SET x = excluded.x
 *     instead of INSERT OR IGNORE / OR REPLACE; RETURNING instead of
 *     last_insert_rowid(); CASE instead of two-argument max()/min(); no
 *     booleans in results or sums (sum(CASE WHEN ... THEN 1 ELSE 0 END)).
 *   - PostgreSQL infers a text parameter's type from where it is used: one
 *     whose only use says nothing (?1 IS NULL) needs CAST(?1 AS TEXT).
 *   - group_concat(x) exists on both (the PostgreSQL schema defines it).
 *   - integers are 64-bit (PostgreSQL columns are BIGINT); text compares and
 *     sorts bytewise when the PostgreSQL database uses collation "C".
 *   - NULL sorts first in ascending order in SQLite, last in PostgreSQL: say
 *     NULLS FIRST where it matters (both accept it).
 * Schema text differs per engine (types, triggers): see cmn_sql_migrate().
 *
 * Threads: a connection and its statements are used by one thread at a
 * time. Every call blocks: never call from a libuv loop thread.
 *
 * Values: bound text is copied at bind time. A column's text stays valid
 * until the next step, reset or finalize of its statement.
 */
#ifndef CMN_SQL_H
#define CMN_SQL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct cmn_sql cmn_sql_t;            /* one connection */
typedef struct cmn_sql_stmt cmn_sql_stmt_t;  /* one prepared statement */

typedef enum {
    CMN_SQL_SQLITE,
    CMN_SQL_PG,
} cmn_sql_engine_t;

/* cmn_sql_step() results besides errors (negative). */
#define CMN_SQL_DONE 0   /* no (more) rows: the statement has finished */
#define CMN_SQL_ROW  1   /* a row is available through cmn_sql_column_*() */

/** true when target names a PostgreSQL database ("postgres[ql]://"). */
bool cmn_sql_is_pg_target(const char *target);

/**
 * Connects to target (see the file comment). SQLite: WAL, synchronous=FULL,
 * busy timeout, foreign keys on. PostgreSQL: lock waits time out after 30 s
 * (as a busy SQLite does), client messages below warning are dropped. On success *out is owned by the caller (cmn_sql_close).
 * 0 or CMN_EDB (the reason is logged; a PostgreSQL URI is never logged
 * since it may hold a password).
 */
int cmn_sql_open(const char *target, cmn_sql_t **out);
/** Closes a connection; its statements must be finalized. NULL is a no-op. */
void cmn_sql_close(cmn_sql_t *db);

cmn_sql_engine_t cmn_sql_engine(const cmn_sql_t *db);

/**
 * false when the connection is lost (PostgreSQL server restarted, network
 * cut): close it and open a new one. Always true for SQLite.
 */
bool cmn_sql_is_usable(cmn_sql_t *db);

/** Runs one or more statements without parameters or results. 0 or CMN_EDB (logged). */
int cmn_sql_exec(cmn_sql_t *db, const char *sql);

/** Prepares one statement. 0 or CMN_EDB (logged); *out is NULL on error. */
int cmn_sql_prepare(cmn_sql_t *db, const char *sql, cmn_sql_stmt_t **out);

/*
 * Binding: i counts from 1, as in SQLite. A NULL text binds SQL NULL. Binds
 * apply to the next step after a prepare or reset; they survive a reset.
 */
void cmn_sql_bind_text(cmn_sql_stmt_t *st, int i, const char *s);
/** Binds n bytes of s as text (s need not end with NUL; no NUL inside). */
void cmn_sql_bind_textn(cmn_sql_stmt_t *st, int i, const char *s, size_t n);
void cmn_sql_bind_int64(cmn_sql_stmt_t *st, int i, int64_t v);
void cmn_sql_bind_null(cmn_sql_stmt_t *st, int i);
/** The highest parameter number the statement uses. */
int cmn_sql_param_count(const cmn_sql_stmt_t *st);

/**
 * Runs the statement (first call) or moves to its next row. CMN_SQL_ROW,
 * CMN_SQL_DONE, CMN_ECONFLICT for a uniqueness or other constraint
 * violation, CMN_EDB for any other failure (logged with the engine's
 * message, also kept for cmn_sql_errmsg()).
 */
int cmn_sql_step(cmn_sql_stmt_t *st);

/** Makes the statement runnable again, keeping its bindings. */
void cmn_sql_reset(cmn_sql_stmt_t *st);
/** Frees a statement. NULL is a no-op. */
void cmn_sql_finalize(cmn_sql_stmt_t *st);

/* Columns of the current row, counted from 0. A NULL reads as NULL text, 0. */
const char *cmn_sql_column_text(cmn_sql_stmt_t *st, int i);
size_t cmn_sql_column_bytes(cmn_sql_stmt_t *st, int i);
int64_t cmn_sql_column_int64(cmn_sql_stmt_t *st, int i);
int cmn_sql_column_int(cmn_sql_stmt_t *st, int i);
bool cmn_sql_column_is_null(cmn_sql_stmt_t *st, int i);

/** Rows changed by the last INSERT/UPDATE/DELETE run on this connection. */
int64_t cmn_sql_changes(cmn_sql_t *db);
/** The last error message of this connection ("" if none). */
const char *cmn_sql_errmsg(cmn_sql_t *db);

/**
 * Starts a write transaction that serialises writers: SQLite BEGIN
 * IMMEDIATE; PostgreSQL BEGIN plus a transaction-scoped advisory lock, so
 * read-then-write code stays correct across processes sharing a database.
 * 0 or CMN_EDB.
 */
int cmn_sql_begin(cmn_sql_t *db);
int cmn_sql_commit(cmn_sql_t *db);
/** Rolls back the open transaction, if any. */
void cmn_sql_rollback(cmn_sql_t *db);
/** true inside a transaction (including a failed one on PostgreSQL). */
bool cmn_sql_in_tx(cmn_sql_t *db);

/** One schema version: its DDL for each engine (pg NULL: the same text). */
typedef struct {
    const char *sqlite;
    const char *pg;
} cmn_sql_migration_t;

/**
 * Applies migrations[v..n-1] where v is the schema version (SQLite: PRAGMA
 * user_version; PostgreSQL: table yy_schema_version), each in its own
 * writer transaction, bumping the version. Processes starting together
 * migrate once. 0 or CMN_EDB (also when the database is newer than n).
 */
int cmn_sql_migrate(cmn_sql_t *db, const cmn_sql_migration_t *migrations, int n);

#endif /* CMN_SQL_H */
