//! Recorded events as JSON, one rendering for every JSON surface (the HTTP
//! API and the CLI's `--json`): payloads that parse as JSON are embedded as
//! values, anything else as its lossy UTF-8 text; empty metadata is `null`.

use edgebus_types::RecordedEvent;
use serde_json::{Value, json};

/// Stored bytes as JSON: the value they parse as, else their lossy text.
pub fn payload_value(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

/// One recorded event as a JSON object.
pub fn event_value(event: &RecordedEvent) -> Value {
    let mut value = json!({
        "stream": event.stream.as_str(),
        "version": event.version,
        "position": event.position,
        "id": event.id.to_string(),
        "type": event.event_type.as_str(),
        "data": payload_value(&event.data),
        "metadata": if event.metadata.is_empty() { Value::Null } else { payload_value(&event.metadata) },
        "timestamp_ms": event.timestamp_ms,
    });
    // Replicated events say where they come from, and what a policy did.
    if let (Some(origin), Some(object)) = (&event.origin, value.as_object_mut()) {
        let mut o = json!({ "site": origin.site.as_str(), "position": origin.position, "via": origin.via.as_str() });
        if !origin.note.is_empty() {
            o["note"] = json!(origin.note);
        }
        object.insert("origin".into(), o);
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_render_as_json_values_or_text() {
        assert_eq!(payload_value(br#"{"a":1}"#), json!({"a": 1}));
        assert_eq!(payload_value(b"not json"), json!("not json"));
        assert_eq!(payload_value(&[0xff, b'a']), json!("\u{fffd}a"));
    }
}
