//! The deployment guide's local temp-file cleanup (`TEMP_DIR_CLEANUP_INTERVAL_MS`,
//! `MAX_TEMP_FILE_AGE_MS`): remove regular files older than an age under one directory. Symlinks
//! are never followed (neither to files nor to directories), so nothing outside the directory
//! is ever touched.

use std::path::Path;
use std::time::{Duration, SystemTime};

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    pub removed: u64,
    pub bytes: u64,
    pub kept: u64,
    pub errors: u64,
}

pub fn sweep(dir: &Path, max_age: Duration) -> SweepReport {
    let mut report = SweepReport::default();
    let now = SystemTime::now();
    walk(dir, max_age, now, &mut report);
    report
}

fn walk(dir: &Path, max_age: Duration, now: SystemTime, report: &mut SweepReport) {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot read temp directory");
            report.errors += 1;
            return;
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        // symlink_metadata: a link is judged as a link, never by what it points to.
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            report.errors += 1;
            continue;
        };
        let kind = meta.file_type();
        if kind.is_symlink() {
            report.kept += 1;
        } else if kind.is_dir() {
            walk(&path, max_age, now, report);
        } else if kind.is_file() {
            let age = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .unwrap_or_default();
            if age > max_age {
                match std::fs::remove_file(&path) {
                    Ok(()) => {
                        tracing::info!(file = %path.display(), age_s = age.as_secs(), bytes = meta.len(), "removed old temp file");
                        report.removed += 1;
                        report.bytes += meta.len();
                    }
                    Err(e) => {
                        tracing::warn!(file = %path.display(), error = %e, "cannot remove temp file");
                        report.errors += 1;
                    }
                }
            } else {
                report.kept += 1;
            }
        } else {
            report.kept += 1;
        }
    }
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
}
