//! QEMU's qobject input visitor, driven by the schema instead of generated C.
//!
//! QEMU checks a command's arguments by walking the argument type with an input
//! visitor: members in schema order (base first, then the union variant the
//! discriminator selects), each one converted or rejected, and after each struct a
//! check for members nobody asked for. The first failure is the error the client sees.
//! This module does the same walk over a `serde_json::Value` and returns a normalized
//! value (typed JSON: integers as numbers, booleans as booleans, absent optionals
//! left out), which callers deserialize into the typed argument structs.
//!
//! Two flavours exist, as in QEMU: JSON (QMP and `--opt '{...}'`), where leaves must
//! already have the right JSON type, and keyval (the command line), where every leaf
//! is a string the visitor parses (`qemu_strtoi64`, `qemu_strtosz`, `on`/`off`).
//!
//! Error names follow QEMU: most errors name the full path (`file.filename`,
//! `options[0].driver`, `bitmaps.0` in keyval), while enum values, integer ranges and
//! alternates use the bare member name (`'null'` for list elements), because QEMU
//! formats those outside the visitor that tracks the path.
//!
//! Runs in the supervisor on arguments from QMP clients and the command line
//! (untrusted). Nothing here panics on input; depth is bounded by the JSON parser's
//! nesting limit and the schema.

use serde_json::{Map, Number, Value};

use super::QapiError;
use super::ghash::KeySet;
use super::schema::{AlternateDef, Builtin, EnumDef, ObjectDef, SchemaData, TypeDef, TypeRef};
use super::strtox;
use crate::qdict;

/// Where the input came from, which decides how leaves are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    /// JSON values with their own types (QMP, or a command-line option given as JSON).
    Json,
    /// QEMU keyval output: leaves are strings, lists are arrays.
    Keyval,
}

/// A container being visited, innermost last.
enum Frame<'s, 'v> {
    Dict {
        name: Option<&'s str>,
        map: &'v Map<String, Value>,
        unvisited: KeySet<&'v str>,
    },
    List {
        name: Option<&'s str>,
        items: &'v [Value],
        next: usize,
        /// Index of the element last taken, as QEMU's `unsigned` (starts at -1).
        index: u32,
    },
}

impl Frame<'_, '_> {
    fn name(&self) -> Option<&str> {
        match self {
            Frame::Dict { name, .. } | Frame::List { name, .. } => *name,
        }
    }
}

pub(crate) struct Visitor<'s, 'v> {
    schema: &'s SchemaData,
    flavour: Flavour,
    root: &'v Value,
    stack: Vec<Frame<'s, 'v>>,
}

type VResult = Result<Value, QapiError>;

/// Containers (objects and lists) the visitor descends into before giving up.
///
/// QEMU has no such limit (only its JSON parser's 1024), but every level costs this
/// recursive walk a few stack frames, and a 1000-deep `BlockdevRef` chain would
/// overflow a worker thread's stack. No real request nests anywhere near this deep
/// (a `blockdev-add` of a qcow2 over a file is 2 levels). Deviation from qsd.
pub(crate) const MAX_DEPTH: usize = 64;

/// Bare name for errors QEMU formats outside the visitor (`name ? name : "null"`).
fn bare(name: Option<&str>) -> String {
    name.unwrap_or("null").to_owned()
}

impl<'s, 'v> Visitor<'s, 'v> {
    pub(crate) fn new(schema: &'s SchemaData, flavour: Flavour, root: &'v Value) -> Self {
        Visitor {
            schema,
            flavour,
            root,
            stack: Vec::new(),
        }
    }

    /// The dotted path of `name` inside the containers being visited.
    fn full_name(&self, name: Option<&str>) -> String {
        let mut path = String::new();
        let mut name = name;
        for frame in self.stack.iter().rev() {
            match frame {
                Frame::Dict { .. } => {
                    path.insert_str(0, name.unwrap_or("<anonymous>"));
                    path.insert(0, '.');
                }
                Frame::List { index, .. } => {
                    let part = match self.flavour {
                        Flavour::Json => format!("[{index}]"),
                        Flavour::Keyval => format!(".{index}"),
                    };
                    path.insert_str(0, &part);
                }
            }
            name = frame.name();
        }
        if let Some(n) = name {
            path.insert_str(0, n);
        } else if path.starts_with('.') {
            path.remove(0);
        } else if path.is_empty() {
            return "<anonymous>".to_owned();
        }
        path
    }

    /// The value named `name` in the innermost container (or the root), marking it
    /// visited when `consume` is set.
    fn get(&mut self, name: Option<&str>, consume: bool) -> Option<&'v Value> {
        match self.stack.last_mut() {
            None => Some(self.root),
            Some(Frame::Dict { map, unvisited, .. }) => {
                let found = map.get(name?)?;
                if consume && let Some(n) = name {
                    unvisited.remove(n);
                }
                Some(found)
            }
            Some(Frame::List {
                items, next, index, ..
            }) => {
                let found = items.get(*next);
                if consume {
                    if found.is_some() {
                        *next += 1;
                    }
                    *index = index.wrapping_add(1);
                }
                found
            }
        }
    }

    fn get_required(&mut self, name: Option<&str>, consume: bool) -> Result<&'v Value, QapiError> {
        match self.get(name, consume) {
            Some(v) => Ok(v),
            None => Err(QapiError::Missing(self.full_name(name))),
        }
    }

    fn invalid_type(&self, name: Option<&str>, expected: &str) -> QapiError {
        QapiError::InvalidType {
            name: self.full_name(name),
            expected: expected.to_owned(),
        }
    }

    fn invalid_value(&self, name: Option<&str>, expected: &str) -> QapiError {
        QapiError::InvalidValue {
            name: self.full_name(name),
            expected: expected.to_owned(),
        }
    }

    /// A keyval leaf: must be a string.
    fn keyval_str(&mut self, name: Option<&str>) -> Result<&'v str, QapiError> {
        match self.get_required(name, true)? {
            Value::String(s) => Ok(s),
            Value::Object(_) | Value::Array(_) => {
                Err(QapiError::UnexpectedChildren(self.full_name(name)))
            }
            _ => Err(QapiError::KeyvalNotString(self.full_name(name))),
        }
    }

    pub(crate) fn visit(&mut self, ty: &'s TypeRef, name: Option<&'s str>) -> VResult {
        match ty {
            TypeRef::List(elem) => self.visit_list(elem, name),
            TypeRef::Named(n) => self.visit_named(n, name),
        }
    }

    fn lookup(&self, type_name: &str) -> Result<&'s TypeDef, QapiError> {
        self.schema
            .types
            .get(type_name)
            .ok_or_else(|| QapiError::UndefinedType(type_name.to_owned()))
    }

    pub(crate) fn visit_named(&mut self, type_name: &str, name: Option<&'s str>) -> VResult {
        match self.lookup(type_name)? {
            TypeDef::Builtin(b) => self.visit_builtin(*b, name),
            TypeDef::Enum(e) => self.visit_enum(e, name),
            TypeDef::Object(o) => self.visit_struct(o, name),
            TypeDef::Alternate(a) => self.visit_alternate(a, name),
        }
    }

    fn visit_list(&mut self, elem: &'s str, name: Option<&'s str>) -> VResult {
        let v = self.get_required(name, true)?;
        let Value::Array(items) = v else {
            return Err(self.invalid_type(name, "array"));
        };
        self.check_depth(name)?;
        self.stack.push(Frame::List {
            name,
            items,
            next: 0,
            index: u32::MAX,
        });
        let elem_ty = self.lookup(elem)?;
        let mut out = Vec::with_capacity(items.len());
        for _ in 0..items.len() {
            out.push(match elem_ty {
                TypeDef::Builtin(b) => self.visit_builtin(*b, None)?,
                TypeDef::Enum(e) => self.visit_enum(e, None)?,
                TypeDef::Object(o) => self.visit_struct(o, None)?,
                TypeDef::Alternate(a) => self.visit_alternate(a, None)?,
            });
        }
        self.stack.pop();
        Ok(Value::Array(out))
    }

    /// `visit_start_struct` + members + `visit_check_struct` + `visit_end_struct`.
    pub(crate) fn visit_struct(&mut self, def: &'s ObjectDef, name: Option<&'s str>) -> VResult {
        let v = self.get_required(name, true)?;
        let Value::Object(map) = v else {
            return Err(self.invalid_type(name, "object"));
        };
        self.check_depth(name)?;
        self.push_dict(name, map);
        let mut out = Map::new();
        self.visit_members(def, &mut out)?;
        self.check_struct()?;
        self.stack.pop();
        Ok(Value::Object(out))
    }

    fn check_depth(&self, name: Option<&str>) -> Result<(), QapiError> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(QapiError::TooDeep(self.full_name(name)));
        }
        Ok(())
    }

    fn push_dict(&mut self, name: Option<&'s str>, map: &'v Map<String, Value>) {
        // QEMU fills the table of unvisited keys by iterating the QDict, whose order
        // is its hash-bucket order, not the order the client wrote.
        let mut unvisited = KeySet::new();
        for (key, _) in qdict::iteration_order(map.iter()) {
            unvisited.insert(key.as_str());
        }
        self.stack.push(Frame::Dict {
            name,
            map,
            unvisited,
        });
    }

    fn check_struct(&self) -> Result<(), QapiError> {
        if let Some(Frame::Dict { unvisited, .. }) = self.stack.last()
            && let Some(key) = unvisited.first()
        {
            return Err(QapiError::Unexpected(self.full_name(Some(key))));
        }
        Ok(())
    }

    /// Base members, own members, then the members of the selected variant.
    fn visit_members(
        &mut self,
        def: &'s ObjectDef,
        out: &mut Map<String, Value>,
    ) -> Result<(), QapiError> {
        if let Some(base) = def.base.as_deref() {
            match self.lookup(base)? {
                TypeDef::Object(b) => self.visit_members(b, out)?,
                _ => return Err(QapiError::UndefinedType(base.to_owned())),
            }
        }
        for m in &def.members {
            if m.optional && self.get(Some(&m.name), false).is_none() {
                continue;
            }
            let v = self.visit(&m.ty, Some(&m.name))?;
            out.insert(m.name.clone(), v);
        }
        if let Some(u) = &def.union {
            let tag = out
                .get(&u.discriminator)
                .and_then(Value::as_str)
                .map(str::to_owned);
            if let Some(tag) = tag
                && let Some((_, variant)) = u.variants.iter().find(|(value, _)| *value == tag)
            {
                match self.lookup(variant)? {
                    TypeDef::Object(vdef) => self.visit_members(vdef, out)?,
                    _ => return Err(QapiError::UndefinedType(variant.clone())),
                }
            }
        }
        Ok(())
    }

    fn visit_enum(&mut self, def: &'s EnumDef, name: Option<&'s str>) -> VResult {
        let s = self.visit_str(name)?;
        if def.values.iter().any(|v| *v == s) {
            Ok(Value::String(s.to_owned()))
        } else {
            Err(QapiError::BadEnumValue {
                name: bare(name),
                value: s.to_owned(),
            })
        }
    }

    /// Picks the branch by the JSON type of the value, as the generated
    /// `visit_type_<Alternate>` switch on `qobject_type()` does.
    fn visit_alternate(&mut self, def: &'s AlternateDef, name: Option<&'s str>) -> VResult {
        let v = self.get_required(name, false)?;
        let branch = def.branches.iter().find(|(_, ty)| {
            let Some(td) = self.schema.types.get(ty.name()) else {
                return false;
            };
            matches!(
                (v, td),
                (Value::Object(_), TypeDef::Object(_))
                    | (
                        Value::String(_),
                        TypeDef::Builtin(Builtin::Str) | TypeDef::Enum(_)
                    )
                    | (
                        Value::Number(_),
                        TypeDef::Builtin(
                            Builtin::Int { .. }
                                | Builtin::Uint { .. }
                                | Builtin::Size
                                | Builtin::Number
                        )
                    )
                    | (Value::Bool(_), TypeDef::Builtin(Builtin::Bool))
                    | (Value::Null, TypeDef::Builtin(Builtin::Null))
            )
        });
        match branch {
            Some((_, ty)) => self.visit(ty, name),
            None => Err(QapiError::InvalidType {
                name: bare(name),
                expected: def.name.clone(),
            }),
        }
    }

    fn visit_str(&mut self, name: Option<&str>) -> Result<&'v str, QapiError> {
        match self.flavour {
            Flavour::Keyval => self.keyval_str(name),
            Flavour::Json => match self.get_required(name, true)? {
                Value::String(s) => Ok(s),
                _ => Err(self.invalid_type(name, "string")),
            },
        }
    }

    fn visit_int64(&mut self, name: Option<&str>) -> Result<i64, QapiError> {
        match self.flavour {
            Flavour::Keyval => {
                let s = self.keyval_str(name)?;
                strtox::strtoi64(s).ok_or_else(|| self.invalid_value(name, "integer"))
            }
            Flavour::Json => match self.get_required(name, true)?.as_i64() {
                Some(i) => Ok(i),
                None => Err(self.invalid_type(name, "integer")),
            },
        }
    }

    fn visit_uint64(&mut self, name: Option<&str>, size: bool) -> Result<u64, QapiError> {
        match self.flavour {
            Flavour::Keyval => {
                let s = self.keyval_str(name)?;
                if size {
                    strtox::strtosz(s).ok_or_else(|| self.invalid_value(name, "size"))
                } else {
                    strtox::strtou64(s).ok_or_else(|| self.invalid_value(name, "integer"))
                }
            }
            Flavour::Json => {
                let v = self.get_required(name, true)?;
                // QEMU accepts negative integers for uint64 "for backward
                // compatibility" and stores them modulo 2^64.
                match (v.as_u64(), v.as_i64()) {
                    (Some(u), _) => Ok(u),
                    (None, Some(i)) => Ok(i as u64),
                    (None, None) => Err(self.invalid_value(name, "uint64")),
                }
            }
        }
    }

    fn visit_builtin(&mut self, b: Builtin, name: Option<&'s str>) -> VResult {
        match b {
            Builtin::Str => Ok(Value::String(self.visit_str(name)?.to_owned())),
            Builtin::Int { min, max, c_name } => {
                let i = self.visit_int64(name)?;
                if i < min || i > max {
                    return Err(QapiError::InvalidValue {
                        name: bare(name),
                        expected: c_name.to_owned(),
                    });
                }
                Ok(Value::from(i))
            }
            Builtin::Uint { max, c_name } => {
                let u = self.visit_uint64(name, false)?;
                if u > max {
                    return Err(QapiError::InvalidValue {
                        name: bare(name),
                        expected: c_name.to_owned(),
                    });
                }
                Ok(Value::from(u))
            }
            Builtin::Size => Ok(Value::from(self.visit_uint64(name, true)?)),
            Builtin::Bool => match self.flavour {
                // qsd 10.0.2 parses keyval booleans with qapi_bool_parse, which
                // takes more than the "'on' or 'off'" its error text names.
                Flavour::Keyval => match self.keyval_str(name)? {
                    "on" | "yes" | "true" | "y" => Ok(Value::Bool(true)),
                    "off" | "no" | "false" | "n" => Ok(Value::Bool(false)),
                    _ => Err(self.invalid_value(name, "'on' or 'off'")),
                },
                Flavour::Json => match self.get_required(name, true)? {
                    Value::Bool(b) => Ok(Value::Bool(*b)),
                    _ => Err(self.invalid_type(name, "boolean")),
                },
            },
            Builtin::Number => match self.flavour {
                Flavour::Keyval => {
                    let s = self.keyval_str(name)?;
                    strtox::strtod_finite(s)
                        .and_then(Number::from_f64)
                        .map(Value::Number)
                        .ok_or_else(|| self.invalid_type(name, "number"))
                }
                Flavour::Json => match self.get_required(name, true)? {
                    Value::Number(n) => Ok(Value::Number(n.clone())),
                    _ => Err(self.invalid_type(name, "number")),
                },
            },
            Builtin::Null => match self.get_required(name, true)? {
                Value::Null => Ok(Value::Null),
                _ => Err(self.invalid_type(name, "null")),
            },
            Builtin::Any => Ok(self.get_required(name, true)?.clone()),
        }
    }
}
