//! Keeping the data dir private: it holds write keys (`control.db`), every event
//! (`events.db`), destination credentials (`destinations.db`), the warehouse and
//! the admin token.
//!
//! Invariants (Unix):
//! - From [`make_private`] on, the process creates files 0600 and directories 0700
//!   (umask 077), so every store's files — including SQLite's `-wal`/`-shm`, which
//!   SQLite also creates with its database's mode — are private from their first
//!   byte, without each store's opener having to know.
//! - Files and directories that already exist under the data dir (from an older
//!   version, or a restore) are narrowed to 0600/0700 at start; symlinks are not
//!   followed.

use std::path::Path;

/// Sets the process umask to 077, creates `dir` (0700) and narrows what is already
/// under it; `extra` are more trees to narrow (e.g. a warehouse dir outside it).
pub fn make_private(dir: &Path, extra: &[&Path]) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        #[allow(unsafe_code)]
        // SAFETY: umask only swaps the process's file-mode mask; it cannot fail.
        unsafe {
            libc::umask(0o077);
        }
    }
    std::fs::create_dir_all(dir)?;
    narrow(dir)?;
    for e in extra {
        if e.exists() {
            narrow(e)?;
        }
    }
    Ok(())
}

#[cfg(unix)]
fn narrow(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    let want = if meta.is_dir() { 0o700 } else { 0o600 };
    if meta.permissions().mode() & 0o777 != want {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(want))?;
    }
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            narrow(&entry?.path())?;
        }
    }
    Ok(())
}

#[cfg(not(unix))]
fn narrow(_path: &Path) -> std::io::Result<()> {
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn existing_files_are_narrowed_and_new_ones_are_private() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        std::fs::create_dir_all(dir.join("warehouse")).unwrap();
        std::fs::write(dir.join("control.db"), b"x").unwrap();
        std::fs::write(dir.join("warehouse/web.db"), b"x").unwrap();
        for p in [&dir, &dir.join("warehouse")] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::fs::set_permissions(
            dir.join("control.db"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        make_private(&dir, &[]).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("warehouse")), 0o700);
        assert_eq!(mode(&dir.join("control.db")), 0o600);
        assert_eq!(mode(&dir.join("warehouse/web.db")), 0o600);
        std::fs::write(dir.join("new.db"), b"x").unwrap();
        assert_eq!(mode(&dir.join("new.db")), 0o600);
    }
}
