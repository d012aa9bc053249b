//! The accounts side of the client subcommands: logging in and reusing a cached token, the
//! administrative commands that set up a publisher, packs, and rotating the token signing key.
//! Split from `main.rs`, which keeps the server harness and the message commands.

use super::*;

/// A user of a server with authentication on: client credentials and a token cache of their own.
struct User<'a> {
    server: &'a Server,
    cache: &'a std::path::Path,
    client_id: String,
    secret: String,
}

impl User<'_> {
    /// The binary run as this user (credentials and cache from the environment).
    fn command(&self, args: &[&str]) -> Command {
        let mut c = self.server.command(args);
        c.env("POSTROOM_CACHE_DIR", self.cache)
            .env("POSTROOM_CLIENT_ID", &self.client_id)
            .env("POSTROOM_CLIENT_SECRET", &self.secret);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "postroom {args:?} as {} failed with {:?}: {}",
            self.client_id,
            out.status,
            stderr(&out)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.ok(&all)).unwrap()
    }

    fn run_with_stdin(&self, args: &[&str], stdin: &[u8]) -> Output {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        child.wait_with_output().unwrap()
    }
}

fn admin<'a>(server: &'a Server, cache: &'a std::path::Path, secret: &str) -> User<'a> {
    User {
        server,
        cache,
        client_id: "admin".into(),
        secret: secret.into(),
    }
}

/// The files in the token cache folder.
fn cache_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn login_caches_a_token_that_later_commands_reuse() {
    let s = Server::start_secured();
    let cache = tempfile::tempdir().unwrap();

    // Without credentials the server refuses, and the CLI says how to log in.
    let out = s.run(&["rooms", "list"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("(unauthenticated, HTTP 401)"), "{err}");
    assert!(err.contains("--client-id"), "{err}");

    // A wrong secret with nothing cached is refused by the token endpoint; nothing is cached.
    let wrong = admin(&s, cache.path(), "not-the-admin-secret");
    let out = wrong.run(&["rooms", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out).trim_end(),
        "error: invalid client credentials (invalid_client, HTTP 401)"
    );
    assert!(cache_files(cache.path()).is_empty());
    assert_eq!(wrong.run(&["login"]).status.code(), Some(1));

    // Logging in writes one cache file, readable by its owner only, without the secret.
    let right = admin(&s, cache.path(), ADMIN_SECRET);
    let out = right.ok(&["login"]);
    assert!(out.contains("logged in; the token expires at "), "{out}");
    let files = cache_files(cache.path());
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(out.contains(&files[0].display().to_string()), "{out}");
    let text = std::fs::read_to_string(&files[0]).unwrap();
    assert!(!text.contains(ADMIN_SECRET), "{text}");
    let cached: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(cached["client_id"], "admin");
    let first_token = cached["access_token"].as_str().unwrap().to_string();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&files[0]).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // With the client id alone the cached token is used; with nothing cached it is a usage
    // error that asks for the secret.
    let out = s
        .command(&["rooms", "list", "--client-id", "admin"])
        .env("POSTROOM_CACHE_DIR", cache.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let empty = tempfile::tempdir().unwrap();
    let out = s
        .command(&["rooms", "list", "--client-id", "admin"])
        .env("POSTROOM_CACHE_DIR", empty.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--client-secret"), "{}", stderr(&out));

    // With a wrong secret the cached token still works: no token was requested.
    assert!(wrong.ok(&["rooms", "create", "irc"]).contains("irc"));
    assert!(right.ok(&["rooms", "list"]).contains("irc"));
    let text = std::fs::read_to_string(&files[0]).unwrap();
    assert!(text.contains(&first_token), "the cached token was kept");

    // A cached token that the server refuses is dropped and replaced once.
    let mut forged = cached.clone();
    forged["access_token"] = Value::from("not-a-token");
    std::fs::write(&files[0], forged.to_string()).unwrap();
    let out = wrong.run(&["rooms", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("(invalid_client, HTTP 401)"),
        "the refused token led to a token request: {}",
        stderr(&out)
    );
    std::fs::write(&files[0], forged.to_string()).unwrap();
    assert!(right.ok(&["rooms", "list"]).contains("irc"));
    let renewed: Value =
        serde_json::from_str(&std::fs::read_to_string(&files[0]).unwrap()).unwrap();
    let renewed = renewed["access_token"].as_str().unwrap();
    assert_ne!(renewed, "not-a-token");
    assert!(!renewed.is_empty());

    // `--print-token` prints just a token that works with `--token`, which wins over the
    // credentials.
    let token = right.ok(&["login", "--print-token"]);
    let token = token.trim();
    assert_eq!(token.lines().count(), 1, "{token}");
    assert!(s.ok(&["--token", token, "rooms", "list"]).contains("irc"));
    let out = right.run(&["--token", "not-a-token", "rooms", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("(unauthenticated, HTTP 401)"),
        "{}",
        stderr(&out)
    );

    // The JSON form says where and until when.
    let v = right.json(&["login"]);
    assert_eq!(v["client_id"], "admin");
    assert_eq!(v["cache_file"], files[0].display().to_string());
    let expires_in = v["expires_in"].as_u64().unwrap();
    assert!(expires_in > 3000 && expires_in <= 3600, "{v}");
    assert!(v.get("access_token").is_none(), "only with --print-token");

    // Without POSTROOM_CACHE_DIR the cache is under XDG_CACHE_HOME, else under HOME.
    let xdg = tempfile::tempdir().unwrap();
    let out = s
        .command(&["login", "--client-id", "admin"])
        .env("POSTROOM_CLIENT_SECRET", ADMIN_SECRET)
        .env("XDG_CACHE_HOME", xdg.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(cache_files(&xdg.path().join("postroom")).len(), 1);
    let home = tempfile::tempdir().unwrap();
    let out = s
        .command(&["login", "--client-id", "admin"])
        .env("POSTROOM_CLIENT_SECRET", ADMIN_SECRET)
        .env_remove("XDG_CACHE_HOME")
        .env("HOME", home.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        cache_files(&home.path().join(".cache").join("postroom")).len(),
        1
    );

    // A secret without a client id is a usage error.
    let out = s
        .command(&["rooms", "list"])
        .env("POSTROOM_CLIENT_SECRET", ADMIN_SECRET)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[test]
fn admin_commands_set_up_a_publisher() {
    let s = Server::start_secured();
    let cache = tempfile::tempdir().unwrap();
    let root = admin(&s, cache.path(), ADMIN_SECRET);

    let out = root.ok(&[
        "admin",
        "members",
        "create",
        "UK/GOV/HO",
        "--name",
        "Home Office",
    ]);
    assert!(out.contains("created member UK/GOV/HO"), "{out}");
    let table = root.ok(&["admin", "members", "list"]);
    assert!(table.starts_with("ID"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("UK/GOV/HO ") && l.ends_with("Home Office")),
        "{table}"
    );
    let out = root.ok(&["admin", "apps", "create", "UK/GOV/HO", "pub"]);
    assert!(out.contains("created application UK/GOV/HO/pub"), "{out}");
    let apps = root.json(&["admin", "apps", "list", "--member", "UK/GOV/HO"]);
    assert_eq!(apps["items"].as_array().unwrap().len(), 1, "{apps}");
    assert_eq!(apps["items"][0]["id"], "UK/GOV/HO/pub");

    // The secret is printed once, labelled.
    let out = root.ok(&[
        "admin",
        "clients",
        "create",
        "UK/GOV/HO/pub",
        "--id",
        "ho-pub",
    ]);
    assert!(
        out.contains("created client ho-pub for application UK/GOV/HO/pub"),
        "{out}"
    );
    let label = "client secret (shown only this once; store it now): ";
    let secret = out
        .lines()
        .find_map(|l| l.strip_prefix(label))
        .unwrap_or_else(|| panic!("no secret in {out}"))
        .to_string();
    assert!(secret.len() >= 16, "{secret}");
    let listed = root.ok(&["admin", "clients", "list", "--application", "UK/GOV/HO/pub"]);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("ho-pub ") && l.contains("UK/GOV/HO/pub")),
        "{listed}"
    );
    assert!(!listed.contains(&secret), "listings never show secrets");

    // Rooms by the administrator; the new application may publish to one of them only.
    let schema = s.file("msg.json", r#"{"type":"object"}"#);
    for room in ["irc", "private"] {
        root.ok(&["rooms", "create", room]);
        root.ok(&["types", "put", room, "msg", "--schema", &schema]);
    }
    let out = root.ok(&[
        "admin",
        "grants",
        "add",
        "UK/GOV/HO/pub",
        "publisher",
        "--room",
        "irc",
    ]);
    assert!(
        out.contains("granted publisher on room irc to UK/GOV/HO/pub"),
        "{out}"
    );
    let grants = root.json(&["admin", "grants", "list", "--application", "UK/GOV/HO/pub"]);
    assert_eq!(grants["items"].as_array().unwrap().len(), 1, "{grants}");
    assert_eq!(grants["items"][0]["role"], "publisher");
    assert_eq!(grants["items"][0]["room"], "irc");

    let publisher = User {
        server: &s,
        cache: cache.path(),
        client_id: "ho-pub".into(),
        secret: secret.clone(),
    };
    let out = publisher.run_with_stdin(&["publish", "irc", "msg"], br#"{"text": "hi"}"#);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("published "));
    let events = root.ok(&["--json", "tail", "irc", "--from-start", "--count", "1"]);
    let event: Value = serde_json::from_str(events.trim()).unwrap();
    assert_eq!(event["payload"]["text"], "hi");
    assert_eq!(event["event"]["publisher"], "UK/GOV/HO/pub", "{event}");

    // No right on the other Room, and none to administer.
    let out = publisher.run_with_stdin(&["publish", "private", "msg"], br#"{"text": "hi"}"#);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("(forbidden, HTTP 403)"),
        "{}",
        stderr(&out)
    );
    let out = publisher.run(&["admin", "members", "create", "UK/GOV/XX"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("(forbidden, HTTP 403)"),
        "{}",
        stderr(&out)
    );

    // Taking the right away stops publishing.
    root.ok(&[
        "admin",
        "grants",
        "revoke",
        "UK/GOV/HO/pub",
        "publisher",
        "--room",
        "irc",
    ]);
    let out = publisher.run_with_stdin(&["publish", "irc", "msg"], br#"{"text": "again"}"#);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("(forbidden, HTTP 403)"),
        "{}",
        stderr(&out)
    );

    // Rotation: a second secret works, and the first stops working once revoked.
    let out = root.ok(&["admin", "clients", "add-secret", "ho-pub"]);
    assert!(out.contains("added secret 2 to client ho-pub"), "{out}");
    let second = out
        .lines()
        .find_map(|l| l.strip_prefix(label))
        .unwrap_or_else(|| panic!("no secret in {out}"))
        .to_string();
    root.ok(&["admin", "clients", "revoke-secret", "ho-pub", "1"]);
    let fresh_cache = tempfile::tempdir().unwrap();
    let old = User {
        cache: fresh_cache.path(),
        ..publisher
    };
    assert_eq!(old.run(&["login"]).status.code(), Some(1));
    let new = User {
        secret: second,
        ..old
    };
    new.ok(&["login"]);

    // The audit log names the administrator as the one who created the member.
    let audit = root.json(&["admin", "audit", "--action", "POST /v1/admin/members"]);
    let entries = audit["items"].as_array().unwrap();
    // The member creation, then the publisher's refused attempt.
    assert_eq!(entries.len(), 2, "{audit}");
    assert_eq!(entries[0]["actor"], ADMIN_APP);
    assert_eq!(entries[0]["outcome"], "success");
    assert_eq!(entries[0]["target"], "/v1/admin/members");
    assert_eq!(entries[1]["actor"], "UK/GOV/HO/pub");
    let failures = root.json(&["admin", "audit", "--outcome", "failure", "--limit", "1"]);
    assert_eq!(failures["items"].as_array().unwrap().len(), 1, "{failures}");
    assert_eq!(failures["items"][0]["outcome"], "failure");
    assert_eq!(failures["items"][0]["actor"], "UK/GOV/HO/pub");
    assert_eq!(failures["items"][0]["error"], "forbidden");
    let table = root.ok(&["admin", "audit", "--actor", ADMIN_APP]);
    assert!(table.starts_with("SEQ"), "{table}");
    assert!(table.contains("POST /v1/admin/members"), "{table}");

    // Ids with `/` are one path segment when deleting too.
    root.ok(&["admin", "clients", "delete", "ho-pub"]);
    root.ok(&["admin", "apps", "delete", "UK/GOV/HO/pub"]);
    assert!(root
        .ok(&["admin", "members", "delete", "UK/GOV/HO"])
        .contains("deleted member UK/GOV/HO"));
    let members = root.json(&["admin", "members", "list"]);
    assert!(!members.to_string().contains("UK/GOV/HO"), "{members}");
}

/// The `irc` pack shipped in `schemas/`.
fn irc_pack() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/../schemas/irc/pack.toml").to_string()
}

/// `pack apply` creates a pack's Room and types, reports `unchanged` when applied again, and
/// `updated` / `new version` for what changed; a pack with a bad schema file fails (exit 1)
/// without touching the server.
#[test]
fn pack_apply_is_idempotent_and_reports_changes() {
    let s = Server::start();
    let outcomes = |v: &Value| -> Vec<(String, String, String)> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let f = |k: &str| r[k].as_str().unwrap().to_string();
                (f("room"), f("event_type"), f("outcome"))
            })
            .collect()
    };
    let first = outcomes(&s.json(&["pack", "apply", &irc_pack()]));
    assert_eq!(first.len(), 9, "{first:?}");
    assert_eq!(first[0], ("irc".into(), "".into(), "created".into()));
    assert!(
        first[1..].iter().all(|(_, _, o)| o == "created"),
        "{first:?}"
    );
    let again = outcomes(&s.json(&["pack", "apply", &irc_pack()]));
    assert!(again.iter().all(|(_, _, o)| o == "unchanged"), "{again:?}");
    let table = s.ok(&["pack", "apply", &irc_pack()]);
    assert!(
        table.contains("heartbeat") && table.contains("unchanged"),
        "{table}"
    );

    s.file("t.schema.json", r#"{"type": "object", "required": ["a"]}"#);
    let pack = s.file(
        "p.toml",
        "[[rooms]]\nname = \"irc\"\ndescription = \"changed\"\n[rooms.retry]\nattempts_max = 60\n\
         [[rooms.event_types]]\nname = \"heartbeat\"\nschema = \"t.schema.json\"\nkey_pointer = \"/centre\"\n",
    );
    let changed = outcomes(&s.json(&["pack", "apply", &pack]));
    assert_eq!(
        changed,
        [
            ("irc".into(), "".into(), "updated".into()),
            ("irc".into(), "heartbeat".into(), "new version".into())
        ]
    );
    let bad = s.file(
        "bad.toml",
        "[[rooms]]\nname = \"x\"\n[[rooms.event_types]]\nname = \"t\"\nschema = \"missing.json\"\n",
    );
    let out = s.run(&["pack", "apply", &bad]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("missing.json"), "{}", stderr(&out));
    assert!(s.run(&["rooms", "get", "x"]).status.code() == Some(1));

    // Every other bad file is refused before the server is touched, with an error that names
    // the file and, for a type, the Room, the type and its schema file.
    s.file("five.schema.json", r#"{"type": 5}"#);
    for (name, text, expected) in [
        (
            "bad-schema.toml",
            "[[rooms]]\nname = \"x\"\n[[rooms.event_types]]\nname = \"t\"\nschema = \"five.schema.json\"\n",
            "event type `x/t` (schema ",
        ),
        (
            "bad-pointer.toml",
            "[[rooms]]\nname = \"x\"\n[[rooms.event_types]]\nname = \"t\"\nschema = \"t.schema.json\"\nkey_pointer = \"a\"\n",
            "key_pointer",
        ),
        (
            "twice.toml",
            "[[rooms]]\nname = \"x\"\n[[rooms.event_types]]\nname = \"t\"\nschema = \"t.schema.json\"\n\
             [[rooms.event_types]]\nname = \"t\"\nschema = \"t.schema.json\"\n",
            "`x/t` is declared twice",
        ),
        ("unknown-key.toml", "[[rooms]]\nname = \"x\"\ncolour = \"red\"\n", "unknown field `colour`"),
        ("not-toml.toml", "[[rooms]\nname = \"x\"\n", "TOML parse error"),
        ("empty.toml", "rooms = []\n", "declares no Room"),
    ] {
        let path = s.file(name, text);
        let out = s.run(&["pack", "apply", &path]);
        assert_eq!(out.status.code(), Some(1), "{name}: {}", stderr(&out));
        assert!(stderr(&out).contains(name), "{name}: {}", stderr(&out));
        assert!(stderr(&out).contains(expected), "{name}: {}", stderr(&out));
        assert!(s.run(&["rooms", "get", "x"]).status.code() == Some(1), "{name}");
    }
}

/// `packs = [...]` in the configuration applies them at start.
#[test]
fn packs_in_the_config_are_applied_at_start() {
    let mut c = local();
    c.packs = vec![irc_pack().into()];
    let s = Server::start_with(c);
    let types = s.json(&["types", "list", "irc"]);
    let names: Vec<&str> = types
        .as_array()
        .or(types["items"].as_array())
        .unwrap()
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    for name in ["check_in", "out_commission", "heartbeat"] {
        assert!(names.contains(&name), "{names:?}");
    }
}

/// `postroom admin rotate-signing-key`: the new key signs, the cached token from before keeps
/// working; with `--drop-previous` the cached token is refused and the CLI gets a new one by
/// itself.
#[test]
fn admin_rotates_the_token_signing_key() {
    let s = Server::start_secured();
    let cache = tempfile::tempdir().unwrap();
    let root = admin(&s, cache.path(), ADMIN_SECRET);

    let keys = root.ok(&["admin", "signing-keys"]);
    assert!(keys.starts_with("KID"), "{keys}");
    assert!(
        keys.lines()
            .any(|l| l.starts_with("k1 ") && l.contains(" yes ")),
        "{keys}"
    );
    let cached = std::fs::read(&cache_files(cache.path())[0]).unwrap();

    let out = root.ok(&["admin", "rotate-signing-key"]);
    assert!(out.contains("k2 signs from now on"), "{out}");
    let keys = root.json(&["admin", "signing-keys"]);
    assert_eq!(keys["signing_kid"], "k2", "{keys}");
    assert_eq!(keys["items"][1]["kid"], "k1", "{keys}");
    assert_eq!(keys["items"][1]["signing"], false, "{keys}");
    assert_eq!(
        std::fs::read(&cache_files(cache.path())[0]).unwrap(),
        cached,
        "the token from before the rotation still works"
    );

    let out = root.ok(&["admin", "rotate-signing-key", "--drop-previous"]);
    assert!(out.contains("k3 signs from now on"), "{out}");
    // The cached token (signed by k1) is refused now; the CLI replaces it once and goes on.
    let keys = root.json(&["admin", "signing-keys"]);
    assert_eq!(keys["items"].as_array().unwrap().len(), 1, "{keys}");
    assert_ne!(
        std::fs::read(&cache_files(cache.path())[0]).unwrap(),
        cached,
        "a new token was cached"
    );
    let audit = root.json(&["admin", "audit", "--action", "POST /v1/admin/signing-keys"]);
    assert_eq!(audit["items"].as_array().unwrap().len(), 2, "{audit}");
    assert_eq!(
        audit["items"][1]["detail"]["drop_previous"], true,
        "{audit}"
    );
}
