//! Bounds on data the engine journals: values deeper or larger than these are
//! refused when they are produced (a step output, a rendered input), with a
//! clear step error, so that everything written can be read back.
//! `serde_json` refuses to read JSON nested more than 128 levels deep; the
//! journal wraps a value in a few levels of its own, so values stop at 64.

use serde_json::Value;

/// Deepest nesting of lists and objects in a value.
pub const MAX_DEPTH: usize = 64;

/// Largest value, counted roughly as its JSON size.
pub const MAX_VALUE_BYTES: usize = 32 * 1024 * 1024;

/// Checks a value against [`MAX_DEPTH`] and [`MAX_VALUE_BYTES`] without
/// recursion (a value read from elsewhere may be deeper than the stack).
pub fn check(value: &Value) -> Result<(), String> {
    let mut size = 0usize;
    let mut stack = vec![(value, 0usize)];
    while let Some((v, depth)) = stack.pop() {
        if depth > MAX_DEPTH {
            return Err(format!("value is nested more than {MAX_DEPTH} levels deep"));
        }
        size += 8;
        match v {
            Value::String(s) => size += s.len(),
            Value::Array(items) => stack.extend(items.iter().map(|i| (i, depth + 1))),
            Value::Object(map) => {
                for (k, i) in map {
                    size += k.len();
                    stack.push((i, depth + 1));
                }
            }
            _ => {}
        }
        if size > MAX_VALUE_BYTES {
            return Err(format!("value is larger than {MAX_VALUE_BYTES} bytes"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn nested(depth: usize) -> Value {
        let mut v = json!(1);
        for _ in 0..depth {
            v = json!([v]);
        }
        v
    }

    #[test]
    fn refuses_deep_and_large_values() {
        assert!(check(&nested(MAX_DEPTH)).is_ok());
        assert!(check(&nested(MAX_DEPTH + 1)).unwrap_err().contains("levels deep"));
        assert!(check(&json!("x".repeat(MAX_VALUE_BYTES + 1))).unwrap_err().contains("larger than"));
        // What passes can be journaled and read back.
        let event = json!({"type": "step_succeeded", "step": "s", "attempt": 1, "output": nested(MAX_DEPTH)});
        let text = serde_json::to_string(&event).unwrap();
        assert!(serde_json::from_str::<Value>(&text).is_ok());
    }
}
