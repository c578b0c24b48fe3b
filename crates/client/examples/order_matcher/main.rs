//! One instance of the order-matching engine ([`engine`]) as a standalone
//! program over `edgebus-client`: start several, kill some, and the trades
//! come out once each, the same as from one.
//!
//! ```sh
//! cargo run -p edgebus -- serve &                                     # a node on 127.0.0.1:7290
//! cargo run -p edgebus-client --example order_matcher -- --feed 1000  # publish 1000 orders, then match
//! cargo run -p edgebus-client --example order_matcher                 # a second instance: it races the first
//! cargo run -p edgebus -- read trades.BTC-EUR                         # Trade, OrderRested, ...
//! ```
//!
//! Options: `--server ADDR` (default `http://127.0.0.1:7290`), `--name NAME`
//! (default `matcher`), `--inputs PATTERN` (default `orders.>`),
//! `--output-prefix PREFIX` (default `trades`), `--feed N` (publish N orders
//! of the example's order flow first). Ctrl-C stops it.

// The engine also offers figures (resting orders, trades) that this program does not print.
#[allow(dead_code)]
mod engine;

use std::time::Duration;

use edgebus_client::Client;
use edgebus_client::transform::{TransformConfig, TransformRunner};
use edgebus_types::{EventId, EventType, ExpectedVersion, NewEvent, StreamName, StreamPattern};

use engine::{OrderFlow, OrderMatcher};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut server = edgebus_client::DEFAULT_SERVER.to_owned();
    let (mut name, mut inputs, mut prefix, mut feed) =
        ("matcher".to_owned(), "orders.>".to_owned(), "trades".to_owned(), 0u64);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--server" => server = value,
            "--name" => name = value,
            "--inputs" => inputs = value,
            "--output-prefix" => prefix = value,
            "--feed" => feed = value.parse()?,
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    let client = Client::connect(&server).await?;
    if feed > 0 {
        // Publishes to `orders.INSTRUMENT`, whatever --inputs says.
        let mut flow = OrderFlow::new(1, &["BTC-EUR", "ETH-EUR"]);
        for _ in 0..feed {
            let order = flow.next_order();
            let event = NewEvent {
                id: EventId::generate(),
                event_type: EventType::new(order.event_type)?,
                data: order.data,
                metadata: Vec::new(),
                timestamp_ms: 0,
            };
            let stream = StreamName::new(&format!("orders.{}", order.instrument))?;
            client.append(stream, ExpectedVersion::Any, vec![event]).await?;
        }
        println!("published {feed} orders to orders.*");
    }
    let matcher = OrderMatcher::new(&prefix)?;
    let config = TransformConfig::new(&name, StreamPattern::new(&inputs)?, matcher.outputs());
    let runner = TransformRunner::new(client, config, matcher).on_notice(|notice| println!("{notice}"));
    let metrics = runner.metrics();
    let progress = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            println!("{}", metrics.snapshot());
        }
    });
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let result = runner.run(stop).await;
    progress.abort();
    let end = result?;
    println!("stopped: {end}");
    Ok(())
}
