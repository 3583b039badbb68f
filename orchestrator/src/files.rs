//! Reading files a user or a workflow names: regular files only, under a
//! size limit, as UTF-8 without a byte-order mark. A FIFO, a device such as
//! `/dev/zero` or a directory is refused before it is opened, so nothing
//! hangs or reads without end. Errors name the file, never its contents.

use std::io::Read;
use std::path::Path;

/// The largest workflow file, or `--input @file`, that is read.
pub const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// Reads `path` as text: a regular file (symlinks followed) of at most
/// `limit` bytes, valid UTF-8, with a leading BOM removed.
pub fn read_text(path: &Path, limit: u64) -> Result<String, String> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {shown}: {}", io_reason(&e)))?;
    if !meta.is_file() {
        return Err(format!("cannot read {shown}: not a regular file"));
    }
    if meta.len() > limit {
        return Err(format!("cannot read {shown}: {} bytes, more than the limit of {limit}", meta.len()));
    }
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read {shown}: {}", io_reason(&e)))?;
    // The file may have changed between the check and the open: read at most
    // one byte past the limit and check again.
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(limit + 1).read_to_end(&mut bytes).map_err(|e| format!("cannot read {shown}: {}", io_reason(&e)))?;
    if bytes.len() as u64 > limit {
        return Err(format!("cannot read {shown}: more than the limit of {limit} bytes"));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        format!("cannot read {shown}: not UTF-8 text (invalid byte at offset {})", e.utf8_error().valid_up_to())
    })?;
    Ok(strip_bom(text))
}

/// Removes a leading UTF-8 byte-order mark, which editors on Windows write.
pub fn strip_bom(text: String) -> String {
    match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_owned(),
        None => text,
    }
}

/// The OS error without its "(os error N)" suffix.
fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_is_not_a_small_regular_file() {
        let dir = std::env::temp_dir().join(format!("sy-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let big = dir.join("big.yaml");
        std::fs::write(&big, vec![b'a'; 100]).unwrap();
        assert!(read_text(&big, 10).unwrap_err().contains("more than the limit"));
        assert!(read_text(&dir, 10).unwrap_err().contains("not a regular file"));
        assert!(read_text(Path::new("/dev/zero"), 10).unwrap_err().contains("not a regular file"));
        assert!(read_text(&dir.join("missing"), 10).unwrap_err().contains("no such file"));
        let bom = dir.join("bom.yaml");
        std::fs::write(&bom, "\u{feff}name: x\n").unwrap();
        assert_eq!(read_text(&bom, 100).unwrap(), "name: x\n");
        let binary = dir.join("bin");
        std::fs::write(&binary, [0xff, 0xfe, 0x00]).unwrap();
        assert!(read_text(&binary, 100).unwrap_err().contains("not UTF-8"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
