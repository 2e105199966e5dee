// Flash attention for the CPU, forward and backward, as XLA FFI custom calls (float32).
//
// Reads q [B, L, N, H] and k, v [B, S, K, H] where they lie (no heads-first copies) and never
// materialises the L x S scores: a block of BQ queries meets BK keys at a time, with the online
// softmax of FlashAttention-2. A causal block stops at its last query's keys, which skips the
// upper triangle's work. Query head n reads key/value head n / (N / K) (grouped-query).
// Which keys a query may read: causality, the keys' validity (padding) and the documents (a
// query reads only keys of its own document). A query with no key to read gets zeros.
//
// The products run in one register-blocked kernel, C += A @ B over row-major blocks, written
// with GCC vector extensions: the compiler targets the machine it builds on (-march=native).
// Work is spread over XLA's intra-op thread pool: forward by (example, head), backward by
// (example, key/value head), which owns its dk and dv rows, so no two tasks write the same
// memory. A task copies its head's keys and values once, zero-padded to whole blocks of
// vectors, in the layouts its products read.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#ifdef __AVX512F__
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float Vec __attribute__((vector_size(kLanes * 4)));
typedef float VecU __attribute__((vector_size(kLanes * 4), aligned(4)));  // unaligned access
typedef int32_t IVec __attribute__((vector_size(kLanes * 4)));

constexpr int64_t BQ = 64;  // queries per block
constexpr int64_t BK = 64;  // keys per block: a multiple of the widest column chunk (4 vectors)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline Vec Load(const float* p) { return *reinterpret_cast<const VecU*>(p); }
inline void Store(float* p, Vec x) { *reinterpret_cast<VecU*>(p) = x; }

// exp(x) to about 1 ulp (Cephes' expf); exactly 0 below -87.
inline Vec Exp(Vec x) {
  const auto underflow = x < -87.0f;  // -inf included
  x = x < -87.0f ? Vec{} - 87.0f : x;
  x = x > 88.0f ? Vec{} + 88.0f : x;
  Vec n = __builtin_convertvector(__builtin_convertvector(x * 1.44269504088896341f + 0.5f, IVec),
                                  Vec);
  n = n > x * 1.44269504088896341f + 0.5f ? n - 1.0f : n;  // floor
  Vec r = x - n * 0.693359375f + n * 2.12194440e-4f;
  Vec p = Vec{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  IVec bits = (__builtin_convertvector(n, IVec) + 127) << 23;
  Vec scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  Vec y = p * scale;
  return underflow ? Vec{} : y;
}

inline float Sum(Vec x) {
  float s = 0;
  for (int i = 0; i < kLanes; ++i) s += x[i];
  return s;
}

inline float Max(Vec x) {
  float m = x[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, x[i]);
  return m;
}

// C[R, NV lanes-wide vectors] += A[R, depth] @ B[depth, NV vectors], all row-major; with
// kTransA, A is given as A^T [depth, R] (so A^T @ B needs no transposed copy).
template <int R, int NV, bool kTransA>
inline void Tile(float* C, int64_t ldc, const float* A, int64_t lda, const float* B,
                 int64_t ldb, int64_t depth) {
  Vec acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = Load(C + r * ldc + v * kLanes);
  for (int64_t p = 0; p < depth; ++p) {
    Vec b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = Load(B + p * ldb + v * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float a = kTransA ? A[p * lda + r] : A[r * lda + p];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) Store(C + r * ldc + v * kLanes, acc[r][v]);
}

template <int R, bool kTransA>
inline void TileRow(float* C, int64_t ldc, const float* A, int64_t lda, const float* B,
                    int64_t ldb, int64_t depth, int64_t cols) {
  constexpr int64_t kChunk = 4 * kLanes;
  int64_t c = 0;
  for (; c + kChunk <= cols; c += kChunk)
    Tile<R, 4, kTransA>(C + c, ldc, A, lda, B + c, ldb, depth);
  for (; c < cols; c += kLanes) Tile<R, 1, kTransA>(C + c, ldc, A, lda, B + c, ldb, depth);
}

// C[rows, cols] += A[rows, depth] @ B[depth, cols], or A^T @ B with A given as [depth, rows]
// (kTransA); cols a multiple of kLanes.
template <bool kTransA = false>
void MatMul(float* C, int64_t ldc, const float* A, int64_t lda, const float* B, int64_t ldb,
            int64_t rows, int64_t depth, int64_t cols) {
  const int64_t step = kTransA ? 1 : lda;  // from one row of the product's A to the next
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4)
    TileRow<4, kTransA>(C + r * ldc, ldc, A + r * step, lda, B, ldb, depth, cols);
  for (; r < rows; ++r)
    TileRow<1, kTransA>(C + r * ldc, ldc, A + r * step, lda, B, ldb, depth, cols);
}

// dst[cols, rows] = src[rows, cols]^T, in 16 x 16 tiles that stay in the L1 cache.
void Transpose(float* dst, int64_t ldd, const float* src, int64_t lds, int64_t rows,
               int64_t cols) {
  constexpr int64_t kTile = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += kTile)
    for (int64_t j0 = 0; j0 < cols; j0 += kTile)
      for (int64_t j = j0; j < std::min(j0 + kTile, cols); ++j)
        for (int64_t i = i0; i < std::min(i0 + kTile, rows); ++i)
          dst[j * ldd + i] = src[i * lds + j];
}

// Runs body(0..n-1) on the caller and XLA's intra-op threads; returns when all have run.
void ParallelFor(ffi::ThreadPool& pool, int64_t n, std::function<void(int64_t)> body) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    int64_t n;
    std::function<void(int64_t)> body;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  state->n = n;
  state->body = std::move(body);
  auto work = [state] {  // a helper that starts late finds no work left and returns
    for (int64_t i; (i = state->next++) < state->n;) {
      state->body(i);
      if (++state->done == state->n) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == state->n; });
}

struct Shape {
  int64_t B, L, S, N, K, H;
  bool causal;
  int64_t Hp, Sp;  // H padded to whole vectors, S to whole blocks of keys
  int64_t group;   // query heads per key/value head
  float scale;     // 1 / sqrt(H), applied to q
};

Shape ShapeOf(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k, bool causal) {
  auto qd = q.dimensions(), kd = k.dimensions();
  Shape s{qd[0], qd[1], kd[1], qd[2], kd[2], qd[3], causal};
  s.Hp = (s.H + kLanes - 1) / kLanes * kLanes;
  s.Sp = (s.S + BK - 1) / BK * BK;
  s.group = s.N / s.K;
  s.scale = 1.0f / std::sqrt(static_cast<float>(s.H));
  return s;
}

// rows x Hp block of x[b, first + i, head, :] (times scale), zero-padded.
void LoadRows(float* dst, const float* x, const Shape& s, int64_t heads, int64_t length,
              int64_t b, int64_t head, int64_t first, int64_t rows, float scale) {
  std::memset(dst, 0, sizeof(float) * rows * s.Hp);
  for (int64_t i = 0; i < rows && first + i < length; ++i) {
    const float* src = x + ((b * length + first + i) * heads + head) * s.H;
    for (int64_t h = 0; h < s.H; ++h) dst[i * s.Hp + h] = src[h] * scale;
  }
}

// Masks the scores of queries q0.. against keys k0.. (rows x BK) to -inf where not allowed.
void Mask(float* scores, const Shape& s, int64_t b, int64_t q0, int64_t rows, int64_t k0,
          const bool* valid, const int32_t* docs) {
  const int64_t keys = std::min(BK, s.S - k0);
  const bool* valid_k = valid + b * s.S + k0;
  const int32_t *doc_k = docs + b * s.S + k0, *doc_q = docs + b * s.L + q0;
  // Most blocks need nothing: all keys valid, one document, wholly before the queries.
  bool clean = keys == BK && (!s.causal || k0 + BK <= q0 + 1);
  for (int64_t j = 0; clean && j < keys; ++j) clean = valid_k[j] && doc_k[j] == doc_q[0];
  for (int64_t i = 0; clean && i < rows; ++i) clean = doc_q[i] == doc_q[0];
  if (clean) return;
  for (int64_t i = 0; i < rows; ++i) {
    float* row = scores + i * BK;
    const int64_t last = s.causal ? q0 + i - k0 : BK;  // the last key this query may see
    for (int64_t j = 0; j < BK; ++j) {
      const bool allowed = j < keys && j <= last && valid_k[j] && doc_k[j] == doc_q[i];
      row[j] = allowed ? row[j] : kNegInf;
    }
  }
}

int64_t KeysSeen(const Shape& s, int64_t q0, int64_t rows) {
  return s.causal ? std::min(q0 + rows, s.S) : s.S;
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> valid_BxS,
                   ffi::Buffer<ffi::S32> docs_BxL, ffi::ResultBuffer<ffi::F32> out,
                   ffi::ResultBuffer<ffi::F32> lse_BxNxL, bool causal) {
  const Shape s = ShapeOf(q, k, causal);
  const int64_t Sp = s.Sp, group = s.group;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const bool* valid = valid_BxS.typed_data();
  const int32_t* docs = docs_BxL.typed_data();
  float *op = out->typed_data(), *lse = lse_BxNxL->typed_data();
  ParallelFor(pool, s.B * s.N, [&](int64_t task) {
    const int64_t b = task / s.N, n = task % s.N;
    // The head's keys (transposed, for the scores) and values, whole: read from memory once.
    std::vector<float> kb(Sp * s.Hp), kt(s.Hp * Sp), vb(Sp * s.Hp);
    LoadRows(kb.data(), kp, s, s.K, s.S, b, n / group, 0, Sp, 1.0f);
    Transpose(kt.data(), Sp, kb.data(), s.Hp, Sp, s.Hp);
    LoadRows(vb.data(), vp, s, s.K, s.S, b, n / group, 0, Sp, 1.0f);
    std::vector<float> qb(BQ * s.Hp), o(BQ * s.Hp), p(BQ * BK), m(BQ), l(BQ);
    for (int64_t q0 = 0; q0 < s.L; q0 += BQ) {
      const int64_t rows = std::min(BQ, s.L - q0);
      LoadRows(qb.data(), qp, s, s.N, s.L, b, n, q0, rows, s.scale);
      std::fill(o.begin(), o.end(), 0.0f);
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.0f);
      for (int64_t k0 = 0; k0 < KeysSeen(s, q0, rows); k0 += BK) {
        std::fill(p.begin(), p.end(), 0.0f);
        MatMul(p.data(), BK, qb.data(), s.Hp, kt.data() + k0, Sp, rows, s.Hp, BK);
        Mask(p.data(), s, b, q0, rows, k0, valid, docs);
        for (int64_t i = 0; i < rows; ++i) {  // the online softmax: rescale what came before
          float* row = p.data() + i * BK;
          Vec mx = Vec{} + kNegInf;
          for (int64_t j = 0; j < BK; j += kLanes) mx = mx > Load(row + j) ? mx : Load(row + j);
          const float m_new = std::max(m[i], Max(mx));
          if (m_new == kNegInf) {  // no key allowed yet
            std::fill(row, row + BK, 0.0f);
            continue;
          }
          Vec sum{};
          for (int64_t j = 0; j < BK; j += kLanes) {
            const Vec e = Exp(Load(row + j) - m_new);
            Store(row + j, e);
            sum += e;
          }
          const float alpha = m[i] == kNegInf ? 0.0f : std::exp(m[i] - m_new);
          l[i] = l[i] * alpha + Sum(sum);
          m[i] = m_new;
          for (int64_t h = 0; h < s.Hp; h += kLanes)
            Store(&o[i * s.Hp + h], Load(&o[i * s.Hp + h]) * alpha);
        }
        MatMul(o.data(), s.Hp, p.data(), BK, vb.data() + k0 * s.Hp, s.Hp, rows, BK, s.Hp);
      }
      for (int64_t i = 0; i < rows; ++i) {
        const float inv = l[i] > 0 ? 1.0f / l[i] : 0.0f;
        float* dst = op + ((b * s.L + q0 + i) * s.N + n) * s.H;
        for (int64_t h = 0; h < s.H; ++h) dst[h] = o[i * s.Hp + h] * inv;
        // The backward pass's probabilities are exp(score - lse): +inf makes a keyless row's 0.
        lse[(b * s.N + n) * s.L + q0 + i] =
            l[i] > 0 ? m[i] + std::log(l[i]) : std::numeric_limits<float>::infinity();
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> valid_BxS,
                    ffi::Buffer<ffi::S32> docs_BxL, ffi::Buffer<ffi::F32> out,
                    ffi::Buffer<ffi::F32> lse_BxNxL, ffi::Buffer<ffi::F32> dout,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv, bool causal) {
  const Shape s = ShapeOf(q, k, causal);
  const int64_t Sp = s.Sp, group = s.group;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float *op = out.typed_data(), *lse = lse_BxNxL.typed_data(), *dop = dout.typed_data();
  const bool* valid = valid_BxS.typed_data();
  const int32_t* docs = docs_BxL.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  ParallelFor(pool, s.B * s.K, [&](int64_t task) {
    const int64_t b = task / s.K, kv = task % s.K;
    // This task's keys and values, whole: rows (for dq) and transposed (for the scores and dp).
    std::vector<float> kb(Sp * s.Hp), vb(Sp * s.Hp), kt(s.Hp * Sp), vt(s.Hp * Sp);
    LoadRows(kb.data(), kp, s, s.K, s.S, b, kv, 0, Sp, 1.0f);
    LoadRows(vb.data(), vp, s, s.K, s.S, b, kv, 0, Sp, 1.0f);
    Transpose(kt.data(), Sp, kb.data(), s.Hp, Sp, s.Hp);
    Transpose(vt.data(), Sp, vb.data(), s.Hp, Sp, s.Hp);
    std::vector<float> dk_acc(Sp * s.Hp, 0.0f), dv_acc(Sp * s.Hp, 0.0f);
    std::vector<float> qb(BQ * s.Hp), ob(BQ * s.Hp), dob(BQ * s.Hp), dq_acc(BQ * s.Hp),
        p(BQ * BK), dp(BQ * BK), delta(BQ);
    for (int64_t n = kv * group; n < (kv + 1) * group; ++n) {
      for (int64_t q0 = 0; q0 < s.L; q0 += BQ) {
        const int64_t rows = std::min(BQ, s.L - q0);
        LoadRows(qb.data(), qp, s, s.N, s.L, b, n, q0, rows, s.scale);
        LoadRows(ob.data(), op, s, s.N, s.L, b, n, q0, rows, 1.0f);
        LoadRows(dob.data(), dop, s, s.N, s.L, b, n, q0, rows, 1.0f);
        const float* lse_q = lse + (b * s.N + n) * s.L + q0;
        for (int64_t i = 0; i < rows; ++i) {  // sum_j p dp = sum_h dout * out
          Vec acc{};
          for (int64_t h = 0; h < s.Hp; h += kLanes)
            acc += Load(&dob[i * s.Hp + h]) * Load(&ob[i * s.Hp + h]);
          delta[i] = Sum(acc);
        }
        std::fill(dq_acc.begin(), dq_acc.end(), 0.0f);
        for (int64_t k0 = 0; k0 < KeysSeen(s, q0, rows); k0 += BK) {
          std::fill(p.begin(), p.end(), 0.0f);
          MatMul(p.data(), BK, qb.data(), s.Hp, kt.data() + k0, Sp, rows, s.Hp, BK);
          Mask(p.data(), s, b, q0, rows, k0, valid, docs);
          for (int64_t i = 0; i < rows; ++i)
            for (int64_t j = 0; j < BK; j += kLanes)
              Store(&p[i * BK + j], Exp(Load(&p[i * BK + j]) - lse_q[i]));
          MatMul<true>(dv_acc.data() + k0 * s.Hp, s.Hp, p.data(), BK, dob.data(), s.Hp, BK,
                       rows, s.Hp);  // dv += p^T dout
          std::fill(dp.begin(), dp.end(), 0.0f);
          MatMul(dp.data(), BK, dob.data(), s.Hp, vt.data() + k0, Sp, rows, s.Hp, BK);
          for (int64_t i = 0; i < rows; ++i)  // d scores = p * (dp - delta)
            for (int64_t j = 0; j < BK; j += kLanes)
              Store(&dp[i * BK + j], Load(&p[i * BK + j]) * (Load(&dp[i * BK + j]) - delta[i]));
          MatMul(dq_acc.data(), s.Hp, dp.data(), BK, kb.data() + k0 * s.Hp, s.Hp, rows, BK,
                 s.Hp);
          MatMul<true>(dk_acc.data() + k0 * s.Hp, s.Hp, dp.data(), BK, qb.data(), s.Hp, BK,
                       rows, s.Hp);  // dk += dscores^T (q scale)
        }
        for (int64_t i = 0; i < rows; ++i) {
          float* dst = dqp + ((b * s.L + q0 + i) * s.N + n) * s.H;
          for (int64_t h = 0; h < s.H; ++h) dst[h] = dq_acc[i * s.Hp + h] * s.scale;
        }
      }
    }
    for (int64_t j = 0; j < s.S; ++j) {
      float* dk_dst = dkp + ((b * s.S + j) * s.K + kv) * s.H;
      float* dv_dst = dvp + ((b * s.S + j) * s.K + kv) * s.H;
      for (int64_t h = 0; h < s.H; ++h) {
        dk_dst[h] = dk_acc[j * s.Hp + h];
        dv_dst[h] = dv_acc[j * s.Hp + h];
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q [B, L, N, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k [B, S, K, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v [B, S, K, H]
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // valid keys [B, S]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // documents [B, L] (L = S)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [B, L, N, H]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // logsumexp [B, N, L]
                                  .Attr<bool>("causal"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // valid keys
                                  .Arg<ffi::Buffer<ffi::S32>>()  // documents
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // logsumexp
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dv
                                  .Attr<bool>("causal"));
