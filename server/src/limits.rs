//! What one peer may hold of the server: connections (in all, and per role) and the text bytes
//! read but not yet tokenized. Every listener admits its clients through these, so no client
//! can take the descriptors, threads or memory that the others need.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nvembed_protocol::{ErrorKind, DEFAULT_ROLE_SHARE, MAX_FRAME_BYTES};

use crate::admission::Refusal;

/// Descriptors kept for everything but admitted clients: the listener, the model's files, the
/// log, status checks and the brief connections that are told the server is full.
pub const RESERVED_DESCRIPTORS: usize = 128;
/// Connections past the limit that are still accepted (to be told why they are refused, or to
/// ask for status) before new ones are closed unread.
pub const OVERFLOW_CONNECTIONS: usize = 64;
/// Default of `--max-connections` when the descriptor limit allows more.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Text bytes all connections together may hold before tokenizing them (each frame counts
/// twice: as read, and as decoded strings). A frame waits for room; four of the largest fit.
pub const ADMISSION_BYTES: usize = 8 * MAX_FRAME_BYTES;

/// Bulk calls tokenizing at once: a tokenizer holds tens of bytes per byte of text, and
/// tokenizing competes with the model for the cores. One-text calls never wait for a slot.
pub fn tokenizers_at_once() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

/// Time a new connection has to complete its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Time an admitted connection may stay silent between calls or within one call's texts.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Connection limits and timeouts of one server.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Admitted client connections at once (status checks are not counted).
    pub max_connections: usize,
    /// Time a new connection has to complete its handshake.
    pub handshake_timeout: Duration,
    /// Time an admitted connection may stay silent between calls or within one call's texts.
    pub idle_timeout: Duration,
}

impl Limits {
    /// Connections at which new ones are closed without a word.
    pub fn hard_cap(&self) -> usize {
        self.max_connections + OVERFLOW_CONNECTIONS
    }
}

/// Raises this process's soft descriptor limit to its hard limit and returns the connections
/// that then fit beside `RESERVED_DESCRIPTORS`, at most `DEFAULT_MAX_CONNECTIONS`.
pub fn connections_the_descriptors_allow() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: reading and setting this process's own limit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    let descriptors = usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX);
    // Each client needs one descriptor; the overflow connections need theirs too.
    descriptors
        .saturating_sub(RESERVED_DESCRIPTORS + OVERFLOW_CONNECTIONS)
        .clamp(1, DEFAULT_MAX_CONNECTIONS)
}

#[derive(Default)]
struct Counts {
    open: usize,
    admitted: usize,
    by_role: HashMap<String, usize>,
}

/// Counts the server's connections.
#[derive(Default)]
pub struct Gate {
    counts: Mutex<Counts>,
}

/// One open connection; it is uncounted when dropped.
pub struct Opened {
    gate: Arc<Gate>,
    admitted_as: Option<String>,
}

impl Gate {
    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a new connection, unless `hard_cap` are open already.
    pub fn open(self: &Arc<Self>, hard_cap: usize) -> Option<Opened> {
        let mut counts = self.counts();
        if counts.open >= hard_cap {
            return None;
        }
        counts.open += 1;
        Some(Opened {
            gate: self.clone(),
            admitted_as: None,
        })
    }

    /// Admitted connections now.
    pub fn admitted(&self) -> usize {
        self.counts().admitted
    }
}

impl Opened {
    /// Admits the connection as a client of `role`, which may hold `role_connections` (None:
    /// its default share of the server's limit).
    pub fn admit(&mut self, role: &str, role_connections: Option<usize>, limits: &Limits) -> Result<(), Refusal> {
        if self.admitted_as.is_some() {
            return Ok(());
        }
        let (role_connections, setting) = match role_connections {
            Some(n) => (n, n.to_string()),
            None => (
                (limits.max_connections / DEFAULT_ROLE_SHARE).max(1),
                format!("-1: 1/{DEFAULT_ROLE_SHARE} of the server's {}", limits.max_connections),
            ),
        };
        let mut counts = self.gate.counts();
        if counts.admitted >= limits.max_connections {
            return Err((
                ErrorKind::Busy,
                format!("the model server already serves its limit of {} connections", limits.max_connections),
            ));
        }
        let held = counts.by_role.get(role).copied().unwrap_or(0);
        if held >= role_connections {
            return Err((
                ErrorKind::Busy,
                format!(
                    "role \"{role}\" already holds {held} model server connections, its limit \
                     (nvembed.max_calls_per_role = {setting})"
                ),
            ));
        }
        counts.admitted += 1;
        *counts.by_role.entry(role.to_string()).or_insert(0) += 1;
        self.admitted_as = Some(role.to_string());
        Ok(())
    }

    pub fn is_admitted(&self) -> bool {
        self.admitted_as.is_some()
    }

    /// The role it was admitted as ("" before).
    pub fn client(&self) -> &str {
        self.admitted_as.as_deref().unwrap_or("")
    }
}

impl Drop for Opened {
    fn drop(&mut self) {
        let mut counts = self.gate.counts();
        counts.open -= 1;
        if let Some(role) = self.admitted_as.take() {
            counts.admitted -= 1;
            if let Some(held) = counts.by_role.get_mut(&role) {
                *held -= 1;
                if *held == 0 {
                    counts.by_role.remove(&role);
                }
            }
        }
    }
}

/// A counted resource that connections wait for: text bytes held before tokenizing, or
/// tokenizer slots.
pub struct Budget {
    available: Mutex<usize>,
    freed: Condvar,
}

/// Bytes taken from the budget; returned when dropped.
pub struct Reserved {
    budget: Arc<Budget>,
    bytes: usize,
}

/// How often a connection waiting for room checks whether its client left.
const BUDGET_POLL: Duration = Duration::from_millis(50);

impl Budget {
    pub fn new(bytes: usize) -> Self {
        Self {
            available: Mutex::new(bytes),
            freed: Condvar::new(),
        }
    }

    /// Takes `bytes` if they are free now.
    pub fn try_reserve(self: &Arc<Self>, bytes: usize) -> Option<Reserved> {
        let mut available = self.available.lock().unwrap_or_else(|p| p.into_inner());
        if *available < bytes {
            return None;
        }
        *available -= bytes;
        Some(Reserved {
            budget: self.clone(),
            bytes,
        })
    }

    /// Takes `bytes`, waiting while others hold the room; None when `gave_up` says so first.
    pub fn reserve(self: &Arc<Self>, bytes: usize, gave_up: impl Fn() -> bool) -> Option<Reserved> {
        let mut available = self.available.lock().unwrap_or_else(|p| p.into_inner());
        while *available < bytes {
            if gave_up() {
                return None;
            }
            available = self
                .freed
                .wait_timeout(available, BUDGET_POLL)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *available -= bytes;
        Some(Reserved {
            budget: self.clone(),
            bytes,
        })
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        *self.budget.available.lock().unwrap_or_else(|p| p.into_inner()) += self.bytes;
        self.budget.freed.notify_all();
    }
}

/// Logs a repeated condition (accept failures, refused connections) at most once per
/// `LOG_EVERY`, with how often it happened in between.
pub struct Throttled {
    state: Mutex<(Option<Instant>, u64)>,
}

const LOG_EVERY: Duration = Duration::from_secs(10);

impl Default for Throttled {
    fn default() -> Self {
        Self::new()
    }
}

impl Throttled {
    pub const fn new() -> Self {
        Self {
            state: Mutex::new((None, 0)),
        }
    }

    pub fn log(&self, message: impl FnOnce() -> String) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.1 += 1;
        if state.0.is_none_or(|last| last.elapsed() >= LOG_EVERY) {
            let times = std::mem::take(&mut state.1);
            let repeats = if times > 1 { format!(" ({times} times since the last report)") } else { String::new() };
            eprintln!("nvembed-model-server: {}{repeats}", message());
            state.0 = Some(Instant::now());
        }
    }
}
