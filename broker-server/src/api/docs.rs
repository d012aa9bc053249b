//! The API's own documentation: `/openapi.json` (the document generated from the handlers'
//! annotations) and `/docs`, an interactive page (Swagger UI). Swagger UI is vendored into the
//! binary, because brokers often run where nothing can be fetched from the internet, and the
//! page should work there too.

use axum::body::Bytes;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::AppState;
use crate::error::ApiError;

/// swagger-ui-dist's browser bundle (version and licence in `assets/swagger-ui/`).
const SWAGGER_UI_JS: &[u8] = include_bytes!("../../assets/swagger-ui/swagger-ui-bundle.js");
/// swagger-ui-dist's style sheet.
const SWAGGER_UI_CSS: &[u8] = include_bytes!("../../assets/swagger-ui/swagger-ui.css");

/// The `/docs` page: Swagger UI, from this server, pointed at this server's document.
const DOCS_HTML: &str = r##"<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>Postroom API</title>
  <link rel="stylesheet" href="/docs/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({ url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true });
  </script>
</body>
</html>
"##;

/// The assets never change within one build, so browsers may keep them: a week spares reloads
/// and still lets a newer vendored Swagger UI reach browsers soon after an upgrade.
const LONG_CACHE: &str = "public, max-age=604800";

/// The documentation routes. `doc` is serialised once, here: it is fixed for the life of the
/// process.
pub(super) fn routes(doc: &utoipa::openapi::OpenApi) -> Router<AppState> {
    let json = match doc.to_json() {
        Ok(j) => Bytes::from(j),
        // The document is built from static annotations; failing to serialise it is a bug that
        // should show where it is asked for, not stop the broker.
        Err(e) => {
            tracing::error!(error = %e, "cannot serialise the OpenAPI document");
            Bytes::new()
        }
    };
    Router::new()
        .route(
            "/openapi.json",
            get(move || {
                let json = json.clone();
                async move { document(&json) }
            }),
        )
        .route("/docs", get(page))
        .route(
            "/docs/swagger-ui-bundle.js",
            get(|| async { asset("text/javascript; charset=utf-8", SWAGGER_UI_JS) }),
        )
        .route(
            "/docs/swagger-ui.css",
            get(|| async { asset("text/css; charset=utf-8", SWAGGER_UI_CSS) }),
        )
}

fn document(json: &Bytes) -> Response {
    if json.is_empty() {
        return ApiError::Core(broker_core::Error::Storage(
            "the OpenAPI document could not be serialised".into(),
        ))
        .into_response();
    }
    ([(header::CONTENT_TYPE, "application/json")], json.clone()).into_response()
}

async fn page() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        )],
        DOCS_HTML,
    )
        .into_response()
}

fn asset(content_type: &'static str, bytes: &'static [u8]) -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, LONG_CACHE),
        ],
        bytes,
    )
        .into_response()
}
