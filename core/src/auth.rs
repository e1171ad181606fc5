//! Message authentication: HMAC-SHA256 under a process's [`AuthKey`].
//!
//! A process signs what it sends to an object that asks for authentication (a `Manager`, an
//! actor spawned with an authkey); the receiver checks the tag before it decodes anything and
//! refuses what fails with [`Error::Authentication`]: nothing is executed. Tags are compared in
//! constant time. The key is the sender's `current_process().authkey`, inherited from the main
//! process (Python's `authkey`), or the one given to `Manager::connect`.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::context::AuthKey;
use crate::error::{Error, Result};

/// The length of a tag, in bytes.
pub const TAG_LEN: usize = 32;

/// The HMAC-SHA256 tag of `parts` (each length-prefixed, so that moving bytes from one part to
/// the next changes the tag) under `key`.
///
/// ```
/// use shoal_core::auth::{sign, verify};
/// use shoal_core::context::AuthKey;
/// let key = AuthKey::from_bytes(b"k".to_vec());
/// let tag = sign(&key, &[b"incr", b"1"]);
/// assert!(verify(&key, &[b"incr", b"1"], &tag, "counter").is_ok());
/// assert!(verify(&key, &[b"incr", b"2"], &tag, "counter").is_err());
/// assert!(verify(&key, &[b"inc", b"r1"], &tag, "counter").is_err());
/// ```
pub fn sign(key: &AuthKey, parts: &[&[u8]]) -> [u8; TAG_LEN] {
    let mut mac = keyed(key);
    for part in parts {
        mac.update(&(part.len() as u64).to_be_bytes());
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// Checks `tag` against `parts` under `key`; [`Error::Authentication`] naming `what` when it is
/// missing (empty) or wrong.
pub fn verify(key: &AuthKey, parts: &[&[u8]], tag: &[u8], what: &str) -> Result<()> {
    if tag.is_empty() {
        return Err(Error::Authentication(format!(
            "a message to {what} carries no authentication tag"
        )));
    }
    let mut mac = keyed(key);
    for part in parts {
        mac.update(&(part.len() as u64).to_be_bytes());
        mac.update(part);
    }
    mac.verify_slice(tag).map_err(|_| {
        Error::Authentication(format!(
            "a message to {what} has a wrong authentication tag: it was signed with another \
             authkey"
        ))
    })
}

fn keyed(key: &AuthKey) -> Hmac<Sha256> {
    // HMAC accepts keys of any length: this cannot fail.
    <Hmac<Sha256> as Mac>::new_from_slice(key.as_bytes()).unwrap_or_else(|_| unreachable_hmac_key())
}

#[cold]
fn unreachable_hmac_key() -> Hmac<Sha256> {
    // new_from_slice only fails for fixed-size-key MACs; HMAC takes any length. Hash an empty
    // key instead of panicking, should that ever change.
    <Hmac<Sha256> as hmac::digest::KeyInit>::new(&Default::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_depend_on_key_and_every_byte() {
        let a = AuthKey::from_bytes(b"a".to_vec());
        let b = AuthKey::from_bytes(b"b".to_vec());
        let tag = sign(&a, &[b"x", b"y"]);
        assert_eq!(tag.len(), TAG_LEN);
        assert!(verify(&a, &[b"x", b"y"], &tag, "t").is_ok());
        assert!(matches!(
            verify(&b, &[b"x", b"y"], &tag, "t"),
            Err(Error::Authentication(m)) if m.contains("another authkey")
        ));
        assert!(matches!(
            verify(&a, &[b"x", b"y"], &[], "t"),
            Err(Error::Authentication(m)) if m.contains("no authentication tag")
        ));
        assert!(verify(&a, &[b"x", b"y"], &tag[..16], "t").is_err());
    }
}
