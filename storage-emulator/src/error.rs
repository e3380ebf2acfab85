//! The server's error body: almost always HTTP 400, with the real status as a *string*.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub http: u16,
    pub status_code: String,
    pub error: String,
    pub code: String,
    pub message: String,
}

impl ApiError {
    pub fn new(http: u16, status_code: &str, error: &str, code: &str, message: &str) -> ApiError {
        ApiError {
            http,
            status_code: status_code.into(),
            error: error.into(),
            code: code.into(),
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.http).unwrap_or(StatusCode::BAD_REQUEST);
        let body = json!({"statusCode": self.status_code, "error": self.error, "code": self.code, "message": self.message});
        (status, Json(body)).into_response()
    }
}
