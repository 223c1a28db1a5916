// All-pairs PDDM scores on the CPU: the fused forward and its fused backward.
//
// Both walk the tiles of the pair space in parallel (batch mode: one triangle), recompute each
// tile's intermediates in an L2-sized workspace and never hold (m, n, d) or (m, n, h).
#include <torch/library.h>

#include <array>
#include <algorithm>
#include <memory>

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

// Per-tile scratch of the backward. The other gradients overwrite the intermediates they replace
// in the tile's workspace (dQ over Qm, dA over A, dU over U), which keeps the backward's working
// set near the forward's, inside L2.
template <typename scalar_t>
struct PddmTileGrad {
  std::vector<scalar_t> dZ, coef_u, coef_v;
  PddmTileGrad(int64_t pairs, int64_t h) : dZ(pairs * 2 * h), coef_u(pairs), coef_v(pairs) {}
};

// Back-propagates g[p] = dL/dS(pair p) through one tile whose forward intermediates are in ws
// (consumed: see PddmTileGrad).
template <typename scalar_t>
void pddm_tile_backward(const PddmWeights<scalar_t>& w, const TileRows<scalar_t>& t, PddmTile<scalar_t>& ws,
                        const scalar_t* g, PddmTileGrad<scalar_t>& tg, PddmGrads<scalar_t>& acc, bool need_inputs,
                        bool need_params) {
  const int64_t d = w.d, h = w.h, c = w.c, T = t.size();
  // Score layer: S = w_s . relu(Qm + b_c) + b_s.
  scalar_t* dQ = ws.Qm.data();
  for (int64_t p = 0; p < T; ++p) {
    vec::score_layer_backward(dQ + p * c, w.b_c, w.w_s, g[p], acc.dw_s.data(), acc.db_c.data(), c);
    acc.db_s += g[p];
  }
  if (need_params) vec::gemm_tn_accumulate(c, 2 * h, T, dQ, c, ws.Z.data(), 2 * h, acc.dW_c.data());
  vec::gemm_rows(T, 2 * h, c, dQ, c, w.W_c, 2 * h, tg.dZ.data());

  // Normalisations of u' and v', the branch ReLUs and the clamped input norms.
  scalar_t* dA = ws.A.data();
  for (int64_t p = 0; p < T; ++p) {
    const int64_t i = t.row(p), r = t.col(p);
    const scalar_t* zu = ws.Z.data() + p * 2 * h;
    const scalar_t* dzu = tg.dZ.data() + p * 2 * h;
    const scalar_t nu = ws.norm_u[p], nv = ws.norm_v[p];
    const scalar_t inv_u = scalar_t(1) / clamped_norm(nu), inv_v = scalar_t(0.5) / clamped_norm(nv);
    scalar_t dinv_u, dinv_v;
    vec::branches_backward(zu, dzu, ws.norm_u1[p], ws.norm_v1[p], dA + p * h, inv_u, t.Px + i * h, t.Py + r * h,
                           inv_v, acc.db_u.data(), acc.db_v.data(),
                           acc.dPx.data() + i * h, acc.dPy_rows() + r * h, h, &dinv_u, &dinv_v);
    // inv_u = 1/||u||: d/du = -u/||u||^3.  inv_v = 1/(2||v||) with ||v|| = ||x+y||/2:
    // d/d(x+y) = -(x+y)/(8||v||^3). Below eps the clamp is constant.
    tg.coef_u[p] = nu > scalar_t(kNormEps) ? -dinv_u / (nu * nu * nu) : scalar_t(0);
    tg.coef_v[p] = nv > scalar_t(kNormEps) ? -dinv_v / (scalar_t(8) * nv * nv * nv) : scalar_t(0);
  }
  if (need_params) vec::gemm_tn_accumulate(h, d, T, dA, h, ws.U.data(), d, acc.dW_u.data());
  if (!need_inputs) return;
  scalar_t* dU = ws.U.data();
  vec::gemm_rows(T, d, h, dA, h, w.W_u, d, dU);
  for (int64_t p = 0; p < T; ++p) {
    const int64_t i = t.row(p), r = t.col(p);
    vec::input_grad(t.x + i * d, t.y + r * d, dU + p * d, tg.coef_u[p], tg.coef_v[p],
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
    // Tile t goes to worker t % workers, so every worker gets the same mix of cheap (diagonal) and
    // full tiles, and each worker's partial sums, added up in worker order at the end, depend only
    // on the thread count: the gradients are reproducible run to run.
    const int64_t tiles = grid.count();
    const int64_t workers =
        std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (tiles + kTilesPerTask - 1) / kTilesPerTask));
    std::vector<std::unique_ptr<PddmGrads<scalar_t>>> partial(workers);

    at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
      const int64_t pairs = grid.rows * grid.cols;
      PddmTile<scalar_t> ws(pairs, d, h, c);
      PddmTileGrad<scalar_t> tg(pairs, h);
      std::vector<scalar_t> g(pairs);
      std::vector<int32_t> live(pairs);
      for (int64_t worker = begin; worker < end; ++worker) {
        auto acc = std::make_unique<PddmGrads<scalar_t>>(batch, m, n, d, h, c, need_inputs);
        for (int64_t t = worker; t < tiles; t += workers) {
          int64_t i0, ni, r0, nr;
          grid.tile(t, &i0, &ni, &r0, &nr);
          // The tile's pairs with a nonzero gradient, in order: the others add nothing, so a sparse
          // dS (a margin loss, mined pairs) costs in proportion to its nonzeros. Batch mode computes
          // each unordered pair once and carries dS[i, r] + dS[r, i].
          int64_t count = 0;
          for (int64_t a = 0; a < ni; ++a) {
            for (int64_t b = 0; b < nr; ++b) {
              const int64_t i = i0 + a, r = r0 + b;
              if (batch && r < i) continue;
              scalar_t gi = gp[i * gs0 + r * gs1];
              if (batch && r != i) gi += gp[r * gs0 + i * gs1];
              if (gi == scalar_t(0)) continue;
              g[count] = gi;
              live[count++] = static_cast<int32_t>(a * nr + b);
            }
          }
          if (count == 0) continue;
          const TileRows<scalar_t> rows{xp, Pxp, i0, ni, yp, Pyp, r0, nr,
                                        count == ni * nr ? nullptr : live.data(), count};
          pddm_tile_forward<scalar_t>(w, rows, ws, nullptr);
          pddm_tile_backward(w, rows, ws, g.data(), tg, *acc, need_inputs, need_params);
        }
        partial[worker] = std::move(acc);
      }
    });
    PddmGrads<scalar_t>& total = *partial[0];
    for (int64_t k = 1; k < workers; ++k) {
      total.add(*partial[k]);
      partial[k].reset();
    }

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
