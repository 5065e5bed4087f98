//! What one peer may hold of the server: connections (in all, and per role) and the text bytes
//! read but not yet tokenized. Every listener admits its clients through these, so no client
//! can take the descriptors, threads or memory that the others need.

use std::collections::HashMap;
use std::net::IpAddr;
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
/// Native network connections of one peer address not yet admitted (in their TLS handshake or
/// before their token) at once; more of that peer's are closed unread. All peers together may
/// have half of `max_connections` (at least twice this many) waiting: peers that connect and say
/// nothing never take the slots of admitted clients or of the cluster's own Unix socket, and
/// one host's cannot shut out the others'.
pub const UNADMITTED_PER_PEER: usize = 64;
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

    /// Native network connections of all peers that may wait for admission at once.
    pub fn unadmitted_network(&self) -> usize {
        (self.max_connections / 2).max(2 * UNADMITTED_PER_PEER)
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
    unadmitted_network: usize,
    unadmitted_by_peer: HashMap<IpAddr, usize>,
    by_role: HashMap<String, usize>,
    by_token: HashMap<String, usize>,
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
    /// The token it was admitted with, on the network.
    token: Option<String>,
    /// The peer of a network connection still counted as not admitted.
    unadmitted_network: Option<IpAddr>,
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
        Some(Opened::new(self, None))
    }

    /// Counts a new native network connection from `peer`, unless `hard_cap` are open already,
    /// or too many network connections (of this peer, or of all) wait for admission.
    pub fn open_network(self: &Arc<Self>, limits: &Limits, peer: IpAddr) -> Option<Opened> {
        let peer = peer.to_canonical();
        let mut counts = self.counts();
        let waiting = counts.unadmitted_by_peer.get(&peer).copied().unwrap_or(0);
        if counts.open >= limits.hard_cap()
            || waiting >= UNADMITTED_PER_PEER
            || counts.unadmitted_network >= limits.unadmitted_network()
        {
            return None;
        }
        counts.open += 1;
        counts.unadmitted_network += 1;
        *counts.unadmitted_by_peer.entry(peer).or_insert(0) += 1;
        Some(Opened::new(self, Some(peer)))
    }

    /// Admitted connections now.
    pub fn admitted(&self) -> usize {
        self.counts().admitted
    }
}

impl Opened {
    fn new(gate: &Arc<Gate>, unadmitted_network: Option<IpAddr>) -> Self {
        Self {
            gate: gate.clone(),
            admitted_as: None,
            token: None,
            unadmitted_network,
        }
    }

    /// A network connection of `peer` no longer counts as waiting for admission.
    fn no_longer_waiting(counts: &mut Counts, peer: Option<IpAddr>) {
        if let Some(peer) = peer {
            counts.unadmitted_network -= 1;
            uncount(&mut counts.unadmitted_by_peer, &peer);
        }
    }

    /// Admits the connection as a client of `role`, which may hold `role_connections` (None:
    /// its default share of the server's limit). On the network, all roles of one `token`
    /// together hold at most the default share, whatever `role_connections` its client asks.
    pub fn admit(
        &mut self,
        role: &str,
        role_connections: Option<usize>,
        token: Option<&str>,
        limits: &Limits,
    ) -> Result<(), Refusal> {
        if self.admitted_as.is_some() {
            return Ok(());
        }
        let share = (limits.max_connections / DEFAULT_ROLE_SHARE).max(1);
        let (role_connections, setting) = match role_connections {
            Some(n) => (n, n.to_string()),
            None => (
                share,
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
        holds_less(&counts.by_role, role, role_connections, || {
            (format!("role \"{role}\""), format!("nvembed.max_calls_per_role = {setting}"))
        })?;
        if let Some(token) = token {
            holds_less(&counts.by_token, token, share, || {
                (
                    format!("token \"{token}\""),
                    format!("1/{DEFAULT_ROLE_SHARE} of the server's {}", limits.max_connections),
                )
            })?;
            *counts.by_token.entry(token.to_string()).or_insert(0) += 1;
            self.token = Some(token.to_string());
        }
        counts.admitted += 1;
        Self::no_longer_waiting(&mut counts, self.unadmitted_network.take());
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
        Self::no_longer_waiting(&mut counts, self.unadmitted_network.take());
        if let Some(role) = self.admitted_as.take() {
            counts.admitted -= 1;
            uncount(&mut counts.by_role, &role);
        }
        if let Some(token) = self.token.take() {
            uncount(&mut counts.by_token, &token);
        }
    }
}

/// Refuses another connection of `key` when it holds `limit` of them in `held`; `named` says
/// who holds them and what sets the limit.
fn holds_less(
    held: &HashMap<String, usize>,
    key: &str,
    limit: usize,
    named: impl FnOnce() -> (String, String),
) -> Result<(), Refusal> {
    let holds = held.get(key).copied().unwrap_or(0);
    if holds < limit {
        return Ok(());
    }
    let (holder, setting) = named();
    Err((
        ErrorKind::Busy,
        format!("{holder} already holds {holds} model server connections, its limit ({setting})"),
    ))
}

fn uncount<K: std::hash::Hash + Eq>(held: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = held.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            held.remove(key);
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
