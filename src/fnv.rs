//! FNV-1a, 64 bits: tiny, and stable across Rust releases (std's hasher is
//! not), so ids and digests derived from it survive an upgrade.

/// A running FNV-1a hash.
#[derive(Debug, Clone, Copy)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf29ce484222325)
    }
}

impl Fnv {
    /// Feeds `bytes` in.
    pub fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x100000001b3);
        }
    }

    /// The hash of what was fed so far.
    pub fn finish(&self) -> u64 {
        self.0
    }

    /// The hash of one byte string.
    pub fn hash(bytes: &[u8]) -> u64 {
        let mut h = Fnv::default();
        h.write(bytes);
        h.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        // From the FNV reference test suite.
        assert_eq!(Fnv::hash(b""), 0xcbf29ce484222325);
        assert_eq!(Fnv::hash(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(Fnv::hash(b"foobar"), 0x85944171f73967e8);
        let mut h = Fnv::default();
        h.write(b"foo");
        h.write(b"bar");
        assert_eq!(h.finish(), Fnv::hash(b"foobar"));
    }
}
