//! QEMU's `key=value,...` command-line syntax (util/keyval.c), with qsd's exact error texts.
//!
//! qemu-storage-daemon parses `--blockdev`, `--export`, `--monitor`, `--nbd-server` and
//! `--object` with this syntax (unless the argument starts with `{`, which is JSON). The
//! result is a tree of objects and arrays whose leaves are all strings; the QAPI keyval
//! visitor later turns strings into the types the schema wants. This module only builds
//! the tree: it knows nothing about any schema.
//!
//! Syntax (as in keyval.c):
//! - `key-vals = [ key-val { ',' key-val } [ ',' ] ]`, `key-val = key '=' val`;
//! - a key is fragments joined by `.`; each fragment is a QAPI name, or (except the first)
//!   decimal digits; fragments are 1 to 127 characters;
//! - in a value `,,` stands for one `,`;
//! - with an implied key, the first item may be a bare value (no `=`, no `,,` escaping);
//! - a bare `help` or `?` item asks for help;
//! - a repeated key replaces the earlier value in place (last one wins);
//! - objects whose members are all numeric become arrays (`a.0=x,a.1=y` is `["x","y"]`),
//!   which must have no gaps and must not mix numeric and named members.
//!
//! Runs in the supervisor on the command line, which is operator input: every byte is
//! checked and nothing panics. Errors that depend on member order (which nested member is
//! reported first) follow QEMU's QDict iteration order, via [`crate::qdict`].
//!
//! One deliberate difference from QEMU: keys deeper than [`MAX_KEY_DEPTH`] fragments are
//! refused, because QEMU's recursion would let a hostile argument exhaust the stack of a
//! Rust process (serde_json also drops nested values recursively).

use serde_json::{Map, Value};

use crate::qdict;

/// Longest key fragment keyval.c accepts (`char key_in_cur[128]`, NUL included).
pub const MAX_FRAGMENT_LEN: usize = 127;

/// Most fragments one key may have. Not a QEMU limit (QAPI schemas nest less than ten
/// deep); it bounds recursion on trees built from the command line.
pub const MAX_KEY_DEPTH: usize = 64;

/// QEMU's `INT_MAX`: list indexes saturate there (`key_to_index`).
const INDEX_MAX: usize = i32::MAX as usize;

/// A keyval syntax error. `Display` is qsd's exact text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyvalError {
    /// A key with an empty or malformed fragment. Carries the whole key as written.
    #[error("Invalid parameter '{0}'")]
    InvalidParameter(String),
    /// A single-fragment key longer than [`MAX_FRAGMENT_LEN`].
    #[error("Parameter '{0}' is too long")]
    ParameterTooLong(String),
    /// One fragment of a dotted key longer than [`MAX_FRAGMENT_LEN`].
    #[error("Parameter fragment '{0}' is too long")]
    FragmentTooLong(String),
    /// A key not followed by `=` (and not a bare implied value). Carries the key.
    #[error("Expected '=' after parameter '{0}'")]
    ExpectedEquals(String),
    /// A path used both as a leaf and as an inner node, or with both numeric and named
    /// members. Carries the path without the trailing `.`.
    #[error("Parameters '{0}.*' used inconsistently")]
    UsedInconsistently(String),
    /// An array with a gap. Carries the missing element's full key (`a.0`).
    #[error("Parameter '{0}' missing")]
    ElementMissing(String),
    /// A bare `help` or `?` where the option offers no help.
    #[error("Help is not available for this option")]
    HelpNotAvailable,
    /// A key with more than [`MAX_KEY_DEPTH`] fragments (bulkhead's own limit).
    #[error("Parameter '{0}' nests too deeply")]
    TooDeep(String),
}

/// Parses `params` into a keyval tree, refusing `help` like `keyval_parse(.., NULL, errp)`.
///
/// `implied_key` names the key of a leading bare value (`--export nbd,...` means
/// `type=nbd`). The result is always a JSON object.
pub fn parse(params: &str, implied_key: Option<&str>) -> Result<Value, KeyvalError> {
    let (root, help) = parse_items(params, implied_key)?;
    // keyval.c refuses help before listifying, so this error beats array errors.
    if help {
        return Err(KeyvalError::HelpNotAvailable);
    }
    listify_root(root)
}

/// Parses `params` like [`parse`], but reports a bare `help`/`?` item as `true` instead of
/// failing (QEMU's `keyval_parse` with a `p_help` pointer, used by `--object`).
///
/// With help requested the tree holds the other items, already listified.
pub fn parse_with_help(
    params: &str,
    implied_key: Option<&str>,
) -> Result<(Value, bool), KeyvalError> {
    let (root, help) = parse_items(params, implied_key)?;
    Ok((listify_root(root)?, help))
}

/// Parses every item into an unlistified tree; also says whether help was asked for.
fn parse_items(
    params: &str,
    implied_key: Option<&str>,
) -> Result<(Map<String, Value>, bool), KeyvalError> {
    let mut root = Map::new();
    let mut help = false;
    let mut pos = 0;
    let mut implied = implied_key;
    while pos < params.len() {
        pos = parse_one(&mut root, params, pos, implied, &mut help)?;
        implied = None;
    }
    Ok((root, help))
}

fn listify_root(mut root: Map<String, Value>) -> Result<Value, KeyvalError> {
    // The root's members are QAPI names (first fragments are never numeric), so the root
    // itself always stays an object.
    let mut path = Vec::new();
    listify_members(&mut root, &mut path)?;
    Ok(Value::Object(root))
}

/// Length of `item` if it is a help request (`starts_with_help_option`), else 0.
fn help_option_len(item: &str) -> usize {
    if item.starts_with('?') {
        1
    } else if item.starts_with("help") {
        4
    } else {
        0
    }
}

/// QEMU's `parse_qapi_name(s, false)`: the length of the QAPI name at the start of `s`,
/// or 0. Accepts the downstream `__RFQDN_` prefix, whose dots are part of the name.
fn qapi_name_len(s: &[u8]) -> usize {
    let mut p = 0;
    if s.first() == Some(&b'_') {
        p = 1;
        if s.get(p) != Some(&b'_') {
            return 0;
        }
        p += 1;
        while let Some(&c) = s.get(p) {
            if !(c.is_ascii_alphanumeric() || c == b'-' || c == b'.') {
                break;
            }
            p += 1;
        }
        if s.get(p) != Some(&b'_') {
            return 0;
        }
        p += 1;
    }
    match s.get(p) {
        Some(c) if c.is_ascii_alphabetic() => p += 1,
        _ => return 0,
    }
    while let Some(&c) = s.get(p) {
        if !(c.is_ascii_alphanumeric() || c == b'-' || c == b'_') {
            break;
        }
        p += 1;
    }
    p
}

/// Number of leading decimal digits (`key_to_index` with an end pointer).
fn index_len(s: &[u8]) -> usize {
    s.iter().take_while(|c| c.is_ascii_digit()).count()
}

/// `key_to_index(key, NULL)`: the index of an all-digit key, saturated at `INT_MAX`.
fn key_index(key: &str) -> Option<usize> {
    if key.is_empty() || !key.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let mut value: usize = 0;
    for c in key.bytes() {
        value = value
            .saturating_mul(10)
            .saturating_add(usize::from(c - b'0'));
        if value > INDEX_MAX {
            return Some(INDEX_MAX);
        }
    }
    Some(value)
}

/// The object at `path` below `root`, which earlier steps have made sure exists.
fn object_at<'a>(
    root: &'a mut Map<String, Value>,
    path: &[String],
) -> Option<&'a mut Map<String, Value>> {
    let mut cur = root;
    for frag in path {
        cur = match cur.get_mut(frag) {
            Some(Value::Object(m)) => m,
            _ => return None,
        };
    }
    Some(cur)
}

/// Parses one item starting at byte `pos` of `params`; returns where the next item starts.
fn parse_one(
    root: &mut Map<String, Value>,
    params: &str,
    pos: usize,
    implied_key: Option<&str>,
    help: &mut bool,
) -> Result<usize, KeyvalError> {
    let rest = &params[pos..];
    let len = rest.find(['=', ',']).unwrap_or(rest.len());
    let mut key = &rest[..len];
    let mut implied_value_end = None;
    if len > 0 && !rest[len..].starts_with('=') {
        if help_option_len(rest) == len {
            *help = true;
            let mut next = pos + len;
            if params[next..].starts_with(',') {
                next += 1;
            }
            return Ok(next);
        }
        if let Some(ik) = implied_key {
            key = ik;
            implied_value_end = Some(pos + len);
        }
    }

    // Walk the key's fragments; after checking fragment k, make sure fragment k-1 names
    // an object (QEMU's order, which decides which error wins).
    let kb = key.as_bytes();
    let key_end = kb.len();
    let mut path: Vec<String> = Vec::new();
    let mut s = 0;
    loop {
        let flen = if s != 0 && index_len(&kb[s..]) > 0 {
            index_len(&kb[s..])
        } else {
            qapi_name_len(&kb[s..])
        };
        if flen == 0 || (s + flen < key_end && kb[s + flen] != b'.') {
            return Err(KeyvalError::InvalidParameter(key.to_owned()));
        }
        let frag = &key[s..s + flen];
        if flen > MAX_FRAGMENT_LEN {
            return Err(if s != 0 || s + flen != key_end {
                KeyvalError::FragmentTooLong(frag.to_owned())
            } else {
                KeyvalError::ParameterTooLong(frag.to_owned())
            });
        }
        if let Some(prev) = path.last() {
            let parent_len = path.len() - 1;
            let parent = object_at(root, &path[..parent_len])
                .ok_or_else(|| KeyvalError::UsedInconsistently(key[..s - 1].to_owned()))?;
            let child = parent
                .entry(prev.clone())
                .or_insert_with(|| Value::Object(Map::new()));
            if !child.is_object() {
                return Err(KeyvalError::UsedInconsistently(key[..s - 1].to_owned()));
            }
        }
        if path.len() >= MAX_KEY_DEPTH {
            return Err(KeyvalError::TooDeep(key.to_owned()));
        }
        path.push(frag.to_owned());
        s += flen;
        if s >= key_end || kb[s] != b'.' {
            break;
        }
        s += 1;
    }

    let (value, next) = match implied_value_end {
        Some(end) => {
            let mut next = end;
            if params[next..].starts_with(',') {
                next += 1;
            }
            (params[pos..end].to_owned(), next)
        }
        None => {
            if !params[pos + s..].starts_with('=') {
                return Err(KeyvalError::ExpectedEquals(key[..s].to_owned()));
            }
            let mut value = String::new();
            let mut cursor = pos + s + 1;
            loop {
                let tail = &params[cursor..];
                match tail.find(',') {
                    None => {
                        value.push_str(tail);
                        cursor = params.len();
                        break;
                    }
                    Some(i) => {
                        value.push_str(&tail[..i]);
                        cursor += i + 1;
                        if params[cursor..].starts_with(',') {
                            value.push(',');
                            cursor += 1;
                        } else {
                            break;
                        }
                    }
                }
            }
            (value, cursor)
        }
    };

    let inconsistent = || KeyvalError::UsedInconsistently(key.to_owned());
    let (leaf, parents) = path
        .split_last()
        .ok_or_else(|| KeyvalError::InvalidParameter(key.to_owned()))?;
    let parent = object_at(root, parents).ok_or_else(inconsistent)?;
    match parent.get_mut(leaf) {
        Some(Value::Object(_)) | Some(Value::Array(_)) => return Err(inconsistent()),
        Some(old) => *old = Value::String(value),
        None => {
            parent.insert(leaf.clone(), Value::String(value));
        }
    }
    Ok(next)
}

/// Listifies the members of `cur` (recursively), then `cur` itself if its members are
/// numeric. `path` is the key of `cur`. Returns the replacement for `cur`, if any.
fn listify_members(
    cur: &mut Map<String, Value>,
    path: &mut Vec<String>,
) -> Result<Option<Value>, KeyvalError> {
    let mut has_index = false;
    let mut has_member = false;
    let names: Vec<String> = qdict::iteration_order(cur.iter().map(|(k, _)| (k.clone(), ())))
        .into_iter()
        .map(|(k, ())| k)
        .collect();
    for name in &names {
        if key_index(name).is_some() {
            has_index = true;
        } else {
            has_member = true;
        }
        if let Some(Value::Object(child)) = cur.get_mut(name) {
            path.push(name.clone());
            let replacement = listify_members(child, path)?;
            path.pop();
            if let (Some(new), Some(slot)) = (replacement, cur.get_mut(name)) {
                *slot = new;
            }
        }
    }
    if has_index && has_member {
        return Err(KeyvalError::UsedInconsistently(path.join(".")));
    }
    if !has_index {
        return Ok(None);
    }

    // keyval.c sizes the element array by the member count plus a sentinel; indexes past
    // it cannot all be filled, so the first gap is reported.
    let nelt = cur.len() + 1;
    let mut elements: Vec<Option<Value>> = vec![None; nelt];
    let mut max_index = 0usize;
    for name in &names {
        let Some(index) = key_index(name) else {
            continue;
        };
        max_index = max_index.max(index);
        if index >= nelt - 1 {
            continue;
        }
        if let Some(value) = cur.get(name) {
            elements[index] = Some(value.clone());
        }
    }
    let count = nelt.min(max_index.saturating_add(1));
    let mut list = Vec::with_capacity(count);
    for (i, element) in elements.into_iter().take(count).enumerate() {
        match element {
            Some(value) => list.push(value),
            None => {
                let mut missing = path.join(".");
                missing.push('.');
                missing.push_str(&i.to_string());
                return Err(KeyvalError::ElementMissing(missing));
            }
        }
    }
    Ok(Some(Value::Array(list)))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn err(params: &str, implied: Option<&str>) -> String {
        match parse(params, implied) {
            Ok(v) => panic!("{params:?} parsed to {v}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn dotted_keys_build_nested_objects_in_insertion_order() {
        let v = parse(
            "driver=qcow2,file.driver=file,file.filename=x.qcow2,node-name=q0",
            Some("driver"),
        );
        assert_eq!(
            v,
            Ok(
                json!({"driver": "qcow2", "file": {"driver": "file", "filename": "x.qcow2"}, "node-name": "q0"})
            )
        );
    }

    #[test]
    fn implied_key_names_a_leading_bare_value() {
        assert_eq!(parse("c0", Some("chardev")), Ok(json!({"chardev": "c0"})));
        assert_eq!(
            parse("nbd,id=e0", Some("type")),
            Ok(json!({"type": "nbd", "id": "e0"}))
        );
        // Only the first item may be bare.
        assert_eq!(
            err("nbd,x", Some("type")),
            "Expected '=' after parameter 'x'"
        );
    }

    #[test]
    fn double_comma_escapes_a_comma_in_values_but_not_in_an_implied_value() {
        assert_eq!(
            parse("driver=file,,x", Some("driver")),
            Ok(json!({"driver": "file,x"}))
        );
        assert_eq!(parse("a=x,,", None), Ok(json!({"a": "x,"})));
        assert_eq!(parse("a=x,,,b=y", None), Ok(json!({"a": "x,", "b": "y"})));
        // qsd: `--blockdev null-co,,x` -> Invalid parameter ''
        assert_eq!(err("null-co,,x", Some("driver")), "Invalid parameter ''");
    }

    #[test]
    fn empty_input_and_trailing_comma_are_accepted() {
        assert_eq!(parse("", Some("driver")), Ok(json!({})));
        assert_eq!(
            parse("driver=null-co,", Some("driver")),
            Ok(json!({"driver": "null-co"}))
        );
        assert_eq!(parse("a=", None), Ok(json!({"a": ""})));
    }

    #[test]
    fn a_repeated_key_keeps_its_place_and_takes_the_last_value() {
        assert_eq!(
            parse("driver=null-co,size=1,driver=file", Some("driver")),
            Ok(json!({"driver": "file", "size": "1"}))
        );
    }

    #[test]
    fn malformed_keys_are_invalid_parameters_named_in_full() {
        assert_eq!(err("=x", Some("driver")), "Invalid parameter ''");
        assert_eq!(err(",", Some("driver")), "Invalid parameter ''");
        assert_eq!(err("a..b=1", Some("driver")), "Invalid parameter 'a..b'");
        assert_eq!(err("0=x", None), "Invalid parameter '0'");
        assert_eq!(err("a.0x=1", None), "Invalid parameter 'a.0x'");
        assert_eq!(err("a.-=1", None), "Invalid parameter 'a.-'");
        assert_eq!(err("a.=1", None), "Invalid parameter 'a.'");
        assert_eq!(err("a b=1", None), "Invalid parameter 'a b'");
    }

    #[test]
    fn qapi_names_with_dashes_underscores_and_downstream_prefixes_are_keys() {
        assert_eq!(parse("a-b_c=1", None), Ok(json!({"a-b_c": "1"})));
        assert_eq!(
            parse("__com.redhat_x=1", None),
            Ok(json!({"__com.redhat_x": "1"}))
        );
    }

    #[test]
    fn a_key_without_value_expects_an_equals_sign() {
        assert_eq!(
            err("driver=null-co,size", Some("driver")),
            "Expected '=' after parameter 'size'"
        );
        assert_eq!(err("x", None), "Expected '=' after parameter 'x'");
        assert_eq!(
            err("chardev=c0,pretty", Some("chardev")),
            "Expected '=' after parameter 'pretty'"
        );
    }

    #[test]
    fn fragments_longer_than_127_characters_are_too_long() {
        let long = "a".repeat(128);
        assert_eq!(
            err(&format!("{long}=1"), Some("driver")),
            format!("Parameter '{long}' is too long")
        );
        assert_eq!(
            err(&format!("driver=null-co,x.{long}=1"), Some("driver")),
            format!("Parameter fragment '{long}' is too long")
        );
        let max = "a".repeat(127);
        assert_eq!(
            parse(&format!("{max}=1"), None),
            Ok(json!({ max.clone(): "1" }))
        );
    }

    #[test]
    fn a_path_used_as_leaf_and_object_is_inconsistent() {
        assert_eq!(
            err("a=1,a.b=2", None),
            "Parameters 'a.*' used inconsistently"
        );
        assert_eq!(
            err("a.b=1,a=2", None),
            "Parameters 'a.*' used inconsistently"
        );
        assert_eq!(
            err("chardev=c0,chardev.x=1", Some("chardev")),
            "Parameters 'chardev.*' used inconsistently"
        );
        assert_eq!(
            err("a.b.c=1,a.b=2", None),
            "Parameters 'a.b.*' used inconsistently"
        );
    }

    #[test]
    fn numeric_members_become_arrays() {
        assert_eq!(
            parse("bitmaps.1=b,bitmaps.0=a,x=1", None),
            Ok(json!({"bitmaps": ["a", "b"], "x": "1"}))
        );
        assert_eq!(
            parse("a.0.b=1,a.0.c=2,a.1.b=3", None),
            Ok(json!({"a": [{"b": "1", "c": "2"}, {"b": "3"}]}))
        );
        assert_eq!(
            parse("a.b.c.1=1,a.b.c.0=2,a.b.d=4", None),
            Ok(json!({"a": {"b": {"c": ["2", "1"], "d": "4"}}}))
        );
    }

    #[test]
    fn array_gaps_and_mixed_members_are_refused() {
        assert_eq!(err("a.1=x", None), "Parameter 'a.0' missing");
        assert_eq!(
            err("a.0=x,a.b=y", None),
            "Parameters 'a.*' used inconsistently"
        );
        assert_eq!(
            err("a.99999999999999999999=x", None),
            "Parameter 'a.0' missing"
        );
        assert_eq!(
            err("a.b.0=1,a.c=2,a.b.x=2", None),
            "Parameters 'a.b.*' used inconsistently"
        );
    }

    #[test]
    fn nested_listify_errors_follow_qdict_order_not_insertion_order() {
        // qsd reports a.b before a.c whichever was written first.
        assert_eq!(err("a.c.1=1,a.b.1=1", None), "Parameter 'a.b.0' missing");
        assert_eq!(err("a.b.1=1,a.c.1=1", None), "Parameter 'a.b.0' missing");
    }

    #[test]
    fn help_is_refused_unless_the_caller_asks_for_it() {
        assert_eq!(err("help", None), "Help is not available for this option");
        assert_eq!(
            err("driver=file,help", Some("driver")),
            "Help is not available for this option"
        );
        assert_eq!(
            err("?", Some("driver")),
            "Help is not available for this option"
        );
        assert_eq!(
            parse_with_help("iothread,help", Some("qom-type")),
            Ok((json!({"qom-type": "iothread"}), true))
        );
        assert_eq!(
            parse_with_help("help", Some("qom-type")),
            Ok((json!({}), true))
        );
        assert_eq!(
            parse_with_help("help=on", None),
            Ok((json!({"help": "on"}), false))
        );
        // Syntax errors win over help, help wins over array errors.
        assert_eq!(err("help,a..b=1", None), "Invalid parameter 'a..b'");
        assert_eq!(
            err("help,x.1=1", None),
            "Help is not available for this option"
        );
        assert_eq!(
            parse_with_help("help,x.1=1", None),
            Err(KeyvalError::ElementMissing("x.0".to_owned()))
        );
        // A bare word that merely starts with "help" is a value.
        assert_eq!(
            parse("helpx", Some("driver")),
            Ok(json!({"driver": "helpx"}))
        );
    }

    #[test]
    fn absurdly_deep_keys_are_refused_without_recursing() {
        let deep = vec!["a"; MAX_KEY_DEPTH + 1].join(".");
        assert_eq!(
            err(&format!("{deep}=1"), None),
            format!("Parameter '{deep}' nests too deeply")
        );
    }

    #[test]
    fn non_ascii_values_pass_through_unchanged() {
        assert_eq!(parse("a=é,,ü", None), Ok(json!({"a": "é,ü"})));
        assert_eq!(err("é=1", None), "Invalid parameter 'é'");
    }
}
