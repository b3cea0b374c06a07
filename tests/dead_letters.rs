//! Failures that outlast their retries: the dead letter, its alert (one per subject and
//! window) and `dagq dlq list/replay`; and the operator's `dagq retry` and `dagq cancel`.
//! End to end through a worker against stub providers on loopback.

mod common;
mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{TestEnv, eventually, model_call_statuses, node};
use serde_json::{Value, json};
use support::{
    Reply, ask_workflow as ask, chat_reply, hits, json_reply, retry_policy as policy, run_dagq,
    status_reply, stub, stub_config as config, switchable,
};
use uuid::Uuid;

const RUN_TIMEOUT: Duration = Duration::from_secs(30);

async fn run_state(env: &TestEnv, run: Uuid) -> String {
    env.store
        .run_status(run)
        .await
        .unwrap()
        .expect("run exists")
        .run
        .state
}

async fn wait_state(env: &TestEnv, run: Uuid, state: &str) {
    eventually(&format!("run {run} to be {state}"), RUN_TIMEOUT, || async {
        (run_state(env, run).await == state).then_some(())
    })
    .await;
}

/// (from, to) of a node's last transition.
async fn last_transition(env: &TestEnv, run: Uuid, node_id: &str) -> (Option<String>, String) {
    let rows = env.store.transitions(run).await.expect("transitions");
    let last = rows
        .into_iter()
        .rfind(|t| t.node_id.as_deref() == Some(node_id));
    let last = last.expect("the node has transitions");
    (last.from_state, last.to_state)
}

/// Dead letters of the store, via `dagq dlq list --json` (`--all` includes replayed ones).
async fn dlq_list(env: &TestEnv, all: bool) -> Vec<Value> {
    let mut command = env.command();
    command.args(["dlq", "list", "--json"]);
    if all {
        command.arg("--all");
    }
    let out = run_dagq(command).await;
    serde_json::from_str::<Vec<Value>>(&out)
        .unwrap_or_else(|e| panic!("dlq list --json: {e}\n{out}"))
}

/// Three runs whose provider always answers 503 (two attempts each) fail at once: `ask`
/// failed at attempt 2, `after` skipped, each run failed with exactly one `task_failed`
/// dead letter naming it, and the alert webhook got one alert for all three (the other
/// two counted as suppressed). With the provider healthy again, `dagq dlq replay ID`
/// completes that run and marks the letter replayed, as `dagq dlq list` then shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_retries_fail_the_run_with_one_dead_letter_one_alert_and_replay_completes_it() {
    let (provider, healthy) = switchable(status_reply(503), "fine").await;
    let sink = stub(|_| json_reply(200, json!({}))).await;
    let env = TestEnv::with_config(config(&[("down", &provider)], Some(&sink))).await;
    env.apply(ask("down", policy(2, "250ms"))).await;
    let worker = env.start_default_worker();
    let mut runs = Vec::new();
    for n in 0..3 {
        let event = env
            .request_run("ask", json!({"q": format!("question {n}")}))
            .await;
        runs.push(common::run_id_of(&env, &event).await);
    }
    for run in &runs {
        wait_state(&env, *run, "failed").await;
        let status = env.store.run_status(*run).await.unwrap().unwrap();
        let (ask, after) = (node(&status, "ask"), node(&status, "after"));
        assert_eq!(
            (ask.state.as_str(), ask.attempt),
            ("failed", 2),
            "{:?}",
            ask.error
        );
        assert_eq!(after.state, "skipped");
    }
    let letters = eventually("a dead letter per run", RUN_TIMEOUT, || async {
        let letters = dlq_list(&env, false).await;
        (letters.len() >= runs.len()).then_some(letters)
    })
    .await;
    assert_eq!(letters.len(), runs.len(), "{letters:#?}");
    for run in &runs {
        let mine: Vec<_> = letters
            .iter()
            .filter(|l| l["run_id"] == run.to_string())
            .collect();
        assert_eq!(mine.len(), 1, "dead letters of run {run}: {letters:#?}");
        assert_eq!(
            (&mine[0]["reason"], &mine[0]["node_id"], &mine[0]["attempt"]),
            (&json!("task_failed"), &json!("ask"), &json!(2))
        );
    }
    // Every dead letter went through the alert window: one sent, two counted.
    let subject = "dead letter: task_failed on node ask";
    eventually("the other alerts to be counted as suppressed", RUN_TIMEOUT, || async {
        let sql = format!("SELECT coalesce(max(suppressed), -1)::int8 FROM alerts_sent WHERE subject = '{subject}'");
        (env.count(&sql).await == 2 && hits(&sink, "/alerts") >= 1).then_some(())
    })
    .await;
    let alerts = sink.seen();
    assert_eq!(alerts.len(), 1, "alerts sent: {alerts:#?}");
    assert_eq!(alerts[0].body["subject"], subject);

    healthy.store(true, Ordering::SeqCst);
    let replayed = &letters
        .iter()
        .find(|l| l["run_id"] == runs[0].to_string())
        .unwrap()["id"];
    let out = run_dagq({
        let mut c = env.command();
        c.args(["dlq", "replay", replayed.as_str().unwrap()]);
        c
    })
    .await;
    assert!(out.contains(&runs[0].to_string()), "{out}");
    wait_state(&env, runs[0], "completed").await;
    worker.stop().await;
    let status = env.store.run_status(runs[0]).await.unwrap().unwrap();
    assert_eq!(node(&status, "after").output, Some(json!({"said": "fine"})));
    assert_eq!(
        run_state(&env, runs[1]).await,
        "failed",
        "only the replayed run reran"
    );
    let left: Vec<_> = dlq_list(&env, false)
        .await
        .into_iter()
        .map(|l| l["id"].clone())
        .collect();
    assert_eq!(left.len(), 2);
    assert!(
        !left.contains(replayed),
        "a replayed letter is not listed without --all"
    );
    let all = dlq_list(&env, true).await;
    let shown = all
        .iter()
        .find(|l| &l["id"] == replayed)
        .expect("--all lists the replayed letter");
    assert!(shown["replayed_at"].is_string(), "{shown:#}");
}

/// A 400 is terminal: one attempt, one model call, node failed, downstream skipped, run
/// failed, one dead letter and one alert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_error_fails_the_node_at_once_with_a_dead_letter_and_an_alert() {
    let provider = stub(|_| status_reply(400)).await;
    let sink = stub(|_| json_reply(200, json!({}))).await;
    let env = TestEnv::with_config(config(&[("strict", &provider)], Some(&sink))).await;
    env.apply(ask("strict", policy(4, "250ms"))).await;
    let worker = env.start_default_worker();
    let status = env
        .wait_run(
            &env.request_run("ask", json!({"q": "bad"})).await,
            RUN_TIMEOUT,
        )
        .await;
    let run = status.run.id;
    let sql = format!("SELECT count(*) FROM dead_letters WHERE run_id = '{run}'");
    eventually("the dead letter and its alert", RUN_TIMEOUT, || async {
        (env.count(&sql).await >= 1 && hits(&sink, "/alerts") >= 1).then_some(())
    })
    .await;
    worker.stop().await;

    assert_eq!(status.run.state, "failed");
    let ask = node(&status, "ask");
    assert_eq!((ask.state.as_str(), ask.attempt), ("failed", 1));
    assert!(
        ask.error.as_deref().is_some_and(|e| e.contains("400")),
        "{:?}",
        ask.error
    );
    assert_eq!(node(&status, "after").state, "skipped");
    assert_eq!(
        model_call_statuses(&env, run).await,
        [(1, "http_400".to_owned())]
    );
    let detail = "reason = 'task_failed' AND node_id = 'ask' AND attempt = 1";
    assert_eq!(env.count(&format!("{sql} AND {detail}")).await, 1);
    assert_eq!(env.count("SELECT count(*) FROM dead_letters").await, 1);
    assert_eq!(sink.seen().len(), 1);
}

/// `up` → `mid` → `end`: `mid` reads `up`'s answer and the input, `end` both.
fn chain() -> Value {
    let say = |text: &str| json!({"messages": [{"role": "user", "content": text}]});
    json!({"name": "chain", "nodes": [
        {"id": "up", "type": "chat", "model": "upstream", "input": say("{{ input.q }}")},
        {"id": "mid", "type": "chat", "model": "picky", "depends": ["up"],
         "input": say("{{ nodes.up.output.text }} / {{ input.q }}")},
        {"id": "end", "type": "transform", "depends": ["mid"],
         "input": {"mid": "{{ nodes.mid.output.text }}", "q": "{{ input.q }}"}}
    ]})
}

/// After `mid` failed terminally, `dagq retry RUN --input …` reruns `mid` and `end` with
/// the new input and `up`'s kept output: `up` is not run again (attempt 1, no second
/// request to its provider), `mid` and `end` complete at attempt 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_reruns_the_failed_node_and_downstream_with_new_input_keeping_upstream_outputs() {
    let upstream = stub(|_| chat_reply("up-answer")).await;
    let (picky, healthy) = switchable(status_reply(400), "mid-answer").await;
    let env =
        TestEnv::with_config(config(&[("upstream", &upstream), ("picky", &picky)], None)).await;
    env.apply(chain()).await;
    let worker = env.start_default_worker();
    let first = env
        .wait_run(
            &env.request_run("chain", json!({"q": "first"})).await,
            RUN_TIMEOUT,
        )
        .await;
    assert_eq!(first.run.state, "failed", "{:?}", first.nodes);
    let states: Vec<_> = first
        .nodes
        .iter()
        .map(|n| (n.node_id.as_str(), n.state.as_str()))
        .collect();
    assert_eq!(
        states,
        [("up", "completed"), ("mid", "failed"), ("end", "skipped")]
    );

    healthy.store(true, Ordering::SeqCst);
    let run = first.run.id.to_string();
    run_dagq({
        let mut c = env.command();
        c.args(["retry", &run, "--input", r#"{"q": "second"}"#]);
        c
    })
    .await;
    wait_state(&env, first.run.id, "completed").await;
    worker.stop().await;

    let status = env.store.run_status(first.run.id).await.unwrap().unwrap();
    assert_eq!(status.input, json!({"q": "second"}));
    let attempts: Vec<_> = status
        .nodes
        .iter()
        .map(|n| (n.node_id.as_str(), n.state.as_str(), n.attempt))
        .collect();
    assert_eq!(
        attempts,
        [
            ("up", "completed", 1),
            ("mid", "completed", 2),
            ("end", "completed", 2)
        ]
    );
    assert_eq!(
        hits(&upstream, "/v1/chat/completions"),
        1,
        "the upstream node ran again"
    );
    let asked = picky
        .seen()
        .last()
        .expect("mid's provider was called")
        .body
        .clone();
    assert_eq!(asked["messages"][0]["content"], "up-answer / second");
    assert_eq!(
        node(&status, "end").output,
        Some(json!({"mid": "mid-answer", "q": "second"}))
    );
}

/// `dagq cancel RUN` while a node waits on a slow provider: the run and its unfinished
/// nodes are `cancelled` at once, and the provider's late answer is dropped: the node
/// stays cancelled without output, though its call is in the audit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_running_run_and_drops_the_late_result() {
    let slow = stub(|_| Reply {
        delay: Duration::from_secs(3),
        ..chat_reply("too late")
    })
    .await;
    let env = TestEnv::with_config(config(&[("slow", &slow)], None)).await;
    env.apply(ask("slow", policy(1, "250ms"))).await;
    let worker = env.start_default_worker();
    let run = common::run_id_of(&env, &env.request_run("ask", json!({"q": "hi"})).await).await;
    eventually("the provider to be asked", RUN_TIMEOUT, || async {
        (!slow.seen().is_empty()).then_some(())
    })
    .await;
    run_dagq({
        let mut c = env.command();
        c.args(["cancel", &run.to_string()]);
        c
    })
    .await;
    let status = env.store.run_status(run).await.unwrap().unwrap();
    let states: Vec<_> = status
        .nodes
        .iter()
        .map(|n| (n.node_id.as_str(), n.state.as_str()))
        .collect();
    assert_eq!(
        (status.run.state.as_str(), states),
        (
            "cancelled",
            vec![("ask", "cancelled"), ("after", "cancelled")]
        )
    );
    // Stopping drains in-flight work: the late answer has been handled when it returns.
    worker.stop().await;

    assert_eq!(
        model_call_statuses(&env, run).await,
        [(1, "ok".to_owned())],
        "the late call is audited"
    );
    let status = env.store.run_status(run).await.unwrap().unwrap();
    assert_eq!(status.run.state, "cancelled");
    let ask = node(&status, "ask");
    assert_eq!((ask.state.as_str(), &ask.output), ("cancelled", &None));
    let last = last_transition(&env, run, "ask").await;
    assert_eq!(last, (Some("running".into()), "cancelled".into()));
}
