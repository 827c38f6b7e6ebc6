//! Flattening of nested properties, traits and context into warehouse columns.
//!
//! Segment's warehouses store one column per leaf: nested objects are flattened by
//! joining the keys of the path with `_` (`context.app.version` → `context_app_version`
//! once snake-cased), and arrays are stored as their JSON text. This module only joins
//! the raw keys; snake-casing the joined path is the caller's job
//! ([`crate::snake::snakecase`]), so the two rules can be tested apart.
//!
//! Invariants: pure and deterministic — leaves come out in the order of the input
//! object (depth first, the order `serde_json` keeps with `preserve_order`); every leaf
//! is a JSON scalar (`null`, bool, number, string) — arrays become
//! [`serde_json::Value::String`] holding compact JSON; empty objects produce nothing.
//! The walk is iterative, so hostile nesting cannot overflow the stack.

use serde_json::{Map, Value};

/// Flattens `object` into `(joined key, leaf)` pairs, in input order.
///
/// Keys are joined with `_`; a non-empty `prefix` is prepended the same way (use
/// `"context"` for the context object). Nulls are kept as [`Value::Null`] leaves so the
/// caller decides what a null means; arrays are turned into their JSON text.
///
/// ```
/// use serde_json::json;
/// use tributary_model::flatten::flatten;
/// let v = json!({"app": {"version": "1.2"}, "tags": ["a", "b"], "ip": "1.2.3.4"});
/// let flat = flatten(v.as_object().unwrap(), "context");
/// assert_eq!(flat, vec![
///     ("context_app_version".to_string(), json!("1.2")),
///     ("context_tags".to_string(), json!("[\"a\",\"b\"]")),
///     ("context_ip".to_string(), json!("1.2.3.4")),
/// ]);
/// ```
pub fn flatten(object: &Map<String, Value>, prefix: &str) -> Vec<(String, Value)> {
    let mut out = Vec::with_capacity(object.len());
    // A stack of (key prefix, iterator over the object's entries): depth first, in order.
    let mut stack: Vec<(String, serde_json::map::Iter<'_>)> =
        vec![(prefix.to_string(), object.iter())];
    while let Some((path, iter)) = stack.last_mut() {
        let Some((key, value)) = iter.next() else {
            stack.pop();
            continue;
        };
        let joined = join(path, key);
        match value {
            Value::Object(child) => {
                if !child.is_empty() {
                    stack.push((joined, child.iter()));
                }
            }
            Value::Array(_) => out.push((joined, Value::String(array_text(value)))),
            scalar => out.push((joined, scalar.clone())),
        }
    }
    out
}

/// [`flatten`] for an object the caller owns: leaves are moved, not cloned. Same
/// output as `flatten(&object, prefix)`.
pub fn flatten_owned(object: Map<String, Value>, prefix: &str) -> Vec<(String, Value)> {
    let mut out = Vec::with_capacity(object.len());
    let mut stack: Vec<(String, serde_json::map::IntoIter)> =
        vec![(prefix.to_string(), object.into_iter())];
    while let Some((path, iter)) = stack.last_mut() {
        let Some((key, value)) = iter.next() else {
            stack.pop();
            continue;
        };
        let joined = join(path, &key);
        match value {
            Value::Object(child) => {
                if !child.is_empty() {
                    stack.push((joined, child.into_iter()));
                }
            }
            Value::Array(_) => {
                let text = array_text(&value);
                out.push((joined, Value::String(text)));
            }
            scalar => out.push((joined, scalar)),
        }
    }
    out
}

/// The text an array is stored as: compact JSON (`["507f1","505bd"]`).
///
/// Segment's docs show `[507f1, 505bd]`, which is not JSON and cannot be parsed back;
/// JSON text can (segment-spec §6 question 9).
pub fn array_text(value: &Value) -> String {
    // Serializing a `Value` cannot fail (all keys are strings).
    serde_json::to_string(value).unwrap_or_default()
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        let mut s = String::with_capacity(prefix.len() + 1 + key.len());
        s.push_str(prefix);
        s.push('_');
        s.push_str(key);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn flat(v: Value, prefix: &str) -> Vec<(String, Value)> {
        flatten(v.as_object().expect("object"), prefix)
    }

    fn pairs(items: &[(&str, Value)]) -> Vec<(String, Value)> {
        items
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn flattens_nested_objects_with_underscores() {
        assert_eq!(
            flat(
                json!({"address": {"street": "Main", "geo": {"lat": 1.5}}}),
                ""
            ),
            pairs(&[
                ("address_street", json!("Main")),
                ("address_geo_lat", json!(1.5))
            ])
        );
    }

    #[test]
    fn prefixes_context_paths() {
        assert_eq!(
            flat(
                json!({"app": {"version": "1.0"}, "ip": "8.8.8.8"}),
                "context"
            ),
            pairs(&[
                ("context_app_version", json!("1.0")),
                ("context_ip", json!("8.8.8.8"))
            ])
        );
    }

    #[test]
    fn stores_arrays_as_json_text() {
        assert_eq!(
            flat(
                json!({"ids": ["507f1", "505bd"], "empty": [], "objs": [{"a": 1}]}),
                ""
            ),
            pairs(&[
                ("ids", json!("[\"507f1\",\"505bd\"]")),
                ("empty", json!("[]")),
                ("objs", json!("[{\"a\":1}]")),
            ])
        );
    }

    #[test]
    fn keeps_scalars_and_nulls_in_input_order() {
        assert_eq!(
            flat(
                json!({"z": 1, "a": true, "m": null, "s": "x", "f": 2.5}),
                ""
            ),
            pairs(&[
                ("z", json!(1)),
                ("a", json!(true)),
                ("m", Value::Null),
                ("s", json!("x")),
                ("f", json!(2.5)),
            ])
        );
    }

    #[test]
    fn empty_objects_produce_no_columns() {
        assert_eq!(flat(json!({"a": {}, "b": {"c": {}}}), ""), vec![]);
        assert_eq!(flat(json!({}), "context"), vec![]);
    }

    #[test]
    fn joins_raw_keys_without_snake_casing() {
        assert_eq!(
            flat(json!({"device": {"adTrackingEnabled": false}}), "context"),
            pairs(&[("context_device_adTrackingEnabled", json!(false))])
        );
        assert_eq!(
            flat(json!({"product_id": {"sku": "A-1"}}), ""),
            pairs(&[("product_id_sku", json!("A-1"))])
        );
    }

    #[test]
    fn owned_and_borrowed_flattening_agree() {
        let v = json!({"a": {"b": [1, {"c": 2}], "d": {"e": null, "f": {}}}, "g": "h",
                       "context": {"x": 1}, "i": {"j": {"k": true}}});
        let object = v.as_object().expect("object").clone();
        for prefix in ["", "context"] {
            assert_eq!(
                flatten_owned(object.clone(), prefix),
                flatten(&object, prefix)
            );
        }
    }

    #[test]
    fn survives_deep_nesting_without_recursion() {
        let mut v = json!(1);
        for _ in 0..1_000 {
            let mut m = Map::new();
            m.insert("a".to_string(), v);
            v = Value::Object(m);
        }
        let out = flat(v, "");
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0.len(), 2 * 1_000 - 1);
        assert_eq!(out[0].1, json!(1));
    }
}
