//! sphinx-broker: a drop-in hsmd for Core Lightning that relays requests to sphinx-key signers
//! over an embedded, authenticated MQTT broker.

pub mod mqtt;
