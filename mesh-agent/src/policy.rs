//! L4 authorization policies, shaped like Istio's `AuthorizationPolicy` (security.istio.io/v1).
//!
//! ```yaml
//! authorizationPolicies:
//!   - name: backend-allow-frontend
//!     namespace: shop              # applies to workloads of `shop`; `trellis-system` = every workload
//!     selector:                    # optional; absent = every workload of the namespace
//!       matchLabels: {app: backend}
//!     action: ALLOW                # ALLOW (default) | DENY
//!     rules:
//!       - from:
//!           - source:
//!               principals: ["cluster.local/ns/shop/sa/frontend"]  # or spiffe://...; "*", "foo*", "*foo"
//!               notPrincipals: [...]
//!               namespaces: ["shop"]                                # same wildcards
//!               notNamespaces: [...]
//!               ipBlocks: ["10.0.0.0/8", "10.1.2.3"]                # CIDR or single IP
//!               notIpBlocks: [...]
//!         to:
//!           - operation:
//!               ports: ["8080"]
//!               notPorts: [...]
//! ```
//!
//! Semantics are Istio's:
//! - A policy applies to a workload when it is in the workload's namespace (or in
//!   [`ROOT_NAMESPACE`], then in every namespace) and its `matchLabels` are all among the
//!   workload's labels (no selector: every workload of the namespace).
//! - A policy matches a connection when any of its rules does. A rule matches when its `from`
//!   and its `to` both match; an absent or empty `from`/`to` matches anything, otherwise any one
//!   of the listed sources (operations) must match. Within a source (operation) every field
//!   given must match: a positive field when any listed value matches, a `not*` field when none
//!   does. So the rule `{}` matches every connection, while a policy without `rules` (or with
//!   `rules: []`, the same thing in Istio's proto3) matches none.
//! - Decision: any matching DENY policy denies (DENY wins); otherwise, if ALLOW policies apply
//!   to the workload, one of them must match or the connection is denied; if none applies, the
//!   connection is allowed.
//! - Principals are matched against the identity without `spiffe://`
//!   (`cluster.local/ns/shop/sa/frontend`); a policy may also spell them with `spiffe://`.
//!   Namespaces are matched against the identity's namespace. `*` alone matches any (non-empty)
//!   value, `foo*` is a prefix and `*foo` a suffix match; a `*` anywhere else is rejected rather
//!   than taken literally.
//! - A plaintext connection (no peer identity) matches no `principals`/`namespaces` value, and
//!   therefore *satisfies* `notPrincipals`/`notNamespaces`: this is Istio's (and Envoy's,
//!   ztunnel's) behaviour, see ISTIO-SECURITY-2021-004. Consequently `notNamespaces: [foo]` in
//!   an ALLOW policy also admits plaintext callers; to refuse plaintext, add a DENY policy with
//!   `notPrincipals: ["*"]` (or require `principals: ["*"]` in the ALLOW rules).
//! - HTTP (L7) fields (`methods`, `paths`, `hosts`, `requestPrincipals`, `when`, ...) are
//!   rejected at validation: ignoring a field of an authorization rule would make the rule
//!   broader than written.
//!
//! Validation compiles wildcards, CIDR blocks and ports once, so that [`evaluate`] (run per
//! connection) does not allocate unless it denies.
#![allow(dead_code)]

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::IpAddr,
    sync::Arc,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize, de::IgnoredAny};

use crate::{
    config::ConfigError,
    state::{Identity, Workload},
};

/// Policies in this namespace apply to the workloads of every namespace (Istio's root
/// namespace, `istio-system` there).
pub const ROOT_NAMESPACE: &str = "trellis-system";

/// Where the policies sit in the config file, for error paths.
const FIELD: &str = "authorizationPolicies";

// ---------------------------------------------------------------------------------------------
// The file's shape.
// ---------------------------------------------------------------------------------------------

/// One entry of `authorizationPolicies:` as written in the file.
///
/// Fields of Istio's API that Trellis does not implement are declared (as [`IgnoredAny`]) only
/// so that [`validate`] can reject them with a precise message rather than serde's generic
/// "unknown field".
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FilePolicy {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub selector: Option<FileSelector>,
    /// `ALLOW` or `DENY`; absent = `ALLOW`. A string so that validation names the field.
    #[serde(default)]
    pub action: Option<String>,
    #[serde(default)]
    pub rules: Option<Vec<FileRule>>,
    #[serde(default)]
    pub provider: Option<IgnoredAny>,
    #[serde(default)]
    pub target_ref: Option<IgnoredAny>,
    #[serde(default)]
    pub target_refs: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileRule {
    #[serde(default)]
    pub from: Vec<FileFrom>,
    #[serde(default)]
    pub to: Vec<FileTo>,
    #[serde(default)]
    pub when: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileFrom {
    #[serde(default)]
    pub source: Option<FileSource>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileSource {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    #[serde(default)]
    pub request_principals: Option<IgnoredAny>,
    #[serde(default)]
    pub not_request_principals: Option<IgnoredAny>,
    #[serde(default)]
    pub remote_ip_blocks: Option<IgnoredAny>,
    #[serde(default)]
    pub not_remote_ip_blocks: Option<IgnoredAny>,
    #[serde(default)]
    pub service_accounts: Option<IgnoredAny>,
    #[serde(default)]
    pub not_service_accounts: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileTo {
    #[serde(default)]
    pub operation: Option<FileOperation>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileOperation {
    #[serde(default)]
    pub ports: Vec<FilePort>,
    #[serde(default)]
    pub not_ports: Vec<FilePort>,
    #[serde(default)]
    pub hosts: Option<IgnoredAny>,
    #[serde(default)]
    pub not_hosts: Option<IgnoredAny>,
    #[serde(default)]
    pub methods: Option<IgnoredAny>,
    #[serde(default)]
    pub not_methods: Option<IgnoredAny>,
    #[serde(default)]
    pub paths: Option<IgnoredAny>,
    #[serde(default)]
    pub not_paths: Option<IgnoredAny>,
}

/// A port as written: a string like Istio (`"8080"`), or, leniently, a YAML number.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum FilePort {
    Number(i64),
    Text(String),
}

// ---------------------------------------------------------------------------------------------
// The validated, compiled form.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    Allow,
    Deny,
}

/// A validated policy, its matchers compiled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AuthorizationPolicy {
    pub name: String,
    pub namespace: String,
    /// Labels a workload must all carry; empty = every workload of the namespace.
    pub selector: BTreeMap<String, String>,
    pub action: Action,
    /// Empty (absent or `[]` in the file) = the policy matches no connection.
    pub rules: Vec<Rule>,
    /// `namespace/name`, shared with the decisions that cite this policy.
    #[serde(skip)]
    key: Arc<str>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Rule {
    /// Empty = any source.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<Source>,
    /// Empty = any operation.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<Operation>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Source {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<IpNet>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Operation {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<u16>,
}

/// A compiled Istio string pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StringMatch {
    /// `*`: any non-empty value.
    Any,
    Exact(String),
    /// `foo*`
    Prefix(String),
    /// `*foo`
    Suffix(String),
}

/// What is known of a connection when it is authorized.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionAttrs<'a> {
    /// The peer's authenticated identity; `None` for plaintext from outside the mesh.
    pub src_identity: Option<&'a Identity>,
    pub src_ip: IpAddr,
    /// The port the client connected to (the workload's port).
    pub dst_port: u16,
}

/// The outcome of [`evaluate`]. Policies are cited as `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow {
        /// The ALLOW policy that matched; `None` when no ALLOW policy applies to the workload.
        policy: Option<Arc<str>>,
    },
    Deny {
        /// The DENY policy that matched; `None` when denied because no ALLOW policy matched.
        policy: Option<Arc<str>>,
        reason: String,
    },
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }
}

// ---------------------------------------------------------------------------------------------
// Evaluation (per connection: no allocation unless denied).
// ---------------------------------------------------------------------------------------------

/// Evaluates every policy that selects `dst` (by namespace + labels) for this connection.
pub fn evaluate(
    policies: &[AuthorizationPolicy],
    dst: &Workload,
    conn: &ConnectionAttrs,
) -> Decision {
    // A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; policies name them as IPv4.
    let src_ip = conn.src_ip.to_canonical();
    let mut allow_policies = 0usize;
    let mut allowed_by: Option<&AuthorizationPolicy> = None;
    for policy in policies.iter().filter(|p| p.selects(dst)) {
        match policy.action {
            Action::Deny => {
                if policy.matches(conn.src_identity, src_ip, conn.dst_port) {
                    return Decision::Deny {
                        policy: Some(policy.key.clone()),
                        reason: format!("denied by DENY policy {}", policy.key),
                    };
                }
            }
            Action::Allow => {
                allow_policies += 1;
                if allowed_by.is_none() && policy.matches(conn.src_identity, src_ip, conn.dst_port)
                {
                    allowed_by = Some(policy);
                }
            }
        }
    }
    match allowed_by {
        Some(policy) => Decision::Allow {
            policy: Some(policy.key.clone()),
        },
        None if allow_policies == 0 => Decision::Allow { policy: None },
        None => Decision::Deny {
            policy: None,
            reason: format!(
                "none of the {allow_policies} ALLOW polic{} applying to {} matched",
                if allow_policies == 1 { "y" } else { "ies" },
                dst.key
            ),
        },
    }
}

impl AuthorizationPolicy {
    /// `namespace/name`.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Whether the policy applies to `dst`.
    pub fn selects(&self, dst: &Workload) -> bool {
        (self.namespace == ROOT_NAMESPACE || self.namespace == dst.key.namespace)
            && self
                .selector
                .iter()
                .all(|(k, v)| dst.labels.get(k) == Some(v))
    }

    /// Whether any rule matches (`src_ip` already canonical).
    fn matches(&self, id: Option<&Identity>, src_ip: IpAddr, dst_port: u16) -> bool {
        self.rules.iter().any(|r| r.matches(id, src_ip, dst_port))
    }
}

impl Rule {
    fn matches(&self, id: Option<&Identity>, src_ip: IpAddr, dst_port: u16) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(id, src_ip)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(dst_port)))
    }
}

impl Source {
    fn matches(&self, id: Option<&Identity>, src_ip: IpAddr) -> bool {
        let parts = id.map(principal_parts);
        // No identity: no principal or namespace matches (so `not*` fields are satisfied).
        let principal = |m: &StringMatch| parts.as_ref().is_some_and(|p| m.matches_parts(p));
        let namespace = |m: &StringMatch| id.is_some_and(|id| m.matches(&id.namespace));
        let ip = |net: &IpNet| net.contains(&src_ip);
        field_matches(&self.ip_blocks, &self.not_ip_blocks, ip)
            && field_matches(&self.namespaces, &self.not_namespaces, namespace)
            && field_matches(&self.principals, &self.not_principals, principal)
    }
}

impl Operation {
    fn matches(&self, dst_port: u16) -> bool {
        field_matches(&self.ports, &self.not_ports, |p| *p == dst_port)
    }
}

/// One field pair of a source/operation: any positive value (if listed) and no negative one.
fn field_matches<T>(positive: &[T], negative: &[T], matches: impl Fn(&T) -> bool) -> bool {
    (positive.is_empty() || positive.iter().any(&matches)) && !negative.iter().any(&matches)
}

/// An identity's principal `<td>/ns/<ns>/sa/<sa>` as its pieces, matched without formatting.
fn principal_parts(id: &Identity) -> [&str; 5] {
    [
        &id.trust_domain,
        "/ns/",
        &id.namespace,
        "/sa/",
        &id.service_account,
    ]
}

/// Whether the concatenation of `parts` starts with `prefix`.
fn parts_start_with(parts: &[&str], prefix: &str) -> bool {
    let mut rest = prefix.as_bytes();
    for part in parts {
        let part = part.as_bytes();
        let n = part.len().min(rest.len());
        if part[..n] != rest[..n] {
            return false;
        }
        rest = &rest[n..];
        if rest.is_empty() {
            return true;
        }
    }
    rest.is_empty()
}

/// Whether the concatenation of `parts` ends with `suffix`.
fn parts_end_with(parts: &[&str], suffix: &str) -> bool {
    let mut rest = suffix.as_bytes();
    for part in parts.iter().rev() {
        let part = part.as_bytes();
        let n = part.len().min(rest.len());
        if part[part.len() - n..] != rest[rest.len() - n..] {
            return false;
        }
        rest = &rest[..rest.len() - n];
        if rest.is_empty() {
            return true;
        }
    }
    rest.is_empty()
}

fn parts_len(parts: &[&str]) -> usize {
    parts.iter().map(|p| p.len()).sum()
}

impl StringMatch {
    /// Compiles an Istio pattern: `*`, `foo*`, `*foo` or an exact value.
    fn parse(pattern: &str) -> Result<Self, String> {
        if pattern.is_empty() {
            return Err("an empty value matches nothing; remove it".into());
        }
        if pattern == "*" {
            return Ok(StringMatch::Any);
        }
        let compiled = if let Some(suffix) = pattern.strip_prefix('*') {
            StringMatch::Suffix(suffix.to_string())
        } else if let Some(prefix) = pattern.strip_suffix('*') {
            StringMatch::Prefix(prefix.to_string())
        } else {
            StringMatch::Exact(pattern.to_string())
        };
        let inner = match &compiled {
            StringMatch::Any => "",
            StringMatch::Exact(s) | StringMatch::Prefix(s) | StringMatch::Suffix(s) => s,
        };
        if inner.contains('*') {
            return Err(format!(
                "{pattern:?}: `*` is only supported alone, as a prefix (\"*foo\") or as a suffix (\"foo*\")"
            ));
        }
        Ok(compiled)
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Any => !value.is_empty(),
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(p) => value.starts_with(p.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
        }
    }

    /// [`Self::matches`] against the concatenation of `parts`.
    fn matches_parts(&self, parts: &[&str]) -> bool {
        match self {
            StringMatch::Any => parts_len(parts) > 0,
            StringMatch::Exact(s) => parts_len(parts) == s.len() && parts_start_with(parts, s),
            StringMatch::Prefix(p) => parts_start_with(parts, p),
            StringMatch::Suffix(s) => parts_end_with(parts, s),
        }
    }
}

impl fmt::Display for StringMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StringMatch::Any => f.write_str("*"),
            StringMatch::Exact(s) => f.write_str(s),
            StringMatch::Prefix(p) => write!(f, "{p}*"),
            StringMatch::Suffix(s) => write!(f, "*{s}"),
        }
    }
}

impl Serialize for StringMatch {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

// ---------------------------------------------------------------------------------------------
// Validation.
// ---------------------------------------------------------------------------------------------

/// Validates and compiles the file's policies. Errors name the field
/// (`authorizationPolicies[0].rules[1].from[0].source.ipBlocks[2]`) and the bad value.
pub fn validate(file: Vec<FilePolicy>) -> Result<Vec<AuthorizationPolicy>, ConfigError> {
    let mut seen: HashMap<(String, String), usize> = HashMap::new();
    let mut policies = Vec::with_capacity(file.len());
    for (i, p) in file.into_iter().enumerate() {
        let at = format!("{FIELD}[{i}]");
        if !is_dns_subdomain(&p.name) {
            return Err(ConfigError::new(
                format!("{at}.name"),
                format!(
                    "{:?} is not a DNS-1123 name (lower-case letters, digits, '-', '.')",
                    p.name
                ),
            ));
        }
        if !is_dns_label(&p.namespace) {
            return Err(ConfigError::new(
                format!("{at}.namespace"),
                format!(
                    "{:?} is not a DNS-1123 label (lower-case letters, digits, '-')",
                    p.namespace
                ),
            ));
        }
        if let Some(first) = seen.insert((p.namespace.clone(), p.name.clone()), i) {
            return Err(ConfigError::new(
                format!("{at}.name"),
                format!(
                    "policy {}/{} is already defined at {FIELD}[{first}]",
                    p.namespace, p.name
                ),
            ));
        }
        for (field, present) in [
            ("provider", p.provider.is_some()),
            ("targetRef", p.target_ref.is_some()),
            ("targetRefs", p.target_refs.is_some()),
        ] {
            if present {
                return Err(ConfigError::new(
                    format!("{at}.{field}"),
                    format!(
                        "`{field}` is not supported; select workloads with `selector.matchLabels`"
                    ),
                ));
            }
        }
        let action = match p.action.as_deref() {
            None | Some("ALLOW") => Action::Allow,
            Some("DENY") => Action::Deny,
            Some(other @ ("AUDIT" | "CUSTOM")) => {
                return Err(ConfigError::new(
                    format!("{at}.action"),
                    format!("action {other} is not supported (only ALLOW and DENY)"),
                ));
            }
            Some(other) => {
                return Err(ConfigError::new(
                    format!("{at}.action"),
                    format!("{other:?} is not an action (ALLOW or DENY)"),
                ));
            }
        };
        let selector = p.selector.map(|s| s.match_labels).unwrap_or_default();
        if let Some(key) = selector.keys().find(|k| k.is_empty()) {
            return Err(ConfigError::new(
                format!("{at}.selector.matchLabels"),
                format!("label key {key:?} must not be empty"),
            ));
        }
        let mut rules = Vec::new();
        for (r, rule) in p.rules.unwrap_or_default().into_iter().enumerate() {
            rules.push(validate_rule(rule, &format!("{at}.rules[{r}]"))?);
        }
        let key: Arc<str> = format!("{}/{}", p.namespace, p.name).into();
        policies.push(AuthorizationPolicy {
            name: p.name,
            namespace: p.namespace,
            selector,
            action,
            rules,
            key,
        });
    }
    Ok(policies)
}

fn unsupported(at: &str, field: &str, why: &str) -> ConfigError {
    ConfigError::new(
        format!("{at}.{field}"),
        format!(
            "`{field}` is not supported yet ({why}); Trellis authorizes connections at L4 only, \
             and ignoring the field would make the rule match more than written"
        ),
    )
}

fn validate_rule(rule: FileRule, at: &str) -> Result<Rule, ConfigError> {
    if rule.when.is_some() {
        return Err(unsupported(at, "when", "conditions"));
    }
    let mut from = Vec::with_capacity(rule.from.len());
    for (f, entry) in rule.from.into_iter().enumerate() {
        let at = format!("{at}.from[{f}]");
        let source = entry
            .source
            .ok_or_else(|| ConfigError::new(&at, "must have a `source`"))?;
        from.push(validate_source(source, &format!("{at}.source"))?);
    }
    let mut to = Vec::with_capacity(rule.to.len());
    for (t, entry) in rule.to.into_iter().enumerate() {
        let at = format!("{at}.to[{t}]");
        let operation = entry
            .operation
            .ok_or_else(|| ConfigError::new(&at, "must have an `operation`"))?;
        to.push(validate_operation(operation, &format!("{at}.operation"))?);
    }
    Ok(Rule { from, to })
}

fn validate_source(s: FileSource, at: &str) -> Result<Source, ConfigError> {
    for (field, present, why) in [
        (
            "requestPrincipals",
            s.request_principals.is_some(),
            "needs request (JWT) authentication",
        ),
        (
            "notRequestPrincipals",
            s.not_request_principals.is_some(),
            "needs request (JWT) authentication",
        ),
        (
            "remoteIpBlocks",
            s.remote_ip_blocks.is_some(),
            "needs X-Forwarded-For or PROXY protocol; use ipBlocks",
        ),
        (
            "notRemoteIpBlocks",
            s.not_remote_ip_blocks.is_some(),
            "needs X-Forwarded-For or PROXY protocol; use notIpBlocks",
        ),
        (
            "serviceAccounts",
            s.service_accounts.is_some(),
            "use principals",
        ),
        (
            "notServiceAccounts",
            s.not_service_accounts.is_some(),
            "use notPrincipals",
        ),
    ] {
        if present {
            return Err(unsupported(at, field, why));
        }
    }
    let source = Source {
        principals: patterns(&s.principals, &format!("{at}.principals"), true)?,
        not_principals: patterns(&s.not_principals, &format!("{at}.notPrincipals"), true)?,
        namespaces: patterns(&s.namespaces, &format!("{at}.namespaces"), false)?,
        not_namespaces: patterns(&s.not_namespaces, &format!("{at}.notNamespaces"), false)?,
        ip_blocks: ip_blocks(&s.ip_blocks, &format!("{at}.ipBlocks"))?,
        not_ip_blocks: ip_blocks(&s.not_ip_blocks, &format!("{at}.notIpBlocks"))?,
    };
    if source == Source::default() {
        // Istio rejects an empty source too: it is most likely a mistake, and whether it should
        // match everything or nothing is not obvious.
        return Err(ConfigError::new(
            at,
            "must set at least one of principals, notPrincipals, namespaces, notNamespaces, ipBlocks, notIpBlocks",
        ));
    }
    Ok(source)
}

fn validate_operation(o: FileOperation, at: &str) -> Result<Operation, ConfigError> {
    for (field, present) in [
        ("hosts", o.hosts.is_some()),
        ("notHosts", o.not_hosts.is_some()),
        ("methods", o.methods.is_some()),
        ("notMethods", o.not_methods.is_some()),
        ("paths", o.paths.is_some()),
        ("notPaths", o.not_paths.is_some()),
    ] {
        if present {
            return Err(unsupported(at, field, "an HTTP (L7) field"));
        }
    }
    let operation = Operation {
        ports: ports(&o.ports, &format!("{at}.ports"))?,
        not_ports: ports(&o.not_ports, &format!("{at}.notPorts"))?,
    };
    if operation == Operation::default() {
        return Err(ConfigError::new(at, "must set ports or notPorts"));
    }
    Ok(operation)
}

/// Compiles principal (`principal` = strip `spiffe://`) or namespace patterns.
fn patterns(values: &[String], at: &str, principal: bool) -> Result<Vec<StringMatch>, ConfigError> {
    values
        .iter()
        .enumerate()
        .map(|(i, value)| {
            let pattern = if principal {
                value.strip_prefix("spiffe://").unwrap_or(value)
            } else {
                value
            };
            StringMatch::parse(pattern).map_err(|e| ConfigError::new(format!("{at}[{i}]"), e))
        })
        .collect()
}

fn ip_blocks(values: &[String], at: &str) -> Result<Vec<IpNet>, ConfigError> {
    values
        .iter()
        .enumerate()
        .map(|(i, value)| {
            let net = value
                .parse::<IpNet>()
                .or_else(|_| value.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    ConfigError::new(
                        format!("{at}[{i}]"),
                        format!("{value:?} is not a CIDR block or IP address"),
                    )
                })?;
            Ok(canonical_net(net))
        })
        .collect()
}

/// Host bits cleared (as Envoy does), and IPv4-mapped IPv6 blocks as IPv4 (connections are
/// matched on canonical addresses).
fn canonical_net(net: IpNet) -> IpNet {
    let net = net.trunc();
    if let IpNet::V6(v6) = net
        && let Some(v4) = v6.addr().to_ipv4_mapped()
        && v6.prefix_len() >= 96
        && let Ok(v4net) = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
    {
        return IpNet::V4(v4net);
    }
    net
}

fn ports(values: &[FilePort], at: &str) -> Result<Vec<u16>, ConfigError> {
    values
        .iter()
        .enumerate()
        .map(|(i, value)| {
            let port = match value {
                FilePort::Number(n) => u16::try_from(*n).ok(),
                FilePort::Text(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
                    s.parse::<u16>().ok()
                }
                FilePort::Text(_) => None,
            };
            match port {
                Some(p) if p != 0 => Ok(p),
                _ => {
                    let shown = match value {
                        FilePort::Number(n) => n.to_string(),
                        FilePort::Text(s) => format!("{s:?}"),
                    };
                    Err(ConfigError::new(
                        format!("{at}[{i}]"),
                        format!("{shown} is not a port number (1-65535)"),
                    ))
                }
            }
        })
        .collect()
}

/// A DNS-1123 label, as Kubernetes requires for namespaces.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS-1123 subdomain, as Kubernetes requires for object names.
fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, path::PathBuf};

    use super::*;
    use crate::state::PodKey;

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Doc {
        authorization_policies: Vec<FilePolicy>,
    }

    fn parse(yaml: &str) -> Result<Vec<AuthorizationPolicy>, ConfigError> {
        let doc: Doc = serde_yaml::from_str(yaml).expect("well-formed YAML");
        validate(doc.authorization_policies)
    }

    fn parse_ok(yaml: &str) -> Vec<AuthorizationPolicy> {
        parse(yaml).unwrap_or_else(|e| panic!("{e}"))
    }

    fn field_of(yaml: &str) -> String {
        match parse(yaml) {
            Ok(_) => panic!("accepted:\n{yaml}"),
            Err(e) => {
                assert!(!e.message.is_empty());
                e.field
            }
        }
    }

    fn identity(ns: &str, sa: &str) -> Identity {
        Identity {
            trust_domain: "cluster.local".into(),
            namespace: ns.into(),
            service_account: sa.into(),
        }
    }

    fn workload(ns: &str, name: &str, labels: &[(&str, &str)]) -> Workload {
        Workload {
            key: PodKey {
                namespace: ns.into(),
                name: name.into(),
            },
            service_account: name.into(),
            ip: IpAddr::V4(Ipv4Addr::new(10, 61, 0, 9)),
            node: "n1".into(),
            netns: PathBuf::new(),
            cgroup: PathBuf::new(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            enrolled: true,
            identity: identity(ns, name),
        }
    }

    fn backend() -> Workload {
        workload("shop", "backend", &[("app", "backend")])
    }

    /// Evaluates for `dst` a connection from `id` (None: plaintext) at `ip` to `port`.
    fn eval(
        policies: &[AuthorizationPolicy],
        dst: &Workload,
        id: Option<&Identity>,
        ip: &str,
        port: u16,
    ) -> Decision {
        evaluate(
            policies,
            dst,
            &ConnectionAttrs {
                src_identity: id,
                src_ip: ip.parse().expect("ip"),
                dst_port: port,
            },
        )
    }

    fn allowed(
        policies: &[AuthorizationPolicy],
        id: Option<&Identity>,
        ip: &str,
        port: u16,
    ) -> bool {
        eval(policies, &backend(), id, ip, port).is_allowed()
    }

    /// One ALLOW policy for shop/backend with the given `source` and `to` lines.
    fn allow_from(source: &str) -> Vec<AuthorizationPolicy> {
        parse_ok(&format!(
            "authorizationPolicies:\n- name: p\n  namespace: shop\n  rules:\n  - from:\n    - source: {source}\n"
        ))
    }

    const EXAMPLE: &str = r#"
authorizationPolicies:
  - name: backend-allow-frontend
    namespace: shop
    selector:
      matchLabels: {app: backend}
    action: ALLOW
    rules:
      - from:
          - source:
              principals: ["cluster.local/ns/shop/sa/frontend"]
              notPrincipals: ["cluster.local/ns/shop/sa/evil"]
              namespaces: ["shop"]
              notNamespaces: ["kube-*"]
              ipBlocks: ["10.0.0.0/8", "10.1.2.3"]
              notIpBlocks: ["10.9.0.0/16"]
        to:
          - operation:
              ports: ["8080"]
              notPorts: ["9090"]
"#;

    #[test]
    fn parses_the_documented_example() {
        let policies = parse_ok(EXAMPLE);
        assert_eq!(policies.len(), 1);
        let p = &policies[0];
        assert_eq!(p.key(), "shop/backend-allow-frontend");
        assert_eq!(p.action, Action::Allow);
        assert_eq!(p.selector.get("app").map(String::as_str), Some("backend"));
        let source = &p.rules[0].from[0];
        assert_eq!(
            source.principals,
            [StringMatch::Exact(
                "cluster.local/ns/shop/sa/frontend".into()
            )]
        );
        assert_eq!(source.not_namespaces, [StringMatch::Prefix("kube-".into())]);
        assert_eq!(
            source.ip_blocks,
            [
                "10.0.0.0/8".parse::<IpNet>().unwrap(),
                "10.1.2.3/32".parse().unwrap()
            ]
        );
        assert_eq!(
            p.rules[0].to[0],
            Operation {
                ports: vec![8080],
                not_ports: vec![9090]
            }
        );
        // And it serializes back in the same vocabulary.
        let json = serde_json::to_value(p).expect("serialize");
        assert_eq!(json["action"], "ALLOW");
        assert_eq!(json["rules"][0]["from"][0]["not_namespaces"][0], "kube-*");

        let frontend = identity("shop", "frontend");
        assert_eq!(
            eval(&policies, &backend(), Some(&frontend), "10.1.2.3", 8080),
            Decision::Allow {
                policy: Some("shop/backend-allow-frontend".into())
            }
        );
        assert!(!allowed(&policies, Some(&frontend), "10.1.2.3", 9090));
        assert!(!allowed(&policies, Some(&frontend), "10.9.0.1", 8080));
        assert!(!allowed(
            &policies,
            Some(&identity("shop", "other")),
            "10.1.2.3",
            8080
        ));
        assert!(!allowed(&policies, None, "10.1.2.3", 8080));
    }

    #[test]
    fn action_defaults_to_allow_and_accepts_numeric_ports() {
        let p = parse_ok(
            "authorizationPolicies:\n- {name: p, namespace: shop, rules: [{to: [{operation: {ports: [8080, '81']}}]}]}\n",
        );
        assert_eq!(p[0].action, Action::Allow);
        assert_eq!(p[0].rules[0].to[0].ports, [8080, 81]);
    }

    #[test]
    fn bad_values_name_the_field() {
        let ip = "authorizationPolicies:\n- name: p\n  namespace: shop\n  rules:\n  - {}\n  - from:\n    - source: {ipBlocks: [10.0.0.0/8, 10.1.2.3, 10.0.0.300/8]}\n";
        assert_eq!(
            field_of(ip),
            "authorizationPolicies[0].rules[1].from[0].source.ipBlocks[2]"
        );
        let err = parse(ip).unwrap_err();
        assert!(err.message.contains("10.0.0.300/8"), "{err}");

        let not_ip = "authorizationPolicies:\n- name: p\n  namespace: shop\n  rules:\n  - from:\n    - source: {notIpBlocks: [fish]}\n";
        assert_eq!(
            field_of(not_ip),
            "authorizationPolicies[0].rules[0].from[0].source.notIpBlocks[0]"
        );

        for bad in [
            "'0'", "'65536'", "'80-90'", "' 80'", "'+80'", "''", "-1", "70000",
        ] {
            let port = format!(
                "authorizationPolicies:\n- name: p\n  namespace: shop\n  rules:\n  - to:\n    - operation: {{ports: ['80', {bad}]}}\n"
            );
            assert_eq!(
                field_of(&port),
                "authorizationPolicies[0].rules[0].to[0].operation.ports[1]",
                "{bad}"
            );
        }
        let not_port = "authorizationPolicies:\n- name: p\n  namespace: shop\n  rules:\n  - to:\n    - operation: {notPorts: [http]}\n";
        assert_eq!(
            field_of(not_port),
            "authorizationPolicies[0].rules[0].to[0].operation.notPorts[0]"
        );
        assert!(parse(not_port).unwrap_err().message.contains("\"http\""));

        let action = "authorizationPolicies:\n- {name: a, namespace: shop}\n- {name: b, namespace: shop, action: REJECT}\n";
        assert_eq!(field_of(action), "authorizationPolicies[1].action");
        assert!(parse(action).unwrap_err().message.contains("REJECT"));
        let audit = "authorizationPolicies:\n- {name: a, namespace: shop, action: AUDIT}\n";
        assert_eq!(field_of(audit), "authorizationPolicies[0].action");
        let lower = "authorizationPolicies:\n- {name: a, namespace: shop, action: allow}\n";
        assert_eq!(field_of(lower), "authorizationPolicies[0].action");

        let wildcard = "authorizationPolicies:\n- name: p\n  namespace: shop\n  rules:\n  - from:\n    - source: {principals: ['cluster.local/ns/*/sa/x']}\n";
        assert_eq!(
            field_of(wildcard),
            "authorizationPolicies[0].rules[0].from[0].source.principals[0]"
        );
        let empty = "authorizationPolicies:\n- name: p\n  namespace: shop\n  rules:\n  - from:\n    - source: {namespaces: [shop, '']}\n";
        assert_eq!(
            field_of(empty),
            "authorizationPolicies[0].rules[0].from[0].source.namespaces[1]"
        );

        assert_eq!(
            field_of("authorizationPolicies:\n- {name: Bad_Name, namespace: shop}\n"),
            "authorizationPolicies[0].name"
        );
        assert_eq!(
            field_of("authorizationPolicies:\n- {name: p, namespace: 'shop.x'}\n"),
            "authorizationPolicies[0].namespace"
        );
    }

    #[test]
    fn l7_and_other_unsupported_fields_are_rejected() {
        let cases = [
            (
                "to:\n    - operation: {methods: [GET]}",
                "rules[0].to[0].operation.methods",
            ),
            (
                "to:\n    - operation: {ports: ['80'], paths: [/admin]}",
                "rules[0].to[0].operation.paths",
            ),
            (
                "to:\n    - operation: {hosts: [a.example]}",
                "rules[0].to[0].operation.hosts",
            ),
            (
                "to:\n    - operation: {notMethods: [GET]}",
                "rules[0].to[0].operation.notMethods",
            ),
            (
                "from:\n    - source: {requestPrincipals: ['*']}",
                "rules[0].from[0].source.requestPrincipals",
            ),
            (
                "from:\n    - source: {remoteIpBlocks: [1.2.3.4]}",
                "rules[0].from[0].source.remoteIpBlocks",
            ),
            (
                "when:\n    - {key: 'request.headers[x]', values: [y]}",
                "rules[0].when",
            ),
        ];
        for (rule, field) in cases {
            let yaml = format!(
                "authorizationPolicies:\n- name: p\n  namespace: shop\n  rules:\n  - {rule}\n"
            );
            let err = parse(&yaml).unwrap_err();
            assert_eq!(
                err.field,
                format!("authorizationPolicies[0].{field}"),
                "{rule}"
            );
            assert!(err.message.contains("not supported"), "{err}");
        }
        let err = parse("authorizationPolicies:\n- {name: p, namespace: shop, action: CUSTOM, provider: {name: x}}\n").unwrap_err();
        assert_eq!(err.field, "authorizationPolicies[0].provider");
        // Unknown (non-Istio) fields are refused by serde.
        let doc: Result<Doc, _> = serde_yaml::from_str(
            "authorizationPolicies:\n- {name: p, namespace: shop, rulez: []}\n",
        );
        assert!(doc.is_err());
    }

    #[test]
    fn empty_source_or_operation_is_rejected() {
        let yaml = "authorizationPolicies:\n- name: p\n  namespace: shop\n  rules:\n  - from:\n    - source: {}\n";
        assert_eq!(
            field_of(yaml),
            "authorizationPolicies[0].rules[0].from[0].source"
        );
        let yaml =
            "authorizationPolicies:\n- name: p\n  namespace: shop\n  rules:\n  - from:\n    - {}\n";
        assert_eq!(field_of(yaml), "authorizationPolicies[0].rules[0].from[0]");
        let yaml = "authorizationPolicies:\n- name: p\n  namespace: shop\n  rules:\n  - to:\n    - operation: {ports: []}\n";
        assert_eq!(
            field_of(yaml),
            "authorizationPolicies[0].rules[0].to[0].operation"
        );
    }

    #[test]
    fn duplicate_policy_is_rejected() {
        let yaml = "authorizationPolicies:\n- {name: p, namespace: shop}\n- {name: p, namespace: other}\n- {name: p, namespace: shop}\n";
        let err = parse(yaml).unwrap_err();
        assert_eq!(err.field, "authorizationPolicies[2].name");
        assert!(
            err.message.contains("shop/p") && err.message.contains("[0]"),
            "{err}"
        );
    }

    #[test]
    fn no_policy_allows() {
        assert_eq!(
            eval(&[], &backend(), None, "1.2.3.4", 80),
            Decision::Allow { policy: None }
        );
        // A policy of another namespace does not apply either.
        let other = parse_ok("authorizationPolicies:\n- {name: lockdown, namespace: pay}\n");
        assert_eq!(
            eval(&other, &backend(), None, "1.2.3.4", 80),
            Decision::Allow { policy: None }
        );
    }

    #[test]
    fn allow_without_rules_denies_and_rule_braces_allow() {
        let lockdown = parse_ok("authorizationPolicies:\n- {name: lockdown, namespace: shop}\n");
        let d = eval(
            &lockdown,
            &backend(),
            Some(&identity("shop", "frontend")),
            "10.0.0.1",
            80,
        );
        assert!(matches!(d, Decision::Deny { policy: None, .. }), "{d:?}");
        let empty_list =
            parse_ok("authorizationPolicies:\n- {name: lockdown, namespace: shop, rules: []}\n");
        assert!(!allowed(&empty_list, None, "10.0.0.1", 80));

        let open =
            parse_ok("authorizationPolicies:\n- {name: open, namespace: shop, rules: [{}]}\n");
        assert_eq!(
            eval(&open, &backend(), None, "10.0.0.1", 80),
            Decision::Allow {
                policy: Some("shop/open".into())
            }
        );
        // A DENY without rules never matches.
        let deny_nothing =
            parse_ok("authorizationPolicies:\n- {name: d, namespace: shop, action: DENY}\n");
        assert_eq!(
            eval(&deny_nothing, &backend(), None, "10.0.0.1", 80),
            Decision::Allow { policy: None }
        );
    }

    #[test]
    fn deny_wins_over_allow() {
        let yaml = "authorizationPolicies:\n\
            - {name: open, namespace: shop, rules: [{}]}\n\
            - {name: no-admin, namespace: shop, action: DENY, rules: [{to: [{operation: {ports: ['9000']}}]}]}\n";
        let policies = parse_ok(yaml);
        let d = eval(&policies, &backend(), None, "10.0.0.1", 9000);
        match d {
            Decision::Deny { policy, reason } => {
                assert_eq!(policy.as_deref(), Some("shop/no-admin"));
                assert!(reason.contains("shop/no-admin"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(allowed(&policies, None, "10.0.0.1", 8080));
    }

    #[test]
    fn allow_with_no_match_denies() {
        let policies = allow_from("{principals: [cluster.local/ns/shop/sa/frontend]}");
        let d = eval(
            &policies,
            &backend(),
            Some(&identity("shop", "intruder")),
            "10.0.0.1",
            80,
        );
        match d {
            Decision::Deny {
                policy: None,
                reason,
            } => assert!(reason.contains("shop/backend"), "{reason}"),
            other => panic!("{other:?}"),
        }
        // Any one matching ALLOW policy suffices.
        let yaml = "authorizationPolicies:\n\
            - {name: a, namespace: shop, rules: [{from: [{source: {namespaces: [pay]}}]}]}\n\
            - {name: b, namespace: shop, rules: [{from: [{source: {namespaces: [shop]}}]}]}\n";
        assert_eq!(
            eval(
                &parse_ok(yaml),
                &backend(),
                Some(&identity("shop", "x")),
                "10.0.0.1",
                80
            ),
            Decision::Allow {
                policy: Some("shop/b".into())
            }
        );
    }

    #[test]
    fn selector_scopes_policies() {
        let policies = parse_ok(
            "authorizationPolicies:\n- {name: lockdown, namespace: shop, selector: {matchLabels: {app: db}}}\n",
        );
        assert!(
            allowed(&policies, None, "10.0.0.1", 80),
            "labels differ: policy does not apply"
        );
        let db = workload("shop", "db", &[("app", "db"), ("tier", "data")]);
        assert!(!eval(&policies, &db, None, "10.0.0.1", 80).is_allowed());
        // Every selector label must be present with the same value.
        let two = parse_ok(
            "authorizationPolicies:\n- {name: l, namespace: shop, selector: {matchLabels: {app: db, tier: web}}}\n",
        );
        assert!(eval(&two, &db, None, "10.0.0.1", 80).is_allowed());
        let unlabelled = workload("shop", "bare", &[]);
        assert!(eval(&policies, &unlabelled, None, "10.0.0.1", 80).is_allowed());
    }

    #[test]
    fn namespace_and_root_namespace_scoping() {
        let ns = parse_ok("authorizationPolicies:\n- {name: lockdown, namespace: shop}\n");
        let pay = workload("pay", "api", &[("app", "backend")]);
        assert!(!allowed(&ns, None, "10.0.0.1", 80));
        assert!(eval(&ns, &pay, None, "10.0.0.1", 80).is_allowed());

        let root = parse_ok(&format!(
            "authorizationPolicies:\n- {{name: no-telnet, namespace: {ROOT_NAMESPACE}, action: DENY, rules: [{{to: [{{operation: {{ports: ['23']}}}}]}}]}}\n\
             - {{name: backend-only, namespace: {ROOT_NAMESPACE}, selector: {{matchLabels: {{app: backend}}}}}}\n"
        ));
        assert_eq!(
            eval(&root, &workload("pay", "x", &[]), None, "10.0.0.1", 23),
            Decision::Deny {
                policy: Some(format!("{ROOT_NAMESPACE}/no-telnet").into()),
                reason: format!("denied by DENY policy {ROOT_NAMESPACE}/no-telnet")
            }
        );
        assert!(eval(&root, &workload("pay", "x", &[]), None, "10.0.0.1", 80).is_allowed());
        // The root policy's selector applies across namespaces.
        assert!(!eval(&root, &pay, None, "10.0.0.1", 80).is_allowed());
        assert!(!eval(&root, &backend(), None, "10.0.0.1", 80).is_allowed());
    }

    #[test]
    fn principal_wildcards_and_spiffe_form() {
        let frontend = identity("shop", "frontend");
        let other_td = Identity {
            trust_domain: "example.org".into(),
            ..frontend.clone()
        };
        let cases: &[(&str, &Identity, bool)] = &[
            ("cluster.local/ns/shop/sa/frontend", &frontend, true),
            (
                "spiffe://cluster.local/ns/shop/sa/frontend",
                &frontend,
                true,
            ),
            ("cluster.local/ns/shop/sa/frontend", &other_td, false),
            ("cluster.local/ns/shop/sa/front", &frontend, false),
            ("cluster.local/ns/shop/sa/frontendx", &frontend, false),
            ("cluster.local/ns/shop/*", &frontend, true),
            ("cluster.local/ns/sh*", &frontend, true),
            ("cluster.lo*", &frontend, true),
            ("spiffe://cluster.local/ns/pay/*", &frontend, false),
            ("*/sa/frontend", &frontend, true),
            ("*/sa/frontend", &other_td, true),
            ("*ns/shop/sa/frontend", &frontend, true),
            ("*l/ns/shop/sa/frontend", &frontend, true),
            ("*xcluster.local/ns/shop/sa/frontend", &frontend, false),
            ("*/sa/backend", &frontend, false),
            ("*", &frontend, true),
            ("spiffe://*", &frontend, true),
        ];
        for (pattern, id, expect) in cases {
            let policies = allow_from(&format!("{{principals: ['{pattern}']}}"));
            assert_eq!(
                allowed(&policies, Some(id), "10.0.0.1", 80),
                *expect,
                "{pattern} vs {id}"
            );
        }
    }

    #[test]
    fn plaintext_and_principals() {
        // No identity matches no principal, not even "*".
        for pattern in ["*", "cluster.local/*", "*/sa/frontend"] {
            let policies = allow_from(&format!("{{principals: ['{pattern}']}}"));
            assert!(!allowed(&policies, None, "10.0.0.1", 80), "{pattern}");
        }
        // Istio semantics: a connection without identity satisfies notPrincipals/notNamespaces.
        let policies = allow_from("{notPrincipals: [cluster.local/ns/shop/sa/evil]}");
        assert!(allowed(&policies, None, "10.0.0.1", 80));
        assert!(allowed(
            &policies,
            Some(&identity("shop", "good")),
            "10.0.0.1",
            80
        ));
        assert!(!allowed(
            &policies,
            Some(&identity("shop", "evil")),
            "10.0.0.1",
            80
        ));
        let policies = allow_from("{notNamespaces: [pay]}");
        assert!(allowed(&policies, None, "10.0.0.1", 80));
        // ...which is why refusing plaintext takes a DENY with notPrincipals: ["*"].
        let deny_plaintext = parse_ok(
            "authorizationPolicies:\n- {name: mtls-only, namespace: shop, action: DENY, rules: [{from: [{source: {notPrincipals: ['*']}}]}]}\n",
        );
        assert!(!allowed(&deny_plaintext, None, "10.0.0.1", 80));
        assert!(allowed(
            &deny_plaintext,
            Some(&identity("pay", "x")),
            "10.0.0.1",
            80
        ));
    }

    #[test]
    fn namespaces() {
        let policies =
            allow_from("{namespaces: [shop, 'pay-*', '*-system'], notNamespaces: [pay-legacy]}");
        for (ns, expect) in [
            ("shop", true),
            ("shopping", false),
            ("pay-eu", true),
            ("pay-legacy", false),
            ("kube-system", true),
            ("pay", false),
        ] {
            assert_eq!(
                allowed(&policies, Some(&identity(ns, "x")), "10.0.0.1", 80),
                expect,
                "{ns}"
            );
        }
        let any = allow_from("{namespaces: ['*']}");
        assert!(allowed(&any, Some(&identity("z", "x")), "10.0.0.1", 80));
        assert!(!allowed(&any, None, "10.0.0.1", 80));
    }

    #[test]
    fn ip_blocks() {
        let policies = allow_from(
            "{ipBlocks: [10.0.0.0/8, 192.168.1.7, 'fd00::/8'], notIpBlocks: [10.66.0.0/16, 10.1.2.3]}",
        );
        for (ip, expect) in [
            ("10.1.1.1", true),
            ("10.66.3.4", false),
            ("10.1.2.3", false),
            ("10.1.2.4", true),
            ("192.168.1.7", true),
            ("192.168.1.8", false),
            ("11.0.0.1", false),
            ("fd00::5", true),
            ("fe80::1", false),
            // IPv4-mapped peers (dual-stack sockets) are matched as IPv4.
            ("::ffff:10.1.1.1", true),
            ("::ffff:10.1.2.3", false),
        ] {
            assert_eq!(allowed(&policies, None, ip, 80), expect, "{ip}");
        }
        // Host bits are cleared, and IPv4-mapped blocks match IPv4 peers.
        let p = allow_from("{ipBlocks: ['10.1.2.3/16', '::ffff:172.16.0.0/108']}");
        assert_eq!(
            p[0].rules[0].from[0].ip_blocks[0],
            "10.1.0.0/16".parse::<IpNet>().unwrap()
        );
        assert!(allowed(&p, None, "172.16.3.4", 80));
        // Fields of one source are ANDed; sources of one rule ORed.
        let and = allow_from("{ipBlocks: [10.0.0.0/8], namespaces: [shop]}");
        assert!(allowed(&and, Some(&identity("shop", "a")), "10.0.0.1", 80));
        assert!(!allowed(&and, Some(&identity("shop", "a")), "11.0.0.1", 80));
        assert!(!allowed(&and, None, "10.0.0.1", 80));
        let or = parse_ok(
            "authorizationPolicies:\n- name: p\n  namespace: shop\n  rules:\n  - from:\n    - source: {ipBlocks: [10.0.0.0/8]}\n    - source: {namespaces: [shop]}\n",
        );
        assert!(allowed(&or, None, "10.0.0.1", 80));
        assert!(allowed(&or, Some(&identity("shop", "a")), "11.0.0.1", 80));
        assert!(!allowed(&or, Some(&identity("pay", "a")), "11.0.0.1", 80));
    }

    #[test]
    fn ports_and_not_ports() {
        let yaml = "authorizationPolicies:\n- name: p\n  namespace: shop\n  rules:\n  - to:\n    - operation: {ports: ['8080', '8443']}\n    - operation: {notPorts: ['1', '2', '8080', '8443', '9000']}\n";
        let policies = parse_ok(yaml);
        // 8080/8443 by the first operation; anything but the listed by the second.
        for (port, expect) in [
            (8080, true),
            (8443, true),
            (9000, false),
            (1, false),
            (3, true),
        ] {
            assert_eq!(allowed(&policies, None, "10.0.0.1", port), expect, "{port}");
        }
        // `from` and `to` must both match.
        let both = parse_ok(
            "authorizationPolicies:\n- name: p\n  namespace: shop\n  rules:\n  - from: [{source: {namespaces: [shop]}}]\n    to: [{operation: {ports: ['80']}}]\n",
        );
        assert!(allowed(&both, Some(&identity("shop", "a")), "10.0.0.1", 80));
        assert!(!allowed(
            &both,
            Some(&identity("shop", "a")),
            "10.0.0.1",
            81
        ));
        assert!(!allowed(&both, Some(&identity("pay", "a")), "10.0.0.1", 80));
    }

    #[test]
    fn parts_matching_agrees_with_string_matching() {
        let id = identity("shop", "frontend");
        let full = "cluster.local/ns/shop/sa/frontend";
        let parts = principal_parts(&id);
        for i in 0..=full.len() {
            let (head, tail) = full.split_at(i);
            assert!(parts_start_with(&parts, head), "{head}");
            assert!(parts_end_with(&parts, tail), "{tail}");
            let mut wrong = head.to_string();
            wrong.push('#');
            assert!(!parts_start_with(&parts, &wrong), "{wrong}");
            let wrong = format!("#{tail}");
            assert!(!parts_end_with(&parts, &wrong), "{wrong}");
        }
        assert!(StringMatch::Exact(full.into()).matches_parts(&parts));
        assert!(!StringMatch::Exact(full[1..].into()).matches_parts(&parts));
    }
}
