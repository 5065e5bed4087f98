//! What `GET /metrics` shows, in Prometheus' text format: calls, rows and tokens by class of
//! work, the duration of forward passes, the queue, and the model's load time and restarts.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use nvembed_protocol::WorkClass;

use crate::stats::Stats;

/// The `class` label: `interactive` or `bulk`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Class {
    class: &'static str,
}

impl From<WorkClass> for Class {
    fn from(class: WorkClass) -> Self {
        Self {
            class: match class {
                WorkClass::Interactive => "interactive",
                WorkClass::Bulk => "bulk",
            },
        }
    }
}

fn pass_buckets() -> Histogram {
    // 1 ms to ~33 s: a tiny model's pass to a long NV-Embed-v2 pass on a CPU.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

fn rows_buckets() -> Histogram {
    // 1 to 1,024 rows: a lone query to a pass of short texts.
    Histogram::new(exponential_buckets(1.0, 2.0, 11))
}

/// Counters by class, updated by the scheduler as calls finish.
pub struct ByClass {
    pub calls: Family<Class, Counter>,
    pub rows: Family<Class, Counter>,
    pub tokens: Family<Class, Counter>,
    pub pass_seconds: Family<Class, Histogram, fn() -> Histogram>,
    pub pass_rows: Family<Class, Histogram, fn() -> Histogram>,
}

impl Default for ByClass {
    fn default() -> Self {
        Self {
            calls: Family::default(),
            rows: Family::default(),
            tokens: Family::default(),
            pass_seconds: Family::new_with_constructor(pass_buckets),
            pass_rows: Family::new_with_constructor(rows_buckets),
        }
    }
}

/// The model's facts at the time of a scrape.
pub struct ModelFacts {
    pub load_seconds: Option<f64>,
    pub restarts: u64,
}

/// The metrics text of one scrape.
pub fn render(stats: &Stats, model: &ModelFacts) -> String {
    let mut registry = Registry::with_prefix("nvembed");
    let by_class = &stats.by_class;
    registry.register("calls", "Calls answered with vectors", by_class.calls.clone());
    registry.register("rows", "Texts embedded", by_class.rows.clone());
    registry.register("tokens", "Tokens embedded (unpadded)", by_class.tokens.clone());
    registry.register(
        "pass_seconds",
        "Duration of forward passes, from their first layer to pooling",
        by_class.pass_seconds.clone(),
    );
    registry.register("pass_rows", "Texts in a forward pass, when it starts", by_class.pass_rows.clone());
    registry.register("queued_calls", "Calls queued or in a pass", ConstGauge::new(Stats::get(&stats.waiting) as i64));
    registry.register("active_rows", "Rows in forward passes", ConstGauge::new(Stats::get(&stats.active_rows) as i64));
    registry.register(
        "cancelled_rows",
        "Rows dropped because their caller left",
        ConstCounter::new(Stats::get(&stats.cancelled_rows)),
    );
    registry.register(
        "refused_connections",
        "Connections and requests refused: a connection limit, or a missing or unknown token",
        ConstCounter::new(Stats::get(&stats.refused_connections)),
    );
    registry.register(
        "model_load_seconds",
        "Time the model took to load (0 while not loaded)",
        ConstGauge::new(model.load_seconds.unwrap_or(0.0)),
    );
    registry.register(
        "restarts",
        "Times the server was started again after it died",
        ConstGauge::new(model.restarts as i64),
    );
    let mut text = String::new();
    encode(&mut text, &registry).expect("writing to a String cannot fail");
    text
}
