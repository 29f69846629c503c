//! Temporary stand-in until the envelope checks land.
use serde_json::{Map, Value};

/// QMP error classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// GenericError.
    GenericError,
    /// CommandNotFound.
    CommandNotFound,
    /// DeviceNotActive.
    DeviceNotActive,
    /// DeviceNotFound.
    DeviceNotFound,
    /// KVMMissingCap.
    KVMMissingCap,
}

impl ErrorClass {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
        }
    }
}

/// A request.
#[derive(Debug, Clone)]
pub struct Request {
    /// Command name.
    pub command: String,
    /// Arguments.
    pub arguments: Map<String, Value>,
    /// Id.
    pub id: Option<Value>,
    /// exec-oob.
    pub oob: bool,
}

/// An envelope error.
#[derive(Debug, Clone)]
pub struct RequestError {
    /// Id.
    pub id: Option<Value>,
    /// Class.
    pub class: ErrorClass,
    /// Desc.
    pub desc: String,
}

/// Checks the envelope.
pub fn parse_request(v: Value) -> Result<Request, RequestError> {
    let Value::Object(mut m) = v else {
        return Err(RequestError {
            id: None,
            class: ErrorClass::GenericError,
            desc: "QMP input must be a JSON object".into(),
        });
    };
    let id = m.remove("id");
    let Some(Value::String(command)) = m.remove("execute") else {
        return Err(RequestError {
            id,
            class: ErrorClass::GenericError,
            desc: "QMP input lacks member 'execute'".into(),
        });
    };
    let arguments = match m.remove("arguments") {
        None => Map::new(),
        Some(Value::Object(a)) => a,
        Some(_) => {
            return Err(RequestError {
                id,
                class: ErrorClass::GenericError,
                desc: "QMP input member 'arguments' must be an object".into(),
            });
        }
    };
    Ok(Request {
        command,
        arguments,
        id,
        oob: false,
    })
}

/// `{"return": ret, "id": id}`.
pub fn success_response(ret: Value, id: Option<Value>) -> Value {
    let mut m = Map::new();
    m.insert("return".into(), ret);
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m)
}

/// `{"error": {...}, "id": id}`.
pub fn error_response(class: ErrorClass, desc: &str, id: Option<Value>) -> Value {
    let mut e = Map::new();
    e.insert("class".into(), Value::String(class.as_str().into()));
    e.insert("desc".into(), Value::String(desc.into()));
    let mut m = Map::new();
    m.insert("error".into(), Value::Object(e));
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m)
}

/// An event message.
pub fn event_message(name: &str, data: Option<Value>, seconds: i64, micros: i64) -> Value {
    let mut ts = Map::new();
    ts.insert("seconds".into(), seconds.into());
    ts.insert("microseconds".into(), micros.into());
    let mut m = Map::new();
    m.insert("timestamp".into(), Value::Object(ts));
    m.insert("event".into(), Value::String(name.into()));
    if let Some(d) = data {
        m.insert("data".into(), d);
    }
    Value::Object(m)
}
