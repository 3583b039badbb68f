//! The credential vault through the binary: `vault init`, `connections
//! add | update | list | delete`, `vault rotate`, and the failures an
//! operator meets (no key, wrong key, a key file others can read).

use std::path::Path;
use std::process::Stdio;

use switchyard_tests::temp_dir;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_switchyard-e2e");
const CANARY: &str = "ghp-VAULT-CANARY-7f3a";

/// The binary on `dir`'s databases with `args` (split at spaces), no key
/// in its environment.
fn switchyard(dir: &Path, args: &str) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("--db")
        .arg(dir.join("runs.db"))
        .args(args.split_whitespace())
        .env_remove("SWITCHYARD_MASTER_KEY")
        .env_remove("SWITCHYARD_MASTER_KEY_FILE")
        .env_remove("SWITCHYARD_VAULT_URL")
        .kill_on_drop(true);
    cmd
}

struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

async fn run(cmd: &mut Command, stdin: Option<&str>) -> Out {
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).await.unwrap();
    }
    drop(input);
    let out =
        tokio::time::timeout(std::time::Duration::from_secs(60), child.wait_with_output()).await.unwrap().unwrap();
    Out {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Every file in `dir` as text, to look for a plaintext secret.
fn all_files(dir: &Path) -> String {
    let mut text = String::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        if let Ok(bytes) = std::fs::read(entry.path()) {
            text.push_str(&String::from_utf8_lossy(&bytes));
        }
    }
    text
}

#[tokio::test]
async fn connections_live_sealed_in_their_own_vault_and_rotate_to_a_new_key() {
    let tmp = temp_dir("vault-cli");
    let dir: &Path = tmp.as_ref();
    let key = dir.join("master.key");
    let with_key = |args: &str, key: &Path| {
        let mut cmd = switchyard(dir, args);
        cmd.env("SWITCHYARD_MASTER_KEY_FILE", key);
        cmd
    };
    let add_gh = "connections add gh --kind bearer --field token=- --allow-host api.github.com";

    // Without a vault key, adding a connection says what is missing.
    let out = run(&mut switchyard(dir, add_gh), Some("x")).await;
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("SWITCHYARD_MASTER_KEY"), "{}", out.stderr);

    let out = run(switchyard(dir, "vault init --key-file").arg(&key), None).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stdout.contains("SWITCHYARD_MASTER_KEY_FILE="), "{}", out.stdout);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    }
    assert!(dir.join("switchyard-vault.db").exists(), "the vault sits beside the run database");
    let again = run(switchyard(dir, "vault init --key-file").arg(dir.join("other.key")), None).await;
    assert_eq!(again.code, Some(2));
    assert!(again.stderr.contains("initialized already"), "{}", again.stderr);
    assert!(!dir.join("other.key").exists(), "no stray key file");

    // The secret comes from standard input, never the command line.
    let out = run(&mut with_key(add_gh, &key), Some(&format!("{CANARY}\n"))).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let out = run(&mut with_key("connections list --json", &key), None).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let list: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(list[0]["name"], "gh");
    assert_eq!(list[0]["kind"], "bearer");
    assert_eq!(list[0]["allowed_hosts"][0], "api.github.com");
    assert_eq!(list[0]["fields"][0], "token");
    // Listing needs no key; values never show, on screen or on disk.
    let text = run(&mut switchyard(dir, "connections list"), None).await;
    assert_eq!(text.code, Some(0), "{}", text.stderr);
    assert!(text.stdout.contains("gh") && text.stdout.contains("bearer"), "{}", text.stdout);
    for shown in [&out.stdout, &text.stdout, &all_files(dir)] {
        assert!(!shown.contains(CANARY), "the secret leaked");
    }

    // A wrong key is refused at once, naming the key the vault expects.
    let wrong = dir.join("wrong.key");
    let out =
        run(switchyard(dir, "vault init --vault").arg(dir.join("other.db")).arg("--key-file").arg(&wrong), None).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let out = run(&mut with_key("connections update gh --field token=y", &wrong), None).await;
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("does not open this vault"), "{}", out.stderr);
    // A key file others can read is refused, and the key is not echoed.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o644)).unwrap();
        let out = run(&mut with_key("connections list", &wrong), None).await;
        assert_eq!(out.code, Some(2), "{}", out.stderr);
        assert!(out.stderr.contains("group or others"), "{}", out.stderr);
        let wrong_text = std::fs::read_to_string(&wrong).unwrap();
        assert!(!out.stderr.contains(wrong_text.trim()));
    }
    // A bad kind and a missing field say which.
    let out =
        run(&mut with_key("connections add db --kind basic --field username=u --allow-host db.lan", &key), None).await;
    assert_eq!(out.code, Some(2));
    assert!(out.stderr.contains("password"), "{}", out.stderr);

    // Rotation: every data key re-wrapped; the old key opens nothing.
    let new_key = dir.join("new.key");
    let out = run(with_key("vault rotate --new-key-file", &key).arg(&new_key), None).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stdout.contains("re-wrapped 1 data keys"), "{}", out.stdout);
    let old = run(&mut with_key("connections update gh --field token=z", &key), None).await;
    assert_eq!(old.code, Some(2));
    assert!(old.stderr.contains("does not open this vault"), "{}", old.stderr);
    let key_text = std::fs::read_to_string(&new_key).unwrap();
    let mut update = switchyard(dir, "connections update gh --field token=-");
    update.env("SWITCHYARD_MASTER_KEY", key_text.trim());
    let out = run(&mut update, Some("rotated-token")).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);

    // Delete destroys it; deleting again is a clear error.
    let out = run(&mut switchyard(dir, "connections delete gh"), None).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let out = run(&mut switchyard(dir, "connections delete gh"), None).await;
    assert_eq!(out.code, Some(2));
    assert!(out.stderr.contains("no connection \"gh\""), "{}", out.stderr);
    let out = run(&mut switchyard(dir, "connections list --json"), None).await;
    assert_eq!(out.stdout.trim(), "[]");
}
