//! Istio `AuthorizationPolicy` at L4 (docs/policy.md): documents as written, a compiled
//! form, and the pure decision over the policies that apply to one workload ([`decide`],
//! reached through `PolicySet`).

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

mod doc;

pub use doc::{Action, AuthorizationPolicy};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("AuthorizationPolicy {namespace}/{name}: {field}: {problem}")]
pub struct AuthzError {
    pub namespace: String,
    pub name: String,
    pub field: String,
    pub problem: String,
}

/// Keys a `when` condition may use at L4, and the L7 ones it cannot see.
const L4_KEYS: [&str; 6] = [
    "source.ip",
    "source.namespace",
    "source.principal",
    "source.serviceAccount",
    "destination.ip",
    "destination.port",
];
const L7_KEY_PREFIXES: [&str; 5] = ["request.", "remote.ip", "connection.sni", "experimental.", "source.remoteIp"];

/// A string pattern: exact, `abc*`, `*abc` or `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl Pattern {
    fn parse(s: &str) -> Result<Self, String> {
        if s == "*" {
            return Ok(Pattern::Any);
        }
        match (s.strip_suffix('*'), s.strip_prefix('*')) {
            (Some(p), None) if !p.contains('*') => Ok(Pattern::Prefix(p.into())),
            (None, Some(x)) if !x.contains('*') => Ok(Pattern::Suffix(x.into())),
            (None, None) if !s.contains('*') => Ok(Pattern::Exact(s.into())),
            _ => Err(format!("{s:?}: '*' only at the start or the end")),
        }
    }

    fn matches(&self, v: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(e) => v == e,
            Pattern::Prefix(p) => v.starts_with(p.as_str()),
            Pattern::Suffix(x) => v.ends_with(x.as_str()),
        }
    }
}

/// An IP or CIDR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cidr {
    net: IpAddr,
    len: u8,
}

impl Cidr {
    fn parse(s: &str) -> Result<Self, String> {
        let (ip, len) = match s.split_once('/') {
            Some((ip, len)) => (ip, Some(len)),
            None => (s, None),
        };
        let net: IpAddr = ip.parse().map_err(|_| format!("{s:?} is not an IP or CIDR"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let len = match len {
            Some(l) => l.parse::<u8>().ok().filter(|l| *l <= max).ok_or_else(|| format!("{s:?}: bad prefix length"))?,
            None => max,
        };
        Ok(Cidr { net, len })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(i)) => {
                let mask = if self.len == 0 { 0 } else { u32::MAX << (32 - u32::from(self.len)) };
                u32::from(n) & mask == u32::from(i) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(i)) => {
                let mask = if self.len == 0 { 0 } else { u128::MAX << (128 - u32::from(self.len)) };
                u128::from(n) & mask == u128::from(i) & mask
            }
            _ => false,
        }
    }
}

/// One set-or-not field: `Some(values)` must match (any), `None` is unset.
#[derive(Debug, Clone)]
struct Field<T> {
    any_of: Option<Vec<T>>,
    none_of: Option<Vec<T>>,
}

impl<T> Field<T> {
    /// `m(value)`: does one value of the list match the connection?
    fn matches(&self, m: impl Fn(&T) -> bool) -> bool {
        self.any_of.as_ref().is_none_or(|v| v.iter().any(&m)) && self.none_of.as_ref().is_none_or(|v| !v.iter().any(&m))
    }
}

#[derive(Debug, Clone)]
struct CompiledSource {
    principals: Field<Pattern>,
    namespaces: Field<Pattern>,
    service_accounts: Field<Pattern>,
    ip_blocks: Field<Cidr>,
}

#[derive(Debug, Clone, Default)]
struct CompiledRule {
    from: Option<Vec<CompiledSource>>,
    to: Option<Vec<Field<u16>>>,
    when: Vec<(String, Field<String>)>,
    /// Uses a field or key an L4 agent cannot see.
    l7: bool,
}

/// What the destination knows about a connection when it decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnFacts {
    /// Verified peer identity without `spiffe://` (`td/ns/x/sa/y`); None for plaintext.
    pub principal: Option<Arc<str>>,
    pub src_ip: IpAddr,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
}

impl ConnFacts {
    /// Namespace and service account come from the verified principal only.
    fn ns_and_sa(&self) -> (Option<&str>, Option<&str>) {
        let Some(p) = &self.principal else { return (None, None) };
        let parts: Vec<&str> = p.split('/').collect();
        match parts.as_slice() {
            [_, "ns", ns, "sa", sa] => (Some(ns), Some(sa)),
            _ => (None, None),
        }
    }
}

impl CompiledRule {
    fn matches(&self, c: &ConnFacts, action: Action) -> bool {
        // ALLOW with L7 never matches; DENY with L7 matches on its L4 parts (denies more).
        if self.l7 && action == Action::Allow {
            return false;
        }
        let (ns, sa) = c.ns_and_sa();
        let opt = |pat: &Pattern, v: Option<&str>| v.is_some_and(|v| pat.matches(v));
        let from = self.from.as_ref().is_none_or(|fs| {
            fs.iter().any(|s| {
                s.principals.matches(|p| opt(p, c.principal.as_deref()))
                    && s.namespaces.matches(|p| opt(p, ns))
                    && s.service_accounts.matches(|p| opt(p, sa))
                    && s.ip_blocks.matches(|b| b.contains(c.src_ip))
            })
        });
        let to = self.to.as_ref().is_none_or(|ts| ts.iter().any(|t| t.matches(|p| *p == c.dst_port)));
        let when = self.when.iter().all(|(key, f)| {
            let actual: Option<String> = match key.as_str() {
                "source.ip" => Some(c.src_ip.to_canonical().to_string()),
                "source.namespace" => ns.map(str::to_string),
                "source.principal" => c.principal.as_deref().map(str::to_string),
                "source.serviceAccount" => match (ns, sa) {
                    (Some(n), Some(s)) => Some(format!("{n}/{s}")),
                    _ => None,
                },
                "destination.ip" => Some(c.dst_ip.to_canonical().to_string()),
                "destination.port" => Some(c.dst_port.to_string()),
                _ => None, // L7 keys: the rule is marked `l7`
            };
            let ip_like = matches!(key.as_str(), "source.ip" | "destination.ip");
            f.matches(|v| match (&actual, ip_like) {
                (Some(a), true) => Cidr::parse(v).is_ok_and(|b| a.parse().is_ok_and(|ip| b.contains(ip))),
                (Some(a), false) => Pattern::parse(v).is_ok_and(|p| p.matches(a)),
                (None, _) => false,
            })
        });
        from && to && when
    }
}

/// Where a policy applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Root namespace, no selector.
    Mesh,
    Namespace(String),
    Selector {
        namespace: String,
        labels: BTreeMap<String, String>,
    },
    /// `targetRef(s)`: a waypoint or gateway binding, not for a node agent.
    NotApplicable,
}

/// A validated policy, ready to evaluate.
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    pub name: String,
    pub namespace: String,
    pub action: Action,
    pub dry_run: bool,
    pub scope: Scope,
    rules: Option<Vec<CompiledRule>>,
}

impl CompiledPolicy {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// What an L4 agent cannot enforce as written, when some rules use L7 fields or keys
    /// (`to.operation` hosts/methods/paths, `request.*` conditions): with Istio's ambient
    /// semantics such an ALLOW rule never matches without a waypoint, and such a DENY rule
    /// matches on its L4 parts alone (it denies more).
    pub fn l7_note(&self) -> Option<String> {
        let rules = self.rules.as_deref()?;
        let l7 = rules.iter().filter(|r| r.l7).count();
        if l7 == 0 {
            return None;
        }
        let of = format!("{l7} of {} rules use L7 fields (methods, paths, hosts, request.*)", rules.len());
        Some(match self.action {
            Action::Allow if l7 == rules.len() => {
                format!("{of}: without a waypoint they never match at L4, so this policy allows nothing")
            }
            Action::Allow => format!("{of}: without a waypoint those rules never match at L4"),
            _ => format!("{of}: at L4 those rules match on their L4 parts alone (they deny more)"),
        })
    }

    /// Does it apply to a workload in `namespace` with `labels`?
    pub fn selects(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        match &self.scope {
            Scope::Mesh => true,
            Scope::Namespace(ns) => ns == namespace,
            Scope::Selector { namespace: ns, labels: want } => {
                ns == namespace && want.iter().all(|(k, v)| labels.get(k) == Some(v))
            }
            Scope::NotApplicable => false,
        }
    }

    fn matches(&self, c: &ConnFacts) -> bool {
        self.rules.as_ref().is_some_and(|rules| rules.iter().any(|r| r.matches(c, self.action)))
    }
}

fn compile_field<T>(
    err: &dyn Fn(&str, String) -> AuthzError,
    name: &str,
    any: &Option<Vec<String>>,
    none: &Option<Vec<String>>,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Field<T>, AuthzError> {
    let conv = |field: String, v: &Option<Vec<String>>| -> Result<Option<Vec<T>>, AuthzError> {
        v.as_ref().map(|vs| vs.iter().map(|s| parse(s).map_err(|e| err(&field, e))).collect()).transpose()
    };
    // "from.source.namespaces" -> "from.source.notNamespaces"
    let (path, last) = name.rsplit_once('.').unwrap_or(("", name));
    let not_last = format!("not{}{}", last[..1].to_uppercase(), &last[1..]);
    let not = if path.is_empty() { not_last } else { format!("{path}.{not_last}") };
    Ok(Field { any_of: conv(name.to_string(), any)?, none_of: conv(not, none)? })
}

impl AuthorizationPolicy {
    /// Validate and compile; the error names the field.
    pub fn compile(&self, root_namespace: &str) -> Result<CompiledPolicy, AuthzError> {
        let m = &self.metadata;
        let err = |field: &str, problem: String| AuthzError {
            namespace: m.namespace.clone(),
            name: m.name.clone(),
            field: field.to_string(),
            problem,
        };
        if m.name.is_empty() || m.namespace.is_empty() {
            return Err(err("metadata", "name and namespace are required".into()));
        }
        let s = &self.spec;
        let scope = if s.target_ref.is_some() || s.target_refs.as_ref().is_some_and(|t| !t.is_empty()) {
            Scope::NotApplicable
        } else if let Some(sel) = &s.selector {
            Scope::Selector { namespace: m.namespace.clone(), labels: sel.match_labels.clone() }
        } else if m.namespace == root_namespace {
            Scope::Mesh
        } else {
            Scope::Namespace(m.namespace.clone())
        };
        let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| format!("{p:?} is not a port"));
        let mut rules = None;
        if let Some(rs) = &s.rules {
            let mut out = Vec::new();
            for (i, r) in rs.iter().enumerate() {
                let at = |f: &str| format!("spec.rules[{i}].{f}");
                let e = |f: &str, p: String| err(&at(f), p);
                let mut rule = CompiledRule::default();
                if let Some(froms) = &r.from {
                    let mut cs = Vec::new();
                    for f in froms {
                        let x = &f.source;
                        rule.l7 |= x.request_principals.is_some()
                            || x.not_request_principals.is_some()
                            || x.remote_ip_blocks.is_some()
                            || x.not_remote_ip_blocks.is_some();
                        cs.push(CompiledSource {
                            principals: compile_field(
                                &e,
                                "from.source.principals",
                                &x.principals,
                                &x.not_principals,
                                Pattern::parse,
                            )?,
                            namespaces: compile_field(
                                &e,
                                "from.source.namespaces",
                                &x.namespaces,
                                &x.not_namespaces,
                                Pattern::parse,
                            )?,
                            service_accounts: compile_field(
                                &e,
                                "from.source.serviceAccounts",
                                &x.service_accounts,
                                &x.not_service_accounts,
                                Pattern::parse,
                            )?,
                            ip_blocks: compile_field(
                                &e,
                                "from.source.ipBlocks",
                                &x.ip_blocks,
                                &x.not_ip_blocks,
                                Cidr::parse,
                            )?,
                        });
                    }
                    rule.from = Some(cs);
                }
                if let Some(tos) = &r.to {
                    let mut ts = Vec::new();
                    for t in tos {
                        let o = &t.operation;
                        rule.l7 |= [&o.hosts, &o.not_hosts, &o.methods, &o.not_methods, &o.paths, &o.not_paths]
                            .iter()
                            .any(|f| f.is_some());
                        ts.push(compile_field(&e, "to.operation.ports", &o.ports, &o.not_ports, port)?);
                    }
                    rule.to = Some(ts);
                }
                for (j, c) in r.when.iter().flatten().enumerate() {
                    let field = format!("when[{j}].key");
                    if L7_KEY_PREFIXES.iter().any(|p| c.key.starts_with(p)) {
                        rule.l7 = true;
                        continue;
                    }
                    if !L4_KEYS.contains(&c.key.as_str()) {
                        return Err(e(&field, format!("unknown key {:?}", c.key)));
                    }
                    if c.values.is_none() && c.not_values.is_none() {
                        return Err(e(&format!("when[{j}]"), "needs values or notValues".into()));
                    }
                    let check: &dyn Fn(&str) -> Result<(), String> = match c.key.as_str() {
                        "source.ip" | "destination.ip" => &|v| Cidr::parse(v).map(|_| ()),
                        "destination.port" => &|v| port(v).map(|_| ()),
                        _ => &|v| Pattern::parse(v).map(|_| ()),
                    };
                    for v in c.values.iter().flatten().chain(c.not_values.iter().flatten()) {
                        check(v).map_err(|p| e(&format!("when[{j}].values"), p))?;
                    }
                    rule.when.push((c.key.clone(), Field { any_of: c.values.clone(), none_of: c.not_values.clone() }));
                }
                out.push(rule);
            }
            rules = Some(out);
        }
        Ok(CompiledPolicy {
            name: m.name.clone(),
            namespace: m.namespace.clone(),
            action: s.action,
            dry_run: m.annotations.get("istio.io/dry-run").is_some_and(|v| v == "true"),
            scope,
            rules,
        })
    }
}

/// Why a connection was allowed or denied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// `policy`: the DENY policy that matched, or None for "no ALLOW policy matched".
    Deny {
        policy: Option<String>,
    },
}

impl Decision {
    pub fn reason(&self) -> String {
        match self {
            Decision::Allow => "allowed".into(),
            Decision::Deny { policy: Some(p) } => format!("denied by AuthorizationPolicy {p}"),
            Decision::Deny { policy: None } => "denied: no ALLOW policy matched".into(),
        }
    }
}

/// The outcome, plus what dry-run and AUDIT policies would have said (reported, never
/// enforced).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Decision,
    /// Dry-run policies that matched, with their action.
    pub dry_run: Vec<(String, Action)>,
    /// AUDIT policies that matched.
    pub audit: Vec<String>,
}

/// The decision for a connection, given the policies that apply to its destination
/// workload, in the set's order (`PolicySet::for_workload` selects them).
pub(super) fn decide(applicable: &[&CompiledPolicy], c: &ConnFacts) -> Verdict {
    let mut v = Verdict { decision: Decision::Allow, dry_run: Vec::new(), audit: Vec::new() };
    for p in applicable.iter().filter(|p| p.dry_run) {
        if matches!(p.action, Action::Allow | Action::Deny) && p.matches(c) {
            v.dry_run.push((p.id(), p.action));
        }
    }
    let enforced: Vec<&&CompiledPolicy> = applicable.iter().filter(|p| !p.dry_run).collect();
    v.audit = enforced.iter().filter(|p| p.action == Action::Audit && p.matches(c)).map(|p| p.id()).collect();
    if let Some(deny) = enforced.iter().find(|p| p.action == Action::Deny && p.matches(c)) {
        v.decision = Decision::Deny { policy: Some(deny.id()) };
        return v;
    }
    let allows: Vec<&&&CompiledPolicy> = enforced.iter().filter(|p| p.action == Action::Allow).collect();
    if allows.is_empty() || allows.iter().any(|p| p.matches(c)) {
        return v;
    }
    v.decision = Decision::Deny { policy: None };
    v
}

#[cfg(test)]
mod tests;
