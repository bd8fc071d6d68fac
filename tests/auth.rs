//! Trust on the wire, end to end with the real binaries: tokens and roles
//! from an auth file, the attacks an unauthenticated client tried, SIGHUP
//! reloads, the cluster token of a directory on a network address,
//! `--insecure`, and signed webhooks.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use sha2::Digest as _;

/// Writes a file only its owner may read.
fn write_private(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A token as README.md makes one: `openssl rand -hex 32 > FILE` (here the
/// same 32 random bytes in hex, with the newline), mode 0600.
struct Token {
    name: &'static str,
    path: PathBuf,
    value: String,
}

impl Token {
    fn new(dir: &Path, name: &'static str) -> Token {
        let value = dstack::secret::Secret::random(32).expose().to_string();
        let path = dir.join(format!("{name}.token"));
        write_private(&path, &format!("{value}\n"));
        Token { name, path, value }
    }

    fn arg(&self) -> &str {
        self.path.to_str().unwrap()
    }

    /// `sha256sum FILE`'s digest, as README.md says to put in the auth
    /// file (the newline included; the directory accepts either form).
    fn sha256sum(&self) -> String {
        let out = Command::new("sha256sum").arg(&self.path).output().expect("sha256sum runs");
        let text = String::from_utf8(out.stdout).unwrap();
        let digest = text.split_whitespace().next().unwrap().to_string();
        assert_eq!(digest, dstack::secret::hex(&sha2::Sha256::digest(format!("{}\n", self.value))));
        digest
    }

    /// The digest of the bare token (`printf %s TOKEN | sha256sum`).
    fn sha256(&self) -> String {
        dstack::secret::hex(&sha2::Sha256::digest(self.value.as_bytes()))
    }
}

/// The auth file's entry for `token` with `rest` (role and the like).
fn entry(token: &Token, rest: &str, digest: String) -> String {
    format!("  - name: {}\n    {rest}\n    sha256: {digest}\n", token.name)
}

/// A directory with an auth file on a free loopback port, and a token of
/// every role: vm101 (watson for emitter), vm201 (watson for barker*),
/// main (sherlock, client monolith), ops (operator), grafana (read).
struct Secured {
    tmp: tempfile::TempDir,
    port: u16,
    directory: Proc,
    auth_file: PathBuf,
    tokens: HashMap<&'static str, Token>,
    http: reqwest::Client,
}

impl Secured {
    async fn start(extra: &[&str]) -> Secured {
        let tmp = tempfile::Builder::new().prefix("dstack-auth").tempdir().unwrap();
        let tokens: HashMap<&'static str, Token> = ["vm101", "vm201", "main", "ops", "grafana"]
            .into_iter()
            .map(|name| (name, Token::new(tmp.path(), name)))
            .collect();
        let t = |name: &str| &tokens[name];
        let auth_file = tmp.path().join("directory-auth.yaml");
        let text = format!(
            "# made by the test\ntokens:\n{}{}{}{}{}",
            entry(t("vm101"), "role: watson\n    services: [emitter]", t("vm101").sha256sum()),
            entry(t("vm201"), "role: watson\n    services: [\"barker*\"]", t("vm201").sha256()),
            entry(t("main"), "role: sherlock\n    client: monolith", t("main").sha256()),
            entry(t("ops"), "role: operator", t("ops").sha256sum()),
            entry(t("grafana"), "role: read", t("grafana").sha256()),
        );
        std::fs::write(&auth_file, text).unwrap();
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let state = tmp.path().join("state");
        let mut args = vec![
            "--listen",
            &listen,
            "--max-ttl",
            "3s",
            "--auth-file",
            auth_file.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let directory = Proc::start(tmp.path(), "directory", &args);
        let http =
            reqwest::Client::builder().timeout(Duration::from_secs(10)).pool_max_idle_per_host(0).build().unwrap();
        let secured = Secured { tmp, port, directory, auth_file, tokens, http };
        wait_until_up(&secured.http, port, &secured.directory).await;
        secured
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn token(&self, name: &str) -> &Token {
        &self.tokens[name]
    }

    /// A request with `token` (a name of `tokens`, or a raw value); (status, JSON).
    async fn call(&self, token: Option<&str>, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        call(
            &self.http,
            self.port,
            token.map(|t| self.tokens.get(t).map_or(t, |t| t.value.as_str())),
            method,
            path,
            body,
        )
        .await
    }

    /// `/v1/status` as the operator sees it.
    async fn status(&self) -> Value {
        let (code, status) = self.call(Some("ops"), "GET", "/v1/status", None).await;
        assert_eq!(code, 200, "{status}");
        status
    }

    fn watson(&self, token: &str, service: &str, url: &str) -> Proc {
        let base = self.base();
        let args = ["-d", &base, service, url, "1", "--token-file", self.token(token).arg()];
        Proc::start(self.tmp.path(), "watson", &args)
    }

    /// Every token value: none may show in any process's log.
    fn assert_no_token_in_logs(&self) {
        for entry in std::fs::read_dir(self.tmp.path()).unwrap().flatten() {
            if entry.path().extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(entry.path()).unwrap();
                for t in self.tokens.values() {
                    assert!(!text.contains(&t.value), "{} shows token {}", entry.path().display(), t.name);
                }
            }
        }
    }
}

/// A request to the directory on `port`; (status, JSON or the text as a string).
async fn call(
    http: &reqwest::Client,
    port: u16,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let url = format!("http://127.0.0.1:{port}{path}");
    let mut req = http.request(method.parse().unwrap(), url);
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    if let Some(body) = body {
        req = req.json(body);
    }
    let resp = req.send().await.unwrap();
    let code = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (code, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// Waits until the directory answers at all (a 401 counts).
async fn wait_until_up(http: &reqwest::Client, port: u16, directory: &Proc) {
    let url = format!("http://127.0.0.1:{port}/v1/status");
    let what = format!("the directory to answer; log:\n{}", directory.log_text());
    eventually(Duration::from_secs(10), &what, async || http.get(&url).send().await.ok()).await;
}

/// Starts a sherlock following `base` on a free port with `extra` flags;
/// (port, process) once its HAProxy answers.
async fn sherlock(dir: &Path, http: &reqwest::Client, base: &str, extra: &[&str]) -> (u16, Proc) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let run_dir = dir.join(format!("sherlock-{port}"));
    let mut args = vec!["-d", base, "--listen", &listen, "--run-dir", run_dir.to_str().unwrap(), "--admin", "off"];
    args.extend_from_slice(extra);
    let proc = Proc::start(dir, "sherlock", &args);
    let url = format!("http://127.0.0.1:{port}/");
    eventually(Duration::from_secs(15), "sherlock's haproxy to listen", async || http.get(&url).send().await.ok())
        .await;
    (port, proc)
}

fn heartbeat(service: &str, url: &str) -> Value {
    json!({"service": service, "version": "v1", "url": url, "ttl_ms": 3000})
}

/// Runs dw with `env`; (exit code, stdout, stderr).
fn dw(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(bin("dw")).args(args).envs(env.iter().copied()).env("NO_COLOR", "1").output().unwrap();
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    (out.status.code().unwrap_or(-1), text(out.stdout), text(out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_may_do_its_part_and_no_more() {
    let repo_dir = tempfile::tempdir().unwrap();
    let repo = RoutesRepo::new(repo_dir.path());
    repo.commit(&[("routes/emitter.yaml", "emitter: {v1: 100}\n")], "initial");
    let s = Secured::start(&["--repo", &repo.url(), "--poll", "1h"]).await;

    // watson, sherlock and traffic, each with its own token.
    let emitter = Instance::start("vm101").await;
    let _watson = s.watson("vm101", "emitter", &emitter.url("/emitter"));
    let barker = Instance::start("b1").await;
    let wrong_watson = s.watson("vm101", "barker", &barker.url("/barker"));
    let base = s.base();
    let main = s.token("main").arg();
    let (port, _sherlock) =
        sherlock(s.tmp.path(), &s.http, &base, &["--name", "fake-name", "--client", "monolith", "--token-file", main])
            .await;
    eventually(Duration::from_secs(15), "emitter served through sherlock", async || {
        let (code, body) = get_via(&s.http, port, "/emitter/").await.ok()?;
        (code == 200 && body.starts_with("vm101 ")).then_some(())
    })
    .await;
    // A sherlock token's name is what status shows, whatever --name says;
    // and the client it follows is its token's.
    let status = s.status().await;
    let seen: Vec<(&str, &str)> = status["sherlocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), s["client"].as_str().unwrap_or("-")))
        .collect();
    assert_eq!(seen, [("main", "monolith")], "{status}");
    // The same token on a sherlock that follows another client is refused,
    // and that sherlock says why.
    let (_, other) = sherlock(s.tmp.path(), &s.http, &base, &["--client", "web", "--token-file", main]).await;
    other.wait_for_log("token \"main\" is for client monolith, not web", Duration::from_secs(10)).await;
    // The emitter token cannot register barker; watson says why.
    wrong_watson
        .wait_for_log("may not register or deregister instances of service \"barker\"", Duration::from_secs(10))
        .await;
    assert!(s.status().await["instances"].as_array().unwrap().iter().all(|i| i["service"] == "emitter"));

    let emitter_hb = heartbeat("emitter", "http://127.0.0.1:1/emitter");
    let barker_hb = heartbeat("barker.internal", "http://127.0.0.1:1/barker");
    // (token, method, path, body, status wanted, part of the error wanted)
    type Case<'a> = (Option<&'a str>, &'a str, &'a str, Option<&'a Value>, u16, &'a str);
    let cases: &[Case] = &[
        (
            Some("vm101"),
            "PUT",
            "/v1/instances/x1",
            Some(&barker_hb),
            403,
            "service \"barker.internal\": its services are emitter",
        ),
        (Some("vm101"), "GET", "/v1/status", None, 403, "role watson; to read the directory's status"),
        (Some("vm101"), "GET", "/v1/snapshot", None, 403, "needs role sherlock or operator or read"),
        (Some("vm101"), "POST", "/v1/reconcile", None, 403, "needs role operator"),
        (Some("vm201"), "PUT", "/v1/instances/x2", Some(&barker_hb), 200, ""),
        (Some("vm201"), "DELETE", "/v1/instances/x2", None, 200, ""),
        (Some("vm201"), "PUT", "/v1/instances/x3", Some(&emitter_hb), 403, "its services are barker*"),
        (Some("main"), "GET", "/v1/snapshot", None, 200, ""),
        (
            Some("main"),
            "GET",
            "/v1/snapshot?sherlock=m&client=web",
            None,
            403,
            "run this sherlock with --client monolith",
        ),
        (Some("main"), "GET", "/v1/snapshot?sherlock=m&client=Bad!", None, 400, "invalid client"),
        (Some("main"), "GET", "/v1/status", None, 403, "token \"main\" has role sherlock"),
        (Some("main"), "POST", "/v1/reconcile", None, 403, "needs role operator"),
        (Some("main"), "PUT", "/v1/instances/x4", Some(&emitter_hb), 403, "needs role watson"),
        (Some("grafana"), "GET", "/v1/status", None, 200, ""),
        (Some("grafana"), "GET", "/v1/instances", None, 200, ""),
        (Some("grafana"), "GET", "/metrics", None, 200, ""),
        (Some("grafana"), "GET", "/", None, 200, ""),
        (
            Some("grafana"),
            "POST",
            "/v1/reconcile",
            None,
            403,
            "token \"grafana\" has role read; to trigger a reconcile",
        ),
        (Some("grafana"), "DELETE", "/v1/instances/x1", None, 403, "needs role watson"),
        (Some("grafana"), "GET", "/v1/snapshot?sherlock=grafana", None, 403, "to report as a sherlock"),
        (Some("ops"), "POST", "/v1/reconcile", None, 200, ""),
        (Some("ops"), "GET", "/v1/instances", None, 200, ""),
        (Some("ops"), "PUT", "/v1/instances/x5", Some(&emitter_hb), 403, "needs role watson"),
        (None, "GET", "/v1/status", None, 401, "requires a token"),
        (None, "POST", "/v1/reconcile", None, 401, "requires a token"),
        (Some("0123456789abcdef"), "GET", "/v1/status", None, 401, "not valid"),
    ];
    for (token, method, path, body, want, error) in cases {
        let (code, answer) = s.call(*token, method, path, *body).await;
        assert_eq!(code, *want, "{token:?} {method} {path}: {answer}");
        if !error.is_empty() {
            let message = answer["error"].as_str().unwrap_or_else(|| panic!("JSON error: {answer}"));
            assert!(message.contains(error), "{token:?} {method} {path}: {message:?} lacks {error:?}");
        }
    }
    let metrics = s.call(Some("grafana"), "GET", "/metrics", None).await.1;
    let refused = metrics.as_str().unwrap().lines().find(|l| l.starts_with("dstack_directory_auth_refusals_total "));
    let refused: u64 = refused.unwrap().rsplit(' ').next().unwrap().parse().unwrap();
    let want = cases.iter().filter(|c| c.4 >= 400).count() as u64;
    assert!(refused >= want, "every refusal is counted: {refused} < {want}");

    // dw: the operator's token by flag, by DSTACK_TOKEN, by dw.yaml; a
    // read token may look; no token, or an open token file, may not.
    let ops = s.token("ops").arg();
    let (code, out, err) = dw(&["-d", &base, "--token-file", ops, "status"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("main") && out.contains("emitter"), "{out}");
    let (code, out, err) = dw(&["-d", &base, "route", "list"], &[("DSTACK_TOKEN", &s.token("grafana").value)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&emitter.url("/emitter")), "{out}");
    let xdg = s.tmp.path().join("xdg");
    std::fs::create_dir_all(xdg.join("dstack")).unwrap();
    std::fs::write(xdg.join("dstack/dw.yaml"), format!("directory: {base}\ntoken_file: {ops}\n")).unwrap();
    let (code, out, err) = dw(&["status"], &[("XDG_CONFIG_HOME", xdg.to_str().unwrap())]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("emitter"), "{out}");
    let (code, _, err) = dw(&["-d", &base, "status"], &[("XDG_CONFIG_HOME", s.tmp.path().to_str().unwrap())]);
    assert_eq!(code, 1);
    assert!(err.contains("(401)") && err.contains("requires a token"), "{err}");
    let open = s.tmp.path().join("open.token");
    std::fs::write(&open, &s.token("ops").value).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, _, err) = dw(&["-d", &base, "--token-file", open.to_str().unwrap(), "status"], &[]);
    assert_eq!(code, 1);
    assert!(err.contains(&format!("{} has mode 0644", open.display())) && err.contains("chmod 600"), "{err}");
    assert!(!err.contains(&s.token("ops").value), "{err}");

    s.assert_no_token_in_logs();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unauthenticated_attacks_of_the_issue_are_refused() {
    let s = Secured::start(&[]).await;
    let real = Instance::start("real").await;
    let _watson = s.watson("vm101", "emitter", &real.url("/emitter"));
    let base = s.base();
    let main = s.token("main").arg();
    let (port, _sherlock) =
        sherlock(s.tmp.path(), &s.http, &base, &["--client", "monolith", "--token-file", main]).await;
    eventually(Duration::from_secs(15), "emitter served through sherlock", async || {
        let (code, body) = get_via(&s.http, port, "/emitter/").await.ok()?;
        (code == 200 && body.starts_with("real ")).then_some(())
    })
    .await;
    let real_id = s.status().await["instances"][0]["id"].as_str().unwrap().to_string();

    // Five instances with another path for emitter would have outvoted
    // the real one (the dominant-path rule) and taken its traffic.
    let intruder = Instance::start("intruder").await;
    for n in 0..5 {
        let hb = heartbeat("emitter", &intruder.url("/elsewhere"));
        let (code, answer) = s.call(None, "PUT", &format!("/v1/instances/intruder-{n}"), Some(&hb)).await;
        assert_eq!(code, 401, "{answer}");
        // Nor with a stolen token of another role.
        let (code, answer) = s.call(Some("grafana"), "PUT", &format!("/v1/instances/intruder-{n}"), Some(&hb)).await;
        assert_eq!(code, 403, "{answer}");
    }
    // Deregistering the real instance.
    let (code, answer) = s.call(None, "DELETE", &format!("/v1/instances/{real_id}"), None).await;
    assert_eq!(code, 401, "{answer}");
    // A fake sherlock that `dw apply` would wait for.
    let (code, answer) = s.call(None, "GET", "/v1/snapshot?sherlock=fake&applied=1", None).await;
    assert_eq!(code, 401, "{answer}");
    let (code, _) = s.call(Some("main"), "GET", "/v1/snapshot?sherlock=fake&applied=1", None).await;
    assert_eq!(code, 200);

    let status = s.status().await;
    let ids: Vec<&str> = status["instances"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [real_id.as_str()], "{status}");
    let names: Vec<&str> =
        status["sherlocks"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["main"], "{status}");
    for _ in 0..20 {
        let (code, body) = get_via(&s.http, port, "/emitter/").await.unwrap();
        assert!(code == 200 && body.starts_with("real "), "{code} {body}");
    }
    assert!(intruder.seen.lock().unwrap().is_empty());
    s.assert_no_token_in_logs();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_auth_file_and_a_broken_one_keeps_the_tokens_in_force() {
    let s = Secured::start(&[]).await;
    let late = Token::new(s.tmp.path(), "late");
    assert_eq!(s.call(Some(&late.value), "GET", "/v1/status", None).await.0, 401);

    let text = std::fs::read_to_string(&s.auth_file).unwrap();
    std::fs::write(&s.auth_file, format!("{text}{}", entry(&late, "role: read", late.sha256sum()))).unwrap();
    s.directory.signal(libc::SIGHUP);
    eventually(Duration::from_secs(10), "the new token to work", async || {
        (s.call(Some(&late.value), "GET", "/v1/status", None).await.0 == 200).then_some(())
    })
    .await;
    s.directory.wait_for_log("SIGHUP: auth reloaded", Duration::from_secs(5)).await;

    std::fs::write(&s.auth_file, "tokens:\n  - name: x\n    role: admin\n").unwrap();
    s.directory.signal(libc::SIGHUP);
    let log = s.directory.wait_for_log("auth reload failed", Duration::from_secs(10)).await;
    let place = format!("{}:3:11", s.auth_file.display());
    assert!(log.contains(&place) && log.contains("unknown variant `admin`"), "{log}");
    assert_eq!(s.call(Some(&late.value), "GET", "/v1/status", None).await.0, 200, "the old table stays");
    assert_eq!(s.call(Some("ops"), "POST", "/v1/reconcile", None).await.0, 409, "past auth: no repo");
    assert_eq!(s.call(Some("x"), "GET", "/v1/status", None).await.0, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_on_a_network_address_makes_and_requires_a_cluster_token() {
    let tmp = tempfile::Builder::new().prefix("dstack-auth").tempdir().unwrap();
    let state = tmp.path().join("state");
    let port = free_port();
    let listen = format!("0.0.0.0:{port}");
    let args = ["--listen", &listen, "--state-dir", state.to_str().unwrap(), "--max-ttl", "3s"];
    let mut directory = Proc::start(tmp.path(), "directory", &args);
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).pool_max_idle_per_host(0).build().unwrap();
    wait_until_up(&http, port, &directory).await;

    let token_path = state.join("token");
    let mode = std::fs::metadata(&token_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let token = std::fs::read_to_string(&token_path).unwrap().trim().to_string();
    assert!(token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit()), "32 random bytes in hex");
    let log = directory.wait_for_log("every request needs the cluster token", Duration::from_secs(5)).await;
    assert!(log.contains(token_path.to_str().unwrap()) && !log.contains(&token), "{log}");

    assert_eq!(call(&http, port, None, "GET", "/v1/status", None).await.0, 401);
    assert_eq!(call(&http, port, Some("not-it"), "GET", "/v1/status", None).await.0, 401);
    assert_eq!(call(&http, port, Some(&token), "GET", "/v1/status", None).await.0, 200);

    // watson, sherlock and dw, all with --token-file pointing at it.
    let base = format!("http://127.0.0.1:{port}");
    let tf = token_path.to_str().unwrap();
    let emitter = Instance::start("vm101").await;
    let _watson =
        Proc::start(tmp.path(), "watson", &["-d", &base, "emitter", &emitter.url("/emitter"), "1", "--token-file", tf]);
    let (sherlock_port, _sherlock) =
        sherlock(tmp.path(), &http, &base, &["--name", "edge-1", "--token-file", tf]).await;
    eventually(Duration::from_secs(15), "emitter served through sherlock", async || {
        let (code, body) = get_via(&http, sherlock_port, "/emitter/").await.ok()?;
        (code == 200 && body.starts_with("vm101 ")).then_some(())
    })
    .await;
    let (code, out, err) = dw(&["-d", &base, "--token-file", tf, "status"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("edge-1"), "the cluster token keeps a sherlock's own name: {out}");
    let (code, _, err) = dw(&["-d", &base, "status"], &[("XDG_CONFIG_HOME", tmp.path().to_str().unwrap())]);
    assert_eq!(code, 1, "{err}");

    // A restart reuses the token; the clients carry on.
    directory.stop();
    let mut directory = Proc::start(tmp.path(), "directory", &args);
    wait_until_up(&http, port, &directory).await;
    assert_eq!(std::fs::read_to_string(&token_path).unwrap().trim(), token);
    directory.wait_for_log("created=false", Duration::from_secs(5)).await;
    eventually(Duration::from_secs(15), "watson to register again", async || {
        let (code, status) = call(&http, port, Some(&token), "GET", "/v1/status", None).await;
        (code == 200 && status["instances"].as_array()?.len() == 1).then_some(())
    })
    .await;
    directory.stop();
    for entry in std::fs::read_dir(tmp.path()).unwrap().flatten() {
        if entry.path().extension().is_some_and(|e| e == "log") {
            assert!(!std::fs::read_to_string(entry.path()).unwrap().contains(&token), "{}", entry.path().display());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_turns_tokens_off_on_a_network_address_with_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let port = free_port();
    let listen = format!("0.0.0.0:{port}");
    let directory = Proc::start(
        tmp.path(),
        "directory",
        &["--listen", &listen, "--state-dir", state.to_str().unwrap(), "--insecure"],
    );
    let http = reqwest::Client::new();
    wait_until_up(&http, port, &directory).await;
    assert_eq!(call(&http, port, None, "GET", "/v1/status", None).await.0, 200);
    let log = directory.wait_for_log("--insecure: no token is asked for", Duration::from_secs(5)).await;
    assert!(log.lines().any(|l| l.contains("WARN") && l.contains("--insecure")), "{log}");
    assert!(!state.join("token").exists());
    // An auth file and --insecure contradict each other: a usage error.
    let out = Command::new(bin("directory")).args(["--insecure", "--auth-file", "/nonexistent.yaml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("drop one of them"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_signed_with_the_secret_reconciles() {
    let repo_dir = tempfile::tempdir().unwrap();
    let repo = RoutesRepo::new(repo_dir.path());
    let initial = repo.commit(&[("routes/barker.yaml", "barker: {v1: 100}\n")], "initial");
    let secret = repo_dir.path().join("webhook-secret");
    write_private(&secret, "It's a Secret to Everybody\n");
    // A file:// URL, not a plain path: no file watch fetches behind the test's back.
    let url = format!("file://{}", repo.url());
    let s = Secured::start(&["--repo", &url, "--poll", "1h", "--webhook-secret-file", secret.to_str().unwrap()]).await;
    eventually(Duration::from_secs(10), "the initial commit", async || {
        (s.status().await["commit"] == initial.to_string().as_str()).then_some(())
    })
    .await;
    let next = repo.commit(&[("routes/barker.yaml", "barker: {v1: 90, v2: 10}\n")], "canary");

    let body = json!({"ref": "refs/heads/main", "after": next.to_string()}).to_string();
    let sign = |body: &str| {
        use hmac::Mac as _;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"It's a Secret to Everybody").unwrap();
        mac.update(body.as_bytes());
        format!("sha256={}", dstack::secret::hex(&mac.finalize().into_bytes()))
    };
    let hook = |signature: Option<String>, body: String| {
        let mut req = s.http.post(format!("{}/v1/reconcile", s.base())).header("content-type", "application/json");
        if let Some(signature) = signature {
            req = req.header("X-Hub-Signature-256", signature);
        }
        async move {
            let resp = req.body(body).send().await.unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        }
    };
    // Bad: signed with another secret, or over another body.
    let (code, answer) = hook(Some(sign("another body")), body.clone()).await;
    assert_eq!(code, 401, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("does not match"), "{answer}");
    // Missing: neither a signature nor a token.
    let (code, answer) = hook(None, body.clone()).await;
    assert_eq!(code, 401, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("or sign the body"), "{answer}");
    assert_eq!(s.status().await["commit"], initial.to_string(), "nothing fetched yet");
    // Good.
    let (code, answer) = hook(Some(sign(&body)), body.clone()).await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["commit"], next.to_string(), "{answer}");
}
