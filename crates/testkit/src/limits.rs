//! Every limit of the link emulator, with its default, in one place.

use std::time::Duration;

/// Bytes read from a socket at once at most, and so the largest piece that
/// travels through an emulated pipe as one unit.
pub const PIECE_BYTES_MAX: usize = 64 * 1024;
/// The smallest piece read from a socket under a bandwidth limit. Pieces are
/// sized to about [`PIECE_DURATION`] of transmission so that a slow pipe
/// delivers bytes smoothly rather than in bursts of [`PIECE_BYTES_MAX`].
pub const PIECE_BYTES_MIN: usize = 1024;
/// The transmission time that one piece is sized to under a bandwidth limit.
pub const PIECE_DURATION: Duration = Duration::from_millis(5);

/// Default bytes held in one direction's emulated pipe (shared by all its
/// connections) before the proxy stops reading from senders.
pub const BUFFER_BYTES_DEFAULT: usize = 4 * 1024 * 1024;
/// The largest pipe buffer a configuration may ask for.
pub const BUFFER_BYTES_MAX: usize = 256 * 1024 * 1024;

/// Pieces queued per connection and direction at most (the byte budget of
/// the pipe is the tighter bound in practice; this one caps the queue's
/// length whatever the piece sizes).
pub const CONNECTION_QUEUE_PIECES_MAX: usize = 1024;

/// The slowest pipe a configuration may ask for, in bits per second.
pub const BANDWIDTH_BPS_MIN: u64 = 1000;
/// The shortest mean interval between stalls a configuration may ask for.
pub const STALL_EVERY_MIN: Duration = Duration::from_millis(1);
/// Stall windows one direction keeps planned ahead at most; beyond that
/// horizon no further stalls are planned until time catches up.
pub const STALL_WINDOWS_MAX: usize = 4096;

/// How long the proxy waits for the target to accept a forwarded connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pending scheduled actions per link at most.
pub const SCHEDULED_ACTIONS_MAX: usize = 1024;

const _: () = assert!(PIECE_BYTES_MIN <= PIECE_BYTES_MAX);
const _: () = assert!(PIECE_BYTES_MAX <= BUFFER_BYTES_DEFAULT);
const _: () = assert!(BUFFER_BYTES_DEFAULT <= BUFFER_BYTES_MAX);
