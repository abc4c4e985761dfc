//! Building answers that the wire can carry.
//!
//! Every answer is checked against `max_message_size` before it is queued.
//! One that would not fit (a huge payload, a huge error text, a long id) is
//! replaced by an error answer that does: kind
//! `EXECUTE_ERROR_KIND_HANDLER`, no payload, the same `request_id`, and an
//! error text saying how large the answer was, with the start of the
//! original error text (at most 4 KiB in all). It is counted (`answers_oversized`) and logged. Only
//! an id that alone leaves no room for an answer cannot be answered; it is
//! counted as a protocol error (with the default limits it cannot happen:
//! ids over 1 KiB are refused first).

use connector_proto::{
    stream_message::Kind, ExecuteErrorKind, ExecuteResponse, PayloadEncoding, StreamMessage,
};
use prost::Message as _;

use crate::connector::ExecuteError;

/// The longest error text of an answer that replaced an oversized one.
const MAX_REPLACED_TEXT: usize = 4096;

fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while cut > 0 && !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

/// An error answer.
pub(super) fn error_response(request_id: &str, error: ExecuteError) -> ExecuteResponse {
    ExecuteResponse {
        request_id: request_id.to_string(),
        success: false,
        payload: Default::default(),
        encoding: PayloadEncoding::Unspecified as i32,
        error: error.message,
        duration_ms: 0,
        error_kind: error.kind as i32,
    }
}

/// The encoded size of `r` in its envelope.
pub(super) fn wire_size(r: &ExecuteResponse) -> usize {
    // StreamMessage { execute_response = 7 }: tag (1 byte) + length varint
    // + the message.
    let len = r.encoded_len();
    1 + prost::length_delimiter_len(len) + len
}

/// How an answer was made to fit.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Fit {
    /// It fit as it was; `size` is its size on the wire.
    AsIs {
        answer: ExecuteResponse,
        size: usize,
    },
    /// It was replaced by a smaller error answer of `size` bytes; `was` is
    /// the original's size.
    Replaced {
        answer: ExecuteResponse,
        was: usize,
        size: usize,
    },
    /// Not even an empty answer with this id fits.
    Impossible,
}

/// Makes `r` fit in `max` bytes on the wire.
pub(super) fn fit(r: ExecuteResponse, max: usize) -> Fit {
    let was = wire_size(&r);
    if was <= max {
        return Fit::AsIs {
            answer: r,
            size: was,
        };
    }
    let mut answer = ExecuteResponse {
        request_id: r.request_id,
        success: false,
        payload: Default::default(),
        encoding: PayloadEncoding::Unspecified as i32,
        error: String::new(),
        duration_ms: r.duration_ms,
        error_kind: ExecuteErrorKind::Handler as i32,
    };
    let head = format!("answer of {was} bytes exceeds the {max} byte message limit");
    let mut text = head;
    if !r.error.is_empty() {
        text.push_str("; error: ");
        text.push_str(&r.error);
    }
    // The text is cut to what fits, and never longer than
    // `MAX_REPLACED_TEXT`: past that a text helps nobody.
    truncate(&mut text, MAX_REPLACED_TEXT);
    answer.error = text;
    let size = loop {
        let size = wire_size(&answer);
        if size <= max {
            break size;
        }
        if answer.error.is_empty() {
            return Fit::Impossible;
        }
        let keep = answer.error.len().saturating_sub(size - max);
        truncate(&mut answer.error, keep);
    };
    Fit::Replaced { answer, was, size }
}

/// The envelope of an answer.
pub(super) fn message(r: ExecuteResponse) -> StreamMessage {
    StreamMessage {
        kind: Some(Kind::ExecuteResponse(Box::new(r))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_that_fits_is_untouched() {
        let r = ExecuteResponse {
            request_id: "a".into(),
            success: true,
            payload: vec![1u8; 100].into(),
            ..Default::default()
        };
        let size = wire_size(&r);
        assert_eq!(fit(r.clone(), 1024), Fit::AsIs { answer: r, size });
    }

    #[test]
    fn a_too_large_payload_or_error_becomes_an_error_answer_that_fits() {
        for (payload, error) in [(vec![0u8; 5000], String::new()), (vec![], "é".repeat(4000))] {
            let r = ExecuteResponse {
                request_id: "req-1".into(),
                success: payload.is_empty(),
                payload: payload.into(),
                error,
                ..Default::default()
            };
            let Fit::Replaced { answer, was, size } = fit(r, 2048) else {
                panic!("not replaced")
            };
            assert_eq!(size, wire_size(&answer));
            assert!(was > 2048);
            assert!(wire_size(&answer) <= 2048, "{}", wire_size(&answer));
            assert_eq!(answer.request_id, "req-1");
            assert!(!answer.success);
            assert!(answer.payload.is_empty());
            assert_eq!(answer.error_kind, ExecuteErrorKind::Handler as i32);
            assert!(answer.error.starts_with("answer of "), "{}", answer.error);
        }
    }

    #[test]
    fn an_id_that_leaves_no_room_cannot_be_answered() {
        let r = ExecuteResponse {
            request_id: "x".repeat(2048),
            ..Default::default()
        };
        assert_eq!(fit(r, 2048), Fit::Impossible);
    }
}
