//! The MQTT side: connect (plain TCP or TLS) with a fresh token, subscribe, say hello, hand each
//! broker message (`vls`, `control`, and with LSS backup the init dance and `lss-msg` /
//! `lss-conflict`) to the signer in order (`Signer::on_message`), publish what it answers,
//! reconnect with capped exponential backoff. All protocol logic is in
//! `sphinx_signer`; this is I/O only (plus the file deletions of an owner's reset). With LSS,
//! a staged request's local commit runs on a blocking thread while its `lss-res` goes out
//! (`Signer::take_staged_commit`), and is reported back before the next broker message.

use std::io::ErrorKind;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, NetworkOptions, Packet, QoS, TlsConfiguration,
    Transport,
};
use sphinx_signer::{ControlAction, Output, Signer, StagedCommit, Status, StatusIndicator};
use sphinx_wire::control::ControlResponse;
use sphinx_wire::{error_report, topics};
use tracing::{debug, error, info, warn};

/// How to reach the broker.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// Broker host name or address.
    pub host: String,
    /// Broker TCP port.
    pub port: u16,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// First reconnect delay (doubles after each failure).
    pub backoff_min: Duration,
    /// Cap of the reconnect delay.
    pub backoff_max: Duration,
    /// TLS client configuration (`None`: plaintext TCP).
    pub tls: Option<Arc<sphinx_tls::rustls::ClientConfig>>,
    /// The data directory (seed and owner key files, deleted by an owner's reset).
    pub data_dir: PathBuf,
    /// Group commit: most `vls` requests handled and committed together (1: one at a time).
    pub batch_max: usize,
    /// The MQTT client id: the broker's name for this device and its topic prefix
    /// (`{client_id}/vls`, …). Distinct per device, so that several devices with one seed can
    /// be connected at once (docs/signer.md "Several signers").
    pub client_id: String,
    /// The status page and metrics (LSS phase after each message).
    pub observer: Option<Arc<crate::observe::Observer>>,
}

/// How long to wait for the broker to acknowledge a reset's response before acting on it.
const RESET_ACK_WAIT: Duration = Duration::from_secs(5);

/// Largest payload accepted or sent: an hsmd message (16 MiB) plus the serial header.
const MAX_PACKET: usize = 16 * 1024 * 1024 + 256;

/// A staged request's local commit running on a blocking thread.
type RunningCommit = tokio::task::JoinHandle<Result<(), sphinx_signer::Error>>;

fn start_commit(c: StagedCommit) -> RunningCommit {
    tokio::task::spawn_blocking(move || c.run())
}

/// Waits for the running commit, if any, and tells the signer how it ended.
async fn settle(signer: &mut Signer, commit: &mut Option<RunningCommit>) {
    if let Some(h) = commit.take() {
        let r = h.await.unwrap_or_else(|e| Err(sphinx_signer::Error::Persist(format!("commit thread: {e}"))));
        signer.staged_commit_done(r);
    }
}

fn now_secs() -> u32 {
    sphinx_wire::unix_now() as u32
}

/// The token time of the next login: now, but after the previous attempt's. The broker wants
/// each login of a node later than its last accepted one; another device of the same node that
/// logged in within the same second gets this one refused once, and the retry (after the
/// shortest backoff) carries a later time instead of waiting for the clock's next second.
fn next_token_time(now: u32, previous: Option<u32>) -> u32 {
    match previous {
        Some(p) if p >= now => p.saturating_add(1),
        _ => now,
    }
}

/// One connection attempt's options, with a fresh login token for time `ts`.
fn options(signer: &Signer, rc: &RunConfig, ts: u32) -> MqttOptions {
    let mut o = MqttOptions::new(rc.client_id.clone(), rc.host.clone(), rc.port);
    o.set_credentials(signer.node_id_hex(), signer.login_token(ts));
    o.set_keep_alive(rc.keep_alive);
    o.set_clean_session(true);
    o.set_max_packet_size(MAX_PACKET, MAX_PACKET);
    o.set_request_channel_capacity(64);
    if let Some(cfg) = &rc.tls {
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(cfg.clone())));
    }
    o
}

fn network_options() -> NetworkOptions {
    let mut n = NetworkOptions::new();
    // Nagle + delayed ACK would add ~90 ms to every QoS 1 request/reply pair.
    n.set_tcp_nodelay(true);
    n.set_connection_timeout(5);
    n
}

/// The state a connection error leaves the device in.
fn status_for(e: &ConnectionError) -> Status {
    match e {
        ConnectionError::Io(io) => match io.kind() {
            ErrorKind::NetworkUnreachable
            | ErrorKind::HostUnreachable
            | ErrorKind::NetworkDown
            | ErrorKind::AddrNotAvailable
            | ErrorKind::Other => Status::NoNetwork,
            _ => Status::ConnectingToBroker,
        },
        _ => Status::ConnectingToBroker,
    }
}

/// Why a connection ended.
enum End {
    /// The connection failed or dropped: reconnect.
    Lost,
    /// Ctrl-C / SIGTERM: stop.
    Shutdown,
    /// The owner reset the keys (or everything): carry it out, then send the response and stop.
    Reset {
        /// ResetKeys or ResetAll.
        action: ControlAction,
        /// The signed acknowledgement, sent once the files are deleted.
        ack: Vec<u8>,
        /// A signed error response, sent instead if deleting fails.
        failed: Vec<u8>,
    },
}

/// Runs until interrupted: connects, serves, reconnects.
pub async fn run(mut signer: Signer, mut ind: Box<dyn StatusIndicator>, rc: RunConfig) -> Result<()> {
    // Topics are under the client id (the broker's identity for this device).
    let id = rc.client_id.clone();
    info!(node_id = %signer.node_id_hex(), client_id = %id, broker = %format!("{}:{}", rc.host, rc.port), tls = rc.tls.is_some(), "sphinx-key running");
    let mut backoff = rc.backoff_min;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut last_ts = None;
    loop {
        ind.set(Status::ConnectingToBroker);
        let ts = next_token_time(now_secs(), last_ts);
        last_ts = Some(ts);
        let (client, mut el) = AsyncClient::new(options(&signer, &rc, ts), 64);
        el.set_network_options(network_options());
        let mut commit = None;
        let end = tokio::select! {
            end = serve(&mut signer, ind.as_mut(), &id, &client, &mut el, &mut backoff, &rc, &mut commit) => end,
            _ = tokio::signal::ctrl_c() => End::Shutdown,
            _ = sigterm.recv() => End::Shutdown,
        };
        settle(&mut signer, &mut commit).await;
        match end {
            End::Shutdown => {
                info!("shutting down");
                let _ = client.try_publish(topics::topic(&id, topics::BYE), QoS::AtMostOnce, false, Vec::new());
                let _ = client.try_disconnect();
                let _ =
                    tokio::time::timeout(Duration::from_millis(500), async { while el.poll().await.is_ok() {} }).await;
                return Ok(());
            }
            End::Reset { action, ack, failed } => {
                ind.set(Status::Reset);
                // Do it first, so that an acknowledgement always means "done"; the signer
                // already refuses every request.
                let done = reset(signer, action, &rc);
                let response = match &done {
                    Ok(()) => ack,
                    Err(e) => {
                        error!(error = %format!("{e:#}"), "reset failed");
                        failed
                    }
                };
                let control_res = topics::topic(&id, topics::CONTROL_RES);
                match client.try_publish(control_res, QoS::AtLeastOnce, false, response) {
                    Ok(()) => wait_puback(&mut el).await,
                    Err(e) => warn!(error = %e, "cannot publish the reset's response"),
                }
                let _ = client.try_publish(topics::topic(&id, topics::BYE), QoS::AtMostOnce, false, Vec::new());
                let _ = client.try_disconnect();
                let _ =
                    tokio::time::timeout(Duration::from_millis(500), async { while el.poll().await.is_ok() {} }).await;
                done?;
                error!(?action, "the owner reset this device; it stops signing");
                return Err(crate::seed::NeedsInit(format!(
                    "the owner reset this device ({action:?}): run `sphinx-key init` to set it up again"
                ))
                .into());
            }
            End::Lost => {
                debug!(?backoff, "reconnecting after backoff");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                    _ = sigterm.recv() => return Ok(()),
                }
                backoff = (backoff * 2).min(rc.backoff_max);
            }
        }
    }
}

/// Carries out an owner's reset: deletes the seed (ResetKeys), or the seed, the owner key and
/// the state directory (ResetAll).
fn reset(signer: Signer, action: ControlAction, rc: &RunConfig) -> Result<()> {
    let all = action == ControlAction::ResetAll;
    crate::seed::delete(&rc.data_dir, all)?;
    if all {
        signer.destroy_state()?;
    }
    Ok(())
}

/// Polls until the broker acknowledges a QoS 1 publish (or the wait ends): a reset's response
/// should be out before the seed is deleted.
async fn wait_puback(el: &mut EventLoop) {
    let r = tokio::time::timeout(RESET_ACK_WAIT, async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await;
    if !matches!(r, Ok(true)) {
        warn!("the broker did not acknowledge the reset's response; resetting anyway");
    }
}

/// Serves one connection until it ends. `commit`: the staged request's local commit, while it
/// runs (settled before the signer sees the next message, and by the caller at the end).
#[allow(clippy::too_many_arguments)]
async fn serve(
    signer: &mut Signer,
    ind: &mut dyn StatusIndicator,
    id: &str,
    client: &AsyncClient,
    el: &mut EventLoop,
    backoff: &mut Duration,
    rc: &RunConfig,
    commit: &mut Option<RunningCommit>,
) -> End {
    // Everything the broker may send.
    const SUBSCRIBED: [&str; 7] = topics::TO_SIGNER;
    let prefix = format!("{id}/");
    loop {
        let ev = match el.poll().await {
            Ok(ev) => ev,
            Err(e) => {
                let s = status_for(&e);
                ind.set(s);
                match &e {
                    ConnectionError::ConnectionRefused(code) => {
                        error!(?code, "broker refused the login (token, clock or node id not accepted)")
                    }
                    _ => warn!(error = %e, "broker connection lost"),
                }
                return End::Lost;
            }
        };
        match ev {
            Event::Incoming(Packet::ConnAck(_)) => {
                info!("connected to broker; subscribing");
                // A new broker session: it must sync the device with LSS again before it signs.
                signer.new_session();
                if let Some(o) = &rc.observer {
                    o.set_lss(signer.lss_phase());
                }
                *backoff = rc.backoff_min;
                let subs = SUBSCRIBED.map(|s| rumqttc::SubscribeFilter::new(topics::topic(id, s), QoS::AtLeastOnce));
                if let Err(e) = client.try_subscribe_many(subs) {
                    warn!(error = %e, "cannot subscribe");
                    return End::Lost;
                }
            }
            Event::Incoming(Packet::SubAck(_)) => {
                // Subscribed: now the broker may send requests.
                if let Err(e) =
                    client.try_publish(topics::topic(id, topics::HELLO), QoS::AtLeastOnce, false, error_report::HELLO)
                {
                    warn!(error = %e, "cannot publish hello");
                    return End::Lost;
                }
                ind.set(Status::Connected);
                info!("subscribed; said hello");
            }
            Event::Incoming(Packet::Publish(p)) => {
                // Group commit: take the publishes already read from the socket (never wait for
                // more), up to the batch size, and hand them over in arrival order. rumqttc queues
                // an `Outgoing(PubAck)` before each QoS 1 publish it read; those, and the acks and
                // ping responses this loop ignores anyway, are skipped. Anything else (ConnAck,
                // SubAck) ends the batch and is handled by the next poll.
                let mut batch = vec![p];
                while batch.len() < rc.batch_max {
                    match el.state.events.front() {
                        Some(Event::Incoming(Packet::Publish(_))) => {
                            if let Some(Event::Incoming(Packet::Publish(p))) = el.state.events.pop_front() {
                                batch.push(p);
                            }
                        }
                        Some(Event::Outgoing(_) | Event::Incoming(Packet::PubAck(_) | Packet::PingResp)) => {
                            el.state.events.pop_front();
                        }
                        _ => break,
                    }
                }
                let mut msgs: Vec<(&'static str, bytes::Bytes)> = Vec::with_capacity(batch.len());
                for p in batch {
                    let topic = String::from_utf8_lossy(p.topic.as_ref()).into_owned();
                    match topic.strip_prefix(&prefix).and_then(|s| SUBSCRIBED.iter().find(|t| **t == s)) {
                        Some(suffix) => msgs.push((suffix, p.payload)),
                        None => debug!(%topic, "ignoring message on unexpected topic"),
                    }
                }
                if msgs.is_empty() {
                    continue;
                }
                if msgs.iter().any(|(s, _)| *s == topics::VLS) {
                    ind.set(Status::Signing);
                }
                settle(signer, commit).await;
                let t = std::time::Instant::now();
                let mut failed = false;
                let views: Vec<(&str, &[u8])> = msgs.iter().map(|(s, p)| (*s, p.as_ref())).collect();
                for out in signer.on_messages(&views) {
                    let (to, payload) = match out {
                        Output::Publish { topic, payload } => {
                            if topic == topics::ERROR {
                                failed = true;
                                // The operator's log line, and what the metrics classify.
                                let report = sphinx_wire::error_report::decode(&payload);
                                if let Some(seq) = report.seq {
                                    warn!(seq, error = %report.text, "request failed");
                                }
                            }
                            (topic, payload)
                        }
                        Output::Control(out) => {
                            debug!(answer = ?out.answer, nonce = out.nonce, "control message handled");
                            if let Some(action @ (ControlAction::ResetKeys | ControlAction::ResetAll)) = out.action {
                                let failed = signer.sign_control_response(
                                    &ControlResponse::Error("the reset failed on the device: see its log".into()),
                                    out.nonce,
                                );
                                return End::Reset { action, ack: out.response, failed };
                            }
                            if out.action == Some(ControlAction::ResetWifi) {
                                info!("ResetWifi: no network settings to forget on Linux (acknowledged)");
                            }
                            (topics::CONTROL_RES, out.response)
                        }
                    };
                    if let Err(e) = client.try_publish(topics::topic(id, to), QoS::AtLeastOnce, false, payload) {
                        warn!(error = %e, topic = to, "cannot publish");
                        return End::Lost;
                    }
                }
                // The `lss-res` just queued goes out on the next poll, while this commits.
                *commit = signer.take_staged_commit().map(start_commit);
                if let Some(o) = &rc.observer {
                    o.set_lss(signer.lss_phase());
                }
                debug!(messages = msgs.len(), elapsed_us = t.elapsed().as_micros() as u64, "broker messages handled");
                ind.set(if failed { Status::Error } else { Status::Connected });
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_login_carries_a_later_token_time_than_the_previous_attempt() {
        assert_eq!(next_token_time(100, None), 100);
        // Retried within the same second (refused: another device of this node logged in then).
        assert_eq!(next_token_time(100, Some(100)), 101);
        assert_eq!(next_token_time(100, Some(101)), 102);
        // The clock moved on: back to it.
        assert_eq!(next_token_time(105, Some(102)), 105);
        assert_eq!(next_token_time(u32::MAX, Some(u32::MAX)), u32::MAX);
    }
}
