//! The authorization matcher: arbitrary policies (built as the file's shape from fuzz input,
//! then validated and compiled like a config file's), an arbitrary destination workload,
//! connection and HTTP request, through `policy::evaluate` (L4) and `evaluate_request` (L7).
//! Strings are drawn from a vocabulary of meaningful values or taken raw, so that most
//! policies validate and match sometimes.
//!
//! Invariants checked beyond "never panics":
//! - a decision is deterministic and only cites a policy that selects the workload, with the
//!   decision's action;
//! - with no policy selecting the workload, everything is allowed (L7: unless the request is
//!   refused before policies, which cites no policy);
//! - a DENY that matches everything (`rules: [{}]`) always denies, at L4 and L7;
//! - an ALLOW that matches everything leaves only DENY policies (or the L7 pre-check) to deny;
//! - L4 is at least as strict as L7: a connection allowed at L4 has every request allowed
//!   that passes the pre-check (ALLOW rules with HTTP fields never match at L4; DENY rules
//!   count their HTTP fields as matching);
//! - `normalize_path` leaves no `//`, `.`/`..` segment or `\` in a path that starts with `/`.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use arbitrary::{Arbitrary, Unstructured};
use http::{HeaderMap, HeaderName, HeaderValue};
use mesh_agent::{
    policy::{
        self, Action, AuthorizationPolicy, ConnectionAttrs, Decision, FileCondition, FileFrom,
        FileOperation, FilePolicy, FileRule, FileScalar, FileSelector, FileSource, FileTo,
        RequestAttrs,
    },
    state::{Identity, PodKey, Workload},
};
use serde::de::IgnoredAny;

const VOCABULARY: &[&str] = &[
    "*",
    "shop",
    "default",
    "trellis-system",
    "frontend",
    "backend",
    "app",
    "cluster.local",
    "cluster.local/ns/shop/sa/frontend",
    "spiffe://cluster.local/ns/shop/sa/frontend",
    "cluster.local/*",
    "*/sa/frontend",
    "*/ns/shop/sa/backend",
    "sho*",
    "*end",
    "10.0.0.0/8",
    "10.1.2.3",
    "10.1.2.3/32",
    "::ffff:10.1.2.3",
    "fd00::/8",
    "0.0.0.0/0",
    "8080",
    "80",
    "0",
    "65536",
    "GET",
    "POST",
    "get",
    "G*",
    "/",
    "/api/*",
    "/api",
    "*.png",
    "/healthz",
    "/a/../api/x",
    "/api%2Fx",
    "/API/./x//y",
    "\\api\\x",
    "/x?y=1",
    "/%00",
    "shop.example",
    "Shop.Example.",
    "*.shop.example",
    "shop.example:8080",
    "*:8080",
    "[::1]:80",
    "[::1]",
    "x-user",
    "X-User",
    "alice",
    "bob-*",
    "alice,bob",
    "",
    "request.headers[x-user]",
    "request.headers[]",
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.port",
    "remote.ip",
    "ALLOW",
    "DENY",
    "AUDIT",
];

/// A string: one of [`VOCABULARY`] or raw bytes.
#[derive(Arbitrary, Debug)]
enum Word {
    Known(u8),
    Raw(String),
}

impl Word {
    fn text(&self) -> String {
        match self {
            Word::Known(i) => VOCABULARY[*i as usize % VOCABULARY.len()].to_string(),
            Word::Raw(s) => s.clone(),
        }
    }
}

fn texts(words: &[Word]) -> Vec<String> {
    words.iter().map(Word::text).collect()
}

#[derive(Arbitrary, Debug)]
enum Scalar {
    Number(i64),
    Text(Word),
}

fn scalars(values: &[Scalar]) -> Vec<FileScalar> {
    values
        .iter()
        .map(|v| match v {
            Scalar::Number(n) => FileScalar::Number(*n),
            Scalar::Text(w) => FileScalar::Text(w.text()),
        })
        .collect()
}

#[derive(Arbitrary, Debug)]
struct PolicyIn {
    name: Word,
    namespace: Word,
    selector: Option<Vec<(Word, Word)>>,
    action: Option<Word>,
    rules: Option<Vec<RuleIn>>,
    unsupported: Option<u8>,
}

#[derive(Arbitrary, Debug)]
struct RuleIn {
    from: Vec<Option<SourceIn>>,
    to: Vec<Option<OperationIn>>,
    when: Vec<ConditionIn>,
}

#[derive(Arbitrary, Debug)]
struct SourceIn {
    principals: Vec<Word>,
    not_principals: Vec<Word>,
    namespaces: Vec<Word>,
    not_namespaces: Vec<Word>,
    ip_blocks: Vec<Word>,
    not_ip_blocks: Vec<Word>,
    unsupported: Option<u8>,
}

#[derive(Arbitrary, Debug)]
struct OperationIn {
    ports: Vec<Scalar>,
    not_ports: Vec<Scalar>,
    hosts: Vec<Word>,
    not_hosts: Vec<Word>,
    methods: Vec<Word>,
    not_methods: Vec<Word>,
    paths: Vec<Word>,
    not_paths: Vec<Word>,
}

#[derive(Arbitrary, Debug)]
struct ConditionIn {
    key: Option<Word>,
    values: Vec<Scalar>,
    not_values: Vec<Scalar>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    policies: Vec<PolicyIn>,
    dst_namespace: Word,
    dst_labels: Vec<(Word, Word)>,
    /// The destination also takes the namespace and selector labels of this policy (index
    /// modulo their number), so that policies select it more often than by chance.
    dst_like: Option<u8>,
    src: Option<(Word, Word, Word)>,
    src_ip: SrcIp,
    dst_port: u16,
    method: Word,
    path: Word,
    host: Word,
    headers: Vec<(Word, Word)>,
}

#[derive(Arbitrary, Debug)]
enum SrcIp {
    V4([u8; 4]),
    V6([u8; 16]),
    /// As a dual-stack socket reports an IPv4 peer.
    Mapped([u8; 4]),
    Known(u8),
}

impl SrcIp {
    fn addr(&self) -> IpAddr {
        match self {
            SrcIp::V4(b) => Ipv4Addr::from(*b).into(),
            SrcIp::V6(b) => Ipv6Addr::from(*b).into(),
            SrcIp::Mapped(b) => Ipv4Addr::from(*b).to_ipv6_mapped().into(),
            SrcIp::Known(i) => [
                "10.1.2.3",
                "10.9.9.9",
                "::ffff:10.1.2.3",
                "fd00::1",
                "192.168.0.1",
            ][*i as usize % 5]
                .parse()
                .expect("a known address"),
        }
    }
}

fn file_policy(p: &PolicyIn) -> FilePolicy {
    // One of the fields Trellis refuses rather than ignores, now and then.
    let unsupported =
        |n: Option<u8>, which: u8| (n.map(|n| n % 8) == Some(which)).then_some(IgnoredAny);
    FilePolicy {
        name: p.name.text(),
        namespace: p.namespace.text(),
        selector: p.selector.as_ref().map(|labels| FileSelector {
            match_labels: labels.iter().map(|(k, v)| (k.text(), v.text())).collect(),
        }),
        action: p.action.as_ref().map(Word::text),
        rules: p
            .rules
            .as_ref()
            .map(|rules| rules.iter().map(file_rule).collect()),
        provider: unsupported(p.unsupported, 0),
        target_ref: unsupported(p.unsupported, 1),
        target_refs: unsupported(p.unsupported, 2),
    }
}

fn file_rule(r: &RuleIn) -> FileRule {
    FileRule {
        from: r
            .from
            .iter()
            .map(|s| FileFrom {
                source: s.as_ref().map(|s| {
                    let unsupported = |which: u8| {
                        (s.unsupported.map(|n| n % 12) == Some(which)).then_some(IgnoredAny)
                    };
                    FileSource {
                        principals: texts(&s.principals),
                        not_principals: texts(&s.not_principals),
                        namespaces: texts(&s.namespaces),
                        not_namespaces: texts(&s.not_namespaces),
                        ip_blocks: texts(&s.ip_blocks),
                        not_ip_blocks: texts(&s.not_ip_blocks),
                        request_principals: unsupported(0),
                        not_request_principals: unsupported(1),
                        remote_ip_blocks: unsupported(2),
                        not_remote_ip_blocks: unsupported(3),
                        service_accounts: unsupported(4),
                        not_service_accounts: unsupported(5),
                    }
                }),
            })
            .collect(),
        to: r
            .to
            .iter()
            .map(|o| FileTo {
                operation: o.as_ref().map(|o| FileOperation {
                    ports: scalars(&o.ports),
                    not_ports: scalars(&o.not_ports),
                    hosts: texts(&o.hosts),
                    not_hosts: texts(&o.not_hosts),
                    methods: texts(&o.methods),
                    not_methods: texts(&o.not_methods),
                    paths: texts(&o.paths),
                    not_paths: texts(&o.not_paths),
                }),
            })
            .collect(),
        when: r
            .when
            .iter()
            .map(|c| FileCondition {
                key: c.key.as_ref().map(Word::text),
                values: scalars(&c.values),
                not_values: scalars(&c.not_values),
            })
            .collect(),
    }
}

/// A policy in the root namespace with the rule `{}`: matches every connection and request.
fn match_all(name: &str, action: &str) -> AuthorizationPolicy {
    let file = FilePolicy {
        name: name.into(),
        namespace: policy::ROOT_NAMESPACE.into(),
        selector: None,
        action: Some(action.into()),
        rules: Some(vec![FileRule {
            from: vec![],
            to: vec![],
            when: vec![],
        }]),
        provider: None,
        target_ref: None,
        target_refs: None,
    };
    policy::validate(vec![file])
        .expect("a match-all policy is valid")
        .remove(0)
}

/// Checks what a decision cites against the policies that select the workload.
fn check_cited(decision: &Decision, policies: &[AuthorizationPolicy], dst: &Workload) {
    let (cited, action) = match decision {
        Decision::Allow { policy: Some(k) } => (k, Action::Allow),
        Decision::Deny {
            policy: Some(k), ..
        } => (k, Action::Deny),
        _ => return,
    };
    assert!(
        policies.iter().any(|p| p.action == action
            && p.selects(dst)
            && **cited == *format!("{}/{}", p.namespace, p.name)),
        "{decision:?} cites a policy that does not select {} with that action",
        dst.key
    );
}

/// Runs one input; see the module documentation.
pub fn check(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let files: Vec<FilePolicy> = input.policies.iter().map(file_policy).collect();
    let policies = match policy::validate(files) {
        Ok(p) => p,
        Err(e) => {
            assert!(e.field.starts_with("authorizationPolicies["), "{e}");
            return;
        }
    };
    let mut namespace = input.dst_namespace.text();
    let mut labels: BTreeMap<String, String> = input
        .dst_labels
        .iter()
        .map(|(k, v)| (k.text(), v.text()))
        .collect();
    if let Some(i) = input.dst_like
        && !policies.is_empty()
    {
        let like = &policies[i as usize % policies.len()];
        if like.namespace != policy::ROOT_NAMESPACE {
            namespace = like.namespace.clone();
        }
        labels.extend(like.selector.clone());
    }
    let dst = Workload {
        key: PodKey {
            namespace: namespace.clone(),
            name: "dst".into(),
        },
        service_account: "backend".into(),
        ip: Ipv4Addr::new(10, 1, 0, 2).into(),
        node: "n1".into(),
        netns: PathBuf::new(),
        cgroup: PathBuf::new(),
        labels,
        enrolled: true,
        identity: Identity {
            trust_domain: "cluster.local".into(),
            namespace,
            service_account: "backend".into(),
        },
    };
    let src_identity = input.src.as_ref().map(|(td, ns, sa)| Identity {
        trust_domain: td.text(),
        namespace: ns.text(),
        service_account: sa.text(),
    });
    let conn = ConnectionAttrs {
        src_identity: src_identity.as_ref(),
        src_ip: input.src_ip.addr(),
        dst_port: input.dst_port,
    };
    let mut headers = HeaderMap::new();
    for (name, value) in &input.headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.text().as_bytes()),
            HeaderValue::from_str(&value.text()),
        ) {
            headers.append(n, v);
        }
    }
    let (method, path, host) = (input.method.text(), input.path.text(), input.host.text());
    let req = RequestAttrs {
        method: &method,
        path: &path,
        host: &host,
        headers: &headers,
    };

    let l4 = policy::evaluate(&policies, &dst, &conn);
    let l7 = policy::evaluate_request(&policies, &dst, &conn, &req);
    assert_eq!(
        l4,
        policy::evaluate(&policies, &dst, &conn),
        "L4 not deterministic"
    );
    assert_eq!(
        l7,
        policy::evaluate_request(&policies, &dst, &conn, &req),
        "L7 not deterministic"
    );
    check_cited(&l4, &policies, &dst);
    check_cited(&l7, &policies, &dst);
    let _ = policy::needs_http(&policies, &dst);

    // Refused before any policy is looked at (the method's case, `%00` in the path).
    let normalized = policy::normalize_path(&path);
    let prechecked = method.bytes().any(|b| b.is_ascii_lowercase()) || normalized.is_err();
    if prechecked {
        assert!(matches!(l7, Decision::Deny { policy: None, .. }), "{l7:?}");
    }
    if let Ok(p) = &normalized
        && p.starts_with('/')
    {
        assert!(
            !p.contains("//") && !p.contains('\\'),
            "{path:?} normalized to {p:?}"
        );
        assert!(
            !p.split('/').any(|s| s == "." || s == ".."),
            "{path:?} normalized to {p:?}"
        );
    }

    if !policies.iter().any(|p| p.selects(&dst)) {
        assert_eq!(l4, Decision::Allow { policy: None });
        if !prechecked {
            assert_eq!(l7, Decision::Allow { policy: None });
        }
    }
    if l4.is_allowed() && !prechecked {
        assert!(
            l7.is_allowed(),
            "allowed at L4 but {l7:?} at L7 for {req:?}"
        );
    }

    let mut with_deny = policies.clone();
    with_deny.push(match_all("fuzz-deny-all", "DENY"));
    assert!(!policy::evaluate(&with_deny, &dst, &conn).is_allowed());
    assert!(!policy::evaluate_request(&with_deny, &dst, &conn, &req).is_allowed());

    let mut with_allow = policies;
    with_allow.push(match_all("fuzz-allow-all", "ALLOW"));
    for (decision, precheck) in [
        (policy::evaluate(&with_allow, &dst, &conn), false),
        (
            policy::evaluate_request(&with_allow, &dst, &conn, &req),
            prechecked,
        ),
    ] {
        if let Decision::Deny {
            policy: None,
            reason,
        } = &decision
        {
            assert!(
                precheck,
                "denied with a match-all ALLOW and no DENY matching: {reason}"
            );
        }
    }
}
