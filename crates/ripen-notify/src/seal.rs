//! Secrets at rest: sealed with the server's master key (AES-256-GCM), so
//! that a copy of the database alone does not reveal them.
//!
//! A sealed value is a format byte, a random 96-bit nonce and the
//! ciphertext with its tag. The associated data (the row's id) binds a
//! sealed value to its row: moved to another row, it does not open.
//!
//! A master key may carry previous keys, for rotation: the first key of its
//! text seals, and every key opens. [`MasterKey::reseal`] tells a value
//! sealed with a previous key and seals it again with the current one.

use std::io::Write as _;
use std::path::Path;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

const FORMAT: u8 = 1;
const KEY_BYTES: usize = 32;

/// The key that seals secrets at rest, with the previous keys that still
/// open what they sealed.
pub struct MasterKey {
    current: LessSafeKey,
    previous: Vec<LessSafeKey>,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// A key from its text form: 64 hexadecimal digits, then optionally
    /// the previous keys, each after a comma or on a line of its own. The
    /// first key is the current one.
    pub fn parse(text: &str) -> Result<MasterKey, String> {
        let mut keys = text
            .split([',', '\n', '\r'])
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(one_key);
        let current = keys.next().unwrap_or_else(|| one_key(""))?;
        let previous = keys.collect::<Result<Vec<_>, _>>()?;
        Ok(MasterKey { current, previous })
    }

    fn from_bytes(bytes: &[u8]) -> Result<MasterKey, String> {
        Ok(MasterKey {
            current: key_of(bytes)?,
            previous: Vec::new(),
        })
    }

    /// Whether previous keys came with the current one: a rotation is under
    /// way.
    pub fn rotating(&self) -> bool {
        !self.previous.is_empty()
    }

    /// Reads the key file at `path`, or creates it (readable by its owner
    /// only) with a fresh random key when it does not exist.
    pub fn load_or_create(path: &Path) -> Result<MasterKey, String> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                MasterKey::parse(&text).map_err(|e| format!("the key file {}: {e}", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = [0u8; KEY_BYTES];
                SystemRandom::new()
                    .fill(&mut bytes)
                    .map_err(|_| "the system random source failed".to_owned())?;
                let text: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                let mut options = std::fs::OpenOptions::new();
                options.write(true).create_new(true);
                #[cfg(unix)]
                {
                    use std::os::unix::fs::OpenOptionsExt as _;
                    options.mode(0o600);
                }
                let mut file = options
                    .open(path)
                    .map_err(|e| format!("create the key file {}: {e}", path.display()))?;
                file.write_all(format!("{text}\n").as_bytes())
                    .and_then(|()| file.sync_all())
                    .map_err(|e| format!("write the key file {}: {e}", path.display()))?;
                MasterKey::from_bytes(&bytes)
            }
            Err(e) => Err(format!("read the key file {}: {e}", path.display())),
        }
    }

    /// Seals `plain`, bound to `row`.
    pub fn seal(&self, plain: &[u8], row: &str) -> Result<Vec<u8>, String> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| "the system random source failed".to_owned())?;
        let mut sealed = plain.to_vec();
        self.current
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(row.as_bytes()),
                &mut sealed,
            )
            .map_err(|_| "sealing failed".to_owned())?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
        out.push(FORMAT);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Opens what [`MasterKey::seal`] sealed for `row`, with the current
    /// key or a previous one.
    pub fn open(&self, sealed: &[u8], row: &str) -> Result<Vec<u8>, String> {
        self.open_with_any(sealed, row).map(|(plain, _)| plain)
    }

    /// `None` when `sealed` opens with the current key; else the value
    /// sealed again with the current key, when a previous key opens it.
    pub fn reseal(&self, sealed: &[u8], row: &str) -> Result<Option<Vec<u8>>, String> {
        match self.open_with_any(sealed, row)? {
            (_, true) => Ok(None),
            (plain, false) => self.seal(&plain, row).map(Some),
        }
    }

    /// The plain value, and whether the current key opened it.
    fn open_with_any(&self, sealed: &[u8], row: &str) -> Result<(Vec<u8>, bool), String> {
        let refused = || "the sealed secret does not open with this master key".to_owned();
        let (&format, rest) = sealed.split_first().ok_or_else(refused)?;
        if format != FORMAT || rest.len() < NONCE_LEN {
            return Err(refused());
        }
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        for (i, key) in std::iter::once(&self.current)
            .chain(&self.previous)
            .enumerate()
        {
            let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| refused())?;
            let mut buf = ciphertext.to_vec();
            if let Ok(plain) = key.open_in_place(nonce, Aad::from(row.as_bytes()), &mut buf) {
                return Ok((plain.to_vec(), i == 0));
            }
        }
        Err(refused())
    }
}

/// One key from its 64 hexadecimal digits.
fn one_key(text: &str) -> Result<LessSafeKey, String> {
    if text.len() != KEY_BYTES * 2 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "a master key is {} hexadecimal digits (for example from `openssl rand -hex 32`), \
             optionally followed by previous keys, separated by commas or lines",
            KEY_BYTES * 2
        ));
    }
    let bytes: Vec<u8> = (0..KEY_BYTES)
        .map(|i| u8::from_str_radix(&text[i * 2..i * 2 + 2], 16).unwrap_or(0))
        .collect();
    key_of(&bytes)
}

fn key_of(bytes: &[u8]) -> Result<LessSafeKey, String> {
    let key = UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| "a bad master key".to_owned())?;
    Ok(LessSafeKey::new(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_secrets_open_only_with_their_key_and_row() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ripen.key");
        let key = MasterKey::load_or_create(&path).expect("create");
        let again = MasterKey::load_or_create(&path).expect("load");
        let sealed = key.seal(b"whsec_abc", "sub_1").expect("seal");
        assert!(
            !sealed.windows(9).any(|w| w == b"whsec_abc"),
            "not in the clear"
        );
        assert_eq!(again.open(&sealed, "sub_1").expect("open"), b"whsec_abc");
        assert!(again.open(&sealed, "sub_2").is_err(), "bound to its row");
        let other = MasterKey::parse(&"ab".repeat(32)).expect("parse");
        assert!(other.open(&sealed, "sub_1").is_err(), "another key");
        let mut tampered = sealed.clone();
        *tampered.last_mut().expect("bytes") ^= 1;
        assert!(key.open(&tampered, "sub_1").is_err());
        assert_ne!(
            key.seal(b"x", "r").expect("seal"),
            key.seal(b"x", "r").expect("seal")
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(MasterKey::parse("short").is_err());
    }

    #[test]
    fn a_rotating_key_opens_with_every_key_and_reseals_with_the_first() {
        let (old, new) = ("ab".repeat(32), "cd".repeat(32));
        let before = MasterKey::parse(&old).expect("old");
        assert!(!before.rotating());
        let sealed = before.seal(b"whsec_abc", "sub_1").expect("seal");
        assert_eq!(before.reseal(&sealed, "sub_1").expect("reseal"), None);

        for text in [format!("{new},{old}"), format!("{new}\n{old}\n")] {
            let ring = MasterKey::parse(&text).expect("ring");
            assert!(ring.rotating());
            assert_eq!(ring.open(&sealed, "sub_1").expect("open"), b"whsec_abc");
            let again = ring
                .reseal(&sealed, "sub_1")
                .expect("reseal")
                .expect("sealed with the old key");
            let only_new = MasterKey::parse(&new).expect("new");
            assert_eq!(only_new.open(&again, "sub_1").expect("open"), b"whsec_abc");
            assert!(only_new.open(&sealed, "sub_1").is_err());
            assert_eq!(ring.reseal(&again, "sub_1").expect("reseal"), None);
            assert!(ring.reseal(&sealed, "sub_2").is_err(), "bound to its row");
        }
        assert!(MasterKey::parse(&format!("{new},short")).is_err());
        assert!(MasterKey::parse("").is_err());
    }
}
