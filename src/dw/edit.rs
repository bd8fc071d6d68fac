//! The comment-preserving editor of routes files, for `dw route set` and
//! `dw route add` (their arguments are parsed in [`super::assign`]).
//!
//! An edit is a few text splices at the positions marked-yaml reports, so
//! comments, key order, quoting and every other service stay exactly as the
//! operator wrote them, and the commit's diff shows only what moved. Every
//! result is validated with [`routes::parse_files`] and compared with what was
//! asked for before it is returned; nothing here touches the disk.

use std::collections::BTreeMap;
use std::ops::Range;

use marked_yaml::types::{MarkedMappingNode, MarkedScalarNode};
use marked_yaml::{LoaderOptions, Marker, Node};

use crate::model::{ClientName, ServiceName, Version};
use crate::routes::{self, Route, RouteError, Weights, WeightsError};

/// Why a routes file could not be edited. Each message states the rule and
/// what would be accepted.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    /// The requested split breaks the weight rules.
    #[error("the weights for {target}: {why}")]
    Weights { target: String, why: WeightsError },
    /// The file is not YAML, so there is nothing to edit in place.
    #[error("cannot read {file} as YAML ({message}); fix the file by hand first")]
    Yaml { file: String, message: String },
    /// The part to edit is written in a shape this editor does not rewrite.
    #[error(
        "{file}:{line}:{column}: cannot edit {what} in place; edit the file by hand, or write weights as `v1: 90` lines or a `{{v1: 90, v2: 10}}` map"
    )]
    Unsupported { file: String, line: usize, column: usize, what: String },
    /// A client's split was asked for a service that has no split of its own.
    #[error("{service} has no route in {file}, and a split for client {client} needs one for every other client to follow; set it first with `dw route set {service} VERSION=WEIGHT...`")]
    NoServiceRoute { file: String, service: ServiceName, client: ClientName },
    /// The file has errors the edit does not fix (their lines are the file's as it is).
    #[error("{file} has errors the edit does not fix, so it was not made; fix them first:{}", list(.errors))]
    AlreadyInvalid { file: String, errors: Vec<RouteError> },
    /// A valid file would become invalid (lines are those of the edited text).
    #[error("the edit would leave {file} invalid, so it was not made:{}", list(.errors))]
    Invalid { file: String, errors: Vec<RouteError> },
    /// The edit validated but does not say what was asked: a bug here, caught before it reaches git.
    #[error("editing {file} did not give the requested routes ({what}); the edit was not made, please report this")]
    Mismatch { file: String, what: String },
}

/// One error a line, indented under the message that introduces them.
fn list(errors: &[RouteError]) -> String {
    errors.iter().map(|e| format!("\n  {e}")).collect()
}

/// Sets the full weight map of `service` (for `client` when given: its entry
/// under `clients:`) in the text of one routes file.
///
/// Comments, key order and the other services are kept exactly as they are;
/// a changed number keeps the trailing comment after it (at the same column
/// when there is room). Versions not in `weights` are removed from the map,
/// new ones are added after the existing ones. A service not in the text is
/// appended in short form. A client entry on a short-form service converts it
/// to long form (`weights:` and `clients:`), keeping its comments. `file` is
/// the path used in messages (`routes/barker.yaml`).
///
/// The result is validated with [`routes::parse_files`]; if it is invalid, or
/// does not hold exactly what was asked with everything else unchanged, this
/// returns an error and no text.
pub fn set_weights(
    file: &str,
    text: &str,
    service: &ServiceName,
    client: Option<&ClientName>,
    weights: &BTreeMap<Version, u32>,
) -> Result<String, EditError> {
    let target = match client {
        None => service.to_string(),
        Some(client) => format!("{service} for client {client}"),
    };
    Weights::new(weights.clone()).map_err(|why| EditError::Weights { target, why })?;

    let options = LoaderOptions::default().error_on_duplicate_keys(true);
    let doc = Doc::new(file, text);
    let root = match marked_yaml::parse_yaml_with_options(0, text, options) {
        Ok(root) => root,
        // The parser's own messages are located: `file:line:column: ...`.
        Err(e) => match routes::parse_files([(file, text)]) {
            Err(errors) => return Err(EditError::AlreadyInvalid { file: file.to_string(), errors }),
            // `---` or `~` alone: a document with no services yet.
            Ok(set) if set.routes.is_empty() && client.is_none() => {
                let edited = append_service(&doc, service, weights);
                check(file, text, &edited, service, client, weights)?;
                return Ok(edited);
            }
            Ok(_) => return Err(EditError::Yaml { file: file.to_string(), message: e.to_string() }),
        },
    };
    let Some(root) = root.as_mapping() else {
        return Err(doc.unsupported(0, "a file whose top level is not a map of services"));
    };
    if doc.is_flow(root) {
        return Err(doc.unsupported(doc.pos(root.span().start()), "a file whose top level is a `{...}` map"));
    }

    let edited = match entry(root, service.as_str()) {
        Some((key, value)) => apply(&doc, edit_service(&doc, key, value, service, client, weights)?)?,
        None => match client {
            Some(client) => {
                return Err(EditError::NoServiceRoute {
                    file: file.to_string(),
                    service: service.clone(),
                    client: client.clone(),
                })
            }
            None => append_service(&doc, service, weights),
        },
    };
    check(file, text, &edited, service, client, weights)?;
    Ok(edited)
}

/// The file of `files` (path, text) that defines `service` as a top-level
/// key, if any; otherwise the caller creates `routes/<service>.yaml`.
///
/// A file that is not YAML is searched line by line, so that a broken file
/// holding the service is still found (and its edit refused) rather than a
/// second definition created elsewhere.
pub fn file_defining<'a>(files: &'a [(String, String)], service: &ServiceName) -> Option<&'a (String, String)> {
    files.iter().find(|(_, text)| defines(text, service))
}

fn defines(text: &str, service: &ServiceName) -> bool {
    let name = service.as_str();
    match marked_yaml::parse_yaml(0, text) {
        Ok(root) => root.as_mapping().is_some_and(|map| entry(map, name).is_some()),
        Err(_) => text.lines().any(|line| {
            [name.to_string(), format!("\"{name}\""), format!("'{name}'")].iter().any(|key| {
                line.strip_prefix(key.as_str())
                    .and_then(|rest| rest.trim_start_matches([' ', '\t']).strip_prefix(':'))
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r']))
            })
        }),
    }
}

/// The key and value of `name` in `map`.
fn entry<'m>(map: &'m MarkedMappingNode, name: &str) -> Option<(&'m MarkedScalarNode, &'m Node)> {
    map.iter().find(|(key, _)| key.as_str() == name)
}

/// One splice: replace `range` (bytes) of the text with `text`.
#[derive(Debug)]
struct Edit {
    range: Range<usize>,
    text: String,
}

impl Edit {
    fn insert(at: usize, text: String) -> Edit {
        Edit { range: at..at, text }
    }
}

/// Applies splices that do not overlap, in position order.
fn apply(doc: &Doc, mut edits: Vec<Edit>) -> Result<String, EditError> {
    edits.sort_by_key(|e| (e.range.start, e.range.end));
    let mut out = String::with_capacity(doc.text.len() + 64);
    let mut cursor = 0;
    for edit in edits {
        if edit.range.start < cursor {
            return Err(EditError::Mismatch { file: doc.file.to_string(), what: "two edits overlap".to_string() });
        }
        out.push_str(&doc.text[cursor..edit.range.start]);
        out.push_str(&edit.text);
        cursor = edit.range.end;
    }
    out.push_str(&doc.text[cursor..]);
    Ok(out)
}

/// One routes file being edited, and the text positions its YAML nodes have.
struct Doc<'t> {
    /// Path for messages.
    file: &'t str,
    text: &'t str,
    /// Byte offset of each character, then the text's length: marked-yaml
    /// counts positions in characters.
    offsets: Vec<usize>,
    /// The file's line ending, used for every line the edit adds.
    nl: &'static str,
}

impl<'t> Doc<'t> {
    fn new(file: &'t str, text: &'t str) -> Doc<'t> {
        let offsets = text.char_indices().map(|(i, _)| i).chain([text.len()]).collect();
        let nl = if text.contains("\r\n") { "\r\n" } else { "\n" };
        Doc { file, text, offsets, nl }
    }

    /// The byte offset of a marker.
    fn pos(&self, marker: Option<&Marker>) -> usize {
        marker.and_then(|m| self.offsets.get(m.character()).copied()).unwrap_or(self.text.len())
    }

    fn key_pos(&self, key: &MarkedScalarNode) -> usize {
        self.pos(key.span().start())
    }

    fn node_pos(&self, node: &Node) -> usize {
        self.pos(node.span().start())
    }

    fn line_start(&self, pos: usize) -> usize {
        self.text[..pos].rfind('\n').map_or(0, |i| i + 1)
    }

    /// Where the line holding `pos` ends, before its line ending (after any comment).
    fn line_end(&self, pos: usize) -> usize {
        match self.text[pos..].find('\n') {
            Some(i) if self.text[..pos + i].ends_with('\r') => pos + i - 1,
            Some(i) => pos + i,
            None => self.text.len(),
        }
    }

    /// The whitespace before the key at `pos` on its line.
    fn indent(&self, pos: usize) -> Result<&'t str, EditError> {
        let indent = &self.text[self.line_start(pos)..pos];
        if indent.bytes().all(|b| b == b' ') {
            Ok(indent)
        } else {
            Err(self.unsupported(pos, "a key that does not start its line"))
        }
    }

    fn unsupported(&self, pos: usize, what: impl Into<String>) -> EditError {
        let line_start = self.line_start(pos);
        EditError::Unsupported {
            file: self.file.to_string(),
            line: self.text[..pos].matches('\n').count() + 1,
            column: self.text[line_start..pos].chars().count() + 1,
            what: what.into(),
        }
    }

    fn is_flow(&self, map: &MarkedMappingNode) -> bool {
        self.text[self.pos(map.span().start())..].starts_with('{')
    }

    /// The byte offset of a flow map's closing `}`.
    fn flow_close(&self, map: &MarkedMappingNode) -> Result<usize, EditError> {
        let close = self.pos(map.span().end());
        if self.text[close..].starts_with('}') {
            Ok(close)
        } else {
            Err(self.unsupported(self.pos(map.span().start()), "a `{...}` map whose end was not found"))
        }
    }

    /// A scalar with no text (`v1:` alone): its marker points at the next token.
    fn is_null(&self, node: &Node) -> bool {
        match node {
            Node::Scalar(s) => s.as_str().is_empty() && !self.text[self.node_pos(node)..].starts_with(['"', '\'']),
            _ => false,
        }
    }

    /// Where the scalar token starting at `pos` ends (after a closing quote).
    fn scalar_end(&self, pos: usize) -> Result<usize, EditError> {
        let rest = &self.text[pos..];
        let len = match rest.chars().next() {
            Some('"') => {
                let mut escaped = false;
                rest.char_indices().skip(1).find_map(|(i, c)| match c {
                    '\\' if !escaped => {
                        escaped = true;
                        None
                    }
                    '"' if !escaped => Some(i + 1),
                    _ => {
                        escaped = false;
                        None
                    }
                })
            }
            // In single quotes, `''` is an escaped quote.
            Some('\'') => {
                let mut i = 1;
                loop {
                    match rest[i..].find('\'') {
                        Some(j) if rest[i + j + 1..].starts_with('\'') => i += j + 2,
                        Some(j) => break Some(i + j + 1),
                        None => break None,
                    }
                }
            }
            _ => Some(rest.find([',', '}', ']', '\n', '\r', '#', ' ', '\t']).unwrap_or(rest.len())),
        };
        match len {
            Some(len) if len > 0 && !rest[..len].contains('\n') => Ok(pos + len),
            _ => Err(self.unsupported(pos, "a value that is not a single-line number")),
        }
    }

    /// Where a map entry's text ends.
    fn entry_end(&self, key: &MarkedScalarNode, value: &Node) -> Result<usize, EditError> {
        if self.is_null(value) {
            return self.scalar_end(self.key_pos(key));
        }
        match value {
            Node::Scalar(_) => self.scalar_end(self.node_pos(value)),
            Node::Mapping(map) => self.map_end(map),
            Node::Sequence(_) => Err(self.unsupported(self.node_pos(value), "a list")),
        }
    }

    /// Where a map's text ends: after `}`, or after its last entry.
    fn map_end(&self, map: &MarkedMappingNode) -> Result<usize, EditError> {
        if self.is_flow(map) {
            return Ok(self.flow_close(map)? + 1);
        }
        match map.iter().next_back() {
            Some((key, value)) => self.entry_end(key, value),
            None => Err(self.unsupported(self.pos(map.span().start()), "an empty map")),
        }
    }

    /// The indentation one level adds under the key at `key_pos` whose value is `map`.
    fn unit(&self, key_pos: usize, map: &MarkedMappingNode) -> Result<String, EditError> {
        let outer = self.indent(key_pos)?.len();
        match map.iter().next() {
            Some((first, _)) if !self.is_flow(map) => {
                let inner = self.indent(self.key_pos(first))?.len();
                Ok(" ".repeat(inner.saturating_sub(outer).max(1)))
            }
            _ => Ok("  ".to_string()),
        }
    }
}

/// `{v1: 90, v2: 10}`.
fn flow(weights: &BTreeMap<Version, u32>) -> String {
    let entries: Vec<String> = weights.iter().map(|(v, w)| format!("{v}: {w}")).collect();
    format!("{{{}}}", entries.join(", "))
}

/// A value `add_entry` writes under a new key.
enum NewValue<'a> {
    /// A weight map: `weights: {v1: 100}` or `monolith: {v1: 100}`.
    Weights(&'a BTreeMap<Version, u32>),
    /// A one-client `clients:` map.
    Client(&'a ClientName, &'a BTreeMap<Version, u32>),
}

/// The edits for one service already in the file.
fn edit_service(
    doc: &Doc,
    key: &MarkedScalarNode,
    value: &Node,
    service: &ServiceName,
    client: Option<&ClientName>,
    weights: &BTreeMap<Version, u32>,
) -> Result<Vec<Edit>, EditError> {
    let key_pos = doc.key_pos(key);
    let Node::Mapping(map) = value else {
        return Err(doc.unsupported(key_pos, format!("{service}, whose value is not a map")));
    };
    // The same test the routes parser makes: either key means long form.
    let long = entry(map, "weights").is_some() || entry(map, "clients").is_some();
    let unit = doc.unit(key_pos, map)?;
    let not_a_map = |key: &MarkedScalarNode, what: &str| {
        doc.unsupported(doc.key_pos(key), format!("{what} of {service}, which is not a map"))
    };

    let Some(client) = client else {
        if !long {
            return edit_versions(doc, map, weights);
        }
        return match entry(map, "weights") {
            Some((_, Node::Mapping(current))) => edit_versions(doc, current, weights),
            Some((key, _)) => Err(not_a_map(key, "the weights")),
            None => add_entry(doc, map, "weights", NewValue::Weights(weights), &unit),
        };
    };
    if !long {
        return to_long_form(doc, key_pos, map, client, weights, &unit);
    }
    match entry(map, "clients") {
        Some((_, Node::Mapping(clients))) => match entry(clients, client.as_str()) {
            Some((_, Node::Mapping(current))) => edit_versions(doc, current, weights),
            Some((key, _)) => Err(not_a_map(key, &format!("the weights of client {client}"))),
            None => add_entry(doc, clients, client.as_str(), NewValue::Weights(weights), &unit),
        },
        Some((key, _)) => Err(not_a_map(key, "the clients")),
        None => add_entry(doc, map, "clients", NewValue::Client(client, weights), &unit),
    }
}

/// Makes the version map `map` hold exactly `weights`: changes numbers in
/// place, removes versions not in `weights`, adds the new ones at the end.
fn edit_versions(doc: &Doc, map: &MarkedMappingNode, weights: &BTreeMap<Version, u32>) -> Result<Vec<Edit>, EditError> {
    for (key, value) in map.iter() {
        if !matches!(value, Node::Scalar(_)) || doc.is_null(value) {
            return Err(doc.unsupported(doc.key_pos(key), format!("the weight of {}", key.as_str())));
        }
    }
    let wanted = |key: &MarkedScalarNode| weights.iter().find(|(v, _)| v.as_str() == key.as_str()).map(|(_, w)| *w);
    let added: Vec<(&Version, u32)> =
        weights.iter().filter(|(v, _)| entry(map, v.as_str()).is_none()).map(|(v, w)| (v, *w)).collect();

    if doc.is_flow(map) {
        // A `{...}` map is rewritten whole, on one line, keeping its key order
        // and its inner padding (`{ v1: 90 }`).
        let open = doc.pos(map.span().start());
        let close = doc.flow_close(map)?;
        // Versions and numbers hold no `#`: any there starts a comment, which a rewrite would lose.
        if doc.text[open..close].contains('#') {
            return Err(doc.unsupported(open, "a `{...}` map over several lines with comments in it"));
        }
        let pad = if doc.text[open + 1..].starts_with(' ') { " " } else { "" };
        let kept = map.iter().filter_map(|(key, _)| wanted(key).map(|w| format!("{}: {w}", key.as_str())));
        let entries: Vec<String> = kept.chain(added.iter().map(|(v, w)| format!("{v}: {w}"))).collect();
        let text = if entries.is_empty() { "{}".to_string() } else { format!("{{{pad}{}{pad}}}", entries.join(", ")) };
        return Ok(vec![Edit { range: open..close + 1, text }]);
    }

    let mut edits = Vec::new();
    let mut indent = None;
    let mut last_end = 0;
    for (key, value) in map.iter() {
        let key_pos = doc.key_pos(key);
        let value_pos = doc.node_pos(value);
        let value_end = doc.scalar_end(value_pos)?;
        indent.get_or_insert(doc.indent(key_pos)?);
        last_end = value_end;
        match wanted(key) {
            Some(weight) => {
                if doc.text[value_pos..value_end] != weight.to_string() {
                    edits.push(replace_number(doc, value_pos..value_end, weight.to_string()));
                }
            }
            // From the end of the line before to the end of this one: the
            // entry's line goes, its line ending with it.
            None => {
                let line_start = doc.line_start(key_pos);
                let from = if line_start == 0 { 0 } else { doc.line_end(line_start - 1) };
                edits.push(Edit { range: from..doc.line_end(value_end), text: String::new() });
            }
        }
    }
    if !added.is_empty() {
        let indent = indent.unwrap_or("  ");
        let lines: String = added.iter().map(|(v, w)| format!("{}{indent}{v}: {w}", doc.nl)).collect();
        edits.push(Edit::insert(doc.line_end(last_end), lines));
    }
    Ok(edits)
}

/// Replaces the number in `range` with `new`, keeping a trailing comment at
/// its column where the spaces before it allow.
fn replace_number(doc: &Doc, range: Range<usize>, new: String) -> Edit {
    let (old_len, new_len) = (range.len(), new.len());
    let after = &doc.text[range.end..doc.line_end(range.end)];
    let gap = after.len() - after.trim_start_matches(' ').len();
    if gap == 0 || !after[gap..].starts_with('#') {
        return Edit { range, text: new };
    }
    if new_len < old_len {
        let text = format!("{new}{}", " ".repeat(old_len - new_len));
        Edit { range, text }
    } else if new_len - old_len < gap {
        Edit { range: range.start..range.end + (new_len - old_len), text: new }
    } else {
        Edit { range, text: new }
    }
}

/// Adds `key: value` after the last entry of `map`.
fn add_entry(
    doc: &Doc,
    map: &MarkedMappingNode,
    key: &str,
    value: NewValue,
    unit: &str,
) -> Result<Vec<Edit>, EditError> {
    let as_flow = match &value {
        NewValue::Weights(weights) => flow(weights),
        NewValue::Client(client, weights) => format!("{{{client}: {}}}", flow(weights)),
    };
    let Some((last_key, last_value)) = map.iter().next_back() else {
        if !doc.is_flow(map) {
            return Err(doc.unsupported(doc.pos(map.span().start()), "an empty map"));
        }
        let open = doc.pos(map.span().start());
        return Ok(vec![Edit { range: open..doc.flow_close(map)? + 1, text: format!("{{{key}: {as_flow}}}") }]);
    };
    let end = doc.entry_end(last_key, last_value)?;
    if doc.is_flow(map) {
        return Ok(vec![Edit::insert(end, format!(", {key}: {as_flow}"))]);
    }
    let first_key = map.iter().next().map_or(last_key, |(k, _)| k);
    let indent = doc.indent(doc.key_pos(first_key))?;
    let nl = doc.nl;
    let text = match value {
        NewValue::Weights(_) => format!("{nl}{indent}{key}: {as_flow}"),
        NewValue::Client(client, weights) => format!("{nl}{indent}{key}:{nl}{indent}{unit}{client}: {}", flow(weights)),
    };
    Ok(vec![Edit::insert(doc.line_end(end), text)])
}

/// Turns the short-form `service: {versions}` whose key is at `key_pos` into
/// long form with a first `clients:` entry, keeping every line of the old
/// map (comments included) under `weights:`.
fn to_long_form(
    doc: &Doc,
    key_pos: usize,
    map: &MarkedMappingNode,
    client: &ClientName,
    weights: &BTreeMap<Version, u32>,
    unit: &str,
) -> Result<Vec<Edit>, EditError> {
    let nl = doc.nl;
    let indent = format!("{}{unit}", doc.indent(key_pos)?);
    let clients = format!("{nl}{indent}clients:{nl}{indent}{unit}{client}: {}", flow(weights));
    let end = doc.map_end(map)?;

    if doc.is_flow(map) {
        // `barker: {v1: 100}` -> `barker:` / `  weights: {v1: 100}`.
        let open = doc.pos(map.span().start());
        let close = end - 1;
        let colon = doc.text[..open].trim_end_matches([' ', '\t']).len();
        if !doc.text[..colon].ends_with(':') || doc.line_start(open) != doc.line_start(key_pos) {
            return Err(doc.unsupported(open, "a `{...}` map that does not follow its key on the same line"));
        }
        let mut edits = vec![Edit { range: colon..open, text: format!("{nl}{indent}weights: ") }];
        let inner = &doc.text[open..end];
        if inner.contains('\n') {
            if inner.contains('#') {
                return Err(doc.unsupported(open, "a `{...}` map over several lines with comments in it"));
            }
            // Deeper now, so continuation lines would need re-indenting: join them.
            let joined = inner.split_whitespace().collect::<Vec<_>>().join(" ");
            edits.push(Edit { range: open..end, text: joined });
        }
        edits.push(Edit::insert(doc.line_end(close), clients));
        return Ok(edits);
    }

    // Block map: every line of it moves one level deeper under `weights:`.
    let mut edits = vec![Edit::insert(doc.line_end(key_pos), format!("{nl}{indent}weights:"))];
    let last_line = doc.line_start(end);
    let mut line = doc.line_start(key_pos);
    while let Some(i) = doc.text[line..].find('\n') {
        line += i + 1;
        if line > last_line {
            break;
        }
        if !doc.text[line..doc.line_end(line)].trim().is_empty() {
            edits.push(Edit::insert(line, unit.to_string()));
        }
    }
    edits.push(Edit::insert(doc.line_end(end), clients));
    Ok(edits)
}

/// The file with `service` appended in short block form, after a blank line.
fn append_service(doc: &Doc, service: &ServiceName, weights: &BTreeMap<Version, u32>) -> String {
    let nl = doc.nl;
    let mut out = doc.text.to_string();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push_str(nl);
    }
    let body = out.strip_suffix(nl).unwrap_or(&out);
    if !out.trim().is_empty() && !body.ends_with('\n') {
        out.push_str(nl);
    }
    out.push_str(&format!("{service}:{nl}"));
    for (version, weight) in weights {
        out.push_str(&format!("  {version}: {weight}{nl}"));
    }
    out
}

/// Refuses an edited file that does not validate, or that differs from the
/// original in anything but the requested weights.
fn check(
    file: &str,
    before: &str,
    after: &str,
    service: &ServiceName,
    client: Option<&ClientName>,
    weights: &BTreeMap<Version, u32>,
) -> Result<(), EditError> {
    let file_name = || file.to_string();
    let mismatch = |what: &str| EditError::Mismatch { file: file_name(), what: what.to_string() };
    let original = routes::parse_files([(file, before)]);
    let edited = match routes::parse_files([(file, after)]) {
        Ok(edited) => edited,
        // Errors in the file as it is carry line numbers the operator can find.
        Err(errors) => {
            return Err(match original {
                Err(errors) => EditError::AlreadyInvalid { file: file_name(), errors },
                Ok(_) => EditError::Invalid { file: file_name(), errors },
            })
        }
    };
    let got = edited.routes.get(service).and_then(|route| match client {
        None => Some(&route.weights),
        Some(client) => route.clients.get(client),
    });
    let Some(wanted) = got.filter(|w| w.as_map() == weights).cloned() else {
        return Err(mismatch("the new weights are not what was asked"));
    };
    // When the file was valid before, everything else must be as it was.
    if let Ok(mut expected) = original {
        let route: &mut Route = expected
            .routes
            .entry(service.clone())
            .or_insert_with(|| Route { weights: wanted.clone(), clients: BTreeMap::new() });
        match client {
            None => route.weights = wanted,
            Some(client) => {
                route.clients.insert(client.clone(), wanted);
            }
        }
        if edited != expected {
            return Err(mismatch("other routes in the file changed"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::RouteSet;

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    fn w(pairs: &[(&str, u32)]) -> BTreeMap<Version, u32> {
        pairs.iter().map(|(k, n)| (v(k), *n)).collect()
    }

    fn svc(s: &str) -> ServiceName {
        s.parse().unwrap()
    }

    fn client(s: &str) -> ClientName {
        s.parse().unwrap()
    }

    const FILE: &str = "routes/barker.yaml";

    fn set(text: &str, service: &str, for_client: Option<&str>, weights: &[(&str, u32)]) -> Result<String, EditError> {
        let c = for_client.map(client);
        set_weights(FILE, text, &svc(service), c.as_ref(), &w(weights))
    }

    fn routes_of(text: &str) -> RouteSet {
        routes::parse_files([(FILE, text)]).unwrap()
    }

    #[test]
    fn set_short_block_form_keeps_comments_and_other_services() {
        let text = "\
# comment about barker
barker:
  v1: 90   # trailing comment
  v2: 10
# about emitter
emitter:
  v1: 100
";
        let out = set(text, "barker", None, &[("v1", 80), ("v2", 20)]).unwrap();
        assert_eq!(out, text.replace("v1: 90", "v1: 80").replace("v2: 10", "v2: 20"));
        // A shorter number keeps the comment's column; a longer one eats a space.
        let out = set(text, "barker", None, &[("v1", 5), ("v2", 95)]).unwrap();
        assert!(out.contains("\n  v1: 5    # trailing comment\n  v2: 95\n"), "{out}");
        let out = set(text, "barker", None, &[("v1", 100), ("v2", 0)]).unwrap();
        assert!(out.contains("\n  v1: 100  # trailing comment\n  v2: 0\n"), "{out}");
        let out = set(text, "emitter", None, &[("v1", 100)]).unwrap();
        assert_eq!(out, text, "an unchanged split is no change");
    }

    #[test]
    fn set_in_flow_form() {
        let text = "barker: {v1: 90, v2: 10}  # the canary\nemitter: { v1: 50, v2: 50 }\n";
        let out = set(text, "barker", None, &[("v1", 70), ("v2", 30)]).unwrap();
        assert_eq!(out, "barker: {v1: 70, v2: 30}  # the canary\nemitter: { v1: 50, v2: 50 }\n");
        let out = set(text, "emitter", None, &[("v2", 100), ("v3", 0)]).unwrap();
        assert_eq!(out, "barker: {v1: 90, v2: 10}  # the canary\nemitter: { v2: 100, v3: 0 }\n");
    }

    #[test]
    fn set_removes_versions_not_given() {
        let text = "barker:\n  v1: 80\n  # the canary\n  v2: 10  # going\n  v3: 10\nemitter: {v1: 100}\n";
        let out = set(text, "barker", None, &[("v1", 90), ("v3", 10)]).unwrap();
        assert_eq!(out, "barker:\n  v1: 90\n  # the canary\n  v3: 10\nemitter: {v1: 100}\n");
        let out = set(text, "barker", None, &[("v1", 100)]).unwrap();
        assert_eq!(out, "barker:\n  v1: 100\n  # the canary\nemitter: {v1: 100}\n");
        // Replacing every version: the new lines take the old ones' place.
        let out = set(text, "barker", None, &[("v4", 100)]).unwrap();
        assert_eq!(out, "barker:\n  # the canary\n  v4: 100\nemitter: {v1: 100}\n");
    }

    #[test]
    fn set_adds_new_versions_after_the_others() {
        let text = "barker:\n    v2: 100  # current\n\nemitter: {v1: 100}";
        let out = set(text, "barker", None, &[("v1", 0), ("v2", 90), ("v3-canary", 10)]).unwrap();
        assert_eq!(out, "barker:\n    v2: 90   # current\n    v1: 0\n    v3-canary: 10\n\nemitter: {v1: 100}");
        // The last line, without a final newline, stays without one.
        let out = set(text, "emitter", None, &[("v1", 50), ("2", 50)]).unwrap();
        assert!(out.ends_with("emitter: {v1: 50, 2: 50}"), "{out}");
        let versions: Vec<_> = routes_of(&out).routes[&svc("emitter")].weights.as_map().keys().cloned().collect();
        assert_eq!(versions, [v("2"), v("v1")]);
    }

    #[test]
    fn set_in_long_block_form_keeps_the_clients() {
        let text = "barker:\n  weights:\n    v1: 90\n    v2: 10  # canary\n  clients:\n    monolith:\n      v1: 100\n";
        let out = set(text, "barker", None, &[("v1", 50), ("v3", 50)]).unwrap();
        assert_eq!(out, "barker:\n  weights:\n    v1: 50\n    v3: 50\n  clients:\n    monolith:\n      v1: 100\n");
    }

    #[test]
    fn set_joins_a_flow_map_over_several_lines_unless_it_has_comments() {
        let text = "barker: {\n  v1: 90,\n  v2: 10\n}\n";
        let out = set(text, "barker", None, &[("v1", 80), ("v2", 20)]).unwrap();
        assert_eq!(out, "barker: {v1: 80, v2: 20}\n");
        let text = "barker: {\n  v1: 90,  # old\n  v2: 10\n}\n";
        let err = set(text, "barker", None, &[("v1", 80), ("v2", 20)]).unwrap_err();
        assert!(matches!(err, EditError::Unsupported { line: 1, column: 9, .. }), "{err}");
    }

    #[test]
    fn set_keeps_crlf_line_endings() {
        let text = "barker:\r\n  v1: 100\r\nemitter: {v1: 100}\r\n";
        let out = set(text, "barker", None, &[("v1", 60), ("v2", 40)]).unwrap();
        assert_eq!(out, "barker:\r\n  v1: 60\r\n  v2: 40\r\nemitter: {v1: 100}\r\n");
    }

    #[test]
    fn set_for_a_client_converts_short_block_form_to_long() {
        let text = "# comment about barker\nbarker:   # the front end\n  v1: 90   # trailing comment\n\n  v2: 10\nemitter: {v1: 100}\n";
        let out = set(text, "barker", Some("monolith"), &[("v1", 70), ("v2", 30)]).unwrap();
        assert_eq!(
            out,
            "# comment about barker\nbarker:   # the front end\n  weights:\n    v1: 90   # trailing comment\n\n    v2: 10\n  clients:\n    monolith: {v1: 70, v2: 30}\nemitter: {v1: 100}\n"
        );
    }

    #[test]
    fn set_for_a_client_converts_short_flow_form_to_long() {
        let text = "# comment about barker\nbarker: {v1: 90, v2: 10}  # note\n";
        let out = set(text, "barker", Some("monolith"), &[("v2", 100)]).unwrap();
        assert_eq!(
            out,
            "# comment about barker\nbarker:\n  weights: {v1: 90, v2: 10}  # note\n  clients:\n    monolith: {v2: 100}\n"
        );
        let text = "barker: {v1: 90,\n   v2: 10}\n";
        let out = set(text, "barker", Some("monolith"), &[("v2", 100)]).unwrap();
        assert_eq!(out, "barker:\n  weights: {v1: 90, v2: 10}\n  clients:\n    monolith: {v2: 100}\n");
    }

    #[test]
    fn set_for_a_client_edits_or_adds_its_entry() {
        let text = "\
barker:
  weights: {v1: 90, v2: 10}
  clients:                      # per-client overrides
    monolith: {v1: 70, v2: 30}  # moving first
    vm7:
      v1: 100
emitter: {v1: 100}
";
        let out = set(text, "barker", Some("monolith"), &[("v1", 40), ("v2", 60)]).unwrap();
        assert_eq!(out, text.replace("monolith: {v1: 70, v2: 30}", "monolith: {v1: 40, v2: 60}"));
        let out = set(text, "barker", Some("vm7"), &[("v1", 50), ("v2", 50)]).unwrap();
        assert_eq!(out, text.replace("      v1: 100\n", "      v1: 50\n      v2: 50\n"));
        let out = set(text, "barker", Some("main.example.com"), &[("v2", 100)]).unwrap();
        assert_eq!(out, text.replace("      v1: 100\n", "      v1: 100\n    main.example.com: {v2: 100}\n"));
        let out = set(text, "barker", None, &[("v1", 0), ("v2", 100)]).unwrap();
        assert_eq!(out, text.replace("weights: {v1: 90, v2: 10}", "weights: {v1: 0, v2: 100}"));
    }

    #[test]
    fn set_for_a_client_adds_clients_to_long_form() {
        let text = "barker:\n  weights:\n    v1: 100  # all\nemitter: {v1: 100}\n";
        let out = set(text, "barker", Some("monolith"), &[("v1", 50), ("v2", 50)]).unwrap();
        assert_eq!(
            out,
            "barker:\n  weights:\n    v1: 100  # all\n  clients:\n    monolith: {v1: 50, v2: 50}\nemitter: {v1: 100}\n"
        );
        let text = "barker: {weights: {v1: 100}}\n";
        let out = set(text, "barker", Some("monolith"), &[("v2", 100)]).unwrap();
        assert_eq!(out, "barker: {weights: {v1: 100}, clients: {monolith: {v2: 100}}}\n");
        let text = "barker:\n  weights: {v1: 100}\n  clients: {}\n";
        let out = set(text, "barker", Some("monolith"), &[("v2", 100)]).unwrap();
        assert_eq!(out, "barker:\n  weights: {v1: 100}\n  clients: {monolith: {v2: 100}}\n");
    }

    #[test]
    fn set_appends_a_new_service() {
        let text = "# routes\nemitter: {v1: 100}";
        let out = set(text, "barker", None, &[("v1", 90), ("v2", 10)]).unwrap();
        assert_eq!(out, "# routes\nemitter: {v1: 100}\n\nbarker:\n  v1: 90\n  v2: 10\n");
        assert_eq!(set("", "barker", None, &[("v1", 100)]).unwrap(), "barker:\n  v1: 100\n");
        assert_eq!(set("---\n", "barker", None, &[("v1", 100)]).unwrap(), "---\n\nbarker:\n  v1: 100\n");
        assert_eq!(
            set("emitter: {v1: 100}\n\n", "barker", None, &[("v1", 100)]).unwrap(),
            "emitter: {v1: 100}\n\nbarker:\n  v1: 100\n"
        );
        // A client's split alone would leave every other client without one.
        let err = set(text, "barker", Some("monolith"), &[("v1", 100)]).unwrap_err();
        assert!(matches!(err, EditError::NoServiceRoute { .. }), "{err}");
        assert!(err.to_string().contains("dw route set barker"), "{err}");
    }

    #[test]
    fn set_refuses_invalid_weights_and_invalid_results() {
        let text = "barker:\n  v1: 90\n  v2: 10\n";
        let err = set(text, "barker", None, &[("v1", 100), ("v2", 10)]).unwrap_err();
        assert_eq!(err.to_string(), "the weights for barker: weights sum to 110, they must sum to 100");
        let err = set(text, "barker", Some("monolith"), &[]).unwrap_err();
        assert!(err.to_string().starts_with("the weights for barker for client monolith: no weights"), "{err}");

        // Another service in the file is already broken: the result would be too.
        let text = "barker:\n  v1: 90\n  v2: 10\nemitter: {v1: 50}\n";
        let err = set(text, "barker", None, &[("v1", 100)]).unwrap_err();
        let EditError::AlreadyInvalid { errors, .. } = &err else { panic!("{err}") };
        assert_eq!(errors.len(), 1, "{err}");
        assert!(errors[0].to_string().starts_with("routes/barker.yaml:4:11: "), "{err}");
        // A valid file the edit would break: a version named like a long-form key.
        let err = set("barker:\n  v1: 100\n", "barker", None, &[("weights", 100)]).unwrap_err();
        assert!(
            err.to_string().starts_with(
                "the edit would leave routes/barker.yaml invalid, so it was not made:\n  routes/barker.yaml:2:12: "
            ),
            "{err}"
        );
        // ...unless the edit is what fixes it.
        let out = set(text, "emitter", None, &[("v1", 100)]).unwrap();
        assert_eq!(out, text.replace("{v1: 50}", "{v1: 100}"));

        let err = set("barker: [v1]\n", "barker", None, &[("v1", 100)]).unwrap_err();
        assert!(matches!(err, EditError::Unsupported { line: 1, column: 1, .. }), "{err}");
        let err = set("barker:\n  v1:\n", "barker", None, &[("v1", 100)]).unwrap_err();
        assert!(matches!(err, EditError::Unsupported { line: 2, column: 3, .. }), "{err}");
        let err = set("barker: {v1: 100\n", "barker", None, &[("v1", 100)]).unwrap_err();
        assert!(err.to_string().contains("\n  routes/barker.yaml:2:1: YAML syntax error: "), "{err}");
        let err = set("barker: {v1: 100}\nbarker: {v1: 100}\n", "barker", None, &[("v1", 100)]).unwrap_err();
        assert!(err.to_string().contains("\n  routes/barker.yaml:2:1: \"barker\" is already defined"), "{err}");
        let err = set("{barker: {v1: 100}}\n", "barker", None, &[("v1", 100)]).unwrap_err();
        assert!(matches!(err, EditError::Unsupported { .. }), "{err}");
    }

    #[test]
    fn set_handles_quotes_and_wide_characters() {
        let text = "# prévu: ×2\n\"barker\":\n  'v1': \"90\"\n  v2: 10\n";
        // Quoted weights are refused by the parser; the edit is what fixes them.
        let out = set(text, "barker", None, &[("v1", 50), ("v2", 50)]).unwrap();
        assert_eq!(out, "# prévu: ×2\n\"barker\":\n  'v1': 50\n  v2: 50\n");
        let text = "# prévu: ×2\nbarker:\n  v1: 90 # é\n  v2: 10\n";
        let out = set(text, "barker", None, &[("v1", 50), ("v2", 50)]).unwrap();
        assert_eq!(out, "# prévu: ×2\nbarker:\n  v1: 50 # é\n  v2: 50\n");
    }

    #[test]
    fn file_defining_finds_the_top_level_key() {
        let files = vec![
            ("routes/a.yaml".to_string(), "emitter: {v1: 100}\n# barker: {v1: 100}\n".to_string()),
            (
                "routes/b.yaml".to_string(),
                "other:\n  weights: {v1: 100}\n  clients:\n    barker: {v1: 100}\n".to_string(),
            ),
            ("routes/c.yaml".to_string(), "x: {v1: 100}\nbarker:\n  v1: 100\n".to_string()),
            ("routes/d.yaml".to_string(), "broken: {v1: 100\nemitter2 : {v1: 100}\n".to_string()),
        ];
        assert_eq!(file_defining(&files, &svc("barker")).map(|f| f.0.as_str()), Some("routes/c.yaml"));
        assert_eq!(file_defining(&files, &svc("emitter")).map(|f| f.0.as_str()), Some("routes/a.yaml"));
        assert_eq!(file_defining(&files, &svc("emitter2")).map(|f| f.0.as_str()), Some("routes/d.yaml"));
        assert_eq!(file_defining(&files, &svc("other2")), None);
        assert_eq!(file_defining(&files, &svc("weights")), None);
    }
}
