//! The data directory's exclusive lock.
//!
//! Invariant: at most one `tributary serve` runs on a data directory. The process
//! holds an exclusive `flock` on `<data-dir>/lock` (which contains its pid) for as
//! long as it runs; a second process on the same directory refuses to start and
//! names the holder, instead of sharing the event log and failing every append. The
//! kernel drops the lock when the process exits, even on `kill -9`, so a stale
//! `lock` file never blocks a start.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Why the data directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// The path exists and is not a directory.
    #[error("data dir {0} is not a directory (choose another --data-dir)")]
    NotADirectory(PathBuf),
    /// Another process holds the lock.
    #[error(
        "data dir {dir} is in use by another tributary (pid {pid}); stop it or choose another --data-dir"
    )]
    InUse {
        /// The directory.
        dir: PathBuf,
        /// The holder's pid as it wrote it, or `unknown`.
        pid: String,
    },
    /// Creating, opening or writing failed.
    #[error("data dir {dir}: {what}: {source}")]
    Io {
        /// The directory.
        dir: PathBuf,
        /// The step that failed.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The held lock; dropping it (or exiting) releases it.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

/// Creates `dir` when missing and takes its exclusive lock, writing this process's
/// pid into `<dir>/lock`.
pub fn lock(dir: &Path) -> Result<DataDirLock, DataDirError> {
    let io = |what| {
        let dir = dir.to_path_buf();
        move |source| DataDirError::Io { dir, what, source }
    };
    if dir.exists() && !dir.is_dir() {
        return Err(DataDirError::NotADirectory(dir.to_path_buf()));
    }
    std::fs::create_dir_all(dir).map_err(io("cannot create it"))?;
    let path = dir.join("lock");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io("cannot open its lock file"))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let pid = match text.trim() {
                "" => "unknown".to_string(),
                p => p.to_string(),
            };
            return Err(DataDirError::InUse {
                dir: dir.to_path_buf(),
                pid,
            });
        }
        Err(TryLockError::Error(e)) => return Err(io("cannot lock it")(e)),
    }
    file.set_len(0).map_err(io("cannot write its lock file"))?;
    file.seek(SeekFrom::Start(0))
        .and_then(|_| writeln!(file, "{}", std::process::id()))
        .and_then(|_| file.sync_all())
        .map_err(io("cannot write its lock file"))?;
    Ok(DataDirLock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_dir_names_the_holder() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let held = lock(&dir).unwrap();
        let err = lock(&dir).unwrap_err().to_string();
        assert!(
            err.contains(&format!("(pid {})", std::process::id())),
            "{err}"
        );
        drop(held);
        lock(&dir).expect("free again after the holder drops it");
    }

    #[test]
    fn a_file_is_not_a_data_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let err = lock(&file).unwrap_err();
        assert!(matches!(err, DataDirError::NotADirectory(_)), "{err}");
    }
}
