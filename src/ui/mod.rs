//! The operator dashboard, under `/ui/`: plain HTML, CSS and JavaScript embedded in the binary
//! at build time, served beside the API by every agent. The page reads the same API routes as
//! the CLI, with the same token, so every action passes the API's validation; nothing it loads
//! comes from anywhere else, and its Content-Security-Policy allows no inline script or style.
//!
//! The files themselves carry no cluster data and are the same in every build, so they are
//! served without the token (a browser cannot send a bearer token with a page load); every
//! byte of state the page shows comes through the API, which asks for it.

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

/// What the dashboard's page may load and talk to: its own origin only.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const ASSETS: &[Asset] = &[
    Asset {
        path: "/ui/",
        content_type: "text/html; charset=utf-8",
        body: include_str!("assets/index.html"),
    },
    Asset {
        path: "/ui/app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("assets/app.js"),
    },
    Asset {
        path: "/ui/style.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("assets/style.css"),
    },
    Asset {
        path: "/ui/favicon.svg",
        content_type: "image/svg+xml",
        body: include_str!("assets/favicon.svg"),
    },
];

/// Whether `path` is one of the dashboard's files (served without the token).
pub(crate) fn is_asset(path: &str) -> bool {
    path == "/" || path == "/ui" || ASSETS.iter().any(|a| a.path == path)
}

pub(crate) fn router() -> Router {
    let mut router = Router::new()
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .route("/ui", get(|| async { Redirect::to("/ui/") }));
    for asset in ASSETS {
        router = router.route(asset.path, get(move || async move { serve(asset) }));
    }
    router
}

fn serve(asset: &'static Asset) -> Response {
    let mut resp = asset.body.into_response();
    let headers = resp.headers_mut();
    let set = [
        (header::CONTENT_TYPE, asset.content_type),
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        // A new agent's page is fetched again, not taken from an old agent's cache.
        (header::CACHE_CONTROL, "no-cache"),
    ];
    for (name, value) in set {
        headers.insert(name, HeaderValue::from_static(value));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The page loads only files of its own, by the paths the router serves, and has no
    /// inline script or style that the policy would refuse.
    #[test]
    fn the_page_names_only_served_files_and_has_nothing_inline() {
        let index = ASSETS[0].body;
        for attr in ["src=\"", "href=\"/"] {
            for part in index.split(attr).skip(1) {
                let target = part.split('"').next().unwrap();
                let target = if attr.ends_with('/') {
                    format!("/{target}")
                } else {
                    target.to_string()
                };
                assert!(is_asset(&target), "{target} is not served");
            }
        }
        assert!(!index.contains("<script>"), "an inline script");
        assert!(!index.contains("<style"), "an inline style");
        assert!(!index.contains(" style=\""), "an inline style attribute");
        let handler = index
            .split_whitespace()
            .find(|w| w.starts_with("on") && w.contains("=\""));
        assert_eq!(handler, None, "an inline event handler");
        assert!(!index.contains("http://") && !index.contains("https://"));
    }
}
