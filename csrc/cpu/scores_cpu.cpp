// All-pairs PDDM scores on the CPU: the fused forward and its fused backward.
//
// Both walk the tiles of the pair space in parallel (batch mode: one triangle), recompute each
// tile's intermediates in an L2-sized workspace and never hold (m, n, d) or (m, n, h).
#include <torch/library.h>

#include <array>
#include <mutex>

#include "cpu_tile.h"

namespace pddm_ext::cpu {
namespace {

at::Tensor scores_cpu(const at::Tensor& x_in, const std::optional<at::Tensor>& y_in, const at::Tensor& W_u,
                      const at::Tensor& b_u, const at::Tensor& W_v, const at::Tensor& b_v, const at::Tensor& W_c,
                      const at::Tensor& b_c, const at::Tensor& w_s, const at::Tensor& b_s) {
  const bool batch = !y_in.has_value();
  const auto x = x_in.contiguous();
  const auto y = batch ? x : y_in->contiguous();
  const int64_t m = x.size(0), n = y.size(0);
  auto out = at::empty({m, n}, x.options());

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pddm_scores_cpu", [&] {
    const PddmWeights<scalar_t> w(W_u, b_u, W_v, b_v, W_c, b_c, w_s, b_s);
    const auto Px = w.project(x);
    const auto Py = batch ? Px : w.project(y);
    const auto grid = make_grid(batch, m, n, pddm_tile_pairs(w.d, w.h, w.c, sizeof(scalar_t)));
    scalar_t* S = out.data_ptr<scalar_t>();
    const scalar_t *xp = x.data_ptr<scalar_t>(), *yp = y.data_ptr<scalar_t>();
    const scalar_t *Pxp = Px.data_ptr<scalar_t>(), *Pyp = Py.data_ptr<scalar_t>();

    at::parallel_for(0, grid.count(), kTilesPerTask, [&](int64_t begin, int64_t end) {
      PddmTile<scalar_t> ws(grid.rows * grid.cols, w.d, w.h, w.c);
      std::vector<scalar_t> tile_scores(grid.rows * grid.cols);
      for (int64_t t = begin; t < end; ++t) {
        int64_t i0, ni, r0, nr;
        grid.tile(t, &i0, &ni, &r0, &nr);
        pddm_tile_forward(w, TileRows<scalar_t>{xp, Pxp, i0, ni, yp, Pyp, r0, nr}, ws, tile_scores.data());
        for (int64_t a = 0; a < ni; ++a) {
          for (int64_t b = 0; b < nr; ++b) {
            const int64_t i = i0 + a, r = r0 + b;
            if (batch && r < i) continue;  // diagonal tile: the mirror writes it
            S[i * n + r] = tile_scores[a * nr + b];
            if (batch) S[r * n + i] = tile_scores[a * nr + b];
          }
        }
      }
    });
  });
  return out;
}

// Gradient accumulators of one thread. In batch mode the x and y roles share dx and dP.
template <typename scalar_t>
struct PddmGrads {
  std::vector<scalar_t> dx, dy, dPx, dPy;  // (m, d), (n, d), (m, h), (n, h)
  std::vector<scalar_t> dW_u, db_u, db_v, dW_c, db_c, dw_s;
  scalar_t db_s = 0;
  bool batch;

  PddmGrads(bool batch_mode, int64_t m, int64_t n, int64_t d, int64_t h, int64_t c, bool need_inputs)
      : dx(need_inputs ? m * d : 0), dy(need_inputs && !batch_mode ? n * d : 0), dPx(m * h),
        dPy(batch_mode ? 0 : n * h), dW_u(h * d), db_u(h), db_v(h), dW_c(c * 2 * h), db_c(c), dw_s(c),
        batch(batch_mode) {}
  scalar_t* dy_rows() { return batch ? dx.data() : dy.data(); }
  scalar_t* dPy_rows() { return batch ? dPx.data() : dPy.data(); }

  void add(const PddmGrads& o) {
    auto acc = [](std::vector<scalar_t>& a, const std::vector<scalar_t>& b) {
      for (size_t k = 0; k < a.size(); ++k) a[k] += b[k];
    };
    acc(dx, o.dx), acc(dy, o.dy), acc(dPx, o.dPx), acc(dPy, o.dPy), acc(dW_u, o.dW_u), acc(db_u, o.db_u);
    acc(db_v, o.db_v), acc(dW_c, o.dW_c), acc(db_c, o.db_c), acc(dw_s, o.dw_s);
    db_s += o.db_s;
  }
};

// Per-tile scratch of the backward.
template <typename scalar_t>
struct PddmTileGrad {
  std::vector<scalar_t> dQ, dZ, dA, dU, coef_u, coef_v;
  PddmTileGrad(int64_t pairs, int64_t d, int64_t h, int64_t c)
      : dQ(pairs * c), dZ(pairs * 2 * h), dA(pairs * h), dU(pairs * d), coef_u(pairs), coef_v(pairs) {}
};

// Back-propagates g[p] = dL/dS(pair p) through one tile whose forward intermediates are in ws.
template <typename scalar_t>
void pddm_tile_backward(const PddmWeights<scalar_t>& w, const TileRows<scalar_t>& t, const PddmTile<scalar_t>& ws,
                        const scalar_t* g, PddmTileGrad<scalar_t>& tg, PddmGrads<scalar_t>& acc, bool need_inputs,
                        bool need_params) {
  const int64_t d = w.d, h = w.h, c = w.c, T = t.ni * t.nr;
  // Score layer: S = w_s . relu(Qm + b_c) + b_s.
  for (int64_t p = 0; p < T; ++p) {
    vec::score_layer_backward(ws.Qm.data() + p * c, w.b_c, w.w_s, g[p], tg.dQ.data() + p * c, acc.dw_s.data(),
                              acc.db_c.data(), c);
    acc.db_s += g[p];
  }
  if (need_params) vec::gemm_tn_accumulate(c, 2 * h, T, tg.dQ.data(), c, ws.Z.data(), 2 * h, acc.dW_c.data());
  vec::gemm_rows(T, 2 * h, c, tg.dQ.data(), c, w.W_c, 2 * h, tg.dZ.data());

  // Normalisations of u' and v', the branch ReLUs and the clamped input norms.
  for (int64_t p = 0; p < T; ++p) {
    const int64_t i = t.i0 + p / t.nr, r = t.r0 + p % t.nr;
    const scalar_t* zu = ws.Z.data() + p * 2 * h;
    const scalar_t* dzu = tg.dZ.data() + p * 2 * h;
    const scalar_t nu = ws.norm_u[p], nv = ws.norm_v[p];
    const scalar_t inv_u = scalar_t(1) / clamped_norm(nu), inv_v = scalar_t(0.5) / clamped_norm(nv);
    const scalar_t dinv_u = vec::branch_backward(zu, dzu, ws.norm_u1[p], ws.A.data() + p * h, nullptr, inv_u,
                                                 acc.db_u.data(), tg.dA.data() + p * h, nullptr, false, h);
    const scalar_t dinv_v = vec::branch_backward(zu + h, dzu + h, ws.norm_v1[p], t.Px + i * h, t.Py + r * h, inv_v,
                                                 acc.db_v.data(), acc.dPx.data() + i * h, acc.dPy_rows() + r * h,
                                                 true, h);
    // inv_u = 1/||u||: d/du = -u/||u||^3.  inv_v = 1/(2||v||) with ||v|| = ||x+y||/2:
    // d/d(x+y) = -(x+y)/(8||v||^3). Below eps the clamp is constant.
    tg.coef_u[p] = nu > scalar_t(kNormEps) ? -dinv_u / (nu * nu * nu) : scalar_t(0);
    tg.coef_v[p] = nv > scalar_t(kNormEps) ? -dinv_v / (scalar_t(8) * nv * nv * nv) : scalar_t(0);
  }
  if (need_params) vec::gemm_tn_accumulate(h, d, T, tg.dA.data(), h, ws.U.data(), d, acc.dW_u.data());
  if (!need_inputs) return;
  vec::gemm_rows(T, d, h, tg.dA.data(), h, w.W_u, d, tg.dU.data());
  for (int64_t p = 0; p < T; ++p) {
    const int64_t i = t.i0 + p / t.nr, r = t.r0 + p % t.nr;
    vec::input_grad(t.x + i * d, t.y + r * d, tg.dU.data() + p * d, tg.coef_u[p], tg.coef_v[p],
                    acc.dx.data() + i * d, acc.dy_rows() + r * d, d);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
scores_backward_cpu(const at::Tensor& grad, const at::Tensor& x_in, const std::optional<at::Tensor>& y_in,
                    const at::Tensor& W_u, const at::Tensor& b_u, const at::Tensor& W_v, const at::Tensor& b_v,
                    const at::Tensor& W_c, const at::Tensor& b_c, const at::Tensor& w_s, const at::Tensor& b_s,
                    std::array<bool, 3> output_mask) {
  const bool batch = !y_in.has_value();
  const bool need_inputs = output_mask[0] || output_mask[1], need_params = output_mask[2];
  const auto x = x_in.contiguous();
  const auto y = batch ? x : y_in->contiguous();
  const int64_t m = x.size(0), n = y.size(0), d = W_u.size(1), h = W_u.size(0), c = W_c.size(0);
  const auto opts = x.options();
  at::Tensor gx = at::zeros({m, d}, opts), gy = batch ? at::zeros({0}, opts) : at::zeros({n, d}, opts);
  at::Tensor gW_u = at::zeros_like(W_u), gb_u = at::zeros_like(b_u), gW_v = at::zeros_like(W_v);
  at::Tensor gb_v = at::zeros_like(b_v), gW_c = at::zeros_like(W_c), gb_c = at::zeros_like(b_c);
  at::Tensor gw_s = at::zeros_like(w_s), gb_s = at::zeros_like(b_s);

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pddm_scores_backward_cpu", [&] {
    const PddmWeights<scalar_t> w(W_u, b_u, W_v, b_v, W_c, b_c, w_s, b_s);
    const auto Px = w.project(x);
    const auto Py = batch ? Px : w.project(y);
    const auto grid = make_grid(batch, m, n, pddm_tile_pairs(d, h, c, sizeof(scalar_t)));
    const scalar_t *xp = x.data_ptr<scalar_t>(), *yp = y.data_ptr<scalar_t>();
    const scalar_t *Pxp = Px.data_ptr<scalar_t>(), *Pyp = Py.data_ptr<scalar_t>();
    // grad may be an expanded view (S.sum()): read it through its strides rather than copy it.
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const int64_t gs0 = grad.stride(0), gs1 = grad.stride(1);
    PddmGrads<scalar_t> total(batch, m, n, d, h, c, need_inputs);
    std::mutex total_mutex;

    at::parallel_for(0, grid.count(), kTilesPerTask, [&](int64_t begin, int64_t end) {
      const int64_t pairs = grid.rows * grid.cols;
      PddmTile<scalar_t> ws(pairs, d, h, c);
      PddmTileGrad<scalar_t> tg(pairs, d, h, c);
      PddmGrads<scalar_t> acc(batch, m, n, d, h, c, need_inputs);
      std::vector<scalar_t> g(pairs);
      for (int64_t t = begin; t < end; ++t) {
        int64_t i0, ni, r0, nr;
        grid.tile(t, &i0, &ni, &r0, &nr);
        const TileRows<scalar_t> rows{xp, Pxp, i0, ni, yp, Pyp, r0, nr};
        for (int64_t a = 0; a < ni; ++a) {
          for (int64_t b = 0; b < nr; ++b) {
            const int64_t i = i0 + a, r = r0 + b;
            scalar_t gi = gp[i * gs0 + r * gs1];
            // Batch mode computes each unordered pair once: it carries dS[i, r] + dS[r, i].
            if (batch) gi = r < i ? scalar_t(0) : (r == i ? gi : gi + gp[r * gs0 + i * gs1]);
            g[a * nr + b] = gi;
          }
        }
        pddm_tile_forward<scalar_t>(w, rows, ws, nullptr);
        pddm_tile_backward(w, rows, ws, g.data(), tg, acc, need_inputs, need_params);
      }
      std::lock_guard<std::mutex> lock(total_mutex);
      total.add(acc);
    });

    const auto vec = [&](std::vector<scalar_t>& v, at::IntArrayRef shape) {
      return at::from_blob(v.data(), shape, opts);
    };
    const auto dPx = vec(total.dPx, {m, h});
    if (need_inputs) {
      gx.copy_(vec(total.dx, {m, d})).addmm_(dPx, w.W_v_t);
      if (!batch) gy.copy_(vec(total.dy, {n, d})).addmm_(vec(total.dPy, {n, h}), w.W_v_t);
    }
    if (need_params) {
      gW_v.copy_(at::mm(dPx.t(), x));
      if (!batch) gW_v.addmm_(vec(total.dPy, {n, h}).t(), y);
      gW_u.copy_(vec(total.dW_u, {h, d}));
      gb_u.copy_(vec(total.db_u, {h}));
      gb_v.copy_(vec(total.db_v, {h}));
      gW_c.copy_(vec(total.dW_c, {c, 2 * h}));
      gb_c.copy_(vec(total.db_c, {c}));
      gw_s.copy_(vec(total.dw_s, {c}));
      gb_s.fill_(total.db_s);
    }
  });
  return {gx, gy, gW_u, gb_u, gW_v, gb_v, gW_c, gb_c, gw_s, gb_s};
}

}  // namespace

TORCH_LIBRARY_IMPL(pddm_ext, CPU, m) {
  m.impl("scores", &scores_cpu);
  m.impl("scores_backward", &scores_backward_cpu);
}

}  // namespace pddm_ext::cpu
