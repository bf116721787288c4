#![allow(clippy::expect_used, clippy::unwrap_used)]

use super::*;
use http_body_util::StreamBody;
use serde_json::json;

const T: Duration = Duration::from_secs(2);

fn review_body(kind: &str, spec: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "u-1",
            "kind": {"group": "portcullis.dev", "version": "v1alpha1", "kind": kind},
            "name": "k", "namespace": "ns", "operation": "CREATE",
            "userInfo": {"username": "alice", "groups": ["admins"]},
            "object": {"metadata": {"name": "k", "namespace": "ns"}, "spec": spec}
        }
    }))
    .unwrap()
}

fn post(path: &str, body: Vec<u8>) -> Request<Full<Bytes>> {
    Request::post(path).header(header::CONTENT_TYPE, "application/json").body(Full::new(Bytes::from(body))).unwrap()
}

async fn text(response: Response<Full<Bytes>>) -> (StatusCode, String) {
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

#[tokio::test]
async fn answers_reviews_and_refuses_everything_else_with_a_reason() {
    let hints = ActorHints::default();
    let (status, body) = text(
        handle(post(PATH, review_body("ApiKey", json!({}))), (&hints, &Capacity::default()), &Tenancy::Shared, T).await,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["response"]["allowed"], true);
    assert_eq!(answer["response"]["uid"], "u-1");
    assert_eq!(hints.len(), 1);

    let (status, body) =
        text(handle(post("/other", vec![]), (&hints, &Capacity::default()), &Tenancy::Shared, T).await).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("POST /validate"), "{body}");

    let get = Request::get(PATH).body(Full::new(Bytes::new())).unwrap();
    assert_eq!(
        handle(get, (&hints, &Capacity::default()), &Tenancy::Shared, T).await.status(),
        StatusCode::METHOD_NOT_ALLOWED
    );

    let (status, body) = text(
        handle(post(PATH, b"{\"secret-looking\": ".to_vec()), (&hints, &Capacity::default()), &Tenancy::Shared, T)
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("not an admission.k8s.io/v1 AdmissionReview"), "{body}");
}

#[tokio::test]
async fn bodies_over_the_cap_are_refused_whether_declared_or_streamed() {
    let hints = ActorHints::default();
    let big = vec![b' '; MAX_BODY_BYTES + 1];
    assert_eq!(
        handle(post(PATH, big), (&hints, &Capacity::default()), &Tenancy::Shared, T).await.status(),
        StatusCode::PAYLOAD_TOO_LARGE
    );

    // No Content-Length: the limit applies while reading.
    let chunks =
        (0..4).map(|_| Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from(vec![b' '; MAX_BODY_BYTES / 2]))));
    let streamed = Request::post(PATH).body(StreamBody::new(futures_util::stream::iter(chunks))).unwrap();
    assert_eq!(
        handle(streamed, (&hints, &Capacity::default()), &Tenancy::Shared, T).await.status(),
        StatusCode::PAYLOAD_TOO_LARGE
    );
    assert!(hints.is_empty());
}

/// Bodies are counted against the webhook's capacity as they arrive: past it a review is
/// answered 503 at once, and a finished review gives its share back.
#[tokio::test]
async fn reviews_past_the_capacity_are_refused_and_their_share_returns() {
    let hints = ActorHints::default();
    let capacity = Capacity::new(8 * 1024);
    let padded = |bytes: usize| {
        let mut body = review_body("ApiKey", json!({}));
        body.resize(bytes, b' ');
        body
    };
    let one = |body| handle(post(PATH, body), (&hints, &capacity), &Tenancy::Shared, T);
    assert_eq!(one(padded(8 * 1024)).await.status(), StatusCode::OK);
    let (status, body) = text(one(padded(8 * 1024 + 1)).await).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("retry"), "{body}");
    // A declared length past the capacity is refused before anything is read.
    let never_sent = futures_util::stream::pending::<Result<hyper::body::Frame<Bytes>, Infallible>>();
    let declared =
        Request::post(PATH).header(header::CONTENT_LENGTH, 8 * 1024 + 1).body(StreamBody::new(never_sent)).unwrap();
    let answered = tokio::time::timeout(T, handle(declared, (&hints, &capacity), &Tenancy::Shared, T * 10)).await;
    assert_eq!(answered.expect("answered before the body").status(), StatusCode::SERVICE_UNAVAILABLE);

    // A slow sender holds what it has sent: while it holds 6 KiB, a 4 KiB review is refused and
    // a 2 KiB one decided; once it has timed out, the whole capacity is free again.
    let sent =
        futures_util::stream::iter([Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from(vec![b' '; 6 * 1024])))]);
    let stalled = StreamBody::new(futures_util::StreamExt::chain(sent, futures_util::stream::pending()));
    let stalled = handle(
        Request::post(PATH).body(stalled).unwrap(),
        (&hints, &capacity),
        &Tenancy::Shared,
        Duration::from_millis(300),
    );
    let mut stalled = std::pin::pin!(stalled);
    tokio::select! {
        _ = stalled.as_mut() => panic!("a body that never ends was answered"),
        () = tokio::time::sleep(Duration::from_millis(50)) => {}
    }
    assert_eq!(one(padded(4 * 1024)).await.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(one(padded(2 * 1024)).await.status(), StatusCode::OK);
    assert_eq!(stalled.await.status(), StatusCode::REQUEST_TIMEOUT);
    assert_eq!(one(padded(8 * 1024)).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_body_that_never_finishes_times_out() {
    let hints = ActorHints::default();
    let slow = futures_util::stream::pending::<Result<hyper::body::Frame<Bytes>, Infallible>>();
    let request = Request::post(PATH).body(StreamBody::new(slow)).unwrap();
    let response = handle(request, (&hints, &Capacity::default()), &Tenancy::Shared, Duration::from_millis(100)).await;
    assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
}

/// Captures log lines for one test thread.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn logs_name_the_decision_never_the_object() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber =
        tracing_subscriber::fmt().with_max_level(tracing::Level::TRACE).with_writer(move || writer.clone()).finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let canary = "canary-9f8e7d6c5b4a";
    let hints = ActorHints::default();
    for spec in [json!({"owner": canary}), json!({"allowedModels": [format!("{canary} bad")]})] {
        assert_eq!(
            handle(post(PATH, review_body("ApiKey", spec)), (&hints, &Capacity::default()), &Tenancy::Shared, T)
                .await
                .status(),
            StatusCode::OK
        );
    }
    let garbage = format!("{{\"apiVersion\": \"{canary}\"").into_bytes();
    assert_eq!(
        handle(post(PATH, garbage), (&hints, &Capacity::default()), &Tenancy::Shared, T).await.status(),
        StatusCode::BAD_REQUEST
    );
    // A malformed review whose parse error quotes the sender's value: the caller is told, the
    // log is not (this fails if the error were ever logged).
    let mut wrong_type: serde_json::Value = serde_json::from_slice(&review_body("ApiKey", json!({}))).unwrap();
    wrong_type["request"]["dryRun"] = json!(canary);
    let (status, answer) = text(
        handle(
            post(PATH, serde_json::to_vec(&wrong_type).unwrap()),
            (&hints, &Capacity::default()),
            &Tenancy::Shared,
            T,
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(answer.contains(canary), "the reason goes back to the caller: {answer}");
    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("admission review answered"), "{logs}");
    assert!(!logs.contains(canary), "{logs}");
}
