//! edgebus integration scenarios, one module per area.

mod cli_publish_read;
mod cli_subscribe;
mod fuzz_http;
mod log_crash;
mod log_faults;
mod log_model;
mod node;
mod node_config;
mod node_groups;
mod node_groups_scenario;
mod node_http;
mod node_limits;
mod node_quota;
mod node_serve;
mod node_stats;
mod node_subscribe;
mod node_subscribe_load;
mod store_bad_input;
mod store_checkpoint_crash;
mod store_determinism;
mod store_model;
mod store_race;
mod store_replica;
mod transform;
mod wan_emulator;
