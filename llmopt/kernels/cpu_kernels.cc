// llmopt's CPU kernel library for ONNX Runtime (custom-op domain ai.llmopt), two matrix
// products that stream their weights once per pass of up to 8 rows:
//
// MatMulQ: block-quantized weights (4- or 8-bit codes, blocks of 32 along K) whose blocks are
// affine, w = s * q + m with a float s and a float m per block and output column. ONNX Runtime's
// MatMulNBits runs its fast int8-activation path only for integer zero points, so llmopt's GGUF
// Q4_1 (and HQQ) weights, whose zero points are floats, ran as a symmetric MatMulNBits plus a
// block-sum correction of three more nodes (Split, MatMul, Add). MatMulQ does both in one pass:
//
//   y[r, n] = sum_b sx[r, b] * (s[n, b] * sum_{k in b} q[n, k] * xq[r, k] + m[n, b] * isum[r, b])
//
// where xq are x's values rounded to int8 per block of 32 (scale sx = max|x| / 127, as
// MatMulNBits does at accuracy level 4) and isum their sum, so the m term sees the same rounded
// activations as the q term (w * x_rounded, exactly, up to float rounding).
//
// MatMulF: float32 weights in tiles of 16 columns (see below).
//
// MatMulQ's weight layout (built by llmopt/runtime/kernels.py), one uint8 tensor
// [tiles, blocks, stride]:
// 16 output columns per tile; per (tile, block) the codes, then s and m for its 16 columns, in
// float16 where that holds them (GGUF's scales are float16) or float32 (scale_bits).
// 4-bit: 4 chunks of 64 bytes; byte 4 * col + j of chunk c holds k = 8c + j in its low nibble
// and k = 8c + 4 + j in its high one, so one AVX-512 VNNI dpbusd multiplies 4 k of 16 columns
// by 4 broadcast int8 activations. 8-bit: 8 chunks of 64 bytes, byte 4 * col + j of chunk g
// holds k = 4g + j.
//
// The ONNX Runtime C API is used through a handful of entries of its function table, declared
// below by their documented positions (the table only ever grows), so no ONNX Runtime header is
// needed to build this file.

#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

namespace {

// ---- the vector operations, on AVX-512 or on AVX2 ----
//
// The kernels are written for 16 float32 lanes (a tile's 16 output columns) through the few
// operations of namespace simd, named after the AVX-512 intrinsics they are. Built with AVX-512
// (-mavx512f ... -mavx512vnni) each is that one instruction. Built for AVX2 (-mavx2 -mfma
// -mf16c: Zen 2 and 3, Intel before Ice Lake and its client cores since) each vector is a pair
// of 256-bit halves, and every lane gets the same operations in the same order: the int8 dot
// products are exact integers either way and the float arithmetic is the same fused
// multiply-adds and additions, so the two builds compute the same floats (the tests hold them
// to it). AVX2 has no VNNI: a block's dot products (BlockDot) are vpmaddubsw into int16 pairs,
// kept below saturation by taking the codes a nibble at a time, and one vpmaddwd per block.
namespace simd {

#define LLMOPT_INLINE inline __attribute__((always_inline))

#if defined(__AVX512F__)

constexpr const char* kIsa = "avx512";
// MatMulF's rows per pass over a pair of tiles: 8 x 2 accumulators of the 32 registers
constexpr int kFloatRows = 8;
constexpr int kFloatTileRows = 0;  // (AVX2 only: see there)
using f32x16 = __m512;
using i32x16 = __m512i;  // 16 int32, or 64 bytes where an operation reads bytes
using mask16 = __mmask16;

LLMOPT_INLINE f32x16 setzero_ps() { return _mm512_setzero_ps(); }
LLMOPT_INLINE f32x16 set1_ps(float a) { return _mm512_set1_ps(a); }
LLMOPT_INLINE f32x16 loadu_ps(const float* p) { return _mm512_loadu_ps(p); }
LLMOPT_INLINE void storeu_ps(float* p, f32x16 a) { _mm512_storeu_ps(p, a); }
LLMOPT_INLINE f32x16 maskz_loadu_ps(mask16 m, const float* p) {
  return _mm512_maskz_loadu_ps(m, p);
}
LLMOPT_INLINE void mask_storeu_ps(float* p, mask16 m, f32x16 a) {
  _mm512_mask_storeu_ps(p, m, a);
}
LLMOPT_INLINE f32x16 maskz_mov_ps(mask16 m, f32x16 a) { return _mm512_maskz_mov_ps(m, a); }
// 16 float16 at p
LLMOPT_INLINE f32x16 load_ph(const void* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
}
LLMOPT_INLINE f32x16 add_ps(f32x16 a, f32x16 b) { return _mm512_add_ps(a, b); }
LLMOPT_INLINE f32x16 sub_ps(f32x16 a, f32x16 b) { return _mm512_sub_ps(a, b); }
LLMOPT_INLINE f32x16 mul_ps(f32x16 a, f32x16 b) { return _mm512_mul_ps(a, b); }
LLMOPT_INLINE f32x16 div_ps(f32x16 a, f32x16 b) { return _mm512_div_ps(a, b); }
LLMOPT_INLINE f32x16 max_ps(f32x16 a, f32x16 b) { return _mm512_max_ps(a, b); }
LLMOPT_INLINE f32x16 min_ps(f32x16 a, f32x16 b) { return _mm512_min_ps(a, b); }
LLMOPT_INLINE f32x16 abs_ps(f32x16 a) { return _mm512_abs_ps(a); }
LLMOPT_INLINE f32x16 fmadd_ps(f32x16 a, f32x16 b, f32x16 c) { return _mm512_fmadd_ps(a, b, c); }
LLMOPT_INLINE f32x16 fmsub_ps(f32x16 a, f32x16 b, f32x16 c) { return _mm512_fmsub_ps(a, b, c); }
LLMOPT_INLINE f32x16 fnmadd_ps(f32x16 a, f32x16 b, f32x16 c) {
  return _mm512_fnmadd_ps(a, b, c);
}
LLMOPT_INLINE f32x16 round_ps(f32x16 a) {  // to the nearest integer, ties to even
  return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
// a * 2^n for integral n in [-127, 127]
LLMOPT_INLINE f32x16 scalef_ps(f32x16 a, f32x16 n) { return _mm512_scalef_ps(a, n); }
LLMOPT_INLINE float reduce_add_ps(f32x16 a) { return _mm512_reduce_add_ps(a); }
LLMOPT_INLINE float reduce_max_ps(f32x16 a) { return _mm512_reduce_max_ps(a); }
// y with the sign bit of x set where x's is (y non-negative: y with x's sign)
LLMOPT_INLINE f32x16 or_sign_ps(f32x16 y, f32x16 x) {
  const __m512i bit = _mm512_set1_epi32(INT32_MIN);
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(y),
                                             _mm512_and_si512(_mm512_castps_si512(x), bit)));
}

LLMOPT_INLINE i32x16 setzero_si512() { return _mm512_setzero_si512(); }
LLMOPT_INLINE i32x16 set1_epi8(char a) { return _mm512_set1_epi8(a); }
LLMOPT_INLINE i32x16 set1_epi32(int32_t a) { return _mm512_set1_epi32(a); }
LLMOPT_INLINE i32x16 loadu_si512(const void* p) { return _mm512_loadu_si512(p); }
LLMOPT_INLINE i32x16 and_si512(i32x16 a, i32x16 b) { return _mm512_and_si512(a, b); }
LLMOPT_INLINE i32x16 srli_epi16(i32x16 a, unsigned n) { return _mm512_srli_epi16(a, n); }
LLMOPT_INLINE i32x16 add_epi32(i32x16 a, i32x16 b) { return _mm512_add_epi32(a, b); }
LLMOPT_INLINE i32x16 cvtps_epi32(f32x16 a) { return _mm512_cvtps_epi32(a); }
LLMOPT_INLINE f32x16 cvtepi32_ps(i32x16 a) { return _mm512_cvtepi32_ps(a); }
LLMOPT_INLINE int32_t reduce_add_epi32(i32x16 a) { return _mm512_reduce_add_epi32(a); }
// the 16 int32 saturated to int8, stored at p
LLMOPT_INLINE void store_epi8(int8_t* p, i32x16 a) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtsepi32_epi8(a));
}
// A block's integer dot products, 16 int32 lanes each summing the products of 4-byte groups
// of unsigned codes by signed activations: block_add(acc, codes, x) adds a group's (codes of
// 16 columns, x 4 activations broadcast), block_add_nibbles the same where every code is below
// 16, and block_sum_of<BYTES>(acc) gives the int32 sums. At most 8 groups per block (32 k). Here each
// add is one dpbusd.
using BlockDot = i32x16;
LLMOPT_INLINE BlockDot block_zero() { return setzero_si512(); }
LLMOPT_INLINE BlockDot block_add(BlockDot acc, i32x16 codes, i32x16 x) {
  return _mm512_dpbusd_epi32(acc, codes, x);
}
LLMOPT_INLINE BlockDot block_add_nibbles(BlockDot acc, i32x16 codes, i32x16 x) {
  return _mm512_dpbusd_epi32(acc, codes, x);
}
template <bool BYTES>  // (the codes were bytes, not nibbles: the same here)
LLMOPT_INLINE i32x16 block_sum_of(BlockDot acc) { return acc; }

LLMOPT_INLINE void prefetch_nta(const void* p) {
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_NTA);
}
LLMOPT_INLINE void prefetch_l2(const void* p) {
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1);
}

LLMOPT_INLINE bool supported() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
         __builtin_cpu_supports("f16c");
}

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)

constexpr const char* kIsa = "avx2";
// MatMulF's rows per pass: 3 x 2 tiles x 2 halves, 12 accumulators of the 16 registers (one
// thread, Zen 3, K 576, N 1536: 108 rows 6.3 ms in passes of 8 rows, 4.1 in passes of 3;
// 8 rows 0.45 -> 0.31 ms; MatMulQ's passes measured best as on AVX-512)
constexpr int kFloatRows = 3;
// and over a single tile, for a prompt's products without the SwiGLU epilogue (which needs its
// pair): 6 x 2 halves, as ONNX Runtime's AVX2 SGEMM holds 6 x 16 (108 rows 1.17x in two
// interleaved runs against passes of 3 over the pair)
constexpr int kFloatTileRows = 6;
struct f32x16 { __m256 lo, hi; };   // lanes 0-7, 8-15
struct i32x16 { __m256i lo, hi; };  // int32 lanes 0-7 (bytes 0-31), 8-15 (bytes 32-63)
using mask16 = uint16_t;

// lane i of a half all ones where bit i (of the half's 8) of m is set
LLMOPT_INLINE __m256i lanes(unsigned m) {
  const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(m)), bits),
                            bits);
}

LLMOPT_INLINE f32x16 setzero_ps() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
LLMOPT_INLINE f32x16 set1_ps(float a) { return {_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
LLMOPT_INLINE f32x16 loadu_ps(const float* p) {
  return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)};
}
LLMOPT_INLINE void storeu_ps(float* p, f32x16 a) {
  _mm256_storeu_ps(p, a.lo);
  _mm256_storeu_ps(p + 8, a.hi);
}
LLMOPT_INLINE f32x16 maskz_loadu_ps(mask16 m, const float* p) {  // no lane past m is read
  return {_mm256_maskload_ps(p, lanes(m & 0xFFu)), _mm256_maskload_ps(p + 8, lanes(m >> 8))};
}
LLMOPT_INLINE void mask_storeu_ps(float* p, mask16 m, f32x16 a) {
  _mm256_maskstore_ps(p, lanes(m & 0xFFu), a.lo);
  _mm256_maskstore_ps(p + 8, lanes(m >> 8), a.hi);
}
LLMOPT_INLINE f32x16 maskz_mov_ps(mask16 m, f32x16 a) {
  return {_mm256_and_ps(_mm256_castsi256_ps(lanes(m & 0xFFu)), a.lo),
          _mm256_and_ps(_mm256_castsi256_ps(lanes(m >> 8)), a.hi)};
}
LLMOPT_INLINE f32x16 load_ph(const void* p) {
  const __m256i h = _mm256_loadu_si256(static_cast<const __m256i*>(p));
  return {_mm256_cvtph_ps(_mm256_castsi256_si128(h)),
          _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1))};
}
#define LLMOPT_HALVES_PS(name, op)                                 \
  LLMOPT_INLINE f32x16 name(f32x16 a, f32x16 b) {                  \
    return {op(a.lo, b.lo), op(a.hi, b.hi)};                       \
  }
LLMOPT_HALVES_PS(add_ps, _mm256_add_ps)
LLMOPT_HALVES_PS(sub_ps, _mm256_sub_ps)
LLMOPT_HALVES_PS(mul_ps, _mm256_mul_ps)
LLMOPT_HALVES_PS(div_ps, _mm256_div_ps)
LLMOPT_HALVES_PS(max_ps, _mm256_max_ps)
LLMOPT_HALVES_PS(min_ps, _mm256_min_ps)
#undef LLMOPT_HALVES_PS
LLMOPT_INLINE f32x16 abs_ps(f32x16 a) {
  const __m256 m = _mm256_castsi256_ps(_mm256_set1_epi32(INT32_MAX));
  return {_mm256_and_ps(a.lo, m), _mm256_and_ps(a.hi, m)};
}
LLMOPT_INLINE f32x16 fmadd_ps(f32x16 a, f32x16 b, f32x16 c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
LLMOPT_INLINE f32x16 fmsub_ps(f32x16 a, f32x16 b, f32x16 c) {
  return {_mm256_fmsub_ps(a.lo, b.lo, c.lo), _mm256_fmsub_ps(a.hi, b.hi, c.hi)};
}
LLMOPT_INLINE f32x16 fnmadd_ps(f32x16 a, f32x16 b, f32x16 c) {
  return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
}
LLMOPT_INLINE f32x16 round_ps(f32x16 a) {
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return {_mm256_round_ps(a.lo, kNearest), _mm256_round_ps(a.hi, kNearest)};
}
// 2^n for integral n in [-126, 127], from its exponent bits
LLMOPT_INLINE __m256 pow2(__m256i n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23));
}
// a * 2^n as two exact halvings of n (each within float's exponents), one rounding at the end
// as scalef rounds, for integral n in [-127, 127]
LLMOPT_INLINE __m256 scalef_half(__m256 a, __m256 n) {
  const __m256i i = _mm256_cvtps_epi32(n), first = _mm256_srai_epi32(i, 1);
  return _mm256_mul_ps(_mm256_mul_ps(a, pow2(first)), pow2(_mm256_sub_epi32(i, first)));
}
LLMOPT_INLINE f32x16 scalef_ps(f32x16 a, f32x16 n) {
  return {scalef_half(a.lo, n.lo), scalef_half(a.hi, n.hi)};
}
// the reductions in the order GCC's _mm512_reduce_add_ps takes: halves, then quarters, then
// pairs, then the last two
LLMOPT_INLINE float reduce_add_ps(f32x16 a) {
  const __m256 h = _mm256_add_ps(a.hi, a.lo);
  const __m128 q = _mm_add_ps(_mm256_extractf128_ps(h, 1), _mm256_castps256_ps128(h));
  const __m128 p = _mm_add_ps(q, _mm_shuffle_ps(q, q, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(p) + _mm_cvtss_f32(_mm_shuffle_ps(p, p, _MM_SHUFFLE(3, 2, 0, 1)));
}
LLMOPT_INLINE float reduce_max_ps(f32x16 a) {
  const __m256 h = _mm256_max_ps(a.hi, a.lo);
  const __m128 q = _mm_max_ps(_mm256_extractf128_ps(h, 1), _mm256_castps256_ps128(h));
  const __m128 p = _mm_max_ps(q, _mm_shuffle_ps(q, q, _MM_SHUFFLE(1, 0, 3, 2)));
  return std::max(_mm_cvtss_f32(p), _mm_cvtss_f32(_mm_shuffle_ps(p, p, _MM_SHUFFLE(3, 2, 0, 1))));
}
LLMOPT_INLINE f32x16 or_sign_ps(f32x16 y, f32x16 x) {
  const __m256 bit = _mm256_castsi256_ps(_mm256_set1_epi32(INT32_MIN));
  return {_mm256_or_ps(y.lo, _mm256_and_ps(x.lo, bit)),
          _mm256_or_ps(y.hi, _mm256_and_ps(x.hi, bit))};
}

LLMOPT_INLINE i32x16 setzero_si512() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
LLMOPT_INLINE i32x16 set1_epi8(char a) { return {_mm256_set1_epi8(a), _mm256_set1_epi8(a)}; }
LLMOPT_INLINE i32x16 set1_epi32(int32_t a) {
  return {_mm256_set1_epi32(a), _mm256_set1_epi32(a)};
}
LLMOPT_INLINE i32x16 loadu_si512(const void* p) {
  const auto* v = static_cast<const __m256i*>(p);
  return {_mm256_loadu_si256(v), _mm256_loadu_si256(v + 1)};
}
LLMOPT_INLINE i32x16 and_si512(i32x16 a, i32x16 b) {
  return {_mm256_and_si256(a.lo, b.lo), _mm256_and_si256(a.hi, b.hi)};
}
LLMOPT_INLINE i32x16 srli_epi16(i32x16 a, unsigned n) {
  const int by = static_cast<int>(n);
  return {_mm256_srli_epi16(a.lo, by), _mm256_srli_epi16(a.hi, by)};
}
LLMOPT_INLINE i32x16 add_epi32(i32x16 a, i32x16 b) {
  return {_mm256_add_epi32(a.lo, b.lo), _mm256_add_epi32(a.hi, b.hi)};
}
LLMOPT_INLINE i32x16 cvtps_epi32(f32x16 a) {
  return {_mm256_cvtps_epi32(a.lo), _mm256_cvtps_epi32(a.hi)};
}
LLMOPT_INLINE f32x16 cvtepi32_ps(i32x16 a) {
  return {_mm256_cvtepi32_ps(a.lo), _mm256_cvtepi32_ps(a.hi)};
}
LLMOPT_INLINE int32_t reduce_add_epi32(i32x16 a) {
  const __m256i h = _mm256_add_epi32(a.lo, a.hi);
  __m128i q = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
  q = _mm_add_epi32(q, _mm_shuffle_epi32(q, _MM_SHUFFLE(1, 0, 3, 2)));
  q = _mm_add_epi32(q, _mm_shuffle_epi32(q, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(q);
}
LLMOPT_INLINE void store_epi8(int8_t* p, i32x16 a) {
  // int32 -> int16 -> int8, each saturating (as int32 -> int8 saturates); packs works within
  // 128-bit lanes, so the int16 quarters are put back in order before the second
  const __m256i words = _mm256_permute4x64_epi64(_mm256_packs_epi32(a.lo, a.hi), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packs_epi16(_mm256_castsi256_si128(words),
                                   _mm256_extracti128_si256(words, 1)));
}
// No VNNI: vpmaddubsw multiplies unsigned by signed bytes and adds each pair into an int16,
// saturating. Codes below 16 against activations of at most 127 in magnitude give pairs of at
// most 2 * 15 * 127 = 3810, so a block's 8 groups of 4-bit codes add up in int16 (30480 at
// most) without saturating, and one vpmaddwd per block makes the int32 sums (SmolLM2 int4: a
// 110-token prompt 1.13x faster in 12 interleaved rounds, decoding unchanged). An 8-bit code is its two nibbles,
// whose products go to int32 at once, the high ones' times 16 (kept as int16 across the
// block, the two accumulators per row and column spilled out of AVX2's 16 registers: 0.70x).
struct BlockDot {
  i32x16 sums;  // int16 pair sums for 4-bit codes, int32 sums for 8-bit ones
};
LLMOPT_INLINE BlockDot block_zero() { return {setzero_si512()}; }
LLMOPT_INLINE BlockDot block_add_nibbles(BlockDot acc, i32x16 codes, i32x16 x) {
  return {{_mm256_add_epi16(acc.sums.lo, _mm256_maddubs_epi16(codes.lo, x.lo)),
           _mm256_add_epi16(acc.sums.hi, _mm256_maddubs_epi16(codes.hi, x.hi))}};
}
LLMOPT_INLINE __m256i add_bytes(__m256i acc, __m256i codes, __m256i x) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i lo = _mm256_maddubs_epi16(_mm256_and_si256(codes, low4), x);
  const __m256i hi =
      _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(codes, 4), low4), x);
  return _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(lo, _mm256_set1_epi16(1)),
                                                _mm256_madd_epi16(hi, _mm256_set1_epi16(16))));
}
LLMOPT_INLINE BlockDot block_add(BlockDot acc, i32x16 codes, i32x16 x) {
  return {{add_bytes(acc.sums.lo, codes.lo, x.lo), add_bytes(acc.sums.hi, codes.hi, x.hi)}};
}
template <bool BYTES>
LLMOPT_INLINE i32x16 block_sum_of(BlockDot acc) {
  if constexpr (BYTES) return acc.sums;
  const __m256i ones = _mm256_set1_epi16(1);
  return {_mm256_madd_epi16(acc.sums.lo, ones), _mm256_madd_epi16(acc.sums.hi, ones)};
}

// The prefetches as instructions that touch no memory the compiler tracks: GCC takes
// _mm_prefetch for a memory access that may alias the kernels' accumulator arrays, and with
// those arrays of pairs of halves (not vector registers, as on AVX-512) it then stored every
// accumulator each step of the k loop: MatMulF's 108-row product ran 1.4x slower.
LLMOPT_INLINE void prefetch_nta(const void* p) { asm("prefetchnta (%0)" : : "r"(p)); }
LLMOPT_INLINE void prefetch_l2(const void* p) { asm("prefetcht1 (%0)" : : "r"(p)); }

LLMOPT_INLINE bool supported() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}

#else
#error "llmopt's kernels need AVX-512 with VNNI, or AVX2 with FMA and F16C (-mavx2 -mfma -mf16c)"
#endif

}  // namespace simd


struct OrtStatus;
struct OrtApi;
struct OrtKernelInfo;
struct OrtKernelContext;
struct OrtValue;
struct OrtTensorTypeAndShapeInfo;
struct OrtSessionOptions;
struct OrtCustomOpDomain;
using Status = OrtStatus*;

// ---- the ONNX Runtime C API entries used (index into OrtApi, which is a table of pointers) ----

enum ApiSlot : size_t {
  kCreateStatus = 0,
  kCreateCustomOpDomain = 26,
  kCustomOpDomainAdd = 27,
  kAddCustomOpDomain = 28,
  kGetTensorMutableData = 51,
  kGetDimensionsCount = 61,
  kGetDimensions = 62,
  kGetTensorTypeAndShape = 65,
  kKernelInfoGetAttributeFloat = 85,
  kKernelInfoGetAttributeInt64 = 86,
  kKernelContextGetInput = 90,
  kKernelContextGetOutput = 91,
  kReleaseTensorTypeAndShapeInfo = 99,
  kKernelContextParallelFor = 274,
};
constexpr uint32_t kApiVersion = 17;  // the first with KernelContext_ParallelFor
constexpr int kFail = 1;              // OrtErrorCode ORT_FAIL
constexpr int kInvalidArgument = 2;   // OrtErrorCode ORT_INVALID_ARGUMENT
constexpr int kFloat = 1, kUint8 = 2, kInt32 = 6;  // ONNXTensorElementDataType

template <typename F>
F entry(const OrtApi* api, ApiSlot slot) {
  return reinterpret_cast<F>(reinterpret_cast<void* const*>(api)[slot]);
}

struct Api {
  const OrtApi* api = nullptr;

  Status error(int code, const char* message) const {
    return entry<Status (*)(int, const char*)>(api, kCreateStatus)(code, message);
  }
  Status input(const OrtKernelContext* ctx, size_t i, const OrtValue** out) const {
    return entry<Status (*)(const OrtKernelContext*, size_t, const OrtValue**)>(
        api, kKernelContextGetInput)(ctx, i, out);
  }
  Status output(OrtKernelContext* ctx, size_t i, const int64_t* dims, size_t n,
                OrtValue** out) const {
    return entry<Status (*)(OrtKernelContext*, size_t, const int64_t*, size_t, OrtValue**)>(
        api, kKernelContextGetOutput)(ctx, i, dims, n, out);
  }
  Status data(const OrtValue* value, void** out) const {
    return entry<Status (*)(const OrtValue*, void**)>(api, kGetTensorMutableData)(value, out);
  }
  Status shape(const OrtValue* value, std::vector<int64_t>* dims) const {
    OrtTensorTypeAndShapeInfo* info = nullptr;
    Status status = entry<Status (*)(const OrtValue*, OrtTensorTypeAndShapeInfo**)>(
        api, kGetTensorTypeAndShape)(value, &info);
    if (status) return status;
    size_t rank = 0;
    status = entry<Status (*)(const OrtTensorTypeAndShapeInfo*, size_t*)>(
        api, kGetDimensionsCount)(info, &rank);
    if (!status) {
      dims->assign(rank, 0);
      status = entry<Status (*)(const OrtTensorTypeAndShapeInfo*, int64_t*, size_t)>(
          api, kGetDimensions)(info, dims->data(), rank);
    }
    entry<void (*)(OrtTensorTypeAndShapeInfo*)>(api, kReleaseTensorTypeAndShapeInfo)(info);
    return status;
  }
  Status attribute(const OrtKernelInfo* info, const char* name, int64_t* out) const {
    return entry<Status (*)(const OrtKernelInfo*, const char*, int64_t*)>(
        api, kKernelInfoGetAttributeInt64)(info, name, out);
  }
  Status attribute(const OrtKernelInfo* info, const char* name, float* out) const {
    return entry<Status (*)(const OrtKernelInfo*, const char*, float*)>(
        api, kKernelInfoGetAttributeFloat)(info, name, out);
  }
  // fn(data, i) for i < total, in `batches` contiguous runs on the session's intra-op threads
  Status parallel_for(const OrtKernelContext* ctx, void (*fn)(void*, size_t), size_t total,
                      size_t batches, void* data) const {
    return entry<Status (*)(const OrtKernelContext*, void (*)(void*, size_t), size_t, size_t,
                            void*)>(api, kKernelContextParallelFor)(ctx, fn, total, batches,
                                                                     data);
  }
};

// ---- the kernel ----

constexpr int kBlock = 32;
constexpr int kTile = 16;
constexpr int kMaxRows = 8;  // rows computed together per pass over a tile's weights
// MatMulQ prefetches the weights this far ahead of the block it reads (SmolLM2 int4 step on 2
// threads: 5.87 ms without, 5.63 with 8 KB, 5.60 with 16 KB), as non-temporal data: a decode
// step streams 100+ MB of weights that no later node reads, and in the caches they would push
// out what the graph's other nodes and ONNX Runtime between them do read (batch-1 step, 31
// interleaved rounds, Zen 4: int4 1.074x, faster in 27; int8 1.013x, 24; batch 8 1.02x and
// 1.015x). MatMulF's prefetch into L2 stays: non-temporal, the fused package's step was 0.976x.
constexpr int kPrefetchBytes = 8192;

constexpr int codes_bytes(int bits) { return kTile * kBlock * bits / 8; }
// per (tile, block): the codes, the 16 scales, and the 16 offsets unless the blocks are
// symmetric (then m = -zero_point * s, zero_point 8 or 128, nothing stored)
constexpr int stride_bytes(int bits, int scale_bits, bool symmetric) {
  return codes_bytes(bits) + (symmetric ? 1 : 2) * kTile * scale_bits / 8;
}

// the `activation` attribute: what follows the product (and its bias, when it has one)
constexpr int kNone = 0, kSiluMul = 1, kGelu = 2;

// exp(x) to about 1e-7 relative: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial in r
inline simd::f32x16 exp_ps(simd::f32x16 x) {
  x = simd::max_ps(simd::min_ps(x, simd::set1_ps(88.0f)), simd::set1_ps(-88.0f));
  const simd::f32x16 n = simd::round_ps(simd::mul_ps(x, simd::set1_ps(1.44269504088896341f)));
  simd::f32x16 r = simd::fnmadd_ps(n, simd::set1_ps(0.693145751953125f), x);
  r = simd::fnmadd_ps(n, simd::set1_ps(1.428606765330187e-06f), r);
  simd::f32x16 p = simd::set1_ps(1.0f / 720.0f);
  for (const float c : {1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f})
    p = simd::fmadd_ps(p, r, simd::set1_ps(c));
  return simd::scalef_ps(p, n);
}

// silu(g) * u = g / (1 + exp(-g)) * u: a SwiGLU MLP's gate and up halves
inline simd::f32x16 silu_mul(simd::f32x16 g, simd::f32x16 u) {
  const simd::f32x16 e = exp_ps(simd::sub_ps(simd::setzero_ps(), g));
  return simd::mul_ps(simd::div_ps(g, simd::add_ps(simd::set1_ps(1.0f), e)), u);
}

// erf(x) to 1.5e-7 (Abramowitz and Stegun 7.1.26): 1 - t (a1 + t (a2 + ...)) exp(-x^2),
// t = 1 / (1 + p |x|), odd in x
inline simd::f32x16 erf_ps(simd::f32x16 x) {
  const simd::f32x16 z = simd::abs_ps(x);
  const simd::f32x16 t = simd::div_ps(simd::set1_ps(1.0f),
                                 simd::fmadd_ps(z, simd::set1_ps(0.3275911f), simd::set1_ps(1.0f)));
  simd::f32x16 p = simd::set1_ps(1.061405429f);
  for (const float c : {-1.453152027f, 1.421413741f, -0.284496736f, 0.254829592f})
    p = simd::fmadd_ps(p, t, simd::set1_ps(c));
  const simd::f32x16 e = exp_ps(simd::sub_ps(simd::setzero_ps(), simd::mul_ps(z, z)));
  const simd::f32x16 y = simd::fnmadd_ps(simd::mul_ps(p, t), e, simd::set1_ps(1.0f));
  return simd::or_sign_ps(y, x);  // x's sign onto y
}

// gelu(x) = x / 2 * (1 + erf(x / sqrt(2))): BERT's (and BiasGelu's) exact GELU
inline simd::f32x16 gelu(simd::f32x16 x) {
  const simd::f32x16 e = erf_ps(simd::mul_ps(x, simd::set1_ps(0.70710678118654752f)));
  return simd::mul_ps(simd::mul_ps(x, simd::set1_ps(0.5f)),
                       simd::add_ps(e, simd::set1_ps(1.0f)));
}

// A product's epilogue on R rows of one output tile: acc (and up, the paired tile of a SwiGLU)
// plus their bias where there is one (`bias`, `up_bias`: the tiles' 16 values, or nullptr), then
// the activation.
template <int R>
inline void finish(int activation, const float* bias, const float* up_bias, simd::f32x16* acc,
                   simd::f32x16* up) {
  if (bias) {
    const simd::f32x16 b = simd::loadu_ps(bias);
    for (int r = 0; r < R; ++r) acc[r] = simd::add_ps(acc[r], b);
  }
  if (activation == kSiluMul) {
    if (up_bias) {
      const simd::f32x16 b = simd::loadu_ps(up_bias);
      for (int r = 0; r < R; ++r) up[r] = simd::add_ps(up[r], b);
    }
    for (int r = 0; r < R; ++r) acc[r] = silu_mul(acc[r], up[r]);
  } else if (activation == kGelu) {
    for (int r = 0; r < R; ++r) acc[r] = gelu(acc[r]);
  }
}

// Where a product's output columns go: one [rows, n] tensor, or `parts` equal runs of columns
// each in a [rows, n / parts] tensor of its own (a packed query/key/value product and the Split
// after it, so that no copy splits them; each part a whole number of tiles).
constexpr int kMaxParts = 3;
struct Out {
  float* y[kMaxParts];
  int64_t width;  // columns per part: all of them when there is one part
};

inline void store_rows(const Out& out, int64_t row0, int64_t col0, int rows,
                       const simd::f32x16* acc) {
  const int64_t part = col0 / out.width, col = col0 - part * out.width;
  const int64_t valid = std::min<int64_t>(kTile, out.width - col);
  const simd::mask16 mask = static_cast<simd::mask16>((1u << valid) - 1u);
  float* y = out.y[part] + row0 * out.width + col;
  for (int r = 0; r < rows; ++r) simd::mask_storeu_ps(y + r * out.width, mask, acc[r]);
}

struct Work {
  const uint8_t* weights;
  const int8_t* xq;     // [rows, K]
  const float* sx;      // [rows, blocks]
  const float* isum;    // [rows, blocks]
  Out out;              // [rows, N] (N / 2 with the SiLU epilogue), or its parts
  int64_t rows, k, blocks, tiles;
  int bits, scale_bits;
  // kNone, kGelu, or kSiluMul: tiles come in (gate, up) pairs, y = silu(gate) * up
  int epilogue;
  int zero_point;  // 0: offsets stored; else symmetric blocks, m = -zero_point * s
  const float* bias;  // [tiles * 16] in the weights' column order, or nullptr
};

inline const float* tile_bias(const float* bias, int64_t tile) {
  return bias ? bias + tile * kTile : nullptr;
}

template <bool HALF>
inline simd::f32x16 load_scales(const uint8_t* p) {
  if constexpr (HALF)
    return simd::load_ph(p);
  else
    return simd::loadu_ps(reinterpret_cast<const float*>(p));
}

// T consecutive tiles (tile0, tile0 + 1, ...) for rows [row0, row0 + R) into acc[t][r]: each
// broadcast activation feeds T products and each weight load R. Every (row, tile) sums the same
// terms in the same order whatever T, R or the rows beside it.
template <int R, int T, int BITS, bool HALF, bool SYM>
void tiles_rows(const Work& w, int64_t tile0, int64_t row0, simd::f32x16 (*acc)[R]) {
  constexpr int kStride = stride_bytes(BITS, HALF ? 16 : 32, SYM);
  const uint8_t* base[T];
  for (int t = 0; t < T; ++t) base[t] = w.weights + (tile0 + t) * w.blocks * kStride;
  const int32_t* x4[R];
  const float* sx[R];
  const float* isum[R];
  for (int r = 0; r < R; ++r) {
    x4[r] = reinterpret_cast<const int32_t*>(w.xq + (row0 + r) * w.k);
    sx[r] = w.sx + (row0 + r) * w.blocks;
    isum[r] = w.isum + (row0 + r) * w.blocks;
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = simd::setzero_ps();
  const simd::i32x16 low4 = simd::set1_epi8(0x0F);
  for (int64_t b = 0; b < w.blocks; ++b) {
    const uint8_t* blk[T];
    for (int t = 0; t < T; ++t) {
      blk[t] = base[t] + b * kStride;
      if constexpr (T == 1)  // pairs run over many rows: their weights come from cache
        for (int line = 0; line < kStride; line += 64)
          simd::prefetch_nta(blk[t] + kPrefetchBytes + line);
    }
    simd::BlockDot dot[T][R];
    for (int t = 0; t < T; ++t)
      for (int r = 0; r < R; ++r) dot[t][r] = simd::block_zero();
    if constexpr (BITS == 4) {
      for (int c = 0; c < 4; ++c) {
        simd::i32x16 lo_x[R], hi_x[R];
        for (int r = 0; r < R; ++r) {
          lo_x[r] = simd::set1_epi32(x4[r][8 * b + 2 * c]);
          hi_x[r] = simd::set1_epi32(x4[r][8 * b + 2 * c + 1]);
        }
        for (int t = 0; t < T; ++t) {
          const simd::i32x16 v = simd::loadu_si512(blk[t] + 64 * c);
          const simd::i32x16 lo = simd::and_si512(v, low4);
          const simd::i32x16 hi = simd::and_si512(simd::srli_epi16(v, 4), low4);
          for (int r = 0; r < R; ++r) {
            dot[t][r] = simd::block_add_nibbles(dot[t][r], lo, lo_x[r]);
            dot[t][r] = simd::block_add_nibbles(dot[t][r], hi, hi_x[r]);
          }
        }
      }
    } else {
      for (int g = 0; g < 8; ++g) {
        simd::i32x16 xv[R];
        for (int r = 0; r < R; ++r) xv[r] = simd::set1_epi32(x4[r][8 * b + g]);
        for (int t = 0; t < T; ++t) {
          const simd::i32x16 v = simd::loadu_si512(blk[t] + 64 * g);
          for (int r = 0; r < R; ++r) dot[t][r] = simd::block_add(dot[t][r], v, xv[r]);
        }
      }
    }
    for (int t = 0; t < T; ++t) {
      const uint8_t* scales = blk[t] + codes_bytes(BITS);
      const simd::f32x16 s = load_scales<HALF>(scales);
      if constexpr (SYM) {  // isum holds -zero_point * sx * sum(xq): y += s * (sx * dot + that)
        for (int r = 0; r < R; ++r) {
          const simd::f32x16 u = simd::fmadd_ps(simd::cvtepi32_ps(simd::block_sum_of<BITS == 8>(dot[t][r])),
                                           simd::set1_ps(sx[r][b]), simd::set1_ps(isum[r][b]));
          acc[t][r] = simd::fmadd_ps(s, u, acc[t][r]);
        }
      } else {
        const simd::f32x16 m = load_scales<HALF>(scales + kTile * (HALF ? 2 : 4));
        for (int r = 0; r < R; ++r) {
          simd::f32x16 u = simd::mul_ps(s, simd::cvtepi32_ps(simd::block_sum_of<BITS == 8>(dot[t][r])));
          u = simd::fmadd_ps(m, simd::set1_ps(isum[r][b]), u);
          acc[t][r] = simd::fmadd_ps(u, simd::set1_ps(sx[r][b]), acc[t][r]);
        }
      }
    }
  }
}

// Output item `item` for rows [row0, row0 + R), one tile at a time (a decode step's single row:
// one weight stream at a time measured fastest): one tile, or a (gate, up) pair.
template <int R, int BITS, bool HALF, bool SYM>
void tile_out(const Work& w, int64_t item, int64_t row0) {
  simd::f32x16 acc[1][R], up[1][R];
  if (w.epilogue == kSiluMul) {
    tiles_rows<R, 1, BITS, HALF, SYM>(w, 2 * item, row0, acc);
    tiles_rows<R, 1, BITS, HALF, SYM>(w, 2 * item + 1, row0, up);
    finish<R>(w.epilogue, tile_bias(w.bias, 2 * item), tile_bias(w.bias, 2 * item + 1), acc[0],
              up[0]);
  } else {
    tiles_rows<R, 1, BITS, HALF, SYM>(w, item, row0, acc);
    finish<R>(w.epilogue, tile_bias(w.bias, item), nullptr, acc[0], up[0]);
  }
  store_rows(w.out, row0, item * kTile, R, acc[0]);
}

// Output item `item` for rows [row0, row0 + R) of many rows, tiles 2 * item and 2 * item + 1 in
// one pass: the (gate, up) pair, or two output tiles (the last item may hold one). A 4-row pass
// over 2 tiles loads 6 registers per 8 products where an 8-row pass over one loads 9 per 8. One
// thread, K 384, N 1536, 512 rows: 8-bit 140 -> 162 GMAC/s, 4-bit 136 -> 162.
template <int R, int BITS, bool HALF, bool SYM>
void pair_out(const Work& w, int64_t item, int64_t row0) {
  const int64_t tile0 = 2 * item;
  simd::f32x16 acc[2][R];
  if (tile0 + 1 >= w.tiles) {  // an odd last tile (the SiLU epilogue's tiles come in pairs)
    tiles_rows<R, 1, BITS, HALF, SYM>(w, tile0, row0, acc);
    finish<R>(w.epilogue, tile_bias(w.bias, tile0), nullptr, acc[0], acc[0]);
    store_rows(w.out, row0, tile0 * kTile, R, acc[0]);
    return;
  }
  tiles_rows<R, 2, BITS, HALF, SYM>(w, tile0, row0, acc);
  if (w.epilogue == kSiluMul) {
    finish<R>(w.epilogue, tile_bias(w.bias, tile0), tile_bias(w.bias, tile0 + 1), acc[0],
              acc[1]);
    store_rows(w.out, row0, item * kTile, R, acc[0]);
    return;
  }
  for (int t = 0; t < 2; ++t) {
    finish<R>(w.epilogue, tile_bias(w.bias, tile0 + t), nullptr, acc[t], acc[t]);
    store_rows(w.out, row0, (tile0 + t) * kTile, R, acc[t]);
  }
}

template <int R, typename Pass>
void last_pass(int64_t left, int64_t row, Pass& pass) {
  if constexpr (R > 0) {
    if (left == R)
      pass(std::integral_constant<int, R>{}, row);
    else
      last_pass<R - 1>(left, row, pass);
  }
}

// pass(std::integral_constant<int, R>, row) over rows [first, first + rows) in passes of up to
// MAX rows
template <int MAX, typename Pass>
void by_passes(int64_t first, int64_t rows, Pass&& pass) {
  const int64_t end = first + rows;
  int64_t row = first;
  for (; row + MAX <= end; row += MAX) pass(std::integral_constant<int, MAX>{}, row);
  last_pass<MAX - 1>(end - row, row, pass);
}

constexpr int kPairRows = 4;  // rows per pass over a pair of tiles (2 x 4 x 2 registers held)

template <bool PAIRS, int BITS, bool HALF, bool SYM>
void item_rows(const Work& w, int64_t item, int64_t row0, int64_t rows) {
  if constexpr (PAIRS)
    by_passes<kPairRows>(row0, rows, [&](auto r, int64_t row) {
      pair_out<decltype(r)::value, BITS, HALF, SYM>(w, item, row);
    });
  else
    by_passes<kMaxRows>(row0, rows, [&](auto r, int64_t row) {
      tile_out<decltype(r)::value, BITS, HALF, SYM>(w, item, row);
    });
}

template <bool PAIRS, int BITS, bool HALF>
void item_sym(const Work& w, int64_t item, int64_t row0, int64_t rows) {
  w.zero_point ? item_rows<PAIRS, BITS, HALF, true>(w, item, row0, rows)
               : item_rows<PAIRS, BITS, HALF, false>(w, item, row0, rows);
}

// output item `item` of rows [row0, row0 + rows): a tile (or SiLU pair) on its own, or with
// PAIRS a pair of tiles
template <bool PAIRS>
void item_q(const Work& w, int64_t item, int64_t row0, int64_t rows) {
  if (w.bits == 4)
    w.scale_bits == 16 ? item_sym<PAIRS, 4, true>(w, item, row0, rows)
                       : item_sym<PAIRS, 4, false>(w, item, row0, rows);
  else
    w.scale_bits == 16 ? item_sym<PAIRS, 8, true>(w, item, row0, rows)
                       : item_sym<PAIRS, 8, false>(w, item, row0, rows);
}

// MatMulQ's work items: up to 8 rows (decode steps, whose weights stream from memory once) a tile
// (or SiLU pair) at a time; more rows (prompts, encoder batches, whose passes reread the weights
// from cache) a pair of tiles at a time. SmolLM2 on 2 threads, 9-11 interleaved rounds: a
// 108-token int8 prompt 68.5 -> 59.8 ms; pairs for 8 decode rows were 0.85-0.93x, so not there.
struct ItemsQ {
  void (*item)(const Work&, int64_t, int64_t, int64_t);
  int64_t count;
};

inline ItemsQ items_q(int64_t rows, int64_t tiles, int epilogue) {
  if (rows > kMaxRows) return {item_q<true>, (tiles + 1) / 2};
  return {item_q<false>, epilogue == kSiluMul ? tiles / 2 : tiles};
}

// A product's work for one thread: a contiguous run ("span") of its output items (a tile, or a
// pair of tiles), taken over the rows a chunk of kRowChunk at a time, so that a chunk's
// activations and the span's weights stay in cache while every item of the span reads them (a
// prompt or an encoder batch has thousands of rows: item by item over all of them, each item
// streamed every activation from memory again). A row's result is the same whatever chunk or
// span it falls in.
constexpr int64_t kRowChunk = 64;

template <typename W>
struct Spans {
  const W* work;
  void (*item)(const W&, int64_t item, int64_t row0, int64_t rows);
  int64_t items, spans;
};

template <typename W>
void run_span(void* data, size_t span) {
  const Spans<W>& s = *static_cast<const Spans<W>*>(data);
  const auto i = static_cast<int64_t>(span);
  const int64_t first = i * s.items / s.spans, last = (i + 1) * s.items / s.spans;
  for (int64_t row0 = 0; row0 < s.work->rows; row0 += kRowChunk) {
    const int64_t rows = std::min(kRowChunk, s.work->rows - row0);
    for (int64_t item = first; item < last; ++item) s.item(*s.work, item, row0, rows);
  }
}


// x rounded to int8 per block of 32 (scale max|x| / 127, nearest even), with each block's scale
// and code sum; for symmetric blocks (zero_point != 0) the block's whole offset term instead,
// -zero_point * scale * sum, so that the product adds it with the dot product in one FMA.
void quantize_rows(const float* x, int64_t rows, int64_t k, int8_t* xq, float* sx, float* isum,
                   int zero_point) {
  const int64_t blocks = k / kBlock;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < blocks; ++b) {
      const float* src = x + r * k + b * kBlock;
      const simd::f32x16 a = simd::loadu_ps(src), c = simd::loadu_ps(src + 16);
      const float amax = simd::reduce_max_ps(simd::max_ps(simd::abs_ps(a), simd::abs_ps(c)));
      const float scale = amax / 127.0f;
      const simd::f32x16 inv = simd::set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
      const simd::i32x16 qa = simd::cvtps_epi32(simd::mul_ps(a, inv));
      const simd::i32x16 qc = simd::cvtps_epi32(simd::mul_ps(c, inv));
      int8_t* dst = xq + r * k + b * kBlock;
      simd::store_epi8(dst, qa);
      simd::store_epi8(dst + 16, qc);
      sx[r * blocks + b] = scale;
      const auto sum = static_cast<float>(simd::reduce_add_epi32(simd::add_epi32(qa, qc)));
      isum[r * blocks + b] = zero_point ? -static_cast<float>(zero_point) * scale * sum : sum;
    }
  }
}

// x [rows, K] rounded per block (quantize_rows), in `parts` runs of rows: one per intra-op thread
// for a prompt or a batch (SmolLM2's 108-token prompt, all-MiniLM-L6-v2 at 32 x 128 tokens), so
// the other threads do not wait on one. The buffers are left uninitialized until then.
struct Rounded {
  const float* x;
  int64_t rows, k, parts;
  int zero_point;  // symmetric blocks' (MatMulQ's attribute): isum then holds its offset term
  std::unique_ptr<int8_t[]> xq;
  std::unique_ptr<float[]> sx, isum;

  Rounded(const float* x_, int64_t rows_, int64_t k_, int64_t threads, int zero_point_)
      : x(x_), rows(rows_), k(k_),
        parts(std::max<int64_t>(1, std::min(threads, (rows_ + kRowChunk - 1) / kRowChunk))),
        zero_point(zero_point_),
        xq(new int8_t[rows_ * k_]), sx(new float[rows_ * (k_ / kBlock)]),
        isum(new float[rows_ * (k_ / kBlock)]) {}

  static void part(void* data, size_t i) {
    const Rounded& r = *static_cast<const Rounded*>(data);
    const auto at = static_cast<int64_t>(i);
    const int64_t first = at * r.rows / r.parts, last = (at + 1) * r.rows / r.parts;
    const int64_t blocks = r.k / kBlock;
    quantize_rows(r.x + first * r.k, last - first, r.k, r.xq.get() + first * r.k,
                  r.sx.get() + first * blocks, r.isum.get() + first * blocks, r.zero_point);
  }
};

// What both products share: x [.., K] times packed weights into y [.., N] (N / 2 after the
// SiLU epilogue), plus a bias (a third input, [tiles * 16] in the weights' column order) where
// `bias` is 1, their output columns split into `threads` contiguous runs; with `parts` 2 or 3,
// y's columns go to that many outputs, N / parts each.
struct Product {
  Api api;
  int64_t k = 0, n = 0, activation = kNone, bias = 0, parts = 1;
  int64_t threads = 1;  // the session's intra-op threads: one contiguous run of tiles each

  struct Io {
    const float* x = nullptr;
    const void* w = nullptr;
    const float* bias = nullptr;
    Out out{};
    int64_t rows = 0, cols = 0;  // rows of x (all but its last axis), columns of y
  };

  // The attributes both take, and what is wrong with them (nullptr: nothing).
  Status read(const OrtKernelInfo* info, const char* op) {
    Status s = api.attribute(info, "K", &k);
    if (!s) s = api.attribute(info, "N", &n);
    if (!s) s = api.attribute(info, "threads", &threads);
    if (!s) s = api.attribute(info, "activation", &activation);
    if (!s) s = api.attribute(info, "bias", &bias);
    if (!s) s = api.attribute(info, "parts", &parts);
    if (!s && (k <= 0 || n <= 0 || activation < kNone || activation > kGelu ||
               (bias != 0 && bias != 1) || (activation == kSiluMul && n % (2 * kTile)) ||
               parts < 1 || parts > kMaxParts ||
               (parts > 1 && (activation != kNone || n % (parts * kTile)))))
      s = api.error(kInvalidArgument, op);
    return s;
  }

  // x and the weights (which must have the shape `weights`), and y allocated; io->rows 0: an
  // empty input, nothing to compute.
  Status open(OrtKernelContext* ctx, const int64_t (&weights)[3], const char* misshapen,
              Io* io) const {
    const OrtValue *x_value = nullptr, *w_value = nullptr;
    if (Status s = api.input(ctx, 0, &x_value)) return s;
    if (Status s = api.input(ctx, 1, &w_value)) return s;
    std::vector<int64_t> dims, wdims;
    if (Status s = api.shape(x_value, &dims)) return s;
    if (Status s = api.shape(w_value, &wdims)) return s;
    if (dims.empty() || dims.back() != k || wdims.size() != 3 || wdims[0] != weights[0] ||
        wdims[1] != weights[1] || wdims[2] != weights[2])
      return api.error(kInvalidArgument, misshapen);
    io->rows = 1;
    for (size_t i = 0; i + 1 < dims.size(); ++i) io->rows *= dims[i];
    io->cols = activation == kSiluMul ? n / 2 : n;
    io->out.width = io->cols / parts;
    std::vector<int64_t> out_dims(dims);
    out_dims.back() = io->out.width;
    for (int64_t part = 0; part < parts; ++part) {
      OrtValue* y_value = nullptr;
      if (Status s = api.output(ctx, static_cast<size_t>(part), out_dims.data(), out_dims.size(),
                                &y_value))
        return s;
      void* y = nullptr;
      if (io->rows)
        if (Status s = api.data(y_value, &y)) return s;
      io->out.y[part] = static_cast<float*>(y);
    }
    if (io->rows == 0) return nullptr;
    void *x = nullptr, *w = nullptr, *b = nullptr;
    if (bias) {
      const OrtValue* b_value = nullptr;
      std::vector<int64_t> bdims;
      if (Status s = api.input(ctx, 2, &b_value)) return s;
      if (!b_value) return api.error(kInvalidArgument, misshapen);
      if (Status s = api.shape(b_value, &bdims)) return s;
      if (bdims.size() != 1 || bdims[0] != weights[0] * kTile)
        return api.error(kInvalidArgument, misshapen);
      if (Status s = api.data(b_value, &b)) return s;
    }
    if (Status s = api.data(x_value, &x)) return s;
    if (Status s = api.data(w_value, &w)) return s;
    io->x = static_cast<const float*>(x);
    io->w = w;
    io->bias = static_cast<const float*>(b);
    return nullptr;
  }

  // `items` output items of `work`, one span of them per intra-op thread (run_span)
  template <typename W>
  Status run(OrtKernelContext* ctx, void (*item)(const W&, int64_t, int64_t, int64_t),
             int64_t items, const W& work) const {
    const int64_t spans = std::min<int64_t>(std::max<int64_t>(threads, 1), items);
    Spans<W> s{&work, item, items, spans};
    return api.parallel_for(ctx, run_span<W>, static_cast<size_t>(spans),
                            static_cast<size_t>(spans), &s);
  }
};

struct Kernel : Product {
  int64_t bits = 0, scale_bits = 0, zero_point = 0;

  Status init(const OrtKernelInfo* info) {
    constexpr const char* kWrong =
        "MatMulQ: K must be a multiple of 32, bits 4 or 8, scale_bits 16 or 32, zero_point a "
        "code, activation 0, 1 (then N a multiple of 32) or 2, bias 0 or 1";
    Status s = read(info, kWrong);
    if (!s) s = api.attribute(info, "bits", &bits);
    if (!s) s = api.attribute(info, "scale_bits", &scale_bits);
    if (!s) s = api.attribute(info, "zero_point", &zero_point);
    if (!s && (k % kBlock || (bits != 4 && bits != 8) || zero_point < 0 ||
               zero_point >= (int64_t{1} << bits) || (scale_bits != 16 && scale_bits != 32)))
      s = api.error(kInvalidArgument, kWrong);
    return s;
  }

  Status compute(OrtKernelContext* ctx) const {
    const int64_t blocks = k / kBlock, tiles = (n + kTile - 1) / kTile;
    const int64_t weights[3] = {tiles, blocks,
                                stride_bytes(static_cast<int>(bits), static_cast<int>(scale_bits),
                                             zero_point != 0)};
    Io io;
    if (Status s = open(ctx, weights,
                        "MatMulQ: the input's last dimension is not K, the weights are not "
                        "[N/16, K/32, stride], or the bias is not [N/16 * 16]",
                        &io))
      return s;
    if (io.rows == 0) return nullptr;
    Rounded x(io.x, io.rows, k, threads, static_cast<int>(zero_point));
    if (x.parts == 1)
      Rounded::part(&x, 0);
    else if (Status s = api.parallel_for(ctx, Rounded::part, static_cast<size_t>(x.parts),
                                         static_cast<size_t>(x.parts), &x))
      return s;
    const int epilogue = static_cast<int>(activation);
    Work work{static_cast<const uint8_t*>(io.w), x.xq.get(), x.sx.get(), x.isum.get(), io.out,
              io.rows, k, blocks, tiles, static_cast<int>(bits),
              static_cast<int>(scale_bits), epilogue, static_cast<int>(zero_point), io.bias};
    const ItemsQ items = items_q(io.rows, tiles, epilogue);
    return run(ctx, items.item, items.count, work);
  }
};

// ---- MatMulF: float32 weights in tiles of 16 columns, [tiles, K, 16] ----
//
// y[r, n] = sum_k x[r, k] * w[k, n], two tiles (32 columns) at a time, the weights streamed once
// per pass of up to 8 rows: per k, 2 weight loads and 8 broadcasts feed 16 FMAs. Each row is
// summed in k order into one accumulator per tile whatever the rows beside it, so a row's result
// does not depend on its batch.

struct WorkF {
  const float* weights;  // [tiles, K, 16]
  const float* x;        // [rows, K]
  Out out;               // [rows, N] (N / 2 with the SiLU epilogue), or its parts
  int64_t rows, k, tiles;
  int epilogue;               // kNone, kGelu, or kSiluMul: each pair of tiles is (gate, up)
  const float* bias;          // [tiles * 16], or nullptr
};

// MatMulF prefetches each tile's weights into L2 (not L1) this many k (64-byte lines) ahead: 32
// for a pass of 1-3 rows, 64 for more. SmolLM2 fused decode step on 2 threads, 15 interleaved
// rounds against L1 prefetch 64 ahead (the former setting): batch 1 16.5 -> 14.3 ms (13/15
// rounds faster), batch 4 19.3 -> 17.7 (10/15), batch 8 23.3 -> 20.0 (14/15); a 108-token
// prompt 137.8 -> 133.2 ms (7/9). Into L1 the prefetches compete with the loads they serve.
template <int R>
constexpr int64_t prefetch_rows_f() { return R >= 4 ? 64 : 32; }

template <int R, int T>
void tile_rows_f(const WorkF& w, int64_t tile0, int64_t row0) {
  const float* base[T];
  for (int t = 0; t < T; ++t) base[t] = w.weights + (tile0 + t) * w.k * kTile;
  const float* x[R];
  for (int r = 0; r < R; ++r) x[r] = w.x + (row0 + r) * w.k;
  simd::f32x16 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = simd::setzero_ps();
  for (int64_t k = 0; k < w.k; ++k) {
    simd::f32x16 v[T];
    for (int t = 0; t < T; ++t) {
      simd::prefetch_l2(base[t] + (k + prefetch_rows_f<R>()) * kTile);
      v[t] = simd::loadu_ps(base[t] + k * kTile);
    }
    for (int r = 0; r < R; ++r) {
      const simd::f32x16 xv = simd::set1_ps(x[r][k]);
      for (int t = 0; t < T; ++t) acc[r][t] = simd::fmadd_ps(xv, v[t], acc[r][t]);
    }
  }
  simd::f32x16 out[R], up[R];
  if constexpr (T == 2) {
    if (w.epilogue == kSiluMul) {
      for (int r = 0; r < R; ++r) out[r] = acc[r][0], up[r] = acc[r][1];
      finish<R>(w.epilogue, tile_bias(w.bias, tile0), tile_bias(w.bias, tile0 + 1), out, up);
      store_rows(w.out, row0, tile0 / 2 * kTile, R, out);
      return;
    }
  }
  for (int t = 0; t < T; ++t) {
    for (int r = 0; r < R; ++r) out[r] = acc[r][t];
    finish<R>(w.epilogue, tile_bias(w.bias, tile0 + t), nullptr, out, up);
    store_rows(w.out, row0, (tile0 + t) * kTile, R, out);
  }
}

template <int T>
void tiles_f(const WorkF& w, int64_t tile0, int64_t row0, int64_t rows) {
  constexpr int kRows = T == 1 && simd::kFloatTileRows ? simd::kFloatTileRows : simd::kFloatRows;
  by_passes<kRows>(row0, rows, [&](auto r, int64_t row) {
    tile_rows_f<decltype(r)::value, T>(w, tile0, row);
  });
}

// item i: tiles 2i and 2i + 1 (the last item may hold one) of rows [row0, row0 + rows); on AVX2
// a prompt's (more than 8 rows) one tile after the other, in passes of more rows. A row's
// result is the same either way: one accumulator per tile, summed in k order.
void pair_f(const WorkF& w, int64_t i, int64_t row0, int64_t rows) {
  const int64_t tile0 = 2 * i;
  if constexpr (simd::kFloatTileRows > 0) {
    if (tile0 + 1 < w.tiles && w.epilogue != kSiluMul && rows > kMaxRows) {
      tiles_f<1>(w, tile0, row0, rows);
      tiles_f<1>(w, tile0 + 1, row0, rows);
      return;
    }
  }
  if (tile0 + 1 < w.tiles)
    tiles_f<2>(w, tile0, row0, rows);
  else
    tiles_f<1>(w, tile0, row0, rows);
}

size_t pairs(int64_t tiles) { return static_cast<size_t>((tiles + 1) / 2); }

struct KernelF : Product {
  Status init(const OrtKernelInfo* info) {
    return read(info, "MatMulF: K and N must be positive, activation 0, 1 (then N a multiple "
                      "of 32) or 2, bias 0 or 1");
  }

  Status compute(OrtKernelContext* ctx) const {
    const int64_t tiles = (n + kTile - 1) / kTile;
    Io io;
    if (Status s = open(ctx, {tiles, k, kTile},
                        "MatMulF: the input's last dimension is not K, the weights are not "
                        "[N/16, K, 16], or the bias is not [N/16 * 16]",
                        &io))
      return s;
    if (io.rows == 0) return nullptr;
    WorkF work{static_cast<const float*>(io.w), io.x, io.out, io.rows, k, tiles,
               static_cast<int>(activation), io.bias};
    return run(ctx, pair_f, static_cast<int64_t>(pairs(tiles)), work);
  }
};

// ---- GroupAttention: GroupQueryAttention over a cache written in place ----
//
// The attention of a decoder graph's GroupQueryAttention nodes (com.microsoft) as llmopt's
// exporter writes them: no sliding window, softcap or quantized cache, the cache [B, kv_heads,
// capacity, head_dim] bound as both past and present (or a past of its own, copied), seqlens_k
// each row's last position, and an additive attention bias [B or 1, 1 or heads, S, T] that
// masks padding. The query, key and value come separate and rotated, or packed in one input
// with the rotary's cos and sin tables [B, S, rotary_dim / 2] (the Split and RotaryEmbedding
// nodes before the attention taken in: `rotate`). A decode step is 9 heads of one query over
// about a hundred positions: ONNX Runtime's kernel spends most of its 56 us per call around
// that arithmetic (a GEMM call per head, a probabilities buffer, its thread pool). Here each
// (row, head) is one work item: dot products of the query with each cached key, the bias, a
// softmax and the weighted sum of values, in registers and one scores buffer per thread.

struct AttentionWork {
  const float* q;       // [B, S, heads * dim] (rows q_stride apart)
  const float* k;       // [B, S, kv_heads * dim]: this step's keys (rows kv_stride apart)
  const float* v;
  float* keys;          // [B, kv_heads, capacity, dim]: the cache, this step's keys included
  float* values;
  const int32_t* seqlens;  // [B]: each row's last position
  const float* bias;       // [bias_b, bias_h, S, total], or nullptr
  float* out;              // [B, S, heads * dim]
  int64_t batch, seq, heads, kv_heads, dim, capacity, total, bias_b, bias_h;
  int64_t q_stride, kv_stride;  // floats from one (row, position) to the next
  bool first_prompt;  // S equals the mask's width: every row starts at position 0
  float scale;

  // where row b's new positions start in its cache
  int64_t past(int64_t b) const { return first_prompt ? 0 : seqlens[b] + 1 - seq; }
};

inline simd::mask16 tail_mask(int64_t left) {
  return static_cast<simd::mask16>(left >= 16 ? 0xFFFF : (1u << left) - 1u);
}

inline float dot(const float* a, const float* b, int64_t n) {
  simd::f32x16 acc = simd::setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const simd::mask16 m = tail_mask(n - i);
    acc = simd::fmadd_ps(simd::maskz_loadu_ps(m, a + i), simd::maskz_loadu_ps(m, b + i), acc);
  }
  return simd::reduce_add_ps(acc);
}

// y[:n] += p * x[:n]
inline void add_scaled(float p, const float* x, float* y, int64_t n) {
  const simd::f32x16 pv = simd::set1_ps(p);
  for (int64_t i = 0; i < n; i += 16) {
    const simd::mask16 m = tail_mask(n - i);
    simd::mask_storeu_ps(y + i, m, simd::fmadd_ps(pv, simd::maskz_loadu_ps(m, x + i),
                                                    simd::maskz_loadu_ps(m, y + i)));
  }
}

// where (row b, head h)'s cache and attention bias rows start
struct HeadView {
  const float* keys;
  const float* values;
  const float* bias;  // row s of the bias is bias + s * total, or nullptr
  int64_t past, length;
};

inline HeadView head_view(const AttentionWork& w, int64_t b, int64_t h) {
  const int64_t group = h / (w.heads / w.kv_heads);
  const int64_t cache = (b * w.kv_heads + group) * w.capacity * w.dim;
  const float* bias =
      w.bias ? w.bias + ((w.bias_b == 1 ? 0 : b) * w.bias_h + (w.bias_h == 1 ? 0 : h)) * w.seq *
                            w.total
             : nullptr;
  return {w.keys + cache, w.values + cache, bias, w.past(b), int64_t{w.seqlens[b]} + 1};
}

// Whether a query sees no position: every score at the bias's lowest float (a padded query
// of a left-padded prompt). Its output is zeros, as ONNX Runtime's GroupQueryAttention gives.
inline bool masked(float top) { return !(top > std::numeric_limits<float>::lowest()); }

// scores[:n] = exp(scores - max) and 1 / their sum
inline float softmax_in_place(float* scores, int64_t n, float top) {
  simd::f32x16 sum = simd::setzero_ps();
  const simd::f32x16 top_v = simd::set1_ps(top);
  for (int64_t t = 0; t < n; t += 16) {
    const simd::mask16 m = tail_mask(n - t);
    const simd::f32x16 e = exp_ps(simd::sub_ps(simd::maskz_loadu_ps(m, scores + t), top_v));
    simd::mask_storeu_ps(scores + t, m, e);
    sum = simd::add_ps(sum, simd::maskz_mov_ps(m, e));
  }
  return 1.0f / simd::reduce_add_ps(sum);
}

// One (row, head) with head_dim = 16 * C: the query and the output in registers, each key and
// value read once per query.
template <int C>
void attend_head(const AttentionWork& w, int64_t b, int64_t h, float* scores) {
  const HeadView v = head_view(w, b, h);
  const int64_t width = w.heads * w.dim;
  for (int64_t s = 0; s < w.seq; ++s) {
    const float* q = w.q + (b * w.seq + s) * w.q_stride + h * w.dim;
    const int64_t n = std::min(v.past + s + 1, v.length);  // causal, within the row
    const float* bias = v.bias ? v.bias + s * w.total : nullptr;
    simd::f32x16 qv[C];
    for (int c = 0; c < C; ++c) qv[c] = simd::loadu_ps(q + 16 * c);
    float top = -INFINITY;
    for (int64_t t = 0; t < n; ++t) {
      const float* k = v.keys + t * w.dim;
      simd::f32x16 a = simd::mul_ps(qv[0], simd::loadu_ps(k));
      for (int c = 1; c < C; ++c) a = simd::fmadd_ps(qv[c], simd::loadu_ps(k + 16 * c), a);
      float x = simd::reduce_add_ps(a) * w.scale;
      if (bias) x += bias[t];
      scores[t] = x;
      top = std::max(top, x);
    }
    float* out = w.out + (b * w.seq + s) * width + h * w.dim;
    if (masked(top)) {
      for (int c = 0; c < C; ++c) simd::storeu_ps(out + 16 * c, simd::setzero_ps());
      continue;
    }
    const float inv = softmax_in_place(scores, n, top);
    simd::f32x16 acc[C];
    for (int c = 0; c < C; ++c) acc[c] = simd::setzero_ps();
    for (int64_t t = 0; t < n; ++t) {
      const simd::f32x16 p = simd::set1_ps(scores[t]);
      const float* value = v.values + t * w.dim;
      for (int c = 0; c < C; ++c)
        acc[c] = simd::fmadd_ps(p, simd::loadu_ps(value + 16 * c), acc[c]);
    }
    const simd::f32x16 inv_v = simd::set1_ps(inv);
    for (int c = 0; c < C; ++c) simd::storeu_ps(out + 16 * c, simd::mul_ps(acc[c], inv_v));
  }
}

// Any other head_dim: the same steps through memory, masked at the tail.
void attend_any(const AttentionWork& w, int64_t b, int64_t h, float* scores) {
  const HeadView v = head_view(w, b, h);
  const int64_t width = w.heads * w.dim;
  for (int64_t s = 0; s < w.seq; ++s) {
    const float* q = w.q + (b * w.seq + s) * w.q_stride + h * w.dim;
    float* out = w.out + (b * w.seq + s) * width + h * w.dim;
    const int64_t n = std::min(v.past + s + 1, v.length);
    const float* bias = v.bias ? v.bias + s * w.total : nullptr;
    float top = -INFINITY;
    for (int64_t t = 0; t < n; ++t) {
      float x = dot(q, v.keys + t * w.dim, w.dim) * w.scale;
      if (bias) x += bias[t];
      scores[t] = x;
      top = std::max(top, x);
    }
    for (int64_t d = 0; d < w.dim; d += 16)
      simd::mask_storeu_ps(out + d, tail_mask(w.dim - d), simd::setzero_ps());
    if (masked(top)) continue;
    const float inv = softmax_in_place(scores, n, top);
    for (int64_t t = 0; t < n; ++t) add_scaled(scores[t] * inv, v.values + t * w.dim, out, w.dim);
  }
}

// y[:dim] = x[:dim] with its first `rot` channels rotated by the angles whose cosines and
// sines are c[:rot / 2] and s[:rot / 2], as ONNX's RotaryEmbedding rotates them: the two halves
// of the channels paired (a = x[i], b = x[i + rot / 2]), or with `interleaved` neighbours
// (x[2i], x[2i + 1]); channels past `rot` copied. Each pair is rounded as ONNX Runtime's CPU
// kernel rounds it, a * c - (b * s) and a * s + (b * c) with one fused multiply-add each, so
// that the rotated keys and queries are its own to the bit.
inline void rotate_pair(float a, float b, float c, float s, float* ya, float* yb) {
  *ya = std::fma(a, c, -(b * s));
  *yb = std::fma(a, s, b * c);
}

void rotate(const float* x, const float* c, const float* s, float* y, int64_t dim, int64_t rot,
            bool interleaved) {
  const int64_t half = rot / 2;
  if (interleaved) {
    for (int64_t i = 0; i < half; ++i)
      rotate_pair(x[2 * i], x[2 * i + 1], c[i], s[i], y + 2 * i, y + 2 * i + 1);
  } else {
    int64_t i = 0;
    for (; i + 16 <= half; i += 16) {
      const simd::f32x16 a = simd::loadu_ps(x + i), b = simd::loadu_ps(x + half + i);
      const simd::f32x16 cv = simd::loadu_ps(c + i), sv = simd::loadu_ps(s + i);
      simd::storeu_ps(y + i, simd::fmsub_ps(a, cv, simd::mul_ps(b, sv)));
      simd::storeu_ps(y + half + i, simd::fmadd_ps(a, sv, simd::mul_ps(b, cv)));
    }
    for (; i < half; ++i) rotate_pair(x[i], x[half + i], c[i], s[i], y + i, y + half + i);
  }
  std::copy(x + rot, x + dim, y + rot);
}

// one (row, head): its S queries against the row's cached positions
void attend(const AttentionWork& w, int64_t item, std::vector<float>& scores) {
  const int64_t b = item / w.heads, h = item % w.heads;
  scores.resize(static_cast<size_t>(std::max<int64_t>(int64_t{w.seqlens[b]} + 1, 1)));
  float* buffer = scores.data();
  switch (w.dim % 16 ? 0 : w.dim / 16) {
    case 1: return attend_head<1>(w, b, h, buffer);
    case 2: return attend_head<2>(w, b, h, buffer);
    case 3: return attend_head<3>(w, b, h, buffer);
    case 4: return attend_head<4>(w, b, h, buffer);
    case 5: return attend_head<5>(w, b, h, buffer);
    case 6: return attend_head<6>(w, b, h, buffer);
    case 7: return attend_head<7>(w, b, h, buffer);
    case 8: return attend_head<8>(w, b, h, buffer);
    default: return attend_any(w, b, h, buffer);
  }
}

void attend_items(void* data, size_t i) {
  thread_local std::vector<float> scores;
  attend(*static_cast<const AttentionWork*>(data), static_cast<int64_t>(i), scores);
}

// Below this many multiply-adds a call runs on the calling thread: a decode step's attention
// (9 heads x 120 positions x 64) is shorter than handing it to the thread pool.
constexpr int64_t kParallelAttention = int64_t{1} << 18;

struct AttentionKernel {
  Api api;
  int64_t heads = 0, kv_heads = 0, threads = 1;
  int64_t rotary_dim = 0, interleaved = 0;  // rotary_dim 0: the query and key come rotated
  float scale = 0.0f;

  Status init(const OrtKernelInfo* info) {
    Status s = api.attribute(info, "num_heads", &heads);
    if (!s) s = api.attribute(info, "kv_num_heads", &kv_heads);
    if (!s) s = api.attribute(info, "threads", &threads);
    if (!s) s = api.attribute(info, "scale", &scale);
    if (!s) s = api.attribute(info, "rotary_dim", &rotary_dim);
    if (!s) s = api.attribute(info, "interleaved", &interleaved);
    if (!s && (heads <= 0 || kv_heads <= 0 || heads % kv_heads))
      s = api.error(kInvalidArgument, "GroupAttention: num_heads must be a multiple of "
                                      "kv_num_heads");
    if (!s && (rotary_dim < 0 || rotary_dim % 2 || (interleaved != 0 && interleaved != 1)))
      s = api.error(kInvalidArgument, "GroupAttention: rotary_dim must be even and "
                                      "interleaved 0 or 1");
    return s;
  }

  Status compute(OrtKernelContext* ctx) const {
    constexpr const char* kMisshapen =
        "GroupAttention: query [B, S, heads * dim], key and value [B, S, kv_heads * dim] (or "
        "none, with query, key and value packed in the first input), past [B, kv_heads, "
        "capacity, dim], seqlens_k [B] and a scalar total length expected";
    const OrtValue* in[10] = {};  // q, k, v, past k, past v, seqlens, total, bias, cos, sin
    for (size_t i = 0; i < 10; ++i)
      if (Status s = api.input(ctx, i, &in[i])) return s;
    const bool packed = !in[1] && !in[2];
    std::vector<int64_t> qd, kd, vd, pkd, pvd, sd, td, bd;
    for (auto [value, dims] : {std::pair{in[0], &qd}, {in[1], &kd}, {in[2], &vd}, {in[3], &pkd},
                               {in[4], &pvd}, {in[5], &sd}, {in[6], &td}})
      if (!value && !(packed && (dims == &kd || dims == &vd)))
        return api.error(kInvalidArgument, kMisshapen);
      else if (value)
        if (Status s = api.shape(value, dims)) return s;
    const int64_t row_heads = packed ? heads + 2 * kv_heads : heads;  // heads in a query row
    if (qd.size() != 3 || qd[2] % row_heads || kd != vd || (!packed && kd.size() != 3) ||
        pkd != pvd || pkd.size() != 4 || sd.size() != 1 || td.size() > 1)
      return api.error(kInvalidArgument, kMisshapen);
    const int64_t batch = qd[0], seq = qd[1], dim = qd[2] / row_heads;
    if ((!packed && (kd[0] != batch || kd[1] != seq || kd[2] != kv_heads * dim)) ||
        pkd[0] != batch || pkd[1] != kv_heads || pkd[3] != dim || sd[0] != batch)
      return api.error(kInvalidArgument, kMisshapen);
    if (rotary_dim > dim)
      return api.error(kInvalidArgument, "GroupAttention: rotary_dim exceeds the head size");
    std::vector<int64_t> cd, snd;
    if (rotary_dim) {
      for (auto [value, dims] : {std::pair{in[8], &cd}, {in[9], &snd}})
        if (!value) return api.error(kInvalidArgument, "GroupAttention: rotary_dim needs the "
                                                       "cos and sin inputs");
        else if (Status s = api.shape(value, dims)) return s;
      if (cd != snd || cd.size() != 3 || cd[0] != batch || cd[1] != seq ||
          cd[2] != rotary_dim / 2)
        return api.error(kInvalidArgument, "GroupAttention: cos and sin [B, S, rotary_dim / "
                                           "2] expected");
    }
    void* raw[10] = {};
    for (size_t i = 0; i < 10; ++i)
      if (in[i])
        if (Status s = api.data(in[i], &raw[i])) return s;
    const OrtValue* bias_value = in[7];
    const auto* seqlens = static_cast<const int32_t*>(raw[5]);
    const int64_t total = *static_cast<const int32_t*>(raw[6]);
    const int64_t past_capacity = pkd[2], capacity = std::max(past_capacity, total);
    for (int64_t b = 0; b < batch; ++b)
      if (seqlens[b] < 0 || seqlens[b] >= capacity || (seq != total && seqlens[b] + 1 < seq))
        return api.error(kInvalidArgument, "GroupAttention: seqlens_k out of range");
    const float* bias = nullptr;
    int64_t bias_b = 1, bias_h = 1;
    if (bias_value) {
      if (Status s = api.shape(bias_value, &bd)) return s;
      if (bd.size() != 4 || (bd[0] != 1 && bd[0] != batch) || (bd[1] != 1 && bd[1] != heads) ||
          bd[2] != seq || bd[3] != total)
        return api.error(kInvalidArgument, "GroupAttention: attention bias not [B or 1, heads "
                                           "or 1, S, total]");
      void* p = nullptr;
      if (Status s = api.data(bias_value, &p)) return s;
      bias = static_cast<const float*>(p);
      bias_b = bd[0], bias_h = bd[1];
    }
    const int64_t out_dims[3] = {batch, seq, heads * dim};
    const int64_t cache_dims[4] = {batch, kv_heads, capacity, dim};
    OrtValue *out = nullptr, *present_k = nullptr, *present_v = nullptr;
    if (Status s = api.output(ctx, 0, out_dims, 3, &out)) return s;
    if (Status s = api.output(ctx, 1, cache_dims, 4, &present_k)) return s;
    if (Status s = api.output(ctx, 2, cache_dims, 4, &present_v)) return s;
    void *o = nullptr, *pk = nullptr, *pv = nullptr;
    if (Status s = api.data(out, &o)) return s;
    if (Status s = api.data(present_k, &pk)) return s;
    if (Status s = api.data(present_v, &pv)) return s;
    const auto* q = static_cast<const float*>(raw[0]);
    const int64_t q_stride = row_heads * dim, kv_stride = packed ? q_stride : kv_heads * dim;
    AttentionWork w{q, packed ? q + heads * dim : static_cast<const float*>(raw[1]),
                    packed ? q + (heads + kv_heads) * dim : static_cast<const float*>(raw[2]),
                    static_cast<float*>(pk), static_cast<float*>(pv), seqlens, bias,
                    static_cast<float*>(o), batch, seq, heads, kv_heads, dim, capacity, total,
                    bias_b, bias_h, q_stride, kv_stride, seq == total,
                    scale != 0.0f ? scale : 1.0f / std::sqrt(static_cast<float>(dim))};
    // rotary: the queries rotated into a buffer of their own, the keys as they are cached
    const auto* cos = static_cast<const float*>(raw[8]);
    const auto* sin = static_cast<const float*>(raw[9]);
    const int64_t half = rotary_dim / 2;
    std::vector<float> rotated;  // per call: a long prompt's queries are not held after it
    if (rotary_dim) {
      rotated.resize(static_cast<size_t>(batch * seq * heads * dim));
      for (int64_t r = 0; r < batch * seq; ++r)
        for (int64_t h = 0; h < heads; ++h)
          rotate(q + r * q_stride + h * dim, cos + r * half, sin + r * half,
                 rotated.data() + (r * heads + h) * dim, dim, rotary_dim, interleaved);
      w.q = rotated.data();
      w.q_stride = heads * dim;
    }
    // the cache: a past of its own is copied first; then this step's keys and values
    const float* past_k = static_cast<const float*>(raw[3]);
    const float* past_v = static_cast<const float*>(raw[4]);
    const bool shared = past_k == w.keys && past_v == w.values;
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t g = 0; g < kv_heads; ++g) {
        const int64_t at = (b * kv_heads + g) * capacity * dim, past = w.past(b);
        if (!shared) {
          const int64_t from = (b * kv_heads + g) * past_capacity * dim;
          std::fill(w.keys + at, w.keys + at + capacity * dim, 0.0f);
          std::fill(w.values + at, w.values + at + capacity * dim, 0.0f);
          std::copy(past_k + from, past_k + from + past * dim, w.keys + at);
          std::copy(past_v + from, past_v + from + past * dim, w.values + at);
        }
        for (int64_t s = 0; s < seq; ++s) {
          const int64_t src = (b * seq + s) * kv_stride + g * dim;
          float* key = w.keys + at + (past + s) * dim;
          if (rotary_dim)
            rotate(w.k + src, cos + (b * seq + s) * half, sin + (b * seq + s) * half, key, dim,
                   rotary_dim, interleaved);
          else
            std::copy(w.k + src, w.k + src + dim, key);
          std::copy(w.v + src, w.v + src + dim, w.values + at + (past + s) * dim);
        }
      }
    const int64_t items = batch * heads;
    if (batch * heads * seq * total * dim < kParallelAttention || threads <= 1) {
      for (int64_t i = 0; i < items; ++i) attend_items(&w, static_cast<size_t>(i));
      return nullptr;
    }
    const auto batches = static_cast<size_t>(std::min(threads, items));
    return api.parallel_for(ctx, attend_items, static_cast<size_t>(items), batches, &w);
  }
};

// ---- the custom-op table ONNX Runtime reads (OrtCustomOp, version 17 fields) ----

struct OrtCustomOpAbi {
  uint32_t version;
  void* (*CreateKernel)(const OrtCustomOpAbi*, const OrtApi*, const OrtKernelInfo*);
  const char* (*GetName)(const OrtCustomOpAbi*);
  const char* (*GetExecutionProviderType)(const OrtCustomOpAbi*);
  int (*GetInputType)(const OrtCustomOpAbi*, size_t);
  size_t (*GetInputTypeCount)(const OrtCustomOpAbi*);
  int (*GetOutputType)(const OrtCustomOpAbi*, size_t);
  size_t (*GetOutputTypeCount)(const OrtCustomOpAbi*);
  void (*KernelCompute)(void*, OrtKernelContext*);
  void (*KernelDestroy)(void*);
  int (*GetInputCharacteristic)(const OrtCustomOpAbi*, size_t);
  int (*GetOutputCharacteristic)(const OrtCustomOpAbi*, size_t);
  int (*GetInputMemoryType)(const OrtCustomOpAbi*, size_t);
  int (*GetVariadicInputMinArity)(const OrtCustomOpAbi*);
  int (*GetVariadicInputHomogeneity)(const OrtCustomOpAbi*);
  int (*GetVariadicOutputMinArity)(const OrtCustomOpAbi*);
  int (*GetVariadicOutputHomogeneity)(const OrtCustomOpAbi*);
  Status (*CreateKernelV2)(const OrtCustomOpAbi*, const OrtApi*, const OrtKernelInfo*, void**);
  Status (*KernelComputeV2)(void*, OrtKernelContext*);
  Status (*InferOutputShapeFn)(const OrtCustomOpAbi*, void*);
  int (*GetStartVersion)(const OrtCustomOpAbi*);
  int (*GetEndVersion)(const OrtCustomOpAbi*);
};

// A kernel of type K with its attributes read and checked (K::init), or the error that says
// what is wrong with them.
template <typename K>
Status create(const OrtCustomOpAbi*, const OrtApi* api, const OrtKernelInfo* info, void** out) {
  auto kernel = std::make_unique<K>();
  kernel->api.api = api;
  if (Status s = kernel->init(info)) return s;
  *out = kernel.release();
  return nullptr;
}

template <Status (*Create)(const OrtCustomOpAbi*, const OrtApi*, const OrtKernelInfo*, void**)>
void* create_v1(const OrtCustomOpAbi* op, const OrtApi* api, const OrtKernelInfo* info) {
  void* kernel = nullptr;
  return Create(op, api, info, &kernel) ? nullptr : kernel;
}

template <typename K>
Status compute(void* kernel, OrtKernelContext* ctx) {
  return static_cast<const K*>(kernel)->compute(ctx);
}
template <typename K>
void compute_v1(void* kernel, OrtKernelContext* ctx) { (void)compute<K>(kernel, ctx); }
template <typename K>
void destroy(void* kernel) { delete static_cast<K*>(kernel); }

// an op of `inputs` inputs (input i optional where bit i of `optional` is set) and `outputs`
// float outputs (output i optional where bit i of `optional_outputs` is set)
template <typename K,
          Status (*Create)(const OrtCustomOpAbi*, const OrtApi*, const OrtKernelInfo*, void**),
          size_t inputs, uint32_t optional, size_t outputs, uint32_t optional_outputs = 0>
constexpr OrtCustomOpAbi op(const char* (*name)(const OrtCustomOpAbi*),
                            int (*input_type)(const OrtCustomOpAbi*, size_t)) {
  return {
      17,
      create_v1<Create>,
      name,
      [](const OrtCustomOpAbi*) { return "CPUExecutionProvider"; },
      input_type,
      [](const OrtCustomOpAbi*) { return inputs; },
      [](const OrtCustomOpAbi*, size_t) { return kFloat; },
      [](const OrtCustomOpAbi*) { return outputs; },
      compute_v1<K>,
      destroy<K>,
      [](const OrtCustomOpAbi*, size_t i) { return static_cast<int>(optional >> i & 1u); },
      [](const OrtCustomOpAbi*, size_t i) {
        return static_cast<int>(optional_outputs >> i & 1u);
      },
      [](const OrtCustomOpAbi*, size_t) { return 0; },  // OrtMemTypeDefault
      [](const OrtCustomOpAbi*) { return 1; },
      [](const OrtCustomOpAbi*) { return 1; },
      [](const OrtCustomOpAbi*) { return 1; },
      [](const OrtCustomOpAbi*) { return 1; },
      Create,
      compute<K>,
      nullptr,
      [](const OrtCustomOpAbi*) { return 1; },
      [](const OrtCustomOpAbi*) { return INT_MAX; },
  };
}

// x, weights, bias (optional); y, or its `parts` (the second and third optional)
const OrtCustomOpAbi kMatMulQ = op<Kernel, create<Kernel>, 3, 0b100, kMaxParts, 0b110>(
    [](const OrtCustomOpAbi*) { return "MatMulQ"; },
    [](const OrtCustomOpAbi*, size_t i) { return i == 1 ? kUint8 : kFloat; });
const OrtCustomOpAbi kMatMulF = op<KernelF, create<KernelF>, 3, 0b100, kMaxParts, 0b110>(
    [](const OrtCustomOpAbi*) { return "MatMulF"; },
    [](const OrtCustomOpAbi*, size_t) { return kFloat; });
// query (or query, key and value packed), key, value (both optional), past key, past value,
// seqlens_k, total length; attention bias, cos and sin (optional)
const OrtCustomOpAbi kGroupAttention = op<AttentionKernel, create<AttentionKernel>, 10,
                                          0b1110000110, 3>(
    [](const OrtCustomOpAbi*) { return "GroupAttention"; },
    [](const OrtCustomOpAbi*, size_t i) { return i == 5 || i == 6 ? kInt32 : kFloat; });

}  // namespace

extern "C" {

struct OrtApiBase {
  const OrtApi* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)();
};

// 1 when this CPU runs this build of the kernels (AVX-512 F/BW/VL with VNNI and F16C, or AVX2
// with FMA and F16C), else 0.
__attribute__((visibility("default"))) int llmopt_kernels_supported() {
  __builtin_cpu_init();
  return simd::supported();
}

// the instruction set this build is for: "avx512" or "avx2"
__attribute__((visibility("default"))) const char* llmopt_kernels_isa() { return simd::kIsa; }

// Reference entry for tests: y = MatMulQ(x) (+ bias unless nullptr) without ONNX Runtime (one
// thread).
__attribute__((visibility("default"))) int llmopt_matmul_q(const float* x, int64_t rows,
                                                           int64_t k, const uint8_t* weights,
                                                           int64_t n, int bits, int scale_bits,
                                                           int activation, int zero_point,
                                                           const float* bias, float* y) {
  if (k % kBlock || (bits != 4 && bits != 8) || (scale_bits != 16 && scale_bits != 32) ||
      activation < kNone || activation > kGelu || (activation == kSiluMul && n % (2 * kTile)))
    return kFail;
  const int64_t blocks = k / kBlock, tiles = (n + kTile - 1) / kTile;
  Rounded rounded(x, rows, k, 1, zero_point);
  Rounded::part(&rounded, 0);
  const Out out{{y}, activation == kSiluMul ? n / 2 : n};
  Work work{weights, rounded.xq.get(), rounded.sx.get(), rounded.isum.get(), out, rows, k,
            blocks, tiles, bits, scale_bits, activation, zero_point, bias};
  const ItemsQ items = items_q(rows, tiles, activation);
  Spans<Work> spans{&work, items.item, items.count, 1};
  run_span<Work>(&spans, 0);
  return 0;
}

// Reference entry for tests: y = MatMulF(x) (+ bias unless nullptr) without ONNX Runtime (one
// thread).
__attribute__((visibility("default"))) int llmopt_matmul_f(const float* x, int64_t rows,
                                                           int64_t k, const float* weights,
                                                           int64_t n, int activation,
                                                           const float* bias, float* y) {
  if (activation < kNone || activation > kGelu || (activation == kSiluMul && n % (2 * kTile)))
    return kFail;
  const int64_t tiles = (n + kTile - 1) / kTile;
  const Out out{{y}, activation == kSiluMul ? n / 2 : n};
  WorkF work{weights, x, out, rows, k, tiles, activation, bias};
  Spans<WorkF> spans{&work, pair_f, static_cast<int64_t>(pairs(tiles)), 1};
  run_span<WorkF>(&spans, 0);
  return 0;
}

__attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options,
                                                                     const OrtApiBase* base) {
  const OrtApi* api = base->GetApi(kApiVersion);
  if (!api) return nullptr;  // an ONNX Runtime older than 1.17: the op stays unknown
  OrtCustomOpDomain* domain = nullptr;
  if (Status s = entry<Status (*)(const char*, OrtCustomOpDomain**)>(api, kCreateCustomOpDomain)(
          "ai.llmopt", &domain))
    return s;
  if (Status s = entry<Status (*)(OrtCustomOpDomain*, const OrtCustomOpAbi*)>(
          api, kCustomOpDomainAdd)(domain, &kMatMulQ))
    return s;
  if (Status s = entry<Status (*)(OrtCustomOpDomain*, const OrtCustomOpAbi*)>(
          api, kCustomOpDomainAdd)(domain, &kMatMulF))
    return s;
  if (Status s = entry<Status (*)(OrtCustomOpDomain*, const OrtCustomOpAbi*)>(
          api, kCustomOpDomainAdd)(domain, &kGroupAttention))
    return s;
  return entry<Status (*)(OrtSessionOptions*, OrtCustomOpDomain*)>(api, kAddCustomOpDomain)(
      options, domain);
}

}  // extern "C"
