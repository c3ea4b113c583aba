//! Server-Sent Events for one entity: the engine's live feed of its history,
//! as SSE, until it ends, the server stops, or the stream has lived too long.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::stream::{self, Stream};
use ripen_engine::EntityFeed;
use tokio::sync::watch;

use crate::view;

/// A stream ends after this long even if the entity never settles.
const STREAM_LIFETIME_MAX: Duration = Duration::from_secs(3_600);

struct Cursor {
    feed: EntityFeed,
    /// Turns true when the server begins to shut down.
    stopping: watch::Receiver<bool>,
    pending: VecDeque<Event>,
    deadline: tokio::time::Instant,
    /// Counts this stream under `limits.streams_max` while it lives.
    _slot: crate::limits::Slot,
}

pub fn entity_events(
    feed: EntityFeed,
    stopping: watch::Receiver<bool>,
    slot: crate::limits::Slot,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let cursor = Cursor {
        feed,
        stopping,
        pending: VecDeque::new(),
        deadline: tokio::time::Instant::now() + STREAM_LIFETIME_MAX,
        _slot: slot,
    };
    let events = stream::unfold(cursor, |mut c| async move {
        loop {
            if let Some(event) = c.pending.pop_front() {
                return Some((Ok(event), c));
            }
            if *c.stopping.borrow() {
                return None;
            }
            // The feed is cancel-safe, so racing it against the stop loses
            // nothing a client could resume from.
            let batch = tokio::select! {
                batch = c.feed.next() => batch?,
                _ = c.stopping.changed() => return None,
                _ = tokio::time::sleep_until(c.deadline) => return None,
            };
            for e in &batch {
                c.pending.push_back(
                    Event::default()
                        .id(e.seq.to_string())
                        .event(e.kind.clone())
                        .data(view::event(e).to_string()),
                );
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}
