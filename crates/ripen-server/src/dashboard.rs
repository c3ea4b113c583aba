//! The operator dashboard (docs/dashboard.md): one page at `/`, its script
//! and its style sheet, compiled into the binary from `dashboard/`. The
//! page reads the public API only; it loads nothing from elsewhere, and its
//! content security policy says so to the browser.

use std::sync::Arc;

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::AppState;

const PAGE: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/app.js");
const STYLE: &str = include_str!("dashboard/app.css");

/// Same-origin scripts, styles, fetches and event streams; no frames, no
/// inline code.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

/// The dashboard's routes: `/` and its two assets.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route(
            "/",
            get(|| async { asset(PAGE, "text/html; charset=utf-8") }),
        )
        .route(
            "/dashboard/app.js",
            get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/dashboard/app.css",
            get(|| async { asset(STYLE, "text/css; charset=utf-8") }),
        )
}

/// A static asset. Browsers check with the server before each use
/// (`no-cache`), so a new binary's page is seen at the next load.
fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The page stays small, and the script never writes markup from text.
    #[test]
    fn the_page_is_small_and_builds_no_markup_from_strings() {
        let total = PAGE.len() + SCRIPT.len() + STYLE.len();
        assert!(total < 60 * 1024, "the dashboard is {total} bytes");
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!SCRIPT.contains(sink), "app.js uses {sink}");
        }
        for remote in ["http://", "https://", "//cdn"] {
            assert!(
                !PAGE.contains(remote) && !STYLE.contains(remote),
                "the page names {remote}"
            );
        }
        // The one absolute URL of the script is the SVG namespace.
        assert_eq!(SCRIPT.matches("http").count(), 1);
    }
}
