//! `lssd`: VLS's Lightning Storage Server (the crates.io `lssd` crate, redb backend), for the tests
//! and the demo (`scripts/lssd`). Same behaviour as upstream's binary: a panic aborts the process,
//! so that a failed server never keeps a half-working gRPC port open.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        std::process::abort();
    }));
    lssd::driver::start()
}
