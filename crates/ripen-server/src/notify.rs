//! The notification endpoints (docs/api.md, "Subscriptions" and "Live
//! streams"): webhook subscriptions and their deliveries, and the SSE
//! stream of every status change.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream};
use ripen_engine::notify::{notification_json, NewSubscription, SubscriptionError};
use ripen_engine::time::rfc3339;
use ripen_store::{
    Delivery, DeliveryCounts, DeliveryQuery, DeliveryStatus, Notification, RedeliverOutcome,
    Subscription,
};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, watch};

use crate::auth::Caller;
use crate::workers::{invalid, read_json};
use crate::{json_response, path_param, store_problem, Problem, Shared};

/// A live stream ends after this long; the client resumes from its last id.
const STREAM_LIFETIME_MAX: Duration = Duration::from_secs(3_600);
/// Notifications read from the store per round while a stream catches up.
const BACKFILL_BATCH: u32 = 500;
pub const DELIVERIES_PAGE_MAX: u32 = 500;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRequest {
    url: String,
    #[serde(default)]
    events: Vec<String>,
    #[serde(default)]
    types: Vec<String>,
}

fn subscription_json(sub: &Subscription, counts: Option<&DeliveryCounts>) -> Value {
    let mut v = json!({
        "id": sub.id,
        "url": sub.url,
        "events": sub.events,
        "types": sub.types,
        "created_at": rfc3339(sub.created_at_us),
    });
    if let Some(c) = counts {
        v["deliveries"] = json!({
            "pending": c.pending,
            "delivered": c.delivered,
            "dead": c.dead,
        });
    }
    v
}

fn delivery_json(d: &Delivery) -> Value {
    json!({
        "id": d.id,
        "subscription_id": d.subscription_id,
        "status": d.status.as_str(),
        "event": d.notification.event,
        "entity_id": d.notification.entity_id.to_string(),
        "webhook_id": ripen_engine::notify::webhook_id(&d.notification),
        "attempts": d.attempts,
        "next_attempt_at": (d.status == DeliveryStatus::Pending)
            .then_some(d.next_at_us)
            .flatten()
            .map(rfc3339),
        "last_error": d.last_error,
        "last_code": d.last_code,
        "created_at": rfc3339(d.created_at_us),
        "updated_at": rfc3339(d.updated_at_us),
    })
}

fn no_subscription(id: &str) -> Problem {
    Problem::not_found(format!("no subscription with id {id:?}"))
}

/// `POST /v1/subscriptions`.
pub async fn create(
    State(state): Shared,
    Extension(caller): Extension<Caller>,
    request: Request,
) -> Result<Response, Problem> {
    let body: CreateRequest = read_json(&state, request).await?;
    let created = state
        .engine
        .notifications()
        .create(
            &caller.tenant,
            NewSubscription {
                url: body.url,
                events: body.events,
                types: body.types,
            },
        )
        .await;
    match created {
        Ok((sub, secret)) => {
            let mut v = subscription_json(&sub, None);
            v["secret"] = json!(secret);
            let mut r = json_response(StatusCode::CREATED, v);
            if let Ok(location) = format!("/v1/subscriptions/{}", sub.id).parse() {
                r.headers_mut()
                    .insert(axum::http::header::LOCATION, location);
            }
            Ok(r)
        }
        Err(SubscriptionError::Store(e)) => Err(store_problem(e)),
        Err(SubscriptionError::Refused(refusal)) => Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "url-refused",
            "URL refused",
            refusal.to_string(),
        )
        .with("reason", json!(refusal.code()))),
        Err(SubscriptionError::TooMany) => Err(Problem::new(
            StatusCode::CONFLICT,
            "too-many-subscriptions",
            "Too many subscriptions",
            SubscriptionError::TooMany.to_string(),
        )),
        Err(e @ SubscriptionError::NoMasterKey) => Err(Problem::new(
            StatusCode::CONFLICT,
            "no-master-key",
            "No master key",
            e.to_string(),
        )),
        Err(e @ SubscriptionError::Invalid { .. }) => Err(invalid(e.to_string())),
    }
}

/// `GET /v1/subscriptions`.
pub async fn list(
    State(state): Shared,
    Extension(caller): Extension<Caller>,
) -> Result<Response, Problem> {
    let subs = state
        .engine
        .notifications()
        .list(&caller.tenant)
        .await
        .map_err(store_problem)?;
    let items: Vec<Value> = subs
        .iter()
        .map(|(s, c)| subscription_json(s, Some(c)))
        .collect();
    Ok(json_response(StatusCode::OK, json!({ "items": items })))
}

/// `GET /v1/subscriptions/{id}`.
pub async fn get(
    State(state): Shared,
    Extension(caller): Extension<Caller>,
    p: Result<Path<String>, PathRejection>,
) -> Result<Response, Problem> {
    let id = path_param(p)?;
    match state
        .engine
        .notifications()
        .get(&caller.tenant, &id)
        .await
        .map_err(store_problem)?
    {
        Some((s, c)) => Ok(json_response(
            StatusCode::OK,
            subscription_json(&s, Some(&c)),
        )),
        None => Err(no_subscription(&id)),
    }
}

/// `DELETE /v1/subscriptions/{id}`.
pub async fn delete(
    State(state): Shared,
    Extension(caller): Extension<Caller>,
    p: Result<Path<String>, PathRejection>,
) -> Result<Response, Problem> {
    let id = path_param(p)?;
    if state
        .engine
        .notifications()
        .delete(&caller.tenant, &id)
        .await
        .map_err(store_problem)?
    {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(no_subscription(&id))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryParams {
    status: Option<String>,
    limit: Option<u32>,
    before: Option<u64>,
}

/// `GET /v1/subscriptions/{id}/deliveries?status=&limit=&before=`.
pub async fn deliveries(
    State(state): Shared,
    Extension(caller): Extension<Caller>,
    p: Result<Path<String>, PathRejection>,
    q: Result<Query<DeliveryParams>, QueryRejection>,
) -> Result<Response, Problem> {
    let id = path_param(p)?;
    let Query(q) = q.map_err(|e| Problem::bad_request(format!("bad query: {}", e.body_text())))?;
    let status = match q.status.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(DeliveryStatus::parse(s).ok_or_else(|| {
            Problem::bad_request(format!(
                "status {s:?} is not one of pending, delivered, dead"
            ))
        })?),
    };
    let limit = q.limit.unwrap_or(50);
    if limit == 0 || limit > DELIVERIES_PAGE_MAX {
        return Err(Problem::bad_request(format!(
            "limit must be between 1 and {DELIVERIES_PAGE_MAX}"
        )));
    }
    let Some(mut items) = state
        .engine
        .notifications()
        .deliveries(
            &caller.tenant,
            &id,
            DeliveryQuery {
                status,
                limit: limit + 1,
                before: q.before,
            },
        )
        .await
        .map_err(store_problem)?
    else {
        return Err(no_subscription(&id));
    };
    let next = if items.len() > limit as usize {
        items.truncate(limit as usize);
        items.last().map(|d| d.id)
    } else {
        None
    };
    let items: Vec<Value> = items.iter().map(delivery_json).collect();
    Ok(json_response(
        StatusCode::OK,
        json!({ "items": items, "next": next }),
    ))
}

/// `POST /v1/deliveries/{id}/redeliver`.
pub async fn redeliver(
    State(state): Shared,
    Extension(caller): Extension<Caller>,
    p: Result<Path<String>, PathRejection>,
) -> Result<Response, Problem> {
    let raw = path_param(p)?;
    let missing = || Problem::not_found(format!("no delivery with id {raw:?}"));
    let id: u64 = raw.parse().map_err(|_| missing())?;
    match state
        .engine
        .notifications()
        .redeliver(&caller.tenant, id)
        .await
        .map_err(store_problem)?
    {
        RedeliverOutcome::Queued => Ok(json_response(
            StatusCode::ACCEPTED,
            json!({"id": id, "status": "pending"}),
        )),
        RedeliverOutcome::NotFound => Err(missing()),
        RedeliverOutcome::NotDead(status) => Err(Problem::new(
            StatusCode::CONFLICT,
            "delivery-not-dead",
            "Delivery not dead",
            format!(
                "the delivery is {}; only a dead delivery can be redelivered",
                status.as_str()
            ),
        )
        .with("delivery_status", json!(status.as_str()))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventParams {
    #[serde(rename = "type")]
    type_name: Option<String>,
    status: Option<String>,
    after: Option<u64>,
}

/// What one stream shows.
struct Filter {
    tenant: String,
    type_name: Option<String>,
    status: Option<String>,
}

impl Filter {
    fn admits(&self, n: &Notification) -> bool {
        n.tenant == self.tenant
            && self.type_name.as_ref().is_none_or(|t| *t == n.type_name)
            && self.status.as_ref().is_none_or(|s| *s == n.status)
    }
}

/// `GET /v1/events?type=&status=`: every status change as SSE, live; with
/// `Last-Event-ID` (or `after=`), first everything after that position.
pub async fn stream(
    State(state): Shared,
    Extension(caller): Extension<Caller>,
    q: Result<Query<EventParams>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let Query(q) = q.map_err(|e| Problem::bad_request(format!("bad query: {}", e.body_text())))?;
    let slot = state.gates.streams.enter()?;
    let type_name = q.type_name.filter(|t| !t.is_empty());
    if let Some(t) = &type_name {
        if state.engine.registry().latest(t).is_none() {
            return Err(Problem::not_found(format!("no entity type {t:?}")));
        }
    }
    let status = q.status.filter(|s| !s.is_empty());
    if let Some(s) = &status {
        if ripen_core::EntityStatus::parse(s).is_none() {
            return Err(Problem::bad_request(format!(
                "status {s:?} is not one of pending, ready, failed, cancelled"
            )));
        }
    }
    let last_event_id = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    Problem::bad_request("Last-Event-ID is not an event id of this stream")
                })?,
        ),
    };
    let filter = Filter {
        tenant: caller.tenant.to_string(),
        type_name,
        status,
    };
    // Subscribe before reading what came before, so nothing falls between.
    let live = state.engine.live_notifications();
    let cursor = Cursor {
        state: state.clone(),
        live,
        filter,
        after: last_event_id.or(q.after),
        backfilling: last_event_id.or(q.after).is_some(),
        pending: VecDeque::new(),
        stopping: state.stopping.clone(),
        deadline: tokio::time::Instant::now() + STREAM_LIFETIME_MAX,
        ended: false,
        _slot: slot,
    };
    Ok(Sse::new(events(cursor))
        .keep_alive(KeepAlive::default())
        .into_response())
}

struct Cursor {
    state: Arc<crate::AppState>,
    live: broadcast::Receiver<Arc<Notification>>,
    filter: Filter,
    /// The last position sent (or asked to resume after).
    after: Option<u64>,
    /// Still reading from the store what came before the live feed.
    backfilling: bool,
    pending: VecDeque<Event>,
    stopping: watch::Receiver<bool>,
    deadline: tokio::time::Instant,
    ended: bool,
    /// Counts this stream under `limits.streams_max` while it lives.
    _slot: crate::limits::Slot,
}

impl Cursor {
    fn push(&mut self, n: &Notification) {
        if self.after.is_some_and(|a| n.pos <= a) {
            return;
        }
        self.after = Some(n.pos);
        if self.filter.admits(n) {
            self.pending.push_back(
                Event::default()
                    .id(n.pos.to_string())
                    .event(n.event.clone())
                    .data(notification_json(n).to_string()),
            );
        }
    }
}

fn events(cursor: Cursor) -> impl Stream<Item = Result<Event, Infallible>> {
    stream::unfold(cursor, |mut c| async move {
        loop {
            if let Some(event) = c.pending.pop_front() {
                return Some((Ok(event), c));
            }
            if c.ended || *c.stopping.borrow() {
                return None;
            }
            if c.backfilling {
                let after = c.after.unwrap_or(0);
                match c
                    .state
                    .engine
                    .notifications_after(after, BACKFILL_BATCH)
                    .await
                {
                    Ok(batch) => {
                        if batch.len() < BACKFILL_BATCH as usize {
                            c.backfilling = false;
                        }
                        for n in &batch {
                            c.push(n);
                        }
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "read notifications for a stream");
                        return None;
                    }
                }
            }
            let received = tokio::select! {
                r = c.live.recv() => r,
                _ = c.stopping.changed() => return None,
                _ = tokio::time::sleep_until(c.deadline) => return None,
            };
            match received {
                Ok(n) => c.push(&n),
                Err(RecvError::Lagged(missed)) => {
                    // Too far behind: say so and end; the client resumes
                    // from its last id, out of the store.
                    c.ended = true;
                    c.pending.push_back(
                        Event::default().event("lagged").data(
                            json!({
                                "missed": missed,
                                "last_event_id": c.after,
                                "detail": "this stream fell behind; reconnect with Last-Event-ID to resume",
                            })
                            .to_string(),
                        ),
                    );
                }
                Err(RecvError::Closed) => return None,
            }
        }
    })
}
