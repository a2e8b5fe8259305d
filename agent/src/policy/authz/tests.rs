//! The rules of docs/policy.md, one table row each, and a property test.

use std::collections::BTreeMap;

use super::*;

const ROOT: &str = "istio-system";

fn policy(ns: &str, name: &str, spec: &str) -> CompiledPolicy {
    let doc = format!("metadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}");
    let p: AuthorizationPolicy = serde_yaml_ng::from_str(&doc).unwrap_or_else(|e| panic!("{doc}: {e}"));
    p.compile(ROOT).unwrap_or_else(|e| panic!("{doc}: {e}"))
}

fn mtls(principal: &str, port: u16) -> ConnFacts {
    ConnFacts {
        principal: Some(principal.into()),
        src_ip: "198.18.1.10".parse().unwrap(),
        dst_ip: "198.18.2.10".parse().unwrap(),
        dst_port: port,
    }
}

fn plaintext(port: u16) -> ConnFacts {
    ConnFacts { principal: None, ..mtls("x", port) }
}

fn labels(app: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("app".into(), app.into())])
}

/// The decision through the one entry point, `PolicySet::decide`.
fn authorize(ps: &[CompiledPolicy], namespace: &str, labels: &BTreeMap<String, String>, c: &ConnFacts) -> Verdict {
    crate::policy::PolicySet::new(ps.to_vec()).decide(namespace, labels, c)
}

fn allowed(ps: &[CompiledPolicy], c: &ConnFacts) -> bool {
    authorize(ps, "shop", &labels("db"), c).decision == Decision::Allow
}

const WEB: &str = "cluster.local/ns/shop/sa/web";
const OTHER: &str = "cluster.local/ns/other/sa/web";

#[test]
fn no_policy_allows_and_allow_with_no_match_denies() {
    assert!(allowed(&[], &plaintext(80)));
    let p = [policy("shop", "a", &format!("{{rules: [{{from: [{{source: {{principals: [{WEB}]}}}}]}}]}}"))];
    assert!(allowed(&p, &mtls(WEB, 80)));
    let v = authorize(&p, "shop", &labels("db"), &mtls(OTHER, 80));
    assert_eq!(v.decision, Decision::Deny { policy: None });
    assert_eq!(v.decision.reason(), "denied: no ALLOW policy matched");
}

#[test]
fn each_l4_field_and_its_not_form() {
    let cases: &[(&str, ConnFacts, bool)] = &[
        (&format!("{{rules: [{{from: [{{source: {{principals: [{WEB}]}}}}]}}]}}"), mtls(WEB, 80), true),
        (&format!("{{rules: [{{from: [{{source: {{notPrincipals: [{WEB}]}}}}]}}]}}"), mtls(WEB, 80), false),
        (&format!("{{rules: [{{from: [{{source: {{notPrincipals: [{WEB}]}}}}]}}]}}"), plaintext(80), true),
        ("{rules: [{from: [{source: {namespaces: [shop]}}]}]}", mtls(WEB, 80), true),
        ("{rules: [{from: [{source: {namespaces: [shop]}}]}]}", mtls(OTHER, 80), false),
        ("{rules: [{from: [{source: {notNamespaces: [shop]}}]}]}", mtls(OTHER, 80), true),
        ("{rules: [{from: [{source: {serviceAccounts: [shop/web]}}]}]}", mtls(WEB, 80), false),
        ("{rules: [{from: [{source: {serviceAccounts: [web]}}]}]}", mtls(WEB, 80), true),
        ("{rules: [{from: [{source: {notServiceAccounts: [web]}}]}]}", mtls(OTHER, 80), false),
        ("{rules: [{from: [{source: {ipBlocks: [198.18.1.0/24]}}]}]}", plaintext(80), true),
        ("{rules: [{from: [{source: {ipBlocks: [198.18.9.0/24]}}]}]}", plaintext(80), false),
        ("{rules: [{from: [{source: {notIpBlocks: [198.18.1.10]}}]}]}", plaintext(80), false),
        ("{rules: [{to: [{operation: {ports: [\"80\"]}}]}]}", plaintext(80), true),
        ("{rules: [{to: [{operation: {ports: [\"80\"]}}]}]}", plaintext(81), false),
        ("{rules: [{to: [{operation: {notPorts: [\"80\"]}}]}]}", plaintext(81), true),
        ("{rules: [{when: [{key: destination.port, values: [\"80\"]}]}]}", plaintext(80), true),
        ("{rules: [{when: [{key: source.ip, notValues: [198.18.1.0/24]}]}]}", plaintext(80), false),
        ("{rules: [{when: [{key: source.namespace, values: [shop]}]}]}", mtls(WEB, 80), true),
        ("{rules: [{when: [{key: source.principal, values: [\"*/sa/web\"]}]}]}", mtls(WEB, 80), true),
        ("{rules: [{when: [{key: source.serviceAccount, values: [shop/web]}]}]}", mtls(WEB, 80), true),
        ("{rules: [{when: [{key: destination.ip, values: [\"198.18.2.0/24\"]}]}]}", plaintext(80), true),
    ];
    for (spec, conn, expect) in cases {
        let p = [policy("shop", "p", spec)];
        assert_eq!(allowed(&p, conn), *expect, "{spec} with {conn:?}");
    }
}

#[test]
fn string_matching_is_exact_prefix_suffix_or_presence() {
    for (pattern, expect) in
        [("cluster.local/ns/shop/*", true), ("*/sa/web", true), ("*", true), ("cluster.local/ns/sh", false)]
    {
        let p = [policy("shop", "p", &format!("{{rules: [{{from: [{{source: {{principals: [\"{pattern}\"]}}}}]}}]}}"))];
        assert_eq!(allowed(&p, &mtls(WEB, 80)), expect, "{pattern}");
    }
    // Presence: plaintext has no principal, so even "*" does not match it.
    let p = [policy("shop", "p", "{rules: [{from: [{source: {principals: [\"*\"]}}]}]}")];
    assert!(!allowed(&p, &plaintext(80)));
}

#[test]
fn deny_beats_allow_and_names_the_policy() {
    let p = [
        policy("shop", "allow-all", "{rules: [{}]}"),
        policy(
            "shop",
            "deny-web",
            &format!("{{action: DENY, rules: [{{from: [{{source: {{principals: [{WEB}]}}}}]}}]}}"),
        ),
    ];
    let v = authorize(&p, "shop", &labels("db"), &mtls(WEB, 80));
    assert_eq!(v.decision, Decision::Deny { policy: Some("shop/deny-web".into()) });
    assert!(allowed(&p, &mtls(OTHER, 80)));
}

#[test]
fn l7_fields_fail_closed() {
    // ALLOW with an L7 field never matches (so it denies); DENY with one matches on L4 alone.
    let allow = [policy("shop", "p", "{rules: [{to: [{operation: {methods: [GET], ports: [\"80\"]}}]}]}")];
    assert!(!allowed(&allow, &plaintext(80)));
    let deny =
        [policy("shop", "p", "{action: DENY, rules: [{to: [{operation: {paths: [/admin], ports: [\"80\"]}}]}]}")];
    assert!(!allowed(&deny, &plaintext(80)), "denies more, never less");
    assert!(allowed(&deny, &plaintext(81)));
    let when_l7 = [policy("shop", "p", "{rules: [{when: [{key: \"request.headers[x]\", values: [a]}]}]}")];
    assert!(!allowed(&when_l7, &plaintext(80)));
}

#[test]
fn l7_rules_are_named_as_unenforceable_at_l4() {
    let all_l7 = policy("shop", "p", "{rules: [{to: [{operation: {methods: [GET]}}]}]}");
    let note = all_l7.l7_note().expect("an ALLOW of L7 rules is flagged");
    assert!(note.contains("1 of 1 rules") && note.contains("allows nothing"), "{note}");
    let mixed =
        policy("shop", "p", "{rules: [{to: [{operation: {paths: [/x]}}]}, {to: [{operation: {ports: [\"80\"]}}]}]}");
    let note = mixed.l7_note().unwrap();
    assert!(note.contains("1 of 2 rules") && note.contains("never match at L4"), "{note}");
    let deny =
        policy("shop", "p", "{action: DENY, rules: [{when: [{key: \"request.auth.claims[iss]\", values: [a]}]}]}");
    assert!(deny.l7_note().unwrap().contains("deny more"));
    assert_eq!(policy("shop", "p", "{rules: [{to: [{operation: {ports: [\"80\"]}}]}]}").l7_note(), None);
}

#[test]
fn empty_shapes() {
    assert!(allowed(&[policy("shop", "p", "{rules: [{}]}")], &plaintext(80)), "rules: [{{}}] matches everything");
    assert!(!allowed(&[policy("shop", "p", "{}")], &plaintext(80)), "an ALLOW policy with no rules denies all");
    assert!(allowed(&[policy("shop", "p", "{action: DENY}")], &plaintext(80)), "a DENY with no rules matches nothing");
}

#[test]
fn scope_root_namespace_selector_and_target_refs() {
    let deny_all = "{action: DENY, rules: [{}]}";
    assert!(!allowed(&[policy(ROOT, "p", deny_all)], &plaintext(80)), "root namespace: mesh-wide");
    assert!(allowed(&[policy("other", "p", deny_all)], &plaintext(80)), "another namespace never applies");
    let sel = |app: &str| format!("{{selector: {{matchLabels: {{app: {app}}}}}, action: DENY, rules: [{{}}]}}");
    assert!(!allowed(&[policy("shop", "p", &sel("db"))], &plaintext(80)));
    assert!(allowed(&[policy("shop", "p", &sel("web"))], &plaintext(80)));
    let waypoint = "{targetRefs: [{kind: Gateway, name: waypoint}], action: DENY, rules: [{}]}";
    let p = policy("shop", "p", waypoint);
    assert_eq!(p.scope, Scope::NotApplicable);
    assert!(allowed(&[p], &plaintext(80)), "targetRefs bind to a waypoint, not to L4");
}

#[test]
fn dry_run_audit_and_custom_never_decide() {
    let dry = "metadata: {name: p, namespace: shop, annotations: {istio.io/dry-run: \"true\"}}\nspec: {action: DENY, rules: [{}]}";
    let p: AuthorizationPolicy = serde_yaml_ng::from_str(dry).unwrap();
    let ps = [p.compile(ROOT).unwrap()];
    let v = authorize(&ps, "shop", &labels("db"), &plaintext(80));
    assert_eq!(v.decision, Decision::Allow, "dry-run never enforces");
    assert_eq!(v.dry_run, vec![("shop/p".to_string(), Action::Deny)], "but is reported");
    let audit = [policy("shop", "p", "{action: AUDIT, rules: [{}]}")];
    let v = authorize(&audit, "shop", &labels("db"), &plaintext(80));
    assert_eq!((v.decision, v.audit), (Decision::Allow, vec!["shop/p".to_string()]));
    assert!(allowed(&[policy("shop", "p", "{action: CUSTOM, provider: {name: ext}, rules: [{}]}")], &plaintext(80)));
}

#[test]
fn invalid_documents_name_the_field() {
    let bad = [
        ("{rules: [{to: [{operation: {ports: [http]}}]}]}", "spec.rules[0].to.operation.ports"),
        ("{rules: [{from: [{source: {ipBlocks: [300.1.1.1]}}]}]}", "spec.rules[0].from.source.ipBlocks"),
        ("{rules: [{from: [{source: {notNamespaces: [\"a*b\"]}}]}]}", "spec.rules[0].from.source.notNamespaces"),
        ("{rules: [{when: [{key: source.nonsense, values: [a]}]}]}", "spec.rules[0].when[0].key"),
        ("{rules: [{when: [{key: destination.port, values: [x]}]}]}", "spec.rules[0].when[0].values"),
    ];
    for (spec, field) in bad {
        let doc = format!("metadata: {{name: p, namespace: shop}}\nspec: {spec}");
        let p: AuthorizationPolicy = serde_yaml_ng::from_str(&doc).unwrap();
        let e = p.compile(ROOT).unwrap_err();
        assert_eq!(e.field, field, "{spec}: {e}");
    }
    let unknown = serde_yaml_ng::from_str::<AuthorizationPolicy>(
        "metadata: {name: p, namespace: s}\nspec: {rules: [{form: []}]}",
    );
    assert!(unknown.unwrap_err().to_string().contains("form"), "typos are errors, named");
}

/// A tiny deterministic generator (no dependency): xorshift.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[(self.next() % xs.len() as u64) as usize]
    }
}

#[test]
fn arbitrary_documents_never_panic_and_rejections_name_a_field() {
    let fields = [
        "principals",
        "notPrincipals",
        "namespaces",
        "notNamespaces",
        "serviceAccounts",
        "notServiceAccounts",
        "ipBlocks",
        "notIpBlocks",
        "requestPrincipals",
        "remoteIpBlocks",
        "bogus",
    ];
    let ops = ["ports", "notPorts", "methods", "paths", "hosts", "bogus"];
    let values = [
        "\"*\"",
        "a*",
        "*a",
        "a*b",
        "\"\"",
        "198.18.0.0/15",
        "::1/129",
        "80",
        "0",
        "65536",
        "x",
        "cluster.local/ns/shop/sa/web",
    ];
    let keys =
        ["source.ip", "source.principal", "destination.port", "request.auth.claims[iss]", "nope", "destination.ip"];
    let actions = ["ALLOW", "DENY", "AUDIT", "CUSTOM", "MAYBE"];
    let mut rng = Rng(0x5e1f_edee_d00d_f00d);
    let (mut ok, mut rejected) = (0, 0);
    for _ in 0..6000 {
        let v = |rng: &mut Rng| format!("[{}, {}]", rng.pick(&values), rng.pick(&values));
        let spec = format!(
            "{{action: {}, rules: [{{from: [{{source: {{{}: {}}}}}], to: [{{operation: {{{}: {}}}}}], when: [{{key: {}, values: {}}}]}}]}}",
            rng.pick(&actions),
            rng.pick(&fields),
            v(&mut rng),
            rng.pick(&ops),
            v(&mut rng),
            rng.pick(&keys),
            v(&mut rng),
        );
        let doc = format!("metadata: {{name: p, namespace: shop}}\nspec: {spec}");
        match serde_yaml_ng::from_str::<AuthorizationPolicy>(&doc) {
            Err(e) => {
                assert!(!e.to_string().is_empty());
                rejected += 1;
            }
            Ok(p) => match p.compile(ROOT) {
                Ok(c) => {
                    let _ = authorize(&[c], "shop", &labels("db"), &mtls(WEB, 80));
                    let _ = authorize(&[p.compile(ROOT).unwrap()], "shop", &labels("db"), &plaintext(80));
                    ok += 1;
                }
                Err(e) => {
                    assert!(e.field.starts_with("spec.") || e.field == "metadata", "{e}");
                    rejected += 1;
                }
            },
        }
    }
    assert!(ok > 40 && rejected > 100, "both paths exercised: {ok} ok, {rejected} rejected");
}
