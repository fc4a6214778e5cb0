//! Deterministic pseudo-random input for the fuzz-like tests: a seeded xorshift so a failure
//! reproduces exactly, without pulling in a fuzzing crate.

pub(crate) struct XorShift(u64);

impl XorShift {
    pub(crate) fn new(seed: u64) -> Self {
        XorShift(seed.max(1))
    }

    pub(crate) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform-ish in `0..n`; `n == 0` yields 0.
    pub(crate) fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    pub(crate) fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }

    /// A copy of `input` with a few random edits: flipped bytes, truncation, insertions, or
    /// an extreme varuint byte. Mutating valid messages reaches much deeper into decoders
    /// than purely random bytes do.
    pub(crate) fn mutate(&mut self, input: &[u8]) -> Vec<u8> {
        let mut out = input.to_vec();
        for _ in 0..=self.below(3) {
            match self.below(5) {
                0 if !out.is_empty() => {
                    let i = self.below(out.len());
                    out[i] ^= 1 << self.below(8);
                }
                1 if !out.is_empty() => {
                    let len = self.below(out.len());
                    out.truncate(len);
                }
                2 => {
                    let i = self.below(out.len() + 1);
                    let b = self.next() as u8;
                    out.insert(i, b);
                }
                3 if !out.is_empty() => {
                    let i = self.below(out.len());
                    out[i] = [0x00, 0x7f, 0x80, 0xff][self.below(4)];
                }
                _ => {
                    let i = self.below(out.len() + 1);
                    out.splice(i..i, [0xff, 0xff, 0xff, 0xff, 0x0f]);
                }
            }
        }
        out
    }
}
