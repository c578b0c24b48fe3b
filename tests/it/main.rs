//! edgebus integration scenarios, one module per area.

mod log_crash;
mod log_faults;
mod log_model;
