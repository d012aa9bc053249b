//! The HTTP client the command-line subcommands share. It exists so that every subcommand talks
//! to the server the same way: one base URL, the bearer token on every request (given, or got
//! with client credentials and cached, see [`super::token`]), and one translation of the
//! server's RFC 9457 problem answers and of transport failures into [`CliError`], which decides
//! the exit code.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use reqwest::{Method, StatusCode, Url};
use serde_json::Value;

use super::token::{self, AccessToken, TokenCache};

/// Everything that can make a subcommand fail, each with its own exit code.
#[derive(Debug)]
pub enum CliError {
    /// The server answered with an error status.
    Api {
        /// The HTTP status.
        status: u16,
        /// The problem's stable `code`, or `http_error` when the body was not a problem.
        code: String,
        /// The problem's `detail`, or the start of the body when it was not a problem.
        detail: String,
        /// Further lines worth showing, such as each schema violation.
        notes: Vec<String>,
    },
    /// The server could not be reached at all.
    Unreachable {
        /// The URL that was tried.
        url: String,
        /// Why, as the HTTP library put it.
        cause: String,
    },
    /// The command line was well-formed but cannot be acted on (for example a malformed
    /// `--server` URL).
    Usage(String),
    /// Something on this side failed: a file could not be read, or an answer was not what the
    /// API promises.
    Local(String),
}

impl CliError {
    /// The process exit code: 1 for an error answer or a local failure, 2 for a usage error (as
    /// clap uses), 3 when the server cannot be reached.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Api { .. } | CliError::Local(_) => 1,
            CliError::Usage(_) => 2,
            CliError::Unreachable { .. } => 3,
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Api {
                status,
                code,
                detail,
                notes,
            } => {
                write!(f, "error: {detail} ({code}, HTTP {status})")?;
                for n in notes {
                    write!(f, "\n  {n}")?;
                }
                Ok(())
            }
            CliError::Unreachable { url, cause } => {
                write!(f, "error: cannot reach the server at {url}: {cause}")
            }
            CliError::Usage(m) | CliError::Local(m) => write!(f, "error: {m}"),
        }
    }
}

/// A successful answer: its status, the headers the CLI looks at, and its JSON body (`Null` for
/// an empty body such as a 204).
#[derive(Debug)]
pub struct Answer {
    /// The HTTP status.
    pub status: StatusCode,
    /// True when the server marked a publish as a duplicate of an earlier one.
    pub duplicate: bool,
    /// The body.
    pub body: Value,
}

/// How the client authenticates.
#[derive(Clone, Default)]
pub enum Auth {
    /// No `Authorization` header (a server with authentication off, or health checks).
    #[default]
    Anonymous,
    /// This bearer token, as given.
    Token(String),
    /// Tokens got from the server's token endpoint with these client credentials.
    Credentials(Credentials),
}

impl fmt::Debug for Auth {
    // Written by hand so that a token never reaches a debug print or a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::Anonymous => f.write_str("Anonymous"),
            Auth::Token(_) => f.write_str("Token(***)"),
            Auth::Credentials(c) => f.debug_tuple("Credentials").field(c).finish(),
        }
    }
}

/// Client credentials, and where their tokens are cached.
#[derive(Clone)]
pub struct Credentials {
    /// The client id.
    pub client_id: String,
    /// The secret; without it only a cached token can be used.
    pub client_secret: Option<String>,
    /// The folder of the token cache; `None` for no cache (every command fetches a token).
    pub cache_dir: Option<PathBuf>,
}

impl fmt::Debug for Credentials {
    // Written by hand so that the secret never reaches a debug print or a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("client_id", &self.client_id)
            .field("client_secret", &self.client_secret.as_ref().map(|_| "***"))
            .field("cache_dir", &self.cache_dir)
            .finish()
    }
}

/// The token in use, and whether it came from the cache (and so may have been revoked or made
/// invalid since, which is worth one retry with a fresh token).
#[derive(Clone, Debug)]
struct Bearer {
    token: String,
    from_cache: bool,
}

/// A client for one server.
#[derive(Clone, Debug)]
pub struct Client {
    base: Url,
    http: reqwest::Client,
    auth: Auth,
    /// The token got with the credentials, shared by the clones of this client.
    current: Arc<Mutex<Option<Bearer>>>,
}

impl Client {
    /// A client for the server at `server` (for example `http://127.0.0.1:8080`), sending
    /// `token` as a bearer token on every request when given.
    pub fn new(server: &str, token: Option<&str>) -> Result<Self, CliError> {
        let auth = match token.filter(|t| !t.is_empty()) {
            Some(t) => Auth::Token(t.to_string()),
            None => Auth::Anonymous,
        };
        Client::with_auth(server, auth)
    }

    /// A client for the server at `server` that authenticates as `auth` says.
    pub fn with_auth(server: &str, auth: Auth) -> Result<Self, CliError> {
        let mut base = Url::parse(server)
            .map_err(|e| CliError::Usage(format!("invalid --server URL `{server}`: {e}")))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(CliError::Usage(format!(
                "invalid --server URL `{server}`: the scheme must be http or https"
            )));
        }
        // Joining relative paths onto the base needs a trailing slash, or the last segment of a
        // base such as `http://host/postroom` would be replaced instead of extended.
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        if let Auth::Token(t) = &auth {
            // Checked here so that a bad token is a usage error, not a failed request.
            HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| {
                CliError::Usage("the token must be visible ASCII characters".to_string())
            })?;
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| CliError::Local(format!("cannot set up the HTTP client: {e}")))?;
        Ok(Client {
            base,
            http,
            auth,
            current: Arc::new(Mutex::new(None)),
        })
    }

    /// The client id the client logs in with, when it uses client credentials.
    pub fn client_id(&self) -> Option<&str> {
        match &self.auth {
            Auth::Credentials(c) => Some(&c.client_id),
            _ => None,
        }
    }

    /// The server's base URL, always ending with a slash.
    pub fn base(&self) -> &Url {
        &self.base
    }

    /// The token cache of these credentials, when there is a folder for it.
    fn cache(&self, creds: &Credentials) -> Option<TokenCache> {
        creds
            .cache_dir
            .as_deref()
            .map(|d| TokenCache::new(d, self.base.as_str(), &creds.client_id))
    }

    /// Gets a new token with the credentials and caches it. A cache that cannot be written is
    /// reported but does not fail the command: the token still works for this one.
    async fn fetch_token(&self, creds: &Credentials) -> Result<AccessToken, CliError> {
        let secret = creds.client_secret.as_deref().ok_or_else(|| {
            CliError::Usage(format!(
                "no usable cached token for client `{}`: give --client-secret (or \
                 POSTROOM_CLIENT_SECRET) too",
                creds.client_id
            ))
        })?;
        let fresh = token::fetch(&self.http, &self.base, &creds.client_id, secret).await?;
        if let Some(cache) = self.cache(creds) {
            if let Err(e) = cache.store(&fresh) {
                eprintln!("warning: {}", e.to_string().trim_start_matches("error: "));
            }
        }
        Ok(fresh)
    }

    /// `postroom login`: a fresh token for the credentials, cached; with the cache file it was
    /// written to.
    pub async fn login(&self) -> Result<(AccessToken, Option<PathBuf>), CliError> {
        let Auth::Credentials(creds) = &self.auth else {
            return Err(CliError::Usage(
                "login needs --client-id and --client-secret (or POSTROOM_CLIENT_ID and \
                 POSTROOM_CLIENT_SECRET), without --token"
                    .to_string(),
            ));
        };
        let secret = creds.client_secret.as_deref().ok_or_else(|| {
            CliError::Usage("login needs --client-secret (or POSTROOM_CLIENT_SECRET)".to_string())
        })?;
        let fresh = token::fetch(&self.http, &self.base, &creds.client_id, secret).await?;
        let path = match self.cache(creds) {
            Some(cache) => {
                cache.store(&fresh)?;
                Some(cache.path().to_path_buf())
            }
            None => None,
        };
        self.set_current(Some(Bearer {
            token: fresh.access_token.clone(),
            from_cache: false,
        }));
        Ok((fresh, path))
    }

    fn set_current(&self, bearer: Option<Bearer>) {
        // A poisoned lock only means another request panicked; the value is still a token.
        let mut slot = self.current.lock().unwrap_or_else(|p| p.into_inner());
        *slot = bearer;
    }

    /// The bearer token for the next request: the given one, or with credentials the one in
    /// use, else the cached one, else a fresh one.
    async fn bearer(&self) -> Result<Option<Bearer>, CliError> {
        let creds = match &self.auth {
            Auth::Anonymous => return Ok(None),
            Auth::Token(t) => {
                return Ok(Some(Bearer {
                    token: t.clone(),
                    from_cache: false,
                }))
            }
            Auth::Credentials(c) => c,
        };
        let current = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(b) = current {
            return Ok(Some(b));
        }
        let bearer = match self.cache(creds).and_then(|c| c.load(token::now_secs())) {
            Some(cached) => Bearer {
                token: cached.access_token,
                from_cache: true,
            },
            None => Bearer {
                token: self.fetch_token(creds).await?.access_token,
                from_cache: false,
            },
        };
        self.set_current(Some(bearer.clone()));
        Ok(Some(bearer))
    }

    /// Forgets a cached token the server refused, in memory and on disk.
    fn forget(&self) {
        self.set_current(None);
        if let Auth::Credentials(creds) = &self.auth {
            if let Some(cache) = self.cache(creds) {
                cache.remove();
            }
        }
    }

    /// The URL of an API path such as `["v1", "rooms", name]`. Each segment is percent-encoded
    /// on its own, so that a name can never add a path level.
    pub fn url(&self, segments: &[&str], query: &[(&str, String)]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        if !query.is_empty() {
            let mut pairs = url.query_pairs_mut();
            for (k, v) in query {
                pairs.append_pair(k, v);
            }
        }
        url
    }

    /// `GET` with query parameters.
    pub async fn get(
        &self,
        segments: &[&str],
        query: &[(&str, String)],
    ) -> Result<Value, CliError> {
        let url = self.url(segments, query);
        Ok(self.send(self.http.get(url.clone()), &url).await?.body)
    }

    /// A request with an optional JSON body.
    pub async fn call(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&Value>,
    ) -> Result<Answer, CliError> {
        let url = self.url(segments, &[]);
        let mut req = self.http.request(method, url.clone());
        if let Some(b) = body {
            req = req.json(b);
        }
        self.send(req, &url).await
    }

    /// `POST` of raw JSON bytes with extra headers, as publishing needs: the payload is sent
    /// byte for byte, so that the server validates exactly what the user wrote.
    pub async fn post_raw(
        &self,
        segments: &[&str],
        headers: HeaderMap,
        body: Vec<u8>,
    ) -> Result<Answer, CliError> {
        let url = self.url(segments, &[]);
        let req = self
            .http
            .post(url.clone())
            .headers(headers)
            .header(CONTENT_TYPE, "application/json")
            .body(body);
        self.send(req, &url).await
    }

    async fn send(&self, req: reqwest::RequestBuilder, url: &Url) -> Result<Answer, CliError> {
        let bearer = self.bearer().await?;
        // Kept to send again if a cached token turns out to be refused. Every body this client
        // sends is in memory, so the clone always succeeds.
        let again = req.try_clone();
        let (mut status, mut duplicate, mut bytes) =
            self.execute(authorize(req, &bearer), url).await?;
        if status == StatusCode::UNAUTHORIZED {
            if let (
                Some(Bearer {
                    from_cache: true, ..
                }),
                Some(again),
            ) = (&bearer, again)
            {
                // The cached token was revoked, or signed with a key the server no longer has:
                // drop it and try once with a fresh one.
                self.forget();
                let fresh = self.bearer().await?;
                (status, duplicate, bytes) = self.execute(authorize(again, &fresh), url).await?;
            }
        }
        if status.is_success() {
            let body = if bytes.iter().all(u8::is_ascii_whitespace) {
                Value::Null
            } else {
                serde_json::from_slice(&bytes)
                    .map_err(|e| CliError::Local(format!("the server's answer is not JSON: {e}")))?
            };
            return Ok(Answer {
                status,
                duplicate,
                body,
            });
        }
        let mut err = problem(status, &bytes);
        if status == StatusCode::UNAUTHORIZED && matches!(self.auth, Auth::Anonymous) {
            if let CliError::Api { notes, .. } = &mut err {
                notes.push(
                    "log in with --client-id and --client-secret (or POSTROOM_CLIENT_ID and \
                     POSTROOM_CLIENT_SECRET), or give --token"
                        .to_string(),
                );
            }
        }
        Err(err)
    }

    /// Sends one request and reads its whole answer.
    async fn execute(
        &self,
        req: reqwest::RequestBuilder,
        url: &Url,
    ) -> Result<(StatusCode, bool, axum::body::Bytes), CliError> {
        let resp = req.send().await.map_err(|e| CliError::Unreachable {
            url: self.base.as_str().trim_end_matches('/').to_string(),
            cause: error_chain(&e),
        })?;
        let status = resp.status();
        let duplicate = resp
            .headers()
            .get("postroom-duplicate")
            .is_some_and(|v| v == "true");
        let bytes = resp.bytes().await.map_err(|e| CliError::Unreachable {
            url: url.to_string(),
            cause: format!("the answer was cut off: {}", error_chain(&e)),
        })?;
        Ok((status, duplicate, bytes))
    }
}

/// The request with the bearer token, when there is one.
fn authorize(req: reqwest::RequestBuilder, bearer: &Option<Bearer>) -> reqwest::RequestBuilder {
    match bearer {
        Some(b) => req.bearer_auth(&b.token),
        None => req,
    }
}

/// The error of an unsuccessful answer, from its problem+json body when it has one.
fn problem(status: StatusCode, bytes: &[u8]) -> CliError {
    let parsed: Option<Value> = serde_json::from_slice(bytes).ok();
    let field = |k: &str| {
        parsed
            .as_ref()
            .and_then(|v| v.get(k))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let detail = field("detail")
        .or_else(|| field("title"))
        .unwrap_or_else(|| {
            let text = String::from_utf8_lossy(bytes);
            let text = text.trim();
            if text.is_empty() {
                status.canonical_reason().unwrap_or("error").to_string()
            } else {
                text.chars().take(200).collect()
            }
        });
    let mut notes = Vec::new();
    if let Some(vs) = parsed
        .as_ref()
        .and_then(|v| v.get("violations"))
        .and_then(Value::as_array)
    {
        for v in vs {
            let at = v.get("instance_path").and_then(Value::as_str).unwrap_or("");
            let msg = v.get("message").and_then(Value::as_str).unwrap_or("");
            let at = if at.is_empty() { "(root)" } else { at };
            notes.push(format!("at {at}: {msg}"));
        }
        let total = parsed
            .as_ref()
            .and_then(|v| v.get("violations_total"))
            .and_then(Value::as_u64)
            .unwrap_or(0);
        if total > vs.len() as u64 {
            notes.push(format!("... and {} more", total - vs.len() as u64));
        }
    }
    if let Some(f) = field("field") {
        notes.push(format!("field: {f}"));
    }
    CliError::Api {
        status: status.as_u16(),
        code: field("code").unwrap_or_else(|| "http_error".to_string()),
        detail,
        notes,
    }
}

/// The error with its causes, since reqwest's own message ("error sending request") rarely says
/// what went wrong.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_encode_each_segment_and_keep_a_base_path() {
        let c = Client::new("http://h:1/base", None).expect("client");
        let u = c.url(&["v1", "rooms", "a/b c"], &[("cursor", "x&y".into())]);
        assert_eq!(
            u.as_str(),
            "http://h:1/base/v1/rooms/a%2Fb%20c?cursor=x%26y"
        );
        let c = Client::new("http://h:1", None).expect("client");
        assert_eq!(c.url(&["healthz"], &[]).as_str(), "http://h:1/healthz");
    }

    #[test]
    fn debug_prints_hide_tokens_and_secrets() {
        let c = Client::new("http://h:1", Some("tok-123")).expect("client");
        assert!(!format!("{c:?}").contains("tok-123"));
        let auth = Auth::Credentials(Credentials {
            client_id: "ci".into(),
            client_secret: Some("sec-456".into()),
            cache_dir: None,
        });
        let shown = format!("{auth:?}");
        assert!(
            shown.contains("ci") && !shown.contains("sec-456"),
            "{shown}"
        );
    }

    #[test]
    fn bad_servers_are_usage_errors() {
        assert_eq!(
            Client::new("nope", None)
                .map(|_| ())
                .unwrap_err()
                .exit_code(),
            2
        );
        assert_eq!(
            Client::new("ftp://h", None)
                .map(|_| ())
                .unwrap_err()
                .exit_code(),
            2
        );
    }

    #[test]
    fn problems_become_one_line_plus_violations() {
        let body = br#"{"type":"t","title":"Unprocessable Entity","status":422,"detail":"payload violates","code":"schema_violation","violations":[{"instance_path":"/n","schema_path":"/x","message":"\"a\" is not of type \"integer\""}]}"#;
        let e = problem(StatusCode::UNPROCESSABLE_ENTITY, body);
        assert_eq!(
            e.to_string(),
            "error: payload violates (schema_violation, HTTP 422)\n  at /n: \"a\" is not of type \"integer\""
        );
        let body = br#"{"detail":"payload violates","code":"schema_violation","violations_total":3,"violations_truncated":true,"violations":[{"instance_path":"/0","schema_path":"/x","message":"m"}]}"#;
        let e = problem(StatusCode::UNPROCESSABLE_ENTITY, body);
        assert!(e.to_string().ends_with("at /0: m\n  ... and 2 more"), "{e}");
        let e = problem(StatusCode::BAD_GATEWAY, b"<html>oops</html>");
        assert_eq!(
            e.to_string(),
            "error: <html>oops</html> (http_error, HTTP 502)"
        );
    }
}
