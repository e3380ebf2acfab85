//! Audit rows for refused saves.
//!
//! When the save guard refuses a save, it raises an ERROR, and the save's transaction rolls
//! back, taking any audit row it wrote with it. PostgreSQL has no autonomous transactions, so the
//! guard notes the refusal here instead: a small ring in shared memory that outlives the
//! rollback. The background worker (within a second) and every cycle move the notes into
//! `orphan_cleanup.audit_log` as `refused` rows. Shared memory needs `shared_preload_libraries`;
//! without it the sequence `orphan_cleanup.refused_saves` still counts every refusal.
//!
//! Taking notes is transactional: a flush marks the notes it takes, and they leave the ring only
//! when its transaction commits (with their audit rows). If it aborts (a cycle rolled back,
//! terminated or timed out) they are unmarked and the next flush writes them.

use std::sync::atomic::{AtomicBool, Ordering};

use pgrx::prelude::*;
use pgrx::{
    pg_shmem_init, register_xact_callback, PGRXSharedMemory, PgLwLock, PgXactCallbackEvent,
};

/// Refusals held between two flushes. Past this, the oldest are dropped and counted.
const CAPACITY: usize = 256;
const ACTOR_LEN: usize = 64;

#[derive(Copy, Clone)]
struct Note {
    database: u32,
    job: [u8; 16],
    queue_id: i64,
    unix_micros: i64,
    actor: [u8; ACTOR_LEN],
    actor_len: u8,
    /// The pid of the backend whose open transaction took the note; 0 while nobody has.
    taken_by: i32,
}

const EMPTY: Note = Note {
    database: 0,
    job: [0; 16],
    queue_id: 0,
    unix_micros: 0,
    actor: [0; ACTOR_LEN],
    actor_len: 0,
    taken_by: 0,
};

#[derive(Copy, Clone)]
pub struct Ring {
    notes: [Note; CAPACITY],
    len: usize,
    dropped: u64,
}

impl Default for Ring {
    fn default() -> Self {
        Ring {
            notes: [EMPTY; CAPACITY],
            len: 0,
            dropped: 0,
        }
    }
}

unsafe impl PGRXSharedMemory for Ring {}

static RING: PgLwLock<Ring> = unsafe { PgLwLock::new(c"pg_orphan_cleanup refused saves") };

/// Set in the postmaster when the library is preloaded; forked backends inherit it.
static READY: AtomicBool = AtomicBool::new(false);

/// Reserves the shared memory. Only while `shared_preload_libraries` is being processed.
pub fn init() {
    pg_shmem_init!(RING);
    READY.store(true, Ordering::Relaxed);
}

/// Whether any refusal noted in `database` waits to be written to the audit log.
pub fn pending(database: u32) -> bool {
    READY.load(Ordering::Relaxed) && {
        let ring = RING.share();
        ring.notes[..ring.len]
            .iter()
            .any(|n| n.database == database && n.taken_by == 0)
    }
}

/// Notes a refused save. Returns false when shared memory is not available (not preloaded).
#[pg_extern(volatile, parallel_unsafe)]
fn _note_refusal(job: pgrx::Uuid, queue_id: i64, actor: &str) -> bool {
    if !READY.load(Ordering::Relaxed) {
        return false;
    }
    let mut note = EMPTY;
    note.database = u32::from(unsafe { pg_sys::MyDatabaseId });
    note.job.copy_from_slice(job.as_bytes());
    note.queue_id = queue_id;
    note.unix_micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    let bytes = actor.as_bytes();
    let n = bytes.len().min(ACTOR_LEN);
    note.actor[..n].copy_from_slice(&bytes[..n]);
    note.actor_len = n as u8;

    let dropped = {
        let mut ring = RING.exclusive();
        let full = ring.len == CAPACITY;
        if full {
            // Drop the oldest note no transaction is writing right now (if that transaction
            // aborted, a taken note dropped here would be lost), or else the oldest.
            let victim = ring.notes[..ring.len]
                .iter()
                .position(|n| n.taken_by == 0)
                .unwrap_or(0);
            ring.notes.copy_within(victim + 1.., victim);
            ring.len -= 1;
            ring.dropped += 1;
        }
        let len = ring.len;
        ring.notes[len] = note;
        ring.len += 1;
        full.then_some(ring.dropped)
    };
    // Outside the lock: a WARNING may be sent to the client.
    if let Some(dropped) = dropped {
        warning!(
            "pg_orphan_cleanup: {CAPACITY} refused saves wait to be audited; the oldest note was dropped ({dropped} so far). \
             orphan_cleanup.refused_saves still counts it; the worker or a cycle writes the notes to audit_log"
        );
    }
    true
}

/// Returns the refusals noted in the current database that no other transaction has taken, and
/// takes them: they leave the ring when this transaction commits, and are given back if it aborts.
#[pg_extern(volatile, parallel_unsafe)]
fn _take_refusals() -> TableIterator<
    'static,
    (
        name!(job_id, pgrx::Uuid),
        name!(queue_id, i64),
        name!(actor, String),
        name!(unix_micros, i64),
    ),
> {
    let mut taken = Vec::new();
    // Only a top-level transaction takes notes: a savepoint rolled back after taking them would
    // undo their audit rows but keep them taken until the commit dropped them. Inside one (psql's
    // ON_ERROR_ROLLBACK, a caller's exception block) this takes nothing; the worker flushes
    // within a second, and the next cycle at top level.
    let top_level = unsafe { pg_sys::GetCurrentTransactionNestLevel() } == 1;
    if READY.load(Ordering::Relaxed) && top_level {
        let database = u32::from(unsafe { pg_sys::MyDatabaseId });
        let me = unsafe { pg_sys::MyProcPid };
        let mut ring = RING.exclusive();
        let len = ring.len;
        for note in ring.notes[..len].iter_mut() {
            if note.database == database && note.taken_by == 0 {
                note.taken_by = me;
                let actor =
                    String::from_utf8_lossy(&note.actor[..note.actor_len as usize]).into_owned();
                taken.push((
                    pgrx::Uuid::from_bytes(note.job),
                    note.queue_id,
                    actor,
                    note.unix_micros,
                ));
            }
        }
    }
    if !taken.is_empty() {
        register_xact_callback(PgXactCallbackEvent::Commit, || settle(true));
        register_xact_callback(PgXactCallbackEvent::Abort, || settle(false));
        // Whether a prepared transaction commits or rolls back is decided later, maybe by another
        // session: its notes could be neither kept nor dropped correctly. Refused, like NOTIFY.
        register_xact_callback(PgXactCallbackEvent::PrePrepare, || {
            error!("cannot PREPARE a transaction that has written refused-save audit rows (orphan_cleanup._flush_refusals(), run_cycle()); commit it, or run the cycle in a transaction of its own")
        });
    }
    TableIterator::new(taken)
}

/// At the end of a transaction that took notes: drops them (committed: their audit rows exist)
/// or gives them back (aborted).
fn settle(committed: bool) {
    let me = unsafe { pg_sys::MyProcPid };
    let mut ring = RING.exclusive();
    let mut kept = 0;
    for i in 0..ring.len {
        let mut note = ring.notes[i];
        if note.taken_by == me {
            if committed {
                continue;
            }
            note.taken_by = 0;
        }
        ring.notes[kept] = note;
        kept += 1;
    }
    ring.len = kept;
}
