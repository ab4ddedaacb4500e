//! The signer's LSS backup end to end, without MQTT: a real `lssd`, `sphinx_lss::broker` playing
//! the broker, and `sphinx_signer::Signer::on_message` (the path sphinx-key's client takes) on a
//! redb state directory. Replies are compared byte for byte with the in-process oracle
//! (`Signer::in_memory`, LSS off) on the recorded CLN sessions.

#[path = "../../signer/tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::time::Duration;

use common::{config, load, temp_dir, Step, T0_OPEN_PAY_CLOSE};
use sphinx_lss::broker::{self, init_dance, Answered, DanceError, LinkError, LssBackend, LssSession, SignerLink};
use sphinx_lss::lssd::Lssd;
use sphinx_lss::LssClient;
use sphinx_signer::{LssPhase, Output, Signer, WRITER_KEY};
use sphinx_wire::lss::{Msg, Response};
use sphinx_wire::serial::{Reply, Request};
use sphinx_wire::topics;

const ALICE_SEED: [u8; 32] = [0x41; 32];
const T: Duration = Duration::from_secs(10);

/// A signer device reached by direct calls, with an optional man in the middle.
struct Device {
    signer: Signer,
    tamper: Option<fn(&str, &mut Vec<u8>)>,
}

impl SignerLink for Device {
    fn exchange(
        &mut self,
        topic: &'static str,
        mut payload: Vec<u8>,
        answers: &'static [&'static str],
    ) -> impl std::future::Future<Output = Result<(String, Vec<u8>), LinkError>> + Send {
        if let Some(t) = self.tamper {
            t(topic, &mut payload);
        }
        let outs = self.signer.on_message(topic, &payload);
        let answer = outs
            .into_iter()
            .find_map(|o| match o {
                Output::Publish { topic, payload } if answers.contains(&topic) || topic == topics::ERROR => {
                    Some((topic.to_string(), payload))
                }
                Output::Control(c) if answers.contains(&topics::CONTROL_RES) => {
                    Some((topics::CONTROL_RES.to_string(), c.response))
                }
                _ => None,
            })
            .ok_or_else(|| LinkError(format!("no answer to {topic}")));
        async move { answer }
    }
}

fn device(dir: &Path) -> Device {
    Device { signer: Signer::open(ALICE_SEED, dir, &config(T0_OPEN_PAY_CLOSE + 100)).expect("open"), tamper: None }
}

/// The trace's `hsmd_init` and the rest.
fn trace() -> (Request, Vec<Step>) {
    let mut steps = load("open-pay-close/alice.jsonl");
    assert_eq!(steps[0].msg_type, 11, "the trace starts with hsmd_init");
    let init = steps.remove(0).req;
    (init, steps)
}

/// What the oracle (in memory, LSS off) answers to the whole trace.
fn oracle(init: &Request, steps: &[Step]) -> Vec<Result<Vec<u8>, String>> {
    let mut o = Signer::in_memory(ALICE_SEED, &config(T0_OPEN_PAY_CLOSE + 100)).expect("oracle");
    o.handle(init).expect("init");
    steps.iter().map(|s| o.handle(&s.req).map(|r| r.encode()).map_err(|e| e.to_string())).collect()
}

/// A fresh lssd, the broker's view of it, the trace and the oracle's answers to it.
struct Setup {
    server: Lssd,
    lss: LssBackend,
    init: Request,
    steps: Vec<Step>,
    want: Vec<Result<Vec<u8>, String>>,
}

async fn setup(name: &str) -> Setup {
    let server = Lssd::start_temp(name).expect("lssd");
    let lss = LssBackend::new(&server.url(), T).await.expect("lss");
    let (init, steps) = trace();
    let want = oracle(&init, &steps);
    Setup { server, lss, init, steps, want }
}

async fn dance(lss: &LssBackend, dev: &mut Device, init: &Request) -> Result<LssSession, DanceError> {
    let d = init_dance(lss, dev, Some(init.encode())).await?;
    let reply = Reply::decode(&d.init_reply.expect("init-3 answered")).expect("init reply frame");
    assert_eq!(reply.seq, init.seq);
    Ok(d.session)
}

/// Runs `steps` through the device with LSS, checking each answer against the oracle's.
async fn run(dev: &mut Device, s: &mut LssSession, steps: &[Step], want: &[Result<Vec<u8>, String>]) {
    for (i, (step, want)) in steps.iter().zip(want).enumerate() {
        let got = broker::request(dev, s, topics::VLS, step.req.encode()).await.expect("answered");
        match (got, want) {
            (Answered::Reply(r), Ok(w)) => {
                assert_eq!(&r, w, "step {i} (type {}) differs from the oracle", step.msg_type)
            }
            (Answered::Refused(_), Err(_)) => {}
            (got, want) => panic!("step {i} (type {}): {got:?} but the oracle says {want:?}", step.msg_type),
        }
    }
}

/// Feeds `steps` (from `from`) to the device until one changes state: its `lss-res` payload and
/// index. Requests that change nothing are answered at once (and refusals change nothing).
fn next_backup(dev: &mut Device, steps: &[Step], from: usize) -> (usize, Vec<u8>) {
    for (i, step) in steps.iter().enumerate().skip(from) {
        for o in dev.signer.on_message(topics::VLS, &step.req.encode()) {
            if let Output::Publish { topic, payload } = o {
                if topic == topics::LSS_RES {
                    return (i, payload);
                }
            }
        }
    }
    panic!("no state-changing request after step {from}");
}

/// Every synced key on the device equals LSS's (each LSS value carrying this seed's tag), and
/// LSS has nothing more.
async fn assert_agree(url: &str, dev: &mut Device, session_id: &sphinx_wire::lss::InitResponse) {
    let mut c = LssClient::connect(url, T, session_id).await.expect("connect");
    let key = sphinx_signer::lss_value_key(&ALICE_SEED);
    let remote: Vec<_> = c
        .get_all(&[9; 32])
        .await
        .expect("get")
        .muts
        .into_iter()
        .map(|m| sphinx_wire::lss::open_value(&key, m).expect("every LSS value carries the signer's tag"))
        .collect();
    let local = dev.signer.synced_state().expect("local state");
    assert_eq!(local.len(), remote.len(), "key count: device {} vs LSS {}", local.len(), remote.len());
    for (l, r) in local.iter().zip(&remote) {
        assert_eq!((&l.key, l.version), (&r.key, r.version));
        assert!(l.value == r.value, "{} differs", l.key);
    }
    assert!(remote.iter().any(|m| m.key == WRITER_KEY));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_device_backs_up_every_request_and_restores_a_fresh_device_from_lss_alone() {
    let Setup { server, lss, init, steps, want } = setup("restore").await;
    // Mid-session: a channel is open and payments are under way (state in every VLS family).
    let half = 90;

    // Device A: empty data dir; the dance creates the node and stores it in LSS.
    let dir_a = temp_dir("lss-a");
    let mut a = device(&dir_a);
    let d = init_dance(&lss, &mut a, Some(init.encode())).await.expect("dance");
    assert_eq!(d.restored_keys, 0, "LSS was empty");
    let identity = d.identity.clone();
    let mut session = d.session;
    assert_eq!(a.signer.lss_phase(), Some(LssPhase::Synced));
    run(&mut a, &mut session, &steps[..half], &want[..half]).await;
    assert_agree(&server.url(), &mut a, &identity).await;
    drop(a);

    // Device B: empty data dir, same seed: rebuilt from LSS alone, continues the session.
    let dir_b = temp_dir("lss-b");
    let mut b = device(&dir_b);
    let d = init_dance(&lss, &mut b, Some(init.encode())).await.expect("dance");
    assert!(d.restored_keys > 10, "restored {} keys", d.restored_keys);
    assert_eq!(d.identity.client_id, identity.client_id, "same seed, same LSS client");
    let mut session = d.session;
    run(&mut b, &mut session, &steps[half..], &want[half..]).await;
    assert_agree(&server.url(), &mut b, &identity).await;
    let _ = std::fs::remove_dir_all(dir_a);
    let _ = std::fs::remove_dir_all(dir_b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_is_held_until_lss_acknowledges_and_a_stale_signer_gets_a_conflict() {
    let Setup { server: _server, lss, init, steps, want } = setup("conflict").await;
    let (dir_a, dir_b) = (temp_dir("lss-ca"), temp_dir("lss-cb"));
    let mut a = device(&dir_a);
    let mut sa = dance(&lss, &mut a, &init).await.expect("dance a");
    // Steps 63.. open a channel: state changes from there on.
    run(&mut a, &mut sa, &steps[..70], &want[..70]).await;

    // B catches up from LSS (a standby), then A goes on alone: B is now stale.
    let mut b = device(&dir_b);
    let mut sb = dance(&lss, &mut b, &init).await.expect("dance b");
    run(&mut a, &mut sa, &steps[70..80], &want[70..80]).await;

    // A state-changing request: the signer answers with its mutations, not the reply.
    let (i, lss_res) = next_backup(&mut b, &steps, 80);
    assert!(matches!(Response::decode(&lss_res), Ok(Response::VlsMuts(_))));
    // Later requests wait behind it (nothing is answered yet); its put conflicts (A wrote
    // since), and neither its reply nor anything queued behind it is released.
    assert!(b.signer.on_message(topics::VLS, &steps[i + 1].req.encode()).is_empty(), "queued");
    let (back, msg) = sb.store(&lss_res).await.expect("store");
    assert_eq!(back, topics::LSS_CONFLICT);
    let outs = b.signer.on_message(back, &msg);
    assert!(matches!(outs.as_slice(), [Output::Publish { topic, .. }] if *topic == topics::LSS_CONFLICT_RES));
    assert_eq!(b.signer.lss_phase(), Some(LssPhase::Stale));
    let refused = b.signer.on_message(topics::VLS, &steps[i].req.encode());
    match refused.as_slice() {
        [Output::Publish { topic, payload }] if *topic == topics::ERROR => {
            let text = String::from_utf8_lossy(&payload[2..]).into_owned();
            assert!(text.contains("not in sync with LSS"), "{text}");
        }
        other => panic!("a stale signer must refuse, got {other:?}"),
    }

    // Re-synced through the dance, B takes over where A stopped, byte for byte.
    let mut sb = dance(&lss, &mut b, &init).await.expect("re-sync b");
    run(&mut b, &mut sb, &steps[80..95], &want[80..95]).await;
    // And now A is the stale one: its next state change is a conflict, not a fork.
    let (_, lss_res) = next_backup(&mut a, &steps, 95);
    let (back, msg) = sa.store(&lss_res).await.expect("store");
    assert_eq!(back, topics::LSS_CONFLICT, "a stale writer must conflict");
    a.signer.on_message(back, &msg);
    assert_eq!(a.signer.lss_phase(), Some(LssPhase::Stale));
    let _ = std::fs::remove_dir_all(dir_a);
    let _ = std::fs::remove_dir_all(dir_b);
}

fn flip_value_byte(topic: &str, payload: &mut Vec<u8>) {
    if topic == topics::INIT_2_MSG {
        if let Ok(Msg::Created(mut s)) = Msg::decode(payload) {
            if let Some(m) = s.muts.iter_mut().find(|m| m.key.starts_with("node/state/")) {
                m.value[10] ^= 1;
            }
            *payload = Msg::Created(s).encode();
        }
    }
}

fn forge_stored_hmac(topic: &str, payload: &mut Vec<u8>) {
    if topic == topics::LSS_MSG {
        if let Ok(Msg::Stored(mut s)) = Msg::decode(payload) {
            if let Some(h) = s.server_hmac.as_mut() {
                h[0] ^= 1;
            }
            *payload = Msg::Stored(s).encode();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_lss_state_and_forged_acknowledgements_are_refused() {
    let Setup { server: _server, lss, init, steps, want } = setup("tamper").await;
    let (dir_a, dir_b) = (temp_dir("lss-ta"), temp_dir("lss-tb"));
    let mut a = device(&dir_a);
    let mut sa = dance(&lss, &mut a, &init).await.expect("dance");
    run(&mut a, &mut sa, &steps[..70], &want[..70]).await;

    // A fresh device offered LSS's state with one value changed in transit refuses it.
    let mut b = device(&dir_b);
    b.tamper = Some(flip_value_byte);
    match init_dance(&lss, &mut b, Some(init.encode())).await {
        Err(DanceError::Signer { step: "init-2", text }) => assert!(text.contains("fails its HMAC"), "{text}"),
        Err(e) => panic!("expected the signer to refuse init-2, got {e}"),
        Ok(_) => panic!("a tampered state was accepted"),
    }
    assert_eq!(b.signer.lss_phase(), Some(LssPhase::Identified), "it signs nothing");
    // Untampered, the same device restores fine.
    b.tamper = None;
    dance(&lss, &mut b, &init).await.expect("clean dance");

    // An acknowledgement whose server HMAC is not LSS's releases nothing.
    a.tamper = Some(forge_stored_hmac);
    let mut sa = dance(&lss, &mut a, &init).await.expect("dance a again");
    let mut refused = None;
    for step in &steps[70..] {
        match broker::request(&mut a, &mut sa, topics::VLS, step.req.encode()).await.expect("answer") {
            // Requests that change nothing need no acknowledgement.
            Answered::Reply(_) => continue,
            Answered::Refused(p) => refused = Some(String::from_utf8_lossy(&p[2..]).into_owned()),
            Answered::Conflict => panic!("unexpected conflict"),
        }
        break;
    }
    let text = refused.expect("a state-changing request");
    assert!(text.contains("does not prove it stored"), "{text}");
    assert_eq!(a.signer.lss_phase(), Some(LssPhase::Stale));
    let _ = std::fs::remove_dir_all(dir_a);
    let _ = std::fs::remove_dir_all(dir_b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_arriving_while_one_waits_are_answered_after_it_in_order() {
    let Setup { server, lss, init, steps, want } = setup("queue").await;
    let dir = temp_dir("lss-q");
    let mut a = device(&dir);
    let mut sa = dance(&lss, &mut a, &init).await.expect("dance");
    run(&mut a, &mut sa, &steps[..63], &want[..63]).await;

    // A broker that sends 20 requests at once (the channel open and first updates).
    let mut outbox: std::collections::VecDeque<Output> = Default::default();
    for s in &steps[63..83] {
        outbox.extend(a.signer.on_message(topics::VLS, &s.req.encode()));
    }
    let (mut replies, mut puts) = (Vec::new(), 0);
    while let Some(o) = outbox.pop_front() {
        match o {
            Output::Publish { topic, payload } if topic == topics::VLS_RES => replies.push(payload),
            Output::Publish { topic, payload } if topic == topics::LSS_RES => {
                puts += 1;
                let (back, msg) = sa.store(&payload).await.expect("store");
                assert_eq!(back, topics::LSS_MSG);
                outbox.extend(a.signer.on_message(back, &msg));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let expected: Vec<Vec<u8>> = want[63..83].iter().map(|w| w.clone().expect("answered")).collect();
    assert_eq!(replies, expected, "every reply, in request order, equal to the oracle's");
    // The first alone; those that waited behind it as one group (LSS group commit).
    assert_eq!(puts, 2, "one Put for the first request, one for the group that waited behind it");
    let identity = init_dance(&lss, &mut a, None).await.expect("dance").identity;
    assert_agree(&server.url(), &mut a, &identity).await;
    let _ = std::fs::remove_dir_all(dir);
}

/// Changes one stored value of `client_id` in a stopped lssd's redb store, as a compromised or
/// corrupted LSS server would: the first key (after the client prefix) starting with `prefix`
/// gets one hex digit of its value changed (so VLS's JSON still parses) and, if `bump`, its
/// version raised by one (so it looks newer than any device's). Returns the key.
fn tamper_store(lssd_dir: &Path, client_id: &[u8; 33], prefix: &str, bump: bool) -> String {
    use lightning_storage_server::Value;
    const TABLE: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("kv");
    let db = redb::Database::create(lssd_dir.join("data").join("redb")).expect("lssd's redb");
    let start = format!("{}/{prefix}", hex::encode(client_id));
    let (key, mut value) = {
        let tx = db.begin_read().expect("read");
        let table = tx.open_table(TABLE).expect("kv table");
        let mut range = table.range(start.as_str()..).expect("range");
        let (k, v) = range.next().expect("a key").expect("read key");
        assert!(k.value().starts_with(&start), "no {start}* key: {}", k.value());
        let value: Value = ciborium::from_reader(v.value()).expect("CBOR Value");
        (k.value().to_string(), value)
    };
    // A digit inside a JSON number (not its first: no leading zero), so the value still parses:
    // 0<->1, 2<->3, …
    let at = value.value.windows(2).position(|w| w[0].is_ascii_digit() && w[1].is_ascii_digit()).expect("a number") + 1;
    value.value[at] ^= 1;
    if bump {
        value.version += 1;
    }
    let mut bytes = Vec::new();
    ciborium::into_writer(&value, &mut bytes).expect("CBOR");
    let tx = db.begin_write().expect("write");
    {
        let mut table = tx.open_table(TABLE).expect("kv table");
        table.insert(key.as_str(), bytes.as_slice()).expect("insert");
    }
    tx.commit().expect("commit");
    key
}

/// The refusal text of a dance that must fail at init-2.
async fn refused_at_init_2(lss: &LssBackend, dev: &mut Device, init: &Request) -> String {
    match init_dance(lss, dev, Some(init.encode())).await {
        Err(DanceError::Signer { step: "init-2", text }) => text,
        Err(e) => panic!("expected the signer to refuse init-2, got {e}"),
        Ok(_) => panic!("a state tampered with in LSS's store was accepted"),
    }
}

/// The signer refuses to answer a request (anything but a reply).
fn refuses_to_sign(dev: &mut Device, step: &Step) {
    let outs = dev.signer.on_message(topics::VLS, &step.req.encode());
    match outs.as_slice() {
        [Output::Publish { topic, payload }] if *topic == topics::ERROR => {
            let text = String::from_utf8_lossy(&payload[2..]).into_owned();
            assert!(text.contains("not in sync with LSS") || text.contains("waiting for LSS"), "{text}");
        }
        other => panic!("a signer that refused LSS's state must sign nothing, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_changed_in_lss_store_is_refused_by_fresh_and_existing_devices() {
    let Setup { mut server, lss, init, steps, want } = setup("store-tamper").await;
    let (dir_a, dir_b) = (temp_dir("lss-sa"), temp_dir("lss-sb"));
    let mut a = device(&dir_a);
    let d = init_dance(&lss, &mut a, Some(init.encode())).await.expect("dance");
    let client_id = d.identity.client_id;
    let mut sa = d.session;
    // A channel is open and payments are under way.
    run(&mut a, &mut sa, &steps[..90], &want[..90]).await;
    drop(sa);

    // The server's operator changes a channel's state, same version: the server's own HMAC over
    // the state it serves is valid (it computes it), only the signer's value tag can tell.
    server.kill();
    let key = tamper_store(server.dir(), &client_id, "channel/", false);
    server.restart().expect("lssd back");
    let mut b = device(&dir_b);
    let text = refused_at_init_2(&lss, &mut b, &init).await;
    assert!(text.contains(&format!("LSS value of {}", &key[67..])) && text.contains("fails its tag"), "{text}");
    assert_eq!(b.signer.lss_phase(), Some(LssPhase::Identified));
    refuses_to_sign(&mut b, &steps[90]);

    // Changed and made newer: a device that still has its state would otherwise adopt it.
    // (The channel's value is put back first: the same flip again.)
    server.kill();
    assert_eq!(tamper_store(server.dir(), &client_id, "channel/", false), key);
    tamper_store(server.dir(), &client_id, "node/state", true);
    server.restart().expect("lssd back");
    let text = refused_at_init_2(&lss, &mut a, &init).await;
    assert!(text.contains("fails its tag"), "{text}");
    refuses_to_sign(&mut a, &steps[90]);
    let _ = std::fs::remove_dir_all(dir_a);
    let _ = std::fs::remove_dir_all(dir_b);
}

/// Commits the device's staged transaction locally, as sphinx-key's client does while the
/// `lss-res` crosses to LSS, and returns with the acknowledgement never delivered.
fn commit_before_the_acknowledgement(dev: &mut Device) {
    let c = dev.signer.take_staged_commit().expect("a staged transaction");
    dev.signer.staged_commit_done(c.run());
    assert!(dev.signer.take_staged_commit().is_none(), "taken once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_committed_before_lss_stored_it_is_rolled_forward_or_back_at_the_next_dance() {
    let Setup { server, lss, init, steps, want } = setup("unacked").await;
    let (dir_a, dir_b) = (temp_dir("lss-ua"), temp_dir("lss-ub"));
    let mut a = device(&dir_a);
    let mut sa = dance(&lss, &mut a, &init).await.expect("dance a");
    run(&mut a, &mut sa, &steps[..70], &want[..70]).await;

    // A commits a request's state locally, then dies before LSS stored it.
    let (i, _lss_res) = next_backup(&mut a, &steps, 70);
    commit_before_the_acknowledgement(&mut a);
    drop(a);
    // Restarted, A is one transaction ahead of LSS: rolled forward (sent again in init-2-res),
    // not refused as a rollback. The redelivered request gets the reply VLS made then.
    let mut a = device(&dir_a);
    let d = init_dance(&lss, &mut a, Some(init.encode())).await.expect("dance a after the crash");
    let identity = d.identity.clone();
    let mut sa = d.session;
    assert_agree(&server.url(), &mut a, &identity).await;
    run(&mut a, &mut sa, &steps[i..100], &want[i..100]).await;
    assert_agree(&server.url(), &mut a, &identity).await;

    // A commits another one locally and dies; B (same seed) takes over from LSS and goes on.
    let (j, _) = next_backup(&mut a, &steps, 100);
    commit_before_the_acknowledgement(&mut a);
    drop(a);
    let mut b = device(&dir_b);
    let mut sb = dance(&lss, &mut b, &init).await.expect("dance b");
    run(&mut b, &mut sb, &steps[j..115], &want[j..115]).await;
    assert_agree(&server.url(), &mut b, &identity).await;
    drop(b);
    // A comes back: LSS went on without A's last transaction (whose reply never left), so A
    // drops it and takes LSS's state, then finishes the session byte for byte.
    let mut a = device(&dir_a);
    let mut sa = dance(&lss, &mut a, &init).await.expect("dance a after the takeover");
    assert_agree(&server.url(), &mut a, &identity).await;
    run(&mut a, &mut sa, &steps[115..], &want[115..]).await;
    assert_agree(&server.url(), &mut a, &identity).await;
    let _ = std::fs::remove_dir_all(dir_a);
    let _ = std::fs::remove_dir_all(dir_b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_arriving_together_share_one_put_and_are_answered_after_it() {
    let Setup { server, lss, init, steps, want } = setup("group").await;
    let dir = temp_dir("lss-g");
    let mut a = device(&dir);
    let d = init_dance(&lss, &mut a, Some(init.encode())).await.expect("dance");
    let identity = d.identity.clone();
    let mut s = d.session;
    run(&mut a, &mut s, &steps[..70], &want[..70]).await;

    // Thirty requests read at once (as sphinx-key's client hands over a batch): one group.
    let (from, to) = (70, 100);
    let frames: Vec<Vec<u8>> = steps[from..to].iter().map(|s| s.req.encode()).collect();
    let views: Vec<(&str, &[u8])> = frames.iter().map(|f| (topics::VLS, f.as_slice())).collect();
    let mut outs = a.signer.on_messages(&views);
    let mut answers: std::collections::BTreeMap<u16, (&'static str, Vec<u8>)> = Default::default();
    let mut puts = 0;
    loop {
        let mut lss_res = None;
        for o in outs {
            match o {
                Output::Publish { topic, payload } if topic == topics::LSS_RES => lss_res = Some(payload),
                Output::Publish { topic, payload } => {
                    let seq = if topic == topics::ERROR {
                        sphinx_wire::error_report::decode(&payload).seq.expect("error seq")
                    } else {
                        Reply::decode(&payload).expect("reply frame").seq
                    };
                    assert!(answers.insert(seq, (topic, payload)).is_none(), "seq {seq} answered twice");
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        let Some(res) = lss_res else { break };
        assert!(answers.values().all(|(t, _)| *t == topics::ERROR), "a reply left before LSS stored its state");
        puts += 1;
        let (back, msg) = s.store(&res).await.expect("store");
        assert_eq!(back, topics::LSS_MSG);
        outs = a.signer.on_message(back, &msg);
    }
    assert_eq!(puts, 1, "one Put for the group");
    for (step, want) in steps[from..to].iter().zip(&want[from..to]) {
        match (answers.get(&step.req.seq), want) {
            (Some((t, r)), Ok(w)) if *t == topics::VLS_RES => assert_eq!(r, w, "seq {} differs", step.req.seq),
            (Some((t, _)), Err(_)) if *t == topics::ERROR => {}
            (got, want) => panic!("seq {}: {got:?} but the oracle says {want:?}", step.req.seq),
        }
    }
    assert_agree(&server.url(), &mut a, &identity).await;
    // One at a time again from there, byte for byte.
    run(&mut a, &mut s, &steps[to..], &want[to..]).await;
    assert_agree(&server.url(), &mut a, &identity).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_backed_up_to_lss_refuses_a_broker_that_does_not_sync_it() {
    let Setup { server: _server, lss, init, steps, want } = setup("required").await;
    let dir = temp_dir("lss-req");
    let mut a = device(&dir);
    let mut s = dance(&lss, &mut a, &init).await.expect("dance");
    run(&mut a, &mut s, &steps[..70], &want[..70]).await;
    drop(a);

    // Restarted, and the broker never starts the dance (no [lss], or it chose not to): lightningd's
    // hsmd_init is answered, but nothing is signed.
    let mut a = device(&dir);
    let outs = a.signer.on_message(topics::VLS, &init.encode());
    assert!(matches!(outs.as_slice(), [Output::Publish { topic, .. }] if *topic == topics::VLS_RES), "{outs:?}");
    match a.signer.on_message(topics::VLS, &steps[70].req.encode()).as_slice() {
        [Output::Publish { topic, payload }] if *topic == topics::ERROR => {
            let text = sphinx_wire::error_report::decode(payload).text;
            assert!(text.contains("backed up to LSS") && text.contains("--allow-without-lss"), "{text}");
        }
        other => panic!("a backed-up device must not sign without LSS, got {other:?}"),
    }
    // The operator's decision on the device: then it signs (without backup).
    a.signer.set_allow_without_lss(true);
    let outs = a.signer.on_message(topics::VLS, &steps[70].req.encode());
    match (outs.as_slice(), &want[70]) {
        ([Output::Publish { topic, payload }], Ok(w)) if *topic == topics::VLS_RES => assert_eq!(payload, w),
        (other, w) => panic!("{other:?} vs the oracle's {w:?}"),
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_stays_with_its_lss_server_unless_the_operator_moves_it() {
    let Setup { server, lss, init, steps, want } = setup("pin").await;
    let dir = temp_dir("lss-pin");
    let mut a = device(&dir);
    let mut s = dance(&lss, &mut a, &init).await.expect("dance");
    run(&mut a, &mut s, &steps[..70], &want[..70]).await;

    // The broker points the device at another server (its own, say): refused at init-1, and the
    // device stays out of sync (it signs nothing).
    let other = Lssd::start_temp("pin-other").expect("lssd");
    let other_lss = LssBackend::new(&other.url(), T).await.expect("lss");
    let refused = match dance(&other_lss, &mut a, &init).await {
        Err(DanceError::Signer { step: "init-1", text }) => text,
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("another LSS server was accepted"),
    };
    assert!(
        refused.contains("but this device is backed up to") && refused.contains("--lss-server-pubkey"),
        "{refused}"
    );
    // Back with its own server, it goes on.
    let mut s = dance(&lss, &mut a, &init).await.expect("dance with its own server");
    run(&mut a, &mut s, &steps[70..90], &want[70..90]).await;

    // The operator moves it: the new server gets the device's state, and is pinned from then on.
    let other_key = LssClient::info(&other.url(), T).await.expect("info").pubkey;
    a.signer.set_lss_server(Some(other_key));
    let d = init_dance(&other_lss, &mut a, Some(init.encode())).await.expect("dance with the new server");
    let mut s = d.session;
    assert_agree(&other.url(), &mut a, &d.identity).await;
    run(&mut a, &mut s, &steps[90..100], &want[90..100]).await;
    a.signer.set_lss_server(None);
    assert!(
        matches!(dance(&lss, &mut a, &init).await, Err(DanceError::Signer { step: "init-1", .. })),
        "the old server is refused once the device moved ({})",
        server.url()
    );
    let _ = std::fs::remove_dir_all(dir);
}
