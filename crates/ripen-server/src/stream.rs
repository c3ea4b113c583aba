//! Server-Sent Events for one entity: replay its history, then follow it,
//! and end once it has settled.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::stream::{self, Stream};
use ripen_store::{EntityId, DEFAULT_TENANT};

use crate::view;
use crate::AppState;

/// How often a stream asks the store for new events.
const FOLLOW_INTERVAL_MS: u64 = 100;
/// The most events read from the store per round.
const EVENTS_PER_ROUND_MAX: u32 = 1_000;
/// A stream ends after this long even if the entity never settles.
const STREAM_LIFETIME_MAX: Duration = Duration::from_secs(3_600);

struct Cursor {
    state: Arc<AppState>,
    id: EntityId,
    after_seq: u64,
    pending: std::collections::VecDeque<Event>,
    done: bool,
    deadline: tokio::time::Instant,
}

pub fn entity_events(
    state: Arc<AppState>,
    id: EntityId,
    after_seq: u64,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let cursor = Cursor {
        state,
        id,
        after_seq,
        pending: Default::default(),
        done: false,
        deadline: tokio::time::Instant::now() + STREAM_LIFETIME_MAX,
    };
    let events = stream::unfold(cursor, |mut c| async move {
        loop {
            if let Some(event) = c.pending.pop_front() {
                return Some((Ok(event), c));
            }
            let stopping = *c.state.stopping.borrow();
            if c.done || stopping || tokio::time::Instant::now() >= c.deadline {
                return None;
            }
            // Read the status before the events, so that the last round
            // after a terminal status sees every event written before it.
            let settled = match c.state.engine.store.get(DEFAULT_TENANT, c.id).await {
                Ok(Some(r)) => r.status.is_terminal() && !r.state().has_live_steps(),
                Ok(None) | Err(_) => true,
            };
            let store = &c.state.engine.store;
            match store
                .events(DEFAULT_TENANT, c.id, c.after_seq, EVENTS_PER_ROUND_MAX)
                .await
            {
                Ok(Some(batch)) => {
                    let full = batch.len() as u32 >= EVENTS_PER_ROUND_MAX;
                    for e in &batch {
                        c.after_seq = e.seq;
                        c.pending.push_back(
                            Event::default()
                                .id(e.seq.to_string())
                                .event(e.kind.clone())
                                .data(view::event(e).to_string()),
                        );
                    }
                    c.done = settled && !full;
                }
                Ok(None) | Err(_) => c.done = true,
            }
            if c.pending.is_empty() && !c.done {
                let mut stopping = c.state.stopping.clone();
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(FOLLOW_INTERVAL_MS)) => {}
                    _ = stopping.changed() => {}
                }
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}
