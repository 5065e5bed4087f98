//! Where calls go. With `nvembed.servers` empty, to the cluster's own model server on its Unix
//! socket. Otherwise to remote servers, which every backend and worker of the cluster shares
//! through shared memory:
//! - how much work each has outstanding from this cluster: a new call goes to the server with
//!   the fewest text bytes in flight, so N equal servers drain a queue about N times as fast;
//! - which are down: skipped, and tried again after a backoff that doubles per failure;
//! - each one's last error, for `nvembed_status()`;
//! - the model the first server answered with (pinned): a server that serves another model,
//!   revision, dtype or dimension is refused, so vectors of two models never mix in a column.
//!   The pin lasts until `nvembed.model` or `nvembed.dtype` changes, or PostgreSQL restarts:
//!   adding a server to `nvembed.servers` never lets another model in.

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

use pgrx::lwlock::PgLwLock;
use pgrx::pg_sys;
use pgrx::shmem::PGRXSharedMemory;

use nvembed_protocol::{Served, DEFAULT_DTYPE};

use crate::gucs;

/// Servers `nvembed.servers` may list.
pub const MAX_SERVERS: usize = 64;
/// Bytes of a server's last error kept for `nvembed_status()`.
const LAST_ERROR_BYTES: usize = 256;
/// Bytes of the pinned model's description.
const PINNED_BYTES: usize = 512;
/// A server that failed is skipped for this long, doubled per failure in a row, at most
/// MAX_BACKOFF_MS.
const FIRST_BACKOFF_MS: u64 = 1_000;
const MAX_BACKOFF_MS: u64 = 30_000;

/// One server of `nvembed.servers`: `host:port`, or `[v6 address]:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    /// As written in `nvembed.servers`: how errors and `nvembed_status()` name it.
    pub address: String,
    /// The host name the server's certificate must name (or the IP address).
    pub host: String,
    pub port: u16,
}

/// Parses `nvembed.servers`.
pub fn parse_servers(value: &str) -> Result<Vec<Remote>, String> {
    let mut remotes: Vec<Remote> = Vec::new();
    for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let malformed = || format!("\"{entry}\" is not host:port (an IPv6 address in brackets: [::1]:7443).");
        let (host, port) = entry.rsplit_once(':').ok_or_else(malformed)?;
        let host = match host.strip_prefix('[') {
            Some(v6) => v6.strip_suffix(']').ok_or_else(malformed)?,
            None if host.contains(':') => return Err(malformed()),
            None => host,
        };
        if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == '/' || c == '@') {
            return Err(malformed());
        }
        let port: u16 = port.parse().ok().filter(|p| *p != 0).ok_or_else(malformed)?;
        if remotes.iter().any(|r| r.address == entry) {
            return Err(format!("\"{entry}\" is listed twice."));
        }
        remotes.push(Remote {
            address: entry.to_string(),
            host: host.to_string(),
            port,
        });
    }
    if remotes.len() > MAX_SERVERS {
        return Err(format!("At most {MAX_SERVERS} servers may be listed."));
    }
    Ok(remotes)
}

/// The remote servers configured now; empty: the local server.
pub fn remotes() -> Vec<Remote> {
    parse_servers(&gucs::servers()).unwrap_or_default()
}

#[derive(Clone, Copy)]
struct Slot {
    /// Hash of the address; 0: free.
    key: u64,
    /// Calls and text bytes in flight from this cluster.
    calls: u32,
    bytes: u64,
    /// Failures in a row, and until when (ms since the epoch) the server is skipped.
    failures: u32,
    down_until_ms: u64,
    error_len: u16,
    error: [u8; LAST_ERROR_BYTES],
}

const FREE: Slot = Slot {
    key: 0,
    calls: 0,
    bytes: 0,
    failures: 0,
    down_until_ms: 0,
    error_len: 0,
    error: [0; LAST_ERROR_BYTES],
};

/// The cluster's shared view of its remote servers.
#[derive(Clone, Copy)]
pub struct Servers {
    slots: [Slot; MAX_SERVERS],
    /// Hash of the settings the pin was made under; the pin holds only while they hold.
    pinned_under: u64,
    pinned_len: u16,
    pinned: [u8; PINNED_BYTES],
}

impl Default for Servers {
    fn default() -> Self {
        Self {
            slots: [FREE; MAX_SERVERS],
            pinned_under: 0,
            pinned_len: 0,
            pinned: [0; PINNED_BYTES],
        }
    }
}

// SAFETY: plain data (no pointers), valid in any process that maps the segment.
unsafe impl PGRXSharedMemory for Servers {}

// SAFETY: the name is this extension's only lock.
pub static SERVERS: PgLwLock<Servers> = unsafe { PgLwLock::new(c"nvembed_servers") };

/// FNV-1a: stable across processes and builds, never 0 for an address.
fn hash(text: &str) -> u64 {
    let h = text
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    h.max(1)
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn store(buffer: &mut [u8], len: &mut u16, text: &str) {
    let mut n = text.len().min(buffer.len());
    while !text.is_char_boundary(n) {
        n -= 1;
    }
    buffer[..n].copy_from_slice(&text.as_bytes()[..n]);
    *len = n as u16;
}

impl Servers {
    /// The slot of `address`, taking a free one or one of a server no longer listed.
    fn slot(&mut self, address: &str, listed: &[Remote]) -> &mut Slot {
        let key = hash(address);
        let index = self.slots.iter().position(|s| s.key == key).unwrap_or_else(|| {
            let listed: Vec<u64> = listed.iter().map(|r| hash(&r.address)).collect();
            let index = self
                .slots
                .iter()
                .position(|s| s.key == 0 || (s.calls == 0 && !listed.contains(&s.key)))
                .unwrap_or(MAX_SERVERS - 1);
            self.slots[index] = Slot { key, ..FREE };
            index
        });
        &mut self.slots[index]
    }
}

/// A call's claim on a server's share of work; given back when dropped (or when the process
/// exits in the middle of a call).
pub struct Lease {
    address: String,
    bytes: u64,
}

thread_local! {
    /// Leases this process holds, given back by `release_at_exit` if it exits holding them.
    static HELD: RefCell<Vec<(String, u64)>> = const { RefCell::new(Vec::new()) };
    static EXIT_HOOKED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn give_back(address: &str, bytes: u64) {
    let listed = remotes();
    let mut servers = SERVERS.exclusive();
    let slot = servers.slot(address, &listed);
    slot.calls = slot.calls.saturating_sub(1);
    slot.bytes = slot.bytes.saturating_sub(bytes);
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn release_at_exit(_code: i32, _arg: pg_sys::Datum) {
    for (address, bytes) in HELD.with(|h| std::mem::take(&mut *h.borrow_mut())) {
        give_back(&address, bytes);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // At exit `release_at_exit` may have given it back already (it runs before the
        // transaction's abort drops what a set-returning function held).
        let held = HELD.with(|h| {
            let mut held = h.borrow_mut();
            held.iter()
                .position(|(a, b)| *a == self.address && *b == self.bytes)
                .map(|i| held.swap_remove(i))
                .is_some()
        });
        if held {
            give_back(&self.address, self.bytes);
        }
    }
}

/// Picks the server for a call of `bytes` text bytes: among the listed servers not in `tried`
/// and not down, the one with the least work in flight (bytes, then calls; ties go round by
/// process id). When every untried server is down, the one whose backoff ends first: a call
/// does not fail on a backoff alone. None when every server was tried.
pub fn choose(listed: &[Remote], tried: &[String], bytes: u64) -> Option<(Remote, Lease)> {
    if !EXIT_HOOKED.with(|h| h.replace(true)) {
        // SAFETY: registering a callback that runs once, at process exit, with shmem attached.
        unsafe { pg_sys::before_shmem_exit(Some(release_at_exit), pg_sys::Datum::from(0)) };
    }
    let now = now_ms();
    let start = std::process::id() as usize;
    let mut servers = SERVERS.exclusive();
    let mut best: Option<((bool, u64, u64, u32, usize), usize)> = None;
    for (i, remote) in listed.iter().enumerate() {
        if tried.contains(&remote.address) {
            continue;
        }
        let slot = servers.slot(&remote.address, listed);
        let down = slot.down_until_ms > now;
        let rank = (
            down,
            if down { slot.down_until_ms } else { 0 },
            slot.bytes,
            slot.calls,
            (i + listed.len() - start % listed.len()) % listed.len(),
        );
        if best.as_ref().is_none_or(|(b, _)| rank < *b) {
            best = Some((rank, i));
        }
    }
    let (_, index) = best?;
    let remote = listed[index].clone();
    let slot = servers.slot(&remote.address, listed);
    slot.calls += 1;
    slot.bytes += bytes;
    drop(servers);
    HELD.with(|h| h.borrow_mut().push((remote.address.clone(), bytes)));
    let lease = Lease {
        address: remote.address.clone(),
        bytes,
    };
    Some((remote, lease))
}

/// Servers a worker can keep busy at once: those listed and not down (at least one).
pub fn usable() -> usize {
    let listed = remotes();
    if listed.is_empty() {
        return 1;
    }
    let now = now_ms();
    let mut servers = SERVERS.exclusive();
    listed
        .iter()
        .filter(|r| servers.slot(&r.address, &listed).down_until_ms <= now)
        .count()
        .max(1)
}

/// Records that `address` answered.
pub fn succeeded(address: &str) {
    let listed = remotes();
    let mut servers = SERVERS.exclusive();
    let slot = servers.slot(address, &listed);
    slot.failures = 0;
    slot.down_until_ms = 0;
}

/// Records `error` as `address`'s last; `down`: skip the server for a while.
pub fn failed(address: &str, error: &str, down: bool) {
    let listed = remotes();
    let mut servers = SERVERS.exclusive();
    let slot = servers.slot(address, &listed);
    let Slot { error: buffer, error_len, .. } = slot;
    store(buffer, error_len, error);
    if down {
        slot.failures = slot.failures.saturating_add(1);
        let backoff = FIRST_BACKOFF_MS.saturating_mul(1 << slot.failures.min(16).saturating_sub(1)).min(MAX_BACKOFF_MS);
        slot.down_until_ms = now_ms() + backoff;
    }
}

/// The last error any session of this cluster met with `address`.
pub fn last_error(address: &str) -> Option<String> {
    let listed = remotes();
    let mut servers = SERVERS.exclusive();
    let slot = servers.slot(address, &listed);
    (slot.error_len > 0).then(|| String::from_utf8_lossy(&slot.error[..slot.error_len as usize]).into_owned())
}

fn describe(served: &Served) -> String {
    format!(
        "model \"{}\" (revision {}, {}, {} dimensions)",
        served.model, served.revision, served.dtype, served.dimension
    )
}

/// Whether the cluster may use a server that serves `served`: its model must be
/// `nvembed.model`, its dtype `nvembed.dtype` (unless `auto`), and all of it what the first
/// server answered with. Err: why not.
pub fn check_served(served: &Served) -> Result<(), String> {
    let model = gucs::model();
    if served.model != model {
        return Err(format!("it serves {}, but nvembed.model is \"{model}\"", describe(served)));
    }
    let dtype = gucs::server_settings().dtype;
    if dtype != DEFAULT_DTYPE && !nvembed_protocol::serves_dtype(&served.dtype, &dtype) {
        return Err(format!("it serves {}, but nvembed.dtype is \"{dtype}\"", describe(served)));
    }
    let settings = hash(&format!("{model}\n{dtype}"));
    let wanted = describe(served);
    let mut servers = SERVERS.exclusive();
    if servers.pinned_under != settings || servers.pinned_len == 0 {
        let Servers { pinned, pinned_len, .. } = &mut *servers;
        store(pinned, pinned_len, &wanted);
        servers.pinned_under = settings;
        return Ok(());
    }
    let pinned = String::from_utf8_lossy(&servers.pinned[..servers.pinned_len as usize]).into_owned();
    if pinned == wanted {
        Ok(())
    } else {
        Err(format!("it serves {wanted}, but this cluster's servers serve {pinned}"))
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::*;
    use pgrx::prelude::*;

    #[pg_test]
    fn server_lists_parse_or_say_what_is_wrong() {
        let parsed = parse_servers(" gpu1.example:7443, [::1]:7444 ,10.0.0.2:1,").unwrap();
        let shown: Vec<(&str, &str, u16)> = parsed.iter().map(|r| (r.address.as_str(), r.host.as_str(), r.port)).collect();
        assert_eq!(
            shown,
            [("gpu1.example:7443", "gpu1.example", 7443), ("[::1]:7444", "::1", 7444), ("10.0.0.2:1", "10.0.0.2", 1)]
        );
        assert!(parse_servers("").unwrap().is_empty());
        for (bad, says) in [
            ("gpu1.example", "is not host:port"),
            ("gpu1:0", "is not host:port"),
            ("gpu1:99999", "is not host:port"),
            ("::1:7443", "is not host:port"),
            (":7443", "is not host:port"),
            ("user@gpu1:7443", "is not host:port"),
            ("a:1, a:1", "listed twice"),
        ] {
            let error = parse_servers(bad).unwrap_err();
            assert!(error.contains(says), "{bad}: {error}");
        }
    }

    /// Settings and reload-only values are refused where they must be, with PostgreSQL's own
    /// SQLSTATEs; the token and CA files are hidden from roles without pg_read_all_settings.
    #[pg_test]
    fn server_settings_are_checked_and_guarded() {
        use crate::sql_tests::tests::{assert_error, self_connection};
        assert_error("SET nvembed.servers = 'a:1'", "55P02", "cannot be changed now");
        // ALTER SYSTEM runs outside this test's transaction, in a session of its own.
        Spi::run("CREATE EXTENSION IF NOT EXISTS dblink").unwrap();
        let alter = format!(
            "PERFORM dblink_exec({}, 'ALTER SYSTEM SET nvembed.servers = ''gpu1''')",
            pgrx::spi::quote_literal(&self_connection())
        );
        assert_error(&alter, "22023", "invalid value for parameter \"nvembed.servers\": \"gpu1\"");
        Spi::run("CREATE ROLE nvembed_server_reader").unwrap();
        Spi::run("SET ROLE nvembed_server_reader").unwrap();
        assert_error("PERFORM current_setting('nvembed.server_token_file')", "42501", "nvembed.server_token_file");
        assert_error("PERFORM current_setting('nvembed.server_ca_file')", "42501", "nvembed.server_ca_file");
        assert_eq!(Spi::get_one::<String>("SHOW nvembed.servers").unwrap().as_deref(), Some(""));
        Spi::run("RESET ROLE").unwrap();
    }

    fn remote(address: &str) -> Remote {
        parse_servers(address).unwrap().remove(0)
    }

    /// Calls go to the server with the least work in flight; one that failed is skipped until
    /// its backoff ends (unless every one is down); leases are given back when dropped.
    #[pg_test]
    fn calls_go_to_the_least_busy_server_that_is_up() {
        let listed: Vec<Remote> = ["chooser-a:1", "chooser-b:1", "chooser-c:1"].map(remote).into();
        let (first, lease_1) = choose(&listed, &[], 1000).unwrap();
        let (second, lease_2) = choose(&listed, &[], 10).unwrap();
        let (third, lease_3) = choose(&listed, &[], 10).unwrap();
        let mut spread = [first.address.clone(), second.address.clone(), third.address.clone()];
        spread.sort();
        assert_eq!(spread, ["chooser-a:1", "chooser-b:1", "chooser-c:1"]);
        // The next goes where the least bytes are in flight: not where 1000 are.
        let (fourth, lease_4) = choose(&listed, &[], 10).unwrap();
        assert_ne!(fourth.address, first.address);
        // A call never tries a server twice.
        let tried = [second.address.clone(), third.address.clone()];
        assert_eq!(choose(&listed, &tried, 10).unwrap().0.address, first.address);
        drop((lease_1, lease_2, lease_3, lease_4));
        // A failed server is skipped while its backoff lasts...
        failed("chooser-a:1", "connection refused", true);
        for _ in 0..4 {
            assert_ne!(choose(&listed, &[], 10).unwrap().0.address, "chooser-a:1");
        }
        assert_eq!(last_error("chooser-a:1").as_deref(), Some("connection refused"));
        // ...unless it is the only one left to try.
        let others = ["chooser-b:1".to_string(), "chooser-c:1".to_string()];
        assert_eq!(choose(&listed, &others, 10).unwrap().0.address, "chooser-a:1");
        // A busy server is up: it stays a candidate.
        failed("chooser-b:1", "busy", false);
        let only_b = ["chooser-a:1".to_string(), "chooser-c:1".to_string()];
        assert_eq!(choose(&listed, &only_b, 10).unwrap().0.address, "chooser-b:1");
        succeeded("chooser-a:1");
        let all: Vec<String> = listed.iter().map(|r| r.address.clone()).collect();
        assert!(choose(&listed, &all, 10).is_none());
        // Every lease was given back: nothing is in flight.
        let mut servers = SERVERS.exclusive();
        for r in &listed {
            let slot = servers.slot(&r.address, &listed);
            assert_eq!((slot.calls, slot.bytes), (0, 0), "{}", r.address);
        }
    }
}
