//! A link's impairments and how its delay lines run.

use crate::*;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Impairments of one host↔router link (see the crate docs for their exact meaning).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Impairment {
    /// Round-trip time the link adds, ms (half of it in each direction).
    pub delay_ms: u32,
    /// Packets dropped in each direction, percent (0–100, resolution 0.01).
    pub loss_pct: f64,
    /// Rate limit of each direction, Mbit/s (`None`: unlimited).
    pub rate_mbit: Option<f64>,
    /// Drop every packet to and from the host.
    pub blackhole: bool,
}

impl Impairment {
    /// Whether the link needs a delay line (delay or loss).
    pub fn needs_line(&self) -> bool {
        self.delay_ms > 0 || self.loss_pct > 0.0
    }

    /// Checks the values are usable.
    pub fn check(&self) -> Result<()> {
        if !(0.0..=100.0).contains(&self.loss_pct) {
            return Err(Error::Invalid(format!(
                "loss {} % is not within 0..=100",
                self.loss_pct
            )));
        }
        if let Some(r) = self.rate_mbit {
            if !(0.008..=100_000.0).contains(&r) {
                return Err(Error::Invalid(format!(
                    "rate {r} Mbit/s is not within 0.008..=100000"
                )));
            }
        }
        if self.delay_ms > 60_000 {
            return Err(Error::Invalid(format!(
                "delay {} ms is over 60000",
                self.delay_ms
            )));
        }
        Ok(())
    }
}

impl std::fmt::Display for Impairment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if self.blackhole {
            parts.push("BLACKHOLE".to_string());
        }
        if self.delay_ms > 0 {
            parts.push(format!("delay {} ms RTT", self.delay_ms));
        }
        if self.loss_pct > 0.0 {
            parts.push(format!("loss {} %", self.loss_pct));
        }
        if let Some(r) = self.rate_mbit {
            parts.push(format!("rate {r} Mbit/s"));
        }
        if parts.is_empty() {
            f.write_str("-")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

/// Who runs the delay lines of TUN links.
#[derive(Debug, Clone, Default)]
pub enum DelayRunner {
    /// Threads of the process that holds the [`Lab`] (tests, benchmarks).
    #[default]
    InProcess,
    /// One process per link: `program ARGS… --tag T --host H`, which must call
    /// [`serve_delay_line`] (e.g. `mtcp lab delayline`); used by `mtcp lab up`, whose process
    /// exits while the lab lives on.
    Process { program: PathBuf, args: Vec<String> },
}
