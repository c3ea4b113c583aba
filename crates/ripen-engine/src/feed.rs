//! A live follow of one entity's history, for the SSE stream. It reads the
//! store when the hub says a commit may have changed the entity, not on a
//! timer.

use std::sync::Arc;

use ripen_store::{EntityId, HistoryEvent, Store};

use crate::notify::Following;

/// The most events read from the store per round.
const EVENTS_PER_ROUND_MAX: u32 = 1_000;

/// Replays an entity's history after a sequence number, then yields new
/// events as they are committed, and ends once the entity has settled and
/// every event up to that point was yielded.
pub struct EntityFeed {
    store: Arc<dyn Store>,
    following: Following,
    tenant: String,
    id: EntityId,
    after_seq: u64,
    done: bool,
}

impl EntityFeed {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        following: Following,
        tenant: &str,
        id: EntityId,
        after_seq: u64,
    ) -> EntityFeed {
        EntityFeed {
            store,
            following,
            tenant: tenant.to_owned(),
            id,
            after_seq,
            done: false,
        }
    }

    /// The next events, oldest first, waiting for them if there are none
    /// yet; `None` once the feed has ended. Cancel-safe: dropping the future
    /// loses no event, so the caller may race it against a shutdown.
    pub async fn next(&mut self) -> Option<Vec<HistoryEvent>> {
        loop {
            if self.done {
                return None;
            }
            // Read the status before the events, so that the last round
            // after a terminal status sees every event written before it.
            let settled = match self.store.get(&self.tenant, self.id).await {
                Ok(Some(r)) => r.status.is_terminal() && !r.state().has_live_steps(),
                Ok(None) | Err(_) => true,
            };
            match self
                .store
                .events(&self.tenant, self.id, self.after_seq, EVENTS_PER_ROUND_MAX)
                .await
            {
                Ok(Some(batch)) => {
                    let full = batch.len() as u32 >= EVENTS_PER_ROUND_MAX;
                    self.done = settled && !full;
                    if let Some(last) = batch.last() {
                        self.after_seq = last.seq;
                        return Some(batch);
                    }
                }
                // The entity is gone or the store failed: a client that
                // reconnects resumes from the last event it got.
                Ok(None) | Err(_) => self.done = true,
            }
            if !self.done {
                self.following.changed().await;
            }
        }
    }
}
