/*
 * cmn_db.c - SQLite helpers: WAL, busy timeout, migrations by user_version.
 */
#include "cmn/db.h"

#include <pthread.h>
#include <stdio.h>

#include "cmn/errors.h"
#include "cmn/log.h"

/* Memory statistics take a process-wide mutex on every SQLite allocation:
 * with several handler threads querying at once it showed in profiles
 * (bench_dicomweb.sh). Nothing reads them. Must precede initialisation. */
static void global_init(void)
{
    (void)sqlite3_config(SQLITE_CONFIG_MEMSTATUS, 0);
    (void)sqlite3_initialize();
}

int cmn_db_open(const char *path, cmn_db_sync_t sync, sqlite3 **out)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    sqlite3 *db = NULL;
    int rc;

    pthread_once(&once, global_init);

    rc = sqlite3_open_v2(path, &db,
                         SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, NULL);
    if (rc != SQLITE_OK) {
        CMN_LOG_E("db", "open %s: %s", path, db ? sqlite3_errmsg(db) : sqlite3_errstr(rc));
        sqlite3_close(db);
        return CMN_EDB;
    }
    sqlite3_busy_timeout(db, 10000);
    if (cmn_db_exec(db, "PRAGMA journal_mode=WAL") < 0 ||
        cmn_db_exec(db, sync == CMN_DB_SYNC_FULL ? "PRAGMA synchronous=FULL"
                                                 : "PRAGMA synchronous=NORMAL") < 0 ||
        cmn_db_exec(db, "PRAGMA foreign_keys=ON") < 0) {
        sqlite3_close(db);
        return CMN_EDB;
    }
    *out = db;
    return 0;
}

void cmn_db_close(sqlite3 *db)
{
    if (db)
        sqlite3_close_v2(db);
}

int cmn_db_exec(sqlite3 *db, const char *sql)
{
    char *msg = NULL;
    int rc = sqlite3_exec(db, sql, NULL, NULL, &msg);

    if (rc != SQLITE_OK) {
        CMN_LOG_E("db", "exec failed: %s", msg ? msg : sqlite3_errstr(rc));
        sqlite3_free(msg);
        return CMN_EDB;
    }
    return 0;
}

int cmn_db_prepare(sqlite3 *db, const char *sql, sqlite3_stmt **out)
{
    int rc = sqlite3_prepare_v2(db, sql, -1, out, NULL);

    if (rc != SQLITE_OK) {
        CMN_LOG_E("db", "prepare failed: %s", sqlite3_errmsg(db));
        *out = NULL;
        return CMN_EDB;
    }
    return 0;
}

static int user_version(sqlite3 *db, int *v)
{
    sqlite3_stmt *st;

    if (cmn_db_prepare(db, "PRAGMA user_version", &st) < 0)
        return CMN_EDB;
    if (sqlite3_step(st) != SQLITE_ROW) {
        sqlite3_finalize(st);
        return CMN_EDB;
    }
    *v = sqlite3_column_int(st, 0);
    sqlite3_finalize(st);
    return 0;
}

int cmn_db_migrate(sqlite3 *db, const char *const *migrations, int n)
{
    int v;

    if (user_version(db, &v) < 0)
        return CMN_EDB;
    if (v > n) {
        CMN_LOG_E("db", "database schema version %d is newer than this program (%d)", v, n);
        return CMN_EDB;
    }
    for (int i = v; i < n; i++) {
        char bump[64];
        if (cmn_db_exec(db, "BEGIN IMMEDIATE") < 0)
            return CMN_EDB;
        /* Another process may have migrated while we waited for the lock. */
        if (user_version(db, &v) < 0) {
            cmn_db_exec(db, "ROLLBACK");
            return CMN_EDB;
        }
        if (v > i) {
            cmn_db_exec(db, "COMMIT");
            continue;
        }
        snprintf(bump, sizeof(bump), "PRAGMA user_version=%d", i + 1);
        if (cmn_db_exec(db, migrations[i]) < 0 || cmn_db_exec(db, bump) < 0) {
            cmn_db_exec(db, "ROLLBACK");
            CMN_LOG_E("db", "migration %d failed", i + 1);
            return CMN_EDB;
        }
        if (cmn_db_exec(db, "COMMIT") < 0)
            return CMN_EDB;
    }
    return 0;
}
