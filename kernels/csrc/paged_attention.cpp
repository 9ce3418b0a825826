// Paged attention for CPU: every query token reads its sequence's K/V straight from the paged
// cache through the block table, once, with an online (single-pass) softmax in fp32.
//
// Work: tokens are grouped by sequence, sorted by ctx (descending) and cut into tiles of up to
// `max_tile` tokens; a work item is (tile, context range). An item covers ALL heads of its tokens,
// so it streams each slot's whole [2, KVH, D] record (with the usual [S, 2, KVH, D] layout a block
// is one contiguous run), and a prefill tile reuses each K/V row for tile*G query vectors. When
// there are too few items for the threads (one long sequence), contexts are split
// (flash-decoding) and the partial (max, sum, acc) merged in a second pass. Rows are processed
// C = 16 at a time: scores for the chunk, one softmax update, then P.V; the next chunk's rows are
// prefetched while the math runs.
//
// Arithmetic: q is pre-scaled by scale*log2(e) so the softmax uses exp2; accumulation in fp32;
// bf16 K/V are widened into an L1 buffer per chunk. No -ffast-math: the AVX2 path uses explicit
// intrinsics (and a degree-7 exp2 polynomial, ~1e-7 relative error), the generic path plain
// loops, so results do not depend on compiler reassociation.
//
// Only light headers (no torch/extension.h, no pybind): the op is registered with the dispatcher
// (torch.ops.loramux_attn.paged_attention), which cuts the first-use compile from ~60 s to ~15 s.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LMX_AVX2 1
#endif

namespace {

using bf16 = c10::BFloat16;

// GCC 12 silently dropped __builtin_prefetch from the kernel loop below (seen in the assembly), so
// the x86 prefetch is an asm statement the optimizer must keep.
inline void prefetch_line(const void* p) {
#if defined(__x86_64__)
  asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 0, 3);
#endif
}
constexpr int C = 16;  // K/V rows per chunk: one softmax update per chunk (32 measured no faster)
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

#ifdef LMX_AVX2
struct V8 {
  __m256 r;
  static V8 zero() { return {_mm256_setzero_ps()}; }
  static V8 set1(float x) { return {_mm256_set1_ps(x)}; }
  static V8 load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static V8 load(const bf16* p) {  // bf16 -> fp32 is a 16-bit left shift
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))};
  }
  void store(float* p) const { _mm256_storeu_ps(p, r); }
  friend V8 fma(V8 a, V8 b, V8 c) { return {_mm256_fmadd_ps(a.r, b.r, c.r)}; }
  friend V8 operator*(V8 a, V8 b) { return {_mm256_mul_ps(a.r, b.r)}; }
  friend V8 operator+(V8 a, V8 b) { return {_mm256_add_ps(a.r, b.r)}; }
  friend V8 operator-(V8 a, V8 b) { return {_mm256_sub_ps(a.r, b.r)}; }
  friend V8 vmax(V8 a, V8 b) { return {_mm256_max_ps(a.r, b.r)}; }
  float hsum() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(r), _mm256_extractf128_ps(r, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  // out[0..4) = horizontal sums of a, b, c, d (one hadd tree instead of four reductions)
  static void hsum4(V8 a, V8 b, V8 c, V8 d, float* out) {
    __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a.r, b.r), _mm256_hadd_ps(c.r, d.r));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
  }
  float hmax() const {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(r), _mm256_extractf128_ps(r, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
  }
  // 2^x; x < -126 (including -inf: masked positions) gives exactly 0.
  V8 exp2() const {
    __m256 x = _mm256_max_ps(r, _mm256_set1_ps(-127.f));
    x = _mm256_min_ps(x, _mm256_set1_ps(127.f));
    __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 f = _mm256_sub_ps(x, n);  // [-0.5, 0.5]: Taylor of 2^f to degree 7, error < 3e-9
    __m256 p = _mm256_set1_ps(1.5252734e-5f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.5403530e-4f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504109e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022651e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 res = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), _mm256_sub_epi32(e, _mm256_set1_epi32(127 << 23))));
    return {_mm256_and_ps(res, _mm256_cmp_ps(r, _mm256_set1_ps(-126.f), _CMP_GE_OQ))};
  }
};
#else
// Portable 8-lane stand-in: plain loops the compiler may vectorize for any ISA (no reassociation
// across lanes is needed, so no -ffast-math is needed either).
struct V8 {
  float v[8];
  static V8 zero() { return set1(0.f); }
  static V8 set1(float x) { V8 o; for (int i = 0; i < 8; ++i) o.v[i] = x; return o; }
  static V8 load(const float* p) { V8 o; for (int i = 0; i < 8; ++i) o.v[i] = p[i]; return o; }
  static V8 load(const bf16* p) { V8 o; for (int i = 0; i < 8; ++i) o.v[i] = static_cast<float>(p[i]); return o; }
  void store(float* p) const { for (int i = 0; i < 8; ++i) p[i] = v[i]; }
  friend V8 fma(V8 a, V8 b, V8 c) { V8 o; for (int i = 0; i < 8; ++i) o.v[i] = a.v[i] * b.v[i] + c.v[i]; return o; }
  friend V8 operator*(V8 a, V8 b) { V8 o; for (int i = 0; i < 8; ++i) o.v[i] = a.v[i] * b.v[i]; return o; }
  friend V8 operator+(V8 a, V8 b) { V8 o; for (int i = 0; i < 8; ++i) o.v[i] = a.v[i] + b.v[i]; return o; }
  friend V8 operator-(V8 a, V8 b) { V8 o; for (int i = 0; i < 8; ++i) o.v[i] = a.v[i] - b.v[i]; return o; }
  friend V8 vmax(V8 a, V8 b) { V8 o; for (int i = 0; i < 8; ++i) o.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i]; return o; }
  float hsum() const { return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7])); }
  static void hsum4(V8 a, V8 b, V8 c, V8 d, float* out) { out[0] = a.hsum(); out[1] = b.hsum(); out[2] = c.hsum(); out[3] = d.hsum(); }
  float hmax() const { float m = v[0]; for (int i = 1; i < 8; ++i) m = v[i] > m ? v[i] : m; return m; }
  V8 exp2() const { V8 o; for (int i = 0; i < 8; ++i) o.v[i] = v[i] < -126.f ? 0.f : std::exp2(v[i]); return o; }
};
#endif

struct Tile { int tok0, n, seq, ctx_max, nsplit, part0; };  // tokens order[tok0 .. tok0+n)
struct Item { int tile, split, p0, p1; };

struct Geometry {
  int T, H, KVH, G, D, Dp, bs, max_tile;
  int64_t q_st, q_sh, o_st, o_sh, kv_ss, kv_sk, kv_sh;  // strides (elements)
};

// Scores S[b*C + r] = q_b . k_r for QB queries (rows Dp apart) x R rows (R = 4 or 1): a register
// tile of QB*R accumulators, each K vector loaded once for all QB queries (QB <= 3 keeps the
// 4-row tile in the 16 ymm registers).
template <int QB, int R>
inline void dot_tile(const float* q, int Dp, const float* const* k, float* s) {
  V8 a[QB][R];
  for (int b = 0; b < QB; ++b)
    for (int r = 0; r < R; ++r) a[b][r] = V8::zero();
  for (int d = 0; d < Dp; d += 8) {
    V8 qv[QB];
    for (int b = 0; b < QB; ++b) qv[b] = V8::load(q + b * Dp + d);
    for (int r = 0; r < R; ++r) {
      const V8 kv = V8::load(k[r] + d);
      for (int b = 0; b < QB; ++b) a[b][r] = fma(qv[b], kv, a[b][r]);
    }
  }
  for (int b = 0; b < QB; ++b) {
    if constexpr (R == 4) V8::hsum4(a[b][0], a[b][1], a[b][2], a[b][3], s + b * C);
    else s[b * C] = a[b][0].hsum();
  }
}

// A_b += sum_j P[b*C + j] * v_j for QB queries: 16-column strips with 2*QB accumulators in
// registers; each P broadcast serves both 8-lane halves of the strip.
template <int QB>
inline void pv_tile(float* acc, int Dp, const float* P, const float* const* vrow, int cn) {
  int d = 0;
  for (; d + 16 <= Dp; d += 16) {
    V8 a0[QB], a1[QB];
    for (int b = 0; b < QB; ++b) { a0[b] = V8::load(acc + b * Dp + d); a1[b] = V8::load(acc + b * Dp + d + 8); }
    for (int j = 0; j < cn; ++j) {
      const V8 v0 = V8::load(vrow[j] + d), v1 = V8::load(vrow[j] + d + 8);
      for (int b = 0; b < QB; ++b) {
        const V8 p = V8::set1(P[b * C + j]);
        a0[b] = fma(p, v0, a0[b]);
        a1[b] = fma(p, v1, a1[b]);
      }
    }
    for (int b = 0; b < QB; ++b) { a0[b].store(acc + b * Dp + d); a1[b].store(acc + b * Dp + d + 8); }
  }
  if (d < Dp) {  // Dp % 16 == 8: one 8-lane strip left
    V8 a0[QB];
    for (int b = 0; b < QB; ++b) a0[b] = V8::load(acc + b * Dp + d);
    for (int j = 0; j < cn; ++j) {
      const V8 v0 = V8::load(vrow[j] + d);
      for (int b = 0; b < QB; ++b) a0[b] = fma(V8::set1(P[b * C + j]), v0, a0[b]);
    }
    for (int b = 0; b < QB; ++b) a0[b].store(acc + b * Dp + d);
  }
}

// Dispatch a runtime count n onto compile-time tile heights N, N, ..., then the remainder.
template <int N, typename F>
inline void by_blocks(int n, F&& f) {
  int i = 0;
  for (; i + N <= n; i += N) f(i, std::integral_constant<int, N>());
  const int rem = n - i;
  if constexpr (N > 3) if (rem == 3) f(i, std::integral_constant<int, 3>());
  if constexpr (N > 2) if (rem == 2) f(i, std::integral_constant<int, 2>());
  if (rem == 1) f(i, std::integral_constant<int, 1>());
}

// Per-thread scratch, laid out query-major: query index = kvh*(max_tile*G) + tl*G + g.
struct Scratch {
  std::vector<float> q, acc, m, l, S, kbuf, vbuf;
  Scratch(const Geometry& g) {
    size_t nq = (size_t)g.max_tile * g.H;
    q.assign(nq * g.Dp, 0.f); acc.assign(nq * g.Dp, 0.f); m.assign(nq, 0.f); l.assign(nq, 0.f);
    S.assign((size_t)g.max_tile * g.G * C, 0.f);
    kbuf.assign((size_t)C * g.Dp, 0.f); vbuf.assign((size_t)C * g.Dp, 0.f);  // zero tails stay zero
  }
};

template <typename T>
void run_item(const Geometry& g, const Tile& tile, const Item& it, const int* order, const int* ctx,
              const T* qp, const T* kv, const int* btrow, T* outp, float qscale, Scratch& s,
              float* part_m, float* part_l, float* part_acc) {
  const int n = tile.n, G = g.G, Dp = g.Dp, D = g.D, MG = g.max_tile * G;
  // Direct pointers into the cache when rows are fp32 and whole vectors; else widen into L1.
  const bool direct = std::is_same<T, float>::value && (D % 8 == 0);
  for (int tl = 0; tl < n; ++tl) {
    const T* qt = qp + order[tile.tok0 + tl] * g.q_st;
    for (int h = 0; h < g.H; ++h) {
      float* dst = s.q.data() + ((size_t)(h / G) * MG + tl * G + h % G) * Dp;
      for (int d = 0; d < D; ++d) dst[d] = static_cast<float>(qt[h * g.q_sh + d]) * qscale;
    }
  }
  for (int kvh = 0; kvh < g.KVH; ++kvh) {  // reset only the rows this tile uses
    const size_t q0 = (size_t)kvh * MG, nq = (size_t)n * G;
    std::fill_n(s.acc.data() + q0 * Dp, nq * Dp, 0.f);
    std::fill_n(s.m.data() + q0, nq, NEG_INF);
    std::fill_n(s.l.data() + q0, nq, 0.f);
  }
  int ctx_local[64];
  for (int tl = 0; tl < n; ++tl) ctx_local[tl] = ctx[order[tile.tok0 + tl]];
  const float* rowk[C];
  const float* rowv[C];
  const int pend = std::min(it.p1, tile.ctx_max);
  // Cache addresses of the n slots from position p0 on, walking the block table (no divisions
  // per row).
  auto slots = [&](int p0, int cnt, const T** dst) {
    int blk = p0 / g.bs, off = p0 - blk * g.bs;
    for (int j = 0; j < cnt; ++j) {
      dst[j] = kv + ((int64_t)btrow[blk] * g.bs + off) * g.kv_ss;
      if (++off == g.bs) { off = 0; ++blk; }
    }
  };
  const T* slot_base[C];
  const T* next_base[C];
  slots(it.p0, std::min(C, pend - it.p0), slot_base);
  for (int c0 = it.p0; c0 < pend; c0 += C) {
    const int cn = std::min(C, pend - c0);
    int na_tok = 0;  // tokens sorted by ctx desc: the active ones are a prefix
    while (na_tok < n && ctx_local[na_tok] > c0) ++na_tok;
    // Software prefetch of the next chunk, one row per row computed so the misses overlap the
    // math: block ids jump at every block boundary, which the hardware prefetcher cannot follow.
    const int nn = std::max(0, std::min(C, pend - c0 - C));
    slots(c0 + C, nn, next_base);
    auto prefetch = [&](int j, int kvh) {
      if (j >= nn) return;
      const char* kr = reinterpret_cast<const char*>(next_base[j] + kvh * g.kv_sh);
      const char* vr = reinterpret_cast<const char*>(next_base[j] + kvh * g.kv_sh + g.kv_sk);
      for (int off = 0; off < (int)(g.D * sizeof(T)); off += 64) {
        prefetch_line(kr + off);
        prefetch_line(vr + off);
      }
    };
    for (int kvh = 0; kvh < g.KVH; ++kvh) {
      for (int j = 0; j < cn; ++j) {
        const T* ks = slot_base[j] + kvh * g.kv_sh;
        const T* vs = ks + g.kv_sk;
        if (direct) {
          rowk[j] = reinterpret_cast<const float*>(ks);
          rowv[j] = reinterpret_cast<const float*>(vs);
          continue;
        }
        prefetch(j, kvh);
        float* kd = s.kbuf.data() + j * Dp;
        float* vd = s.vbuf.data() + j * Dp;
        int d = 0;
        for (; d + 8 <= D; d += 8) { V8::load(ks + d).store(kd + d); V8::load(vs + d).store(vd + d); }
        for (; d < D; ++d) { kd[d] = static_cast<float>(ks[d]); vd[d] = static_cast<float>(vs[d]); }
        rowk[j] = kd;
        rowv[j] = vd;
      }
      const int na = na_tok * G;
      const size_t qoff = (size_t)kvh * MG;
      const float* Q = s.q.data() + qoff * Dp;
      float* A = s.acc.data() + qoff * Dp;
      float* S = s.S.data();
      int j = 0;
      for (; j + 4 <= cn; j += 4) {
        if (direct)
          for (int r = 0; r < 4; ++r) prefetch(j + r, kvh);
        by_blocks<3>(na, [&](int i, auto qb) {
          dot_tile<decltype(qb)::value, 4>(Q + (size_t)i * Dp, Dp, rowk + j, S + i * C + j);
        });
      }
      for (; j < cn; ++j) {
        if (direct) prefetch(j, kvh);
        by_blocks<3>(na, [&](int i, auto qb) {
          dot_tile<decltype(qb)::value, 1>(Q + (size_t)i * Dp, Dp, rowk + j, S + i * C + j);
        });
      }
      for (int i = 0; i < na; ++i) {  // online softmax update, one chunk at a time
        float* Si = S + i * C;
        const int valid = std::min(cn, ctx_local[i / G] - c0);
        for (int j = valid; j < C; ++j) Si[j] = NEG_INF;
        V8 mxv = V8::load(Si);
        for (int k = 8; k < C; k += 8) mxv = vmax(mxv, V8::load(Si + k));
        const float mx = mxv.hmax();
        float& mi = s.m[qoff + i];
        float& li = s.l[qoff + i];
        // Lazy max: the reference max only moves when a score exceeds it by 2^8, so most chunks
        // skip the accumulator rescale. Softmax is invariant to the reference; terms stay <= 256.
        if (mx > mi + 8.f) {
          const float alpha = std::exp2(mi - mx);  // 0 on the first chunk (mi = -inf)
          li *= alpha;
          if (mi != NEG_INF) {
            float* Ai = A + (size_t)i * Dp;
            const V8 av = V8::set1(alpha);
            for (int d = 0; d < Dp; d += 8) (V8::load(Ai + d) * av).store(Ai + d);
          }
          mi = mx;
        }
        const V8 mv = V8::set1(mi);
        V8 sum = V8::zero();
        for (int k = 0; k < C; k += 8) {
          const V8 p = (V8::load(Si + k) - mv).exp2();
          p.store(Si + k);
          sum = sum + p;
        }
        li += sum.hsum();
      }
      by_blocks<4>(na, [&](int i, auto qb) {
        pv_tile<decltype(qb)::value>(A + (size_t)i * Dp, Dp, S + i * C, rowv, cn);
      });
    }
    std::copy(next_base, next_base + nn, slot_base);
  }
  // Epilogue: normalized output, or the raw (m, l, acc) partial for the merge pass.
  for (int tl = 0; tl < n; ++tl) {
    for (int h = 0; h < g.H; ++h) {
      const size_t qi = (size_t)(h / G) * MG + tl * G + h % G;
      const float* a = s.acc.data() + qi * Dp;
      if (tile.nsplit == 1) {
        T* o = outp + order[tile.tok0 + tl] * g.o_st + h * g.o_sh;
        const float inv = s.l[qi] > 0.f ? 1.f / s.l[qi] : 0.f;  // ctx <= 0 -> zeros
        for (int d = 0; d < D; ++d) o[d] = static_cast<T>(a[d] * inv);
      } else {
        const size_t pi = (size_t)(tile.part0 + it.split) * g.max_tile * g.H + tl * g.H + h;
        part_m[pi] = s.m[qi];
        part_l[pi] = s.l[qi];
        std::memcpy(part_acc + pi * D, a, D * sizeof(float));
      }
    }
  }
}

template <typename T>
void merge_tile(const Geometry& g, const Tile& tile, const int* order, T* outp, const float* pm,
                const float* pl, const float* pacc) {
  const size_t stride = (size_t)g.max_tile * g.H;
  std::vector<float> acc(g.D);
  for (int tl = 0; tl < tile.n; ++tl) {
    for (int h = 0; h < g.H; ++h) {
      const size_t base = (size_t)tile.part0 * stride + tl * g.H + h;
      float M = NEG_INF;
      for (int sp = 0; sp < tile.nsplit; ++sp) M = std::max(M, pm[base + sp * stride]);
      std::fill(acc.begin(), acc.end(), 0.f);
      float L = 0.f;
      if (M != NEG_INF) {
        for (int sp = 0; sp < tile.nsplit; ++sp) {
          const size_t pi = base + sp * stride;
          if (pl[pi] == 0.f) continue;  // query had no positions in this split
          const float w = std::exp2(pm[pi] - M);
          L += pl[pi] * w;
          for (int d = 0; d < g.D; ++d) acc[d] += w * pacc[pi * g.D + d];
        }
      }
      T* o = outp + order[tile.tok0 + tl] * g.o_st + h * g.o_sh;
      const float inv = L > 0.f ? 1.f / L : 0.f;
      for (int d = 0; d < g.D; ++d) o[d] = static_cast<T>(acc[d] * inv);
    }
  }
}

// Helper threads for this op. Unlike an OpenMP region (at::parallel_for), the caller never waits
// for a helper that has not started: on a shared, oversubscribed machine a woken worker can sit
// descheduled for a whole scheduler tick, and every region then cost 4-8 ms. Here the caller
// claims all remaining items itself and waits only for items already running, so the worst case
// is single-thread speed. Helpers sleep on a condition variable between calls.
class HelperPool {
 public:
  static HelperPool& instance() {
    static std::mutex m;
    static HelperPool* pool = nullptr;
    static pid_t owner = 0;
    std::lock_guard<std::mutex> lk(m);
    if (pool == nullptr || owner != getpid()) {  // after fork() the child has no helper threads
      pool = new HelperPool();  // never destroyed: detached helpers may outlive static destructors
      owner = getpid();
    }
    return *pool;
  }

  // Runs worker() (a loop that claims items until none are left) on the caller and on up to
  // `helpers` helper threads that wake up before the caller has finished.
  template <typename W>
  void run(int helpers, W& worker) {
    std::unique_lock<std::mutex> busy(run_m_, std::try_to_lock);
    if (helpers <= 0 || !busy.owns_lock()) return worker();  // concurrent callers run inline
    {
      std::lock_guard<std::mutex> lk(m_);
      for (; nthreads_ < helpers; ++nthreads_) std::thread([this, g = gen_] { loop(g); }).detach();
      fn_ = [](void* c) { (*static_cast<W*>(c))(); };
      ctx_ = &worker;
      open_ = helpers;
      err_ = nullptr;
      ++gen_;
    }
    work_cv_.notify_all();
    std::exception_ptr e;
    try { worker(); } catch (...) { e = std::current_exception(); }
    std::unique_lock<std::mutex> lk(m_);
    open_ = 0;  // helpers that have not woken up yet stay out
    done_cv_.wait(lk, [&] { return active_ == 0; });
    if (!e) e = err_;
    lk.unlock();
    if (e) std::rethrow_exception(e);
  }

 private:
  void loop(uint64_t seen) {
    std::unique_lock<std::mutex> lk(m_);
    for (;;) {
      work_cv_.wait(lk, [&] { return gen_ != seen; });
      seen = gen_;
      if (open_ <= 0) continue;
      --open_;
      ++active_;
      void (*fn)(void*) = fn_;
      void* ctx = ctx_;
      lk.unlock();
      std::exception_ptr e;
      try { fn(ctx); } catch (...) { e = std::current_exception(); }
      lk.lock();
      if (e && !err_) err_ = e;
      if (--active_ == 0) done_cv_.notify_all();
    }
  }
  std::mutex m_, run_m_;
  std::condition_variable work_cv_, done_cv_;
  void (*fn_)(void*) = nullptr;
  void* ctx_ = nullptr;
  uint64_t gen_ = 0;
  int open_ = 0, active_ = 0, nthreads_ = 0;
  std::exception_ptr err_;
};

// Runs worker() on up to min(n, at::get_num_threads()) threads; workers claim items themselves.
template <typename W>
void run_workers(int64_t n, W&& worker) {
  const int64_t nt = std::min<int64_t>(at::get_num_threads(), n);
  HelperPool::instance().run((int)nt - 1, worker);
}

template <typename T>
void launch(const Geometry& g, const std::vector<Tile>& tiles, const std::vector<Item>& items,
            const std::vector<int>& order, const int* ctx, const int* bt, int MB, const T* qp, const T* kv,
            T* op, float qscale, int nparts) {
  const size_t psz = (size_t)nparts * g.max_tile * g.H;
  std::vector<float> pm(psz), pl(psz), pacc(psz * g.D);
  std::atomic<int64_t> next{0};
  const int64_t n = items.size();
  run_workers(n, [&]() {
    std::unique_ptr<Scratch> sc;  // per worker, allocated only if it gets an item
    for (int64_t i; (i = next.fetch_add(1)) < n;) {
      if (!sc) sc.reset(new Scratch(g));
      const Tile& tl = tiles[items[i].tile];
      run_item<T>(g, tl, items[i], order.data(), ctx, qp, kv, bt + (int64_t)tl.seq * MB, op, qscale, *sc,
                  pm.data(), pl.data(), pacc.data());
    }
  });
  if (nparts == 0) return;
  std::vector<int> merge;
  for (int ti = 0; ti < (int)tiles.size(); ++ti)
    if (tiles[ti].nsplit > 1) merge.push_back(ti);
  std::atomic<int64_t> mnext{0};
  run_workers(merge.size(), [&]() {
    for (int64_t i; (i = mnext.fetch_add(1)) < (int64_t)merge.size();)
      merge_tile<T>(g, tiles[merge[i]], order.data(), op, pm.data(), pl.data(), pacc.data());
  });
}

}  // namespace

void paged_attention_cpu(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_tables,
                         const at::Tensor& token_seq, const at::Tensor& token_ctx, int64_t block_size,
                         double scale, const at::Tensor& out, int64_t max_tile_tokens, int64_t min_split) {
  TORCH_CHECK(q.dim() == 3 && kv_cache.dim() == 4 && kv_cache.size(1) == 2, "q [T,H,D], kv_cache [S,2,KVH,D]");
  TORCH_CHECK(q.device().is_cpu() && kv_cache.device().is_cpu() && out.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(q.scalar_type() == kv_cache.scalar_type() && q.scalar_type() == out.scalar_type(), "q, kv_cache, out: one dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, "fp32 or bf16 only");
  TORCH_CHECK(out.sizes() == q.sizes(), "out must have q's shape");
  TORCH_CHECK(q.stride(2) == 1 && kv_cache.stride(3) == 1 && out.stride(2) == 1, "last dims must be contiguous");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.scalar_type() == at::kInt && block_tables.is_contiguous(), "block_tables int32 [B, max_blocks] contiguous");
  TORCH_CHECK(token_seq.scalar_type() == at::kInt && token_ctx.scalar_type() == at::kInt && token_seq.is_contiguous() && token_ctx.is_contiguous(), "token_seq/token_ctx int32 contiguous");
  Geometry g;
  g.T = q.size(0); g.H = q.size(1); g.D = q.size(2); g.KVH = kv_cache.size(2);
  TORCH_CHECK(kv_cache.size(3) == g.D && g.KVH > 0 && g.H % g.KVH == 0, "head dims / GQA group mismatch");
  TORCH_CHECK(token_seq.numel() == g.T && token_ctx.numel() == g.T, "token_seq/token_ctx must be [T]");
  TORCH_CHECK(block_size > 0, "block_size must be positive");
  if (g.T == 0) return;
  g.G = g.H / g.KVH; g.Dp = (g.D + 7) / 8 * 8; g.bs = block_size;
  g.max_tile = std::max<int>(1, std::min<int>(64, max_tile_tokens));
  g.q_st = q.stride(0); g.q_sh = q.stride(1); g.o_st = out.stride(0); g.o_sh = out.stride(1);
  g.kv_ss = kv_cache.stride(0); g.kv_sk = kv_cache.stride(1); g.kv_sh = kv_cache.stride(2);
  const int B = block_tables.size(0), MB = block_tables.size(1);
  const int64_t num_blocks = kv_cache.size(0) / block_size;
  const int* seq = token_seq.data_ptr<int>();
  const int* ctx = token_ctx.data_ptr<int>();
  const int* bt = block_tables.data_ptr<int>();

  // Group tokens by sequence, longest context first, and cut each group into tiles.
  std::vector<int> order(g.T);
  for (int t = 0; t < g.T; ++t) {
    TORCH_CHECK(seq[t] >= 0 && seq[t] < B, "token_seq out of range");
    TORCH_CHECK(ctx[t] >= 0 && (int64_t)ctx[t] <= (int64_t)MB * block_size, "token_ctx exceeds the block table");
    order[t] = t;
  }
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    return seq[a] != seq[b] ? seq[a] < seq[b] : ctx[a] > ctx[b];
  });
  std::vector<Tile> tiles;
  int64_t work = 0;
  for (int t = 0; t < g.T;) {
    int e = t;
    while (e < g.T && seq[order[e]] == seq[order[t]] && e - t < g.max_tile) ++e;
    tiles.push_back({t, e - t, seq[order[t]], ctx[order[t]], 1, 0});
    const int* row = bt + (int64_t)seq[order[t]] * MB;
    for (int b = 0; b < (ctx[order[t]] + block_size - 1) / block_size; ++b)  // never read out of bounds
      TORCH_CHECK(row[b] >= 0 && row[b] < num_blocks, "block id out of range in block_tables");
    work += ctx[order[t]];
    t = e;
  }
  // Split long contexts (flash-decoding) when there are too few items to keep every thread busy.
  const int64_t target = 4 * (int64_t)at::get_num_threads();
  int64_t split_len = std::max<int64_t>(std::max<int64_t>(min_split, C), (work + target - 1) / target);
  split_len = (split_len + C - 1) / C * C;
  std::vector<Item> items;
  int nparts = 0;
  for (int ti = 0; ti < (int)tiles.size(); ++ti) {
    Tile& tl = tiles[ti];
    tl.nsplit = std::max<int64_t>(1, (tl.ctx_max + split_len - 1) / split_len);
    if (tl.nsplit > 1) { tl.part0 = nparts; nparts += tl.nsplit; }
    for (int sp = 0; sp < tl.nsplit; ++sp)
      items.push_back({ti, sp, (int)(sp * split_len), (int)std::min<int64_t>((sp + 1) * split_len, tl.ctx_max)});
  }
  // Longest items first so the dynamic schedule ends balanced.
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.p1 - a.p0 > b.p1 - b.p0; });
  const float qscale = (float)(scale * 1.4426950408889634);  // log2(e): softmax via exp2
  if (q.scalar_type() == at::kFloat)
    launch<float>(g, tiles, items, order, ctx, bt, MB, q.data_ptr<float>(), kv_cache.data_ptr<float>(),
                  out.data_ptr<float>(), qscale, nparts);
  else
    launch<bf16>(g, tiles, items, order, ctx, bt, MB, q.data_ptr<bf16>(), kv_cache.data_ptr<bf16>(),
                 out.data_ptr<bf16>(), qscale, nparts);
}

// A namespace of its own: TORCH_LIBRARY may be defined once per namespace per process.
TORCH_LIBRARY(loramux_attn, m) {
  m.def("paged_attention(Tensor q, Tensor kv_cache, Tensor block_tables, Tensor token_seq, Tensor token_ctx, "
        "int block_size, float scale, Tensor(a!) out, int max_tile_tokens, int min_split) -> ()");
}
TORCH_LIBRARY_IMPL(loramux_attn, CPU, m) { m.impl("paged_attention", &paged_attention_cpu); }
