//! `query-qmp-schema`: the schema as QEMU's introspection presents it
//! (`SchemaInfo` list), generated from the same definitions the visitor checks against.
//!
//! This follows QEMU's `scripts/qapi/introspect.py`: commands and events first, in
//! definition order, each using its argument type and then its return type (an absent
//! one is the empty object `q_empty`); then every type in the order it was first used,
//! visiting each used type in turn, which uses more. Type names other than built-ins
//! are masked as numbers given in order of first use; every integer type shows as `int`
//! (arrays of them as `[int]`); object members are flattened (base first) and optional
//! ones carry `"default": null`; a union lists its explicit variants and then, typed
//! `q_empty`, every tag value that has none. Members are inserted in QEMU's order; the
//! JSON writer prints them in QDict order like any reply.
//!
//! Only the commands and events bulkhead implements are listed (the caller names
//! them), so the numbers are what QEMU's generator would give a schema holding just
//! those, not qsd's.
//!
//! Runs in the supervisor on data compiled into the binary.

use std::collections::HashMap;

use serde_json::{Map, Value};

use super::Schema;
use super::schema::{Builtin, Entity, ObjectDef, TypeDef, TypeRef};

/// Why the introspection could not be generated (a bulkhead bug: a command or event
/// that is implemented but not in the schema files).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IntrospectError {
    /// A command name the schema does not define.
    #[error("command '{0}' is not in the QAPI schema")]
    UnknownCommand(String),
    /// An event name the schema does not define.
    #[error("event '{0}' is not in the QAPI schema")]
    UnknownEvent(String),
    /// A type reference that does not resolve.
    #[error("QAPI type '{0}' is not defined")]
    UndefinedType(String),
}

/// The name QEMU gives the empty object type.
const EMPTY: &str = "q_empty";

/// A type as introspection identifies it: integer types are all `int`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Used {
    Named(String),
    /// An array of the named element type.
    Array(String),
}

fn is_int(name: &str) -> bool {
    matches!(
        Builtin::from_name(name),
        Some(Builtin::Int { .. } | Builtin::Uint { .. } | Builtin::Size)
    )
}

/// `int` for every integer type, the name otherwise.
fn canonical(name: &str) -> &str {
    if is_int(name) { "int" } else { name }
}

/// The `json-type` of a built-in (`JSONType` in QEMU's introspect.json).
fn json_type(b: Builtin) -> &'static str {
    match b {
        Builtin::Str => "string",
        Builtin::Int { .. } | Builtin::Uint { .. } | Builtin::Size => "int",
        Builtin::Bool => "boolean",
        Builtin::Number => "number",
        Builtin::Null => "null",
        Builtin::Any => "value",
    }
}

fn features(obj: &mut Map<String, Value>, features: &[String]) {
    if !features.is_empty() {
        obj.insert(
            "features".into(),
            Value::Array(features.iter().cloned().map(Value::String).collect()),
        );
    }
}

struct Generator<'s> {
    schema: &'s Schema,
    used: Vec<Used>,
    numbers: HashMap<String, usize>,
    trees: Vec<Value>,
}

impl<'s> Generator<'s> {
    fn number(&mut self, name: &str) -> String {
        let next = self.numbers.len();
        self.numbers
            .entry(name.to_owned())
            .or_insert(next)
            .to_string()
    }

    fn lookup(&self, name: &str) -> Result<&'s TypeDef, IntrospectError> {
        self.schema
            .data
            .types
            .get(name)
            .ok_or_else(|| IntrospectError::UndefinedType(name.to_owned()))
    }

    fn is_builtin(&self, name: &str) -> Result<bool, IntrospectError> {
        if name == EMPTY {
            return Ok(false);
        }
        Ok(matches!(self.lookup(name)?, TypeDef::Builtin(_)))
    }

    fn note(&mut self, u: Used) {
        if !self.used.contains(&u) {
            self.used.push(u);
        }
    }

    /// `_use_type` for a named type: queues it, returns its (masked) name.
    fn use_named(&mut self, name: &str) -> Result<String, IntrospectError> {
        let name = canonical(name);
        self.note(Used::Named(name.to_owned()));
        if self.is_builtin(name)? {
            Ok(name.to_owned())
        } else {
            Ok(self.number(name))
        }
    }

    /// `_use_type` for an array: the array is queued before its element.
    fn use_array(&mut self, element: &str) -> Result<String, IntrospectError> {
        let element = canonical(element);
        self.note(Used::Array(element.to_owned()));
        Ok(format!("[{}]", self.use_named(element)?))
    }

    fn use_ref(&mut self, t: &TypeRef) -> Result<String, IntrospectError> {
        match t {
            TypeRef::Named(n) => self.use_named(n),
            TypeRef::List(n) => self.use_array(n),
        }
    }

    fn tree(&mut self, mut obj: Map<String, Value>, name: String, meta: &str, f: &[String]) {
        obj.insert("name".into(), Value::String(name));
        obj.insert("meta-type".into(), Value::String(meta.to_owned()));
        features(&mut obj, f);
        self.trees.push(Value::Object(obj));
    }

    fn entity(
        &mut self,
        name: &str,
        meta: &str,
        arg: Option<&str>,
        ret: Option<Option<&TypeRef>>,
        f: &[String],
    ) -> Result<(), IntrospectError> {
        let mut obj = Map::new();
        let arg = self.use_named(arg.unwrap_or(EMPTY))?;
        obj.insert("arg-type".into(), Value::String(arg));
        if let Some(ret) = ret {
            let ret = match ret {
                Some(t) => self.use_ref(t)?,
                None => self.use_named(EMPTY)?,
            };
            obj.insert("ret-type".into(), Value::String(ret));
        }
        self.tree(obj, name.to_owned(), meta, f);
        Ok(())
    }

    fn visit(&mut self, u: Used) -> Result<(), IntrospectError> {
        let name = match u {
            Used::Array(element) => {
                let element = self.use_named(&element)?;
                let mut obj = Map::new();
                obj.insert("element-type".into(), Value::String(element.clone()));
                self.tree(obj, format!("[{element}]"), "array", &[]);
                return Ok(());
            }
            Used::Named(name) => name,
        };
        if name == EMPTY {
            let empty = &self.schema.empty;
            return self.object(empty);
        }
        match self.lookup(&name)? {
            TypeDef::Builtin(b) => {
                let mut obj = Map::new();
                obj.insert("json-type".into(), Value::String(json_type(*b).to_owned()));
                self.tree(obj, name, "builtin", &[]);
            }
            TypeDef::Enum(e) => {
                let members = e
                    .values
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        let mut m = Map::new();
                        m.insert("name".into(), Value::String(v.clone()));
                        if let Some(f) = e.value_features.get(i) {
                            features(&mut m, f);
                        }
                        Value::Object(m)
                    })
                    .collect();
                let values = e.values.iter().cloned().map(Value::String).collect();
                let mut obj = Map::new();
                obj.insert("members".into(), Value::Array(members));
                obj.insert("values".into(), Value::Array(values));
                let masked = self.number(&name);
                self.tree(obj, masked, "enum", &e.features);
            }
            TypeDef::Object(o) => self.object(o)?,
            TypeDef::Alternate(a) => {
                let mut members = Vec::with_capacity(a.branches.len());
                for (_, t) in &a.branches {
                    let mut m = Map::new();
                    m.insert("type".into(), Value::String(self.use_ref(t)?));
                    members.push(Value::Object(m));
                }
                let mut obj = Map::new();
                obj.insert("members".into(), Value::Array(members));
                let masked = self.number(&name);
                self.tree(obj, masked, "alternate", &a.features);
            }
        }
        Ok(())
    }

    /// `visit_object_type_flat`: all members (base first), then the variants.
    fn object(&mut self, o: &'s ObjectDef) -> Result<(), IntrospectError> {
        let mut all = Vec::new();
        self.schema.data.all_members(o, &mut all);
        let mut members = Vec::with_capacity(all.len());
        for m in all {
            let mut obj = Map::new();
            obj.insert("name".into(), Value::String(m.name.clone()));
            obj.insert("type".into(), Value::String(self.use_ref(&m.ty)?));
            if m.optional {
                obj.insert("default".into(), Value::Null);
            }
            features(&mut obj, &m.features);
            members.push(Value::Object(obj));
        }
        let mut obj = Map::new();
        obj.insert("members".into(), Value::Array(members));
        if let Some(u) = &o.union {
            // Tag values without a variant get the empty type, after the explicit ones.
            let mut cases: Vec<(&str, &str)> = u
                .variants
                .iter()
                .map(|(case, t)| (case.as_str(), t.as_str()))
                .collect();
            let mut base_members = Vec::new();
            self.schema.data.all_members(o, &mut base_members);
            let tag = base_members
                .iter()
                .find(|m| m.name == u.discriminator)
                .ok_or_else(|| IntrospectError::UndefinedType(u.discriminator.clone()))?;
            if let TypeDef::Enum(e) = self.lookup(tag.ty.name())? {
                for v in &e.values {
                    if !cases.iter().any(|(c, _)| c == v) {
                        cases.push((v.as_str(), EMPTY));
                    }
                }
            }
            let mut variants = Vec::with_capacity(cases.len());
            for (case, t) in cases {
                let mut v = Map::new();
                v.insert("case".into(), Value::String(case.to_owned()));
                v.insert("type".into(), Value::String(self.use_named(t)?));
                variants.push(Value::Object(v));
            }
            obj.insert("tag".into(), Value::String(u.discriminator.clone()));
            obj.insert("variants".into(), Value::Array(variants));
        }
        let masked = self.number(&o.name);
        self.tree(obj, masked, "object", &o.features);
        Ok(())
    }
}

impl Schema {
    /// The `query-qmp-schema` reply for the given commands and events: those listed,
    /// in schema definition order, and every type they reach.
    pub fn introspect(&self, commands: &[&str], events: &[&str]) -> Result<Value, IntrospectError> {
        if let Some(c) = commands.iter().find(|c| self.command(c).is_none()) {
            return Err(IntrospectError::UnknownCommand((*c).to_owned()));
        }
        if let Some(e) = events
            .iter()
            .find(|e| !self.data.event_index.contains_key(**e))
        {
            return Err(IntrospectError::UnknownEvent((*e).to_owned()));
        }
        let mut g = Generator {
            schema: self,
            used: Vec::new(),
            numbers: HashMap::new(),
            trees: Vec::new(),
        };
        for entity in &self.data.entities {
            match *entity {
                Entity::Command(i) => {
                    let Some(c) = self.data.commands.get(i) else {
                        continue;
                    };
                    if commands.contains(&c.name.as_str()) {
                        g.entity(
                            &c.name,
                            "command",
                            c.arg_type.as_deref(),
                            Some(c.returns.as_ref()),
                            &c.features,
                        )?;
                    }
                }
                Entity::Event(i) => {
                    let Some(e) = self.data.events.get(i) else {
                        continue;
                    };
                    if events.contains(&e.name.as_str()) {
                        g.entity(&e.name, "event", e.arg_type.as_deref(), None, &e.features)?;
                    }
                }
            }
        }
        // The queue grows while it is walked, as in QEMU's visit_end.
        let mut i = 0;
        while let Some(u) = g.used.get(i).cloned() {
            g.visit(u)?;
            i += 1;
        }
        Ok(Value::Array(g.trees))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use serde_json::json;

    use super::*;

    fn entries(v: &Value) -> &[Value] {
        v.as_array().map(Vec::as_slice).unwrap_or_default()
    }

    #[test]
    fn query_version_alone_numbers_types_in_order_of_first_use() {
        let schema = Schema::get();
        let v = schema.introspect(&["query-version"], &[]);
        assert_eq!(
            v,
            Ok(json!([
                {"arg-type": "0", "ret-type": "1", "name": "query-version", "meta-type": "command"},
                {"members": [], "name": "0", "meta-type": "object"},
                {"members": [{"name": "qemu", "type": "2"}, {"name": "package", "type": "str"}],
                 "name": "1", "meta-type": "object"},
                {"members": [{"name": "major", "type": "int"}, {"name": "minor", "type": "int"},
                             {"name": "micro", "type": "int"}],
                 "name": "2", "meta-type": "object"},
                {"json-type": "string", "name": "str", "meta-type": "builtin"},
                {"json-type": "int", "name": "int", "meta-type": "builtin"},
            ]))
        );
    }

    #[test]
    fn entries_print_in_qdict_order_like_qsd() {
        let schema = Schema::get();
        let v = schema.introspect(&["block_resize"], &[]);
        let first = v.as_ref().ok().and_then(|v| entries(v).first().cloned());
        // qsd 10.0.2 prints exactly this (with its own numbers).
        assert_eq!(
            first.map(|f| crate::json::to_string(&f)),
            Some(
                r#"{"name": "block_resize", "ret-type": "1", "meta-type": "command", "arg-type": "0"}"#
                    .to_owned()
            )
        );
    }

    #[test]
    fn events_interleave_with_commands_in_definition_order() {
        let schema = Schema::get();
        let v = schema.introspect(
            &["query-block-exports", "block-export-del"],
            &["BLOCK_EXPORT_DELETED"],
        );
        let names: Vec<&str> = v
            .as_ref()
            .map(entries)
            .unwrap_or_default()
            .iter()
            .filter_map(|e| e["name"].as_str())
            .take(3)
            .collect();
        assert_eq!(
            names,
            [
                "block-export-del",
                "BLOCK_EXPORT_DELETED",
                "query-block-exports"
            ]
        );
    }

    #[test]
    fn unions_list_every_tag_value_and_features_are_carried() {
        let schema = Schema::get();
        let Ok(v) = schema.introspect(&["query-named-block-nodes", "blockdev-add"], &[]) else {
            panic!("introspection failed");
        };
        let by_name: HashMap<&str, &Value> = entries(&v)
            .iter()
            .filter_map(|e| Some((e["name"].as_str()?, e)))
            .collect();
        // ImageInfoSpecificQCow2Encryption: explicit 'luks', then 'aes' as q_empty.
        let encrypt = entries(&v).iter().find(|e| {
            e["tag"] == "format"
                && e["variants"].as_array().is_some_and(|a| a.len() == 2)
                && e["variants"][0]["case"] == "luks"
        });
        let Some(encrypt) = encrypt else {
            panic!("no qcow2 encryption info union");
        };
        assert_eq!(encrypt["variants"][1]["case"], "aes");
        let empty = encrypt["variants"][1]["type"].as_str().unwrap_or_default();
        assert_eq!(by_name.get(empty).map(|e| &e["members"]), Some(&json!([])));
        // uint64/uint32 members show as int; features on types, members, enum values.
        let dirty = entries(&v).iter().find(|e| {
            e["members"][0]["name"] == "name" && e["members"][2]["name"] == "granularity"
        });
        assert_eq!(dirty.map(|d| &d["members"][2]["type"]), Some(&json!("int")));
        let file = entries(&v)
            .iter()
            .find(|e| e["features"] == json!(["dynamic-auto-read-only"]));
        let dropped = file.and_then(|f| {
            f["members"]
                .as_array()?
                .iter()
                .find(|m| m["name"] == "x-check-cache-dropped")
        });
        assert_eq!(
            dropped,
            Some(
                &json!({"name": "x-check-cache-dropped", "type": "bool", "default": null,
                         "features": ["unstable"]})
            )
        );
        let gluster = entries(&v).iter().find_map(|e| {
            e["members"]
                .as_array()?
                .iter()
                .find(|m| m["name"] == "gluster" && m.get("type").is_none())
        });
        assert_eq!(
            gluster,
            Some(&json!({"name": "gluster", "features": ["deprecated"]}))
        );
    }

    /// Every name an entry refers to has exactly one entry, and every entry but the
    /// commands and events is referred to.
    #[test]
    fn the_whole_schema_is_self_consistent() {
        let schema = Schema::get();
        let commands: Vec<&str> = schema.command_names().collect();
        let events: Vec<&str> = schema.data.events.iter().map(|e| e.name.as_str()).collect();
        let Ok(v) = schema.introspect(&commands, &events) else {
            panic!("introspection failed");
        };
        let mut defined = HashSet::new();
        let mut referred = HashSet::new();
        let mut refer = |t: &Value| {
            if let Some(t) = t.as_str() {
                referred.insert(t.to_owned());
            }
        };
        for e in entries(&v) {
            let name = e["name"].as_str().unwrap_or_default().to_owned();
            assert!(defined.insert(name.clone()), "{name} listed twice");
            refer(&e["arg-type"]);
            refer(&e["ret-type"]);
            refer(&e["element-type"]);
            for m in e["members"].as_array().into_iter().flatten() {
                refer(&m["type"]);
            }
            for m in e["variants"].as_array().into_iter().flatten() {
                refer(&m["type"]);
            }
            match e["meta-type"].as_str() {
                Some("builtin") => assert!(!name.starts_with(|c: char| c.is_ascii_digit())),
                Some("array") => assert!(name.starts_with('[')),
                Some("command" | "event") => {}
                _ => assert!(name.parse::<usize>().is_ok(), "{name} not masked"),
            }
        }
        let listed = entries(&v)
            .iter()
            .filter(|e| matches!(e["meta-type"].as_str(), Some("command" | "event")))
            .count();
        assert_eq!(listed, commands.len() + events.len());
        for r in &referred {
            assert!(defined.contains(r), "{r} referred to but not listed");
        }
        assert_eq!(defined.len(), referred.len() + listed);
    }

    #[test]
    fn an_unknown_command_or_event_is_an_error() {
        let schema = Schema::get();
        assert_eq!(
            schema.introspect(&["no-such"], &[]),
            Err(IntrospectError::UnknownCommand("no-such".into()))
        );
        assert_eq!(
            schema.introspect(&[], &["NO_SUCH"]),
            Err(IntrospectError::UnknownEvent("NO_SUCH".into()))
        );
    }
}
