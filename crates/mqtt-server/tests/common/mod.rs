//! Helpers shared by the MQTT server's integration tests (`mod common;` in each file).
#![allow(dead_code)]

use std::time::Duration;

use sphinx_mqtt_server::{MqttEvent, MqttEvents};

/// How long the tests wait for anything: only turns a hang into a failure.
pub const WAIT: Duration = Duration::from_secs(10);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "sphinx_mqtt_server=debug".into()),
        )
        .with_test_writer()
        .try_init();
}

pub async fn next_event(rx: &mut MqttEvents) -> MqttEvent {
    tokio::time::timeout(WAIT, rx.recv()).await.expect("timed out waiting for an event").expect("event channel closed")
}

/// A test authenticator's refusal.
#[derive(Debug)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}
