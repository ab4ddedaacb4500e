//! MQTT topics, `{client_id}/{suffix}` as upstream sphinx-key. The client id is the signer's
//! node id in hex (the MQTT username), so a client's topics are exactly those under its own prefix.

/// Signer → broker: announces a (re)connected signer.
pub const HELLO: &str = "hello";
/// Signer → broker: a clean goodbye.
pub const BYE: &str = "bye";
/// Broker → signer: a serial request frame.
pub const VLS: &str = "vls";
/// Signer → broker: a serial reply frame.
pub const VLS_RES: &str = "vls-res";
/// Broker → signer: a control message.
pub const CONTROL: &str = "control";
/// Signer → broker: a control response.
pub const CONTROL_RES: &str = "control-res";
/// Signer → broker: an error report (text).
pub const ERROR: &str = "error";

// LSS backup (upstream sphinx-glyph `topics.rs`; payloads in `crate::lss`).
/// Broker → signer: `lss::Msg::Init` (the LSS server's key), first step of the init dance.
pub const INIT_1_MSG: &str = "init-1-msg";
/// Signer → broker: `lss::Response::Init` (client id, auth token, nonce).
pub const INIT_1_RES: &str = "init-1-res";
/// Broker → signer: `lss::Msg::Created` (LSS's state and server HMAC).
pub const INIT_2_MSG: &str = "init-2-msg";
/// Signer → broker: `lss::Response::Created` (mutations for the broker to `Put`).
pub const INIT_2_RES: &str = "init-2-res";
/// Broker → signer: lightningd's `hsmd_init` as a serial request frame (last step of the dance).
pub const INIT_3_MSG: &str = "init-3-msg";
/// Signer → broker: the `hsmd_init` reply as a serial reply frame.
pub const INIT_3_RES: &str = "init-3-res";
/// Broker → signer: `lss::Msg::Stored` (LSS stored a request's mutations: release the reply).
pub const LSS_MSG: &str = "lss-msg";
/// Signer → broker: `lss::Response::VlsMuts` (a request's mutations, before its reply).
pub const LSS_RES: &str = "lss-res";
/// Broker → signer: `lss::Msg::PutConflict` (LSS refused the `Put`: the signer's state is stale).
pub const LSS_CONFLICT: &str = "lss-conflict";
/// Signer → broker: `lss::Response::PutConflictConfirmed`.
pub const LSS_CONFLICT_RES: &str = "lss-conflict-res";

/// Every topic the broker publishes to a signer: what our signer subscribes to (the LSS ones stay
/// silent unless the broker runs LSS).
pub const TO_SIGNER: [&str; 7] = [VLS, CONTROL, INIT_1_MSG, INIT_2_MSG, INIT_3_MSG, LSS_MSG, LSS_CONFLICT];

/// `{client_id}/{suffix}`.
pub fn topic(client_id: &str, suffix: &str) -> String {
    format!("{client_id}/{suffix}")
}

/// Splits `{client_id}/{suffix}`; `None` if there is no `/` or either side is empty.
pub fn split(topic: &str) -> Option<(&str, &str)> {
    let (c, s) = topic.split_once('/')?;
    if c.is_empty() || s.is_empty() {
        return None;
    }
    Some((c, s))
}
