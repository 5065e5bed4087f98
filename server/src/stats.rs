//! Counters reported by status, updated by the connections and the scheduler.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::metrics::ByClass;

#[derive(Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub tokens: AtomicU64,
    pub waiting: AtomicU64,
    pub active_rows: AtomicU64,
    pub cancelled_rows: AtomicU64,
    pub refused_connections: AtomicU64,
    /// Model time by class of work, in microseconds.
    pub interactive_micros: AtomicU64,
    pub bulk_micros: AtomicU64,
    /// Calls, rows, tokens and pass durations by class, for `/metrics`.
    pub by_class: ByClass,
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

    pub fn add_seconds(counter: &AtomicU64, seconds: f64) {
        Self::add(counter, (seconds * 1e6) as u64);
    }

    pub fn seconds(counter: &AtomicU64) -> f64 {
        Self::get(counter) as f64 / 1e6
    }
}
