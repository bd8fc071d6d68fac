//! The JSON Schema of a routes file and the code that validates one must
//! agree: every example is accepted by both, every invalid fixture is refused
//! by both, except the rules a schema cannot express (sums), which only the
//! code enforces.

use std::path::{Path, PathBuf};

use dstack::routes::{load_dir, parse_files};

/// Invalid fixtures the schema accepts: their error is a sum, and JSON Schema
/// cannot add. The code must still refuse them.
const SCHEMA_VALID: &[&str] = &["sum-120.yaml"];

/// What the code must say about each invalid fixture: `line:column: ` and a
/// piece of the message.
const EXPECTED: &[(&str, &str, &str)] = &[
    ("bad-service-name.yaml", "2:1", "invalid service name \"Barker\""),
    ("bad-version.yaml", "3:3", "barker: invalid version \"-v1\""),
    ("empty-weights.yaml", "1:9", "barker: no weights"),
    ("float-weight.yaml", "2:7", "barker: weight 99.5 for v1 is not a whole number"),
    ("negative-weight.yaml", "4:7", "barker: weight -10 for v2 is negative"),
    ("not-a-mapping.yaml", "2:1", "the top level must be a mapping"),
    ("string-weight.yaml", "2:7", "barker: weight \"100\" for v1 is a string"),
    ("sum-120.yaml", "3:3", "barker: weights sum to 120, they must sum to 100"),
    ("unknown-long-form-key.yaml", "4:3", "barker: unknown key \"canary\""),
    ("weight-101.yaml", "2:7", "barker: weight 101 for v1 is more than 100"),
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn validator() -> jsonschema::Validator {
    let text = std::fs::read_to_string(root().join("schema/routes.schema.json")).unwrap();
    let schema: serde_json::Value = serde_json::from_str(&text).unwrap();
    jsonschema::validator_for(&schema).expect("the schema itself is valid draft 2020-12")
}

/// The YAML files of a directory, sorted, as (path relative to the crate, content).
fn yaml_files(dir: &str) -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = std::fs::read_dir(root().join(dir))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".yaml") || name.ends_with(".yml"))
        .map(|name| {
            let content = std::fs::read_to_string(root().join(dir).join(&name)).unwrap();
            (format!("{dir}/{name}"), content)
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no YAML files in {dir}");
    files
}

/// The schema's verdict on one file: the list of its errors.
fn schema_errors(validator: &jsonschema::Validator, content: &str) -> Vec<String> {
    let value: serde_json::Value = serde_yaml::from_str(content).expect("the fixture is YAML that serde_yaml can read");
    validator.iter_errors(&value).map(|e| format!("{}: {e}", e.instance_path())).collect()
}

#[test]
fn examples_are_accepted_by_the_schema_and_the_code() {
    let validator = validator();
    let files = yaml_files("examples/repo/routes");
    for (path, content) in &files {
        assert_eq!(schema_errors(&validator, content), Vec::<String>::new(), "{path}");
        if let Err(errors) = parse_files([(path.as_str(), content.as_str())]) {
            panic!("{path}: {errors:#?}");
        }
    }
    // Together too (no service is defined twice), and read as the directory does.
    let set = parse_files(files.iter().map(|(p, c)| (p.as_str(), c.as_str()))).unwrap();
    assert_eq!(load_dir(&root().join("examples/repo"), "routes"), Ok(set.clone()));
    let names: Vec<&str> = set.routes.keys().map(|s| s.as_str()).collect();
    assert_eq!(names, ["barker", "emitter", "transform"]);
    let barker = &set.routes[&"barker".parse().unwrap()].weights;
    assert_eq!(barker.to_string(), "v1=90 v2=10");
}

#[test]
fn invalid_fixtures_are_refused_by_both_except_sums_by_the_schema() {
    let validator = validator();
    let files = yaml_files("tests/fixtures/routes-invalid");
    let names: Vec<&str> = files.iter().map(|(p, _)| Path::new(p).file_name().unwrap().to_str().unwrap()).collect();
    let expected: Vec<&str> = EXPECTED.iter().map(|(name, ..)| *name).collect();
    assert_eq!(names, expected, "every fixture has an expected error, and every expected error a fixture");

    for ((path, content), (name, position, message)) in files.iter().zip(EXPECTED) {
        let schema = schema_errors(&validator, content);
        if SCHEMA_VALID.contains(name) {
            assert_eq!(schema, Vec::<String>::new(), "{path}: the schema should accept this (it cannot add)");
        } else {
            assert!(!schema.is_empty(), "{path}: the schema accepts it, but the code refuses it");
        }

        let errors = parse_files([(path.as_str(), content.as_str())]).expect_err(path);
        let first = errors[0].to_string();
        let want = format!("{path}:{position}: {message}");
        assert!(first.starts_with(&want), "{path}:\n got: {first}\nwant: {want}...");
    }
}

#[test]
fn schema_and_code_agree_on_the_edges_of_the_format() {
    let validator = validator();
    // (yaml, schema accepts, code accepts)
    let cases = [
        ("", true, true),
        ("# nothing routed yet\n", true, true),
        ("barker: {v1: 0, v2: 100}\n", true, true),
        ("barker: {\"2\": 100}\n", true, true),
        ("barker:\n  weights: {v1: 90, v2: 10}\n  clients:\n    monolith: {v1: 70, v2: 30}\n", true, true),
        ("barker:\n  weights: {v1: 100}\n  clients: {}\n", true, true),
        ("barker:\n  clients:\n    monolith: {v1: 100}\n", false, false),
        ("barker:\n  weights: {v1: 100}\n  clients:\n    -x: {v1: 100}\n", false, false),
        ("barker:\n  weights: {v1: 100}\n  clients:\n    x: {}\n", false, false),
        ("barker: 100\n", false, false),
        ("barker:\n", false, false),
        ("\"2\": {v1: 100}\n", false, false),
        ("barker: {v1: 100}\nemitter: [v1]\n", false, false),
        // Sums: beyond JSON Schema.
        ("barker: {weights: {v1: 50}}\n", true, false),
        ("barker:\n  weights: {v1: 100}\n  clients:\n    x: {v1: 50}\n", true, false),
    ];
    for (yaml, schema_ok, code_ok) in cases {
        let schema = schema_errors(&validator, yaml);
        assert_eq!(schema.is_empty(), schema_ok, "schema on {yaml:?}: {schema:?}");
        let code = parse_files([("routes/x.yaml", yaml)]);
        assert_eq!(code.is_ok(), code_ok, "code on {yaml:?}: {code:?}");
    }
}
