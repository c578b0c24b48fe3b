//! Repeated fields in a `LinkBatch`: an event whose `stream`, `type` or
//! `origin_site` equals the previous event's in the same batch carries it
//! empty, and the receiver restores it before anything else reads the
//! batch. None of the three may be empty in an event, so an empty one is
//! unambiguous. Events of one stream come in runs (an append of many
//! events), so a 1 KiB event of a backlog loses about 30 of its ~70 bytes
//! of overhead on the wire. The size an event counts for credit is its
//! encoded length with every field present, the same at both ends.

use edgebus_proto::v1;

/// Empties the fields that repeat the previous event's (sender side).
pub(crate) fn elide_repeats(events: &mut [v1::ReplicatedEvent]) {
    // Backwards, so that the previous event still holds its fields.
    for index in (1..events.len()).rev() {
        let (before, after) = events.split_at_mut(index);
        let (previous, event) = (&before[index - 1], &mut after[0]);
        if event.stream == previous.stream {
            event.stream.clear();
        }
        if event.r#type == previous.r#type {
            event.r#type.clear();
        }
        if event.origin_site == previous.origin_site {
            event.origin_site.clear();
        }
    }
}

/// Fills the fields a sender left empty from the previous event (receiver
/// side). An empty field in the first event stays empty, and the event is
/// refused for it like any event without a stream, type or origin.
pub(crate) fn restore_repeats(events: &mut [v1::ReplicatedEvent]) {
    for index in 1..events.len() {
        let (before, after) = events.split_at_mut(index);
        let (previous, event) = (&before[index - 1], &mut after[0]);
        if event.stream.is_empty() {
            event.stream.clone_from(&previous.stream);
        }
        if event.r#type.is_empty() {
            event.r#type.clone_from(&previous.r#type);
        }
        if event.origin_site.is_empty() {
            event.origin_site.clone_from(&previous.origin_site);
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    fn event(stream: &str, event_type: &str, origin: &str, data: &[u8]) -> v1::ReplicatedEvent {
        v1::ReplicatedEvent {
            stream: stream.into(),
            version: 7,
            id: vec![1; 16],
            r#type: event_type.into(),
            data: data.to_vec(),
            metadata: Vec::new(),
            timestamp_ms: 1_700_000_000_000,
            origin_site: origin.into(),
            origin_position: 42,
            note: String::new(),
        }
    }

    #[test]
    fn repeats_are_elided_on_the_wire_and_restored_exactly() {
        let events = vec![
            event("bulk.w0", "Backlog", "eu", b"a"),
            event("bulk.w0", "Backlog", "eu", b"b"),
            event("bulk.w1", "Backlog", "eu", b"c"),
            event("bulk.w1", "Other", "asia", b"d"),
            event("bulk.w0", "Other", "asia", b"e"),
        ];
        let full: usize = events.iter().map(Message::encoded_len).sum();
        let mut wire = events.clone();
        elide_repeats(&mut wire);
        let elided: Vec<_> =
            wire.iter().map(|e| (e.stream.as_str(), e.r#type.as_str(), e.origin_site.as_str())).collect();
        assert_eq!(
            elided,
            [
                ("bulk.w0", "Backlog", "eu"),
                ("", "", ""),
                ("bulk.w1", "", ""),
                ("", "Other", "asia"),
                ("bulk.w0", "", ""),
            ]
        );
        let on_wire: usize = wire.iter().map(Message::encoded_len).sum();
        assert!(on_wire + 40 <= full, "{on_wire} bytes on the wire for {full}");
        // Through the encoding and back.
        let batch = v1::LinkBatch { events: wire, ..Default::default() };
        let mut decoded = v1::LinkBatch::decode(batch.encode_to_vec().as_slice()).expect("decodes").events;
        restore_repeats(&mut decoded);
        assert_eq!(decoded, events);
    }

    #[test]
    fn an_empty_field_in_the_first_event_stays_empty() {
        let mut events = vec![event("", "t", "eu", b""), event("", "", "", b"")];
        restore_repeats(&mut events);
        assert!(events.iter().all(|e| e.stream.is_empty()));
        assert_eq!(events[1].r#type, "t");
        assert_eq!(events[1].origin_site, "eu");
    }
}
