//! A small deterministic input mutator for the decoders' "never panic" tests: the same
//! seed gives the same inputs on every run, so a failure reproduces exactly. Each test runs
//! thousands of truncations, bit flips, byte insertions and splices of valid inputs, plus
//! random bytes.

/// xorshift64* — fast, deterministic, good enough to generate test inputs.
pub struct Mutator {
    state: u64,
}

impl Mutator {
    /// A mutator with a fixed seed.
    pub fn new(seed: u64) -> Self {
        Self { state: seed.max(1) }
    }

    /// The next pseudo-random number.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number below `n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// A mutated copy of one of `seeds`, or random bytes.
    pub fn input(&mut self, seeds: &[&[u8]]) -> Vec<u8> {
        if seeds.is_empty() || self.below(10) == 0 {
            let len = self.below(64);
            return (0..len).map(|_| self.next_u64() as u8).collect();
        }
        let mut data = seeds[self.below(seeds.len())].to_vec();
        for _ in 0..=self.below(4) {
            match self.below(5) {
                0 if !data.is_empty() => data.truncate(self.below(data.len())),
                1 if !data.is_empty() => {
                    let i = self.below(data.len());
                    data[i] ^= 1 << self.below(8);
                }
                2 => {
                    let i = self.below(data.len() + 1);
                    data.insert(i, self.next_u64() as u8);
                }
                3 if !data.is_empty() => {
                    let i = self.below(data.len());
                    data[i] = [0, 0xff, b'{', b'"', b'\\', b'}', b',', 0x7f][self.below(8)];
                }
                _ => {
                    let other = seeds[self.below(seeds.len())];
                    let cut = self.below(data.len() + 1);
                    let from = self.below(other.len() + 1);
                    data.truncate(cut);
                    data.extend_from_slice(&other[from..]);
                }
            }
        }
        data
    }
}
