//! `postroom admin signing-keys` and `postroom admin rotate-signing-key`: the token signing
//! keys from a shell, so that an operator who fears a copy of the database is out can rotate the
//! key with one command (see `api/signing_keys.rs` for what a rotation does). Like every client
//! subcommand, each is one API call.

use reqwest::Method;
use serde_json::{json, Value};

use super::client::{CliError, Client};
use super::output::{at, items, out, print_json, Table};

/// Prints the keys of an answer `{signing_kid, items}`.
fn print_keys(answer: &Value) {
    let mut t = Table::new(&["KID", "SIGNING", "CREATED", "RETIRED", "VERIFIES_UNTIL"]);
    for k in items(answer) {
        let signing = if k.get("signing").and_then(Value::as_bool) == Some(true) {
            "yes"
        } else {
            "no"
        };
        t.row(vec![
            at(k, "/kid"),
            signing.to_string(),
            at(k, "/created_at"),
            at(k, "/retired_at"),
            at(k, "/verify_until"),
        ]);
    }
    t.print();
}

/// `postroom admin signing-keys`: the keys in use, never the keys themselves.
pub async fn list(client: &Client, json: bool) -> Result<(), CliError> {
    let answer = client.get(&["v1", "admin", "signing-keys"], &[]).await?;
    if json {
        print_json(&answer);
    } else {
        print_keys(&answer);
    }
    Ok(())
}

/// `postroom admin rotate-signing-key [--drop-previous]`.
pub async fn rotate(client: &Client, json: bool, drop_previous: bool) -> Result<(), CliError> {
    let body = json!({ "drop_previous": drop_previous });
    let answer = client
        .call(
            Method::POST,
            &["v1", "admin", "signing-keys", "rotate"],
            Some(&body),
        )
        .await?
        .body;
    if json {
        print_json(&answer);
        return Ok(());
    }
    out!(
        "token signing key rotated: {} signs from now on",
        at(&answer, "/signing_kid")
    );
    if drop_previous {
        out!(
            "earlier keys dropped: every token issued before is refused; clients must get new ones"
        );
    } else {
        out!("earlier keys verify the tokens they signed until those expire");
    }
    print_keys(&answer);
    Ok(())
}
