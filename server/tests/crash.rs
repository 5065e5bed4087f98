//! Crash-only: a panic in any thread ends the whole process with SIGABRT.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

const CHILD: &str = "NVEMBED_CRASH_TEST_CHILD";

#[test]
fn a_panic_in_any_thread_aborts_the_process() {
    if std::env::var_os(CHILD).is_some() {
        nvembed_server::crash::abort_on_panic();
        let _ = std::thread::spawn(|| panic!("scheduler exploded")).join();
        // Without the hook the main thread would go on and exit normally.
        std::thread::sleep(std::time::Duration::from_secs(5));
        std::process::exit(0);
    }
    let output = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "a_panic_in_any_thread_aborts_the_process", "--nocapture", "--test-threads", "1"])
        .env(CHILD, "1")
        .output()
        .unwrap();
    assert_eq!(output.status.signal(), Some(libc::SIGABRT), "{:?}", output);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("scheduler exploded"), "{stderr}");
    assert!(stderr.contains("aborting after a panic"), "{stderr}");
}
