//! This node's WireGuard key pair: made on first start, kept in the state dir with mode 0600,
//! never logged, never in the store or the API (only the public key is published).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use gotatun::x25519::{PublicKey, StaticSecret};

/// A private key. Its `Debug` shows only the public half.
#[derive(Clone)]
pub struct PrivateKey([u8; 32]);

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PrivateKey(public {})", self.public_base64())
    }
}

impl PrivateKey {
    pub(crate) fn secret(&self) -> StaticSecret {
        StaticSecret::from(self.0)
    }

    pub fn public(&self) -> PublicKey {
        PublicKey::from(&self.secret())
    }

    /// The public key as `wg` prints it.
    pub fn public_base64(&self) -> String {
        public_to_base64(&self.public())
    }
}

pub fn public_to_base64(key: &PublicKey) -> String {
    STANDARD.encode(key.as_bytes())
}

/// A public key from its base64 form; `None` unless it is 32 bytes.
pub fn public_from_base64(text: &str) -> Option<PublicKey> {
    let bytes: [u8; 32] = STANDARD.decode(text).ok()?.try_into().ok()?;
    Some(PublicKey::from(bytes))
}

/// Reads the key at `path`, or makes one there (mode 0600) if there is none. A file that is
/// not a key is an error, never replaced: the node's identity would change under its peers.
pub fn load_or_create(path: &Path) -> std::io::Result<PrivateKey> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let key: [u8; 32] = STANDARD
                .decode(text.trim())
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!(
                            "{} is not a WireGuard private key (base64 of 32 bytes)",
                            path.display()
                        ),
                    )
                })?;
            Ok(PrivateKey(key))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key: [u8; 32] = rand::random();
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)?;
            file.write_all(STANDARD.encode(key).as_bytes())?;
            file.write_all(b"\n")?;
            file.sync_all()?;
            Ok(PrivateKey(key))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_made_once_with_mode_0600_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("overlay/wg.key");
        let made = load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = load_or_create(&path).unwrap();
        assert_eq!(made.public_base64(), again.public_base64());
        assert_eq!(
            public_from_base64(&made.public_base64()),
            Some(made.public())
        );
        assert!(
            !format!("{made:?}").contains(&STANDARD.encode(made.0)),
            "Debug hides the key"
        );
        std::fs::write(&path, "not a key").unwrap();
        let err = load_or_create(&path).unwrap_err().to_string();
        assert!(err.contains("is not a WireGuard private key"), "{err}");
        assert_eq!(public_from_base64("c2hvcnQ="), None);
    }
}
