//! Crash-only: a panic anywhere ends the process. A server whose scheduler thread died would
//! otherwise keep accepting calls it never answers; a process that exits is restarted by the
//! supervisor, and every waiting session sees its connection close at once.

/// Makes every panic, in any thread, print its message and abort the process.
pub fn abort_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        eprintln!("nvembed-model-server: aborting after a panic (the supervisor restarts the server)");
        std::process::abort();
    }));
}
