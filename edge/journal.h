/*
 * journal.h - the ingest journal (journal.c): a preallocated ring file that
 * makes a received instance durable with ONE fdatasync of blocks that are
 * already allocated (no metadata to commit), shared by every association
 * that waits at the same time (group commit).
 *
 * The spool (spool.c) appends one record per instance (its row as `meta`
 * plus the file bytes), waits for edge_journal_sync(), inserts the row
 * without a sync of its own and marks the record done. Records are written
 * one after another under the journal lock, so after a crash the valid
 * records form a prefix of the ring starting at the checkpointed tail.
 *
 * Checkpoint (a thread of the journal, when the ring is half full,
 * after 2 s idle, and at close): for the oldest run of done records the
 * checkpoint callback makes their object files and rows durable by other
 * means (syncfs + a synchronous=FULL commit of the new tail) and the space
 * is reused. Replay (at open, before any append) hands the records after
 * the tail to a callback, which restores what the crash lost.
 *
 * Ring layout: records start at 4 KiB boundaries; a record that does not
 * fit before the end of the ring starts at offset 0.
 *     [hdr 48 B: magic, version, seq, meta_len, data_len, crc32(hdr+meta)]
 *     [meta][pad to 8][data]
 * A record is valid if the magic, the expected sequence number and the CRC
 * match; the callback checks the data (the spool compares its SHA-256).
 */
#ifndef EDGE_JOURNAL_H
#define EDGE_JOURNAL_H

#include <stddef.h>
#include <stdint.h>

typedef struct edge_journal edge_journal_t;

/** A record position: where replay starts, and the sequence number expected there. */
typedef struct {
    uint64_t off;
    uint64_t seq;
} edge_journal_pos_t;

/**
 * Makes everything in the records before `tail` durable elsewhere and
 * persists `tail` (where replay starts after a crash). 0 or negative.
 * Runs on the checkpoint thread (or in edge_journal_close).
 */
typedef int (*edge_journal_checkpoint_cb)(void *ud, edge_journal_pos_t tail);

/**
 * Replay: one valid record. fd/data_off/data_len locate the data in the
 * journal file. Returns 0 to go on, 1 when the data is torn (replay ends
 * here), negative on a hard error (replay fails).
 */
typedef int (*edge_journal_record_cb)(void *ud, uint64_t seq, const char *meta, size_t meta_len,
                                      int fd, uint64_t data_off, uint64_t data_len);

/**
 * Opens path, creating it (size bytes, rounded to 1 MiB, allocated with
 * fallocate; zero-filled and at most 64 MiB where that is not supported)
 * when it does not exist or has another size. 0 with *out, or negative errno.
 */
int edge_journal_open(const char *path, uint64_t size, edge_journal_t **out);

/**
 * Calls cb for each valid record from `from` on; *end is the position after
 * the last one (where appending continues). 0 or the callback's error.
 */
int edge_journal_replay(edge_journal_t *j, edge_journal_pos_t from, edge_journal_record_cb cb,
                        void *ud, edge_journal_pos_t *end);

/** Checkpoint after ms without appends (default 2000; before edge_journal_start). */
void edge_journal_set_idle_ms(edge_journal_t *j, int64_t ms);
/** Starts appending at head (from replay, once its records are made durable) and the checkpoint thread. */
int edge_journal_start(edge_journal_t *j, edge_journal_pos_t head, edge_journal_checkpoint_cb cb,
                       void *ud);

/** Largest data a record may carry; bigger instances take the direct path. */
uint64_t edge_journal_max_data(const edge_journal_t *j);

/**
 * Appends a record: meta, then len bytes of src_fd from offset 0 (copied
 * in the kernel). Blocks while the ring is full (the checkpoint frees it).
 * *seq is the record's number. 0, -EFBIG (too big: use the direct path),
 * or negative errno.
 */
int edge_journal_append(edge_journal_t *j, const void *meta, size_t meta_len, int src_fd,
                        uint64_t len, uint64_t *seq);

/*
 * Streaming: a record written while its data arrives (an instance being
 * received), so that by the end most of it is on disk already (O_DIRECT
 * writes through kernel AIO, several in flight; or the page cache with
 * writeback started every 256 KiB where O_DIRECT is refused) and no copy
 * is left to make. One streaming writer per journal at a time, and no
 * edge_journal_append on that journal meanwhile: the spool gives each
 * association a journal of its own. The record's meta is padded so that
 * its data starts 4 KiB into the record.
 */
/** Starts a record at head (an unfinished one is dropped). 0 or the journal's sticky error. */
int edge_journal_stream_begin(edge_journal_t *j);
/**
 * Appends data to the record. Blocks while the ring is full. 0, -EFBIG (the
 * record outgrew edge_journal_max_data: abort it and take another path), or
 * -errno; an error sticks to the record.
 */
int edge_journal_stream_write(edge_journal_t *j, const void *buf, size_t len);
/** Data bytes written to the open record (0 after an error). */
uint64_t edge_journal_stream_bytes(edge_journal_t *j);
/**
 * Writes the header (with meta) and makes the record part of the log, as
 * edge_journal_append does: then edge_journal_sync(*seq). With O_DIRECT the
 * last writes are only started: the sync waits for them, then for the
 * flush (the caller works meanwhile). 0 or negative (the record's error);
 * the record is closed either way.
 */
int edge_journal_stream_commit(edge_journal_t *j, const void *meta, size_t meta_len,
                               uint64_t *seq);
/** Drops the open record (nothing of it is ever replayed). */
void edge_journal_stream_abort(edge_journal_t *j);

/** Waits until record seq is on stable storage (one fdatasync for every waiter). 0 or -errno. */
int edge_journal_sync(edge_journal_t *j, uint64_t seq);

/**
 * Record seq needs the journal no more: its row is inserted, or inserting
 * failed (the SCU got A700; should the edge crash before the next
 * checkpoint, replay inserts the row anyway - a harmless extra copy).
 */
void edge_journal_done(edge_journal_t *j, uint64_t seq);

typedef struct {
    uint64_t appends, syncs, checkpoints, waits_full;
    uint64_t streamed;           /* of the appends, records written by streaming */
} edge_journal_stats_t;
void edge_journal_get_stats(edge_journal_t *j, edge_journal_stats_t *st);

/**
 * Writes zeros over the parts of the ring never written (the "unwritten"
 * extents fallocate made, and holes), so that every record after is an
 * overwrite of written blocks: on ext4 the first write into an unwritten
 * extent also converts it, which costs that record's flush a metadata
 * commit (+30-90% per image on the benchmark VM). Those parts hold no
 * record, so this never touches one; but no writer may use the journal
 * meanwhile (the spool runs it only from `yunying-edge prepare-spool`,
 * under its lock). *written: the bytes written. 0 or -errno.
 */
int edge_journal_prepare(edge_journal_t *j, uint64_t *written);

/** Final checkpoint, stops the thread, closes the file. NULL is fine. */
void edge_journal_close(edge_journal_t *j);

#endif /* EDGE_JOURNAL_H */
