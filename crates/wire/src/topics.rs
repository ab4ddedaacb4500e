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
