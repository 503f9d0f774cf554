//! Typed reads of JSON config fields with errors that name the file and field and show what
//! was found. `null` counts as absent for optional fields, as transformers writes it for
//! "not set".

use crate::error::{FormatError, Result};
use serde_json::{Map, Value};

/// Most decoder layers a config may declare: far above any real model (a few hundred at most),
/// low enough that per-layer tables cannot exhaust memory.
pub(crate) const MAX_LAYERS: usize = 65_536;

/// Longest rendering of an offending value in an error message.
const MAX_SHOWN: usize = 80;

/// The fields of one JSON object, with a file label and a dotted path for messages.
#[derive(Clone, Copy)]
pub(crate) struct Fields<'a> {
    obj: &'a Map<String, Value>,
    pub(crate) file: &'a str,
    /// Dotted path of this object inside the file ("" for the root, "text_config." …).
    path: &'a str,
}

/// A value rendered for an error message, shortened when long.
pub(crate) fn show(value: &Value) -> String {
    let mut s = value.to_string();
    if s.len() > MAX_SHOWN {
        let mut cut = MAX_SHOWN;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

impl<'a> Fields<'a> {
    /// The root object of a file; an error when the document is not an object.
    pub(crate) fn root(value: &'a Value, file: &'a str) -> Result<Fields<'a>> {
        match value.as_object() {
            Some(obj) => Ok(Fields {
                obj,
                file,
                path: "",
            }),
            None => Err(FormatError::config(
                file,
                "(root)",
                format!("expected a JSON object, got {}", show(value)),
            )),
        }
    }

    /// A nested object with its own dotted path (the caller owns the path string).
    pub(crate) fn nested(&self, obj: &'a Map<String, Value>, path: &'a str) -> Fields<'a> {
        Fields {
            obj,
            file: self.file,
            path,
        }
    }

    /// The full dotted name of `key` in this object.
    pub(crate) fn name(&self, key: &str) -> String {
        format!("{}{key}", self.path)
    }

    pub(crate) fn err(&self, key: &str, problem: impl Into<String>) -> FormatError {
        FormatError::config(self.file, self.name(key), problem)
    }

    fn wrong(&self, key: &str, expected: &str, got: &Value) -> FormatError {
        self.err(key, format!("expected {expected}, got {}", show(got)))
    }

    /// The value of `key`, `None` when missing or null.
    pub(crate) fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    pub(crate) fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Whether `key` is present at all, even as null.
    pub(crate) fn has_key(&self, key: &str) -> bool {
        self.obj.contains_key(key)
    }

    fn missing(&self, key: &str) -> FormatError {
        self.err(key, "missing")
    }

    /// A non-negative integer (integral floats such as `2048.0` are accepted).
    fn as_count(&self, key: &str, v: &Value) -> Result<usize> {
        let n = match v {
            Value::Number(n) => n.as_u64().or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 9.0e15)
                    .map(|f| f as u64)
            }),
            _ => None,
        };
        n.and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| self.wrong(key, "a non-negative integer", v))
    }

    pub(crate) fn opt_count(&self, key: &str) -> Result<Option<usize>> {
        self.get(key).map(|v| self.as_count(key, v)).transpose()
    }

    pub(crate) fn req_count(&self, key: &str) -> Result<usize> {
        self.opt_count(key)?.ok_or_else(|| self.missing(key))
    }

    pub(crate) fn count_or(&self, key: &str, default: usize) -> Result<usize> {
        Ok(self.opt_count(key)?.unwrap_or(default))
    }

    pub(crate) fn opt_positive(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match self.as_count(key, v) {
                Ok(0) | Err(_) => Err(self.wrong(key, "a positive integer", v)),
                Ok(n) => Ok(Some(n)),
            },
        }
    }

    pub(crate) fn req_positive(&self, key: &str) -> Result<usize> {
        match self.obj.get(key) {
            None => Err(self.missing(key)),
            Some(Value::Null) => Err(self.wrong(key, "a positive integer", &Value::Null)),
            Some(_) => Ok(self.opt_positive(key)?.unwrap_or_default()),
        }
    }

    /// A layer count: positive and at most [`MAX_LAYERS`], so that tables sized by it stay
    /// small whatever a (corrupt) config says.
    pub(crate) fn req_layer_count(&self, key: &str) -> Result<usize> {
        let n = self.req_positive(key)?;
        if n > MAX_LAYERS {
            return Err(self.err(
                key,
                format!("{n} layers is more than the {MAX_LAYERS} this loader accepts"),
            ));
        }
        Ok(n)
    }

    pub(crate) fn positive_or(&self, key: &str, default: usize) -> Result<usize> {
        Ok(self.opt_positive(key)?.unwrap_or(default))
    }

    /// A finite number.
    pub(crate) fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|f| f.is_finite())
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a number", v)),
        }
    }

    pub(crate) fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        Ok(self.opt_f64(key)?.unwrap_or(default))
    }

    /// A finite number > 0.
    pub(crate) fn opt_positive_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.opt_f64(key)? {
            Some(f) if f <= 0.0 => {
                Err(self.err(key, format!("expected a positive number, got {f}")))
            }
            other => Ok(other),
        }
    }

    pub(crate) fn req_positive_f64(&self, key: &str) -> Result<f64> {
        self.opt_positive_f64(key)?.ok_or_else(|| self.missing(key))
    }

    pub(crate) fn positive_f64_or(&self, key: &str, default: f64) -> Result<f64> {
        Ok(self.opt_positive_f64(key)?.unwrap_or(default))
    }

    pub(crate) fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong(key, "true or false", v)),
        }
    }

    pub(crate) fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        Ok(self.opt_bool(key)?.unwrap_or(default))
    }

    pub(crate) fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.wrong(key, "a string", v)),
        }
    }

    pub(crate) fn str_or(&self, key: &str, default: &'a str) -> Result<&'a str> {
        Ok(self.opt_str(key)?.unwrap_or(default))
    }

    /// A nested object, `None` when missing or null.
    pub(crate) fn opt_object(&self, key: &str) -> Result<Option<&'a Map<String, Value>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(m)),
            Some(v) => Err(self.wrong(key, "an object", v)),
        }
    }

    pub(crate) fn opt_array(&self, key: &str) -> Result<Option<&'a Vec<Value>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.wrong(key, "a list", v)),
        }
    }

    /// A list of non-negative integers.
    pub(crate) fn opt_count_list(&self, key: &str) -> Result<Option<Vec<usize>>> {
        let Some(items) = self.opt_array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|v| self.as_count(key, v))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// A list of strings.
    pub(crate) fn opt_str_list(&self, key: &str) -> Result<Option<Vec<&'a str>>> {
        let Some(items) = self.opt_array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| self.wrong(key, "a list of strings", v))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    fn as_token(&self, key: &str, v: &Value) -> Result<Option<u32>> {
        // A negative id (usually -1) is a common way of writing "no such token".
        if v.as_i64().is_some_and(|i| i < 0) {
            return Ok(None);
        }
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| self.wrong(key, "a token id (non-negative integer below 2^32)", v))
    }

    /// One token id; negative values and null mean none.
    pub(crate) fn opt_token(&self, key: &str) -> Result<Option<u32>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => self.as_token(key, v),
        }
    }

    /// Token ids given as one integer or a list of integers; missing means none.
    pub(crate) fn opt_token_list(&self, key: &str) -> Result<Option<Vec<u32>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => {
                let mut ids = Vec::with_capacity(items.len());
                for v in items {
                    if let Some(id) = self.as_token(key, v)? {
                        ids.push(id);
                    }
                }
                Ok(Some(ids))
            }
            Some(v) => Ok(Some(self.as_token(key, v)?.into_iter().collect())),
        }
    }
}
