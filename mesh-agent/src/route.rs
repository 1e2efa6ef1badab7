//! HTTP routing: Gateway API `HTTPRoute`s attached to Services (GAMMA), their matching with
//! Gateway API precedence, and their filters.
//!
//! ```yaml
//! httpRoutes:
//!   - name: backend-routes
//!     namespace: shop
//!     parentRefs: [{kind: Service, name: backend, port: 80}]  # port optional: every HTTP port
//!     rules:                                                  # absent = one rule matching "/"
//!       - matches:                                            # absent/empty = PathPrefix "/"
//!           - path: {type: PathPrefix, value: /api}           # Exact | PathPrefix | RegularExpression
//!             headers: [{type: Exact, name: x-user, value: alice}]  # Exact | RegularExpression
//!             queryParams: [{type: Exact, name: debug, value: "1"}]
//!             method: GET
//!         filters:
//!           - type: RequestHeaderModifier
//!             requestHeaderModifier: {set: [{name: x-a, value: "1"}], add: [...], remove: [x-c]}
//!           - type: ResponseHeaderModifier
//!             responseHeaderModifier: {set: [], add: [], remove: []}
//!           - type: URLRewrite
//!             urlRewrite: {hostname: other.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
//!           - type: RequestRedirect                           # not together with URLRewrite
//!             requestRedirect: {scheme: https, hostname: x, path: {...}, port: 8443, statusCode: 301}
//!         backendRefs:                                        # absent = the parent service
//!           - {name: backend-v1, port: 80, weight: 90}
//!           - {name: backend-v2, port: 80, weight: 10}
//!         timeouts: {request: 2s, backendRequest: 500ms}      # "0s" = no timeout
//!         retry: {attempts: 2, codes: [503], backoff: 25ms, perTryTimeout: 1s, retryOnConnectFailure: true}
//!         fault: {delay: {fixedDelay: 100ms, percentage: 10}, abort: {httpStatus: 503, percentage: 5}}
//!         rateLimit: {requestsPerSecond: 100, burst: 20}
//! ```
//!
//! Semantics are Gateway API's (v1.2), with these choices where it leaves them open:
//! - Only Service parents in the route's own namespace ("producer routes"): a route in another
//!   namespace would be a consumer route, which applies to that namespace's clients only; it is
//!   rejected until the caller's namespace takes part in selection. Cross-namespace backends
//!   (which need a ReferenceGrant) are rejected too.
//! - A parentRef without `port` attaches to every port of the service that is not declared
//!   opaque TCP; a port that is (`appProtocol: tcp`, `tcp-*` name) cannot be a parent.
//! - Precedence across all matches of all routes of a parent: Exact path, then PathPrefix
//!   (longest first), then RegularExpression (longest pattern first, like Istio); then a method
//!   match; then more header matches; then more query matches; then file order of the routes
//!   (standing in for creation time), `namespace/name`, rule order, match order.
//! - PathPrefix matches whole segments, a trailing `/` of the prefix ignored: `/api` and
//!   `/api/` both match `/api`, `/api/` and `/api/x`, never `/apix`. Regular expressions (paths,
//!   headers, query values) must match the whole value (as Envoy). Header values repeated in a
//!   request are matched joined with `,`; a repeated query parameter by its first occurrence;
//!   query names and values are compared percent-decoded.
//! - Filters run in the order written. Header modifiers remove, then set, then add.
//! - A rule without backendRefs sends to its parent service on the request's port; a rule
//!   whose weights are all 0 has no backend ([`RouteRule::pick_backend`] = `None`: answer 500).
//! - `retry.attempts` counts retries after the first try (default 2, as Istio); retries
//!   happen on the listed `codes` and, unless `retryOnConnectFailure: false`, on connect
//!   failures. Fault percentages default to 100.

use std::{borrow::Cow, cmp::Reverse, collections::HashMap, fmt, sync::Arc, time::Duration};

use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Uri,
    header::{HOST, LOCATION},
    request::Parts,
    uri::{Authority, PathAndQuery},
};
use regex::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize, Serializer, de::IgnoredAny, ser::SerializeStruct};

use crate::{
    config::{ConfigError, is_dns_label, is_dns_subdomain, parse_duration},
    service::{AppProtocol, Service, first_duplicate},
};

/// Where the routes sit in the config file, for error paths.
const FIELD: &str = "httpRoutes";

/// Largest weight Gateway API allows on a backendRef.
const MAX_WEIGHT: i64 = 1_000_000;

// ---------------------------------------------------------------------------------------------
// The file's shape.
// ---------------------------------------------------------------------------------------------

/// One entry of `httpRoutes:` as written in the file.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileHttpRoute {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub parent_refs: Vec<FileParentRef>,
    /// Absent = one rule that matches everything.
    #[serde(default)]
    pub rules: Option<Vec<FileRouteRule>>,
    /// Declared only to be rejected with a clear message.
    #[serde(default)]
    pub hostnames: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileParentRef {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    pub name: String,
    #[serde(default)]
    pub port: Option<i64>,
    #[serde(default)]
    pub section_name: Option<IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileRouteRule {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Option<Vec<FileMatch>>,
    #[serde(default)]
    pub filters: Vec<FileFilter>,
    #[serde(default)]
    pub backend_refs: Option<Vec<FileBackendRef>>,
    #[serde(default)]
    pub timeouts: Option<FileTimeouts>,
    #[serde(default)]
    pub retry: Option<FileRetry>,
    #[serde(default)]
    pub fault: Option<FileFault>,
    #[serde(default)]
    pub rate_limit: Option<FileRateLimit>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileMatch {
    #[serde(default)]
    pub path: Option<FilePathMatch>,
    #[serde(default)]
    pub headers: Vec<FileValueMatch>,
    #[serde(default)]
    pub query_params: Vec<FileValueMatch>,
    #[serde(default)]
    pub method: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FilePathMatch {
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub value: Option<String>,
}

/// A header or query parameter match.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileValueMatch {
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    pub name: String,
    pub value: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileFilter {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub request_header_modifier: Option<FileHeaderModifier>,
    #[serde(default)]
    pub response_header_modifier: Option<FileHeaderModifier>,
    #[serde(default)]
    pub url_rewrite: Option<FileUrlRewrite>,
    #[serde(default)]
    pub request_redirect: Option<FileRequestRedirect>,
    #[serde(default)]
    pub request_mirror: Option<IgnoredAny>,
    #[serde(default)]
    pub extension_ref: Option<IgnoredAny>,
    #[serde(default)]
    pub cors: Option<IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileHeaderModifier {
    #[serde(default)]
    pub set: Vec<FileHeader>,
    #[serde(default)]
    pub add: Vec<FileHeader>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileHeader {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileUrlRewrite {
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<FilePathModifier>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FilePathModifier {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub replace_full_path: Option<String>,
    #[serde(default)]
    pub replace_prefix_match: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileRequestRedirect {
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<FilePathModifier>,
    #[serde(default)]
    pub port: Option<i64>,
    #[serde(default)]
    pub status_code: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileBackendRef {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    pub name: String,
    #[serde(default)]
    pub port: Option<i64>,
    #[serde(default)]
    pub weight: Option<i64>,
    #[serde(default)]
    pub filters: Option<IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileTimeouts {
    #[serde(default)]
    pub request: Option<String>,
    #[serde(default)]
    pub backend_request: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileRetry {
    #[serde(default)]
    pub attempts: Option<i64>,
    #[serde(default)]
    pub codes: Vec<i64>,
    #[serde(default)]
    pub backoff: Option<String>,
    #[serde(default)]
    pub per_try_timeout: Option<String>,
    #[serde(default)]
    pub retry_on_connect_failure: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileFault {
    #[serde(default)]
    pub delay: Option<FileFaultDelay>,
    #[serde(default)]
    pub abort: Option<FileFaultAbort>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileFaultDelay {
    pub fixed_delay: String,
    #[serde(default)]
    pub percentage: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileFaultAbort {
    pub http_status: i64,
    #[serde(default)]
    pub percentage: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileRateLimit {
    pub requests_per_second: i64,
    #[serde(default)]
    pub burst: Option<i64>,
}

// ---------------------------------------------------------------------------------------------
// The validated, compiled form.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HttpRoute {
    pub name: String,
    pub namespace: String,
    pub parent_refs: Vec<ParentRef>,
    /// At least one.
    pub rules: Vec<RouteRule>,
}

/// A parent Service of a route.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ParentRef {
    pub namespace: String,
    pub name: String,
    /// As written; `None` = every HTTP-capable port.
    pub port: Option<u16>,
    /// The service ports the route attaches to (resolved against the snapshot's services).
    pub ports: Vec<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RouteRule {
    /// `namespace/name` of the route, for logs and metrics.
    #[serde(serialize_with = "ser::as_str")]
    pub route: Arc<str>,
    /// Position of the rule in its route.
    pub index: usize,
    /// `namespace/name#index`: names the rule in access logs and keys its rate limit.
    #[serde(skip)]
    pub label: Arc<str>,
    pub name: Option<String>,
    /// At least one.
    pub matches: Vec<RouteMatch>,
    /// In the order written.
    pub filters: Vec<Filter>,
    /// Empty in a validated [`HttpRoute`] = the parent service; [`RouteTable`] fills in the
    /// parent (weight 1) in the rules it serves, so that [`RouteRule::pick_backend`] sees it.
    pub backend_refs: Vec<BackendRef>,
    pub timeouts: Timeouts,
    pub retry: Option<Retry>,
    pub fault: Option<Fault>,
    pub rate_limit: Option<RateLimit>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RouteMatch {
    pub path: PathMatch,
    pub headers: Vec<HeaderMatch>,
    pub query_params: Vec<QueryParamMatch>,
    #[serde(serialize_with = "ser::opt_as_str")]
    pub method: Option<Method>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type", content = "value")]
pub enum PathMatch {
    Exact(String),
    /// Without trailing `/`, except the prefix `/` itself.
    PathPrefix(String),
    RegularExpression(Pattern),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HeaderMatch {
    #[serde(serialize_with = "ser::as_str")]
    pub name: HeaderName,
    pub value: ValueMatch,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct QueryParamMatch {
    pub name: String,
    pub value: ValueMatch,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type", content = "value")]
pub enum ValueMatch {
    Exact(String),
    RegularExpression(Pattern),
}

/// A regular expression that must match a whole value, compiled once.
#[derive(Clone)]
pub struct Pattern {
    source: String,
    regex: Regex,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type")]
pub enum Filter {
    RequestHeaderModifier(HeaderModifier),
    ResponseHeaderModifier(HeaderModifier),
    #[serde(rename = "URLRewrite")]
    UrlRewrite(UrlRewrite),
    RequestRedirect(RequestRedirect),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HeaderModifier {
    pub set: Vec<Header>,
    pub add: Vec<Header>,
    #[serde(serialize_with = "ser::names")]
    pub remove: Vec<HeaderName>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub name: HeaderName,
    pub value: HeaderValue,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UrlRewrite {
    pub hostname: Option<Hostname>,
    pub path: Option<PathModifier>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type", content = "value")]
pub enum PathModifier {
    ReplaceFullPath(String),
    /// Possibly empty.
    ReplacePrefixMatch(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RequestRedirect {
    /// `http` or `https`; `None` = the request's.
    pub scheme: Option<String>,
    pub hostname: Option<Hostname>,
    pub path: Option<PathModifier>,
    pub port: Option<u16>,
    /// 301 or 302.
    pub status_code: u16,
}

/// A precise host name, with its header and URI forms ready.
#[derive(Clone, Debug)]
pub struct Hostname {
    text: String,
    header: HeaderValue,
    authority: Authority,
}

/// A Service to send to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct BackendRef {
    pub namespace: String,
    pub name: String,
    pub port: u16,
    /// 0 = never chosen.
    pub weight: u32,
}

/// `None` = no timeout.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Timeouts {
    /// From the request's start to the last byte of the response, retries included.
    pub request: Option<Duration>,
    /// One try to a backend.
    pub backend_request: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Retry {
    /// Retries after the first try.
    pub attempts: u32,
    /// Response codes that are retried, sorted.
    pub codes: Vec<u16>,
    pub backoff: Duration,
    pub per_try_timeout: Option<Duration>,
    pub retry_on_connect_failure: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Fault {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FaultDelay {
    pub fixed_delay: Duration,
    pub percentage: Percentage,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FaultAbort {
    pub http_status: u16,
    pub percentage: Percentage,
}

/// A fraction of requests, 0 to 100 %, kept in millionths so that it is exact and `Eq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Percentage {
    per_million: u32,
}

/// A token bucket per destination workload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RateLimit {
    pub requests_per_second: u32,
    /// Bucket size; default = `requests_per_second`.
    pub burst: u32,
}

/// What [`Fault::sample`] decided for one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultAction {
    pub delay: Option<Duration>,
    pub abort: Option<StatusCode>,
}

// ---------------------------------------------------------------------------------------------
// Selection.
// ---------------------------------------------------------------------------------------------

/// The path match that selected a rule; URL rewrites and redirects with `ReplacePrefixMatch`
/// replace the matched prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatchedPath<'a> {
    Exact(&'a str),
    /// The normalized prefix (no trailing `/`, except `/` itself).
    Prefix(&'a str),
    RegularExpression(&'a str),
}

#[derive(Clone, Copy, Debug)]
pub enum RouteDecision<'a> {
    /// No route is attached to the service port: send to the service itself.
    NoRoutes,
    /// Routes are attached but none matches: answer 404.
    NoMatch,
    Matched(&'a RouteRule, MatchedPath<'a>),
}

/// The routes of a snapshot, indexed by parent service port, every parent's matches sorted by
/// precedence. Built once per snapshot.
#[derive(Clone, Debug, Default)]
pub struct RouteTable {
    /// The rules served, one copy per parent port (a copy's implicit backend is that parent).
    rules: Vec<RouteRule>,
    /// namespace -> name -> port -> candidates in precedence order.
    parents: HashMap<String, HashMap<String, HashMap<u16, Vec<Candidate>>>>,
}

#[derive(Clone, Copy, Debug)]
struct Candidate {
    rule: usize,
    matched: usize,
}

/// Gateway API precedence of a match: larger is preferred.
type Rank = (u8, usize, bool, usize, usize);

fn rank(m: &RouteMatch) -> Rank {
    let (kind, len) = match &m.path {
        PathMatch::Exact(v) => (2, v.len()),
        PathMatch::PathPrefix(v) => (1, v.len()),
        PathMatch::RegularExpression(p) => (0, p.as_str().len()),
    };
    (
        kind,
        len,
        m.method.is_some(),
        m.headers.len(),
        m.query_params.len(),
    )
}

impl RouteTable {
    pub fn new(routes: &[HttpRoute]) -> Self {
        struct Entry {
            rank: Reverse<Rank>,
            route_order: usize,
            route_key: Arc<str>,
            rule_index: usize,
            candidate: Candidate,
        }
        let mut rules = Vec::new();
        let mut entries: HashMap<(&str, &str, u16), Vec<Entry>> = HashMap::new();
        for (order, route) in routes.iter().enumerate() {
            for parent in &route.parent_refs {
                for &port in &parent.ports {
                    let list = entries
                        .entry((&parent.namespace, &parent.name, port))
                        .or_default();
                    for rule in &route.rules {
                        let mut served = rule.clone();
                        if served.backend_refs.is_empty() && served.redirect_filter().is_none() {
                            served.backend_refs.push(BackendRef {
                                namespace: parent.namespace.clone(),
                                name: parent.name.clone(),
                                port,
                                weight: 1,
                            });
                        }
                        let index = rules.len();
                        for (m, matched) in served.matches.iter().enumerate() {
                            list.push(Entry {
                                rank: Reverse(rank(matched)),
                                route_order: order,
                                route_key: served.route.clone(),
                                rule_index: served.index,
                                candidate: Candidate {
                                    rule: index,
                                    matched: m,
                                },
                            });
                        }
                        rules.push(served);
                    }
                }
            }
        }
        let mut parents: HashMap<String, HashMap<String, HashMap<u16, Vec<Candidate>>>> =
            HashMap::new();
        for ((namespace, name, port), mut list) in entries {
            list.sort_by(|a, b| {
                (
                    a.rank,
                    a.route_order,
                    &a.route_key,
                    a.rule_index,
                    a.candidate.matched,
                )
                    .cmp(&(
                        b.rank,
                        b.route_order,
                        &b.route_key,
                        b.rule_index,
                        b.candidate.matched,
                    ))
            });
            parents
                .entry(namespace.to_string())
                .or_default()
                .entry(name.to_string())
                .or_default()
                .insert(port, list.into_iter().map(|e| e.candidate).collect());
        }
        RouteTable { rules, parents }
    }

    /// Whether no route is attached anywhere.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.parents.is_empty()
    }

    /// Whether routes are attached to the service port (then a request is either matched or
    /// answered 404).
    #[cfg(test)]
    pub fn has_routes(&self, service_ns: &str, service_name: &str, port: u16) -> bool {
        self.candidates(service_ns, service_name, port).is_some()
    }

    /// The rules attached to the service port (a rule with several matches more than
    /// once); `None` when no route is.
    pub fn rules_for(
        &self,
        service_ns: &str,
        service_name: &str,
        port: u16,
    ) -> Option<impl Iterator<Item = &RouteRule>> {
        self.candidates(service_ns, service_name, port)
            .map(|candidates| candidates.iter().map(|c| &self.rules[c.rule]))
    }

    fn candidates(&self, ns: &str, name: &str, port: u16) -> Option<&[Candidate]> {
        self.parents
            .get(ns)?
            .get(name)?
            .get(&port)
            .map(Vec::as_slice)
    }

    /// The rule that serves a request to the service `service_ns/service_name` on `port`, by
    /// Gateway API precedence (see the module documentation). Does not allocate unless a
    /// repeated header or a percent-encoded query parameter has to be matched.
    pub fn select(
        &self,
        service_ns: &str,
        service_name: &str,
        port: u16,
        req: &Parts,
    ) -> RouteDecision<'_> {
        let Some(candidates) = self.candidates(service_ns, service_name, port) else {
            return RouteDecision::NoRoutes;
        };
        let path = req.uri.path();
        let query = req.uri.query();
        for c in candidates {
            let rule = &self.rules[c.rule];
            let m = &rule.matches[c.matched];
            if m.matches(&req.method, path, query, &req.headers) {
                return RouteDecision::Matched(rule, m.path.matched());
            }
        }
        RouteDecision::NoMatch
    }
}

impl RouteMatch {
    /// `/`-prefix: what an absent match means.
    fn everything() -> Self {
        RouteMatch {
            path: PathMatch::PathPrefix("/".into()),
            headers: Vec::new(),
            query_params: Vec::new(),
            method: None,
        }
    }

    pub fn matches(
        &self,
        method: &Method,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> bool {
        self.method.as_ref().is_none_or(|m| m == method)
            && self.path.matches(path)
            && self.headers.iter().all(|h| h.matches(headers))
            && self.query_params.iter().all(|q| q.matches(query))
    }
}

impl PathMatch {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(value) => path == value,
            PathMatch::PathPrefix(prefix) => prefix_matches(prefix, path),
            PathMatch::RegularExpression(pattern) => pattern.is_match(path),
        }
    }

    pub fn matched(&self) -> MatchedPath<'_> {
        match self {
            PathMatch::Exact(v) => MatchedPath::Exact(v),
            PathMatch::PathPrefix(v) => MatchedPath::Prefix(v),
            PathMatch::RegularExpression(p) => MatchedPath::RegularExpression(p.as_str()),
        }
    }
}

/// Segment-wise prefix match; `prefix` is normalized (no trailing `/` unless it is `/`).
fn prefix_matches(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || (path.starts_with(prefix)
            && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/')))
}

impl HeaderMatch {
    fn matches(&self, headers: &HeaderMap) -> bool {
        let mut values = headers.get_all(&self.name).iter();
        let Some(first) = values.next() else {
            return false;
        };
        match values.next() {
            None => self.value.matches_bytes(first.as_bytes()),
            Some(second) => {
                // Repeated header: matched as one comma-joined value (RFC 9110 5.3).
                let mut joined = first.as_bytes().to_vec();
                for v in std::iter::once(second).chain(values) {
                    joined.push(b',');
                    joined.extend_from_slice(v.as_bytes());
                }
                self.value.matches_bytes(&joined)
            }
        }
    }
}

impl QueryParamMatch {
    fn matches(&self, query: Option<&str>) -> bool {
        let Some(query) = query else {
            return false;
        };
        for pair in query.split('&') {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            if *percent_decode(name) == *self.name {
                return self.value.matches_str(&percent_decode(value));
            }
        }
        false
    }
}

impl ValueMatch {
    fn matches_bytes(&self, value: &[u8]) -> bool {
        match self {
            ValueMatch::Exact(s) => value == s.as_bytes(),
            ValueMatch::RegularExpression(p) => {
                std::str::from_utf8(value).is_ok_and(|v| p.is_match(v))
            }
        }
    }

    fn matches_str(&self, value: &str) -> bool {
        match self {
            ValueMatch::Exact(s) => value == s,
            ValueMatch::RegularExpression(p) => p.is_match(value),
        }
    }
}

/// Decodes `%XX` escapes and `+` (form encoding) of a query component; borrows when there is
/// nothing to decode. Invalid escapes are kept as written.
fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.bytes().any(|b| b == b'%' || b == b'+') {
        return Cow::Borrowed(s);
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) {
                (Some(hi), Some(lo)) => {
                    out.push((hi * 16 + lo) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

// ---------------------------------------------------------------------------------------------
// Acting on a matched rule.
// ---------------------------------------------------------------------------------------------

impl RouteRule {
    /// A backend chosen by weight; `None` when every weight is 0 (the caller answers 500).
    pub fn pick_backend(&self, rng: &mut fastrand::Rng) -> Option<&BackendRef> {
        let total: u64 = self.backend_refs.iter().map(|b| u64::from(b.weight)).sum();
        if total == 0 {
            return None;
        }
        let mut draw = rng.u64(0..total);
        for backend in &self.backend_refs {
            let weight = u64::from(backend.weight);
            if draw < weight {
                return Some(backend);
            }
            draw -= weight;
        }
        None
    }

    /// Applies the request header modifiers and URL rewrite, in the order written.
    pub fn apply_request_filters(&self, parts: &mut Parts, matched: &MatchedPath<'_>) {
        for filter in &self.filters {
            match filter {
                Filter::RequestHeaderModifier(m) => m.apply(&mut parts.headers),
                Filter::UrlRewrite(rewrite) => rewrite.apply(parts, matched),
                Filter::ResponseHeaderModifier(_) | Filter::RequestRedirect(_) => {}
            }
        }
    }

    /// The redirect response, when the rule redirects. `service_port` is the port the request
    /// was sent to (the "listener port" of Gateway API's port rules).
    pub fn redirect(
        &self,
        parts: &Parts,
        matched: &MatchedPath<'_>,
        service_port: u16,
    ) -> Option<Response<()>> {
        let redirect = self.redirect_filter()?;
        let mut response = Response::new(());
        match HeaderValue::try_from(redirect.location(parts, matched, service_port)) {
            Ok(location) => {
                *response.status_mut() =
                    StatusCode::from_u16(redirect.status_code).unwrap_or(StatusCode::FOUND);
                response.headers_mut().insert(LOCATION, location);
            }
            // Unreachable in practice: every piece comes from a valid URI or header.
            Err(_) => *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR,
        }
        Some(response)
    }

    /// Applies the response header modifiers, in the order written.
    pub fn apply_response_filters(&self, headers: &mut HeaderMap) {
        for filter in &self.filters {
            if let Filter::ResponseHeaderModifier(m) = filter {
                m.apply(headers);
            }
        }
    }

    pub fn redirect_filter(&self) -> Option<&RequestRedirect> {
        self.filters.iter().find_map(|f| match f {
            Filter::RequestRedirect(r) => Some(r),
            _ => None,
        })
    }
}

impl HeaderModifier {
    /// Remove, then set (replacing every value), then add (appending).
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for h in &self.set {
            headers.insert(h.name.clone(), h.value.clone());
        }
        for h in &self.add {
            headers.append(h.name.clone(), h.value.clone());
        }
    }
}

impl UrlRewrite {
    fn apply(&self, parts: &mut Parts, matched: &MatchedPath<'_>) {
        if let Some(host) = &self.hostname {
            let had_authority = parts.uri.authority().is_some();
            if had_authority {
                let mut uri = std::mem::take(&mut parts.uri).into_parts();
                uri.authority = Some(host.authority.clone());
                // Cannot fail: the URI had a scheme and authority already.
                parts.uri = Uri::from_parts(uri).unwrap_or_default();
            }
            // HTTP/2 requests carry the authority in the URI; HTTP/1 in Host.
            if !had_authority || parts.headers.contains_key(HOST) {
                parts.headers.insert(HOST, host.header.clone());
            }
        }
        if let Some(modifier) = &self.path
            && let Some(path) = modifier.apply(parts.uri.path(), matched)
            && let Some(uri) = with_path(&parts.uri, &path)
        {
            parts.uri = uri;
        }
    }
}

impl PathModifier {
    /// The new path for `path` (query not included); `None` = unchanged (a prefix
    /// replacement when the rule did not match by prefix, which validation prevents).
    pub fn apply(&self, path: &str, matched: &MatchedPath<'_>) -> Option<String> {
        match self {
            PathModifier::ReplaceFullPath(full) => Some(full.clone()),
            PathModifier::ReplacePrefixMatch(replacement) => {
                let MatchedPath::Prefix(prefix) = *matched else {
                    return None;
                };
                let prefix = if prefix == "/" { "" } else { prefix };
                let rest = path.strip_prefix(prefix)?;
                let replacement = replacement.trim_end_matches('/');
                let mut out = String::with_capacity(replacement.len() + rest.len() + 1);
                out.push_str(replacement);
                out.push_str(rest);
                if !out.starts_with('/') {
                    out.insert(0, '/');
                }
                Some(out)
            }
        }
    }
}

/// `uri` with its path replaced, its query kept.
fn with_path(uri: &Uri, path: &str) -> Option<Uri> {
    let mut text = String::with_capacity(path.len() + uri.query().map_or(0, |q| q.len() + 1));
    text.push_str(path);
    if let Some(query) = uri.query() {
        text.push('?');
        text.push_str(query);
    }
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(PathAndQuery::try_from(text).ok()?);
    Uri::from_parts(parts).ok()
}

impl RequestRedirect {
    /// The `Location` of the redirect, by Gateway API's rules: scheme, host and path default to
    /// the request's; the port is the configured one, else the scheme's well-known port when
    /// the scheme is configured, else `service_port`; it is left out when it is the scheme's
    /// default. The query is kept. Without any known host the location is relative.
    pub fn location(&self, parts: &Parts, matched: &MatchedPath<'_>, service_port: u16) -> String {
        let scheme = self
            .scheme
            .as_deref()
            .or(parts.uri.scheme_str())
            .unwrap_or("http");
        let host = match &self.hostname {
            Some(h) => Some(h.as_str()),
            None => request_host(parts),
        };
        let port = self
            .port
            .or(match self.scheme.as_deref() {
                Some("http") => Some(80),
                Some("https") => Some(443),
                _ => None,
            })
            .unwrap_or(service_port);
        let request_path = parts.uri.path();
        let path = self
            .path
            .as_ref()
            .and_then(|m| m.apply(request_path, matched))
            .map_or(Cow::Borrowed(request_path), Cow::Owned);
        let mut location = String::new();
        if let Some(host) = host {
            location.push_str(scheme);
            location.push_str("://");
            location.push_str(host);
            if !matches!((scheme, port), ("http", 80) | ("https", 443)) {
                location.push(':');
                location.push_str(&port.to_string());
            }
        }
        location.push_str(&path);
        if let Some(query) = parts.uri.query() {
            location.push('?');
            location.push_str(query);
        }
        location
    }
}

/// The host (no port) the request was sent to: the URI's authority, else the Host header.
fn request_host(parts: &Parts) -> Option<&str> {
    if let Some(host) = parts.uri.host() {
        return Some(host);
    }
    let host = parts.headers.get(HOST)?.to_str().ok()?;
    let host = if host.starts_with('[') {
        // [v6]:port
        &host[..=host.find(']')?]
    } else {
        match host.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        }
    };
    (!host.is_empty()).then_some(host)
}

impl Retry {
    /// Whether a response with `status` is retried.
    pub fn retries_status(&self, status: u16) -> bool {
        self.codes.binary_search(&status).is_ok()
    }
}

impl Fault {
    /// Draws whether this request is delayed and/or aborted.
    pub fn sample(&self, rng: &mut fastrand::Rng) -> FaultAction {
        FaultAction {
            delay: self
                .delay
                .as_ref()
                .filter(|d| d.percentage.sample(rng))
                .map(|d| d.fixed_delay),
            abort: self
                .abort
                .as_ref()
                .filter(|a| a.percentage.sample(rng))
                .and_then(|a| StatusCode::from_u16(a.http_status).ok()),
        }
    }
}

impl Percentage {
    pub const ALL: Percentage = Percentage {
        per_million: 1_000_000,
    };

    /// From a percentage 0..=100 (fractions kept to 0.0001 %).
    pub fn from_percent(percent: f64) -> Option<Self> {
        (percent.is_finite() && (0.0..=100.0).contains(&percent)).then(|| Percentage {
            per_million: (percent * 10_000.0).round() as u32,
        })
    }

    pub fn percent(self) -> f64 {
        f64::from(self.per_million) / 10_000.0
    }

    /// True with this probability.
    pub fn sample(self, rng: &mut fastrand::Rng) -> bool {
        match self.per_million {
            0 => false,
            1_000_000.. => true,
            p => rng.u32(0..1_000_000) < p,
        }
    }
}

impl Serialize for Percentage {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(self.percent())
    }
}

impl Pattern {
    /// Compiles `source` to match whole values.
    pub fn new(source: &str) -> Result<Self, String> {
        let regex = RegexBuilder::new(&format!("^(?:{source})$"))
            .size_limit(1 << 20)
            .build()
            .map_err(|e| format!("invalid regular expression: {e}"))?;
        Ok(Pattern {
            source: source.to_string(),
            regex,
        })
    }

    pub fn is_match(&self, value: &str) -> bool {
        self.regex.is_match(value)
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pattern({:?})", self.source)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for Pattern {}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.source)
    }
}

impl Hostname {
    /// A precise (no wildcard) lower-case DNS name.
    fn parse(text: &str) -> Option<Self> {
        if !is_dns_subdomain(text) {
            return None;
        }
        Some(Hostname {
            text: text.to_string(),
            header: HeaderValue::from_str(text).ok()?,
            authority: text.parse().ok()?,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl PartialEq for Hostname {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for Hostname {}

impl Serialize for Hostname {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

impl Serialize for Header {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("Header", 2)?;
        s.serialize_field("name", self.name.as_str())?;
        s.serialize_field("value", &String::from_utf8_lossy(self.value.as_bytes()))?;
        s.end()
    }
}

mod ser {
    use serde::Serializer;

    pub fn as_str<T: AsRef<str>, S: Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(value.as_ref())
    }

    pub fn opt_as_str<T: AsRef<str>, S: Serializer>(
        value: &Option<T>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(v) => s.serialize_some(v.as_ref()),
            None => s.serialize_none(),
        }
    }

    pub fn names<S: Serializer>(names: &[http::HeaderName], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(names.iter().map(|n| n.as_str()))
    }
}

// ---------------------------------------------------------------------------------------------
// Validation.
// ---------------------------------------------------------------------------------------------

/// Validates and compiles the file's routes against the snapshot's `services`. Errors name the
/// field (`httpRoutes[0].rules[1].matches[0].path.value`).
pub fn validate_routes(
    file: Vec<FileHttpRoute>,
    services: &[Service],
) -> Result<Vec<HttpRoute>, ConfigError> {
    let services: HashMap<(&str, &str), &Service> = services
        .iter()
        .map(|s| ((s.namespace.as_str(), s.name.as_str()), s))
        .collect();
    let mut seen: HashMap<(String, String), usize> = HashMap::new();
    let mut routes = Vec::with_capacity(file.len());
    for (i, r) in file.into_iter().enumerate() {
        let at = format!("{FIELD}[{i}]");
        if !is_dns_subdomain(&r.name) {
            return Err(ConfigError::new(
                format!("{at}.name"),
                format!(
                    "{:?} is not a DNS-1123 name (lower-case letters, digits, '-', '.')",
                    r.name
                ),
            ));
        }
        if !is_dns_label(&r.namespace) {
            return Err(ConfigError::new(
                format!("{at}.namespace"),
                format!(
                    "{:?} is not a DNS-1123 label (lower-case letters, digits, '-')",
                    r.namespace
                ),
            ));
        }
        if let Some(first) = seen.insert((r.namespace.clone(), r.name.clone()), i) {
            return Err(ConfigError::new(
                format!("{at}.name"),
                format!(
                    "route {}/{} is already defined at {FIELD}[{first}]",
                    r.namespace, r.name
                ),
            ));
        }
        if r.hostnames.is_some() {
            return Err(ConfigError::new(
                format!("{at}.hostnames"),
                "`hostnames` is not supported on routes attached to Services; remove it",
            ));
        }
        if r.parent_refs.is_empty() {
            return Err(ConfigError::new(
                format!("{at}.parentRefs"),
                "must name at least one parent Service",
            ));
        }
        let mut parent_refs: Vec<ParentRef> = Vec::with_capacity(r.parent_refs.len());
        for (k, p) in r.parent_refs.into_iter().enumerate() {
            let at = format!("{at}.parentRefs[{k}]");
            let parent = validate_parent(p, &r.namespace, &services, &at)?;
            for earlier in &parent_refs {
                if earlier.namespace == parent.namespace
                    && earlier.name == parent.name
                    && let Some(port) = parent.ports.iter().find(|p| earlier.ports.contains(p))
                {
                    return Err(ConfigError::new(
                        at,
                        format!(
                            "port {port} of service {}/{} is already a parent of this route",
                            parent.namespace, parent.name
                        ),
                    ));
                }
            }
            parent_refs.push(parent);
        }
        let file_rules = match r.rules {
            None => vec![FileRouteRule::default()],
            Some(rules) if rules.is_empty() => {
                return Err(ConfigError::new(
                    format!("{at}.rules"),
                    "must have at least one rule (omit `rules` to send everything to the parent)",
                ));
            }
            Some(rules) => rules,
        };
        let key: Arc<str> = format!("{}/{}", r.namespace, r.name).into();
        let mut rules = Vec::with_capacity(file_rules.len());
        for (j, rule) in file_rules.into_iter().enumerate() {
            let at = format!("{at}.rules[{j}]");
            rules.push(validate_rule(rule, &at, j, &key, &r.namespace, &services)?);
        }
        routes.push(HttpRoute {
            name: r.name,
            namespace: r.namespace,
            parent_refs,
            rules,
        });
    }
    Ok(routes)
}

type Services<'a> = HashMap<(&'a str, &'a str), &'a Service>;

/// Checks `group`/`kind`/`namespace` of a Service reference; returns its namespace.
fn service_ref<'a>(
    group: Option<&str>,
    kind: Option<&str>,
    namespace: Option<&'a str>,
    route_ns: &'a str,
    at: &str,
    what: &str,
) -> Result<&'a str, ConfigError> {
    if let Some(group) = group
        && !group.is_empty()
        && group != "core"
    {
        return Err(ConfigError::new(
            format!("{at}.group"),
            format!("{group:?}: only core Services (group \"\") are supported as {what}"),
        ));
    }
    if let Some(kind) = kind
        && kind != "Service"
    {
        return Err(ConfigError::new(
            format!("{at}.kind"),
            format!("{kind:?}: only Services are supported as {what}"),
        ));
    }
    match namespace {
        None => Ok(route_ns),
        Some(ns) if ns == route_ns => Ok(ns),
        Some(ns) => Err(ConfigError::new(
            format!("{at}.namespace"),
            format!(
                "{ns:?}: {what} in another namespace than the route's ({route_ns}) are not supported yet"
            ),
        )),
    }
}

fn lookup<'a>(
    services: &Services<'a>,
    namespace: &str,
    name: &str,
    at: &str,
) -> Result<&'a Service, ConfigError> {
    services.get(&(namespace, name)).copied().ok_or_else(|| {
        ConfigError::new(
            format!("{at}.name"),
            format!("there is no service {namespace}/{name}"),
        )
    })
}

fn port_on(service: &Service, port: i64, at: &str) -> Result<u16, ConfigError> {
    let number = u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| {
            ConfigError::new(
                format!("{at}.port"),
                format!("{port} is not a port number (1-65535)"),
            )
        })?;
    if service.port(number).is_none() {
        return Err(ConfigError::new(
            format!("{at}.port"),
            format!(
                "service {}/{} has no port {number}",
                service.namespace, service.name
            ),
        ));
    }
    Ok(number)
}

fn validate_parent(
    p: FileParentRef,
    route_ns: &str,
    services: &Services<'_>,
    at: &str,
) -> Result<ParentRef, ConfigError> {
    let namespace = service_ref(
        p.group.as_deref(),
        p.kind.as_deref(),
        p.namespace.as_deref(),
        route_ns,
        at,
        "parents",
    )?;
    if p.section_name.is_some() {
        return Err(ConfigError::new(
            format!("{at}.sectionName"),
            "`sectionName` is not supported for Service parents; use `port`",
        ));
    }
    let service = lookup(services, namespace, &p.name, at)?;
    let ports = match p.port {
        Some(port) => {
            let number = port_on(service, port, at)?;
            if service.port(number).map(|p| p.protocol) == Some(AppProtocol::Tcp) {
                return Err(ConfigError::new(
                    format!("{at}.port"),
                    format!(
                        "port {number} of service {namespace}/{} is declared opaque TCP; HTTP routes cannot apply",
                        p.name
                    ),
                ));
            }
            vec![number]
        }
        None => {
            let ports: Vec<u16> = service
                .ports
                .iter()
                .filter(|sp| sp.protocol != AppProtocol::Tcp)
                .map(|sp| sp.port)
                .collect();
            if ports.is_empty() {
                return Err(ConfigError::new(
                    at,
                    format!(
                        "every port of service {namespace}/{} is declared opaque TCP; HTTP routes cannot apply",
                        p.name
                    ),
                ));
            }
            ports
        }
    };
    Ok(ParentRef {
        namespace: namespace.to_string(),
        name: p.name,
        port: p.port.map(|_| ports[0]),
        ports,
    })
}

fn validate_rule(
    rule: FileRouteRule,
    at: &str,
    index: usize,
    route: &Arc<str>,
    route_ns: &str,
    services: &Services<'_>,
) -> Result<RouteRule, ConfigError> {
    let matches = match rule.matches {
        None => vec![RouteMatch::everything()],
        Some(matches) if matches.is_empty() => vec![RouteMatch::everything()],
        Some(matches) => matches
            .into_iter()
            .enumerate()
            .map(|(m, file)| validate_match(file, &format!("{at}.matches[{m}]")))
            .collect::<Result<_, _>>()?,
    };

    let mut filters: Vec<Filter> = Vec::with_capacity(rule.filters.len());
    for (k, file) in rule.filters.into_iter().enumerate() {
        let at = format!("{at}.filters[{k}]");
        let filter = validate_filter(file, &at)?;
        let kind = std::mem::discriminant(&filter);
        if filters.iter().any(|f| std::mem::discriminant(f) == kind) {
            return Err(ConfigError::new(
                format!("{at}.type"),
                "each filter type may appear only once in a rule",
            ));
        }
        let redirects = |f: &Filter| matches!(f, Filter::RequestRedirect(_));
        let rewrites = |f: &Filter| matches!(f, Filter::UrlRewrite(_));
        if (redirects(&filter) && filters.iter().any(rewrites))
            || (rewrites(&filter) && filters.iter().any(redirects))
        {
            return Err(ConfigError::new(
                at,
                "RequestRedirect and URLRewrite cannot both be used in one rule",
            ));
        }
        // Gateway API: ReplacePrefixMatch needs exactly one match, of PathPrefix type.
        let (path, field) = match &filter {
            Filter::UrlRewrite(r) => (r.path.as_ref(), "urlRewrite.path"),
            Filter::RequestRedirect(r) => (r.path.as_ref(), "requestRedirect.path"),
            _ => (None, ""),
        };
        if let Some(PathModifier::ReplacePrefixMatch(_)) = path
            && !(matches.len() == 1 && matches!(matches[0].path, PathMatch::PathPrefix(_)))
        {
            return Err(ConfigError::new(
                format!("{at}.{field}"),
                "ReplacePrefixMatch needs the rule to have exactly one match, of type PathPrefix",
            ));
        }
        filters.push(filter);
    }

    let mut backend_refs = Vec::new();
    if let Some(refs) = rule.backend_refs {
        if !refs.is_empty()
            && filters
                .iter()
                .any(|f| matches!(f, Filter::RequestRedirect(_)))
        {
            return Err(ConfigError::new(
                format!("{at}.backendRefs"),
                "a rule with a RequestRedirect filter cannot have backendRefs",
            ));
        }
        for (b, file) in refs.into_iter().enumerate() {
            let at = format!("{at}.backendRefs[{b}]");
            backend_refs.push(validate_backend(file, route_ns, services, &at)?);
        }
    }

    Ok(RouteRule {
        route: route.clone(),
        index,
        label: format!("{route}#{index}").into(),
        name: rule.name,
        matches,
        filters,
        backend_refs,
        timeouts: validate_timeouts(rule.timeouts, &format!("{at}.timeouts"))?,
        retry: rule
            .retry
            .map(|r| validate_retry(r, &format!("{at}.retry")))
            .transpose()?,
        fault: rule
            .fault
            .map(|f| validate_fault(f, &format!("{at}.fault")))
            .transpose()?,
        rate_limit: rule
            .rate_limit
            .map(|r| validate_rate_limit(r, &format!("{at}.rateLimit")))
            .transpose()?,
    })
}

const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

fn validate_match(m: FileMatch, at: &str) -> Result<RouteMatch, ConfigError> {
    let file_path = m.path.unwrap_or_default();
    let value = file_path.value.unwrap_or_else(|| "/".to_string());
    let path = match file_path.kind.as_deref().unwrap_or("PathPrefix") {
        kind @ ("Exact" | "PathPrefix") => {
            check_path(&value, false)
                .map_err(|e| ConfigError::new(format!("{at}.path.value"), e))?;
            if kind == "Exact" {
                PathMatch::Exact(value)
            } else {
                let trimmed = value.trim_end_matches('/');
                PathMatch::PathPrefix(if trimmed.is_empty() {
                    "/".into()
                } else {
                    trimmed.into()
                })
            }
        }
        "RegularExpression" => PathMatch::RegularExpression(
            Pattern::new(&value).map_err(|e| ConfigError::new(format!("{at}.path.value"), e))?,
        ),
        other => {
            return Err(ConfigError::new(
                format!("{at}.path.type"),
                format!(
                    "{other:?} is not a path match type (Exact, PathPrefix, RegularExpression)"
                ),
            ));
        }
    };

    let mut headers = Vec::with_capacity(m.headers.len());
    for (h, file) in m.headers.into_iter().enumerate() {
        let at = format!("{at}.headers[{h}]");
        let name = HeaderName::from_bytes(file.name.as_bytes()).map_err(|_| {
            ConfigError::new(
                format!("{at}.name"),
                format!("{:?} is not a header name", file.name),
            )
        })?;
        if headers.iter().any(|m: &HeaderMatch| m.name == name) {
            return Err(ConfigError::new(
                format!("{at}.name"),
                format!("header {name} is matched twice (names are case-insensitive)"),
            ));
        }
        if file.kind.as_deref().is_none_or(|k| k == "Exact")
            && HeaderValue::from_str(&file.value).is_err()
        {
            return Err(ConfigError::new(
                format!("{at}.value"),
                format!("{:?} is not a header value", file.value),
            ));
        }
        let value = value_match(file.kind.as_deref(), file.value, &at)?;
        headers.push(HeaderMatch { name, value });
    }

    let mut query_params = Vec::with_capacity(m.query_params.len());
    for (q, file) in m.query_params.into_iter().enumerate() {
        let at = format!("{at}.queryParams[{q}]");
        if file.name.is_empty() {
            return Err(ConfigError::new(format!("{at}.name"), "must not be empty"));
        }
        if query_params
            .iter()
            .any(|m: &QueryParamMatch| m.name == file.name)
        {
            return Err(ConfigError::new(
                format!("{at}.name"),
                format!("query parameter {:?} is matched twice", file.name),
            ));
        }
        let value = value_match(file.kind.as_deref(), file.value, &at)?;
        query_params.push(QueryParamMatch {
            name: file.name,
            value,
        });
    }

    let method = match m.method {
        None => None,
        Some(method) if METHODS.contains(&method.as_str()) => {
            Some(Method::from_bytes(method.as_bytes()).map_err(|_| {
                ConfigError::new(
                    format!("{at}.method"),
                    format!("{method:?} is not a method"),
                )
            })?)
        }
        Some(method) => {
            return Err(ConfigError::new(
                format!("{at}.method"),
                format!("{method:?} is not a method ({})", METHODS.join(", ")),
            ));
        }
    };
    Ok(RouteMatch {
        path,
        headers,
        query_params,
        method,
    })
}

fn value_match(kind: Option<&str>, value: String, at: &str) -> Result<ValueMatch, ConfigError> {
    match kind.unwrap_or("Exact") {
        "Exact" => Ok(ValueMatch::Exact(value)),
        "RegularExpression" => Pattern::new(&value)
            .map(ValueMatch::RegularExpression)
            .map_err(|e| ConfigError::new(format!("{at}.value"), e)),
        other => Err(ConfigError::new(
            format!("{at}.type"),
            format!("{other:?} is not a match type (Exact, RegularExpression)"),
        )),
    }
}

/// A path as Gateway API allows it in matches and path modifiers (`empty_ok`: the empty
/// `replacePrefixMatch`).
fn check_path(value: &str, empty_ok: bool) -> Result<(), String> {
    if value.is_empty() && empty_ok {
        return Ok(());
    }
    if !value.starts_with('/') {
        return Err(format!("{value:?} must start with '/'"));
    }
    for bad in ["//", "/./", "/../", "%2f", "%2F", "#", "?"] {
        if value.contains(bad) {
            return Err(format!("{value:?} must not contain {bad:?}"));
        }
    }
    if value.ends_with("/..") || value.ends_with("/.") {
        return Err(format!("{value:?} must not end with a '.' or '..' segment"));
    }
    if PathAndQuery::try_from(value).is_err() || value.bytes().any(|b| b == b' ') {
        return Err(format!("{value:?} is not a valid URL path"));
    }
    Ok(())
}

fn validate_filter(f: FileFilter, at: &str) -> Result<Filter, ConfigError> {
    let payloads = [
        ("requestHeaderModifier", f.request_header_modifier.is_some()),
        (
            "responseHeaderModifier",
            f.response_header_modifier.is_some(),
        ),
        ("urlRewrite", f.url_rewrite.is_some()),
        ("requestRedirect", f.request_redirect.is_some()),
        ("requestMirror", f.request_mirror.is_some()),
        ("extensionRef", f.extension_ref.is_some()),
        ("cors", f.cors.is_some()),
    ];
    let expected = match f.kind.as_str() {
        "RequestHeaderModifier" => "requestHeaderModifier",
        "ResponseHeaderModifier" => "responseHeaderModifier",
        "URLRewrite" => "urlRewrite",
        "RequestRedirect" => "requestRedirect",
        other @ ("RequestMirror" | "ExtensionRef" | "CORS") => {
            return Err(ConfigError::new(
                format!("{at}.type"),
                format!("{other} filters are not supported"),
            ));
        }
        other => {
            return Err(ConfigError::new(
                format!("{at}.type"),
                format!(
                    "{other:?} is not a filter type (RequestHeaderModifier, ResponseHeaderModifier, URLRewrite, RequestRedirect)"
                ),
            ));
        }
    };
    if let Some((field, _)) = payloads.iter().find(|(f, set)| *set && *f != expected) {
        return Err(ConfigError::new(
            format!("{at}.{field}"),
            format!("must not be set in a filter of type {}", f.kind),
        ));
    }
    let missing = || {
        ConfigError::new(
            format!("{at}.{expected}"),
            format!("is required in a filter of type {}", f.kind),
        )
    };
    Ok(match expected {
        "requestHeaderModifier" => Filter::RequestHeaderModifier(validate_header_modifier(
            f.request_header_modifier.ok_or_else(missing)?,
            &format!("{at}.{expected}"),
        )?),
        "responseHeaderModifier" => Filter::ResponseHeaderModifier(validate_header_modifier(
            f.response_header_modifier.ok_or_else(missing)?,
            &format!("{at}.{expected}"),
        )?),
        "urlRewrite" => {
            let rewrite = f.url_rewrite.ok_or_else(missing)?;
            let at = format!("{at}.{expected}");
            Filter::UrlRewrite(UrlRewrite {
                hostname: rewrite
                    .hostname
                    .map(|h| hostname(&h, &format!("{at}.hostname")))
                    .transpose()?,
                path: rewrite
                    .path
                    .map(|p| validate_path_modifier(p, &format!("{at}.path")))
                    .transpose()?,
            })
        }
        _ => {
            let redirect = f.request_redirect.ok_or_else(missing)?;
            Filter::RequestRedirect(validate_redirect(redirect, &format!("{at}.{expected}"))?)
        }
    })
}

fn validate_header_modifier(
    m: FileHeaderModifier,
    at: &str,
) -> Result<HeaderModifier, ConfigError> {
    let header_name = |name: &str, at: String| {
        HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| ConfigError::new(at, format!("{name:?} is not a header name")))
    };
    let headers = |list: Vec<FileHeader>, field: &str| -> Result<Vec<Header>, ConfigError> {
        let mut out: Vec<Header> = Vec::with_capacity(list.len());
        for (n, h) in list.into_iter().enumerate() {
            let name = header_name(&h.name, format!("{at}.{field}[{n}].name"))?;
            if out.iter().any(|o| o.name == name) {
                return Err(ConfigError::new(
                    format!("{at}.{field}[{n}].name"),
                    format!("header {name} is listed twice"),
                ));
            }
            let value = HeaderValue::from_str(&h.value).map_err(|_| {
                ConfigError::new(
                    format!("{at}.{field}[{n}].value"),
                    format!("{:?} is not a header value", h.value),
                )
            })?;
            out.push(Header { name, value });
        }
        Ok(out)
    };
    let set = headers(m.set, "set")?;
    let add = headers(m.add, "add")?;
    let remove = m
        .remove
        .iter()
        .enumerate()
        .map(|(n, name)| header_name(name, format!("{at}.remove[{n}]")))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(n) = first_duplicate(remove.iter()) {
        return Err(ConfigError::new(
            format!("{at}.remove[{n}]"),
            format!("header {} is listed twice", remove[n]),
        ));
    }
    Ok(HeaderModifier { set, add, remove })
}

fn hostname(text: &str, at: &str) -> Result<Hostname, ConfigError> {
    Hostname::parse(text).ok_or_else(|| {
        ConfigError::new(
            at,
            format!("{text:?} is not a host name (lower-case DNS name, no wildcard)"),
        )
    })
}

fn validate_path_modifier(p: FilePathModifier, at: &str) -> Result<PathModifier, ConfigError> {
    let (wanted, other, full) = match p.kind.as_str() {
        "ReplaceFullPath" => ("replaceFullPath", "replacePrefixMatch", true),
        "ReplacePrefixMatch" => ("replacePrefixMatch", "replaceFullPath", false),
        kind => {
            return Err(ConfigError::new(
                format!("{at}.type"),
                format!("{kind:?} is not a path modifier (ReplaceFullPath, ReplacePrefixMatch)"),
            ));
        }
    };
    let (value, stray) = if full {
        (p.replace_full_path, p.replace_prefix_match.is_some())
    } else {
        (p.replace_prefix_match, p.replace_full_path.is_some())
    };
    if stray {
        return Err(ConfigError::new(
            format!("{at}.{other}"),
            format!("must not be set when type is {}", p.kind),
        ));
    }
    let value = value.ok_or_else(|| {
        ConfigError::new(
            format!("{at}.{wanted}"),
            format!("is required when type is {}", p.kind),
        )
    })?;
    check_path(&value, !full).map_err(|e| ConfigError::new(format!("{at}.{wanted}"), e))?;
    Ok(if full {
        PathModifier::ReplaceFullPath(value)
    } else {
        PathModifier::ReplacePrefixMatch(value)
    })
}

fn validate_redirect(r: FileRequestRedirect, at: &str) -> Result<RequestRedirect, ConfigError> {
    let scheme = match r.scheme.as_deref() {
        None => None,
        Some(s @ ("http" | "https")) => Some(s.to_string()),
        Some(other) => {
            return Err(ConfigError::new(
                format!("{at}.scheme"),
                format!("{other:?} is not a scheme (http, https)"),
            ));
        }
    };
    let port = r
        .port
        .map(|p| {
            u16::try_from(p).ok().filter(|p| *p != 0).ok_or_else(|| {
                ConfigError::new(
                    format!("{at}.port"),
                    format!("{p} is not a port number (1-65535)"),
                )
            })
        })
        .transpose()?;
    let status_code = match r.status_code {
        None => 302,
        Some(code @ (301 | 302)) => code as u16,
        Some(other) => {
            return Err(ConfigError::new(
                format!("{at}.statusCode"),
                format!("{other} is not a redirect status (301, 302)"),
            ));
        }
    };
    Ok(RequestRedirect {
        scheme,
        hostname: r
            .hostname
            .map(|h| hostname(&h, &format!("{at}.hostname")))
            .transpose()?,
        path: r
            .path
            .map(|p| validate_path_modifier(p, &format!("{at}.path")))
            .transpose()?,
        port,
        status_code,
    })
}

fn validate_backend(
    b: FileBackendRef,
    route_ns: &str,
    services: &Services<'_>,
    at: &str,
) -> Result<BackendRef, ConfigError> {
    let namespace = service_ref(
        b.group.as_deref(),
        b.kind.as_deref(),
        b.namespace.as_deref(),
        route_ns,
        at,
        "backends",
    )?;
    if b.filters.is_some() {
        return Err(ConfigError::new(
            format!("{at}.filters"),
            "per-backend filters are not supported; put filters on the rule",
        ));
    }
    let service = lookup(services, namespace, &b.name, at)?;
    let port = match b.port {
        None => {
            return Err(ConfigError::new(
                format!("{at}.port"),
                "is required for a Service backend",
            ));
        }
        Some(port) => port_on(service, port, at)?,
    };
    let weight = match b.weight {
        None => 1,
        Some(w @ 0..=MAX_WEIGHT) => w as u32,
        Some(w) => {
            return Err(ConfigError::new(
                format!("{at}.weight"),
                format!("{w} is not a weight (0 to {MAX_WEIGHT})"),
            ));
        }
    };
    Ok(BackendRef {
        namespace: namespace.to_string(),
        name: b.name,
        port,
        weight,
    })
}

/// A duration field (zero allowed).
fn duration(text: &str, at: String) -> Result<Duration, ConfigError> {
    parse_duration(text).ok_or_else(|| {
        ConfigError::new(
            at,
            format!("{text:?} is not a duration (like 500ms, 10s, 2m, 1h)"),
        )
    })
}

fn validate_timeouts(t: Option<FileTimeouts>, at: &str) -> Result<Timeouts, ConfigError> {
    let Some(t) = t else {
        return Ok(Timeouts::default());
    };
    let optional = |value: Option<String>, field: &str| -> Result<Option<Duration>, ConfigError> {
        match value {
            None => Ok(None),
            Some(text) => {
                Ok(Some(duration(&text, format!("{at}.{field}"))?).filter(|d| !d.is_zero()))
            }
        }
    };
    let timeouts = Timeouts {
        request: optional(t.request, "request")?,
        backend_request: optional(t.backend_request, "backendRequest")?,
    };
    if let (Some(request), Some(backend)) = (timeouts.request, timeouts.backend_request)
        && backend > request
    {
        return Err(ConfigError::new(
            format!("{at}.backendRequest"),
            format!("{backend:?} is longer than the request timeout ({request:?})"),
        ));
    }
    Ok(timeouts)
}

fn validate_retry(r: FileRetry, at: &str) -> Result<Retry, ConfigError> {
    let attempts = match r.attempts {
        None => 2,
        Some(n) => u32::try_from(n).map_err(|_| {
            ConfigError::new(
                format!("{at}.attempts"),
                format!("{n} is not a number of retries"),
            )
        })?,
    };
    let mut codes = Vec::with_capacity(r.codes.len());
    for (c, code) in r.codes.iter().enumerate() {
        match u16::try_from(*code) {
            Ok(code @ 400..=599) => codes.push(code),
            _ => {
                return Err(ConfigError::new(
                    format!("{at}.codes[{c}]"),
                    format!("{code} is not an error status (400-599)"),
                ));
            }
        }
    }
    codes.sort_unstable();
    codes.dedup();
    let backoff = match r.backoff {
        None => Duration::from_millis(25),
        Some(text) => duration(&text, format!("{at}.backoff"))?,
    };
    let per_try_timeout = match r.per_try_timeout {
        None => None,
        Some(text) => {
            Some(duration(&text, format!("{at}.perTryTimeout"))?).filter(|d| !d.is_zero())
        }
    };
    Ok(Retry {
        attempts,
        codes,
        backoff,
        per_try_timeout,
        retry_on_connect_failure: r.retry_on_connect_failure.unwrap_or(true),
    })
}

fn percentage(value: Option<f64>, at: String) -> Result<Percentage, ConfigError> {
    match value {
        None => Ok(Percentage::ALL),
        Some(p) => Percentage::from_percent(p)
            .ok_or_else(|| ConfigError::new(at, format!("{p} is not a percentage (0-100)"))),
    }
}

fn validate_fault(f: FileFault, at: &str) -> Result<Fault, ConfigError> {
    if f.delay.is_none() && f.abort.is_none() {
        return Err(ConfigError::new(at, "must set delay, abort or both"));
    }
    let delay = f
        .delay
        .map(|d| {
            Ok::<_, ConfigError>(FaultDelay {
                fixed_delay: duration(&d.fixed_delay, format!("{at}.delay.fixedDelay"))?,
                percentage: percentage(d.percentage, format!("{at}.delay.percentage"))?,
            })
        })
        .transpose()?;
    let abort = f
        .abort
        .map(|a| {
            let http_status = u16::try_from(a.http_status)
                .ok()
                .filter(|s| (200..=599).contains(s))
                .ok_or_else(|| {
                    ConfigError::new(
                        format!("{at}.abort.httpStatus"),
                        format!("{} is not an HTTP status (200-599)", a.http_status),
                    )
                })?;
            Ok::<_, ConfigError>(FaultAbort {
                http_status,
                percentage: percentage(a.percentage, format!("{at}.abort.percentage"))?,
            })
        })
        .transpose()?;
    Ok(Fault { delay, abort })
}

fn validate_rate_limit(r: FileRateLimit, at: &str) -> Result<RateLimit, ConfigError> {
    let positive = |n: i64, field: &str| {
        u32::try_from(n).ok().filter(|n| *n >= 1).ok_or_else(|| {
            ConfigError::new(
                format!("{at}.{field}"),
                format!("{n} is not a positive number"),
            )
        })
    };
    let requests_per_second = positive(r.requests_per_second, "requestsPerSecond")?;
    let burst = match r.burst {
        None => requests_per_second,
        Some(n) => positive(n, "burst")?,
    };
    Ok(RateLimit {
        requests_per_second,
        burst,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::{FileService, validate_services};

    const SERVICES: &str = "
services:
  - {name: backend, namespace: shop, vips: [10.96.0.10], ports: [{name: http, port: 80, targetPort: 8080}, {name: http-alt, port: 8080}, {name: tcp-db, port: 5432}]}
  - {name: backend-v1, namespace: shop, vips: [10.96.0.11], ports: [{name: http, port: 80}]}
  - {name: backend-v2, namespace: shop, vips: [10.96.0.12], ports: [{name: http, port: 80}]}
  - {name: other, namespace: pay, vips: [10.96.0.13], ports: [{name: http, port: 80}]}
";

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Doc {
        services: Vec<FileService>,
        #[serde(default)]
        http_routes: Vec<FileHttpRoute>,
    }

    fn parse(routes: &str) -> Result<Vec<HttpRoute>, ConfigError> {
        let doc: Doc = serde_yaml::from_str(&format!("{SERVICES}httpRoutes:\n{routes}"))
            .unwrap_or_else(|e| panic!("YAML: {e}\n{routes}"));
        let services = validate_services(doc.services).expect("services");
        validate_routes(doc.http_routes, &services)
    }

    fn parse_ok(routes: &str) -> Vec<HttpRoute> {
        parse(routes).unwrap_or_else(|e| panic!("{e}\n{routes}"))
    }

    fn field_of(routes: &str) -> String {
        match parse(routes) {
            Ok(_) => panic!("accepted:\n{routes}"),
            Err(e) => {
                assert!(!e.message.is_empty());
                e.field
            }
        }
    }

    fn table(routes: &str) -> RouteTable {
        RouteTable::new(&parse_ok(routes))
    }

    fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut builder = http::Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).expect("request").into_parts().0
    }

    /// The selected rule as `name` (or `route#index`), or NoRoutes / NoMatch.
    fn decide(t: &RouteTable, method: &str, uri: &str, headers: &[(&str, &str)]) -> String {
        match t.select("shop", "backend", 80, &req(method, uri, headers)) {
            RouteDecision::NoRoutes => "NoRoutes".into(),
            RouteDecision::NoMatch => "NoMatch".into(),
            RouteDecision::Matched(rule, _) => rule
                .name
                .clone()
                .unwrap_or_else(|| format!("{}#{}", rule.route, rule.index)),
        }
    }

    fn get(t: &RouteTable, uri: &str) -> String {
        decide(t, "GET", uri, &[])
    }

    /// One route on backend:80 with the given rules (YAML list items, indented 4).
    fn route(rules: &str) -> String {
        format!(
            "  - name: r\n    namespace: shop\n    parentRefs: [{{name: backend, port: 80}}]\n    rules:\n{rules}"
        )
    }

    const EXAMPLE: &str = "
  - name: backend-routes
    namespace: shop
    parentRefs: [{kind: Service, name: backend, port: 80}]
    rules:
      - matches:
          - path: {type: PathPrefix, value: /api}
            headers: [{type: Exact, name: x-user, value: alice}]
            queryParams: [{type: Exact, name: debug, value: '1'}]
            method: GET
        filters:
          - type: RequestHeaderModifier
            requestHeaderModifier: {set: [{name: x-a, value: '1'}], add: [{name: x-b, value: '2'}], remove: [x-c]}
          - type: ResponseHeaderModifier
            responseHeaderModifier: {set: [], add: [], remove: []}
          - type: URLRewrite
            urlRewrite: {hostname: other.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
        backendRefs:
          - {name: backend-v1, port: 80, weight: 90}
          - {name: backend-v2, port: 80, weight: 10}
        timeouts: {request: 2s, backendRequest: 500ms}
        retry: {attempts: 2, codes: [503], backoff: 25ms, perTryTimeout: 1s, retryOnConnectFailure: true}
        fault: {delay: {fixedDelay: 100ms, percentage: 10}, abort: {httpStatus: 503, percentage: 5}}
        rateLimit: {requestsPerSecond: 100, burst: 20}
      - matches: [{path: {type: RegularExpression, value: '/old/.*'}}]
        filters:
          - type: RequestRedirect
            requestRedirect: {scheme: https, hostname: x.example, path: {type: ReplaceFullPath, replaceFullPath: /new}, port: 8443, statusCode: 301}
";

    #[test]
    fn parses_the_example() {
        let routes = parse_ok(EXAMPLE);
        assert_eq!(routes.len(), 1);
        let r = &routes[0];
        assert_eq!(
            r.parent_refs,
            vec![ParentRef {
                namespace: "shop".into(),
                name: "backend".into(),
                port: Some(80),
                ports: vec![80]
            }]
        );
        let rule = &r.rules[0];
        assert_eq!(&*rule.route, "shop/backend-routes");
        let m = &rule.matches[0];
        assert_eq!(m.path, PathMatch::PathPrefix("/api".into()));
        assert_eq!(m.method, Some(Method::GET));
        assert_eq!(m.headers[0].name, "x-user");
        assert_eq!(m.headers[0].value, ValueMatch::Exact("alice".into()));
        assert_eq!(m.query_params[0].name, "debug");
        assert_eq!(rule.filters.len(), 3);
        assert!(
            matches!(&rule.filters[2], Filter::UrlRewrite(UrlRewrite { hostname: Some(h), path: Some(PathModifier::ReplacePrefixMatch(p)) }) if h.as_str() == "other.example" && p == "/v2")
        );
        assert_eq!(
            rule.backend_refs,
            vec![
                BackendRef {
                    namespace: "shop".into(),
                    name: "backend-v1".into(),
                    port: 80,
                    weight: 90
                },
                BackendRef {
                    namespace: "shop".into(),
                    name: "backend-v2".into(),
                    port: 80,
                    weight: 10
                },
            ]
        );
        assert_eq!(
            rule.timeouts,
            Timeouts {
                request: Some(Duration::from_secs(2)),
                backend_request: Some(Duration::from_millis(500))
            }
        );
        assert_eq!(
            rule.retry,
            Some(Retry {
                attempts: 2,
                codes: vec![503],
                backoff: Duration::from_millis(25),
                per_try_timeout: Some(Duration::from_secs(1)),
                retry_on_connect_failure: true
            })
        );
        let fault = rule.fault.as_ref().expect("fault");
        assert_eq!(
            fault.delay.as_ref().map(|d| d.fixed_delay),
            Some(Duration::from_millis(100))
        );
        assert_eq!(
            fault.delay.as_ref().map(|d| d.percentage.percent()),
            Some(10.0)
        );
        assert_eq!(fault.abort.as_ref().map(|a| a.http_status), Some(503));
        assert_eq!(
            rule.rate_limit,
            Some(RateLimit {
                requests_per_second: 100,
                burst: 20
            })
        );
        let redirect = r.rules[1].redirect_filter().expect("redirect");
        assert_eq!(redirect.status_code, 301);
        assert_eq!(redirect.port, Some(8443));
        assert!(r.rules[1].backend_refs.is_empty());
        let json = serde_json::to_value(r).expect("serializes");
        assert_eq!(json["rules"][0]["filters"][2]["type"], "URLRewrite");
        assert_eq!(json["rules"][0]["matches"][0]["method"], "GET");
        assert_eq!(json["rules"][1]["matches"][0]["path"]["value"], "/old/.*");
    }

    #[test]
    fn defaults() {
        // No rules: one rule matching everything, to the parent; no port: every HTTP port.
        let routes = parse_ok("  - {name: r, namespace: shop, parentRefs: [{name: backend}]}\n");
        let r = &routes[0];
        assert_eq!(r.parent_refs[0].port, None);
        assert_eq!(r.parent_refs[0].ports, vec![80, 8080]);
        assert_eq!(r.rules.len(), 1);
        assert_eq!(r.rules[0].matches, vec![RouteMatch::everything()]);
        assert!(r.rules[0].backend_refs.is_empty());
        assert_eq!(r.rules[0].timeouts, Timeouts::default());
        // Empty match: PathPrefix "/".
        let routes = parse_ok(&route(
            "      - matches: [{method: GET}]\n        retry: {}\n",
        ));
        let rule = &routes[0].rules[0];
        assert_eq!(rule.matches[0].path, PathMatch::PathPrefix("/".into()));
        let retry = rule.retry.as_ref().expect("retry");
        assert_eq!(retry.attempts, 2);
        assert!(retry.retry_on_connect_failure);
        assert!(!retry.retries_status(503));
        // Zero timeouts disable; fault percentages default to 100.
        let routes = parse_ok(&route(
            "      - timeouts: {request: 0s, backendRequest: 1s}\n        fault: {abort: {httpStatus: 418}}\n        rateLimit: {requestsPerSecond: 5}\n",
        ));
        let rule = &routes[0].rules[0];
        assert_eq!(rule.timeouts.request, None);
        assert_eq!(rule.timeouts.backend_request, Some(Duration::from_secs(1)));
        assert_eq!(
            rule.fault
                .as_ref()
                .unwrap()
                .abort
                .as_ref()
                .unwrap()
                .percentage,
            Percentage::ALL
        );
        assert_eq!(rule.rate_limit.as_ref().unwrap().burst, 5);
    }

    #[test]
    fn validation_errors_name_the_field() {
        let parent = |p: &str| format!("  - {{name: r, namespace: shop, parentRefs: [{p}]}}\n");
        let cases: Vec<(String, &str)> = vec![
            ("  - {name: r, namespace: shop}\n".into(), "httpRoutes[0].parentRefs"),
            (parent("{name: nope}"), "httpRoutes[0].parentRefs[0].name"),
            (parent("{name: other}"), "httpRoutes[0].parentRefs[0].name"),
            (parent("{name: other, namespace: pay}"), "httpRoutes[0].parentRefs[0].namespace"),
            (parent("{name: backend, port: 81}"), "httpRoutes[0].parentRefs[0].port"),
            (parent("{name: backend, port: 0}"), "httpRoutes[0].parentRefs[0].port"),
            (parent("{name: backend, port: 5432}"), "httpRoutes[0].parentRefs[0].port"),
            (parent("{name: backend, kind: Gateway}"), "httpRoutes[0].parentRefs[0].kind"),
            (
                parent("{name: backend, group: gateway.networking.k8s.io}"),
                "httpRoutes[0].parentRefs[0].group",
            ),
            (parent("{name: backend, sectionName: http}"), "httpRoutes[0].parentRefs[0].sectionName"),
            (parent("{name: backend}, {name: backend, port: 8080}"), "httpRoutes[0].parentRefs[1]"),
            (
                "  - {name: r, namespace: shop, parentRefs: [{name: backend}], rules: []}\n".into(),
                "httpRoutes[0].rules",
            ),
            (
                "  - {name: r, namespace: shop, parentRefs: [{name: backend}], hostnames: [a]}\n".into(),
                "httpRoutes[0].hostnames",
            ),
            (
                "  - {name: R, namespace: shop, parentRefs: [{name: backend}]}\n".into(),
                "httpRoutes[0].name",
            ),
            (
                "  - {name: r, namespace: shop, parentRefs: [{name: backend}]}\n  - {name: r, namespace: shop, parentRefs: [{name: backend-v1}]}\n".into(),
                "httpRoutes[1].name",
            ),
            // Backends.
            (
                route("      - backendRefs: [{name: backend-v1, port: 80}, {name: nope, port: 80}]\n"),
                "httpRoutes[0].rules[0].backendRefs[1].name",
            ),
            (
                route("      - backendRefs: [{name: backend-v1, port: 81}]\n"),
                "httpRoutes[0].rules[0].backendRefs[0].port",
            ),
            (
                route("      - backendRefs: [{name: backend-v1}]\n"),
                "httpRoutes[0].rules[0].backendRefs[0].port",
            ),
            (
                route("      - backendRefs: [{name: other, namespace: pay, port: 80}]\n"),
                "httpRoutes[0].rules[0].backendRefs[0].namespace",
            ),
            (
                route("      - backendRefs: [{name: backend-v1, port: 80, weight: -1}]\n"),
                "httpRoutes[0].rules[0].backendRefs[0].weight",
            ),
            (
                route("      - backendRefs: [{name: backend-v1, port: 80, weight: 1000001}]\n"),
                "httpRoutes[0].rules[0].backendRefs[0].weight",
            ),
            // Matches.
            (
                route("      - {}\n      - matches: [{path: {type: RegularExpression, value: '/a/('}}]\n"),
                "httpRoutes[0].rules[1].matches[0].path.value",
            ),
            (
                route("      - matches: [{path: {value: api}}]\n"),
                "httpRoutes[0].rules[0].matches[0].path.value",
            ),
            (
                route("      - matches: [{path: {type: Exact, value: '/a//b'}}]\n"),
                "httpRoutes[0].rules[0].matches[0].path.value",
            ),
            (
                route("      - matches: [{path: {type: Prefix, value: /a}}]\n"),
                "httpRoutes[0].rules[0].matches[0].path.type",
            ),
            (
                route("      - matches: [{headers: [{name: x, value: a}, {name: 'bad name', value: a}]}]\n"),
                "httpRoutes[0].rules[0].matches[0].headers[1].name",
            ),
            (
                route("      - matches: [{headers: [{name: x-a, value: a}, {name: X-A, value: b}]}]\n"),
                "httpRoutes[0].rules[0].matches[0].headers[1].name",
            ),
            (
                route("      - matches: [{headers: [{type: RegularExpression, name: x, value: '['}]}]\n"),
                "httpRoutes[0].rules[0].matches[0].headers[0].value",
            ),
            (
                route("      - matches: [{headers: [{type: Prefix, name: x, value: a}]}]\n"),
                "httpRoutes[0].rules[0].matches[0].headers[0].type",
            ),
            (
                route("      - matches: [{queryParams: [{type: RegularExpression, name: q, value: '(('}]}]\n"),
                "httpRoutes[0].rules[0].matches[0].queryParams[0].value",
            ),
            (
                route("      - matches: [{queryParams: [{name: q, value: a}, {name: q, value: b}]}]\n"),
                "httpRoutes[0].rules[0].matches[0].queryParams[1].name",
            ),
            (
                route("      - matches: [{}, {method: FETCH}]\n"),
                "httpRoutes[0].rules[0].matches[1].method",
            ),
            // Filters.
            (
                route("      - filters: [{type: RequestHeaderModifier, urlRewrite: {hostname: a}}]\n"),
                "httpRoutes[0].rules[0].filters[0].urlRewrite",
            ),
            (
                route("      - filters: [{type: URLRewrite}]\n"),
                "httpRoutes[0].rules[0].filters[0].urlRewrite",
            ),
            (
                route("      - filters: [{type: Teleport}]\n"),
                "httpRoutes[0].rules[0].filters[0].type",
            ),
            (
                route("      - filters: [{type: RequestMirror, requestMirror: {}}]\n"),
                "httpRoutes[0].rules[0].filters[0].type",
            ),
            (
                route("      - filters: [{type: URLRewrite, urlRewrite: {hostname: a}}, {type: RequestRedirect, requestRedirect: {}}]\n"),
                "httpRoutes[0].rules[0].filters[1]",
            ),
            (
                route("      - filters: [{type: RequestHeaderModifier, requestHeaderModifier: {}}, {type: RequestHeaderModifier, requestHeaderModifier: {}}]\n"),
                "httpRoutes[0].rules[0].filters[1].type",
            ),
            (
                route("      - matches: [{path: {type: Exact, value: /a}}]\n        filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]\n"),
                "httpRoutes[0].rules[0].filters[0].urlRewrite.path",
            ),
            (
                route("      - matches: [{path: {value: /a}}, {path: {value: /b}}]\n        filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]\n"),
                "httpRoutes[0].rules[0].filters[0].urlRewrite.path",
            ),
            (
                route("      - matches: [{path: {type: RegularExpression, value: /a}}]\n        filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]\n"),
                "httpRoutes[0].rules[0].filters[0].requestRedirect.path",
            ),
            (
                route("      - filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replacePrefixMatch: /b}}}]\n"),
                "httpRoutes[0].rules[0].filters[0].urlRewrite.path.replacePrefixMatch",
            ),
            (
                route("      - filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath}}}]\n"),
                "httpRoutes[0].rules[0].filters[0].urlRewrite.path.replaceFullPath",
            ),
            (
                route("      - filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: b}}}]\n"),
                "httpRoutes[0].rules[0].filters[0].urlRewrite.path.replaceFullPath",
            ),
            (
                route("      - filters: [{type: URLRewrite, urlRewrite: {path: {type: Replace, replaceFullPath: /b}}}]\n"),
                "httpRoutes[0].rules[0].filters[0].urlRewrite.path.type",
            ),
            (
                route("      - filters: [{type: URLRewrite, urlRewrite: {hostname: '*.example'}}]\n"),
                "httpRoutes[0].rules[0].filters[0].urlRewrite.hostname",
            ),
            (
                route("      - filters: [{type: RequestRedirect, requestRedirect: {statusCode: 307}}]\n"),
                "httpRoutes[0].rules[0].filters[0].requestRedirect.statusCode",
            ),
            (
                route("      - filters: [{type: RequestRedirect, requestRedirect: {scheme: ftp}}]\n"),
                "httpRoutes[0].rules[0].filters[0].requestRedirect.scheme",
            ),
            (
                route("      - filters: [{type: RequestRedirect, requestRedirect: {port: 0}}]\n"),
                "httpRoutes[0].rules[0].filters[0].requestRedirect.port",
            ),
            (
                route("      - filters: [{type: RequestRedirect, requestRedirect: {}}]\n        backendRefs: [{name: backend-v1, port: 80}]\n"),
                "httpRoutes[0].rules[0].backendRefs",
            ),
            (
                route("      - filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x, value: \"a\\nb\"}]}}]\n"),
                "httpRoutes[0].rules[0].filters[0].requestHeaderModifier.set[0].value",
            ),
            (
                route("      - filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: x, value: a}, {name: X, value: b}]}}]\n"),
                "httpRoutes[0].rules[0].filters[0].responseHeaderModifier.add[1].name",
            ),
            (
                route("      - filters: [{type: RequestHeaderModifier, requestHeaderModifier: {remove: [x, X]}}]\n"),
                "httpRoutes[0].rules[0].filters[0].requestHeaderModifier.remove[1]",
            ),
            // Timeouts, retry, fault, rate limit.
            (
                route("      - timeouts: {request: soon}\n"),
                "httpRoutes[0].rules[0].timeouts.request",
            ),
            (
                route("      - timeouts: {request: 1s, backendRequest: 2s}\n"),
                "httpRoutes[0].rules[0].timeouts.backendRequest",
            ),
            (
                route("      - retry: {attempts: -1}\n"),
                "httpRoutes[0].rules[0].retry.attempts",
            ),
            (
                route("      - retry: {codes: [503, 200]}\n"),
                "httpRoutes[0].rules[0].retry.codes[1]",
            ),
            (
                route("      - retry: {backoff: 25}\n"),
                "httpRoutes[0].rules[0].retry.backoff",
            ),
            (
                route("      - retry: {perTryTimeout: x}\n"),
                "httpRoutes[0].rules[0].retry.perTryTimeout",
            ),
            (route("      - fault: {}\n"), "httpRoutes[0].rules[0].fault"),
            (
                route("      - fault: {delay: {fixedDelay: 1s, percentage: 100.5}}\n"),
                "httpRoutes[0].rules[0].fault.delay.percentage",
            ),
            (
                route("      - fault: {delay: {fixedDelay: 1}}\n"),
                "httpRoutes[0].rules[0].fault.delay.fixedDelay",
            ),
            (
                route("      - fault: {abort: {httpStatus: 503, percentage: -1}}\n"),
                "httpRoutes[0].rules[0].fault.abort.percentage",
            ),
            (
                route("      - fault: {abort: {httpStatus: 600}}\n"),
                "httpRoutes[0].rules[0].fault.abort.httpStatus",
            ),
            (
                route("      - rateLimit: {requestsPerSecond: 0}\n"),
                "httpRoutes[0].rules[0].rateLimit.requestsPerSecond",
            ),
            (
                route("      - rateLimit: {requestsPerSecond: 1, burst: 0}\n"),
                "httpRoutes[0].rules[0].rateLimit.burst",
            ),
        ];
        for (yaml, field) in &cases {
            assert_eq!(field_of(yaml), *field, "{yaml}");
        }
        // Accepted edge cases.
        parse_ok(&route(
            "      - filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: ''}}}]\n",
        ));
        parse_ok(&route(
            "      - backendRefs: [{name: backend-v1, port: 80, weight: 0}]\n",
        ));
        parse_ok(&route(
            "      - fault: {delay: {fixedDelay: 1s, percentage: 0.5}, abort: {httpStatus: 503, percentage: 100}}\n",
        ));
        parse_ok(&route(
            "      - filters: [{type: RequestRedirect, requestRedirect: {}}]\n        backendRefs: []\n",
        ));
        // Unknown fields are refused by serde.
        let doc: Result<Doc, _> = serde_yaml::from_str(&format!(
            "{SERVICES}httpRoutes:\n  - {{name: r, namespace: shop, parentRefs: [{{name: backend}}], rulez: []}}\n"
        ));
        assert!(doc.is_err());
    }

    #[test]
    fn no_routes_versus_no_match() {
        let t = table(&route(
            "      - matches: [{path: {type: Exact, value: /only}}]\n",
        ));
        assert_eq!(get(&t, "/only"), "shop/r#0");
        assert_eq!(get(&t, "/other"), "NoMatch");
        let parts = req("GET", "/only", &[]);
        assert!(matches!(
            t.select("shop", "backend", 8080, &parts),
            RouteDecision::NoRoutes
        ));
        assert!(matches!(
            t.select("shop", "backend-v1", 80, &parts),
            RouteDecision::NoRoutes
        ));
        assert!(matches!(
            t.select("pay", "backend", 80, &parts),
            RouteDecision::NoRoutes
        ));
        assert!(t.has_routes("shop", "backend", 80));
        assert!(!t.has_routes("shop", "backend", 8080));
        assert!(RouteTable::new(&[]).is_empty());
    }

    #[test]
    fn portless_parent_covers_http_ports_and_implicit_backend_is_the_parent() {
        let t = table("  - {name: r, namespace: shop, parentRefs: [{name: backend}]}\n");
        for port in [80, 8080] {
            match t.select("shop", "backend", port, &req("GET", "/x", &[])) {
                RouteDecision::Matched(rule, MatchedPath::Prefix("/")) => {
                    let mut rng = fastrand::Rng::with_seed(1);
                    assert_eq!(
                        rule.pick_backend(&mut rng),
                        Some(&BackendRef {
                            namespace: "shop".into(),
                            name: "backend".into(),
                            port,
                            weight: 1
                        })
                    );
                }
                other => panic!("{other:?}"),
            }
        }
        // The opaque TCP port gets no routes.
        assert!(!t.has_routes("shop", "backend", 5432));
    }

    #[test]
    fn precedence_by_path() {
        let t = table(&route(
            "      - {name: root, matches: [{path: {value: /}}]}\n\
             \x20     - {name: regex, matches: [{path: {type: RegularExpression, value: '/api/.*'}}]}\n\
             \x20     - {name: api, matches: [{path: {value: /api}}]}\n\
             \x20     - {name: v1, matches: [{path: {value: /api/v1/}}]}\n\
             \x20     - {name: exact, matches: [{path: {type: Exact, value: /api/v1/x}}]}\n",
        ));
        assert_eq!(get(&t, "/api/v1/x"), "exact");
        assert_eq!(get(&t, "/api/v1/x/y"), "v1");
        assert_eq!(get(&t, "/api/v1"), "v1");
        assert_eq!(get(&t, "/api/v2"), "api", "a prefix wins over a regex");
        assert_eq!(get(&t, "/apix"), "root");
        assert_eq!(get(&t, "/"), "root");
    }

    #[test]
    fn precedence_by_method_headers_query() {
        let t = table(&route(
            "      - {name: plain, matches: [{path: {value: /api}}]}\n\
             \x20     - {name: one-header, matches: [{path: {value: /api}, headers: [{name: a, value: '1'}]}]}\n\
             \x20     - {name: two-headers, matches: [{path: {value: /api}, headers: [{name: a, value: '1'}, {name: b, value: '1'}]}]}\n\
             \x20     - {name: query, matches: [{path: {value: /api}, queryParams: [{name: q, value: '1'}]}]}\n\
             \x20     - {name: two-queries-one-header, matches: [{path: {value: /api}, headers: [{name: a, value: '1'}], queryParams: [{name: q, value: '1'}, {name: r, value: '1'}]}]}\n\
             \x20     - {name: method, matches: [{path: {value: /api}, method: POST}]}\n\
             \x20     - {name: longer, matches: [{path: {value: /api/v1}}]}\n",
        ));
        assert_eq!(decide(&t, "GET", "/api", &[]), "plain");
        assert_eq!(
            decide(&t, "POST", "/api", &[("a", "1"), ("b", "1")]),
            "method"
        );
        assert_eq!(decide(&t, "GET", "/api", &[("a", "1")]), "one-header");
        assert_eq!(
            decide(&t, "GET", "/api", &[("a", "1"), ("b", "1")]),
            "two-headers"
        );
        // Header count before query count.
        assert_eq!(
            decide(&t, "GET", "/api?q=1&r=1", &[("a", "1"), ("b", "1")]),
            "two-headers"
        );
        assert_eq!(
            decide(&t, "GET", "/api?q=1&r=1", &[("a", "1")]),
            "two-queries-one-header"
        );
        assert_eq!(decide(&t, "GET", "/api?q=1", &[]), "query");
        // A longer prefix beats everything else.
        assert_eq!(
            decide(&t, "POST", "/api/v1?q=1", &[("a", "1"), ("b", "1")]),
            "longer"
        );
    }

    #[test]
    fn precedence_ties_and_routes() {
        let two_routes = "
  - name: zeta
    namespace: shop
    parentRefs: [{name: backend, port: 80}]
    rules:
      - {name: zeta-first, matches: [{path: {value: /x}}]}
      - {name: zeta-second, matches: [{path: {value: /x}}]}
      - {name: zeta-root, matches: [{path: {value: /}}]}
  - name: alpha
    namespace: shop
    parentRefs: [{name: backend}]
    rules:
      - {name: alpha-x, matches: [{path: {value: /x}}]}
      - {name: alpha-health, matches: [{path: {type: Exact, value: /health}}]}
";
        let t = table(two_routes);
        // Equal matches: the route first in the file, then the rule first in the route.
        assert_eq!(get(&t, "/x"), "zeta-first");
        // A more specific match of a later route wins.
        assert_eq!(get(&t, "/health"), "alpha-health");
        assert_eq!(get(&t, "/y"), "zeta-root");
        // On 8080 only alpha is attached.
        match t.select("shop", "backend", 8080, &req("GET", "/y", &[])) {
            RouteDecision::NoMatch => {}
            other => panic!("{other:?}"),
        }
        // Matches of one rule are ranked separately.
        let t = table(&route(
            "      - {name: a, matches: [{path: {value: /}}, {path: {type: Exact, value: /e}}]}\n\
             \x20     - {name: b, matches: [{path: {value: /e}}]}\n",
        ));
        assert_eq!(get(&t, "/e"), "a");
        assert_eq!(get(&t, "/e/f"), "b");
    }

    #[test]
    fn regular_expressions_match_whole_values() {
        let t = table(&route(
            "      - {name: users, matches: [{path: {type: RegularExpression, value: '/users/[0-9]+'}}]}\n\
             \x20     - {name: versioned, matches: [{path: {type: RegularExpression, value: '/v/.*'}, headers: [{type: RegularExpression, name: x-version, value: 'v[12]'}]}]}\n",
        ));
        assert_eq!(get(&t, "/users/42"), "users");
        assert_eq!(get(&t, "/users/42/x"), "NoMatch");
        assert_eq!(get(&t, "/users/abc"), "NoMatch");
        assert_eq!(get(&t, "/x/users/42"), "NoMatch");
        assert_eq!(
            decide(&t, "GET", "/v/a", &[("x-version", "v2")]),
            "versioned"
        );
        assert_eq!(decide(&t, "GET", "/v/a", &[("x-version", "v3")]), "NoMatch");
        assert_eq!(
            decide(&t, "GET", "/v/a", &[("x-version", "xv1")]),
            "NoMatch"
        );
    }

    #[test]
    fn headers_case_insensitive_names_exact_values() {
        let t = table(&route(
            "      - {name: alice, matches: [{headers: [{name: X-User, value: alice}]}]}\n",
        ));
        assert_eq!(decide(&t, "GET", "/", &[("x-user", "alice")]), "alice");
        assert_eq!(decide(&t, "GET", "/", &[("X-USER", "alice")]), "alice");
        assert_eq!(decide(&t, "GET", "/", &[("x-user", "Alice")]), "NoMatch");
        assert_eq!(decide(&t, "GET", "/", &[]), "NoMatch");
        // A repeated header is matched as its comma-joined values.
        let t = table(&route(
            "      - {name: both, matches: [{headers: [{name: x, value: 'a,b'}]}]}\n",
        ));
        assert_eq!(decide(&t, "GET", "/", &[("x", "a"), ("x", "b")]), "both");
        assert_eq!(decide(&t, "GET", "/", &[("x", "a")]), "NoMatch");
    }

    #[test]
    fn query_params() {
        let t = table(&route(
            "      - {name: debug, matches: [{queryParams: [{name: debug, value: '1'}]}]}\n\
             \x20     - {name: re, matches: [{queryParams: [{type: RegularExpression, name: id, value: '[0-9]+'}]}]}\n",
        ));
        assert_eq!(get(&t, "/?debug=1"), "debug");
        assert_eq!(get(&t, "/p?x=2&debug=1"), "debug");
        assert_eq!(get(&t, "/?debug=10"), "NoMatch");
        assert_eq!(get(&t, "/?debug"), "NoMatch");
        assert_eq!(get(&t, "/?Debug=1"), "NoMatch", "names are case-sensitive");
        assert_eq!(
            get(&t, "/?debug=2&debug=1"),
            "NoMatch",
            "first occurrence counts"
        );
        assert_eq!(get(&t, "/?de%62ug=%31"), "debug", "percent-decoded");
        assert_eq!(get(&t, "/"), "NoMatch");
        assert_eq!(get(&t, "/?id=123"), "re");
        assert_eq!(get(&t, "/?id=12a"), "NoMatch");
        assert_eq!(percent_decode("a+b%20c%zz%4"), "a b c%zz%4");
        assert!(matches!(percent_decode("plain"), Cow::Borrowed("plain")));
    }

    fn compile_path(kind: &str, value: &str) -> PathMatch {
        validate_match(
            FileMatch {
                path: Some(FilePathMatch {
                    kind: Some(kind.into()),
                    value: Some(value.into()),
                }),
                ..FileMatch::default()
            },
            "m",
        )
        .expect("valid")
        .path
    }

    #[test]
    fn path_prefix_matches_whole_segments() {
        for prefix in ["/api", "/api/"] {
            let m = compile_path("PathPrefix", prefix);
            assert_eq!(m.matched(), MatchedPath::Prefix("/api"));
            for (path, expect) in [
                ("/api", true),
                ("/api/", true),
                ("/api/x", true),
                ("/api/x/y", true),
                ("/apix", false),
                ("/ap", false),
                ("/", false),
                ("/API", false),
            ] {
                assert_eq!(m.matches(path), expect, "{prefix} vs {path}");
            }
        }
        let root = compile_path("PathPrefix", "/");
        assert!(root.matches("/") && root.matches("/anything/at/all"));
        let nested = compile_path("PathPrefix", "/a/b");
        assert!(nested.matches("/a/b/c") && !nested.matches("/a/bc") && !nested.matches("/a"));
        let exact = compile_path("Exact", "/api");
        assert!(exact.matches("/api") && !exact.matches("/api/") && !exact.matches("/api/x"));
    }

    #[test]
    fn weighted_backends() {
        let routes = parse_ok(&route(
            "      - backendRefs: [{name: backend-v1, port: 80, weight: 90}, {name: backend-v2, port: 80, weight: 10}, {name: backend, port: 80, weight: 0}]\n",
        ));
        let rule = &routes[0].rules[0];
        let mut rng = fastrand::Rng::with_seed(42);
        let mut counts: HashMap<&str, u32> = HashMap::new();
        for _ in 0..10_000 {
            let b = rule.pick_backend(&mut rng).expect("a backend");
            *counts.entry(b.name.as_str()).or_default() += 1;
        }
        let v1 = counts.get("backend-v1").copied().unwrap_or(0);
        let v2 = counts.get("backend-v2").copied().unwrap_or(0);
        assert!((8_800..=9_200).contains(&v1), "{counts:?}");
        assert!((800..=1_200).contains(&v2), "{counts:?}");
        assert_eq!(counts.get("backend"), None, "weight 0 is never chosen");

        // All weights zero: no backend (the caller answers 500).
        let routes = parse_ok(&route(
            "      - backendRefs: [{name: backend-v1, port: 80, weight: 0}]\n",
        ));
        let t = RouteTable::new(&routes);
        match t.select("shop", "backend", 80, &req("GET", "/", &[])) {
            RouteDecision::Matched(rule, _) => assert_eq!(rule.pick_backend(&mut rng), None),
            other => panic!("{other:?}"),
        }
        // Weights default to 1.
        let routes = parse_ok(&route(
            "      - backendRefs: [{name: backend-v1, port: 80}, {name: backend-v2, port: 80}]\n",
        ));
        assert!(
            routes[0].rules[0]
                .backend_refs
                .iter()
                .all(|b| b.weight == 1)
        );
    }

    /// Selects on backend:80 and returns the rule and matched path.
    fn matched<'a>(t: &'a RouteTable, parts: &Parts) -> (&'a RouteRule, MatchedPath<'a>) {
        match t.select("shop", "backend", 80, parts) {
            RouteDecision::Matched(rule, m) => (rule, m),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn header_modifiers() {
        let t = table(&route(
            "      - filters:\n\
             \x20         - type: RequestHeaderModifier\n\
             \x20           requestHeaderModifier: {set: [{name: X-A, value: '1'}], add: [{name: x-b, value: '2'}], remove: [x-c, x-a]}\n\
             \x20         - type: ResponseHeaderModifier\n\
             \x20           responseHeaderModifier: {set: [{name: server, value: trellis}], add: [{name: via, value: mesh}], remove: [x-internal]}\n",
        ));
        let mut parts = req(
            "GET",
            "/",
            &[
                ("x-a", "old"),
                ("x-a", "older"),
                ("x-b", "keep"),
                ("x-c", "gone"),
                ("x-d", "d"),
            ],
        );
        let (rule, m) = matched(&t, &parts);
        rule.apply_request_filters(&mut parts, &m);
        let values = |h: &HeaderMap, name: &str| -> Vec<String> {
            h.get_all(name)
                .iter()
                .map(|v| v.to_str().unwrap().to_string())
                .collect()
        };
        // remove, then set: x-a is set even though it is also removed.
        assert_eq!(values(&parts.headers, "x-a"), ["1"]);
        assert_eq!(values(&parts.headers, "x-b"), ["keep", "2"]);
        assert!(values(&parts.headers, "x-c").is_empty());
        assert_eq!(values(&parts.headers, "x-d"), ["d"]);

        let mut response = HeaderMap::new();
        response.insert("server", HeaderValue::from_static("app"));
        response.insert("x-internal", HeaderValue::from_static("secret"));
        response.insert("via", HeaderValue::from_static("proxy"));
        rule.apply_response_filters(&mut response);
        assert_eq!(values(&response, "server"), ["trellis"]);
        assert_eq!(values(&response, "via"), ["proxy", "mesh"]);
        assert!(response.get("x-internal").is_none());
        assert!(rule.redirect(&parts, &m, 80).is_none());
    }

    #[test]
    fn prefix_replacement_follows_the_gateway_api_table() {
        let cases = [
            // (request path, prefix match, replacement, result)
            ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
            ("/foo", "/foo", "/xyz", "/xyz"),
            ("/foo/", "/foo", "/xyz", "/xyz/"),
            ("/foo/bar", "/foo", "", "/bar"),
            ("/foo/", "/foo", "", "/"),
            ("/foo", "/foo", "", "/"),
            ("/foo/", "/foo", "/", "/"),
            ("/foo", "/foo", "/", "/"),
            // Prefix "/".
            ("/foo/bar", "/", "/v2", "/v2/foo/bar"),
            ("/", "/", "/v2", "/v2/"),
            ("/foo", "/", "", "/foo"),
            ("/foo", "/", "/", "/foo"),
        ];
        for (path, prefix, replacement, expect) in cases {
            let PathMatch::PathPrefix(normalized) = compile_path("PathPrefix", prefix) else {
                unreachable!()
            };
            assert!(prefix_matches(&normalized, path));
            let modifier = PathModifier::ReplacePrefixMatch(replacement.into());
            assert_eq!(
                modifier
                    .apply(path, &MatchedPath::Prefix(&normalized))
                    .as_deref(),
                Some(expect),
                "{path} {prefix} {replacement:?}"
            );
        }
        // Not matched by prefix: unchanged.
        let modifier = PathModifier::ReplacePrefixMatch("/x".into());
        assert_eq!(modifier.apply("/a", &MatchedPath::Exact("/a")), None);
        let full = PathModifier::ReplaceFullPath("/x".into());
        assert_eq!(
            full.apply("/a/b", &MatchedPath::RegularExpression("/a/.*"))
                .as_deref(),
            Some("/x")
        );
    }

    #[test]
    fn url_rewrite() {
        let t = table(&route(
            "      - matches: [{path: {value: /api/}}]\n\
             \x20       filters: [{type: URLRewrite, urlRewrite: {hostname: other.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}]\n\
             \x20     - matches: [{path: {type: Exact, value: /full}}]\n\
             \x20       filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /elsewhere}}}]\n",
        ));
        // HTTP/1: origin-form URI and a Host header.
        let mut parts = req(
            "GET",
            "/api/items?id=3&x=%20",
            &[("host", "backend.shop:80")],
        );
        let (rule, m) = matched(&t, &parts);
        assert_eq!(m, MatchedPath::Prefix("/api"));
        rule.apply_request_filters(&mut parts, &m);
        assert_eq!(parts.uri.to_string(), "/v2/items?id=3&x=%20");
        assert_eq!(parts.headers["host"], "other.example");
        // HTTP/2: the authority is in the URI; no Host header is added.
        let mut parts = req("GET", "http://backend.shop/api?q", &[]);
        let (rule, m) = matched(&t, &parts);
        rule.apply_request_filters(&mut parts, &m);
        assert_eq!(parts.uri.to_string(), "http://other.example/v2?q");
        assert!(parts.headers.get("host").is_none());
        // Full path replacement keeps the query; the host is untouched.
        let mut parts = req("GET", "/full?a=1", &[("host", "backend")]);
        let (rule, m) = matched(&t, &parts);
        rule.apply_request_filters(&mut parts, &m);
        assert_eq!(parts.uri.to_string(), "/elsewhere?a=1");
        assert_eq!(parts.headers["host"], "backend");
    }

    fn redirect_location(config: &str, uri: &str, host: Option<&str>, port: u16) -> (u16, String) {
        let routes = parse_ok(&format!(
            "  - name: r\n    namespace: shop\n    parentRefs: [{{name: backend}}]\n    rules:\n      - matches: [{{path: {{value: /a}}}}]\n        filters: [{{type: RequestRedirect, requestRedirect: {config}}}]\n"
        ));
        let t = RouteTable::new(&routes);
        let headers: Vec<(&str, &str)> = host.map(|h| ("host", h)).into_iter().collect();
        let parts = req("GET", uri, &headers);
        let RouteDecision::Matched(rule, m) = t.select("shop", "backend", port, &parts) else {
            panic!("no match for {uri}");
        };
        assert!(rule.backend_refs.is_empty(), "a redirect has no backend");
        let response = rule.redirect(&parts, &m, port).expect("redirects");
        let location = response
            .headers()
            .get(LOCATION)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        (response.status().as_u16(), location)
    }

    #[test]
    fn redirects() {
        let host = Some("backend.shop");
        // (config, request URI, Host, service port) -> (status, Location)
        type Case<'a> = (&'a str, &'a str, Option<&'a str>, u16, u16, &'a str);
        let cases: &[Case] = &[
            // (config, request URI, Host, service port, status, Location)
            (
                "{scheme: https}",
                "/a/b?c=1",
                host,
                80,
                302,
                "https://backend.shop/a/b?c=1",
            ),
            (
                "{scheme: https}",
                "/a",
                Some("backend.shop:80"),
                80,
                302,
                "https://backend.shop/a",
            ),
            (
                "{scheme: http}",
                "/a",
                host,
                8080,
                302,
                "http://backend.shop/a",
            ),
            (
                "{hostname: x.example, port: 8443, statusCode: 301}",
                "/a?c=1",
                host,
                80,
                301,
                "http://x.example:8443/a?c=1",
            ),
            (
                "{scheme: https, port: 443}",
                "/a",
                host,
                80,
                302,
                "https://backend.shop/a",
            ),
            (
                "{}",
                "/a?q",
                Some("backend.shop:8080"),
                8080,
                302,
                "http://backend.shop:8080/a?q",
            ),
            ("{}", "/a", host, 80, 302, "http://backend.shop/a"),
            (
                "{}",
                "/a",
                Some("[fd00::1]:8080"),
                8080,
                302,
                "http://[fd00::1]:8080/a",
            ),
            (
                "{path: {type: ReplaceFullPath, replaceFullPath: /new}, scheme: https}",
                "/a/b?c=1",
                host,
                80,
                302,
                "https://backend.shop/new?c=1",
            ),
            (
                "{path: {type: ReplacePrefixMatch, replacePrefixMatch: /z}}",
                "/a/b?c=1",
                host,
                80,
                302,
                "http://backend.shop/z/b?c=1",
            ),
            // No host known: a relative Location.
            ("{}", "/a?c=1", None, 80, 302, "/a?c=1"),
            // An absolute URI (HTTP/2) gives the scheme and host.
            (
                "{}",
                "https://backend.shop/a",
                None,
                8080,
                302,
                "https://backend.shop:8080/a",
            ),
            (
                "{scheme: http}",
                "https://backend.shop/a",
                None,
                8080,
                302,
                "http://backend.shop/a",
            ),
        ];
        for (config, uri, host, port, status, location) in cases {
            assert_eq!(
                redirect_location(config, uri, *host, *port),
                (*status, location.to_string()),
                "{config} {uri}"
            );
        }
    }

    #[test]
    fn faults_and_percentages() {
        assert_eq!(
            Percentage::from_percent(12.5).map(Percentage::percent),
            Some(12.5)
        );
        assert_eq!(Percentage::from_percent(100.0), Some(Percentage::ALL));
        assert!(Percentage::from_percent(f64::NAN).is_none());
        let mut rng = fastrand::Rng::with_seed(3);
        let none = Percentage::from_percent(0.0).unwrap();
        assert!((0..1000).all(|_| !none.sample(&mut rng)));
        assert!((0..1000).all(|_| Percentage::ALL.sample(&mut rng)));
        let routes = parse_ok(&route(
            "      - fault: {delay: {fixedDelay: 100ms, percentage: 10}, abort: {httpStatus: 503, percentage: 50}}\n",
        ));
        let fault = routes[0].rules[0].fault.as_ref().unwrap();
        let (mut delayed, mut aborted) = (0, 0);
        for _ in 0..10_000 {
            let action = fault.sample(&mut rng);
            if let Some(d) = action.delay {
                assert_eq!(d, Duration::from_millis(100));
                delayed += 1;
            }
            if let Some(s) = action.abort {
                assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
                aborted += 1;
            }
        }
        assert!((800..=1_200).contains(&delayed), "{delayed}");
        assert!((4_600..=5_400).contains(&aborted), "{aborted}");
        let retry = Retry {
            attempts: 1,
            codes: vec![502, 503],
            backoff: Duration::ZERO,
            per_try_timeout: None,
            retry_on_connect_failure: false,
        };
        assert!(retry.retries_status(503) && !retry.retries_status(500));
    }
}
