//! The credential vault's cryptography (envelope encryption with ring).
//!
//! A master key (32 bytes, from `SWITCHYARD_MASTER_KEY` or a key file, never
//! from a database or a workflow) wraps one random data key per connection;
//! each secret field is sealed under its connection's data key. Every seal
//! is AES-256-GCM with a fresh random 96-bit nonce and associated data that
//! binds the ciphertext to its place, so a ciphertext copied to another row
//! or field does not open:
//!
//! - a wrapped data key: `v1:<master key id>:<base64(nonce ‖ ciphertext ‖ tag)>`,
//!   bound to (format, connection id);
//! - a sealed field: `v1:<data key id>:<base64(…)>`, bound to (format,
//!   connection id, field name);
//! - the key check: the master key's seal of a fixed text, kept with the
//!   vault, so a start with the wrong master key fails at once.
//!
//! Key ids are the first 8 bytes of a SHA-256 of the key (hex), so they name
//! a key without revealing it.

use std::fmt;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

/// The ciphertext format this build writes and reads.
pub const FORMAT: &str = "v1";
/// Environment variable holding the master key (base64 of 32 bytes).
pub const MASTER_KEY_ENV: &str = "SWITCHYARD_MASTER_KEY";
/// Environment variable naming a master key file.
pub const MASTER_KEY_FILE_ENV: &str = "SWITCHYARD_MASTER_KEY_FILE";

const KEY_LEN: usize = 32;
const KEY_CHECK: &[u8] = b"switchyard vault key check";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VaultError {
    #[error("master key: {0}")]
    MasterKey(String),
    #[error(
        "the master key (id {given}) does not open this vault (sealed with key id {expected}); \
         give the key the vault was created or last rotated with"
    )]
    WrongMasterKey { given: String, expected: String },
    #[error("{what} does not open: wrong key, or it was altered or moved")]
    Open { what: String },
    #[error("{what} is not a {FORMAT} ciphertext")]
    Format { what: String },
    #[error("no secure random numbers: {0}")]
    Random(String),
}

/// A secret value: never printed, never serialized, wiped from memory when
/// dropped.
#[derive(Clone)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(Zeroizing::new(value.into()))
    }

    /// The value, for the one place that applies it to a request.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

/// An AES-256-GCM key and its id.
struct Key {
    id: String,
    key: LessSafeKey,
}

impl Key {
    fn new(bytes: &[u8]) -> Result<Self, VaultError> {
        if bytes.len() != KEY_LEN {
            return Err(VaultError::MasterKey(format!("must be {KEY_LEN} bytes, not {}", bytes.len())));
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
        let id = digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
        let key = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| VaultError::MasterKey("unusable".into()))?,
        );
        Ok(Self { id, key })
    }

    /// `FORMAT:<key id>:<base64(nonce ‖ ciphertext ‖ tag)>`.
    fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<String, VaultError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).map_err(|_| VaultError::Random("nonce".into()))?;
        let mut buf = Zeroizing::new(plaintext.to_vec());
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut *buf)
            .map_err(|_| VaultError::Random("seal".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        Ok(format!("{FORMAT}:{}:{}", self.id, B64.encode(out)))
    }

    fn open(&self, aad: &[u8], sealed: &str, what: &str) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        let (key_id, body) = parse(sealed, what)?;
        if key_id != self.id {
            return Err(VaultError::Open { what: what.to_owned() });
        }
        let raw = B64.decode(body).map_err(|_| VaultError::Format { what: what.to_owned() })?;
        if raw.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(VaultError::Format { what: what.to_owned() });
        }
        let (nonce, ciphertext) = raw.split_at(NONCE_LEN);
        let nonce =
            Nonce::try_assume_unique_for_key(nonce).map_err(|_| VaultError::Format { what: what.to_owned() })?;
        let mut buf = Zeroizing::new(ciphertext.to_vec());
        let n = self
            .key
            .open_in_place(nonce, Aad::from(aad), &mut buf)
            .map_err(|_| VaultError::Open { what: what.to_owned() })?
            .len();
        buf.truncate(n);
        Ok(buf)
    }
}

/// Splits `FORMAT:<key id>:<body>`.
fn parse<'a>(sealed: &'a str, what: &str) -> Result<(&'a str, &'a str), VaultError> {
    let mut parts = sealed.splitn(3, ':');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(FORMAT), Some(id), Some(body)) if !id.is_empty() => Ok((id, body)),
        _ => Err(VaultError::Format { what: what.to_owned() }),
    }
}

/// The key id a wrapped data key (or any ciphertext) was sealed with.
pub fn sealed_key_id(sealed: &str) -> Option<&str> {
    parse(sealed, "").ok().map(|(id, _)| id)
}

fn random_key() -> Result<Zeroizing<[u8; KEY_LEN]>, VaultError> {
    let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
    SystemRandom::new().fill(&mut *bytes).map_err(|_| VaultError::Random("key".into()))?;
    Ok(bytes)
}

fn data_key_aad(connection: &str) -> Vec<u8> {
    format!("switchyard/{FORMAT}/data-key/{connection}").into_bytes()
}

fn field_aad(connection: &str, field: &str) -> Vec<u8> {
    // Connection ids and field names hold no `/` (checked by the store),
    // so the parts cannot run into each other.
    format!("switchyard/{FORMAT}/field/{connection}/{field}").into_bytes()
}

/// The master key: wraps and unwraps data keys.
pub struct MasterKey(Key);

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey({})", self.0.id)
    }
}

impl MasterKey {
    /// A new random key and its base64 text (for a key file).
    pub fn generate() -> Result<(Self, Zeroizing<String>), VaultError> {
        let bytes = random_key()?;
        Ok((Self(Key::new(&*bytes)?), Zeroizing::new(B64.encode(*bytes))))
    }

    /// From base64 text of 32 bytes (surrounding whitespace ignored).
    pub fn from_base64(text: &str) -> Result<Self, VaultError> {
        let bytes = Zeroizing::new(
            B64.decode(text.trim()).map_err(|_| VaultError::MasterKey("must be base64 of 32 bytes".into()))?,
        );
        Key::new(&bytes).map(Self)
    }

    /// From a key file that only its owner can read (mode 0600 or 0400).
    pub fn from_file(path: &Path) -> Result<Self, VaultError> {
        let shown = path.display();
        let meta = std::fs::metadata(path).map_err(|e| VaultError::MasterKey(format!("{shown}: {e}")))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(VaultError::MasterKey(format!(
                    "{shown} can be read by group or others (mode {mode:o}); chmod 600 it"
                )));
            }
        }
        if meta.len() > 1024 {
            return Err(VaultError::MasterKey(format!("{shown} is not a key file (too large)")));
        }
        let text =
            Zeroizing::new(std::fs::read_to_string(path).map_err(|e| VaultError::MasterKey(format!("{shown}: {e}")))?);
        Self::from_base64(&text).map_err(|e| match e {
            VaultError::MasterKey(m) => VaultError::MasterKey(format!("{shown}: {m}")),
            other => other,
        })
    }

    /// Its id (names the key in ciphertexts; reveals nothing of it).
    pub fn id(&self) -> &str {
        &self.0.id
    }

    /// The key check kept with a vault.
    pub fn key_check(&self) -> Result<String, VaultError> {
        self.0.seal(b"switchyard/key-check", KEY_CHECK)
    }

    /// Whether this key made `check` (see [`MasterKey::key_check`]).
    pub fn verify(&self, check: &str) -> Result<(), VaultError> {
        let expected = sealed_key_id(check).unwrap_or("unknown").to_owned();
        match self.0.open(b"switchyard/key-check", check, "the key check") {
            Ok(text) if text.as_slice() == KEY_CHECK => Ok(()),
            _ => Err(VaultError::WrongMasterKey { given: self.0.id.clone(), expected }),
        }
    }

    /// A new data key for `connection`, wrapped under this key.
    pub fn new_data_key(&self, connection: &str) -> Result<(DataKey, String), VaultError> {
        let bytes = random_key()?;
        let wrapped = self.0.seal(&data_key_aad(connection), &*bytes)?;
        Ok((DataKey(Key::new(&*bytes)?), wrapped))
    }

    /// Opens `connection`'s wrapped data key.
    pub fn unwrap(&self, connection: &str, wrapped: &str) -> Result<DataKey, VaultError> {
        let what = format!("the data key of connection {connection}");
        let bytes = self.0.open(&data_key_aad(connection), wrapped, &what)?;
        Key::new(&bytes).map(DataKey).map_err(|_| VaultError::Open { what })
    }

    /// Re-wraps `connection`'s data key (opened with `self`) under `new`.
    pub fn rewrap(&self, new: &MasterKey, connection: &str, wrapped: &str) -> Result<String, VaultError> {
        let what = format!("the data key of connection {connection}");
        let bytes = self.0.open(&data_key_aad(connection), wrapped, &what)?;
        new.0.seal(&data_key_aad(connection), &bytes)
    }
}

/// A connection's data key: seals and opens its fields.
pub struct DataKey(Key);

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DataKey({})", self.0.id)
    }
}

impl DataKey {
    pub fn seal(&self, connection: &str, field: &str, value: &Secret) -> Result<String, VaultError> {
        self.0.seal(&field_aad(connection, field), value.expose().as_bytes())
    }

    pub fn open(&self, connection: &str, field: &str, sealed: &str) -> Result<Secret, VaultError> {
        let what = format!("field {field} of connection {connection}");
        let bytes = self.0.open(&field_aad(connection, field), sealed, &what)?;
        let text = std::str::from_utf8(&bytes).map_err(|_| VaultError::Open { what })?;
        Ok(Secret::new(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> MasterKey {
        MasterKey::generate().unwrap().0
    }

    #[test]
    fn fields_round_trip_and_never_show() {
        let master = key();
        let (dk, wrapped) = master.new_data_key("c1").unwrap();
        let sealed = dk.seal("c1", "token", &Secret::new("sk-live-123")).unwrap();
        assert!(!sealed.contains("sk-live"));
        assert!(sealed.starts_with("v1:"));
        let opened = master.unwrap("c1", &wrapped).unwrap().open("c1", "token", &sealed).unwrap();
        assert_eq!(opened.expose(), "sk-live-123");
        assert_eq!(format!("{opened:?} {opened}"), "[REDACTED] [REDACTED]");
        // A fresh nonce each time: the same value seals differently.
        assert_ne!(sealed, dk.seal("c1", "token", &Secret::new("sk-live-123")).unwrap());
    }

    #[test]
    fn a_ciphertext_moved_to_another_field_or_connection_does_not_open() {
        let master = key();
        let (dk, wrapped) = master.new_data_key("c1").unwrap();
        let sealed = dk.seal("c1", "token", &Secret::new("x")).unwrap();
        assert!(matches!(dk.open("c1", "password", &sealed), Err(VaultError::Open { .. })));
        assert!(matches!(dk.open("c2", "token", &sealed), Err(VaultError::Open { .. })));
        // A data key copied to another connection's row does not open either.
        assert!(matches!(master.unwrap("c2", &wrapped), Err(VaultError::Open { .. })));
        // Nor does a flipped byte.
        let (head, body) = sealed.rsplit_once(':').unwrap();
        let mut raw = B64.decode(body).unwrap();
        raw[NONCE_LEN] ^= 1;
        let altered = format!("{head}:{}", B64.encode(raw));
        assert!(matches!(dk.open("c1", "token", &altered), Err(VaultError::Open { .. })));
        assert!(matches!(dk.open("c1", "token", "v2:ab:xx"), Err(VaultError::Format { .. })));
        assert!(matches!(dk.open("c1", "token", "v1:ab:!!"), Err(VaultError::Open { .. } | VaultError::Format { .. })));
    }

    #[test]
    fn the_key_check_tells_the_wrong_master_key_at_once() {
        let (a, b) = (key(), key());
        let check = a.key_check().unwrap();
        a.verify(&check).unwrap();
        let err = b.verify(&check).unwrap_err();
        assert_eq!(err, VaultError::WrongMasterKey { given: b.id().to_owned(), expected: a.id().to_owned() });
        assert!(err.to_string().contains(a.id()));
    }

    #[test]
    fn rotation_rewraps_and_the_old_key_then_opens_nothing() {
        let (old, new) = (key(), key());
        let (dk, wrapped) = old.new_data_key("c1").unwrap();
        let sealed = dk.seal("c1", "password", &Secret::new("hunter2")).unwrap();
        let rewrapped = old.rewrap(&new, "c1", &wrapped).unwrap();
        assert_eq!(sealed_key_id(&rewrapped), Some(new.id()));
        assert_eq!(new.unwrap("c1", &rewrapped).unwrap().open("c1", "password", &sealed).unwrap().expose(), "hunter2");
        assert!(old.unwrap("c1", &rewrapped).is_err());
        assert!(new.rewrap(&old, "c1", &wrapped).is_err(), "the new key does not open the old wrapping");
    }

    #[test]
    fn master_keys_load_from_base64_and_private_files_only() {
        let (k, text) = MasterKey::generate().unwrap();
        assert_eq!(MasterKey::from_base64(&format!(" {}\n", &*text)).unwrap().id(), k.id());
        assert!(MasterKey::from_base64("c2hvcnQ=").unwrap_err().to_string().contains("32 bytes"));
        assert!(MasterKey::from_base64("not base64!").is_err());
        let dir = std::env::temp_dir().join(format!("sy-vault-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("key");
        std::fs::write(&file, &*text).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
            let err = MasterKey::from_file(&file).unwrap_err().to_string();
            assert!(err.contains("group or others"), "{err}");
            assert!(!err.contains(&*text), "the key is never echoed");
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        assert_eq!(MasterKey::from_file(&file).unwrap().id(), k.id());
        assert!(MasterKey::from_file(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
