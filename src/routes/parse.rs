//! Parsing and validating routes files, with a `file:line:column` for every
//! error.
//!
//! marked-yaml keeps a source position on every key and scalar, which plain
//! serde YAML loses. It is told to keep quoted scalars apart from plain ones
//! (`prevent_coercion`), so `"10"` is refused as a string where `10` is a
//! number, as a YAML-aware editor would read them.
//!
//! Errors are collected, never returned early: one push shows everything to
//! fix. The exceptions are errors that stop the YAML reader itself (syntax,
//! a key repeated in one mapping, anchors, tags): those end the file they
//! are in, though the other files are still checked.

use std::collections::BTreeMap;
use std::str::FromStr;

use marked_yaml::types::MarkedScalarNode;
use marked_yaml::{LoadError, LoaderOptions, Node, Span};

use super::{ClientName, Route, RouteError, RouteSet, Weights, WeightsError, WEIGHT_TOTAL};
use crate::model::{ServiceName, Version};

/// The keys that turn a service's entry into the long form.
const WEIGHTS_KEY: &str = "weights";
const CLIENTS_KEY: &str = "clients";

/// Where a weight is explained in every message about one.
const WEIGHT_RULE: &str = "a weight is a whole number from 0 to 100";

/// Parses and validates a whole set of files (path relative to the repo root,
/// content). The caller chooses the files (those under the routes directory
/// ending `.yaml`/`.yml`); every file given here is parsed.
///
/// All errors of all files are returned, in file order and, within a file, in
/// document order; a service defined in two places is reported at the second.
pub fn parse_files<'a>(files: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<RouteSet, Vec<RouteError>> {
    let mut parser = Parser::default();
    for (file, content) in files {
        parser.file(file, content);
    }
    if parser.errors.is_empty() {
        Ok(parser.set)
    } else {
        Err(parser.errors)
    }
}

/// State across the files of one commit.
#[derive(Default)]
struct Parser {
    /// The routes found so far; thrown away if any error is found.
    set: RouteSet,
    /// Where each service was first defined (`file:line:column`), to name
    /// both places when it is defined again, even if its body is invalid.
    defined: BTreeMap<ServiceName, String>,
    /// Every error of the commit so far.
    errors: Vec<RouteError>,
}

/// A 1-based (line, column) from a span; 1:1 if marked-yaml gave none.
fn position(span: &Span) -> (usize, usize) {
    span.start().map_or((1, 1), |m| (m.line(), m.column()))
}

/// How a node reads in a message: "nothing", "a list", "`100`"...
fn describe(node: &Node) -> String {
    match node {
        Node::Scalar(s) if is_null(s) => "nothing".to_string(),
        Node::Scalar(s) if !s.may_coerce() => format!("the string {:?}", s.as_str()),
        Node::Scalar(s) => format!("`{}`", s.as_str()),
        Node::Sequence(_) => "a list".to_string(),
        Node::Mapping(_) => "a mapping".to_string(),
    }
}

/// True for a plain `~`, `null` or empty value: YAML's null.
fn is_null(s: &MarkedScalarNode) -> bool {
    s.may_coerce() && matches!(s.as_str(), "" | "~" | "null" | "Null" | "NULL")
}

impl Parser {
    /// Records an error at the start of `span`.
    fn error(&mut self, file: &str, span: &Span, message: String) {
        let (line, column) = position(span);
        self.errors.push(RouteError { file: file.to_string(), line, column, message });
    }

    /// Parses one file into `self.set`, recording its errors.
    fn file(&mut self, file: &str, content: &str) {
        let options = LoaderOptions::default().error_on_duplicate_keys(true).prevent_coercion(true);
        let root = match marked_yaml::parse_yaml_with_options(0, content, options) {
            Ok(root) => root,
            // `---` alone, or a bare `~`: an empty document, i.e. no services.
            Err(LoadError::TopLevelMustBeMapping(_)) if Outline::of(content).top_is_null == Some(true) => return,
            Err(e) => {
                self.load_error(file, e);
                return;
            }
        };
        let Some(root) = root.as_mapping() else {
            // marked-yaml only returns a mapping at the top level.
            self.errors.push(RouteError {
                file: file.to_string(),
                line: 1,
                column: 1,
                message: TOP_LEVEL_MESSAGE.to_string(),
            });
            return;
        };
        self.second_document(file, &Outline::of(content));
        for (key, value) in root.iter() {
            self.service(file, key, value);
        }
    }

    /// marked-yaml reads only the first document of a stream and ignores the
    /// rest: refuse a second one rather than silently drop its routes.
    fn second_document(&mut self, file: &str, outline: &Outline) {
        if let Some(&(line, column)) = outline.documents.get(1) {
            self.errors.push(RouteError {
                file: file.to_string(),
                line,
                column,
                message: "a routes file holds one YAML document; move what follows this `---` into the first document or another file".to_string(),
            });
        }
    }

    /// Turns an error of the YAML reader into a located, readable one.
    fn load_error(&mut self, file: &str, e: LoadError) {
        let (marker, message) = match e {
            LoadError::TopLevelMustBeMapping(m) | LoadError::TopLevelMustBeSequence(m) => {
                (m, TOP_LEVEL_MESSAGE.to_string())
            }
            LoadError::UnexpectedAnchor(m) => {
                (m, "this value carries a YAML anchor (`&name`); anchors and aliases are not supported in routes files, write the values out".to_string())
            }
            LoadError::MappingKeyMustBeScalar(m) => {
                (m, "a key must be a plain name (a service, version or client), not a list or mapping".to_string())
            }
            LoadError::UnexpectedTag(m) => {
                (m, "this value carries a YAML tag (`!!int`, `!name`); tags are not supported in routes files, write the plain value".to_string())
            }
            LoadError::ScanError(m, scan) => (m, format!("YAML syntax error: {}", scan.info())),
            LoadError::DuplicateKey(dup) => {
                let (line, column) = position(dup.prev_key.span());
                let message = format!(
                    "{:?} is already defined at {file}:{line}:{column}; a service, version, client or key appears once in a mapping",
                    dup.key.as_str()
                );
                let (line, column) = position(dup.key.span());
                self.errors.push(RouteError { file: file.to_string(), line, column, message });
                return;
            }
        };
        self.errors.push(RouteError { file: file.to_string(), line: marker.line(), column: marker.column(), message });
    }

    /// One top-level entry: a service and its route.
    fn service(&mut self, file: &str, key: &MarkedScalarNode, value: &Node) {
        let raw = key.as_str();
        let name = match ServiceName::from_str(raw) {
            // The dstack form `//services/barker` is accepted on the command
            // line but not here: the schema and the file must agree on keys.
            Ok(name) if name.as_str() == raw => Some(name),
            Ok(name) => {
                self.error(file, key.span(), format!("service key {raw:?} must be the plain name: write `{name}`"));
                None
            }
            Err(e) => {
                self.error(file, key.span(), e.to_string());
                None
            }
        };
        if let Some(name) = &name {
            let (line, column) = position(key.span());
            let here = format!("{file}:{line}:{column}");
            if let Some(first) = self.defined.get(name) {
                let message = format!("{name}: service is already defined at {first}; define each service once");
                self.error(file, key.span(), message);
            } else {
                self.defined.insert(name.clone(), here);
            }
        }
        // An invalid name still gets its body checked: all errors at once.
        let route = self.route(file, raw, key, value);
        if let (Some(name), Some(route)) = (name, route) {
            self.set.routes.entry(name).or_insert(route);
        }
    }

    /// A service's value: the short form (a weight map) or the long form.
    fn route(&mut self, file: &str, service: &str, key: &MarkedScalarNode, value: &Node) -> Option<Route> {
        let Some(map) = value.as_mapping() else {
            let message = format!(
                "{service}: expected versions with weights (e.g. `{service}: {{v1: 100}}`) or the long form with `weights:`, found {}",
                describe(value)
            );
            self.error(file, value_span(key, value), message);
            return None;
        };
        let long = map.keys().any(|k| k.as_str() == WEIGHTS_KEY || k.as_str() == CLIENTS_KEY);
        if !long {
            let weights = self.weights(file, service, key, value)?;
            return Some(Route { weights, clients: BTreeMap::new() });
        }

        // Long form: `weights` is required, `clients` optional, nothing else.
        let mut weights = None;
        let mut clients = Some(BTreeMap::new());
        let mut weights_seen = false;
        for (k, v) in map.iter() {
            match k.as_str() {
                WEIGHTS_KEY => {
                    weights_seen = true;
                    weights = self.weights(file, service, k, v);
                }
                CLIENTS_KEY => clients = self.clients(file, service, k, v),
                other => {
                    let message = format!(
                        "{service}: unknown key {other:?}; with `weights` or `clients` present (the long form) only those two keys are allowed, so list versions under `weights:`"
                    );
                    self.error(file, k.span(), message);
                }
            }
        }
        if !weights_seen {
            let message = format!("{service}: the long form needs `weights:` (e.g. `weights: {{v1: 100}}`)");
            self.error(file, key.span(), message);
        }
        Some(Route { weights: weights?, clients: clients? })
    }

    /// The `clients:` of a long-form route: client name -> weight map.
    fn clients(
        &mut self,
        file: &str,
        service: &str,
        key: &MarkedScalarNode,
        value: &Node,
    ) -> Option<BTreeMap<ClientName, Weights>> {
        let Some(map) = value.as_mapping() else {
            let message = format!(
                "{service}: `clients` maps client names to weights (e.g. `clients: {{monolith: {{v1: 100}}}}`), found {}",
                describe(value)
            );
            self.error(file, value_span(key, value), message);
            return None;
        };
        let mut clients = Some(BTreeMap::new());
        for (k, v) in map.iter() {
            let name = ClientName::from_str(k.as_str());
            if let Err(e) = &name {
                self.error(file, k.span(), format!("{service}: {e}"));
            }
            let weights = self.weights(file, &format!("{service}: client {}", k.as_str()), k, v);
            match (name, weights, clients.as_mut()) {
                (Ok(name), Some(weights), Some(clients)) => {
                    clients.insert(name, weights);
                }
                _ => clients = None,
            }
        }
        clients
    }

    /// A version -> weight map, owned by `key` (a service, `weights` or a
    /// client). `context` starts every message (`barker`, `barker: client x`).
    fn weights(&mut self, file: &str, context: &str, key: &MarkedScalarNode, value: &Node) -> Option<Weights> {
        let Some(map) = value.as_mapping() else {
            let message = format!(
                "{context}: expected versions with weights (e.g. `{{v1: 90, v2: 10}}`), found {}",
                describe(value)
            );
            self.error(file, value_span(key, value), message);
            return None;
        };
        let mut weights = Some(BTreeMap::new());
        for (k, v) in map.iter() {
            let version = Version::from_str(k.as_str());
            if let Err(e) = &version {
                self.error(file, k.span(), format!("{context}: {e}"));
            }
            let weight = self.weight(file, context, k, v);
            match (version, weight, weights.as_mut()) {
                (Ok(version), Some(weight), Some(weights)) => {
                    weights.insert(version, weight);
                }
                _ => weights = None,
            }
        }
        // A sum over invalid entries would only repeat those errors.
        let weights = weights?;
        match Weights::new(weights) {
            Ok(weights) => Some(weights),
            Err(e) => {
                // A sum concerns the whole map: point at its first entry, as
                // marked-yaml places a block mapping's own start oddly.
                let span = map.keys().next().map_or(map.span(), |k| k.span());
                let message = match e {
                    WeightsError::Empty => {
                        format!("{context}: no weights; list at least one version with its weight (e.g. `{{v1: 100}}`)")
                    }
                    e => format!("{context}: {e}"),
                };
                self.error(file, span, message);
                None
            }
        }
    }

    /// One weight: a plain whole number from 0 to 100.
    fn weight(&mut self, file: &str, context: &str, key: &MarkedScalarNode, value: &Node) -> Option<u32> {
        let version = key.as_str();
        let problem = match value {
            Node::Scalar(s) if is_null(s) => format!("{version} has no weight; {WEIGHT_RULE}"),
            Node::Scalar(s) if !s.may_coerce() => {
                format!("weight {:?} for {version} is a string: write it without quotes; {WEIGHT_RULE}", s.as_str())
            }
            Node::Scalar(s) => {
                let text = s.as_str();
                // Only plain decimal digits, no sign, no leading zero: YAML
                // readers disagree on `010`, `0x10` and `+10`.
                let digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
                if digits && text.len() > 1 && text.starts_with('0') {
                    let plain = text.trim_start_matches('0');
                    let plain = if plain.is_empty() { "0" } else { plain };
                    format!("weight {text} for {version} has a leading zero, which YAML readers disagree on: write {plain}; {WEIGHT_RULE}")
                } else if digits {
                    match text.parse::<u32>() {
                        Ok(weight) if weight <= WEIGHT_TOTAL => return Some(weight),
                        _ => format!("weight {text} for {version} is more than 100; {WEIGHT_RULE}"),
                    }
                } else if text.starts_with('-') && text[1..].parse::<f64>().is_ok() {
                    format!("weight {text} for {version} is negative; {WEIGHT_RULE}")
                } else if text.parse::<f64>().is_ok() || matches!(text, ".inf" | ".Inf" | ".INF" | ".nan" | ".NaN") {
                    format!("weight {text} for {version} is not a whole number; {WEIGHT_RULE}")
                } else {
                    format!("weight `{text}` for {version} is not a number; {WEIGHT_RULE}")
                }
            }
            other => format!("weight for {version} is {}; {WEIGHT_RULE}", describe(other)),
        };
        self.error(file, value_span(key, value), format!("{context}: {problem}"));
        None
    }
}

/// What a top-level that is not a mapping is told.
const TOP_LEVEL_MESSAGE: &str =
    "the top level must be a mapping of service names to routes (e.g. `barker: {v1: 90, v2: 10}`)";

/// Where to point at a value: at the value itself, or at its key when the
/// value is empty (marked-yaml places an empty value on the next line).
fn value_span<'a>(key: &'a MarkedScalarNode, value: &'a Node) -> &'a Span {
    match value {
        Node::Scalar(s) if s.may_coerce() && s.as_str().is_empty() => key.span(),
        _ => value.span(),
    }
}

/// The document structure of a file, as seen by yaml-rust2: the parser
/// marked-yaml is built on, so both agree on what the file holds.
#[derive(Default)]
struct Outline {
    /// Where each document starts (1-based line and column).
    documents: Vec<(usize, usize)>,
    /// Whether the first document's top node is a plain null (`~`, empty).
    top_is_null: Option<bool>,
}

impl Outline {
    fn of(content: &str) -> Outline {
        let mut outline = Outline::default();
        // A syntax error ends the outline early; marked-yaml reports it.
        let _ = yaml_rust2::parser::Parser::new_from_str(content).load(&mut outline, true);
        outline
    }
}

impl yaml_rust2::parser::MarkedEventReceiver for Outline {
    fn on_event(&mut self, event: yaml_rust2::Event, mark: yaml_rust2::scanner::Marker) {
        use yaml_rust2::Event;
        match event {
            Event::DocumentStart => self.documents.push((mark.line(), mark.col() + 1)),
            _ if self.documents.len() != 1 || self.top_is_null.is_some() => {}
            Event::Scalar(value, style, ..) => {
                let plain = style == yaml_rust2::scanner::TScalarStyle::Plain;
                self.top_is_null = Some(plain && matches!(value.as_str(), "" | "~" | "null" | "Null" | "NULL"));
            }
            Event::MappingStart(..) | Event::SequenceStart(..) | Event::Alias(_) => self.top_is_null = Some(false),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The errors of one file, as displayed.
    fn errors(content: &str) -> Vec<String> {
        match parse_files([("routes/barker.yaml", content)]) {
            Ok(set) => panic!("accepted: {set:?}"),
            Err(errors) => errors.iter().map(ToString::to_string).collect(),
        }
    }

    fn one_error(content: &str) -> String {
        let errors = errors(content);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        errors.into_iter().next().unwrap()
    }

    fn weights(pairs: &[(&str, u32)]) -> Weights {
        Weights::new(pairs.iter().map(|(k, w)| (k.parse().unwrap(), *w)).collect()).unwrap()
    }

    #[test]
    fn short_form() {
        let set = parse_files([("routes/barker.yaml", "# routes/barker.yaml\nbarker:\n  v1: 90\n  v2: 10\n")]).unwrap();
        let route = &set.routes[&"barker".parse().unwrap()];
        assert_eq!(route.weights, weights(&[("v1", 90), ("v2", 10)]));
        assert!(route.clients.is_empty());
    }

    #[test]
    fn long_form_and_several_services_per_file() {
        let yaml = "\
barker:
  weights: {v1: 90, v2: 10}
  clients:
    monolith: {v1: 70, v2: 30}
    main.example.com:
      v2: 100
emitter: {v1: 100, \"2\": 0}
transform:
  weights:
    v1: 100
";
        let set = parse_files([("routes/all.yml", yaml)]).unwrap();
        assert_eq!(set.routes.len(), 3);
        let barker = &set.routes[&"barker".parse().unwrap()];
        assert_eq!(barker.weights, weights(&[("v1", 90), ("v2", 10)]));
        assert_eq!(barker.clients[&"monolith".parse().unwrap()], weights(&[("v1", 70), ("v2", 30)]));
        assert_eq!(barker.clients[&"main.example.com".parse().unwrap()], weights(&[("v2", 100)]));
        assert_eq!(set.routes[&"emitter".parse().unwrap()].weights, weights(&[("v1", 100), ("2", 0)]));
        assert!(set.routes[&"transform".parse().unwrap()].clients.is_empty());
    }

    #[test]
    fn empty_and_comment_only_files_hold_no_services() {
        for empty in ["", "\n", "# nothing yet\n", "---\n", "---\n# c\n", "~\n", "{}\n"] {
            assert_eq!(parse_files([("routes/x.yaml", empty)]), Ok(RouteSet::default()), "{empty:?}");
        }
        assert_eq!(parse_files([]), Ok(RouteSet::default()));
    }

    #[test]
    fn the_documented_sum_error() {
        assert_eq!(
            one_error("# routes/barker.yaml\nbarker:\n  v1: 90\n  v2: 30\n"),
            "routes/barker.yaml:3:3: barker: weights sum to 120, they must sum to 100"
        );
        assert_eq!(
            one_error("barker: {v1: 90, v2: 30}\n"),
            "routes/barker.yaml:1:10: barker: weights sum to 120, they must sum to 100"
        );
    }

    #[test]
    fn service_name_errors() {
        assert_eq!(
            one_error("emitter: {v1: 100}\nBarker:\n  v1: 100\n"),
            "routes/barker.yaml:2:1: invalid service name \"Barker\": a name is 1 to 63 characters of a-z, 0-9, '.', '_' and '-', starting with a letter and not ending in '.' (e.g. `emitter`, `barker.internal` or `//services/emitter`)"
        );
        assert_eq!(
            one_error("//services/barker: {v1: 100}\n"),
            "routes/barker.yaml:1:1: service key \"//services/barker\" must be the plain name: write `barker`"
        );
    }

    #[test]
    fn version_errors() {
        assert_eq!(
            one_error("barker:\n  v1: 90\n  -v2: 10\n"),
            "routes/barker.yaml:3:3: barker: invalid version \"-v2\": a version is 1 to 32 characters of A-Z, a-z, 0-9, '.', '_' and '-', starting with a letter or digit (e.g. `v1`, `2`, `v2-canary`)"
        );
    }

    #[test]
    fn weight_value_errors() {
        let cases = [
            ("barker:\n  v1: 101\n", "2:7: barker: weight 101 for v1 is more than 100; a weight is a whole number from 0 to 100"),
            ("barker:\n  v1: 99999999999\n", "2:7: barker: weight 99999999999 for v1 is more than 100; a weight is a whole number from 0 to 100"),
            ("barker:\n  v1: -10\n", "2:7: barker: weight -10 for v1 is negative; a weight is a whole number from 0 to 100"),
            ("barker:\n  v1: 99.5\n", "2:7: barker: weight 99.5 for v1 is not a whole number; a weight is a whole number from 0 to 100"),
            ("barker:\n  v1: 1e2\n", "2:7: barker: weight 1e2 for v1 is not a whole number; a weight is a whole number from 0 to 100"),
            ("barker:\n  v1: 0x64\n", "2:7: barker: weight `0x64` for v1 is not a number; a weight is a whole number from 0 to 100"),
            ("barker:\n  v1: 0100\n", "2:7: barker: weight 0100 for v1 has a leading zero, which YAML readers disagree on: write 100; a weight is a whole number from 0 to 100"),
            ("barker:\n  v1: \"100\"\n", "2:7: barker: weight \"100\" for v1 is a string: write it without quotes; a weight is a whole number from 0 to 100"),
            ("barker:\n  v1: lots\n", "2:7: barker: weight `lots` for v1 is not a number; a weight is a whole number from 0 to 100"),
            ("barker:\n  v1:\n", "2:3: barker: v1 has no weight; a weight is a whole number from 0 to 100"),
            ("barker:\n  v1: ~\n", "2:7: barker: v1 has no weight; a weight is a whole number from 0 to 100"),
            ("barker:\n  v1: [100]\n", "2:7: barker: weight for v1 is a list; a weight is a whole number from 0 to 100"),
        ];
        for (yaml, want) in cases {
            assert_eq!(one_error(yaml), format!("routes/barker.yaml:{want}"), "{yaml:?}");
        }
    }

    #[test]
    fn structure_errors() {
        let cases = [
            ("barker: {}\n", "1:9: barker: no weights; list at least one version with its weight (e.g. `{v1: 100}`)"),
            ("barker:\n", "1:1: barker: expected versions with weights (e.g. `barker: {v1: 100}`) or the long form with `weights:`, found nothing"),
            ("barker: 100\n", "1:9: barker: expected versions with weights (e.g. `barker: {v1: 100}`) or the long form with `weights:`, found `100`"),
            ("barker: [v1, v2]\n", "1:9: barker: expected versions with weights (e.g. `barker: {v1: 100}`) or the long form with `weights:`, found a list"),
            ("- barker\n", "1:1: the top level must be a mapping of service names to routes (e.g. `barker: {v1: 90, v2: 10}`)"),
            ("barker\n", "1:1: the top level must be a mapping of service names to routes (e.g. `barker: {v1: 90, v2: 10}`)"),
            (
                "barker:\n  weights: {v1: 100}\n  v2: 0\n",
                "3:3: barker: unknown key \"v2\"; with `weights` or `clients` present (the long form) only those two keys are allowed, so list versions under `weights:`",
            ),
            ("barker:\n  clients: {}\n", "1:1: barker: the long form needs `weights:` (e.g. `weights: {v1: 100}`)"),
            ("barker:\n  weights: {}\n", "2:12: barker: no weights; list at least one version with its weight (e.g. `{v1: 100}`)"),
            ("barker:\n  weights: {v1: 100}\n  clients: [a]\n", "3:12: barker: `clients` maps client names to weights (e.g. `clients: {monolith: {v1: 100}}`), found a list"),
            ("barker:\n  weights: {v1: 100}\n  clients:\n    monolith: {v1: 70, v2: 20}\n", "4:16: barker: client monolith: weights sum to 90, they must sum to 100"),
            ("barker:\n  weights: {v1: 100}\n  clients:\n    monolith: {v1: 170}\n", "4:20: barker: client monolith: weight 170 for v1 is more than 100; a weight is a whole number from 0 to 100"),
            (
                "barker:\n  weights: {v1: 100}\n  clients:\n    -mono: {v1: 100}\n",
                "4:5: barker: invalid client name \"-mono\": a client name is 1 to 63 characters of A-Z, a-z, 0-9, '.', '_' and '-', starting with a letter or digit (e.g. `monolith` or a host name)",
            ),
        ];
        for (yaml, want) in cases {
            assert_eq!(one_error(yaml), format!("routes/barker.yaml:{want}"), "{yaml:?}");
        }
    }

    #[test]
    fn yaml_errors_carry_positions() {
        let cases = [
            ("barker:\n  v1: 90\n v2: 10\n", "3:4: YAML syntax error: while parsing a block mapping, did not find expected key"),
            ("barker:\n  v1: 90\n   v2: 10\n", "3:6: YAML syntax error: mapping values are not allowed in this context"),
            ("barker: {v1: 90, v2: 10\n", "2:1: YAML syntax error: while parsing a flow mapping, did not find expected ',' or '}'"),
            ("barker: &w {v1: 100}\n", "1:12: this value carries a YAML anchor (`&name`); anchors and aliases are not supported in routes files, write the values out"),
            ("barker: {v1: !!int 100}\n", "1:20: this value carries a YAML tag (`!!int`, `!name`); tags are not supported in routes files, write the plain value"),
            ("? [barker]\n: {v1: 100}\n", "1:3: a key must be a plain name (a service, version or client), not a list or mapping"),
            (
                "barker:\n  v1: 50\n  v1: 50\n",
                "3:3: \"v1\" is already defined at routes/barker.yaml:2:3; a service, version, client or key appears once in a mapping",
            ),
            (
                "barker: {v1: 100}\nbarker: {v1: 100}\n",
                "2:1: \"barker\" is already defined at routes/barker.yaml:1:1; a service, version, client or key appears once in a mapping",
            ),
            (
                "barker: {v1: 100}\n...\n--- # more\nemitter: {v1: 100}\n",
                "3:1: a routes file holds one YAML document; move what follows this `---` into the first document or another file",
            ),
            (
                "barker: {v1: 100}\n---\nemitter: {v1: 100}\n",
                "2:1: a routes file holds one YAML document; move what follows this `---` into the first document or another file",
            ),
        ];
        for (yaml, want) in cases {
            assert_eq!(one_error(yaml), format!("routes/barker.yaml:{want}"), "{yaml:?}");
        }
    }

    #[test]
    fn all_errors_of_a_commit_are_collected() {
        let files = [
            ("routes/a.yaml", "barker:\n  v1: 90\n  v2: 30\nEmitter: {v1: 100}\n"),
            ("routes/b.yaml", "barker: {v1: 100}\nsink:\n  weights: {v1: 101}\n  clients:\n    x: {v1: 1.5}\n"),
            ("routes/c.yaml", "oops: [\n"),
        ];
        let errors: Vec<String> = parse_files(files).unwrap_err().iter().map(ToString::to_string).collect();
        assert_eq!(
            errors,
            [
                "routes/a.yaml:2:3: barker: weights sum to 120, they must sum to 100",
                "routes/a.yaml:4:1: invalid service name \"Emitter\": a name is 1 to 63 characters of a-z, 0-9, '.', '_' and '-', starting with a letter and not ending in '.' (e.g. `emitter`, `barker.internal` or `//services/emitter`)",
                "routes/b.yaml:1:1: barker: service is already defined at routes/a.yaml:1:1; define each service once",
                "routes/b.yaml:3:17: sink: weight 101 for v1 is more than 100; a weight is a whole number from 0 to 100",
                "routes/b.yaml:5:13: sink: client x: weight 1.5 for v1 is not a whole number; a weight is a whole number from 0 to 100",
                "routes/c.yaml:2:1: YAML syntax error: while parsing a node, did not find expected node content",
            ]
        );
    }

    #[test]
    fn a_bad_service_name_still_gets_its_body_checked() {
        assert_eq!(
            errors("Barker: {v1: 90}\n"),
            [
                "routes/barker.yaml:1:1: invalid service name \"Barker\": a name is 1 to 63 characters of a-z, 0-9, '.', '_' and '-', starting with a letter and not ending in '.' (e.g. `emitter`, `barker.internal` or `//services/emitter`)",
                "routes/barker.yaml:1:10: Barker: weights sum to 90, they must sum to 100",
            ]
        );
    }

    #[test]
    fn duplicate_across_files_names_both_places() {
        let files = [
            ("routes/a.yaml", "# first\nbarker: {v1: 100}\n"),
            ("routes/z.yml", "emitter: {v1: 100}\nbarker: {v2: 100}\n"),
        ];
        let errors = parse_files(files).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!(
            errors[0].to_string(),
            "routes/z.yml:2:1: barker: service is already defined at routes/a.yaml:2:1; define each service once"
        );
    }

    #[test]
    fn columns_count_characters_and_crlf_lines_work() {
        assert_eq!(
            one_error("# é\r\nbarker:\r\n  \"v1\": 90\r\n  v2: 30\r\n"),
            "routes/barker.yaml:3:3: barker: weights sum to 120, they must sum to 100"
        );
        assert_eq!(
            one_error("barker: {\"é\": 100}\n"),
            "routes/barker.yaml:1:10: barker: invalid version \"é\": a version is 1 to 32 characters of A-Z, a-z, 0-9, '.', '_' and '-', starting with a letter or digit (e.g. `v1`, `2`, `v2-canary`)"
        );
    }

    #[test]
    fn odd_input_never_panics() {
        let odd = [
            "a: *x\n",
            "a: &x 1\nb: *x\n",
            "%YAML 1.2\n---\nbarker: {v1: 100}\n",
            "barker: {v1: 100}\n...\n",
            "barker: {v1: 100}\n...\n---\nx: 1\n",
            "\t\n",
            &"[".repeat(100_000),
            &format!("a: {}", "{b: ".repeat(10_000)),
            "\u{feff}barker: {v1: 100}\n",
            "? a\n",
            "a: !!binary aGk=\n",
        ];
        for yaml in odd {
            let _ = parse_files([("routes/x.yaml", yaml)]);
        }
    }
}
