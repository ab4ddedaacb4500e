//! Embedded MQTT server (see docs/mqtt.md).
