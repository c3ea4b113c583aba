//! The live side of notifications: what the store's commits say, handed to
//! whoever waits in this process.
//!
//! - Every status change, in outbox order, goes to one broadcast channel
//!   that every `/v1/events` stream reads ([`Hub::live`]). A reader that
//!   falls more than `notify.stream_buffer` notifications behind is told so
//!   and resumes from the store.
//! - Followers of one entity (its SSE stream, `/data?wait=`) hold a watch
//!   that is bumped when a commit names the entity, or when another node's
//!   commit may have changed anything.
//! - The dispatcher is woken when outbox rows were written.
//!
//! The store calls [`Hub::heard`] on its commit path (the SQLite writer
//! thread), so it only flips flags and never blocks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ripen_store::{Changes, EntityId, Notification, Store};
use tokio::sync::{broadcast, watch, Notify};

/// Outbox rows the hub reads per round: well within the smallest live
/// buffer, so that one round never makes a reader that keeps up lag.
const READ_BATCH: u32 = 128;
/// A follower looks again after this long even if nothing was heard: a
/// safety net for a missed notification, not the way changes arrive.
pub const FOLLOW_SAFETY_MS: u64 = 5_000;

/// See the module documentation.
pub struct Hub {
    live: broadcast::Sender<Arc<Notification>>,
    followed: Mutex<HashMap<EntityId, Followed>>,
    /// How many entities are followed, read without the lock on the commit
    /// path.
    following: AtomicUsize,
    /// Outbox rows were written: the dispatcher should fan out.
    pub(crate) written: Notify,
    /// New outbox positions are readable.
    sequenced: Notify,
}

struct Followed {
    changes: watch::Sender<u64>,
    followers: usize,
}

impl Hub {
    /// A hub whose live readers may fall `buffer` notifications behind.
    pub fn new(buffer: usize) -> Hub {
        Hub {
            live: broadcast::channel(buffer.max(1)).0,
            followed: Mutex::new(HashMap::new()),
            following: AtomicUsize::new(0),
            written: Notify::new(),
            sequenced: Notify::new(),
        }
    }

    /// What the store's change watcher calls.
    pub fn heard(&self, changes: &Changes<'_>) {
        if changes.outbox_written {
            self.written.notify_one();
        }
        if changes.sequenced {
            self.sequenced.notify_one();
        }
        if self.following.load(Ordering::Relaxed) == 0 {
            return;
        }
        let followed = self.followed.lock().unwrap_or_else(|e| e.into_inner());
        match changes.entities {
            Some(ids) => {
                for id in ids {
                    if let Some(f) = followed.get(id) {
                        f.changes.send_modify(|n| *n += 1);
                    }
                }
            }
            None => {
                for f in followed.values() {
                    f.changes.send_modify(|n| *n += 1);
                }
            }
        }
    }

    /// A receiver of every status change from now on.
    pub fn live(&self) -> broadcast::Receiver<Arc<Notification>> {
        self.live.subscribe()
    }

    /// Follows one entity until the returned guard is dropped.
    pub fn follow(self: &Arc<Hub>, id: EntityId) -> Following {
        let mut followed = self.followed.lock().unwrap_or_else(|e| e.into_inner());
        let f = followed.entry(id).or_insert_with(|| Followed {
            changes: watch::channel(0).0,
            followers: 0,
        });
        f.followers += 1;
        let changes = f.changes.subscribe();
        self.following.store(followed.len(), Ordering::Relaxed);
        Following {
            hub: self.clone(),
            id,
            changes,
        }
    }

    /// Reads the outbox as positions become readable and broadcasts each
    /// notification after position `after` (the head when the engine
    /// started, read before it serves). Runs until the process ends.
    pub async fn run(self: Arc<Hub>, store: Arc<dyn Store>, after: u64, poll: Duration) {
        let mut after = after;
        loop {
            match store.outbox(after, READ_BATCH).await {
                Ok(entries) => {
                    let full = entries.len() >= READ_BATCH as usize;
                    for entry in &entries {
                        after = entry.id;
                        if let Some(n) = Notification::from_outbox(entry) {
                            // No receiver is fine: nobody watches.
                            let _ = self.live.send(Arc::new(n));
                        }
                    }
                    if full {
                        continue;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "read the outbox for live streams"),
            }
            let _ = tokio::time::timeout(poll, self.sequenced.notified()).await;
        }
    }
}

/// One follower of one entity: [`Following::changed`] returns when a
/// commit may have changed it.
pub struct Following {
    hub: Arc<Hub>,
    id: EntityId,
    changes: watch::Receiver<u64>,
}

impl Following {
    /// Waits until the entity may have changed since the last call, or
    /// until `FOLLOW_SAFETY_MS` passed. Cancel-safe.
    pub async fn changed(&mut self) {
        let _ = tokio::time::timeout(
            Duration::from_millis(FOLLOW_SAFETY_MS),
            self.changes.changed(),
        )
        .await;
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        let mut followed = self.hub.followed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = followed.get_mut(&self.id) {
            f.followers -= 1;
            if f.followers == 0 {
                followed.remove(&self.id);
            }
        }
        self.hub.following.store(followed.len(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn followers_hear_their_entity_and_anything() {
        let hub = Arc::new(Hub::new(16));
        let (a, b) = (EntityId::new_v7(), EntityId::new_v7());
        let mut fa = hub.follow(a);
        let fb = hub.follow(b);
        hub.heard(&Changes {
            entities: Some(&[a]),
            outbox_written: false,
            sequenced: false,
            keys: false,
        });
        assert!(fa.changes.has_changed().expect("open"));
        assert!(!fb.changes.has_changed().expect("open"));
        fa.changed().await;
        hub.heard(&Changes {
            entities: None,
            outbox_written: false,
            sequenced: false,
            keys: false,
        });
        assert!(fa.changes.has_changed().expect("open"));
        assert!(fb.changes.has_changed().expect("open"));
        drop(fa);
        let second = hub.follow(b);
        drop(fb);
        assert_eq!(hub.following.load(Ordering::Relaxed), 1);
        drop(second);
        assert_eq!(hub.following.load(Ordering::Relaxed), 0);
        assert!(hub.followed.lock().expect("lock").is_empty());
    }
}
