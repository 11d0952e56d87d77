/*
 * db.h - SQLite helpers: open in WAL mode, versioned migrations.
 *
 * Every call is blocking: run it on a worker thread (uv_queue_work) or a
 * thread of its own, never on a libuv loop thread.
 */
#ifndef CMN_DB_H
#define CMN_DB_H

#include <sqlite3.h>
#include <stdbool.h>

typedef enum {
    CMN_DB_SYNC_NORMAL,  /* WAL + synchronous=NORMAL: durable at checkpoint */
    CMN_DB_SYNC_FULL,    /* WAL + synchronous=FULL: durable at each commit */
} cmn_db_sync_t;

/**
 * Opens (creating) path in WAL mode with a busy timeout, foreign keys on.
 * On success *out is owned by the caller (cmn_db_close). 0 or CMN_EDB.
 */
int cmn_db_open(const char *path, cmn_db_sync_t sync, sqlite3 **out);
void cmn_db_close(sqlite3 *db);

/** Runs SQL without results. 0 or CMN_EDB (the SQLite message is logged). */
int cmn_db_exec(sqlite3 *db, const char *sql);

/**
 * Applies migrations[i] for every i >= PRAGMA user_version, each in its own
 * transaction, bumping user_version. 0 or CMN_EDB.
 */
int cmn_db_migrate(sqlite3 *db, const char *const *migrations, int n);

/** Prepares a statement, logging the error. 0 or CMN_EDB. */
int cmn_db_prepare(sqlite3 *db, const char *sql, sqlite3_stmt **out);

#endif /* CMN_DB_H */
