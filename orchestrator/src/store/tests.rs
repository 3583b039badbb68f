//! The store contract: group commit, idempotent creates, leases, claims and
//! fencing. Every test is written against `dyn Store`; `open` gives the
//! SQLite implementation (a PostgreSQL one runs the same tests).

use std::sync::Arc;
use std::time::Duration;

use switchyard_steps::ManualClock;

use serde_json::json;

use super::*;
use crate::journal::Encoded;

struct TempDb(std::path::PathBuf);

impl Drop for TempDb {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The store, on a manual clock for its lease times (from 0).
async fn open_with_clock(name: &str) -> (Arc<dyn Store>, TempDb, ManualClock) {
    let dir = std::env::temp_dir().join(format!("switchyard-store-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let url = dir.join("db.sqlite").display().to_string();
    let clock = ManualClock::new(0);
    let store = SqliteStore::open(&SqliteOptions { url, synchronous_full: false }).await.unwrap();
    (Arc::new(store.with_clock(Arc::new(clock.clone()))), TempDb(dir), clock)
}

async fn open(name: &str) -> (Arc<dyn Store>, TempDb) {
    let (store, dir, _) = open_with_clock(name).await;
    (store, dir)
}

/// Claims at store time `now` until `until`.
#[allow(clippy::too_many_arguments)]
async fn claim_at(
    store: &Arc<dyn Store>,
    clock: &ManualClock,
    id: &str,
    node: &str,
    seen: i64,
    now: i64,
    until: i64,
    allow_finished: bool,
) -> Option<Claim> {
    clock.advance_to(now);
    store.claim(id, node, seen, ms(until - now), allow_finished).await.unwrap()
}

fn ms(n: i64) -> Duration {
    Duration::from_millis(n as u64)
}

fn new_run(id: &str, owner: &str) -> NewRun {
    NewRun {
        id: id.into(),
        root_id: id.into(),
        parent_id: None,
        workflow: "w".into(),
        version: 1,
        definition: "h".into(),
        status: RunStatus::Queued,
        input: json!({"n": 1}),
        owner: Some(owner.into()),
        epoch: 1,
        lease: Some(ms(1_000)),
        idempotency_key: None,
    }
}

fn started() -> Vec<Encoded> {
    vec![Encoded::new(10, &Event::RunStarted { workflow: "w".into(), version: 1, input: json!({"n": 1}), trace: None })]
}

fn step(seq: i64, fence: Fence, run: &str) -> Write {
    Write::Append {
        fence,
        run: run.into(),
        first_seq: seq,
        events: vec![Encoded::new(20, &Event::StepStarted { step: "s".into(), attempt: 1 })],
        update: None,
    }
}

#[tokio::test]
async fn a_node_that_lost_its_lease_cannot_write() {
    let (store, _dir, clock) = open_with_clock("fence").await;
    store.put_definition("h", "w", 1, &Bundle::default(), 0).await.unwrap();
    let create = Write::Create { fence: None, run: new_run("r1", "a"), events: started() };
    assert!(store.commit("a", 0, &[create]).await.unwrap()[0].is_ok());
    let a = Fence { root: "r1".into(), epoch: 1 };

    // Node b cannot claim while a's lease is live, and can once it expired.
    assert_eq!(claim_at(&store, &clock, "r1", "b", 1, 500, 2_000, false).await, None);
    assert_eq!(claim_at(&store, &clock, "r1", "b", 1, 1_500, 2_000, false).await.map(|c| c.epoch), Some(2));

    // a's writes are now rejected, b's accepted, both in one batch.
    let b = Fence { root: "r1".into(), epoch: 2 };
    let results = store.commit("a", 1_600, &[step(1, a.clone(), "r1")]).await.unwrap();
    assert!(matches!(results[0], Err(Error::Fenced(_))));
    let results = store.commit("b", 1_600, &[step(1, b.clone(), "r1"), step(2, a, "r1")]).await.unwrap();
    assert!(results[0].is_ok());
    assert!(matches!(results[1], Err(Error::Fenced(_))));
    let journal = store.journal("r1").await.unwrap();
    assert_eq!(journal.iter().map(|e| e.seq).collect::<Vec<_>>(), [0, 1]);

    // Finishing releases the lease; only then is the run claimable by others.
    let finish = Write::Append {
        fence: b,
        run: "r1".into(),
        first_seq: 2,
        events: vec![Encoded::new(
            30,
            &Event::RunFinished { status: RunStatus::Succeeded, output: Some(json!(1)), error: None },
        )],
        update: Some(RunUpdate {
            status: Some(RunStatus::Succeeded),
            output: Some(json!(1)),
            release: true,
            ..Default::default()
        }),
    };
    assert!(store.commit("b", 1_700, &[finish]).await.unwrap()[0].is_ok());
    let run = store.run("r1").await.unwrap().unwrap();
    assert_eq!((run.status, run.owner, run.output), (RunStatus::Succeeded, None, Some(json!(1))));
    assert_eq!(
        claim_at(&store, &clock, "r1", "c", 2, 1_800, 3_000, false).await,
        None,
        "finished runs are not claimed"
    );
    assert!(
        {
            clock.advance_to(1_800);
            store.claimable(1_800, 10)
        }
        .await
        .unwrap()
        .is_empty()
    );
}

#[tokio::test]
async fn creating_a_run_twice_keeps_the_first() {
    let (store, _dir) = open("create").await;
    store.put_definition("h", "w", 1, &Bundle::default(), 0).await.unwrap();
    for _ in 0..2 {
        let create = Write::Create { fence: None, run: new_run("r1", "a"), events: started() };
        assert!(store.commit("a", 0, &[create]).await.unwrap()[0].is_ok());
    }
    assert_eq!(store.journal("r1").await.unwrap().len(), 1);
    assert_eq!(store.runs(None, true, 10).await.unwrap().len(), 1);
}

#[tokio::test]
async fn renewing_keeps_a_lease_and_releasing_frees_it() {
    let (store, _dir, clock) = open_with_clock("lease").await;
    store.put_definition("h", "w", 1, &Bundle::default(), 0).await.unwrap();
    let create = Write::Create { fence: None, run: new_run("r1", "a"), events: started() };
    store.commit("a", 0, &[create]).await.unwrap();
    assert_eq!(store.renew("a", &["other".into()], ms(5_000)).await.unwrap(), 0, "only the runs named are renewed");
    assert_eq!(store.renew("a", &["r1".into()], ms(5_000)).await.unwrap(), 1);
    assert_eq!(claim_at(&store, &clock, "r1", "b", 1, 2_000, 9_000, false).await, None);
    store.release_all("a").await.unwrap();
    assert_eq!(
        {
            clock.advance_to(2_000);
            store.claimable(2_000, 10)
        }
        .await
        .unwrap()
        .len(),
        1
    );
    assert_eq!(claim_at(&store, &clock, "r1", "b", 1, 2_000, 9_000, false).await.map(|c| c.epoch), Some(2));
    store.release("b", &Fence { root: "r1".into(), epoch: 1 }).await.unwrap();
    assert_eq!(store.run("r1").await.unwrap().unwrap().owner.as_deref(), Some("b"), "a stale fence releases nothing");
    store.release("b", &Fence { root: "r1".into(), epoch: 2 }).await.unwrap();
    assert_eq!(store.run("r1").await.unwrap().unwrap().owner, None);
}

#[tokio::test]
async fn a_claim_is_a_compare_and_set_on_the_epoch() {
    let (store, _dir, clock) = open_with_clock("cas").await;
    store.put_definition("h", "w", 1, &Bundle::default(), 0).await.unwrap();
    let create = Write::Create { fence: None, run: new_run("r1", "a"), events: started() };
    store.commit("a", 0, &[create]).await.unwrap();
    // Two claims by the same node that both saw epoch 1: one wins.
    let first = claim_at(&store, &clock, "r1", "a", 1, 10, 5_000, false).await;
    let second = claim_at(&store, &clock, "r1", "a", 1, 10, 5_000, false).await;
    assert_eq!(first.map(|c| c.epoch), Some(2));
    assert_eq!(second, None);
    // A cancel request travels with the next claim.
    store.request_cancel("r1", Some("cli:alice"), 20).await.unwrap();
    let claim = claim_at(&store, &clock, "r1", "a", 2, 30, 5_000, false).await.unwrap();
    assert!(claim.cancel_requested);
    assert_eq!(claim.cancel_actor.as_deref(), Some("cli:alice"));
    assert_eq!(store.cancel_requests("a").await.unwrap(), [("r1".to_owned(), Some("cli:alice".to_owned()))]);
    assert_eq!(store.next_seq("r1").await.unwrap(), 1);
    assert_eq!(store.next_seq("nothing").await.unwrap(), 0);
}

fn parked(id: &str, wake_at: i64, created: i64) -> [Write; 2] {
    let mut run = new_run(id, "a");
    run.owner = None;
    run.lease = None;
    let fence = Fence { root: id.into(), epoch: 1 };
    let mut started = started();
    started[0].at = created;
    [
        Write::Create { fence: None, run: NewRun { owner: Some("a".into()), ..run }, events: started },
        Write::Append {
            fence,
            run: id.into(),
            first_seq: 1,
            events: vec![Encoded::new(created, &Event::RunParked { wake_at: Some(wake_at) })],
            update: Some(RunUpdate {
                status: Some(RunStatus::Waiting),
                wake_at: Some(wake_at),
                release: true,
                ..Default::default()
            }),
        },
    ]
}

#[tokio::test]
async fn claimable_runs_are_the_due_and_the_orphaned_most_overdue_first() {
    let (store, _dir, clock) = open_with_clock("claimable").await;
    store.put_definition("h", "w", 1, &Bundle::default(), 0).await.unwrap();
    // 300 older runs parked far in the future must not hide the due ones.
    let mut writes = Vec::new();
    for i in 0..300 {
        writes.extend(parked(&format!("later{i:03}"), 1_000_000, i));
    }
    writes.extend(parked("due_late", 900, 400));
    writes.extend(parked("due_early", 100, 500));
    // An orphan: owned by a node whose lease expired at 50.
    let mut orphan = new_run("orphan", "dead");
    orphan.lease = Some(ms(50));
    writes.push(Write::Create { fence: None, run: orphan, events: started() });
    // Creates first: a fence is checked against the runs owned when the batch starts.
    let (creates, appends): (Vec<Write>, Vec<Write>) =
        writes.into_iter().partition(|w| matches!(w, Write::Create { .. }));
    assert!(store.commit("a", 600, &creates).await.unwrap().iter().all(|r| r.is_ok()));
    assert!(store.commit("a", 600, &appends).await.unwrap().iter().all(|r| r.is_ok()));
    let ids: Vec<String> = {
        clock.advance_to(1_000);
        store.claimable(1_000, 2)
    }
    .await
    .unwrap()
    .into_iter()
    .map(|r| r.id)
    .collect();
    assert_eq!(ids, ["orphan", "due_early"]);
    let ids: Vec<String> = {
        clock.advance_to(1_000);
        store.claimable(1_000, 10)
    }
    .await
    .unwrap()
    .into_iter()
    .map(|r| r.id)
    .collect();
    assert_eq!(ids, ["orphan", "due_early", "due_late"]);
    let next = store.next_wakes(1_000, 2).await.unwrap();
    assert_eq!(next, [("later000".to_owned(), 1_000_000), ("later001".to_owned(), 1_000_000)]);
    assert_eq!(store.next_wakes(0, 1).await.unwrap(), [("due_early".to_owned(), 100)]);
    // Claiming them in one statement takes the same runs; a second claim finds none.
    let claimed = {
        clock.advance_to(1_000);
        store.claim_due("w", 1_000, ms(9_000 - 1_000), 10)
    }
    .await
    .unwrap();
    let mut ids: Vec<&str> = claimed.iter().map(|(r, _)| r.id.as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["due_early", "due_late", "orphan"]);
    assert!(claimed.iter().all(|(r, c)| r.owner.as_deref() == Some("w") && c.epoch == r.epoch && c.epoch == 2));
    assert!(
        {
            clock.advance_to(1_000);
            store.claim_due("w2", 1_000, ms(9_000 - 1_000), 10)
        }
        .await
        .unwrap()
        .is_empty()
    );
}

/// A root `r` parked on its child `r/m/0`, which waits for signal `go`.
async fn parked_tree(store: &Arc<dyn Store>, child_waits: bool) -> Fence {
    store.put_definition("h", "w", 1, &Bundle::default(), 0).await.unwrap();
    let create = Write::Create { fence: None, run: new_run("r", "a"), events: started() };
    assert!(store.commit("a", 0, &[create]).await.unwrap()[0].is_ok());
    let fence = Fence { root: "r".into(), epoch: 1 };
    let child = NewRun {
        id: "r/m/0".into(),
        parent_id: Some("r".into()),
        owner: None,
        epoch: 0,
        lease: None,
        ..new_run("r/m/0", "a")
    };
    let child = NewRun { root_id: "r".into(), ..child };
    let create = Write::Create { fence: Some(fence.clone()), run: child, events: started() };
    assert!(store.commit("a", 10, &[create]).await.unwrap()[0].is_ok());
    let park = |run: &str, waits: Vec<WaitChange>, release: bool| Write::Append {
        fence: fence.clone(),
        run: run.into(),
        first_seq: 1,
        events: vec![Encoded::new(20, &Event::RunParked { wake_at: None })],
        update: Some(RunUpdate { status: Some(RunStatus::Waiting), release, waits, ..Default::default() }),
    };
    let waits = if child_waits {
        vec![WaitChange::Wait { name: "go".into(), step: "w".into(), deadline: None }]
    } else {
        Vec::new()
    };
    let results = store.commit("a", 20, &[park("r/m/0", waits, false), park("r", Vec::new(), true)]).await.unwrap();
    assert!(results.iter().all(|r| r.is_ok()));
    fence
}

#[tokio::test]
async fn a_signal_wakes_the_run_and_every_parked_run_above_it() {
    let (store, _dir, clock) = open_with_clock("signal").await;
    parked_tree(&store, true).await;
    // Parked for a signal: no wake-up time, nothing to claim.
    assert_eq!(store.run("r").await.unwrap().unwrap().wake_at, None);
    assert!(
        {
            clock.advance_to(100);
            store.claimable(100, 10)
        }
        .await
        .unwrap()
        .is_empty()
    );
    assert!(store.signalled_roots().await.unwrap().is_empty());

    let out = store.signal("r/m/0", "go", &json!({"ok": 1}), Some("cli:bob"), 50, true).await.unwrap();
    assert_eq!(out, Signalled::Delivered { root: "r".into(), waiting: true });
    for id in ["r", "r/m/0"] {
        assert_eq!(store.run(id).await.unwrap().unwrap().wake_at, Some(50), "{id} is due");
    }
    assert_eq!(
        {
            clock.advance_to(100);
            store.claimable(100, 10)
        }
        .await
        .unwrap()
        .iter()
        .map(|r| r.id.as_str())
        .collect::<Vec<_>>(),
        ["r"]
    );
    assert_eq!(store.signalled_roots().await.unwrap(), ["r"]);
    assert_eq!(store.signalled("r").await.unwrap(), ["r/m/0"]);
    let signals = store.signals("r/m/0").await.unwrap();
    assert_eq!(signals.len(), 1);
    assert_eq!(
        (signals[0].payload.clone(), signals[0].actor.as_deref(), signals[0].at),
        (json!({"ok": 1}), Some("cli:bob"), 50)
    );
    assert!(store.signals("r").await.unwrap().is_empty());
    // Once per name; a run that does not exist or has finished takes none.
    assert_eq!(store.signal("r/m/0", "go", &json!(2), None, 60, false).await.unwrap(), Signalled::Duplicate);
    assert!(matches!(store.signal("nope", "go", &json!(2), None, 60, false).await, Err(Error::NotFound(_))));
    let children = store.child_states("r").await.unwrap();
    assert_eq!(children, [ChildState { id: "r/m/0".into(), status: RunStatus::Waiting, wake_at: Some(50) }]);
}

#[tokio::test]
async fn a_signal_sent_before_the_wait_is_kept_and_a_run_parking_on_it_is_due() {
    let (store, _dir, clock) = open_with_clock("signal-early").await;
    store.put_definition("h", "w", 1, &Bundle::default(), 0).await.unwrap();
    let create = Write::Create { fence: None, run: new_run("r", "a"), events: started() };
    store.commit("a", 0, &[create]).await.unwrap();
    // Nobody waits yet: refused when a waiter is required, kept otherwise.
    assert_eq!(store.signal("r", "go", &json!(1), None, 5, true).await.unwrap(), Signalled::NotWaiting);
    assert_eq!(
        store.signal("r", "go", &json!(1), None, 5, false).await.unwrap(),
        Signalled::Delivered { root: "r".into(), waiting: false }
    );
    // The run (still running when the signal came) parks: it is due at once.
    let fence = Fence { root: "r".into(), epoch: 1 };
    let park = Write::Append {
        fence: fence.clone(),
        run: "r".into(),
        first_seq: 1,
        events: vec![Encoded::new(20, &Event::RunParked { wake_at: None })],
        update: Some(RunUpdate {
            status: Some(RunStatus::Waiting),
            release: true,
            waits: vec![WaitChange::Wait { name: "go".into(), step: "w".into(), deadline: None }],
            ..Default::default()
        }),
    };
    assert!(store.commit("a", 20, &[park]).await.unwrap()[0].is_ok());
    assert_eq!(store.run("r").await.unwrap().unwrap().wake_at, Some(20));
    // Received (journaled with `Done`): no longer pending.
    let claim = claim_at(&store, &clock, "r", "a", 1, 30, 1_000, false).await.unwrap();
    let receive = Write::Append {
        fence: Fence { epoch: claim.epoch, ..fence },
        run: "r".into(),
        first_seq: 2,
        events: vec![Encoded::new(
            30,
            &Event::SignalReceived { name: "go".into(), payload: json!(1), actor: None, sent_at: 5 },
        )],
        update: Some(RunUpdate {
            status: Some(RunStatus::Running),
            waits: vec![WaitChange::Done { name: "go".into() }],
            ..Default::default()
        }),
    };
    assert!(store.commit("a", 30, &[receive]).await.unwrap()[0].is_ok());
    assert!(store.signals("r").await.unwrap().is_empty());
    assert!(store.signalled_roots().await.unwrap().is_empty());
    // A wait that ended takes no signal of that name any more.
    assert_eq!(store.signal("r", "go", &json!(3), None, 40, false).await.unwrap(), Signalled::Duplicate);
    assert_eq!(
        store.signal("r", "other", &json!(3), None, 40, false).await.unwrap(),
        Signalled::Delivered { root: "r".into(), waiting: false }
    );
}

#[tokio::test]
async fn a_finished_run_takes_no_signal_and_its_waits_end() {
    let (store, _dir, clock) = open_with_clock("signal-finished").await;
    let fence = parked_tree(&store, true).await;
    let claim = claim_at(&store, &clock, "r", "a", 1, 30, 1_000, false).await.unwrap();
    let fence = Fence { epoch: claim.epoch, ..fence };
    let finish = |run: &str| Write::Append {
        fence: fence.clone(),
        run: run.into(),
        first_seq: 2,
        events: vec![Encoded::new(40, &Event::RunFinished { status: RunStatus::Cancelled, output: None, error: None })],
        update: Some(RunUpdate { status: Some(RunStatus::Cancelled), release: run == "r", ..Default::default() }),
    };
    assert!(store.commit("a", 40, &[finish("r/m/0"), finish("r")]).await.unwrap().iter().all(|r| r.is_ok()));
    assert_eq!(
        store.signal("r/m/0", "go", &json!(1), None, 50, false).await.unwrap(),
        Signalled::Finished(RunStatus::Cancelled)
    );
    assert!(store.signalled_roots().await.unwrap().is_empty());
}
