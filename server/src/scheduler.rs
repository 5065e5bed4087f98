//! The model's time, shared by every call of every session.
//!
//! Two classes of work. *Interactive* calls (one text: a search, a trigger) wait for nothing but
//! the decoder layer that is running when they arrive (and the gather below, at most
//! `GATHER_MAX`): at every layer boundary, the interactive
//! calls that arrived are gathered into one pass (calls that arrive together share it) that runs
//! to its end before the bulk pass in flight takes its next layer. *Bulk* calls (batches,
//! backfill) are cut into passes: at most one is in flight, sized so that one of its layers
//! takes about `LAYER_SECONDS` (never fewer than `MIN_PASS_TOKENS` padded tokens, where GEMMs
//! are still efficient, and never more than the `batch_tokens` budget), filled round-robin from
//! every waiting bulk call so none starves. Each call gets its vectors as soon as its own rows
//! are pooled. A call whose client left is dropped from its pass at the next layer boundary:
//! its rows stop costing anything, the other rows of the pass go on unchanged.
//!
//! Bulk work is never starved by a steady stream of interactive calls: while both wait, bulk
//! keeps `BULK_SHARE` of the model's time, one bulk layer at a time between interactive layers,
//! so an arriving interactive call still waits for at most one bulk layer (and the gather).
//!
//! Sessions that each wait for their one answer and then send the next call come back together
//! after the pass that answered them: an interactive pass that answered `n` calls makes the next
//! interactive pass wait, for at most `GATHER_SHARE` of its own time and `GATHER_MAX`, until `n`
//! interactive calls (from anyone) have been submitted since it sent its answers, or until the
//! interactive calls queued fill a pass; bulk takes a layer meanwhile only if it is owed one.
//! Without that, the first call back after a pass (or the first of a burst) starts a pass alone,
//! its peers queue behind it, and the sessions split for good into groups that alternate in small
//! passes.
//!
//! Nothing is computed far ahead of its reader: a call's rows are taken into passes only up to
//! `READ_AHEAD_PASSES` pass's worth of tokens beyond what its client has read (what streaming
//! needs: one pass computing while the client consumes the one it read). A cursor that stops
//! fetching, or a LIMIT, leaves the rest of the call uncomputed.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nvembed_engine::{ensure_finite, EmbedPass, Embedder, EncodedInput};
use nvembed_protocol::{ErrorKind, WorkClass};

use crate::metrics::Class;
use crate::stats::Stats;

/// Target time of one layer of a bulk pass: how long an arriving interactive call may wait.
pub const LAYER_SECONDS: f64 = 0.05;
/// Fewest padded tokens in a bulk pass: below this, matrix products lose efficiency.
pub const MIN_PASS_TOKENS: usize = 256;
/// Passes of a call's rows that may be computed beyond what its client has read: one computes
/// while the client consumes what it read (its rows are sorted by length within that reach, so
/// that passes hold rows of similar length).
pub const READ_AHEAD_PASSES: usize = 1;
/// Least share of the model's time that bulk work keeps while interactive calls also wait.
pub const BULK_SHARE: f64 = 0.25;
/// Longest wait of an interactive pass for the calls answered by the previous one to come back:
/// a session's round trip (its result to SQL, its next statement, tokenizing) on one host or a
/// LAN is well under this.
pub const GATHER_MAX: Duration = Duration::from_millis(10);
/// Largest share of the previous interactive pass's time that the next may wait for its callers:
/// a tiny model's passes of a millisecond hardly wait at all.
pub const GATHER_SHARE: f64 = 0.05;
/// How often an idle scheduler with blocked calls looks again.
const IDLE_POLL: Duration = Duration::from_millis(20);

/// What a call's connection receives from the scheduler.
#[derive(Debug)]
pub enum Event {
    Vector { index: usize, vector: Vec<f32> },
    Failed { kind: ErrorKind, message: String },
}

/// One call, as submitted.
struct Job {
    id: u64,
    /// Who called: bulk passes are led by each client in turn.
    client: Box<str>,
    class: WorkClass,
    inputs: Vec<EncodedInput>,
    embedder: Arc<Embedder>,
    cancelled: AtomicBool,
    /// Vectors the client has read, in input order (as far as the connection can tell).
    read: AtomicUsize,
    events: Mutex<Sender<Event>>,
}

impl Job {
    fn send(&self, event: Event) {
        // The connection may be gone: its results are then discarded.
        let _ = self.events.lock().unwrap_or_else(|p| p.into_inner()).send(event);
    }
}

/// The connection's side of a call.
pub struct JobHandle {
    job: Arc<Job>,
    pub events: Receiver<Event>,
}

impl JobHandle {
    /// The client left: drop the call's rows at the next layer boundary.
    pub fn cancel(&self) {
        self.job.cancelled.store(true, Ordering::SeqCst);
    }

    /// The client has read the first `n` vectors.
    pub fn set_read(&self, n: usize) {
        self.job.read.store(n, Ordering::SeqCst);
    }
}

/// A handle dropped is a call nobody reads any more (the connection ended or gave up): its
/// rows stop costing anything at the next layer, as after `cancel`.
impl Drop for JobHandle {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// Calls submitted and not yet queued by the scheduler.
#[derive(Default)]
struct Inbox {
    jobs: Vec<Arc<Job>>,
    /// Interactive calls ever submitted: counted under the same lock as the push, so a count
    /// read by the scheduler is of calls it can take.
    interactive_submitted: usize,
}

pub struct Scheduler {
    inbox: Mutex<Inbox>,
    wake: Condvar,
    next_id: AtomicUsize,
    batch_tokens: usize,
    stats: Arc<Stats>,
}

/// The scheduler's view of a call.
struct Entry {
    job: Arc<Job>,
    /// Interactive calls longer than a bulk pass run as bulk: they would hold the model as long.
    class: WorkClass,
    /// Rows of the open sort window not yet taken, shortest first.
    pending: VecDeque<usize>,
    /// Rows [0, opened) have been put into sort windows.
    opened: usize,
    /// The call's tokens per row, on average (at least 1).
    mean_tokens: usize,
    done: usize,
}

impl Entry {
    fn rows(&self) -> usize {
        self.job.inputs.len()
    }

    fn len_of(&self, row: usize) -> usize {
        self.job.inputs[row].ids.len()
    }

    /// Tokens of the rows not yet taken into a pass.
    fn untaken_tokens(&self) -> usize {
        let unopened = (self.opened..self.rows()).map(|row| self.len_of(row));
        self.pending.iter().map(|&row| self.len_of(row)).chain(unopened).sum()
    }

    /// Whether a row can be taken now. Rows are put into sort windows (taken shortest first)
    /// only up to `READ_AHEAD_PASSES` passes of `pass_tokens` beyond what the client has read,
    /// counted in the call's mean tokens per row. The next row the client needs is always
    /// within that reach, so a long first row never waits behind rows computed after it.
    fn ready(&mut self, pass_tokens: usize) -> bool {
        if self.pending.is_empty() && self.opened < self.rows() {
            let read = self.job.read.load(Ordering::SeqCst);
            let ahead = (READ_AHEAD_PASSES * pass_tokens / self.mean_tokens).max(1);
            let end = read.saturating_add(ahead).min(self.rows());
            if end > self.opened {
                let mut window: Vec<usize> = (self.opened..end).collect();
                window.sort_by_key(|&row| self.len_of(row));
                self.pending.extend(window);
                self.opened = end;
            }
        }
        !self.pending.is_empty()
    }


}

/// A pass in flight and whose rows it holds.
struct Running {
    pass: EmbedPass,
    embedder: Arc<Embedder>,
    rows: Vec<(u64, usize)>,
    class: WorkClass,
    started: Instant,
}

/// Measured seconds per padded token of a decoder layer, to size bulk passes by time. Latent
/// steps are not sampled: a small pass runs its latent block in one step of several layers' cost.
struct LayerCost(Option<f64>);

impl LayerCost {
    fn record(&mut self, seconds: f64, padded_tokens: usize) {
        let sample = seconds / padded_tokens.max(1) as f64;
        self.0 = Some(match self.0 {
            Some(old) => 0.7 * old + 0.3 * sample,
            None => sample,
        });
    }

    /// Padded tokens of a bulk pass whose layer takes about LAYER_SECONDS.
    fn pass_tokens(&self, batch_tokens: usize) -> usize {
        let by_time = match self.0 {
            Some(per_token) => (LAYER_SECONDS / per_token) as usize,
            None => MIN_PASS_TOKENS, // nothing measured yet: start small
        };
        by_time.clamp(MIN_PASS_TOKENS.min(batch_tokens), batch_tokens.max(1))
    }
}

/// Model time bulk work is owed, in seconds: interactive work adds to it while bulk waits, so
/// that bulk's layers come to `BULK_SHARE` of the time; each bulk layer pays its time back.
#[derive(Default)]
struct BulkCredit(f64);

impl BulkCredit {
    fn interactive(&mut self, seconds: f64) {
        self.0 += seconds * BULK_SHARE / (1.0 - BULK_SHARE);
    }

    fn bulk(&mut self, seconds: f64) {
        self.0 -= seconds;
    }

    fn due(&self) -> bool {
        self.0 > 0.0
    }

    /// No bulk work waits: nothing is owed (time is not banked for later).
    fn clear(&mut self) {
        self.0 = 0.0;
    }
}

/// The wait of the next interactive pass for the callers the last one answered.
struct Gather {
    /// Interactive calls the last interactive pass answered.
    answered: usize,
    /// Interactive calls submitted before its answers were sent: later ones count as back.
    submitted_before: usize,
    until: Instant,
}

impl Gather {
    fn after(answered: usize, submitted_before: usize, pass_seconds: f64) -> Self {
        let wait = GATHER_MAX.min(Duration::from_secs_f64(pass_seconds.max(0.0) * GATHER_SHARE));
        Self {
            answered,
            submitted_before,
            until: Instant::now() + wait,
        }
    }

    /// How much longer to wait, if at all, with `submitted` interactive calls so far.
    fn remaining(&self, submitted: usize) -> Option<Duration> {
        if submitted.saturating_sub(self.submitted_before) >= self.answered {
            return None;
        }
        self.until.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())
    }
}

#[derive(Default)]
struct Calls {
    entries: HashMap<u64, Entry>,
    interactive: VecDeque<u64>,
    bulk: VecDeque<u64>,
    /// Bulk passes started, and the number of the pass each client with queued bulk calls
    /// last led.
    bulk_passes: u64,
    led: HashMap<Box<str>, u64>,
    /// Calls the last interactive pass answered (or failed), and the interactive calls
    /// submitted when it began to send those answers.
    answered: usize,
    submitted_when_answered: usize,
}

impl Calls {
    /// Whether the queued interactive rows already fill a pass of `budget` padded tokens (their
    /// tokens alone reach it; padding only adds to them).
    fn interactive_fills(&self, budget: usize) -> bool {
        let mut tokens = 0;
        self.interactive.iter().any(|id| {
            tokens += self.entries[id].untaken_tokens();
            tokens >= budget
        })
    }
}

/// Takes ready rows of the calls in `order`, in that order, while rows × longest row stays
/// within `budget` padded tokens (a first row longer than the budget runs alone).
fn take_rows(entries: &mut HashMap<u64, Entry>, order: &VecDeque<u64>, budget: usize) -> Vec<(u64, usize)> {
    let mut rows = Vec::new();
    let mut longest = 0;
    for &id in order {
        let entry = entries.get_mut(&id).expect("queued calls have entries");
        while entry.ready(budget) {
            let row = *entry.pending.front().expect("ready");
            let len = longest.max(entry.len_of(row));
            if !rows.is_empty() && (rows.len() + 1) * len > budget {
                return rows;
            }
            entry.pending.pop_front();
            longest = len;
            rows.push((id, row));
        }
    }
    rows
}

impl Scheduler {
    pub fn new(batch_tokens: usize, stats: Arc<Stats>) -> Arc<Self> {
        Arc::new(Self {
            inbox: Mutex::new(Inbox::default()),
            wake: Condvar::new(),
            next_id: AtomicUsize::new(0),
            batch_tokens: batch_tokens.max(1),
            stats,
        })
    }

    /// Queues a call of `client` (a role, or a token's name); its vectors and errors arrive on
    /// the handle's `events`.
    pub fn submit(&self, client: &str, class: WorkClass, inputs: Vec<EncodedInput>, embedder: Arc<Embedder>) -> JobHandle {
        let (sender, events) = mpsc::channel();
        let job = Arc::new(Job {
            id: self.next_id.fetch_add(1, Ordering::SeqCst) as u64,
            client: client.into(),
            class,
            inputs,
            embedder,
            cancelled: AtomicBool::new(false),
            read: AtomicUsize::new(0),
            events: Mutex::new(sender),
        });
        let mut inbox = self.inbox.lock().unwrap_or_else(|p| p.into_inner());
        inbox.jobs.push(job.clone());
        if class == WorkClass::Interactive {
            inbox.interactive_submitted += 1;
        }
        drop(inbox);
        self.wake.notify_one();
        JobHandle { job, events }
    }

    /// Runs the model on the calling thread, forever.
    pub fn run(&self) {
        let mut calls = Calls::default();
        let mut cost = LayerCost(None);
        let mut bulk: Option<Running> = None;
        let mut share = BulkCredit::default();
        let mut gather: Option<Gather> = None;
        loop {
            let idle = bulk.is_none() && calls.entries.is_empty();
            let submitted = self.admit(&mut calls, &cost, idle);
            self.drop_cancelled(&mut calls);
            // No wait when the calls already queued fill a pass: those coming back would not fit.
            let waiting = gather.as_ref().and_then(|g| g.remaining(submitted));
            if let Some(wait) = waiting.filter(|_| !calls.interactive_fills(self.batch_tokens)) {
                // The last pass's callers are coming back: bulk takes a layer only if it is
                // owed one (as between interactive layers), else the model waits for them.
                if share.due() {
                    if let Some(seconds) = self.bulk_step(&mut bulk, &mut calls, &mut cost) {
                        share.bulk(seconds);
                        continue;
                    }
                    share.clear();
                }
                self.wait_for_calls(wait);
                continue;
            }
            gather = None;
            if let Some(pass) = self.take_interactive_pass(&mut calls) {
                // A pass whose callers all left ends without answering anyone.
                calls.answered = 0;
                let mut pass = Some(pass);
                let mut pass_seconds = 0.0;
                while pass.is_some() {
                    let seconds = self.advance(&mut pass, &mut calls, &mut cost);
                    pass_seconds += seconds;
                    Stats::add_seconds(&self.stats.interactive_micros, seconds);
                    share.interactive(seconds);
                    self.drop_cancelled(&mut calls);
                    if share.due() {
                        match self.bulk_step(&mut bulk, &mut calls, &mut cost) {
                            Some(seconds) => share.bulk(seconds),
                            None => share.clear(),
                        }
                    }
                }
                gather = Some(Gather::after(calls.answered, calls.submitted_when_answered, pass_seconds));
                continue;
            }
            // No interactive call waits: bulk owes nothing for the time it now takes.
            share.clear();
            if self.bulk_step(&mut bulk, &mut calls, &mut cost).is_none() && !calls.entries.is_empty() {
                // Every queued call waits for its client to read results.
                self.wait_for_calls(IDLE_POLL);
            }
        }
    }

    /// Waits at most `timeout` for a call to be submitted.
    fn wait_for_calls(&self, timeout: Duration) {
        let inbox = self.inbox.lock().unwrap_or_else(|p| p.into_inner());
        if inbox.jobs.is_empty() {
            let _unused = self.wake.wait_timeout(inbox, timeout);
        }
    }

    /// Runs one layer of bulk work, starting a pass if none is in flight, and returns the time
    /// it took; None when no bulk row can run now.
    fn bulk_step(&self, bulk: &mut Option<Running>, calls: &mut Calls, cost: &mut LayerCost) -> Option<f64> {
        if bulk.is_none() {
            *bulk = self.take_bulk_pass(calls, cost);
        }
        bulk.as_ref()?;
        let seconds = self.advance(bulk, calls, cost);
        Stats::add_seconds(&self.stats.bulk_micros, seconds);
        Some(seconds)
    }

    /// Moves submitted calls into the queues, waiting for one when `block`; returns how many
    /// interactive calls have been submitted, all of them now queued (or answered).
    fn admit(&self, calls: &mut Calls, cost: &LayerCost, block: bool) -> usize {
        let mut inbox = self.inbox.lock().unwrap_or_else(|p| p.into_inner());
        while block && inbox.jobs.is_empty() {
            inbox = self.wake.wait(inbox).unwrap_or_else(|p| p.into_inner());
        }
        let bulk_pass = cost.pass_tokens(self.batch_tokens);
        for job in inbox.jobs.drain(..) {
            let longest = job.inputs.iter().map(|i| i.ids.len()).max().unwrap_or(0);
            let class = match job.class {
                WorkClass::Interactive if longest > bulk_pass => WorkClass::Bulk,
                other => other,
            };
            match class {
                WorkClass::Interactive => calls.interactive.push_back(job.id),
                WorkClass::Bulk => calls.bulk.push_back(job.id),
            }
            let entry = Entry {
                job: job.clone(),
                class,
                pending: VecDeque::new(),
                opened: 0,
                mean_tokens: (job.inputs.iter().map(|i| i.ids.len()).sum::<usize>() / job.inputs.len().max(1)).max(1),
                done: 0,
            };
            calls.entries.insert(job.id, entry);
        }
        inbox.interactive_submitted
    }

    /// Forgets calls whose client left (their rows leave passes at the next `advance`).
    fn drop_cancelled(&self, calls: &mut Calls) {
        let gone: Vec<u64> = calls
            .entries
            .iter()
            .filter(|(_, e)| e.job.cancelled.load(Ordering::SeqCst))
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.forget(calls, id);
        }
    }

    fn forget(&self, calls: &mut Calls, id: u64) {
        if let Some(entry) = calls.entries.remove(&id) {
            let queue = match entry.class {
                WorkClass::Interactive => &mut calls.interactive,
                WorkClass::Bulk => &mut calls.bulk,
            };
            queue.retain(|&other| other != id);
            if entry.job.cancelled.load(Ordering::SeqCst) {
                Stats::add(&self.stats.cancelled_rows, (entry.rows() - entry.done) as u64);
            }
        }
    }

    /// Every waiting interactive row that fits in one pass of `batch_tokens`, oldest first.
    fn take_interactive_pass(&self, calls: &mut Calls) -> Option<Running> {
        let rows = take_rows(&mut calls.entries, &calls.interactive, self.batch_tokens);
        self.start(calls, rows, WorkClass::Interactive)
    }

    /// A bulk pass sized by time, filled round-robin: each pass starts with the next call.
    /// Each pass is led by the client that led least recently (so a client's many calls get
    /// no more than another client's one), and among its calls by the one that waited longest.
    fn take_bulk_pass(&self, calls: &mut Calls, cost: &LayerCost) -> Option<Running> {
        let mut order: Vec<u64> = calls.bulk.iter().copied().collect();
        // A stable sort: calls of one client keep their queue order.
        order.sort_by_key(|id| calls.led.get(&calls.entries[id].job.client).copied().unwrap_or(0));
        let rows = take_rows(&mut calls.entries, &order.into(), cost.pass_tokens(self.batch_tokens));
        if let Some(&(first, _)) = rows.first() {
            calls.bulk_passes += 1;
            let client = calls.entries[&first].job.client.clone();
            calls.led.insert(client, calls.bulk_passes);
            // Round-robin within the client: the call that led goes to the back of the queue.
            calls.bulk.retain(|&id| id != first);
            calls.bulk.push_back(first);
            let entries = &calls.entries;
            let queued: Vec<&str> = calls.bulk.iter().map(|id| &*entries[id].job.client).collect();
            calls.led.retain(|client, _| queued.contains(&&**client));
        }
        self.start(calls, rows, WorkClass::Bulk)
    }

    fn start(&self, calls: &mut Calls, rows: Vec<(u64, usize)>, class: WorkClass) -> Option<Running> {
        let (first_id, _) = *rows.first()?;
        let embedder = calls.entries[&first_id].job.embedder.clone();
        let members: Vec<&EncodedInput> = rows
            .iter()
            .map(|&(id, row)| &calls.entries[&id].job.inputs[row])
            .collect();
        match embedder.begin_pass(&members) {
            Ok(pass) => {
                Stats::add(&self.stats.active_rows, rows.len() as u64);
                let by_class = &self.stats.by_class.pass_rows;
                by_class.get_or_create(&Class::from(class)).observe(rows.len() as f64);
                Some(Running {
                    pass,
                    embedder,
                    rows,
                    class,
                    started: Instant::now(),
                })
            }
            Err(e) => {
                self.fail_rows(calls, &rows, ErrorKind::Internal, &e.to_string());
                None
            }
        }
    }

    /// Drops the rows of calls that are gone, then runs one layer; pools and answers when the
    /// last layer has run. Returns the model time it took.
    fn advance(&self, slot: &mut Option<Running>, calls: &mut Calls, cost: &mut LayerCost) -> f64 {
        let started = Instant::now();
        self.advance_pass(slot, calls, cost);
        started.elapsed().as_secs_f64()
    }

    fn advance_pass(&self, slot: &mut Option<Running>, calls: &mut Calls, cost: &mut LayerCost) {
        let Some(running) = slot.as_mut() else { return };
        let keep: Vec<usize> = (0..running.rows.len())
            .filter(|&i| calls.entries.contains_key(&running.rows[i].0))
            .collect();
        if keep.len() < running.rows.len() {
            Stats::sub(&self.stats.active_rows, (running.rows.len() - keep.len()) as u64);
            if keep.is_empty() {
                *slot = None;
                return;
            }
            running.rows = keep.iter().map(|&i| running.rows[i]).collect();
            if let Err(e) = running.pass.retain(&keep) {
                let rows = std::mem::take(&mut running.rows);
                self.end_pass(slot, calls, &rows, Err(e.to_string()));
                return;
            }
        }
        let started = Instant::now();
        let tokens = running.pass.padded_tokens();
        let decoder_layer = running.pass.in_decoder();
        match running.embedder.step_pass(&mut running.pass) {
            Ok(true) => {
                if decoder_layer {
                    cost.record(started.elapsed().as_secs_f64(), tokens);
                }
            }
            Ok(false) => {
                let result = running.embedder.finish_pass(&running.pass).map_err(|e| e.to_string());
                let rows = std::mem::take(&mut running.rows);
                self.end_pass(slot, calls, &rows, result);
            }
            Err(e) => {
                let rows = std::mem::take(&mut running.rows);
                self.end_pass(slot, calls, &rows, Err(e.to_string()));
            }
        }
    }

    fn end_pass(
        &self,
        slot: &mut Option<Running>,
        calls: &mut Calls,
        rows: &[(u64, usize)],
        result: Result<Vec<Vec<f32>>, String>,
    ) {
        Stats::sub(&self.stats.active_rows, rows.len() as u64);
        let interactive = slot.as_ref().is_some_and(|running| running.class == WorkClass::Interactive);
        if interactive {
            // Calls submitted from here on may be its callers coming back.
            calls.submitted_when_answered = self.inbox.lock().unwrap_or_else(|p| p.into_inner()).interactive_submitted;
        }
        if let Some(running) = slot.as_ref() {
            let class = Class::from(running.class);
            let seconds = running.started.elapsed().as_secs_f64();
            self.stats.by_class.pass_seconds.get_or_create(&class).observe(seconds);
        }
        match result {
            Ok(vectors) => {
                for (&(id, row), vector) in rows.iter().zip(vectors) {
                    self.deliver(calls, id, row, vector);
                }
            }
            Err(message) => self.fail_rows(calls, rows, ErrorKind::Internal, &message),
        }
        if interactive {
            // The calls it ended (a call of several texts may still have rows to come).
            let mut ids: Vec<u64> = rows.iter().map(|&(id, _)| id).collect();
            ids.dedup();
            calls.answered = ids.iter().filter(|id| !calls.entries.contains_key(id)).count();
        }
        // After the answers: dropping a large pass returns its memory to the OS first.
        *slot = None;
    }

    fn deliver(&self, calls: &mut Calls, id: u64, row: usize, vector: Vec<f32>) {
        let Some(entry) = calls.entries.get_mut(&id) else {
            return;
        };
        if let Err(e) = ensure_finite(row, &vector) {
            let message = e.to_string();
            self.fail_rows(calls, &[(id, row)], ErrorKind::NonFinite, &message);
            return;
        }
        let tokens = entry.len_of(row) as u64;
        let class = Class::from(entry.job.class);
        Stats::add(&self.stats.tokens, tokens);
        self.stats.by_class.tokens.get_or_create(&class).inc_by(tokens);
        self.stats.by_class.rows.get_or_create(&class).inc();
        entry.job.send(Event::Vector { index: row, vector });
        entry.done += 1;
        if entry.done == entry.rows() {
            self.stats.by_class.calls.get_or_create(&class).inc();
            self.forget(calls, id);
        }
    }

    /// Fails every call that owns one of `rows`, once.
    fn fail_rows(&self, calls: &mut Calls, rows: &[(u64, usize)], kind: ErrorKind, message: &str) {
        for &(id, _) in rows {
            if let Some(entry) = calls.entries.get(&id) {
                entry.job.send(Event::Failed {
                    kind,
                    message: message.to_string(),
                });
                self.forget(calls, id);
            }
        }
    }
}
