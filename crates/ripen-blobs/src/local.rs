//! Blobs as files under one directory: `DIR/XY/KEY`, where `XY` is the
//! last two characters of the key (so that no directory holds them all).
//!
//! A write goes to `DIR/tmp/` first, is synced, renamed into place, and
//! the directory that now holds it is synced too: once `put` returns, the
//! blob survives a power cut. A write that a crash interrupted leaves only
//! a temporary file, which [`LocalDir`]'s sweep removes.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

use crate::{check_key, BlobError, BlobRef, BlobStore, Result};

const TMP: &str = "tmp";

/// A blob store in a local directory.
#[derive(Debug, Clone)]
pub struct LocalDir {
    root: Arc<PathBuf>,
    writes: Arc<AtomicU64>,
}

impl LocalDir {
    /// Opens (and creates, if need be) the store at `root`.
    pub fn open(root: impl Into<PathBuf>) -> std::result::Result<LocalDir, String> {
        let root = root.into();
        fs::create_dir_all(root.join(TMP))
            .map_err(|e| format!("create the blob directory {}: {e}", root.display()))?;
        sync_dir(&root).map_err(|e| format!("sync {}: {e}", root.display()))?;
        Ok(LocalDir {
            root: Arc::new(root),
            writes: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Where the blob `key` lives.
    pub fn path_of(&self, key: &str) -> PathBuf {
        self.root.join(shard(key)).join(key)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&LocalDir) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(&this))
            .await
            .map_err(|e| BlobError::Unavailable(format!("a blob task ended: {e}")))?
    }

    fn put_now(&self, key: &str, bytes: &[u8]) -> Result<()> {
        let shard_dir = self.root.join(shard(key));
        if !shard_dir.is_dir() {
            fs::create_dir_all(&shard_dir).map_err(|e| unavailable(&shard_dir, &e))?;
            sync_dir(&self.root).map_err(|e| unavailable(&self.root, &e))?;
        }
        let n = self.writes.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .root
            .join(TMP)
            .join(format!("{key}.{}.{n}", std::process::id()));
        let written = (|| {
            let mut file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            file.write_all(bytes)?;
            file.sync_all()
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(unavailable(&tmp, &e));
        }
        let path = shard_dir.join(key);
        fs::rename(&tmp, &path).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            unavailable(&path, &e)
        })?;
        sync_dir(&shard_dir).map_err(|e| unavailable(&shard_dir, &e))
    }

    fn older_now(&self, before: SystemTime, limit: usize) -> Result<Vec<String>> {
        let mut keys = Vec::new();
        // Temporary files of writes that never finished are nobody's.
        for entry in read_dir(&self.root.join(TMP))? {
            if modified(&entry).is_some_and(|m| m < before) {
                let _ = fs::remove_file(entry.path());
            }
        }
        let mut shards: Vec<_> = read_dir(&self.root)?
            .into_iter()
            .filter(|e| e.file_name() != TMP && e.path().is_dir())
            .collect();
        shards.sort_by_key(|e| e.file_name());
        for shard in shards {
            for entry in read_dir(&shard.path())? {
                if keys.len() >= limit {
                    return Ok(keys);
                }
                let name = entry.file_name().to_string_lossy().into_owned();
                if check_key(&name).is_ok() && modified(&entry).is_some_and(|m| m < before) {
                    keys.push(name);
                }
            }
        }
        Ok(keys)
    }
}

#[async_trait]
impl BlobStore for LocalDir {
    async fn put(&self, key: &str, bytes: Bytes) -> Result<BlobRef> {
        check_key(key)?;
        let key = key.to_owned();
        self.blocking(move |this| {
            this.put_now(&key, &bytes)?;
            Ok(BlobRef::of(&key, &bytes))
        })
        .await
    }

    async fn get(&self, blob: &BlobRef) -> Result<Bytes> {
        check_key(&blob.key)?;
        let blob = blob.clone();
        self.blocking(move |this| {
            let path = this.path_of(&blob.key);
            match fs::read(&path) {
                Ok(bytes) => blob.verify(Bytes::from(bytes)),
                Err(e) if e.kind() == ErrorKind::NotFound => Err(BlobError::Missing {
                    key: blob.key.clone(),
                }),
                Err(e) => Err(unavailable(&path, &e)),
            }
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        check_key(key)?;
        let key = key.to_owned();
        self.blocking(move |this| {
            let path = this.path_of(&key);
            match fs::remove_file(&path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
                Err(e) => Err(unavailable(&path, &e)),
            }
        })
        .await
    }

    async fn older_than(&self, before: SystemTime, limit: usize) -> Result<Vec<String>> {
        self.blocking(move |this| this.older_now(before, limit))
            .await
    }
}

/// The directory of `key`: its last two characters.
fn shard(key: &str) -> &str {
    &key[key.len().saturating_sub(2)..]
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn read_dir(dir: &Path) -> Result<Vec<fs::DirEntry>> {
    match fs::read_dir(dir) {
        Ok(entries) => Ok(entries.filter_map(std::result::Result::ok).collect()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(unavailable(dir, &e)),
    }
}

fn modified(entry: &fs::DirEntry) -> Option<SystemTime> {
    entry.metadata().and_then(|m| m.modified()).ok()
}

fn unavailable(path: &Path, e: &std::io::Error) -> BlobError {
    BlobError::Unavailable(format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn store() -> (tempfile::TempDir, LocalDir) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = LocalDir::open(dir.path().join("blobs")).expect("open");
        (dir, store)
    }

    #[tokio::test]
    async fn a_blob_reads_back_and_a_changed_one_is_refused() {
        let (_dir, store) = store();
        let body = Bytes::from(vec![7u8; 100_000]);
        let key = "01a2375b-1b4a-7275-8d02-5642ca0aa7cc";
        let blob = store.put(key, body.clone()).await.expect("put");
        assert_eq!(blob, BlobRef::of(key, &body));
        assert_eq!(store.get(&blob).await.expect("get"), body);
        assert!(store.path_of(key).ends_with(format!("cc/{key}")));

        // Changed on disk: refused, for good.
        let mut changed = body.to_vec();
        changed[50_000] ^= 1;
        fs::write(store.path_of(key), &changed).expect("corrupt it");
        let e = store.get(&blob).await.unwrap_err();
        assert!(matches!(e, BlobError::Corrupt { .. }), "{e}");
        assert!(!e.is_transient());

        // Gone: missing, for good; deleting again is fine.
        store.delete(key).await.expect("delete");
        let e = store.get(&blob).await.unwrap_err();
        assert_eq!(e, BlobError::Missing { key: key.into() });
        store.delete(key).await.expect("delete again");
    }

    #[tokio::test]
    async fn a_put_replaces_and_bad_keys_are_refused() {
        let (_dir, store) = store();
        store
            .put("k1", Bytes::from_static(b"one"))
            .await
            .expect("put");
        let two = store
            .put("k1", Bytes::from_static(b"two"))
            .await
            .expect("put");
        assert_eq!(
            store.get(&two).await.expect("get"),
            Bytes::from_static(b"two")
        );
        for bad in ["", "../x", "a/b", "a.b", &"x".repeat(129)] {
            let e = store.put(bad, Bytes::new()).await.unwrap_err();
            assert!(matches!(e, BlobError::BadKey(_)), "{bad:?}: {e}");
        }
    }

    #[tokio::test]
    async fn the_sweep_lists_old_blobs_and_removes_unfinished_writes() {
        let (_dir, store) = store();
        store
            .put("old-1", Bytes::from_static(b"a"))
            .await
            .expect("put");
        store
            .put("old-2", Bytes::from_static(b"b"))
            .await
            .expect("put");
        let unfinished = store.root.join(TMP).join("old-3.1.1");
        fs::write(&unfinished, b"half").expect("an unfinished write");
        assert!(
            store
                .older_than(SystemTime::now() - Duration::from_secs(60), 10)
                .await
                .expect("sweep")
                .is_empty(),
            "nothing is that old"
        );
        assert!(unfinished.exists(), "younger than the grace: kept");
        let later = SystemTime::now() + Duration::from_secs(1);
        let mut old = store.older_than(later, 10).await.expect("sweep");
        old.sort();
        assert_eq!(old, ["old-1", "old-2"]);
        assert!(!unfinished.exists(), "an unfinished write is removed");
        assert_eq!(store.older_than(later, 1).await.expect("sweep").len(), 1);
    }
}
