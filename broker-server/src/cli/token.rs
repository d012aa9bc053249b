//! Access tokens for the command line: getting one from the server's token endpoint with client
//! credentials, and caching it on disk until it expires. It exists so that a user can give a
//! client id and secret once (flags or environment) instead of fetching and pasting bearer
//! tokens, without every command paying for a token request: the server hashes secrets with
//! Argon2id, so each token request is deliberately slow.
//!
//! The cache holds only the access token, its expiry, the server and the client id; never the
//! secret. Each server and client id pair has its own file, named by a hash of the two so that
//! neither has to be made safe as a file name.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::Url;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::client::CliError;

/// A cached token is no longer used when it expires within this many seconds, so that it does
/// not run out between being read and reaching the server.
pub const EXPIRY_MARGIN_SECS: u64 = 30;

/// An access token and when it expires.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessToken {
    /// The bearer token.
    pub access_token: String,
    /// When it expires, in seconds since the Unix epoch (by this machine's clock).
    pub expires_at: u64,
}

impl AccessToken {
    /// Whether it can still be used at `now` (seconds since the epoch), with the margin.
    pub fn usable_at(&self, now: u64) -> bool {
        now.saturating_add(EXPIRY_MARGIN_SECS) < self.expires_at
    }
}

/// The current time in seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The folder for cached tokens: `dir` when given (`--cache-dir` or `POSTROOM_CACHE_DIR`), else
/// `$XDG_CACHE_HOME/postroom`, else `$HOME/.cache/postroom`; `None` when none of them is set.
pub fn cache_dir(dir: Option<&Path>) -> Option<PathBuf> {
    if let Some(d) = dir.filter(|d| !d.as_os_str().is_empty()) {
        return Some(d.to_path_buf());
    }
    // The XDG base directory specification says relative values are to be ignored.
    let absolute = |name: &str| {
        std::env::var_os(name)
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
    };
    absolute("XDG_CACHE_HOME")
        .map(|p| p.join("postroom"))
        .or_else(|| absolute("HOME").map(|p| p.join(".cache").join("postroom")))
}

/// The cache file of one server and client id.
#[derive(Clone, Debug)]
pub struct TokenCache {
    path: PathBuf,
    server: String,
    client_id: String,
}

/// What a cache file holds.
#[derive(Serialize, Deserialize)]
struct CacheFile {
    server: String,
    client_id: String,
    #[serde(flatten)]
    token: AccessToken,
}

impl TokenCache {
    /// The cache of `client_id` at `server` inside `dir`.
    pub fn new(dir: &Path, server: &str, client_id: &str) -> Self {
        // The newline cannot occur in a URL, so no two pairs hash the same text.
        let digest = Sha256::digest(format!("{server}\n{client_id}").as_bytes());
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        TokenCache {
            path: dir.join(format!("token-{hex}.json")),
            server: server.to_string(),
            client_id: client_id.to_string(),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cached token if there is one that is still usable at `now`. A missing, unreadable or
    /// foreign file counts as no token: the caller then simply fetches a new one.
    pub fn load(&self, now: u64) -> Option<AccessToken> {
        let text = std::fs::read(&self.path).ok()?;
        let file: CacheFile = serde_json::from_slice(&text).ok()?;
        (file.server == self.server
            && file.client_id == self.client_id
            && file.token.usable_at(now))
        .then_some(file.token)
    }

    /// Writes `token` to the cache, readable by this user only. The file is written aside and
    /// renamed into place, so that a command running at the same moment never reads half a file.
    pub fn store(&self, token: &AccessToken) -> Result<(), CliError> {
        let fail = |what: &str, e: std::io::Error| {
            CliError::Local(format!(
                "cannot {what} the token cache {}: {e}",
                self.path.display()
            ))
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder
            .create(dir)
            .map_err(|e| fail("create the folder of", e))?;
        let file = CacheFile {
            server: self.server.clone(),
            client_id: self.client_id.clone(),
            token: token.clone(),
        };
        let text = serde_json::to_vec_pretty(&file)
            .map_err(|e| CliError::Local(format!("cannot encode the token cache: {e}")))?;
        let tmp = self
            .path
            .with_extension(format!("json.{}.tmp", std::process::id()));
        // A left-over file from a crashed run may have other permissions; the mode below only
        // applies to a file that is created.
        let _ = std::fs::remove_file(&tmp);
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let written = options
            .open(&tmp)
            .and_then(|mut f| std::io::Write::write_all(&mut f, &text))
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(fail("write", e));
        }
        Ok(())
    }

    /// Removes the cached token, for example after the server refused it.
    pub fn remove(&self) {
        // A file that is already gone is what was wanted; any other failure only means the next
        // command reads the stale token, is refused, and tries to remove it again.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `application/x-www-form-urlencoded` encoding of one value, as RFC 6749 (section 2.3.1) asks
/// for the client id and secret inside HTTP Basic credentials.
pub fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(char::from(b))
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Gets a token from `POST {base}oauth/token` with the client credentials grant, authenticating
/// with HTTP Basic (`client_secret_basic`). `base` must end with a slash.
pub async fn fetch(
    http: &reqwest::Client,
    base: &Url,
    client_id: &str,
    client_secret: &str,
) -> Result<AccessToken, CliError> {
    let url = base
        .join("oauth/token")
        .map_err(|e| CliError::Usage(format!("cannot build the token URL: {e}")))?;
    let basic = B64.encode(format!(
        "{}:{}",
        form_encode(client_id),
        form_encode(client_secret)
    ));
    let mut auth = HeaderValue::from_str(&format!("Basic {basic}"))
        .map_err(|_| CliError::Local("cannot encode the client credentials".to_string()))?;
    auth.set_sensitive(true);
    let unreachable = |e: reqwest::Error| CliError::Unreachable {
        url: base.as_str().trim_end_matches('/').to_string(),
        cause: super::client::error_chain(&e),
    };
    let resp = http
        .post(url)
        .header(AUTHORIZATION, auth)
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body("grant_type=client_credentials")
        .send()
        .await
        .map_err(unreachable)?;
    let status = resp.status();
    let bytes = resp.bytes().await.map_err(unreachable)?;
    let body: Option<Value> = serde_json::from_slice(&bytes).ok();
    let field = |k: &str| {
        body.as_ref()
            .and_then(|v| v.get(k))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    if !status.is_success() {
        let code = field("error").unwrap_or_else(|| "http_error".to_string());
        let detail = if status == reqwest::StatusCode::UNAUTHORIZED {
            "invalid client credentials".to_string()
        } else {
            field("error_description").unwrap_or_else(|| {
                format!(
                    "the token request failed: {}",
                    status.canonical_reason().unwrap_or("error")
                )
            })
        };
        return Err(CliError::Api {
            status: status.as_u16(),
            code,
            detail,
            notes: Vec::new(),
        });
    }
    let bad = |why: &str| CliError::Local(format!("the token endpoint's answer {why}"));
    let token = field("access_token")
        .filter(|t| !t.is_empty())
        .ok_or_else(|| bad("has no access_token"))?;
    if !field("token_type").is_some_and(|t| t.eq_ignore_ascii_case("bearer")) {
        return Err(bad("is not a bearer token"));
    }
    let expires_in = body
        .as_ref()
        .and_then(|v| v.get("expires_in"))
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("has no expires_in"))?;
    Ok(AccessToken {
        access_token: token,
        expires_at: now_secs().saturating_add(expires_in),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_encoding_matches_the_servers_decoding() {
        assert_eq!(form_encode("my:client"), "my%3Aclient");
        assert_eq!(form_encode("s+c ret/é"), "s%2Bc+ret%2F%C3%A9");
        assert_eq!(form_encode("plain-id_1.x"), "plain-id_1.x");
    }

    #[test]
    fn cache_round_trip_margin_and_no_mixing() {
        let dir = tempfile::tempdir().unwrap();
        let cache = TokenCache::new(dir.path(), "http://h:1/", "ci");
        assert_eq!(cache.load(0), None);
        let t = AccessToken {
            access_token: "tok".into(),
            expires_at: 1000,
        };
        cache.store(&t).unwrap();
        assert_eq!(cache.load(900), Some(t.clone()));
        assert_eq!(cache.load(970), None, "within the margin of expiry");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(cache.path())
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Another client or server has another file.
        let other = TokenCache::new(dir.path(), "http://h:1/", "other");
        assert_ne!(other.path(), cache.path());
        assert_eq!(other.load(0), None);
        let other = TokenCache::new(dir.path(), "http://h:2/", "ci");
        assert_ne!(other.path(), cache.path());
        cache.remove();
        assert_eq!(cache.load(0), None);
    }
}
