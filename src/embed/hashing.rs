//! The built-in deterministic local model of the embedded default: signed
//! feature hashing of word tokens and character trigrams, L2-normalised.
//!
//! It needs no service, no weights and no network, and a given text always
//! maps to the same vector on every platform and Rust version: features are
//! hashed with FNV-1a 64 (followed by a fixed bit mixer), never with std's
//! randomly seeded `DefaultHasher`.
//!
//! How a text becomes a vector:
//! 1. The text is lowercased character by character (`char::to_lowercase`)
//!    and split into tokens on every character that is not alphanumeric.
//! 2. Each token is a feature of weight 1.0; each character trigram of the
//!    token padded as `<token>` is a feature of weight 0.5 (so `ab` gives
//!    `<ab` and `ab>`; a one-letter token `a` gives `<a>`). Tokens and
//!    trigrams are hashed in separate domains, so the token `abc` and the
//!    trigram `abc` of `abcd` never share a hash.
//! 3. A feature with hash `h` adds `±weight` to component `h % dimension`,
//!    the sign taken from the top bit of `h`.
//! 4. The vector is scaled to unit L2 norm. A text with no alphanumeric
//!    character (including the empty text) has no features and gives the
//!    **zero vector**, which is the one output that is not of unit norm.

use futures::future::BoxFuture;

use super::{EmbedError, Embedder};

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
/// Domain tags fed before a feature's bytes.
const TOKEN_TAG: u8 = 0x01;
const TRIGRAM_TAG: u8 = 0x02;
const TOKEN_WEIGHT: f32 = 1.0;
const TRIGRAM_WEIGHT: f32 = 0.5;

/// Streaming FNV-1a 64 over UTF-8 bytes; allocation free.
#[derive(Clone, Copy)]
struct Fnv(u64);

impl Fnv {
    #[inline]
    fn new(tag: u8) -> Self {
        let mut h = Fnv(FNV_OFFSET);
        h.byte(tag);
        h
    }

    #[inline]
    fn byte(&mut self, b: u8) {
        self.0 ^= u64::from(b);
        self.0 = self.0.wrapping_mul(FNV_PRIME);
    }

    #[inline]
    fn char(&mut self, c: char) {
        if c.is_ascii() {
            // Its UTF-8 is the one byte.
            self.byte(c as u8);
            return;
        }
        let mut buf = [0u8; 4];
        for &b in c.encode_utf8(&mut buf).as_bytes() {
            self.byte(b);
        }
    }

    /// FNV's low bits mix poorly; the MurmurHash3 64-bit finaliser spreads
    /// every input bit over the whole word before we take `% dim` and the sign.
    #[inline]
    fn finish(self) -> u64 {
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^= h >> 33;
        h
    }
}

/// Deterministic local embedding model (see the module docs for the method).
#[derive(Debug, Clone)]
pub struct HashingEmbedder {
    model: String,
    dimension: usize,
    max_batch: usize,
    /// `h % dimension` without a division ([`FastMod`]).
    modulo: FastMod,
}

/// Exact `a % d` for any 64-bit `a` by multiplications (Lemire, Kaser and
/// Kurz, "Faster Remainder by Direct Computation", 2019): a 64-bit division
/// per feature was a fifth of the embedder's time.
#[derive(Debug, Clone, Copy)]
struct FastMod {
    m: u128,
    d: u64,
}

impl FastMod {
    fn new(d: u64) -> Self {
        Self { m: (u128::MAX / u128::from(d)).wrapping_add(1), d }
    }

    #[inline]
    fn rem(self, a: u64) -> u64 {
        if self.d == 1 {
            return 0;
        }
        let low = self.m.wrapping_mul(u128::from(a));
        // The high 64 bits of the 192-bit product `low * d`.
        let d = u128::from(self.d);
        let hi = (low >> 64) * d;
        let lo = (low & u128::from(u64::MAX)) * d;
        ((hi + (lo >> 64)) >> 64) as u64
    }
}

impl HashingEmbedder {
    /// An embedder producing vectors of length `dimension`, accepting up to
    /// `max_batch` texts per [`Embedder::embed`] call. Its model id is
    /// `hashing-v1-d{dimension}`, so rows embedded with different dimensions
    /// are told apart.
    ///
    /// # Panics
    /// If `dimension` or `max_batch` is 0 (validate configuration first).
    pub fn new(dimension: usize, max_batch: usize) -> Self {
        assert!(dimension > 0, "HashingEmbedder dimension must be at least 1");
        assert!(max_batch > 0, "HashingEmbedder max_batch must be at least 1");
        Self { model: format!("hashing-v1-d{dimension}"), dimension, max_batch, modulo: FastMod::new(dimension as u64) }
    }

    /// The vector of one text.
    pub fn embed_one(&self, text: &str) -> Vec<f32> {
        let mut out = vec![0.0; self.dimension];
        self.embed_into(text, &mut out, &mut Vec::new());
        out
    }

    /// Writes the vector of `text` into `out`, which must be `dimension()`
    /// long; `token` is scratch space reused between calls so that a batch
    /// allocates it once.
    fn embed_into(&self, text: &str, out: &mut [f32], token: &mut Vec<char>) {
        debug_assert_eq!(out.len(), self.dimension);
        out.fill(0.0);
        token.clear();
        for c in text.chars() {
            // ASCII (most text): the same answers as the general path, faster.
            if c.is_ascii() {
                let l = c.to_ascii_lowercase();
                if l.is_ascii_alphanumeric() {
                    token.push(l);
                } else if !token.is_empty() {
                    self.add_token(token, out);
                    token.clear();
                }
                continue;
            }
            for l in c.to_lowercase() {
                if l.is_alphanumeric() {
                    token.push(l);
                } else if !token.is_empty() {
                    self.add_token(token, out);
                    token.clear();
                }
            }
        }
        if !token.is_empty() {
            self.add_token(token, out);
            token.clear();
        }
        let norm = out.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            let inv = 1.0 / norm;
            out.iter_mut().for_each(|x| *x *= inv);
        }
    }

    /// Adds the token feature and the trigram features of one non-empty token.
    #[inline]
    fn add_token(&self, token: &[char], out: &mut [f32]) {
        let mut h = Fnv::new(TOKEN_TAG);
        for &c in token {
            h.char(c);
        }
        self.add_feature(h.finish(), TOKEN_WEIGHT, out);

        // Trigrams over `<` token `>`: padded length n = len + 2 >= 3.
        let n = token.len() + 2;
        let padded = |j: usize| -> char {
            if j == 0 {
                '<'
            } else if j == n - 1 {
                '>'
            } else {
                token[j - 1]
            }
        };
        for i in 0..n - 2 {
            let mut h = Fnv::new(TRIGRAM_TAG);
            h.char(padded(i));
            h.char(padded(i + 1));
            h.char(padded(i + 2));
            self.add_feature(h.finish(), TRIGRAM_WEIGHT, out);
        }
    }

    #[inline]
    fn add_feature(&self, h: u64, weight: f32, out: &mut [f32]) {
        let index = self.modulo.rem(h) as usize;
        let sign = if h >> 63 == 0 { 1.0 } else { -1.0 };
        out[index] += sign * weight;
    }
}

impl Embedder for HashingEmbedder {
    fn model(&self) -> &str {
        &self.model
    }

    fn dimension(&self) -> usize {
        self.dimension
    }

    fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Computes synchronously; the returned future is already complete.
    /// Unlike a remote model it accepts any number of texts in one call.
    fn embed<'a>(&'a self, texts: &'a [String]) -> BoxFuture<'a, Result<Vec<Vec<f32>>, EmbedError>> {
        let mut token = Vec::new();
        let vectors = texts
            .iter()
            .map(|text| {
                let mut v = vec![0.0; self.dimension];
                self.embed_into(text, &mut v, &mut token);
                v
            })
            .collect();
        Box::pin(futures::future::ready(Ok(vectors)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    fn cosine(a: &[f32], b: &[f32]) -> f32 {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let na = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        let nb = b.iter().map(|x| x * x).sum::<f32>().sqrt();
        dot / (na * nb)
    }

    fn norm(v: &[f32]) -> f32 {
        v.iter().map(|x| x * x).sum::<f32>().sqrt()
    }

    #[test]
    fn fast_modulo_is_the_remainder() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for d in [1u64, 2, 3, 7, 64, 384, 768, 1000, 1536, 3072, 4096, 65_537, u32::MAX as u64, u64::MAX / 3, u64::MAX] {
            let f = FastMod::new(d);
            for a in [0, 1, d - 1, d, d.wrapping_add(1), u64::MAX, u64::MAX - 1, u64::MAX / 2] {
                assert_eq!(f.rem(a), a % d, "{a} % {d}");
            }
            for _ in 0..10_000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                assert_eq!(f.rem(x), x % d, "{x} % {d}");
            }
        }
    }

    #[test]
    fn fnv_matches_the_published_test_vectors() {
        // FNV-1a 64 of "" and "a" (before our tag byte and finaliser).
        assert_eq!(Fnv(FNV_OFFSET).0, 0xcbf2_9ce4_8422_2325);
        let mut h = Fnv(FNV_OFFSET);
        h.byte(b'a');
        assert_eq!(h.0, 0xaf63_dc4c_8601_ec8c);
        let mut h = Fnv(FNV_OFFSET);
        for &b in b"foobar" {
            h.byte(b);
        }
        assert_eq!(h.0, 0x8594_4171_f739_67e8);
    }

    #[test]
    fn model_id_names_the_dimension() {
        let e = HashingEmbedder::new(384, 32);
        assert_eq!(e.model(), "hashing-v1-d384");
        assert_eq!(e.dimension(), 384);
        assert_eq!(e.max_batch(), 32);
        assert_ne!(HashingEmbedder::new(256, 32).model(), e.model());
    }

    #[test]
    fn deterministic_across_instances_and_calls() {
        let a = HashingEmbedder::new(256, 8);
        let b = HashingEmbedder::new(256, 8);
        let text = "Kafka topics feed ClickHouse tables; Ünïcödé too!";
        let va = a.embed_one(text);
        assert_eq!(va, b.embed_one(text));
        assert_eq!(va, a.embed_one(text));
        assert!(va.iter().any(|&x| x != 0.0));
    }

    #[test]
    fn stable_across_platforms_and_versions() {
        // Pinned output: a change here changes every stored embedding, so it
        // must come with a new model id.
        let v = HashingEmbedder::new(16, 1).embed_one("Hello, world");
        let nonzero: Vec<(usize, f32)> =
            v.iter().enumerate().filter(|(_, x)| **x != 0.0).map(|(i, x)| (i, (x * 1e4).round() / 1e4)).collect();
        let again = HashingEmbedder::new(16, 1).embed_one("hello WORLD!!");
        assert_eq!(v, again, "case and punctuation do not matter");
        assert_eq!(nonzero, PINNED_HELLO_WORLD_D16.to_vec());
    }

    /// Non-zero components of `HashingEmbedder::new(16, _).embed_one("hello world")`,
    /// rounded to 1e-4; computed independently from the algorithm in the module docs.
    const PINNED_HELLO_WORLD_D16: &[(usize, f32)] = &[
        (0, -0.3922),
        (1, -0.1961),
        (2, -0.1961),
        (3, -0.1961),
        (4, -0.3922),
        (10, -0.3922),
        (13, -0.1961),
        (14, 0.1961),
        (15, 0.5883),
    ];

    #[test]
    fn unit_norm_and_dimension_respected() {
        for dim in [1, 7, 64, 384] {
            let e = HashingEmbedder::new(dim, 4);
            for text in ["a", "hello world", "The quick brown fox jumps over the lazy dog", "日本語のテキスト 123"]
            {
                let v = e.embed_one(text);
                assert_eq!(v.len(), dim);
                assert!((norm(&v) - 1.0).abs() < 1e-5, "dim {dim} text {text:?} norm {}", norm(&v));
            }
        }
    }

    #[test]
    fn featureless_text_is_the_zero_vector() {
        let e = HashingEmbedder::new(32, 4);
        for text in ["", "   ", "!?,.;-- ()"] {
            let v = e.embed_one(text);
            assert_eq!(v.len(), 32);
            assert!(v.iter().all(|&x| x == 0.0), "{text:?}");
        }
    }

    #[test]
    fn similar_texts_are_closer_than_unrelated_ones() {
        let e = HashingEmbedder::new(256, 4);
        let a = e.embed_one("the quick brown fox jumps over the lazy dog");
        let b = e.embed_one("a quick brown fox jumped over lazy dogs");
        let c = e.embed_one("quarterly revenue statement for the tax authority");
        let near = cosine(&a, &b);
        let far = cosine(&a, &c);
        assert!(near > far, "near {near} far {far}");
        assert!(near > 0.5, "near {near}");
        // Trigrams relate inflections that share no whole token.
        let run = e.embed_one("running");
        let runs = e.embed_one("runner");
        let other = e.embed_one("bicycle");
        assert!(cosine(&run, &runs) > cosine(&run, &other));
    }

    #[test]
    fn embed_returns_one_vector_per_input_in_order_immediately() {
        let e = HashingEmbedder::new(64, 8);
        let texts: Vec<String> = ["alpha", "", "beta gamma", "alpha"].iter().map(|s| s.to_string()).collect();
        let out = e.embed(&texts).now_or_never().expect("ready future").unwrap();
        assert_eq!(out.len(), texts.len());
        for (text, v) in texts.iter().zip(&out) {
            assert_eq!(v, &e.embed_one(text));
        }
        assert_eq!(out[0], out[3]);
        assert_ne!(out[0], out[2]);
        assert!(e.embed(&[]).now_or_never().unwrap().unwrap().is_empty());
    }
}
