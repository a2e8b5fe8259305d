//! The CA service's view of the cluster (`ca_service::Authority`): who presents a token
//! (TokenReview, audience-bound) and which service accounts have a pod (not finished) on a node
//! (the pod list, by field selector).

use std::collections::BTreeSet;

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Pod,
};
use kube::{
    api::{ListParams, PostParams},
    Api, Client,
};

use crate::ca_service::{
    authorize::{Account, Caller},
    Authority,
};

/// The extra field a pod-bound ServiceAccount token carries: the pod's node.
const NODE_NAME: &str = "authentication.kubernetes.io/node-name";
/// And the pod's name (older clusters carry it without the node).
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";

/// The Kubernetes API as the CA's authority.
#[derive(Clone)]
pub struct KubeAuthority {
    client: Client,
    /// Audiences a token must be bound to (e.g. `istio-ca`); empty: the API server's default.
    audiences: Vec<String>,
}

impl std::fmt::Debug for KubeAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeAuthority").field("audiences", &self.audiences).finish_non_exhaustive()
    }
}

impl KubeAuthority {
    pub fn new(client: Client, audiences: Vec<String>) -> Self {
        Self { client, audiences }
    }
}

/// `system:serviceaccount:<namespace>:<name>` → (namespace, name).
fn service_account_of(username: &str) -> Option<(String, String)> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (ns, name) = rest.split_once(':')?;
    (!ns.is_empty() && !name.is_empty()).then(|| (ns.to_owned(), name.to_owned()))
}

impl Authority for KubeAuthority {
    async fn authenticate(&self, token: &str) -> Result<Caller, String> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: (!self.audiences.is_empty()).then(|| self.audiences.clone()),
            },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| format!("TokenReview: {e}"))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(format!(
                "token not authenticated: {}",
                status.error.unwrap_or_else(|| "no reason given".into())
            ));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let (namespace, service_account) =
            service_account_of(&username).ok_or_else(|| format!("{username:?} is not a ServiceAccount"))?;
        let extra = user.extra.unwrap_or_default();
        let first = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
        let node = match (first(NODE_NAME), first(POD_NAME)) {
            (Some(node), _) => Some(node),
            (None, Some(pod)) => Api::<Pod>::namespaced(self.client.clone(), &namespace)
                .get(&pod)
                .await
                .ok()
                .and_then(|p| p.spec.and_then(|s| s.node_name)),
            (None, None) => None,
        };
        Ok(Caller { namespace, service_account, node })
    }

    async fn accounts_on(&self, node: &str) -> Result<BTreeSet<Account>, String> {
        // Pending pods count: a pod's agent asks for its certificate while the pod starts
        // (its CNI ADD waits for the enrollment); finished ones do not.
        let params =
            ListParams::default().fields(&format!("spec.nodeName={node},status.phase!=Succeeded,status.phase!=Failed"));
        let pods =
            Api::<Pod>::all(self.client.clone()).list(&params).await.map_err(|e| format!("pods on {node}: {e}"))?;
        Ok(pods
            .items
            .iter()
            .filter_map(|p| {
                let ns = p.metadata.namespace.clone()?;
                let sa =
                    p.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into());
                Some((ns, sa))
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::service_account_of;

    #[test]
    fn only_service_account_users_are_callers() {
        assert_eq!(
            service_account_of("system:serviceaccount:selvedge:agent"),
            Some(("selvedge".into(), "agent".into()))
        );
        assert_eq!(service_account_of("system:node:n1"), None);
        assert_eq!(service_account_of("system:serviceaccount::x"), None);
        assert_eq!(service_account_of("alice"), None);
    }
}
