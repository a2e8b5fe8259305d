//! Who may obtain which certificate (pure). The rule istiod applies to ztunnel: a caller
//! always gets its own identity; a node agent may get another identity only for a service
//! account that has a pod (not finished) on the agent's own node — the node its token is bound to.

use std::collections::BTreeSet;

use crate::identity::SpiffeId;

/// The caller, as its token was reviewed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub namespace: String,
    pub service_account: String,
    /// The node of the pod the token is bound to (a projected, pod-bound token), if any.
    pub node: Option<String>,
}

/// A namespace and service account.
pub type Account = (String, String);

/// What the CA knows when it decides.
#[derive(Debug)]
pub struct Rules<'a> {
    pub trust_domain: &'a str,
    /// The service accounts of node agents, which may ask on behalf of their node's pods.
    pub node_agents: &'a BTreeSet<Account>,
}

/// Is `caller` the node agent it needs to be to ask for someone else's identity?
fn is_node_agent(rules: &Rules<'_>, caller: &Caller) -> bool {
    rules.node_agents.contains(&(caller.namespace.clone(), caller.service_account.clone()))
}

/// Is `requested` the caller's own identity (in any trust domain: `authorize` checks that)?
fn is_own(caller: &Caller, requested: &SpiffeId) -> bool {
    requested.namespace == caller.namespace && requested.service_account == caller.service_account
}

/// The node whose pods `authorize` must know about: the caller's, when it is a node agent
/// asking for someone else's identity; None when the answer does not depend on them.
pub fn node_to_ask<'a>(rules: &Rules<'_>, caller: &'a Caller, requested: &SpiffeId) -> Option<&'a str> {
    if is_own(caller, requested) || !is_node_agent(rules, caller) {
        return None;
    }
    caller.node.as_deref()
}

/// May `caller` obtain `requested`? `on_node`: the service accounts with a pod (not finished) on
/// the caller's node (asked only when it impersonates, see [`node_to_ask`]). Err: the
/// reason, for the log and the gRPC answer.
pub fn authorize(
    rules: &Rules<'_>,
    caller: &Caller,
    requested: &SpiffeId,
    on_node: Option<&BTreeSet<Account>>,
) -> Result<(), String> {
    if requested.trust_domain != rules.trust_domain {
        return Err(format!("{requested} is not in this CA's trust domain {}", rules.trust_domain));
    }
    if is_own(caller, requested) {
        return Ok(());
    }
    let who = format!("{}/{}", caller.namespace, caller.service_account);
    if !is_node_agent(rules, caller) {
        return Err(format!("{who} may obtain only its own identity, not {requested}"));
    }
    let Some(node) = &caller.node else {
        return Err(format!("node agent {who}: its token is not bound to a pod on a node"));
    };
    let account = (requested.namespace.clone(), requested.service_account.clone());
    if on_node.is_some_and(|accounts| accounts.contains(&account)) {
        Ok(())
    } else {
        Err(format!("node agent {who} on {node}: no pod of {requested} on that node (finished pods do not count)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", ns, sa).unwrap()
    }

    fn caller(ns: &str, sa: &str, node: Option<&str>) -> Caller {
        Caller { namespace: ns.into(), service_account: sa.into(), node: node.map(Into::into) }
    }

    fn accounts(list: &[(&str, &str)]) -> BTreeSet<Account> {
        list.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect()
    }

    #[test]
    fn a_node_agent_gets_only_identities_with_a_pod_on_its_node() {
        let agents = accounts(&[("selvedge", "selvedge")]);
        let rules = Rules { trust_domain: "cluster.local", node_agents: &agents };
        let agent = caller("selvedge", "selvedge", Some("n1"));
        let on_n1 = accounts(&[("shop", "web")]);
        assert_eq!(authorize(&rules, &agent, &id("shop", "web"), Some(&on_n1)), Ok(()));
        let other_node = authorize(&rules, &agent, &id("shop", "db"), Some(&on_n1)).unwrap_err();
        assert!(other_node.contains("no pod of spiffe://cluster.local/ns/shop/sa/db"), "{other_node}");
        assert!(authorize(&rules, &agent, &id("shop", "ghost"), Some(&on_n1)).is_err(), "no pod at all");
        assert_eq!(node_to_ask(&rules, &agent, &id("shop", "web")), Some("n1"));
        assert_eq!(node_to_ask(&rules, &agent, &id("selvedge", "selvedge")), None, "its own identity");
        let unbound = authorize(&rules, &caller("selvedge", "selvedge", None), &id("shop", "web"), Some(&on_n1));
        assert!(unbound.unwrap_err().contains("not bound to a pod"));
        let foreign = SpiffeId::new("other.td", "shop", "web").unwrap();
        assert!(authorize(&rules, &agent, &foreign, Some(&on_n1)).unwrap_err().contains("trust domain"));
    }

    #[test]
    fn a_workload_gets_its_own_identity_and_nothing_else() {
        let agents = accounts(&[("selvedge", "selvedge")]);
        let rules = Rules { trust_domain: "cluster.local", node_agents: &agents };
        let web = caller("shop", "web", Some("n1"));
        assert_eq!(authorize(&rules, &web, &id("shop", "web"), None), Ok(()));
        let e = authorize(&rules, &web, &id("shop", "db"), Some(&accounts(&[("shop", "db")]))).unwrap_err();
        assert!(e.contains("only its own identity"), "{e}");
    }
}
