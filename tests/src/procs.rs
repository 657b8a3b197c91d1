//! Background processes that outlive `weft-lab` (it starts them, exits, and a later `down`
//! stops them): started in their own process group with output to a log file, tracked by pid
//! files that name the binary so a recycled pid is never killed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Starts `cmd` detached, logging to `log`; records `<pid> <binary path>` in `pidfile`.
pub fn spawn(cmd: Command, log: &Path, pidfile: &Path) -> Result<u32> {
    let program = PathBuf::from(cmd.get_program());
    spawn_as(cmd, &program, log, pidfile)
}

/// Like [`spawn`], for a command that execs into `exe` (e.g. `ip netns exec <ns> <exe> ...`,
/// which keeps its pid): `exe` is what the pid file records and `stop` checks.
pub fn spawn_as(mut cmd: Command, exe: &Path, log: &Path, pidfile: &Path) -> Result<u32> {
    use std::os::unix::process::CommandExt;
    let program = std::fs::canonicalize(exe)
        .unwrap_or_else(|_| exe.to_path_buf())
        .to_string_lossy()
        .into_owned();
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening log {}", log.display()))?;
    let err = out.try_clone().context("duplicating the log handle")?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    std::fs::write(pidfile, format!("{} {program}\n", child.id()))
        .with_context(|| format!("writing {}", pidfile.display()))?;
    Ok(child.id())
}

/// Whether `pid` is alive and still runs `program`.
fn runs(pid: u32, program: &str) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|exe| exe.to_string_lossy().trim_end_matches(" (deleted)") == program)
        .unwrap_or(false)
}

/// Stops the process recorded in `pidfile` (TERM, then KILL after `grace`) and removes the
/// file. A missing file or a process already gone is fine: this is also crash cleanup.
pub fn stop(pidfile: &Path, grace: Duration) -> Result<()> {
    signal_then_kill(pidfile, Signal::SIGTERM, grace)
}

/// Kills the process in `pidfile` with SIGKILL at once (a crash, as `kill -9` makes one) and
/// removes the file.
pub fn kill_now(pidfile: &Path) -> Result<()> {
    signal_then_kill(pidfile, Signal::SIGKILL, Duration::ZERO)
}

fn signal_then_kill(pidfile: &Path, first: Signal, grace: Duration) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(pidfile) else {
        return Ok(());
    };
    let (pid, program) = text.trim().split_once(' ').unwrap_or((text.trim(), ""));
    let pid: u32 = pid
        .parse()
        .with_context(|| format!("bad pid file {}", pidfile.display()))?;
    if runs(pid, program) {
        let target = Pid::from_raw(pid as i32);
        let _ = kill(target, first);
        let deadline = Instant::now() + grace;
        while runs(pid, program) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if runs(pid, program) {
            let _ = kill(target, Signal::SIGKILL);
            std::thread::sleep(Duration::from_millis(100));
        }
        if runs(pid, program) {
            bail!("{program} (pid {pid}) survived SIGKILL");
        }
    }
    std::fs::remove_file(pidfile).with_context(|| format!("removing {}", pidfile.display()))
}

/// Whether the process in `pidfile` is still running.
pub fn alive(pidfile: &Path) -> bool {
    std::fs::read_to_string(pidfile)
        .ok()
        .and_then(|t| {
            let (pid, program) = t.trim().split_once(' ')?;
            Some(runs(pid.parse().ok()?, program))
        })
        .unwrap_or(false)
}
