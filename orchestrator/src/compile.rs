//! File -> [`Spec`] -> [`Workflow`]. Reports every error at once, each with
//! its file and place (`steps[3].needs: unknown step "clasify"`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use petgraph::graph::DiGraph;
use serde::Deserialize;
use serde_json::{Value, json};
use switchyard_steps::Registry;

use fixedbitset::FixedBitSet;

use crate::expr::{Refs, Templates, ValueTemplate};
use crate::files;
use crate::spec::{self, Spec, StepSpec};
use crate::workflow::{Bundle, Definition, Need, RetryPolicy, Step, StepKind, ToolWorkflows, Workflow};

/// Kinds the orchestrator itself provides (they steer the run).
const CONTROL_KINDS: [&str; 3] = ["switch", "map", "workflow"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileError {
    pub file: String,
    pub place: String,
    pub message: String,
}

impl std::fmt::Display for CompileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.file.is_empty(), self.place.is_empty()) {
            (false, false) => write!(f, "{}: {}: {}", self.file, self.place, self.message),
            (false, true) => write!(f, "{}: {}", self.file, self.message),
            (true, false) => write!(f, "{}: {}", self.place, self.message),
            (true, true) => f.write_str(&self.message),
        }
    }
}

/// All errors of one compilation.
#[derive(Debug, Clone, thiserror::Error)]
pub struct CompileErrors(pub Vec<CompileError>);

impl std::fmt::Display for CompileErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Where workflow sources come from.
pub trait Loader {
    fn load(&self, key: &str) -> Result<String, String>;
}

/// Reads files inside one folder: the root workflow's (the bundle). A key
/// is a relative path (see [`join_key`]); after symlinks are resolved the
/// file must still be inside the folder, a regular file, and at most
/// [`files::MAX_FILE_BYTES`].
pub struct FsLoader {
    /// Canonical: symlinks resolved.
    base: PathBuf,
}

impl FsLoader {
    pub fn new(base: &Path) -> Result<Self, String> {
        let base = base.canonicalize().map_err(|e| format!("cannot open folder {}: {e}", base.display()))?;
        Ok(Self { base })
    }
}

impl Loader for FsLoader {
    fn load(&self, key: &str) -> Result<String, String> {
        let path = self.base.join(key);
        let real = path.canonicalize().map_err(|_| format!("cannot read {key}: no such file"))?;
        if !real.starts_with(&self.base) {
            return Err(format!("{key} resolves (through a link) to a file outside the workflow's folder"));
        }
        files::read_text(&real, files::MAX_FILE_BYTES).map_err(|e| e.replace(&real.display().to_string(), key))
    }
}

impl Loader for Bundle {
    fn load(&self, key: &str) -> Result<String, String> {
        self.files.get(key).cloned().ok_or_else(|| format!("{key} is not in the stored definition"))
    }
}

/// Compiles a workflow file and the files it calls, which must be inside
/// the root file's folder.
pub fn compile_file(path: &Path, registry: &Registry) -> Result<Definition, CompileErrors> {
    let fail =
        |message: String| CompileErrors(vec![CompileError { file: String::new(), place: String::new(), message }]);
    let shown = path.display();
    // The root file may itself be a link; its real folder is the bundle.
    let real = path.canonicalize().map_err(|_| fail(format!("cannot read {shown}: no such file")))?;
    let (Some(base), Some(name)) = (real.parent(), real.file_name()) else {
        return Err(fail(format!("cannot read {shown}: not a file")));
    };
    let root = name.to_string_lossy().into_owned();
    let loader = FsLoader::new(base).map_err(fail)?;
    compile_from(&root, &loader, registry)
}

/// Compiles a stored bundle (used when resuming runs).
pub fn compile_bundle(bundle: &Bundle, registry: &Registry) -> Result<Definition, CompileErrors> {
    compile_from(&bundle.root.clone(), bundle, registry)
}

/// Compiles a workflow given as text (`key` names it in errors; `.json`
/// selects JSON). Child workflows are looked up through `loader`.
pub fn compile_from(root: &str, loader: &dyn Loader, registry: &Registry) -> Result<Definition, CompileErrors> {
    let mut compiler = Compiler {
        registry,
        loader,
        files: BTreeMap::new(),
        stack: Vec::new(),
        names: Vec::new(),
        cache: HashMap::new(),
        errors: Vec::new(),
    };
    let workflow = compiler.file(root, "", root);
    match workflow {
        Some(workflow) if compiler.errors.is_empty() => {
            let bundle = Bundle { root: root.to_owned(), files: compiler.files };
            let hash = bundle_hash(&bundle);
            Ok(Definition { workflow, bundle: Arc::new(bundle), hash })
        }
        _ => Err(CompileErrors(compiler.errors)),
    }
}

fn bundle_hash(bundle: &Bundle) -> String {
    sha256_hex(&serde_json::to_vec(bundle).expect("bundle serializes"))
}

fn sha256_hex(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A step's fingerprint: its definition as written, plus the fingerprint
/// of the workflow it calls (`child`), so that editing a called file changes
/// the caller's. serde_json's `Map` is sorted, so the text is canonical; it is
/// compared only within one process (both sides compiled by the same binary),
/// never stored.
fn step_fingerprint(s: &StepSpec, child: Option<&str>) -> String {
    let retry = s.retry.as_ref().map(|r| {
        json!({
            "max_attempts": r.max_attempts,
            "initial_delay": r.initial_delay,
            "multiplier": r.multiplier,
            "max_delay": r.max_delay,
            "jitter": r.jitter,
        })
    });
    let value = json!({
        "id": s.id,
        "kind": s.kind,
        "with": s.with,
        "needs": s.needs,
        "join": match s.join { spec::Join::All => "all", spec::Join::Any => "any" },
        "when": s.when,
        "retry": retry,
        "timeout": s.timeout,
        "on_error": match s.on_error { spec::OnError::Fail => "fail", spec::OnError::Continue => "continue" },
        "calls": child,
    });
    sha256_hex(&serde_json::to_vec(&value).expect("a JSON value serializes"))
}

/// What a caller of a workflow depends on: its steps, input schema, output
/// and limits.
fn workflow_fingerprint(spec: &Spec, steps: &[Step]) -> String {
    let steps: Vec<&str> = steps.iter().map(|s| s.fingerprint.as_str()).collect();
    let value = json!({
        "steps": steps,
        "input": spec.input,
        "output": spec.output,
        "llm_tokens": spec.limits.llm_tokens,
    });
    sha256_hex(&serde_json::to_vec(&value).expect("a JSON value serializes"))
}

struct Compiler<'a> {
    registry: &'a Registry,
    loader: &'a dyn Loader,
    files: BTreeMap<String, String>,
    stack: Vec<String>,
    /// Names of the workflows being compiled, innermost last.
    names: Vec<String>,
    cache: HashMap<String, Arc<Workflow>>,
    errors: Vec<CompileError>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SwitchConfig {
    cases: Vec<SwitchCase>,
    #[serde(default)]
    default: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SwitchCase {
    when: String,
    path: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MapConfig {
    items: Value,
    #[serde(default = "default_map_concurrency")]
    concurrency: usize,
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    steps: Option<Vec<StepSpec>>,
    #[serde(default)]
    output: Option<Value>,
    #[serde(default)]
    workflow: Option<String>,
}

fn default_map_concurrency() -> usize {
    10
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CallConfig {
    path: String,
    #[serde(default)]
    input: Option<Value>,
}

/// What a place may read in templates.
struct Scope<'s> {
    /// Steps that may be referenced (`None`: any step of the workflow).
    upstream: Option<&'s FixedBitSet>,
    /// Step ids to indexes.
    index: &'s HashMap<&'s str, usize>,
    extra: &'s [&'s str],
}

fn valid_id(id: &str) -> bool {
    let mut chars = id.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The key of the file `rel` names from the file `from`, both relative to
/// the bundle's folder: `dir/a.yaml` + `../b.yaml` -> `b.yaml`. A path that
/// is absolute or leaves the folder is refused, never rewritten.
fn join_key(from: &str, rel: &str) -> Result<String, String> {
    let outside = || format!("{rel:?} leaves the workflow's folder; called files must be inside it");
    if rel.trim().is_empty() {
        return Err("must not be empty".into());
    }
    if Path::new(rel).is_absolute() || rel.starts_with(['/', '\\']) {
        return Err(format!("{rel:?} is absolute; give a path relative to the workflow file, inside its folder"));
    }
    let mut parts: Vec<String> = Path::new(from)
        .parent()
        .map(|p| p.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    for c in Path::new(rel).components() {
        match c {
            Component::ParentDir => {
                if parts.pop().is_none() {
                    return Err(outside());
                }
            }
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return Err(outside()),
        }
    }
    Ok(parts.join("/"))
}

/// Parse errors of a called file must not quote it: the file may not be a
/// workflow at all (a `.env` named by mistake or by an attacker). Quoted
/// values in the message are elided; line and column stay.
fn without_quotes(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut quoted = false;
    for c in message.chars() {
        if c == '"' {
            if quoted {
                out.push_str("…\"");
            } else {
                out.push('"');
            }
            quoted = !quoted;
        } else if !quoted {
            out.push(c);
        }
    }
    out
}

impl Compiler<'_> {
    fn error(&mut self, file: &str, place: impl Into<String>, message: impl Into<String>) {
        self.errors.push(CompileError { file: file.to_owned(), place: place.into(), message: message.into() });
    }

    /// Loads, parses and compiles one file (cached; cycles reported).
    fn file(&mut self, key: &str, from_place: &str, from_file: &str) -> Option<Arc<Workflow>> {
        if let Some(done) = self.cache.get(key) {
            return Some(done.clone());
        }
        if self.stack.iter().any(|k| k == key) {
            let chain = [self.stack.as_slice(), &[key.to_owned()]].concat().join(" -> ");
            self.error(from_file, from_place, format!("workflows call each other in a cycle: {chain}"));
            return None;
        }
        let source = match self.loader.load(key) {
            Ok(s) => s,
            Err(e) => {
                self.error(from_file, from_place, e);
                return None;
            }
        };
        self.files.insert(key.to_owned(), source.clone());
        let spec = match spec::parse(&source, key.ends_with(".json")) {
            Ok(spec) => spec,
            Err(e) => {
                let e = if self.stack.is_empty() { e } else { without_quotes(&e) };
                self.error(key, "", e);
                return None;
            }
        };
        self.stack.push(key.to_owned());
        let compiled = self.workflow(key, "", spec.name.clone(), spec);
        self.stack.pop();
        let compiled = Arc::new(compiled?);
        self.cache.insert(key.to_owned(), compiled.clone());
        Some(compiled)
    }

    /// Compiles a spec; `prefix` places inline sub-workflows (`steps[2].with.`).
    fn workflow(&mut self, file: &str, prefix: &str, name: String, spec: Spec) -> Option<Workflow> {
        self.names.push(name.clone());
        let compiled = self.workflow_inner(file, prefix, name, spec);
        self.names.pop();
        compiled
    }

    fn workflow_inner(&mut self, file: &str, prefix: &str, name: String, spec: Spec) -> Option<Workflow> {
        let errors_before = self.errors.len();
        if name.trim().is_empty() {
            self.error(file, format!("{prefix}name"), "must not be empty");
        }
        if spec.steps.is_empty() {
            self.error(file, format!("{prefix}steps"), "a workflow needs at least one step");
        }
        if spec.concurrency == Some(0) {
            self.error(file, format!("{prefix}concurrency"), "must be at least 1");
        }
        if spec.limits.llm_tokens == Some(0) {
            self.error(file, format!("{prefix}limits.llm_tokens"), "must be at least 1");
        }
        let input_schema = spec.input.as_ref().and_then(|schema| match jsonschema::validator_for(schema) {
            Ok(v) => Some(Arc::new(v)),
            Err(e) => {
                self.error(file, format!("{prefix}input"), format!("invalid JSON Schema: {e}"));
                None
            }
        });

        // Ids.
        let mut index: HashMap<&str, usize> = HashMap::new();
        for (i, s) in spec.steps.iter().enumerate() {
            let place = format!("{prefix}steps[{i}].id");
            if !valid_id(&s.id) {
                self.error(
                    file,
                    place,
                    format!("invalid id {:?}: use letters, digits and _, not starting with a digit", s.id),
                );
            } else if let Some(first) = index.get(s.id.as_str()) {
                self.error(file, place, format!("duplicate id {:?} (first at steps[{first}])", s.id));
            } else {
                index.insert(&s.id, i);
            }
        }

        // Paths of the steps that choose one (a `switch`, or a kind whose
        // `Step::paths` declares them), to check `needs: [route.path]`.
        // Steps whose config does not parse are left out: that is reported
        // on its own.
        let mut chosen_paths: HashMap<usize, BTreeSet<String>> = HashMap::new();
        let mut unparsed = BTreeSet::new();
        for (i, s) in spec.steps.iter().enumerate() {
            let with = s.with.clone().unwrap_or(Value::Object(Default::default()));
            if s.kind == "switch" {
                match serde_json::from_value::<SwitchConfig>(with) {
                    Ok(cfg) => {
                        let mut paths: BTreeSet<String> = cfg.cases.into_iter().map(|c| c.path).collect();
                        paths.extend(cfg.default);
                        chosen_paths.insert(i, paths);
                    }
                    Err(_) => {
                        unparsed.insert(i);
                    }
                }
            } else if let Some(step) = self.registry.get(&s.kind) {
                if !step.check(&with).is_empty() {
                    unparsed.insert(i);
                } else if let Some(paths) = step.paths(&with) {
                    chosen_paths.insert(i, paths.into_iter().collect());
                }
            }
        }

        // Needs.
        let mut needs: Vec<Vec<Need>> = vec![Vec::new(); spec.steps.len()];
        let mut graph = DiGraph::<usize, ()>::new();
        let nodes: Vec<_> = (0..spec.steps.len()).map(|i| graph.add_node(i)).collect();
        for (i, s) in spec.steps.iter().enumerate() {
            for (j, need) in s.needs.iter().enumerate() {
                let place = format!("{prefix}steps[{i}].needs[{j}]");
                let (id, path) = match need.split_once('.') {
                    Some((id, path)) => (id, Some(path.to_owned())),
                    None => (need.as_str(), None),
                };
                let Some(&n) = index.get(id) else {
                    self.error(file, place, format!("unknown step {id:?}"));
                    continue;
                };
                if n == i {
                    self.error(file, place, "a step cannot need itself");
                    continue;
                }
                if let Some(p) = &path {
                    match chosen_paths.get(&n) {
                        Some(paths) if paths.contains(p) => {}
                        Some(paths) => {
                            let known = paths.iter().cloned().collect::<Vec<_>>().join(", ");
                            let kind = &spec.steps[n].kind;
                            self.error(file, place, format!("{kind} {id:?} has no path {p:?} (paths: {known})"));
                            continue;
                        }
                        None if unparsed.contains(&n) => continue,
                        None => {
                            let kind = &spec.steps[n].kind;
                            self.error(
                                file,
                                place,
                                format!("{id:?} ({kind}) does not choose a path, so `{need}` names none"),
                            );
                            continue;
                        }
                    }
                }
                graph.add_edge(nodes[n], nodes[i], ());
                needs[i].push(Need { step: n, path });
            }
        }
        let order = match petgraph::algo::toposort(&graph, None) {
            Ok(order) => order.into_iter().map(|n| graph[n]).collect::<Vec<_>>(),
            Err(_) => {
                for scc in petgraph::algo::tarjan_scc(&graph) {
                    if scc.len() > 1 {
                        let mut members: Vec<usize> = scc.iter().map(|n| graph[*n]).collect();
                        members.sort();
                        let names: Vec<&str> = members.iter().map(|m| spec.steps[*m].id.as_str()).collect();
                        self.error(
                            file,
                            format!("{prefix}steps[{}].needs", members[0]),
                            format!("cycle between steps {}", names.join(" -> ")),
                        );
                    }
                }
                Vec::new()
            }
        };
        // Transitive upstream sets, in topological order, as bit sets: n²/8
        // bytes, so even a 10,000-step chain takes 12 MB, not gigabytes.
        let n = spec.steps.len();
        let mut upstream: Vec<FixedBitSet> = Vec::with_capacity(n);
        upstream.resize_with(n, || FixedBitSet::with_capacity(0));
        for &i in &order {
            let mut set = FixedBitSet::with_capacity(n);
            for need in &needs[i] {
                set.insert(need.step);
                set.union_with(&upstream[need.step]);
            }
            upstream[i] = set;
        }

        let mut templates = Templates::default();
        let mut steps = Vec::with_capacity(spec.steps.len());
        for (i, s) in spec.steps.iter().enumerate() {
            let place = format!("{prefix}steps[{i}]");
            let scope = Scope { upstream: Some(&upstream[i]), index: &index, extra: &[] };
            let when = s.when.as_deref().and_then(|w| match templates.expr(w) {
                Ok((e, refs)) => {
                    self.check_refs(file, &format!("{place}.when"), &refs, &scope, &spec.steps, i);
                    Some(e)
                }
                Err(m) => {
                    self.error(file, format!("{place}.when"), m);
                    None
                }
            });
            let retry = s.retry.as_ref().map(|r| self.retry(file, &format!("{place}.retry"), r)).unwrap_or_default();
            let timeout = s.timeout.as_deref().and_then(|t| match switchyard_steps::duration::parse(t) {
                Ok(d) => Some(d),
                Err(m) => {
                    self.error(file, format!("{place}.timeout"), m);
                    None
                }
            });
            let kind = self.kind(file, &place, s, &scope, &mut templates, &spec.steps, i);
            if let Some(kind) = kind {
                let child = match &kind {
                    StepKind::Map { child, .. } | StepKind::Call { child, .. } => Some(child.fingerprint.as_str()),
                    StepKind::Action { .. } | StepKind::Switch { .. } => None,
                };
                let fingerprint = step_fingerprint(s, child);
                steps.push(Step {
                    shared_id: s.id.as_str().into(),
                    id: s.id.clone(),
                    kind,
                    needs: needs[i].clone(),
                    upstream: std::mem::take(&mut upstream[i]),
                    paths: chosen_paths.remove(&i),
                    dependents: Vec::new(),
                    join: s.join,
                    when,
                    retry,
                    timeout,
                    on_error: s.on_error,
                    fingerprint,
                });
            }
        }
        let output = spec.output.as_ref().and_then(|o| {
            let scope = Scope { upstream: None, index: &index, extra: &[] };
            self.value(file, &format!("{prefix}output"), o, &scope, &mut templates, &spec.steps, usize::MAX)
        });

        if self.errors.len() > errors_before {
            return None;
        }
        for i in 0..steps.len() {
            for n in steps[i].needs.clone() {
                steps[n.step].dependents.push(i);
            }
        }
        let fingerprint = workflow_fingerprint(&spec, &steps);
        Some(Workflow {
            shared_name: name.as_str().into(),
            name,
            fingerprint,
            version: spec.version,
            description: spec.description,
            input_schema,
            input_json: spec.input.clone(),
            concurrency: spec.concurrency,
            confidential: spec.confidential,
            index: steps.iter().enumerate().map(|(i, s)| (s.id.clone(), i)).collect(),
            steps,
            order,
            output,
            templates,
            llm_tokens: spec.limits.llm_tokens,
        })
    }

    fn retry(&mut self, file: &str, place: &str, r: &spec::RetrySpec) -> RetryPolicy {
        let mut policy = RetryPolicy {
            max_attempts: r.max_attempts,
            multiplier: r.multiplier,
            jitter: r.jitter,
            ..Default::default()
        };
        if r.max_attempts == 0 {
            self.error(file, format!("{place}.max_attempts"), "must be at least 1");
        }
        if !(r.multiplier.is_finite() && r.multiplier >= 1.0) {
            self.error(file, format!("{place}.multiplier"), "must be a number >= 1");
        }
        if !(0.0..=1.0).contains(&r.jitter) {
            self.error(file, format!("{place}.jitter"), "must be between 0 and 1");
        }
        match switchyard_steps::duration::parse(&r.initial_delay) {
            Ok(d) => policy.initial_delay = d,
            Err(m) => self.error(file, format!("{place}.initial_delay"), m),
        }
        match switchyard_steps::duration::parse(&r.max_delay) {
            Ok(d) => policy.max_delay = d,
            Err(m) => self.error(file, format!("{place}.max_delay"), m),
        }
        policy
    }

    #[allow(clippy::too_many_arguments)]
    fn kind(
        &mut self,
        file: &str,
        place: &str,
        s: &StepSpec,
        scope: &Scope,
        templates: &mut Templates,
        all: &[StepSpec],
        me: usize,
    ) -> Option<StepKind> {
        let with_place = format!("{place}.with");
        let with = s.with.clone().unwrap_or(Value::Object(Default::default()));
        match s.kind.as_str() {
            "switch" => {
                let cfg: SwitchConfig = self.config(file, &with_place, with)?;
                if cfg.cases.is_empty() {
                    self.error(file, format!("{with_place}.cases"), "needs at least one case");
                }
                let mut cases = Vec::new();
                for (k, case) in cfg.cases.iter().enumerate() {
                    let case_place = format!("{with_place}.cases[{k}]");
                    if !valid_id(&case.path) {
                        self.error(file, format!("{case_place}.path"), format!("invalid path name {:?}", case.path));
                    }
                    match templates.expr(&case.when) {
                        Ok((e, refs)) => {
                            self.check_refs(file, &format!("{case_place}.when"), &refs, scope, all, me);
                            cases.push((e, case.path.clone()));
                        }
                        Err(m) => self.error(file, format!("{case_place}.when"), m),
                    }
                }
                Some(StepKind::Switch { cases, default: cfg.default })
            }
            "map" => {
                let cfg: MapConfig = self.config(file, &with_place, with)?;
                if cfg.concurrency == 0 || cfg.concurrency > 10_000 {
                    self.error(file, format!("{with_place}.concurrency"), "must be between 1 and 10000");
                }
                let items = self.value(file, &format!("{with_place}.items"), &cfg.items, scope, templates, all, me)?;
                let item_scope = Scope { upstream: scope.upstream, index: scope.index, extra: &["item", "index"] };
                let input = match &cfg.input {
                    Some(v) => {
                        Some(self.value(file, &format!("{with_place}.input"), v, &item_scope, templates, all, me)?)
                    }
                    None => None,
                };
                let child = match (cfg.steps, cfg.workflow) {
                    (Some(steps), None) => {
                        let spec = Spec {
                            name: String::new(),
                            version: 1,
                            description: String::new(),
                            input: None,
                            concurrency: None,
                            steps,
                            output: cfg.output,
                            limits: Default::default(),
                            // Inherited at run time from the calling run.
                            confidential: false,
                        };
                        let name = format!("{}.{}", self.names.last().map(String::as_str).unwrap_or(file), s.id);
                        self.workflow(file, &format!("{with_place}."), name, spec).map(Arc::new)
                    }
                    (None, Some(path)) => {
                        if cfg.output.is_some() {
                            self.error(
                                file,
                                format!("{with_place}.output"),
                                "`output` goes with inline `steps`; a called workflow has its own",
                            );
                        }
                        let place = format!("{with_place}.workflow");
                        match join_key(file, &path) {
                            Ok(key) => self.file(&key, &place, file),
                            Err(m) => {
                                self.error(file, place, m);
                                None
                            }
                        }
                    }
                    _ => {
                        self.error(file, &with_place, "set exactly one of `steps` (inline) or `workflow` (a file)");
                        None
                    }
                }?;
                Some(StepKind::Map { items, concurrency: cfg.concurrency.max(1), input, child })
            }
            "workflow" => {
                let cfg: CallConfig = self.config(file, &with_place, with)?;
                let input = self.value(
                    file,
                    &format!("{with_place}.input"),
                    &cfg.input.unwrap_or(Value::Object(Default::default())),
                    scope,
                    templates,
                    all,
                    me,
                )?;
                let place = format!("{with_place}.path");
                let key = match join_key(file, &cfg.path) {
                    Ok(key) => key,
                    Err(m) => {
                        self.error(file, place, m);
                        return None;
                    }
                };
                let child = self.file(&key, &place, file)?;
                Some(StepKind::Call { child, input })
            }
            kind => {
                let Some(step) = self.registry.get(kind).cloned() else {
                    let mut known: Vec<&str> = self.registry.kinds().chain(CONTROL_KINDS).collect();
                    known.sort();
                    self.error(
                        file,
                        format!("{place}.kind"),
                        format!("unknown kind {kind:?} (known: {})", known.join(", ")),
                    );
                    return None;
                };
                let mut ok = true;
                for issue in step.check(&with) {
                    ok = false;
                    let at =
                        if issue.path.is_empty() { with_place.clone() } else { format!("{with_place}.{}", issue.path) };
                    self.error(file, at, issue.message);
                }
                let mut with = with;
                let tools = if kind == "agent" && ok {
                    Some(Arc::new(self.agent_workflows(file, &with_place, &mut with)?))
                } else {
                    None
                };
                let with = self.value(file, &with_place, &with, scope, templates, all, me)?;
                ok.then_some(StepKind::Action { step, with, tools })
            }
        }
    }

    /// Loads the workflows of an agent's workflow tools, and gives a tool
    /// without `parameters` its workflow's `input` schema.
    fn agent_workflows(&mut self, file: &str, with_place: &str, with: &mut Value) -> Option<ToolWorkflows> {
        let mut workflows = ToolWorkflows::new();
        let Some(tools) = with.get_mut("tools").and_then(Value::as_array_mut) else { return Some(workflows) };
        let mut ok = true;
        for (i, tool) in tools.iter_mut().enumerate() {
            let Some(path) = tool.get("workflow").and_then(Value::as_str).map(str::to_owned) else { continue };
            let name = tool.get("name").and_then(Value::as_str).unwrap_or_default().to_owned();
            let place = format!("{with_place}.tools[{i}].workflow");
            let key = match join_key(file, &path) {
                Ok(key) => key,
                Err(m) => {
                    self.error(file, place, m);
                    ok = false;
                    continue;
                }
            };
            let Some(child) = self.file(&key, &place, file) else {
                ok = false;
                continue;
            };
            if tool.get("parameters").is_none_or(Value::is_null) {
                let schema = child.input_json.clone().unwrap_or_else(|| serde_json::json!({"type": "object"}));
                tool["parameters"] = schema;
            }
            workflows.insert(name, child);
        }
        ok.then_some(workflows)
    }

    fn config<T: serde::de::DeserializeOwned>(&mut self, file: &str, place: &str, with: Value) -> Option<T> {
        match serde_json::from_value(with) {
            Ok(c) => Some(c),
            Err(e) => {
                self.error(file, place, e.to_string());
                None
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn value(
        &mut self,
        file: &str,
        place: &str,
        value: &Value,
        scope: &Scope,
        templates: &mut Templates,
        all: &[StepSpec],
        me: usize,
    ) -> Option<ValueTemplate> {
        match templates.value(place, value) {
            Ok((tpl, refs)) => {
                for (at, refs) in refs {
                    self.check_refs(file, &at, &refs, scope, all, me);
                }
                Some(tpl)
            }
            Err(errors) => {
                for (p, m) in errors {
                    self.error(file, p, m);
                }
                None
            }
        }
    }

    fn check_refs(&mut self, file: &str, place: &str, refs: &Refs, scope: &Scope, all: &[StepSpec], me: usize) {
        for r in refs {
            let mut parts = r.split('.');
            let root = parts.next().unwrap_or_default();
            match root {
                "input" | "run" => {}
                "steps" => {
                    let Some(id) = parts.next() else { continue };
                    match scope.index.get(id).copied() {
                        None => self.error(file, place, format!("unknown step {id:?} in `{r}`")),
                        Some(i) if scope.upstream.is_some_and(|up| !up.contains(i)) => {
                            let me_id = all.get(me).map(|s| s.id.as_str()).unwrap_or("?");
                            self.error(
                                file,
                                place,
                                format!(
                                    "`{r}` reads step {id:?}, which is not upstream of {me_id:?} (add it to needs)"
                                ),
                            );
                        }
                        Some(_) => {}
                    }
                }
                other if scope.extra.contains(&other) => {}
                other => {
                    let mut known = vec!["input", "steps", "run"];
                    known.extend(scope.extra);
                    self.error(file, place, format!("unknown variable {other:?} (available: {})", known.join(", ")));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
