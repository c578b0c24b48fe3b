use std::time::{Duration, Instant};

use edgebus_store::AllFilter;
use edgebus_types::{EventId, NewEvent};
use proptest::prelude::*;

use super::*;

fn event_at(stream: &str, event_type: &str, data: &[u8], version: u64, position: u64) -> RecordedEvent {
    let stream = StreamName::system(stream).expect("valid stream name");
    let new = NewEvent {
        id: EventId::from_u128(u128::from(position) + 1),
        event_type: EventType::new(event_type).expect("valid event type"),
        data: data.to_vec(),
        metadata: Vec::new(),
        timestamp_ms: 0,
    };
    RecordedEvent::new(stream, version, position, new)
}

fn event(stream: &str, event_type: &str, data: &str) -> RecordedEvent {
    event_at(stream, event_type, data.as_bytes(), 0, 0)
}

fn predicate(source: &str) -> Predicate {
    Predicate::compile(source).unwrap_or_else(|error| panic!("{source:?} compiles: {error}"))
}

fn compile_error(source: &str) -> FilterError {
    Predicate::compile(source).expect_err("the predicate is refused")
}

fn evaluate(source: &str, data: &str) -> Evaluation {
    predicate(source).evaluate(&event("sensors.eu.1", "reading", data))
}

fn assert_error(evaluation: &Evaluation, needle: &str) {
    match evaluation {
        Evaluation::Error(message) => assert!(message.contains(needle), "{message:?} mentions {needle:?}"),
        other => panic!("expected an error mentioning {needle:?}, got {other:?}"),
    }
}

// ---- predicates -------------------------------------------------------------

#[test]
fn the_design_example_matches_on_temperature_and_site() {
    let source = r#"data.temp > 70 && data.site == "eu""#;
    assert_eq!(evaluate(source, r#"{"temp": 72, "site": "eu"}"#), Evaluation::Match);
    // A JSON double compares with the int literal.
    assert_eq!(evaluate(source, r#"{"temp": 70.5, "site": "eu"}"#), Evaluation::Match);
    assert_eq!(evaluate(source, r#"{"temp": 70, "site": "eu"}"#), Evaluation::NoMatch);
    assert_eq!(evaluate(source, r#"{"temp": 72, "site": "us"}"#), Evaluation::NoMatch);
    // `&&` absorbs an error on one side when the other is false, as CEL says.
    assert_eq!(evaluate(source, r#"{"temp": "hot", "site": "us"}"#), Evaluation::NoMatch);
    assert_eq!(evaluate(source, r#"{"temp": 72, "site": "eu", "extra": [1, {"a": null}]}"#), Evaluation::Match);
}

#[test]
fn missing_fields_type_mismatches_and_non_bool_results_are_counted_errors() {
    let source = r#"data.temp > 70 && data.site == "eu""#;
    assert_error(&evaluate(source, r#"{"site": "eu"}"#), "temp");
    assert_error(&evaluate(source, r#"{"temp": "hot", "site": "eu"}"#), "_>_");
    assert_error(&evaluate(source, "[72, 73]"), "");
    assert_error(&evaluate(source, "null"), "");
    assert_error(&evaluate("data.temp", r#"{"temp": 72}"#), "predicate evaluated to int, not bool");
    assert_error(&evaluate("data.temp / 0 > 1", r#"{"temp": 72}"#), "");

    // An error never matches.
    let filter = EventFilter { predicate: Some(predicate(source)), ..EventFilter::default() };
    assert!(!filter.matches(&event("sensors.eu.1", "reading", r#"{"site": "eu"}"#)));
    assert!(filter.matches(&event("sensors.eu.1", "reading", r#"{"temp": 80, "site": "eu"}"#)));
}

#[test]
fn a_payload_that_is_not_json_is_a_counted_error_not_a_panic() {
    let source = "data.temp > 70";
    for payload in [&b"not json"[..], b"", b"{\"temp\": 72", b"\xff\xfe\x00", b"{\"temp\": 72} trailing", b"NaN"] {
        let evaluation = predicate(source).evaluate(&event_at("s", "t", payload, 0, 0));
        assert_error(&evaluation, "payload is not JSON");
    }
    // Strings with escapes are copied, others borrowed: both work.
    assert_eq!(
        evaluate(r#"data.s == "a\"b" && data.t == "plain""#, r#"{"s": "a\"b", "t": "plain"}"#),
        Evaluation::Match
    );
    assert_eq!(evaluate(r#"data["k\"ey"] == 1"#, r#"{"k\"ey": 1}"#), Evaluation::Match);
}

#[test]
fn a_predicate_that_does_not_read_data_ignores_the_payload() {
    let event = event_at("orders.1", "OrderPlaced", b"\x00binary", 0, 0);
    assert_eq!(predicate(r#"type == "OrderPlaced""#).evaluate(&event), Evaluation::Match);
    assert_eq!(predicate(r#"type == "OrderShipped""#).evaluate(&event), Evaluation::NoMatch);
}

#[test]
fn the_event_envelope_is_visible() {
    let event = event_at("sensors.eu.7", "reading", b"{}", 3, 12);
    let source = r#"stream.startsWith("sensors.") && type == "reading" && version == 3 && position >= 10"#;
    assert_eq!(predicate(source).evaluate(&event), Evaluation::Match);
    assert_eq!(predicate("version == 4").evaluate(&event), Evaluation::NoMatch);
    // `type` is still the CEL function, and type names still resolve.
    assert_eq!(
        evaluate("type(data.temp) == int && type(data.site) == string", r#"{"temp": 1, "site": "eu"}"#),
        Evaluation::Match
    );
    // A comprehension variable may hide a variable.
    assert_eq!(evaluate(r#"data.types.exists(type, type == "x")"#, r#"{"types": ["a", "x"]}"#), Evaluation::Match);
}

#[test]
fn json_values_become_cel_values() {
    let payload = r#"{"i": -3, "u": 18446744073709551615, "d": 1.5, "b": true, "n": null, "s": "eu",
        "l": [1, "two", [3]], "m": {"k": {"deep": 1}}}"#;
    for source in [
        "data.i == -3 && type(data.i) == int",
        "data.u == 18446744073709551615u && type(data.u) == uint",
        "data.d == 1.5 && type(data.d) == double",
        "data.b",
        "data.n == null",
        r#"data.s in ["us", "eu"]"#,
        r#"size(data.l) == 3 && data.l[1] == "two" && data.l[2][0] == 3"#,
        "data.m.k.deep == 1 && has(data.m.k) && !has(data.m.x)",
        "data.?missing.orValue(7) == 7 && data.?i.orValue(0) == -3",
        "data.l.exists(x, x == 1) && data.l.all(x, x != 4) && data.l.exists_one(x, x == 1)",
        "data.l.filter(x, type(x) == int).map(x, x * 2) == [2]",
        r#""k" in data.m && size(data) == 8"#,
    ] {
        assert_eq!(evaluate(source, payload), Evaluation::Match, "{source}");
    }
}

// ---- the whole filter -------------------------------------------------------

#[test]
fn stream_type_system_and_predicate_combine() {
    let reading = EventType::new("reading").expect("valid");
    let alarm = EventType::new("alarm").expect("valid");
    let hot = Some(predicate("data.temp > 70"));
    let filters = [
        ("any", EventFilter::default()),
        (
            "exact",
            EventFilter {
                stream: StreamSelector::Exact(StreamName::new("sensors.eu.1").expect("valid")),
                ..EventFilter::default()
            },
        ),
        (
            "pattern",
            EventFilter {
                stream: StreamSelector::Pattern(StreamPattern::new("sensors.*.1").expect("valid")),
                ..EventFilter::default()
            },
        ),
        ("types", EventFilter { event_types: vec![reading.clone(), alarm.clone()], ..EventFilter::default() }),
        ("alarm", EventFilter { event_types: vec![alarm], ..EventFilter::default() }),
        ("hot", EventFilter { predicate: hot.clone(), ..EventFilter::default() }),
        (
            "pattern+type+hot",
            EventFilter {
                stream: StreamSelector::Pattern(StreamPattern::new("sensors.>").expect("valid")),
                event_types: vec![reading],
                predicate: hot,
                include_system: false,
            },
        ),
        ("system", EventFilter { include_system: true, ..EventFilter::default() }),
    ];
    let events = [
        ("eu1 hot", event("sensors.eu.1", "reading", r#"{"temp": 80}"#)),
        ("eu1 cold", event("sensors.eu.1", "reading", r#"{"temp": 20}"#)),
        ("us1 hot", event("sensors.us.1", "reading", r#"{"temp": 80}"#)),
        ("eu2 alarm", event("sensors.eu.2", "alarm", r#"{"temp": 99}"#)),
        ("orders", event("orders.1", "reading", "not json")),
        ("system", event("$sys.sensors", "reading", r#"{"temp": 80}"#)),
    ];
    #[rustfmt::skip]
    let expected: [(&str, [bool; 6]); 8] = [
        //                   eu1 hot eu1 cold us1 hot eu2 alarm orders system
        ("any",              [true,  true,    true,   true,     true,  false]),
        ("exact",            [true,  true,    false,  false,    false, false]),
        ("pattern",          [true,  true,    true,   false,    false, false]),
        ("types",            [true,  true,    true,   true,     true,  false]),
        ("alarm",            [false, false,   false,  true,     false, false]),
        ("hot",              [true,  false,   true,   true,     false, false]),
        ("pattern+type+hot", [true,  false,   true,   false,    false, false]),
        ("system",           [true,  true,    true,   true,     true,  true]),
    ];
    for ((name, filter), (expected_name, row)) in filters.iter().zip(expected) {
        assert_eq!(*name, expected_name);
        for ((event_name, event), want) in events.iter().zip(row) {
            assert_eq!(filter.matches(event), want, "filter {name} on event {event_name}");
        }
    }
    // The non-JSON payload is an error for a filter that reaches the
    // predicate, and never evaluated by one whose cheap checks fail.
    let hot = &filters[5].1;
    assert!(matches!(hot.evaluate(&events[4].1), Evaluation::Error(_)));
    assert_eq!(filters[6].1.evaluate(&events[4].1), Evaluation::NoMatch);
}

#[test]
fn system_streams_need_include_system_even_when_named() {
    let system = event("$sys.policies", "policy", "{}");
    let named = EventFilter {
        stream: StreamSelector::Exact(StreamName::system("$sys.policies").expect("valid")),
        ..EventFilter::default()
    };
    assert!(!named.matches(&system));
    assert!(EventFilter { include_system: true, ..named }.matches(&system));
}

#[test]
fn a_filter_lists_at_most_the_maximum_of_event_types() {
    let types = vec![EventType::new("t").expect("valid"); FILTER_EVENT_TYPES_MAX];
    assert!(EventFilter::new(StreamSelector::Any, types.clone(), None, false).is_ok());
    let mut too_many = types;
    too_many.push(EventType::new("u").expect("valid"));
    let error = EventFilter::new(StreamSelector::Any, too_many, None, false).expect_err("too many");
    assert_eq!(
        error,
        FilterError::TooManyEventTypes { count: FILTER_EVENT_TYPES_MAX + 1, max: FILTER_EVENT_TYPES_MAX }
    );
    assert_eq!(error.to_string(), "filter lists 65 event types, more than the maximum of 64");
}

// ---- compile-time refusals --------------------------------------------------

#[test]
fn a_predicate_that_does_not_compile_is_refused_with_the_compilers_message() {
    let error = compile_error("data.temp >");
    let FilterError::PredicateSyntax { predicate, message } = &error else { panic!("syntax error, got {error:?}") };
    assert_eq!(predicate, "data.temp >");
    assert!(message.contains("Syntax error"), "{message}");
    assert!(message.contains("| data.temp >"), "the message quotes the line: {message}");
    assert!(error.to_string().starts_with("payload predicate does not compile: ERROR: <input>:1:"), "{error}");

    for source in ["data.temp = 1", "(", "data.items.exists(1, true)", "'unterminated", "a b c"] {
        assert!(matches!(compile_error(source), FilterError::PredicateSyntax { .. }), "{source}");
    }
}

#[test]
fn sources_over_the_byte_limit_are_refused() {
    let padded = format!("true{}", " ".repeat(FILTER_PREDICATE_BYTES_MAX - 4));
    assert_eq!(predicate(&padded).evaluate(&event("s", "t", "{}")), Evaluation::Match);
    let too_long = format!("{padded} ");
    assert_eq!(
        compile_error(&too_long),
        FilterError::PredicateTooLong {
            len_bytes: FILTER_PREDICATE_BYTES_MAX + 1,
            max_bytes: FILTER_PREDICATE_BYTES_MAX
        }
    );
    assert_eq!(compile_error(&too_long).to_string(), "payload predicate is 4097 bytes, more than the maximum of 4096");
    assert_eq!(compile_error(""), FilterError::PredicateEmpty);
    assert_eq!(compile_error(" \n\t"), FilterError::PredicateEmpty);
}

#[test]
fn deep_or_large_expressions_are_refused() {
    // Left-deep chains the parser accepts at any length within the byte limit.
    for deep in [
        format!("1{} > 0", " + 1".repeat(200)),
        format!("data{} == 1", ".a".repeat(1000)),
        format!("data{} == 1", "[0]".repeat(500)),
    ] {
        assert_eq!(
            compile_error(&deep),
            FilterError::PredicateTooDeep { max_depth: FILTER_PREDICATE_DEPTH_MAX },
            "{deep:.40}"
        );
    }
    // The deepest chain the byte limit allows, on a thread with a small stack.
    let deepest = format!("version{}", "+1".repeat((FILTER_PREDICATE_BYTES_MAX - 7) / 2));
    let handle = std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(move || Predicate::compile(&deepest).map(|_| ()))
        .expect("thread starts");
    assert!(matches!(handle.join().expect("no overflow"), Err(FilterError::PredicateTooDeep { .. })));

    // Each macro expands to nine nodes.
    let wide = vec!["[].all(x,x)"; 300].join("&&");
    assert!(wide.len() <= FILTER_PREDICATE_BYTES_MAX);
    assert_eq!(compile_error(&wide), FilterError::PredicateTooComplex { max_nodes: FILTER_PREDICATE_NODES_MAX });
    // Parentheses: the parser's own recursion limit answers first.
    let nested = format!("{}true{}", "(".repeat(500), ")".repeat(500));
    assert!(matches!(compile_error(&nested), FilterError::PredicateSyntax { .. }));
    // A balanced chain of `||` stays shallow.
    let ors = (0..100).map(|i| format!("version == {i}")).collect::<Vec<_>>().join(" || ");
    predicate(&ors);
}

#[test]
fn the_deepest_predicate_evaluates_on_a_small_stack() {
    // Every `+` operand is charged, so the instrumented tree is deeper still.
    let chain = |terms: usize| format!("[{}].exists(x, x > 0)", vec!["data.n"; terms].join(" + "));
    let deepest = (1..FILTER_PREDICATE_DEPTH_MAX).rev().find_map(|terms| Predicate::compile(&chain(terms)).ok());
    let deepest = deepest.expect("some chain fits");
    // A tokio worker thread has 2 MiB.
    let handle = std::thread::Builder::new()
        .stack_size(2 * 1024 * 1024)
        .spawn(move || deepest.evaluate(&event("s", "t", r#"{"n": 1}"#)))
        .expect("thread starts");
    assert_eq!(handle.join().expect("no overflow"), Evaluation::Match);
}

#[test]
fn unknown_variables_and_message_literals_are_refused() {
    assert_eq!(compile_error("dat.temp > 70"), FilterError::UnknownVariable { name: "dat".to_owned() });
    assert_eq!(compile_error("temp > 70"), FilterError::UnknownVariable { name: "temp".to_owned() });
    assert_eq!(compile_error("data.items.exists(i, j > 1)"), FilterError::UnknownVariable { name: "j".to_owned() });
    assert_eq!(
        compile_error("x > 1").to_string(),
        "payload predicate refers to unknown variable `x`; a predicate sees data (the JSON payload), stream, type, \
         version and position"
    );
    assert!(matches!(compile_error("Reading{temp: 1} == data"), FilterError::Unsupported { .. }));
    // Names the interpreter resolves without variables are fine.
    predicate("type(data) == map && optional.none() == optional.none()");
}

/// Found by fuzzing: an unknown identifier or message type name as long
/// as the source (4 KiB) was quoted whole, making a 4 KiB error message.
#[test]
fn long_unknown_names_are_quoted_cut_short() {
    let long = "z".repeat(4000);
    let error = compile_error(&format!("{long} == 1"));
    assert_eq!(error, FilterError::UnknownVariable { name: format!("{}...", "z".repeat(128)) });
    assert!(error.to_string().len() < 400, "{error}");
    let error = compile_error(&format!("{}{{a: 1}} == data", "M".repeat(4000)));
    assert!(matches!(error, FilterError::Unsupported { .. }), "{error}");
    assert!(error.to_string().len() < 400, "{error}");
    assert!(error.to_string().contains(&format!("`{}...{{...}}`", "M".repeat(128))), "{error}");
    // Names are cut on a character boundary.
    assert_eq!(name_in_message(&"é".repeat(100)), format!("{}...", "é".repeat(64)));
    assert_eq!(name_in_message("short"), "short");
}

// ---- the cost budget --------------------------------------------------------

/// `leaf op leaf op ...`, `leaves` times, as a balanced tree: a left-deep
/// chain would be refused as too deep.
fn balanced(leaves: usize, leaf: &str, op: &str) -> String {
    if leaves <= 1 {
        return leaf.to_owned();
    }
    format!("({} {op} {})", balanced(leaves / 2, leaf, op), balanced(leaves - leaves / 2, leaf, op))
}

/// `{"l": [0, ...], "s": "xxx..."}`: `elements` zeros and ten times as many x.
fn list_payload(elements: usize) -> String {
    format!(r#"{{"l": [{}0], "s": "{}"}}"#, "0,".repeat(elements - 1), "x".repeat(10 * elements))
}

#[test]
fn costly_evaluations_stop_at_the_budget() {
    let payload = list_payload(10_000);
    for source in [
        // Quadratic: 10k x 10k steps.
        "data.l.all(x, data.l.all(y, true))",
        "data.l.exists(x, data.l.exists(y, x == 1))",
        "size(data.l.map(x, data.l)) > 0",
        // Copies growing with every `+`.
        &format!("size({}) > 0", balanced(256, "data.s", "+")),
        &format!("size({}) > 0", balanced(256, "data.l", "+")),
        &format!("size([{}]) > 0", "data.l,".repeat(500)),
        // Copies of an optional access, paid right after.
        &balanced(128, "data.?l.hasValue()", "&&"),
        // Comparisons that read whole lists.
        &(0..150).map(|_| "data.l != data.l").collect::<Vec<_>>().join(" || "),
    ] {
        let started = Instant::now();
        let evaluation = evaluate(source, &payload);
        assert_error(&evaluation, "cost budget");
        println!("budget stop after {:?}: {source:.60}", started.elapsed());
        assert_eq!(budget::remaining(), 0, "the budget does not outlive the evaluation");
    }
}

#[test]
fn ordinary_comprehensions_fit_the_budget() {
    let items = (0..5_000).map(|i| format!(r#"{{"sku": "s{i}", "price": {i}}}"#)).collect::<Vec<_>>().join(",");
    let payload = format!(r#"{{"items": [{items}]}}"#);
    assert_eq!(evaluate("data.items.exists(i, i.price > 4998)", &payload), Evaluation::Match);
    assert_eq!(evaluate(r#"data.items.all(i, i.sku.startsWith("s"))"#, &payload), Evaluation::Match);
    assert_eq!(evaluate("size(data.items.filter(i, i.price % 2 == 0)) == 2500", &payload), Evaluation::Match);
    assert_eq!(evaluate("data.items.map(i, i.price).exists(p, p == 0)", &payload), Evaluation::Match);
}

#[test]
fn json_nesting_is_bounded_by_the_parser() {
    let nested = |depth: usize| format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
    assert_eq!(evaluate("size(data) == 1", &nested(100)), Evaluation::Match);
    assert_error(&evaluate("size(data) == 1", &nested(10_000)), "recursion limit exceeded");
}

#[test]
fn error_messages_are_bounded() {
    // The interpreter prints both values of a failed comparison.
    let evaluation = evaluate("data.l < data.s", &list_payload(50_000));
    let Evaluation::Error(message) = evaluation else { panic!("an error") };
    assert!(message.len() <= MESSAGE_BYTES_MAX + 3, "{} bytes", message.len());
}

// ---- properties -------------------------------------------------------------

/// Pieces of CEL, so that random sources often parse and reach evaluation.
fn cel_source() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("data".to_owned()),
        Just("data.temp".to_owned()),
        Just("data.l".to_owned()),
        Just("data.s".to_owned()),
        Just("data.m.k".to_owned()),
        Just("stream".to_owned()),
        Just("type".to_owned()),
        Just("version".to_owned()),
        Just("position".to_owned()),
        Just("x".to_owned()),
        any::<i64>().prop_map(|i| i.to_string()),
        any::<u64>().prop_map(|u| format!("{u}u")),
        any::<f64>().prop_map(|d| format!("{d:?}")),
        "[a-z]{0,4}".prop_map(|s| format!("{s:?}")),
        Just("null".to_owned()),
        Just("true".to_owned()),
        Just("[]".to_owned()),
        Just("{}".to_owned()),
    ];
    leaf.prop_recursive(5, 48, 4, |inner| {
        prop_oneof![
            (
                inner.clone(),
                prop::sample::select(vec!["+", "-", "*", "/", "%", "==", "!=", "<", ">=", "&&", "||", "in"]),
                inner.clone()
            )
                .prop_map(|(a, op, b)| format!("({a} {op} {b})")),
            (prop::sample::select(vec!["!", "-", "size", "type", "int", "string", "dyn", "has"]), inner.clone())
                .prop_map(|(f, a)| if f == "!" || f == "-" { format!("{f}{a}") } else { format!("{f}({a})") }),
            (inner.clone(), prop::sample::select(vec!["all", "exists", "exists_one", "map", "filter"]), inner.clone())
                .prop_map(|(range, m, body)| format!("{range}.{m}(x, {body})")),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("{a}[{b}]")),
            (inner.clone(), "[a-z]{1,3}").prop_map(|(a, f)| format!("{a}.{f}")),
            (inner.clone(), "[a-z]{1,3}").prop_map(|(a, f)| format!("{a}.?{f}")),
            (inner.clone(), prop::sample::select(vec!["contains", "startsWith", "endsWith", "size"]), inner.clone())
                .prop_map(|(a, f, b)| format!("{a}.{f}({b})")),
            (inner.clone(), inner.clone(), inner.clone()).prop_map(|(c, a, b)| format!("{c} ? {a} : {b}")),
            prop::collection::vec(inner.clone(), 0..4).prop_map(|items| format!("[{}]", items.join(", "))),
            (inner.clone(), inner.clone()).prop_map(|(k, v)| format!("{{{k}: {v}}}")),
        ]
    })
}

fn json_payload() -> impl Strategy<Value = Vec<u8>> {
    let leaf = prop_oneof![
        Just("null".to_owned()),
        any::<bool>().prop_map(|b| b.to_string()),
        any::<i64>().prop_map(|i| i.to_string()),
        any::<f64>().prop_filter("JSON has no NaN or infinity", |d| d.is_finite()).prop_map(|d| format!("{d:?}")),
        ".{0,8}".prop_map(|s| serde_json::to_string(&s).expect("strings serialise")),
    ];
    let json = leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(|items| format!("[{}]", items.join(","))),
            prop::collection::vec((prop::sample::select(vec!["temp", "l", "s", "m", "k", "x"]), inner), 0..6).prop_map(
                |entries| {
                    let entries = entries.iter().map(|(k, v)| format!("{k:?}:{v}")).collect::<Vec<_>>();
                    format!("{{{}}}", entries.join(","))
                }
            ),
        ]
    });
    prop_oneof![json.prop_map(String::into_bytes), prop::collection::vec(any::<u8>(), 0..64)]
}

/// Far above any real evaluation; only a hang or a runaway loop reaches it.
const EVALUATION_HANG_GUARD: Duration = Duration::from_secs(10);

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_predicates_and_payloads_never_panic(
        source in prop_oneof![cel_source(), ".{0,64}", "[a-z.()\\[\\]!<>=&|?: ,0-9\"']{0,64}"],
        payloads in prop::collection::vec(json_payload(), 1..4),
    ) {
        let Ok(predicate) = Predicate::compile(&source) else { return Ok(()) };
        for payload in payloads {
            let event = event_at("sensors.eu.1", "reading", &payload, 1, 2);
            let started = Instant::now();
            let evaluation = predicate.evaluate(&event);
            prop_assert!(started.elapsed() < EVALUATION_HANG_GUARD, "{source:?} took {:?}", started.elapsed());
            if let Evaluation::Error(message) = &evaluation {
                prop_assert!(!message.contains("panicked"), "{source:?} on {payload:?}: {message}");
                prop_assert!(message.len() <= MESSAGE_BYTES_MAX + 3);
            }
            prop_assert_eq!(budget::remaining(), 0);
        }
    }

    /// Without a predicate, the filter passes exactly what the store's `$all`
    /// filter passes, so catch-up and live delivery agree.
    #[test]
    fn without_a_predicate_the_filter_agrees_with_the_stores(
        stream in prop::sample::select(vec!["a.b", "a.c", "b.b", "a.b.c", "$sys.a", "$sys.b.c"]),
        event_type in prop::sample::select(vec!["x", "y", "z"]),
        selector in 0..3usize,
        name in prop::sample::select(vec!["a.b", "$sys.a", "b.b"]),
        pattern in prop::sample::select(vec!["a.*", "a.>", "*.b", "$sys.>", ">"]),
        types in prop::collection::vec(prop::sample::select(vec!["x", "y"]), 0..3),
        include_system: bool,
    ) {
        let event_types: Vec<EventType> = types.iter().map(|t| EventType::new(t).expect("valid")).collect();
        let (selector, store_stream) = match selector {
            0 => (StreamSelector::Any, None),
            1 => {
                let name = StreamName::system(name).expect("valid");
                (StreamSelector::Exact(name.clone()), Some(StreamPattern::literal(&name)))
            }
            _ => {
                let pattern = StreamPattern::new(pattern).expect("valid");
                (StreamSelector::Pattern(pattern.clone()), Some(pattern))
            }
        };
        let ours = EventFilter { stream: selector, event_types: event_types.clone(), predicate: None, include_system };
        let store = AllFilter { stream: store_stream, event_types, include_system };
        let event = event(stream, event_type, "{}");
        prop_assert_eq!(ours.matches(&event), store.matches(&event));
    }
}

// ---- cost -------------------------------------------------------------------

/// Prints what one evaluation costs; asserts nothing about time. Run by
/// hand for figures: `cargo test --release -p edgebus-server evaluation_cost
/// -- --nocapture --test-threads 1`.
#[test]
fn evaluation_cost() {
    let small = r#"{"temp": 72, "site": "eu"}"#.to_owned();
    let padded = format!(r#"{{"temp": 72, "site": "eu", "pad": "{}"}}"#, "x".repeat(1000));
    let items = (0..20).map(|i| format!(r#"{{"price": {i}}}"#)).collect::<Vec<_>>().join(",");
    let items = format!(r#"{{"items": [{items}]}}"#);
    let example = r#"data.temp > 70 && data.site == "eu""#;
    let cases = [
        ("no predicate", None, &small),
        ("type only", Some(r#"type == "reading""#), &small),
        ("design example", Some(example), &small),
        ("design example, 1 KiB payload", Some(example), &padded),
        ("exists over 20 items", Some("data.items.exists(i, i.price > 18)"), &items),
    ];
    let iterations = 2_000u32;
    for (name, source, payload) in cases {
        let filter = EventFilter { predicate: source.map(predicate), ..EventFilter::default() };
        let event = event("sensors.eu.1", "reading", payload);
        assert!(filter.matches(&event), "{name}");
        let started = Instant::now();
        for _ in 0..iterations {
            std::hint::black_box(filter.evaluate(std::hint::black_box(&event)));
        }
        println!("{name}: {:?} per evaluation", started.elapsed() / iterations);
    }
    let largest = (0..250).map(|i| format!("data.p{i} > {i}")).collect::<Vec<_>>().join(" || ");
    for (name, source) in [("compile the design example", example), ("compile a 4 KiB predicate", &largest[..4000])] {
        let source = source.rsplit_once(" ||").map_or(source, |(head, _)| head);
        let started = Instant::now();
        predicate(source);
        println!("{name} ({} bytes): {:?}", source.len(), started.elapsed());
    }
}

// ---- fuzzing ----------------------------------------------------------------

/// Sources an attacker or a careless client might send: arbitrary text,
/// runaway nesting, long identifiers, huge numbers, odd literals, macros
/// nested in macros, and valid predicates with a character changed.
fn hostile_source() -> impl Strategy<Value = String> {
    let atom = prop::sample::select(vec!["true", "data", "data.a", "1", "'s'", "[]", "{}", "x", "null", ""]);
    prop_oneof![
        // Arbitrary text, printable or not.
        any::<String>(),
        "\\PC{0,300}",
        prop::collection::vec(any::<char>(), 0..64).prop_map(|chars| chars.into_iter().collect()),
        // Nesting, balanced or not, around the parser's and our limits.
        (1usize..2200, atom.clone()).prop_map(|(n, a)| format!("{}{a}{}", "(".repeat(n), ")".repeat(n))),
        (1usize..2200, atom.clone()).prop_map(|(n, a)| format!("{}{a}", "(".repeat(n))),
        (1usize..1400, atom.clone()).prop_map(|(n, a)| format!("{}{a}{}", "[".repeat(n), "]".repeat(n))),
        (1usize..800, atom.clone()).prop_map(|(n, a)| format!("{}{a}{}", "{1:".repeat(n), "}".repeat(n))),
        (1usize..4000, atom.clone()).prop_map(|(n, a)| format!("{}{a}", "!".repeat(n))),
        (1usize..4000).prop_map(|n| format!("{}1", "-".repeat(n))),
        (1usize..1300).prop_map(|n| format!("1{}", " + 1".repeat(n))),
        (1usize..1000).prop_map(|n| format!("true{}", " ? true : false".repeat(n))),
        (1usize..60, prop::sample::select(vec!["all", "exists", "exists_one", "map", "filter"]))
            .prop_map(|(n, m)| { format!("{}true{}", format!("data.l.{m}(x, ").repeat(n), ")".repeat(n)) }),
        // Long identifiers and field chains, under and over the byte limit.
        (1usize..5000).prop_map(|n| format!("data.{} == 1", "a".repeat(n))),
        (1usize..5000).prop_map(|n| format!("{} == 1", "z".repeat(n))),
        (1usize..5000).prop_map(|n| format!("{}{{a: 1}} == data", "M".repeat(n))),
        (1usize..2500).prop_map(|n| format!("data{}", ".a".repeat(n))),
        // Huge and odd numbers.
        "[0-9]{19,400}".prop_map(|digits| format!("data.n == {digits}")),
        "[0-9]{19,400}".prop_map(|digits| format!("data.n == {digits}u")),
        "[0-9]{1,400}".prop_map(|digits| format!("data.n < 0x{digits}")),
        "[0-9]{1,5}".prop_map(|exp| format!("data.n > 1e{exp} || data.n < -1e-{exp}")),
        Just("-9223372036854775808 == data.n".to_owned()),
        Just("-9223372036854775809 < data.n".to_owned()),
        Just("18446744073709551616u > 1u".to_owned()),
        Just("9223372036854775807 + 1 > 0".to_owned()),
        Just("-9223372036854775808 / -1 > 0".to_owned()),
        Just("-9223372036854775808 % -1 == 0".to_owned()),
        Just("int(1e300) > 0".to_owned()),
        Just("uint(-1) > 0u".to_owned()),
        // Odd literals and escapes.
        "[\\\\'\"rRbBu{}xU0-9a-f]{0,40}".prop_map(|s| format!("data.s == '{s}'")),
        "[\\\\'\"a-z]{0,40}".prop_map(|s| format!("data.s == r\"{s}\"")),
        "[\\\\'\"a-z\n]{0,40}".prop_map(|s| format!("data.s == '''{s}'''")),
        Just(r#"data.s == "\U0010FFFF\u0000\x00\377""#.to_owned()),
        Just(r#"data.s == "\uD800""#.to_owned()),
        Just(r#"b"\xff\xfe" == bytes(data.s)"#.to_owned()),
        Just("data.s.size() > 1 && size(b'') == 0".to_owned()),
        // Macros used wrongly.
        Just("has(data)".to_owned()),
        Just("has(1)".to_owned()),
        Just("data.l.exists(x)".to_owned()),
        Just("data.l.all(x, y, z, true)".to_owned()),
        Just("data.l.map(1, 2)".to_owned()),
        Just("[1, 2].exists(data, data > 1)".to_owned()),
        Just("data.l.exists(x, x.exists(y, y))".to_owned()),
        // Valid predicates with one character changed.
        (cel_source(), any::<prop::sample::Index>(), any::<char>()).prop_map(|(source, at, c)| {
            let mut chars: Vec<char> = source.chars().collect();
            let at = at.index(chars.len() + 1);
            chars.insert(at, c);
            chars.into_iter().collect()
        }),
    ]
}

/// Valid predicates that between them read every kind of value.
const FUZZ_PREDICATES: [&str; 12] = [
    r#"data.temp > 70 && data.site == "eu""#,
    "has(data.alarm) || data.l.exists(x, x == 1)",
    "size(data) > 2",
    "data.l.all(x, type(x) == int && x >= 0)",
    r#"data.s.startsWith("a") || data.s.contains("\u00e9")"#,
    "data.m.k.deep == 1 || data.?m.?k.orValue(0) != 0",
    "data.l.map(x, x * 2).filter(y, y > 10).size() > 0",
    "string(data.n) + string(data.temp) != ''",
    "data.n / data.d > 1.0",
    "data.u == 18446744073709551615u || data.i == -9223372036854775808",
    "data == {} || data == [] || data == null",
    r#"type == "reading" && stream.startsWith("sensors.") && version < position"#,
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, max_shrink_iters: 512, ..ProptestConfig::default() })]

    /// Compiling never panics or hangs; it succeeds or refuses with a
    /// short, non-empty message.
    #[test]
    fn compiling_hostile_sources_refuses_with_a_short_message(source in hostile_source()) {
        let started = Instant::now();
        let compiled = Predicate::compile(&source);
        prop_assert!(started.elapsed() < EVALUATION_HANG_GUARD, "compiling took {:?}", started.elapsed());
        match compiled {
            Ok(predicate) => {
                // Whatever compiled also evaluates without a panic.
                let evaluation = predicate.evaluate(&event("sensors.eu.1", "reading", r#"{"l": [1, 2], "s": "x"}"#));
                if let Evaluation::Error(message) = &evaluation {
                    prop_assert!(!message.contains("panicked"), "{source:?}: {message}");
                }
            }
            Err(error) => {
                prop_assert!(!matches!(error, FilterError::CompilerFailed { .. }), "{source:?}: {error}");
                let message = error.to_string();
                prop_assert!(!message.trim().is_empty(), "{source:?}");
                prop_assert!(message.len() <= MESSAGE_BYTES_MAX + 256, "{} bytes for {source:.80?}: {message:.200}", message.len());
            }
        }
    }

    /// Evaluating valid predicates on arbitrary payloads never panics and
    /// always answers one of the three outcomes, with a short error.
    #[test]
    fn valid_predicates_on_arbitrary_payloads_never_panic(
        payload in json_payload(),
        predicate_index in 0..FUZZ_PREDICATES.len(),
    ) {
        let source = FUZZ_PREDICATES[predicate_index];
        let predicate = predicate(source);
        let event = event_at("sensors.eu.1", "reading", &payload, 3, 7);
        let started = Instant::now();
        let evaluation = predicate.evaluate(&event);
        prop_assert!(started.elapsed() < EVALUATION_HANG_GUARD, "{source:?} took {:?}", started.elapsed());
        match &evaluation {
            Evaluation::Match | Evaluation::NoMatch => {}
            Evaluation::Error(message) => {
                prop_assert!(!message.is_empty(), "{source:?}");
                prop_assert!(!message.contains("panicked"), "{source:?} on {payload:?}: {message}");
                prop_assert!(message.len() <= MESSAGE_BYTES_MAX + 3);
            }
        }
        prop_assert_eq!(budget::remaining(), 0);
    }
}
