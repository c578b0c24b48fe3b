//! `AppendStream`: many appends in flight over one gRPC stream, each
//! answered by its correlation number exactly as `Append` answers it; and
//! the client, which sends every append of a connection over one such
//! stream, across a node's restart.

use std::time::Duration;

use edgebus_client::Client;
use edgebus_proto::convert::{self, AppendArgs};
use edgebus_proto::v1;
use edgebus_proto::v1::append_stream_response::Result as Answer;
use edgebus_store::{Direction, StreamFrom};
use edgebus_types::{ExpectedVersion, NewEvent, StreamName};
use tokio_stream::wrappers::ReceiverStream;

use crate::node::Node;
use crate::node_serve::{connect, event};

/// Longest wait for one answer.
const ANSWER_DEADLINE: Duration = Duration::from_secs(30);

fn request(
    correlation: u64,
    stream: &StreamName,
    expected: ExpectedVersion,
    events: Vec<NewEvent>,
) -> v1::AppendStreamRequest {
    let append = v1::AppendRequest::from(AppendArgs { stream: stream.clone(), expected, events });
    v1::AppendStreamRequest { correlation, append: Some(append) }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

async fn next_answer(answers: &mut tonic::Streaming<v1::AppendStreamResponse>) -> v1::AppendStreamResponse {
    let message = tokio::time::timeout(ANSWER_DEADLINE, answers.message()).await;
    message.expect("answered in time").expect("stream intact").expect("an answer")
}

#[test]
fn each_request_is_answered_by_its_correlation_as_append_answers() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("data"));
    let stream = StreamName::new("notes.s-1").unwrap();
    runtime().block_on(async {
        let mut client = connect(node.grpc).await;
        let (requests, outbound) = tokio::sync::mpsc::channel(16);
        let mut answers = client.append_stream(ReceiverStream::new(outbound)).await.expect("stream opens").into_inner();

        requests
            .send(request(7, &stream, ExpectedVersion::NoStream, vec![event(1, "a"), event(2, "b")]))
            .await
            .unwrap();
        let first = next_answer(&mut answers).await;
        assert_eq!(first.correlation, 7);
        let Some(Answer::Appended(appended)) = first.result else { panic!("appended: {first:?}") };
        assert_eq!((appended.first_version, appended.count, appended.already_written), (0, 2, false));

        // Three refusals and a retry in flight together; each answered by number.
        requests.send(v1::AppendStreamRequest { correlation: 8, append: None }).await.unwrap();
        requests.send(request(9, &stream, ExpectedVersion::NoStream, vec![event(3, "c")])).await.unwrap();
        let mut bad_name = request(10, &stream, ExpectedVersion::Any, vec![event(4, "d")]);
        bad_name.append.as_mut().unwrap().stream = "bad name".into();
        requests.send(bad_name).await.unwrap();
        requests
            .send(request(11, &stream, ExpectedVersion::NoStream, vec![event(1, "a"), event(2, "b")]))
            .await
            .unwrap();
        let mut by_number = std::collections::BTreeMap::new();
        for _ in 0..4 {
            let answer = next_answer(&mut answers).await;
            by_number.insert(answer.correlation, answer.result.expect("a result"));
        }
        assert_eq!(by_number.keys().copied().collect::<Vec<_>>(), [8, 9, 10, 11], "one answer per request");
        let error = |n: u64| match &by_number[&n] {
            Answer::Error(detail) => detail.clone(),
            other => panic!("request {n} refused, got {other:?}"),
        };
        assert_eq!((error(8).code, error(8).field.as_str()), (v1::ErrorCode::InvalidArgument as u32, "append"));
        assert_eq!((error(9).code, error(9).current), (v1::ErrorCode::WrongExpectedVersion as u32, Some(1)));
        assert!(error(10).field.contains("stream"), "the bad name's field is named: {:?}", error(10));
        match &by_number[&11] {
            Answer::Appended(retry) => assert!(retry.already_written, "an idempotent retry writes nothing: {retry:?}"),
            other => panic!("the retry is answered as the original, got {other:?}"),
        }

        // The client finishes sending: the node answers nothing more and ends the stream.
        drop(requests);
        let end = tokio::time::timeout(ANSWER_DEADLINE, answers.message()).await.expect("ends in time");
        assert!(matches!(end, Ok(None)), "the stream ends after the last answer: {end:?}");

        let read = edgebus_proto::v1::ReadStreamRequest::from(convert::ReadStreamArgs {
            stream: stream.clone(),
            from: StreamFrom::Start,
            direction: Direction::Forward,
            max_count: 10,
        });
        let events = convert::read_stream_events(client.read_stream(read).await.unwrap().into_inner()).unwrap();
        let data: Vec<&[u8]> = events.iter().map(|e| e.data.as_slice()).collect();
        assert_eq!(data, [b"a".as_slice(), b"b"], "only the accepted append was written, once");
    });
    node.stop();
}

/// Many appends of one client (and its clones) in flight at once all land;
/// the node stops with the client's stream open and drains; a node started
/// again on the same address takes the same client's appends again.
#[test]
fn a_client_appends_concurrently_over_its_stream_and_across_a_restart() {
    const TASKS: u128 = 32;
    const APPENDS: u128 = 25;
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let node = Node::start(&data_dir);
    let grpc = node.grpc;
    let runtime = runtime();
    let client = runtime.block_on(Client::connect(&grpc.to_string())).expect("connect");
    let streams: Vec<StreamName> = (0..4).map(|i| StreamName::new(&format!("notes.c-{i}")).unwrap()).collect();
    runtime.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for task in 0..TASKS {
            let (client, stream) = (client.clone(), streams[task as usize % streams.len()].clone());
            tasks.spawn(async move {
                for n in 0..APPENDS {
                    let id = task * 1000 + n + 1;
                    client.append(stream.clone(), ExpectedVersion::Any, vec![event(id, "x")]).await.expect("appended");
                }
            });
        }
        let joined = tokio::time::timeout(ANSWER_DEADLINE, tasks.join_all()).await;
        assert!(joined.is_ok(), "every append answered in time");
        for stream in &streams {
            let info = client.stream_info(stream.clone()).await.unwrap().expect("the stream exists");
            assert_eq!(info.current_version, Some((TASKS * APPENDS / 4 - 1) as u64), "{stream}: every append once");
        }
    });
    // Stops (SIGTERM, bounded wait) while the client's stream is still open.
    node.stop();

    let address = format!("127.0.0.1:{}", grpc.port());
    let args = ["--grpc-listen", &address, "--http-listen", "127.0.0.1:0", "--data-dir", data_dir.to_str().unwrap()];
    let (node, _ready) = Node::start_with(&args, &[]);
    runtime.block_on(async {
        // The old stream is gone: the append goes by a unary call or a new
        // stream (the channel reconnects), and lands once.
        let appended = client.append(streams[0].clone(), ExpectedVersion::Any, vec![event(9_999_999, "after")]).await;
        let appended = appended.expect("the first append after the restart lands");
        assert_eq!(appended.first_version, (TASKS * APPENDS / 4) as u64, "after the events from before the restart");
        let again = client.append(streams[0].clone(), ExpectedVersion::Any, vec![event(9_999_998, "then")]).await;
        assert_eq!(again.expect("appended over the new connection").first_version, appended.first_version + 1);
    });
    node.stop();
}
