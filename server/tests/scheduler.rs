//! The scheduler on the tiny fixture: per-call answers equal to the engine's, interactive calls
//! overtaking bulk work, cancellation dropping rows mid-pass, and bounded results for a client
//! that does not read.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvembed_engine::{DType, Device, EmbedOptions, Embedder, ModelSource, PASSAGE_INSTRUCTION, QUERY_INSTRUCTION};
use nvembed_protocol::WorkClass;
use nvembed_server::scheduler::{Event, JobHandle, Scheduler, RESULT_WINDOW_ROWS};
use nvembed_server::stats::Stats;

fn model() -> Arc<Embedder> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../engine/tests/fixtures/nvembed-tiny-a");
    let files = ModelSource::Dir(dir).resolve().unwrap();
    Arc::new(Embedder::load(&files, DType::F32, &Device::Cpu).unwrap())
}

fn start() -> (Arc<Scheduler>, Arc<Stats>) {
    let stats = Arc::new(Stats::default());
    let scheduler = Scheduler::new(16_384, stats.clone());
    let runner = scheduler.clone();
    std::thread::spawn(move || runner.run());
    (scheduler, stats)
}

fn submit(scheduler: &Scheduler, model: &Arc<Embedder>, class: WorkClass, instruction: &str, texts: &[String]) -> JobHandle {
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let inputs = model.encode(instruction, &refs, 32_768).unwrap();
    scheduler.submit(class, inputs, model.clone())
}

fn vector(event: Event) -> (usize, Vec<f32>) {
    match event {
        Event::Vector { index, vector } => (index, vector),
        Event::Failed { message, .. } => panic!("{message}"),
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn long_texts(n: usize) -> Vec<String> {
    let sentence = "The lighthouse beam sweeps across the water in slow, steady circles. ";
    (0..n).map(|i| format!("{i} {}", sentence.repeat(100))).collect()
}

#[test]
fn an_interactive_call_overtakes_bulk_work_and_every_vector_equals_the_engines() {
    let model = model();
    let (scheduler, _) = start();
    let texts = long_texts(12);
    let bulk = submit(&scheduler, &model, WorkClass::Bulk, PASSAGE_INSTRUCTION, &texts);
    std::thread::sleep(Duration::from_millis(200));
    let question = vec!["where is the lighthouse?".to_string()];
    let query = submit(&scheduler, &model, WorkClass::Interactive, QUERY_INSTRUCTION, &question);
    let (index, got) = vector(query.events.recv_timeout(Duration::from_secs(10)).unwrap());
    let bulk_done_by_then = bulk.events.try_iter().map(vector).collect::<Vec<_>>();
    assert_eq!(index, 0);
    let want = model.embed(QUERY_INSTRUCTION, &["where is the lighthouse?"], &EmbedOptions::default()).unwrap();
    assert!(max_abs_diff(&got, &want[0]) <= 1e-6);
    assert!(bulk_done_by_then.len() < texts.len(), "the query waited for the whole bulk call");
    let mut all = bulk_done_by_then;
    while all.len() < texts.len() {
        all.push(vector(bulk.events.recv_timeout(Duration::from_secs(60)).unwrap()));
    }
    all.sort_by_key(|(index, _)| *index);
    for (index, got) in all {
        let want = model.embed(PASSAGE_INSTRUCTION, &[texts[index].as_str()], &EmbedOptions::default()).unwrap();
        assert!(max_abs_diff(&got, &want[0]) <= 1e-5, "row {index}");
    }
}

#[test]
fn a_cancelled_call_leaves_its_pass_at_the_next_layer() {
    let model = model();
    let (scheduler, stats) = start();
    let job = submit(&scheduler, &model, WorkClass::Bulk, PASSAGE_INSTRUCTION, &long_texts(40));
    let started = Instant::now();
    while Stats::get(&stats.active_rows) == 0 {
        assert!(started.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(5));
    }
    job.cancel();
    let cancelled = Instant::now();
    while Stats::get(&stats.active_rows) > 0 {
        assert!(cancelled.elapsed() < Duration::from_secs(1), "rows of a cancelled call still computed");
        std::thread::sleep(Duration::from_millis(5));
    }
    let received = job.events.try_iter().count();
    assert!(received < 40);
    assert_eq!(Stats::get(&stats.cancelled_rows) as usize, 40 - received);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(job.events.try_iter().count(), 0, "nothing is delivered after a cancel");
}

#[test]
fn a_client_that_does_not_read_holds_at_most_two_windows_of_results() {
    let model = model();
    let (scheduler, _) = start();
    let rows = 2 * RESULT_WINDOW_ROWS + 300;
    let texts: Vec<String> = (0..rows).map(|i| format!("short text {i}")).collect();
    let job = submit(&scheduler, &model, WorkClass::Bulk, PASSAGE_INSTRUCTION, &texts);
    let mut received = 0;
    while let Ok(event) = job.events.recv_timeout(Duration::from_secs(2)) {
        vector(event);
        received += 1;
    }
    assert_eq!(received, 2 * RESULT_WINDOW_ROWS, "results were computed ahead of the client");
    // Once the client has taken the first window, the rest follows.
    job.set_written(RESULT_WINDOW_ROWS);
    while received < rows {
        vector(job.events.recv_timeout(Duration::from_secs(10)).unwrap());
        received += 1;
    }
}
