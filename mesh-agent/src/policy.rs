//! Authorization policies, shaped like Istio's `AuthorizationPolicy` (security.istio.io/v1):
//! connection (L4) fields and HTTP request (L7) fields.
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
//!               methods: ["GET", "HEAD"]                 # HTTP; upper case, same wildcards
//!               notMethods: [...]
//!               paths: ["/api/*", "*.png", "/healthz"]   # HTTP; "/..." exact or prefix, "*suffix", "*"
//!               notPaths: [...]
//!               hosts: ["shop.example", "*.shop.example"] # HTTP; case-insensitive, see below for ports
//!               notHosts: [...]
//!         when:                                          # every condition must hold
//!           - key: request.headers[x-user]               # HTTP; the name without quotes
//!             values: ["alice", "bob-*"]                 # "*" = the header is present
//!             notValues: [...]
//!           - key: source.ip                             # also source.namespace, source.principal,
//!             notValues: ["10.9.0.0/16"]                 # destination.port (as the fields above)
//! ```
//!
//! Semantics are Istio's:
//! - A policy applies to a workload when it is in the workload's namespace (or in
//!   [`ROOT_NAMESPACE`], then in every namespace) and its `matchLabels` are all among the
//!   workload's labels (no selector: every workload of the namespace).
//! - A policy matches a connection (request) when any of its rules does. A rule matches when its
//!   `from`, its `to` and all its `when` conditions match; an absent or empty `from`/`to` matches
//!   anything, otherwise any one of the listed sources (operations) must match. Within a source
//!   (operation, condition) every field given must match: a positive field when any listed value
//!   matches, a `not*` field when none does. So the rule `{}` matches everything, while a policy
//!   without `rules` (or with `rules: []`, the same thing in Istio's proto3) matches nothing.
//! - Decision: any matching DENY policy denies (DENY wins); otherwise, if ALLOW policies apply
//!   to the workload, one of them must match or the connection (request) is denied; if none
//!   applies, it is allowed.
//! - Principals are matched against the identity without `spiffe://`
//!   (`cluster.local/ns/shop/sa/frontend`); a policy may also spell them with `spiffe://`.
//!   Namespaces are matched against the identity's namespace. `*` alone matches any (non-empty)
//!   value, `foo*` is a prefix and `*foo` a suffix match; a `*` anywhere else is rejected rather
//!   than taken literally. The same patterns serve every string field below.
//! - A plaintext connection (no peer identity) matches no `principals`/`namespaces` value, and
//!   therefore *satisfies* `notPrincipals`/`notNamespaces`: this is Istio's (and Envoy's,
//!   ztunnel's) behaviour, see ISTIO-SECURITY-2021-004. Consequently `notNamespaces: [foo]` in
//!   an ALLOW policy also admits plaintext callers; to refuse plaintext, add a DENY policy with
//!   `notPrincipals: ["*"]` (or require `principals: ["*"]` in the ALLOW rules).
//!
//! HTTP (L7) fields, matched per request by [`evaluate_request`] (Envoy RBAC as Istio
//! configures it, and Istio's "Authorization Policy Normalization" page):
//! - `methods` match the method exactly (case-sensitively) and must be written upper case:
//!   Istio refuses requests whose method is not upper case, and so does [`evaluate_request`].
//! - `paths` match the path without its query, normalized first (the strictest of Istio's
//!   options, `DECODE_AND_MERGE_SLASHES`: `%2F`/`%5C` and escaped unreserved characters
//!   decoded once, `\` taken as `/`, `.`/`..` segments resolved, `//` merged; `%00` refused).
//!   The agent forwards the request unchanged, so normalization only affects matching and
//!   stricter is safer (CVE-2021-31920). Exact and prefix patterns must start with `/` and be
//!   normalized already; path templates (`{*}`, `{**}`) are not supported.
//! - `hosts` match the `Host` header (`:authority`) case-insensitively, as Istio does since
//!   GHSA-7774-7vr3-cc8j (a case-sensitive match let `Httpbin.Foo` bypass a policy). Istio
//!   (Envoy's header matcher) compares the whole authority, so `hosts: [shop.example]` misses
//!   `Host: shop.example:8080` there (istio/istio#44080, #39810): a DENY bypass and a needless
//!   ALLOW miss. Trellis instead compares a pattern without a port with the host *without* its
//!   port (and without a final `.`), and a pattern that names a port (`shop.example:8080`,
//!   `*:8080`, `[::1]:80`) with the whole authority.
//! - `request.headers[name]` conditions (the name is case-insensitive) match the header's
//!   value case-sensitively; repeated headers are matched as their values joined with `,`
//!   (Istio's normalization); `*` means "present" (even empty, Envoy's `present_match`), so an
//!   absent header satisfies only `notValues`.
//! - An HTTP field can only match once the request is known: see [`evaluate`] for what rules
//!   with HTTP fields do at connection level, and [`needs_http`] for when the agent must parse
//!   HTTP at all.
//! - Other HTTP-only fields of Istio's API (`requestPrincipals`, `remoteIpBlocks`, `when` keys
//!   `request.auth.*`, `remote.ip`, ...) are rejected at validation: ignoring a field of an
//!   authorization rule would make the rule broader than written.
//!
//! Validation compiles wildcards, CIDR blocks, ports and header names once, so that
//! [`evaluate`] (per connection) and [`evaluate_request`] (per request) do not allocate unless
//! they deny or a path needs normalizing.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
    fmt,
    net::IpAddr,
    sync::Arc,
};

use http::{HeaderMap, HeaderValue, header::HeaderName};
use ipnet::IpNet;
use serde::{Deserialize, Serialize, de::IgnoredAny, ser::SerializeMap};

use crate::{
    config::{ConfigError, is_dns_label, is_dns_subdomain},
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
    pub when: Vec<FileCondition>,
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
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
}

/// One entry of a rule's `when:`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileCondition {
    /// Optional here so that validation names the field when it is missing.
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub values: Vec<FileScalar>,
    #[serde(default)]
    pub not_values: Vec<FileScalar>,
}

/// A value as written: a string like Istio (`"8080"`), or, leniently, a YAML number.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum FileScalar {
    Number(i64),
    Text(String),
}

/// A port as written (`"8080"` or `8080`).
pub type FilePort = FileScalar;

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
    /// Empty (absent or `[]` in the file) = the policy matches nothing.
    pub rules: Vec<Rule>,
    /// `namespace/name`, shared with the decisions that cite this policy.
    #[serde(skip)]
    key: Arc<str>,
    /// Whether a rule has an HTTP field.
    #[serde(skip)]
    http: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Rule {
    /// Empty = any source.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<Source>,
    /// Empty = any operation.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<Operation>,
    /// All must hold; empty = no condition.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
    /// Whether an operation or condition has an HTTP field.
    #[serde(skip)]
    http: bool,
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
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<HostMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<HostMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<StringMatch>,
    /// Matched against the normalized path (see the module documentation).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<StringMatch>,
}

/// A compiled Istio string pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StringMatch {
    /// `*`: any non-empty value (for a header: the header is present).
    Any,
    Exact(String),
    /// `foo*`
    Prefix(String),
    /// `*foo`
    Suffix(String),
}

/// A compiled `hosts` pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostMatch {
    /// Lower case (matched case-insensitively).
    pub pattern: StringMatch,
    /// Whether the pattern names a port: then it is matched against the whole authority,
    /// otherwise against the host without its port.
    pub with_port: bool,
}

/// A compiled `when` condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    /// The key, as matched (`request.headers[x-user]`, header names lower-cased).
    pub key: String,
    pub test: ConditionTest,
}

/// What a condition tests, with its `values` and `notValues`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConditionTest {
    /// `request.headers[<name>]` (HTTP).
    Header {
        name: HeaderName,
        values: Vec<StringMatch>,
        not_values: Vec<StringMatch>,
    },
    /// `source.ip`, as `ipBlocks`.
    SourceIp {
        values: Vec<IpNet>,
        not_values: Vec<IpNet>,
    },
    /// `source.namespace`, as `namespaces`.
    SourceNamespace {
        values: Vec<StringMatch>,
        not_values: Vec<StringMatch>,
    },
    /// `source.principal`, as `principals`.
    SourcePrincipal {
        values: Vec<StringMatch>,
        not_values: Vec<StringMatch>,
    },
    /// `destination.port`, as `ports`.
    DestinationPort {
        values: Vec<u16>,
        not_values: Vec<u16>,
    },
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

/// What is known of an HTTP request when it is authorized.
#[derive(Clone, Copy, Debug)]
pub struct RequestAttrs<'a> {
    /// As sent (`GET`).
    pub method: &'a str,
    /// The path of the request target, without the query (one is cut off anyway); not
    /// normalized (that is done here).
    pub path: &'a str,
    /// The `Host` header (HTTP/1) or `:authority` (HTTP/2), with its port if sent; empty if
    /// none.
    pub host: &'a str,
    pub headers: &'a HeaderMap,
}

/// The outcome of [`evaluate`] or [`evaluate_request`]. Policies are cited as `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow {
        /// The ALLOW policy that matched; `None` when no ALLOW policy applies to the workload.
        policy: Option<Arc<str>>,
    },
    Deny {
        /// The DENY policy that matched; `None` when denied because no ALLOW policy matched
        /// (or the request is malformed).
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
// Evaluation (no allocation unless denied).
// ---------------------------------------------------------------------------------------------

/// Evaluates every policy that selects `dst` (by namespace + labels) for this connection, at
/// connection level: no HTTP request is known.
///
/// Rules with HTTP fields are handled as ztunnel handles them (it enforces policies at L4
/// only), per istiod's translation for it (`handleRule` in
/// `pilot/pkg/serviceregistry/kube/controller/ambient/authorization.go`) and the status it
/// reports:
/// - in an ALLOW policy, a rule with any HTTP field never matches ("Within an ALLOW policy,
///   rules matching HTTP attributes are omitted. This will be more restrictive than
///   requested."); the policy still applies, so if nothing else allows, the connection is
///   denied;
/// - in a DENY policy, a rule is enforced without its HTTP fields: they count as matching, so
///   the rule denies every connection its other fields match ("DENY policy with HTTP
///   attributes is enforced without the HTTP rules. This will be more restrictive than
///   requested."). Sidecar Istio does the same on TCP ports (istio/istio#41802: such a policy
///   "will deny all traffic to TCP ports under its scope").
///
/// One deliberate difference: ztunnel skips an operation or condition left empty once its HTTP
/// fields are dropped, so there a DENY rule whose `to` or `when` holds only HTTP fields matches
/// nothing, i.e. the DENY silently fails open (istio/istio#61126; istiod now says such a
/// policy "will have no effect"). Here such an operation/condition matches, as the documented
/// intent says: failing closed is the safe reading of a DENY.
///
/// When [`needs_http`] is true for `dst`, the agent parses HTTP and calls
/// [`evaluate_request`] per request instead; this function then only serves traffic that
/// cannot be parsed as HTTP.
pub fn evaluate(
    policies: &[AuthorizationPolicy],
    dst: &Workload,
    conn: &ConnectionAttrs,
) -> Decision {
    decide(policies, dst, &Ctx::new(conn, None))
}

/// Evaluates every policy that selects `dst` for one HTTP request on a connection: every field,
/// HTTP or not, is matched.
///
/// As Istio does (its normalization), a request whose method is not upper case, or whose path
/// holds `%00`, is denied whatever the policies.
pub fn evaluate_request(
    policies: &[AuthorizationPolicy],
    dst: &Workload,
    conn: &ConnectionAttrs,
    req: &RequestAttrs,
) -> Decision {
    if req.method.bytes().any(|b| b.is_ascii_lowercase()) {
        return Decision::Deny {
            policy: None,
            reason: format!(
                "HTTP method {:?} is not upper case (refused, as Istio does)",
                req.method
            ),
        };
    }
    let path = match normalize_path(req.path) {
        Ok(path) => path,
        Err(why) => {
            return Decision::Deny {
                policy: None,
                reason: format!("request path {:?} {why} (refused, as Istio does)", req.path),
            };
        }
    };
    let request = Request {
        method: req.method,
        path: &path,
        authority: req.host,
        host: host_without_port(req.host),
        headers: req.headers,
    };
    decide(policies, dst, &Ctx::new(conn, Some(&request)))
}

/// Whether any policy selecting `dst` has an HTTP field, i.e. the agent must parse HTTP to
/// enforce it (with none, the inbound side never parses HTTP).
pub fn needs_http(policies: &[AuthorizationPolicy], dst: &Workload) -> bool {
    policies.iter().any(|p| p.http && p.selects(dst))
}

/// A request's attributes, prepared for matching.
struct Request<'a> {
    method: &'a str,
    /// Normalized.
    path: &'a str,
    /// As sent.
    authority: &'a str,
    /// Without port or final dot.
    host: &'a str,
    headers: &'a HeaderMap,
}

/// Everything a rule is matched against.
struct Ctx<'a> {
    id: Option<&'a Identity>,
    principal: Option<[&'a str; 5]>,
    /// Canonical (IPv4-mapped addresses as IPv4).
    src_ip: IpAddr,
    dst_port: u16,
    /// `None`: connection level.
    req: Option<&'a Request<'a>>,
}

impl<'a> Ctx<'a> {
    fn new(conn: &ConnectionAttrs<'a>, req: Option<&'a Request<'a>>) -> Self {
        Ctx {
            id: conn.src_identity,
            principal: conn.src_identity.map(principal_parts),
            // A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; policies name them as
            // IPv4.
            src_ip: conn.src_ip.to_canonical(),
            dst_port: conn.dst_port,
            req,
        }
    }
}

fn decide(policies: &[AuthorizationPolicy], dst: &Workload, ctx: &Ctx) -> Decision {
    let mut allow_policies = 0usize;
    let mut allowed_by: Option<&AuthorizationPolicy> = None;
    for policy in policies.iter().filter(|p| p.selects(dst)) {
        match policy.action {
            Action::Deny => {
                if policy.matches(ctx) {
                    return Decision::Deny {
                        policy: Some(policy.key.clone()),
                        reason: format!("denied by DENY policy {}", policy.key),
                    };
                }
            }
            Action::Allow => {
                allow_policies += 1;
                if allowed_by.is_none() && policy.matches(ctx) {
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
    #[cfg(test)]
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Whether a rule has an HTTP (L7) field.
    #[cfg(test)]
    pub fn has_http_rules(&self) -> bool {
        self.http
    }

    /// Whether the policy applies to `dst`.
    pub fn selects(&self, dst: &Workload) -> bool {
        (self.namespace == ROOT_NAMESPACE || self.namespace == dst.key.namespace)
            && self
                .selector
                .iter()
                .all(|(k, v)| dst.labels.get(k) == Some(v))
    }

    /// Whether any rule matches.
    fn matches(&self, ctx: &Ctx) -> bool {
        self.rules.iter().any(|r| r.matches(ctx, self.action))
    }
}

impl Rule {
    /// Whether the rule has an HTTP (L7) field.
    #[cfg(test)]
    pub fn has_http_fields(&self) -> bool {
        self.http
    }

    fn matches(&self, ctx: &Ctx, action: Action) -> bool {
        if ctx.req.is_none() && self.http && action == Action::Allow {
            // Connection level: an ALLOW rule with HTTP fields is omitted (see `evaluate`).
            return false;
        }
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(ctx)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(ctx)))
            && self.when.iter().all(|c| c.matches(ctx))
    }
}

impl Source {
    fn matches(&self, ctx: &Ctx) -> bool {
        field_matches(&self.ip_blocks, &self.not_ip_blocks, |net| {
            net.contains(&ctx.src_ip)
        }) && field_matches(&self.namespaces, &self.not_namespaces, |m| {
            namespace_matches(m, ctx)
        }) && field_matches(&self.principals, &self.not_principals, |m| {
            principal_matches(m, ctx)
        })
    }
}

/// No identity: no namespace matches (so `not*` fields are satisfied).
fn namespace_matches(m: &StringMatch, ctx: &Ctx) -> bool {
    ctx.id.is_some_and(|id| m.matches(&id.namespace))
}

/// No identity: no principal matches (so `not*` fields are satisfied).
fn principal_matches(m: &StringMatch, ctx: &Ctx) -> bool {
    ctx.principal.as_ref().is_some_and(|p| m.matches_parts(p))
}

impl Operation {
    /// Whether an HTTP (L7) field is set.
    pub fn has_http_fields(&self) -> bool {
        !(self.hosts.is_empty()
            && self.not_hosts.is_empty()
            && self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty())
    }

    fn matches(&self, ctx: &Ctx) -> bool {
        field_matches(&self.ports, &self.not_ports, |p| *p == ctx.dst_port)
            && match ctx.req {
                // Connection level, in a DENY rule: HTTP fields count as matching (`evaluate`).
                None => true,
                Some(req) => {
                    field_matches(&self.methods, &self.not_methods, |m| m.matches(req.method))
                        && field_matches(&self.paths, &self.not_paths, |m| m.matches(req.path))
                        && field_matches(&self.hosts, &self.not_hosts, |h| h.matches(req))
                }
            }
    }
}

impl Condition {
    /// Whether the condition tests an HTTP (L7) attribute.
    pub fn is_http(&self) -> bool {
        matches!(self.test, ConditionTest::Header { .. })
    }

    fn matches(&self, ctx: &Ctx) -> bool {
        match &self.test {
            ConditionTest::Header {
                name,
                values,
                not_values,
            } => match ctx.req {
                // Connection level, in a DENY rule: counts as matching (`evaluate`).
                None => true,
                Some(req) => {
                    let all = req.headers.get_all(name);
                    field_matches(values, not_values, |m| header_matches(m, &all))
                }
            },
            ConditionTest::SourceIp { values, not_values } => {
                field_matches(values, not_values, |net| net.contains(&ctx.src_ip))
            }
            ConditionTest::SourceNamespace { values, not_values } => {
                field_matches(values, not_values, |m| namespace_matches(m, ctx))
            }
            ConditionTest::SourcePrincipal { values, not_values } => {
                field_matches(values, not_values, |m| principal_matches(m, ctx))
            }
            ConditionTest::DestinationPort { values, not_values } => {
                field_matches(values, not_values, |p| *p == ctx.dst_port)
            }
        }
    }
}

impl HostMatch {
    fn matches(&self, req: &Request) -> bool {
        let target = if self.with_port {
            req.authority
        } else {
            req.host
        };
        let (t, n) = (target.as_bytes(), target.len());
        match &self.pattern {
            StringMatch::Any => !target.is_empty(),
            StringMatch::Exact(s) => target.eq_ignore_ascii_case(s),
            StringMatch::Prefix(p) => {
                n >= p.len() && t[..p.len()].eq_ignore_ascii_case(p.as_bytes())
            }
            StringMatch::Suffix(s) => {
                n >= s.len() && t[n - s.len()..].eq_ignore_ascii_case(s.as_bytes())
            }
        }
    }
}

/// The host of an authority (`Host` header): without `:port`, brackets of an IPv6 literal kept,
/// without a final `.` (`shop.example.` is `shop.example`).
fn host_without_port(authority: &str) -> &str {
    let host = if authority.starts_with('[') {
        match authority.find(']') {
            Some(end) => &authority[..=end],
            None => authority,
        }
    } else {
        match authority.rsplit_once(':') {
            // A second ':' would be an unbracketed IPv6 address: left alone.
            Some((host, port))
                if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) =>
            {
                host
            }
            _ => authority,
        }
    };
    match host.strip_suffix('.') {
        Some(h) if !h.is_empty() => h,
        _ => host,
    }
}

/// Matches a header's values (`all`; none = absent) joined with `,`, as Envoy does; `*` means
/// present.
fn header_matches(m: &StringMatch, all: &http::header::GetAll<'_, HeaderValue>) -> bool {
    let values = || all.iter().map(HeaderValue::as_bytes);
    match m {
        StringMatch::Any => values().next().is_some(),
        StringMatch::Exact(s) => {
            let (count, len) = values().fold((0, 0), |(c, l), v| (c + 1, l + v.len()));
            count > 0 && len + count - 1 == s.len() && joined_starts_with(values(), s.as_bytes())
        }
        StringMatch::Prefix(p) => joined_starts_with(values(), p.as_bytes()),
        StringMatch::Suffix(s) => {
            joined_ends_with(all.iter().rev().map(HeaderValue::as_bytes), s.as_bytes())
        }
    }
}

/// Whether `values` joined with `,` start with `prefix` (non-empty). No value: false.
fn joined_starts_with<'v>(values: impl Iterator<Item = &'v [u8]>, prefix: &[u8]) -> bool {
    let mut rest = prefix;
    for (i, value) in values.enumerate() {
        if i > 0 {
            match rest.split_first() {
                Some((b',', tail)) => rest = tail,
                _ => return false,
            }
            if rest.is_empty() {
                return true;
            }
        }
        let n = value.len().min(rest.len());
        if value[..n] != rest[..n] {
            return false;
        }
        rest = &rest[n..];
        if rest.is_empty() {
            return true;
        }
    }
    false
}

/// Whether `values_rev` (the values, last first) joined with `,` end with `suffix` (non-empty).
fn joined_ends_with<'v>(values_rev: impl Iterator<Item = &'v [u8]>, suffix: &[u8]) -> bool {
    let mut rest = suffix;
    for (i, value) in values_rev.enumerate() {
        if i > 0 {
            match rest.split_last() {
                Some((b',', head)) => rest = head,
                _ => return false,
            }
            if rest.is_empty() {
                return true;
            }
        }
        let n = value.len().min(rest.len());
        if value[value.len() - n..] != rest[rest.len() - n..] {
            return false;
        }
        rest = &rest[..rest.len() - n];
        if rest.is_empty() {
            return true;
        }
    }
    false
}

/// Normalizes a request path for matching, as Istio's `DECODE_AND_MERGE_SLASHES`: cut at `?`
/// or `#`; percent-decode (once) `%2F`, `%5C` and escaped unreserved characters, upper-case the
/// hex digits of other escapes; `\` becomes `/`; `.` and `..` segments are resolved
/// (RFC 3986 5.2.4) and runs of `/` merged. Borrows when nothing changes. `Err` (reason) for
/// `%00`, which Istio refuses.
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, &'static str> {
    let path = match path.find(['?', '#']) {
        Some(end) => &path[..end],
        None => path,
    };
    let clean = !path.contains(['%', '\\'])
        && !path.contains("//")
        && !path.split('/').any(|s| s == "." || s == "..");
    if clean {
        return Ok(Cow::Borrowed(path));
    }
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%'
            && i + 2 < bytes.len()
            && let (Some(hi), Some(lo)) = (hex_value(bytes[i + 1]), hex_value(bytes[i + 2]))
        {
            let c = hi << 4 | lo;
            if c == 0 {
                return Err("holds %00");
            }
            if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~' | b'/') {
                decoded.push(c);
            } else if c == b'\\' {
                decoded.push(b'/');
            } else {
                decoded.extend_from_slice(&[
                    b'%',
                    bytes[i + 1].to_ascii_uppercase(),
                    bytes[i + 2].to_ascii_uppercase(),
                ]);
            }
            i += 3;
            continue;
        }
        decoded.push(if b == b'\\' { b'/' } else { b });
        i += 1;
    }
    // Only ASCII bytes were decoded, and escapes of other bytes kept: still UTF-8.
    let decoded = String::from_utf8(decoded).map_err(|_| "is not UTF-8")?;
    let Some(rest) = decoded.strip_prefix('/') else {
        return Ok(Cow::Owned(decoded));
    };
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in rest.split('/') {
        trailing_slash = true;
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => {
                segments.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || segments.is_empty() {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

fn hex_value(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// One field pair of a source/operation/condition: any positive value (if listed) and no
/// negative one.
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
        if compiled.inner().contains('*') {
            return Err(format!(
                "{pattern:?}: `*` is only supported alone, as a prefix (\"*foo\") or as a suffix (\"foo*\")"
            ));
        }
        Ok(compiled)
    }

    /// The literal part (empty for `*`).
    fn inner(&self) -> &str {
        match self {
            StringMatch::Any => "",
            StringMatch::Exact(s) | StringMatch::Prefix(s) | StringMatch::Suffix(s) => s,
        }
    }

    /// The same kind of pattern with another literal part, as written (`/api/*`).
    fn with_inner(&self, inner: &str) -> String {
        match self {
            StringMatch::Any => "*".into(),
            StringMatch::Exact(_) => inner.into(),
            StringMatch::Prefix(_) => format!("{inner}*"),
            StringMatch::Suffix(_) => format!("*{inner}"),
        }
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

impl fmt::Display for HostMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.pattern.fmt(f)
    }
}

impl Serialize for HostMatch {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl Serialize for Condition {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        fn shown<T: fmt::Display>(values: &[T]) -> Vec<String> {
            values.iter().map(T::to_string).collect()
        }
        let (values, not_values) = match &self.test {
            ConditionTest::Header {
                values, not_values, ..
            }
            | ConditionTest::SourceNamespace { values, not_values }
            | ConditionTest::SourcePrincipal { values, not_values } => {
                (shown(values), shown(not_values))
            }
            ConditionTest::SourceIp { values, not_values } => (shown(values), shown(not_values)),
            ConditionTest::DestinationPort { values, not_values } => {
                (shown(values), shown(not_values))
            }
        };
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("key", &self.key)?;
        if !values.is_empty() {
            map.serialize_entry("values", &values)?;
        }
        if !not_values.is_empty() {
            map.serialize_entry("not_values", &not_values)?;
        }
        map.end()
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
        let http = rules.iter().any(|r| r.http);
        policies.push(AuthorizationPolicy {
            name: p.name,
            namespace: p.namespace,
            selector,
            action,
            rules,
            key,
            http,
        });
    }
    Ok(policies)
}

fn unsupported(at: &str, field: &str, why: &str) -> ConfigError {
    ConfigError::new(
        format!("{at}.{field}"),
        format!(
            "`{field}` is not supported ({why}); ignoring the field would make the rule match \
             more than written"
        ),
    )
}

fn validate_rule(rule: FileRule, at: &str) -> Result<Rule, ConfigError> {
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
    let mut when = Vec::with_capacity(rule.when.len());
    for (w, condition) in rule.when.into_iter().enumerate() {
        when.push(validate_condition(condition, &format!("{at}.when[{w}]"))?);
    }
    let http = to.iter().any(Operation::has_http_fields) || when.iter().any(Condition::is_http);
    Ok(Rule {
        from,
        to,
        when,
        http,
    })
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
    let operation = Operation {
        ports: ports(&o.ports, &format!("{at}.ports"))?,
        not_ports: ports(&o.not_ports, &format!("{at}.notPorts"))?,
        hosts: host_patterns(&o.hosts, &format!("{at}.hosts"))?,
        not_hosts: host_patterns(&o.not_hosts, &format!("{at}.notHosts"))?,
        methods: method_patterns(&o.methods, &format!("{at}.methods"))?,
        not_methods: method_patterns(&o.not_methods, &format!("{at}.notMethods"))?,
        paths: path_patterns(&o.paths, &format!("{at}.paths"))?,
        not_paths: path_patterns(&o.not_paths, &format!("{at}.notPaths"))?,
    };
    if operation == Operation::default() {
        return Err(ConfigError::new(
            at,
            "must set at least one of ports, notPorts, hosts, notHosts, methods, notMethods, paths, notPaths",
        ));
    }
    Ok(operation)
}

/// `when` keys of Istio's API that Trellis does not implement, by prefix, and why.
const UNSUPPORTED_KEYS: &[(&str, &str)] = &[
    (
        "remote.ip",
        "needs X-Forwarded-For or PROXY protocol; use source.ip",
    ),
    ("request.auth.", "needs request (JWT) authentication"),
    (
        "request.experimental.",
        "an experimental Envoy attribute; use request.headers[...]",
    ),
    ("experimental.", "an experimental Envoy attribute"),
    (
        "destination.ip",
        "select the destination with the policy's selector",
    ),
    ("connection.sni", "TLS server names are not inspected"),
];

const SUPPORTED_KEYS: &str =
    "request.headers[<name>], source.ip, source.namespace, source.principal, destination.port";

fn validate_condition(c: FileCondition, at: &str) -> Result<Condition, ConfigError> {
    let key = c
        .key
        .ok_or_else(|| ConfigError::new(format!("{at}.key"), "must be set"))?;
    if c.values.is_empty() && c.not_values.is_empty() {
        return Err(ConfigError::new(
            at,
            format!("condition {key:?} must set values or notValues (or both)"),
        ));
    }
    let (values_at, not_at) = (format!("{at}.values"), format!("{at}.notValues"));
    let (values, not_values) = (texts(&c.values), texts(&c.not_values));
    let (key, test) = match key.as_str() {
        "source.ip" => (
            key,
            ConditionTest::SourceIp {
                values: ip_blocks(&values, &values_at)?,
                not_values: ip_blocks(&not_values, &not_at)?,
            },
        ),
        "source.namespace" => (
            key,
            ConditionTest::SourceNamespace {
                values: patterns(&values, &values_at, false)?,
                not_values: patterns(&not_values, &not_at, false)?,
            },
        ),
        "source.principal" => (
            key,
            ConditionTest::SourcePrincipal {
                values: patterns(&values, &values_at, true)?,
                not_values: patterns(&not_values, &not_at, true)?,
            },
        ),
        "destination.port" => (
            key,
            ConditionTest::DestinationPort {
                values: ports(&c.values, &values_at)?,
                not_values: ports(&c.not_values, &not_at)?,
            },
        ),
        _ => {
            if let Some(rest) = key.strip_prefix("request.headers[") {
                let name = rest
                    .strip_suffix(']')
                    .filter(|n| !n.is_empty())
                    .ok_or_else(|| {
                        ConfigError::new(
                            format!("{at}.key"),
                            format!("{key:?}: write a header condition as request.headers[<name>]"),
                        )
                    })?;
                let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                    ConfigError::new(
                        format!("{at}.key"),
                        format!(
                            "{key:?}: {name:?} is not an HTTP header name (write it without \
                             quotes, as request.headers[x-user]; for the host, method or path \
                             use hosts, methods or paths)"
                        ),
                    )
                })?;
                (
                    format!("request.headers[{name}]"),
                    ConditionTest::Header {
                        values: header_patterns(&values, &values_at)?,
                        not_values: header_patterns(&not_values, &not_at)?,
                        name,
                    },
                )
            } else if let Some((_, why)) = UNSUPPORTED_KEYS
                .iter()
                .find(|(prefix, _)| key.starts_with(prefix))
            {
                return Err(ConfigError::new(
                    format!("{at}.key"),
                    format!("condition key {key:?} is not supported ({why})"),
                ));
            } else {
                return Err(ConfigError::new(
                    format!("{at}.key"),
                    format!("{key:?} is not a condition key (supported: {SUPPORTED_KEYS})"),
                ));
            }
        }
    };
    Ok(Condition { key, test })
}

/// Values as strings (a YAML number as its digits).
fn texts(values: &[FileScalar]) -> Vec<String> {
    values
        .iter()
        .map(|v| match v {
            FileScalar::Number(n) => n.to_string(),
            FileScalar::Text(s) => s.clone(),
        })
        .collect()
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

/// Compiles patterns, each checked by `check` (given the value and the compiled pattern).
fn checked_patterns(
    values: &[String],
    at: &str,
    check: impl Fn(&str, &StringMatch) -> Result<(), String>,
) -> Result<Vec<StringMatch>, ConfigError> {
    values
        .iter()
        .enumerate()
        .map(|(i, value)| {
            StringMatch::parse(value)
                .and_then(|m| check(value, &m).map(|()| m))
                .map_err(|e| ConfigError::new(format!("{at}[{i}]"), e))
        })
        .collect()
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn method_patterns(values: &[String], at: &str) -> Result<Vec<StringMatch>, ConfigError> {
    checked_patterns(values, at, |value, m| {
        let ok = m
            .inner()
            .bytes()
            .all(|b| is_tchar(b) && !b.is_ascii_lowercase());
        if ok {
            Ok(())
        } else {
            Err(format!(
                "{value:?} is not an upper-case HTTP method token such as GET or POST (Istio \
                 refuses requests whose method is not upper case)"
            ))
        }
    })
}

fn path_patterns(values: &[String], at: &str) -> Result<Vec<StringMatch>, ConfigError> {
    values
        .iter()
        .enumerate()
        .map(|(i, value)| {
            path_pattern(value).map_err(|e| ConfigError::new(format!("{at}[{i}]"), e))
        })
        .collect()
}

fn path_pattern(value: &str) -> Result<StringMatch, String> {
    if value.contains("{*}") || value.contains("{**}") {
        return Err(format!(
            "{value:?}: path templates ({{*}}, {{**}}) are not supported; use a prefix \
             (\"/api/*\") or suffix (\"*.png\") pattern"
        ));
    }
    if value.contains(['?', '#']) {
        return Err(format!(
            "{value:?}: paths are matched without the query string (or fragment)"
        ));
    }
    if value
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(format!(
            "{value:?}: a path has no spaces or control characters"
        ));
    }
    let m = StringMatch::parse(value)?;
    if let StringMatch::Exact(p) | StringMatch::Prefix(p) = &m {
        if !p.starts_with('/') {
            return Err(format!(
                "{value:?} must start with '/' (or be \"*\" or a suffix such as \"*.png\")"
            ));
        }
        match normalize_path(p) {
            Ok(normal) if normal == p.as_str() => {}
            Ok(normal) => {
                return Err(format!(
                    "{value:?} would never match: request paths are matched normalized; write {:?}",
                    m.with_inner(&normal)
                ));
            }
            Err(why) => return Err(format!("{value:?} {why}")),
        }
    }
    Ok(m)
}

fn header_patterns(values: &[String], at: &str) -> Result<Vec<StringMatch>, ConfigError> {
    checked_patterns(values, at, |value, _| {
        if value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
            Err(format!(
                "{value:?}: a header value has no control characters"
            ))
        } else {
            Ok(())
        }
    })
}

fn host_patterns(values: &[String], at: &str) -> Result<Vec<HostMatch>, ConfigError> {
    values
        .iter()
        .enumerate()
        .map(|(i, value)| {
            let lower = value.to_ascii_lowercase();
            let bad = lower
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control() || b"/@,".contains(&b));
            if bad {
                return Err(ConfigError::new(
                    format!("{at}[{i}]"),
                    format!("{value:?} is not a host (host or host:port, \"*\" wildcards)"),
                ));
            }
            let pattern = StringMatch::parse(&lower)
                .map_err(|e| ConfigError::new(format!("{at}[{i}]"), e))?;
            // Past an IPv6 literal, a ':' introduces the port.
            let after_literal = match lower.strip_prefix('[') {
                Some(rest) => rest.split_once(']').map_or(rest, |(_, port)| port),
                None => &lower,
            };
            let with_port = after_literal.contains(':');
            // Without a port, matched against the host without its final dot: drop it here too.
            let pattern = match pattern {
                StringMatch::Exact(h) if !with_port => StringMatch::Exact(without_final_dot(h)),
                StringMatch::Suffix(h) if !with_port => StringMatch::Suffix(without_final_dot(h)),
                other => other,
            };
            Ok(HostMatch { pattern, with_port })
        })
        .collect()
}

fn without_final_dot(host: String) -> String {
    match host.strip_suffix('.') {
        Some(h) if !h.is_empty() => h.to_string(),
        _ => host,
    }
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
                FileScalar::Number(n) => u16::try_from(*n).ok(),
                FileScalar::Text(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
                    s.parse::<u16>().ok()
                }
                FileScalar::Text(_) => None,
            };
            match port {
                Some(p) if p != 0 => Ok(p),
                _ => {
                    let shown = match value {
                        FileScalar::Number(n) => n.to_string(),
                        FileScalar::Text(s) => format!("{s:?}"),
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
                not_ports: vec![9090],
                ..Operation::default()
            }
        );
        assert!(!p.has_http_rules());
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
    fn unsupported_fields_are_rejected() {
        let cases = [
            (
                "from:\n    - source: {requestPrincipals: ['*']}",
                "rules[0].from[0].source.requestPrincipals",
            ),
            (
                "from:\n    - source: {notRequestPrincipals: ['*']}",
                "rules[0].from[0].source.notRequestPrincipals",
            ),
            (
                "from:\n    - source: {remoteIpBlocks: [1.2.3.4]}",
                "rules[0].from[0].source.remoteIpBlocks",
            ),
            (
                "from:\n    - source: {serviceAccounts: [a]}",
                "rules[0].from[0].source.serviceAccounts",
            ),
            (
                "when:\n    - {key: remote.ip, values: [1.2.3.4]}",
                "rules[0].when[0].key",
            ),
            (
                "when:\n    - {key: 'request.auth.claims[iss]', values: [x]}",
                "rules[0].when[0].key",
            ),
            (
                "when:\n    - {key: destination.ip, values: [10.0.0.1]}",
                "rules[0].when[0].key",
            ),
            (
                "when:\n    - {key: connection.sni, values: [a.example]}",
                "rules[0].when[0].key",
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

    // -----------------------------------------------------------------------------------------
    // HTTP (L7) fields.
    // -----------------------------------------------------------------------------------------

    fn header_map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).expect("header name"),
                HeaderValue::from_str(value).expect("header value"),
            );
        }
        map
    }

    /// One request to shop/backend port 8080 from `id` at 10.0.0.1.
    struct Req<'a> {
        id: Option<&'a Identity>,
        port: u16,
        method: &'a str,
        path: &'a str,
        host: &'a str,
        headers: &'a [(&'a str, &'a str)],
    }

    impl Default for Req<'_> {
        fn default() -> Self {
            Req {
                id: None,
                port: 8080,
                method: "GET",
                path: "/",
                host: "backend.shop",
                headers: &[],
            }
        }
    }

    fn eval_req(policies: &[AuthorizationPolicy], req: &Req) -> Decision {
        let headers = header_map(req.headers);
        evaluate_request(
            policies,
            &backend(),
            &ConnectionAttrs {
                src_identity: req.id,
                src_ip: "10.0.0.1".parse().expect("ip"),
                dst_port: req.port,
            },
            &RequestAttrs {
                method: req.method,
                path: req.path,
                host: req.host,
                headers: &headers,
            },
        )
    }

    fn req_allowed(policies: &[AuthorizationPolicy], req: &Req) -> bool {
        eval_req(policies, req).is_allowed()
    }

    /// One ALLOW policy for shop with one rule holding the given `to` operation.
    fn allow_op(operation: &str) -> Vec<AuthorizationPolicy> {
        parse_ok(&format!(
            "authorizationPolicies:\n- name: p\n  namespace: shop\n  rules:\n  - to:\n    - operation: {operation}\n"
        ))
    }

    /// One ALLOW policy for shop with one rule holding the given `when` condition.
    fn allow_when(condition: &str) -> Vec<AuthorizationPolicy> {
        parse_ok(&format!(
            "authorizationPolicies:\n- name: p\n  namespace: shop\n  rules:\n  - when:\n    - {condition}\n"
        ))
    }

    const HTTP_EXAMPLE: &str = r#"
authorizationPolicies:
  - name: api
    namespace: shop
    rules:
      - from:
          - source: {principals: ["cluster.local/ns/shop/sa/frontend"]}
        to:
          - operation:
              ports: ["8080"]
              methods: ["GET", "HEAD", "P*"]
              notMethods: ["PATCH"]
              paths: ["/api/*", "*.png", "/healthz", "*"]
              notPaths: ["/api/admin/*"]
              hosts: ["Shop.Example", "*.shop.example", "api.*", "shop.example:8443", "[::1]"]
              notHosts: ["evil.shop.example"]
        when:
          - key: request.headers[X-User]
            values: ["alice", "bob-*"]
            notValues: ["*-banned"]
          - key: source.ip
            notValues: ["10.9.0.0/16"]
          - key: source.namespace
            values: ["shop"]
          - key: source.principal
            values: ["spiffe://cluster.local/ns/shop/*"]
          - key: destination.port
            values: ["8080", 8443]
"#;

    #[test]
    fn parses_http_fields() {
        let policies = parse_ok(HTTP_EXAMPLE);
        let p = &policies[0];
        assert!(p.has_http_rules());
        let rule = &p.rules[0];
        assert!(rule.has_http_fields());
        let op = &rule.to[0];
        assert!(op.has_http_fields());
        assert_eq!(
            op.methods,
            [
                StringMatch::Exact("GET".into()),
                StringMatch::Exact("HEAD".into()),
                StringMatch::Prefix("P".into())
            ]
        );
        assert_eq!(
            op.paths,
            [
                StringMatch::Prefix("/api/".into()),
                StringMatch::Suffix(".png".into()),
                StringMatch::Exact("/healthz".into()),
                StringMatch::Any
            ]
        );
        let host = |pattern: StringMatch, with_port| HostMatch { pattern, with_port };
        assert_eq!(
            op.hosts,
            [
                // Lower-cased.
                host(StringMatch::Exact("shop.example".into()), false),
                host(StringMatch::Suffix(".shop.example".into()), false),
                host(StringMatch::Prefix("api.".into()), false),
                host(StringMatch::Exact("shop.example:8443".into()), true),
                host(StringMatch::Exact("[::1]".into()), false),
            ]
        );
        assert_eq!(rule.when.len(), 5);
        assert_eq!(rule.when[0].key, "request.headers[x-user]");
        assert!(rule.when[0].is_http());
        assert!(matches!(
            &rule.when[0].test,
            ConditionTest::Header { name, values, not_values }
                if name == "x-user" && values.len() == 2 && not_values[0] == StringMatch::Suffix("-banned".into())
        ));
        assert!(!rule.when[1].is_http());
        assert_eq!(
            rule.when[4].test,
            ConditionTest::DestinationPort {
                values: vec![8080, 8443],
                not_values: vec![]
            }
        );
        assert_eq!(
            rule.when[3].test,
            ConditionTest::SourcePrincipal {
                values: vec![StringMatch::Prefix("cluster.local/ns/shop/".into())],
                not_values: vec![]
            }
        );
        // Serialized in the same vocabulary.
        let json = serde_json::to_value(p).expect("serialize");
        let rule_json = &json["rules"][0];
        assert_eq!(rule_json["to"][0]["methods"][2], "P*");
        assert_eq!(rule_json["to"][0]["not_paths"][0], "/api/admin/*");
        assert_eq!(rule_json["to"][0]["hosts"][0], "shop.example");
        assert_eq!(rule_json["when"][0]["key"], "request.headers[x-user]");
        assert_eq!(rule_json["when"][0]["values"][1], "bob-*");
        assert_eq!(rule_json["when"][0]["not_values"][0], "*-banned");
        assert_eq!(rule_json["when"][1]["not_values"][0], "10.9.0.0/16");
        assert_eq!(rule_json["when"][4]["values"][1], "8443");

        // And it evaluates: everything at once.
        let frontend = identity("shop", "frontend");
        let ok = Req {
            id: Some(&frontend),
            path: "/api/cart",
            headers: &[("x-user", "alice")],
            host: "SHOP.example:8080",
            ..Req::default()
        };
        assert_eq!(
            eval_req(&policies, &ok),
            Decision::Allow {
                policy: Some("shop/api".into())
            }
        );
        for bad in [
            Req {
                method: "PATCH",
                ..ok
            },
            Req {
                method: "DELETE",
                ..ok
            },
            Req {
                path: "/api/admin/x",
                ..ok
            },
            Req {
                host: "evil.shop.example",
                ..ok
            },
            Req {
                host: "other.example",
                ..ok
            },
            Req {
                headers: &[("x-user", "bob-banned")],
                ..ok
            },
            Req { headers: &[], ..ok },
            Req { port: 9000, ..ok },
            Req { id: None, ..ok },
        ] {
            assert!(
                !req_allowed(&policies, &bad),
                "{} {} {} {:?}",
                bad.method,
                bad.path,
                bad.host,
                bad.headers
            );
        }
        // ...with the other alternatives of each field.
        for good in [
            Req {
                method: "POST",
                ..ok
            },
            Req {
                path: "/logo.png",
                ..ok
            },
            Req {
                path: "/anything",
                ..ok
            },
            Req {
                host: "a.shop.example",
                ..ok
            },
            Req {
                host: "api.internal",
                ..ok
            },
            Req {
                host: "shop.example:8443",
                ..ok
            },
            Req {
                host: "[::1]:8080",
                ..ok
            },
            Req {
                headers: &[("X-User", "bob-2")],
                ..ok
            },
        ] {
            assert!(
                req_allowed(&policies, &good),
                "{} {} {} {:?}",
                good.method,
                good.path,
                good.host,
                good.headers
            );
        }
    }

    #[test]
    fn http_validation_errors_name_the_field() {
        let op = |operation: &str| {
            format!(
                "authorizationPolicies:\n- name: p\n  namespace: shop\n  rules:\n  - {{}}\n  - to:\n    - operation: {{ports: ['80']}}\n    - operation: {operation}\n"
            )
        };
        let at = "authorizationPolicies[0].rules[1].to[1].operation";
        for (operation, field) in [
            ("{methods: [GET, get]}", "methods[1]"),
            ("{methods: ['GE T']}", "methods[0]"),
            ("{methods: ['G*T']}", "methods[0]"),
            ("{methods: ['POST/']}", "methods[0]"),
            ("{methods: ['']}", "methods[0]"),
            ("{notMethods: [GET, 'de*']}", "notMethods[1]"),
            ("{paths: [/ok, api/v1]}", "paths[1]"),
            ("{paths: ['api/*']}", "paths[0]"),
            ("{paths: ['/a?b=1']}", "paths[0]"),
            ("{paths: ['/a/{*}/c']}", "paths[0]"),
            ("{paths: ['/a/{**}']}", "paths[0]"),
            ("{paths: ['/a//b']}", "paths[0]"),
            ("{paths: ['/a/./b*']}", "paths[0]"),
            ("{paths: ['/%61dmin']}", "paths[0]"),
            ("{paths: ['/a%00']}", "paths[0]"),
            ("{paths: ['/a b']}", "paths[0]"),
            ("{paths: ['/a*b']}", "paths[0]"),
            ("{paths: ['']}", "paths[0]"),
            ("{notPaths: ['x']}", "notPaths[0]"),
            ("{hosts: ['a b']}", "hosts[0]"),
            ("{hosts: [a.example, 'a/*']}", "hosts[1]"),
            ("{hosts: ['']}", "hosts[0]"),
            ("{notHosts: ['*x*']}", "notHosts[0]"),
            ("{ports: []}", ""),
        ] {
            let want = if field.is_empty() {
                at.to_string()
            } else {
                format!("{at}.{field}")
            };
            assert_eq!(field_of(&op(operation)), want, "{operation}");
        }
        // The messages say what is wrong.
        let message = |yaml: &str| parse(yaml).unwrap_err().message;
        assert!(message(&op("{methods: [get]}")).contains("upper-case"));
        assert!(message(&op("{paths: [api]}")).contains("must start with '/'"));
        assert!(message(&op("{paths: ['/a//b*']}")).contains("\"/a/b*\""));
        assert!(message(&op("{paths: ['/a?x']}")).contains("query"));
        assert!(message(&op("{paths: ['/{*}']}")).contains("templates"));
        // Wildcard paths need no leading '/'.
        for fine in ["'*'", "'*.png'", "'/api/*'", "/", "'/a/b/'", "'/%2A'"] {
            parse_ok(&op(&format!("{{paths: [{fine}]}}")));
        }

        let when = |condition: &str| {
            format!(
                "authorizationPolicies:\n- name: p\n  namespace: shop\n  rules:\n  - {{}}\n  - when:\n    - {{key: source.ip, values: [10.0.0.0/8]}}\n    - {condition}\n"
            )
        };
        let at = "authorizationPolicies[0].rules[1].when[1]";
        for (condition, field) in [
            ("{values: [a]}", ".key"),
            ("{key: foo.bar, values: [a]}", ".key"),
            ("{key: 'request.headers[]', values: [a]}", ".key"),
            ("{key: 'request.headers[x-user', values: [a]}", ".key"),
            ("{key: 'request.headers[\"x-user\"]', values: [a]}", ".key"),
            ("{key: 'request.headers[a b]', values: [a]}", ".key"),
            ("{key: 'request.headers[x-user]'}", ""),
            ("{key: 'request.headers[x-user]', values: []}", ""),
            (
                "{key: 'request.headers[x-user]', values: [a, '']}",
                ".values[1]",
            ),
            (
                "{key: 'request.headers[x-user]', notValues: ['a*b']}",
                ".notValues[0]",
            ),
            ("{key: source.ip, values: [10.0.0.300]}", ".values[0]"),
            ("{key: source.ip, notValues: [fish]}", ".notValues[0]"),
            ("{key: source.namespace, values: ['a*b']}", ".values[0]"),
            ("{key: source.principal, notValues: ['']}", ".notValues[0]"),
            (
                "{key: destination.port, values: ['80', http]}",
                ".values[1]",
            ),
            ("{key: destination.port, notValues: [0]}", ".notValues[0]"),
        ] {
            assert_eq!(
                field_of(&when(condition)),
                format!("{at}{field}"),
                "{condition}"
            );
        }
        let err = parse(&when("{key: foo.bar, values: [a]}")).unwrap_err();
        assert!(
            err.message.contains("\"foo.bar\"") && err.message.contains("request.headers[<name>]"),
            "{err}"
        );
        let err = parse(&when("{key: 'request.auth.claims[iss]', values: [a]}")).unwrap_err();
        assert!(
            err.message.contains("request.auth.claims[iss]")
                && err.message.contains("not supported"),
            "{err}"
        );
        let err = parse(&when("{key: 'request.headers[\"x-user\"]', values: [a]}")).unwrap_err();
        assert!(err.message.contains("without quotes"), "{err}");
        let err = parse(&when("{key: source.ip}")).unwrap_err();
        assert!(err.message.contains("values or notValues"), "{err}");
    }

    #[test]
    fn methods_and_not_methods() {
        let policies = allow_op("{methods: [GET, 'P*']}");
        for (method, expect) in [
            ("GET", true),
            ("POST", true),
            ("PUT", true),
            ("HEAD", false),
            ("DELETE", false),
            ("GETX", false),
        ] {
            let req = Req {
                method,
                ..Req::default()
            };
            assert_eq!(req_allowed(&policies, &req), expect, "{method}");
        }
        let policies = allow_op("{notMethods: [DELETE, 'PAT*']}");
        for (method, expect) in [
            ("GET", true),
            ("DELETE", false),
            ("PATCH", false),
            ("PUT", true),
        ] {
            let req = Req {
                method,
                ..Req::default()
            };
            assert_eq!(req_allowed(&policies, &req), expect, "{method}");
        }
        // A method that is not upper case is refused whatever the policies (Istio does).
        for method in ["get", "Get", "delete"] {
            let d = eval_req(
                &[],
                &Req {
                    method,
                    ..Req::default()
                },
            );
            match d {
                Decision::Deny {
                    policy: None,
                    reason,
                } => assert!(reason.contains("upper case"), "{reason}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn paths_exact_prefix_suffix_and_any() {
        let policies = allow_op("{paths: [/healthz, '/api/*', '*.png']}");
        for (path, expect) in [
            ("/healthz", true),
            ("/healthz/", false),
            ("/healthzz", false),
            ("/HEALTHZ", false),
            ("/api/", true),
            ("/api/v1/cart", true),
            ("/api", false),
            ("/apix", false),
            ("/img/logo.png", true),
            ("/img/logo.PNG", false),
            ("/", false),
            // The query is not part of the path.
            ("/healthz?verbose=1", true),
            ("/other?x=.png", false),
            ("/img/a.png#frag", true),
        ] {
            let req = Req {
                path,
                ..Req::default()
            };
            assert_eq!(req_allowed(&policies, &req), expect, "{path}");
        }
        let any = allow_op("{paths: ['*']}");
        assert!(req_allowed(
            &any,
            &Req {
                path: "/",
                ..Req::default()
            }
        ));
        assert!(req_allowed(
            &any,
            &Req {
                path: "/x/y",
                ..Req::default()
            }
        ));

        let not = allow_op("{notPaths: ['/admin/*', /admin]}");
        for (path, expect) in [
            ("/", true),
            ("/public", true),
            ("/admin", false),
            ("/admin/users", false),
            // Normalized before matching: no way around the notPaths.
            ("/public/../admin/users", false),
            ("/%61dmin", false),
            ("//admin", false),
            ("/./admin/x", false),
            ("\\admin", false),
            ("/public/..%2Fadmin", false),
            ("/public/..%5cadmin", false),
            ("/admin%2fusers", false),
            // Decoded once only.
            ("/%2561dmin", true),
        ] {
            let req = Req {
                path,
                ..Req::default()
            };
            assert_eq!(req_allowed(&not, &req), expect, "{path}");
        }
        // %00 is refused whatever the policies.
        let d = eval_req(
            &[],
            &Req {
                path: "/a%00b",
                ..Req::default()
            },
        );
        assert!(
            matches!(&d, Decision::Deny { policy: None, reason } if reason.contains("%00")),
            "{d:?}"
        );
    }

    #[test]
    fn path_normalization() {
        for (raw, normal) in [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a/b/", "/a/b/"),
            ("/a?x=/../y", "/a"),
            ("/a#x", "/a"),
            ("/a/./b", "/a/b"),
            ("/a/../b", "/b"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/../../a", "/a"),
            ("/..", "/"),
            ("//a///b//", "/a/b/"),
            ("\\a\\b", "/a/b"),
            ("/%41%62%2d%2E%5f%7E%30", "/Ab-._~0"),
            ("/a%2fb%2Fc", "/a/b/c"),
            ("/a%5cb", "/a/b"),
            ("/a%2e%2e/b", "/a../b"),
            ("/a/%2e%2e/b", "/b"),
            ("/a%20b%3f", "/a%20b%3F"),
            ("/a%zz%4", "/a%zz%4"),
            // Decoded once: the "%2e" that results stays.
            ("/%25%32%65", "/%252e"),
            ("/caf%C3%A9/é", "/caf%C3%A9/é"),
            ("/.well-known/x", "/.well-known/x"),
            ("*", "*"),
        ] {
            assert_eq!(normalize_path(raw).as_deref(), Ok(normal), "{raw}");
        }
        assert!(normalize_path("/a%00").is_err());
        // Clean paths are borrowed (no allocation per request).
        for clean in ["/", "/api/v1/cart", "/a.b/c..d/.e", "/x?y=//"] {
            assert!(
                matches!(normalize_path(clean), Ok(Cow::Borrowed(_))),
                "{clean}"
            );
        }
    }

    #[test]
    fn hosts_case_insensitive_and_ports() {
        let policies = allow_op("{hosts: [Shop.Example, '*.api.example', 'admin.*']}");
        for (host, expect) in [
            ("shop.example", true),
            ("SHOP.EXAMPLE", true),
            // A pattern without a port matches the host whatever its port (unlike Istio).
            ("shop.example:8080", true),
            ("shop.example:", true),
            ("shop.example.", true),
            ("Shop.Example.:80", true),
            ("shop.example.com", false),
            ("xshop.example", false),
            ("v1.API.example", true),
            ("v1.api.example:443", true),
            ("api.example", false),
            ("admin.internal", true),
            ("admin.internal:9000", true),
            ("", false),
        ] {
            let req = Req {
                host,
                ..Req::default()
            };
            assert_eq!(req_allowed(&policies, &req), expect, "{host:?}");
        }
        // A pattern with a port matches the whole authority.
        let policies =
            allow_op("{hosts: ['shop.example:8443', '*:9000', '[fd00::1]', '[fd00::2]:80']}");
        for (host, expect) in [
            ("shop.example:8443", true),
            ("SHOP.example:8443", true),
            ("shop.example", false),
            ("shop.example:8080", false),
            ("anything:9000", true),
            ("anything:90001", false),
            ("[fd00::1]", true),
            ("[fd00::1]:8080", true),
            ("[FD00::1]", true),
            ("[fd00::2]:80", true),
            ("[fd00::2]", false),
        ] {
            let req = Req {
                host,
                ..Req::default()
            };
            assert_eq!(req_allowed(&policies, &req), expect, "{host:?}");
        }
        // "*" is any host; notHosts excludes.
        let policies = allow_op("{hosts: ['*'], notHosts: [internal.example, '*.corp']}");
        for (host, expect) in [
            ("a.example", true),
            ("internal.example", false),
            ("Internal.Example:80", false),
            ("x.corp", false),
            ("", false),
        ] {
            let req = Req {
                host,
                ..Req::default()
            };
            assert_eq!(req_allowed(&policies, &req), expect, "{host:?}");
        }
        assert_eq!(host_without_port("a.example:80"), "a.example");
        assert_eq!(host_without_port("[::1]:80"), "[::1]");
        assert_eq!(host_without_port("::1"), "::1");
        assert_eq!(host_without_port("a.example:http"), "a.example:http");
        assert_eq!(host_without_port("."), ".");
    }

    #[test]
    fn header_conditions() {
        let policies =
            allow_when("{key: 'request.headers[x-user]', values: [alice, 'team-*', '*-admin']}");
        for (headers, expect) in [
            (&[("x-user", "alice")][..], true),
            (&[("X-USER", "alice")], true),
            (&[("x-user", "Alice")], false),
            (&[("x-user", "alice2")], false),
            (&[("x-user", "team-a")], true),
            (&[("x-user", "root-admin")], true),
            (&[("x-user", "")], false),
            (&[("x-other", "alice")], false),
            (&[], false),
            // Repeated headers are matched joined with ','.
            (&[("x-user", "alice"), ("x-user", "bob")], false),
            (&[("x-user", "team-a"), ("x-user", "bob")], true),
            (&[("x-user", "bob"), ("x-user", "root-admin")], true),
        ] {
            let req = Req {
                headers,
                ..Req::default()
            };
            assert_eq!(req_allowed(&policies, &req), expect, "{headers:?}");
        }
        let joined = allow_when("{key: 'request.headers[x-user]', values: ['alice,bob']}");
        let req = Req {
            headers: &[("x-user", "alice"), ("x-user", "bob")],
            ..Req::default()
        };
        assert!(req_allowed(&joined, &req));

        // notValues: an absent header satisfies them.
        let policies =
            allow_when("{key: 'request.headers[x-user]', notValues: [mallory, 'evil-*']}");
        for (headers, expect) in [
            (&[("x-user", "alice")][..], true),
            (&[("x-user", "mallory")], false),
            (&[("x-user", "evil-1")], false),
            (&[], true),
            // Joined ("alice,mallory"), as Istio does: matches neither value exactly.
            (&[("x-user", "alice"), ("x-user", "mallory")], true),
            (&[("x-user", "evil-1"), ("x-user", "alice")], false),
        ] {
            let req = Req {
                headers,
                ..Req::default()
            };
            assert_eq!(req_allowed(&policies, &req), expect, "{headers:?}");
        }
        // "*" is presence, even empty.
        let present = allow_when("{key: 'request.headers[x-token]', values: ['*']}");
        assert!(req_allowed(
            &present,
            &Req {
                headers: &[("x-token", "")],
                ..Req::default()
            }
        ));
        assert!(!req_allowed(&present, &Req::default()));
        let absent = allow_when("{key: 'request.headers[x-token]', notValues: ['*']}");
        assert!(req_allowed(&absent, &Req::default()));
        assert!(!req_allowed(
            &absent,
            &Req {
                headers: &[("x-token", "t")],
                ..Req::default()
            }
        ));

        // values and notValues together; every condition of a rule must hold.
        let policies = parse_ok(
            "authorizationPolicies:\n- name: p\n  namespace: shop\n  rules:\n  - when:\n    - {key: 'request.headers[x-user]', values: ['team-*'], notValues: [team-x]}\n    - {key: 'request.headers[x-env]', values: [prod]}\n",
        );
        for (headers, expect) in [
            (&[("x-user", "team-a"), ("x-env", "prod")][..], true),
            (&[("x-user", "team-x"), ("x-env", "prod")], false),
            (&[("x-user", "team-a")], false),
            (&[("x-user", "team-a"), ("x-env", "dev")], false),
        ] {
            let req = Req {
                headers,
                ..Req::default()
            };
            assert_eq!(req_allowed(&policies, &req), expect, "{headers:?}");
        }
    }

    #[test]
    fn joined_header_matching() {
        let v = |s: &'static [&'static str]| s.iter().map(|x| x.as_bytes());
        assert!(joined_starts_with(v(&["ab", "cd"]), b"ab,c"));
        assert!(joined_starts_with(v(&["ab", "cd"]), b"ab,"));
        assert!(joined_starts_with(v(&["ab", "cd"]), b"a"));
        assert!(!joined_starts_with(v(&["ab", "cd"]), b"abc"));
        assert!(!joined_starts_with(v(&["ab", "cd"]), b"ab,cd,"));
        assert!(!joined_starts_with(v(&[]), b"a"));
        assert!(joined_starts_with(v(&["", "x"]), b",x"));
        let r = |s: &'static [&'static str]| s.iter().rev().map(|x| x.as_bytes());
        assert!(joined_ends_with(r(&["ab", "cd"]), b"b,cd"));
        assert!(joined_ends_with(r(&["ab", "cd"]), b",cd"));
        assert!(joined_ends_with(r(&["ab", "cd"]), b"ab,cd"));
        assert!(!joined_ends_with(r(&["ab", "cd"]), b"bcd"));
        assert!(!joined_ends_with(r(&["ab", "cd"]), b",ab,cd"));
        assert!(!joined_ends_with(r(&[]), b"a"));
    }

    #[test]
    fn connection_conditions() {
        let shop = identity("shop", "frontend");
        let pay = identity("pay", "api");
        let ip = allow_when("{key: source.ip, values: [10.0.0.0/8], notValues: [10.9.0.0/16]}");
        assert!(!needs_http(&ip, &backend()));
        assert!(allowed(&ip, None, "10.1.2.3", 80));
        assert!(allowed(&ip, None, "::ffff:10.1.2.3", 80));
        assert!(!allowed(&ip, None, "10.9.2.3", 80));
        assert!(!allowed(&ip, None, "11.0.0.1", 80));

        let ns = allow_when("{key: source.namespace, values: ['sh*']}");
        assert!(allowed(&ns, Some(&shop), "10.0.0.1", 80));
        assert!(!allowed(&ns, Some(&pay), "10.0.0.1", 80));
        assert!(!allowed(&ns, None, "10.0.0.1", 80));
        let not_ns = allow_when("{key: source.namespace, notValues: [pay]}");
        assert!(
            allowed(&not_ns, None, "10.0.0.1", 80),
            "no identity satisfies notValues"
        );
        assert!(!allowed(&not_ns, Some(&pay), "10.0.0.1", 80));

        let principal = allow_when(
            "{key: source.principal, values: ['spiffe://cluster.local/ns/shop/sa/frontend']}",
        );
        assert!(allowed(&principal, Some(&shop), "10.0.0.1", 80));
        assert!(!allowed(
            &principal,
            Some(&identity("shop", "other")),
            "10.0.0.1",
            80
        ));
        assert!(!allowed(&principal, None, "10.0.0.1", 80));

        let port =
            allow_when("{key: destination.port, values: ['8080', 9090], notValues: ['9090']}");
        assert!(allowed(&port, None, "10.0.0.1", 8080));
        assert!(!allowed(&port, None, "10.0.0.1", 9090));
        assert!(!allowed(&port, None, "10.0.0.1", 80));
        // Per request, the same.
        assert!(req_allowed(
            &port,
            &Req {
                port: 8080,
                ..Req::default()
            }
        ));
        assert!(!req_allowed(
            &port,
            &Req {
                port: 9090,
                ..Req::default()
            }
        ));
    }

    #[test]
    fn http_fields_combined_with_principals_and_ports() {
        let policies = parse_ok(
            "authorizationPolicies:\n- name: p\n  namespace: shop\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/shop/sa/frontend]}}]\n    to: [{operation: {ports: ['8080'], methods: [GET], paths: ['/api/*']}}]\n  - from: [{source: {namespaces: [ops]}}]\n    to: [{operation: {ports: ['9090']}}]\n",
        );
        let frontend = identity("shop", "frontend");
        let ops = identity("ops", "prom");
        let base = Req {
            id: Some(&frontend),
            method: "GET",
            path: "/api/x",
            ..Req::default()
        };
        assert!(req_allowed(&policies, &base));
        for bad in [
            Req {
                id: Some(&ops),
                ..base
            },
            Req { id: None, ..base },
            Req { port: 9090, ..base },
            Req {
                method: "POST",
                ..base
            },
            Req {
                path: "/metrics",
                ..base
            },
        ] {
            assert!(
                !req_allowed(&policies, &bad),
                "{:?} {} {} {}",
                bad.id,
                bad.port,
                bad.method,
                bad.path
            );
        }
        // The L4-only rule holds per request too, whatever the request.
        assert!(req_allowed(
            &policies,
            &Req {
                id: Some(&ops),
                port: 9090,
                method: "DELETE",
                path: "/x",
                ..Req::default()
            }
        ));
        assert!(!req_allowed(
            &policies,
            &Req {
                id: Some(&ops),
                port: 8080,
                ..base
            }
        ));
    }

    #[test]
    fn deny_beats_allow_per_request() {
        let policies = parse_ok(
            "authorizationPolicies:\n\
             - {name: open, namespace: shop, rules: [{to: [{operation: {methods: [GET, POST]}}]}]}\n\
             - {name: no-admin, namespace: shop, action: DENY, rules: [{to: [{operation: {paths: ['/admin/*']}}]}]}\n\
             - {name: no-bots, namespace: shop, action: DENY, rules: [{when: [{key: 'request.headers[user-agent]', values: ['*bot', 'curl/*']}]}]}\n",
        );
        assert_eq!(
            eval_req(
                &policies,
                &Req {
                    path: "/shop",
                    ..Req::default()
                }
            ),
            Decision::Allow {
                policy: Some("shop/open".into())
            }
        );
        match eval_req(
            &policies,
            &Req {
                path: "/admin/users",
                ..Req::default()
            },
        ) {
            Decision::Deny { policy, reason } => {
                assert_eq!(policy.as_deref(), Some("shop/no-admin"));
                assert!(reason.contains("shop/no-admin"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        for agent in ["googlebot", "curl/8.5"] {
            let d = eval_req(
                &policies,
                &Req {
                    headers: &[("user-agent", agent)],
                    ..Req::default()
                },
            );
            assert!(
                matches!(&d, Decision::Deny { policy: Some(p), .. } if &**p == "shop/no-bots"),
                "{agent}: {d:?}"
            );
        }
        assert!(req_allowed(
            &policies,
            &Req {
                headers: &[("user-agent", "Mozilla/5.0")],
                ..Req::default()
            }
        ));
        // Not allowed by the ALLOW policy: denied without a policy to cite.
        let d = eval_req(
            &policies,
            &Req {
                method: "DELETE",
                path: "/shop",
                ..Req::default()
            },
        );
        assert!(matches!(d, Decision::Deny { policy: None, .. }), "{d:?}");
    }

    #[test]
    fn needs_http_follows_the_selected_policies() {
        let l4 = parse_ok(EXAMPLE);
        assert!(!needs_http(&l4, &backend()));
        assert!(!needs_http(&[], &backend()));
        let when_l4 = allow_when("{key: source.ip, values: [10.0.0.0/8]}");
        assert!(!needs_http(&when_l4, &backend()));

        let header = allow_when("{key: 'request.headers[x-user]', values: [a]}");
        assert!(needs_http(&header, &backend()));
        // Only for the workloads the policy selects.
        assert!(!needs_http(
            &header,
            &workload("pay", "api", &[("app", "backend")])
        ));
        let selected = parse_ok(
            "authorizationPolicies:\n- {name: p, namespace: shop, selector: {matchLabels: {app: db}}, action: DENY, rules: [{to: [{operation: {notMethods: [GET]}}]}]}\n",
        );
        assert!(!needs_http(&selected, &backend()));
        assert!(needs_http(
            &selected,
            &workload("shop", "db", &[("app", "db")])
        ));
        let root = parse_ok(&format!(
            "authorizationPolicies:\n- {{name: p, namespace: {ROOT_NAMESPACE}, rules: [{{to: [{{operation: {{hosts: [a.example]}}}}]}}]}}\n"
        ));
        assert!(needs_http(&root, &workload("pay", "api", &[])));
        // One HTTP rule among L4 ones suffices.
        let mixed = parse_ok(
            "authorizationPolicies:\n- {name: p, namespace: shop, rules: [{from: [{source: {namespaces: [shop]}}]}, {to: [{operation: {ports: ['80'], paths: [/x]}}]}]}\n",
        );
        assert!(mixed[0].has_http_rules());
        assert!(!mixed[0].rules[0].has_http_fields());
        assert!(needs_http(&mixed, &backend()));
    }

    /// At connection level (no request known), as ztunnel: ALLOW rules with HTTP fields never
    /// match; DENY rules are enforced without their HTTP fields.
    #[test]
    fn connection_level_with_http_rules() {
        let frontend = identity("shop", "frontend");
        let pay = identity("pay", "api");

        // ALLOW with only HTTP rules: the policy applies but cannot match, so all is denied.
        let allow_get = allow_op("{methods: [GET]}");
        let d = eval(&allow_get, &backend(), Some(&frontend), "10.0.0.1", 8080);
        assert!(matches!(d, Decision::Deny { policy: None, .. }), "{d:?}");
        assert!(req_allowed(&allow_get, &Req::default()));
        // Even when its other fields match: the whole rule is omitted.
        let mixed = parse_ok(
            "authorizationPolicies:\n- name: p\n  namespace: shop\n  rules:\n  - from: [{source: {namespaces: [shop]}}]\n    to: [{operation: {ports: ['8080'], paths: ['/api/*']}}]\n  - from: [{source: {namespaces: [ops]}}]\n",
        );
        assert!(!allowed(&mixed, Some(&frontend), "10.0.0.1", 8080));
        // ...while its L4-only rules still allow.
        assert!(allowed(
            &mixed,
            Some(&identity("ops", "x")),
            "10.0.0.1",
            8080
        ));
        // L4 `when` keys do not make a rule HTTP.
        let l4_when = allow_when("{key: destination.port, values: ['8080']}");
        assert!(allowed(&l4_when, None, "10.0.0.1", 8080));

        // DENY with only HTTP fields: denies every connection (fails closed; ztunnel's empty
        // match would deny none, istio/istio#61126).
        let deny_admin = parse_ok(
            "authorizationPolicies:\n- {name: open, namespace: shop, rules: [{}]}\n- {name: no-admin, namespace: shop, action: DENY, rules: [{to: [{operation: {paths: ['/admin/*']}}]}]}\n",
        );
        let d = eval(&deny_admin, &backend(), None, "10.0.0.1", 8080);
        assert_eq!(
            d,
            Decision::Deny {
                policy: Some("shop/no-admin".into()),
                reason: "denied by DENY policy shop/no-admin".into()
            }
        );
        assert!(req_allowed(
            &deny_admin,
            &Req {
                path: "/shop",
                ..Req::default()
            }
        ));
        assert!(!req_allowed(
            &deny_admin,
            &Req {
                path: "/admin/x",
                ..Req::default()
            }
        ));
        // notPaths too: "deny all but /public" denies everything at L4.
        let deny_not_public = parse_ok(
            "authorizationPolicies:\n- {name: d, namespace: shop, action: DENY, rules: [{to: [{operation: {notPaths: ['/public/*']}}]}]}\n",
        );
        assert!(!allowed(&deny_not_public, None, "10.0.0.1", 8080));
        assert!(req_allowed(
            &deny_not_public,
            &Req {
                path: "/public/a",
                ..Req::default()
            }
        ));

        // DENY with ports + HTTP fields: enforced as the ports alone.
        let deny_port = parse_ok(
            "authorizationPolicies:\n- {name: d, namespace: shop, action: DENY, rules: [{to: [{operation: {ports: ['9000'], methods: [DELETE]}}]}]}\n",
        );
        assert!(!allowed(&deny_port, None, "10.0.0.1", 9000));
        assert!(allowed(&deny_port, None, "10.0.0.1", 8080));
        assert!(req_allowed(
            &deny_port,
            &Req {
                port: 9000,
                method: "GET",
                ..Req::default()
            }
        ));
        assert!(!req_allowed(
            &deny_port,
            &Req {
                port: 9000,
                method: "DELETE",
                ..Req::default()
            }
        ));

        // DENY with a source + a header condition: enforced as the source alone.
        let deny_pay = parse_ok(
            "authorizationPolicies:\n- name: d\n  namespace: shop\n  action: DENY\n  rules:\n  - from: [{source: {namespaces: [pay]}}]\n    when: [{key: 'request.headers[x-debug]', values: ['*']}]\n",
        );
        assert!(!allowed(&deny_pay, Some(&pay), "10.0.0.1", 8080));
        assert!(allowed(&deny_pay, Some(&frontend), "10.0.0.1", 8080));
        assert!(req_allowed(
            &deny_pay,
            &Req {
                id: Some(&pay),
                ..Req::default()
            }
        ));
        assert!(!req_allowed(
            &deny_pay,
            &Req {
                id: Some(&pay),
                headers: &[("x-debug", "1")],
                ..Req::default()
            }
        ));
        assert!(req_allowed(
            &deny_pay,
            &Req {
                id: Some(&frontend),
                headers: &[("x-debug", "1")],
                ..Req::default()
            }
        ));
    }
}
