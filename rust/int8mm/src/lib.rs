//! int8mm: the weight-only int8 product of nanochat's CPU decode, `y[m, n] = scale[n] * sum_k q[n, k] * x[m, k]`.
//!
//! A decode step multiplies a few activation rows (one per sequence being generated) by every weight matrix once, so
//! its speed is how fast the matrices stream from memory. Stored as int8 with one fp32 scale per output row they are
//! a quarter of their fp32 bytes; this kernel widens each int8 to fp32 in registers and accumulates in fp32, so the
//! activations keep full precision (weight-only quantization) and no dequantized copy is ever written.
//!
//! - `Isa`: the instruction sets with a kernel: AVX-512 (16 lanes), AVX2 + FMA (8 lanes), and portable scalar code,
//!   chosen at run time (`Isa::best`); every one computes the same sums, in a different order of additions.
//! - Layout: the matrix is packed (`pack`) in tiles of TILE_ROWS rows, chunk by chunk, so that a tile is one
//!   sequential stream through memory.
//! - Work split: `Product` checks every length and splits the output rows into blocks of tiles that any number of
//!   threads take from an atomic counter (`Product::work`): rayon's pool (`matmul`) or the OpenMP team of the
//!   process's torch (the Python binding), so the kernel runs on threads that are already awake. Inside a block a
//!   tile is read once per pass over up to 4 activation rows; for more rows the rereads hit the cache.
//! - `reference` is the plain definition the tests hold the kernels to.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The instruction set a product runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Scalar,
}

impl Isa {
    /// The fastest kernel this CPU can run.
    pub fn best() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
                return Isa::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }

    /// Whether this CPU can run the kernel.
    pub fn available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Scalar => "scalar",
        }
    }

    pub fn from_name(name: &str) -> Option<Isa> {
        match name {
            "avx512" => Some(Isa::Avx512),
            "avx2" => Some(Isa::Avx2),
            "scalar" => Some(Isa::Scalar),
            _ => None,
        }
    }
}

/// Shapes and the output are checked against these before any kernel runs.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// activation rows
    pub m: usize,
    /// output features (rows of the matrix)
    pub n: usize,
    /// input features
    pub k: usize,
}

/// Weight rows per tile: the packed layout interleaves this many rows.
pub const TILE_ROWS: usize = 4;
/// Input features per chunk of the packed layout: TILE_ROWS x CHUNK bytes = one 64-byte cache line.
pub const CHUNK: usize = 16;

/// Bytes of a packed (n, k) matrix: rows padded to a multiple of TILE_ROWS, k to a multiple of CHUNK, zeros in the
/// padding. None if it overflows.
pub fn packed_len(n: usize, k: usize) -> Option<usize> {
    n.div_ceil(TILE_ROWS).checked_mul(TILE_ROWS)?.checked_mul(k.div_ceil(CHUNK).checked_mul(CHUNK)?)
}

/// The packed layout of a row-major (n, k) int8 matrix: tile by tile (TILE_ROWS rows), chunk by chunk (CHUNK
/// columns), each chunk's TILE_ROWS x CHUNK bytes contiguous, row after row. A tile is then one sequential stream
/// through memory, where the row-major matrix would be TILE_ROWS streams K bytes apart, which the hardware prefetcher
/// follows far worse (about 3x slower from DRAM on one core, bench/RESULTS.md). nanochat packs with torch
/// (nanochat.model.int8_cpu.pack); this is the definition the tests compare it to.
pub fn pack(q: &[i8], n: usize, k: usize) -> Vec<i8> {
    assert_eq!(q.len(), n * k, "q must be n x k");
    let kp = k.div_ceil(CHUNK) * CHUNK;
    let mut out = vec![0i8; packed_len(n, k).unwrap()];
    for j in 0..n {
        let (tile, c) = (j / TILE_ROWS, j % TILE_ROWS);
        for t in 0..k {
            let (chunk, lane) = (t / CHUNK, t % CHUNK);
            out[tile * TILE_ROWS * kp + chunk * TILE_ROWS * CHUNK + c * CHUNK + lane] = q[j * k + t];
        }
    }
    out
}

/// One product, checked and split into blocks of output rows that any number of threads may take (`work`).
pub struct Product<'a> {
    x: &'a [f32],
    packed: &'a [i8],
    scale: &'a [f32],
    y: *mut f32,
    s: Shape,
    isa: Isa,
    blocks: Vec<(usize, usize)>,
    next: AtomicUsize,
    _y: PhantomData<&'a mut [f32]>,
}

// SAFETY: the only shared mutable state is y, and `work` hands each block (a disjoint set of y's columns) to exactly
// one caller through the atomic counter.
unsafe impl Sync for Product<'_> {}

impl<'a> Product<'a> {
    /// `y (m, n) = x (m, k) @ (scale[:, None] * q (n, k))^T` with q given packed (`pack`); x and y row-major and
    /// contiguous; `threads` sizes the blocks (a few per thread, so one descheduled thread does not hold up the
    /// rest). Errors name the first length that does not match the shape, or an instruction set this CPU lacks.
    pub fn new(
        x: &'a [f32], packed: &'a [i8], scale: &'a [f32], y: &'a mut [f32], s: Shape, isa: Isa, threads: usize,
    ) -> Result<Self, String> {
        let check = |what: &str, got: usize, want: Option<usize>| match want {
            Some(w) if w == got => Ok(()),
            Some(w) => Err(format!("{what} has {got} elements, the shape needs {w}")),
            None => Err(format!("{what}: the shape {s:?} overflows")),
        };
        check("x", x.len(), s.m.checked_mul(s.k))?;
        check("packed q", packed.len(), packed_len(s.n, s.k))?;
        check("scale", scale.len(), Some(s.n))?;
        check("y", y.len(), s.m.checked_mul(s.n))?;
        if !isa.available() {
            return Err(format!("this CPU cannot run the {} kernel", isa.name()));
        }
        let blocks = if s.m == 0 { Vec::new() } else { tile_blocks(s.n.div_ceil(TILE_ROWS), threads) };
        let y = y.as_mut_ptr();
        Ok(Product { x, packed, scale, y, s, isa, blocks, next: AtomicUsize::new(0), _y: PhantomData })
    }

    /// Whether splitting over threads pays: enough blocks, enough bytes.
    pub fn worth_splitting(&self) -> bool {
        self.blocks.len() > 1 && self.packed.len().saturating_mul(self.s.m) >= PARALLEL_MIN_BYTES
    }

    /// The whole product on the current rayon pool, or on the calling thread where splitting does not pay.
    pub fn run_on_rayon(&self) {
        if self.worth_splitting() {
            rayon::broadcast(|_| self.work());
        } else {
            self.work();
        }
    }

    /// Take blocks until none is left and compute them. Any number of threads may call this at once; the product
    /// is complete once every caller has returned.
    pub fn work(&self) {
        loop {
            let b = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(&(a, end)) = self.blocks.get(b) else { return };
            // SAFETY: lengths checked in `new`; block b was handed out once, and blocks are disjoint ranges of
            // tiles, so no other thread writes these y[m, n]; the kernel for `isa` exists on this CPU.
            unsafe { run_tiles(self.x, self.packed, self.scale, self.y, self.s, a, end, self.isa) }
        }
    }
}

/// `Product::new(..)` computed on the current rayon pool (`parallel`) or on the calling thread alone.
pub fn matmul(
    x: &[f32], packed: &[i8], scale: &[f32], y: &mut [f32], s: Shape, isa: Isa, parallel: bool,
) -> Result<(), String> {
    let threads = if parallel { rayon::current_num_threads() } else { 1 };
    let product = Product::new(x, packed, scale, y, s, isa, threads)?;
    if parallel {
        product.run_on_rayon();
    } else {
        product.work();
    }
    Ok(())
}

/// The definition: dequantize each weight, multiply, add in index order, in f64 (the tests' yardstick). q row-major.
pub fn reference(x: &[f32], q: &[i8], scale: &[f32], s: Shape) -> Vec<f64> {
    let mut y = vec![0.0f64; s.m * s.n];
    for i in 0..s.m {
        for j in 0..s.n {
            let mut acc = 0.0f64;
            for t in 0..s.k {
                acc += x[i * s.k + t] as f64 * (q[j * s.k + t] as f64 * scale[j] as f64);
            }
            y[i * s.n + j] = acc;
        }
    }
    y
}

/// Below this many bytes of weights x activation rows a product runs on the calling thread alone: handing work to
/// a sleeping pool thread costs 20-60 us (bench/RESULTS.md), about the time one core takes for 0.5 MB.
pub const PARALLEL_MIN_BYTES: usize = 512 << 10;

/// Blocks of tiles: a few per thread so an unlucky (descheduled) thread does not hold up the rest, at least 8 tiles
/// (32 rows) each so a block's fixed cost stays small.
fn tile_blocks(tiles: usize, threads: usize) -> Vec<(usize, usize)> {
    let size = tiles.div_ceil(threads.max(1) * 4).max(8);
    (0..tiles).step_by(size).map(|a| (a, (a + size).min(tiles))).collect()
}

/// # Safety
/// `isa` available; slices as checked by `Product::new`; `y` points at m * n floats of which this call writes the rows of
/// tiles a..b only.
#[allow(clippy::too_many_arguments)]
unsafe fn run_tiles(x: &[f32], packed: &[i8], scale: &[f32], y: *mut f32, s: Shape, a: usize, b: usize, isa: Isa) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => avx512::tiles(x, packed, scale, y, s, a, b),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => avx2::tiles(x, packed, scale, y, s, a, b),
        _ => scalar_tiles(x, packed, scale, y, s, a, b),
    }
}

/// Calls `pass(tile, i, rows)` for every tile of a..b and every group of `rows` <= ROWS activation rows from row i:
/// the loop every instruction set's kernel runs, ROWS being how many rows its registers hold at once.
#[inline(always)]
fn for_each_pass<const ROWS: usize>(s: Shape, a: usize, b: usize, mut pass: impl FnMut(usize, usize, usize)) {
    for tile in a..b {
        for i in (0..s.m).step_by(ROWS) {
            pass(tile, i, (s.m - i).min(ROWS));
        }
    }
}

/// Writes y[i, j * TILE_ROWS + c] for the tile's real rows (the padding rows of the last tile are skipped).
#[inline(always)]
unsafe fn store(y: *mut f32, s: Shape, scale: &[f32], i: usize, tile: usize, c: usize, sum: f32) {
    let j = tile * TILE_ROWS + c;
    if j < s.n {
        *y.add(i * s.n + j) = sum * scale[j];
    }
}

unsafe fn scalar_tiles(x: &[f32], packed: &[i8], scale: &[f32], y: *mut f32, s: Shape, a: usize, b: usize) {
    let kp = s.k.div_ceil(CHUNK) * CHUNK;
    for tile in a..b {
        let base = &packed[tile * TILE_ROWS * kp..(tile + 1) * TILE_ROWS * kp];
        for i in 0..s.m {
            let xr = &x[i * s.k..(i + 1) * s.k];
            for c in 0..TILE_ROWS {
                let mut acc = 0.0f32;
                for (t, &xv) in xr.iter().enumerate() {
                    acc += base[(t / CHUNK) * TILE_ROWS * CHUNK + c * CHUNK + t % CHUNK] as f32 * xv;
                }
                store(y, s, scale, i, tile, c, acc);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{for_each_pass, store, Shape, CHUNK, TILE_ROWS};
    use std::arch::x86_64::*;

    /// Activation rows per pass over a tile: TILE_ROWS x ROWS accumulators + TILE_ROWS widened weights + one x
    /// vector stay within the 32 vector registers.
    const ROWS: usize = 4;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    pub(super) unsafe fn tiles(x: &[f32], packed: &[i8], scale: &[f32], y: *mut f32, s: Shape, a: usize, b: usize) {
        for_each_pass::<ROWS>(s, a, b, |tile, i, rows| match rows {
            1 => pass::<1>(x, packed, scale, y, s, i, tile),
            2 => pass::<2>(x, packed, scale, y, s, i, tile),
            3 => pass::<3>(x, packed, scale, y, s, i, tile),
            _ => pass::<ROWS>(x, packed, scale, y, s, i, tile),
        })
    }

    /// y[i..i+R, the tile's rows]: 16 columns at a time, the last < 16 with x masked (q's padding is zeros).
    #[inline(always)]
    unsafe fn pass<const R: usize>(x: &[f32], packed: &[i8], scale: &[f32], y: *mut f32, s: Shape, i: usize, tile: usize) {
        let k = s.k;
        let kp = k.div_ceil(CHUNK) * CHUNK;
        let xp = x.as_ptr().add(i * k);
        let qp = packed.as_ptr().add(tile * TILE_ROWS * kp);
        let mut acc = [[_mm512_setzero_ps(); TILE_ROWS]; R];
        let mut t = 0;
        while t < kp {
            let line = qp.add(t * TILE_ROWS);
            let mut w = [_mm512_setzero_ps(); TILE_ROWS];
            for (c, wc) in w.iter_mut().enumerate() {
                let bytes = _mm_loadu_si128(line.add(c * CHUNK) as *const __m128i);
                *wc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
            }
            let mask: u16 = if t + CHUNK <= k { u16::MAX } else { ((1u32 << (k - t)) - 1) as u16 };
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let xv = _mm512_maskz_loadu_ps(mask, xp.add(r * k + t));
                for c in 0..TILE_ROWS {
                    acc_r[c] = _mm512_fmadd_ps(w[c], xv, acc_r[c]);
                }
            }
            t += CHUNK;
        }
        for (r, acc_r) in acc.iter().enumerate() {
            for (c, v) in acc_r.iter().enumerate() {
                store(y, s, scale, i + r, tile, c, _mm512_reduce_add_ps(*v));
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{for_each_pass, store, Shape, CHUNK, TILE_ROWS};
    use std::arch::x86_64::*;

    /// Activation rows per pass: TILE_ROWS x 2 accumulators + the widened weights + x within the 16 registers.
    const ROWS: usize = 2;

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tiles(x: &[f32], packed: &[i8], scale: &[f32], y: *mut f32, s: Shape, a: usize, b: usize) {
        for_each_pass::<ROWS>(s, a, b, |tile, i, rows| match rows {
            1 => pass::<1>(x, packed, scale, y, s, i, tile),
            _ => pass::<ROWS>(x, packed, scale, y, s, i, tile),
        })
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// y[i..i+R, the tile's rows]: 8 columns at a time; the columns past the last multiple of 8 in scalar code.
    #[inline(always)]
    unsafe fn pass<const R: usize>(x: &[f32], packed: &[i8], scale: &[f32], y: *mut f32, s: Shape, i: usize, tile: usize) {
        let k = s.k;
        let kp = k.div_ceil(CHUNK) * CHUNK;
        let xp = x.as_ptr().add(i * k);
        let qp = packed.as_ptr().add(tile * TILE_ROWS * kp);
        let at = |t: usize, c: usize| qp.add((t / CHUNK) * TILE_ROWS * CHUNK + c * CHUNK + t % CHUNK);
        let mut acc = [[_mm256_setzero_ps(); TILE_ROWS]; R];
        let mut t = 0;
        while t + 8 <= k {
            let mut w = [_mm256_setzero_ps(); TILE_ROWS];
            for (c, wc) in w.iter_mut().enumerate() {
                let bytes = _mm_loadl_epi64(at(t, c) as *const __m128i);
                *wc = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
            }
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(xp.add(r * k + t));
                for c in 0..TILE_ROWS {
                    acc_r[c] = _mm256_fmadd_ps(w[c], xv, acc_r[c]);
                }
            }
            t += 8;
        }
        for (r, acc_r) in acc.iter().enumerate() {
            for (c, v) in acc_r.iter().enumerate() {
                let mut sum = hsum(*v);
                for u in t..k {
                    sum += *at(u, c) as f32 * *xp.add(r * k + u);
                }
                store(y, s, scale, i + r, tile, c, sum);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545F4914F6CDD1D)
        }
        fn f32(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        }
    }

    fn case(s: Shape, seed: u64) -> (Vec<f32>, Vec<i8>, Vec<f32>) {
        let mut r = Rng(seed | 1);
        let x = (0..s.m * s.k).map(|_| r.f32() * 3.0).collect();
        // the full int8 range, -128 included (quantize_rows never writes it, the kernel must still be right)
        let q = (0..s.n * s.k).map(|_| (r.next() >> 56) as u8 as i8).collect();
        let scale = (0..s.n).map(|_| r.f32().abs() * 0.01 + 1e-4).collect();
        (x, q, scale)
    }

    fn check(s: Shape, isa: Isa) {
        let (x, q, scale) = case(s, (s.m * 1000003 + s.n * 1009 + s.k) as u64);
        let want = reference(&x, &q, &scale, s);
        let mut y = vec![f32::NAN; s.m * s.n];
        matmul(&x, &pack(&q, s.n, s.k), &scale, &mut y, s, isa, true).unwrap();
        for (idx, (&got, &w)) in y.iter().zip(&want).enumerate() {
            // fp32 accumulation over k terms: error grows with sqrt(k) x the terms' size
            let bound = 1e-5 * (s.k as f64).sqrt() * 3.0 * 128.0 * scale[idx % s.n] as f64 + 1e-6;
            assert!((got as f64 - w).abs() <= bound, "{isa:?} {s:?} y[{idx}] = {got}, want {w}");
        }
    }

    #[test]
    fn every_kernel_matches_the_definition_at_odd_shapes() {
        let shapes = [
            (1, 1, 1), (1, 5, 3), (1, 4, 16), (1, 7, 17), (2, 9, 31), (3, 13, 33), (4, 8, 64), (5, 17, 100),
            (7, 33, 129), (9, 70, 255), (16, 64, 80), (1, 300, 1280), (17, 45, 47),
        ];
        for isa in [Isa::Avx512, Isa::Avx2, Isa::Scalar] {
            if !isa.available() {
                eprintln!("skipping {isa:?}: this CPU lacks it");
                continue;
            }
            for &(m, n, k) in &shapes {
                check(Shape { m, n, k }, isa);
            }
        }
    }

    #[test]
    fn packing_interleaves_tiles_and_pads_with_zeros() {
        // 5 rows x 17 columns: two tiles (the second has one real row), two chunks (the second has one column)
        let q: Vec<i8> = (0..85).map(|v| (v % 120) as i8 + 1).collect();
        let p = pack(&q, 5, 17);
        assert_eq!(p.len(), packed_len(5, 17).unwrap());
        assert_eq!(p.len(), 8 * 32);
        assert_eq!(&p[..16], &q[..16]); // tile 0, chunk 0, row 0
        assert_eq!(&p[16..32], &q[17..33]); // row 1
        assert_eq!(p[64], q[16]); // chunk 1 starts with row 0's column 16
        assert!(p[65..80].iter().all(|&b| b == 0)); // its padding columns
        assert_eq!(&p[128..144], &q[68..84]); // tile 1 = row 4
        assert!(p[144..192].iter().all(|&b| b == 0)); // padding rows 5..7
        assert_eq!(p.iter().filter(|&&b| b != 0).count(), 85);
    }

    #[test]
    fn many_threads_working_on_one_product_compute_each_block_once() {
        let s = Shape { m: 3, n: 1001, k: 70 };
        let (x, q, scale) = case(s, 11);
        let packed = pack(&q, s.n, s.k);
        let mut alone = vec![0.0f32; s.m * s.n];
        matmul(&x, &packed, &scale, &mut alone, s, Isa::best(), false).unwrap();
        let mut together = vec![f32::NAN; s.m * s.n];
        let product = Product::new(&x, &packed, &scale, &mut together, s, Isa::best(), 8).unwrap();
        assert!(product.blocks.len() > 4);
        std::thread::scope(|sc| {
            for _ in 0..4 {
                sc.spawn(|| product.work());
            }
        });
        product.work(); // nothing left: returns at once
        drop(product);
        assert_eq!(alone, together); // the same sums in the same order, whoever computed them
    }

    #[test]
    fn best_is_available_and_names_round_trip() {
        assert!(Isa::best().available());
        for isa in [Isa::Avx512, Isa::Avx2, Isa::Scalar] {
            assert_eq!(Isa::from_name(isa.name()), Some(isa));
        }
        assert_eq!(Isa::from_name("sse"), None);
    }

    #[test]
    fn wrong_lengths_are_errors_not_reads_past_the_end() {
        let s = Shape { m: 2, n: 3, k: 5 };
        let (x, q, scale) = case(s, 7);
        let q = pack(&q, s.n, s.k);
        let mut y = vec![0.0; 6];
        let e = matmul(&x[..9], &q, &scale, &mut y, s, Isa::Scalar, true).unwrap_err();
        let e2 = matmul(&x, &q[..q.len() - 1], &scale, &mut y, s, Isa::Scalar, true).unwrap_err();
        assert!(e2.contains("packed q has 63 elements, the shape needs 64"), "{e2}");
        assert!(e.contains("x has 9 elements, the shape needs 10"), "{e}");
        let e = matmul(&x, &q, &scale[..2], &mut y, s, Isa::Scalar, true).unwrap_err();
        assert!(e.contains("scale"), "{e}");
        let e = matmul(&x, &q, &scale, &mut y[..5], s, Isa::Scalar, true).unwrap_err();
        assert!(e.contains("y has 5"), "{e}");
        let huge = Shape { m: usize::MAX, n: 3, k: 5 };
        assert!(matmul(&x, &q, &scale, &mut y, huge, Isa::Scalar, true).unwrap_err().contains("overflows"));
    }

    #[test]
    fn empty_shapes_write_nothing() {
        let mut y: Vec<f32> = vec![];
        matmul(&[], &[], &[], &mut y, Shape { m: 0, n: 0, k: 4 }, Isa::best(), true).unwrap();
        // k = 0: every output is an empty sum
        let mut y = vec![f32::NAN; 6];
        matmul(&[], &[], &[1.0; 3], &mut y, Shape { m: 2, n: 3, k: 0 }, Isa::best(), true).unwrap();
        let _ = pack(&[], 3, 0);
        assert!(y.iter().all(|&v| v == 0.0));
    }
}
