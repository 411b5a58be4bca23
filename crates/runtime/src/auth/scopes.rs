//! Scopes and the `--auth-config` mapping from certificate SANs and JWT subjects to scopes.

use std::{collections::HashMap, path::Path};

use serde::Deserialize;

use super::Scope;

/// A set of scopes. `admin` implies every other scope.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScopeSet(u8);

impl ScopeSet {
    /// No scope at all.
    pub const NONE: ScopeSet = ScopeSet(0);
    /// Every scope.
    pub const ALL: ScopeSet = ScopeSet(0b111);

    fn bit(s: Scope) -> u8 {
        match s {
            Scope::Read => 1,
            Scope::Write => 2,
            Scope::Admin => 4,
        }
    }

    /// The set of the given scopes.
    pub fn of(scopes: &[Scope]) -> ScopeSet {
        ScopeSet(scopes.iter().fold(0, |acc, s| acc | Self::bit(*s)))
    }

    /// Whether the set grants `s` (`admin` grants everything).
    pub fn grants(self, s: Scope) -> bool {
        self.0 & Self::bit(Scope::Admin) != 0 || self.0 & Self::bit(s) != 0
    }

    /// Whether every scope of `self` is held by `other` (`admin` in `other` holds everything).
    pub fn within(self, other: ScopeSet) -> bool {
        other.0 & Self::bit(Scope::Admin) != 0 || self.0 & !other.0 == 0
    }

    /// The scopes' names, for logs and API answers.
    pub fn names(self) -> Vec<&'static str> {
        [Scope::Read, Scope::Write, Scope::Admin]
            .into_iter()
            .filter(|s| self.0 & Self::bit(*s) != 0)
            .map(Scope::as_str)
            .collect()
    }

    /// Parses scope names; an unknown name is an error naming it.
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Result<ScopeSet, String> {
        let mut v = Vec::new();
        for n in names {
            v.push(match n.as_ref() {
                "read" => Scope::Read,
                "write" => Scope::Write,
                "admin" => Scope::Admin,
                other => return Err(format!("unknown scope '{other}' (expected read, write or admin)")),
            });
        }
        Ok(ScopeSet::of(&v))
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    certificates: HashMap<String, Vec<String>>,
    #[serde(default)]
    subjects: HashMap<String, SubjectRule>,
    #[serde(default)]
    default_certificate_scopes: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SubjectRule {
    Scopes(Vec<String>),
    Full {
        scopes: Vec<String>,
        #[serde(default)]
        key_prefix: Option<String>,
    },
}

/// What a JWT subject may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectGrant {
    /// Scopes.
    pub scopes: ScopeSet,
    /// Optional key prefix the subject is limited to.
    pub key_prefix: Option<String>,
}

/// The scope mapping in force.
#[derive(Debug, Clone)]
pub struct ScopeConfig {
    certificates: HashMap<String, ScopeSet>,
    subjects: HashMap<String, SubjectGrant>,
    default_certificate: ScopeSet,
    dev_client: String,
    /// Whether the development client certificate holds `admin` (only without `--auth-config`).
    dev_admin: bool,
}

impl ScopeConfig {
    /// The mapping without a config file: every verified client certificate holds every scope
    /// (mutual TLS against your own CA is the credential), JWT subjects hold none.
    pub fn defaults(trust_domain: &str) -> ScopeConfig {
        ScopeConfig {
            certificates: HashMap::new(),
            subjects: HashMap::new(),
            default_certificate: ScopeSet::ALL,
            dev_client: format!("spiffe://{trust_domain}/client/dev"),
            dev_admin: true,
        }
    }

    /// Reads `--auth-config`. Unlisted client certificates then get `default_certificate_scopes`
    /// (none unless given) — the development client certificate included: once an operator
    /// writes a mapping, only the mapping grants `admin`.
    pub fn load(path: &Path, trust_domain: &str) -> Result<ScopeConfig, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("cannot read --auth-config {}: {e}", path.display()))?;
        let raw: RawConfig =
            serde_saphyr::from_str(&text).map_err(|e| format!("invalid --auth-config {}: {e}", path.display()))?;
        let bad = |e: String| format!("invalid --auth-config {}: {e}", path.display());
        let mut certificates = HashMap::new();
        for (san, scopes) in raw.certificates {
            certificates.insert(san, ScopeSet::parse(&scopes).map_err(bad)?);
        }
        let mut subjects = HashMap::new();
        for (sub, rule) in raw.subjects {
            let (scopes, key_prefix) = match rule {
                SubjectRule::Scopes(s) => (s, None),
                SubjectRule::Full { scopes, key_prefix } => (scopes, key_prefix),
            };
            subjects.insert(
                sub,
                SubjectGrant {
                    scopes: ScopeSet::parse(&scopes).map_err(bad)?,
                    key_prefix,
                },
            );
        }
        let default_certificate = match raw.default_certificate_scopes {
            Some(s) => ScopeSet::parse(&s).map_err(bad)?,
            None => ScopeSet::NONE,
        };
        Ok(ScopeConfig {
            certificates,
            subjects,
            default_certificate,
            dev_client: format!("spiffe://{trust_domain}/client/dev"),
            dev_admin: false,
        })
    }

    /// Scopes of a verified client certificate with these SANs.
    pub fn for_certificate(&self, sans: &[String]) -> ScopeSet {
        let listed = sans.iter().filter_map(|s| self.certificates.get(s)).copied();
        let mut found = false;
        let mut set = ScopeSet::NONE;
        for s in listed {
            found = true;
            set = ScopeSet(set.0 | s.0);
        }
        if found {
            return set;
        }
        if self.dev_admin && sans.contains(&self.dev_client) {
            return ScopeSet::ALL;
        }
        self.default_certificate
    }

    /// What a JWT subject may do (nothing if unlisted).
    pub fn for_subject(&self, sub: &str) -> SubjectGrant {
        self.subjects.get(sub).cloned().unwrap_or(SubjectGrant {
            scopes: ScopeSet::NONE,
            key_prefix: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_grants_everything_and_names_parse() {
        let admin = ScopeSet::parse(&["admin"]).unwrap();
        assert!(admin.grants(Scope::Read) && admin.grants(Scope::Write));
        let w = ScopeSet::parse(&["write"]).unwrap();
        assert!(w.grants(Scope::Write) && !w.grants(Scope::Read) && !w.grants(Scope::Admin));
        assert!(ScopeSet::parse(&["root"]).unwrap_err().contains("root"));
    }

    #[test]
    fn a_grant_fits_inside_its_creator() {
        let r = ScopeSet::of(&[Scope::Read]);
        let rw = ScopeSet::of(&[Scope::Read, Scope::Write]);
        assert!(r.within(rw) && !rw.within(r));
        assert!(ScopeSet::ALL.within(ScopeSet::of(&[Scope::Admin])));
        assert!(!ScopeSet::of(&[Scope::Admin]).within(rw));
    }

    #[test]
    fn config_maps_sans_and_subjects() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("auth.yaml");
        std::fs::write(
            &p,
            "certificates:\n  spiffe://peervault.local/client/ci: [read]\nsubjects:\n  system:serviceaccount:apps:uploader: [write]\n  alice:\n    scopes: [read, write]\n    key_prefix: alice/\n",
        )
        .unwrap();
        let c = ScopeConfig::load(&p, "peervault.local").unwrap();
        assert_eq!(
            c.for_certificate(&["spiffe://peervault.local/client/ci".into()]),
            ScopeSet::of(&[Scope::Read])
        );
        // With a mapping, the development certificate is an ordinary unlisted client.
        assert_eq!(
            c.for_certificate(&["spiffe://peervault.local/client/dev".into()]),
            ScopeSet::NONE
        );
        assert_eq!(
            ScopeConfig::defaults("peervault.local").for_certificate(&["spiffe://peervault.local/client/dev".into()]),
            ScopeSet::ALL
        );
        assert_eq!(c.for_certificate(&["other".into()]), ScopeSet::NONE);
        assert_eq!(
            c.for_subject("system:serviceaccount:apps:uploader").scopes,
            ScopeSet::of(&[Scope::Write])
        );
        assert_eq!(c.for_subject("alice").key_prefix.as_deref(), Some("alice/"));
        assert_eq!(c.for_subject("mallory").scopes, ScopeSet::NONE);
        std::fs::write(&p, "certificates:\n  x: [root]\n").unwrap();
        assert!(ScopeConfig::load(&p, "peervault.local").unwrap_err().contains("root"));
    }
}
