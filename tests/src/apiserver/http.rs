//! Request handling: routing, query parameters, single-object GETs, lists and error statuses.
//! Watches are handed to [`super::watch`].

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use k8s_openapi::apimachinery::pkg::version::Info;
use serde_json::{json, Value};

use super::resources::{self, RESOURCES};
use super::selector::Selection;
use super::{watch, Shared};

/// Every response body: a whole JSON document, or a watch's stream of lines.
pub(super) type Body = UnsyncBoxBody<Bytes, Infallible>;

/// The query parameters the server understands; others (`limit`, `continue`, `pretty`…) are
/// ignored, which the API allows: a server may return a whole list with no continue token.
#[derive(Debug, Default)]
pub(super) struct Params {
    pub watch: bool,
    pub resource_version: Option<String>,
    pub version_match: Option<String>,
    pub field_selector: Option<String>,
    pub label_selector: Option<String>,
    pub bookmarks: bool,
    pub timeout: Option<Duration>,
    pub send_initial_events: Option<bool>,
}

impl Params {
    fn parse(query: &str) -> Result<Self, String> {
        let mut p = Self::default();
        for pair in query.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = decode(v)?;
            match decode(k)?.as_str() {
                "watch" => p.watch = flag(k, &v)?,
                "resourceVersion" => p.resource_version = Some(v),
                "resourceVersionMatch" => p.version_match = Some(v),
                "fieldSelector" => p.field_selector = Some(v),
                "labelSelector" => p.label_selector = Some(v),
                "allowWatchBookmarks" => p.bookmarks = flag(k, &v)?,
                "sendInitialEvents" => p.send_initial_events = Some(flag(k, &v)?),
                "timeoutSeconds" => {
                    let secs: u64 = v.parse().map_err(|_| format!("invalid timeoutSeconds {v:?}"))?;
                    // 0 means "the server's default", which for this server is no limit.
                    p.timeout = (secs > 0).then(|| Duration::from_secs(secs));
                }
                _ => {}
            }
        }
        Ok(p)
    }
}

fn flag(name: &str, value: &str) -> Result<bool, String> {
    match value {
        "true" | "1" => Ok(true),
        "false" | "0" | "" => Ok(false),
        _ => Err(format!("invalid boolean {value:?} for {name}")),
    }
}

/// Decodes one `application/x-www-form-urlencoded` query component.
fn decode(s: &str) -> Result<String, String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        out.push(match b {
            b'+' => b' ',
            b'%' => {
                let hex = [bytes.next(), bytes.next()];
                let hex = hex.map(|h| h.and_then(|h| (h as char).to_digit(16)));
                match hex {
                    [Some(hi), Some(lo)] => u8::try_from(hi * 16 + lo).unwrap_or(b'?'),
                    _ => return Err(format!("bad percent-encoding in {s:?}")),
                }
            }
            b => b,
        });
    }
    String::from_utf8(out).map_err(|_| format!("query component {s:?} is not UTF-8"))
}

enum Route {
    Version,
    CoreVersions,
    Groups,
    ResourceList(Value),
    Collection { resource: usize, namespace: Option<String> },
    Object { resource: usize, namespace: Option<String>, name: String },
}

/// Maps a URL path onto the API's layout; `None` is a 404.
fn route(path: &str) -> Option<Route> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segments.as_slice() {
        ["version"] => return Some(Route::Version),
        ["api"] => return Some(Route::CoreVersions),
        ["apis"] => return Some(Route::Groups),
        ["api", v] => return resources::resource_list("", v).map(Route::ResourceList),
        ["apis", g, v] => return resources::resource_list(g, v).map(Route::ResourceList),
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let find = |plural: &str| resources::by_plural(group, version, plural);
    if rest.iter().any(|s| s.is_empty()) {
        return None;
    }
    Some(match rest {
        // Two segments under `namespaces` is the Namespace object itself (below).
        ["namespaces", ns, plural, tail @ ..] if tail.len() <= 1 => {
            let resource = find(plural).filter(|&r| RESOURCES[r].namespaced)?;
            let namespace = Some((*ns).to_owned());
            match tail.first() {
                None => Route::Collection { resource, namespace },
                Some(name) => Route::Object { resource, namespace, name: (*name).to_owned() },
            }
        }
        [plural] => Route::Collection { resource: find(plural)?, namespace: None },
        [plural, name] => {
            let resource = find(plural).filter(|&r| !RESOURCES[r].namespaced)?;
            Route::Object { resource, namespace: None, name: (*name).to_owned() }
        }
        _ => return None,
    })
}

/// hyper's service function: logs the request for [`super::ApiServer::requests`], answers it.
pub(super) async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let target = req.uri().path_and_query().map_or_else(|| req.uri().path(), |pq| pq.as_str());
    shared.requests.lock().await.push(format!("{} {target}", req.method()));
    if req.method() == Method::POST && req.uri().path() == TOKEN_REVIEWS {
        return Ok(token_review(&shared, req).await);
    }
    Ok(respond(&shared, &req).await)
}

const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// `POST tokenreviews`: authenticated when the token was added (`ApiServer::add_token`)
/// and bound to one of the audiences asked for (any, when none is asked).
async fn token_review(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()),
    };
    let review: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()),
    };
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let asked: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect();
    let known = shared.tokens.lock().await.get(token).cloned();
    let status_field = match known {
        Some((user, bound)) if asked.is_empty() || asked.iter().any(|a| bound.contains(a)) => {
            json!({"authenticated": true, "user": user, "audiences": bound})
        }
        Some(_) => json!({"authenticated": false, "error": "token audiences do not match"}),
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    let answer = json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "metadata": {"creationTimestamp": null},
        "spec": review["spec"],
        "status": status_field,
    });
    json(StatusCode::CREATED, &answer)
}

async fn respond(shared: &Arc<Shared>, req: &Request<Incoming>) -> Response<Body> {
    let path = req.uri().path();
    if req.method() != Method::GET {
        let message = format!("the test API server only serves GET, not {} {path}", req.method());
        return status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", message);
    }
    let params = match Params::parse(req.uri().query().unwrap_or("")) {
        Ok(p) => p,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e),
    };
    match route(path) {
        None => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        ),
        Some(Route::Version) => json(StatusCode::OK, &version()),
        Some(Route::CoreVersions) => json(StatusCode::OK, &resources::core_versions(&shared.addr.to_string())),
        Some(Route::Groups) => json(StatusCode::OK, &resources::group_list()),
        Some(Route::ResourceList(list)) => json(StatusCode::OK, &list),
        Some(Route::Collection { resource, namespace }) => collection(shared, resource, namespace, None, &params).await,
        Some(Route::Object { resource, namespace, name }) if params.watch => {
            collection(shared, resource, namespace, Some(&name), &params).await
        }
        Some(Route::Object { resource, namespace, name }) => {
            let store = shared.store.lock().await;
            match store.get(resource, namespace.as_deref().unwrap_or(""), &name) {
                Some(object) => json(StatusCode::OK, object),
                None => not_found(resource, &name),
            }
        }
    }
}

async fn collection(
    shared: &Arc<Shared>,
    resource: usize,
    namespace: Option<String>,
    name: Option<&str>,
    params: &Params,
) -> Response<Body> {
    let rt = &RESOURCES[resource];
    let selection =
        match Selection::parse(rt, namespace, params.field_selector.as_deref(), params.label_selector.as_deref()) {
            Ok(s) => s,
            Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e),
        };
    let selection = match name {
        Some(name) => selection.with_name(name),
        None => selection,
    };
    if params.watch {
        return watch::respond(Arc::clone(shared), resource, selection, params).await;
    }

    let store = shared.store.lock().await;
    let requested = match params.resource_version.as_deref().filter(|v| !v.is_empty()).map(str::parse::<u64>) {
        None => None,
        Some(Ok(rv)) => Some(rv),
        Some(Err(_)) => return status(StatusCode::BAD_REQUEST, "BadRequest", "invalid resourceVersion".into()),
    };
    let too_large = |rv: u64| {
        let message = format!("Too large resource version: {rv}, current: {}", store.rv());
        status(StatusCode::GATEWAY_TIMEOUT, "Timeout", message)
    };
    let (rv, items) = match (params.version_match.as_deref(), requested) {
        (Some(_), None) => {
            let message = "resourceVersionMatch is forbidden unless resourceVersion is provided".into();
            return status(StatusCode::BAD_REQUEST, "BadRequest", message);
        }
        (Some("Exact"), Some(rv)) => match store.list_at(resource, rv) {
            Some(items) => (rv, items),
            None if rv > store.rv() => return too_large(rv),
            None => return expired("The resourceVersion for the provided list is too old.".into()),
        },
        (Some("NotOlderThan") | None, rv) => {
            if let Some(rv) = rv.filter(|&rv| rv > store.rv()) {
                return too_large(rv);
            }
            (store.rv(), store.list(resource).cloned().collect())
        }
        (Some(other), _) => {
            return status(StatusCode::BAD_REQUEST, "BadRequest", format!("invalid resourceVersionMatch {other:?}"));
        }
    };
    let items: Vec<Value> = items.into_iter().filter(|o| selection.matches(o)).collect();
    let list = json!({
        "apiVersion": rt.api_version(),
        "kind": format!("{}List", rt.kind),
        "metadata": {"resourceVersion": rv.to_string()},
        "items": items,
    });
    json(StatusCode::OK, &list)
}

fn version() -> Value {
    let info = Info {
        major: "1".into(),
        minor: "33".into(),
        git_version: "v1.33.0-selvedge-test".into(),
        git_commit: "0000000000000000000000000000000000000000".into(),
        git_tree_state: "clean".into(),
        build_date: "2025-04-23T00:00:00Z".into(),
        go_version: "go1.24.2".into(),
        compiler: "gc".into(),
        platform: "linux/amd64".into(),
        ..Info::default()
    };
    serde_json::to_value(info).expect("version info serializes")
}

pub(super) fn json(code: StatusCode, value: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(value).expect("a serde_json::Value serializes");
    let mut response = Response::new(Full::new(Bytes::from(bytes)).boxed_unsync());
    *response.status_mut() = code;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// A `metav1.Status` failure, the body of every error response and of a watch's ERROR event.
pub(super) fn status_object(code: StatusCode, reason: &str, message: String) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    })
}

pub(super) fn status(code: StatusCode, reason: &str, message: String) -> Response<Body> {
    json(code, &status_object(code, reason, message))
}

pub(super) fn expired(message: String) -> Response<Body> {
    status(StatusCode::GONE, "Expired", message)
}

fn not_found(resource: usize, name: &str) -> Response<Body> {
    let rt = &RESOURCES[resource];
    let mut body =
        status_object(StatusCode::NOT_FOUND, "NotFound", format!("{}.{} \"{name}\" not found", rt.plural, rt.group));
    if rt.group.is_empty() {
        body["message"] = format!("{} \"{name}\" not found", rt.plural).into();
    }
    body["details"] = json!({"name": name, "group": rt.group, "kind": rt.plural});
    json(StatusCode::NOT_FOUND, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (plural, namespace, name) of a resource route.
    fn target(path: &str) -> Option<(&'static str, Option<String>, Option<String>)> {
        match route(path)? {
            Route::Collection { resource, namespace } => Some((RESOURCES[resource].plural, namespace, None)),
            Route::Object { resource, namespace, name } => Some((RESOURCES[resource].plural, namespace, Some(name))),
            _ => None,
        }
    }

    #[test]
    fn routes() {
        let s = |v: &str| Some(v.to_owned());
        assert_eq!(target("/api/v1/pods"), Some(("pods", None, None)));
        assert_eq!(target("/api/v1/namespaces/a/pods/p"), Some(("pods", s("a"), s("p"))));
        assert_eq!(target("/api/v1/namespaces/a"), Some(("namespaces", None, s("a"))));
        assert_eq!(target("/api/v1/namespaces"), Some(("namespaces", None, None)));
        let policies = "/apis/security.istio.io/v1/namespaces/x/authorizationpolicies";
        assert_eq!(target(policies), Some(("authorizationpolicies", s("x"), None)));
        assert!(matches!(route("/apis/discovery.k8s.io/v1"), Some(Route::ResourceList(_))));
        assert!(matches!(route("/version"), Some(Route::Version)));
        let missing = [
            "/api/v1/pods/p",
            "/api/v1/namespaces/a/namespaces",
            "/api/v2/pods",
            "/apis/x/v1/pods",
            "/apis/x/v1",
            "/",
            "/api/v1/namespaces/a/pods/p/status",
            "/api/v1/namespaces//pods",
        ];
        for path in missing {
            assert!(route(path).is_none(), "{path}");
        }
    }

    #[test]
    fn params() {
        let p = Params::parse("watch=1&fieldSelector=spec.nodeName%3Dn1&labelSelector=a+in+(b%2Cc)&timeoutSeconds=5")
            .expect("valid");
        assert!(p.watch);
        assert_eq!(p.field_selector.as_deref(), Some("spec.nodeName=n1"));
        assert_eq!(p.label_selector.as_deref(), Some("a in (b,c)"));
        assert_eq!(p.timeout, Some(Duration::from_secs(5)));
        assert!(Params::parse("watch=maybe").is_err());
        assert!(Params::parse("labelSelector=%zz").is_err());
    }
}
