//! Elementwise arithmetic of the CPU forward pass, written so that it vectorises: libm's
//! `expf` and `tanhf` are a call per element, and a batch's activations are tens of
//! thousands of elements a layer. [`zip_in_place`] runs such a function over a buffer on
//! the compute threads, each piece compiled for the CPU's vector width ([`on_isa`]).

use crate::quant::kernels::{on_isa, round_to_int, IsaKernel};
use crate::quant::Isa;

/// `Σ f(x)` over `xs` in 8 interleaved partial sums (element `i` into sum `i % 8`, in
/// order, then the 8 added in turn): 8 independent chains of additions, which compile to
/// one vector. (Written over an iterator, with `i % 8` picking the sum, it stayed scalar,
/// each addition a load and a store of its sum: ~8 % of a long context's attention.)
#[inline(always)]
pub fn sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; 8];
    let (chunks, rest) = xs.as_chunks::<8>();
    for chunk in chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane += f(x);
        }
    }
    for (lane, &x) in lanes.iter_mut().zip(rest) {
        *lane += f(x);
    }
    lanes.iter().sum()
}

/// The largest of `xs` (NaNs ignored, as by `f32::max`; −∞ if empty), in 16 lanes: one
/// running maximum is a chain of dependent compares, which LLVM vectorises only for
/// slices of 64 or more (a decode row's attention scores are often fewer). The maximum
/// does not depend on the order, so this is `xs`' maximum exactly.
#[inline(always)]
pub fn max(xs: &[f32]) -> f32 {
    let (chunks, rest) = xs.as_chunks::<16>();
    let mut lanes = [f32::NEG_INFINITY; 16];
    for chunk in chunks {
        for (m, &x) in lanes.iter_mut().zip(chunk) {
            *m = m.max(x);
        }
    }
    lanes
        .iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x))
}

/// `e^x` for `x ≤ 0` (softmax weights) within 5e-7 relative of `f32::exp`, in plain
/// arithmetic so that a loop over scores vectorises (libm's `expf` is a call per score):
/// `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2`, `e^r` by its Taylor series to `r⁷` (truncation
/// below 2e-7 relative), times `2^n` built in the exponent bits. NaN gives `e^-87.3`.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75; // ln 2 split so that n·LN2_HI is exact
    const LN2_LO: f32 = 1.428_606_8e-6;
    debug_assert!(x <= 0.0 || x.is_nan(), "exp takes x <= 0, not {x}");
    // ln of the smallest normal f32: below it 2^n would not be a normal number.
    let x = x.max(-87.336_55);
    let n = round_to_int(x * std::f32::consts::LOG2_E);
    let nf = n as f32;
    let r = x - nf * LN2_HI - nf * LN2_LO;
    // Constants only (`r / 5040` would be a division per element, the loop's slowest step).
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    p * f32::from_bits(((n + 127) as u32) << 23)
}

/// SiLU, `x · σ(x)`, with `σ` from `e^-|x|` (so [`exp`] sees only `x ≤ 0`):
/// `σ(x) = 1 / (1 + e^-x)` for `x ≥ 0`, `e^x / (1 + e^x)` below. NaN stays NaN.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    let e = exp(-x.abs());
    let sigmoid = (if x >= 0.0 { 1.0 } else { e }) / (1.0 + e);
    x * sigmoid
}

/// GELU with the tanh approximation (HF `gelu_pytorch_tanh`, candle's `gelu`), with
/// `tanh(y) = sign(y) · (1 − e^-2|y|) / (1 + e^-2|y|)`.
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
    let y = SQRT_TWO_OVER_PI * x * (1.0 + 0.044_715 * x * x);
    let e = exp(-2.0 * y.abs());
    let tanh = ((1.0 - e) / (1.0 + e)).copysign(y);
    0.5 * x * (1.0 + tanh)
}

/// `xs[i] ← f(xs[i], ys[i])` (`ys`: zeros when `None`), over the compute threads in even
/// pieces ([`crate::threads::rows_per_task`] of single elements).
pub fn zip_in_place<F: Fn(f32, f32) -> f32 + Sync>(xs: &mut [f32], ys: Option<&[f32]>, f: F) {
    assert!(
        ys.is_none_or(|ys| ys.len() == xs.len()),
        "operands of one length"
    );
    let isa = Isa::active();
    let piece = crate::threads::rows_per_task(xs.len(), 1);
    crate::threads::parallel_chunks_mut(xs, piece, &|i, xs| {
        let ys = ys.map(|ys| &ys[i * piece..][..xs.len()]);
        on_isa(isa, Zip { xs, ys, f: &f });
    });
}

/// The loop of [`zip_in_place`] over one piece, for [`on_isa`].
struct Zip<'a, F> {
    xs: &'a mut [f32],
    ys: Option<&'a [f32]>,
    f: &'a F,
}

impl<F: Fn(f32, f32) -> f32> IsaKernel for Zip<'_, F> {
    type Out = ();

    #[inline(always)]
    fn run<const SIMD: bool>(self) {
        let Zip { xs, ys, f } = self;
        match ys {
            Some(ys) => xs.iter_mut().zip(ys).for_each(|(x, &y)| *x = f(*x, y)),
            None => xs.iter_mut().for_each(|x| *x = f(*x, 0.0)),
        }
    }
}

/// Test values for lane-wise reductions: few distinct finite values (so ties are common),
/// both infinities and NaN.
#[cfg(test)]
pub(crate) fn ties_and_specials() -> impl proptest::strategy::Strategy<Value = f32> {
    use proptest::prelude::*;
    prop_oneof![
        (-4i8..4).prop_map(f32::from),
        Just(f32::NEG_INFINITY),
        Just(f32::INFINITY),
        Just(f32::NAN),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn exp_matches_the_standard_library() {
        let mut worst = 0f32;
        for i in 0..=200_000 {
            let x = -90.0 * i as f32 / 200_000.0;
            let (ours, std) = (exp(x), x.exp());
            if std > f32::MIN_POSITIVE {
                worst = worst.max(((ours - std) / std).abs());
            } else {
                assert!(ours < 1e-37, "{x}: {ours}");
            }
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), exp(-87.336_55));
    }

    /// Against the textbook formulas in f64 (libm): within 2e-6 of the value's magnitude
    /// plus 2e-7 absolute. Where GELU's `1 + tanh` cancels (x ≈ −5) the same formula in f32
    /// with libm's `tanhf` is off by up to 0.8e-7 absolute, ours by 1.5e-7.
    #[test]
    fn activations_match_the_formulas() {
        let (mut worst_silu, mut worst_gelu) = (0f64, 0f64);
        for i in 0..=400_000 {
            let x = -100.0 + 200.0 * f64::from(i) / 400_000.0;
            let silu_ref = x / (1.0 + (-x).exp());
            let y = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044_715 * x * x * x);
            let gelu_ref = 0.5 * x * (1.0 + y.tanh());
            // 1 at the bound.
            let err = |ours: f32, reference: f64| {
                (f64::from(ours) - reference).abs() / (2e-6 * reference.abs() + 2e-7)
            };
            worst_silu = worst_silu.max(err(silu(x as f32), silu_ref));
            worst_gelu = worst_gelu.max(err(gelu_tanh(x as f32), gelu_ref));
        }
        assert!(worst_silu < 1.0, "silu: {worst_silu}");
        assert!(worst_gelu < 1.0, "gelu: {worst_gelu}");
        assert!(silu(f32::NAN).is_nan() && gelu_tanh(f32::NAN).is_nan());
        assert_eq!((silu(0.0), gelu_tanh(0.0)), (0.0, 0.0));
    }

    proptest! {
        /// The 16-lane maximum is one running `f32::max`'s: infinities and NaNs (ignored)
        /// included, at every length around the 16-lane chunks (signed zeros compare equal).
        #[test]
        fn max_is_the_running_maximum(
            xs in prop::collection::vec(ties_and_specials(), 0..70)
        ) {
            let want = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            prop_assert_eq!(max(&xs), want);
        }
    }

    #[test]
    fn zip_in_place_covers_every_piece() {
        let n = 3 * 8192 + 17;
        let mut xs: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let ys: Vec<f32> = (0..n).map(|i| (2 * i) as f32).collect();
        zip_in_place(&mut xs, Some(&ys), |x, y| x + y);
        assert!(xs.iter().enumerate().all(|(i, &x)| x == (3 * i) as f32));
        zip_in_place(&mut xs, None, |x, _| -x);
        assert!(xs.iter().enumerate().all(|(i, &x)| x == -((3 * i) as f32)));
    }
}
