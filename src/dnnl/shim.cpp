// The part of oneDNN (2.x C++ API, dnnl.hpp) that locograph calls, behind a C ABI that Rust
// binds without knowing oneDNN's structs. Each convolution geometry gets its primitives built
// once (forward, backward data, backward weights) and cached; every call wraps the caller's
// NCHW or NHWC activations and OIHW kernels, reorders them to the layouts the primitives use when
// those differ, and runs with a scratchpad the caller-visible size of which is known
// (`lg_dnnl_conv_scratch`). Primitives whose output is NHWC compute in NHWC themselves (no
// activation reorders); those with an NCHW output keep oneDNN's own choice (blocked layouts).
#include <dnnl.hpp>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include <omp.h>

using namespace dnnl;
using tag = memory::format_tag;
using dt = memory::data_type;

namespace {

engine& eng() {
  static engine e(engine::kind::cpu, 0);
  return e;
}

thread_local std::string last_error;

// n, c, h, w, o, kh, kw, stride, padding, groups, dtype (0 f32, 1 bf16), order of x and of y
// (0 NCHW, 1 NHWC)
using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int,
                       int, int>;

struct Conv {
  memory::desc x, w, y, dw;  // the caller's layouts (`dw` f32 whatever the inputs are)
  convolution_forward::primitive_desc fwd;
  convolution_backward_data::primitive_desc bwd_data;
  convolution_backward_weights::primitive_desc bwd_weights;
  convolution_forward fwd_p;
  convolution_backward_data bwd_data_p;
  convolution_backward_weights bwd_weights_p;
  // A 1×1 stride-1 bf16 convolution on NHWC buffers computes both gradients as matmuls where
  // oneDNN's matmul is an AMX one, reading the buffers and the OIHW kernel as they are (no
  // reorders): dw[o, c] = dyᵀ[o, n·h·w] · x[n·h·w, c] and dx[n·h·w, c] = dy[n·h·w, o] · w[o, c].
  // On one core (batch 16; ResNet-50's 1×1 layers, 64–2048 channels, 7²–56²) oneDNN 2.6's AMX
  // backward-weights kernel reaches 140–500 GFLOP/s, the matmul 650–1090; its backward-data
  // kernel takes 1.1–1.5× the matmul's time before its kernel reorder. Its forward 1×1 kernel is
  // faster than the matmul, and in f32 matmul and convolution are at parity: those stay.
  bool by_matmul = false;
  matmul::primitive_desc mm, mm_data;
  matmul mm_p, mm_data_p;
  std::string mm_name, mm_data_name;
};

Conv build(const Key& k, bool block16) {
  auto [n, c, h, w, o, kh, kw, s, p, g, d, xo, yo] = k;
  dt type = d == 1 ? dt::bf16 : dt::f32;
  int64_t oh = (h + 2 * p - kh) / s + 1, ow = (w + 2 * p - kw) / s + 1;
  memory::dims xd{n, c, h, w}, yd{n, o, oh, ow}, st{s, s}, pad{p, p};
  memory::dims wd = g == 1 ? memory::dims{o, c, kh, kw} : memory::dims{g, o / g, c / g, kh, kw};
  tag wtag = g == 1 ? tag::oihw : tag::goihw;
  auto user = [&](int order) { return block16 ? tag::nChw16c : order == 1 ? tag::nhwc : tag::nchw; };
  tag act = yo == 1 ? (block16 ? tag::nChw16c : tag::nhwc) : tag::any;
  memory::desc ux(xd, type, user(xo)), uw(wd, type, wtag), uy(yd, type, user(yo)), udw(wd, dt::f32, wtag);
  memory::desc ax(xd, type, act), aw(wd, type, tag::any), ay(yd, type, act);
  primitive_attr attr;
  attr.set_scratchpad_mode(scratchpad_mode::user);
  auto fd = convolution_forward::desc(prop_kind::forward_training, algorithm::convolution_direct, ax, aw, ay, st, pad,
                                      pad);
  convolution_forward::primitive_desc fpd(fd, attr, eng());
  auto bdd = convolution_backward_data::desc(algorithm::convolution_direct, ax, aw, ay, st, pad, pad);
  convolution_backward_data::primitive_desc bdpd(bdd, attr, eng(), fpd);
  // f32 kernel gradients: oneDNN accumulates in f32; the caller sums chunks and rounds once.
  memory::desc adw(wd, dt::f32, tag::any);
  auto bwd = convolution_backward_weights::desc(algorithm::convolution_direct, ax, adw, ay, st, pad, pad);
  convolution_backward_weights::primitive_desc bwpd(bwd, attr, eng(), fpd);
  Conv conv{ux, uw, uy, udw, fpd, bdpd, bwpd, convolution_forward(fpd), convolution_backward_data(bdpd),
            convolution_backward_weights(bwpd)};
  if (kh == 1 && kw == 1 && s == 1 && p == 0 && g == 1 && xo == 1 && yo == 1 && type == dt::bf16) {
    int64_t rows = n * h * w;
    memory::desc a({o, rows}, type, tag::ba), b({rows, c}, type, tag::ab), out({o, c}, dt::f32, tag::ab);
    matmul::primitive_desc mpd(matmul::desc(a, b, out), attr, eng());
    memory::desc dy({rows, o}, type, tag::ab), w({o, c}, type, tag::ab), dx({rows, c}, type, tag::ab);
    matmul::primitive_desc dpd(matmul::desc(dy, w, dx), attr, eng());
    if (std::strstr(mpd.impl_info_str(), "amx") && std::strstr(dpd.impl_info_str(), "amx")) {
      conv.by_matmul = true;
      conv.mm = mpd, conv.mm_data = dpd;
      conv.mm_p = matmul(mpd), conv.mm_data_p = matmul(dpd);
      conv.mm_name = std::string("matmul ") + mpd.impl_info_str();
      conv.mm_data_name = std::string("matmul ") + dpd.impl_info_str();
    }
  }
  return conv;
}

bool amx(const Conv& c) {
  auto has = [](const char* s) { return std::strstr(s, "amx") != nullptr; };
  return has(c.fwd.impl_info_str()) && has(c.bwd_data.impl_info_str()) && has(c.bwd_weights.impl_info_str());
}

Conv build(const Key& k) {
  auto [n, c, h, w, o, kh, kw, s, p, g, d, xo, yo] = k;
  // A 16-channel NHWC map is byte for byte nChw16c. Without AMX, oneDNN 2.6's blocked bf16
  // kernels are faster there than its NHWC ones (16 → 16 channels at 28², 128 images, the three
  // passes: 6.6 against 9.1 ms on AVX512-BF16); with AMX its NHWC kernels are AMX ones and the
  // blocked ones are not (3.1 against 13 ms). The choice depends only on the CPU, so a run's
  // kernels, and its bits, are the same every time on one machine.
  bool candidate = xo == 1 && yo == 1 && c == 16 && o == 16 && g == 1 && d == 1;
  if (!candidate) return build(k, false);
  Conv nhwc = build(k, false);
  return amx(nhwc) ? nhwc : build(k, true);
}

std::mutex cache_lock;
std::map<Key, std::shared_ptr<Conv>>& cache() {
  static std::map<Key, std::shared_ptr<Conv>> m;
  return m;
}

// `d`: bits 0–1 the dtype, bit 2 x's order, bit 3 y's order (what the Rust side packs).
std::shared_ptr<Conv> get(const int64_t* g, int d) {
  Key k{g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9], d & 3, (d >> 2) & 1, (d >> 3) & 1};
  std::lock_guard<std::mutex> lock(cache_lock);
  auto& m = cache();
  auto it = m.find(k);
  if (it != m.end()) return it->second;
  auto conv = std::make_shared<Conv>(build(k));
  m.emplace(k, conv);
  return conv;
}

// The caller's buffer as `want`: itself when the layouts agree, else a reordered copy.
memory as(stream& s, const memory::desc& have, const void* ptr, const memory::desc& want) {
  memory user(have, eng(), const_cast<void*>(ptr));
  if (have == want) return user;
  memory m(want, eng());
  reorder(user, m).execute(s, user, m);
  return m;
}

// A result buffer in `want`, and the reorder into the caller's `have` after the primitive ran.
struct Out {
  memory user, m;
  bool copy;
  Out(const memory::desc& have, void* ptr, const memory::desc& want)
      : user(have, eng(), ptr), m(have == want ? user : memory(want, eng())), copy(!(have == want)) {}
  void finish(stream& s) {
    if (copy) reorder(m, user).execute(s, m, user);
  }
};

// out = a · b through one of a 1×1 convolution's matmuls, on the caller's buffers as they are.
void run_matmul(stream& s, const matmul::primitive_desc& pd, const matmul& p, const void* a, const void* b, void* out) {
  memory am(pd.src_desc(), eng(), const_cast<void*>(a)), bm(pd.weights_desc(), eng(), const_cast<void*>(b));
  memory om(pd.dst_desc(), eng(), out), scratch(pd.scratchpad_desc(), eng());
  p.execute(s, {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm}, {DNNL_ARG_DST, om}, {DNNL_ARG_SCRATCHPAD, scratch}});
  s.wait();
}

template <class F>
int guard(F f) {
  try {
    f();
    return 0;
  } catch (const dnnl::error& e) {
    last_error = std::string(e.what()) + " (status " + std::to_string(int(e.status)) + ")";
  } catch (const std::exception& e) {
    last_error = e.what();
  }
  return 1;
}

void copy_str(const char* from, char* to, size_t len) {
  if (len == 0) return;
  std::strncpy(to, from, len - 1);
  to[len - 1] = 0;
}

}  // namespace

extern "C" {

// The error text of this thread's last failed call.
void lg_dnnl_last_error(char* buf, size_t len) { copy_str(last_error.c_str(), buf, len); }

// oneDNN's version as major * 10000 + minor * 100 + patch.
int lg_dnnl_version() {
  auto v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}

// OpenMP threads oneDNN runs on (Debian's oneDNN threads with OpenMP, not with rayon).
void lg_dnnl_set_threads(int n) { omp_set_num_threads(n); }

// The kernels oneDNN picked for one geometry (`pass` 0 forward, 1 backward data, 2 backward
// weights), e.g. "brgconv:avx512_core_amx_bf16": the ISA is in the name.
int lg_dnnl_conv_impl(const int64_t* geom, int dtype, int pass, char* buf, size_t len) {
  return guard([&] {
    auto c = get(geom, dtype);
    const char* s = pass == 0      ? c->fwd.impl_info_str()
                    : c->by_matmul ? (pass == 1 ? c->mm_data_name : c->mm_name).c_str()
                    : pass == 1    ? c->bwd_data.impl_info_str()
                                   : c->bwd_weights.impl_info_str();
    copy_str(s, buf, len);
  });
}

// Bytes of scratchpad plus the blocked copies one pass allocates beside the caller's buffers.
int lg_dnnl_conv_scratch(const int64_t* geom, int dtype, int pass, size_t* bytes) {
  return guard([&] {
    auto c = get(geom, dtype);
    size_t b = 0;
    auto extra = [&](const memory::desc& have, const memory::desc& want) {
      if (!(have == want)) b += want.get_size();
    };
    if (pass == 0) {
      b += c->fwd.scratchpad_desc().get_size();
      extra(c->x, c->fwd.src_desc()), extra(c->w, c->fwd.weights_desc()), extra(c->y, c->fwd.dst_desc());
    } else if (pass == 1 && c->by_matmul) {
      b += c->mm_data.scratchpad_desc().get_size();
    } else if (pass == 1) {
      b += c->bwd_data.scratchpad_desc().get_size();
      extra(c->y, c->bwd_data.diff_dst_desc()), extra(c->w, c->bwd_data.weights_desc());
      extra(c->x, c->bwd_data.diff_src_desc());
    } else if (c->by_matmul) {
      b += c->mm.scratchpad_desc().get_size();
    } else {
      b += c->bwd_weights.scratchpad_desc().get_size();
      extra(c->x, c->bwd_weights.src_desc()), extra(c->y, c->bwd_weights.diff_dst_desc());
      extra(c->dw, c->bwd_weights.diff_weights_desc());
    }
    *bytes = b;
  });
}

// y = x ⋆ w (NCHW, OIHW / GOIHW as [O, C/g, kh, kw]).
int lg_dnnl_conv_forward(const int64_t* geom, int dtype, const void* x, const void* w, void* y) {
  return guard([&] {
    auto c = get(geom, dtype);
    stream s(eng());
    memory xm = as(s, c->x, x, c->fwd.src_desc()), wm = as(s, c->w, w, c->fwd.weights_desc());
    Out ym(c->y, y, c->fwd.dst_desc());
    memory scratch(c->fwd.scratchpad_desc(), eng());
    c->fwd_p.execute(s, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_WEIGHTS, wm}, {DNNL_ARG_DST, ym.m}, {DNNL_ARG_SCRATCHPAD, scratch}});
    ym.finish(s);
    s.wait();
  });
}

// dx from dy and w.
int lg_dnnl_conv_backward_data(const int64_t* geom, int dtype, const void* dy, const void* w, void* dx) {
  return guard([&] {
    auto c = get(geom, dtype);
    stream s(eng());
    if (c->by_matmul) return run_matmul(s, c->mm_data, c->mm_data_p, dy, w, dx);
    auto& pd = c->bwd_data;
    memory dym = as(s, c->y, dy, pd.diff_dst_desc()), wm = as(s, c->w, w, pd.weights_desc());
    Out dxm(c->x, dx, pd.diff_src_desc());
    memory scratch(pd.scratchpad_desc(), eng());
    c->bwd_data_p.execute(
        s, {{DNNL_ARG_DIFF_DST, dym}, {DNNL_ARG_WEIGHTS, wm}, {DNNL_ARG_DIFF_SRC, dxm.m}, {DNNL_ARG_SCRATCHPAD, scratch}});
    dxm.finish(s);
    s.wait();
  });
}

// The machine's convolution peak: seconds of the best of `rounds` runs of forward, backward
// data and backward weights of `geom` on buffers already in oneDNN's chosen layouts (no
// reorders), on `threads` OpenMP threads.
int lg_dnnl_conv_peak(const int64_t* geom, int dtype, int threads, int rounds, double* seconds) {
  return guard([&] {
    omp_set_num_threads(threads);
    auto c = get(geom, dtype);
    stream s(eng());
    memory x(c->fwd.src_desc(), eng()), w(c->fwd.weights_desc(), eng()), y(c->fwd.dst_desc(), eng());
    memory dx(c->bwd_data.diff_src_desc(), eng()), dw(c->bwd_weights.diff_weights_desc(), eng());
    memory s1(c->fwd.scratchpad_desc(), eng()), s2(c->bwd_data.scratchpad_desc(), eng()),
        s3(c->bwd_weights.scratchpad_desc(), eng());
    for (auto* m : {&x, &w, &y}) std::memset(m->get_data_handle(), 0, m->get_desc().get_size());
    double best = 1e30;
    for (int r = 0; r <= rounds; r++) {  // the first run is a warm-up
      auto t0 = std::chrono::steady_clock::now();
      c->fwd_p.execute(s, {{DNNL_ARG_SRC, x}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_DST, y}, {DNNL_ARG_SCRATCHPAD, s1}});
      c->bwd_data_p.execute(s, {{DNNL_ARG_DIFF_DST, y}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_DIFF_SRC, dx}, {DNNL_ARG_SCRATCHPAD, s2}});
      c->bwd_weights_p.execute(s, {{DNNL_ARG_SRC, x}, {DNNL_ARG_DIFF_DST, y}, {DNNL_ARG_DIFF_WEIGHTS, dw}, {DNNL_ARG_SCRATCHPAD, s3}});
      s.wait();
      double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (r > 0 && t < best) best = t;
    }
    *seconds = best;
  });
}

// dw (f32) from x and dy.
int lg_dnnl_conv_backward_weights(const int64_t* geom, int dtype, const void* x, const void* dy, void* dw) {
  return guard([&] {
    auto c = get(geom, dtype);
    stream s(eng());
    if (c->by_matmul) return run_matmul(s, c->mm, c->mm_p, dy, x, dw);
    auto& pd = c->bwd_weights;
    memory xm = as(s, c->x, x, pd.src_desc()), dym = as(s, c->y, dy, pd.diff_dst_desc());
    Out dwm(c->dw, dw, pd.diff_weights_desc());
    memory scratch(pd.scratchpad_desc(), eng());
    c->bwd_weights_p.execute(
        s, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_DIFF_DST, dym}, {DNNL_ARG_DIFF_WEIGHTS, dwm.m}, {DNNL_ARG_SCRATCHPAD, scratch}});
    dwm.finish(s);
    s.wait();
  });
}
}
