//! Counters reported by status, updated by the connections and the scheduler.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub tokens: AtomicU64,
    pub waiting: AtomicU64,
    pub active_rows: AtomicU64,
    pub cancelled_rows: AtomicU64,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::SeqCst);
    }

    pub fn sub(counter: &AtomicU64, n: u64) {
        counter.fetch_sub(n, Ordering::SeqCst);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::SeqCst)
    }
}
