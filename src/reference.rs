//! The reference format left in a row once its secret is in Vault, and how
//! a plaintext value maps to KV data.
//!
//! - jsonb column: `{"$vault_redirect": "<path>"}` when the row's value was
//!   a JSON object and is the whole KV entry, or
//!   `{"$vault_redirect": "<path>", "key": "secret"}` when it was a scalar or
//!   an array, kept under that key as MAAS does.
//! - text column: `$vault_redirect:<path>`, the value under key `secret`.
//! - jsonb column declared with secret keys: the object without those keys,
//!   plus `"$vault_redirect": "<path>"`. The KV entry contains the secret
//!   keys only.
//!
//! `<path>` is relative to the configured secrets path. A value is a
//! reference only when it is exactly the reference its own row would get.
//! Any other value, one shaped like a reference to another path included
//! (a reference copied from another row, say), is plaintext: the views
//! return it as it is and migrate() moves it to Vault like any other.

use serde_json::{Map, Value};

pub const JSON_KEY: &str = "$vault_redirect";
pub const TEXT_PREFIX: &str = "$vault_redirect:";
/// The KV key that contains a value which is not a JSON object.
pub const SCALAR_KEY: &str = "secret";

/// Returns the reference a jsonb value is, if it has the reference shape.
pub fn parse_json(value: &Value) -> Option<(String, Option<String>)> {
    let object = value.as_object()?;
    let path = object.get(JSON_KEY)?.as_str()?.to_owned();
    match (object.len(), object.get("key")) {
        (1, None) => Some((path, None)),
        (2, Some(Value::String(key))) => Some((path, Some(key.clone()))),
        _ => None,
    }
}

pub fn json_reference(path: &str, key: Option<&str>) -> Value {
    let mut object = Map::new();
    object.insert(JSON_KEY.into(), Value::String(path.into()));
    if let Some(key) = key {
        object.insert("key".into(), Value::String(key.into()));
    }
    Value::Object(object)
}

pub fn text_reference(path: &str) -> String {
    format!("{TEXT_PREFIX}{path}")
}

/// Splits a plaintext jsonb value into KV data and the key that contains it.
pub fn json_to_kv(value: Value) -> (Map<String, Value>, Option<&'static str>) {
    match value {
        Value::Object(map) => (map, None),
        other => {
            let mut map = Map::new();
            map.insert(SCALAR_KEY.into(), other);
            (map, Some(SCALAR_KEY))
        }
    }
}

pub fn text_to_kv(value: &str) -> Map<String, Value> {
    let mut map = Map::new();
    map.insert(SCALAR_KEY.into(), Value::String(value.into()));
    map
}

/// Returns the jsonb value a reference stands for, given its KV data.
pub fn kv_to_json(mut data: Map<String, Value>, key: Option<&str>) -> Result<Value, String> {
    match key {
        None => Ok(Value::Object(data)),
        Some(key) => data.remove(key).ok_or_else(|| missing_key(key, &data)),
    }
}

/// Returns the text a text reference stands for, given its KV data. A JSON
/// null gives SQL NULL; a non-string value gives its JSON text.
pub fn kv_to_text(data: &Map<String, Value>, key: &str) -> Result<Option<String>, String> {
    match data.get(key) {
        None => Err(missing_key(key, data)),
        Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Ok(Some(other.to_string())),
    }
}

fn missing_key(key: &str, data: &Map<String, Value>) -> String {
    let keys: Vec<&str> = data.keys().map(String::as_str).collect();
    format!(
        "the entry has no key \"{key}\"; its keys are: {}",
        if keys.is_empty() {
            "(none)".to_owned()
        } else {
            keys.join(", ")
        }
    )
}

/// Escapes one value so that it is exactly one KV path segment: `%` and `/`
/// are percent-encoded, and an empty, `.` or `..` value gets a leading `%`,
/// which no escaped value can otherwise start with alone.
pub fn escape_segment(value: &str) -> String {
    let escaped = value.replace('%', "%25").replace('/', "%2F");
    match escaped.as_str() {
        "" | "." | ".." => format!("%{escaped}"),
        _ => escaped,
    }
}

/// Returns the KV path of one secret column of one row of a wide table:
/// the prefix, each primary key value, then the column name.
pub fn row_path(prefix: &str, key_values: &[String], column: &str) -> String {
    let mut path = prefix.to_owned();
    for value in key_values {
        path.push('/');
        path.push_str(&escape_segment(value));
    }
    path.push('/');
    path.push_str(&escape_segment(column));
    path
}

/// Reverses escape_segment().
pub fn unescape_segment(segment: &str) -> String {
    let segment = match segment {
        "%" | "%." | "%.." => &segment[1..],
        other => other,
    };
    let mut out = String::with_capacity(segment.len());
    let mut rest = segment;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let code = rest.get(at..at + 3);
        match code {
            Some("%25") => out.push('%'),
            Some("%2F") => out.push('/'),
            _ => {
                out.push('%');
                rest = &rest[at + 1..];
                continue;
            }
        }
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    out
}

/// Returns the primary key values of the wide-table row whose column gets
/// `path`, or `None` when `path` is not such a row's path.
pub fn row_keys(prefix: &str, key_count: usize, column: &str, path: &str) -> Option<Vec<String>> {
    let rest = path.strip_prefix(prefix)?.strip_prefix('/')?;
    let segments: Vec<&str> = rest.split('/').collect();
    let (last, keys) = segments.split_last()?;
    if keys.len() != key_count || *last != escape_segment(column) {
        return None;
    }
    Some(keys.iter().map(|k| unescape_segment(k)).collect())
}

/// Returns the path of the marker key of a jsonb object, if it has one.
pub fn marker(value: &Value) -> Option<&str> {
    value.as_object()?.get(JSON_KEY)?.as_str()
}

/// Splits a jsonb object into the values of its secret keys and the rest.
/// Returns `None` when the value is not an object or has no secret key.
pub fn split_secret_keys(
    value: &Value,
    keys: &[String],
) -> Option<(Map<String, Value>, Map<String, Value>)> {
    let object = value.as_object()?;
    let mut secret = Map::new();
    let mut rest = Map::new();
    for (key, item) in object {
        match keys.contains(key) {
            true => secret.insert(key.clone(), item.clone()),
            false => rest.insert(key.clone(), item.clone()),
        };
    }
    (!secret.is_empty()).then_some((secret, rest))
}

/// Returns the row value of a jsonb object whose secret keys went to Vault:
/// the other keys and the marker.
pub fn partial_reference(mut rest: Map<String, Value>, path: &str) -> Value {
    rest.insert(JSON_KEY.into(), Value::String(path.into()));
    Value::Object(rest)
}

/// Returns the plaintext of a row value with a marker: its other keys and
/// the secret keys read from Vault.
pub fn merge_secret_keys(value: &Value, data: Map<String, Value>) -> Value {
    let mut merged = value.as_object().cloned().unwrap_or_default();
    merged.remove(JSON_KEY);
    merged.extend(data);
    Value::Object(merged)
}
