//! Bearer tokens of the network listeners, read from a file that the operator owns and re-read
//! on SIGHUP. Each line is `NAME TOKEN` (the name is what logs and per-client limits show; the
//! token never appears anywhere); blank lines and lines starting with `#` are skipped. Tokens
//! are compared as SHA-256 digests in constant time, so neither a token's bytes nor its length
//! leak through timing.

use std::path::{Path, PathBuf};
use std::sync::RwLock;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Shortest token accepted: 128 bits of hex or base64 are at least this long.
pub const MIN_TOKEN_BYTES: usize = 16;

struct Entry {
    name: String,
    digest: [u8; 32],
}

/// The tokens a listener accepts.
pub struct Tokens {
    file: PathBuf,
    entries: RwLock<Vec<Entry>>,
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

fn parse(file: &Path) -> Result<Vec<Entry>, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("cannot read tokens file {}: {e}", file.display()))?;
    let mut entries: Vec<Entry> = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(name), Some(token), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(format!("{} line {}: expected `NAME TOKEN`", file.display(), number + 1));
        };
        if token.len() < MIN_TOKEN_BYTES {
            return Err(format!(
                "{} line {}: the token of {name:?} is shorter than {MIN_TOKEN_BYTES} bytes",
                file.display(),
                number + 1
            ));
        }
        if entries.iter().any(|e| e.name == name) {
            return Err(format!("{} line {}: {name:?} is named twice", file.display(), number + 1));
        }
        entries.push(Entry {
            name: name.to_string(),
            digest: digest(token.as_bytes()),
        });
    }
    if entries.is_empty() {
        return Err(format!("{} holds no token", file.display()));
    }
    Ok(entries)
}

impl Tokens {
    /// Reads `file`; an unreadable or malformed file is an error (the server does not start).
    pub fn load(file: &Path) -> Result<Self, String> {
        Ok(Self {
            entries: RwLock::new(parse(file)?),
            file: file.to_path_buf(),
        })
    }

    /// Reads the file again; on error the tokens in use stay, and the error is returned.
    pub fn reload(&self) -> Result<usize, String> {
        let entries = parse(&self.file)?;
        let count = entries.len();
        *self.entries.write().unwrap_or_else(|p| p.into_inner()) = entries;
        Ok(count)
    }

    /// The name of the client whose token this is. Every entry is compared, whether or not an
    /// earlier one matched.
    pub fn check(&self, token: &[u8]) -> Option<String> {
        let presented = digest(token);
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        let mut found = None;
        for entry in entries.iter() {
            if bool::from(entry.digest.ct_eq(&presented)) && found.is_none() {
                found = Some(entry.name.clone());
            }
        }
        found
    }
}

/// Re-reads `tokens` on every SIGHUP, in a thread of its own.
pub fn reload_on_sighup(tokens: std::sync::Arc<Tokens>) -> std::io::Result<()> {
    let mut hangups = signal_hook::iterator::Signals::new([signal_hook::consts::SIGHUP])?;
    std::thread::Builder::new().name("sighup".into()).spawn(move || {
        for _ in hangups.forever() {
            match tokens.reload() {
                Ok(count) => eprintln!("nvembed-model-server: SIGHUP: {count} tokens read"),
                Err(e) => eprintln!("nvembed-model-server: SIGHUP: keeping the tokens in use: {e}"),
            }
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_named_checked_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        std::fs::write(&file, "# clients\nreplica-a 0123456789abcdef0123\n\nloader  fedcba9876543210fedc\n").unwrap();
        let tokens = Tokens::load(&file).unwrap();
        assert_eq!(tokens.check(b"0123456789abcdef0123").as_deref(), Some("replica-a"));
        assert_eq!(tokens.check(b"fedcba9876543210fedc").as_deref(), Some("loader"));
        assert_eq!(tokens.check(b"0123456789abcdef012"), None);
        assert_eq!(tokens.check(b""), None);
        std::fs::write(&file, "loader fedcba9876543210fedc\n").unwrap();
        assert_eq!(tokens.reload(), Ok(1));
        assert_eq!(tokens.check(b"0123456789abcdef0123"), None);
        // A broken file keeps the tokens in use.
        std::fs::write(&file, "loader\n").unwrap();
        assert!(tokens.reload().unwrap_err().contains("line 1: expected `NAME TOKEN`"));
        assert_eq!(tokens.check(b"fedcba9876543210fedc").as_deref(), Some("loader"));
        std::fs::write(&file, "a short\n").unwrap();
        assert!(tokens.reload().unwrap_err().contains("shorter than 16 bytes"));
        std::fs::write(&file, "a 0123456789abcdef0123\na fedcba9876543210fedc\n").unwrap();
        assert!(tokens.reload().unwrap_err().contains("named twice"));
    }
}
