// All-pairs PDDM scores on the CPU: the fused forward and its fused backward.
//
// Both walk the tiles of the pair space in parallel (batch mode: one triangle), recompute each
// tile's intermediates in an L2-sized workspace and never hold (m, n, d) or (m, n, h).
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <memory>

#include "../op_checks.h"
#include "cpu_tile.h"

namespace pddm_ext::cpu {
namespace {

at::Tensor scores_cpu(const at::Tensor& x_in, const std::optional<at::Tensor>& y_in, const at::Tensor& W_u,
                      const at::Tensor& b_u, const at::Tensor& W_v, const at::Tensor& b_v, const at::Tensor& W_c,
                      const at::Tensor& b_c, const at::Tensor& w_s, const at::Tensor& b_s, bool normalize_inputs,
                      std::optional<at::ScalarType> product_dtype) {
  check_pddm_args("pddm_ext::scores", x_in, y_in, W_u, b_u, W_v, b_v, W_c, b_c, w_s, b_s);
  check_product_dtype("pddm_ext::scores", product_dtype, x_in);  // the CPU computes half inputs in float32
  vec::select_isa_from_env();
  const bool batch = !y_in.has_value();
  const auto x = x_in.contiguous();
  const auto y = batch ? x : y_in->contiguous();
  const int64_t m = x.size(0), n = y.size(0);
  auto out = at::empty({m, n}, x.options());

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pddm_scores_cpu", [&] {
    const PddmWeights<scalar_t> w(W_u, b_u, W_v, b_v, W_c, b_c, w_s, b_s, normalize_inputs);
    const auto Px = w.project(x);
    const auto Py = batch ? Px : w.project(y);
    const auto grid = pddm_grid(batch, m, n, w.d, w.h, w.c, sizeof(scalar_t));
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

// The gradients of one side's rows (x or y): dX (rows, d), kept when that input needs a gradient,
// and dP (rows, h), the gradient of its projections P = X W_v^T (for W_v's gradient too).
template <typename scalar_t>
struct RowGrads {
  std::vector<scalar_t> dX, dP;
  RowGrads() = default;
  RowGrads(int64_t rows, int64_t d, int64_t h, bool need_input) : dX(need_input ? rows * d : 0), dP(rows * h) {}
  scalar_t* dX_or_null() { return dX.empty() ? nullptr : dX.data(); }
};

// The gradients one worker accumulates. The row gradients of each side are either the worker's own
// (summed over the workers at the end) or shared ones whose rows only this worker touches (the
// rows of the tile blocks it owns: see scores_backward_cpu). In batch mode x and y share rows.
template <typename scalar_t>
struct PddmGrads {
  RowGrads<scalar_t> own_x, own_y;
  scalar_t *dx, *dPx, *dy, *dPy;
  std::vector<scalar_t> dW_u, db_u, db_v, dW_c, db_c, dw_s;
  std::vector<scalar_t> dW_v;  // the near-antipodal pairs' share of dW_v (the others go through dP)
  scalar_t db_s = 0;

  // shared_x / shared_y: the shared rows of that side, or nullptr for the worker's own. dx / dy are
  // null when that input needs no gradient.
  PddmGrads(bool batch, int64_t m, int64_t n, int64_t d, int64_t h, int64_t c, bool need_x, bool need_y,
            RowGrads<scalar_t>* shared_x, RowGrads<scalar_t>* shared_y)
      : dW_u(h * d), db_u(h), db_v(h), dW_c(c * 2 * h), db_c(c), dw_s(c), dW_v(h * d) {
    RowGrads<scalar_t>* x_rows = shared_x;
    if (x_rows == nullptr) x_rows = &(own_x = RowGrads<scalar_t>(m, d, h, need_x));
    RowGrads<scalar_t>* y_rows = batch ? x_rows : shared_y;
    if (y_rows == nullptr) y_rows = &(own_y = RowGrads<scalar_t>(n, d, h, need_y));
    dx = x_rows->dX_or_null(), dPx = x_rows->dP.data(), dy = y_rows->dX_or_null(), dPy = y_rows->dP.data();
  }

  // Adds o's parameter gradients and own rows (both workers keep own rows of the same sides).
  void add(const PddmGrads& o) {
    auto acc = [](std::vector<scalar_t>& a, const std::vector<scalar_t>& b) {
      for (size_t k = 0; k < a.size(); ++k) a[k] += b[k];
    };
    acc(own_x.dX, o.own_x.dX), acc(own_x.dP, o.own_x.dP), acc(own_y.dX, o.own_y.dX), acc(own_y.dP, o.own_y.dP);
    acc(dW_u, o.dW_u), acc(db_u, o.db_u), acc(db_v, o.db_v), acc(dW_c, o.dW_c), acc(db_c, o.db_c);
    acc(dw_s, o.dw_s), acc(dW_v, o.dW_v);
    db_s += o.db_s;
  }
};

// Per-tile scratch of the backward. The other gradients overwrite the intermediates they replace
// in the tile's workspace (dQ over Qm, dA over A, dU over U), which keeps the backward's working
// set near the forward's, inside L2.
template <typename scalar_t>
struct PddmTileGrad {
  std::vector<scalar_t> dZ, coef_u, coef_v;
  std::vector<scalar_t> zeros, g_v, g_v_mirror, dx_v;  // near-antipodal pairs: (h,), (h,), (h,), (d,)
  PddmTileGrad(int64_t pairs, int64_t d, int64_t h)
      : dZ(pairs * 2 * h), coef_u(pairs), coef_v(pairs), zeros(h), g_v(h), g_v_mirror(h), dx_v(d) {}
};

// The mean branch's gradient g_v = dL/d(W_v (x + y)) of a near-antipodal pair, taken from x + y itself:
// dW_v += g_v (x + y)^T and dx, dy += W_v^T g_v. Through dP_x and dP_y (dW_v = dP_x^T x + dP_y^T y)
// the two large terms g_v x^T and g_v y^T would cancel.
template <typename scalar_t>
void mean_direct_backward(const PddmWeights<scalar_t>& w, const scalar_t* x, const scalar_t* y, const scalar_t* g_v,
                          scalar_t* dW_v, scalar_t* dx, scalar_t* dy, scalar_t* dx_v, bool need_params) {
  const int64_t d = w.d, h = w.h;
  if (need_params) {
    for (int64_t k = 0; k < h; ++k) {
      if (g_v[k] == scalar_t(0)) continue;
      for (int64_t j = 0; j < d; ++j) dW_v[k * d + j] += g_v[k] * (x[j] + y[j]);
    }
  }
  if (dx == nullptr && dy == nullptr) return;
  vec::gemm_rows(1, d, h, g_v, h, w.W_v, d, dx_v);  // W_v^T g_v: W_v (h, d) is the transposed operand
  for (int64_t j = 0; j < d; ++j) {
    if (dx != nullptr) dx[j] += dx_v[j];
    if (dy != nullptr) dy[j] += dx_v[j];
  }
}

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
    const scalar_t inv_u = diff_scale(nu, w.normalize_inputs), inv_v = mean_scale(nv, w.normalize_inputs);
    scalar_t dinv_u, dinv_v;
    if (ws.direct[p] < 0) {
      vec::branches_backward(zu, dzu, ws.norm_u1[p], ws.norm_v1[p], dA + p * h, inv_u, t.Px + i * h, t.Py + r * h,
                             inv_v, acc.db_u.data(), acc.db_v.data(), acc.dPx + i * h, acc.dPy + r * h, h, &dinv_u,
                             &dinv_v);
    } else {  // a near-antipodal pair: W_v (x + y) was formed directly, and so is its gradient
      std::fill(tg.g_v.begin(), tg.g_v.end(), scalar_t(0));
      vec::branches_backward(zu, dzu, ws.norm_u1[p], ws.norm_v1[p], dA + p * h, inv_u, ws.mean_a(p, nullptr),
                             tg.zeros.data(), inv_v, acc.db_u.data(), acc.db_v.data(), tg.g_v.data(),
                             tg.g_v_mirror.data(), h, &dinv_u, &dinv_v);
      mean_direct_backward(w, t.x + i * d, t.y + r * d, tg.g_v.data(), acc.dW_v.data(),
                           need_inputs ? acc.dx == nullptr ? nullptr : acc.dx + i * d : nullptr,
                           need_inputs ? acc.dy == nullptr ? nullptr : acc.dy + r * d : nullptr, tg.dx_v.data(),
                           need_params);
    }
    tg.coef_u[p] = diff_scale_coef(dinv_u, nu, w.normalize_inputs);
    tg.coef_v[p] = mean_scale_coef(dinv_v, nv, w.normalize_inputs);
  }
  if (need_params) vec::gemm_tn_accumulate(h, d, T, dA, h, ws.U.data(), d, acc.dW_u.data());
  if (!need_inputs) return;
  scalar_t* dU = ws.U.data();
  vec::gemm_rows(T, d, h, dA, h, w.W_u, d, dU);
  for (int64_t p = 0; p < T; ++p) {
    const int64_t i = t.row(p), r = t.col(p);
    vec::input_grad(t.x + i * d, t.y + r * d, dU + p * d, tg.coef_u[p], tg.coef_v[p],
                    acc.dx == nullptr ? nullptr : acc.dx + i * d, acc.dy == nullptr ? nullptr : acc.dy + r * d, d);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
scores_backward_cpu(const at::Tensor& grad, const at::Tensor& x_in, const std::optional<at::Tensor>& y_in,
                    const at::Tensor& W_u, const at::Tensor& b_u, const at::Tensor& W_v, const at::Tensor& b_v,
                    const at::Tensor& W_c, const at::Tensor& b_c, const at::Tensor& w_s, const at::Tensor& b_s,
                    std::array<bool, 3> output_mask, bool normalize_inputs,
                    std::optional<at::ScalarType> product_dtype) {
  check_pddm_args("pddm_ext::scores_backward", x_in, y_in, W_u, b_u, W_v, b_v, W_c, b_c, w_s, b_s);
  check_scores_grad("pddm_ext::scores_backward", grad, x_in, y_in);
  check_product_dtype("pddm_ext::scores_backward", product_dtype, x_in);  // the CPU computes half inputs in float32
  vec::select_isa_from_env();
  const bool batch = !y_in.has_value();
  // An input that needs no gradient gets an empty (0,) tensor back, and no row gradients are kept
  // for it (a memory bank that is not trained costs no (n, d) gradient).
  const bool need_x = output_mask[0], need_y = !batch && output_mask[1], need_params = output_mask[2];
  const bool need_inputs = need_x || need_y;
  const auto x = x_in.contiguous();
  const auto y = batch ? x : y_in->contiguous();
  const int64_t m = x.size(0), n = y.size(0), d = W_u.size(1), h = W_u.size(0), c = W_c.size(0);
  const auto opts = x.options();
  at::Tensor gx = need_x ? at::zeros({m, d}, opts) : at::zeros({0}, opts);
  at::Tensor gy = need_y ? at::zeros({n, d}, opts) : at::zeros({0}, opts);
  at::Tensor gW_u = at::zeros_like(W_u), gb_u = at::zeros_like(b_u), gW_v = at::zeros_like(W_v);
  at::Tensor gb_v = at::zeros_like(b_v), gW_c = at::zeros_like(W_c), gb_c = at::zeros_like(b_c);
  at::Tensor gw_s = at::zeros_like(w_s), gb_s = at::zeros_like(b_s);

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pddm_scores_backward_cpu", [&] {
    const PddmWeights<scalar_t> w(W_u, b_u, W_v, b_v, W_c, b_c, w_s, b_s, normalize_inputs);
    const auto Px = w.project(x);
    const auto Py = batch ? Px : w.project(y);
    const auto grid = pddm_grid(batch, m, n, d, h, c, sizeof(scalar_t));
    const scalar_t *xp = x.data_ptr<scalar_t>(), *yp = y.data_ptr<scalar_t>();
    const scalar_t *Pxp = Px.data_ptr<scalar_t>(), *Pyp = Py.data_ptr<scalar_t>();
    // grad may be an expanded view (S.sum()): read it through its strides rather than copy it.
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const int64_t gs0 = grad.stride(0), gs1 = grad.stride(1);
    // Which worker sums which tiles, fixed for a given thread count, and the partial sums are added
    // in worker order at the end: the gradients are reproducible run to run. Batch mode deals tile t
    // to worker t % workers, so every worker gets the same mix of cheap (diagonal) and full tiles.
    // Reference mode gives each worker whole blocks of the longer side (columns when n >= m): that
    // side's row gradients are written by one worker each and kept once, so a large memory bank's
    // (n, d) and (n, h) gradients are not copied per thread; the shorter side's are per worker.
    enum class Owner { kTile, kRowBlock, kColBlock };
    const Owner owner = batch                                        ? Owner::kTile
                        : grid.col_blocks() >= grid.row_blocks() ? Owner::kColBlock
                                                                 : Owner::kRowBlock;
    const int64_t tiles = grid.count(), rb = grid.row_blocks(), cb = grid.col_blocks();
    const int64_t units = owner == Owner::kTile ? (tiles + kTilesPerTask - 1) / kTilesPerTask
                                                : (owner == Owner::kColBlock ? cb : rb);
    const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), units));
    RowGrads<scalar_t> shared;
    if (owner == Owner::kRowBlock) shared = RowGrads<scalar_t>(m, d, h, need_x);
    if (owner == Owner::kColBlock) shared = RowGrads<scalar_t>(n, d, h, need_y);
    RowGrads<scalar_t>* shared_x = owner == Owner::kRowBlock ? &shared : nullptr;
    RowGrads<scalar_t>* shared_y = owner == Owner::kColBlock ? &shared : nullptr;
    const auto for_each_tile_of = [&](int64_t worker, auto&& f) {
      if (owner == Owner::kTile) {
        for (int64_t t = worker; t < tiles; t += workers) f(t);
      } else if (owner == Owner::kColBlock) {
        for (int64_t bj = worker; bj < cb; bj += workers)
          for (int64_t bi = 0; bi < rb; ++bi) f(bi * cb + bj);
      } else {
        for (int64_t bi = worker; bi < rb; bi += workers)
          for (int64_t bj = 0; bj < cb; ++bj) f(bi * cb + bj);
      }
    };
    std::vector<std::unique_ptr<PddmGrads<scalar_t>>> partial(workers);

    at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
      const int64_t pairs = grid.rows * grid.cols;
      PddmTile<scalar_t> ws(pairs, d, h, c);
      PddmTileGrad<scalar_t> tg(pairs, d, h);
      std::vector<scalar_t> g(pairs);
      std::vector<int32_t> live(pairs);
      for (int64_t worker = begin; worker < end; ++worker) {
        auto acc = std::make_unique<PddmGrads<scalar_t>>(batch, m, n, d, h, c, need_x, need_y, shared_x,
                                                                shared_y);
        for_each_tile_of(worker, [&](int64_t t) {
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
          if (count == 0) return;
          const TileRows<scalar_t> rows{xp, Pxp, i0, ni, yp, Pyp, r0, nr,
                                        count == ni * nr ? nullptr : live.data(), count};
          pddm_tile_forward<scalar_t>(w, rows, ws, nullptr);
          pddm_tile_backward(w, rows, ws, g.data(), tg, *acc, need_inputs, need_params);
        });
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
    const auto rows = [&](scalar_t* p, int64_t count, int64_t width) {
      return at::from_blob(p, {count, width}, opts);
    };
    // The dense products through P (dx += dP W_v, dW_v = dP_x^T x + dP_y^T y) in the kernels' own
    // arithmetic (parallel_gemm_rows), not at::mm: on the CPU too, at::mm follows
    // torch.set_float32_matmul_precision, and "medium" runs float32 in bfloat16 there.
    constexpr int64_t kRowsPerTask = 16;
    if (need_x) {
      gx.copy_(rows(total.dx, m, d));
      parallel_gemm_rows(m, d, h, total.dPx, h, w.W_v, d, gx.data_ptr<scalar_t>(), true, kRowsPerTask);
    }
    if (need_y) {
      gy.copy_(rows(total.dy, n, d));
      parallel_gemm_rows(n, d, h, total.dPy, h, w.W_v, d, gy.data_ptr<scalar_t>(), true, kRowsPerTask);
    }
    if (need_params) {
      auto dW_v = vec(total.dW_v, {h, d}).clone();  // the near-antipodal pairs' direct share, then + dP^T X
      const auto dPx_t = rows(total.dPx, m, h).t().contiguous();
      parallel_gemm_rows(h, d, m, dPx_t.data_ptr<scalar_t>(), m, x.data_ptr<scalar_t>(), d, dW_v.data_ptr<scalar_t>(),
                         true, kRowsPerTask);
      if (!batch) {
        const auto dPy_t = rows(total.dPy, n, h).t().contiguous();
        parallel_gemm_rows(h, d, n, dPy_t.data_ptr<scalar_t>(), n, y.data_ptr<scalar_t>(), d, dW_v.data_ptr<scalar_t>(),
                           true, kRowsPerTask);
      }
      gW_v.copy_(dW_v);
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
