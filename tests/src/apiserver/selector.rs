//! Which objects a list or watch selects: namespace, field selector and label selector, with
//! the real API server's grammar and semantics (a `!=` or `notin` also matches an object that
//! lacks the field or label).

use serde_json::Value;

use super::resources::ResourceType;

/// A parsed selection. Built once per request, then applied to every candidate object.
#[derive(Debug, Clone, Default)]
pub(crate) struct Selection {
    /// From a namespaced URL path; `None` selects every namespace.
    namespace: Option<String>,
    fields: Vec<FieldReq>,
    labels: Vec<LabelReq>,
}

#[derive(Debug, Clone)]
struct FieldReq {
    /// Dotted JSON path, e.g. `spec.nodeName`.
    path: String,
    equal: bool,
    value: String,
}

#[derive(Debug, Clone)]
enum LabelReq {
    Equal(String, String),
    NotEqual(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

impl Selection {
    /// Parses the request's selectors for `resource`; the error is the message of a 400.
    pub fn parse(
        resource: &ResourceType,
        namespace: Option<String>,
        field_selector: Option<&str>,
        label_selector: Option<&str>,
    ) -> Result<Self, String> {
        let fields = match field_selector {
            Some(s) => parse_fields(s, resource)?,
            None => Vec::new(),
        };
        let labels = match label_selector {
            Some(s) => parse_labels(s)?,
            None => Vec::new(),
        };
        Ok(Self { namespace, fields, labels })
    }

    /// Narrows the selection to one object name (a watch on an object's own URL).
    pub fn with_name(mut self, name: &str) -> Self {
        self.fields.push(FieldReq { path: "metadata.name".into(), equal: true, value: name.into() });
        self
    }

    pub fn matches(&self, object: &Value) -> bool {
        let namespace_ok =
            self.namespace.as_deref().is_none_or(|ns| object["metadata"]["namespace"].as_str() == Some(ns));
        namespace_ok
            && self.fields.iter().all(|f| (field_value(object, &f.path) == f.value) == f.equal)
            && self.labels.iter().all(|l| l.matches(&object["metadata"]["labels"]))
    }
}

/// A field's value as the API server's field sets render it: a missing field is `""`.
fn field_value<'a>(object: &'a Value, path: &str) -> &'a str {
    path.split('.').try_fold(object, |v, key| v.get(key)).and_then(Value::as_str).unwrap_or("")
}

fn parse_fields(selector: &str, resource: &ResourceType) -> Result<Vec<FieldReq>, String> {
    let mut out = Vec::new();
    for term in selector.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let (path, equal, value) = if let Some((k, v)) = term.split_once("!=") {
            (k, false, v)
        } else if let Some((k, v)) = term.split_once("==") {
            (k, true, v)
        } else if let Some((k, v)) = term.split_once('=') {
            (k, true, v)
        } else {
            return Err(format!("invalid field selector {selector:?}: {term:?} has no operator"));
        };
        let path = path.trim();
        let known = ["metadata.name", "metadata.namespace"].contains(&path) || resource.fields.contains(&path);
        if !known {
            return Err(format!("field label not supported: {path}"));
        }
        out.push(FieldReq { path: path.to_owned(), equal, value: value.trim().to_owned() });
    }
    Ok(out)
}

impl LabelReq {
    fn matches(&self, labels: &Value) -> bool {
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        match self {
            Self::Equal(k, v) => get(k) == Some(v),
            Self::NotEqual(k, v) => get(k) != Some(v),
            Self::Exists(k) => get(k).is_some(),
            Self::NotExists(k) => get(k).is_none(),
            Self::In(k, vs) => get(k).is_some_and(|have| vs.iter().any(|v| v == have)),
            Self::NotIn(k, vs) => get(k).is_none_or(|have| vs.iter().all(|v| v != have)),
        }
    }
}

fn parse_labels(selector: &str) -> Result<Vec<LabelReq>, String> {
    if selector.trim().is_empty() {
        return Ok(Vec::new());
    }
    split_top_level(selector)
        .into_iter()
        .map(|term| parse_label_term(term.trim()).map_err(|why| format!("invalid label selector {selector:?}: {why}")))
        .collect()
}

/// Splits on commas that are not inside a `( … )` value set.
fn split_top_level(selector: &str) -> Vec<&str> {
    let (mut terms, mut depth, mut start) = (Vec::new(), 0_i32, 0);
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&selector[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&selector[start..]);
    terms
}

fn parse_label_term(term: &str) -> Result<LabelReq, String> {
    if let Some(key) = term.strip_prefix('!') {
        return Ok(LabelReq::NotExists(label_key(key.trim())?));
    }
    let end = term.find(|c: char| !is_key_char(c)).unwrap_or(term.len());
    let (key, rest) = term.split_at(end);
    let key = label_key(key)?;
    let rest = rest.trim_start();
    Ok(if rest.is_empty() {
        LabelReq::Exists(key)
    } else if let Some(v) = rest.strip_prefix("!=") {
        LabelReq::NotEqual(key, label_value(v.trim())?)
    } else if let Some(v) = rest.strip_prefix("==").or_else(|| rest.strip_prefix('=')) {
        LabelReq::Equal(key, label_value(v.trim())?)
    } else if let Some(set) = rest.strip_prefix("notin") {
        LabelReq::NotIn(key, value_set(set)?)
    } else if let Some(set) = rest.strip_prefix("in") {
        LabelReq::In(key, value_set(set)?)
    } else {
        return Err(format!("unsupported requirement {term:?}"));
    })
}

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')
}

fn label_key(key: &str) -> Result<String, String> {
    if key.is_empty() || !key.chars().all(is_key_char) {
        return Err(format!("invalid label key {key:?}"));
    }
    Ok(key.to_owned())
}

fn label_value(value: &str) -> Result<String, String> {
    let ok = value.len() <= 63 && value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        return Err(format!("invalid label value {value:?}"));
    }
    Ok(value.to_owned())
}

/// `(a, b)` → `["a", "b"]`; the real server requires at least one value.
fn value_set(set: &str) -> Result<Vec<String>, String> {
    let inner = set
        .trim()
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| format!("expected a ( … ) value set, got {set:?}"))?;
    let values = inner.split(',').map(|v| label_value(v.trim())).collect::<Result<Vec<_>, _>>()?;
    if values.iter().all(String::is_empty) {
        return Err("a value set needs at least one value".into());
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::resources::{by_kind, RESOURCES};
    use super::*;

    fn pod(labels: Value, node: Option<&str>) -> Value {
        let mut pod = json!({"metadata": {"name": "p", "namespace": "ns", "labels": labels}});
        if let Some(node) = node {
            pod["spec"] = json!({"nodeName": node});
        }
        pod
    }

    fn select(fields: Option<&str>, labels: Option<&str>) -> Result<Selection, String> {
        let pods = &RESOURCES[by_kind("v1", "Pod").expect("pods are served")];
        Selection::parse(pods, None, fields, labels)
    }

    #[test]
    fn labels() {
        let web = pod(json!({"app": "web", "tier": "a"}), None);
        let bare = pod(json!({}), None);
        let cases = [
            ("app=web", true, false),
            ("app==web", true, false),
            ("app!=web", false, true),
            ("app", true, false),
            ("!app", false, true),
            ("app in (web, db)", true, false),
            ("app notin (web,db)", false, true),
            ("app in (db),tier", false, false),
            ("app=web, tier in (a,b)", true, false),
            ("", true, true),
        ];
        for (selector, on_web, on_bare) in cases {
            let s = select(None, Some(selector)).expect(selector);
            assert_eq!(s.matches(&web), on_web, "{selector} on web");
            assert_eq!(s.matches(&bare), on_bare, "{selector} on bare");
        }
        for bad in ["app>1", "app in web", "a b", "app in ()", "=x", "app=a b"] {
            assert!(select(None, Some(bad)).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn fields() {
        let on_n1 = pod(json!({}), Some("n1"));
        let unscheduled = pod(json!({}), None);
        let s = select(Some("spec.nodeName=n1"), None).expect("valid");
        assert!(s.matches(&on_n1) && !s.matches(&unscheduled));
        let s = select(Some("spec.nodeName!=n1,metadata.namespace==ns"), None).expect("valid");
        assert!(!s.matches(&on_n1) && s.matches(&unscheduled));
        let s = select(Some("spec.nodeName="), None).expect("valid");
        assert!(s.matches(&unscheduled));
        assert!(select(Some("spec.bogus=1"), None).is_err());
        assert!(select(Some("metadata.name"), None).is_err());
    }
}
