//! The subscription filter: which recorded events a subscription delivers.
//!
//! An [`EventFilter`] combines four conditions, all of which must hold: the
//! stream (any, one, or a pattern), the event type (any of a list), whether
//! system streams are included, and a [`Predicate`], a CEL expression over
//! the event with its payload parsed as JSON. The cheap checks run first, so
//! the predicate only sees events that already passed them.
//!
//! # Lifecycle of a predicate
//!
//! The node compiles the predicate once, when the subscription starts
//! ([`Predicate::compile`]); a predicate that does not compile, or is too big
//! or too deep, is refused there with a [`FilterError`] naming the problem.
//! The compiled predicate lives as long as the subscription and is evaluated
//! once per candidate event ([`Predicate::evaluate`]). Evaluation never
//! fails the subscription: a payload that is not JSON, a missing field, a
//! type mismatch, a result that is not a `bool` or an exhausted cost budget
//! is [`Evaluation::Error`], which the caller counts and treats as "no
//! match".
//!
//! # Bounds
//!
//! A predicate is untrusted input that runs on the node, once per event, so
//! both its size and the work of one evaluation are bounded:
//!
//! - the source is at most [`FILTER_PREDICATE_BYTES_MAX`] bytes;
//! - the expression, after macros such as `exists` are expanded, has at most
//!   [`FILTER_PREDICATE_NODES_MAX`] nodes and [`FILTER_PREDICATE_DEPTH_MAX`]
//!   levels, which bounds the interpreter's recursion (its stack) and the
//!   work outside comprehensions;
//! - the work that grows with the payload (comprehensions over its lists,
//!   comparing, concatenating or copying its strings, lists and maps) is
//!   charged against a budget of [`FILTER_PREDICATE_COST_MAX`] units per
//!   evaluation. The compiler inserts the charges into the expression; when
//!   the budget runs out, evaluation stops at once (see the `budget` module);
//! - the payload is at most [`EVENT_DATA_BYTES_MAX`] bytes, and `serde_json`
//!   refuses JSON nested more than 128 levels deep.
//!
//! Parsing itself runs on a thread of its own with a generous stack, so that
//! no source, however nested, can overflow the stack of the caller.

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, LazyLock};

use cel::common::ast::{CallExpr, ComprehensionExpr, EntryExpr, Expr, IdedExpr, LiteralValue, operators};
use cel::common::types::{
    CelBool, CelDouble, CelInt, CelList, CelMap, CelMapKey, CelNull, CelString, CelUInt, DYN_TYPE, INT_TYPE,
};
use cel::common::value::{CowVal, Val};
use cel::context::VariableResolver;
use cel::parser::ParseErrors;
use cel::{Context, Env, ExecutionError, Value};
use edgebus_types::limits::{
    EVENT_DATA_BYTES_MAX, FILTER_EVENT_TYPES_MAX, FILTER_PREDICATE_BYTES_MAX, FILTER_PREDICATE_COST_MAX,
    FILTER_PREDICATE_DEPTH_MAX, FILTER_PREDICATE_NODES_MAX,
};
use edgebus_types::{EventType, RecordedEvent, StreamName, StreamPattern};
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

// The cost budget stops an evaluation by unwinding (see `budget`); with
// `panic = "abort"` that would abort the node instead.
#[cfg(panic = "abort")]
compile_error!("edgebus-server needs panic = \"unwind\": the predicate cost budget unwinds to stop an evaluation");

/// Stack of the thread that parses a predicate. The CEL parser recurses per
/// level of nesting before any of our limits can look at the expression;
/// sources of [`FILTER_PREDICATE_BYTES_MAX`] bytes need well under 1 MiB.
const COMPILE_STACK_BYTES: usize = 8 * 1024 * 1024;
/// Longest message carried by [`Evaluation::Error`] and by a compile error:
/// interpreter errors may print whole values, which come from the payload.
const MESSAGE_BYTES_MAX: usize = 1024;
/// Longest name (a variable or a type name) that a compile error quotes: a
/// name may be as long as the whole source.
const NAME_IN_MESSAGE_BYTES_MAX: usize = 128;

// ---- the filter -------------------------------------------------------------

/// Which streams a filter passes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StreamSelector {
    /// Every stream.
    #[default]
    Any,
    /// Exactly this stream.
    Exact(StreamName),
    /// The streams matching this pattern.
    Pattern(StreamPattern),
}

impl StreamSelector {
    /// Whether `stream` is selected.
    pub fn matches(&self, stream: &StreamName) -> bool {
        match self {
            StreamSelector::Any => true,
            StreamSelector::Exact(name) => name == stream,
            StreamSelector::Pattern(pattern) => pattern.matches(stream),
        }
    }
}

/// What a subscription delivers: every condition must hold.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Which streams.
    pub stream: StreamSelector,
    /// Only events of one of these types; empty: every type.
    pub event_types: Vec<EventType>,
    /// Only events for which this predicate is true; `None`: every event.
    pub predicate: Option<Predicate>,
    /// Whether events of system (`$`) streams pass. This gates system
    /// streams for every selector, exactly as `edgebus_store::AllFilter`
    /// does, so that a catch-up read from the store and the live filter
    /// deliver the same events.
    pub include_system: bool,
}

impl EventFilter {
    /// A filter, checking that it lists at most [`FILTER_EVENT_TYPES_MAX`]
    /// event types.
    pub fn new(
        stream: StreamSelector,
        event_types: Vec<EventType>,
        predicate: Option<Predicate>,
        include_system: bool,
    ) -> Result<Self, FilterError> {
        if event_types.len() > FILTER_EVENT_TYPES_MAX {
            return Err(FilterError::TooManyEventTypes { count: event_types.len(), max: FILTER_EVENT_TYPES_MAX });
        }
        Ok(Self { stream, event_types, predicate, include_system })
    }

    /// Whether `event` passes. An evaluation error of the predicate counts
    /// as no match; use [`EventFilter::evaluate`] to tell them apart.
    pub fn matches(&self, event: &RecordedEvent) -> bool {
        self.evaluate(event) == Evaluation::Match
    }

    /// Whether `event` passes, telling a predicate that failed to evaluate
    /// apart from one that was false.
    pub fn evaluate(&self, event: &RecordedEvent) -> Evaluation {
        if !self.matches_without_predicate(event) {
            return Evaluation::NoMatch;
        }
        match &self.predicate {
            None => Evaluation::Match,
            Some(predicate) => predicate.evaluate(event),
        }
    }

    /// Whether `event` passes the cheap conditions: system streams, stream
    /// and event type. No allocation, no payload parsing.
    pub fn matches_without_predicate(&self, event: &RecordedEvent) -> bool {
        if event.stream.is_system() && !self.include_system {
            return false;
        }
        if !self.stream.matches(&event.stream) {
            return false;
        }
        self.event_types.is_empty() || self.event_types.contains(&event.event_type)
    }
}

/// The outcome of evaluating a predicate (or a whole filter) on one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Evaluation {
    /// The event passes.
    Match,
    /// The event does not pass.
    NoMatch,
    /// The predicate could not be evaluated on this event; the event does
    /// not pass. The message says why (at most 1 KiB), for logs; callers
    /// count these per subscription.
    Error(String),
}

impl Evaluation {
    /// Whether the event passes.
    pub fn is_match(&self) -> bool {
        matches!(self, Evaluation::Match)
    }
}

/// Why a filter cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FilterError {
    /// The predicate source is empty or only whitespace.
    #[error("payload predicate is empty")]
    PredicateEmpty,
    /// The predicate source is longer than [`FILTER_PREDICATE_BYTES_MAX`].
    #[error("payload predicate is {len_bytes} bytes, more than the maximum of {max_bytes}")]
    PredicateTooLong {
        /// Length of the rejected source.
        len_bytes: usize,
        /// The limit it exceeds.
        max_bytes: usize,
    },
    /// The CEL compiler rejects the predicate.
    #[error("payload predicate does not compile: {message}")]
    PredicateSyntax {
        /// The rejected source.
        predicate: String,
        /// The compiler's message, with the offending line and a caret.
        message: String,
    },
    /// The expanded expression has more than [`FILTER_PREDICATE_NODES_MAX`] nodes.
    #[error("payload predicate has more than {max_nodes} expression nodes (after macros such as exists are expanded)")]
    PredicateTooComplex {
        /// The limit it exceeds.
        max_nodes: usize,
    },
    /// The expression nests more than [`FILTER_PREDICATE_DEPTH_MAX`] levels.
    #[error("payload predicate nests more than {max_depth} levels deep")]
    PredicateTooDeep {
        /// The limit it exceeds.
        max_depth: usize,
    },
    /// The predicate names a variable that does not exist.
    #[error(
        "payload predicate refers to unknown variable `{name}`; a predicate sees data (the JSON payload), stream, \
         type, version and position"
    )]
    UnknownVariable {
        /// The unknown name, cut to 128 bytes (then ending in `...`).
        name: String,
    },
    /// The predicate uses a construct that filters do not support.
    #[error("payload predicate uses {construct}, which filters do not support")]
    Unsupported {
        /// What it uses.
        construct: String,
    },
    /// The compiler could not run (no thread for it, or it crashed); not the
    /// predicate's fault as far as we know.
    #[error("payload predicate could not be compiled: {reason}")]
    CompilerFailed {
        /// What went wrong.
        reason: String,
    },
    /// The filter lists more than [`FILTER_EVENT_TYPES_MAX`] event types.
    #[error("filter lists {count} event types, more than the maximum of {max}")]
    TooManyEventTypes {
        /// Number of types listed.
        count: usize,
        /// The limit it exceeds.
        max: usize,
    },
}

// ---- the predicate ----------------------------------------------------------

/// Variables a predicate sees.
const VAR_DATA: &str = "data";
const VAR_STREAM: &str = "stream";
const VAR_TYPE: &str = "type";
const VAR_VERSION: &str = "version";
const VAR_POSITION: &str = "position";
const VARIABLES: [&str; 5] = [VAR_DATA, VAR_STREAM, VAR_TYPE, VAR_VERSION, VAR_POSITION];

/// A compiled CEL predicate over an event.
///
/// The expression sees `data`, the payload parsed as JSON (objects are maps,
/// arrays lists, integers `int` (`uint` above `i64::MAX`), other numbers
/// `double`), `stream` and `type` (strings), and `version` and `position`
/// (ints). So `data.temp > 70 && data.site == "eu"` works, and so do
/// `type == "reading"`, `stream.startsWith("sensors.")`, `has(data.alarm)`
/// and `data.items.exists(i, i.price > 100)`. The standard CEL library is
/// available without the regex (`matches`) and time (`timestamp`,
/// `duration`) functions, whose cost is hard to bound per event.
#[derive(Clone)]
pub struct Predicate {
    source: Arc<str>,
    /// The expression with the cost charges inserted (see [`budget`]).
    expr: Arc<IdedExpr>,
    /// Whether the expression reads `data`, so the payload must be parsed.
    uses_data: bool,
}

impl fmt::Debug for Predicate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Predicate").field("source", &self.source).finish_non_exhaustive()
    }
}

impl Predicate {
    /// Compiles `source`, once, when a subscription starts.
    ///
    /// Refuses sources longer than [`FILTER_PREDICATE_BYTES_MAX`], sources
    /// that do not compile (with the compiler's message), expressions over
    /// [`FILTER_PREDICATE_NODES_MAX`] nodes or [`FILTER_PREDICATE_DEPTH_MAX`]
    /// levels, unknown variables, and constructs filters do not support
    /// (message literals such as `Foo{a: 1}`).
    ///
    /// Blocks while the predicate compiles on a thread of its own: under a
    /// millisecond for a short predicate, a few for the largest. Async
    /// callers should compile from a blocking context.
    pub fn compile(source: &str) -> Result<Predicate, FilterError> {
        if source.len() > FILTER_PREDICATE_BYTES_MAX {
            return Err(FilterError::PredicateTooLong {
                len_bytes: source.len(),
                max_bytes: FILTER_PREDICATE_BYTES_MAX,
            });
        }
        if source.trim().is_empty() {
            return Err(FilterError::PredicateEmpty);
        }
        let (expr, uses_data) = std::thread::scope(|scope| {
            let handle = std::thread::Builder::new()
                .name("edgebus-cel-compile".to_owned())
                .stack_size(COMPILE_STACK_BYTES)
                .spawn_scoped(scope, || compile_here(source))
                .map_err(|error| FilterError::CompilerFailed {
                    reason: format!("cannot start the compiler thread: {error}"),
                })?;
            handle.join().map_err(|panic| FilterError::CompilerFailed {
                reason: format!("the CEL compiler panicked: {}", panic_message(panic.as_ref())),
            })?
        })?;
        Ok(Predicate { source: source.into(), expr: Arc::new(expr), uses_data })
    }

    /// The source the predicate was compiled from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates the predicate on `event`. Never panics and never fails:
    /// anything that keeps the predicate from being a `bool` on this event
    /// is [`Evaluation::Error`].
    pub fn evaluate(&self, event: &RecordedEvent) -> Evaluation {
        let data = if self.uses_data {
            // The store never holds a larger payload; the check keeps the
            // work of parsing bounded even if a caller builds one.
            if event.data.len() > EVENT_DATA_BYTES_MAX {
                return Evaluation::Error(bounded_message(format_args!(
                    "payload is {} bytes, more than the maximum of {EVENT_DATA_BYTES_MAX}",
                    event.data.len()
                )));
            }
            match serde_json::from_slice::<Json<'_>>(&event.data) {
                Ok(Json(data)) => Some(data),
                Err(error) => return Evaluation::Error(bounded_message(format_args!("payload is not JSON: {error}"))),
            }
        } else {
            None
        };
        let variables = EventVariables { data, event };
        let mut context = Context::with_env(Arc::clone(&ENV));
        context.set_variable_resolver(&variables);

        let outcome = budget::run(FILTER_PREDICATE_COST_MAX, || match Value::resolve_val(&self.expr, &context) {
            Ok(value) => match value.downcast_ref::<CelBool>() {
                Some(boolean) if *boolean.inner() => Evaluation::Match,
                Some(_) => Evaluation::NoMatch,
                None => Evaluation::Error(bounded_message(format_args!(
                    "predicate evaluated to {}, not bool",
                    value.get_type().name()
                ))),
            },
            Err(error) => Evaluation::Error(bounded_message(format_args!("{error}"))),
        });
        match outcome {
            Ok(evaluation) => evaluation,
            Err(budget::Stop::Exhausted) => Evaluation::Error(bounded_message(format_args!(
                "predicate exceeded its cost budget of {FILTER_PREDICATE_COST_MAX} units on this event"
            ))),
            Err(budget::Stop::Panicked(message)) => {
                Evaluation::Error(bounded_message(format_args!("predicate evaluation panicked: {message}")))
            }
        }
    }
}

/// The variables of one evaluation, borrowed from the event (and its
/// parsed payload). Resolving them on demand spares building a map of all
/// of them for every event.
struct EventVariables<'a> {
    data: Option<Box<dyn Val + 'a>>,
    event: &'a RecordedEvent,
}

impl VariableResolver for EventVariables<'_> {
    fn resolve<'b>(&'b self, variable: &str) -> Option<CowVal<'b, 'b>> {
        match variable {
            VAR_DATA => self.data.as_deref().map(CowVal::Borrowed),
            VAR_STREAM => Some(CowVal::owned(CelString::from(self.event.stream.as_str()))),
            VAR_TYPE => Some(CowVal::owned(CelString::from(self.event.event_type.as_str()))),
            VAR_VERSION => Some(CowVal::Owned(integer(self.event.version))),
            VAR_POSITION => Some(CowVal::Owned(integer(self.event.position))),
            _ => None,
        }
    }
}

/// A `u64` as a CEL `int`, or a `uint` if it does not fit.
fn integer(value: u64) -> Box<dyn Val> {
    match i64::try_from(value) {
        Ok(value) => Box::new(CelInt::from(value)),
        Err(_) => Box::new(CelUInt::from(value)),
    }
}

// ---- compiling --------------------------------------------------------------

/// Functions the compiler inserts to charge the cost budget. Their names
/// start with `@`, which no identifier a user writes can.
const CHARGE_DEEP: &str = "@edgebus_charge";
const CHARGE_FLAT: &str = "@edgebus_charge_flat";
const CHARGE_RANGE: &str = "@edgebus_charge_range";
const CHARGE_STEP: &str = "@edgebus_charge_step";

/// The standard environment plus the budget charges; built once per process.
static ENV: LazyLock<Arc<Env>> = LazyLock::new(|| {
    let mut env = Env::stdlib();
    env.add_overload(CHARGE_DEEP, "edgebus_charge_dyn", vec![DYN_TYPE], budget::charge_deep)
        .expect("the charge functions are declared once");
    env.add_overload(CHARGE_FLAT, "edgebus_charge_flat_dyn", vec![DYN_TYPE], budget::charge_flat)
        .expect("the charge functions are declared once");
    env.add_overload(CHARGE_RANGE, "edgebus_charge_range_dyn_int", vec![DYN_TYPE, INT_TYPE], budget::charge_range)
        .expect("the charge functions are declared once");
    env.add_overload(CHARGE_STEP, "edgebus_charge_step_int", vec![INT_TYPE], budget::charge_step)
        .expect("the charge functions are declared once");
    Arc::new(env)
});

/// Parses, checks and instruments `source` on the current thread; the caller
/// runs it on a thread with a large stack.
fn compile_here(source: &str) -> Result<(IdedExpr, bool), FilterError> {
    let expr = ENV.parser().parse(source).map_err(|errors| FilterError::PredicateSyntax {
        predicate: source.to_owned(),
        message: compiler_message(&errors),
    })?;
    let mut shape = Shape { nodes: 0, id_max: 0 };
    shape.measure(&expr, 1)?;
    let mut uses_data = false;
    check(&expr, &mut Vec::new(), &mut uses_data)?;
    let expr = Instrumenter { id_next: shape.id_max + 1 }.expr(expr, &mut Vec::new());
    Ok((expr, uses_data))
}

/// The first of the compiler's errors (the rest are usually consequences),
/// at most [`MESSAGE_BYTES_MAX`] bytes.
fn compiler_message(errors: &ParseErrors) -> String {
    match errors.errors.as_slice() {
        [] => "unknown error".to_owned(),
        [first] => bounded_message(format_args!("{first}")),
        [first, rest @ ..] => bounded_message(format_args!("{first}\n(and {} more errors)", rest.len())),
    }
}

/// The direct subexpressions of `expr`.
fn children(expr: &IdedExpr) -> Vec<&IdedExpr> {
    match &expr.expr {
        Expr::Call(call) => call.target.as_deref().into_iter().chain(&call.args).collect(),
        Expr::Comprehension(comprehension) => vec![
            &comprehension.iter_range,
            &comprehension.accu_init,
            &comprehension.loop_cond,
            &comprehension.loop_step,
            &comprehension.result,
        ],
        Expr::List(list) => list.elements.iter().collect(),
        Expr::Map(map) => map.entries.iter().flat_map(|entry| entry_children(&entry.expr)).collect(),
        Expr::Struct(message) => message.entries.iter().flat_map(|entry| entry_children(&entry.expr)).collect(),
        Expr::Select(select) => vec![&select.operand],
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => Vec::new(),
    }
}

fn entry_children(entry: &EntryExpr) -> Vec<&IdedExpr> {
    match entry {
        EntryExpr::MapEntry(entry) => vec![&entry.key, &entry.value],
        EntryExpr::StructField(field) => vec![&field.value],
    }
}

/// Number of nodes of `expr`, itself included.
fn count_nodes(expr: &IdedExpr) -> usize {
    1 + children(expr).into_iter().map(count_nodes).sum::<usize>()
}

/// Size of a parsed expression, measured before anything recurses over it
/// without a bound.
struct Shape {
    nodes: usize,
    id_max: u64,
}

impl Shape {
    /// Stops at the first limit exceeded, so the recursion is at most
    /// [`FILTER_PREDICATE_DEPTH_MAX`] deep.
    fn measure(&mut self, expr: &IdedExpr, depth: usize) -> Result<(), FilterError> {
        if depth > FILTER_PREDICATE_DEPTH_MAX {
            return Err(FilterError::PredicateTooDeep { max_depth: FILTER_PREDICATE_DEPTH_MAX });
        }
        self.nodes += 1;
        if self.nodes > FILTER_PREDICATE_NODES_MAX {
            return Err(FilterError::PredicateTooComplex { max_nodes: FILTER_PREDICATE_NODES_MAX });
        }
        self.id_max = self.id_max.max(expr.id);
        children(expr).into_iter().try_for_each(|child| self.measure(child, depth + 1))
    }
}

/// Refuses what cannot work on any event: unknown variables, message
/// literals and malformed nodes. `scope` holds the variables of the
/// enclosing comprehensions; `uses_data` learns whether `data` is read.
fn check<'e>(expr: &'e IdedExpr, scope: &mut Vec<&'e str>, uses_data: &mut bool) -> Result<(), FilterError> {
    match &expr.expr {
        Expr::Unspecified => Err(FilterError::Unsupported { construct: "an unspecified expression".to_owned() }),
        Expr::Struct(message) => {
            let type_name = name_in_message(&message.type_name);
            Err(FilterError::Unsupported { construct: format!("a message literal `{type_name}{{...}}`") })
        }
        Expr::Map(map) => {
            if map.entries.iter().any(|entry| matches!(entry.expr, EntryExpr::StructField(_))) {
                return Err(FilterError::Unsupported { construct: "a message field in a map literal".to_owned() });
            }
            children(expr).into_iter().try_for_each(|child| check(child, scope, uses_data))
        }
        Expr::Ident(name) => check_name(expr, name, scope, uses_data),
        Expr::Select(_) => match qualified_root(expr) {
            // `a.b.c`: the root names a variable, or the whole a type.
            Some(root) => check_name(expr, root, scope, uses_data),
            None => children(expr).into_iter().try_for_each(|child| check(child, scope, uses_data)),
        },
        Expr::Call(call) => {
            // A target spelling a name that is no variable may be a function
            // namespace, as `optional` in `optional.none()`; the interpreter
            // resolves those, so only a target rooted at a variable is checked.
            if let Some(target) = &call.target {
                let namespace = qualified_root(target).is_some_and(|root| !is_variable(root, scope));
                if !namespace {
                    check(target, scope, uses_data)?;
                }
            }
            call.args.iter().try_for_each(|arg| check(arg, scope, uses_data))
        }
        Expr::Comprehension(comprehension) => {
            check(&comprehension.iter_range, scope, uses_data)?;
            check(&comprehension.accu_init, scope, uses_data)?;
            let scope_len = scope.len();
            scope.extend(comprehension_variables(comprehension));
            let body = [&comprehension.loop_cond, &comprehension.loop_step, &comprehension.result]
                .into_iter()
                .try_for_each(|part| check(part, scope, uses_data));
            scope.truncate(scope_len);
            body
        }
        Expr::List(_) | Expr::Literal(_) => {
            children(expr).into_iter().try_for_each(|child| check(child, scope, uses_data))
        }
    }
}

/// Checks that `root`, the first name of `expr` (an identifier or a chain of
/// selections on one), is a variable, or else that the interpreter resolves
/// `expr` without variables (a type name such as `int`).
fn check_name<'e>(
    expr: &'e IdedExpr,
    root: &'e str,
    scope: &[&'e str],
    uses_data: &mut bool,
) -> Result<(), FilterError> {
    if scope.contains(&root) {
        return Ok(());
    }
    if VARIABLES.contains(&root) {
        *uses_data |= root == VAR_DATA;
        return Ok(());
    }
    let context = Context::with_env(Arc::clone(&ENV));
    match Value::resolve(expr, &context) {
        Err(ExecutionError::UndeclaredReference(_)) => {
            Err(FilterError::UnknownVariable { name: name_in_message(root) })
        }
        _ => Ok(()),
    }
}

/// The first name of `expr` if it is an identifier or a chain of field
/// selections (not presence tests) on one: `a` for `a.b.c`.
fn qualified_root(expr: &IdedExpr) -> Option<&str> {
    let mut expr = expr;
    loop {
        match &expr.expr {
            Expr::Ident(name) => return Some(name),
            Expr::Select(select) if !select.test => expr = &select.operand,
            _ => return None,
        }
    }
}

fn is_variable(name: &str, scope: &[&str]) -> bool {
    scope.contains(&name) || VARIABLES.contains(&name)
}

fn comprehension_variables(comprehension: &ComprehensionExpr) -> impl Iterator<Item = &str> {
    [Some(comprehension.iter_var.as_str()), comprehension.iter_var2.as_deref(), Some(comprehension.accu_var.as_str())]
        .into_iter()
        .flatten()
}

/// Functions whose arguments are not charged: they take and return small
/// values (`bool`s, numbers, types) or only pass a value through.
const UNCHARGED_FUNCTIONS: [&str; 9] = [
    operators::LOGICAL_AND,
    operators::LOGICAL_OR,
    operators::LOGICAL_NOT,
    operators::CONDITIONAL,
    operators::NEGATE,
    operators::NOT_STRICTLY_FALSE,
    "type",
    "dyn",
    "has",
];

/// Inserts the budget charges into a checked expression (see [`budget`]):
///
/// - an argument (or receiver) of a function or operator is charged its
///   deep size before the call, as the call may read, compare or copy all of
///   it (`+`, `==`, `in`, `contains`, ...); `size` is charged the flat size
///   (it counts the characters of a string, but not the elements of a list);
///   `x[i]` charges the index, not the container; `x.?f` and `x[?i]` copy
///   what they find, so their result is charged;
/// - an element of a list or map literal is charged its deep size, as the
///   literal copies it;
/// - a comprehension charges, before it starts, the deep size of its range
///   (it copies each element into its variable) and, if it always visits
///   every element (`map`, `filter`, `exists_one`), the nodes of its body
///   times the number of elements; otherwise (`all`, `exists`, which stop
///   early) it charges the nodes of its body at every step.
///
/// Literals, comprehension accumulators and the small variables (`stream`,
/// `type`, `version`, `position`) are never charged.
struct Instrumenter {
    id_next: u64,
}

impl Instrumenter {
    fn expr(&mut self, expr: IdedExpr, scope: &mut Vec<String>) -> IdedExpr {
        let IdedExpr { id, expr } = expr;
        let expr = match expr {
            Expr::Call(call) => return self.call(id, call, scope),
            Expr::Comprehension(comprehension) => {
                Expr::Comprehension(Box::new(self.comprehension(*comprehension, scope)))
            }
            Expr::List(mut list) => {
                list.elements =
                    list.elements.into_iter().map(|element| self.charged(element, CHARGE_DEEP, scope)).collect();
                Expr::List(list)
            }
            Expr::Map(mut map) => {
                for entry in &mut map.entries {
                    if let EntryExpr::MapEntry(entry) = &mut entry.expr {
                        entry.key = self.charged(std::mem::take(&mut entry.key), CHARGE_DEEP, scope);
                        entry.value = self.charged(std::mem::take(&mut entry.value), CHARGE_DEEP, scope);
                    }
                }
                Expr::Map(map)
            }
            Expr::Select(mut select) => {
                // Selecting a field borrows it: nothing to charge.
                *select.operand = self.expr(std::mem::take(&mut *select.operand), scope);
                Expr::Select(select)
            }
            expr @ (Expr::Ident(_) | Expr::Literal(_) | Expr::Struct(_) | Expr::Unspecified) => expr,
        };
        IdedExpr { id, expr }
    }

    fn call(&mut self, id: u64, mut call: CallExpr, scope: &mut Vec<String>) -> IdedExpr {
        let name = call.func_name.as_str();
        let uncharged = UNCHARGED_FUNCTIONS.contains(&name);
        let charge = if name == "size" { CHARGE_FLAT } else { CHARGE_DEEP };
        let optional_access = name == operators::OPT_SELECT || name == operators::OPT_INDEX;
        let index = name == operators::INDEX || optional_access;

        if let Some(target) = call.target.take() {
            let names_namespace = qualified_root(&target).is_some_and(|root| !is_scoped_variable(root, scope));
            call.target = Some(Box::new(if names_namespace || uncharged {
                self.expr(*target, scope)
            } else {
                self.charged(*target, charge, scope)
            }));
        }
        call.args = call
            .args
            .into_iter()
            .enumerate()
            .map(|(i, arg)| {
                // `x[i]`, `x[?i]` and `x.?f` borrow from `x`; only the index
                // (a map key may be a long string) is charged.
                let container = index && i == 0;
                if uncharged || container { self.expr(arg, scope) } else { self.charged(arg, charge, scope) }
            })
            .collect();
        let call = IdedExpr { id, expr: Expr::Call(call) };
        if optional_access { self.wrap(call, CHARGE_DEEP, Vec::new()) } else { call }
    }

    fn comprehension(&mut self, mut comprehension: ComprehensionExpr, scope: &mut Vec<String>) -> ComprehensionExpr {
        let body_nodes = count_nodes(&comprehension.loop_cond) + count_nodes(&comprehension.loop_step);
        let body_units = i64::try_from(body_nodes).expect("bounded by FILTER_PREDICATE_NODES_MAX");
        let iter_range = self.expr(std::mem::take(&mut comprehension.iter_range), scope);
        comprehension.accu_init = self.expr(std::mem::take(&mut comprehension.accu_init), scope);

        let scope_len = scope.len();
        scope.extend(comprehension_variables(&comprehension).map(str::to_owned));
        let loop_cond = self.expr(std::mem::take(&mut comprehension.loop_cond), scope);
        comprehension.loop_step = self.expr(std::mem::take(&mut comprehension.loop_step), scope);
        comprehension.result = self.expr(std::mem::take(&mut comprehension.result), scope);
        scope.truncate(scope_len);

        // A literal condition (`true`) means the loop visits every element:
        // charge the whole loop up front. The interpreter builds `map` and
        // `filter` results in place only for such a literal condition, so it
        // must stay a literal.
        if matches!(loop_cond.expr, Expr::Literal(_)) {
            let units = self.int(body_units);
            comprehension.iter_range = self.wrap(iter_range, CHARGE_RANGE, vec![units]);
            comprehension.loop_cond = loop_cond;
        } else {
            let units = self.int(0);
            comprehension.iter_range = self.wrap(iter_range, CHARGE_RANGE, vec![units]);
            let units = self.int(body_units);
            let step = self.call_of(CHARGE_STEP, vec![units]);
            comprehension.loop_cond = self.call_of(operators::LOGICAL_AND, vec![step, loop_cond]);
        }
        comprehension
    }

    /// `expr`, instrumented, then charged with `charge` unless it is cheap
    /// by construction.
    fn charged(&mut self, expr: IdedExpr, charge: &str, scope: &mut Vec<String>) -> IdedExpr {
        let free = match &expr.expr {
            Expr::Literal(_) => true,
            // A list or map literal charges its own elements, and the
            // interpreter recognises `@result + [x]` only with a bare literal.
            Expr::List(_) | Expr::Map(_) => true,
            Expr::Ident(name) => name.starts_with('@') || is_small_variable(name, scope),
            _ => false,
        };
        let expr = self.expr(expr, scope);
        if free { expr } else { self.wrap(expr, charge, Vec::new()) }
    }

    fn wrap(&mut self, expr: IdedExpr, function: &str, mut extra_args: Vec<IdedExpr>) -> IdedExpr {
        extra_args.insert(0, expr);
        self.call_of(function, extra_args)
    }

    fn call_of(&mut self, function: &str, args: Vec<IdedExpr>) -> IdedExpr {
        IdedExpr { id: self.id(), expr: Expr::Call(CallExpr { func_name: function.to_owned(), target: None, args }) }
    }

    fn int(&mut self, value: i64) -> IdedExpr {
        IdedExpr { id: self.id(), expr: Expr::Literal(LiteralValue::Int(CelInt::from(value))) }
    }

    fn id(&mut self) -> u64 {
        self.id_next += 1;
        self.id_next - 1
    }
}

fn is_scoped_variable(name: &str, scope: &[String]) -> bool {
    scope.iter().any(|variable| variable == name) || VARIABLES.contains(&name)
}

/// `stream`, `type`, `version` and `position` are at most a few hundred
/// bytes, unless a comprehension variable hides them.
fn is_small_variable(name: &str, scope: &[String]) -> bool {
    name != VAR_DATA && VARIABLES.contains(&name) && !scope.iter().any(|variable| variable == name)
}

// ---- the cost budget --------------------------------------------------------

/// The cost budget of one evaluation.
///
/// The CEL interpreter has no budget or cancellation of its own, so the
/// compiler inserts calls to the charge functions below into the
/// expression ([`Instrumenter`]). Each charges the units the next operation
/// may cost against a per-thread counter, set by [`budget::run`] for the
/// length of one evaluation. A charge that exceeds what is left unwinds
/// with [`resume_unwind`](std::panic::resume_unwind) (which runs no panic
/// hook, so nothing is printed) straight out of the interpreter to
/// [`budget::run`], which reports [`budget::Stop::Exhausted`]. Stopping at once
/// matters: CEL's `||` and `&&` absorb errors, so a charge that merely
/// returned an error would let the rest of the expression run on.
///
/// Units: one per expression node run in a comprehension, one per list or
/// map element and per 64 bytes of string or bytes. A charge is paid before
/// the operation it covers, so no operation runs unpaid except the optional
/// accesses `x.?f` and `x[?i]`, paid right after their copy.
mod budget {
    use std::cell::Cell;
    use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};

    use cel::ExecutionError;
    use cel::common::types::{CelBool, CelBytes, CelInt, CelList, CelMap, CelOptional, CelString};
    use cel::common::value::{CowVal, Val};

    thread_local! {
        /// Units left to the evaluation running on this thread.
        static REMAINING: Cell<u64> = const { Cell::new(0) };
    }

    /// The unwind payload of an exhausted budget.
    struct Exhausted;

    /// Why an evaluation stopped before finishing.
    pub(super) enum Stop {
        /// It spent its whole budget.
        Exhausted,
        /// The interpreter panicked (a bug in it); the message says where.
        Panicked(String),
    }

    /// Runs `evaluation` with `units` to spend.
    ///
    /// A panic of the interpreter is caught too: a predicate comes from a
    /// client, and no predicate may take the node down.
    pub(super) fn run<R>(units: u64, evaluation: impl FnOnce() -> R) -> Result<R, Stop> {
        let outer = REMAINING.replace(units);
        // Unwind safety: everything the evaluation touches (its context and
        // values) is dropped by the caller right after, whatever happened.
        let result = catch_unwind(AssertUnwindSafe(evaluation));
        REMAINING.set(outer);
        result.map_err(|payload| {
            if payload.is::<Exhausted>() {
                Stop::Exhausted
            } else {
                Stop::Panicked(super::panic_message(payload.as_ref()))
            }
        })
    }

    /// Spends `units`, or stops the evaluation if fewer are left.
    fn spend(units: u64) {
        let remaining = REMAINING.get();
        if units > remaining {
            REMAINING.set(0);
            resume_unwind(Box::new(Exhausted));
        }
        REMAINING.set(remaining - units);
    }

    /// Units of `value` alone: 1, plus 1 per 64 bytes of a string or bytes.
    fn flat_units(value: &dyn Val) -> u64 {
        let bytes = if let Some(string) = value.downcast_ref::<CelString<'_>>() {
            string.inner().len()
        } else if let Some(bytes) = value.downcast_ref::<CelBytes<'_>>() {
            bytes.inner().len()
        } else {
            0
        };
        1 + bytes as u64 / 64
    }

    /// Adds the units of `value` and everything in it to `total`; false as
    /// soon as `total` exceeds `limit`, so the walk costs at most what is
    /// left of the budget. Recurses once per level of nesting: at most the
    /// JSON limit (128) plus the expression depth.
    fn add_deep_units(value: &dyn Val, limit: u64, total: &mut u64) -> bool {
        *total += flat_units(value);
        if *total > limit {
            return false;
        }
        if let Some(list) = value.downcast_ref::<CelList<'_>>() {
            list.inner().iter().all(|item| add_deep_units(item.as_ref(), limit, total))
        } else if let Some(map) = value.downcast_ref::<CelMap<'_>>() {
            map.inner().iter().all(|(key, item)| {
                add_deep_units(key.inner(), limit, total) && add_deep_units(item.as_ref(), limit, total)
            })
        } else if let Some(optional) = value.downcast_ref::<CelOptional<'_>>() {
            optional.inner().is_none_or(|inner| add_deep_units(inner, limit, total))
        } else {
            true
        }
    }

    fn spend_deep(value: &dyn Val, extra_units: u64) {
        let limit = REMAINING.get();
        let mut total = extra_units;
        let within = total <= limit && add_deep_units(value, limit, &mut total);
        spend(if within { total } else { u64::MAX });
    }

    fn single_arg<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
        let count = args.len();
        let mut args = args.into_iter();
        match (args.next(), args.next()) {
            (Some(value), None) => Ok(value),
            _ => Err(ExecutionError::invalid_argument_count(1, count)),
        }
    }

    fn int_arg(value: &dyn Val) -> Result<u64, ExecutionError> {
        value
            .downcast_ref::<CelInt>()
            .and_then(|units| u64::try_from(*units.inner()).ok())
            .ok_or_else(|| ExecutionError::function_error("charge", "units must be a non-negative int"))
    }

    /// `@edgebus_charge(x)`: charges the deep size of `x`, returns `x`.
    pub(super) fn charge_deep<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
        let value = single_arg(args)?;
        spend_deep(value.as_ref(), 0);
        Ok(value)
    }

    /// `@edgebus_charge_flat(x)`: charges the size of `x` alone, returns `x`.
    pub(super) fn charge_flat<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
        let value = single_arg(args)?;
        spend(flat_units(value.as_ref()));
        Ok(value)
    }

    /// `@edgebus_charge_range(range, units)`: charges the deep size of a
    /// comprehension's range plus `units` per element, returns the range.
    pub(super) fn charge_range<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
        let count = args.len();
        let mut args = args.into_iter();
        let (Some(range), Some(units), None) = (args.next(), args.next(), args.next()) else {
            return Err(ExecutionError::invalid_argument_count(2, count));
        };
        let units_per_element = int_arg(units.as_ref())?;
        let elements = range.as_sizer().map_or(0, |sizer| u64::try_from(*sizer.size().inner()).unwrap_or(0));
        spend_deep(range.as_ref(), elements.saturating_mul(units_per_element));
        Ok(range)
    }

    /// `@edgebus_charge_step(units)`: charges one step of a comprehension
    /// that may stop early, returns `true`.
    pub(super) fn charge_step<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
        let units = single_arg(args)?;
        spend(int_arg(units.as_ref())?);
        Ok(CowVal::Borrowed(&CelBool::TRUE))
    }

    #[cfg(test)]
    pub(super) fn remaining() -> u64 {
        REMAINING.get()
    }
}

// ---- JSON payloads ----------------------------------------------------------

/// A JSON value deserialised straight into CEL values, borrowing strings
/// from the payload where they have no escapes. Objects become maps (a
/// repeated key keeps its last value), arrays lists, integers `int` (`uint`
/// above `i64::MAX`), other numbers `double`. `serde_json` refuses nesting
/// deeper than 128 levels, which bounds the recursion here and in the
/// interpreter.
struct Json<'de>(Box<dyn Val + 'de>);

impl<'de> Deserialize<'de> for Json<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, value: bool) -> Result<Json<'de>, E> {
        Ok(Json(Box::new(CelBool::from(value))))
    }

    fn visit_i64<E>(self, value: i64) -> Result<Json<'de>, E> {
        Ok(Json(Box::new(CelInt::from(value))))
    }

    fn visit_u64<E>(self, value: u64) -> Result<Json<'de>, E> {
        Ok(Json(integer(value)))
    }

    fn visit_f64<E>(self, value: f64) -> Result<Json<'de>, E> {
        Ok(Json(Box::new(CelDouble::from(value))))
    }

    fn visit_borrowed_str<E>(self, value: &'de str) -> Result<Json<'de>, E> {
        Ok(Json(Box::new(CelString::from(value))))
    }

    fn visit_str<E>(self, value: &str) -> Result<Json<'de>, E> {
        Ok(Json(Box::new(CelString::from(value.to_owned()))))
    }

    fn visit_string<E>(self, value: String) -> Result<Json<'de>, E> {
        Ok(Json(Box::new(CelString::from(value))))
    }

    fn visit_unit<E>(self) -> Result<Json<'de>, E> {
        Ok(Json(Box::new(CelNull)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json<'de>, A::Error> {
        let mut items = Vec::new();
        while let Some(Json(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Json(Box::new(CelList::from(items))))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json<'de>, A::Error> {
        let mut entries = HashMap::new();
        while let Some(JsonKey(key)) = map.next_key()? {
            let Json(value) = map.next_value()?;
            entries.insert(key, value);
        }
        Ok(Json(Box::new(CelMap::from(entries))))
    }
}

/// A JSON object key as a CEL map key, borrowed where it has no escapes.
struct JsonKey<'de>(CelMapKey<'de>);

impl<'de> Deserialize<'de> for JsonKey<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(JsonKeyVisitor)
    }
}

struct JsonKeyVisitor;

impl<'de> Visitor<'de> for JsonKeyVisitor {
    type Value = JsonKey<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object key")
    }

    fn visit_borrowed_str<E>(self, value: &'de str) -> Result<JsonKey<'de>, E> {
        Ok(JsonKey(CelMapKey::from(value)))
    }

    fn visit_str<E>(self, value: &str) -> Result<JsonKey<'de>, E> {
        Ok(JsonKey(CelMapKey::from(value.to_owned())))
    }

    fn visit_string<E>(self, value: String) -> Result<JsonKey<'de>, E> {
        Ok(JsonKey(CelMapKey::from(value)))
    }
}

// ---- messages ---------------------------------------------------------------

/// Formats `args`, keeping at most [`MESSAGE_BYTES_MAX`] bytes and stopping
/// the formatting there: an interpreter error may print a whole value taken
/// from a 1 MiB payload.
fn bounded_message(args: fmt::Arguments<'_>) -> String {
    struct Bounded {
        text: String,
        truncated: bool,
    }

    impl fmt::Write for Bounded {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            let room = MESSAGE_BYTES_MAX - self.text.len();
            if s.len() <= room {
                self.text.push_str(s);
                return Ok(());
            }
            let mut cut = room;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            self.text.push_str(&s[..cut]);
            self.truncated = true;
            Err(fmt::Error)
        }
    }

    let mut bounded = Bounded { text: String::new(), truncated: false };
    // An error here is our own signal that the text is full.
    let _ = fmt::write(&mut bounded, args);
    if bounded.truncated {
        bounded.text.push_str("...");
    }
    bounded.text
}

/// `name`, cut to [`NAME_IN_MESSAGE_BYTES_MAX`] bytes (then ending in
/// `...`), to quote in a compile error.
fn name_in_message(name: &str) -> String {
    if name.len() <= NAME_IN_MESSAGE_BYTES_MAX {
        return name.to_owned();
    }
    let mut cut = NAME_IN_MESSAGE_BYTES_MAX;
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}...", &name[..cut])
}

/// The message of a panic payload.
fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(message) = payload.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = payload.downcast_ref::<String>() {
        message.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

#[cfg(test)]
mod tests;
