//! `--monitor`: `MonitorOptions` through qsd's keyval and JSON input visitors, including
//! the order in which QEMU's GLib hash table reports the first unexpected member.

use bulkhead_qmp::qapi::ghash::KeySet;

use super::*;

/// Which QAPI input visitor flavour to mimic.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Flavour {
    Keyval,
    Json,
}

impl MonitorOptions {
    /// Visits a keyval tree (`--monitor chardev=c0,...`) like qsd's keyval visitor.
    pub fn from_keyval(tree: &Value) -> Result<Self, OptionError> {
        Self::visit(tree, Flavour::Keyval)
    }

    /// Visits a parsed JSON object (`--monitor {"chardev":"c0"}`) like qsd's strict
    /// visitor.
    pub fn from_json(tree: &Value) -> Result<Self, OptionError> {
        Self::visit(tree, Flavour::Json)
    }

    pub(super) fn visit(tree: &Value, flavour: Flavour) -> Result<Self, OptionError> {
        let Value::Object(map) = tree else {
            return Err(OptionError::InvalidType("null".to_owned(), "object"));
        };
        let get_str = |name: &str| -> Result<Option<String>, OptionError> {
            match (map.get(name), flavour) {
                (None, _) => Ok(None),
                (Some(Value::String(s)), _) => Ok(Some(s.clone())),
                (Some(Value::Object(_) | Value::Array(_)), Flavour::Keyval) => {
                    Err(OptionError::ParametersUnexpected(name.to_owned()))
                }
                (Some(_), _) => Err(OptionError::InvalidType(name.to_owned(), "string")),
            }
        };
        // Members in QAPI declaration order: id, mode, pretty, chardev.
        let id = get_str("id")?;
        let mode = match get_str("mode")? {
            None => None,
            Some(m) => Some(match m.as_str() {
                "readline" => MonitorMode::Readline,
                "control" => MonitorMode::Control,
                _ => return Err(OptionError::InvalidEnumValue("mode".to_owned(), m)),
            }),
        };
        let pretty = match (flavour, map.get("pretty")) {
            (_, None) => None,
            (Flavour::Json, Some(Value::Bool(b))) => Some(*b),
            (Flavour::Json, Some(_)) => {
                return Err(OptionError::InvalidType("pretty".to_owned(), "boolean"));
            }
            (Flavour::Keyval, Some(_)) => {
                let text = get_str("pretty")?.unwrap_or_default();
                Some(
                    parse_bool(&text)
                        .ok_or_else(|| OptionError::ExpectsOnOff("pretty".to_owned()))?,
                )
            }
        };
        let chardev = get_str("chardev")?
            .ok_or_else(|| OptionError::ParameterMissing("chardev".to_owned()))?;
        let visited = ["id", "mode", "pretty", "chardev"];
        if let Some(extra) = first_unvisited(map.keys().map(String::as_str), &visited) {
            return Err(OptionError::ParameterUnexpected(extra));
        }
        Ok(MonitorOptions {
            id,
            mode,
            pretty,
            chardev,
        })
    }
}

/// The member QEMU's `qobject_input_check_struct` reports: the first key left in a GLib
/// `GHashTable` that was filled in QDict order, iterated in slot order.
///
/// Growth follows GLib 2.7x's relocation; shrinking (only after removing most members,
/// which a four-member struct cannot do to a table that grew) is not modelled.
pub(super) fn first_unvisited<'a>(
    keys_in_insertion_order: impl Iterator<Item = &'a str>,
    visited: &[&str],
) -> Option<String> {
    let ordered: Vec<&str> = qdict::iteration_order(keys_in_insertion_order.map(|k| (k, ())))
        .into_iter()
        .map(|(k, ())| k)
        .collect();
    // The same GLib table model the QMP argument visitor uses.
    let mut table = KeySet::new();
    for key in ordered {
        table.insert(key);
    }
    table
        .iter_order()
        .into_iter()
        .find(|k| !visited.contains(k))
        .map(|k| (*k).to_owned())
}
