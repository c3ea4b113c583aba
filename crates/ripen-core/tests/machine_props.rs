//! Property tests of the entity state machine (`ripen_core::apply`).
//!
//! Random valid pipelines (1 to 8 steps, random `needs` over a random DAG laid
//! out in a random index order, consistent `critical` flags, small retry
//! policies and timeouts) are driven by random operation sequences: time
//! passing, claims, completions with current or stale epochs, lease expiries,
//! node crashes, cancel and retry. After every input three things are checked:
//!
//! * an independent reference model of `apply` (written differently: it
//!   recomputes what the machine updates incrementally) predicts the exact
//!   refusal or the exact next state;
//! * the invariants of "Lifecycle" and "Guarantees" in docs/concepts.md hold
//!   for the state (guarantees 3, 4, 6 and 7 as far as the pure core is
//!   concerned);
//! * the transition and its events agree: a refusal changes nothing, the
//!   status moves only along the lifecycle, every event matches a change and
//!   every change but "blocked -> queued" has its event.
//!
//! On top of that, a fair driver shows liveness (guarantee 3) from random
//! reachable states, and scripted drivers check the end states the lifecycle
//! promises: all succeed -> ready; a critical step fails for good -> failed;
//! only a non-critical step fails for good -> ready and degraded.
//!
//! Entities may depend on others (up to three references, two of which may
//! name the same entity, some of them ready at submission): the operations
//! then include the awaited entities becoming ready, failing or being
//! cancelled, in any order and repeated (a replayed wake-up), and the model
//! and the invariants cover guarantee 4's second half: nothing starts before
//! every dependency is ready, and a waiting entity has nothing due. The fair
//! driver settles the dependencies too, with random outcomes.

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError};

use ripen_core::machine::ERROR_LEN_MAX;
use ripen_core::retry::{backoff_ms, RETRY_AFTER_MAX_MS};
use ripen_core::{
    apply, Action, Ctx, Dependency, EntityState, EntityStatus, Event, Executor, Input, LostReason,
    Pipeline, Refusal, RetryPolicy, StepDef, StepStatus, Transition, UnixMicros,
};

type TestResult<T = ()> = Result<T, TestCaseError>;

/// The time every test entity is submitted at.
const T0: UnixMicros = 1_700_000_000_000_000;
/// The most inputs the fair driver may need to settle an entity.
const DRIVER_OPS_MAX: usize = 10_000;
/// The steps a claim may be valid for, and those a result may be valid for.
const CLAIMABLE: &[StepStatus] = &[StepStatus::Queued, StepStatus::Retrying];
const RUNNING: &[StepStatus] = &[StepStatus::Running];
/// What the model writes as `last_error` for a lost attempt: the machine's
/// wording is its own business, the model only requires that there is one.
const LOST_MARK: &str = "\u{0}lost";

/// `cases` by default; `PROPTEST_CASES` raises it for a soak run.
fn config(cases: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    Config {
        cases,
        // Minimal failing cases are written down as plain tests instead.
        failure_persistence: None,
        ..Config::default()
    }
}

// ---------------------------------------------------------------------------
// Pipelines
// ---------------------------------------------------------------------------

/// One step before it is made consistent, in topological position `k`.
#[derive(Clone, Debug)]
struct RawStep {
    /// Bit `j` set: this step needs the step in topological position `j < k`.
    needs_mask: u8,
    critical: bool,
    timeout_ms: u64,
    max_attempts: u32,
    initial_backoff_ms: u64,
    extra_backoff_ms: u64,
}

fn raw_step() -> impl Strategy<Value = RawStep> {
    (
        any::<u8>(),
        prop::bool::weighted(0.7),
        1u64..=50,
        1u32..=4,
        0u64..=20,
        0u64..=40,
    )
        .prop_map(
            |(needs_mask, critical, timeout_ms, max_attempts, initial, extra)| RawStep {
                needs_mask,
                critical,
                timeout_ms,
                max_attempts,
                initial_backoff_ms: initial,
                extra_backoff_ms: extra,
            },
        )
}

/// A test pipeline with the lease grace the engine runs it with.
#[derive(Clone, Debug)]
struct Case {
    pipeline: Pipeline,
    lease_grace_ms: u64,
    /// The entities it depends on at submission (ids 1 to 3), as seen then.
    deps: Vec<Dependency>,
}

/// The id of an entity no test entity depends on.
const STRANGER: u128 = 9;

fn deps() -> impl Strategy<Value = Vec<Dependency>> {
    prop_oneof![
        2 => Just(Vec::new()),
        3 => prop::collection::vec(1u128..=3, 1..=3),
    ]
    .prop_flat_map(|parents| (Just(parents), any::<[bool; 4]>()))
    .prop_map(|(parents, ready)| {
        // One entity is seen the same way through every reference to it.
        parents
            .into_iter()
            .map(|parent| Dependency {
                parent,
                status: if ready[parent as usize] {
                    EntityStatus::Ready
                } else {
                    EntityStatus::Pending
                },
            })
            .collect()
    })
}

/// Builds a pipeline from steps in topological order, placed at the indexes
/// `perm` gives them, so that `needs` may point forwards or backwards.
fn build(raw: &[RawStep], perm: &[usize], force_non_critical: bool) -> Pipeline {
    let n = raw.len();
    let needs: Vec<Vec<usize>> = (0..n)
        .map(|k| {
            (0..k)
                .filter(|&j| raw[k].needs_mask & (1 << j) != 0)
                .collect()
        })
        .collect();
    let mut critical = vec![false; n];
    for k in 0..n {
        // A critical step may only need critical steps.
        critical[k] = raw[k].critical && needs[k].iter().all(|&j| critical[j]);
    }
    if force_non_critical && n >= 2 {
        // Nothing needs the last step in topological order.
        critical[n - 1] = false;
    }
    if !critical.iter().any(|&c| c) {
        // The first step needs nothing, so it may be critical.
        critical[0] = true;
    }
    let mut defs: Vec<Option<StepDef>> = vec![None; n];
    for k in 0..n {
        let r = &raw[k];
        defs[perm[k]] = Some(StepDef {
            // Named after its index in the pipeline, as failures print them.
            name: format!("s{}", perm[k]),
            needs: needs[k].iter().map(|&j| format!("s{}", perm[j])).collect(),
            critical: critical[k],
            timeout_ms: r.timeout_ms,
            retry: RetryPolicy {
                max_attempts: r.max_attempts,
                initial_backoff_ms: r.initial_backoff_ms,
                max_backoff_ms: r.initial_backoff_ms + r.extra_backoff_ms,
            },
            executor: Executor::Http {
                url: format!("http://127.0.0.1:1/s{}", perm[k]),
            },
            compensate: None,
        });
    }
    Pipeline::new(defs.into_iter().map(Option::unwrap).collect()).expect("a valid pipeline")
}

fn case_with(min_steps: usize, force_non_critical: bool) -> impl Strategy<Value = Case> {
    (min_steps..=8usize)
        .prop_flat_map(move |n| {
            (
                prop::collection::vec(raw_step(), n),
                Just((0..n).collect::<Vec<usize>>()).prop_shuffle(),
                0u64..=20,
                deps(),
            )
        })
        .prop_map(move |(raw, perm, lease_grace_ms, deps)| Case {
            pipeline: build(&raw, &perm, force_non_critical),
            lease_grace_ms,
            deps,
        })
}

fn case() -> impl Strategy<Value = Case> {
    case_with(1, false)
}

// ---------------------------------------------------------------------------
// Random operations
// ---------------------------------------------------------------------------

/// Which epoch a completion carries, relative to the step's current one.
#[derive(Clone, Debug)]
enum EpochSel {
    Current,
    Older(u8),
    Newer(u8),
    Any(u8),
}

impl EpochSel {
    fn resolve(&self, current: u64) -> u64 {
        match *self {
            EpochSel::Current => current,
            EpochSel::Older(k) => current.saturating_sub(1 + u64::from(k)),
            EpochSel::Newer(k) => current + 1 + u64::from(k),
            EpochSel::Any(v) => u64::from(v),
        }
    }
}

fn epoch_sel() -> impl Strategy<Value = EpochSel> {
    prop_oneof![
        6 => Just(EpochSel::Current),
        2 => (0u8..3).prop_map(EpochSel::Older),
        1 => (0u8..3).prop_map(EpochSel::Newer),
        1 => (0u8..8).prop_map(EpochSel::Any),
    ]
}

#[derive(Clone, Debug)]
enum Op {
    /// Let this many microseconds pass.
    Advance(u64),
    /// Move the clock exactly to a step's due time (boundary cases).
    AdvanceToDue(u8),
    /// A claim, by a named holder or not.
    Claim(Target, bool),
    /// A heartbeat of the holder of a running attempt.
    Heartbeat(Target, EpochSel),
    Succeed(Target, EpochSel),
    Fail {
        step: Target,
        epoch: EpochSel,
        retryable: bool,
        retry_after_ms: Option<u64>,
        long_error: bool,
    },
    /// `Lost { LeaseExpired }`, at whatever time it is.
    Expire(Target, EpochSel),
    /// The node restarts: every running attempt is lost.
    Crash,
    Cancel,
    Retry,
    /// An entity becomes ready: one this entity depends on (by index into
    /// its dependencies), or now and then one it does not.
    ParentReady(u8),
    /// An entity fails (or is cancelled, when set).
    ParentFailed(u8, bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        30 => (0u64..=80_000).prop_map(Op::Advance),
        20 => any::<u8>().prop_map(Op::AdvanceToDue),
        50 => (target(), any::<bool>()).prop_map(|(t, named)| Op::Claim(t, named)),
        15 => (target(), epoch_sel()).prop_map(|(s, e)| Op::Heartbeat(s, e)),
        50 => (target(), epoch_sel()).prop_map(|(s, e)| Op::Succeed(s, e)),
        30 => (
            target(),
            epoch_sel(),
            any::<bool>(),
            prop::option::weighted(
                0.3,
                prop_oneof![19 => 0u64..=100, 1 => Just(u64::MAX)]
            ),
            prop::bool::weighted(0.1),
        )
            .prop_map(|(step, epoch, retryable, retry_after_ms, long_error)| Op::Fail {
                step,
                epoch,
                retryable,
                retry_after_ms,
                long_error,
            }),
        20 => (target(), epoch_sel()).prop_map(|(s, e)| Op::Expire(s, e)),
        8 => Just(Op::Crash),
        2 => Just(Op::Cancel),
        10 => Just(Op::Retry),
        12 => any::<u8>().prop_map(Op::ParentReady),
        4 => (any::<u8>(), any::<bool>()).prop_map(|(p, c)| Op::ParentFailed(p, c)),
    ]
}

fn ops(max: usize) -> impl Strategy<Value = Vec<(Op, f64)>> {
    prop::collection::vec((op(), 0.0f64..1.0), 0..=max)
}

/// Which step an input names.
#[derive(Clone, Copy, Debug)]
enum Target {
    /// A step for which the input may be valid: a queued or retrying step for
    /// a claim, a running step for a result; any step if there is none.
    Apt(u8),
    /// Any step, now and then an index past the end of the pipeline.
    Any(u8),
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        3 => any::<u8>().prop_map(Target::Apt),
        1 => any::<u8>().prop_map(Target::Any),
    ]
}

/// Mostly a step of the pipeline, now and then an index past its end.
fn pick(sel: u8, n: usize) -> usize {
    if sel >= 250 {
        n + usize::from(sel - 250)
    } else {
        usize::from(sel) % n
    }
}

fn error_text(i: usize, long: bool) -> String {
    if long {
        // 1 + 2 * 600 bytes: the cut at ERROR_LEN_MAX falls inside a character.
        format!("x{}", "é".repeat(600))
    } else {
        format!("boom {i}")
    }
}

// ---------------------------------------------------------------------------
// The reference model
// ---------------------------------------------------------------------------

fn truncated(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if out.len() + c.len_utf8() > ERROR_LEN_MAX {
            break;
        }
        out.push(c);
    }
    out
}

fn ms_to_us(ms: u64) -> i64 {
    i64::try_from(ms).unwrap() * 1_000
}

/// Steps that need `step`, directly or not, computed from `needs` alone.
fn downstream_of(p: &Pipeline, step: usize) -> Vec<bool> {
    let mut reach = vec![false; p.len()];
    reach[step] = true;
    let mut changed = true;
    while changed {
        changed = false;
        for (i, spec) in p.steps().iter().enumerate() {
            if !reach[i] && spec.needs.iter().any(|&j| reach[j]) {
                reach[i] = true;
                changed = true;
            }
        }
    }
    reach[step] = false;
    reach
}

fn is_live(status: StepStatus) -> bool {
    !matches!(
        status,
        StepStatus::Succeeded | StepStatus::Failed | StepStatus::Skipped
    )
}

/// Unblocks every blocked step whose needs have all succeeded.
fn model_unblock(p: &Pipeline, m: &mut EntityState, now: UnixMicros) {
    for i in 0..p.len() {
        let ready = p
            .step(i)
            .needs
            .iter()
            .all(|&j| m.steps[j].status == StepStatus::Succeeded);
        if m.steps[i].status == StepStatus::Blocked && ready {
            m.steps[i].status = StepStatus::Queued;
            m.steps[i].due_at_us = Some(now);
        }
    }
}

fn model_settle(p: &Pipeline, m: &mut EntityState, now: UnixMicros) {
    let done =
        (0..p.len()).all(|i| !p.step(i).critical || m.steps[i].status == StepStatus::Succeeded);
    if m.status == EntityStatus::Pending && done {
        m.status = EntityStatus::Ready;
        m.ready_at_us = Some(now);
    }
}

fn model_skip(m: &mut EntityState, which: impl Fn(usize) -> bool) {
    for (i, s) in m.steps.iter_mut().enumerate() {
        if which(i) && is_live(s.status) {
            s.status = StepStatus::Skipped;
            s.due_at_us = None;
        }
    }
}

/// Whether the entity waits: pending, with a dependency not seen ready.
fn model_waiting(m: &EntityState) -> bool {
    m.status == EntityStatus::Pending && m.deps.iter().any(|d| d.status != EntityStatus::Ready)
}

/// A dependency input counts only for a pending entity that still awaits
/// that entity.
fn model_awaits(m: &EntityState, parent: u128) -> Result<(), Refusal> {
    if m.status != EntityStatus::Pending {
        return Err(Refusal::WrongStatus(m.status));
    }
    let awaited = m
        .deps
        .iter()
        .any(|d| d.parent == parent && d.status == EntityStatus::Pending);
    if !awaited {
        return Err(Refusal::NotAwaited);
    }
    Ok(())
}

fn model_live_attempt(m: &EntityState, step: usize, epoch: u64) -> Result<(), Refusal> {
    match m.steps.get(step) {
        None => Err(Refusal::NoSuchStep),
        Some(s) if s.status != StepStatus::Running || s.epoch != epoch => Err(Refusal::Stale),
        Some(_) => Ok(()),
    }
}

fn model_fail(
    p: &Pipeline,
    m: &mut EntityState,
    step: usize,
    error: String,
    retryable: bool,
    retry_after_ms: Option<u64>,
    ctx: Ctx,
) {
    let spec = p.step(step);
    let s = &mut m.steps[step];
    s.last_error = Some(error);
    if retryable && s.attempts < spec.retry.max_attempts {
        let delay = backoff_ms(&spec.retry, s.attempts, ctx.jitter, retry_after_ms);
        s.status = StepStatus::Retrying;
        s.due_at_us = Some(ctx.now_us + ms_to_us(delay));
        return;
    }
    s.status = StepStatus::Failed;
    s.due_at_us = None;
    if spec.critical {
        if m.status == EntityStatus::Pending {
            m.status = EntityStatus::Failed;
        }
        model_skip(m, |_| true);
    } else {
        m.degraded = true;
        let down = downstream_of(p, step);
        model_skip(m, |i| down[i]);
    }
}

/// What `apply` should do, written from the lifecycle of docs/concepts.md
/// rather than from machine.rs.
fn model_apply(
    p: &Pipeline,
    before: &EntityState,
    input: &Input,
    ctx: Ctx,
) -> Result<EntityState, Refusal> {
    let mut m = before.clone();
    let now = ctx.now_us;
    match input {
        Input::Claim { step, holder } => {
            let step = *step;
            if step >= p.len() {
                return Err(Refusal::NoSuchStep);
            }
            if matches!(m.status, EntityStatus::Failed | EntityStatus::Cancelled) {
                return Err(Refusal::NotRunnable);
            }
            let spec = p.step(step);
            let s = &mut m.steps[step];
            let runnable = s.status == StepStatus::Queued
                || (s.status == StepStatus::Retrying && s.due_at_us.unwrap() <= now);
            if !runnable {
                return Err(Refusal::NotRunnable);
            }
            s.status = StepStatus::Running;
            s.attempts += 1;
            s.epoch += 1;
            s.due_at_us = Some(now + ms_to_us(spec.timeout_ms + ctx.lease_grace_ms));
            s.holder = holder.clone();
        }
        &Input::Heartbeat { step, epoch } => {
            model_live_attempt(&m, step, epoch)?;
            let s = &mut m.steps[step];
            let lease = s.due_at_us.unwrap();
            if lease <= now {
                return Err(Refusal::Stale);
            }
            let renewed = now + ms_to_us(p.step(step).timeout_ms + ctx.lease_grace_ms);
            s.due_at_us = Some(lease.max(renewed));
        }
        &Input::Succeeded { step, epoch } => {
            model_live_attempt(&m, step, epoch)?;
            let s = &mut m.steps[step];
            s.status = StepStatus::Succeeded;
            s.due_at_us = None;
            s.last_error = None;
            model_unblock(p, &mut m, now);
            model_settle(p, &mut m, now);
        }
        Input::Failed {
            step,
            epoch,
            error,
            retryable,
            retry_after_ms,
        } => {
            model_live_attempt(&m, *step, *epoch)?;
            model_fail(
                p,
                &mut m,
                *step,
                truncated(error),
                *retryable,
                *retry_after_ms,
                ctx,
            );
        }
        &Input::Lost {
            step,
            epoch,
            reason,
        } => {
            model_live_attempt(&m, step, epoch)?;
            if reason == LostReason::LeaseExpired && m.steps[step].due_at_us.unwrap() > now {
                return Err(Refusal::LeaseLive);
            }
            model_fail(p, &mut m, step, LOST_MARK.to_owned(), true, None, ctx);
        }
        Input::Cancel => {
            if m.status != EntityStatus::Pending {
                return Err(Refusal::WrongStatus(m.status));
            }
            m.status = EntityStatus::Cancelled;
            model_skip(&mut m, |_| true);
        }
        Input::Retry => {
            if m.status != EntityStatus::Failed {
                return Err(Refusal::WrongStatus(m.status));
            }
            m.status = EntityStatus::Pending;
            m.degraded = false;
            for s in &mut m.steps {
                if matches!(s.status, StepStatus::Failed | StepStatus::Skipped) {
                    s.status = StepStatus::Blocked;
                    s.attempts = 0;
                    s.due_at_us = None;
                }
            }
            // What it has not seen ready is awaited again.
            for d in &mut m.deps {
                if d.status != EntityStatus::Ready {
                    d.status = EntityStatus::Pending;
                }
            }
            if !model_waiting(&m) {
                model_unblock(p, &mut m, now);
            }
            model_settle(p, &mut m, now);
        }
        Input::DependencyReady { parent } => {
            model_awaits(&m, *parent)?;
            for d in m.deps.iter_mut().filter(|d| d.parent == *parent) {
                d.status = EntityStatus::Ready;
            }
            if !model_waiting(&m) {
                model_unblock(p, &mut m, now);
                model_settle(p, &mut m, now);
            }
        }
        Input::DependencyFailed { parent, status } => {
            if !matches!(status, EntityStatus::Failed | EntityStatus::Cancelled) {
                return Err(Refusal::NotAFailure);
            }
            model_awaits(&m, *parent)?;
            for d in m.deps.iter_mut().filter(|d| d.parent == *parent) {
                d.status = *status;
            }
            m.status = EntityStatus::Failed;
            model_skip(&mut m, |_| true);
        }
    }
    // Only a running attempt has a holder.
    for s in &mut m.steps {
        if s.status != StepStatus::Running {
            s.holder = None;
        }
    }
    Ok(m)
}

fn check_model(want: &EntityState, got: &EntityState) -> TestResult {
    prop_assert_eq!(want.status, got.status, "entity status");
    prop_assert_eq!(want.degraded, got.degraded, "degraded");
    prop_assert_eq!(want.ready_at_us, got.ready_at_us, "ready_at_us");
    prop_assert_eq!(want.steps.len(), got.steps.len());
    for (i, (w, g)) in want.steps.iter().zip(&got.steps).enumerate() {
        prop_assert_eq!(w.status, g.status, "status of step {}", i);
        prop_assert_eq!(w.attempts, g.attempts, "attempts of step {}", i);
        prop_assert_eq!(w.epoch, g.epoch, "epoch of step {}", i);
        prop_assert_eq!(w.due_at_us, g.due_at_us, "due_at_us of step {}", i);
        prop_assert_eq!(&w.holder, &g.holder, "holder of step {}", i);
        if w.last_error.as_deref() == Some(LOST_MARK) {
            prop_assert!(
                g.last_error.as_ref().is_some_and(|e| !e.is_empty()),
                "a lost attempt of step {} leaves an error",
                i
            );
        } else {
            prop_assert_eq!(&w.last_error, &g.last_error, "last_error of step {}", i);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Invariants
// ---------------------------------------------------------------------------

/// Invariants of one state, whatever led to it.
fn check_state(p: &Pipeline, st: &EntityState) -> TestResult {
    prop_assert_eq!(st.steps.len(), p.len());
    let crit_done =
        (0..p.len()).all(|i| !p.step(i).critical || st.steps[i].status == StepStatus::Succeeded);
    let crit_failed =
        (0..p.len()).any(|i| p.step(i).critical && st.steps[i].status == StepStatus::Failed);
    let non_crit_failed =
        (0..p.len()).any(|i| !p.step(i).critical && st.steps[i].status == StepStatus::Failed);

    // 4. ready <=> every critical step succeeded; failed => a critical step failed.
    prop_assert_eq!(
        st.status == EntityStatus::Ready,
        crit_done,
        "ready <=> all critical steps succeeded"
    );
    let dep_failed = st
        .deps
        .iter()
        .any(|d| matches!(d.status, EntityStatus::Failed | EntityStatus::Cancelled));
    if st.status == EntityStatus::Failed {
        prop_assert!(
            crit_failed || dep_failed,
            "a failed entity has a failed critical step or dependency"
        );
    }
    if dep_failed {
        prop_assert_eq!(
            st.status,
            EntityStatus::Failed,
            "a failed dependency fails it"
        );
    }
    // Guarantee 4: nothing starts before every dependency is ready, and a
    // waiting entity has nothing due (it costs no polling).
    let waiting = model_waiting(st);
    let all_deps_ready = st.deps.iter().all(|d| d.status == EntityStatus::Ready);
    for (i, s) in st.steps.iter().enumerate() {
        if s.epoch > 0 || s.status != StepStatus::Blocked && s.status != StepStatus::Skipped {
            prop_assert!(
                all_deps_ready,
                "step {} is {:?} (epoch {}) before every dependency is ready",
                i,
                s.status,
                s.epoch
            );
        }
        if waiting {
            prop_assert_eq!(s.due_at_us, None, "a waiting entity's step {} is due", i);
        }
    }
    if st.status == EntityStatus::Ready {
        prop_assert!(all_deps_ready, "ready before its dependencies");
    }
    // degraded <=> a non-critical step failed for good.
    prop_assert_eq!(
        st.degraded,
        non_crit_failed,
        "degraded <=> a non-critical step failed"
    );
    prop_assert_eq!(
        st.ready_at_us.is_some(),
        st.status == EntityStatus::Ready,
        "ready_at_us is set exactly for a ready entity"
    );
    // 7. A failed or cancelled entity has nothing left to run.
    if matches!(st.status, EntityStatus::Failed | EntityStatus::Cancelled) {
        prop_assert!(
            !st.has_live_steps(),
            "a {:?} entity keeps no live step",
            st.status
        );
    }

    for (i, s) in st.steps.iter().enumerate() {
        let spec = p.step(i);
        let needs_done = spec
            .needs
            .iter()
            .all(|&j| st.steps[j].status == StepStatus::Succeeded);
        // 3. (guarantee 4) nothing starts before all its needs succeeded.
        if matches!(
            s.status,
            StepStatus::Queued | StepStatus::Running | StepStatus::Retrying | StepStatus::Succeeded
        ) {
            prop_assert!(needs_done, "step {} is {:?} before its needs", i, s.status);
        }
        // A blocked step can still be unblocked: no need is dead, one is
        // pending, or the entity waits for its dependencies.
        if s.status == StepStatus::Blocked {
            prop_assert!(
                !needs_done || waiting,
                "step {} is blocked with all needs done",
                i
            );
            prop_assert!(
                spec.needs.iter().all(|&j| !matches!(
                    st.steps[j].status,
                    StepStatus::Failed | StepStatus::Skipped
                )),
                "step {} is blocked on a step that will never succeed",
                i
            );
        }
        // 5. attempts are bounded and counted.
        prop_assert!(
            s.attempts <= spec.retry.max_attempts,
            "step {} has {} attempts of {}",
            i,
            s.attempts,
            spec.retry.max_attempts
        );
        prop_assert!(
            u64::from(s.attempts) <= s.epoch,
            "step {}: attempts <= epoch",
            i
        );
        match s.status {
            StepStatus::Blocked | StepStatus::Queued => {
                prop_assert_eq!(s.attempts, 0, "a {:?} step {} has no attempt", s.status, i)
            }
            StepStatus::Running | StepStatus::Succeeded | StepStatus::Failed => {
                prop_assert!(
                    s.attempts >= 1,
                    "a {:?} step {} had an attempt",
                    s.status,
                    i
                )
            }
            StepStatus::Retrying => prop_assert!(
                s.attempts >= 1 && s.attempts < spec.retry.max_attempts,
                "a retrying step {} has attempts left",
                i
            ),
            StepStatus::Skipped => {}
            StepStatus::Dormant => prop_assert!(
                false,
                "step {} is dormant, but these pipelines have no compensation",
                i
            ),
        }
        // 6. due_at_us is set exactly for queued, retrying and running steps.
        prop_assert_eq!(
            s.due_at_us.is_some(),
            matches!(
                s.status,
                StepStatus::Queued | StepStatus::Retrying | StepStatus::Running
            ),
            "due_at_us of a {:?} step {}",
            s.status,
            i
        );
    }
    Ok(())
}

/// Invariants of one transition `before --input--> after` and its events.
fn check_transition(
    p: &Pipeline,
    before: &EntityState,
    after: &EntityState,
    input: &Input,
    ctx: Ctx,
    result: &Result<Transition, Refusal>,
) -> TestResult {
    // 5. A completion from a stale attempt is refused as stale (guarantee 6).
    if let Input::Succeeded { step, epoch }
    | Input::Failed { step, epoch, .. }
    | Input::Lost { step, epoch, .. } = input
    {
        if let Some(s) = before.steps.get(*step) {
            if s.epoch != *epoch || s.status != StepStatus::Running {
                prop_assert_eq!(result, &Err(Refusal::Stale), "a stale completion");
            }
        }
    }
    let transition = match result {
        Err(_) => {
            // 1. A refusal changes nothing at all.
            prop_assert_eq!(before, after, "a refused input changed the state");
            return Ok(());
        }
        Ok(t) => t,
    };
    check_actions(p, before, after, transition)?;
    let events = &transition.events;
    if matches!(input, Input::Heartbeat { .. }) {
        // A heartbeat only moves a lease, which is not history.
        prop_assert!(events.is_empty(), "a heartbeat writes no history");
    } else {
        prop_assert!(!events.is_empty(), "an accepted input says what it did");
    }

    // 2. The status moves only along the lifecycle, and only by the right input.
    if before.status != after.status {
        prop_assert!(
            before.status.may_become(after.status),
            "illegal transition {:?} -> {:?}",
            before.status,
            after.status
        );
        let by_right_input = match (before.status, after.status) {
            (EntityStatus::Failed, EntityStatus::Pending) => matches!(input, Input::Retry),
            (EntityStatus::Pending, EntityStatus::Cancelled) => matches!(input, Input::Cancel),
            (EntityStatus::Pending, EntityStatus::Ready) => {
                matches!(input, Input::Succeeded { .. })
            }
            (EntityStatus::Pending, EntityStatus::Failed) => matches!(
                input,
                Input::Failed { .. } | Input::Lost { .. } | Input::DependencyFailed { .. }
            ),
            _ => false,
        };
        prop_assert!(
            by_right_input,
            "{:?} -> {:?} by {:?}",
            before.status,
            after.status,
            input
        );
    }
    let status_events: Vec<(EntityStatus, EntityStatus)> = events
        .iter()
        .filter_map(|e| match e {
            Event::StatusChanged { from, to } => Some((*from, *to)),
            _ => None,
        })
        .collect();
    if before.status == after.status {
        prop_assert!(status_events.is_empty(), "StatusChanged without a change");
    } else {
        prop_assert_eq!(
            status_events,
            vec![(before.status, after.status)],
            "one StatusChanged per change"
        );
    }
    if before.status != EntityStatus::Ready && after.status == EntityStatus::Ready {
        prop_assert_eq!(after.ready_at_us, Some(ctx.now_us));
    }
    if before.ready_at_us.is_some() {
        prop_assert_eq!(before.ready_at_us, after.ready_at_us, "ready_at_us is kept");
    }
    for (i, (b, a)) in before.steps.iter().zip(&after.steps).enumerate() {
        // 5. Epochs never go back.
        prop_assert!(a.epoch >= b.epoch, "the epoch of step {} went back", i);
    }

    // 8. Replaying the events on `before` gives `after`.
    let mut sim = before.clone();
    let mut succeeded_any = false;
    for (k, ev) in events.iter().enumerate() {
        let prev = k.checked_sub(1).map(|k| &events[k]);
        match ev {
            Event::StatusChanged { from, to } => {
                prop_assert_eq!(*from, sim.status, "StatusChanged.from");
                sim.status = *to;
                if *to == EntityStatus::Ready {
                    sim.ready_at_us = Some(ctx.now_us);
                }
                if *to == EntityStatus::Pending {
                    sim.degraded = false;
                }
            }
            Event::StepStarted {
                step,
                attempt,
                epoch,
                lease_expires_at_us,
                holder,
            } => {
                prop_assert!(
                    matches!(input, Input::Claim { step: s, holder: h } if s == step && h == holder),
                    "StepStarted by its claim, with its holder"
                );
                let s = &mut sim.steps[*step];
                prop_assert!(matches!(
                    s.status,
                    StepStatus::Queued | StepStatus::Retrying
                ));
                prop_assert_eq!(*attempt, s.attempts + 1, "StepStarted.attempt");
                prop_assert_eq!(*epoch, s.epoch + 1, "StepStarted.epoch");
                prop_assert!(*lease_expires_at_us > ctx.now_us, "a lease in the future");
                s.status = StepStatus::Running;
                s.attempts = *attempt;
                s.epoch = *epoch;
                s.due_at_us = Some(*lease_expires_at_us);
                s.holder = holder.clone();
            }
            Event::StepSucceeded { step, attempt } => {
                prop_assert!(
                    matches!(input, Input::Succeeded { step: s, .. } if s == step),
                    "StepSucceeded by its success"
                );
                let s = &mut sim.steps[*step];
                prop_assert_eq!(s.status, StepStatus::Running);
                prop_assert_eq!(*attempt, s.attempts, "StepSucceeded.attempt");
                s.status = StepStatus::Succeeded;
                s.due_at_us = None;
                s.last_error = None;
                succeeded_any = true;
            }
            Event::AttemptFailed {
                step,
                attempt,
                error,
                retryable,
                lost,
            } => {
                let from_input = match input {
                    Input::Failed {
                        step: s, retryable, ..
                    } if s == step => Some((*retryable, None)),
                    Input::Lost {
                        step: s, reason, ..
                    } if s == step => Some((true, Some(*reason))),
                    _ => None,
                };
                prop_assert_eq!(
                    from_input,
                    Some((*retryable, *lost)),
                    "AttemptFailed from its input, with the reason of a lost attempt"
                );
                let s = &mut sim.steps[*step];
                prop_assert_eq!(s.status, StepStatus::Running);
                prop_assert_eq!(*attempt, s.attempts, "AttemptFailed.attempt");
                prop_assert!(error.len() <= ERROR_LEN_MAX);
                s.last_error = Some(error.clone());
                let next = events.get(k + 1);
                prop_assert!(
                    matches!(next, Some(Event::RetryScheduled { step: s, .. } | Event::StepFailed { step: s, .. }) if s == step),
                    "AttemptFailed is followed by its consequence"
                );
            }
            Event::RetryScheduled {
                step,
                next_attempt,
                due_at_us,
            } => {
                let retryable = matches!(
                    prev,
                    Some(Event::AttemptFailed { step: s, retryable: true, .. }) if s == step
                );
                prop_assert!(retryable, "RetryScheduled after a retryable failure");
                let policy = p.step(*step).retry;
                let s = &mut sim.steps[*step];
                prop_assert_eq!(*next_attempt, s.attempts + 1, "RetryScheduled.next_attempt");
                prop_assert!(*next_attempt <= policy.max_attempts);
                let floor = match input {
                    Input::Failed { retry_after_ms, .. } => {
                        retry_after_ms.unwrap_or(0).min(RETRY_AFTER_MAX_MS)
                    }
                    _ => 0,
                };
                let delay = due_at_us - ctx.now_us;
                prop_assert!(
                    delay >= ms_to_us(floor) && delay <= ms_to_us(policy.max_backoff_ms.max(floor)),
                    "backoff {}us within [{}ms, max(max_backoff, Retry-After)]",
                    delay,
                    floor
                );
                s.status = StepStatus::Retrying;
                s.due_at_us = Some(*due_at_us);
            }
            Event::StepFailed { step, attempts } => {
                prop_assert!(
                    matches!(prev, Some(Event::AttemptFailed { step: s, .. }) if s == step),
                    "StepFailed after a failed attempt"
                );
                let retryable = matches!(
                    prev,
                    Some(Event::AttemptFailed {
                        retryable: true,
                        ..
                    })
                );
                let s = &mut sim.steps[*step];
                prop_assert_eq!(*attempts, s.attempts, "StepFailed.attempts");
                if retryable {
                    prop_assert_eq!(
                        *attempts,
                        p.step(*step).retry.max_attempts,
                        "a retryable failure is final only when attempts ran out"
                    );
                }
                s.status = StepStatus::Failed;
                s.due_at_us = None;
                let becomes_degraded = !p.step(*step).critical && !sim.degraded;
                prop_assert_eq!(
                    matches!(events.get(k + 1), Some(Event::Degraded { step: s }) if s == step),
                    becomes_degraded,
                    "Degraded follows the failure that degrades the entity, and only that one"
                );
            }
            Event::Degraded { step } => {
                prop_assert!(
                    matches!(prev, Some(Event::StepFailed { step: s, .. }) if s == step),
                    "Degraded after the non-critical step failed for good"
                );
                prop_assert!(!p.step(*step).critical, "only a non-critical step degrades");
                prop_assert!(!sim.degraded, "Degraded only when the flag turns on");
                sim.degraded = true;
            }
            Event::StepSkipped { step } => {
                let s = &mut sim.steps[*step];
                prop_assert!(is_live(s.status), "only a live step is skipped");
                s.status = StepStatus::Skipped;
                s.due_at_us = None;
            }
            Event::DependencyReady { parent } => {
                prop_assert!(
                    matches!(input, Input::DependencyReady { parent: p } if p == parent),
                    "DependencyReady by {:?}",
                    input
                );
                for d in sim.deps.iter_mut().filter(|d| d.parent == *parent) {
                    prop_assert_eq!(d.status, EntityStatus::Pending, "it was awaited");
                    d.status = EntityStatus::Ready;
                }
            }
            Event::CompensationStarted
            | Event::CompensationDone
            | Event::CompensationFailed { .. } => {
                prop_assert!(false, "{:?}, but these pipelines have no compensation", ev)
            }
            Event::DependencyFailed { parent, status } => {
                prop_assert!(
                    matches!(input, Input::DependencyFailed { parent: p, status: s } if p == parent && s == status),
                    "DependencyFailed by {:?}",
                    input
                );
                prop_assert!(
                    matches!(
                        events.get(k + 1),
                        Some(Event::StatusChanged {
                            to: EntityStatus::Failed,
                            ..
                        })
                    ),
                    "the entity fails right after its dependency"
                );
                for d in sim.deps.iter_mut().filter(|d| d.parent == *parent) {
                    prop_assert_eq!(d.status, EntityStatus::Pending, "it was awaited");
                    d.status = *status;
                }
            }
            Event::StepRequeued { step } => {
                prop_assert!(matches!(input, Input::Retry));
                let s = &mut sim.steps[*step];
                prop_assert!(matches!(s.status, StepStatus::Failed | StepStatus::Skipped));
                let to = after.steps[*step].status;
                prop_assert!(matches!(to, StepStatus::Queued | StepStatus::Blocked));
                s.status = to;
                s.attempts = 0;
                s.due_at_us = after.steps[*step].due_at_us;
            }
        }
    }
    // Changes without an event of their own: a step that stops running has
    // no holder; a heartbeat moves its lease; a success unblocks dependents,
    // and so does the last awaited dependency; a retry awaits again what it
    // had not seen ready.
    if matches!(input, Input::Retry) {
        for (s, a) in sim.deps.iter_mut().zip(&after.deps) {
            let want = if s.status == EntityStatus::Ready {
                EntityStatus::Ready
            } else {
                EntityStatus::Pending
            };
            prop_assert_eq!(a.status, want, "a retry awaits what it had not seen ready");
            s.status = a.status;
        }
    }
    let released = events
        .iter()
        .any(|e| matches!(e, Event::DependencyReady { .. }))
        && !model_waiting(after);
    for (i, (s, a)) in sim.steps.iter_mut().zip(&after.steps).enumerate() {
        if s.status != StepStatus::Running {
            s.holder = None;
        }
        if let Input::Heartbeat { step, .. } = input {
            if *step == i && s.status == StepStatus::Running {
                prop_assert!(
                    a.due_at_us >= s.due_at_us,
                    "a heartbeat never shortens a lease"
                );
                s.due_at_us = a.due_at_us;
            }
        }
        if s.status == StepStatus::Blocked && a.status == StepStatus::Queued {
            prop_assert!(
                succeeded_any || released,
                "step {} unblocked without a success or the last dependency",
                i
            );
            prop_assert_eq!(a.due_at_us, Some(ctx.now_us));
            s.status = StepStatus::Queued;
            s.due_at_us = a.due_at_us;
        }
    }
    prop_assert_eq!(&sim, after, "the events account for every change");
    Ok(())
}

/// The actions of a transition follow from the change: a step that became
/// queued is dispatched once, each timer set is announced with its time, and
/// subscribers hear of every status change and of the entity degrading.
fn check_actions(
    p: &Pipeline,
    before: &EntityState,
    after: &EntityState,
    t: &Transition,
) -> TestResult {
    let mut dispatched: Vec<usize> = Vec::new();
    let mut woken: Vec<(usize, UnixMicros)> = Vec::new();
    let mut notified: Vec<usize> = Vec::new();
    for a in &t.actions {
        match *a {
            Action::Dispatch { step } => dispatched.push(step),
            Action::WakeAt { step, at_us } => woken.push((step, at_us)),
            Action::Notify { event } => notified.push(event),
        }
    }
    let mut newly_queued: Vec<usize> = (0..p.len())
        .filter(|&i| {
            after.steps[i].status == StepStatus::Queued
                && (before.steps[i].status != StepStatus::Queued)
        })
        .collect();
    dispatched.sort_unstable();
    newly_queued.sort_unstable();
    prop_assert_eq!(
        dispatched,
        newly_queued,
        "Dispatch exactly the newly queued steps"
    );
    let mut timers: Vec<(usize, UnixMicros)> = (0..p.len())
        .filter(|&i| {
            matches!(
                after.steps[i].status,
                StepStatus::Running | StepStatus::Retrying
            ) && after.steps[i] != before.steps[i]
        })
        .map(|i| (i, after.steps[i].due_at_us.unwrap_or(i64::MIN)))
        .collect();
    woken.sort_unstable();
    timers.sort_unstable();
    prop_assert_eq!(woken, timers, "WakeAt for every lease and backoff set");
    let notable: Vec<usize> = t
        .events
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e, Event::StatusChanged { .. } | Event::Degraded { .. }))
        .map(|(k, _)| k)
        .collect();
    prop_assert_eq!(
        notified,
        notable,
        "Notify each status change and degradation"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// The harness
// ---------------------------------------------------------------------------

struct Harness<'a> {
    p: &'a Pipeline,
    state: EntityState,
    now: UnixMicros,
    lease_grace_ms: u64,
    /// Every input applied, for failure messages.
    log: Vec<String>,
    /// How often, in percent, the fair driver lets an awaited entity fail
    /// or be cancelled rather than become ready.
    parent_failure_pct: u64,
}

impl<'a> Harness<'a> {
    fn new(case: &'a Case) -> TestResult<Harness<'a>> {
        let state = EntityState::depending(&case.pipeline, T0, case.deps.clone());
        check_state(&case.pipeline, &state)?;
        Ok(Harness {
            p: &case.pipeline,
            state,
            now: T0,
            lease_grace_ms: case.lease_grace_ms,
            log: Vec::new(),
            parent_failure_pct: 0,
        })
    }

    /// Applies one input and checks it against the model and the invariants.
    fn apply(&mut self, input: Input, jitter: f64) -> TestResult<Result<Vec<Event>, Refusal>> {
        let before = self.state.clone();
        let ctx = Ctx {
            now_us: self.now,
            jitter,
            lease_grace_ms: self.lease_grace_ms,
        };
        self.log
            .push(format!("t+{}us {input:?} jitter={jitter}", self.now - T0));
        let want = model_apply(self.p, &before, &input, ctx);
        let transition = apply(self.p, &mut self.state, input.clone(), ctx);
        let checked = check_transition(self.p, &before, &self.state, &input, ctx, &transition)
            .and_then(|()| check_state(self.p, &self.state))
            .and_then(|()| match (&want, &transition) {
                (Err(w), Err(g)) => {
                    prop_assert_eq!(w, g, "the refusal");
                    Ok(())
                }
                (Ok(w), Ok(_)) => check_model(w, &self.state),
                _ => {
                    prop_assert!(
                        false,
                        "model says {:?}, machine says {:?}",
                        want,
                        transition
                    );
                    Ok(())
                }
            });
        let got = transition.map(|t| t.events);
        if let Err(e) = checked {
            return Err(TestCaseError::fail(format!(
                "{e}\n  input: {input:?}\n  before: {before:?}\n  after: {:?}\n  result: {got:?}\n  \
                 model: {want:?}\n  history:\n    {}",
                self.state,
                self.log.join("\n    ")
            )));
        }
        Ok(got)
    }

    /// Applies an input the caller knows to be valid.
    fn apply_ok(&mut self, input: Input, jitter: f64) -> TestResult<Vec<Event>> {
        match self.apply(input.clone(), jitter)? {
            Ok(events) => Ok(events),
            Err(r) => Err(TestCaseError::fail(format!(
                "valid input {input:?} refused: {r:?}\n  state: {:?}\n  history:\n    {}",
                self.state,
                self.log.join("\n    ")
            ))),
        }
    }

    /// Applies an input that may well be refused; the checks are what count.
    fn try_apply(&mut self, input: Input, jitter: f64) -> TestResult {
        self.apply(input, jitter).map(drop)
    }

    fn target(&self, t: Target, apt: &[StepStatus]) -> usize {
        let n = self.p.len();
        match t {
            Target::Apt(sel) => {
                let steps: Vec<usize> = (0..n)
                    .filter(|&i| apt.contains(&self.state.steps[i].status))
                    .collect();
                if steps.is_empty() {
                    usize::from(sel) % n
                } else {
                    steps[usize::from(sel) % steps.len()]
                }
            }
            Target::Any(sel) => pick(sel, n),
        }
    }

    fn epoch_of(&self, step: usize) -> u64 {
        self.state.steps.get(step).map_or(0, |s| s.epoch)
    }

    fn run_op(&mut self, op: &Op, jitter: f64, i: usize) -> TestResult {
        match op {
            Op::Advance(us) => self.now += *us as i64,
            Op::AdvanceToDue(sel) => {
                let dues: Vec<UnixMicros> = self
                    .state
                    .steps
                    .iter()
                    .filter_map(|s| s.due_at_us)
                    .collect();
                if !dues.is_empty() {
                    self.now = self.now.max(dues[usize::from(*sel) % dues.len()]);
                }
            }
            Op::Claim(sel, named) => {
                self.try_apply(
                    Input::Claim {
                        step: self.target(*sel, CLAIMABLE),
                        holder: named.then(|| format!("worker-{i}")),
                    },
                    jitter,
                )?;
            }
            Op::Heartbeat(sel, e) => {
                let step = self.target(*sel, RUNNING);
                let epoch = e.resolve(self.epoch_of(step));
                self.try_apply(Input::Heartbeat { step, epoch }, jitter)?;
            }
            Op::Succeed(sel, e) => {
                let step = self.target(*sel, RUNNING);
                let epoch = e.resolve(self.epoch_of(step));
                self.try_apply(Input::Succeeded { step, epoch }, jitter)?;
            }
            Op::Fail {
                step,
                epoch,
                retryable,
                retry_after_ms,
                long_error,
            } => {
                let step = self.target(*step, RUNNING);
                let epoch = epoch.resolve(self.epoch_of(step));
                let input = Input::Failed {
                    step,
                    epoch,
                    error: error_text(i, *long_error),
                    retryable: *retryable,
                    retry_after_ms: *retry_after_ms,
                };
                self.try_apply(input, jitter)?;
            }
            Op::Expire(sel, e) => {
                let step = self.target(*sel, RUNNING);
                let epoch = e.resolve(self.epoch_of(step));
                let reason = LostReason::LeaseExpired;
                self.try_apply(
                    Input::Lost {
                        step,
                        epoch,
                        reason,
                    },
                    jitter,
                )?;
            }
            Op::Crash => {
                let running: Vec<(usize, u64)> = self
                    .state
                    .steps
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.status == StepStatus::Running)
                    .map(|(i, s)| (i, s.epoch))
                    .collect();
                for (step, epoch) in running {
                    // A critical step running out of attempts skips the others:
                    // their loss is then stale, which the model predicts.
                    let reason = LostReason::NodeRestarted;
                    self.try_apply(
                        Input::Lost {
                            step,
                            epoch,
                            reason,
                        },
                        jitter,
                    )?;
                }
            }
            Op::Cancel => {
                self.try_apply(Input::Cancel, jitter)?;
            }
            Op::Retry => {
                self.try_apply(Input::Retry, jitter)?;
            }
            Op::ParentReady(sel) => {
                let parent = self.parent(*sel);
                self.try_apply(Input::DependencyReady { parent }, jitter)?;
            }
            Op::ParentFailed(sel, cancelled) => {
                let parent = self.parent(*sel);
                let status = match (*sel % 16, cancelled) {
                    // Now and then a status that is no failure at all.
                    (15, _) => EntityStatus::Ready,
                    (_, true) => EntityStatus::Cancelled,
                    (_, false) => EntityStatus::Failed,
                };
                self.try_apply(Input::DependencyFailed { parent, status }, jitter)?;
            }
        }
        Ok(())
    }

    /// One of the entities this one depends on, or now and then one it
    /// does not.
    fn parent(&self, sel: u8) -> u128 {
        let deps = &self.state.deps;
        if deps.is_empty() || sel % 8 == 7 {
            STRANGER
        } else {
            deps[usize::from(sel) % deps.len()].parent
        }
    }
}

// ---------------------------------------------------------------------------
// Drivers
// ---------------------------------------------------------------------------

/// SplitMix64: the driver's own randomness, seeded by proptest.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// How an attempt ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Succeed,
    FailRetryable(Option<u64>),
    FailFatal,
    /// The node running it restarts.
    LostRestart,
    /// Nobody reports; the lease runs out.
    LostExpire,
}

fn random_outcome(rng: &mut Rng) -> Outcome {
    match rng.below(20) {
        0..=9 => Outcome::Succeed,
        10..=12 => Outcome::FailRetryable(None),
        13 => Outcome::FailRetryable(Some(rng.next() % 50)),
        14 => Outcome::FailFatal,
        15..=16 => Outcome::LostRestart,
        _ => Outcome::LostExpire,
    }
}

/// Drives an entity as a fair engine would: claim everything runnable, end
/// one running attempt as `outcome` says, and when nothing can run, let time
/// pass to the earliest due retry. An operator retries a failed entity up to
/// `retries` times. Returns once the entity is terminal with no live steps,
/// which it must reach within [`DRIVER_OPS_MAX`] inputs.
fn drive(
    h: &mut Harness<'_>,
    rng: &mut Rng,
    mut retries: u32,
    outcome: &mut dyn FnMut(&mut Rng, usize, u32) -> Outcome,
) -> TestResult {
    let n = h.p.len();
    let mut ops = 0;
    loop {
        prop_assert!(
            ops < DRIVER_OPS_MAX,
            "no terminal status after {} inputs: {:?}",
            ops,
            h.state
        );
        match h.state.status {
            EntityStatus::Failed if retries > 0 => {
                retries -= 1;
                h.apply_ok(Input::Retry, rng.unit())?;
                ops += 1;
                continue;
            }
            EntityStatus::Failed | EntityStatus::Cancelled => break,
            EntityStatus::Ready | EntityStatus::Pending => {
                if !h.state.has_live_steps() {
                    break;
                }
            }
        }
        if h.state.is_waiting() {
            // The entities it awaits settle, in a random order, and now and
            // then a wake-up is delivered twice: the second one changes
            // nothing.
            let awaited: Vec<u128> = h.state.awaited().collect();
            let parent = awaited[rng.below(awaited.len())];
            let input = if rng.below(100) < h.parent_failure_pct as usize {
                let status = if rng.below(2) == 0 {
                    EntityStatus::Failed
                } else {
                    EntityStatus::Cancelled
                };
                Input::DependencyFailed { parent, status }
            } else {
                Input::DependencyReady { parent }
            };
            h.apply_ok(input.clone(), rng.unit())?;
            if rng.below(4) == 0 {
                let replayed = h.apply(input, rng.unit())?;
                prop_assert!(replayed.is_err(), "a replayed wake-up was applied again");
            }
            ops += 1;
            continue;
        }
        for step in 0..n {
            let s = &h.state.steps[step];
            let runnable = s.status == StepStatus::Queued
                || (s.status == StepStatus::Retrying && s.due_at_us.unwrap() <= h.now);
            if runnable {
                h.apply_ok(Input::Claim { step, holder: None }, rng.unit())?;
                ops += 1;
            }
        }
        let running: Vec<usize> = (0..n)
            .filter(|&i| h.state.steps[i].status == StepStatus::Running)
            .collect();
        if running.is_empty() {
            let next = h
                .state
                .steps
                .iter()
                .filter(|s| s.status == StepStatus::Retrying)
                .filter_map(|s| s.due_at_us)
                .min();
            let Some(next) = next else {
                return Err(TestCaseError::fail(format!(
                    "stuck: live steps, but none queued, running or retrying: {:?}\n  history:\n    {}",
                    h.state,
                    h.log.join("\n    ")
                )));
            };
            h.now = h.now.max(next);
            continue;
        }
        let step = running[rng.below(running.len())];
        let s = &h.state.steps[step];
        let (epoch, attempt, lease) = (s.epoch, s.attempts, s.due_at_us.unwrap());
        let jitter = rng.unit();
        let input = match outcome(rng, step, attempt) {
            Outcome::Succeed => Input::Succeeded { step, epoch },
            Outcome::FailRetryable(retry_after_ms) => Input::Failed {
                step,
                epoch,
                error: "503".into(),
                retryable: true,
                retry_after_ms,
            },
            Outcome::FailFatal => Input::Failed {
                step,
                epoch,
                error: "400".into(),
                retryable: false,
                retry_after_ms: None,
            },
            Outcome::LostRestart => Input::Lost {
                step,
                epoch,
                reason: LostReason::NodeRestarted,
            },
            Outcome::LostExpire => {
                h.now = h.now.max(lease);
                Input::Lost {
                    step,
                    epoch,
                    reason: LostReason::LeaseExpired,
                }
            }
        };
        h.apply_ok(input, jitter)?;
        ops += 1;
    }
    prop_assert!(h.state.status.is_terminal(), "terminal: {:?}", h.state);
    prop_assert!(!h.state.has_live_steps(), "no live step: {:?}", h.state);
    Ok(())
}

fn steps_where(p: &Pipeline, critical: bool) -> Vec<usize> {
    (0..p.len())
        .filter(|&i| p.step(i).critical == critical)
        .collect()
}

// ---------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(512))]

    /// Random inputs, valid or not, against the model and the invariants.
    #[test]
    fn apply_matches_model_and_keeps_invariants(case in case(), ops in ops(60)) {
        let mut h = Harness::new(&case)?;
        for (i, (op, jitter)) in ops.iter().enumerate() {
            h.run_op(op, *jitter, i)?;
        }
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// Guarantee 3: from any reachable state, a fair engine settles the entity.
    #[test]
    fn a_fair_driver_settles_every_entity(
        case in case(),
        prefix in ops(40),
        seed in any::<u64>(),
        retries in 0u32..=2,
    ) {
        let mut h = Harness::new(&case)?;
        h.parent_failure_pct = 20;
        for (i, (op, jitter)) in prefix.iter().enumerate() {
            h.run_op(op, *jitter, i)?;
        }
        let mut rng = Rng(seed);
        drive(&mut h, &mut rng, retries, &mut |rng, _, _| random_outcome(rng))?;
    }

    /// Every step succeeds, some after transient failures within their
    /// attempts: the entity ends ready, not degraded, with every step succeeded.
    #[test]
    fn transient_failures_end_ready(
        case in case(),
        flaky in prop::collection::vec(0u32..4, 8),
        seed in any::<u64>(),
    ) {
        let p = &case.pipeline;
        // Step i fails this many times (fewer than its attempts) before it succeeds.
        let fails: Vec<u32> = (0..p.len())
            .map(|i| flaky[i].min(p.step(i).retry.max_attempts - 1))
            .collect();
        let mut h = Harness::new(&case)?;
        let mut rng = Rng(seed);
        drive(&mut h, &mut rng, 0, &mut |rng, step, attempt| {
            if attempt <= fails[step] {
                match rng.below(3) {
                    0 => Outcome::FailRetryable(None),
                    1 => Outcome::LostRestart,
                    _ => Outcome::LostExpire,
                }
            } else {
                Outcome::Succeed
            }
        })?;
        let st = &h.state;
        prop_assert_eq!(st.status, EntityStatus::Ready);
        prop_assert!(!st.degraded);
        for (i, s) in st.steps.iter().enumerate() {
            prop_assert_eq!(s.status, StepStatus::Succeeded, "step {}", i);
            prop_assert_eq!(s.attempts, fails[i] + 1, "attempts of step {}", i);
        }
    }

    /// A critical step fails non-retryably on its first attempt, all else
    /// succeeds: the entity fails, nothing is left half-done, and late results
    /// of the attempts cut short are refused as stale.
    #[test]
    fn a_fatal_critical_failure_fails_the_entity(
        case in case(),
        which in any::<Index>(),
        seed in any::<u64>(),
    ) {
        let p = &case.pipeline;
        let bad = *which.get(&steps_where(p, true));
        let mut h = Harness::new(&case)?;
        let mut rng = Rng(seed);
        drive(&mut h, &mut rng, 0, &mut |_, step, _| {
            if step == bad { Outcome::FailFatal } else { Outcome::Succeed }
        })?;
        let down = downstream_of(p, bad);
        prop_assert_eq!(h.state.status, EntityStatus::Failed);
        for (i, s) in h.state.steps.iter().enumerate() {
            if i == bad {
                prop_assert_eq!(s.status, StepStatus::Failed);
                prop_assert_eq!(s.attempts, 1);
            } else {
                prop_assert!(
                    matches!(s.status, StepStatus::Succeeded | StepStatus::Skipped),
                    "step {} is {:?}", i, s.status
                );
            }
            if down[i] {
                prop_assert_eq!(s.status, StepStatus::Skipped, "step {} needs the failed one", i);
            }
        }
        // Steps skipped while running: their results come too late.
        for i in 0..p.len() {
            let s = h.state.steps[i].clone();
            if s.status == StepStatus::Skipped && s.epoch > 0 {
                let r = h.apply(Input::Succeeded { step: i, epoch: s.epoch }, 0.5)?;
                prop_assert_eq!(r, Err(Refusal::Stale));
                let r = h.apply(Input::Lost { step: i, epoch: s.epoch, reason: LostReason::NodeRestarted }, 0.5)?;
                prop_assert_eq!(r, Err(Refusal::Stale));
            }
        }
    }

    /// Only a non-critical step fails for good: the entity is ready and
    /// degraded, the steps that need the failed one are skipped, all else succeeded.
    #[test]
    fn a_non_critical_failure_degrades(
        case in case_with(2, true),
        which in any::<Index>(),
        fatal in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let p = &case.pipeline;
        let bad = *which.get(&steps_where(p, false));
        let mut h = Harness::new(&case)?;
        let mut rng = Rng(seed);
        drive(&mut h, &mut rng, 0, &mut |rng, step, _| {
            if step != bad {
                Outcome::Succeed
            } else if fatal {
                Outcome::FailFatal
            } else {
                match rng.below(3) {
                    0 => Outcome::FailRetryable(Some(rng.next() % 20)),
                    1 => Outcome::LostRestart,
                    _ => Outcome::LostExpire,
                }
            }
        })?;
        let down = downstream_of(p, bad);
        prop_assert_eq!(h.state.status, EntityStatus::Ready);
        prop_assert!(h.state.degraded);
        for (i, s) in h.state.steps.iter().enumerate() {
            if i == bad {
                prop_assert_eq!(s.status, StepStatus::Failed);
                let attempts = if fatal { 1 } else { p.step(i).retry.max_attempts };
                prop_assert_eq!(s.attempts, attempts);
            } else if down[i] {
                prop_assert_eq!(s.status, StepStatus::Skipped, "step {} needs the failed one", i);
            } else {
                prop_assert_eq!(s.status, StepStatus::Succeeded, "step {}", i);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// A worked example
// ---------------------------------------------------------------------------

/// The pipeline of the performance targets in docs/concepts.md: A; B, C after A; D after
/// B, C; E non-critical after A. Walks the boundaries the properties hit only
/// by chance: a lease expiring exactly at its due time, a retry claimed
/// exactly when its backoff ends, a late result after the entity settled.
#[test]
fn w5_walkthrough() -> TestResult {
    let def = |name: &str, needs: &[&str], critical: bool| StepDef {
        name: name.into(),
        needs: needs.iter().map(|s| s.to_string()).collect(),
        critical,
        timeout_ms: 100,
        retry: RetryPolicy {
            max_attempts: 2,
            initial_backoff_ms: 10,
            max_backoff_ms: 10,
        },
        executor: Executor::Worker { queue: "q".into() },
        compensate: None,
    };
    let case = Case {
        pipeline: Pipeline::new(vec![
            def("a", &[], true),
            def("b", &["a"], true),
            def("c", &["a"], true),
            def("d", &["b", "c"], true),
            def("e", &["a"], false),
        ])
        .unwrap(),
        deps: Vec::new(),
        lease_grace_ms: 5,
    };
    let (a, b, c, d, e) = (0, 1, 2, 3, 4);
    let mut h = Harness::new(&case)?;
    let claim =
        |h: &mut Harness<'_>, step: usize| h.apply(Input::Claim { step, holder: None }, 0.999);
    let succeed = |h: &mut Harness<'_>, step: usize| {
        let epoch = h.state.steps[step].epoch;
        h.apply(Input::Succeeded { step, epoch }, 0.999)
    };
    let expire = |h: &mut Harness<'_>, step: usize| {
        let epoch = h.state.steps[step].epoch;
        let reason = LostReason::LeaseExpired;
        h.apply(
            Input::Lost {
                step,
                epoch,
                reason,
            },
            0.999,
        )
    };

    prop_assert_eq!(claim(&mut h, b)?, Err(Refusal::NotRunnable));
    prop_assert!(claim(&mut h, a)?.is_ok());
    let lease = h.state.steps[a].due_at_us.unwrap();
    prop_assert_eq!(lease, T0 + 105_000);
    prop_assert_eq!(
        h.apply(Input::Succeeded { step: a, epoch: 0 }, 0.5)?,
        Err(Refusal::Stale)
    );
    h.now = lease - 1;
    prop_assert_eq!(expire(&mut h, a)?, Err(Refusal::LeaseLive));
    h.now = lease;
    prop_assert!(expire(&mut h, a)?.is_ok());
    prop_assert_eq!(h.state.steps[a].status, StepStatus::Retrying);
    let due = h.state.steps[a].due_at_us.unwrap();
    prop_assert_eq!(due, lease + 9_000);
    h.now = due - 1;
    prop_assert_eq!(claim(&mut h, a)?, Err(Refusal::NotRunnable));
    h.now = due;
    prop_assert!(claim(&mut h, a)?.is_ok());
    prop_assert_eq!(h.state.steps[a].attempts, 2);
    prop_assert!(succeed(&mut h, a)?.is_ok());
    for step in [b, c, e] {
        prop_assert_eq!(h.state.steps[step].status, StepStatus::Queued);
        prop_assert!(claim(&mut h, step)?.is_ok());
    }
    prop_assert!(succeed(&mut h, b)?.is_ok());
    prop_assert_eq!(h.state.steps[d].status, StepStatus::Blocked);
    prop_assert!(succeed(&mut h, c)?.is_ok());
    prop_assert!(claim(&mut h, d)?.is_ok());
    let e_epoch = h.state.steps[e].epoch;
    let fatal = Input::Failed {
        step: e,
        epoch: e_epoch,
        error: "422".into(),
        retryable: false,
        retry_after_ms: None,
    };
    prop_assert!(h.apply(fatal, 0.5)?.is_ok());
    prop_assert_eq!(h.state.status, EntityStatus::Pending);
    prop_assert!(h.state.degraded);
    prop_assert!(succeed(&mut h, d)?.is_ok());
    prop_assert_eq!(h.state.status, EntityStatus::Ready);
    prop_assert!(h.state.degraded);
    prop_assert!(!h.state.has_live_steps());
    let late = Input::Succeeded {
        step: e,
        epoch: e_epoch,
    };
    prop_assert_eq!(h.apply(late, 0.5)?, Err(Refusal::Stale));
    let ready = EntityStatus::Ready;
    prop_assert_eq!(
        h.apply(Input::Cancel, 0.5)?,
        Err(Refusal::WrongStatus(ready))
    );
    prop_assert_eq!(
        h.apply(Input::Retry, 0.5)?,
        Err(Refusal::WrongStatus(ready))
    );
    Ok(())
}
