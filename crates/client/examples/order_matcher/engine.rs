//! An order-matching engine as a deterministic transform: limit and market
//! orders on `orders.>` (the instrument is the stream's last token), matched
//! by price then time, with trades and order acknowledgements on
//! `PREFIX.INSTRUMENT` (`trades.*` by default).
//!
//! This file is the whole engine: `edgebus transform run matcher` builds it
//! in (the CLI includes this very file), and `examples/order_matcher` runs it
//! as a standalone program over `edgebus-client`.
//!
//! Inputs (JSON data; other event types are rejected with a reason):
//!
//! - `PlaceOrder` `{"side":"buy"|"sell","qty":N,"price":P,"order_id":"ID"}`:
//!   `price` in whole ticks, absent for a market order; `order_id` optional
//!   (default: the input's `STREAM@VERSION`).
//! - `CancelOrder` `{"order_id":"ID"}`.
//!
//! Outputs, per instrument: `Trade` (`trade` numbers them from 1 per
//! instrument; the price is the resting order's), `OrderRested` (the rest
//! of a limit order joins the book), `OrderCancelled` (on request, the
//! unfilled rest of a market order, or a full book) and `OrderRejected`
//! (with the reason). Every input gives at least one output.
//!
//! Deterministic by construction: integer prices and quantities, books in
//! `BTreeMap`s and `VecDeque`s, no clock, no randomness; the state encodes
//! as JSON of those maps, so equal states encode to equal bytes.

use std::collections::{BTreeMap, VecDeque};

use edgebus_client::transform::{Output, Transform};
use edgebus_types::{RecordedEvent, StreamName, StreamPattern};
use serde::{Deserialize, Serialize};

/// Resting orders one instrument's book holds at most; the rest of an order
/// beyond it is cancelled ("book full").
pub const RESTING_ORDERS_PER_BOOK_MAX: usize = 10_000;

/// Instruments (books) at most; orders for a new one beyond it are rejected.
pub const BOOKS_MAX: usize = 1_000;

/// Longest order id, in bytes.
pub const ORDER_ID_BYTES_MAX: usize = 64;

/// The input type of a new order.
pub const PLACE_ORDER: &str = "PlaceOrder";

/// The input type of a cancellation.
pub const CANCEL_ORDER: &str = "CancelOrder";

/// The engine: where its outputs go. Its state is [`Books`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderMatcher {
    output_prefix: String,
}

impl OrderMatcher {
    /// An engine writing to `PREFIX.INSTRUMENT`; `prefix` is one or more
    /// stream name tokens without wildcards (`trades`).
    pub fn new(prefix: &str) -> Result<Self, String> {
        StreamName::new(&format!("{prefix}.x"))
            .map_err(|e| format!("output prefix {prefix:?} does not make stream names: {e}"))?;
        if prefix.starts_with('$') || prefix.contains(['*', '>']) {
            return Err(format!("output prefix {prefix:?} must be plain stream name tokens"));
        }
        Ok(Self { output_prefix: prefix.to_owned() })
    }

    /// The output pattern: `PREFIX.*`.
    pub fn outputs(&self) -> StreamPattern {
        StreamPattern::new(&format!("{}.*", self.output_prefix)).expect("a prefix of valid tokens")
    }
}

/// A side of the book.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// Bids.
    Buy,
    /// Asks.
    Sell,
}

/// An order waiting in a book.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Resting {
    order_id: String,
    qty: u64,
}

/// One instrument's book: price levels of resting orders in time order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Book {
    bids: BTreeMap<u64, VecDeque<Resting>>,
    asks: BTreeMap<u64, VecDeque<Resting>>,
    /// Live order id → its side and price, for cancellations.
    live: BTreeMap<String, (Side, u64)>,
    /// Trades so far.
    trades: u64,
}

/// The engine's state: a book per instrument.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Books {
    books: BTreeMap<String, Book>,
}

impl Books {
    /// Resting orders over every book.
    pub fn resting_orders(&self) -> usize {
        self.books.values().map(|book| book.live.len()).sum()
    }

    /// Trades over every book.
    pub fn trades(&self) -> u64 {
        self.books.values().map(|book| book.trades).sum()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlaceOrder {
    side: Side,
    qty: u64,
    #[serde(default)]
    price: Option<u64>,
    #[serde(default)]
    order_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelOrder {
    order_id: String,
}

#[derive(Serialize)]
struct Trade<'a> {
    instrument: &'a str,
    trade: u64,
    price: u64,
    qty: u64,
    buy_order: &'a str,
    sell_order: &'a str,
    taker: Side,
}

#[derive(Serialize)]
struct Rested<'a> {
    order_id: &'a str,
    side: Side,
    price: u64,
    qty: u64,
}

#[derive(Serialize)]
struct Cancelled<'a> {
    order_id: &'a str,
    qty: u64,
    reason: &'a str,
}

#[derive(Serialize)]
struct Rejected<'a> {
    order_id: Option<&'a str>,
    reason: &'a str,
}

/// The outputs of one input, all to the instrument's stream.
struct Emitter {
    stream: StreamName,
    outputs: Vec<Output>,
}

impl Emitter {
    fn emit(&mut self, event_type: &str, value: &impl Serialize) {
        let data = serde_json::to_vec(value).expect("output events serialize");
        self.outputs.push(Output::new(self.stream.clone(), event_type, data));
    }

    fn reject(&mut self, order_id: Option<&str>, reason: &str) {
        self.emit("OrderRejected", &Rejected { order_id, reason });
    }
}

impl Transform for OrderMatcher {
    type State = Books;
    const STATE_VERSION: u32 = 1;

    fn initial_state(&self) -> Books {
        Books::default()
    }

    fn apply(&self, books: &mut Books, input: &RecordedEvent) -> Vec<Output> {
        let instrument = input.stream.tokens().next_back().expect("a stream name has a token");
        let stream = StreamName::new(&format!("{}.{instrument}", self.output_prefix)).expect("prefix and a token");
        let mut out = Emitter { stream, outputs: Vec::new() };
        match input.event_type.as_str() {
            PLACE_ORDER => match serde_json::from_slice::<PlaceOrder>(&input.data) {
                Ok(order) => {
                    let default_id = format!("{}@{}", input.stream, input.version);
                    place(books, instrument, &order, &default_id, &mut out);
                }
                Err(e) => out.reject(None, &format!("invalid {PLACE_ORDER}: {e}")),
            },
            CANCEL_ORDER => match serde_json::from_slice::<CancelOrder>(&input.data) {
                Ok(cancel) => match books.books.get_mut(instrument) {
                    Some(book) => cancel_order(book, &cancel.order_id, &mut out),
                    None => out.reject(Some(&cancel.order_id), "no live order with this id"),
                },
                Err(e) => out.reject(None, &format!("invalid {CANCEL_ORDER}: {e}")),
            },
            other => {
                out.reject(None, &format!("unknown input type {other}: expected {PLACE_ORDER} or {CANCEL_ORDER}"));
            }
        }
        out.outputs
    }

    fn encode_state(&self, books: &Books) -> Vec<u8> {
        serde_json::to_vec(books).expect("the books serialize")
    }

    fn decode_state(&self, bytes: &[u8]) -> Result<Books, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }
}

fn place(books: &mut Books, instrument: &str, order: &PlaceOrder, default_id: &str, out: &mut Emitter) {
    let order_id = order.order_id.as_deref().unwrap_or(default_id);
    if order_id.is_empty() || order_id.len() > ORDER_ID_BYTES_MAX {
        return out.reject(Some(order_id), "order_id must be 1 to 64 bytes");
    }
    if order.qty == 0 {
        return out.reject(Some(order_id), "qty must be at least 1");
    }
    if order.price == Some(0) {
        return out.reject(Some(order_id), "price must be at least 1 tick");
    }
    if !books.books.contains_key(instrument) && books.books.len() >= BOOKS_MAX {
        return out.reject(Some(order_id), "too many instruments");
    }
    let book = books.books.entry(instrument.to_owned()).or_default();
    if book.live.contains_key(order_id) {
        return out.reject(Some(order_id), "an order with this id is live already");
    }
    let (side, limit) = (order.side, order.price);
    let mut remaining = order.qty;
    while remaining > 0 {
        // The best level of the other side, if it crosses the limit.
        let level = match side {
            Side::Buy => book.asks.first_entry(),
            Side::Sell => book.bids.last_entry(),
        };
        let Some(mut level) = level else { break };
        let price = *level.key();
        let crosses = match (side, limit) {
            (_, None) => true,
            (Side::Buy, Some(limit)) => price <= limit,
            (Side::Sell, Some(limit)) => price >= limit,
        };
        if !crosses {
            break;
        }
        let queue = level.get_mut();
        let maker = queue.front_mut().expect("a level is removed when it empties");
        let qty = remaining.min(maker.qty);
        maker.qty -= qty;
        remaining -= qty;
        book.trades += 1;
        let (buy_order, sell_order) = match side {
            Side::Buy => (order_id, maker.order_id.as_str()),
            Side::Sell => (maker.order_id.as_str(), order_id),
        };
        out.emit("Trade", &Trade { instrument, trade: book.trades, price, qty, buy_order, sell_order, taker: side });
        if maker.qty == 0 {
            let filled = queue.pop_front().expect("the maker is at the front");
            book.live.remove(&filled.order_id);
            if queue.is_empty() {
                level.remove();
            }
        }
    }
    if remaining == 0 {
        return;
    }
    match limit {
        None => out.emit(
            "OrderCancelled",
            &Cancelled { order_id, qty: remaining, reason: "no more liquidity for a market order" },
        ),
        Some(_) if book.live.len() >= RESTING_ORDERS_PER_BOOK_MAX => {
            out.emit("OrderCancelled", &Cancelled { order_id, qty: remaining, reason: "book full" });
        }
        Some(price) => {
            let levels = match side {
                Side::Buy => &mut book.bids,
                Side::Sell => &mut book.asks,
            };
            levels.entry(price).or_default().push_back(Resting { order_id: order_id.to_owned(), qty: remaining });
            book.live.insert(order_id.to_owned(), (side, price));
            out.emit("OrderRested", &Rested { order_id, side, price, qty: remaining });
        }
    }
}

fn cancel_order(book: &mut Book, order_id: &str, out: &mut Emitter) {
    let Some((side, price)) = book.live.remove(order_id) else {
        return out.reject(Some(order_id), "no live order with this id");
    };
    let levels = match side {
        Side::Buy => &mut book.bids,
        Side::Sell => &mut book.asks,
    };
    let queue = levels.get_mut(&price).expect("a live order sits at its level");
    let at = queue.iter().position(|resting| resting.order_id == order_id).expect("a live order is in its level");
    let resting = queue.remove(at).expect("found at this index");
    if queue.is_empty() {
        levels.remove(&price);
    }
    out.emit("OrderCancelled", &Cancelled { order_id, qty: resting.qty, reason: "cancelled" });
}

/// A reproducible flow of orders for demonstrations and benchmarks: limit
/// orders around a fixed price (about half of them trade), some market
/// orders and cancellations of recent orders, over a few instruments.
#[derive(Debug, Clone)]
pub struct OrderFlow {
    rng: u64,
    tag: String,
    instruments: Vec<String>,
    placed: u64,
    recent: VecDeque<String>,
}

/// One order of an [`OrderFlow`]: publish `data` as `event_type` to
/// `orders.INSTRUMENT` (or any stream whose last token is the instrument).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowOrder {
    /// The instrument.
    pub instrument: String,
    /// [`PLACE_ORDER`] or [`CANCEL_ORDER`].
    pub event_type: &'static str,
    /// The JSON data.
    pub data: Vec<u8>,
}

/// Orders an [`OrderFlow`] remembers for cancellations.
const FLOW_RECENT_MAX: usize = 64;

impl OrderFlow {
    /// The flow of `seed` over `instruments` (at least one).
    pub fn new(seed: u64, instruments: &[&str]) -> Self {
        assert!(!instruments.is_empty(), "an order flow needs an instrument");
        Self {
            rng: seed ^ 0x9E37_79B9_7F4A_7C15,
            tag: format!("s{seed}"),
            instruments: instruments.iter().map(|i| (*i).to_owned()).collect(),
            placed: 0,
            recent: VecDeque::new(),
        }
    }

    /// splitmix64.
    fn next_u64(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// The next order.
    pub fn next_order(&mut self) -> FlowOrder {
        let pick = self.below(self.instruments.len() as u64) as usize;
        let instrument = self.instruments[pick].clone();
        let roll = self.below(100);
        if roll < 8 && !self.recent.is_empty() {
            let at = self.below(self.recent.len() as u64) as usize;
            let order_id = self.recent.remove(at).expect("in range");
            let (instrument, order_id) = order_id.split_once('/').expect("instrument/id");
            let data = serde_json::to_vec(&serde_json::json!({ "order_id": order_id })).expect("json");
            return FlowOrder { instrument: instrument.to_owned(), event_type: CANCEL_ORDER, data };
        }
        self.placed += 1;
        let order_id = format!("{}-{}", self.tag, self.placed);
        let side = if self.below(2) == 0 { "buy" } else { "sell" };
        let qty = 1 + self.below(10);
        let data = if roll < 12 {
            serde_json::json!({ "order_id": order_id, "side": side, "qty": qty })
        } else {
            let price = 10_000 + self.below(11) - 5;
            serde_json::json!({ "order_id": order_id, "side": side, "qty": qty, "price": price })
        };
        if self.recent.len() == FLOW_RECENT_MAX {
            self.recent.pop_front();
        }
        self.recent.push_back(format!("{instrument}/{order_id}"));
        FlowOrder { instrument, event_type: PLACE_ORDER, data: serde_json::to_vec(&data).expect("json") }
    }
}
