//! The admin API's errors: an HTTP status, a stable machine-readable code, a human message
//! and, for invalid input, the fields concerned. On the wire:
//! `{"error": {"code": "invalid_request", "message": "...", "fields": [{"field": "env[2].name", "message": "..."}]}}`.

use http::StatusCode;
use serde::{Deserialize, Serialize};

/// Stable error codes: scripts match on these, never on messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request's values are wrong (see `fields`).
    InvalidRequest,
    /// The body is not JSON, or not of the expected shape.
    InvalidJson,
    NotFound,
    AlreadyExists,
    /// The change conflicts with the current state (e.g. resume of a running service).
    Conflict,
    /// Another operation on the same service is running.
    Busy,
    MethodNotAllowed,
    PayloadTooLarge,
    UnsupportedMediaType,
    /// The daemon cannot do it now (shutting down, a dependency is down).
    Unavailable,
    Internal,
}

impl ErrorCode {
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::InvalidRequest | ErrorCode::InvalidJson => StatusCode::BAD_REQUEST,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::AlreadyExists | ErrorCode::Conflict | ErrorCode::Busy => {
                StatusCode::CONFLICT
            }
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::NotFound => "not_found",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Busy => "busy",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

/// One invalid field: its path in the request (`env[2].name`) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

/// An error answered by the admin API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<FieldError>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
            fields: Vec::new(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::NotFound, message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::Internal, message)
    }

    /// Invalid values, each named: the message sums them up.
    pub fn invalid(fields: Vec<FieldError>) -> ApiError {
        let message = match fields.as_slice() {
            [one] => format!("{}: {}", one.field, one.message),
            many => format!(
                "{} invalid fields: {}",
                many.len(),
                many.iter()
                    .map(|f| f.field.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        ApiError {
            code: ErrorCode::InvalidRequest,
            message,
            fields,
        }
    }

    pub fn status(&self) -> StatusCode {
        self.code.status()
    }

    /// The JSON body answered for this error.
    pub fn to_body(&self) -> serde_json::Value {
        serde_json::json!({ "error": self })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_round_trips() {
        let e = ApiError::invalid(vec![
            FieldError {
                field: "env[2].name".into(),
                message: "must not be empty".into(),
            },
            FieldError {
                field: "port".into(),
                message: "must be 1-65535".into(),
            },
        ]);
        assert_eq!(e.message, "2 invalid fields: env[2].name, port");
        let body = e.to_body();
        assert_eq!(body["error"]["code"], "invalid_request");
        assert_eq!(body["error"]["fields"][0]["field"], "env[2].name");
        let back: ApiError = serde_json::from_value(body["error"].clone()).unwrap();
        assert_eq!(back, e);
        assert_eq!(back.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn one_field_names_it_in_the_message() {
        let e = ApiError::invalid(vec![FieldError {
            field: "name".into(),
            message: "must be a DNS label".into(),
        }]);
        assert_eq!(e.message, "name: must be a DNS label");
        assert!(e.to_body()["error"].get("fields").is_some());
        let plain = ApiError::not_found("no service \"web\"");
        assert!(plain.to_body()["error"].get("fields").is_none());
    }

    #[test]
    fn every_code_has_its_own_name() {
        use ErrorCode::*;
        let all = [
            InvalidRequest,
            InvalidJson,
            NotFound,
            AlreadyExists,
            Conflict,
            Busy,
            MethodNotAllowed,
            PayloadTooLarge,
            UnsupportedMediaType,
            Unavailable,
            Internal,
        ];
        for code in all {
            let json = serde_json::to_value(code).unwrap();
            assert_eq!(json, code.as_str());
        }
    }
}
