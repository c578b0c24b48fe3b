//! Consumer groups (persistent subscriptions): durable, filtered cursors
//! over the log that several consumers share, with acks, nacks, retries,
//! parking and checkpoints.
//!
//! - [`def`]: what a group is, as asked for and as recorded in the log.
//! - [`engine`]: one task per group that owns its state and its consumers.
//! - [`service`]: the `edgebus.v1.ConsumerGroups` gRPC service.
//! - [`Groups`] (here): the node's registry. It writes every create,
//!   update and delete to the `$groups` stream before acting on it, and on
//!   start replays that stream to restart each group's engine from its
//!   last checkpoint (`$groups.<name>.checkpoint`).

pub mod def;
pub mod engine;
pub mod service;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::Context as _;
use edgebus_proto::v1;
use edgebus_store::{Direction, ReadError, Store, StreamFrom};
use edgebus_types::limits::{GROUP_COMMANDS_QUEUED, GROUP_PARKED_PAGE_MAX, GROUPS_MAX};
use edgebus_types::{EventId, EventType, ExpectedVersion, NewEvent, StreamName};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use self::def::{
    CheckpointRecord, DefError, GROUPS_STREAM, GroupRecord, GroupRequest, ParkedRecord, Settings, StartRequest,
    TYPE_CREATED, TYPE_DELETED, TYPE_UPDATED, check_name, checkpoint_stream, parked_stream,
};
use self::engine::{Command, Engine, EngineStart};
use crate::grpc::now_ms;
use crate::state::NodeState;

/// A running group, as the registry holds it.
#[derive(Debug, Clone)]
struct Handle {
    commands: mpsc::Sender<Command>,
    record: GroupRecord,
    generation: u64,
}

/// The node's consumer groups.
#[derive(Debug, Default)]
pub struct Groups {
    running: Mutex<BTreeMap<String, Handle>>,
    /// Creates, updates and deletes one at a time.
    changes: tokio::sync::Mutex<()>,
    engines: Mutex<Vec<JoinHandle<()>>>,
}

/// A refused request: the error detail for the caller (boxed: it is large
/// and rare).
pub type Refusal = Box<v1::ErrorDetail>;

fn refusal(code: v1::ErrorCode, message: impl Into<String>) -> Refusal {
    Box::new(v1::ErrorDetail { code: code as u32, message: message.into(), ..v1::ErrorDetail::default() })
}

fn not_found(name: &str) -> Refusal {
    refusal(v1::ErrorCode::GroupNotFound, format!("no consumer group named {name}"))
}

fn gone(name: &str) -> Refusal {
    refusal(v1::ErrorCode::Unavailable, format!("group {name} stopped (the node is shutting down)"))
}

fn store_failure(e: &impl std::fmt::Display) -> Refusal {
    refusal(v1::ErrorCode::Unavailable, format!("the store failed: {e}"))
}

fn def_error(e: &DefError) -> Refusal {
    Box::new(e.detail())
}

/// Runs `call` on the blocking pool.
async fn blocking<T: Send + 'static>(call: impl FnOnce() -> T + Send + 'static) -> Result<T, Refusal> {
    tokio::task::spawn_blocking(call).await.map_err(|e| store_failure(&e))
}

fn groups_stream() -> StreamName {
    StreamName::system(GROUPS_STREAM).expect("a valid system name")
}

/// Events in `stream` (0 if none).
fn stream_count(store: &Store, stream: &StreamName) -> Result<u64, ReadError> {
    Ok(store.stream_info(stream)?.and_then(|info| info.current_version).map_or(0, |v| v + 1))
}

/// The latest checkpoint of `generation` in `name`'s checkpoint stream.
fn last_checkpoint(store: &Store, name: &str, generation: u64) -> Result<Option<CheckpointRecord>, ReadError> {
    let stream = checkpoint_stream(name);
    let events = match store.read_stream(&stream, StreamFrom::End, Direction::Backward, 1, now_ms()) {
        Ok(events) => events,
        Err(ReadError::StreamNotFound { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(events
        .first()
        .and_then(|event| serde_json::from_slice::<CheckpointRecord>(&event.data).ok())
        .filter(|record| record.generation == generation))
}

impl Groups {
    /// Restarts every group recorded in the log (`$groups`), each from its
    /// last checkpoint. Called once when the node starts.
    pub async fn load(state: &Arc<NodeState>) -> anyhow::Result<()> {
        let store = Arc::clone(&state.store);
        let recorded = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<(GroupRecord, u64)>> {
            let stream = groups_stream();
            let mut live: BTreeMap<String, (GroupRecord, u64)> = BTreeMap::new();
            let mut version = 0;
            loop {
                let page =
                    match store.read_stream(&stream, StreamFrom::Version(version), Direction::Forward, 256, now_ms()) {
                        Ok(page) => page,
                        Err(ReadError::StreamNotFound { .. }) => break,
                        Err(e) => return Err(e).context("cannot read the $groups stream"),
                    };
                let Some(last) = page.last() else { break };
                version = last.version + 1;
                for event in &page {
                    match event.event_type.as_str() {
                        TYPE_CREATED | TYPE_UPDATED => {
                            let record: GroupRecord = serde_json::from_slice(&event.data).with_context(|| {
                                format!("$groups event at position {} is not a group record", event.position)
                            })?;
                            let generation = match (event.event_type.as_str(), live.get(&record.name)) {
                                (TYPE_UPDATED, Some((_, generation))) => *generation,
                                _ => event.position,
                            };
                            live.insert(record.name.clone(), (record, generation));
                        }
                        TYPE_DELETED => {
                            let deleted: serde_json::Value = serde_json::from_slice(&event.data).unwrap_or_default();
                            if let Some(name) = deleted.get("name").and_then(|n| n.as_str()) {
                                live.remove(name);
                            }
                        }
                        _ => {}
                    }
                }
            }
            Ok(live.into_values().collect())
        })
        .await
        .context("the groups' load task failed")??;
        for (record, generation) in recorded {
            let name = record.name.clone();
            state
                .groups
                .start(state, record, generation)
                .await
                .map_err(|e| anyhow::anyhow!("cannot start consumer group {name}: {}", e.message))?;
        }
        Ok(())
    }

    /// Starts the engine of a recorded group.
    async fn start(&self, state: &Arc<NodeState>, record: GroupRecord, generation: u64) -> Result<(), Refusal> {
        let store = Arc::clone(&state.store);
        let for_load = record.clone();
        let loaded = blocking(move || {
            let filter = for_load.filter.compile().map_err(|e| def_error(&e))?;
            let checkpoint = last_checkpoint(&store, &for_load.name, generation).map_err(|e| store_failure(&e))?;
            let parked_count = stream_count(&store, &parked_stream(&for_load.name)).map_err(|e| store_failure(&e))?;
            Ok::<_, Refusal>((filter, checkpoint, parked_count))
        })
        .await??;
        let (filter, checkpoint, parked_count) = loaded;
        let (commands, receiver) = mpsc::channel(GROUP_COMMANDS_QUEUED);
        let start = EngineStart { record: record.clone(), generation, filter, checkpoint, parked_count };
        let engine = Engine::new(Arc::clone(state), start, receiver);
        let task = tokio::spawn(engine.run());
        let mut engines = self.engines.lock().unwrap_or_else(PoisonError::into_inner);
        // Engines of deleted groups have ended: keep only the running ones.
        engines.retain(|engine| !engine.is_finished());
        engines.push(task);
        drop(engines);
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(record.name.clone(), Handle { commands, record, generation });
        Ok(())
    }

    fn handle(&self, name: &str) -> Result<Handle, Refusal> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner).get(name).cloned().ok_or_else(|| not_found(name))
    }

    /// The command queue of group `name`, for a consumer's call.
    pub fn commands(&self, name: &str) -> Result<mpsc::Sender<Command>, Refusal> {
        Ok(self.handle(name)?.commands)
    }

    async fn append_lifecycle(state: &Arc<NodeState>, event_type: &str, data: Vec<u8>) -> Result<u64, Refusal> {
        let store = Arc::clone(&state.store);
        let event = NewEvent {
            id: EventId::generate(),
            event_type: EventType::new(event_type).expect("a valid type"),
            data,
            metadata: Vec::new(),
            timestamp_ms: now_ms(),
        };
        let written =
            blocking(move || store.append_system(&groups_stream(), ExpectedVersion::Any, vec![event])).await?;
        written.map(|result| result.first_position).map_err(|e| {
            let mut detail = Box::new(edgebus_proto::convert::error_detail_from_write_error(&e));
            detail.message = format!("cannot record the group change: {}", detail.message);
            detail
        })
    }

    /// Creates a group: validates it, records it in `$groups`, starts it.
    pub async fn create(&self, state: &Arc<NodeState>, request: GroupRequest) -> Result<v1::GroupInfo, Refusal> {
        check_name(&request.name).map_err(|e| def_error(&e))?;
        let settings = request.settings.apply(Settings::default()).map_err(|e| def_error(&e))?;
        let filter = request.filter.clone().unwrap_or_default();
        let start = request.start.ok_or_else(|| {
            def_error(&DefError {
                field: "start".to_owned(),
                problem: "a group needs a start: beginning, end or a position".to_owned(),
                kind: def::DefErrorKind::Argument,
            })
        })?;
        let to_compile = filter.clone();
        blocking(move || to_compile.compile()).await?.map_err(|e| def_error(&e))?;
        let _change = self.changes.lock().await;
        let name = request.name.clone();
        {
            let running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
            if running.contains_key(&name) {
                return Err(refusal(
                    v1::ErrorCode::GroupExists,
                    format!("a consumer group named {name} exists already"),
                ));
            }
            if running.len() >= GROUPS_MAX {
                return Err(refusal(
                    v1::ErrorCode::ResourceExhausted,
                    format!("the node holds {GROUPS_MAX} consumer groups, the most it takes; delete one first"),
                ));
            }
        }
        let store = Arc::clone(&state.store);
        let parked = parked_stream(&name);
        let (start_position, parked_base) = blocking(move || {
            let log = store.log();
            let start_position = match start {
                StartRequest::Beginning => log.start_position(),
                StartRequest::End => log.end_position(),
                StartRequest::Position(p) => p,
            };
            (start_position, stream_count(&store, &parked))
        })
        .await?;
        let parked_base = parked_base.map_err(|e| store_failure(&e))?;
        let record = GroupRecord { name: name.clone(), filter, settings, start_position, parked_base };
        let data = serde_json::to_vec(&record).expect("a group record serializes");
        let generation = Self::append_lifecycle(state, TYPE_CREATED, data).await?;
        self.start(state, record, generation).await?;
        self.describe(&name).await
    }

    /// Changes a group's filter and settings.
    pub async fn update(
        &self,
        state: &Arc<NodeState>,
        name: &str,
        request: GroupRequest,
    ) -> Result<v1::GroupInfo, Refusal> {
        if request.start.is_some() {
            return Err(def_error(&DefError {
                field: "start".to_owned(),
                problem: "a group's start cannot change; delete the group and create it again".to_owned(),
                kind: def::DefErrorKind::Argument,
            }));
        }
        let _change = self.changes.lock().await;
        let handle = self.handle(name)?;
        let settings = request.settings.apply(handle.record.settings).map_err(|e| def_error(&e))?;
        let filter_def = request.filter.clone().unwrap_or_else(|| handle.record.filter.clone());
        let to_compile = filter_def.clone();
        let filter = blocking(move || to_compile.compile()).await?.map_err(|e| def_error(&e))?;
        let record = GroupRecord { filter: filter_def, settings, ..handle.record.clone() };
        let data = serde_json::to_vec(&record).expect("a group record serializes");
        Self::append_lifecycle(state, TYPE_UPDATED, data).await?;
        let (reply, replied) = oneshot::channel();
        let command = Command::Update { record: Box::new(record.clone()), filter: Box::new(filter), reply };
        handle.commands.send(command).await.map_err(|_| gone(name))?;
        replied.await.map_err(|_| gone(name))?;
        if let Some(running) = self.running.lock().unwrap_or_else(PoisonError::into_inner).get_mut(name) {
            running.record = record;
        }
        self.describe(name).await
    }

    /// Deletes a group: recorded, then its engine and consumers stop.
    pub async fn delete(&self, state: &Arc<NodeState>, name: &str) -> Result<(), Refusal> {
        let _change = self.changes.lock().await;
        let handle = self.handle(name)?;
        let data = serde_json::to_vec(&serde_json::json!({ "name": name })).expect("serializes");
        Self::append_lifecycle(state, TYPE_DELETED, data).await?;
        self.running.lock().unwrap_or_else(PoisonError::into_inner).remove(name);
        let (reply, replied) = oneshot::channel();
        let detail = *refusal(v1::ErrorCode::GroupNotFound, format!("consumer group {name} was deleted"));
        if handle.commands.send(Command::Delete { detail, reply }).await.is_ok() {
            let _ = replied.await;
        }
        Ok(())
    }

    /// One group's figures.
    pub async fn describe(&self, name: &str) -> Result<v1::GroupInfo, Refusal> {
        let handle = self.handle(name)?;
        let (reply, replied) = oneshot::channel();
        handle.commands.send(Command::Describe { reply }).await.map_err(|_| gone(name))?;
        replied.await.map_err(|_| gone(name))
    }

    /// Every group's figures, in name order.
    pub async fn list(&self) -> Vec<v1::GroupInfo> {
        let names: Vec<String> = self.running.lock().unwrap_or_else(PoisonError::into_inner).keys().cloned().collect();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            // A group deleted meanwhile is simply not listed.
            if let Ok(info) = self.describe(&name).await {
                out.push(info);
            }
        }
        out
    }

    /// A page of a group's parked events (this incarnation's), and how many
    /// there are.
    pub async fn list_parked(
        &self,
        state: &Arc<NodeState>,
        name: &str,
        offset: u64,
        limit: u32,
    ) -> Result<(Vec<v1::ParkedEvent>, u64), Refusal> {
        let handle = self.handle(name)?;
        let limit = if limit == 0 { GROUP_PARKED_PAGE_MAX } else { limit.min(GROUP_PARKED_PAGE_MAX) };
        let store = Arc::clone(&state.store);
        let stream = parked_stream(name);
        let base = handle.record.parked_base;
        let generation = handle.generation;
        let read = blocking(move || -> Result<(Vec<v1::ParkedEvent>, u64), ReadError> {
            let total = stream_count(&store, &stream)?.saturating_sub(base);
            if offset >= total {
                return Ok((Vec::new(), total));
            }
            let from = StreamFrom::Version(base.saturating_add(offset));
            let events = store.read_stream(&stream, from, Direction::Forward, limit as usize, now_ms())?;
            let parked = events
                .iter()
                .filter_map(|parked| {
                    let record: ParkedRecord = serde_json::from_slice(&parked.metadata).ok()?;
                    (record.generation == generation).then_some(())?;
                    let event = engine::original_event(parked)?;
                    Some(v1::ParkedEvent {
                        event: Some(event.into()),
                        reason: record.reason,
                        attempts: record.attempts,
                        consumer: record.consumer,
                        parked_at_ms: record.parked_at_ms,
                    })
                })
                .collect();
            Ok((parked, total))
        })
        .await?;
        read.map_err(|e| Box::new(edgebus_proto::convert::error_detail_from_read_error(&e)))
    }

    /// Hands every event parked so far back to the group; returns how many.
    pub async fn replay_parked(&self, state: &Arc<NodeState>, name: &str) -> Result<u64, Refusal> {
        let handle = self.handle(name)?;
        let store = Arc::clone(&state.store);
        let stream = parked_stream(name);
        let end = blocking(move || stream_count(&store, &stream)).await?.map_err(|e| store_failure(&e))?;
        let (reply, replied) = oneshot::channel();
        handle.commands.send(Command::ReplayParked { end, reply }).await.map_err(|_| gone(name))?;
        replied.await.map_err(|_| gone(name))
    }

    /// Waits for every engine to finish (they stop with the node, after a
    /// last checkpoint).
    pub async fn stopped(&self) {
        let engines = std::mem::take(&mut *self.engines.lock().unwrap_or_else(PoisonError::into_inner));
        for engine in engines {
            let _ = engine.await;
        }
    }

    /// The Prometheus lines of every group.
    pub async fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let groups = self.list().await;
        if groups.is_empty() {
            return;
        }
        type Family = (&'static str, &'static str, &'static str, fn(&v1::GroupInfo) -> u64);
        let families: [Family; 9] = [
            ("edgebus_group_delivered_total", "counter", "Deliveries to consumers, retries included.", |g| g.delivered),
            ("edgebus_group_acked_total", "counter", "Events acked.", |g| g.acked),
            ("edgebus_group_retried_total", "counter", "Deliveries that failed and were retried.", |g| g.retried),
            ("edgebus_group_skipped_total", "counter", "Events nacked with skip.", |g| g.skipped),
            ("edgebus_group_parked", "gauge", "Events in the group's parked stream.", |g| g.parked),
            ("edgebus_group_pending", "gauge", "Events read and not settled.", |g| g.pending),
            ("edgebus_group_in_flight", "gauge", "Events held by consumers.", |g| g.in_flight),
            ("edgebus_group_lag", "gauge", "Log positions the group has not read.", |g| g.lag),
            ("edgebus_group_consumers", "gauge", "Consumers connected.", |g| g.consumers.len() as u64),
        ];
        for (metric, kind, help, value) in families {
            let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} {kind}");
            for group in &groups {
                let _ = writeln!(out, "{metric}{{group=\"{}\"}} {}", group.name, value(group));
            }
        }
    }
}
