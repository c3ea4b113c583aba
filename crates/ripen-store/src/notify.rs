//! The records of the notification side: subscriptions, their deliveries,
//! and the notification an outbox row announces. Pure: the backends store
//! these, the dispatcher in `ripen-engine` decides what to send and when.
//!
//! Every outbox row has a position. On a single-node store it is the row's
//! id, which grows in commit order. On a shared store a node's commits may
//! land out of id order, so positions are given by the fan-out
//! ([`crate::Store::fan_out`]), one node at a time, in the order rows become
//! visible. A reader that resumes after position `p` therefore never misses
//! a row.

use ripen_core::UnixMicros;
use serde::Deserialize;

use crate::{EntityId, OutboxEntry};

/// The event names of notifications, as subscriptions filter them.
pub const EVENTS: &[&str] = &[
    "entity.created",
    "entity.pending",
    "entity.ready",
    "entity.failed",
    "entity.cancelled",
    "entity.degraded",
    "entity.compensation_failed",
];

/// The most subscriptions one tenant may have.
pub const SUBSCRIPTIONS_MAX: usize = 100;

/// What an outbox row tells the world: one status change (or a degradation)
/// of one entity, with the fields every notification carries.
#[derive(Clone, Debug, PartialEq)]
pub struct Notification {
    /// The outbox position: what `Last-Event-ID` resumes from.
    pub pos: u64,
    pub entity_id: EntityId,
    pub tenant: String,
    pub type_name: String,
    pub version: u32,
    /// The entity's history seq of this change.
    pub seq: u64,
    pub at_us: UnixMicros,
    /// One of [`EVENTS`].
    pub event: String,
    /// The entity's status after the change.
    pub status: String,
    /// Whether a non-critical step had failed for good by then.
    pub degraded: bool,
}

#[derive(Deserialize)]
struct Body {
    tenant: String,
    #[serde(rename = "type")]
    type_name: String,
    version: u32,
    kind: String,
    #[serde(default)]
    detail: serde_json::Value,
}

impl Notification {
    /// Reads an outbox row. `None` for a row whose body is not a
    /// notification this build knows (it is skipped, not fatal).
    pub fn from_outbox(entry: &OutboxEntry) -> Option<Notification> {
        let body: Body = serde_json::from_str(&entry.body).ok()?;
        let (event, status) = event_of(&body.kind, &body.detail, entry.status.as_deref())?;
        Some(Notification {
            pos: entry.id,
            entity_id: entry.entity_id,
            tenant: body.tenant,
            type_name: body.type_name,
            version: body.version,
            seq: entry.seq,
            at_us: entry.at_us,
            event,
            status,
            degraded: entry.degraded || body.kind == "degraded",
        })
    }
}

/// The event name and the status after the change of a history event that
/// went to the outbox. `current` is the entity's status when the row was
/// read: a degradation does not change the status, so it is the best known.
pub fn event_of(
    kind: &str,
    detail: &serde_json::Value,
    current: Option<&str>,
) -> Option<(String, String)> {
    match kind {
        "created" => Some(("entity.created".into(), "pending".into())),
        "status_changed" => {
            let to = detail.get("to")?.as_str()?;
            let event = format!("entity.{to}");
            EVENTS
                .contains(&event.as_str())
                .then(|| (event, to.to_owned()))
        }
        "degraded" => Some((
            "entity.degraded".into(),
            current.unwrap_or("pending").to_owned(),
        )),
        "compensation_failed" => Some((
            "entity.compensation_failed".into(),
            current.unwrap_or("failed").to_owned(),
        )),
        _ => None,
    }
}

/// Who a subscription notifies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SinkKind {
    /// POSTs signed JSON to a URL.
    Webhook,
    /// Sends a mail to an address read from the payload; configured in
    /// `[notify.email]`, not through the API.
    Email,
}

impl SinkKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SinkKind::Webhook => "webhook",
            SinkKind::Email => "email",
        }
    }

    pub fn parse(s: &str) -> Option<SinkKind> {
        match s {
            "webhook" => Some(SinkKind::Webhook),
            "email" => Some(SinkKind::Email),
            _ => None,
        }
    }
}

/// The tenant of a subscription that hears every tenant (the configured
/// email sink).
pub const ANY_TENANT: &str = "*";

#[derive(Clone, Debug, PartialEq)]
pub struct Subscription {
    pub id: String,
    /// [`ANY_TENANT`] for a sink that hears every tenant.
    pub tenant: String,
    pub kind: SinkKind,
    /// The webhook URL, or the SMTP server of the email sink.
    pub url: String,
    /// Event names from [`EVENTS`]; empty means every event.
    pub events: Vec<String>,
    /// Entity types; empty means every type.
    pub types: Vec<String>,
    /// The signing secret, sealed by the caller; empty for email.
    pub sealed_secret: Vec<u8>,
    pub created_at_us: UnixMicros,
    /// Only notifications after this outbox position reach it: a new
    /// subscription hears what happens from its creation on.
    pub start_pos: u64,
}

impl Subscription {
    /// Whether `n` goes to this subscription.
    pub fn matches(&self, n: &Notification) -> bool {
        n.pos > self.start_pos
            && (self.tenant == ANY_TENANT || self.tenant == n.tenant)
            && (self.events.is_empty() || self.events.contains(&n.event))
            && (self.types.is_empty() || self.types.contains(&n.type_name))
    }
}

/// Deliveries of one subscription, by status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeliveryCounts {
    pub pending: u64,
    pub delivered: u64,
    pub dead: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryStatus {
    /// Waiting for its first attempt, in flight, or waiting out a backoff.
    Pending,
    Delivered,
    /// Failed for longer than the retry period; an operator may redeliver.
    Dead,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Dead => "dead",
        }
    }

    pub fn parse(s: &str) -> Option<DeliveryStatus> {
        match s {
            "pending" => Some(DeliveryStatus::Pending),
            "delivered" => Some(DeliveryStatus::Delivered),
            "dead" => Some(DeliveryStatus::Dead),
            _ => None,
        }
    }
}

/// One notification on its way to one subscription.
#[derive(Clone, Debug, PartialEq)]
pub struct Delivery {
    pub id: u64,
    pub subscription_id: String,
    pub notification: Notification,
    pub status: DeliveryStatus,
    /// Attempts made so far, the one being made included once claimed.
    pub attempts: u32,
    /// When it is due (pending), or when its lease ends (in flight).
    pub next_at_us: Option<UnixMicros>,
    pub last_error: Option<String>,
    /// The receiver's last HTTP status (or SMTP reply code), if it answered.
    pub last_code: Option<u16>,
    pub created_at_us: UnixMicros,
    pub updated_at_us: UnixMicros,
}

/// What an attempt to deliver came to, as the dispatcher decided.
#[derive(Clone, Debug, PartialEq)]
pub enum DeliveryOutcome {
    Delivered {
        code: Option<u16>,
    },
    /// Try again at `at_us`.
    Retry {
        at_us: UnixMicros,
        error: String,
        code: Option<u16>,
    },
    /// Give up: the delivery is dead until an operator redelivers it.
    Dead {
        error: String,
        code: Option<u16>,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct DeliveryResult {
    pub id: u64,
    /// The attempt count the claim gave; a result for an older claim (its
    /// lease ran out and another node took it) changes nothing.
    pub attempts: u32,
    pub outcome: DeliveryOutcome,
}

/// One fan-out round: outbox rows given positions (on a shared store) and
/// handed to the subscriptions they match.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FanOut {
    /// Outbox rows this round took.
    pub rows: usize,
    /// Deliveries it created.
    pub deliveries: usize,
    /// The last position it reached.
    pub last_pos: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub enum RedeliverOutcome {
    Queued,
    NotFound,
    /// Only a dead delivery can be redelivered.
    NotDead(DeliveryStatus),
}

/// What one claim of deliveries may take.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeliveryClaim {
    /// The most deliveries in all.
    pub limit: u32,
    /// How long the claimer holds them.
    pub lease_us: i64,
    /// The most deliveries of any one subscription.
    pub per_subscription: u32,
    /// Subscriptions with fewer free places than `per_subscription` (their
    /// deliveries in flight take the rest), and how many they have.
    pub room: Vec<(String, u32)>,
}

impl DeliveryClaim {
    /// How many deliveries of `subscription` this claim may take.
    pub fn room_of(&self, subscription: &str) -> u32 {
        self.room
            .iter()
            .find(|(s, _)| s == subscription)
            .map_or(self.per_subscription, |(_, n)| *n)
    }

    /// `subs` in the order a claim visits them: from a place that moves
    /// with `now_us`, so that when `limit` runs out first no subscription
    /// is always the one left waiting.
    pub fn rotation<'a>(
        &self,
        subs: &'a [Subscription],
        now_us: UnixMicros,
    ) -> impl Iterator<Item = &'a Subscription> {
        let start = match subs.len() {
            0 => 0,
            n => (now_us.unsigned_abs() / 1_000 % n as u64) as usize,
        };
        subs[start..].iter().chain(subs[..start].iter())
    }

    /// `room` as a JSON object, for the backends' queries.
    pub fn room_json(&self) -> String {
        let map: serde_json::Map<String, serde_json::Value> = self
            .room
            .iter()
            .map(|(s, n)| (s.clone(), serde_json::Value::from(*n)))
            .collect();
        serde_json::Value::Object(map).to_string()
    }
}

/// Whether a delivery whose status is `status` (`None`: the tenant has no
/// such delivery) may be queued again: `Ok(None)` when it may, the answer
/// otherwise. Only a dead delivery is redelivered.
pub fn redeliver_refusal(status: Option<&str>) -> crate::Result<Option<RedeliverOutcome>> {
    let Some(status) = status else {
        return Ok(Some(RedeliverOutcome::NotFound));
    };
    match DeliveryStatus::parse(status) {
        Some(DeliveryStatus::Dead) => Ok(None),
        Some(other) => Ok(Some(RedeliverOutcome::NotDead(other))),
        None => Err(crate::StoreError::Internal(format!(
            "unknown delivery status {status}"
        ))),
    }
}

/// How the deliveries of one subscription are listed: newest first.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeliveryQuery {
    pub status: Option<DeliveryStatus>,
    pub limit: u32,
    /// Only deliveries older than this id (the previous page's cursor).
    pub before: Option<u64>,
}

/// The columns a result sets: status, next time, error and code.
pub(crate) fn outcome_columns(
    o: &DeliveryOutcome,
) -> (DeliveryStatus, Option<i64>, Option<&str>, Option<i64>) {
    match o {
        DeliveryOutcome::Delivered { code } => {
            (DeliveryStatus::Delivered, None, None, code.map(i64::from))
        }
        DeliveryOutcome::Retry { at_us, error, code } => (
            DeliveryStatus::Pending,
            Some(*at_us),
            Some(error),
            code.map(i64::from),
        ),
        DeliveryOutcome::Dead { error, code } => {
            (DeliveryStatus::Dead, None, Some(error), code.map(i64::from))
        }
    }
}

/// Encodes a list of names as the JSON text backends store.
pub fn names_json(names: &[String]) -> String {
    serde_json::Value::from(names.to_vec()).to_string()
}

/// Decodes [`names_json`].
pub fn names_from_json(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: &str, detail: &str) -> OutboxEntry {
        OutboxEntry {
            id: 7,
            entity_id: EntityId::new_v7(),
            seq: 3,
            at_us: 5,
            kind: kind.into(),
            body: format!(
                "{{\"at_us\":5,\"detail\":{detail},\"entity_id\":\"x\",\"kind\":\"{kind}\",\"seq\":3,\"tenant\":\"t\",\"type\":\"merchant\",\"version\":2}}"
            ),
            status: Some("ready".into()),
            degraded: false,
        }
    }

    #[test]
    fn outbox_rows_name_their_events() {
        let cases = [
            (
                "created",
                r#"{"status":"pending"}"#,
                "entity.created",
                "pending",
            ),
            (
                "status_changed",
                r#"{"from":"pending","to":"ready"}"#,
                "entity.ready",
                "ready",
            ),
            (
                "status_changed",
                r#"{"from":"pending","to":"failed"}"#,
                "entity.failed",
                "failed",
            ),
            (
                "status_changed",
                r#"{"from":"failed","to":"pending"}"#,
                "entity.pending",
                "pending",
            ),
            (
                "status_changed",
                r#"{"from":"pending","to":"cancelled"}"#,
                "entity.cancelled",
                "cancelled",
            ),
            (
                "degraded",
                r#"{"step":"email"}"#,
                "entity.degraded",
                "ready",
            ),
        ];
        for (kind, detail, event, status) in cases {
            let n = Notification::from_outbox(&entry(kind, detail)).expect(kind);
            assert_eq!(
                (n.event.as_str(), n.status.as_str()),
                (event, status),
                "{kind} {detail}"
            );
            assert_eq!((n.pos, n.seq, n.version), (7, 3, 2));
            assert_eq!(n.type_name, "merchant");
            assert_eq!(n.degraded, kind == "degraded");
        }
        assert!(Notification::from_outbox(&entry("step_started", "{}")).is_none());
        assert!(Notification::from_outbox(&entry("status_changed", r#"{"to":"odd"}"#)).is_none());
    }

    #[test]
    fn subscriptions_filter_by_tenant_event_type_and_start() {
        let n = Notification::from_outbox(&entry(
            "status_changed",
            r#"{"from":"pending","to":"ready"}"#,
        ))
        .unwrap();
        let sub = |tenant: &str, events: &[&str], types: &[&str], start_pos| Subscription {
            id: "s".into(),
            tenant: tenant.into(),
            kind: SinkKind::Webhook,
            url: "http://x".into(),
            events: events.iter().map(|s| s.to_string()).collect(),
            types: types.iter().map(|s| s.to_string()).collect(),
            sealed_secret: vec![],
            created_at_us: 0,
            start_pos,
        };
        assert!(sub("t", &[], &[], 0).matches(&n));
        assert!(sub(ANY_TENANT, &["entity.ready"], &["merchant"], 6).matches(&n));
        assert!(!sub("other", &[], &[], 0).matches(&n));
        assert!(!sub("t", &["entity.failed"], &[], 0).matches(&n));
        assert!(!sub("t", &[], &["store"], 0).matches(&n));
        assert!(!sub("t", &[], &[], 7).matches(&n), "created after the row");
    }
}
