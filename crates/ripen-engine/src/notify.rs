//! Notifications: live streams, signed webhooks and email, all fed by the
//! outbox that every status change is written to in its own transaction.
//!
//! - [`hub`] hands what the store's commits say to whoever waits in this
//!   process: `/v1/events` streams, followers of one entity, the dispatcher.
//! - [`dispatcher`] fans the outbox out into deliveries and sends them
//!   through their sinks, with retries, backoff and a dead state.
//! - This module holds the sinks (webhook, email), the JSON every
//!   notification is sent as, and [`Notifications`], the subscription API
//!   the server calls.

pub mod dispatcher;
pub mod hub;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use ripen_notify::client::{PostError, SafeClient};
use ripen_notify::email::{self, EmailConfig, Mailer};
use ripen_notify::seal::MasterKey;
use ripen_notify::ssrf::Refusal;
use ripen_notify::webhook;
use ripen_store::notify::{ANY_TENANT, EVENTS, SUBSCRIPTIONS_MAX};
use ripen_store::{
    Delivery, DeliveryCounts, DeliveryQuery, Notification, RedeliverOutcome, SinkKind, Store,
    StoreError, Subscription,
};
use serde_json::json;

pub use dispatcher::{Attempted, Dispatcher, Sink};
pub use hub::{Following, Hub};

use crate::config::StorageUrl;
use crate::time::{rfc3339, Clock};

/// The longest `Retry-After` a webhook receiver is granted.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(3_600);
/// The longest webhook URL.
pub const URL_BYTES_MAX: usize = 2_048;
/// The id of the configured email sink's subscription.
pub const EMAIL_SUBSCRIPTION: &str = "email";

/// A notification as JSON: the body of a webhook and the data of an SSE
/// event. `data` holds the entity's view at the change, without its steps.
pub fn notification_json(n: &Notification) -> serde_json::Value {
    json!({
        "type": n.event,
        "timestamp": rfc3339(n.at_us),
        "data": {
            "id": n.entity_id.to_string(),
            "type": n.type_name,
            "version": n.version,
            "status": n.status,
            "degraded": n.degraded,
            "seq": n.seq,
        },
    })
}

/// The `webhook-id` of a notification: one per status change of one
/// entity, the same on every retry and redelivery.
pub fn webhook_id(n: &Notification) -> String {
    format!("evt_{}_{}", n.entity_id.0.simple(), n.seq)
}

/// The master key that seals webhook secrets: `RIPEN_MASTER_KEY` (64 hex
/// digits), else `notify.master_key_file`, else, on SQLite, a key file
/// beside the database, made on first start. A shared store without one
/// has none, and refuses new webhooks.
pub fn master_key(file: Option<&Path>, storage: &StorageUrl) -> Result<Option<MasterKey>, String> {
    if let Ok(text) = std::env::var("RIPEN_MASTER_KEY") {
        return MasterKey::parse(&text)
            .map(Some)
            .map_err(|e| format!("RIPEN_MASTER_KEY: {e}"));
    }
    if let Some(file) = file {
        return MasterKey::load_or_create(file).map(Some);
    }
    match storage {
        StorageUrl::Sqlite(db) => {
            let mut name = db.as_os_str().to_owned();
            name.push(".key");
            MasterKey::load_or_create(Path::new(&name)).map(Some)
        }
        StorageUrl::Postgres(_) => Ok(None),
    }
}

/// Sends webhooks: signed JSON, through the SSRF guard.
pub struct WebhookSink {
    client: SafeClient,
    key: Option<Arc<MasterKey>>,
    timeout: Duration,
    /// Opened secrets, by subscription id.
    secrets: Mutex<HashMap<String, Arc<Vec<u8>>>>,
    clock: Arc<dyn Clock>,
}

impl WebhookSink {
    pub fn new(
        client: SafeClient,
        key: Option<Arc<MasterKey>>,
        timeout: Duration,
        clock: Arc<dyn Clock>,
    ) -> WebhookSink {
        WebhookSink {
            client,
            key,
            timeout,
            secrets: Mutex::new(HashMap::new()),
            clock,
        }
    }

    fn secret(&self, sub: &Subscription) -> Result<Arc<Vec<u8>>, String> {
        let mut secrets = self.secrets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = secrets.get(&sub.id) {
            return Ok(s.clone());
        }
        let key = self
            .key
            .as_ref()
            .ok_or("this node has no master key to open the signing secret (RIPEN_MASTER_KEY)")?;
        let secret = key.open(&sub.sealed_secret, &sub.id)?;
        let secret = String::from_utf8(secret).map_err(|_| "a sealed secret is not text")?;
        let bytes = Arc::new(webhook::secret_key(&secret)?);
        secrets.insert(sub.id.clone(), bytes.clone());
        Ok(bytes)
    }
}

#[async_trait]
impl Sink for WebhookSink {
    async fn deliver(&self, sub: &Subscription, delivery: &Delivery) -> Attempted {
        let key = match self.secret(sub) {
            Ok(key) => key,
            Err(e) => return Attempted::failed(None, e, false),
        };
        let n = &delivery.notification;
        let id = webhook_id(n);
        let body = notification_json(n).to_string();
        let timestamp = self.clock.now_us() / 1_000_000;
        let signature = webhook::sign(&key, &id, timestamp, body.as_bytes());
        let timestamp = timestamp.to_string();
        let span = crate::trace::delivery_span_id(n.entity_id, delivery.id, delivery.attempts);
        let traceparent = crate::trace::traceparent_of(n.entity_id, span);
        let headers = [
            ("content-type", "application/json"),
            ("webhook-id", id.as_str()),
            ("webhook-timestamp", timestamp.as_str()),
            ("webhook-signature", signature.as_str()),
            ("traceparent", traceparent.as_str()),
        ];
        match self
            .client
            .post(&sub.url, &headers, Bytes::from(body), self.timeout)
            .await
        {
            Ok(answer) if (200..300).contains(&answer.status) => {
                Attempted::delivered(Some(answer.status))
            }
            Ok(answer) => {
                let snippet: String = answer.body_snippet.chars().take(200).collect();
                let mut attempted = Attempted::failed(
                    Some(answer.status),
                    match snippet.trim() {
                        "" => format!("HTTP {}", answer.status),
                        s => format!("HTTP {}: {s}", answer.status),
                    },
                    true,
                );
                if let Some(f) = attempted.failure.as_mut() {
                    f.retry_after_ms = answer
                        .retry_after
                        .map(|d| d.min(RETRY_AFTER_MAX).as_millis() as u64);
                }
                attempted
            }
            Err(PostError::Refused(refusal)) => {
                Attempted::failed(None, format!("refused: {refusal}"), false)
            }
            Err(e) => Attempted::failed(None, e.to_string(), true),
        }
    }
}

/// Sends mail when entities settle, as `[notify.email]` says.
pub struct EmailSink {
    config: EmailConfig,
    mailer: Mailer,
    store: Arc<dyn Store>,
    payloads: crate::blobs::Payloads,
}

impl EmailSink {
    pub fn new(
        config: EmailConfig,
        store: Arc<dyn Store>,
        payloads: crate::blobs::Payloads,
    ) -> Result<EmailSink, String> {
        let mailer = Mailer::new(&config)?;
        Ok(EmailSink {
            config,
            mailer,
            store,
            payloads,
        })
    }

    /// The subscription that stands for the email sink: every tenant, the
    /// events of `on`, every type.
    pub fn subscription(config: &EmailConfig, now_us: i64) -> Subscription {
        Subscription {
            id: EMAIL_SUBSCRIPTION.into(),
            tenant: ANY_TENANT.into(),
            kind: SinkKind::Email,
            url: config.smtp.clone(),
            events: config
                .on
                .iter()
                .map(|s| format!("entity.{}", s.as_str()))
                .collect(),
            types: Vec::new(),
            sealed_secret: Vec::new(),
            created_at_us: now_us,
            start_pos: 0,
        }
    }
}

#[async_trait]
impl Sink for EmailSink {
    async fn deliver(&self, _sub: &Subscription, delivery: &Delivery) -> Attempted {
        let n = &delivery.notification;
        let data = match self.store.get_data(&n.tenant, n.entity_id).await {
            Ok(Some(data)) => match crate::read_data(&self.payloads, data).await {
                Ok(data) => data,
                Err(e) => {
                    let transient = matches!(e, StoreError::Unavailable(_));
                    return Attempted::failed(None, e.to_string(), transient);
                }
            },
            Ok(None) => return Attempted::failed(None, "the entity is gone".into(), false),
            Err(e) => return Attempted::failed(None, e.to_string(), true),
        };
        // The recipient is read from the payload: once it was pruned, no
        // one can be told.
        let Some(raw) = data.payload.as_deref() else {
            return Attempted::failed(None, "the payload was pruned".into(), false);
        };
        let payload: serde_json::Value = match serde_json::from_str(raw) {
            Ok(p) => p,
            Err(e) => return Attempted::failed(None, format!("read the payload: {e}"), false),
        };
        // What went wrong, for a failed entity: its first failed step.
        let detail = (n.status == ripen_core::EntityStatus::Failed.as_str())
            .then(|| {
                data.record
                    .steps
                    .iter()
                    .find(|s| s.state.status == ripen_core::StepStatus::Failed)
                    .map(|s| match &s.state.last_error {
                        Some(e) => format!("step {} failed: {e}", s.name),
                        None => format!("step {} failed", s.name),
                    })
            })
            .flatten();
        let id = n.entity_id.to_string();
        let at = rfc3339(n.at_us);
        let status = n.event.strip_prefix("entity.").unwrap_or(&n.event);
        let notice = email::Notice {
            entity_id: &id,
            type_name: &n.type_name,
            version: n.version,
            status,
            at: &at,
            detail: detail.as_deref(),
            payload: &payload,
        };
        let mail = match email::compose(&self.config, &notice) {
            Ok(mail) => mail,
            Err(e) => return Attempted::failed(None, e.to_string(), false),
        };
        match self.mailer.send(&mail).await {
            Ok(()) => Attempted::delivered(None),
            Err(e) => Attempted::failed(None, e.message, e.retryable),
        }
    }
}

/// A subscription as its creator asks for it.
#[derive(Clone, Debug, Default)]
pub struct NewSubscription {
    pub url: String,
    pub events: Vec<String>,
    pub types: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SubscriptionError {
    /// A field is wrong; `field` names it.
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    /// The URL reaches where webhooks may not go.
    #[error("url: {0}")]
    Refused(Refusal),
    #[error("a tenant has at most {SUBSCRIPTIONS_MAX} subscriptions")]
    TooMany,
    #[error(
        "this server has no master key to seal webhook secrets with; set RIPEN_MASTER_KEY (64 hexadecimal digits) or notify.master_key_file on every node"
    )]
    NoMasterKey,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The subscription API: create, list, delete, and the deliveries of each.
pub struct Notifications {
    store: Arc<dyn Store>,
    client: Arc<SafeClient>,
    key: Option<Arc<MasterKey>>,
    clock: Arc<dyn Clock>,
    /// The registered types, asked at each subscription.
    types: TypeNames,
}

/// The names of the types a subscription may name, read when it is made.
pub type TypeNames = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

impl Notifications {
    pub fn new(
        store: Arc<dyn Store>,
        client: Arc<SafeClient>,
        key: Option<Arc<MasterKey>>,
        clock: Arc<dyn Clock>,
        types: TypeNames,
    ) -> Notifications {
        Notifications {
            store,
            client,
            key,
            clock,
            types,
        }
    }

    /// Checks and stores a webhook subscription. Returns it with its
    /// signing secret, which is shown this once.
    pub async fn create(
        &self,
        tenant: &str,
        new: NewSubscription,
    ) -> Result<(Subscription, String), SubscriptionError> {
        let invalid = |field, message: String| SubscriptionError::Invalid { field, message };
        if new.url.len() > URL_BYTES_MAX {
            return Err(invalid("url", format!("at most {URL_BYTES_MAX} bytes")));
        }
        for e in &new.events {
            if !EVENTS.contains(&e.as_str()) {
                return Err(invalid(
                    "events",
                    format!("{e:?} is not an event; use {}", EVENTS.join(", ")),
                ));
            }
        }
        let known = if new.types.is_empty() {
            Vec::new()
        } else {
            (self.types)()
        };
        for t in &new.types {
            if !known.contains(t) {
                return Err(invalid(
                    "types",
                    format!("{t:?} is not a type; known types: {}", known.join(", ")),
                ));
            }
        }
        self.client
            .check(&new.url)
            .await
            .map_err(SubscriptionError::Refused)?;
        let existing = self.store.subscriptions(Some(tenant)).await?;
        if existing.len() >= SUBSCRIPTIONS_MAX {
            return Err(SubscriptionError::TooMany);
        }
        let key = self.key.as_ref().ok_or(SubscriptionError::NoMasterKey)?;
        let id = format!("sub_{}", uuid_simple());
        let secret = webhook::new_secret().map_err(StoreError::Internal)?;
        let sealed = key
            .seal(secret.as_bytes(), &id)
            .map_err(StoreError::Internal)?;
        let mut events = new.events;
        events.sort();
        events.dedup();
        let mut types = new.types;
        types.sort();
        types.dedup();
        let sub = self
            .store
            .put_subscription(Subscription {
                id,
                tenant: tenant.to_owned(),
                kind: SinkKind::Webhook,
                url: new.url,
                events,
                types,
                sealed_secret: sealed,
                created_at_us: self.clock.now_us(),
                start_pos: 0,
            })
            .await?;
        Ok((sub, secret))
    }

    /// The webhook subscriptions of `tenant`, with their delivery counts.
    pub async fn list(
        &self,
        tenant: &str,
    ) -> Result<Vec<(Subscription, DeliveryCounts)>, StoreError> {
        self.store.subscriptions(Some(tenant)).await
    }

    pub async fn get(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<Option<(Subscription, DeliveryCounts)>, StoreError> {
        Ok(self
            .list(tenant)
            .await?
            .into_iter()
            .find(|(s, _)| s.id == id))
    }

    pub async fn delete(&self, tenant: &str, id: &str) -> Result<bool, StoreError> {
        self.store.delete_subscription(tenant, id).await
    }

    /// The deliveries of one of `tenant`'s subscriptions, newest first;
    /// `None` when it has no such subscription.
    pub async fn deliveries(
        &self,
        tenant: &str,
        id: &str,
        query: DeliveryQuery,
    ) -> Result<Option<Vec<Delivery>>, StoreError> {
        if self.get(tenant, id).await?.is_none() {
            return Ok(None);
        }
        self.store.deliveries(id, query).await.map(Some)
    }

    pub async fn redeliver(&self, tenant: &str, id: u64) -> Result<RedeliverOutcome, StoreError> {
        self.store.redeliver(tenant, id, self.clock.now_us()).await
    }
}

fn uuid_simple() -> String {
    ripen_store::EntityId::new_v7().0.simple().to_string()
}
