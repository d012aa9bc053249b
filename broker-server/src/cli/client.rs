//! The HTTP client the command-line subcommands share. It exists so that every subcommand talks
//! to the server the same way: one base URL, the bearer token on every request, and one
//! translation of the server's RFC 9457 problem answers and of transport failures into
//! [`CliError`], which decides the exit code.

use std::fmt;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Method, StatusCode, Url};
use serde_json::Value;

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

/// A client for one server.
#[derive(Clone, Debug)]
pub struct Client {
    base: Url,
    http: reqwest::Client,
}

impl Client {
    /// A client for the server at `server` (for example `http://127.0.0.1:8080`), sending
    /// `token` as a bearer token on every request when given.
    pub fn new(server: &str, token: Option<&str>) -> Result<Self, CliError> {
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
        let mut headers = HeaderMap::new();
        if let Some(t) = token.filter(|t| !t.is_empty()) {
            let mut v = HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| {
                CliError::Usage("the token must be visible ASCII characters".to_string())
            })?;
            v.set_sensitive(true);
            headers.insert(AUTHORIZATION, v);
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| CliError::Local(format!("cannot set up the HTTP client: {e}")))?;
        Ok(Client { base, http })
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
        Err(problem(status, &bytes))
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
fn error_chain(e: &dyn std::error::Error) -> String {
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
        let e = problem(StatusCode::BAD_GATEWAY, b"<html>oops</html>");
        assert_eq!(
            e.to_string(),
            "error: <html>oops</html> (http_error, HTTP 502)"
        );
    }
}
