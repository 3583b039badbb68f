//! Expressions and templates (minijinja, sandboxed).
//!
//! Templates and expressions come only from workflow files and are parsed at
//! compile time. Values from inputs and step outputs are passed as data in the
//! context and are never rendered as templates. The environment has no loader,
//! no file or network access, and a fuel limit so that no expression can loop
//! for long. There is no `include`, `import` or `extends` (the feature is not
//! built), no `debug()` and no `namespace()` (the only way to accumulate a
//! value across loop iterations, and so to build one deep enough to overflow
//! the stack). A result becomes JSON through [`to_json`], which refuses values
//! deeper or larger than [`limits`](crate::limits) allow, so a lazily repeated
//! list (`[0] * 100000000`) fails instead of filling memory.
//!
//! A value can stand for far more items than it took to make: `[0] * n` is a
//! lazy list of `n` items, and `{% set a = [a, a] %}` doubles what `a` stands
//! for at the cost of one list. minijinja charges fuel for visiting the items
//! of a list, but not for the items of the items it visits, nor for printing
//! a value into a string. So printing (the formatter) and the built-in filters
//! and tests that print, compare or hash their arguments whole are wrapped
//! (`guard_walking_builtins`): they measure the arguments first, refuse
//! ones larger than printing allows and charge fuel for the measuring. The
//! operators (`~`, `==`, `<`, `in`...) cannot be wrapped; see the README's
//! known limits.
//!
//! A *value template* is any JSON value whose strings may contain template
//! syntax. A string that is exactly one `{{ expression }}` evaluates to the
//! expression's value with its JSON type (a number stays a number); any other
//! string containing `{{`/`{%` renders to a string.

use std::collections::BTreeSet;
use std::sync::Arc;

use minijinja::value::{Rest, ValueOrKwargs};
use minijinja::{AutoEscape, Environment, Error as MjError, State, UndefinedBehavior, Value as MjValue};
use serde_json::Value;

use crate::limits;

/// Instructions one evaluation may spend before it is stopped.
const FUEL: u64 = 200_000;

/// Names a template may read besides the ones the compiler allows per place.
const GLOBALS: [&str; 2] = ["range", "dict"];

/// Owns the parsed templates of one workflow.
pub struct Templates {
    env: Environment<'static>,
}

impl std::fmt::Debug for Templates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Templates")
    }
}

impl Default for Templates {
    fn default() -> Self {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_fuel(Some(FUEL));
        env.set_recursion_limit(64);
        env.remove_global("debug");
        env.remove_global("namespace");
        env.set_formatter(|out, state, value| {
            bounded(value)?;
            minijinja::escape_formatter(out, state, value)
        });
        guard_walking_builtins(&mut env);
        Self { env }
    }
}

/// Built-in filters that walk their arguments whole in one call: they print
/// them into a string (`join` and `format` print every item), or compare or
/// hash every item with every other.
const WALKING_FILTERS: [&str; 21] = [
    "string",
    "tojson",
    "pprint",
    "safe",
    "escape",
    "e",
    "lower",
    "upper",
    "title",
    "capitalize",
    "trim",
    "replace",
    "indent",
    "format",
    "join",
    "sort",
    "unique",
    "min",
    "max",
    "dictsort",
    "groupby",
];

/// Built-in tests that compare or print their arguments whole.
const WALKING_TESTS: [&str; 18] = [
    "eq",
    "equalto",
    "==",
    "ne",
    "!=",
    "lt",
    "lessthan",
    "<",
    "le",
    "<=",
    "gt",
    "greaterthan",
    ">",
    "ge",
    ">=",
    "in",
    "startingwith",
    "endingwith",
];

/// Replaces the [`WALKING_FILTERS`] and [`WALKING_TESTS`] with wrappers that
/// [`measure`] every argument, then call the built-in.
fn guard_walking_builtins(env: &mut Environment<'static>) {
    // minijinja reaches a built-in only through a state of the environment it
    // is in, so a copy made before they are replaced keeps them. The copy has
    // the same settings, and one empty template per auto-escape mode, so that
    // a built-in runs in a state escaping as the caller's does.
    let mut builtins = env.clone();
    builtins.set_auto_escape_callback(|name| match name {
        "html" => AutoEscape::Html,
        "json" => AutoEscape::Json,
        _ => AutoEscape::None,
    });
    for mode in ["none", "html", "json"] {
        builtins.add_template(mode, "").expect("an empty template parses");
    }
    let builtins = Arc::new(builtins);
    for name in WALKING_FILTERS {
        let builtins = Arc::clone(&builtins);
        env.add_filter(name, move |state: &State, args: Rest<ValueOrKwargs>| {
            let args = args.into_values();
            measure(state, &args)?;
            call_builtin(&builtins, state, |builtin| builtin.apply_filter(name, &args))
        });
    }
    for name in WALKING_TESTS {
        let builtins = Arc::clone(&builtins);
        env.add_test(name, move |state: &State, args: Rest<ValueOrKwargs>| {
            let args = args.into_values();
            measure(state, &args)?;
            call_builtin(&builtins, state, |builtin| builtin.perform_test(name, &args))
        });
    }
}

/// Runs `call` in a fresh state of `builtins` escaping as `state` does, and
/// charges the fuel it spent to `state`. The fresh state has a whole budget
/// of its own, so one call can overspend by at most one budget before `state`
/// runs out.
fn call_builtin<T>(
    builtins: &Environment<'static>,
    state: &State,
    call: impl FnOnce(&mut State) -> Result<T, MjError>,
) -> Result<T, MjError> {
    let mode = match state.auto_escape() {
        AutoEscape::Html => "html",
        AutoEscape::Json => "json",
        _ => "none",
    };
    let template = builtins.get_template(mode)?;
    let mut builtin = template.new_state();
    let result = call(&mut builtin);
    if let Some((spent, _)) = builtin.fuel_levels() {
        state.consume_fuel(spent)?;
    }
    result
}

/// Items visited per unit of fuel when measuring (minijinja's own filters
/// charge about the same per item they visit).
const ITEMS_PER_FUEL: usize = 2;

/// Refuses arguments that are too large to print ([`bounded`]) and charges
/// fuel for the items visited measuring them, so that walking a value many
/// times, one call after another, is paid for.
fn measure(state: &State, args: &[MjValue]) -> Result<(), MjError> {
    for arg in args {
        let items = bounded(arg)?;
        state.consume_fuel((items / ITEMS_PER_FUEL) as u64)?;
    }
    Ok(())
}

/// A parsed expression (kept as source; parsing is microseconds).
#[derive(Debug, Clone)]
pub struct Expr {
    source: Arc<str>,
}

/// A JSON value with templates inside.
#[derive(Debug, Clone)]
pub enum ValueTemplate {
    Literal(Value),
    /// A string that is exactly `{{ expr }}`: evaluates to a typed value.
    Expr(Expr),
    /// A string with template syntax: renders to a string. Holds the name the
    /// template is registered under.
    Text(Arc<str>),
    Array(Vec<ValueTemplate>),
    Object(Vec<(String, ValueTemplate)>),
}

/// Variables a template reads, as dotted paths (`steps.fetch.output`).
pub type Refs = BTreeSet<String>;

/// A parsed value template and, per template string, its place and reads.
pub type ParsedValue = (ValueTemplate, Vec<(String, Refs)>);

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct EvalError(pub String);

fn describe(e: &MjError) -> String {
    let mut text = e.kind().to_string();
    if let Some(detail) = e.detail() {
        text.push_str(": ");
        text.push_str(detail);
    }
    text
}

impl Templates {
    /// Parses an expression, returning it with the variables it reads.
    pub fn expr(&self, source: &str) -> Result<(Expr, Refs), String> {
        let compiled = self.env.compile_expression(source).map_err(|e| describe(&e))?;
        let refs = filter_globals(compiled.undeclared_variables(true));
        Ok((Expr { source: source.into() }, refs))
    }

    /// Parses a value template; `place` names it (and its template strings).
    /// Returns the variables read, by the place of the string reading them.
    pub fn value(&mut self, place: &str, value: &Value) -> Result<ParsedValue, Vec<(String, String)>> {
        let mut refs = Vec::new();
        let mut errors = Vec::new();
        let tpl = self.value_inner(place, value, &mut refs, &mut errors);
        if errors.is_empty() { Ok((tpl, refs)) } else { Err(errors) }
    }

    fn value_inner(
        &mut self,
        place: &str,
        value: &Value,
        refs: &mut Vec<(String, Refs)>,
        errors: &mut Vec<(String, String)>,
    ) -> ValueTemplate {
        match value {
            Value::String(s) if s.contains("{{") || s.contains("{%") || s.contains("{#") => {
                if let Some(inner) = pure_expression(s) {
                    match self.expr(inner) {
                        Ok((e, r)) => {
                            refs.push((place.to_owned(), r));
                            ValueTemplate::Expr(e)
                        }
                        Err(m) => {
                            errors.push((place.to_owned(), m));
                            ValueTemplate::Literal(Value::Null)
                        }
                    }
                } else {
                    match self.env.add_template_owned(place.to_owned(), s.clone()) {
                        Ok(()) => {
                            let t = self.env.get_template(place).expect("just added");
                            refs.push((place.to_owned(), filter_globals(t.undeclared_variables(true))));
                            ValueTemplate::Text(place.into())
                        }
                        Err(e) => {
                            errors.push((place.to_owned(), describe(&e)));
                            ValueTemplate::Literal(Value::Null)
                        }
                    }
                }
            }
            Value::Array(items) => ValueTemplate::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| self.value_inner(&format!("{place}[{i}]"), v, refs, errors))
                    .collect(),
            ),
            Value::Object(map) => ValueTemplate::Object(
                map.iter()
                    .map(|(k, v)| (k.clone(), self.value_inner(&format!("{place}.{k}"), v, refs, errors)))
                    .collect(),
            ),
            other => ValueTemplate::Literal(other.clone()),
        }
    }

    /// Evaluates an expression to JSON.
    pub fn eval(&self, expr: &Expr, ctx: &MjValue) -> Result<Value, EvalError> {
        let compiled = self.env.compile_expression(&expr.source).map_err(|e| EvalError(describe(&e)))?;
        let value = compiled.eval(ctx).map_err(|e| EvalError(format!("`{}`: {}", expr.source, describe(&e))))?;
        to_json(&value).map_err(|e| EvalError(format!("`{}`: {e}", expr.source)))
    }

    /// Evaluates an expression as a condition (jinja truthiness).
    pub fn test(&self, expr: &Expr, ctx: &MjValue) -> Result<bool, EvalError> {
        let compiled = self.env.compile_expression(&expr.source).map_err(|e| EvalError(describe(&e)))?;
        compiled.eval(ctx).map(|v| v.is_true()).map_err(|e| EvalError(format!("`{}`: {}", expr.source, describe(&e))))
    }

    /// Renders a value template to JSON.
    pub fn render(&self, tpl: &ValueTemplate, ctx: &MjValue) -> Result<Value, EvalError> {
        Ok(match tpl {
            ValueTemplate::Literal(v) => v.clone(),
            ValueTemplate::Expr(e) => self.eval(e, ctx)?,
            ValueTemplate::Text(name) => {
                let t = self.env.get_template(name).map_err(|e| EvalError(describe(&e)))?;
                Value::String(t.render(ctx).map_err(|e| EvalError(format!("{name}: {}", describe(&e))))?)
            }
            ValueTemplate::Array(items) => {
                Value::Array(items.iter().map(|i| self.render(i, ctx)).collect::<Result<_, _>>()?)
            }
            ValueTemplate::Object(fields) => Value::Object(
                fields.iter().map(|(k, v)| Ok((k.clone(), self.render(v, ctx)?))).collect::<Result<_, EvalError>>()?,
            ),
        })
    }
}

fn filter_globals(vars: std::collections::HashSet<String>) -> Refs {
    vars.into_iter().filter(|v| !GLOBALS.contains(&v.split('.').next().unwrap_or_default())).collect()
}

/// `"{{ a.b }}"` -> `Some("a.b")` when the string is one expression block.
fn pure_expression(s: &str) -> Option<&str> {
    let inner = s.trim().strip_prefix("{{")?.strip_suffix("}}")?;
    let inner = inner.strip_prefix('-').unwrap_or(inner);
    let inner = inner.strip_suffix('-').unwrap_or(inner);
    if inner.contains("{{") || inner.contains("}}") || inner.contains("{%") {
        return None;
    }
    Some(inner.trim())
}

/// JSON -> template value.
pub fn from_json(value: &Value) -> MjValue {
    MjValue::from(minijinja::value::Serde(value))
}

/// Template value -> JSON. Undefined becomes an error, `none` null. Refuses
/// values nested deeper than [`limits::MAX_DEPTH`] or larger than
/// [`limits::MAX_VALUE_BYTES`], before building them.
pub fn to_json(value: &MjValue) -> Result<Value, String> {
    let mut budget = limits::MAX_VALUE_BYTES;
    convert(value, 0, &mut budget)
}

fn convert(value: &MjValue, depth: usize, budget: &mut usize) -> Result<Value, String> {
    use minijinja::value::ValueKind;
    if depth > limits::MAX_DEPTH {
        return Err(format!("value is nested more than {} levels deep", limits::MAX_DEPTH));
    }
    fn spend(budget: &mut usize, n: usize) -> Result<(), String> {
        *budget =
            budget.checked_sub(n).ok_or_else(|| format!("value is larger than {} bytes", limits::MAX_VALUE_BYTES))?;
        Ok(())
    }
    spend(budget, 8)?;
    let container = matches!(value.kind(), ValueKind::Seq | ValueKind::Iterable | ValueKind::Map);
    // Every item costs at least 8, so a length known up front refuses a huge
    // lazy list without walking it.
    if container && value.len().is_some_and(|n| n.saturating_mul(8) > *budget) {
        return Err(format!("value is larger than {} bytes", limits::MAX_VALUE_BYTES));
    }
    Ok(match value.kind() {
        ValueKind::Undefined => return Err("value is undefined".into()),
        ValueKind::None => Value::Null,
        ValueKind::Bool => Value::Bool(value.is_true()),
        ValueKind::Number => number(value)?,
        ValueKind::String => {
            let s = value.as_str().map(str::to_owned).unwrap_or_else(|| value.to_string());
            spend(budget, s.len())?;
            Value::String(s)
        }
        ValueKind::Bytes => {
            let s = String::from_utf8_lossy(value.as_bytes().unwrap_or_default()).into_owned();
            spend(budget, s.len())?;
            Value::String(s)
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let mut items = Vec::new();
            for item in value.try_iter().map_err(|e| describe(&e))? {
                items.push(convert(&item, depth + 1, budget)?);
            }
            Value::Array(items)
        }
        ValueKind::Map => {
            let mut map = serde_json::Map::new();
            for key in value.try_iter().map_err(|e| describe(&e))? {
                let item = value.get_item(&key).map_err(|e| describe(&e))?;
                let key = match key.as_str() {
                    Some(key) => key.to_owned(),
                    None => {
                        bounded(&key).map_err(|e| describe(&e))?;
                        key.to_string()
                    }
                };
                spend(budget, key.len())?;
                map.insert(key, convert(&item, depth + 1, budget)?);
            }
            Value::Object(map)
        }
        ValueKind::Plain => {
            let s = value.to_string();
            spend(budget, s.len())?;
            Value::String(s)
        }
        ValueKind::Invalid => return Err(value.to_string()),
        _ => return Err(format!("a {} cannot be turned into JSON", value.kind())),
    })
}

/// Most items and bytes a value may have to be printed whole.
const MAX_PRINTED_ITEMS: usize = 1_000_000;

/// Refuses, before printing, a list or map with more than
/// [`MAX_PRINTED_ITEMS`] items in all or deeper than [`limits::MAX_DEPTH`].
/// Walks lazily, so a lazy list is counted without being built, and counts an
/// item each time it is reached, as printing would. Returns the items counted.
fn bounded(value: &MjValue) -> Result<usize, MjError> {
    use minijinja::value::ValueKind;
    if !matches!(value.kind(), ValueKind::Seq | ValueKind::Iterable | ValueKind::Map) {
        return Ok(0);
    }
    let mut items = 0usize;
    let mut stack = vec![(value.clone(), 0usize)];
    while let Some((v, depth)) = stack.pop() {
        if depth > limits::MAX_DEPTH {
            return Err(too_big(format!("value is nested more than {} levels deep", limits::MAX_DEPTH)));
        }
        if !matches!(v.kind(), ValueKind::Seq | ValueKind::Iterable | ValueKind::Map) {
            continue;
        }
        // A length known up front refuses a huge list without walking it.
        if v.len().is_some_and(|n| n > MAX_PRINTED_ITEMS - items) {
            return Err(too_big(format!("value has more than {MAX_PRINTED_ITEMS} items")));
        }
        let is_map = v.kind() == ValueKind::Map;
        for item in v.try_iter()? {
            items += 1;
            if items > MAX_PRINTED_ITEMS {
                return Err(too_big(format!("value has more than {MAX_PRINTED_ITEMS} items")));
            }
            if is_map {
                // A key is printed too, and may be a list.
                stack.push((v.get_item(&item)?, depth + 1));
            }
            stack.push((item, depth + 1));
        }
    }
    Ok(items)
}

fn too_big(message: String) -> MjError {
    MjError::new(minijinja::ErrorKind::InvalidOperation, message)
}

fn number(value: &MjValue) -> Result<Value, String> {
    if value.is_integer() {
        if let Ok(i) = i64::try_from(value.clone()) {
            return Ok(Value::from(i));
        }
        if let Ok(u) = u64::try_from(value.clone()) {
            return Ok(Value::from(u));
        }
    }
    let f = f64::try_from(value.clone()).map_err(|e| describe(&e))?;
    serde_json::Number::from_f64(f).map(Value::Number).ok_or_else(|| format!("{f} is not a JSON number"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx() -> MjValue {
        from_json(&json!({"input": {"n": 2, "name": "db"}, "steps": {"a": {"output": [1, 2], "status": "succeeded"}}}))
    }

    #[test]
    fn pure_expressions_keep_their_type() {
        let mut t = Templates::default();
        let (tpl, refs) = t
            .value(
                "with",
                &json!({"n": "{{ input.n + 1 }}", "s": "host {{ input.name }}", "l": ["{{ steps.a.output }}", 3]}),
            )
            .unwrap();
        let all: Refs = refs.iter().flat_map(|(_, r)| r.iter().cloned()).collect();
        assert_eq!(all, Refs::from(["input.n".into(), "input.name".into(), "steps.a.output".into()]));
        assert_eq!(refs[0].0, "with.l[0]");
        let out = t.render(&tpl, &ctx()).unwrap();
        assert_eq!(out, json!({"n": 3, "s": "host db", "l": [[1, 2], 3]}));
    }

    #[test]
    fn data_is_never_rendered_as_a_template() {
        let mut t = Templates::default();
        let (tpl, _) = t.value("v", &json!("{{ input.name }}!")).unwrap();
        let evil = from_json(&json!({"input": {"name": "{{ 7 * 7 }}"}}));
        assert_eq!(t.render(&tpl, &evil).unwrap(), json!("{{ 7 * 7 }}!"));
    }

    #[test]
    fn syntax_errors_name_their_place_and_runaway_loops_stop() {
        let mut t = Templates::default();
        let errors = t.value("steps[1].with", &json!({"x": "{{ input. }}", "y": "{% for %}"})).unwrap_err();
        assert_eq!(errors.len(), 2);
        assert_eq!(errors[0].0, "steps[1].with.x");
        assert!(t.expr("a ==").is_err());
        let (tpl, _) = t
            .value("loop", &json!("{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}"))
            .unwrap();
        assert!(t.render(&tpl, &ctx()).unwrap_err().0.contains("fuel"));
    }

    #[test]
    fn hostile_templates_fail_as_errors_not_crashes() {
        let mut t = Templates::default();
        // Deep values need namespace(), which is gone.
        let deep =
            "{% set ns = namespace(x=1) %}{% for i in range(10000) %}{% set ns.x = [ns.x] %}{% endfor %}{{ ns.x }}";
        let (tpl, _) = t.value("deep", &json!(deep)).unwrap();
        assert!(t.render(&tpl, &ctx()).is_err());
        // A loop cannot carry a value from one iteration to the next.
        let carried = "{% set x = 1 %}{% for i in range(10000) %}{% set x = [x] %}{% endfor %}{{ x }}";
        let (tpl, _) = t.value("carried", &json!(carried)).unwrap();
        assert_eq!(t.render(&tpl, &ctx()).unwrap(), json!("1"));
        // No debug(), no include.
        let (e, _) = t.expr("debug()").unwrap();
        assert!(t.eval(&e, &ctx()).is_err());
        assert!(t.value("inc", &json!("{% include 'deep' %}")).is_err());
        assert!(t.value("imp", &json!("{% import 'deep' as d %}")).is_err());
        // Depth is bounded on the way out too.
        let nested = format!("{}1{}", "[".repeat(70), "]".repeat(70));
        let (e, _) = t.expr(&nested).unwrap();
        assert!(t.eval(&e, &ctx()).unwrap_err().0.contains("levels deep"));
    }

    /// Renders `src` and returns its error.
    fn render_err(t: &mut Templates, src: &str) -> String {
        let (tpl, _) = t.value("t", &json!(src)).unwrap();
        t.render(&tpl, &ctx()).unwrap_err().0
    }

    #[test]
    fn huge_values_are_refused_before_they_are_walked() {
        let mut t = Templates::default();
        // As a result, a lazily repeated list is refused before it is built.
        let (e, _) = t.expr("[0] * 100000000").unwrap();
        assert!(t.eval(&e, &ctx()).unwrap_err().0.contains("larger than"));
        let (e, _) = t.expr("[[0] * 100000000] * 2").unwrap();
        assert!(t.eval(&e, &ctx()).unwrap_err().0.contains("larger than"));
        let (e, _) = t.expr("'x' * 100000000").unwrap();
        assert!(t.eval(&e, &ctx()).is_err());
        // Printing, and every filter or test that prints, compares or hashes
        // a whole value, refuses a huge lazy list, or a short list of them.
        let uses = [
            "x{{ X }}",
            "{{ X | string }}",
            "{{ X | tojson }}",
            "{{ X | pprint }}",
            "{{ X | join }}",
            "{{ X | join(', ') }}",
            "{{ '%s' | format(X) }}",
            "{{ X | safe }}",
            "{{ X | e }}",
            "{{ X | lower }}",
            "{{ X | replace('0', '1') }}",
            "{{ X | indent(2) }}",
            "{{ X | sort }}",
            "{{ X | unique | list }}",
            "{{ X | min }}",
            "{{ X | max }}",
            "{{ X | groupby(0) }}",
            "{{ dict(a=X, b=X) | dictsort(by='value') }}",
            "{{ X is eq X }}",
            "{{ X is startingwith 'x' }}",
            "{{ X is in [X] }}",
            "{{ [X] | select('eq', X) | list }}",
            "{{ [X] | map('lower') | list }}",
            "x{{ {X: 1} }}",
            "{{ {X: 1} | string }}",
        ];
        for huge in ["([0] * 579 * 85790)", "([[0] * 100000000] * 2)"] {
            for src in uses {
                let src = src.replace('X', huge);
                let err = render_err(&mut t, &src);
                assert!(err.contains("more than 1000000 items"), "{src}: {err}");
            }
        }
        // A list nested in itself stands for as many items without any `*`.
        let nested = format!(
            "{{% set a = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0] %}}{}",
            "{% set a = [a, a, a, a, a, a, a, a, a, a] %}".repeat(7)
        );
        for src in ["{{ a | join }}", "{{ a is eq a[:] }}"] {
            let err = render_err(&mut t, &format!("{nested}{src}"));
            assert!(err.contains("more than 1000000 items"), "{src}: {err}");
        }
    }

    #[test]
    fn measuring_a_value_costs_fuel() {
        let mut t = Templates::default();
        // Each test call visits 200,000 items, so a hundred of them run out.
        let src = "{% for i in range(100) %}{{ ([0] * 100000) is eq ([0] * 100000) }}{% endfor %}";
        assert!(render_err(&mut t, src).contains("fuel"));
        // A loop over a lazily repeated list pays per item.
        assert!(render_err(&mut t, "{% for x in [0] * 100000000 %}{% endfor %}").contains("fuel"));
        assert!(render_err(&mut t, "{% for x in [0] * 1000000000 %}{% endfor %}").contains("too large"));
    }

    #[test]
    fn repetition_and_the_wrapped_builtins_still_work() {
        let mut t = Templates::default();
        for (src, want) in [
            ("[1, 2] * 2", json!([1, 2, 1, 2])),
            ("'ab' * 3", json!("ababab")),
            ("steps.a.output * 2", json!([1, 2, 1, 2])),
            ("([0] * 1000) | length", json!(1000)),
            ("[3, 1, 2] | sort", json!([1, 2, 3])),
            ("[{'a': 2}, {'a': 1}] | sort(attribute='a', reverse=true)", json!([{"a": 2}, {"a": 1}])),
            ("[1, 1, 2] | unique | list", json!([1, 2])),
            ("[1, 2, 3] | sum", json!(6)),
            ("[[1, 2, 1], [3]] | min", json!([1, 2, 1])),
            ("[1, 2, 3] | max", json!(3)),
            ("{'b': 1, 'a': 2} | dictsort(by='value')", json!([["b", 1], ["a", 2]])),
            ("[{'k': 1}, {'k': 1}] | groupby('k') | length", json!(1)),
            ("[1, 2, 3] | select('eq', 2) | list", json!([2])),
            ("steps.a.output is eq [1, 2]", json!(true)),
            ("2 is in steps.a.output", json!(true)),
            ("{'a': 1} | tojson(indent=2)", json!("{\n  \"a\": 1\n}")),
        ] {
            let (e, _) = t.expr(src).unwrap();
            assert_eq!(t.eval(&e, &ctx()).unwrap(), want, "{src}");
        }
        for (src, want) in [
            ("{{ steps.a.output | join(', ') }} {{ [1, 2] * 2 }}", "1, 2 [1, 2, 1, 2]"),
            ("{{ '%s-%d' | format(input.name, 3) }} {{ 'A' | lower }}{{ ' b ' | trim | upper }}", "db-3 aB"),
            ("{{ 'aaa' | replace('a', 'b', count=2) }} {{ 'a\nb' | indent(2) }}", "bba a\n  b"),
            ("{{ [1, 'a'] | string }} {{ [1] | tojson }} {{ '<' | e }}", "[1, 'a'] [1] &lt;"),
            // Built-ins run escaping as their caller does.
            ("{% autoescape true %}{{ ['<a>', '<b>' | safe] | join(', ') }}{% endautoescape %}", "&lt;a&gt;, <b>"),
        ] {
            let (tpl, _) = t.value("ok", &json!(src)).unwrap();
            assert_eq!(t.render(&tpl, &ctx()).unwrap(), json!(want), "{src}");
        }
    }

    #[test]
    fn numbers_keep_their_json_type() {
        let t = Templates::default();
        for (src, want) in [("2", json!(2)), ("2.5", json!(2.5)), ("2.0", json!(2.0)), ("-3", json!(-3))] {
            let (e, _) = t.expr(src).unwrap();
            assert_eq!(t.eval(&e, &ctx()).unwrap(), want, "{src}");
        }
    }

    #[test]
    fn strict_undefined_is_an_error() {
        let t = Templates::default();
        let (e, _) = t.expr("input.missing").unwrap();
        assert!(t.eval(&e, &ctx()).is_err());
        let (e, _) = t.expr("input.missing is defined").unwrap();
        assert!(!t.test(&e, &ctx()).unwrap());
    }
}
