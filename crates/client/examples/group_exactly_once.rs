//! Exactly once in effect over an at-least-once consumer group.
//!
//! A group delivers each event at least once: a consumer that dies before
//! its ack, or a node that restarts before its checkpoint, gets events
//! again. This example bills orders: for each `Placed` event of
//! `orders.<id>` (version `v`) it writes one invoice at index `v` of
//! `invoices.<id>` with `exists_or_write`. A redelivered order finds its
//! invoice there already (`Exists { same: true }`) and is only acked, so
//! every order is billed once however often it is delivered.
//!
//! The invoice must be the same bytes each time, so it is computed from
//! the order alone: its id is derived from the order's id, its timestamp
//! is the order's.
//!
//! Run a node (`edgebus serve`), then:
//!
//! ```sh
//! cargo run -p edgebus-client --example group_exactly_once [-- http://127.0.0.1:7290]
//! ```
//!
//! It publishes 20 orders, consumes them with a consumer that "crashes"
//! (leaves without acking) after billing 7, consumes again with a second
//! one, and prints how many deliveries there were and how many invoices
//! were written.

use edgebus_client::{Client, ConsumerItem};
use edgebus_proto::v1;
use edgebus_store::ExistsOrWrite;
use edgebus_types::{EventId, EventType, ExpectedVersion, NewEvent, RecordedEvent, StreamName};

const ORDERS: u64 = 20;

/// The invoice for `order`: a pure function of it.
fn invoice(order: &RecordedEvent) -> NewEvent {
    let id = u128::from_be_bytes(*order.id.as_bytes()) ^ 0x1u128.rotate_right(1);
    NewEvent {
        id: EventId::from_u128(id),
        event_type: EventType::new("Invoiced").expect("a valid type"),
        data: format!("{{\"order_position\":{},\"amount\":{}}}", order.position, order.data.len()).into_bytes(),
        metadata: Vec::new(),
        timestamp_ms: order.timestamp_ms,
    }
}

/// Bills one delivered order exactly once; true if this delivery wrote it.
async fn bill(client: &Client, order: &RecordedEvent) -> anyhow::Result<bool> {
    let id = order.stream.as_str().trim_start_matches("orders.");
    let invoices = StreamName::new(&format!("invoices.{id}"))?;
    match client.exists_or_write(invoices, order.version, invoice(order)).await? {
        ExistsOrWrite::Written { .. } => Ok(true),
        ExistsOrWrite::Exists { same: true, .. } => Ok(false),
        ExistsOrWrite::Exists { same: false, position } => {
            anyhow::bail!("a different invoice sits at position {position}: the billing is not deterministic")
        }
    }
}

/// Consumes until `stop_after` deliveries (leaving without acking the
/// last one, as a crash would) or until the group has nothing left.
async fn consume(client: &Client, name: &str, stop_after: Option<u64>) -> anyhow::Result<(u64, u64)> {
    let mut consumer = client.consume("billing", Some(name), 4).await?;
    let (mut deliveries, mut written) = (0, 0);
    loop {
        let pending = client.describe_group("billing").await?;
        if pending.pending == 0 && pending.lag == 0 && stop_after.is_none() {
            break;
        }
        let Some(item) =
            tokio::time::timeout(std::time::Duration::from_millis(500), consumer.next()).await.ok().flatten()
        else {
            continue;
        };
        let ConsumerItem::Delivery { event, .. } = item? else { continue };
        deliveries += 1;
        if bill(client, &event).await? {
            written += 1;
        }
        if stop_after.is_some_and(|n| deliveries >= n) {
            // Billed, never acked: the group will deliver it again.
            return Ok((deliveries, written));
        }
        consumer.ack(vec![event.position]).await?;
    }
    consumer.close(std::time::Duration::from_secs(5)).await;
    Ok((deliveries, written))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| edgebus_client::DEFAULT_SERVER.to_owned());
    let client = Client::connect(&addr).await?;
    let run = rand::random::<u32>();
    let create = v1::CreateGroupRequest {
        name: "billing".to_owned(),
        filter: Some(v1::GroupFilter {
            streams: Some(v1::group_filter::Streams::StreamPattern(format!("orders.r{run}.*"))),
            event_types: vec!["Placed".to_owned()],
            predicate: String::new(),
        }),
        settings: None,
        start_at: Some(v1::create_group_request::StartAt::End(v1::Empty {})),
    };
    // A group left by an earlier run is replaced.
    let _ = client.delete_group("billing").await;
    client.create_group(create).await?;
    for i in 0..ORDERS {
        let order = NewEvent {
            id: EventId::generate(),
            event_type: EventType::new("Placed")?,
            data: format!("{{\"item\":\"book\",\"qty\":{}}}", i % 3 + 1).into_bytes(),
            metadata: Vec::new(),
            timestamp_ms: 0,
        };
        let stream = StreamName::new(&format!("orders.r{run}.{}", i % 5))?;
        client.append(stream, ExpectedVersion::Any, vec![order]).await?;
    }
    let (first_deliveries, first_written) = consume(&client, "crashy", Some(7)).await?;
    let (second_deliveries, second_written) = consume(&client, "steady", None).await?;
    let deliveries = first_deliveries + second_deliveries;
    let written = first_written + second_written;
    println!("orders: {ORDERS}, deliveries: {deliveries}, invoices written: {written}");
    anyhow::ensure!(written == ORDERS, "every order is billed exactly once");
    client.delete_group("billing").await?;
    Ok(())
}
