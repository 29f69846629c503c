//! The QAPI schema as data: the model and the loader for the embedded definition files.
//!
//! The definitions in `schema/*.json` are written in QAPI's own syntax (single-quoted
//! strings, `#` comments, a sequence of top-level objects), as QEMU's `qapi/*.json`
//! are. At first use they are preprocessed into plain JSON, parsed with serde_json and
//! resolved into [`TypeDef`]s: anonymous command and event arguments and inline union
//! bases get QEMU's generated names (`q_obj_<command>-arg`, `q_obj_<union>-base`).
//! Return types, events and features are kept for introspection (`introspect.rs`); the
//! visitor ignores them.
//!
//! Runs in the supervisor; it reads only data compiled into the binary.

use std::collections::HashMap;

use serde_json::{Map, Value};

/// One schema file: its name (for error messages) and its text.
pub(crate) const FILES: &[(&str, &str)] = &[
    ("common.json", include_str!("schema/common.json")),
    ("sockets.json", include_str!("schema/sockets.json")),
    ("job.json", include_str!("schema/job.json")),
    ("block-core.json", include_str!("schema/block-core.json")),
    (
        "block-create.json",
        include_str!("schema/block-create.json"),
    ),
    (
        "block-export.json",
        include_str!("schema/block-export.json"),
    ),
    ("char.json", include_str!("schema/char.json")),
    ("control.json", include_str!("schema/control.json")),
    ("transaction.json", include_str!("schema/transaction.json")),
    ("qom.json", include_str!("schema/qom.json")),
    ("introspect.json", include_str!("schema/introspect.json")),
    ("bulkhead.json", include_str!("schema/bulkhead.json")),
];

/// A reference to a type: a named type or a list of a named type (`['Name']`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypeRef {
    /// `'Name'`
    Named(String),
    /// `['Name']`
    List(String),
}

impl TypeRef {
    /// The named type this refers to (the element type for a list).
    pub fn name(&self) -> &str {
        match self {
            TypeRef::Named(n) | TypeRef::List(n) => n,
        }
    }
}

/// A built-in scalar type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    /// `str`
    Str,
    /// `int8` .. `int64` (`int` is `int64`), with their range.
    Int {
        /// Smallest accepted value.
        min: i64,
        /// Largest accepted value.
        max: i64,
        /// The C type QEMU names in range errors (`int8_t`); empty for int64.
        c_name: &'static str,
    },
    /// `uint8` .. `uint64`, with their upper bound.
    Uint {
        /// Largest accepted value.
        max: u64,
        /// The C type QEMU names in range errors (`uint32_t`); empty for uint64.
        c_name: &'static str,
    },
    /// `size`: uint64 on QMP, `qemu_strtosz` on the command line.
    Size,
    /// `bool`
    Bool,
    /// `number`
    Number,
    /// `null`
    Null,
    /// `any`
    Any,
}

impl Builtin {
    pub(crate) fn from_name(name: &str) -> Option<Builtin> {
        Some(match name {
            "str" => Builtin::Str,
            "int" | "int64" => Builtin::Int {
                min: i64::MIN,
                max: i64::MAX,
                c_name: "",
            },
            "int8" => Builtin::Int {
                min: i8::MIN.into(),
                max: i8::MAX.into(),
                c_name: "int8_t",
            },
            "int16" => Builtin::Int {
                min: i16::MIN.into(),
                max: i16::MAX.into(),
                c_name: "int16_t",
            },
            "int32" => Builtin::Int {
                min: i32::MIN.into(),
                max: i32::MAX.into(),
                c_name: "int32_t",
            },
            "uint64" => Builtin::Uint {
                max: u64::MAX,
                c_name: "",
            },
            "uint8" => Builtin::Uint {
                max: u8::MAX.into(),
                c_name: "uint8_t",
            },
            "uint16" => Builtin::Uint {
                max: u16::MAX.into(),
                c_name: "uint16_t",
            },
            "uint32" => Builtin::Uint {
                max: u32::MAX.into(),
                c_name: "uint32_t",
            },
            "size" => Builtin::Size,
            "bool" => Builtin::Bool,
            "number" => Builtin::Number,
            "null" => Builtin::Null,
            "any" => Builtin::Any,
            _ => return None,
        })
    }
}

/// A member of a struct or of a union's base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The wire name, without the `*` that marks it optional.
    pub name: String,
    /// Whether the member may be absent.
    pub optional: bool,
    /// Its type.
    pub ty: TypeRef,
    /// Feature flags (`deprecated`, `unstable`), for introspection.
    pub features: Vec<String>,
}

/// The variant part of a (flat) union.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnionVariants {
    /// The base member whose enum value selects the variant.
    pub discriminator: String,
    /// `(discriminator value, struct type)`; values without an entry have no members.
    pub variants: Vec<(String, String)>,
}

/// A struct or a union (QAPI's object types).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectDef {
    /// Type name (generated for anonymous types).
    pub name: String,
    /// Base struct whose members come first.
    pub base: Option<String>,
    /// Own members, in schema order.
    pub members: Vec<Member>,
    /// Present for unions.
    pub union: Option<UnionVariants>,
    /// Feature flags, for introspection.
    pub features: Vec<String>,
}

/// An enum type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnumDef {
    /// Type name.
    pub name: String,
    /// Accepted values, in schema order.
    pub values: Vec<String>,
    /// Each value's feature flags, parallel to `values`, for introspection.
    pub value_features: Vec<Vec<String>>,
    /// Feature flags of the type, for introspection.
    pub features: Vec<String>,
}

/// An alternate: one of several types, chosen by the JSON type of the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlternateDef {
    /// Type name (QEMU names it in type errors: `expected: BlockdevRef`).
    pub name: String,
    /// `(branch name, type)` in schema order.
    pub branches: Vec<(String, TypeRef)>,
    /// Feature flags, for introspection.
    pub features: Vec<String>,
}

/// Any named type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypeDef {
    /// A built-in scalar.
    Builtin(Builtin),
    /// An enum.
    Enum(EnumDef),
    /// A struct or union.
    Object(ObjectDef),
    /// An alternate.
    Alternate(AlternateDef),
}

/// A QMP command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandDef {
    /// Command name as executed.
    pub name: String,
    /// The object type its arguments are visited as; None when it takes none.
    pub arg_type: Option<String>,
    /// `'boxed': true` (the handler gets the whole argument type).
    pub boxed: bool,
    /// Return type, if declared.
    pub returns: Option<TypeRef>,
    /// Feature flags (`deprecated`, `unstable`, ...).
    pub features: Vec<String>,
}

/// A QMP event (only introspection reads these).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventDef {
    /// Event name as emitted.
    pub name: String,
    /// The object type of its `data`; None when it has none.
    pub arg_type: Option<String>,
    /// Feature flags.
    pub features: Vec<String>,
}

/// A command or an event, in definition order (introspection lists them so).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Entity {
    /// Index into `SchemaData::commands`.
    Command(usize),
    /// Index into `SchemaData::events`.
    Event(usize),
}

/// A problem in the embedded schema text (a bug in bulkhead, caught by unit tests).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    /// The preprocessed text is not a sequence of JSON objects.
    #[error("{file}: not valid QAPI JSON: {reason}")]
    Syntax {
        /// Schema file.
        file: &'static str,
        /// serde_json's message.
        reason: String,
    },
    /// A definition has a shape this loader does not understand.
    #[error("{file}: bad definition {what}")]
    BadDefinition {
        /// Schema file.
        file: &'static str,
        /// What was wrong.
        what: String,
    },
    /// Two definitions share a name.
    #[error("duplicate definition of '{0}'")]
    Duplicate(String),
    /// A referenced type is not defined.
    #[error("'{user}' refers to undefined type '{missing}'")]
    Undefined {
        /// The referring definition.
        user: String,
        /// The missing name.
        missing: String,
    },
    /// A union or alternate is malformed (discriminator, variant or branch).
    #[error("'{0}' is malformed: {1}")]
    Malformed(String, String),
}

/// The whole schema, resolved.
#[derive(Debug, Clone)]
pub(crate) struct SchemaData {
    pub(crate) types: HashMap<String, TypeDef>,
    pub(crate) commands: Vec<CommandDef>,
    pub(crate) command_index: HashMap<String, usize>,
    pub(crate) events: Vec<EventDef>,
    pub(crate) event_index: HashMap<String, usize>,
    /// Commands and events in definition order.
    pub(crate) entities: Vec<Entity>,
}

/// Turns QAPI syntax into JSON: drops `#` comments and turns `'` into `"` (QAPI
/// strings never contain either quote character).
pub(crate) fn preprocess(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut in_comment = false;
    for c in text.chars() {
        if in_comment {
            if c == '\n' {
                in_comment = false;
                out.push('\n');
            }
            continue;
        }
        match c {
            '#' if !in_string => in_comment = true,
            '\'' => {
                in_string = !in_string;
                out.push('"');
            }
            _ => out.push(c),
        }
    }
    out
}

fn bad(file: &'static str, what: impl Into<String>) -> SchemaError {
    SchemaError::BadDefinition {
        file,
        what: what.into(),
    }
}

fn parse_typeref(file: &'static str, v: &Value) -> Result<TypeRef, SchemaError> {
    match v {
        Value::String(s) => Ok(TypeRef::Named(s.clone())),
        Value::Array(a) => match a.as_slice() {
            [Value::String(s)] => Ok(TypeRef::List(s.clone())),
            _ => Err(bad(file, format!("list type {v}"))),
        },
        Value::Object(o) => match o.get("type") {
            Some(t) => parse_typeref(file, t),
            None => Err(bad(file, format!("member without type {v}"))),
        },
        _ => Err(bad(file, format!("type {v}"))),
    }
}

fn parse_members(
    file: &'static str,
    data: &Map<String, Value>,
) -> Result<Vec<Member>, SchemaError> {
    data.iter()
        .map(|(key, ty)| {
            let (name, optional) = match key.strip_prefix('*') {
                Some(n) => (n.to_owned(), true),
                None => (key.clone(), false),
            };
            let features = match ty {
                Value::Object(o) => parse_features(file, o)?,
                _ => Vec::new(),
            };
            Ok(Member {
                name,
                optional,
                ty: parse_typeref(file, ty)?,
                features,
            })
        })
        .collect()
}

/// A definition's `'features'`: names, or `{ 'name': ... }` (conditions are not
/// kept: the files hold what qsd's build has).
fn parse_features(
    file: &'static str,
    def: &Map<String, Value>,
) -> Result<Vec<String>, SchemaError> {
    let Some(list) = def.get("features") else {
        return Ok(Vec::new());
    };
    list.as_array()
        .ok_or_else(|| bad(file, format!("features {list}")))?
        .iter()
        .map(|f| match f {
            Value::String(s) => Ok(s.clone()),
            Value::Object(o) => Ok(str_field(file, o, "name")?.to_owned()),
            _ => Err(bad(file, format!("feature {f}"))),
        })
        .collect()
}

fn str_field<'a>(
    file: &'static str,
    def: &'a Map<String, Value>,
    key: &str,
) -> Result<&'a str, SchemaError> {
    def.get(key).and_then(Value::as_str).ok_or_else(|| {
        bad(
            file,
            format!("'{key}' missing in {}", Value::Object(def.clone())),
        )
    })
}

impl SchemaData {
    fn add_type(&mut self, name: String, def: TypeDef) -> Result<(), SchemaError> {
        if self.types.insert(name.clone(), def).is_some() {
            return Err(SchemaError::Duplicate(name));
        }
        Ok(())
    }

    /// Either a type name or an inline member dict, which becomes `generated`.
    fn object_ref(
        &mut self,
        file: &'static str,
        v: &Value,
        generated: String,
    ) -> Result<String, SchemaError> {
        match v {
            Value::String(s) => Ok(s.clone()),
            Value::Object(data) => {
                let members = parse_members(file, data)?;
                self.add_type(
                    generated.clone(),
                    TypeDef::Object(ObjectDef {
                        name: generated.clone(),
                        base: None,
                        members,
                        union: None,
                        features: Vec::new(),
                    }),
                )?;
                Ok(generated)
            }
            _ => Err(bad(file, format!("object reference {v}"))),
        }
    }

    fn add_definition(
        &mut self,
        file: &'static str,
        def: &Map<String, Value>,
    ) -> Result<(), SchemaError> {
        let empty = Map::new();
        let features = parse_features(file, def)?;
        if let Some(name) = def.get("struct").and_then(Value::as_str) {
            let data = def.get("data").and_then(Value::as_object).unwrap_or(&empty);
            let base = def
                .get("base")
                .map(|b| self.object_ref(file, b, format!("q_obj_{name}-base")))
                .transpose()?;
            let members = parse_members(file, data)?;
            self.add_type(
                name.to_owned(),
                TypeDef::Object(ObjectDef {
                    name: name.to_owned(),
                    base,
                    members,
                    union: None,
                    features,
                }),
            )
        } else if let Some(name) = def.get("union").and_then(Value::as_str) {
            let base_v = def
                .get("base")
                .ok_or_else(|| bad(file, format!("union {name} without base")))?;
            let base = self.object_ref(file, base_v, format!("q_obj_{name}-base"))?;
            let discriminator = str_field(file, def, "discriminator")?.to_owned();
            let data = def.get("data").and_then(Value::as_object).unwrap_or(&empty);
            let variants = data
                .iter()
                .map(|(k, v)| Ok((k.clone(), parse_typeref(file, v)?.name().to_owned())))
                .collect::<Result<Vec<_>, SchemaError>>()?;
            self.add_type(
                name.to_owned(),
                TypeDef::Object(ObjectDef {
                    name: name.to_owned(),
                    base: Some(base),
                    members: Vec::new(),
                    union: Some(UnionVariants {
                        discriminator,
                        variants,
                    }),
                    features,
                }),
            )
        } else if let Some(name) = def.get("enum").and_then(Value::as_str) {
            let (values, value_features) = def
                .get("data")
                .and_then(Value::as_array)
                .ok_or_else(|| bad(file, format!("enum {name} without data")))?
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok((s.clone(), Vec::new())),
                    Value::Object(o) => Ok((
                        str_field(file, o, "name")?.to_owned(),
                        parse_features(file, o)?,
                    )),
                    _ => Err(bad(file, format!("enum {name} value {v}"))),
                })
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .unzip();
            self.add_type(
                name.to_owned(),
                TypeDef::Enum(EnumDef {
                    name: name.to_owned(),
                    values,
                    value_features,
                    features,
                }),
            )
        } else if let Some(name) = def.get("alternate").and_then(Value::as_str) {
            let data = def
                .get("data")
                .and_then(Value::as_object)
                .ok_or_else(|| bad(file, format!("alternate {name} without data")))?;
            let branches = data
                .iter()
                .map(|(k, v)| Ok((k.clone(), parse_typeref(file, v)?)))
                .collect::<Result<Vec<_>, SchemaError>>()?;
            self.add_type(
                name.to_owned(),
                TypeDef::Alternate(AlternateDef {
                    name: name.to_owned(),
                    branches,
                    features,
                }),
            )
        } else if let Some(name) = def.get("command").and_then(Value::as_str) {
            let arg_type = def
                .get("data")
                .map(|d| self.object_ref(file, d, format!("q_obj_{name}-arg")))
                .transpose()?;
            let returns = def
                .get("returns")
                .map(|r| parse_typeref(file, r))
                .transpose()?;
            if self.command_index.contains_key(name) {
                return Err(SchemaError::Duplicate(name.to_owned()));
            }
            self.command_index
                .insert(name.to_owned(), self.commands.len());
            self.entities.push(Entity::Command(self.commands.len()));
            self.commands.push(CommandDef {
                name: name.to_owned(),
                arg_type,
                boxed: def.get("boxed").and_then(Value::as_bool).unwrap_or(false),
                returns,
                features,
            });
            Ok(())
        } else if let Some(name) = def.get("event").and_then(Value::as_str) {
            let arg_type = def
                .get("data")
                .map(|d| self.object_ref(file, d, format!("q_obj_{name}-arg")))
                .transpose()?;
            if self.event_index.contains_key(name) {
                return Err(SchemaError::Duplicate(name.to_owned()));
            }
            self.event_index.insert(name.to_owned(), self.events.len());
            self.entities.push(Entity::Event(self.events.len()));
            self.events.push(EventDef {
                name: name.to_owned(),
                arg_type,
                features,
            });
            Ok(())
        } else if def.contains_key("include") || def.contains_key("pragma") {
            Ok(())
        } else {
            Err(bad(
                file,
                format!("unknown definition {}", Value::Object(def.clone())),
            ))
        }
    }

    /// Parses and resolves the given files, checking every reference.
    pub(crate) fn load(files: &[(&'static str, &str)]) -> Result<SchemaData, SchemaError> {
        let mut data = SchemaData {
            types: HashMap::new(),
            commands: Vec::new(),
            command_index: HashMap::new(),
            events: Vec::new(),
            event_index: HashMap::new(),
            entities: Vec::new(),
        };
        for name in [
            "str", "int", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
            "size", "bool", "number", "null", "any",
        ] {
            if let Some(b) = Builtin::from_name(name) {
                data.add_type(name.to_owned(), TypeDef::Builtin(b))?;
            }
        }
        for (file, text) in files {
            let json = preprocess(text);
            for def in serde_json::Deserializer::from_str(&json).into_iter::<Value>() {
                let def = def.map_err(|e| SchemaError::Syntax {
                    file,
                    reason: e.to_string(),
                })?;
                let obj = def
                    .as_object()
                    .ok_or_else(|| bad(file, format!("top level {def}")))?;
                data.add_definition(file, obj)?;
            }
        }
        data.validate()?;
        Ok(data)
    }

    fn require(&self, user: &str, name: &str) -> Result<&TypeDef, SchemaError> {
        self.types.get(name).ok_or_else(|| SchemaError::Undefined {
            user: user.to_owned(),
            missing: name.to_owned(),
        })
    }

    fn require_object(&self, user: &str, name: &str) -> Result<&ObjectDef, SchemaError> {
        match self.require(user, name)? {
            TypeDef::Object(o) => Ok(o),
            _ => Err(SchemaError::Malformed(
                user.to_owned(),
                format!("'{name}' is not an object type"),
            )),
        }
    }

    /// All members an object contributes before its variants: base first.
    pub(crate) fn all_members<'s>(&'s self, obj: &'s ObjectDef, out: &mut Vec<&'s Member>) {
        if let Some(base) = obj.base.as_deref()
            && let Some(TypeDef::Object(b)) = self.types.get(base)
        {
            self.all_members(b, out);
        }
        out.extend(obj.members.iter());
    }

    fn validate(&self) -> Result<(), SchemaError> {
        for def in self.types.values() {
            match def {
                TypeDef::Builtin(_) | TypeDef::Enum(_) => {}
                TypeDef::Object(o) => {
                    if let Some(base) = &o.base {
                        self.require_object(&o.name, base)?;
                    }
                    for m in &o.members {
                        self.require(&o.name, m.ty.name())?;
                    }
                    if let Some(u) = &o.union {
                        let mut members = Vec::new();
                        self.all_members(o, &mut members);
                        let disc = members
                            .iter()
                            .find(|m| m.name == u.discriminator)
                            .ok_or_else(|| {
                                SchemaError::Malformed(
                                    o.name.clone(),
                                    "no discriminator member".into(),
                                )
                            })?;
                        let TypeDef::Enum(e) = self.require(&o.name, disc.ty.name())? else {
                            return Err(SchemaError::Malformed(
                                o.name.clone(),
                                "discriminator is not an enum".into(),
                            ));
                        };
                        for (value, ty) in &u.variants {
                            if !e.values.contains(value) {
                                return Err(SchemaError::Malformed(
                                    o.name.clone(),
                                    format!("variant '{value}'"),
                                ));
                            }
                            self.require_object(&o.name, ty)?;
                        }
                    }
                }
                TypeDef::Alternate(a) => {
                    for (_, ty) in &a.branches {
                        if let TypeRef::List(_) = ty {
                            return Err(SchemaError::Malformed(
                                a.name.clone(),
                                "list branch".into(),
                            ));
                        }
                        self.require(&a.name, ty.name())?;
                    }
                }
            }
        }
        for c in &self.commands {
            if let Some(arg) = &c.arg_type {
                self.require_object(&c.name, arg)?;
            }
            if let Some(r) = &c.returns {
                self.require(&c.name, r.name())?;
            }
        }
        for e in &self.events {
            if let Some(arg) = &e.arg_type {
                self.require_object(&e.name, arg)?;
            }
        }
        Ok(())
    }
}
