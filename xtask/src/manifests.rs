//! `cargo xtask manifests` (also part of `cargo xtask test`): checks everything in `deploy/`
//! offline, in a couple of seconds.
//!
//! 1. Renders the Helm chart `deploy/helm/trellis` with its default values and with each
//!    `ci/*-values.yaml` laid over them (Helm's deep merge), into `target/manifests/`. There is
//!    no `helm` binary here (not in Debian, and nothing but package registries is reachable),
//!    so [`render`] is a small Go-template renderer for exactly the subset the chart uses:
//!    `{{ .Values.x.y }}`, `.Release.*` and `.Chart.*` fields, `{{- if X }}`/`{{ else }}`/
//!    `{{- end }}`, the pipeline functions `toYaml`, `nindent`, `indent`, `quote`, `default`,
//!    `not`, `{{- ` / ` -}}` whitespace trimming and `{{/* comments */}}`. Anything else
//!    (`range`, `with`, `include`, ...) is an error, not silently ignored: a chart change that
//!    needs more must extend the renderer or be checked with a real `helm template`.
//! 2. Runs `deploy/hack/validate_manifests.py` over deploy/ and the renderings: it validates every
//!    object against the Kubernetes OpenAPI schemas shipped inside the `kubernetes-validate`
//!    package (strict: unknown fields are errors), for the oldest supported Kubernetes and the
//!    newest the package knows; validates the CRDs (schema and structural rules) and the
//!    example custom resources against their CRD's `openAPIV3Schema` with `jsonschema`; checks
//!    the chart's values against `values.schema.json`; checks that the chart with default
//!    values renders exactly the plain manifests; and runs a few checks the API server would
//!    make beyond the schemas (selectors match, volumes and ports exist, references resolve).
//!    Custom resources of groups whose CRDs are not here (Gateway API's HTTPRoute) are skipped
//!    and listed as skipped.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, anyhow, bail};
use serde_json::{Map, Value};

use crate::util::{step, workspace_root};

/// The namespace and release name the chart is rendered with (the plain manifests' namespace).
const RELEASE_NAMESPACE: &str = "trellis-system";
const RELEASE_NAME: &str = "trellis";

pub fn run() -> anyhow::Result<()> {
    step("validating deploy/ (Kubernetes manifests, CRDs, Helm chart) offline");
    let root = workspace_root()?;
    let deploy = root.join("deploy");
    let chart = deploy.join("helm/trellis");
    let out = root.join("target/manifests");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;

    let chart_yaml = yaml_to_json(&chart.join("Chart.yaml"))?;
    let mut rendered = Vec::new();
    for (name, values) in value_sets(&chart)? {
        let (manifests, notes) = render_chart(&chart, &chart_yaml, &values)?;
        let path = out.join(format!("helm-{name}.yaml"));
        std::fs::write(&path, manifests).with_context(|| format!("writing {}", path.display()))?;
        std::fs::write(out.join(format!("helm-{name}-NOTES.txt")), notes)?;
        rendered.push(format!("{name}={}", path.display()));
    }

    let status = Command::new("python3")
        .arg(deploy.join("hack/validate_manifests.py"))
        .arg("--deploy")
        .arg(&deploy)
        .arg("--chart")
        .arg(&chart)
        .arg("--release-namespace")
        .arg(RELEASE_NAMESPACE)
        .args(rendered.iter().flat_map(|r| ["--rendered", r.as_str()]))
        .status()
        .context("running python3 (cargo xtask setup installs kubernetes-validate)")?;
    if !status.success() {
        bail!("deploy/ does not validate (see above)");
    }
    Ok(())
}

/// The chart's default values, then each `ci/*-values.yaml` merged over them, by name.
fn value_sets(chart: &Path) -> anyhow::Result<Vec<(String, Value)>> {
    let defaults = yaml_to_json(&chart.join("values.yaml"))?;
    let mut sets = vec![("default".to_string(), defaults.clone())];
    let ci = chart.join("ci");
    if ci.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&ci)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with("-values.yaml"))
            })
            .collect();
        files.sort();
        for file in files {
            let name = file
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix("-values.yaml"))
                .context("ci values file name")?
                .to_string();
            let mut values = defaults.clone();
            merge(&mut values, yaml_to_json(&file)?);
            sets.push((name, values));
        }
    }
    Ok(sets)
}

/// Helm's coalescing of user values over the chart's: maps merge key by key, anything else
/// replaces, and `null` deletes the key.
fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(base), Value::Object(over)) => {
            for (k, v) in over {
                if v.is_null() {
                    base.remove(&k);
                } else if let Some(b) = base.get_mut(&k) {
                    merge(b, v);
                } else {
                    base.insert(k, v);
                }
            }
        }
        (base, over) => *base = over,
    }
}

/// A YAML file as JSON, through python3's PyYAML (a dependency of kubernetes-validate):
/// xtask has no YAML parser of its own.
fn yaml_to_json(path: &Path) -> anyhow::Result<Value> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)",
        ])
        .arg(path)
        .output()
        .context("running python3")?;
    if !out.status.success() {
        bail!(
            "reading {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("reading {}", path.display()))
}

/// Renders every template of the chart as `helm template` would: the manifests (each
/// template's output under a `# Source:` line) and NOTES.txt. Files starting with `_` are
/// skipped, as Helm does (the chart has none: no `define`/`include` support).
fn render_chart(
    chart: &Path,
    chart_yaml: &Value,
    values: &Value,
) -> anyhow::Result<(String, String)> {
    let field = |k: &str| chart_yaml.get(k).cloned().unwrap_or(Value::Null);
    let root = Value::Object(Map::from_iter([
        ("Values".to_string(), values.clone()),
        (
            "Release".to_string(),
            serde_json::json!({
                "Name": RELEASE_NAME,
                "Namespace": RELEASE_NAMESPACE,
                "Service": "Helm",
                "IsInstall": true,
                "IsUpgrade": false,
            }),
        ),
        (
            "Chart".to_string(),
            serde_json::json!({
                "Name": field("name"),
                "Version": field("version"),
                "AppVersion": field("appVersion"),
            }),
        ),
    ]));
    let chart_name = field("name").as_str().unwrap_or("chart").to_string();
    let dir = chart.join("templates");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    let (mut manifests, mut notes) = (String::new(), String::new());
    for file in files {
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with('_') {
            continue;
        }
        let source = std::fs::read_to_string(&file)?;
        let shown = format!("{chart_name}/templates/{name}");
        let text = render(&source, &root).with_context(|| format!("rendering {shown}"))?;
        if name == "NOTES.txt" {
            notes = text;
        } else if name.ends_with(".yaml") || name.ends_with(".yml") {
            if !text.trim().is_empty() {
                manifests.push_str(&format!("---\n# Source: {shown}\n{}\n", text.trim_end()));
            }
        } else {
            bail!("{shown}: not a template Helm would render into manifests");
        }
    }
    Ok((manifests, notes))
}

// ---------------------------------------------------------------------------------------------
// The Go-template subset.
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
enum Node {
    Text(String),
    /// `{{ pipeline }}`, with the line it is on (for errors).
    Output(Pipeline, usize),
    If {
        cond: Pipeline,
        then: Vec<Node>,
        otherwise: Vec<Node>,
        line: usize,
    },
}

type Pipeline = Vec<Cmd>;

/// One command of a pipeline: a lone term, or a function and its arguments (the previous
/// command's result is appended as the last argument).
#[derive(Debug)]
enum Cmd {
    Term(Term),
    Call(String, Vec<Term>),
}

#[derive(Debug)]
enum Term {
    /// `.Values.a.b` as ["Values", "a", "b"]; `.` alone as [].
    Field(Vec<String>),
    Literal(Value),
}

/// Renders one template against `root` (`{"Values": .., "Release": .., "Chart": ..}`).
fn render(source: &str, root: &Value) -> anyhow::Result<String> {
    let tokens = lex(source)?;
    let mut tokens = tokens.into_iter().peekable();
    let (nodes, end) = parse(&mut tokens)?;
    if let Some((word, line)) = end {
        bail!("line {line}: `{{{{ {word} }}}}` without `{{{{ if }}}}`");
    }
    let mut out = String::new();
    emit(&nodes, root, &mut out)?;
    Ok(out)
}

#[derive(Debug)]
enum Token {
    Text(String),
    /// An action's text (without delimiters and trim markers) and its line.
    Action(String, usize),
}

fn lex(source: &str) -> anyhow::Result<Vec<Token>> {
    let mut tokens = Vec::new();
    let mut rest = source;
    let mut consumed = 0;
    let line_at = |offset: usize| source[..offset].matches('\n').count() + 1;
    while let Some(open) = rest.find("{{") {
        let mut text = &rest[..open];
        let after_open = &rest[open + 2..];
        let trim_left = after_open.starts_with("- ")
            || after_open.starts_with("-\n")
            || after_open.starts_with("-\t");
        if trim_left {
            text = text.trim_end();
        }
        if !text.is_empty() {
            tokens.push(Token::Text(text.to_string()));
        }
        let line = line_at(consumed + open);
        let close = after_open
            .find("}}")
            .ok_or_else(|| anyhow!("line {line}: `{{{{` without `}}}}`"))?;
        let mut inner = &after_open[..close];
        if trim_left {
            inner = &inner[1..];
        }
        let trim_right = inner.ends_with(" -") || inner.ends_with("\n-") || inner.ends_with("\t-");
        if trim_right {
            inner = &inner[..inner.len() - 1];
        }
        let inner = inner.trim();
        let is_comment = inner.starts_with("/*") && inner.ends_with("*/");
        if !is_comment {
            tokens.push(Token::Action(inner.to_string(), line));
        }
        let advance = open + 2 + close + 2;
        consumed += advance;
        rest = &rest[advance..];
        if trim_right {
            let trimmed = rest.trim_start();
            consumed += rest.len() - trimmed.len();
            rest = trimmed;
        }
    }
    if !rest.is_empty() {
        tokens.push(Token::Text(rest.to_string()));
    }
    Ok(tokens)
}

/// What ended a block: `else` or `end` with its line, or `None` at the end of the input.
type Stop = Option<(&'static str, usize)>;

/// Parses nodes up to an `else` or `end` (returned with its line) or the end of input.
fn parse(
    tokens: &mut std::iter::Peekable<std::vec::IntoIter<Token>>,
) -> anyhow::Result<(Vec<Node>, Stop)> {
    let mut nodes = Vec::new();
    while let Some(token) = tokens.next() {
        let (action, line) = match token {
            Token::Text(t) => {
                nodes.push(Node::Text(t));
                continue;
            }
            Token::Action(a, line) => (a, line),
        };
        let keyword = action.split_whitespace().next().unwrap_or_default();
        match keyword {
            "end" if action == "end" => return Ok((nodes, Some(("end", line)))),
            "else" if action == "else" => return Ok((nodes, Some(("else", line)))),
            "if" => {
                let cond = parse_pipeline(action["if".len()..].trim(), line)?;
                let (then, end) = parse(tokens)?;
                let otherwise = match end {
                    Some(("end", _)) => Vec::new(),
                    Some(("else", _)) => match parse(tokens)? {
                        (otherwise, Some(("end", _))) => otherwise,
                        _ => bail!("line {line}: `if ... else` without its `end`"),
                    },
                    _ => bail!("line {line}: `if` without its `end`"),
                };
                nodes.push(Node::If {
                    cond,
                    then,
                    otherwise,
                    line,
                });
            }
            "else" | "end" | "range" | "with" | "define" | "template" | "block" | "include"
            | "break" | "continue" => {
                bail!("line {line}: `{{{{ {action} }}}}` is not supported by xtask's renderer")
            }
            _ => nodes.push(Node::Output(parse_pipeline(&action, line)?, line)),
        }
    }
    Ok((nodes, None))
}

fn parse_pipeline(text: &str, line: usize) -> anyhow::Result<Pipeline> {
    let words = split_words(text, line)?;
    if words.is_empty() {
        bail!("line {line}: empty action");
    }
    let mut pipeline = Vec::new();
    for command in words.split(|w| w == "|") {
        let Some((first, args)) = command.split_first() else {
            bail!("line {line}: empty command in `{text}`");
        };
        if first.starts_with('.') || first.starts_with('"') || is_literal(first) {
            if !args.is_empty() {
                bail!("line {line}: `{first}` is not a function");
            }
            pipeline.push(Cmd::Term(parse_term(first, line)?));
        } else {
            let args = args
                .iter()
                .map(|a| parse_term(a, line))
                .collect::<anyhow::Result<_>>()?;
            pipeline.push(Cmd::Call(first.clone(), args));
        }
    }
    Ok(pipeline)
}

fn is_literal(word: &str) -> bool {
    word == "true" || word == "false" || word.parse::<i64>().is_ok()
}

/// Splits an action into words: `|`, string literals (kept quoted) and the rest.
fn split_words(text: &str, line: usize) -> anyhow::Result<Vec<String>> {
    let mut words = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '|' {
            chars.next();
            words.push("|".to_string());
        } else if c == '"' {
            let mut word = String::from(chars.next().unwrap_or('"'));
            let mut closed = false;
            while let Some(c) = chars.next() {
                word.push(c);
                if c == '\\' {
                    if let Some(escaped) = chars.next() {
                        word.push(escaped);
                    }
                } else if c == '"' {
                    closed = true;
                    break;
                }
            }
            if !closed {
                bail!("line {line}: unterminated string in `{text}`");
            }
            words.push(word);
        } else if c == '(' || c == ')' || c == '$' || c == '`' || c == '\'' {
            bail!("line {line}: `{c}` is not supported by xtask's renderer (in `{text}`)");
        } else {
            let mut word = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() || c == '|' {
                    break;
                }
                word.push(c);
                chars.next();
            }
            words.push(word);
        }
    }
    Ok(words)
}

fn parse_term(word: &str, line: usize) -> anyhow::Result<Term> {
    if word == "." {
        return Ok(Term::Field(Vec::new()));
    }
    if let Some(path) = word.strip_prefix('.') {
        let parts: Vec<String> = path.split('.').map(str::to_string).collect();
        let valid =
            |p: &String| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !parts.iter().all(valid) {
            bail!("line {line}: `{word}` is not a field path");
        }
        return Ok(Term::Field(parts));
    }
    if word.starts_with('"') {
        let value: String = serde_json::from_str(word)
            .map_err(|e| anyhow!("line {line}: string literal {word}: {e}"))?;
        return Ok(Term::Literal(Value::String(value)));
    }
    if let Ok(n) = word.parse::<i64>() {
        return Ok(Term::Literal(Value::from(n)));
    }
    match word {
        "true" => Ok(Term::Literal(Value::Bool(true))),
        "false" => Ok(Term::Literal(Value::Bool(false))),
        _ => bail!("line {line}: `{word}` is not a value (only .Field paths and literals)"),
    }
}

fn emit(nodes: &[Node], root: &Value, out: &mut String) -> anyhow::Result<()> {
    for node in nodes {
        match node {
            Node::Text(t) => out.push_str(t),
            Node::Output(pipeline, line) => {
                let value = eval(pipeline, root).with_context(|| format!("line {line}"))?;
                out.push_str(&print(value).with_context(|| format!("line {line}"))?);
            }
            Node::If {
                cond,
                then,
                otherwise,
                line,
            } => {
                let value = eval(cond, root).with_context(|| format!("line {line}"))?;
                emit(
                    if truthy(value.as_ref()) {
                        then
                    } else {
                        otherwise
                    },
                    root,
                    out,
                )?;
            }
        }
    }
    Ok(())
}

/// A pipeline's value; `None` when a field is missing (Go's `<no value>`).
fn eval(pipeline: &Pipeline, root: &Value) -> anyhow::Result<Option<Value>> {
    let mut previous: Option<Option<Value>> = None;
    for cmd in pipeline {
        let result = match cmd {
            Cmd::Term(term) => {
                if previous.is_some() {
                    bail!("a value cannot take piped input");
                }
                term_value(term, root)
            }
            Cmd::Call(name, args) => {
                let mut args: Vec<Option<Value>> =
                    args.iter().map(|a| term_value(a, root)).collect();
                if let Some(p) = previous.take() {
                    args.push(p);
                }
                call(name, args)?
            }
        };
        previous = Some(result);
    }
    Ok(previous.flatten())
}

fn term_value(term: &Term, root: &Value) -> Option<Value> {
    match term {
        Term::Literal(v) => Some(v.clone()),
        Term::Field(path) => path
            .iter()
            .try_fold(root, |v, key| v.as_object()?.get(key))
            .cloned(),
    }
}

fn call(name: &str, args: Vec<Option<Value>>) -> anyhow::Result<Option<Value>> {
    let arity = |n: usize| -> anyhow::Result<()> {
        if args.len() == n {
            Ok(())
        } else {
            bail!("{name} takes {n} argument(s), got {}", args.len())
        }
    };
    let count = |v: &Option<Value>| -> anyhow::Result<usize> {
        v.as_ref()
            .and_then(Value::as_u64)
            .map(|n| n as usize)
            .ok_or_else(|| anyhow!("{name}: the width must be a number"))
    };
    Ok(Some(match name {
        "toYaml" => {
            arity(1)?;
            let value = args[0].clone().unwrap_or(Value::Null);
            Value::String(to_yaml(&value).trim_end_matches('\n').to_string())
        }
        "nindent" | "indent" => {
            arity(2)?;
            let width = count(&args[0])?;
            let text = print(args[1].clone())?;
            let pad = " ".repeat(width);
            let indented = format!("{pad}{}", text.replace('\n', &format!("\n{pad}")));
            Value::String(if name == "nindent" {
                format!("\n{indented}")
            } else {
                indented
            })
        }
        "quote" => {
            arity(1)?;
            let text = print(args[0].clone())?;
            Value::String(serde_json::to_string(&text)?)
        }
        "default" => {
            arity(2)?;
            let given = &args[1];
            return Ok(if truthy(given.as_ref()) {
                given.clone()
            } else {
                args[0].clone()
            });
        }
        "not" => {
            arity(1)?;
            Value::Bool(!truthy(args[0].as_ref()))
        }
        _ => bail!("function `{name}` is not supported by xtask's renderer"),
    }))
}

/// Go templates' truth: false, 0, nil and empty strings, lists and maps are false.
fn truthy(value: Option<&Value>) -> bool {
    match value {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64() != Some(0.0),
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
    }
}

/// How `{{ }}` prints a value. Missing values are an error here (Helm would print nothing).
fn print(value: Option<Value>) -> anyhow::Result<String> {
    match value {
        None | Some(Value::Null) => bail!("missing value (a typo in a .Values path?)"),
        Some(Value::String(s)) => Ok(s),
        Some(v @ (Value::Bool(_) | Value::Number(_))) => Ok(v.to_string()),
        Some(_) => bail!("a map or list prints as Go syntax: use `toYaml`"),
    }
}

/// `toYaml`: block style, keys sorted, sequences not indented under their key (as Helm's
/// YAML library writes them); strings quoted unless plainly strings.
fn to_yaml(value: &Value) -> String {
    let mut out = String::new();
    match value {
        Value::Object(m) if !m.is_empty() => yaml_block(value, 0, &mut out),
        Value::Array(a) if !a.is_empty() => yaml_block(value, 0, &mut out),
        scalar => {
            out.push_str(&yaml_scalar(scalar));
            out.push('\n');
        }
    }
    out
}

fn is_block(value: &Value) -> bool {
    match value {
        Value::Object(m) => !m.is_empty(),
        Value::Array(a) => !a.is_empty(),
        _ => false,
    }
}

fn yaml_block(value: &Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match value {
        Value::Object(map) => {
            let sorted: BTreeMap<&String, &Value> = map.iter().collect();
            for (key, v) in sorted {
                out.push_str(&format!("{pad}{}:", yaml_string(key)));
                match v {
                    Value::Object(_) if is_block(v) => {
                        out.push('\n');
                        yaml_block(v, indent + 2, out);
                    }
                    Value::Array(_) if is_block(v) => {
                        out.push('\n');
                        yaml_block(v, indent, out);
                    }
                    _ => out.push_str(&format!(" {}\n", yaml_scalar(v))),
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                if is_block(item) {
                    let mut inner = String::new();
                    yaml_block(item, indent + 2, &mut inner);
                    // The item's first line starts after "- " instead of its indentation.
                    out.push_str(&pad);
                    out.push_str("- ");
                    out.push_str(&inner[indent + 2..]);
                } else {
                    out.push_str(&format!("{pad}- {}\n", yaml_scalar(item)));
                }
            }
        }
        scalar => out.push_str(&format!("{pad}{}\n", yaml_scalar(scalar))),
    }
}

fn yaml_scalar(value: &Value) -> String {
    match value {
        Value::Null => "null".to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => yaml_string(s),
        Value::Object(_) => "{}".to_string(),
        Value::Array(_) => "[]".to_string(),
    }
}

/// A string plain when YAML (1.1 or 1.2) cannot read it as anything else, else JSON-quoted
/// (a JSON string is a valid double-quoted YAML scalar).
fn yaml_string(s: &str) -> String {
    const SPECIAL: &[&str] = &[
        "y", "n", "yes", "no", "on", "off", "true", "false", "null", "~",
    ];
    let plain = s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '/' || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._/-".contains(c))
        && !SPECIAL.contains(&s.to_ascii_lowercase().as_str());
    if plain {
        s.to_string()
    } else {
        Value::String(s.to_string()).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn root(values: Value) -> Value {
        json!({"Values": values, "Release": {"Namespace": "ns"}, "Chart": {"AppVersion": "1.2"}})
    }

    fn r(source: &str, values: Value) -> String {
        render(source, &root(values)).unwrap_or_else(|e| panic!("{e:#}"))
    }

    #[test]
    fn fields_and_literals() {
        let values = json!({"image": {"repo": "r", "tag": "1.0"}, "n": 3, "on": true});
        assert_eq!(
            r(
                "image: \"{{ .Values.image.repo }}:{{ .Values.image.tag }}\"",
                values.clone()
            ),
            "image: \"r:1.0\""
        );
        assert_eq!(
            r(
                "{{ .Release.Namespace }}/{{ .Chart.AppVersion }}",
                json!({})
            ),
            "ns/1.2"
        );
        assert_eq!(r("{{ .Values.n }} {{ .Values.on }}", values), "3 true");
        assert_eq!(r("{{ \"a\\\"b\" | quote }}", json!({})), r#""a\"b""#);
        assert_eq!(r("{{ .Values.x | default \"d\" }}", json!({"x": ""})), "d");
        assert_eq!(r("{{ .Values.x | default \"d\" }}", json!({"x": "v"})), "v");
    }

    #[test]
    fn trimming_if_else() {
        let tpl = "a:\n  {{- if .Values.x }}\n  b: 1\n  {{- else }}\n  b: 2\n  {{- end }}\nc: {{ if not .Values.x }}\"off\"{{ else }}\"on\"{{ end }}\n{{/* gone */ -}}\nd: 4\n";
        assert_eq!(r(tpl, json!({"x": true})), "a:\n  b: 1\nc: \"on\"\nd: 4\n");
        assert_eq!(
            r(tpl, json!({"x": false})),
            "a:\n  b: 2\nc: \"off\"\nd: 4\n"
        );
        // A missing value is false in a condition.
        assert_eq!(r(tpl, json!({})), "a:\n  b: 2\nc: \"off\"\nd: 4\n");
        let nested = "{{- if .Values.a }}A{{ if .Values.b }}B{{ end }}{{ end }}";
        assert_eq!(r(nested, json!({"a": 1, "b": 0})), "A");
        assert_eq!(r(nested, json!({"a": 1, "b": [1]})), "AB");
    }

    #[test]
    fn to_yaml_nindent() {
        let values = json!({"res": {"limits": {"cpu": "2", "memory": "1Gi"}, "requests": {}},
                            "tol": [{"operator": "Exists"}, {"key": "k", "effect": "NoSchedule"}],
                            "list": ["on", "a b", 1, [2, 3]]});
        assert_eq!(
            r(
                "resources:\n  {{- toYaml .Values.res | nindent 2 }}\n",
                values.clone()
            ),
            "resources:\n  limits:\n    cpu: \"2\"\n    memory: \"1Gi\"\n  requests: {}\n"
        );
        assert_eq!(
            r("t:\n{{ toYaml .Values.tol | indent 2 }}", values.clone()),
            "t:\n  - operator: Exists\n  - effect: NoSchedule\n    key: k"
        );
        assert_eq!(
            to_yaml(&values["list"]),
            "- \"on\"\n- \"a b\"\n- 1\n- - 2\n  - 3\n"
        );
        assert_eq!(
            to_yaml(&json!({"a": [{"b": {"c": 1}}]})),
            "a:\n- b:\n    c: 1\n"
        );
    }

    #[test]
    fn helm_merge() {
        let mut base = json!({"a": {"b": 1, "c": 2}, "l": [1, 2], "d": 1});
        merge(&mut base, json!({"a": {"c": 3}, "l": [], "d": null}));
        assert_eq!(base, json!({"a": {"b": 1, "c": 3}, "l": []}));
    }

    #[test]
    fn refuses_what_it_does_not_know() {
        let fail = |src: &str| {
            let error = render(src, &root(json!({"m": {"k": "v"}}))).expect_err(src);
            format!("{error:#}")
        };
        assert!(fail("{{ range .Values.m }}x{{ end }}").contains("not supported"));
        assert!(fail("{{ include \"x\" . }}").contains("not supported"));
        assert!(fail("{{ .Values.m | upper }}").contains("upper"));
        assert!(fail("{{ if .Values.m }}x").contains("without its `end`"));
        assert!(fail("x{{ end }}").contains("without"));
        assert!(fail("{{ .Values.typo }}").contains("missing value"));
        assert!(fail("{{ .Values.m }}").contains("toYaml"));
    }
}
