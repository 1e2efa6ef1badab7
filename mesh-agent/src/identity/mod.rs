//! Workload identity: SPIFFE X.509 SVIDs (Istio/ztunnel compatible) for the service accounts
//! that have a pod on this node.
//!
//! - [`CertificateAuthority`] signs SVIDs: either a local CA whose root lives in the agent's
//!   state directory, or an operator-provided signing CA (Istio "plug-in CA" files).
//! - [`CertManager`] holds one certificate per local service account, issues on first use and
//!   rotates in the background.
//! - `crate::tls` turns those certificates into rustls configs and checks peer identities.

pub mod ca;
pub mod manager;
pub mod remote;

use std::{fmt, str::FromStr};

pub use ca::{CaError, CertificateAuthority};
pub use manager::{CertManager, Issuer, WorkloadCert};

use crate::state::Identity;

/// Why a string is not a `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>` ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{input:?} is not a workload SPIFFE ID (spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>): {reason}"
)]
pub struct IdentityParseError {
    /// The string that was parsed.
    pub input: String,
    /// What is wrong with it.
    pub reason: IdentityParseReason,
}

/// The part of a SPIFFE ID that [`Identity::from_str`] rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityParseReason {
    /// Does not start with `spiffe://`.
    Scheme,
    /// The trust domain is empty.
    EmptyTrustDomain,
    /// The trust domain has a character outside `[a-z0-9.-_]`.
    TrustDomainChar(char),
    /// The path is not `/ns/<namespace>/sa/<service-account>`.
    Path,
    /// A namespace or service account is empty, `.` or `..`.
    EmptySegment(&'static str),
    /// A namespace or service account has a character outside `[A-Za-z0-9.-_]`.
    SegmentChar(&'static str, char),
}

impl fmt::Display for IdentityParseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Scheme => write!(f, "it does not start with spiffe://"),
            Self::EmptyTrustDomain => write!(f, "the trust domain is empty"),
            Self::TrustDomainChar(c) => {
                write!(f, "the trust domain has {c:?}, allowed are [a-z0-9.-_]")
            }
            Self::Path => write!(f, "the path is not /ns/<namespace>/sa/<service-account>"),
            Self::EmptySegment(what) => write!(f, "the {what} is empty, \".\" or \"..\""),
            Self::SegmentChar(what, c) => {
                write!(f, "the {what} has {c:?}, allowed are [A-Za-z0-9.-_]")
            }
        }
    }
}

const SPIFFE_SCHEME: &str = "spiffe://";

impl FromStr for Identity {
    type Err = IdentityParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fail = |reason| IdentityParseError {
            input: s.to_string(),
            reason,
        };
        let rest = s
            .get(..SPIFFE_SCHEME.len())
            .filter(|scheme| scheme.eq_ignore_ascii_case(SPIFFE_SCHEME))
            .map(|_| &s[SPIFFE_SCHEME.len()..])
            .ok_or_else(|| fail(IdentityParseReason::Scheme))?;
        let (trust_domain, path) = rest.split_once('/').unwrap_or((rest, ""));
        if trust_domain.is_empty() {
            return Err(fail(IdentityParseReason::EmptyTrustDomain));
        }
        if let Some(c) = trust_domain
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || ".-_".contains(*c)))
        {
            return Err(fail(IdentityParseReason::TrustDomainChar(c)));
        }
        let segments: Vec<&str> = path.split('/').collect();
        let [ns_key, namespace, sa_key, service_account] = segments[..] else {
            return Err(fail(IdentityParseReason::Path));
        };
        if ns_key != "ns" || sa_key != "sa" {
            return Err(fail(IdentityParseReason::Path));
        }
        for (what, segment) in [
            ("namespace", namespace),
            ("service account", service_account),
        ] {
            if segment.is_empty() || segment == "." || segment == ".." {
                return Err(fail(IdentityParseReason::EmptySegment(what)));
            }
            if let Some(c) = segment
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || ".-_".contains(*c)))
            {
                return Err(fail(IdentityParseReason::SegmentChar(what, c)));
            }
        }
        Ok(Identity {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_round_trips() {
        let text = "spiffe://cluster.local/ns/shop/sa/frontend";
        let id: Identity = text.parse().expect("valid");
        assert_eq!(id.trust_domain, "cluster.local");
        assert_eq!(id.namespace, "shop");
        assert_eq!(id.service_account, "frontend");
        assert_eq!(id.to_string(), text);
    }

    #[test]
    fn rejects_malformed_ids_naming_the_problem() {
        let cases = [
            (
                "https://cluster.local/ns/a/sa/b",
                IdentityParseReason::Scheme,
            ),
            (
                "spiffe:/cluster.local/ns/a/sa/b",
                IdentityParseReason::Scheme,
            ),
            ("", IdentityParseReason::Scheme),
            ("spiffe:///ns/a/sa/b", IdentityParseReason::EmptyTrustDomain),
            (
                "spiffe://Cluster.local/ns/a/sa/b",
                IdentityParseReason::TrustDomainChar('C'),
            ),
            ("spiffe://cluster.local", IdentityParseReason::Path),
            ("spiffe://cluster.local/ns/a", IdentityParseReason::Path),
            (
                "spiffe://cluster.local/ns/a/sa/b/",
                IdentityParseReason::Path,
            ),
            (
                "spiffe://cluster.local/sa/a/ns/b",
                IdentityParseReason::Path,
            ),
            (
                "spiffe://cluster.local/ns/a/sa/b/extra",
                IdentityParseReason::Path,
            ),
            (
                "spiffe://cluster.local/ns//sa/b",
                IdentityParseReason::EmptySegment("namespace"),
            ),
            (
                "spiffe://cluster.local/ns/a/sa/..",
                IdentityParseReason::EmptySegment("service account"),
            ),
            (
                "spiffe://cluster.local/ns/a b/sa/b",
                IdentityParseReason::SegmentChar("namespace", ' '),
            ),
            (
                "spiffe://cluster.local/ns/a/sa/b?x",
                IdentityParseReason::SegmentChar("service account", '?'),
            ),
        ];
        for (input, reason) in cases {
            let err = input.parse::<Identity>().expect_err(input);
            assert_eq!(err.reason, reason, "{input}");
            assert!(err.to_string().contains(&format!("{input:?}")), "{err}");
        }
    }
}
