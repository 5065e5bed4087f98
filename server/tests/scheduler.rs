//! The scheduler on the tiny fixture: per-call answers equal to the engine's, interactive calls
//! overtaking bulk work, bulk work keeping its share under a steady interactive load,
//! cancellation dropping rows mid-pass, nothing computed far ahead of a client that does not
//! read, and sessions that query in a loop meeting in one pass.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvembed_engine::random_checkpoint::Shape;
use nvembed_engine::{DType, Device, EmbedOptions, Embedder, ModelSource, PASSAGE_INSTRUCTION, QUERY_INSTRUCTION};
use nvembed_protocol::WorkClass;
use nvembed_server::metrics::{render, ModelFacts};
use nvembed_server::scheduler::{Event, JobHandle, Scheduler, BULK_SHARE, READ_AHEAD_PASSES};
use nvembed_server::stats::Stats;

fn model() -> Arc<Embedder> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../engine/tests/fixtures/nvembed-tiny-a");
    let files = ModelSource::Dir(dir).resolve().unwrap();
    Arc::new(Embedder::load(&files, DType::F32, &Device::Cpu).unwrap())
}

/// Waits, when dropped at the end of a test (after the test's calls, whose handles cancel them),
/// until its scheduler computes nothing: a scheduler thread still in a forward pass when the
/// test process exits runs into the compute libraries' teardown (SIGSEGV at exit).
struct Idle(Arc<Stats>);

impl Drop for Idle {
    fn drop(&mut self) {
        let started = Instant::now();
        while Stats::get(&self.0.active_rows) > 0 && started.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn start() -> (Arc<Scheduler>, Arc<Stats>, Idle) {
    start_with(16_384)
}

fn start_with(batch_tokens: usize) -> (Arc<Scheduler>, Arc<Stats>, Idle) {
    let stats = Arc::new(Stats::default());
    let scheduler = Scheduler::new(batch_tokens, stats.clone());
    let runner = scheduler.clone();
    std::thread::spawn(move || runner.run());
    (scheduler, stats.clone(), Idle(stats))
}

fn submit(scheduler: &Scheduler, model: &Arc<Embedder>, class: WorkClass, instruction: &str, texts: &[String]) -> JobHandle {
    submit_as("app", scheduler, model, class, instruction, texts)
}

fn submit_as(
    client: &str,
    scheduler: &Scheduler,
    model: &Arc<Embedder>,
    class: WorkClass,
    instruction: &str,
    texts: &[String],
) -> JobHandle {
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let inputs = model.encode(instruction, &refs, 32_768).unwrap();
    scheduler.submit(client, class, inputs, model.clone())
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
    let (scheduler, _, _idle) = start();
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
        // A reader that keeps up (the scheduler computes only a little ahead of its reads).
        bulk.set_read(all.len());
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
    let (scheduler, stats, _idle) = start();
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
fn nothing_is_computed_more_than_a_pass_ahead_of_what_the_client_read() {
    let model = model();
    let batch_tokens = 512;
    let (scheduler, _, _idle) = start_with(batch_tokens);
    let rows = 3000;
    let texts: Vec<String> = (0..rows).map(|i| format!("short text {i}")).collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let shortest = model.encode(PASSAGE_INSTRUCTION, &refs, 32_768).unwrap().iter().map(|i| i.ids.len()).min().unwrap();
    let most_per_pass = batch_tokens / shortest;
    let job = submit(&scheduler, &model, WorkClass::Bulk, PASSAGE_INSTRUCTION, &texts);
    let mut received = 0;
    while let Ok(event) = job.events.recv_timeout(Duration::from_secs(2)) {
        vector(event);
        received += 1;
    }
    assert!(received > 0);
    assert!(
        received <= READ_AHEAD_PASSES * most_per_pass,
        "{received} rows computed for a client that read none (passes hold at most {most_per_pass})"
    );
    // Once the client reads, the rest follows, still never far ahead of it.
    let mut read = 0;
    while read < rows {
        job.set_read(read);
        match job.events.recv_timeout(Duration::from_secs(2)) {
            Ok(event) => {
                vector(event);
                received += 1;
                read += 1;
            }
            Err(_) if read < received => read = received,
            Err(e) => panic!("stalled at {read} of {rows} rows read: {e}"),
        }
        assert!(received <= read + READ_AHEAD_PASSES * most_per_pass + 1, "{received} computed, {read} read");
    }
}

#[test]
fn bulk_work_keeps_its_share_while_interactive_calls_never_stop() {
    let model = model();
    let (scheduler, stats, _idle) = start_with(2048);
    // Enough interactive calls that some always wait for the next pass.
    let question = vec![long_texts(1)[0].clone()];
    let mut interactive: Vec<JobHandle> = (0..12)
        .map(|_| submit(&scheduler, &model, WorkClass::Interactive, QUERY_INSTRUCTION, &question))
        .collect();
    let texts = long_texts(6);
    let started = Instant::now();
    let (interactive_before, bulk_before) = (Stats::get(&stats.interactive_micros), Stats::get(&stats.bulk_micros));
    let bulk = submit(&scheduler, &model, WorkClass::Bulk, PASSAGE_INSTRUCTION, &texts);
    let mut bulk_rows = 0;
    let mut answered = 0;
    while bulk_rows < texts.len() {
        assert!(started.elapsed() < Duration::from_secs(120), "bulk work starved: {bulk_rows} of {} rows", texts.len());
        bulk_rows += bulk.events.try_iter().map(vector).count();
        bulk.set_read(bulk_rows);
        // Replace every answered interactive call at once: the queue never runs dry.
        for handle in interactive.iter_mut() {
            if let Ok(event) = handle.events.try_recv() {
                vector(event);
                answered += 1;
                *handle = submit(&scheduler, &model, WorkClass::Interactive, QUERY_INSTRUCTION, &question);
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let interactive_seconds = (Stats::get(&stats.interactive_micros) - interactive_before) as f64 / 1e6;
    let bulk_seconds = (Stats::get(&stats.bulk_micros) - bulk_before) as f64 / 1e6;
    let share = bulk_seconds / (bulk_seconds + interactive_seconds);
    eprintln!(
        "bulk share under a steady interactive load: {share:.3} ({bulk_seconds:.2} s bulk, {interactive_seconds:.2} s \
         interactive, {answered} interactive calls answered, bulk done in {:.2} s)",
        started.elapsed().as_secs_f64()
    );
    assert!(answered > 12, "the interactive load did not go on ({answered} answered)");
    assert!(
        share >= 0.8 * BULK_SHARE,
        "bulk got {share:.2} of the model's time ({bulk_seconds:.2} s vs {interactive_seconds:.2} s interactive)"
    );
}

#[test]
fn a_long_first_row_is_computed_although_the_client_reads_in_input_order() {
    let model = model();
    let (scheduler, _, _idle) = start_with(512);
    // The client can read row 1 only after row 0, the longest, which sorts last.
    let mut texts = long_texts(1);
    texts.extend((0..200).map(|i| format!("short text {i}")));
    let job = submit(&scheduler, &model, WorkClass::Bulk, PASSAGE_INSTRUCTION, &texts);
    let mut finished = vec![false; texts.len()];
    let mut read = 0;
    while read < texts.len() {
        let (index, _) = vector(job.events.recv_timeout(Duration::from_secs(20)).expect("the call stalled"));
        finished[index] = true;
        while read < texts.len() && finished[read] {
            read += 1;
        }
        job.set_read(read);
    }
}

#[test]
fn a_client_with_many_bulk_calls_gets_no_more_of_the_model_than_one_with_a_single_call() {
    let model = model();
    let (scheduler, _, _idle) = start_with(512);
    let texts = long_texts(1).into_iter().cycle().take(6).collect::<Vec<_>>();
    // "loader" queues eight calls first, then "search-app" one of the same size.
    let many: Vec<JobHandle> = (0..8)
        .map(|_| submit_as("loader", &scheduler, &model, WorkClass::Bulk, PASSAGE_INSTRUCTION, &texts))
        .collect();
    let one = submit_as("search-app", &scheduler, &model, WorkClass::Bulk, PASSAGE_INSTRUCTION, &texts);
    let mut one_done = 0;
    let mut many_done = 0;
    while one_done < texts.len() {
        one_done += one.events.try_iter().map(vector).count();
        one.set_read(one_done);
        for handle in &many {
            many_done += handle.events.try_iter().map(vector).count();
            // Read as fast as computed: only the scheduler's order holds these calls back.
            handle.set_read(texts.len());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // Passes are led by each client in turn: about as many of "loader"'s rows as of the other's
    // (by calls, "loader" would have had eight times as many).
    assert!(many_done <= 2 * texts.len(), "{many_done} rows of the eight calls for {one_done} of the one call");
}

/// A random checkpoint of the real tokenizer, slower than the tiny fixture: its interactive
/// passes take long enough for the gather window to matter.
fn slower_model(dir: &Path) -> Arc<Embedder> {
    let shape = Shape {
        vocab_size: 32_000,
        hidden_size: 512,
        intermediate_size: 1536,
        num_hidden_layers: 4,
        num_attention_heads: 8,
        num_key_value_heads: 2,
        rope_theta: 10_000.0,
        num_latents: 512,
        num_cross_heads: 8,
        cross_dim_head: 64,
    };
    shape.write(dir).unwrap();
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../engine/tests/fixtures/nvembed-tiny-a");
    std::fs::copy(tiny.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    let files = ModelSource::Dir(dir.to_path_buf()).resolve().unwrap();
    Arc::new(Embedder::load(&files, DType::F32, &Device::Cpu).unwrap())
}

/// `name{class="interactive"} value` in the metrics text.
fn interactive_metric(stats: &Stats, name: &str) -> f64 {
    let text = render(stats, &ModelFacts { load_seconds: None, restarts: 0 });
    let prefix = format!("{name}{{class=\"interactive\"}} ");
    let line = text.lines().find_map(|l| l.strip_prefix(&prefix)).unwrap_or_else(|| panic!("{prefix} in\n{text}"));
    line.parse().unwrap()
}

#[test]
fn sessions_that_query_in_a_loop_keep_meeting_in_one_pass() {
    const SESSIONS: usize = 4;
    const ROUNDS: usize = 10;
    let dir = tempfile::tempdir().unwrap();
    let model = slower_model(dir.path());
    let (scheduler, stats, _idle) = start();
    let sessions: Vec<_> = (0..SESSIONS)
        .map(|s| {
            let (scheduler, model) = (scheduler.clone(), model.clone());
            // ~120 tokens: a pass of the four takes a few hundred milliseconds, so the gather
            // window is at its 10 ms cap, far above a session thread's turnaround even when
            // the other tests keep both cores busy.
            let text = format!("how do the boats of harbour {s} cross the bay in winter? {}", "rough seas and fog ".repeat(24));
            // Encoded once: the session's turnaround is a channel's, not a tokenizer's.
            let input = model.encode(QUERY_INSTRUCTION, &[text.as_str()], 32_768).unwrap();
            std::thread::spawn(move || {
                for _ in 0..ROUNDS {
                    // A SQL session's turnaround between its answer and its next query.
                    std::thread::sleep(Duration::from_millis(1));
                    let call = scheduler.submit("app", WorkClass::Interactive, input.clone(), model.clone());
                    vector(call.events.recv_timeout(Duration::from_secs(60)).unwrap());
                }
            })
        })
        .collect();
    for session in sessions {
        session.join().unwrap();
    }
    let passes = interactive_metric(&stats, "nvembed_pass_rows_count");
    let rows = interactive_metric(&stats, "nvembed_pass_rows_sum");
    let seconds = interactive_metric(&stats, "nvembed_pass_seconds_sum");
    eprintln!("{rows} interactive rows in {passes} passes of {:.1} ms on average", seconds / passes * 1e3);
    assert_eq!(rows as usize, SESSIONS * ROUNDS);
    // The first calls may split into two passes; the sessions then meet: one pass per round,
    // and one more for the sessions that started a pass late (11 passes; 20 without the gather,
    // when the sessions alternate in two groups). Two more allow for late thread wake-ups.
    assert!(passes as usize <= ROUNDS + 3, "{rows} rows in {passes} passes");
}
