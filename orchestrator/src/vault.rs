//! The credential vault's store: a SQLite database of its own
//! (`switchyard-vault.db` beside the run database unless
//! `SWITCHYARD_VAULT_URL` says otherwise), apart from run data, which holds
//! only connection names.
//!
//! It keeps connections' metadata (name, kind, allowed hosts, times), each
//! connection's data key wrapped by the master key, each secret field sealed
//! under its data key, the master key's key check, and the vault's events
//! (created, updated, deleted, rotated) without values. No column holds a
//! plaintext secret. Deleting a connection deletes its sealed fields and its
//! data key (crypto-shredding; `secure_delete` overwrites the freed pages).
//! The cryptography is in `switchyard_integrations::vault`.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqliteConnection};
use switchyard_integrations::vault::{MasterKey, Secret, VaultError};

/// The vault file beside a run database at `db` (a path or `sqlite:` URL).
pub fn default_url(db: &str) -> String {
    let path = db.strip_prefix("sqlite://").or_else(|| db.strip_prefix("sqlite:")).unwrap_or(db);
    let path = path.split('?').next().unwrap_or_default();
    let dir = std::path::Path::new(path).parent().filter(|p| !p.as_os_str().is_empty());
    match dir {
        Some(dir) => dir.join("switchyard-vault.db").display().to_string(),
        None => "switchyard-vault.db".to_owned(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Key(#[from] VaultError),
    #[error("vault database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("no connection {0:?}")]
    NotFound(String),
    #[error("a connection {0:?} exists already")]
    Exists(String),
    #[error("{0}")]
    Invalid(String),
    #[error(
        "this needs the master key: set SWITCHYARD_MASTER_KEY or SWITCHYARD_MASTER_KEY_FILE, or pass --master-key-file"
    )]
    NoKey,
    #[error("the vault has no master key yet: run `switchyard vault init --key-file PATH` first")]
    NotInitialized,
    #[error("the vault is initialized already (master key id {0})")]
    Initialized(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The kinds of connection and their fields: (required, optional). A
/// `custom` connection has fields of any name.
pub const KINDS: &[(&str, &[&str], &[&str])] = &[
    ("api_key", &["key"], &["header", "query"]),
    ("bearer", &["token"], &[]),
    ("basic", &["username", "password"], &[]),
    ("oauth2", &["token_url", "client_id", "client_secret"], &["scopes", "refresh_token", "audience"]),
    ("openai", &["api_key"], &["base_url", "organization", "model"]),
    ("custom", &[], &[]),
];

/// A connection as listed: never its values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConnectionInfo {
    pub name: String,
    pub kind: String,
    pub allowed_hosts: Vec<String>,
    /// The names of its fields (their values stay sealed).
    pub fields: Vec<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub last_used_at: Option<i64>,
}

/// A connection opened for use.
#[derive(Debug)]
pub struct Connection {
    pub name: String,
    pub kind: String,
    pub allowed_hosts: Vec<String>,
    pub fields: BTreeMap<String, Secret>,
}

/// What [`Vault::add`] and [`Vault::update`] take.
#[derive(Debug, Default)]
pub struct Changes {
    pub fields: BTreeMap<String, Secret>,
    /// `None`: unchanged (on update).
    pub allowed_hosts: Option<Vec<String>>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS vault_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS connections (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    allowed_hosts TEXT NOT NULL,
    data_key TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    last_used_at INTEGER
);
CREATE TABLE IF NOT EXISTS connection_fields (
    connection_id TEXT NOT NULL REFERENCES connections(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    sealed TEXT NOT NULL,
    PRIMARY KEY (connection_id, name)
);
CREATE TABLE IF NOT EXISTS vault_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    action TEXT NOT NULL,
    connection TEXT,
    detail TEXT
);
";

pub struct Vault {
    pool: SqlitePool,
    key: Option<MasterKey>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// A name (connection or field): letters, digits, `_` and `-`, 1 to 64.
fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok { Ok(()) } else { Err(Error::Invalid(format!("{what} {name:?}: use 1 to 64 letters, digits, _ or -"))) }
}

/// A host for `allowed_hosts`: a DNS name or IP, optionally `*.` for
/// subdomains, optionally with `:port`; no scheme, path or userinfo.
fn check_host(host: &str) -> Result<String> {
    let h = host.trim().to_ascii_lowercase();
    let name = h.strip_prefix("*.").unwrap_or(&h);
    let (name, port) = match name.rsplit_once(':') {
        Some((n, p)) if !n.contains(':') => (n, Some(p)),
        _ => (name, None),
    };
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        && port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0));
    if ok {
        Ok(h)
    } else {
        Err(Error::Invalid(format!("allowed host {host:?}: give a host name, like api.github.com")))
    }
}

fn check_fields(kind: &str, fields: &BTreeMap<String, Secret>, adding: bool) -> Result<()> {
    let Some((_, required, optional)) = KINDS.iter().find(|k| k.0 == kind) else {
        let kinds: Vec<&str> = KINDS.iter().map(|k| k.0).collect();
        return Err(Error::Invalid(format!("unknown kind {kind:?}; use one of {}", kinds.join(", "))));
    };
    for name in fields.keys() {
        check_name("field", name)?;
        if kind != "custom" && !required.contains(&name.as_str()) && !optional.contains(&name.as_str()) {
            let all: Vec<&str> = required.iter().chain(optional.iter()).copied().collect();
            return Err(Error::Invalid(format!(
                "a {kind} connection has no field {name:?} (fields: {})",
                all.join(", ")
            )));
        }
    }
    if adding {
        if let Some(missing) = required.iter().find(|r| !fields.contains_key(**r)) {
            return Err(Error::Invalid(format!("a {kind} connection needs the field {missing:?}")));
        }
        if kind == "custom" && fields.is_empty() {
            return Err(Error::Invalid("a custom connection needs at least one field".into()));
        }
        if kind == "api_key" && fields.contains_key("header") == fields.contains_key("query") {
            return Err(Error::Invalid(
                "an api_key connection needs either `header` or `query` (the name it is sent as)".into(),
            ));
        }
    }
    Ok(())
}

impl Vault {
    /// Opens (creating if missing) the vault at `url`. With a key, the key
    /// must pass the vault's key check; a vault without one yet is only
    /// initialized by [`Vault::init`].
    pub async fn open(url: &str, key: Option<MasterKey>) -> Result<Self> {
        let url = if url.starts_with("sqlite:") { url.to_owned() } else { format!("sqlite://{url}") };
        let connect = SqliteConnectOptions::from_str(&url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true)
            .pragma("secure_delete", "ON");
        let pool = SqlitePoolOptions::new().max_connections(2).connect_with(connect).await?;
        sqlx::raw_sql(SCHEMA).execute(&pool).await?;
        restrict_file(&url);
        let vault = Self { pool, key };
        if let (Some(key), Some(check)) = (&vault.key, vault.meta("key_check").await?) {
            key.verify(&check)?;
        }
        Ok(vault)
    }

    async fn meta(&self, name: &str) -> Result<Option<String>> {
        Ok(sqlx::query_scalar("SELECT value FROM vault_meta WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// The master key's id the vault is sealed with, if initialized.
    pub async fn key_id(&self) -> Result<Option<String>> {
        Ok(self
            .meta("key_check")
            .await?
            .and_then(|c| switchyard_integrations::vault::sealed_key_id(&c).map(str::to_owned)))
    }

    /// Records the master key's key check: from now on only it opens the
    /// vault.
    pub async fn init(&self) -> Result<String> {
        let key = self.key.as_ref().ok_or(Error::NoKey)?;
        if let Some(id) = self.key_id().await? {
            return Err(Error::Initialized(id));
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO vault_meta (name, value) VALUES ('key_check', ?), ('format', ?)")
            .bind(key.key_check()?)
            .bind(switchyard_integrations::vault::FORMAT)
            .execute(&mut *tx)
            .await?;
        event(&mut tx, "initialized", None, &format!("master key id {}", key.id())).await?;
        tx.commit().await?;
        Ok(key.id().to_owned())
    }

    /// The key, once the vault is initialized with it.
    async fn ready_key(&self) -> Result<&MasterKey> {
        let key = self.key.as_ref().ok_or(Error::NoKey)?;
        if self.meta("key_check").await?.is_none() {
            return Err(Error::NotInitialized);
        }
        Ok(key)
    }

    pub async fn add(&self, name: &str, kind: &str, changes: Changes) -> Result<()> {
        check_name("connection", name)?;
        check_fields(kind, &changes.fields, true)?;
        let hosts = hosts(changes.allowed_hosts.unwrap_or_default())?;
        if hosts.is_empty() && kind != "openai" {
            return Err(Error::Invalid(format!(
                "connection {name:?} needs at least one --allow-host (the hosts its credential may be sent to)"
            )));
        }
        let key = self.ready_key().await?;
        let id = uuid::Uuid::now_v7().to_string();
        let (data_key, wrapped) = key.new_data_key(&id)?;
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO connections (id, name, kind, allowed_hosts, data_key, created_at, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
        )
        .bind(&id)
        .bind(name)
        .bind(kind)
        .bind(serde_json::to_string(&hosts).unwrap_or_default())
        .bind(&wrapped)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(Error::Exists(name.to_owned()));
        }
        for (field, value) in &changes.fields {
            put_field(&mut tx, &id, field, &data_key.seal(&id, field, value)?).await?;
        }
        event(&mut tx, "created", Some(name), &format!("kind {kind}")).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Replaces the fields given (others stay) and, if given, the hosts.
    pub async fn update(&self, name: &str, changes: Changes) -> Result<()> {
        let key = self.ready_key().await?;
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query("SELECT id, kind, data_key FROM connections WHERE name = ?")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| Error::NotFound(name.to_owned()))?;
        let (id, kind, wrapped): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        check_fields(&kind, &changes.fields, false)?;
        let data_key = key.unwrap(&id, &wrapped)?;
        for (field, value) in &changes.fields {
            put_field(&mut tx, &id, field, &data_key.seal(&id, field, value)?).await?;
        }
        if let Some(h) = changes.allowed_hosts {
            let h = hosts(h)?;
            sqlx::query("UPDATE connections SET allowed_hosts = ? WHERE id = ?")
                .bind(serde_json::to_string(&h).unwrap_or_default())
                .bind(&id)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("UPDATE connections SET updated_at = ? WHERE id = ?")
            .bind(now_ms())
            .bind(&id)
            .execute(&mut *tx)
            .await?;
        let names: Vec<&str> = changes.fields.keys().map(String::as_str).collect();
        event(&mut tx, "updated", Some(name), &format!("fields {}", names.join(","))).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Deletes the connection, its sealed fields and its data key.
    pub async fn delete(&self, name: &str) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let deleted = sqlx::query("DELETE FROM connections WHERE name = ?").bind(name).execute(&mut *tx).await?;
        if deleted.rows_affected() == 0 {
            return Err(Error::NotFound(name.to_owned()));
        }
        event(&mut tx, "deleted", Some(name), "sealed fields and data key destroyed").await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn list(&self) -> Result<Vec<ConnectionInfo>> {
        let rows = sqlx::query(
            "SELECT c.name, c.kind, c.allowed_hosts, c.created_at, c.updated_at, c.last_used_at,
                    COALESCE((SELECT group_concat(f.name, ',') FROM connection_fields f WHERE f.connection_id = c.id), '')
             FROM connections c ORDER BY c.name",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let fields: String = r.get(6);
                let mut fields: Vec<String> = fields.split(',').filter(|f| !f.is_empty()).map(str::to_owned).collect();
                fields.sort();
                ConnectionInfo {
                    name: r.get(0),
                    kind: r.get(1),
                    allowed_hosts: serde_json::from_str(r.get::<&str, _>(2)).unwrap_or_default(),
                    fields,
                    created_at: r.get(3),
                    updated_at: r.get(4),
                    last_used_at: r.get(5),
                }
            })
            .collect())
    }

    /// Opens a connection's fields for use.
    pub async fn connection(&self, name: &str) -> Result<Connection> {
        let key = self.ready_key().await?;
        let row = sqlx::query("SELECT id, kind, allowed_hosts, data_key FROM connections WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| Error::NotFound(name.to_owned()))?;
        let (id, kind, hosts, wrapped): (String, String, String, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let data_key = key.unwrap(&id, &wrapped)?;
        let rows = sqlx::query("SELECT name, sealed FROM connection_fields WHERE connection_id = ?")
            .bind(&id)
            .fetch_all(&self.pool)
            .await?;
        let mut fields = BTreeMap::new();
        for r in rows {
            let (field, sealed): (String, String) = (r.get(0), r.get(1));
            let value = data_key.open(&id, &field, &sealed)?;
            fields.insert(field, value);
        }
        Ok(Connection {
            name: name.to_owned(),
            kind,
            allowed_hosts: serde_json::from_str(&hosts).unwrap_or_default(),
            fields,
        })
    }

    /// Re-wraps every data key under `new` in one transaction (readers see
    /// the old keys or the new ones, never a mix), then makes `new` the
    /// vault's key; returns how many were re-wrapped. Afterwards the old
    /// key opens nothing.
    pub async fn rotate(&self, new: &MasterKey) -> Result<usize> {
        let key = self.ready_key().await?;
        if new.id() == key.id() {
            return Err(Error::Invalid("the new master key is the current one".into()));
        }
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query("SELECT id, data_key FROM connections").fetch_all(&mut *tx).await?;
        for r in &rows {
            let (id, wrapped): (String, String) = (r.get(0), r.get(1));
            let rewrapped = key.rewrap(new, &id, &wrapped)?;
            sqlx::query("UPDATE connections SET data_key = ? WHERE id = ?")
                .bind(rewrapped)
                .bind(&id)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("UPDATE vault_meta SET value = ? WHERE name = 'key_check'")
            .bind(new.key_check()?)
            .execute(&mut *tx)
            .await?;
        event(
            &mut tx,
            "rotated",
            None,
            &format!("master key id {} -> {}; {} data keys", key.id(), new.id(), rows.len()),
        )
        .await?;
        tx.commit().await?;
        Ok(rows.len())
    }

    /// The vault's events, oldest first: `(at, action, connection, detail)`.
    pub async fn events(&self) -> Result<Vec<(i64, String, Option<String>, Option<String>)>> {
        let rows = sqlx::query("SELECT at, action, connection, detail FROM vault_events ORDER BY seq")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect())
    }

    pub async fn close(self) {
        self.pool.close().await;
    }
}

fn hosts(list: Vec<String>) -> Result<Vec<String>> {
    let mut out: Vec<String> = list.iter().map(|h| check_host(h)).collect::<Result<_>>()?;
    out.sort();
    out.dedup();
    Ok(out)
}

async fn put_field(tx: &mut SqliteConnection, id: &str, field: &str, sealed: &str) -> Result<()> {
    sqlx::query(
        "INSERT INTO connection_fields (connection_id, name, sealed) VALUES (?, ?, ?)
         ON CONFLICT (connection_id, name) DO UPDATE SET sealed = excluded.sealed",
    )
    .bind(id)
    .bind(field)
    .bind(sealed)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

async fn event(tx: &mut SqliteConnection, action: &str, connection: Option<&str>, detail: &str) -> Result<()> {
    sqlx::query("INSERT INTO vault_events (at, action, connection, detail) VALUES (?, ?, ?, ?)")
        .bind(now_ms())
        .bind(action)
        .bind(connection)
        .bind(detail)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// The vault file (and its WAL) readable by its owner only.
fn restrict_file(url: &str) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let path = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")).unwrap_or(url);
        let path = path.split('?').next().unwrap_or_default();
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::set_permissions(format!("{path}{suffix}"), std::fs::Permissions::from_mode(0o600));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(list: &[(&str, &str)]) -> BTreeMap<String, Secret> {
        list.iter().map(|(k, v)| ((*k).to_owned(), Secret::new(*v))).collect()
    }

    fn changes(list: &[(&str, &str)], hosts: &[&str]) -> Changes {
        Changes { fields: fields(list), allowed_hosts: Some(hosts.iter().map(|h| (*h).to_owned()).collect()) }
    }

    /// A fresh directory and the vault URL in it.
    fn temp(name: &str) -> (std::path::PathBuf, String) {
        let dir = std::env::temp_dir().join(format!("sy-vault-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let url = dir.join("v.db").display().to_string();
        (dir, url)
    }

    async fn raw_text(path: &std::path::Path) -> String {
        let mut all = Vec::new();
        for suffix in ["", "-wal"] {
            if let Ok(bytes) = std::fs::read(format!("{}{suffix}", path.display())) {
                all.extend(bytes);
            }
        }
        String::from_utf8_lossy(&all).into_owned()
    }

    #[tokio::test]
    async fn connections_are_sealed_listed_without_values_opened_and_shredded() {
        let (dir, url) = temp("crud");
        let (key, text) = MasterKey::generate().unwrap();
        let vault = Vault::open(&url, Some(MasterKey::from_base64(&text).unwrap())).await.unwrap();
        assert!(matches!(
            vault.add("gh", "bearer", changes(&[("token", "x")], &["a.b"])).await,
            Err(Error::NotInitialized)
        ));
        assert_eq!(vault.init().await.unwrap(), key.id());
        assert!(matches!(vault.init().await, Err(Error::Initialized(_))));
        vault
            .add("gh", "bearer", changes(&[("token", "ghp-CANARY-1")], &["API.github.com", "api.github.com"]))
            .await
            .unwrap();
        assert!(matches!(vault.add("gh", "bearer", changes(&[("token", "y")], &["a.b"])).await, Err(Error::Exists(_))));
        let list = vault.list().await.unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].allowed_hosts, vec!["api.github.com"]);
        assert_eq!(list[0].fields, vec!["token"]);
        assert!(!serde_json::to_string(&list).unwrap().contains("CANARY"));
        let c = vault.connection("gh").await.unwrap();
        assert_eq!(c.fields["token"].expose(), "ghp-CANARY-1");
        assert!(!format!("{c:?}").contains("CANARY"));
        vault
            .update("gh", changes(&[("token", "ghp-CANARY-2")], &["api.github.com", "uploads.github.com"]))
            .await
            .unwrap();
        assert_eq!(vault.connection("gh").await.unwrap().fields["token"].expose(), "ghp-CANARY-2");
        assert!(!raw_text(&dir.join("v.db")).await.contains("CANARY"), "no plaintext on disk");
        vault.delete("gh").await.unwrap();
        assert!(matches!(vault.connection("gh").await, Err(Error::NotFound(_))));
        assert!(matches!(vault.delete("gh").await, Err(Error::NotFound(_))));
        let actions: Vec<String> = vault.events().await.unwrap().into_iter().map(|e| e.1).collect();
        assert_eq!(actions, ["initialized", "created", "updated", "deleted"]);
        vault.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn bad_input_is_refused_with_the_reason() {
        let (dir, url) = temp("bad");
        let vault = Vault::open(&url, Some(MasterKey::generate().unwrap().0)).await.unwrap();
        vault.init().await.unwrap();
        let err = |r: Result<()>| r.unwrap_err().to_string();
        assert!(err(vault.add("x", "nope", changes(&[("a", "b")], &["h"])).await).contains("unknown kind"));
        assert!(err(vault.add("x", "basic", changes(&[("username", "u")], &["h"])).await).contains("password"));
        assert!(
            err(vault.add("x", "bearer", changes(&[("token", "t"), ("extra", "e")], &["h"])).await)
                .contains("no field")
        );
        assert!(err(vault.add("x", "bearer", changes(&[("token", "t")], &[])).await).contains("--allow-host"));
        assert!(
            err(vault.add("x", "bearer", changes(&[("token", "t")], &["https://evil/x"])).await).contains("host name")
        );
        assert!(err(vault.add("x y", "bearer", changes(&[("token", "t")], &["h"])).await).contains("connection"));
        assert!(err(vault.add("x", "api_key", changes(&[("key", "k")], &["h"])).await).contains("header"));
        assert!(
            vault
                .add("x", "api_key", changes(&[("key", "k"), ("header", "X-Key")], &["*.example.com:8443"]))
                .await
                .is_ok()
        );
        assert!(vault.list().await.unwrap().len() == 1, "nothing half-written");
        vault.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn the_wrong_master_key_fails_at_open_and_rotation_moves_every_data_key() {
        let (dir, url) = temp("keys");
        let (old, old_text) = MasterKey::generate().unwrap();
        let vault = Vault::open(&url, Some(old)).await.unwrap();
        vault.init().await.unwrap();
        for name in ["a", "b", "c"] {
            vault.add(name, "bearer", changes(&[("token", name)], &["h"])).await.unwrap();
        }
        let (new, new_text) = MasterKey::generate().unwrap();
        let new_id = new.id().to_owned();
        assert_eq!(vault.rotate(&new).await.unwrap(), 3);
        vault.close().await;
        // The old key no longer opens the vault; the new one opens it all.
        match Vault::open(&url, Some(MasterKey::from_base64(&old_text).unwrap())).await {
            Err(Error::Key(VaultError::WrongMasterKey { expected, .. })) => assert_eq!(expected, new_id),
            other => panic!("expected the wrong key to be refused, got {:?}", other.map(|_| ())),
        }
        let vault = Vault::open(&url, Some(MasterKey::from_base64(&new_text).unwrap())).await.unwrap();
        assert_eq!(vault.connection("b").await.unwrap().fields["token"].expose(), "b");
        // Without a key, metadata only.
        vault.close().await;
        let keyless = Vault::open(&url, None).await.unwrap();
        assert_eq!(keyless.list().await.unwrap().len(), 3);
        assert!(matches!(keyless.connection("a").await, Err(Error::NoKey)));
        keyless.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_vault_sits_beside_the_run_database() {
        assert_eq!(default_url("switchyard.db"), "switchyard-vault.db");
        assert_eq!(default_url("/var/lib/sy/runs.db"), "/var/lib/sy/switchyard-vault.db");
        assert_eq!(default_url("sqlite:///var/lib/sy/runs.db?mode=rwc"), "/var/lib/sy/switchyard-vault.db");
    }
}
