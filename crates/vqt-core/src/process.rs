//! Child processes with a wall-clock limit.
//!
//! A GPU runtime that deadlocks (a driver, an autotune pass waiting on its own device queue) never
//! returns, and a test or a bench child stuck there would hold a CI run or a sweep forever. The
//! checks that drive a GPU backend run in a child process through [`output_within`], so a hang
//! becomes an error after a known time, with what the child printed so far.

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wait_timeout::ChildExt;

/// Why a limited child did not produce an [`Output`].
#[derive(Debug, thiserror::Error)]
pub enum LimitedError {
    /// The child could not be started.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The program run.
        program: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The child ran past the limit and was killed.
    #[error("{program} ran past its {limit_s} s limit and was killed; its last output:\n{tail}")]
    TimedOut {
        /// The program run.
        program: String,
        /// The limit, in seconds.
        limit_s: u64,
        /// The last lines of its stdout and stderr.
        tail: String,
    },
    /// Waiting on the child failed.
    #[error("waiting for {program}: {source}")]
    Wait {
        /// The program run.
        program: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Runs `cmd` to completion with stdout and stderr captured, like [`Command::output`], but kills
/// it once `limit` has passed.
pub fn output_within(cmd: &mut Command, limit: Duration) -> Result<Output, LimitedError> {
    let program = format!("{:?}", cmd.get_program());
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| LimitedError::Spawn { program: program.clone(), source })?;
    // Drained on their own threads into shared buffers, so a child that prints a lot never blocks
    // on a full pipe, and a killed child's output can be read even while a grandchild still holds
    // the pipe open.
    let drain = |r: Option<Box<dyn Read + Send>>| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let handle = std::thread::spawn(move || {
            let Some(mut r) = r else { return };
            let mut chunk = [0u8; 8192];
            while let Ok(n) = r.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(&chunk[..n]);
            }
        });
        (buf, handle)
    };
    let (out, out_t) = drain(child.stdout.take().map(|r| Box::new(r) as Box<dyn Read + Send>));
    let (err, err_t) = drain(child.stderr.take().map(|r| Box::new(r) as Box<dyn Read + Send>));
    let take = |b: &Arc<Mutex<Vec<u8>>>| std::mem::take(&mut *b.lock().unwrap_or_else(|e| e.into_inner()));
    let status = child.wait_timeout(limit).map_err(|source| LimitedError::Wait { program: program.clone(), source })?;
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        std::thread::sleep(Duration::from_millis(50)); // let the readers take the last bytes
        let text = format!("{}{}", String::from_utf8_lossy(&take(&out)), String::from_utf8_lossy(&take(&err)));
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        return Err(LimitedError::TimedOut { program, limit_s: limit.as_secs(), tail });
    };
    let _ = (out_t.join(), err_t.join());
    Ok(Output { status, stdout: take(&out), stderr: take(&err) })
}

/// The time limit for one GPU-backend check: `VQT_GPU_CHECK_LIMIT_S` seconds if set (and a
/// positive integer), else `default_s`.
pub fn gpu_check_limit(default_s: u64) -> Duration {
    let s = std::env::var("VQT_GPU_CHECK_LIMIT_S").ok().and_then(|v| v.trim().parse::<u64>().ok()).filter(|&s| s > 0);
    Duration::from_secs(s.unwrap_or(default_s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_child_within_its_limit_gives_its_output() {
        let o = output_within(Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]), Duration::from_secs(30)).unwrap();
        assert_eq!(o.status.code(), Some(3));
        assert_eq!(String::from_utf8_lossy(&o.stdout), "out\n");
        assert_eq!(String::from_utf8_lossy(&o.stderr), "err\n");
    }

    #[test]
    fn a_hung_child_is_killed_at_its_limit_with_its_last_output() {
        let t = Instant::now();
        let e = output_within(Command::new("sh").args(["-c", "echo started; sleep 60"]), Duration::from_millis(500)).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(30), "not killed: {:?}", t.elapsed());
        let msg = e.to_string();
        assert!(matches!(e, LimitedError::TimedOut { .. }) && msg.contains("started"), "{msg}");
    }
}

/// What wgpu-hal's OpenGL backend (wgpu 30) panics with when it waited more than 6 s for its
/// context lock (`CONTEXT_LOCK_TIMEOUT_SECS` in `wgpu-hal/src/gles/egl.rs`).
pub const GL_CONTEXT_LOCK_PANIC: &str = "Could not lock adapter context";

/// The exit code of a process that [`exit_on_runtime_deadlock`] ended.
pub const RUNTIME_DEADLOCK_EXIT: i32 = 3;

/// Installs a panic hook that ends the process, with a one-line error and exit code
/// [`RUNTIME_DEADLOCK_EXIT`], on a panic that would otherwise leave it waiting forever; other
/// panics go to the previous hook as before.
///
/// The case: on Mesa llvmpipe under CPU load (a build, a second GPU process), one OpenGL call
/// (a kernel compile, a fence wait) can hold wgpu's GL context lock for more than the 6 s that
/// wgpu-hal allows. The thread that then times out panics; when that is the runtime's device
/// poll thread (cubecl-wgpu's `WgpuPoll`), nothing wakes the thread waiting for the device
/// anymore and the process hangs (observed: `parity_wgpu` and the wgpu training test stuck for
/// 15 minutes at 0.1 core, the poll thread's backtrace ending in `egl.rs` `lock`).
pub fn exit_on_runtime_deadlock() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload.downcast_ref::<&str>().copied().or_else(|| payload.downcast_ref::<String>().map(String::as_str)).unwrap_or("");
        if msg.contains(GL_CONTEXT_LOCK_PANIC) {
            let thread = std::thread::current();
            eprintln!(
                "error: wgpu's OpenGL backend waited more than 6 s for its context lock (thread {}), which happens on a software OpenGL driver (Mesa llvmpipe) when the CPU is busy; the device cannot be used any more, so the run stops here (rerun with less else running)",
                thread.name().unwrap_or("unnamed")
            );
            std::process::exit(RUNTIME_DEADLOCK_EXIT);
        }
        previous(info);
    }));
}

#[cfg(test)]
mod deadlock_tests {
    /// Run in a child process (by the test below): the hook, then the panic on a helper thread
    /// while the main thread waits for it forever, as a device wait would.
    #[test]
    #[ignore = "run as a child by gl_lock_panic_on_a_helper_thread_ends_the_process"]
    fn child_that_hangs_after_a_gl_lock_panic() {
        if std::env::var_os("VQT_PROCESS_TEST_CHILD").is_none() {
            return;
        }
        super::exit_on_runtime_deadlock();
        std::thread::spawn(|| panic!("{}. This is most-likely a deadlock.", super::GL_CONTEXT_LOCK_PANIC));
        loop {
            std::thread::park();
        }
    }

    #[test]
    fn gl_lock_panic_on_a_helper_thread_ends_the_process() {
        let exe = std::env::current_exe().unwrap();
        let mut cmd = std::process::Command::new(exe);
        cmd.args(["--exact", "process::deadlock_tests::child_that_hangs_after_a_gl_lock_panic", "--ignored", "--nocapture"]).env("VQT_PROCESS_TEST_CHILD", "1");
        let out = super::output_within(&mut cmd, std::time::Duration::from_secs(60)).expect("the child ends by itself, not by the limit");
        assert_eq!(out.status.code(), Some(super::RUNTIME_DEADLOCK_EXIT), "{}", String::from_utf8_lossy(&out.stderr));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("error: wgpu's OpenGL backend waited more than 6 s"), "{stderr}");
    }
}
