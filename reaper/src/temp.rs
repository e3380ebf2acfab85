//! The deployment guide's local temp-file cleanup (`TEMP_DIR_CLEANUP_INTERVAL_MS`,
//! `MAX_TEMP_FILE_AGE_MS`): remove regular files older than an age under one directory. Symlinks
//! are never followed (neither to files nor to directories), and every step works through
//! directory handles, so nothing outside the directory is ever touched, even when someone who
//! can write to it swaps its parts while a sweep runs.

use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, SystemTime};

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, Stat};

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    pub removed: u64,
    pub bytes: u64,
    pub kept: u64,
    pub errors: u64,
}

/// A directory still to sweep: its name inside a parent that is already open.
struct Pending {
    parent: Rc<OwnedFd>,
    name: CString,
    path: PathBuf,
    depth: usize,
}

/// Directories nested deeper than this below the temp directory are left alone. The walk holds
/// a handle for each level whose subdirectories wait, so this bounds the handles it can hold
/// (a wide tree nested thousands deep would otherwise exhaust the process's file descriptors,
/// the daemon's sockets among them). Render temp files live a few levels down.
pub const MAX_DEPTH: usize = 256;

/// The temp directory, pinned: the directory `--temp-dir` named when the reaper started (its
/// device and inode), found again by its resolved path, with no symlink followed, before every
/// sweep. A directory someone replaced since (with a symlink or another directory) is not swept.
#[derive(Debug, Clone)]
pub struct TempRoot {
    path: PathBuf,
    id: (u64, u64),
    mount: Option<u64>,
}

/// The mount a directory is on (`statx` `STATX_MNT_ID`, Linux 5.8 and later): a bind mount of the
/// same filesystem has the same device number, and only this tells it apart.
fn mount_id(fd: &OwnedFd) -> Option<u64> {
    let st = rustix::fs::statx(fd, "", AtFlags::EMPTY_PATH, rustix::fs::StatxFlags::MNT_ID).ok()?;
    (st.stx_mask & rustix::fs::StatxFlags::MNT_ID.bits() != 0).then_some(st.stx_mnt_id)
}

impl TempRoot {
    pub fn new(dir: &Path) -> std::io::Result<TempRoot> {
        let path = dir.canonicalize()?;
        let fd = rustix::fs::open(
            &path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let st = rustix::fs::fstat(&fd)?;
        Ok(TempRoot {
            path,
            id: (st.st_dev, st.st_ino),
            mount: mount_id(&fd),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn open(&self) -> Result<OwnedFd, String> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::open(&self.path, flags, Mode::empty()).map_err(|e| e.to_string())?;
        let st = rustix::fs::fstat(&fd).map_err(|e| e.to_string())?;
        if (st.st_dev, st.st_ino) != self.id {
            return Err("it is no longer the directory it was when the reaper started (replaced since); restart the reaper if that was intended".into());
        }
        Ok(fd)
    }

    /// Removes regular files older than `max_age` under the directory.
    ///
    /// Every step works relative to an open directory handle, never on a full path: a
    /// directory is opened from its parent's handle with `O_NOFOLLOW | O_DIRECTORY` and must be
    /// the very directory (device and inode) that was listed, and a file is removed with
    /// `unlinkat` in the directory it was found in. So a directory swapped for a symlink (or for
    /// another directory) between the look and the act leads nowhere outside: anyone who can
    /// write to the temp directory cannot make the sweeper delete elsewhere. Other filesystems
    /// mounted inside are left alone. The walk keeps its own list instead of recursing, so no
    /// nesting depth can overflow the stack.
    pub fn sweep(&self, max_age: Duration) -> SweepReport {
        let mut report = SweepReport::default();
        let now = SystemTime::now();
        let root = match self.open() {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(dir = %self.path.display(), error = %e, "not sweeping the temp directory");
                report.errors += 1;
                return report;
            }
        };
        let device = self.id.0;
        let mut todo: Vec<Pending> = Vec::new();
        let mut walk = Walk {
            device,
            max_age,
            now,
            todo: &mut todo,
            report: &mut report,
        };
        walk.sweep_one(root, self.path.clone(), 0);
        while let Some(p) = walk.todo.pop() {
            if p.depth > MAX_DEPTH {
                tracing::warn!(dir = %p.path.display(), max_depth = MAX_DEPTH, "not sweeping a directory nested this deep");
                walk.report.kept += 1;
                continue;
            }
            let Some(fd) = open_subdir(&p, device, self.mount, walk.report) else {
                continue;
            };
            let (path, depth) = (p.path.clone(), p.depth);
            drop(p);
            walk.sweep_one(fd, path, depth);
        }
        report
    }
}

/// Sweeps `dir` once (`reaper sweep-temp`).
pub fn sweep(dir: &Path, max_age: Duration) -> SweepReport {
    match TempRoot::new(dir) {
        Ok(root) => root.sweep(max_age),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot open temp directory");
            SweepReport {
                errors: 1,
                ..SweepReport::default()
            }
        }
    }
}

/// Opens a listed subdirectory from its parent's handle, refusing a symlink, a non-directory,
/// another filesystem or mount, and anything that is not the directory that was listed.
fn open_subdir(
    p: &Pending,
    device: u64,
    mount: Option<u64>,
    report: &mut SweepReport,
) -> Option<OwnedFd> {
    let listed = rustix::fs::statat(
        p.parent.as_fd(),
        p.name.as_c_str(),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .ok()?;
    if listed.st_dev != device {
        report.kept += 1;
        return None;
    }
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = match rustix::fs::openat(p.parent.as_fd(), p.name.as_c_str(), flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(dir = %p.path.display(), error = %e, "not sweeping a directory that changed while the sweep ran");
            report.errors += 1;
            return None;
        }
    };
    let opened = rustix::fs::fstat(&fd).ok()?;
    if (opened.st_dev, opened.st_ino) != (listed.st_dev, listed.st_ino) {
        tracing::warn!(dir = %p.path.display(), "not sweeping a directory that was swapped while the sweep ran");
        report.errors += 1;
        return None;
    }
    if mount.is_some() && mount_id(&fd).is_some_and(|m| Some(m) != mount) {
        // A mount inside the temp directory (a bind mount of the same filesystem, say).
        report.kept += 1;
        return None;
    }
    Some(fd)
}

/// One sweep's state.
struct Walk<'a> {
    device: u64,
    max_age: Duration,
    now: SystemTime,
    todo: &'a mut Vec<Pending>,
    report: &'a mut SweepReport,
}

impl Walk<'_> {
    /// Sweeps the files of one open directory and lists its subdirectories in `todo`.
    fn sweep_one(&mut self, fd: OwnedFd, path: PathBuf, depth: usize) {
        let names = match list(&fd) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(dir = %path.display(), error = %e, "cannot read temp directory");
                self.report.errors += 1;
                return;
            }
        };
        let fd = Rc::new(fd);
        for name in names {
            let entry_path = path.join(name.to_string_lossy().as_ref());
            // A link is judged as a link, never by what it points to.
            let Ok(st) = rustix::fs::statat(fd.as_fd(), name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW)
            else {
                self.report.errors += 1;
                continue;
            };
            match FileType::from_raw_mode(st.st_mode) {
                FileType::Directory if st.st_dev == self.device => self.todo.push(Pending {
                    parent: fd.clone(),
                    name,
                    path: entry_path,
                    depth: depth + 1,
                }),
                FileType::RegularFile if age(&st, self.now) > self.max_age => {
                    match rustix::fs::unlinkat(fd.as_fd(), name.as_c_str(), AtFlags::empty()) {
                        Ok(()) => {
                            tracing::info!(file = %entry_path.display(), age_s = age(&st, self.now).as_secs(), bytes = st.st_size, "removed old temp file");
                            self.report.removed += 1;
                            self.report.bytes += st.st_size.max(0) as u64;
                        }
                        Err(e) => {
                            tracing::warn!(file = %entry_path.display(), error = %e, "cannot remove temp file");
                            self.report.errors += 1;
                        }
                    }
                }
                _ => self.report.kept += 1,
            }
        }
    }
}

/// The names in a directory, without `.` and `..`.
fn list(fd: &OwnedFd) -> rustix::io::Result<Vec<CString>> {
    let mut names = Vec::new();
    for entry in Dir::read_from(fd)? {
        let entry = entry?;
        let name: &CStr = entry.file_name();
        if name.to_bytes() != b"." && name.to_bytes() != b".." {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

fn age(st: &Stat, now: SystemTime) -> Duration {
    let modified =
        SystemTime::UNIX_EPOCH + Duration::new(st.st_mtime.max(0) as u64, st.st_mtime_nsec as u32);
    now.duration_since(modified).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{self, File, FileTimes};

    fn aged(path: &Path, age: Duration) {
        let f = File::options().write(true).open(path).unwrap();
        f.set_times(FileTimes::new().set_modified(SystemTime::now() - age))
            .unwrap();
    }

    #[test]
    fn removes_old_files_keeps_young_ones_and_never_follows_symlinks() {
        let root = std::env::temp_dir().join(format!("reaper-temp-test-{}", std::process::id()));
        let outside =
            std::env::temp_dir().join(format!("reaper-temp-outside-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let _ = fs::remove_dir_all(&outside);
        fs::create_dir_all(root.join("nested")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        for (name, age) in [
            ("old.tmp", 7200),
            ("nested/old.tmp", 7200),
            ("young.tmp", 60),
        ] {
            fs::write(root.join(name), b"x").unwrap();
            aged(&root.join(name), Duration::from_secs(age));
        }
        fs::write(outside.join("precious.png"), b"keep me").unwrap();
        aged(&outside.join("precious.png"), Duration::from_secs(7200));
        std::os::unix::fs::symlink(outside.join("precious.png"), root.join("link-to-file"))
            .unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link-to-dir")).unwrap();

        let report = sweep(&root, Duration::from_secs(3600));
        assert_eq!(report.removed, 2);
        assert_eq!(report.bytes, 2);
        assert!(!root.join("old.tmp").exists() && !root.join("nested/old.tmp").exists());
        assert!(root.join("young.tmp").exists());
        assert!(
            outside.join("precious.png").exists(),
            "a symlinked file outside the directory is never removed"
        );
        assert!(
            fs::symlink_metadata(root.join("link-to-file")).is_ok(),
            "links themselves are left alone"
        );
        fs::remove_dir_all(&root).unwrap();
        fs::remove_dir_all(&outside).unwrap();
    }

    /// Issue 12, finding 6: the sweeper checked with `symlink_metadata` and then removed by full
    /// path, so a directory swapped for a symlink in between (`renameat2(RENAME_EXCHANGE)`)
    /// redirected its deletes to wherever the link pointed. Here a thread keeps exchanging a
    /// directory of old files with a symlink to a victim directory while the sweeper runs again
    /// and again: the victim's files must all survive.
    #[test]
    fn a_directory_swapped_for_a_symlink_mid_sweep_leads_nowhere_outside() {
        use rustix::fs::{openat, renameat_with, RenameFlags, CWD};
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let base = std::env::temp_dir().join(format!("reaper-temp-swap-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let (root, victim) = (base.join("temp"), base.join("victim"));
        fs::create_dir_all(root.join("sub")).unwrap();
        fs::create_dir_all(&victim).unwrap();
        std::os::unix::fs::symlink(&victim, root.join("link")).unwrap();
        let names: Vec<String> = (0..20).map(|i| format!("f{i}.tmp")).collect();
        for n in &names {
            fs::write(victim.join(n), b"precious").unwrap();
            aged(&victim.join(n), Duration::from_secs(7200));
        }
        // The real directory, by handle: refilled without ever going through the link.
        let sub = openat(
            CWD,
            root.join("sub"),
            OFlags::RDONLY | OFlags::DIRECTORY,
            Mode::empty(),
        )
        .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let swapper = {
            let (stop, root) = (stop.clone(), root.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    renameat_with(
                        CWD,
                        root.join("sub"),
                        CWD,
                        root.join("link"),
                        RenameFlags::EXCHANGE,
                    )
                    .unwrap();
                }
            })
        };
        let mut removed = 0;
        for _ in 0..300 {
            for n in &names {
                let fd = openat(
                    &sub,
                    n.as_str(),
                    OFlags::WRONLY | OFlags::CREATE,
                    Mode::from_raw_mode(0o600),
                )
                .unwrap();
                File::from(fd)
                    .set_times(
                        FileTimes::new()
                            .set_modified(SystemTime::now() - Duration::from_secs(7200)),
                    )
                    .unwrap();
            }
            removed += sweep(&root, Duration::from_secs(3600)).removed;
        }
        stop.store(true, Ordering::Relaxed);
        swapper.join().unwrap();
        let survivors = names
            .iter()
            .filter(|n| victim.join(n.as_str()).exists())
            .count();
        assert_eq!(
            survivors,
            names.len(),
            "files outside the temp directory were deleted"
        );
        assert!(removed > 0, "the sweeper did sweep the real directory");
        fs::remove_dir_all(&base).unwrap();
    }

    /// Issue 12, finding 6: the sweeper recursed on the stack, and 2,030 nested directories
    /// overflowed the blocking thread's and aborted the daemon at start-up (a crash loop under
    /// Restart=always). Deeper than any path may be long, on a 2 MiB stack like the blocking
    /// pool's, the sweep finishes: it removes the old file a few levels down, and leaves what is
    /// nested deeper than [`MAX_DEPTH`] alone.
    #[test]
    fn nesting_deeper_than_a_path_is_long_is_swept_without_crashing() {
        use rustix::fs::{mkdirat, openat};
        let root = std::env::temp_dir().join(format!("reaper-temp-deep-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        let old_file = |dir: &OwnedFd| {
            let file = openat(
                dir,
                "old.tmp",
                OFlags::WRONLY | OFlags::CREATE,
                Mode::from_raw_mode(0o600),
            )
            .unwrap();
            File::from(file)
                .set_times(
                    FileTimes::new().set_modified(SystemTime::now() - Duration::from_secs(7200)),
                )
                .unwrap();
        };
        let mut fd = openat(
            rustix::fs::CWD,
            &root,
            OFlags::RDONLY | OFlags::DIRECTORY,
            Mode::empty(),
        )
        .unwrap();
        for level in 1..=5000 {
            mkdirat(&fd, "d", Mode::from_raw_mode(0o700)).unwrap();
            fd = openat(&fd, "d", OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
            if level == 3 {
                old_file(&fd);
            }
        }
        old_file(&fd);
        let r = root.clone();
        let report = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || sweep(&r, Duration::from_secs(3600)))
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(report.removed, 1, "{report:?}");
        assert!(!root.join("d/d/d/old.tmp").exists());
        drop(fd);
        let _ = std::process::Command::new("rm")
            .arg("-rf")
            .arg(&root)
            .status();
    }

    /// A temp directory replaced after the reaper started (here by a symlink to another
    /// directory, by someone who can write to its parent) is not swept.
    #[test]
    fn a_temp_directory_replaced_since_start_is_not_swept() {
        let base = std::env::temp_dir().join(format!("reaper-temp-pin-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let (dir, victim) = (base.join("temp"), base.join("victim"));
        fs::create_dir_all(&dir).unwrap();
        fs::create_dir_all(&victim).unwrap();
        fs::write(victim.join("precious.png"), b"keep me").unwrap();
        aged(&victim.join("precious.png"), Duration::from_secs(7200));
        let root = TempRoot::new(&dir).unwrap();
        assert_eq!(root.sweep(Duration::from_secs(3600)).errors, 0);
        fs::remove_dir(&dir).unwrap();
        std::os::unix::fs::symlink(&victim, &dir).unwrap();
        let report = root.sweep(Duration::from_secs(3600));
        assert_eq!((report.removed, report.errors), (0, 1));
        assert!(victim.join("precious.png").exists());
        fs::remove_dir_all(&base).unwrap();
    }
}
