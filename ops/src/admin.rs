//! What the admin APIs of the proxy and the shard share: the bearer token that guards them and
//! JSON errors.
//!
//! The admin API is served on the HTTP port next to `/metrics`, never on an MQTT listener; the
//! Helm chart's NetworkPolicy keeps that port off the client Service. Without a token file the
//! API is off: its paths answer 404 saying how to turn it on.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use parking_lot::RwLock;

/// Shortest token accepted: 128 bits of entropy as 32 hex digits.
pub const MIN_TOKEN_LEN: usize = 32;

/// Why a token file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read {path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("{path}: the token must be at least {MIN_TOKEN_LEN} characters (e.g. `openssl rand -hex 32`), it has {len}")]
    TooShort { path: PathBuf, len: usize },
    #[error("{path}: the token must be printable ASCII without spaces")]
    NotPrintable { path: PathBuf },
}

/// The admin token, re-readable while running (SIGHUP) so a rotated Kubernetes Secret takes
/// effect without a restart.
#[derive(Debug, Clone)]
pub struct AdminToken {
    path: PathBuf,
    token: Arc<RwLock<Vec<u8>>>,
}

impl AdminToken {
    pub fn load(path: &Path) -> Result<AdminToken, TokenError> {
        let token = read_token(path)?;
        Ok(AdminToken { path: path.to_path_buf(), token: Arc::new(RwLock::new(token)) })
    }

    /// Reads the file again; on failure the current token stays.
    pub fn reload(&self) -> Result<(), TokenError> {
        let token = read_token(&self.path)?;
        *self.token.write() = token;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `presented` is the token, in time independent of where they differ.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        let token = self.token.read();
        token.len() == presented.len() && token.iter().zip(presented).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

/// The token of the `admin_token_file` setting: none when empty (the API is off).
pub fn token_setting(path: &str) -> Result<Option<AdminToken>, String> {
    if path.is_empty() {
        return Ok(None);
    }
    AdminToken::load(Path::new(path)).map(Some).map_err(|e| e.to_string())
}

fn read_token(path: &Path) -> Result<Vec<u8>, TokenError> {
    let text = std::fs::read(path).map_err(|e| TokenError::Unreadable { path: path.to_path_buf(), reason: e.to_string() })?;
    let token = text.trim_ascii();
    if token.len() < MIN_TOKEN_LEN {
        return Err(TokenError::TooShort { path: path.to_path_buf(), len: token.len() });
    }
    if !token.iter().all(|b| b.is_ascii_graphic()) {
        return Err(TokenError::NotPrintable { path: path.to_path_buf() });
    }
    Ok(token.to_vec())
}

/// Middleware for the API routes: `Authorization: Bearer <token>` or 401.
pub async fn require_token(State(token): State<Option<AdminToken>>, request: Request, next: Next) -> Response {
    let Some(token) = token else {
        return ApiError::new(StatusCode::NOT_FOUND, "the admin API is off: set admin_token_file").into_response();
    };
    let presented = request.headers().get(header::AUTHORIZATION).and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    match presented {
        Some(p) if token.accepts(p) => next.run(request).await,
        _ => {
            let mut r = ApiError::new(StatusCode::UNAUTHORIZED, "missing or wrong bearer token").into_response();
            r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer realm=\"mqfleet\""));
            r
        }
    }
}

/// An API error: the status and `{"error": "…"}` in words an operator understands.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into() }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }

    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(serde_json::json!({ "error": self.message }))).into_response()
    }
}

/// Query-string and body rejections as [`ApiError`]s, so every error is JSON.
impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(r: axum::extract::rejection::QueryRejection) -> ApiError {
        ApiError::bad_request(r.body_text())
    }
}

impl From<axum::extract::rejection::PathRejection> for ApiError {
    fn from(r: axum::extract::rejection::PathRejection) -> ApiError {
        ApiError::bad_request(r.body_text())
    }
}

impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(r: axum::extract::rejection::JsonRejection) -> ApiError {
        ApiError::new(r.status(), r.body_text())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked_whole_and_files_validated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "0123456789abcdef0123456789abcdef\n").unwrap();
        let t = AdminToken::load(&path).unwrap();
        assert!(t.accepts(b"0123456789abcdef0123456789abcdef"));
        assert!(!t.accepts(b"0123456789abcdef0123456789abcdee"));
        assert!(!t.accepts(b"0123456789abcdef0123456789abcde"));
        assert!(!t.accepts(b""));

        std::fs::write(&path, "short").unwrap();
        assert!(matches!(t.reload(), Err(TokenError::TooShort { len: 5, .. })));
        assert!(t.accepts(b"0123456789abcdef0123456789abcdef"), "a failed reload keeps the token");
        std::fs::write(&path, "0123456789abcdef 0123456789abcdef").unwrap();
        assert!(matches!(t.reload(), Err(TokenError::NotPrintable { .. })));
        std::fs::write(&path, "ffffffffffffffffffffffffffffffffffff").unwrap();
        t.reload().unwrap();
        assert!(t.accepts(b"ffffffffffffffffffffffffffffffffffff"));
        assert!(matches!(AdminToken::load(&dir.path().join("missing")), Err(TokenError::Unreadable { .. })));
    }
}
