//! Who may call what (docs/security.md): API keys, scopes, tenants and
//! request rates, decided once for every request before its handler runs.
//!
//! [`rule`] is the one table of what each route needs. A route it does not
//! name is refused, so a new endpoint cannot be served by accident without
//! a rule. A request that passes carries its [`Caller`] (tenant and scopes)
//! to the handler, which scopes every query to that tenant.
//!
//! Keys are checked by the SHA-256 of what the request presents. A node
//! remembers keys it has checked for a few seconds, and forgets them all
//! whenever any node creates or revokes a key (the store tells it), so a
//! revoked key stops working at once on every node.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ripen_engine::config::AuthConfig;
use ripen_engine::keys::{Scope, Scopes};
use ripen_engine::Engine;
use ripen_store::DEFAULT_TENANT;

use crate::{store_problem, AppState, Problem};

/// What a route needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Anyone: health, metrics, the API document and the dashboard's files.
    Public,
    /// A key with this scope.
    Needs(Scope),
}

/// What `method path` needs, `path` being the route's template as the
/// router knows it; `None` for a route without a rule, which is refused.
pub fn rule(method: &Method, path: &str) -> Option<Access> {
    use Access::{Needs, Public};
    use Scope::{Admin, Operate, Read, Submit, Worker};
    let get = method == Method::GET || method == Method::HEAD;
    let post = method == Method::POST;
    let delete = method == Method::DELETE;
    Some(match path {
        "/" | "/dashboard/app.js" | "/dashboard/app.css" | "/healthz" | "/readyz" | "/metrics"
        | "/openapi.json"
            if get =>
        {
            Public
        }
        "/v1/entities/{key}" if post => Needs(Submit),
        "/v1/entities"
        | "/v1/entities/{key}"
        | "/v1/entities/{id}/data"
        | "/v1/entities/{id}/events"
        | "/v1/events"
        | "/v1/stats"
        | "/v1/types"
        | "/v1/types/{type}"
        | "/v1/types/{type}/versions"
        | "/v1/types/{type}/versions/{n}"
            if get =>
        {
            Needs(Read)
        }
        "/v1/entities:retry" | "/v1/entities/{id}/retry" | "/v1/entities/{id}/cancel" if post => {
            Needs(Operate)
        }
        "/v1/types/{type}/versions" if post => Needs(Admin),
        "/v1/subscriptions" if get || post => Needs(Admin),
        "/v1/subscriptions/{id}" if get || delete => Needs(Admin),
        "/v1/subscriptions/{id}/deliveries" if get => Needs(Admin),
        "/v1/deliveries/{id}/redeliver" if post => Needs(Admin),
        "/v1/keys" if get || post => Needs(Admin),
        "/v1/keys/{id}" if delete => Needs(Admin),
        "/v1/queues/{queue}/claim"
        | "/v1/tasks/{task}/heartbeat"
        | "/v1/tasks/{task}/complete"
        | "/v1/tasks/{task}/fail"
            if post =>
        {
            Needs(Worker)
        }
        _ => return None,
    })
}

/// Who is calling: what every handler scopes its queries by.
#[derive(Clone, Debug)]
pub struct Caller {
    pub tenant: Arc<str>,
    pub scopes: Scopes,
    /// The key's id; `None` on an open server.
    pub key_id: Option<Arc<str>>,
}

impl Caller {
    /// The caller of an open server: the default tenant, every scope.
    fn open() -> Caller {
        Caller {
            tenant: DEFAULT_TENANT.into(),
            scopes: Scopes::all(),
            key_id: None,
        }
    }

    /// The operator: an admin of the default tenant, who may manage other
    /// tenants' keys and register type versions (types are shared by
    /// every tenant).
    pub fn is_operator(&self) -> bool {
        self.is_default_tenant() && self.scopes.has(Scope::Admin)
    }

    /// Whether the caller speaks for the default tenant, the operator's:
    /// what sees node-wide figures such as rates.
    pub fn is_default_tenant(&self) -> bool {
        &*self.tenant == DEFAULT_TENANT
    }
}

/// How long a checked key is remembered when no change is heard: what
/// bounds a revocation's delay should a store notification be lost.
const REMEMBER_FOR: Duration = Duration::from_secs(5);
/// Keys remembered at most; beyond that the memory starts over.
const REMEMBERED_MAX: usize = 10_000;
/// Rate buckets kept at most; beyond that full ones are dropped.
const BUCKETS_MAX: usize = 100_000;

#[derive(Clone)]
enum Known {
    Valid(Caller),
    Revoked,
}

/// The node's side of authentication.
pub struct Auth {
    /// True while the store has no key and serving open is allowed: every
    /// request is then the open caller. Turns false, for good, once any
    /// node creates a key.
    open: AtomicBool,
    /// Bumped whenever any node changes keys: remembered keys of an older
    /// generation are checked again.
    generation: AtomicU64,
    remembered: Mutex<HashMap<String, (Known, Instant, u64)>>,
    per_key: Limiter,
    per_tenant: Limiter,
    /// Told whenever keys changed: what [`stay_open`] waits for.
    changed: tokio::sync::Notify,
}

impl Auth {
    /// Decides whether this node may serve at `addr`, and how. With no key
    /// in the store, a loopback address runs open with a warning; any
    /// other address refuses to start unless `auth.open` is set.
    pub async fn start(engine: &Engine, addr: SocketAddr) -> anyhow::Result<Arc<Auth>> {
        let config = &engine.config().auth;
        let any = engine
            .any_keys()
            .await
            .map_err(|e| anyhow::anyhow!("read the API keys: {e}"))?;
        let open = !any;
        if open {
            if !addr.ip().is_loopback() && !config.open {
                anyhow::bail!(
                    "refusing to serve on {addr} with no API key: create one first with \
                     `ripen keys create --config {} --tenant default --scopes admin`, \
                     or set auth.open = true to serve without keys",
                    engine.config().path.display()
                );
            }
            tracing::warn!(
                %addr,
                "no API key exists: every request is served as tenant default with every scope until one is created"
            );
        }
        let auth = Arc::new(Auth::new(open, config));
        let weak = Arc::downgrade(&auth);
        engine.watch_keys(Arc::new(move || {
            if let Some(auth) = weak.upgrade() {
                auth.forget();
            }
        }));
        Ok(auth)
    }

    fn new(open: bool, config: &AuthConfig) -> Auth {
        Auth {
            open: AtomicBool::new(open),
            generation: AtomicU64::new(0),
            remembered: Mutex::new(HashMap::new()),
            per_key: Limiter::new(config.rate_per_key, config.burst),
            per_tenant: Limiter::new(config.rate_per_tenant, config.burst),
            changed: tokio::sync::Notify::new(),
        }
    }

    /// Some node created or revoked a key.
    fn forget(&self) {
        self.changed.notify_one();
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.remembered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// A key now exists: this node stops serving open, at once.
    pub fn close(&self) {
        self.open.store(false, Ordering::Release);
    }

    fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// The caller `secret` speaks for.
    async fn check(&self, engine: &Engine, secret: &str) -> Result<Caller, Problem> {
        let hash = ripen_engine::keys::hash(secret);
        let generation = self.generation.load(Ordering::Acquire);
        let remembered = self
            .remembered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&hash)
            .filter(|(_, at, g)| *g == generation && at.elapsed() < REMEMBER_FOR)
            .map(|(known, _, _)| known.clone());
        let known = match remembered {
            Some(known) => known,
            None => {
                let key = engine.key_by_secret(secret).await.map_err(store_problem)?;
                let Some(key) = key else {
                    // An open server has no key to find, but a key found
                    // now means another node just created one.
                    return Err(Problem::unauthorized("the API key is not known"));
                };
                // A key exists: whatever this node thought, it is not open.
                self.close();
                let known = if key.revoked_at_us.is_some() {
                    Known::Revoked
                } else {
                    Known::Valid(Caller {
                        tenant: key.tenant.as_str().into(),
                        scopes: ripen_engine::keys::scopes_of(&key),
                        key_id: Some(key.id.as_str().into()),
                    })
                };
                let mut map = self.remembered.lock().unwrap_or_else(|e| e.into_inner());
                // Only what was read under the current generation is kept.
                if self.generation.load(Ordering::Acquire) == generation {
                    if map.len() >= REMEMBERED_MAX {
                        map.clear();
                    }
                    map.insert(hash, (known.clone(), Instant::now(), generation));
                }
                known
            }
        };
        match known {
            Known::Valid(caller) => Ok(caller),
            Known::Revoked => Err(Problem::unauthorized("the API key was revoked")),
        }
    }
}

/// How often an open node asks the store whether a key exists, besides
/// when it hears that keys changed: a key written while no node listened
/// (with `ripen keys create --config`) is found within this.
const OPEN_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Runs while the node is open: closes it once the store holds a key,
/// whichever node created it.
pub async fn stay_open(state: Arc<AppState>) {
    let auth = &state.auth;
    while auth.is_open() {
        let _ = tokio::time::timeout(OPEN_CHECK_EVERY, auth.changed.notified()).await;
        if let Ok(true) = state.engine.any_keys().await {
            auth.close();
            tracing::info!("an API key exists: requests now need one");
        }
    }
}

/// The bearer token of a request: `Ok(None)` when it presents none.
fn bearer(request: &Request) -> Result<Option<&str>, Problem> {
    let Some(value) = request.headers().get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| Problem::unauthorized("the Authorization header is not visible ASCII"))?;
    let (scheme, token) = value.trim().split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(Problem::unauthorized(
            "give the API key as Authorization: Bearer <key>",
        ));
    }
    Ok(Some(token.trim()))
}

/// The middleware every routed request goes through.
pub async fn authorize(
    State(state): State<Arc<AppState>>,
    mut request: Request,
    next: Next,
) -> Response {
    let path = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let needs = match path.as_deref().and_then(|p| rule(request.method(), p)) {
        Some(Access::Public) => return next.run(request).await,
        Some(Access::Needs(scope)) => scope,
        None => {
            tracing::error!(path = ?path, method = %request.method(), "a route without an access rule");
            return Problem::forbidden("this endpoint has no access rule").into_response();
        }
    };
    // The token is copied out: a request's body may not be shared across
    // the await.
    let token = match bearer(&request) {
        Ok(token) => token.map(str::to_owned),
        Err(problem) => return problem.into_response(),
    };
    let caller = match caller(&state, token.as_deref()).await {
        Ok(caller) => caller,
        Err(problem) => return problem.into_response(),
    };
    if !caller.scopes.has(needs) {
        return Problem::forbidden(format!("the API key lacks the scope {needs}"))
            .with("scope", serde_json::json!(needs.as_str()))
            .into_response();
    }
    if needs == Scope::Worker && !caller.is_default_tenant() {
        // A task carries any tenant's payload: worker queues are the
        // operator's, served by keys of the default tenant.
        return Problem::forbidden("worker keys belong to the default tenant")
            .with("scope", serde_json::json!(needs.as_str()))
            .into_response();
    }
    if let Some(id) = &caller.key_id {
        let auth = &state.auth;
        let waits = [auth.per_key.take(id), auth.per_tenant.take(&caller.tenant)];
        if let Some(wait) = waits.into_iter().flatten().max() {
            return Problem::new(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                "rate-limited",
                "Too many requests",
                "the request rate of this key or its tenant is over its limit",
            )
            .retry_after(wait)
            .into_response();
        }
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}

async fn caller(state: &AppState, token: Option<&str>) -> Result<Caller, Problem> {
    match token {
        Some(secret) => state.auth.check(&state.engine, secret).await,
        None if state.auth.is_open() => Ok(Caller::open()),
        None => Err(Problem::unauthorized(
            "this server needs an API key: Authorization: Bearer <key>",
        )),
    }
}

/// Token buckets by name: `rate` requests a second, `burst` at once.
struct Limiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<Arc<str>, (f64, Instant)>>,
}

impl Limiter {
    fn new(rate: f64, burst: u32) -> Limiter {
        let burst = if burst > 0 {
            f64::from(burst)
        } else {
            rate.max(1.0)
        };
        Limiter {
            rate,
            burst,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token from `name`'s bucket; when it is empty, the whole
    /// seconds until one is there.
    fn take(&self, name: &Arc<str>) -> Option<u64> {
        if self.rate <= 0.0 {
            return None;
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= BUCKETS_MAX && !buckets.contains_key(name) {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let (tokens, at) = buckets.entry(name.clone()).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            None
        } else {
            Some(((1.0 - *tokens) / self.rate).ceil().max(1.0) as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_allow_their_burst_then_say_when_to_come_back() {
        let limiter = Limiter::new(2.0, 3);
        let k: Arc<str> = "k".into();
        assert_eq!((0..3).filter_map(|_| limiter.take(&k)).count(), 0);
        assert_eq!(limiter.take(&k), Some(1));
        let other: Arc<str> = "other".into();
        assert_eq!(limiter.take(&other), None, "buckets are per name");
        assert_eq!(Limiter::new(0.0, 0).take(&k), None, "0 is no limit");
    }

    #[test]
    fn every_scope_guards_something_and_unknown_routes_have_no_rule() {
        for scope in Scope::ALL {
            let guarded = [
                (Method::POST, "/v1/entities/{key}"),
                (Method::GET, "/v1/entities"),
                (Method::POST, "/v1/entities/{id}/retry"),
                (Method::POST, "/v1/keys"),
                (Method::POST, "/v1/queues/{queue}/claim"),
            ]
            .iter()
            .any(|(m, p)| rule(m, p) == Some(Access::Needs(scope)));
            assert!(guarded, "{scope} guards nothing");
        }
        assert_eq!(rule(&Method::DELETE, "/v1/entities"), None);
        assert_eq!(rule(&Method::GET, "/v1/unknown"), None);
        assert_eq!(rule(&Method::POST, "/healthz"), None);
    }
}
