//! Label and field selectors, parsed as the API server parses `labelSelector` and
//! `fieldSelector`.
//!
//! Labels: comma-separated requirements, each `key=value`, `key==value`, `key!=value`,
//! `key in (a,b)`, `key notin (a,b)`, `key` (exists) or `!key` (does not exist); all must hold.
//! `!=` and `notin` also match objects without the label, as on a real server.
//!
//! Fields: comma-separated `path=value`, `path==value` or `path!=value`, where `path` is any
//! dotted path into the object's JSON (`metadata.name`, `status.phase`, `spec.nodeName`...)
//! compared as text; a missing field is the empty string. (A real server only accepts a few
//! paths per kind; every path it accepts works here.)

use serde_json::Value;

/// A parsed `labelSelector`.
#[derive(Debug, Default, Clone)]
pub(crate) struct LabelSelector {
    requirements: Vec<Requirement>,
}

#[derive(Debug, Clone)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl LabelSelector {
    /// Parses a selector; the empty string selects everything.
    pub(crate) fn parse(selector: &str) -> Result<LabelSelector, String> {
        let mut requirements = Vec::new();
        for term in split_outside_parentheses(selector) {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            requirements.push(parse_requirement(term)?);
        }
        Ok(LabelSelector { requirements })
    }

    /// True when the object's `metadata.labels` meet every requirement.
    pub(crate) fn matches(&self, object: &Value) -> bool {
        let labels = object
            .pointer("/metadata/labels")
            .and_then(Value::as_object);
        let label = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
        self.requirements
            .iter()
            .all(|requirement| match requirement {
                Requirement::Equals(k, v) => label(k) == Some(v.as_str()),
                Requirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
                Requirement::In(k, values) => {
                    label(k).is_some_and(|l| values.iter().any(|v| v == l))
                }
                Requirement::NotIn(k, values) => {
                    label(k).is_none_or(|l| values.iter().all(|v| v != l))
                }
                Requirement::Exists(k) => label(k).is_some(),
                Requirement::DoesNotExist(k) => label(k).is_none(),
            })
    }
}

fn parse_requirement(term: &str) -> Result<Requirement, String> {
    let invalid = || format!("unable to parse requirement: {term:?}");
    if let Some(key) = term.strip_prefix('!') {
        return Ok(Requirement::DoesNotExist(valid_key(key.trim())?));
    }
    let words: Vec<&str> = term.splitn(3, char::is_whitespace).collect();
    if words.len() >= 2 && (words[1] == "in" || words[1] == "notin") {
        let list = words
            .get(2)
            .map(|w| w.trim())
            .and_then(|w| w.strip_prefix('('))
            .and_then(|w| w.strip_suffix(')'))
            .ok_or_else(invalid)?;
        let values: Vec<String> = list
            .split(',')
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect();
        if values.is_empty() {
            return Err(format!(
                "{term:?}: for 'in', 'notin' operators, values set can't be empty"
            ));
        }
        let key = valid_key(words[0])?;
        return Ok(if words[1] == "in" {
            Requirement::In(key, values)
        } else {
            Requirement::NotIn(key, values)
        });
    }
    if let Some((key, value)) = term.split_once("!=") {
        return Ok(Requirement::NotEquals(
            valid_key(key.trim())?,
            value.trim().to_string(),
        ));
    }
    if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
        return Ok(Requirement::Equals(
            valid_key(key.trim())?,
            value.trim().to_string(),
        ));
    }
    Ok(Requirement::Exists(valid_key(term)?))
}

fn valid_key(key: &str) -> Result<String, String> {
    let ok = !key.is_empty()
        && key.len() <= 317
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if ok {
        Ok(key.to_string())
    } else {
        Err(format!("invalid label key {key:?}"))
    }
}

fn split_outside_parentheses(selector: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&selector[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&selector[start..]);
    parts
}

/// A parsed `fieldSelector`.
#[derive(Debug, Default, Clone)]
pub(crate) struct FieldSelector {
    terms: Vec<(Vec<String>, bool, String)>,
}

impl FieldSelector {
    /// Parses a selector; the empty string selects everything.
    pub(crate) fn parse(selector: &str) -> Result<FieldSelector, String> {
        let mut terms = Vec::new();
        for term in selector.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (path, equal, value) = if let Some((p, v)) = term.split_once("!=") {
                (p, false, v)
            } else if let Some((p, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (p, true, v)
            } else {
                return Err(format!(
                    "invalid selector: {term:?}; can't understand {term:?}"
                ));
            };
            let path: Vec<String> = path.trim().split('.').map(str::to_string).collect();
            if path.iter().any(String::is_empty) {
                return Err(format!("invalid field path in {term:?}"));
            }
            terms.push((path, equal, value.trim().to_string()));
        }
        Ok(FieldSelector { terms })
    }

    /// True when every term holds for the object.
    pub(crate) fn matches(&self, object: &Value) -> bool {
        self.terms.iter().all(|(path, equal, value)| {
            let found = path
                .iter()
                .try_fold(object, |v, step| v.get(step))
                .map(|v| match v {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    other => other.to_string(),
                })
                .unwrap_or_default();
            (found == *value) == *equal
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(labels: Value, phase: &str) -> Value {
        json!({"metadata": {"name": "p", "labels": labels}, "status": {"phase": phase}})
    }

    #[test]
    fn label_selectors_follow_the_api_servers_rules() {
        let object = pod(json!({"app": "shoal", "tier": "worker"}), "Running");
        let matches = |s: &str| LabelSelector::parse(s).expect(s).matches(&object);
        assert!(matches(""));
        assert!(matches("app=shoal"));
        assert!(matches("app==shoal,tier=worker"));
        assert!(!matches("app=shoal,tier=driver"));
        assert!(matches("app!=other"));
        assert!(matches("missing!=x"));
        assert!(matches("tier in (driver, worker)"));
        assert!(!matches("tier notin (driver,worker)"));
        assert!(matches("missing notin (a)"));
        assert!(matches("app,!missing"));
        assert!(!matches("missing"));
        assert!(!matches("!app"));
        assert!(LabelSelector::parse("tier in ()").is_err());
        assert!(LabelSelector::parse("tier in x").is_err());
        assert!(LabelSelector::parse("a b=c").is_err());
    }

    #[test]
    fn field_selectors_compare_paths_as_text() {
        let object = pod(json!({}), "Succeeded");
        let matches = |s: &str| FieldSelector::parse(s).expect(s).matches(&object);
        assert!(matches("metadata.name=p"));
        assert!(matches("metadata.name==p,status.phase=Succeeded"));
        assert!(!matches("status.phase!=Succeeded"));
        assert!(matches("spec.nodeName="));
        assert!(FieldSelector::parse("metadata.name").is_err());
        assert!(FieldSelector::parse("metadata..name=x").is_err());
    }
}
