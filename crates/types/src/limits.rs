//! Every fixed bound of edgebus in one place, with its default.
//!
//! A limit that is hit produces a typed, visible error (or backpressure),
//! never unbounded growth. Where two limits relate, a compile-time assertion
//! keeps the defaults consistent; runtime configuration is checked by the
//! component that accepts it (for example `LogConfig::validate`).

/// Bytes in one on-disk segment header (see `docs/log-format.md`).
pub const LOG_SEGMENT_HEADER_BYTES: u64 = 32;
/// Bytes of framing around one record: `[len u32][crc32c u32][header 16]`.
pub const LOG_FRAME_OVERHEAD_BYTES: u64 = 24;
/// Records start at 8-byte aligned offsets, so a frame may carry up to 7 bytes of padding.
pub const LOG_FRAME_ALIGN_BYTES: u64 = 8;

/// Default size at which the log rolls to a new segment file.
pub const LOG_SEGMENT_BYTES_DEFAULT: u64 = 128 * 1024 * 1024;
/// Smallest configurable segment size (small segments are useful in tests).
pub const LOG_SEGMENT_BYTES_MIN: u64 = 4 * 1024;
/// Largest configurable segment size: offsets inside a segment must fit in a `u32`.
pub const LOG_SEGMENT_BYTES_MAX: u64 = 1024 * 1024 * 1024;

/// Default largest payload of one record: one maximal event with its envelope.
pub const LOG_RECORD_BYTES_DEFAULT: u64 = 2 * 1024 * 1024;
/// Hard upper bound for the record payload limit (the frame length is a `u32`).
pub const LOG_RECORD_BYTES_MAX: u64 = 64 * 1024 * 1024;

/// Default largest atomic append (all frames of one group, padding included).
pub const LOG_APPEND_BYTES_DEFAULT: u64 = 4 * 1024 * 1024;
/// Default largest number of records in one atomic append.
pub const LOG_APPEND_RECORDS_DEFAULT: u32 = 10_000;

/// Default bytes that may wait in the append queue (accepted, not yet written).
/// Appenders beyond it wait (`Log::append`) or get `QueueFull` (`Log::try_submit`).
pub const LOG_QUEUE_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;
/// Default number of appends that may wait in the append queue.
pub const LOG_QUEUE_APPENDS_DEFAULT: u32 = 65_536;

/// Bytes between two entries of a segment's sparse position index: a read
/// of one record scans at most this much before it. Costs 16 bytes per
/// stride: in memory for the active segment and the few sealed segments
/// read last, in the `.idx` files for the rest.
pub const LOG_INDEX_STRIDE_BYTES: u64 = 4 * 1024;
/// Bytes a scan asks the storage for in its first call; it doubles per call.
pub const LOG_READ_CHUNK_MIN_BYTES: u64 = 16 * 1024;
/// Bytes a sequential reader asks the storage for in one call, at most.
pub const LOG_READ_CHUNK_BYTES: u64 = 1024 * 1024;

const _: () = assert!(LOG_SEGMENT_BYTES_MIN <= LOG_SEGMENT_BYTES_DEFAULT);
const _: () = assert!(LOG_INDEX_STRIDE_BYTES + LOG_FRAME_OVERHEAD_BYTES <= LOG_READ_CHUNK_MIN_BYTES);
const _: () = assert!(LOG_READ_CHUNK_MIN_BYTES <= LOG_READ_CHUNK_BYTES);
const _: () = assert!(LOG_SEGMENT_BYTES_DEFAULT <= LOG_SEGMENT_BYTES_MAX);
const _: () = assert!(LOG_SEGMENT_BYTES_MAX <= u32::MAX as u64);
const _: () = assert!(LOG_RECORD_BYTES_DEFAULT <= LOG_RECORD_BYTES_MAX);
const _: () = assert!(LOG_RECORD_BYTES_MAX + LOG_FRAME_OVERHEAD_BYTES <= u32::MAX as u64);
// One default-sized record always fits in one default-sized atomic append,
// and one atomic append always fits in one default-sized segment.
const _: () =
    assert!(LOG_RECORD_BYTES_DEFAULT + LOG_FRAME_OVERHEAD_BYTES + LOG_FRAME_ALIGN_BYTES <= LOG_APPEND_BYTES_DEFAULT);
const _: () = assert!(LOG_APPEND_BYTES_DEFAULT + LOG_SEGMENT_HEADER_BYTES <= LOG_SEGMENT_BYTES_DEFAULT);
// The append queue holds at least one maximal append.
const _: () = assert!(LOG_APPEND_BYTES_DEFAULT <= LOG_QUEUE_BYTES_DEFAULT);

/// Longest stream name in bytes (default 255). Names are ASCII, so bytes and
/// characters agree.
pub const STREAM_NAME_BYTES_MAX: usize = 255;
/// Longest stream pattern in bytes: the same bound as a name, so that every
/// name is also a valid literal pattern.
pub const STREAM_PATTERN_BYTES_MAX: usize = STREAM_NAME_BYTES_MAX;
/// Longest site name in bytes (default 32).
pub const SITE_NAME_BYTES_MAX: usize = 32;
/// Longest event type in bytes (default 128).
pub const EVENT_TYPE_BYTES_MAX: usize = 128;
/// Largest event payload (`data`) in bytes (default 1 MiB).
pub const EVENT_DATA_BYTES_MAX: usize = 1024 * 1024;
/// Largest event metadata in bytes (default 64 KiB).
pub const EVENT_METADATA_BYTES_MAX: usize = 64 * 1024;

// A maximal event (payload, metadata, type and stream name) fits in one log
// record with room to spare for its fixed-size envelope (ids, versions,
// lengths), so no valid event can be refused by the log's hard limit.
const _: () = assert!(
    (EVENT_DATA_BYTES_MAX + EVENT_METADATA_BYTES_MAX + EVENT_TYPE_BYTES_MAX + STREAM_NAME_BYTES_MAX) as u64 + 4096
        <= LOG_RECORD_BYTES_DEFAULT
);

/// Longest subscription payload predicate (CEL source text), in bytes
/// (default 4 KiB). Checked on the wire and again when the node compiles it.
pub const FILTER_PREDICATE_BYTES_MAX: usize = 4096;
/// Most event types one filter (a `$all` read or a subscription) may list
/// (default 64); an event passes if its type is any of them.
pub const FILTER_EVENT_TYPES_MAX: usize = 64;
/// Most expression nodes in a compiled predicate, counted after macros such
/// as `exists` are expanded (default 2048). Bounds the work of one
/// evaluation outside comprehensions (which the cost budget bounds). Source
/// text averages more than two bytes a node, so the byte limit usually
/// binds first; this one stops macros from multiplying the nodes.
pub const FILTER_PREDICATE_NODES_MAX: usize = 2048;
/// Deepest nesting of a compiled predicate's expression tree (default 64).
/// The interpreter recurses once per level, so this bounds the stack one
/// evaluation needs (a few hundred KiB at most).
pub const FILTER_PREDICATE_DEPTH_MAX: usize = 64;
/// Cost units one evaluation of a predicate may spend (default 250k) before
/// it stops with an error (the event does not match). A unit is one
/// expression node run in a comprehension, or one list or map element or 64
/// bytes of string that an operation reads or copies. The worst use of the
/// whole budget (copying lists) takes about 20 ms; filters over payloads of
/// a few thousand elements spend well under a tenth of it.
pub const FILTER_PREDICATE_COST_MAX: u64 = 250_000;

const _: () = assert!(FILTER_PREDICATE_DEPTH_MAX <= FILTER_PREDICATE_NODES_MAX);

// ---- node -------------------------------------------------------------------

/// Default most TCP connections one node listener (gRPC or HTTP) serves at
/// once (default 1024; `edgebus serve --max-connections`). A connection
/// over the limit is refused at once (HTTP: `503` with JSON code 103; gRPC:
/// an HTTP/2 `GOAWAY`) while the others keep being served. Bounds the
/// memory and file descriptors that idle or slow clients can hold.
pub const NODE_CONNECTIONS_MAX_DEFAULT: usize = 1024;
/// Most refusals of connections over the cap that one listener writes at
/// once (default 64). Each takes a task and a socket for up to a second;
/// beyond this, an extra connection is closed without an answer.
pub const NODE_CONNECTION_REFUSALS_MAX: usize = 64;
/// Default most subscriptions one node serves at once, over all its
/// connections (default 10 000; `edgebus serve --max-subscriptions`).
pub const NODE_SUBSCRIPTIONS_MAX_DEFAULT: usize = 10_000;

const _: () = assert!(NODE_CONNECTIONS_MAX_DEFAULT >= 1);

// ---- subscriptions ----------------------------------------------------------

/// Batches of committed records the node's live feed keeps for subscribers
/// in live mode (default 256). A subscriber that falls further behind than
/// this reads the log instead until it catches up, so slow subscribers cost
/// no memory beyond this one shared ring.
pub const LIVE_FEED_BATCHES: usize = 256;
/// Most records in one live-feed batch (default 256).
pub const LIVE_BATCH_RECORDS_MAX: usize = 256;
/// Most payload bytes in one live-feed batch (default 256 KiB; a batch holds
/// at least one record). With [`LIVE_EVENT_INLINE_BYTES_MAX`] this bounds
/// the ring to [`LIVE_FEED_BATCHES`] × (this + one inline event): 80 MiB.
pub const LIVE_BATCH_BYTES_MAX: usize = 256 * 1024;
/// Largest event (data plus metadata) the live feed carries inline (default
/// 64 KiB); a larger one is carried as its position, and each subscriber
/// that wants it reads it from the log.
pub const LIVE_EVENT_INLINE_BYTES_MAX: usize = 64 * 1024;
/// Most events one subscription's catch-up reads from the log at a time
/// (default 256).
pub const SUBSCRIPTION_PAGE_EVENTS_MAX: usize = 256;
/// Most credit a subscriber may hold (default 1M events): grants beyond it
/// are capped, never an error.
pub const SUBSCRIPTION_CREDIT_MAX: u64 = 1_000_000;
/// A filtered subscription reports its progress over skipped events with a
/// checkpoint at least every this many log positions (default 4096).
pub const SUBSCRIPTION_CHECKPOINT_INTERVAL: u64 = 4096;
/// Messages queued towards one subscriber's connection (default 64); the
/// transport's own flow control holds the rest back.
pub const SUBSCRIPTION_OUTBOX_MESSAGES: usize = 64;

// ---- consumer groups --------------------------------------------------------

/// Most consumer groups one node holds (default 256).
pub const GROUPS_MAX: usize = 256;
/// Longest group name (one token), in bytes.
pub const GROUP_NAME_BYTES_MAX: usize = 64;
/// Most consumers connected to one group at once.
pub const GROUP_CONSUMERS_MAX: usize = 1024;
/// A group's default demand window: events in flight over all its consumers.
pub const GROUP_MAX_IN_FLIGHT_DEFAULT: u32 = 1000;
/// The largest demand window a group or a consumer may ask for.
pub const GROUP_MAX_IN_FLIGHT_MAX: u32 = 10_000;
/// Default time a consumer may hold an event before it is retried.
pub const GROUP_MESSAGE_TIMEOUT_MS_DEFAULT: u64 = 30_000;
/// The longest message timeout (one hour).
pub const GROUP_MESSAGE_TIMEOUT_MS_MAX: u64 = 3_600_000;
/// Default retries after the first delivery before an event is parked.
pub const GROUP_MAX_RETRIES_DEFAULT: u32 = 10;
/// The most retries a group may allow.
pub const GROUP_MAX_RETRIES_MAX: u32 = 1000;
/// Default settled events between two checkpoints of a group (KurrentDB's
/// persistent subscriptions force one after 1,000 unsettled messages by
/// default too). Each checkpoint is a write through the store; at a few
/// hundred thousand acks a second, one every 100 events kept the engine
/// waiting for them.
pub const GROUP_CHECKPOINT_AFTER_DEFAULT: u32 = 1000;
/// The most settled events between two checkpoints.
pub const GROUP_CHECKPOINT_AFTER_MAX: u32 = 100_000;
/// Default longest time settled events wait for a checkpoint.
pub const GROUP_CHECKPOINT_INTERVAL_MS_DEFAULT: u64 = 1000;
/// The longest checkpoint interval (ten minutes).
pub const GROUP_CHECKPOINT_INTERVAL_MS_MAX: u64 = 600_000;
/// Most events a group holds read and unsettled (in flight, waiting, or
/// settled above its oldest unsettled event): at least the window, and
/// reading stops at this count. With [`GROUP_BUFFER_BYTES_MAX`] this bounds
/// a group's memory whatever its backlog: the backlog stays in the log.
pub const GROUP_BUFFER_EVENTS_MAX: usize = 131_072;
/// Most payload bytes a group holds read ahead (default 16 MiB; plus one
/// event: a read stops once over it).
pub const GROUP_BUFFER_BYTES_MAX: u64 = 16 * 1024 * 1024;
/// Commands queued towards one group's engine (acks, nacks, joins).
pub const GROUP_COMMANDS_QUEUED: usize = 1024;
/// Most positions merged into one ack: the node merges a consumer's acks
/// that arrive back to back into one engine command up to this count, and
/// the client merges acks queued behind its connection into one message up
/// to this count.
pub const GROUP_ACK_POSITIONS_MAX: usize = 512;
/// Most parked events one `ListParked` returns.
pub const GROUP_PARKED_PAGE_MAX: u32 = 1000;

const _: () = assert!(GROUP_BUFFER_EVENTS_MAX >= 4 * GROUP_MAX_IN_FLIGHT_MAX as usize);
const _: () = assert!(GROUP_ACK_POSITIONS_MAX <= GROUP_MAX_IN_FLIGHT_MAX as usize);

// ---- ingest quotas ----------------------------------------------------------

/// Most ingest quotas one node takes (default 1024; `[[quota]]` entries in
/// the config file or `edgebus serve --quota` flags). Each write is checked
/// against every quota in declared order, so this bounds the work of one
/// check as well as the memory and the `/metrics` series of the quotas.
pub const NODE_QUOTAS_MAX: usize = 1024;

/// Shortest time a node holds a quota refusal before answering it (default
/// 20 ms). A producer that ignores `retry_after_ms` and sends again at once
/// then gets at most (its calls in flight) / 20 ms refusals a second, so it
/// cannot make the node spend its time refusing it. Held refusals keep no
/// request body, only a timer.
pub const NODE_QUOTA_REFUSAL_HOLD_MS_MIN: u64 = 20;
/// Longest time a node holds a quota refusal (default 100 ms): within it,
/// the hold is the time until the bucket refills; the answer's
/// `retry_after_ms` is what remains of that time after the hold.
pub const NODE_QUOTA_REFUSAL_HOLD_MS_MAX: u64 = 100;

const _: () = assert!(NODE_QUOTA_REFUSAL_HOLD_MS_MIN <= NODE_QUOTA_REFUSAL_HOLD_MS_MAX);

// ---- HTTP connections -------------------------------------------------------

/// Default time an HTTP connection may take to send a request's headers,
/// counted from the connection's opening or from the end of its previous
/// response (default 30 s; `edgebus serve --http-idle-timeout-ms`). A
/// client that opens a connection and sends nothing loses it then, so idle
/// clients cannot hold connection slots for ever. A request being served
/// (an append waiting to be durable, a server-sent events subscription) is
/// not idle.
pub const NODE_HTTP_IDLE_TIMEOUT_MS_DEFAULT: u64 = 30_000;
/// Shortest configurable HTTP idle timeout (default 10 ms): below it a
/// client on a loaded machine could lose its connection between the TCP
/// handshake and its first bytes.
pub const NODE_HTTP_IDLE_TIMEOUT_MS_MIN: u64 = 10;

const _: () = assert!(NODE_HTTP_IDLE_TIMEOUT_MS_MIN <= NODE_HTTP_IDLE_TIMEOUT_MS_DEFAULT);

// ---- the Site service (gateways in their own process) -----------------------

/// Most events one `Site.ReadLog` call returns (default 4096; a request for
/// more, or for 0, gets this many at most).
pub const SITE_READ_LOG_RECORDS_MAX: usize = 4096;
/// Most payload bytes one `Site.ReadLog` call returns past its first event
/// (default 4 MiB). With the first event (at most one log record) and the
/// per-event framing this keeps an answer within the node's gRPC message
/// limit (8 MiB).
pub const SITE_READ_LOG_BYTES_MAX: u64 = 4 * 1024 * 1024;
/// Most writes in one `Site.Replicate` call (default 4096); a remote
/// gateway splits larger batches.
pub const SITE_REPLICATE_WRITES_MAX: usize = 4096;
/// Most encoded bytes of the writes a remote gateway puts in one
/// `Site.Replicate` call (default 4 MiB): a larger batch goes as several
/// calls, so one call stays within the node's gRPC message limit (8 MiB)
/// whatever the events.
pub const SITE_REPLICATE_CALL_BYTES_MAX: usize = 4 * 1024 * 1024;

const _: () = assert!(
    SITE_READ_LOG_BYTES_MAX + LOG_RECORD_BYTES_DEFAULT + SITE_READ_LOG_RECORDS_MAX as u64 * 64 <= 8 * 1024 * 1024
);
const _: () =
    assert!(SITE_REPLICATE_CALL_BYTES_MAX + EVENT_DATA_BYTES_MAX + EVENT_METADATA_BYTES_MAX + 4096 <= 8 * 1024 * 1024);
