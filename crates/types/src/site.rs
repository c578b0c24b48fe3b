//! Site names and the origin of replicated events (DESIGN §3.4).
//!
//! A site name is 1 to [`SITE_NAME_BYTES_MAX`] bytes of lowercase ASCII
//! letters, digits, `-` and `_`, starting with a letter or digit: short,
//! safe in metric labels, file names and stream-name tokens.

use std::fmt;

use crate::limits::SITE_NAME_BYTES_MAX;
use crate::xxh64::Xxh64;

/// The name of a site (`eu`, `us-east`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SiteName(String);

/// Why a site name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("site name {name:?} is invalid: {reason}")]
pub struct SiteNameError {
    /// The refused name.
    pub name: String,
    /// What is wrong with it.
    pub reason: String,
}

impl SiteName {
    /// Validates `name`.
    pub fn new(name: &str) -> Result<Self, SiteNameError> {
        let fail = |reason: String| Err(SiteNameError { name: name.to_owned(), reason });
        if name.is_empty() {
            return fail("it is empty".into());
        }
        if name.len() > SITE_NAME_BYTES_MAX {
            return fail(format!("it is {} bytes, more than the maximum of {SITE_NAME_BYTES_MAX}", name.len()));
        }
        if let Some(bad) = name.chars().find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '-' | '_')) {
            return fail(format!("character {bad:?} is not allowed (use a-z, 0-9, '-' and '_')"));
        }
        if name.starts_with(['-', '_']) {
            return fail("it must start with a letter or digit".into());
        }
        Ok(Self(name.to_owned()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A stable 64-bit id of the name (XXH64, seed 0, of its bytes), never 0:
    /// the store keeps it per replicated stream, and 0 means "this site".
    pub fn id(&self) -> u64 {
        let mut hasher = Xxh64::new();
        hasher.update(self.0.as_bytes());
        hasher.finish().max(1)
    }
}

impl fmt::Display for SiteName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a replicated event comes from: stored with the event at every site
/// it reaches, never part of its content hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The event's home site: the only site that writes its stream.
    pub site: SiteName,
    /// The event's position in its home site's log.
    pub position: u64,
    /// The site that delivered it here (the home site, or a relay).
    pub via: SiteName,
    /// What a policy did on the way, e.g. `sampled 1/10` or `compacted`;
    /// empty when the event was replicated as is.
    pub note: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_names_are_validated_with_the_reason() {
        assert!(SiteName::new("eu").is_ok());
        assert!(SiteName::new("us-east_2").is_ok());
        let e = SiteName::new("").unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        let e = SiteName::new("EU").unwrap_err();
        assert!(e.to_string().contains("'E'"), "{e}");
        let e = SiteName::new("-eu").unwrap_err();
        assert!(e.to_string().contains("start"), "{e}");
        let e = SiteName::new(&"a".repeat(SITE_NAME_BYTES_MAX + 1)).unwrap_err();
        assert!(e.to_string().contains("maximum"), "{e}");
    }

    #[test]
    fn site_ids_are_stable_and_never_zero() {
        let eu = SiteName::new("eu").unwrap();
        assert_eq!(eu.id(), SiteName::new("eu").unwrap().id());
        assert_ne!(eu.id(), SiteName::new("us").unwrap().id());
        assert_ne!(eu.id(), 0);
    }
}
