//! What a running step sees.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::error::{StepError, StepResult, Stop};

/// A sub-operation recorded in the journal during an earlier call of the same
/// step (before a crash or a suspension).
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedOp {
    pub index: u32,
    pub name: String,
    pub value: Value,
}

/// A signal delivered to a run (an approval, a callback), as journaled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signal {
    pub name: String,
    pub payload: Value,
    /// Who sent it, if they said (`cli:alice`, an API token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// When it was committed (unix ms).
    pub at: i64,
}

/// Longest signal name.
pub const MAX_SIGNAL_NAME: usize = 128;

/// Why `name` cannot name a signal, if it cannot: 1 to 128 letters, digits
/// and `_ - . :`.
pub fn signal_name_problem(name: &str) -> Option<String> {
    if name.is_empty() || name.len() > MAX_SIGNAL_NAME {
        return Some(format!("a signal name has 1 to {MAX_SIGNAL_NAME} characters"));
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':')) {
        return Some(format!("{name:?} is not a signal name (letters, digits, `_`, `-`, `.`, `:`)"));
    }
    None
}

/// Signals a run has received, by name.
pub type Signals = Arc<BTreeMap<String, Signal>>;

/// Where [`StepContext::journaled`] writes. The engine implements it with
/// durable, fenced journal appends: `record` may hold an operation back,
/// and `flush` commits what it holds; what is still held when the attempt
/// ends is committed with the attempt's result.
#[async_trait]
pub trait OpSink: Send + Sync {
    async fn record(&self, index: u32, name: &str, value: &Value) -> Result<(), StepError>;

    /// Commits every operation recorded so far.
    async fn flush(&self) -> Result<(), StepError> {
        Ok(())
    }
}

/// The context of one step attempt.
pub struct StepContext {
    run_id: String,
    step_id: String,
    attempt: u32,
    idempotency_key: String,
    clock: Arc<dyn Clock>,
    cancel: CancellationToken,
    replay: VecDeque<RecordedOp>,
    next_op: u32,
    sink: Arc<dyn OpSink>,
    signals: Signals,
    tokens: Arc<TokenMeter>,
    workflows: Option<Arc<dyn Workflows>>,
    /// The trace id and the attempt's span id, when the run is traced.
    trace: Option<([u8; 16], [u8; 8])>,
}

/// Child workflows a step may run (the workflow tools of an `agent`); the
/// engine implements it with child runs whose ids are deterministic, so a
/// step called again after a crash continues the same child.
#[async_trait]
pub trait Workflows: Send + Sync {
    /// Runs (or continues) workflow `name` as child run `{run}/{key}` with
    /// `input`, and returns its output. A child that waits (a sleep, a
    /// signal) returns `Stop::Wait`; a child that fails, its error.
    async fn run(&self, name: &str, key: &str, input: Value, cancel: CancellationToken) -> StepResult<Value>;
}

/// The model tokens a run has used, against its `limits.llm_tokens`. The
/// engine builds one per run from the journal (every journaled model call
/// counts, replayed or not); a step checks it before a new call and adds
/// what the call used.
#[derive(Debug, Default)]
pub struct TokenMeter {
    limit: Option<u64>,
    used: AtomicU64,
}

impl TokenMeter {
    pub fn new(limit: Option<u64>, used: u64) -> Self {
        Self { limit, used: AtomicU64::new(used) }
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    pub fn add(&self, tokens: u64) {
        self.used.fetch_add(tokens, Ordering::Relaxed);
    }

    /// Fails with `budget_exceeded` once the run has used its budget.
    pub fn check(&self) -> Result<(), StepError> {
        match self.limit {
            Some(limit) if self.used() >= limit => Err(StepError::fatal(
                "budget_exceeded",
                format!("the run has used {} model tokens, its limit (limits.llm_tokens) is {limit}", self.used()),
            )),
            _ => Ok(()),
        }
    }
}

impl StepContext {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        run_id: String,
        step_id: String,
        attempt: u32,
        idempotency_key: String,
        clock: Arc<dyn Clock>,
        cancel: CancellationToken,
        replay: Vec<RecordedOp>,
        sink: Arc<dyn OpSink>,
    ) -> Self {
        Self {
            run_id,
            step_id,
            attempt,
            idempotency_key,
            clock,
            cancel,
            replay: replay.into(),
            next_op: 0,
            sink,
            signals: Signals::default(),
            tokens: Arc::default(),
            workflows: None,
            trace: None,
        }
    }

    /// The W3C trace context of this attempt's span, when the run is traced:
    /// outbound requests carry it as `traceparent`.
    pub fn with_trace(mut self, trace: Option<([u8; 16], [u8; 8])>) -> Self {
        self.trace = trace;
        self
    }

    /// The `traceparent` header value (version 00, sampled), if traced.
    pub fn traceparent(&self) -> Option<String> {
        let (trace_id, span_id) = self.trace?;
        let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
        Some(format!("00-{}-{}-01", hex(&trace_id), hex(&span_id)))
    }

    /// The child workflows this step may run (the engine sets them for an
    /// `agent` with workflow tools).
    pub fn with_workflows(mut self, workflows: Arc<dyn Workflows>) -> Self {
        self.workflows = Some(workflows);
        self
    }

    pub fn workflows(&self) -> Option<&Arc<dyn Workflows>> {
        self.workflows.as_ref()
    }

    /// The run's token meter (the engine sets it; unlimited otherwise).
    pub fn with_tokens(mut self, tokens: Arc<TokenMeter>) -> Self {
        self.tokens = tokens;
        self
    }

    pub fn tokens(&self) -> &TokenMeter {
        &self.tokens
    }

    /// Whether the next journaled operation will be replayed from the
    /// journal rather than performed.
    pub fn will_replay(&self) -> bool {
        self.replay.front().is_some_and(|r| r.index == self.next_op)
    }

    /// The signals the run has received so far (the engine sets them).
    pub fn with_signals(mut self, signals: Signals) -> Self {
        self.signals = signals;
        self
    }

    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    pub fn step_id(&self) -> &str {
        &self.step_id
    }

    /// 1-based attempt number.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Stable across attempts: `{run_id}/{step_id}`. Send it to services that
    /// deduplicate (the `http` step sends it as `Idempotency-Key`).
    pub fn idempotency_key(&self) -> &str {
        &self.idempotency_key
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Resolves when the run is cancelled; long-running steps select on it.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await
    }

    /// A token that is cancelled with the run (for work the step hands on).
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Runs `op` once and journals its result; when the step is called again
    /// after a crash or a suspension, the recorded result is returned instead of
    /// running `op` again. Calls must come in the same order on every call of
    /// the step (like Temporal's deterministic replay); a name that differs from
    /// the recorded one is an error.
    ///
    /// The result is durable before anything else happens that could depend
    /// on it: before the next operation of the step runs, or else with the
    /// step's own result (its output, its wait, its failure), in the same
    /// commit. A step that asks a model once and returns pays one commit,
    /// not two.
    pub async fn journaled<T, F>(&mut self, name: &str, op: F) -> StepResult<T>
    where
        T: Serialize + DeserializeOwned,
        F: Future<Output = StepResult<T>>,
    {
        self.journaled_keyed(name, |_| op).await
    }

    /// Makes every operation journaled so far durable. A step calls it
    /// before it acts outside [`StepContext::journaled`] (the agent before
    /// running a turn's tool calls together), so that nothing it does
    /// depends on a result a crash could still lose.
    pub async fn commit_ops(&self) -> StepResult<()> {
        self.sink.flush().await.map_err(Stop::Error)
    }

    /// The idempotency key of the next journaled sub-operation:
    /// `{idempotency_key}/op/{index}`, the same on every call of the step
    /// (after a crash, a suspension or a retry of the attempt), so a model
    /// or tool call repeated after a crash can be deduplicated by the
    /// service it calls.
    pub fn next_op_key(&self) -> String {
        format!("{}/op/{}", self.idempotency_key, self.next_op)
    }

    /// Like [`StepContext::journaled`], handing `op` the operation's stable
    /// key (see [`StepContext::next_op_key`]) to send with the call.
    pub async fn journaled_keyed<T, F, Fut>(&mut self, name: &str, op: F) -> StepResult<T>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(String) -> Fut,
        Fut: Future<Output = StepResult<T>>,
    {
        let key = self.next_op_key();
        let op = op(key);
        let index = self.next_op;
        self.next_op += 1;
        if self.replay.front().is_some_and(|r| r.index == index) {
            {
                let recorded = self.replay.pop_front().expect("front exists");
                if recorded.name != name {
                    return Err(StepError::fatal(
                        "nondeterministic",
                        format!(
                            "operation {index} was recorded as {:?} but the step now performs {name:?}",
                            recorded.name
                        ),
                    )
                    .into());
                }
                return serde_json::from_value(recorded.value)
                    .map_err(|e| StepError::fatal("replay", format!("recorded {name:?} does not decode: {e}")).into());
            }
        }
        // What earlier operations returned is durable before this one acts.
        self.sink.flush().await?;
        let value = op.await?;
        let json = serde_json::to_value(&value).map_err(|e| StepError::fatal("encode", format!("{name}: {e}")))?;
        self.sink.record(index, name, &json).await?;
        Ok(value)
    }

    /// A durable sleep: the wake-up time is journaled on the first call, so a
    /// restart resumes with the remaining time. Returns `Stop::Suspend` while
    /// the time has not come, which frees the task; then the wake-up time.
    pub async fn sleep(&mut self, duration: Duration) -> StepResult<i64> {
        let now = self.now_ms();
        let at = self
            .journaled("sleep_until", async move {
                Ok(now.saturating_add(duration.as_millis().min(i64::MAX as u128) as i64))
            })
            .await?;
        self.sleep_until(at)?;
        Ok(at)
    }

    /// Waits durably for the signal `name` sent to this run (`switchyard
    /// signal RUN NAME`, and later the API): `Some(signal)` once it has been
    /// received, `None` once `timeout` (counted from the first call, which
    /// journals the deadline) has passed without it. Meanwhile returns
    /// `Stop::Wait`: the run parks with no task and no lease, and the step
    /// is called again when the signal is committed or the deadline comes.
    /// A signal sent before the step waits is kept and received at once.
    pub async fn wait_signal(&mut self, name: &str, timeout: Option<Duration>) -> StepResult<Option<Signal>> {
        let now = self.now_ms();
        let deadline = match timeout {
            Some(t) => Some(
                self.journaled("signal_deadline", async move {
                    Ok(now.saturating_add(t.as_millis().min(i64::MAX as u128) as i64))
                })
                .await?,
            ),
            None => None,
        };
        if let Some(signal) = self.signals.get(name) {
            return Ok(Some(signal.clone()));
        }
        match deadline {
            Some(at) if now >= at => Ok(None),
            _ => Err(Stop::Wait { signal: Some(name.to_owned()), until_ms: deadline }),
        }
    }

    /// Suspends until `at_ms` (unix milliseconds) unless it has passed.
    pub fn sleep_until(&self, at_ms: i64) -> StepResult<()> {
        if self.now_ms() >= at_ms { Ok(()) } else { Err(Stop::Suspend { until_ms: at_ms }) }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use std::sync::Mutex;

    /// Records ops in memory.
    #[derive(Default)]
    pub struct MemorySink {
        pub ops: Mutex<Vec<RecordedOp>>,
    }

    #[async_trait]
    impl OpSink for MemorySink {
        async fn record(&self, index: u32, name: &str, value: &Value) -> Result<(), StepError> {
            self.ops.lock().unwrap().push(RecordedOp { index, name: name.into(), value: value.clone() });
            Ok(())
        }
    }

    pub fn context(clock: Arc<dyn Clock>, sink: Arc<MemorySink>) -> StepContext {
        let replay = sink.ops.lock().unwrap().clone();
        StepContext::new("run1".into(), "s".into(), 1, "run1/s".into(), clock, CancellationToken::new(), replay, sink)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use crate::clock::ManualClock;
    use std::sync::Mutex;

    #[tokio::test]
    async fn journaled_ops_replay_instead_of_running_again() {
        let clock = Arc::new(ManualClock::new(0));
        let sink = Arc::new(MemorySink::default());
        let mut first = context(clock.clone(), sink.clone());
        let a: u32 = first.journaled("a", async { Ok(7) }).await.unwrap();
        assert_eq!(a, 7);

        let mut second = context(clock, sink.clone());
        let a: u32 = second.journaled("a", async { panic!("must replay") }).await.unwrap();
        assert_eq!(a, 7);
        let b: u32 = second.journaled("b", async { Ok(9) }).await.unwrap();
        assert_eq!(b, 9);
        assert_eq!(sink.ops.lock().unwrap().len(), 2);

        let mut third = context(Arc::new(ManualClock::new(0)), sink);
        let err = third.journaled::<u32, _>("other", async { Ok(1) }).await.unwrap_err();
        assert!(matches!(err, Stop::Error(e) if e.code == "nondeterministic"));
    }

    /// Counts flushes, and what each op saw committed when it ran.
    #[derive(Default)]
    struct Flushes {
        held: Mutex<u32>,
        committed: Mutex<u32>,
    }

    #[async_trait]
    impl OpSink for Flushes {
        async fn record(&self, _index: u32, _name: &str, _value: &Value) -> Result<(), StepError> {
            *self.held.lock().unwrap() += 1;
            Ok(())
        }
        async fn flush(&self) -> Result<(), StepError> {
            let mut held = self.held.lock().unwrap();
            *self.committed.lock().unwrap() += std::mem::take(&mut *held);
            Ok(())
        }
    }

    #[tokio::test]
    async fn an_operation_runs_only_once_the_ones_before_it_are_committed() {
        let sink = Arc::new(Flushes::default());
        let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(0));
        let mut ctx = StepContext::new(
            "r".into(),
            "s".into(),
            1,
            "r/s".into(),
            clock,
            CancellationToken::new(),
            Vec::new(),
            sink.clone(),
        );
        let seen = |sink: &Arc<Flushes>| *sink.committed.lock().unwrap();
        let s = sink.clone();
        ctx.journaled("a", async move { Ok(seen(&s)) }).await.unwrap();
        let s = sink.clone();
        let before_b: u32 = ctx.journaled("b", async move { Ok(seen(&s)) }).await.unwrap();
        assert_eq!(before_b, 1, "a was committed before b ran");
        // The last one is held: the engine writes it with the step's result.
        assert_eq!((*sink.held.lock().unwrap(), seen(&sink)), (1, 1));
        ctx.commit_ops().await.unwrap();
        assert_eq!(seen(&sink), 2);
    }

    #[tokio::test]
    async fn each_operation_has_a_stable_key() {
        let sink = Arc::new(MemorySink::default());
        let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(0));
        let mut first = context(clock.clone(), sink.clone());
        let k0 = first.journaled_keyed("call", |key| async move { Ok(key) }).await.unwrap();
        let k1 = first.journaled_keyed("call", |key| async move { Ok(key) }).await.unwrap();
        assert_eq!((k0.as_str(), k1.as_str()), ("run1/s/op/0", "run1/s/op/1"));
        // Called again (after a crash): the first is replayed, the next key is the same as before.
        let again = context(clock, Arc::new(MemorySink::default()));
        assert_eq!(again.next_op_key(), "run1/s/op/0");
    }

    #[tokio::test]
    async fn wait_signal_waits_until_received_or_the_deadline() {
        let clock = Arc::new(ManualClock::new(1_000));
        let sink = Arc::new(MemorySink::default());
        let mut ctx = context(clock.clone(), sink.clone());
        let stop = ctx.wait_signal("go", Some(Duration::from_secs(60))).await.unwrap_err();
        assert_eq!(stop, Stop::Wait { signal: Some("go".into()), until_ms: Some(61_000) });
        // Called again with the signal received: the deadline is the recorded one.
        let go = Signal { name: "go".into(), payload: serde_json::json!({"ok": true}), actor: None, at: 2_000 };
        let signals: Signals = Arc::new(BTreeMap::from([("go".to_owned(), go.clone())]));
        let mut woken = context(clock.clone(), sink.clone()).with_signals(signals);
        assert_eq!(woken.wait_signal("go", Some(Duration::from_secs(60))).await.unwrap(), Some(go));
        // Without it, past the deadline: None.
        clock.advance(Duration::from_secs(60));
        let mut late = context(clock.clone(), sink);
        assert_eq!(late.wait_signal("go", Some(Duration::from_secs(60))).await.unwrap(), None);
        // No deadline: waits for the signal only.
        let mut forever = context(clock, Arc::new(MemorySink::default()));
        let stop = forever.wait_signal("other", None).await.unwrap_err();
        assert_eq!(stop, Stop::Wait { signal: Some("other".into()), until_ms: None });
    }

    #[tokio::test]
    async fn sleep_suspends_until_the_recorded_time() {
        let clock = Arc::new(ManualClock::new(1_000));
        let sink = Arc::new(MemorySink::default());
        let mut ctx = context(clock.clone(), sink.clone());
        let stop = ctx.sleep(Duration::from_secs(3600)).await.unwrap_err();
        assert_eq!(stop, Stop::Suspend { until_ms: 1_000 + 3_600_000 });

        clock.advance(Duration::from_secs(1800));
        let mut later = context(clock.clone(), sink.clone());
        assert_eq!(later.sleep(Duration::from_secs(3600)).await.unwrap_err(), Stop::Suspend { until_ms: 3_601_000 });
        clock.advance(Duration::from_secs(1800));
        let mut due = context(clock, sink);
        due.sleep(Duration::from_secs(3600)).await.unwrap();
    }
}
