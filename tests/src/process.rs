//! Child processes that end with the test that started them, whether it passes or panics.
//!
//! Two mechanisms, because each covers what the other cannot:
//! - [`Proc`] kills the child's whole process group when it is dropped. A panicking test unwinds
//!   and drops its locals, so its reapers and emulators go with it.
//! - [`hermetic`] asks the kernel to SIGKILL the child when the thread that started it ends
//!   (`PR_SET_PDEATHSIG`). That covers what unwinding does not: the test binary killed, a panic
//!   that aborts, a `Child` a test forgot to wrap. libtest runs every test in a thread of its own,
//!   so "the thread that started it" is the test itself.
//!
//! A leaked reaper is not harmless: it keeps claiming rows in the shared test cluster with an
//! earlier test's settings (issue 10). `scripts/test.sh` refuses to start while one is alive.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Output};
use std::time::Duration;

/// Makes `cmd` start in a process group of its own and die with the thread that spawns it.
pub fn hermetic(cmd: &mut Command) -> &mut Command {
    let parent = std::process::id() as libc::pid_t;
    cmd.process_group(0);
    // SAFETY: only async-signal-safe calls (prctl, getppid) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then no signal would ever come.
            if libc::getppid() != parent {
                return Err(io::Error::other(
                    "the test process ended before its child started",
                ));
            }
            Ok(())
        });
    }
    cmd
}

/// A child process killed, with its process group, when dropped.
pub struct Proc {
    child: Option<Child>,
}

impl Proc {
    /// Spawns `cmd` hermetically (see [`hermetic`]).
    pub fn spawn(cmd: &mut Command) -> Proc {
        let child = hermetic(cmd)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", cmd.get_program()));
        Proc { child: Some(child) }
    }

    fn child(&mut self) -> &mut Child {
        self.child
            .as_mut()
            .expect("the process was already waited for")
    }

    pub fn id(&self) -> u32 {
        self.child.as_ref().expect("waited for").id()
    }

    /// Sends `signal` to the process (not its group: a clean stop is the process's own business).
    pub fn signal(&self, signal: i32) {
        unsafe {
            libc::kill(self.id() as libc::pid_t, signal);
        }
    }

    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child().stdout.take()
    }

    pub fn take_stderr(&mut self) -> Option<std::process::ChildStderr> {
        self.child().stderr.take()
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child().try_wait().unwrap()
    }

    /// SIGKILL to the whole group, then reaps the process.
    pub fn kill(mut self) {
        self.kill_group();
    }

    fn kill_group(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe {
                libc::killpg(child.id() as libc::pid_t, libc::SIGKILL);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for the process to exit and collects its piped output (read as it comes, so a
    /// chatty child never blocks on a full pipe); past `deadline` its group is killed and the
    /// test fails with what it printed.
    pub fn wait_with_deadline(mut self, deadline: Duration) -> Output {
        let child = self.child.take().expect("waited for");
        let pid = child.id() as libc::pid_t;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        match rx.recv_timeout(deadline) {
            Ok(out) => out.unwrap(),
            Err(_) => {
                unsafe {
                    libc::killpg(pid, libc::SIGKILL);
                }
                let out = rx.recv().unwrap().unwrap();
                panic!(
                    "process did not exit within {deadline:?}: {}",
                    crate::storage::output_text(&out)
                );
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill_group();
    }
}

/// Runs `cmd` to completion like `Command::output`, hermetically and with a deadline, so that a
/// hung child fails its test instead of hanging the suite.
pub fn output(cmd: &mut Command, deadline: Duration) -> Output {
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    Proc::spawn(cmd).wait_with_deadline(deadline)
}

/// `.start()` and `.run()` on a `Command`: the hermetic [`Proc::spawn`] and [`output`] (with a
/// five-minute deadline), spelled where the command is built.
pub trait Hermetic {
    fn start(&mut self) -> Proc;
    fn run(&mut self) -> Output;
}

impl Hermetic for Command {
    fn start(&mut self) -> Proc {
        Proc::spawn(self)
    }

    fn run(&mut self) -> Output {
        output(self, Duration::from_secs(300))
    }
}

/// Runs a closure when dropped: clean-up that must happen however the test ends (a cluster of
/// its own stopped, say).
pub struct Defer(Option<Box<dyn FnOnce()>>);

impl Defer {
    pub fn new(f: impl FnOnce() + 'static) -> Defer {
        Defer(Some(Box::new(f)))
    }
}

impl Drop for Defer {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}
