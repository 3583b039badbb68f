//! `switchyard vault …` and `switchyard connections …`: the credential
//! vault's key and its connections, from the command line.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Subcommand};
use switchyard_integrations::vault::{MASTER_KEY_ENV, MASTER_KEY_FILE_ENV, MasterKey, Secret};

use super::{EXIT_INVALID, write_stderr, write_stdout};
use crate::report::{self, printable};
use crate::vault::{Changes, Error, Vault, default_url};

/// Where the vault is and the key that opens it.
#[derive(Args, Debug, Clone)]
pub(super) struct VaultArgs {
    /// The vault database (default: `switchyard-vault.db` beside the run
    /// database).
    #[arg(long, env = "SWITCHYARD_VAULT_URL")]
    vault: Option<String>,
    /// A file holding the master key (base64 of 32 bytes; readable by its
    /// owner only). Else `SWITCHYARD_MASTER_KEY` holds the key itself.
    #[arg(long, env = MASTER_KEY_FILE_ENV)]
    master_key_file: Option<PathBuf>,
}

/// A connection's fields and hosts, as given.
#[derive(Args, Debug, Clone)]
pub(super) struct Values {
    #[arg(long = "field", value_name = "KEY=VALUE")]
    fields: Vec<String>,
    /// A host the credential may be sent to (repeat for more;
    /// `*.example.com` for subdomains).
    #[arg(long = "allow-host", value_name = "HOST")]
    allow_hosts: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub(super) enum VaultCommand {
    /// Write a new master key file (mode 0600) and seal the vault with it.
    Init {
        #[arg(long, value_name = "PATH")]
        key_file: PathBuf,
        #[command(flatten)]
        vault: VaultArgs,
    },
    /// Re-wrap every connection's data key under a new master key (from
    /// PATH, or a new key written there); afterwards the old key opens
    /// nothing.
    Rotate {
        #[arg(long, value_name = "PATH")]
        new_key_file: PathBuf,
        #[command(flatten)]
        vault: VaultArgs,
    },
}

#[derive(Subcommand, Debug)]
pub(super) enum ConnectionsCommand {
    /// Add a connection: `--field key=value`, `key=@file` or `key=-`
    /// (standard input, so a secret need not sit in shell history).
    Add {
        name: String,
        /// api_key, bearer, basic, oauth2, openai or custom.
        #[arg(long)]
        kind: String,
        #[command(flatten)]
        values: Values,
        #[command(flatten)]
        vault: VaultArgs,
    },
    /// Replace some fields (the others stay) and, if given, the hosts.
    Update {
        name: String,
        #[command(flatten)]
        values: Values,
        #[command(flatten)]
        vault: VaultArgs,
    },
    /// Names, kinds, hosts, field names and times; never values.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        vault: VaultArgs,
    },
    /// Delete a connection: its sealed values and its data key are destroyed.
    Delete {
        name: String,
        #[command(flatten)]
        vault: VaultArgs,
    },
}

/// The master key from `--master-key-file` / `SWITCHYARD_MASTER_KEY_FILE`
/// or `SWITCHYARD_MASTER_KEY`; `None` when neither is set.
fn master_key(args: &VaultArgs) -> Result<Option<MasterKey>, Error> {
    let inline = std::env::var(MASTER_KEY_ENV).ok().filter(|v| !v.trim().is_empty());
    match (&args.master_key_file, inline) {
        (Some(_), Some(_)) => Err(Error::Invalid(format!(
            "both {MASTER_KEY_FILE_ENV} (or --master-key-file) and {MASTER_KEY_ENV} are set; set one"
        ))),
        (Some(file), None) => Ok(Some(MasterKey::from_file(file)?)),
        (None, Some(text)) => {
            Ok(Some(MasterKey::from_base64(&text).map_err(|e| Error::Invalid(format!("{MASTER_KEY_ENV}: {e}")))?))
        }
        (None, None) => Ok(None),
    }
}

fn vault_url(db: &str, args: &VaultArgs) -> String {
    args.vault.clone().unwrap_or_else(|| default_url(db))
}

/// Writes a new key to `path` (which must not exist), readable by its
/// owner only.
fn write_key_file(path: &Path) -> Result<MasterKey, Error> {
    use std::io::Write as _;
    let (key, text) = MasterKey::generate()?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let shown = path.display();
    let mut file = options.open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => Error::Invalid(format!("{shown} exists already; give a new path")),
        _ => Error::Invalid(format!("{shown}: {e}")),
    })?;
    file.write_all(format!("{}\n", &*text).as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::Invalid(format!("{shown}: {e}")))?;
    Ok(key)
}

/// `key=value`, `key=@file` or `key=-` (at most one field from stdin).
fn parse_fields(list: &[String]) -> Result<BTreeMap<String, Secret>, Error> {
    let mut out = BTreeMap::new();
    let mut stdin_used = false;
    for item in list {
        let Some((key, value)) = item.split_once('=') else {
            return Err(Error::Invalid(format!("--field {:?}: use key=value, key=@file or key=-", printable(item))));
        };
        let key = key.trim();
        let value = if value == "-" {
            if std::mem::replace(&mut stdin_used, true) {
                return Err(Error::Invalid("only one --field can be read from standard input".into()));
            }
            let mut text = String::new();
            std::io::stdin()
                .take(64 * 1024)
                .read_to_string(&mut text)
                .map_err(|e| Error::Invalid(format!("--field {key}: standard input: {e}")))?;
            Secret::new(text.trim_end_matches(['\n', '\r']))
        } else if let Some(file) = value.strip_prefix('@') {
            let text =
                std::fs::read_to_string(file).map_err(|e| Error::Invalid(format!("--field {key}: {file}: {e}")))?;
            Secret::new(text.trim_end_matches(['\n', '\r']))
        } else {
            Secret::new(value)
        };
        if value.expose().is_empty() {
            return Err(Error::Invalid(format!("--field {key}: empty value")));
        }
        if out.insert(key.to_owned(), value).is_some() {
            return Err(Error::Invalid(format!("--field {key} given twice")));
        }
    }
    Ok(out)
}

/// Runs a vault command; a vault error is printed and exits 2 (1 for the
/// database's own failures).
async fn run(work: impl std::future::Future<Output = Result<ExitCode, Error>>) -> Result<ExitCode> {
    match work.await {
        Ok(code) => Ok(code),
        Err(Error::Db(e)) => Err(anyhow::anyhow!("vault database: {e}")),
        Err(e) => {
            write_stderr(format_args!("error: {}\n", printable(&e.to_string())));
            Ok(ExitCode::from(EXIT_INVALID))
        }
    }
}

pub(super) async fn vault(db: &str, command: &VaultCommand) -> Result<ExitCode> {
    run(async {
        match command {
            VaultCommand::Init { key_file, vault: args } => {
                let url = vault_url(db, args);
                // Checked before a key file is written.
                let existing = Vault::open(&url, None).await?;
                if let Some(id) = existing.key_id().await? {
                    return Err(Error::Initialized(id));
                }
                existing.close().await;
                let key = write_key_file(key_file)?;
                let id = key.id().to_owned();
                let vault = Vault::open(&url, Some(key)).await?;
                if let Err(e) = vault.init().await {
                    let _ = std::fs::remove_file(key_file);
                    return Err(e);
                }
                vault.close().await;
                let shown = key_file.display();
                let _ = write_stdout(format_args!(
                    "vault {url} sealed with master key {id}\nkey written to {shown} (mode 0600); keep a copy somewhere safe, without it the connections cannot be opened\nuse it with: export {MASTER_KEY_FILE_ENV}={shown}\n"
                ));
                Ok(ExitCode::SUCCESS)
            }
            VaultCommand::Rotate { new_key_file, vault: args } => {
                let key = master_key(args)?.ok_or(Error::NoKey)?;
                let vault = Vault::open(&vault_url(db, args), Some(key)).await?;
                let new = if new_key_file.exists() { MasterKey::from_file(new_key_file)? } else { write_key_file(new_key_file)? };
                let n = vault.rotate(&new).await?;
                vault.close().await;
                let _ = write_stdout(format_args!(
                    "re-wrapped {n} data keys under master key {}; the old key opens nothing now\nuse: export {MASTER_KEY_FILE_ENV}={}\n",
                    new.id(),
                    new_key_file.display()
                ));
                Ok(ExitCode::SUCCESS)
            }
        }
    })
    .await
}

pub(super) async fn connections(db: &str, command: &ConnectionsCommand) -> Result<ExitCode> {
    run(async {
        match command {
            ConnectionsCommand::Add { name, kind, values: Values { fields, allow_hosts }, vault: args } => {
                let fields = parse_fields(fields)?;
                let vault = Vault::open(&vault_url(db, args), Some(master_key(args)?.ok_or(Error::NoKey)?)).await?;
                let changes = Changes { fields, allowed_hosts: Some(allow_hosts.clone()) };
                let result = vault.add(name, kind, changes).await;
                vault.close().await;
                result?;
                let _ = write_stdout(format_args!("connection {} added\n", printable(name)));
                Ok(ExitCode::SUCCESS)
            }
            ConnectionsCommand::Update { name, values: Values { fields, allow_hosts }, vault: args } => {
                let fields = parse_fields(fields)?;
                if fields.is_empty() && allow_hosts.is_empty() {
                    return Err(Error::Invalid("nothing to update: give --field or --allow-host".into()));
                }
                let vault = Vault::open(&vault_url(db, args), Some(master_key(args)?.ok_or(Error::NoKey)?)).await?;
                let hosts = (!allow_hosts.is_empty()).then(|| allow_hosts.clone());
                let result = vault.update(name, Changes { fields, allowed_hosts: hosts }).await;
                vault.close().await;
                result?;
                let _ = write_stdout(format_args!("connection {} updated\n", printable(name)));
                Ok(ExitCode::SUCCESS)
            }
            ConnectionsCommand::List { json, vault: args } => {
                // Metadata only: no key needed, but a wrong one is refused.
                let vault = Vault::open(&vault_url(db, args), master_key(args)?).await?;
                let list = vault.list().await;
                vault.close().await;
                let list = list?;
                if *json {
                    let text = serde_json::to_string_pretty(&list).unwrap_or_default();
                    let _ = write_stdout(format_args!("{text}\n"));
                    return Ok(ExitCode::SUCCESS);
                }
                let mut text = format!(
                    "{:<24}  {:<8}  {:<32}  {:<24}  {:<20}  LAST USED\n",
                    "NAME", "KIND", "HOSTS", "FIELDS", "CREATED"
                );
                for c in &list {
                    let last = c.last_used_at.map_or_else(|| "never".to_owned(), report::format_ms);
                    text.push_str(&format!(
                        "{:<24}  {:<8}  {:<32}  {:<24}  {:<20}  {last}\n",
                        printable(&c.name),
                        c.kind,
                        c.allowed_hosts.join(","),
                        c.fields.join(","),
                        report::format_ms(c.created_at)
                    ));
                }
                let _ = write_stdout(format_args!("{text}"));
                Ok(ExitCode::SUCCESS)
            }
            ConnectionsCommand::Delete { name, vault: args } => {
                let vault = Vault::open(&vault_url(db, args), master_key(args)?).await?;
                let result = vault.delete(name).await;
                vault.close().await;
                result?;
                let _ = write_stdout(format_args!(
                    "connection {} deleted (its sealed values and data key destroyed)\n",
                    printable(name)
                ));
                Ok(ExitCode::SUCCESS)
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_parse_from_values_and_files_and_refuse_junk() {
        let dir = std::env::temp_dir().join(format!("sy-fields-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secret");
        std::fs::write(&file, "from-file\n").unwrap();
        let f = parse_fields(&["token=abc=def".into(), format!("password=@{}", file.display())]).unwrap();
        assert_eq!(f["token"].expose(), "abc=def");
        assert_eq!(f["password"].expose(), "from-file");
        assert!(parse_fields(&["novalue".into()]).is_err());
        assert!(parse_fields(&["a=".into()]).is_err());
        assert!(parse_fields(&["a=1".into(), "a=2".into()]).is_err());
        assert!(parse_fields(&["a=@/nonexistent/x".into()]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
