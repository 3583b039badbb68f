//! The store contract, on SQLite: group commit, idempotent creates, leases
//! and fencing.

use serde_json::json;

use super::*;

struct TempDb(std::path::PathBuf);

impl Drop for TempDb {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn open(name: &str) -> (SqliteStore, TempDb) {
    let dir = std::env::temp_dir().join(format!("switchyard-store-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let url = dir.join("db.sqlite").display().to_string();
    let store = SqliteStore::open(&SqliteOptions { url, synchronous_full: false }).await.unwrap();
    (store, TempDb(dir))
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
        lease_until: Some(1_000),
        idempotency_key: None,
    }
}

fn started() -> Vec<(i64, Event)> {
    vec![(10, Event::RunStarted { workflow: "w".into(), version: 1, input: json!({"n": 1}) })]
}

fn step(seq: i64, fence: Fence, run: &str) -> Write {
    Write::Append {
        fence,
        run: run.into(),
        first_seq: seq,
        events: vec![(20, Event::StepStarted { step: "s".into(), attempt: 1 })],
        update: None,
    }
}

#[tokio::test]
async fn a_node_that_lost_its_lease_cannot_write() {
    let (store, _dir) = open("fence").await;
    store.put_definition("h", "w", 1, &Bundle::default(), 0).await.unwrap();
    let create = Write::Create { fence: None, run: new_run("r1", "a"), events: started() };
    assert!(store.commit("a", 0, &[create]).await.unwrap()[0].is_ok());
    let a = Fence { root: "r1".into(), epoch: 1 };

    // Node b cannot claim while a's lease is live, and can once it expired.
    assert_eq!(store.claim("r1", "b", 500, 2_000, false).await.unwrap(), None);
    assert_eq!(store.claim("r1", "b", 1_500, 2_000, false).await.unwrap(), Some(2));

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
        events: vec![(30, Event::RunFinished { status: RunStatus::Succeeded, output: Some(json!(1)), error: None })],
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
    assert_eq!(store.claim("r1", "c", 1_800, 3_000, false).await.unwrap(), None, "finished runs are not claimed");
    assert!(store.claimable(1_800, 10).await.unwrap().is_empty());
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
    let (store, _dir) = open("lease").await;
    store.put_definition("h", "w", 1, &Bundle::default(), 0).await.unwrap();
    let create = Write::Create { fence: None, run: new_run("r1", "a"), events: started() };
    store.commit("a", 0, &[create]).await.unwrap();
    assert_eq!(store.renew("a", 5_000).await.unwrap(), 1);
    assert_eq!(store.claim("r1", "b", 2_000, 9_000, false).await.unwrap(), None);
    store.release_all("a").await.unwrap();
    assert_eq!(store.claimable(2_000, 10).await.unwrap().len(), 1);
    assert_eq!(store.claim("r1", "b", 2_000, 9_000, false).await.unwrap(), Some(2));
}
