//! The device status shown to a person: the states of upstream's FLOW.md behind a small trait,
//! so the binary can drive a terminal line, Linux LEDs, or anything else.

use std::fmt;

/// A state of the signer device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// The process is starting: loading the seed and the state.
    Starting,
    /// No network: the broker's address cannot be reached at all.
    NoNetwork,
    /// Network is up; connecting (or reconnecting) to the MQTT broker.
    ConnectingToBroker,
    /// Connected to the broker and idle.
    Connected,
    /// Handling a request.
    Signing,
    /// The last request failed (refused, undecodable, or an internal error).
    Error,
    /// The device is being reset (keys or settings wiped).
    Reset,
}

impl Status {
    /// Every state, in FLOW.md order.
    pub const ALL: [Status; 7] = [
        Status::Starting,
        Status::NoNetwork,
        Status::ConnectingToBroker,
        Status::Connected,
        Status::Signing,
        Status::Error,
        Status::Reset,
    ];

    /// A short lowercase name (`starting`, `no-network`, …).
    pub fn name(self) -> &'static str {
        match self {
            Status::Starting => "starting",
            Status::NoNetwork => "no-network",
            Status::ConnectingToBroker => "connecting",
            Status::Connected => "connected",
            Status::Signing => "signing",
            Status::Error => "error",
            Status::Reset => "reset",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Something that shows the device status (a terminal line, an LED, a status endpoint…).
///
/// `set` is called on every change and may be called again with the same state; it must be
/// cheap and must not panic (an indicator that fails should log and carry on).
pub trait StatusIndicator: Send {
    /// Shows `s`.
    fn set(&mut self, s: Status);
}

/// An indicator that shows nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoIndicator;

impl StatusIndicator for NoIndicator {
    fn set(&mut self, _s: Status) {}
}

/// An indicator that remembers every state it was given (for tests).
#[derive(Clone, Debug, Default)]
pub struct RecordingIndicator {
    /// The states set so far, in order.
    pub history: Vec<Status>,
}

impl StatusIndicator for RecordingIndicator {
    fn set(&mut self, s: Status) {
        self.history.push(s);
    }
}
