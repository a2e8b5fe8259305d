//! The resource types the test API server serves, and the discovery documents describing them.

use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

/// One served resource: where it lives in the URL space and what its objects look like.
#[derive(Debug)]
pub(crate) struct ResourceType {
    /// API group; empty for the core group (served under `/api`).
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    /// The URL segment (`pods`), as in the real API.
    pub plural: &'static str,
    /// For discovery documents only.
    pub singular: &'static str,
    /// Namespaced resources live under `namespaces/{ns}/`; cluster-scoped ones never do.
    pub namespaced: bool,
    /// Field-selector keys accepted beyond `metadata.name` / `metadata.namespace`, the same
    /// per-type set the real API server registers; any other key is refused with 400.
    pub fields: &'static [&'static str],
    /// Checks an applied object against its k8s-openapi type so a test's malformed object
    /// fails at `apply`, not later as a confusing decode error inside the agent. `None` for
    /// custom resources, which have no k8s-openapi type.
    pub check: Option<Check>,
}

/// Whether a JSON object parses as one k8s-openapi type.
pub(crate) type Check = fn(&Value) -> Result<(), serde_json::Error>;

impl ResourceType {
    /// `v1` or `group/version`, as in an object's `apiVersion`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

fn parses<K: DeserializeOwned>(value: &Value) -> Result<(), serde_json::Error> {
    K::deserialize(value).map(drop)
}

const ISTIO_SECURITY: &str = "security.istio.io";

/// Everything the server serves. Indices into this table identify a resource type elsewhere.
pub(crate) const RESOURCES: &[ResourceType] = &[
    ResourceType {
        group: "",
        version: "v1",
        kind: "Pod",
        plural: "pods",
        singular: "pod",
        namespaced: true,
        fields: &[
            "spec.nodeName",
            "spec.serviceAccountName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "status.phase",
            "status.podIP",
        ],
        check: Some(parses::<Pod>),
    },
    ResourceType {
        group: "",
        version: "v1",
        kind: "Namespace",
        plural: "namespaces",
        singular: "namespace",
        namespaced: false,
        fields: &["status.phase"],
        check: Some(parses::<Namespace>),
    },
    ResourceType {
        group: "",
        version: "v1",
        kind: "Service",
        plural: "services",
        singular: "service",
        namespaced: true,
        fields: &["spec.clusterIP", "spec.type"],
        check: Some(parses::<Service>),
    },
    ResourceType {
        group: "",
        version: "v1",
        kind: "ServiceAccount",
        plural: "serviceaccounts",
        singular: "serviceaccount",
        namespaced: true,
        fields: &[],
        check: Some(parses::<ServiceAccount>),
    },
    ResourceType {
        group: "discovery.k8s.io",
        version: "v1",
        kind: "EndpointSlice",
        plural: "endpointslices",
        singular: "endpointslice",
        namespaced: true,
        fields: &[],
        check: Some(parses::<EndpointSlice>),
    },
    ResourceType {
        group: ISTIO_SECURITY,
        version: "v1",
        kind: "AuthorizationPolicy",
        plural: "authorizationpolicies",
        singular: "authorizationpolicy",
        namespaced: true,
        fields: &[],
        check: None,
    },
    ResourceType {
        group: ISTIO_SECURITY,
        version: "v1",
        kind: "PeerAuthentication",
        plural: "peerauthentications",
        singular: "peerauthentication",
        namespaced: true,
        fields: &[],
        check: None,
    },
];

/// The type of objects with this `apiVersion` and `kind`.
pub(crate) fn by_kind(api_version: &str, kind: &str) -> Option<usize> {
    RESOURCES.iter().position(|r| r.kind == kind && r.api_version() == api_version)
}

/// The type served at `/{api|apis/group}/{version}/{plural}`.
pub(crate) fn by_plural(group: &str, version: &str, plural: &str) -> Option<usize> {
    RESOURCES.iter().position(|r| r.group == group && r.version == version && r.plural == plural)
}

/// `GET /api`: the core group's versions.
pub(crate) fn core_versions(server: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server}],
    })
}

/// `GET /apis`: every named group with its one version.
pub(crate) fn group_list() -> Value {
    let mut groups: Vec<Value> = Vec::new();
    for r in RESOURCES.iter().filter(|r| !r.group.is_empty()) {
        if groups.iter().any(|g| g["name"] == r.group) {
            continue;
        }
        let version = json!({"groupVersion": r.api_version(), "version": r.version});
        groups.push(json!({"name": r.group, "versions": [version.clone()], "preferredVersion": version}));
    }
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `GET /api/v1` or `/apis/{group}/{version}`; `None` for a group/version not served.
pub(crate) fn resource_list(group: &str, version: &str) -> Option<Value> {
    let resources: Vec<Value> = RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .map(|r| {
            json!({
                "name": r.plural,
                "singularName": r.singular,
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": ["get", "list", "watch"],
            })
        })
        .collect();
    let group_version = if group.is_empty() { version.to_owned() } else { format!("{group}/{version}") };
    (!resources.is_empty()).then(|| {
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources})
    })
}
