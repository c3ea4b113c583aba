//! A temporary directory removed on drop, written with std alone so that the
//! `ripen` binary (whose demo and bench use one) carries no crate for it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

static NEXT_ID: AtomicU64 = AtomicU64::new(0);
/// Names tried before giving up; each one holds the process id, a counter
/// and the clock, so a collision means another process raced us.
const NAME_TRIES: u32 = 100;

/// A fresh directory under [`std::env::temp_dir`], removed with everything
/// in it when dropped (unless [`TempDir::keep`] is called).
#[derive(Debug)]
pub struct TempDir {
    path: Option<PathBuf>,
}

impl TempDir {
    /// Creates `{temp}/{prefix}{pid}-{n}-{nanos}`.
    pub fn new(prefix: &str) -> std::io::Result<TempDir> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let base = std::env::temp_dir();
        let mut last = None;
        for _ in 0..NAME_TRIES {
            let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
            let path = base.join(format!("{prefix}{}-{n}-{nanos:x}", std::process::id()));
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(TempDir { path: Some(path) }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("every temporary name is taken")))
    }

    pub fn path(&self) -> &Path {
        self.path
            .as_deref()
            .expect("the path is taken only by keep")
    }

    /// Keeps the directory after this guard is gone and returns its path.
    pub fn keep(mut self) -> PathBuf {
        self.path.take().expect("the path is taken only by keep")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(path) = &self.path {
            let _ = std::fs::remove_dir_all(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_temp_dir_is_fresh_and_removed_on_drop_unless_kept() {
        let a = TempDir::new("ripen-testkit-").unwrap();
        let b = TempDir::new("ripen-testkit-").unwrap();
        assert_ne!(a.path(), b.path());
        std::fs::write(a.path().join("f"), b"x").unwrap();
        let gone = a.path().to_owned();
        drop(a);
        assert!(!gone.exists());
        let kept = b.keep();
        assert!(kept.is_dir());
        std::fs::remove_dir_all(kept).unwrap();
    }
}
