//! The simulated application: deterministic, so its output for an input is known.

use bytes::Bytes;

/// The application: a running state folded over every input byte; each byte yields one output
/// byte, every seventh value also the state's low bytes, and the end of input a trailer. Its
/// snapshot is the state.
#[derive(Clone, Default)]
pub struct App {
    state: u64,
}

impl App {
    pub fn restore(snapshot: Option<&Bytes>) -> App {
        let state = snapshot.map_or(0, |b| u64::from_le_bytes(b[..8].try_into().unwrap()));
        App { state }
    }

    pub fn snapshot(&self) -> Bytes {
        Bytes::copy_from_slice(&self.state.to_le_bytes())
    }

    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        for &b in input {
            self.state = self.state.wrapping_mul(31).wrapping_add(b as u64 + 1);
            out.push(b ^ self.state as u8);
            if b % 7 == 0 {
                out.extend_from_slice(&self.state.to_le_bytes()[..3]);
            }
        }
    }

    pub fn finish(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"END");
        out.extend_from_slice(&self.state.to_le_bytes());
    }

    /// What the client must receive for `input`.
    pub fn expected(input: &[u8]) -> Vec<u8> {
        let mut app = App::default();
        let mut out = Vec::new();
        app.feed(input, &mut out);
        app.finish(&mut out);
        out
    }
}
