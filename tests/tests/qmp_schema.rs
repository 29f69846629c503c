//! `query-qmp-schema` against qemu-storage-daemon 10.0.2: for every command bulkhead
//! implements (its own `x-bulkhead-*` excepted) and every event it can emit, the argument,
//! return and event data types must have the same structure as qsd's, recursively
//! (members, optionality, enum values, variants, alternates, arrays, features). Type
//! numbers differ (bulkhead lists fewer entities), so names are resolved on each side.
//!
//! Also: both replies follow QEMU's generator (entities first, then types in order of first
//! use, numbered in that order), and `query-commands` lists the same commands.

use std::collections::{HashMap, HashSet};

use bulkhead_systests::{Daemon, DaemonKind, HarnessError};
use serde_json::{Value, json};

/// One `query-qmp-schema` reply, indexed by entry name.
struct Introspection {
    entries: Vec<Value>,
    by_name: HashMap<String, Value>,
}

impl Introspection {
    fn new(reply: Value) -> Introspection {
        let entries = match reply {
            Value::Array(entries) => entries,
            other => panic!("query-qmp-schema did not return a list: {other}"),
        };
        let mut by_name = HashMap::new();
        for e in &entries {
            let name = str_of(e, "name");
            assert!(
                by_name.insert(name.clone(), e.clone()).is_none(),
                "{name} is listed twice"
            );
        }
        Introspection { entries, by_name }
    }

    fn get(&self, name: &str) -> Option<&Value> {
        self.by_name.get(name)
    }

    fn names_of(&self, meta: &str) -> Vec<String> {
        self.entries
            .iter()
            .filter(|e| e["meta-type"] == meta)
            .map(|e| str_of(e, "name"))
            .collect()
    }
}

fn str_of(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("{v} has no string {key:?}"))
}

fn list_of<'v>(v: &'v Value, key: &str) -> &'v [Value] {
    v.get(key)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn features(v: &Value) -> Value {
    v.get("features").cloned().unwrap_or(json!([]))
}

fn fetch(kind: DaemonKind) -> Result<(Introspection, Vec<String>), HarnessError> {
    let daemon = Daemon::start(kind, 1, &[])?;
    let mut qmp = daemon.qmp(0)?;
    let schema = Introspection::new(qmp.execute_ok("query-qmp-schema", None)?);
    let commands = qmp
        .execute_ok("query-commands", None)?
        .as_array()
        .map(|l| l.iter().map(|c| str_of(c, "name")).collect())
        .unwrap_or_default();
    Ok((schema, commands))
}

/// Structural comparison of a type on both sides; mismatches are collected with the path
/// that reached them. A pair already being compared counts as equal (recursive types).
struct Comparer<'a> {
    ours: &'a Introspection,
    qsd: &'a Introspection,
    seen: HashSet<(String, String)>,
    errors: Vec<String>,
}

impl Comparer<'_> {
    fn fail(&mut self, path: &str, what: String) {
        self.errors.push(format!("{path}: {what}"));
    }

    fn compare(&mut self, path: &str, ours: &str, qsd: &str) {
        if !self.seen.insert((ours.to_owned(), qsd.to_owned())) {
            return;
        }
        let (Some(a), Some(b)) = (self.ours.get(ours), self.qsd.get(qsd)) else {
            self.fail(path, format!("type {ours} / {qsd} is not listed"));
            return;
        };
        let (a, b) = (a.clone(), b.clone());
        let meta = str_of(&a, "meta-type");
        if a["meta-type"] != b["meta-type"] {
            self.fail(path, format!("{meta} vs qsd's {}", b["meta-type"]));
            return;
        }
        if features(&a) != features(&b) {
            self.fail(
                path,
                format!("features {} vs {}", features(&a), features(&b)),
            );
        }
        match meta.as_str() {
            "builtin" => {
                if ours != qsd || a["json-type"] != b["json-type"] {
                    self.fail(path, format!("builtin {ours} vs {qsd}"));
                }
            }
            "array" => {
                let (ea, eb) = (str_of(&a, "element-type"), str_of(&b, "element-type"));
                self.compare(&format!("{path}[]"), &ea, &eb);
            }
            "enum" => {
                if a["values"] != b["values"] || a["members"] != b["members"] {
                    self.fail(
                        path,
                        format!("enum members {} vs {}", a["members"], b["members"]),
                    );
                }
            }
            "alternate" => {
                let (ma, mb) = (list_of(&a, "members"), list_of(&b, "members"));
                if ma.len() != mb.len() {
                    self.fail(
                        path,
                        format!("alternate {} vs {} branches", ma.len(), mb.len()),
                    );
                    return;
                }
                for (i, (x, y)) in ma.iter().zip(mb).enumerate() {
                    self.compare(
                        &format!("{path}|{i}"),
                        &str_of(x, "type"),
                        &str_of(y, "type"),
                    );
                }
            }
            "object" => self.compare_object(path, &a, &b),
            other => self.fail(path, format!("unexpected meta-type {other}")),
        }
    }

    fn compare_object(&mut self, path: &str, a: &Value, b: &Value) {
        let shape = |v: &Value| -> Value {
            list_of(v, "members")
                .iter()
                .map(|m| json!([m["name"], m.get("default").is_some(), features(m)]))
                .collect()
        };
        if shape(a) != shape(b) {
            self.fail(
                path,
                format!(
                    "members [name, optional, features]\n  ours {}\n  qsd  {}",
                    shape(a),
                    shape(b)
                ),
            );
            return;
        }
        for (x, y) in list_of(a, "members").iter().zip(list_of(b, "members")) {
            if let Some(default) = x.get("default").filter(|d| !d.is_null()) {
                self.fail(path, format!("default {default} (QEMU only prints null)"));
            }
            let name = str_of(x, "name");
            self.compare(
                &format!("{path}.{name}"),
                &str_of(x, "type"),
                &str_of(y, "type"),
            );
        }
        if a.get("tag") != b.get("tag") {
            self.fail(
                path,
                format!("tag {:?} vs {:?}", a.get("tag"), b.get("tag")),
            );
            return;
        }
        let cases = |v: &Value| -> Vec<String> {
            list_of(v, "variants")
                .iter()
                .map(|c| str_of(c, "case"))
                .collect()
        };
        if cases(a) != cases(b) {
            self.fail(path, format!("variants {:?} vs {:?}", cases(a), cases(b)));
            return;
        }
        for (x, y) in list_of(a, "variants").iter().zip(list_of(b, "variants")) {
            let case = str_of(x, "case");
            self.compare(
                &format!("{path}/{case}"),
                &str_of(x, "type"),
                &str_of(y, "type"),
            );
        }
    }
}

/// Checks that `schema` is laid out as QEMU's introspect.py lays it out: commands and
/// events, then each type in the order it was first used (walking entities, then the
/// types themselves as they are listed), masked names numbered in that order. `dense`:
/// numbers are exactly 0, 1, 2, ... (qsd skips numbers of types its build leaves out).
fn check_qemu_layout(who: &str, schema: &Introspection, dense: bool) {
    let mut used: Vec<String> = Vec::new();
    // An array is first used just before its element.
    let use_type = |t: &str, used: &mut Vec<String>| {
        let element = t.strip_prefix('[').and_then(|t| t.strip_suffix(']'));
        for t in std::iter::once(t).chain(element) {
            if !used.iter().any(|u| u == t) {
                used.push(t.to_owned());
            }
        }
    };
    let mut order = Vec::new();
    let entities = schema
        .entries
        .iter()
        .take_while(|e| matches!(e["meta-type"].as_str(), Some("command" | "event")));
    for e in entities {
        order.push(str_of(e, "name"));
        use_type(&str_of(e, "arg-type"), &mut used);
        if e.get("ret-type").is_some() {
            use_type(&str_of(e, "ret-type"), &mut used);
        }
    }
    let mut i = 0;
    while let Some(t) = used.get(i).cloned() {
        i += 1;
        order.push(t.clone());
        let Some(e) = schema.get(&t) else {
            panic!("{who}: {t} is used but not listed");
        };
        if let Some(element) = e.get("element-type").and_then(Value::as_str) {
            use_type(element, &mut used);
        }
        for m in list_of(e, "members").iter().chain(list_of(e, "variants")) {
            if let Some(t) = m.get("type").and_then(Value::as_str) {
                use_type(t, &mut used);
            }
        }
    }
    let listed: Vec<String> = schema.entries.iter().map(|e| str_of(e, "name")).collect();
    assert_eq!(order, listed, "{who}: entries are not in QEMU's order");
    let numbers: Vec<usize> = listed.iter().filter_map(|n| n.parse().ok()).collect();
    if dense {
        assert_eq!(
            numbers,
            (0..numbers.len()).collect::<Vec<_>>(),
            "{who}: numbering"
        );
    } else {
        assert!(numbers.windows(2).all(|w| w[0] < w[1]), "{who}: numbering");
    }
}

#[test]
fn implemented_commands_and_events_have_qsds_types() {
    let (qsd, _) = match fetch(DaemonKind::Qsd) {
        Ok(s) => s,
        Err(e) => panic!("qsd: {e}"),
    };
    let (ours, commands) = match fetch(DaemonKind::Bulkhead) {
        Ok(s) => s,
        Err(e) => panic!("bulkhead: {e}"),
    };

    // The same algorithm as QEMU's generator; qsd's own reply proves the check.
    check_qemu_layout("qsd", &qsd, false);
    check_qemu_layout("bulkhead", &ours, true);

    // query-commands and query-qmp-schema agree on the command set.
    let mut listed = ours.names_of("command");
    listed.sort();
    let mut queried = commands.clone();
    queried.sort();
    assert_eq!(listed, queried, "query-qmp-schema vs query-commands");
    for must in [
        "query-qmp-schema",
        "query-commands",
        "blockdev-add",
        "block-export-add",
    ] {
        assert!(listed.iter().any(|c| c == must), "{must} is not listed");
    }
    assert!(
        ours.names_of("event")
            .contains(&"BLOCK_EXPORT_DELETED".to_owned()),
        "BLOCK_EXPORT_DELETED is not listed"
    );

    let mut cmp = Comparer {
        ours: &ours,
        qsd: &qsd,
        seen: HashSet::new(),
        errors: Vec::new(),
    };
    let mut compared = 0;
    for meta in ["command", "event"] {
        for name in ours.names_of(meta) {
            if name.starts_with("x-bulkhead-") {
                continue;
            }
            let (Some(a), Some(b)) = (ours.get(&name), qsd.get(&name)) else {
                cmp.fail(&name, "not in qsd's schema".into());
                continue;
            };
            let (a, b) = (a.clone(), b.clone());
            if a["meta-type"] != b["meta-type"] || features(&a) != features(&b) {
                cmp.fail(&name, format!("{a} vs qsd's {b}"));
            }
            if a.get("allow-oob") != b.get("allow-oob") {
                cmp.fail(&name, "allow-oob differs".into());
            }
            cmp.compare(
                &format!("{name}(args)"),
                &str_of(&a, "arg-type"),
                &str_of(&b, "arg-type"),
            );
            if meta == "command" {
                cmp.compare(
                    &format!("{name}(returns)"),
                    &str_of(&a, "ret-type"),
                    &str_of(&b, "ret-type"),
                );
            }
            compared += 1;
        }
    }
    assert!(
        cmp.errors.is_empty(),
        "{} mismatches with qsd:\n{}",
        cmp.errors.len(),
        cmp.errors.join("\n")
    );
    assert!(compared >= 18, "only {compared} entities compared");

    // Type identity: one of our types stands for exactly one of qsd's and back, so a type
    // QEMU defines once is not split in two (or two merged into one).
    let mut ours_to_qsd: HashMap<&str, HashSet<&str>> = HashMap::new();
    let mut qsd_to_ours: HashMap<&str, HashSet<&str>> = HashMap::new();
    for (a, b) in &cmp.seen {
        ours_to_qsd.entry(a).or_default().insert(b);
        qsd_to_ours.entry(b).or_default().insert(a);
    }
    let split: Vec<String> = ours_to_qsd
        .iter()
        .map(|(a, bs)| (format!("ours {a}"), bs))
        .chain(
            qsd_to_ours
                .iter()
                .map(|(b, as_)| (format!("qsd's {b}"), as_)),
        )
        .filter(|(_, other)| other.len() > 1)
        .map(|(who, other)| format!("{who} stands for {other:?}"))
        .collect();
    assert!(
        split.is_empty(),
        "type identity differs:\n{}",
        split.join("\n")
    );
}

#[test]
fn bulkheads_own_command_is_listed_as_unstable_with_its_return_type() {
    let (ours, _) = match fetch(DaemonKind::Bulkhead) {
        Ok(s) => s,
        Err(e) => panic!("bulkhead: {e}"),
    };
    let Some(cmd) = ours.get("x-bulkhead-query-workers") else {
        panic!("x-bulkhead-query-workers is not listed");
    };
    assert_eq!(cmd["features"], json!(["unstable"]));
    let ret = str_of(cmd, "ret-type");
    let element = ret
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .and_then(|e| ours.get(e));
    let members: Vec<(String, String)> = element
        .map(|e| {
            list_of(e, "members")
                .iter()
                .map(|m| (str_of(m, "name"), str_of(m, "type")))
                .collect()
        })
        .unwrap_or_default();
    let expected = [
        ("id", "int"),
        ("kind", "str"),
        ("role", "str"),
        ("pid", "int"),
        ("generation", "int"),
        ("restarts", "int"),
        ("nodes", "[str]"),
        ("exports", "[str]"),
        ("mapped", "[str]"),
        ("reaches", "[int]"),
        ("sandbox", "[str]"),
    ];
    assert_eq!(
        members,
        expected.map(|(n, t)| (n.to_owned(), t.to_owned())),
        "{cmd}"
    );
    // The graph test hooks (this binary is a test-hooks build) are unstable too.
    for hook in [
        "x-bulkhead-replace-node",
        "x-bulkhead-insert-filter",
        "x-bulkhead-remove-filter",
    ] {
        let Some(cmd) = ours.get(hook) else {
            panic!("{hook} is not listed");
        };
        assert_eq!(cmd["features"], json!(["unstable"]), "{hook}");
    }
}

/// Checks `value` against the introspected type `ty`, collecting mismatches.
fn conforms(schema: &Introspection, ty: &str, value: &Value, path: &str, errors: &mut Vec<String>) {
    let Some(def) = schema.get(ty) else {
        errors.push(format!("{path}: type {ty} is not listed"));
        return;
    };
    let ok = match str_of(def, "meta-type").as_str() {
        "builtin" => match ty {
            "str" => value.is_string(),
            "int" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "bool" => value.is_boolean(),
            "null" => value.is_null(),
            _ => true,
        },
        "enum" => list_of(def, "values").contains(value),
        "array" => match value.as_array() {
            Some(items) => {
                let element = str_of(def, "element-type");
                for (i, item) in items.iter().enumerate() {
                    conforms(schema, &element, item, &format!("{path}[{i}]"), errors);
                }
                true
            }
            None => false,
        },
        "alternate" => list_of(def, "members").iter().any(|m| {
            let mut branch = Vec::new();
            conforms(schema, &str_of(m, "type"), value, path, &mut branch);
            branch.is_empty()
        }),
        "object" => match value.as_object() {
            Some(object) => {
                let mut members: Vec<Value> = list_of(def, "members").to_vec();
                if let Some(tag) = def.get("tag").and_then(Value::as_str) {
                    let variant = list_of(def, "variants")
                        .iter()
                        .find(|v| Some(&v["case"]) == object.get(tag))
                        .and_then(|v| schema.get(&str_of(v, "type")));
                    match variant {
                        Some(v) => members.extend(list_of(v, "members").iter().cloned()),
                        None => errors.push(format!("{path}: no variant for {tag}")),
                    }
                }
                for m in &members {
                    let name = str_of(m, "name");
                    match object.get(&name) {
                        Some(v) => conforms(
                            schema,
                            &str_of(m, "type"),
                            v,
                            &format!("{path}.{name}"),
                            errors,
                        ),
                        None if m.get("default").is_some() => {}
                        None => errors.push(format!("{path}: {name} is missing")),
                    }
                }
                for key in object.keys() {
                    if !members.iter().any(|m| m["name"] == *key) {
                        errors.push(format!("{path}: {key} is not in the schema"));
                    }
                }
                true
            }
            None => false,
        },
        _ => false,
    };
    if !ok {
        errors.push(format!("{path}: {value} is not a {ty} ({def})"));
    }
}

/// What `kind` returns for the query commands (and the event of an export's deletion)
/// fits the types its own `query-qmp-schema` declares. Run on qsd too, which proves the
/// check.
fn replies_fit_the_declared_types(kind: DaemonKind) -> Result<Vec<String>, HarnessError> {
    let daemon = Daemon::start(
        kind,
        1,
        &[
            "--blockdev",
            "driver=null-co,node-name=null0,size=1048576",
            "--nbd-server",
            "addr.type=unix,addr.path=$DIR/nbd.sock",
            "--export",
            "type=nbd,id=e0,node-name=null0",
        ],
    )?;
    let mut qmp = daemon.qmp(0)?;
    let schema = Introspection::new(qmp.execute_ok("query-qmp-schema", None)?);
    let mut errors = Vec::new();
    let mut queries = vec![
        "query-qmp-schema",
        "query-version",
        "query-commands",
        "query-named-block-nodes",
        "query-block",
        "x-debug-query-block-graph",
        "query-block-exports",
    ];
    if kind == DaemonKind::Bulkhead {
        queries.push("x-bulkhead-query-workers");
    }
    for command in queries {
        let value = qmp.execute_ok(command, None)?;
        let Some(ret) = schema.get(command).map(|c| str_of(c, "ret-type")) else {
            errors.push(format!("{command} is not listed"));
            continue;
        };
        conforms(&schema, &ret, &value, command, &mut errors);
    }
    qmp.execute_ok("block-export-del", Some(json!({"id": "e0"})))?;
    let mut events = qmp.take_events();
    while events.is_empty() {
        let message = qmp.read_message()?;
        events.push(message);
    }
    let deleted = events.iter().find(|e| e["event"] == "BLOCK_EXPORT_DELETED");
    match (deleted, schema.get("BLOCK_EXPORT_DELETED")) {
        (Some(e), Some(def)) => conforms(
            &schema,
            &str_of(def, "arg-type"),
            &e["data"],
            "BLOCK_EXPORT_DELETED",
            &mut errors,
        ),
        other => errors.push(format!("BLOCK_EXPORT_DELETED: {other:?}")),
    }
    Ok(errors)
}

#[test]
fn replies_and_events_fit_the_types_query_qmp_schema_declares() {
    for kind in [DaemonKind::Qsd, DaemonKind::Bulkhead] {
        match replies_fit_the_declared_types(kind) {
            Ok(errors) => assert!(
                errors.is_empty(),
                "{}: {} replies do not fit:\n{}",
                kind.name(),
                errors.len(),
                errors.join("\n")
            ),
            Err(e) => panic!("{}: {e}", kind.name()),
        }
    }
}
