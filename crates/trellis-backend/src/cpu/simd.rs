//! Vector kernels for the dense parts of the CPU backend (dot products, `axpy`, small
//! matrix–vector products over f32/f16/bf16 weights and f16 caches), chosen at run time like
//! the trellis kernels: a plain reference, AVX2 + FMA + F16C, and AVX-512F on x86-64; NEON on
//! aarch64. The crate is built for generic x86-64, so without these the compiler sees only SSE2
//! and widens f16 one value at a time (aarch64's baseline has NEON, but the compiler does not
//! reorder a reduction into vector lanes by itself).
//!
//! Every level widens f16/bf16 exactly and accumulates in f32; they differ from the reference
//! only in the order of the additions.

use super::trellis_kernels::Isa;
use half::{bf16, f16};
#[cfg(target_arch = "aarch64")]
use std::arch::aarch64::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// A vector level of these kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Scalar,
    Avx2,
    Avx512,
    Neon,
}

impl Level {
    /// The level matching an instruction-set level of the trellis kernels (so that
    /// `TRELLIS_CPU_ISA` forces both).
    pub fn of(isa: Isa) -> Level {
        match isa {
            Isa::Scalar => Level::Scalar,
            Isa::Avx2 | Isa::Avx2Int16 => Level::Avx2,
            Isa::Avx512 | Isa::Avx512Fp16 | Isa::Avx512Vnni => Level::Avx512,
            Isa::Neon | Isa::NeonFp16 => Level::Neon,
        }
    }

    /// The level in use.
    #[inline]
    pub fn selected() -> Level {
        Level::of(Isa::selected())
    }

    /// Levels this CPU runs, lowest first (tests run each).
    pub fn available() -> Vec<Level> {
        let mut levels: Vec<Level> = Isa::available().into_iter().map(Level::of).collect();
        levels.dedup();
        levels
    }
}

/// A stored element type widened exactly to f32.
pub trait Elem: Copy + Send + Sync + 'static {
    fn widen(self) -> f32;

    /// 16 values from `p` widened.
    ///
    /// # Safety
    /// AVX-512F must be available and `p … p+16` readable.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> __m512;

    /// 8 values from `p` widened.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available and `p … p+8` readable.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> __m256;

    /// 4 values from `p` widened.
    ///
    /// # Safety
    /// NEON must be available and `p … p+4` readable.
    #[cfg(target_arch = "aarch64")]
    unsafe fn load4(p: *const Self) -> float32x4_t;
}

impl Elem for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> __m512 {
        // SAFETY: the caller guarantees the features and 16 readable values.
        unsafe { _mm512_loadu_ps(p) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> __m256 {
        // SAFETY: the caller guarantees the features and 8 readable values.
        unsafe { _mm256_loadu_ps(p) }
    }
    #[cfg(target_arch = "aarch64")]
    #[inline(always)]
    unsafe fn load4(p: *const f32) -> float32x4_t {
        // SAFETY: the caller guarantees NEON and 4 readable values.
        unsafe { vld1q_f32(p) }
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f16) -> __m512 {
        // SAFETY: the caller guarantees the features and 16 readable values (32 bytes).
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> __m256 {
        // SAFETY: the caller guarantees the features and 8 readable values (16 bytes).
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }
    #[cfg(target_arch = "aarch64")]
    #[inline(always)]
    unsafe fn load4(p: *const f16) -> float32x4_t {
        // SAFETY: the caller guarantees NEON and 4 readable values (8 bytes); `fcvtl` is base
        // ASIMD and widens every fp16 (subnormals, NaN) exactly.
        unsafe { vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p.cast()))) }
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const bf16) -> __m512 {
        // SAFETY: the caller guarantees the features and 16 readable values (32 bytes).
        unsafe {
            let wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast()));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(wide))
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const bf16) -> __m256 {
        // SAFETY: the caller guarantees the features and 8 readable values (16 bytes).
        unsafe {
            let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide))
        }
    }
    #[cfg(target_arch = "aarch64")]
    #[inline(always)]
    unsafe fn load4(p: *const bf16) -> float32x4_t {
        // SAFETY: the caller guarantees NEON and 4 readable values (8 bytes).
        unsafe { vreinterpretq_f32_u32(vshll_n_u16::<16>(vld1_u16(p.cast()))) }
    }
}

impl Elem for i8 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const i8) -> __m512 {
        // SAFETY: the caller guarantees the features and 16 readable values (16 bytes).
        unsafe { _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.cast()))) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const i8) -> __m256 {
        // SAFETY: the caller guarantees the features and 8 readable values (8 bytes, which is
        // all `movq` reads).
        unsafe { _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p.cast()))) }
    }
    #[cfg(target_arch = "aarch64")]
    #[inline(always)]
    unsafe fn load4(p: *const i8) -> float32x4_t {
        // SAFETY: the caller guarantees NEON and 4 readable values (4 bytes, read unaligned).
        unsafe {
            let word = p.cast::<u32>().read_unaligned();
            let bytes = vreinterpret_s8_u32(vdup_n_u32(word));
            vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(bytes))))
        }
    }
}

// ---- reference ------------------------------------------------------------------------------

mod reference {
    use super::Elem;

    pub fn dot<T: Elem>(w: &[T], x: &[f32]) -> f32 {
        w.iter().zip(x).map(|(&a, &b)| a.widen() * b).sum()
    }

    pub fn axpy<T: Elem>(acc: &mut [f32], a: f32, w: &[T]) {
        for (y, &v) in acc.iter_mut().zip(w) {
            *y += a * v.widen();
        }
    }

    #[cfg(test)]
    pub fn gemv_t<T: Elem>(w: &[T], x: &[f32], out: &mut [f32]) {
        let width = out.len();
        out.fill(0.0);
        for (r, &xv) in x.iter().enumerate() {
            axpy(out, xv, &w[r * width..(r + 1) * width]);
        }
    }

    #[cfg(test)]
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_nt<T: Elem>(
        w: &[T],
        n: usize,
        x: &[f32],
        m: usize,
        k: usize,
        out: &mut [f32],
        ld: usize,
    ) {
        for r in 0..m {
            for o in 0..n {
                out[r * ld + o] = dot(&w[o * k..(o + 1) * k], &x[r * k..(r + 1) * k]);
            }
        }
    }
}

// ---- AVX-512 --------------------------------------------------------------------------------

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::Elem;
    use super::MANY;
    use std::arch::x86_64::*;

    /// `out[j] = dot(w, xs[j·n..])` for `COUNT` vectors of `n = w.len()`: each chunk of `w`
    /// widened once for all of them, every sum in the order of [`dot`], so the results are
    /// bit-equal to it. (`COUNT` is a constant so that the accumulators stay in registers.)
    #[target_feature(enable = "avx512f")]
    pub fn dots<const COUNT: usize, T: Elem>(w: &[T], xs: &[f32], out: &mut [f32]) {
        let n = w.len();
        assert!(COUNT <= MANY && out.len() == COUNT && xs.len() >= COUNT * n);
        let (wp, xp) = (w.as_ptr(), xs.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); 4]; COUNT];
        let mut i = 0;
        // SAFETY: every load reads below `n` of `w` and of each query; AVX-512F is enabled.
        unsafe {
            while i + 64 <= n {
                let wv: [__m512; 4] = std::array::from_fn(|k| T::load16(wp.add(i + 16 * k)));
                for (j, a) in acc.iter_mut().enumerate() {
                    for (k, ak) in a.iter_mut().enumerate() {
                        let x = _mm512_loadu_ps(xp.add(j * n + i + 16 * k));
                        *ak = _mm512_fmadd_ps(wv[k], x, *ak);
                    }
                }
                i += 64;
            }
            while i + 16 <= n {
                let wv = T::load16(wp.add(i));
                for (j, a) in acc.iter_mut().enumerate() {
                    a[0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xp.add(j * n + i)), a[0]);
                }
                i += 16;
            }
        }
        for (j, (o, a)) in out.iter_mut().zip(&acc).enumerate() {
            let sum = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
            let mut s = _mm512_reduce_add_ps(sum);
            for k in i..n {
                s += w[k].widen() * xs[j * n + k];
            }
            *o = s;
        }
    }

    /// `accs[j] += Σ_p coeffs[j·stride + p] · row(p)` for `p < rows`, `COUNT` accumulators of
    /// `width` values: a column block of every accumulator stays in registers while the rows
    /// pass, each row's block widened once. Each value is updated in row order exactly as
    /// [`axpy`] would, so the results are bit-equal to `rows` calls of it.
    #[target_feature(enable = "avx512f")]
    pub fn axpy_rows<'a, const COUNT: usize, T: Elem>(
        rows: usize,
        row: impl Fn(usize) -> &'a [T],
        coeffs: &[f32],
        stride: usize,
        accs: &mut [f32],
        width: usize,
    ) {
        assert!(COUNT <= MANY && accs.len() == COUNT * width);
        assert!(COUNT == 0 || coeffs.len() >= (COUNT - 1) * stride + rows);
        let ap = accs.as_mut_ptr();
        let mut c = 0;
        // SAFETY: every access of an accumulator is below `width` inside it, and of a row below
        // `width` (asserted per row); AVX-512F is enabled here.
        unsafe {
            while c + 64 <= width {
                let mut acc = [[_mm512_setzero_ps(); 4]; COUNT];
                for (j, a) in acc.iter_mut().enumerate() {
                    for (k, ak) in a.iter_mut().enumerate() {
                        *ak = _mm512_loadu_ps(ap.add(j * width + c + 16 * k));
                    }
                }
                for p in 0..rows {
                    let r = row(p);
                    assert!(r.len() >= width);
                    let wv: [__m512; 4] =
                        std::array::from_fn(|k| T::load16(r.as_ptr().add(c + 16 * k)));
                    for (j, a) in acc.iter_mut().enumerate() {
                        let s = _mm512_set1_ps(coeffs[j * stride + p]);
                        for (ak, wk) in a.iter_mut().zip(&wv) {
                            *ak = _mm512_fmadd_ps(s, *wk, *ak);
                        }
                    }
                }
                for (j, a) in acc.iter().enumerate() {
                    for (k, ak) in a.iter().enumerate() {
                        _mm512_storeu_ps(ap.add(j * width + c + 16 * k), *ak);
                    }
                }
                c += 64;
            }
        }
        // The remaining columns (fewer than 64) row by row, as `axpy` does them.
        if c < width {
            for p in 0..rows {
                let r = row(p);
                for j in 0..COUNT {
                    let acc = &mut accs[j * width + c..(j + 1) * width];
                    axpy(acc, coeffs[j * stride + p], &r[c..width]);
                }
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    pub fn widen<T: Elem>(src: &[T], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let mut i = 0;
        // SAFETY: every access is below `n`, within both slices; AVX-512F is enabled here.
        unsafe {
            while i + 16 <= n {
                _mm512_storeu_ps(dst.as_mut_ptr().add(i), T::load16(src.as_ptr().add(i)));
                i += 16;
            }
        }
        for (d, s) in dst[i..n].iter_mut().zip(&src[i..n]) {
            *d = s.widen();
        }
    }

    /// One in-register stage of the transform: lanes i and i^h meet; the lower one keeps the
    /// sum, the upper one `lower − upper` (`partner − self`), as in the reference's butterfly.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn butterfly_lanes(v: __m512, partner: __m512, upper: __mmask16) -> __m512 {
        _mm512_mask_sub_ps(_mm512_add_ps(v, partner), upper, partner, v)
    }

    /// The 128-point transform on 8 registers: stages 1, 2, 4, 8 inside each register,
    /// 16, 32, 64 between them.
    #[target_feature(enable = "avx512f")]
    pub fn fwht128(v: &mut [f32; 128]) {
        // SAFETY: 8 loads and stores of 16 floats cover the 128; AVX-512F is enabled here.
        unsafe {
            let mut r: [__m512; 8] =
                std::array::from_fn(|j| _mm512_loadu_ps(v.as_ptr().add(16 * j)));
            for x in r.iter_mut() {
                *x = butterfly_lanes(*x, _mm512_permute_ps::<0b1011_0001>(*x), 0xAAAA);
                *x = butterfly_lanes(*x, _mm512_permute_ps::<0b0100_1110>(*x), 0xCCCC);
                *x = butterfly_lanes(*x, _mm512_shuffle_f32x4::<0b1011_0001>(*x, *x), 0xF0F0);
                *x = butterfly_lanes(*x, _mm512_shuffle_f32x4::<0b0100_1110>(*x, *x), 0xFF00);
            }
            for h in [1, 2, 4] {
                for j in (0..8).filter(|j| j & h == 0) {
                    let (a, b) = (r[j], r[j + h]);
                    r[j] = _mm512_add_ps(a, b);
                    r[j + h] = _mm512_sub_ps(a, b);
                }
            }
            for (j, x) in r.iter().enumerate() {
                _mm512_storeu_ps(v.as_mut_ptr().add(16 * j), *x);
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    pub fn dot<T: Elem>(w: &[T], x: &[f32]) -> f32 {
        let n = w.len().min(x.len());
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY: every load reads below `n`, within both slices; AVX-512F is enabled here.
        unsafe {
            while i + 64 <= n {
                for (j, a) in acc.iter_mut().enumerate() {
                    let o = i + 16 * j;
                    *a = _mm512_fmadd_ps(T::load16(wp.add(o)), _mm512_loadu_ps(xp.add(o)), *a);
                }
                i += 64;
            }
            while i + 16 <= n {
                acc[0] = _mm512_fmadd_ps(T::load16(wp.add(i)), _mm512_loadu_ps(xp.add(i)), acc[0]);
                i += 16;
            }
        }
        let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        let mut s = _mm512_reduce_add_ps(sum);
        for j in i..n {
            s += w[j].widen() * x[j];
        }
        s
    }

    #[target_feature(enable = "avx512f")]
    pub fn axpy<T: Elem>(acc: &mut [f32], a: f32, w: &[T]) {
        let n = acc.len().min(w.len());
        let (ap, wp) = (acc.as_mut_ptr(), w.as_ptr());
        let av = _mm512_set1_ps(a);
        let mut i = 0;
        // SAFETY: every access is below `n`, within both slices.
        unsafe {
            while i + 16 <= n {
                let y = _mm512_fmadd_ps(av, T::load16(wp.add(i)), _mm512_loadu_ps(ap.add(i)));
                _mm512_storeu_ps(ap.add(i), y);
                i += 16;
            }
        }
        for j in i..n {
            acc[j] += a * w[j].widen();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512_gemm {
    use super::Elem;
    use std::arch::x86_64::*;

    /// `out[r·ld + o] = Σ_i x[r·k + i]·w[o·k + i]`: blocks of 4 weight rows × 4 input rows
    /// with their 16 sums in registers; edges by single dots.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_nt<T: Elem>(
        w: &[T],
        n: usize,
        x: &[f32],
        m: usize,
        k: usize,
        out: &mut [f32],
        ld: usize,
    ) {
        assert!(w.len() >= n * k && x.len() >= m * k);
        assert!(m == 0 || n == 0 || out.len() >= (m - 1) * ld + n);
        let k16 = k - k % 16;
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut o0 = 0;
        while o0 + 4 <= n {
            let mut r0 = 0;
            while r0 + 4 <= m {
                let mut acc = [[_mm512_setzero_ps(); 4]; 4];
                let mut i = 0;
                // SAFETY: i + 16 ≤ k16 ≤ k, rows o0+3 < n and r0+3 < m (asserted sizes).
                unsafe {
                    while i < k16 {
                        let wv = [
                            T::load16(wp.add(o0 * k + i)),
                            T::load16(wp.add((o0 + 1) * k + i)),
                            T::load16(wp.add((o0 + 2) * k + i)),
                            T::load16(wp.add((o0 + 3) * k + i)),
                        ];
                        for (rr, acc_r) in acc.iter_mut().enumerate() {
                            let xv = _mm512_loadu_ps(xp.add((r0 + rr) * k + i));
                            for (a, &wq) in acc_r.iter_mut().zip(&wv) {
                                *a = _mm512_fmadd_ps(wq, xv, *a);
                            }
                        }
                        i += 16;
                    }
                }
                for (rr, acc_r) in acc.iter().enumerate() {
                    for (oo, a) in acc_r.iter().enumerate() {
                        let (r, o) = (r0 + rr, o0 + oo);
                        let mut s = _mm512_reduce_add_ps(*a);
                        for j in k16..k {
                            s += w[o * k + j].widen() * x[r * k + j];
                        }
                        out[r * ld + o] = s;
                    }
                }
                r0 += 4;
            }
            for r in r0..m {
                for o in o0..o0 + 4 {
                    out[r * ld + o] =
                        super::avx512::dot(&w[o * k..(o + 1) * k], &x[r * k..(r + 1) * k]);
                }
            }
            o0 += 4;
        }
        for o in o0..n {
            for r in 0..m {
                out[r * ld + o] =
                    super::avx512::dot(&w[o * k..(o + 1) * k], &x[r * k..(r + 1) * k]);
            }
        }
    }
}

// ---- AVX2 -----------------------------------------------------------------------------------

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::Elem;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn widen<T: Elem>(src: &[T], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let mut i = 0;
        // SAFETY: every access is below `n`, within both slices; AVX2/F16C are enabled here.
        unsafe {
            while i + 8 <= n {
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), T::load8(src.as_ptr().add(i)));
                i += 8;
            }
        }
        for (d, s) in dst[i..n].iter_mut().zip(&src[i..n]) {
            *d = s.widen();
        }
    }

    /// The 128-point transform on 16 registers: stages 1, 2, 4 inside each register (the
    /// lower lane of a pair keeps the sum, the upper one `lower − upper`, as in the
    /// reference), 8 … 64 between them.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn fwht128(v: &mut [f32; 128]) {
        // SAFETY: 16 loads and stores of 8 floats cover the 128; AVX2 is enabled here.
        unsafe {
            let mut r: [__m256; 16] =
                std::array::from_fn(|j| _mm256_loadu_ps(v.as_ptr().add(8 * j)));
            for x in r.iter_mut() {
                let t = _mm256_permute_ps::<0b1011_0001>(*x);
                *x = _mm256_blend_ps::<0b1010_1010>(_mm256_add_ps(*x, t), _mm256_sub_ps(t, *x));
                let t = _mm256_permute_ps::<0b0100_1110>(*x);
                *x = _mm256_blend_ps::<0b1100_1100>(_mm256_add_ps(*x, t), _mm256_sub_ps(t, *x));
                let t = _mm256_permute2f128_ps::<1>(*x, *x);
                *x = _mm256_blend_ps::<0b1111_0000>(_mm256_add_ps(*x, t), _mm256_sub_ps(t, *x));
            }
            for h in [1, 2, 4, 8] {
                for j in (0..16).filter(|j| j & h == 0) {
                    let (a, b) = (r[j], r[j + h]);
                    r[j] = _mm256_add_ps(a, b);
                    r[j + h] = _mm256_sub_ps(a, b);
                }
            }
            for (j, x) in r.iter().enumerate() {
                _mm256_storeu_ps(v.as_mut_ptr().add(8 * j), *x);
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum(v: __m256) -> f32 {
        let hi = _mm256_extractf128_ps::<1>(v);
        let s = _mm_add_ps(_mm256_castps256_ps128(v), hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn dot<T: Elem>(w: &[T], x: &[f32]) -> f32 {
        let n = w.len().min(x.len());
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY: every load reads below `n`, within both slices.
        unsafe {
            while i + 32 <= n {
                for (j, a) in acc.iter_mut().enumerate() {
                    let o = i + 8 * j;
                    *a = _mm256_fmadd_ps(T::load8(wp.add(o)), _mm256_loadu_ps(xp.add(o)), *a);
                }
                i += 32;
            }
            while i + 8 <= n {
                acc[0] = _mm256_fmadd_ps(T::load8(wp.add(i)), _mm256_loadu_ps(xp.add(i)), acc[0]);
                i += 8;
            }
        }
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut s = hsum(sum);
        for j in i..n {
            s += w[j].widen() * x[j];
        }
        s
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn axpy<T: Elem>(acc: &mut [f32], a: f32, w: &[T]) {
        let n = acc.len().min(w.len());
        let (ap, wp) = (acc.as_mut_ptr(), w.as_ptr());
        let av = _mm256_set1_ps(a);
        let mut i = 0;
        // SAFETY: every access is below `n`, within both slices.
        unsafe {
            while i + 8 <= n {
                let y = _mm256_fmadd_ps(av, T::load8(wp.add(i)), _mm256_loadu_ps(ap.add(i)));
                _mm256_storeu_ps(ap.add(i), y);
                i += 8;
            }
        }
        for j in i..n {
            acc[j] += a * w[j].widen();
        }
    }
}

// ---- NEON -----------------------------------------------------------------------------------

#[cfg(target_arch = "aarch64")]
mod neon {
    use super::Elem;
    use std::arch::aarch64::*;

    #[target_feature(enable = "neon")]
    pub fn dot<T: Elem>(w: &[T], x: &[f32]) -> f32 {
        let n = w.len().min(x.len());
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        // Four independent sums hide the FMA latency.
        let mut acc = [vdupq_n_f32(0.0); 4];
        let mut i = 0;
        // SAFETY: every load reads below `n`, within both slices; NEON is enabled here.
        unsafe {
            while i + 16 <= n {
                for (j, a) in acc.iter_mut().enumerate() {
                    let o = i + 4 * j;
                    *a = vfmaq_f32(*a, T::load4(wp.add(o)), vld1q_f32(xp.add(o)));
                }
                i += 16;
            }
            while i + 4 <= n {
                acc[0] = vfmaq_f32(acc[0], T::load4(wp.add(i)), vld1q_f32(xp.add(i)));
                i += 4;
            }
        }
        let sum = vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3]));
        let mut s = vaddvq_f32(sum);
        for j in i..n {
            s += w[j].widen() * x[j];
        }
        s
    }

    #[target_feature(enable = "neon")]
    pub fn axpy<T: Elem>(acc: &mut [f32], a: f32, w: &[T]) {
        let n = acc.len().min(w.len());
        let (ap, wp) = (acc.as_mut_ptr(), w.as_ptr());
        let av = vdupq_n_f32(a);
        let mut i = 0;
        // SAFETY: every access is below `n`, within both slices.
        unsafe {
            while i + 4 <= n {
                let y = vfmaq_f32(vld1q_f32(ap.add(i)), av, T::load4(wp.add(i)));
                vst1q_f32(ap.add(i), y);
                i += 4;
            }
        }
        for j in i..n {
            acc[j] += a * w[j].widen();
        }
    }

    /// `out[r·ld + o] = Σ_i x[r·k + i]·w[o·k + i]`: blocks of 4 weight rows × 4 input rows
    /// with their 16 sums in registers (each weight vector widened once for 4 rows); edges
    /// by single dots.
    #[target_feature(enable = "neon")]
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_nt<T: Elem>(
        w: &[T],
        n: usize,
        x: &[f32],
        m: usize,
        k: usize,
        out: &mut [f32],
        ld: usize,
    ) {
        assert!(w.len() >= n * k && x.len() >= m * k);
        assert!(m == 0 || n == 0 || out.len() >= (m - 1) * ld + n);
        let k4 = k - k % 4;
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut o0 = 0;
        while o0 + 4 <= n {
            let mut r0 = 0;
            while r0 + 4 <= m {
                let mut acc = [[vdupq_n_f32(0.0); 4]; 4];
                let mut i = 0;
                // SAFETY: i + 4 ≤ k4 ≤ k, rows o0+3 < n and r0+3 < m (asserted sizes).
                unsafe {
                    while i < k4 {
                        let wv: [float32x4_t; 4] =
                            std::array::from_fn(|oo| T::load4(wp.add((o0 + oo) * k + i)));
                        for (rr, acc_r) in acc.iter_mut().enumerate() {
                            let xv = vld1q_f32(xp.add((r0 + rr) * k + i));
                            for (a, &wq) in acc_r.iter_mut().zip(&wv) {
                                *a = vfmaq_f32(*a, wq, xv);
                            }
                        }
                        i += 4;
                    }
                }
                for (rr, acc_r) in acc.iter().enumerate() {
                    for (oo, a) in acc_r.iter().enumerate() {
                        let (r, o) = (r0 + rr, o0 + oo);
                        let mut s = vaddvq_f32(*a);
                        for j in k4..k {
                            s += w[o * k + j].widen() * x[r * k + j];
                        }
                        out[r * ld + o] = s;
                    }
                }
                r0 += 4;
            }
            for r in r0..m {
                for o in o0..o0 + 4 {
                    out[r * ld + o] = dot(&w[o * k..(o + 1) * k], &x[r * k..(r + 1) * k]);
                }
            }
            o0 += 4;
        }
        for o in o0..n {
            for r in 0..m {
                out[r * ld + o] = dot(&w[o * k..(o + 1) * k], &x[r * k..(r + 1) * k]);
            }
        }
    }
}

// ---- dispatch -------------------------------------------------------------------------------

/// `Σ_i w[i]·x[i]` over the common length, at `level` (which must be supported).
#[inline]
pub fn dot_with<T: Elem>(level: Level, w: &[T], x: &[f32]) -> f32 {
    match level {
        Level::Scalar => reference::dot(w, x),
        // SAFETY: callers pass only levels this CPU supports (`Level::selected`/`available`).
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { avx2::dot(w, x) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { avx512::dot(w, x) },
        // SAFETY: as above.
        #[cfg(target_arch = "aarch64")]
        Level::Neon => unsafe { neon::dot(w, x) },
        _ => reference::dot(w, x),
    }
}

/// `acc[i] += a·w[i]` over the common length, at `level`.
#[inline]
pub fn axpy_with<T: Elem>(level: Level, acc: &mut [f32], a: f32, w: &[T]) {
    match level {
        Level::Scalar => reference::axpy(acc, a, w),
        // SAFETY: callers pass only supported levels.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { avx2::axpy(acc, a, w) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { avx512::axpy(acc, a, w) },
        // SAFETY: as above.
        #[cfg(target_arch = "aarch64")]
        Level::Neon => unsafe { neon::axpy(acc, a, w) },
        _ => reference::axpy(acc, a, w),
    }
}

/// Most queries [`dots_with`] and [`axpy_rows_with`] take in one call.
pub const MANY: usize = 5;

/// `out[j] = dot_with(level, w, xs[j·w.len()..])` for `out.len() ≤ MANY` vectors, bit-equal to
/// those calls; at AVX-512 `w` is widened once for all of them.
#[inline]
pub fn dots_with<T: Elem>(level: Level, w: &[T], xs: &[f32], out: &mut [f32]) {
    let n = w.len();
    assert!(out.len() <= MANY && xs.len() >= out.len() * n);
    match level {
        // SAFETY (every arm): callers pass only supported levels.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => match out.len() {
            0 => {}
            1 => unsafe { avx512::dots::<1, T>(w, xs, out) },
            2 => unsafe { avx512::dots::<2, T>(w, xs, out) },
            3 => unsafe { avx512::dots::<3, T>(w, xs, out) },
            4 => unsafe { avx512::dots::<4, T>(w, xs, out) },
            _ => unsafe { avx512::dots::<5, T>(w, xs, out) },
        },
        _ => {
            for (j, o) in out.iter_mut().enumerate() {
                *o = dot_with(level, w, &xs[j * n..(j + 1) * n]);
            }
        }
    }
}

/// For each `p < rows` in order, `axpy_with(level, accs[j], coeffs[j·stride + p], row(p))` for
/// every accumulator `j` (`accs.len() / width ≤ MANY` of them, `width` values each), bit-equal
/// to those calls; at AVX-512 a column block of all accumulators stays in registers while the
/// rows pass.
#[inline]
pub fn axpy_rows_with<'a, T: Elem>(
    level: Level,
    rows: usize,
    row: impl Fn(usize) -> &'a [T],
    coeffs: &[f32],
    stride: usize,
    accs: &mut [f32],
    width: usize,
) {
    assert!(accs.len().is_multiple_of(width) && accs.len() / width <= MANY);
    match level {
        // SAFETY (every arm): callers pass only supported levels.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => match accs.len() / width {
            0 => {}
            1 => unsafe { avx512::axpy_rows::<1, T>(rows, row, coeffs, stride, accs, width) },
            2 => unsafe { avx512::axpy_rows::<2, T>(rows, row, coeffs, stride, accs, width) },
            3 => unsafe { avx512::axpy_rows::<3, T>(rows, row, coeffs, stride, accs, width) },
            4 => unsafe { avx512::axpy_rows::<4, T>(rows, row, coeffs, stride, accs, width) },
            _ => unsafe { avx512::axpy_rows::<5, T>(rows, row, coeffs, stride, accs, width) },
        },
        _ => {
            for p in 0..rows {
                let r = row(p);
                for (j, acc) in accs.chunks_exact_mut(width).enumerate() {
                    axpy_with(level, acc, coeffs[j * stride + p], &r[..width]);
                }
            }
        }
    }
}

/// `dst[i] = src[i]` widened exactly to f32, for the first `min(len)` values, at `level`.
#[inline]
pub fn widen_with<T: Elem>(level: Level, src: &[T], dst: &mut [f32]) {
    match level {
        // SAFETY: callers pass only supported levels.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { avx2::widen(src, dst) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { avx512::widen(src, dst) },
        _ => {
            for (d, s) in dst.iter_mut().zip(src) {
                *d = s.widen();
            }
        }
    }
}

/// [`widen_with`] at the selected level.
#[inline]
pub fn widen<T: Elem>(src: &[T], dst: &mut [f32]) {
    widen_with(Level::selected(), src, dst)
}

/// The unnormalised 128-point Walsh–Hadamard transform of the trellis format at `level`: the
/// reference's butterflies (`trellis_codec::hadamard::fwht128_unnormalized`) on vectors, so
/// the results are bit-equal to it. Every trellis product runs it on its input and output
/// blocks, many of them on the thread that then waits for the product's workers.
#[inline]
pub fn fwht128_with(level: Level, v: &mut [f32; 128]) {
    match level {
        // SAFETY: callers pass only supported levels.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { avx2::fwht128(v) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { avx512::fwht128(v) },
        _ => trellis_codec::hadamard::fwht128_unnormalized(v),
    }
}

/// [`fwht128_with`] at the selected level.
#[inline]
pub fn fwht128(v: &mut [f32; 128]) {
    fwht128_with(Level::selected(), v)
}

/// `out[c] = Σ_r x[r]·w[r·out.len() + c]`: the transposed product of a row-major
/// `[x.len(), out.len()]` matrix, at `level`: row after row folded into `out` (which stays in
/// L1), so that `w` streams front to back. Reading several rows at once ran at about half that
/// speed from memory (absorbed MLA's `W_UK`, rows of 1 KB: 128-column blocks of all rows held
/// in registers 7.3 GB/s, four rows side by side 9.2, one row at a time 16–18, on one core of
/// the AMD EPYC dev box): the hardware prefetcher follows one stream best.
#[inline]
pub fn gemv_t_with<T: Elem>(level: Level, w: &[T], x: &[f32], out: &mut [f32]) {
    let width = out.len();
    assert!(w.len() >= x.len() * width);
    out.fill(0.0);
    for (r, &xv) in x.iter().enumerate() {
        let row = &w[r * width..(r + 1) * width];
        prefetch_ahead(row);
        axpy_with(level, out, xv, row);
    }
}

/// How far past the row being read [`prefetch_ahead`] asks for weights (`mla_prefill --decode
/// --cold 100 16`, Intel Xeon, 2 threads, 2-byte weights: 2 KiB gave the shortest times, 4 and
/// 8 KiB gained less).
const PREFETCH_AHEAD: usize = 2048;

/// Ask for the bytes `PREFETCH_AHEAD` past `row`, as many as `row` has, to be brought into
/// L1: for weights streamed from memory a row at a time with few vector operations per cache
/// line, where the hardware prefetchers alone fall behind (MLA's f16 `kv_b`, read cold in
/// the median at 16–19 GB/s on two cores of the Intel Xeon box, where a plain streaming read
/// gets 28–32).
#[inline(always)]
pub fn prefetch_ahead<T>(row: &[T]) {
    prefetch(
        row.as_ptr().cast(),
        PREFETCH_AHEAD,
        std::mem::size_of_val(row),
    );
}

/// Ask for the `len` bytes that start `ahead` bytes past `at` to be brought into L1, a cache
/// line at a time (x86-64; a no-op elsewhere). A prefetch never faults, so running past the
/// end of the data is harmless; wrapping arithmetic keeps the address defined.
#[inline(always)]
pub fn prefetch(at: *const u8, ahead: usize, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let start = at.wrapping_add(ahead);
        let mut line = 0;
        while line < len {
            // SAFETY: a prefetch reads nothing architecturally and never faults; SSE is
            // baseline on x86-64.
            unsafe {
                use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
                _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(line).cast());
            }
            line += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (at, ahead, len);
}

/// `out[r·ld + o] = Σ_i x[r·k + i]·w[o·k + i]` for `r < m`, `o < n`: `m` rows of `x` against
/// `n` weight rows in `[out, in]` orientation, at `level`.
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn gemm_nt_with<T: Elem>(
    level: Level,
    w: &[T],
    n: usize,
    x: &[f32],
    m: usize,
    k: usize,
    out: &mut [f32],
    ld: usize,
) {
    match level {
        // SAFETY: callers pass only supported levels.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { avx512_gemm::gemm_nt(w, n, x, m, k, out, ld) },
        // SAFETY: as above.
        #[cfg(target_arch = "aarch64")]
        Level::Neon => unsafe { neon::gemm_nt(w, n, x, m, k, out, ld) },
        // AVX2 (and other levels): one vector dot per output.
        _ => {
            for r in 0..m {
                for o in 0..n {
                    out[r * ld + o] =
                        dot_with(level, &w[o * k..(o + 1) * k], &x[r * k..(r + 1) * k]);
                }
            }
        }
    }
}

/// [`gemm_nt_with`] at the selected level.
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn gemm_nt<T: Elem>(
    w: &[T],
    n: usize,
    x: &[f32],
    m: usize,
    k: usize,
    out: &mut [f32],
    ld: usize,
) {
    gemm_nt_with(Level::selected(), w, n, x, m, k, out, ld)
}

/// [`dot_with`] at the selected level.
#[inline]
pub fn dot<T: Elem>(w: &[T], x: &[f32]) -> f32 {
    dot_with(Level::selected(), w, x)
}

/// [`axpy_with`] at the selected level.
#[inline]
pub fn axpy<T: Elem>(acc: &mut [f32], a: f32, w: &[T]) {
    axpy_with(Level::selected(), acc, a, w)
}

/// [`gemv_t_with`] at the selected level.
#[inline]
pub fn gemv_t<T: Elem>(w: &[T], x: &[f32], out: &mut [f32]) {
    gemv_t_with(Level::selected(), w, x, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
        fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.next()).collect()
        }
    }

    #[test]
    fn many_queries_are_bit_equal_to_one_at_a_time() {
        let mut rng = Lcg(17);
        for level in Level::available() {
            for (n, count) in [(576usize, 5usize), (512, 3), (100, 1), (8, 2), (64, 4)] {
                let w: Vec<f16> = rng.vec(n).into_iter().map(f16::from_f32).collect();
                let xs = rng.vec(count * n);
                let mut got = vec![f32::NAN; count];
                dots_with(level, &w, &xs, &mut got);
                for (j, g) in got.iter().enumerate() {
                    let want = dot_with(level, &w, &xs[j * n..(j + 1) * n]);
                    assert_eq!(
                        g.to_bits(),
                        want.to_bits(),
                        "dots {level:?} n {n} query {j}"
                    );
                }
                // Rows of a paged cache: every other one of a longer table.
                let rows = 7;
                let table: Vec<f16> = rng
                    .vec(2 * rows * n)
                    .into_iter()
                    .map(f16::from_f32)
                    .collect();
                let row = |p: usize| &table[2 * p * n..(2 * p + 1) * n];
                let stride = rows + 3;
                let coeffs = rng.vec(count * stride);
                let start = rng.vec(count * n);
                let mut got = start.clone();
                axpy_rows_with(level, rows, row, &coeffs, stride, &mut got, n);
                let mut want = start;
                for p in 0..rows {
                    for (j, acc) in want.chunks_exact_mut(n).enumerate() {
                        axpy_with(level, acc, coeffs[j * stride + p], row(p));
                    }
                }
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "axpy_rows {level:?} n {n} count {count}"
                );
            }
        }
    }

    #[test]
    fn widen_is_exact_at_every_level() {
        let mut rng = Lcg(13);
        for level in Level::available() {
            for n in [0usize, 5, 16, 23, 512, 576] {
                let v = rng.vec(n);
                let halves: Vec<f16> = v.iter().map(|&x| f16::from_f32(x * 100.0)).collect();
                let brains: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x * 1e30)).collect();
                let mut got = vec![f32::NAN; n + 1];
                widen_with(level, &halves, &mut got);
                assert!(
                    halves.iter().zip(&got).all(|(h, g)| h.to_f32() == *g),
                    "f16 {level:?} {n}"
                );
                assert!(got[n].is_nan(), "{level:?}: wrote past {n}");
                widen_with(level, &brains, &mut got);
                assert!(
                    brains.iter().zip(&got).all(|(h, g)| h.to_f32() == *g),
                    "bf16 {level:?} {n}"
                );
                let bytes: Vec<i8> = v.iter().map(|&x| to_i8(x)).collect();
                widen_with(level, &bytes, &mut got);
                assert!(
                    bytes.iter().zip(&got).all(|(&b, g)| f32::from(b) == *g),
                    "i8 {level:?} {n}"
                );
            }
        }
    }

    #[test]
    fn fwht128_is_bit_equal_to_the_reference_at_every_level() {
        let mut rng = Lcg(11);
        for level in Level::available() {
            for scale in [1.0f32, 1e-30, 3e37] {
                let v: Vec<f32> = rng.vec(128).into_iter().map(|x| x * scale).collect();
                let mut want: [f32; 128] = v.clone().try_into().unwrap();
                trellis_codec::hadamard::fwht128_unnormalized(&mut want);
                let mut got: [f32; 128] = v.try_into().unwrap();
                fwht128_with(level, &mut got);
                // Same butterflies in the same order: equal bits (infinities included).
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "fwht128 {level:?} at scale {scale:e}"
                );
            }
            let mut with_nan = [1.0f32; 128];
            with_nan[77] = f32::NAN;
            fwht128_with(level, &mut with_nan);
            assert!(
                with_nan.iter().all(|x| x.is_nan()),
                "{level:?}: a NaN reaches every output"
            );
        }
    }

    /// Relative L2 error of `got` against `want`; NaN (never below a bound) if any is NaN.
    fn rel_err(got: &[f32], want: &[f32]) -> f64 {
        assert_eq!(got.len(), want.len());
        if got.iter().chain(want).any(|v| !v.is_finite()) {
            return f64::NAN;
        }
        let num: f64 = got
            .iter()
            .zip(want)
            .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
            .sum();
        let den: f64 = want.iter().map(|&b| f64::from(b).powi(2)).sum();
        (num / den.max(1e-30)).sqrt()
    }

    fn check<T: Elem>(convert: impl Fn(f32) -> T) {
        let mut rng = Lcg(7);
        for level in Level::available() {
            for n in [1usize, 7, 16, 31, 64, 100, 512, 576, 1000] {
                let w: Vec<T> = rng.vec(n).into_iter().map(&convert).collect();
                let x = rng.vec(n);
                let want = reference::dot(&w, &x);
                let got = dot_with(level, &w, &x);
                let err = rel_err(&[got], &[want]);
                // A dot's sum may cancel: compare against the sum of magnitudes.
                let mag: f32 = w.iter().zip(&x).map(|(a, b)| (a.widen() * b).abs()).sum();
                assert!(
                    (got - want).abs() <= 1e-5 * mag && !err.is_nan(),
                    "dot {level:?} n {n}: {got} vs {want}"
                );

                let mut acc = rng.vec(n);
                let mut want_acc = acc.clone();
                reference::axpy(&mut want_acc, 0.37, &w);
                axpy_with(level, &mut acc, 0.37, &w);
                assert!(rel_err(&acc, &want_acc) < 1e-6, "axpy {level:?} n {n}");
            }
            for (rows, width) in [(1usize, 1usize), (3, 17), (192, 512), (7, 200), (5, 136)] {
                let w: Vec<T> = rng.vec(rows * width).into_iter().map(&convert).collect();
                let x = rng.vec(rows);
                let mut want = vec![0.0; width];
                reference::gemv_t(&w, &x, &mut want);
                let mut got = vec![f32::NAN; width];
                gemv_t_with(level, &w, &x, &mut got);
                let err = rel_err(&got, &want);
                assert!(err < 1e-5, "gemv_t {level:?} {rows}x{width}: {err}");
            }
        }
    }

    fn check_gemm<T: Elem>(convert: impl Fn(f32) -> T) {
        let mut rng = Lcg(11);
        for level in Level::available() {
            for (n, m, k) in [
                (1usize, 1usize, 1usize),
                (4, 4, 16),
                (9, 7, 40),
                (16, 13, 512),
                (5, 3, 3),
            ] {
                let w: Vec<T> = rng.vec(n * k).into_iter().map(&convert).collect();
                let x = rng.vec(m * k);
                let ld = n + 3;
                let mut want = vec![f32::NAN; m * ld];
                let mut got = want.clone();
                reference::gemm_nt(&w, n, &x, m, k, &mut want, ld);
                gemm_nt_with(level, &w, n, &x, m, k, &mut got, ld);
                let pick = |v: &[f32]| -> Vec<f32> {
                    (0..m)
                        .flat_map(|r| v[r * ld..r * ld + n].to_vec())
                        .collect()
                };
                let err = rel_err(&pick(&got), &pick(&want));
                assert!(err < 1e-5, "gemm_nt {level:?} {n}x{m}x{k}: {err}");
                // The gaps between rows are left alone.
                for r in 0..m.saturating_sub(1) {
                    assert!(got[r * ld + n..(r + 1) * ld].iter().all(|v| v.is_nan()));
                }
            }
        }
    }

    #[test]
    fn gemm_matches_the_reference() {
        check_gemm(|v| v);
        check_gemm(f16::from_f32);
        check_gemm(bf16::from_f32);
    }

    #[test]
    fn kernels_match_the_reference_f32() {
        check(|v| v);
    }

    #[test]
    fn kernels_match_the_reference_f16() {
        check(f16::from_f32);
    }

    #[test]
    fn kernels_match_the_reference_bf16() {
        check(bf16::from_f32);
    }

    /// The int8 values of `--kv-b-int8` (the full range, ±127 and -128 included).
    fn to_i8(v: f32) -> i8 {
        (v * 128.5).floor().clamp(-128.0, 127.0) as i8
    }

    #[test]
    fn kernels_match_the_reference_i8() {
        check(to_i8);
        check_gemm(to_i8);
    }

    #[test]
    fn nan_is_never_hidden() {
        for level in Level::available() {
            let mut w = vec![f16::from_f32(1.0); 64];
            w[37] = f16::NAN;
            assert!(dot_with(level, &w, &[1.0; 64]).is_nan(), "{level:?}");
        }
    }
}
