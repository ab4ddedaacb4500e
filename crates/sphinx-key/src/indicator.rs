//! Status indicators of the Linux device: a terminal line, or a LED under `/sys/class/leds`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use sphinx_signer::{Status, StatusIndicator};
use tracing::warn;

/// Prints each change of state as one line on stderr. The momentary `signing` state is not
/// printed (it would print two lines per request); it is visible in the debug log instead.
#[derive(Default)]
pub struct Terminal {
    last: Option<Status>,
}

impl StatusIndicator for Terminal {
    fn set(&mut self, s: Status) {
        if s == Status::Signing || self.last == Some(s) {
            return;
        }
        self.last = Some(s);
        let _ = writeln!(std::io::stderr(), "sphinx-key status: {s}");
    }
}

/// How a state looks on one LED: solid brightness, or blinking with the kernel's `timer` trigger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LedPattern {
    /// Steady off.
    Off,
    /// Steady on.
    On,
    /// On/off for these many milliseconds each.
    Blink(u32, u32),
}

/// The LED pattern of each state (documented in docs/signer.md).
pub fn pattern(s: Status) -> LedPattern {
    match s {
        Status::Starting => LedPattern::On,
        Status::NoNetwork => LedPattern::Blink(1000, 1000),
        Status::ConnectingToBroker => LedPattern::Blink(250, 250),
        Status::Connected => LedPattern::On,
        Status::Signing => LedPattern::Off,
        Status::Error => LedPattern::Blink(100, 100),
        Status::Reset => LedPattern::Blink(50, 950),
    }
}

/// A Linux LED, `/sys/class/leds/NAME`: writes `brightness`, and `trigger`/`delay_on`/`delay_off`
/// for blinking states when the LED has a `trigger` file (without one, blinking states show solid on).
pub struct Led {
    dir: PathBuf,
    max: String,
    has_trigger: bool,
    last: Option<LedPattern>,
    warned: bool,
}

impl Led {
    /// The LED `name` under `/sys/class/leds`.
    pub fn new(name: &str) -> Self {
        Self::at(Path::new("/sys/class/leds").join(name))
    }

    /// An LED whose sysfs directory is `dir` (tests use a plain directory).
    pub fn at(dir: PathBuf) -> Self {
        let max = fs::read_to_string(dir.join("max_brightness"))
            .map(|s| s.trim().to_string())
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "1".into());
        let has_trigger = dir.join("trigger").exists();
        if !dir.join("brightness").exists() {
            warn!(led = %dir.display(), "LED has no brightness file; status will not show");
        }
        Led { dir, max, has_trigger, last: None, warned: false }
    }

    fn write(&mut self, file: &str, value: &str) {
        if let Err(e) = fs::write(self.dir.join(file), value) {
            if !self.warned {
                warn!(led = %self.dir.display(), file, error = %e, "cannot drive LED");
                self.warned = true;
            }
        }
    }
}

impl StatusIndicator for Led {
    fn set(&mut self, s: Status) {
        let p = pattern(s);
        if self.last == Some(p) {
            return;
        }
        self.last = Some(p);
        let max = self.max.clone();
        match p {
            LedPattern::Off | LedPattern::On => {
                if self.has_trigger {
                    self.write("trigger", "none");
                }
                self.write("brightness", if p == LedPattern::On { &max } else { "0" });
            }
            LedPattern::Blink(on, off) => {
                if self.has_trigger {
                    self.write("trigger", "timer");
                    self.write("delay_on", &on.to_string());
                    self.write("delay_off", &off.to_string());
                } else {
                    self.write("brightness", &max);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn led_writes_sysfs_files() {
        let d = std::env::temp_dir().join(format!("sphinx-key-led-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("brightness"), "0").unwrap();
        fs::write(d.join("max_brightness"), "255\n").unwrap();
        fs::write(d.join("trigger"), "none").unwrap();
        let mut led = Led::at(d.clone());
        led.set(Status::Connected);
        assert_eq!(fs::read_to_string(d.join("brightness")).unwrap(), "255");
        assert_eq!(fs::read_to_string(d.join("trigger")).unwrap(), "none");
        led.set(Status::ConnectingToBroker);
        assert_eq!(fs::read_to_string(d.join("trigger")).unwrap(), "timer");
        assert_eq!(fs::read_to_string(d.join("delay_on")).unwrap(), "250");
        led.set(Status::Signing);
        assert_eq!(fs::read_to_string(d.join("brightness")).unwrap(), "0");
        // Every state has a pattern and a missing LED never panics.
        let mut ghost = Led::at(d.join("missing"));
        for s in Status::ALL {
            ghost.set(s);
        }
        let _ = fs::remove_dir_all(&d);
    }
}
