// Fused Mamba-1 selective scan for the CPU: forward and backward, float32; and Mamba's depthwise causal
// conv1d + SiLU in channels-last layout (torch.ops.compressm_scan.conv_{fwd,bwd}, at the end of this file).
//
// Built lazily by compressm_hf/kernels/__init__.py with torch.utils.cpp_extension and registered as
// torch.ops.compressm_scan.{fwd,bwd}. The Python side converts to the internal layout below and wraps
// both ops in an autograd.Function.
//
// Layouts (float32):
//   u, delta, z, grad_y            : (batch, d, L), any strides (channels-innermost is the fast path)
//   y, du, ddelta, dz              : (batch, d, L), laid out like u, delta, delta, z
//   B, C, dB, dC                   : (batch, L, n) contiguous (states innermost)
//   A, dA                          : (d, n)
//   last_state                     : (batch, d, n)
//   ckpt                           : (batch, nblk, nchunk, n, 16)  state at the start of every chunk
//   moment_weights                 : (batch, L) contiguous, optional (1 = token, 0 = padding)
//   om, ie (forward, want_moments) : (d, n) float64 surrogate moments, see MomentAcc
//
// Math (mamba_ssm's selective_scan_fn): dt = softplus(delta + bias) (or delta + bias),
//   h_t = exp(dt * A) * h_{t-1} + dt * B_t * u_t,  y_t = C_t . h_t + D * u_t,  out = y * silu(z).
//
// Vectorised over 16 channels d (one SIMD vector of floats: AVX-512 zmm, two ymm on AVX2, four NEON
// registers elsewhere), so the cost is proportional to n for every n; the loop over n is scalar
// broadcast of B_t[n], C_t[n]. exp is a Cephes-style polynomial on the vector (no libm calls, no
// -ffast-math needed). The forward keeps the state at the start of every chunk of K steps; the
// backward recomputes one chunk at a time into a small buffer (optionally with exp(dt*A) as well,
// which saves one exp per element) and sweeps it in reverse. The sums over channels that dB and dC
// need are done 16 states at a time with a shuffle tree.
//
// Work split: forward over (batch x channel-blocks); backward over (batch x groups of channel blocks),
// where every group owns its own dB/dC slab (no atomics; the slabs are summed at the end).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

namespace {

constexpr int W = 16;
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));

inline vf splat(float x) {
  vf v = {};
  return v + x;
}

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(vf));
  return v;
}

inline vf loadn(const float* p, int cnt) {
  if (cnt == W) return load(p);
  vf v = {};
  std::memcpy(&v, p, sizeof(float) * cnt);
  return v;
}

inline void storen(float* p, vf v, int cnt) {
  if (cnt == W) {
    std::memcpy(p, &v, sizeof(vf));
  } else {
    std::memcpy(p, &v, sizeof(float) * cnt);
  }
}

// A (batch, channel, time) float32 tensor with arbitrary strides. Channel-contiguous (s1 == 1) is the
// fast path (one vector load); otherwise 16 strided scalar loads (the 16 cache lines stay in L1 over t).
struct View3 {
  float* p = nullptr;
  int64_t sb = 0, s1 = 0, st = 0;
  View3() = default;
  explicit View3(const at::Tensor& t)
      : p(t.data_ptr<float>()), sb(t.stride(0)), s1(t.stride(1)), st(t.stride(2)) {}
  inline float* at(int64_t b, int64_t c, int64_t t) const { return p + b * sb + c * s1 + t * st; }
  inline vf load(int64_t b, int64_t c, int64_t t, int cnt) const {
    const float* q = at(b, c, t);
    if (s1 == 1) return loadn(q, cnt);
    vf v = {};
    for (int j = 0; j < cnt; ++j) v[j] = q[j * s1];
    return v;
  }
  inline void store(int64_t b, int64_t c, int64_t t, vf v, int cnt) const {
    float* q = at(b, c, t);
    if (s1 == 1) {
      storen(q, v, cnt);
      return;
    }
    for (int j = 0; j < cnt; ++j) q[j * s1] = v[j];
  }
};

inline float hsum(vf v) {
#if defined(__GNUC__) && !defined(__clang__)
  const vi s8 = {8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7};
  const vi s4 = {4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11};
  const vi s2 = {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13};
  const vi s1 = {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14};
  v += __builtin_shuffle(v, s8);
  v += __builtin_shuffle(v, s4);
  v += __builtin_shuffle(v, s2);
  v += __builtin_shuffle(v, s1);
  return v[0];
#else
  float s = 0.f;
  for (int j = 0; j < W; ++j) s += v[j];
  return s;
#endif
}

inline vf vmax(vf a, vf b) { return a > b ? a : b; }
inline vf vmin(vf a, vf b) { return a < b ? a : b; }

// exp(x), relative error ~2e-7 for x in [-87, 88] (clamped outside).
inline vf vexp(vf x) {
  x = vmin(vmax(x, splat(-87.0f)), splat(88.0f));
  // k = round(x / ln2), computed as trunc of a positive number (no reliance on rounding modes).
  vi k = __builtin_convertvector(x * 1.44269504088896341f + 128.5f, vi) - 128;
  vf kf = __builtin_convertvector(k, vf);
  vf r = x - kf * 0.693359375f;
  r = r + kf * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  vi bits = (k + 127) << 23;
  return p * (vf)bits;
}

// log(w) for w >= 1 (normal, finite), Cephes logf.
inline vf vlog_ge1(vf w) {
  vi bits = (vi)w;
  vi e = ((bits >> 23) & 0xff) - 126;
  vf m = (vf)((bits & (int32_t)0x807fffff) | (int32_t)0x3f000000);  // m in [0.5, 1)
  vi small = m < 0.70710678118654752f;
  e = e + small;  // small is -1 where true
  vf ef = __builtin_convertvector(e, vf);
  m = small ? (m + m - 1.0f) : (m - 1.0f);
  vf z = m * m;
  vf y = splat(7.0376836292e-2f);
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y - ef * 2.12194440e-4f;
  y = y - 0.5f * z;
  return m + y + ef * 0.693359375f;
}

// softplus(x) = log(1 + exp(x)), torch's threshold 20; sig = d softplus / dx = sigmoid(x).
inline vf vsoftplus(vf x, vf* sig) {
  vf e = vexp(x);
  vf w = 1.0f + e;
  if (sig) *sig = e / w;
  vf sp = vlog_ge1(w);
  sp = x < -15.0f ? e : sp;  // log1p(e) ~= e, where 1 + e rounds to 1
  return x > 20.0f ? x : sp;
}

// out[i] = sum over lanes of v[i], for 16 vectors at once (shuffle tree, ~3 ops per output).
inline vf reduce16(const vf* v) {
#if defined(__GNUC__) && !defined(__clang__)
  const vi m1a = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const vi m1b = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
  const vi m2a = {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27};
  const vi m2b = {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31};
  const vi m3a = {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29};
  const vi m3b = {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31};
  const vi m4a = {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30};
  const vi m4b = {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31};
  vf x[8], y[4], w[2];
  for (int i = 0; i < 8; ++i)
    x[i] = __builtin_shuffle(v[2 * i], v[2 * i + 1], m1a) + __builtin_shuffle(v[2 * i], v[2 * i + 1], m1b);
  // x[i]: lanes 0-7 partials of v[2i], lanes 8-15 partials of v[2i+1]
  for (int i = 0; i < 4; ++i)
    y[i] = __builtin_shuffle(x[2 * i], x[2 * i + 1], m2a) + __builtin_shuffle(x[2 * i], x[2 * i + 1], m2b);
  // y[i]: 4-lane groups = v[4i], v[4i+2], v[4i+1], v[4i+3]
  for (int i = 0; i < 2; ++i)
    w[i] = __builtin_shuffle(y[2 * i], y[2 * i + 1], m3a) + __builtin_shuffle(y[2 * i], y[2 * i + 1], m3b);
  // w[i]: 2-lane groups = v[8i + {0,4,2,6,1,5,3,7}]
  vf r = __builtin_shuffle(w[0], w[1], m4a) + __builtin_shuffle(w[0], w[1], m4b);
  // r[2k] = sum v[p[k]], r[2k+1] = sum v[8 + p[k]], p = {0,4,2,6,1,5,3,7}
  const vi back = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
  return __builtin_shuffle(r, back);
#else
  vf r;
  for (int i = 0; i < W; ++i) r[i] = hsum(v[i]);
  return r;
#endif
}

inline vf silu_and_grad(vf zv, vf* dsilu) {
  vf s = 1.0f / (1.0f + vexp(-zv));
  if (dsilu) *dsilu = s * (1.0f + zv * (1.0f - s));
  return zv * s;
}

struct Dims {
  int64_t Bz, L, D, N, nblk, K, nch;
};

void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "selective_scan_cpu: ", name, " must be float32");
  TORCH_CHECK(t.device().is_cpu(), "selective_scan_cpu: ", name, " must be on the CPU");
}

void check_f32c(const at::Tensor& t, const char* name) {
  check_f32(t, name);
  TORCH_CHECK(t.is_contiguous(), "selective_scan_cpu: ", name, " must be contiguous");
}

const float* opt_ptr(const std::optional<at::Tensor>& t, const char* name) {
  if (!t.has_value() || !t->defined()) return nullptr;
  check_f32c(*t, name);
  return t->data_ptr<float>();
}

bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// (batch, d, L) output laid out like `like`: channels innermost if `like` is, else time innermost.
at::Tensor empty_like_layout(const at::Tensor& like) {
  const int64_t b = like.size(0), d = like.size(1), L = like.size(2);
  if (like.stride(1) == 1 && d > 1) return at::empty({b, L, d}, like.options()).transpose(1, 2);
  return at::empty({b, d, L}, like.options());
}

Dims make_dims(const at::Tensor& u, const at::Tensor& A, int64_t K) {
  TORCH_CHECK(u.dim() == 3 && A.dim() == 2, "selective_scan_cpu: bad ranks");
  TORCH_CHECK(K >= 1, "selective_scan_cpu: chunk must be >= 1");
  Dims d;
  d.Bz = u.size(0);
  d.D = u.size(1);
  d.L = u.size(2);
  d.N = A.size(1);
  TORCH_CHECK(A.size(0) == d.D, "selective_scan_cpu: A must be (d, n)");
  d.nblk = (d.D + W - 1) / W;
  d.K = K;
  d.nch = std::max<int64_t>(1, (d.L + K - 1) / K);
  return d;
}

// A (d, n) -> per block (n) vectors of 16 channels (zero-padded).
std::vector<vf> pack_A(const float* A, const Dims& dm) {
  std::vector<vf> Av(dm.nblk * dm.N);
  for (int64_t blk = 0; blk < dm.nblk; ++blk) {
    for (int64_t n = 0; n < dm.N; ++n) {
      vf v = {};
      for (int j = 0; j < W; ++j) {
        int64_t d = blk * W + j;
        if (d < dm.D) v[j] = A[d * dm.N + n];
      }
      Av[blk * dm.N + n] = v;
    }
  }
  return Av;
}

// Surrogate moments collected on the side of a forward (the averaged LTI surrogate of a Mamba layer):
//   om[d, n] = sum_t w_t * (1 - exp(dt_t * A[d, n]))   (-expm1, accurate also where dt * A is tiny)
//   ie[d, n] = sum_t w_t * (dt_t * u_t)^2 * B_t[n]^2
// Per task (batch row x channel block) in float32 within a chunk of K steps, flushed to float64
// partials at every chunk end.
struct MomentAcc {
  std::vector<vf> om, ie;
  std::vector<double> om64, ie64;
  explicit MomentAcc(int64_t N) : om(N), ie(N), om64(N * W), ie64(N * W) {}
  void reset() {
    std::fill(om.begin(), om.end(), splat(0.f));
    std::fill(ie.begin(), ie.end(), splat(0.f));
    std::fill(om64.begin(), om64.end(), 0.0);
    std::fill(ie64.begin(), ie64.end(), 0.0);
  }
  void flush() {
    for (size_t n = 0; n < om.size(); ++n) {
      for (int j = 0; j < W; ++j) {
        om64[n * W + j] += om[n][j];
        ie64[n * W + j] += ie[n][j];
      }
      om[n] = splat(0.f);
      ie[n] = splat(0.f);
    }
  }
};

// 1 - exp(x) for x <= 0 from x and a = exp(x): the series where 1 - a would cancel.
inline vf one_minus_exp(vf x, vf a) {
  vi tiny = x > -1e-3f;
  return tiny ? -x * (1.0f + 0.5f * x) : 1.0f - a;
}

// One forward task: batch row b, channels d0 .. d0 + cnt. STATS adds the surrogate moments.
template <bool STATS>
inline void fwd_task(int64_t b, int64_t blk, const Dims& dm, const View3& uV, const View3& dlV,
                     const View3& yV, const View3& zV, bool hz, const float* Bp, const float* Cp,
                     const float* Dp, const float* bp, const float* wp, bool softplus, const vf* Ab,
                     std::vector<vf>& h, float* ckp, float* lastp, MomentAcc* acc) {
  const int64_t L = dm.L, D = dm.D, N = dm.N, nblk = dm.nblk, nch = dm.nch, K = dm.K;
  const int64_t d0 = blk * W;
  const int cnt = (int)std::min<int64_t>(W, D - d0);
  const vf Dv = Dp ? loadn(Dp + d0, cnt) : splat(0.f);
  const vf bv = bp ? loadn(bp + d0, cnt) : splat(0.f);
  std::fill(h.begin(), h.end(), splat(0.f));
  if (STATS) acc->reset();
  for (int64_t t = 0; t < L; ++t) {
    if (ckp && t % K == 0) {
      std::memcpy(ckp + (((b * nblk + blk) * nch + t / K) * N) * W, h.data(), sizeof(vf) * N);
    }
    vf x = dlV.load(b, d0, t, cnt) + bv;
    vf dt = softplus ? vsoftplus(x, nullptr) : x;
    vf uv = uV.load(b, d0, t, cnt);
    vf dtu = dt * uv;
    const float* Bt = Bp + (b * L + t) * N;
    const float* Ct = Cp + (b * L + t) * N;
    float wt = 1.f;
    vf drive2 = {};
    if (STATS) {
      wt = wp ? wp[b * L + t] : 1.f;
      drive2 = dtu * dtu * wt;
    }
    vf y0 = Dv * uv, y1 = splat(0.f);
    int64_t n = 0;
    for (; n + 1 < N; n += 2) {
      vf x0 = dt * Ab[n];
      vf x1 = dt * Ab[n + 1];
      vf a0 = vexp(x0);
      vf a1 = vexp(x1);
      vf h0 = a0 * h[n] + dtu * Bt[n];
      vf h1 = a1 * h[n + 1] + dtu * Bt[n + 1];
      h[n] = h0;
      h[n + 1] = h1;
      y0 += h0 * Ct[n];
      y1 += h1 * Ct[n + 1];
      if (STATS) {
        acc->om[n] += one_minus_exp(x0, a0) * wt;
        acc->om[n + 1] += one_minus_exp(x1, a1) * wt;
        acc->ie[n] += drive2 * (Bt[n] * Bt[n]);
        acc->ie[n + 1] += drive2 * (Bt[n + 1] * Bt[n + 1]);
      }
    }
    if (n < N) {
      vf x0 = dt * Ab[n];
      vf a0 = vexp(x0);
      vf h0 = a0 * h[n] + dtu * Bt[n];
      h[n] = h0;
      y0 += h0 * Ct[n];
      if (STATS) {
        acc->om[n] += one_minus_exp(x0, a0) * wt;
        acc->ie[n] += drive2 * (Bt[n] * Bt[n]);
      }
    }
    vf yv = y0 + y1;
    if (hz) yv = yv * silu_and_grad(zV.load(b, d0, t, cnt), nullptr);
    yV.store(b, d0, t, yv, cnt);
    if (STATS && (t % K == K - 1 || t == L - 1)) acc->flush();
  }
  if (lastp) {
    for (int j = 0; j < cnt; ++j)
      for (int64_t m = 0; m < N; ++m) lastp[(b * D + d0 + j) * N + m] = h[m][j];
  }
}

// (Bz, nblk, N, W) float64 partials -> (D, N): summed over the batch, padded channels dropped.
at::Tensor moments_to_dn(const at::Tensor& part, const Dims& dm) {
  return part.sum(0).permute({0, 2, 1}).reshape({dm.nblk * W, dm.N}).narrow(0, 0, dm.D).contiguous();
}

// Returns y, last state, checkpoints, and (when want_moments) the moments om and ie, (d, n) float64.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> scan_fwd(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& Bm,
    const at::Tensor& Cm, const std::optional<at::Tensor>& Dopt, const std::optional<at::Tensor>& zopt,
    const std::optional<at::Tensor>& biasopt, bool softplus, bool want_last, bool save_ckpt, int64_t K,
    bool want_moments, const std::optional<at::Tensor>& wopt) {
  check_f32(u, "u");
  check_f32(delta, "delta");
  check_f32c(A, "A");
  check_f32c(Bm, "B");
  check_f32c(Cm, "C");
  if (has(zopt)) check_f32(*zopt, "z");
  const Dims dm = make_dims(u, A, K);
  const int64_t Bz = dm.Bz, L = dm.L, D = dm.D, N = dm.N, nblk = dm.nblk, nch = dm.nch;
  TORCH_CHECK(delta.sizes() == u.sizes(), "selective_scan_cpu: delta shape");
  TORCH_CHECK(Bm.size(0) == Bz && Bm.size(1) == L && Bm.size(2) == N, "selective_scan_cpu: B shape");
  TORCH_CHECK(Cm.sizes() == Bm.sizes(), "selective_scan_cpu: C shape");
  const float* Dp = opt_ptr(Dopt, "D");
  const bool hz = has(zopt);
  TORCH_CHECK(!hz || zopt->sizes() == u.sizes(), "selective_scan_cpu: z shape");
  const float* bp = opt_ptr(biasopt, "delta_bias");
  const float* wp = want_moments ? opt_ptr(wopt, "moment_weights") : nullptr;
  TORCH_CHECK(!wp || (wopt->dim() == 2 && wopt->size(0) == Bz && wopt->size(1) == L),
              "selective_scan_cpu: moment_weights must be (batch, L)");

  auto opts = u.options();
  at::Tensor y = empty_like_layout(u);
  at::Tensor last = want_last ? at::empty({Bz, D, N}, opts) : at::empty({0}, opts);
  at::Tensor ckpt = save_ckpt ? at::empty({Bz, nblk, nch, N, W}, opts) : at::empty({0}, opts);
  auto dopts = opts.dtype(at::kDouble);
  at::Tensor om_part = want_moments ? at::zeros({Bz, nblk, N, W}, dopts) : at::empty({0}, dopts);
  at::Tensor ie_part = want_moments ? at::zeros({Bz, nblk, N, W}, dopts) : at::empty({0}, dopts);
  auto moments = [&]() -> std::pair<at::Tensor, at::Tensor> {
    if (!want_moments) return {om_part, ie_part};
    return {moments_to_dn(om_part, dm), moments_to_dn(ie_part, dm)};
  };
  if (Bz == 0 || D == 0) {
    if (want_last) last.zero_();
    auto [om, ie] = moments();
    return {y, last, ckpt, om, ie};
  }

  const View3 uV(u), dlV(delta), yV(y);
  const View3 zV = hz ? View3(*zopt) : View3();
  const float* Bp = Bm.data_ptr<float>();
  const float* Cp = Cm.data_ptr<float>();
  float* lastp = want_last ? last.data_ptr<float>() : nullptr;
  float* ckp = save_ckpt ? ckpt.data_ptr<float>() : nullptr;
  double* omp = want_moments ? om_part.data_ptr<double>() : nullptr;
  double* iep = want_moments ? ie_part.data_ptr<double>() : nullptr;
  const std::vector<vf> Av = pack_A(A.data_ptr<float>(), dm);

  at::parallel_for(0, Bz * nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<vf> h(N);
    MomentAcc acc(want_moments ? N : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nblk, blk = task % nblk;
      const vf* Ab = Av.data() + blk * N;
      if (want_moments) {
        fwd_task<true>(b, blk, dm, uV, dlV, yV, zV, hz, Bp, Cp, Dp, bp, wp, softplus, Ab, h, ckp, lastp, &acc);
        std::memcpy(omp + task * N * W, acc.om64.data(), sizeof(double) * N * W);
        std::memcpy(iep + task * N * W, acc.ie64.data(), sizeof(double) * N * W);
      } else {
        fwd_task<false>(b, blk, dm, uV, dlV, yV, zV, hz, Bp, Cp, Dp, bp, wp, softplus, Ab, h, ckp, lastp,
                        nullptr);
      }
    }
  });
  auto [om, ie] = moments();
  return {y, last, ckpt, om, ie};
}

std::vector<at::Tensor> scan_bwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                 const at::Tensor& Bm, const at::Tensor& Cm, const std::optional<at::Tensor>& Dopt,
                                 const std::optional<at::Tensor>& zopt, const std::optional<at::Tensor>& biasopt,
                                 bool softplus, const at::Tensor& ckpt, const at::Tensor& gy,
                                 const std::optional<at::Tensor>& glastopt, int64_t K, bool store_dA,
                                 int64_t groups) {
  check_f32(u, "u");
  check_f32(delta, "delta");
  check_f32c(A, "A");
  check_f32c(Bm, "B");
  check_f32c(Cm, "C");
  check_f32c(ckpt, "ckpt");
  check_f32(gy, "grad_y");
  if (has(zopt)) check_f32(*zopt, "z");
  const Dims dm = make_dims(u, A, K);
  const int64_t Bz = dm.Bz, L = dm.L, D = dm.D, N = dm.N, nblk = dm.nblk, nch = dm.nch;
  TORCH_CHECK(ckpt.numel() == Bz * nblk * nch * N * W, "selective_scan_cpu: checkpoint shape");
  TORCH_CHECK(gy.sizes() == u.sizes(), "selective_scan_cpu: grad_y shape");
  TORCH_CHECK(delta.sizes() == u.sizes(), "selective_scan_cpu: delta shape");
  const bool hz = has(zopt);
  TORCH_CHECK(!hz || zopt->sizes() == u.sizes(), "selective_scan_cpu: z shape");
  const float* Dp = opt_ptr(Dopt, "D");
  const float* bp = opt_ptr(biasopt, "delta_bias");
  const float* glp = opt_ptr(glastopt, "grad_last_state");

  const int64_t G = std::max<int64_t>(1, std::min<int64_t>(groups, nblk));
  const int64_t bpg = (nblk + G - 1) / G;  // blocks per group
  auto opts = u.options();
  at::Tensor du = empty_like_layout(u);
  at::Tensor ddelta = empty_like_layout(delta);
  at::Tensor dz = hz ? empty_like_layout(*zopt) : at::empty({0}, opts);
  at::Tensor dBg = at::zeros({G, Bz, L, N}, opts);
  at::Tensor dCg = at::zeros({G, Bz, L, N}, opts);
  at::Tensor dA_part = at::zeros({Bz, nblk, N, W}, opts);
  at::Tensor dD_part = at::zeros({Bz, nblk, W}, opts);

  const View3 uV(u), dlV(delta), gyV(gy), duV(du), ddV(ddelta);
  const View3 zV = hz ? View3(*zopt) : View3(), dzV = hz ? View3(dz) : View3();
  const float* Bp = Bm.data_ptr<float>();
  const float* Cp = Cm.data_ptr<float>();
  const float* ckp = ckpt.data_ptr<float>();
  float* dBgp = dBg.data_ptr<float>();
  float* dCgp = dCg.data_ptr<float>();
  float* dAp = dA_part.data_ptr<float>();
  float* dDp = dD_part.data_ptr<float>();
  const std::vector<vf> Av = pack_A(A.data_ptr<float>(), dm);

  at::parallel_for(0, Bz * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<vf> H((K + 1) * N), abuf(store_dA ? K * N : 0), dh(N), dAacc(N);
    std::vector<vf> dtb(K), sigb(K), ub(K), dyb(K);
    vf tb[W], tc[W];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / G, g = task % G;
      float* dBrow0 = dBgp + (g * Bz + b) * L * N;
      float* dCrow0 = dCgp + (g * Bz + b) * L * N;
      for (int64_t blk = g * bpg; blk < std::min<int64_t>(nblk, (g + 1) * bpg); ++blk) {
        const int64_t d0 = blk * W;
        const int cnt = (int)std::min<int64_t>(W, D - d0);
        const vf* Ab = Av.data() + blk * N;
        const vf Dv = Dp ? loadn(Dp + d0, cnt) : splat(0.f);
        const vf bv = bp ? loadn(bp + d0, cnt) : splat(0.f);
        for (int64_t n = 0; n < N; ++n) {
          vf v = {};
          if (glp)
            for (int j = 0; j < cnt; ++j) v[j] = glp[(b * D + d0 + j) * N + n];
          dh[n] = v;
          dAacc[n] = splat(0.f);
        }
        vf dDacc = splat(0.f);
        for (int64_t c = nch - 1; c >= 0; --c) {
          const int64_t t0 = c * K, t1 = std::min<int64_t>(L, t0 + K);
          // ---- recompute the chunk: H[0] = state before t0, H[tt+1] = state after t0+tt
          std::memcpy(H.data(), ckp + (((b * nblk + blk) * nch + c) * N) * W, sizeof(vf) * N);
          for (int64_t t = t0; t < t1; ++t) {
            const int64_t tt = t - t0;
            vf x = dlV.load(b, d0, t, cnt) + bv;
            vf sig = splat(1.f);
            vf dt = softplus ? vsoftplus(x, &sig) : x;
            vf uv = uV.load(b, d0, t, cnt);
            vf dtu = dt * uv;
            dtb[tt] = dt;
            sigb[tt] = sig;
            ub[tt] = uv;
            const float* Bt = Bp + (b * L + t) * N;
            const float* Ct = Cp + (b * L + t) * N;
            const vf* hp = H.data() + tt * N;
            vf* hn = H.data() + (tt + 1) * N;
            vf gv = gyV.load(b, d0, t, cnt);
            if (hz) {
              vf y0 = Dv * uv, y1 = splat(0.f);
              int64_t n = 0;
              for (; n + 1 < N; n += 2) {
                vf a0 = vexp(dt * Ab[n]);
                vf a1 = vexp(dt * Ab[n + 1]);
                if (store_dA) {
                  abuf[tt * N + n] = a0;
                  abuf[tt * N + n + 1] = a1;
                }
                vf h0 = a0 * hp[n] + dtu * Bt[n];
                vf h1 = a1 * hp[n + 1] + dtu * Bt[n + 1];
                hn[n] = h0;
                hn[n + 1] = h1;
                y0 += h0 * Ct[n];
                y1 += h1 * Ct[n + 1];
              }
              if (n < N) {
                vf a0 = vexp(dt * Ab[n]);
                if (store_dA) abuf[tt * N + n] = a0;
                vf h0 = a0 * hp[n] + dtu * Bt[n];
                hn[n] = h0;
                y0 += h0 * Ct[n];
              }
              vf yv = y0 + y1;
              vf zv = zV.load(b, d0, t, cnt);
              vf dsilu;
              vf sl = silu_and_grad(zv, &dsilu);
              dzV.store(b, d0, t, gv * yv * dsilu, cnt);
              gv = gv * sl;
            } else {
              for (int64_t n = 0; n < N; ++n) {
                vf a0 = vexp(dt * Ab[n]);
                if (store_dA) abuf[tt * N + n] = a0;
                hn[n] = a0 * hp[n] + dtu * Bt[n];
              }
            }
            dyb[tt] = gv;
            dDacc += gv * uv;
          }
          // ---- reverse sweep
          for (int64_t t = t1 - 1; t >= t0; --t) {
            const int64_t tt = t - t0;
            const vf dy = dyb[tt], dt = dtb[tt], uv = ub[tt];
            const vf dtu = dt * uv;
            const float* Bt = Bp + (b * L + t) * N;
            const float* Ct = Cp + (b * L + t) * N;
            float* dBt = dBrow0 + t * N;
            float* dCt = dCrow0 + t * N;
            const vf* hp = H.data() + tt * N;
            const vf* hc = H.data() + (tt + 1) * N;
            const vf* at = store_dA ? abuf.data() + tt * N : nullptr;
            vf ddt0 = splat(0.f), ddt1 = splat(0.f), ds0 = splat(0.f), ds1 = splat(0.f);
            int64_t n = 0;
            for (; n + W <= N; n += W) {
              for (int i = 0; i < W; i += 2) {
                const int64_t m = n + i;
                vf g0 = dh[m] + dy * Ct[m];
                vf g1 = dh[m + 1] + dy * Ct[m + 1];
                tc[i] = dy * hc[m];
                tc[i + 1] = dy * hc[m + 1];
                vf a0 = at ? at[m] : vexp(dt * Ab[m]);
                vf a1 = at ? at[m + 1] : vexp(dt * Ab[m + 1]);
                vf s0 = g0 * hp[m] * a0;
                vf s1 = g1 * hp[m + 1] * a1;
                dAacc[m] += s0 * dt;
                dAacc[m + 1] += s1 * dt;
                ddt0 += s0 * Ab[m];
                ddt1 += s1 * Ab[m + 1];
                tb[i] = g0 * dtu;
                tb[i + 1] = g1 * dtu;
                ds0 += g0 * Bt[m];
                ds1 += g1 * Bt[m + 1];
                dh[m] = g0 * a0;
                dh[m + 1] = g1 * a1;
              }
              vf rb = reduce16(tb) + load(dBt + n);
              vf rc = reduce16(tc) + load(dCt + n);
              std::memcpy(dBt + n, &rb, sizeof(vf));
              std::memcpy(dCt + n, &rc, sizeof(vf));
            }
            for (; n < N; ++n) {
              vf g0 = dh[n] + dy * Ct[n];
              dCt[n] += hsum(dy * hc[n]);
              vf a0 = at ? at[n] : vexp(dt * Ab[n]);
              vf s0 = g0 * hp[n] * a0;
              dAacc[n] += s0 * dt;
              ddt0 += s0 * Ab[n];
              dBt[n] += hsum(g0 * dtu);
              ds0 += g0 * Bt[n];
              dh[n] = g0 * a0;
            }
            const vf dsum = ds0 + ds1;
            const vf ddt = ddt0 + ddt1 + dsum * uv;
            duV.store(b, d0, t, dsum * dt + dy * Dv, cnt);
            ddV.store(b, d0, t, ddt * sigb[tt], cnt);
          }
        }
        std::memcpy(dAp + ((b * nblk + blk) * N) * W, dAacc.data(), sizeof(vf) * N);
        std::memcpy(dDp + (b * nblk + blk) * W, &dDacc, sizeof(vf));
      }
    }
  });

  at::Tensor dB = G == 1 ? dBg[0] : dBg.sum(0);
  at::Tensor dC = G == 1 ? dCg[0] : dCg.sum(0);
  // (Bz, nblk, N, W) -> (nblk*W, N) -> (D, N)
  at::Tensor dA = dA_part.sum(0).permute({0, 2, 1}).reshape({nblk * W, N}).narrow(0, 0, D).contiguous();
  at::Tensor dD = Dp ? dD_part.sum(0).reshape({nblk * W}).narrow(0, 0, D).contiguous() : at::empty({0}, opts);
  return {du, ddelta, dA, dB, dC, dD, dz};
}


// ---------------------------------------------------------------------------------------------------
// Depthwise causal conv1d (+ optional SiLU) in channels-last layout, forward and backward, float32:
//   x, y, gy, dx : (batch, L, d) with channels contiguous (stride(2) == 1), any batch/time strides
//   w            : (K, d) contiguous (the (d, K) weight transposed), bias: (d,) or none
//   pre[t, c] = bias[c] + sum_k w[k, c] * x[t - K + 1 + k, c]   (x = 0 before t = 0)
//   y = silu(pre) if silu else pre
// Vectorised over 16 channels; parallel over batch rows. The backward recomputes pre.
// ---------------------------------------------------------------------------------------------------
struct View3cl {
  float* p = nullptr;
  int64_t sb = 0, st = 0;
  View3cl() = default;
  explicit View3cl(const at::Tensor& t) : p(t.data_ptr<float>()), sb(t.stride(0)), st(t.stride(1)) {
    TORCH_CHECK(t.stride(2) == 1 || t.size(2) <= 1, "causal_conv1d_cpu: channels must be contiguous");
  }
  inline float* at(int64_t b, int64_t t) const { return p + b * sb + t * st; }
};

inline vf conv_pre(const View3cl& xV, int64_t b, int64_t t, int64_t c0, int cnt, const float* wp, int64_t D,
                   int64_t K, vf bias) {
  vf acc = bias;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t s = t - K + 1 + k;
    if (s < 0) continue;
    acc += loadn(wp + k * D + c0, cnt) * loadn(xV.at(b, s) + c0, cnt);
  }
  return acc;
}

at::Tensor conv_fwd(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& biasopt, bool silu) {
  check_f32(x, "x");
  check_f32c(w, "weight");
  TORCH_CHECK(x.dim() == 3 && w.dim() == 2 && w.size(1) == x.size(2), "causal_conv1d_cpu: bad shapes");
  const int64_t Bz = x.size(0), L = x.size(1), D = x.size(2), K = w.size(0);
  const float* bp = opt_ptr(biasopt, "bias");
  at::Tensor y = at::empty({Bz, L, D}, x.options());
  if (y.numel() == 0) return y;
  const View3cl xV(x), yV(y);
  const float* wp = w.data_ptr<float>();
  at::parallel_for(0, Bz * L, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / L, t = i % L;
      for (int64_t c0 = 0; c0 < D; c0 += W) {
        const int cnt = (int)std::min<int64_t>(W, D - c0);
        vf pre = conv_pre(xV, b, t, c0, cnt, wp, D, K, bp ? loadn(bp + c0, cnt) : splat(0.f));
        storen(yV.at(b, t) + c0, silu ? silu_and_grad(pre, nullptr) : pre, cnt);
      }
    }
  });
  return y;
}

// Returns dx (batch, L, d), dw (K, d), dbias (d,) (empty without bias).
std::vector<at::Tensor> conv_bwd(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& biasopt,
                                 bool silu, const at::Tensor& gy) {
  check_f32(x, "x");
  check_f32c(w, "weight");
  check_f32(gy, "grad_y");
  TORCH_CHECK(gy.sizes() == x.sizes(), "causal_conv1d_cpu: grad_y shape");
  const int64_t Bz = x.size(0), L = x.size(1), D = x.size(2), K = w.size(0);
  const float* bp = opt_ptr(biasopt, "bias");
  auto opts = x.options();
  at::Tensor dx = at::empty({Bz, L, D}, opts);
  at::Tensor dw_part = at::zeros({Bz, K, D}, opts);
  at::Tensor db_part = at::zeros({Bz, D}, opts);
  if (x.numel() > 0) {
    const View3cl xV(x), gV(gy), dxV(dx);
    const float* wp = w.data_ptr<float>();
    float* dwp = dw_part.data_ptr<float>();
    float* dbp = db_part.data_ptr<float>();
    at::parallel_for(0, Bz, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> g(L * D);  // d loss / d pre of one batch row
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t t = 0; t < L; ++t) {
          for (int64_t c0 = 0; c0 < D; c0 += W) {
            const int cnt = (int)std::min<int64_t>(W, D - c0);
            vf gv = loadn(gV.at(b, t) + c0, cnt);
            if (silu) {
              vf pre = conv_pre(xV, b, t, c0, cnt, wp, D, K, bp ? loadn(bp + c0, cnt) : splat(0.f));
              vf ds;
              silu_and_grad(pre, &ds);
              gv = gv * ds;
            }
            storen(g.data() + t * D + c0, gv, cnt);
          }
        }
        float* dwb = dwp + b * K * D;
        float* dbb = dbp + b * D;
        for (int64_t s = 0; s < L; ++s) {
          for (int64_t c0 = 0; c0 < D; c0 += W) {
            const int cnt = (int)std::min<int64_t>(W, D - c0);
            const vf xv = loadn(xV.at(b, s) + c0, cnt);
            vf acc = splat(0.f);
            for (int64_t k = 0; k < K; ++k) {
              const int64_t t = s + K - 1 - k;  // output that reads x[s] through tap k
              if (t >= L) continue;
              const vf gt = loadn(g.data() + t * D + c0, cnt);
              acc += loadn(wp + k * D + c0, cnt) * gt;
              storen(dwb + k * D + c0, loadn(dwb + k * D + c0, cnt) + gt * xv, cnt);
            }
            storen(dxV.at(b, s) + c0, acc, cnt);
            storen(dbb + c0, loadn(dbb + c0, cnt) + loadn(g.data() + s * D + c0, cnt), cnt);
          }
        }
      }
    });
  }
  at::Tensor db = bp ? db_part.sum(0) : at::empty({0}, opts);
  return {dx, dw_part.sum(0), db};
}

}  // namespace

TORCH_LIBRARY(compressm_scan, m) {
  m.def(
      "fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
      "bool softplus, bool want_last, bool save_ckpt, int chunk, bool want_moments, Tensor? moment_weights) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "bwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
      "bool softplus, Tensor ckpt, Tensor grad_y, Tensor? grad_last, int chunk, bool store_dA, int groups) "
      "-> Tensor[]");
  m.def("conv_fwd(Tensor x, Tensor w, Tensor? bias, bool silu) -> Tensor");
  m.def("conv_bwd(Tensor x, Tensor w, Tensor? bias, bool silu, Tensor grad_y) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(compressm_scan, CPU, m) {
  m.impl("fwd", &scan_fwd);
  m.impl("bwd", &scan_bwd);
  m.impl("conv_fwd", &conv_fwd);
  m.impl("conv_bwd", &conv_bwd);
}
